"""Process groups: torch.distributed + Megatron-Core parallel state, on GPU (NCCL) or CPU (gloo)."""

from __future__ import annotations

import datetime
import os
from typing import Optional

import torch
from megatron.core import parallel_state, tensor_parallel

from arra_megatron.runtime import cpu_mode


def initialize_model_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: Optional[int] = None,
    seed: int = 1234,
    timeout_minutes: float = 10.0,
) -> None:
    """Create the default process group (from torchrun's environment) and Megatron's groups.

    CPU mode is switched on first when no GPU is present (or ARRA_CPU_MODE=1), and
    the backend is gloo there, NCCL otherwise.
    """
    on_cpu = cpu_mode.maybe_enable_cpu_mode()
    if "WORLD_SIZE" not in os.environ:  # a plain `python script.py`: a world of one
        from arra_megatron.runtime.launch import free_port

        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    if not torch.distributed.is_initialized():
        if not on_cpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group(
            backend="gloo" if on_cpu else "nccl",
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    world = torch.distributed.get_world_size()
    model_parallel = tensor_model_parallel_size * pipeline_model_parallel_size
    if world % model_parallel:
        raise ValueError(
            f"world size {world} is not divisible by --tensor-model-parallel-size {tensor_model_parallel_size} "
            f"x --pipeline-model-parallel-size {pipeline_model_parallel_size}"
        )
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_model_parallel() -> None:
    parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
