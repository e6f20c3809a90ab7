"""What this process can use: GPU, Transformer Engine, apex, DALI GPU decode.

Every optional accelerator path in the project asks here, so a missing
library produces one clear message instead of an ImportError deep inside a
training step.

Two environment variables, two questions:

* ``ARRA_FORCE_CPU=1`` answers "is there a GPU?" with no (``has_gpu``): every check
  here (Transformer Engine, apex, DALI GPU decoding, FP8), ``--device auto`` and the
  GPU-only tests then see a CPU-only machine. With ``ARRA_CPU_MODE`` unset, CPU mode
  follows (it turns on where there is no GPU).
* ``ARRA_CPU_MODE=1|0`` (``runtime/cpu_mode.py``) answers "does Megatron run in CPU
  mode?" (gloo, local layers, CUDA devices rewritten to the CPU in that process) and nothing
  else: ``has_gpu()`` still says yes on a GPU machine. Unset, CPU mode is on exactly when
  ``has_gpu()`` is False.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

#: megatron-core minor versions whose CUDA assumptions the CPU mode was
#: written against and tested on. Others are refused (see cpu_mode.py).
TESTED_MEGATRON_MINORS = ("0.19",)


@functools.cache
def has_gpu() -> bool:
    """A usable CUDA device (not merely a CUDA build of torch); False under ``ARRA_FORCE_CPU=1``."""
    if os.environ.get("ARRA_FORCE_CPU", "0") == "1":
        return False
    try:
        return torch.cuda.is_available() and torch.cuda.device_count() > 0
    except RuntimeError:
        return False


def resolve_device(name: str, flag: str = "--device", local_rank: int | None = None) -> str:
    """A ``--device`` value made concrete: ``auto`` is CUDA when a GPU is usable, else CPU;
    ``cuda``/``cuda:N`` without a usable GPU is refused with the flag named. With ``local_rank``
    (one process per GPU: torchrun's LOCAL_RANK) a plain ``cuda`` becomes that process's GPU."""
    if name == "auto":
        name = "cuda" if has_gpu() else "cpu"
    if name.startswith("cuda") and not has_gpu():
        raise ValueError(f"{flag} {name} but no CUDA device is visible")
    if name == "cuda" and local_rank is not None:
        return f"cuda:{local_rank % torch.cuda.device_count()}"
    return name


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


@functools.cache
def has_transformer_engine() -> bool:
    """Transformer Engine is importable *and* a GPU is present to run it."""
    if not (has_gpu() and _importable("transformer_engine")):
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # a broken TE install must not take the CPU path down
        return False
    return True


@functools.cache
def has_apex() -> bool:
    return has_gpu() and _importable("apex")


@functools.cache
def has_dali_gpu() -> bool:
    return has_gpu() and _importable("nvidia.dali")


def megatron_core_version() -> str:
    from megatron.core import package_info

    return package_info.__version__


def megatron_minor(version: str | None = None) -> str:
    version = version or megatron_core_version()
    return ".".join(version.split(".")[:2])


def require_fp8_support(flag: str = "--fp8-format", recipe: str = "delayed") -> None:
    """Fail before any work when FP8 is asked for but cannot run on this GPU.

    Transformer Engine's own check decides (FP8 needs compute capability 8.9+, i.e.
    Ada/Hopper; MXFP8 needs Blackwell).
    """
    if not has_gpu():
        raise RuntimeError(f"{flag} needs a CUDA GPU; none is available. Drop {flag} to train in bf16/fp32.")
    if not has_transformer_engine():
        raise RuntimeError(
            f"{flag} needs Transformer Engine (pip install 'arra-megatron[gpu]' or an NGC PyTorch "
            f"container); it is not importable. Drop {flag} to train in bf16/fp32."
        )
    import transformer_engine.pytorch as te

    checks = {"mxfp8": "is_mxfp8_available"}
    available = getattr(te, checks.get(recipe, "is_fp8_available"))
    ok, reason = available(return_reason=True)
    if not ok:
        name = torch.cuda.get_device_name()
        raise RuntimeError(f"{flag} with --fp8-recipe {recipe} cannot run on this {name}: {reason}. "
                           f"Use another --fp8-recipe or drop {flag}.")


@functools.cache
def has_dali() -> bool:
    """nvidia-dali is importable; its CPU backend (decode, resize) needs no GPU."""
    return _importable("nvidia.dali")
