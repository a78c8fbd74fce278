"""Convert DINOv2 ViT weights into a `dinov2` bundle for `ssvp_jax.models.dinov2.load`.

    python convert/dinov2.py --src PATH --out DIR [--num-heads N]
    python -m convert.dinov2 --src PATH --out DIR

PATH is either
  * a transformers folder (config.json + model.safetensors / pytorch_model.bin)
    of a `Dinov2Model` (e.g. facebook/dinov2-large) or a `Dinov2WithRegistersModel`
    (facebook/dinov2-with-registers-large). Keys on disk are `embeddings.*`,
    `encoder.layer.N.attention.attention.{query,key,value}`,
    `attention.output.dense`, `mlp.fc1/fc2` or, for SwiGLU, the fused
    `mlp.weights_in` (gate rows first, then up) and `mlp.weights_out`,
    `layernorm.*`; the in-memory names of transformers 5 (`attention.q_proj`,
    `mlp.gate_proj`, ...) and a `dinov2.` prefix are accepted too; or
  * Meta's original checkpoint (dinov2_vitl14_pretrain.pth, dinov2_vitl14_reg4_pretrain.pth):
    keys `cls_token`, `pos_embed`, `register_tokens`, `patch_embed.proj.*`,
    `blocks.N.attn.qkv` (fused q/k/v), `blocks.N.ls1.gamma`, `blocks.N.mlp.fc1/fc2`
    or `mlp.w12/w3` (SwiGLU), `norm.*`. It carries no config: the architecture is
    read from the tensor shapes (native size = sqrt(pos_embed rows - 1) * patch);
    the head count from --num-heads, else width // 64 (true for every released
    size); the position table is resized as transformers' class for that family
    resizes it: with antialiasing when the checkpoint has registers.

`mask_token` (iBOT training only) is dropped by name; every other key must map.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from typing import Mapping

import numpy as np

if __package__ in (None, ""):  # run as `python convert/dinov2.py`: make the repository root importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from convert.common import (Rule, add_output_args, check_out, conv_to_hwio, expand, identity, linear_rules,
                            map_checked, norm_rules, read_checkpoint, read_hf_config, strip_prefix, transpose,
                            write_bundle)
from ssvp_jax.models.bundle import WeightLoadError
from ssvp_jax.models.dinov2 import DINOv2Config, param_shapes

MODEL_TYPES = ("dinov2", "dinov2_with_registers")
# transformers' config defaults per model type, for config.json files that omit a field.
_HF_DEFAULTS = {
    "dinov2": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4, hidden_act="gelu",
                   layer_norm_eps=1e-6, image_size=224, patch_size=14, num_channels=3, qkv_bias=True,
                   use_swiglu_ffn=False, num_register_tokens=0),
}
_HF_DEFAULTS["dinov2_with_registers"] = {**_HF_DEFAULTS["dinov2"], "patch_size": 16, "num_register_tokens": 4}
_HF_ACT = {"gelu": "gelu", "silu": "silu", "swish": "silu"}
HF_IGNORED = (r"embeddings\.mask_token",)
META_IGNORED = (r"mask_token",)

# transformers 5 renames the files' keys on load; in-memory name -> on-disk name.
_MEMORY_TO_DISK = ((".attention.q_proj.", ".attention.attention.query."),
                   (".attention.k_proj.", ".attention.attention.key."),
                   (".attention.v_proj.", ".attention.attention.value."),
                   (".attention.o_proj.", ".attention.output.dense."),
                   (".mlp.down_proj.", ".mlp.weights_out."))


# ----------------------------------------------------------------------------- configs

def _config(source: str, what: str, **fields) -> DINOv2Config:
  try:
    return DINOv2Config(**fields)
  except ValueError as e:
    raise ValueError(f"{source}: {what} is not a valid DINOv2 ViT: {e}") from e


def _square(value, name: str, source: str) -> int:
  if isinstance(value, (list, tuple)):
    if len(set(value)) != 1:
      raise ValueError(f"{source}: non-square {name} {list(value)} is not supported")
    value = value[0]
  return int(value)


def swiglu_width(hidden_size: int, mlp_ratio: float) -> int:
  """Width of DINOv2's SwiGLU: two thirds of the plain MLP's, rounded up to a multiple of 8."""
  return (int(int(hidden_size * mlp_ratio) * 2 / 3) + 7) // 8 * 8


def hf_config(cfg_json: Mapping, source: str = "config.json") -> DINOv2Config:
  """DINOv2Config from a transformers config.json dict (training-only fields ignored)."""
  model_type = cfg_json.get("model_type", "dinov2")
  if model_type not in MODEL_TYPES:
    raise ValueError(f"{source}: model_type is {model_type!r}, expected one of {MODEL_TYPES}")
  defaults = _HF_DEFAULTS[model_type]
  c = {**defaults, **{k: cfg_json[k] for k in defaults if k in cfg_json}}
  registers = model_type == "dinov2_with_registers"
  gated = bool(c["use_swiglu_ffn"])
  if not gated and c["hidden_act"] not in _HF_ACT:
    raise ValueError(f"{source}: hidden_act {c['hidden_act']!r} is not supported (one of {sorted(_HF_ACT)})")
  mlp = swiglu_width(c["hidden_size"], c["mlp_ratio"]) if gated else int(c["hidden_size"] * c["mlp_ratio"])
  return _config(
      source, "its architecture",
      hidden_size=c["hidden_size"], num_layers=c["num_hidden_layers"], num_heads=c["num_attention_heads"],
      intermediate_size=mlp, patch_size=_square(c["patch_size"], "patch_size", source),
      image_size=_square(c["image_size"], "image_size", source), num_channels=c["num_channels"],
      num_register_tokens=int(c["num_register_tokens"]) if registers else 0,
      layer_norm_eps=float(c["layer_norm_eps"]), use_gated_mlp=gated,
      hidden_act="silu" if gated else _HF_ACT[c["hidden_act"]],  # transformers' SwiGLU ignores hidden_act
      qkv_bias=bool(c["qkv_bias"]), pos_antialias=registers)


def meta_config(state: Mapping[str, np.ndarray], num_heads: int | None = None,
                source: str = "checkpoint") -> DINOv2Config:
  """Infers the architecture of a Meta-layout state dict from its shapes (see the module docstring)."""
  for key in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight|blocks.0.mlp.w12.weight"):
    if not any(k in state for k in key.split("|")):
      raise WeightLoadError(f"{source}: Meta-layout checkpoint without {key.replace('|', ' or ')}")
  width = int(state["cls_token"].shape[-1])
  patch_w = state["patch_embed.proj.weight"]  # [D, C, p, p]
  if patch_w.ndim != 4 or patch_w.shape[2] != patch_w.shape[3]:
    raise WeightLoadError(f"{source}: patch_embed.proj.weight has shape {patch_w.shape}, expected [D, C, p, p]")
  n_pos = int(np.prod(state["pos_embed"].shape[:-1])) - 1  # [1, 1 + M^2, D]
  side = math.isqrt(max(n_pos, 0))
  if side * side != n_pos or side == 0:
    raise WeightLoadError(f"{source}: pos_embed has shape {state['pos_embed'].shape}: {n_pos} patch positions "
                          "are not a square grid")
  depth = len({m.group(1) for k in state if (m := re.fullmatch(r"blocks\.(\d+)\.norm1\.weight", k))})
  gated = "blocks.0.mlp.w12.weight" in state
  mlp = state["blocks.0.mlp.w12.weight"].shape[0] // 2 if gated else state["blocks.0.mlp.fc1.weight"].shape[0]
  registers = int(state["register_tokens"].shape[1]) if "register_tokens" in state else 0
  return _config(
      source, "the inferred config (pass --num-heads?)",
      hidden_size=width, num_layers=depth, num_heads=num_heads or max(width // 64, 1),
      intermediate_size=int(mlp), patch_size=int(patch_w.shape[-1]), image_size=side * int(patch_w.shape[-1]),
      num_channels=int(patch_w.shape[1]), num_register_tokens=registers, layer_norm_eps=1e-6,
      use_gated_mlp=gated, hidden_act="silu" if gated else "gelu",
      qkv_bias="blocks.0.attn.qkv.bias" in state, pos_antialias=registers > 0)


# ----------------------------------------------------------------------------- key tables

def _rows(j: int, parts: int, then=identity):
  """Hook: the j-th of `parts` equal row blocks of a fused weight [parts*F, D] or bias [parts*F], then `then`."""
  def hook(x):
    if x.shape[0] % parts:
      raise ValueError(f"{x.shape[0]} rows do not split into {parts} equal parts")
    f = x.shape[0] // parts
    return np.ascontiguousarray(then(x[j * f:(j + 1) * f]))
  return hook


def _table(x: np.ndarray) -> np.ndarray:
  """Position table [1, 1 + M^2, D] -> [1 + M^2, D]."""
  if x.ndim != 3 or x.shape[0] != 1:
    raise ValueError(f"expected [1, T, D], got {x.shape}")
  return x[0]


def _mlp_rules(cfg: DINOv2Config, prefix: str, plain: tuple[str, str], fused: tuple[str, str]) -> list[Rule]:
  """MLP rules: plain (fc1, fc2) -> up, down; gated: fused (w12/weights_in: gate rows, then up) and down."""
  if not cfg.use_gated_mlp:
    return [*linear_rules("layers.{i}.mlp.up", f"{prefix}.{plain[0]}", True),
            *linear_rules("layers.{i}.mlp.down", f"{prefix}.{plain[1]}", True)]
  half = lambda j: linear_rules(f"layers.{{i}}.mlp.{('gate', 'up')[j]}", f"{prefix}.{fused[0]}", True,
                           kernel_hook=_rows(j, 2, transpose), bias_hook=_rows(j, 2))
  return [*half(0), *half(1), *linear_rules("layers.{i}.mlp.down", f"{prefix}.{fused[1]}", True)]


def hf_rules(cfg: DINOv2Config) -> list[Rule]:
  """Flax name <- transformers name (disk layout), expanded over the layers."""
  att = "encoder.layer.{i}.attention."
  rules = [Rule("patch_embed.kernel", "embeddings.patch_embeddings.projection.weight", conv_to_hwio),
           Rule("patch_embed.bias", "embeddings.patch_embeddings.projection.bias"),
           Rule("cls_token", "embeddings.cls_token"),
           Rule("pos_embed", "embeddings.position_embeddings", _table),
           *norm_rules("norm", "layernorm"),
           *norm_rules("layers.{i}.norm1", "encoder.layer.{i}.norm1"),
           *norm_rules("layers.{i}.norm2", "encoder.layer.{i}.norm2"),
           *linear_rules("layers.{i}.attn.q", att + "attention.query", cfg.qkv_bias),
           *linear_rules("layers.{i}.attn.k", att + "attention.key", cfg.qkv_bias),
           *linear_rules("layers.{i}.attn.v", att + "attention.value", cfg.qkv_bias),
           *linear_rules("layers.{i}.attn.o", att + "output.dense", True),
           Rule("layers.{i}.ls1.scale", "encoder.layer.{i}.layer_scale1.lambda1"),
           Rule("layers.{i}.ls2.scale", "encoder.layer.{i}.layer_scale2.lambda1"),
           *_mlp_rules(cfg, "encoder.layer.{i}.mlp", ("fc1", "fc2"), ("weights_in", "weights_out"))]
  if cfg.num_register_tokens:
    rules.append(Rule("register_tokens", "embeddings.register_tokens"))
  return expand(rules, cfg.num_layers)


def meta_rules(cfg: DINOv2Config) -> list[Rule]:
  """Flax name <- Meta name, expanded over the layers."""
  qkv = lambda j: linear_rules(f"layers.{{i}}.attn.{'qkv'[j]}", "blocks.{i}.attn.qkv", cfg.qkv_bias,
                          kernel_hook=_rows(j, 3, transpose), bias_hook=_rows(j, 3))
  rules = [Rule("patch_embed.kernel", "patch_embed.proj.weight", conv_to_hwio),
           Rule("patch_embed.bias", "patch_embed.proj.bias"),
           Rule("cls_token", "cls_token"),
           Rule("pos_embed", "pos_embed", _table),
           *norm_rules("norm", "norm"),
           *norm_rules("layers.{i}.norm1", "blocks.{i}.norm1"),
           *norm_rules("layers.{i}.norm2", "blocks.{i}.norm2"),
           *qkv(0), *qkv(1), *qkv(2),
           *linear_rules("layers.{i}.attn.o", "blocks.{i}.attn.proj", True),
           Rule("layers.{i}.ls1.scale", "blocks.{i}.ls1.gamma"),
           Rule("layers.{i}.ls2.scale", "blocks.{i}.ls2.gamma"),
           *_mlp_rules(cfg, "blocks.{i}.mlp", ("fc1", "fc2"), ("w12", "w3"))]
  if cfg.num_register_tokens:
    rules.append(Rule("register_tokens", "register_tokens"))
  return expand(rules, cfg.num_layers)


# ----------------------------------------------------------------------------- mapping

def disk_layout(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """transformers' in-memory names (q_proj, o_proj, gate_proj + up_proj, down_proj) -> the files' names.

  Keys already in the file layout pass through; a lone gate_proj or up_proj is left for the strict
  table to name.
  """
  out = {}
  for k, v in strip_prefix(state, "dinov2.").items():
    for new, old in _MEMORY_TO_DISK:
      k = k.replace(new, old)
    out[k] = v
  for gate in [k for k in out if ".mlp.gate_proj." in k]:
    up = gate.replace(".gate_proj.", ".up_proj.")
    if up in out:
      out[gate.replace(".gate_proj.", ".weights_in.")] = np.concatenate([out.pop(gate), out.pop(up)])
  return out


def _map(state: Mapping[str, np.ndarray], rules: list[Rule], cfg: DINOv2Config, source: str,
         ignore: tuple[str, ...]) -> dict[str, np.ndarray]:
  expected = param_shapes(cfg)
  if not cfg.num_register_tokens:  # an empty [1, 0, D] in the module, absent from the checkpoints
    expected.pop("register_tokens")
  flat = map_checked(state, rules, expected, source, ignore, what=f"the DINOv2 config {cfg}")
  if not cfg.num_register_tokens:
    flat["register_tokens"] = np.zeros((1, 0, cfg.hidden_size), np.float32)
  return flat


def hf_to_flax(state: Mapping[str, np.ndarray], cfg: DINOv2Config,
               source: str = "checkpoint") -> dict[str, np.ndarray]:
  """transformers Dinov2Model / Dinov2WithRegistersModel state dict (disk or in-memory keys) -> flat Flax params."""
  return _map(disk_layout(state), hf_rules(cfg), cfg, source, HF_IGNORED)


def meta_to_flax(state: Mapping[str, np.ndarray], cfg: DINOv2Config,
                 source: str = "checkpoint") -> dict[str, np.ndarray]:
  """Meta's original DinoVisionTransformer state dict -> flat Flax params."""
  return _map(state, meta_rules(cfg), cfg, source, META_IGNORED)


