"""Flags and set-up shared by the command-line entry points (train, evaluate, predict, calibrate, export)."""

from __future__ import annotations

import logging
import os

from absl import flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/demo.py; override fields with "
                                "--config.optim.epochs=3", lock_config=True)
flags.DEFINE_string("workdir", None, "Work directory: checkpoints, logs, reports.")
flags.mark_flag_as_required("workdir")


def setup() -> None:
  """INFO logs of ssvp_jax on stderr, and JAX's persistent compilation cache.

  Every start builds the model (one small compilation per parameter shape) and compiles the
  steps; with compilations kept on disk, a second start skips them (demo config: building the
  model 19.4 s -> 6.2 s). JAX's own settings win: JAX_COMPILATION_CACHE_DIR moves the cache
  (default ~/.cache/ssvp_jax/xla, or under XDG_CACHE_HOME), JAX_ENABLE_COMPILATION_CACHE=false
  turns it off.
  """
  logging.getLogger("ssvp_jax").setLevel(logging.INFO)
  logging.getLogger("absl").setLevel(logging.WARNING)
  import jax
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return  # the user's (or the test suite's) cache, with their thresholds
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  jax.config.update("jax_compilation_cache_dir", os.path.join(root, "ssvp_jax", "xla"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # the many small init kernels too
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
