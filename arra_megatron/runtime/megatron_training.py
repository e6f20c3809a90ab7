"""What ``megatron.training`` (Megatron-LM's own loop, shipped in the megatron-core wheel)
needs to run here. Each patch names the place in megatron-core 0.19 and the reason; they are
installed once, by ``install()``, and only on a tested megatron-core minor version.

Any machine:

* ``initialize.py::_compile_dependencies`` runs ``make`` in ``megatron/core/datasets`` to build
  the dataset helpers; the wheel ships them compiled (``helpers_cpp``) but not the Makefile, so
  ``make`` fails and the job exits. Compile only when the compiled module does not import.
* ``checkpointing.py::save_checkpoint``: the dist-checkpoint writer
  (``dist_checkpointing/strategies/filesystem_async.py``) starts a multiprocessing manager
  process for its results queue. If the rank is killed, that manager (and the resource tracker
  beside it) outlives it, keeping the job's output open (``torchrun ... | tee log`` never ends)
  and its memory. Before the first save the queue's manager is started here, on Linux, with a
  parent-death signal.

CPU mode only (``runtime/cpu_mode.py`` covers every other CUDA call the loop makes):

* ``training.py::pretrain`` calls ``initialize_megatron`` without ``allow_no_cuda``, which then
  asserts ``torch.cuda.is_available()``.
* ``initialize.py::_initialize_distributed`` builds the model-parallel groups, and
  ``_set_random_seed`` the model-parallel RNG tracker, only when
  ``torch.cuda.device_count() > 0``: both run with one (CPU-mode) device.
* ``training.py::pretrain`` builds the data iterators after the checkpoint restored the RNG
  states, and Megatron's DataLoader (``datasets/data_samplers.py``, no generator of its own)
  draws its base seed from torch's default generator. In CPU mode that generator is also
  dropout's, so a resumed run's dropout masks moved by one draw: its state is kept around it.
* Argument validation reads the GPU architecture (``get_device_properties``, stood in by CPU
  mode) and, at TP > 1, asserts ``CUDA_DEVICE_MAX_CONNECTIONS=1`` (set; meaningless on CPU).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os

import torch

from arra_megatron.runtime import cpu_mode

_MARK = "_arra_patched"


def _once(module, name: str, make) -> None:
    original = getattr(module, name)
    if getattr(original, _MARK, False):
        return
    patched = make(original)
    setattr(patched, _MARK, True)
    setattr(module, name, patched)


def _compile_helpers_when_missing(original):
    def compile_helpers():
        try:
            importlib.import_module("megatron.core.datasets.helpers_cpp")  # shipped compiled
        except ImportError:
            original()
    return compile_helpers


@contextlib.contextmanager
def _one_cuda_device():
    saved = torch.cuda.device_count
    torch.cuda.device_count = lambda: 1
    try:
        yield
    finally:
        torch.cuda.device_count = saved


def _with_one_cuda_device(original):
    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        with _one_cuda_device():
            return original(*args, **kwargs)
    return wrapper


def _keeping_rng_state(original):
    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        state = torch.get_rng_state()
        try:
            return original(*args, **kwargs)
        finally:
            torch.set_rng_state(state)
    return wrapper


def _die_with_parent() -> None:
    """Runs in the checkpoint writer's manager process: exit when the rank that started it dies."""
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _start_writer_queue() -> None:
    import multiprocessing
    import multiprocessing.managers
    import sys

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if sys.platform != "linux" or filesystem_async._results_queue is not None:
        return
    manager = multiprocessing.managers.SyncManager(ctx=multiprocessing.get_context("spawn"))
    manager.start(initializer=_die_with_parent)
    filesystem_async._results_queue = manager.Queue()
    _start_writer_queue.manager = manager  # kept alive with the rank


def _writer_queue_first(original):
    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        _start_writer_queue()
        return original(*args, **kwargs)
    return wrapper


def install() -> None:
    """Patch megatron.training for this machine (idempotent). Call before ``pretrain``."""
    cpu_mode.check_megatron_version()
    import megatron.core.datasets.utils as dataset_utils
    import megatron.training.initialize as initialize
    import megatron.training.training as training

    _once(dataset_utils, "compile_helpers", _compile_helpers_when_missing)
    _once(training, "save_checkpoint", _writer_queue_first)
    if not cpu_mode.is_enabled():
        return
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    _once(training, "initialize_megatron", lambda original: functools.partial(original, allow_no_cuda=True))
    _once(initialize, "_initialize_distributed", _with_one_cuda_device)
    _once(initialize, "_set_random_seed", _with_one_cuda_device)
    _once(training, "build_train_valid_test_data_iterators", _keeping_rng_state)
