"""Training losses of SSVP (SPEC section 5, Eqs. 20-22).

All terms work on probabilities. Before any log, a probability p is clipped to
[0, 1] and then squashed affinely into [EPS, 1 - EPS] with EPS = 1e-6:
p' = EPS + (1 - 2 EPS) p. Like a plain clip this bounds every log term by
-log(EPS) ~ 13.8 (float32 softmax outputs at tau = 0.07 do reach exactly 0 or
1); unlike a plain clip it keeps a gradient for a saturated wrong prediction.
The [0, 1] clip only matters for inputs outside that range (D6's raw-cosine
S_global can make S_final negative).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

EPS = 1e-6


class LossTerms(NamedTuple):
  """Each term unweighted, for logging, plus the weighted total (Eq. 22); all scalars."""
  seg: jax.Array    # L_seg (Eq. 20), focal (+ Dice when on) averaged over scales
  cls: jax.Array    # L_class (Eq. 21)
  vae: jax.Array    # L_VAE (Eq. 9, from VCPG)
  reg: jax.Array    # L_reg (Eq. 12, from VCPG)
  total: jax.Array  # L_seg + L_class + lambda1 L_VAE + lambda2 L_reg


def safe_prob(p: jax.Array, eps: float = EPS) -> jax.Array:
  """p clipped to [0, 1], then mapped affinely into [eps, 1 - eps] (see the module docstring)."""
  return eps + (1.0 - 2.0 * eps) * jnp.clip(p, 0.0, 1.0)


def focal_loss(prob: jax.Array, target: jax.Array, *, gamma: float = 2.0, eps: float = EPS) -> jax.Array:
  """Binary focal loss on probabilities, the per-scale term of Eq. 20.

  mean over every element of -[y (1 - p)^gamma log p + (1 - y) p^gamma log(1 - p)],
  i.e. -(1 - p_t)^gamma log p_t for a binary mask y (no class weight alpha, as
  AnomalyCLIP). prob, target: same shape (e.g. [B, H, W] or [B, N]) -> scalar.
  """
  p = safe_prob(prob, eps)
  y = target.astype(p.dtype)
  loss = -(y * (1.0 - p) ** gamma * jnp.log(p) + (1.0 - y) * p ** gamma * jnp.log1p(-p))
  return jnp.mean(loss)


def dice_loss(prob: jax.Array, target: jax.Array, *, smooth: float = 1.0) -> jax.Array:
  """D11 (off by default): 1 - (2 sum(p y) + s) / (sum p + sum y + s) per image, mean over batch.

  prob, target [B, ...] -> scalar. `smooth` s = 1 as AnomalyCLIP's BinaryDiceLoss.
  """
  p = prob.reshape(prob.shape[0], -1)
  y = target.reshape(target.shape[0], -1).astype(p.dtype)
  dice = (2.0 * jnp.sum(p * y, axis=-1) + smooth) / (jnp.sum(p, axis=-1) + jnp.sum(y, axis=-1) + smooth)
  return jnp.mean(1.0 - dice)


def segmentation_loss(scale_probs: Sequence[jax.Array], mask: jax.Array, *, focal_gamma: float = 2.0,
                      use_dice: bool = False, eps: float = EPS) -> jax.Array:
  """Eq. 20: L_seg = mean over scales l of focal(P^l, mask).

  scale_probs: L maps of abnormal probability, each the same shape as `mask`
  (the model chooses the resolution: token grid [B, N] or upsampled [B, H, W]).
  mask: binary {0, 1}. With use_dice (D11), each scale adds AnomalyCLIP's two
  Dice terms, dice(P, mask) + dice(1 - P, 1 - mask).
  """
  if not scale_probs:
    raise ValueError("losses.segmentation_loss: no probability maps given")
  terms = []
  for l, p in enumerate(scale_probs):
    if p.shape != mask.shape:
      raise ValueError(f"losses.segmentation_loss: scale {l} map has shape {p.shape} but the mask has "
                       f"{mask.shape}; resize one to the other first")
    term = focal_loss(p, mask, gamma=focal_gamma, eps=eps)
    if use_dice:
      y = mask.astype(p.dtype)
      term = term + dice_loss(p, y) + dice_loss(1.0 - p, 1.0 - y)
    terms.append(term)
  return jnp.mean(jnp.stack(terms))


def classification_loss(score: jax.Array, label: jax.Array, *, eps: float = EPS) -> jax.Array:
  """Eq. 21: L_class = BCE(S_final, label), mean over the batch; score, label [B] -> scalar."""
  if score.shape != label.shape:
    raise ValueError(f"losses.classification_loss: scores {score.shape} and labels {label.shape} differ in shape")
  p = safe_prob(score, eps)
  y = label.astype(p.dtype)
  return -jnp.mean(y * jnp.log(p) + (1.0 - y) * jnp.log1p(-p))


def total_loss(scale_probs: Sequence[jax.Array], mask: jax.Array, s_final: jax.Array, label: jax.Array,
               l_vae: jax.Array, l_reg: jax.Array, *, lambda1: float = 1.0, lambda2: float = 0.5,
               focal_gamma: float = 2.0, use_dice: bool = False, eps: float = EPS) -> LossTerms:
  """Eq. 22: L_total = L_seg + L_class + lambda1 * L_VAE + lambda2 * L_reg.

  scale_probs/mask as `segmentation_loss`; s_final, label [B]; l_vae, l_reg the
  scalars VCPG returns (zero when VCPG is off). Returns LossTerms.
  """
  seg = segmentation_loss(scale_probs, mask, focal_gamma=focal_gamma, use_dice=use_dice, eps=eps)
  cls = classification_loss(s_final, label, eps=eps)
  total = seg + cls + lambda1 * l_vae + lambda2 * l_reg
  return LossTerms(seg=seg, cls=cls, vae=jnp.asarray(l_vae), reg=jnp.asarray(l_reg), total=total)
