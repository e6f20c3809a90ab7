"""Layer specs: the one place that chooses Transformer Engine, local or CPU modules.

* ``te``: Transformer Engine layers (GPU with TE installed; needed for FP8).
* ``local``: Megatron-Core's own modules (GPU without TE).
* ``cpu``: Megatron-Core's local modules with PyTorch SDPA core attention and a
  torch norm that supports sequence parallel (CPU mode, see runtime/cpu_mode.py).

Swapping implementations is a spec choice, as in Megatron-Core's
``gpt_layer_specs.py``; forward code never branches on the backend.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from arra_megatron.runtime import cpu_mode
from arra_megatron.runtime.capabilities import has_transformer_engine

Backend = Literal["te", "local", "cpu"]


class TorchNorm:
    """LayerNorm / RMSNorm from torch that, unlike Megatron's ``WrappedTorchNorm``,
    accepts sequence parallel: its parameters carry ``sequence_parallel`` so that
    ``finalize_model_grads`` sums their gradients over the TP group."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **kwargs):
        if config.layernorm_zero_centered_gamma:
            raise ValueError("zero-centered gamma is not supported by the CPU norm; unset it in CPU mode")
        if config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        elif config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        else:
            raise ValueError(f"normalization {config.normalization!r} is not supported by the CPU spec")
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


class SDPADotProductAttention(DotProductAttention):
    """Megatron's core attention computed with ``torch.nn.functional.scaled_dot_product_attention``.

    Same parameters, checkpoint layout and head layout as ``DotProductAttention``
    (inputs ``[s, b, heads, d]``, output ``[s, b, heads * d]``); causal masking is
    built into SDPA instead of an explicit mask tensor.
    """

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPA core attention supports neither packed sequences nor attention bias")
        if self.config.apply_query_key_layer_scaling:
            raise NotImplementedError("apply_query_key_layer_scaling is not supported by SDPA core attention")
        groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if groups > 1:
            key = key.repeat_interleave(groups, dim=2)
            value = value.repeat_interleave(groups, dim=2)
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        # Megatron passes attn_mask_type=no_mask when decoding over a KV cache (static inference).
        causal = attention_mask is None and attn_mask_type != AttnMaskType.no_mask
        mask = None if attention_mask is None else ~attention_mask
        if causal and q.size(2) != k.size(2):
            # Queries are the last positions of the keys (a chunk over a KV cache); SDPA's
            # is_causal aligns them top-left, so give the bottom-right causal mask explicitly.
            mask = torch.ones(q.size(2), k.size(2), dtype=torch.bool, device=q.device).tril(k.size(2) - q.size(2))
            causal = False
        dropout = self.attention_dropout.p if self.training else 0.0
        rng = (tensor_parallel.get_cuda_rng_tracker().fork() if dropout and not self.config.sequence_parallel
               else contextlib.nullcontext())
        with rng:
            context = F.scaled_dot_product_attention(
                q, k, v,
                attn_mask=mask,
                dropout_p=dropout,
                is_causal=causal,
                scale=self.softmax_scale,
            )
        # [b, n, s, d] -> [s, b, n * d]
        return context.permute(2, 0, 1, 3).reshape(context.size(2), context.size(0), self.hidden_size_per_partition)




def default_backend() -> Backend:
    """``cpu`` in CPU mode, ``te`` when Transformer Engine can run, ``local`` otherwise."""
    if cpu_mode.is_enabled():
        return "cpu"
    return "te" if has_transformer_engine() else "local"


def _cpu_layer_spec(spec: ModuleSpec) -> ModuleSpec:
    sub = spec.submodules
    attention = sub.self_attention
    attn_sub = dataclasses.replace(
        attention.submodules,
        core_attention=SDPADotProductAttention,
        q_layernorm=TorchNorm if attention.submodules.q_layernorm is not IdentityOp else IdentityOp,
        k_layernorm=TorchNorm if attention.submodules.k_layernorm is not IdentityOp else IdentityOp,
    )
    sub = dataclasses.replace(
        sub,
        input_layernorm=TorchNorm,
        pre_mlp_layernorm=TorchNorm,
        self_attention=dataclasses.replace(attention, submodules=attn_sub),
    )
    return dataclasses.replace(spec, submodules=sub)


def _per_head_qk_norm_spec(spec: ModuleSpec) -> ModuleSpec:
    """``spec`` with Chameleon's per-head q/k LayerNorm (models/norms.py), whatever the backend."""
    from arra_megatron.models.norms import PerHeadKeyLayerNorm, PerHeadQueryLayerNorm

    attention = spec.submodules.self_attention
    attn_sub = dataclasses.replace(attention.submodules, q_layernorm=PerHeadQueryLayerNorm,
                                   k_layernorm=PerHeadKeyLayerNorm)
    sub = dataclasses.replace(spec.submodules, self_attention=dataclasses.replace(attention, submodules=attn_sub))
    return dataclasses.replace(spec, submodules=sub)


def get_decoder_block_spec(
    config: TransformerConfig, backend: Optional[Backend] = None, vp_stage: Optional[int] = None
) -> TransformerBlockSubmodules:
    """The decoder block spec (this pipeline stage's layers) for ``backend``."""
    backend = backend or default_backend()
    if backend == "te" and not has_transformer_engine():
        raise RuntimeError("layer spec 'te' needs Transformer Engine and a GPU; use 'local' or 'cpu'")
    if backend == "cpu" and not cpu_mode.is_enabled():
        raise RuntimeError("layer spec 'cpu' needs CPU mode (arra_megatron.runtime.cpu_mode.enable_cpu_mode)")
    if config.num_moe_experts:
        raise NotImplementedError("ARRA models are dense GPTs; --num-experts is not supported")
    block = get_gpt_decoder_block_spec(
        config, use_transformer_engine=backend == "te", normalization=config.normalization, vp_stage=vp_stage
    )
    if backend == "cpu":
        block = TransformerBlockSubmodules(
            layer_specs=[_cpu_layer_spec(s) for s in block.layer_specs], layer_norm=TorchNorm
        )
    if getattr(config, "qk_layernorm_per_head", False):
        block = dataclasses.replace(block, layer_specs=[_per_head_qk_norm_spec(s) for s in block.layer_specs])
    return block
