"""What import, export and every model family share: the architecture record, the
Hugging Face directory's safetensors and tokenizer files, TP slicing of full tensors, the
names Megatron-Core uses on each side, and safe output directories.

Full tensors are named as a TP1/PP1 GPTModel's ``state_dict()`` names them in CPU mode
(``decoder.layers.{i}.input_layernorm.weight``) with ``i`` the 0-based *global* layer
index. Dist checkpoints store the same tensors under sharded keys (layers stacked along
a leading axis, layer norms under Transformer Engine's names); ``SHARDED_KEYS`` maps one
onto the other.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import re
import shutil
import tempfile
from typing import Iterator, List, Optional, Sequence, Tuple

import torch

# The tokenizer files and generation config of a transformers directory, which an import keeps
# (training/checkpoints.py's HF_TOKENIZER_DIR) and export writes back.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json")
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


class ConversionError(RuntimeError):
    """A checkpoint or directory that cannot be converted; the message says what to fix."""


@dataclasses.dataclass
class GPTArchitecture:
    """The shape of a Llama-style GPT, in Megatron's terms."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    norm_epsilon: float
    rotary_base: float
    vocab_size: int  # unpadded: the Hugging Face vocabulary
    tie_embeddings: bool
    max_position_embeddings: int
    model_type: str = "llama"
    qk_layernorm_per_head: bool = False  # Chameleon's q/k LayerNorm, a weight and bias per head

    def __post_init__(self):
        if self.num_attention_heads % self.num_query_groups:
            raise ConversionError(f"{self.num_attention_heads} attention heads are not divisible into "
                                  f"{self.num_query_groups} key/value groups")

    def trainer_flags(self) -> List[str]:
        """The model flags of Megatron-LM's loop (``training/megatron_loop.py``) that build this
        architecture."""
        flags = [
            "--num-layers", str(self.num_layers), "--hidden-size", str(self.hidden_size),
            "--ffn-hidden-size", str(self.ffn_hidden_size), "--num-attention-heads", str(self.num_attention_heads),
            "--group-query-attention", "--num-query-groups", str(self.num_query_groups),
            "--kv-channels", str(self.kv_channels), "--normalization", "RMSNorm",
            "--norm-epsilon", repr(self.norm_epsilon), "--swiglu", "--disable-bias-linear",
            "--position-embedding-type", "rope", "--rotary-base", str(int(self.rotary_base)),
            "--max-position-embeddings", str(self.max_position_embeddings),
            "--vocab-size", str(self.vocab_size),
        ]
        if not self.tie_embeddings:
            flags.append("--untie-embeddings-and-output-weights")
        if self.qk_layernorm_per_head:
            flags += ["--qk-layernorm", "--qk-layernorm-per-head"]
        return flags

    def megatron_args(self, tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                      dtype: str = "float32", make_vocab_size_divisible_by: int = 128,
                      extra: Sequence[str] = ()) -> argparse.Namespace:
        """Megatron-LM's parsed and validated arguments for this architecture at TP x PP (one
        data-parallel rank, mock data, no ARRA, no dropout) plus ``extra`` flags: what an
        imported checkpoint saves as its description."""
        argv = self.trainer_flags() + layout_flags(tensor_model_parallel_size, pipeline_model_parallel_size, dtype,
                                                   make_vocab_size_divisible_by) + [
            "--seq-length", str(self.max_position_embeddings), "--micro-batch-size", "1",
            "--global-batch-size", "1", "--train-iters", "1", "--lr", "1e-4", "--mock-data", "--no-arra",
            "--hidden-dropout", "0", "--attention-dropout", "0",
        ] + list(extra)
        return parse_megatron_args(argv, tensor_model_parallel_size * pipeline_model_parallel_size)

    @classmethod
    def from_args(cls, args: argparse.Namespace, vocab_size: int) -> "GPTArchitecture":
        """The architecture Megatron-LM's arguments ``args`` (a checkpoint's saved ones) describe,
        with the unpadded ``vocab_size``; fails on what the Hugging Face mapping would not
        reproduce exactly. The inverse of ``trainer_flags``."""
        def arg(name, default=None):
            return getattr(args, name, default)

        missing = [n for n in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size") if arg(n) is None]
        if missing:
            raise ConversionError(f"the checkpoint's saved arguments lack {missing}")
        per_head = bool(arg("qk_layernorm_per_head"))
        needs = {  # flag to give -> whether the saved arguments contradict it
            "--normalization RMSNorm": arg("normalization") != "RMSNorm",
            "--swiglu": not arg("swiglu"),
            "--disable-bias-linear": arg("add_bias_linear", True),
            "--position-embedding-type rope": arg("position_embedding_type") != "rope",
            "--rotary-percent 1.0": arg("rotary_percent", 1.0) != 1.0,
            "no --add-qkv-bias": arg("add_qkv_bias", False),
            "no --rotary-interleaved": arg("rotary_interleaved", False),
            "no --use-rope-scaling": arg("use_rope_scaling", False),
            "no --apply-layernorm-1p": arg("layernorm_zero_centered_gamma", False),
            "no --apply-residual-connection-post-layernorm": arg("apply_residual_connection_post_layernorm", False),
            "no --num-experts": arg("num_experts") is not None,
            "no --qk-layernorm (or --qk-layernorm-per-head with it: Chameleon)": arg("qk_layernorm") and not per_head,
        }
        problems = [flag for flag, contradicted in needs.items() if contradicted]
        if problems:
            raise ConversionError("the checkpoint is not a Llama-style model; export needs " + ", ".join(problems))
        heads = args.num_attention_heads
        groups = args.num_query_groups if arg("group_query_attention") else heads
        return cls(
            num_layers=args.num_layers, hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size,
            num_attention_heads=heads, num_query_groups=groups,
            kv_channels=arg("kv_channels") or args.hidden_size // heads,
            norm_epsilon=float(arg("layernorm_epsilon", 1e-5)), rotary_base=float(arg("rotary_base", 10000)),
            vocab_size=int(vocab_size), tie_embeddings=not arg("untie_embeddings_and_output_weights", False),
            max_position_embeddings=arg("max_position_embeddings") or args.seq_length,
            model_type="chameleon" if per_head else "llama", qk_layernorm_per_head=per_head,
        )


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

        # Opened per tensor: a handle kept open keeps every page read so far mapped (and counted
        # in this process's memory) until the end of the conversion.
        with safe_open(self._file(name), "pt") as f:
            return f.get_tensor(name)

    def meta(self, name: str) -> torch.Tensor:
        """Tensor ``name`` on the meta device: its shape and dtype, from the file header only."""
        from safetensors import safe_open

        with safe_open(self._file(name), "pt") as f:
            info = f.get_slice(name)
            dtype = _SAFETENSORS_DTYPES.get(info.get_dtype())
            if dtype is None:
                raise ConversionError(f"tensor {name} has dtype {info.get_dtype()}, not a floating point weight")
            return torch.empty(info.get_shape(), dtype=dtype, device="meta")

    def _file(self, name: str) -> str:
        if name not in self.files:
            raise ConversionError(f"tensor {name} is missing from the safetensors files")
        return self.files[name]


def copy_tokenizer_files(source: str, target: str) -> List[str]:
    """Copy the transformers tokenizer files found in ``source`` into ``target``; their names."""
    found = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(source, n))]
    if found:
        os.makedirs(target, exist_ok=True)
    for name in found:
        shutil.copyfile(os.path.join(source, name), os.path.join(target, name))
    return found


