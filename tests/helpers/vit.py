"""What the DINOv2 and DINOv3 parity tests share: random ViT weights, input images, outputs, the tolerance."""

from __future__ import annotations

import numpy as np
import torch

TOL = 1e-4  # max abs difference allowed, float32


def random_weights(model_cls, config, seed: int = 0) -> torch.nn.Module:
  """A transformers ViT in eval mode with every parameter random: non-zero biases, LayerScale in [0.5, 1.5]."""
  torch.manual_seed(seed)
  model = model_cls(config).eval()
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
