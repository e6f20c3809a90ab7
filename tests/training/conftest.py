"""Megatron-LM's argument parsing in the test process (``megatron_loop.parse_args``).

Megatron reads the world from torchrun's environment (RANK, WORLD_SIZE), asserts
CUDA_DEVICE_MAX_CONNECTIONS=1 at TP > 1 and reads the GPU architecture there: the fixtures
give it what the loop's start-up gives it (``runtime/megatron_training.py``; where the loop
would run in CPU mode, CPU mode's flag defaults and device), for one test at a time, without
switching this process into CPU mode. ``parse_args`` sets none of Megatron's globals, so
tests may call it often.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Callable, List

import pytest
import torch

#: A GPU's architecture as CPU mode reports it (Megatron reads it at TP > 1).
CPU_DEVICE = SimpleNamespace(name="CPU", major=9, minor=0, total_memory=0, multi_processor_count=1)


@pytest.fixture
def parse(monkeypatch) -> Callable[..., object]:
    """``parse(argv, world_size=1)``: the arguments ``megatron_loop.parse_args`` returns for a
    world of ``world_size`` processes (the first rank's view)."""
    from arra_megatron.runtime import cpu_mode
    from arra_megatron.training import megatron_loop

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    if cpu_mode.cpu_mode_requested():  # as main() would run here: CPU_MODE_DEFAULTS, no GPU to ask
        monkeypatch.setattr(cpu_mode, "is_enabled", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: CPU_DEVICE)

    def run(argv: List[str], world_size: int = 1):
        monkeypatch.setenv("WORLD_SIZE", str(world_size))
        return megatron_loop.parse_args(list(argv))[0]

    return run


@pytest.fixture
def rejected(parse, capsys) -> Callable[..., str]:
    """``rejected(argv, world_size=1)``: the message of a command line the project's checks (or
    argparse) refuse before any work: a SystemExit naming the flag, no process group."""

    def run(argv: List[str], world_size: int = 1) -> str:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            parse(argv, world_size)
        assert not torch.distributed.is_initialized(), "no process group may exist when flags are rejected"
        if exc.value.code == 2:  # argparse: the message went to stderr
            err = capsys.readouterr().err
            assert "error:" in err
            return err
        assert isinstance(exc.value.code, str), exc.value.code
        return exc.value.code

    return run
