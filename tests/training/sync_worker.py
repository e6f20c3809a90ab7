"""Worker: host-device synchronisations of one training step, ARRA on and off."""

from __future__ import annotations

import collections

from torch.profiler import ProfilerActivity, profile

from arra_megatron import tiny
from arra_megatron.config import ARRAConfig
from arra_megatron.runtime.distributed import initialize_model_parallel
from arra_megatron.training.step_runner import build_runner

SEQ = 32
#: Ops that make the host wait for the device: a scalar read (``.item()``, ``int()``,
#: ``float()``, a Python ``if`` on a tensor) and the data-dependent shapes of
#: ``nonzero`` (boolean-mask indexing, ``masked_select``).
SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::item")


def count_syncs(runner) -> dict:
    """Sync ops in one step (the schedule and the step's metrics as tensors), metrics not read."""
    runner.step.end_step(_schedule(runner))  # warm-up, outside the count
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        metrics = runner.step.end_step(_schedule(runner))
    counts = collections.Counter(e.name for e in prof.events() if e.name in SYNC_OPS)
    return {"counts": dict(counts), "metric types": sorted({type(v).__name__ for v in metrics.values()})}


def _schedule(runner):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for chunk in runner.bundle.chunks:
        chunk.zero_grad_buffer()
    return get_forward_backward_func()(
        forward_step_func=runner.step, data_iterator=iter(runner.microbatches), model=runner.bundle.chunks,
        num_microbatches=len(runner.microbatches), seq_length=runner.seq_length,
        micro_batch_size=runner.micro_batch_size, forward_only=False)


def run(tp: int, sequence_parallel: bool) -> dict:
    initialize_model_parallel(tp, 1)
    out = {}
    for name, arra in (("off", ARRAConfig(enabled=False)), ("on", ARRAConfig(target_dim=16)),
                       ("on rep mse", ARRAConfig(target_dim=16, target="rep", objective="mse"))):
        config = tiny.tiny_config(tensor_model_parallel_size=tp, sequence_parallel=sequence_parallel)
        runner = build_runner(config, arra, SEQ, micro_batch_size=2, global_batch=8, num_image_tokens=16,
                              image_range=tiny.IMAGE_TOKEN_RANGE)
        out[name] = count_syncs(runner)
    return out
