"""DINOv3 ViT in Flax NNX against transformers' PyTorch DINOv3ViTModel (random weights, eval mode)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import DINOv3ViTConfig, DINOv3ViTModel
from transformers.models.dinov3_vit.modeling_dinov3_vit import DINOv3ViTRopePositionEmbedding

from convert.dinov3 import hf_config, hf_to_flax
from helpers.hf_dinov3 import CONFIGS, SIZES, random_hf_model
from helpers.vit import TOL, hf_state, images, max_diff, torch_outputs
from ssvp_jax.models import bundle, dinov3

# facebook/dinov3-vitl16-pretrain-lvd1689m config.json (architecture fields).
VITL16_HF = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                 patch_size=16, num_channels=3, num_register_tokens=4, hidden_act="gelu", layer_norm_eps=1e-5,
                 layerscale_value=1.0, use_gated_mlp=False, rope_theta=100.0, query_bias=True, key_bias=False,
                 value_bias=True, proj_bias=True, mlp_bias=True, image_size=224)


def flax_from_hf(model: DINOv3ViTModel) -> dinov3.DINOv3:
  cfg = hf_config(model.config.to_dict())
  flax_model = dinov3.DINOv3(cfg, rngs=nnx.Rngs(1))
  bundle.assign_params(flax_model, hf_to_flax(hf_state(model), cfg))
  return flax_model


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parity_with_transformers(name):
  hf = random_hf_model(name)
  model = flax_from_hf(hf)
  cfg = model.cfg
  taps = tuple(range(cfg.num_layers + 1))  # 0 = embeddings, then every block
  mid = cfg.num_layers // 2

  @nnx.jit  # as it will run; eager execution is checked in test_load_bundle
  def encode(m, x):
    out = m.encode_image(x, layers=taps)
    return out, m.patch_tokens(out.hidden_states[mid])  # taps[mid] == mid

  for shape in SIZES[name]:
    x = images(shape)
    ref_hidden, ref_last = torch_outputs(hf, x)
    out, patches = encode(model, x)
    assert len(out.hidden_states) == len(taps)
    n_tokens = 1 + cfg.num_register_tokens + (shape[0] // cfg.patch_size) * (shape[1] // cfg.patch_size)
    assert out.last_hidden_state.shape == (2, n_tokens, cfg.hidden_size)
    for l, h in zip(taps, out.hidden_states):
      assert max_diff(h, ref_hidden[l]) <= TOL, (name, shape, l)
    assert max_diff(out.last_hidden_state, ref_last) <= TOL, (name, shape)
    # SSVP's local tokens of a middle layer: final norm, CLS and registers dropped.
    with torch.no_grad():
      ref_patches = hf.norm(torch.from_numpy(ref_hidden[mid])).numpy()[:, cfg.num_prefix_tokens:]
    assert max_diff(patches, ref_patches) <= TOL
  # The final layer's patch tokens are the tail of last_hidden_state.
  np.testing.assert_allclose(model.patch_tokens(out.hidden_states[-1]),
                             out.last_hidden_state[:, cfg.num_prefix_tokens:], atol=1e-6)


def test_rope_tables_match_transformers():
  cfg = DINOv3ViTConfig(**CONFIGS["B"])
  rope = DINOv3ViTRopePositionEmbedding(cfg).eval()
  with torch.no_grad():
    cos, sin = rope(torch.zeros(1, 3, 7 * 8, 5 * 8))
  my_sin, my_cos = dinov3.rope_tables(7, 5, 24, 100.0)
  assert my_sin.shape == (35, 24)
  np.testing.assert_allclose(my_sin, sin.numpy(), atol=1e-6)
  np.testing.assert_allclose(my_cos, cos.numpy(), atol=1e-6)


def test_vitl16_preset_is_the_published_config():
  assert hf_config(VITL16_HF) == dinov3.DINOv3Config.vitl16()


def test_vitl16_param_count_matches_transformers():
  with torch.device("meta"):
    hf = DINOv3ViTModel(DINOv3ViTConfig(**VITL16_HF))
  n_hf = sum(p.numel() for p in hf.parameters())
  # We drop only mask_token ([1, 1, 1024]; iBOT training only).
  assert dinov3.param_count(dinov3.DINOv3Config.vitl16()) == n_hf - 1024
  assert 300e6 < n_hf < 310e6


def test_config_round_trip_and_validation():
  cfg = dinov3.DINOv3Config.tiny()
  assert dinov3.DINOv3Config.from_dict(cfg.to_dict()) == cfg
  with pytest.raises(ValueError, match="unknown DINOv3Config fields: widht"):
    dinov3.DINOv3Config.from_dict({**cfg.to_dict(), "widht": 3})
  with pytest.raises(ValueError, match="divisible by 4"):
    dinov3.DINOv3Config(hidden_size=60, num_heads=6)  # head_dim 10
  with pytest.raises(ValueError, match="not divisible by num_heads"):
    dinov3.DINOv3Config(hidden_size=60, num_heads=7)
  with pytest.raises(ValueError, match="hidden_act"):
    dinov3.DINOv3Config(hidden_act="relu")


def test_bad_inputs_are_named():
  model = dinov3.DINOv3(dinov3.DINOv3Config.tiny(), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="18x16 is not divisible by the patch size 4"):
    model.encode_image(images((18, 16)))
  with pytest.raises(ValueError, match=r"layers \[4\] out of range"):
    model.encode_image(images((16, 16)), layers=(1, 4))
  with pytest.raises(ValueError, match="1 channels"):
    model.encode_image(np.zeros((1, 16, 16, 1), np.float32))


def test_load_bundle(tmp_path):
  hf = random_hf_model("C", seed=7)
  cfg = hf_config(hf.config.to_dict())
  flat = hf_to_flax(hf_state(hf), cfg)
  bundle.save_bundle(str(tmp_path), "dinov3", cfg.to_dict(), flat)
  model = dinov3.load(str(tmp_path))
  assert model.cfg == cfg
  x = images((12, 16), batch=1)
  ref_hidden, ref_last = torch_outputs(hf, x)
  out = model(x, layers=(2, 1))  # eager; taps come back in the order asked
  assert max_diff(out.hidden_states[0], ref_hidden[2]) <= TOL
  assert max_diff(out.hidden_states[1], ref_hidden[1]) <= TOL
  assert max_diff(out.last_hidden_state, ref_last) <= TOL
  # Compute dtype is passed down (for a later bf16 run): same result to bf16 precision.
  low = nnx.jit(lambda m, x: m(x, layers=(1,)))(dinov3.load(str(tmp_path), dtype=jnp.bfloat16), x)
  assert low.last_hidden_state.dtype == jnp.bfloat16
  assert max_diff(low.last_hidden_state.astype(jnp.float32), ref_last) < 0.1 * np.abs(ref_last).max()
  # Strict: a bundle with a missing weight is refused, naming the folder and the key.
  flat.pop("layers.1.mlp.down.kernel")
  bundle.save_bundle(str(tmp_path / "bad"), "dinov3", cfg.to_dict(), flat)
  with pytest.raises(bundle.WeightLoadError, match=r"bad does not fit the model:\n  missing keys \(1\): "
                                                   r"layers.1.mlp.down.kernel"):
    dinov3.load(str(tmp_path / "bad"))
