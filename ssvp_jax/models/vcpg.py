"""VCPG: Vision-Conditioned Prompt Generator (SPEC section 3, Eqs. 7-12).

A small VAE encodes the global synergy feature V_syn^g into a latent z; the
prompt embeddings T_init attend to z (text-latent cross-attention) and receive
the result through a gate alpha that starts at 0, so training starts from the
static prompts. A margin keeps T_final near T_init (cosine >= xi).

Randomness: eps of Eq. 8 is drawn from the `sample` stream of an `nnx.Rngs`
passed to `__call__` (not stored in the module, so the module can sit inside
`nnx.value_and_grad` / `nnx.jit` with `rngs` as an argument). Evaluation uses
z = mu: pass `deterministic=True`, or build the evaluation model with
`nnx.view(model, deterministic=True)` (VCPG implements `set_view`).

Shapes: B batch, D prompt/feature width (768), P prompts (6: 3 normal then 3
abnormal; VCPG itself treats all rows alike), Z latent width (128), K latent
tokens (8 of 16 dims, D8).

D18: the VAE reads V_syn^g through a stop-gradient (encoder input and
reconstruction target), as Bayes-PFL's VAE reads a frozen feature: the VAE
models the feature and does not reshape HSVS. The prompts still receive the
latent (z, and through it the encoder, get the prompt path's gradient). T_init is [P, D] (one class for the whole batch) or [B, P, D]
(each image's own class rows); T_final is always [B, P, D].
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ssvp_jax.models.layers import LN_EPS, MLP, l2_normalize

KL_REDUCTIONS = ("sum", "mean")
LOG_VAR_RANGE = (-30.0, 20.0)  # D21: exp(log_var) stays finite in float32 and bfloat16


class VCPGOutput(NamedTuple):
  """What VCPG returns. The optional fields are None when VCPG is disabled."""
  t_final: jax.Array             # [B, P, D] per-image prompt embeddings (Eq. 11)
  l_vae: jax.Array               # [] Eq. 9
  l_reg: jax.Array               # [] Eq. 12
  mu: jax.Array | None = None    # [B, Z]
  log_var: jax.Array | None = None  # [B, Z]
  z: jax.Array | None = None     # [B, Z]
  recon: jax.Array | None = None  # [B, D] Dec(z)
  delta: jax.Array | None = None  # [B, P, D] Eq. 10


def reparameterize(mu: jax.Array, log_var: jax.Array, eps: jax.Array | None) -> jax.Array:
  """Eq. 8: z = mu + eps * exp(log_var / 2); eps None (evaluation) gives z = mu."""
  if eps is None:
    return mu
  return mu + eps * jnp.exp(0.5 * log_var)


def vae_loss(v: jax.Array, recon: jax.Array, mu: jax.Array, log_var: jax.Array, beta: float,
             kl_reduction: str = "sum", rec_reduction: str = "sum") -> jax.Array:
  """Eq. 9: L_VAE = ||V - Dec(z)||^2 + beta * KL(N(mu, exp(log_var)) || N(0, I)).

  Reductions (D19): per image, the squared error is SUMMED over the D features
  (rec_reduction="sum", Bayes-PFL's `MSELoss(reduction="sum") / batch`, the
  squared norm that Eq. 9 writes) or averaged ("mean", D times smaller: the
  earlier default, which tipped the reconstruction/KL balance by D, an
  effective beta of ~0.1 * 768); the KL is summed over the Z latent dims
  (kl_reduction="sum", the true KL of the diagonal Gaussian) or averaged
  ("mean"). Both are then averaged over the batch.
  v, recon [B, D]; mu, log_var [B, Z] -> scalar.
  """
  for name, value in (("rec_reduction", rec_reduction), ("kl_reduction", kl_reduction)):
    if value not in KL_REDUCTIONS:
      raise ValueError(f"vcpg.vae_loss: {name} must be one of {KL_REDUCTIONS}, got {value!r}")
  sq = jnp.square(v - recon)  # [B, D]
  rec = jnp.mean(jnp.sum(sq, axis=-1) if rec_reduction == "sum" else jnp.mean(sq, axis=-1))
  kl = -0.5 * (1.0 + log_var - jnp.square(mu) - jnp.exp(log_var))  # [B, Z]
  kl = jnp.sum(kl, axis=-1) if kl_reduction == "sum" else jnp.mean(kl, axis=-1)
  return rec + beta * jnp.mean(kl)


def text_latent_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """Eq. 10: delta = softmax(Q K^T / sqrt(d_k)) V, one head.

  q [B, P, d_k] (= T_init W_Q), k [B, K, d_k] (= z W_K), v [B, K, D] (= z W_V)
  -> delta [B, P, D]. With K = 1 (D8 default) the softmax is over one key and
  delta = z W_V for every prompt.
  """
  logits = jnp.einsum("bpc,bkc->bpk", q, k) / math.sqrt(q.shape[-1])  # [B, P, K]
  return jnp.einsum("bpk,bkd->bpd", jax.nn.softmax(logits, axis=-1), v)


def margin_regularizer(t_final: jax.Array, t_init: jax.Array, xi: float) -> jax.Array:
  """Eq. 12: L_reg = mean over prompts (and images) of max(0, xi - cos(T_final, sg(T_init))).

  t_final [B, P, D], t_init [B, P, D] or [P, D] -> scalar. The gradient reaches T_final only.
  """
  cos = jnp.sum(l2_normalize(t_final) * l2_normalize(jax.lax.stop_gradient(t_init)), axis=-1)  # [B, P]
  return jnp.mean(jax.nn.relu(xi - cos))


class VCPG(nnx.Module):
  """VAE + text-latent cross-attention + gated injection.

  Args:
    dim: D, width of V_syn^g and of the prompt embeddings (768).
    latent_dim: Z (D8: 128).
    latent_tokens: K; the latent is split into K tokens of Z/K dims (D8: 8, so that
      Eq. 10's attention differs per prompt). With K = 1 (the earlier default) the
      softmax is over one key, so W_Q and W_K never affect the output and never get a
      gradient, and delta is the same vector for every prompt.
    attn_dim: d_k of Eq. 10 (the paper gives none; 128).
    dec_dim: hidden width of the decoder MLP Dec (None: dim).
    beta: KL weight of Eq. 9 (0.1).
    kl_reduction, rec_reduction: D19, "sum" (default) or "mean"; see `vae_loss`.
    stop_grad_input: D18 (default True): V_syn^g enters the VAE (encoder input and
      reconstruction target) through a stop-gradient; False lets L_VAE reshape HSVS.
    xi: margin of Eq. 12 (0.85).
    use_ln: D12, the LayerNorm of Eq. 11 (on); off gives T_init + alpha * delta.
    enabled: False is the "VCPG off" ablation: T_final = T_init for every
      image, zero L_VAE and L_reg, and no parameters are created.
    deterministic: default mode; True uses z = mu. `nnx.view(model,
      deterministic=True)` and the call argument both override it.
  """

  def __init__(self, dim: int = 768, *, latent_dim: int = 128, latent_tokens: int = 8, attn_dim: int = 128,
               dec_dim: int | None = None, beta: float = 0.1, kl_reduction: str = "sum",
               rec_reduction: str = "sum", stop_grad_input: bool = True, xi: float = 0.85,
               use_ln: bool = True, ln_eps: float = LN_EPS, enabled: bool = True, deterministic: bool = False,
               dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    if latent_tokens < 1 or latent_dim % latent_tokens:
      raise ValueError(f"vcpg.VCPG: latent_dim {latent_dim} must split into latent_tokens {latent_tokens} "
                       "equal tokens")
    for name, value in (("kl_reduction", kl_reduction), ("rec_reduction", rec_reduction)):
      if value not in KL_REDUCTIONS:
        raise ValueError(f"vcpg.VCPG: {name} must be one of {KL_REDUCTIONS}, got {value!r}")
    self.dim, self.latent_dim, self.latent_tokens = dim, latent_dim, latent_tokens
    self.kl_reduction, self.rec_reduction, self.stop_grad_input = kl_reduction, rec_reduction, stop_grad_input
    self.beta, self.xi, self.use_ln, self.enabled = beta, xi, use_ln, enabled
    self.deterministic = deterministic
    if not enabled:
      return
    lin = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    token_dim = latent_dim // latent_tokens
    self.to_mu = nnx.Linear(dim, latent_dim, **lin)       # F_mu of Eq. 7
    self.to_log_var = nnx.Linear(dim, latent_dim, **lin)  # F_sigma of Eq. 7
    self.decoder = MLP(latent_dim, dec_dim or dim, dim, **lin)
    # Eq. 10 projections, bias-free as written.
    self.w_q = nnx.Linear(dim, attn_dim, use_bias=False, **lin)
    self.w_k = nnx.Linear(token_dim, attn_dim, use_bias=False, **lin)
    self.w_v = nnx.Linear(token_dim, dim, use_bias=False, **lin)
    self.alpha = nnx.Param(jnp.zeros((), param_dtype))  # Eq. 11 gate, init 0
    self.norm = nnx.LayerNorm(dim, epsilon=ln_eps, **lin) if use_ln else None

  def set_view(self, deterministic: bool | None = None):
    """Used by `nnx.view`: deterministic=True makes z = mu (evaluation).

    Args:
      deterministic: if True, no noise is drawn in Eq. 8.
    """
    if deterministic is not None:
      self.deterministic = deterministic

  def encode(self, v_global: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Eq. 7: mu = F_mu(V_syn^g), log_var = F_sigma(V_syn^g); [B, D] -> 2 x [B, Z].

    log_var is clamped to LOG_VAR_RANGE (D21), so exp(log_var) neither overflows nor vanishes.
    """
    return self.to_mu(v_global), jnp.clip(self.to_log_var(v_global), *LOG_VAR_RANGE)

  def modulate(self, t_init: jax.Array, z: jax.Array) -> jax.Array:
    """Projections of Eq. 10; t_init [B, P, D], z [B, Z] -> delta [B, P, D]."""
    tokens = z.reshape(z.shape[0], self.latent_tokens, -1)  # [B, K, Z/K]
    return text_latent_attention(self.w_q(t_init), self.w_k(tokens), self.w_v(tokens))

  def inject(self, t_init: jax.Array, delta: jax.Array) -> jax.Array:
    """Eq. 11: T_final = LN(T_init + alpha * delta) (LN per D12); t_init, delta [B, P, D]."""
    t = t_init + self.alpha[...] * delta
    return self.norm(t) if self.norm is not None else t

  def __call__(self, v_global: jax.Array, t_init: jax.Array, *, rngs: nnx.Rngs | None = None,
               deterministic: bool | None = None) -> VCPGOutput:
    """v_global: V_syn^g [B, D]; t_init: T_init [P, D] or [B, P, D]; rngs: with
    a `sample` stream, needed in training mode only. Returns a VCPGOutput."""
    if v_global.ndim != 2 or v_global.shape[-1] != self.dim:
      raise ValueError(f"vcpg.VCPG: V_syn^g must be [B, {self.dim}], got {v_global.shape}")
    batch = v_global.shape[0]
    if t_init.ndim not in (2, 3) or t_init.shape[-1] != self.dim or t_init.ndim == 3 and t_init.shape[0] != batch:
      raise ValueError(f"vcpg.VCPG: T_init must be [P, {self.dim}] or [B={batch}, P, {self.dim}] (one row per "
                       f"prompt), got {t_init.shape}")
    t_init = jnp.broadcast_to(t_init, (batch, *t_init.shape[-2:]))  # [B, P, D]
    if not self.enabled:
      zero = jnp.zeros((), v_global.dtype)
      return VCPGOutput(t_init, zero, zero)

    deterministic = self.deterministic if deterministic is None else deterministic
    if self.stop_grad_input:  # D18
      v_global = jax.lax.stop_gradient(v_global)
    mu, log_var = self.encode(v_global)
    eps = None
    if not deterministic:
      if rngs is None:
        raise ValueError("vcpg.VCPG: training mode draws eps (Eq. 8) and needs rngs=nnx.Rngs(sample=...); "
                         "for evaluation pass deterministic=True or use nnx.view(model, deterministic=True)")
      eps = jax.random.normal(rngs.sample(), mu.shape, mu.dtype)
    z = reparameterize(mu, log_var, eps)
    recon = self.decoder(z)
    delta = self.modulate(t_init, z)
    t_final = self.inject(t_init, delta)
    return VCPGOutput(t_final=t_final, l_vae=vae_loss(v_global, recon, mu, log_var, self.beta, self.kl_reduction,
                                                          self.rec_reduction),
                      l_reg=margin_regularizer(t_final, t_init, self.xi), mu=mu, log_var=log_var, z=z,
                      recon=recon, delta=delta)
