"""The chest-X-ray FID network (torchxrayvision DenseNet-121) against torchxrayvision's own input path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from arra_megatron.evaluation.feature_nets import load_feature_net


def test_xrv_features_match_torchxrayvision(tmp_path):
    xrv = pytest.importorskip("torchxrayvision", reason="torchxrayvision is not installed (optional)")
    torch.manual_seed(0)
    model = xrv.models.DenseNet(weights=None).eval()
    torch.save(model, tmp_path / "pickled.pt")  # how torchxrayvision ships its weights
    torch.save(model.state_dict(), tmp_path / "state_dict.pt")
    images = torch.randint(0, 256, (2, 3, 200, 240), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    expected = []
    for image in images:  # xrv.utils.normalize on the channel mean, centre square, resize to 224
        gray = xrv.utils.normalize(image.permute(1, 2, 0).numpy().astype(np.float32).mean(2), 255)
        x = torch.from_numpy(gray)[None, None, :, 20:220]
        with torch.no_grad():
            expected.append(model.features2(F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True)))
    expected = torch.cat(expected)
    for name in ("pickled.pt", "state_dict.pt"):
        net = load_feature_net(f"xrv:{tmp_path / name}", allow_pickle=name == "pickled.pt")
        with torch.no_grad():
            torch.testing.assert_close(net(images)["features"], expected, rtol=1e-4, atol=1e-3)
    assert expected.shape == (2, 1024) and expected.std() > 1e-3


def test_a_pickled_model_is_read_only_when_allowed(tmp_path):
    """A weights file that is a pickled nn.Module (how torchxrayvision ships its nets) runs code
    when unpickled: refused naming --allow-pickled-weights, read with it, and then the same
    features as its state dict give."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    torch.save(model, tmp_path / "pickled.pt")
    torch.save(model.state_dict(), tmp_path / "state_dict.pt")
    with pytest.raises(ValueError, match="--allow-pickled-weights") as refused:
        load_feature_net(f"torchvision:resnet18:{tmp_path / 'pickled.pt'}")
    assert "pickled.pt: not a plain state dict" in str(refused.value)
    images = torch.randint(0, 256, (2, 3, 40, 50), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        allowed = load_feature_net(f"torchvision:resnet18:{tmp_path / 'pickled.pt'}", allow_pickle=True)(images)
        plain = load_feature_net(f"torchvision:resnet18:{tmp_path / 'state_dict.pt'}")(images)
    assert torch.equal(allowed["features"], plain["features"]) and allowed["features"].shape == (2, 512)
