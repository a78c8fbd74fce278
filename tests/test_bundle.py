"""Strict weight assignment and bundle round trip."""

import numpy as np
import pytest
from flax import nnx

from ssvp_jax.models import bundle


class _Tiny(nnx.Module):
  def __init__(self, rngs):
    self.proj = nnx.Linear(3, 5, rngs=rngs)
    self.blocks = nnx.List([nnx.Linear(5, 5, rngs=rngs) for _ in range(2)])


def test_round_trip(tmp_path):
  src = _Tiny(nnx.Rngs(0))
  bundle.save_bundle(str(tmp_path), "clip", {"width": 5}, bundle.flat_params(src))
  cfg, flat = bundle.read_bundle(str(tmp_path), "clip")
  dst = _Tiny(nnx.Rngs(1))
  bundle.assign_params(dst, flat)
  assert cfg == {"width": 5}
  for k, v in bundle.flat_params(src).items():
    np.testing.assert_array_equal(v, bundle.flat_params(dst)[k])


def test_strict_names_every_offender():
  m = _Tiny(nnx.Rngs(0))
  flat = bundle.flat_params(m)
  flat.pop("proj.bias")
  flat["blocks.2.kernel"] = np.zeros((5, 5))
  flat["blocks.0.kernel"] = np.zeros((5, 4))
  with pytest.raises(bundle.WeightLoadError) as e:
    bundle.assign_params(m, flat, source="ckpt.safetensors")
  msg = str(e.value)
  assert "ckpt.safetensors" in msg and "proj.bias" in msg and "blocks.2.kernel" in msg
  assert "blocks.0.kernel: expected (5, 5), got (5, 4)" in msg


def test_bad_bundle_folder(tmp_path):
  with pytest.raises(FileNotFoundError, match="convert/dinov3.py"):
    bundle.read_bundle(str(tmp_path / "nope"), "dinov3")
  bundle.save_bundle(str(tmp_path), "clip", {}, {"a": np.zeros(2)})
  with pytest.raises(ValueError, match="expected 'dinov3'"):
    bundle.read_bundle(str(tmp_path), "dinov3")
