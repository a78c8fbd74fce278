"""Backbone registry: `config.backbones.<role>.name` -> the module that builds it.

Each entry is a module with a backbone class (ssvp_jax/models/backbone.py), `PRESETS` (random-weight
configs by name, for runs without downloaded weights) and `build(section, *, dtype, rngs)`; a
semantic one also has `tokenizer(section)`. Adding a backbone is its module, its converter and one
line here (README, "Extending").
"""

from __future__ import annotations

import dataclasses
import types

import jax
import ml_collections
from flax import nnx

from ssvp_jax.models import clip, dinov2, dinov3
from ssvp_jax.models.backbone import ROLES


@dataclasses.dataclass(frozen=True)
class Entry:
  role: str                 # "semantic" | "structural"
  module: types.ModuleType  # PRESETS, build(section, *, dtype, rngs) (+ tokenizer(section) if semantic)
  cls: type                 # the backbone class (MEAN, STD)
  converter: str            # the script that writes its bundles


REGISTRY: dict[str, Entry] = {
    "clip": Entry("semantic", clip, clip.CLIP, "convert/clip.py"),
    "dinov3": Entry("structural", dinov3, dinov3.DINOv3, "convert/dinov3.py"),
    "dinov2": Entry("structural", dinov2, dinov2.DINOv2, "convert/dinov2.py"),
}

# The random initialisers' seeds: fold_in(key(config.seed), n), as before the registry existed.
_SEED_OFFSET = {"semantic": 1, "structural": 2}


def names(role: str) -> tuple[str, ...]:
  return tuple(n for n, e in REGISTRY.items() if e.role == role)


def lookup(role: str, name: str) -> Entry:
  """The entry of backbone `name`; ValueError naming the config key unless it serves `role`."""
  if role not in ROLES:
    raise ValueError(f"unknown backbone role {role!r} (one of {ROLES})")
  if name not in REGISTRY or REGISTRY[name].role != role:
    raise ValueError(f"config.backbones.{role}.name={name!r} is not a {role} backbone "
                     f"(one of {', '.join(names(role))})")
  return REGISTRY[name]


def build(role: str, config: ml_collections.ConfigDict, dtype) -> nnx.Module:
  """The `role` backbone of a full config, computing in `dtype` (weights stay float32): converted
  weights from `section.bundle`, else the random preset `section.random_init`."""
  section = config.backbones[role]
  entry = lookup(role, section.name)
  lib = entry.module
  if not section.bundle:
    if not section.random_init:
      raise ValueError(f"config.backbones.{role}.bundle is empty: convert the {section.name} weights with "
                       f"`python {entry.converter} --src PATH --out DIR` first and pass "
                       f"--config.backbones.{role}.bundle=DIR")
    if section.random_init not in lib.PRESETS:
      raise ValueError(f"config.backbones.{role}.random_init={section.random_init!r} is not a {section.name} "
                       f"preset ({', '.join(lib.PRESETS)})")
  key = jax.random.fold_in(jax.random.key(config.seed), _SEED_OFFSET[role])
  return lib.build(section, dtype=dtype, rngs=nnx.Rngs(key))


def tokenizer(config: ml_collections.ConfigDict):
  """The semantic backbone's tokenizer (for the prompt templates, Eq. 6)."""
  section = config.backbones.semantic
  return lookup("semantic", section.name).module.tokenizer(section)
