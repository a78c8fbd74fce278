"""Test-time anomaly maps (SPEC section 4): token grid -> input size, bilinear, then Gaussian smoothing."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=16)
def gaussian_matrix(size: int, sigma: float, truncate: float = 4.0) -> np.ndarray:
  """[size, size] matrix G with G @ x == scipy.ndimage.gaussian_filter1d(x, sigma, mode="reflect").

  The kernel has radius int(truncate * sigma + 0.5), as scipy's; the half-sample symmetric
  boundary is folded into the matrix, so smoothing a map is two small matmuls.
  """
  if sigma <= 0:
    return np.eye(size, dtype=np.float32)
  radius = int(truncate * sigma + 0.5)
  offsets = np.arange(-radius, radius + 1)
  kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
  kernel /= kernel.sum()
  g = np.zeros((size, size), np.float64)
  rows = np.arange(size)
  for off, k in zip(offsets, kernel):
    j = rows + off
    # Reflect about the edges ("d c b a | a b c d"), repeatedly if the kernel is wider than the map.
    period = 2 * size
    j = np.mod(j, period)
    j = np.where(j >= size, period - 1 - j, j)
    np.add.at(g, (rows, j), k)
  return g.astype(np.float32)


@functools.lru_cache(maxsize=16)
def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out_size, in_size] matrix U with U @ x == jax.image.resize(x, (out_size,), "bilinear").

  Half-pixel centres (PyTorch align_corners=False); taps outside the input are dropped and the rest
  renormalised, which clamps at the edges; when reducing, the triangle widens by the scale
  (jax.image.resize's antialiasing). As a matrix, the map upsampling is two small matmuls with any
  batch size, which every exporter can lower (ONNX has no resize with a symbolic batch in jax2onnx).
  """
  scale = out_size / in_size
  widen = max(1.0, 1.0 / scale)
  centres = (np.arange(out_size) + 0.5) / scale - 0.5  # output pixel centres in input coordinates
  w = np.maximum(0.0, 1.0 - np.abs(np.arange(in_size)[None, :] - centres[:, None]) / widen)
  total = w.sum(axis=1, keepdims=True)
  return (w / np.where(total > 0, total, 1.0)).astype(np.float32)


def upsample(maps: jax.Array, size: int) -> jax.Array:
  """[B, h, w] -> [B, size, size], bilinear with half-pixel centres (PyTorch align_corners=False)."""
  rows = jnp.asarray(bilinear_matrix(maps.shape[1], size))
  cols = jnp.asarray(bilinear_matrix(maps.shape[2], size))
  return jnp.einsum("ij,bjk,lk->bil", rows, maps, cols)


def upsample_probs(prob: jax.Array, size: int) -> jax.Array:
  """[B, h, w] probabilities -> [B, size, size], bilinear on the logits after a clip to [1e-6, 1 - 1e-6]
  (the D20 alternative "clipped": the clip stops the gradient of saturated pixels)."""
  p = jnp.clip(prob, 1e-6, 1 - 1e-6)
  logit = jnp.log(p) - jnp.log1p(-p)
  return jax.nn.sigmoid(upsample(logit, size))


def smooth(maps: jax.Array, sigma: float) -> jax.Array:
  """Gaussian smoothing of [B, S, S] maps (equal to scipy's gaussian_filter, mode "reflect")."""
  if sigma <= 0:
    return maps
  g = jnp.asarray(gaussian_matrix(maps.shape[-1], float(sigma)))
  return jnp.einsum("ij,bjk,lk->bil", g, maps, g)


def postprocess(p_map: jax.Array, size: int, sigma: float) -> jax.Array:
  """P_map on the token grid [B, h, w] -> smoothed map at the input resolution [B, size, size]."""
  return smooth(upsample(p_map, size), sigma)
