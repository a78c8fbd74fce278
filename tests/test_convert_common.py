"""Checkpoint reading and the strict key table shared by both converters."""

import os
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from convert import common
from ssvp_jax.models.bundle import WeightLoadError


def test_bf16_safetensors_read_as_float32(tmp_path):
  w = torch.randn(3, 5).to(torch.bfloat16)
  save_file({"w": w}, str(tmp_path / "model.safetensors"))
  out = common.read_checkpoint(str(tmp_path))  # a folder with model.safetensors
  assert out["w"].dtype == np.float32
  np.testing.assert_array_equal(out["w"], w.float().numpy())


class _Evil:
  def __reduce__(self):
    return (os.system, ("echo pwned",))


def test_pickled_code_is_refused(tmp_path):
  path = tmp_path / "evil.pth"
  with open(path, "wb") as f:
    pickle.dump({"w": _Evil()}, f)
  with pytest.raises(ValueError, match="weights_only=True"):
    common.read_checkpoint(str(path))


def test_state_dict_wrappers_and_non_tensors(tmp_path):
  torch.save({"state_dict": {"a": torch.ones(2)}, "epoch": 3}, tmp_path / "ckpt.pt")
  assert list(common.read_checkpoint(str(tmp_path / "ckpt.pt"))) == ["a"]
  torch.save({"epoch": 3}, tmp_path / "none.pt")
  with pytest.raises(ValueError, match="holds no tensors"):
    common.read_checkpoint(str(tmp_path / "none.pt"))


def test_apply_rules_names_every_offender():
  rules = common.expand([common.Rule("blocks.{i}.kernel", "layer.{i}.weight", common.transpose),
                         common.Rule("norm.scale", "norm.weight")], num_layers=2)
  state = {"layer.0.weight": np.ones((2, 3)), "norm.weight": np.ones(3), "extra": np.ones(1),
           "position_ids": np.arange(3)}
  with pytest.raises(WeightLoadError) as e:
    common.apply_rules(state, rules, "src.bin", ignore=[r"position_ids"])
  assert "layer.1.weight" in str(e.value) and "extra" in str(e.value) and "position_ids" not in str(e.value)
  state["layer.1.weight"] = np.zeros((2, 3))
  del state["extra"]
  out = common.apply_rules(state, rules, "src.bin", ignore=[r"position_ids"])
  assert out["blocks.0.kernel"].shape == (3, 2) and set(out) == {"blocks.0.kernel", "blocks.1.kernel", "norm.scale"}
