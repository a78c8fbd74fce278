"""Named moments where tests stop a process, to kill it by PID there (tests/test_reliability.py).

With SSVP_PAUSE_AT=<name> in the environment, the process that reaches `pause_point(name)` writes its
PID to the file SSVP_PAUSE_FILE and sleeps, holding whatever it holds (the work directory's lock, a
half-written folder), until the test kills it. Without the variable a pause point does nothing.
"""

from __future__ import annotations

import os
import time


def pause_point(name: str) -> None:
  if os.environ.get("SSVP_PAUSE_AT") != name:
    return
  path = os.environ["SSVP_PAUSE_FILE"]
  with open(path + ".tmp", "w") as f:
    f.write(str(os.getpid()))
  os.replace(path + ".tmp", path)
  while True:
    time.sleep(1)
