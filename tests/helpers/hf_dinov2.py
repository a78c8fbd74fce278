"""Tiny random transformers DINOv2 models of odd sizes (test_dinov2 and test_convert_dinov2)."""

from __future__ import annotations

from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

from helpers.vit import random_weights

# Small, oddly sized configs (transformers' field names) and the class each builds.
# A: plain Dinov2Model; B: with registers and SwiGLU (ViT-g's MLP); C: SwiGLU, one head, no q/k/v
# bias, no registers; D: with registers, plain MLP, patch 7.
CONFIGS = {
    "A": ("dinov2", dict(hidden_size=60, num_attention_heads=3, num_hidden_layers=3, mlp_ratio=4, patch_size=4,
                         image_size=16)),
    "B": ("registers", dict(hidden_size=72, num_attention_heads=3, num_hidden_layers=2, mlp_ratio=4, patch_size=8,
                            image_size=40, num_register_tokens=3, use_swiglu_ffn=True)),
    "C": ("dinov2", dict(hidden_size=44, num_attention_heads=1, num_hidden_layers=2, mlp_ratio=2, patch_size=4,
                         image_size=20, use_swiglu_ffn=True, qkv_bias=False)),
    "D": ("registers", dict(hidden_size=36, num_attention_heads=2, num_hidden_layers=2, mlp_ratio=3, patch_size=7,
                            image_size=35, num_register_tokens=2)),
}
# (H, W) per config: the native size, then larger, smaller and non-square grids (the table resized).
SIZES = {"A": [(16, 16), (36, 36), (8, 8), (20, 28)], "B": [(40, 40), (64, 64), (24, 56)],
         "C": [(20, 20), (12, 28)], "D": [(35, 35), (14, 14), (49, 21)]}
_CLASSES = {"dinov2": (Dinov2Config, Dinov2Model), "registers": (Dinov2WithRegistersConfig, Dinov2WithRegistersModel)}


def random_hf_model(name: str, seed: int = 0):
  """CONFIGS[name] as a transformers model with every parameter random."""
  kind, fields = CONFIGS[name]
  config_cls, model_cls = _CLASSES[kind]
  return random_weights(model_cls, config_cls(**fields), seed)
