"""SAM / MedSAM vision encoders through transformers, from a local ``save_pretrained`` directory.

A ``SamModel`` checkpoint (MedSAM is one) or a ``SamVisionModel`` checkpoint; only the
vision encoder is kept. Preprocessing comes from the directory's
``preprocessor_config.json`` (``SamImageProcessor``).

``avgpool`` is the spatial mean of ``SamVisionEncoder``'s ``last_hidden_state``, the
neck output [N, output_channels, S/16, S/16] (256 x 64 x 64 for SAM ViT-B at 1024 px),
i.e. of SAM's "image embeddings" (``SamModel.get_image_embeddings``), averaged over all
grid positions, including those that cover the bottom/right padding: SAM always encodes
the padded SxS square, so that is its representation of the image. D = output_channels.
SAM has no CLS token, so ``cls`` and ``concat`` are refused.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from arra_megatron.encoders.base import TargetEncoder
from arra_megatron.encoders.preprocess import spec_from_sam_processor

logger = logging.getLogger(__name__)


class SamEncoder(TargetEncoder):
    """transformers ``SamVisionEncoder`` as E_F."""

    family = "sam"
    supported = ("avgpool",)

    def _unsupported_message(self, aggregation: str) -> str:
        return (f"SAM/MedSAM vision encoders have no CLS token, so aggregation {aggregation!r} is undefined for "
                f"{self.family}; use 'avgpool' (mean of the image embeddings)")

    @property
    def dim(self) -> int:
        return int(self.model.config.output_channels)

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images).last_hidden_state.mean(dim=(2, 3))


def load_sam(path: str, aggregation: str, device: torch.device | str = "cpu", bf16: bool = False) -> SamEncoder:
    """Load the vision encoder of a SamModel / SamVisionModel directory and its preprocessing."""
    from transformers import AutoConfig, SamImageProcessor, SamModel, SamVisionModel

    from arra_megatron.tokenization.profile import content_sha256

    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory}/config.json not found: a SAM encoder spec must name a transformers "
                                "save_pretrained directory of a SamModel or SamVisionModel, e.g. "
                                "--arra-encoder sam:/models/medsam-vit-base")
    if aggregation != "avgpool":  # fail before loading weights
        raise ValueError(SamEncoder._unsupported_message(SamEncoder, aggregation))  # type: ignore[arg-type]
    model_type = AutoConfig.from_pretrained(directory).model_type
    if model_type == "sam":
        vision = SamModel.from_pretrained(directory).vision_encoder
    elif model_type == "sam_vision_model":
        vision = SamVisionModel.from_pretrained(directory).vision_encoder
    else:
        raise ValueError(f"{directory}/config.json: model_type {model_type!r} is not a SAM model "
                         "('sam' or 'sam_vision_model')")
    processor_file = directory / "preprocessor_config.json"
    if processor_file.is_file():
        processor = SamImageProcessor.from_pretrained(directory)
    else:
        size = int(vision.config.image_size)
        logger.warning("%s missing: using SamImageProcessor defaults at the model's image_size %d", processor_file, size)
        processor = SamImageProcessor(size={"longest_edge": size}, pad_size={"height": size, "width": size})
    spec = spec_from_sam_processor(processor, str(processor_file))
    if spec.image_size != vision.config.image_size:
        raise ValueError(f"{processor_file}: longest_edge/pad_size {spec.image_size} differs from the vision "
                         f"encoder's image_size {vision.config.image_size} in config.json; SAM only encodes its own size")
    logger.info("SAM encoder %s: preprocessing %s", directory, spec)
    return SamEncoder(vision, directory, aggregation, spec, device=device, bf16=bf16,
                      content_hash=content_sha256(directory))
