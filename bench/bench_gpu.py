"""GPU variant: SSVP inference end to end and each backbone alone, in bfloat16 at full size,
with MFU against the chip's dense bf16 peak. Runs as-is on a machine with a CUDA GPU.

    python bench/bench_gpu.py                     # batch 8, bf16, ViT-L/14 @518 + ViT-L/16 @592
    python bench/bench_gpu.py --batch 32 --reps 10
    python bench/bench_gpu.py --smoke             # on CPU, tiny sizes: tests this script's logic

Without a GPU (and without --smoke) it exits with an error saying so. The chip's peak comes
from PEAKS by `jax.devices()[0].device_kind` (override with --peak_tflops); a large bf16 matmul
is measured in the same run as well, so the table shows both the datasheet MFU and the fraction
of the measured matmul rate. Attention goes through `jax.nn.dot_product_attention`, which
XLA lowers to cuDNN's fused kernel on GPU where it applies.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_inference  # noqa: E402
import common  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from the vendors' datasheets (SXM parts
# where there are several). Matched by substring of the lower-cased device kind, first match wins.
PEAKS = (
    ("h200", 989.0), ("h100 pcie", 756.0), ("h100", 989.0), ("gh200", 989.0),
    ("b200", 2250.0), ("gb200", 2500.0),
    ("a100", 312.0), ("a10g", 70.0), ("a10", 125.0), ("l40s", 362.0), ("l4", 121.0),
    ("rtx 4090", 165.0), ("v100", 125.0),  # V100: fp16 (no bf16 tensor cores)
)


def chip_peak(device_kind: str) -> float | None:
  """Datasheet dense bf16 FLOP/s for a `device_kind`, or None if unknown."""
  kind = device_kind.lower()
  for name, tflops in PEAKS:
    if name in kind:
      return tflops * 1e12
  return None


def parse(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  bench_inference.add_args(p, batch=8, reps=5, dtype="bfloat16", peak_n=8192)
  p.add_argument("--peak_tflops", type=float, default=None, help="the chip's peak, if not in PEAKS")
  p.add_argument("--no_backbones", action="store_true", help="skip the backbone-alone rows")
  args = p.parse_args(argv)
  if args.smoke:
    args.reps, args.peak_n, args.batch = 1, min(args.peak_n, 256), min(args.batch, 2)
  return args


def backbone_rows(args: argparse.Namespace, peak: float | None) -> list[list[str]]:
  """Each full-size backbone alone (jitted forward, 4 taps) in `args.dtype`: img/s and MFU."""
  import jax.numpy as jnp
  import numpy as np
  rows = []
  keys = ("clip_tiny", "dino_tiny") if args.smoke else ("clip_l14_518", "dino_l16_592")
  for key in keys:
    spec = common.SPECS[key]
    hf, state = common.torch_model(spec)  # random weights on the host, converted as in bench_backbones
    model = common.flax_model(spec, hf, state, dtype=getattr(jnp, args.dtype))
    del hf, state
    fwd = common.flax_forward(spec, model)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((args.batch, spec.size, spec.size, 3)), jnp.float32)
    t = common.median(common.time_alternating({"f": lambda: fwd(x)}, reps=args.reps, warmup=2)["f"])
    achieved = spec.flops() * args.batch / t
    rows.append([spec.name, args.batch, args.dtype, f"{t:.4f}", f"{args.batch / t:.1f}",
                 f"{achieved / 1e12:.1f}", "-" if peak is None else f"{100 * achieved / peak:.1f}%"])
  return rows


def main(argv=None) -> dict:
  args = parse(argv)
  import jax
  dev = jax.devices()[0]
  if dev.platform != "gpu" and not args.smoke:
    sys.exit(f"bench_gpu.py: no GPU visible to JAX (devices: {jax.devices()}); this benchmark needs a CUDA "
             "GPU and jax[cuda]. Use bench/bench_inference.py on a CPU, or --smoke to test the script.")
  peak = args.peak_tflops * 1e12 if args.peak_tflops else chip_peak(dev.device_kind)
  print(f"# GPU benchmark on {dev.device_kind} ({dev.platform}), jax {jax.__version__}; "
        f"chip peak {'unknown' if peak is None else f'{peak / 1e12:.0f} TFLOP/s'} (dense {args.dtype})")
  r = bench_inference.measure(args, device_peak=peak)
  bench_inference.print_result(r)
  if not args.no_backbones:
    common.print_table(["backbone", "batch", "dtype", "s/batch", "img/s", "TFLOP/s (analytic)", "MFU"],
                       backbone_rows(args, peak))
  return r


if __name__ == "__main__":
  main()
