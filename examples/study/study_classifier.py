"""A domain classifier whose penultimate layer is an FID feature network for the ARRA study.

The paper measures MIMIC-CXR FID with a chest-X-ray network rather than the ImageNet
Inception; the study does the same for its own domain: a small CNN trained on the
study's train split (never on the test split) whose 128-d penultimate features are the
FID space. ``tools/study.py`` trains it (``train``) and then names it to the project's
tools as a ``python:MODULE:FUNCTION`` feature network through a two-line module it
writes beside the weights (``write_spec_module``), the contract any user encoder meets.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import torch
from torch import nn

FEATURE_DIM = 128


class SmallCNN(nn.Module):
    """Grey-level CNN: [N, 3, S, S] (channels averaged) -> 128-d features -> class logits."""

    def __init__(self, num_classes: int, image_size: int) -> None:
        super().__init__()
        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.MaxPool2d(2))
        self.body = nn.Sequential(block(1, 32), block(32, 64))
        side = image_size // 4
        self.features = nn.Sequential(nn.Flatten(), nn.Dropout(0.25), nn.Linear(64 * side * side, FEATURE_DIM),
                                      nn.ReLU())
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(self.body(images.mean(dim=1, keepdim=True)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(images))


class _Embedder(nn.Module):
    """The ``python:`` encoder contract: preprocessed images [N, 3, S, S] -> [N, 128]."""

    def __init__(self, net: SmallCNN, weights: str) -> None:
        super().__init__()
        self.net = net
        self.weights_files = [weights]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.embed(images)


def preprocess_spec(image_size: int, mean: float, std: float) -> Dict[str, object]:
    return {"image_size": image_size, "resize_mode": "squash", "resize_rounding": "floor", "window": "center",
            "interpolation": "bilinear", "mean": [mean] * 3, "std": [std] * 3, "fill_color": 0}


def load(weights: str, aggregation: str = "cls", device: str | torch.device = "cpu") -> Tuple[nn.Module, dict]:
    """``FUNCTION(aggregation, device)`` of the python: contract, for a weights file saved by ``train``."""
    state = torch.load(weights, map_location="cpu", weights_only=True)
    meta = state.pop("_meta")
    net = SmallCNN(int(meta["num_classes"]), int(meta["image_size"]))
    net.load_state_dict(state)
    module = _Embedder(net, weights).to(device).eval()
    return module, preprocess_spec(int(meta["image_size"]), float(meta["mean"]), float(meta["std"]))


def write_spec_module(directory: Path, weights: Path) -> str:
    """A module ``study_fid_classifier`` in ``directory`` binding ``weights``; returns its python: spec."""
    (directory / "study_fid_classifier.py").write_text(textwrap.dedent(f'''\
        """Written by tools/study.py: the study's Fashion-classifier FID network, as a python: encoder."""
        import study_classifier


        def classifier(aggregation, device):
            return study_classifier.load({str(weights.resolve())!r}, aggregation, device)
        '''))
    return "python:study_fid_classifier:classifier"


def train(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, out: Path,
          epochs: int = 3, batch_size: int = 128, seed: int = 0, progress: bool = True) -> Dict[str, float]:
    """Train on uint8 grey images [N, S, S] with labels; save to ``out``; return test accuracy and loss.

    The test split is only scored once, after training (nothing is chosen on it)."""
    from tqdm import tqdm

    torch.manual_seed(seed)
    num_classes, size = int(train_y.max()) + 1, train_x.shape[-1]
    mean, std = float(train_x.mean() / 255.0), float(train_x.std() / 255.0)
    net = SmallCNN(num_classes, size)
    x = (torch.from_numpy(train_x).float() / 255.0 - mean) / std
    y = torch.from_numpy(train_y).long()
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    bar = tqdm(total=steps, desc="classifier", disable=not progress)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            idx = order[start:start + batch_size]
            loss = nn.functional.cross_entropy(net(x[idx, None].expand(-1, 3, -1, -1)), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    net.eval()
    tx = (torch.from_numpy(test_x).float() / 255.0 - mean) / std
    with torch.no_grad():
        logits = torch.cat([net(tx[i:i + 1000, None].expand(-1, 3, -1, -1)) for i in range(0, len(tx), 1000)])
    accuracy = float((logits.argmax(1) == torch.from_numpy(test_y).long()).float().mean())
    state = dict(net.state_dict())
    state["_meta"] = {"num_classes": num_classes, "image_size": size, "mean": mean, "std": std}
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out)
    return {"test_accuracy": accuracy, "epochs": epochs, "train_images": len(x)}
