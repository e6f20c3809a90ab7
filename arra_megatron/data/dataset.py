"""ARRADataset: a Megatron-Core ``MegatronDataset`` over a dataset prefix written by the builder.

Built through Megatron's ``BlendedMegatronDatasetBuilder``, so ``--data-path
"W1 P1 W2 P2"`` blending and ``--split`` work as in Megatron-LM. Per sample it gives
token ids padded to the sequence length, labels, the loss mask, position ids, the
sample id and, when the prefix has them, the precomputed ARRA target f_GF
(``arra_targets``; ``arra_valid`` is False for a sample whose image the encoder could
not read, so its L_GVA term is dropped). Condition dropout for classifier-free
guidance replaces the whole condition with the profile's null-condition token with
probability ``condition_dropout_prob``, decided per (seed, split, sample position).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import BlendedMegatronDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.megatron_dataset import MegatronDataset
from megatron.core.datasets.utils import Split

from arra_megatron.data.checks import data_blend
from arra_megatron.data.image_refs import ImageRefTable, read_image_bytes
from arra_megatron.data.manifest import DatasetManifest
from arra_megatron.data.samples import sample_from_document
from arra_megatron.tokenization.profile import TokenizerProfile


def read_layout(prefixes: List[str]) -> Tuple[TokenizerProfile, Dict[str, int]]:
    """The tokenizer profile the datasets at ``prefixes`` share, and the width D of the
    precomputed targets of each prefix that has a feature table (prefix -> D)."""
    manifests = [DatasetManifest.read(prefix) for prefix in prefixes]
    for prefix, manifest in zip(prefixes[1:], manifests[1:]):
        if manifest.tokenizer_profile != manifests[0].tokenizer_profile:
            raise ValueError(f"--data-path: {prefix} has a different tokenizer profile than {prefixes[0]}; "
                             "blended datasets and held-out sets must share one vocabulary layout")
    dims = {prefix: m.feature_dim for prefix, m in zip(prefixes, manifests) if m.feature_dim is not None}
    return manifests[0].tokenizer_profile, dims


class ARRALowLevelDataset:
    """One prefix on disk: the token documents, and the feature table when present."""

    def __init__(self, prefix: str, with_features: bool, with_images: bool = False):
        self.prefix = prefix
        self.manifest = DatasetManifest.read(prefix)
        self.profile = self.manifest.tokenizer_profile
        self.documents = IndexedDataset(prefix, mmap=True)
        self.features = None
        if with_features:
            table = self.manifest.features
            if table is None:
                raise FileNotFoundError(
                    f"{prefix} has no precomputed ARRA targets: add them with tools/precompute_features.py, "
                    "or use --arra-targets online --arra-encoder SPEC")
            self.features = np.load(os.path.join(os.path.dirname(prefix), table.file), mmap_mode="r")
            if len(self.features) != len(self.documents):
                raise ValueError(f"{prefix}: {len(self.features)} feature rows for {len(self.documents)} samples")
        self.images = ImageRefTable.load(prefix) if with_images else None

    def __len__(self) -> int:
        return len(self.documents)


@dataclass
class ARRADatasetConfig(BlendedMegatronDatasetConfig):
    """Megatron's dataset config plus what an ARRA sample needs."""

    profile: Optional[TokenizerProfile] = None
    condition_dropout_prob: float = 0.0
    loss_on_text: bool = False
    with_features: bool = False
    with_images: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.profile is None:
            raise ValueError("ARRADatasetConfig needs the datasets' tokenizer profile")
        if not 0.0 <= self.condition_dropout_prob <= 1.0:
            raise ValueError(f"--condition-dropout-prob must be in [0, 1] (1: unconditional); got "
                             f"{self.condition_dropout_prob}")


