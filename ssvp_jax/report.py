"""Result reports (results.json / .csv / .md) and heatmap overlays.

`write_reports(results, out_dir)` takes per-category metrics

    results[dataset][category][metric] = fraction in [0, 1] (or NaN / None)

with the metric keys of `METRICS` (missing keys count as undefined, extra keys
are carried into the JSON and CSV), and writes:

  results.json  dataset -> category -> metric, plus a "mean" entry per dataset
                with the unweighted, NaN-aware mean over categories and
                "num_categories" saying how many categories each mean averages;
                NaN is written as null.
  results.csv   one row per (dataset, category), NaN as an empty cell.
  results.md    the paper's layout (I-AUROC/I-F1max/I-AP | P-AUROC/PRO/P-AP) in
                percent with one decimal: a summary per dataset, then one table
                per dataset with its categories.

`save_overlay` writes an image blended with its anomaly map through a fixed
colour scale (never a per-image min-max, which makes normal images look
defective), with the ground-truth outline and an optional decision contour.
"""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Any, Mapping

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from ssvp_jax.fileio import atomic_file, atomic_write

METRICS = ("image_auroc", "image_ap", "image_f1_max",
           "pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_aupro")
# The paper's column order (Table 1): image group | pixel group.
PAPER_IMAGE = (("I-AUROC", "image_auroc"), ("I-F1max", "image_f1_max"), ("I-AP", "image_ap"))
PAPER_PIXEL = (("P-AUROC", "pixel_auroc"), ("PRO", "pixel_aupro"), ("P-AP", "pixel_ap"))
MEAN = "mean"
COUNTS = "num_categories"

Results = Mapping[str, Mapping[str, Mapping[str, Any]]]


# --------------------------------------------------------------------------
# Metrics -> reports
# --------------------------------------------------------------------------

def category_entry(image: Mapping[str, float] | None = None,
                   pixel: Mapping[str, float] | None = None) -> dict[str, float]:
  """Report keys from `metrics.image_metrics` and `metrics.pixel_metrics` outputs.

  {"auroc": .9} from image_metrics becomes {"image_auroc": .9}; pixel "aupro"
  becomes "pixel_aupro" (and the variant "pixel_aupro_200_thresholds").
  """
  out = {f"image_{k}": float(v) for k, v in (image or {}).items()}
  out.update({f"pixel_{k}": float(v) for k, v in (pixel or {}).items()})
  return out


def _value(v: Any, where: str) -> float:
  """A metric as a float fraction (NaN when undefined); anything else is an error."""
  if v is None:
    return math.nan
  try:
    f = float(v)
  except (TypeError, ValueError):
    raise ValueError(f"{where} = {v!r} is not a number") from None
  if not math.isnan(f) and not 0.0 <= f <= 1.0:
    raise ValueError(f"{where} = {f} is not a fraction in [0, 1] (percentages must be divided by 100)")
  return f


def _normalise(results: Results) -> tuple[dict[str, dict[str, dict[str, float]]], list[str]]:
  """-> (results with float values, every key present in METRICS order then extras)."""
  if not isinstance(results, Mapping) or not results:
    raise ValueError("results must be a non-empty dict: dataset -> category -> metric -> value")
  out, extras = {}, set()
  for dataset, categories in results.items():
    if not isinstance(categories, Mapping) or not categories:
      raise ValueError(f"results[{dataset!r}] must be a non-empty dict: category -> metric -> value")
    out[dataset] = {}
    for category, values in categories.items():
      if category == MEAN:
        raise ValueError(f"results[{dataset!r}] has a category named {MEAN!r}, which is reserved for the mean")
      if not isinstance(values, Mapping):
        raise ValueError(f"results[{dataset!r}][{category!r}] must be a dict: metric -> value")
      out[dataset][category] = {m: _value(v, f"results[{dataset!r}][{category!r}][{m!r}]")
                                for m, v in values.items()}
      extras |= set(values) - set(METRICS)
  return out, list(METRICS) + sorted(extras)


def dataset_mean(categories: Mapping[str, Mapping[str, float]],
                 keys: tuple[str, ...] | list[str] = METRICS) -> dict[str, Any]:
  """Unweighted mean over categories of each metric, skipping NaN / missing ones.

  Returns {metric: mean (NaN if no category has it), "num_categories":
  {metric: number of categories averaged}}.
  """
  means: dict[str, Any] = {}
  counts = {}
  for k in keys:
    vals = [float(c[k]) for c in categories.values() if c.get(k) is not None and not math.isnan(float(c[k]))]
    means[k] = float(np.mean(vals)) if vals else math.nan
    counts[k] = len(vals)
  means[COUNTS] = counts
  return means


