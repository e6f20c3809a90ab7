"""The tap: attaches L_GVA to global layer k of a Megatron-Core GPTModel from outside.

The model is left as it is. A forward hook on the layer whose (global, 1-based)
``layer_number`` is k takes that layer's output h_k, projects the aligned
positions with A_phi, computes this rank's share of sum_b L_b, and attaches it
to h_k with an identity autograd function whose backward adds the L_GVA
gradient -- the device Megatron-Core uses for MoE auxiliary losses on any
pipeline stage. So only the stage that holds layer k computes the loss, on
whichever (virtual) pipeline stage that is.

Dense and sync-free. The projector runs on every position of the micro-batch
and each position's loss is weighted by w_t (0 outside P_b): the same sum as
selecting P_b first, with static shapes and no ``nonzero`` (aligned positions are
most of an image-generation sequence, so the extra projector FLOPs are small).
The step's denominators stay on the device as tensors; nothing here reads a
value back to the host (tests/training/test_sync_free.py counts it).

Scaling. The training objective is L = L_AR + lambda * L_GVA with both terms
normalised over the *global* batch. Megatron multiplies the returned loss by
the loss scale S, and after the schedule divides every gradient by G (the
data-parallel size P, or the global token count with
``--calculate-per-token-loss``). The injected gradient therefore is
``S * lambda * G / N_gva`` per unit of this rank's partial sum, N_gva being the
global number of samples with an image (see ``ARRAStep``).

Activation recomputation. Under full recompute the hook runs twice for a
micro-batch: first inside the no-grad forward, then again during backward. The
loss is attached (and tracked) only in the pass that builds a graph; the
micro-batch inputs seen in the no-grad pass are queued and picked up, in the
same order, by the recompute pass (Megatron's schedules run each model chunk's
backward passes in forward order).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
from typing import Iterator, List, Optional, Sequence, Union

import torch
from megatron.core import parallel_state
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import make_viewless_tensor

from arra_megatron.alignment.loss import position_losses
from arra_megatron.alignment.projector import build_projector
from arra_megatron.config import ARRAConfig


@dataclasses.dataclass(frozen=True)
class ARRAStep:
    """What the tap must know about the current global batch before it runs.

    Attributes:
        num_aligned_samples: N_gva, samples with a non-empty P_b in the *global* batch
            (a number or a 0-d tensor on the device: it is never read back to the host).
        gradient_divisor: G, what Megatron divides every gradient by after the schedule:
            the data-parallel size P (DDP averages), or the global token count N_tok with
            ``--calculate-per-token-loss``.
        loss_scale: S, the fp16 loss scale (1.0 for bf16/fp32; a number or a 0-d tensor).
    """

    num_aligned_samples: Union[int, torch.Tensor]
    gradient_divisor: Union[int, torch.Tensor] = 1
    loss_scale: Union[float, torch.Tensor] = 1.0

    def gradient_scale(self, weight: float) -> torch.Tensor:
        """S * lambda * G / max(N_gva, 1), a 0-d float64 tensor on the device.

        Device tensors stay where they are and numbers enter as Python scalars: making a
        device tensor from a number is a host-to-device copy that waits for the GPU.
        """
        count = self.num_aligned_samples
        if not isinstance(count, torch.Tensor):
            count = torch.tensor(float(count), dtype=torch.float64, device=torch.cuda.current_device())

        def wide(value):
            return value.double().reshape(()) if isinstance(value, torch.Tensor) else float(value)

        return wide(self.loss_scale) * weight * wide(self.gradient_divisor) / count.double().reshape(()).clamp(min=1.0)


@dataclasses.dataclass
class AlignmentInputs:
    """One micro-batch's alignment inputs (full sequence, whatever the parallel layout).

    Attributes:
        weights: [b, s] float, w_t = 1/|P_b| on aligned positions, 0 elsewhere.
        targets: [b, D], f_GF per sample.
    """

    weights: torch.Tensor
    targets: torch.Tensor


class GVAGradInjector(torch.autograd.Function):
    """Identity on the hidden state; its backward also sends ``scale`` into the loss graph."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, loss: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(loss, scale)
        return hidden

    @staticmethod
    def backward(ctx, grad_hidden: torch.Tensor):
        loss, scale = ctx.saved_tensors
        return grad_hidden, scale.to(loss.dtype).expand_as(loss), None


