"""export: PIL-exact resizing in the graph, and the artifact's scores after a reload in a jax + numpy process."""

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from helpers.tiny import copy_workdir, run_python, target_records
from ssvp_jax import export, jaxexport_runner, predict
from ssvp_jax.data import pipeline

# Runs in a fresh interpreter: loads the artifact, scores files at two batch sizes, and lists any module
# of the model code (or of flax) that got imported.
RUNNER = """
import json, sys
import numpy as np
from ssvp_jax.jaxexport_runner import ExportedModel, read_image
art, paths, out = sys.argv[1], sys.argv[2].split("|"), sys.argv[3]
model = ExportedModel(art)
x = np.stack([read_image(p, model.input_size) for p in paths])
full, three = model(x), model(x[:3])
np.savez(out, images=x, score3=three["score"], **full)
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("flax", "orbax", "grain", "optax", "torch", "transformers")
             or m.startswith("ssvp_jax.") and m not in ("ssvp_jax.jaxexport_runner", "ssvp_jax.runner_io"))
print(json.dumps({"bad": bad, "platforms": list(model.exported.platforms), "meta": model.meta}))
"""


@pytest.mark.parametrize("in_size,out_size", [(32, 28), (32, 16), (1, 28), (40, 112), (7, 3), (3, 100), (600, 518)])
def test_pil_bicubic_matrix_equals_the_pipeline_resize(in_size, out_size):
  image = np.random.default_rng(in_size).random((in_size, in_size, 3)).astype(np.float32)
  r = export.pil_bicubic_matrix(in_size, out_size)  # [out, in]
  ours = np.clip(np.stack([r @ image[:, :, c].astype(np.float64) @ r.T for c in range(3)], axis=2), 0, 1)
  np.testing.assert_allclose(ours, pipeline.resize_image(image, out_size), atol=2e-6)


def test_artifact_in_a_fresh_process_scores_as_the_python_model(trained_workdir, engine, tmp_path,  # noqa: F811
                                                                tmp_path_factory):
  records = [r for r in target_records(trained_workdir) if r.category == "dots"]
  paths = [r.image_path for r in records]  # 32 x 32 JPEGs: S = 32 makes the exported resize equal predict's
  workdir = copy_workdir(trained_workdir, str(tmp_path / "wd"))
  with open(os.path.join(workdir, "calibration.json"), "w") as f:
    json.dump({"image_threshold": 0.25, "pixel_threshold": 0.5, "category": "dots"}, f)
  art = str(tmp_path / "model.jaxexport")
  res = run_python(["-m", "ssvp_jax.export", f"--workdir={workdir}", f"--out={art}", "--size=32"], tmp_path_factory)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "category 'dots'" in res.stdout  # the calibrated category, with its thresholds

  res = run_python(["-c", RUNNER, art, "|".join(paths), str(tmp_path / "out.npz")], tmp_path_factory)
  assert res.returncode == 0, res.stderr[-3000:]
  info = json.loads(res.stdout.strip().splitlines()[-1])
  assert info["bad"] == []
  assert info["platforms"] == ["cpu", "cuda"]  # CUDA lowers without a GPU
  assert (info["meta"]["image_threshold"], info["meta"]["pixel_threshold"]) == (0.25, 0.5)
  out = np.load(tmp_path / "out.npz")
  assert out["map"].shape == (len(paths), engine.map_size, engine.map_size)
  np.testing.assert_allclose(out["score3"], out["score"][:3], atol=1e-6)  # symbolic batch: 3 or 9 alike

  dots = engine.with_category("dots")
  fn, weights = export.inference_function(dots, 32)
  ref = jax.jit(fn)(weights, out["images"])  # the same function, never serialised
  for k in ("map", "score", "s_global", "s_local"):
    np.testing.assert_allclose(out[k], np.asarray(ref[k]), atol=1e-5, err_msg=k)
  rows = predict.predict(dots, paths, str(tmp_path / "pred"), batch_size=4)  # the predict path, from the files
  np.testing.assert_allclose(out["score"], [float(r["score"]) for r in rows], atol=1e-5)
  np.testing.assert_allclose(out["map"], np.stack([np.load(r["map"]) for r in rows]), atol=1e-5)
  assert np.std(out["score"]) > 1e-4


def test_runner_reads_files_as_the_pipeline_and_rejects_bad_input(engine, tmp_path, capsys):  # noqa: F811
  exif = Image.Exif()
  exif[0x0112] = 6
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)).save(tmp_path / "r.jpg", exif=exif)
  Image.fromarray((rng.random((20, 20)) * 65535).astype(np.uint16)).save(tmp_path / "s16.png")
  Image.fromarray(rng.integers(0, 256, (9, 9, 4), dtype=np.uint8), "RGBA").save(tmp_path / "a.png")
  Image.fromarray(rng.integers(0, 256, (1, 1), dtype=np.uint8)).save(tmp_path / "one.png")
  for name in ("r.jpg", "s16.png", "a.png", "one.png"):
    path = str(tmp_path / name)
    np.testing.assert_allclose(jaxexport_runner.read_image(path, 28),
                               pipeline.resize_image(pipeline.load_image(path, upright=True), 28), atol=1e-6,
                               err_msg=name)  # a user's photo: upright (D22)
  (tmp_path / "junk.png").write_text("no image")
  with pytest.raises(ValueError, match="junk.png: cannot decode"):
    jaxexport_runner.read_image(str(tmp_path / "junk.png"), 28)

  art = str(tmp_path / "m.jaxexport")
  meta = export.export_model(engine, art, platforms=("cpu",))
  assert meta["image_threshold"] is None and meta["input_size"] == engine.map_size
  model = jaxexport_runner.ExportedModel(art)
  with pytest.raises(ValueError, match=r"must be \[b, 28, 28, 3\]"):
    model(np.zeros((2, 32, 32, 3), np.float32))
  with pytest.raises(ValueError, match=r"in \[0, 1\]"):
    model(np.full((1, 28, 28, 3), 2.0, np.float32))
  with pytest.raises(ValueError, match="no image threshold"):
    model.decide(np.zeros(1))
  u8 = rng.integers(0, 256, (2, 28, 28, 3), dtype=np.uint8)
  np.testing.assert_allclose(model(u8)["score"], model(u8.astype(np.float32) / 255)["score"], atol=1e-6)
  (tmp_path / "bad.jaxexport").write_text("nothing")
  with pytest.raises(ValueError, match="bad.jaxexport: not a .jaxexport artifact"):
    jaxexport_runner.ExportedModel(str(tmp_path / "bad.jaxexport"))

  rc = jaxexport_runner.main([art, str(tmp_path / "r.jpg"), str(tmp_path / "junk.png"), str(tmp_path / "one.png")])
  captured = capsys.readouterr()
  assert rc == 1 and "junk.png: cannot decode" in captured.err
  lines = captured.out.strip().splitlines()
  assert lines[0] == "path,score,decision,max_value" and len(lines) == 3
