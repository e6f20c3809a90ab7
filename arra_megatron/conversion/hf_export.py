"""Export a Megatron-LM checkpoint to a Hugging Face transformers directory.

Reads any Megatron-LM checkpoint (any TP / PP / VPP / DP, with or without optimizer state) in
one process: the architecture from its saved arguments (``training/checkpoints.py``), the
tensors by their global dist-checkpoint keys. The safetensors shards are planned from the
checkpoint's metadata before any data is read: whole units (the embeddings, one layer, the
final norm and output layer, a family's auxiliary tensors) packed in order into shards of at
most ``--max-shard-size`` (a larger unit gets a shard of its own). Each shard's units are then
read (every TP / PP shard of them), mapped to Hugging Face names by the model family and
streamed to the shard file tensor by tensor (``safetensors_stream``), so memory holds one layer;
the index is the one transformers' ``save_pretrained`` writes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch

from arra_megatron.conversion import FAMILIES
from arra_megatron.conversion.common import (
    QK_NORM_PARAMS,
    ConversionError,
    GPTArchitecture,
    SafetensorsDir,
    check_new_output,
    copy_tokenizer_files,
    layer_params,
    sharded_key,
    staged_output,
)
from arra_megatron.conversion.family import VOCAB_ROWS, ModelFamily
from arra_megatron.conversion.safetensors_stream import write_safetensors

logger = logging.getLogger(__name__)


# ================================================================================ the checkpoint
def resolve_checkpoint(load: str) -> str:
    """The iteration (or release) directory ``--load`` names, as Megatron-LM's loop reads it."""
    from arra_megatron.training import checkpoints

    try:
        return checkpoints.resolve(load)
    except checkpoints.CheckpointError as err:
        old = read_import_record(load)
        if old and "architecture" in old:  # imported before checkpoints took Megatron-LM's layout
            raise ConversionError(f"--load {load} was imported before checkpoints moved to Megatron-LM's layout; "
                                  f"import the model again: tools/convert_checkpoint.py import --hf "
                                  f"{old.get('source', 'HF_DIR')} --save NEW_DIR") from None
        raise ConversionError(str(err)) from None


def read_import_record(directory: str) -> Optional[dict]:
    """The import record (``checkpoints.IMPORT_RECORD_FILE``) in ``directory``, if any."""
    from arra_megatron.training.checkpoints import IMPORT_RECORD_FILE

    file = os.path.join(directory, IMPORT_RECORD_FILE)
    if not os.path.isfile(file):
        return None
    with open(file, encoding="utf-8") as f:
        return json.load(f)


def checkpoint_vocab_size(args: argparse.Namespace) -> int:
    """The unpadded vocabulary of a run: its ``--vocab-size``, else its datasets' manifests."""
    if getattr(args, "vocab_size", None):
        return int(args.vocab_size)
    from arra_megatron.data.checks import data_prefixes, training_data_path

    data_path = training_data_path(vars(args))
    if data_path:
        from arra_megatron.data.manifest import DatasetManifest, ManifestError

        try:
            return max(DatasetManifest.read(p).tokenizer_profile.vocab_size for p in data_prefixes(data_path))
        except (FileNotFoundError, ManifestError):
            pass
    raise ConversionError("the checkpoint does not record its vocabulary size (its --data-path manifests are "
                          "not readable here); pass --vocab-size")


def checkpoint_architecture(args: argparse.Namespace, vocab_size: Optional[int] = None) -> GPTArchitecture:
    """The architecture of a checkpoint saved with Megatron-LM's arguments ``args``."""
    return GPTArchitecture.from_args(args, vocab_size if vocab_size is not None else checkpoint_vocab_size(args))


def source_record(args: argparse.Namespace, path: str,
                  import_dir: Optional[str] = None) -> Tuple[Optional[dict], Optional[str]]:
    """The import record behind a checkpoint and the import's directory: ``import_dir``'s when
    given, else the checkpoint's own (an import exported as is), else that of the run's ``--load``
    or ``--pretrained-checkpoint`` (a model trained from an import; a resumed run's ``--load`` is
    its own directory, so give ``import_dir`` then)."""
    if import_dir is not None:
        record = read_import_record(import_dir)
        if record is None:
            from arra_megatron.training.checkpoints import IMPORT_RECORD_FILE

            raise ConversionError(f"--import-dir {import_dir}: no {IMPORT_RECORD_FILE} there "
                                  "(not an imported checkpoint)")
        return record, import_dir
    candidates = [os.path.dirname(os.path.abspath(path))]
    started_from = (getattr(args, "load", None), getattr(args, "pretrained_checkpoint", None))
    candidates += [os.path.abspath(d) for d in started_from if d]
    for directory in candidates:
        record = read_import_record(directory)
        if record is not None:
            return record, directory
    return None, None


