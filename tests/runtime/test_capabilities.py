"""runtime/capabilities.resolve_device: the one place a --device value becomes concrete."""

import pytest

from arra_megatron.runtime import capabilities
from arra_megatron.runtime.capabilities import resolve_device


@pytest.mark.parametrize("gpu", [False, True])
def test_auto_follows_the_gpu_and_explicit_values_pass_through(monkeypatch, gpu):
    monkeypatch.setattr(capabilities, "has_gpu", lambda: gpu)
    assert resolve_device("auto") == ("cuda" if gpu else "cpu")
    assert resolve_device("cpu") == "cpu"
    if gpu:
        assert resolve_device("cuda:1") == "cuda:1"


def test_cuda_without_a_gpu_is_refused_naming_the_flag(monkeypatch):
    monkeypatch.setattr(capabilities, "has_gpu", lambda: False)
    with pytest.raises(ValueError, match=r"--encoder-device cuda:0 but no CUDA device is visible"):
        resolve_device("cuda:0", flag="--encoder-device")


def test_arra_force_cpu_hides_a_gpu(monkeypatch):
    monkeypatch.setenv("ARRA_FORCE_CPU", "1")
    capabilities.has_gpu.cache_clear()
    try:
        assert resolve_device("auto") == "cpu"
    finally:
        capabilities.has_gpu.cache_clear()
