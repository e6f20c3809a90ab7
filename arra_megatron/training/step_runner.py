"""The model, optimizer and forward step of Megatron-LM's loop (training/megatron_loop.py), built
in this process for the benchmarks (tools/bench/) and tests that drive the schedule themselves.

``loop_model(argv)`` runs what ``megatron.training.pretrain`` runs before its first step:
``megatron_loop.setup`` (CPU mode, the arguments checked, Megatron-LM's globals),
``initialize_megatron`` (process groups, seeds), ``setup_model_and_optimizer`` with
``megatron_loop.model_provider`` (the chunks, wrapped as the loop wraps them; ``--load`` read
as the loop reads it) and the model config as ``train`` prepares it; the schedule's forward
step is ``megatron_loop.forward_step``. One model per process at a time: each call releases
the previous one, so one set of workers can run layout after layout.

``build_runner(config, arra, ...)`` is one optimizer step on synthetic ARRA samples for
tools/bench/ and the GPU tests; its TransformerConfig becomes the flags that describe it
(``flags_for``), and a config the flags cannot express is refused.

Samples (``tiny.synthetic_samples``) use the LlamaGen C2I layout by default: a short condition,
256 image tokens (256 px with a 16x VQ) from a 16,384-code book, and a per-sample target f_GF.

Nothing here is a second training step: the chunks come from ``setup_model_and_optimizer`` with
the loop's ``model_provider``, the forward step and loss are the loop's, and what ``train()``
and ``train_step`` do around them (the config's gradient hooks, zeroed gradients, the rerun
state machine) is repeated line for line, as megatron-core 0.19 has no function for either.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Dict, List, Optional

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from arra_megatron import tiny
from arra_megatron.config import ARRAConfig
from arra_megatron.models.specs import Backend
from arra_megatron.training import megatron_loop
from arra_megatron.training.forward_step import ARRAForwardStep, read_metrics

IMAGE_TOKENS = 256               # 256 px with a 16x downsampling VQ
IMAGE_RANGE = (64, 64 + 16384)   # LlamaGen VQ-16 codebook after 64 condition/special ids


# ----------------------------------------------------------------------------- the loop's model
def rank_microbatches(samples: Dict[str, torch.Tensor], micro_batch_size: int, data_parallel_rank: int = 0,
                      data_parallel_size: int = 1) -> List[Dict[str, torch.Tensor]]:
    """This data-parallel rank's contiguous share of the global batch, cut into micro-batches."""
    n = next(iter(samples.values())).size(0)
    if n % (micro_batch_size * data_parallel_size):
        raise ValueError(f"global batch {n} is not divisible by micro batch {micro_batch_size} x DP {data_parallel_size}")
    per_rank = n // data_parallel_size
    start = data_parallel_rank * per_rank
    return [
        {k: v[i:i + micro_batch_size] for k, v in samples.items() if k != "has_image"}
        for i in range(start, start + per_rank, micro_batch_size)
    ]


@dataclasses.dataclass
class LoopModel:
    """What ``pretrain`` holds before its first step: arguments, model chunks (DDP-wrapped),
    optimizer, scheduler, the chunks' TransformerConfig and the loop's forward step."""

    args: argparse.Namespace
    chunks: List[torch.nn.Module]
    optimizer: object
    scheduler: object
    config: TransformerConfig
    step: ARRAForwardStep  # the one ``megatron_loop.forward_step`` calls

    @property
    def tap(self):
        """The ARRA tap of the loop (None with ``--no-arra``)."""
        return megatron_loop.arra_tap()

    @property
    def layout(self) -> megatron_loop.DataLayout:
        return megatron_loop.data_layout_in_use()

    def microbatches(self, samples: Dict[str, torch.Tensor]) -> List[Dict[str, torch.Tensor]]:
        """This data-parallel rank's micro-batches of the global batch ``samples``."""
        from megatron.core import parallel_state

        return rank_microbatches(samples, self.args.micro_batch_size, parallel_state.get_data_parallel_rank(),
                                 parallel_state.get_data_parallel_world_size())

    def schedule(self, microbatches: list, forward_only: bool = False) -> list:
        """Megatron-Core's schedule over ``microbatches`` with the loop's forward step, gradients
        zeroed first, inside the rerun state machine as ``train_step`` runs it (it validates the
        gradients): the loss reports of the last stage."""
        from megatron.core.pipeline_parallel import get_forward_backward_func
        from megatron.core.rerun_state_machine import get_rerun_state_machine

        rerun = get_rerun_state_machine()
        while rerun.should_run_forward_backward(None):
            for chunk in self.chunks:
                chunk.zero_grad_buffer()
            self.optimizer.zero_grad()
            data = [iter(microbatches) for _ in self.chunks] if len(self.chunks) > 1 else iter(microbatches)
            losses = get_forward_backward_func()(
                forward_step_func=megatron_loop.forward_step, data_iterator=data, model=self.chunks,
                num_microbatches=len(microbatches), seq_length=self.args.seq_length,
                micro_batch_size=self.args.micro_batch_size, forward_only=forward_only)
        return losses


