"""``preprocess_tensor`` (a spec on decoded uint8 tensors, FID feature nets) against the libraries' transforms.

Same tolerance as DALI against them (tests/data/test_dali_pipeline.py): the difference is
resampling arithmetic (float vs PIL's fixed point, border handling), never geometry.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from arra_megatron.encoders.preprocess import PreprocessSpec, open_image, preprocess_tensor, reference_preprocess
from tests.encoders.fixtures import image_zoo

torch.set_num_threads(1)  # the CPU is shared: one thread per test process is the fastest

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
SPECS = {
    "open_clip_shortest": PreprocessSpec("open_clip", 64, "shortest", "floor", "center", "bicubic", MEAN, STD),
    "open_clip_longest_fill": PreprocessSpec("open_clip", 64, "longest", "half_even", "center", "bicubic", MEAN, STD,
                                             fill_color=128),
    "python_squash_bilinear": PreprocessSpec("python", 48, "squash", "floor", "center", "bilinear", MEAN, STD),
    "timm": PreprocessSpec("timm", 64, "shortest", "floor", "center", "bilinear", (0.5,) * 3, (0.5,) * 3),
    "sam": PreprocessSpec("sam", 64, "longest", "half_up", "top_left", "bilinear", MEAN, STD),
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_matches_library_transform(name):
    spec = SPECS[name]
    for image_name, data in image_zoo():
        rgb = torch.from_numpy(np.array(open_image(data).convert("RGB"))).permute(2, 0, 1)
        ours = preprocess_tensor(spec, rgb[None])[0]
        diff = (ours - reference_preprocess(spec, [_png(rgb)])[0]).abs()
        assert ours.shape == (3, spec.image_size, spec.image_size)
        assert diff.mean() < 0.01, (image_name, diff.mean())
        assert diff.flatten().quantile(0.99) < 0.035, (image_name, diff.flatten().quantile(0.99))
        assert diff.max() < 0.25, (image_name, diff.max())


def _png(rgb: torch.Tensor) -> bytes:
    """The same pixels as a lossless file (the reference reads encoded images)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def test_windows_are_exact_without_resampling():
    """Images already at the size a spec resizes to: crop and pad offsets alone, exact."""
    rng = np.random.default_rng(0)
    wide = torch.from_numpy(rng.integers(0, 256, (3, 64, 101), dtype=np.uint8))  # shortest: crop 37 columns
    spec = SPECS["open_clip_shortest"]
    torch.testing.assert_close(preprocess_tensor(spec, wide[None])[0], reference_preprocess(spec, [_png(wide)])[0],
                               rtol=0, atol=1e-6)
    tall = torch.from_numpy(rng.integers(0, 256, (3, 64, 33), dtype=np.uint8))  # longest: pad 31 columns
    for name in ("open_clip_longest_fill", "sam"):
        spec = SPECS[name]
        torch.testing.assert_close(preprocess_tensor(spec, tall[None])[0], reference_preprocess(spec, [_png(tall)])[0],
                                   rtol=0, atol=1e-6)
