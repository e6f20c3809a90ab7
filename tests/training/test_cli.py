"""The real CLI under torchrun with 1, 2 and 4 gloo processes (CPU mode).

BASE's vocabulary (300 ids) pads to 384 rows at TP1 and 512 at TP2 (Megatron-LM's rule,
make-vocab-size-divisible-by 128 x TP): the layout comparison reshards across paddings.
Dropout is off where layouts are compared (dropout masks depend on the TP rank's generator)
and on, at Megatron's default 0.1, where a resumed run is compared with an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from arra_megatron.runtime.launch import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "examples", "pretrain_arra.py")
BASE = (
    "--num-layers 4 --hidden-size 64 --num-attention-heads 4 --group-query-attention --num-query-groups 2 "
    "--seq-length 32 --micro-batch-size 2 --global-batch-size 8 --lr 1e-3 --lr-warmup-iters 2 --lr-decay-iters 8 "
    "--lr-decay-style cosine --mock-data --vocab-size 300 --arra-target-dim 16 --log-interval 1 "
    "--hidden-dropout 0 --attention-dropout 0 --eval-interval 1000 --position-embedding-type rope "
    "--normalization RMSNorm --swiglu --disable-bias-linear --untie-embeddings-and-output-weights"
).split()


def torchrun(nproc: int, *flags: str, env: dict | None = None, timeout: float = 300,
             drop_mock: bool = False) -> subprocess.CompletedProcess:
    """examples/pretrain_arra.py under torchrun with BASE + ``flags`` (later flags win);
    ``drop_mock`` leaves out BASE's --mock-data for runs that read a dataset."""
    base = [a for a in BASE if not (drop_mock and a == "--mock-data")]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", SCRIPT, *base, *flags]
    run_env = {**os.environ, "ARRA_CPU_MODE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=run_env, cwd=ROOT)


def records(path) -> dict:
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    return {r["iteration"]: r for r in rows if r.get("split") != "valid"}


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.fixture(scope="module")
def start_ckpt(tmp_path_factory):
    """Two iterations at TP1/PP1, saved: the common starting point of the layout comparison."""
    root = tmp_path_factory.mktemp("start")
    ok(torchrun(1, "--train-iters", "2", "--save", str(root / "ckpt"), "--log-json", str(root / "log.jsonl")))
    return root / "ckpt"


@pytest.mark.parametrize("nproc, layout", [
    (1, []),
    (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    (4, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]),
])
def test_loss_curve_is_layout_invariant(start_ckpt, tmp_path, nproc, layout, request):
    log = tmp_path / "log.jsonl"
    proc = ok(torchrun(nproc, "--train-iters", "6", "--load", str(start_ckpt), "--log-json", str(log), *layout))
    assert "lm loss:" in proc.stdout + proc.stderr and "gva loss:" in proc.stdout + proc.stderr
    curve = records(log)
    assert sorted(curve) == [3, 4, 5, 6]
    for r in curve.values():
        assert {"iteration", "consumed_samples", "lm_loss", "gva_loss", "gva_cos", "grad_norm", "lr"} <= set(r)
    assert curve[3]["consumed_samples"] == 24
    cache = request.config.cache
    reference = cache.get("arra/tp1_curve", None) if nproc > 1 else None
    if nproc == 1:
        cache.set("arra/tp1_curve", {str(k): v for k, v in curve.items()})
        return
    assert reference is not None, "run the TP1 case first"
    for it, r in curve.items():
        ref = reference[str(it)]
        for key in ("lm_loss", "gva_loss", "gva_cos", "grad_norm"):
            assert r[key] == pytest.approx(ref[key], rel=1e-5), f"iteration {it}: {key}"


@pytest.mark.parametrize("layout", [["--pipeline-model-parallel-size", "2"],
                                    ["--tensor-model-parallel-size", "2", "--sequence-parallel"]],
                         ids=["PP2", "TP2+SP"])
def test_kill_resume_and_incomplete_checkpoint(tmp_path, layout):
    """Kill rank 0 after the iteration-4 checkpoint: the job exits non-zero promptly; a
    half-written newer checkpoint is ignored with a warning; resuming reproduces the
    uninterrupted run's losses exactly, with dropout on (a loader built on resume, or for an
    evaluation between the checkpoint and the kill, used to draw from dropout's generator:
    lm loss 5.5575 vs 5.5624 at iteration 5)."""
    flags = [*layout, "--train-iters", "8", "--save-interval", "4",
           "--hidden-dropout", "0.1", "--attention-dropout", "0.1", "--eval-interval", "3", "--eval-iters", "1"]
    full = tmp_path / "full"
    ok(torchrun(2, *flags, "--save", str(full), "--log-json", str(full / "log.jsonl")))

    crashed = tmp_path / "crashed"
    start = time.perf_counter()
    proc = torchrun(2, *flags, "--save", str(crashed), "--log-json", str(tmp_path / "crashed.jsonl"),
                    env={"ARRA_FAIL_AT": "5:0"})
    assert proc.returncode != 0
    assert time.perf_counter() - start < 240
    assert sorted(records(tmp_path / "crashed.jsonl")) == [1, 2, 3, 4, 5]

    (crashed / "iter_0000006").mkdir()  # a save that never finished
    (crashed / "iter_0000006" / "metadata.json").write_text("{")
    log = tmp_path / "resumed.jsonl"
    proc = ok(torchrun(2, *flags, "--load", str(crashed), "--save", str(crashed), "--log-json", str(log)))
    assert "ignoring incomplete checkpoint" in proc.stdout + proc.stderr
    resumed, reference = records(log), records(full / "log.jsonl")
    assert sorted(resumed) == [5, 6, 7, 8]
    for it, r in resumed.items():
        for key in ("lm_loss", "gva_loss", "grad_norm", "lr"):
            assert r[key] == reference[it][key], f"iteration {it}: {key}"


def test_finetune_from_a_plain_gpt_checkpoint(tmp_path):
    """A checkpoint without the projector (a --no-arra run, an imported HF model) fine-tunes with
    ARRA: weights load, the projector starts fresh, iteration and optimizer start over."""
    ok(torchrun(1, "--no-arra", "--train-iters", "2", "--save", str(tmp_path / "plain")))
    log = tmp_path / "ft.jsonl"
    proc = ok(torchrun(2, "--tensor-model-parallel-size", "2", "--train-iters", "3", "--load",
                       str(tmp_path / "plain"), "--finetune", "--log-json", str(log)))
    assert "has no ARRA projector" in proc.stdout + proc.stderr
    curve = records(log)
    assert sorted(curve) == [1, 2, 3] and curve[1]["consumed_samples"] == 8
    assert all(r["gva_loss"] > 0 for r in curve.values())
