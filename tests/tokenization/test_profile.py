import json

import numpy as np
import pytest

from arra_megatron.tokenization.profile import ModelIdentity, TokenizerProfile, content_sha256

VQ = ModelIdentity("JanusVQVAE", "/vq", "0" * 64)


def _profile(num_classes=0, text_vocab=120, specials=None):
    return TokenizerProfile.create(
        text_vocab_size=text_vocab, text_special_ids=specials if specials is not None else {"bos": 1, "eos": 2},
        num_classes=num_classes, image_codebook_size=64, image_size=32, tokens_per_image=4,
        image_preprocessing={"resample": "bicubic"}, vq_model=VQ)


def test_layout_reuses_text_specials_and_appends_new_ones():
    p = _profile()
    assert (p.special.bos, p.special.eos) == (1, 2)
    assert p.image_token_range == (120, 184)
    assert (p.special.pad, p.special.boi, p.special.eoi, p.special.null_condition) == (184, 185, 186, 187)
    assert p.vocab_size == 188


def test_class_only_layout():
    p = _profile(num_classes=10, text_vocab=0, specials={})
    assert p.class_token(0) == 0 and p.class_token(9) == 9
    assert p.image_token_range == (10, 74)
    assert (p.special.bos, p.special.eos, p.special.pad, p.special.boi, p.special.eoi,
            p.special.null_condition) == (74, 75, 76, 77, 78, 79)
    with pytest.raises(ValueError):
        p.class_token(10)


def test_build_sequence_layout():
    p = _profile()
    tokens, dropped = p.build_sequence([7, 8, 9], np.array([0, 5, 63, 2]), max_seq_length=100)
    assert tokens.tolist() == [1, 7, 8, 9, 185, 120, 125, 183, 122, 186, 2]
    assert dropped == 0


def test_truncation_cuts_text_never_image():
    p = _profile()
    codes = np.array([3, 1, 4, 1])
    tokens, dropped = p.build_sequence(list(range(10, 20)), codes, max_seq_length=4 + 4 + 3)
    assert len(tokens) == 11 and dropped == 7
    assert tokens.tolist() == [1, 10, 11, 12, 185, 123, 121, 124, 121, 186, 2]
    tokens, dropped = p.build_sequence(list(range(10, 20)), codes, max_seq_length=8)
    assert tokens.tolist() == [1, 185, 123, 121, 124, 121, 186, 2] and dropped == 10


def test_errors_name_the_flag():
    p = _profile()
    with pytest.raises(ValueError, match="--max-seq-length 7"):
        p.build_sequence([1], np.zeros(4), max_seq_length=7)
    with pytest.raises(ValueError, match="codebook"):
        p.build_sequence([], np.array([0, 1, 2, 64]), max_seq_length=100)


def test_json_round_trip():
    p = _profile()
    assert TokenizerProfile.from_dict(json.loads(json.dumps(p.to_dict()))) == p


def test_content_sha256_follows_content_not_location(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
        (tmp_path / name / "w.bin").write_bytes(b"\x00\x01")
    assert content_sha256(tmp_path / "a") == content_sha256(tmp_path / "b")
    (tmp_path / "b" / "w.bin").write_bytes(b"\x00\x02")
    assert content_sha256(tmp_path / "a") != content_sha256(tmp_path / "b")


def _table_profile(table):
    import dataclasses

    base = _profile()
    return dataclasses.replace(base, vocab_size=300, image_codebook_size=len(table), image_token_offset=min(table),
                               image_token_ids=tuple(table), tokens_per_image=4)


def test_explicit_image_token_table():
    """A vocabulary that already holds its image tokens (Chameleon): code c -> table[c], any order."""
    table = [200 + (7 * c) % 64 for c in range(64)]  # a permutation of the block [200, 264)
    p = _table_profile(table)
    assert p.image_token_range == (200, 264)
    codes = np.array([0, 1, 63, 9])
    assert p.codes_to_tokens(codes).tolist() == [table[c] for c in codes]
    assert p.tokens_to_codes(p.codes_to_tokens(codes)).tolist() == codes.tolist()
    tokens, _ = p.build_sequence([7], codes, max_seq_length=100)
    assert tokens[3:7].tolist() == [table[c] for c in codes]
    with pytest.raises(ValueError, match=r"\[5\] are not image tokens"):
        p.tokens_to_codes([5, table[0]])
    again = TokenizerProfile.from_dict(json.loads(json.dumps(p.to_dict())))
    assert again == p
    assert "image_token_ids" not in _profile().to_dict()  # profiles without a table are unchanged
    assert _profile().tokens_to_codes([120, 183]).tolist() == [0, 63]


def test_explicit_table_that_is_not_contiguous():
    table = list(range(200, 263)) + [280]
    p = _table_profile(table)
    with pytest.raises(ValueError, match="not a contiguous block"):
        p.image_token_range
    with pytest.raises(ValueError, match="distinct ids"):
        _table_profile([200] * 64)
