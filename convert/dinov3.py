"""Convert DINOv3 ViT weights into a `dinov3` bundle for `ssvp_jax.models.dinov3.load`.

    python convert/dinov3.py --src PATH --out DIR [--num-heads N] [--rope-theta 100]
    python -m convert.dinov3 --src PATH --out DIR

PATH is either
  * a transformers folder (config.json + model.safetensors / pytorch_model.bin,
    e.g. a download of facebook/dinov3-vitl16-pretrain-lvd1689m). Keys on disk are
    `embeddings.*`, `layer.N.*`, `norm.*`; the in-memory `model.layer.N.*` form
    is accepted too; or
  * Meta's original checkpoint (dinov3_vitl16_pretrain_lvd1689m-*.pth): keys
    `cls_token`, `storage_tokens`, `patch_embed.proj.*`, `blocks.N.*`, `norm.*`.
    It carries no config: the architecture is read from the tensor shapes. The
    head count comes from --num-heads, else from the length of the
    `rope_embed.periods` buffer (head_dim / 4), else width // 64 (true for every
    released size but the 7B, which has head_dim 128). The LayerNorm eps is
    1e-5 (Meta's "layernormbf16" norm, used by every released ViT).

Dropped on purpose (listed, not silently skipped): `mask_token` (replaces
masked patches in iBOT training only), `rope_embed.periods` (a deterministic
buffer; it is checked against --rope-theta, to bfloat16 precision since Meta
stored it in bf16, and the model recomputes it in float32 as transformers
does), `local_cls_norm.*` (a training-only norm for local crops), and the
`attn.qkv.bias_mask` buffers, which are folded into the bias first: a masked
key bias is dropped, an unmasked non-zero one where the model has no key bias
is an error.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Mapping

import numpy as np

if __package__ in (None, ""):  # run as `python convert/dinov3.py`: make the repository root importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from convert.common import (Rule, add_output_args, check_out, conv_to_hwio, expand, identity, linear_rules,
                            map_checked, norm_rules, read_checkpoint, read_hf_config, strip_prefix, transpose,
                            write_bundle)
from ssvp_jax.models.bundle import WeightLoadError
from ssvp_jax.models.dinov3 import DINOv3Config, param_shapes

# transformers' DINOv3ViTConfig defaults, for config.json files that omit a field.
_HF_DEFAULTS = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                    patch_size=16, num_channels=3, num_register_tokens=0, rope_theta=100.0, layer_norm_eps=1e-5,
                    use_gated_mlp=False, hidden_act="gelu", query_bias=True, key_bias=False, value_bias=True,
                    proj_bias=True, mlp_bias=True)
_HF_ACT = {"gelu": "gelu", "silu": "silu", "swish": "silu"}
HF_IGNORED = (r"embeddings\.mask_token",)
META_IGNORED = (r"mask_token", r"rope_embed\.periods", r"local_cls_norm\.(weight|bias)")


# ----------------------------------------------------------------------------- configs

def _config(source: str, what: str, **fields) -> DINOv3Config:
  try:
    return DINOv3Config(**fields)
  except ValueError as e:  # e.g. a head size not divisible by 4
    raise ValueError(f"{source}: {what} is not a valid DINOv3 ViT: {e}") from e


def hf_config(cfg_json: Mapping, source: str = "config.json") -> DINOv3Config:
  """DINOv3Config from a transformers config.json dict (training-only fields ignored)."""
  if cfg_json.get("model_type", "dinov3_vit") != "dinov3_vit":
    raise ValueError(f"{source}: model_type is {cfg_json.get('model_type')!r}, expected 'dinov3_vit'")
  c = {**_HF_DEFAULTS, **{k: cfg_json[k] for k in _HF_DEFAULTS if k in cfg_json}}
  patch = c["patch_size"]
  if isinstance(patch, (list, tuple)):
    if len(set(patch)) != 1:
      raise ValueError(f"{source}: non-square patch_size {patch} is not supported")
    patch = patch[0]
  if c["hidden_act"] not in _HF_ACT:
    raise ValueError(f"{source}: hidden_act {c['hidden_act']!r} is not supported (one of {sorted(_HF_ACT)})")
  return _config(
      source, "its architecture",
      hidden_size=c["hidden_size"], num_layers=c["num_hidden_layers"], num_heads=c["num_attention_heads"],
      intermediate_size=c["intermediate_size"], patch_size=int(patch), num_channels=c["num_channels"],
      num_register_tokens=c["num_register_tokens"], rope_theta=float(c["rope_theta"]),
      layer_norm_eps=float(c["layer_norm_eps"]), use_gated_mlp=bool(c["use_gated_mlp"]),
      hidden_act=_HF_ACT[c["hidden_act"]], query_bias=c["query_bias"], key_bias=c["key_bias"],
      value_bias=c["value_bias"], proj_bias=c["proj_bias"], mlp_bias=c["mlp_bias"])


def rope_periods(head_dim: int, theta: float) -> np.ndarray:
  """Meta's `rope_embed.periods` buffer: theta ** (4k / head_dim), k < head_dim / 4 (= 1 / transformers' inv_freq)."""
  return theta ** (4.0 * np.arange(head_dim // 4) / head_dim)


def meta_config(state: Mapping[str, np.ndarray], num_heads: int | None = None, rope_theta: float = 100.0,
                source: str = "checkpoint") -> DINOv3Config:
  """Infers the architecture of a Meta-layout state dict from its shapes (see the module docstring)."""
  for key in ("cls_token", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight|blocks.0.mlp.w1.weight"):
    if not any(k in state for k in key.split("|")):
      raise WeightLoadError(f"{source}: Meta-layout checkpoint without {key.replace('|', ' or ')}")
  width = int(state["cls_token"].shape[-1])
  patch_w = state["patch_embed.proj.weight"]  # [D, C, p, p]
  if patch_w.ndim != 4 or patch_w.shape[2] != patch_w.shape[3]:
    raise WeightLoadError(f"{source}: patch_embed.proj.weight has shape {patch_w.shape}, expected [D, C, p, p]")
  depth = len({m.group(1) for k in state if (m := re.fullmatch(r"blocks\.(\d+)\.norm1\.weight", k))})
  gated = "blocks.0.mlp.w1.weight" in state
  periods = state.get("rope_embed.periods")
  if num_heads is None:
    num_heads = width // (4 * len(periods)) if periods is not None and len(periods) else max(width // 64, 1)
  has_qkv_bias = "blocks.0.attn.qkv.bias" in state
  return _config(
      source, "the inferred config (pass --num-heads / --rope-theta?)",
      hidden_size=width, num_layers=depth, num_heads=num_heads,
      intermediate_size=int(state["blocks.0.mlp.w1.weight" if gated else "blocks.0.mlp.fc1.weight"].shape[0]),
      patch_size=int(patch_w.shape[-1]), num_channels=int(patch_w.shape[1]),
      num_register_tokens=int(state["storage_tokens"].shape[1]) if "storage_tokens" in state else 0,
      rope_theta=float(rope_theta), layer_norm_eps=1e-5, use_gated_mlp=gated,
      hidden_act="silu" if gated else "gelu",  # Meta's SwiGLUFFN uses SiLU, its Mlp exact GELU
      query_bias=has_qkv_bias, value_bias=has_qkv_bias,
      # A masked key bias (LinearKMaskedBias) is no bias; an unmasked one is kept.
      key_bias=has_qkv_bias and "blocks.0.attn.qkv.bias_mask" not in state,
      proj_bias="blocks.0.attn.proj.bias" in state,
      mlp_bias=("blocks.0.mlp.w1.bias" if gated else "blocks.0.mlp.fc1.bias") in state)


# ----------------------------------------------------------------------------- key tables

def hf_rules(cfg: DINOv3Config) -> list[Rule]:
  """Flax name <- transformers name (disk layout), expanded over the layers."""
  rules = [Rule("patch_embed.kernel", "embeddings.patch_embeddings.weight", conv_to_hwio),
           Rule("patch_embed.bias", "embeddings.patch_embeddings.bias"),
           Rule("cls_token", "embeddings.cls_token"),
           Rule("register_tokens", "embeddings.register_tokens"),
           *norm_rules("norm", "norm"),
           *norm_rules("layers.{i}.norm1", "layer.{i}.norm1"),
           *norm_rules("layers.{i}.norm2", "layer.{i}.norm2"),
           *linear_rules("layers.{i}.attn.q", "layer.{i}.attention.q_proj", cfg.query_bias),
           *linear_rules("layers.{i}.attn.k", "layer.{i}.attention.k_proj", cfg.key_bias),
           *linear_rules("layers.{i}.attn.v", "layer.{i}.attention.v_proj", cfg.value_bias),
           *linear_rules("layers.{i}.attn.o", "layer.{i}.attention.o_proj", cfg.proj_bias),
           Rule("layers.{i}.ls1.scale", "layer.{i}.layer_scale1.lambda1"),
           Rule("layers.{i}.ls2.scale", "layer.{i}.layer_scale2.lambda1"),
           *linear_rules("layers.{i}.mlp.up", "layer.{i}.mlp.up_proj", cfg.mlp_bias),
           *linear_rules("layers.{i}.mlp.down", "layer.{i}.mlp.down_proj", cfg.mlp_bias)]
  if cfg.use_gated_mlp:
    rules += linear_rules("layers.{i}.mlp.gate", "layer.{i}.mlp.gate_proj", cfg.mlp_bias)
  return expand(rules, cfg.num_layers)


def _qkv_part(j: int, d: int, then=identity):
  """Hook: rows [j*d, (j+1)*d) of a fused q/k/v weight [3D, D] or bias [3D] (j: 0 q, 1 k, 2 v), then `then`."""
  return lambda x: np.ascontiguousarray(then(x[j * d:(j + 1) * d]))


def meta_rules(cfg: DINOv3Config) -> list[Rule]:
  """Flax name <- Meta name (after `fold_bias_mask`), expanded over the layers."""
  d = cfg.hidden_size
  qkv = lambda j, bias: linear_rules(f"layers.{{i}}.attn.{'qkv'[j]}", "blocks.{i}.attn.qkv", bias,
                                kernel_hook=_qkv_part(j, d, transpose), bias_hook=_qkv_part(j, d))
  mlp = ([("gate", "w1"), ("up", "w2"), ("down", "w3")] if cfg.use_gated_mlp else [("up", "fc1"), ("down", "fc2")])
  rules = [Rule("patch_embed.kernel", "patch_embed.proj.weight", conv_to_hwio),
           Rule("patch_embed.bias", "patch_embed.proj.bias"),
           Rule("cls_token", "cls_token"),
           *norm_rules("norm", "norm"),
           *norm_rules("layers.{i}.norm1", "blocks.{i}.norm1"),
           *norm_rules("layers.{i}.norm2", "blocks.{i}.norm2"),
           *qkv(0, cfg.query_bias), *qkv(1, cfg.key_bias), *qkv(2, cfg.value_bias),
           *linear_rules("layers.{i}.attn.o", "blocks.{i}.attn.proj", cfg.proj_bias),
           Rule("layers.{i}.ls1.scale", "blocks.{i}.ls1.gamma"),
           Rule("layers.{i}.ls2.scale", "blocks.{i}.ls2.gamma"),
           *[r for t, s in mlp for r in linear_rules(f"layers.{{i}}.mlp.{t}", f"blocks.{{i}}.mlp.{s}", cfg.mlp_bias)]]
  if cfg.num_register_tokens:  # without registers Meta has no storage_tokens at all
    rules.append(Rule("register_tokens", "storage_tokens"))
  return expand(rules, cfg.num_layers)


# ----------------------------------------------------------------------------- mapping

def _map(state: Mapping[str, np.ndarray], rules: list[Rule], cfg: DINOv3Config, source: str,
         ignore: tuple[str, ...]) -> dict[str, np.ndarray]:
  """map_checked (strict on names and shapes); an empty register table where the model has none."""
  expected = param_shapes(cfg)
  if not cfg.num_register_tokens:  # an empty [1, 0, D] in the module, absent from the checkpoints
    expected.pop("register_tokens")
  flat = map_checked(state, rules, expected, source, ignore, what=f"the DINOv3 config {cfg}")
  if not cfg.num_register_tokens:
    flat["register_tokens"] = np.zeros((1, 0, cfg.hidden_size), np.float32)
  return flat


def hf_to_flax(state: Mapping[str, np.ndarray], cfg: DINOv3Config, source: str = "checkpoint") -> dict[str, np.ndarray]:
  """transformers DINOv3ViTModel state dict (disk or in-memory keys) -> flat Flax params."""
  return _map(strip_prefix(state, "model."), hf_rules(cfg), cfg, source, HF_IGNORED)


def fold_bias_mask(state: Mapping[str, np.ndarray], cfg: DINOv3Config, source: str = "checkpoint"
                   ) -> dict[str, np.ndarray]:
  """Applies each `attn.qkv.bias_mask` buffer to its bias and drops the buffer.

  Meta's LinearKMaskedBias uses bias * bias_mask, with the key third of the
  mask zero. Where the model has no key bias, the effective key bias must be
  zero; otherwise the checkpoint cannot be represented and this raises.
  """
  out = dict(state)
  d = cfg.hidden_size
  errors = []
  for key in sorted(k for k in state if k.endswith(".attn.qkv.bias_mask")):
    mask = np.asarray(out.pop(key), np.float32)
    bias_key = key[:-len("_mask")]
    if bias_key not in state:
      errors.append(f"{key} without {bias_key}")
      continue
    if not np.isfinite(mask).all():
      errors.append(f"{key} holds NaN/inf (an uninitialised LinearKMaskedBias buffer)")
      continue
    bias = np.asarray(state[bias_key], np.float32)
    if bias.shape != mask.shape:
      errors.append(f"{key} has shape {mask.shape}, {bias_key} {bias.shape}")
      continue
    out[bias_key] = np.where(mask == 0, 0.0, bias * mask).astype(np.float32)  # 0 * NaN would stay NaN
  if not cfg.key_bias:
    for key in sorted(k for k in out if k.endswith(".attn.qkv.bias")):
      k_bias = out[key][d:2 * d]
      if np.any(k_bias != 0):
        errors.append(f"{key}: key part is non-zero (max |b| {np.abs(k_bias).max():.3g}) but the model has no "
                      "key bias (it is masked only when a bias_mask buffer says so)")
  if errors:
    raise WeightLoadError(f"{source}: fused q/k/v bias problems:\n  " + "\n  ".join(errors))
  return out


def check_rope_periods(state: Mapping[str, np.ndarray], cfg: DINOv3Config, source: str = "checkpoint") -> None:
  """The `rope_embed.periods` buffer, if present, must be the one the config implies (to bf16 precision)."""
  if "rope_embed.periods" not in state:
    return
  got = np.asarray(state["rope_embed.periods"], np.float64)
  want = rope_periods(cfg.head_dim, cfg.rope_theta)
  if got.shape != want.shape or not np.allclose(got, want, rtol=1e-2, atol=0):
    raise WeightLoadError(
        f"{source}: rope_embed.periods (shape {got.shape}) does not match head_dim {cfg.head_dim} and rope_theta "
        f"{cfg.rope_theta} (expected {np.array2string(want[:4], precision=4)}..., got "
        f"{np.array2string(got[:4], precision=4)}...); pass the right --num-heads / --rope-theta")


def meta_to_flax(state: Mapping[str, np.ndarray], cfg: DINOv3Config, source: str = "checkpoint") -> dict[str, np.ndarray]:
  """Meta's original DinoVisionTransformer state dict -> flat Flax params."""
  check_rope_periods(state, cfg, source)
  return _map(fold_bias_mask(state, cfg, source), meta_rules(cfg), cfg, source, META_IGNORED)


