"""Point sampling of mask logits and labels, so mask costs and losses never touch whole N × H × W stacks.

Predictions and targets share one pixel grid here (the label is resampled to each prediction's resolution),
so a "point" is a pixel index into the flattened ``H·W`` grid, drawn with replacement. This is PointRend /
Mask2Former point sampling with the points at pixel centres: no interpolation is needed, and sampled
logits are read straight out of the prediction tensor without first copying the matched masks.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch


def row_chunks(num_rows: int, elements_per_row: int, max_elements: int) -> Iterator[slice]:
    """Consecutive row ranges whose ``rows × elements_per_row`` stays within ``max_elements`` (>= 1 row)."""
    rows_per_chunk = max(1, max_elements // max(1, elements_per_row))
    for start in range(0, num_rows, rows_per_chunk):
        yield slice(start, min(start + rows_per_chunk, num_rows))


def random_pixels(
    num_rows: int, num_points: int, num_pixels: int, generator: Optional[torch.Generator], device: torch.device
) -> torch.Tensor:
    """``(num_rows, num_points)`` pixel indices drawn uniformly (with replacement) from ``[0, num_pixels)``."""
    return torch.randint(num_pixels, (num_rows, num_points), generator=generator, device=device)


def gather_pixels(maps: torch.Tensor, rows: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """Read ``maps[rows[m]]`` at ``pixels[m]`` for each m, without copying the selected maps.

    Args:
        maps: ``(R, H, W)`` any dtype (a view of the prediction is fine; gradients flow back into it).
        rows: ``(M,)`` long, which map each row of ``pixels`` reads.
        pixels: ``(M, P)`` long flat indices into ``H·W``.

    Returns:
        ``(M, P)`` values in ``maps``' dtype.
    """
    flat = maps.flatten(-2)  # (R, H·W), a view for contiguous maps
    return flat[rows[:, None], pixels]


def gather_shared_pixels(maps: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """Read every query's map of a slice at that slice's shared pixels (the matcher's sample).

    Args:
        maps: ``(S, N, H, W)``.
        pixels: ``(S, P)`` long flat indices into ``H·W``.

    Returns:
        ``(S, N, P)`` values in ``maps``' dtype.
    """
    num_queries = maps.shape[1]
    return maps.flatten(-2).gather(2, pixels[:, None, :].expand(-1, num_queries, -1))


@torch.no_grad()
def uncertain_pixels(
    logit_maps: torch.Tensor,
    rows: torch.Tensor,
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
    generator: Optional[torch.Generator] = None,
    max_chunk_elements: int = 2**22,
) -> torch.Tensor:
    """Importance-sampled pixels per selected mask (PointRend): mostly where the prediction is least certain.

    Draw ``oversample_ratio · P`` random candidates, keep the ``importance_sample_ratio · P`` with the largest
    uncertainty ``-|logit|`` (logits near 0), and fill up with uniform random pixels so the whole mask
    is still seen.

    Args:
        logit_maps: ``(R, H, W)`` mask logits.
        rows: ``(M,)`` long, the masks to sample.

    Returns:
        ``(M, P)`` long flat pixel indices.
    """
    num_pixels = logit_maps.shape[-2] * logit_maps.shape[-1]
    num_candidates = int(num_points * oversample_ratio)
    num_uncertain = int(num_points * importance_sample_ratio)
    chosen = [rows.new_empty(0, num_points)]
    # Candidates are (M, oversample·P): chunk over masks so the transient memory stays bounded.
    for chunk in row_chunks(len(rows), num_candidates, max_chunk_elements):
        chunk_rows = rows[chunk]
        candidates = random_pixels(len(chunk_rows), num_candidates, num_pixels, generator, rows.device)
        uncertainty = -gather_pixels(logit_maps, chunk_rows, candidates).float().abs()
        most_uncertain = uncertainty.topk(num_uncertain, dim=1, sorted=False).indices  # order is irrelevant
        uniform = random_pixels(len(chunk_rows), num_points - num_uncertain, num_pixels, generator, rows.device)
        chosen.append(torch.cat([candidates.gather(1, most_uncertain), uniform], dim=1))
    return torch.cat(chosen, dim=0)


__all__ = ["row_chunks", "random_pixels", "gather_pixels", "gather_shared_pixels", "uncertain_pixels"]
