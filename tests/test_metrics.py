"""Metrics against scikit-learn and against plain, slow transcriptions of the references."""

import warnings

import numpy as np
import pytest
from skimage import measure
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score

from ssvp_jax import metrics


def _sklearn(labels, scores):
  precision, recall, _ = precision_recall_curve(labels, scores)
  with np.errstate(invalid="ignore", divide="ignore"):
    f1 = 2 * precision * recall / (precision + recall)
  return {"auroc": roc_auc_score(labels, scores), "ap": average_precision_score(labels, scores),
          "f1_max": np.max(f1[np.isfinite(f1)])}


def _random_set(seed, num=8, size=24, regions=4, decimals=2, pixel_noise=0.0):
  """Masks with several rectangles (some images normal), maps with many ties."""
  rng = np.random.default_rng(seed)
  masks = np.zeros((num, size, size), dtype=bool)
  for i in range(num):
    if i % 3 == 0:
      continue  # a normal image
    for _ in range(rng.integers(1, regions + 1)):
      y, x = rng.integers(0, size - 2, 2)
      hh, ww = rng.integers(1, 7, 2)
      masks[i, y:y + hh, x:x + ww] = True
    if pixel_noise:
      masks[i] |= rng.random((size, size)) < pixel_noise  # single pixels, diagonal contacts
  maps = rng.normal(size=masks.shape) + 1.2 * masks
  return masks, np.round(maps, decimals).astype(np.float32)


def _official_aupro_slow(masks, maps, limit=0.3):
  """The MVTec definition, one threshold and one region at a time."""
  regions = []
  for i, m in enumerate(masks):
    lab = measure.label(m, connectivity=2)  # 8-connectivity
    regions += [(i, lab == r) for r in range(1, lab.max() + 1)]
  normal = ~masks
  xs, ys = [0.0], [0.0]
  for t in sorted(set(maps.ravel().tolist()), reverse=True):
    above = maps >= t
    xs.append((above & normal).sum() / normal.sum())
    ys.append(np.mean([above[i][r].mean() for i, r in regions]))
  area = 0.0
  for k in range(1, len(xs)):
    x0, x1, y0, y1 = xs[k - 1], xs[k], ys[k - 1], ys[k]
    if x1 <= limit:
      area += (x1 - x0) * (y0 + y1) / 2
    else:
      if x0 < limit:
        y_at = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        area += (limit - x0) * (y0 + y_at) / 2
      break
  return area / limit


def _anomalyclip_pro_slow(masks, amaps, max_step=200, expect_fpr=0.3):
  """AnomalyCLIP's cal_pro_score, restated plainly (its loop and its arithmetic)."""
  masks = masks.astype(np.float32)
  min_th, max_th = amaps.min(), amaps.max()
  delta = (max_th - min_th) / max_step
  pros, fprs = [], []
  for th in np.arange(min_th, max_th, delta):
    binary = amaps > th
    pro = []
    for b, m in zip(binary, masks):
      for region in measure.regionprops(measure.label(m.astype(int))):
        pro.append(b[region.coords[:, 0], region.coords[:, 1]].sum() / region.area)
    inverse = 1 - masks
    fprs.append(np.logical_and(inverse, binary).sum() / inverse.sum())
    pros.append(np.mean(pro))
  fprs, pros = np.array(fprs), np.array(pros)
  keep = fprs < expect_fpr
  f = fprs[keep]
  f = (f - f.min()) / (f.max() - f.min())
  return auc(f, pros[keep])


@pytest.mark.parametrize("seed", range(4))
def test_image_metrics_match_sklearn_with_ties(seed):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 2, 300)
  scores = np.round(rng.normal(size=300) + 0.7 * labels, 1)  # heavy ties
  scores[:5] = [0.0, -0.0, 0.0, -0.0, 1e300]
  ours, ref = metrics.image_metrics(labels, scores), _sklearn(labels, scores)
  for k in ref:
    assert ours[k] == pytest.approx(ref[k], abs=1e-9), k


@pytest.mark.parametrize("seed", range(3))
def test_pixel_metrics_match_sklearn_with_ties(seed):
  masks, maps = _random_set(seed, decimals=1)
  maps[0, 0, :4] = [0.0, -0.0, -3.5, 1e30]  # both zeros must tie; negatives and extremes ordered
  ours, ref = metrics.pixel_metrics(masks, maps), _sklearn(masks.ravel(), maps.ravel())
  for k in ref:
    assert ours[k] == pytest.approx(ref[k], abs=1e-9), k
  assert 0.0 <= ours["aupro"] <= 1.0


def test_aupro_of_a_perfect_map_is_one():
  masks, _ = _random_set(0)
  rng = np.random.default_rng(0)
  maps = np.where(masks, 1.0 + rng.random(masks.shape), rng.random(masks.shape)).astype(np.float32)
  assert metrics.aupro(masks, maps) == pytest.approx(1.0, abs=1e-12)
  assert metrics.pixel_metrics(masks, maps)["auroc"] == pytest.approx(1.0, abs=1e-12)


def test_aupro_of_random_maps_is_about_015():
  masks, _ = _random_set(1, num=30, size=64, regions=5)
  maps = np.random.default_rng(1).random(masks.shape).astype(np.float32)
  assert metrics.aupro(masks, maps) == pytest.approx(0.15, abs=0.02)


