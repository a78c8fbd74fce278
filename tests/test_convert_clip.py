"""convert/clip.py: transformers and OpenAI sources -> bundle -> clip.load, and its errors."""

import copy
import json
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from convert import clip as convert_clip
from helpers.hf_clip import (MERGES, SENTENCES, VOCAB_SIZE, encode_image, encode_text, hf_model, hf_state, images,
                             make_tokenizer, to_torch_images, write_openai_bpe)
from ssvp_jax.models import bundle, clip
from ssvp_jax.models.bundle import WeightLoadError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATOL = 1e-4


@pytest.fixture(scope="module")
def hf():
  return hf_model(seed=1)


@pytest.fixture(scope="module")
def hf_dir(hf, tmp_path_factory):
  """A transformers CLIPModel folder with its tokenizer beside it, as on the hub."""
  d = tmp_path_factory.mktemp("hf_clip")
  hf.save_pretrained(d)
  make_tokenizer().save_pretrained(d)
  return str(d)


@pytest.fixture(scope="module")
def flat(hf):
  return convert_clip.hf_to_flax(hf_state(hf), _config(hf))


@pytest.fixture(scope="module")
def openai_state(hf, flat):
  return convert_clip.flax_to_openai(flat, _config(hf))


def _config(hf):
  return convert_clip.config_from_hf(hf.config.vision_config, hf.config.text_config, hf.config.projection_dim)


def _cli(*args, module=False):
  cmd = [sys.executable] + (["-m", "convert.clip"] if module else [os.path.join("convert", "clip.py")])
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
  env.pop("PYTHONPATH", None)  # the script must find the repo by itself
  return subprocess.run(cmd + [str(a) for a in args], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=300)


def _assert_matches_hf(model, hf, tokenizer):
  """Taps, image embeds (non-square, bicubic as transformers) and text embeds against `hf`."""
  x = images(2, 35, 21, seed=5)
  out = encode_image(model, jnp.asarray(x), layers=(1, 3, 4))
  ids = clip.tokenize(tokenizer, SENTENCES, model.config.text.context_length)
  with torch.no_grad():
    ref = hf.vision_model(to_torch_images(x), output_hidden_states=True, interpolate_pos_encoding=True)
    img = hf.visual_projection(ref.pooler_output).numpy()
    txt = hf.text_projection(hf.text_model(input_ids=torch.from_numpy(ids.astype(np.int64))).pooler_output).numpy()
  for l, h in zip((1, 3, 4), out.hidden_states):
    np.testing.assert_allclose(np.asarray(h), ref.hidden_states[l].numpy(), rtol=0, atol=ATOL)
  np.testing.assert_allclose(np.asarray(out.image_embeds), img, rtol=0, atol=ATOL)
  np.testing.assert_allclose(np.asarray(encode_text(model, jnp.asarray(ids))), txt, rtol=0, atol=ATOL)


def _assert_same_tokens(tok, ref):
  for s in SENTENCES + ["Bottle-cap, SCREW 42 ünïcode"]:
    assert tok(s)["input_ids"] == ref(s)["input_ids"], s


# ----------------------------------------------------------------------------- end to end


def test_cli_transformers_folder(hf, hf_dir, tmp_path):
  """save_pretrained -> `python convert/clip.py` -> clip.load -> transformers' outputs."""
  out = tmp_path / "bundle"
  r = _cli("--src", hf_dir, "--out", out)
  assert r.returncode == 0, r.stderr
  assert "width 60 x 4 layers (3 heads)" in r.stdout and f"tokenizer of {VOCAB_SIZE}" in r.stdout
  assert sorted(os.listdir(out)) == ["config.json", "tokenizer", "weights.safetensors"]
  model = clip.load(str(out), pos_interpolation="bicubic")
  assert clip.load(str(out)).config.vision.pos_interpolation == "bilinear"  # the bundle's default
  tok = clip.load_tokenizer(str(out))
  _assert_same_tokens(tok, make_tokenizer())
  _assert_matches_hf(model, hf, tok)


