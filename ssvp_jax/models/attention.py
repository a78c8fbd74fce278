"""The attention core of both backbones: `jax.nn.dot_product_attention`, except on CPU.

On GPU/TPU `jax.nn.dot_product_attention` lets XLA pick its fused kernels (cuDNN flash
attention on NVIDIA). On CPU in jax 0.10.2 it lowers to batched dots over [B, H] and a
softmax over the whole [B, H, T, S] logits; at ViT-L/14 518 px (1370 tokens) that made
attention most of the gap to PyTorch's flash kernel (measured, docs/scaling.md). The "per_head"
form maps over the B*H heads with `lax.map` (one small loop, not an unrolled graph): per head two
plain 2-D matmuls, which XLA's CPU runtime runs multithreaded, with the [T, S] logits small enough
to stay in cache, and the softmax normalisation applied to the [T, Dh] output instead of the
[T, S] probabilities. Several times faster than the default there (same page).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "per_head")


def default_implementation(is_causal: bool = False) -> str:
  """"per_head" for non-causal attention on the CPU backend, "xla" otherwise."""
  return "per_head" if jax.default_backend() == "cpu" and not is_causal else "xla"


def _one_head(qkv: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
  q, k, v = qkv  # [T, Dh], [S, Dh], [S, Dh]
  scale = jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
  logits = jnp.dot(q * scale, k.T, preferred_element_type=jnp.float32)  # [T, S], float32 as in jax.nn
  e = jnp.exp(logits - logits.max(axis=-1, keepdims=True))
  out = jnp.dot(e.astype(v.dtype), v, preferred_element_type=jnp.float32)  # [T, Dh]
  return (out / e.sum(axis=-1, keepdims=True)).astype(q.dtype)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, is_causal: bool = False,
                          implementation: str | None = None) -> jax.Array:
  """Softmax(q k^T / sqrt(Dh)) v for q [B, T, H, Dh], k and v [B, S, H, Dh] -> [B, T, H, Dh].

  Softmax statistics in float32 whatever the input dtype. `implementation`: None picks
  `default_implementation`; "xla" is `jax.nn.dot_product_attention`; "per_head" (no causal
  mask) is the CPU form described in the module docstring.
  """
  impl = implementation or default_implementation(is_causal)
  if impl == "xla":
    return jax.nn.dot_product_attention(q, k, v, is_causal=is_causal)
  if impl != "per_head":
    raise ValueError(f"attention implementation {impl!r} is not one of {IMPLEMENTATIONS}")
  if is_causal:
    raise ValueError("the per_head attention has no causal mask: use implementation='xla'")
  b, t, h, d = q.shape
  heads = lambda x: x.transpose(0, 2, 1, 3).reshape(b * h, x.shape[1], x.shape[3])  # [B*H, T, Dh]
  out = jax.lax.map(_one_head, (heads(q), heads(k), heads(v)))  # [B*H, T, Dh]
  return out.reshape(b, h, t, v.shape[-1]).transpose(0, 2, 1, 3)
