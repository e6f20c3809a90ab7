"""A checkpoint of the training loop as a step-by-step decoder: Megatron-Core GPTModel, any TP, KV cache.

The model is described by the Megatron-LM arguments saved in the checkpoint
(``training/checkpoints.py::saved_args``) and built through the training loop's own
mapping (``megatron_loop.transformer_config`` and ``build_gpt``) with inference settings
(``INFERENCE_ARGS``: no dropout, no sequence parallel, no recompute, no FP8, one
pipeline stage) at the TP size asked for (the dist checkpoint reshards). The vocabulary
rows are the checkpoint's own (their padding depends on the TP size it trained with).
Only the GPT's weights are read: the ARRA projector is a training-time module and is
not built.

The KV cache is Megatron-Core's ``StaticInferenceContext``: the attention layers
write each step's keys and values into its buffers and attend over them.
Pipeline parallelism is not supported here (one stage holds the whole model).
"""

from __future__ import annotations

import argparse
import logging
from typing import Optional, Tuple

import torch
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.models.gpt import GPTModel

from arra_megatron.models.specs import Backend, default_backend
from arra_megatron.training import checkpoints

logger = logging.getLogger(__name__)

#: Megatron-LM arguments that only concern training, reset so the rebuilt model is a plain
#: one-stage inference model. The tensor-parallel size is the caller's; the weight-shard counts
#: ``validate_args`` derived from the training TP size are derived again from it.
INFERENCE_ARGS = dict(
    tensor_parallel_num_weight_shards=None, gtp_weight_remat_size=1, expert_model_parallel_size=1,
    expert_tensor_parallel_num_weight_shards=None, expert_gtp_weight_remat_size=1,
    pipeline_model_parallel_size=1, virtual_pipeline_model_parallel_size=None,
    num_layers_per_virtual_pipeline_stage=None, num_virtual_stages_per_pipeline_rank=None,
    pipeline_model_parallel_layout=None, decoder_first_pipeline_num_layers=None,
    decoder_last_pipeline_num_layers=None, account_for_embedding_in_pipeline_split=False,
    account_for_loss_in_pipeline_split=False, context_parallel_size=1, sequence_parallel=False,
    hidden_dropout=0.0, attention_dropout=0.0, recompute_granularity=None, recompute_method=None,
    recompute_num_layers=None, recompute_modules=None, fp8=None, fp8_param_gather=False, fp4=None,
    fp4_param_gather=False, tp_comm_overlap=False, gradient_accumulation_fusion=False,
)


def inference_args(saved: argparse.Namespace, tensor_model_parallel_size: int) -> argparse.Namespace:
    """The checkpoint's Megatron-LM arguments with ``INFERENCE_ARGS`` and the TP size asked for; in CPU
    mode without the fusions a CPU process cannot run (a checkpoint trained on GPUs enables them)."""
    from arra_megatron.runtime import cpu_mode
    from arra_megatron.training.megatron_loop import CPU_MODE_DEFAULTS

    cpu = {k: v for k, v in CPU_MODE_DEFAULTS.items() if hasattr(saved, k)} if cpu_mode.is_enabled() else {}
    return argparse.Namespace(**{**vars(saved), **cpu, **INFERENCE_ARGS,
                                 "tensor_model_parallel_size": tensor_model_parallel_size,
                                 "expert_tensor_parallel_size": tensor_model_parallel_size})


