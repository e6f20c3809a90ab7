"""DALI image pipeline for online ARRA targets: encoded bytes -> the target encoder's input.

Data flow step 3 (ARCHITECTURE.md): the batch carries, per sample, the encoded image
bytes (read from the dataset's image table in the order the sampler chose). They go
through ``fn.external_source`` into ``fn.decoders.image`` (``cpu`` here, ``mixed`` =
nvJPEG/nvImageCodec on a GPU when one is present), then resize / crop-or-pad /
normalise exactly as the encoder's ``PreprocessSpec`` says, as float32 NCHW.

Pure function of its input: no random augmentation, no reader, no state besides the
failure counters. Sharding across data-parallel ranks and restarting at a
consumed-samples position are the sampler's job (it decides which sample ids, hence
which bytes, each rank hands in); the same bytes always give the same pixels.

Exact geometry: output sizes and crop offsets are computed inside the DALI graph in
integer arithmetic from the decoded shape, with the rounding of the library that
defines the spec (torchvision ``Resize(int)`` floors the long edge and ``CenterCrop``
rounds the offset half-to-even; open_clip ``ResizeKeepRatio`` rounds half-to-even;
SAM rounds half-up), so DALI and the reference differ only by resampling arithmetic
and JPEG decoder rounding, never by a shifted or rescaled window.

Which path takes an image: PIL reads each header first (microseconds, no decode).
RGB and grayscale images, the common case, go through DALI. Other modes (alpha,
palette, CMYK, 16-bit) go through the library transform (``reference_preprocess``),
because the libraries treat them in ways a plain RGB decode does not reproduce (see
``_DALI_MODES``). A file PIL cannot identify is masked at once.

Bad images: DALI raises on an undecodable sample (e.g. a truncated JPEG whose header is
fine) and the pipeline object is then unusable. A failed batch is re-run one image at a
time on a fresh pipeline (building one costs milliseconds); an image DALI cannot decode
is tried with the reference path and, if that fails too, the sample gets ``valid=False``
so the caller drops its L_GVA term. Nothing raises; ``num_failures`` counts masked
images (each logged as a warning) and ``num_reference`` those the library path took.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from arra_megatron.encoders.preprocess import ImageInput, PreprocessSpec, reference_preprocess, stack_valid
from arra_megatron.runtime.capabilities import has_dali, has_dali_gpu

logger = logging.getLogger(__name__)

_warned_no_dali = False


@dataclass
class PreprocessedImages:
    """Encoder input for one micro-batch.

    pixels: [N, 3, S, S] float32 (zeros where ``valid`` is False), on the pipeline's device.
    valid: [N] bool, False for images that could not be decoded: their L_GVA term must be masked.
    """

    pixels: torch.Tensor
    valid: torch.Tensor


class ReferenceImagePreprocessor:
    """PIL / library-transform implementation of a ``PreprocessSpec`` (open_clip transform, SAM processor).

    The ground truth the DALI pipeline is tested against, and the fallback when DALI is
    not installed (slower: one Python call per image).
    """

    def __init__(self, spec: PreprocessSpec) -> None:
        self.spec = spec
        self.num_failures = 0

    def _one(self, image: ImageInput, index: int) -> Optional[torch.Tensor]:
        try:
            return reference_preprocess(self.spec, [image])[0]
        except Exception as err:  # PIL raises many types on broken files; none may stop training
            self.num_failures += 1
            logger.warning("image %d of the micro-batch cannot be decoded (%s: %s); its L_GVA term is masked "
                           "(%d failures so far)", index, type(err).__name__, err, self.num_failures)
            return None

    def __call__(self, images: Sequence[ImageInput]) -> PreprocessedImages:
        pixels, valid = stack_valid([self._one(image, i) for i, image in enumerate(images)], self.spec)
        return PreprocessedImages(pixels, valid)


class DaliImagePreprocessor:
    """DALI implementation of a ``PreprocessSpec``.

    Args:
        spec: the target encoder's preprocessing (``TargetEncoder.spec``).
        max_batch_size: largest micro-batch expected; larger inputs are processed in chunks.
        device: ``cpu`` (decode and resize on CPU) or ``gpu`` (``mixed`` decode, GPU ops,
            output on ``cuda:device_id``); ``auto`` picks ``gpu`` when ``has_dali_gpu()``.
        num_threads: DALI CPU worker threads.
        device_id: CUDA device for ``gpu`` (default: torch's current device).
    """

    def __init__(self, spec: PreprocessSpec, max_batch_size: int, device: str = "auto", num_threads: int = 2,
                 device_id: Optional[int] = None) -> None:
        if device not in ("auto", "cpu", "gpu"):
            raise ValueError(f"DALI device {device!r}: use 'auto', 'cpu' or 'gpu'")
        if device == "auto":
            device = "gpu" if has_dali_gpu() else "cpu"
        if device == "gpu" and not has_dali_gpu():
            raise RuntimeError("DALI GPU decoding was asked for but no CUDA GPU with DALI is available; "
                               "use device='cpu'")
        if device == "gpu" and device_id is None:
            device_id = torch.cuda.current_device()
        self.spec = spec
        self.max_batch_size = int(max_batch_size)
        self.device = device
        self.num_threads = int(num_threads)
        self.device_id = device_id if device == "gpu" else None
        self.num_failures = 0  # images given valid=False
        self.num_reference = 0  # images preprocessed by the library (PIL) path instead of DALI
        self._pipe = None

    # -- graph ------------------------------------------------------------------------------
    def _build(self, batch_size: int):
        from nvidia.dali import fn, pipeline_def, types

        spec = self.spec
        s = spec.image_size
        decode_device = "mixed" if self.device == "gpu" else "cpu"
        interp = {"bicubic": types.INTERP_CUBIC, "bilinear": types.INTERP_LINEAR}[spec.interpolation]

        # Synchronous, no prefetch: one fed batch -> one run, so a failure is tied to its batch.
        @pipeline_def(batch_size=batch_size, num_threads=self.num_threads, device_id=self.device_id,
                      prefetch_queue_depth=1, exec_async=False, exec_pipelined=False)
        def pipeline():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            # adjust_orientation=False: the encoders' libraries (PIL) ignore EXIF orientation.
            image = fn.decoders.image(encoded, device=decode_device, output_type=types.RGB, adjust_orientation=False)
            shape = image.shape(dtype=types.INT64)
            height, width = shape[0], shape[1]
            new_h, new_w = _resized_size_node(spec, height, width)
            image = fn.resize(image, size=fn.cast(fn.stack(new_h, new_w), dtype=types.FLOAT), interp_type=interp,
                              antialias=True)
            mean = [255.0 * m for m in spec.mean]
            std = [255.0 * v for v in spec.std]
            if spec.window == "center":
                top, left = _center_offset(new_h, s), _center_offset(new_w, s)
                image = fn.slice(image, start=fn.cast(fn.stack(top, left), dtype=types.INT32), shape=[s, s],
                                 axis_names="HW", out_of_bounds_policy="pad", fill_values=float(spec.fill_color))
                return fn.crop_mirror_normalize(image, dtype=types.FLOAT, output_layout="CHW", mean=mean, std=std)
            # top_left (SAM): normalise, then pad bottom/right with 0 in normalised units.
            image = fn.crop_mirror_normalize(image, dtype=types.FLOAT, output_layout="CHW", mean=mean, std=std)
            return fn.pad(image, axis_names="HW", shape=[s, s], fill_value=0.0)

        pipe = pipeline()
        pipe.build()
        return pipe

    def _run(self, arrays: List[np.ndarray]) -> torch.Tensor:
        """One DALI run over a batch; raises if any image fails (the pipeline is then discarded)."""
        if self._pipe is None:
            self._pipe = self._build(self.max_batch_size)
        try:
            self._pipe.feed_input("encoded", arrays)
            (out,) = self._pipe.run()
        except Exception:
            self._pipe = None  # DALI: "Current pipeline object is no longer valid"
            raise
        return _to_torch(out, self.device_id)

    # -- public -----------------------------------------------------------------------------
    def __call__(self, images: Sequence[ImageInput]) -> PreprocessedImages:
        """Preprocess one micro-batch of encoded images (in the sampler's order)."""
        arrays = [_as_uint8(image) for image in images]
        rows: List[Optional[torch.Tensor]] = [None] * len(arrays)
        to_dali = []
        for i, array in enumerate(arrays):
            mode = _pil_mode(array)
            if mode in _DALI_MODES:
                to_dali.append(i)
            elif mode is None:
                self._mask(i, "not an image file PIL can identify (empty, truncated header or unknown format)")
            else:
                rows[i] = self._reference(i, images[i], f"PIL mode {mode}")
        for start in range(0, len(to_dali), self.max_batch_size):
            chunk = to_dali[start:start + self.max_batch_size]
            try:
                batch = self._run([arrays[i] for i in chunk])
                for j, i in enumerate(chunk):
                    rows[i] = batch[j]
            except Exception:
                for i in chunk:  # find the bad ones; the good ones still go through DALI
                    try:
                        rows[i] = self._run([arrays[i]])[0]
                    except Exception as err:
                        rows[i] = self._reference(i, images[i], f"DALI failed: {_first_line(err)}")
        device = torch.device("cuda", self.device_id) if self.device == "gpu" else torch.device("cpu")
        pixels = torch.zeros(len(arrays), 3, self.spec.image_size, self.spec.image_size, device=device)
        valid = torch.zeros(len(arrays), dtype=torch.bool, device=device)
        for i, row in enumerate(rows):
            if row is not None:
                pixels[i] = row.to(device)
                valid[i] = True
        return PreprocessedImages(pixels, valid)

    def _reference(self, index: int, image: ImageInput, reason: str) -> Optional[torch.Tensor]:
        """The library transform for one image DALI does not take; None (masked) if PIL fails too."""
        try:
            row = reference_preprocess(self.spec, [image])[0]
        except Exception as err:
            self._mask(index, f"{reason}; PIL: {type(err).__name__}: {err}")
            return None
        self.num_reference += 1
        logger.debug("image %d preprocessed by the reference path (%s)", index, reason)
        return row

    def _mask(self, index: int, reason: str) -> None:
        self.num_failures += 1
        logger.warning("image %d of the micro-batch cannot be decoded (%s); its L_GVA term is masked "
                       "(%d failures so far)", index, reason, self.num_failures)


def make_image_preprocessor(spec: PreprocessSpec, max_batch_size: int, device: str = "auto",
                            num_threads: int = 2) -> DaliImagePreprocessor | ReferenceImagePreprocessor:
    """DALI when installed, else the PIL reference (warned about once: it is much slower)."""
    global _warned_no_dali
    if has_dali():
        return DaliImagePreprocessor(spec, max_batch_size, device=device, num_threads=num_threads)
    if not _warned_no_dali:
        logger.warning("nvidia-dali is not installed: online ARRA targets use the PIL reference preprocessing "
                       "(slow). pip install 'arra-megatron[data]' for DALI.")
        _warned_no_dali = True
    return ReferenceImagePreprocessor(spec)


# -- helpers --------------------------------------------------------------------------------
def _resized_size_node(spec: PreprocessSpec, height, width):
    """DALI-graph version of ``preprocess.resized_size`` (int64 arithmetic on DataNodes)."""
    from nvidia.dali import math as dmath

    s = spec.image_size
    if spec.resize_mode == "squash":
        return height * 0 + s, width * 0 + s
    ref = dmath.min(height, width) if spec.resize_mode == "shortest" else dmath.max(height, width)
    return _scale_node(s * height, ref, spec.resize_rounding), _scale_node(s * width, ref, spec.resize_rounding)


def _scale_node(num, den, rounding: str):
    """num / den rounded (positive ints); booleans act as 0/1 in DALI arithmetic."""
    q = num // den
    if rounding == "floor":
        return q
    twice_r = 2 * (num - q * den)
    if rounding == "half_up":
        return q + (twice_r >= den)
    return q + (twice_r > den) + (twice_r == den) * (q & 1)


def _center_offset(size, target: int):
    """Top/left of a centred target window: torchvision CenterCrop (``int(round(d / 2))``,
    half to even) when cropping, open_clip CenterCropOrPad (``-(pad // 2)``) when padding.
    DALI's integer ``//`` truncates toward zero (C++), so only non-negative operands are divided."""
    d = size - target
    half = d // 2
    crop = half + (d & 1) * (half & 1)
    pad = 0 - (0 - d) // 2
    return (d >= 0) * crop + (d < 0) * pad


#: PIL modes whose DALI decode (RGB, alpha-free) equals the libraries' ``convert("RGB")``. Others
#: (alpha, palette, CMYK, 16-bit, bilevel) go to the library transform: open_clip resizes them
#: in their own mode (premultiplied alpha; nearest for palette) and SAM's processor composites
#: alpha over white, neither of which a plain RGB decode reproduces.
_DALI_MODES = ("RGB", "L")


def _pil_mode(array: np.ndarray) -> Optional[str]:
    """PIL's mode from the header only (microseconds); None when PIL cannot identify the file."""
    try:
        with Image.open(io.BytesIO(array.tobytes())) as image:
            transparent = "transparency" in image.info
            return f"{image.mode}+transparency" if transparent else image.mode
    except Exception:
        return None


def _as_uint8(image: ImageInput) -> np.ndarray:
    if isinstance(image, np.ndarray):
        return np.ascontiguousarray(image, dtype=np.uint8).reshape(-1)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return np.frombuffer(image, dtype=np.uint8)
    raise TypeError(f"the DALI pipeline takes encoded image bytes (numpy uint8 or bytes), got {type(image).__name__}")


def _to_torch(out, device_id: Optional[int]) -> torch.Tensor:
    """DALI TensorList (uniform [3, S, S] samples) -> torch [N, 3, S, S]."""
    if device_id is None:
        return torch.from_numpy(np.array(out.as_tensor()))
    from nvidia.dali.plugin.pytorch import feed_ndarray

    tensor = out.as_tensor()
    result = torch.empty(tensor.shape(), dtype=torch.float32, device=torch.device("cuda", device_id))
    feed_ndarray(tensor, result, cuda_stream=torch.cuda.current_stream(device_id))
    return result


def _first_line(err: BaseException) -> str:
    lines = [line for line in str(err).splitlines() if line.strip() and "no longer valid" not in line]
    return lines[-1].strip() if lines else type(err).__name__
