"""PyTorch CLIP -> ssvp_jax bundle (weights.safetensors + config.json + tokenizer/).

    python convert/clip.py --src openai/clip-vit-large-patch14-336 --out weights/clip
    python convert/clip.py --src VISION_WITH_PROJ_DIR --text-src TEXT_WITH_PROJ_DIR --out weights/clip
    python convert/clip.py --src ViT-L-14-336px.pt --tokenizer bpe_simple_vocab_16e6.txt.gz --out weights/clip

Sources: a transformers `CLIPModel` folder; a `CLIPVisionModelWithProjection` folder
plus a `CLIPTextModelWithProjection` folder; or an OpenAI checkpoint (a plain state
dict or OpenAI's TorchScript release), whose architecture is read from the shapes.
The key maps are declarative `Rule` tables; `hf_to_flax` / `openai_to_flax` are pure
functions that the tests import. Everything is checked (keys, shapes, tokenizer
size) before anything is written.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gzip
import json
import os
import re
import sys

if __package__ in (None, ""):  # run as `python convert/clip.py`: make the repo importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from convert.common import (Rule, add_output_args, apply_rules, check_out, conv_to_hwio, expand, identity,
                            read_checkpoint, transpose, write_bundle)
from ssvp_jax.models import bundle, clip
from ssvp_jax.models.bundle import WeightLoadError

# ----------------------------------------------------------------------------- key tables


@dataclasses.dataclass(frozen=True)
class QKVSplit:
  """One third (0: q, 1: k, 2: v) of a fused in_proj [3D, D] weight or [3D] bias."""
  part: int
  weight: bool

  def __call__(self, x: np.ndarray) -> np.ndarray:
    y = np.split(x, 3, axis=0)[self.part]
    return np.ascontiguousarray(y.T if self.weight else y)

  def inverse(self, y: np.ndarray) -> np.ndarray:
    return y.T if self.weight else y


def _hwio_to_conv(x: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(x.transpose(3, 2, 0, 1))


_INVERSE = {identity: identity, transpose: transpose, conv_to_hwio: _hwio_to_conv}

# (our block path, the source block path, hook); ours are <tower>.blocks.{i}.<path>.
HF_BLOCK = [
    ("ln_1.scale", "layer_norm1.weight", identity),
    ("ln_1.bias", "layer_norm1.bias", identity),
    *[(f"attn.{p}.kernel", f"self_attn.{p}_proj.weight", transpose) for p in "qkv"],
    *[(f"attn.{p}.bias", f"self_attn.{p}_proj.bias", identity) for p in "qkv"],
    ("attn.out.kernel", "self_attn.out_proj.weight", transpose),
    ("attn.out.bias", "self_attn.out_proj.bias", identity),
    ("ln_2.scale", "layer_norm2.weight", identity),
    ("ln_2.bias", "layer_norm2.bias", identity),
    ("fc1.kernel", "mlp.fc1.weight", transpose),
    ("fc1.bias", "mlp.fc1.bias", identity),
    ("fc2.kernel", "mlp.fc2.weight", transpose),
    ("fc2.bias", "mlp.fc2.bias", identity),
]
OPENAI_BLOCK = [
    ("ln_1.scale", "ln_1.weight", identity),
    ("ln_1.bias", "ln_1.bias", identity),
    *[(f"attn.{p}.kernel", "attn.in_proj_weight", QKVSplit(i, True)) for i, p in enumerate("qkv")],
    *[(f"attn.{p}.bias", "attn.in_proj_bias", QKVSplit(i, False)) for i, p in enumerate("qkv")],
    ("attn.out.kernel", "attn.out_proj.weight", transpose),
    ("attn.out.bias", "attn.out_proj.bias", identity),
    ("ln_2.scale", "ln_2.weight", identity),
    ("ln_2.bias", "ln_2.bias", identity),
    ("fc1.kernel", "mlp.c_fc.weight", transpose),
    ("fc1.bias", "mlp.c_fc.bias", identity),
    ("fc2.kernel", "mlp.c_proj.weight", transpose),
    ("fc2.bias", "mlp.c_proj.bias", identity),
]

HF_TOP = [
    Rule("vision.patch_embed.kernel", "vision_model.embeddings.patch_embedding.weight", conv_to_hwio),
    Rule("vision.class_embedding", "vision_model.embeddings.class_embedding"),
    Rule("vision.pos_embed", "vision_model.embeddings.position_embedding.weight"),
    Rule("vision.ln_pre.scale", "vision_model.pre_layrnorm.weight"),  # sic: transformers' spelling
    Rule("vision.ln_pre.bias", "vision_model.pre_layrnorm.bias"),
    Rule("vision.ln_post.scale", "vision_model.post_layernorm.weight"),
    Rule("vision.ln_post.bias", "vision_model.post_layernorm.bias"),
    Rule("vision.proj", "visual_projection.weight", transpose),
    Rule("text.token_embedding.embedding", "text_model.embeddings.token_embedding.weight"),
    Rule("text.pos_embed", "text_model.embeddings.position_embedding.weight"),
    Rule("text.ln_final.scale", "text_model.final_layer_norm.weight"),
    Rule("text.ln_final.bias", "text_model.final_layer_norm.bias"),
    Rule("text.proj", "text_projection.weight", transpose),
]
OPENAI_TOP = [
    Rule("vision.patch_embed.kernel", "visual.conv1.weight", conv_to_hwio),
    Rule("vision.class_embedding", "visual.class_embedding"),
    Rule("vision.pos_embed", "visual.positional_embedding"),
    Rule("vision.ln_pre.scale", "visual.ln_pre.weight"),
    Rule("vision.ln_pre.bias", "visual.ln_pre.bias"),
    Rule("vision.ln_post.scale", "visual.ln_post.weight"),
    Rule("vision.ln_post.bias", "visual.ln_post.bias"),
    Rule("vision.proj", "visual.proj"),  # already [width, E]
    Rule("text.token_embedding.embedding", "token_embedding.weight"),
    Rule("text.pos_embed", "positional_embedding"),
    Rule("text.ln_final.scale", "ln_final.weight"),
    Rule("text.ln_final.bias", "ln_final.bias"),
    Rule("text.proj", "text_projection"),  # already [width, E]
]
# Not weights of ours: CLIP's logit temperature, transformers' position_ids buffers,
# the hyper-parameters OpenAI's TorchScript archives store as tensors.
HF_IGNORE = (r"logit_scale", r".*\.position_ids")
OPENAI_IGNORE = (r"logit_scale", r"input_resolution", r"context_length", r"vocab_size")


def _block_rules(table, target: str, source: str, layers: int) -> list[Rule]:
  return expand([Rule(f"{target}.blocks.{{i}}.{t}", f"{source}.{{i}}.{s}", h) for t, s, h in table], layers)


def hf_rules(config: clip.CLIPConfig) -> list[Rule]:
  return (HF_TOP + _block_rules(HF_BLOCK, "vision", "vision_model.encoder.layers", config.vision.layers)
          + _block_rules(HF_BLOCK, "text", "text_model.encoder.layers", config.text.layers))


def openai_rules(config: clip.CLIPConfig) -> list[Rule]:
  return (OPENAI_TOP + _block_rules(OPENAI_BLOCK, "vision", "visual.transformer.resblocks", config.vision.layers)
          + _block_rules(OPENAI_BLOCK, "text", "transformer.resblocks", config.text.layers))


def hf_to_flax(state, config: clip.CLIPConfig, source: str = "transformers CLIP checkpoint") -> dict:
  """transformers CLIPModel state dict -> flat {path: array} of `clip.CLIP`."""
  return apply_rules(state, hf_rules(config), source, HF_IGNORE)


def openai_to_flax(state, config: clip.CLIPConfig, source: str = "OpenAI CLIP checkpoint") -> dict:
  """OpenAI CLIP state dict (fused in_proj q/k/v) -> flat {path: array} of `clip.CLIP`."""
  return apply_rules(state, openai_rules(config), source, OPENAI_IGNORE)


def flax_to_openai(flat, config: clip.CLIPConfig) -> dict[str, np.ndarray]:
  """Inverse of `openai_to_flax` (for tests: an OpenAI-layout dict from any weights)."""
  out, qkv = {}, collections.defaultdict(dict)
  for r in openai_rules(config):
    if isinstance(r.hook, QKVSplit):
      qkv[r.source][r.hook.part] = r.hook.inverse(np.asarray(flat[r.target]))
    else:
      out[r.source] = _INVERSE[r.hook](np.asarray(flat[r.target]))
  for source, parts in qkv.items():
    out[source] = np.concatenate([parts[0], parts[1], parts[2]], axis=0)
  out["logit_scale"] = np.asarray(np.log(1 / 0.07), dtype=np.float32)
  return out


# ----------------------------------------------------------------------------- configs


def config_from_hf(vision, text, projection_dim: int, pos_interpolation: str = "bilinear") -> clip.CLIPConfig:
  """From transformers' CLIPVisionConfig / CLIPTextConfig objects."""
  if getattr(vision, "num_channels", 3) != 3:
    raise ValueError(f"vision num_channels {vision.num_channels}: only RGB models are supported")
  return clip.CLIPConfig(
      vision=clip.VisionConfig(
          image_size=vision.image_size, patch_size=vision.patch_size, width=vision.hidden_size,
          layers=vision.num_hidden_layers, heads=vision.num_attention_heads, mlp_dim=vision.intermediate_size,
          hidden_act=vision.hidden_act, layer_norm_eps=vision.layer_norm_eps, pos_interpolation=pos_interpolation),
      text=clip.TextConfig(
          vocab_size=text.vocab_size, context_length=text.max_position_embeddings, width=text.hidden_size,
          layers=text.num_hidden_layers, heads=text.num_attention_heads, mlp_dim=text.intermediate_size,
          hidden_act=text.hidden_act, layer_norm_eps=text.layer_norm_eps),
      projection_dim=int(projection_dim))