def build_inference_model(path: str, tensor_model_parallel_size: int, backend: Optional[Backend] = None
                          ) -> Tuple[GPTModel, argparse.Namespace]:
    """This TP rank's GPTModel with the weights of checkpoint ``path`` (an iteration directory;
    collective over the TP group).

    Needs torch.distributed and Megatron's parallel state (``initialize_model_parallel``).
    Returns (model in eval mode, the checkpoint's saved Megatron-LM arguments).
    """
    from arra_megatron.training.megatron_loop import build_gpt, transformer_config

    saved = checkpoints.saved_args(path)
    args = inference_args(saved, tensor_model_parallel_size)
    vocab_rows = checkpoints.padded_vocab_rows(path)
    if vocab_rows % tensor_model_parallel_size:
        raise ValueError(f"--tensor-model-parallel-size {tensor_model_parallel_size} does not divide the "
                         f"checkpoint's vocabulary of {vocab_rows} rows")
    if backend is None:
        # Transformer Engine's attention ignores an explicit padding mask under its causal mask
        # type; the local and CPU core attentions honour it (left-padded prompts need it).
        backend = "local" if default_backend() == "te" else default_backend()
    config = transformer_config(args)
    if backend == "local":
        config.masked_softmax_fusion = False  # the fused causal kernel ignores the padding mask
    real_vocab_size = min(getattr(saved, "vocab_size", None) or vocab_rows, vocab_rows)
    model = build_gpt(args, config, vocab_rows, real_vocab_size, backend=backend)
    checkpoints.load_model([model], path, projector=False)
    model.eval()
    logger.info("loaded %s at TP %d (%s core attention)", path, tensor_model_parallel_size, backend)
    return model, saved


def padding_mask(pad_lengths: torch.Tensor, query_positions: torch.Tensor, key_length: int) -> torch.Tensor:
    """Megatron's boolean attention mask (True: not attended), ``[b, 1, q, k]``: causal, and the
    left padding of each row hidden from every query but itself (a PAD query must see one key,
    or its softmax is empty and NaN reaches later positions through the values)."""
    keys = torch.arange(key_length)
    queries = query_positions[:, None]
    hidden = (keys[None, :] > queries)[None] | (keys[None, None, :] < pad_lengths[:, None, None])
    hidden &= ~(keys[None, None, :] == queries[None])
    return hidden[:, None]


class MegatronDecoder:
    """``sampling.Decoder`` over a Megatron-Core GPTModel (this TP rank's shard).

    With ``use_cache`` the prompt runs once and each step feeds one token through the
    static KV cache; without it every step recomputes the whole sequence (the reference).
    """

    def __init__(self, model: GPTModel, use_cache: bool = True):
        self.model = model
        self.use_cache = use_cache
        self.device = next(model.parameters()).device
        self.learned_positions = model.position_embedding_type == "learned_absolute"

    def _forward(self, tokens, positions, mask, context=None) -> torch.Tensor:
        logits = self.model(tokens.to(self.device), positions.to(self.device),
                            None if mask is None else mask.to(self.device),
                            inference_context=context, runtime_gather_output=True)
        return logits[:, -1].float().cpu()

    def _positions(self, first: int, count: int) -> torch.Tensor:
        # Learned absolute positions count from each row's first real token, as in training;
        # RoPE is relative, so Megatron's sequence-index rotary needs no correction.
        positions = torch.arange(first, first + count)[None].expand(len(self.pads), count)
        return (positions - self.pads[:, None]).clamp(min=0) if self.learned_positions else positions.contiguous()

    def _mask(self, first: int, count: int, key_length: int) -> Optional[torch.Tensor]:
        if not bool(self.pads.any()):
            return None  # no padding: plain causal attention
        return padding_mask(self.pads, torch.arange(first, first + count), key_length)

    @torch.no_grad()
    def start(self, tokens: torch.Tensor, pad_lengths: torch.Tensor, max_length: int) -> torch.Tensor:
        self.pads = pad_lengths.long()
        self.tokens = tokens.long()
        length = tokens.size(1)
        self.context = StaticInferenceContext(tokens.size(0), max_length) if self.use_cache else None
        logits = self._forward(tokens, self._positions(0, length), self._mask(0, length, length), self.context)
        if self.context is not None:
            self.context.sequence_len_offset += length
            self.context.enable_decode_mode()
        return logits

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tokens = torch.cat([self.tokens, tokens.long()[:, None]], dim=1)
        length = self.tokens.size(1)
        if self.context is None:
            return self._forward(self.tokens, self._positions(0, length), self._mask(0, length, length))
        logits = self._forward(self.tokens[:, -1:], self._positions(length - 1, 1), self._mask(length - 1, 1, length),
                               self.context)
        self.context.sequence_len_offset += 1
        return logits

