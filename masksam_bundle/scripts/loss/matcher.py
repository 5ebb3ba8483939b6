"""Hungarian matching of queries to the target set of each slice (paper Eq. 1).

The cost of assigning query n to target t combines the final and the auxiliary predictions, with the same
weights as the loss:

    w_class·(−p_n(c_t)) + w_bce·BCE + w_dice·Dice            (final mask)
                        + w_aux_bce·BCE + w_aux_dice·Dice    (finest auxiliary mask)
                        + w_l1·L1(box) + w_giou·(1 − GIoU(box))  (auxiliary box)

Mask terms use one random pixel sample per slice shared by all queries and targets, so the cost volume is
``(S, N, T)`` and the transient memory is ``chunk × N × num_points``, independent of H·W.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import generalized_box_iou_loss

from .dataset_mapping import BatchTargets
from .mask_losses import bce_pairwise, dice_pairwise
from .point_sampling import gather_pixels, gather_shared_pixels, random_pixels, row_chunks

Match = Tuple[torch.Tensor, torch.Tensor]  # (query indices (T,), target indices (T,)), sorted by target


class HungarianMatcher(nn.Module):
    """One-to-one assignment of N queries to the T targets of every slice (T <= N)."""

    def __init__(
        self,
        cost_class: float = 0.2,
        cost_mask_bce: float = 1.5,
        cost_mask_dice: float = 1.5,
        cost_aux_bce: float = 0.5,
        cost_aux_dice: float = 0.5,
        cost_box_l1: float = 0.5,
        cost_box_giou: float = 0.2,
        num_points: int = 112 * 112,
        max_chunk_elements: int = 2**22,
    ) -> None:
        super().__init__()
        self.cost_class = cost_class
        self.cost_mask_bce = cost_mask_bce
        self.cost_mask_dice = cost_mask_dice
        self.cost_aux_bce = cost_aux_bce
        self.cost_aux_dice = cost_aux_dice
        self.cost_box_l1 = cost_box_l1
        self.cost_box_giou = cost_box_giou
        self.num_points = num_points
        self.max_chunk_elements = max_chunk_elements

    @torch.no_grad()
    def forward(
        self,
        class_logits: torch.Tensor,
        mask_logits: torch.Tensor,
        aux_mask_logits: torch.Tensor,
        boxes: torch.Tensor,
        targets: BatchTargets,
        generator: Optional[torch.Generator] = None,
    ) -> List[Match]:
        """Match every slice.

        Args:
            class_logits: ``(S, N, K+1)``.
            mask_logits: ``(S, N, H, W)`` final mask logits.
            aux_mask_logits: ``(S, N, H, W)`` finest auxiliary mask logits.
            boxes: ``(S, N, 4)`` auxiliary boxes, xyxy in [0, 1].
            targets: padded targets of the S slices, label maps at (H, W).
            generator: RNG for the pixel sample (None: the global one).

        Returns:
            Per slice, ``(query indices, target indices)`` as CPU long tensors sorted by target index.
        """
        num_slices, num_queries = class_logits.shape[:2]
        num_pixels = mask_logits.shape[-2] * mask_logits.shape[-1]
        costs = []
        for chunk in row_chunks(num_slices, num_queries * self.num_points, self.max_chunk_elements):
            pixels = random_pixels(chunk.stop - chunk.start, self.num_points, num_pixels, generator, boxes.device)
            chunk_targets = BatchTargets(*(field[chunk] for field in targets))
            costs.append(
                self.cost_matrix(
                    class_logits[chunk], mask_logits[chunk], aux_mask_logits[chunk], boxes[chunk], chunk_targets, pixels
                )
            )
        return assign(torch.cat(costs), targets.counts)

    @torch.no_grad()
    def cost_matrix(
        self,
        class_logits: torch.Tensor,
        mask_logits: torch.Tensor,
        aux_mask_logits: torch.Tensor,
        boxes: torch.Tensor,
        targets: BatchTargets,
        pixels: torch.Tensor,
    ) -> torch.Tensor:
        """Weighted matching cost of all (query, target) pairs, batched over slices.

        Args: as :meth:`forward`, plus ``pixels (S, P)``, the shared pixel sample of each slice.

        Returns:
            ``(S, N, T)``; columns past a slice's target count are padding.
        """
        num_queries = class_logits.shape[1]
        classes = targets.classes.clamp(min=0)  # padding -1 -> any valid index; those columns are ignored

        probs = class_logits.float().softmax(-1)  # (S, N, K+1)
        class_cost = -probs.gather(2, classes[:, None, :].expand(-1, num_queries, -1))  # (S, N, T)

        rows = torch.arange(len(pixels), device=pixels.device)
        labels_at_pixels = gather_pixels(targets.label_maps, rows, pixels)  # (S, P)
        target_masks = (labels_at_pixels[:, None, :] == targets.classes[:, :, None]).float()  # (S, T, P)
        final = gather_shared_pixels(mask_logits, pixels).float()  # (S, N, P)
        aux = gather_shared_pixels(aux_mask_logits, pixels).float()  # (S, N, P)
        mask_cost = (
            self.cost_mask_bce * bce_pairwise(final, target_masks)
            + self.cost_mask_dice * dice_pairwise(final, target_masks)
            + self.cost_aux_bce * bce_pairwise(aux, target_masks)
            + self.cost_aux_dice * dice_pairwise(aux, target_masks)
        )

        pred_boxes, target_boxes = torch.broadcast_tensors(boxes.float()[:, :, None, :], targets.boxes[:, None, :, :])
        l1_cost = (pred_boxes - target_boxes).abs().sum(-1)  # (S, N, T)
        giou_cost = generalized_box_iou_loss(pred_boxes, target_boxes)  # 1 - GIoU, same argmin as -GIoU

        return (
            self.cost_class * class_cost
            + mask_cost
            + self.cost_box_l1 * l1_cost
            + self.cost_box_giou * giou_cost
        )


def assign(costs: torch.Tensor, counts: torch.Tensor) -> List[Match]:
    """Minimum-cost one-to-one assignment per slice.

    Args:
        costs: ``(S, N, T)``, padded past each slice's count.
        counts: ``(S,)`` targets per slice.

    Returns:
        Per slice, ``(query indices, target indices)`` as CPU long tensors sorted by target index, so the
        order of matched pairs does not depend on the order of the queries.
    """
    num_queries = costs.shape[1]
    costs = costs.cpu()
    matches = []
    for s, count in enumerate(counts.tolist()):
        if count > num_queries:
            raise ValueError(
                f"slice {s} has {count} targets (label values) but the network has only {num_queries} queries; "
                "the number of queries must be at least the number of classes present in a slice"
            )
        query_idx, target_idx = linear_sum_assignment(costs[s, :, :count].numpy())
        by_target = target_idx.argsort()
        matches.append(
            (torch.as_tensor(query_idx[by_target], dtype=torch.long), torch.as_tensor(target_idx[by_target], dtype=torch.long))
        )
    return matches


__all__ = ["HungarianMatcher", "assign", "Match"]