def test_cli_module_vision_text_pair_with_openai_bpe(hf, tmp_path):
  """`python -m convert.clip` on CLIPVisionModelWithProjection + CLIPTextModelWithProjection,
  tokenizer built from an OpenAI-format BPE file."""
  from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection

  state = hf.state_dict()
  for cls, sub, prefixes, name in ((CLIPVisionModelWithProjection, hf.config.vision_config,
                                    ("vision_model.", "visual_projection."), "vision"),
                                   (CLIPTextModelWithProjection, hf.config.text_config,
                                    ("text_model.", "text_projection."), "text")):
    sub = copy.deepcopy(sub)
    sub.projection_dim = hf.config.projection_dim
    part = cls(sub)
    part.load_state_dict({k: v for k, v in state.items() if k.startswith(prefixes)})
    part.save_pretrained(tmp_path / name)
  bpe = write_openai_bpe(tmp_path / "bpe_toy.txt.gz")
  # Either order of the two folders works.
  r = _cli("--src", tmp_path / "text", "--text-src", tmp_path / "vision", "--out", tmp_path / "bundle",
           "--tokenizer", bpe, "--pos-interpolation", "bicubic", module=True)
  assert r.returncode == 0, r.stderr
  model = clip.load(str(tmp_path / "bundle"))
  assert model.config.vision.pos_interpolation == "bicubic"
  tok = clip.load_tokenizer(str(tmp_path / "bundle"))
  _assert_same_tokens(tok, make_tokenizer())
  _assert_matches_hf(model, hf, tok)


def test_openai_plain_state_dict(hf, openai_state, flat, tmp_path):
  torch.save({k: torch.from_numpy(np.array(v)) for k, v in openai_state.items()}, tmp_path / "ViT-toy.pt")
  write_openai_bpe(tmp_path / "bpe_simple_vocab_16e6.txt.gz")  # found beside the checkpoint
  convert_clip.main(["--src", str(tmp_path / "ViT-toy.pt"), "--out", str(tmp_path / "bundle"),
                     "--vision-heads", "3", "--text-heads", "3"])
  cfg, weights = bundle.read_bundle(str(tmp_path / "bundle"), "clip")
  assert clip.CLIPConfig.from_dict(cfg) == _config(hf)
  assert sorted(weights) == sorted(flat)
  model = clip.load(str(tmp_path / "bundle"), pos_interpolation="bicubic")
  _assert_matches_hf(model, hf, clip.load_tokenizer(str(tmp_path / "bundle")))


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_openai_torchscript_archive(hf, openai_state, flat, tmp_path):
  """OpenAI releases TorchScript archives; a scripted module tree holding the same tensors."""

  class Node(torch.nn.Module):
    pass

  root = Node()
  for key, value in openai_state.items():
    *path, leaf = key.split(".")
    m = root
    for p in path:
      if p not in m._modules:
        m.add_module(p, Node())
      m = m._modules[p]
    m.register_parameter(leaf, torch.nn.Parameter(torch.from_numpy(np.array(value)), requires_grad=False))
  root.register_buffer("input_resolution", torch.tensor(28))  # as in OpenAI's archives
  torch.jit.save(torch.jit.script(root), tmp_path / "ViT-toy-jit.pt")
  convert_clip.main(["--src", str(tmp_path / "ViT-toy-jit.pt"), "--out", str(tmp_path / "bundle"),
                     "--vision-heads", "3", "--text-heads", "3", "--tokenizer", write_openai_bpe(tmp_path / "b.gz")])
  _, weights = bundle.read_bundle(str(tmp_path / "bundle"), "clip")
  assert sorted(weights) == sorted(flat)
  for k, v in flat.items():
    np.testing.assert_array_equal(weights[k], v, err_msg=k)


def test_openai_mapping_inverts(hf, openai_state, flat):
  back = convert_clip.openai_to_flax(openai_state, _config(hf))
  assert sorted(back) == sorted(flat)
  for k, v in flat.items():
    np.testing.assert_array_equal(back[k], v, err_msg=k)
  # The fused in_proj is [q; k; v] with PyTorch's [out, in] layout.
  w = openai_state["visual.transformer.resblocks.2.attn.in_proj_weight"]
  np.testing.assert_array_equal(w[60:120], hf.state_dict()["vision_model.encoder.layers.2.self_attn.k_proj.weight"])


def test_openai_architecture_from_shapes(openai_state):
  cfg = convert_clip.config_from_openai(openai_state, 3, 3)
  assert (cfg.vision.image_size, cfg.vision.patch_size, cfg.vision.width, cfg.vision.layers,
          cfg.vision.mlp_dim) == (28, 7, 60, 4, 132)
  assert (cfg.text.vocab_size, cfg.text.context_length, cfg.text.width, cfg.text.layers,
          cfg.projection_dim) == (VOCAB_SIZE, 16, 36, 3, 20)
  # Without overrides heads are width // 64, as in every OpenAI release.
  wide = dict(openai_state, **{"visual.conv1.weight": np.zeros((1024, 3, 14, 14)), "ln_final.weight": np.zeros(768)})
  cfg = convert_clip.config_from_openai(wide)
  assert (cfg.vision.heads, cfg.text.heads) == (16, 12)
  with pytest.raises(ValueError, match="pass --vision-heads"):
    convert_clip.config_from_openai(openai_state)


