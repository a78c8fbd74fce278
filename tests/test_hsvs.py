"""HSVS / ATF (Eqs. 2-5) against a direct numpy transcription, on tiny sizes."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.special import erf

from ssvp_jax.models import hsvs

B, N, DC, DD, CIN, HEADS, HD = 2, 15, 24, 20, 28, 2, 4  # N = 3 x 5 grid


def randomize(module, seed, std=0.3):
  """Every Param random (LayerNorm scales/biases included), so no term hides behind a 0 or a 1."""
  rng = np.random.default_rng(seed)
  for _, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
    var[...] = jnp.asarray(rng.normal(0.0, std, var.shape), var.dtype)
  return module


def w(linear):
  return np.asarray(linear.kernel[...], np.float64)


def np_linear(x, linear):
  y = x @ w(linear)
  return y + np.asarray(linear.bias[...]) if linear.bias is not None else y


def np_ln(x, norm, eps=1e-5):
  mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * np.asarray(norm.scale[...]) + np.asarray(norm.bias[...])


def np_mlp(x, mlp):
  h = np_linear(x, mlp.fc1)
  return np_linear(0.5 * h * (1.0 + erf(h / np.sqrt(2.0))), mlp.fc2)  # exact GELU


def np_attention(q, k, v, heads):
  """Eq. 3 written out: per-head softmax(q k^T / sqrt(dh)) v."""
  b, nq, c = q.shape
  dh = c // heads
  q, k, v = (x.reshape(x.shape[0], x.shape[1], heads, dh) for x in (q, k, v))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(dh)
  attn = np.exp(logits - logits.max(-1, keepdims=True))
  attn /= attn.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, nq, c)


def np_atf(atf, fc, fd):
  """Eqs. 2-5 transcribed with the module's own weights."""
  a_cd = np_attention(np_linear(fc, atf.q_c), np_linear(fd, atf.k_d), np_linear(fd, atf.v_d), HEADS)
  a_dc = np_attention(np_linear(fd, atf.q_d), np_linear(fc, atf.k_c), np_linear(fc, atf.v_c), HEADS)
  z = np.concatenate([np_ln(a_cd, atf.norm_cd), np_ln(a_dc, atf.norm_dc)], -1)
  return fc + np_mlp(z, atf.mlp)


def inputs(seed, n=N, cin=CIN, scales=3):
  rng = np.random.default_rng(seed)
  return ([rng.normal(size=(B, n, cin)).astype(np.float32) for _ in range(scales)],
          [rng.normal(size=(B, n, DD)).astype(np.float32) for _ in range(scales)],
          rng.normal(size=(B, DC)).astype(np.float32), rng.normal(size=(B, DD)).astype(np.float32))


def make(rngs_seed=0, **kw):
  kw = dict(dict(clip_dim=DC, dino_dim=DD, clip_in_dim=CIN, num_heads=HEADS, head_dim=HD), **kw)
  return hsvs.HSVS(kw.pop("num_scales", 3), rngs=nnx.Rngs(rngs_seed), **kw)


def test_shapes_and_value_value_option():
  cl, dl, cg, dg = inputs(0)
  local, glob = make()(cl, dl, cg, dg)
  assert [x.shape for x in local] == [(B, N, DC)] * 3 and glob.shape == (B, DC)
  # D3 alternative: tokens already D_c wide, no per-layer map created.
  m = make(clip_in_dim=None)
  assert m.clip_maps is None
  local, glob = m([x[..., :DC] for x in cl], dl, cg, dg)
  assert [x.shape for x in local] == [(B, N, DC)] * 3 and glob.shape == (B, DC)


def test_atf_matches_numpy_transcription():
  atf = randomize(hsvs.ATF(DC, DD, num_heads=HEADS, head_dim=HD, rngs=nnx.Rngs(1)), 1)
  rng = np.random.default_rng(2)
  fc, fd = rng.normal(size=(B, N, DC)), rng.normal(size=(B, N, DD))
  got = atf(jnp.asarray(fc, jnp.float32), jnp.asarray(fd, jnp.float32))
  np.testing.assert_allclose(np.asarray(got), np_atf(atf, fc, fd), rtol=1e-4, atol=1e-4)


