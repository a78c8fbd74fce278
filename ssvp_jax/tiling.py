"""Tiled scoring of large images: overlapping T x T tiles at the model's resolution, one stitched map.

    python -m ssvp_jax.predict --workdir=runs/demo --images=big.png --out=out --tile=512 --overlap=64

A whole-image resize to the model's input (518 px at full size) shrinks a 12-px defect of a 4000-px
photograph below one pixel. With --tile=T the image is cut into T x T tiles (in original pixels)
whose origins step by T - O (O = --overlap); the last tile of a row or column is moved back so it
ends at the image border, so every pixel is covered and no tile is padded. An image smaller than T
in a dimension uses tiles of its shorter side. Each tile goes through the model exactly as a whole
image does (`Engine.preprocess`, resized to each backbone's input); its map ([S, S], already
upsampled and smoothed) is resized bilinearly back to the tile's T x T pixels.

Blending: the full-resolution map is the weighted mean of the tile maps covering each pixel, with a
separable weight per tile, w(i) = min(1, (i + 0.5) / O, (T - i - 0.5) / O) along each axis (w = 1
when O = 0): it ramps linearly over the outer O pixels of a tile, so in an overlap of width O the two
tiles cross-fade linearly and no seam appears. A pixel covered by one tile gets that tile's value.

Scores: S_local = the maximum of the stitched map, S_global = the largest S_global of any tile (the
most abnormal tile decides), S_final = (1 - gamma) S_global + gamma S_local (Eq. 19, gamma of the
config). The stitched map is smoothed, so its maximum sits below Eq. 18's raw P_map maximum: tiled
scores are on their own scale, and thresholds calibrated on whole images are only a first guess.
With a reference bank on the engine each tile's map is already the fused one (reference.fuse), so
the stitched map and S_local include the bank; `bank_score` is the largest bank score of any tile.
"""

from __future__ import annotations

import math
import time
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from ssvp_jax import inference


def origins(length: int, tile: int, overlap: int) -> list[int]:
  """Start offsets of tiles of side `tile` covering [0, length), stepping by tile - overlap; the last ends
  exactly at `length`."""
  if tile >= length:
    return [0]
  step = tile - overlap
  out = list(range(0, length - tile, step))
  return out + [length - tile]


def window(tile: int, overlap: int) -> np.ndarray:
  """The 1-D blending weight [tile]: min(1, (i + 0.5) / O, (T - i - 0.5) / O); all ones when O = 0."""
  if overlap <= 0:
    return np.ones(tile, np.float32)
  i = np.arange(tile) + 0.5
  return np.minimum(1.0, np.minimum(i, tile - i) / overlap).astype(np.float32)


def check_args(tile: int, overlap: int) -> None:
  if tile < 1:
    raise ValueError(f"--tile must be a positive number of pixels, got {tile}")
  if not 0 <= overlap < tile:
    raise ValueError(f"--overlap must be in [0, --tile), got {overlap} with --tile={tile}")


def score_image(engine: inference.Engine, image: np.ndarray, tile: int, overlap: int, batch_size: int = 8
                ) -> dict[str, np.ndarray | float]:
  """float [H, W, 3] in [0, 1] -> {"map": [H, W] stitched, "score", "s_global", "s_local", "tiles": count}."""
  check_args(tile, overlap)
  h, w = image.shape[:2]
  t = min(tile, h, w)
  ov = min(overlap, t - 1)
  boxes = [(y, x) for y in origins(h, t, ov) for x in origins(w, t, ov)]
  win = window(t, ov)
  weight = win[:, None] * win[None, :]  # [t, t]
  acc = np.zeros((h, w), np.float32)
  total = np.zeros((h, w), np.float32)
  s_global = bank_score = -math.inf
  sc, sd = (v.size for v in engine.views)
  for i in range(0, len(boxes), batch_size):
    chunk = boxes[i:i + batch_size]
    semantic = np.zeros((batch_size, sc, sc, 3), np.float32)  # padded to one compiled shape
    structural = np.zeros((batch_size, sd, sd, 3), np.float32)
    for row, (y, x) in enumerate(chunk):
      semantic[row], structural[row] = engine.preprocess(image[y:y + t, x:x + t])
    res = engine.forward(semantic, structural)
    for row, (y, x) in enumerate(chunk):
      m = inference.resize_hw(res["map"][row], t, t, Image.Resampling.BILINEAR)
      acc[y:y + t, x:x + t] += m * weight
      total[y:y + t, x:x + t] += weight
      s_global = max(s_global, float(res["s_global"][row]))
      if "bank_score" in res:
        bank_score = max(bank_score, float(res["bank_score"][row]))
  amap = acc / total
  gamma = float(engine.config.vtam.gamma)
  s_local = float(amap.max())
  return {"map": amap, "s_global": s_global, "s_local": s_local,
          "score": (1.0 - gamma) * s_global + gamma * s_local, "tiles": len(boxes),
          "bank_score": bank_score if bank_score > -math.inf else math.nan}


def score_files(engine: inference.Engine, paths: Sequence[str], tile: int, overlap: int, batch_size: int = 8,
                keep_image: bool = False) -> Iterator[inference.Scored]:
  """`inference.score_files` with tiling: one `Scored` per path, in order; `map` is [H, W] (full resolution)."""
  check_args(tile, overlap)
  for path in paths:
    t0 = time.perf_counter()
    image, error = inference.read_file(path)
    if error:
      yield inference.Scored(path, error=error, seconds=time.perf_counter() - t0)
      continue
    yield scored(engine, path, image, tile, overlap, batch_size, keep_image, t0)


def scored(engine: inference.Engine, path: str, image: np.ndarray, tile: int, overlap: int, batch_size: int,
           keep_image: bool, t0: float) -> inference.Scored:
  """One decoded image's tiled result as a `Scored` (the overlay image at overlay size when keep_image)."""
  h, w = image.shape[:2]
  res = score_image(engine, image, tile, overlap, batch_size)
  small = inference.overlay_image(image, engine.map_size) if keep_image else None
  return inference.Scored(path, height=h, width=w, score=res["score"], s_global=res["s_global"],
                          s_local=res["s_local"], map=res["map"], image=small, bank_score=res["bank_score"],
                          seconds=time.perf_counter() - t0)
