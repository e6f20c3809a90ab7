"""DALI preprocessing against the encoders' own transforms; bad images; purity.

Tolerance (normalised units, i.e. after (x/255 - mean)/std; one grey level is about
0.015 for CLIP's std): mean |diff| < 0.01, 99th percentile < 0.035 (about 2 grey levels),
max < 0.25. What remains is arithmetic, not geometry: JPEG decoders' IDCT/upsampling
rounding, and DALI's resampling (float, edge clamping) vs PIL's (fixed point, kernel
renormalised at borders), which differs most at a few border pixels when upscaling
with a bicubic kernel. A window shifted by one pixel or a wrong size fails the p99 bound.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

from arra_megatron.data.dali_pipeline import (DaliImagePreprocessor, ReferenceImagePreprocessor,
                                              make_image_preprocessor)
from arra_megatron.encoders import load_encoder
from arra_megatron.encoders.preprocess import PreprocessSpec, reference_preprocess
from arra_megatron.runtime.capabilities import has_dali, has_dali_gpu
from tests.encoders.fixtures import encode, image_zoo, smooth_image

pytestmark = pytest.mark.skipif(not has_dali(), reason="nvidia-dali is not installed (pip install 'arra-megatron[data]')")

torch.set_num_threads(1)

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
EXTRA_SPECS = {
    "open_clip_longest": PreprocessSpec("open_clip", 64, "longest", "half_even", "center", "bicubic", CLIP_MEAN,
                                        CLIP_STD, fill_color=0),
    "open_clip_squash_bilinear": PreprocessSpec("open_clip", 48, "squash", "floor", "center", "bilinear", CLIP_MEAN,
                                                CLIP_STD),
    # timm (create_transform at crop_pct 1.0) and a python: encoder's top-left spec (SAM's processor)
    "timm": PreprocessSpec("timm", 64, "shortest", "floor", "center", "bilinear", (0.5,) * 3, (0.5,) * 3),
    "python_top_left": PreprocessSpec("python", 48, "longest", "half_up", "top_left", "bicubic", CLIP_MEAN, CLIP_STD),
}


@pytest.fixture(scope="module")
def specs(tiny_clip_dir, tiny_sam_dir):
    return {"open_clip_shortest": load_encoder(f"open_clip:local-dir:{tiny_clip_dir}", "cls").spec,
            "sam": load_encoder(f"sam:{tiny_sam_dir}", "avgpool").spec, **EXTRA_SPECS}


def _bad_images():
    jpeg = encode(smooth_image(10, (60, 40)), "JPEG").tobytes()
    png = encode(smooth_image(11, (60, 40)), "PNG").tobytes()
    return [
        ("garbage", np.frombuffer(b"this is not an image at all", np.uint8)),
        ("empty", np.zeros(0, np.uint8)),
        ("png_truncated", np.frombuffer(png[: len(png) // 2], np.uint8)),
        ("jpeg_header_only", np.frombuffer(jpeg[:200], np.uint8)),
        ("jpeg_truncated", np.frombuffer(jpeg[:-10], np.uint8)),  # header fine: DALI, then PIL, both fail
    ]


@pytest.mark.parametrize("name", ["open_clip_shortest", "open_clip_longest", "open_clip_squash_bilinear", "sam", "timm",
                                  "python_top_left"])
def test_dali_matches_library_transform(specs, name):
    spec = specs[name]
    zoo = image_zoo()
    out = DaliImagePreprocessor(spec, max_batch_size=8, device="cpu", num_threads=1)([data for _, data in zoo])
    assert out.pixels.dtype == torch.float32 and out.pixels.shape == (len(zoo), 3, spec.image_size, spec.image_size)
    assert out.valid.all()
    for i, (image_name, data) in enumerate(zoo):
        diff = (out.pixels[i] - reference_preprocess(spec, [data])[0]).abs()
        assert diff.mean() < 0.01, (image_name, diff.mean())
        assert diff.flatten().quantile(0.99) < 0.035, (image_name, diff.flatten().quantile(0.99))
        assert diff.max() < 0.25, (image_name, diff.max())


def test_sam_padding_is_zero_after_normalisation(specs):
    spec = specs["sam"]
    wide = encode(smooth_image(7, (96, 48)), "PNG")  # -> 64 x 32, padded to 64 x 64 at the bottom
    pixels = DaliImagePreprocessor(spec, 2, device="cpu", num_threads=1)([wide]).pixels[0]
    assert torch.all(pixels[:, 32:] == 0) and pixels[:, :32].abs().sum() > 0


def test_bad_images_are_masked_not_raised(specs):
    spec = specs["open_clip_shortest"]
    good = image_zoo()[:3]
    bad = _bad_images()
    mixed = [good[0], bad[0], good[1], bad[1], bad[2], good[2], bad[3], bad[4]]
    preprocessor = DaliImagePreprocessor(spec, max_batch_size=8, device="cpu", num_threads=1)
    clean = preprocessor([data for _, data in good])
    out = preprocessor([data for _, data in mixed])
    expected_valid = [name not in dict(bad) for name, _ in mixed]
    assert out.valid.tolist() == expected_valid
    assert preprocessor.num_failures == len(bad)
    assert torch.equal(out.pixels[out.valid], clean.pixels)  # good images unaffected by their bad neighbours
    assert torch.all(out.pixels[~out.valid] == 0)
    # the pipeline keeps working after the failures
    assert torch.equal(preprocessor([data for _, data in good]).pixels, clean.pixels)


def test_reference_preprocessor_masks_bad_images(specs):
    spec = specs["sam"]
    good, bad = image_zoo()[0][1], _bad_images()[0][1]
    reference = ReferenceImagePreprocessor(spec)
    out = reference([good, bad])
    assert out.valid.tolist() == [True, False] and reference.num_failures == 1
    torch.testing.assert_close(out.pixels[0], reference_preprocess(spec, [good])[0], rtol=0, atol=0)


def test_alpha_and_palette_images_take_the_library_path(specs):
    spec = specs["sam"]  # SAM's processor composites alpha over white: a plain RGB decode would not
    rgba = encode(smooth_image(8, (50, 70), "RGBA"), "PNG")
    palette = encode(smooth_image(9, (50, 70)).convert("P"), "PNG")
    preprocessor = DaliImagePreprocessor(spec, 4, device="cpu", num_threads=1)
    out = preprocessor([rgba, palette])
    assert out.valid.all() and preprocessor.num_reference == 2
    torch.testing.assert_close(out.pixels, reference_preprocess(spec, [rgba, palette]), rtol=0, atol=0)


def test_pure_function_of_bytes(specs):
    """Same bytes -> same pixels, whatever the batch they come in: what lets the sampler
    shard by DP rank and restart at any consumed-samples position."""
    spec = specs["open_clip_shortest"]
    data = [d for _, d in image_zoo()]
    big = DaliImagePreprocessor(spec, max_batch_size=8, device="cpu", num_threads=1)(data)
    assert torch.equal(big.pixels, DaliImagePreprocessor(spec, 8, device="cpu", num_threads=1)(data).pixels)
    chunked = DaliImagePreprocessor(spec, max_batch_size=2, device="cpu", num_threads=1)(data)
    assert torch.equal(big.pixels, chunked.pixels)
    order = [3, 0, 6, 1, 5, 2, 4]
    permuted = DaliImagePreprocessor(spec, 8, device="cpu", num_threads=2)([data[i] for i in order])
    assert torch.equal(permuted.pixels, big.pixels[order])
    bytes_input = DaliImagePreprocessor(spec, 8, device="cpu", num_threads=1)([d.tobytes() for d in data])
    assert torch.equal(bytes_input.pixels, big.pixels)


def test_online_targets_match_reference_targets(tiny_clip_dir):
    """f_GF from DALI pixels vs from the library transform's pixels: the same target."""
    encoder = load_encoder(f"open_clip:local-dir:{tiny_clip_dir}", "concat")
    data = [d for _, d in image_zoo()]
    dali = encoder.encode(make_image_preprocessor(encoder.spec, 8, device="cpu", num_threads=1)(data).pixels)
    reference = encoder.encode(reference_preprocess(encoder.spec, data))
    assert torch.nn.functional.cosine_similarity(dali, reference).min() > 0.999


def test_make_image_preprocessor_picks_dali(specs):
    assert isinstance(make_image_preprocessor(specs["sam"], 4, device="cpu"), DaliImagePreprocessor)


@pytest.mark.skipif(not has_dali_gpu(), reason="DALI mixed (GPU) decoding needs a CUDA GPU; none is available here")
def test_gpu_mixed_decode_matches_cpu(specs):
    spec = specs["open_clip_shortest"]
    data = [d for _, d in image_zoo()] + [_bad_images()[0][1]]
    cpu = DaliImagePreprocessor(spec, 8, device="cpu", num_threads=1)(data)
    gpu = DaliImagePreprocessor(spec, 8, device="gpu", num_threads=1)(data)
    assert gpu.pixels.is_cuda and gpu.valid.tolist() == cpu.valid.tolist()
    diff = (gpu.pixels.cpu() - cpu.pixels).abs()
    assert diff.mean() < 0.01 and diff.max() < 0.25
