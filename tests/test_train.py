"""The real training loop on the tiny config: loss falls, only the heads change, resume is exact."""

import json
import os

import numpy as np
import pytest
from flax import nnx

from helpers.tiny import flat, tiny_config, with_data
from ssvp_jax import evaluate, trainer
from ssvp_jax.build import build_model
from ssvp_jax.data import splits
from ssvp_jax.models.ssvp import FROZEN, TRAINABLE



def test_loss_falls_and_only_heads_change(tmp_path, data_dir):
  c = with_data(tiny_config(**{"optim.epochs": 6, "optim.lr": 3e-3, "optim.lr_prompt": 3e-3,
                               "optim.warmup_frac": 0.0}), data_dir)
  before, _ = build_model(c)
  model, _, summary = trainer.train(c, str(tmp_path))
  assert summary["step"] == 6 * (16 // 4)
  with open(tmp_path / "log.jsonl") as f:
    losses = [json.loads(line)["loss/total"] for line in f]
  assert np.mean(losses[-4:]) < np.mean(losses[:4]), losses
  # Frozen backbones: bit-identical; every head parameter group moved.
  for k, v in flat(before, FROZEN).items():
    np.testing.assert_array_equal(v, flat(model, FROZEN)[k], err_msg=k)
  after = flat(model, TRAINABLE)
  changed = {k for k, v in flat(before, TRAINABLE).items() if not np.array_equal(v, after[k])}
  for group in ("prompts.background", "prompts.state", "hsvs.clip_maps", "hsvs.local_blocks", "vcpg.alpha",
                "vtam.scale_gate", "vtam.spatial_gates"):
    assert any(k.startswith(group) for k in changed), group
  for name in ("config.json", "versions.json"):
    assert os.path.isfile(tmp_path / name)
  assert os.listdir(tmp_path / "tensorboard")


def test_interrupt_and_resume_is_exact(tmp_path, data_dir):
  c = with_data(tiny_config(), data_dir)  # 2 epochs x 4 steps, a checkpoint every 2 steps
  full, tok, _ = trainer.train(c, str(tmp_path / "full"))
  part, _, s = trainer.train(c, str(tmp_path / "resumed"), stop_after_step=3)
  assert s["stopped_early"] and s["step"] == 3
  resumed, _, s = trainer.train(c, str(tmp_path / "resumed"))  # picks up the step-2 checkpoint
  assert s["step"] == 8
  a, b = flat(full, TRAINABLE), flat(resumed, TRAINABLE)
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7, err_msg=k)
  records = splits.read_split(c.eval_data.target, str(tmp_path), "eval_data.target")
  r1 = evaluate.evaluate_records(full, tok, c, records, "t", None)
  r2 = evaluate.evaluate_records(resumed, tok, c, records, "t", None)
  assert json.dumps(r1, sort_keys=True) == json.dumps(r2, sort_keys=True)


def test_train_and_evaluate_writes_reports_and_evaluation_is_deterministic(tmp_path, data_dir):
  c = with_data(tiny_config(**{"optim.epochs": 1}), data_dir)
  out = trainer.train_and_evaluate(c, str(tmp_path))
  for name in ("results.json", "results.csv", "results.md"):
    assert os.path.isfile(tmp_path / "eval" / name)
  overlays = os.path.join(tmp_path, "eval", "overlays", "target")
  assert sorted(os.listdir(overlays)) == ["dots", "gravel"]
  # The evaluate CLI path: config from the work directory, heads from the checkpoint.
  model, tok = evaluate.load_trained(evaluate.load_config(str(tmp_path)), str(tmp_path))
  again = evaluate.evaluate_datasets(c, model, tok, str(tmp_path))
  assert json.dumps(again, sort_keys=True) == json.dumps(out["results"], sort_keys=True)


def test_nan_loss_stops_with_the_step(tmp_path, data_dir):
  c = with_data(tiny_config(**{"optim.lr": float("nan"), "optim.warmup_frac": 0.0}), data_dir)
  with pytest.raises(FloatingPointError, match="at step 2"):
    trainer.train(c, str(tmp_path))


def test_missing_weights_and_roots_are_clear_errors(tmp_path):
  c = tiny_config(**{"backbones.semantic.random_init": ""})
  with pytest.raises(ValueError, match="convert/clip.py"):
    build_model(c)
  c = tiny_config()
  c.train_data.root = ""
  with pytest.raises(ValueError, match="config.train_data.root is empty"):
    trainer.train(c, str(tmp_path))