def release() -> None:
    """Forget this process's loop model: Megatron-LM's globals and rerun state machine, the
    model-parallel groups and the loop's per-process state (the default process group stays)."""
    from megatron.core import parallel_state
    from megatron.core.rerun_state_machine import destroy_rerun_state_machine
    from megatron.training import global_vars

    megatron_loop.reset()
    global_vars.unset_global_variables()
    destroy_rerun_state_machine()
    parallel_state.destroy_model_parallel()


def loop_model(argv: List[str], layout: Optional[megatron_loop.DataLayout] = None) -> LoopModel:
    """Megatron-LM's loop set up for ``argv`` (its flags) up to the first step; ``layout``: the data
    layout when the samples are not the mock's (default: what ``parse_args`` reads from the data flags)."""
    from megatron.core.distributed import DistributedDataParallel, finalize_model_grads
    from megatron.core.enums import ModelType
    from megatron.core.utils import get_model_config
    from megatron.training import get_timers
    from megatron.training.initialize import initialize_megatron
    from megatron.training.training import setup_model_and_optimizer

    from arra_megatron.runtime import cpu_mode

    release()
    args = megatron_loop.setup(argv, layout)
    initialize_megatron(allow_no_cuda=cpu_mode.is_enabled())
    chunks, optimizer, scheduler = setup_model_and_optimizer(ModelType.encoder_or_decoder,
                                                             megatron_loop.model_provider)
    config = get_model_config(chunks[0])
    # As megatron.training's train() prepares the config before its first step.
    config.grad_scale_func = optimizer.scale_loss
    config.timers = get_timers()
    if isinstance(chunks[0], DistributedDataParallel) and args.overlap_grad_reduce:
        no_sync = [chunk.no_sync for chunk in chunks]
        config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
        if args.align_grad_reduce:
            grad_sync = [chunk.start_grad_sync for chunk in chunks]
            config.grad_sync_func = grad_sync[0] if len(grad_sync) == 1 else grad_sync
    if config.finalize_model_grads_func is None:
        config.finalize_model_grads_func = finalize_model_grads
    return LoopModel(args, chunks, optimizer, scheduler, config, megatron_loop.arra_forward_step())


# ----------------------------------------------------------------------------- a config as flags
#: TransformerConfig fields ``flags_for`` expresses; the built config must agree on each.
CONFIG_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
                 "ffn_hidden_size", "normalization", "layernorm_epsilon", "gated_linear_unit", "activation_func",
                 "add_bias_linear", "init_method_std", "hidden_dropout", "attention_dropout",
                 "tensor_model_parallel_size", "pipeline_model_parallel_size",
                 "virtual_pipeline_model_parallel_size", "sequence_parallel", "bf16", "fp16", "params_dtype",
                 "fp8", "fp8_recipe", "recompute_granularity", "recompute_method", "recompute_num_layers")


