"""Dataset mapping (paper Eq. 1; model card "Training recipe"): a label map becomes, per 2D slice, a set of (class, binary mask, box).

Every label value present in a slice, background 0 included, is one target. Boxes follow the shared convention
of ``scripts.box_ops.masks_to_boxes`` (xyxy normalised by W and H, pixel edges, x along the last axis).

Axis orders: MONAI labels are ``(B, 1, H, W, D)`` with the slice axis last; the network predicts
``(B, D, N, H, W)``. Slices are flattened batch-major, ``s = b * D + d``, to match ``pred.flatten(0, 1)``.
"""

from __future__ import annotations

import math
from typing import Hashable, List, Mapping, NamedTuple, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from ..box_ops import masks_to_boxes


class SliceTargets(NamedTuple):
    """The target set of one slice; T = number of label values present."""

    classes: torch.Tensor  # (T,) long, ascending
    masks: torch.Tensor  # (T, H, W) bool, one per class; they partition the slice
    boxes: torch.Tensor  # (T, 4) float xyxy in [0, 1]


class BatchTargets(NamedTuple):
    """The target sets of all S = B·D slices, padded to the largest count T so costs can be batched.

    Masks are not stored: the label maps hold them implicitly (mask of target t = ``label_map == classes[t]``),
    so the loss can read targets at sampled pixels without materialising (T, H, W) masks.
    """

    label_maps: torch.Tensor  # (S, H, W) long
    classes: torch.Tensor  # (S, T) long, padded with -1
    boxes: torch.Tensor  # (S, T, 4) float, padded with 0
    counts: torch.Tensor  # (S,) long, targets per slice (>= 1: every pixel has a label)


def invalid_label_values(label: Union[torch.Tensor, np.ndarray], num_classes: int) -> List[Union[int, float]]:
    """The distinct values of ``label`` that are not class ids: negative, ``>= num_classes``, non-integer or
    NaN/Inf, ascending (NaN last); integral ones as ``int``. The one label-value check of the bundle (the loss and
    the per-case check of the preprocessing both use it)."""
    values = torch.unique(torch.as_tensor(label))
    valid = (values >= 0) & (values < num_classes)
    if values.is_floating_point():
        valid &= values == values.round()
    return [int(v) if math.isfinite(v) and v == int(v) else v for v in values[~valid].tolist()]


def integer_label(label: Union[torch.Tensor, np.ndarray], num_classes: int) -> torch.Tensor:
    """Round a (possibly float, possibly MetaTensor) label to long and check every value is a class id.

    Raises:
        ValueError: naming the offending values when any is < 0 or >= ``num_classes`` (NaN included).
    """
    if isinstance(label, MetaTensor):
        label = label.as_tensor()
    label = torch.as_tensor(label)
    if label.is_floating_point():
        # Resampled labels can hold 2.9999; NaN must still be reported, so check before casting.
        label = label.round()
    invalid = invalid_label_values(label, num_classes)
    if invalid:
        raise ValueError(
            f"label values {invalid[:10]} are not class ids for num_classes K={num_classes} "
            f"(expected integers in [0, {num_classes - 1}])"
        )
    return label.long()


def label_to_slices(label: torch.Tensor) -> torch.Tensor:
    """``(B, 1, H, W, D)`` label -> ``(B·D, H, W)`` slice maps, batch-major like ``pred.flatten(0, 1)``."""
    if label.ndim != 5 or label.shape[1] != 1:
        raise ValueError(f"label must have shape (B, 1, H, W, D), got {tuple(label.shape)}")
    batch, _, height, width, depth = label.shape
    return label[:, 0].permute(0, 3, 1, 2).reshape(batch * depth, height, width)


def slice_targets(label_map: torch.Tensor) -> SliceTargets:
    """One ``(H, W)`` integer slice -> its target set (classes, masks, boxes)."""
    classes = torch.unique(label_map)  # sorted
    masks = label_map[None] == classes[:, None, None]  # (T, H, W)
    boxes, _ = masks_to_boxes(masks)  # every mask is non-empty by construction
    return SliceTargets(classes, masks, boxes)


def batch_targets(label: torch.Tensor, num_classes: int) -> BatchTargets:
    """``(B, 1, H, W, D)`` label -> padded target sets of all B·D slices (see :class:`BatchTargets`)."""
    label_maps = label_to_slices(integer_label(label, num_classes))
    per_slice = [slice_targets(label_map) for label_map in label_maps]  # T·H·W per step, never S·T·H·W
    counts = torch.tensor([len(t.classes) for t in per_slice], device=label_maps.device)
    num_slices, max_count = len(per_slice), int(counts.max())
    classes = label_maps.new_full((num_slices, max_count), -1)
    boxes = torch.zeros(num_slices, max_count, 4, device=label_maps.device)
    for s, targets in enumerate(per_slice):
        classes[s, : len(targets.classes)] = targets.classes
        boxes[s, : len(targets.classes)] = targets.boxes
    return BatchTargets(label_maps, classes, boxes, counts)


def downsample_label_maps(label_maps: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """``(S, H, W)`` label maps -> ``(S, h, w)`` by nearest-exact resampling (targets for coarse aux heads).

    Nearest keeps a valid partition into classes; a structure thinner than the stride may vanish, and the
    coarse head is then trained to predict it empty there, as it cannot resolve it.
    """
    if tuple(label_maps.shape[-2:]) == tuple(size):
        return label_maps
    resized = F.interpolate(label_maps[:, None].float(), size=tuple(size), mode="nearest-exact")
    return resized[:, 0].round().long()


class LabelToMaskSetd(MapTransform):
    """Add the per-slice target sets of a channel-first ``(1, H, W, D)`` label to the data dict.

    For each key, ``data[key + output_suffix]`` becomes a list of D :class:`SliceTargets`
    ``(classes (T,), masks (T, H, W) bool, boxes (T, 4))``. Meant for inspection, or for pipelines that want
    the mapping precomputed; :class:`~scripts.loss.MaskSAMLoss` does the same mapping on the fly.
    """

    def __init__(
        self,
        keys: KeysCollection,
        num_classes: int,
        output_suffix: str = "_mask_set",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.num_classes = num_classes
        self.output_suffix = output_suffix

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            label = integer_label(d[key], self.num_classes)
            if label.ndim != 4 or label.shape[0] != 1:
                raise ValueError(f"'{key}' must have shape (1, H, W, D), got {tuple(label.shape)}")
            slices = label_to_slices(label[None])  # (D, H, W)
            d[f"{key}{self.output_suffix}"] = [slice_targets(label_map) for label_map in slices]
        return d


__all__ = [
    "SliceTargets",
    "BatchTargets",
    "invalid_label_values",
    "integer_label",
    "label_to_slices",
    "slice_targets",
    "batch_targets",
    "downsample_label_maps",
    "LabelToMaskSetd",
]
