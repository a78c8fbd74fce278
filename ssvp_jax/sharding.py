"""SPMD on `jax.sharding`: the device mesh, the logical axis rules, and placing state and batches.

    mesh = make_mesh(config.mesh)            # data x model devices (1 x 1 on one device)
    shard_model(model, mesh, config.mesh)    # every parameter placed as the rules say
    batch = shard_batch(batch, mesh)         # examples split over `data`

The jitted steps need nothing else: their inputs carry their shardings and XLA's partitioner
(GSPMD, Auto axes) inserts the collectives. `constrain` pins the updated state to the same
shardings inside the training step.

Each parameter's dimensions get logical names from PARAM_AXES (matched on the end of the
parameter's path, so a module keeps its rules wherever the model holds it); LOGICAL_AXIS_RULES, the
one table of rules, maps logical names to mesh axes. With sharding on, a parameter of 2+ dimensions
that no rule names and REPLICATED does not declare is an error that names it: a new layer cannot
stay replicated by accident. The result is
stored on the variable as its `out_sharding` (and `mesh`) metadata, the same metadata
`nnx.with_partitioning` writes, so `nnx.get_partition_spec` reads it back and an `nnx.Optimizer`
built afterwards gives its moments the sharding of their parameter. The names are attached after
construction rather than in each module's `__init__` because Flax shards annotated variables
eagerly, which would make every module unbuildable outside a mesh.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from ssvp_jax.models.ssvp import FROZEN

MESH_AXES = ("data", "model")

# THE table: logical axis -> mesh axis (None: replicated).
LOGICAL_AXIS_RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", "data"),   # examples of a batch: data parallel
    ("embed", "data"),   # a weight's model-width axis: FSDP, each data device keeps a slice
    ("mlp", "model"),    # MLP hidden width: tensor parallel
    ("heads", "model"),  # attention inner width (heads x head dim): tensor parallel
    ("vocab", "model"),  # token table rows
    ("joint", None),     # CLIP's joint image-text width (the projections): small, replicated
    ("latent", None),    # VCPG's latent width and latent tokens (128 at full size): small, replicated
)

# Logical names of each parameter's dimensions, by regular expression on the end of its dotted path
# (first match wins). This is what `nnx.with_partitioning` would say in the modules. The patterns
# never name the attribute holding a backbone (`clip.`, `backbones.semantic.`): module-local names.
PARAM_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    # Attention projections: CLIP q/k/v/out, DINOv2/v3 q/k/v/o, HSVS's ATF q_c/k_d/v_d/q_d/k_c/v_c.
    (r"\.(q|k|v|q_c|k_c|v_c|q_d|k_d|v_d)\.kernel$", ("embed", "heads")),
    (r"\.(q|k|v)\.bias$", ("heads",)),
    (r"\.(out|o)\.kernel$", ("heads", "embed")),
    # MLPs: CLIP fc1/fc2, DINOv2/v3 up/gate/down, the heads' MLP fc1/fc2.
    (r"\.(fc1|up|gate)\.kernel$", ("embed", "mlp")),
    (r"\.(fc1|up|gate)\.bias$", ("mlp",)),
    (r"\.(fc2|down)\.kernel$", ("mlp", "embed")),
    # Embeddings and projections.
    (r"\.token_embedding\.embedding$", ("vocab", "embed")),
    (r"\.patch_embed\.kernel$", (None, None, None, "embed")),
    (r"\.pos_embed$", (None, "embed")),
    (r"\.proj$", ("embed", "joint")),
    (r"\.clip_maps\.\d+\.kernel$", ("embed", None)),
    # VCPG: the posterior's F_mu / F_sigma (Eq. 7) and the attention of Eq. 10 over latent tokens.
    (r"\.(to_mu|to_log_var)\.kernel$", ("embed", "latent")),
    (r"\.w_q\.kernel$", ("embed", "heads")),
    (r"\.w_k\.kernel$", ("latent", "heads")),
    (r"\.w_v\.kernel$", ("latent", "embed")),
)

# Parameters of 2+ dimensions that stay replicated on purpose (pattern, reason). Any other 2+-D
# parameter without a PARAM_AXES rule is an error when its part of the model is sharded.
REPLICATED: tuple[tuple[str, str], ...] = (
    (r"\.(cls_token|register_tokens)$", "[1, n, D]: one token vector each, a bias's size"),
    (r"\.prompts\.(background|state)$", "the learned prompt tokens: a few text-width vectors"),
    (r"\.spatial_gates\.\d+\.kernel$", "VTAM's 1x1 gate convolutions [D, 1]: one vector each"),
)


def make_mesh(mesh_cfg: Mapping[str, Any] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, model) mesh over all devices (of every process) from `config.mesh`.

  One axis may be -1: it takes the devices the other leaves; with no -1, a one-process run may
  ask for fewer devices than it has (the first ones, e.g. a 1 x 1 reference run). Axis types are Auto, so XLA's
  partitioner places the activations and inserts the collectives (FSDP needs no change in the
  models); `jax.make_mesh` would default to Explicit.
  """
  mesh_cfg = mesh_cfg or {}
  devices = list(devices if devices is not None else jax.devices())
  sizes = [int(mesh_cfg.get(a, -1 if a == "data" else 1)) for a in MESH_AXES]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"config.mesh: data={sizes[0]}, model={sizes[1]}: give positive sizes, at most one -1")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"config.mesh: {len(devices)} devices do not split into groups of {known}")
    sizes[sizes.index(-1)] = len(devices) // known
  need = int(np.prod(sizes))
  if need < len(devices) and jax.process_count() == 1:
    devices = devices[:need]  # a mesh smaller than the machine takes its first devices
  if need != len(devices):
    raise ValueError(f"config.mesh: data={sizes[0]} x model={sizes[1]} needs {need} devices, there are "
                     f"{len(devices)}" + (" (a multi-process mesh must span every device)" if need < len(devices)
                                          else ""))
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_to_mesh(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Sequence[tuple[str, str | None]] = LOGICAL_AXIS_RULES) -> P:
  """PartitionSpec of an array of `shape` whose dimensions have logical `names`.

  A dimension stays replicated when the rules map its name to nothing, when its mesh axis does
  not divide it (JAX shards evenly only), or when an earlier dimension took that mesh axis.
  """
  if len(names) != len(shape):
    raise ValueError(f"logical names {tuple(names)} do not fit a {len(shape)}-d shape {tuple(shape)}")
  table = dict(rules)
  spec, used = [], set()
  for name, dim in zip(names, shape):
    axis = table.get(name) if name is not None else None
    if axis is None or axis in used or dim % mesh.shape[axis]:
      spec.append(None)
    else:
      spec.append(axis)
      used.add(axis)
  return P(*spec)