def hf_to_meta(state: Mapping[str, np.ndarray], cfg: DINOv3Config, k_bias_junk: float = 0.0,
               seed: int = 0) -> dict[str, np.ndarray]:
  """Inverse layout map, transformers -> Meta (fused q/k/v, `bias_mask`, `periods`); used by tests.

  With no key bias, the key third of the fused bias is filled with noise of
  size `k_bias_junk` and masked by `bias_mask`, as in Meta's checkpoints.
  """
  s = strip_prefix(state, "model.")
  d = cfg.hidden_size
  rng = np.random.default_rng(seed)
  out = {"cls_token": s["embeddings.cls_token"], "mask_token": s["embeddings.mask_token"].reshape(1, d),
         "patch_embed.proj.weight": s["embeddings.patch_embeddings.weight"],
         "patch_embed.proj.bias": s["embeddings.patch_embeddings.bias"],
         "norm.weight": s["norm.weight"], "norm.bias": s["norm.bias"],
         "rope_embed.periods": rope_periods(cfg.head_dim, cfg.rope_theta).astype(np.float32)}
  if cfg.num_register_tokens:
    out["storage_tokens"] = s["embeddings.register_tokens"]
  mlp = ([("w1", "gate_proj"), ("w2", "up_proj"), ("w3", "down_proj")] if cfg.use_gated_mlp
         else [("fc1", "up_proj"), ("fc2", "down_proj")])
  for i in range(cfg.num_layers):
    m, h = f"blocks.{i}.", f"layer.{i}."
    for n in ("norm1", "norm2"):
      out[m + n + ".weight"], out[m + n + ".bias"] = s[h + n + ".weight"], s[h + n + ".bias"]
    att = h + "attention."
    out[m + "attn.qkv.weight"] = np.concatenate([s[att + f"{p}_proj.weight"] for p in "qkv"])
    if cfg.query_bias:
      k_bias = s[att + "k_proj.bias"] if cfg.key_bias else (k_bias_junk * rng.standard_normal(d)).astype(np.float32)
      out[m + "attn.qkv.bias"] = np.concatenate([s[att + "q_proj.bias"], k_bias, s[att + "v_proj.bias"]])
      if not cfg.key_bias:
        out[m + "attn.qkv.bias_mask"] = np.concatenate([np.ones(d), np.zeros(d), np.ones(d)]).astype(np.float32)
    out[m + "attn.proj.weight"] = s[att + "o_proj.weight"]
    if cfg.proj_bias:
      out[m + "attn.proj.bias"] = s[att + "o_proj.bias"]
    out[m + "ls1.gamma"], out[m + "ls2.gamma"] = s[h + "layer_scale1.lambda1"], s[h + "layer_scale2.lambda1"]
    for meta_name, hf_name in mlp:
      out[m + f"mlp.{meta_name}.weight"] = s[h + f"mlp.{hf_name}.weight"]
      if cfg.mlp_bias:
        out[m + f"mlp.{meta_name}.bias"] = s[h + f"mlp.{hf_name}.bias"]
  return out


