"""Precomputed targets from the python: and timm: encoder kinds: each feature row is the encoder applied
to that sample's own image (read back through the image references); bad specs stop the builder
before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from arra_megatron.data.builder import BuildConfig, add_features, build_dataset
from arra_megatron.data.image_refs import read_image_bytes
from arra_megatron.encoders import load_encoder
from arra_megatron.encoders.preprocess import reference_preprocess
from tests.data.conftest import IMAGE_SIZE, MAX_SEQ_LENGTH
from tests.data.test_features import build_tool
from tests.encoders.custom_encoders import MODULE, POOLED_DIM
from tests.support.tiny_data import encode_image, make_image

torch.set_num_threads(1)
POOLED = f"python:{MODULE}:pooled"


@pytest.fixture(scope="module")
def class_folders(tmp_path_factory):
    """Three classes of three images: sizes and aspect ratios differ, PNG and JPEG, one greyscale."""
    root = tmp_path_factory.mktemp("custom") / "images"
    for c in range(3):
        (root / f"c{c}").mkdir(parents=True)
        for j in range(3):
            seed = 10 * c + j
            image = make_image(seed, (36 + 7 * j, 30 + 5 * c))
            if (c, j) == (1, 2):
                image = image.convert("L")
            fmt = "JPEG" if j == 1 else "PNG"
            (root / f"c{c}" / f"img{j}.{fmt.lower()}").write_bytes(encode_image(image, fmt, **(
                {"quality": 95} if fmt == "JPEG" else {})))
    return root


def _rows_match_own_images(prefix: Path, encoder, atol: float) -> None:
    """Row i against the encoder on sample i's image (library transform): close, and closer than to any
    other sample's target, so a table whose rows are shifted or permuted fails."""
    table = torch.from_numpy(np.load(f"{prefix}.features.npy").astype(np.float32))
    images = read_image_bytes(str(prefix), np.arange(len(table)))
    expected = encoder.encode(reference_preprocess(encoder.spec, images))
    assert table.shape == expected.shape and torch.isfinite(table).all()
    distances = torch.cdist(table, expected)
    assert torch.equal(distances.argmin(dim=1), torch.arange(len(table)))
    off_diagonal = distances + torch.eye(len(table)) * 1e9
    assert off_diagonal.min() > 20 * (table - expected).abs().max()  # targets far apart, rows on their own
    torch.testing.assert_close(table, expected, rtol=0, atol=atol)


def test_python_encoder_rows_are_their_samples_images(tmp_path, class_folders, janus_vq_dir, user_module,
                                                      timm_weights):
    prefix = tmp_path / "c2i"
    manifest = build_dataset(BuildConfig(input=str(class_folders), output_prefix=str(prefix),
                                         image_tokenizer=str(janus_vq_dir), image_size=IMAGE_SIZE,
                                         max_seq_length=MAX_SEQ_LENGTH, num_parts=2, encoder=POOLED,
                                         encoder_aggregation="avgpool", encoder_batch_size=2)).to_dict()
    encoder = load_encoder(POOLED, "avgpool")
    entry = manifest["features"]
    assert entry["shape"] == [9, POOLED_DIM] and entry["samples_without_target"] == 0
    assert entry["encoder"] == json.loads(json.dumps(encoder.identity))
    assert entry["encoder"]["family"] == "python" and entry["preprocessing"]["library"] == "python"
    # DALI vs the library transform (~0.005 in normalised pixels, averaged over 8 x 8 cells), then float16.
    _rows_match_own_images(prefix, encoder, atol=0.02)

    # tools/precompute_features.py's path with a timm encoder, on the same dataset.
    path, _ = timm_weights["test_resnet"]
    add_features(str(prefix), f"timm:test_resnet:{path}", "avgpool", batch_size=4, overwrite=True)
    after = json.loads(Path(f"{prefix}.json").read_text())["features"]
    assert after["encoder"]["family"] == "timm" and after["encoder"]["arch"] == "test_resnet"
    _rows_match_own_images(prefix, load_encoder(f"timm:test_resnet:{path}", "avgpool"), atol=0.02)


@pytest.mark.parametrize("spec, message", [
    ("python:arra_no_such_module:pooled", "cannot import 'arra_no_such_module'"),
    (f"python:{MODULE}:absent", "has no function 'absent'"),
    (f"python:{MODULE}:wrong_shape", "gave torch.float32 (2, 3, 32, 32) for 2 images"),
    ("python:nofunction", "must look like one of"),
])
def test_bad_python_encoder_exits_2_before_writing(tmp_path, class_folders, janus_vq_dir, user_module, caplog,
                                                    spec, message):
    out = tmp_path / "out"
    out.mkdir()
    argv = ["--input", str(class_folders), "--output-prefix", str(out / "x"), "--image-tokenizer", str(janus_vq_dir),
            "--image-size", str(IMAGE_SIZE), "--max-seq-length", str(MAX_SEQ_LENGTH), "--encoder", spec]
    assert build_tool.main(argv) == 2
    assert f"--encoder {spec} / --encoder-aggregation cls: " in caplog.text and message in caplog.text
    assert list(out.iterdir()) == []
