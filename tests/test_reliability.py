"""Failure modes (docs/failure_modes.md): one test per row of its table, on the tiny config.

Processes are stopped at named moments (ssvp_jax/faults.py: SSVP_PAUSE_AT) and killed by PID; files
are damaged in place; a second process meets the first on the same work directory. Each test also
checks that nothing was lost: the intact checkpoint, the finished data, the original run's config.
"""

import errno
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import types

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from helpers.tiny import tiny_config
from ssvp_jax import cache, checkpoint, errors, evaluate, fileio, resume, trainer, validate
from ssvp_jax.data import pipeline, splits, synth
from ssvp_jax.data.common import DatasetError
from ssvp_jax.models.ssvp import TRAINABLE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def env(**extra) -> dict:
  return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu",
              **extra)


def cli(module: str, *args: str, **extra_env) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env(**extra_env), capture_output=True,
                        text=True, timeout=300)


def start_paused(workdir: str, moment: str, tmp_path) -> subprocess.Popen:
  """`python -m ssvp_jax.train` on the tiny config, stopped at `moment`; returns once it got there."""
  flag = str(tmp_path / f"paused-{moment}")
  proc = subprocess.Popen([sys.executable, "-m", "ssvp_jax.train", "--config=configs/tiny.py", f"--workdir={workdir}"],
                          cwd=ROOT, env=env(SSVP_PAUSE_AT=moment, SSVP_PAUSE_FILE=flag), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  while not os.path.exists(flag):
    if proc.poll() is not None:
      pytest.fail(f"the training ended before {moment}: {proc.stderr.read()[-3000:]}")
    if time.time() > deadline:
      proc.kill()
      pytest.fail(f"the training did not reach {moment}")
    time.sleep(0.2)
  with open(flag) as f:
    assert int(f.read()) == proc.pid
  return proc


def kill(proc: subprocess.Popen) -> None:
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait(timeout=60)


def flat(model):
  return {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, TRAINABLE))}


