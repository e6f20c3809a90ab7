"""tools/study.py: the shuffled-target control, the splits, and the whole pipeline at --quick size.

The end-to-end test runs the real tools (train_vq, build_indexed_dataset with the pretrained
EfficientNet-Lite0 encoder, the training loop, generate, evaluate) on Fashion-MNIST images, a few
minutes on 2 CPU cores; CI installs Debian's dataset-fashion-mnist for it (.ci/run).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.data.test_dataset import _profile, write_prefix

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "study.py"


def _study():
    spec = importlib.util.spec_from_file_location("study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["study"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_shuffled_control_pairs_every_sample_with_another_row(tmp_path):
    study = _study()
    docs = write_prefix(tmp_path / "train", 50, 3, _profile())
    control = study.shuffled_control(str(tmp_path / "train"))
    original = np.load(tmp_path / "train.features.npy")
    shuffled = np.load(f"{control}.features.npy")
    # Same rows, none left with its own sample (the rows are distinct random vectors).
    assert sorted(map(bytes, original)) == sorted(map(bytes, shuffled))
    assert not any(np.array_equal(a, b) for a, b in zip(original, shuffled))
    from arra_megatron.data.dataset import build_arra_datasets

    (train, _, _), _ = build_arra_datasets([control], "100,0,0", 24, 1, [50, 0, 0], with_features=True)
    for i in range(50):  # the documents are untouched; only the targets moved
        sample = train[i]
        doc = docs[int(sample["sample_id"])]
        assert sample["tokens"][:len(doc)].tolist() == doc.tolist()
    assert study.shuffled_control(str(tmp_path / "train")) == control  # a rerun keeps it


def test_splits_are_stratified_and_disjoint(tmp_path):
    from PIL import Image

    study = _study()
    for split, per_class in (("train", 12), ("test", 4)):
        for c in range(3):
            (tmp_path / "data" / split / f"class{c}").mkdir(parents=True)
            for i in range(per_class):
                Image.new("L", (8, 8), color=c * 40 + i).save(tmp_path / "data" / split / f"class{c}" / f"{i}.png")
    scale = study.Scale(**{**study.asdict(study.QUICK), "train_images": 0, "val_images": 6, "test_images": 0,
                           "limited_images": 3})
    splits = {s: tmp_path / "out" / s for s in ("train", "val", "test", "limited")}
    study._link_folder_splits(tmp_path / "data", splits, scale, np.random.default_rng(0))
    names = {s: {p.relative_to(splits[s]) for p in splits[s].rglob("*.png")} for s in splits}
    assert len(names["val"]) == 6 and len(names["train"]) == 30 and len(names["test"]) == 12
    assert not names["val"] & names["train"] and names["limited"] <= names["train"]
    assert sorted(p.parent.name for p in names["val"]) == ["class0"] * 2 + ["class1"] * 2 + ["class2"] * 2
    assert len({p.parent for p in names["limited"]}) == 3


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="needs Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist; .ci/run does)")
@pytest.mark.timeout(1200)
def test_quick_study_end_to_end(tmp_path):
    out = tmp_path / "study"
    cmd = [sys.executable, str(SCRIPT), "--out", str(out), "--quick", "--arms", "uncond", "limited",
           "--variants", "baseline", "shuffled"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1100,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    report = (out / "report.md").read_text()
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {f"{arm}-{variant}-s0" for arm in ("uncond", "limited") for variant in ("baseline", "shuffled")}
    for name, r in results.items():
        assert all(np.isfinite(r["val_nll"])) and r["val_its"] == [10, 20], name
        for net in ("classifier", "mobilenetv2_imagenet_128"):
            assert np.isfinite(r["fid"][net]["20"] if "20" in r["fid"][net] else r["fid"][net][20]), name
    for row in ("| uncond | baseline | 1 |", "| limited | shuffled | 1 |", "real train vs test"):
        assert row in report
    # Unconditional samples were drawn from the null condition, conditional ones per class.
    uncond = [json.loads(l) for l in (out / "runs" / "uncond-baseline-s0" / "samples_0000020_n100" / "samples.jsonl")
              .read_text().splitlines()]
    limited = [json.loads(l) for l in (out / "runs" / "limited-baseline-s0" / "samples_0000020_n100" / "samples.jsonl")
               .read_text().splitlines()]
    assert len(uncond) == 100 and all(r["unconditional"] for r in uncond)
    assert sorted({r["class_id"] for r in limited}) == list(range(10))
    # Class-conditional documents carry their class token: [BOS] class [BOI] ...
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    profile = json.loads((out / "data" / "limited.json").read_text())["tokenizer_profile"]
    docs = IndexedDataset(str(out / "data" / "limited"), mmap=True)
    classes = [int(docs[i][1]) - profile["class_token_offset"] for i in range(len(docs))]
    assert sorted(set(classes)) == list(range(10))
    # The limited arm trained on its own subset, the control on shuffled targets.
    marker = json.loads((out / "runs" / "limited-shuffled-s0" / "trained" / ".done").read_text())
    assert marker["train_data"].endswith("data/limited-shuffled")
    # A rerun resumes: nothing is trained, sampled or scored again.
    stamps = {p: p.stat().st_mtime for p in (out / "runs").rglob("*.json")}
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert again.returncode == 0, again.stderr[-3000:]
    assert "] + " not in again.stderr  # no tool was launched
    assert {p: p.stat().st_mtime for p in stamps} == stamps


def test_sequence_length_holds_the_class_token():
    """The study's --max-seq-length keeps the class condition: the profile's own layout of a
    class-conditional sample fits it with nothing cut (a length one short silently trained the
    'class-conditional' arm without its class token before the builder refused such lengths)."""
    import argparse

    from arra_megatron.tokenization.profile import ModelIdentity, TokenizerProfile

    study = _study()
    args = argparse.Namespace(image_size=28)
    grid = 28 // 4
    profile = TokenizerProfile.create(text_vocab_size=0, text_special_ids={}, num_classes=10,
                                      image_codebook_size=512, image_size=28, tokens_per_image=grid * grid,
                                      image_preprocessing={}, vq_model=ModelIdentity("JanusVQVAE", "/nowhere", "0" * 64))
    tokens, dropped = profile.build_sequence([profile.class_token(3)], np.zeros(grid * grid, dtype=np.int64),
                                             study.tokens_per_sample(args))
    assert dropped == 0 and profile.class_token(3) in tokens.tolist()
    assert len(tokens) == study.tokens_per_sample(args)


def test_outputs_of_earlier_versions_get_their_sample_count(tmp_path):
    """Sample directories, FID reports and floors named without the sample count (before
    --fid-samples keyed them) are renamed to the count they hold, so a rerun reuses them."""
    run = tmp_path / "runs" / "cond-arra-s0"
    (run / "samples_0000600").mkdir(parents=True)
    (run / "samples_0000600" / "samples.jsonl").write_text('{"file": "000000.png"}\n{"file": "000001.png"}\n')
    (run / "fid_classifier_0000600.json").write_text("{}")
    (run / "samples_0000300").mkdir()  # unfinished: left alone
    study = _study()
    for folder in ("real_train", "vq_recon"):
        (tmp_path / "floors" / folder).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "floors" / folder / f"{i}.png").write_bytes(b"")
        (tmp_path / "floors" / f"classifier_{folder}.json").write_text("{}")
    study.migrate_unkeyed(tmp_path)
    assert sorted(p.name for p in run.iterdir()) == ["fid_classifier_0000600_n2.json", "samples_0000300",
                                                      "samples_0000600_n2"]
    assert sorted(p.name for p in (tmp_path / "floors").iterdir()) == [
        "classifier_real_train_n3.json", "classifier_vq_recon_n3.json", "real_train_n3", "vq_recon_n3"]
