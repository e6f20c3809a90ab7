"""CPU mode: real Megatron-Core on CPU processes, on a tested megatron-core minor version only."""

from __future__ import annotations

import pytest

from arra_megatron.runtime import cpu_mode
from arra_megatron.runtime.launch import run_workers
from tests.runtime import cpu_worker


def test_refuses_untested_megatron_version():
    with pytest.raises(RuntimeError, match=r"tested with megatron-core 0\.19\.x; this environment has megatron-core 0\.20\.1"):
        cpu_mode.check_megatron_version("0.20.1")
    cpu_mode.check_megatron_version("0.19.7")


def test_cuda_placements_land_on_cpu():
    r = run_workers(cpu_worker.device_rewrites, 1)[0]
    assert r["devices"] == ["cpu"] * 4
    assert r["current_device"] == "cpu"
    assert r["type"] == "torch.cuda.FloatTensor"  # what Megatron's clip_grads asserts
    assert r["dtype_to_kept"] == "torch.float64"


def test_rng_tracker_forks_the_cpu_generator():
    r = run_workers(cpu_worker.rng_tracker, 1)[0]
    assert r["restored"] and r["deterministic"]


def test_cpu_spec_attention_equals_megatron_attention():
    r = run_workers(cpu_worker.sdpa_matches_megatron_attention, 1)[0]
    assert r["backend"] == "cpu"
    assert r["core_attention"] == "SDPADotProductAttention"
    assert r["norm"] == "TorchNorm"
    assert r["max_diff"] < 1e-5


def test_te_spec_needs_transformer_engine():
    from arra_megatron.models.specs import get_decoder_block_spec
    from arra_megatron.runtime.capabilities import has_transformer_engine

    if has_transformer_engine():
        pytest.skip("Transformer Engine is available here")
    with pytest.raises(RuntimeError, match="needs Transformer Engine and a GPU"):
        get_decoder_block_spec(object(), backend="te")
