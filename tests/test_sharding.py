"""Sharded training on 8 host CPU devices equals one device; parameters end where the rules say.

The checks run in a child process: `--xla_force_host_platform_device_count=8` only counts if it is
set before JAX starts, and this process has started JAX already. The child (this file run as a
script) trains the tiny config (batch 8) three times - one device, data-parallel over 8, and
FSDP + tensor-parallel on a 4 x 2 mesh - and writes the losses and the parameter shardings
as JSON; the test compares them.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run name -> config.mesh overrides.
RUNS = {
    "one": dict(data=1, model=1),
    "dp": dict(data=8, model=1),
    "fsdp_tp": dict(data=4, model=2, shard_backbones=True, shard_heads=True),
}
# Parameters whose placement the fsdp_tp run reports (P("data", "model") where the sizes divide).
PARAMS = ("backbones.structural.layers.0.mlp.up.kernel", "backbones.semantic.vision.blocks.0.fc1.kernel",
          "backbones.semantic.vision.blocks.0.attn.q.kernel", "hsvs.local_blocks.0.mlp.fc1.kernel", "hsvs.local_blocks.0.q_c.kernel", "vtam.scale_gate.fc1.kernel",
          "vcpg.to_mu.kernel", "prompts.state")


def _child(out_path: str, data_dir: str, work: str) -> None:
  import jax
  from flax import nnx

  sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
  from helpers.tiny import tiny_config
  from ssvp_jax import evaluate, sharding, trainer
  from ssvp_jax.build import build_model
  from ssvp_jax.data import splits

  assert jax.device_count() == 8, jax.devices()
  result = {}
  for name, mesh in RUNS.items():
    c = tiny_config(**{"optim.batch_size": 8, "optim.epochs": 1, "eval.batch_size": 8, "optim.warmup_frac": 0.0,
                       "optim.lr": 3e-3, "optim.lr_prompt": 3e-3})
    c.mesh.update(mesh)
    c.train_data.root = os.path.join(data_dir, "source")
    c.eval_data.target.root = os.path.join(data_dir, "target")
    wd = os.path.join(work, name)
    model, tok, _ = trainer.train(c, wd)
    with open(os.path.join(wd, "log.jsonl")) as f:
      losses = [json.loads(line)["loss/total"] for line in f]
    flat = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    result[name] = {
        "losses": losses,
        "devices": len(model.hsvs.global_block.mlp.fc1.kernel[...].sharding.device_set),
        "specs": {k: _spec(flat[k][...].sharding.spec, flat[k][...].ndim) for k in PARAMS},
        "rules_specs": {k: _spec(sharding.specs(model)[k], flat[k][...].ndim) for k in PARAMS},
    }
    if name != "dp":  # evaluation on the sharded model (eval batch split over `data`) vs one device
      records = splits.read_split(c.eval_data.target, wd, "eval_data.target")
      result[name]["s_final"] = evaluate.predict_records(model, tok, c, records)["s_final"].tolist()
  # The switches: backbones replicated, heads sharded (no training needed to check placement).
  c = tiny_config()
  model, _ = build_model(c)
  sharding.shard_model(model, sharding.make_mesh({"data": 4, "model": 2}),
                       {"shard_backbones": False, "shard_heads": True})
  flat = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  result["switch"] = {k: _spec(flat[k][...].sharding.spec, flat[k][...].ndim) for k in PARAMS}
  # A batch of 8 lands as 8 rows over the data devices, one per device on the 8-way data axis.
  mesh8 = sharding.make_mesh({"data": -1})
  x = sharding.shard_batch({"x": np.arange(16, dtype=np.float32).reshape(8, 2)}, mesh8)["x"]
  result["batch"] = {"spec": _spec(x.sharding.spec, 2),
                     "shard_rows": sorted({s.data.shape[0] for s in x.addressable_shards})}
  try:
    sharding.shard_batch({"x": np.zeros((4, 2))}, mesh8)
    result["bad_batch"] = ""
  except ValueError as e:
    result["bad_batch"] = str(e)
  with open(out_path, "w") as f:
    json.dump(result, f)


def _spec(spec, ndim: int) -> list:
  """A PartitionSpec as a list with one entry per dimension (P("data") of a matrix: ["data", None])."""
  return list(spec) + [None] * (ndim - len(spec))


@pytest.fixture(scope="module")
def child_result(tmp_path_factory):
  sys.path.insert(0, os.path.join(ROOT, "tests"))
  from helpers.tiny import tiny_config
  from ssvp_jax.data import splits

  tmp = tmp_path_factory.mktemp("sharding")
  c = tiny_config()
  splits.prepare_demo_data(c.train_data, str(tmp / "data" / "source"))
  splits.prepare_demo_data(c.eval_data.target, str(tmp / "data" / "target"))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  out = tmp / "result.json"
  proc = subprocess.run([sys.executable, __file__, str(out), str(tmp / "data"), str(tmp / "work")], env=env,
                        cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-6000:]
  with open(out) as f:
    return json.load(f)


def test_sharded_training_matches_one_device(child_result):
  one = child_result["one"]
  assert one["devices"] == 1 and len(one["losses"]) == 2  # 16 images / 8 = 2 steps
  assert one["losses"][1] != one["losses"][0]  # the steps did train
  for name in ("dp", "fsdp_tp"):
    run = child_result[name]
    assert run["devices"] == 8, name
    np.testing.assert_allclose(run["losses"], one["losses"], rtol=2e-5, atol=1e-6, err_msg=name)
  np.testing.assert_allclose(child_result["fsdp_tp"]["s_final"], one["s_final"], rtol=1e-4, atol=1e-5)


def test_parameter_shardings_follow_the_rules(child_result):
  specs = child_result["fsdp_tp"]["specs"]
  for k in ("backbones.structural.layers.0.mlp.up.kernel", "backbones.semantic.vision.blocks.0.fc1.kernel",
            "backbones.semantic.vision.blocks.0.attn.q.kernel", "hsvs.local_blocks.0.mlp.fc1.kernel", "hsvs.local_blocks.0.q_c.kernel"):
    assert specs[k] == ["data", "model"], (k, specs[k])
  # [20, 5]: "mlp" -> model, but 2 does not divide 5, so that dimension stays replicated.
  assert specs["vtam.scale_gate.fc1.kernel"] == ["data", None]
  assert specs["vcpg.to_mu.kernel"] == ["data", None]  # [20, 6]: "latent" maps to no mesh axis
  assert specs["prompts.state"] == [None, None, None]  # declared replicated (sharding.REPLICATED)
  # After the steps the arrays still sit where their metadata says.
  assert child_result["fsdp_tp"]["rules_specs"] == specs
  for k, v in child_result["dp"]["specs"].items():  # data-parallel: every parameter replicated
    assert v == [None] * len(v), (k, v)


def test_switches_and_batch_sharding(child_result):
  sw = child_result["switch"]
  assert sw["backbones.structural.layers.0.mlp.up.kernel"] == [None, None]                  # shard_backbones=False
  assert sw["hsvs.local_blocks.0.mlp.fc1.kernel"] == ["data", "model"]     # shard_heads=True
  assert child_result["batch"] == {"spec": ["data", None], "shard_rows": [1]}
  assert "multiple of 8" in child_result["bad_batch"]


def _ndims(module) -> dict[str, int]:
  """{dotted path: ndim} of every array variable of `module` (real or from nnx.eval_shape)."""
  from flax import nnx
  return {".".join(map(str, p)): len(v.get_value().shape) for p, v in nnx.to_flat_state(nnx.state(module))
          if hasattr(v.get_value(), "shape")}


# The attribute holding each backbone today and after the backbone-interface refactor (issue 13):
# the rules match module-local path ends, so both spell the same parameter.
_PREFIXES = {"clip.": ("backbones.semantic.",), "dino.": ("backbones.structural.",),
             "": ("dino.", "backbones.structural.")}  # "": a DINOv2 built on its own


def test_every_parameter_of_two_or_more_dimensions_has_a_rule():
  """Each >= 2-D parameter of the tiny SSVP (CLIP, DINOv3, HSVS, VCPG, VTAM, PromptLearner), of the
  heads' other variants, of gated DINOv3 and of DINOv2 (its presets, gated too) gets logical axes."""
  import dataclasses
  from flax import nnx

  sys.path.insert(0, os.path.join(ROOT, "tests"))
  from helpers.tiny import tiny_config
  from ssvp_jax import sharding
  from ssvp_jax.build import build_model
  from ssvp_jax.models import dinov2, dinov3
  from ssvp_jax.models.hsvs import HSVS
  from ssvp_jax.models.vtam import VTAM

  rngs = lambda: nnx.Rngs(0)
  dino2 = dinov2.PRESETS["tiny"]()
  modules = {
      "ssvp": build_model(tiny_config())[0],
      "hsvs_concat_vv": nnx.eval_shape(lambda: HSVS(2, clip_dim=20, dino_dim=32, clip_in_dim=None, fusion="concat",
                                                    share_scales=True, rngs=rngs())),
      "vtam_learned_tau": nnx.eval_shape(lambda: VTAM(20, 2, learn_tau=True, rngs=rngs())),
      "dinov3_gated": nnx.eval_shape(lambda: dinov3.DINOv3(dinov3.DINOv3Config(
          hidden_size=32, num_layers=1, num_heads=2, intermediate_size=44, patch_size=4, use_gated_mlp=True,
          hidden_act="silu"), rngs=rngs())),
      "dinov2_tiny": dinov2.DINOv2(dino2, rngs=rngs()),
      "dinov2_demo": nnx.eval_shape(lambda: dinov2.DINOv2(dinov2.PRESETS["demo"](), rngs=rngs())),
      "dinov2_gated": nnx.eval_shape(lambda: dinov2.DINOv2(dataclasses.replace(
          dino2, use_gated_mlp=True, hidden_act="silu"), rngs=rngs())),
  }
  checked = 0
  for name, module in modules.items():
    for path, ndim in _ndims(module).items():
      axes = sharding.logical_axes(path, ndim)
      assert axes is not None and len(axes) == ndim, (name, path, ndim, axes)
      checked += ndim >= 2
      for old, new in _PREFIXES.items():
        if path.startswith(old):
          for prefix in new:
            assert sharding.logical_axes(prefix + path[len(old):], ndim) == axes, (name, path, prefix)
  assert checked > 100
  # The rules reach the heads' variants and DINOv2, not only their replicated declarations.
  assert sharding.logical_axes("dino.layers.0.mlp.gate.kernel", 2) == ("embed", "mlp")
  assert sharding.logical_axes("hsvs.local_blocks.0.mlp.fc1.kernel", 2) == ("embed", "mlp")
  assert sharding.logical_axes("backbones.structural.pos_embed", 2) == (None, "embed")