def layout_flags(tensor_model_parallel_size: int, pipeline_model_parallel_size: int, dtype: str,
                 make_vocab_size_divisible_by: int) -> List[str]:
    """The flags of a checkpoint's layout: parallel sizes, vocabulary padding, parameter dtype."""
    return ["--tensor-model-parallel-size", str(tensor_model_parallel_size),
            "--pipeline-model-parallel-size", str(pipeline_model_parallel_size),
            "--make-vocab-size-divisible-by", str(make_vocab_size_divisible_by),
            ] + {"bfloat16": ["--bf16"], "float16": ["--fp16"]}.get(dtype, [])


def parse_megatron_args(argv: Sequence[str], world_size: int) -> argparse.Namespace:
    """``training/megatron_loop.py``'s parsing and validation of ``argv`` for a world of
    ``world_size`` processes, in this process (no job is started); Megatron-LM's printout of
    every argument is dropped, a refusal becomes a ConversionError."""
    from unittest import mock

    from arra_megatron.runtime import cpu_mode
    from arra_megatron.training import megatron_loop

    # Validation asserts CUDA_DEVICE_MAX_CONNECTIONS=1 at TP > 1; nothing runs on a GPU here.
    env = {"RANK": "0", "WORLD_SIZE": str(world_size),
           "CUDA_DEVICE_MAX_CONNECTIONS": os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS", "1")}
    out, err = io.StringIO(), io.StringIO()
    try:
        with mock.patch.dict(os.environ, env), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                cpu_mode.as_if_enabled():  # CPU mode's flag defaults, without switching this process into it
            args, _ = megatron_loop.parse_args(list(argv))
    except SystemExit as error:  # argparse (its message on stderr) or the project's rules (the message)
        reason = error.code if isinstance(error.code, str) else (err.getvalue().strip().splitlines() or ["?"])[-1]
        raise ConversionError(f"Megatron-LM's arguments refuse this model: {reason}") from None
    except (AssertionError, ValueError) as error:  # Megatron-LM's validate_args
        raise ConversionError(f"Megatron-LM's arguments refuse this model: {error}") from None
    return args


# Megatron local (CPU / non-TE) names -> the sharded keys dist checkpoints store them under.
SHARDED_KEYS = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}
LAYER_PARAMS = (
    "input_layernorm.weight",
    "self_attention.linear_qkv.weight",
    "self_attention.linear_proj.weight",
    "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.weight",
    "mlp.linear_fc2.weight",
)
# Per-head q/k LayerNorm (models/norms.py), flat [heads * head_dim] per layer.
QK_NORM_PARAMS = (
    "self_attention.q_layernorm.weight",
    "self_attention.q_layernorm.bias",
    "self_attention.k_layernorm.weight",
    "self_attention.k_layernorm.bias",
)


