"""Per-interval log line (Megatron-LM's format), JSONL records and TensorBoard scalars."""

from __future__ import annotations

import json
import logging
import os
from typing import Dict, Optional

logger = logging.getLogger("arra_megatron.train")


def training_flops_per_token(config, vocab_size: int, seq_length: int, projector_dim: int = 0) -> float:
    """Forward + backward matmul FLOPs per token (3 x forward, no recompute counted).

    Per layer: QKV and output projections, attention scores and values (full s x s, as
    Megatron-LM counts), MLP (3 matrices when gated); plus the logits and the ARRA projector.
    """
    h, layers = config.hidden_size, config.num_layers
    kv = config.kv_channels * config.num_query_groups
    attention = 2 * h * (config.kv_channels * config.num_attention_heads + 2 * kv) + 2 * h * h
    scores = 2 * 2 * seq_length * config.kv_channels * config.num_attention_heads
    mlp = 2 * h * config.ffn_hidden_size * (3 if config.gated_linear_unit else 2)
    projector = 2 * (h * projector_dim + projector_dim * projector_dim)
    forward = layers * (attention + scores + mlp) + 2 * h * vocab_size + projector
    return 3.0 * forward


class MetricsLogger:
    """Writes on the last rank only: a log line every ``log_interval``, JSONL every iteration."""

    def __init__(self, is_writer: bool, log_interval: int, train_iters: int, json_path: Optional[str] = None,
                 tensorboard_dir: Optional[str] = None):
        self.is_writer = is_writer
        self.log_interval = log_interval
        self.train_iters = train_iters
        self._json = None
        if json_path and is_writer:
            os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
            self._json = open(json_path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard_dir and is_writer:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=tensorboard_dir)
        self._window_seconds = 0.0
        self._window_iters = 0

    def iteration(self, record: Dict[str, float], step_seconds: float, tokens_per_iter: int,
                  flops_per_iter: float, world_size: int) -> None:
        """Record one iteration; ``step_seconds`` is its training-step time (saving and
        validation are not counted, so throughput is the training throughput)."""
        it = record["iteration"]
        if self._json:
            self._json.write(json.dumps(record) + "\n")
            self._json.flush()
        if self._tb:
            for key, value in record.items():
                if key not in ("iteration",) and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"train/{key}", value, it)
        self._window_seconds += step_seconds
        self._window_iters += 1
        if it % self.log_interval and it != self.train_iters:
            return
        elapsed = self._window_seconds / self._window_iters
        self._window_seconds, self._window_iters = 0.0, 0
        if not self.is_writer:
            return
        parts = [
            f"iteration {it:8d}/{self.train_iters:8d}",
            f"consumed samples: {record['consumed_samples']:12d}",
            f"elapsed time per iteration (ms): {elapsed * 1000:.1f}",
            f"learning rate: {record['lr']:.6E}",
            f"lm loss: {record['lm_loss']:.6E}",
        ]
        if "gva_loss" in record:
            parts += [f"gva loss: {record['gva_loss']:.6E}", f"gva cos: {record['gva_cos']:.4f}"]
            if record.get("gva_dropped_samples"):  # images that did not decode: their L_GVA term is masked
                parts.append(f"gva dropped samples: {record['gva_dropped_samples']}")
        if "z_loss" in record:
            parts.append(f"z loss: {record['z_loss']:.6E}")
        parts += [
            f"loss scale: {record['loss_scale']:.1f}",
            f"grad norm: {record['grad_norm']:.4f}" if record.get("grad_norm") is not None else "grad norm: n/a",
            f"number of skipped iterations: {record['skipped_iterations']:3d}",
            f"tokens/s: {tokens_per_iter / elapsed:.1f}",
            f"TFLOP/s/GPU: {flops_per_iter / elapsed / world_size / 1e12:.3f}",
        ]
        logger.info(" | ".join(parts))

    def evaluation(self, record: Dict[str, float]) -> None:
        if self._json:
            self._json.write(json.dumps(record) + "\n")
            self._json.flush()
        if self._tb:
            for key in ("lm_loss", "gva_loss", "gva_cos", "loss"):
                if key in record:
                    self._tb.add_scalar(f"valid/{key}", record[key], record["iteration"])
        if self.is_writer:
            text = " | ".join(f"{k}: {v:.6E}" for k, v in record.items()
                              if k not in ("iteration", "split", "consumed_samples"))
            logger.info("validation at iteration %d | %s", record["iteration"], text)

    def close(self) -> None:
        if self._json:
            self._json.close()
        if self._tb:
            self._tb.close()
