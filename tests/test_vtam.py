"""VTAM / AnomalyMoE (Eqs. 13-19) against numpy, gates, and the ablation switches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.special import erf

from ssvp_jax.models import vtam

B, N, D, L, P = 2, 15, 24, 3, 6
TAU = 0.07


def randomize(module, seed, std=0.3):
  rng = np.random.default_rng(seed)
  for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
    if path[-1] != "log_inv_tau":
      var[...] = jnp.asarray(rng.normal(0.0, std, var.shape), var.dtype)
  return module


def make(seed=0, **kw):
  return randomize(vtam.VTAM(D, L, **dict(dict(gate_dim=7), **kw), rngs=nnx.Rngs(seed)), seed)


def data(seed=100):
  rng = np.random.default_rng(seed)
  return ([rng.normal(size=(B, N, D)).astype(np.float32) for _ in range(L)],
          rng.normal(size=(B, D)).astype(np.float32), rng.normal(size=(B, P, D)).astype(np.float32))


def unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_prob(v, t_n, t_a, tau=TAU):
  """Eqs. 13-14: exp(M_a/tau) / (exp(M_n/tau) + exp(M_a/tau))."""
  v = unit(v)
  m_n = np.einsum("b...d,bd->b...", v, t_n)
  m_a = np.einsum("b...d,bd->b...", v, t_a)
  return np.exp(m_a / tau) / (np.exp(m_n / tau) + np.exp(m_a / tau))


def np_lin(x, lin):
  return x @ np.asarray(lin.kernel[...], np.float64) + np.asarray(lin.bias[...])


def np_reference(m, vl, vg, t):
  """The whole of Eqs. 13-19 (D5, D6 softmax) with the module's own weights."""
  t_n = unit(unit(t[:, :3]).mean(1))
  t_a = unit(unit(t[:, 3:]).mean(1))
  probs = [np_prob(v, t_n, t_a) for v in vl]
  h = np_lin(vg, m.scale_gate.fc1)
  logits = np_lin(0.5 * h * (1 + erf(h / np.sqrt(2))), m.scale_gate.fc2)
  wgt = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)                 # Eq. 15
  gates = [1 / (1 + np.exp(-np_lin(v, m.spatial_gates[l])[..., 0])) for l, v in enumerate(vl)]  # Eq. 16
  p_map = sum(wgt[:, l, None] * gates[l] * probs[l] for l in range(L))         # Eq. 17
  s_local = p_map.max(-1)                                                      # Eq. 18
  s_global = np_prob(vg, t_n, t_a)                                             # D6
  return dict(probs=probs, w=wgt, gates=gates, p_map=p_map, s_local=s_local, s_global=s_global,
              s_final=0.5 * s_global + 0.5 * s_local)                          # Eq. 19


def test_shapes():
  vl, vg, t = data()
  out = make()(vl, vg, t)
  assert len(out.scale_probs) == len(out.spatial_gates) == L
  assert all(p.shape == (B, N) for p in out.scale_probs + out.spatial_gates)
  assert out.p_map.shape == (B, N) and out.scale_weights.shape == (B, L)
  assert out.s_global.shape == out.s_local.shape == out.s_final.shape == (B,)


def test_matches_numpy_eqs_13_to_19():
  m = make(1)
  vl, vg, t = data(1)
  out = m(vl, vg, t)
  ref = np_reference(m, [v.astype(np.float64) for v in vl], vg.astype(np.float64), t.astype(np.float64))
  tol = dict(rtol=1e-4, atol=1e-5)
  for l in range(L):
    np.testing.assert_allclose(out.scale_probs[l], ref["probs"][l], **tol)
    np.testing.assert_allclose(out.spatial_gates[l], ref["gates"][l], **tol)
  for key, got in [("w", out.scale_weights), ("p_map", out.p_map), ("s_local", out.s_local),
                   ("s_global", out.s_global), ("s_final", out.s_final)]:
    np.testing.assert_allclose(got, ref[key], **tol, err_msg=key)


def test_scale_logits_d20_and_top_k_d9_match_numpy():
  """D20: each scale's logit is (M_a - M_n) / tau, and P^l its sigmoid; D9: S_local = mean of the top k."""
  m = make(1, top_k=5)
  vl, vg, t = data(1)
  out = m(vl, vg, t)
  t64 = t.astype(np.float64)
  t_n, t_a = unit(unit(t64[:, :3]).mean(1)), unit(unit(t64[:, 3:]).mean(1))
  for l in range(L):
    v = unit(vl[l].astype(np.float64))
    want = (np.einsum("bnd,bd->bn", v, t_a) - np.einsum("bnd,bd->bn", v, t_n)) / TAU
    np.testing.assert_allclose(out.scale_logits[l], want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out.scale_probs[l], np_prob(vl[l].astype(np.float64), t_n, t_a), rtol=1e-4, atol=1e-6)
  ref = np_reference(m, [v.astype(np.float64) for v in vl], vg.astype(np.float64), t64)
  s_local = np.sort(ref["p_map"], -1)[:, -5:].mean(-1)
  np.testing.assert_allclose(out.s_local, s_local, rtol=1e-4)
  np.testing.assert_allclose(out.s_final, 0.5 * ref["s_global"] + 0.5 * s_local, rtol=1e-4)


