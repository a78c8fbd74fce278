"""Normal images for the demo data: real photographs shipped with scikit-image, and procedural textures.

Each family draws its parameters once per category (`make_spec`, from the category's seed)
and jitters them per image (`render`), so images of one category look alike and
categories look different. All images are float32 [S, S, 3] in [0, 1].
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import numpy as np
from PIL import Image

# Photographs inside the scikit-image wheel (no download): gray ones become gray categories.
PHOTO_FAMILIES = {"brick": True, "grass": True, "gravel": True, "coins": True, "camera": True, "coffee": False}
PROCEDURAL_FAMILIES = ("grating", "stone", "grid", "dots", "checkers", "waves", "disc")
# Photos no category uses: the "foreign texture" of DRAEM-style defects.
FOREIGN_PHOTOS = ("astronaut", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")


@functools.lru_cache(maxsize=None)
def photo(name: str) -> np.ndarray:
  """A scikit-image sample photograph as float32 [H, W, 3] in [0, 1] (gray repeated)."""
  import skimage.data  # pylint: disable=g-import-not-at-top  (slow import, only needed here)
  a = np.asarray(getattr(skimage.data, name)(), dtype=np.float32) / 255.0
  if a.ndim == 2:
    a = np.repeat(a[:, :, None], 3, axis=2)
  a = a[:, :, :3]
  a.setflags(write=False)
  return a


def perlin(h: int, w: int, res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
  """Gradient (Perlin) noise [h, w], roughly in [-1, 1], with res[0] x res[1] lattice cells."""
  ang = rng.uniform(0.0, 2 * math.pi, (res[0] + 1, res[1] + 1))
  gy, gx = np.sin(ang), np.cos(ang)
  y = np.arange(h) * res[0] / h
  x = np.arange(w) * res[1] / w
  y0, x0 = y.astype(int)[:, None], x.astype(int)[None, :]
  fy, fx = (y % 1.0)[:, None], (x % 1.0)[None, :]

  def corner(dy: int, dx: int) -> np.ndarray:
    return gy[y0 + dy, x0 + dx] * (fy - dy) + gx[y0 + dy, x0 + dx] * (fx - dx)

  fade = lambda t: t * t * t * (t * (t * 6 - 15) + 10)  # noqa: E731  (Perlin's quintic)
  u, v = fade(fx), fade(fy)
  top = corner(0, 0) * (1 - u) + corner(0, 1) * u
  bottom = corner(1, 0) * (1 - u) + corner(1, 1) * u
  return (top * (1 - v) + bottom * v) * math.sqrt(2)


def fractal(h: int, w: int, res: int, octaves: int, rng: np.random.Generator) -> np.ndarray:
  """Sum of `octaves` Perlin layers, each twice as fine and half as strong: [h, w]."""
  out = np.zeros((h, w))
  for k in range(octaves):
    out += perlin(h, w, (res * 2**k, res * 2**k), rng) * 0.5**k
  return out


def _colour(rng: np.random.Generator, lo: float = 0.1, hi: float = 0.9) -> np.ndarray:
  return rng.uniform(lo, hi, 3).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Spec:
  """A category's look: its family, whether it is grayscale, and the family's parameters."""
  family: str
  gray: bool
  params: dict[str, Any]


def make_spec(family: str, rng: np.random.Generator) -> Spec:
  """Draws the fixed parameters of one category of `family`."""
  if family in PHOTO_FAMILIES:
    # An upside-down cameraman is not a normal "camera" image; textures and top-down views flip freely.
    return Spec(family, PHOTO_FAMILIES[family], {"scale": rng.uniform(0.45, 0.7), "vflip": family != "camera"})
  c1, c2 = _colour(rng), _colour(rng)
  if np.abs(c1 - c2).mean() < 0.25:  # keep the two colours of a pattern apart
    c2 = np.clip(1.0 - c1, 0.05, 0.95).astype(np.float32)
  p = {"c1": c1, "c2": c2, "angle": rng.uniform(0, math.pi)}
  if family in ("grating", "waves"):
    p.update(freq=rng.uniform(5, 12), wobble=rng.uniform(0.02, 0.06), wfreq=rng.uniform(1, 3))
  elif family == "stone":
    p.update(res=int(rng.integers(2, 5)), octaves=4, veins=bool(rng.integers(0, 2)))
  elif family in ("grid", "dots", "checkers"):
    p.update(period=rng.uniform(0.07, 0.16), width=rng.uniform(0.12, 0.3))
  elif family == "disc":
    p.update(radius=rng.uniform(0.25, 0.38), ring=rng.uniform(0.5, 0.8))
  else:
    raise ValueError(f"unknown texture family {family!r}")
  return Spec(family, False, p)


def _photo_crop(spec: Spec, size: int, rng: np.random.Generator, name: str | None = None) -> np.ndarray:
  src = photo(name or spec.family)
  h, w = src.shape[:2]
  side = int(min(h, w) * np.clip(spec.params["scale"] * rng.uniform(0.93, 1.07), 0.2, 1.0))
  y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
  crop = src[y:y + side, x:x + side]
  if rng.random() < 0.5:
    crop = crop[:, ::-1]
  if rng.random() < 0.5 and spec.params.get("vflip", True):
    crop = crop[::-1]
  im = Image.fromarray(np.round(crop * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC)
  return np.asarray(im, dtype=np.float32) / 255.0


def _mix(t: np.ndarray, c1: np.ndarray, c2: np.ndarray) -> np.ndarray:
  """Colour ramp: t in [0, 1] [S, S] -> [S, S, 3] between c1 and c2."""
  return c1 * (1 - t[:, :, None]) + c2 * t[:, :, None]


def _procedural(spec: Spec, size: int, rng: np.random.Generator) -> np.ndarray:
  p = spec.params
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size  # [S, S] in [0, 1)
  angle = p["angle"] + rng.normal(0, 0.03)
  u = xx * math.cos(angle) + yy * math.sin(angle)  # coordinates rotated by the category's angle
  v = -xx * math.sin(angle) + yy * math.cos(angle)
  f = spec.family
  if f == "grating":
    t = 0.5 + 0.5 * np.sin(2 * math.pi * (p["freq"] * rng.uniform(0.97, 1.03) * u + rng.random()))
  elif f == "waves":
    shift = p["wobble"] * np.sin(2 * math.pi * (p["wfreq"] * v + rng.random()))
    t = (np.sin(2 * math.pi * p["freq"] * (u + shift) + 2 * math.pi * rng.random()) > 0).astype(np.float32)
  elif f == "stone":
    n = fractal(size, size, p["res"], p["octaves"], rng)
    t = np.abs(n) if p["veins"] else 0.5 + 0.5 * n
    t = np.clip((t - t.min()) / (np.ptp(t) + 1e-6), 0, 1)
  elif f in ("grid", "dots", "checkers"):
    period = p["period"] * rng.uniform(0.98, 1.02)
    fu, fv = (u / period + rng.random()) % 1.0, (v / period + rng.random()) % 1.0
    if f == "grid":
      t = ((fu < p["width"]) | (fv < p["width"])).astype(np.float32)
    elif f == "dots":
      t = (((fu - 0.5) ** 2 + (fv - 0.5) ** 2) < (p["width"] * 1.4) ** 2).astype(np.float32)
    else:
      t = ((fu < 0.5) ^ (fv < 0.5)).astype(np.float32)
  else:  # disc: a centred round part with an inner ring, on a plain background
    cy, cx = 0.5 + rng.normal(0, 0.01, 2)
    r = np.hypot(yy - cy, xx - cx) / (p["radius"] * rng.uniform(0.97, 1.03))
    t = (r < 1).astype(np.float32) * (0.75 + 0.25 * (np.abs(r - p["ring"]) > 0.06))
  img = _mix(t.astype(np.float32), p["c1"], p["c2"])
  return img


def render(spec: Spec, size: int, rng: np.random.Generator) -> np.ndarray:
  """One normal image of the category `spec`: float32 [size, size, 3] in [0, 1]."""
  if spec.family in PHOTO_FAMILIES:
    img = _photo_crop(spec, size, rng)
  else:
    img = _procedural(spec, size, rng)
  # Per-image lighting: gain and offset jitter, then mild sensor noise.
  img = img * np.float32(rng.uniform(0.95, 1.05)) + np.float32(rng.uniform(-0.02, 0.02))
  img = img + 0.01 * rng.standard_normal(img.shape, dtype=np.float32)
  if spec.gray:
    img = np.repeat(img.mean(axis=2, keepdims=True), 3, axis=2)
  return np.clip(img, 0, 1).astype(np.float32)


def foreign(size: int, rng: np.random.Generator) -> np.ndarray:
  """A texture from outside every category (DRAEM's foreign source): a photo crop or random stone."""
  if rng.random() < 0.6:
    name = FOREIGN_PHOTOS[int(rng.integers(len(FOREIGN_PHOTOS)))]
    return _photo_crop(Spec(name, False, {"scale": rng.uniform(0.2, 0.5)}), size, rng, name)
  return _procedural(make_spec("stone", rng), size, rng)
