"""Any timm image model as E_F: ``timm:ARCH:WEIGHTS_FILE`` (a local state dict, never downloaded).

``timm.create_model(ARCH, pretrained=False, num_classes=0)`` then the state dict of
WEIGHTS_FILE through timm's own reader (``timm.models.load_state_dict``: safetensors, or
``torch.load(weights_only=True)``, which never runs code from the file; the EMA weights
when the checkpoint has them, as timm picks). The file may hold the classifier head or
not (a headless model has none); any other difference from ARCH's state dict is an error
naming the file.

Aggregations, on ``forward_features`` (the last stage after its final norm):
- ``cls``: the first token of an NLC token sequence; only for models with a class token
  (``num_prefix_tokens`` >= 1, e.g. ViT, DeiT, EVA).
- ``avgpool``: the mean over the non-prefix tokens (register and class tokens excluded) of
  an NLC output, or the spatial mean of a CNN feature map (NCHW, or NHWC where the model
  says ``output_fmt``); before any ``fc_norm`` / ``head_hidden`` layer of the head.
- ``concat``: [cls ; avgpool].
D is ``num_features`` (2 x for concat), checked by one forward at load time.

Preprocessing (``spec_from_timm``) is the model's data config (input size, interpolation,
mean, std) with ``crop_pct`` 1.0: the shortest edge is resized to the input size and the
centre square kept, as open_clip does at inference. timm's default ``crop_pct`` (0.875 ...)
crops a classification benchmark's centre; ARRA's target is the global feature of the whole
image the generator learns to draw, so no more of it is cut than the square input needs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from arra_megatron.encoders.base import TargetEncoder
from arra_megatron.encoders.preprocess import PreprocessSpec, spec_from_timm

logger = logging.getLogger(__name__)


class TimmEncoder(TargetEncoder):
    """A timm model's ``forward_features`` as E_F."""

    family = "timm"

    def __init__(self, model: torch.nn.Module, path: str | Path, aggregation: str, spec: PreprocessSpec,
                 arch: str, **kwargs) -> None:
        self.arch = arch
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0) or 0)
        has_cls = (self.num_prefix_tokens >= 1 and getattr(model, "has_class_token", True) is not False
                   and getattr(model, "cls_token", True) is not None)
        if aggregation in ("cls", "concat") and not has_cls:
            raise ValueError(f"timm {arch} has no class token (num_prefix_tokens={self.num_prefix_tokens}), so "
                             f"aggregation {aggregation!r} is undefined; use 'avgpool'")
        super().__init__(model, path, aggregation, spec, **kwargs)
        self.channels_last = str(getattr(model, "output_fmt", "NCHW")) == "NHWC"
        probed = self.probe_dim()
        if probed != self.dim:
            raise ValueError(f"timm {arch}: forward_features gives {probed} features with aggregation "
                             f"{aggregation!r}, num_features says {self.dim}")

    @property
    def dim(self) -> int:
        width = int(self.model.num_features)
        return 2 * width if self.aggregation == "concat" else width

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model.forward_features(images)
        if isinstance(out, torch.Tensor) and out.dim() == 3:  # tokens [N, L, C], prefix tokens first
            cls, patches = out[:, 0], out[:, self.num_prefix_tokens:]
        elif isinstance(out, torch.Tensor) and out.dim() == 4 and self.aggregation == "avgpool":  # a feature map
            cls, patches = None, out.flatten(1, 2) if self.channels_last else out.flatten(2).transpose(1, 2)
        else:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"timm {self.arch}: forward_features gives {shape}; aggregation {self.aggregation!r} "
                             "needs tokens [N, L, C] (or a feature map [N, C, H, W] for 'avgpool')")
        avgpool = patches.mean(dim=1)
        if self.aggregation == "avgpool":
            return avgpool
        return cls if self.aggregation == "cls" else torch.cat([cls, avgpool], dim=-1)

    @property
    def identity(self) -> Dict[str, Any]:
        return {**super().identity, "arch": self.arch}


def default_aggregation(model: torch.nn.Module) -> str:
    """The model's own pooled feature: the class token where timm pools ``token`` (ViT), else the mean."""
    return "cls" if getattr(model, "global_pool", None) == "token" else "avgpool"


def _classifier_names(model: torch.nn.Module) -> Tuple[str, ...]:
    names = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    return (names,) if isinstance(names, str) else tuple(names)


def _load_weights(model: torch.nn.Module, arch: str, path: Path) -> None:
    """WEIGHTS_FILE into the headless model: only classifier-head keys may be left over."""
    from timm.models import load_state_dict

    try:
        state = load_state_dict(str(path), weights_only=True)
    except Exception as error:  # safetensors / torch.load errors of every kind on a foreign file
        raise ValueError(f"{path}: not a state dict timm can read (a .safetensors file, or a torch.save'd state "
                         f"dict that torch.load(weights_only=True) accepts): {type(error).__name__}: "
                         f"{str(error)[:200]}") from error
    heads = _classifier_names(model)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatches
        raise ValueError(f"{path}: weights do not fit timm {arch}: {str(error)[:300]}") from error
    unexpected = [k for k in result.unexpected_keys if not any(k.startswith(f"{h}.") for h in heads)]
    if result.missing_keys or unexpected:
        raise ValueError(f"{path}: weights do not fit timm {arch}: missing {result.missing_keys[:5]}, unexpected "
                         f"{unexpected[:5]} ({len(result.missing_keys)} + {len(unexpected)} keys; only the "
                         f"classifier head {list(heads)} may differ)")


def load_timm(location: str, aggregation: Optional[str], device: torch.device | str = "cpu",
              bf16: bool = False) -> TimmEncoder:
    """Load ``ARCH:WEIGHTS_FILE`` and its preprocessing from timm's data config; ``aggregation``
    None takes the model's own pooled feature (``default_aggregation``; FID feature nets)."""
    import timm
    from timm.data import resolve_model_data_config

    from arra_megatron.tokenization.profile import content_sha256

    arch, _, weights = location.partition(":")
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found: a timm encoder spec is timm:ARCH:/path/weights "
                                "(.safetensors, or a state dict .pth/.bin; never downloaded), e.g. "
                                "timm:vit_base_patch16_224:/models/vit_b16.safetensors")
    try:
        model = timm.create_model(arch, pretrained=False, num_classes=0)
    except RuntimeError as error:  # "Unknown model"
        raise ValueError(f"timm:{arch}: {error}") from error
    _load_weights(model, arch, path)
    spec = spec_from_timm(resolve_model_data_config(model), f"timm:{arch}")
    logger.info("timm encoder %s (%s): preprocessing %s", arch, path, spec)
    return TimmEncoder(model, path, aggregation or default_aggregation(model), spec, arch, device=device,
                       bf16=bf16, content_hash=content_sha256(path))
