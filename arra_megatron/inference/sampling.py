"""Image-token sampling: prompts in the training layout, classifier-free guidance, top-k / top-p.

A prompt is the head of a training document (``TokenizerProfile.build_sequence``):

    [BOS] condition [BOI]          then n image tokens are sampled, then [EOI] [EOS]

The unconditional prompt for guidance is the one condition dropout trains
(``data/dataset.py::drop_condition``): ``[BOS] [NULL] [BOI]``. Conditional and
unconditional rows run in one batch, as LlamaGen does, and each image position's
logits are combined as ``uncond + s * (cond - uncond)``.

Prompts of different lengths are left-padded with PAD, which the decoder masks out
of attention, so every row reaches its first image token at the same step and the
rows of one image (conditional and unconditional) stay aligned.

Sampling never leaves the image vocabulary: only the logits of
``profile.image_token_range`` are kept (the same as setting every other logit to
-inf), and the span ends with EOI after exactly ``tokens_per_image`` tokens.
Each sample draws from its own ``torch.Generator`` seeded with its seed, on the
CPU, so an image depends on its (condition, seed) and not on the batch it ran in
or on the device.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, List, Optional, Protocol, Sequence

import numpy as np
import torch
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from arra_megatron.tokenization.profile import TokenizerProfile


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to draw image tokens (tools/generate.py flags of the same names)."""

    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    cfg_scale: float = 1.0  # 1.0: no guidance (no unconditional rows)
    use_cache: bool = True

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"--temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"--top-k must be >= 0 (0: off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.cfg_scale < 0:
            raise ValueError(f"--cfg-scale must be >= 0, got {self.cfg_scale}")

    @property
    def guided(self) -> bool:
        return self.cfg_scale != 1.0


class Decoder(Protocol):
    """A causal LM run step by step over a left-padded batch (Megatron-Core or transformers)."""

    def start(self, tokens: torch.Tensor, pad_lengths: torch.Tensor, max_length: int) -> torch.Tensor:
        """Run the prompts ``[b, P]`` (row i starts with ``pad_lengths[i]`` PADs); logits ``[b, V]``
        (float32, CPU) for the next token after the last prompt position."""

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per row ``[b]``; logits ``[b, V]`` for the following position."""


def prompt_tokens(profile: TokenizerProfile, condition: Sequence[int], max_seq_length: int) -> List[int]:
    """``[BOS] condition [BOI]`` with the condition cut as the dataset builder cuts it."""
    keep = profile.condition_budget(max_seq_length)
    s = profile.special
    return [s.bos, *[int(t) for t in condition[:keep]], s.boi]


def null_prompt(profile: TokenizerProfile) -> List[int]:
    """The unconditional prompt that condition dropout trains (``drop_condition``)."""
    s = profile.special
    return [s.bos, s.null_condition, s.boi]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[b, P]`` tokens, PAD on the left, and each row's number of PADs."""
    length = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    pads = torch.tensor([length - len(p) for p in prompts], dtype=torch.long)
    for row, prompt in enumerate(prompts):
        tokens[row, length - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
    return tokens, pads


def _warpers(config: SamplingConfig) -> list:
    # LlamaGen's order: (guided) logits / temperature, then top-k, then top-p.
    warpers = [TemperatureLogitsWarper(config.temperature)] if config.temperature != 1.0 else []
    if config.top_k:
        warpers.append(TopKLogitsWarper(config.top_k))
    if config.top_p < 1.0:
        warpers.append(TopPLogitsWarper(config.top_p))
    return warpers


@torch.no_grad()
def sample_image_tokens(
    decoder: Decoder,
    profile: TokenizerProfile,
    prompts: Sequence[Sequence[int]],
    seeds: Sequence[int],
    config: SamplingConfig,
    progress: Optional[Callable[[int], None]] = None,
    guidance: Optional[bool] = None,
) -> torch.Tensor:
    """Sample ``tokens_per_image`` VQ codes for each prompt. Returns ``[b, n]`` codes (not token ids).

    ``progress(k)`` is called after each of the n steps with k = 1. ``guidance`` (default:
    ``config.guided``) True runs the unconditional rows even at ``cfg_scale`` 1, where the
    combination must give the unguided result (a check that batching them changes nothing).
    """
    guided = config.guided if guidance is None else guidance
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    b, n = len(prompts), profile.tokens_per_image
    # Column j of the image logits is VQ code j (the profile's table, e.g. Chameleon's, or an offset).
    image_ids = torch.from_numpy(profile.codes_to_tokens(np.arange(profile.image_codebook_size)))
    rows = list(prompts) + ([null_prompt(profile)] * b if guided else [])
    tokens, pads = left_pad(rows, profile.special.pad)
    generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
    warpers = _warpers(config)
    codes = torch.empty(b, n, dtype=torch.long)
    logits = decoder.start(tokens, pads, tokens.size(1) + n)
    for j in range(n):
        scores = logits[:, image_ids].float()
        if guided:
            cond, uncond = scores[:b], scores[b:]
            scores = uncond + config.cfg_scale * (cond - uncond)
        for warp in warpers:
            scores = warp(codes[:, :j], scores)
        probs = torch.softmax(scores, dim=-1)
        for row, generator in enumerate(generators):
            codes[row, j] = torch.multinomial(probs[row], 1, generator=generator)[0]
        if progress is not None:
            progress(1)
        if j + 1 < n:
            step = image_ids[codes[:, j]]
            logits = decoder.step(torch.cat([step, step]) if guided else step)
    return codes


def image_document(profile: TokenizerProfile, prompt: Sequence[int], codes: torch.Tensor) -> List[int]:
    """The full sequence a sample stands for: ``prompt x_1..x_n [EOI] [EOS]`` (the training layout)."""
    return [*prompt, *profile.codes_to_tokens(codes.long().numpy()).tolist(), profile.special.eoi,
            profile.special.eos]