def test_global_pair_attention_returns_v():
  """One token per side: softmax over one key is 1, so A_cd = F_d W_Vd and A_dc = F_c W_Vc."""
  atf = randomize(hsvs.ATF(DC, DD, num_heads=HEADS, head_dim=HD, rngs=nnx.Rngs(3)), 3)
  rng = np.random.default_rng(4)
  fc, fd = rng.normal(size=(B, 1, DC)), rng.normal(size=(B, 1, DD))
  a_cd, a_dc = atf.attend(jnp.asarray(fc, jnp.float32), jnp.asarray(fd, jnp.float32))
  np.testing.assert_allclose(np.asarray(a_cd), fd @ w(atf.v_d), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(a_dc), fc @ w(atf.v_c), rtol=1e-5, atol=1e-5)
  # Many queries, one key: every query row gets the value row.
  q, k, v = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in [(B, 7, 8), (B, 1, 8), (B, 1, 8)])
  np.testing.assert_allclose(np.asarray(hsvs.cross_attention(q, k, v, 2)),
                             np.broadcast_to(np.asarray(v), (B, 7, 8)), rtol=1e-6, atol=1e-6)
  # HSVS's global output is that closed form, with no attention logits involved.
  m = randomize(make(5), 5)
  cl, dl, cg, dg = inputs(6)
  _, glob = m(cl, dl, cg, dg)
  gb = m.global_block
  z = np.concatenate([np_ln(dg @ w(gb.v_d), gb.norm_cd), np_ln(cg @ w(gb.v_c), gb.norm_dc)], -1)
  np.testing.assert_allclose(np.asarray(glob), cg + np_mlp(z, gb.mlp), rtol=1e-4, atol=1e-4)


def test_hsvs_per_scale_maps_and_own_blocks():
  m = randomize(make(7), 7)
  cl, dl, cg, dg = inputs(8)
  local, _ = m(cl, dl, cg, dg)
  assert len(m.local_blocks) == 3
  raw = randomize(make(7, normalize_clip=False), 7)  # D3 alternative: mapped tokens as they are
  local_raw, _ = raw(cl, dl, cg, dg)
  for l in range(3):
    fc = cl[l].astype(np.float64) @ w(m.clip_maps[l])  # D3: bias-free per-layer map ...
    assert m.clip_maps[l].bias is None
    unit = fc / np.linalg.norm(fc, axis=-1, keepdims=True)  # ... then L2-normalised (Bayes-PFL)
    np.testing.assert_allclose(np.asarray(local[l]), np_atf(m.local_blocks[l], unit, dl[l]), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(local_raw[l]), np_atf(raw.local_blocks[l], fc, dl[l]), rtol=1e-4,
                               atol=1e-4)


def test_shared_vs_own_weights_across_scales():
  cl, dl, cg, dg = inputs(9, cin=DC)
  same_c, same_d = [cl[0]] * 3, [dl[0]] * 3  # identical tokens at every scale
  own = randomize(make(10, clip_in_dim=None), 10)
  out_own, _ = own(same_c, same_d, cg, dg)
  assert not np.allclose(out_own[0], out_own[1])
  shared = randomize(make(11, clip_in_dim=None, share_scales=True), 11)
  assert len(shared.local_blocks) == 1
  out_shared, glob = shared(same_c, same_d, cg, dg)
  np.testing.assert_array_equal(out_shared[0], out_shared[1])
  np.testing.assert_array_equal(out_shared[0], out_shared[2])
  # The global pair keeps its own block.
  assert shared.global_block is not shared.local_blocks[0]


def test_concat_fusion_ablation():
  m = randomize(make(12, fusion="concat"), 12)
  assert all(isinstance(b, hsvs.ConcatFusion) for b in m.local_blocks)
  assert not hasattr(m.local_blocks[0], "q_c")  # no attention in the ablation
  cl, dl, cg, dg = inputs(13)
  local, glob = m(cl, dl, cg, dg)
  for l in range(3):
    blk = m.local_blocks[l]
    fc = cl[l].astype(np.float64) @ w(m.clip_maps[l])
    fc = fc / np.linalg.norm(fc, axis=-1, keepdims=True)  # D3
    want = fc + np_mlp(np.concatenate([np_ln(fc, blk.norm_c), np_ln(dl[l], blk.norm_d)], -1), blk.mlp)
    np.testing.assert_allclose(np.asarray(local[l]), want, rtol=1e-4, atol=1e-4)
  gb = m.global_block
  want = cg + np_mlp(np.concatenate([np_ln(cg, gb.norm_c), np_ln(dg, gb.norm_d)], -1), gb.mlp)
  np.testing.assert_allclose(np.asarray(glob), want, rtol=1e-4, atol=1e-4)


def test_bad_inputs_are_named():
  m = make()
  cl, dl, cg, dg = inputs(14)
  with pytest.raises(ValueError, match="built for 3 scales"):
    m(cl[:2], dl[:2], cg, dg)
  with pytest.raises(ValueError, match="expected 28"):
    m([x[..., :DC] for x in cl], dl, cg, dg)
  with pytest.raises(ValueError, match="same grid"):
    m(cl, [x[:, :10] for x in dl], cg, dg)
  with pytest.raises(ValueError, match=r"global features must be \[B, D\]"):
    m(cl, dl, cg[:, None], dg)
  with pytest.raises(ValueError, match="fusion must be one of"):
    make(fusion="sum")
