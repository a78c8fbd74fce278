"""Decoding every image format, EXIF orientation, resizing, normalisation and grain batching."""

import numpy as np
import pytest
from PIL import Image

from ssvp_jax.data import pipeline
from ssvp_jax.data.records import Record
from ssvp_jax.models.backbone import IMAGENET_MEAN, IMAGENET_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from helpers.tiny import load_config

RGB = (200, 100, 50)


def _save(im, path, **kw):
  im.save(path, **kw)
  return str(path)


@pytest.mark.parametrize("kind", ["gray_png", "rgba_png", "palette_png", "png16", "jpeg", "bmp", "tiff",
                                  "tiff16", "bilevel"])
def test_every_format_decodes_to_rgb_float(tmp_path, kind):
  rgb = Image.new("RGB", (7, 5), RGB)
  expected = np.array(RGB) / 255.0
  if kind == "gray_png":
    path = _save(Image.new("L", (7, 5), 64), tmp_path / "g.png")
    expected = np.full(3, 64 / 255)
  elif kind == "rgba_png":  # alpha 0 everywhere: dropped, not composited (black would be 0)
    path = _save(Image.new("RGBA", (7, 5), RGB + (0,)), tmp_path / "a.png")
  elif kind == "palette_png":
    path = _save(rgb.quantize(), tmp_path / "p.png")  # an exact palette (convert("P") snaps to a web palette)
  elif kind == "png16":
    path = _save(Image.fromarray(np.full((5, 7), 32768, np.uint16)), tmp_path / "s.png")
    expected = np.full(3, 32768 / 65535)
  elif kind == "jpeg":
    path = _save(rgb, tmp_path / "j.jpg", quality=100)
  elif kind == "bmp":
    path = _save(rgb, tmp_path / "b.bmp")
  elif kind == "tiff":
    path = _save(rgb, tmp_path / "t.tif")
  elif kind == "tiff16":
    path = _save(Image.fromarray(np.full((5, 7), 65535, np.uint16)), tmp_path / "t16.tif")
    expected = np.ones(3)
  else:
    path = _save(Image.new("1", (7, 5), 1), tmp_path / "one.png")
    expected = np.ones(3)
  a = pipeline.load_image(path)
  assert a.shape == (5, 7, 3) and a.dtype == np.float32
  assert a.min() >= 0 and a.max() <= 1
  np.testing.assert_allclose(a, np.broadcast_to(expected, a.shape), atol=2 / 255)


def test_exif_orientation_only_on_request_d22(tmp_path):
  stored = np.zeros((10, 20, 3), np.uint8)
  stored[:, :10] = (255, 0, 0)  # left half red, right half blue, as stored
  stored[:, 10:] = (0, 0, 255)
  exif = Image.Exif()
  exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
  path = _save(Image.fromarray(stored), tmp_path / "r.jpg", exif=exif, quality=95)
  raw = pipeline.load_image(path)  # D22: dataset images as stored, the tag ignored
  assert raw.shape == (10, 20, 3) and raw[:, :8, 0].mean() > 0.9 and raw[:, 12:, 2].mean() > 0.9
  a = pipeline.load_image(path, upright=True)  # a user's photo (predict, calibrate)
  assert a.shape == (20, 10, 3)  # portrait once upright
  assert a[:8, :, 0].mean() > 0.9 and a[:8, :, 2].mean() < 0.1  # the stored left half is now on top
  assert a[12:, :, 2].mean() > 0.9


def test_mask_values_and_resize_threshold(tmp_path):
  m = np.zeros((10, 10), np.uint8)
  m[0, 0], m[0, 1] = 1, 2  # VisA-style small values
  m[5, 5] = 255
  assert pipeline.load_mask(_save(Image.fromarray(m), tmp_path / "m.png")).sum() == 3
  j = np.zeros((16, 16), np.uint8)
  j[4:12, 4:12] = 255
  jm = pipeline.load_mask(_save(Image.fromarray(j), tmp_path / "m.jpg", quality=60))
  assert 56 <= jm.sum() <= 72  # JPEG ringing (values 1..30) is not counted as anomalous
  half = np.zeros((10, 10), bool)
  half[:, :5] = True
  # Output columns are centred at input x = 1.25, 3.75, 6.25, 8.75: bilinear weight > 0.5 on the left two.
  np.testing.assert_array_equal(pipeline.resize_mask(half, 4), np.tile([True, True, False, False], (4, 1)))
  dot = np.zeros((10, 10), bool)
  dot[5, 5] = True
  assert not pipeline.resize_mask(dot, 4).any()  # one pixel of 100 falls below 0.5 after bilinear
  assert pipeline.resize_mask(dot, 10).sum() == 1


def test_resize_and_normalise():
  flat = np.full((9, 13, 3), 0.25, np.float32)
  out = pipeline.resize_image(flat, 7)
  assert out.shape == (7, 7, 3) and out.dtype == np.float32
  np.testing.assert_allclose(out, 0.25, atol=1e-6)
  step = np.zeros((16, 16, 3), np.float32)
  step[:, 8:] = 1.0
  up = pipeline.resize_image(step, 40)
  assert up.min() >= 0 and up.max() <= 1  # bicubic overshoot is clipped
  mean = np.broadcast_to(np.array(OPENAI_CLIP_MEAN, np.float32), (2, 2, 3))
  np.testing.assert_allclose(pipeline.normalize(mean, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD), 0,
                             atol=1e-6)
  ones = pipeline.normalize(np.ones((1, 1, 3), np.float32), IMAGENET_MEAN, IMAGENET_STD)
  np.testing.assert_allclose(ones[0, 0], (1 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD),
                             rtol=1e-6)


