"""Shared pieces of the converters: reading PyTorch checkpoints, applying a key table.

A converter is a pure function from a PyTorch state dict ({name: np.ndarray}) to
the flat Flax dict that `ssvp_jax.models.bundle.assign_params` takes. It is
written as a declarative table of `Rule`s (target pattern, source pattern, hook)
expanded over layer indices, so that the mapping can be read in one screen and
inverted by tests.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import zipfile
from typing import Callable, Iterable, Mapping

import numpy as np

from ssvp_jax.models.bundle import WeightLoadError

Hook = Callable[[np.ndarray], np.ndarray]


def identity(x: np.ndarray) -> np.ndarray:
  return x


def transpose(x: np.ndarray) -> np.ndarray:
  """PyTorch Linear weight [out, in] -> Flax kernel [in, out]."""
  return np.ascontiguousarray(x.T)


def conv_to_hwio(x: np.ndarray) -> np.ndarray:
  """PyTorch conv weight [out, in, kh, kw] -> Flax kernel [kh, kw, in, out]."""
  return np.ascontiguousarray(x.transpose(2, 3, 1, 0))


@dataclasses.dataclass(frozen=True)
class Rule:
  """target <- hook(source); `{i}` in both patterns is the layer index."""
  target: str
  source: str
  hook: Hook = identity


def linear_rules(target: str, source: str, bias: bool, kernel_hook: Hook = transpose,
                 bias_hook: Hook = identity) -> list[Rule]:
  """A PyTorch Linear (weight [out, in], bias) -> nnx.Linear (kernel [in, out], bias)."""
  rules = [Rule(f"{target}.kernel", f"{source}.weight", kernel_hook)]
  return rules + [Rule(f"{target}.bias", f"{source}.bias", bias_hook)] if bias else rules


def norm_rules(target: str, source: str) -> list[Rule]:
  """A PyTorch LayerNorm (weight, bias) -> nnx.LayerNorm (scale, bias)."""
  return [Rule(f"{target}.scale", f"{source}.weight"), Rule(f"{target}.bias", f"{source}.bias")]


def expand(rules: Iterable[Rule], num_layers: int) -> list[Rule]:
  """Replaces `{i}` by 0..num_layers-1 in rules that have it."""
  out = []
  for r in rules:
    if "{i}" in r.target or "{i}" in r.source:
      out += [Rule(r.target.format(i=i), r.source.format(i=i), r.hook) for i in range(num_layers)]
    else:
      out.append(r)
  return out


def _raise_listed(header: str, groups) -> None:
  """WeightLoadError with `header` and one line per non-empty (label, items, separator) group; none: no error."""
  lines = [f"  {label} ({len(items)}): " + sep.join(items) for label, items, sep in groups if items]
  if lines:
    raise WeightLoadError("\n".join([header, *lines]))


def apply_rules(state: Mapping[str, np.ndarray], rules: Iterable[Rule], source: str,
                ignore: Iterable[str] = ()) -> dict[str, np.ndarray]:
  """Maps a PyTorch state dict through `rules`; strict on both sides.

  Every source key must be consumed by a rule or match a regex in `ignore`
  (buffers such as `position_ids`); every rule's source must exist. All
  offenders are named in one WeightLoadError.
  """
  rules = list(rules)
  ignore_re = [re.compile(p) for p in ignore]
  wanted = {r.source for r in rules}
  missing = sorted(wanted - set(state))
  unexpected = sorted(k for k in state if k not in wanted and not any(p.fullmatch(k) for p in ignore_re))
  _raise_listed(f"{source} does not match the expected layout:",
                (("missing keys", missing, ", "), ("unexpected keys", unexpected, ", ")))
  return {r.target: r.hook(np.asarray(state[r.source], dtype=np.float32)) for r in rules}


def _to_numpy(tensors: Mapping) -> dict[str, np.ndarray]:
  import torch

  out = {}
  for k, v in tensors.items():
    if isinstance(v, torch.Tensor):
      out[k] = v.detach().to(torch.float32).cpu().numpy()
  return out


def _load_torch_file(path: str, allow_pickle: bool) -> dict[str, np.ndarray]:
  import torch

  if zipfile.is_zipfile(path):
    with zipfile.ZipFile(path) as z:
      is_torchscript = any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in z.namelist())
    if is_torchscript:
      # A TorchScript archive (OpenAI's released .pt files) holds a serialised
      # graph, not pickled Python callables; loading it runs no user code.
      return _to_numpy(torch.jit.load(path, map_location="cpu").state_dict())
  try:
    obj = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
  except Exception as e:  # torch raises many types for a non-checkpoint file
    raise ValueError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {str(e)[:200]}). "
                     "Only plain state dicts load by default (weights_only=True).") from e
  for key in ("state_dict", "model", "teacher"):  # common wrappers around a state dict
    if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
      obj = obj[key]
  if not isinstance(obj, dict) or not obj:
    raise ValueError(f"{path}: holds {type(obj).__name__}, not a state dict of tensors")
  out = _to_numpy(obj)
  if not out:
    raise ValueError(f"{path}: holds no tensors")
  return out


def read_checkpoint(path: str, allow_pickle: bool = False) -> dict[str, np.ndarray]:
  """Reads a PyTorch checkpoint into {name: float32 array}.

  `path` is a file (.safetensors, .bin/.pth/.pt state dict, TorchScript archive)
  or a transformers folder (model.safetensors, pytorch_model.bin, or their
  sharded `*.index.json` forms). Errors name the path and what was wrong.
  """
  if os.path.isdir(path):
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
      if os.path.isfile(os.path.join(path, index)):
        with open(os.path.join(path, index)) as f:
          shards = sorted(set(json.load(f)["weight_map"].values()))
        out = {}
        for s in shards:
          out.update(read_checkpoint(os.path.join(path, s), allow_pickle))
        return out
    for name in ("model.safetensors", "pytorch_model.bin"):
      if os.path.isfile(os.path.join(path, name)):
        return read_checkpoint(os.path.join(path, name), allow_pickle)
    found = sorted(glob.glob(os.path.join(path, "*.safetensors")) + glob.glob(os.path.join(path, "*.pth")))
    if len(found) == 1:
      return read_checkpoint(found[0], allow_pickle)
    raise FileNotFoundError(f"{path}: no weights found (expected model.safetensors, pytorch_model.bin, "
                            f"a sharded index, or exactly one *.safetensors/*.pth file; found {found or 'none'})")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such file or folder")
  if path.endswith(".safetensors"):
    # Through torch, not safetensors.numpy: NumPy has no bfloat16, and hub copies often are bf16.
    from safetensors.torch import load_file
    try:
      return _to_numpy(load_file(path))
    except Exception as e:
      raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
  return _load_torch_file(path, allow_pickle)


def strip_prefix(state: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
  """Drops `prefix` from keys that have it (keys without it are kept as they are)."""
  return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}


def map_checked(state: Mapping[str, np.ndarray], rules: list[Rule], expected: Mapping[str, tuple[int, ...]],
                source: str, ignore: Iterable[str] = (), what: str = "the model") -> dict[str, np.ndarray]:
  """`apply_rules` (strict on names), then every result checked against the module's shapes `expected`.

  A hook that fails on a tensor of the wrong rank is found and named; a wrong shape names both the
  source and the target key; a module parameter no rule produced is named too.
  """
  try:
    flat = apply_rules(state, rules, source, ignore)
  except WeightLoadError:
    raise
  except Exception as e:  # a hook met a tensor of the wrong rank: find and name it
    for r in rules:
      try:
        r.hook(np.asarray(state[r.source], np.float32))
      except Exception as err:
        raise WeightLoadError(f"{source}: {r.source} has shape {tuple(np.shape(state[r.source]))}, "
                              f"which cannot map to {r.target} ({err})") from err
    raise e
  src_of = {r.target: r.source for r in rules}
  bad = [f"{src_of.get(k, '?')} -> {k}: expected {expected[k]}, got {v.shape}"
         for k, v in sorted(flat.items()) if k in expected and tuple(v.shape) != tuple(expected[k])]
  missing = sorted(set(expected) - set(flat))
  _raise_listed(f"{source} does not fit {what}:", (("wrong shapes", bad, "; "), ("not produced", missing, ", ")))
  return flat


def read_hf_config(src: str) -> tuple[dict, str]:
  """(config.json dict, its path) of transformers weights at `src` (a folder, or a file in one)."""
  cfg_path = os.path.join(src if os.path.isdir(src) else os.path.dirname(os.path.abspath(src)), "config.json")
  if not os.path.isfile(cfg_path):
    raise FileNotFoundError(f"{src}: transformers-layout weights need their config.json, not found at {cfg_path}")
  with open(cfg_path) as f:
    try:
      return json.load(f), cfg_path
    except json.JSONDecodeError as e:
      raise ValueError(f"{cfg_path}: not valid JSON ({e})") from e


# ----------------------------------------------------------------------------- the output folder


def add_output_args(parser, what: str) -> None:
  """--out and --overwrite for a converter writing a `what` bundle folder."""
  parser.add_argument("--out", required=True, help=f"{what} bundle folder to write (config.json + weights.safetensors)")
  parser.add_argument("--overwrite", action="store_true",
                      help=f"replace --out when it already holds a {what} bundle (anything else is never replaced)")


def _is_bundle(path: str, model: str) -> bool:
  try:
    with open(os.path.join(path, "config.json")) as f:
      meta = json.load(f)
  except (OSError, ValueError):
    return False
  return isinstance(meta, dict) and meta.get("model") == model and "format_version" in meta


def check_out(out: str, overwrite: bool, model: str) -> None:
  """Refuses an existing non-empty --out unless --overwrite, and then only a `model` bundle (a trained
  work directory's config.json has no "model": "clip"); checked before any conversion work."""
  from ssvp_jax import fileio
  fileio.check_output(out, overwrite, f"converted {model} bundle", lambda p: _is_bundle(p, model), folder=True)


def write_bundle(out: str, model: str, config: Mapping, flat: Mapping[str, np.ndarray],
                 extra: Callable[[str], None] | None = None) -> None:
  """Writes the bundle (and `extra(folder)`, e.g. a tokenizer) into a temporary folder that replaces
  `out` only once complete: a failure or a full disk leaves `out` as it was, and nothing stale inside."""
  from ssvp_jax import fileio
  from ssvp_jax.models.bundle import save_bundle
  with fileio.atomic_dir(out) as tmp:
    save_bundle(tmp, model, config, flat)
    if extra is not None:
      extra(tmp)
