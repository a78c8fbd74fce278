"""Converted-weight bundles: one folder, self-describing, read strictly.

A bundle is what `convert/clip.py`, `convert/dinov3.py` and `convert/dinov2.py` write:

    DIR/config.json          {"model": "clip" | "dinov3" | "dinov2", "format_version": 1, "config": {...}}
    DIR/weights.safetensors  flat {"a.b.0.kernel": array} named after the NNX module's paths
    DIR/tokenizer/           CLIP only: files a transformers CLIPTokenizer reads

Loading is strict: every missing, unexpected or mis-shaped key is reported at
once, by name, before anything is assigned.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"


class WeightLoadError(ValueError):
  """A checkpoint does not fit the module: names every offending key."""


def flat_params(module: nnx.Module) -> dict[str, Any]:
  """The module's `nnx.Param` leaves as {dotted.path: array}."""
  return {_key(path): np.asarray(var[...]) for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def _key(path: tuple) -> str:
  return ".".join(str(k) for k in path)


def param_shapes(module: nnx.Module) -> dict[str, tuple[int, ...]]:
  """{dotted.path: shape} of the module's `nnx.Param`s; works on `nnx.eval_shape` results too."""
  return {_key(path): tuple(var.shape) for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def zeros_module(build: Callable[[], nnx.Module]) -> nnx.Module:
  """`build()`'s module with every variable zero, without running its random initialisers.

  Eager initialisers compile once per parameter shape, which takes tens of seconds for ViT-L on a
  CPU; a module whose weights are about to be overwritten by `assign_params` does not need them.
  """
  graphdef, state = nnx.split(nnx.eval_shape(build))
  return nnx.merge(graphdef, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), state))


def check_keys(expected: Mapping[str, tuple], given: Mapping[str, tuple], source: str) -> None:
  """Raise WeightLoadError naming every missing, unexpected and mis-shaped key."""
  missing = sorted(set(expected) - set(given))
  unexpected = sorted(set(given) - set(expected))
  shapes = sorted(f"{k}: expected {tuple(expected[k])}, got {tuple(given[k])}"
                  for k in set(expected) & set(given) if tuple(expected[k]) != tuple(given[k]))
  if missing or unexpected or shapes:
    lines = [f"{source} does not fit the model:"]
    if missing:
      lines.append(f"  missing keys ({len(missing)}): " + ", ".join(missing))
    if unexpected:
      lines.append(f"  unexpected keys ({len(unexpected)}): " + ", ".join(unexpected))
    if shapes:
      lines.append(f"  wrong shapes ({len(shapes)}): " + "; ".join(shapes))
    raise WeightLoadError("\n".join(lines))


def assign_params(module: nnx.Module, flat: Mapping[str, np.ndarray], source: str = "checkpoint") -> None:
  """Strictly copies `flat` into the module's parameters (in place)."""
  check_keys(param_shapes(module), {k: tuple(np.shape(v)) for k, v in flat.items()}, source)
  for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
    var[...] = jnp.asarray(flat[_key(path)], dtype=var.dtype)


def save_bundle(out_dir: str, model: str, config: Mapping[str, Any], weights: Mapping[str, np.ndarray]) -> None:
  """Writes config.json and weights.safetensors into `out_dir` (created if needed)."""
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
    json.dump({"model": model, "format_version": FORMAT_VERSION, "config": dict(config)}, f, indent=2)
  save_file({k: np.ascontiguousarray(np.asarray(v, dtype=np.float32)) for k, v in weights.items()},
            os.path.join(out_dir, WEIGHTS_FILE))


def read_bundle(bundle_dir: str, model: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """Reads a bundle written by `save_bundle`; returns (config dict, flat weights).

  Raises FileNotFoundError / ValueError naming the folder and what is wrong with it.
  """
  cfg_path = os.path.join(bundle_dir, CONFIG_FILE)
  w_path = os.path.join(bundle_dir, WEIGHTS_FILE)
  if not os.path.isdir(bundle_dir):
    raise FileNotFoundError(f"{bundle_dir}: no such folder; convert the weights with convert/{model}.py first")
  for p in (cfg_path, w_path):
    if not os.path.isfile(p):
      raise FileNotFoundError(f"{p} is missing: {bundle_dir} is not a converted {model} bundle "
                              f"(write one with convert/{model}.py)")
  with open(cfg_path) as f:
    meta = json.load(f)
  if meta.get("model") != model:
    raise ValueError(f"{cfg_path}: bundle holds model {meta.get('model')!r}, expected {model!r}")
  if meta.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{cfg_path}: format_version {meta.get('format_version')!r}, this code reads {FORMAT_VERSION}")
  return meta["config"], load_file(w_path)
