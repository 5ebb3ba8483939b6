"""Mask BCE and Dice on sampled points, in two forms that must agree:

* ``*_pairwise``: every query against every target of a slice (the matcher's cost), ``(S, N, T)``;
* ``*_matched``: one prediction against its matched target (the loss), ``(M,)``.

Inputs are logits; the sigmoid is applied here exactly once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bce_pairwise(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean BCE over points for all (query, target) pairs.

    Args:
        logits: ``(S, N, P)``.
        targets: ``(S, T, P)`` in {0, 1}.

    Returns:
        ``(S, N, T)``.
    """
    # BCE-with-logits(x, t) = softplus(x) - x·t: a per-query sum plus one matrix product.
    per_query = F.softplus(logits).sum(-1)  # (S, N)
    agreement = torch.einsum("snp,stp->snt", logits, targets)
    return (per_query[:, :, None] - agreement) / logits.shape[-1]


def dice_pairwise(logits: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice loss ``1 - (2|p·t| + 1) / (|p| + |t| + 1)`` for all (query, target) pairs.

    Args:
        logits: ``(S, N, P)``.
        targets: ``(S, T, P)`` in {0, 1}.

    Returns:
        ``(S, N, T)``.
    """
    probs = logits.sigmoid()
    intersection = torch.einsum("snp,stp->snt", probs, targets)
    sizes = probs.sum(-1)[:, :, None] + targets.sum(-1)[:, None, :]
    return 1 - (2 * intersection + smooth) / (sizes + smooth)


def bce_matched(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean BCE over points per matched pair. ``(M, P)``, ``(M, P)`` -> ``(M,)``."""
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(-1)


def dice_matched(logits: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice loss per matched pair. ``(M, P)``, ``(M, P)`` -> ``(M,)``."""
    probs = logits.sigmoid()
    intersection = (probs * targets).sum(-1)
    return 1 - (2 * intersection + smooth) / (probs.sum(-1) + targets.sum(-1) + smooth)


__all__ = ["bce_pairwise", "dice_pairwise", "bce_matched", "dice_matched"]
