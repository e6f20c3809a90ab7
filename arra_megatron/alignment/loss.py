"""The global visual alignment loss L_GVA (ARRA_METHOD.md, "Alignment loss").

For sample b with aligned positions P_b (HYBNEXT: every position whose next-token
target is an image token; ``rep``: the BOI position only)

    cos:  L_b = mean_{t in P_b} (1 - cos(A_phi(h_k[t]), f_GF[b]))
    mse:  L_b = mean_{t in P_b} ||A_phi(h_k[t]) - f_GF[b]||^2 / D

    L_GVA = mean of L_b over the samples of the global batch with a non-empty P_b.

The code works with *position weights* w_t = 1 / |P_b| (0 outside P_b). Then
sum_t w_t * l_t summed over any subset of positions is that subset's share of
sum_b L_b, so a micro-batch, a sequence-parallel slice or a data-parallel rank
adds its partial sum and one division by the global sample count gives L_GVA
exactly, whatever the layout.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F


def hybnext_mask(labels: torch.Tensor, image_token_range: Tuple[int, int]) -> torch.Tensor:
    """HYBNEXT positions: ``labels[b, t]`` (the next token) is an image token. [b, s] bool."""
    lo, hi = image_token_range
    return (labels >= lo) & (labels < hi)


def rep_mask(labels: torch.Tensor, image_token_range: Tuple[int, int]) -> torch.Tensor:
    """The ``rep`` ablation: the BOI position only, i.e. the first HYBNEXT position of each sample."""
    hyb = hybnext_mask(labels, image_token_range)
    first = hyb.int().cumsum(dim=1) == 1
    return hyb & first


def alignment_mask(labels: torch.Tensor, image_token_range: Tuple[int, int], target: str) -> torch.Tensor:
    """Positions aligned by the ``target`` setting (``hybnext`` or ``rep``)."""
    if target == "hybnext":
        return hybnext_mask(labels, image_token_range)
    if target == "rep":
        return rep_mask(labels, image_token_range)
    raise ValueError(f"unknown ARRA target {target!r}")


def position_weights(mask: torch.Tensor) -> torch.Tensor:
    """w_t = 1 / |P_b| on aligned positions, 0 elsewhere. [b, s] float64, so that the
    weights add up to exactly one per sample whatever |P_b| is."""
    mask = mask.double()
    return mask / mask.sum(dim=1, keepdim=True).clamp(min=1.0)


def num_aligned_samples(mask: torch.Tensor) -> torch.Tensor:
    """Number of samples with a non-empty P_b (the denominator of L_GVA)."""
    return mask.any(dim=1).sum()


def position_losses(pred: torch.Tensor, target: torch.Tensor, objective: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-position alignment loss l_t and cosine, computed in fp32 (or wider when given wider).

    Args:
        pred: A_phi(h_k[t]), [..., D] (e.g. [m, D] selected positions or [s, b, D] all of them).
        target: f_GF of each position's sample, broadcastable to ``pred`` ([m, D], [1, b, D]).
        objective: ``cos`` or ``mse``.
    Returns:
        (l_t, cos_t), each of ``pred``'s shape without D; cos_t carries no gradient (it is for logging).
    """
    dtype = torch.promote_types(pred.dtype, torch.float32)
    pred = pred.to(dtype)
    target = target.to(dtype)
    cos = F.cosine_similarity(pred, target, dim=-1, eps=1e-8)
    if objective == "cos":
        loss = 1.0 - cos
    elif objective == "mse":
        loss = (pred - target).pow(2).mean(dim=-1)
    else:
        raise ValueError(f"unknown ARRA objective {objective!r}")
    return loss, cos.detach()
