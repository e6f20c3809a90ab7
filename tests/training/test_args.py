"""Bad flags fail in ``parse_args``, before any process group, with a message naming the flag."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from arra_megatron.runtime.capabilities import has_transformer_engine
from arra_megatron.training.arguments import parse_args

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BASE = (
    "--num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
    "--micro-batch-size 2 --global-batch-size 8 --train-iters 10 --lr 1e-3 --mock-data --vocab-size 256"
).split()


def replace(argv, flag, value):
    """``argv`` with ``flag``'s value replaced (or the flag appended)."""
    argv = list(argv)
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    return argv


def fails(capsys, argv, world_size=1) -> str:
    """Run parse_args, expect exit status 2, return the error message (stderr)."""
    with pytest.raises(SystemExit) as exc:
        parse_args(argv, world_size=world_size)
    assert exc.value.code == 2
    assert not torch.distributed.is_initialized(), "no process group may exist when flags are rejected"
    err = capsys.readouterr().err
    assert "error:" in err
    return err


def test_base_flags_are_valid():
    args = parse_args(BASE, world_size=1)
    assert args.num_microbatches == 4 and args.data_parallel_size == 1


def test_global_batch_not_divisible_by_micro_batch_times_dp(capsys):
    # world 4 -> DP 4: 2 x 4 = 8 does not divide 12
    err = fails(capsys, replace(BASE, "--global-batch-size", "12"), world_size=4)
    assert "--global-batch-size 12" in err and "--micro-batch-size 2" in err and "data-parallel size 4" in err
    # the same batch is fine on one rank (6 micro-batches)
    assert parse_args(replace(BASE, "--global-batch-size", "12"), world_size=1).num_microbatches == 6


def test_world_size_not_divisible_by_model_parallel(capsys):
    err = fails(capsys, BASE + ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"],
                world_size=6)
    assert "--tensor-model-parallel-size" in err and "--pipeline-model-parallel-size" in err


def test_align_layer_beyond_num_layers(capsys):
    err = fails(capsys, BASE + ["--arra-align-layer", "5"])
    assert "--arra-align-layer 5" in err and "--num-layers 4" in err


def test_align_layer_below_one(capsys):
    err = fails(capsys, BASE + ["--arra-align-layer", "0"])
    assert "--arra-align-layer" in err and "got 0" in err


def test_align_layer_is_not_checked_without_arra():
    args = parse_args(BASE + ["--arra-align-layer", "9", "--no-arra"], world_size=1)
    assert not args.arra


def test_missing_data_path(capsys, tmp_path):
    argv = [a for a in BASE if a not in ("--mock-data",)]
    missing = str(tmp_path / "nowhere" / "dataset")
    err = fails(capsys, argv + ["--data-path", missing])
    assert f"--data-path {missing}" in err and ".bin" in err


def test_data_path_and_mock_data_are_exclusive(capsys, tmp_path):
    err = fails(capsys, BASE + ["--data-path", str(tmp_path / "x")])
    assert "--data-path" in err and "--mock-data" in err


def test_unknown_flag(capsys):
    err = fails(capsys, BASE + ["--num-layer", "4"])  # a typo of --num-layers: no abbreviations either
    assert "unrecognized arguments: --num-layer" in err


