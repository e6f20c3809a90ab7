"""Shared helpers of the conversion tests: tiny random transformers Llamas and their reference outputs."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file

from arra_megatron import tiny
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


def hf_reference(hf_dir: str, batch: dict):
    """transformers' logits and the masked mean cross entropy (Megatron's padded vocabulary rows
    are masked out of its softmax, so they do not enter the comparison)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(batch["tokens"]).logits.double()
    token_loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="none")
    mask = batch["loss_mask"].flatten().double()
    return logits, float((token_loss * mask).sum() / mask.sum())


def hf_weights(path: str) -> dict:
    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, name)))
    return out


CHAMELEON_CODEBOOK = IMAGE_RANGE[1] - IMAGE_RANGE[0]  # 56 image tokens at ids 64..119


def chameleon_vocabulary_map(vocab_size: int) -> dict:
    """A synthetic Chameleon vocabulary: the tiny layout's specials (PAD 0, BOS 1, EOS 2, BOI 3,
    EOI 4) under Chameleon's names, ``<image>`` 5, and the image tokens at IMAGE_RANGE named
    ``IMGIMG<code, digits as letters A-J>Z`` in *sorted name* order, so the code -> id table
    is a permutation of the block (as a BPE vocabulary sorted by name would have it)."""
    names = sorted("IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(c)) + "Z" for c in range(CHAMELEON_CODEBOOK))
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<racm3:break>": 3, "<eoss>": 4, "<image>": 5}
    vocab.update({name: IMAGE_RANGE[0] + i for i, name in enumerate(names)})
    taken = set(vocab.values())
    vocab.update({f"t{i}": i for i in range(vocab_size) if i not in taken})
    return vocab


def make_chameleon(path, vocab_size: int = 128, seed: int = 0, **overrides) -> str:
    """A random 4-layer ChameleonForConditionalGeneration (GQA, per-head q/k LayerNorm, a tiny
    VQ-VAE of CHAMELEON_CODEBOOK codes, 16 px -> 4 x 4 codes), saved with save_pretrained."""
    vq_config = dict(embed_dim=8, num_embeddings=CHAMELEON_CODEBOOK, latent_channels=8, resolution=16,
                     in_channels=3, base_channels=32, channel_multiplier=[1, 1, 1], num_res_blocks=1,
                     attn_resolutions=None)
    config = transformers.ChameleonConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, initializer_range=0.1,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False,
        vq_config=vq_config, vocabulary_map=chameleon_vocabulary_map(vocab_size), bos_token_id=1,
        eos_token_id=2, pad_token_id=0, **overrides)
    torch.manual_seed(seed)
    model = transformers.ChameleonForConditionalGeneration(config).float()
    with torch.no_grad():  # norm weights start at one, biases at zero: make them matter
        for name, param in model.named_parameters():
            if "norm" in name and "vqmodel" not in name:
                param.add_(0.2 * torch.randn_like(param))
    model.generation_config = transformers.GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model.save_pretrained(str(path))
    save_tokenizer(path, vocab_size)
    return str(path)


def chameleon_reference(hf_dir: str, batch: dict):
    """The raw ``lm_head`` logits of transformers' Chameleon and the masked mean cross entropy.

    Why not ``model(tokens).logits``: ChameleonForConditionalGeneration.forward overwrites the
    logits of every image token with the dtype's minimum (it generates text only), while ARRA
    trains exactly those targets; the language model itself is ``lm_head(model.model(...))``."""
    model = transformers.ChameleonForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        hidden = model.model(input_ids=batch["tokens"]).last_hidden_state
        logits = model.lm_head(hidden).double()
        masked = model(batch["tokens"]).logits
    token_loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="none")
    mask = batch["loss_mask"].flatten().double()
    return logits, float((token_loss * mask).sum() / mask.sum()), masked


def assert_matches_transformers(tag: str, results: list, hf_logits: torch.Tensor, hf_loss: float,
                                vocab: int) -> None:
    """The workers' Megatron logits (first ``vocab`` columns; padded ones must be masked) and lm loss
    against transformers': logits within 1e-5 of the largest logit, loss within 1e-5 relative
    (fp32), the same loss on every rank. Prints the measured differences."""
    logits = [r["logits"] for r in results if "logits" in r]
    assert len(logits) == 1
    mega_logits = logits[0].double()
    assert torch.all(mega_logits[..., vocab:] == torch.finfo(torch.float32).min)  # models/gpt.py mask_padded_logits
    diff = (mega_logits[..., :vocab] - hf_logits).abs().max().item()
    scale = hf_logits.abs().max().item()
    loss = results[-1]["metrics"]["lm loss"]
    print(f"\n[{tag}] max |logit diff| {diff:.3e} (max |logit| {scale:.3f}); "
          f"loss megatron {loss:.8f} transformers {hf_loss:.8f} rel {abs(loss - hf_loss) / hf_loss:.2e}")
    assert diff <= 1e-5 * scale
    assert all(r["metrics"]["lm loss"] == loss for r in results)
    assert abs(loss - hf_loss) <= 1e-5 * abs(hf_loss)


def assert_same_checkpoint(original_dir: str, exported_dir: str, config_keys) -> dict:
    """Every tensor of ``original_dir`` exported bit-identical (same names, dtypes, values) and the
    ``config_keys`` of both config.json files equal; returns the exported tensors."""
    original, exported = hf_weights(original_dir), hf_weights(exported_dir)
    assert sorted(original) == sorted(exported)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name
    a = transformers.AutoConfig.from_pretrained(original_dir).to_dict()
    b = transformers.AutoConfig.from_pretrained(exported_dir).to_dict()
    for key in config_keys:
        assert a[key] == b[key], key
    return exported
