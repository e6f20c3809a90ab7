"""Image folders, a random-weight InceptionV3 file and a tiny open_clip model for the evaluation tests."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import List

import pytest
import torch

from arra_megatron.tiny import CLIP_EMBED_DIM, save_open_clip
from tests.support.inception import save_random_inception
from tests.support.tiny_data import make_image

TOOLS = Path(__file__).resolve().parents[2] / "tools"
IMAGE_SIDE = 176  # torchmetrics MS-SSIM (5 scales, 11-pixel window): side // 16 > 10


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_images(folder: Path, seeds: List[int], side: int = IMAGE_SIDE, prompts: bool = True) -> List[Path]:
    """PNG images ``{seed:06d}.png`` and a ``samples.jsonl`` prompt index, as a generator writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for seed in seeds:
        files.append(folder / f"{seed:06d}.png")
        make_image(seed, (side, side)).save(files[-1])
    if prompts:
        lines = [json.dumps({"file": f.name, "prompt": f"a photo of thing number {seed}"}) for f, seed in zip(files, seeds)]
        (folder / "samples.jsonl").write_text("\n".join(lines) + "\n")
    return files


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory) -> Path:
    return save_random_inception(tmp_path_factory.mktemp("inception") / "pt_inception-random.pth")


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory) -> Path:
    """A tiny open_clip CLIP whose text tower takes open_clip's own tokenizer (49408 BPE ids)."""
    model_cfg = {"embed_dim": CLIP_EMBED_DIM,
                 "vision_cfg": {"image_size": 64, "patch_size": 16, "width": 64, "layers": 2, "head_width": 32},
                 "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    preprocess_cfg = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}
    return save_open_clip(tmp_path_factory.mktemp("clip"), model_cfg, preprocess_cfg, seed=3)
