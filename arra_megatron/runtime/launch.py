"""Run a function on N local processes as a torchrun job would (gloo, CPU mode): used by the
checkpoint converter, the tests and the benchmarks."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import traceback
from typing import Any, Callable, List


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _child(fn, rank, world_size, port, args, results, env):
    os.environ.update(env)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    try:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        out = fn(*args)
        # Plain pickle: torch's multiprocessing pickler would pass tensors through shared
        # memory that disappears when this process exits.
        results.put((rank, True, pickle.dumps(out)))
    except BaseException:  # report any failure, including SystemExit, to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass


def run_workers(fn: Callable[..., Any], world_size: int, *args, timeout: float = 300.0,
                env: dict | None = None) -> List[Any]:
    """Call ``fn(*args)`` on ``world_size`` spawned processes; return the results by rank.

    Each process gets torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...)
    and ``ARRA_CPU_MODE=1``. A failure or a process dying on any rank fails the
    whole run with that rank's traceback; no rank is left running.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    child_env = {"ARRA_CPU_MODE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    procs = [ctx.Process(target=_child, args=(fn, r, world_size, port, args, results, child_env))
             for r in range(world_size)]
    for p in procs:
        p.start()
    out: dict = {}
    try:
        while len(out) < world_size:
            try:
                rank, ok, value = results.get(timeout=timeout)
            except queue.Empty:
                dead = [i for i, p in enumerate(procs) if not p.is_alive() and i not in out]
                raise TimeoutError(f"no result within {timeout}s (ranks exited without result: {dead})")
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            out[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return [out[r] for r in range(world_size)]
