"""MONAI's ``SupervisedTrainer`` for a set criterion whose terms the training log prints."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from monai.engines import SupervisedTrainer

from .criterion import MaskSAMLoss

LOSS_TERMS = "loss_terms"  # key of the detached terms in ``engine.state.output``


class TermsSupervisedTrainer(SupervisedTrainer):
    """``SupervisedTrainer`` that trains on ``loss_function`` (a :class:`MaskSAMLoss`) and keeps the detached
    terms of each iteration, and their weighted sum ``loss_total``, in ``engine.state.output["loss_terms"]``
    for the progress log (as detectron2's trainer logs Mask2Former's loss dict). All arguments are
    ``SupervisedTrainer``'s."""

    def __init__(self, *args: Any, loss_function: MaskSAMLoss, **kwargs: Any) -> None:
        super().__init__(*args, loss_function=self._loss_and_terms, **kwargs)
        self.set_loss = loss_function

    def _loss_and_terms(self, pred: Mapping[str, Any], label: torch.Tensor) -> torch.Tensor:
        criterion = self.set_loss.criterion
        terms = criterion(pred, label)
        total = criterion.weighted_sum(terms)
        self.state.output[LOSS_TERMS] = {
            **{name: value.detach() for name, value in terms.items()},
            "loss_total": total.detach(),
        }
        return total


__all__ = ["TermsSupervisedTrainer", "LOSS_TERMS"]
