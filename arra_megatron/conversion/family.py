"""The model-family protocol: what a Hugging Face family declares so that import and export
can convert it.

A family is a ``ModelFamily`` subclass: the ``architectures`` of ``config.json`` it reads, the
architecture record of a transformers config and back, and a name table, Megatron name ->
Hugging Face name, for the tensors that map one to one, plus ``Fused`` transforms for the
Megatron tensors made of several Hugging Face ones (fused QKV, gated fc1) or reshaped (per-head
norms). Everything else (the names an import requires, the tensor of each Megatron parameter
on import, the Hugging Face tensors of each Megatron tensor on export, the vocabulary padding)
follows from those tables here. Families are registered in ``arra_megatron.conversion.FAMILIES``.

Megatron names are those of a TP1/PP1 GPTModel in CPU mode (``common.py``); Hugging Face names
are given per layer (``self_attn.o_proj.weight``) under ``layer_prefix``.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Callable, ClassVar, Dict, Iterator, Optional, Sequence, Set, Tuple

import torch

from arra_megatron.conversion.common import ConversionError, GPTArchitecture, SafetensorsDir, layer_params, \
    pad_rows, split_layer_name

# The Megatron tensors whose rows are the vocabulary: padded with zero rows on import, cut on export.
VOCAB_ROWS = ("embedding.word_embeddings.weight", "output_layer.weight")


@dataclasses.dataclass(frozen=True)
class Fused:
    """A Megatron tensor made from the Hugging Face tensors ``hf`` (in that order) by
    ``to_megatron``, and split back into them by ``to_hf``; both also take the architecture."""

    hf: Tuple[str, ...]
    to_megatron: Callable[[Sequence[torch.Tensor], GPTArchitecture], torch.Tensor]
    to_hf: Callable[[torch.Tensor, GPTArchitecture], Sequence[torch.Tensor]]


def _fuse_qkv(qkv: Sequence[torch.Tensor], arch: GPTArchitecture) -> torch.Tensor:
    """[nh d, H], [ng d, H], [ng d, H] -> Megatron's [(nh + 2 ng) d, H]: for each key/value
    group g, its ``nh / ng`` query heads, then k[g], then v[g]."""
    q, k, v = qkv
    ng, d = arch.num_query_groups, arch.kv_channels
    hidden = q.size(-1)
    return torch.cat([q.reshape(ng, -1, hidden), k.reshape(ng, d, hidden), v.reshape(ng, d, hidden)],
                     dim=1).reshape(-1, hidden)


def _split_qkv(qkv: torch.Tensor, arch: GPTArchitecture) -> Tuple[torch.Tensor, ...]:
    """Inverse of ``_fuse_qkv``."""
    ng, d = arch.num_query_groups, arch.kv_channels
    per_group = arch.num_attention_heads // ng
    hidden = qkv.size(-1)
    expected = (arch.num_attention_heads + 2 * ng) * d
    if qkv.size(0) != expected:
        raise ConversionError(f"linear_qkv has {qkv.size(0)} rows; heads {arch.num_attention_heads}, groups {ng}, "
                              f"head dim {d} need {expected}")
    parts = qkv.reshape(ng, (per_group + 2) * d, hidden).split([per_group * d, d, d], dim=1)
    return tuple(part.reshape(-1, hidden).clone() for part in parts)


def _split_gate_up(fc1: torch.Tensor, arch: GPTArchitecture) -> Tuple[torch.Tensor, ...]:
    if fc1.size(0) != 2 * arch.ffn_hidden_size:
        raise ConversionError(f"linear_fc1 has {fc1.size(0)} rows, expected 2 x ffn {arch.ffn_hidden_size}")
    return tuple(part.clone() for part in fc1.chunk(2, dim=0))


def fused_qkv(q: str, k: str, v: str) -> Fused:
    """Megatron's ``linear_qkv`` from separate query, key and value projections."""
    return Fused((q, k, v), _fuse_qkv, _split_qkv)


def gated_fc1(gate: str, up: str) -> Fused:
    """Megatron's SwiGLU ``linear_fc1 = [gate; up]`` (computing ``silu(gate) * up``)."""
    return Fused((gate, up), lambda parts, arch: torch.cat(list(parts)), _split_gate_up)


def per_head(hf: str, query: bool) -> Fused:
    """A per-head norm parameter: ``(heads, head_dim)`` in Hugging Face (query or key/value
    heads), flat ``[heads * head_dim]`` in Megatron (``models/norms.py``)."""
    def to_hf(flat: torch.Tensor, arch: GPTArchitecture) -> Tuple[torch.Tensor]:
        heads = arch.num_attention_heads if query else arch.num_query_groups
        if flat.numel() != heads * arch.kv_channels:
            raise ConversionError(f"{hf} has {flat.numel()} values, expected {heads} heads x {arch.kv_channels}")
        return (flat.reshape(heads, arch.kv_channels),)

    return Fused((hf,), lambda parts, arch: parts[0].reshape(-1), to_hf)


