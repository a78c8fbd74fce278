"""The real training loop on the tiny config: loss falls, only the heads change, resume is exact."""

import importlib.util
import json
import os

import numpy as np
import pytest
from flax import nnx

from ssvp_jax import evaluate, trainer
from ssvp_jax.build import build_model
from ssvp_jax.models.ssvp import FROZEN, TRAINABLE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name, **overrides):
  """`configs/<name>.py`'s get_config() with {"section.field": value} overrides (the tests' one loader)."""
  spec = importlib.util.spec_from_file_location(f"{name}_config", os.path.join(ROOT, "configs", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  for key, value in overrides.items():
    section, field = key.split(".")
    c[section][field] = value
  return c


def tiny_config(**overrides):
  return load_config("tiny", **overrides)


def flat(model, filt):
  return {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, filt))}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """Demo data written once; runs copy nothing, they point their roots here."""
  wd = str(tmp_path_factory.mktemp("data"))
  c = tiny_config()
  trainer.prepare_demo_data(c.train_data, os.path.join(wd, "source"))
  trainer.prepare_demo_data(c.eval_data.target, os.path.join(wd, "target"))
  return wd


def with_data(c, data_dir):
  c.train_data.root = os.path.join(data_dir, "source")
  c.eval_data.target.root = os.path.join(data_dir, "target")
  return c


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
  records = trainer.read_split(c.eval_data.target, str(tmp_path), "eval_data.target")
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
  c = tiny_config(**{"clip.random_init": ""})
  with pytest.raises(ValueError, match="convert/clip.py"):
    build_model(c)
  c = tiny_config()
  c.train_data.root = ""
  with pytest.raises(ValueError, match="config.train_data.root is empty"):
    trainer.train(c, str(tmp_path))