def config_from_openai(state, vision_heads: int | None = None, text_heads: int | None = None,
                       pos_interpolation: str = "bilinear", source: str = "OpenAI CLIP checkpoint"
                       ) -> clip.CLIPConfig:
  """Reads the architecture from an OpenAI state dict's shapes (as OpenAI's build_model).

  Heads are width // 64 in every OpenAI model; pass them for other widths.
  """
  def layers(prefix):
    return len({m.group(1) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))})

  try:
    v_width, _, patch, _ = state["visual.conv1.weight"].shape
    grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    t_width = state["ln_final.weight"].shape[0]
    return clip.CLIPConfig(
        vision=clip.VisionConfig(
            image_size=patch * grid, patch_size=patch, width=v_width,
            layers=layers("visual.transformer.resblocks."), heads=vision_heads or v_width // 64,
            mlp_dim=state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            pos_interpolation=pos_interpolation),
        text=clip.TextConfig(
            vocab_size=state["token_embedding.weight"].shape[0],
            context_length=state["positional_embedding"].shape[0], width=t_width,
            layers=layers("transformer.resblocks."), heads=text_heads or t_width // 64,
            mlp_dim=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
        projection_dim=state["text_projection"].shape[1])
  except KeyError as e:
    raise WeightLoadError(f"{source}: cannot read the architecture, key {e.args[0]} is missing") from e
  except ZeroDivisionError as e:
    raise ValueError(f"{source}: width below 64, pass --vision-heads/--text-heads") from e


# ----------------------------------------------------------------------------- tokenizer


def tokenizer_from_openai_bpe(path: str, vocab_size: int):
  """CLIPTokenizer from OpenAI's `bpe_simple_vocab_16e6.txt.gz`: its first `vocab_size - 514`
  merges (OpenAI's SimpleTokenizer reads lines 1..48894 for its 49408 ids)."""
  n_merges = vocab_size - 2 * 256 - 2
  try:
    with (gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")) as f:
      lines = f.read().split("\n")
  except (OSError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: not a readable BPE merges file ({e})") from e
  merges = [tuple(line.split()) for line in lines[1:1 + n_merges]]  # line 0 is a version header
  if len(merges) < n_merges or any(len(m) != 2 for m in merges):
    raise ValueError(f"{path}: needs {n_merges} merge lines of two symbols for a vocabulary of {vocab_size}, "
                     f"found {sum(len(m) == 2 for m in merges)} well-formed")
  try:
    return clip.clip_tokenizer(merges)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from e


def _tokenizer_files(folder: str) -> str | None:
  """What kind of tokenizer files `folder` holds, if any."""
  has = lambda name: os.path.isfile(os.path.join(folder, name))
  if has("tokenizer.json"):
    return "tokenizer.json"
  if has("vocab.json") and has("merges.txt"):
    return "vocab+merges"
  if has("bpe_simple_vocab_16e6.txt.gz"):
    return "openai"
  return None


def read_tokenizer(path: str, vocab_size: int):
  """A CLIPTokenizer from a transformers tokenizer folder or an OpenAI BPE file; size checked."""
  from transformers import CLIPTokenizer

  if os.path.isdir(path):
    kind = _tokenizer_files(path)
    if kind == "tokenizer.json":
      tok = CLIPTokenizer.from_pretrained(path)
    elif kind == "vocab+merges":
      # CLIPTokenizer(vocab_file=..., merges_file=...) silently returns a placeholder
      # (TRAPS.md): read the files and pass their contents.
      with open(os.path.join(path, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
      with open(os.path.join(path, "merges.txt"), encoding="utf-8") as f:
        merges = [tuple(l.split()) for l in f.read().split("\n") if l.strip() and not l.startswith("#version")]
      tok = CLIPTokenizer(vocab=vocab, merges=merges)
    elif kind == "openai":
      tok = tokenizer_from_openai_bpe(os.path.join(path, "bpe_simple_vocab_16e6.txt.gz"), vocab_size)
    else:
      raise FileNotFoundError(f"{path}: no tokenizer files (tokenizer.json, vocab.json + merges.txt, "
                              "or bpe_simple_vocab_16e6.txt.gz)")
  elif os.path.isfile(path):
    tok = tokenizer_from_openai_bpe(path, vocab_size)
  else:
    raise FileNotFoundError(f"{path}: no such tokenizer file or folder")
  clip.check_tokenizer(tok, vocab_size, path)
  return tok


# ----------------------------------------------------------------------------- sources


def _hf_model_type(folder: str) -> str:
  with open(os.path.join(folder, "config.json")) as f:
    return json.load(f).get("model_type", "?")


def read_transformers(src: str, text_src: str | None, pos_interpolation: str):
  """(config, flat) from a CLIPModel folder, or a vision + text *WithProjection pair."""
  from transformers import AutoConfig

  folders = [src] + ([text_src] if text_src else [])
  parts = {}
  for folder in folders:
    kind = _hf_model_type(folder)
    if kind not in ("clip", "clip_vision_model", "clip_text_model"):
      raise ValueError(f"{folder}/config.json: model_type {kind!r} is not a transformers CLIP model")
    if kind in parts:
      raise ValueError(f"{src} and {text_src} are both {kind!r} models")
    parts[kind] = (folder, AutoConfig.from_pretrained(folder), read_checkpoint(folder))

  if "clip" in parts:
    if len(parts) > 1:
      raise ValueError(f"{src} is a full CLIPModel: --text-src is only for a vision-only source")
    folder, hf, state = parts["clip"]
    config = config_from_hf(hf.vision_config, hf.text_config, hf.projection_dim, pos_interpolation)
    return config, hf_to_flax(state, config, source=folder)

  if set(parts) != {"clip_vision_model", "clip_text_model"}:
    raise ValueError(f"{src} holds only a {list(parts)[0]!r} model: pass its partner with --text-src "
                     "(a CLIPVisionModelWithProjection and a CLIPTextModelWithProjection folder)")
  (v_dir, v_cfg, v_state), (t_dir, t_cfg, t_state) = parts["clip_vision_model"], parts["clip_text_model"]
  for folder, state, key, name in ((v_dir, v_state, "visual_projection.weight", "Vision"),
                                   (t_dir, t_state, "text_projection.weight", "Text")):
    if key not in state:
      raise WeightLoadError(f"{folder}: has no {key}; a saved CLIP{name}Model has no projection "
                            f"(and no `{name.lower()}_model.` prefix). Save CLIP{name}ModelWithProjection "
                            "or a full CLIPModel instead")
  if v_cfg.projection_dim != t_cfg.projection_dim:
    raise ValueError(f"projection_dim differs: {v_dir} has {v_cfg.projection_dim}, {t_dir} {t_cfg.projection_dim}")
  config = config_from_hf(v_cfg, t_cfg, v_cfg.projection_dim, pos_interpolation)
  return config, hf_to_flax({**v_state, **t_state}, config, source=f"{v_dir} + {t_dir}")


def read_source(src: str, text_src: str | None = None, vision_heads: int | None = None,
                text_heads: int | None = None, pos_interpolation: str = "bilinear"):
  """(config, flat weights, folders to look for a tokenizer in) from any supported source."""
  if os.path.isdir(src) and os.path.isfile(os.path.join(src, "config.json")):
    config, flat = read_transformers(src, text_src, pos_interpolation)
    return config, flat, [d for d in (src, text_src) if d]
  if text_src:
    raise ValueError(f"--text-src needs --src to be a transformers folder with config.json; {src} is not")
  state = read_checkpoint(src)
  if "visual.conv1.weight" in state:
    config = config_from_openai(state, vision_heads, text_heads, pos_interpolation, source=src)
    flat = openai_to_flax(state, config, source=src)
  elif any(k.startswith(("vision_model.", "text_model.", "embeddings.")) for k in state):
    raise ValueError(f"{src}: transformers CLIP weights without their config.json; "
                     "pass the model folder (config.json + weights) as --src")
  else:
    raise ValueError(f"{src}: not a CLIP checkpoint (neither OpenAI's `visual.conv1.weight` nor transformers' "
                     f"`vision_model.*` keys); first keys: {sorted(state)[:5]}")
  return config, flat, [src if os.path.isdir(src) else os.path.dirname(os.path.abspath(src))]


def check_against_model(config: clip.CLIPConfig, flat, source: str) -> int:
  """Checks every key and shape against the NNX module (no allocation); returns the count."""
  from flax import nnx

  expected = bundle.param_shapes(nnx.eval_shape(lambda: clip.CLIP(config, rngs=nnx.Rngs(0))))
  bundle.check_keys(expected, {k: tuple(np.shape(v)) for k, v in flat.items()}, source)
  return int(sum(np.prod(s) for s in expected.values()))


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--src", required=True, help="transformers CLIP folder, or OpenAI .pt/.pth/.safetensors")
  p.add_argument("--text-src", help="CLIPTextModelWithProjection folder when --src is vision-only")
  add_output_args(p, "CLIP")
  p.add_argument("--tokenizer", help="transformers tokenizer folder or OpenAI bpe_simple_vocab_16e6.txt.gz "
                                     "(default: look beside the source)")
  p.add_argument("--vision-heads", type=int, help="OpenAI source only (default width // 64)")
  p.add_argument("--text-heads", type=int, help="OpenAI source only (default width // 64)")
  p.add_argument("--pos-interpolation", default="bilinear", choices=clip.METHODS,
                 help="position-table resize stored in the bundle's config (load() can override it)")
  args = p.parse_args(argv)
  check_out(args.out, args.overwrite, "clip")

  config, flat, beside = read_source(args.src, args.text_src, args.vision_heads, args.text_heads,
                                     args.pos_interpolation)
  n_params = check_against_model(config, flat, args.src)
  if args.tokenizer:
    tok = read_tokenizer(args.tokenizer, config.text.vocab_size)
  else:
    found = [d for d in beside if _tokenizer_files(d)]
    if not found:
      raise FileNotFoundError(f"no tokenizer beside {' or '.join(beside)}: pass --tokenizer with a transformers "
                              "tokenizer folder or OpenAI's bpe_simple_vocab_16e6.txt.gz (it ships inside the "
                              "open-clip-torch wheel)")
    tok = read_tokenizer(found[0], config.text.vocab_size)

  write_bundle(args.out, "clip", config.to_dict(), flat,
               extra=lambda folder: tok.save_pretrained(os.path.join(folder, "tokenizer")))
  v, t = config.vision, config.text
  print(f"CLIP vision {v.image_size}px/{v.patch_size} width {v.width} x {v.layers} layers ({v.heads} heads), "
        f"text vocab {t.vocab_size} ctx {t.context_length} width {t.width} x {t.layers} layers ({t.heads} heads), "
        f"projection {config.projection_dim}")
  print(f"{n_params:,} parameters, tokenizer of {len(tok)} -> {os.path.abspath(args.out)}")


if __name__ == "__main__":
  try:
    main()
  except (WeightLoadError, ValueError, OSError) as e:  # the user's input: one line, exit status 2
    print(f"convert/clip.py: error: {e}", file=sys.stderr)
    sys.exit(2)
