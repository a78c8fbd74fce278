"""SSVP inference end to end (both backbones + heads, `evaluate.eval_step`): images/s and the
fraction of the machine's matmul peak, measured in the same run.

    .venv/bin/python bench/bench_inference.py                  # full size: ViT-L/14 @518 + ViT-L/16 @592
    .venv/bin/python bench/bench_inference.py --small          # the demo config's random backbones
    .venv/bin/python bench/bench_inference.py --smoke          # the tiny config (a test of the script)
    .venv/bin/python bench/bench_inference.py --small --engines jax,onnxruntime,torch --reps 5   # engines
    .venv/bin/python bench/bench_inference.py --smoke --engines all   # with OpenVINO (21 GB at demo size)

--engines (issue 14) times the whole inference function of the artifacts (`export.inference_function`:
resizing, both backbones, heads, map, scores; images [b, S, S, 3] in) on each engine, same weights
(seeded random), same images, same threads:
  jax            the function jitted (what predict and the .jaxexport artifact run)
  onnxruntime    its ONNX conversion (onnx_export), CPU provider, all graph optimisations
  openvino_f32   the same ONNX file, OpenVINO CPU, INFERENCE_PRECISION_HINT=f32
  openvino_bf16  the same, INFERENCE_PRECISION_HINT=bf16 (AMX where the CPU has it)
  torch          transformers' PyTorch CLIP vision tower + DINOv3 of the same shapes, backbones only
                 (no resizing, heads or map: a lower bound for any PyTorch SSVP), random weights
Each engine runs in its own subprocess, one after another: runtimes loaded in one process disturb
each other (their thread pools; onnxruntime ran 3x slower after JAX in the same process), and only
one copy of the weights is in memory at a time. One table: images/s, the ratio to JAX, and each
engine's largest difference from JAX on the score and the map (same images); the load average after
each engine is printed. Memory: OpenVINO's compile of the demo-size model peaked at 21 GB here.

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


ENGINES = ("jax", "onnxruntime", "openvino_f32", "openvino_bf16", "torch")


def add_args(p: argparse.ArgumentParser, *, batch: int, reps: int, dtype: str, peak_n: int) -> None:
  p.add_argument("--batch", type=int, default=batch)
  p.add_argument("--reps", type=int, default=reps, help="timed steps (median reported)")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default=dtype,
                 help="compute dtype of backbones and heads (parameters stay float32)")
  p.add_argument("--peak_n", type=int, default=peak_n, help="size of the square matmul that measures the peak")
  g = p.add_mutually_exclusive_group()
  g.add_argument("--small", action="store_true", help="configs/demo.py's random backbones (the small preset, 112 px)")
  g.add_argument("--smoke", action="store_true", help="configs/tiny.py, one step (a test of the script)")


def parse(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  add_args(p, batch=1, reps=3, dtype="float32", peak_n=4096)
  p.add_argument("--threads", type=int, default=None, help="CPUs to use (default: all)")
  p.add_argument("--engines", default=None, help=f"comma-separated from {','.join(ENGINES)}, or 'all': time the "
                 "deployment engines (each in its own subprocess) instead of the FLOP measurement")
  p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: time one engine, write an .npz here
  args = p.parse_args(argv)
  if args.engines:
    args.engines = list(ENGINES) if args.engines == "all" else args.engines.split(",")
    unknown = sorted(set(args.engines) - set(ENGINES))
    if unknown:
      p.error(f"--engines: unknown {', '.join(unknown)}; choose from {', '.join(ENGINES)}")
  if args.smoke:
    args.reps, args.peak_n = 1, min(args.peak_n, 256)
  return args


def get_config(args: argparse.Namespace):
  """configs/base.py (full size), demo (--small) or tiny (--smoke), with `args.dtype`."""
  if args.smoke:
    from configs import tiny as cfg_module
  elif args.small:
    from configs import demo as cfg_module
  else:
    from configs import base as cfg_module
  config = cfg_module.get_config()
  if "dtype" in config:
    config.dtype = args.dtype
  return config


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
  if config.clip.random_init:
    return build_lib.build_model(config)
  dtype = build_lib.compute_dtype(config)
  clip = clip_lib.empty(clip_lib.vit_l14_336().replace(pos_interpolation=config.clip.pos_interpolation), dtype=dtype)
  dino = bundle.zeros_module(lambda: dinov3_lib.DINOv3(dinov3_lib.DINOv3Config.vitl16(), dtype=dtype, rngs=nnx.Rngs(0)))
  _random_params(clip, 1)
  _random_params(dino, 2)
  heads_dtype = None if dtype == jax.numpy.float32 else dtype
  model = SSVP(config.model, clip, dino, config.clip.layers, config.dino.layers, config.clip.local_tokens,
               dtype=heads_dtype, rngs=nnx.Rngs(params=3))
  return model, clip_lib.byte_level_tokenizer()


def backbone_specs(model, config) -> list:
  """The two backbones as `common.Spec`s at the configured sizes (for the analytic FLOP count)."""
  v, d = model.clip.config.vision, model.dino.cfg
  return [common.Spec("clip", "clip", v.width, v.layers, v.heads, v.mlp_dim, v.patch_size, config.clip.image_size),
          common.Spec("dino", "dinov3", d.hidden_size, d.num_layers, d.num_heads, d.intermediate_size, d.patch_size,
                      config.dino.image_size, registers=d.num_register_tokens)]


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
  ci = jnp.asarray(rng.standard_normal((batch, config.clip.image_size, config.clip.image_size, 3)), jnp.float32)
  di = jnp.asarray(rng.standard_normal((batch, config.dino.image_size, config.dino.image_size, 3)), jnp.float32)
  from ssvp_jax.models import clip as clip_lib
  templates = templates_for(model, clip_lib.byte_level_tokenizer(), ["bottle"], config)
  table = functional.Bound(SSVP.prompt_table, model)((jnp.asarray(templates.ids), jnp.asarray(templates.eot)))
  t_init = jnp.broadcast_to(table[:1], (batch,) + table.shape[1:])
  graphdef, state = nnx.split(model)
  size, sigma = int(config.clip.image_size), float(config.eval.sigma)

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
  return dict(config=("tiny" if args.smoke else "demo" if args.small else "full"), batch=args.batch,
              dtype=args.dtype, device=str(jax.devices()[0].device_kind), build_s=build_s, compile_s=compile_s,
              times=times, step_s=step_s, ips=args.batch / step_s, xla_flops=xla_flops, analytic_flops=analytic,
              achieved=flops / step_s, peak=peak, frac=flops / step_s / peak,
              mfu=(flops / step_s / device_peak) if device_peak else None,
              sizes=(config.clip.image_size, config.dino.image_size))


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


def engine_factories(args: argparse.Namespace, threads: int, tmp: str) -> list[tuple[str, str, Callable]]:
  """[(engine, what runs, make() -> run() -> outputs)]; each engine is built only when its turn comes."""
  import jax
  import numpy as np

  from ssvp_jax import export, inference, onnx_export
  from ssvp_jax.trainer import views
  config = get_config(args)
  model, tokenizer = build(config)
  engine = inference.Engine(model, config, "bottle", inference.category_table(model, tokenizer, config, "bottle"),
                            views(config), None, tokenizer)
  size = engine.map_size
  images = np.random.default_rng(0).random((args.batch, size, size, 3)).astype(np.float32)
  path = os.path.join(tmp, "bench.onnx")
  if any(e.startswith(("onnxruntime", "openvino")) for e in args.engines):
    t0 = time.perf_counter()
    onnx_export.export_onnx(engine, path)
    print(f"# ONNX conversion {time.perf_counter() - t0:.1f} s")

  def make_jax():
    fn, weights = export.inference_function(engine, size)
    jitted, w = jax.jit(fn), jax.device_put(weights)
    return lambda: jitted(w, images)

  def make_onnx(name: str, precision: str):
    from ssvp_jax.onnx_runner import OnnxModel
    m = OnnxModel(path, name, precision, threads)
    return lambda: m(images)

  def make_torch():
    import torch
    common.torch_threads(threads)
    fwd = []
    for spec in backbone_specs(model, config):
      tm, _ = common.torch_model(spec)
      fwd.append((common.torch_forward(spec, tm), torch.randn(args.batch, 3, spec.size, spec.size)))
    return lambda: [f(x) for f, x in fwd]

  makers = {"jax": ("whole function, jax.jit", make_jax),
            "onnxruntime": ("whole function, ONNX", lambda: make_onnx("onnxruntime", "f32")),
            "openvino_f32": ("whole function, ONNX", lambda: make_onnx("openvino", "f32")),
            "openvino_bf16": ("whole function, ONNX", lambda: make_onnx("openvino", "bf16")),
            "torch": ("backbones only, transformers", make_torch)}
  return [(e, *makers[e]) for e in ENGINES if e in args.engines]


def child_argv(args: argparse.Namespace, threads: int, engine: str, out: str) -> list[str]:
  """The command line that times `engine` alone in a fresh process with this run's settings."""
  size = ["--smoke"] if args.smoke else ["--small"] if args.small else []
  return [sys.executable, os.path.abspath(__file__), *size, f"--batch={args.batch}", f"--reps={args.reps}",
          f"--dtype={args.dtype}", f"--threads={threads}", f"--engines={engine}", f"--child={out}"]


