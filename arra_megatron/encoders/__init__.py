"""Frozen target encoders E_F for ARRA's f_GF (ARRA_METHOD.md, "Target f_GF").

``load_encoder("open_clip:local-dir:/models/BiomedCLIP", "cls", device)``,
``load_encoder("sam:/models/medsam-vit-base", "avgpool", device)``,
``load_encoder("timm:vit_base_patch16_224:/models/vit.safetensors", "cls", device)`` or
``load_encoder("python:my_encoders:dino_small", "cls", device)`` gives a
``TargetEncoder``: ``dim``, ``spec`` (the preprocessing the DALI pipeline reproduces),
``encode(images) -> [N, D] float32`` and ``identity`` for manifests. Training (online
targets), the feature-store tool (precomputed targets) and the FID feature networks all
go through here.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from arra_megatron.encoders.base import AGGREGATIONS, TargetEncoder
from arra_megatron.encoders.preprocess import PreprocessSpec, reference_preprocess

__all__ = ["AGGREGATIONS", "PreprocessSpec", "TargetEncoder", "load_encoder", "parse_encoder_spec",
           "reference_preprocess"]

FAMILIES = ("open_clip", "sam", "timm", "python")
SPEC_FORMS = ("open_clip:local-dir:/path", "sam:/path", "timm:ARCH:/path/weights.safetensors",
              "python:MODULE:FUNCTION")
#: What a flag that takes an encoder spec says about it (--encoder, --arra-encoder).
SPEC_HELP = ("open_clip:local-dir:/path (CLIP, BiomedCLIP), sam:/path (SAM, MedSAM), timm:ARCH:/path/weights "
             "(any timm model, a local .safetensors/.pth state dict) or python:MODULE:FUNCTION (your own encoder, "
             "MODULE on PYTHONPATH; contract in arra_megatron/encoders/python_encoder.py)")
#: What an --*-aggregation flag says.
AGGREGATION_HELP = ("how f_GF is pooled from the encoder's tokens (ARRA_METHOD.md): cls, avgpool or concat; "
                    "SAM and timm CNNs: avgpool only; a python: encoder receives it")


def parse_encoder_spec(spec: str) -> Tuple[str, str]:
    """(family, location) of ``FAMILY:LOCATION``, checking its form only (nothing is loaded):
    what flag validation calls so that a malformed spec fails before any work."""
    family, sep, location = spec.partition(":")
    two_parts = family in ("timm", "python")
    first, _, second = location.partition(":")
    if not sep or family not in FAMILIES or not location or (two_parts and not (first and second)):
        raise ValueError(f"encoder spec {spec!r} must look like one of {', '.join(SPEC_FORMS)}")
    return family, location


def load_encoder(spec: str, aggregation: Optional[str] = "cls", device: torch.device | str = "cpu",
                 bf16: bool = False) -> TargetEncoder:
    """Build a frozen target encoder from ``FAMILY:LOCATION``.

    - ``open_clip:local-dir:/path`` (or ``open_clip:/path``): CLIP / BiomedCLIP in open_clip's
      local-dir format.
    - ``sam:/path``: SamModel or SamVisionModel saved with ``save_pretrained`` (SAM, MedSAM).
    - ``timm:ARCH:/path/weights``: any timm model with a local state dict (timm_encoder.py).
    - ``python:MODULE:FUNCTION``: a user's own encoder (python_encoder.py states the contract).

    Only local files: weights are never fetched from a hub at training time.
    ``aggregation`` None (timm only) takes the model's own pooled feature.
    """
    family, location = parse_encoder_spec(spec)
    if aggregation is None and family != "timm":
        raise ValueError(f"encoder spec {spec!r}: an aggregation is needed ({AGGREGATIONS})")
    if family == "open_clip":
        from arra_megatron.encoders.open_clip_encoder import load_open_clip

        return load_open_clip(location, aggregation, device=device, bf16=bf16)
    if family == "sam":
        from arra_megatron.encoders.sam_encoder import load_sam

        return load_sam(location, aggregation, device=device, bf16=bf16)
    if family == "timm":
        from arra_megatron.encoders.timm_encoder import load_timm

        return load_timm(location, aggregation, device=device, bf16=bf16)
    from arra_megatron.encoders.python_encoder import load_python

    return load_python(location, aggregation, device=device, bf16=bf16)