def test_tokenizer_tables(tmp_path):
  from tokenizers import pre_tokenizers

  table = clip.bytes_to_unicode()
  assert set(table.values()) == set(pre_tokenizers.ByteLevel.alphabet()) and len(table) == 256
  assert (table[ord("!")], table[0], list(table.values()).index("a")) == ("!", "Ā", 64)  # "a" is id 64 in CLIP
  tok = clip.byte_level_tokenizer()
  assert len(tok) == clip.BYTE_VOCAB_SIZE == 514 and tok.eos_token_id == 513
  assert tok("ab")["input_ids"] == [512, 64, 256 + 65, 513]
  from_file = convert_clip.tokenizer_from_openai_bpe(write_openai_bpe(tmp_path / "bpe.txt.gz"), VOCAB_SIZE)
  _assert_same_tokens(from_file, make_tokenizer())


# ----------------------------------------------------------------------------- errors


def _convert_openai(state, tmp_path, *extra):
  torch.save({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, tmp_path / "bad.pt")
  convert_clip.main(["--src", str(tmp_path / "bad.pt"), "--out", str(tmp_path / "out"), "--vision-heads", "3",
                     "--text-heads", "3", "--tokenizer", write_openai_bpe(tmp_path / "b.gz"), *extra])


def test_missing_extra_and_misshaped_keys(openai_state, tmp_path):
  bad = dict(openai_state)
  del bad["visual.transformer.resblocks.1.mlp.c_fc.bias"]
  bad["visual.transformer.resblocks.1.attn.extra"] = np.zeros(3, np.float32)
  with pytest.raises(WeightLoadError) as e:
    _convert_openai(bad, tmp_path)
  msg = str(e.value)
  assert "bad.pt" in msg and "missing keys (1): visual.transformer.resblocks.1.mlp.c_fc.bias" in msg
  assert "unexpected keys (1): visual.transformer.resblocks.1.attn.extra" in msg

  bad = dict(openai_state, **{"visual.transformer.resblocks.2.mlp.c_fc.weight": np.zeros((131, 60), np.float32)})
  with pytest.raises(WeightLoadError, match=r"wrong shapes \(1\): vision.blocks.2.fc1.kernel: "
                                            r"expected \(60, 132\), got \(60, 131\)"):
    _convert_openai(bad, tmp_path)

  bad = {k: v for k, v in openai_state.items() if k != "ln_final.weight"}
  with pytest.raises(WeightLoadError, match="cannot read the architecture, key ln_final.weight is missing"):
    _convert_openai(bad, tmp_path)
  assert not (tmp_path / "out").exists()  # nothing written on any error


def test_transformers_folder_with_missing_key(hf, hf_dir, tmp_path):
  for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
    shutil.copy(os.path.join(hf_dir, f), tmp_path)
  state = {k: v for k, v in hf.state_dict().items() if k != "text_model.final_layer_norm.bias"}
  save_file(state, str(tmp_path / "model.safetensors"))
  with pytest.raises(WeightLoadError, match=r"missing keys \(1\): text_model.final_layer_norm.bias"):
    convert_clip.main(["--src", str(tmp_path), "--out", str(tmp_path / "out")])
  with pytest.raises(ValueError, match="without their config.json"):
    convert_clip.main(["--src", str(tmp_path / "model.safetensors"), "--out", str(tmp_path / "out")])


def test_not_a_checkpoint(tmp_path):
  (tmp_path / "notes.pt").write_text("these are not weights\n")
  (tmp_path / "noise.pth").write_bytes(os.urandom(256))
  for name in ("notes.pt", "noise.pth"):
    with pytest.raises(ValueError, match=f"{name}: not a readable PyTorch checkpoint"):
      convert_clip.main(["--src", str(tmp_path / name), "--out", str(tmp_path / "out")])
  torch.save({"a.weight": torch.zeros(2)}, tmp_path / "other.pt")
  with pytest.raises(ValueError, match="not a CLIP checkpoint"):
    convert_clip.main(["--src", str(tmp_path / "other.pt"), "--out", str(tmp_path / "out")])
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no weights found"):
    convert_clip.main(["--src", str(tmp_path / "empty"), "--out", str(tmp_path / "out")])
  with pytest.raises(FileNotFoundError, match="no such file or folder"):
    convert_clip.main(["--src", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "out")])


