"""Tokenizer profile: the vocabulary contract between the dataset builder and training.

A dataset on disk holds bare token ids; the profile (stored in ``PREFIX.json``)
says what they mean, so the training side can find image tokens, build masks
and pick the null condition for classifier-free guidance without loading any
tokenizer. Vocabulary layout (ids grow left to right):

    [ text tokens | class tokens | image codes | new special tokens ]

Text ids are the text tokenizer's own ids (so a pretrained LLM's embeddings stay
valid); BOS, EOS and PAD reuse the text tokenizer's ids when it has them. BOI,
EOI and the null condition are always new ids after the image codes.

A model whose vocabulary already holds its image tokens (Chameleon: 8192 image ids inside
its 65,536, with its own BOI/EOI) keeps them: the profile carries an explicit table,
``image_token_ids[c]`` = the token id of VQ code c (written by the checkpoint importer,
conversion/chameleon.py). ``image_token_range`` stays valid as long as those ids form one
contiguous block (in any order), which every range-based mask relies on.

One sample (ARRA_METHOD.md, "Sequence layout"):

    [BOS] condition [BOI] x_1 .. x_n [EOI] [EOS]
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Tuple

import numpy as np

# Tokens around the condition and the image: BOS, BOI, EOI, EOS.
NUM_FRAME_TOKENS = 4


def content_sha256(path: str | Path) -> str:
    """SHA-256 over a file, or over every file of a directory (names and bytes, sorted).

    Why: a dataset is only valid for the exact tokenizer weights that made it; the
    hash lets the training side refuse a VQ model or vocabulary that changed.
    """
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    outer = hashlib.sha256()
    for file in files:
        with open(file, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        name = file.name if file == path else file.relative_to(path).as_posix()
        outer.update(f"{name}\0{digest}\n".encode())
    return outer.hexdigest()


@dataclass(frozen=True)
class ModelIdentity:
    """Which tokenizer or model made the tokens: kind (class name), path and content hash."""

    kind: str
    path: str
    sha256: str

    @classmethod
    def of(cls, kind: str, path: str | Path) -> "ModelIdentity":
        return cls(kind=kind, path=str(Path(path).resolve()), sha256=content_sha256(path))


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the special tokens; ``null_condition`` replaces the condition for CFG dropout."""

    bos: int
    eos: int
    pad: int
    boi: int
    eoi: int
    null_condition: int


