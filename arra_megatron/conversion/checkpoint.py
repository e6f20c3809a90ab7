"""Import a Hugging Face directory into a Megatron-LM checkpoint, export one back.

Import runs one CPU (gloo) process per TP x PP rank; each builds its GPTModel chunk for
that layout from Megatron-LM's arguments (``training/megatron_loop.py``'s
``transformer_config`` / ``build_gpt``), fills its shard from the Hugging Face safetensors
(read lazily: a rank reads only the tensors of its own layers) and saves it with
``training/checkpoints.py``'s ``save_model``: ``CKPT/release`` and the tracker file, the model
under ``model`` and those arguments under ``args``, no optimizer (the form Megatron-LM's own
converters write). Megatron-LM's loop starts from it with ``--load CKPT --finetune``.

Export reads any Megatron-LM checkpoint (any TP / PP / VPP / DP, with or without optimizer
state) in one process: the architecture from its saved arguments, the tensors by their
global dist-checkpoint keys, one layer (every TP / PP shard of it) at a time, mapped to
Hugging Face names and written as sharded safetensors.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
from typing import Callable, Dict, List, Optional, Tuple

import torch

from arra_megatron.conversion import chameleon, llama
from arra_megatron.conversion.common import (
    METADATA_FILE,
    QK_NORM_PARAMS,
    ConversionError,
    GPTArchitecture,
    check_new_output,
    global_parameter_names,
    layer_params,
    layout_flags,
    sharded_key,
    staged_output,
    tp_shard,
    write_json,
)

logger = logging.getLogger(__name__)

FAMILIES = {"llama": llama, "chameleon": chameleon}
# Inside an imported checkpoint: the source model's tokenizer files and generation config,
# which export writes back (they are not part of the dist checkpoint).
TOKENIZER_DIR = "hf_tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


# ================================================================================ Hugging Face side
class SafetensorsDir:
    """Lazy reader of a transformers checkpoint directory's safetensors (never pickles)."""

    def __init__(self, path: str):
        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            self.files = {name: os.path.join(path, file) for name, file in weight_map.items()}
        elif os.path.isfile(single):
            from safetensors import safe_open

            with safe_open(single, "pt") as f:
                self.files = {name: single for name in f.keys()}
        else:
            pickles = [n for n in os.listdir(path) if n.endswith((".bin", ".pt", ".pth"))]
            hint = (f" (found {', '.join(sorted(pickles))}: pickled weights are not read; re-save the model "
                    "with save_pretrained(safe_serialization=True))") if pickles else ""
            raise ConversionError(f"--hf {path}: no model.safetensors or model.safetensors.index.json{hint}")

    def names(self) -> List[str]:
        return sorted(self.files)

    def __call__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self.files:
            raise ConversionError(f"tensor {name} is missing from the safetensors files")
        # Opened per tensor: a handle kept open keeps every page read so far mapped (and counted
        # in this process's memory) until the end of the conversion.
        with safe_open(self.files[name], "pt") as f:
            return f.get_tensor(name)

    def meta(self, name: str) -> torch.Tensor:
        """Tensor ``name`` on the meta device: its shape and dtype, from the file header only."""
        from safetensors import safe_open

        if name not in self.files:
            raise ConversionError(f"tensor {name} is missing from the safetensors files")
        with safe_open(self.files[name], "pt") as f:
            info = f.get_slice(name)
            dtype = _SAFETENSORS_DTYPES.get(info.get_dtype())
            if dtype is None:
                raise ConversionError(f"tensor {name} has dtype {info.get_dtype()}, not a floating point weight")
            return torch.empty(info.get_shape(), dtype=dtype, device="meta")


def copy_tokenizer_files(source: str, target: str) -> List[str]:
    """Copy the transformers tokenizer files found in ``source`` into ``target``; their names."""
    import shutil

    found = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(source, n))]
    if found:
        os.makedirs(target, exist_ok=True)
    for name in found:
        shutil.copyfile(os.path.join(source, name), os.path.join(target, name))
    return found


def read_hf_config(path: str):
    """The transformers config of ``path``, its family module, and its Megatron architecture."""
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise ConversionError(f"--hf {path}: no config.json there; give a transformers checkpoint directory")
    with open(config_file, encoding="utf-8") as f:
        raw = json.load(f)
    archs = raw.get("architectures") or []
    for name, family in FAMILIES.items():
        if any(a in family.ARCHITECTURES for a in archs):
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(path)
            return config, family, family.architecture_from_hf(config)
    supported = sorted(a for f in FAMILIES.values() for a in f.ARCHITECTURES)
    found = ", ".join(archs) if archs else f"model_type {raw.get('model_type')!r}"
    raise ConversionError(f"--hf {path}: {found} is not a supported architecture "
                          f"(supported: {', '.join(supported)})")


