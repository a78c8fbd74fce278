"""Benchmark of the pixel metrics on a full-size synthetic category.

    .venv/bin/python bench/bench_metrics.py                      # 500 maps of 518x518
    .venv/bin/python bench/bench_metrics.py --num_maps 50 --sklearn_maps 20   # quick

Builds a category like a real one (about half the images anomalous, one to
three elliptical defects each covering 0.2%-15% of the image, smooth float32
maps from an upsampled patch grid plus a partial response on the defects),
times `ssvp_jax.metrics.pixel_metrics` stage by stage, reports its peak extra
memory, and compares AUROC/AP with scikit-learn on the first `--sklearn_maps`
maps (few: scikit-learn is slow at this size, docs/data.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import tracemalloc

import numpy as np
from scipy import ndimage

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ssvp_jax import metrics  # noqa: E402


def synthetic_category(num_maps: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """-> (masks bool [N, S, S], maps float32 [N, S, S])."""
  rng = np.random.default_rng(seed)
  masks = np.zeros((num_maps, size, size), dtype=bool)
  maps = np.empty((num_maps, size, size), dtype=np.float32)
  grid = max(2, size // 14)  # a ViT-L/14 patch grid, upsampled like a model's map
  yy, xx = np.mgrid[:size, :size]
  for i in range(num_maps):
    if rng.random() < 0.5:
      for _ in range(rng.integers(1, 4)):
        cy, cx = rng.uniform(0, size, 2)
        ay, ax = rng.uniform(0.02, 0.2, 2) * size
        theta = rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u = (dx * np.cos(theta) + dy * np.sin(theta)) / ax
        v = (-dx * np.sin(theta) + dy * np.cos(theta)) / ay
        masks[i] |= u * u + v * v <= 1.0
    patch = rng.normal(0.0, 1.0, (grid, grid))
    field = ndimage.zoom(patch, size / grid, order=1)[:size, :size]
    field = ndimage.gaussian_filter(field, 4.0)
    strength = rng.uniform(0.0, 3.0)
    response = ndimage.gaussian_filter(masks[i].astype(np.float32), 6.0) * strength
    maps[i] = 1.0 / (1.0 + np.exp(-(field + response - 1.0)))
  return masks, maps


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--num_maps", type=int, default=500)
  parser.add_argument("--size", type=int, default=518)
  parser.add_argument("--sklearn_maps", type=int, default=100,
                      help="maps to compare with scikit-learn (0 skips it)")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()

  t0 = time.perf_counter()
  masks, maps = synthetic_category(args.num_maps, args.size, args.seed)
  anomalous = masks.reshape(len(masks), -1).any(1)
  print(f"data: {args.num_maps} maps of {args.size}x{args.size} = {maps.size / 1e6:.1f}M pixels, "
        f"{anomalous.sum()} anomalous images, {masks.mean() * 100:.2f}% anomalous pixels, "
        f"{np.unique(maps).size / 1e6:.1f}M distinct scores (built in {time.perf_counter() - t0:.1f} s)")

  timings: dict[str, float] = {}
  tracemalloc.start()
  t0 = time.perf_counter()
  result = metrics.pixel_metrics(masks, maps, include_variant=True, timings=timings)
  total = time.perf_counter() - t0
  _, peak = tracemalloc.get_traced_memory()
  tracemalloc.stop()

  print("\n| stage | seconds |\n|---|---|")
  for name in ("label", "sort", "runs", "auroc_ap_f1", "aupro", "aupro_200_thresholds"):
    print(f"| {name} | {timings[name]:.2f} |")
  print(f"| pixel_metrics total (incl. checks) | {total:.2f} |")
  print(f"\npeak memory allocated during pixel_metrics: {peak / 2**30:.2f} GiB "
        f"(inputs: {(masks.nbytes + maps.nbytes) / 2**30:.2f} GiB)")
  print("values: " + ", ".join(f"{k} {v:.6f}" for k, v in result.items()))

  k = min(args.sklearn_maps, args.num_maps)
  if k > 0:
    from sklearn.metrics import average_precision_score, roc_auc_score
    sub_masks, sub_maps = masks[:k], maps[:k]
    t0 = time.perf_counter()
    ours = metrics.pixel_metrics(sub_masks, sub_maps)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    sk_auroc = roc_auc_score(sub_masks.ravel(), sub_maps.ravel())
    sk_ap = average_precision_score(sub_masks.ravel(), sub_maps.ravel())
    t_sk = time.perf_counter() - t0
    print(f"\nfirst {k} maps ({sub_maps.size / 1e6:.1f}M pixels):")
    print("| | seconds | AUROC | AP |\n|---|---|---|---|")
    print(f"| scikit-learn roc_auc_score + average_precision_score | {t_sk:.2f} | {sk_auroc:.8f} | {sk_ap:.8f} |")
    print(f"| ssvp_jax pixel_metrics (all four metrics) | {t_ours:.2f} | {ours['auroc']:.8f} | {ours['ap']:.8f} |")
    print(f"abs differences: AUROC {abs(ours['auroc'] - sk_auroc):.2e}, AP {abs(ours['ap'] - sk_ap):.2e}")


if __name__ == "__main__":
  main()
