"""The image preprocessing a target encoder expects, as data, plus its library reference.

f_GF is only the encoder's representation of an image if the pixels reach the encoder
exactly as its library prepares them. ``PreprocessSpec`` records that preparation as a
few fields read from the model's own config (open_clip ``preprocess_cfg``, the SAM
image processor config); the DALI pipeline (``arra_megatron/data/dali_pipeline.py``)
implements the spec, and ``reference_preprocess`` runs the library's own transform
(open_clip's eval ``image_transform``, transformers' ``SamImageProcessor``) for tests and
as the fallback when DALI is missing.

The two layouts in use:
- open_clip: resize (shortest edge by default), centre crop or centre pad with the
  pixel value ``fill_color`` *before* normalisation (``window="center"``).
- SAM/MedSAM: resize the longest edge, normalise, then pad bottom/right with 0 *after*
  normalisation (``window="top_left"``).
"""

from __future__ import annotations

import functools
import io
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Literal, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

ImageInput = Union[bytes, bytearray, memoryview, np.ndarray, Image.Image]

RESIZE_MODES = ("shortest", "longest", "squash")
ROUNDINGS = ("floor", "half_even", "half_up")
WINDOWS = ("center", "top_left")
INTERPOLATIONS = ("bicubic", "bilinear")
LIBRARIES = ("open_clip", "sam")


@dataclass(frozen=True)
class PreprocessSpec:
    """Square ``image_size`` output, float32 CHW, ``(x / 255 - mean) / std`` per channel.

    Attributes:
        library: whose transform defines the spec (``open_clip`` | ``sam``); picks the
            reference implementation.
        image_size: side of the square output.
        resize_mode: ``shortest`` (short edge -> image_size), ``longest`` (long edge ->
            image_size), ``squash`` (both edges -> image_size, aspect not kept).
        resize_rounding: how the other edge is rounded: ``floor`` (torchvision
            ``Resize(int)``), ``half_even`` (Python ``round``, open_clip
            ``ResizeKeepRatio``), ``half_up`` (``int(x + 0.5)``, SAM).
        window: ``center``: centre crop / centre pad (torchvision ``CenterCrop``, open_clip
            ``CenterCropOrPad``), padding with pixel ``fill_color`` before normalisation;
            ``top_left``: keep the top-left corner, pad bottom/right with 0 after
            normalisation (SAM).
        interpolation: ``bicubic`` | ``bilinear``, antialiased when shrinking (as PIL).
        mean, std: per-channel RGB statistics on the [0, 1] scale.
        fill_color: pixel value (0..255) of centre padding.
    """

    library: Literal["open_clip", "sam"]
    image_size: int
    resize_mode: Literal["shortest", "longest", "squash"]
    resize_rounding: Literal["floor", "half_even", "half_up"]
    window: Literal["center", "top_left"]
    interpolation: Literal["bicubic", "bilinear"]
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    fill_color: int = 0

    def __post_init__(self) -> None:
        for name, value, allowed in (("library", self.library, LIBRARIES),
                                     ("resize_mode", self.resize_mode, RESIZE_MODES),
                                     ("resize_rounding", self.resize_rounding, ROUNDINGS),
                                     ("window", self.window, WINDOWS),
                                     ("interpolation", self.interpolation, INTERPOLATIONS)):
            if value not in allowed:
                raise ValueError(f"PreprocessSpec.{name}={value!r}: expected one of {allowed}")
        if self.image_size <= 0:
            raise ValueError(f"PreprocessSpec.image_size must be positive, got {self.image_size}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"PreprocessSpec needs 3 mean and 3 std values (RGB), got {self.mean}, {self.std}")

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready form for dataset manifests and encoder identities."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "PreprocessSpec":
        data = dict(data)
        data["mean"], data["std"] = tuple(data["mean"]), tuple(data["std"])
        return cls(**data)


def open_image(data: ImageInput) -> Image.Image:
    """PIL image from encoded bytes (or a PIL image), fully decoded so errors surface here."""
    if isinstance(data, Image.Image):
        return data
    if isinstance(data, np.ndarray):
        data = data.tobytes()
    image = Image.open(io.BytesIO(bytes(data)))
    image.load()
    return image


@functools.cache
def _open_clip_transform(spec: PreprocessSpec) -> Callable[[Image.Image], torch.Tensor]:
    from open_clip.transform import image_transform

    return image_transform(spec.image_size, is_train=False, mean=spec.mean, std=spec.std,
                           resize_mode=spec.resize_mode, interpolation=spec.interpolation,
                           fill_color=spec.fill_color)


@functools.cache
def _sam_processor(spec: PreprocessSpec) -> Any:
    from transformers import SamImageProcessor
    from transformers.image_utils import PILImageResampling

    resample = {"bilinear": PILImageResampling.BILINEAR, "bicubic": PILImageResampling.BICUBIC}[spec.interpolation]
    return SamImageProcessor(size={"longest_edge": spec.image_size},
                             pad_size={"height": spec.image_size, "width": spec.image_size},
                             image_mean=list(spec.mean), image_std=list(spec.std), resample=resample,
                             do_resize=True, do_rescale=True, do_normalize=True, do_pad=True,
                             do_convert_rgb=True)


def reference_preprocess(spec: PreprocessSpec, images: Sequence[ImageInput]) -> torch.Tensor:
    """[N, 3, S, S] float32 through the encoder library's own transform (PIL based).

    Raises whatever PIL raises on an undecodable image; callers that must survive bad
    images handle it per image (see ``dali_pipeline.ReferenceImagePreprocessor``).
    """
    pil = [open_image(image) for image in images]
    if spec.library == "open_clip":
        transform = _open_clip_transform(spec)
        return torch.stack([transform(image) for image in pil]).float()
    if spec.library == "sam":
        # SAM's processor converts to RGB itself (do_convert_rgb).
        return _sam_processor(spec)(images=pil, return_tensors="pt")["pixel_values"].float()
    raise ValueError(f"no reference preprocessing for library {spec.library!r}")


def spec_from_open_clip(preprocess_cfg: Dict[str, Any]) -> PreprocessSpec:
    """Spec from open_clip's ``model.visual.preprocess_cfg`` (what ``create_model`` resolved)."""
    size = preprocess_cfg.get("size", 224)
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ValueError(f"open_clip preprocess_cfg size {size} is not square; ARRA targets need a square "
                             "input (set preprocess_cfg.size in open_clip_config.json)")
        size = size[0]
    mode = preprocess_cfg.get("resize_mode", "shortest")
    rounding = {"shortest": "floor", "longest": "half_even", "squash": "floor"}[mode]
    interpolation = preprocess_cfg.get("interpolation", "bicubic")
    if interpolation == "random":  # open_clip uses bicubic at inference for 'random'
        interpolation = "bicubic"
    return PreprocessSpec(library="open_clip", image_size=int(size), resize_mode=mode, resize_rounding=rounding,
                          window="center", interpolation=interpolation,
                          mean=_triple(preprocess_cfg["mean"]), std=_triple(preprocess_cfg["std"]),
                          fill_color=int(preprocess_cfg.get("fill_color", 0)))


def spec_from_sam_processor(processor: Any, where: str) -> PreprocessSpec:
    """Spec from a transformers ``SamImageProcessor``; refuses settings DALI would not reproduce."""
    from transformers.image_utils import PILImageResampling

    size = _get(processor.size, "longest_edge")
    pad = processor.pad_size
    if not (processor.do_resize and processor.do_rescale and processor.do_normalize and processor.do_pad) \
            or size is None or _get(pad, "height") != size or _get(pad, "width") != size:
        raise ValueError(f"{where}: expected SAM's preprocessing (resize longest_edge=S, rescale, normalize, pad to "
                         f"SxS); got size={processor.size}, pad_size={pad}, do_resize={processor.do_resize}, "
                         f"do_rescale={processor.do_rescale}, do_normalize={processor.do_normalize}, "
                         f"do_pad={processor.do_pad}")
    if abs(float(processor.rescale_factor) - 1 / 255) > 1e-9:
        raise ValueError(f"{where}: rescale_factor={processor.rescale_factor}, only 1/255 is supported")
    resample = {int(PILImageResampling.BILINEAR): "bilinear", int(PILImageResampling.BICUBIC): "bicubic"}.get(
        int(processor.resample))
    if resample is None:
        raise ValueError(f"{where}: resample={processor.resample}; only BILINEAR (2) or BICUBIC (3) are supported")
    return PreprocessSpec(library="sam", image_size=int(size), resize_mode="longest", resize_rounding="half_up",
                          window="top_left", interpolation=resample, mean=_triple(processor.image_mean),
                          std=_triple(processor.image_std))


def _get(obj: Any, key: str) -> Any:
    return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)


