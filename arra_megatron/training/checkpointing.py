"""Megatron-Core dist checkpointing of model chunks (and the ARRA projector beside them).

The sharded state dict holds one entry per model chunk (``model`` or ``model0``,
``model1``, ... under virtual pipeline), as Megatron-LM writes them; tensor keys
are global, so a checkpoint saved in one TP / PP / VPP layout loads into any other.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Dict, List, Optional, Tuple

import torch
from megatron.core import dist_checkpointing

from arra_megatron.fileio import write_json_atomic

logger = logging.getLogger(__name__)


def _unwrap_ddp(chunk: torch.nn.Module) -> torch.nn.Module:
    from megatron.core.distributed import DistributedDataParallel

    return chunk.module if isinstance(chunk, DistributedDataParallel) else chunk


def model_sharded_state_dict(chunks: List[torch.nn.Module]) -> Dict[str, dict]:
    modules = [_unwrap_ddp(c) for c in chunks]
    if len(modules) == 1:
        return {"model": modules[0].sharded_state_dict()}
    return {f"model{i}": m.sharded_state_dict() for i, m in enumerate(modules)}


def save_model_weights(chunks: List[torch.nn.Module], checkpoint_dir: str) -> None:
    """Save the model chunks' weights (projector included) with dist checkpointing. Collective."""
    dist_checkpointing.save(model_sharded_state_dict(chunks), checkpoint_dir)


def load_model_weights(chunks: List[torch.nn.Module], checkpoint_dir: str) -> None:
    """Load weights saved in any parallel layout into this layout's chunks. Collective.

    Only Megatron's ``_extra_state`` entries (FP8 metadata, absent for non-TE
    layers) may be missing; any other missing or unexpected key is an error.
    """
    sharded = model_sharded_state_dict(chunks)
    loaded = _load_without_te_extra_state(sharded, checkpoint_dir, list(sharded))
    for key, chunk in zip(sharded, chunks):
        _load_chunk(chunk, loaded[key], checkpoint_dir)


def _load_without_te_extra_state(sharded: dict, checkpoint_dir: str, model_keys) -> dict:
    """``dist_checkpointing.load`` of everything but the model's ``_extra_state`` entries.

    Transformer Engine keeps FP8 delayed-scaling state (scales, amax history) there as
    a Python pickle, and loading a pickle can execute code from the checkpoint; TE
    itself refuses unless NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE=1. The other recipes
    (tensorwise, mxfp8) keep no state, and non-TE modules have none. So it is never
    read: after a resume, delayed scaling rebuilds its amax history within
    ``--fp8-amax-history-len`` steps.
    """
    for key in model_keys:
        sharded[key] = {k: v for k, v in sharded[key].items() if not k.endswith("_extra_state")}
    return dist_checkpointing.load(sharded, checkpoint_dir)


def _load_chunk(chunk: torch.nn.Module, state: dict, checkpoint_dir: str,
                allow_missing_projector: bool = False) -> None:
    from megatron.core.transformer.module import Float16Module

    module = _unwrap_ddp(chunk)
    if isinstance(module, Float16Module):  # its load_state_dict returns nothing: load into the inner module
        module = module.module
    result = module.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")
               and not (allow_missing_projector and k.startswith("arra_projector."))]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"checkpoint {checkpoint_dir} does not fit the model: missing {missing}, "
            f"unexpected {list(result.unexpected_keys)}"
        )


# ---------------------------------------------------------------------------- training checkpoints
TRACKER_FILE = "latest_checkpointed_iteration.txt"  # Megatron-LM's name; written last
COMPLETE_FILE = "arra_complete.json"  # inside an iteration directory, once every rank has saved


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def _layout() -> dict:
    from megatron.core import parallel_state as ps

    return {
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(),
        "vpp": ps.get_virtual_pipeline_model_parallel_world_size(),
    }


def _rng_object():
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    state = {"torch": torch.get_rng_state(), "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    shape = (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size(),
             ps.get_data_parallel_world_size())
    offset = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
              ps.get_data_parallel_rank())
    return ShardedObject("rng_state", state, shape, offset, replica_id=0)


def _optimizer_metadata(optimizer) -> dict:
    # Fully reshardable: a distributed-optimizer checkpoint loads into another TP / PP / DP layout.
    return {"distrib_optim_sharding_type": "fully_reshardable"}


def training_state_dict(chunks, optimizer, scheduler, iteration: int, consumed_samples: int,
                        args: Optional[dict], is_loading: bool = False, with_rng: bool = True,
                        with_optimizer: bool = True) -> dict:
    state = model_sharded_state_dict(chunks)
    if with_optimizer and optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(dict(state), is_loading=is_loading,
                                                          metadata=_optimizer_metadata(optimizer))
    if scheduler is not None:
        state["opt_param_scheduler"] = scheduler.state_dict()
    state.update(iteration=iteration, consumed_samples=consumed_samples, layout=_layout(),
                 args=args or {})
    if with_rng:
        state["rng_state"] = _rng_object()
    return state


