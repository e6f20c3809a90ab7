"""Generated raw inputs with every bad case, and their expected build results."""

from __future__ import annotations

import importlib.util
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import torch
import torch.nn.functional as F

from arra_megatron.tokenization.image import ImageTokenizer, load_rgb
from tests.support.tiny_data import encode_image, image_modes_zoo, make_image, random_caption, write_tar

IMAGE_SIZE = 32
TOKENS_PER_IMAGE = 64
MAX_SEQ_LENGTH = 100  # 64 image tokens + 4 special tokens + at most 32 caption tokens


@dataclass
class Good:
    """A sample the build must keep: its caption (or class), image bytes and where they live."""

    key: str
    image: bytes
    source: str
    offset: int = 0
    caption: Optional[str] = None
    class_id: Optional[int] = None


@dataclass
class Inputs:
    input: str
    good: List[Good] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)


def reference_codes(vq_dir: Path, images: List[bytes]) -> List[List[int]]:
    """Codes computed without the builder: the VQ encoder, then LlamaGen's cosine lookup (Janus)
    or transformers' own quantizer (Chameleon)."""
    tok = ImageTokenizer(vq_dir, IMAGE_SIZE)
    pixels = torch.stack([tok.preprocess(load_rgb(data)) for data in images])
    model = tok.model
    with torch.no_grad():
        if tok.kind == "ChameleonVQVAE":
            return model.encode(pixels).image_tokens.view(len(images), -1).tolist()
        z = model.quant_conv(model.encoder(pixels)).permute(0, 2, 3, 1).reshape(-1, model.config.embed_dim)
        cosine = F.normalize(z, dim=-1) @ F.normalize(model.quantize.embedding.weight, dim=-1).T
        return cosine.argmax(dim=1).view(len(images), -1).tolist()


def _group(key: str, image: Optional[bytes], caption: Optional[bytes], ext: str = "jpg") -> list:
    members = []
    if image is not None:
        members.append((f"{key}.{ext}", image))
    if caption is not None:
        members.append((f"{key}.txt", caption))
    members.append((f"{key}.json", json.dumps({"key": key}).encode()))
    return members


def _add_shard(inputs: Inputs, path: Path, groups: list, good: Dict[str, str]) -> None:
    offsets = write_tar(path, [m for g in groups for m in g])
    for name, (offset, size) in offsets.items():
        key, ext = name.split(".", 1)
        if key in good and ext != "txt" and ext != "json":
            data = path.read_bytes()[offset:offset + size]
            inputs.good.append(Good(key, data, str(path), offset, caption=good[key]))


@pytest.fixture(scope="session")
def tar_inputs(tmp_path_factory) -> Inputs:
    """Five shards, {00000..00004}.tar: bad samples, odd image modes, a truncated shard, a missing
    shard and a garbage shard; 21 good samples."""
    root = tmp_path_factory.mktemp("shards")
    rng = random.Random(1)
    inputs = Inputs(input=str(root / "{00000..00004}.tar"))
    jpeg = lambda seed, size=(40, 32): encode_image(make_image(seed, size), "JPEG", quality=85)  # noqa: E731

    # Shard 0: good samples among every bad-sample case.
    groups, good = [], {}
    for i in range(8):
        good[f"s0_{i:02d}"] = random_caption(rng, rng.randint(3, 8))
        groups.append(_group(f"s0_{i:02d}", jpeg(i, (32 + 8 * i, 48)), f" {good[f's0_{i:02d}']}\n".encode()))
    good["s0_long"] = random_caption(rng, 60)  # past --max-seq-length: text truncated, sample kept
    groups.append(_group("s0_long", jpeg(100), good["s0_long"].encode()))
    truncated_jpeg = jpeg(101, (64, 64))
    groups += [
        _group("s0_corrupt", b"\xff\xd8\xff" + bytes(rng.randrange(256) for _ in range(300)), b"a cat"),
        _group("s0_truncated", truncated_jpeg[: len(truncated_jpeg) // 2], b"a dog"),
        _group("s0_empty", b"", b"a tree"),
        _group("s0_nocaption", jpeg(102), None),
        _group("s0_emptycaption", jpeg(103), b"  \n"),
        _group("s0_latin1", jpeg(104), "caf\xe9 photo".encode("latin-1")),
        _group("s0_noimage", None, b"a house"),
    ]
    inputs.skipped.update(image_undecodable=2, image_empty=1, caption_missing=1, caption_empty=1,
                          caption_not_utf8=1, image_missing=1)
    _add_shard(inputs, root / "00000.tar", groups, good)

    # Shard 1: images whose modes need converting, all good.
    groups, good = [], {}
    for label, ext, data in image_modes_zoo(7) + [("rgb_a", "jpg", jpeg(200)), ("rgb_b", "png",
                                                  encode_image(make_image(201), "PNG"))]:
        good[f"s1_{label}"] = random_caption(rng, 5)
        groups.append(_group(f"s1_{label}", data, good[f"s1_{label}"].encode(), ext))
    _add_shard(inputs, root / "00001.tar", groups, good)

    # Shard 2: cut inside the image data of its 4th sample: 3 good samples, then damage.
    groups, good = [], {}
    for i in range(5):
        good[f"s2_{i}"] = random_caption(rng, 4)
        groups.append(_group(f"s2_{i}", jpeg(300 + i), good[f"s2_{i}"].encode()))
    path = root / "00002.tar"
    offsets = write_tar(path, [m for g in groups for m in g])
    offset, size = offsets["s2_3.jpg"]
    path.write_bytes(path.read_bytes()[: offset + size // 2])
    data = path.read_bytes()
    for i in range(3):
        offset, size = offsets[f"s2_{i}.jpg"]
        inputs.good.append(Good(f"s2_{i}", data[offset:offset + size], str(path), offset, caption=good[f"s2_{i}"]))
    inputs.skipped.update(tar_truncated=1)

    # Shard 3 is missing; shard 4 is not a tar at all.
    (root / "00004.tar").write_bytes(bytes(rng.randrange(256) for _ in range(2048)))
    inputs.skipped.update(tar_unreadable=2)
    return inputs


# ----------------------------------------------------------------------------- tools/build_indexed_dataset.py
_spec = importlib.util.spec_from_file_location(
    "build_indexed_dataset", Path(__file__).resolve().parents[2] / "tools" / "build_indexed_dataset.py")
build_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_tool)


def build_argv(inputs: Inputs, prefix, sp_model, janus_vq_dir, *extra) -> List[str]:
    """The builder's flags for ``inputs`` (captions, the Janus VQ) plus ``extra``."""
    return ["--input", inputs.input, "--output-prefix", str(prefix), "--text-tokenizer", str(sp_model),
            "--image-tokenizer", str(janus_vq_dir), "--image-size", str(IMAGE_SIZE),
            "--max-seq-length", str(MAX_SEQ_LENGTH), "--batch-size", "4", *extra]


def built_files(prefix) -> Dict[str, bytes]:
    return {suffix: Path(f"{prefix}{suffix}").read_bytes() for suffix in (".bin", ".idx", ".images.npy")}


@pytest.fixture(scope="session")
def tar_build(tmp_path_factory, tar_inputs, sp_model, janus_vq_dir):
    """The one-process build of ``tar_inputs``: the reference every other build must equal."""
    torch.set_num_threads(1)
    prefix = tmp_path_factory.mktemp("build") / "laion"
    assert build_tool.main(build_argv(tar_inputs, prefix, sp_model, janus_vq_dir)) == 0
    return prefix
