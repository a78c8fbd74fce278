"""The CPU attention form against jax.nn.dot_product_attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssvp_jax.models import attention


def _qkv(b=2, t=13, s=13, h=3, d=8, dtype=jnp.float32, seed=0):
  r = np.random.default_rng(seed)
  return tuple(jnp.asarray(3 * r.standard_normal(shape), dtype) for shape in ((b, t, h, d), (b, s, h, d), (b, s, h, d)))


@pytest.mark.parametrize("t,s", [(13, 13), (5, 11)])
def test_per_head_matches_xla(t, s):
  q, k, v = _qkv(t=t, s=s)
  ref = jax.nn.dot_product_attention(q, k, v)
  out = jax.jit(lambda q, k, v: attention.dot_product_attention(q, k, v, implementation="per_head"))(q, k, v)
  assert out.shape == ref.shape == (2, t, 3, 8)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-6, rtol=1e-5)


def test_per_head_bfloat16_close():
  q, k, v = _qkv(dtype=jnp.bfloat16)
  ref = jax.nn.dot_product_attention(*(x.astype(jnp.float32) for x in (q, k, v)))
  out = attention.dot_product_attention(q, k, v, implementation="per_head")
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), atol=0.05)


def test_choice_and_errors():
  assert attention.default_implementation(is_causal=True) == "xla"
  assert attention.default_implementation() == ("per_head" if jax.default_backend() == "cpu" else "xla")
  q, k, v = _qkv()
  causal = attention.dot_product_attention(q, k, v, is_causal=True)  # delegated to jax.nn
  np.testing.assert_allclose(np.asarray(causal), np.asarray(jax.nn.dot_product_attention(q, k, v, is_causal=True)))
  with pytest.raises(ValueError, match="no causal mask"):
    attention.dot_product_attention(q, k, v, is_causal=True, implementation="per_head")
  with pytest.raises(ValueError, match="not one of"):
    attention.dot_product_attention(q, k, v, implementation="flash")
