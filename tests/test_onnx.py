"""ONNX export: onnxruntime and OpenVINO, in a process without jax or ssvp_jax, score as predict does."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from helpers.tiny import REPO, copy_workdir, run_python, target_records
from ssvp_jax import onnx_export, predict

pytest.importorskip("jax2onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")

# Runs from a folder holding only copies of onnx_runner.py and runner_io.py, with no path to this repo:
# both engines on the same files, at two batch sizes, and the CLI; lists what got imported.
RUNNER = """
import json, sys
import numpy as np
from onnx_runner import OnnxModel, main, read_image
art, paths, out = sys.argv[1], sys.argv[2].split("|"), sys.argv[3]
res = {}
for engine in ("onnxruntime", "openvino"):
  model = OnnxModel(art, engine)
  x = np.stack([read_image(p, model.input_size) for p in paths])
  full, two = model(x), model(x[:2])
  res.update({f"{engine}_{k}": v for k, v in full.items()}, **{f"{engine}_score2": two["score"]})
np.savez(out, **res)
rc = main([art, "--engine", "openvino"] + paths)
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("jax", "jaxlib", "flax", "ssvp_jax", "torch"))
print(json.dumps({"bad": bad, "rc": rc, "meta": model.meta}))
"""


def test_onnx_model_in_onnxruntime_and_openvino_scores_as_predict(trained_workdir, engine, tmp_path,  # noqa: F811
                                                                  tmp_path_factory):
  paths = [r.image_path for r in target_records(trained_workdir) if r.category == "dots"]  # 32 x 32 files
  workdir = copy_workdir(trained_workdir, str(tmp_path / "wd"))
  with open(os.path.join(workdir, "calibration.json"), "w") as f:
    json.dump({"image_threshold": 0.25, "pixel_threshold": 0.5, "category": "dots"}, f)
  art = str(tmp_path / "model.onnx")
  res = run_python(["-m", "ssvp_jax.export", f"--workdir={workdir}", f"--out={art}", "--size=32", "--format=onnx"],
                   tmp_path_factory)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "ONNX opset" in res.stdout and "category 'dots'" in res.stdout

  alone = tmp_path / "alone"
  alone.mkdir()
  for name in ("onnx_runner.py", "runner_io.py"):
    shutil.copy(os.path.join(REPO, "ssvp_jax", name), alone / name)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  out = subprocess.run([sys.executable, "-c", RUNNER, art, "|".join(paths), str(tmp_path / "out.npz")],
                       cwd=alone, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.strip().splitlines()
  info = json.loads(lines[-1])
  assert info["bad"] == [] and info["rc"] == 0
  meta = info["meta"]
  assert (meta["image_threshold"], meta["pixel_threshold"], meta["category"]) == (0.25, 0.5, "dots")
  assert meta["input_size"] == 32 and meta["outputs"] == ["map", "score", "s_global", "s_local"]
  assert len(meta["checkpoint_fingerprint"]) == 16
  csv_rows = [line.split(",") for line in lines if line.startswith(paths[0][:5]) or line.startswith("path,")]
  assert csv_rows[0] == ["path", "score", "decision", "max_value"] and len(csv_rows) == len(paths) + 1

  rows = predict.predict(engine.with_category("dots"), paths, str(tmp_path / "pred"), batch_size=4)
  ref_scores = np.array([float(r["score"]) for r in rows])
  ref_maps = np.stack([np.load(r["map"]) for r in rows])
  got = np.load(tmp_path / "out.npz")
  for eng in ("onnxruntime", "openvino"):
    np.testing.assert_allclose(got[f"{eng}_score"], ref_scores, atol=1e-4, err_msg=eng)
    np.testing.assert_allclose(got[f"{eng}_map"], ref_maps, atol=1e-4, err_msg=eng)
    np.testing.assert_allclose(got[f"{eng}_score2"], got[f"{eng}_score"][:2], atol=1e-6, err_msg=eng)  # dynamic B
  np.testing.assert_allclose([float(r[1]) for r in csv_rows[1:]], ref_scores, atol=1e-4)
  assert [r[2] for r in csv_rows[1:]] == ["defective" if s >= 0.25 else "good" for s in ref_scores]
  assert np.std(ref_scores) > 1e-4


def test_external_data_above_the_limit_and_runner_errors(engine, tmp_path, monkeypatch):  # noqa: F811
  from ssvp_jax import onnx_runner
  monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)  # any model is "large"
  art = str(tmp_path / "m.onnx")
  meta = onnx_export.export_onnx(engine, art)
  assert meta["external_data"] == "m.onnx.data"
  assert os.path.getsize(art + ".data") > 0.8 * meta["weight_bytes"]  # all but tensors under 256 bytes
  model = onnx_runner.OnnxModel(art)
  assert model.meta["checkpoint_fingerprint"] == meta["checkpoint_fingerprint"] and model.image_threshold is None
  x = np.random.default_rng(0).random((3, 28, 28, 3)).astype(np.float32)
  assert model(x)["map"].shape == (3, 28, 28)
  with pytest.raises(ValueError, match=r"must be \[b, 28, 28, 3\]"):
    model(np.zeros((1, 32, 32, 3), np.float32))
  with pytest.raises(ValueError, match="bf16 is an OpenVINO option"):
    onnx_runner.OnnxModel(art, "onnxruntime", "bf16")
  (tmp_path / "bad.onnx").write_text("nothing")
  with pytest.raises(ValueError, match="bad.onnx: not an ONNX model onnxruntime can load"):
    onnx_runner.OnnxModel(str(tmp_path / "bad.onnx"))
  bf16 = onnx_runner.OnnxModel(art, "openvino", "bf16")
  np.testing.assert_allclose(bf16(x)["score"], model(x)["score"], atol=0.1)  # bf16: close, not exact
