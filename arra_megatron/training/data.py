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


def build_training_data(args: argparse.Namespace) -> TrainingData:
    if args.mock_data:
        mock = MockARRADataset(args.vocab_size, args.seq_length, args.arra_target_dim, seed=args.seed,
                               loss_on_text=args.loss_on_text)
        return TrainingData(mock, _Offset(mock, _VALID_OFFSET), args.vocab_size, mock.image_token_range)
    raise NotImplementedError(
        "--data-path datasets arrive with ARRADataset (issue #3); use --mock-data for now"
    )
