"""``--mock-data``: synthetic samples in the real ARRA layout, a pure function of (seed, index).

Vocabulary split for a mock run of size V: PAD 0, BOS 1, EOS 2, BOI 3, EOI 4, text
tokens [5, V/2), image tokens [V/2, V). Images have ``seq_length // 2`` tokens; the
condition a random length that fits. Targets f_GF are random unit-scale vectors
that depend on the image tokens (so L_GVA can fall).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from arra_megatron.data.samples import sample_from_document

PAD, BOS, EOS, BOI, EOI = 0, 1, 2, 3, 4

#: Index offsets of the mock's train, validation and test splits: indices no training step
#: reaches, below 2**32 (each index seeds a torch generator, and torch keeps only the low 32
#: bits of a seed: an offset of 1 << 40 was sample 0 again).
SPLIT_OFFSETS = (0, 1 << 31, 1 << 30)


def mock_image_token_range(vocab_size: int) -> Tuple[int, int]:
    """The image ids of a mock vocabulary of ``vocab_size``: its upper half."""
    return (vocab_size // 2, vocab_size)


class MockARRADataset:
    def __init__(self, vocab_size: int, seq_length: int, target_dim: int, seed: int = 0,
                 loss_on_text: bool = False):
        if vocab_size < 16 or seq_length < 8:
            raise ValueError("--mock-data needs --vocab-size >= 16 and --seq-length >= 8")
        self.vocab_size = vocab_size
        self.seq_length = seq_length
        self.target_dim = target_dim
        self.seed = seed
        self.loss_on_text = loss_on_text
        self.num_image_tokens = seq_length // 2
        gen = torch.Generator().manual_seed(seed)
        # f_GF of a sample: a fixed random linear map of its image-token histogram.
        self._target_map = torch.randn(8, target_dim, generator=gen)

    @property
    def image_token_range(self) -> Tuple[int, int]:
        return mock_image_token_range(self.vocab_size)

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(index))
        lo, hi = self.image_token_range
        max_cond = self.seq_length - self.num_image_tokens - 4
        cond_len = int(torch.randint(1, max(max_cond, 1) + 1, (1,), generator=gen))
        cond = torch.randint(5, lo, (cond_len,), generator=gen)
        # Images are smooth: runs of the same code, so a model can learn them.
        runs = torch.randint(lo, hi, (self.num_image_tokens // 4 + 1,), generator=gen)
        image = runs.repeat_interleave(4)[: self.num_image_tokens]
        doc = torch.cat([torch.tensor([BOS]), cond, torch.tensor([BOI]), image, torch.tensor([EOI, EOS])])
        sample = sample_from_document(doc.tolist(), self.seq_length, self.image_token_range, EOI, PAD,
                                      self.loss_on_text)
        histogram = torch.bincount((image - lo) * 8 // (hi - lo), minlength=8).float()
        sample["arra_targets"] = histogram @ self._target_map / self.num_image_tokens
        sample["sample_id"] = torch.tensor(int(index))
        return sample


class MockSplit:
    """One split of a mock dataset: its indices shifted by ``SPLIT_OFFSETS[split]``; ``size``
    samples long when given (Megatron's samplers ask a dataset for its length)."""

    def __init__(self, mock: MockARRADataset, split: int, size: Optional[int] = None):
        self.mock, self.offset, self.size = mock, SPLIT_OFFSETS[split], size

    def __len__(self) -> int:
        if self.size is None:
            raise TypeError("this mock split has no length (give size)")
        return self.size

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        return self.mock[self.offset + int(index)]
