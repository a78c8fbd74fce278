"""Shared by test_dinov2 and test_convert_dinov2: tiny random transformers DINOv2 models and their outputs."""

from __future__ import annotations

import numpy as np
import torch
from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

TOL = 1e-4  # max abs difference allowed, float32

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
  """transformers model with every parameter random: non-zero biases, LayerScale in [0.5, 1.5]."""
  kind, fields = CONFIGS[name]
  config_cls, model_cls = _CLASSES[kind]
  torch.manual_seed(seed)
  model = model_cls(config_cls(**fields)).eval()
  with torch.no_grad():
    for n, p in model.named_parameters():
      if n.endswith("lambda1"):
        p.uniform_(0.5, 1.5)
      elif "norm" in n and n.endswith("weight"):
        p.normal_(1.0, 0.1)
      else:
        p.normal_(0.0, 0.1)
  return model


def hf_state(model) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def images(shape, batch=2, seed=0) -> np.ndarray:
  """Normalised-looking NHWC float32 images."""
  return np.random.default_rng(seed).standard_normal((batch, *shape, 3)).astype(np.float32)


def torch_outputs(model, x_nhwc: np.ndarray):
  """(hidden_states list, last_hidden_state) of the transformers model on NHWC images."""
  with torch.no_grad():
    out = model(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2)), output_hidden_states=True)
  return [h.numpy() for h in out.hidden_states], out.last_hidden_state.numpy()


def max_diff(a, b) -> float:
  a, b = np.asarray(a), np.asarray(b)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.abs(a - b).max())