def export_family(arch: GPTArchitecture, source: Optional[dict]) -> ModelFamily:
    """The family of a checkpoint: the one its import record names (the saved arguments describe
    the GPT's shape only, which families may share), else the one that shape implies (Llama's,
    or Chameleon's with per-head q/k norms)."""
    recorded = (source or {}).get("hf_architecture")
    for family in FAMILIES.values():
        if recorded in family.architectures:
            return family
    return FAMILIES[arch.model_type]


def check_layout(metadata: dict, arch: GPTArchitecture) -> int:
    """Fail on a checkpoint whose tensors contradict ``arch``; returns the padded vocabulary."""
    def shape(key):
        if key not in metadata:
            raise ConversionError(f"the checkpoint has no tensor {key}: incomplete or not a GPT checkpoint")
        return tuple(metadata[key].global_shape)

    L, H = arch.num_layers, arch.hidden_size
    qkv_rows = (arch.num_attention_heads + 2 * arch.num_query_groups) * arch.kv_channels
    expected = {
        **({f"decoder.layers.{name}": (L, (arch.num_attention_heads if ".q_" in name else arch.num_query_groups)
                                        * arch.kv_channels) for name in QK_NORM_PARAMS}
           if arch.qk_layernorm_per_head else {}),
        "decoder.layers.self_attention.linear_qkv.weight": (L, qkv_rows, H),
        "decoder.layers.self_attention.linear_proj.weight": (L, H, arch.num_attention_heads * arch.kv_channels),
        "decoder.layers.mlp.linear_fc1.weight": (L, 2 * arch.ffn_hidden_size, H),
        "decoder.layers.mlp.linear_fc2.weight": (L, H, arch.ffn_hidden_size),
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight": (L, H),
        "decoder.layers.mlp.linear_fc1.layer_norm_weight": (L, H),
        "decoder.final_layernorm.weight": (H,),
    }
    for key, want in expected.items():
        if shape(key) != want:
            raise ConversionError(f"checkpoint tensor {key} has shape {shape(key)}, but the recorded layout "
                                  f"(layers {L}, hidden {H}, heads {arch.num_attention_heads}, groups "
                                  f"{arch.num_query_groups}, ffn {arch.ffn_hidden_size}) needs {want}")
    rows, width = shape("embedding.word_embeddings.weight")
    if width != H or rows < arch.vocab_size:
        raise ConversionError(f"embedding shape {(rows, width)} does not hold vocabulary {arch.vocab_size} x {H}")
    if arch.tie_embeddings == ("output_layer.weight" in metadata):
        raise ConversionError("the checkpoint's output layer contradicts its recorded "
                              f"{'tied' if arch.tie_embeddings else 'untied'} embeddings")
    if not arch.tie_embeddings and shape("output_layer.weight") != (rows, H):
        raise ConversionError(f"output_layer shape {shape('output_layer.weight')} differs from the embedding's")
    return rows


def read_full(path: str, key: str, meta) -> torch.Tensor:
    """One full tensor (all TP / PP shards) from a dist checkpoint; ``meta`` is its entry of
    ``dist_checkpointing.load_tensors_metadata``."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    request = {"t": ShardedTensor.from_rank_offsets(key, torch.empty(tuple(meta.global_shape), dtype=meta.dtype),
                                                    replica_id=0)}
    return dist_checkpointing.load(request, path)["t"]


def read_layer(path: str, keys: List[str], metadata: dict, index: int) -> Dict[str, torch.Tensor]:
    """Layer ``index`` of the stacked tensors ``keys`` (all TP / PP shards), in one read."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    request = {}
    for key in keys:
        shape = tuple(metadata[key].global_shape)
        request[key] = ShardedTensor.from_rank_offsets(key, torch.empty((1,) + shape[1:], dtype=metadata[key].dtype),
                                                       (0, index, shape[0]), replica_id=0)
    # Not every layer is requested: the check that a load covers whole tensors does not apply.
    loaded = dist_checkpointing.load(request, path, validate_access_integrity=False)
    return {key: loaded[key][0] for key in keys}  # (the load also returns the common state)


