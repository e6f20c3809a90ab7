"""ARRA adds no host-device synchronisation to a training step (issue 12, point 4).

The profiler counts scalar reads and data-dependent shapes in one step (the schedule
with the step's begin and end) with ARRA off and on; the counts must be equal. The
metrics come back as device tensors, read only when logged.
"""

from __future__ import annotations

import pytest

from arra_megatron.runtime.launch import run_workers
from tests.training import sync_worker


@pytest.mark.parametrize("tp,sp", [(1, False), (2, True)], ids=["tp1", "tp2-sp"])
def test_arra_adds_no_synchronisation(tp, sp):
    result = run_workers(sync_worker.run, tp, tp, sp)[0]
    off = result["off"]["counts"]
    for variant in ("on", "on rep mse"):
        assert result[variant]["counts"] == off, (variant, result)
    for variant in result.values():
        assert variant["metric types"] == ["Tensor"]


def test_the_count_sees_a_scalar_read():
    """The counter is not blind: a step whose forward reads a scalar shows up."""
    result = run_workers(_read_scalar_worker, 1)[0]
    assert result.get("aten::_local_scalar_dense", 0) >= 1, result


def _read_scalar_worker() -> dict:
    from arra_megatron import tiny
    from arra_megatron.config import ARRAConfig
    from arra_megatron.runtime.distributed import initialize_model_parallel
    from arra_megatron.training.step_runner import build_runner

    initialize_model_parallel(1, 1)
    runner = build_runner(tiny.tiny_config(), ARRAConfig(target_dim=16), sync_worker.SEQ, micro_batch_size=2,
                          global_batch=4, num_image_tokens=16, image_range=tiny.IMAGE_TOKEN_RANGE)
    step = runner.step

    def reading_step(data_iterator, model):
        output, loss_func = step(data_iterator, model)
        float(output.sum())  # a scalar read, as the step had before it went sync-free
        return output, loss_func

    runner.step = _Wrapped(step, reading_step)
    return sync_worker.count_syncs(runner)["counts"]


class _Wrapped:
    def __init__(self, step, call):
        self._step, self._call = step, call

    def __call__(self, data_iterator, model):
        return self._call(data_iterator, model)

    def __getattr__(self, name):
        return getattr(self._step, name)
