"""Files that are never seen half-written, and one run per work directory (docs/failure_modes.md).

* `atomic_write` / `atomic_file`: write a temporary file beside the target, flush it to disk, then
  `os.replace` it over the target. A reader (or a rerun after kill -9 or a full disk) sees the old
  file or the whole new one; the temporary file is removed on any failure.
* `atomic_dir`: the same for a folder (converter bundles): built under a temporary name, swapped in.
* `WorkdirLock`: an exclusive `fcntl.flock` on `WORKDIR/.lock`. The OS releases it when the process
  dies, however it dies, so a stale lock cannot outlive its holder; the file names the holder (PID,
  host, command) for the error a second process gets.
* `check_output`: converters and exports refuse an existing, non-empty `--out` unless `--overwrite`,
  and never overwrite something that is not their own kind of output.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import sys
import time
import uuid
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from ssvp_jax.errors import UserError

LOCK_FILE = ".lock"


def digest_arrays(named: Iterable[tuple[str, Any]]) -> str:
  """blake2b (16 bytes, hex) over (name, dtype, shape, bytes) of each array, in the order given: the
  checksum of feature-cache entries and checkpoints, and the cache's key of backbone weights."""
  h = hashlib.blake2b(digest_size=16)
  for name, a in named:
    a = np.ascontiguousarray(a)
    h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
    h.update(memoryview(a.reshape(-1).view(np.uint8)))
  return h.hexdigest()


def temp_name(path: str) -> str:
  """A unique temporary name beside `path` that says which host and process wrote it."""
  return f"{path}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """`with atomic_path(path) as tmp:` write the file `tmp` (for writers that take a path); on success it
  replaces `path`, on failure it is removed and `path` left as it was."""
  tmp = temp_name(path)
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "w", **kwargs) -> Iterator[Any]:
  """`with atomic_file(path, "wb") as f:` writes `path` all at once or not at all (see the module doc)."""
  with atomic_path(path) as tmp:
    with open(tmp, mode, **kwargs) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())


def atomic_write(path: str, data: str | bytes) -> None:
  """Writes text or bytes to `path` atomically."""
  with atomic_file(path, "wb" if isinstance(data, bytes) else "w") as f:
    f.write(data)


def atomic_write_json(path: str, obj: Any, **kwargs) -> None:
  atomic_write(path, json.dumps(obj, indent=2, **kwargs) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str) -> Iterator[str]:
  """`with atomic_dir(out) as tmp:` fill `tmp`; on success it replaces `out` (the old one is removed
  only after the new one is in place); on failure `tmp` is removed and `out` left as it was."""
  tmp = temp_name(path)
  os.makedirs(tmp)
  try:
    yield tmp
    old = None
    if os.path.lexists(path):
      old = temp_name(path) + ".old"
      os.replace(path, old)
    os.replace(tmp, path)
    if old:
      shutil.rmtree(old, ignore_errors=True)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def remove_stale_temps(folder: str, max_age_s: float = 86400.0) -> list[str]:
  """Removes the temporary files and folders in `folder` (names from `temp_name`) whose writer is gone:
  a dead process of this host, or older than `max_age_s` (another host's writer cannot be asked).
  Returns the removed paths."""
  removed = []
  host = socket.gethostname()
  try:
    entries = list(os.scandir(folder))
  except FileNotFoundError:
    return removed
  for entry in entries:
    _, sep, tail = entry.name.partition(".tmp-")
    if not sep:
      continue
    writer_host, _, rest = tail.rpartition("-")[0].rpartition("-")  # <host>-<pid>-<hex>[.old]
    try:
      pid, age = int(rest), time.time() - entry.stat(follow_symlinks=False).st_mtime
    except (ValueError, OSError):
      continue
    if (writer_host == host and not _alive(pid)) or age > max_age_s:
      (shutil.rmtree if entry.is_dir(follow_symlinks=False) else os.remove)(entry.path)
      removed.append(entry.path)
  return removed


def check_output(path: str, overwrite: bool, kind: str, is_own: Callable[[str], bool], *, folder: bool) -> None:
  """Refuses to write `--out=path` over something that exists (see the module doc).

  folder: the output is a folder (converters) or a file (exports). `is_own(path)` says whether what is
  there is this tool's own kind of output (`kind` names it in the error).
  """
  if not os.path.lexists(path):
    return
  if folder and not os.path.isdir(path):
    raise UserError(f"--out={path} is a file; give a folder for the {kind}")
  if not folder and os.path.isdir(path):
    raise UserError(f"--out={path} is a directory; give a file path for the {kind}, e.g. {path}/model.jaxexport")
  if folder and not os.listdir(path):
    return
  if not overwrite:
    raise UserError(f"--out={path} exists and is not empty; pass --overwrite to replace it, or choose another path")
  if not is_own(path):
    raise UserError(f"--out={path} is not a {kind}; --overwrite replaces only a {kind}, choose another path")


# ------------------------------------------------------------------------------------------------
# One run per work directory
# ------------------------------------------------------------------------------------------------

class LockedError(UserError):
  """Another process holds the work directory's lock."""


_HELD: dict[str, list] = {}  # real path of the lock file -> [open file, depth]: re-entrant in one process


class WorkdirLock:
  """`with WorkdirLock(workdir, "training"):` - the exclusive lock of one work directory (module doc).

  Re-entrant within one process (training takes it, then the evaluation at its end takes it again).
  A second process gets `LockedError` at once, naming the holder's PID and host.
  """

  def __init__(self, workdir: str, what: str):
    self.path = os.path.realpath(os.path.join(workdir, LOCK_FILE))
    self.workdir, self.what = workdir, what

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()

  def acquire(self) -> "WorkdirLock":
    """Takes the lock (LockedError if another process holds it); a CLI may hold it until it exits."""
    held = _HELD.get(self.path)
    if held:
      held[1] += 1
      return self
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    f = open(self.path, "a+")
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EAGAIN, errno.EACCES):
        f.close()
        raise
      f.seek(0)
      holder = _describe(f.read())
      f.close()
      raise LockedError(f"{self.workdir} is in use by {holder}: one run per work directory; wait for it to end "
                        f"(or stop it), or use another --workdir") from None
    f.seek(0)
    f.truncate()
    f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "what": self.what,
                        "command": " ".join(sys.argv)[:500], "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
    f.flush()
    _HELD[self.path] = [f, 1]
    return self

  def release(self) -> None:
    held = _HELD[self.path]
    held[1] -= 1
    if held[1] == 0:
      del _HELD[self.path]
      held[0].close()  # closing releases the lock; the file stays (removing it would race a new holder)


def _describe(text: str) -> str:
  try:
    h = json.loads(text)
    return f"{h['what']} (PID {h['pid']} on host {h['host']}, since {h['since']}: {h['command']})"
  except (ValueError, KeyError, TypeError):
    return "another process (it has not written its PID yet)"