def test_vision_model_without_projection(hf, tmp_path):
  from transformers import CLIPVisionModel

  CLIPVisionModel(hf.config.vision_config).save_pretrained(tmp_path / "vision")
  hf.save_pretrained(tmp_path / "full")
  with pytest.raises(ValueError, match="pass its partner with --text-src"):
    convert_clip.main(["--src", str(tmp_path / "vision"), "--out", str(tmp_path / "out")])
  from transformers import CLIPTextModelWithProjection

  text_config = copy.deepcopy(hf.config.text_config)
  text_config.projection_dim = hf.config.projection_dim
  CLIPTextModelWithProjection(text_config).save_pretrained(tmp_path / "text")
  with pytest.raises(WeightLoadError, match="has no visual_projection.weight; a saved CLIPVisionModel has no "
                                            "projection"):
    convert_clip.main(["--src", str(tmp_path / "vision"), "--text-src", str(tmp_path / "text"),
                       "--out", str(tmp_path / "out")])
  with pytest.raises(ValueError, match="is a full CLIPModel: --text-src is only for a vision-only source"):
    convert_clip.main(["--src", str(tmp_path / "full"), "--text-src", str(tmp_path / "text"),
                       "--out", str(tmp_path / "out")])


def test_tokenizer_errors(hf_dir, openai_state, tmp_path):
  # No tokenizer beside an OpenAI checkpoint and none given.
  torch.save({k: torch.from_numpy(np.array(v)) for k, v in openai_state.items()}, tmp_path / "m.pt")
  with pytest.raises(FileNotFoundError, match="no tokenizer beside .* pass --tokenizer"):
    convert_clip.main(["--src", str(tmp_path / "m.pt"), "--out", str(tmp_path / "out"),
                       "--vision-heads", "3", "--text-heads", "3"])
  # A tokenizer of the wrong size: 30 merges where the text tower has 40.
  small = tmp_path / "small_tok"
  make_tokenizer(MERGES[:30]).save_pretrained(small)
  with pytest.raises(ValueError, match=f"tokenizer has {VOCAB_SIZE - 10} tokens but the text tower's "
                                       f"vocabulary has {VOCAB_SIZE}"):
    convert_clip.main(["--src", hf_dir, "--out", str(tmp_path / "out"), "--tokenizer", str(small)])
  # A BPE file too short for the vocabulary.
  short = write_openai_bpe(tmp_path / "short.txt.gz", MERGES[:5])
  with pytest.raises(ValueError, match=f"needs {len(MERGES)} merge lines"):
    convert_clip.main(["--src", hf_dir, "--out", str(tmp_path / "out"), "--tokenizer", short])
  # vocab.json + merges.txt only (no tokenizer.json): read, not the offline placeholder.
  vm = tmp_path / "vocab_merges"
  vm.mkdir()
  ref = make_tokenizer()
  (vm / "vocab.json").write_text(json.dumps(ref.get_vocab()))
  (vm / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in MERGES) + "\n")
  _assert_same_tokens(convert_clip.read_tokenizer(str(vm), VOCAB_SIZE), ref)
  assert not (tmp_path / "out").exists()


def test_load_tokenizer_checks_the_bundle(hf_dir, tmp_path):
  out = tmp_path / "bundle"
  convert_clip.main(["--src", hf_dir, "--out", str(out)])
  # transformers' offline placeholder: a folder it cannot read gives a tokenizer of length 2.
  for f in os.listdir(out / "tokenizer"):
    os.remove(out / "tokenizer" / f)
  with pytest.raises(ValueError, match="tokenizer has 2 tokens .* offline placeholder"):
    clip.load_tokenizer(str(out))
  make_tokenizer(MERGES[:39]).save_pretrained(out / "tokenizer")
  with pytest.raises(ValueError, match=f"has {VOCAB_SIZE - 1} tokens"):
    clip.load_tokenizer(str(out))
  with pytest.raises(FileNotFoundError, match="convert/clip.py"):
    clip.load_tokenizer(str(tmp_path / "nothing"))


def test_cli_reports_errors_without_traceback(tmp_path):
  (tmp_path / "x.pt").write_text("garbage")
  r = _cli("--src", tmp_path / "x.pt", "--out", tmp_path / "out")
  assert r.returncode == 2
  assert "convert/clip.py: error:" in r.stderr and "not a readable PyTorch checkpoint" in r.stderr
  assert "Traceback" not in r.stderr
