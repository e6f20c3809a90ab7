"""ARRADataset through Megatron's BlendedMegatronDatasetBuilder: samples, blending, split, dropout, targets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

from arra_megatron.data.dataset import build_arra_datasets, drop_condition
from arra_megatron.data.manifest import BuildCounts, DatasetFiles, DatasetManifest, FeatureTable
from arra_megatron.tokenization.profile import ModelIdentity, TokenizerProfile

SEQ = 24
TOKENS_PER_IMAGE = 8


def _profile(codebook: int = 32) -> TokenizerProfile:
    return TokenizerProfile.create(
        text_vocab_size=50, text_special_ids={"bos": 1, "eos": 2, "pad": 0}, num_classes=0,
        image_codebook_size=codebook, image_size=32, tokens_per_image=TOKENS_PER_IMAGE, image_preprocessing={},
        vq_model=ModelIdentity("JanusVQVAE", "/nowhere", "0" * 64))


def write_prefix(prefix: Path, num_docs: int, seed: int, profile: TokenizerProfile, features: bool = True,
                 nan_rows=()) -> list:
    """A dataset as the builder lays it out: documents, manifest, optional float16 feature table."""
    rng = np.random.default_rng(seed)
    dtype = DType.optimal_dtype(profile.vocab_size)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    docs = []
    for _ in range(num_docs):
        cond = rng.integers(3, 50, size=int(rng.integers(1, 6)))
        codes = rng.integers(0, profile.image_codebook_size, size=TOKENS_PER_IMAGE)
        doc, _ = profile.build_sequence(cond.tolist(), codes, SEQ + 1)
        builder.add_item(torch.from_numpy(doc))
        builder.end_document()
        docs.append(doc)
    builder.finalize(f"{prefix}.idx")
    info = None
    if features:
        table = rng.standard_normal((num_docs, 6)).astype(np.float16)
        table[list(nan_rows)] = np.nan
        np.save(f"{prefix}.features.npy", table)
        info = FeatureTable(file=f"{prefix.name}.features.npy", num_rows=num_docs, dim=6,
                            encoder={"family": "random", "name": "standard normal"}, aggregation="cls",
                            preprocessing={}, samples_without_target=len(nan_rows))
    DatasetManifest(num_samples=num_docs, token_dtype=np.dtype(dtype).name, max_seq_length=SEQ + 1,
                    tokenizer_profile=profile, files=DatasetFiles.named(prefix.name),
                    counts=BuildCounts(samples=num_docs), builder_version="1").with_features(info).write(str(prefix))
    return docs


@pytest.fixture()
def two_prefixes(tmp_path):
    profile = _profile()
    a = write_prefix(tmp_path / "a", 40, 1, profile, nan_rows=[3])
    b = write_prefix(tmp_path / "b", 60, 2, profile)
    return tmp_path, profile, a, b


def _build(root, data_path, seed=5, sizes=(50, 10, 0), dropout=0.0, features=True):
    return build_arra_datasets([str(root / p) if not p.replace(".", "").isdigit() else p for p in data_path],
                               "80,20,0", SEQ, seed, list(sizes), condition_dropout_prob=dropout,
                               with_features=features)


def test_samples_are_the_documents(two_prefixes):
    root, profile, docs, _ = two_prefixes
    (train, valid, _), got_profile = _build(root, ["a"])
    assert got_profile == profile
    assert len(train) >= 50 and len(valid) >= 10
    lo, hi = profile.image_token_range
    for i in range(len(train)):
        s = train[i]
        doc = docs[int(s["sample_id"])]
        n = len(doc)
        assert s["tokens"][:n].tolist() == doc.tolist() and (s["tokens"][n:] == profile.special.pad).all()
        assert s["labels"][:n - 1].tolist() == doc[1:].tolist()
        counted = [(lo <= t < hi) or t == profile.special.eoi for t in doc[1:]]
        assert s["loss_mask"][:n - 1].bool().tolist() == counted and s["loss_mask"][n - 1:].sum() == 0
        assert int(s["loss_mask"].sum()) == TOKENS_PER_IMAGE + 1
    # 80/20 split by document: train and valid never share a document.
    train_ids = {int(train[i]["sample_id"]) for i in range(len(train))}
    valid_ids = {int(valid[i]["sample_id"]) for i in range(len(valid))}
    assert not train_ids & valid_ids and train_ids | valid_ids == set(range(40))


def test_targets_and_undecodable_rows(two_prefixes):
    root, _, _, _ = two_prefixes
    (train, valid, _), _ = _build(root, ["a"], sizes=(200, 50, 0))
    table = np.load(root / "a.features.npy")
    seen_nan = False
    for ds in (train, valid):
        for i in range(len(ds)):
            s = ds[i]
            row = table[int(s["sample_id"])]
            if np.isnan(row).any():
                seen_nan = True
                assert not bool(s["arra_valid"]) and float(s["arra_targets"].abs().sum()) == 0
            else:
                assert bool(s["arra_valid"])
                assert torch.equal(s["arra_targets"], torch.from_numpy(row.astype(np.float32)))
    assert seen_nan


def test_blend_is_deterministic_and_weighted(two_prefixes):
    root = two_prefixes[0]
    (t1, _, _), _ = _build(root, ["0.25", "a", "0.75", "b"], sizes=(400, 10, 0))
    (t2, _, _), _ = _build(root, ["0.25", "a", "0.75", "b"], sizes=(400, 10, 0))
    (t3, _, _), _ = _build(root, ["0.25", "a", "0.75", "b"], seed=6, sizes=(400, 10, 0))
    first = [t1[i]["tokens"] for i in range(400)]
    assert all(torch.equal(x, t2[i]["tokens"]) for i, x in enumerate(first))
    assert not all(torch.equal(x, t3[i]["tokens"]) for i, x in enumerate(first))
    from_a = sum(int(t1.dataset_index[i]) == 0 for i in range(400))
    assert abs(from_a - 100) <= 2  # Megatron's blending follows the weights closely


def test_condition_dropout(two_prefixes):
    root, profile, docs, _ = two_prefixes
    (train, _, _), _ = _build(root, ["a"], sizes=(400, 10, 0), dropout=0.5)
    (again, _, _), _ = _build(root, ["a"], sizes=(400, 10, 0), dropout=0.5)
    dropped = 0
    for i in range(400):
        s = train[i]
        assert torch.equal(s["tokens"], again[i]["tokens"])
        doc = docs[int(s["sample_id"])]
        if s["tokens"][1] == profile.special.null_condition:
            dropped += 1
            expected = drop_condition(doc, profile)
            assert s["tokens"][:len(expected)].tolist() == expected.tolist()
            assert expected[2] == profile.special.boi
        else:
            assert s["tokens"][:len(doc)].tolist() == doc.tolist()
    assert 150 < dropped < 250


def test_mismatched_profiles_and_missing_features(tmp_path):
    write_prefix(tmp_path / "a", 10, 1, _profile(32))
    write_prefix(tmp_path / "c", 10, 1, _profile(64), features=False)
    with pytest.raises(ValueError, match="different tokenizer profile"):
        _build(tmp_path, ["1", "a", "1", "c"])
    with pytest.raises(FileNotFoundError, match="precompute_features.py"):
        _build(tmp_path, ["c"])


def test_per_split_data_paths(two_prefixes):
    """--train-data-path a --valid-data-path b: every training sample is a document of a, every
    validation sample one of b (matched by content), and each takes all of its documents."""
    root, profile, docs_a, docs_b = two_prefixes
    (train, valid, test), got = build_arra_datasets(None, "ignored", SEQ, 5, [100, 60, 0],
                                                    per_split=[[str(root / "a")], [str(root / "b")], None],
                                                    with_features=True)
    assert got == profile and test is None

    def docs_of(ds):
        return {tuple(ds[i]["tokens"][:len(d)].tolist()) for i in range(len(ds))
                for d in [docs_b[int(ds[i]["sample_id"])] if ds is valid else docs_a[int(ds[i]["sample_id"])]]}

    assert docs_of(train) == {tuple(d.tolist()) for d in docs_a}
    assert docs_of(valid) == {tuple(d.tolist()) for d in docs_b}
    table_b = np.load(root / "b.features.npy")
    for i in range(10):
        row = table_b[int(valid[i]["sample_id"])]
        assert torch.equal(valid[i]["arra_targets"], torch.from_numpy(row.astype(np.float32)))