class ARRAModelChunk(MegatronModule):
    """A model chunk with the projector beside it.

    The GPT stays ``self.module`` (so Megatron's ``get_attr_wrapped_model`` finds
    ``set_input_tensor`` and friends) and its state dict keys are untouched; the
    projector's keys live under ``arra_projector.`` in the sharded state dict, and
    it is never part of an exported model. ``projector_in_checkpoint = False`` leaves the
    projector out of what is loaded (fine-tuning from a plain GPT: it keeps its initialisation).
    """

    def __init__(self, gpt: MegatronModule, projector: MegatronModule):
        super().__init__(config=gpt.config)
        self.module = gpt
        self.arra_projector = projector
        self.vp_stage = getattr(gpt, "vp_stage", None)
        self.projector_in_checkpoint = True

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def set_input_tensor(self, input_tensor) -> None:
        self.module.set_input_tensor(input_tensor)

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        state = self.module.state_dict(prefix=prefix, keep_vars=keep_vars)
        state.update(self.arra_projector.state_dict(prefix=f"{prefix}arra_projector.", keep_vars=keep_vars))
        return state

    def load_state_dict(self, state_dict, strict: bool = True):
        ours = {k[len("arra_projector."):]: v for k, v in state_dict.items() if k.startswith("arra_projector.")}
        rest = {k: v for k, v in state_dict.items() if not k.startswith("arra_projector.")}
        model_keys = self.module.load_state_dict(rest, strict=strict)
        if not self.projector_in_checkpoint:
            return model_keys
        projector_keys = self.arra_projector.load_state_dict(ours, strict=strict)
        return torch.nn.modules.module._IncompatibleKeys(
            model_keys.missing_keys + [f"arra_projector.{k}" for k in projector_keys.missing_keys],
            model_keys.unexpected_keys + [f"arra_projector.{k}" for k in projector_keys.unexpected_keys],
        )

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata: Optional[dict] = None):
        state = self.module.sharded_state_dict(prefix, sharded_offsets, metadata)
        if self.projector_in_checkpoint:
            state.update(self.arra_projector.sharded_state_dict(f"{prefix}arra_projector.", (), metadata))
        return state


def find_layer(chunks: Sequence[torch.nn.Module], layer_number: int):
    """(chunk index, layer module) of global layer ``layer_number`` on this rank, or None."""
    for index, chunk in enumerate(chunks):
        decoder = getattr(chunk, "decoder", None)
        for layer in getattr(decoder, "layers", ()):
            if layer.layer_number == layer_number:
                return index, layer
    return None


