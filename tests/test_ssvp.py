"""The assembled model: full-size construction without allocation, ablation switches, frozen split."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers.tiny import load_config
from ssvp_jax.models import clip as clip_lib
from ssvp_jax.models import dinov3 as dinov3_lib
from ssvp_jax.models.ssvp import FROZEN, SSVP, TRAINABLE

def count(module, filt):
  return sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(module, filt)))


def abstract_model(clip_cfg, dino_cfg, layers=(6, 12, 18, 24), **overrides):
  """`overrides`: {"section.key": value} of the head sections."""
  c = load_config("mvtec")
  for key, value in overrides.items():
    section, name = key.split(".")
    c[section][name] = value
  c.backbones.semantic.layers = c.backbones.structural.layers = layers
  return nnx.eval_shape(lambda: SSVP(
      clip_lib.CLIP(clip_cfg, rngs=nnx.Rngs(0)), dinov3_lib.DINOv3(dino_cfg, rngs=nnx.Rngs(0)), c, rngs=nnx.Rngs(0)))


def test_full_size_construction_and_trainable_count():
  model = abstract_model(clip_lib.vit_l14_336(), dinov3_lib.DINOv3Config.vitl16())
  frozen, trainable = count(model, FROZEN), count(model, TRAINABLE)
  assert frozen == 427_944_192 + 303_128_576  # CLIP ViT-L/14-336 + DINOv3 ViT-L/16
  parts = sum(count(getattr(model, name), nnx.Param) for name in ("prompts", "hsvs", "vcpg", "vtam"))
  assert trainable == parts
  # Eq. 6 by hand: 5 shared background tokens + 6 prompts x 5 state tokens, 768-d text width.
  assert count(model.prompts, nnx.Param) == (5 + 6 * 5) * 768
  # The four taps get a 1024 -> 768 map each (D3), bias-free.
  assert count(model.hsvs.clip_maps, nnx.Param) == 4 * 1024 * 768
  print(f"full-size SSVP: {trainable:,} trainable, {frozen:,} frozen parameters")
  # D8: 8 latent tokens of 16 make W_K 16x128 and W_V 16x768 (one token of 128: 128x128, 128x768);
  # D7: one learned temperature. 25,086,920 (one latent token, fixed tau) - 100,352 + 1.
  assert count(model.vcpg.w_k, nnx.Param) + count(model.vcpg.w_v, nnx.Param) == 16 * 128 + 16 * 768
  assert count(model.vtam, nnx.Param) - count(model.vtam.scale_gate, nnx.Param) - count(
      model.vtam.spatial_gates, nnx.Param) == 1
  assert trainable == 24_986_570


@pytest.mark.parametrize("switch, part", [({"hsvs.fusion": "concat"}, "hsvs"), ({"vcpg.enabled": False}, "vcpg"),
                                          ({"vtam.gating": False}, "vtam")])
def test_ablation_switches_shrink_their_part(switch, part):
  # Small backbones: the switches act on the heads only.
  clip_cfg = clip_lib.CLIPConfig(
      vision=clip_lib.VisionConfig(image_size=28, patch_size=14, width=16, layers=2, heads=2, mlp_dim=16),
      text=clip_lib.TextConfig(vocab_size=600, context_length=16, width=16, layers=1, heads=2, mlp_dim=16),
      projection_dim=24)
  dino_cfg = dinov3_lib.DINOv3Config(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=16)
  base = abstract_model(clip_cfg, dino_cfg, (1, 2))
  ablated = abstract_model(clip_cfg, dino_cfg, (1, 2), **switch)
  assert count(getattr(ablated, part), nnx.Param) < count(getattr(base, part), nnx.Param)
  others = {"hsvs", "vcpg", "vtam", "prompts"} - {part}
  assert all(count(getattr(ablated, o), nnx.Param) == count(getattr(base, o), nnx.Param) for o in others)


def test_features_are_frozen_and_grids_must_agree():
  c = load_config("tiny")
  from ssvp_jax.build import build_model
  model, _ = build_model(c)
  sem, struct = c.backbones.semantic.image_size, c.backbones.structural.image_size
  clip_x = jnp.ones((2, sem, sem, 3))
  dino_x = jnp.ones((2, struct, struct, 3))
  feats = model.features(clip_x, dino_x)
  assert [f.shape for f in feats.semantic_local] == [(2, 16, 36)] * 2
  assert [f.shape for f in feats.structural_local] == [(2, 16, 32)] * 2
  assert feats.semantic_global.shape == (2, 20) and feats.structural_global.shape == (2, 32)
  grads = nnx.grad(lambda m: sum(jnp.sum(f) for f in jax.tree.leaves(m.features(clip_x, dino_x))))(model)
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(nnx.state(grads, nnx.Param)))
  with pytest.raises(ValueError, match="same grid"):
    model.features(clip_x, jnp.ones((2, 20, 20, 3)))
