"""Flags shared by the command-line entry points (train, evaluate)."""

from __future__ import annotations

import logging

from absl import flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/demo.py; override fields with "
                                "--config.optim.epochs=3", lock_config=True)
flags.DEFINE_string("workdir", None, "Work directory: checkpoints, logs, reports.")
flags.mark_flag_as_required("workdir")


def setup_logging() -> None:
  """INFO logs of ssvp_jax on stderr (absl's handler keeps the rest quiet)."""
  logging.getLogger("ssvp_jax").setLevel(logging.INFO)
  logging.getLogger("absl").setLevel(logging.WARNING)
