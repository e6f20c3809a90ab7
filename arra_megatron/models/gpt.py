"""Build this rank's Megatron-Core GPTModel chunk(s) with the layer spec for the backend."""

from __future__ import annotations

from typing import List, Optional

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from arra_megatron.models.specs import Backend, get_decoder_block_spec
from arra_megatron.runtime import cpu_mode


def build_gpt_chunks(
    config: TransformerConfig,
    vocab_size: int,
    max_sequence_length: int,
    backend: Optional[Backend] = None,
    **kwargs,
) -> List[GPTModel]:
    """One GPTModel per virtual pipeline stage held by this rank (one without VPP);
    ``kwargs`` as ``build_gpt_chunk``."""
    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    return [
        build_gpt_chunk(
            config, vocab_size, max_sequence_length, backend=backend, vp_stage=vp_stage,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            **kwargs,
        )
        for vp_stage in (range(vpp) if vpp else [None])
    ]


def build_gpt_chunk(
    config: TransformerConfig,
    vocab_size: int,
    max_sequence_length: int,
    backend: Optional[Backend] = None,
    vp_stage: Optional[int] = None,
    pre_process: bool = True,
    post_process: bool = True,
    position_embedding_type: str = "rope",
    rotary_base: int = 10000,
    share_embeddings_and_output_weights: bool = False,
    real_vocab_size: Optional[int] = None,
    pg_collection=None,
) -> GPTModel:
    """The GPTModel chunk of virtual stage ``vp_stage`` with the layer spec for ``backend``.

    ``vocab_size`` must already be padded to a multiple of the TP size. ``real_vocab_size``:
    the ids the tokenizer can produce (default: all of ``vocab_size``); the logits of the
    padding ids above it are masked out (``mask_padded_logits``), so the loss, every
    gradient and sampling are the same whatever the padding, which differs between TP sizes.
    """
    cpu_mode.configure(config)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if vocab_size % tp:
        raise ValueError(f"vocabulary size {vocab_size} must be padded to a multiple of TP {tp}")
    if real_vocab_size is not None and not 0 < real_vocab_size <= vocab_size:
        raise ValueError(f"vocabulary of {real_vocab_size} ids does not fit the padded size {vocab_size}")
    extra = {} if pg_collection is None else {"pg_collection": pg_collection}
    chunk = GPTModel(
        config=config,
        transformer_layer_spec=get_decoder_block_spec(config, backend, vp_stage=vp_stage),
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=share_embeddings_and_output_weights,
        position_embedding_type=position_embedding_type,
        rotary_base=rotary_base,
        vp_stage=vp_stage,
        **extra,
    )
    if post_process and real_vocab_size is not None and real_vocab_size < vocab_size:
        mask_padded_logits(chunk, real_vocab_size, vocab_size)
    return chunk


def mask_padded_logits(chunk: GPTModel, real_vocab_size: int, padded_vocab_size: int) -> None:
    """Give the padding ids (``real_vocab_size`` and up) the lowest logit, in place, on every call
    of ``chunk``'s output layer.

    Megatron-LM pads the vocabulary to a multiple of ``--make-vocab-size-divisible-by`` x TP and
    lets the padded rows join the softmax: then the loss depends on the TP size (a 579-id
    vocabulary pads to 640 at TP1 and 768 at TP2, and 128 extra zero logits add
    log(768 / 640) = 0.18 to the loss). Masked, their softmax probability is exactly 0: the
    loss, its gradient (none reaches the padded rows) and sampling do not see them. The output
    layer gives this rank's vocabulary slice, or the whole vocabulary when it gathers.
    """
    tp_rank = parallel_state.get_tensor_model_parallel_rank()

    def hook(module, args, output):
        logits = output[0] if isinstance(output, tuple) else output
        width = logits.size(-1)
        start = 0 if width == padded_vocab_size else tp_rank * width
        first_padded = max(real_vocab_size - start, 0)
        if first_padded < width:
            logits[..., first_padded:] = torch.finfo(logits.dtype).min
        return output

    chunk.output_layer.register_forward_hook(hook)


def pad_vocab_size(vocab_size: int, tensor_model_parallel_size: int, multiple: int = 128) -> int:
    """Megatron-LM's rule: pad to a multiple of ``multiple * TP``."""
    step = multiple * tensor_model_parallel_size
    return ((vocab_size + step - 1) // step) * step