class ARRADataset(MegatronDataset):
    def __init__(self, dataset: ARRALowLevelDataset, dataset_path: Optional[str], indices: np.ndarray,
                 num_samples: Optional[int], index_split: Split, config: ARRADatasetConfig) -> None:
        super().__init__(dataset, dataset_path, indices, num_samples, index_split, config)
        if dataset.profile != config.profile:
            raise ValueError(f"{dataset_path}: its tokenizer profile differs from the other datasets' "
                             "(blended datasets must share one vocabulary layout)")
        # Epochs of the split's documents, each in its own shuffled order.
        count = len(indices)
        epochs = 1 if not num_samples or count == 0 else -(-num_samples // count)
        rng = np.random.RandomState(config.random_seed)
        self.sample_index = np.concatenate([indices[rng.permutation(count)] for _ in range(epochs)]) \
            if count else np.zeros(0, dtype=np.int64)

    @staticmethod
    def numel_low_level_dataset(low_level_dataset: ARRALowLevelDataset) -> int:
        return len(low_level_dataset)

    @staticmethod
    def build_low_level_dataset(dataset_path: str, config: ARRADatasetConfig) -> ARRALowLevelDataset:
        return ARRALowLevelDataset(dataset_path, config.with_features, config.with_images)

    @staticmethod
    def _key_config_attributes() -> List[str]:
        return ["random_seed", "sequence_length", "split", "split_matrix", "condition_dropout_prob",
                "loss_on_text"]

    def __len__(self) -> int:
        return len(self.sample_index)

    def __getitem__(self, idx: int) -> Dict[str, torch.Tensor]:
        cfg: ARRADatasetConfig = self.config
        profile = cfg.profile
        doc_id = int(self.sample_index[idx])
        doc = np.asarray(self.dataset.documents[doc_id], dtype=np.int64)
        if cfg.condition_dropout_prob:
            rng = np.random.default_rng((cfg.random_seed, self.index_split.value, idx))
            if rng.random() < cfg.condition_dropout_prob:
                doc = drop_condition(doc, profile)
        sample = sample_from_document(doc, cfg.sequence_length, profile.image_token_range, profile.special.eoi,
                                      profile.special.pad, cfg.loss_on_text)
        sample["sample_id"] = torch.tensor(doc_id)
        if self.dataset.features is not None:
            row = torch.from_numpy(np.asarray(self.dataset.features[doc_id], dtype=np.float32))
            valid = bool(torch.isfinite(row).all())
            sample["arra_targets"] = row if valid else torch.zeros_like(row)
            sample["arra_valid"] = torch.tensor(valid)
        if self.dataset.images is not None:  # online targets: the encoded image, decoded by DALI later
            # Python bytes: torch's default collate (Megatron's loader) keeps them as a list, while
            # arrays of different lengths would not stack.
            sample["image_bytes"] = read_image_bytes(self.dataset.images, [doc_id])[0]
        return sample


def drop_condition(document: np.ndarray, profile: TokenizerProfile) -> np.ndarray:
    """``[BOS] condition [BOI] ...`` -> ``[BOS] [NULL] [BOI] ...`` (the CFG null condition)."""
    boi = np.flatnonzero(document == profile.special.boi)
    if len(boi) == 0:
        return document
    return np.concatenate([[profile.special.bos, profile.special.null_condition], document[boi[0]:]])


def build_arra_datasets(data_path: Optional[List[str]], split: str, seq_length: int, seed: int,
                        sizes: List[Optional[int]], condition_dropout_prob: float = 0.0,
                        loss_on_text: bool = False, with_features: bool = False, with_images: bool = False,
                        per_split: Optional[List[Optional[List[str]]]] = None):
    """(train, valid, test) datasets, blended and split as Megatron-LM does: ``data_path`` cut by
    ``split``, or ``per_split`` = [train, valid, test] data paths (``--train-data-path`` ...; None
    for a split that has none)."""
    if per_split is not None:
        blends = {"blend": None, "split": None,
                  "blend_per_split": [data_blend(p, flag) if p else None for p, flag in
                                      zip(per_split, ("--train-data-path", "--valid-data-path", "--test-data-path"))]}
    else:
        blends = {"blend": data_blend(data_path), "split": split}
    used = [blend for blend in (blends.get("blend_per_split") or [blends["blend"]]) if blend]
    prefixes = [prefix for blend_prefixes, _ in used for prefix in blend_prefixes]
    profile, _ = read_layout(prefixes)
    config = ARRADatasetConfig(
        random_seed=seed, sequence_length=seq_length, **blends,
        profile=profile, condition_dropout_prob=condition_dropout_prob, loss_on_text=loss_on_text,
        with_features=with_features, with_images=with_images, mid_level_dataset_surplus=0.005,
    )
    datasets = BlendedMegatronDatasetBuilder(ARRADataset, sizes, lambda: True, config).build()
    return datasets, profile
