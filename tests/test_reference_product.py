"""The reference bank in the product: calibrate stores it, predict fuses it, export bakes it in."""

import os

import jax
import numpy as np
import pytest

from helpers.tiny import copy_workdir, target_records, tiny_config
from ssvp_jax import calibrate, export, fewshot, inference, jaxexport_runner, predict, reference
from ssvp_jax.data import datasets


def _train_normals(workdir, category):
  root = os.path.join(workdir, "data", "target")
  return [r for r in datasets.read_dataset("visa", root, "train", (category,)) if r.label == 0]


def test_calibrate_stores_a_bank_that_reloads_identical_and_other_weights_are_refused(
    trained_workdir, engine, tmp_path):  # noqa: F811
  from ssvp_jax.build import build_model
  workdir = copy_workdir(trained_workdir, str(tmp_path / "wd"))
  dots = engine.with_category("dots")
  good = [r.image_path for r in _train_normals(trained_workdir, "dots")]
  with_bank, owners = calibrate.store_bank(dots, workdir, good, batch_size=2, workers=0)
  assert owners == list(range(len(good)))
  path = reference.bank_path(workdir, "dots")
  loaded, meta = reference.load_bank(path, reference.fingerprint(dots.model, dots.config))
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(with_bank.bank)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert meta["num_references"] == len(good) and meta["files"] == good
  rec = calibrate.calibrate(with_bank, good, (), far=0.2, batch_size=2, workers=0, owners=owners)
  assert rec["reference"]["num_references"] == len(good)
  assert any("reference bank" in line for line in rec["summary"])
  # predict's engine picks the stored bank up; --no_reference leaves it out.
  assert inference.load_engine(workdir, "dots").bank is not None
  assert inference.load_engine(workdir, "dots", use_reference=False).bank is None
  # References of another size, grayscale, or unreadable: decoded as every image is, or reported.
  from PIL import Image
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70), np.uint8)).save(tmp_path / "gray.png")
  with open(tmp_path / "broken.png", "w") as f:
    f.write("not an image")
  odd = [good[0], str(tmp_path / "gray.png"), str(tmp_path / "broken.png")]
  bank, used, errors = inference.bank_from_files(dots, odd, batch_size=2, workers=0)
  assert used == odd[:2] and len(errors) == 1 and "broken.png" in errors[0]
  assert bank.layers[0].shape[0] == 2 * with_bank.bank.layers[0].shape[0] // len(good)
  other_config = tiny_config()
  other_config.seed = 1  # other random backbone weights
  other, _ = build_model(other_config)
  with pytest.raises(reference.BankError, match="other backbone weights"):
    reference.load_bank(path, reference.fingerprint(other, other_config))


def test_predict_with_a_bank_equals_the_fewshot_path_and_the_export(trained_workdir, engine, tmp_path):  # noqa: F811
  dots = engine.with_category("dots")
  refs = _train_normals(trained_workdir, "dots")[:2]
  test = [r for r in target_records(trained_workdir) if r.category == "dots"]
  paths = [r.image_path for r in test]
  pred = fewshot.score_category(dots.model, dots.config, test, [refs], np.asarray(dots.t_init), "dots")
  w = reference.settings(dots.config).weight
  bank, used, errors = inference.bank_from_files(dots, [r.image_path for r in refs], batch_size=3, workers=0)
  assert used == [r.image_path for r in refs] and not errors
  with_bank = dots.with_bank(bank, {"path": "bank.npz", "num_references": 2, "weight": w})
  rows = predict.predict(with_bank, paths, str(tmp_path / "pred"), batch_size=4)
  assert all(r["reference"] == "bank.npz" for r in rows)
  np.testing.assert_allclose([float(r["bank_score"]) for r in rows], pred["bank_scores"][0], atol=1e-5)
  np.testing.assert_allclose([float(r["score"]) for r in rows],
                             reference.fuse(pred["zs_scores"], pred["bank_scores"][0], w), atol=1e-5)
  maps = np.stack([np.load(r["map"]) for r in rows])
  np.testing.assert_allclose(maps, reference.fuse(pred["zs_maps"], pred["bank_maps"][0], w), atol=1e-5)
  assert np.std(pred["bank_scores"][0]) > 1e-4

  art = str(tmp_path / "model.jaxexport")
  meta = export.export_model(with_bank, art, 32, platforms=("cpu",))
  assert meta["reference"]["num_references"] == 2 and "bank_score" in meta["outputs"]
  model = jaxexport_runner.ExportedModel(art)
  out = model(np.stack([jaxexport_runner.read_image(p, 32) for p in paths]))
  np.testing.assert_allclose(out["score"], [float(r["score"]) for r in rows], atol=1e-5)
  np.testing.assert_allclose(out["bank_score"], [float(r["bank_score"]) for r in rows], atol=1e-5)
  np.testing.assert_allclose(out["map"], maps, atol=1e-5)
