"""What the trainer reads: train / valid sample sources, vocabulary size, image-token range."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Optional, Tuple

from arra_megatron.data.mock import MockARRADataset


@dataclasses.dataclass
class TrainingData:
    train: Any  # index -> sample dict (tokens, labels, loss_mask, position_ids, arra_targets, ...)
    valid: Optional[Any]
    vocab_size: int
    image_token_range: Tuple[int, int]


_VALID_OFFSET = 1 << 40  # mock validation samples: indices no training step reaches


class _Offset:
    def __init__(self, source, offset: int):
        self.source, self.offset = source, offset

    def __getitem__(self, index: int):
        return self.source[self.offset + index]


def dataset_sizes(args: argparse.Namespace) -> list:
    """Samples each split must provide (Megatron-LM's rule): every training step, and
    ``--eval-iters`` global batches at every evaluation, plus a final one."""
    gbs = args.global_batch_size
    evaluations = args.train_iters // args.eval_interval + 1
    return [args.train_iters * gbs, evaluations * args.eval_iters * gbs, 0]


def build_training_data(args: argparse.Namespace) -> TrainingData:
    if args.mock_data:
        mock = MockARRADataset(args.vocab_size, args.seq_length, args.arra_target_dim, seed=args.seed,
                               loss_on_text=args.loss_on_text)
        return TrainingData(mock, _Offset(mock, _VALID_OFFSET), args.vocab_size, mock.image_token_range)
    from arra_megatron.data.dataset import build_arra_datasets

    (train, valid, _), profile = build_arra_datasets(
        args.data_path, args.split, args.seq_length, args.seed, dataset_sizes(args),
        condition_dropout_prob=args.condition_dropout_prob, loss_on_text=args.loss_on_text,
        with_features=args.arra and args.arra_targets == "precomputed",
        with_images=args.arra and args.arra_targets == "online",
    )
    vocab = max(profile.vocab_size, args.vocab_size or 0)
    return TrainingData(train, valid, vocab, profile.image_token_range)
