"""Per-head query/key LayerNorm (Chameleon's QK-norm) as a Megatron-Core attention submodule.

Chameleon normalises each query and key head over its ``head_dim`` values (a plain
LayerNorm's statistics) and then applies *that head's own* gain and bias:

    q[s, b, h, :] <- (q - mean(q)) / sqrt(var(q) + eps) * w[h, :] + b[h, :]

before the rotary embedding. Megatron-Core's ``qk_layernorm`` instead shares one
``head_dim``-sized weight over all heads and uses the model's norm type (RMSNorm for
Chameleon), so it cannot hold these weights.

TP layout. Every TP rank stores the weight and bias of *all* ``heads x head_dim`` values
(flat, 1-D, so the optimizer treats them as norm parameters: no weight decay) and applies
the rows of the heads it computes. They are replicated parameters on purpose, not split
over TP: Megatron-Core 0.19's ``finalize_model_grads`` sums the gradients of every
parameter whose name contains ``q_layernorm`` / ``k_layernorm`` over the TP group whenever
``qk_layernorm`` is set (``_allreduce_non_tensor_model_parallel_grads``), whatever its
``tensor_model_parallel`` attribute says. For a head-split parameter that sum would add
different heads' gradients together; for this replicated one each rank's gradient is
non-zero only in its own heads' rows, so the sum *is* the full gradient, identical on every
rank (measured: tests/conversion/test_export_layouts.py, TP2 and TP2 + SP against TP1).
Dist checkpointing stores one ``[heads * head_dim]`` tensor per layer (a replica per rank);
the gradient norm counts it once (TP rank 0), like any replicated parameter.

Selected by ``ARRATransformerConfig.qk_layernorm_per_head`` (the trainer's
``--qk-layernorm-per-head``) in every layer spec (``models/specs.py``).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig


@dataclasses.dataclass
class ARRATransformerConfig(TransformerConfig):
    """Megatron-Core's TransformerConfig plus the switches of this project's modules."""

    qk_layernorm_per_head: bool = False
    """Query/key LayerNorm with a weight and bias per attention head (``PerHeadLayerNorm``);
    needs ``qk_layernorm``."""

    def __post_init__(self):
        super().__post_init__()
        if self.qk_layernorm_per_head and not self.qk_layernorm:
            raise ValueError("qk_layernorm_per_head needs qk_layernorm (--qk-layernorm)")


class PerHeadLayerNorm(torch.nn.Module):
    """LayerNorm over the last axis of ``[..., heads, head_dim]`` with per-head weight and bias,
    applied to this TP rank's heads. Subclasses say whether they serve the queries or the keys."""

    heads_attribute = "num_attention_heads"

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **kwargs):
        from megatron.core import parallel_state

        super().__init__()
        heads = getattr(config, self.heads_attribute) or config.num_attention_heads
        tp = config.tensor_model_parallel_size
        if heads % tp:
            raise ValueError(f"per-head q/k LayerNorm: {heads} heads ({self.heads_attribute}) do not split over "
                             f"--tensor-model-parallel-size {tp}")
        self.heads, self.head_dim, self.eps = heads // tp, hidden_size, eps
        # This rank's heads, as the QKV projection splits them (contiguously, by key/value group).
        self.first_head = parallel_state.get_tensor_model_parallel_rank() * self.heads if tp > 1 else 0
        self.weight = torch.nn.Parameter(torch.ones(heads * hidden_size, dtype=config.params_dtype))
        self.bias = torch.nn.Parameter(torch.zeros(heads * hidden_size, dtype=config.params_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.size(-2) != self.heads or x.size(-1) != self.head_dim:
            raise ValueError(f"per-head LayerNorm holds {self.heads} heads of {self.head_dim}; got {tuple(x.shape)}")
        rows = slice(self.first_head * self.head_dim, (self.first_head + self.heads) * self.head_dim)
        normed = F.layer_norm(x, (self.head_dim,), None, None, self.eps)
        return normed * self.weight[rows].view(self.heads, self.head_dim) + self.bias[rows].view(self.heads,
                                                                                                 self.head_dim)

    def extra_repr(self) -> str:
        return f"heads={self.heads} from head {self.first_head}, head_dim={self.head_dim}, eps={self.eps}"


class PerHeadQueryLayerNorm(PerHeadLayerNorm):
    heads_attribute = "num_attention_heads"


class PerHeadKeyLayerNorm(PerHeadLayerNorm):
    heads_attribute = "num_query_groups"
