"""Mixed precision in the backbones: dtype=bfloat16 compute with float32 parameters.

Tolerance: bfloat16 keeps 8 significant bits (unit roundoff 2^-8 = 0.4%). Every matmul
output and every residual add is rounded once, so after a few blocks the relative
(Frobenius) error of a tapped layer is a few roundoffs; 3% allows about 8 of them and
still fails if a block were skipped, mis-scaled or run on garbage (errors of order 100%).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ssvp_jax.models import clip, dinov3

REL_TOL = 3e-2


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _param_dtypes(model) -> set:
  return {v.dtype for v in jax.tree.leaves(nnx.state(model, nnx.Param))}


def _images(size: int) -> jnp.ndarray:
  return jnp.asarray(np.random.default_rng(0).standard_normal((2, size, size, 3)), jnp.float32)


def test_clip_bf16_close_to_float32():
  cfg = clip.tiny()
  f32 = clip.CLIP(cfg, rngs=nnx.Rngs(0))
  bf16 = clip.CLIP(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))  # same seed: the same parameters
  assert _param_dtypes(bf16) == {jnp.dtype(jnp.float32)}
  x = _images(42)  # not the native 28 px: the position table is resized too
  taps, vv = (1, 2, 4), (3, 4)
  run = nnx.jit(lambda m, x: m.encode_image(x, layers=taps, value_value_layers=vv, project_tokens=True))
  ref, out = run(f32, x), run(bf16, x)
  for r, o in zip(ref.hidden_states + ref.projected + (ref.image_embeds,),
                  out.hidden_states + out.projected + (out.image_embeds,)):
    assert o.dtype == jnp.bfloat16
    err = _rel(o, r)
    assert 0 < err < REL_TOL, err  # > 0: the computation really ran in bfloat16


@pytest.mark.parametrize("gated", [False, True])
def test_dinov3_bf16_close_to_float32(gated):
  cfg = dinov3.DINOv3Config.tiny()
  if gated:
    cfg = dinov3.DINOv3Config(**{**cfg.to_dict(), "use_gated_mlp": True, "hidden_act": "silu"})
  f32 = dinov3.DINOv3(cfg, rngs=nnx.Rngs(0))
  bf16 = dinov3.DINOv3(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  assert _param_dtypes(bf16) == {jnp.dtype(jnp.float32)}
  x = _images(20)
  run = nnx.jit(lambda m, x: m.encode_image(x, layers=(1, 2, 3)))
  ref, out = run(f32, x), run(bf16, x)
  for r, o in zip(ref.hidden_states + (ref.last_hidden_state,), out.hidden_states + (out.last_hidden_state,)):
    assert o.dtype == jnp.bfloat16
    err = _rel(o, r)
    assert 0 < err < REL_TOL, err
  # SSVP's local tokens go through the final norm: in float32 statistics, still close.
  tokens = nnx.jit(lambda m, h: m.patch_tokens(h))
  err = _rel(tokens(bf16, out.hidden_states[-1]), tokens(f32, ref.hidden_states[-1]))
  assert err < REL_TOL, err
