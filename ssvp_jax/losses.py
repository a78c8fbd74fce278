"""Training losses of SSVP (SPEC section 5, Eqs. 20-22; decisions D11, D17, D20).

A segmentation map reaches the loss either as logits (D20: each scale's P^l as
(M_a - M_n) / tau, upsampled; log p = log_sigmoid(logit), exact for any logit)
or as probabilities (the fused P_map, which is a gated sum and has no logit).
Before a log, a probability p is clipped to [0, 1] and squashed affinely into
[EPS, 1 - EPS] with EPS = 1e-6: p' = EPS + (1 - 2 EPS) p. Like a plain clip
this bounds every log term by -log(EPS) ~ 13.8; unlike a plain clip it keeps a
gradient for a saturated wrong prediction.

Per-example mask weights (`mask_weight` [B], 0 or 1) drop the pixels of
anomalous images that have no mask (a user's `folder` data) from the
segmentation loss: such an image trains the image loss only.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

EPS = 1e-6
SEG_FORMS = ("balanced", "mean")


class LossTerms(NamedTuple):
  """Each term unweighted, for logging, plus the weighted total (Eq. 22); all scalars."""
  seg: jax.Array    # L_seg (Eq. 20): focal + Dice, summed over the supervised maps (D11, D17)
  cls: jax.Array    # L_class (Eq. 21)
  vae: jax.Array    # L_VAE (Eq. 9, from VCPG)
  reg: jax.Array    # L_reg (Eq. 12, from VCPG)
  total: jax.Array  # L_seg + L_class + lambda1 L_VAE + lambda2 L_reg


def safe_prob(p: jax.Array, eps: float = EPS) -> jax.Array:
  """p clipped to [0, 1], then mapped affinely into [eps, 1 - eps] (see the module docstring)."""
  return eps + (1.0 - 2.0 * eps) * jnp.clip(p, 0.0, 1.0)


def log_probs(x: jax.Array, logits: bool, eps: float = EPS) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(p, log p, log(1 - p)) of a map given as logits (exact) or as probabilities (squashed)."""
  if logits:
    return jax.nn.sigmoid(x), jax.nn.log_sigmoid(x), jax.nn.log_sigmoid(-x)
  p = safe_prob(x, eps)
  return p, jnp.log(p), jnp.log1p(-p)


def _focal_terms(x: jax.Array, y: jax.Array, gamma: float, logits: bool, eps: float) -> jax.Array:
  """-(1 - p_t)^gamma log p_t per element (no class weight alpha, as AnomalyCLIP and Bayes-PFL)."""
  p, log_p, log_q = log_probs(x, logits, eps)
  return -(y * (1.0 - p) ** gamma * log_p + (1.0 - y) * p ** gamma * log_q)


def _example_weights(mask_weight: jax.Array | None, like: jax.Array) -> jax.Array:
  """[B] weights broadcast to the map's shape (ones when None)."""
  if mask_weight is None:
    return jnp.ones_like(like)
  w = mask_weight.astype(like.dtype).reshape((-1,) + (1,) * (like.ndim - 1))
  return jnp.broadcast_to(w, like.shape)


def focal_loss(prob: jax.Array, target: jax.Array, *, gamma: float = 2.0, eps: float = EPS,
               logits: bool = False, mask_weight: jax.Array | None = None) -> jax.Array:
  """Binary focal loss averaged over every (weighted) pixel: the "mean" form of D11.

  mean of -[y (1 - p)^gamma log p + (1 - y) p^gamma log(1 - p)] = -(1 - p_t)^gamma log p_t.
  prob (or logits), target: same shape (e.g. [B, H, W]) -> scalar.
  """
  y = target.astype(jnp.float32)
  w = _example_weights(mask_weight, y)
  loss = _focal_terms(prob, y, gamma, logits, eps)
  return jnp.sum(w * loss) / jnp.maximum(jnp.sum(w), 1.0)


def balanced_focal_loss(prob: jax.Array, target: jax.Array, *, gamma: float = 2.0, eps: float = EPS,
                        logits: bool = False, mask_weight: jax.Array | None = None) -> jax.Array:
  """D11 focal term (Bayes-PFL `loss.py` FocalLoss): the focal loss summed separately over the
  batch's anomalous and normal pixels, each sum divided by its pixel count, the two added.

  A batch without anomalous pixels contributes the normal half only. -> scalar.
  """
  y = target.astype(jnp.float32)
  w = _example_weights(mask_weight, y)
  loss = _focal_terms(prob, y, gamma, logits, eps)
  fg, bg = w * y, w * (1.0 - y)
  return (jnp.sum(fg * loss) / jnp.maximum(jnp.sum(fg), 1.0)
          + jnp.sum(bg * loss) / jnp.maximum(jnp.sum(bg), 1.0))


def dice_loss(prob: jax.Array, target: jax.Array, *, smooth: float = 1.0) -> jax.Array:
  """Per-image Dice 1 - (2 sum(p y) + s) / (sum p + sum y + s), mean over the batch.

  prob, target [B, ...] -> scalar. `smooth` s = 1 as AnomalyCLIP's BinaryDiceLoss (the "mean"
  form of D11 adds dice(P, y) + dice(1 - P, 1 - y)).
  """
  p = prob.reshape(prob.shape[0], -1)
  y = target.reshape(target.shape[0], -1).astype(p.dtype)
  dice = (2.0 * jnp.sum(p * y, axis=-1) + smooth) / (jnp.sum(p, axis=-1) + jnp.sum(y, axis=-1) + smooth)
  return jnp.mean(1.0 - dice)


