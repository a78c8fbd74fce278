"""The backbone interface and registry, DINOv2 as the structural backbone, and older configs' keys."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ssvp_jax import config_upgrade, evaluate, resume, trainer
from ssvp_jax.build import build_model
from ssvp_jax.data import pipeline
from ssvp_jax.errors import UserError
from ssvp_jax.models import clip, dinov2, dinov3, registry
from ssvp_jax.models.backbone import ROLES, Encoded
from ssvp_jax.models.ssvp import FROZEN, TRAINABLE
from helpers.tiny import load_config, tiny_config

OLD_CONFIG = os.path.join(os.path.dirname(__file__), "fixtures", "old_tiny_config.json")


def test_every_registered_backbone_implements_the_interface():
  for name, entry in registry.REGISTRY.items():
    assert entry.role in ROLES and callable(entry.module.build) and entry.module.PRESETS
    assert len(entry.cls.MEAN) == len(entry.cls.STD) == 3
    c = load_config("tiny", **{f"backbones.{entry.role}.name": name})
    model = registry.build(entry.role, c, jnp.float32)
    size = c.backbones[entry.role].image_size
    out = model.encode(jnp.ones((2, size, size, 3)), (1, 2))
    assert isinstance(out, Encoded) and len(out.local) == 2
    n = (size // model.patch_size) ** 2
    assert all(t.shape == (2, n, model.local_dim) for t in out.local)
    assert out.global_.shape == (2, model.global_dim)
    if entry.role == "semantic":
      assert registry.tokenizer(load_config("tiny")) is not None and model.context_length > 0


def test_registry_errors_name_the_key():
  with pytest.raises(ValueError, match=r"config.backbones.structural.name='dinov9' is not a structural backbone "
                                       r"\(one of dinov3, dinov2\)"):
    build_model(tiny_config(**{"backbones.structural.name": "dinov9"}))
  with pytest.raises(ValueError, match="config.backbones.semantic.name='dinov2' is not a semantic backbone"):
    build_model(tiny_config(**{"backbones.semantic.name": "dinov2"}))
  with pytest.raises(ValueError, match="random_init='huge' is not a dinov2 preset"):
    build_model(tiny_config(**{"backbones.structural.name": "dinov2", "backbones.structural.random_init": "huge"}))
  with pytest.raises(ValueError, match="convert/dinov2.py"):
    build_model(tiny_config(**{"backbones.structural.name": "dinov2", "backbones.structural.random_init": ""}))


def test_mismatched_grids_name_the_size_that_fits():
  c = load_config("mvtec", **{"backbones.structural.name": "dinov2"})  # 592 px is DINOv3's, not patch 14's
  sem = clip.empty(clip.vit_l14_336())
  struct = nnx.eval_shape(lambda: dinov2.DINOv2(dinov2.DINOv2Config.vitl14(), rngs=nnx.Rngs(0)))
  from ssvp_jax.build import check_grids
  with pytest.raises(ValueError, match="structural.image_size=518"):
    check_grids(c, sem, struct)
  c.backbones.structural.image_size = 518
  check_grids(c, sem, struct)


def test_dinov2_as_the_structural_backbone_trains(tmp_path):
  c = tiny_config(**{"backbones.structural.name": "dinov2"})
  model, _ = build_model(c)
  assert isinstance(model.structural, dinov2.DINOv2) and isinstance(model.semantic, clip.CLIP)
  frozen = {p[:2] for p, _ in nnx.to_flat_state(nnx.state(model, FROZEN))}
  assert frozen == {("backbones", "semantic"), ("backbones", "structural")}
  assert not any(p[0] == "backbones" for p, _ in nnx.to_flat_state(nnx.state(model, TRAINABLE)))
  _, _, summary = trainer.train(c, str(tmp_path), stop_after_step=2)
  assert np.isfinite(summary["loss/total"]) and summary["step"] == 2
  stored = json.load(open(os.path.join(tmp_path, "config.json")))
  assert stored["backbones"]["structural"]["name"] == "dinov2"


def test_old_config_keys_upgrade_to_todays():
  old = json.load(open(OLD_CONFIG))  # config.json of a tiny run trained before issue 13
  assert "model" in old and "clip" in old
  up = config_upgrade.upgrade(old)
  assert resume.differences(up, resume.as_plain(load_config("tiny"))) == {}
  assert config_upgrade.upgrade(up) == up  # today's form passes through
  old["model"]["s_local"], old["model"]["s_global"] = "max", "prob"
  del old["model"]["clip_token_norm"]  # written before D3's revision: the behaviour of then
  up = config_upgrade.upgrade(old)
  assert (up["vtam"]["top_k"], up["vtam"]["s_global"], up["hsvs"]["normalize_clip"]) == (0, "softmax", False)
  old["model"]["atf_bias"] = True
  with pytest.raises(UserError, match="model.atf_bias is not a key"):
    config_upgrade.upgrade(old, "W/config.json")


def test_old_work_directory_config_loads(tmp_path):
  (tmp_path / "config.json").write_text(open(OLD_CONFIG).read())
  c = evaluate.load_config(str(tmp_path))
  assert c.backbones.semantic.name == "clip" and c.backbones.structural.name == "dinov3"
  assert c.hsvs.num_heads == 2 and c.vtam.top_k == 10 and c.class_words == "readable"
  assert [v.name for v in pipeline.views(c)] == ["semantic", "structural"]


def test_dinov3_and_dinov2_presets_share_grids():
  for name in ("tiny", "small"):
    c3, c2 = dinov3.PRESETS[name](), dinov2.PRESETS[name]()
    assert c3.patch_size == c2.patch_size and c2.image_size % c2.patch_size == 0