@dataclass(frozen=True)
class TokenizerProfile:
    """Everything needed to interpret (and to produce) one dataset's token ids.

    Attributes:
        vocab_size: total vocabulary, all regions and special tokens included.
        text_vocab_size: ids [0, text_vocab_size) are text tokens (0 without text).
        class_token_offset, num_classes: class-conditional (C2I) condition tokens.
        image_token_offset, image_codebook_size: VQ code c is token offset + c.
        special: special token ids.
        image_size: square side in pixels the VQ model sees.
        tokens_per_image: n, the number of VQ codes per image (raster order).
        image_preprocessing: resize/crop/normalisation applied before the VQ encoder.
        vq_model: identity of the image tokenizer.
        text_tokenizer: identity of the text tokenizer (None for class-only inputs).
        image_token_ids: optional explicit table, VQ code c -> token id ``image_token_ids[c]``
            (then ``image_token_offset`` is the smallest of them); None: code c is offset + c.
    """

    vocab_size: int
    text_vocab_size: int
    class_token_offset: int
    num_classes: int
    image_token_offset: int
    image_codebook_size: int
    special: SpecialTokens
    image_size: int
    tokens_per_image: int
    image_preprocessing: Mapping[str, Any]
    vq_model: ModelIdentity
    text_tokenizer: Optional[ModelIdentity] = None
    image_token_ids: Optional[Tuple[int, ...]] = None

    def __post_init__(self):
        if self.image_token_ids is not None:
            ids = tuple(int(i) for i in self.image_token_ids)
            object.__setattr__(self, "image_token_ids", ids)
            if len(ids) != self.image_codebook_size or len(set(ids)) != len(ids):
                raise ValueError(f"image_token_ids must hold {self.image_codebook_size} distinct ids, one per code")
            if ids and (min(ids) != self.image_token_offset or max(ids) >= self.vocab_size):
                raise ValueError("image_token_ids: image_token_offset must be the smallest id, all ids below "
                                 "vocab_size")

    @classmethod
    def create(
        cls,
        *,
        text_vocab_size: int,
        text_special_ids: Mapping[str, Optional[int]],
        num_classes: int,
        image_codebook_size: int,
        image_size: int,
        tokens_per_image: int,
        image_preprocessing: Mapping[str, Any],
        vq_model: ModelIdentity,
        text_tokenizer: Optional[ModelIdentity] = None,
    ) -> "TokenizerProfile":
        """Lay out the vocabulary; ``text_special_ids`` holds the text tokenizer's bos/eos/pad (or None)."""
        class_offset = text_vocab_size
        image_offset = class_offset + num_classes
        next_id = image_offset + image_codebook_size
        ids = {}
        for name in ("bos", "eos", "pad", "boi", "eoi", "null_condition"):
            existing = text_special_ids.get(name)
            if existing is None:
                existing, next_id = next_id, next_id + 1
            ids[name] = existing
        return cls(
            vocab_size=next_id,
            text_vocab_size=text_vocab_size,
            class_token_offset=class_offset,
            num_classes=num_classes,
            image_token_offset=image_offset,
            image_codebook_size=image_codebook_size,
            special=SpecialTokens(**ids),
            image_size=image_size,
            tokens_per_image=tokens_per_image,
            image_preprocessing=dict(image_preprocessing),
            vq_model=vq_model,
            text_tokenizer=text_tokenizer,
        )

    @property
    def image_token_range(self) -> Tuple[int, int]:
        """(lo, hi): a token t is an image token iff lo <= t < hi (labels in this range are image targets).

        With ``image_token_ids`` the ids must form one contiguous block (any order inside it)."""
        ids = self.image_token_ids
        if ids is not None and ids and max(ids) - min(ids) + 1 != len(ids):
            raise ValueError(f"the {len(ids)} image token ids span [{min(ids)}, {max(ids)}]: not a contiguous "
                             "block, so no (lo, hi) range describes them")
        return self.image_token_offset, self.image_token_offset + self.image_codebook_size

    def codes_to_tokens(self, codes) -> np.ndarray:
        """VQ codes -> token ids (int64, same shape)."""
        codes = np.asarray(codes, dtype=np.int64)
        if self.image_token_ids is None:
            return codes + self.image_token_offset
        return np.asarray(self.image_token_ids, dtype=np.int64)[codes]

    def tokens_to_codes(self, tokens) -> np.ndarray:
        """Image token ids -> VQ codes (int64, same shape); raises on a token that is not an image token."""
        tokens = np.asarray(tokens, dtype=np.int64)
        if self.image_token_ids is None:
            codes = tokens - self.image_token_offset
            bad = (codes < 0) | (codes >= self.image_codebook_size)
        else:
            table = np.full(self.vocab_size, -1, dtype=np.int64)
            table[np.asarray(self.image_token_ids, dtype=np.int64)] = np.arange(self.image_codebook_size)
            inside = (tokens >= 0) & (tokens < self.vocab_size)
            codes = np.where(inside, table[np.clip(tokens, 0, self.vocab_size - 1)], -1)
            bad = codes < 0
        if bad.any():
            raise ValueError(f"token ids {np.unique(tokens[bad])[:8].tolist()} are not image tokens")
        return codes

    def class_token(self, class_id: int) -> int:
        if not 0 <= class_id < self.num_classes:
            raise ValueError(f"class id {class_id} outside [0, {self.num_classes})")
        return self.class_token_offset + class_id

    def condition_budget(self, max_seq_length: int) -> int:
        """Condition tokens that fit beside the image; raises when not even the image fits."""
        budget = max_seq_length - self.tokens_per_image - NUM_FRAME_TOKENS
        if budget < 0:
            raise ValueError(
                f"--max-seq-length {max_seq_length} cannot hold {self.tokens_per_image} image tokens "
                f"+ {NUM_FRAME_TOKENS} special tokens; use at least {self.tokens_per_image + NUM_FRAME_TOKENS} "
                "or a smaller --image-size")
        return budget

    def build_sequence(self, condition: Sequence[int], image_codes: np.ndarray,
                       max_seq_length: int) -> Tuple[np.ndarray, int]:
        """``[BOS] condition [BOI] x_1..x_n [EOI] [EOS]`` with x = codes + offset.

        The condition is cut from its end to fit ``max_seq_length`` (the image tokens
        are the training target and are never cut). Returns (tokens int64, number of
        condition tokens dropped).
        """
        codes = np.asarray(image_codes, dtype=np.int64).reshape(-1)
        if codes.size != self.tokens_per_image:
            raise ValueError(f"expected {self.tokens_per_image} image codes, got {codes.size}")
        if codes.size and (codes.min() < 0 or codes.max() >= self.image_codebook_size):
            raise ValueError(f"image codes outside the codebook [0, {self.image_codebook_size})")
        keep = min(len(condition), self.condition_budget(max_seq_length))
        s = self.special
        tokens = np.concatenate([
            [s.bos], np.asarray(condition[:keep], dtype=np.int64), [s.boi],
            self.codes_to_tokens(codes), [s.eoi, s.eos],
        ]).astype(np.int64)
        return tokens, len(condition) - keep

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        if data["image_token_ids"] is None:  # profiles without a table read and write as before
            del data["image_token_ids"]
        else:
            data["image_token_ids"] = list(data["image_token_ids"])
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TokenizerProfile":
        data = dict(data)
        data["special"] = SpecialTokens(**data["special"])
        data["vq_model"] = ModelIdentity(**data["vq_model"])
        if data.get("text_tokenizer") is not None:
            data["text_tokenizer"] = ModelIdentity(**data["text_tokenizer"])
        if data.get("image_token_ids") is not None:
            data["image_token_ids"] = tuple(data["image_token_ids"])
        return cls(**data)
