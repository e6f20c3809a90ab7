"""The dataset manifest ``PREFIX.json``: what a dataset prefix holds, as one typed record.

The builder writes it last (its presence marks a finished dataset),
tools/precompute_features.py rewrites it when it adds the feature table f_GF, and
training, conversion and sampling read the tokenizer profile, the longest document
and the target width D from it. Every reader and writer goes through
``DatasetManifest.read`` / ``DatasetManifest.write``; the record is validated once,
when it is made.

Format versions (``format_version`` in the file):
- 1: the first builder's manifests, which carry no ``format_version`` field;
- 2: the same fields, plus ``format_version``.
A manifest of a newer version (or of another format) is refused with a message
saying what to do.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import AbstractSet, Any, Dict, Mapping, Optional

import numpy as np

from arra_megatron.fileio import write_json_atomic
from arra_megatron.tokenization.profile import TokenizerProfile

FORMAT = "arra-indexed-dataset"
FORMAT_VERSION = 2
REBUILD = "rebuild the dataset with tools/build_indexed_dataset.py --overwrite"


class ManifestError(ValueError):
    """A manifest that cannot be read; the message names the file and what to do."""


def manifest_path(prefix: str) -> str:
    """Where the manifest of dataset ``prefix`` lives."""
    return f"{prefix}.json"


def _json_form(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), so a manifest equals its round trip."""
    return json.loads(json.dumps(value))


def _check_keys(data: Mapping[str, Any], where: str, required: AbstractSet[str],
                optional: AbstractSet[str] = frozenset()) -> None:
    missing, unknown = sorted(required - set(data)), sorted(set(data) - required - optional)
    if missing:
        raise ValueError(f"{where} lacks {missing}")
    if unknown:
        raise ValueError(f"{where} has unknown fields {unknown}")


@dataclass(frozen=True)
class FeatureTable:
    """``PREFIX.features.npy``: the precomputed ARRA targets f_GF, one row per sample (a NaN row: no target).

    Attributes:
        file: its file name, beside the manifest.
        num_rows, dim: its shape [N, D]; D is the target width (``--arra-target-dim`` defaults to it).
        encoder: the encoder's identity (``TargetEncoder.identity``); training refuses to mix two.
        aggregation: how the encoder's tokens became one vector (cls | avgpool | concat).
        preprocessing: the encoder's ``PreprocessSpec.to_dict()``.
        samples_without_target: NaN rows (images the encoder's preprocessing could not decode).
        dtype: the numpy dtype of the rows.
    """

    file: str
    num_rows: int
    dim: int
    encoder: Mapping[str, Any]
    aggregation: str
    preprocessing: Mapping[str, Any]
    samples_without_target: int = 0
    dtype: str = "float16"

    def __post_init__(self) -> None:
        object.__setattr__(self, "encoder", _json_form(dict(self.encoder)))
        object.__setattr__(self, "preprocessing", _json_form(dict(self.preprocessing)))
        if self.num_rows < 0 or self.dim < 1:
            raise ValueError(f"features: shape [{self.num_rows}, {self.dim}] is not a table of targets")
        if not 0 <= self.samples_without_target <= self.num_rows:
            raise ValueError(f"features: {self.samples_without_target} samples without target out of "
                             f"{self.num_rows}")

    def to_dict(self) -> Dict[str, Any]:
        return {"file": self.file, "dtype": self.dtype, "shape": [self.num_rows, self.dim], "dim": self.dim,
                "encoder": self.encoder, "aggregation": self.aggregation, "preprocessing": self.preprocessing,
                "samples_without_target": self.samples_without_target}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "FeatureTable":
        _check_keys(data, "features", {"file", "dtype", "shape", "dim", "encoder", "aggregation", "preprocessing",
                                       "samples_without_target"})
        num_rows, dim = (int(n) for n in data["shape"])
        if int(data["dim"]) != dim:
            raise ValueError(f"features: dim {data['dim']} differs from its shape {data['shape']}")
        return cls(file=str(data["file"]), num_rows=num_rows, dim=dim, encoder=data["encoder"],
                   aggregation=str(data["aggregation"]), preprocessing=data["preprocessing"],
                   samples_without_target=int(data["samples_without_target"]), dtype=str(data["dtype"]))


