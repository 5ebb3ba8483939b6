"""The MaskSAM set criterion (paper Eq. 1; model card "Training recipe"): match, then supervise the matched pairs.

Shaped like Mask2Former's ``SetCriterion``: the matcher and the weight dict are injected, :class:`SetCriterion`
returns the unweighted terms as a dict, and :class:`MaskSAMLoss` is the thin weighted sum the trainer calls.

For every slice the queries are matched one-to-one to the slice's targets (every label value present,
background included); then

* CE over K+1 classes for all queries, unmatched ones towards "no object" (weight ``no_object_weight``),
  as the class-weighted mean over queries (Mask2Former's and the release's ``F.cross_entropy`` with class
  weights);
* for matched queries: BCE + Dice on the final masks and on the auxiliary masks (importance-sampled pixels),
  and L1 + (1 − GIoU) on a box: the box prompt (MaskAvgBBox, as the release supervises) or the learnable box;
* deep supervision: the auxiliary-mask term is split over the finest and the two coarser prompt-generator
  heads (4/7, 2/7, 1/7 by default), each against the label resampled to its resolution.

Mask and box terms are sums over matched targets divided by the number of targets, averaged over DDP ranks
when ``torch.distributed`` is initialised (Mask2Former's ``num_masks``).
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchvision.ops import generalized_box_iou_loss

from .dataset_mapping import BatchTargets, batch_targets, downsample_label_maps
from .mask_losses import bce_matched, dice_matched
from .matcher import HungarianMatcher, Match
from .point_sampling import gather_pixels, uncertain_pixels

# Which prediction the box terms supervise: the box prompt given to SAM (the release) or the learnable box.
BOX_PREDICTIONS = {"prompt": "prompt_boxes", "learnable": "aux_boxes"}
TERM_NAMES = (
    "loss_ce",
    "loss_mask_bce",
    "loss_mask_dice",
    "loss_aux_bce",
    "loss_aux_dice",
    "loss_box_l1",
    "loss_box_giou",
)


class SetCriterion(nn.Module):
    """``criterion(pred, label)`` -> the unweighted loss terms ``{name: 0-d tensor}`` (names: ``TERM_NAMES``).

    Args:
        num_classes: K, classes including background; label values must lie in ``[0, K)``.
        matcher: assigns queries to targets (:class:`HungarianMatcher`, its costs usually the loss weights).
        weight_dict: ``{term name: weight}`` for every name of ``TERM_NAMES``; :meth:`weighted_sum` uses it.
        no_object_weight: CE class weight of the "no object" class (index K).
        num_points: sampled pixels per mask for each mask loss (Mask2Former 112² = 12544; the release's ACDC
            trainer 32768).
        oversample_ratio, importance_sample_ratio: importance sampling of the loss pixels (PointRend).
        deep_supervision: supervise the two coarser auxiliary heads too.
        deep_supervision_weights: split of the auxiliary-mask term, finest first.
        seed: if given, pixel sampling (matcher and loss) uses a private generator seeded once (reproducible
            runs); otherwise the global RNG.
        max_chunk_elements: cap on the transient sampled elements per step (candidate pixels).
        box_loss_on: ``"prompt"`` (default, the release): L1/GIoU on the box prompt ``prompt_boxes``
            (MaskAvgBBox: its gradient reaches the learnable box x0.5); ``"learnable"``: on ``aux_boxes``.
            The matcher's box cost uses the same box.

    Predictions (train-mode dict of the network):
        ``pred_logits (B, D, N, K+1)``, ``pred_masks (B, D, N, H, W)`` logits, ``aux_masks`` list of
        ``(B, D, N, h, w)`` logits finest first (finest at H×W), and the supervised box (``prompt_boxes`` or
        ``aux_boxes``, ``(B, D, N, 4)`` xyxy in [0, 1]).
    Label: ``(B, 1, H, W, D)`` integer-valued (any dtype, MetaTensor fine).

    Terms: ``loss_ce``, ``loss_mask_bce``, ``loss_mask_dice``, ``loss_aux_bce``, ``loss_aux_dice``
    (deep-supervision-weighted over heads), ``loss_box_l1``, ``loss_box_giou``.
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        weight_dict: Mapping[str, float],
        no_object_weight: float = 0.1,
        num_points: int = 112 * 112,
        oversample_ratio: float = 2.0,
        importance_sample_ratio: float = 0.75,
        deep_supervision: bool = True,
        deep_supervision_weights: Sequence[float] = (4 / 7, 2 / 7, 1 / 7),
        seed: Optional[int] = None,
        max_chunk_elements: int = 2**22,
        box_loss_on: str = "prompt",
    ) -> None:
        super().__init__()
        if oversample_ratio < 1 or not 0 <= importance_sample_ratio <= 1:
            raise ValueError("need oversample_ratio >= 1 and 0 <= importance_sample_ratio <= 1")
        if box_loss_on not in BOX_PREDICTIONS:
            raise ValueError(f"box_loss_on must be one of {tuple(BOX_PREDICTIONS)}, got {box_loss_on!r}")
        if int(num_points) < 1:
            raise ValueError(f"num_points must be >= 1, got {num_points}")
        if set(weight_dict) != set(TERM_NAMES):
            raise ValueError(f"weight_dict must weigh exactly the terms {TERM_NAMES}, got {tuple(weight_dict)}")
        self.box_loss_on, self.box_key = box_loss_on, BOX_PREDICTIONS[box_loss_on]
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = {name: weight_dict[name] for name in TERM_NAMES}
        class_weights = torch.ones(num_classes + 1)
        class_weights[num_classes] = no_object_weight  # down-weight the many unmatched queries
        self.register_buffer("class_weights", class_weights, persistent=False)
        self.num_points = int(num_points)
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.deep_supervision = deep_supervision
        self.deep_supervision_weights = tuple(deep_supervision_weights)
        self.seed = seed
        self.max_chunk_elements = max_chunk_elements
        self._generators: Dict[str, torch.Generator] = {}

    def forward(self, pred: Mapping[str, Any], label: torch.Tensor) -> Dict[str, torch.Tensor]:
        device = pred["pred_masks"].device
        # Float32 throughout (sampled logits are upcast), whatever autocast the trainer runs under.
        with torch.autocast(device_type=device.type, enabled=False):
            return self._terms(pred, label)

    def weighted_sum(self, terms: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The training loss: ``sum_k weight_dict[k] * terms[k]``."""
        return sum(weight * terms[name] for name, weight in self.weight_dict.items())

    def _terms(self, pred: Mapping[str, Any], label: torch.Tensor) -> Dict[str, torch.Tensor]:
        targets = batch_targets(label.to(pred["pred_masks"].device), self.num_classes)  # checks the label
        class_logits, masks, aux_levels, boxes = self._slices(pred, label.shape)
        num_queries = class_logits.shape[1]
        generator = self._generator(masks.device)

        matches = self.matcher(class_logits, masks, aux_levels[0], boxes, targets, generator)
        slice_idx, query_idx, target_idx = _flatten_matches(matches, masks.device)
        matched_classes = targets.classes[slice_idx, target_idx]  # (M,)
        num_targets = mean_target_count(len(slice_idx), masks.device)

        # Classification: every query; unmatched ones should say "no object" (index K). Class-weighted mean
        # over queries: sum_q w_q CE_q / sum_q w_q (Mask2Former, the release).
        target_classes = torch.full_like(class_logits[..., 0], self.num_classes, dtype=torch.long)  # (S, N)
        target_classes[slice_idx, query_idx] = matched_classes
        loss_ce = F.cross_entropy(
            class_logits.flatten(0, 1).float(),
            target_classes.flatten(),
            weight=self.class_weights.to(class_logits.device),  # the loss module itself may stay on the CPU
            reduction="mean",
        )

        # Masks: each matched (slice, query) is one row of the (S·N, h, w) view of a prediction level.
        rows = slice_idx * num_queries + query_idx
        mask_bce, mask_dice = self._mask_terms(masks, rows, slice_idx, matched_classes, targets, generator)
        aux_bce = aux_dice = torch.zeros((), device=masks.device)
        for level_weight, level_masks in zip(self._level_weights(), aux_levels):
            level_bce, level_dice = self._mask_terms(level_masks, rows, slice_idx, matched_classes, targets, generator)
            aux_bce = aux_bce + level_weight * level_bce
            aux_dice = aux_dice + level_weight * level_dice

        # Boxes: the supervised box (prompt or learnable) against the targets' tight boxes.
        matched_boxes = boxes[slice_idx, query_idx].float()  # (M, 4)
        target_boxes = targets.boxes[slice_idx, target_idx]
        loss_l1 = (matched_boxes - target_boxes).abs().sum()
        loss_giou = generalized_box_iou_loss(matched_boxes, target_boxes, reduction="sum")

        per_target = {
            "loss_mask_bce": mask_bce,
            "loss_mask_dice": mask_dice,
            "loss_aux_bce": aux_bce,
            "loss_aux_dice": aux_dice,
            "loss_box_l1": loss_l1,
            "loss_box_giou": loss_giou,
        }
        return {"loss_ce": loss_ce, **{name: value / num_targets for name, value in per_target.items()}}

    def _mask_terms(
        self,
        mask_logits: torch.Tensor,
        rows: torch.Tensor,
        slice_idx: torch.Tensor,
        matched_classes: torch.Tensor,
        targets: BatchTargets,
        generator: Optional[torch.Generator],
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Summed BCE and Dice of the matched masks of one prediction level on importance-sampled pixels.

        Args:
            mask_logits: ``(S, N, h, w)`` logits.
            rows: ``(M,)`` matched rows of the ``(S·N, h, w)`` view; ``slice_idx``, ``matched_classes``: ``(M,)``
                their slice and class.
        """
        mask_logits = mask_logits.flatten(0, 1)  # (S·N, h, w), a view: matched masks are never copied
        label_maps = downsample_label_maps(targets.label_maps, mask_logits.shape[-2:])  # (S, h, w)
        pixels = uncertain_pixels(
            mask_logits,
            rows,
            self.num_points,
            self.oversample_ratio,
            self.importance_sample_ratio,
            generator,
            self.max_chunk_elements,
        )  # (M, P)
        logits = gather_pixels(mask_logits, rows, pixels).float()  # (M, P), gradients flow into mask_logits
        target_masks = (gather_pixels(label_maps, slice_idx, pixels) == matched_classes[:, None]).float()
        return bce_matched(logits, target_masks).sum(), dice_matched(logits, target_masks).sum()

    def _level_weights(self) -> Tuple[float, ...]:
        return self.deep_supervision_weights if self.deep_supervision else (1.0,)

    def _slices(
        self, pred: Mapping[str, Any], label_shape: Sequence[int]
    ) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor], torch.Tensor]:
        """Check the prediction shapes against the (already checked) ``(B, 1, H, W, D)`` label shape and fold
        (B, D) into S = B·D slices (views, no copies).

        Returns:
            class logits ``(S, N, K+1)``, final masks ``(S, N, H, W)``, aux masks ``(S, N, h, w)`` finest first,
            supervised boxes ``(S, N, 4)``.
        """
        if self.box_key not in pred:
            raise ValueError(
                f"box_loss_on={self.box_loss_on!r} supervises the prediction {self.box_key!r}, which is missing "
                f"(the prediction has {sorted(pred)})"
            )
        class_logits, masks, aux_masks, boxes = (
            pred["pred_logits"], pred["pred_masks"], list(pred["aux_masks"]), pred[self.box_key]
        )
        batch, _, height, width, depth = label_shape
        num_queries = masks.shape[2] if masks.ndim == 5 else -1
        expected = {
            "pred_logits": (class_logits, (batch, depth, num_queries, self.num_classes + 1)),
            "pred_masks": (masks, (batch, depth, num_queries, height, width)),
            "aux_masks[0]": (aux_masks[0], (batch, depth, num_queries, height, width)),
            self.box_key: (boxes, (batch, depth, num_queries, 4)),
        }
        for name, (tensor, shape) in expected.items():
            if tuple(tensor.shape) != shape:
                raise ValueError(
                    f"{name} has shape {tuple(tensor.shape)}, expected {shape} for label {tuple(label_shape)} "
                    f"(B, 1, H, W, D) and num_classes={self.num_classes}"
                )
        num_levels = len(self._level_weights())
        if len(aux_masks) < num_levels:
            raise ValueError(f"deep supervision needs {num_levels} aux_masks levels, got {len(aux_masks)}")
        aux_levels = [level.flatten(0, 1) for level in aux_masks[:num_levels]]
        return class_logits.flatten(0, 1), masks.flatten(0, 1), aux_levels, boxes.flatten(0, 1)

    def _generator(self, device: torch.device) -> Optional[torch.Generator]:
        if self.seed is None:
            return None
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device)
            self._generators[key].manual_seed(self.seed)
        return self._generators[key]


