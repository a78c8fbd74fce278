"""convert/dinov2.py: transformers folders and Meta .pth -> bundle -> dinov2.load, and its errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

from convert import dinov2 as conv
from helpers.hf_dinov2 import random_hf_model
from helpers.vit import TOL, hf_state, images, max_diff, torch_outputs
from ssvp_jax.models import dinov2
from ssvp_jax.models.bundle import WeightLoadError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(args: list[str]) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})


def assert_matches(model: dinov2.DINOv2, hf, shapes, layers) -> None:
  encode = nnx.jit(lambda m, x: m.encode_image(x, layers=layers))
  for shape in shapes:
    x = images(shape, batch=1, seed=11)
    ref_hidden, ref_last = torch_outputs(hf, x)
    out = encode(model, x)
    for l, h in zip(layers, out.hidden_states):
      assert max_diff(h, ref_hidden[l]) <= TOL, (shape, l)
    assert max_diff(out.last_hidden_state, ref_last) <= TOL, shape


def save_meta(hf, path) -> str:
  meta = conv.hf_to_meta(hf_state(hf), conv.hf_config(hf.config.to_dict()))
  torch.save({k: torch.from_numpy(v) for k, v in meta.items()}, path)
  return str(path)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """A transformers folder (save_pretrained: the files' key names) of random config-B weights, and the model."""
  hf = random_hf_model("B", seed=1)
  path = tmp_path_factory.mktemp("hf") / "dinov2"
  hf.save_pretrained(str(path))
  return str(path), hf


def test_cli_transformers_folder_registers_swiglu(hf_dir, tmp_path):
  src, hf = hf_dir
  keys = set(load_file(os.path.join(src, "model.safetensors")))
  assert "encoder.layer.0.mlp.weights_in.weight" in keys  # the on-disk layout, not the in-memory one
  assert "encoder.layer.0.attention.attention.query.weight" in keys
  out = str(tmp_path / "bundle")
  r = run_cli(["convert/dinov2.py", "--src", src, "--out", out])
  assert r.returncode == 0, r.stderr
  assert "transformers layout" in r.stdout and "2 layers, width 72, 3 heads, MLP 192 SwiGLU" in r.stdout
  assert "native 40 px, 3 registers" in r.stdout
  model = dinov2.load(out)
  assert model.cfg == conv.hf_config(hf.config.to_dict()) and model.cfg.pos_antialias
  assert_matches(model, hf, [(40, 40), (24, 56)], layers=(1, 2))


def test_cli_meta_pth(tmp_path):
  hf = random_hf_model("A", seed=2)
  src = save_meta(hf, tmp_path / "meta.pth")
  out = str(tmp_path / "bundle")
  r = run_cli(["-m", "convert.dinov2", "--src", src, "--out", out, "--num-heads", "3"])
  assert r.returncode == 0, r.stderr
  assert "Meta layout" in r.stdout and "3 layers, width 60, 3 heads, MLP 240, patch 4, native 16 px" in r.stdout
  model = dinov2.load(out)
  assert model.cfg == conv.hf_config(hf.config.to_dict())  # every other field inferred from shapes
  assert_matches(model, hf, [(24, 24), (16, 12)], layers=(0, 2))


def test_meta_heads_default():
  hf = random_hf_model("D", seed=3)
  meta = conv.hf_to_meta(hf_state(hf), conv.hf_config(hf.config.to_dict()))
  assert conv.meta_config(meta).num_heads == 1  # width 36 // 64 -> at least 1: the documented default
  assert conv.meta_config(meta, num_heads=2) == conv.hf_config(hf.config.to_dict())


@pytest.mark.parametrize("name", ["A", "B", "C", "D"])
def test_meta_memory_and_disk_layouts_agree(name, tmp_path):
  hf = random_hf_model(name, seed=4)
  cfg = conv.hf_config(hf.config.to_dict())
  meta = conv.hf_to_meta(hf_state(hf), cfg)
  heads = hf.config.num_attention_heads
  assert conv.meta_config(meta, num_heads=heads) == cfg
  hf.save_pretrained(str(tmp_path))
  disk = load_file(str(tmp_path / "model.safetensors"))
  from_memory = conv.hf_to_flax(hf_state(hf), cfg)
  for other in (conv.meta_to_flax(meta, cfg), conv.hf_to_flax(disk, cfg),
                conv.hf_to_flax({"dinov2." + k: v for k, v in disk.items()}, cfg)):
    assert sorted(other) == sorted(from_memory)
    for k in from_memory:
      np.testing.assert_array_equal(other[k], from_memory[k], err_msg=k)


# ----------------------------------------------------------------------------- bad input

def _hf_copy(hf_dir, tmp_path, edit) -> str:
  """A copy of the transformers folder with its weights edited by `edit(state)`."""
  src, _ = hf_dir
  state = load_file(os.path.join(src, "model.safetensors"))
  edit(state)
  dst = tmp_path / "hf"
  dst.mkdir()
  save_file(state, str(dst / "model.safetensors"))
  (dst / "config.json").write_text(open(os.path.join(src, "config.json")).read())
  return str(dst)


def test_missing_and_extra_keys_are_all_named(hf_dir, tmp_path):
  def edit(s):
    del s["encoder.layer.1.norm2.bias"], s["embeddings.register_tokens"]
    s["encoder.layer.0.extra"] = np.zeros(3, np.float32)
  src = _hf_copy(hf_dir, tmp_path, edit)
  with pytest.raises(WeightLoadError) as e:
    conv.convert_checkpoint(src)
  msg = str(e.value)
  assert src in msg
  assert "missing keys (2): embeddings.register_tokens, encoder.layer.1.norm2.bias" in msg
  assert "unexpected keys (1): encoder.layer.0.extra" in msg


def test_wrong_shapes_are_named(hf_dir, tmp_path):
  def edit(s):
    s["encoder.layer.0.mlp.weights_in.weight"] = s["encoder.layer.0.mlp.weights_in.weight"][:380]
    s["embeddings.position_embeddings"] = s["embeddings.position_embeddings"][:, :17]
  with pytest.raises(WeightLoadError) as e:
    conv.convert_checkpoint(_hf_copy(hf_dir, tmp_path, edit))
  msg = str(e.value)
  assert "encoder.layer.0.mlp.weights_in.weight -> layers.0.mlp.gate.kernel: expected (72, 192), got (72, 190)" in msg
  assert "embeddings.position_embeddings -> pos_embed: expected (26, 72), got (17, 72)" in msg


def test_wrong_rank_is_named(hf_dir, tmp_path):
  def edit(s):
    s["embeddings.position_embeddings"] = s["embeddings.position_embeddings"][0]
  with pytest.raises(WeightLoadError, match=r"embeddings.position_embeddings has shape \(26, 72\), "
                                            r"which cannot map to pos_embed \(expected \[1, T, D\]"):
    conv.convert_checkpoint(_hf_copy(hf_dir, tmp_path, edit))


def test_meta_shape_problems_are_named():
  hf = random_hf_model("A", seed=5)
  meta = conv.hf_to_meta(hf_state(hf), conv.hf_config(hf.config.to_dict()))
  bad = {**meta, "pos_embed": meta["pos_embed"][:, :12]}
  with pytest.raises(WeightLoadError, match=r"meta.pth: pos_embed has shape \(1, 12, 60\): 11 patch positions"):
    conv.meta_config(bad, source="meta.pth")
  with pytest.raises(ValueError, match=r"meta.pth: the inferred config .* not divisible by num_heads 7"):
    conv.meta_config(meta, num_heads=7, source="meta.pth")
  no_cls = {k: v for k, v in meta.items() if k != "cls_token"}
  with pytest.raises(WeightLoadError, match=r"Meta-layout checkpoint without cls_token"):
    conv.meta_config(no_cls)


def test_not_a_checkpoint_and_wrong_configs(hf_dir, tmp_path):
  torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
  with pytest.raises(WeightLoadError, match=r"other.pth: not a DINOv2 ViT checkpoint .*first keys: fc.weight"):
    conv.convert_checkpoint(str(tmp_path / "other.pth"))
  src, _ = hf_dir
  lone = tmp_path / "lone"
  lone.mkdir()
  save_file(load_file(os.path.join(src, "model.safetensors")), str(lone / "model.safetensors"))
  with pytest.raises(FileNotFoundError, match=r"need their config.json"):
    conv.convert_checkpoint(str(lone))
  (lone / "config.json").write_text(json.dumps({"model_type": "dinov3_vit"}))
  with pytest.raises(ValueError, match=r"model_type is 'dinov3_vit', expected one of \('dinov2', "):
    conv.convert_checkpoint(str(lone))
  (lone / "config.json").write_text(json.dumps({"model_type": "dinov2", "image_size": [518, 224]}))
  with pytest.raises(ValueError, match=r"non-square image_size \[518, 224\]"):
    conv.convert_checkpoint(str(lone))


def test_cli_reports_errors(tmp_path):
  r = run_cli(["convert/dinov2.py", "--src", str(tmp_path / "nowhere"), "--out", str(tmp_path / "b")])
  assert r.returncode == 2
  assert "error:" in r.stderr and "nowhere: no such file or folder" in r.stderr
  assert not (tmp_path / "b").exists()