# ----------------------------------------------------------------------------- files

def detect_layout(state: Mapping[str, np.ndarray], source: str) -> str:
  """'hf' or 'meta', from the key names."""
  keys = set(state)
  if any(k.startswith("embeddings.") for k in keys):
    return "hf"
  if "cls_token" in keys or any(k.startswith("blocks.") for k in keys):
    return "meta"
  sample = ", ".join(sorted(keys)[:8])
  raise WeightLoadError(f"{source}: not a DINOv3 ViT checkpoint (neither transformers keys 'embeddings.*' nor "
                        f"Meta keys 'cls_token', 'blocks.N.*'); first keys: {sample}")


def convert_checkpoint(src: str, num_heads: int | None = None, rope_theta: float = 100.0
                       ) -> tuple[DINOv3Config, dict[str, np.ndarray], str]:
  """Reads `src` (transformers folder/file or Meta .pth) -> (config, flat Flax params, layout)."""
  state = read_checkpoint(src)
  layout = detect_layout(state, src)
  if layout == "meta":
    cfg = meta_config(state, num_heads, rope_theta, source=src)
    return cfg, meta_to_flax(state, cfg, source=src), layout
  cfg_json, cfg_path = read_hf_config(src)
  cfg = hf_config(cfg_json, source=cfg_path)
  if num_heads is not None and num_heads != cfg.num_heads:
    raise ValueError(f"--num-heads {num_heads} contradicts {cfg_path} (num_attention_heads {cfg.num_heads})")
  return cfg, hf_to_flax(state, cfg, source=src), layout


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--src", required=True, help="transformers folder/file or Meta .pth")
  add_output_args(parser, "DINOv3")
  parser.add_argument("--num-heads", type=int, default=None,
                      help="Meta checkpoints: attention heads (default: from rope_embed.periods, else width // 64)")
  parser.add_argument("--rope-theta", type=float, default=100.0, help="Meta checkpoints: RoPE base (default 100)")
  args = parser.parse_args(argv)
  try:
    check_out(args.out, args.overwrite, "dinov3")
    cfg, flat, layout = convert_checkpoint(args.src, args.num_heads, args.rope_theta)
    write_bundle(args.out, "dinov3", cfg.to_dict(), flat)
  except (OSError, ValueError) as e:  # WeightLoadError is a ValueError
    print(f"error: {e}", file=sys.stderr)
    return 2
  n = sum(int(v.size) for v in flat.values())
  print(f"converted {args.src} ({'transformers' if layout == 'hf' else 'Meta'} layout) -> {args.out}\n"
        f"  {cfg.num_layers} layers, width {cfg.hidden_size}, {cfg.num_heads} heads, MLP {cfg.intermediate_size}"
        f"{' gated ' + cfg.hidden_act if cfg.use_gated_mlp else ''}, patch {cfg.patch_size}, "
        f"{cfg.num_register_tokens} registers; {len(flat)} tensors, {n / 1e6:.2f}M parameters")
  return 0


if __name__ == "__main__":
  sys.exit(main())
