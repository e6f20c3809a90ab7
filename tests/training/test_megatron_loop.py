"""ARRA through Megatron-LM's own loop (training/megatron_loop.py) under torchrun, CPU mode.

The settings users run: a vocabulary of 300 ids, which pads to 384 rows at TP1 and 512 at
TP2 (--make-vocab-size-divisible-by 128), where two layouts are compared (dropout off there:
its masks depend on each TP rank's generator); Megatron's default dropout (0.1) where a
resumed run is compared with an uninterrupted one (test_cli.py). ``loop`` and ``records`` are
the launch helpers of the training tests.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import uuid

import pytest

from arra_megatron.runtime.launch import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = (
    "--num-layers 4 --hidden-size 64 --num-attention-heads 4 --group-query-attention --num-query-groups 2 "
    "--seq-length 32 --max-position-embeddings 32 --micro-batch-size 2 --global-batch-size 8 "
    "--lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine --lr-warmup-iters 1 --lr-decay-iters 6 --weight-decay 0.01 --clip-grad 1.0 "
    "--vocab-size 300 --make-vocab-size-divisible-by 128 --position-embedding-type rope --normalization RMSNorm "
    "--swiglu --disable-bias-linear --untie-embeddings-and-output-weights --mock-data --seed 1234 "
    "--log-interval 1 --eval-interval 3 --eval-iters 1 --num-workers 0 --arra-align-layer 2 --arra-target-dim 16"
).split()  # without a GPU, CPU mode's defaults: gloo, local layers, no fusions
NO_DROPOUT = ["--hidden-dropout", "0", "--attention-dropout", "0"]


def loop(nproc: int, *flags: str, timeout: float = 600, drop=(), env: dict | None = None, check: bool = True,
         entry=("-m", "arra_megatron.training.megatron_loop")) -> subprocess.CompletedProcess:
    """The loop under torchrun with TINY + ``flags`` (later flags win); ``drop``: TINY's flags to
    leave out (with their value, if any); ``entry``: what torchrun starts (the module, or
    ``(path,)`` of a script); ``check``: the run must succeed."""
    tiny = []
    for i, arg in enumerate(TINY):
        if arg in drop or (i and TINY[i - 1] in drop and not arg.startswith("--")):
            continue
        tiny.append(arg)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", *entry, *tiny, *flags]
    marker = uuid.uuid4().hex
    run_env = {**os.environ, "ARRA_CPU_MODE": "1", "OMP_NUM_THREADS": "1", LAUNCH_MARK: marker, **(env or {})}
    # Files, not pipes: a process left behind (below) holds the output open, a pipe would wait for it.
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        run = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=run_env, cwd=ROOT)
        try:
            run.wait(timeout=timeout)
        finally:
            run.kill()
            run.wait()
            end_left_behind(marker)
        out.seek(0)
        err.seek(0)
        proc = subprocess.CompletedProcess(cmd, run.returncode, out.read(), err.read())
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


#: Environment variable that marks the processes of one ``loop`` run (their children inherit it).
LAUNCH_MARK = "ARRA_TEST_LAUNCH"


def end_left_behind(marker: str) -> None:
    """SIGKILL what a run left behind. A rank killed by ARRA_FAIL_AT leaves its multiprocessing
    helpers (the dist-checkpoint writer's Manager server, the resource tracker) running, in the
    dead rank's own session; they carry the run's marker in their environment (Linux /proc)."""
    wanted = f"{LAUNCH_MARK}={marker}".encode()
    try:
        entries = [entry for entry in os.listdir("/proc") if entry.isdigit()]
    except OSError:
        return
    for entry in entries:
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if wanted in f.read().split(b"\0"):
                    os.kill(int(entry), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue


def records(path) -> tuple:
    """(training records by iteration, validation records by iteration) of a --log-json file."""
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    train = {r["iteration"]: r for r in rows if "split" not in r}
    valid = {r["iteration"]: r for r in rows if r.get("split") == "valid"}
    return train, valid


def test_help_lists_megatron_lm_and_arra_flags():
    proc = subprocess.run([sys.executable, "-m", "arra_megatron.training.megatron_loop", "--help"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "ARRA_CPU_MODE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    shown = set(re.findall(r"--[a-z0-9-]+", proc.stdout))
    from megatron.training.arguments import add_megatron_arguments
    import argparse

    parser = add_megatron_arguments(argparse.ArgumentParser(add_help=False))
    fusion_switches = {o for a in parser._actions for o in a.option_strings if re.fullmatch(r"--no-.*-fusion", o)}
    assert len(fusion_switches) >= 5, fusion_switches
    wanted = fusion_switches | {"--manual-gc", "--overlap-param-gather", "--exit-duration-in-mins",
                                "--use-distributed-optimizer", "--async-save", "--calculate-per-token-loss",
                                "--arra-align-layer", "--arra-weight", "--arra-objective", "--arra-target-dim",
                                "--no-arra", "--log-json", "--arra-z-loss-weight", "--arra-condition-dropout-prob",
                                "--arra-loss-on-text"}
    assert wanted <= shown, sorted(wanted - shown)


def test_finetune_from_a_plain_gpt_is_layout_invariant(tmp_path):
    """A --no-arra checkpoint (as an imported Hugging Face model has no projector) fine-tuned with
    ARRA at TP1 (384 vocabulary rows) and at TP2 x PP2 with sequence parallelism (512 rows,
    4 processes): weights load, the projector starts from its initialisation, iteration and
    optimizer start over, and both layouts give the same curve (before the mask, TP2's lm loss
    was log(512/384) = 0.29 higher at every iteration)."""
    loop(1, *NO_DROPOUT, "--no-arra", "--train-iters", "2", "--save", str(tmp_path / "plain"),
         "--save-interval", "2", "--eval-interval", "100")
    curves = {}
    for name, nproc, layout in (("tp1", 1, []), ("tp2pp2", 4, ["--tensor-model-parallel-size", "2",
                                                               "--pipeline-model-parallel-size", "2",
                                                               "--sequence-parallel"])):
        log = tmp_path / f"{name}.jsonl"
        proc = loop(nproc, *NO_DROPOUT, *layout, "--train-iters", "3", "--load", str(tmp_path / "plain"),
                    "--finetune", "--eval-interval", "100", "--log-json", str(log))
        assert "has no ARRA projector: it starts from its initialisation" in proc.stdout + proc.stderr
        curves[name] = records(log)[0]
    tp1, tp2pp2 = curves["tp1"], curves["tp2pp2"]
    assert sorted(tp1) == sorted(tp2pp2) == [1, 2, 3]
    assert tp1[1]["consumed_samples"] == 8  # fine-tuning starts over
    assert 4.0 < tp1[1]["lm_loss"] < 7.0 and 0.5 < tp1[1]["gva_loss"] < 1.5  # trained LM, fresh projector
    for it in (1, 2, 3):
        for key in ("lm_loss", "gva_loss", "gva_cos", "grad_norm"):
            assert tp2pp2[it][key] == pytest.approx(tp1[it][key], rel=1e-5), (it, key)
        assert tp2pp2[it]["consumed_samples"] == tp1[it]["consumed_samples"]
