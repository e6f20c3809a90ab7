"""Shared helpers of the conversion tests: tiny random transformers Llamas and their reference outputs."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file

from arra_megatron.testing import tiny
from tests.conversion.llama_worker import SEQ

IMAGE_RANGE = (64, 120)  # below every test vocabulary


def make_llama(path, vocab_size: int, tied: bool, seed: int = 0) -> str:
    """A random 4-layer Llama with grouped-query attention, saved with save_pretrained."""
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, initializer_range=0.1,
        rope_parameters={"rope_type": "default", "rope_theta": 50000.0}, tie_word_embeddings=tied,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).float()
    with torch.no_grad():  # norm weights start at one and biases are absent: make the norms matter
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.2 * torch.randn_like(param))
    model.generation_config = transformers.GenerationConfig(bos_token_id=5, eos_token_id=6, pad_token_id=0)
    model.save_pretrained(str(path))
    save_tokenizer(path, vocab_size)
    return str(path)


def save_tokenizer(path, vocab_size: int) -> None:
    """A word-level tokenizer (t0 .. tN) saved the transformers way."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0").save_pretrained(str(path))


def samples():
    s = tiny.synthetic_samples(4, SEQ, seed=3, image_token_range=IMAGE_RANGE)
    return {k: s[k] for k in ("tokens", "labels", "loss_mask", "position_ids")}


def hf_reference(hf_dir: str, batch: dict, padded_vocab: int):
    """transformers' logits and the masked mean cross entropy; with a padded Megatron vocabulary
    the padded logits are zero (zero embedding rows) and enter the softmax as such."""
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(batch["tokens"]).logits.double()
    padded = torch.cat([logits, logits.new_zeros(*logits.shape[:2], padded_vocab - logits.size(-1))], dim=-1)
    token_loss = F.cross_entropy(padded.flatten(0, 1), batch["labels"].flatten(), reduction="none")
    mask = batch["loss_mask"].flatten().double()
    return logits, float((token_loss * mask).sum() / mask.sum())


def hf_weights(path: str) -> dict:
    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, name)))
    return out