class MaskSAMLoss(nn.Module):
    """``loss_fn(pred, label)`` -> the weighted sum of the :class:`SetCriterion` terms, a scalar for MONAI's
    ``SupervisedTrainer``; built from the bundle's config ids (``weight_ce``, ``weight_mask_bce``, ...).

    The weights are the loss weights and, as in the release, the matcher's costs. ``criterion`` holds the
    :class:`SetCriterion` (its terms are what the training log prints, see :class:`~scripts.loss.TermsSupervisedTrainer`).

    Args:
        num_classes: K, classes including background.
        weight_*: term weights (the release's defaults) and matching costs.
        num_points: sampled pixels per mask, for matching and for each mask loss.
        max_chunk_elements: cap on the transient sampled elements per step (matching, candidate pixels).
        criterion_kwargs: the other :class:`SetCriterion` arguments (``no_object_weight``, ``deep_supervision``,
            ``seed``, ``box_loss_on``, ...).
    """

    def __init__(
        self,
        num_classes: int,
        weight_ce: float = 0.2,
        weight_mask_bce: float = 1.5,
        weight_mask_dice: float = 1.5,
        weight_aux_bce: float = 0.5,
        weight_aux_dice: float = 0.5,
        weight_box_l1: float = 0.5,
        weight_box_giou: float = 0.2,
        num_points: int = 112 * 112,
        max_chunk_elements: int = 2**22,
        **criterion_kwargs: Any,
    ) -> None:
        super().__init__()
        weight_dict = dict(
            zip(
                TERM_NAMES,
                (weight_ce, weight_mask_bce, weight_mask_dice, weight_aux_bce, weight_aux_dice, weight_box_l1,
                 weight_box_giou),
            )
        )
        matcher = HungarianMatcher(
            cost_class=weight_ce,
            cost_mask_bce=weight_mask_bce,
            cost_mask_dice=weight_mask_dice,
            cost_aux_bce=weight_aux_bce,
            cost_aux_dice=weight_aux_dice,
            cost_box_l1=weight_box_l1,
            cost_box_giou=weight_box_giou,
            num_points=int(num_points),
            max_chunk_elements=max_chunk_elements,
        )
        self.criterion = SetCriterion(
            num_classes, matcher, weight_dict, num_points=num_points, max_chunk_elements=max_chunk_elements,
            **criterion_kwargs,
        )

    def forward(self, pred: Mapping[str, Any], label: torch.Tensor) -> torch.Tensor:
        return self.criterion.weighted_sum(self.criterion(pred, label))


def mean_target_count(count: int, device: torch.device) -> float:
    """Targets per DDP rank for normalising the loss: the count summed over ranks, divided by the world
    size, at least 1 (Mask2Former's ``num_masks``). Without ``torch.distributed`` it is ``max(count, 1)``."""
    total = torch.as_tensor(float(count), device=device)
    world_size = 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
        world_size = dist.get_world_size()
    return torch.clamp(total / world_size, min=1).item()


def _flatten_matches(matches: List[Match], device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-slice matches -> ``(slice, query, target)`` index tensors ``(M,)``, ordered by slice then target."""
    slice_idx = torch.cat([torch.full_like(query_idx, s) for s, (query_idx, _) in enumerate(matches)])
    query_idx = torch.cat([query_idx for query_idx, _ in matches])
    target_idx = torch.cat([target_idx for _, target_idx in matches])
    return slice_idx.to(device), query_idx.to(device), target_idx.to(device)


__all__ = ["SetCriterion", "MaskSAMLoss", "TERM_NAMES", "BOX_PREDICTIONS", "mean_target_count"]
