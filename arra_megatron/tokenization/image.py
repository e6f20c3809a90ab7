"""Image tokenizer: a VQ model from transformers (``ChameleonVQVAE`` or ``JanusVQVAE``).

image bytes -> RGB (``load_rgb``) -> resize + centre crop + [-1, 1] (``ImageTokenizer.preprocess``)
-> VQ codes in raster order (``ImageTokenizer.encode``) -> pixels (``ImageTokenizer.decode``, Janus only).

Codebook lookup, as found in transformers 5.x (``models/janus/modeling_janus.py``):
``JanusVQVAEVectorQuantizer.forward`` picks the code with the smallest *Euclidean*
distance between the raw ``quant_conv`` output and the raw codebook rows; only its
``get_codebook_entry`` (the decode path) l2-normalises the codebook. LlamaGen's VQ-16
(``tokenizer/tokenizer_image/vq_model.py``, ``codebook_l2_norm=True``), of which
JanusVQVAE is a port, l2-normalises both the latents and the codebook rows before the
same ``|z|^2 + |e|^2 - 2 z.e`` / argmin, i.e. it picks the code of highest cosine
similarity. The two disagree whenever codebook norms differ, so for JanusVQVAE we
run the encoder through transformers and do the lookup ourselves
(``llamagen_nearest_codes``, the same operations in the same order as LlamaGen).
ChameleonVQVAE's quantizer has no l2 normalisation in Chameleon either; its
transformers lookup is used as is. transformers' ChameleonVQVAE has no decoder.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from arra_megatron.tokenization.profile import ModelIdentity

logger = logging.getLogger(__name__)

# Resampling filter of each model family's reference preprocessing: Chameleon resizes
# with LANCZOS, LlamaGen (Janus VQ) with BICUBIC. Both then centre-crop and map
# [0, 255] to [-1, 1].
_RESAMPLE = {"ChameleonVQVAE": Image.Resampling.LANCZOS, "JanusVQVAE": Image.Resampling.BICUBIC}
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")


class ImageDecodeError(ValueError):
    """The bytes are not a complete image PIL can decode (corrupt, truncated, unsupported)."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB.

    Why not just ``convert("RGB")``: it clips 16-bit grayscale to 255 (an all-white
    image) and drops alpha, exposing whatever colour hides under transparent pixels.
    16-bit values are scaled down (>> 8); transparency is composited onto white,
    as Chameleon's own image tokenizer does.
    """
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.int64) >> 8
        image = Image.fromarray(np.clip(values, 0, 255).astype(np.uint8))  # 2-D uint8: mode L
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("RGB")


def load_rgb(data: bytes) -> Image.Image:
    """Decode image bytes fully (truncated files raise) and convert to RGB."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return to_rgb(image)
    except Exception as error:  # untrusted bytes: PIL raises OSError, SyntaxError, struct.error, ...
        raise ImageDecodeError(f"{type(error).__name__}: {error}") from error


def resize_center_crop(image: Image.Image, size: int, resample: Image.Resampling) -> Image.Image:
    """Resize the shorter side to ``size`` and cut the centred ``size`` x ``size`` square."""
    width, height = image.size
    scale = size / min(width, height)
    new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
    image = image.resize(new_size, resample)
    left, top = (new_size[0] - size) // 2, (new_size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def preprocess_image(image: Image.Image, size: int, kind: str = "JanusVQVAE") -> torch.Tensor:
    """PIL image -> [3, size, size] float32 in [-1, 1] as ``kind``'s reference preprocessing does
    (``ImageTokenizer.preprocess`` without a model, e.g. for training a VQ model)."""
    image = resize_center_crop(to_rgb(image), size, _RESAMPLE[kind])
    array = np.asarray(image, dtype=np.uint8).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


