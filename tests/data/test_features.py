"""Precomputed ARRA targets: --encoder at build time, tools/precompute_features.py, read_image_bytes."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from arra_megatron.data import builder as builder_module
from arra_megatron.data.builder import BuildConfig, TargetFeaturizer, add_features, build_dataset
from arra_megatron.data.image_refs import ImageRefTable, read_image_bytes
from arra_megatron.encoders import load_encoder
from arra_megatron.encoders.preprocess import reference_preprocess
from arra_megatron.runtime.launch import free_port
from arra_megatron.tiny import CLIP_EMBED_DIM
from tests.data.conftest import IMAGE_SIZE, MAX_SEQ_LENGTH
from tests.support.tiny_data import encode_image, make_image

_TOOLS = Path(__file__).resolve().parents[2] / "tools"


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, _TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_tool, precompute_tool = _load_tool("build_indexed_dataset"), _load_tool("precompute_features")
ENCODER_BATCH = 4


def _encoder_spec(clip_dir: Path) -> str:
    return f"open_clip:local-dir:{clip_dir}"


def _reference_targets(clip_dir: Path, images: list) -> torch.Tensor:
    """f_GF without the builder: open_clip's own transform (PIL) and encode_image."""
    encoder = load_encoder(_encoder_spec(clip_dir), "cls")
    return encoder.encode(reference_preprocess(encoder.spec, images))


@pytest.fixture(scope="module")
def tar_features_build(tmp_path_factory, tar_inputs, sp_model, janus_vq_dir, tiny_clip_dir):
    torch.set_num_threads(1)
    prefix = tmp_path_factory.mktemp("features") / "laion"
    argv = ["--input", tar_inputs.input, "--output-prefix", str(prefix), "--text-tokenizer", str(sp_model),
            "--image-tokenizer", str(janus_vq_dir), "--image-size", str(IMAGE_SIZE),
            "--max-seq-length", str(MAX_SEQ_LENGTH), "--batch-size", "4",
            "--encoder", _encoder_spec(tiny_clip_dir), "--encoder-batch-size", str(ENCODER_BATCH)]
    assert build_tool.main(argv) == 0
    return prefix


@pytest.fixture(scope="module")
def folder_inputs(tmp_path_factory):
    """Two classes of two images each (PNG and JPEG files)."""
    root = tmp_path_factory.mktemp("folder") / "imagenet"
    files = []
    for class_id, name in enumerate(["n01", "n02"]):
        (root / name).mkdir(parents=True)
        for j, fmt in enumerate(["PNG", "JPEG"]):
            path = root / name / f"img{j}.{fmt.lower()}"
            path.write_bytes(encode_image(make_image(600 + 10 * class_id + j, (48, 40)), fmt))
            files.append(path)
    return root, files


def _copy_dataset(prefix: Path, target: Path) -> Path:
    for suffix in (".bin", ".idx", ".images.npy", ".images.sources.json", ".json", ".features.npy"):
        shutil.copy(f"{prefix}{suffix}", f"{target}{suffix}")
    return target


def test_build_writes_targets_of_the_same_images(tar_features_build, tar_inputs, tiny_clip_dir):
    manifest = json.loads(Path(f"{tar_features_build}.json").read_text())
    features = np.load(f"{tar_features_build}.features.npy", mmap_mode="r")
    good = tar_inputs.good
    assert features.dtype == np.float16 and features.shape == (len(good), CLIP_EMBED_DIM)
    entry = manifest["features"]
    assert entry["file"] == "laion.features.npy" and manifest["files"]["features"] == "laion.features.npy"
    assert entry["shape"] == [len(good), CLIP_EMBED_DIM] and entry["dim"] == CLIP_EMBED_DIM
    assert entry["dtype"] == "float16" and entry["aggregation"] == "cls"
    assert entry["samples_without_target"] == 0
    assert entry["encoder"]["family"] == "open_clip" and entry["encoder"]["path"] == str(tiny_clip_dir.resolve())
    assert entry["preprocessing"]["library"] == "open_clip" and entry["preprocessing"]["image_size"] == 64
    # DALI-vs-library-transform tolerance (test_dali_pipeline.py), then float16 rounding.
    reference = _reference_targets(tiny_clip_dir, [g.image for g in good])
    ours = torch.from_numpy(np.asarray(features, dtype=np.float32))
    assert torch.nn.functional.cosine_similarity(ours, reference).min() > 0.999
    assert (ours - reference).abs().max() < 0.05 * reference.abs().max()


def test_read_image_bytes_gives_the_tar_members(tar_features_build, tar_inputs):
    order = [20, 3, 0, 11, 3, 19, 7]  # across shards, repeated, out of order
    assert read_image_bytes(str(tar_features_build), order) == [tar_inputs.good[i].image for i in order]
    table = ImageRefTable.load(str(tar_features_build))
    assert read_image_bytes(table, np.arange(len(table))) == [g.image for g in tar_inputs.good]
    assert read_image_bytes(table, []) == []
    with pytest.raises(IndexError, match="21 samples"):
        read_image_bytes(table, [21])


