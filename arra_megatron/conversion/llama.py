"""Llama family (``LlamaForCausalLM``) <-> Megatron-Core GPTModel, one tensor at a time.

Both sides use RMSNorm, SwiGLU, non-interleaved rotary embeddings and no biases, so
only two layouts differ (design/MEGATRON_NOTES.md, "Hugging Face mapping"):

* fused QKV: for each key/value group g, its ``nh/ng`` query heads, then k[g], then v[g];
* gated MLP: ``linear_fc1 = cat([gate, up])`` computing ``silu(gate) * up``.

The vocabulary is padded to Megatron-LM's size on import (zero rows) and cut back on export.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional, Tuple

import torch

from arra_megatron.conversion.common import ConversionError, GPTArchitecture, pad_rows, split_layer_name

ARCHITECTURES = ("LlamaForCausalLM",)

# Megatron per-layer name -> Hugging Face per-layer name, for the one-to-one tensors.
_LAYER_DIRECT = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ConversionError(f"rope type {rope_type!r} (rope scaling) is not supported: Megatron's rotary "
                              "embedding here is the plain one")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise ConversionError("config.json has no rope_theta")
    return float(theta)


def architecture_from_hf(config, model_type: str = "llama") -> GPTArchitecture:
    """The Megatron architecture of a transformers ``LlamaConfig`` (or of a config of the same
    shape, e.g. Chameleon's, with its ``model_type``); fails on what the mapping would not
    reproduce exactly (biases, another activation, rope scaling, tensor-parallel split)."""
    if getattr(config, "model_type", None) != model_type:
        raise ConversionError(f"model_type {config.model_type!r} is not a {model_type} model")
    problems = []
    if config.hidden_act != "silu":
        problems.append(f"hidden_act {config.hidden_act!r} (needs silu)")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        problems.append("attention_bias / mlp_bias (Megatron's Llama layers have no biases)")
    if getattr(config, "pretraining_tp", 1) != 1:
        problems.append(f"pretraining_tp {config.pretraining_tp}")
    if problems:
        raise ConversionError(f"unsupported {model_type} configuration: " + "; ".join(problems))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return GPTArchitecture(
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        ffn_hidden_size=config.intermediate_size,
        num_attention_heads=config.num_attention_heads,
        num_query_groups=config.num_key_value_heads or config.num_attention_heads,
        kv_channels=head_dim,
        norm_epsilon=float(config.rms_norm_eps),
        rotary_base=_rope_theta(config),
        vocab_size=config.vocab_size,
        tie_embeddings=bool(config.tie_word_embeddings),
        max_position_embeddings=config.max_position_embeddings,
        model_type=model_type,
    )


def hf_config_kwargs(arch: GPTArchitecture) -> dict:
    """The Llama-shaped transformers config fields reproducing ``arch`` exactly (no head_dim:
    not every family's config takes one)."""
    if arch.rotary_base != int(arch.rotary_base):
        raise ConversionError(f"rotary base {arch.rotary_base} is not an integer (Megatron-LM's --rotary-base is)")
    return dict(
        vocab_size=arch.vocab_size,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.ffn_hidden_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_query_groups,
        hidden_act="silu",
        max_position_embeddings=arch.max_position_embeddings,
        rms_norm_eps=arch.norm_epsilon,
        rope_parameters={"rope_type": "default", "rope_theta": float(arch.rotary_base)},
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=arch.tie_embeddings,
    )


def hf_config(arch: GPTArchitecture, source: Optional[dict] = None, **extra):
    """The transformers ``LlamaConfig`` reproducing ``arch`` exactly (``source``, the import
    record, adds nothing for Llama)."""
    from transformers import LlamaConfig

    return LlamaConfig(**hf_config_kwargs(arch), head_dim=arch.kv_channels, architectures=list(ARCHITECTURES),
                       **extra)


def expected_hf_names(arch: GPTArchitecture) -> set:
    """The Hugging Face tensor names of ``arch`` (what import requires, export writes)."""
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not arch.tie_embeddings:
        names.add("lm_head.weight")
    per_layer = ["input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
                 "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
                 "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"]
    names.update(f"model.layers.{i}.{p}" for i in range(arch.num_layers) for p in per_layer)
    return names


# ---------------------------------------------------------------------------------- QKV layout
def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: GPTArchitecture) -> torch.Tensor:
    """[nh d, H], [ng d, H], [ng d, H] -> Megatron's [(nh + 2 ng) d, H], grouped."""
    ng, d = arch.num_query_groups, arch.kv_channels
    per_group = arch.num_attention_heads // ng
    hidden = q.size(-1)
    fused = torch.cat([q.reshape(ng, per_group * d, hidden), k.reshape(ng, d, hidden), v.reshape(ng, d, hidden)],
                      dim=1)
    return fused.reshape(-1, hidden)


def split_qkv(qkv: torch.Tensor, arch: GPTArchitecture) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of ``fuse_qkv``."""
    ng, d = arch.num_query_groups, arch.kv_channels
    per_group = arch.num_attention_heads // ng
    hidden = qkv.size(-1)
    expected = (arch.num_attention_heads + 2 * ng) * d
    if qkv.size(0) != expected:
        raise ConversionError(f"linear_qkv has {qkv.size(0)} rows; heads {arch.num_attention_heads}, groups {ng}, "
                              f"head dim {d} need {expected}")
    grouped = qkv.reshape(ng, (per_group + 2) * d, hidden)
    q, k, v = grouped.split([per_group * d, d, d], dim=1)
    return q.reshape(-1, hidden).clone(), k.reshape(-1, hidden).clone(), v.reshape(-1, hidden).clone()


# ---------------------------------------------------------------------------------- import
def megatron_tensor(name: str, hf: Callable[[str], torch.Tensor], arch: GPTArchitecture,
                    padded_vocab_size: int) -> torch.Tensor:
    """The full Megatron tensor ``name`` (TP1/PP1 name, global layer index), built from the
    Hugging Face tensors that ``hf(name)`` returns."""
    if name == "embedding.word_embeddings.weight":
        return pad_rows(hf("model.embed_tokens.weight"), padded_vocab_size)
    if name == "output_layer.weight":
        return pad_rows(hf("model.embed_tokens.weight" if arch.tie_embeddings else "lm_head.weight"),
                        padded_vocab_size)
    if name == "decoder.final_layernorm.weight":
        return hf("model.norm.weight")
    parts = split_layer_name(name)
    if parts is None:
        raise ConversionError(f"no Llama tensor maps to Megatron parameter {name}")
    index, local = parts
    prefix = f"model.layers.{index}."
    if local in _LAYER_DIRECT:
        return hf(prefix + _LAYER_DIRECT[local])
    if local == "self_attention.linear_qkv.weight":
        return fuse_qkv(*(hf(prefix + f"self_attn.{p}_proj.weight") for p in "qkv"), arch)
    if local == "mlp.linear_fc1.weight":
        return torch.cat([hf(prefix + "mlp.gate_proj.weight"), hf(prefix + "mlp.up_proj.weight")])
    raise ConversionError(f"no Llama tensor maps to Megatron parameter {name}")


# ---------------------------------------------------------------------------------- export
def hf_tensors(name: str, tensor: torch.Tensor, arch: GPTArchitecture) -> Iterator[Tuple[str, torch.Tensor]]:
    """The Hugging Face tensors made from the one full Megatron tensor ``name`` (TP1/PP1 name,
    global layer index); the vocabulary padding is dropped. Each Hugging Face tensor depends
    on exactly one Megatron tensor, so export can stream tensor by tensor."""
    if name == "embedding.word_embeddings.weight":
        yield "model.embed_tokens.weight", tensor[: arch.vocab_size].clone()
        return
    if name == "output_layer.weight":
        if not arch.tie_embeddings:
            yield "lm_head.weight", tensor[: arch.vocab_size].clone()
        return
    if name == "decoder.final_layernorm.weight":
        yield "model.norm.weight", tensor
        return
    parts = split_layer_name(name)
    if parts is None:
        raise ConversionError(f"Megatron tensor {name} has no Llama counterpart")
    index, local = parts
    prefix = f"model.layers.{index}."
    if local in _LAYER_DIRECT:
        yield prefix + _LAYER_DIRECT[local], tensor
    elif local == "self_attention.linear_qkv.weight":
        q, k, v = split_qkv(tensor, arch)
        yield prefix + "self_attn.q_proj.weight", q
        yield prefix + "self_attn.k_proj.weight", k
        yield prefix + "self_attn.v_proj.weight", v
    elif local == "mlp.linear_fc1.weight":
        if tensor.size(0) != 2 * arch.ffn_hidden_size:
            raise ConversionError(f"linear_fc1 has {tensor.size(0)} rows, expected 2 x ffn {arch.ffn_hidden_size}")
        gate, up = tensor.chunk(2, dim=0)
        yield prefix + "mlp.gate_proj.weight", gate.clone()
        yield prefix + "mlp.up_proj.weight", up.clone()
    else:
        raise ConversionError(f"Megatron tensor {name} has no Llama counterpart")
