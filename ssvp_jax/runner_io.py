"""What both standalone runners share (numpy and PIL only): reading a file as the pipeline does, and
the CSV loop of their command lines. Copy it next to `jaxexport_runner.py` or `onnx_runner.py`.
"""

from __future__ import annotations

import argparse
import csv
import sys
from typing import Sequence

import numpy as np

CSV_COLUMNS = ("path", "score", "decision", "max_value")


class Artifact:
  """What both runners' models read from their `meta`: input size and the thresholds of calibration."""
  meta: dict

  @property
  def input_size(self) -> int:
    return int(self.meta["input_size"])

  @property
  def image_threshold(self) -> float | None:
    return self.meta.get("image_threshold")

  @property
  def pixel_threshold(self) -> float | None:
    return self.meta.get("pixel_threshold")

  def decide(self, scores: np.ndarray) -> np.ndarray:
    """True where score >= the exported image threshold; raises when the export had no calibration."""
    if self.image_threshold is None:
      raise ValueError("this artifact has no image threshold: run ssvp_jax.calibrate before ssvp_jax.export")
    return np.asarray(scores) >= self.image_threshold


def read_image(path: str, size: int) -> np.ndarray:
  """A file as float32 [size, size, 3] in [0, 1], decoded and resized as ssvp_jax's pipeline does it.

  EXIF orientation applied; grayscale repeated to RGB; 16-bit kept (/65535); alpha dropped; PIL's
  float bicubic resize per channel (antialiased), then clipped. Raises ValueError naming the file.
  """
  from PIL import Image, ImageOps
  try:
    with Image.open(path) as im:
      im.load()
      im = ImageOps.exif_transpose(im)
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise ValueError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from e
  if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
    a = np.asarray(im).astype(np.float32) / 65535.0
  elif im.mode == "F":
    a = np.asarray(im, dtype=np.float32)
  else:
    if im.mode in ("P", "PA"):
      im = im.convert("RGBA")
    elif im.mode in ("1", "LA", "La"):
      im = im.convert("L")
    elif im.mode not in ("L", "RGB", "RGBA"):
      im = im.convert("RGB")
    a = np.asarray(im).astype(np.float32) / 255.0
  if a.ndim == 2:
    a = np.repeat(a[:, :, None], 3, axis=2)
  a = np.clip(a[:, :, :3], 0.0, 1.0)  # [H, W, 3]
  if a.shape[:2] == (size, size):
    return a
  chans = [np.asarray(Image.fromarray(np.ascontiguousarray(a[:, :, c])).resize((size, size), Image.Resampling.BICUBIC))
           for c in range(3)]
  return np.clip(np.stack(chans, axis=2), 0.0, 1.0)


def as_float_batch(images: np.ndarray, size: int) -> np.ndarray:
  """[b, S, S, 3] (or one [S, S, 3]) float in [0, 1], uint8 or uint16 -> float32 [b, S, S, 3] in [0, 1]."""
  x = np.asarray(images)
  if x.ndim == 3:
    x = x[None]
  if x.ndim != 4 or x.shape[1:] != (size, size, 3):
    raise ValueError(f"images must be [b, {size}, {size}, 3] RGB, got shape {x.shape} (read_image resizes files)")
  if x.dtype == np.uint8:
    return x.astype(np.float32) / 255.0
  if x.dtype == np.uint16:
    return x.astype(np.float32) / 65535.0
  if x.dtype.kind == "f":
    x = x.astype(np.float32)
    if x.size and (x.min() < 0.0 or x.max() > 1.0):
      raise ValueError(f"float images must be in [0, 1], got [{x.min()}, {x.max()}]")
    return x
  raise ValueError(f"images must be float in [0, 1], uint8 or uint16, got {x.dtype}")


def cli_parser(description: str, model_help: str) -> argparse.ArgumentParser:
  """The runners' common arguments: model, images, --batch-size."""
  p = argparse.ArgumentParser(description=description)
  p.add_argument("model", help=model_help)
  p.add_argument("images", nargs="+", help="image files")
  p.add_argument("--batch-size", type=int, default=8)
  return p


def score_to_csv(model: Artifact, paths: Sequence[str], batch_size: int) -> int:
  """Scores `paths` with `model` and writes path, score, decision, max_value as CSV on stdout; files that
  cannot be read are named on stderr. Returns the exit status: 1 when any file failed, else 0."""
  writer = csv.writer(sys.stdout, lineterminator="\n")
  writer.writerow(CSV_COLUMNS)
  failed = 0
  for i in range(0, len(paths), batch_size):
    batch, names = [], []
    for path in paths[i:i + batch_size]:
      try:
        batch.append(read_image(path, model.input_size))
        names.append(path)
      except ValueError as e:
        print(f"skipped: {e}", file=sys.stderr)
        failed += 1
    if not batch:
      continue
    out = model(np.stack(batch))
    for j, path in enumerate(names):
      decision = "" if model.image_threshold is None else (
          "defective" if out["score"][j] >= model.image_threshold else "good")
      writer.writerow([path, repr(float(out["score"][j])), decision, repr(float(out["map"][j].max()))])
  return 1 if failed else 0