def test_a_parameter_without_a_rule_is_an_error_naming_it():
  """Sharding on: a 2+-D parameter no rule names raises (every such path, before anything moves);
  sharding off, or a 1-D parameter: replicated as before."""
  import jax.numpy as jnp
  from flax import nnx
  from ssvp_jax import sharding

  class Head(nnx.Module):
    def __init__(self):
      self.mystery = nnx.Param(jnp.zeros((4, 6)))
      self.riddle = nnx.Param(jnp.zeros((2, 3, 5)))
      self.offset = nnx.Param(jnp.zeros((6,)))                  # 1-D: no rule needed
      self.fc1 = nnx.Linear(4, 6, rngs=nnx.Rngs(0))             # covered by the MLP rule

  class Model(nnx.Module):
    def __init__(self):
      self.extra = Head()

  mesh = sharding.make_mesh({"data": 1, "model": 1})
  model = Model()
  with pytest.raises(ValueError, match=r"2 parameter\(s\).*extra\.mystery \(4, 6\).*extra\.riddle \(2, 3, 5\)"):
    sharding.shard_model(model, mesh, {"shard_heads": True})
  assert not model.extra.fc1.kernel.has_metadata("mesh")  # nothing placed before the error
  with pytest.raises(ValueError, match=r"extra\.mystery"):
    sharding.param_spec("extra.mystery", (4, 6), mesh)
  with pytest.raises(ValueError, match=r"names 2 dimensions; parameter x\.fc1\.kernel has 3"):
    sharding.logical_axes("x.fc1.kernel", 3)
  sharding.shard_model(model, mesh, {"shard_heads": False})  # replicated, as the switch says
  assert sharding.specs(model)["extra.mystery"] == sharding.P()