def _die_with_parent() -> None:
    """Runs in Megatron's checkpoint-writer manager process: exit when the trainer dies."""
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _install_writer_queue() -> None:
    """Megatron's dist-checkpoint writer starts a multiprocessing manager process once per
    trainer process. If a rank is killed, that manager outlives it, keeping the job's
    stdout open (``torchrun ... | tee log`` then never ends) and its memory. Start it
    ourselves, on Linux, with a parent-death signal, and hand Megatron its queue."""
    import multiprocessing
    import multiprocessing.managers
    import sys

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if sys.platform != "linux" or filesystem_async._results_queue is not None:
        return
    manager = multiprocessing.managers.SyncManager(ctx=multiprocessing.get_context("spawn"))
    manager.start(initializer=_die_with_parent)
    filesystem_async._results_queue = manager.Queue()
    _install_writer_queue.manager = manager  # keep it alive with the trainer


def save_checkpoint(root: str, iteration: int, consumed_samples: int, chunks, optimizer, scheduler,
                    args: dict) -> str:
    """Save everything needed to resume. Collective. The checkpoint counts only once
    ``arra_complete.json`` and then the tracker file are written, after every rank saved."""
    path = iteration_dir(root, iteration)
    rank = torch.distributed.get_rank()
    if rank == 0:
        os.makedirs(path, exist_ok=True)
    torch.distributed.barrier()
    state = training_state_dict(chunks, optimizer, scheduler, iteration, consumed_samples, args)
    _install_writer_queue()
    dist_checkpointing.save(state, path)
    torch.distributed.barrier()
    if rank == 0:
        write_json_atomic(os.path.join(path, COMPLETE_FILE),
                          {"iteration": iteration, "consumed_samples": consumed_samples, "layout": _layout()})
        write_json_atomic(os.path.join(root, TRACKER_FILE), iteration)  # the bare number, as Megatron-LM
    torch.distributed.barrier()
    return path


def find_latest_checkpoint(root: str) -> Optional[Tuple[int, str]]:
    """The newest *complete* checkpoint under ``root`` as (iteration, path), or None.

    Iteration directories without the completion marker (a save interrupted by a
    crash) are skipped with a warning.
    """
    found = []
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        match = re.fullmatch(r"iter_(\d+)", name)
        if not match:
            continue
        path = os.path.join(root, name)
        if os.path.isfile(os.path.join(path, COMPLETE_FILE)):
            found.append((int(match.group(1)), path))
        else:
            logger.warning("ignoring incomplete checkpoint %s (no %s: the save did not finish)", path, COMPLETE_FILE)
    return max(found) if found else None


def load_checkpoint(root: str, chunks, optimizer, scheduler, finetune: bool = False,
                    load_optimizer: bool = True, load_rng: bool = True) -> Tuple[int, int]:
    """Load the newest complete checkpoint under ``root`` (or ``root`` itself when it is
    one). Returns (iteration, consumed_samples); (0, 0) with ``finetune`` (weights only).

    The model, projector and optimizer reshard to this run's TP / PP / DP layout; the
    per-rank RNG states are restored only when the layout is the one that saved them.
    """
    if os.path.isfile(os.path.join(root, COMPLETE_FILE)):
        path = root
    else:
        latest = find_latest_checkpoint(root)
        if latest is None:
            if finetune:
                raise FileNotFoundError(f"--load {root}: no complete checkpoint there to fine-tune from")
            # As Megatron-LM: the first job of a resubmitted command starts from scratch.
            logger.warning("--load %s: no complete checkpoint yet; starting from scratch", root)
            return 0, 0
        path = latest[1]
    common = dist_checkpointing.load_common_state_dict(path)
    same_layout = common.get("layout") == _layout()
    if load_rng and not same_layout and not finetune:
        logger.warning("checkpoint %s was saved with layout %s, this run is %s: RNG states not restored",
                       path, common.get("layout"), _layout())
    weights_only = finetune
    state = training_state_dict(
        chunks, optimizer, None if weights_only else scheduler, 0, 0, None, is_loading=True,
        with_rng=load_rng and same_layout and not weights_only,
        with_optimizer=load_optimizer and not weights_only,
    )
    for key in ("iteration", "consumed_samples", "layout", "args"):
        state.pop(key)
    if weights_only:
        state.pop("opt_param_scheduler", None)
    fresh_projector = False
    if weights_only and not any(k.startswith("arra_projector.") for k in dist_checkpointing.load_tensors_metadata(path)):
        # A plain GPT (an imported Hugging Face model, a --no-arra run): the projector starts fresh.
        for key in model_sharded_state_dict(chunks):
            state[key] = {k: v for k, v in state[key].items() if not k.startswith("arra_projector.")}
        fresh_projector = True
        logger.info("%s has no ARRA projector: it starts from its initialisation", path)
    model_keys = [k for k in model_sharded_state_dict(chunks)]
    loaded = _load_without_te_extra_state(state, path, model_keys)
    for key, chunk in zip(model_keys, chunks):
        _load_chunk(chunk, loaded[key], path, allow_missing_projector=fresh_projector)
    # dist_checkpointing.load also returns the checkpoint's common (non-tensor) entries,
    # asked for or not: restore only what this load asked for.
    if "optimizer" in state:
        optimizer.load_state_dict(loaded["optimizer"])
    if "opt_param_scheduler" in state and scheduler is not None:
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if "rng_state" in state:
        from megatron.core import tensor_parallel

        rng = loaded["rng_state"]
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        tensor_parallel.get_cuda_rng_tracker().set_states(rng["tracker"])
    logger.info("loaded checkpoint %s (iteration %s)", path, common.get("iteration"))
    if weights_only:
        return 0, 0
    return int(common["iteration"]), int(common["consumed_samples"])
