"""VTAM / AnomalyMoE: Visual-Text Anomaly Mapper (SPEC section 4, Eqs. 13-19).

Each scale's V_syn^l tokens are compared with the normal and abnormal prompt
prototypes (Eqs. 13-14); a scale gate from the global feature (Eq. 15) and a
spatial gate per scale (Eq. 16) mix the maps (Eq. 17); the map's maximum
(Eq. 18, or D9's mean of the top-k values) calibrates the global score (Eq. 19).

D21: everything here runs in float32 whatever the compute dtype of the rest
(the caller casts V_syn and T_final; the gates are built without a dtype), so
bfloat16 runs do not quantise the scores (bf16 steps are ~0.004 near 0.5).

Shapes: B batch, N = h * w tokens, D width (768), L scales, P prompts
(`num_normal` normal rows first, then the abnormal rows).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from ssvp_jax.models.layers import MLP, l2_normalize

S_GLOBAL_FORMS = ("softmax", "cosine")


class VTAMOutput(NamedTuple):
  """Everything VTAM computes; tuples hold one entry per scale."""
  scale_probs: tuple[jax.Array, ...]    # L x [B, N]  P^l (Eq. 14)
  scale_logits: tuple[jax.Array, ...]   # L x [B, N]  (M_a - M_n) / tau, P^l = sigmoid of it (D20)
  p_map: jax.Array                      # [B, N]      Eq. 17
  s_global: jax.Array                   # [B]         D6
  s_local: jax.Array                    # [B]         Eq. 18 / D9
  s_final: jax.Array                    # [B]         Eq. 19
  scale_weights: jax.Array              # [B, L]      w (Eq. 15)
  spatial_gates: tuple[jax.Array, ...]  # L x [B, N]  G^l (Eq. 16)


def bank_prototypes(t_final: jax.Array, num_normal: int) -> tuple[jax.Array, jax.Array]:
  """D5: each bank's rows L2-normalised, averaged, renormalised.

  t_final [B, P, D] (normal rows first) -> (t_n [B, D], t_a [B, D]), unit length.
  """
  rows = l2_normalize(t_final)
  return (l2_normalize(jnp.mean(rows[:, :num_normal], axis=1)),
          l2_normalize(jnp.mean(rows[:, num_normal:], axis=1)))


def anomaly_logit(v: jax.Array, t_n: jax.Array, t_a: jax.Array, inv_tau: jax.Array | float) -> jax.Array:
  """Eqs. 13-14 as a logit (D20): (cos(v, t_a) - cos(v, t_n)) / tau.

  v [B, ..., D] (tokens [B, N, D] or the global feature [B, D]); t_n, t_a [B, D] unit -> [B, ...].
  The two-way softmax of Eq. 14 is the sigmoid of this difference.
  """
  v = l2_normalize(v)
  m_n = jnp.einsum("b...d,bd->b...", v, t_n)  # Eq. 13
  m_a = jnp.einsum("b...d,bd->b...", v, t_a)
  return (m_a - m_n) * inv_tau


def anomaly_probability(v: jax.Array, t_n: jax.Array, t_a: jax.Array, inv_tau: jax.Array | float) -> jax.Array:
  """Eq. 14: P = softmax([cos(v, t_n), cos(v, t_a)] / tau)[abnormal] = sigmoid(`anomaly_logit`); in (0, 1)."""
  return jax.nn.sigmoid(anomaly_logit(v, t_n, t_a, inv_tau))


def fuse_maps(probs: jax.Array, weights: jax.Array, gates: jax.Array) -> jax.Array:
  """Eq. 17: P_map = sum_l w[l] * G^l * P^l; probs, gates [B, L, N], weights [B, L] -> [B, N]."""
  return jnp.einsum("bl,bln->bn", weights, gates * probs)


def local_score(p_map: jax.Array, top_k: int | None = None) -> jax.Array:
  """Eq. 18: S_local = max over tokens (top_k 0 or None); D9: mean of the top_k values. [B, N] -> [B]."""
  if not top_k:
    return jnp.max(p_map, axis=-1)
  return jnp.mean(jax.lax.top_k(p_map, top_k)[0], axis=-1)


def final_score(s_global: jax.Array, s_local: jax.Array, gamma: float) -> jax.Array:
  """Eq. 19: S_final = (1 - gamma) * S_global + gamma * S_local."""
  return (1.0 - gamma) * s_global + gamma * s_local


class VTAM(nnx.Module):
  """AnomalyMoE with a global scale gate and per-scale spatial gates.

  Args:
    dim: D, width of V_syn and of the prompt embeddings (768).
    num_scales: L (4).
    num_normal: how many leading prompt rows form the normal bank (3).
    tau: temperature of Eq. 14 and of S_global (0.07).
    learn_tau: D7; tau becomes a learned `log(1/tau)` parameter (the optimiser gives it its
      own learning rate, `optim.lr_tau`); False keeps tau fixed.
    gating: False is the "gating off" ablation: w uniform (1/L), G^l = 1, and
      no gate parameters are created.
    gate_dim: hidden width of MLP_gate (the paper gives none; None: dim // 4).
    s_global: D6, "softmax" (abnormal probability of cos(V_syn^g, t)/tau) or
      "cosine" (raw cos(V_syn^g, t_a), in [-1, 1]: the loss clips S_final).
    top_k: D9; 0 (or None) is Eq. 18's max, k >= 1 the mean of the top k map values.
    gamma: Eq. 19 balance (0.5).
  """

  def __init__(self, dim: int = 768, num_scales: int = 4, *, num_normal: int = 3, tau: float = 0.07,
               learn_tau: bool = False, gating: bool = True, gate_dim: int | None = None,
               s_global: str = "softmax", top_k: int | None = None, gamma: float = 0.5, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    if s_global not in S_GLOBAL_FORMS:
      raise ValueError(f"vtam.VTAM: s_global must be one of {S_GLOBAL_FORMS}, got {s_global!r}")
    if top_k is not None and top_k < 0:
      raise ValueError(f"vtam.VTAM: top_k must be 0 (the max, Eq. 18) or >= 1, got {top_k}")
    if tau <= 0:
      raise ValueError(f"vtam.VTAM: tau must be > 0, got {tau}")
    self.dim, self.num_scales, self.num_normal = dim, num_scales, num_normal
    self.gating, self.s_global_form, self.top_k, self.gamma = gating, s_global, top_k, gamma
    self.learn_tau = learn_tau
    if learn_tau:
      self.log_inv_tau = nnx.Param(jnp.asarray(math.log(1.0 / tau), param_dtype))
    else:
      self.fixed_inv_tau = 1.0 / tau
    if gating:
      lin = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
      self.scale_gate = MLP(dim, gate_dim or max(dim // 4, 1), num_scales, **lin)  # MLP_gate of Eq. 15
      # A 1x1 convolution on the token grid is a per-token Dense D -> 1 (Eq. 16).
      self.spatial_gates = nnx.List([nnx.Linear(dim, 1, **lin) for _ in range(num_scales)])

  def inv_tau(self) -> jax.Array | float:
    """1 / tau (a parameter's exponential when tau is learned)."""
    return jnp.exp(self.log_inv_tau[...]) if self.learn_tau else self.fixed_inv_tau

  def scale_weights(self, v_global: jax.Array) -> jax.Array:
    """Eq. 15: w = softmax(MLP_gate(V_syn^g)); [B, D] -> [B, L], rows sum to 1."""
    if not self.gating:
      return jnp.full((v_global.shape[0], self.num_scales), 1.0 / self.num_scales, v_global.dtype)
    return jax.nn.softmax(self.scale_gate(v_global), axis=-1)

  def spatial_gate(self, scale: int, v_local: jax.Array) -> jax.Array:
    """Eq. 16: G^l = sigmoid(Conv1x1^l(V_syn^l)); [B, N, D] -> [B, N] in (0, 1)."""
    if not self.gating:
      return jnp.ones(v_local.shape[:2], v_local.dtype)
    return jax.nn.sigmoid(self.spatial_gates[scale](v_local)[..., 0])

  def global_score(self, v_global: jax.Array, t_n: jax.Array, t_a: jax.Array) -> jax.Array:
    """D6: S_global from V_syn^g [B, D] -> [B]."""
    if self.s_global_form == "cosine":
      return jnp.sum(l2_normalize(v_global) * t_a, axis=-1)
    return anomaly_probability(v_global, t_n, t_a, self.inv_tau())

  def __call__(self, v_local: Sequence[jax.Array], v_global: jax.Array, t_final: jax.Array) -> VTAMOutput:
    """v_local: L arrays V_syn^l [B, N, D]; v_global: V_syn^g [B, D]; t_final: [B, P, D]."""
    if len(v_local) != self.num_scales:
      raise ValueError(f"vtam.VTAM: built for {self.num_scales} scales, got {len(v_local)} maps")
    if t_final.ndim != 3 or t_final.shape[-1] != self.dim or not 0 < self.num_normal < t_final.shape[1]:
      raise ValueError(f"vtam.VTAM: T_final must be [B, P, {self.dim}] with P > num_normal={self.num_normal} "
                       f"(normal rows first), got {t_final.shape}")
    if v_global.shape != (t_final.shape[0], self.dim):
      raise ValueError(f"vtam.VTAM: V_syn^g must be [{t_final.shape[0]}, {self.dim}], got {v_global.shape}")
    for l, v in enumerate(v_local):
      if v.ndim != 3 or v.shape[0] != v_global.shape[0] or v.shape[-1] != self.dim:
        raise ValueError(f"vtam.VTAM: V_syn of scale {l} must be [B, N, {self.dim}], got {v.shape}")
      if v.shape[1] != v_local[0].shape[1]:
        raise ValueError(f"vtam.VTAM: scale {l} has {v.shape[1]} tokens, scale 0 has {v_local[0].shape[1]}; "
                         "Eq. 17 sums the scales token by token")

    t_n, t_a = bank_prototypes(t_final, self.num_normal)  # [B, D] each
    inv_tau = self.inv_tau()
    logits = tuple(anomaly_logit(v, t_n, t_a, inv_tau) for v in v_local)      # L x [B, N]
    probs = tuple(jax.nn.sigmoid(x) for x in logits)                          # Eq. 14
    gates = tuple(self.spatial_gate(l, v) for l, v in enumerate(v_local))     # L x [B, N]
    weights = self.scale_weights(v_global)                                     # [B, L]
    p_map = fuse_maps(jnp.stack(probs, axis=1), weights, jnp.stack(gates, axis=1))
    s_global = self.global_score(v_global, t_n, t_a)
    s_local = local_score(p_map, self.top_k)
    return VTAMOutput(scale_probs=probs, scale_logits=logits, p_map=p_map, s_global=s_global, s_local=s_local,
                      s_final=final_score(s_global, s_local, self.gamma), scale_weights=weights,
                      spatial_gates=gates)
