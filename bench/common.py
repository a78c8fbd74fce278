"""Shared pieces of the benchmarks: thread pinning, model pairs with the same random weights,
alternating timing, FLOP counts and table printing.

`pin_threads` must run before jax or torch is imported (XLA sizes its CPU thread pool from the
process's CPU affinity when the CPU client starts), so this module imports them lazily.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import statistics
import sys
import time
from typing import Callable, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CLIP_TAPS = (6, 12, 18, 24)  # SSVP's CLIP taps (ViT-L); scaled down for shallower models
DINO_TAPS = (6, 12, 18, 24)


def pin_threads(n: int | None) -> int:
  """Restricts this process to `n` CPUs (None: all it has) and returns the count.

  XLA's CPU client sizes its intra-op (Eigen) pool from the schedulable CPUs, i.e. the
  affinity mask, and has no thread-count flag in jax 0.10.2; torch gets the same number
  through `torch.set_num_threads` (see `torch_threads`). Must run before jax is imported.
  """
  avail = sorted(os.sched_getaffinity(0))
  if n is None or n >= len(avail):
    return len(avail)
  if "jax" in sys.modules:
    raise RuntimeError("pin_threads must run before jax is imported")
  os.sched_setaffinity(0, avail[:n])
  return n


def torch_threads(n: int) -> None:
  import torch
  torch.set_num_threads(n)
  torch.set_grad_enabled(False)


def machine() -> str:
  """One line: CPU model, CPUs used, library versions."""
  import jax
  import torch
  import transformers
  model = "?"
  try:
    with open("/proc/cpuinfo") as f:
      model = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return (f"{model}, {len(os.sched_getaffinity(0))} CPUs used of {os.cpu_count()}; jax {jax.__version__}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}; "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")


def load_avg() -> str:
  return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


# ----------------------------------------------------------------------------- model specs


@dataclasses.dataclass(frozen=True)
class Spec:
  """One backbone at one input size. kind: "clip" or "dinov3"."""
  name: str
  kind: str
  width: int
  layers: int
  heads: int
  mlp: int
  patch: int
  size: int
  registers: int = 4  # DINOv3 only

  @property
  def tokens(self) -> int:
    prefix = 1 if self.kind == "clip" else 1 + self.registers
    return prefix + (self.size // self.patch) ** 2

  @property
  def taps(self) -> tuple[int, ...]:
    """Four evenly spaced taps ending at the last block (SSVP's 6/12/18/24 on 24 blocks)."""
    return tuple(sorted({max(1, round(self.layers * k / 4)) for k in (1, 2, 3, 4)}))

  def flops(self) -> float:
    """Forward multiply-add FLOPs per image (2 per MAC), matmuls and attention only."""
    t, d, f = self.tokens, self.width, self.mlp
    per_layer = 2 * t * (4 * d * d + 2 * d * f) + 2 * 2 * t * t * d
    patch = 2 * (self.size // self.patch) ** 2 * self.patch ** 2 * 3 * d
    return self.layers * per_layer + patch


SPECS = {
    "clip_b16_224": Spec("CLIP ViT-B/16 @224", "clip", 768, 12, 12, 3072, 16, 224),
    "clip_l14_336": Spec("CLIP ViT-L/14 @336", "clip", 1024, 24, 16, 4096, 14, 336),
    "clip_l14_518": Spec("CLIP ViT-L/14 @518", "clip", 1024, 24, 16, 4096, 14, 518),
    "dino_b16_224": Spec("DINOv3 ViT-B/16 @224", "dinov3", 768, 12, 12, 3072, 16, 224),
    "dino_l16_592": Spec("DINOv3 ViT-L/16 @592", "dinov3", 1024, 24, 16, 4096, 16, 592),
    # --smoke: seconds on two cores, same code paths
    "clip_tiny": Spec("CLIP tiny @56", "clip", 64, 2, 2, 128, 14, 56),
    "dino_tiny": Spec("DINOv3 tiny @64", "dinov3", 64, 2, 2, 128, 16, 64, registers=2),
}


def _randomize(model, seed: int) -> None:
  """Random weights everywhere (LayerNorm scales near 1) so no path is trivially zero."""
  import torch
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if "norm" in name and name.endswith("weight") or name.endswith("lambda1"):
        p.copy_(1.0 + 0.1 * noise)
      else:
        p.copy_(0.02 * noise)


def torch_model(spec: Spec, seed: int = 0, attn: str = "sdpa"):
  """(transformers module in eval mode, its state dict as numpy). CLIP: a CLIPModel with a
  two-layer text tower (the converter maps a whole CLIPModel); only `vision_model` runs."""
  import torch
  from transformers import CLIPConfig, CLIPModel, DINOv3ViTConfig, DINOv3ViTModel
  torch.manual_seed(seed)
  if spec.kind == "clip":
    cfg = CLIPConfig(
        vision_config=dict(hidden_size=spec.width, intermediate_size=spec.mlp, num_hidden_layers=spec.layers,
                           num_attention_heads=spec.heads, image_size=spec.size, patch_size=spec.patch,
                           hidden_act="quick_gelu", layer_norm_eps=1e-5),
        text_config=dict(vocab_size=514, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, hidden_act="quick_gelu",
                         bos_token_id=512, eos_token_id=513, pad_token_id=513),
        projection_dim=64)
    cfg._attn_implementation = attn
    cfg.vision_config._attn_implementation = attn
    model = CLIPModel(cfg).eval()
  else:
    cfg = DINOv3ViTConfig(hidden_size=spec.width, num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                          intermediate_size=spec.mlp, patch_size=spec.patch, num_register_tokens=spec.registers,
                          image_size=spec.size, hidden_act="gelu", layer_norm_eps=1e-5)
    cfg._attn_implementation = attn
    model = DINOv3ViTModel(cfg).eval()
  _randomize(model, seed)
  state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  return model, state


def flax_model(spec: Spec, hf_model, state, dtype=None):
  """Our module with the same weights, converted by the converters' pure functions."""
  import jax.numpy as jnp
  from flax import nnx
  from convert import clip as convert_clip
  from convert import dinov3 as convert_dinov3
  from ssvp_jax.models import bundle, clip, dinov3
  dtype = dtype or jnp.float32
  if spec.kind == "clip":
    cfg = convert_clip.config_from_hf(hf_model.config.vision_config, hf_model.config.text_config,
                                      hf_model.config.projection_dim, pos_interpolation="bicubic")
    model = clip.empty(cfg, dtype=dtype)
    bundle.assign_params(model, convert_clip.hf_to_flax(state, cfg), source="random transformers CLIP")
  else:
    cfg = convert_dinov3.hf_config(hf_model.config.to_dict())
    model = bundle.zeros_module(lambda: dinov3.DINOv3(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    bundle.assign_params(model, convert_dinov3.hf_to_flax(state, cfg), source="random transformers DINOv3")
  return model


def flax_forward(spec: Spec, model) -> Callable:
  """jit(images -> tapped hidden states + final feature); parameters are arguments, the
  tapped-layer tuple is static (one compilation per input shape)."""
  import jax
  from flax import nnx
  graphdef, state = nnx.split(model)
  taps = spec.taps

  @jax.jit
  def fwd(state, images):
    m = nnx.merge(graphdef, state)
    if spec.kind == "clip":
      out = m.encode_image(images, layers=taps)
      return out.hidden_states, out.image_embeds
    out = m.encode_image(images, layers=taps)
    return out.hidden_states, out.last_hidden_state

  return lambda images: fwd(state, images)


def torch_forward(spec: Spec, model) -> Callable:
  """The transformers forward with all hidden states (SSVP taps four of them)."""
  if spec.kind == "clip":
    return lambda pixels: model.vision_model(pixel_values=pixels, output_hidden_states=True)
  return lambda pixels: model(pixel_values=pixels, output_hidden_states=True)


@contextlib.contextmanager
def xla_attention_for_counting():
  """Within it, the backbones trace with `jax.nn.dot_product_attention` everywhere.

  For FLOP counting only: XLA's cost analysis counts the body of a loop once, so the CPU
  attention (`lax.map` over the heads, ssvp_jax/models/attention.py) would be undercounted
  by the number of heads times the batch.
  """
  from ssvp_jax.models import attention
  old = attention.default_implementation
  attention.default_implementation = lambda is_causal=False: "xla"
  try:
    yield
  finally:
    attention.default_implementation = old


def xla_flops(fn, *args) -> float | None:
  """XLA's FLOP estimate of `jax.jit(fn)(*args)` (lowered, not compiled), with the attention
  counted as `jax.nn.dot_product_attention`; None where the backend gives no estimate."""
  import jax
  with xla_attention_for_counting():
    cost = jax.jit(fn).lower(*args).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"]) if cost and cost.get("flops", 0) > 0 else None


# ----------------------------------------------------------------------------- timing


def block(x):
  """Waits for JAX results (torch on CPU is synchronous)."""
  import jax
  return jax.block_until_ready(x)


def time_alternating(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 1) -> dict[str, list[float]]:
  """Runs each fn `warmup` times (compilation, allocator warm-up), then `reps` rounds that
  call the fns in turn, so a noisy neighbour slows all of them alike. -> {name: seconds}."""
  for fn in fns.values():
    for _ in range(warmup):
      block(fn())
  times = {k: [] for k in fns}
  for _ in range(reps):
    for k, fn in fns.items():
      t0 = time.perf_counter()
      block(fn())
      times[k].append(time.perf_counter() - t0)
  return times


def median(xs: Sequence[float]) -> float:
  return statistics.median(xs)


def matmul_peak(n: int = 4096, reps: int = 5, dtype: str = "float32") -> float:
  """Measured FLOP/s of a jitted n x n x n matmul (the best of `reps`)."""
  import jax
  k1, k2 = jax.random.split(jax.random.key(0))
  a = jax.random.normal(k1, (n, n), dtype)
  b = jax.random.normal(k2, (n, n), dtype)
  f = jax.jit(lambda a, b: a @ b)
  block(f(a, b))
  best = float("inf")
  for _ in range(reps):
    t0 = time.perf_counter()
    block(f(a, b))
    best = min(best, time.perf_counter() - t0)
  return 2 * n ** 3 / best


def gemm_rates(m: int, k: int, n: int, reps: int = 10) -> dict[str, float]:
  """Best-of-`reps` FLOP/s of one float32 [m, k] x [k, n] matmul: {"jax": XLA's, "torch": PyTorch's}.

  The two frameworks alternate on the same data. At a backbone's MLP shape this is the ceiling
  each framework's forward can reach (the matmuls are ~80 % of a ViT's FLOPs).
  """
  import jax
  import numpy as np
  import torch
  rng = np.random.default_rng(0)
  a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
  ja, jb, ta, tb = jax.numpy.asarray(a), jax.numpy.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
  f = jax.jit(lambda x, y: x @ y)
  times = time_alternating({"jax": lambda: f(ja, jb), "torch": lambda: ta @ tb}, reps=reps, warmup=2)
  return {name: 2 * m * k * n / min(ts) for name, ts in times.items()}


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
  """A markdown table on stdout."""
  print("| " + " | ".join(header) + " |")
  print("|" + "|".join("---" for _ in header) + "|")
  for r in rows:
    print("| " + " | ".join(str(c) for c in r) + " |")
  sys.stdout.flush()


# ----------------------------------------------------------------------------- engine processes


class ChildFailed(RuntimeError):
  """An engine process died, was killed by the memory guard, or broke the protocol."""


def rss_gb(pid: int, field: str = "VmRSS") -> float:
  """Resident (VmRSS) or peak resident (VmHWM) memory of a process in GB; 0 when it is gone."""
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1]) / 1e6
  except OSError:
    pass
  return 0.0


class MemoryGuard:
  """Holds the resident memory of the engine processes together under `limit_gb`: while one of them is
  busy, a thread polls it and kills it when it and the others pass the limit (OpenVINO's compile of
  the demo-size model once took 21 GB)."""

  def __init__(self, limit_gb: float):
    self.limit_gb, self.pids = limit_gb, set()

  def others_gb(self, pid: int) -> float:
    return sum(rss_gb(p) for p in self.pids if p != pid)

  @contextlib.contextmanager
  def watch(self, proc):
    import threading
    stop, killed = threading.Event(), []

    def poll():
      while not stop.wait(0.1):
        used = rss_gb(proc.pid) + self.others_gb(proc.pid)
        if used > self.limit_gb:
          killed.append(used)
          proc.kill()
          return
    t = threading.Thread(target=poll, daemon=True)
    t.start()
    try:
      yield killed
    finally:
      stop.set()
      t.join()


class Child:
  """An engine process that speaks a line protocol on its stdin/stdout: "ready" once built, then
  "run N" -> a JSON list of N step times, anything else ends it (bench_inference.serve)."""

  def __init__(self, argv: list[str], env: dict | None, guard: MemoryGuard):
    import subprocess
    self.guard = guard
    self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    guard.pids.add(self.proc.pid)
    self.peak_gb = None

  def _ask(self, line: str | None) -> str:
    with self.guard.watch(self.proc) as killed:
      try:
        if line is not None:
          self.proc.stdin.write(line + "\n")
          self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
      except (BrokenPipeError, OSError):
        answer = ""
    if not answer:
      self.proc.wait()
      if killed:
        raise ChildFailed(f"killed by the memory guard at {killed[0]:.1f} GB (all engine processes, "
                          f"limit {self.guard.limit_gb:g} GB)")
      raise ChildFailed(f"the process ended (exit status {self.proc.returncode}; its error is above)")
    return answer.strip()

  def ready(self) -> None:
    if self._ask(None) != "ready":
      raise ChildFailed("the process said something other than 'ready'")

  def run(self, n: int) -> list[float]:
    import json
    return json.loads(self._ask(f"run {n}"))

  def close(self) -> float | None:
    """Ends the process; returns its peak resident memory in GB (VmHWM) when it was still there."""
    if self.proc.poll() is None:
      self.peak_gb = rss_gb(self.proc.pid, "VmHWM") or None
      try:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.close()
      except (BrokenPipeError, OSError):
        pass
      try:
        self.proc.wait(timeout=60)
      except Exception:  # noqa: BLE001
        self.proc.kill()
        self.proc.wait()
    self.guard.pids.discard(self.proc.pid)
    return self.peak_gb

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def openvino_int8(onnx_path: str, calibration, threads: int | None = None, weights_only: bool = False,
                  options: dict | None = None, batch: int = 1) -> Callable:
  """run(images [n, S, S, 3]) -> {output: array} of the ONNX model on OpenVINO's CPU plugin in int8.

  weights_only=False: NNCF post-training quantization (`nncf.quantize`, transformer preset: int8
  weights and activations of the matmuls) calibrated on `calibration` [m, S, S, 3]. weights_only=True:
  `nncf.compress_weights` (int8 weights, float activations; needs no data). Everything NNCF leaves in
  float runs in float32 (INFERENCE_PRECISION_HINT=f32), so the change from float32 is the int8 part.
  The model is fixed to batch `batch` first: with the dynamic batch axis, OpenVINO 2026.4's
  low-precision ReshapeTransformation fails to compile the quantized demo model ("Requested output
  shape [1,197,1,1] is incompatible with input shape"). Calls run in chunks of `batch` (the last padded).
  """
  import nncf
  import numpy as np
  import openvino as ov
  core = ov.Core()
  model = core.read_model(onnx_path)
  size = int(calibration.shape[1])
  model.reshape({"images": [batch, size, size, 3]})

  def chunks(x):
    n = len(x)
    padded = np.concatenate([x, x[:(-n) % batch]]) if n % batch else x
    return [np.ascontiguousarray(padded[i:i + batch], np.float32) for i in range(0, len(padded), batch)], n

  if weights_only:
    model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
  else:
    items, _ = chunks(np.resize(calibration, (max(len(calibration), batch),) + calibration.shape[1:]))
    model = nncf.quantize(model, nncf.Dataset(items), subset_size=len(items), model_type=nncf.ModelType.TRANSFORMER)
  config = {"INFERENCE_PRECISION_HINT": "f32", **(options or {})}
  if threads:
    config["INFERENCE_NUM_THREADS"] = threads
  request = core.compile_model(model, "CPU", config).create_infer_request()

  def run(x):
    parts, n = chunks(np.asarray(x))
    outs = [{k.get_any_name(): np.array(v) for k, v in request.infer({"images": c}).items()} for c in parts]
    return {k: np.concatenate([o[k] for o in outs])[:n] for k in outs[0]}
  return run
