"""The projector A_phi that maps h_k (hidden size H) to the target space (D).

``mlp`` (default): Linear(H -> D) -> GELU -> Linear(D -> D).
``pool`` (ablation): adaptive max pool of the H features down to D; no parameters.

The projector is replicated on every tensor-parallel rank. Its parameters are
marked ``sequence_parallel`` like Megatron's layernorm weights: under sequence
parallel each TP rank sees only its slice of positions, and
``finalize_model_grads`` sums their gradients over the TP group.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from arra_megatron.config import ARRAConfig


class MLPProjector(MegatronModule):
    def __init__(self, config: TransformerConfig, hidden_size: int, target_dim: int, seed: int = 0):
        super().__init__(config=config)
        self.linear_fc1 = torch.nn.Linear(hidden_size, target_dim, dtype=config.params_dtype)
        self.linear_fc2 = torch.nn.Linear(target_dim, target_dim, dtype=config.params_dtype)
        # torch's Linear initialisation (as the reference implementations' nn.Linear
        # projector), drawn from a generator of our own so every TP / DP rank starts from
        # the same weights. Its fan-in scaling keeps |A_phi(h)| near |h|: a projector
        # initialised with the model's small init_method_std would give tiny outputs, and
        # the cosine loss's gradient grows as 1 / |A_phi(h)|.
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for linear in (self.linear_fc1, self.linear_fc2):
                bound = 1.0 / math.sqrt(linear.in_features)
                for param in (linear.weight, linear.bias):
                    param.copy_(torch.empty(param.shape).uniform_(-bound, bound, generator=gen))
        for param in self.parameters():
            param.sequence_parallel = True

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(F.gelu(self.linear_fc1(hidden)))


class PoolProjector(MegatronModule):
    def __init__(self, config: TransformerConfig, hidden_size: int, target_dim: int):
        super().__init__(config=config)
        if target_dim > hidden_size:
            raise ValueError(f"pool projector cannot grow {hidden_size} features to {target_dim}")
        self.target_dim = target_dim

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.adaptive_max_pool1d(hidden.unsqueeze(1), self.target_dim).squeeze(1)


def build_projector(arra: ARRAConfig, config: TransformerConfig, seed: int = 0) -> MegatronModule:
    """A_phi for ``arra.projector`` on a model with ``config.hidden_size``."""
    if arra.projector == "mlp":
        return MLPProjector(config, config.hidden_size, arra.target_dim, seed=seed)
    return PoolProjector(config, config.hidden_size, arra.target_dim)
