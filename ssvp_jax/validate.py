"""Up-front checks of a run's config, in one place, every problem reported together.

Training calls `check(config, workdir, train=True)` before it writes or builds anything, evaluation
`check(config, workdir, train=False)`; `check_disk` follows once the model's size is known. A bad
value that used to surface as a ZeroDivisionError, an exit 0 with untrained numbers, or an error
after hours of training (an evaluation root that does not exist) is now one `ConfigError` listing
every problem with the flag that fixes it.
"""

from __future__ import annotations

import math
import os
import shutil
from typing import Iterable

import jax
import ml_collections

from ssvp_jax import sharding
from ssvp_jax.cache import DTYPES
from ssvp_jax.data import datasets
from ssvp_jax.errors import UserError


class ConfigError(UserError):
  """One or more config values cannot work; the message lists each with its flag."""


def _positive(config: ml_collections.ConfigDict, keys: Iterable[str]) -> list[str]:
  out = []
  for key in keys:
    section, _, field = key.rpartition(".")
    value = (config[section] if section else config).get(field)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      out.append(f"--config.{key}={value!r}: must be a whole number >= 1")
  return out


def _data_axis(config: ml_collections.ConfigDict, problems: list[str]) -> int | None:
  try:
    return int(sharding.make_mesh(sharding.mesh_config(config)).shape["data"])
  except ValueError as e:
    problems.append(str(e))
    return None


def _divisible(key: str, value, data: int | None, processes: int) -> list[str]:
  if not isinstance(value, int) or value < 1 or data is None:
    return []
  need = math.lcm(data, processes)
  if value % need:
    return [f"--config.{key}={value}: must be a multiple of {need} (the mesh's {data} data devices and "
            f"{processes} processes)"]
  return []


def generated_root(ds: ml_collections.ConfigDict) -> bool:
  """Whether the demo-data generator may write this dataset: it names a synth layout AND its root is
  templated under the work directory. A user's own root is never written into (a mistyped path
  would otherwise be filled with synthetic data and trained on)."""
  synth = ds.get("synth")
  return bool(synth and synth.get("layout")) and "{workdir}" in ds.root


def _dataset(ds: ml_collections.ConfigDict, workdir: str, section: str, min_records: int = 0) -> list[str]:
  if ds.name not in datasets.DATASETS:
    return [f"--config.{section}.name={ds.name!r}: unknown; known: {', '.join(datasets.DATASETS)}"]
  title = datasets.DATASETS[ds.name].title
  if not ds.root:
    return [f"--config.{section}.root is empty: pass the extracted {title} folder"]
  if generated_root(ds):
    return []  # written (or completed) by the demo-data generator before it is read
  root = ds.root.replace("{workdir}", workdir)
  if not os.path.isdir(root):
    hint = (" (demo data is generated only into a root under the work directory, such as "
            "'{workdir}/data/...'; this one is not, so it must exist)") if ds.get("synth") and ds.synth.layout else ""
    return [f"--config.{section}.root={root}: no such folder{hint}"]
  try:
    records = datasets.read_dataset(ds.name, root, ds.split, tuple(ds.categories) or None)
  except ValueError as e:  # DatasetError names the file or folder
    return [f"--config.{section}: {e}"]
  if len(records) < min_records:
    return [f"--config.{section}.root={root}: {len(records)} images are fewer than one batch of "
            f"{min_records}: lower --config.optim.batch_size"]
  return []


def _writable(path: str, what: str) -> list[str]:
  probe = os.path.abspath(path)
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe):
    return [f"{what}={path}: {probe} is a file, not a folder"]
  if not os.access(probe, os.W_OK | os.X_OK):
    return [f"{what}={path}: {probe} is not writable"]
  return []


def problems(config: ml_collections.ConfigDict, workdir: str, train: bool) -> list[str]:
  """Every problem of `config` for a training (`train`) or an evaluation run in `workdir`."""
  out = _writable(workdir, "--workdir")
  keys = ["eval.batch_size"] + (["optim.batch_size", "optim.epochs", "log_every_steps", "checkpoint_every_steps",
                                 "keep_checkpoints"] if train else [])
  out += _positive(config, keys)
  data = _data_axis(config, out)
  processes = jax.process_count()
  out += _divisible("eval.batch_size", config.eval.batch_size, data, 1)
  if config.eval.get("score_norm") not in ("none", "minmax"):
    out.append(f"--config.eval.score_norm={config.eval.get('score_norm')!r}: must be 'none' or 'minmax'")
  if train:
    out += _divisible("optim.batch_size", config.optim.batch_size, data, processes)
    bs = config.optim.batch_size if isinstance(config.optim.batch_size, int) else 0
    out += _dataset(config.train_data, workdir, "train_data", max(bs, 0))
    cache = config.get("cache")
    if cache is not None and cache.enabled:
      if cache.dtype not in DTYPES:
        out.append(f"--config.cache.dtype={cache.dtype!r}: must be one of {', '.join(DTYPES)}")
      out += _writable(cache.dir.replace("{workdir}", workdir), "--config.cache.dir")
  for key, ds in config.eval_data.items():
    out += _dataset(ds, workdir, f"eval_data.{key}")
  return out


def check(config: ml_collections.ConfigDict, workdir: str, train: bool) -> None:
  """Raises ConfigError listing every problem of `problems(...)`; nothing is written or built before."""
  found = problems(config, workdir, train)
  if len(found) == 1:
    raise ConfigError(found[0])
  if found:
    raise ConfigError(f"{len(found)} problems with the config:\n  " + "\n  ".join(found))


def check_disk(path: str, needed_bytes: int, what: str) -> None:
  """Raises ConfigError when the file system of `path` has less than `needed_bytes` free."""
  free = shutil.disk_usage(path).free
  if free < needed_bytes:
    raise ConfigError(f"{path}: {free / 1e6:.1f} MB free, {what} needs about {needed_bytes / 1e6:.1f} MB: "
                      "free some space or use another --workdir")
