"""Small file helpers shared by the dataset builder and checkpointing."""

from __future__ import annotations

import json
import os
import socket
import uuid
from pathlib import Path
from typing import Any


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write then rename: a reader (a resumed build, a resumed run) never sees a half-written file.
    The temporary name is unique across processes and hosts (processes on other nodes may share a pid)."""
    tmp = f"{path}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: str | Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True))


def check_json_plan(path: str | Path, plan: Any, refusal: str, write: bool = True) -> None:
    """The settings of a resumable job, kept in ``path``: when the file exists it must equal ``plan``
    (else ValueError: ``refusal`` with the changed keys appended), when it does not it is written
    (``write``; one process of many writes it, the others only compare)."""
    plan = json.loads(json.dumps(plan))  # the form it has after a JSON round trip
    path = Path(path)
    if path.is_file():
        previous = json.loads(path.read_text(encoding="utf-8"))
        if previous != plan:
            changed = sorted(k for k in set(plan) | set(previous) if plan.get(k) != previous.get(k))
            raise ValueError(f"{refusal} (changed: {changed})")
    elif write:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, plan)