def test_bfloat16_compute_keeps_float32_parameters():
  """config.dtype="bfloat16": backbones and heads compute in bf16, parameters and the loss stay float32."""
  import jax
  import jax.numpy as jnp
  import ml_collections
  from flax import nnx

  sys.path.insert(0, os.path.join(ROOT, "tests"))
  from helpers.tiny import tiny_config
  from ssvp_jax import functional, optim, trainer
  from ssvp_jax.build import build_model
  from ssvp_jax.models.prompts import templates_for
  from ssvp_jax.models.ssvp import SSVP, TRAINABLE

  c = tiny_config()
  c.dtype = "bfloat16"
  model, tok = build_model(c)
  assert {v.dtype for v in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(jnp.float32)}
  rng = np.random.default_rng(0)
  b = 4
  batch = {"semantic": rng.normal(size=(b, 28, 28, 3)).astype(np.float32),
           "structural": rng.normal(size=(b, 16, 16, 3)).astype(np.float32),
           "mask": (rng.random((b, 28, 28)) > 0.8).astype(np.float32), "label": np.array([0, 1, 0, 1], np.int32),
           "class_index": np.zeros(b, np.int32)}
  feats = functional.Bound(SSVP.features, model)(batch["semantic"], batch["structural"])
  assert feats.semantic_local[0].dtype == jnp.bfloat16 and feats.structural_global.dtype == jnp.bfloat16
  templates = templates_for(model, tok, ["brick"], c)  # class_words "readable"
  tmpl = (jnp.asarray(templates.ids), jnp.asarray(templates.eot))
  # D21: VTAM runs in float32 under bf16 (bf16 scores would be quantised to ~0.004 and tie in the AUROC).
  out = model.heads(feats, model.prompt_table(tmpl)[batch["class_index"]], deterministic=True)
  assert all(x.dtype == jnp.float32 for x in (out.s_final, out.s_global, out.p_map, *out.scale_logits))
  opt = optim.make_optimizer(model, c.optim, 10, TRAINABLE)
  step = trainer.TrainStep(model, opt)
  terms = step(batch, tmpl, jax.random.key(0), ml_collections.FrozenConfigDict(c.loss))
  step.sync()
  assert terms.total.dtype == jnp.float32 and np.isfinite(float(terms.total))
  assert {v.dtype for v in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(jnp.float32)}
  with pytest.raises(ValueError, match="config.dtype='float16'"):
    c.dtype = "float16"
    build_model(c)


if __name__ == "__main__":
  _child(*sys.argv[1:4])
