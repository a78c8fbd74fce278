"""Layers that the SSVP heads share (HSVS, VCPG, VTAM): the MLP, the LayerNorm epsilon, l2 normalisation.

This module only defines them: each head holds its instances under its own attribute names (`mlp`,
`decoder`, `scale_gate`, ...), so parameter paths, and checkpoints, do not depend on where they are defined.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

LN_EPS = 1e-5  # PyTorch's nn.LayerNorm default, as in both backbones (TRAPS: Flax's is 1e-6).


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """x / ||x|| along the last axis (eps inside the root keeps the gradient finite at 0)."""
  return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + eps)


class MLP(nnx.Module):
  """Dense-GELU-Dense (exact erf GELU, as PyTorch's nn.GELU): the MLP of Eq. 5 (HSVS), of the VCPG decoder
  and of the VTAM scale gate."""

  def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, *, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(in_dim, hidden_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc2 = nnx.Linear(hidden_dim, out_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))