def layer_params(arch: "GPTArchitecture") -> Tuple[str, ...]:
    """The per-layer Megatron parameter names of ``arch``."""
    return LAYER_PARAMS + (QK_NORM_PARAMS if arch.qk_layernorm_per_head else ())

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def split_layer_name(name: str) -> Optional[Tuple[int, str]]:
    """``decoder.layers.3.mlp.linear_fc1.weight`` -> (3, ``mlp.linear_fc1.weight``); None otherwise."""
    match = _LAYER.match(name)
    return (int(match.group(1)), match.group(2)) if match else None


def sharded_key(local: str) -> Tuple[str, bool]:
    """The dist-checkpoint key of a per-layer (without ``decoder.layers.i.``) or global name,
    and whether it is stacked over layers."""
    if local in LAYER_PARAMS or local in QK_NORM_PARAMS:
        return "decoder.layers." + SHARDED_KEYS.get(local, local), True
    return local, False


def global_parameter_names(chunk: torch.nn.Module) -> Iterator[Tuple[str, torch.nn.Parameter]]:
    """A GPTModel chunk's parameters under their TP1/PP1 names (global layer index)."""
    numbers = {i: layer.layer_number - 1 for i, layer in enumerate(chunk.decoder.layers)}
    for name, param in chunk.named_parameters():
        parts = split_layer_name(name)
        if parts is not None:
            name = f"decoder.layers.{numbers[parts[0]]}.{parts[1]}"
        yield name, param


def tp_shard(name: str, full: torch.Tensor, param: torch.nn.Parameter, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This TP rank's part of the full tensor ``name`` for ``param``.

    Gated MLP fc1 is ``[gate; up]`` in full and ``[gate_r; up_r]`` on rank r; everything
    else splits contiguously along ``partition_dim`` (QKV is laid out by group, so a
    contiguous split gives each rank whole groups).
    """
    if not getattr(param, "tensor_model_parallel", False) or tp_size == 1:
        return full
    dim = param.partition_dim
    if name.endswith("mlp.linear_fc1.weight"):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp_size, dim=dim)[tp_rank], up.chunk(tp_size, dim=dim)[tp_rank]], dim=0)
    if full.size(dim) % tp_size:
        raise ConversionError(f"{name}: dimension {dim} of size {full.size(dim)} does not split over TP {tp_size}")
    return full.chunk(tp_size, dim=dim)[tp_rank]


def pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """Zero rows appended up to ``rows`` (the padded vocabulary)."""
    if tensor.size(0) > rows:
        raise ConversionError(f"vocabulary of {tensor.size(0)} rows exceeds the padded size {rows}")
    return torch.cat([tensor, tensor.new_zeros(rows - tensor.size(0), *tensor.shape[1:])]) if rows > tensor.size(0) else tensor


def check_new_output(path: str, flag: str) -> None:
    if os.path.lexists(path):
        raise ConversionError(f"{flag} {path} already exists; choose a new directory (nothing was written)")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ConversionError(f"{flag} {path}: parent directory {parent} does not exist")


@contextlib.contextmanager
def staged_output(path: str, flag: str) -> Iterator[str]:
    """A temporary directory beside ``path``, renamed to ``path`` only when the block succeeds."""
    check_new_output(path, flag)
    path = os.path.abspath(path)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.partial-", dir=os.path.dirname(path))
    try:
        yield tmp
        if os.path.lexists(path):
            raise ConversionError(f"{flag} {path} appeared while converting; nothing was written")
        os.rename(tmp, path)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str, data) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
