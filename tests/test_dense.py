"""models/dense.py: float32 layers unchanged; bf16 layers accumulate in float32 and stay bf16."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ssvp_jax.models import dense


def test_float32_equals_nnx_linear():
  x = np.random.default_rng(0).standard_normal((3, 5, 64)).astype(np.float32)
  ours, ref = dense.Linear(64, 32, rngs=nnx.Rngs(0)), nnx.Linear(64, 32, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(ours(jnp.asarray(x)), ref(jnp.asarray(x)))
  assert jax.tree.map(jnp.shape, nnx.state(ours)) == jax.tree.map(jnp.shape, nnx.state(ref))


def test_bfloat16_accumulates_in_float32():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((4, 4096)).astype(np.float32)
  layer = dense.Linear(4096, 8, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  y = layer(jnp.asarray(x))
  assert y.dtype == jnp.bfloat16 and layer.kernel[...].dtype == jnp.float32
  # Reference: the same bf16-rounded operands, summed in float64, rounded once to bf16.
  xb = np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64)
  wb = np.asarray(layer.kernel[...].astype(jnp.bfloat16), np.float64)
  exact = xb @ wb + np.asarray(layer.bias[...], np.float64)
  err = np.abs(np.asarray(y, np.float64) - exact) / np.abs(exact).max()
  assert err.max() < 2 ** -7  # one bf16 rounding of the result (plus the bias add), not 4096 of them


def test_bfloat16_dot_asks_for_float32_on_cpu():
  """The point of the module: XLA's CPU bf16 x bf16 -> f32 matmul is the fast one (AMX)."""
  layer = dense.Linear(64, 32, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  hlo = jax.jit(lambda x: layer(x)).lower(jnp.zeros((2, 64), jnp.bfloat16)).as_text()
  dots = [l for l in hlo.splitlines() if "dot_general" in l]
  assert len(dots) == 1 and "-> tensor<2x32xf32>" in dots[0], dots
  plain = jax.jit(lambda x: nnx.Linear(64, 32, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))(x))
  assert "-> tensor<2x32xbf16>" in [l for l in plain.lower(jnp.zeros((2, 64), jnp.bfloat16)).as_text().splitlines()
                                    if "dot_general" in l][0]
