"""Fixtures that more than one test directory uses, each built once per session: tiny tokenizers
and VQ models, tiny target encoders (CLIP, SAM, timm models), a user's ``python:`` encoder
module, and (once per test module) a small built dataset with targets. The builders live beside the tests that own them (``tests/support/tiny_data.py``,
``tests/encoders/``) or in the package (``arra_megatron.tiny``, which ``make demo`` uses too).
A fixture that one directory alone uses lives in that directory's conftest.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from arra_megatron.tiny import make_janus_vq, make_tiny_clip
from tests.encoders.custom_encoders import MODULE, save_timm, write_user_module
from tests.encoders.fixtures import make_tiny_sam
from tests.support.tiny_data import make_chameleon_vq, make_hf_tokenizer, make_image, train_sentencepiece

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- tokenizers
@pytest.fixture(scope="session")
def sp_model(tmp_path_factory) -> Path:
    """A BPE sentencepiece model trained on generated captions."""
    return train_sentencepiece(tmp_path_factory.mktemp("sentencepiece"))


@pytest.fixture(scope="session")
def hf_tokenizer_dir(tmp_path_factory) -> Path:
    """A word-level Hugging Face fast tokenizer directory."""
    return make_hf_tokenizer(tmp_path_factory.mktemp("hf_tokenizer"))


@pytest.fixture(scope="session")
def janus_vq_dir(tmp_path_factory) -> Path:
    """A random JanusVQVAE directory (64 codes, 4x downsampling)."""
    torch.set_num_threads(1)
    return make_janus_vq(tmp_path_factory.mktemp("janus_vq"))


@pytest.fixture(scope="session")
def chameleon_vq_dir(tmp_path_factory) -> Path:
    """A random ChameleonVQVAE directory (64 codes, 4x downsampling)."""
    torch.set_num_threads(1)
    return make_chameleon_vq(tmp_path_factory.mktemp("chameleon_vq"))


# ----------------------------------------------------------------------------- target encoders
@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A random open_clip CLIP in its local-dir format."""
    return make_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="session")
def tiny_sam_dir(tmp_path_factory) -> Path:
    """A random transformers SamModel directory."""
    return make_tiny_sam(tmp_path_factory.mktemp("sam"))


@pytest.fixture(scope="session")
def timm_weights(tmp_path_factory) -> dict:
    """{arch: (weights file, model)} for a ViT (class token), a ResNet and a ConvNeXt (head.fc)."""
    directory = tmp_path_factory.mktemp("timm")
    return {arch: (directory / f"{arch}.safetensors", save_timm(arch, directory / f"{arch}.safetensors"))
            for arch in ("test_vit", "test_resnet", "test_convnext")}


@pytest.fixture(scope="session")
def user_module(tmp_path_factory):
    """The directory holding the user encoder module ``MODULE`` and its weights, on ``sys.path``
    and on ``PYTHONPATH`` (for tools run as subprocesses) for the session."""
    directory = tmp_path_factory.mktemp("user_encoders")
    write_user_module(directory)
    old_path = os.environ.get("PYTHONPATH")
    sys.path.insert(0, str(directory))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(directory)] + ([old_path] if old_path else []))
    yield directory
    sys.path.remove(str(directory))
    sys.modules.pop(MODULE, None)
    if old_path is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = old_path


# ----------------------------------------------------------------------------- datasets
@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """24 images in 3 class folders built by tools/build_indexed_dataset.py (a random Janus VQ,
    targets of ``make_tiny_clip``) at ``data/ds``, with the CLIP at ``clip`` (tests/training
    and tests/gpu train on it)."""
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
