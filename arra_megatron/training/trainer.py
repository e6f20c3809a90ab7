"""The training loop: Megatron-Core model, DDP, optimizer and schedules, with ARRA's loss.

Built from parts (arguments, model, forward step, checkpointing, metrics); the
entry point ``examples/pretrain_arra.py`` only parses flags and calls ``Trainer``.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import time
from typing import Dict, List

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from arra_megatron.models.gpt import pad_vocab_size
from arra_megatron.runtime.distributed import initialize_model_parallel
from arra_megatron.training import checkpointing
from arra_megatron.training.arguments import arra_config, layer_backend, transformer_config
from arra_megatron.training.data import RankBatchSampler, TrainingData, build_training_data, micro_batch_loader
from arra_megatron.training.forward_step import ARRAForwardStep, read_metrics
from arra_megatron.training.metrics import MetricsLogger, training_flops_per_token
from arra_megatron.training.model import build_model

logger = logging.getLogger("arra_megatron.train")


class Trainer:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        initialize_model_parallel(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                                  args.virtual_pipeline_model_parallel_size, seed=args.seed,
                                  timeout_minutes=args.distributed_timeout_minutes)
        self.rank = torch.distributed.get_rank()
        self.world_size = torch.distributed.get_world_size()
        _setup_logging(is_writer=self.rank == self.world_size - 1)
        self.data: TrainingData = build_training_data(args)
        self.config = transformer_config(args)
        self.arra = arra_config(args)
        vocab = pad_vocab_size(self.data.vocab_size, args.tensor_model_parallel_size,
                               args.make_vocab_size_divisible_by)
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=args.bf16 or args.fp16,
            overlap_grad_reduce=args.overlap_grad_reduce,
            use_distributed_optimizer=args.use_distributed_optimizer,
        )
        self.bundle = build_model(
            self.config, self.arra, vocab, args.seq_length, ddp_config=ddp_config, seed=args.seed,
            backend=layer_backend(args),
            position_embedding_type=args.position_embedding_type, rotary_base=args.rotary_base,
            share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
            real_vocab_size=self.data.vocab_size,
        )
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer=args.optimizer, lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
                adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
                clip_grad=args.clip_grad, bf16=args.bf16, fp16=args.fp16, params_dtype=self.config.params_dtype,
                loss_scale=args.loss_scale, initial_loss_scale=args.initial_loss_scale,
                use_distributed_optimizer=args.use_distributed_optimizer,
            ),
            self.bundle.chunks,
        )
        self.config.grad_scale_func = self.optimizer.scale_loss
        gbs = args.global_batch_size
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0, max_lr=args.lr, min_lr=args.min_lr,
            lr_warmup_steps=args.lr_warmup_iters * gbs, lr_decay_steps=args.lr_decay_iters * gbs,
            lr_decay_style=args.lr_decay_style, start_wd=args.weight_decay, end_wd=args.weight_decay,
            wd_incr_steps=args.train_iters * gbs, wd_incr_style="constant",
        )
        self.online_targets = None
        if self.arra.enabled and args.arra_targets == "online" and self.bundle.tap.holds_layer:
            from arra_megatron.training.targets import OnlineTargets

            self.online_targets = OnlineTargets(args.arra_encoder, args.arra_aggregation, args.micro_batch_size,
                                                bf16=True)
            self.arra.validate_for_model(num_layers=args.num_layers, hidden_size=args.hidden_size,
                                         tensor_model_parallel_size=args.tensor_model_parallel_size,
                                         encoder_dim=self.online_targets.dim)
        self.step_fn = ARRAForwardStep(self.arra, self.data.image_token_range, self.bundle.tap,
                                       z_loss_weight=args.z_loss_weight, online_targets=self.online_targets,
                                       num_microbatches=args.num_microbatches)
        self.iteration, self.consumed_samples = 0, 0
        if args.load:
            self.iteration, self.consumed_samples = checkpointing.load_checkpoint(
                args.load, self.bundle.chunks, self.optimizer, self.scheduler, finetune=args.finetune,
                load_optimizer=not args.no_load_optim, load_rng=not args.no_load_rng)
        self.skipped_iterations = 0
        self._saved_iteration = self.iteration if args.load and not args.finetune else None
        self.metrics = MetricsLogger(self.rank == self.world_size - 1, args.log_interval, args.train_iters,
                                     args.log_json, args.tensorboard_dir)
        self.tokens_per_iter = gbs * args.seq_length
        self.flops_per_iter = self.tokens_per_iter * training_flops_per_token(
            self.config, vocab, args.seq_length, self.arra.target_dim if self.arra.enabled else 0)

    # ------------------------------------------------------------------ data
    def _loader(self, source, consumed: int, total: int):
        return micro_batch_loader(source, RankBatchSampler(
            consumed, self.args.micro_batch_size, parallel_state.get_data_parallel_world_size(),
            parallel_state.get_data_parallel_rank(), total), self.args.num_workers)

    def _next_step(self, loader) -> List[Dict[str, torch.Tensor]]:
        return [next(loader) for _ in range(self.args.num_microbatches)]

    def _run(self, microbatches, forward_only: bool) -> Dict[str, torch.Tensor]:
        a = self.args
        chunks = self.bundle.chunks
        data = [iter(microbatches) for _ in chunks] if len(chunks) > 1 else iter(microbatches)
        losses = get_forward_backward_func()(
            forward_step_func=self.step_fn, data_iterator=data, model=chunks,
            num_microbatches=len(microbatches), seq_length=a.seq_length, micro_batch_size=a.micro_batch_size,
            forward_only=forward_only,
        )
        return self.step_fn.end_step(losses)

    # ------------------------------------------------------------------ loop
    def train_step(self) -> Dict[str, float]:
        for chunk in self.bundle.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        metrics = self._run(self._next_step(self._train_loader), forward_only=False)
        ok, grad_norm, _ = self.optimizer.step()
        metrics = read_metrics(metrics)
        if ok:
            self.scheduler.step(increment=self.args.global_batch_size)
        else:
            self.skipped_iterations += 1
        metrics["grad_norm"] = None if grad_norm is None else float(grad_norm)
        return metrics

    def evaluate(self) -> Dict[str, float]:
        for chunk in self.bundle.chunks:
            chunk.eval()
        totals: Dict[str, torch.Tensor] = {}
        loader = self._loader(self.data.valid, 0, self.args.eval_iters * self.args.global_batch_size)
        with torch.no_grad():
            for _ in range(self.args.eval_iters):
                m = self._run(self._next_step(loader), forward_only=True)
                for k, v in m.items():
                    totals[k] = totals.get(k, 0.0) + v / self.args.eval_iters
        for chunk in self.bundle.chunks:
            chunk.train()
        return read_metrics(totals)

    def train(self) -> Dict[str, float]:
        a = self.args
        last: Dict[str, float] = {}
        logger.info("training %s: %d iterations from iteration %d, %d micro-batches of %d per DP rank, "
                    "world %d (TP %d, PP %d, DP %d)", "with ARRA" if self.arra.enabled else "without ARRA",
                    a.train_iters, self.iteration, a.num_microbatches, a.micro_batch_size, self.world_size,
                    a.tensor_model_parallel_size, a.pipeline_model_parallel_size, a.data_parallel_size)
        self._train_loader = self._loader(self.data.train, self.consumed_samples,
                                          a.train_iters * a.global_batch_size)
        while self.iteration < a.train_iters:
            start = time.perf_counter()
            metrics = self.train_step()
            step_seconds = time.perf_counter() - start
            self.iteration += 1
            self.consumed_samples += a.global_batch_size
            last = _record(metrics, self.iteration, self.consumed_samples)
            last.update(lr=self.optimizer.param_groups[0]["lr"], loss_scale=float(self.optimizer.get_loss_scale()),
                        skipped_iterations=self.skipped_iterations)
            if not math.isfinite(last["loss"]):
                raise FloatingPointError(f"loss is {last['loss']} at iteration {self.iteration}")
            self.metrics.iteration(last, step_seconds, self.tokens_per_iter, self.flops_per_iter, self.world_size)
            if a.save and a.save_interval and self.iteration % a.save_interval == 0:
                self.save()
            _maybe_fail_here(self.iteration, self.rank)
            if a.exit_interval and self.iteration % a.exit_interval == 0 and self.iteration < a.train_iters:
                logger.info("exiting at iteration %d (--exit-interval %d)", self.iteration, a.exit_interval)
                break
            if a.eval_interval and self.iteration % a.eval_interval == 0 and self.data.valid is not None:
                self.metrics.evaluation({**_record(self.evaluate(), self.iteration, self.consumed_samples),
                                         "split": "valid"})
        if a.save:
            self.save()
        self.metrics.close()
        return last

    def save(self) -> None:
        """Checkpoint this iteration (once: a second call at the same iteration does nothing)."""
        if self._saved_iteration == self.iteration:
            return
        self._saved_iteration = self.iteration
        start = time.perf_counter()
        path = checkpointing.save_checkpoint(self.args.save, self.iteration, self.consumed_samples,
                                             self.bundle.chunks, self.optimizer, self.scheduler, vars(self.args))
        logger.info("saved checkpoint %s in %.1f s", path, time.perf_counter() - start)


def _maybe_fail_here(iteration: int, rank: int) -> None:
    """Fault injection for tests: ``ARRA_FAIL_AT=ITERATION:RANK`` kills that rank (SIGKILL)
    after that iteration, as a crashed node would."""
    spec = os.environ.get("ARRA_FAIL_AT")
    if spec and spec == f"{iteration}:{rank}":
        logger.warning("ARRA_FAIL_AT=%s: killing rank %d", spec, rank)
        os.kill(os.getpid(), signal.SIGKILL)


def _record(metrics: Dict[str, float], iteration: int, consumed: int) -> Dict[str, float]:
    out = {"iteration": iteration, "consumed_samples": consumed}
    out.update({k.replace(" ", "_"): v for k, v in metrics.items()})
    return out


def _setup_logging(is_writer: bool) -> None:
    logging.basicConfig(level=logging.INFO if is_writer else logging.WARNING,
                        format="[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S", force=True)
    if os.environ.get("ARRA_QUIET_MEGATRON", "1") == "1":
        for name in ("megatron.core", "megatron"):
            logging.getLogger(name).setLevel(logging.ERROR)