# ================================================================================ import
def import_checkpoint(hf_dir: str, save: str, tensor_model_parallel_size: int = 1,
                      pipeline_model_parallel_size: int = 1, dtype: str = "float32",
                      make_vocab_size_divisible_by: Optional[int] = None, timeout: float = 3600.0) -> dict:
    """Convert ``hf_dir`` into a Megatron-LM checkpoint at ``save`` for the given TP x PP layout.

    Returns the import record written beside it (``arra_conversion.json``) with the checkpoint's
    ``padded_vocab_size``. ``make_vocab_size_divisible_by`` defaults to a value that leaves the
    vocabulary unpadded (see ``exact_vocab_multiple``). Nothing is left at ``save`` unless the
    whole conversion succeeds.
    """
    from arra_megatron.models.gpt import pad_vocab_size
    from arra_megatron.runtime.launch import run_workers

    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    check_new_output(save, "--save")
    hf_config, family, arch = read_hf_config(hf_dir)
    if dtype not in _DTYPES:
        raise ConversionError(f"--dtype {dtype}: choose one of {', '.join(_DTYPES)}")
    if arch.rotary_base != int(arch.rotary_base):
        raise ConversionError(f"rope_theta {arch.rotary_base} is not an integer; Megatron-LM's --rotary-base is")
    if arch.num_layers % pp:
        raise ConversionError(f"{arch.num_layers} layers do not split over --pipeline-model-parallel-size {pp}")
    if arch.num_query_groups % tp or arch.num_attention_heads % tp or arch.ffn_hidden_size % tp:
        raise ConversionError(f"--tensor-model-parallel-size {tp} must divide the key/value groups "
                              f"({arch.num_query_groups}), heads and ffn size")
    hf = SafetensorsDir(hf_dir)
    auxiliary = getattr(family, "AUXILIARY_PREFIXES", ())  # not part of the GPT (Chameleon's VQ-VAE)
    found = {n for n in hf.names() if not n.endswith("rotary_emb.inv_freq") and not n.startswith(auxiliary)}
    if arch.tie_embeddings:
        found.discard("lm_head.weight")  # some tied checkpoints store the copy too
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
        "hf_architecture": family.ARCHITECTURES[0],
        "source": os.path.abspath(hf_dir),
        "trainer_flags": arch.trainer_flags() + layout_flags(tp, pp, dtype, make_vocab_size_divisible_by),
    }
    with staged_output(save, "--save") as tmp:
        record["tokenizer_files"] = copy_tokenizer_files(hf_dir, os.path.join(tmp, TOKENIZER_DIR))
        if hasattr(family, "write_import_extras"):  # e.g. Chameleon's VQ-VAE and tokenizer profile
            family.write_import_extras(hf, hf_config, tmp, save, record)
        run_workers(_import_worker, tp * pp, hf_dir, tmp, arch, args, padded, timeout=timeout)
        write_json(os.path.join(tmp, METADATA_FILE), record)
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
    is converted from the safetensors when dist checkpointing writes it
    (``_streaming_save_strategy``), so memory holds about one tensor at a time, not the model.
    """
    from megatron.core import parallel_state as ps

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
        converted = tp_shard(name, family.megatron_tensor(name, read, arch, padded_vocab_size), param, tp_rank, tp)
        if converted.shape != param.shape:
            raise ConversionError(f"{name}: converted shard {tuple(converted.shape)} does not fit the "
                                  f"parameter {tuple(param.shape)}")
        return converted

    for name, param in params:  # shapes only (meta tensors), so that a mismatch fails before writing
        shard(name, param, hf.meta)

    def produce(name: str, param: torch.nn.Parameter) -> torch.Tensor:
        with torch.no_grad():
            return torch.empty(param.shape, dtype=param.dtype).copy_(shard(name, param, hf))

    checkpoints.save_model([chunk], root, args, sharded_strategy=_streaming_save_strategy(params, produce))


def _storage_id(tensor: torch.Tensor) -> int:
    """What a parameter shares with its detached copies and views (meta tensors included)."""
    return tensor.untyped_storage()._cdata


def _streaming_save_strategy_class():
    """The class behind ``_streaming_save_strategy``, defined on first use (Megatron and torch.distributed.checkpoint
    are imported only by the conversion workers)."""
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, _write_item
    from torch.distributed.checkpoint.planner import WriteItemType
    from torch.futures import Future

    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        TorchDistSaveShardedStrategy,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )

    class ProducingPlanner(MCoreSavePlanner):
        """Megatron's save planner, whose meta tensors get their data when written: the write
        item's view is taken of the parameter ``produce`` returns (one parameter kept, for the
        several items a parameter can give, e.g. gate and up of a TP-split fc1)."""

        def __init__(self, sources: Dict[int, Callable[[], torch.Tensor]], **kwargs):
            super().__init__(**kwargs)
            self.sources = sources
            self.current: Tuple[Optional[int], Optional[torch.Tensor]] = (None, None)

        def lookup_object(self, index):
            obj = super().lookup_object(index)
            if not (isinstance(obj, torch.Tensor) and obj.is_meta):
                return obj
            key = _storage_id(obj)
            if key not in self.sources:
                raise ConversionError(f"{index.fqn}: no converted tensor behind this checkpoint entry")
            if self.current[0] != key:
                self.current = (None, None)  # drop the previous parameter before making the next
                self.current = (key, self.sources[key]())
            return self.current[1].as_strided(obj.shape, obj.stride(), obj.storage_offset())

    class StreamingWriter(FileSystemWriter):
        """torch's file system writer (one file per rank, torch.save records) writing each item
        as soon as it is resolved and dropping it before the next (the stock writer keeps every
        tensor of a file referenced until the file is closed)."""

        def write_data(self, plan, planner) -> Future:
            name = f"{plan.storage_data.prefix}0{DEFAULT_SUFFIX}"
            results = []
            items = sorted(plan.items, key=lambda item: item.type != WriteItemType.BYTE_IO)
            with self.fs.create_stream(self.fs.concat_path(self.path, name), "wb") as stream:
                for item in items:
                    data = planner.resolve_data(item)
                    if item.type != WriteItemType.BYTE_IO:
                        data = data.detach()
                        if data.untyped_storage().nbytes() != data.nbytes:  # torch.save writes whole storages
                            data = data.clone()
                    results.append(_write_item(self.transforms, stream, data, item, name, self.serialization_format))
                    del data
                stream.flush()
                os.fsync(stream.fileno())
            future: Future = Future()
            future.set_result(results)
            return future

    class StreamingSaveStrategy(TorchDistSaveShardedStrategy):
        """Megatron's torch_dist format, written through torch.distributed.checkpoint.save with
        ``ProducingPlanner`` and ``StreamingWriter`` (same keys, metadata and records)."""

        def __init__(self, params: List[Tuple[str, torch.nn.Parameter]],
                     produce: Callable[[str, torch.nn.Parameter], torch.Tensor]):
            super().__init__("torch_dist", 1)
            self.sources = {_storage_id(p): (lambda n=n, p=p: produce(n, p)) for n, p in params}

        def save(self, sharded_state_dict, checkpoint_dir) -> None:
            import torch.distributed.checkpoint as dcp

            flat, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, self.keep_only_main_replica)
            planner = ProducingPlanner(self.sources, dedup_replicated_tensors=not self.keep_only_main_replica,
                                       flatten_state_dict=False, flatten_sharded_tensors=False)
            dcp.save(mcore_to_pyt_state_dict(flat, False), storage_writer=StreamingWriter(str(checkpoint_dir)),
                     planner=planner)

    return StreamingSaveStrategy


def _streaming_save_strategy(params: List[Tuple[str, torch.nn.Parameter]],
                             produce: Callable[[str, torch.nn.Parameter], torch.Tensor]):
    """A dist-checkpointing save strategy writing ``produce(name, param)`` for each meta ``param``."""
    return _streaming_save_strategy_class()(params, produce)


# ================================================================================ export
def resolve_checkpoint(load: str) -> str:
    """The iteration (or release) directory ``--load`` names, as Megatron-LM's loop reads it."""
    from arra_megatron.training import checkpoints

    try:
        return checkpoints.resolve(load)
    except checkpoints.CheckpointError as err:
        old = _read_record(load)
        if old and "architecture" in old:  # imported before checkpoints took Megatron-LM's layout
            raise ConversionError(f"--load {load} was imported before checkpoints moved to Megatron-LM's layout; "
                                  f"import the model again: tools/convert_checkpoint.py import --hf "
                                  f"{old.get('source', 'HF_DIR')} --save NEW_DIR") from None
        raise ConversionError(str(err)) from None


