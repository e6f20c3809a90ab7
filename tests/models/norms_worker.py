"""Worker: the per-head q/k LayerNorm of a TP rank against transformers' ChameleonLayerNorm."""

from __future__ import annotations

import dataclasses

import torch
from megatron.core import parallel_state

from arra_megatron import tiny
from arra_megatron.models.norms import ARRATransformerConfig, PerHeadKeyLayerNorm, PerHeadQueryLayerNorm
from arra_megatron.runtime.distributed import initialize_model_parallel

HEADS, GROUPS, HEAD_DIM = 4, 2, 16


def reference(heads: int, seed: int):
    """A ChameleonLayerNorm with random weight and bias, and an input [s, b, heads, head_dim]."""
    from transformers.models.chameleon.modeling_chameleon import ChameleonLayerNorm

    gen = torch.Generator().manual_seed(seed)
    norm = ChameleonLayerNorm((heads, HEAD_DIM))
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(heads, HEAD_DIM, generator=gen))
        norm.bias.copy_(0.5 * torch.randn(heads, HEAD_DIM, generator=gen))
    x = 3 * torch.randn(5, 2, heads, HEAD_DIM, generator=gen) + 1
    return norm, x


def run(tp: int) -> dict:
    initialize_model_parallel(tp, 1)
    config = ARRATransformerConfig(**dataclasses.asdict(tiny.tiny_config(tp)) | {"qk_layernorm": True,
                                                                               "qk_layernorm_per_head": True})
    rank = parallel_state.get_tensor_model_parallel_rank()
    out = {}
    for name, cls, heads in (("query", PerHeadQueryLayerNorm, HEADS), ("key", PerHeadKeyLayerNorm, GROUPS)):
        ref, x = reference(heads, seed=len(name))
        ours = cls(config, HEAD_DIM, eps=1e-5)
        local = heads // tp
        rows = slice(rank * local, (rank + 1) * local)
        with torch.no_grad():  # every rank holds all heads' rows and applies its own heads'
            ours.weight.copy_(ref.weight.reshape(-1))
            ours.bias.copy_(ref.bias.reshape(-1))
            got = ours(x[:, :, rows])
            want = ref(x.reshape(-1, heads, HEAD_DIM)).reshape(x.shape)[:, :, rows]
        from megatron.core.transformer.utils import sharded_state_dict_default

        sharded = sharded_state_dict_default(ours, prefix="decoder.layers.0.self_attention.q_layernorm.")
        tensor = sharded["decoder.layers.0.self_attention.q_layernorm.weight"]
        out[name] = {
            "max_diff": (got - want).abs().max().item(),
            "global_shape": tuple(tensor.global_shape),
            "global_offset": tuple(tensor.global_offset),
            # replicated over TP (see models/norms.py): Megatron sums their grads over TP by name
            "tensor_model_parallel": getattr(ours.weight, "tensor_model_parallel", False),
        }
    from arra_megatron.models.specs import get_decoder_block_spec

    out["specs"] = {}
    for backend in ("local", "cpu"):  # te needs Transformer Engine and a GPU
        attention = get_decoder_block_spec(config, backend).layer_specs[0].submodules.self_attention.submodules
        out["specs"][backend] = (attention.q_layernorm.__name__, attention.k_layernorm.__name__)
    return out