def test_maskless_anomalous_images_train_the_image_loss_only(tmp_path, caplog):
  """An anomalous training image without a mask (the folder layout allows it) has mask weight 0: its
  all-zero mask never reaches L_seg (changing it changes nothing), and the trainer logs how many there are."""
  import jax
  import ml_collections
  from PIL import Image
  from ssvp_jax.models.prompts import templates_for

  c = tiny_config()
  model, tok = build_model(c)
  t = templates_for(model, tok, ["brick"], c)
  rng = np.random.default_rng(0)
  batch = {"semantic": rng.normal(size=(4, 28, 28, 3)).astype(np.float32),
           "structural": rng.normal(size=(4, 16, 16, 3)).astype(np.float32),
           "mask": np.zeros((4, 28, 28), np.float32), "label": np.array([0, 1, 1, 0], np.int32),
           "class_index": np.zeros(4, np.int32), "mask_weight": np.array([1, 1, 0, 1], np.float32)}
  batch["mask"][1, 5:9, 5:9] = 1

  def loss(b):
    return float(trainer.loss_fn(model, b, (t.ids, t.eot), jax.random.key(0),
                                 ml_collections.FrozenConfigDict(c.loss))[0])

  base = loss(batch)
  other = dict(batch, mask=batch["mask"].copy())
  other["mask"][2, 10:20, 10:20] = 1  # the mask-less image's mask: ignored
  assert loss(other) == pytest.approx(base, rel=1e-6)
  other["mask"][1, 10:20, 10:20] = 1  # a weighted image's mask: counts
  assert loss(other) != pytest.approx(base, rel=1e-4)

  root = tmp_path / "parts"
  for sub, n in (("good", 4), ("crack", 4)):  # no masks/ folder: the 4 cracks carry no mask
    os.makedirs(root / sub)
    for i in range(n):
      Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / sub / f"{i}.png")
  c.train_data.name, c.train_data.root = "folder", str(root)
  c.optim.epochs = 1
  with caplog.at_level("INFO", logger="ssvp_jax"):
    _, _, summary = trainer.train(c, str(tmp_path / "wd"))
  assert np.isfinite(summary["loss/total"])
  assert "4 of 8 training images are anomalous without a mask" in caplog.text


def test_a_checkpoint_holds_the_live_training_state(tmp_path):
  """A save reads TrainStep's state, not the model object (stale until `sync`): a fresh model restores
  the trained parameters and optimiser step. The tree and digest equal those of the model objects after
  sync (checkpoint.trainable_state), so the on-disk format - and every older checkpoint - is unchanged."""
  import jax
  import ml_collections
  from ssvp_jax import checkpoint, optim
  from ssvp_jax.models.prompts import make_templates

  c = tiny_config()
  model, tok = build_model(c)
  optimizer = optim.make_optimizer(model, c.optim, 10, TRAINABLE)
  initial = flat(model, TRAINABLE)
  t = make_templates(tok, ["brick"], model.prompts.n_learnable)
  rng = np.random.default_rng(0)
  batch = {"semantic": rng.normal(size=(4, 28, 28, 3)).astype(np.float32),
           "structural": rng.normal(size=(4, 16, 16, 3)).astype(np.float32),
           "mask": (rng.random((4, 28, 28)) > 0.8).astype(np.float32), "label": np.array([0, 1, 1, 0], np.int32),
           "class_index": np.zeros(4, np.int32)}
  step = trainer.TrainStep(model, optimizer)
  for i in range(2):
    step(batch, (t.ids, t.eot), jax.random.key(i), ml_collections.FrozenConfigDict(c.loss))
  mgr = checkpoint.manager(str(tmp_path))
  checkpoint.save(mgr, 2, step.checkpoint_state(), {"step": 2})  # no sync: the model object is stale
  mgr.wait_until_finished()
  assert all(np.array_equal(v, flat(model, TRAINABLE)[k]) for k, v in initial.items())

  fresh, _ = build_model(c)  # the same initial parameters as `model`
  fresh_opt = optim.make_optimizer(fresh, c.optim, 10, TRAINABLE)
  assert checkpoint.restore(mgr, fresh, fresh_opt, TRAINABLE)["step"] == 2
  mgr.close()
  step.sync()
  trained = flat(model, TRAINABLE)
  assert any(not np.array_equal(v, trained[k]) for k, v in initial.items())  # the steps did train
  for k, v in flat(fresh, TRAINABLE).items():
    np.testing.assert_array_equal(v, trained[k], err_msg=k)
  assert int(fresh_opt.step[...]) == 2
  live = nnx.to_pure_dict(step.checkpoint_state())
  objects = nnx.to_pure_dict(checkpoint.trainable_state(model, optimizer, TRAINABLE))
  assert jax.tree.structure(live) == jax.tree.structure(objects)
  assert checkpoint.digest(live) == checkpoint.digest(objects)
