"""Bad flags fail in ``megatron_loop.parse_args``, before any process group.

The project's rules (``prepare_args``, ``data/checks.py``, ``--config``) exit with a message
naming the flag; Megatron-LM's own validation raises its AssertionError, with Megatron's
message. Every case runs in this process (``parse`` / ``rejected`` in conftest.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BASE = (
    "--num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 32 --max-position-embeddings 32 "
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


def without(argv, *flags):
    """``argv`` without ``flags`` and their values."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if arg in flags:
            skip = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            continue
        if not skip:
            out.append(arg)
        skip = False
    return out


def megatron_rejects(parse, argv, match: str, world_size: int = 1) -> None:
    """Megatron-LM's own validation refuses ``argv`` (an AssertionError matching ``match``)."""
    with pytest.raises(AssertionError, match=match):
        parse(argv, world_size)
    assert not torch.distributed.is_initialized()


def write_dataset(prefix, encoder_sha: str = "a" * 64) -> None:
    """A small built dataset (tests/data's writer: 8 documents of up to 25 tokens, 6-d targets)
    whose targets come from the encoder ``encoder_sha``."""
    from pathlib import Path

    from tests.data.test_dataset import _profile, write_prefix

    write_prefix(Path(prefix), 8, 1, _profile())
    manifest = json.loads(Path(f"{prefix}.json").read_text())
    manifest["features"]["encoder"] = {"family": "python", "name": "enc", "sha256": encoder_sha}
    manifest["max_seq_length"] = 25  # the writer's documents fill --seq-length 24 + 1
    Path(f"{prefix}.json").write_text(json.dumps(manifest))


DATASET = without(BASE, "--mock-data", "--vocab-size", "--seq-length", "--max-position-embeddings") + [
    "--seq-length", "24", "--max-position-embeddings", "24"]


# ----------------------------------------------------------------------------- accepted
def test_base_flags_are_valid(parse):
    from arra_megatron.training.megatron_loop import transformer_config

    args = parse(BASE)
    assert args.data_parallel_size == 1 and args.world_size == 1
    assert args.global_batch_size // (args.micro_batch_size * args.data_parallel_size) == 4
    assert (args.arra, args.arra_align_layer, args.arra_target_dim) == (True, 1, 512)  # 512: --mock-data's D
    assert args.tokenizer_type == "NullTokenizer" and args.vocab_size == 256
    assert args.eval_interval == 1000  # Megatron-Core 0.19 leaves it None; the loop's default
    config = transformer_config(args)
    assert (config.num_layers, config.hidden_size, config.num_attention_heads) == (4, 64, 4)


def test_global_batch_not_divisible_by_micro_batch_times_dp(parse):
    # world 4 -> DP 4: 2 x 4 = 8 does not divide 12; on one rank it is 6 micro-batches
    megatron_rejects(parse, replace(BASE, "--global-batch-size", "12"),
                     r"global_batch_size \(12\).*micro_batch_size \(2\).*data_parallel_size \(4\)", world_size=4)
    args = parse(replace(BASE, "--global-batch-size", "12"))
    assert args.global_batch_size // args.micro_batch_size == 6


