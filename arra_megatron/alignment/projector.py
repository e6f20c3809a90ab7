"""The projector A_phi that maps h_k (hidden size H) to the target space (D).

``mlp`` (default): Linear(H -> D) -> GELU -> Linear(D -> D).
``pool`` (ablation): adaptive max pool of the H features down to D; no parameters.

The projector is replicated on every tensor-parallel rank. Its parameters are
marked ``sequence_parallel`` like Megatron's layernorm weights: under sequence
parallel each TP rank sees only its slice of positions, and
``finalize_model_grads`` sums their gradients over the TP group.

Precision. With the Transformer Engine layer spec the two linears are TE ``Linear``
layers. The projector runs inside the forward hook of layer k, that is inside the
FP8 autocast Megatron-Core opens for layer k, so with ``--fp8-format`` its matmuls
run in FP8 under the model's recipe; without it they are plain bf16/fp32 GEMMs. FP8
GEMMs need both feature sizes divisible by 16 (32 for MXFP8): a projector whose
shapes are not falls back to torch linears (bf16) with a one-time warning. The
tap projects every position (micro-batch x local sequence rows); when that row
count is not a multiple of 32 the rows are zero-padded for TE and the padding is
cut off the output. The loss itself is
computed in fp32 (alignment/loss.py).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from arra_megatron.config import ARRAConfig

logger = logging.getLogger(__name__)

#: TE FP8 GEMMs need 2-D inputs whose row count is a multiple of 8 (16 for some
#: recipes, 32 for MXFP8 blocks); 32 satisfies all of them.
TE_ROW_MULTIPLE = 32


def fp8_feature_multiple(config: TransformerConfig) -> int:
    """The feature-size multiple FP8 GEMMs need under ``config``'s recipe."""
    return 32 if config.fp8_recipe == "mxfp8" else 16


class MLPProjector(MegatronModule):
    def __init__(self, config: TransformerConfig, hidden_size: int, target_dim: int, seed: int = 0,
                 te_linear: bool = False):
        super().__init__(config=config)
        device = torch.cuda.current_device()  # "cpu" in CPU mode (runtime/cpu_mode.py)
        if te_linear:
            import transformer_engine.pytorch as te

            def linear(n_in: int, n_out: int) -> torch.nn.Module:
                return te.Linear(n_in, n_out, bias=True, params_dtype=config.params_dtype, device="cuda")
        else:
            def linear(n_in: int, n_out: int) -> torch.nn.Module:
                return torch.nn.Linear(n_in, n_out, dtype=config.params_dtype, device=device)
        self.te_linear = te_linear
        self.linear_fc1 = linear(hidden_size, target_dim)
        self.linear_fc2 = linear(target_dim, target_dim)
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
        if not self.te_linear:
            return self.linear_fc2(F.gelu(self.linear_fc1(hidden)))
        rows = hidden.size(0)
        padded = max(-(-rows // TE_ROW_MULTIPLE), 1) * TE_ROW_MULTIPLE
        if padded != rows:  # zero rows: no gradient reaches them, and they are cut off below
            hidden = F.pad(hidden, (0, 0, 0, padded - rows))
        return self.linear_fc2(F.gelu(self.linear_fc1(hidden)))[:rows]


class PoolProjector(MegatronModule):
    def __init__(self, config: TransformerConfig, target_dim: int):
        super().__init__(config=config)  # D <= H: ARRAConfig.validate_for_model checks it
        self.target_dim = target_dim

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.adaptive_max_pool1d(hidden.unsqueeze(1), self.target_dim).squeeze(1)


_warned_fp8_shapes = False


def build_projector(arra: ARRAConfig, config: TransformerConfig, seed: int = 0,
                    te_linear: bool = False) -> MegatronModule:
    """A_phi for ``arra.projector`` on a model with ``config.hidden_size``.

    ``te_linear``: build the MLP from Transformer Engine linears (the model uses the TE
    layer spec); they run in FP8 under ``--fp8-format`` when the shapes allow it.
    """
    global _warned_fp8_shapes
    if arra.projector != "mlp":
        return PoolProjector(config, arra.target_dim)
    multiple = fp8_feature_multiple(config)
    if te_linear and config.fp8 and (config.hidden_size % multiple or arra.target_dim % multiple):
        if not _warned_fp8_shapes:
            logger.warning(
                "ARRA projector %d -> %d: FP8 GEMMs need feature sizes divisible by %d; the projector "
                "runs in %s instead (the rest of the model stays in FP8)", config.hidden_size,
                arra.target_dim, multiple, "bf16" if config.bf16 else str(config.params_dtype))
            _warned_fp8_shapes = True
        te_linear = False
    return MLPProjector(config, config.hidden_size, arra.target_dim, seed=seed, te_linear=te_linear)
