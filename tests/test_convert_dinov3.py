"""convert/dinov3.py: transformers folder and Meta .pth -> bundle -> dinov3.load, and its errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

from convert import dinov3 as conv
from helpers.hf_dinov3 import random_hf_model
from helpers.vit import TOL, hf_state, images, max_diff, torch_outputs
from ssvp_jax.models import dinov3
from ssvp_jax.models.bundle import WeightLoadError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(args: list[str]) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})


def assert_matches(model: dinov3.DINOv3, hf, shapes, layers) -> None:
  encode = nnx.jit(lambda m, x: m.encode_image(x, layers=layers))
  for shape in shapes:
    x = images(shape, batch=1, seed=11)
    ref_hidden, ref_last = torch_outputs(hf, x)
    out = encode(model, x)
    for l, h in zip(layers, out.hidden_states):
      assert max_diff(h, ref_hidden[l]) <= TOL, (shape, l)
    assert max_diff(out.last_hidden_state, ref_last) <= TOL, shape


def meta_state(hf, k_bias_junk: float = 0.5) -> dict[str, np.ndarray]:
  """A Meta-layout state dict of `hf`'s weights, RoPE periods rounded to bf16 as in Meta's files."""
  cfg = conv.hf_config(hf.config.to_dict())
  state = conv.hf_to_meta(hf_state(hf), cfg, k_bias_junk=k_bias_junk)
  state["rope_embed.periods"] = torch.tensor(state["rope_embed.periods"]).bfloat16().float().numpy()
  return state


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """A transformers folder (save_pretrained) of random config-A weights, and the model."""
  hf = random_hf_model("A", seed=1)
  path = tmp_path_factory.mktemp("hf") / "dinov3"
  hf.save_pretrained(str(path))
  return str(path), hf


def test_cli_transformers_folder(hf_dir, tmp_path):
  src, hf = hf_dir
  out = str(tmp_path / "bundle")
  r = run_cli(["convert/dinov3.py", "--src", src, "--out", out])
  assert r.returncode == 0, r.stderr
  assert "transformers layout" in r.stdout and "3 layers, width 60, 3 heads" in r.stdout
  model = dinov3.load(out)
  assert model.cfg == conv.hf_config(hf.config.to_dict())
  assert_matches(model, hf, [(24, 24), (16, 12)], layers=(1, 3))


def test_cli_meta_pth_gated(tmp_path):
  hf = random_hf_model("B", seed=2)
  torch.save({k: torch.from_numpy(v) for k, v in meta_state(hf).items()}, tmp_path / "meta.pth")
  out = str(tmp_path / "bundle")
  r = run_cli(["-m", "convert.dinov3", "--src", str(tmp_path / "meta.pth"), "--out", out])
  assert r.returncode == 0, r.stderr
  assert "Meta layout" in r.stdout and "gated silu" in r.stdout
  model = dinov3.load(out)
  assert model.cfg == conv.hf_config(hf.config.to_dict())  # every field inferred from shapes
  assert_matches(model, hf, [(48, 40)], layers=(2, 4))


@pytest.mark.parametrize("name", ["A", "C"])
def test_meta_and_transformers_layouts_agree(name):
  hf = random_hf_model(name, seed=4)
  cfg = conv.hf_config(hf.config.to_dict())
  meta = meta_state(hf)
  assert conv.meta_config(meta) == cfg  # heads from the periods buffer
  from_meta, from_hf = conv.meta_to_flax(meta, cfg), conv.hf_to_flax(hf_state(hf), cfg)
  assert sorted(from_meta) == sorted(from_hf)
  for k in from_hf:
    np.testing.assert_array_equal(from_meta[k], from_hf[k], err_msg=k)


def test_meta_heads_default_and_flag():
  hf = random_hf_model("A", seed=4)
  meta = meta_state(hf)
  del meta["rope_embed.periods"]
  assert conv.meta_config(meta).num_heads == 1  # width 60 // 64 -> at least 1: the documented default
  assert conv.meta_config(meta, num_heads=3).num_heads == 3
  with pytest.raises(ValueError, match=r"meta.pth: the inferred config .* head_dim 10 .* divisible by 4"):
    conv.meta_config(meta, num_heads=6, source="meta.pth")


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
    del s["layer.1.norm2.bias"], s["norm.weight"]
    s["layer.0.attention.k_proj.bias"] = np.zeros(60, np.float32)  # this model has no key bias
    s["layer.0.extra"] = np.zeros(3, np.float32)
  src = _hf_copy(hf_dir, tmp_path, edit)
  with pytest.raises(WeightLoadError) as e:
    conv.convert_checkpoint(src)
  msg = str(e.value)
  assert src in msg
  assert "missing keys (2): layer.1.norm2.bias, norm.weight" in msg
  assert "unexpected keys (2): layer.0.attention.k_proj.bias, layer.0.extra" in msg


def test_wrong_shapes_are_named(hf_dir, tmp_path):
  def edit(s):
    s["layer.0.mlp.up_proj.weight"] = s["layer.0.mlp.up_proj.weight"][:99]
    s["layer.2.layer_scale2.lambda1"] = np.ones(61, np.float32)
  with pytest.raises(WeightLoadError) as e:
    conv.convert_checkpoint(_hf_copy(hf_dir, tmp_path, edit))
  msg = str(e.value)
  assert "layer.0.mlp.up_proj.weight -> layers.0.mlp.up.kernel: expected (60, 100), got (60, 99)" in msg
  assert "layer.2.layer_scale2.lambda1 -> layers.2.ls2.scale: expected (60,), got (61,)" in msg


def test_wrong_rank_is_named(hf_dir, tmp_path):
  def edit(s):
    s["embeddings.patch_embeddings.weight"] = s["embeddings.patch_embeddings.weight"].reshape(60, -1)
  with pytest.raises(WeightLoadError, match=r"embeddings.patch_embeddings.weight has shape \(60, 48\), "
                                            r"which cannot map to patch_embed.kernel"):
    conv.convert_checkpoint(_hf_copy(hf_dir, tmp_path, edit))


def test_not_a_checkpoint(tmp_path):
  (tmp_path / "junk.pth").write_text("hello, not a checkpoint")
  with pytest.raises(ValueError, match=r"junk.pth: not a readable PyTorch checkpoint"):
    conv.convert_checkpoint(str(tmp_path / "junk.pth"))
  (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
  with pytest.raises(ValueError, match=r"junk.safetensors: not a readable safetensors file"):
    conv.convert_checkpoint(str(tmp_path / "junk.safetensors"))
  torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
  with pytest.raises(WeightLoadError, match=r"other.pth: not a DINOv3 ViT checkpoint .*first keys: fc.weight"):
    conv.convert_checkpoint(str(tmp_path / "other.pth"))


def test_folder_without_weights_or_config(hf_dir, tmp_path):
  src, _ = hf_dir
  (tmp_path / "config.json").write_text(open(os.path.join(src, "config.json")).read())
  with pytest.raises(FileNotFoundError, match=r"no weights found"):
    conv.convert_checkpoint(str(tmp_path))
  lone = tmp_path / "lone"
  lone.mkdir()
  save_file(load_file(os.path.join(src, "model.safetensors")), str(lone / "model.safetensors"))
  with pytest.raises(FileNotFoundError, match=r"need their config.json"):
    conv.convert_checkpoint(str(lone))
  (lone / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
  with pytest.raises(ValueError, match=r"model_type is 'clip_vision_model', expected 'dinov3_vit'"):
    conv.convert_checkpoint(str(lone))


def test_meta_bias_mask_and_periods_checks():
  hf = random_hf_model("A", seed=5)
  cfg = conv.hf_config(hf.config.to_dict())
  unmasked = meta_state(hf)
  unmasked["blocks.1.attn.qkv.bias_mask"][:] = 1.0  # the junk key bias would now be used
  with pytest.raises(WeightLoadError, match=r"blocks.1.attn.qkv.bias: key part is non-zero"):
    conv.meta_to_flax(unmasked, cfg)
  nan_mask = meta_state(hf)
  nan_mask["blocks.2.attn.qkv.bias_mask"][:] = np.nan
  with pytest.raises(WeightLoadError, match=r"blocks.2.attn.qkv.bias_mask holds NaN"):
    conv.meta_to_flax(nan_mask, cfg)
  with pytest.raises(WeightLoadError, match=r"rope_embed.periods .* does not match head_dim 20 and rope_theta 10"):
    conv.meta_to_flax(meta_state(hf), conv.meta_config(meta_state(hf), rope_theta=10.0))


def test_cli_reports_errors(tmp_path):
  r = run_cli(["convert/dinov3.py", "--src", str(tmp_path / "nowhere"), "--out", str(tmp_path / "b")])
  assert r.returncode == 2
  assert "error:" in r.stderr and "nowhere: no such file or folder" in r.stderr
  assert not (tmp_path / "b").exists()


def test_out_is_replaced_only_with_overwrite_and_whole(hf_dir, tmp_path, capsys):
  src, _ = hf_dir
  out = str(tmp_path / "bundle")
  assert conv.main(["--src", src, "--out", out]) == 0
  open(os.path.join(out, "stale.txt"), "w").close()  # e.g. a tokenizer/ left from another conversion
  assert conv.main(["--src", src, "--out", out]) == 2
  assert "exists and is not empty; pass --overwrite" in capsys.readouterr().err
  assert conv.main(["--src", src, "--out", out, "--overwrite"]) == 0
  assert sorted(os.listdir(out)) == ["config.json", "weights.safetensors"]  # nothing stale
  assert sorted(os.listdir(tmp_path)) == ["bundle"]  # no temporary folder left
