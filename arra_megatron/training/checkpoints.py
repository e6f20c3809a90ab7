"""Megatron-LM checkpoints as the tools outside the training loop read and write them.

Training writes them with ``megatron.training`` (``--save``, ``--ckpt-format torch_dist``):
``ROOT/latest_checkpointed_iteration.txt`` (an iteration number, or ``release``) names
``ROOT/iter_NNNNNNN/`` (or ``ROOT/release/``), a Megatron-Core dist checkpoint whose common
state holds Megatron-LM's ``args`` namespace, the one description of the model, and whose
tensors are the model chunks under ``model`` (``model0``, ``model1``, ... with virtual
pipeline stages), the ARRA projector under ``arra_projector.``, then the optimizer.

This module owns that layout for conversion, sampling and the tests: which directory a
``--load`` names, the saved arguments, the model's tensors read into or written from
chunks of any TP / PP layout (dist checkpoints reshard). Checkpoints written by this
project before it trained through Megatron-LM's loop (``arra_complete.json`` in the
iteration directory) are recognised and refused with the command that converts them.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Dict, List

import torch
from megatron.core import dist_checkpointing

logger = logging.getLogger(__name__)

TRACKER_FILE = "latest_checkpointed_iteration.txt"   # megatron.training.checkpointing's name
LEGACY_MARKER = "arra_complete.json"                 # this project's own layout before Megatron-LM's loop
CHECKPOINT_VERSION = 3.0                            # megatron.training's generate_state_dict
# Beside a checkpoint imported from Hugging Face (ROOT/, next to the tracker file): the import record
# (source, trainer flags, a family's extras) and the source model's tokenizer files.
IMPORT_RECORD_FILE = "arra_conversion.json"
HF_TOKENIZER_DIR = "hf_tokenizer"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used as asked; the message says what to do."""


def _is_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "metadata.json"))


def legacy_message(path: str) -> str:
    return (f"{path} was written by arra_megatron's own trainer, before training moved onto Megatron-LM's loop; "
            f"convert it once with: python tools/convert_checkpoint.py legacy --load {os.path.dirname(path)} "
            "--save NEW_DIR")


def resolve(load: str) -> str:
    """The iteration directory ``--load`` names: ``load`` itself when it is one, else the one
    Megatron-LM's tracker file points to."""
    if _is_checkpoint(load):
        path = load
    else:
        tracker = os.path.join(load, TRACKER_FILE)
        if not os.path.isfile(tracker):
            raise CheckpointError(f"--load {load}: no checkpoint there (no {TRACKER_FILE} and no metadata.json)")
        with open(tracker, encoding="utf-8") as f:
            text = f.read().strip()
        name = "release" if text == "release" else f"iter_{int(text):07d}"
        path = os.path.join(load, name)
        if not _is_checkpoint(path):
            raise CheckpointError(f"--load {load}: {TRACKER_FILE} names {name}, which holds no checkpoint")
    if os.path.isfile(os.path.join(path, LEGACY_MARKER)):
        raise CheckpointError(legacy_message(path))
    return path


def common_state(path: str) -> dict:
    """The checkpoint's non-tensor entries (Megatron-Core reads them with ``weights_only``)."""
    return dist_checkpointing.load_common_state_dict(path)


def saved_args(path: str) -> argparse.Namespace:
    """The Megatron-LM arguments the checkpoint at ``path`` (an iteration directory) was saved with."""
    args = common_state(path).get("args")
    if isinstance(args, dict):
        raise CheckpointError(legacy_message(path))
    if not isinstance(args, argparse.Namespace):
        raise CheckpointError(f"{path}: the checkpoint records no Megatron-LM arguments")
    return args


def has_projector(path: str) -> bool:
    return any(key.startswith("arra_projector.") for key in dist_checkpointing.load_tensors_metadata(path))


def padded_vocab_rows(path: str) -> int:
    """Rows of the checkpoint's embedding (the vocabulary padded by the TP size it trained with)."""
    return int(dist_checkpointing.load_tensors_metadata(path)["embedding.word_embeddings.weight"].global_shape[0])


# ----------------------------------------------------------------------------- model tensors
def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.transformer.module import Float16Module

    if isinstance(chunk, DistributedDataParallel):
        chunk = chunk.module
    return chunk.module if isinstance(chunk, Float16Module) else chunk


def model_sharded_state_dict(chunks: List[torch.nn.Module]) -> Dict[str, dict]:
    """Megatron-LM's model entries: ``model``, or ``model0``, ``model1``, ... per virtual stage."""
    modules = [_unwrap(chunk) for chunk in chunks]
    if len(modules) == 1:
        return {"model": modules[0].sharded_state_dict()}
    return {f"model{i}": module.sharded_state_dict() for i, module in enumerate(modules)}


def save_model(chunks: List[torch.nn.Module], root: str, args: argparse.Namespace, iteration: int = 0,
               release: bool = True, sharded_strategy=None) -> str:
    """A Megatron-LM checkpoint of the model alone (no optimizer, no RNG): ``ROOT/release`` by
    default, the form Megatron-LM's converters write (``--load`` starts from it at iteration 0,
    with a fresh optimizer). Collective over every rank; rank 0 writes the tracker last."""
    name = "release" if release else f"iter_{iteration:07d}"
    path = os.path.join(root, name)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if rank == 0:
        os.makedirs(path, exist_ok=True)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    state = model_sharded_state_dict(chunks)
    state.update(args=args, checkpoint_version=CHECKPOINT_VERSION, iteration=iteration,
                 num_floating_point_operations_so_far=0)
    dist_checkpointing.save(state, path, sharded_strategy=sharded_strategy)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    if rank == 0:
        from arra_megatron.fileio import write_text_atomic

        write_text_atomic(os.path.join(root, TRACKER_FILE), "release" if release else str(iteration))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return path


def load_model(chunks: List[torch.nn.Module], path: str, projector: bool = True) -> None:
    """Read the model's tensors of checkpoint ``path`` into this layout's chunks (collective).

    Only the model is requested (not the optimizer). ``projector=False`` leaves an ARRA
    projector at its initialisation (a plain GPT checkpoint). Transformer Engine's
    ``_extra_state`` (FP8 scaling history, a pickle) is never read: loading a pickle can run
    code from the file; delayed scaling rebuilds its history within ``--fp8-amax-history-len``
    steps. Any other missing or unexpected tensor is an error.
    """
    sharded = model_sharded_state_dict(chunks)
    for key in sharded:
        sharded[key] = {name: value for name, value in sharded[key].items() if not name.endswith("_extra_state")
                        and (projector or not name.startswith("arra_projector."))}
    loaded = dist_checkpointing.load(sharded, path)
    for key, chunk in zip(sharded, chunks):
        result = _unwrap(chunk).load_state_dict(loaded[key], strict=False)
        missing = [name for name in result.missing_keys if not name.endswith("_extra_state")
                   and (projector or not name.startswith("arra_projector."))]
        if missing or result.unexpected_keys:
            raise CheckpointError(f"checkpoint {path} does not fit the model: missing {missing}, "
                                  f"unexpected {list(result.unexpected_keys)}")
