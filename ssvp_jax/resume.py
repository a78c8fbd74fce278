"""Resume policy: a rerun in a work directory continues the SAME run, or says what changed.

Before training writes anything, the config stored in `WORKDIR/config.json` is compared with the new
one, key by key:

* keys that change what the run means (model shapes, fusion, losses, optimiser, batch size, epochs,
  learning rates, data, backbones, seed, dtype: everything not listed below) refuse the resume,
  naming every differing key and the override `--config.resume.allow_changes=KEY,...` (a key, a
  section such as `optim`, or `all`);
* harmless keys (`HARMLESS`: evaluation settings and targets, logging and checkpoint cadence,
  decoding threads, the mesh, where the feature cache lives) are accepted and logged.

Every start appends one line to `WORKDIR/config_history.jsonl` (the first with the whole config,
later ones with the accepted changes, old and new value), so config.json can hold the current config
without erasing the history. A directory with a config.json but no checkpoint yet has trained
nothing: any change is accepted (and recorded).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from typing import Any

import ml_collections

from ssvp_jax import config_upgrade, fileio
from ssvp_jax.errors import UserError

log = logging.getLogger("ssvp_jax")

CONFIG_FILE = "config.json"
HISTORY_FILE = "config_history.jsonl"
HARMLESS = ("eval.", "eval_data.", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints", "data.workers",
            "mesh.", "cache.enabled", "cache.dir", "reference.")  # the bank never changes the trained heads
IGNORED = ("resume.", "decisions.")  # the override itself; the decisions block (derived from the rest)
_ABSENT = "<absent>"


class ResumeError(UserError):
  """The stored config differs from the new one in keys that change the run's meaning."""


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
  """{"optim": {"lr": 1}} -> {"optim.lr": 1}; lists and scalars are leaves."""
  if not isinstance(d, dict):
    return {prefix[:-1]: d}
  out: dict[str, Any] = {}
  for k, v in d.items():
    out.update(flatten(v, f"{prefix}{k}."))
  return out


def as_plain(config: ml_collections.ConfigDict) -> dict:
  """The config as config.json stores it (tuples become lists), so stored and new compare equal."""
  return json.loads(config.to_json_best_effort())


def differences(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
  """{key: (old value, new value)} over both configs' keys, `<absent>` where one lacks the key."""
  a, b = flatten(old), flatten(new)
  keys = sorted(k for k in set(a) | set(b) if not k.startswith(IGNORED))
  return {k: (a.get(k, _ABSENT), b.get(k, _ABSENT)) for k in keys if a.get(k, _ABSENT) != b.get(k, _ABSENT)}


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
  return any(key == p or key.startswith(p if p.endswith(".") else p + ".") for p in patterns)


def allowed(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The keys or sections of `--config.resume.allow_changes` ("all" allows every change)."""
  resume = config.get("resume")
  text = (resume.get("allow_changes") if resume is not None else "") or ""
  return tuple(p.strip() for p in text.split(",") if p.strip())


def has_checkpoint(workdir: str) -> bool:
  """Whether `workdir/checkpoints` holds a finished step folder (a name of digits)."""
  folder = os.path.join(workdir, "checkpoints")
  return os.path.isdir(folder) and any(n.isdigit() for n in os.listdir(folder))


def stored_config(workdir: str) -> dict | None:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      stored = json.load(f)
  except ValueError as e:
    raise UserError(f"{path}: not valid JSON ({e}); restore it from the last line with a \"config\" in "
                    f"{HISTORY_FILE}, or start a new work directory") from None
  return config_upgrade.upgrade(stored, path)


def check(config: ml_collections.ConfigDict, workdir: str) -> dict[str, tuple[Any, Any]]:
  """Compares the new config with the stored one; raises ResumeError or returns the accepted changes.

  Writes nothing: `record` does, once the run has the work directory's lock.
  """
  old = stored_config(workdir)
  if old is None:
    return {}
  changes = differences(old, as_plain(config))
  if not changes or not has_checkpoint(workdir):
    return changes
  allow = allowed(config)
  refused = {k: v for k, v in changes.items()
             if not _matches(k, HARMLESS) and "all" not in allow and not _matches(k, allow)}
  if refused:
    lines = [f"  {k}: {o!r} -> {n!r}" for k, (o, n) in refused.items()]
    raise ResumeError(
        f"{workdir} holds a run with another config; resuming would change its meaning ({len(refused)} "
        f"key(s)):\n" + "\n".join(lines) + "\nuse a new --workdir, or resume anyway with "
        f"--config.resume.allow_changes={','.join(refused)} (or =all)")
  return changes


def record(config: ml_collections.ConfigDict, workdir: str, changes: dict[str, tuple[Any, Any]], step: int | None
           ) -> None:
  """Writes config.json (atomically) and appends this start to config_history.jsonl."""
  plain = as_plain(config)
  first = stored_config(workdir) is None
  for key, (old, new) in changes.items():
    log.warning("config changed since the last start: %s: %r -> %r", key, old, new)
  entry = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "event": "start" if first else "resume", "checkpoint_step": step}
  if first:
    entry["config"] = plain
  else:
    entry["changes"] = {k: [o, n] for k, (o, n) in changes.items()}
  fileio.atomic_write(os.path.join(workdir, CONFIG_FILE), config.to_json_best_effort(indent=2))
  with open(os.path.join(workdir, HISTORY_FILE), "a") as f:  # one line per start
    f.write(json.dumps(entry) + "\n")


def trim_log(path: str, step: int) -> int:
  """Drops the lines of a `log.jsonl` after `step` (written after the checkpoint a resume starts from,
  so they would be written again); returns how many. Torn lines (a kill mid-write) go too."""
  if not os.path.exists(path):
    return 0
  keep, dropped = [], 0
  with open(path) as f:
    for line in f:
      try:
        ok = json.loads(line)["step"] <= step
      except (ValueError, KeyError, TypeError):
        ok = False
      if ok:
        keep.append(line)
      else:
        dropped += 1
  if dropped:
    fileio.atomic_write(path, "".join(keep))
  return dropped
