"""Losses (Eqs. 20-22) by hand, and gradients through HSVS -> VCPG -> VTAM -> L_total."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ssvp_jax import losses
from ssvp_jax.models.hsvs import HSVS
from ssvp_jax.models.vcpg import VCPG
from ssvp_jax.models.vtam import VTAM

f32 = lambda x: jnp.asarray(x, jnp.float32)


def test_focal_loss_by_hand():
  p = f32([[0.9, 0.2], [0.5, 0.7]])
  y = f32([[1, 0], [1, 0]])
  # -(1 - p_t)^2 log p_t, p_t = p where y = 1 and 1 - p where y = 0.
  want = np.mean([-(0.1 ** 2) * np.log(0.9), -(0.2 ** 2) * np.log(0.8),
                  -(0.5 ** 2) * np.log(0.5), -(0.7 ** 2) * np.log(0.3)])
  np.testing.assert_allclose(losses.focal_loss(p, y), want, rtol=1e-5)
  # Focusing 0 is plain binary cross-entropy.
  bce = -np.mean([np.log(0.9), np.log(0.8), np.log(0.5), np.log(0.3)])
  np.testing.assert_allclose(losses.focal_loss(p, y, gamma=0.0), bce, rtol=1e-5)


def test_saturated_probabilities_stay_finite():
  # A confidently wrong pixel costs about -log(EPS) and still has a gradient.
  loss, grad = jax.value_and_grad(losses.focal_loss)(f32([0.0, 1.0]), f32([1, 0]))
  np.testing.assert_allclose(loss, -np.log(losses.EPS), rtol=1e-3)
  assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad) != 0)
  cls = losses.classification_loss(f32([1.0, 0.0, -0.3]), f32([0, 1, 1]))  # -0.3: D6 raw-cosine scores
  np.testing.assert_allclose(cls, -np.log(losses.EPS), rtol=1e-3)
  assert float(losses.focal_loss(f32([0.0, 1.0]), f32([0, 1]))) < 1e-10


def np_bayes_pfl_seg(maps, y, weights=None):
  """NumPy transcription of SPEC D11 (Bayes-PFL `loss.py` FocalLoss + DiceLoss, summed over maps in
  `train.py`): focal -(1-p_t)^2 log p_t summed over anomalous and over normal pixels, each divided by
  its count, the two added; Dice 1 - (2 sum(p y) + s) / (sum p + sum y + s), s = 1e-5, sums over the
  whole batch. Images with weight 0 are left out."""
  keep = np.ones(y.shape[0], bool) if weights is None else np.asarray(weights) > 0
  y = np.asarray(y, np.float64)[keep]
  total = 0.0
  for p in maps:
    p = np.asarray(p, np.float64)[keep]
    pt = np.where(y > 0, p, 1 - p)
    focal = -(1 - pt) ** 2 * np.log(pt)
    fg, bg = y > 0, y == 0
    total += focal[fg].sum() / max(fg.sum(), 1) + focal[bg].sum() / max(bg.sum(), 1)
    total += 1 - (2 * (p * y).sum() + 1e-5) / (p.sum() + y.sum() + 1e-5)
  return total


def test_segmentation_loss_d11_balanced_matches_numpy():
  rng = np.random.default_rng(0)
  y = (rng.random((3, 5, 5)) < 0.2).astype(np.float32)
  y[0] = 0  # a normal image in the batch
  maps = [rng.uniform(0.05, 0.95, (3, 5, 5)).astype(np.float32) for _ in range(3)]
  got = losses.segmentation_loss([f32(m) for m in maps], f32(y))
  np.testing.assert_allclose(got, np_bayes_pfl_seg(maps, y), rtol=1e-5)
  # The batch Dice is not the mean of per-image Dice terms.
  per_image = np.mean([1 - (2 * (maps[0][b] * y[b]).sum() + 1e-5) / (maps[0][b].sum() + y[b].sum() + 1e-5)
                       for b in range(3)])
  assert abs(float(losses.batch_dice_loss(f32(maps[0]), f32(y))) - per_image) > 1e-3
  # Without the Dice term: the class-balanced focal sum alone.
  no_dice = losses.segmentation_loss([f32(maps[0])], f32(y), use_dice=False)
  np.testing.assert_allclose(no_dice, np_bayes_pfl_seg([maps[0]], y) - (
      1 - (2 * (maps[0] * y).sum() + 1e-5) / (maps[0].sum() + y.sum() + 1e-5)), rtol=1e-5)


def test_segmentation_loss_mean_form_is_the_earlier_default():
  y = f32([[[1, 0], [0, 0]]])          # [1, 2, 2]
  p1 = f32([[[0.8, 0.1], [0.3, 0.0]]])
  p2 = f32([[[0.5, 0.5], [0.5, 0.5]]])
  f1, f2 = losses.focal_loss(p1, y), losses.focal_loss(p2, y)
  mean = dict(form="mean", use_dice=False)
  np.testing.assert_allclose(losses.segmentation_loss([p1, p2], y, **mean), (f1 + f2) / 2, rtol=1e-6)
  # Dice by hand: p2 vs y = 1 - (2*0.5 + 1)/(2 + 1 + 1) = 0.5; (1-p2) vs (1-y) = 1 - (2*1.5 + 1)/(2 + 3 + 1) = 1/3.
  np.testing.assert_allclose(losses.dice_loss(p2, y), 0.5, rtol=1e-6)
  np.testing.assert_allclose(losses.dice_loss(1 - p2, 1 - y), 1 / 3, rtol=1e-6)
  np.testing.assert_allclose(losses.dice_loss(y, y), 0.0, atol=1e-7)
  with_dice = losses.segmentation_loss([p2], y, form="mean", use_dice=True)
  np.testing.assert_allclose(with_dice, f2 + 0.5 + 1 / 3, rtol=1e-6)
  with pytest.raises(ValueError, match=r"scale 1 map has shape \(1, 4\) but the mask has \(1, 2, 2\)"):
    losses.segmentation_loss([p1, p2.reshape(1, 4)], y)
  with pytest.raises(ValueError, match="form must be one of"):
    losses.segmentation_loss([p1], y, form="sum")


def test_logits_d20_exact_and_keep_gradients():
  """D20: a map given as logits gives the loss of sigmoid(logit) exactly, and a saturated wrong pixel
  (|logit| = 40, where a clipped probability would be flat) keeps a gradient."""
  rng = np.random.default_rng(1)
  x = rng.normal(0, 2, (2, 4, 4)).astype(np.float32)
  y = (rng.random((2, 4, 4)) < 0.3).astype(np.float32)
  for form in ("balanced", "mean"):
    a = losses.segmentation_loss([f32(x)], f32(y), logits=True, form=form)
    b = losses.segmentation_loss([jax.nn.sigmoid(f32(x))], f32(y), form=form)
    np.testing.assert_allclose(a, b, rtol=1e-4)
  np.testing.assert_allclose(losses.segmentation_loss([f32(x)], f32(y), logits=True),
                             np_bayes_pfl_seg([1 / (1 + np.exp(-x.astype(np.float64)))], y), rtol=1e-4)
  sat = f32([[40.0, -40.0]])
  g = jax.grad(lambda z: losses.segmentation_loss([z], f32([[0, 1]]), logits=True, use_dice=False))(sat)
  assert np.all(np.abs(np.asarray(g)) > 0.1)
  # Mixed maps: one flag per map (scales as logits, the fused map as probabilities).
  both = losses.segmentation_loss([f32(x), jax.nn.sigmoid(f32(x))], f32(y), logits=[True, False])
  np.testing.assert_allclose(both, 2 * np_bayes_pfl_seg([1 / (1 + np.exp(-x.astype(np.float64)))], y), rtol=1e-4)


def test_mask_weight_drops_maskless_images_from_l_seg():
  """An anomalous image without a mask (weight 0) counts in neither form of L_seg: the loss equals the
  loss of the batch without it, and its pixels get no gradient."""
  rng = np.random.default_rng(2)
  p = rng.uniform(0.05, 0.95, (3, 4, 4)).astype(np.float32)
  y = (rng.random((3, 4, 4)) < 0.3).astype(np.float32)
  y[2] = 0  # its mask is missing: the pipeline gives zeros
  w = f32([1, 1, 0])
  for form in ("balanced", "mean"):
    got = losses.segmentation_loss([f32(p)], f32(y), form=form, mask_weight=w)
    want = losses.segmentation_loss([f32(p[:2])], f32(y[:2]), form=form)
    if form == "balanced":
      np.testing.assert_allclose(got, want, rtol=1e-5)
      np.testing.assert_allclose(got, np_bayes_pfl_seg([p], y, weights=[1, 1, 0]), rtol=1e-5)
    else:  # the focal mean is over kept pixels; the left-out image's per-image Dice counts as 0
      focal = losses.focal_loss(f32(p[:2]), f32(y[:2]))
      dice = [losses.dice_loss(f32(p[:2]), f32(y[:2])), losses.dice_loss(1 - f32(p[:2]), 1 - f32(y[:2]))]
      np.testing.assert_allclose(got, focal + (2 / 3) * sum(dice), rtol=1e-5)
    g = jax.grad(lambda q: losses.segmentation_loss([q], f32(y), form=form, mask_weight=w))(f32(p))
    assert not np.any(np.asarray(g)[2]) and np.any(np.asarray(g)[:2])


def test_classification_and_total_eq21_eq22():
  s, lab = f32([0.9, 0.3, 0.6]), f32([1, 0, 1])
  want_cls = -np.mean([np.log(0.9), np.log(0.7), np.log(0.6)])
  np.testing.assert_allclose(losses.classification_loss(s, lab), want_cls, rtol=1e-5)
  y = f32([[1, 0, 0]])
  p = [f32([[0.7, 0.2, 0.1]])]
  t = losses.total_loss(p, y, s, lab, f32(0.4), f32(0.2))
  np.testing.assert_allclose(t.total, t.seg + t.cls + 1.0 * 0.4 + 0.5 * 0.2, rtol=1e-6)
  np.testing.assert_allclose(t.cls, want_cls, rtol=1e-5)
  assert float(t.vae) == pytest.approx(0.4) and float(t.reg) == pytest.approx(0.2)
  t2 = losses.total_loss(p, y, s, lab, f32(0.4), f32(0.2), lambda1=2.0, lambda2=0.0)
  np.testing.assert_allclose(t2.total, t.seg + t.cls + 0.8, rtol=1e-6)
  with pytest.raises(ValueError, match="scores"):
    losses.classification_loss(s, lab[:2])


# ---- gradients through the three heads -------------------------------------------------------------

B, N, DC, DD, CIN, P, L = 2, 15, 24, 20, 28, 6, 2


class Heads(nnx.Module):
  def __init__(self, latent_tokens, *, rngs):
    self.hsvs = HSVS(L, clip_dim=DC, dino_dim=DD, clip_in_dim=CIN, num_heads=2, head_dim=4, mlp_dim=16, rngs=rngs)
    self.vcpg = VCPG(DC, latent_dim=12, latent_tokens=latent_tokens, attn_dim=8, dec_dim=10, rngs=rngs)
    self.vtam = VTAM(DC, L, gate_dim=7, learn_tau=True, rngs=rngs)


def batch(seed=0):
  rng = np.random.default_rng(seed)
  r = lambda *s: f32(rng.normal(size=s))
  mask = np.zeros((B, N), np.float32)
  mask[1, 3:6] = 1
  return dict(cl=[r(B, N, CIN) for _ in range(L)], dl=[r(B, N, DD) for _ in range(L)], cg=r(B, DC), dg=r(B, DD),
              t_init=r(P, DC), mask=f32(mask), label=f32([0, 1]))


def loss_fn(model, b, rngs):
  local, glob = model.hsvs(b["cl"], b["dl"], b["cg"], b["dg"])
  v = model.vcpg(glob, b["t_init"], rngs=rngs)
  out = model.vtam(local, glob, v.t_final)
  return losses.total_loss(out.scale_probs, b["mask"], out.s_final, b["label"], v.l_vae, v.l_reg).total


# One key per softmax makes these constant in their inputs, so they never get a gradient (documented in
# hsvs.HSVS and vcpg.VCPG): the global pair's Q/K projections always, VCPG's W_Q/W_K with one latent token.
GLOBAL_QK = ["hsvs.global_block.k_c.kernel", "hsvs.global_block.k_d.kernel", "hsvs.global_block.q_c.kernel",
             "hsvs.global_block.q_d.kernel"]

# Jitted once per model structure; eager differentiation of the whole chain is far slower on 2 cores.
STEP = nnx.jit(nnx.value_and_grad(loss_fn))


def flat_grads(model, b, seed=0):
  _, grads = STEP(model, b, nnx.Rngs(sample=seed))
  return {".".join(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(grads)}


@pytest.fixture(scope="module")
def heads():
  return Heads(latent_tokens=1, rngs=nnx.Rngs(0))  # D8 default; built once, the build dominates on 2 cores


def test_gradients_reach_every_parameter(heads):
  b = batch()
  # At alpha = 0 the prompt path is closed, yet alpha itself gets a gradient (what opens it).
  heads.vcpg.alpha[...] = f32(0.0)
  g0 = flat_grads(heads, b)
  assert np.abs(g0["vcpg.alpha"]) > 0
  assert not np.any(g0["vcpg.w_v.kernel"])  # delta enters as alpha * delta
  heads.vcpg.alpha[...] = f32(0.5)
  grads = flat_grads(heads, b)
  assert len(grads) == len(jax.tree.leaves(nnx.state(heads, nnx.Param)))
  assert all(np.all(np.isfinite(g)) for g in grads.values())
  # Everything else moves; VCPG's W_Q/W_K do with several latent tokens (tests/test_vcpg.py).
  dead = sorted(k for k, g in grads.items() if not np.any(g))
  assert dead == GLOBAL_QK + ["vcpg.w_k.kernel", "vcpg.w_q.kernel"], f"no gradient for {dead}"
  for needed in ("hsvs.clip_maps.0.kernel", "hsvs.local_blocks.1.q_c.kernel", "vcpg.w_v.kernel",
                 "vcpg.to_log_var.bias", "vtam.log_inv_tau", "vtam.spatial_gates.1.kernel",
                 "vtam.scale_gate.fc1.kernel"):
    assert needed in grads


def test_jitted_step_follows_the_key_and_evaluation_is_reproducible(heads):
  heads.vcpg.alpha[...] = f32(0.5)
  b = batch(2)
  l1, _ = STEP(heads, b, nnx.Rngs(sample=5))
  l2, _ = STEP(heads, b, nnx.Rngs(sample=5))
  l3, _ = STEP(heads, b, nnx.Rngs(sample=6))
  assert np.isfinite(float(l1)) and float(l1) == float(l2) and float(l1) != float(l3)
  # Evaluation view: no key needed, reproducible, and not the training loss of any key.
  evaluate = nnx.jit(loss_fn)
  ev = nnx.view(heads, deterministic=True)
  e1, e2 = evaluate(ev, b, None), evaluate(ev, b, None)
  assert np.isfinite(float(e1)) and float(e1) == float(e2) and float(e1) not in (float(l1), float(l3))
