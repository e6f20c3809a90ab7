"""The dataset manifest (data/manifest.py): older files still read, a round trip keeps every field,
files of a newer or unknown format are refused with a message naming the file and what to do."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from arra_megatron.data.checks import DataFlagError, data_blend
from arra_megatron.data.manifest import FORMAT_VERSION, DatasetManifest, ManifestError

# A manifest as the first builder wrote it (format version 1: no "format_version" field), with a
# feature table; the build of tests/data/test_features.py's tar shards, local paths replaced.
VERSION_1 = Path(__file__).with_name("manifest_v1.json")


@pytest.fixture()
def v1_prefix(tmp_path) -> str:
    shutil.copy(VERSION_1, tmp_path / "laion.json")
    return str(tmp_path / "laion")


def test_reads_a_version_1_manifest(v1_prefix):
    manifest = DatasetManifest.read(v1_prefix)
    assert manifest.num_samples == 21 and manifest.token_dtype == "uint16" and manifest.max_seq_length == 100
    assert manifest.tokenizer_profile.vocab_size == 188 and manifest.tokenizer_profile.tokens_per_image == 64
    assert manifest.feature_dim == 32 and manifest.features.num_rows == 21
    assert manifest.features.encoder["name"] == "clip" and manifest.features.aggregation == "cls"
    assert manifest.counts.skipped == 10 and manifest.skipped["tar_unreadable"] == 2
    assert manifest.files.features == "laion.features.npy" and manifest.input["kind"] == "tar"
    # Written again, it is the same file plus its format version.
    old = json.loads(VERSION_1.read_text())
    assert manifest.to_dict() == {**old, "format_version": FORMAT_VERSION}


def test_round_trip_keeps_every_field(v1_prefix, tmp_path):
    manifest = dataclasses.replace(DatasetManifest.read(v1_prefix), control={"kind": "test", "seed": (1, 2)})
    manifest.write(str(tmp_path / "copy"))
    again = DatasetManifest.read(str(tmp_path / "copy"))
    assert again == manifest and again.control == {"kind": "test", "seed": [1, 2]}
    assert json.loads((tmp_path / "copy.json").read_text())["format_version"] == FORMAT_VERSION
    without = again.with_features(None)
    without.write(str(tmp_path / "plain"))
    plain = json.loads((tmp_path / "plain.json").read_text())
    assert plain["features"] is None and "features" not in plain["files"]
    assert DatasetManifest.read(str(tmp_path / "plain")) == without


def _write(prefix: str, edit) -> None:
    data = json.loads(VERSION_1.read_text())
    edit(data)
    Path(f"{prefix}.json").write_text(json.dumps(data))


def test_newer_or_unknown_formats_are_refused(v1_prefix):
    _write(v1_prefix, lambda d: d.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(ManifestError, match=f"{v1_prefix}.json: manifest format version {FORMAT_VERSION + 1}.*"
                                            "upgrade arra_megatron"):
        DatasetManifest.read(v1_prefix)
    _write(v1_prefix, lambda d: d.update(format="something-else"))
    with pytest.raises(ManifestError, match="not an ARRA dataset manifest"):
        DatasetManifest.read(v1_prefix)


@pytest.mark.parametrize("edit, problem", [
    (lambda d: d.pop("tokenizer_profile"), r"lacks \['tokenizer_profile'\]"),
    (lambda d: d.update(extra=1), r"unknown fields \['extra'\]"),
    (lambda d: d["counts"].update(samples=20), "disagree with num_samples"),
    (lambda d: d["features"].update(shape=[20, 32]), "20 rows for 21 samples"),
    (lambda d: d["features"].update(dim=16), "dim 16 differs"),
    (lambda d: d["files"].pop("features"), "not the feature table's file"),
])
def test_a_malformed_manifest_names_the_file_and_the_fix(v1_prefix, edit, problem):
    _write(v1_prefix, edit)
    with pytest.raises(ManifestError, match=problem) as caught:
        DatasetManifest.read(v1_prefix)
    assert str(caught.value).startswith(f"{v1_prefix}.json: ") and "build_indexed_dataset.py" in str(caught.value)


def test_missing_or_broken_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a finished dataset.*build_indexed_dataset.py"):
        DatasetManifest.read(str(tmp_path / "nothing"))
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ManifestError, match="broken.json: not JSON"):
        DatasetManifest.read(str(tmp_path / "broken"))


def test_data_blend_is_megatron_cores_parsing():
    assert data_blend(["data/a"]) == (["data/a"], None)
    assert data_blend(["data/a", "data/b"]) == (["data/a", "data/b"], None)
    assert data_blend(["0.3", "data/a", "0.7", "data/b"]) == (["data/a", "data/b"], [0.3, 0.7])
    with pytest.raises(DataFlagError, match="--train-data-path with several datasets takes pairs"):
        data_blend(["data/x", "data/a", "0.7", "data/b"], "--train-data-path")
