"""The backbones' dense layers: `nnx.Linear` whose low-precision matmuls accumulate in float32.

XLA's CPU backend runs a bfloat16 x bfloat16 -> bfloat16 matmul on a slow path but bfloat16 x
bfloat16 -> float32 on its fast one (AMX where the CPU has it): asking for float32 accumulation and
casting back makes a bf16 ViT forward faster on such CPUs (measured, docs/scaling.md "bfloat16 on
this CPU"), while activations stay bfloat16. GPU matmul libraries accumulate
bf16 products in float32 anyway, so elsewhere the dot is left exactly as `nnx.Linear` writes it,
and float32 inputs are never touched. Parameter names and shapes are `nnx.Linear`'s.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers, precision=None, preferred_element_type=None,
                **kwargs) -> jax.Array:
  """`jax.lax.dot_general`; on CPU, low-precision operands accumulate in float32 and the result is
  cast back to the operands' dtype."""
  low = lhs.dtype in (jnp.bfloat16, jnp.float16) and lhs.dtype == rhs.dtype
  if not low or preferred_element_type is not None or jax.default_backend() != "cpu":
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type, **kwargs)
  out = jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                            preferred_element_type=jnp.float32, **kwargs)
  return out.astype(lhs.dtype)


def Linear(in_features: int, out_features: int, **kwargs) -> nnx.Linear:  # noqa: N802 (a layer constructor)
  """`nnx.Linear` with the `dot_general` above."""
  return nnx.Linear(in_features, out_features, dot_general=dot_general, **kwargs)
