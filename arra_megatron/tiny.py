"""Tiny random-initialised models and synthetic ARRA samples (no downloads, no pytest).

What ``make demo`` (examples/demo/run_demo.py), the benchmarks (tools/bench/) and the tests
build their runs from:

- ``tiny_config``: a small Llama-style GPT as a Megatron-Core ``TransformerConfig``;
- ``make_janus_vq``: a random transformers ``JanusVQVAE``, the image tokenizer;
- ``make_tiny_clip`` / ``save_open_clip``: a random open_clip CLIP in its local-dir format,
  the target encoder (an offline machine cannot fetch pretrained weights);
- ``synthetic_samples``: samples in the real sequence layout, assembled by the data
  package's own ``sample_from_document`` and ``collate``.

Layout of one sample (ARRA_METHOD.md):
    [BOS] condition [BOI] x_1 .. x_n [EOI] [EOS] [PAD ...]
Vocabulary: the mock data's (``data/mock.py``) of ``VOCAB_SIZE`` 128: PAD 0, BOS 1, EOS 2,
BOI 3, EOI 4, text 5..63, image 64..127.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from arra_megatron.data.mock import BOI, BOS, EOI, EOS, PAD, mock_image_token_range
from arra_megatron.data.samples import collate, sample_from_document

VOCAB_SIZE = 128
IMAGE_TOKEN_RANGE = mock_image_token_range(VOCAB_SIZE)
TEXT_RANGE = (EOI + 1, IMAGE_TOKEN_RANGE[0])
CLIP_EMBED_DIM = 32
#: The text tower of the tiny CLIPs (images never touch it).
CLIP_TEXT_CFG = {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}


# ----------------------------------------------------------------------------- GPT and samples
def tiny_config(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: Optional[int] = None,
    sequence_parallel: bool = False,
    num_layers: int = 4,
    hidden_size: int = 64,
    num_attention_heads: int = 4,
    num_query_groups: int = 2,
    **overrides,
) -> TransformerConfig:
    """A Llama-style GPT (RMSNorm, SwiGLU, RoPE, GQA, no biases) in fp32, dropout off."""
    kwargs = dict(
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_attention_heads=num_attention_heads,
        num_query_groups=num_query_groups,
        ffn_hidden_size=2 * hidden_size,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        sequence_parallel=sequence_parallel,
        pipeline_dtype=torch.float32,
        params_dtype=torch.float32,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def synthetic_samples(
    num_samples: int,
    seq_length: int,
    num_image_tokens: int = 16,
    target_dim: int = 16,
    seed: int = 0,
    text_only_every: int = 0,
    image_token_range=IMAGE_TOKEN_RANGE,
) -> Dict[str, torch.Tensor]:
    """Samples in the ARRA layout with random condition lengths, padded to ``seq_length``.

    Every ``text_only_every``-th sample (when > 0) has no image: [BOS] text [EOS] [PAD...].
    Loss mask: image-token and EOI targets. Returns tensors with a leading sample dimension.
    """
    gen = torch.Generator().manual_seed(seed)
    has_image = torch.ones(num_samples, dtype=torch.bool)
    lo, hi = image_token_range
    max_cond = seq_length - num_image_tokens - 4
    if max_cond < 1:
        raise ValueError("seq_length too short for the image span")
    samples = []
    for i in range(num_samples):
        cond_len = int(torch.randint(1, max_cond + 1, (1,), generator=gen))
        cond = torch.randint(*TEXT_RANGE, (cond_len,), generator=gen)
        if text_only_every and i % text_only_every == text_only_every - 1:
            has_image[i] = False
            doc = torch.cat([torch.tensor([BOS]), cond, torch.tensor([EOS])])
        else:
            image = torch.randint(lo, hi, (num_image_tokens,), generator=gen)
            doc = torch.cat([torch.tensor([BOS]), cond, torch.tensor([BOI]), image, torch.tensor([EOI, EOS])])
        samples.append(sample_from_document(doc.numpy(), seq_length, image_token_range, EOI, PAD))
    batch = collate(samples)
    batch["arra_targets"] = torch.randn(num_samples, target_dim, generator=gen)
    batch["has_image"] = has_image
    return batch


# ----------------------------------------------------------------------------- image tokenizer and encoder
def make_janus_vq(directory: Path, seed: int = 0) -> Path:
    """Random JanusVQVAE: 4x downsampling, 64 codes of dim 8, codebook rows of very different norms.

    Different row norms make Euclidean (transformers) and cosine (LlamaGen) lookups disagree,
    which is what the tests must be able to see.
    """
    from transformers import JanusVQVAE, JanusVQVAEConfig

    torch.manual_seed(seed)
    config = JanusVQVAEConfig(embed_dim=8, num_embeddings=64, latent_channels=32, base_channels=32,
                              channel_multiplier=[1, 1, 2], num_res_blocks=1, num_patches=8,
                              projection_dim=32, image_token_embed_dim=32)
    model = JanusVQVAE(config).eval()
    with torch.no_grad():
        weight = model.quantize.embedding.weight
        weight.copy_(torch.randn_like(weight) * torch.logspace(-1, 1, weight.shape[0])[:, None])
    model.save_pretrained(str(directory))
    return directory


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
    """A random CLIP (64 px ViT, 2 layers, ``CLIP_EMBED_DIM``-d embeddings) with ``resize_mode`` preprocessing."""
    model_cfg = {"embed_dim": CLIP_EMBED_DIM,
                 "vision_cfg": {"image_size": 64, "patch_size": 16, "width": 64, "layers": 2, "head_width": 32},
                 "text_cfg": CLIP_TEXT_CFG}
    preprocess_cfg = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711],
                      "interpolation": "bicubic", "resize_mode": resize_mode}
    return save_open_clip(directory, model_cfg, preprocess_cfg)
