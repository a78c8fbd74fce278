"""Anomaly maps, scores and decisions for a user's own image files.

    python -m ssvp_jax.predict --workdir=runs/demo --images='photos/*.jpg' --out=runs/demo/predict

writes into --out:
  predictions.csv       one row per file: path, score, decision, max_x, max_y, max_value, s_global,
                        s_local, seconds, overlay, map, error
  overlays/<name>.png   the image blended with its map on a fixed colour scale (0 blue .. 1 red), with
                        a magenta contour where the map reaches the pixel threshold
  maps/<name>.npy       the raw map, float32 [S, S] at the model's resolution (S = config.backbones.semantic.image_size);
                        with --tile, float32 [H, W] stitched at the image's full resolution (see tiling.py)

With a reference bank stored by calibrate for the category (workdir/reference/<category>.npz), score and
map are fused with it (ssvp_jax/reference.py; the log says so), `bank_score` holds the bank's own score
and `reference` the bank's file; --no_reference scores zero-shot only.

<name> is the file's path relative to the inputs' common folder, without its extension. Decisions
("defective" when score >= the image threshold, else "good") need thresholds: from
`workdir/calibration.json` (python -m ssvp_jax.calibrate) or --image_threshold / --pixel_threshold;
without them the decision column stays empty and no contour is drawn. A file that cannot be read is
reported, gets a row with its error, and the others go on. Exit status: 0 when every file was scored,
1 when any failed, 2 when the arguments name no image at all.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import time
from typing import Any, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from ssvp_jax import inference, report, tiling

log = logging.getLogger("ssvp_jax")

COLUMNS = ("path", "score", "decision", "max_x", "max_y", "max_value", "s_global", "s_local", "seconds",
           "overlay", "map", "error", "bank_score", "reference")


def output_names(paths: Sequence[str]) -> dict[str, str]:
  """{path: relative name without extension} under the paths' common folder; unique even when two files
  differ only by extension (then the extension stays in the name, as `000_png`)."""
  if not paths:
    return {}
  root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
  rel = {p: os.path.relpath(os.path.abspath(p), root) for p in paths}
  stems = {p: os.path.splitext(r)[0] for p, r in rel.items()}
  counts: dict[str, int] = {}
  for s in stems.values():
    counts[s] = counts.get(s, 0) + 1
  return {p: s if counts[s] == 1 else s + "_" + os.path.splitext(rel[p])[1].lstrip(".") for p, s in stems.items()}


def _cell(v: float) -> str:
  return repr(float(v))


def predict(engine: inference.Engine, paths: Sequence[str], out_dir: str, *, image_threshold: float | None = None,
            pixel_threshold: float | None = None, batch_size: int = 8, workers: int = 4, tile: int | None = None,
            overlap: int = 0) -> list[dict[str, Any]]:
  """Scores `paths`, writes overlays, maps and predictions.csv into `out_dir`; returns the CSV rows.

  With `tile`, each image is scored as overlapping tile x tile tiles and one stitched map (tiling.py).
  """
  os.makedirs(out_dir, exist_ok=True)
  names = output_names(paths)
  rows = []
  bank = engine.bank_meta.get("path", "bank") if engine.bank is not None else ""
  if tile:
    results = tiling.score_files(engine, paths, tile, overlap, batch_size, keep_image=True)
  else:
    results = inference.score_files(engine, paths, batch_size, workers, keep_image=True)
  # Rows are written as they come, so a long run that is stopped keeps what it scored.
  with open(os.path.join(out_dir, "predictions.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=COLUMNS)
    writer.writeheader()
    for r in tqdm(results, total=len(paths), desc="predict", unit="img", dynamic_ncols=True):
      row = _write_outputs(r, out_dir, names[r.path], image_threshold, pixel_threshold, bank)
      writer.writerow(row)
      f.flush()
      rows.append(row)
  return rows


def overlay(r: inference.Scored, pixel_threshold: float | None) -> np.ndarray:
  """uint8 [h, w, 3]: the image (at overlay size) blended with its map on the reports' fixed colour scale
  (0 blue .. 1 red), with the pixel threshold's contour in magenta."""
  h, w = r.image.shape[:2]
  big_map = inference.resize_hw(r.map, h, w, Image.Resampling.BILINEAR)  # [h, w] at overlay size
  return report.overlay_array(r.image, np.clip(big_map, 0.0, 1.0), vmin=0.0, vmax=1.0, threshold=pixel_threshold)