@torch.no_grad()
def llamagen_nearest_codes(latents: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """LlamaGen's VQ-16 lookup: nearest l2-normalised codebook row to each l2-normalised latent.

    Args:
        latents: [B, C, H, W], the ``quant_conv`` output.
        codebook: [K, C] codebook rows (not normalised).
    Returns:
        [B, H*W] codes in raster order.
    """
    batch = latents.shape[0]
    z = F.normalize(latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1]), p=2, dim=-1)
    embedding = F.normalize(codebook, p=2, dim=-1)
    distances = (torch.sum(z ** 2, dim=1, keepdim=True) + torch.sum(embedding ** 2, dim=1)
                 - 2 * torch.einsum("bd,dn->bn", z, embedding.t()))
    return torch.argmin(distances, dim=1).view(batch, -1)


class ImageTokenizer:
    """A transformers VQ model loaded from a local ``save_pretrained`` directory."""

    def __init__(self, path: str | Path, image_size: int, device: str | torch.device = "cpu") -> None:
        from transformers import ChameleonVQVAE, JanusVQVAE

        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"--image-tokenizer {path}: no config.json (expected a save_pretrained directory)")
        architectures = json.loads(config_file.read_text()).get("architectures") or []
        classes = {"ChameleonVQVAE": ChameleonVQVAE, "JanusVQVAE": JanusVQVAE}
        if len(architectures) != 1 or architectures[0] not in classes:
            raise ValueError(f"--image-tokenizer {path}: architectures {architectures} in config.json; "
                             f"supported: {sorted(classes)}")
        self.kind = architectures[0]
        self.device = torch.device(device)
        self.model = classes[self.kind].from_pretrained(str(path), local_files_only=True).to(self.device).eval()
        downsample = 2 ** (len(self.model.config.channel_multiplier) - 1)
        if image_size % downsample:
            raise ValueError(f"--image-size {image_size} must be a multiple of the VQ model's "
                             f"downsampling factor {downsample}")
        self.image_size = image_size
        self.grid = image_size // downsample
        self.tokens_per_image = self.grid * self.grid
        self.codebook_size = self.model.config.num_embeddings
        self.identity = ModelIdentity.of(self.kind, path)
        self.preprocessing: Dict[str, Any] = {
            "convert": "RGB (16-bit >> 8, alpha over white)",
            "resize": "shorter side to image_size",
            "resample": _RESAMPLE[self.kind].name.lower(),
            "crop": "center",
            "normalize": "x / 127.5 - 1",
        }
        if self.kind == "JanusVQVAE":
            # decode() reshapes codes with quant_state_dims (config.num_patches), which need not
            # match --image-size; the grid is a property of the image size here.
            self.model.quantize.quant_state_dims = [self.grid, self.grid]

    @property
    def can_decode(self) -> bool:
        return self.kind == "JanusVQVAE"

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """RGB PIL image -> [3, S, S] float32 in [-1, 1], S = image_size."""
        return preprocess_image(image, self.image_size, self.kind)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] preprocessed pixels -> [B, n] int64 codes in raster order (on CPU).

        Runs in float32 on purpose: codes must not depend on the device's reduced precision.
        """
        pixels = pixels.to(self.device, torch.float32)
        if self.kind == "JanusVQVAE":
            latents = self.model.quant_conv(self.model.encoder(pixels))
            codes = llamagen_nearest_codes(latents, self.model.quantize.embedding.weight)
        else:
            codes = self.model.encode(pixels).image_tokens.view(pixels.shape[0], -1)
        if codes.shape[1] != self.tokens_per_image:
            raise RuntimeError(f"{self.kind} gave {codes.shape[1]} codes per image, expected {self.tokens_per_image}")
        return codes.cpu()

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """[B, n] codes -> [B, 3, S, S] pixels in about [-1, 1] (JanusVQVAE only)."""
        if not self.can_decode:
            raise NotImplementedError(f"transformers' {self.kind} has no decoder")
        return self.model.decode(codes.to(self.device).long()).cpu()
