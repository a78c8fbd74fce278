"""Runs a model exported by `python -m ssvp_jax.export` with nothing but jax and numpy (PIL to read files).

This file stands alone: copy it next to the artifact and run

    python jaxexport_runner.py model.jaxexport photo.jpg more/*.png        # CSV on stdout

or use it from Python:

    from jaxexport_runner import ExportedModel, read_image
    model = ExportedModel("model.jaxexport")
    out = model(np.stack([read_image(p, model.input_size) for p in paths]))  # {"map", "score", ...}

Inputs are RGB images `[b, S, S, 3]` (S = `model.input_size`): float in [0, 1], or uint8 / uint16
(divided by 255 / 65535). Any batch size works (the batch dimension was exported symbolically); each
new one compiles once. Decisions need the image threshold stored at export time from calibration.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from typing import Sequence

import jax
import numpy as np
from jax import export as jax_export

FORMAT = "ssvp_jax.jaxexport/1"


class ExportedModel:
  """An exported SSVP model: call it on a batch of images; `meta` holds sizes, category and thresholds."""

  def __init__(self, path: str):
    try:
      archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
      raise ValueError(f"{path}: not a .jaxexport artifact ({type(e).__name__}: {e})") from None
    with archive:
      if "meta" not in archive or "function" not in archive:
        raise ValueError(f"{path}: not a .jaxexport artifact (no 'meta' / 'function' entry)")
      self.meta = json.loads(archive["meta"].tobytes().decode())
      if self.meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {self.meta.get('format')!r}, this runner reads {FORMAT!r}")
      self.exported = jax_export.deserialize(bytearray(archive["function"].tobytes()))
      weights = []
      for i, dtype in enumerate(self.meta["weight_dtypes"]):
        w = archive[f"w{i:04d}"]
        weights.append(w if w.dtype.name == dtype else w.view(jax.numpy.dtype(dtype)))  # bfloat16 as raw bits
    backend = jax.default_backend()  # "gpu" covers jax.export's "cuda" and "rocm"
    if not set({"gpu": ("cuda", "rocm")}.get(backend, (backend,))) & set(self.exported.platforms):
      raise ValueError(f"{path} was exported for {', '.join(self.exported.platforms)}; this machine runs {backend}")
    self.weights = jax.device_put(weights)  # once, not at every call
    self._call = jax.jit(self.exported.call)

  @property
  def input_size(self) -> int:
    return int(self.meta["input_size"])

  @property
  def image_threshold(self) -> float | None:
    return self.meta.get("image_threshold")

  @property
  def pixel_threshold(self) -> float | None:
    return self.meta.get("pixel_threshold")

  def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
    """images [b, S, S, 3] (or one [S, S, 3]) -> {"map": [b, M, M], "score", "s_global", "s_local": [b]}."""
    x = np.asarray(images)
    if x.ndim == 3:
      x = x[None]
    s = self.input_size
    if x.ndim != 4 or x.shape[1:] != (s, s, 3):
      raise ValueError(f"images must be [b, {s}, {s}, 3] RGB, got shape {x.shape} (read_image resizes files)")
    if x.dtype == np.uint8:
      x = x.astype(np.float32) / 255.0
    elif x.dtype == np.uint16:
      x = x.astype(np.float32) / 65535.0
    elif x.dtype.kind == "f":
      x = x.astype(np.float32)
      if x.size and (x.min() < 0.0 or x.max() > 1.0):
        raise ValueError(f"float images must be in [0, 1], got [{x.min()}, {x.max()}]")
    else:
      raise ValueError(f"images must be float in [0, 1], uint8 or uint16, got {x.dtype}")
    return {k: np.asarray(v) for k, v in self._call(self.weights, x).items()}

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


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(description="Scores image files with an exported SSVP model (CSV on stdout).")
  p.add_argument("model", help="the .jaxexport file")
  p.add_argument("images", nargs="+", help="image files")
  p.add_argument("--batch-size", type=int, default=8)
  args = p.parse_args(argv)
  model = ExportedModel(args.model)
  writer = csv.writer(sys.stdout, lineterminator="\n")
  writer.writerow(["path", "score", "decision", "max_value"])
  failed = 0
  for i in range(0, len(args.images), args.batch_size):
    batch, names = [], []
    for path in args.images[i:i + args.batch_size]:
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


if __name__ == "__main__":
  sys.exit(main())