def _write_outputs(r: inference.Scored, out_dir: str, name: str, image_threshold: float | None,
                   pixel_threshold: float | None, reference: str = "") -> dict[str, Any]:
  """Writes one image's map and overlay; returns its CSV row."""
  row = dict.fromkeys(COLUMNS, "")
  row["path"] = r.path
  if r.error:
    log.error("skipped: %s", r.error)
    row.update(error=r.error, seconds=f"{r.seconds:.4f}")
    return row
  t0 = time.perf_counter()
  map_path = os.path.join(out_dir, "maps", name + ".npy")
  overlay_path = os.path.join(out_dir, "overlays", name + ".png")
  os.makedirs(os.path.dirname(map_path), exist_ok=True)
  np.save(map_path, r.map.astype(np.float32))
  os.makedirs(os.path.dirname(overlay_path), exist_ok=True)
  Image.fromarray(overlay(r, pixel_threshold)).save(overlay_path, format="PNG")
  x, y = inference.max_location(r.map, r.height, r.width)
  if not math.isnan(r.bank_score):
    row.update(bank_score=_cell(r.bank_score), reference=reference)
  row.update(score=_cell(r.score), s_global=_cell(r.s_global), s_local=_cell(r.s_local), max_x=x, max_y=y,
             max_value=_cell(r.map.max()), overlay=overlay_path, map=map_path,
             seconds=f"{r.seconds + time.perf_counter() - t0:.4f}")
  if image_threshold is not None:
    row["decision"] = "defective" if r.score >= image_threshold else "good"
  return row


def read_predictions(path: str) -> list[dict[str, str]]:
  """The rows of a predictions.csv (all values as strings)."""
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def _thresholds(flags, cal: dict[str, Any] | None, engine_step: int | None) -> tuple[float | None, float | None]:
  """(image, pixel threshold): the flags where given, else the calibration's."""
  cal = cal or {}
  img = flags.image_threshold if flags.image_threshold is not None else cal.get("image_threshold")
  pix = flags.pixel_threshold if flags.pixel_threshold is not None else cal.get("pixel_threshold")
  if engine_step is not None and cal.get("checkpoint_step") not in (None, engine_step):
    log.warning("calibration.json was made with the checkpoint of step %s, the model is now at step %s: "
                "recalibrate", cal.get("checkpoint_step"), engine_step)
  return img, pix


def main(argv) -> int:
  del argv
  from absl import app

  from ssvp_jax.calibrate import load_calibration
  from ssvp_jax.cli import FLAGS, setup
  setup()
  out_dir = os.path.abspath(FLAGS.out)
  # Earlier outputs inside an input folder must not become inputs on a rerun.
  paths = [p for p in inference.expand_images(FLAGS.images) if not p.startswith(out_dir + os.sep)]
  if not paths:
    raise app.UsageError(f"--images={','.join(FLAGS.images)}: no files found", exitcode=2)
  cal = load_calibration(FLAGS.workdir)
  category = FLAGS.category
  if cal and not FLAGS["category"].present:
    category = cal.get("category", category)  # the word the thresholds were calibrated with
  elif cal and cal.get("category") != category:
    log.warning("calibration.json was made for category %r, predicting with %r: its thresholds may not fit",
                cal.get("category"), category)
  if FLAGS.tile is not None:
    try:
      tiling.check_args(FLAGS.tile, FLAGS.overlap)
    except ValueError as e:
      raise app.UsageError(str(e)) from None
  engine = inference.load_engine(FLAGS.workdir, category, FLAGS.config, use_reference=not FLAGS.no_reference)
  if cal and bool(cal.get("reference")) != (engine.bank is not None):
    log.warning("calibration.json was made with%s a reference bank, predicting with%s one: its thresholds "
                "may not fit", "" if cal.get("reference") else "out", "" if engine.bank is not None else "out")
  img_thr, pix_thr = _thresholds(FLAGS, cal, engine.step)
  if img_thr is None:
    log.warning("no image threshold (run python -m ssvp_jax.calibrate or pass --image_threshold): "
                "predictions.csv has scores but no decisions")
  rows = predict(engine, paths, out_dir, image_threshold=img_thr, pixel_threshold=pix_thr,
                 batch_size=FLAGS.batch_size or engine.config.eval.batch_size, workers=FLAGS.workers,
                 tile=FLAGS.tile, overlap=FLAGS.overlap)
  failed = [r for r in rows if r["error"]]
  flagged = sum(r["decision"] == "defective" for r in rows)
  decided = f", {flagged} defective at threshold {img_thr:.6g}" if img_thr is not None else ""
  print(f"{len(rows) - len(failed)} of {len(rows)} images scored{decided}; "
        f"{len(failed)} failed; wrote {os.path.join(out_dir, 'predictions.csv')}")
  for r in failed:
    print(f"FAILED {r['error']}")
  return 1 if failed else 0


if __name__ == "__main__":
  from absl import flags

  import ssvp_jax.cli  # --config, --workdir, --verbose; run()
  inference.define_flags()
  flags.DEFINE_multi_string("images", None, "Image file, folder (recursive) or glob; repeat for more.",
                            required=True)
  flags.DEFINE_string("out", None, "Output folder.", required=True)
  flags.DEFINE_bool("no_reference", False, "Ignore the category's stored reference bank (zero-shot scores only).")
  flags.DEFINE_float("image_threshold", None, "Decision threshold on the image score (default: calibration.json).")
  flags.DEFINE_float("pixel_threshold", None, "Contour threshold on the maps (default: calibration.json).")
  flags.DEFINE_integer("tile", None, "Score large images as overlapping T x T pixel tiles at the model's "
                       "resolution and stitch one full-resolution map (default: whole-image resize).")
  flags.DEFINE_integer("overlap", 0, "Overlap of neighbouring tiles in pixels (with --tile), blended linearly.")
  ssvp_jax.cli.run(main)
