"""predict: odd inputs through the CLI, equality with the evaluation path, file naming, decisions."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from helpers.tiny import copy_workdir, magenta_pixels, run_python, target_records
from ssvp_jax import evaluate, inference, predict


def _noise(h, w, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _odd_files(folder) -> tuple[dict[str, tuple[int, int]], list[str]]:
  """Writes one file per odd case; returns ({name: upright (h, w)} of readable files, unreadable names)."""
  os.makedirs(folder)
  p = lambda n: os.path.join(folder, n)  # noqa: E731
  Image.fromarray(_noise(30, 40)[:, :, 0]).save(p("gray.png"))
  rgba = np.dstack([_noise(30, 30, 1), np.full((30, 30, 1), 0, np.uint8)])  # fully transparent: alpha dropped
  Image.fromarray(rgba, "RGBA").save(p("rgba.png"))
  Image.fromarray((np.random.default_rng(2).random((20, 20)) * 65535).astype(np.uint16)).save(p("png16.png"))
  Image.fromarray((np.random.default_rng(3).random((20, 24)) * 65535).astype(np.uint16)).save(p("tiff16.tif"))
  Image.fromarray(_noise(40, 50, 4)).save(p("photo.jpg"), quality=90)
  exif = Image.Exif()
  exif[0x0112] = 6  # stored landscape 40 x 24, displayed portrait 24 x 40
  Image.fromarray(_noise(24, 40, 5)).save(p("rotated.jpg"), exif=exif, quality=90)
  Image.fromarray(_noise(33, 35, 6)).save(p("pic.bmp"))
  Image.fromarray(_noise(35, 33, 7)).save(p("pic.tif"))
  Image.fromarray(_noise(1, 1, 8)).save(p("one_pixel.png"))
  Image.fromarray(_noise(300, 1200, 9)).save(p("wide.png"))  # overlay capped at 1024 px
  Image.fromarray(_noise(64, 64, 10)).save(p("truncated.png"))
  with open(p("truncated.png"), "rb") as f:
    data = f.read()
  with open(p("truncated.png"), "wb") as f:
    f.write(data[:len(data) // 2])
  with open(p("notes.txt"), "w") as f:
    f.write("not an image\n")
  with open(p("fake.jpg"), "w") as f:
    f.write("text with an image extension\n")
  ok = {"gray.png": (30, 40), "rgba.png": (30, 30), "png16.png": (20, 20), "tiff16.tif": (20, 24),
        "photo.jpg": (40, 50), "rotated.jpg": (40, 24), "pic.bmp": (33, 35), "pic.tif": (35, 33),
        "one_pixel.png": (1, 1), "wide.png": (300, 1200)}
  return ok, ["truncated.png", "notes.txt", "fake.jpg"]


def test_cli_odd_inputs_calibrated_decisions_and_exit_status(trained_workdir, engine, tmp_path,  # noqa: F811
                                                              tmp_path_factory):
  ok, bad = _odd_files(str(tmp_path / "in"))
  # Thresholds in the middle of these files' own scores, so both decisions and both contour cases occur.
  scored = list(inference.score_files(engine, [str(tmp_path / "in" / n) for n in ok], batch_size=4))
  image_thr = float(np.median([r.score for r in scored]))
  pixel_thr = float(np.median([r.map.max() for r in scored]))
  workdir = copy_workdir(trained_workdir, str(tmp_path / "wd"))
  with open(os.path.join(workdir, "calibration.json"), "w") as f:
    json.dump({"image_threshold": image_thr, "pixel_threshold": pixel_thr, "category": "object",
               "checkpoint_step": engine.step}, f)
  out = tmp_path / "out"
  res = run_python(["-m", "ssvp_jax.predict", f"--workdir={workdir}", f"--images={tmp_path / 'in'}/*",
                    f"--out={out}", "--batch_size=4"], tmp_path_factory)
  assert res.returncode == 1, res.stderr[-3000:]
  assert f"{len(ok)} of {len(ok) + len(bad)} images scored" in res.stdout
  rows = {os.path.basename(r["path"]): r for r in predict.read_predictions(str(out / "predictions.csv"))}
  assert set(rows) == set(ok) | set(bad)
  for name in bad:
    assert rows[name]["score"] == "" and os.path.join(str(tmp_path / "in"), name) in rows[name]["error"]
    assert f"FAILED {rows[name]['error']}" in res.stdout
  size = engine.map_size
  decisions = set()
  for name, (h, w) in ok.items():
    r = rows[name]
    assert r["error"] == ""
    score = float(r["score"])
    assert np.isfinite(score)
    amap = np.load(r["map"])
    assert amap.shape == (size, size) and amap.dtype == np.float32
    assert float(r["max_value"]) == pytest.approx(float(amap.max()))
    assert 0 <= int(r["max_x"]) < w and 0 <= int(r["max_y"]) < h
    overlay = np.asarray(Image.open(r["overlay"]))
    assert overlay.shape == inference.overlay_shape(h, w, size) + (3,)
    assert r["decision"] == ("defective" if score >= image_thr else "good")
    decisions.add(r["decision"])
    if amap.max() < pixel_thr:  # the resized map never exceeds the raw map's maximum
      assert magenta_pixels(r["overlay"]) == 0, name
  assert decisions == {"good", "defective"}
  assert any(magenta_pixels(rows[n]["overlay"]) for n in ok)
  assert inference.overlay_shape(300, 1200, size) == (256, 1024)
  assert np.asarray(Image.open(rows["rotated.jpg"]["overlay"])).shape[:2] == inference.overlay_shape(40, 24, size)

  res = run_python(["-m", "ssvp_jax.predict", f"--workdir={workdir}", f"--images={tmp_path}/nothing*",
                    f"--out={out}"], tmp_path_factory)
  assert res.returncode == 2 and "no files found" in res.stderr


def test_predictions_equal_the_evaluation_path(trained_workdir, engine, tmp_path):  # noqa: F811
  records = target_records(trained_workdir)
  ref = evaluate.predict_records(engine.model, engine.tokenizer, engine.config, records)  # batches of 4
  assert np.std(ref["s_final"]) > 1e-4  # distinct images, distinct scores: the comparison means something
  for cat in sorted({r.category for r in records}):
    idx = [i for i, r in enumerate(records) if r.category == cat]
    rows = predict.predict(engine.with_category(cat), [records[i].image_path for i in idx],
                           str(tmp_path / cat), batch_size=5)
    for k in ("score", "s_global", "s_local"):
      np.testing.assert_allclose([float(r[k]) for r in rows], ref["s_final" if k == "score" else k][idx],
                                 atol=1e-5, err_msg=f"{cat}: {k}")
    np.testing.assert_allclose(np.stack([np.load(r["map"]) for r in rows]), ref["maps"][idx], atol=1e-5)
    assert all(r["decision"] == "" for r in rows)  # no threshold given: no decision


def test_without_threshold_no_contour_and_with_one_a_contour(engine, tmp_path):  # noqa: F811
  Image.fromarray(_noise(32, 32)).save(tmp_path / "a.png")
  paths = [str(tmp_path / "a.png")]
  low = predict.predict(engine, paths, str(tmp_path / "low"), image_threshold=-1.0, pixel_threshold=-1.0,
                        batch_size=4)[0]
  high = predict.predict(engine, paths, str(tmp_path / "high"), image_threshold=2.0, pixel_threshold=2.0,
                         batch_size=4)[0]
  none = predict.predict(engine, paths, str(tmp_path / "none"), batch_size=4)[0]
  assert (low["decision"], high["decision"], none["decision"]) == ("defective", "good", "")
  assert magenta_pixels(low["overlay"]) > 0  # everything is above: the outline is the image border
  assert magenta_pixels(high["overlay"]) == 0 and magenta_pixels(none["overlay"]) == 0
  assert low["score"] == high["score"] == none["score"]


def test_expand_images_and_output_names(tmp_path):
  (tmp_path / "a" / "sub").mkdir(parents=True)
  (tmp_path / "b").mkdir()
  for rel in ("a/000.png", "a/000.bmp", "a/sub/x.JPG", "a/readme.txt", "b/000.png"):
    (tmp_path / rel).write_bytes(b"")
  found = inference.expand_images([str(tmp_path / "a")])
  assert [os.path.relpath(p, tmp_path) for p in found] == ["a/000.bmp", "a/000.png", "a/sub/x.JPG"]
  globbed = inference.expand_images([str(tmp_path / "a" / "*"), str(tmp_path / "a" / "000.png")])
  assert sorted(os.path.basename(p) for p in globbed) == ["000.bmp", "000.png", "readme.txt"]  # no duplicate
  names = predict.output_names(found + [str(tmp_path / "b" / "000.png")])
  assert sorted(names.values()) == ["a/000_bmp", "a/000_png", "a/sub/x", "b/000"]
  amap = np.zeros((4, 4), np.float32)
  amap[3, 0] = 1.0  # bottom-left cell of a map over an 8 x 4 (h x w) image
  assert inference.max_location(amap, 8, 4) == (0, 7)
