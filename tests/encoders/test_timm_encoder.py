"""``timm:ARCH:WEIGHTS`` encoders against timm's own forward, pooling and eval transform."""

from __future__ import annotations

import pytest
import torch

from arra_megatron.encoders import load_encoder
from arra_megatron.encoders.preprocess import open_image, reference_preprocess
from tests.encoders.custom_encoders import save_timm
from tests.encoders.fixtures import image_zoo

timm = pytest.importorskip("timm")
torch.set_num_threads(1)


def _pixels(encoder):
    """The zoo (wide, tall, small, greyscale, RGBA) through timm's eval transform at crop_pct 1.0."""
    from timm.data import create_transform, resolve_model_data_config

    config = resolve_model_data_config(encoder.model)
    transform = create_transform(**{**config, "crop_pct": 1.0}, is_training=False)
    images = [data for _, data in image_zoo()]
    expected = torch.stack([transform(open_image(data).convert("RGB")) for data in images])
    pixels = reference_preprocess(encoder.spec, images)
    torch.testing.assert_close(pixels, expected, rtol=0, atol=0)
    assert pixels.shape[1:] == (3, 160, 160)
    return pixels


def test_vit_class_token_and_patch_mean(timm_weights):
    path, model = timm_weights["test_vit"]
    cls = load_encoder(f"timm:test_vit:{path}", "cls")
    assert (cls.spec.library, cls.spec.resize_mode, cls.spec.window, cls.spec.interpolation) == \
        ("timm", "shortest", "center", "bicubic")
    x = _pixels(cls)
    with torch.no_grad():
        tokens = model.forward_features(x)  # after the final norm
        assert torch.equal(model.forward_head(tokens, pre_logits=True), tokens[:, 0])  # timm's own CLS pooling
    torch.testing.assert_close(cls.encode(x), tokens[:, 0], rtol=1e-5, atol=1e-5)
    avg = load_encoder(f"timm:test_vit:{path}", "avgpool")
    torch.testing.assert_close(avg.encode(x), tokens[:, model.num_prefix_tokens:].mean(1), rtol=1e-5, atol=1e-5)
    concat = load_encoder(f"timm:test_vit:{path}", "concat")
    assert (cls.dim, avg.dim, concat.dim) == (64, 64, 128)
    torch.testing.assert_close(concat.encode(x), torch.cat([cls.encode(x), avg.encode(x)], 1), rtol=1e-5, atol=1e-5)
    identity = cls.identity
    assert identity["family"] == "timm" and identity["arch"] == "test_vit" and identity["path"] == str(path.resolve())


@pytest.mark.parametrize("arch", ["test_resnet", "test_convnext"])
def test_cnn_spatial_mean(timm_weights, arch):
    """NCHW feature maps: the spatial mean, which is timm's own avg global pool (ResNet); ConvNeXt's
    classifier is ``head.fc`` (a dotted name) and its weights file holds it."""
    path, model = timm_weights[arch]
    encoder = load_encoder(f"timm:{arch}:{path}", "avgpool")
    x = _pixels(encoder)
    with torch.no_grad():
        fmap = model.forward_features(x)
    torch.testing.assert_close(encoder.encode(x), fmap.mean((2, 3)), rtol=1e-5, atol=1e-5)
    assert encoder.dim == model.num_features
    if arch == "test_resnet":
        with torch.no_grad():
            torch.testing.assert_close(encoder.encode(x), model.forward_head(fmap, pre_logits=True), rtol=1e-5,
                                       atol=1e-5)
    with pytest.raises(ValueError, match="no class token"):
        load_encoder(f"timm:{arch}:{path}", "cls")


def test_headless_torch_state_dict(tmp_path, timm_weights):
    path = tmp_path / "vit_headless.pth"
    model = save_timm("test_vit", path, headless=True, seed=3)
    encoder = load_encoder(f"timm:test_vit:{path}", "cls")
    x = torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(encoder.encode(x), model.forward_features(x)[:, 0], rtol=1e-5, atol=1e-5)


def test_bad_weights_name_the_file(tmp_path, timm_weights):
    vit, _ = timm_weights["test_vit"]
    with pytest.raises(ValueError, match=f"{timm_weights['test_resnet'][0]}: weights do not fit timm test_vit"):
        load_encoder(f"timm:test_vit:{timm_weights['test_resnet'][0]}", "cls")
    from safetensors.torch import load_file, save_file

    state = load_file(str(vit))
    del state["blocks.0.attn.qkv.weight"]
    save_file(state, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match=r"partial.safetensors: weights do not fit .*missing \['blocks.0.attn.qkv"):
        load_encoder(f"timm:test_vit:{tmp_path / 'partial.safetensors'}", "cls")
    state = load_file(str(vit)) | {"extra.weight": torch.zeros(1)}
    save_file(state, str(tmp_path / "extra.safetensors"))
    with pytest.raises(ValueError, match=r"unexpected \['extra.weight'\]"):
        load_encoder(f"timm:test_vit:{tmp_path / 'extra.safetensors'}", "cls")
    torch.save(timm.create_model("test_vit", pretrained=False), tmp_path / "pickled_module.pt")
    with pytest.raises(ValueError, match="pickled_module.pt: not a state dict timm can read"):
        load_encoder(f"timm:test_vit:{tmp_path / 'pickled_module.pt'}", "cls")  # weights_only refuses code
    (tmp_path / "garbage.bin").write_bytes(b"not weights")
    with pytest.raises(ValueError, match="garbage.bin: not a state dict"):
        load_encoder(f"timm:test_vit:{tmp_path / 'garbage.bin'}", "cls")
    with pytest.raises(FileNotFoundError, match="absent.safetensors: weights file not found"):
        load_encoder(f"timm:test_vit:{tmp_path / 'absent.safetensors'}", "cls")
    with pytest.raises(ValueError, match="timm:no_such_arch"):
        load_encoder(f"timm:no_such_arch:{vit}", "cls")
    with pytest.raises(ValueError, match="must look like one of"):
        load_encoder(f"timm:{vit}", "cls")
