"""A trainer checkpoint as a step-by-step decoder: Megatron-Core GPTModel, any TP, KV cache.

The model is rebuilt from the flags the trainer saved in the checkpoint (its ``args``
entry) with inference settings (no dropout, no sequence parallel, no recompute), at
the TP size asked for (the dist checkpoint reshards), and only the GPT's weights are
read: the ARRA projector is a training-time module and is not built.

The KV cache is Megatron-Core's ``StaticInferenceContext``: the attention layers
write each step's keys and values into its buffers and attend over them.
Pipeline parallelism is not supported here (one stage holds the whole model).
"""

from __future__ import annotations

import argparse
import logging
from typing import Optional, Tuple

import torch
from megatron.core import dist_checkpointing
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.models.gpt import GPTModel

from arra_megatron.models.gpt import build_gpt_chunks
from arra_megatron.models.specs import Backend, default_backend
from arra_megatron.training.checkpointing import load_model_weights

logger = logging.getLogger(__name__)

# Flags that only concern training: reset so the rebuilt model is a plain inference model.
_INFERENCE_ARGS = dict(
    pipeline_model_parallel_size=1, virtual_pipeline_model_parallel_size=None,
    num_layers_per_virtual_pipeline_stage=None, sequence_parallel=False, hidden_dropout=0.0,
    attention_dropout=0.0, recompute_granularity=None, recompute_method=None, recompute_num_layers=None,
    fp8_format=None,
)


def saved_args(path: str) -> dict:
    """The trainer flags stored in checkpoint ``path`` (an iteration directory)."""
    common = dist_checkpointing.load_common_state_dict(path)
    args = common.get("args")
    if not isinstance(args, dict) or not args:
        raise ValueError(f"--load {path}: the checkpoint records no trainer flags (an imported checkpoint? "
                         "export it with tools/convert_checkpoint.py and use --hf)")
    return args


def build_inference_model(path: str, tensor_model_parallel_size: int, backend: Optional[Backend] = None,
                          seed: int = 1234) -> Tuple[GPTModel, dict]:
    """This TP rank's GPTModel with the weights of checkpoint ``path`` (collective over the TP group).

    Needs torch.distributed and Megatron's parallel state (``initialize_model_parallel``).
    Returns (model in eval mode, the checkpoint's saved trainer flags).
    """
    from arra_megatron.training.arguments import build_parser, transformer_config

    args = saved_args(path)
    # The parser's defaults first: a checkpoint saved before a flag existed still builds.
    defaults = vars(build_parser().parse_args([]))
    namespace = argparse.Namespace(**{**defaults, **args, **_INFERENCE_ARGS,
                                      "tensor_model_parallel_size": tensor_model_parallel_size})
    config = transformer_config(namespace)
    metadata = dist_checkpointing.load_tensors_metadata(path)
    # The padded vocabulary the checkpoint holds (the padding rule depends on the TP it trained with).
    vocab_rows = int(metadata["embedding.word_embeddings.weight"].global_shape[0])
    if vocab_rows % tensor_model_parallel_size:
        raise ValueError(f"--tensor-model-parallel-size {tensor_model_parallel_size} does not divide the "
                         f"checkpoint's vocabulary of {vocab_rows} rows")
    if backend is None:
        # Transformer Engine's attention ignores an explicit padding mask under its causal mask
        # type; the local and CPU core attentions honour it (left-padded prompts need it).
        backend = "local" if default_backend() == "te" else default_backend()
    if backend == "local":
        config.masked_softmax_fusion = False  # the fused causal kernel ignores the padding mask
    (model,) = build_gpt_chunks(
        config, vocab_rows, args.get("max_position_embeddings") or args["seq_length"], backend=backend,
        position_embedding_type=args.get("position_embedding_type", "learned_absolute"),
        rotary_base=args.get("rotary_base", 10000),
        share_embeddings_and_output_weights=not args.get("untie_embeddings_and_output_weights", False),
    )
    load_gpt_weights(model, path)
    model.eval()
    logger.info("loaded %s at TP %d (%s core attention)", path, tensor_model_parallel_size, backend)
    return model, args


def load_gpt_weights(model: GPTModel, path: str) -> None:
    """Read the GPT's tensors from a training checkpoint (collective). Only the GPT's keys are
    requested, so the optimizer state and the ARRA projector saved beside them are not read;
    every requested tensor must be in the checkpoint."""
    load_model_weights([model], path)


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

