"""Feature networks for FID (and Inception logits for IS), always from local weight files.

``load_feature_net(spec, ...)`` with ``spec``:

- ``inception`` (default): torch-fidelity's ``FeatureExtractorInceptionV3``
  (``inception-v3-compat``, the TF-FID InceptionV3 that ADM / LlamaGen reference batches
  use), weights from ``--inception-weights`` (torch-fidelity's
  ``weights-inception-2015-12-05-6726825d.pth``). ``feature_layer`` picks the pool
  (``2048``, the FID standard; ``64``/``192``/``768`` as torchmetrics' ``feature``).
  The same forward also gives the unbiased logits torch-fidelity's IS uses.
- ``torchvision:NAME:PATH``: a torchvision classification model (``densenet121``,
  ``resnet50``, ...) with its ``state_dict`` from PATH; the features are the input of its
  classifier (global-pooled), the image is resized to 224 and normalised with ImageNet
  statistics, as torchvision's own eval transforms do.
- ``xrv:PATH``: torchxrayvision's chest-X-ray DenseNet-121 (the paper's MIMIC-CXR FID),
  weights file as torchxrayvision ships it (a pickled model, read only with
  ``--allow-pickled-weights`` since unpickling runs code from the file; e.g.
  ``nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt``)
  or its ``state_dict``; features are ``DenseNet.features2`` (1024-d). The image is
  turned into torchxrayvision's input: channel mean, scaled to [-1024, 1024]
  (``xrv.utils.normalize(img, 255)``), centre square, resized to 224.
- ``timm:ARCH:PATH`` / ``python:MODULE:FUNCTION``: a target encoder (``load_encoder``, the
  same spec as ``--encoder``), its own preprocessing applied to the uint8 tensors
  (``preprocess_tensor``). The features are its pooled output: for timm the model's own
  pooled feature (the class token where timm pools ``token``, as ViTs do, else the
  ``avgpool`` mean: CNNs); a ``python:`` function is asked for aggregation ``cls``, which
  by the contract is its global image feature.

Every net takes uint8 [N, 3, H, W] and returns ``{"features": [N, D]}`` (plus
``"logits"`` for Inception when asked). ``identity`` is what a statistics file records.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from arra_megatron.encoders.preprocess import PreprocessSpec, preprocess_tensor
from arra_megatron.tokenization.profile import content_sha256

logger = logging.getLogger(__name__)

INCEPTION_LAYERS = ("64", "192", "768", "2048")
INCEPTION_WEIGHTS_REQUIRED = ("--inception-weights is required for Inception FID/IS (torch-fidelity's "
                              "weights-inception-2015-12-05-6726825d.pth as a local file; never downloaded)")
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class FeatureNet(torch.nn.Module):
    """uint8 images -> {"features": [N, D] float32, ...}; frozen, eval mode."""

    def __init__(self, name: str, weights: Path) -> None:
        super().__init__()
        self.name = name
        self.weights = weights
        self._sha256: Optional[str] = None

    @property
    def identity(self) -> Dict[str, str]:
        if self._sha256 is None:  # hashed on first use: a 100 MB file takes a moment
            self._sha256 = content_sha256(self.weights)
        return {"name": self.name, "weights": str(self.weights), "sha256": self._sha256}


def _weights_file(path: str | Path, flag: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{flag} {path}: weights file not found (evaluation never downloads weights; "
                                "give the local file)")
    return path.resolve()


class InceptionFeatures(FeatureNet):
    """torch-fidelity's InceptionV3 (uint8 in, its own TF-compatible resize to 299 inside)."""

    def __init__(self, weights: str | Path, feature_layer: str = "2048", logits: bool = True) -> None:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        if feature_layer not in INCEPTION_LAYERS:
            raise ValueError(f"--inception-features {feature_layer}: choose one of {INCEPTION_LAYERS}")
        path = _weights_file(weights, "--inception-weights")
        super().__init__(f"inception-v3-compat:{feature_layer}", path)
        self.layers = [feature_layer] + (["logits_unbiased"] if logits else [])
        try:
            self.net = FeatureExtractorInceptionV3("inception-v3-compat", self.layers,
                                                   feature_extractor_weights_path=str(path))
        except (RuntimeError, KeyError, EOFError, ValueError, pickle.UnpicklingError) as error:  # not its state dict
            raise ValueError(f"--inception-weights {path}: not torch-fidelity's InceptionV3 weights "
                             f"({type(error).__name__}: {str(error)[:200]})") from error

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        out = dict(zip(self.layers, self.net(images)))
        result = {"features": out[self.layers[0]]}
        if "logits_unbiased" in out:
            result["logits"] = out["logits_unbiased"]
        return result


PICKLE_FLAG = "--allow-pickled-weights"


def _load_state_dict(path: Path, flag: str, allow_pickle: bool = False) -> Dict[str, torch.Tensor]:
    """A state dict, from a plain state-dict file (``weights_only=True``), or, with
    ``allow_pickle`` (``--allow-pickled-weights``), from a pickled whole model as
    torchxrayvision ships it: unpickling runs code from the file, so it is never done unasked.
    """
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as safe_error:  # noqa: BLE001 - a pickled object, or not a torch file at all
        if not allow_pickle:
            raise ValueError(
                f"{flag} {path}: not a plain state dict ({type(safe_error).__name__} under weights_only=True: "
                f"{str(safe_error).splitlines()[0][:200]}). If it is a pickled model (as torchxrayvision ships its "
                f"weights), loading it runs code from the file: re-save it as a state dict "
                f"(torch.save(model.state_dict(), PATH)), or pass {PICKLE_FLAG} if you trust the file") from None
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as error:  # not a torch file at all
            raise ValueError(f"{flag} {path}: not a PyTorch weights file ({type(error).__name__}: "
                             f"{str(error)[:200]})") from error
    if isinstance(loaded, torch.nn.Module):
        loaded = loaded.state_dict()
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ValueError(f"{flag} {path}: expected a state_dict (or a saved model), got {type(loaded).__name__}")
    return loaded