def _read_record(directory: str) -> Optional[dict]:
    """The import record (``METADATA_FILE``) in ``directory``, if any."""
    file = os.path.join(directory, METADATA_FILE)
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
        from arra_megatron.data.dataset import read_manifest

        try:
            return max(read_manifest(p)["tokenizer_profile"]["vocab_size"] for p in data_prefixes(data_path))
        except (FileNotFoundError, KeyError):
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
        record = _read_record(import_dir)
        if record is None:
            raise ConversionError(f"--import-dir {import_dir}: no {METADATA_FILE} there (not an imported checkpoint)")
        return record, import_dir
    candidates = [os.path.dirname(os.path.abspath(path))]
    started_from = (getattr(args, "load", None), getattr(args, "pretrained_checkpoint", None))
    candidates += [os.path.abspath(d) for d in started_from if d]
    for directory in candidates:
        record = _read_record(directory)
        if record is not None:
            return record, directory
    return None, None


def _check_layout(metadata: dict, arch: GPTArchitecture) -> int:
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


def _read_full(path: str, key: str, meta) -> torch.Tensor:
    """One full tensor (all TP / PP shards) from a dist checkpoint."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    request = {"t": ShardedTensor.from_rank_offsets(key, torch.empty(tuple(meta.global_shape), dtype=meta.dtype),
                                                    replica_id=0)}
    return dist_checkpointing.load(request, path)["t"]


def _read_layer(path: str, keys: List[str], metadata: dict, index: int) -> Dict[str, torch.Tensor]:
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


# safetensors' dtype names (its format: 8-byte header length, JSON header, raw little-endian data).
_SAFETENSORS_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}


class _ShardWriter:
    """Sharded safetensors in the transformers layout (index + ``model-0000i-of-0000n``),
    written as tensors arrive: each one's bytes go to the shard's data file at once, and the
    header is put in front when the shard is full, so no shard is held in memory."""

    def __init__(self, directory: str, max_shard_bytes: int):
        self.directory, self.max_bytes = directory, max_shard_bytes
        self.header: Dict[str, dict] = {}
        self.data = None  # the open data file of the current shard
        self.pending_bytes = 0
        self.files: List[List[str]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if tensor.dtype not in _SAFETENSORS_NAMES:
            raise ConversionError(f"{name}: dtype {tensor.dtype} has no safetensors name")
        size = tensor.numel() * tensor.element_size()
        if self.header and self.pending_bytes + size > self.max_bytes:
            self._flush()
        if self.data is None:
            self.data = open(os.path.join(self.directory, f"shard-{len(self.files)}.data"), "wb")
        raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        self.data.write(memoryview(raw))
        self.header[name] = {"dtype": _SAFETENSORS_NAMES[tensor.dtype], "shape": list(tensor.shape),
                             "data_offsets": [self.pending_bytes, self.pending_bytes + size]}
        self.pending_bytes += size
        self.total += size

    def _flush(self) -> None:
        import shutil
        import struct

        data_path = self.data.name
        self.data.close()
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.header}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        with open(os.path.join(self.directory, f"shard-{len(self.files)}.tmp"), "wb") as out, \
                open(data_path, "rb") as data:
            out.write(struct.pack("<Q", len(header)))
            out.write(header)
            shutil.copyfileobj(data, out, 1 << 24)
        os.remove(data_path)
        self.files.append(list(self.header))
        self.header, self.data, self.pending_bytes = {}, None, 0

    def finish(self) -> None:
        if self.header:
            self._flush()
        n = len(self.files)
        if n == 1:
            os.rename(os.path.join(self.directory, "shard-0.tmp"), os.path.join(self.directory, "model.safetensors"))
            return
        weight_map = {}
        for i, names in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.rename(os.path.join(self.directory, f"shard-{i}.tmp"), os.path.join(self.directory, final))
            weight_map.update({name: final for name in names})
        write_json(os.path.join(self.directory, "model.safetensors.index.json"),
                   {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))})


def parse_size(text) -> int:
    """``5GB`` / ``500MB`` / bytes, decimal units as transformers' ``max_shard_size``."""
    if isinstance(text, int):
        return text
    text = str(text).strip().upper()
    for unit, factor in (("GB", 10 ** 9), ("MB", 10 ** 6), ("KB", 10 ** 3), ("B", 1)):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def export_checkpoint(load: str, hf_out: str, model_type: Optional[str] = None, vocab_size: Optional[int] = None,
                      max_shard_size="5GB", tokenizer: Optional[str] = None,
                      import_dir: Optional[str] = None) -> dict:
    """Write the model of Megatron-LM checkpoint ``load`` (its root or one iteration directory) as a
    transformers directory ``hf_out``.

    One process, one layer (or the embeddings) in memory at a time. The
    ARRA projector, optimizer and RNG states are left out. Tokenizer files come from
    ``tokenizer`` (a directory) or, for an imported checkpoint, from the copy the import
    kept. Returns a summary.
    """
    if model_type is not None and model_type not in FAMILIES:
        raise ConversionError(f"--model-type {model_type}: supported are {', '.join(FAMILIES)}")
    check_new_output(hf_out, "--hf-out")
    path = resolve_checkpoint(load)
    if tokenizer is None:
        for candidate in (os.path.join(load, TOKENIZER_DIR), os.path.join(os.path.dirname(path), TOKENIZER_DIR)):
            if os.path.isdir(candidate):
                tokenizer = candidate
                break
    elif not os.path.isdir(tokenizer):
        raise ConversionError(f"--tokenizer {tokenizer}: no such directory")
    with _single_process_group():
        return _export(path, hf_out, model_type, vocab_size, max_shard_size, tokenizer, import_dir)


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


