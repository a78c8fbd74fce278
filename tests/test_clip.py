"""CLIP in Flax NNX against transformers' PyTorch CLIPModel (random weights, odd sizes)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from helpers.hf_clip import (SENTENCES, VOCAB_SIZE, encode_image, encode_text, encode_text_embeds, hf_model, images,
                             jax_model, make_tokenizer, to_torch_images)
from ssvp_jax.models import clip, resize

torch.set_default_dtype(torch.float32)
ATOL = 1e-4


@pytest.fixture(scope="module")
def hf():
  return hf_model(seed=0)


@pytest.fixture(scope="module")
def models(hf):
  return {m: jax_model(hf, m) for m in resize.METHODS}


def _close(ours, ref, atol=ATOL):
  ref = ref.detach().numpy() if isinstance(ref, torch.Tensor) else ref
  np.testing.assert_allclose(np.asarray(ours), ref, rtol=0, atol=atol)


# ----------------------------------------------------------------------------- position-table resize


@pytest.mark.parametrize("method", resize.METHODS)
@pytest.mark.parametrize("src,dst", [((7, 7), (11, 11)), ((24, 24), (37, 37)), ((9, 9), (4, 4)),
                                     ((6, 6), (9, 3)), ((5, 8), (13, 2)), ((4, 4), (4, 4)), ((1, 3), (4, 5))])
def test_resize_matches_torch_interpolate(method, src, dst):
  x = np.random.default_rng(0).normal(size=(*src, 5))
  torch_resize = lambda a: F.interpolate(torch.from_numpy(a.transpose(2, 0, 1))[None], size=dst, mode=method,
                                         align_corners=False)[0].numpy().transpose(1, 2, 0)
  # The same function: in float64 the separable matrices reproduce PyTorch to rounding.
  mh, mw = resize.interp_matrix(src[0], dst[0], method), resize.interp_matrix(src[1], dst[1], method)
  _close(np.einsum("Yy,yxc,Xx->YXc", mh, x, mw), torch_resize(x), atol=1e-12)
  # In float32 PyTorch rounds its cubic coefficients (about 1e-5 on unit-scale values).
  x = x.astype(np.float32)
  _close(resize.resize_2d(jnp.asarray(x), dst, method), torch_resize(x), atol=5e-5)


def test_resize_differs_from_jax_image_resize():
  """Why resize.py exists: jax.image.resize's cubic (a=-0.5, antialiased) is another function."""
  x = np.random.default_rng(0).normal(size=(9, 9, 2)).astype(np.float32)
  ours = resize.resize_2d(jnp.asarray(x), (4, 4), "bicubic")
  assert np.abs(np.asarray(jax.image.resize(x, (4, 4, 2), "cubic")) - np.asarray(ours)).max() > 1e-2


def test_pos_table_keeps_cls():
  table = jnp.asarray(np.random.default_rng(0).normal(size=(1 + 16, 3)), jnp.float32)
  out = resize.resize_pos_table(table, (5, 7), "bicubic")
  assert out.shape == (1 + 35, 3)
  np.testing.assert_array_equal(out[0], table[0])
  assert resize.resize_pos_table(table, (4, 4), "bilinear") is table


# ----------------------------------------------------------------------------- vision parity


def _hf_vision(hf, x, interpolate=True):
  with torch.no_grad():
    out = hf.vision_model(to_torch_images(x), output_hidden_states=True, interpolate_pos_encoding=interpolate)
    return out.hidden_states, hf.visual_projection(out.pooler_output)