class ModelFamily(abc.ABC):
    """A Hugging Face model family, declared: its tables and two config functions; import and
    export are derived from them. Subclasses set the class attributes and implement the
    abstract methods; the hooks default to nothing."""

    model_type: ClassVar[str]                 # the checkpoint's GPTArchitecture.model_type
    architectures: ClassVar[Tuple[str, ...]]  # config.json "architectures" read (the first is written)
    # Megatron global name -> Hugging Face name (the output layer's is read from the embedding when tied).
    names: ClassVar[Dict[str, str]]
    layer_prefix: ClassVar[str] = "model.layers.{}."
    # Megatron per-layer name -> Hugging Face per-layer name, one to one.
    layer_names: ClassVar[Dict[str, str]]
    # Megatron per-layer name -> how it is made from Hugging Face tensors.
    layer_transforms: ClassVar[Dict[str, Fused]] = {}
    # Hugging Face tensors that are not part of the GPT (import leaves them to ``write_import_extras``).
    auxiliary_prefixes: ClassVar[Tuple[str, ...]] = ()

    @abc.abstractmethod
    def architecture_from_hf(self, config) -> GPTArchitecture:
        """The Megatron architecture of a transformers config of this family; fails on what the
        tables would not reproduce exactly."""

    @abc.abstractmethod
    def hf_config(self, arch: GPTArchitecture, source: Optional[dict] = None, **extra):
        """The transformers config reproducing ``arch`` (``source``: the import record, when found;
        ``extra``: further config fields such as token ids)."""

    # ------------------------------------------------------------------ hooks
    def write_import_extras(self, hf: SafetensorsDir, config, out_dir: str, final_dir: str, record: dict) -> None:
        """Write what the checkpoint does not hold into the import's staging directory ``out_dir``
        (renamed to ``final_dir`` at the end) and add it to the import ``record``."""

    def auxiliary_source(self, import_dir: Optional[str]) -> Optional[Tuple[SafetensorsDir, str]]:
        """The tensors that export writes beside the GPT's (kept by the import in ``import_dir``)
        and the prefix of their Hugging Face names."""
        return None

    # ------------------------------------------------------------------ derived
    def _layer_entry(self, local: str):
        if local in self.layer_names:
            return self.layer_names[local]
        if local in self.layer_transforms:
            return self.layer_transforms[local]
        raise ConversionError(f"Megatron parameter {local} has no {self.model_type} counterpart")

    def _hf_global(self, name: str, arch: GPTArchitecture) -> str:
        if name == "output_layer.weight" and arch.tie_embeddings:
            name = "embedding.word_embeddings.weight"
        if name not in self.names:
            raise ConversionError(f"Megatron parameter {name} has no {self.model_type} counterpart")
        return self.names[name]

    def expected_hf_names(self, arch: GPTArchitecture) -> Set[str]:
        """The Hugging Face tensor names of ``arch`` (what import requires, export writes),
        without the auxiliary ones."""
        names = {self._hf_global(name, arch) for name in self.names}
        for local in layer_params(arch):
            entry = self._layer_entry(local)
            for hf in entry.hf if isinstance(entry, Fused) else (entry,):
                names.update(self.layer_prefix.format(i) + hf for i in range(arch.num_layers))
        return names

    def megatron_tensor(self, name: str, read: Callable[[str], torch.Tensor], arch: GPTArchitecture,
                        padded_vocab_size: int) -> torch.Tensor:
        """The full Megatron tensor ``name`` (TP1/PP1 name, global layer index) from the Hugging
        Face tensors ``read(hf_name)`` returns; the vocabulary is padded to ``padded_vocab_size``."""
        parts = split_layer_name(name)
        if parts is None:
            tensor = read(self._hf_global(name, arch))
            return pad_rows(tensor, padded_vocab_size) if name in VOCAB_ROWS else tensor
        prefix = self.layer_prefix.format(parts[0])
        entry = self._layer_entry(parts[1])
        if isinstance(entry, Fused):
            return entry.to_megatron([read(prefix + hf) for hf in entry.hf], arch)
        return read(prefix + entry)

    def hf_tensors(self, name: str, tensor: torch.Tensor, arch: GPTArchitecture) -> Iterator[Tuple[str, torch.Tensor]]:
        """The Hugging Face tensors made from the one full Megatron tensor ``name``; the
        vocabulary padding is dropped, a tied output layer gives none."""
        parts = split_layer_name(name)
        if parts is None:
            if name == "output_layer.weight" and arch.tie_embeddings:
                return
            yield self._hf_global(name, arch), tensor[: arch.vocab_size].clone() if name in VOCAB_ROWS else tensor
            return
        prefix = self.layer_prefix.format(parts[0])
        entry = self._layer_entry(parts[1])
        if isinstance(entry, Fused):
            yield from ((prefix + hf, part) for hf, part in zip(entry.hf, entry.to_hf(tensor, arch)))
        else:
            yield prefix + entry, tensor