def _json_value(v: float) -> float | None:
  return None if math.isnan(v) else v


def write_reports(results: Results, out_dir: str) -> dict[str, str]:
  """Writes results.json, results.csv and results.md into `out_dir` (each atomically); returns their paths."""
  data, keys = _normalise(results)
  os.makedirs(out_dir, exist_ok=True)
  paths = {ext: os.path.join(out_dir, f"results.{ext}") for ext in ("json", "csv", "md")}

  doc = {}
  for dataset, categories in data.items():
    doc[dataset] = {c: {k: _json_value(v.get(k, math.nan)) for k in keys if k in v or k in METRICS}
                    for c, v in categories.items()}
    mean = dataset_mean(categories, keys)
    doc[dataset][MEAN] = {k: _json_value(mean[k]) for k in keys}
    doc[dataset][MEAN][COUNTS] = mean[COUNTS]
  with atomic_file(paths["json"]) as f:
    json.dump(doc, f, indent=2, allow_nan=False)

  with atomic_file(paths["csv"], newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["dataset", "category"] + keys)
    for dataset, categories in data.items():
      for category, v in categories.items():
        writer.writerow([dataset, category] + [_csv_cell(v.get(k, math.nan)) for k in keys])

  atomic_write(paths["md"], format_markdown(data))
  return paths


def _csv_cell(v: float) -> str:
  return "" if math.isnan(v) else repr(v)


def read_results_json(path: str) -> dict[str, dict[str, dict[str, Any]]]:
  """Reads results.json back; null becomes NaN (the "mean" entries are kept)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such results file (written by ssvp_jax.report.write_reports)")
  with open(path) as f:
    try:
      doc = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e})") from None

  def back(v: Any) -> Any:
    return {k: back(x) for k, x in v.items()} if isinstance(v, dict) else (math.nan if v is None else v)

  return back(doc)


def _pct(v: float) -> str:
  return "-" if math.isnan(v) else f"{100.0 * v:.1f}"


def format_markdown(results: Results) -> str:
  """The results as markdown tables in the paper's layout (percent, one decimal)."""
  data, _ = _normalise(results)
  cols = PAPER_IMAGE + PAPER_PIXEL
  lines = ["# Results", "",
           "Percent, one decimal. Each dataset's value is the unweighted mean over its categories;",
           "`-` marks an undefined value (e.g. a category with a single label), and a mean over fewer",
           "categories than the dataset has says how many. PRO is the official MVTec",
           "AUPRO (exact, FPR up to 0.3).", "",
           "| Dataset | I-AUROC/I-F1max/I-AP | P-AUROC/PRO/P-AP | categories |", "|---|---|---|---|"]
  means = {d: dataset_mean(c) for d, c in data.items()}
  for dataset, mean in means.items():
    groups = ["/".join(_pct(mean[k]) for _, k in group) for group in (PAPER_IMAGE, PAPER_PIXEL)]
    n = len(data[dataset])
    fewer = [f"{name}: {mean[COUNTS][k]}" for name, k in cols if 0 < mean[COUNTS][k] < n]
    count = f"{n} ({', '.join(fewer)})" if fewer else str(n)
    lines.append(f"| {dataset} | {groups[0]} | {groups[1]} | {count} |")
  for dataset, categories in data.items():
    lines += ["", f"## {dataset}", "",
              "| Category | " + " | ".join(name for name, _ in cols) + " |",
              "|---" * (len(cols) + 1) + "|"]
    for category, v in categories.items():
      lines.append(f"| {category} | " + " | ".join(_pct(v.get(k, math.nan)) for _, k in cols) + " |")
    mean, n = means[dataset], len(categories)
    cells = [_pct(mean[k]) + ("" if mean[COUNTS][k] in (0, n) else f" (n={mean[COUNTS][k]})") for _, k in cols]
    lines.append("| **mean** | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# Overlays
# --------------------------------------------------------------------------

GT_OUTLINE = (255, 255, 255)      # white: never produced by the colour map
THRESHOLD_OUTLINE = (255, 0, 255)  # magenta: never produced by the colour map
PANEL_GAP, BAR_WIDTH, LABEL_WIDTH = 4, 12, 48
PANEL_EXTRA = 2 * PANEL_GAP + BAR_WIDTH + LABEL_WIDTH  # panel width = 2 W + PANEL_EXTRA


def jet(values: np.ndarray) -> np.ndarray:
  """The 'jet' colour map (blue -> cyan -> green -> yellow -> red): [...] in [0, 1] -> uint8 [..., 3]."""
  v = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)[..., None]  # [..., 1]
  centres = np.array([0.75, 0.5, 0.25], dtype=np.float32)            # r, g, b
  rgb = np.clip(1.5 - np.abs(4.0 * v - 4.0 * centres), 0.0, 1.0)     # [..., 3]
  return np.round(rgb * 255.0).astype(np.uint8)


