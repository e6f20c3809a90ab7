"""Megatron-Core dist checkpointing of model chunks (and the ARRA projector beside them).

The sharded state dict holds one entry per model chunk (``model`` or ``model0``,
``model1``, ... under virtual pipeline), as Megatron-LM writes them; tensor keys
are global, so a checkpoint saved in one TP / PP / VPP layout loads into any other.
"""

from __future__ import annotations

import logging
from typing import Dict, List

import torch
from megatron.core import dist_checkpointing

logger = logging.getLogger(__name__)


def _unwrap_ddp(chunk: torch.nn.Module) -> torch.nn.Module:
    from megatron.core.distributed import DistributedDataParallel

    return chunk.module if isinstance(chunk, DistributedDataParallel) else chunk


def model_sharded_state_dict(chunks: List[torch.nn.Module]) -> Dict[str, dict]:
    modules = [_unwrap_ddp(c) for c in chunks]
    if len(modules) == 1:
        return {"model": modules[0].sharded_state_dict()}
    return {f"model{i}": m.sharded_state_dict() for i, m in enumerate(modules)}


def save_model_weights(chunks: List[torch.nn.Module], checkpoint_dir: str) -> None:
    """Save the model chunks' weights (projector included) with dist checkpointing. Collective."""
    dist_checkpointing.save(model_sharded_state_dict(chunks), checkpoint_dir)


def load_model_weights(chunks: List[torch.nn.Module], checkpoint_dir: str) -> None:
    """Load weights saved in any parallel layout into this layout's chunks. Collective.

    Only Megatron's ``_extra_state`` entries (FP8 metadata, absent for non-TE
    layers) may be missing; any other missing or unexpected key is an error.
    """
    sharded = model_sharded_state_dict(chunks)
    loaded = dist_checkpointing.load(sharded, checkpoint_dir)
    for key, chunk in zip(sharded, chunks):
        result = _unwrap_ddp(chunk).load_state_dict(loaded[key], strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        if missing or result.unexpected_keys:
            raise RuntimeError(
                f"checkpoint {checkpoint_dir} does not fit the model: missing {missing}, "
                f"unexpected {list(result.unexpected_keys)}"
            )