class TorchvisionFeatures(FeatureNet):
    """A torchvision classifier's pooled penultimate features (its head replaced by Identity)."""

    def __init__(self, arch: str, weights: str | Path, resize: int = 224, allow_pickle: bool = False) -> None:
        import torchvision

        path = _weights_file(weights, "--fid-feature-net")
        super().__init__(f"torchvision:{arch}", path)
        try:
            model = torchvision.models.get_model(arch, weights=None)
        except ValueError as error:
            raise ValueError(f"--fid-feature-net torchvision:{arch}:...: {error}") from error
        try:
            model.load_state_dict(_load_state_dict(path, "--fid-feature-net", allow_pickle))
        except RuntimeError as error:  # missing / unexpected keys, other shapes
            raise ValueError(f"--fid-feature-net torchvision:{arch}:{path}: weights do not fit {arch} "
                             f"({str(error)[:300]})") from error
        for head in ("fc", "classifier", "heads", "head"):
            if isinstance(getattr(model, head, None), (torch.nn.Linear, torch.nn.Sequential)):
                setattr(model, head, torch.nn.Identity())
                break
        else:
            raise ValueError(f"--fid-feature-net torchvision:{arch}: no fc/classifier/heads to take features before")
        self.model = model.eval().requires_grad_(False)
        self.spec = PreprocessSpec(library="python", image_size=resize, resize_mode="squash", resize_rounding="floor",
                                   window="center", interpolation="bilinear", mean=_IMAGENET_MEAN, std=_IMAGENET_STD)

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {"features": self.model(preprocess_tensor(self.spec, images)).flatten(1).float()}


class XRVFeatures(FeatureNet):
    """torchxrayvision DenseNet-121 ``features2`` on chest X-rays."""

    RESOLUTION = 224

    def __init__(self, weights: str | Path, allow_pickle: bool = False) -> None:
        try:
            import torchxrayvision as xrv
        except ImportError as error:
            raise ImportError(f"--fid-feature-net xrv:... needs the torchxrayvision package ({error}); "
                              "install it (pip install torchxrayvision) or use torchvision:densenet121:PATH") from error
        path = _weights_file(weights, "--fid-feature-net")
        super().__init__("xrv:densenet121", path)
        state = _load_state_dict(path, "--fid-feature-net", allow_pickle)
        state.pop("op_threshs", None)
        num_classes = state["classifier.weight"].shape[0] if "classifier.weight" in state else 18
        model = xrv.models.DenseNet(num_classes=num_classes, weights=None)
        missing = [k for k in model.state_dict() if k not in state and k != "op_threshs"]
        try:
            if missing:
                raise RuntimeError(f"missing {missing[:3]}")
            model.load_state_dict(state, strict=False)
        except RuntimeError as error:
            raise ValueError(f"--fid-feature-net xrv:{path}: not a torchxrayvision DenseNet ({str(error)[:300]})") \
                from error
        self.model = model.eval().requires_grad_(False)

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        x = images.float().mean(dim=1, keepdim=True)
        x = (2 * (x / 255) - 1.0) * 1024
        h, w = x.shape[-2:]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        x = x[..., top:top + side, left:left + side]
        x = F.interpolate(x, size=(self.RESOLUTION, self.RESOLUTION), mode="bilinear", antialias=True)
        return {"features": self.model.features2(x).float()}


class EncoderFeatures(FeatureNet):
    """A target encoder (``timm:`` / ``python:`` spec) as the FID network."""

    def __init__(self, spec: str, aggregation: Optional[str]) -> None:
        from arra_megatron.encoders import load_encoder

        try:
            encoder = load_encoder(spec, aggregation)
        except (ValueError, FileNotFoundError) as error:
            raise type(error)(f"--fid-feature-net {spec}: {error}") from error
        label = encoder.arch if encoder.family == "timm" else encoder.name
        super().__init__(f"{encoder.family}:{label} ({encoder.aggregation})", Path(encoder.path))
        self._sha256 = encoder.content_hash  # python: the module source and its weights files
        self.encoder = encoder
        self.model = encoder.model  # registered: .to(device) moves it, and encoder.device follows

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {"features": self.encoder.encode(preprocess_tensor(self.encoder.spec, images))}


def load_feature_net(spec: str, inception_weights: Optional[str] = None, feature_layer: str = "2048",
                     logits: bool = False, allow_pickle: bool = False) -> FeatureNet:
    """Build the FID feature network named by ``--fid-feature-net`` (see the module doc);
    ``allow_pickle`` (``--allow-pickled-weights``) admits a weights file that is a pickled model."""
    kind, _, rest = spec.partition(":")
    if kind == "inception" and not rest:
        if not inception_weights:
            raise ValueError(INCEPTION_WEIGHTS_REQUIRED)
        return InceptionFeatures(inception_weights, feature_layer, logits=logits)
    if kind == "torchvision":
        arch, _, path = rest.partition(":")
        if arch and path:
            return TorchvisionFeatures(arch, path, allow_pickle=allow_pickle)
    if kind == "xrv" and rest:
        return XRVFeatures(rest, allow_pickle=allow_pickle)
    if kind in ("timm", "python"):
        return EncoderFeatures(spec, "cls" if kind == "python" else None)
    raise ValueError(f"--fid-feature-net {spec!r}: use 'inception', 'torchvision:ARCH:/path/weights.pth', "
                     "'xrv:/path/weights.pt', 'timm:ARCH:/path/weights.safetensors' or 'python:MODULE:FUNCTION'")
