"""Backbone forward: our Flax CLIP vision tower and DINOv3 vs transformers' PyTorch models.

    .venv/bin/python bench/bench_backbones.py                       # B/16@224, L/14@518, DINOv3 L/16@592
    .venv/bin/python bench/bench_backbones.py --models clip_b16_224 --reps 7
    .venv/bin/python bench/bench_backbones.py --smoke               # tiny models, seconds

Both frameworks get the same random weights (transformers' model, converted with
`convert.clip.hf_to_flax` / `convert.dinov3.hf_to_flax`), the same CPUs (the process is
pinned to `--threads` CPUs, which sizes XLA's pool, and `torch.set_num_threads`), the same
batch and size. Warm-up (compilation) is excluded; the frameworks alternate within each
repetition so a busy neighbour slows both; the median is reported with the load average.
Our forward is one `jax.jit` per input shape with the tapped layers static; transformers runs
its default attention ("sdpa") with all hidden states. A ratio > 1 means ours is faster.
Set XLA_FLAGS in the environment to compare XLA CPU options.

The "MLP GEMM" column times one float32 matmul of the model's MLP shape ([tokens, width] x
[width, mlp]) in both frameworks (best of 10, alternating): the ceiling of each forward.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

DEFAULT_MODELS = ("clip_b16_224", "clip_l14_518", "dino_l16_592")
SMOKE_MODELS = ("clip_tiny", "dino_tiny")


def parse(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", nargs="+", default=None, choices=sorted(common.SPECS),
                 help=f"default: {' '.join(DEFAULT_MODELS)}")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--reps", type=int, default=3, help="timed repetitions per framework (median reported)")
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--threads", type=int, default=None, help="CPUs for both frameworks (default: all)")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                 help="compute dtype of both: ours computes in it with float32 parameters; torch's "
                      "model and input are cast to it")
  p.add_argument("--smoke", action="store_true", help="tiny models, one repetition (a test of the script)")
  args = p.parse_args(argv)
  if args.smoke:
    args.models = args.models or list(SMOKE_MODELS)
    args.reps, args.warmup = min(args.reps, 1), 1
  args.models = args.models or list(DEFAULT_MODELS)
  return args


def run(args: argparse.Namespace) -> list[dict]:
  """Times each model pair; prints and returns one row dict per model."""
  threads = common.pin_threads(args.threads)
  common.torch_threads(threads)
  import jax.numpy as jnp
  import numpy as np
  import torch

  print(f"# backbone forward, batch {args.batch}, {args.reps} reps (median), both in {args.dtype}")
  print(f"# {common.machine()}")
  print(f"# {common.load_avg()} (start)")
  rows = []
  for key in args.models:
    spec = common.SPECS[key]
    hf, state = common.torch_model(spec)
    ours = common.flax_model(spec, hf, state, dtype=getattr(jnp, args.dtype))
    del state
    x = np.random.default_rng(0).standard_normal((args.batch, spec.size, spec.size, 3)).astype(np.float32)
    x_jax, x_torch = jnp.asarray(x), torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    if args.dtype == "bfloat16":
      hf, x_torch = hf.to(torch.bfloat16), x_torch.to(torch.bfloat16)
    f_jax, f_torch = common.flax_forward(spec, ours), common.torch_forward(spec, hf)
    times = common.time_alternating({"torch": lambda: f_torch(x_torch), "jax": lambda: f_jax(x_jax)},
                                    reps=args.reps, warmup=args.warmup)
    t_torch, t_jax = common.median(times["torch"]), common.median(times["jax"])
    gflop = spec.flops() * args.batch / 1e9
    row = dict(model=spec.name, tokens=spec.tokens, gflop=gflop, torch_ips=args.batch / t_torch,
               jax_ips=args.batch / t_jax, ratio=t_torch / t_jax, torch_gflops=gflop / t_torch,
               jax_gflops=gflop / t_jax, load=os.getloadavg()[0], times=times)
    if args.dtype == "float32":
      g = common.gemm_rates(spec.tokens * args.batch, spec.width, spec.mlp)
      row.update(gemm_jax=g["jax"] / 1e9, gemm_torch=g["torch"] / 1e9)
    rows.append(row)
    print(f"# {spec.name}: torch {['%.3f' % t for t in times['torch']]} s, "
          f"jax {['%.3f' % t for t in times['jax']]} s, {common.load_avg()}", flush=True)
    del hf, ours, f_jax, f_torch
  common.print_table(
      ["model", "tokens", "GFLOP/batch", "PyTorch img/s", "ours img/s", "ours / PyTorch",
       "PyTorch GFLOP/s", "ours GFLOP/s", "MLP GEMM PyTorch / XLA GFLOP/s", "load (1 min)"],
      [[r["model"], r["tokens"], f"{r['gflop']:.1f}", f"{r['torch_ips']:.3f}", f"{r['jax_ips']:.3f}",
        f"{r['ratio']:.2f}x", f"{r['torch_gflops']:.0f}", f"{r['jax_gflops']:.0f}",
        f"{r['gemm_torch']:.0f} / {r['gemm_jax']:.0f}" if "gemm_jax" in r else "-", f"{r['load']:.2f}"]
       for r in rows])
  print(f"# {common.load_avg()} (end)")
  return rows


if __name__ == "__main__":
  run(parse())