def _triple(values: Any) -> Tuple[float, float, float]:
    values = [float(values)] * 3 if np.isscalar(values) else [float(v) for v in values]
    return tuple(values)  # type: ignore[return-value]


def resized_size(spec: PreprocessSpec, height: int, width: int) -> Tuple[int, int]:
    """(h, w) after the resize step, in exact integer arithmetic (the DALI graph does the same).

    Used by tests to check the DALI graph's sizes; documents the rounding of each library.
    """
    s = spec.image_size
    if spec.resize_mode == "squash":
        return s, s
    ref = min(height, width) if spec.resize_mode == "shortest" else max(height, width)
    return tuple(_scale(s * x, ref, spec.resize_rounding) for x in (height, width))  # type: ignore[return-value]


def _scale(num: int, den: int, rounding: str) -> int:
    """num / den rounded as ``rounding`` says (positive integers)."""
    q, r = divmod(num, den)
    if rounding == "floor":
        return q
    if rounding == "half_up":
        return q + (2 * r >= den)
    return q + (2 * r > den or (2 * r == den and q % 2 == 1))


def stack_valid(rows: List[torch.Tensor | None], spec: PreprocessSpec) -> Tuple[torch.Tensor, torch.Tensor]:
    """Stack per-sample results, zeros where a sample is missing; returns (pixels, valid)."""
    s = spec.image_size
    pixels = torch.zeros(len(rows), 3, s, s, dtype=torch.float32)
    valid = torch.zeros(len(rows), dtype=torch.bool)
    for i, row in enumerate(rows):
        if row is not None:
            pixels[i] = row
            valid[i] = True
    return pixels, valid