# ================================================================================ the shards
@dataclasses.dataclass
class Unit:
    """Tensors written to the same shard: their size in bytes, known before reading, and how to
    read them (as Hugging Face names and tensors)."""

    nbytes: int
    read: Callable[[], Iterator[Tuple[str, torch.Tensor]]]


def _nbytes(shape, dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def plan_units(path: str, metadata: dict, arch: GPTArchitecture, family: ModelFamily,
               auxiliary: Optional[Tuple[SafetensorsDir, str]]) -> List[Unit]:
    """The export's units, in file order, sized from the checkpoint's metadata (and the auxiliary
    tensors' headers)."""
    def nbytes(name: str) -> int:  # of the Hugging Face tensors made of the global tensor ``name``
        shape = tuple(metadata[name].global_shape)
        return _nbytes((arch.vocab_size,) + shape[1:] if name in VOCAB_ROWS else shape, metadata[name].dtype)

    def whole(names: List[str]) -> Unit:
        def read() -> Iterator[Tuple[str, torch.Tensor]]:
            for name in names:
                yield from family.hf_tensors(name, read_full(path, name, metadata[name]), arch)

        return Unit(sum(nbytes(n) for n in names), read)

    keys = {local: sharded_key(local)[0] for local in layer_params(arch)}

    def layer(index: int) -> Unit:
        def read() -> Iterator[Tuple[str, torch.Tensor]]:
            tensors = read_layer(path, list(keys.values()), metadata, index)
            for local, key in keys.items():
                yield from family.hf_tensors(f"decoder.layers.{index}.{local}", tensors.pop(key), arch)

        return Unit(sum(_nbytes(metadata[k].global_shape[1:], metadata[k].dtype) for k in keys.values()), read)

    units = [whole(["embedding.word_embeddings.weight"])]
    units += [layer(index) for index in range(arch.num_layers)]
    units.append(whole(["decoder.final_layernorm.weight"] + ([] if arch.tie_embeddings else ["output_layer.weight"])))
    if auxiliary is not None:
        reader, prefix = auxiliary
        units.append(Unit(sum(_nbytes(reader.meta(n).shape, reader.meta(n).dtype) for n in reader.names()),
                          lambda: ((prefix + n, reader(n)) for n in reader.names())))
    return units


def write_shards(directory: str, units: List[Unit], max_shard_bytes: int) -> int:
    """Pack ``units`` in order into shards of at most ``max_shard_bytes`` and write them as
    transformers does (``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` and
    ``model.safetensors.index.json``), one tensor in memory at a time (``safetensors_stream``).
    Returns the shard count."""
    shards: List[List[Unit]] = []
    size = 0
    for unit in units:
        if not shards or size + unit.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(unit)
        size += unit.nbytes
    weight_map: Dict[str, str] = {}
    total_size = total_parameters = 0
    for i, shard in enumerate(shards):
        file = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header = write_safetensors(os.path.join(directory, file), (item for unit in shard for item in unit.read()))
        weight_map.update(dict.fromkeys(header, file))
        total_parameters += sum(math.prod(entry["shape"]) for entry in header.values())
        total_size += sum(end - start for start, end in (entry["data_offsets"] for entry in header.values()))
    if len(shards) > 1:
        index = {"metadata": {"total_parameters": total_parameters, "total_size": total_size},
                 "weight_map": weight_map}
        with open(os.path.join(directory, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return len(shards)


def parse_size(text: Union[int, str]) -> int:
    """``5GB`` / ``500MB`` / bytes, decimal units as transformers' ``max_shard_size``."""
    if isinstance(text, int):
        return text
    text = str(text).strip().upper()
    for unit, factor in (("GB", 10 ** 9), ("MB", 10 ** 6), ("KB", 10 ** 3), ("B", 1)):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


# ================================================================================ export
def export_checkpoint(load: str, hf_out: str, model_type: Optional[str] = None, vocab_size: Optional[int] = None,
                      max_shard_size: Union[int, str] = "5GB", tokenizer: Optional[str] = None,
                      import_dir: Optional[str] = None) -> dict:
    """Write the model of Megatron-LM checkpoint ``load`` (its root or one iteration directory) as a
    transformers directory ``hf_out``.

    One process, one safetensors shard in memory at a time. The ARRA projector, optimizer and
    RNG states are left out. Tokenizer files come from ``tokenizer`` (a directory) or, for an
    imported checkpoint, from the copy the import kept. Returns a summary.
    """
    from arra_megatron.training.checkpoints import HF_TOKENIZER_DIR

    if model_type is not None and model_type not in FAMILIES:
        raise ConversionError(f"--model-type {model_type}: supported are {', '.join(FAMILIES)}")
    check_new_output(hf_out, "--hf-out")
    path = resolve_checkpoint(load)
    if tokenizer is None:
        for candidate in (os.path.join(load, HF_TOKENIZER_DIR), os.path.join(os.path.dirname(path), HF_TOKENIZER_DIR)):
            if os.path.isdir(candidate):
                tokenizer = candidate
                break
    elif not os.path.isdir(tokenizer):
        raise ConversionError(f"--tokenizer {tokenizer}: no such directory")
    with _single_process_group():
        return _export(path, hf_out, model_type, vocab_size, parse_size(max_shard_size), tokenizer, import_dir)


@contextlib.contextmanager
def _single_process_group():
    """Dist checkpointing reads through torch.distributed: a world of one (gloo, in-memory store)
    for the duration of an export when the caller has none."""
    if torch.distributed.is_initialized():
        yield
        return
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def _export(path: str, hf_out: str, model_type: Optional[str], vocab_size: Optional[int], max_shard_bytes: int,
            tokenizer: Optional[str], import_dir: Optional[str]) -> dict:
    from megatron.core import dist_checkpointing
    from transformers import GenerationConfig

    from arra_megatron.training import checkpoints

    try:
        args = checkpoints.saved_args(path)
        metadata = dist_checkpointing.load_tensors_metadata(path)
    except checkpoints.CheckpointError as err:
        raise ConversionError(str(err)) from None
    except Exception as err:  # noqa: BLE001 - name the file whatever the reader raised
        raise ConversionError(f"--load {path}: not a readable dist checkpoint ({type(err).__name__}: {err})") from err
    arch = checkpoint_architecture(args, vocab_size)
    source, source_dir = source_record(args, path, import_dir)
    family = export_family(arch, source)
    if model_type is not None and family.model_type != model_type:
        raise ConversionError(f"the checkpoint holds a {family.model_type} model, not --model-type {model_type}")
    arch = dataclasses.replace(arch, model_type=family.model_type)
    family.expected_hf_names(arch)  # fails now on a checkpoint tensor the family has no name for
    padded = check_layout(metadata, arch)
    projector = sorted(k for k in metadata if k.startswith("arra_projector."))
    if projector:
        logger.warning("leaving out the ARRA projector (%s): it is a training-time module, not part of the "
                       "generative model", ", ".join(projector))
    dtype = metadata["embedding.word_embeddings.weight"].dtype
    if tokenizer is None and source_dir and os.path.isdir(os.path.join(source_dir, checkpoints.HF_TOKENIZER_DIR)):
        tokenizer = os.path.join(source_dir, checkpoints.HF_TOKENIZER_DIR)  # a model trained from an import
    generation = None
    if tokenizer is not None and os.path.isfile(os.path.join(tokenizer, "generation_config.json")):
        generation = GenerationConfig.from_pretrained(tokenizer)
    token_ids = {k: getattr(generation, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                 if generation is not None and getattr(generation, k, None) is not None}
    config = family.hf_config(arch, source=source, dtype=str(dtype).replace("torch.", ""), **token_ids)
    units = plan_units(path, metadata, arch, family, family.auxiliary_source(source_dir))
    tokenizer_files: List[str] = []
    with staged_output(hf_out, "--hf-out") as tmp:
        shards = write_shards(tmp, units, max_shard_bytes)
        config.save_pretrained(tmp)
        (generation or GenerationConfig.from_model_config(config)).save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer_files = [n for n in copy_tokenizer_files(tokenizer, tmp) if n != "generation_config.json"]
        else:
            logger.warning("no tokenizer files written: pass --tokenizer DIR (e.g. the Hugging Face model imported)")
    summary = {"checkpoint": path, "hf_out": hf_out, "model_type": arch.model_type, "import_dir": source_dir,
               "left_out": projector, "padded_vocab_size": padded, "shards": shards,
               "tokenizer_files": tokenizer_files, "architecture": dataclasses.asdict(arch)}
    logger.info("exported %s to %s (%d safetensors file(s))", path, hf_out, shards)
    return summary
