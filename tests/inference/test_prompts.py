"""Prompts are the head of the documents the dataset builder writes; the null prompt is what
condition dropout trains; guidance combines the logits as LlamaGen does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from arra_megatron.data.dataset import drop_condition
from arra_megatron.inference.conditions import Condition, condition_tokens
from arra_megatron.inference.sampling import (SamplingConfig, image_document, left_pad, null_prompt, prompt_tokens,
                                              sample_image_tokens)
from arra_megatron.tokenization.profile import ModelIdentity, TokenizerProfile

VQ = ModelIdentity("JanusVQVAE", "/vq", "0" * 64)


def profile(text_vocab_size: int = 0, num_classes: int = 0) -> TokenizerProfile:
    return TokenizerProfile.create(text_vocab_size=text_vocab_size, text_special_ids={"bos": 1, "eos": 2} if
                                   text_vocab_size else {}, num_classes=num_classes, image_codebook_size=16,
                                   image_size=16, tokens_per_image=16, image_preprocessing={}, vq_model=VQ)


class _Words:
    def encode(self, text):
        return [10 + len(w) for w in text.split()]


@pytest.mark.parametrize("condition, max_seq_length", [
    (Condition(class_id=3), 24),
    (Condition(prompt="a b cc ddd"), 40),
    (Condition(prompt="a b cc ddd eeee"), 22),  # cut to the 2 condition tokens that fit, as the builder cuts
])
def test_prompt_is_the_head_of_the_training_document(condition, max_seq_length):
    p = profile(text_vocab_size=50, num_classes=5)
    (tokens,) = condition_tokens([condition], p, _Words())
    codes = np.arange(16) % 16
    document, _ = p.build_sequence(tokens, codes, max_seq_length)
    prompt = prompt_tokens(p, tokens, max_seq_length)
    assert document[:len(prompt)].tolist() == prompt
    assert image_document(p, prompt, torch.tensor(codes)) == document.tolist()
    # The unconditional prompt is the head of the same document after condition dropout.
    dropped = drop_condition(document, p)
    assert dropped[:3].tolist() == null_prompt(p) == [p.special.bos, p.special.null_condition, p.special.boi]


def test_class_ids_map_to_class_tokens_and_bad_requests_name_the_flag():
    c2i = profile(num_classes=10)
    assert condition_tokens([Condition(class_id=0), Condition(class_id=9)], c2i) == [
        [c2i.class_token_offset], [c2i.class_token_offset + 9]]
    with pytest.raises(ValueError, match="outside"):
        condition_tokens([Condition(class_id=10)], c2i)
    with pytest.raises(ValueError, match="--class-ids"):
        condition_tokens([Condition(prompt="a")], c2i)
    with pytest.raises(ValueError, match="--prompts"):
        condition_tokens([Condition(class_id=0)], profile(text_vocab_size=50))


def test_left_padding():
    tokens, pads = left_pad([[1, 5, 3], [1, 3]], pad_id=0)
    assert tokens.tolist() == [[1, 5, 3], [0, 1, 3]] and pads.tolist() == [0, 1]


class _FixedLogits:
    """A decoder whose next-token logits are fixed per row and step; records what it was fed."""

    def __init__(self, logits):  # [steps, rows, vocab]
        self.logits, self.fed, self.step_index = logits, [], 0

    def start(self, tokens, pad_lengths, max_length):
        self.fed.append(tokens)
        return self.logits[0]

    def step(self, tokens):
        self.fed.append(tokens)
        self.step_index += 1
        return self.logits[self.step_index]


def test_guidance_combines_cond_and_uncond_logits():
    p = profile(num_classes=4)
    lo, hi = p.image_token_range
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(p.tokens_per_image, 4, p.vocab_size, generator=gen) * 3  # rows: 2 cond, then 2 uncond
    logits[:, :, :lo] = logits[:, :, hi:] = 100.0  # outside the image span: never drawn
    scale = 4.0
    decoder = _FixedLogits(logits)
    prompts = [prompt_tokens(p, [p.class_token(c)], 24) for c in (1, 2)]
    codes = sample_image_tokens(decoder, p, prompts, [0, 1], SamplingConfig(cfg_scale=scale, top_k=1))
    cond, uncond = logits[:, :2, lo:hi], logits[:, 2:, lo:hi]
    expected = (uncond + scale * (cond - uncond)).argmax(-1).T  # top-k 1: the guided argmax
    assert torch.equal(codes, expected)
    assert not torch.equal(codes, cond.argmax(-1).T)  # guidance changed the choice somewhere
    assert decoder.fed[0][2:].tolist() == [null_prompt(p)] * 2  # unconditional rows batched after the conditional
    for step, fed in enumerate(decoder.fed[1:]):  # both halves continue with the drawn (guided) token
        assert fed.tolist() == (codes[:, step] + lo).tolist() * 2
