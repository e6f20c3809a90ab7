"""Tiny random open_clip CLIP saved in open_clip's local-dir format (no downloads).

Used by the tests and by ``make demo`` (whose targets come from this random encoder:
no pretrained weights can be fetched on an offline machine).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CLIP_EMBED_DIM = 32
_TEXT_CFG = {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}


def save_open_clip(directory: Path, model_cfg: dict, preprocess_cfg: dict, seed: int = 0) -> Path:
    """Random open_clip CLIP with ``model_cfg``, written the way open_clip's local-dir loader reads it."""
    import open_clip
    import safetensors.torch

    torch.manual_seed(seed)
    model = open_clip.CLIP(**model_cfg)
    directory.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(model.state_dict(), str(directory / "open_clip_model.safetensors"))
    (directory / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, indent=2))
    return directory


def make_tiny_clip(directory: Path, resize_mode: str = "shortest") -> Path:
    model_cfg = {"embed_dim": CLIP_EMBED_DIM,
                 "vision_cfg": {"image_size": 64, "patch_size": 16, "width": 64, "layers": 2, "head_width": 32},
                 "text_cfg": _TEXT_CFG}
    preprocess_cfg = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711],
                      "interpolation": "bicubic", "resize_mode": resize_mode}
    return save_open_clip(directory, model_cfg, preprocess_cfg)
