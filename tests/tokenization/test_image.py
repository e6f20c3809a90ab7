import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from arra_megatron.tokenization.image import ImageDecodeError, ImageTokenizer, load_rgb, to_rgb
from tests.support.tiny_data import encode_image, make_image


def test_to_rgb_16bit_is_scaled_not_clipped():
    values = np.array([[0, 257, 65535, 128 * 257]], dtype=np.uint16)
    image = load_rgb(encode_image(Image.fromarray(values), "PNG"))
    assert image.mode == "RGB"
    assert np.asarray(image)[0, :, 0].tolist() == [0, 1, 255, 128]


def test_to_rgb_alpha_goes_over_white():
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)  # opaque pixel kept; the others are transparent black
    rgb = np.asarray(load_rgb(encode_image(Image.fromarray(rgba), "PNG")))
    assert rgb[0, 0].tolist() == [10, 20, 30]
    assert rgb[1, 1].tolist() == [255, 255, 255]


def test_to_rgb_gray_and_cmyk():
    gray = np.asarray(to_rgb(Image.new("L", (3, 3), 77)))
    assert (gray == 77).all()
    assert to_rgb(Image.new("CMYK", (3, 3), (0, 0, 0, 0))).getpixel((1, 1)) == (255, 255, 255)


@pytest.mark.parametrize("data", [b"", b"not an image at all", None])
def test_load_rgb_rejects_bad_bytes(data):
    if data is None:  # a JPEG cut in half
        full = encode_image(make_image(0, (64, 64)), "JPEG")
        data = full[: len(full) // 2]
    with pytest.raises(ImageDecodeError):
        load_rgb(data)


def test_preprocess_crops_the_centre(janus_vq_dir):
    tok = ImageTokenizer(janus_vq_dir, image_size=32)
    image = make_image(1, (64, 32))  # shorter side already 32: no resampling, only the crop
    pixels = tok.preprocess(image)
    expected = np.asarray(image, dtype=np.float32)[:, 16:48] / 127.5 - 1.0
    assert pixels.shape == (3, 32, 32)
    torch.testing.assert_close(pixels, torch.from_numpy(expected).permute(2, 0, 1), rtol=0, atol=0)


def test_janus_lookup_is_llamagen_cosine(janus_vq_dir):
    torch.manual_seed(0)
    tok = ImageTokenizer(janus_vq_dir, image_size=32)
    assert (tok.tokens_per_image, tok.codebook_size, tok.can_decode) == (64, 64, True)
    pixels = torch.stack([tok.preprocess(make_image(s)) for s in range(3)])
    codes = tok.encode(pixels)
    model = tok.model
    with torch.no_grad():
        z = model.quant_conv(model.encoder(pixels)).permute(0, 2, 3, 1).reshape(-1, 8)
        cosine = F.normalize(z, dim=-1) @ F.normalize(model.quantize.embedding.weight, dim=-1).T
        euclid = model.encode(pixels).image_tokens.view(3, -1)
    assert codes.tolist() == cosine.argmax(dim=1).view(3, -1).tolist()
    # transformers' own quantizer (Euclidean on raw vectors) would give other codes for this codebook.
    assert (euclid != codes).any()
    decoded = tok.decode(codes)
    assert decoded.shape == (3, 3, 32, 32) and torch.isfinite(decoded).all()


def test_chameleon_codes_are_transformers_codes(chameleon_vq_dir):
    tok = ImageTokenizer(chameleon_vq_dir, image_size=32)
    pixels = torch.stack([tok.preprocess(make_image(s)) for s in range(2)])
    with torch.no_grad():
        expected = tok.model.encode(pixels).image_tokens.view(2, -1)
    assert tok.encode(pixels).tolist() == expected.tolist()
    assert tok.preprocessing["resample"] == "lanczos"
    with pytest.raises(NotImplementedError):
        tok.decode(expected)


def test_bad_settings_name_the_flag(janus_vq_dir, tmp_path):
    with pytest.raises(ValueError, match="--image-size 30"):
        ImageTokenizer(janus_vq_dir, image_size=30)
    with pytest.raises(FileNotFoundError, match="--image-tokenizer"):
        ImageTokenizer(tmp_path, image_size=32)