def _export(path: str, hf_out: str, model_type: Optional[str], vocab_size: Optional[int], max_shard_size,
            tokenizer: Optional[str], import_dir: Optional[str] = None) -> dict:
    from megatron.core import dist_checkpointing

    from arra_megatron.training import checkpoints

    try:
        args = checkpoints.saved_args(path)
        metadata = dist_checkpointing.load_tensors_metadata(path)
    except checkpoints.CheckpointError as err:
        raise ConversionError(str(err)) from None
    except Exception as err:  # noqa: BLE001 - name the file whatever the reader raised
        raise ConversionError(f"--load {path}: not a readable dist checkpoint ({type(err).__name__}: {err})") from err
    arch = checkpoint_architecture(args, vocab_size)
    if model_type is not None and arch.model_type != model_type:
        raise ConversionError(f"the checkpoint holds a {arch.model_type} model, not --model-type {model_type}")
    family = FAMILIES[arch.model_type]
    padded = _check_layout(metadata, arch)
    projector = sorted(k for k in metadata if k.startswith("arra_projector."))
    if projector:
        logger.warning("leaving out the ARRA projector (%s): it is a training-time module, not part of the "
                       "generative model", ", ".join(projector))
    dtype = metadata["embedding.word_embeddings.weight"].dtype
    source, source_dir = source_record(args, path, import_dir)
    if tokenizer is None and source_dir and os.path.isdir(os.path.join(source_dir, TOKENIZER_DIR)):
        tokenizer = os.path.join(source_dir, TOKENIZER_DIR)  # a model trained from an import
    from transformers import GenerationConfig

    generation = None
    if tokenizer is not None and os.path.isfile(os.path.join(tokenizer, "generation_config.json")):
        generation = GenerationConfig.from_pretrained(tokenizer)
    token_ids = {k: getattr(generation, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                 if generation is not None and getattr(generation, k, None) is not None}
    config = family.hf_config(arch, source=source, dtype=str(dtype).replace("torch.", ""), **token_ids)
    tokenizer_files: List[str] = []
    with staged_output(hf_out, "--hf-out") as tmp:
        writer = _ShardWriter(tmp, parse_size(max_shard_size))
        # Tensor by tensor: memory holds the embeddings or one layer; shards are written as they fill.
        names = ["embedding.word_embeddings.weight", "decoder.final_layernorm.weight"]
        if not arch.tie_embeddings:
            names.append("output_layer.weight")
        for name in names:
            for hf_name, tensor in family.hf_tensors(name, _read_full(path, name, metadata[name]), arch):
                writer.add(hf_name, tensor)
        keys = {local: sharded_key(local)[0] for local in layer_params(arch)}
        for index in range(arch.num_layers):  # one layer in memory at a time
            layer = _read_layer(path, list(keys.values()), metadata, index)
            for local, key in keys.items():
                for hf_name, tensor in family.hf_tensors(f"decoder.layers.{index}.{local}", layer.pop(key), arch):
                    writer.add(hf_name, tensor)
        if hasattr(family, "auxiliary_tensors"):  # not part of the GPT, kept beside the import (a VQ-VAE)
            for hf_name, tensor in family.auxiliary_tensors(source_dir):
                writer.add(hf_name, tensor)
        writer.finish()
        config.save_pretrained(tmp)
        (generation or GenerationConfig.from_model_config(config)).save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer_files = [n for n in copy_tokenizer_files(tokenizer, tmp) if n != "generation_config.json"]
        else:
            logger.warning("no tokenizer files written: pass --tokenizer DIR (e.g. the Hugging Face model imported)")
    summary = {"checkpoint": path, "hf_out": hf_out, "model_type": arch.model_type, "import_dir": source_dir,
               "left_out": projector, "padded_vocab_size": padded,
               "tokenizer_files": tokenizer_files,
               "architecture": dataclasses.asdict(arch)}
    logger.info("exported %s to %s", path, hf_out)
    return summary
