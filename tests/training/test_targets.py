"""Online targets (DALI + the frozen encoder on the stage holding layer k, split over TP) give
the same L_GVA as precomputed ones; a dataset whose vocabulary exceeds the model's is refused."""

from __future__ import annotations

import subprocess
import sys

import pytest

from arra_megatron.testing.tiny_data import make_image, make_janus_vq
from arra_megatron.testing.tiny_encoders import CLIP_EMBED_DIM, make_tiny_clip
from tests.training.test_cli import ROOT, ok, records, torchrun

MODEL = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "72",
         "--arra-target-dim", str(CLIP_EMBED_DIM), "--train-iters", "2", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("targets")
    for i in range(24):
        folder = root / "images" / f"class_{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        make_image(i, size=(40 + i, 32)).save(folder / f"{i}.png")
    clip = make_tiny_clip(root / "clip")
    cmd = [sys.executable, "tools/build_indexed_dataset.py", "--input", str(root / "images"), "--input-kind", "folder",
           "--output-prefix", str(root / "data" / "ds"), "--image-tokenizer", str(make_janus_vq(root / "vq")),
           "--image-size", "32", "--max-seq-length", "73", "--encoder", f"open_clip:local-dir:{clip}"]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, timeout=600)
    return root


def test_online_targets_match_precomputed(dataset, tmp_path):
    prefix = str(dataset / "data" / "ds")
    common = ["--tensor-model-parallel-size", "2", "--data-path", prefix, "--split", "100,0,0", *MODEL]
    ok(torchrun(2, *common, "--log-json", str(tmp_path / "pre.jsonl"), drop_mock=True))
    ok(torchrun(2, *common, "--arra-targets", "online", "--arra-encoder",
                f"open_clip:local-dir:{dataset / 'clip'}", "--log-json", str(tmp_path / "online.jsonl"),
                drop_mock=True))
    pre, online = records(tmp_path / "pre.jsonl"), records(tmp_path / "online.jsonl")
    assert sorted(pre) == sorted(online) == [1, 2]
    # Iteration 1 sees identical weights: the LM loss is identical, L_GVA differs only by the
    # float16 storage of the precomputed table.
    assert online[1]["lm_loss"] == pre[1]["lm_loss"]
    assert online[1]["gva_loss"] == pytest.approx(pre[1]["gva_loss"], rel=2e-3)
    assert online[2]["gva_loss"] == pytest.approx(pre[2]["gva_loss"], rel=5e-3)


def test_dataset_vocabulary_larger_than_the_model(dataset):
    proc = subprocess.run([sys.executable, "examples/pretrain_arra.py", "--data-path", str(dataset / "data" / "ds"),
                           "--vocab-size", "40", "--micro-batch-size", "2", "--global-batch-size", "2", *MODEL],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--vocab-size 40 is smaller than the vocabulary of --data-path" in proc.stderr


def test_samples_without_a_target_are_dropped_and_counted(tmp_path):
    """A NaN feature row (an image the encoder could not read) masks that sample's L_GVA term."""
    from pathlib import Path

    from tests.data.test_dataset import _profile, write_prefix

    write_prefix(Path(tmp_path / "ds"), 8, 1, _profile(), nan_rows=[3, 5])
    log = tmp_path / "log.jsonl"
    ok(torchrun(1, "--data-path", str(tmp_path / "ds"), "--split", "100,0,0", "--seq-length", "24",
                "--arra-target-dim", "6", "--train-iters", "2", "--log-json", str(log), drop_mock=True))
    curve = records(log)
    assert curve[1]["gva_dropped_samples"] == 2 and curve[2]["gva_dropped_samples"] == 2
    assert curve[1]["gva_loss"] > 0


def test_megatron_loop_reads_the_dataset(dataset, tmp_path):
    """Megatron-LM's loop on a built dataset: the vocabulary and D come from its manifest (no
    --vocab-size, no --arra-target-dim), precomputed targets reach L_GVA, a --split cut gives a
    validation set."""
    from tests.training.test_megatron_loop import loop, records

    log = tmp_path / "log.jsonl"
    mock_free = ["--data-path", str(dataset / "data" / "ds"), "--split", "80,20,0", "--seq-length", "72",
                 "--max-position-embeddings", "72", "--train-iters", "2", "--lr-decay-iters", "2",
                 "--eval-interval", "2", "--log-json", str(log)]
    loop(1, *mock_free, drop=("--mock-data", "--vocab-size", "--arra-target-dim"))
    train, valid = records(log)
    assert sorted(train) == [1, 2] and sorted(valid) == [2]
    for record in (*train.values(), valid[2]):
        assert 4.0 < record["lm_loss"] < 7.0 and 0.0 < record["gva_loss"] < 2.0, record
