"""Flags and set-up shared by the command-line entry points (train, evaluate, predict, calibrate, export)."""

from __future__ import annotations

import functools
import logging
import os
import sys
from typing import Callable

import jax
from absl import app, flags
from ml_collections import config_flags

from ssvp_jax.data import pipeline
from ssvp_jax.errors import is_user_error

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/demo.py; override fields with "
                                "--config.optim.epochs=3", lock_config=True)
flags.DEFINE_string("workdir", None, "Work directory: checkpoints, logs, reports.")
flags.mark_flag_as_required("workdir")
flags.DEFINE_bool("verbose", False, "Show the traceback of a configuration or input error (normally one line).")


def run(main: Callable) -> None:
  """`app.run(main)` that prints configuration and input errors as one line, `error: ...`, exit status 2
  (ssvp_jax/errors.py says which errors those are); `--verbose` shows their traceback. Bugs keep theirs."""
  @functools.wraps(main)
  def guarded(argv):
    try:
      return main(argv)
    except Exception as e:  # noqa: BLE001  (sorted into user errors and bugs just below)
      if FLAGS.verbose or not (is_user_error(e) or isinstance(e, app.UsageError)):
        raise
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)

  app.run(guarded)


def setup() -> None:
  """INFO logs of ssvp_jax on stderr, --max_pixels where defined, and JAX's persistent compilation cache.

  Every start builds the model (one small compilation per parameter shape) and compiles the
  steps; with compilations kept on disk, a second start skips them (measured, docs/scaling.md
  "Compilation cache"). JAX's own settings win: JAX_COMPILATION_CACHE_DIR moves the cache
  (default ~/.cache/ssvp_jax/xla, or under XDG_CACHE_HOME), JAX_ENABLE_COMPILATION_CACHE=false
  turns it off.
  """
  logging.getLogger("ssvp_jax").setLevel(logging.INFO)
  logging.getLogger("absl").setLevel(logging.WARNING)
  if "max_pixels" in FLAGS:  # predict and calibrate (ssvp_jax.inference.define_flags)
    pipeline.set_max_pixels(FLAGS.max_pixels)
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return  # the user's (or the test suite's) cache, with their thresholds
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  jax.config.update("jax_compilation_cache_dir", os.path.join(root, "ssvp_jax", "xla"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # the many small init kernels too
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
