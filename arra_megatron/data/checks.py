"""Data flags against the datasets they name, checked before any work starts.

``--data-path`` and the per-split ``--*-data-path`` follow Megatron-LM's convention
(``PREFIX`` or ``W1 PREFIX1 W2 PREFIX2 ...``, parsed by Megatron-Core's
``get_blend_from_list``). Every error names the flag and the dataset to change.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

DATA_PATH_FLAGS = ("data_path", "train_data_path", "valid_data_path", "test_data_path")


class DataFlagError(ValueError):
    """A data flag that does not fit the datasets; the message names the flag."""


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def named_data_paths(args: dict) -> List[Tuple[str, List[str]]]:
    """``(flag, value)`` of each data-path flag a run (or a checkpoint's saved arguments) gives."""
    return [(_flag(name), args[name]) for name in DATA_PATH_FLAGS if args.get(name)]


def training_data_path(args: dict) -> Optional[List[str]]:
    """The datasets a run trains on: ``--data-path`` or ``--train-data-path`` (None with mock data)."""
    return args.get("data_path") or args.get("train_data_path")


def data_blend(data_path: List[str], flag: str = "--data-path") -> Tuple[List[str], Optional[List[float]]]:
    """(dataset prefixes, blend weights or None) of a data-path flag, as Megatron-Core parses it."""
    from megatron.core.datasets.utils import get_blend_from_list

    try:
        prefixes, weights = get_blend_from_list(list(data_path))
    except (ValueError, AssertionError):
        raise DataFlagError(f"{flag} with several datasets takes pairs: 'W1 PREFIX1 W2 PREFIX2 ...'") from None
    return list(prefixes), weights


def data_prefixes(data_path: List[str], flag: str = "--data-path") -> List[str]:
    """The dataset prefixes of a data-path flag (with or without blend weights)."""
    return data_blend(data_path, flag)[0]


def check_data_flags(args, layout_check) -> None:
    """Every dataset a data flag names exists and fits the model flags in ``args``:
    vocabulary within ``--vocab-size``, documents within ``--seq-length``, precomputed
    targets present (unless online or ``--no-arra``) and from one encoder.
    ``layout_check(has_images)`` validates the ARRA settings against a dataset's sample layout
    (its D is compared by ``ARRAConfig.with_target_dim``)."""
    import os

    from arra_megatron.data.manifest import DatasetManifest

    named = named_data_paths(vars(args))
    precomputed = args.arra and getattr(args, "arra_targets", "precomputed") == "precomputed"
    for flag, data_path in named:
        for prefix in data_prefixes(data_path, flag):
            missing = [ext for ext in (".bin", ".idx", ".json") if not os.path.isfile(prefix + ext)]
            if missing:
                raise DataFlagError(f"{flag} {prefix}: no dataset there (missing "
                                    f"{', '.join(prefix + e for e in missing)}; build it with "
                                    "tools/build_indexed_dataset.py)")
            manifest = DatasetManifest.read(prefix)
            profile = manifest.tokenizer_profile
            if args.vocab_size is not None and profile.vocab_size > args.vocab_size:
                raise DataFlagError(f"--vocab-size {args.vocab_size} is smaller than the vocabulary of {flag} "
                                    f"{prefix} ({profile.vocab_size}); raise it or drop --vocab-size")
            longest = manifest.max_seq_length
            if longest > args.seq_length + 1:
                raise DataFlagError(f"{flag} {prefix} holds documents of up to {longest} tokens; --seq-length "
                                    f"{args.seq_length} would cut them (use --seq-length {longest - 1})")
            if precomputed:
                if manifest.features is None:
                    raise DataFlagError(f"{flag} {prefix} has no precomputed ARRA targets: add them with "
                                        "tools/precompute_features.py, use --arra-targets online, or --no-arra")
                layout_check(profile.tokens_per_image > 0)
    if precomputed:
        check_one_encoder(named)


def check_one_encoder(named_paths: List[Tuple[str, List[str]]]) -> None:
    """Precomputed targets of every training and held-out dataset come from one encoder (its identity:
    weights hash, aggregation, preprocessing), or the losses would mix incomparable target spaces."""
    from arra_megatron.data.manifest import DatasetManifest

    seen: Optional[Tuple[str, dict]] = None
    for flag, data_path in named_paths:
        for prefix in data_prefixes(data_path, flag):
            identity = DatasetManifest.read(prefix).features.encoder
            if seen is None:
                seen = (f"{flag} {prefix}", identity)
            elif identity != seen[1]:
                raise DataFlagError(f"{flag} {prefix}: its precomputed ARRA targets come from another encoder than "
                                    f"those of {seen[0]} ({(identity or {}).get('name')} vs "
                                    f"{(seen[1] or {}).get('name')}); recompute them with "
                                    "tools/precompute_features.py and one --encoder")
