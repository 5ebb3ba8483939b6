"""Training-loop handlers that MONAI does not have: gradient clipping, per-iteration progress with every loss
term, per-class Dice as named scalars.

The configs use MONAI's own handlers wherever they do the job (``LrScheduleHandler``, ``ValidationHandler``,
``StatsHandler``, ``TensorBoardStatsHandler``, ``MeanDice``); each class here says what it adds to them.
"""

from __future__ import annotations

import datetime
import logging
import math
import time
from typing import Dict, Optional, Sequence

import torch
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents
from monai.handlers import MeanDice

from .distributed import is_rank_zero
from .loss import LOSS_TERMS

__all__ = ["GradientClipHandler", "TrainingLogger", "PerClassDice"]

logger = logging.getLogger("masksam.train")


class GradientClipHandler:
    """Clip the global gradient norm after ``backward`` and before ``optimizer.step``: ``SupervisedTrainer``
    has no clipping of its own and MONAI/ignite no handler for it (nnU-Net clips at 12). Under AMP the gradients are unscaled first, as ``GradScaler`` requires.
    The norm before clipping is kept in ``engine.state.grad_norm`` for logging."""

    def __init__(self, max_norm: Optional[float] = 12.0, norm_type: float = 2.0) -> None:
        self.max_norm, self.norm_type = max_norm, norm_type

    def attach(self, engine: Engine) -> None:
        if getattr(engine, "accumulation_steps", 1) != 1:
            raise ValueError("GradientClipHandler supports accumulation_steps=1 only")
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if not self.max_norm or self.max_norm <= 0:
            return
        scaler = getattr(engine, "scaler", None)
        if getattr(engine, "amp", False) and scaler is not None:
            scaler.unscale_(engine.optimizer)
        params = [p for group in engine.optimizer.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, self.max_norm, norm_type=self.norm_type)
        engine.state.grad_norm = float(norm)


def _as_float(value) -> float:
    return float(value.detach().float().mean()) if isinstance(value, torch.Tensor) else float(value)


