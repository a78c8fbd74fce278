"""Two processes on 127.0.0.1 (CPU, `jax.distributed`) train together and agree with one process.

Each child (this file run as a script) initialises `jax.distributed`, reads its half of every
training batch and trains the tiny config for one epoch into one shared work directory. The test
compares the logged losses and the collectively written checkpoint with a one-process run.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from helpers.tiny import flat, tiny_config  # noqa: E402

OVERRIDES = {"optim.epochs": 1, "optim.warmup_frac": 0.0, "optim.lr": 3e-3, "optim.lr_prompt": 3e-3}


def _config(data_dir: str, cached: bool = False):
  c = tiny_config(**OVERRIDES)  # batch 4: 2 rows per process, 4 steps
  c.train_data.root = os.path.join(data_dir, "source")
  c.eval_data.target.root = os.path.join(data_dir, "target")
  c.checkpoint_every_steps = 4
  if cached:  # epoch 1 fills the feature cache, epoch 2 reads it
    c.optim.epochs = 2
    c.checkpoint_every_steps = 8
    c.cache.enabled = True
  return c


def _child(process_id: str, port: str, data_dir: str, workdir: str, out_path: str, cached: str = "") -> None:
  sys.path.insert(0, ROOT)
  from ssvp_jax import distributed, evaluate, trainer
  from ssvp_jax.data import splits

  assert distributed.initialize(f"127.0.0.1:{port}", 2, int(process_id))
  import jax
  c = _config(data_dir, cached=bool(cached))
  model, tok, summary = trainer.train(c, workdir)
  if cached:
    with open(out_path, "w") as f:
      json.dump({"summary": summary}, f)
    return
  # Evaluation: every process holds each whole batch, the step splits it over the processes.
  records = splits.read_split(c.eval_data.target, workdir, "eval_data.target")[:6]
  s_final = evaluate.predict_records(model, tok, c, records)["s_final"].tolist()
  with open(out_path, "w") as f:
    json.dump({"summary": summary, "process_count": jax.process_count(), "devices": jax.device_count(),
               "main": distributed.is_main(), "s_final": s_final}, f)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_two(tmp_path, data: str, workdir: str, *extra: str) -> list[dict]:
  """Both children to completion; their JSON outputs (a failing child's traceback in the assertion)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # one CPU device per process: the mesh's data axis spans the processes
  port = str(_free_port())
  # Output to files, not pipes: a child blocked on a full pipe would stall the other at a collective.
  log_paths = [tmp_path / f"log{i}.txt" for i in range(2)]
  procs = []
  for i in range(2):
    with open(log_paths[i], "w") as log:
      procs.append(subprocess.Popen([sys.executable, __file__, str(i), port, data, workdir,
                                     str(tmp_path / f"out{i}.json"), *extra], env=env, cwd=ROOT, stdout=log,
                                    stderr=subprocess.STDOUT))
  try:
    for p in procs:
      p.wait(timeout=900)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, p in enumerate(procs):
    text = log_paths[i].read_text()
    start = text.find("Traceback")  # the Python error, before the coordination service's own report
    assert p.returncode == 0, f"process {i}:\n{text[start:start + 6000] if start >= 0 else text[-6000:]}"
  return [json.load(open(tmp_path / f"out{i}.json")) for i in range(2)]


def _losses(wd) -> list[float]:
  with open(os.path.join(wd, "log.jsonl")) as f:
    return [json.loads(line)["loss/total"] for line in f]


def test_two_processes_match_one(tmp_path):
  from ssvp_jax import evaluate, trainer
  from ssvp_jax.data import splits
  from ssvp_jax.models.ssvp import TRAINABLE

  data = str(tmp_path / "data")
  c = _config(data)
  splits.prepare_demo_data(c.train_data, c.train_data.root)
  splits.prepare_demo_data(c.eval_data.target, c.eval_data.target.root)
  outs = _run_two(tmp_path, data, str(tmp_path / "multi"))

  one_model, tok, one_summary = trainer.train(c, str(tmp_path / "one"))
  assert [o["process_count"] for o in outs] == [2, 2] and [o["devices"] for o in outs] == [2, 2]
  assert [o["main"] for o in outs] == [True, False]
  for o in outs:  # every process sees the same global loss
    assert o["summary"]["step"] == 4
    np.testing.assert_allclose(o["summary"]["loss/total"], one_summary["loss/total"], rtol=2e-5)

  multi = _losses(tmp_path / "multi")
  assert len(multi) == 4  # written by process 0 only (two writers would log 8 lines)
  np.testing.assert_allclose(multi, _losses(tmp_path / "one"), rtol=2e-5, atol=1e-6)
  assert multi[0] != multi[-1]

  # Sharded evaluation across the processes gives every process the one-process scores.
  records = splits.read_split(c.eval_data.target, str(tmp_path), "eval_data.target")[:6]
  one_scores = evaluate.predict_records(one_model, tok, c, records)["s_final"]
  for o in outs:
    np.testing.assert_allclose(o["s_final"], one_scores, rtol=1e-4, atol=1e-5)

  # The checkpoint both processes wrote restores in one process to the one-process heads.
  restored, _ = evaluate.load_trained(c, str(tmp_path / "multi"))
  a, b = flat(one_model, TRAINABLE), flat(restored, TRAINABLE)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_two_processes_with_the_feature_cache_match_one_without(tmp_path):
  """Epoch 1 fills the cache collectively (each process writes its rows), epoch 2 reads it back."""
  from ssvp_jax import trainer
  from ssvp_jax.data import splits

  data = str(tmp_path / "data")
  c = _config(data, cached=True)
  splits.prepare_demo_data(c.train_data, c.train_data.root)
  splits.prepare_demo_data(c.eval_data.target, c.eval_data.target.root)  # checked before training starts
  outs = _run_two(tmp_path, data, str(tmp_path / "multi"), "cached")
  c.cache.enabled = False
  _, _, one = trainer.train(c, str(tmp_path / "one"))
  multi = _losses(tmp_path / "multi")
  assert len(multi) == 8 and [o["summary"]["step"] for o in outs] == [8, 8]
  np.testing.assert_allclose(multi, _losses(tmp_path / "one"), rtol=2e-5, atol=1e-6)
  entries = [f for _, _, fs in os.walk(tmp_path / "multi" / "feature_cache") for f in fs if f.endswith(".safetensors")]
  assert len(entries) == 16  # 4 steps of 4 images, each stored once by the process that owns its row


def test_initialize_needs_complete_arguments(monkeypatch):
  from ssvp_jax import distributed

  for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS",
            "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
    monkeypatch.delenv(k, raising=False)
  assert distributed.initialize() is False  # nothing asked for: one process
  assert distributed.initialize(num_processes=1) is False
  with pytest.raises(ValueError, match="--num_processes and --process_id"):
    distributed.initialize("127.0.0.1:1234")
  with pytest.raises(ValueError, match="--coordinator_address"):
    distributed.initialize(num_processes=2, process_id=0)


def test_process_batches_rebuild_the_global_batch(monkeypatch, tmp_path):
  """Both processes' rows, stacked, are exactly the one-process batches (same shuffle, same grouping)."""
  from ssvp_jax import distributed, trainer
  from ssvp_jax.data import pipeline, splits

  data = str(tmp_path / "data")
  c = _config(data)
  splits.prepare_demo_data(c.train_data, c.train_data.root)
  records = splits.read_split(c.train_data, str(tmp_path), "train_data")
  kw = dict(batch_size=4, seed=3, epoch=1, num_threads=0)
  one = list(distributed.train_batches(records, pipeline.views(c), **kw))
  monkeypatch.setattr(distributed.jax, "process_count", lambda: 2)
  parts = []
  for pid in range(2):
    monkeypatch.setattr(distributed.jax, "process_index", lambda pid=pid: pid)
    parts.append(list(distributed.train_batches(records, pipeline.views(c), **kw)))
  assert len(one) == len(parts[0]) == len(parts[1]) == 4
  for whole, p0, p1 in zip(one, *parts):
    np.testing.assert_array_equal(np.concatenate([p0["index"], p1["index"]]), whole["index"])
    np.testing.assert_array_equal(np.concatenate([p0["semantic"], p1["semantic"]]), whole["semantic"])
  with pytest.raises(ValueError, match="multiple of 2"):
    next(distributed.train_batches(records, pipeline.views(c), **{**kw, "batch_size": 5}))


if __name__ == "__main__":
  _child(*sys.argv[1:7])