def test_probability_by_hand_and_bank_aggregation():
  e = np.eye(D, dtype=np.float32)
  # Normal rows all along e0, abnormal rows along e1, with different lengths: D5 ignores lengths.
  t = np.stack([np.stack([1 * e[0], 3 * e[0], 0.5 * e[0], 2 * e[1], e[1], 7 * e[1]])] * B)
  t_n, t_a = vtam.bank_prototypes(jnp.asarray(t), 3)
  np.testing.assert_allclose(t_n, np.stack([e[0]] * B), atol=1e-6)
  np.testing.assert_allclose(t_a, np.stack([e[1]] * B), atol=1e-6)
  v = jnp.asarray(np.stack([np.stack([5 * e[1], e[0], e[0] + e[1], e[2]])] * B))  # [B, 4, D]
  p = np.asarray(vtam.anomaly_probability(v, t_n, t_a, 1 / TAU))
  s = 1 / (1 + np.exp(-1 / TAU))  # cos 1 with t_a, 0 with t_n
  np.testing.assert_allclose(p[0], [s, 1 - s, 0.5, 0.5], rtol=1e-5)


def test_gates_sum_and_range():
  m = make(2)
  vl, vg, t = data(2)
  out = m(vl, vg, t)
  np.testing.assert_allclose(np.asarray(out.scale_weights).sum(-1), np.ones(B), rtol=1e-6)
  for g in out.spatial_gates:
    g = np.asarray(g)
    assert np.all(g > 0) and np.all(g < 1)
  assert np.all(np.asarray(out.p_map) >= 0) and np.all(np.asarray(out.p_map) <= 1)


def test_gating_off_ablation():
  m = vtam.VTAM(D, L, gating=False, rngs=nnx.Rngs(0))
  assert not jax.tree.leaves(nnx.state(m, nnx.Param))  # no gate parameters at all
  vl, vg, t = data(3)
  out = m(vl, vg, t)
  np.testing.assert_array_equal(out.scale_weights, np.full((B, L), 1 / L, np.float32))
  for g in out.spatial_gates:
    np.testing.assert_array_equal(g, np.ones((B, N)))
  np.testing.assert_allclose(out.p_map, np.mean(np.stack(out.scale_probs), 0), rtol=1e-6)
  # The gated model on the same inputs gives a different map.
  assert not np.allclose(out.p_map, make(3)(vl, vg, t).p_map)


def test_top_k_and_cosine_options():
  vl, vg, t = data(4)
  base = make(4)(vl, vg, t)
  topk = make(4, top_k=4)(vl, vg, t)
  want = np.sort(np.asarray(base.p_map), -1)[:, -4:].mean(-1)  # D9: mean of the 4 largest
  np.testing.assert_allclose(topk.s_local, want, rtol=1e-6)
  np.testing.assert_allclose(make(4, top_k=1)(vl, vg, t).s_local, base.s_local, rtol=1e-6)
  cos = make(4, s_global="cosine")(vl, vg, t)  # D6 alternative: raw cos(V_syn^g, t_a)
  t_a = unit(unit(t[:, 3:].astype(np.float64)).mean(1))
  np.testing.assert_allclose(cos.s_global, (unit(vg.astype(np.float64)) * t_a).sum(-1), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(cos.s_final, 0.5 * np.asarray(cos.s_global) + 0.5 * np.asarray(cos.s_local),
                             rtol=1e-6)


def test_tau_fixed_or_learned():
  fixed = make(5)
  assert not any(p[-1] == "log_inv_tau" for p, _ in nnx.to_flat_state(nnx.state(fixed, nnx.Param)))
  learned = make(5, learn_tau=True)
  np.testing.assert_allclose(float(learned.log_inv_tau[...]), np.log(1 / TAU), rtol=1e-6)
  vl, vg, t = data(5)
  np.testing.assert_allclose(learned(vl, vg, t).p_map, fixed(vl, vg, t).p_map, rtol=1e-5)
  learned.log_inv_tau[...] = jnp.asarray(np.log(1 / 0.5), jnp.float32)
  assert not np.allclose(learned(vl, vg, t).p_map, fixed(vl, vg, t).p_map)


def test_bad_inputs_are_named():
  m = make(6)
  vl, vg, t = data(6)
  with pytest.raises(ValueError, match="built for 3 scales"):
    m(vl[:2], vg, t)
  with pytest.raises(ValueError, match="P > num_normal=3"):
    m(vl, vg, t[:, :3])
  with pytest.raises(ValueError, match="scale 1 has 10 tokens"):
    m([vl[0], vl[1][:, :10], vl[2]], vg, t)
  with pytest.raises(ValueError, match=r"V_syn\^g must be"):
    m(vl, vg[:1], t)
  with pytest.raises(ValueError, match="s_global must be one of"):
    make(s_global="max")
