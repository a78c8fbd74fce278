"""SSVP inference end to end (both backbones + heads, `evaluate.eval_step`): images/s and the
fraction of the machine's matmul peak, measured in the same run.

    .venv/bin/python bench/bench_inference.py                  # full size: ViT-L/14 @518 + ViT-L/16 @592
    .venv/bin/python bench/bench_inference.py --small          # the demo config's random backbones
    .venv/bin/python bench/bench_inference.py --smoke          # the tiny config (a test of the script)
    .venv/bin/python bench/bench_inference.py --vitb --engines jax,onnxruntime,torch --reps 10   # engines
    .venv/bin/python bench/bench_inference.py --small --engines jax,onnxruntime/spin=0,torch --reps 15
    .venv/bin/python bench/bench_inference.py --smoke --engines all

--engines (issue 14) times the whole inference function of the artifacts (`export.inference_function`:
resizing, both backbones, heads, map, scores; images [b, S, S, 3] in) on each engine, same weights
(seeded random), same images, same threads:
  jax            the function jitted (what predict and the .jaxexport artifact run)
  onnxruntime    its ONNX conversion (onnx_export), CPU provider, onnx_runner.OnnxModel's settings
  openvino_f32   the same ONNX file, OpenVINO CPU, INFERENCE_PRECISION_HINT=f32
  openvino_bf16  the same, INFERENCE_PRECISION_HINT=bf16 (AMX where the CPU has it)
  openvino_int8  the same after NNCF post-training int8 quantization (calibrated on 4 of the random images)
  openvino_w8    the same after NNCF int8 weight compression (float activations)
  torch          transformers' PyTorch CLIP vision tower + DINOv3 of the same shapes, backbones only
                 (no resizing, heads or map: a lower bound for any PyTorch SSVP), seeded random weights
An engine may carry settings, NAME/KEY=VALUE/... (ENGINE_OPTIONS), and appear several times with
different ones: onnxruntime/spin=0 (no spin-waiting worker threads), onnxruntime/opt=basic,
onnxruntime/threads=1, jax/xla=--xla_cpu_use_onednn=true (XLA_FLAGS of its process), ...
Each engine runs in its own process (runtimes loaded in one process disturb each other's thread pools;
onnxruntime ran 3x slower after JAX in the same process). All are built first, then timed in rounds:
each engine one step per round in turn, the others blocked on their pipe, so a slowdown of the shared
machine falls on all alike; "vs PyTorch" / "vs JAX" are medians over the rounds of the ratio within a
round. One table: images/s, the ratios, each engine's largest difference from JAX on the score and the
map (same images), and its peak resident memory. --max_rss_gb bounds the engine processes' memory
together (OpenVINO's compile of a ViT-B-sized model took 21 GB here): one that passes it is killed and
its row says so.

Full size builds both ViT-L backbones with random weights (the bundle format's modules, no
download; speed does not depend on the values) and fresh heads from `configs/base.py`. The
step is `evaluate.eval_step` (features, heads, map post-processing) jitted once; the warm-up
call that compiles is excluded. FLOPs come from XLA's cost analysis of the compiled step and,
for the backbones, from the analytic count of `common.Spec.flops`; the peak is the best of a
few large jitted matmuls in the same dtype, on the same CPUs, in the same run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


ENGINES = ("jax", "onnxruntime", "openvino_f32", "openvino_bf16", "openvino_int8", "openvino_w8", "torch")


def add_args(p: argparse.ArgumentParser, *, batch: int, reps: int, dtype: str, peak_n: int) -> None:
  p.add_argument("--batch", type=int, default=batch)
  p.add_argument("--reps", type=int, default=reps, help="timed steps (median reported)")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default=dtype,
                 help="compute dtype of backbones and heads (parameters stay float32)")
  p.add_argument("--peak_n", type=int, default=peak_n, help="size of the square matmul that measures the peak")
  g = p.add_mutually_exclusive_group()
  g.add_argument("--small", action="store_true", help="configs/demo.py's random backbones (the small preset, 112 px)")
  g.add_argument("--vitb", action="store_true", help="configs/demo_vitb.py's random ViT-B/16-shaped backbones (224 px)")
  g.add_argument("--smoke", action="store_true", help="configs/tiny.py, one step (a test of the script)")


def parse(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  add_args(p, batch=1, reps=3, dtype="float32", peak_n=4096)
  p.add_argument("--threads", type=int, default=None, help="CPUs to use (default: all)")
  p.add_argument("--engines", default=None, help=f"comma-separated from {','.join(ENGINES)}, or 'all'; each may "
                 "carry settings, NAME/KEY=VALUE/... (ENGINE_OPTIONS; e.g. onnxruntime/spin=0): time the deployment "
                 "engines (each in its own process, interleaved rounds) instead of the FLOP measurement")
  p.add_argument("--max_rss_gb", type=float, default=8.0,
                 help="--engines: the engine processes' resident memory together; one that passes it is killed")
  p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: an engine spec or "export"
  p.add_argument("--onnx", default=None, help=argparse.SUPPRESS)   # internal: the ONNX file
  p.add_argument("--out", default=None, help=argparse.SUPPRESS)    # internal: the child's outputs (.npz)
  args = p.parse_args(argv)
  if args.engines:
    args.engines = list(ENGINES) if args.engines == "all" else args.engines.split(",")
    try:
      for spec in args.engines:
        parse_engine(spec)
    except ValueError as e:
      p.error(str(e))
  if args.smoke:
    args.reps, args.peak_n = (3 if args.engines else 1), min(args.peak_n, 256)
  return args


def get_config(args: argparse.Namespace):
  """configs/base.py (full size), demo (--small), demo_vitb (--vitb) or tiny (--smoke), with `args.dtype`."""
  if args.smoke:
    from configs import tiny as cfg_module
  elif args.small:
    from configs import demo as cfg_module
  elif getattr(args, "vitb", False):
    from configs import demo_vitb as cfg_module
  else:
    from configs import base as cfg_module
  config = cfg_module.get_config()
  if "dtype" in config:
    config.dtype = args.dtype
  return config


def config_name(args: argparse.Namespace) -> str:
  return "tiny" if args.smoke else "demo" if args.small else "demo_vitb" if getattr(args, "vitb", False) else "full"


def _random_params(model, seed: int = 0) -> None:
  """Overwrites every float parameter with small random values (the full-size modules are
  built from zeros, which would make LayerNorm and softmax degenerate)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  new = [0.02 * jax.random.normal(k, x.shape, x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
         for k, x in zip(keys, leaves)]
  nnx.update(model, jax.tree.unflatten(treedef, new))


def build(config):
  """(SSVP model, tokenizer): full-size random ViT-L backbones when the config names no preset."""
  import jax
  from flax import nnx

  from ssvp_jax import build as build_lib
  from ssvp_jax.models import bundle
  from ssvp_jax.models import clip as clip_lib
  from ssvp_jax.models import dinov3 as dinov3_lib
  from ssvp_jax.models.ssvp import SSVP
  sem = config.backbones.semantic
  if sem.random_init:
    return build_lib.build_model(config)
  dtype = build_lib.compute_dtype(config)
  clip = clip_lib.empty(clip_lib.vit_l14_336().replace(pos_interpolation=sem.pos_interpolation),
                        local_tokens=sem.local_tokens, dtype=dtype)
  dino = bundle.zeros_module(lambda: dinov3_lib.DINOv3(dinov3_lib.DINOv3Config.vitl16(), dtype=dtype, rngs=nnx.Rngs(0)))
  _random_params(clip, 1)
  _random_params(dino, 2)
  heads_dtype = None if dtype == jax.numpy.float32 else dtype
  model = SSVP(clip, dino, config, dtype=heads_dtype, rngs=nnx.Rngs(params=3))
  return model, clip_lib.byte_level_tokenizer()


def backbone_specs(model, config) -> list:
  """The two backbones as `common.Spec`s at the configured sizes (for the analytic FLOP count)."""
  v, d = model.semantic.config.vision, model.structural.cfg
  sem, struct = config.backbones.semantic, config.backbones.structural
  return [common.Spec("clip", "clip", v.width, v.layers, v.heads, v.mlp_dim, v.patch_size, sem.image_size),
          common.Spec("dino", "dinov3", d.hidden_size, d.num_layers, d.num_heads, d.intermediate_size, d.patch_size,
                      struct.image_size, registers=d.num_register_tokens)]


def compiled_step(model, config, batch: int):
  """(run() -> outputs, XLA's FLOP count of one step or None, compile seconds).

  `evaluate.eval_step` inlined into one `jax.jit` over the split state, so that the compiled
  executable (and its cost analysis) is the one that runs.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from ssvp_jax import evaluate, functional
  from ssvp_jax.models.prompts import templates_for
  from ssvp_jax.models.ssvp import SSVP
  rng = np.random.default_rng(0)
  sc, sd = config.backbones.semantic.image_size, config.backbones.structural.image_size
  ci = jnp.asarray(rng.standard_normal((batch, sc, sc, 3)), jnp.float32)
  di = jnp.asarray(rng.standard_normal((batch, sd, sd, 3)), jnp.float32)
  from ssvp_jax.models import clip as clip_lib
  templates = templates_for(model, clip_lib.byte_level_tokenizer(), ["bottle"], config)
  table = functional.Bound(SSVP.prompt_table, model)((jnp.asarray(templates.ids), jnp.asarray(templates.eot)))
  t_init = jnp.broadcast_to(table[:1], (batch,) + table.shape[1:])
  graphdef, state = nnx.split(model)
  size, sigma = int(sc), float(config.eval.sigma)

  def step(state, ci, di, t_init):
    return evaluate.eval_step(nnx.merge(graphdef, state), ci, di, t_init, size, sigma)

  t0 = time.perf_counter()
  compiled = jax.jit(step).lower(state, ci, di, t_init).compile()
  compile_s = time.perf_counter() - t0
  flops = common.xla_flops(step, state, ci, di, t_init)  # traced again, attention counted in full
  return (lambda: compiled(state, ci, di, t_init)), flops, compile_s


def measure(args: argparse.Namespace, *, device_peak: float | None = None) -> dict:
  """Builds, compiles and times the step and the matmul peak; returns the numbers."""
  import jax
  config = get_config(args)
  t0 = time.perf_counter()
  model, _ = build(config)
  build_s = time.perf_counter() - t0
  run_step, xla_flops, compile_s = compiled_step(model, config, args.batch)
  analytic = sum(s.flops() for s in backbone_specs(model, config)) * args.batch
  times = common.time_alternating({"step": run_step}, reps=args.reps, warmup=1)["step"]
  step_s = common.median(times)
  peak = common.matmul_peak(args.peak_n, reps=3, dtype=args.dtype)
  flops = xla_flops or analytic
  return dict(config=config_name(args), batch=args.batch,
              dtype=args.dtype, device=str(jax.devices()[0].device_kind), build_s=build_s, compile_s=compile_s,
              times=times, step_s=step_s, ips=args.batch / step_s, xla_flops=xla_flops, analytic_flops=analytic,
              achieved=flops / step_s, peak=peak, frac=flops / step_s / peak,
              mfu=(flops / step_s / device_peak) if device_peak else None,
              sizes=(config.backbones.semantic.image_size, config.backbones.structural.image_size))


def print_result(r: dict) -> None:
  gf = lambda x: "-" if x is None else f"{x / 1e9:.1f}"
  header = ["config", "sizes (CLIP/DINO)", "batch", "dtype", "s/step (median)", "img/s", "GFLOP/img (XLA)",
            "GFLOP/img (backbones, analytic)", "achieved GFLOP/s", "measured matmul peak GFLOP/s", "fraction of peak"]
  row = [r["config"], "%d/%d" % r["sizes"], r["batch"], r["dtype"], f"{r['step_s']:.3f}", f"{r['ips']:.3f}",
         gf(r["xla_flops"] and r["xla_flops"] / r["batch"]), gf(r["analytic_flops"] / r["batch"]),
         gf(r["achieved"]), gf(r["peak"]), f"{100 * r['frac']:.0f}%"]
  if r.get("mfu") is not None:
    header.append("MFU (chip peak)")
    row.append(f"{100 * r['mfu']:.1f}%")
  common.print_table(header, [row])
  print(f"# steps {['%.3f' % t for t in r['times']]} s; build {r['build_s']:.1f} s, compile {r['compile_s']:.1f} s; "
        f"device {r['device']}")


ENGINE_OPTIONS = {  # NAME/key=value/...: the settings each engine takes besides threads=N
    "jax": {"xla": "XLA_FLAGS for its process, several joined by '+'"},
    "onnxruntime": {"spin": "session.intra_op.allow_spinning (0/1)", "opt": "graph optimisation level "
                    "(disable|basic|extended|all)", "inter": "inter_op_num_threads"},
    "openvino_f32": {"hint": "PERFORMANCE_HINT (LATENCY|THROUGHPUT)"},
    "openvino_bf16": {"hint": "PERFORMANCE_HINT (LATENCY|THROUGHPUT)"},
    "openvino_int8": {"hint": "PERFORMANCE_HINT (LATENCY|THROUGHPUT)"},
    "openvino_w8": {"hint": "PERFORMANCE_HINT (LATENCY|THROUGHPUT)"},
    "torch": {"omp": "OMP_WAIT_POLICY for its process (PASSIVE: OpenMP threads sleep instead of spinning)"},
}


def parse_engine(spec: str) -> tuple[str, dict[str, str]]:
  """"onnxruntime/spin=0/opt=basic" -> ("onnxruntime", {"spin": "0", "opt": "basic"}); ValueError names the part."""
  name, *parts = spec.split("/")
  if name not in ENGINES:
    raise ValueError(f"--engines: unknown engine {name!r} in {spec!r}; choose from {', '.join(ENGINES)}")
  opts = {}
  for part in parts:
    key, eq, value = part.partition("=")
    if not eq or key not in {"threads", *ENGINE_OPTIONS[name]}:
      raise ValueError(f"--engines: {spec!r}: {part!r} is not KEY=VALUE with KEY one of threads, "
                       f"{', '.join(ENGINE_OPTIONS[name]) or '(none other)'}")
    opts[key] = value
  return name, opts


def onnx_options(name: str, opts: dict[str, str]) -> dict[str, str]:
  """The bench's short option names as `OnnxModel(options=...)`."""
  if name == "onnxruntime":
    keys = {"spin": "session.intra_op.allow_spinning", "opt": "graph_optimization_level",
            "inter": "inter_op_num_threads"}
  else:
    keys = {"hint": "PERFORMANCE_HINT"}
  return {keys[k]: v for k, v in opts.items() if k in keys}


def bench_model(args: argparse.Namespace):
  """(config, SSVP model, inference.Engine for "bottle"), seeded random weights."""
  from ssvp_jax import inference
  from ssvp_jax.data.pipeline import views
  config = get_config(args)
  model, tokenizer = build(config)
  engine = inference.Engine(model, config, "bottle", inference.category_table(model, tokenizer, config, "bottle"),
                            views(config), None, tokenizer)
  return config, model, engine


def bench_images(batch: int, size: int):
  import numpy as np
  return np.random.default_rng(0).random((batch, size, size, 3)).astype(np.float32)


def make_engine(args: argparse.Namespace, spec: str, threads: int, onnx_path: str) -> tuple[str, Callable]:
  """(what runs, run() -> outputs) for one engine spec, built in this process."""
  name, opts = parse_engine(spec)
  if name == "torch":
    import torch
    config, model, _ = bench_model(args)  # for the backbones' shapes only
    specs = backbone_specs(model, config)
    del model
    common.torch_threads(threads)
    fwd = []
    for s in specs:
      tm, _ = common.torch_model(s)
      fwd.append((common.torch_forward(s, tm), torch.randn(args.batch, 3, s.size, s.size)))
    return "backbones only, transformers", lambda: [f(x) for f, x in fwd]
  if name == "jax":
    import jax

    from ssvp_jax import export
    _, _, engine = bench_model(args)
    images = bench_images(args.batch, engine.map_size)
    fn, weights = export.inference_function(engine, engine.map_size)
    jitted, w = jax.jit(fn), jax.device_put(weights)
    return "whole function, jax.jit", lambda: jitted(w, images)
  from ssvp_jax.onnx_runner import OnnxModel
  if name in ("openvino_int8", "openvino_w8"):
    import onnx
    size = int(onnx.load(onnx_path, load_external_data=False).graph.input[0].type.tensor_type.shape.dim[1].dim_value)
    images = bench_images(args.batch, size)
    run = common.openvino_int8(onnx_path, bench_images(4, size), threads, weights_only=name == "openvino_w8",
                               options=onnx_options(name, opts), batch=args.batch)
    return "whole function, ONNX + NNCF", lambda: run(images)
  engine_name, precision = ("onnxruntime", "f32") if name == "onnxruntime" else ("openvino", name.split("_")[1])
  m = OnnxModel(onnx_path, engine_name, precision, threads, onnx_options(name, opts))
  images = bench_images(args.batch, m.input_size)
  return "whole function, ONNX", lambda: m(images)


def child_argv(args: argparse.Namespace, threads: int, role: str, onnx_path: str, out: str) -> list[str]:
  """The command line of a child process with this run's settings. role: an engine spec, or "export"."""
  size = ["--smoke"] if args.smoke else ["--small"] if args.small else ["--vitb"] if args.vitb else []
  return [sys.executable, os.path.abspath(__file__), *size, f"--batch={args.batch}", f"--dtype={args.dtype}",
          f"--threads={threads}", f"--child={role}", f"--onnx={onnx_path}", f"--out={out}"]


def serve(args: argparse.Namespace, threads: int) -> None:
  """In a child: builds its engine (or writes the ONNX file), says "ready", then answers "run N" with N
  step times (JSON) until "quit". Anything libraries print goes to stderr; stdout is the protocol."""
  import json

  import numpy as np
  proto = os.fdopen(os.dup(1), "w", buffering=1)
  os.dup2(2, 1)
  if args.child == "export":
    from ssvp_jax import onnx_export
    _, _, engine = bench_model(args)
    t0 = time.perf_counter()
    onnx_export.export_onnx(engine, args.onnx)
    print(f"# ONNX conversion {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    proto.write("ready\n")
    return
  what, run = make_engine(args, args.child, threads, args.onnx)
  out = common.block(run())
  common.block(run())  # a second warm-up call: allocators and thread pools settle
  name = parse_engine(args.child)[0]
  maps = {} if name == "torch" else {k: np.asarray(out[k]) for k in ("map", "score")}
  np.savez(args.out, what=what, **maps)
  proto.write("ready\n")
  for line in sys.stdin:
    if line.startswith("run "):
      times = []
      for _ in range(int(line.split()[1])):
        t0 = time.perf_counter()
        common.block(run())
        times.append(time.perf_counter() - t0)
      proto.write(json.dumps(times) + "\n")
    else:
      return


def measure_engines(args: argparse.Namespace, threads: int) -> list[dict]:
  """Times the engines, each in its own process, in interleaved rounds; prints and returns one row each.

  All engine processes are built first (one at a time, each waiting for the previous to be ready), then
  `reps` rounds each give every engine one timed step in turn (the order rotates from round to round),
  while the others wait blocked on their pipe. A slowdown of the shared machine thus falls on all
  engines alike, and the ratio of two engines is taken within each round (median over the rounds).
  The processes' resident memory together is held under --max_rss_gb (a process that would pass it is
  killed and reported).
  """
  import tempfile

  import numpy as np
  specs = list(dict.fromkeys(args.engines))
  res, failed, children = {}, {}, {}
  guard = common.MemoryGuard(args.max_rss_gb)
  with tempfile.TemporaryDirectory() as tmp:
    onnx_path = os.path.join(tmp, "bench.onnx")
    try:
      if any(not s.startswith(("jax", "torch")) for s in specs):
        with common.Child(child_argv(args, threads, "export", onnx_path, ""), None, guard) as c:
          c.ready()
      for i, spec in enumerate(specs):
        name, opts = parse_engine(spec)
        env = dict(os.environ)
        if "xla" in opts:
          env["XLA_FLAGS"] = " ".join([env.get("XLA_FLAGS", ""), *opts["xla"].split("+")]).strip()
        if "omp" in opts:
          env["OMP_WAIT_POLICY"] = opts["omp"]
        n = int(opts.get("threads", threads))
        child = common.Child(child_argv(args, n, spec, onnx_path, os.path.join(tmp, f"{i}.npz")), env, guard)
        try:
          child.ready()
          children[spec] = child
          with np.load(os.path.join(tmp, f"{i}.npz")) as z:
            res[spec] = {k: z[k] for k in z.files}
          res[spec].update(times=[], threads=n)
        except common.ChildFailed as e:
          failed[spec] = str(e)
          child.close()
      order = list(children)
      for r in range(args.reps):
        k = r % max(1, len(order))
        for spec in order[k:] + order[:k]:
          time.sleep(0.05)  # threads that spin-wait after a call (onnxruntime's) are done before the next
          res[spec]["times"] += children[spec].run(1)
    finally:
      for spec, c in children.items():
        res[spec]["peak_gb"] = c.close()
  return report(args, specs, res, failed)


def report(args: argparse.Namespace, specs: list[str], res: dict, failed: dict) -> list[dict]:
  """The engines' table: s/step, img/s, ratios within rounds to PyTorch and to JAX, parity with JAX."""
  import numpy as np
  ref = next((s for s in specs if s == "jax"), None)
  torch_ref = next((s for s in specs if s == "torch"), None)

  def ratio(spec, base):  # median over rounds of base's step time / spec's step time (> 1: spec is faster)
    if base is None or base not in res or spec not in res:
      return None
    return common.median([b / t for b, t in zip(res[base]["times"], res[spec]["times"])])

  rows = []
  for spec in specs:
    if spec in failed:
      rows.append(dict(engine=spec, what="failed: " + failed[spec], step_s=None, ips=None, vs_torch=None,
                       vs_jax=None, d_score=None, d_map=None, times=[], peak_gb=None))
      continue
    r = res[spec]
    step = common.median(r["times"])
    row = dict(engine=spec, what=str(r["what"]), step_s=step, ips=args.batch / step, vs_torch=ratio(spec, torch_ref),
               vs_jax=ratio(spec, ref), d_score=None, d_map=None, times=r["times"], peak_gb=r.get("peak_gb"))
    if ref in res and "map" in r:
      row.update(d_score=float(np.abs(r["score"] - res[ref]["score"]).max()),
                 d_map=float(np.abs(r["map"] - res[ref]["map"]).max()))
    rows.append(row)
  fmt = lambda x, f, suffix="": "-" if x is None else format(x, f) + suffix
  common.print_table(["engine", "runs", "s/batch (median)", "img/s", "vs PyTorch", "vs JAX", "max |d score| vs JAX",
                      "max |d map| vs JAX", "peak RSS GB"],
                     [[r["engine"], r["what"], fmt(r["step_s"], ".4f"), fmt(r["ips"], ".3f"),
                       fmt(r["vs_torch"], ".2f", "x"), fmt(r["vs_jax"], ".2f", "x"), fmt(r["d_score"], ".1e"),
                       fmt(r["d_map"], ".1e"), fmt(r["peak_gb"], ".2f")] for r in rows])
  print("# vs X: median over the rounds of X's step time / this engine's (> 1: faster than X); each engine "
        "in its own process (own process), rounds interleaved")
  for r in rows:
    if r["times"]:
      print(f"# {r['engine']}: steps {['%.3f' % t for t in r['times']]}")
  return rows


def main(argv=None):
  args = parse(argv)
  threads = common.pin_threads(args.threads)
  if args.child:
    return serve(args, threads)
  what = "deployment engines" if args.engines else "evaluate.eval_step"
  print(f"# SSVP inference ({what}), config {config_name(args)}, "
        f"batch {args.batch}, {common.machine()}")
  print(f"# {common.load_avg()} (start)")
  r = measure_engines(args, threads) if args.engines else measure(args)
  if not args.engines:
    print_result(r)
  print(f"# {common.load_avg()} (end)")
  return r


if __name__ == "__main__":
  main()
