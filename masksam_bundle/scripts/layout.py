"""Folding the slices of a volume into and out of the batch.

MaskSAM runs SAM's 2D modules on the D slices of each volume as one batch: ``(B, ..., D, ...)`` becomes
``(B*D, ...)`` with the slice index inner (row ``b * D + d`` holds slice d of volume b), and the 3D parts
(adapters, prompt generator) unfold it again. The mask decoder folds its N queries per slice the same way,
``(B*D*N, ...)`` ordered ``(b, d, n)`` (:class:`scripts.mask_decoder.QueryLayout`).
"""

from __future__ import annotations

import torch

__all__ = ["fold_slices", "unfold_slices"]


def fold_slices(x: torch.Tensor, depth_dim: int = 1) -> torch.Tensor:
    """Fold the depth axis into the batch, slice index inner.

    Args:
        x: ``(B, ..., D, ...)`` with D at ``depth_dim`` (>= 1).

    Returns:
        ``(B*D, ...)``: ``x`` without its depth axis (a view where the strides allow).
    """
    return x.movedim(depth_dim, 1).flatten(0, 1)


def unfold_slices(x: torch.Tensor, num_slices: int, depth_dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`fold_slices`.

    Args:
        x: ``(B*D, ...)``, slice index inner.
        num_slices: D.
        depth_dim: where the depth axis goes in the result (>= 1).

    Returns:
        ``(B, ..., D, ...)`` with D at ``depth_dim`` (a view of ``x``).

    Raises:
        ValueError: dim 0 of ``x`` is not a multiple of D (the message names the shape).
    """
    if x.ndim == 0 or x.shape[0] % num_slices:
        raise ValueError(f"expected B*{num_slices} slices folded on dim 0, got shape {tuple(x.shape)}")
    return x.unflatten(0, (-1, num_slices)).movedim(1, depth_dim)