def logical_axes(path: str, ndim: int) -> tuple[str | None, ...] | None:
  """Logical names of the dimensions of the `ndim`-d parameter at dotted `path` (PARAM_AXES).

  All None for a parameter REPLICATED declares and for one of fewer than 2 dimensions without a
  rule (biases, norms, scalars); None (no answer) for a 2+-D parameter neither table names.
  A rule of another rank than the parameter is a ValueError naming both.
  """
  dotted = "." + path
  for pattern, names in PARAM_AXES:
    if re.search(pattern, dotted):
      if len(names) != ndim:
        raise ValueError(f"sharding rule {pattern!r} names {len(names)} dimensions; parameter {path} has {ndim}")
      return names
  if ndim >= 2 and not any(re.search(pattern, dotted) for pattern, _ in REPLICATED):
    return None
  return (None,) * ndim


def param_spec(path: str, shape: Sequence[int], mesh: Mesh) -> P:
  """The rules' PartitionSpec of the parameter at dotted `path` (e.g. "backbones.structural.layers.0.mlp.up.kernel")."""
  names = logical_axes(path, len(shape))
  if names is None:
    raise ValueError(_unmatched_message([f"{path} {tuple(shape)}"]))
  return logical_to_mesh(names, shape, mesh)


def _unmatched_message(params: Sequence[str]) -> str:
  return (f"no sharding rule for {len(params)} parameter(s) of 2+ dimensions: {', '.join(params)}; add a rule "
          "to PARAM_AXES in ssvp_jax/sharding.py, or list it in REPLICATED there with the reason (it is sharded "
          "because mesh.shard_backbones / mesh.shard_heads is on)")


def shard_model(model: nnx.Module, mesh: Mesh, mesh_cfg: Mapping[str, Any] | None = None) -> nnx.Module:
  """Annotates every parameter with its sharding and moves it there (in place; returns `model`).

  `mesh_cfg.shard_backbones` / `shard_heads` (config.mesh) choose whether the frozen backbones /
  the trainable heads follow the rules (FSDP + tensor parallel) or stay replicated. A sharded
  parameter of 2+ dimensions without a rule is a ValueError naming every such path, raised before
  anything moves.
  """
  mesh_cfg = mesh_cfg or {}
  frozen = nnx.filterlib.to_predicate(FROZEN)
  placements, unmatched = [], []
  for path, var in nnx.iter_graph(model):
    if not isinstance(var, nnx.Variable) or not hasattr(var.get_value(), "shape"):
      continue
    shape, spec = var.get_value().shape, P()
    if mesh_cfg.get("shard_backbones" if frozen(path, var) else "shard_heads", False):
      dotted = ".".join(map(str, path))
      names = logical_axes(dotted, len(shape))
      if names is None:
        unmatched.append(f"{dotted} {tuple(shape)}")
        continue
      spec = logical_to_mesh(names, shape, mesh)
    placements.append((var, spec))
  if unmatched:
    raise ValueError(_unmatched_message(unmatched))
  for var, spec in placements:
    var.set_metadata(out_sharding=tuple(spec), mesh=mesh)
    var.set_value(jax.device_put(var.get_value(), NamedSharding(mesh, spec)))
  return model


