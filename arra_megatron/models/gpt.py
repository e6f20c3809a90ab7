"""Build this rank's Megatron-Core GPTModel chunk(s) with the layer spec for the backend."""

from __future__ import annotations

from typing import List, Optional

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
    position_embedding_type: str = "rope",
    rotary_base: int = 10000,
    share_embeddings_and_output_weights: bool = False,
) -> List[GPTModel]:
    """One GPTModel per virtual pipeline stage held by this rank (one without VPP).

    ``vocab_size`` must already be padded to a multiple of the TP size.
    """
    cpu_mode.configure(config)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if vocab_size % tp:
        raise ValueError(f"vocabulary size {vocab_size} must be padded to a multiple of TP {tp}")
    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    stages = range(vpp) if vpp else [None]
    chunks = []
    for vp_stage in stages:
        chunk = GPTModel(
            config=config,
            transformer_layer_spec=get_decoder_block_spec(config, backend, vp_stage=vp_stage),
            vocab_size=vocab_size,
            max_sequence_length=max_sequence_length,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            share_embeddings_and_output_weights=share_embeddings_and_output_weights,
            position_embedding_type=position_embedding_type,
            rotary_base=rotary_base,
            vp_stage=vp_stage,
        )
        chunks.append(chunk)
    return chunks


def pad_vocab_size(vocab_size: int, tensor_model_parallel_size: int, multiple: int = 128) -> int:
    """Megatron-LM's rule: pad to a multiple of ``multiple * TP``."""
    step = multiple * tensor_model_parallel_size
    return ((vocab_size + step - 1) // step) * step
