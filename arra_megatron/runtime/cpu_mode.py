"""CPU mode: run the real Megatron-Core code on CPU processes (gloo backend).

Megatron-Core allocates on ``torch.cuda.current_device()``, writes literal
``device="cuda"`` in its schedules, optimizer and gradient clipping, and keeps
its model-parallel RNG states with the CUDA RNG helpers. CPU mode makes those
assumptions true enough on a machine with no GPU, without touching Megatron's
algorithms:

* ``torch.cuda.current_device()`` returns ``"cpu"``, and a ``TorchFunctionMode``
  rewrites a literal CUDA ``device=`` argument (string, ``torch.device`` or
  index) to CPU and makes ``Tensor.cuda()`` / ``Tensor.pin_memory()`` no-ops;
* the few ``torch.cuda`` calls Megatron makes for streams, events,
  synchronisation and RNG state get CPU stand-ins (the "CUDA" RNG state *is*
  the CPU generator's state, so Megatron's RNG tracker forks it as on GPU);
* ``clip_grads`` asserts ``grad.type() == 'torch.cuda.FloatTensor'``; in CPU
  mode a CPU float tensor reports that name for the no-argument ``type()``.

It is enabled only when no GPU is present (or when ``ARRA_CPU_MODE=1``), and
only on a megatron-core minor version it was tested with.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import types

import torch
from torch.overrides import TorchFunctionMode

from arra_megatron.runtime.capabilities import (
    TESTED_MEGATRON_MINORS,
    has_gpu,
    megatron_core_version,
    megatron_minor,
)

logger = logging.getLogger(__name__)

_STATE = threading.local()
_ENABLED = False
_LOCK = threading.Lock()

_CPU_TYPE_AS_CUDA = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


def _is_cuda_device(device) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, int) and not isinstance(device, bool)


class _CPUDeviceMode(TorchFunctionMode):
    """Maps every CUDA placement request onto the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CPU_TYPE_AS_CUDA.get(name, name)
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class _Stream:
    """Stand-in for ``torch.cuda.Stream``: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None):
        return event or _Event()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _Event:
    """Stand-in for ``torch.cuda.Event``."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other) -> float:
        return 0.0


_DEFAULT_STREAM = _Stream()
#: What CPU mode reports as "the GPU": an architecture (9.0) whose code paths need no GPU feature.
_CPU_DEVICE_PROPERTIES = types.SimpleNamespace(name="CPU (arra_megatron CPU mode)", major=9, minor=0,
                                               total_memory=0, multi_processor_count=1)


def _cpu_rng_get(device="cuda", clone=False, graph_safe=False) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_rng_set(new_state, device=-1, graph_safe=False) -> None:
    torch.set_rng_state(new_state)


