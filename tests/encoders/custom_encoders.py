"""Encoders for the ``python:`` and ``timm:`` encoder kinds.

A user's ``python:`` encoder module, written to a temporary directory and put on the path:
``user_module`` (session fixture, tests/conftest.py) writes ``arra_user_encoders.py`` (plus its
weights file) into a temporary directory, prepends it to ``sys.path`` and to ``PYTHONPATH`` (for
tools run as subprocesses), and returns that directory; ``timm_weights`` (the same) saves timm models. Its functions cover the contract and
every way to break it; ``pooled`` is the well-behaved one: a fixed random linear map of the
image averaged to 4 x 4, i.e. features that depend strongly on the pixels.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

MODULE = "arra_user_encoders"
POOLED_DIM = 40
SIZE = 32

SOURCE = '''
"""Test encoders for python:arra_user_encoders:FUNCTION."""
from pathlib import Path

import torch
import torch.nn.functional as F

WEIGHTS = Path(__file__).with_name("arra_user_weights.pt")
SPEC = {"image_size": 32, "resize_mode": "shortest", "window": "center", "interpolation": "bicubic",
        "mean": (0.5, 0.4, 0.3), "std": (0.25, 0.25, 0.3)}


class Pooled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(48, 40)
        self.proj.load_state_dict(torch.load(WEIGHTS, weights_only=True))
        self.weights_files = [str(WEIGHTS)]

    def forward(self, x):
        return self.proj(F.adaptive_avg_pool2d(x, 4).flatten(1))


class Lambda(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def pooled(aggregation, device):
    return Pooled().to(device), dict(SPEC)


def pooled_top_left(aggregation, device):
    return Pooled(), {**SPEC, "resize_mode": "longest", "window": "top_left", "interpolation": "bilinear"}


def only_avgpool(aggregation, device):
    if aggregation != "avgpool":
        raise ValueError(f"only avgpool, not {aggregation}")
    return Pooled(), dict(SPEC)


def wrong_shape(aggregation, device):
    return torch.nn.Identity(), dict(SPEC)


def wrong_batch(aggregation, device):
    return Lambda(lambda x: x.mean(dim=(0, 2, 3))[None]), dict(SPEC)


def integer_features(aggregation, device):
    return Lambda(lambda x: x.mean(dim=(2, 3)).long()), dict(SPEC)


def forward_fails(aggregation, device):
    return Lambda(lambda x: x @ x), dict(SPEC)


def raises(aggregation, device):
    raise RuntimeError("the weights are on another machine")


def not_a_tuple(aggregation, device):
    return Pooled()


def rounding_mismatch(aggregation, device):
    return Pooled(), {**SPEC, "resize_rounding": "half_up"}


def unknown_field(aggregation, device):
    return Pooled(), {**SPEC, "crop_pct": 0.9}


def no_reference(aggregation, device):
    return Pooled(), {**SPEC, "window": "top_left", "resize_mode": "shortest"}


def missing_weights(aggregation, device):
    net = Pooled()
    net.weights_files = [str(WEIGHTS) + ".absent"]
    return net, dict(SPEC)


NOT_A_FUNCTION = 3
'''


def write_user_module(directory: Path, name: str = MODULE, seed: int = 0) -> Path:
    """The module and its weights file in ``directory``; returns the module file."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    torch.save(torch.nn.Linear(48, POOLED_DIM).state_dict(), directory / "arra_user_weights.pt")
    path = directory / f"{name}.py"
    path.write_text(SOURCE)
    return path


def pooled_module() -> torch.nn.Module:
    """What ``pooled`` returns, called directly (the reference for the encoders package)."""
    return importlib.import_module(MODULE).pooled("avgpool", torch.device("cpu"))[0].eval()


def save_timm(arch: str, path: Path, headless: bool = False, seed: int = 0) -> torch.nn.Module:
    """A random-init timm model (timm's tiny ``test_*`` models: 160 px, < 0.4 M parameters) saved to
    ``path`` (``.safetensors`` or a torch state dict), with its classifier head or without it."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, num_classes=0 if headless else 1000).eval()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return model
