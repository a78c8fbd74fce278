"""The reference bank's scoring cost per image (ssvp_jax/reference.py) next to one image's inference.

    .venv/bin/python bench/bench_reference.py                  # full size: 37x37 tokens, 8 taps of 1024
    .venv/bin/python bench/bench_reference.py --small          # the demo config's shapes
    .venv/bin/python bench/bench_reference.py --smoke          # the tiny config (a test of the script)

For k = 1, 4, 16 references, times `reference.bank_outputs` for one query image (exact nearest
neighbour over every bank row at every tap, chunked matmul, then the map's upsampling and smoothing)
on random unit vectors of the configured shapes (speed does not depend on the values), and divides by
the time of one image through `evaluate.eval_step` (both backbones + heads, bench_inference.py)
measured in the same run. `--coreset=0.25` adds rows for banks cut to that fraction of their rows (the
coreset selection itself runs once, when the bank is built, and is not timed).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench_inference  # noqa: E402
import common  # noqa: E402


def parse(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  bench_inference.add_args(p, batch=1, reps=3, dtype="float32", peak_n=1024)
  p.add_argument("--shots", default="1,4,16", help="comma-separated k")
  p.add_argument("--coreset", type=float, default=0.0, help="also time banks cut to this fraction of rows")
  p.add_argument("--threads", type=int, default=None, help="CPUs to use (default: all)")
  args = p.parse_args(argv)
  if args.smoke:
    args.reps, args.peak_n = 1, 128
  return args


def bank_seconds(n: int, dims: list[int], k: int, size: int, sigma: float, spec, reps: int,
                 coreset: float = 0.0) -> tuple[float, int]:
  """(median seconds of one query image against a k-image bank, bank rows)."""
  import jax
  import jax.numpy as jnp

  from ssvp_jax import reference
  keys = jax.random.split(jax.random.key(0), 2 * len(dims))
  rows = max(1, round(coreset * k * n)) if 0 < coreset < 1 else k * n
  layers = tuple(reference.normalize(jax.random.normal(kk, (rows, d))) for kk, d in zip(keys, dims))
  bank = reference.Bank(layers, jnp.arange(rows, dtype=jnp.int32), jnp.float32(0.3))
  query = tuple(reference.normalize(jax.random.normal(kk, (1, n, d))) for kk, d in zip(keys[len(dims):], dims))
  run = jax.jit(lambda b, q: reference.bank_outputs(b, q, spec, size, sigma))
  jax.block_until_ready(run(bank, query))  # compile
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(run(bank, query))
    times.append(time.perf_counter() - t0)
  return common.median(times), rows


def main(argv=None) -> list[dict]:
  args = parse(argv)
  common.pin_threads(args.threads)
  print(f"# reference bank scoring vs one image's inference, {common.machine()}")
  print(f"# {common.load_avg()} (start)")
  from ssvp_jax import reference
  config = bench_inference.get_config(args)
  inf = bench_inference.measure(args)  # builds the model: its shapes give the bank's
  model, _ = bench_inference.build(config)
  spec = reference.spec(config)
  size = config.backbones.semantic.image_size
  n = (size // model.semantic.patch_size) ** 2
  dims = []
  for role in spec.backbones:
    width = getattr(model, role).local_dim
    dims += [width] * len(spec.taps or config.backbones[role].layers)
  rows_out = []
  for coreset in sorted({0.0, args.coreset}):
    for k in (int(x) for x in args.shots.split(",")):
      sec, rows = bank_seconds(n, dims, k, size, float(config.eval.sigma), spec, args.reps,
                               coreset)
      gflop = 2 * n * rows * sum(dims) / 1e9
      rows_out.append(dict(k=k, coreset=coreset, rows=rows, gflop=gflop, seconds=sec, share=sec / inf["step_s"]))
  header = ["k", "coreset", "bank rows", "taps", "GFLOP/img (NN matmuls)", "bank s/img", "inference s/img",
            "bank / inference"]
  common.print_table(header, [[r["k"], f"{r['coreset']:g}" if r["coreset"] else "exact", r["rows"], len(dims),
                               f"{r['gflop']:.1f}", f"{r['seconds']:.3f}", f"{inf['step_s']:.3f}",
                               f"{100 * r['share']:.1f}%"] for r in rows_out])
  print(f"# config {inf['config']}, {n} tokens; {common.load_avg()} (end)")
  return rows_out


if __name__ == "__main__":
  main()
