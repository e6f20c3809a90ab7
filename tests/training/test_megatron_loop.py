"""ARRA through Megatron-LM's own loop (training/megatron_loop.py) under torchrun, CPU mode.

The settings users run: Megatron's default dropout (0.1) where a resumed run is compared
with an uninterrupted one, and a vocabulary of 300 ids, which pads to 384 rows at TP1 and
512 at TP2 (--make-vocab-size-divisible-by 128), where two layouts are compared.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from arra_megatron.runtime.launch import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = (
    "--num-layers 4 --hidden-size 64 --num-attention-heads 4 --group-query-attention --num-query-groups 2 "
    "--seq-length 32 --max-position-embeddings 32 --micro-batch-size 2 --global-batch-size 8 "
    "--lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine --lr-warmup-iters 1 --lr-decay-iters 6 --weight-decay 0.01 --clip-grad 1.0 "
    "--vocab-size 300 --make-vocab-size-divisible-by 128 --position-embedding-type rope --normalization RMSNorm "
    "--swiglu --disable-bias-linear --untie-embeddings-and-output-weights --mock-data --seed 1234 "
    "--distributed-backend gloo --transformer-impl local --no-gradient-accumulation-fusion "
    "--no-bias-swiglu-fusion --no-bias-dropout-fusion --no-rope-fusion --no-masked-softmax-fusion "
    "--no-persist-layer-norm --log-interval 1 --eval-interval 3 --eval-iters 1 --num-workers 0 "
    "--arra-align-layer 2 --arra-target-dim 16"
).split()


def loop(nproc: int, *flags: str, timeout: float = 600, drop=()) -> subprocess.CompletedProcess:
    """The loop under torchrun with TINY + ``flags`` (later flags win); ``drop``: TINY's flags to
    leave out (with their value, if any)."""
    tiny = []
    for i, arg in enumerate(TINY):
        if arg in drop or (i and TINY[i - 1] in drop and not arg.startswith("--")):
            continue
        tiny.append(arg)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", "-m", "arra_megatron.training.megatron_loop", *tiny, *flags]
    env = {**os.environ, "ARRA_CPU_MODE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


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
                                "--no-arra", "--log-json"}
    assert wanted <= shown, sorted(wanted - shown)


@pytest.mark.parametrize("nproc, layout", [
    (2, ["--pipeline-model-parallel-size", "2"]),  # layer 2 ends stage 1 (not the last)
    (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
], ids=["pp2-k-ends-stage", "tp2-sp"])
def test_resume_is_exact_with_dropout(tmp_path, nproc, layout):
    """Stopped after iteration 3 and resumed = uninterrupted, with dropout 0.1 (Megatron's default)."""
    common = ["--train-iters", "6", "--save-interval", "3", "--hidden-dropout", "0.1", "--attention-dropout", "0.1",
              *layout]
    loop(nproc, *common, "--save", str(tmp_path / "full"), "--log-json", str(tmp_path / "full.jsonl"))
    loop(nproc, *common, "--save", str(tmp_path / "res"), "--exit-interval", "3",
         "--log-json", str(tmp_path / "res.jsonl"))
    loop(nproc, *common, "--save", str(tmp_path / "res"), "--load", str(tmp_path / "res"),
         "--log-json", str(tmp_path / "res.jsonl"))
    full, full_valid = records(tmp_path / "full.jsonl")
    resumed, resumed_valid = records(tmp_path / "res.jsonl")
    assert sorted(full) == sorted(resumed) == [1, 2, 3, 4, 5, 6]
    assert full[1]["lm_loss"] > 4.0 and 0.5 < full[1]["gva_loss"] < 1.5  # a real step was taken
    keys = ("lm_loss", "gva_loss", "gva_cos", "grad_norm", "lr", "consumed_samples")
    for it in range(1, 7):
        assert {k: resumed[it][k] for k in keys} == {k: full[it][k] for k in keys}, it
    assert sorted(full_valid) == [3, 6]
    assert resumed_valid[6] == full_valid[6]


def test_vocabulary_padding_does_not_change_the_loss(tmp_path):
    """One TP1 checkpoint continued at TP1 (384 vocabulary rows) and at TP2 (512 rows): the same
    losses (before the mask, TP2 was log(512/384) = 0.29 higher at every iteration)."""
    no_dropout = ["--hidden-dropout", "0", "--attention-dropout", "0"]
    loop(1, *no_dropout, "--train-iters", "3", "--exit-interval", "1", "--save", str(tmp_path / "start"),
         "--save-interval", "1")
    curves = {}
    for tp in (1, 2):
        log = tmp_path / f"tp{tp}.jsonl"
        loop(tp, *no_dropout, "--train-iters", "3", "--load", str(tmp_path / "start"), "--no-load-rng",
             "--tensor-model-parallel-size", str(tp), "--eval-interval", "100", "--log-json", str(log))
        curves[tp] = records(log)[0]
    assert sorted(curves[1]) == sorted(curves[2]) == [2, 3]
    for it in (2, 3):
        for key in ("lm_loss", "gva_loss"):
            assert curves[2][it][key] == pytest.approx(curves[1][it][key], rel=1e-5), (it, key)
