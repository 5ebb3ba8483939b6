"""Box conventions shared by the network (box prompts) and the loss (box targets).

A box is ``(x1, y1, x2, y2)`` normalised to [0, 1], with ``x`` along the LAST axis of a mask (W, columns)
and ``y`` along the second-to-last axis (H, rows) — SAM's and torchvision's image convention. Boxes use
pixel edges: a mask occupying columns ``c0..c1`` gives ``x1 = c0 / W`` and ``x2 = (c1 + 1) / W``, so the box
always contains the whole mask and a single-pixel mask has a non-empty box.
"""

from __future__ import annotations

from typing import Tuple

import torch

__all__ = ["masks_to_boxes"]


def masks_to_boxes(masks: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Tight normalised boxes of binary masks, vectorised over any leading dimensions.

    Args:
        masks: ``(..., H, W)`` boolean (or 0/1) masks.

    Returns:
        boxes: ``(..., 4)`` float xyxy in [0, 1] (zeros where the mask is empty).
        nonempty: ``(...)`` bool, False where the mask has no foreground pixel.
    """
    masks = masks.bool()
    height, width = masks.shape[-2:]
    rows = masks.any(dim=-1)  # (..., H)
    cols = masks.any(dim=-2)  # (..., W)
    nonempty = rows.any(dim=-1)

    def first_last(occupied: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        # argmax returns the first maximal index; on the flipped axis it gives the last occupied index.
        size = occupied.shape[-1]
        as_int = occupied.to(torch.uint8)
        first = as_int.argmax(dim=-1)
        last = size - 1 - as_int.flip(-1).argmax(dim=-1)
        return first, last

    y_first, y_last = first_last(rows)
    x_first, x_last = first_last(cols)
    boxes = torch.stack(
        [x_first / width, y_first / height, (x_last + 1) / width, (y_last + 1) / height], dim=-1
    ).float()
    boxes = torch.where(nonempty[..., None], boxes, torch.zeros_like(boxes))
    return boxes, nonempty
