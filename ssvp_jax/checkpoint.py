"""Checkpoints of the trainable state in the work directory (orbax), resumed automatically.

Only what trains is saved: the trainable parameters and the optimiser state. The frozen
backbones never change and are reloaded from their bundles, so checkpoints stay small.

Each save stores a digest of the saved arrays in its JSON meta. A step whose files were truncated,
overwritten or emptied (it fails to restore, or restores to other bytes) is moved aside to
`WORKDIR/checkpoints_bad/` (never deleted) with a warning, and the previous step is tried: a run
resumes from the newest intact checkpoint. A checkpoint of other shapes than the model (its config
changed) is a `CheckpointError`, not a corruption: nothing is moved.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from ssvp_jax import distributed, fileio, sharding
from ssvp_jax.errors import UserError

log = logging.getLogger("ssvp_jax")
BAD_DIR = "checkpoints_bad"


class CheckpointError(UserError):
  """No checkpoint of the work directory can be restored into this model: names the folder."""


def manager(workdir: str, max_to_keep: int = 2) -> ocp.CheckpointManager:
  """An orbax CheckpointManager over `workdir/checkpoints`."""
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}  # metadata readable
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")), options=options,
                               item_handlers=handlers)


def trainable_state(model: nnx.Module, optimizer: nnx.Optimizer | None, wrt) -> nnx.State:
  """What a checkpoint holds: {"params": the `wrt` parameters of `model`, "opt": the optimiser state}.

  `trainer.TrainStep.checkpoint_state` builds the same tree from the live training state.
  """
  state = {"params": nnx.state(model, wrt)}
  if optimizer is not None:
    state["opt"] = nnx.state(optimizer)
  return nnx.State(state)


def save(mgr: ocp.CheckpointManager, step: int, state: nnx.State, meta: dict[str, Any]) -> None:
  """Saves `state` (a `trainable_state` tree) and a JSON `meta` dict at `step` (async)."""
  state = nnx.to_pure_dict(state)
  meta = {**meta, "digest": digest(state)}
  mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))


def digest(state: Any) -> str:
  """Digest of the leaves of a pure-dict state (path, dtype, shape, bytes), in path order."""
  leaves = sorted((jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_leaves_with_path(state))
  return fileio.digest_arrays((k, sharding.to_host(x)) for k, x in leaves)  # gathered across processes


def _shapes(tree: Any) -> dict[str, tuple]:
  """{"a/b/0": shape} of the arrays (or orbax's array metadata) in a nested state."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))
  return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in p): tuple(x.shape) for p, x in flat}


def _check_shapes(mgr: ocp.CheckpointManager, step: int, want: dict[str, tuple], got: dict[str, tuple]) -> None:
  if want != got:
    keys = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
    raise CheckpointError(
        f"{_step_dir(mgr, step)} holds other shapes than this config's model ({len(keys)} arrays, e.g. "
        + ", ".join(f"{k}: {got.get(k)} stored, {want.get(k)} wanted" for k in keys[:3])
        + "): the model config changed; train into a new --workdir")


def _restore_step(mgr: ocp.CheckpointManager, step: int, abstract: Any) -> tuple[Any, dict[str, Any]]:
  """(state, meta) of one step; CheckpointError on other shapes, any other exception on damaged files."""
  want = _shapes(abstract)
  # Shapes first, from the metadata: a changed config is not a damaged checkpoint (nothing is moved).
  _check_shapes(mgr, step, want, _shapes(mgr.item_metadata(step)["state"].tree))
  restored = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                       meta=ocp.args.JsonRestore()))
  _check_shapes(mgr, step, want, _shapes(restored["state"]))  # some orbax versions restore the stored shapes
  meta = dict(restored["meta"])
  if "digest" in meta and meta["digest"] != digest(restored["state"]):
    raise ValueError("the arrays read back differ from the ones saved (digest mismatch)")
  return restored["state"], meta


def _step_dir(mgr: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(str(mgr.directory), str(step))


def _move_aside(mgr: ocp.CheckpointManager, step: int) -> str:
  """Moves a damaged step folder to WORKDIR/checkpoints_bad/<step>-<time> (process 0); returns it."""
  src = _step_dir(mgr, step)
  dest = os.path.join(os.path.dirname(str(mgr.directory)), BAD_DIR, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
  if distributed.is_main():
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    shutil.move(src, dest)
  distributed.barrier("checkpoint moved aside")
  mgr.reload()
  return dest


def restore(mgr: ocp.CheckpointManager, model: nnx.Module, optimizer: nnx.Optimizer | None, wrt,
            step: int | None = None, move_bad: bool = True) -> dict[str, Any] | None:
  """Restores the newest intact step (or the given one) into `model`/`optimizer` in place; returns its
  meta, or None when there is no checkpoint at all.

  A step that cannot be restored is named in a warning and, with `move_bad` (training, and evaluate
  under the work directory's lock), moved aside; the next older one is tried. CheckpointError when
  steps exist and none restores.
  """
  target = trainable_state(model, optimizer, wrt)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.to_pure_dict(target))
  steps = sorted(mgr.all_steps(), reverse=True) if step is None else [step]
  failed = []
  for s in steps:
    try:
      state, meta = _restore_step(mgr, s, abstract)
      break
    except CheckpointError:
      raise
    except Exception as e:  # noqa: BLE001  (orbax, tensorstore and json raise many types for damaged files)
      where = _move_aside(mgr, s) if move_bad else _step_dir(mgr, s)
      reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
      log.warning("checkpoint %s cannot be restored (%s)%s; trying the previous one", _step_dir(mgr, s), reason,
                  f", moved to {where}" if move_bad else "")
      failed.append(f"{s} ({reason})")
  else:
    if not steps:
      return None
    moved = f"; the damaged steps were moved to {os.path.join(os.path.dirname(str(mgr.directory)), BAD_DIR)}"
    raise CheckpointError(f"{mgr.directory}: no checkpoint can be restored (steps {'; '.join(failed)})"
                          f"{moved if move_bad else ''}; train again (into a new --workdir to keep them)")
  nnx.replace_by_pure_dict(target, state)
  nnx.update(model, target["params"])
  if optimizer is not None:
    nnx.update(optimizer, target["opt"])
  return meta