def batch_dice_loss(prob: jax.Array, target: jax.Array, *, smooth: float = 1e-5,
                    mask_weight: jax.Array | None = None) -> jax.Array:
  """D11 Dice term (Bayes-PFL `loss.py` DiceLoss): 1 - (2 sum(p y) + s) / (sum p + sum y + s) on
  the anomalous class, every sum over the WHOLE batch (not per image); s = 1e-5 as Bayes-PFL."""
  y = target.astype(prob.dtype)
  w = _example_weights(mask_weight, y)
  return 1.0 - (2.0 * jnp.sum(w * prob * y) + smooth) / (jnp.sum(w * prob) + jnp.sum(w * y) + smooth)


def segmentation_loss(scale_probs: Sequence[jax.Array], mask: jax.Array, *, focal_gamma: float = 2.0,
                      use_dice: bool = True, eps: float = EPS, form: str = "balanced",
                      logits: bool | Sequence[bool] = False, mask_weight: jax.Array | None = None) -> jax.Array:
  """Eq. 20: L_seg over the supervised maps (each scale's P^l and, with D17, the fused P_map).

  Args:
    scale_probs: maps, each the same shape as `mask` ([B, H, W] or [B, N]); probabilities, or
      logits where `logits` says so.
    mask: binary {0, 1}.
    form: D11. "balanced" (default, Bayes-PFL): per map, `balanced_focal_loss` + (use_dice)
      `batch_dice_loss`, SUMMED over the maps. "mean" (the earlier default): per map,
      `focal_loss` + (use_dice) AnomalyCLIP's two per-image Dice terms, AVERAGED over the maps.
    logits: one flag for all maps or one per map (D20: scales as logits, P_map as probability).
    mask_weight: [B] per-example weights (0 for anomalous images without a mask).
  """
  if not scale_probs:
    raise ValueError("losses.segmentation_loss: no probability maps given")
  if form not in SEG_FORMS:
    raise ValueError(f"losses.segmentation_loss: form must be one of {SEG_FORMS}, got {form!r}")
  flags = [logits] * len(scale_probs) if isinstance(logits, bool) else list(logits)
  if len(flags) != len(scale_probs):
    raise ValueError(f"losses.segmentation_loss: {len(flags)} logits flags for {len(scale_probs)} maps")
  y = mask.astype(jnp.float32)
  terms = []
  for l, (x, is_logit) in enumerate(zip(scale_probs, flags)):
    if x.shape != mask.shape:
      raise ValueError(f"losses.segmentation_loss: scale {l} map has shape {x.shape} but the mask has "
                       f"{mask.shape}; resize one to the other first")
    x = x.astype(jnp.float32)
    p = jax.nn.sigmoid(x) if is_logit else x
    if form == "balanced":
      term = balanced_focal_loss(x, y, gamma=focal_gamma, eps=eps, logits=is_logit, mask_weight=mask_weight)
      if use_dice:
        term = term + batch_dice_loss(p, y, mask_weight=mask_weight)
    else:
      term = focal_loss(x, y, gamma=focal_gamma, eps=eps, logits=is_logit, mask_weight=mask_weight)
      if use_dice:
        keep = _example_weights(mask_weight, y)
        term = term + dice_loss(p * keep, y * keep) + dice_loss((1.0 - p) * keep, (1.0 - y) * keep)
    terms.append(term)
  stacked = jnp.stack(terms)
  return jnp.sum(stacked) if form == "balanced" else jnp.mean(stacked)


def classification_loss(score: jax.Array, label: jax.Array, *, eps: float = EPS) -> jax.Array:
  """Eq. 21: L_class = BCE(S_final, label), mean over the batch; score, label [B] -> scalar."""
  if score.shape != label.shape:
    raise ValueError(f"losses.classification_loss: scores {score.shape} and labels {label.shape} differ in shape")
  p = safe_prob(score.astype(jnp.float32), eps)
  y = label.astype(p.dtype)
  return -jnp.mean(y * jnp.log(p) + (1.0 - y) * jnp.log1p(-p))


def total_loss(scale_probs: Sequence[jax.Array], mask: jax.Array, s_final: jax.Array, label: jax.Array,
               l_vae: jax.Array, l_reg: jax.Array, *, lambda1: float = 1.0, lambda2: float = 0.5,
               focal_gamma: float = 2.0, use_dice: bool = True, eps: float = EPS, form: str = "balanced",
               logits: bool | Sequence[bool] = False, mask_weight: jax.Array | None = None) -> LossTerms:
  """Eq. 22: L_total = L_seg + L_class + lambda1 * L_VAE + lambda2 * L_reg.

  scale_probs/mask and the keywords as `segmentation_loss`; s_final, label [B]; l_vae, l_reg
  the scalars VCPG returns (zero when VCPG is off). Returns LossTerms.
  """
  seg = segmentation_loss(scale_probs, mask, focal_gamma=focal_gamma, use_dice=use_dice, eps=eps, form=form,
                          logits=logits, mask_weight=mask_weight)
  cls = classification_loss(s_final, label, eps=eps)
  total = seg + cls + lambda1 * l_vae + lambda2 * l_reg
  return LossTerms(seg=seg, cls=cls, vae=jnp.asarray(l_vae), reg=jnp.asarray(l_reg), total=total)
