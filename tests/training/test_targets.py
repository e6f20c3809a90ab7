"""Megatron-LM's loop on built datasets: online targets (DALI + the frozen encoder on the stage
holding layer k, split over TP) give the same L_GVA as precomputed ones; the vocabulary and D
come from the dataset's manifest; a --split cut gives a validation set; a sample without a
target is dropped from L_GVA and counted."""

from __future__ import annotations

import pytest

from tests.training.test_megatron_loop import NO_DROPOUT, loop, records

#: TINY's mock data, vocabulary and target dimension give way to the dataset's.
FROM_DATASET = ("--mock-data", "--vocab-size", "--arra-target-dim")
#: A short run on the ``dataset`` fixture (tests/conftest.py; its documents fill 73 tokens), without evaluations.
MODEL = ["--seq-length", "72", "--max-position-embeddings", "72", "--train-iters", "2", "--lr-decay-iters", "2",
         "--eval-iters", "0"]


def test_online_targets_match_precomputed(dataset, tmp_path):
    """TP2, no --vocab-size and no --arra-target-dim (the manifest's, or the encoder's D online),
    an 80/20 split of the dataset: training and validation records for both kinds of target.
    Dropout off: loading the encoder draws from the generator dropout's masks come from."""
    common = [*NO_DROPOUT, "--tensor-model-parallel-size", "2", "--data-path", str(dataset / "data" / "ds"),
              "--split", "80,20,0", *MODEL, "--eval-iters", "1", "--eval-interval", "2"]
    loop(2, *common, "--log-json", str(tmp_path / "pre.jsonl"), drop=FROM_DATASET)
    loop(2, *common, "--arra-targets", "online", "--arra-encoder", f"open_clip:local-dir:{dataset / 'clip'}",
         "--log-json", str(tmp_path / "online.jsonl"), drop=FROM_DATASET)
    (pre, pre_valid), (online, online_valid) = records(tmp_path / "pre.jsonl"), records(tmp_path / "online.jsonl")
    assert sorted(pre) == sorted(online) == [1, 2] and sorted(pre_valid) == sorted(online_valid) == [2]
    for record in (*pre.values(), pre_valid[2]):
        assert 4.0 < record["lm_loss"] < 7.0 and 0.0 < record["gva_loss"] < 2.0, record
    # Iteration 1 sees identical weights: the LM loss is identical, L_GVA differs only by the
    # float16 storage of the precomputed table.
    assert online[1]["lm_loss"] == pre[1]["lm_loss"]
    assert online[1]["gva_loss"] == pytest.approx(pre[1]["gva_loss"], rel=2e-3)
    assert online[2]["gva_loss"] == pytest.approx(pre[2]["gva_loss"], rel=5e-3)
    assert online_valid[2]["gva_loss"] == pytest.approx(pre_valid[2]["gva_loss"], rel=5e-3)


def test_samples_without_a_target_are_dropped_and_counted(tmp_path):
    """A NaN feature row (an image the encoder could not read) masks that sample's L_GVA term."""
    from pathlib import Path

    from tests.data.test_dataset import _profile, write_prefix

    write_prefix(Path(tmp_path / "ds"), 8, 1, _profile(), nan_rows=[3, 5])
    log = tmp_path / "log.jsonl"
    loop(1, "--data-path", str(tmp_path / "ds"), "--split", "100,0,0", "--seq-length", "24",
         "--max-position-embeddings", "24", "--train-iters", "2", "--eval-iters", "0", "--log-json", str(log),
         drop=FROM_DATASET)
    curve = records(log)[0]
    assert sorted(curve) == [1, 2]
    assert curve[1]["gva_dropped_samples"] == 2 and curve[2]["gva_dropped_samples"] == 2
    assert curve[1]["gva_loss"] > 0
