"""A checkpoint of the project's own trainer (before Megatron-LM's loop) converted by
``conversion/legacy.py`` and resumed through ``training/megatron_loop.py``, CPU mode.

The fixture (data/legacy_trainer, see its README) stopped after iteration 2 of 3; ``full.jsonl``
is the old trainer's uninterrupted run. Its flags are old flag names; a resume in Megatron-LM's
loop also needs ``--max-position-embeddings`` (required there) and ``--ffn-hidden-size 128``
(the old trainer's 4 x hidden; Megatron-LM derives 64 for this size with --swiglu).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch

from arra_megatron.conversion.common import ConversionError
from arra_megatron.conversion.legacy import LegacyCheckpoint, convert_legacy, legacy_vocab_size, loop_flags
from arra_megatron.runtime.launch import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURE = os.path.join(ROOT, "tests", "training", "data", "legacy_trainer")
OLD_ITERATION = os.path.join(FIXTURE, "ckpt", "iter_0000002")
ENV = {**os.environ, "ARRA_CPU_MODE": "1", "OMP_NUM_THREADS": "1"}


def fixture_flags() -> list:
    with open(os.path.join(FIXTURE, "flags.txt")) as f:
        return f.read().split() + ["--max-position-embeddings", "16"]


def old_records() -> dict:
    with open(os.path.join(FIXTURE, "full.jsonl")) as f:
        return {r["iteration"]: r for r in map(json.loads, f)}


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> str:
    save = str(tmp_path_factory.mktemp("legacy") / "converted")
    proc = subprocess.run([sys.executable, "-m", "arra_megatron.conversion.legacy", "--load",
                           os.path.join(FIXTURE, "ckpt"), "--save", save], capture_output=True, text=True,
                          timeout=300, env=ENV, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "RNG states are not carried over" in proc.stderr
    assert "--ffn-hidden-size 128 --max-position-embeddings 16" in proc.stderr  # what a resume must add
    return save


@contextlib.contextmanager
def world_of_one():
    """Dist checkpointing reads through torch.distributed."""
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def test_model_projector_optimizer_and_schedule_carried_exactly(converted):
    from megatron.core import dist_checkpointing

    new_iteration = os.path.join(converted, "iter_0000002")
    with open(os.path.join(converted, "latest_checkpointed_iteration.txt")) as f:
        assert f.read().strip() == "2"
    with world_of_one():
        old_keys = set(dist_checkpointing.load_tensors_metadata(OLD_ITERATION))
        assert set(dist_checkpointing.load_tensors_metadata(new_iteration)) == old_keys
        old, new = (dist_checkpointing.load_plain_tensors(p) for p in (OLD_ITERATION, new_iteration))
    assert any(k.startswith("arra_projector.") for k in old_keys)
    assert any(k.startswith("optimizer.state.exp_avg_sq.") for k in old_keys)
    for key in sorted(old_keys):  # model, projector and Adam moments
        assert torch.equal(new[key], old[key]), key
    assert new["iteration"] == 2 and new["args"].consumed_train_samples == 8
    assert new["opt_param_scheduler"] == old["opt_param_scheduler"]
    assert torch.equal(new["optimizer"]["state"]["common_step"], old["optimizer"]["state"]["common_step"])
    assert new["optimizer"]["param_groups"] == old["optimizer"]["param_groups"]


def test_resumed_in_megatron_loop_continues_the_old_run(converted, tmp_path):
    log = tmp_path / "resumed.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "arra_megatron.training.megatron_loop", *fixture_flags(),
           "--ffn-hidden-size", "128", "--eval-iters", "0", "--load", converted, "--log-json", str(log)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    with open(log) as f:
        resumed = {r["iteration"]: r for r in map(json.loads, f)}
    assert sorted(resumed) == [3]
    assert resumed[3]["consumed_samples"] == 12  # 8 consumed before the step + the global batch of 4
    old = old_records()[3]
    # The old trainer logged float64 sums, Megatron-LM's loop float32 values: these agree to the last
    # float32 bit on this machine; 1e-6 leaves room for another CPU's kernels.
    for key in ("lm_loss", "gva_loss", "gva_cos", "grad_norm", "lr"):
        assert resumed[3][key] == pytest.approx(old[key], rel=1e-6, abs=1e-7), key


def test_loop_refuses_an_unconverted_checkpoint():
    proc = subprocess.run([sys.executable, "-m", "arra_megatron.training.megatron_loop", *fixture_flags(),
                           "--load", os.path.join(FIXTURE, "ckpt")], capture_output=True, text=True, timeout=300,
                          env=ENV, cwd=ROOT)
    assert proc.returncode != 0
    assert "convert it once with: python tools/convert_checkpoint.py legacy --load" in proc.stderr, proc.stderr[-3000:]


def test_a_target_holding_a_checkpoint_is_refused(tmp_path):
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("5")
    with pytest.raises(ConversionError, match="already holds a checkpoint"):
        convert_legacy(os.path.join(FIXTURE, "ckpt"), str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "arra_megatron.conversion.legacy", "--load",
                           os.path.join(FIXTURE, "ckpt"), "--save", str(tmp_path)], capture_output=True, text=True,
                          timeout=300, env=ENV, cwd=ROOT)
    assert proc.returncode == 2 and "already holds a checkpoint" in proc.stderr, proc.stderr[-3000:]
    assert sorted(os.listdir(tmp_path)) == ["latest_checkpointed_iteration.txt"]


def test_vocabulary_size_from_the_checkpoint_the_datasets_or_the_flag(tmp_path):
    assert legacy_vocab_size({"vocab_size": 200}) == 200
    assert legacy_vocab_size({"vocab_size": 200}, vocab_size=300) == 300
    with pytest.raises(ConversionError, match="--vocab-size"):
        legacy_vocab_size({"data_path": [str(tmp_path / "gone")]})
    with pytest.raises(ConversionError, match="--vocab-size"):
        legacy_vocab_size({})


def test_old_settings_become_megatron_loop_flags():
    from arra_megatron.training.megatron_loop import build_parser

    old = LegacyCheckpoint("unused", 2, 8, {"tp": 2, "pp": 1, "dp": 1, "vpp": None}, {
        "z_loss_weight": 1e-5, "loss_on_text": True, "swiglu": True, "disable_bias_linear": True, "bf16": False,
        "arra": False, "seq_length": 16, "distributed_timeout_minutes": 10.0, "eval_interval": 1000.0,
        "make_vocab_size_divisible_by": 128, "tensor_model_parallel_size": 2, "sequence_parallel": True,
        "data_path": ["/data/x"], "num_microbatches": 2, "kv_channels": None, "no_such_flag_anywhere": 1,
    })
    argv = loop_flags(old, 300, build_parser())

    def value(flag):
        assert argv.count(flag) == 1, (flag, argv)
        return argv[argv.index(flag) + 1]

    assert value("--arra-z-loss-weight") == "1e-05" and value("--eval-interval") == "1000"
    assert value("--vocab-size") == "300" and value("--tensor-model-parallel-size") == "1"
    assert value("--make-vocab-size-divisible-by") == "256"  # the rows of TP2 x 128, rebuilt at TP1
    assert {"--arra-loss-on-text", "--swiglu", "--disable-bias-linear", "--no-arra", "--mock-data"} <= set(argv)
    for absent in ("--z-loss-weight", "--loss-on-text", "--bf16", "--sequence-parallel", "--data-path",
                   "--kv-channels", "--distributed-timeout-minutes", "--no-such-flag-anywhere"):
        assert absent not in argv, (absent, argv)
