"""Target encoders: dims, aggregations against direct library computations, identity, errors."""

from __future__ import annotations

import shutil

import pytest
import torch

from arra_megatron.encoders import load_encoder
from arra_megatron.runtime.capabilities import has_gpu
from arra_megatron.tiny import CLIP_EMBED_DIM, make_tiny_clip
from tests.encoders.fixtures import SAM_CHANNELS, make_tiny_sam

torch.set_num_threads(1)


def _images(seed: int = 0, n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def _open_clip_model(directory):
    import open_clip

    return open_clip.create_model_from_pretrained(f"local-dir:{directory}", return_transform=False).eval()


def test_clip_aggregations_match_open_clip(tiny_clip_dir):
    x = _images()
    model = _open_clip_model(tiny_clip_dir)
    visual = model.visual
    with torch.no_grad():
        cls_ref = model.encode_image(x)
        tokens = visual.ln_post(visual.transformer(visual._embeds(x)))  # [N, 1 + patches, width]
        avg_ref = tokens[:, 1:].mean(dim=1) @ visual.proj
    outputs = {}
    for aggregation in ("cls", "avgpool", "concat"):
        encoder = load_encoder(f"open_clip:local-dir:{tiny_clip_dir}", aggregation)
        outputs[aggregation] = encoder.encode(x)
        assert outputs[aggregation].dtype == torch.float32
        assert outputs[aggregation].shape == (3, encoder.dim)
    assert encoder.dim == 2 * CLIP_EMBED_DIM
    torch.testing.assert_close(outputs["cls"], cls_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(outputs["avgpool"], avg_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outputs["concat"], torch.cat([cls_ref, avg_ref], dim=1), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(outputs["cls"], outputs["avgpool"])


def test_biomedclip_timm_tower(tiny_biomedclip_dir):
    x = _images(1)
    model = _open_clip_model(tiny_biomedclip_dir)
    trunk = model.visual.trunk
    assert type(trunk).__module__.startswith("timm.") and trunk.global_pool == "token"
    with torch.no_grad():
        cls_ref = model.encode_image(x)
        avg_ref = model.visual.head(trunk.forward_features(x)[:, trunk.num_prefix_tokens:].mean(dim=1))
    cls = load_encoder(f"open_clip:local-dir:{tiny_biomedclip_dir}", "cls")
    avg = load_encoder(f"open_clip:{tiny_biomedclip_dir}", "avgpool")  # local-dir: prefix is optional
    concat = load_encoder(f"open_clip:local-dir:{tiny_biomedclip_dir}", "concat")
    assert (cls.dim, avg.dim, concat.dim) == (CLIP_EMBED_DIM, CLIP_EMBED_DIM, 2 * CLIP_EMBED_DIM)
    torch.testing.assert_close(cls.encode(x), cls_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(avg.encode(x), avg_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(concat.encode(x), torch.cat([cls_ref, avg_ref], 1), rtol=1e-5, atol=1e-5)


def test_sam_avgpool_is_mean_of_image_embeddings(tiny_sam_dir):
    from transformers import SamModel

    x = _images(2)
    with torch.no_grad():
        embeddings = SamModel.from_pretrained(tiny_sam_dir).eval().get_image_embeddings(x)  # [N, C, 4, 4]
    assert embeddings.shape == (3, SAM_CHANNELS, 4, 4)
    encoder = load_encoder(f"sam:{tiny_sam_dir}", "avgpool")
    out = encoder.encode(x)
    assert encoder.dim == SAM_CHANNELS == out.shape[1]
    torch.testing.assert_close(out, embeddings.mean(dim=(2, 3)), rtol=1e-5, atol=1e-6)


def test_sam_vision_model_checkpoint(tmp_path):
    from transformers import SamVisionModel

    directory = make_tiny_sam(tmp_path / "vision", vision_only=True)
    x = _images(3, 2)
    with torch.no_grad():
        ref = SamVisionModel.from_pretrained(directory).eval()(x).last_hidden_state.mean(dim=(2, 3))
    torch.testing.assert_close(load_encoder(f"sam:{directory}", "avgpool").encode(x), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("aggregation", ["cls", "concat"])
def test_sam_refuses_cls(tiny_sam_dir, aggregation):
    with pytest.raises(ValueError, match="no CLS token"):
        load_encoder(f"sam:{tiny_sam_dir}", aggregation)


def test_preprocessing_specs_come_from_model_configs(tiny_clip_dir, tiny_sam_dir, tmp_path):
    clip = load_encoder(f"open_clip:local-dir:{tiny_clip_dir}", "cls").spec
    assert (clip.library, clip.image_size, clip.resize_mode, clip.resize_rounding, clip.window, clip.interpolation) == \
        ("open_clip", 64, "shortest", "floor", "center", "bicubic")
    assert clip.mean == (0.48145466, 0.4578275, 0.40821073) and clip.std == (0.26862954, 0.26130258, 0.27577711)
    longest = load_encoder(f"open_clip:local-dir:{make_tiny_clip(tmp_path / 'l', 'longest')}", "cls").spec
    assert (longest.resize_mode, longest.resize_rounding) == ("longest", "half_even")
    sam = load_encoder(f"sam:{tiny_sam_dir}", "avgpool").spec
    assert (sam.library, sam.image_size, sam.resize_mode, sam.resize_rounding, sam.window, sam.interpolation) == \
        ("sam", 64, "longest", "half_up", "top_left", "bilinear")
    assert sam.mean == (0.485, 0.456, 0.406) and sam.std == (0.229, 0.224, 0.225)


def test_deterministic_and_identity(tiny_clip_dir, tmp_path):
    x = _images(4)
    first = load_encoder(f"open_clip:local-dir:{tiny_clip_dir}", "concat")
    second = load_encoder(f"open_clip:local-dir:{tiny_clip_dir}", "concat")
    assert torch.equal(first.encode(x), first.encode(x))
    assert torch.equal(first.encode(x), second.encode(x))
    identity = first.identity
    assert identity == second.identity
    assert identity["family"] == "open_clip" and identity["aggregation"] == "concat" and identity["dim"] == first.dim
    assert identity["preprocessing"] == first.spec.to_dict() and len(identity["sha256"]) == 64
    other = load_encoder(f"open_clip:local-dir:{make_tiny_clip(tmp_path / 'other', 'squash')}", "concat")
    assert other.identity["sha256"] != identity["sha256"]


def test_errors_name_what_to_fix(tiny_clip_dir, tmp_path):
    with pytest.raises(ValueError, match="open_clip:local-dir:/path"):
        load_encoder("clip:/somewhere", "cls")
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        load_encoder(f"open_clip:local-dir:{tmp_path}", "cls")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_encoder(f"sam:{tmp_path}", "avgpool")
    with pytest.raises(ValueError, match="aggregation"):
        load_encoder(f"open_clip:local-dir:{tiny_clip_dir}", "mean")
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(tiny_clip_dir / "open_clip_config.json", no_weights)
    with pytest.raises(RuntimeError):  # open_clip's create_model_from_pretrained requires weights
        load_encoder(f"open_clip:local-dir:{no_weights}", "cls")
    encoder = load_encoder(f"open_clip:local-dir:{tiny_clip_dir}", "cls")
    with pytest.raises(ValueError, match=r"\[N, 3, 64, 64\]"):
        encoder.encode(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match="bf16"):
        load_encoder(f"open_clip:local-dir:{tiny_clip_dir}", "cls", device="cpu", bf16=True)


@pytest.mark.skipif(not has_gpu(), reason="bf16 autocast of the target encoder runs on CUDA only; no GPU here")
def test_bf16_on_gpu_close_to_fp32(tiny_clip_dir):
    x = _images(5)
    fp32 = load_encoder(f"open_clip:local-dir:{tiny_clip_dir}", "concat", device="cuda").encode(x)
    bf16 = load_encoder(f"open_clip:local-dir:{tiny_clip_dir}", "concat", device="cuda", bf16=True).encode(x)
    assert bf16.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(fp32, bf16).min() > 0.99
