"""MaskSAM training objective (paper Eq. 1): dataset mapping, Hungarian matcher, set criterion, weighted sum."""

from __future__ import annotations

from .criterion import TERM_NAMES, MaskSAMLoss, SetCriterion
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
from .trainer import LOSS_TERMS, TermsSupervisedTrainer

__all__ = [
    "MaskSAMLoss",
    "SetCriterion",
    "TermsSupervisedTrainer",
    "LOSS_TERMS",
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