@pytest.mark.parametrize("seed,limit,pixel_noise", [(0, 0.3, 0.0), (1, 0.3, 0.05), (2, 0.05, 0.0),
                                                    (3, 1.0, 0.05), (4, 0.3, 0.0)])
def test_aupro_equals_slow_official_transcription(seed, limit, pixel_noise):
  masks, maps = _random_set(seed, pixel_noise=pixel_noise)
  assert metrics.aupro(masks, maps, fpr_limit=limit) == pytest.approx(
      _official_aupro_slow(masks, maps, limit), abs=1e-6)


def test_official_aupro_is_invariant_to_monotone_rescaling_and_the_variant_is_not():
  masks, _ = _random_set(5, num=10, size=32)
  rng = np.random.default_rng(5)
  maps = np.round(np.clip(rng.normal(0.3, 0.1, masks.shape) + 0.2 * masks, 0, 1), 3).astype(np.float32)
  warped = np.exp(12.0 * maps).astype(np.float32)  # strictly increasing, no new ties
  assert np.unique(warped).size == np.unique(maps).size
  assert metrics.aupro(masks, warped) == pytest.approx(metrics.aupro(masks, maps), abs=1e-12)
  variant, variant_warped = metrics.aupro_200_thresholds(masks, maps), metrics.aupro_200_thresholds(masks, warped)
  # The warp spreads the top scores, so fewer of its 200 thresholds fall below FPR 0.3.
  assert abs(variant - variant_warped) > 0.05


@pytest.mark.parametrize("seed", range(3))
def test_variant_equals_anomalyclip_transcription(seed):
  masks, maps = _random_set(seed, decimals=3)
  ours = metrics.aupro_200_thresholds(masks, maps)
  assert ours == pytest.approx(_anomalyclip_pro_slow(masks, maps), abs=1e-9)
  assert metrics.pixel_metrics(masks, maps, include_variant=True)["aupro_200_thresholds"] == ours
  # On ordinary maps the variant lands near the official value.
  assert ours == pytest.approx(metrics.aupro(masks, maps), abs=0.03)


def test_variant_nan_case_one_outlier_pixel():
  masks, maps = _random_set(0, decimals=3)
  maps[0, 0, 0] = 1e4  # a normal pixel far above everything else
  with np.errstate(invalid="ignore"), warnings.catch_warnings():
    warnings.simplefilter("ignore")
    assert np.isnan(_anomalyclip_pro_slow(masks, maps))  # the reference's own NaN
  with pytest.warns(RuntimeWarning, match="divides by zero"):
    assert np.isnan(metrics.aupro_200_thresholds(masks, maps))
  assert 0.0 < metrics.aupro(masks, maps) <= 1.0  # the official value is unaffected in kind


def test_variant_constant_map_is_nan_with_warning():
  masks, _ = _random_set(0)
  with pytest.warns(RuntimeWarning, match="all scores are equal"):
    assert np.isnan(metrics.aupro_200_thresholds(masks, np.full(masks.shape, 0.5, np.float32)))


def test_single_label_gives_nan_and_a_warning():
  scores = np.linspace(0, 1, 10)
  for labels in (np.zeros(10, int), np.ones(10, int)):
    with pytest.warns(RuntimeWarning, match="only one label"):
      out = metrics.image_metrics(labels, scores)
    assert set(out) == {"auroc", "ap", "f1_max"} and all(np.isnan(v) for v in out.values())
  masks = np.zeros((3, 8, 8), bool)
  maps = np.random.default_rng(0).random(masks.shape)
  with pytest.warns(RuntimeWarning, match="no anomalous sample"):
    out = metrics.pixel_metrics(masks, maps, include_variant=True)
  assert set(out) == {"auroc", "ap", "f1_max", "aupro", "aupro_200_thresholds"}
  assert all(np.isnan(v) for v in out.values())
  with pytest.warns(RuntimeWarning, match="no normal sample"):
    assert np.isnan(metrics.aupro(~masks, maps))


def test_bad_inputs_say_what_is_wrong():
  masks, maps = _random_set(0)
  with pytest.raises(ValueError, match="differ in shape"):
    metrics.pixel_metrics(masks[:, :-1], maps)
  with pytest.raises(ValueError, match=r"\[N, H, W\]"):
    metrics.pixel_metrics(masks[0], maps[0])
  bad = maps.copy()
  bad[1, 2, 3] = np.nan
  with pytest.raises(ValueError, match="maps: contains NaN"):
    metrics.pixel_metrics(masks, bad)
  with pytest.raises(ValueError, match="masks: expected bool or 0/1 values, found 255"):
    metrics.pixel_metrics(masks.astype(np.uint8) * 255, maps)
  with pytest.raises(ValueError, match="fpr_limit"):
    metrics.aupro(masks, maps, fpr_limit=0.0)
  with pytest.raises(ValueError, match="equal length"):
    metrics.image_metrics([0, 1, 1], [0.1, 0.2])


def test_timings_are_reported_per_stage():
  masks, maps = _random_set(0)
  timings = {}
  metrics.pixel_metrics(masks, maps, include_variant=True, timings=timings)
  assert set(timings) == {"label", "sort", "runs", "auroc_ap_f1", "aupro", "aupro_200_thresholds"}
  assert all(v >= 0 for v in timings.values())