def hf_to_meta(state: Mapping[str, np.ndarray], cfg: DINOv2Config) -> dict[str, np.ndarray]:
  """Inverse layout map, transformers -> Meta (fused q/k/v, fused w12, 3-D pos_embed); used by tests."""
  s = disk_layout(state)
  out = {"cls_token": s["embeddings.cls_token"], "pos_embed": s["embeddings.position_embeddings"],
         "mask_token": s["embeddings.mask_token"].reshape(1, -1),
         "patch_embed.proj.weight": s["embeddings.patch_embeddings.projection.weight"],
         "patch_embed.proj.bias": s["embeddings.patch_embeddings.projection.bias"],
         "norm.weight": s["layernorm.weight"], "norm.bias": s["layernorm.bias"]}
  if cfg.num_register_tokens:
    out["register_tokens"] = s["embeddings.register_tokens"]
  mlp = [("w12", "weights_in"), ("w3", "weights_out")] if cfg.use_gated_mlp else [("fc1", "fc1"), ("fc2", "fc2")]
  params = ["weight", "bias"] if cfg.qkv_bias else ["weight"]
  for i in range(cfg.num_layers):
    m, h = f"blocks.{i}.", f"encoder.layer.{i}."
    for n in ("norm1", "norm2"):
      out[m + n + ".weight"], out[m + n + ".bias"] = s[h + n + ".weight"], s[h + n + ".bias"]
    for p in params:
      out[m + f"attn.qkv.{p}"] = np.concatenate([s[h + f"attention.attention.{n}.{p}"]
                                                 for n in ("query", "key", "value")])
    for p in ("weight", "bias"):
      out[m + f"attn.proj.{p}"] = s[h + f"attention.output.dense.{p}"]
      for meta_name, hf_name in mlp:
        out[m + f"mlp.{meta_name}.{p}"] = s[h + f"mlp.{hf_name}.{p}"]
    out[m + "ls1.gamma"], out[m + "ls2.gamma"] = s[h + "layer_scale1.lambda1"], s[h + "layer_scale2.lambda1"]
  return out


