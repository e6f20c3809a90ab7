"""Model assembly for training: GPT chunks, the ARRA tap, DDP, and Megatron's hooks on the config."""

from __future__ import annotations

import dataclasses
from typing import List, Optional

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.transformer_config import TransformerConfig

from arra_megatron.alignment.tap import ARRATap
from arra_megatron.config import ARRAConfig
from arra_megatron.models.gpt import build_gpt_chunks
from arra_megatron.models.specs import Backend, default_backend
from arra_megatron.runtime import cpu_mode


@dataclasses.dataclass
class ModelBundle:
    """What a training or evaluation step needs about the model."""

    chunks: List[DistributedDataParallel]
    tap: Optional[ARRATap]
    config: TransformerConfig


def build_model(
    config: TransformerConfig,
    arra: ARRAConfig,
    vocab_size: int,
    max_sequence_length: int,
    ddp_config: Optional[DistributedDataParallelConfig] = None,
    backend: Optional[Backend] = None,
    seed: int = 1234,
    **gpt_kwargs,
) -> ModelBundle:
    """GPT chunks for this rank, the ARRA tap on layer k (when enabled), each chunk in DDP.

    Sets ``config.finalize_model_grads_func`` and, with overlapped grad reduce,
    ``no_sync_func`` / ``grad_sync_func`` as Megatron-LM does, so the schedules
    reduce gradients once per step.
    """
    arra.validate_for_model(
        num_layers=config.num_layers,
        hidden_size=config.hidden_size,
        tensor_model_parallel_size=config.tensor_model_parallel_size,
    )
    if arra.enabled and config.context_parallel_size > 1:
        raise NotImplementedError(
            "ARRA does not support --context-parallel-size > 1 yet (L_GVA would need a CP reduction); "
            "use tensor or pipeline parallelism instead"
        )
    backend = backend or default_backend()
    chunks = build_gpt_chunks(config, vocab_size, max_sequence_length, backend=backend, **gpt_kwargs)
    tap = None
    if arra.enabled:
        tap = ARRATap(arra, config, seed=seed, te_linear=backend == "te")
        chunks = tap.attach(chunks)
    if not cpu_mode.is_enabled():  # as Megatron-LM's get_model: some modules are built on the host
        chunks = [chunk.cuda(torch.cuda.current_device()) for chunk in chunks]
    if config.bf16 or config.fp16:
        # Megatron-LM's order: half-precision wrapper inside DDP; the projector follows the
        # model's dtype (the GVA loss itself is computed in fp32, see alignment/loss.py).
        chunks = [Float16Module(config, chunk) for chunk in chunks]
    ddp_config = ddp_config or DistributedDataParallelConfig()
    wrapped = [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk,
                                disable_bucketing=index > 0)
        for index, chunk in enumerate(chunks)
    ]
    config.finalize_model_grads_func = finalize_model_grads
    if ddp_config.overlap_grad_reduce:
        no_sync = [chunk.no_sync for chunk in wrapped]
        grad_sync = [chunk.start_grad_sync for chunk in wrapped]
        config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
        config.grad_sync_func = grad_sync[0] if len(grad_sync) == 1 else grad_sync
    return ModelBundle(wrapped, tap, config)
