"""Image- and pixel-level anomaly-detection metrics: exact, sort-based, fast.

Definitions (see DATA.md, "Metrics"):
  * AUROC, AP and F1-max equal scikit-learn's `roc_auc_score`,
    `average_precision_score` and the maximum of 2PR/(P+R) along
    `precision_recall_curve` (non-finite points dropped), ties included.
  * AUPRO is the official MVTec definition (`aupro`): connected components of
    each mask with 8-connectivity, one sorted sweep over all pixels, the last
    point of each run of tied scores, (0, 0) prepended, trapezoid area up to
    FPR = `fpr_limit` with the point at the limit interpolated, divided by the
    limit.
  * `aupro_200_thresholds` is the lineage's variant (AnomalyCLIP's
    `cal_pro_score`), offered by name for comparison only.

Speed: a category of 500 maps of 518x518 (134M pixels) takes seconds. All
pixel metrics share ONE sort: each pixel becomes a uint64 key, its score's
order-preserving bit pattern in the high word and its ground-truth region id
(0 = normal pixel) in the low word, sorted in place by NumPy's vectorised sort
(several times faster than `np.argsort` on the float32 scores, a stable argsort
or `jax.lax.sort` on CPU; measured, docs/data.md "Metrics"). The curves are
then read off the runs of tied scores that hold anomalous pixels (a few
percent of all pixels): counts come from positions in the sort, and the
stretches in between, where only normal pixels pass, are integrated in closed
form, so no array as long as the number of distinct scores is ever built.
Time and memory against scikit-learn: `bench/bench_metrics.py` (docs/data.md).

Pixel scores are compared as float32 (what the models produce); image scores
as float64. A NaN score is an error. A set with a single label (no anomalous or
no normal sample) gets NaN and a warning, never 0.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
import warnings
from typing import Any, Callable

import numpy as np
from scipy import ndimage

_SIGN_BIT = np.uint32(0x80000000)
_LOW_BITS = np.uint32(0x7FFFFFFF)


# --------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------

def _binary_array(x: Any, name: str) -> np.ndarray:
  """bool array from bool or 0/1 input; anything else is an error."""
  x = np.asarray(x)
  if x.dtype == bool:
    return x
  if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
    raise ValueError(f"{name}: expected bool or 0/1 values, got dtype {x.dtype}")
  bad = (x != 0) & (x != 1)
  if bad.any():
    raise ValueError(f"{name}: expected bool or 0/1 values, found {x[bad].ravel()[0].item()!r} "
                     "(binarise first, e.g. mask > 0.5 after resizing)")
  return x != 0


def _score_array(x: Any, name: str, dtype: type) -> np.ndarray:
  x = np.asarray(x)
  if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
    raise ValueError(f"{name}: expected real scores, got dtype {x.dtype}")
  x = np.asarray(x, dtype=dtype)
  if np.isnan(x).any():
    raise ValueError(f"{name}: contains NaN scores ({int(np.isnan(x).sum())} of {x.size})")
  return x


def _check_pixel_inputs(masks: Any, maps: Any) -> tuple[np.ndarray, np.ndarray]:
  """-> (masks bool [N, H, W], maps float32 [N, H, W])."""
  maps = _score_array(maps, "maps", np.float32)
  masks = _binary_array(masks, "masks")
  if maps.ndim != 3 or masks.ndim != 3:
    raise ValueError(f"masks and maps must be [N, H, W]; got masks {masks.shape}, maps {maps.shape}")
  if masks.shape != maps.shape:
    raise ValueError(f"masks {masks.shape} and maps {maps.shape} differ in shape")
  if maps.size == 0:
    raise ValueError("masks and maps are empty")
  return masks, maps


def _check_limit(fpr_limit: float) -> float:
  if not 0.0 < fpr_limit <= 1.0:
    raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
  return float(fpr_limit)


def _single_label_warning(where: str, num_pos: int, num_neg: int) -> bool:
  """Warns and returns True when only one label is present."""
  if num_pos > 0 and num_neg > 0:
    return False
  what = "no anomalous" if num_pos == 0 else "no normal"
  warnings.warn(f"{where}: {what} sample (only one label among {num_pos + num_neg}); "
                "the metrics are undefined and reported as NaN", RuntimeWarning, stacklevel=3)
  return True


# --------------------------------------------------------------------------
# Sorting and curves
# --------------------------------------------------------------------------

def _descending_keys(scores: np.ndarray) -> np.ndarray:
  """float32 [...] -> uint32 [...] whose ascending order is the scores' descending order.

  Positive floats keep their bit order, negative ones reverse it; the map
  below folds both into one unsigned order, reversed. -0.0 + 0.0 is +0.0, so
  the two zeros tie, as they do for scikit-learn.
  """
  bits = np.add(scores, np.float32(0.0), dtype=np.float32).view(np.uint32)  # a copy
  np.subtract(_LOW_BITS, bits, out=bits, where=bits < _SIGN_BIT)
  return bits


def _run_ends(sorted_keys: np.ndarray) -> np.ndarray:
  """Index of the last element of each run of equal keys: int64 [B]."""
  last = np.empty(sorted_keys.shape[0], dtype=bool)
  np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=last[:-1])
  last[-1] = True
  return np.flatnonzero(last)


Bounds = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclasses.dataclass
class _Runs:
  """The G runs of tied scores that hold anomalous samples, in descending score order.

  Every curve point that matters is here: between two such runs only normal
  samples are passed, so the anomalous count (hence TPR) and PRO stay
  constant while the FPR grows (a flat stretch, which the metrics below integrate in
  closed form). This keeps the per-run arrays at most as long as the number
  of anomalous pixels, a few percent of all pixels.
  """
  tps: np.ndarray      # [G] int64 anomalous samples with score >= the run's score
  fps: np.ndarray      # [G] int64 normal samples with score >= the run's score
  run_neg: np.ndarray  # [G] int64 normal samples inside the run (tied with its anomalous ones)
  num_pos: int
  num_neg: int


def _positive_runs(pos_keys: np.ndarray, bounds: Bounds, num_neg: int) -> _Runs:
  """Runs from the sort keys of the anomalous samples, in sort order.

  pos_keys: [P] sort key of each anomalous sample, ascending.
  bounds: keys [G] -> (first, last) index of each key's run in the full sort.
  """
  last = _run_ends(pos_keys)              # [G] index among the anomalous samples
  tps = last + 1
  first, end = bounds(pos_keys[last])     # [G], [G]
  fps = end + 1 - tps
  run_neg = (end - first + 1) - np.diff(tps, prepend=0)
  return _Runs(tps=tps, fps=fps, run_neg=run_neg, num_pos=int(pos_keys.shape[0]), num_neg=num_neg)


@dataclasses.dataclass
class _PixelSweep:
  """All pixels sorted once, by descending score."""
  packed: np.ndarray     # [n] uint64 sorted (descending-score key << 32 | region id, 0 = normal)
  pos_index: np.ndarray  # [P] int64 sort position of each anomalous pixel
  overlap: np.ndarray    # [P + 1] float64 sum of 1 / |region| over the first i anomalous pixels
  num_regions: int
  runs: _Runs


def _pixel_sweep(masks: np.ndarray, maps: np.ndarray,
                 timings: dict[str, float] | None = None) -> _PixelSweep:
  """The one sort every pixel metric shares (both labels present)."""
  t0 = time.perf_counter()
  num, h, w = maps.shape
  packed = _descending_keys(maps).reshape(-1).astype(np.uint64)  # [n] score key in the high word
  packed <<= np.uint64(32)
  sort_time = time.perf_counter() - t0

  t0 = time.perf_counter()
  # Region ids, unique over the set, in the low words: 8-connected components
  # per image (the official structure), only for images that have any.
  per_image = packed.reshape(num, h * w)  # [N, HW] view
  eight = np.ones((3, 3), dtype=bool)
  sizes, offset = [np.ones(1, dtype=np.int64)], 0  # sizes[0]: placeholder for "normal"
  for i in np.flatnonzero(masks.reshape(num, -1).any(axis=1)):
    ids, k = ndimage.label(masks[i], structure=eight)  # [H, W] int32, 0 = normal
    sizes.append(np.bincount(ids.ravel(), minlength=k + 1)[1:])
    ids[ids > 0] += offset
    np.bitwise_or(per_image[i], ids.ravel().astype(np.uint64), out=per_image[i])
    offset += k
  region_sizes = np.concatenate(sizes)  # [R + 1]
  if timings is not None:
    timings["label"] = time.perf_counter() - t0

  t0 = time.perf_counter()
  packed.sort()
  if timings is not None:
    timings["sort"] = sort_time + time.perf_counter() - t0

  t0 = time.perf_counter()
  flat = packed.view(np.uint32).reshape(-1, 2)  # [n, 2] (score key, region id) words
  hi, lo = (1, 0) if sys.byteorder == "little" else (0, 1)
  pos_index = np.flatnonzero(flat[:, lo] != 0)  # [P]
  region_ids = flat[pos_index, lo]              # [P]
  overlap = np.concatenate(([0.0], np.cumsum(1.0 / region_sizes[region_ids])))  # [P + 1]

  def bounds(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # Search the packed array itself (contiguous): a run spans key << 32 .. key << 32 | 0xFFFFFFFF.
    k = keys.astype(np.uint64) << np.uint64(32)
    return (np.searchsorted(packed, k, side="left"),
            np.searchsorted(packed, k | np.uint64(0xFFFFFFFF), side="right") - 1)

  runs = _positive_runs(flat[pos_index, hi], bounds, num_neg=packed.size - pos_index.size)
  if timings is not None:
    timings["runs"] = time.perf_counter() - t0
  return _PixelSweep(packed=packed, pos_index=pos_index, overlap=overlap,
                     num_regions=offset, runs=runs)


def _binary_from_runs(runs: _Runs) -> dict[str, float]:
  """AUROC, AP and F1-max (both classes present)."""
  num_pos, num_neg = runs.num_pos, runs.num_neg
  tps, fps = runs.tps, runs.fps
  dtp = np.diff(tps, prepend=0)  # [G] anomalous samples in each run
  # AUROC as Mann-Whitney U (identical to the trapezoid under the ROC curve):
  # each anomalous sample beats the normal ones scored below it and half of
  # those tied with it; exact in integers.
  auroc = float(np.dot(dtp, 2 * (num_neg - fps) + runs.run_neg)) / (2.0 * num_pos * num_neg)
  # AP = sum over thresholds of (recall step) * precision; only runs that add
  # anomalous samples have a recall step.
  ap = float(np.dot(dtp, tps / (tps + fps))) / num_pos
  # F1 = 2PR / (P + R) = 2 tp / (tp + fp + num_pos); between two of these runs
  # it only falls (fp grows, tp does not), so its maximum is at one of them.
  f1_max = float(np.max(2.0 * tps / (tps + fps + num_pos)))
  return {"auroc": auroc, "ap": ap, "f1_max": f1_max}


# --------------------------------------------------------------------------
# AUPRO
# --------------------------------------------------------------------------

def _trapezoid_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
  """Area under (x, y), x non-decreasing, up to x_max; the point at x_max interpolated.

  The official MVTec rule: if x_max is not one of the x, the segment that
  crosses it is cut at x_max by linear interpolation.
  """
  m = int(np.count_nonzero(x <= x_max))  # a prefix, since x is sorted
  area = float(np.sum(0.5 * (y[1:m] + y[:m - 1]) * np.diff(x[:m])))
  if x[m - 1] != x_max:
    x0, x1, y0, y1 = x[m - 1], x[m], y[m - 1], y[m]
    y_at = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
    area += float(0.5 * (y_at + y0) * (x_max - x0))
  return area


def _aupro_from_sweep(sweep: _PixelSweep, fpr_limit: float) -> float:
  """Official AUPRO from the positive runs.

  The official curve has one point per run of tied scores. Between two runs
  that hold anomalous pixels it is flat (PRO constant, FPR growing), so two
  points per such run describe it exactly: the point just before the run
  (the end of the previous run) and the point at its end.
  """
  runs = sweep.runs
  after = runs.fps / runs.num_neg                   # [G] FPR at the run's end
  before = (runs.fps - runs.run_neg) / runs.num_neg  # [G] FPR just before the run
  pro = sweep.overlap[runs.tps] / sweep.num_regions  # [G]
  pro_before = np.concatenate(([0.0], pro[:-1]))
  # (0, 0) first, as the official code; its last two points are (1, PRO of all
  # pixels) and (1, 1).
  fpr = np.concatenate(([0.0], np.stack([before, after], axis=1).ravel(), [1.0, 1.0]))
  pro = np.concatenate(([0.0], np.stack([pro_before, pro], axis=1).ravel(), [pro[-1], 1.0]))
  # Cumulative sums can overshoot 1 by rounding; the official code clips too.
  np.minimum(fpr, 1.0, out=fpr)
  np.minimum(pro, 1.0, out=pro)
  return float(_trapezoid_to(fpr, pro, fpr_limit) / fpr_limit)


def _first_float32_above(th: np.ndarray) -> np.ndarray:
  """Smallest float32 strictly greater than each float64 threshold: float32 [T].

  A float32 score s satisfies s > th (compared in float64, as NumPy 2 does
  for a float32 array against a float64 scalar) exactly when s >= this value.
  """
  c = th.astype(np.float32)
  return np.where(c.astype(np.float64) > th, c, np.nextafter(c, np.float32(np.inf)))


def _aupro_200_from_sweep(sweep: _PixelSweep, score_min: np.float32, score_max: np.float32,
                          fpr_limit: float, max_step: int) -> float:
  """AnomalyCLIP's `cal_pro_score`, evaluated on the shared sort.

  Thresholds th = arange(min, max, (max - min) / max_step); a pixel is
  positive when its score > th; PRO(th) = mean over regions of the fraction of
  the region above th; FPR(th) = normal pixels above th / normal pixels; the
  points with FPR < limit are kept, their FPRs min-max rescaled to [0, 1], and
  the area under (rescaled FPR, PRO) taken. Degenerate cases, where the
  reference raises or silently returns NaN, return NaN with a warning.
  """
  delta = (score_max - score_min) / np.float32(max_step)  # float32, as in the reference
  if not delta > 0:
    warnings.warn("aupro_200_thresholds: all scores are equal, so there is no threshold "
                  "(AnomalyCLIP's code raises here); returning NaN", RuntimeWarning, stacklevel=3)
    return math.nan
  th = np.arange(score_min, score_max, delta)  # [T], float64 under NumPy 2's promotion
  # Pixels with score > th are those with score >= c, the first float32 above th:
  # in the packed sort, everything up to the end of c's key.
  c = _descending_keys(_first_float32_above(th)).astype(np.uint64) << np.uint64(32)
  above = np.searchsorted(sweep.packed, c | np.uint64(0xFFFFFFFF), side="right")  # [T]
  tp = np.searchsorted(sweep.pos_index, above, side="left")  # [T] anomalous among them
  fpr = (above - tp) / sweep.runs.num_neg
  pro = sweep.overlap[tp] / sweep.num_regions
  keep = fpr < fpr_limit
  if not keep.any():
    warnings.warn(f"aupro_200_thresholds: no threshold has FPR < {fpr_limit} (AnomalyCLIP's "
                  "code raises here); returning NaN", RuntimeWarning, stacklevel=3)
    return math.nan
  fpr, pro = fpr[keep], pro[keep]
  span = fpr.max() - fpr.min()
  if span == 0:
    # Typically one outlier pixel stretches the score range so that every
    # threshold below FPR = limit has the same FPR; the reference divides 0/0.
    warnings.warn(f"aupro_200_thresholds: the {keep.sum()} thresholds with FPR < {fpr_limit} all "
                  f"share FPR = {fpr[0]:.6g}, so the FPR rescaling divides by zero (AnomalyCLIP's "
                  "code returns NaN); returning NaN", RuntimeWarning, stacklevel=3)
    return math.nan
  x = (fpr - fpr.min()) / span  # non-increasing, as thresholds increase
  # sklearn.metrics.auc on a non-increasing x integrates with the sign flipped.
  return float(np.sum(0.5 * (pro[1:] + pro[:-1]) * -np.diff(x)))


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------

def image_metrics(labels: Any, scores: Any) -> dict[str, float]:
  """Image-level AUROC, AP and F1-max from one score per image.

  Args:
    labels: [N] bool or 0/1, 1 = anomalous.
    scores: [N] real anomaly scores (higher = more anomalous), compared in float64.

  Returns:
    {"auroc", "ap", "f1_max"} as floats in [0, 1]; all NaN (with a warning)
    when only one label is present (with no normal image AP and F1-max would
    be 1 whatever the scores, so they are NaN too).
  """
  labels = _binary_array(labels, "labels")
  scores = _score_array(scores, "scores", np.float64)
  if labels.ndim != 1 or scores.shape != labels.shape:
    raise ValueError(f"labels and scores must be [N] of equal length; got {labels.shape}, {scores.shape}")
  num_pos = int(labels.sum())
  if _single_label_warning("image_metrics", num_pos, labels.size - num_pos):
    return {"auroc": math.nan, "ap": math.nan, "f1_max": math.nan}
  order = np.argsort(-scores, kind="stable")  # [N] descending scores
  keys = -scores[order]                        # [N] ascending sort keys

  def bounds(k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.searchsorted(keys, k, side="left"), np.searchsorted(keys, k, side="right") - 1

  pos_index = np.flatnonzero(labels[order])
  return _binary_from_runs(_positive_runs(keys[pos_index], bounds, labels.size - num_pos))


def pixel_metrics(masks: Any, maps: Any, fpr_limit: float = 0.3, include_variant: bool = False,
                  timings: dict[str, float] | None = None) -> dict[str, float]:
  """Pixel-level AUROC, AP, F1-max and AUPRO over all pixels of a set of maps.

  Args:
    masks: [N, H, W] bool or 0/1 ground truth (normal images: all zero).
    maps: [N, H, W] anomaly maps; compared as float32.
    fpr_limit: AUPRO's integration limit.
    include_variant: also return "aupro_200_thresholds" (AnomalyCLIP's
      variant, see `aupro_200_thresholds`), computed from the same sort.
    timings: if given, filled with seconds per stage ("label", "sort",
      "runs", "auroc_ap_f1", "aupro" and, with the variant,
      "aupro_200_thresholds").

  Returns:
    {"auroc", "ap", "f1_max", "aupro"} as floats in [0, 1]; NaN (with a
    warning) when there is no anomalous or no normal pixel.
  """
  fpr_limit = _check_limit(fpr_limit)
  masks, maps = _check_pixel_inputs(masks, maps)
  keys = ["auroc", "ap", "f1_max", "aupro"] + (["aupro_200_thresholds"] if include_variant else [])
  num_pos = int(np.count_nonzero(masks))
  if _single_label_warning("pixel_metrics", num_pos, masks.size - num_pos):
    return {k: math.nan for k in keys}
  sweep = _pixel_sweep(masks, maps, timings)
  t0 = time.perf_counter()
  out = _binary_from_runs(sweep.runs)
  t1 = time.perf_counter()
  out["aupro"] = _aupro_from_sweep(sweep, fpr_limit)
  t2 = time.perf_counter()
  if include_variant:
    out["aupro_200_thresholds"] = _aupro_200_from_sweep(sweep, maps.min(), maps.max(), fpr_limit, 200)
  if timings is not None:
    timings.update(auroc_ap_f1=t1 - t0, aupro=t2 - t1)
    if include_variant:
      timings["aupro_200_thresholds"] = time.perf_counter() - t2
  return out


def aupro(masks: Any, maps: Any, fpr_limit: float = 0.3) -> float:
  """Official (MVTec) area under the PRO curve up to FPR = fpr_limit, normalised to [0, 1].

  Exact: every distinct score is a threshold. Invariant to any strictly
  increasing rescaling of the scores. NaN with a warning when there is no
  anomalous or no normal pixel.
  """
  fpr_limit = _check_limit(fpr_limit)
  masks, maps = _check_pixel_inputs(masks, maps)
  num_pos = int(np.count_nonzero(masks))
  if _single_label_warning("aupro", num_pos, masks.size - num_pos):
    return math.nan
  return _aupro_from_sweep(_pixel_sweep(masks, maps), fpr_limit)


def aupro_200_thresholds(masks: Any, maps: Any, fpr_limit: float = 0.3, max_step: int = 200) -> float:
  """The lineage's AUPRO variant (AnomalyCLIP's `cal_pro_score`), for comparison.

  `max_step` thresholds evenly spaced from the smallest score up to (not
  including) the largest; the points with FPR < fpr_limit are kept and their
  FPRs rescaled to [0, 1] before taking the area. Unlike `aupro` it changes
  under a monotone rescaling of the scores. Where AnomalyCLIP's code raises
  (all scores equal; no threshold below the limit) or returns NaN (all kept
  thresholds share one FPR, e.g. when one outlier pixel stretches the range),
  this returns NaN with a warning. Also NaN with a warning for a single-label
  set.
  """
  fpr_limit = _check_limit(fpr_limit)
  masks, maps = _check_pixel_inputs(masks, maps)
  num_pos = int(np.count_nonzero(masks))
  if _single_label_warning("aupro_200_thresholds", num_pos, masks.size - num_pos):
    return math.nan
  sweep = _pixel_sweep(masks, maps)
  return _aupro_200_from_sweep(sweep, maps.min(), maps.max(), fpr_limit, max_step)
