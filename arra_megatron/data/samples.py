"""One training sample from one stored document, and micro-batch assembly.

A document is the token sequence ``[BOS] condition [BOI] x_1..x_n [EOI] [EOS]``
(ARRA_METHOD.md). Training sees it right-padded to the sequence length with the
next-token labels, the loss mask (image targets and EOI; text targets too with
``loss_on_text``) and position ids. The HYBNEXT positions are found from the
labels by the forward step, never stored.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch


def sample_from_document(
    document: Sequence[int] | np.ndarray,
    seq_length: int,
    image_token_range: Tuple[int, int],
    eoi_id: int,
    pad_id: int,
    loss_on_text: bool = False,
) -> Dict[str, torch.Tensor]:
    """tokens, labels, loss_mask, position_ids for one document (padded or cut to ``seq_length``).

    A document longer than ``seq_length + 1`` tokens is cut; the builder never writes one
    (it truncates the text, never the image), so a cut here means a dataset built for a
    longer ``--seq-length``.
    """
    doc = torch.as_tensor(np.asarray(document, dtype=np.int64))
    if doc.numel() > seq_length + 1:
        doc = doc[: seq_length + 1]
    tokens = torch.full((seq_length,), pad_id, dtype=torch.long)
    labels = torch.full((seq_length,), pad_id, dtype=torch.long)
    n = min(doc.numel(), seq_length)
    tokens[:n] = doc[:n]
    labels[: doc.numel() - 1] = doc[1:]
    lo, hi = image_token_range
    valid = torch.zeros(seq_length, dtype=torch.bool)
    valid[: doc.numel() - 1] = True
    counted = ((labels >= lo) & (labels < hi)) | (labels == eoi_id)
    if loss_on_text:
        counted = labels != pad_id
    return {
        "tokens": tokens,
        "labels": labels,
        "loss_mask": (counted & valid).float(),
        "position_ids": torch.arange(seq_length, dtype=torch.long),
    }


#: Per-sample values of varying size, kept as lists by ``collate``.
UNSTACKED_KEYS = ("image_bytes",)


def collate(samples: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Stack per-sample values (tensors, or numpy scalars such as Megatron's ``dataset_id``);
    encoded images stay a list."""
    return {key: [s[key] for s in samples] if key in UNSTACKED_KEYS
            else torch.stack([torch.as_tensor(s[key]) for s in samples]) for key in samples[0]}
