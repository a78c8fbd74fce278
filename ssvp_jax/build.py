"""Builds the frozen backbones, the tokenizer and the SSVP model from a config.

Real runs read converted bundles (`config.backbones.semantic.bundle`, `...structural.bundle`,
written by convert/*.py). The demo and the tests, which cannot download weights, set `random_init`
to a preset of the backbone's module instead (ssvp_jax/models/registry.py) and get randomly
initialised backbones and a byte-level tokenizer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from ssvp_jax.models import registry
from ssvp_jax.models.ssvp import SSVP

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(config: ml_collections.ConfigDict):
  """`config.dtype` ("float32" or "bfloat16"; absent in older configs: float32) as a JAX dtype."""
  name = config.get("dtype") or "float32"
  if name not in DTYPES:
    raise ValueError(f"config.dtype={name!r} is not one of {', '.join(DTYPES)}")
  return DTYPES[name]


MATMUL_PRECISIONS = ("default", "high", "highest")


def set_matmul_precision(config: ml_collections.ConfigDict) -> None:
  """D21: `config.matmul_precision` (absent in older configs: "highest") for every float32 matmul
  JAX compiles from now on; "highest" forbids TF32 on GPUs, as PyTorch's default does."""
  name = config.get("matmul_precision") or "highest"
  if name not in MATMUL_PRECISIONS:
    raise ValueError(f"config.matmul_precision={name!r} is not one of {', '.join(MATMUL_PRECISIONS)}")
  jax.config.update("jax_default_matmul_precision", name)


def check_grids(config: ml_collections.ConfigDict, semantic, structural) -> None:
  """The semantic input size a multiple of its patch, and the structural one giving the same token
  grid (SSVP fuses the two grids token by token); the error names the structural size that would."""
  sem, struct = config.backbones.semantic, config.backbones.structural
  if sem.image_size % semantic.patch_size:
    raise ValueError(f"config.backbones.semantic.image_size={sem.image_size} is not a multiple of the patch "
                     f"size {semantic.patch_size} of {sem.name}")
  grid = sem.image_size // semantic.patch_size
  if struct.image_size != grid * structural.patch_size:
    raise ValueError(f"config.backbones.structural.image_size={struct.image_size} does not give the "
                     f"{grid}x{grid} token grid of the semantic backbone ({sem.name} at {sem.image_size} px) "
                     f"with {struct.name}'s patch size {structural.patch_size}: SSVP fuses the two grids token "
                     f"by token; pass --config.backbones.structural.image_size={grid * structural.patch_size}")


def build_model(config: ml_collections.ConfigDict) -> tuple[SSVP, object]:
  """(SSVP model with fresh heads, tokenizer) from a full config; sets the matmul precision (D21)."""
  set_matmul_precision(config)
  dtype = compute_dtype(config)
  semantic = registry.build("semantic", config, dtype)
  structural = registry.build("structural", config, dtype)
  check_grids(config, semantic, structural)
  # float32 heads keep dtype None (compute in their inputs' dtype), as before config.dtype existed.
  heads_dtype = None if dtype == jnp.float32 else dtype
  model = SSVP(semantic, structural, config, dtype=heads_dtype,
               rngs=nnx.Rngs(params=jax.random.fold_in(jax.random.key(config.seed), 3)))
  return model, registry.tokenizer(config)