def test_unknown_yaml_key(capsys, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("num-layers: 4\nlearning-rate: 1.0e-3\n")
    err = fails(capsys, BASE + ["--config", str(config)])
    assert "--config" in err and str(config) in err and "'learning-rate'" in err


def test_yaml_choice_is_checked(capsys, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("lr-decay-style: cosin\n")
    err = fails(capsys, BASE + ["--config", str(config)])
    assert "--lr-decay-style" in err and "cosin" in err


def test_missing_config_file(capsys, tmp_path):
    err = fails(capsys, BASE + ["--config", str(tmp_path / "absent.yaml")])
    assert "--config" in err and "absent.yaml" in err


def test_command_line_overrides_yaml(tmp_path):
    config = tmp_path / "run.yaml"
    # dashes or underscores inside keys; the YAML fills what the command line leaves out
    config.write_text("num-layers: 8\nhidden_size: 128\nlr: 5.0e-4\nlr-decay-style: cosine\nbf16: true\n"
                      "arra-align-layer: 2\nz_loss_weight: 1.0e-5\n")
    argv = replace(replace(BASE, "--num-layers", "6"), "--lr", "2e-4")
    argv = [a for a in argv if a not in ("--hidden-size", "64")]
    args = parse_args(["--config", str(config), *argv], world_size=1)
    assert args.num_layers == 6 and args.lr == 2e-4  # command line wins
    assert args.hidden_size == 128 and args.lr_decay_style == "cosine" and args.bf16  # from the YAML
    assert args.arra_align_layer == 2 and args.z_loss_weight == 1e-5


def test_yaml_values_are_validated_like_flags(capsys, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("arra-align-layer: 7\n")
    err = fails(capsys, BASE + ["--config", str(config)])
    assert "--arra-align-layer 7" in err


def test_bf16_and_fp16_are_exclusive(capsys):
    err = fails(capsys, BASE + ["--bf16", "--fp16"])
    assert "--bf16" in err and "--fp16" in err


@pytest.mark.skipif(has_transformer_engine(), reason="this machine can run FP8 (GPU and Transformer Engine)")
def test_fp8_without_gpu_or_transformer_engine(capsys):
    err = fails(capsys, BASE + ["--fp8-format", "hybrid"])
    assert "--fp8-format" in err
    assert "CUDA GPU" in err or "Transformer Engine" in err  # says why
    assert "bf16" in err  # and what to do instead


@pytest.mark.skipif(has_transformer_engine(), reason="this machine has Transformer Engine and a GPU")
def test_transformer_engine_layers_without_transformer_engine(capsys):
    err = fails(capsys, BASE + ["--transformer-impl", "transformer_engine"])
    assert "--transformer-impl local" in err


def test_fp8_needs_the_transformer_engine_layers(capsys):
    err = fails(capsys, BASE + ["--fp8-format", "e4m3", "--transformer-impl", "local"])
    assert "--fp8-format" in err and "--transformer-impl local" in err


@pytest.mark.parametrize("layout, words", [
    # 8 layers over PP2 = 4 per stage: 3 layers per virtual stage does not divide it
    (["--num-layers", "8", "--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "3"],
     ["--num-layers-per-virtual-pipeline-stage", "4 layers"]),
    # virtual stages without pipeline parallelism
    (["--num-layers-per-virtual-pipeline-stage", "2"], ["--num-layers-per-virtual-pipeline-stage",
                                                        "--pipeline-model-parallel-size"]),
    # interleaving needs the micro-batch count (8 / (2 x 1) / ... = 3 here) divisible by PP
    (["--num-layers", "8", "--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "2",
      "--global-batch-size", "6"], ["--pipeline-model-parallel-size 2", "--global-batch-size"]),
])
def test_virtual_pipeline_that_does_not_divide(capsys, layout, words):
    argv = BASE
    for flag, value in zip(layout[0::2], layout[1::2]):
        argv = replace(argv, flag, value)
    err = fails(capsys, argv, world_size=2 if "--pipeline-model-parallel-size" in layout else 1)
    for word in words:
        assert word in err


def test_virtual_pipeline_that_divides():
    argv = replace(replace(BASE, "--num-layers", "8"), "--pipeline-model-parallel-size", "2")
    args = parse_args(argv + ["--num-layers-per-virtual-pipeline-stage", "2"], world_size=2)
    assert args.virtual_pipeline_model_parallel_size == 2


def test_num_layers_not_divisible_by_pipeline(capsys):
    err = fails(capsys, replace(BASE, "--pipeline-model-parallel-size", "3"), world_size=3)
    assert "--num-layers 4" in err and "--pipeline-model-parallel-size 3" in err


def test_online_targets_need_an_encoder(capsys):
    err = fails(capsys, BASE + ["--arra-targets", "online"])
    assert "--arra-targets online" in err and "--arra-encoder" in err


@pytest.mark.parametrize("extra, words", [
    (["--lr-warmup-iters", "10"], ["--lr-warmup-iters 10", "--lr-decay-iters 10"]),  # decay defaults to train iters
    (["--lr-warmup-iters", "6", "--lr-decay-iters", "5"], ["--lr-warmup-iters 6", "--lr-decay-iters 5"]),
])
def test_warmup_not_below_decay(capsys, extra, words):
    err = fails(capsys, BASE + extra)
    for word in words:
        assert word in err


def test_missing_required_settings(capsys):
    argv = [a for a in BASE if a not in ("--lr", "1e-3", "--seq-length", "32")]
    err = fails(capsys, argv)
    assert "--seq-length" in err and "--lr" in err


def test_heads_not_divisible_by_tensor_parallel(capsys):
    err = fails(capsys, BASE + ["--tensor-model-parallel-size", "8", "--global-batch-size", "2"], world_size=8)
    assert "--num-attention-heads 4" in err and "--tensor-model-parallel-size 8" in err


def test_sequence_parallel_needs_a_divisible_sequence(capsys):
    err = fails(capsys, BASE + ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--seq-length", "33",
                                "--global-batch-size", "2"], world_size=2)
    assert "--seq-length 33" in err and "--tensor-model-parallel-size 2" in err


def test_yaml_types_and_switches(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("hidden-size: abc\n")
    err = fails(capsys, BASE + ["--config", str(bad)])
    assert "--hidden-size expects int" in err
    switch = tmp_path / "switch.yaml"
    switch.write_text("bf16: 'no'\n")
    assert "--bf16 is a switch" in fails(capsys, BASE + ["--config", str(switch)])
    on = tmp_path / "on.yaml"
    on.write_text("bf16: true\n")
    assert parse_args(BASE + ["--config", str(on)], world_size=1).bf16
    assert not parse_args(BASE + ["--config", str(on), "--no-bf16"], world_size=1).bf16


def test_cli_rejects_bad_flags_before_starting():
    """The real entry point: exit status 2 and a one-line message, without torchrun or a process group."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "pretrain_arra.py"), *BASE,
                           "--arra-align-layer", "9"], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "ARRA_CPU_MODE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--arra-align-layer 9" in proc.stderr and "Traceback" not in proc.stderr


def test_held_out_paths_need_train_data_path(capsys, tmp_path):
    argv = [a for a in BASE if a not in ("--mock-data",)]
    err = fails(capsys, argv + ["--data-path", str(tmp_path / "x"), "--valid-data-path", str(tmp_path / "v")])
    assert "--valid-data-path" in err and "--train-data-path" in err
    missing = str(tmp_path / "nowhere" / "val")
    err = fails(capsys, argv + ["--train-data-path", str(tmp_path / "x"), "--valid-data-path", missing])
    assert "--train-data-path" in err and "no dataset there" in err


def test_held_out_targets_from_another_encoder(capsys, tmp_path):
    """Training and validation targets must come from one encoder (its manifest identity)."""
    import json

    from tests.data.test_dataset import _profile, write_prefix

    argv = [a for a in BASE if a not in ("--mock-data", "--vocab-size", "256")]
    argv = replace(replace(argv, "--seq-length", "24"), "--arra-target-dim", "6")
    for name, sha in (("train", "a" * 64), ("val", "b" * 64)):
        write_prefix(tmp_path / name, 8, 1, _profile())
        manifest = json.loads((tmp_path / f"{name}.json").read_text())
        manifest["features"]["encoder"] = {"family": "python", "name": "enc", "sha256": sha}
        (tmp_path / f"{name}.json").write_text(json.dumps(manifest))
    paths = ["--train-data-path", str(tmp_path / "train"), "--valid-data-path", str(tmp_path / "val")]
    err = fails(capsys, argv + paths)
    assert f"--valid-data-path {tmp_path / 'val'}" in err and "another encoder" in err
    args = parse_args(argv + paths + ["--no-arra"], world_size=1)  # no targets read: no conflict
    assert args.train_data_path == [str(tmp_path / "train")] and args.valid_data_path == [str(tmp_path / "val")]


def test_condition_dropout_probability_range(capsys):
    assert parse_args(BASE + ["--condition-dropout-prob", "1"], world_size=1).condition_dropout_prob == 1.0
    err = fails(capsys, BASE + ["--condition-dropout-prob", "1.5"])
    assert "--condition-dropout-prob" in err