def assert_same_params(a, b):
  for k, v in flat(a).items():
    np.testing.assert_allclose(v, flat(b)[k], rtol=1e-6, atol=1e-7, err_msg=k)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A finished tiny run (8 steps, checkpoints 6 and 8 kept) and its model."""
  workdir = str(tmp_path_factory.mktemp("trained") / "run")
  model, _, summary = trainer.train(tiny_config(), workdir)
  assert summary["step"] == 8
  return workdir, model


# ------------------------------------------------------------------ demo data, locks (second processes)


def test_kill_during_demo_data_then_rerun_regenerates_it(tmp_path):
  workdir = str(tmp_path / "run")
  proc = start_paused(workdir, "demo_data", tmp_path)  # one of two categories written
  kill(proc)
  data = os.path.join(workdir, "data")
  assert not os.path.exists(os.path.join(data, "source"))  # never renamed into place
  assert [n for n in os.listdir(data) if ".tmp-" in n]  # the killed generator's folder
  c = tiny_config()
  records = splits.read_split(c.train_data, workdir, "train_data")
  assert len(records) == 16 and {r.category for r in records} == {"brick", "grating"}
  assert os.listdir(data) == ["source"]  # the partial folder is gone
  with open(os.path.join(data, "source", synth.MARKER)) as f:
    assert json.load(f)["categories"] == ["brick", "grating"]
  # A folder without the marker (an older version's partial write) is regenerated, a complete one kept.
  shutil.rmtree(os.path.join(data, "source", "grating"))
  os.remove(os.path.join(data, "source", synth.MARKER))
  assert len(splits.read_split(c.train_data, workdir, "train_data")) == 16
  mtime = os.path.getmtime(os.path.join(data, "source", synth.MARKER))
  splits.read_split(c.train_data, workdir, "train_data")
  assert os.path.getmtime(os.path.join(data, "source", synth.MARKER)) == mtime


def test_second_training_and_concurrent_evaluate_refuse_naming_the_holder(tmp_path):
  workdir = str(tmp_path / "run")
  proc = start_paused(workdir, "demo_data", tmp_path)
  try:
    with pytest.raises(fileio.LockedError, match=f"PID {proc.pid} on host {socket.gethostname()}"):
      trainer.train(tiny_config(), workdir)
    t0 = time.time()
    res = cli("ssvp_jax.evaluate", "--config=configs/tiny.py", f"--workdir={workdir}")
    assert res.returncode == 2, res.stderr[-3000:]
    assert f"error: {workdir} is in use by training (PID {proc.pid}" in res.stderr
    assert "Traceback" not in res.stderr and time.time() - t0 < 120  # at once, not after a hang
    assert not os.path.exists(os.path.join(workdir, "log.jsonl"))  # the refused runs wrote nothing
  finally:
    kill(proc)
  # The OS released the dead holder's lock: the directory is usable again.
  with fileio.WorkdirLock(workdir, "test"):
    pass


# ------------------------------------------------------------------ checkpoints


def _damage(step_dir: str, how: str) -> None:
  """Damages a step folder in place: every data file of its arrays truncated or overwritten, or the meta emptied."""
  if how == "empty_meta":
    open(os.path.join(step_dir, "meta", "metadata"), "w").close()
    return
  for r, _, names in os.walk(os.path.join(step_dir, "state")):
    if os.path.basename(r) != "d":  # orbax's data files (not all are read: damage each)
      continue
    for name in names:
      path = os.path.join(r, name)
      size = os.path.getsize(path)
      if how == "truncated":
        os.truncate(path, size // 2)
        continue
      with open(path, "r+b") as f:  # bytes overwritten in place, same size
        f.seek(size // 2)
        chunk = f.read(64)
        f.seek(size // 2)
        f.write(bytes(b ^ 0xFF for b in chunk))
      assert os.path.getsize(path) == size


@pytest.mark.parametrize("how", ["truncated", "overwritten", "empty_meta"])
def test_damaged_latest_checkpoint_falls_back_to_the_intact_one(trained, tmp_path, caplog, how):
  src, _ = trained
  workdir = shutil.copytree(src, str(tmp_path / "run"))
  _damage(os.path.join(workdir, "checkpoints", "8"), how)
  config = evaluate.load_config(workdir)
  _, _ = evaluate.load_trained(config, workdir, move_bad=True)
  bad = os.path.join(workdir, "checkpoints", "8")
  assert f"checkpoint {bad} cannot be restored" in caplog.text and "checkpoints_bad" in caplog.text
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["6"]
  (moved,) = os.listdir(os.path.join(workdir, checkpoint.BAD_DIR))
  assert moved.startswith("8-")  # moved aside, not deleted


def test_training_resumes_from_the_intact_checkpoint_and_ends_equal(trained, tmp_path, caplog):
  src, model = trained
  workdir = shutil.copytree(src, str(tmp_path / "run"))
  _damage(os.path.join(workdir, "checkpoints", "8"), "truncated")
  caplog.set_level(logging.INFO, logger="ssvp_jax")
  resumed, _, summary = trainer.train(tiny_config(), workdir)
  assert "cannot be restored" in caplog.text and "resumed from the checkpoint of step 6" in caplog.text
  assert summary["step"] == 8
  assert_same_params(model, resumed)
  with open(os.path.join(workdir, "log.jsonl")) as f:
    steps = [json.loads(line)["step"] for line in f]
  assert steps == list(range(1, 9))  # steps 7 and 8 logged once


def test_no_restorable_checkpoint_names_the_directory(trained, tmp_path):
  src, _ = trained
  workdir = shutil.copytree(src, str(tmp_path / "run"))
  for step in ("6", "8"):
    _damage(os.path.join(workdir, "checkpoints", step), "empty_meta")
  config = evaluate.load_config(workdir)
  with pytest.raises(checkpoint.CheckpointError, match=f"{workdir}/checkpoints: no checkpoint can be restored"):
    evaluate.load_trained(config, workdir)  # a reader: nothing moved
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["6", "8"]


# ------------------------------------------------------------------ feature cache


def test_damaged_cache_entries_are_recomputed_and_rewritten(tmp_path, caplog):
  over = {"cache.enabled": True, "cache.dir": str(tmp_path / "cache"), "optim.epochs": 1}
  first, _, _ = trainer.train(tiny_config(**over), str(tmp_path / "a"))
  entries = sorted(os.path.join(r, f) for r, _, fs in os.walk(tmp_path / "cache") for f in fs
                   if f.endswith(".safetensors"))
  assert len(entries) == 16
  same_size, nan = entries[0], entries[1]
  good = open(same_size, "rb").read()
  with open(same_size, "r+b") as f:  # damaged in place, same size
    f.seek(len(good) - 64)
    f.write(bytes(b ^ 0xFF for b in good[-64:]))
  tensors = cache.st_load(open(nan, "rb").read())
  tensors["semantic_global"][:] = np.nan  # non-finite, with a valid checksum
  header = json.loads(open(nan, "rb").read()[8:8 + int.from_bytes(open(nan, "rb").read()[:8], "little")])
  meta = dict(header["__metadata__"], checksum=cache.checksum(tensors))
  open(nan, "wb").write(cache.st_save(tensors, metadata=meta))
  orphan = fileio.temp_name(same_size).replace(f"-{os.getpid()}-", "-999999-")
  open(orphan, "wb").close()  # left by a killed writer
  second, _, _ = trainer.train(tiny_config(**over), str(tmp_path / "b"))  # reads the cache from step 1
  assert f"{same_size}: feature-cache entry fails its checksum" in caplog.text
  assert f"{nan}: feature-cache entry holds non-finite values" in caplog.text
  rewritten = cache.st_load(open(same_size, "rb").read())  # the same arrays again, with a valid checksum
  assert rewritten.keys() == cache.st_load(good).keys()
  for k, v in cache.st_load(good).items():
    np.testing.assert_array_equal(rewritten[k], v, err_msg=k)
  assert all(np.isfinite(v).all() for v in cache.st_load(open(nan, "rb").read()).values())
  assert not os.path.exists(orphan)
  assert_same_params(first, second)  # trained on the right features


# ------------------------------------------------------------------ resume policy


def test_resume_policy(tmp_path, caplog):
  workdir = str(tmp_path / "run")
  trainer.train(tiny_config(), workdir, stop_after_step=3)  # checkpoint at step 2, step 3 logged
  config_json = open(os.path.join(workdir, "config.json")).read()
  refused = [({"optim.batch_size": 2}, ["optim.batch_size"]),
             ({"vcpg.latent_dim": 8, "hsvs.fusion": "concat"}, ["hsvs.fusion", "vcpg.latent_dim"]),
             ({"optim.lr": 1e-3, "optim.epochs": 3}, ["optim.epochs", "optim.lr"])]
  for over, keys in refused:
    with pytest.raises(resume.ResumeError) as e:
      trainer.train(tiny_config(**over), workdir)
    assert f"--config.resume.allow_changes={','.join(keys)}" in str(e.value)
    assert all(f"  {k}: " in str(e.value) for k in keys)
    assert open(os.path.join(workdir, "config.json")).read() == config_json  # nothing written
  # Allowed shape changes still cannot restore: named, nothing moved aside.
  with pytest.raises(checkpoint.CheckpointError, match="other shapes"):
    trainer.train(tiny_config(**{"vcpg.latent_dim": 8, "resume.allow_changes": "vcpg"}), workdir)
  assert not os.path.exists(os.path.join(workdir, checkpoint.BAD_DIR))
  # Harmless changes are accepted, logged and recorded; log.jsonl has each step once.
  c = tiny_config(**{"eval.sigma": 2.0})
  c.log_every_steps = 2
  _, _, s = trainer.train(c, workdir)
  assert s["step"] == 8 and "config changed since the last start: eval.sigma: 1.0 -> 2.0" in caplog.text
  with open(os.path.join(workdir, "log.jsonl")) as f:
    steps = [json.loads(line)["step"] for line in f]
  assert steps == [1, 2, 4, 6, 8]  # step 3 of the interrupted run dropped, then every 2nd step
  # An allowed meaning change: more epochs.
  _, _, s = trainer.train(tiny_config(**{"optim.epochs": 3, "resume.allow_changes": "optim.epochs"}), workdir)
  assert s["step"] == 12
  with open(os.path.join(workdir, resume.HISTORY_FILE)) as f:
    history = [json.loads(line) for line in f]
  assert [h["event"] for h in history] == ["start", "resume", "resume"]
  assert history[0]["config"]["optim"]["lr"] == 1e-4
  assert history[1]["changes"] == {"eval.sigma": [1.0, 2.0], "log_every_steps": [1, 2]}
  assert history[2]["changes"] == {"eval.sigma": [2.0, 1.0], "log_every_steps": [2, 1], "optim.epochs": [2, 3]}
  assert json.load(open(os.path.join(workdir, "config.json")))["optim"]["epochs"] == 3


# ------------------------------------------------------------------ up-front validation, one-line errors


def test_bad_values_are_reported_together_before_anything_is_written(tmp_path):
  workdir = str(tmp_path / "run")
  c = tiny_config(**{"optim.batch_size": 0, "optim.epochs": 0, "eval.batch_size": -1})
  c.eval_data.target.root = str(tmp_path / "no_such_eval_root")
  with pytest.raises(validate.ConfigError) as e:
    trainer.train(c, workdir)
  msg = str(e.value)
  assert msg.startswith("4 problems with the config")
  for part in ("--config.optim.batch_size=0", "--config.optim.epochs=0", "--config.eval.batch_size=-1",
               "no_such_eval_root: no such folder"):
    assert part in msg
  assert not os.path.exists(workdir)


def test_mistyped_root_with_the_demo_config_is_an_error(tmp_path):
  c = tiny_config()
  c.train_data.root = str(tmp_path / "mistyped")
  with pytest.raises(validate.ConfigError, match="mistyped: no such folder.*generated only into a root under"):
    trainer.train(c, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "mistyped") and not os.path.exists(tmp_path / "run")


def test_cli_user_errors_are_one_line_and_verbose_shows_the_traceback(tmp_path):
  workdir = str(tmp_path / "run")
  args = ["--config=configs/tiny.py", f"--workdir={workdir}", "--config.optim.batch_size=3",
          "--config.eval.batch_size=3", "--config.optim.epochs=0"]
  res = cli("ssvp_jax.train", *args, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  assert res.returncode == 2, res.stderr[-3000:]
  assert "Traceback" not in res.stderr
  lines = [line for line in res.stderr.splitlines() if line.strip()]
  assert lines[-4] == "error: 3 problems with the config:"
  assert "--config.optim.batch_size=3: must be a multiple of 2" in res.stderr
  assert "--config.eval.batch_size=3: must be a multiple of 2" in res.stderr
  assert not os.path.exists(workdir)
  res = cli("ssvp_jax.train", *args, "--verbose")
  assert res.returncode != 0 and "Traceback" in res.stderr and "ConfigError" in res.stderr


def test_disk_full_leaves_the_previous_files_whole(trained, tmp_path, monkeypatch):
  src, _ = trained
  workdir = shutil.copytree(src, str(tmp_path / "run"))
  before = open(os.path.join(workdir, "config.json")).read()

  def full(fd):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(os, "fsync", full)
  with pytest.raises(OSError) as e:
    resume.record(tiny_config(**{"eval.sigma": 3.0}), workdir, {}, 8)
  assert errors.is_user_error(e.value)  # one line in the CLIs
  monkeypatch.undo()
  assert open(os.path.join(workdir, "config.json")).read() == before
  assert not [n for n in os.listdir(workdir) if ".tmp-" in n]
  # Too little space for a checkpoint: refused before config.json is touched.
  monkeypatch.setattr(shutil, "disk_usage", lambda p: types.SimpleNamespace(total=10**9, used=10**9, free=1000))
  with pytest.raises(validate.ConfigError, match="MB free, a checkpoint needs"):
    trainer.train(tiny_config(**{"optim.epochs": 3, "resume.allow_changes": "all"}), workdir)
  assert open(os.path.join(workdir, "config.json")).read() == before


# ------------------------------------------------------------------ outputs that already exist


def test_export_refuses_existing_outputs_and_leaves_no_temp_on_failure(tmp_path, monkeypatch):
  from ssvp_jax import export
  folder = tmp_path / "dir"
  folder.mkdir()
  with pytest.raises(errors.UserError, match="is a directory"):
    fileio.check_output(str(folder), True, ".jaxexport artifact", export.is_artifact, folder=False)
  other = tmp_path / "notes.txt"
  other.write_text("mine")
  with pytest.raises(errors.UserError, match="pass --overwrite"):
    fileio.check_output(str(other), False, ".jaxexport artifact", export.is_artifact, folder=False)
  with pytest.raises(errors.UserError, match="is not a .jaxexport artifact"):
    fileio.check_output(str(other), True, ".jaxexport artifact", export.is_artifact, folder=False)
  art = tmp_path / "model.jaxexport"
  with open(art, "wb") as f:
    np.savez(f, function=np.zeros(1, np.uint8), meta=np.zeros(1, np.uint8))
  fileio.check_output(str(art), True, ".jaxexport artifact", export.is_artifact, folder=False)  # allowed
  # Disk full in the middle of writing: no temporary file, the old artifact untouched.
  before = art.read_bytes()

  def full(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(np, "savez", full)
  with pytest.raises(OSError):
    with fileio.atomic_file(str(art), "wb") as f:
      np.savez(f, x=np.zeros(3))
  assert art.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["dir", "model.jaxexport", "notes.txt"]


def test_converter_refuses_an_existing_work_directory(trained, tmp_path, capsys):
  from convert import dinov3 as conv
  src, _ = trained
  workdir = shutil.copytree(src, str(tmp_path / "run"))
  before = open(os.path.join(workdir, "config.json")).read()
  assert conv.main(["--src", "whatever", "--out", workdir]) == 2
  assert "exists and is not empty; pass --overwrite" in capsys.readouterr().err
  assert conv.main(["--src", "whatever", "--out", workdir, "--overwrite"]) == 2
  assert "is not a converted dinov3 bundle" in capsys.readouterr().err
  assert open(os.path.join(workdir, "config.json")).read() == before


# ------------------------------------------------------------------ images


def test_large_images_hit_the_documented_limit_not_pils(tmp_path):
  path = str(tmp_path / "huge.png")
  Image.new("1", (14000, 14000)).save(path)  # 196 megapixels, over PIL's bomb limit of 179
  im = pipeline._open(path)  # no DecompressionBombError
  assert im.size == (14000, 14000)
  pipeline.set_max_pixels(100_000_000)
  try:
    with pytest.raises(DatasetError, match=r"huge.png: 14000 x 14000 = 196 megapixels is over the limit of 100 "
                                           r"megapixels \(--max_pixels=100000000\)"):
      pipeline.load_image(path)
  finally:
    pipeline.set_max_pixels(pipeline.DEFAULT_MAX_PIXELS)
