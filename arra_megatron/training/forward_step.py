"""Forward step and loss function for Megatron's schedules (and ``megatron.training.pretrain``).

Both terms of L = L_AR + lambda * L_GVA are normalised over the *global* batch
(ARRA_METHOD.md): L_AR is the mean over every counted target token of the
global batch, L_GVA the mean of L_b over the samples with an image. So the
result does not depend on how the batch is cut into micro-batches or
data-parallel ranks.

The denominators are counted where the step's batch is assembled: on the first
micro-batch of a step, the forward step reads all of the step's micro-batches
from its data iterator, counts loss tokens N_tok and samples with an image
N_gva, and all-reduces the counts over data parallel only (stages enter the
schedule at different times, so a pipeline collective there would deadlock;
each stage counts what it needs from its own copy of the batch). The counts stay
on the device: nothing in a step reads a value back to the host, and metrics are
tensors read when they are logged (``read_metrics``), as Megatron-LM does.

Gradient scale. After the schedule Megatron divides every gradient by G: the
data-parallel size P (DDP averages), or the global token count N_tok with
``--calculate-per-token-loss``. L_AR is returned so that G undoes itself
(sum / N_tok * M * P, where the schedule divides by the M micro-batches; or the
plain sum with its token count in per-token mode), and the tap injects
``S * lambda * G / N_gva`` per unit of L_GVA's partial sum (alignment/tap.py).

A micro-batch is a dict of tensors:

    tokens [b, s] int, labels [b, s] int, loss_mask [b, s] float,
    position_ids [b, s] int, arra_targets [b, D] float (needed when ARRA is on),
    arra_valid [b] bool (optional: False masks a sample's L_GVA term, e.g. its
    image failed to decode), image_bytes (online targets: encoded images).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from megatron.core import parallel_state, tensor_parallel

from arra_megatron.alignment.loss import alignment_mask, num_aligned_samples, position_weights
from arra_megatron.alignment.tap import AlignmentInputs, ARRAStep, ARRATap
from arra_megatron.config import ARRAConfig

#: Batch fields the model and the loss read on the device.
DEVICE_KEYS = ("tokens", "labels", "position_ids", "loss_mask")


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


def megatron_num_microbatches(training: bool) -> int:
    """Micro-batches per step as megatron.training schedules them (evaluation has its own batch)."""
    from megatron.core.num_microbatches_calculator import get_num_microbatches

    if training:
        return get_num_microbatches()
    from megatron.training import get_args

    args = get_args()
    return args.eval_global_batch_size // (args.eval_micro_batch_size * parallel_state.get_data_parallel_world_size())


@dataclasses.dataclass
class _Step:
    """One data iterator's micro-batches of the current step and the step's scale."""

    batches: List[Dict[str, torch.Tensor]]
    lm_scale: torch.Tensor
    served: int = 0


class ARRAForwardStep:
    """``forward_step_func(data_iterator, model)`` for ARRA (or plain GPT when ARRA is off).

    Usage::

        losses = forward_backward_func(forward_step_func=step, data_iterator=..., num_microbatches=M, ...)
        metrics = step.end_step(losses)     # collective over TP/PP/DP; 0-d tensors

    ``megatron.training.pretrain`` reduces the loss reports itself; the ARRA metrics come
    from ``alignment_metrics()`` (training/megatron_loop.py calls it after each step).

    Args:
        num_microbatches: M, micro-batches per step on this rank, or ``f(training) -> M``
            (default: megatron.training's calculator).
        per_token_loss: Megatron's ``--calculate-per-token-loss`` (``config.calculate_per_token_loss``).
    """

    def __init__(
        self,
        arra: ARRAConfig,
        image_token_range: Tuple[int, int],
        tap: Optional[ARRATap] = None,
        z_loss_weight: float = 0.0,
        online_targets: Optional[Callable] = None,
        num_microbatches: Union[int, Callable[[bool], int], None] = None,
        per_token_loss: bool = False,
    ):
        if arra.enabled and tap is None:
            raise ValueError("ARRA is enabled but no ARRATap was given")
        self.arra = arra
        self.image_token_range = tuple(image_token_range)
        self.tap = tap if arra.enabled else None
        self.z_loss_weight = z_loss_weight
        self.online_targets = online_targets  # image bytes -> (f_GF, valid), on the stage holding layer k
        if isinstance(num_microbatches, int):
            self.num_microbatches = lambda training, count=num_microbatches: count
        else:
            self.num_microbatches = num_microbatches or megatron_num_microbatches
        self.per_token_loss = per_token_loss
        self._steps: Dict[int, _Step] = {}
        self._gva_counts: Optional[torch.Tensor] = None  # [N_gva, dropped] since the last metrics read

    # ----------------------------------------------------------------- per step
    def _holds_layer(self, model) -> bool:
        return self.tap is not None and self.tap.is_holder(model)

    def _begin_step(self, data_iterator, model) -> _Step:
        """Read the step's micro-batches, count its global denominators (DP all-reduce only)."""
        device = torch.cuda.current_device()
        holds = self._holds_layer(model)
        batches = [next(data_iterator) for _ in range(self.num_microbatches(model.training))]
        if holds and self.online_targets is not None:  # f_GF first: decode failures change N_gva
            for batch in batches:
                batch["arra_targets"], batch["arra_valid"] = self.online_targets(batch["image_bytes"])
        counts = torch.zeros(3, dtype=torch.float64)  # N_tok, N_gva, dropped: counted on the host copy
        for batch in batches:
            counts[0] += batch["loss_mask"].double().sum()
            if holds:
                # P_b: the target's positions, for the samples whose f_GF is valid.
                positions = alignment_mask(batch["labels"], self.image_token_range, self.arra.target)
                aligned = positions
                if "arra_valid" in batch:
                    aligned = positions & batch["arra_valid"].bool().unsqueeze(1)
                num_aligned = num_aligned_samples(aligned)
                counts[1] += num_aligned
                counts[2] += num_aligned_samples(positions) - num_aligned
                batch["arra_weights"] = position_weights(aligned)
        counts = counts.to(device, non_blocking=True)
        torch.distributed.all_reduce(counts, group=parallel_state.get_data_parallel_group())
        dp = parallel_state.get_data_parallel_world_size()
        n_tok = counts[0].clamp(min=1.0)
        # What Megatron divides every gradient by after the schedule (see the module docstring).
        divisor = n_tok if self.per_token_loss else dp
        if holds:
            scale_func = getattr(self.tap.config, "grad_scale_func", None)
            loss_scale = 1.0
            if scale_func is not None and model.training:
                loss_scale = scale_func(torch.ones((), device=device))
            self.tap.begin_step(ARRAStep(counts[1], divisor, loss_scale))
            self._gva_counts = counts[1:] if self._gva_counts is None else self._gva_counts + counts[1:]
        moved = [{k: (v.to(device, non_blocking=True) if k in DEVICE_KEYS or k.startswith("arra_") else v)
                  for k, v in batch.items()} for batch in batches]
        return _Step(moved, len(batches) * dp / n_tok)

    def _next(self, data_iterator, model) -> Tuple[Dict[str, torch.Tensor], _Step]:
        key = id(data_iterator)
        step = self._steps.get(key)
        if step is None:
            step = self._steps[key] = self._begin_step(data_iterator, model)
        batch = step.batches[step.served]
        step.served += 1
        if step.served == len(step.batches):  # the next call on this iterator starts a new step
            del self._steps[key]
        return batch, step

    # ----------------------------------------------------------------- metrics
    def alignment_metrics(self) -> Dict[str, torch.Tensor]:
        """gva loss, gva cos and dropped samples since the last call, identical on every rank.

        Collective: every rank of the model-parallel and data-parallel groups calls it at the
        same point (after a training step's schedule, after an evaluation).
        """
        if self.tap is None:
            return {}
        device = torch.cuda.current_device()
        values = torch.zeros(2, dtype=torch.float64, device=device)  # sum_b L_b, sum_b cos_b
        partial_sums = self.tap.take_sums()
        if partial_sums is not None:
            values += partial_sums.to(device)
        if self.tap.config.sequence_parallel:  # each TP rank saw a slice of the positions
            torch.distributed.all_reduce(values, group=parallel_state.get_tensor_model_parallel_group())
        torch.distributed.all_reduce(values, group=parallel_state.get_data_parallel_group())
        counts = torch.zeros(2, dtype=torch.float64, device=device)  # N_gva, dropped: summed over DP already
        if self._gva_counts is not None:
            counts += self._gva_counts
            self._gva_counts = None
        sums = torch.cat([values, counts])  # only the stage holding layer k has non-zeros
        torch.distributed.all_reduce(sums, group=parallel_state.get_pipeline_model_parallel_group())
        count = sums[2].clamp(min=1.0)
        # Dropped: samples with an image but no usable target (a NaN feature row, an image that
        # did not decode); their L_GVA term is masked.
        return {"gva loss": sums[0] / count, "gva cos": sums[1] / count, "gva dropped samples": sums[3]}

    def end_step(self, losses_reduced: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """Step metrics, identical on every rank: lm loss, (z loss), gva loss, gva cos, loss,
        as 0-d tensors on the device (``read_metrics`` turns them into floats).

        Collective over TP/PP/DP. For callers that run the schedule themselves;
        megatron.training reduces the loss reports on its own.
        """
        sums = torch.zeros(3, dtype=torch.float64, device=torch.cuda.current_device())
        for record in losses_reduced:
            sums[0:2] += record["lm loss"].double().to(sums.device)
            if "z loss" in record:
                sums[2] += record["z loss"][0].double().to(sums.device)
        torch.distributed.all_reduce(sums, group=parallel_state.get_data_parallel_group())
        torch.distributed.all_reduce(sums, group=parallel_state.get_pipeline_model_parallel_group())
        count = sums[1].clamp(min=1.0)
        metrics = {"lm loss": sums[0] / count}
        total = metrics["lm loss"]
        if self.z_loss_weight:
            metrics["z loss"] = sums[2] / count
            total = total + self.z_loss_weight * metrics["z loss"]
        if self.tap is not None:
            metrics.update(self.alignment_metrics())
            total = total + self.arra.weight * metrics["gva loss"]
        metrics["loss"] = total
        return metrics

    # ----------------------------------------------------------------- per micro-batch
    def __call__(self, data_iterator, model):
        if data_iterator is None:  # a pipeline stage that needs no data (megatron.training gives None)
            return model(None, None, None), partial(self.loss_func, None, None, None)
        batch, step = self._next(data_iterator, model)
        want_logits = self.z_loss_weight > 0
        labels = batch["labels"]
        forward = partial(model, batch["tokens"], batch["position_ids"], None, labels=None if want_logits else labels)
        if self._holds_layer(model):
            if "arra_targets" not in batch:
                raise KeyError("ARRA is on but the micro-batch has no 'arra_targets' (f_GF per sample); "
                               "give precomputed targets or an encoder, or turn ARRA off with --no-arra")
            with self.tap.microbatch(AlignmentInputs(batch["arra_weights"], batch["arra_targets"])):
                output = forward()
        else:
            output = forward()
        return output, partial(self.loss_func, batch["loss_mask"].float(), labels if want_logits else None,
                               step.lm_scale)

    def loss_func(self, loss_mask: torch.Tensor, labels: Optional[torch.Tensor], lm_scale: torch.Tensor,
                  output: torch.Tensor):
        """Megatron loss function: (loss to backprop, [num tokens,] reports as [sum, count])."""
        if labels is None:
            token_loss, z = output.float(), None
        else:  # output holds the vocab-parallel logits [b, s, v/tp]
            logits = output.float()
            # Megatron's cross entropy subtracts the max from its input in place: give it a copy.
            token_loss = tensor_parallel.vocab_parallel_cross_entropy(logits.clone(), labels)
            z = vocab_parallel_logsumexp(logits).pow(2)
        lm_sum = (token_loss * loss_mask).sum()
        num_tokens = loss_mask.sum()
        objective = lm_sum
        report = {"lm loss": torch.stack([lm_sum.detach(), num_tokens])}
        if z is not None:
            z_sum = (z * loss_mask).sum()
            objective = objective + self.z_loss_weight * z_sum
            report["z loss"] = torch.stack([z_sum.detach(), num_tokens])
        if self.per_token_loss:
            return objective, num_tokens.int(), report
        return objective * lm_scale.to(objective.dtype), report
