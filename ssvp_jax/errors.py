"""User errors (a bad flag, config value, file or folder) versus bugs, for the one-line CLI errors.

The command-line entry points print a user error as one line, `error: <what, which flag or file, what
to do>`, and exit with status 2; `--verbose` shows the traceback. Everything else is a bug and keeps
its traceback (ssvp_jax/cli.py: `run`).
"""

from __future__ import annotations

import errno

# A full disk or a read-only file system is the machine's state, not a bug: it gets one line too.
_ENVIRONMENT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)


class UserError(ValueError):
  """A configuration or input error: the message names the flag or file and what to do."""


def is_user_error(e: BaseException) -> bool:
  """Whether `e` is the user's to fix (printed in one line) rather than a bug (traceback).

  User errors: `UserError` and the project's input errors (DatasetError, WeightLoadError, CacheError),
  missing files and folders, a full disk or denied access, and a ValueError whose message names a
  config field (`config.x.y`), as the model builder's and the mesh's checks do.
  """
  # Here, not at the top: cache imports this module (through fileio), and the others would make it heavy.
  from ssvp_jax.cache import CacheError
  from ssvp_jax.data.common import DatasetError
  from ssvp_jax.models.bundle import WeightLoadError
  if isinstance(e, (UserError, DatasetError, WeightLoadError, CacheError, FileNotFoundError, NotADirectoryError,
                    IsADirectoryError, FileExistsError, PermissionError)):
    return True
  if isinstance(e, OSError) and e.errno in _ENVIRONMENT_ERRNOS:
    return True
  return isinstance(e, ValueError) and "config." in str(e)
