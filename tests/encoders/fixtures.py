"""Tiny random target encoders saved in their libraries' own formats (no downloads).

- CLIP: ``arra_megatron.tiny.make_tiny_clip`` (``make demo`` uses it too): open_clip ``CLIP``
  with a 2-layer ViT (64 px, patch 16, width 64) and a 1-layer text tower, saved as open_clip's
  local-dir (``open_clip_config.json`` + ``open_clip_model.safetensors``).
- BiomedCLIP-style: the same format with a timm vision tower (``timm_model_name``:
  timm's ``test_vit``, 6 blocks of width 64, dynamic image size) and ``timm_pool: ""``
  / ``timm_proj: "linear"`` as BiomedCLIP's config has. BiomedCLIP's text tower is a HF
  PubMedBERT; a tiny open_clip text tower stands in (images never touch it).
- SAM: transformers ``SamModel`` with a 2-layer 64 px vision encoder, ``save_pretrained``
  plus a ``SamImageProcessor`` sized to match.

The session fixtures that build each model once: ``tiny_clip_dir`` and ``tiny_sam_dir`` in
tests/conftest.py, ``tiny_biomedclip_dir`` in tests/encoders/conftest.py.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import List, Tuple

import numpy as np
import torch
from PIL import Image

from arra_megatron.tiny import CLIP_EMBED_DIM, CLIP_TEXT_CFG, save_open_clip

SAM_CHANNELS = 24


def make_tiny_biomedclip(directory: Path) -> Path:
    model_cfg = {"embed_dim": CLIP_EMBED_DIM,
                 "vision_cfg": {"image_size": 64, "timm_model_name": "test_vit", "timm_model_pretrained": False,
                                "timm_pool": "", "timm_proj": "linear"},
                 "text_cfg": CLIP_TEXT_CFG}
    preprocess_cfg = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}
    return save_open_clip(directory, model_cfg, preprocess_cfg, seed=1)


def make_tiny_sam(directory: Path, vision_only: bool = False) -> Path:
    from transformers import SamConfig, SamImageProcessor, SamModel, SamVisionConfig, SamVisionModel

    torch.manual_seed(2)
    vision = SamVisionConfig(hidden_size=32, output_channels=SAM_CHANNELS, num_hidden_layers=2, num_attention_heads=2,
                             image_size=64, patch_size=16, mlp_dim=64, window_size=2, global_attn_indexes=[1],
                             num_pos_feats=16)
    if vision_only:
        model = SamVisionModel(vision)
    else:
        model = SamModel(SamConfig(vision_config=vision.to_dict(),
                                   prompt_encoder_config={"hidden_size": SAM_CHANNELS, "image_size": 64,
                                                          "patch_size": 16, "image_embedding_size": 4},
                                   mask_decoder_config={"hidden_size": SAM_CHANNELS, "num_hidden_layers": 1,
                                                        "mlp_dim": 32, "num_attention_heads": 2,
                                                        "iou_head_hidden_dim": 16}))
    model.save_pretrained(str(directory))
    SamImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64}).save_pretrained(str(directory))
    return directory


def encode(image: Image.Image, fmt: str, **params) -> np.ndarray:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return np.frombuffer(buffer.getvalue(), dtype=np.uint8)


def smooth_image(seed: int, size: Tuple[int, int], mode: str = "RGB") -> Image.Image:
    """A smooth random picture (low-frequency colour fields): resize filters of different
    libraries agree on it far better than on pixel noise, as they do on photographs."""
    rng = np.random.default_rng(seed)
    w, h = size
    coarse = rng.integers(0, 256, (4, 4, 4), dtype=np.uint8)
    rgba = np.asarray(Image.fromarray(coarse, "RGBA").resize((w, h), Image.Resampling.BICUBIC))
    rgba = np.clip(rgba.astype(np.int16) + rng.integers(-6, 7, rgba.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(rgba, "RGBA").convert(mode) if mode != "RGBA" else Image.fromarray(rgba, "RGBA")


def image_zoo() -> List[Tuple[str, np.ndarray]]:
    """Encoded images of different sizes, aspect ratios, formats and modes."""
    return [
        ("rgb_jpeg_wide", encode(smooth_image(0, (96, 50)), "JPEG", quality=95)),
        ("rgb_jpeg_tall", encode(smooth_image(1, (45, 120)), "JPEG", quality=90)),
        ("rgb_png_small", encode(smooth_image(2, (37, 29)), "PNG")),
        ("rgb_png_exact", encode(smooth_image(3, (64, 64)), "PNG")),
        ("gray_png", encode(smooth_image(4, (80, 71), "L"), "PNG")),
        ("gray_jpeg", encode(smooth_image(5, (70, 90), "L"), "JPEG", quality=95)),
        ("rgba_png", encode(smooth_image(6, (81, 67), "RGBA"), "PNG")),
    ]
