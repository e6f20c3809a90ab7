"""ARRAConfig: the one source of truth for the ARRA objective's settings.

Each field maps to one command-line flag (``ARRAConfig.FLAGS``); every
validation error names the flag to change. See ../shared/design/ARRA_METHOD.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Optional

OBJECTIVES = ("cos", "mse")
TARGETS = ("hybnext", "rep")
PROJECTORS = ("mlp", "pool")
AGGREGATIONS = ("cls", "avgpool", "concat")


class ARRAConfigError(ValueError):
    """A wrong ARRA setting; the message names the flag to change."""


@dataclass(frozen=True)
class ARRAConfig:
    """L = L_AR + weight * L_GVA, with L_GVA computed on global layer ``align_layer``.

    Attributes:
        enabled: turn the alignment term on; off gives a plain GPT objective.
        align_layer: k, the 1-based global transformer layer whose output h_k is aligned.
        weight: lambda, the weight of L_GVA in the total loss.
        objective: ``cos`` (1 - cosine) or ``mse`` (squared error / D).
        target: ``hybnext`` (every position whose next token is an image token) or
            ``rep`` (the BOI position only).
        projector: ``mlp`` (Linear-GELU-Linear) or ``pool`` (adaptive max pool, no parameters).
        target_dim: D, the dimension of the target vector f_GF.
        aggregation: how the frozen encoder's output becomes f_GF: ``cls``, ``avgpool`` or ``concat``.
    """

    enabled: bool = True
    align_layer: int = 1
    weight: float = 1.0
    objective: Literal["cos", "mse"] = "cos"
    target: Literal["hybnext", "rep"] = "hybnext"
    projector: Literal["mlp", "pool"] = "mlp"
    target_dim: int = 512
    aggregation: Literal["cls", "avgpool", "concat"] = "cls"

    FLAGS = {
        "enabled": "--arra / --no-arra",
        "align_layer": "--arra-align-layer",
        "weight": "--arra-weight",
        "objective": "--arra-objective",
        "target": "--arra-target",
        "projector": "--arra-projector",
        "target_dim": "--arra-target-dim",
        "aggregation": "--arra-aggregation",
    }

    def __post_init__(self) -> None:
        for name, allowed in (("objective", OBJECTIVES), ("target", TARGETS),
                              ("projector", PROJECTORS), ("aggregation", AGGREGATIONS)):
            value = getattr(self, name)
            if value not in allowed:
                raise ARRAConfigError(f"{self.FLAGS[name]} must be one of {', '.join(allowed)}; got {value!r}")
        if not isinstance(self.align_layer, int) or self.align_layer < 1:
            raise ARRAConfigError(f"{self.FLAGS['align_layer']} must be a layer number >= 1; got {self.align_layer!r}")
        if not self.weight >= 0:
            raise ARRAConfigError(f"{self.FLAGS['weight']} (lambda) must be >= 0; got {self.weight!r}")
        if not isinstance(self.target_dim, int) or self.target_dim < 1:
            raise ARRAConfigError(f"{self.FLAGS['target_dim']} must be a positive integer; got {self.target_dim!r}")

    def replace(self, **changes) -> "ARRAConfig":
        return dataclasses.replace(self, **changes)

    def validate_for_model(
        self,
        *,
        num_layers: int,
        hidden_size: int,
        tensor_model_parallel_size: int = 1,
        encoder_dim: Optional[int] = None,
        layout_has_images: bool = True,
    ) -> None:
        """Check this config against the model, the target encoder and the sample layout.

        Args:
            num_layers: the model's total number of transformer layers.
            hidden_size: the model's hidden size H.
            tensor_model_parallel_size: TP degree; H must divide by it.
            encoder_dim: dimension of the vectors the target encoder (or feature store)
                delivers after aggregation; None when not known yet.
            layout_has_images: whether the sample layout (tokenizer profile) contains an
                image span at all.
        """
        if hidden_size % tensor_model_parallel_size:
            raise ARRAConfigError(
                f"--hidden-size {hidden_size} is not divisible by --tensor-model-parallel-size "
                f"{tensor_model_parallel_size}; change one of them"
            )
        if not self.enabled:
            return
        if not 1 <= self.align_layer <= num_layers:
            raise ARRAConfigError(
                f"{self.FLAGS['align_layer']} {self.align_layer} is outside 1..{num_layers} "
                f"(--num-layers {num_layers})"
            )
        if encoder_dim is not None and encoder_dim != self.target_dim:
            raise ARRAConfigError(
                f"{self.FLAGS['target_dim']} {self.target_dim} does not match the target encoder's "
                f"dimension {encoder_dim} (aggregation {self.aggregation!r}); set {self.FLAGS['target_dim']} {encoder_dim}"
            )
        if self.projector == "pool" and self.target_dim > hidden_size:
            raise ARRAConfigError(
                f"{self.FLAGS['projector']} pool cannot pool hidden size {hidden_size} up to "
                f"{self.FLAGS['target_dim']} {self.target_dim}; use {self.FLAGS['projector']} mlp"
            )
        if not layout_has_images:
            which = "rep (the BOI position)" if self.target == "rep" else "hybnext"
            raise ARRAConfigError(
                f"{self.FLAGS['target']} {which} needs an image span in the sample layout, and this "
                f"layout has none; use a tokenizer profile with image tokens or --no-arra"
            )