@pytest.mark.parametrize("size", [(28, 28), (42, 42), (21, 21), (35, 21), (14, 49)])
def test_vision_parity_bicubic(hf, models, size):
  """Native size, larger, smaller and non-square: transformers interpolates bicubically."""
  x = images(2, *size)
  hidden, embeds = _hf_vision(hf, x, interpolate=size != (28, 28))
  out = encode_image(models["bicubic"], jnp.asarray(x), layers=(1, 2, 3, 4), project_tokens=True)
  for l, h in zip((1, 2, 3, 4), out.hidden_states):
    assert h.shape == (2, 1 + (size[0] // 7) * (size[1] // 7), 60)
    _close(h, hidden[l])
  _close(out.image_embeds, embeds)
  with torch.no_grad():
    for l, p in zip((1, 2, 3, 4), out.projected):
      _close(p, hf.visual_projection(hf.vision_model.post_layernorm(hidden[l])))


@pytest.mark.parametrize("size", [(42, 42), (35, 21)])
def test_vision_parity_bilinear(hf, models, size, monkeypatch):
  """The default mode (AnomalyCLIP's): transformers with F.interpolate forced to bilinear."""
  original = F.interpolate
  monkeypatch.setattr(F, "interpolate", lambda x, size, mode, align_corners: original(
      x, size=size, mode="bilinear", align_corners=align_corners))
  x = images(1, *size, seed=1)
  hidden, embeds = _hf_vision(hf, x)
  out = encode_image(models["bilinear"], jnp.asarray(x), layers=(4, 2))
  _close(out.hidden_states[0], hidden[4])
  _close(out.hidden_states[1], hidden[2])
  _close(out.image_embeds, embeds)


def test_eager_matches_jit(models):
  m = models["bilinear"]
  x = jnp.asarray(images(1, 35, 28))
  kw = dict(layers=(2, 3), value_value_layers=(3, 4), project_tokens=True)
  jitted, eager = encode_image(m, x, **kw), m.encode_image(x, **kw)
  for a, b in zip(jax.tree.leaves(jitted), jax.tree.leaves(eager)):
    _close(a, b, atol=1e-5)


def test_bad_image_inputs(models):
  m = models["bilinear"]
  with pytest.raises(ValueError, match="not divisible by the patch size 7"):
    m.encode_image(jnp.zeros((1, 30, 28, 3)))
  with pytest.raises(ValueError, match=r"layers \[0, 5\] out of range: blocks are numbered 1..4"):
    m.encode_image(jnp.zeros((1, 28, 28, 3)), layers=(0, 2, 5))


# ----------------------------------------------------------------------------- value-value path


def _anomalyclip_reference(hf, x, vv_layers, taps):
  """AnomalyCLIP's dual path (AnomalyCLIP_lib/AnomalyCLIP.py: Attention, ResidualAttentionBlock)
  transcribed on transformers' modules: fused qkv, q = k = v for the side path, out_proj with
  bias, side path without ln_2/MLP, taps read the side path once it has started."""
  vm = hf.vision_model
  with torch.no_grad():
    x_ori = vm.pre_layrnorm(vm.embeddings(to_torch_images(x), interpolate_pos_encoding=True))
    x_vv, out = None, {}
    b, n, c = x_ori.shape
    for l, layer in enumerate(vm.encoder.layers, start=1):
      att = layer.self_attn
      heads = att.num_heads
      if l in vv_layers:
        if x_vv is None:
          x_vv = x_ori.clone()
        w = torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight])
        bias = torch.cat([att.q_proj.bias, att.k_proj.bias, att.v_proj.bias])
        qkv = F.linear(layer.layer_norm1(x_ori), w, bias).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        k = v
        q = k
        attn = ((q @ k.transpose(-2, -1)) * (c // heads) ** -0.5).softmax(dim=-1)
        x_vv = x_vv + att.out_proj((attn @ v).transpose(1, 2).reshape(b, n, c))
      x_ori = layer(x_ori, None)
      if l in taps:
        out[l] = x_ori if x_vv is None else x_vv
    return out


@pytest.mark.parametrize("vv_layers,taps", [((2, 3, 4), (1, 2, 4)), ((3, 4), (4, 3)), ((2, 4), (3, 4))])
def test_value_value_path_matches_anomalyclip(hf, models, vv_layers, taps):
  x = images(2, 35, 21, seed=3)
  ref = _anomalyclip_reference(hf, x, vv_layers, taps)
  out = encode_image(models["bicubic"], jnp.asarray(x), layers=taps, value_value_layers=vv_layers,
                     project_tokens=True)
  plain = encode_image(models["bicubic"], jnp.asarray(x), layers=taps).hidden_states
  for l, h, p in zip(taps, out.hidden_states, plain):
    _close(h, ref[l])
    assert (np.abs(np.asarray(h - p)).max() > 1e-2) == (l >= min(vv_layers))  # the side path is read
  # The ordinary stream (and so the global embedding) is untouched by the side path.
  _close(out.image_embeds, encode_image(models["bicubic"], jnp.asarray(x)).image_embeds, atol=1e-6)
  with torch.no_grad():
    for l, p in zip(taps, out.projected):
      _close(p, hf.visual_projection(hf.vision_model.post_layernorm(ref[l])))


# ----------------------------------------------------------------------------- text parity


@pytest.fixture(scope="module")
def tokenizer():
  return make_tokenizer()


def test_tokenize(tokenizer):
  ids = clip.tokenize(tokenizer, SENTENCES, context_length=16)
  assert ids.shape == (len(SENTENCES), 16) and ids.dtype == np.int32
  eot = VOCAB_SIZE - 1
  assert (ids[:, 0] == VOCAB_SIZE - 2).all() and (ids.argmax(-1) == (ids == eot).argmax(-1)).all()
  assert ids[3, :3].tolist() == [VOCAB_SIZE - 2, eot, 0]  # empty text: SOT EOT, zero padding
  assert ids[4, -1] == eot  # too long: cut, EOT kept last
  assert clip.tokenize(tokenizer, "screw", 16).shape == (1, 16)


def test_text_parity(hf, models, tokenizer):
  ids = clip.tokenize(tokenizer, SENTENCES, context_length=16)
  with torch.no_grad():
    out = hf.text_model(input_ids=torch.from_numpy(ids.astype(np.int64)))
    ref = hf.text_projection(out.pooler_output)
  m = models["bilinear"]
  _close(encode_text(m, jnp.asarray(ids)), ref)
  # Shorter than the context: positions are sliced, pooling still at the EOT.
  _close(encode_text(m, jnp.asarray(ids[1:4, :12])), ref[1:4])


def test_text_embeds_splice(hf, models, tokenizer):
  """A prompt learner's path: learnable vectors spliced between fixed word embeddings."""
  m = models["bilinear"]
  ids = clip.tokenize(tokenizer, ["a damaged nut"], context_length=16)
  eot = ids.argmax(-1)
  words = m.token_embedding(jnp.asarray(ids))  # [1, 16, 36]
  _close(encode_text_embeds(m, words, jnp.asarray(eot)), encode_text(m, jnp.asarray(ids)), atol=1e-6)

  ctx = np.random.default_rng(0).normal(size=(2, 3, 36)).astype(np.float32)
  embeds = np.concatenate([np.repeat(np.asarray(words[:, :1]), 2, 0), ctx,
                           np.repeat(np.asarray(words[:, 1:13]), 2, 0)], axis=1)  # [2, 16, 36]
  eot_index = np.full((2,), eot[0] + 3)
  ours = encode_text_embeds(m, jnp.asarray(embeds), jnp.asarray(eot_index))
  tm = hf.text_model
  with torch.no_grad():
    h = tm.embeddings(inputs_embeds=torch.from_numpy(embeds))
    mask = torch.full((16, 16), float("-inf")).triu(1)[None, None]
    h = tm.final_layer_norm(tm.encoder(inputs_embeds=h, attention_mask=mask).last_hidden_state)
    ref = hf.text_projection(h[torch.arange(2), torch.from_numpy(eot_index)])
  _close(ours, ref)


# ----------------------------------------------------------------------------- config and size


def test_config_round_trip_and_checks():
  cfg = clip.vit_l14_336()
  assert clip.CLIPConfig.from_dict(cfg.to_dict()) == cfg
  assert cfg.replace(pos_interpolation="bicubic").vision.pos_interpolation == "bicubic"
  assert (cfg.vision.grid, cfg.text.heads, cfg.vision.hidden_act) == (24, 12, "quick_gelu")
  with pytest.raises(ValueError, match="width 60 is not divisible by heads 7"):
    clip.VisionConfig(image_size=28, patch_size=7, width=60, layers=1, heads=7, mlp_dim=4)
  with pytest.raises(ValueError, match="pos_interpolation 'nearest'"):
    cfg.replace(pos_interpolation="nearest")
  with pytest.raises(ValueError, match="not a CLIP config"):
    clip.CLIPConfig.from_dict({"vision": {}, "text": {}, "projection_dim": 3})


def test_full_size_parameter_count_matches_transformers():
  """ViT-L/14-336 without allocating: ours == transformers' CLIPModel minus logit_scale (1 scalar);
  the position_ids are buffers, not parameters, on either side."""
  from transformers import CLIPConfig, CLIPModel

  cfg = clip.vit_l14_336()
  v, t = cfg.vision, cfg.text
  hf_cfg = CLIPConfig(
      vision_config=dict(image_size=v.image_size, patch_size=v.patch_size, hidden_size=v.width,
                         num_hidden_layers=v.layers, num_attention_heads=v.heads, intermediate_size=v.mlp_dim),
      text_config=dict(vocab_size=t.vocab_size, max_position_embeddings=t.context_length, hidden_size=t.width,
                       num_hidden_layers=t.layers, num_attention_heads=t.heads, intermediate_size=t.mlp_dim),
      projection_dim=cfg.projection_dim)
  with torch.device("meta"):
    ref = CLIPModel(hf_cfg)
  n_ref = sum(p.numel() for name, p in ref.named_parameters() if name != "logit_scale")
  abstract = nnx.eval_shape(lambda: clip.CLIP(cfg, rngs=nnx.Rngs(0)))
  n_ours = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  assert n_ours == n_ref == 427_944_192


def test_dtype_is_passed_down():
  m = nnx.eval_shape(lambda: clip.CLIP(clip.tiny(), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                                       rngs=nnx.Rngs(0)))
  assert {x.dtype for x in jax.tree.leaves(nnx.state(m, nnx.Param))} == {jnp.dtype(jnp.bfloat16)}
  assert m.vision.blocks[0].attn.q.dtype == jnp.bfloat16


def test_activations_match_torch():
  x = np.linspace(-6, 6, 101, dtype=np.float32)
  t = torch.from_numpy(x)
  _close(clip.activation("gelu", jnp.asarray(x)), F.gelu(t), atol=1e-6)  # exact (erf), not tanh
  _close(clip.activation("quick_gelu", jnp.asarray(x)), t * torch.sigmoid(1.702 * t), atol=1e-6)