def test_precompute_on_existing_dataset_matches_build(tmp_path, monkeypatch, tar_features_build, tiny_clip_dir):
    prefix = _copy_dataset(tar_features_build, tmp_path / "copy")
    manifest = json.loads(Path(f"{prefix}.json").read_text())
    built = np.load(f"{tar_features_build}.features.npy")
    manifest["features"] = None
    del manifest["files"]["features"]
    Path(f"{prefix}.json").write_text(json.dumps(manifest))
    Path(f"{prefix}.features.npy").unlink()

    # Killed after two checkpoints (2 x 4 rows), then resumed by rerunning the same command.
    argv = ["--data-prefix", str(prefix), "--encoder", _encoder_spec(tiny_clip_dir),
            "--encoder-batch-size", str(ENCODER_BATCH), "--device", "cpu", "--num-threads", "1"]
    real_read = builder_module.read_image_bytes
    reads = []

    def killed_on_third_read(table, indices):
        if len(reads) == 2:
            raise KeyboardInterrupt
        reads.append(list(indices))
        return real_read(table, indices)

    monkeypatch.setattr(builder_module, "read_image_bytes", killed_on_third_read)
    with pytest.raises(KeyboardInterrupt):
        add_features(str(prefix), _encoder_spec(tiny_clip_dir), batch_size=ENCODER_BATCH, batches_per_checkpoint=1)
    chunks = Path(f"{prefix}.features.npy.parts")
    assert sorted(p.name for p in chunks.glob("chunk-*.json")) == ["chunk-00000.json", "chunk-00001.json"]
    assert json.loads(Path(f"{prefix}.json").read_text())["features"] is None
    monkeypatch.setattr(builder_module, "read_image_bytes", lambda *a: reads.append(list(a[1])) or real_read(*a))
    assert precompute_tool.main(argv) == 0
    assert reads[2][0] == 8  # resumed, not restarted
    assert not chunks.exists() and not Path(f"{prefix}.features.npy.partial").exists()

    # Same table as --encoder at build time: same bytes, same preprocessing and encoder.
    table = np.load(f"{prefix}.features.npy")
    np.testing.assert_allclose(table.astype(np.float32), built.astype(np.float32), rtol=2e-3, atol=1e-4)
    after = json.loads(Path(f"{prefix}.json").read_text())
    assert after["features"] == json.loads(Path(f"{tar_features_build}.json").read_text())["features"] | {
        "file": "copy.features.npy"}
    assert after["files"]["features"] == "copy.features.npy"

    assert precompute_tool.main(argv) == 2  # a table exists: --overwrite needed
    assert precompute_tool.main(argv + ["--encoder-aggregation", "concat", "--overwrite"]) == 0
    after = json.loads(Path(f"{prefix}.json").read_text())
    assert after["features"]["aggregation"] == "concat" and after["features"]["shape"] == [21, 2 * CLIP_EMBED_DIM]
    assert np.load(f"{prefix}.features.npy").shape == (21, 2 * CLIP_EMBED_DIM)


