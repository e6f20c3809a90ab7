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
    # numpy, then one torch.from_numpy per field: this runs for every sample of every step,
    # and small torch ops cost several microseconds each.
    doc = np.asarray(document, dtype=np.int64)[: seq_length + 1]
    tokens = np.full(seq_length, pad_id, dtype=np.int64)
    labels = np.full(seq_length, pad_id, dtype=np.int64)
    n = min(len(doc), seq_length)
    tokens[:n] = doc[:n]
    labels[: len(doc) - 1] = doc[1:]
    if loss_on_text:
        counted = labels != pad_id
    else:
        lo, hi = image_token_range
        counted = ((labels >= lo) & (labels < hi)) | (labels == eoi_id)
    counted[max(len(doc) - 1, 0):] = False
    return {
        "tokens": torch.from_numpy(tokens),
        "labels": torch.from_numpy(labels),
        "loss_mask": torch.from_numpy(counted.astype(np.float32)),
        "position_ids": torch.from_numpy(np.arange(seq_length, dtype=np.int64)),
    }


#: Per-sample values of varying size, kept as lists by ``collate``.
UNSTACKED_KEYS = ("image_bytes",)


def collate(samples: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Stack per-sample values (tensors, or numpy scalars such as Megatron's ``dataset_id``);
    encoded images stay a list."""
    return {key: [s[key] for s in samples] if key in UNSTACKED_KEYS
            else torch.stack([torch.as_tensor(s[key]) for s in samples]) for key in samples[0]}