def _outline(region: np.ndarray) -> np.ndarray:
  """Pixels of `region` [H, W] bool that touch its outside (8-neighbourhood)."""
  inner = ndimage.binary_erosion(region, structure=np.ones((3, 3), bool), border_value=0)
  return region & ~inner


def overlay_array(image: Any, anomaly_map: Any, mask: Any = None, vmin: float = 0.0, vmax: float = 1.0,
                  threshold: float | None = None, alpha: float = 0.5) -> np.ndarray:
  """The blended overlay as uint8 [H, W, 3] (see `save_overlay`)."""
  image = np.asarray(image, dtype=np.float32)
  anomaly_map = np.asarray(anomaly_map, dtype=np.float32)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"image must be [H, W, 3] RGB, got shape {image.shape}")
  if image.size and (image.min() < 0.0 or image.max() > 1.0):
    raise ValueError(f"image values must be in [0, 1], got [{image.min()}, {image.max()}] "
                     "(divide uint8 images by 255)")
  if anomaly_map.shape != image.shape[:2]:
    raise ValueError(f"anomaly_map {anomaly_map.shape} must match the image's [H, W] {image.shape[:2]}")
  if np.isnan(anomaly_map).any():
    raise ValueError("anomaly_map contains NaN")
  if not vmax > vmin:
    raise ValueError(f"vmax ({vmax}) must be greater than vmin ({vmin})")
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha must be in [0, 1], got {alpha}")
  colours = jet((anomaly_map - vmin) / (vmax - vmin)).astype(np.float32) / 255.0  # [H, W, 3]
  out = np.round(255.0 * ((1.0 - alpha) * image + alpha * colours)).astype(np.uint8)
  if mask is not None:
    mask = np.asarray(mask)
    if mask.shape != anomaly_map.shape:
      raise ValueError(f"mask {mask.shape} must match the anomaly map {anomaly_map.shape}")
    out[_outline(mask > 0)] = GT_OUTLINE
  if threshold is not None:
    out[_outline(anomaly_map >= threshold)] = THRESHOLD_OUTLINE
  return out


def save_overlay(path: str, image: Any, anomaly_map: Any, mask: Any = None, vmin: float = 0.0,
                 vmax: float = 1.0, threshold: float | None = None, alpha: float = 0.5,
                 panel: bool = False) -> None:
  """Writes a PNG of `image` blended with `anomaly_map` on a fixed colour scale.

  Args:
    path: output .png path (folders are created).
    image: [H, W, 3] float RGB in [0, 1].
    anomaly_map: [H, W] scores; vmin maps to blue and vmax to red for every
      image alike, so a normal image stays blue.
    mask: optional [H, W] ground truth, drawn as a white outline.
    threshold: optional decision threshold, its contour drawn in magenta.
    alpha: weight of the colour map in the blend.
    panel: False writes the overlay alone ([H, W]); True writes image |
      overlay | colour bar with the vmin / vmax values, [H, 2 W + PANEL_EXTRA].
  """
  over = overlay_array(image, anomaly_map, mask, vmin, vmax, threshold, alpha)
  if panel:
    h, w = over.shape[:2]
    canvas = np.full((h, 2 * w + PANEL_EXTRA, 3), 255, dtype=np.uint8)
    canvas[:, :w] = np.round(np.asarray(image, dtype=np.float32) * 255.0).astype(np.uint8)
    canvas[:, w + PANEL_GAP:2 * w + PANEL_GAP] = over
    bar_x = 2 * w + 2 * PANEL_GAP
    canvas[:, bar_x:bar_x + BAR_WIDTH] = jet(np.linspace(1.0, 0.0, h))[:, None, :]  # vmax on top
    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    draw.text((bar_x + BAR_WIDTH + 2, 0), f"{vmax:g}", fill=(0, 0, 0))
    draw.text((bar_x + BAR_WIDTH + 2, max(0, h - 11)), f"{vmin:g}", fill=(0, 0, 0))
  else:
    picture = Image.fromarray(over)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  picture.save(path, format="PNG")
