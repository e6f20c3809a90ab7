"""Import a Hugging Face directory into a Megatron-LM checkpoint.

One CPU (gloo) process per TP x PP rank; each builds its GPTModel chunk for that layout from
Megatron-LM's arguments (``training/megatron_loop.py``'s ``transformer_config`` /
``build_gpt``) on the meta device, and saves it with ``training/checkpoints.py``'s
``save_model`` through ``streaming_save.py``: every parameter is converted from the
safetensors (its family's tables, read lazily, TP-sliced) only when the writer reaches it.
The result is ``CKPT/release`` and the tracker file, the model under ``model`` and those
arguments under ``args``, no optimizer (the form Megatron-LM's own converters write), plus
the import record and the tokenizer files beside it. Megatron-LM's loop starts from it with
``--pretrained-checkpoint CKPT`` (or ``--load CKPT --finetune``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from typing import Callable, Optional, Tuple

import torch

from arra_megatron.conversion import FAMILIES
from arra_megatron.conversion.common import (
    ConversionError,
    GPTArchitecture,
    SafetensorsDir,
    check_new_output,
    copy_tokenizer_files,
    global_parameter_names,
    layout_flags,
    staged_output,
    tp_shard,
    write_json,
)
from arra_megatron.conversion.family import ModelFamily

logger = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")


def read_hf_config(path: str) -> Tuple[object, ModelFamily, GPTArchitecture]:
    """The transformers config of ``path``, its family, and its Megatron architecture."""
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise ConversionError(f"--hf {path}: no config.json there; give a transformers checkpoint directory")
    with open(config_file, encoding="utf-8") as f:
        raw = json.load(f)
    archs = raw.get("architectures") or []
    for family in FAMILIES.values():
        if any(a in family.architectures for a in archs):
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(path)
            return config, family, family.architecture_from_hf(config)
    supported = sorted(a for f in FAMILIES.values() for a in f.architectures)
    found = ", ".join(archs) if archs else f"model_type {raw.get('model_type')!r}"
    raise ConversionError(f"--hf {path}: {found} is not a supported architecture "
                          f"(supported: {', '.join(supported)})")


def import_checkpoint(hf_dir: str, save: str, tensor_model_parallel_size: int = 1,
                      pipeline_model_parallel_size: int = 1, dtype: str = "float32",
                      make_vocab_size_divisible_by: Optional[int] = None, timeout: float = 3600.0) -> dict:
    """Convert ``hf_dir`` into a Megatron-LM checkpoint at ``save`` for the given TP x PP layout.

    Returns the import record written beside it (``checkpoints.IMPORT_RECORD_FILE``) with the
    checkpoint's ``padded_vocab_size``. ``make_vocab_size_divisible_by`` defaults to a value that
    leaves the vocabulary unpadded (see ``exact_vocab_multiple``). Nothing is left at ``save``
    unless the whole conversion succeeds.
    """
    from arra_megatron.models.gpt import pad_vocab_size
    from arra_megatron.runtime.launch import run_workers
    from arra_megatron.training.checkpoints import HF_TOKENIZER_DIR, IMPORT_RECORD_FILE

    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    check_new_output(save, "--save")
    hf_config, family, arch = read_hf_config(hf_dir)
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    if arch.rotary_base != int(arch.rotary_base):
        raise ConversionError(f"rope_theta {arch.rotary_base} is not an integer; Megatron-LM's --rotary-base is")
    if arch.num_layers % pp:
        raise ConversionError(f"{arch.num_layers} layers do not split over --pipeline-model-parallel-size {pp}")
    if arch.num_query_groups % tp or arch.num_attention_heads % tp or arch.ffn_hidden_size % tp:
        raise ConversionError(f"--tensor-model-parallel-size {tp} must divide the key/value groups "
                              f"({arch.num_query_groups}), heads and ffn size")
    hf = SafetensorsDir(hf_dir)
    found = {n for n in hf.names()
             if not n.endswith("rotary_emb.inv_freq") and not n.startswith(family.auxiliary_prefixes)}
    if arch.tie_embeddings:
        found.discard(family.names["output_layer.weight"])  # some tied checkpoints store the copy too
    expected = family.expected_hf_names(arch)
    if found != expected:
        raise ConversionError(f"--hf {hf_dir}: tensors do not match the config: missing "
                              f"{sorted(expected - found)[:8]}, unexpected {sorted(found - expected)[:8]}")
    if make_vocab_size_divisible_by is None:
        make_vocab_size_divisible_by = exact_vocab_multiple(arch.vocab_size, tp)
    args = arch.megatron_args(tp, pp, dtype, make_vocab_size_divisible_by)  # the checkpoint's description
    padded = pad_vocab_size(arch.vocab_size, tp, make_vocab_size_divisible_by)
    if padded != arch.vocab_size:
        logger.info("vocabulary %d padded to %d rows for TP %d (masked out of the loss); train with the same "
                    "--make-vocab-size-divisible-by %d", arch.vocab_size, padded, tp, make_vocab_size_divisible_by)
    record = {
        "hf_architecture": family.architectures[0],
        "source": os.path.abspath(hf_dir),
        "trainer_flags": arch.trainer_flags() + layout_flags(tp, pp, dtype, make_vocab_size_divisible_by),
    }
    with staged_output(save, "--save") as tmp:
        record["tokenizer_files"] = copy_tokenizer_files(hf_dir, os.path.join(tmp, HF_TOKENIZER_DIR))
        family.write_import_extras(hf, hf_config, tmp, save, record)  # e.g. Chameleon's VQ-VAE
        run_workers(_import_worker, tp * pp, hf_dir, tmp, arch, args, padded, timeout=timeout)
        write_json(os.path.join(tmp, IMPORT_RECORD_FILE), record)
    logger.info("imported %s into %s (TP %d x PP %d); train with: %s", hf_dir, save, tp, pp,
                " ".join(record["trainer_flags"]) + f" --load {save} --finetune")
    return {**record, "padded_vocab_size": padded}


def exact_vocab_multiple(vocab_size: int, tensor_model_parallel_size: int, up_to_tp: int = 8) -> int:
    """The ``--make-vocab-size-divisible-by`` that keeps ``vocab_size`` unpadded: the checkpoint
    then has the Hugging Face model's rows, whatever TP it is trained at.

    Megatron-LM pads to a multiple of this value times TP, so the value is chosen to leave
    the vocabulary unpadded at every TP up to ``up_to_tp`` when it can (the largest power of
    two <= 128 that does), then at this TP, else 1 (the smallest padding).
    """
    for tp in (max(tensor_model_parallel_size, up_to_tp), tensor_model_parallel_size):
        multiple = 128
        while multiple >= 1:
            if vocab_size % (multiple * tp) == 0:
                return multiple
            multiple //= 2
    return 1


def _import_worker(hf_dir: str, root: str, arch: GPTArchitecture, args: argparse.Namespace,
                   padded_vocab_size: int) -> None:
    """One TP x PP rank: build this layout's chunk, fill it from Hugging Face, save. Collective.

    The chunk is built on the meta device (shapes, names and sharding only); each parameter
    is converted from the safetensors when dist checkpointing writes it, so memory holds
    about one tensor at a time, not the model.
    """
    from megatron.core import parallel_state as ps

    from arra_megatron.conversion.streaming_save import StreamingSaveStrategy
    from arra_megatron.runtime.distributed import initialize_model_parallel
    from arra_megatron.training import checkpoints, megatron_loop

    family = FAMILIES[arch.model_type]
    tp = args.tensor_model_parallel_size
    initialize_model_parallel(tp, args.pipeline_model_parallel_size)
    # No random initialisation (every parameter comes from Hugging Face), and no storage: with
    # init_model_with_meta_device Megatron also skips the tied-embedding all-reduce at PP > 1.
    # use_cpu_initialization: parameters are created without a device argument, so on the meta one.
    config = dataclasses.replace(megatron_loop.transformer_config(args), perform_initialization=False,
                                 use_cpu_initialization=True, init_model_with_meta_device=True)
    with torch.device("meta"):
        chunk = megatron_loop.build_gpt(args, config, padded_vocab_size, arch.vocab_size,
                                        pre_process=ps.is_pipeline_first_stage(),
                                        post_process=ps.is_pipeline_last_stage())
    hf = SafetensorsDir(hf_dir)
    tp_rank = ps.get_tensor_model_parallel_rank()
    params = list(global_parameter_names(chunk))
    allocated = [name for name, param in params if not param.is_meta]
    if allocated:
        raise RuntimeError(f"import builds the model on the meta device, but {allocated[:4]} were allocated")

    def shard(name: str, param: torch.nn.Parameter, read: Callable[[str], torch.Tensor]) -> torch.Tensor:
        full = family.megatron_tensor(name, read, arch, padded_vocab_size)
        converted = tp_shard(name, full, param, tp_rank, tp)
        if converted.shape != param.shape:
            raise ConversionError(f"{name}: converted shard {tuple(converted.shape)} does not fit the "
                                  f"parameter {tuple(param.shape)}")
        return converted

    for name, param in params:  # shapes only (meta tensors), so that a mismatch fails before writing
        shard(name, param, hf.meta)

    def produce(name: str, param: torch.nn.Parameter) -> torch.Tensor:
        with torch.no_grad():
            return torch.empty(param.shape, dtype=param.dtype).copy_(shard(name, param, hf))

    checkpoints.save_model([chunk], root, args, sharded_strategy=StreamingSaveStrategy(params, produce))