def measure_one(args: argparse.Namespace, threads: int) -> None:
  """In the child: times its one engine and writes times, outputs and the load average to args.child."""
  import tempfile

  import numpy as np
  (e,) = args.engines
  with tempfile.TemporaryDirectory() as tmp:
    ((_, what, make),) = engine_factories(args, threads, tmp)
    run = make()
    out = run()
    times = common.time_alternating({e: run}, reps=args.reps, warmup=1)[e]
  maps = {} if e == "torch" else {k: np.asarray(out[k]) for k in ("map", "score")}
  np.savez(args.child, times=np.asarray(times), what=what, load=common.load_avg(), **maps)


def measure_engines(args: argparse.Namespace, threads: int) -> list[dict]:
  """Times each engine in its own subprocess, one after another; prints and returns one row per engine."""
  import subprocess
  import tempfile

  import numpy as np
  res = {}
  with tempfile.TemporaryDirectory() as tmp:
    for e in [e for e in ENGINES if e in args.engines]:
      out = os.path.join(tmp, f"{e}.npz")
      subprocess.run(child_argv(args, threads, e, out), check=True)
      with np.load(out) as z:
        res[e] = {k: z[k] for k in z.files}
  ref = res.get("jax")
  base = common.median(list(res["jax"]["times"])) if ref is not None else None
  rows = []
  for e, r in res.items():
    step = common.median(list(r["times"]))
    row = dict(engine=e, what=str(r["what"]), step_s=step, ips=args.batch / step,
               vs_jax=None if base is None else base / step, d_score=None, d_map=None)
    if ref is not None and "map" in r:
      row.update(d_score=float(np.abs(r["score"] - ref["score"]).max()),
                 d_map=float(np.abs(r["map"] - ref["map"]).max()))
    rows.append(row)
  fmt = lambda x, f: "-" if x is None else format(x, f)
  common.print_table(["engine", "runs", "s/batch (median)", "img/s", "vs JAX", "max |d score| vs JAX",
                      "max |d map| vs JAX"],
                     [[r["engine"], r["what"], f"{r['step_s']:.4f}", f"{r['ips']:.3f}", fmt(r["vs_jax"], ".2f") +
                       ("x" if r["vs_jax"] else ""), fmt(r["d_score"], ".1e"), fmt(r["d_map"], ".1e")] for r in rows])
  for e, r in res.items():
    print(f"# {e} (own process): steps {['%.3f' % t for t in r['times']]}, {r['load']} after it")
  return rows


def main(argv=None):
  args = parse(argv)
  threads = common.pin_threads(args.threads)
  if args.child:
    return measure_one(args, threads)
  what = "deployment engines" if args.engines else "evaluate.eval_step"
  print(f"# SSVP inference ({what}), config {'tiny' if args.smoke else 'demo' if args.small else 'full'}, "
        f"batch {args.batch}, {common.machine()}")
  print(f"# {common.load_avg()} (start)")
  r = measure_engines(args, threads) if args.engines else measure(args)
  if not args.engines:
    print_result(r)
  print(f"# {common.load_avg()} (end)")
  return r


if __name__ == "__main__":
  main()
