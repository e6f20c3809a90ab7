"""Llama family (``LlamaForCausalLM``) <-> Megatron-Core GPTModel.

Both sides use RMSNorm, SwiGLU, non-interleaved rotary embeddings and no biases, so only
two layouts differ (design/MEGATRON_NOTES.md, "Hugging Face mapping"): the fused QKV and
the gated fc1 (``family.fused_qkv``, ``family.gated_fc1``); the rest is the name table.
"""

from __future__ import annotations

from typing import Optional

from arra_megatron.conversion.common import ConversionError, GPTArchitecture
from arra_megatron.conversion.family import ModelFamily, fused_qkv, gated_fc1


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


class Llama(ModelFamily):
    model_type = "llama"
    architectures = ("LlamaForCausalLM",)
    names = {
        "embedding.word_embeddings.weight": "model.embed_tokens.weight",
        "decoder.final_layernorm.weight": "model.norm.weight",
        "output_layer.weight": "lm_head.weight",
    }
    layer_names = {
        "input_layernorm.weight": "input_layernorm.weight",
        "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
        "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
        "mlp.linear_fc2.weight": "mlp.down_proj.weight",
    }
    layer_transforms = {
        "self_attention.linear_qkv.weight": fused_qkv("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                                      "self_attn.v_proj.weight"),
        "mlp.linear_fc1.weight": gated_fc1("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    }

    def architecture_from_hf(self, config) -> GPTArchitecture:
        """The architecture of a transformers ``LlamaConfig`` (or of a config of the same shape,
        e.g. Chameleon's); fails on biases, another activation, rope scaling, a
        tensor-parallel split."""
        if getattr(config, "model_type", None) != self.model_type:
            raise ConversionError(f"model_type {config.model_type!r} is not a {self.model_type} model")
        problems = []
        if config.hidden_act != "silu":
            problems.append(f"hidden_act {config.hidden_act!r} (needs silu)")
        if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
            problems.append("attention_bias / mlp_bias (Megatron's Llama layers have no biases)")
        if getattr(config, "pretraining_tp", 1) != 1:
            problems.append(f"pretraining_tp {config.pretraining_tp}")
        if problems:
            raise ConversionError(f"unsupported {self.model_type} configuration: " + "; ".join(problems))
        return GPTArchitecture(
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            ffn_hidden_size=config.intermediate_size,
            num_attention_heads=config.num_attention_heads,
            num_query_groups=config.num_key_value_heads or config.num_attention_heads,
            kv_channels=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
            norm_epsilon=float(config.rms_norm_eps),
            rotary_base=_rope_theta(config),
            vocab_size=config.vocab_size,
            tie_embeddings=bool(config.tie_word_embeddings),
            max_position_embeddings=config.max_position_embeddings,
            model_type=self.model_type,
        )

    @staticmethod
    def config_kwargs(arch: GPTArchitecture) -> dict:
        """The Llama-shaped transformers config fields reproducing ``arch`` (no head_dim: not
        every family's config takes one)."""
        if arch.rotary_base != int(arch.rotary_base):
            raise ConversionError(f"rotary base {arch.rotary_base} is not an integer (Megatron-LM's --rotary-base is)")
        return dict(
            vocab_size=arch.vocab_size, hidden_size=arch.hidden_size, intermediate_size=arch.ffn_hidden_size,
            num_hidden_layers=arch.num_layers, num_attention_heads=arch.num_attention_heads,
            num_key_value_heads=arch.num_query_groups, hidden_act="silu",
            max_position_embeddings=arch.max_position_embeddings, rms_norm_eps=arch.norm_epsilon,
            rope_parameters={"rope_type": "default", "rope_theta": float(arch.rotary_base)},
            attention_bias=False, mlp_bias=False, tie_word_embeddings=arch.tie_embeddings,
        )

    def hf_config(self, arch: GPTArchitecture, source: Optional[dict] = None, **extra):
        """The transformers ``LlamaConfig`` reproducing ``arch`` exactly."""
        from transformers import LlamaConfig

        return LlamaConfig(**self.config_kwargs(arch), head_dim=arch.kv_channels,
                           architectures=list(self.architectures), **extra)
