"""VCPG (Eqs. 7-12): sampling, VAE loss, text-latent attention, gated injection, margin."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ssvp_jax.models import vcpg

B, D, P, Z = 3, 24, 6, 16  # Z splits into D8's default 8 latent tokens


def randomize(module, seed, std=0.3):
  """Every Param random, so no term hides behind a 0 or a 1 (alpha is left as built)."""
  rng = np.random.default_rng(seed)
  for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
    if path[-1] != "alpha":
      var[...] = jnp.asarray(rng.normal(0.0, std, var.shape), var.dtype)
  return module


def make(seed=0, **kw):
  return randomize(vcpg.VCPG(D, **dict(dict(latent_dim=Z, attn_dim=8, dec_dim=10), **kw),
                             rngs=nnx.Rngs(seed)), seed)


def data(seed=100):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.normal(size=(B, D)), jnp.float32), jnp.asarray(rng.normal(size=(P, D)), jnp.float32)


def np_ln(x, eps=1e-5):  # LayerNorm at its initial scale 1, bias 0
  return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)


def test_shapes():
  v, t = data()
  out = make()(v, t, rngs=nnx.Rngs(sample=0))
  assert out.t_final.shape == (B, P, D) and out.delta.shape == (B, P, D) and out.recon.shape == (B, D)
  assert out.mu.shape == out.log_var.shape == out.z.shape == (B, Z)
  assert out.l_vae.shape == out.l_reg.shape == ()


def test_noise_depends_only_on_the_key():
  m = make(1)
  v, t = data()
  z = lambda seed: np.asarray(m(v, t, rngs=nnx.Rngs(sample=seed)).z)
  np.testing.assert_array_equal(z(7), z(7))
  assert not np.allclose(z(7), z(8))
  # Eq. 8 with the noise the `sample` stream gives.
  out = m(v, t, rngs=nnx.Rngs(sample=7))
  eps = np.asarray(jax.random.normal(nnx.Rngs(sample=7).sample(), (B, Z)))
  np.testing.assert_allclose(out.z, np.asarray(out.mu) + eps * np.exp(0.5 * np.asarray(out.log_var)), rtol=1e-5,
                             atol=1e-6)
  # Deterministic: z = mu whatever the key, or with none at all.
  for r in (nnx.Rngs(sample=1), nnx.Rngs(sample=2), None):
    det = m(v, t, rngs=r, deterministic=True)
    np.testing.assert_array_equal(det.z, det.mu)
    np.testing.assert_array_equal(det.t_final, m(v, t, deterministic=True).t_final)
  with pytest.raises(ValueError, match="needs rngs"):
    m(v, t)


def test_nnx_view_gives_reproducible_evaluation():
  m = make(2)
  v, t = data()
  ev = nnx.view(m, deterministic=True)
  assert ev.deterministic and not m.deterministic  # the training model is untouched
  a, b = ev(v, t), ev(v, t, rngs=nnx.Rngs(sample=3))
  np.testing.assert_array_equal(a.t_final, b.t_final)
  np.testing.assert_array_equal(a.z, a.mu)
  # The view shares the parameters: same numbers as the explicit argument.
  np.testing.assert_array_equal(a.t_final, m(v, t, deterministic=True).t_final)


def np_vae_loss(v, recon, mu, lv, beta, rec="sum", kl="sum"):
  """Eq. 9 with D19's reductions: Bayes-PFL's MSELoss(reduction="sum") / batch, KL summed over Z / batch."""
  sq, k = (v - recon) ** 2, -0.5 * (1 + lv - mu ** 2 - np.exp(lv))
  per_rec = sq.sum(-1) if rec == "sum" else sq.mean(-1)
  per_kl = k.sum(-1) if kl == "sum" else k.mean(-1)
  return per_rec.mean() + beta * per_kl.mean()


def test_vae_loss_eq9_d19():
  rng = np.random.default_rng(3)
  v, recon = rng.normal(size=(B, D)), rng.normal(size=(B, D))
  mu, lv = rng.normal(size=(B, Z)), rng.normal(size=(B, Z)) * 0.5
  args = [jnp.asarray(x, jnp.float32) for x in (v, recon, mu, lv)]
  # D19 default: squared error summed over features (Bayes-PFL), KL summed over latent dims.
  want = ((v - recon) ** 2).sum() / B + 0.1 * (-0.5 * (1 + lv - mu ** 2 - np.exp(lv))).sum() / B
  np.testing.assert_allclose(vcpg.vae_loss(*args, 0.1), want, rtol=1e-5)
  for rec in ("sum", "mean"):
    for kl in ("sum", "mean"):
      np.testing.assert_allclose(vcpg.vae_loss(*args, 0.1, kl_reduction=kl, rec_reduction=rec),
                                 np_vae_loss(v, recon, mu, lv, 0.1, rec, kl), rtol=1e-5)
  zeros = jnp.zeros((B, Z))
  assert float(vcpg.vae_loss(jnp.ones((B, D)), jnp.ones((B, D)), zeros, zeros, 0.1)) == 0.0  # perfect and N(0, I)
  # The module's L_VAE is Eq. 9 of its own mu, log_var and Dec(z), with its reductions.
  v, t = data()
  for kw in ({}, dict(kl_reduction="mean", rec_reduction="mean")):
    m = make(4, **kw)
    out = m(v, t, rngs=nnx.Rngs(sample=0))
    np.testing.assert_allclose(out.l_vae, np_vae_loss(np.asarray(v), np.asarray(m.decoder(out.z)), np.asarray(out.mu),
                                                      np.asarray(out.log_var), 0.1, kw.get("rec_reduction", "sum"),
                                                      kw.get("kl_reduction", "sum")), rtol=1e-5)
  with pytest.raises(ValueError, match="kl_reduction must be one of"):
    make(4, kl_reduction="max")
  with pytest.raises(ValueError, match="rec_reduction must be one of"):
    vcpg.vae_loss(*args, 0.1, rec_reduction="max")


def test_log_var_is_clamped_d21():
  m = make(11)
  m.to_log_var.bias[...] = jnp.full((Z,), 500.0)
  v, t = data()
  out = m(v, t, rngs=nnx.Rngs(sample=0))
  assert float(np.max(out.log_var)) == vcpg.LOG_VAR_RANGE[1] and np.isfinite(float(out.l_vae))
  m.to_log_var.bias[...] = jnp.full((Z,), -500.0)
  assert float(np.min(m(v, t, rngs=nnx.Rngs(sample=0)).log_var)) == vcpg.LOG_VAR_RANGE[0]


def test_vae_input_stop_gradient_d18():
  """D18: no gradient reaches V_syn^g through VCPG (neither L_VAE nor the prompt path, which reads
  z = mu(stopgrad(V))); with D18 off both flow. The encoder itself keeps the prompt path's gradient."""
  v, t = data()
  probe = jnp.asarray(np.random.default_rng(12).normal(size=(B, P, D)), jnp.float32)
  for stop in (True, False):
    m = make(12, stop_grad_input=stop)
    m.alpha[...] = jnp.asarray(0.5)
    g_vae = jax.grad(lambda x: m(x, t, deterministic=True).l_vae)(v)
    assert bool(np.any(np.asarray(g_vae))) == (not stop)
    g_prompt = jax.grad(lambda x: jnp.sum(probe * m(x, t, deterministic=True).t_final))(v)
    assert bool(np.any(np.asarray(g_prompt))) == (not stop)
    g_enc = nnx.grad(lambda mm: jnp.sum(probe * mm(v, t, deterministic=True).t_final))(m)
    assert np.any(np.asarray(g_enc.to_mu.kernel[...]))


