"""Builds the frozen backbones, the tokenizer and the SSVP model from a config.

Real runs read converted bundles (`config.clip.bundle`, `config.dino.bundle`, written by
convert/clip.py and convert/dinov3.py). The demo and the tests, which cannot download weights,
set `random_init` to one of the PRESETS below instead and get randomly initialised backbones
and a byte-level tokenizer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from ssvp_jax.models import clip as clip_lib
from ssvp_jax.models import dinov3 as dinov3_lib
from ssvp_jax.models.ssvp import SSVP


def _tiny_clip() -> clip_lib.CLIPConfig:
  return clip_lib.CLIPConfig(
      vision=clip_lib.VisionConfig(image_size=28, patch_size=7, width=36, layers=2, heads=3, mlp_dim=52),
      text=clip_lib.TextConfig(vocab_size=clip_lib.BYTE_VOCAB_SIZE, context_length=24, width=24, layers=1,
                               heads=2, mlp_dim=40),
      projection_dim=20)


def _demo_text_clip(**vision) -> clip_lib.CLIPConfig:
  """A random CLIP with the given vision tower and the demos' small text tower (64 wide, 2 layers)."""
  return clip_lib.CLIPConfig(
      vision=clip_lib.VisionConfig(**vision),
      text=clip_lib.TextConfig(vocab_size=clip_lib.BYTE_VOCAB_SIZE, context_length=32, width=64, layers=2,
                               heads=4, mlp_dim=160),
      projection_dim=64)


def _demo_clip() -> clip_lib.CLIPConfig:
  """ViT-B/16's vision shape (the smallest standard one), configs/demo_vitb.py: as in the real
  model, the frozen backbones cost far more than the trainable heads, so the feature cache pays."""
  return _demo_text_clip(image_size=224, patch_size=16, width=768, layers=12, heads=12, mlp_dim=3072)


def _small_clip() -> clip_lib.CLIPConfig:
  """Four 96-wide blocks, patch 8 at 112 px (configs/demo.py): the heads cost more than these."""
  return _demo_text_clip(image_size=112, patch_size=8, width=96, layers=4, heads=4, mlp_dim=256)


# name -> (CLIP config, DINOv3 config); both give the same token grid at the configured sizes.
PRESETS = {
    "tiny": (_tiny_clip, lambda: dinov3_lib.DINOv3Config(hidden_size=32, num_layers=2, num_heads=2,
                                                          intermediate_size=44, patch_size=4,
                                                          num_register_tokens=1)),
    "small": (_small_clip, lambda: dinov3_lib.DINOv3Config(hidden_size=96, num_layers=4, num_heads=4,
                                                            intermediate_size=256, patch_size=8,
                                                            num_register_tokens=2)),
    "demo": (_demo_clip, lambda: dinov3_lib.DINOv3Config(hidden_size=768, num_layers=12, num_heads=12,
                                                          intermediate_size=3072, patch_size=16,
                                                          num_register_tokens=4)),
}


def _preset(section: ml_collections.ConfigDict, which: int, name: str):
  if section.random_init not in PRESETS:
    raise ValueError(f"config.{name}.random_init={section.random_init!r} is not a preset "
                     f"({', '.join(PRESETS)})")
  return PRESETS[section.random_init][which]()


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


def build_clip(config: ml_collections.ConfigDict):
  """(CLIP module, tokenizer) from `config.clip`; computes in `config.dtype`, weights stay float32."""
  c = config.clip
  dtype = compute_dtype(config)
  if c.bundle:
    return (clip_lib.load(c.bundle, pos_interpolation=c.pos_interpolation, dtype=dtype),
            clip_lib.load_tokenizer(c.bundle))
  if c.random_init:
    cfg = _preset(c, 0, "clip").replace(pos_interpolation=c.pos_interpolation)
    model = clip_lib.CLIP(cfg, dtype=dtype, rngs=nnx.Rngs(jax.random.fold_in(jax.random.key(config.seed), 1)))
    return model, clip_lib.byte_level_tokenizer()
  raise ValueError("config.clip.bundle is empty: convert the CLIP weights with "
                   "`python convert/clip.py --src PATH --out DIR` first and pass --config.clip.bundle=DIR")


def build_dino(config: ml_collections.ConfigDict) -> dinov3_lib.DINOv3:
  """DINOv3 module from `config.dino`; computes in `config.dtype`, weights stay float32."""
  d = config.dino
  dtype = compute_dtype(config)
  if d.bundle:
    return dinov3_lib.load(d.bundle, dtype=dtype)
  if d.random_init:
    return dinov3_lib.DINOv3(_preset(d, 1, "dino"), dtype=dtype,
                             rngs=nnx.Rngs(jax.random.fold_in(jax.random.key(config.seed), 2)))
  raise ValueError("config.dino.bundle is empty: convert the DINOv3 weights with "
                   "`python convert/dinov3.py --src PATH --out DIR` first and pass --config.dino.bundle=DIR")


def build_model(config: ml_collections.ConfigDict) -> tuple[SSVP, object]:
  """(SSVP model with fresh heads, tokenizer) from a full config; sets the matmul precision (D21)."""
  set_matmul_precision(config)
  clip, tokenizer = build_clip(config)
  dino = build_dino(config)
  for name, size, patch in (("clip", config.clip.image_size, clip.config.vision.patch_size),
                            ("dino", config.dino.image_size, dino.cfg.patch_size)):
    if size % patch:
      raise ValueError(f"config.{name}.image_size={size} is not a multiple of the patch size {patch}")
  if config.clip.image_size // clip.config.vision.patch_size != config.dino.image_size // dino.cfg.patch_size:
    raise ValueError(f"config.clip.image_size={config.clip.image_size} (patch {clip.config.vision.patch_size}) and "
                     f"config.dino.image_size={config.dino.image_size} (patch {dino.cfg.patch_size}) give "
                     "different token grids; SSVP fuses the two grids token by token")
  # float32 heads keep dtype None (compute in their inputs' dtype), as before config.dtype existed.
  heads_dtype = None if compute_dtype(config) == jnp.float32 else compute_dtype(config)
  model = SSVP(config.model, clip, dino, config.clip.layers, config.dino.layers, config.clip.local_tokens,
               dtype=heads_dtype, rngs=nnx.Rngs(params=jax.random.fold_in(jax.random.key(config.seed), 3)))
  return model, tokenizer