class ARRATap:
    """Computes L_GVA at layer k and tracks it for logging.

    Usage (training/forward_step.py does all of it)::

        tap.begin_step(ARRAStep(...))          # once per step, before its micro-batches
        with tap.microbatch(AlignmentInputs(weights, targets)):
            output = model(...)                # around each micro-batch's model call
        sums = tap.take_sums()                 # this rank's [sum_b L_b, sum_b cos_b] share, or None
    """

    def __init__(self, arra: ARRAConfig, config, seed: int = 0, te_linear: bool = False):
        self.arra = arra
        self.config = config
        self.seed = seed
        self.te_linear = te_linear  # projector from TE linears (the model uses the TE spec)
        self.layer = None
        self.chunk: Optional[ARRAModelChunk] = None  # this rank's chunk holding layer k
        self.projector: Optional[MegatronModule] = None
        self._handle = None
        self._scale: Optional[torch.Tensor] = None  # the current step's gradient scale (begin_step)
        self._current: Optional[AlignmentInputs] = None
        self._deferred: collections.deque = collections.deque()
        self._sums: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ wiring
    def attach(self, chunks: List[torch.nn.Module]) -> List[torch.nn.Module]:
        """Hook layer k in whichever of this rank's chunks holds it; return the chunk list
        with that chunk wrapped in an ``ARRAModelChunk`` that carries the projector."""
        if self._handle is not None:
            raise RuntimeError("this ARRATap is already attached")
        found = find_layer(chunks, self.arra.align_layer)
        chunks = list(chunks)
        if found is None:
            return chunks
        index, self.layer = found
        self.projector = build_projector(self.arra, self.config, seed=self.seed, te_linear=self.te_linear)
        chunks[index] = self.chunk = ARRAModelChunk(chunks[index], self.projector)
        self._handle = self.layer.register_forward_hook(self._hook)
        return chunks

    @property
    def holds_layer(self) -> bool:
        return self.layer is not None

    @property
    def vp_stage(self) -> Optional[int]:
        """The virtual pipeline stage of the chunk holding layer k (None without VPP or layer k)."""
        return None if self.chunk is None else self.chunk.vp_stage

    def is_holder(self, model: torch.nn.Module) -> bool:
        """Whether ``model`` (a chunk, bare or wrapped in DDP / Float16Module) holds layer k."""
        while model is not None:
            if model is self.chunk and self.chunk is not None:
                return True
            model = getattr(model, "module", None)
        return False

    # ------------------------------------------------------------------ steps
    def begin_step(self, step: ARRAStep) -> None:
        """The scale of the coming micro-batches' L_GVA gradient (sums keep adding up)."""
        self._scale = step.gradient_scale(self.arra.weight)  # once per step, not per micro-batch
        self._deferred.clear()

    @contextlib.contextmanager
    def microbatch(self, inputs: AlignmentInputs) -> Iterator[None]:
        self._current = inputs
        try:
            yield
        finally:
            self._current = None

    def take_sums(self) -> Optional[torch.Tensor]:
        """This rank's share of [sum_b L_b, sum_b mean-cos_b] since the last call (float64,
        on the device), or None when layer k did not run here; the running sums restart."""
        if self._deferred:
            raise RuntimeError(
                f"{len(self._deferred)} recomputed micro-batch(es) never ran their backward pass"
            )
        sums, self._sums = self._sums, None
        return sums

    # ------------------------------------------------------------------ the hook
    def _inputs(self) -> AlignmentInputs:
        if self._scale is None or self._current is None:
            raise RuntimeError(
                "layer k ran without alignment inputs: call ARRATap.begin_step() and run the model "
                "inside ARRATap.microbatch() (training/forward_step.py does both)"
            )
        return self._current

    def _hook(self, module, args, output):
        hidden, context = output if isinstance(output, tuple) else (output, None)
        if torch.is_grad_enabled():
            inputs = self._deferred.popleft() if self._deferred else self._inputs()
            hidden = self._attach(hidden, inputs)
            return (hidden, context) if isinstance(output, tuple) else hidden
        if module.training:  # first pass of a recomputed layer: the loss comes with the recompute
            self._deferred.append(self._inputs())
        else:  # evaluation: the value only
            self._partial_sums(hidden, self._inputs())
        return None

    def _partial_sums(self, hidden: torch.Tensor, inputs: AlignmentInputs):
        """This rank's share of sum_b L_b (with graph) and of sum_b mean-cos_b.

        Dense: A_phi on every position of the local slice [s, b], each loss weighted by
        w_t, which is 0 outside P_b (the weights carry the selection, the shapes are static).
        """
        seq_local, batch = hidden.size(0), hidden.size(1)
        start = 0
        if self.config.sequence_parallel:
            start = parallel_state.get_tensor_model_parallel_rank() * seq_local
        weights = inputs.weights[:, start:start + seq_local].t()  # [s_local, b]
        pred = self.projector(hidden.reshape(seq_local * batch, -1)).view(seq_local, batch, -1)
        losses, cos = position_losses(pred, inputs.targets.unsqueeze(0), self.arra.objective)
        loss_sum = (weights * losses).sum()
        cos_sum = (weights * cos).sum()
        sums = torch.stack([loss_sum.detach(), cos_sum]).double()
        self._sums = sums if self._sums is None else self._sums + sums
        return loss_sum

    def _attach(self, hidden: torch.Tensor, inputs: AlignmentInputs) -> torch.Tensor:
        loss_sum = self._partial_sums(hidden, inputs)
        hidden = GVAGradInjector.apply(hidden, loss_sum, self._scale)
        # The identity comes back as a view of its input; when layer k ends a pipeline stage that
        # view is the stage's output, which Megatron's schedules free early
        # (deallocate_pipeline_outputs) and therefore require to be viewless.
        return make_viewless_tensor(hidden, requires_grad=True, keep_graph=True)
