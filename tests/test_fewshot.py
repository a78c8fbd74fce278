"""The few-shot protocol end to end on the tiny config: bank only untrained, fused and mutual trained."""

import json
import os

import numpy as np
import pytest

from helpers.tiny import run_python, tiny_config
from ssvp_jax import evaluate, fewshot


def test_bank_only_on_an_untrained_workdir_and_bad_shots(tmp_path):
  from ssvp_jax.build import build_model
  config = tiny_config()
  config.reference.seeds = 2
  model, tokenizer = build_model(config)
  workdir = str(tmp_path)
  results = fewshot.evaluate_fewshot(config, model, tokenizer, workdir, shots=2, trained=False)
  assert list(results) == ["target/bank-2shot"]
  doc = json.load(open(os.path.join(workdir, "eval_2shot", "results.json")))
  entry = doc["target/bank-2shot"]["gravel"]
  assert 0 <= entry["image_auroc"] <= 1 and entry["image_auroc_std"] >= 0
  assert os.path.isfile(os.path.join(workdir, "eval_2shot", "results.md"))
  # Same seeds, same references, same numbers.
  again = fewshot.evaluate_fewshot(config, model, tokenizer, workdir, shots=2, trained=False)
  assert again == results
  with pytest.raises(ValueError, match=r"category 'dots'.*--shots=4.*only 3 normal training images"):
    fewshot.evaluate_fewshot(config, model, tokenizer, workdir, shots=4, trained=False)


def test_no_training_split_skips_the_dataset(tmp_path, caplog):
  from ssvp_jax.build import build_model
  from PIL import Image
  for sub in ("good", "scratch"):
    os.makedirs(tmp_path / "user" / sub)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "user" / sub / "a.png")
  config = tiny_config()
  config.eval_data.target.update(name="folder", root=str(tmp_path / "user"))  # no training split
  config.eval_data.target.synth.layout = ""
  model, tokenizer = build_model(config)
  results = fewshot.evaluate_fewshot(config, model, tokenizer, str(tmp_path), shots=1, trained=False)
  assert results == {} and "no few-shot rows" in caplog.text


def test_trained_rows_fuse_the_zero_shot_row(trained_workdir, tmp_path):  # noqa: F811
  config = evaluate.load_config(trained_workdir)
  config.reference.seeds, config.reference.mutual = 1, True
  config.eval_data.target.root = os.path.join(trained_workdir, "data", "target")  # reports into tmp_path
  model, tokenizer = evaluate.load_trained(config, trained_workdir)
  results = fewshot.evaluate_fewshot(config, model, tokenizer, str(tmp_path), 1, trained=True)
  assert list(results) == ["target/zero-shot", "target/bank-1shot", "target/fused-1shot",
                           "target/mutual-transductive"]
  # The zero-shot row is the evaluation of eval/ (the same heads, the same images).
  zs = evaluate.evaluate_datasets(config, model, tokenizer, str(tmp_path))
  for cat, entry in results["target/zero-shot"].items():
    for k in ("image_auroc", "pixel_auroc"):
      np.testing.assert_allclose(entry[k], zs["target"][cat][k], atol=1e-6)
  # Weight 1 is the bank alone.
  config.reference.weight = 1.0
  only = fewshot.evaluate_fewshot(config, model, tokenizer, str(tmp_path), 1, trained=True)
  for cat, entry in only["target/fused-1shot"].items():
    for k in ("image_auroc", "pixel_auroc"):
      np.testing.assert_allclose(entry[k], only["target/bank-1shot"][cat][k], atol=1e-9)


def test_cli_shots_on_a_never_trained_workdir(tmp_path, tmp_path_factory):
  workdir = str(tmp_path / "fresh")
  res = run_python(["-m", "ssvp_jax.evaluate", "--config=configs/tiny.py", f"--workdir={workdir}", "--shots=1",
                    "--config.reference.seeds=1"], tmp_path_factory)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "target/bank-1shot" in res.stdout and "fused" not in res.stdout
  assert os.path.isfile(os.path.join(workdir, "eval_1shot", "results.csv"))
