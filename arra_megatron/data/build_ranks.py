"""Many processes building one dataset: who they are, and which part each builds.

A build runs as one process, under ``torchrun`` (any number of nodes and processes,
one per GPU), as a SLURM job step (``srun``: one task per GPU) or as a SLURM array
job. It needs no process group: the parts directory on the shared file system is the
only thing the processes share.

- **Who**: ``BuildRank.from_env`` reads torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``,
  else SLURM's array variables, else ``SLURM_PROCID``/``SLURM_NTASKS``; a plain run is
  rank 0 of 1.
- **Which part**: a process claims a part by creating ``part-NNNNN.claim`` with
  ``O_CREAT | O_EXCL`` (one creator wins, also on NFS v3+ and Lustre), builds it, writes
  its marker and drops the claim. Rank r starts looking at part r and steps by the
  world size, then takes any part still unclaimed, so the ranks split the work evenly
  and a fast rank helps a slow one. A second build started on the same prefix (a
  double submit) joins this way instead of racing on the same files.
- **Dead claimers**: a claim holds its owner's host, pid and job; the owner touches it
  every ``HEARTBEAT_SECONDS``. A claim whose owner is a dead process on this host, or
  whose file was not touched for ``stale_after`` seconds, is taken over (renamed away
  first, so only one process takes it). A part's files are written under a temporary
  name and renamed into place, so even two processes that built the same part leave
  one complete copy.
- **The merge** is done once, by the process that finds every part finished and wins
  the ``merge.claim`` (normally the last to finish); a rerun of the same command merges
  when a crash left it undone.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set

logger = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 30.0
STALE_AFTER_SECONDS = 600.0


@dataclass(frozen=True)
class BuildRank:
    """This process's place among the processes building one dataset."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    job: str = ""
    launcher: str = "single process"

    @classmethod
    def from_env(cls, env: Optional[Dict[str, str]] = None) -> "BuildRank":
        env = os.environ if env is None else env
        if "RANK" in env and "WORLD_SIZE" in env:  # torchrun (also a srun that exports them)
            job = f"torchrun:{env.get('MASTER_ADDR', '')}:{env.get('MASTER_PORT', '')}:" \
                  f"{env.get('TORCHELASTIC_RUN_ID', '')}"
            return cls(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), job, "torchrun")
        if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
            first, step = int(env.get("SLURM_ARRAY_TASK_MIN", 0)), int(env.get("SLURM_ARRAY_TASK_STEP", 1))
            count = int(env["SLURM_ARRAY_TASK_COUNT"])
            # --array=0-30:2 numbers tasks 0, 2, ..., 30; a list such as 1,5,7 has no step: any id fits
            rank = (int(env["SLURM_ARRAY_TASK_ID"]) - first) // max(step, 1)
            return cls(rank % count, count, 0, f"slurm-array:{env.get('SLURM_ARRAY_JOB_ID', '')}", "SLURM array")
        # A srun job step (srun sets SLURM_STEP_NUM_TASKS); the batch script itself, also given
        # SLURM_NTASKS, is one process.
        if "SLURM_PROCID" in env and int(env.get("SLURM_STEP_NUM_TASKS", 1)) > 1:
            return cls(int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"]), int(env.get("SLURM_LOCALID", 0)),
                       f"slurm:{env.get('SLURM_JOB_ID', '')}:{env.get('SLURM_STEP_ID', '')}", "srun")
        return cls()

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} is outside a world of {self.world} processes "
                             f"(check the {self.launcher} environment)")

    def visiting_order(self, indices: List[int]) -> List[int]:
        """Part indices in the order this rank tries to claim them: its own share first
        (every world-th, from its rank), then the others' (to help a slow rank)."""
        own = indices[self.rank::self.world]
        taken = set(own)
        return own + [i for i in indices if i not in taken]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class Claims:
    """Exclusive, heart-beaten claims on named pieces of work in ``directory``."""

    def __init__(self, directory: Path, rank: BuildRank, stale_after: float = STALE_AFTER_SECONDS,
                 heartbeat: float = HEARTBEAT_SECONDS) -> None:
        self.directory = Path(directory)
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "job": rank.job, "rank": rank.rank,
                      "id": uuid.uuid4().hex}
        self.stale_after = stale_after
        self.held: Set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(heartbeat,), daemon=True,
                                        name="build-claims-heartbeat")
        self._thread.start()

    def path(self, name: str) -> Path:
        return self.directory / f"{name}.claim"

    def try_claim(self, name: str) -> bool:
        """Claim ``name``; False when a live process holds it."""
        path = self.path(name)
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self._take_over_if_stale(path):
                    return False
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({**self.owner, "claimed": time.time()}, f)
            with self._lock:
                self.held.add(name)
            return True
        return False

    def release(self, name: str) -> None:
        """Drop our claim on ``name`` (a claim another process took over stays)."""
        with self._lock:
            if name not in self.held:
                return
            self.held.discard(name)
        holder = self.holder(name)
        if holder is not None and holder.get("id") == self.owner["id"]:
            try:
                os.remove(self.path(name))
            except FileNotFoundError:
                pass

    def holder(self, name: str) -> Optional[dict]:
        try:
            return json.loads(self.path(name).read_text())
        except (FileNotFoundError, ValueError):
            return None

    def describe(self, name: str) -> str:
        """Who holds ``name`` and how long ago the claim was last touched, for messages."""
        holder = self.holder(name) or {}
        try:
            age = time.time() - self.path(name).stat().st_mtime
        except FileNotFoundError:
            return "nobody"
        return (f"pid {holder.get('pid')} on {holder.get('host')} (rank {holder.get('rank')}), last heartbeat "
                f"{age:.0f} s ago; taken over after {self.stale_after:.0f} s without one")

    def close(self) -> None:
        self._stop.set()
        for name in list(self.held):
            self.release(name)

    def _take_over_if_stale(self, path: Path) -> bool:
        try:
            holder = json.loads(path.read_text())
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return True  # released meanwhile: try again
        except ValueError:  # being written right now, or cut by a crash while written
            holder, age = {}, time.time() - path.stat().st_mtime if path.exists() else 0.0
            if age < 5.0:
                return False
        dead_here = holder.get("host") == self.owner["host"] and not _pid_alive(int(holder.get("pid", -1)))
        if not dead_here and age < self.stale_after:
            return False
        aside = path.with_name(f"{path.name}.stale-{self.owner['id']}")
        try:
            os.rename(path, aside)  # only one process can move it away
        except OSError as error:
            if error.errno == errno.ENOENT:
                return True
            raise
        try:
            moved = json.loads(aside.read_text())
        except ValueError:
            moved = {}
        if holder and moved.get("id") != holder.get("id"):
            # Another process took the stale claim over between our look and our rename: that
            # fresh claim is theirs. Put it back (unless a third process claimed meanwhile).
            try:
                os.link(aside, path)
            except FileExistsError:
                pass
            os.remove(aside)
            return False
        os.remove(aside)
        logger.warning("took over %s from %s (%s)", path.name, holder or "an unreadable claim",
                       "its process is gone" if dead_here else f"no heartbeat for {age:.0f} s")
        return True

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            with self._lock:
                names = list(self.held)
            for name in names:
                try:
                    os.utime(self.path(name))
                except FileNotFoundError:
                    pass

    def __enter__(self) -> "Claims":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def unclaimed(claims: Claims, names: List[str], done: "callable") -> Iterator[str]:
    """Claim and yield each name in turn that is not ``done`` and that no live process holds."""
    for name in names:
        if done(name):
            continue
        if claims.try_claim(name):
            if done(name):  # finished by its previous holder between the check and the claim
                claims.release(name)
                continue
            yield name