def test_undecodable_image_gets_a_nan_row_and_is_counted(tmp_path, folder_inputs, janus_vq_dir, tiny_clip_dir):
    """A class-folder dataset whose image file is later replaced by garbage of the same size:
    its tokens stay, its target becomes NaN (no alignment target), and the manifest counts it."""
    torch.set_num_threads(1)
    root, files = folder_inputs
    root = Path(shutil.copytree(root, tmp_path / "imagenet"))
    files = [root / f.relative_to(folder_inputs[0]) for f in files]
    prefix = tmp_path / "c2i"
    build_dataset(BuildConfig(input=str(root), output_prefix=str(prefix), image_tokenizer=str(janus_vq_dir),
                              image_size=IMAGE_SIZE, max_seq_length=MAX_SEQ_LENGTH,
                              encoder=_encoder_spec(tiny_clip_dir), encoder_batch_size=3))
    built = np.load(f"{prefix}.features.npy")
    assert read_image_bytes(str(prefix), [0, 1, 2, 3]) == [f.read_bytes() for f in files]  # whole files
    reference = _reference_targets(tiny_clip_dir, [f.read_bytes() for f in files])
    assert torch.nn.functional.cosine_similarity(torch.from_numpy(built.astype(np.float32)), reference).min() > 0.999

    files[1].write_bytes(b"\x00garbage" * (files[1].stat().st_size // 8) + b"\x00" * (files[1].stat().st_size % 8))
    manifest = add_features(str(prefix), _encoder_spec(tiny_clip_dir), batch_size=3, overwrite=True).to_dict()
    table = np.load(f"{prefix}.features.npy")
    assert np.isnan(table[1]).all() and not np.isnan(table[[0, 2, 3]]).any()
    np.testing.assert_allclose(table[[0, 2, 3]].astype(np.float32), built[[0, 2, 3]].astype(np.float32),
                               rtol=2e-3, atol=1e-4)
    assert manifest["features"]["samples_without_target"] == 1

    files[0].unlink()
    with pytest.raises(FileNotFoundError, match="img0.png"):
        read_image_bytes(str(prefix), [0])


def test_featurizer_masks_undecodable_bytes(tiny_clip_dir):
    featurizer = TargetFeaturizer.load(_encoder_spec(tiny_clip_dir), "avgpool", batch_size=2)
    good = encode_image(make_image(700, (50, 30)), "JPEG")
    rows = featurizer([good, b"not an image", b"", good])
    assert rows.dtype == np.float16 and rows.shape == (4, CLIP_EMBED_DIM)
    assert np.isnan(rows[1:3]).all() and not np.isnan(rows[[0, 3]]).any()
    assert np.array_equal(rows[0], rows[3]) and featurizer.num_missing == 2


def test_bad_encoder_spec_names_the_flag(tmp_path, folder_inputs, janus_vq_dir, caplog):
    argv = ["--input", str(folder_inputs[0]), "--output-prefix", str(tmp_path / "x"), "--image-tokenizer",
            str(janus_vq_dir), "--image-size", str(IMAGE_SIZE), "--max-seq-length", str(MAX_SEQ_LENGTH),
            "--encoder", f"open_clip:local-dir:{tmp_path / 'absent'}"]
    assert build_tool.main(argv) == 2
    assert "--encoder open_clip:local-dir:" in caplog.text and "open_clip_config.json" in caplog.text


def _without_features(built, prefix: Path) -> Path:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix = _copy_dataset(built, prefix)
    manifest = json.loads(Path(f"{prefix}.json").read_text())
    manifest["features"] = None
    del manifest["files"]["features"]
    Path(f"{prefix}.json").write_text(json.dumps(manifest))
    Path(f"{prefix}.features.npy").unlink()
    return prefix


def test_precompute_under_torchrun_equals_one_process(tmp_path, tar_features_build, tiny_clip_dir):
    """Two processes share the chunks (build_ranks.py); the table and manifest equal a one-process run."""
    single = _without_features(tar_features_build, tmp_path / "one" / "laion")
    argv = ["--encoder", _encoder_spec(tiny_clip_dir), "--encoder-batch-size", str(ENCODER_BATCH),
            "--device", "cpu", "--num-threads", "1"]
    assert precompute_tool.main(["--data-prefix", str(single), *argv]) == 0
    prefix = _without_features(tar_features_build, tmp_path / "two" / "laion")
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--max-restarts=0",
                           "--master-addr=127.0.0.1", f"--master-port={free_port()}",
                           str(_TOOLS / "precompute_features.py"), "--data-prefix", str(prefix), *argv],
                          capture_output=True, text=True, timeout=300, cwd=root,
                          env={**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Path(f"{prefix}.features.npy").read_bytes() == Path(f"{single}.features.npy").read_bytes()
    assert json.loads(Path(f"{prefix}.json").read_text()) == json.loads(Path(f"{single}.json").read_text())
    assert not Path(f"{prefix}.features.npy.parts").exists()


def test_an_interrupted_run_of_the_earlier_format_is_continued(tmp_path, monkeypatch, tar_features_build,
                                                              tiny_clip_dir):
    """The earlier version kept one .partial table and a rows_done count: its finished rows are adopted
    as chunks (not computed again) and the result equals a fresh run."""
    prefix = _without_features(tar_features_build, tmp_path / "old")
    built = np.load(f"{tar_features_build}.features.npy")
    partial = np.lib.format.open_memmap(f"{prefix}.features.npy.partial", mode="w+", dtype=np.float16,
                                        shape=built.shape)
    partial[:8] = built[:8]
    partial.flush()
    del partial
    encoder = TargetFeaturizer.load(_encoder_spec(tiny_clip_dir), "cls", ENCODER_BATCH, "cpu", 1)
    settings = {"encoder": encoder.encoder.identity, "batch_size": ENCODER_BATCH, "num_rows": len(built)}
    Path(f"{prefix}.features.progress.json").write_text(json.dumps(
        {"settings": json.loads(json.dumps(settings)), "rows_done": 8, "samples_without_target": 0}))
    real_read = builder_module.read_image_bytes
    reads = []
    monkeypatch.setattr(builder_module, "read_image_bytes", lambda *a: reads.append(list(a[1])) or real_read(*a))
    add_features(str(prefix), _encoder_spec(tiny_clip_dir), batch_size=ENCODER_BATCH, batches_per_checkpoint=1)
    assert reads[0][0] == 8 and sum(len(r) for r in reads) == len(built) - 8
    assert not Path(f"{prefix}.features.progress.json").exists()
    table = np.load(f"{prefix}.features.npy")
    np.testing.assert_array_equal(table[:8], built[:8])
    np.testing.assert_allclose(table.astype(np.float32), built.astype(np.float32), rtol=2e-3, atol=1e-4)