class TrainingLogger:
    """One line per iteration (loss, every term in ``engine.state.output["loss_terms"]``, gradient norm, LR, speed) and
    one per epoch (time, mean loss, ETA); the same scalars go to TensorBoard when ``tensorboard_dir`` is set.
    Only rank 0 logs. MONAI's ``StatsHandler`` / ``TensorBoardStatsHandler`` log the total loss only."""

    def __init__(self, optimizer: Optional[torch.optim.Optimizer] = None,
                 tensorboard_dir: Optional[str] = None, log_every: int = 1, tag: str = "train") -> None:
        self.optimizer = optimizer
        self.tensorboard_dir, self.log_every, self.tag = tensorboard_dir, max(1, int(log_every)), tag
        self.writer = None
        self._epoch_start = self._iter_start = self._run_start = 0.0
        self._epoch_losses: list = []
        self._iters_this_run = 0
        self._iter_seconds = 0.0  # sum of iteration times in this run (validation excluded)

    def attach(self, engine: Engine) -> None:
        if not is_rank_zero():
            return
        if self.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=self.tensorboard_dir)
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.ITERATION_STARTED, self._iteration_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)
        engine.add_event_handler(Events.COMPLETED, self._completed)

    def _started(self, engine: Engine) -> None:
        self._run_start = time.perf_counter()
        self._iters_this_run, self._iter_seconds = 0, 0.0

    def _epoch_started(self, engine: Engine) -> None:
        self._epoch_start = time.perf_counter()
        self._epoch_losses = []

    def _iteration_started(self, engine: Engine) -> None:
        self._iter_start = time.perf_counter()

    def terms(self, engine: Engine) -> Dict[str, float]:
        output = engine.state.output
        loss = output.get("loss") if isinstance(output, dict) else output
        terms = {"loss": _as_float(loss)} if loss is not None else {}
        for name, value in ((output.get(LOSS_TERMS) if isinstance(output, dict) else None) or {}).items():
            terms[name] = _as_float(value)
        if getattr(engine.state, "grad_norm", None) is not None:
            terms["grad_norm"] = float(engine.state.grad_norm)
        if self.optimizer is not None:
            terms["lr"] = float(self.optimizer.param_groups[0]["lr"])
        return terms

    def _iteration_completed(self, engine: Engine) -> None:
        self._iters_this_run += 1
        seconds = time.perf_counter() - self._iter_start
        self._iter_seconds += seconds
        terms = self.terms(engine)
        if "loss" in terms:
            self._epoch_losses.append(terms["loss"])
            if not math.isfinite(terms["loss"]):
                logger.warning(f"non-finite loss at iteration {engine.state.iteration}: {terms}")
        if self.writer is not None:
            for name, value in terms.items():
                self.writer.add_scalar(f"{self.tag}/{name}", value, engine.state.iteration)
        epoch_length = engine.state.epoch_length
        local = (engine.state.iteration - 1) % epoch_length + 1
        if local % self.log_every == 0 or local == epoch_length:
            parts = " ".join(f"{k} {v:.3e}" if k == "lr" else f"{k} {v:.4f}" for k, v in terms.items())
            logger.info(f"Epoch {engine.state.epoch}/{engine.state.max_epochs} iter {local}/{epoch_length} "
                        f"(global {engine.state.iteration}): {parts} | {seconds:.2f} s/it")

    def _epoch_completed(self, engine: Engine) -> None:
        seconds = time.perf_counter() - self._epoch_start
        done_total = engine.state.epoch * engine.state.epoch_length
        remaining = engine.state.max_epochs * engine.state.epoch_length - done_total
        per_iter = self._iter_seconds / max(1, self._iters_this_run)
        mean_loss = sum(self._epoch_losses) / max(1, len(self._epoch_losses))
        logger.info(f"Epoch {engine.state.epoch}/{engine.state.max_epochs} done in {seconds:.1f} s "
                    f"(training {per_iter:.2f} s/it; validation and checkpointing included in the total), "
                    f"mean loss {mean_loss:.4f}, training ETA {datetime.timedelta(seconds=round(remaining * per_iter))}")
        if self.writer is not None:
            self.writer.add_scalar(f"{self.tag}/epoch_loss", mean_loss, engine.state.epoch)
            self.writer.add_scalar(f"{self.tag}/epoch_seconds", seconds, engine.state.epoch)
            self.writer.flush()

    def _completed(self, engine: Engine) -> None:
        logger.info(f"training finished: {engine.state.iteration} iterations, "
                    f"{time.perf_counter() - self._run_start:.1f} s in this run")
        if self.writer is not None:
            self.writer.close()


class PerClassDice(MeanDice):
    """Dice per foreground class, written into ``engine.state.metrics`` as ``{name}_{class}`` floats
    (e.g. ``val_dice_RV``) plus ``name`` = their mean, so StatsHandler/TensorBoard log each class: ``MeanDice``
    with ``reduction="mean_batch"`` leaves one unnamed tensor, which TensorBoardStatsHandler skips."""

    def __init__(self, class_names: Sequence[str], include_background: bool = False, **kwargs) -> None:
        kwargs.setdefault("output_transform", lambda x: x)
        super().__init__(include_background=include_background, reduction="mean_batch", **kwargs)
        names = list(class_names)
        self.class_names = names if include_background else names[1:]

    def completed(self, engine: Engine, name: str) -> None:
        result = self.compute()
        values = torch.as_tensor(result, dtype=torch.float32).reshape(-1).tolist()
        if len(values) != len(self.class_names):
            raise ValueError(f"PerClassDice: {len(values)} Dice values for classes {self.class_names}")
        for cls, value in zip(self.class_names, values):
            engine.state.metrics[f"{name}_{cls}"] = value
        finite = [v for v in values if v == v]
        engine.state.metrics[name] = sum(finite) / len(finite) if finite else float("nan")
