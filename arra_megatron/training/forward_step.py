"""Forward step and loss function for Megatron-Core's ``get_forward_backward_func``.

Both terms of L = L_AR + lambda * L_GVA are normalised over the *global* batch
(ARRA_METHOD.md): L_AR is the mean over every counted target token of the
global batch, L_GVA the mean of L_b over the samples with an image. The
denominators are counted from the step's micro-batches before the schedule
runs (``begin_step``, one all-reduce over data parallel), so the result does
not depend on how the batch is cut into micro-batches or data-parallel ranks.

Nothing in a step reads a value back to the host: the denominators and the
returned metrics are tensors on the device, read once when the caller logs them
(``read_metrics``), as Megatron-LM reads its losses at the log interval.

A micro-batch is a dict of tensors:

    tokens [b, s] int, labels [b, s] int, loss_mask [b, s] float,
    position_ids [b, s] int, arra_targets [b, D] float (needed when ARRA is on),
    arra_valid [b] bool (optional: False masks a sample's L_GVA term, e.g. its
    image failed to decode).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from megatron.core import parallel_state, tensor_parallel

from arra_megatron.alignment.loss import alignment_mask, num_aligned_samples, position_weights
from arra_megatron.alignment.tap import AlignmentInputs, ARRAStep, ARRATap
from arra_megatron.config import ARRAConfig


@dataclasses.dataclass(frozen=True)
class StepNormalizers:
    """Global denominators of one training step (0-d float64 tensors on the device)."""

    num_loss_tokens: torch.Tensor
    num_aligned_samples: torch.Tensor
    num_dropped_samples: torch.Tensor  # samples with an image but no usable target (undecodable image)


def read_metrics(metrics: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """Step metrics as Python floats: one device-to-host read for all of them."""
    if not metrics:
        return {}
    values = torch.stack([torch.as_tensor(v, dtype=torch.float64).reshape(()).cpu() for v in metrics.values()])
    return dict(zip(metrics, values.tolist()))


def vocab_parallel_logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """logsumexp over a vocabulary split across the TP group (differentiable)."""
    local_max = logits.max(dim=-1).values.detach()
    torch.distributed.all_reduce(
        local_max, op=torch.distributed.ReduceOp.MAX, group=parallel_state.get_tensor_model_parallel_group()
    )
    sum_exp = torch.exp(logits - local_max.unsqueeze(-1)).sum(dim=-1)
    sum_exp = tensor_parallel.reduce_from_tensor_model_parallel_region(sum_exp)
    return local_max + torch.log(sum_exp)


class ARRAForwardStep:
    """``forward_step_func(data_iterator, model)`` for ARRA (or plain GPT when ARRA is off).

    Per training step::

        step.begin_step(microbatches)                       # collective over DP
        losses = forward_backward_func(forward_step_func=step, data_iterator=iter(microbatches), ...)
        metrics = step.end_step(losses)                     # collective over TP/PP/DP
    """

    def __init__(
        self,
        arra: ARRAConfig,
        image_token_range: Tuple[int, int],
        tap: Optional[ARRATap] = None,
        z_loss_weight: float = 0.0,
        online_targets: Optional[Callable] = None,
    ):
        if arra.enabled and tap is None:
            raise ValueError("ARRA is enabled but no ARRATap was given")
        self.arra = arra
        self.image_token_range = tuple(image_token_range)
        self.tap = tap if arra.enabled else None
        self.z_loss_weight = z_loss_weight
        self.online_targets = online_targets  # image bytes -> (f_GF, valid), on the stage holding layer k
        self._lm_scale: Optional[float] = None
        self._dropped = 0

    # ----------------------------------------------------------------- per step
    def alignment_weights(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        mask = alignment_mask(batch["labels"], self.image_token_range, self.arra.target)
        if "arra_valid" in batch:
            mask = mask & batch["arra_valid"].bool().to(mask.device).unsqueeze(1)
        return mask

    def normalizers(self, microbatches: Iterable[Dict[str, torch.Tensor]]) -> StepNormalizers:
        """Global counts: loss tokens (every stage reads the labels) summed over DP; samples
        with an image and a valid target, from the stage holding layer k (the only one that
        knows which online targets failed to decode), summed over DP and shared over PP."""
        counts = torch.zeros(3, dtype=torch.float64, device=torch.cuda.current_device())
        holds_layer = self.tap is not None and self.tap.holds_layer
        for batch in microbatches:
            counts[0] += batch["loss_mask"].sum().double().to(counts.device)
            if holds_layer:
                aligned = num_aligned_samples(self.alignment_weights(batch))
                with_image = num_aligned_samples(alignment_mask(batch["labels"], self.image_token_range,
                                                                self.arra.target))
                counts[1] += aligned.double().to(counts.device)
                counts[2] += (with_image - aligned).double().to(counts.device)
        torch.distributed.all_reduce(counts, group=parallel_state.get_data_parallel_group())
        if self.tap is not None:
            gva = counts[1:].clone()
            torch.distributed.all_reduce(gva, group=parallel_state.get_pipeline_model_parallel_group())
            counts[1:] = gva
        return StepNormalizers(counts[0], counts[1], counts[2])

    def begin_step(self, microbatches: Sequence[Dict[str, torch.Tensor]]) -> StepNormalizers:
        """Fix this step's normalisation (collective over the data-parallel group).

        The L_GVA gradient is scaled by the same loss scale Megatron's schedule applies
        to the returned loss: ``config.grad_scale_func`` (the fp16 optimizer's
        ``scale_loss``), read here, once per step, after the previous step updated it.
        """
        if self.online_targets is not None and self.tap is not None and self.tap.holds_layer:
            for batch in microbatches:  # f_GF for the whole step first: decode failures change N_gva
                batch["arra_targets"], batch["arra_valid"] = self.online_targets(batch["image_bytes"])
        norms = self.normalizers(microbatches)
        dp = parallel_state.get_data_parallel_world_size()
        # Megatron divides the returned loss by num_microbatches and DDP divides gradients by dp.
        self._lm_scale = len(microbatches) * dp / norms.num_loss_tokens.clamp(min=1.0)
        if self.tap is not None:
            scale_func = getattr(self.tap.config, "grad_scale_func", None)
            loss_scale = 1.0
            if scale_func is not None:
                loss_scale = scale_func(torch.ones((), device=torch.cuda.current_device()))
            self.tap.begin_step(ARRAStep(norms.num_aligned_samples, dp, loss_scale))
        self._dropped = norms.num_dropped_samples
        return norms

    def end_step(self, losses_reduced: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """Step metrics, identical on every rank: lm loss, (z loss), gva loss, gva cos, loss,
        as 0-d tensors on the device (``read_metrics`` turns them into floats)."""
        sums = torch.zeros(3, dtype=torch.float64, device=torch.cuda.current_device())
        for record in losses_reduced:
            sums += record["lm"].double().to(sums.device)
        torch.distributed.all_reduce(sums, group=parallel_state.get_data_parallel_group())
        torch.distributed.all_reduce(sums, group=parallel_state.get_pipeline_model_parallel_group())
        count = sums[2].clamp(min=1.0)
        metrics = {"lm loss": sums[0] / count}
        total = metrics["lm loss"]
        if self.z_loss_weight:
            metrics["z loss"] = sums[1] / count
            total = total + self.z_loss_weight * metrics["z loss"]
        if self.tap is not None:
            metrics.update(self.tap.end_step())
            metrics["gva dropped samples"] = self._dropped
            total = total + self.arra.weight * metrics["gva loss"]
        metrics["loss"] = total
        self._lm_scale = None
        return metrics

    # ----------------------------------------------------------------- per micro-batch
    def __call__(self, data_iterator, model):
        if self._lm_scale is None:
            raise RuntimeError("ARRAForwardStep.begin_step() must run before the schedule")
        batch = next(data_iterator)
        device = torch.cuda.current_device()
        # Asynchronous copies (the loader pins its batches on a GPU machine).
        tokens, labels, position_ids, loss_mask = (
            batch[key].to(device, non_blocking=True) for key in ("tokens", "labels", "position_ids", "loss_mask"))
        loss_mask = loss_mask.float()
        want_logits = self.z_loss_weight > 0
        forward = partial(model, tokens, position_ids, None, labels=None if want_logits else labels)
        if self.tap is not None and self.tap.holds_layer:
            if "arra_targets" not in batch:
                raise KeyError("ARRA is on but the micro-batch has no 'arra_targets' (f_GF per sample); "
                               "give precomputed targets or an encoder, or turn ARRA off with --no-arra")
            inputs = AlignmentInputs(  # w_t from the host copy of the labels: no device round trip
                weights=position_weights(self.alignment_weights(batch)).to(device, non_blocking=True),
                targets=batch["arra_targets"].to(device, non_blocking=True),
            )
            with self.tap.microbatch(inputs):
                output = forward()
        else:
            output = forward()
        return output, partial(self.loss_func, loss_mask, labels if want_logits else None)

    def loss_func(self, loss_mask: torch.Tensor, labels: Optional[torch.Tensor], output: torch.Tensor):
        """Megatron loss function (2-output form): (loss to backprop, values to report)."""
        if labels is None:
            token_loss, z = output.float(), None
        else:  # output holds the vocab-parallel logits [b, s, v/tp]
            logits = output.float()
            # Megatron's cross entropy subtracts the max from its input in place: give it a copy.
            token_loss = tensor_parallel.vocab_parallel_cross_entropy(logits.clone(), labels)
            z = vocab_parallel_logsumexp(logits).pow(2)
        lm_sum = (token_loss * loss_mask).sum()
        objective = lm_sum
        z_sum = torch.zeros_like(lm_sum)
        if z is not None:
            z_sum = (z * loss_mask).sum()
            objective = objective + self.z_loss_weight * z_sum
        report = torch.stack([lm_sum.detach(), z_sum.detach(), loss_mask.sum()])
        return objective * self._lm_scale.to(objective.dtype), {"lm": report}
