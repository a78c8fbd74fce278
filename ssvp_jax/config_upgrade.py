"""Older work directories' config.json read as today's config (the key map of docs/config_keys.md).

Issue 13 renamed the backbone sections by role and split `model` into sections whose keys are the
heads' constructor arguments. `upgrade` rewrites a stored config written before that; a config
already in today's form passes through unchanged. A stored key this map does not know is an error
naming it, never dropped.
"""

from __future__ import annotations

import copy
from typing import Any

from ssvp_jax.errors import UserError

# old section -> (new section, the registry name the old config implied)
SECTIONS = {"clip": ("backbones.semantic", "clip"), "dino": ("backbones.structural", "dinov3")}

# old `model.<key>` -> new dotted key
MODEL_KEYS = {
    "fusion": "hsvs.fusion", "atf_heads": "hsvs.num_heads", "atf_head_dim": "hsvs.head_dim",
    "atf_shared": "hsvs.share_scales", "clip_token_norm": "hsvs.normalize_clip",
    "n_background": "prompts.n_background", "n_state": "prompts.n_state", "n_prompts": "prompts.n_prompts",
    "class_words": "class_words",
    "vcpg": "vcpg.enabled", "latent_dim": "vcpg.latent_dim", "latent_tokens": "vcpg.latent_tokens",
    "beta": "vcpg.beta", "xi": "vcpg.xi", "prompt_ln": "vcpg.use_ln", "kl_reduction": "vcpg.kl_reduction",
    "rec_reduction": "vcpg.rec_reduction", "vae_stop_grad": "vcpg.stop_grad_input",
    "gating": "vtam.gating", "tau": "vtam.tau", "learn_tau": "vtam.learn_tau", "gamma": "vtam.gamma",
    "s_global": "vtam.s_global",
    # s_local ("topk" | "max") and s_local_topk become vtam.top_k (k, or 0 for the max): see `upgrade`.
}
S_GLOBAL = {"prob": "softmax", "cosine": "cosine"}
# keys the old `model` section gained over time, with the behaviour of the configs written before
MODEL_ABSENT = {"clip_token_norm": False, "rec_reduction": "mean", "vae_stop_grad": False}
REFERENCE_BACKBONES = {"clip": "semantic", "dino": "structural"}


def _set(d: dict, dotted: str, value: Any) -> None:
  *path, last = dotted.split(".")
  for part in path:
    d = d.setdefault(part, {})
  d[last] = value


def is_old(d: dict) -> bool:
  return any(k in d for k in ("model", *SECTIONS))


def upgrade(d: dict, source: str = "config.json") -> dict:
  """The stored config `d` (plain JSON types) in today's keys; `source` names it in errors."""
  if not is_old(d):
    return d
  d = copy.deepcopy(d)
  for old, (new, name) in SECTIONS.items():
    if old in d:
      _set(d, new, {"name": name, **d.pop(old)})
  model = {**MODEL_ABSENT, **d.pop("model", {})}
  if "s_local" in model or "s_local_topk" in model:
    form, k = model.pop("s_local", "max"), model.pop("s_local_topk", 0)
    _set(d, "vtam.top_k", int(k) if form == "topk" else 0)
  for key, value in model.items():
    if key not in MODEL_KEYS:
      raise UserError(f"{source}: model.{key} is not a key this version knows (ssvp_jax/config_upgrade.py "
                      "maps the older config keys); edit the file or train in a new work directory")
    _set(d, MODEL_KEYS[key], S_GLOBAL.get(value, value) if key == "s_global" else value)
  ref = d.get("reference") or {}
  if "backbones" in ref:
    ref["backbones"] = [REFERENCE_BACKBONES.get(b, b) for b in ref["backbones"]]
  return d
