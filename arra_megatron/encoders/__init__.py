"""Frozen target encoders E_F for ARRA's f_GF (ARRA_METHOD.md, "Target f_GF").

``load_encoder("open_clip:local-dir:/models/BiomedCLIP", "cls", device)`` or
``load_encoder("sam:/models/medsam-vit-base", "avgpool", device)`` gives a
``TargetEncoder``: ``dim``, ``spec`` (the preprocessing the DALI pipeline reproduces),
``encode(images) -> [N, D] float32`` and ``identity`` for manifests. Training (online
targets) and the feature-store tool (precomputed targets) both go through here.
"""

from __future__ import annotations

import torch

from arra_megatron.encoders.base import AGGREGATIONS, TargetEncoder
from arra_megatron.encoders.preprocess import PreprocessSpec, reference_preprocess

__all__ = ["AGGREGATIONS", "PreprocessSpec", "TargetEncoder", "load_encoder", "reference_preprocess"]

FAMILIES = ("open_clip", "sam")


def load_encoder(spec: str, aggregation: str = "cls", device: torch.device | str = "cpu",
                 bf16: bool = False) -> TargetEncoder:
    """Build a frozen target encoder from ``FAMILY:LOCATION``.

    - ``open_clip:local-dir:/path`` (or ``open_clip:/path``): CLIP / BiomedCLIP in open_clip's
      local-dir format.
    - ``sam:/path``: SamModel or SamVisionModel saved with ``save_pretrained`` (SAM, MedSAM).

    Only local directories: weights are never fetched from a hub at training time.
    """
    family, sep, location = spec.partition(":")
    if not sep or family not in FAMILIES or not location:
        raise ValueError(f"encoder spec {spec!r} must look like 'open_clip:local-dir:/path' or 'sam:/path' "
                         f"(families: {FAMILIES})")
    if family == "open_clip":
        from arra_megatron.encoders.open_clip_encoder import load_open_clip

        return load_open_clip(location, aggregation, device=device, bf16=bf16)
    from arra_megatron.encoders.sam_encoder import load_sam

    return load_sam(location, aggregation, device=device, bf16=bf16)
