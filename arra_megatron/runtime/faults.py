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


def install_megatron_fail_point() -> None:
    """``ARRA_FAIL_AT=ITERATION:RANK``: megatron.training's loop SIGKILLs that rank once ITERATION
    iterations are done (their checkpoint, if one was due, written), as a crashed node would."""
    spec = os.environ.get("ARRA_FAIL_AT")
    if not spec:
        return
    import functools

    import megatron.training.training as training

    iteration, rank = (int(x) for x in spec.split(":"))
    original = training.train_step

    @functools.wraps(original)
    def train_step(*args, **kwargs):
        if kwargs.get("iteration") == iteration and int(os.environ.get("RANK", "0")) == rank:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    training.train_step = train_step
