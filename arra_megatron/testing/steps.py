"""One training step on synthetic ARRA samples: the model, a Megatron optimizer and the
real forward step and schedule, for the benchmarks in tools/bench/ and the GPU tests.

Samples use the LlamaGen C2I layout by default: a short condition, 256 image tokens
(256 px with a 16x VQ) from a 16,384-code book, and a per-sample target f_GF.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional

from megatron.core import tensor_parallel
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.transformer_config import TransformerConfig

from arra_megatron.config import ARRAConfig
from arra_megatron.models.gpt import pad_vocab_size
from arra_megatron.models.specs import Backend
from arra_megatron.testing import tiny
from arra_megatron.training.forward_step import ARRAForwardStep, read_metrics
from arra_megatron.training.model import ModelBundle, build_model

IMAGE_TOKENS = 256               # 256 px with a 16x downsampling VQ
IMAGE_RANGE = (64, 64 + 16384)   # LlamaGen VQ-16 codebook after 64 condition/special ids


@dataclasses.dataclass
class StepRunner:
    """``runner()`` runs one optimizer step (or ``runner(forward_only=True)`` a loss only)."""

    bundle: ModelBundle
    optimizer: object
    step: ARRAForwardStep
    microbatches: list
    seq_length: int
    micro_batch_size: int
    vocab_size: int

    @property
    def tokens_per_step(self) -> int:
        return self.seq_length * self.micro_batch_size * len(self.microbatches)

    def __call__(self, forward_only: bool = False, optimizer_step: bool = True) -> Dict[str, float]:
        for chunk in self.bundle.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = get_forward_backward_func()(
            forward_step_func=self.step, data_iterator=iter(self.microbatches), model=self.bundle.chunks,
            num_microbatches=len(self.microbatches), seq_length=self.seq_length,
            micro_batch_size=self.micro_batch_size, forward_only=forward_only)
        metrics = self.step.end_step(losses)
        if not forward_only and optimizer_step:
            self.optimizer.step()
        return read_metrics(metrics)


def build_runner(config: TransformerConfig, arra: ARRAConfig, seq_length: int, micro_batch_size: int,
                 global_batch: int, seed: int = 1234, backend: Optional[Backend] = None,
                 num_image_tokens: int = IMAGE_TOKENS, image_range=IMAGE_RANGE, lr: float = 1e-4,
                 data_seed: int = 1) -> StepRunner:
    """A model built from ``seed`` (same seed: same weights) and a fixed global batch."""
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    half = config.bf16 or config.fp16
    vocab = pad_vocab_size(image_range[1], config.tensor_model_parallel_size)
    bundle = build_model(config, arra, vocab, seq_length, seed=seed, backend=backend,
                         ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=half))
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=lr, bf16=config.bf16, fp16=config.fp16,
                        params_dtype=config.params_dtype),
        bundle.chunks)
    config.grad_scale_func = optimizer.scale_loss
    samples = tiny.synthetic_samples(global_batch, seq_length, num_image_tokens=num_image_tokens,
                                     target_dim=arra.target_dim, seed=data_seed, image_token_range=image_range)
    microbatches = tiny.microbatches(samples, micro_batch_size)
    step = ARRAForwardStep(arra, image_range, bundle.tap, num_microbatches=len(microbatches))
    return StepRunner(bundle, optimizer, step, microbatches, seq_length, micro_batch_size, vocab)
