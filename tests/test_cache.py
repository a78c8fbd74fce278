"""Frozen-feature cache: same losses as without it, no decoding after epoch 1, keys that invalidate,
atomic entries under concurrent writers, 16-bit storage within its rounding error."""

import json
import multiprocessing
import os

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from helpers.tiny import flat, tiny_config, with_data
from ssvp_jax import cache, trainer
from ssvp_jax.data import pipeline
from ssvp_jax.build import build_model
from ssvp_jax.data.records import Record
from ssvp_jax.models.ssvp import TRAINABLE


def logged_losses(workdir) -> dict[int, float]:
  """step -> total loss; after a resume the later line of a step wins."""
  out = {}
  with open(os.path.join(workdir, "log.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      out[row["step"]] = row["loss/total"]
  return out


def test_same_losses_with_cache_and_no_decoding_after_epoch_1(tmp_path, data_dir, monkeypatch):
  plain = with_data(tiny_config(), data_dir)  # 2 epochs x 4 steps of 4 images
  ref_model, _, _ = trainer.train(plain, str(tmp_path / "plain"))

  decoded = []
  real_load_example = cache.load_example

  def counting_load_example(record, *args, **kwargs):
    decoded.append(record.image_path)
    return real_load_example(record, *args, **kwargs)

  monkeypatch.setattr(cache, "load_example", counting_load_example)
  c = with_data(tiny_config(), data_dir)
  c.cache.enabled = True
  c.cache.dir = str(tmp_path / "features")
  # Interrupted after step 3 (checkpoint at step 2), then resumed: the resumed epoch skips two
  # batches, reads the third from the entries the first part wrote, computes the fourth.
  trainer.train(c, str(tmp_path / "cached"), stop_after_step=3)
  decoded.clear()
  model, _, summary = trainer.train(c, str(tmp_path / "cached"))
  assert summary["step"] == 8
  assert len(decoded) == 4, decoded  # only the last batch of epoch 1; epoch 2 decodes nothing

  assert logged_losses(tmp_path / "cached") == logged_losses(tmp_path / "plain")  # exact, float32 storage
  a, b = flat(ref_model, TRAINABLE), flat(model, TRAINABLE)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  entries = [f for _, _, fs in os.walk(tmp_path / "features") for f in fs if f.endswith(".safetensors")]
  assert len(entries) == 16  # one per training image


def _record(tmp_path, name="a.png", seed=0) -> Record:
  rng = np.random.default_rng(seed)
  path = str(tmp_path / name)
  Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(path)
  return Record(path, None, "brick", "good", 0, "test")


def _arrays(num_taps=2, seed=0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  out = {f"semantic_local.{l}": rng.normal(size=(16, 36)).astype(np.float32) for l in range(num_taps)}
  out.update({f"structural_local.{l}": rng.normal(size=(16, 32)).astype(np.float32) for l in range(num_taps)})
  out.update(semantic_global=rng.normal(size=(20,)).astype(np.float32), structural_global=rng.normal(size=(32,)).astype(np.float32))
  return out


def _cache_for(model, config, root, dtype="float32"):
  return cache.FeatureCache(root, cache.key_description(model, config, pipeline.views(config), 28, dtype),
                            len(model.semantic_layers))


def test_changed_image_weights_or_settings_change_the_key(tmp_path):
  c = tiny_config()
  model, _ = build_model(c)
  fc = _cache_for(model, c, str(tmp_path / "fc"))
  rec = _record(tmp_path)
  arrays = _arrays()
  assert fc.load(rec) is None
  fc.store(rec, arrays, np.zeros((28, 28)))
  got, mask = fc.load(rec)
  for k, v in arrays.items():
    np.testing.assert_array_equal(got[k], v, err_msg=k)
  assert mask.shape == (28, 28) and not mask.any()

  # A changed image file (one pixel) is a different entry, seen by the same cache object.
  before = fc.entry_path(rec)
  im = np.asarray(Image.open(rec.image_path)).copy()
  im[0, 0] = 255 - im[0, 0]
  Image.fromarray(im).save(rec.image_path)
  os.utime(rec.image_path, ns=(1, 1))  # a different mtime, even on coarse-clock file systems
  assert fc.entry_path(rec) != before and fc.load(rec) is None

  # Changed backbone weights (one element of DINOv3) give a new fingerprint folder.
  fc.store(rec, arrays, np.zeros((28, 28)))
  var = next(v for _, v in nnx.to_flat_state(nnx.state(model.structural, nnx.Param)))
  var[...] = var[...].at[(0,) * var[...].ndim].add(1e-3)
  fc2 = _cache_for(model, c, str(tmp_path / "fc"))
  assert fc2.fingerprint != fc.fingerprint and fc2.load(rec) is None
  assert fc.load(rec) is not None  # the old entry is untouched

  # Resolution, taps, local-token mode and storage dtype are part of the key as well.
  base = cache.fingerprint(cache.key_description(model, c, pipeline.views(c), 28, "float32"))
  for section, name, value in (("semantic", "image_size", 56), ("structural", "layers", (2, 2)),
                               ("semantic", "local_tokens", "value_value")):
    other = tiny_config(**{f"backbones.{section}.{name}": value})
    assert cache.fingerprint(cache.key_description(model, other, pipeline.views(other), 28, "float32")) != base
  assert cache.fingerprint(cache.key_description(model, c, pipeline.views(c), 28, "float16")) != base
  if "dtype" in c:  # bfloat16 compute of the backbones (config.dtype) changes the features too
    c.dtype = "bfloat16"
    assert cache.fingerprint(cache.key_description(model, c, pipeline.views(c), 28, "float32")) != base
    c.dtype = "float32"
  # ... but not the bundle folder's name: weights are hashed by value.
  moved = tiny_config(**{"backbones.semantic.bundle": ""})
  moved.backbones.structural.bundle = "/elsewhere"
  assert cache.fingerprint(cache.key_description(model, moved, pipeline.views(moved), 28, "float32")) == base


@pytest.mark.parametrize("dtype,rel", [("float16", 2.0 ** -11), ("bfloat16", 2.0 ** -8)])
def test_16bit_storage_rounds_once(tmp_path, dtype, rel):
  desc = {"dtype": dtype, "mask_size": 4}
  fc = cache.FeatureCache(str(tmp_path), desc, num_taps=2)
  rec = _record(tmp_path)
  arrays = _arrays()
  fc.store(rec, arrays, np.eye(4))
  got, mask = fc.load(rec)
  np.testing.assert_array_equal(mask, np.eye(4, dtype=np.float32))
  for k, v in arrays.items():
    assert got[k].dtype == np.float32
    np.testing.assert_allclose(got[k], v, rtol=rel, atol=1e-6, err_msg=k)
    assert not np.array_equal(got[k], v)  # really stored in 16 bits
  # What training uses in epoch 1 (`round_trip`) is bit-identical to what later epochs read.
  feats = cache.Features(tuple(arrays[f"semantic_local.{l}"][None] for l in range(2)), arrays["semantic_global"][None],
                         tuple(arrays[f"structural_local.{l}"][None] for l in range(2)), arrays["structural_global"][None])
  rt = cache.round_trip(feats, dtype)
  np.testing.assert_array_equal(rt.semantic_local[1][0], got["semantic_local.1"])
  np.testing.assert_array_equal(rt.structural_global[0], got["structural_global"])


def test_bad_entries_and_settings_are_clear_errors(tmp_path, caplog):
  fc = cache.FeatureCache(str(tmp_path), {"dtype": "float32", "mask_size": 4}, num_taps=2)
  rec = _record(tmp_path)
  path = fc.store(rec, _arrays(), np.zeros((4, 4)))
  with open(path, "r+b") as f:
    f.truncate(40)
  assert fc.load(rec) is None  # damaged: named in the log, recomputed by the caller
  assert "unreadable feature-cache entry" in caplog.text and path in caplog.text
  fc3 = cache.FeatureCache(str(tmp_path / "three"), {"dtype": "float32", "mask_size": 4}, num_taps=3)
  fc3.store(rec, _arrays(num_taps=2), np.zeros((4, 4)))
  assert fc3.load(rec) is None and "expected" in caplog.text
  fp16 = cache.FeatureCache(str(tmp_path / "fp16"), {"dtype": "float16", "mask_size": 4}, num_taps=2)
  huge = {**_arrays(), "semantic_global": np.full((20,), 1e6, np.float32)}  # past float16's 65504
  with pytest.raises(cache.CacheError, match="overflow float16.*bfloat16"):
    fp16.store(rec, huge, np.zeros((4, 4)))
  one = cache.Features((huge["semantic_local.0"][None],) * 2, huge["semantic_global"][None],
                       (huge["structural_local.0"][None],) * 2, huge["structural_global"][None])
  with pytest.raises(cache.CacheError, match="overflow float16"):
    cache.round_trip(one, "float16")
  with pytest.raises(ValueError, match="config.cache.dtype='int8'"):
    cache.FeatureCache(str(tmp_path), {"dtype": "int8", "mask_size": 4}, num_taps=2)
  with pytest.raises(cache.CacheError, match="missing.png"):
    fc.entry_path(Record(str(tmp_path / "missing.png"), None, "brick", "good", 0, "test"))


def _writer(root: str, image_path: str, seed: int, repeats: int) -> None:
  fc = cache.FeatureCache(root, {"dtype": "float32", "mask_size": 4}, num_taps=2)
  rec = Record(image_path, None, "brick", "good", 0, "test")
  big = _arrays(seed=0)
  big["semantic_local.0"] = np.full((4096, 64), float(seed), np.float32)  # 1 MB: writes take a while
  for _ in range(repeats):
    fc.store(rec, big, np.zeros((4, 4)))


def test_two_processes_writing_one_entry_never_tear_it(tmp_path):
  rec = _record(tmp_path)
  root = str(tmp_path / "fc")
  fc = cache.FeatureCache(root, {"dtype": "float32", "mask_size": 4}, num_taps=2)
  ctx = multiprocessing.get_context("spawn")
  procs = [ctx.Process(target=_writer, args=(root, rec.image_path, s, 40)) for s in (1, 2)]
  for p in procs:
    p.start()
  seen = set()
  while any(p.is_alive() for p in procs):
    got = fc.load(rec)  # raises CacheError on a torn file
    if got is not None:
      values = np.unique(got[0]["semantic_local.0"])
      assert len(values) == 1, values  # one writer's whole array, never a mix
      seen.add(float(values[0]))
  for p in procs:
    p.join()
    assert p.exitcode == 0
  final = np.unique(fc.load(rec)[0]["semantic_local.0"])
  assert len(final) == 1 and final[0] in (1.0, 2.0)
  leftovers = [f for _, _, fs in os.walk(root) for f in fs if ".tmp-" in f]
  assert not leftovers, leftovers
