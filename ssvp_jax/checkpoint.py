"""Checkpoints of the trainable state in the work directory (orbax), resumed automatically.

Only what trains is saved: the trainable parameters and the optimiser state. The frozen
backbones never change and are reloaded from their bundles, so checkpoints stay small.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx


def manager(workdir: str, max_to_keep: int = 2) -> ocp.CheckpointManager:
  """An orbax CheckpointManager over `workdir/checkpoints`."""
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")), options=options)


def _trainable_state(model: nnx.Module, optimizer: nnx.Optimizer | None, wrt) -> dict[str, Any]:
  state = {"params": nnx.state(model, wrt)}
  if optimizer is not None:
    state["opt"] = nnx.state(optimizer)
  return state


def save(mgr: ocp.CheckpointManager, step: int, model: nnx.Module, optimizer: nnx.Optimizer | None,
         wrt, meta: dict[str, Any]) -> None:
  """Saves the trainable parameters, optimiser state and a JSON `meta` dict at `step` (async)."""
  state = nnx.to_pure_dict(nnx.State(_trainable_state(model, optimizer, wrt)))
  mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))


def restore(mgr: ocp.CheckpointManager, model: nnx.Module, optimizer: nnx.Optimizer | None, wrt,
            step: int | None = None) -> dict[str, Any] | None:
  """Restores the latest (or given) step into `model`/`optimizer` in place; returns its meta or None."""
  step = mgr.latest_step() if step is None else step
  if step is None:
    return None
  target = nnx.State(_trainable_state(model, optimizer, wrt))
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.to_pure_dict(target))
  restored = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                       meta=ocp.args.JsonRestore()))
  nnx.replace_by_pure_dict(target, restored["state"])
  nnx.update(model, target["params"])
  if optimizer is not None:
    nnx.update(optimizer, target["opt"])
  return dict(restored["meta"])