@dataclass(frozen=True)
class DatasetFiles:
    """The names (beside the manifest) of a prefix's files."""

    tokens: str
    index: str
    images: str
    image_sources: str
    features: Optional[str] = None

    @classmethod
    def named(cls, name: str) -> "DatasetFiles":
        """The builder's names for prefix base name ``name`` (without a feature table)."""
        return cls(f"{name}.bin", f"{name}.idx", f"{name}.images.npy", f"{name}.images.sources.json")

    def to_dict(self) -> Dict[str, str]:
        return {key: value for key, value in dataclasses.asdict(self).items() if value is not None}

    @classmethod
    def from_dict(cls, data: Mapping[str, str]) -> "DatasetFiles":
        _check_keys(data, "files", {"tokens", "index", "images", "image_sources"}, {"features"})
        return cls(**data)


@dataclass(frozen=True)
class BuildCounts:
    """What a build made of its inputs: samples written, inputs skipped, captions cut to fit, parts merged."""

    samples: int
    skipped: int = 0
    text_truncated: int = 0
    parts: int = 1


@dataclass(frozen=True)
class DatasetManifest:
    """``PREFIX.json``: what dataset ``PREFIX`` holds and how it was made.

    Attributes:
        num_samples: documents in ``PREFIX.bin/.idx`` (one per sample).
        token_dtype: numpy dtype of the stored token ids (uint16 when the vocabulary fits).
        max_seq_length: the builder's ``--max-seq-length`` (no document is longer).
        tokenizer_profile: how to read the token ids (vocabulary layout, special ids, VQ model).
        files: the prefix's file names.
        counts: what the build made of its inputs.
        builder_version: version of the builder that wrote the dataset.
        input: the reader's description of the raw inputs (kind, paths, fingerprint, ...).
        skipped: inputs left out, by reason; ``skip_reasons`` says what each reason means.
        features: the precomputed ARRA targets, None without them.
        control: for a control dataset derived from another (tools/study.py), how it was derived.
    """

    num_samples: int
    token_dtype: str
    max_seq_length: int
    tokenizer_profile: TokenizerProfile
    files: DatasetFiles
    counts: BuildCounts
    builder_version: str
    input: Mapping[str, Any] = field(default_factory=dict)
    skipped: Mapping[str, int] = field(default_factory=dict)
    skip_reasons: Mapping[str, str] = field(default_factory=dict)
    features: Optional[FeatureTable] = None
    control: Optional[Mapping[str, Any]] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "input", _json_form(dict(self.input)))
        object.__setattr__(self, "skipped", {str(k): int(v) for k, v in self.skipped.items()})
        object.__setattr__(self, "skip_reasons", dict(self.skip_reasons))
        if self.control is not None:
            object.__setattr__(self, "control", _json_form(dict(self.control)))
        if not isinstance(self.tokenizer_profile, TokenizerProfile):
            raise TypeError(f"tokenizer_profile must be a TokenizerProfile, not {type(self.tokenizer_profile)}")
        if np.dtype(self.token_dtype).kind not in "iu":
            raise ValueError(f"token_dtype {self.token_dtype} is not an integer type")
        if self.max_seq_length < 1 or self.num_samples < 0:
            raise ValueError(f"max_seq_length {self.max_seq_length}, num_samples {self.num_samples}")
        if (self.counts.samples, self.counts.skipped) != (self.num_samples, sum(self.skipped.values())):
            raise ValueError(f"counts {dataclasses.asdict(self.counts)} disagree with num_samples "
                             f"{self.num_samples} and skipped {self.skipped}")
        if set(self.skip_reasons) != set(self.skipped):
            raise ValueError(f"skip_reasons explain {sorted(self.skip_reasons)}, not the skipped "
                             f"{sorted(self.skipped)}")
        if self.files.features != (self.features.file if self.features else None):
            raise ValueError(f"files.features {self.files.features} is not the feature table's file "
                             f"{self.features.file if self.features else None}")
        if self.features is not None and self.features.num_rows != self.num_samples:
            raise ValueError(f"the feature table has {self.features.num_rows} rows for {self.num_samples} samples")

    @property
    def feature_dim(self) -> Optional[int]:
        """D, the width of the precomputed targets (None without a feature table)."""
        return None if self.features is None else self.features.dim

    def with_features(self, features: Optional[FeatureTable]) -> "DatasetManifest":
        """This manifest with ``features`` as its feature table (None: without one)."""
        files = dataclasses.replace(self.files, features=None if features is None else features.file)
        return dataclasses.replace(self, features=features, files=files)

    def to_dict(self) -> Dict[str, Any]:
        """The JSON form written to ``PREFIX.json`` (as it reads back)."""
        data = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "builder_version": self.builder_version,
            "num_samples": self.num_samples,
            "token_dtype": self.token_dtype,
            "max_seq_length": self.max_seq_length,
            "tokenizer_profile": self.tokenizer_profile.to_dict(),
            "input": self.input,
            "counts": dataclasses.asdict(self.counts),
            "skipped": self.skipped,
            "skip_reasons": self.skip_reasons,
            "files": self.files.to_dict(),
            "features": None if self.features is None else self.features.to_dict(),
        }
        if self.control is not None:
            data["control"] = self.control
        return _json_form(data)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "DatasetManifest":
        """A manifest from its JSON form, any format version up to ``FORMAT_VERSION``; ManifestError otherwise."""
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, Mapping) else type(data).__name__
            raise ManifestError(f"not an ARRA dataset manifest (format {found!r}, expected {FORMAT!r}); "
                                "build the dataset with tools/build_indexed_dataset.py")
        version = data.get("format_version", 1)  # version 1 had no such field
        if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
            raise ManifestError(f"manifest format version {version!r}; this arra_megatron reads versions 1 to "
                                f"{FORMAT_VERSION}: upgrade arra_megatron (a newer one wrote it), or {REBUILD}")
        try:
            _check_keys(data, "the manifest", {
                "format", "builder_version", "num_samples", "token_dtype", "max_seq_length", "tokenizer_profile",
                "input", "counts", "skipped", "skip_reasons", "files", "features"}, {"format_version", "control"})
            _check_keys(data["counts"], "counts", {"samples", "skipped", "text_truncated", "parts"})
            features = None if data["features"] is None else FeatureTable.from_dict(data["features"])
            return cls(
                num_samples=int(data["num_samples"]), token_dtype=str(data["token_dtype"]),
                max_seq_length=int(data["max_seq_length"]),
                tokenizer_profile=TokenizerProfile.from_dict(data["tokenizer_profile"]),
                files=DatasetFiles.from_dict(data["files"]),
                counts=BuildCounts(**{key: int(value) for key, value in data["counts"].items()}),
                builder_version=str(data["builder_version"]), input=data["input"], skipped=data["skipped"],
                skip_reasons=data["skip_reasons"], features=features, control=data.get("control"))
        except (KeyError, TypeError, ValueError) as error:
            raise ManifestError(f"malformed manifest ({error}); {REBUILD}") from error

    @classmethod
    def read(cls, prefix: str) -> "DatasetManifest":
        """The manifest of dataset ``prefix``; FileNotFoundError when it is not a finished dataset,
        ManifestError (naming the file) when the file cannot be read as a manifest."""
        path = manifest_path(prefix)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no manifest; {prefix} is not a finished dataset "
                                    "(build it with tools/build_indexed_dataset.py)")
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as error:
                raise ManifestError(f"{path}: not JSON ({error}); {REBUILD}") from None
        try:
            return cls.from_dict(data)
        except ManifestError as error:
            raise ManifestError(f"{path}: {error}") from error

    def write(self, prefix: str) -> None:
        """Write ``PREFIX.json`` atomically (a reader never sees a half-written manifest)."""
        write_json_atomic(manifest_path(prefix), self.to_dict())
