"""The tiny config (configs/tiny.py) and what tests build from it: its demo data, one trained work directory.

Training (a few seconds of steps) happens once per test run even under pytest-xdist: the first worker
trains under a file lock in the run's shared temporary folder, the others reuse it (the `trained_workdir`
fixture in conftest.py).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import subprocess
import sys

import filelock
import numpy as np
from flax import nnx

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_config(name, **overrides):
  """`configs/<name>.py`'s get_config() with {"dotted.key": value} overrides (the tests' one loader)."""
  spec = importlib.util.spec_from_file_location(f"{name}_config", os.path.join(REPO, "configs", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  for key, value in overrides.items():
    *sections, field = key.split(".")
    target = c
    for s in sections:
      target = target[s]
    target[field] = value
  return c


def tiny_config(**overrides):
  return load_config("tiny", **overrides)


def flat(model, filt):
  """{"dotted.path": array} of the model's variables that `filt` selects."""
  return {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, filt))}


def write_demo_data(root: str) -> str:
  """The tiny config's demo source and target data under ROOT/source and ROOT/target; returns ROOT."""
  from ssvp_jax.data import splits
  c = tiny_config()
  splits.prepare_demo_data(c.train_data, os.path.join(root, "source"))
  splits.prepare_demo_data(c.eval_data.target, os.path.join(root, "target"))
  return root


def with_data(c, data_dir):
  """Points the config's source and target roots at write_demo_data's folders."""
  c.train_data.root = os.path.join(data_dir, "source")
  c.eval_data.target.root = os.path.join(data_dir, "target")
  return c


def _shared_root(tmp_path_factory) -> str:
  base = tmp_path_factory.getbasetemp()
  # Under xdist every worker has its own basetemp inside one folder of this run.
  return str(base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base)


def train_shared_workdir(tmp_path_factory) -> str:
  """A work directory trained with configs/tiny.py, with its demo target data written; once per test run."""
  from ssvp_jax import trainer
  from ssvp_jax.data import splits
  root = _shared_root(tmp_path_factory)
  workdir = os.path.join(root, "factory_tiny_workdir")
  with filelock.FileLock(os.path.join(root, "factory_tiny_workdir.lock")):
    if not os.path.exists(os.path.join(workdir, "READY")):
      shutil.rmtree(workdir, ignore_errors=True)
      config = tiny_config()
      trainer.train(config, workdir)
      splits.read_split(config.eval_data.target, workdir, "eval_data.target")  # writes the demo target data
      open(os.path.join(workdir, "READY"), "w").close()
  return workdir


def copy_workdir(workdir: str, dest: str) -> str:
  """What a trained work directory needs for inference (config + checkpoints), so a test can add files."""
  shutil.copytree(workdir, dest, ignore=shutil.ignore_patterns("data", "tensorboard", "eval", "READY"))
  return dest


def run_python(args: list[str], tmp_path_factory, timeout: int = 300) -> subprocess.CompletedProcess:
  """`python ARGS` in a fresh process on the CPU, with a compilation cache shared by this run's subprocesses.

  Building a model compiles dozens of small initialisers; the first process that does so runs alone
  (under a lock), so that xdist workers do not pay for it twice at once.
  """
  cache = os.path.join(_shared_root(tmp_path_factory), "factory_jax_cache")
  warm = cache + ".warm"
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu",
             JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  with contextlib.nullcontext() if os.path.exists(warm) else filelock.FileLock(cache + ".lock"):
    res = subprocess.run([sys.executable] + args, cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=timeout)
    if res.returncode in (0, 1) and args[0] == "-m":  # an entry point that built the model
      open(warm, "w").close()
  return res


def target_records(workdir: str):
  """The demo target records of the trained work directory (VisA layout)."""
  from ssvp_jax.data import splits
  config = tiny_config()
  return splits.read_split(config.eval_data.target, workdir, "eval_data.target")


def magenta_pixels(png_path: str) -> int:
  """Pixels of the decision-contour colour in an overlay (the blend can never produce it)."""
  from PIL import Image

  from ssvp_jax.report import THRESHOLD_OUTLINE
  a = np.asarray(Image.open(png_path).convert("RGB"))
  return int(np.all(a == np.array(THRESHOLD_OUTLINE, np.uint8), axis=-1).sum())
