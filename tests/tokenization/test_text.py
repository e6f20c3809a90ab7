import pytest

from arra_megatron.tokenization.text import TextTokenizer

CAPTION = "a photo of the red cat, over a tree"


def test_sentencepiece(sp_model):
    tok = TextTokenizer(sp_model)
    assert tok.vocab_size == 120
    assert tok.special_ids == {"bos": 1, "eos": 2, "pad": None}
    ids = tok.encode(CAPTION)
    assert 1 not in ids and 2 not in ids  # no special tokens added
    assert tok.decode(ids) == CAPTION
    assert tok.identity.kind == "sentencepiece" and len(tok.identity.sha256) == 64


def test_huggingface(hf_tokenizer_dir):
    tok = TextTokenizer(hf_tokenizer_dir)
    assert tok.special_ids == {"bos": 1, "eos": 2, "pad": 3}
    ids = tok.encode(CAPTION)
    assert 1 not in ids and tok.decode(ids) == CAPTION
    assert tok.identity.kind.startswith("huggingface:")


def test_missing_path_names_the_flag(tmp_path):
    with pytest.raises(FileNotFoundError, match="--text-tokenizer"):
        TextTokenizer(tmp_path / "nope.model")
