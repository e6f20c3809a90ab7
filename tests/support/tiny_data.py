"""Tiny tokenizers, a Chameleon VQ, images and tar shards for the tests (built locally, no downloads).

The session fixtures that build them once are in tests/conftest.py; the Janus VQ the demo
also uses is ``arra_megatron.tiny.make_janus_vq``.
"""

from __future__ import annotations

import io
import random
import tarfile
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

WORDS = ("a photo of the red blue green cat dog car house tree sky over under small large "
         "chest x-ray view frontal lateral left right lung heart normal clear with and in on "
         "bright dark old new river mountain city road bird flower table chair").split()


def random_caption(rng: random.Random, words: int) -> str:
    """Lowercase words, sometimes followed by a comma: text both test tokenizers round-trip exactly."""
    return " ".join(rng.choice(WORDS) + ("," if rng.random() < 0.15 else "") for _ in range(words)).rstrip(",")


def train_sentencepiece(directory: Path, vocab_size: int = 120) -> Path:
    """A BPE sentencepiece model (unk 0, bos 1, eos 2, no pad) trained on generated captions."""
    import sentencepiece

    rng = random.Random(0)
    lines = [random_caption(rng, rng.randint(3, 12)) for _ in range(2000)]
    directory.mkdir(parents=True, exist_ok=True)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(directory / "sp"), vocab_size=vocab_size,
        model_type="bpe", character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        minloglevel=2, num_threads=1)
    return directory / "sp.model"


def make_hf_tokenizer(directory: Path) -> Path:
    """A word-level Hugging Face fast tokenizer over ``WORDS`` saved with save_pretrained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<unk>", "<s>", "</s>", "<pad>", *sorted(set(WORDS)), ","])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", pad_token="<pad>")
    tokenizer.save_pretrained(str(directory))
    return directory


def make_chameleon_vq(directory: Path, seed: int = 0) -> Path:
    """Random ChameleonVQVAE: 4x downsampling, 64 codes of dim 8."""
    from transformers import ChameleonVQVAE, ChameleonVQVAEConfig

    torch.manual_seed(seed)
    config = ChameleonVQVAEConfig(embed_dim=8, num_embeddings=64, latent_channels=32, base_channels=32,
                                  channel_multiplier=[1, 1, 2], num_res_blocks=1, resolution=32)
    ChameleonVQVAE(config).eval().save_pretrained(str(directory))
    return directory


def make_image(seed: int, size: Tuple[int, int] = (40, 32)) -> Image.Image:
    """An RGB image with structure (gradients + blocks + noise) so VQ codes vary across positions."""
    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
    base += rng.normal(0, 40, size=(height, width, 3)) + rng.integers(0, 120, size=3)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def encode_image(image: Image.Image, format: str, **params) -> bytes:
    """``image`` as the bytes of a ``format`` file (PIL's writer and its ``params``)."""
    buffer = io.BytesIO()
    image.save(buffer, format=format, **params)
    return buffer.getvalue()


def write_tar(path: Path, members: Sequence[Tuple[str, bytes]]) -> Dict[str, Tuple[int, int]]:
    """A tar of (name, bytes) members in order; returns name -> (data offset, size) as tarfile reads them back."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            archive.addfile(info, io.BytesIO(data))
    with tarfile.open(path, "r:") as archive:
        return {m.name: (m.offset_data, m.size) for m in archive.getmembers()}


def image_modes_zoo(seed: int) -> List[Tuple[str, str, bytes]]:
    """(label, extension, bytes) for images whose mode needs converting: L, CMYK, RGBA, 16-bit, P+alpha, LA."""
    rgb = make_image(seed, (36, 44))
    gray16 = (np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    return [
        ("gray", "png", encode_image(rgb.convert("L"), "PNG")),
        ("cmyk", "jpg", encode_image(rgb.convert("CMYK"), "JPEG", quality=90)),
        ("rgba", "png", encode_image(rgb.convert("RGBA"), "PNG")),
        ("gray16", "png", encode_image(Image.fromarray(gray16), "PNG")),
        ("palette_alpha", "png", encode_image(palette, "PNG", transparency=0)),
        ("gray_alpha", "png", encode_image(rgb.convert("LA"), "PNG")),
        ("webp", "webp", encode_image(rgb, "WEBP", lossless=True)),
    ]
