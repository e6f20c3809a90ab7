"""Fault injection for the tests of crash recovery: a process killed as an OOM kill or a lost node would.

``kill_after("ARRA_BUILD_FAIL_AFTER", done, rank)`` with ``ARRA_BUILD_FAIL_AFTER=RANK:N`` (RANK ``*``:
every rank) sends SIGKILL to this process once it has finished N units of work (parts, batches).
Unset, it does nothing.
"""

from __future__ import annotations

import os
import signal


def kill_after(variable: str, done: int, rank: int) -> None:
    spec = os.environ.get(variable)
    if not spec:
        return
    who, count = spec.split(":")
    if (who == "*" or int(who) == rank) and done >= int(count):
        os.kill(os.getpid(), signal.SIGKILL)