def flags_for(config: TransformerConfig, arra: ARRAConfig) -> List[str]:
    """Megatron-LM flags of a Llama-style GPT (RoPE, untied output layer) with ``config``'s shape,
    layout and precision, and the ARRA flags of ``arra``."""
    flags = ["--num-layers", config.num_layers, "--hidden-size", config.hidden_size,
             "--num-attention-heads", config.num_attention_heads, "--ffn-hidden-size", config.ffn_hidden_size,
             "--normalization", config.normalization, "--norm-epsilon", config.layernorm_epsilon,
             "--init-method-std", config.init_method_std, "--hidden-dropout", config.hidden_dropout,
             "--attention-dropout", config.attention_dropout, "--position-embedding-type", "rope",
             "--untie-embeddings-and-output-weights",
             "--tensor-model-parallel-size", config.tensor_model_parallel_size,
             "--pipeline-model-parallel-size", config.pipeline_model_parallel_size]
    if config.num_query_groups not in (None, config.num_attention_heads):
        flags += ["--group-query-attention", "--num-query-groups", config.num_query_groups]
    if config.kv_channels != config.hidden_size // config.num_attention_heads:
        flags += ["--kv-channels", config.kv_channels]
    flags += ["--swiglu"] if config.gated_linear_unit else []
    flags += [] if config.add_bias_linear else ["--disable-bias-linear"]
    if config.virtual_pipeline_model_parallel_size:
        per_chunk = config.num_layers // (config.pipeline_model_parallel_size * config.virtual_pipeline_model_parallel_size)
        flags += ["--num-layers-per-virtual-pipeline-stage", per_chunk]
    flags += ["--sequence-parallel"] if config.sequence_parallel else []
    flags += ["--bf16"] if config.bf16 else ["--fp16"] if config.fp16 else []
    if config.fp8:
        flags += ["--fp8-format", config.fp8, "--fp8-recipe", config.fp8_recipe]
    if config.recompute_granularity:
        flags += ["--recompute-granularity", config.recompute_granularity]
        if config.recompute_method:
            flags += ["--recompute-method", config.recompute_method, "--recompute-num-layers",
                      config.recompute_num_layers]
    return [str(flag) for flag in flags + arra.to_flags()]


def check_config(built: TransformerConfig, wanted: TransformerConfig) -> None:
    """Refuse a config the loop built from ``flags_for`` that differs from ``wanted`` on a field of ``CONFIG_FIELDS``."""
    differ = {name: (getattr(built, name), getattr(wanted, name)) for name in CONFIG_FIELDS
              if getattr(built, name) != getattr(wanted, name)}
    if differ:
        raise ValueError(f"the loop's flags do not express this TransformerConfig: (built, wanted) {differ}")


# ----------------------------------------------------------------------------- one training step
@dataclasses.dataclass
class StepRunner:
    """``runner()`` runs one optimizer step (or ``runner(forward_only=True)`` a loss only)."""

    bundle: LoopModel
    optimizer: object
    step: object
    microbatches: list
    seq_length: int
    micro_batch_size: int
    vocab_size: int

    @property
    def tokens_per_step(self) -> int:
        return self.seq_length * self.micro_batch_size * len(self.microbatches)

    def __call__(self, forward_only: bool = False, optimizer_step: bool = True) -> Dict[str, float]:
        losses = self.bundle.schedule(self.microbatches, forward_only=forward_only)
        metrics = self.step.end_step(losses)
        if not forward_only and optimizer_step:
            self.optimizer.step()
        return read_metrics(metrics)


def build_runner(config: TransformerConfig, arra: ARRAConfig, seq_length: int, micro_batch_size: int,
                 global_batch: int, seed: int = 1234, backend: Optional[Backend] = None,
                 num_image_tokens: int = IMAGE_TOKENS, image_range=IMAGE_RANGE, lr: float = 1e-4,
                 data_seed: int = 1) -> StepRunner:
    """The loop's model for ``config`` built from ``seed`` (same seed: same weights), Adam at a
    constant ``lr``, and a fixed global batch of synthetic samples (``data_seed``) whose targets
    have the loop's D (``--arra-target-dim``, or the mock data's default).

    The rerun state machine is off (``--rerun-mode disabled``, as megatron.training turns it off
    for an evaluation): callers may run the schedule without ``train_step``'s rerun loop; a NaN
    gradient still raises."""
    impl = {None: [], "te": ["--transformer-impl", "transformer_engine"], "local": ["--transformer-impl", "local"],
            "cpu": ["--transformer-impl", "local"]}[backend]
    vocab = image_range[1]
    argv = flags_for(config, arra) + impl + [
        "--seq-length", str(seq_length), "--max-position-embeddings", str(seq_length),
        "--micro-batch-size", str(micro_batch_size), "--global-batch-size", str(global_batch),
        "--train-iters", "1000", "--lr", str(lr), "--lr-decay-style", "constant", "--seed", str(seed),
        "--mock-data", "--vocab-size", str(vocab), "--rerun-mode", "disabled"]
    model = loop_model(argv, megatron_loop.DataLayout(vocab, tuple(image_range)))
    check_config(model.config, config)
    samples = tiny.synthetic_samples(global_batch, seq_length, num_image_tokens=num_image_tokens,
                                     target_dim=model.args.arra_target_dim, seed=data_seed,
                                     image_token_range=image_range)
    return StepRunner(model, model.optimizer, model.step, model.microbatches(samples), seq_length, micro_batch_size,
                      megatron_loop.padded_vocab_size(model.args))