def test_views_follow_the_configured_backbones():
  c = load_config("mvtec")
  sem, struct = pipeline.views(c)
  assert (sem.name, sem.size, sem.mean, sem.std) == ("semantic", 518, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
  assert (struct.name, struct.size, struct.mean, struct.std) == ("structural", 592, IMAGENET_MEAN, IMAGENET_STD)
  c.backbones.structural.update(name="dinov2", image_size=518)
  v = pipeline.views(c)[1]
  assert (v.size, v.mean, v.std) == (518, IMAGENET_MEAN, IMAGENET_STD)
  c.backbones.structural.name = "clip"
  with pytest.raises(ValueError, match="config.backbones.structural.name='clip' is not a structural backbone"):
    pipeline.views(c)


VIEWS = (pipeline.View("semantic", 14, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
         pipeline.View("structural", 16, IMAGENET_MEAN, IMAGENET_STD))


@pytest.fixture
def records(tmp_path):
  out = []
  for i in range(7):
    img = _save(Image.new("RGB", (12, 9), (i * 30, 0, 0)), tmp_path / f"{i}.png")
    mask = None
    if i % 2:
      m = np.zeros((9, 12), np.uint8)
      m[2:7, 3:9] = 255
      mask = _save(Image.fromarray(m), tmp_path / f"{i}_mask.png")
    out.append(Record(img, mask, "c", "bad" if i % 2 else "good", i % 2, "test"))
  out.append(Record(out[0].image_path, None, "c", "bad", 1, "test"))  # anomalous, no mask known
  return out


def test_batch_shapes_dtypes_and_content(records):
  batches = list(pipeline.iterate_batches(records, VIEWS, batch_size=4, mask_size=12, num_threads=2))
  b = batches[0]
  assert {k: (v.shape, v.dtype) for k, v in b.items()} == {
      "semantic": ((4, 14, 14, 3), np.float32), "structural": ((4, 16, 16, 3), np.float32),
      "mask": ((4, 12, 12), np.float32), "label": ((4,), np.int32), "index": ((4,), np.int32),
      "valid": ((4,), np.bool_), "has_mask": ((4,), np.bool_)}
  assert b["index"].tolist() == [0, 1, 2, 3] and b["label"].tolist() == [0, 1, 0, 1]
  assert set(np.unique(b["mask"])) <= {0.0, 1.0}
  assert b["mask"][0].sum() == 0 and b["mask"][1].sum() > 0
  # Red channel of image 3 is 90/255, normalised with each view's own statistics.
  red = 90 / 255
  np.testing.assert_allclose(b["semantic"][3, 0, 0, 0], (red - OPENAI_CLIP_MEAN[0]) / OPENAI_CLIP_STD[0],
                             atol=1e-5)
  np.testing.assert_allclose(b["structural"][3, 0, 0, 0], (red - IMAGENET_MEAN[0]) / IMAGENET_STD[0],
                             atol=1e-5)
  assert batches[1]["has_mask"].tolist() == [True, True, True, False]


def _order(records, **kw):
  kw.setdefault("num_threads", 2)
  return [i for b in pipeline.iterate_batches(records, VIEWS, batch_size=3, **kw) for i in b["index"].tolist()]


def test_shuffle_is_seeded_and_changes_with_the_epoch(records):
  a = _order(records, shuffle=True, seed=1, epoch=0)
  assert a == _order(records, shuffle=True, seed=1, epoch=0)
  assert sorted(a) == list(range(8)) and a != list(range(8))
  assert a != _order(records, shuffle=True, seed=1, epoch=1)
  assert a != _order(records, shuffle=True, seed=2, epoch=0)
  assert a == _order(records, shuffle=True, seed=1, epoch=0, num_threads=0)  # order ignores thread count


def test_last_partial_batch(records):
  recs = records[:7]

  def sizes(**kw):
    return [b["index"].shape[0] for b in pipeline.iterate_batches(recs, VIEWS, batch_size=3, **kw)]

  assert sizes() == [3, 3, 1]  # evaluation without padding: a smaller last batch
  assert sizes(drop_remainder=True) == [3, 3]  # training
  padded = list(pipeline.iterate_batches(recs, VIEWS, batch_size=3, pad_remainder=True))
  assert [b["semantic"].shape[0] for b in padded] == [3, 3, 3]
  assert padded[-1]["index"].tolist() == [6, -1, -1] and padded[-1]["valid"].tolist() == [True, False, False]
  kept = [i for b in padded for i, v in zip(b["index"].tolist(), b["valid"].tolist()) if v]
  assert kept == list(range(7)) and pipeline.num_batches(7, 3) == 3 and pipeline.num_batches(7, 3, True) == 2
  with pytest.raises(ValueError, match="exclude each other"):
    pipeline.make_dataset(recs, VIEWS, batch_size=3, drop_remainder=True, pad_remainder=True)


def test_worker_processes_give_the_same_batches(records):
  threads = list(pipeline.iterate_batches(records, VIEWS, batch_size=3, shuffle=True, seed=5, num_threads=2))
  procs = list(pipeline.iterate_batches(records, VIEWS, batch_size=3, shuffle=True, seed=5, num_threads=1,
                                        num_processes=2))
  assert len(threads) == len(procs) == 3
  for a, b in zip(threads, procs):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
