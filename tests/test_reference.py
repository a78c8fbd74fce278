"""The reference bank (ssvp_jax/reference.py) against NumPy transcriptions of its definitions."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from ssvp_jax import reference
from ssvp_jax.fewshot import draw_references

SPEC = reference.Spec(backbones=("clip", "dino"), taps=(), top_percent=10.0, chunk=7)


def _unit(rng, *shape):
  x = rng.normal(size=shape).astype(np.float32)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _nn_dist(q, bank):
  """Brute force: 1 - max cosine, q [N, D], bank [M, D] -> [N] (float64)."""
  return 1.0 - (q.astype(np.float64) @ bank.astype(np.float64).T).max(-1)


def _top_mean(d, pct):
  k = max(1, math.ceil(d.shape[-1] * pct / 100 - 1e-9))
  return np.sort(d, -1)[..., -k:].mean(-1)


def test_nearest_distances_equal_brute_force():
  rng = np.random.default_rng(0)
  q = [_unit(rng, 2, 9, 5), _unit(rng, 2, 9, 3)]
  bank = [_unit(rng, 23, 5), _unit(rng, 23, 3)]          # 23 rows: chunks of 7 with padding
  got = reference.patch_distances([jnp.asarray(b) for b in bank], jnp.arange(23, dtype=jnp.int32),
                                  [jnp.asarray(x) for x in q], jnp.full((2, 9), -1, jnp.int32), chunk=7)
  want = np.stack([(_nn_dist(q[0][b], bank[0]) + _nn_dist(q[1][b], bank[1])) / 2 for b in range(2)])
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-6)
  whole = reference.patch_distances([jnp.asarray(b) for b in bank], jnp.arange(23, dtype=jnp.int32),
                                    [jnp.asarray(x) for x in q], jnp.full((2, 9), -1, jnp.int32), chunk=1000)
  np.testing.assert_allclose(np.asarray(whole), np.asarray(got), atol=1e-6)


@pytest.mark.parametrize("k", [1, 3])
def test_leave_one_out_scale_equals_its_definition(k):
  rng = np.random.default_rng(k)
  n = 16
  refs = [_unit(rng, k, n, 6), _unit(rng, k, n, 4)]
  bank = reference.build_bank(refs, SPEC)
  scores = []
  for i in range(k):
    if k == 1:  # each patch against the image's other patches
      d = np.stack([np.mean([_nn_dist(r[0, p:p + 1], np.delete(r[0], p, 0))[0] for r in refs]) for p in range(n)])
    else:       # each image against the other images' patches
      d = np.mean([_nn_dist(r[i], np.concatenate([r[j] for j in range(k) if j != i])) for r in refs], axis=0)
    scores.append(_top_mean(d, SPEC.top_percent))
  np.testing.assert_allclose(float(bank.scale), np.mean(scores), rtol=1e-5)
  assert bank.layers[0].shape == (k * n, 6)


def test_bank_outputs_normalise_and_squash():
  rng = np.random.default_rng(3)
  refs = [_unit(rng, 2, 16, 6)]
  spec = SPEC._replace(backbones=("clip",))
  bank = reference.build_bank(refs, spec)
  q = _unit(rng, 1, 16, 6)
  amap, score = reference.bank_outputs(bank, [jnp.asarray(q)], spec, size=8, sigma=0.0)
  z = _nn_dist(q[0], refs[0].reshape(-1, 6)) / float(bank.scale)
  np.testing.assert_allclose(float(score[0]), _top_mean(z, 10.0) / (1 + _top_mean(z, 10.0)), rtol=1e-5)
  assert amap.shape == (1, 8, 8) and 0 <= float(amap.min()) and float(amap.max()) < 1


def test_coreset_keeps_the_requested_rows_and_all_rows_at_one():
  rng = np.random.default_rng(4)
  refs = [_unit(rng, 3, 16, 6)]
  spec = SPEC._replace(backbones=("clip",))
  small = reference.build_bank(refs, spec, coreset=0.25)
  assert small.layers[0].shape == (12, 6) and len(set(np.asarray(small.index).tolist())) == 12
  np.testing.assert_array_equal(np.asarray(small.layers[0]), refs[0].reshape(-1, 6)[np.asarray(small.index)])
  full = reference.build_bank(refs, spec, coreset=1.0)
  np.testing.assert_array_equal(np.asarray(full.layers[0]), refs[0].reshape(-1, 6))


def test_mutual_scores_equal_brute_force():
  rng = np.random.default_rng(5)
  n_img, n = 5, 9
  feats = [_unit(rng, n_img, n, 4), _unit(rng, n_img, n, 3)]
  spec = SPEC._replace(top_percent=20.0)
  _, scores = reference.mutual_scores(feats, spec, lowest=0.5, size=6, sigma=0.0)
  r = math.ceil(0.5 * (n_img - 1))
  for i in range(n_img):
    d = np.stack([np.mean([_nn_dist(f[i], f[j]) for f in feats], axis=0) for j in range(n_img) if j != i])  # [n-1, N]
    z = np.sort(d, 0)[:r].mean(0)
    np.testing.assert_allclose(scores[i], _top_mean(z, 20.0), rtol=1e-5)


def test_same_seed_same_references_and_too_many_shots():
  items = [f"img{i}" for i in range(10)]
  assert draw_references(items, 4, 0, "x") == draw_references(items, 4, 0, "x")
  assert draw_references(items, 4, 0, "x") != draw_references(items, 4, 1, "x")
  with pytest.raises(ValueError, match=r"category 'gravel'.*--shots=11.*only 10 normal training images"):
    draw_references(items, 11, 0, "config.eval_data.t category 'gravel'")


def test_settings_fill_defaults_and_reject_bad_values():
  import ml_collections
  cfg = ml_collections.ConfigDict({"seed": 0})
  assert reference.settings(cfg).seeds == reference.DEFAULTS["seeds"]
  cfg.reference = ml_collections.ConfigDict({"weight": 1.5})
  with pytest.raises(ValueError, match="config.reference.weight"):
    reference.settings(cfg)


def test_bench_reference_smoke(capsys):
  import os
  import sys
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
  import bench_reference
  rows = bench_reference.main(["--smoke", "--shots=1,2"])
  assert [r["k"] for r in rows] == [1, 2] and rows[1]["rows"] == 2 * rows[0]["rows"]
  assert all(r["seconds"] > 0 and r["share"] > 0 for r in rows)
  assert "bank / inference" in capsys.readouterr().out
