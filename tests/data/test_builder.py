"""tools/build_indexed_dataset.py end to end on generated inputs with every bad case."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

from arra_megatron.data import builder as builder_module
from arra_megatron.data.builder import BuildConfig, build_dataset
from arra_megatron.tokenization.profile import TokenizerProfile
from arra_megatron.tokenization.text import TextTokenizer
from tests.data.conftest import IMAGE_SIZE, MAX_SEQ_LENGTH, TOKENS_PER_IMAGE, Good, reference_codes
from tests.data.conftest import build_argv as _argv
from tests.data.conftest import build_tool as tool
from tests.data.conftest import built_files as _files
from tests.support.tiny_data import encode_image, make_image

def _check_samples(prefix: Path, good: list, vq_dir: Path, condition_ids) -> dict:
    """Every good sample, in input order, as [BOS] condition [BOI] codes [EOI] [EOS]; image refs point at its bytes."""
    manifest = json.loads(Path(f"{prefix}.json").read_text())
    profile = TokenizerProfile.from_dict(manifest["tokenizer_profile"])
    dataset = IndexedDataset(str(prefix), mmap=True)
    assert len(dataset) == len(good) == manifest["num_samples"]
    assert dataset[0].dtype == np.uint16 and manifest["token_dtype"] == "uint16"
    codes = reference_codes(vq_dir, [g.image for g in good])
    lo, hi = profile.image_token_range
    s = profile.special
    for doc, sample, sample_codes in zip(dataset, good, codes):
        doc = doc.tolist()
        boi = doc.index(s.boi)
        assert doc[0] == s.bos and doc[-2:] == [s.eoi, s.eos], sample.key
        assert [t - lo for t in doc[boi + 1:-2]] == sample_codes, sample.key
        assert all(lo <= t < hi for t in doc[boi + 1:-2])
        full = condition_ids(sample)
        assert doc[1:boi] == full[:MAX_SEQ_LENGTH - TOKENS_PER_IMAGE - 4], sample.key
        assert len(doc) <= MAX_SEQ_LENGTH
    refs = np.load(f"{prefix}.images.npy")
    sources = json.loads(Path(f"{prefix}.images.sources.json").read_text())
    for ref, sample in zip(refs, good):
        with open(sources[ref["source"]], "rb") as f:
            f.seek(ref["offset"])
            assert f.read(ref["length"]) == sample.image, sample.key
        assert Path(sources[ref["source"]]).resolve() == Path(sample.source).resolve()
    return manifest


def test_tar_build_round_trips_tokens_and_counts_every_skip(tar_build, tar_inputs, sp_model, janus_vq_dir):
    sp = TextTokenizer(sp_model)
    manifest = _check_samples(tar_build, tar_inputs.good, janus_vq_dir, lambda g: sp.encode(g.caption))
    assert manifest["skipped"] == dict(tar_inputs.skipped)
    budget = MAX_SEQ_LENGTH - TOKENS_PER_IMAGE - 4
    truncated = [g.key for g in tar_inputs.good if len(sp.encode(g.caption)) > budget]
    assert "s0_long" in truncated
    assert manifest["counts"] == {"samples": 21, "skipped": sum(tar_inputs.skipped.values()),
                                  "text_truncated": len(truncated), "parts": 5}
    profile = manifest["tokenizer_profile"]
    assert profile["tokens_per_image"] == TOKENS_PER_IMAGE and profile["image_codebook_size"] == 64
    assert profile["vq_model"]["kind"] == "JanusVQVAE" and profile["text_tokenizer"]["kind"] == "sentencepiece"
    assert manifest["features"] is None
    assert not Path(f"{tar_build}.parts").exists()
    # Untruncated captions decode back to the exact caption text.
    dataset = IndexedDataset(str(tar_build), mmap=True)
    boi = profile["special"]["boi"]
    for doc, sample in zip(dataset, tar_inputs.good):
        if sample.key not in truncated:
            doc = doc.tolist()
            assert sp.decode(doc[1:doc.index(boi)]) == sample.caption


def test_finished_prefix_needs_overwrite(tar_build, tar_inputs, sp_model, janus_vq_dir, caplog):
    before = _files(tar_build)
    assert tool.main(_argv(tar_inputs, tar_build, sp_model, janus_vq_dir)) == 2
    assert "--overwrite" in caplog.text
    assert _files(tar_build) == before


def test_strict_fails_listing_reasons_then_plain_rerun_merges(tmp_path, tar_build, tar_inputs, sp_model,
                                                              janus_vq_dir, caplog):
    prefix = tmp_path / "strict"
    assert tool.main(_argv(tar_inputs, prefix, sp_model, janus_vq_dir, "--strict")) == 1
    assert "tar_truncated: 1" in caplog.text and "caption_not_utf8: 1" in caplog.text
    assert not Path(f"{prefix}.json").exists()
    assert tool.main(_argv(tar_inputs, prefix, sp_model, janus_vq_dir)) == 0
    assert _files(prefix) == _files(tar_build)


def test_killed_build_resumes_byte_identical(tmp_path, monkeypatch, tar_build, tar_inputs, sp_model, janus_vq_dir):
    config = BuildConfig(input=tar_inputs.input, output_prefix=str(tmp_path / "resumed"), image_tokenizer=str(
        janus_vq_dir), text_tokenizer=str(sp_model), image_size=IMAGE_SIZE, max_seq_length=MAX_SEQ_LENGTH,
        batch_size=4)
    real_build_part = builder_module._build_part
    built = []

    def crash_after_two(worker, part, prefix, progress):
        if len(built) == 2:
            raise RuntimeError("simulated crash")
        built.append(part.index)
        return real_build_part(worker, part, prefix, progress)

    monkeypatch.setattr(builder_module, "_build_part", crash_after_two)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_dataset(config)
    assert built == [0, 1]
    parts = tmp_path / "resumed.parts"
    assert sorted(p.name for p in parts.glob("*.json")) == ["part-00000.json", "part-00001.json", "plan.json"]
    (parts / "part-00000.json").unlink()  # as if killed before part 0's marker was renamed into place

    built.clear()
    monkeypatch.setattr(builder_module, "_build_part", lambda *a: built.append(a[1].index) or real_build_part(*a))
    build_dataset(config)
    assert built == [0, 2, 3, 4]
    assert _files(tmp_path / "resumed") == _files(tar_build)


def test_resume_with_other_settings_is_refused(tmp_path, tar_inputs, sp_model, janus_vq_dir):
    prefix = tmp_path / "changed"
    (Path(f"{prefix}.parts")).mkdir()
    Path(f"{prefix}.parts/plan.json").write_text(json.dumps({"num_parts": 3}))
    with pytest.raises(ValueError, match="--overwrite"):
        build_dataset(BuildConfig(input=tar_inputs.input, output_prefix=str(prefix),
                                  image_tokenizer=str(janus_vq_dir), text_tokenizer=str(sp_model),
                                  image_size=IMAGE_SIZE, max_seq_length=MAX_SEQ_LENGTH, batch_size=4))


def test_worker_pool_gives_the_same_bytes(tmp_path, tar_build, tar_inputs, sp_model, janus_vq_dir):
    prefix = tmp_path / "pool"
    assert tool.main(_argv(tar_inputs, prefix, sp_model, janus_vq_dir, "--workers", "2", "--device", "cpu")) == 0
    assert _files(prefix) == _files(tar_build)


def test_max_seq_length_too_small_names_the_flag(tmp_path, tar_inputs, sp_model, janus_vq_dir):
    config = BuildConfig(input=tar_inputs.input, output_prefix=str(tmp_path / "x"), image_tokenizer=str(
        janus_vq_dir), text_tokenizer=str(sp_model), image_size=IMAGE_SIZE, max_seq_length=60)
    with pytest.raises(ValueError, match="--max-seq-length 60"):
        build_dataset(config)


def test_max_seq_length_without_room_for_the_condition(tmp_path, tar_inputs, sp_model, janus_vq_dir):
    """Image and frame tokens fit but the condition would be cut from every sample: refused, not
    silently built as an unconditional dataset."""
    exact = TOKENS_PER_IMAGE + 4
    config = BuildConfig(input=tar_inputs.input, output_prefix=str(tmp_path / "x"), image_tokenizer=str(
        janus_vq_dir), text_tokenizer=str(sp_model), image_size=IMAGE_SIZE, max_seq_length=exact)
    with pytest.raises(ValueError, match=f"--max-seq-length {exact} leaves no room for the condition.*at least "
                                         f"{exact + 1}"):
        build_dataset(config)
    assert not list(tmp_path.iterdir())


def _table_inputs(root: Path, kind: str):
    """MIMIC-style rows: view + impression columns, one missing image, one empty and one non-UTF-8 impression."""
    (root / "images").mkdir(parents=True)
    rows, good = [], []
    for i in range(5):
        data = encode_image(make_image(400 + i, (48, 40)), "JPEG", quality=90)
        (root / "images" / f"{i}.jpg").write_bytes(data)
        view, impression = ("PA", "AP")[i % 2], f"no acute finding {i}"
        rows.append({"path": f"{i}.jpg", "view": view, "impression": impression})
        good.append(Good(f"row-{i}", data, str(root / "images" / f"{i}.jpg"),
                         caption=f"{view} view chest X-ray image, {impression}"))
    rows.append({"path": "absent.jpg", "view": "PA", "impression": "missing file"})
    rows.append({"path": "0.jpg", "view": "PA", "impression": "  "})
    rows.append({"path": "1.jpg", "view": "PA", "impression": "caf\udce9"})  # the byte 0xE9, not UTF-8
    path = root / f"table.{kind}"
    with open(path, "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
        if kind == "csv":
            writer = csv.DictWriter(f, fieldnames=["path", "view", "impression"])
            writer.writeheader()
            writer.writerows(rows)
        else:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.write("{not json\n")
    skipped = {"image_missing": 1, "caption_empty": 1, "caption_not_utf8": 1}
    if kind == "jsonl":
        skipped["bad_record"] = 1
    return path, good, skipped


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_table_with_prompt_template(tmp_path, kind, hf_tokenizer_dir, chameleon_vq_dir):
    torch.set_num_threads(1)
    table, good, skipped = _table_inputs(tmp_path / "in", kind)
    prefix = tmp_path / "mimic"
    assert tool.main(["--input", str(table), "--output-prefix", str(prefix), "--image-root",
                      str(tmp_path / "in" / "images"), "--image-column", "path", "--prompt-template",
                      "{view} view chest X-ray image, {impression}", "--text-tokenizer", str(hf_tokenizer_dir),
                      "--image-tokenizer", str(chameleon_vq_dir), "--image-size", str(IMAGE_SIZE),
                      "--max-seq-length", str(MAX_SEQ_LENGTH), "--num-parts", "2"]) == 0
    hf = TextTokenizer(hf_tokenizer_dir)
    manifest = _check_samples(prefix, good, chameleon_vq_dir, lambda g: hf.encode(g.caption))
    assert manifest["skipped"] == skipped
    assert manifest["tokenizer_profile"]["vq_model"]["kind"] == "ChameleonVQVAE"
    assert manifest["tokenizer_profile"]["special"]["pad"] == 3  # the HF tokenizer's own PAD


def test_class_folder_uses_class_tokens(tmp_path, janus_vq_dir):
    torch.set_num_threads(1)
    root = tmp_path / "imagenet"
    good = []
    for class_id, name in enumerate(["n01", "n02", "n03"]):
        (root / name).mkdir(parents=True)
        for j in range(2):
            data = encode_image(make_image(500 + 10 * class_id + j), "PNG")
            (root / name / f"img{j}.png").write_bytes(data)
            good.append(Good(f"{name}/img{j}.png", data, str(root / name / f"img{j}.png"), class_id=class_id))
    (root / "n02" / "notes.txt").write_text("not an image")  # ignored: not an image extension
    (root / "n03" / "broken.jpg").write_bytes(b"garbage")
    prefix = tmp_path / "c2i"
    config = BuildConfig(input=str(root), output_prefix=str(prefix), image_tokenizer=str(janus_vq_dir),
                         image_size=IMAGE_SIZE, max_seq_length=MAX_SEQ_LENGTH)
    manifest = build_dataset(config).to_dict()
    assert manifest["input"]["kind"] == "folder" and manifest["input"]["classes"] == ["n01", "n02", "n03"]
    assert manifest["skipped"] == {"image_undecodable": 1}
    profile = TokenizerProfile.from_dict(manifest["tokenizer_profile"])
    assert profile.num_classes == 3 and profile.text_tokenizer is None
    _check_samples(prefix, good, janus_vq_dir, lambda g: [profile.class_token(g.class_id)])
