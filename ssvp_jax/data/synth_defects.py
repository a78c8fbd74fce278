"""Synthetic defects with exact masks: the mask is the region the defect changed.

Four kinds, each a function (image, rng) -> (defective image, bool mask):
  foreign_texture  a Perlin-noise region filled with a foreign texture (DRAEM-style blend)
  scratch          a dark or bright curved stroke
  spot             one to three coloured ellipses
  scar             a thin rotated strip cut from the same image, recoloured, pasted elsewhere (CutPaste)

`add_defect` retries until the mask covers MIN_AREA..MAX_AREA of the image and the region
visibly changed (mean absolute change >= MIN_CHANGE after the category's gray conversion).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

from ssvp_jax.data import synth_textures as tex

MIN_AREA, MAX_AREA = 0.002, 0.15
MIN_CHANGE = 0.08
DEFECT_TYPES = ("foreign_texture", "scratch", "spot", "scar")


def _blend(img: np.ndarray, mask: np.ndarray, fill: np.ndarray, alpha: float) -> np.ndarray:
  m = mask[:, :, None].astype(np.float32) * alpha
  return img * (1 - m) + fill * m


def _contrast_colour(img: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """A colour far from the region's mean colour, so the change shows."""
  mean = img[mask].mean(axis=0) if mask.any() else img.reshape(-1, 3).mean(axis=0)
  c = np.where(mean > 0.5, rng.uniform(0.0, 0.25, 3), rng.uniform(0.75, 1.0, 3))
  if rng.random() < 0.5:  # sometimes a hue change rather than a pure brightness change
    c = rng.permutation(c)
  return c.astype(np.float32)


def foreign_texture(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  size = img.shape[0]
  noise = tex.fractal(size, size, int(rng.integers(2, 5)), 3, rng)
  # A Gaussian window keeps the region local (one blob-like area, not speckles everywhere).
  yy, xx = np.mgrid[0:size, 0:size] / size
  cy, cx = rng.uniform(0.2, 0.8, 2)
  window = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * rng.uniform(0.08, 0.18) ** 2))
  score = (noise + 1.5) * window
  area = rng.uniform(0.01, 0.1)
  mask = score > np.quantile(score, 1 - area)
  return _blend(img, mask, tex.foreign(size, rng), rng.uniform(0.7, 1.0)), mask


def scratch(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  size = img.shape[0]
  p0 = rng.uniform(0.15, 0.85, 2) * size
  length = rng.uniform(0.15, 0.45) * size
  a = rng.uniform(0, 2 * math.pi)
  p2 = p0 + length * np.array([math.cos(a), math.sin(a)])
  bend = rng.normal(0, 0.15) * length
  p1 = (p0 + p2) / 2 + bend * np.array([-math.sin(a), math.cos(a)])
  t = np.linspace(0, 1, 32)[:, None]
  pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2  # quadratic Bezier [32, 2] as (x, y)
  canvas = Image.new("L", (size, size), 0)
  width = max(2, int(round(rng.uniform(0.006, 0.016) * size)))
  ImageDraw.Draw(canvas).line([tuple(p) for p in pts], fill=255, width=width, joint="curve")
  mask = np.asarray(canvas) > 0
  colour = np.full(3, rng.uniform(0.0, 0.12) if rng.random() < 0.5 else rng.uniform(0.88, 1.0), np.float32)
  if mask.any() and abs(img[mask].mean() - colour[0]) < 0.3:
    colour = 1.0 - colour  # a dark scratch on a dark texture would not show
  return _blend(img, mask, colour, rng.uniform(0.8, 1.0)), mask


def spot(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  size = img.shape[0]
  canvas = Image.new("L", (size, size), 0)
  draw = ImageDraw.Draw(canvas)
  cy, cx = rng.uniform(0.15, 0.85, 2) * size
  for _ in range(int(rng.integers(1, 4))):
    ry, rx = rng.uniform(0.015, 0.07, 2) * size
    oy, ox = rng.normal(0, 0.04, 2) * size
    draw.ellipse([cx + ox - rx, cy + oy - ry, cx + ox + rx, cy + oy + ry], fill=255)
  mask = np.asarray(canvas) > 0
  return _blend(img, mask, _contrast_colour(img, mask, rng), rng.uniform(0.75, 1.0)), mask


def scar(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  size = img.shape[0]
  h, w = int(rng.uniform(0.1, 0.3) * size), max(3, int(rng.uniform(0.02, 0.05) * size))
  y, x = int(rng.integers(0, size - h)), int(rng.integers(0, size - w))
  patch = img[y:y + h, x:x + w]
  # Recolour the strip (gain + channel shuffle) so it differs from wherever it lands.
  patch = np.clip(patch[:, :, rng.permutation(3)] * rng.uniform(0.5, 1.5) + rng.uniform(-0.25, 0.25), 0, 1)
  angle = rng.uniform(-60, 60)
  rot = [np.asarray(Image.fromarray(np.ascontiguousarray(patch[:, :, c])).rotate(angle, Image.Resampling.BILINEAR,
                                                                                expand=True)) for c in range(3)]
  rot_mask = np.asarray(Image.fromarray(np.ones((h, w), np.float32)).rotate(angle, Image.Resampling.BILINEAR,
                                                                            expand=True)) > 0.5
  rh, rw = rot_mask.shape
  ty, tx = int(rng.integers(0, size - rh + 1)), int(rng.integers(0, size - rw + 1))
  fill = img.copy()
  fill[ty:ty + rh, tx:tx + rw] = np.stack(rot, axis=2)
  mask = np.zeros((size, size), bool)
  mask[ty:ty + rh, tx:tx + rw] = rot_mask
  return _blend(img, mask, fill, 1.0), mask


DEFECTS: dict[str, Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]] = {
    "foreign_texture": foreign_texture, "scratch": scratch, "spot": spot, "scar": scar}


def add_defect(img: np.ndarray, kind: str, rng: np.random.Generator, gray: bool,
               max_tries: int = 30) -> tuple[np.ndarray, np.ndarray]:
  """(defective image [S, S, 3] in [0, 1], mask bool [S, S]) with the area and visibility checks.

  Falls back to a strong spot if `kind` keeps failing the checks (deterministic either way).
  """
  for attempt in range(max_tries + 1):
    fn = DEFECTS[kind] if attempt < max_tries else spot
    out, mask = fn(img, rng)
    if gray:
      out = np.repeat(out.mean(axis=2, keepdims=True), 3, axis=2)
    out = np.clip(out, 0, 1).astype(np.float32)
    area = mask.mean()
    if MIN_AREA <= area <= MAX_AREA and np.abs(out - img).max(axis=2)[mask].mean() >= MIN_CHANGE:
      return out, mask
  raise RuntimeError(f"could not place a visible {kind} defect")  # never seen at sizes >= 32
