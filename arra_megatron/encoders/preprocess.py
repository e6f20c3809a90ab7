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

timm encoders use the first layout (shortest edge, centre crop; timm's ``create_transform``
is their reference), and a ``python:`` encoder states its spec itself
(``spec_from_mapping``); its reference is open_clip's transform for ``window="center"``
(it implements every resize mode with centre crop / pad) and SAM's processor for
``top_left``. ``preprocess_tensor`` is the same spec on decoded uint8 tensors (FID
feature networks).
"""

from __future__ import annotations

import dataclasses
import functools
import io
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Literal, Mapping, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ImageInput = Union[bytes, bytearray, memoryview, np.ndarray, Image.Image]

RESIZE_MODES = ("shortest", "longest", "squash")
ROUNDINGS = ("floor", "half_even", "half_up")
WINDOWS = ("center", "top_left")
INTERPOLATIONS = ("bicubic", "bilinear")
LIBRARIES = ("open_clip", "sam", "timm", "python")


@dataclass(frozen=True)
class PreprocessSpec:
    """Square ``image_size`` output, float32 CHW, ``(x / 255 - mean) / std`` per channel.

    Attributes:
        library: whose transform defines the spec (``open_clip`` | ``sam`` | ``timm``, or
            ``python`` for a spec written out by hand: a ``python:`` encoder's, a
            torchvision FID net's); picks the reference implementation.
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

    library: Literal["open_clip", "sam", "timm", "python"]
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


@functools.cache
def _timm_transform(spec: PreprocessSpec) -> Callable[[Image.Image], torch.Tensor]:
    from timm.data import create_transform

    # crop_pct=1.0: the crop window is the whole resized image (see timm_encoder.py).
    return create_transform(input_size=(3, spec.image_size, spec.image_size), is_training=False,
                            interpolation=spec.interpolation, mean=spec.mean, std=spec.std, crop_pct=1.0,
                            crop_mode="center")


def _reference_library(spec: PreprocessSpec) -> str:
    """The library whose transform implements ``spec``: a hand-written (``python``) spec takes
    open_clip's generic transform for a centred window and SAM's processor for top-left."""
    if spec.library != "python":
        return spec.library
    return "open_clip" if spec.window == "center" else "sam"


def reference_preprocess(spec: PreprocessSpec, images: Sequence[ImageInput]) -> torch.Tensor:
    """[N, 3, S, S] float32 through the encoder library's own transform (PIL based).

    Greyscale and other modes come out as 3-channel RGB: open_clip's transform and SAM's
    processor convert themselves; timm's eval transform does not (timm's datasets call
    ``convert("RGB")`` before it), so it is done here.

    Raises whatever PIL raises on an undecodable image; callers that must survive bad
    images handle it per image (see ``dali_pipeline.ReferenceImagePreprocessor``).
    """
    pil = [open_image(image) for image in images]
    library = _reference_library(spec)
    if library == "open_clip":
        transform = _open_clip_transform(spec)
        return torch.stack([transform(image) for image in pil]).float()
    if library == "timm":
        transform = _timm_transform(spec)
        return torch.stack([transform(image.convert("RGB")) for image in pil]).float()
    if library == "sam":
        # SAM's processor converts to RGB itself (do_convert_rgb).
        return _sam_processor(spec)(images=pil, return_tensors="pt")["pixel_values"].float()
    raise ValueError(f"no reference preprocessing for library {spec.library!r}")


def preprocess_tensor(spec: PreprocessSpec, images: torch.Tensor) -> torch.Tensor:
    """[N, 3, S, S] float32 from decoded RGB uint8 images [N, 3, H, W] of one size, on their device.

    ``spec`` in torch ops, for images that are already tensors (FID feature networks):
    ``F.interpolate`` antialiased (as PIL when shrinking), clamped to [0, 1] as PIL's 8-bit
    output is, with the sizes of ``resized_size`` and the window offsets of torchvision's
    ``CenterCrop`` / open_clip's ``CenterCropOrPad`` (the DALI graph's ``_center_offset``).
    Differs from ``reference_preprocess`` by resampling arithmetic only (tested).
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected RGB images [N, 3, H, W], got {tuple(images.shape)}")
    height, width = images.shape[-2:]
    new_h, new_w = resized_size(spec, height, width)
    x = images.float() / 255
    if (new_h, new_w) != (height, width):
        x = F.interpolate(x, size=(new_h, new_w), mode=spec.interpolation, antialias=True,
                          align_corners=False).clamp_(0, 1)
    mean = torch.tensor(spec.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = spec.image_size
    if spec.window == "center":
        x = _center_window(x, s, spec.fill_color / 255)
        return (x - mean) / std
    x = ((x - mean) / std)[..., :s, :s]  # top_left (SAM): pad with 0 after normalisation
    return F.pad(x, (0, s - x.shape[-1], 0, s - x.shape[-2]), value=0.0)


def _center_window(x: torch.Tensor, size: int, fill: float) -> torch.Tensor:
    """Centre crop (offset ``round(d / 2)``, half to even) or centre pad (``d // 2`` before) to size x size."""
    for dim in (-2, -1):
        d = x.shape[dim] - size
        if d >= 0:
            x = x.narrow(dim, round(d / 2), size)
        else:
            before, after = -d // 2, -d - (-d // 2)
            x = F.pad(x, (before, after, 0, 0) if dim == -1 else (0, 0, before, after), value=fill)
    return x


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


def spec_from_timm(data_config: Mapping[str, Any], where: str) -> PreprocessSpec:
    """Spec from ``timm.data.resolve_model_data_config(model)``: input size (square), interpolation,
    mean, std; shortest edge to the input size and a centre crop of it (``crop_pct`` 1.0)."""
    _, height, width = data_config["input_size"]
    if height != width:
        raise ValueError(f"{where}: timm input size {height}x{width} is not square; ARRA targets need a square input")
    interpolation = data_config.get("interpolation", "bicubic")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"{where}: timm interpolation {interpolation!r} is not supported; only {INTERPOLATIONS}")
    return PreprocessSpec(library="timm", image_size=int(height), resize_mode="shortest", resize_rounding="floor",
                          window="center", interpolation=interpolation, mean=_triple(data_config["mean"]),
                          std=_triple(data_config["std"]))


#: (window, resize_mode) -> the resize rounding of the reference that implements a hand-written
#: spec: open_clip's transform (Resize(int) floors, ResizeKeepRatio rounds half to even), SAM's
#: processor (longest edge only, half up).
_REFERENCE_ROUNDING = {("center", "shortest"): "floor", ("center", "longest"): "half_even",
                       ("center", "squash"): "floor", ("top_left", "longest"): "half_up"}
_REQUIRED_FIELDS = ("image_size", "resize_mode", "window", "interpolation", "mean", "std")


def spec_from_mapping(fields: Any, where: str) -> PreprocessSpec:
    """Spec from a mapping of ``PreprocessSpec`` fields, as a ``python:`` encoder states it.

    ``library`` may be left out (it is ``python``); ``resize_rounding`` may be left out and
    must otherwise be the rounding of the reference for the window (``_REFERENCE_ROUNDING``),
    so that DALI, the reference and ``preprocess_tensor`` implement the same geometry;
    ``fill_color`` defaults to 0.
    """
    if not isinstance(fields, Mapping):
        raise ValueError(f"{where}: preprocess must be a mapping of PreprocessSpec fields, got {type(fields).__name__}")
    data = dict(fields)
    known = {f.name for f in dataclasses.fields(PreprocessSpec)}
    unknown, missing = sorted(set(data) - known), [name for name in _REQUIRED_FIELDS if name not in data]
    if unknown or missing:
        raise ValueError(f"{where}: preprocess fields: unknown {unknown}, missing {missing}; it takes "
                         f"{list(_REQUIRED_FIELDS)} and optionally resize_rounding, fill_color")
    if data.setdefault("library", "python") != "python":
        raise ValueError(f"{where}: preprocess library must be 'python' or left out, got {data['library']!r}")
    if not isinstance(data["image_size"], int) or isinstance(data["image_size"], bool):
        raise ValueError(f"{where}: preprocess image_size must be an int, got {data['image_size']!r}")
    rounding = _REFERENCE_ROUNDING.get((data["window"], data["resize_mode"]))
    data.setdefault("resize_rounding", rounding or "floor")
    try:
        data["mean"], data["std"] = _triple(data["mean"]), _triple(data["std"])
        spec = PreprocessSpec(**data)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: preprocess: {error}") from error
    if rounding is None:
        raise ValueError(f"{where}: preprocess window {spec.window!r} with resize_mode {spec.resize_mode!r} has no "
                         "reference implementation; use window 'center' (any resize_mode) or 'top_left' with "
                         "resize_mode 'longest'")
    if spec.resize_rounding != rounding:
        raise ValueError(f"{where}: preprocess resize_rounding {spec.resize_rounding!r}: the reference for window "
                         f"{spec.window!r} / resize_mode {spec.resize_mode!r} rounds {rounding!r}; leave it out")
    return spec


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
