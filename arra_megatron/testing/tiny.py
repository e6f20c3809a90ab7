"""Tiny GPT configurations and synthetic ARRA samples with the real sequence layout.

Layout of one sample (ARRA_METHOD.md):
    [BOS] condition [BOI] x_1 .. x_n [EOI] [EOS] [PAD ...]
Vocabulary: PAD 0, BOS 1, EOS 2, BOI 3, EOI 4, text 5..63, image 64..127.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from arra_megatron.data.samples import collate, sample_from_document

PAD, BOS, EOS, BOI, EOI = 0, 1, 2, 3, 4
TEXT_RANGE = (5, 64)
IMAGE_TOKEN_RANGE = (64, 128)
VOCAB_SIZE = 128


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


def microbatches(samples: Dict[str, torch.Tensor], micro_batch_size: int, data_parallel_rank: int = 0,
                 data_parallel_size: int = 1) -> List[Dict[str, torch.Tensor]]:
    """This data-parallel rank's contiguous share of the global batch, cut into micro-batches."""
    n = next(iter(samples.values())).size(0)
    if n % (micro_batch_size * data_parallel_size):
        raise ValueError(f"global batch {n} is not divisible by micro batch {micro_batch_size} x DP {data_parallel_size}")
    per_rank = n // data_parallel_size
    start = data_parallel_rank * per_rank
    return [
        {k: v[i:i + micro_batch_size] for k, v in samples.items() if k != "has_image"}
        for i in range(start, start + per_rank, micro_batch_size)
    ]