# ----------------------------------------------------------------------------- files

def detect_layout(state: Mapping[str, np.ndarray], source: str) -> str:
  """'hf' or 'meta', from the key names."""
  keys = set(strip_prefix(state, "dinov2."))
  if any(k.startswith("embeddings.") for k in keys):
    return "hf"
  if "cls_token" in keys or any(k.startswith("blocks.") for k in keys):
    return "meta"
  sample = ", ".join(sorted(keys)[:8])
  raise WeightLoadError(f"{source}: not a DINOv2 ViT checkpoint (neither transformers keys 'embeddings.*' nor "
                        f"Meta keys 'cls_token', 'blocks.N.*'); first keys: {sample}")


def convert_checkpoint(src: str, num_heads: int | None = None) -> tuple[DINOv2Config, dict[str, np.ndarray], str]:
  """Reads `src` (transformers folder/file or Meta .pth) -> (config, flat Flax params, layout)."""
  state = read_checkpoint(src)
  layout = detect_layout(state, src)
  if layout == "meta":
    cfg = meta_config(state, num_heads, source=src)
    return cfg, meta_to_flax(state, cfg, source=src), layout
  cfg_json, cfg_path = read_hf_config(src)
  cfg = hf_config(cfg_json, source=cfg_path)
  if num_heads is not None and num_heads != cfg.num_heads:
    raise ValueError(f"--num-heads {num_heads} contradicts {cfg_path} (num_attention_heads {cfg.num_heads})")
  return cfg, hf_to_flax(state, cfg, source=src), layout


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--src", required=True, help="transformers folder/file or Meta .pth")
  add_output_args(parser, "DINOv2")
  parser.add_argument("--num-heads", type=int, default=None,
                      help="Meta checkpoints: attention heads (default: width // 64)")
  args = parser.parse_args(argv)
  try:
    check_out(args.out, args.overwrite, "dinov2")
    cfg, flat, layout = convert_checkpoint(args.src, args.num_heads)
    write_bundle(args.out, "dinov2", cfg.to_dict(), flat)
  except (OSError, ValueError) as e:  # WeightLoadError is a ValueError
    print(f"error: {e}", file=sys.stderr)
    return 2
  n = sum(int(v.size) for v in flat.values())
  print(f"converted {args.src} ({'transformers' if layout == 'hf' else 'Meta'} layout) -> {args.out}\n"
        f"  {cfg.num_layers} layers, width {cfg.hidden_size}, {cfg.num_heads} heads, MLP {cfg.intermediate_size}"
        f"{' SwiGLU' if cfg.use_gated_mlp else ''}, patch {cfg.patch_size}, native {cfg.image_size} px, "
        f"{cfg.num_register_tokens} registers; {len(flat)} tensors, {n / 1e6:.2f}M parameters")
  return 0


if __name__ == "__main__":
  sys.exit(main())
