"""Tiny random transformers DINOv3 models of odd sizes (test_dinov3 and test_convert_dinov3)."""

from __future__ import annotations

from transformers import DINOv3ViTConfig, DINOv3ViTModel

from helpers.vit import random_weights

# Small, oddly sized configs (transformers' field names). A: plain MLP; B: gated
# SiLU MLP (as in the "+" models); C: one head, key bias, no MLP bias, no registers.
CONFIGS = {
    "A": dict(hidden_size=60, num_attention_heads=3, num_hidden_layers=3, intermediate_size=100, patch_size=4,
              num_register_tokens=2, image_size=16),
    "B": dict(hidden_size=72, num_attention_heads=3, num_hidden_layers=4, intermediate_size=84, patch_size=8,
              num_register_tokens=3, image_size=32, use_gated_mlp=True, hidden_act="silu"),
    "C": dict(hidden_size=44, num_attention_heads=1, num_hidden_layers=2, intermediate_size=52, patch_size=4,
              num_register_tokens=0, image_size=16, key_bias=True, mlp_bias=False),
}
# (H, W) per config: the nominal size, a larger square one, a non-square one.
SIZES = {"A": [(16, 16), (36, 36), (20, 28)], "B": [(32, 32), (48, 48), (40, 24)], "C": [(16, 16), (12, 20)]}


def random_hf_model(name: str, seed: int = 0) -> DINOv3ViTModel:
  """CONFIGS[name] as a transformers model with every parameter random."""
  return random_weights(DINOv3ViTModel, DINOv3ViTConfig(**CONFIGS[name]), seed)
