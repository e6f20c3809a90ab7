"""The real entry point (examples/pretrain_arra.py, Megatron-LM's loop) under torchrun with 2 gloo
processes (CPU mode): a crashed run resumes exactly.

Dropout is on, at Megatron's default 0.1, where the resumed run is compared with an
uninterrupted one: the dropout generators must come back from the checkpoint too.
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from tests.training import test_megatron_loop
from tests.training.test_megatron_loop import ROOT, loop

SCRIPT = (os.path.join(ROOT, "examples", "pretrain_arra.py"),)


# The launch helpers tests/gpu/test_gpu_cli.py uses.
def torchrun(nproc: int, *flags: str, env: dict | None = None, timeout: float = 600,
             drop_mock: bool = False) -> subprocess.CompletedProcess:
    """examples/pretrain_arra.py under torchrun with test_megatron_loop.TINY + ``flags`` (later flags
    win); ``drop_mock``: a run on a dataset (no --mock-data, the dataset's vocabulary and D)."""
    drop = ("--mock-data", "--vocab-size", "--arra-target-dim") if drop_mock else ()
    return loop(nproc, *flags, env=env, timeout=timeout, drop=drop, check=False, entry=SCRIPT)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def records(path) -> dict:
    """The training records of a --log-json file, by iteration."""
    return test_megatron_loop.records(path)[0]


@pytest.mark.parametrize("layout", [["--pipeline-model-parallel-size", "2"],
                                    ["--tensor-model-parallel-size", "2", "--sequence-parallel"]],
                         ids=["PP2-k-ends-stage", "TP2+SP"])
def test_kill_resume_and_incomplete_checkpoint(tmp_path, layout):
    """Rank 0 killed (SIGKILL, ARRA_FAIL_AT) after 5 iterations, 2 after the iteration-3 checkpoint
    and 1 after an evaluation: the job exits non-zero promptly; a half-written newer checkpoint
    is ignored with a warning; resuming reproduces the uninterrupted run exactly: losses, grad
    norm, learning rate, samples and the evaluation (an evaluation between the checkpoint and
    the kill, or the data loaders built on resume, used to draw from dropout's generator). With
    PP2, layer k = 2 ends the first stage: L_GVA is computed away from the loss's stage."""
    flags = [*layout, "--train-iters", "6", "--save-interval", "3", "--eval-interval", "2",
             "--hidden-dropout", "0.1", "--attention-dropout", "0.1"]
    full = tmp_path / "full"
    ok(torchrun(2, *flags, "--save", str(full), "--log-json", str(tmp_path / "full.jsonl")))

    crashed = tmp_path / "crashed"
    start = time.perf_counter()
    proc = torchrun(2, *flags, "--save", str(crashed), "--log-json", str(tmp_path / "crashed.jsonl"),
                    env={"ARRA_FAIL_AT": "5:0"})
    assert proc.returncode != 0
    assert time.perf_counter() - start < 240, "the job did not stop when a rank died"
    assert sorted(records(tmp_path / "crashed.jsonl")) == [1, 2, 3, 4, 5]
    assert (crashed / "latest_checkpointed_iteration.txt").read_text().strip() == "3"

    (crashed / "iter_0000005").mkdir()  # a save that never finished: no tracker update
    (crashed / "iter_0000005" / "metadata.json").write_text("{")
    log = tmp_path / "resumed.jsonl"
    proc = ok(torchrun(2, *flags, "--load", str(crashed), "--save", str(crashed), "--log-json", str(log)))
    assert "ignoring incomplete checkpoint" in proc.stdout + proc.stderr and "iter_0000005" in proc.stdout
    resumed, resumed_valid = test_megatron_loop.records(log)
    reference, reference_valid = test_megatron_loop.records(tmp_path / "full.jsonl")
    assert sorted(reference) == [1, 2, 3, 4, 5, 6] and sorted(resumed) == [4, 5, 6]
    assert reference[1]["lm_loss"] > 4.0 and 0.5 < reference[1]["gva_loss"] < 1.5  # a real step was taken
    keys = ("lm_loss", "gva_loss", "gva_cos", "grad_norm", "lr", "consumed_samples")
    for it, r in resumed.items():
        assert {k: r[k] for k in keys} == {k: reference[it][k] for k in keys}, f"iteration {it}"
    assert sorted(reference_valid) == [2, 4, 6] and sorted(resumed_valid) == [4, 6]
    for it in (4, 6):
        assert resumed_valid[it] == reference_valid[it], f"evaluation at iteration {it}"
