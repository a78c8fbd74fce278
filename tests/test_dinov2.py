"""DINOv2 ViT in Flax NNX against transformers' Dinov2Model / Dinov2WithRegistersModel (random weights, eval mode)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

from convert.dinov2 import hf_config, hf_to_flax
from helpers.hf_dinov2 import CONFIGS, SIZES, random_hf_model
from helpers.vit import TOL, hf_state, images, max_diff, torch_outputs
from ssvp_jax.models import bundle, dinov2

# facebook/dinov2-large and facebook/dinov2-with-registers-giant config.json (architecture fields).
VITL14_HF = dict(model_type="dinov2", hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4,
                 patch_size=14, image_size=518, hidden_act="gelu", layer_norm_eps=1e-6, layerscale_value=1.0,
                 qkv_bias=True, use_swiglu_ffn=False, num_channels=3)
VITG14_REG_HF = dict(model_type="dinov2_with_registers", hidden_size=1536, num_hidden_layers=40,
                     num_attention_heads=24, mlp_ratio=4, patch_size=14, image_size=518, hidden_act="gelu",
                     layer_norm_eps=1e-6, layerscale_value=1.0, qkv_bias=True, use_swiglu_ffn=True,
                     num_register_tokens=4, num_channels=3)


def flax_from_hf(model) -> dinov2.DINOv2:
  cfg = hf_config(model.config.to_dict())
  flax_model = dinov2.DINOv2(cfg, rngs=nnx.Rngs(1))
  bundle.assign_params(flax_model, hf_to_flax(hf_state(model), cfg))
  return flax_model


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parity_with_transformers(name):
  hf = random_hf_model(name)
  model = flax_from_hf(hf)
  cfg = model.cfg
  assert cfg.pos_antialias == (CONFIGS[name][0] == "registers")
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
    with torch.no_grad():  # SSVP's local tokens of a middle layer: final norm, CLS and registers dropped
      ref_patches = hf.layernorm(torch.from_numpy(ref_hidden[mid])).numpy()[:, cfg.num_prefix_tokens:]
    assert max_diff(patches, ref_patches) <= TOL
  np.testing.assert_allclose(model.patch_tokens(out.hidden_states[-1]),
                             out.last_hidden_state[:, cfg.num_prefix_tokens:], atol=1e-6)


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("size_in,size_out", [(5, 3), (5, 9), (37, 14), (37, 42), (4, 4), (7, 2), (3, 8)])
def test_resize_matrices_match_torch(size_in, size_out, antialias):
  # Resizing the rows of an identity image (its width kept) gives the matrix itself.
  eye = torch.eye(size_in, dtype=torch.float64)[None, None]  # [1, 1, in, in]
  ref = torch.nn.functional.interpolate(eye, size=(size_out, size_in), mode="bicubic", align_corners=False,
                                        antialias=antialias)[0, 0].numpy()
  np.testing.assert_allclose(dinov2.resize_matrix(size_in, size_out, antialias), ref, atol=1e-12)


def test_pos_table_resize_is_transformers(name="D"):
  """The resized table alone, against transformers' interpolate_pos_encoding (with registers: antialiased)."""
  hf = random_hf_model(name)
  model = flax_from_hf(hf)
  for h, w in [(14, 14), (49, 21), (70, 35)]:
    with torch.no_grad():
      ref = hf.embeddings.interpolate_pos_encoding(torch.zeros(1, 1 + (h // 7) * (w // 7), 36), h, w)[0].numpy()
    got = dinov2.resize_pos_table(model.pos_embed[...], (h // 7, w // 7), 5, antialias=True)
    assert max_diff(got, ref) <= 1e-6


@pytest.mark.parametrize("preset,hf_fields,hf_classes", [
    ("vitl14", VITL14_HF, (Dinov2Config, Dinov2Model)),
    ("vitg14", VITG14_REG_HF, (Dinov2WithRegistersConfig, Dinov2WithRegistersModel))])
def test_presets_are_the_published_configs(preset, hf_fields, hf_classes):
  registers = hf_fields["model_type"] == "dinov2_with_registers"
  cfg = getattr(dinov2.DINOv2Config, preset)(registers=registers)
  assert hf_config(hf_fields) == cfg
  # Parameter count at two blocks (every block is alike; 40 abstract ViT-g blocks take seconds).
  config_cls, model_cls = hf_classes
  with torch.device("meta"):
    hf = model_cls(config_cls(**{**hf_fields, "num_hidden_layers": 2}))
  n_hf = sum(p.numel() for p in hf.parameters())
  # We drop only mask_token (iBOT training).
  assert dinov2.param_count(dataclasses.replace(cfg, num_layers=2)) == n_hf - cfg.hidden_size


def test_all_sizes_and_random_presets():
  widths = {"vits14": 384, "vitb14": 768, "vitl14": 1024, "vitg14": 1536}
  for name, width in widths.items():
    for registers in (False, True):
      cfg = getattr(dinov2.DINOv2Config, name)(registers=registers)
      assert (cfg.hidden_size, cfg.head_dim, cfg.pos_grid, cfg.num_register_tokens) == \
          (width, 64, 37, 4 if registers else 0)
      assert cfg.use_gated_mlp == (name == "vitg14") and cfg.pos_antialias == registers
  # configs/tiny.py's and configs/demo.py's token grids at the presets' native sizes.
  assert dinov2.PRESETS["tiny"]().pos_grid == 4 and dinov2.PRESETS["demo"]().pos_grid == 14

  def local_tokens(x):
    model = dinov2.DINOv2(dinov2.PRESETS["tiny"](), rngs=nnx.Rngs(0))
    return model.patch_tokens(model.encode_image(x, layers=(1, 2)).hidden_states[1])

  assert jax.eval_shape(local_tokens, images((16, 16))).shape == (2, 16, 32)


def test_config_round_trip_and_validation():
  cfg = dinov2.DINOv2Config.vitg14(registers=True)
  assert dinov2.DINOv2Config.from_dict(cfg.to_dict()) == cfg
  with pytest.raises(ValueError, match="unknown DINOv2Config fields: widht"):
    dinov2.DINOv2Config.from_dict({**cfg.to_dict(), "widht": 3})
  with pytest.raises(ValueError, match="not divisible by num_heads"):
    dinov2.DINOv2Config(hidden_size=60, num_heads=7)
  with pytest.raises(ValueError, match="hidden_act"):
    dinov2.DINOv2Config(hidden_act="relu")
  with pytest.raises(ValueError, match="SwiGLU: hidden_act must be 'silu'"):
    dinov2.DINOv2Config(use_gated_mlp=True, hidden_act="gelu")


def test_bad_inputs_are_named():
  model = dinov2.DINOv2(dinov2.PRESETS["tiny"](), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="18x16 is not divisible by the patch size 4"):
    model.encode_image(images((18, 16)))
  with pytest.raises(ValueError, match=r"layers \[3\] out of range"):
    model.encode_image(images((16, 16)), layers=(1, 3))
  with pytest.raises(ValueError, match="1 channels"):
    model.encode_image(np.zeros((1, 16, 16, 1), np.float32))


def test_load_bundle(tmp_path):
  hf = random_hf_model("B", seed=7)
  cfg = hf_config(hf.config.to_dict())
  flat = hf_to_flax(hf_state(hf), cfg)
  bundle.save_bundle(str(tmp_path), "dinov2", cfg.to_dict(), flat)
  model = dinov2.load(str(tmp_path))
  assert model.cfg == cfg
  x = images((24, 48), batch=1)
  ref_hidden, ref_last = torch_outputs(hf, x)
  out = model(x, layers=(2, 1))  # eager; taps come back in the order asked
  assert max_diff(out.hidden_states[0], ref_hidden[2]) <= TOL
  assert max_diff(out.hidden_states[1], ref_hidden[1]) <= TOL
  assert max_diff(out.last_hidden_state, ref_last) <= TOL
  # Compute dtype is passed down: same result to bf16 precision.
  low = nnx.jit(lambda m, x: m(x, layers=(1,)))(dinov2.load(str(tmp_path), dtype=jnp.bfloat16), x)
  assert low.last_hidden_state.dtype == jnp.bfloat16
  assert max_diff(low.last_hidden_state.astype(jnp.float32), ref_last) < 0.1 * np.abs(ref_last).max()
  # Strict: a bundle with a missing weight is refused, naming the folder and the key.
  flat.pop("pos_embed")
  bundle.save_bundle(str(tmp_path / "bad"), "dinov2", cfg.to_dict(), flat)
  with pytest.raises(bundle.WeightLoadError, match=r"bad does not fit the model:\n  missing keys \(1\): pos_embed"):
    dinov2.load(str(tmp_path / "bad"))
  with pytest.raises(ValueError, match=r"bundle holds model 'dinov2', expected 'dinov3'"):
    bundle.read_bundle(str(tmp_path), "dinov3")