def _cpu_manual_seed(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    # "cpu", not an index: Megatron's ``device=torch.cuda.current_device()`` then needs no
    # rewriting, which matters inside autograd backward functions, where a
    # TorchFunctionMode is not active (the mode is popped while it handles
    # ``torch.autograd.backward`` itself).
    cuda.current_device = lambda: "cpu"
    cuda.set_device = lambda device: None
    cuda.Stream = _Stream
    cuda.Event = _Event
    cuda.current_stream = lambda device=None: _DEFAULT_STREAM
    cuda.default_stream = lambda device=None: _DEFAULT_STREAM
    cuda.stream = lambda stream=None: contextlib.nullcontext()
    cuda.synchronize = lambda device=None: None
    cuda.empty_cache = lambda: None
    cuda.get_rng_state = _cpu_rng_get
    cuda.set_rng_state = _cpu_rng_set
    cuda.manual_seed = _cpu_manual_seed
    cuda.manual_seed_all = _cpu_manual_seed
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved"):
        setattr(cuda, name, lambda device=None: 0)
    # Megatron-LM's argument validation reads the GPU architecture (at TP > 1).
    cuda.get_device_properties = lambda device=None: _CPU_DEVICE_PROPERTIES
    cuda.get_device_capability = lambda device=None: (_CPU_DEVICE_PROPERTIES.major, _CPU_DEVICE_PROPERTIES.minor)
    cuda.nvtx.range_push = lambda msg: None
    cuda.nvtx.range_pop = lambda: None


class _DropExpectedRNGWarning(logging.Filter):
    """Megatron warns when the CPU RNG changes inside an RNG-tracker fork; in CPU mode the
    tracked "CUDA" state *is* the CPU state, so that change is the fork working as meant."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "CPU RNG state changed within GPU RNG context"


def _patch_megatron() -> None:
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._get_cuda_rng_state = _cpu_rng_get
    mcore_random._set_cuda_rng_state = _cpu_rng_set
    logging.getLogger(mcore_random.__name__).addFilter(_DropExpectedRNGWarning())


#: TransformerConfig settings CPU mode needs. ``batch_p2p_comm``: Megatron's batched
#: p2p posts send-to-prev before send-to-next, which gloo matches in posting order;
#: with PP=2 (prev == next) and virtual stages an activation and a gradient of the
#: same shape would be swapped silently. The unbatched path orders ops by rank parity.
#: The fusions need CUDA kernels.
CONFIG_SETTINGS = {
    "batch_p2p_comm": False,
    "gradient_accumulation_fusion": False,
    "bias_activation_fusion": False,
    "bias_dropout_fusion": False,
    "apply_rope_fusion": False,
    "masked_softmax_fusion": False,
    "persist_layer_norm": False,
}


def configure(config) -> None:
    """Apply ``CONFIG_SETTINGS`` to a TransformerConfig in CPU mode (logged when changed)."""
    if not _ENABLED:
        return
    for name, value in CONFIG_SETTINGS.items():
        if getattr(config, name, value) != value:
            logger.info("CPU mode: %s=%s -> %s", name, getattr(config, name), value)
            setattr(config, name, value)


def check_megatron_version(version: str | None = None) -> None:
    """Refuse CPU mode on a megatron-core minor version it was not tested with."""
    version = version or megatron_core_version()
    if megatron_minor(version) not in TESTED_MEGATRON_MINORS:
        raise RuntimeError(
            f"arra_megatron's CPU mode was tested with megatron-core {', '.join(TESTED_MEGATRON_MINORS)}.x; "
            f"this environment has megatron-core {version}. Install a tested version "
            f"(pip install 'megatron-core~={TESTED_MEGATRON_MINORS[-1]}.0') or run on a GPU."
        )


def cpu_mode_requested() -> bool:
    """True when CPU mode should be used: forced by ARRA_CPU_MODE=1, or no GPU present."""
    forced = os.environ.get("ARRA_CPU_MODE")
    if forced is not None:
        return forced == "1"
    return not has_gpu()


def is_enabled() -> bool:
    return _ENABLED


def enable_cpu_mode() -> None:
    """Switch this process into CPU mode (idempotent; affects the calling thread's torch mode stack)."""
    global _ENABLED
    with _LOCK:
        if not _ENABLED:
            check_megatron_version()
            _patch_torch_cuda()
            _patch_megatron()
            _ENABLED = True
            logger.info("CPU mode on: megatron-core %s runs on CPU processes", megatron_core_version())
    if not getattr(_STATE, "mode", None):
        _STATE.mode = _CPUDeviceMode()
        _STATE.mode.__enter__()


@contextlib.contextmanager
def as_if_enabled():
    """Within: what argument parsing reads of CPU mode (its flag defaults, the stand-in GPU
    architecture Megatron's validation asks for) without switching this process into CPU mode,
    whose device mode would change how later torch code in the process runs (e.g. it turns off
    nn.MultiheadAttention's fast path). For tools that only parse a run's arguments."""
    if _ENABLED or not cpu_mode_requested():
        yield
        return
    cuda = torch.cuda
    saved = (cuda.get_device_properties, cuda.get_device_capability)
    global is_enabled
    saved_is_enabled = is_enabled
    cuda.get_device_properties = lambda device=None: _CPU_DEVICE_PROPERTIES
    cuda.get_device_capability = lambda device=None: (_CPU_DEVICE_PROPERTIES.major, _CPU_DEVICE_PROPERTIES.minor)
    is_enabled = lambda: True  # noqa: E731
    try:
        yield
    finally:
        cuda.get_device_properties, cuda.get_device_capability = saved
        is_enabled = saved_is_enabled


def maybe_enable_cpu_mode() -> bool:
    """Enable CPU mode when it is requested or no GPU is present; return whether it is on."""
    if cpu_mode_requested():
        enable_cpu_mode()
    return _ENABLED
