"""What the trainer reads: train / valid sample sources, vocabulary size, image-token range."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Optional, Tuple

import torch

from arra_megatron.data.mock import MockARRADataset, MockSplit


@dataclasses.dataclass
class TrainingData:
    train: Any  # index -> sample dict (tokens, labels, loss_mask, position_ids, arra_targets, ...)
    valid: Optional[Any]
    vocab_size: int
    image_token_range: Tuple[int, int]


class RankBatchSampler:
    """This data-parallel rank's micro-batches, in Megatron's order, from ``consumed_samples`` on.

    Global batch g holds samples [g*G, (g+1)*G); its micro-batch j on DP rank r holds the
    ``mbs`` samples starting at g*G + j*mbs*dp + r*mbs. The sequence depends only on the
    consumed-sample count, so a resumed run reads exactly what an uninterrupted one would,
    in any DP layout the global batch is the same set of samples.
    """

    def __init__(self, consumed_samples: int, micro_batch_size: int, data_parallel_size: int,
                 data_parallel_rank: int, total_samples: int):
        self.start, self.mbs = consumed_samples, micro_batch_size
        self.dp, self.rank, self.total = data_parallel_size, data_parallel_rank, total_samples

    def __iter__(self):
        step = self.mbs * self.dp
        for base in range(self.start, self.total, step):
            first = base + self.rank * self.mbs
            yield list(range(first, first + self.mbs))

    def __len__(self) -> int:
        return max(0, -(-(self.total - self.start) // (self.mbs * self.dp)))


def micro_batch_loader(source, sampler: RankBatchSampler, num_workers: int):
    """Micro-batches from ``source`` in ``sampler``'s order; ``num_workers`` background processes
    read and assemble ahead of the training step (0: in the training process).

    The loader draws its workers' base seed from a generator of its own, not from torch's
    default one: that is also dropout's generator on CPU, and a draw there when a resumed run
    (or an evaluation) builds a loader would change every later dropout mask. The samples
    themselves depend only on their index, so the base seed changes nothing else.
    """
    from torch.utils.data import DataLoader

    from arra_megatron.data.samples import collate
    from arra_megatron.runtime.capabilities import has_gpu

    return iter(DataLoader(source, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate,
                           persistent_workers=False, prefetch_factor=4 if num_workers else None,
                           pin_memory=has_gpu(), generator=torch.Generator().manual_seed(0)))


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
        return TrainingData(mock, MockSplit(mock, 1), args.vocab_size, mock.image_token_range)
    from arra_megatron.data.dataset import build_arra_datasets

    per_split = [args.train_data_path, args.valid_data_path, args.test_data_path] if args.train_data_path else None
    (train, valid, _), profile = build_arra_datasets(
        args.data_path, args.split, args.seq_length, args.seed, dataset_sizes(args), per_split=per_split,
        condition_dropout_prob=args.condition_dropout_prob, loss_on_text=args.loss_on_text,
        with_features=args.arra and args.arra_targets == "precomputed",
        with_images=args.arra and args.arra_targets == "online",
    )
    vocab = max(profile.vocab_size, args.vocab_size or 0)
    return TrainingData(train, valid, vocab, profile.image_token_range)