def place(node: Any, mesh: Mesh) -> Any:
  """Moves every array variable of `node` (e.g. an nnx.Optimizer) onto `mesh` (in place; returns `node`).

  A variable keeps the sharding its `out_sharding` metadata names (an optimizer's moments inherit
  their parameter's); the rest (step counts) are replicated. Without this, those fresh scalars
  enter the first step uncommitted and leave it on the mesh, and the step compiles twice.
  """
  for _, var in nnx.iter_graph(node):
    if not isinstance(var, nnx.Variable) or not hasattr(var.get_value(), "shape"):
      continue
    spec = P(*var.get_metadata("out_sharding")) if var.has_metadata("out_sharding") else P()
    var.set_metadata(out_sharding=tuple(spec), mesh=mesh)
    var.set_value(jax.device_put(var.get_value(), NamedSharding(mesh, spec)))
  return node


def specs(node: Any) -> dict[str, P]:
  """{dotted path: PartitionSpec} of the variables of an NNX object, from their metadata."""
  flat = nnx.to_flat_state(nnx.get_partition_spec(nnx.state(node)))
  return {".".join(map(str, p)): v.get_value() for p, v in flat}


def constrain(*nodes: Any) -> None:
  """Inside a jitted step: pins the variables of `nodes` (model, optimizer) to their annotated shardings.

  Without it XLA may hand back updated parameters or moments in another layout. Variables
  without sharding metadata (a model that `shard_model` never saw) are left alone.
  """
  for node in nodes:
    state = nnx.state(node)
    shardings = jax.tree.map(_named_sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    if any(s is not None for s in jax.tree.leaves(shardings, is_leaf=lambda x: x is None)):
      nnx.update(node, jax.tree.map(lambda v, s: v if s is None else jax.lax.with_sharding_constraint(v, s),
                                    state, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def _named_sharding(var: Any) -> NamedSharding | None:
  if isinstance(var, nnx.Variable) and var.has_metadata("mesh") and var.has_metadata("out_sharding"):
    return NamedSharding(var.get_metadata("mesh"), P(*var.get_metadata("out_sharding")))
  return None


def model_mesh(model: nnx.Module) -> Mesh | None:
  """The mesh `shard_model` placed `model` on, or None for a model it never saw."""
  for _, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Variable) and var.has_metadata("mesh"):
      return var.get_metadata("mesh")
  return None


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading axis over the data devices ("batch" in the rules), the rest replicated."""
  return NamedSharding(mesh, P(dict(LOGICAL_AXIS_RULES)["batch"], *([None] * (ndim - 1))))


def shard_batch(batch: Any, mesh: Mesh, *, process_local: bool = False,
                what: str = "--config.optim.batch_size") -> Any:
  """A batch (a pytree of arrays, e.g. a dict) -> global arrays split over `data` on the leading axis.

  process_local=False: every process holds the whole batch (evaluation). True: each process holds
  its own rows (`distributed.process_rows`), stacked in process order into the global batch.
  `what` names the setting to change in the error for a batch the data axis does not divide.
  """
  data = mesh.shape["data"]

  def put(x):
    x = np.asarray(x)
    rows = x.shape[0] * (jax.process_count() if process_local else 1)
    if rows % data:
      raise ValueError(f"a batch of {rows} examples does not split over the {data} devices of the mesh's "
                       f"data axis: set {what} to a multiple of {data}")
    sharding = batch_sharding(mesh, x.ndim)
    if process_local:
      return jax.make_array_from_process_local_data(sharding, x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

  return jax.tree.map(put, batch)


def to_host(x: jax.Array) -> np.ndarray:
  """A global array as one NumPy array in every process (gathered across processes when needed)."""
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def mesh_config(config: ml_collections.ConfigDict) -> Mapping[str, Any]:
  """`config.mesh`, or the defaults for a config written before it existed (an older config.json)."""
  return config.get("mesh") or {"data": -1, "model": 1}
