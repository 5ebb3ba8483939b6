"""MaskSAM training objective (spec section 8): dataset mapping, Hungarian matcher, set criterion."""

from .criterion import TERM_NAMES, MaskSAMLoss
from .dataset_mapping import (
    BatchTargets,
    LabelToMaskSetd,
    SliceTargets,
    batch_targets,
    downsample_label_maps,
    integer_label,
    label_to_slices,
    slice_targets,
)
from .matcher import HungarianMatcher, assign

__all__ = [
    "MaskSAMLoss",
    "TERM_NAMES",
    "HungarianMatcher",
    "assign",
    "LabelToMaskSetd",
    "SliceTargets",
    "BatchTargets",
    "batch_targets",
    "slice_targets",
    "label_to_slices",
    "integer_label",
    "downsample_label_maps",
]