def test_one_latent_token_delta_is_z_wv():
  """D8 alternative: softmax over one key is 1, so delta = z W_V for every prompt, whatever W_Q, W_K."""
  m = make(5, latent_tokens=1)
  v, t = data()
  out = m(v, t, rngs=nnx.Rngs(sample=0))
  want = np.asarray(out.z) @ np.asarray(m.w_v.kernel[...])  # [B, D]
  np.testing.assert_allclose(out.delta, np.broadcast_to(want[:, None], (B, P, D)), rtol=1e-5, atol=1e-5)


def test_latent_tokens_attention_eq10():
  m = make(6, latent_tokens=4)
  v, t = data()
  out = m(v, t, rngs=nnx.Rngs(sample=0))
  tok = np.asarray(out.z).reshape(B, 4, Z // 4)
  q = np.asarray(t) @ np.asarray(m.w_q.kernel[...])                 # [P, 8]
  k = tok @ np.asarray(m.w_k.kernel[...])                            # [B, 3, 8]
  val = tok @ np.asarray(m.w_v.kernel[...])                          # [B, 3, D]
  logits = np.einsum("pc,bkc->bpk", q, k) / np.sqrt(8)
  a = np.exp(logits - logits.max(-1, keepdims=True))
  a /= a.sum(-1, keepdims=True)
  assert not np.allclose(a, 1 / 4, atol=1e-3)  # the softmax is doing something
  assert not np.allclose(np.asarray(out.delta)[:, 0], np.asarray(out.delta)[:, 1])  # per-prompt deltas
  np.testing.assert_allclose(out.delta, np.einsum("bpk,bkd->bpd", a, val), rtol=1e-4, atol=1e-5)
  # Several keys (D8 default 8): W_Q and W_K shape the softmax and get a gradient; one key: exactly none.
  probe = jnp.asarray(np.random.default_rng(9).normal(size=(B, P, D)), jnp.float32)
  for tokens, moves in [(8, True), (1, False)]:
    mod = make(6, latent_tokens=tokens, attn_dim=8)
    mod.alpha[...] = jnp.asarray(0.5)
    g = nnx.jit(nnx.grad(lambda mm, r: jnp.sum(probe * mm(v, t, rngs=r).t_final)))(mod, nnx.Rngs(sample=0))
    for name in ("w_q", "w_k"):
      assert bool(np.any(np.asarray(getattr(g, name).kernel[...]))) == moves, (tokens, name)
  with pytest.raises(ValueError, match="equal tokens"):
    vcpg.VCPG(D, latent_dim=Z, latent_tokens=5, rngs=nnx.Rngs(0))
  assert vcpg.VCPG(D, latent_dim=Z, rngs=nnx.Rngs(0)).latent_tokens == 8  # D8 default


def test_gated_injection_eq11():
  v, t = data()
  tn = np.asarray(t, np.float64)
  # alpha = 0 (its initial value): T_final = LN(T_init) for every image ...
  m = make(7)
  assert float(m.alpha[...]) == 0.0
  m.norm.scale[...] = jnp.ones(D)
  m.norm.bias[...] = jnp.zeros(D)
  out = m(v, t, rngs=nnx.Rngs(sample=0))
  np.testing.assert_allclose(out.t_final, np.broadcast_to(np_ln(tn), (B, P, D)), rtol=1e-4, atol=1e-5)
  # ... and with D12 off, exactly T_init.
  off = make(7, use_ln=False)
  assert off.norm is None
  np.testing.assert_array_equal(off(v, t, rngs=nnx.Rngs(sample=0)).t_final, np.broadcast_to(t, (B, P, D)))
  # alpha != 0: LN(T_init + alpha * delta), resp. without the LN.
  for mod in (m, off):
    mod.alpha[...] = jnp.asarray(0.7)
    out = mod(v, t, rngs=nnx.Rngs(sample=0))
    pre = tn[None] + 0.7 * np.asarray(out.delta, np.float64)
    np.testing.assert_allclose(out.t_final, np_ln(pre) if mod.use_ln else pre, rtol=1e-4, atol=1e-5)


def test_per_image_t_init():
  """T_init [B, P, D] (each image its own class rows) equals image-by-image calls with [P, D]."""
  m = make(9)
  m.alpha[...] = jnp.asarray(0.7)
  v, _ = data()
  rng = np.random.default_rng(10)
  t_b = jnp.asarray(rng.normal(size=(B, P, D)), jnp.float32)
  out = m(v, t_b, deterministic=True)
  for b in range(B):
    one = m(v[b:b + 1], t_b[b], deterministic=True)
    np.testing.assert_allclose(out.t_final[b], one.t_final[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.delta[b], one.delta[0], rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match=r"\[B=3, P, 24\]"):
    m(v, t_b[:2], deterministic=True)


def test_margin_regularizer_eq12():
  e = np.eye(4, dtype=np.float32)
  t_init = jnp.asarray(e[:3])                                   # [3, 4]
  t_final = jnp.asarray([[2 * e[0], e[1] + e[0], -e[2]]])        # cos 1, 1/sqrt(2), -1
  want = (0.0 + (0.85 - 1 / np.sqrt(2)) + 1.85) / 3
  np.testing.assert_allclose(vcpg.margin_regularizer(t_final, t_init, 0.85), want, rtol=1e-6)
  # stop_gradient: nothing flows back to T_init, but T_final does get a gradient.
  g_init = jax.grad(lambda ti: vcpg.margin_regularizer(t_final, ti, 0.85))(t_init)
  g_final = jax.grad(lambda tf: vcpg.margin_regularizer(tf, t_init, 0.85))(t_final)
  assert not np.any(np.asarray(g_init)) and np.any(np.asarray(g_final))


def test_vcpg_off_ablation():
  m = vcpg.VCPG(D, latent_dim=Z, enabled=False, rngs=nnx.Rngs(0))
  assert not jax.tree.leaves(nnx.state(m, nnx.Param))  # nothing to train
  v, t = data()
  out = m(v, t, rngs=nnx.Rngs(sample=0))
  np.testing.assert_array_equal(out.t_final, np.broadcast_to(t, (B, P, D)))
  assert float(out.l_vae) == 0.0 and float(out.l_reg) == 0.0 and out.z is None


def test_bad_inputs_are_named():
  m = make(8)
  v, t = data()
  with pytest.raises(ValueError, match=r"T_init must be \[P, 24\]"):
    m(v, t[:, :20], rngs=nnx.Rngs(sample=0))
  with pytest.raises(ValueError, match=r"V_syn\^g must be \[B, 24\]"):
    m(v[:, None], t, rngs=nnx.Rngs(sample=0))
