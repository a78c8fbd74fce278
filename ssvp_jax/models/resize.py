"""Resizing a learned position table the way PyTorch's `F.interpolate` does.

transformers, open_clip and AnomalyCLIP resize CLIP's position table with
`torch.nn.functional.interpolate(..., align_corners=False)`. `jax.image.resize`
differs from it in two ways that matter here: its cubic kernel uses a = -0.5
(PyTorch: a = -0.75) and it antialiases when downsampling (PyTorch does not,
unless asked). So the resize is written out as PyTorch computes it: separable
interpolation matrices, built in numpy from static shapes, applied with einsum.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

METHODS = ("bilinear", "bicubic")
_CUBIC_A = -0.75  # PyTorch's bicubic coefficient (upsample_bicubic2d)


def _cubic_weights(t: np.ndarray) -> np.ndarray:
  """Keys' cubic convolution weights of taps i-1, i, i+1, i+2 at fraction t; [..., 4]."""
  a = _CUBIC_A

  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


@functools.lru_cache(maxsize=64)
def interp_matrix(in_size: int, out_size: int, method: str) -> np.ndarray:
  """[out_size, in_size] matrix M with resized = M @ x along one axis.

  Follows PyTorch's `align_corners=False` source index, (dst + 0.5) * in / out - 0.5;
  bilinear clamps negative sources to 0, bicubic does not but clamps the four
  taps to the border (replicate padding). No antialiasing.
  """
  if method not in METHODS:
    raise ValueError(f"unknown interpolation {method!r}; expected one of {METHODS}")
  scale = in_size / out_size
  src = (np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5
  m = np.zeros((out_size, in_size), dtype=np.float64)
  rows = np.arange(out_size)
  if method == "bilinear":
    src = np.maximum(src, 0.0)
    i0 = np.floor(src).astype(np.int64)
    lam = src - i0
    i1 = np.minimum(i0 + 1, in_size - 1)
    np.add.at(m, (rows, np.minimum(i0, in_size - 1)), 1.0 - lam)
    np.add.at(m, (rows, i1), lam)
  else:
    i0 = np.floor(src).astype(np.int64)
    w = _cubic_weights(src - i0)  # [out, 4]
    for tap in range(4):
      np.add.at(m, (rows, np.clip(i0 - 1 + tap, 0, in_size - 1)), w[:, tap])
  m.setflags(write=False)
  return m


def resize_2d(x: jax.Array, out_hw: tuple[int, int], method: str) -> jax.Array:
  """Resizes [h, w, C] to [out_h, out_w, C] as `F.interpolate(align_corners=False)` does."""
  h, w = x.shape[:2]
  out_h, out_w = out_hw
  if (h, w) == (out_h, out_w):
    return x
  mh = jnp.asarray(interp_matrix(h, out_h, method), dtype=x.dtype)  # [H', h]
  mw = jnp.asarray(interp_matrix(w, out_w, method), dtype=x.dtype)  # [W', w]
  return jnp.einsum("Yy,yxc,Xx->YXc", mh, x, mw, precision=jax.lax.Precision.HIGHEST)


def resize_pos_table(table: jax.Array, grid: tuple[int, int], method: str) -> jax.Array:
  """Resizes a CLIP position table [1 + n*n, D] to [1 + gh*gw, D]; the CLS entry is kept.

  Patch positions are laid out row-major over a square n x n grid, as in
  OpenAI's and transformers' CLIP.
  """
  n_patch = table.shape[0] - 1
  side = int(round(n_patch ** 0.5))
  if side * side != n_patch:
    raise ValueError(f"position table holds {n_patch} patch entries, not a square grid")
  if tuple(grid) == (side, side):
    return table
  patches = resize_2d(table[1:].reshape(side, side, -1), grid, method)
  return jnp.concatenate([table[:1], patches.reshape(grid[0] * grid[1], -1)], axis=0)
