"""An exported Hugging Face directory (``tools/convert_checkpoint.py export``) as a step-by-step decoder.

transformers' own KV cache (``past_key_values``) and padding handling: the attention
mask hides each row's left padding, and position ids count from its first real
token, as in training.
"""

from __future__ import annotations

from typing import Optional

import torch


def load_hf_model(path: str, device: str | torch.device = "cpu", dtype: Optional[torch.dtype] = None):
    """``AutoModelForCausalLM`` from a local directory (never downloads), in eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype or "auto")
    return model.to(device).eval()


class HFDecoder:
    """``sampling.Decoder`` over a transformers causal LM."""

    def __init__(self, model, use_cache: bool = True):
        self.model = model
        self.use_cache = use_cache
        self.device = next(model.parameters()).device

    def _forward(self, tokens: torch.Tensor, past=None) -> torch.Tensor:
        positions = (self.mask.cumsum(dim=1) - 1).clamp(min=0)[:, -tokens.size(1):]
        out = self.model(input_ids=tokens.to(self.device), attention_mask=self.mask.to(self.device),
                         position_ids=positions.to(self.device), past_key_values=past, use_cache=self.use_cache)
        self.past = out.past_key_values if self.use_cache else None
        return out.logits[:, -1].float().cpu()

    @torch.no_grad()
    def start(self, tokens: torch.Tensor, pad_lengths: torch.Tensor, max_length: int) -> torch.Tensor:
        self.tokens = tokens.long()
        self.mask = (torch.arange(tokens.size(1))[None] >= pad_lengths[:, None]).long()
        return self._forward(self.tokens)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tokens = torch.cat([self.tokens, tokens.long()[:, None]], dim=1)
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        if self.use_cache:
            return self._forward(self.tokens[:, -1:], self.past)
        return self._forward(self.tokens)
