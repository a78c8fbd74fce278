"""The optimiser of SPEC section 5: Adam(0.5, 0.999), three learning rates, warmup + cosine.

Prompt embeddings train at `optim.lr_prompt`, the learned temperature (D7) at `optim.lr_tau`
(0.01, Bayes-PFL's group for its temperatures), everything else at `optim.lr`.
"""

from __future__ import annotations

import jax
import ml_collections
import optax
from flax import nnx

# Parameters under a module attribute of this name get the prompt learning rate.
PROMPT_MODULE = "prompts"
# The learned temperature of VTAM (D7) gets `optim.lr_tau`.
TAU_PARAM = "log_inv_tau"


def schedule(peak_lr: float, total_steps: int, warmup_frac: float) -> optax.Schedule:
  """Linear warmup over `warmup_frac` of the steps (D16), then cosine decay to 0."""
  warmup = int(round(warmup_frac * total_steps))
  if warmup == 0:
    return optax.cosine_decay_schedule(peak_lr, max(total_steps, 1))
  return optax.warmup_cosine_decay_schedule(0.0, peak_lr, warmup, max(total_steps, warmup + 1), 0.0)


def _labels(params):
  def label(path, _):
    keys = [getattr(k, "key", None) for k in path]
    if PROMPT_MODULE in keys:
      return "prompt"
    return "tau" if TAU_PARAM in keys else "other"
  return jax.tree_util.tree_map_with_path(label, params)


def make_tx(optim: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  """Adam with lr `optim.lr_prompt` for prompt embeddings, `optim.lr_tau` for the learned
  temperature (absent in older configs: `optim.lr`) and `optim.lr` for the rest."""
  def adam(lr):
    return optax.adam(schedule(lr, total_steps, optim.warmup_frac), b1=optim.b1, b2=optim.b2)
  return optax.multi_transform({"prompt": adam(optim.lr_prompt), "tau": adam(optim.get("lr_tau", optim.lr)),
                                "other": adam(optim.lr)}, _labels)


def make_optimizer(model: nnx.Module, optim: ml_collections.ConfigDict, total_steps: int,
                   wrt: nnx.filterlib.Filter) -> nnx.Optimizer:
  """`nnx.Optimizer` over the parameters selected by `wrt` (the trainable ones only)."""
  return nnx.Optimizer(model, make_tx(optim, total_steps), wrt=wrt)
