"""Checkpoints: the best model as a plain state dict, a resumable last checkpoint, safe loading.

- State dicts (trained models, SAM's and LiteMedSAM's weights) are read by :func:`read_state_dict` and compared
  with the module they are loaded into by :func:`check_state_dict`, whose error names the keys and the likely
  cause; ``scripts.backbones`` and ``scripts.pretrained`` load through them too.

- ``models/model.pt`` (``BestModelSaver``): the network's plain ``state_dict`` (``module.`` prefix of DDP
  removed) -- what ``monai.bundle ckpt_export``, MONAI Label and ``load_model_weights`` read -- with
  ``models/model.json`` beside it (the settings the weights need, ``scripts.settings``). The best weights by
  validation when a validation ran; otherwise, when training ends, the last weights (the log says which).
- ``output_dir/checkpoint_last.pt`` (``ResumableCheckpoint``): network, optimiser, LR scheduler, AMP scaler,
  trainer position (iteration/epoch), best-metric bookkeeping and the model settings it was trained with.
  Saved every epoch and, optionally, every ``save_interval_iters`` iterations; loaded at start when
  ``resume`` is true, so a killed run continues where it stopped.

All files are written atomically (temporary file + ``os.replace``) and read with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, Mapping, Optional

import torch
from ignite.engine import Engine, Events

from .cli import parse_flag
from .distributed import unwrap, is_rank_zero
from .files import atomic_torch_save, ensure_writable_dir, safe_torch_load
from .settings import check_model_settings, settings_path, write_model_settings

__all__ = [
    "CheckpointMismatchError",
    "read_state_dict",
    "check_state_dict",
    "load_model_weights",
    "prepare_training_output",
    "BestModelSaver",
    "ResumableCheckpoint",
]

logger = logging.getLogger("masksam.checkpoint")


class CheckpointMismatchError(ValueError):
    """A state dict does not fit the module it is loaded into (the message names the keys and shapes)."""


# ------------------------------------------------------------------------- reading and comparing state dicts
def _extract_state_dict(checkpoint: Any, path: str) -> Mapping[str, torch.Tensor]:
    """The state dict inside a loaded file: the file itself, or the mapping under ``network`` (our last
    checkpoint), ``model`` (LiteMedSAM's file) or ``state_dict`` (ignite-style single-key dicts)."""
    if not isinstance(checkpoint, Mapping):
        raise CheckpointMismatchError(f"checkpoint {path!r} holds a {type(checkpoint).__name__}, not a state dict")
    for key in ("network", "model", "state_dict"):
        if key in checkpoint and isinstance(checkpoint[key], Mapping):
            return checkpoint[key]
    return checkpoint


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """The state dict stored at ``path``, read with ``weights_only=True`` (a downloaded file cannot run code)."""
    return dict(_extract_state_dict(safe_torch_load(path), path))


def _describe(keys, limit=5) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


# parameters whose first dimension gives a model setting away: (key, setting, value from the first dimension)
_SETTING_KEYS = (
    ("decoder.class_head.bias", "num_classes (K)", lambda n: n - 1),  # K classes + "no object"
    ("prompt_generator.box_head.bias", "num_queries (N)", lambda n: n),
    ("decoder.depth_pos_embed", "patch depth D (patch_size[2])", lambda n: n),
)


def _likely_causes(sd: Mapping, own: Mapping, missing, unexpected) -> list:
    causes = []
    if missing or unexpected:
        causes.append(f"another backbone (layer names differ, e.g. {sorted(missing or unexpected)[0]})")
    for key, setting, value in _SETTING_KEYS:
        if key in sd and key in own and hasattr(sd[key], "shape") and sd[key].shape[:1] != own[key].shape[:1]:
            causes.append(f"{setting}: checkpoint {value(int(sd[key].shape[0]))} vs network {value(int(own[key].shape[0]))}")
    return causes


def check_state_dict(network: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], path: str,
                     settings: Optional[Mapping] = None, what: str = "the network") -> Dict[str, torch.Tensor]:
    """Return ``state_dict`` with DDP's ``module.`` prefixes removed, ready for ``load_state_dict(strict=True)``
    into ``network`` (or the module inside its DDP wrapper); or raise one :class:`CheckpointMismatchError` that
    names the likely cause, the missing, unexpected and mis-shaped keys (a summary, never the tensors).

    Args:
        path: where ``state_dict`` came from, named in the error.
        settings: the settings ``network`` was built with, named in the error.
        what: the module in the error, e.g. ``"the vit_b backbone"``.
    """
    sd = {(k[7:] if k.startswith("module.") else k): v for k, v in state_dict.items()}
    own = unwrap(network).state_dict()
    missing = set(own) - set(sd)
    unexpected = set(sd) - set(own)
    shapes = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs network {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(sd))
        if hasattr(sd[k], "shape") and tuple(sd[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        lines = [f"checkpoint {path!r} does not match {what}"
                 + (f" built with {dict(settings)}" if settings else "") + ":"]
        causes = _likely_causes(sd, own, missing, unexpected)
        if causes:
            lines.append("  likely cause: " + "; ".join(causes))
        if missing:
            lines.append(f"  {len(missing)} missing key(s): {_describe(missing)}")
        if unexpected:
            lines.append(f"  {len(unexpected)} unexpected key(s): {_describe(unexpected)}")
        if shapes:
            lines.append(f"  {len(shapes)} shape mismatch(es): " + "; ".join(shapes[:5]))
        raise CheckpointMismatchError("\n".join(lines))
    return sd


def load_model_weights(network: torch.nn.Module, path: str, settings: Optional[Mapping] = None) -> torch.nn.Module:
    """Load a trained ``model.pt`` (plain state dict, or our ``checkpoint_last.pt``) strictly into ``network``."""
    if settings:
        check_model_settings(path, settings)  # the model.json beside model.pt, when there is one
    checkpoint = safe_torch_load(path)
    if isinstance(checkpoint, Mapping) and settings and isinstance(checkpoint.get("settings"), Mapping):
        _check_settings(checkpoint["settings"], settings, path)
    sd = check_state_dict(network, _extract_state_dict(checkpoint, path), path, settings)
    unwrap(network).load_state_dict(sd, strict=True)
    logger.info(f"loaded network weights from {path}")
    return network


def _check_settings(saved: Mapping, current: Mapping, path: str) -> None:
    diffs = [f"{k}: checkpoint {saved[k]!r} vs config {current[k]!r}"
             for k in current if k in saved and _plain(saved[k]) != _plain(current[k])]
    if diffs:
        raise ValueError(f"checkpoint {path!r} was trained with other model settings: " + "; ".join(diffs))


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def prepare_training_output(output_dir: str, ckpt_dir: str, resume: bool = False, overwrite: bool = False,
                            last_name: str = "checkpoint_last.pt", best_name: str = "model.pt") -> str:
    """Check before any heavy work that the output folders are writable and that a fresh run would not
    silently replace a previous run's checkpoints. Returns the last-checkpoint path."""
    resume, overwrite = parse_flag(resume, "resume"), parse_flag(overwrite, "overwrite")
    ensure_writable_dir(output_dir, "output_dir")
    ensure_writable_dir(ckpt_dir, "ckpt_dir")
    last = os.path.join(output_dir, last_name)
    best = os.path.join(ckpt_dir, best_name)
    if overwrite:
        return last
    if resume and os.path.isfile(last):
        return last
    existing = [p for p in (last, best) if os.path.isfile(p)]
    if existing:
        hint = "resume=true to continue it, " if os.path.isfile(last) else ""
        raise FileExistsError(
            f"a previous run's checkpoint(s) exist: {existing}. Pass {hint}overwrite=true to replace them, "
            "or choose another output_dir/ckpt_dir."
        )
    return last


class BestModelSaver:
    """Attach to the validator: save the network's plain state dict when ``metric_name`` improves, with the
    model settings (``settings``, written to ``model.json`` beside it).

    :meth:`save_final` (called by ``ResumableCheckpoint`` when training completes) saves the last weights when
    no validation produced a model, so that every finished run leaves a usable ``model.pt``."""

    def __init__(self, save_dir: str, network: torch.nn.Module, metric_name: str = "val_mean_dice",
                 filename: str = "model.pt", settings: Optional[Mapping] = None) -> None:
        self.path = os.path.join(save_dir, filename)
        self.network, self.metric_name, self.settings = network, metric_name, dict(settings or {})
        self.best_metric, self.best_epoch = -float("inf"), -1
        self.validations = 0  # in this process (a resumed run starts at 0)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def save_weights(self, **info: Any) -> None:
        """Write model.pt (plain state dict) and model.json (settings + ``info``), each atomically."""
        atomic_torch_save(unwrap(self.network).state_dict(), self.path)
        write_model_settings(self.path, self.settings, **info)

    def __call__(self, engine: Engine) -> None:
        value = engine.state.metrics.get(self.metric_name)
        if value is None:
            raise KeyError(f"BestModelSaver: metric {self.metric_name!r} not in {list(engine.state.metrics)}")
        self.validations += 1
        value = float(value)
        if value != value or value <= self.best_metric:  # NaN never counts as an improvement
            return
        self.best_metric, self.best_epoch = value, int(engine.state.epoch)
        if is_rank_zero():
            selected = f"best {self.metric_name} {value:.4f} at epoch {self.best_epoch}"
            self.save_weights(selected=selected, epoch=self.best_epoch, metric={self.metric_name: value})
            logger.info(f"new {selected}: saved {self.path} and {settings_path(self.path)}")

    def save_final(self, trainer: Engine) -> None:
        """At the end of training: keep the best validated model, else save the last weights; say which."""
        if not is_rank_zero():
            return
        epoch, iteration = int(trainer.state.epoch), int(trainer.state.iteration)
        if self.best_epoch >= 0:
            logger.info(f"training done: {self.path} holds the best validated weights ({self.metric_name} "
                        f"{self.best_metric:.4f} at epoch {self.best_epoch}); the last weights are in checkpoint_last.pt")
            return
        reason = ("no validation ran (val_interval is larger than the epochs trained)" if self.validations == 0
                  else f"no validation gave a finite {self.metric_name}")
        selected = f"last weights at epoch {epoch}, iteration {iteration}: {reason}"
        self.save_weights(selected=selected, epoch=epoch, iteration=iteration)
        logger.info(f"training done: {reason}; saved the last weights (epoch {epoch}, iteration {iteration}) as "
                    f"{self.path} with {settings_path(self.path)}")

    def state_dict(self) -> Dict[str, Any]:
        return {"best_metric": self.best_metric, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: Mapping) -> None:
        self.best_metric, self.best_epoch = float(state["best_metric"]), int(state["best_epoch"])


class ResumableCheckpoint:
    """Attach to the trainer: save ``checkpoint_last.pt`` every epoch (and every ``save_interval_iters``
    iterations when > 0); when ``resume`` and the file exists, restore everything at ``STARTED``."""

    def __init__(self, path: str, network: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 lr_scheduler: Optional[Any] = None, best_saver: Optional[BestModelSaver] = None,
                 resume: bool = False, save_interval_iters: int = 0, settings: Optional[Mapping] = None) -> None:
        self.path, self.network, self.optimizer, self.lr_scheduler = path, network, optimizer, lr_scheduler
        self.best_saver, self.resume = best_saver, parse_flag(resume, "resume")
        self.save_interval_iters = int(save_interval_iters or 0)
        self.settings = {k: _plain(v) for k, v in (settings or {}).items()}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)
        if self.best_saver is not None:  # every finished run leaves a model.pt (best validated, else last)
            engine.add_event_handler(Events.COMPLETED, self.best_saver.save_final)
        if self.save_interval_iters > 0:
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.save_interval_iters), self.save)

    def save(self, engine: Engine) -> None:
        if not is_rank_zero():
            return
        scaler = getattr(engine, "scaler", None)
        state = {
            "network": unwrap(self.network).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "trainer": {"iteration": int(engine.state.iteration), "epoch": int(engine.state.epoch),
                        "epoch_length": int(engine.state.epoch_length), "max_epochs": int(engine.state.max_epochs)},
            "best": self.best_saver.state_dict() if self.best_saver is not None else None,
            "settings": self.settings,
        }
        atomic_torch_save(state, self.path)
        logger.info(f"saved {self.path} (epoch {engine.state.epoch}, iteration {engine.state.iteration})")

    def _restore_schedule_position(self, saved: Mapping) -> None:
        """Take the position (step count) from the checkpoint but the schedule itself (base LR, total_iters,
        power) from the current config, so that resuming with a larger max_epochs extends the poly decay
        instead of keeping the LR at the old run's end value."""
        sched = self.lr_scheduler
        for key in ("last_epoch", "_step_count"):
            if key in saved:
                setattr(sched, key, saved[key])
        closed_form = getattr(sched, "_get_closed_form_lr", None)
        if closed_form is not None:
            lrs = closed_form()
            for group, lr in zip(self.optimizer.param_groups, lrs):
                group["lr"] = lr
            sched._last_lr = list(lrs)
        else:  # no closed form: keep the LRs the optimizer state carried
            sched._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def load(self, engine: Engine) -> None:
        if not self.resume:
            return
        if not os.path.isfile(self.path):
            logger.info(f"resume: no {self.path} yet, starting from scratch")
            return
        ck = safe_torch_load(self.path)
        if not isinstance(ck, Mapping) or "trainer" not in ck or "network" not in ck:
            raise ValueError(f"{self.path!r} is not a MaskSAM resumable checkpoint (keys: {list(ck)[:10]})")
        _check_settings(ck.get("settings") or {}, self.settings, self.path)
        sd = check_state_dict(self.network, ck["network"], self.path, self.settings)
        unwrap(self.network).load_state_dict(sd, strict=True)
        self.optimizer.load_state_dict(ck["optimizer"])
        if self.lr_scheduler is not None and ck.get("lr_scheduler") is not None:
            self._restore_schedule_position(ck["lr_scheduler"])
        scaler = getattr(engine, "scaler", None)
        if scaler is not None and ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        if self.best_saver is not None and ck.get("best"):
            self.best_saver.load_state_dict(ck["best"])
        saved = ck["trainer"]
        if int(saved["epoch_length"]) != int(engine.state.epoch_length):
            raise ValueError(
                f"{self.path!r} was written with iterations_per_epoch={saved['epoch_length']}, the config now has "
                f"{engine.state.epoch_length}; resume with the same iterations_per_epoch"
            )
        engine.load_state_dict({"iteration": int(saved["iteration"]), "epoch_length": int(saved["epoch_length"]),
                                "max_epochs": int(engine.state.max_epochs)})
        restored = sum(1 for state in self.optimizer.state.values() if state)
        logger.info(f"resumed from {self.path}: epoch {engine.state.epoch}, iteration {engine.state.iteration}, "
                    f"lr {self.optimizer.param_groups[0]['lr']:.3e}, optimizer state for {restored} parameter(s), "
                    f"lr_scheduler step {getattr(self.lr_scheduler, 'last_epoch', None)}")
