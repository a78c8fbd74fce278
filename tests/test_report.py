"""Result reports round-trip; overlays use a fixed colour scale."""

import csv
import json
import math

import numpy as np
import pytest
from PIL import Image

from ssvp_jax import report


def _results():
  return {
      "mvtec": {
          "bottle": {"image_auroc": 0.93254, "image_ap": 0.96, "image_f1_max": 0.9, "pixel_auroc": 0.92,
                     "pixel_ap": 0.5, "pixel_f1_max": 0.55, "pixel_aupro": 0.89},
          "cable": {"image_auroc": 0.81, "image_ap": 0.86, "image_f1_max": 0.8, "pixel_auroc": 0.9,
                    "pixel_ap": 0.3, "pixel_f1_max": 0.35, "pixel_aupro": float("nan"),
                    "pixel_aupro_200_thresholds": 0.7},
          "screw": {"image_auroc": 0.5, "image_ap": 0.6, "image_f1_max": 0.7, "pixel_auroc": 0.95,
                    "pixel_ap": 0.1, "pixel_f1_max": 0.2, "pixel_aupro": 0.8},
      },
      "ksdd2": {"ksdd2": {"image_auroc": 0.969, "image_ap": 0.975, "image_f1_max": 0.918}},  # no pixel metrics
  }


def test_json_csv_md_round_trip(tmp_path):
  paths = report.write_reports(_results(), str(tmp_path))
  back = report.read_results_json(paths["json"])
  for dataset, cats in _results().items():
    for cat, values in cats.items():
      for k, v in values.items():
        assert (math.isnan(v) and math.isnan(back[dataset][cat][k])) or back[dataset][cat][k] == v
  # NaN and missing metrics are JSON null, never NaN literals or 0.
  raw = json.loads(open(paths["json"]).read())
  assert raw["mvtec"]["cable"]["pixel_aupro"] is None and raw["ksdd2"]["ksdd2"]["pixel_auroc"] is None
  assert "NaN" not in open(paths["json"]).read()

  # Means: unweighted over categories, NaN-aware, with their counts.
  mean = back["mvtec"]["mean"]
  assert mean["image_auroc"] == pytest.approx((0.93254 + 0.81 + 0.5) / 3)
  assert mean["pixel_aupro"] == pytest.approx((0.89 + 0.8) / 2)
  assert mean["num_categories"]["pixel_aupro"] == 2 and mean["num_categories"]["image_auroc"] == 3
  assert math.isnan(back["ksdd2"]["mean"]["pixel_auroc"])
  assert back["ksdd2"]["mean"]["num_categories"]["pixel_auroc"] == 0

  rows = list(csv.DictReader(open(paths["csv"])))
  assert [(r["dataset"], r["category"]) for r in rows] == [
      ("mvtec", "bottle"), ("mvtec", "cable"), ("mvtec", "screw"), ("ksdd2", "ksdd2")]
  assert float(rows[0]["image_auroc"]) == 0.93254 and rows[1]["pixel_aupro"] == ""
  assert float(rows[1]["pixel_aupro_200_thresholds"]) == 0.7 and rows[3]["pixel_ap"] == ""

  md = open(paths["md"]).read()
  # Paper layout, percent with one decimal; mvtec's PRO mean averages 2 of its 3 categories.
  assert "| mvtec | 74.8/80.0/80.7 | 92.3/84.5/30.0 | 3 (PRO: 2) |" in md
  assert "| ksdd2 | 96.9/91.8/97.5 | -/-/- | 1 |" in md
  assert "| bottle | 93.3 | 90.0 | 96.0 | 92.0 | 89.0 | 50.0 |" in md
  assert "| cable | 81.0 | 80.0 | 86.0 | 90.0 | - | 30.0 |" in md
  assert "| **mean** | 74.8 | 80.0 | 80.7 | 92.3 | 84.5 (n=2) | 30.0 |" in md


def test_means_are_unweighted_and_nan_aware():
  cats = {"a": {"image_auroc": 1.0}, "b": {"image_auroc": 0.5}, "c": {"image_auroc": float("nan")}, "d": {}}
  mean = report.dataset_mean(cats)
  assert mean["image_auroc"] == 0.75 and mean["num_categories"]["image_auroc"] == 2
  assert math.isnan(mean["pixel_ap"]) and mean["num_categories"]["pixel_ap"] == 0


def test_bad_results_are_named(tmp_path):
  bad = _results()
  bad["mvtec"]["bottle"]["image_auroc"] = 93.2
  with pytest.raises(ValueError, match=r"results\['mvtec'\]\['bottle'\]\['image_auroc'\] = 93.2 is not a fraction"):
    report.write_reports(bad, str(tmp_path))
  with pytest.raises(ValueError, match="reserved"):
    report.write_reports({"mvtec": {"mean": {}}}, str(tmp_path))
  with pytest.raises(FileNotFoundError, match="nope.json"):
    report.read_results_json(str(tmp_path / "nope.json"))


def test_category_entry_prefixes_metric_names():
  entry = report.category_entry({"auroc": 0.9, "ap": 0.8, "f1_max": 0.7}, {"auroc": 0.95, "aupro": 0.85})
  assert entry == {"image_auroc": 0.9, "image_ap": 0.8, "image_f1_max": 0.7,
                   "pixel_auroc": 0.95, "pixel_aupro": 0.85}


def _image(h=24, w=40):
  return np.random.default_rng(0).random((h, w, 3)).astype(np.float32)


def test_overlay_png_size(tmp_path):
  image = _image()
  amap = np.random.default_rng(1).random((24, 40)).astype(np.float32)
  report.save_overlay(str(tmp_path / "a" / "o.png"), image, amap)
  assert Image.open(tmp_path / "a" / "o.png").size == (40, 24)  # PIL: (width, height)
  report.save_overlay(str(tmp_path / "p.png"), image, amap, panel=True)
  assert Image.open(tmp_path / "p.png").size == (2 * 40 + report.PANEL_EXTRA, 24)


def test_fixed_scale_gives_different_colours_for_low_and_high_maps(tmp_path):
  image = np.full((16, 16, 3), 0.5, np.float32)
  for value in (0.1, 0.9):
    report.save_overlay(str(tmp_path / f"{value}.png"), image, np.full((16, 16), value, np.float32))
  low = np.asarray(Image.open(tmp_path / "0.1.png"))
  high = np.asarray(Image.open(tmp_path / "0.9.png"))
  assert (low[..., 2] > low[..., 0]).all() and (high[..., 0] > high[..., 2]).all()  # blue vs red
  assert np.abs(low.astype(int) - high.astype(int)).max() > 100
  # A per-image min-max would have mapped both constant maps to the same colour.


def test_outlines_of_mask_and_threshold(tmp_path):
  image = np.zeros((20, 20, 3), np.float32)
  amap = np.zeros((20, 20), np.float32)
  amap[12:18, 12:18] = 0.8
  mask = np.zeros((20, 20), bool)
  mask[3:9, 3:9] = True
  out = report.overlay_array(image, amap, mask, threshold=0.5)
  assert tuple(out[3, 5]) == report.GT_OUTLINE and tuple(out[5, 5]) != report.GT_OUTLINE  # edge, inside
  assert tuple(out[12, 14]) == report.THRESHOLD_OUTLINE and tuple(out[0, 0]) != report.THRESHOLD_OUTLINE
  with pytest.raises(ValueError, match="must match"):
    report.overlay_array(image, amap[:10], mask)
  with pytest.raises(ValueError, match="divide uint8 images by 255"):
    report.overlay_array(_image(20, 20) * 255, amap)