def test_world_size_not_divisible_by_model_parallel(parse):
    megatron_rejects(parse, BASE + ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"],
                     r"world size \(6\) is not divisible by total_model_size", world_size=6)
    args = parse(BASE + ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"], world_size=8)
    assert args.data_parallel_size == 2


def test_num_layers_not_divisible_by_pipeline(parse):
    megatron_rejects(parse, replace(BASE, "--pipeline-model-parallel-size", "3"),
                     "Number of layers should be divisible by the pipeline-model-parallel size", world_size=3)


@pytest.mark.parametrize("layout, match, world", [
    # 8 layers over PP2 = 4 per stage: 3 layers per virtual stage does not divide it
    (["--num-layers", "8", "--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "3"],
     "number of layers per pipeline stage must be divisible number of layers per virtual pipeline stage", 2),
    # virtual stages without pipeline parallelism
    (["--num-layers-per-virtual-pipeline-stage", "2"], "pipeline-model-parallel size should be greater than 1", 1),
])
def test_virtual_pipeline_that_does_not_divide(parse, layout, match, world):
    argv = BASE
    for flag, value in zip(layout[0::2], layout[1::2]):
        argv = replace(argv, flag, value)
    megatron_rejects(parse, argv, match, world)


def test_virtual_pipeline_that_divides(parse):
    argv = replace(replace(BASE, "--num-layers", "8"), "--pipeline-model-parallel-size", "2")
    args = parse(argv + ["--num-layers-per-virtual-pipeline-stage", "2"], world_size=2)
    assert args.virtual_pipeline_model_parallel_size == 2


def test_heads_that_do_not_divide(rejected):
    """Megatron-LM's validation leaves this to the TransformerConfig, built after the process groups."""
    err = rejected(BASE + ["--tensor-model-parallel-size", "8", "--global-batch-size", "2"], world_size=8)
    assert "--num-attention-heads 4" in err and "--tensor-model-parallel-size 8" in err


@pytest.mark.parametrize("extra, words", [
    (["--lr-warmup-iters", "10"], "--lr-warmup-iters 10 must be below --lr-decay-iters 10"),
    (["--lr-warmup-iters", "5", "--lr-decay-iters", "4"], "--lr-decay-iters 4"),
    (["--min-lr", "1e-2"], "--min-lr 0.01 is above --lr 0.001"),
    (["--tensor-model-parallel-size", "4", "--sequence-parallel", "--seq-length", "30",
      "--max-position-embeddings", "30", "--global-batch-size", "2"], "--seq-length 30"),
])
def test_schedule_and_sequence_rules_name_the_flag(rejected, extra, words):
    world = 4 if "--tensor-model-parallel-size" in extra else 1
    assert words in rejected(BASE + extra, world_size=world)


def test_missing_learning_rate(rejected):
    assert "--lr is required" in rejected(without(BASE, "--lr"))


def test_fp8_without_a_gpu_or_transformer_engine(rejected):
    from arra_megatron.runtime.capabilities import has_gpu, has_transformer_engine

    if has_gpu() and has_transformer_engine():
        pytest.skip("this machine can run FP8: nothing to refuse")
    assert "--fp8-format needs" in rejected(BASE + ["--fp8-format", "hybrid"])


def test_missing_model_settings(parse):
    megatron_rejects(parse, without(BASE, "--num-layers"), "num-layers")
    megatron_rejects(parse, without(BASE, "--max-position-embeddings"), "max_position_embeddings")
    megatron_rejects(parse, replace(BASE, "--seq-length", "33"),
                     r"max_position_embeddings \(32\) must be greater than or equal to seq_length \(33\)")


def test_bf16_and_fp16_are_exclusive(parse, rejected):
    assert "--bf16 and --fp16 are exclusive" in rejected(BASE + ["--bf16", "--fp16"])
    assert parse(BASE + ["--bf16"]).params_dtype == torch.bfloat16


# ----------------------------------------------------------------------------- ARRA flags
def test_align_layer_beyond_num_layers(rejected):
    err = rejected(BASE + ["--arra-align-layer", "5"])
    assert "--arra-align-layer 5" in err and "--num-layers 4" in err


def test_align_layer_below_one(rejected):
    err = rejected(BASE + ["--arra-align-layer", "0"])
    assert "--arra-align-layer" in err and "got 0" in err


def test_align_layer_is_not_checked_without_arra(parse):
    args = parse(BASE + ["--arra-align-layer", "9", "--no-arra"])
    assert not args.arra and args.arra_align_layer == 9


def test_context_parallelism_with_arra(rejected, parse):
    err = rejected(BASE + ["--context-parallel-size", "2"], world_size=2)
    assert "--context-parallel-size" in err and "ARRA" in err
    assert parse(BASE + ["--context-parallel-size", "2", "--no-arra"], world_size=2).context_parallel_size == 2


def test_condition_dropout_probability_range(parse, rejected):
    assert parse(BASE + ["--arra-condition-dropout-prob", "1"]).arra_condition_dropout_prob == 1.0
    err = rejected(BASE + ["--arra-condition-dropout-prob", "1.5"])
    assert "--arra-condition-dropout-prob" in err and "1.5" in err


def test_per_head_qk_layernorm_needs_qk_layernorm(rejected):
    assert "--qk-layernorm-per-head needs --qk-layernorm" in rejected(BASE + ["--qk-layernorm-per-head"])


@pytest.mark.parametrize("old, new", [("--z-loss-weight", "--arra-z-loss-weight"),
                                      ("--condition-dropout-prob", "--arra-condition-dropout-prob"),
                                      ("--loss-on-text", "--arra-loss-on-text")])
def test_flags_renamed_for_megatron_lm(parse, rejected, old, new):
    """The trainer's own flags became --arra-* ones beside Megatron-LM's: the old spelling is refused."""
    value = [] if old == "--loss-on-text" else ["0.5"]
    assert f"unrecognized arguments: {old}" in rejected(BASE + [old, *value])
    args = parse(BASE + [new, *value])
    assert getattr(args, new[2:].replace("-", "_")) == (True if not value else 0.5)


# ----------------------------------------------------------------------------- data flags
def test_mock_data_needs_a_vocabulary(rejected):
    assert "--mock-data needs --vocab-size" in rejected(without(BASE, "--vocab-size"))


def test_missing_data_path(rejected, tmp_path):
    missing = str(tmp_path / "nowhere" / "dataset")
    err = rejected(without(BASE, "--mock-data") + ["--data-path", missing])
    assert f"--data-path {missing}: no dataset there" in err


def test_data_path_and_mock_data_are_exclusive(rejected, tmp_path):
    write_dataset(tmp_path / "ds")
    assert "--mock-data and --data-path" in rejected(BASE + ["--data-path", str(tmp_path / "ds")])


def test_dataset_fits_the_model(parse, rejected, tmp_path):
    """The dataset's manifest sets the vocabulary and D; a vocabulary or sequence that does not
    fit it is refused naming the flag and the dataset."""
    write_dataset(tmp_path / "ds")
    args = parse(DATASET + ["--data-path", str(tmp_path / "ds")])
    assert args.data_path == [str(tmp_path / "ds")] and not args.mock_data
    assert args.arra_target_dim == 6 and args.vocab_size > 0  # both from the manifest
    err = rejected(DATASET + ["--data-path", str(tmp_path / "ds"), "--vocab-size", "40"])
    assert "--vocab-size 40 is smaller than the vocabulary of --data-path" in err
    err = rejected(replace(replace(DATASET, "--seq-length", "8"), "--max-position-embeddings", "8")
                   + ["--data-path", str(tmp_path / "ds")])
    assert f"--data-path {tmp_path / 'ds'}" in err and "--seq-length 8 would cut them" in err


def test_target_dim_given_against_the_feature_table(rejected, tmp_path):
    """A repeated --arra-target-dim that disagrees with the dataset fails naming both values."""
    write_dataset(tmp_path / "ds")
    err = rejected(DATASET + ["--data-path", str(tmp_path / "ds"), "--arra-target-dim", "32"])
    assert f"--arra-target-dim 32 does not match the feature table of --data-path {tmp_path / 'ds'}, whose D is 6" in err


def test_target_dim_defaults_to_the_checkpoint_resumed(parse, rejected, tmp_path, monkeypatch):
    """--load of an ARRA run: its saved --arra-target-dim is the default (the mock's 512 is not), and a
    dataset with another D fails naming both."""
    from arra_megatron.training import checkpoints

    ckpt = tmp_path / "ckpt"
    (ckpt / "iter_0000010").mkdir(parents=True)
    (ckpt / "iter_0000010" / "metadata.json").write_text("{}")
    (ckpt / checkpoints.TRACKER_FILE).write_text("10")
    monkeypatch.setattr(checkpoints, "saved_args", lambda path: argparse.Namespace(arra=True, arra_target_dim=16))
    assert parse(BASE + ["--load", str(ckpt)]).arra_target_dim == 16
    write_dataset(tmp_path / "ds")
    err = rejected(DATASET + ["--data-path", str(tmp_path / "ds"), "--load", str(ckpt)])
    assert f"the checkpoint of --load {ckpt} has D 16 but the feature table of --data-path {tmp_path / 'ds'} has D 6" in err


def test_online_targets_need_a_dataset_and_an_encoder(rejected, tmp_path):
    err = rejected(BASE + ["--arra-targets", "online", "--arra-encoder", "timm:resnet18"])
    assert "--arra-targets online" in err and "--mock-data" in err
    write_dataset(tmp_path / "ds")
    err = rejected(DATASET + ["--data-path", str(tmp_path / "ds"), "--arra-targets", "online"])
    assert "--arra-targets online needs --arra-encoder" in err


def test_held_out_paths_need_train_data_path(parse, rejected, tmp_path):
    write_dataset(tmp_path / "x")
    write_dataset(tmp_path / "v")
    err = rejected(DATASET + ["--data-path", str(tmp_path / "x"), "--valid-data-path", str(tmp_path / "v")])
    assert "--valid-data-path and --test-data-path go with --train-data-path" in err
    missing = str(tmp_path / "nowhere" / "val")
    err = rejected(DATASET + ["--train-data-path", str(tmp_path / "x"), "--valid-data-path", missing])
    assert f"--valid-data-path {missing}: no dataset there" in err


def test_held_out_targets_from_another_encoder(parse, rejected, tmp_path):
    """Training and validation targets must come from one encoder (its manifest identity)."""
    write_dataset(tmp_path / "train", "a" * 64)
    write_dataset(tmp_path / "val", "b" * 64)
    paths = ["--train-data-path", str(tmp_path / "train"), "--valid-data-path", str(tmp_path / "val")]
    err = rejected(DATASET + paths)
    assert f"--valid-data-path {tmp_path / 'val'}" in err and "another encoder" in err
    args = parse(DATASET + paths + ["--no-arra"])  # no targets read: no conflict
    assert args.train_data_path == [str(tmp_path / "train")] and args.valid_data_path == [str(tmp_path / "val")]


# ----------------------------------------------------------------------------- --config YAML
def test_unknown_flag(rejected):
    err = rejected(BASE + ["--num-layer", "4"])  # a typo of --num-layers: no abbreviations either
    assert "unrecognized arguments: --num-layer" in err


def test_unknown_yaml_key(rejected, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("num-layers: 4\nlearning-rate: 1.0e-3\n")
    err = rejected(BASE + ["--config", str(config)])
    assert "--config" in err and str(config) in err and "'learning-rate'" in err


@pytest.mark.parametrize("key, new", [("z-loss-weight: 1.0e-5", "arra-z-loss-weight"),
                                      ("condition_dropout_prob: 0.1", "arra-condition-dropout-prob"),
                                      ("loss-on-text: true", "arra-loss-on-text")])
def test_yaml_keys_of_the_old_trainer_name_their_new_flag(rejected, tmp_path, key, new):
    config = tmp_path / "old.yaml"
    config.write_text(key + "\n")
    err = rejected(BASE + ["--config", str(config)])
    assert str(config) in err and f"is now '{new}'" in err


def test_yaml_choice_is_checked(rejected, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("lr-decay-style: cosin\n")
    err = rejected(BASE + ["--config", str(config)])
    assert "--lr-decay-style" in err and "cosin" in err


def test_missing_config_file(rejected, tmp_path):
    err = rejected(BASE + ["--config", str(tmp_path / "absent.yaml")])
    assert "--config" in err and "absent.yaml" in err


def test_command_line_overrides_yaml(parse, tmp_path):
    config = tmp_path / "run.yaml"
    # dashes or underscores inside keys; the YAML fills what the command line leaves out
    config.write_text("num-layers: 8\nhidden_size: 128\nlr: 5.0e-4\nlr-decay-style: cosine\nbf16: true\n"
                      "arra-align-layer: 2\narra_z_loss_weight: 1.0e-5\n")
    argv = replace(replace(BASE, "--num-layers", "6"), "--lr", "2e-4")
    args = parse(["--config", str(config), *without(argv, "--hidden-size")])
    assert args.num_layers == 6 and args.lr == 2e-4  # command line wins
    assert args.hidden_size == 128 and args.lr_decay_style == "cosine" and args.bf16  # from the YAML
    assert args.arra_align_layer == 2 and args.arra_z_loss_weight == 1e-5


def test_yaml_values_are_validated_like_flags(rejected, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("arra-align-layer: 7\n")
    assert "--arra-align-layer 7" in rejected(BASE + ["--config", str(config)])


def test_yaml_types_and_switches(parse, rejected, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("hidden-size: abc\n")
    assert "argument --hidden-size: invalid int value: 'abc'" in rejected(BASE + ["--config", str(bad)])
    switch = tmp_path / "switch.yaml"
    switch.write_text("bf16: 'no'\n")
    assert "bf16 is a switch" in rejected(BASE + ["--config", str(switch)])
    for value, expected in (("true", True), ("false", False)):  # a Megatron store_true switch
        (tmp_path / "on.yaml").write_text(f"bf16: {value}\n")
        assert parse(BASE + ["--config", str(tmp_path / "on.yaml")]).bf16 is expected
    # a switch with a --no- form: the command line turns the YAML's value around
    (tmp_path / "text.yaml").write_text("arra-loss-on-text: true\narra: false\n")
    args = parse(BASE + ["--config", str(tmp_path / "text.yaml")])
    assert args.arra_loss_on_text and not args.arra
    args = parse(BASE + ["--config", str(tmp_path / "text.yaml"), "--no-arra-loss-on-text", "--arra"])
    assert not args.arra_loss_on_text and args.arra


# ----------------------------------------------------------------------------- the entry point
def test_cli_rejects_bad_flags_before_starting():
    """The real entry point: a non-zero exit and the message, without torchrun, a process group
    or a traceback."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "pretrain_arra.py"), *BASE,
                           "--arra-align-layer", "9"], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "ARRA_CPU_MODE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "--arra-align-layer 9 is outside 1..4 (--num-layers 4)" in proc.stderr
    assert "Traceback" not in proc.stderr
