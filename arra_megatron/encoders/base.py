"""What every frozen target encoder E_F provides: f_GF = aggregate(E_F(image)) as [N, D] float32.

ARRA_METHOD.md, "Target f_GF": ``cls`` (CLIP family: open_clip ``encode_image``),
``avgpool`` (mean of patch tokens; SAM/MedSAM), ``concat`` = [cls ; avgpool].
One class serves online targets (training, first pipeline stage) and precomputed
targets (a feature-store tool): both call ``encode`` on the same preprocessed pixels,
and ``identity`` is what a manifest records so the two can be checked to agree.
"""

from __future__ import annotations

import abc
import contextlib
import itertools
import logging
from pathlib import Path
from typing import Any, Dict, Tuple

import torch

from arra_megatron.encoders.preprocess import PreprocessSpec

logger = logging.getLogger(__name__)

AGGREGATIONS = ("cls", "avgpool", "concat")


class TargetEncoder(abc.ABC):
    """A frozen vision encoder giving f_GF for preprocessed images.

    Subclasses implement ``_features`` (the library call) and say which aggregations
    they have; this class owns device placement, no_grad/autocast and the output contract.
    """

    #: Short family name written into identities ("open_clip", "sam").
    family: str = ""
    #: Aggregations the family supports, in ARRA_METHOD.md terms.
    supported: Tuple[str, ...] = AGGREGATIONS

    def __init__(self, model: torch.nn.Module, path: str | Path, aggregation: str, spec: PreprocessSpec,
                 device: torch.device | str = "cpu", bf16: bool = False, content_hash: str = "") -> None:
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation {aggregation!r} unknown; use one of {AGGREGATIONS} (--arra-aggregation, --encoder-aggregation)")
        if aggregation not in self.supported:
            raise ValueError(self._unsupported_message(aggregation))
        device = torch.device(device)
        if bf16 and device.type != "cuda":
            raise ValueError(f"bf16 autocast for the target encoder needs a CUDA device, got {device}; "
                             "run it in fp32 on CPU (bf16=False)")
        self._device = device
        self.model = model.to(device).eval().requires_grad_(False)
        self.path = str(Path(path).resolve())
        self.aggregation = aggregation
        self.spec = spec
        self.bf16 = bf16
        self.content_hash = content_hash

    @property
    def device(self) -> torch.device:
        """Where the model is: follows ``model.to(...)`` (a FID ``FeatureNet`` moves its encoder)."""
        tensor = next(itertools.chain(self.model.parameters(), self.model.buffers()), None)
        return self._device if tensor is None else tensor.device

    def _unsupported_message(self, aggregation: str) -> str:
        return f"{self.family} encoder does not support aggregation {aggregation!r}; use one of {self.supported}"

    @property
    @abc.abstractmethod
    def dim(self) -> int:
        """D, the width of f_GF for this encoder and aggregation (the projector's output size)."""

    @abc.abstractmethod
    def _features(self, images: torch.Tensor) -> torch.Tensor:
        """[N, D] features for the configured aggregation, on ``self.device``."""

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """f_GF [N, D] float32 for preprocessed images [N, 3, S, S] (see ``spec``).

        no_grad because E_F is frozen (nothing flows back into it); bf16 autocast only
        when asked and on CUDA, where the paper runs the encoder in bf16.
        """
        s = self.spec.image_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, s, s):
            raise ValueError(f"{self.family} encoder expects images [N, 3, {s}, {s}] preprocessed as its spec says, "
                             f"got {tuple(images.shape)}")
        images = images.to(self.device, dtype=torch.float32, non_blocking=True)
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext())
        with autocast:
            features = self._features(images)
        return features.float()

    def probe_dim(self) -> int:
        """D from one forward of a zero batch, checking the [N, D] floating-point contract: run at load
        time so that an encoder with the wrong output fails before any work."""
        s = self.spec.image_size
        features = self.encode(torch.zeros(2, 3, s, s))
        if features.dim() != 2 or features.shape[0] != 2:
            raise ValueError(f"{self.family} encoder {self.path}: features for 2 images must be [2, D], "
                             f"got {tuple(features.shape)}")
        return int(features.shape[1])

    @property
    def identity(self) -> Dict[str, Any]:
        """What made a target: written into feature-store manifests and compared at training time."""
        return {"family": self.family, "name": Path(self.path).name, "path": self.path, "sha256": self.content_hash,
                "aggregation": self.aggregation, "dim": self.dim, "preprocessing": self.spec.to_dict()}
