"""Memory-aware start: estimate a run's peak memory before anything heavy is built, and stop when it cannot fit.

The estimate is ``process base + slices x per-slice cost + data cache``:

* ``slices`` = ``batch_size x D`` for training, ``sw_batch_size x D`` for sliding-window inference (the image
  encoder sees every slice of every patch at once);
* ``base`` and ``per-slice`` come from ``memory_table.json`` beside this file: straight-line fits of measured
  peaks (process RSS on CPU, ``max_memory_reserved`` on CUDA) per backbone, SAM frame, patch side, N, mode,
  AMP, activation checkpointing and attention kernel, written by ``bench/measure_memory.py`` (re-measure with
  it when the network changes). A combination that was not measured is scaled from the nearest measured one
  and flagged as extrapolated;
* ``training loop`` (training): how far whole training runs (data loading, validation, allocator) peaked above
  the bare step, the largest difference measured (``train_loop_gb`` of the table);
* ``data cache`` (training) = ``cache_rate x`` the voxels of the cached cases (image, label and class indices).

It is compared with what is free: ``MemAvailable`` of ``/proc/meminfo`` (and the cgroup limit minus its usage,
if a limit is set) plus this process's current size, or the free memory of the CUDA device. ``memory_limit_gb``
(config) or ``MASKSAM_MEMORY_LIMIT_GB`` (environment) replaces that figure (tests, or to force a start).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import resource
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from .cli import parse_flag

__all__ = ["TABLE_PATH", "Estimate", "load_table", "estimate_peak_gb", "available_gb", "check_memory",
           "resolve_use_checkpoint", "InsufficientMemoryError"]

logger = logging.getLogger("masksam.memory")

TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "memory_table.json")
LIMIT_ENV = "MASKSAM_MEMORY_LIMIT_GB"
GB = 1024**3  # figures are GiB, written "GB" in messages as users read them


class InsufficientMemoryError(MemoryError):
    """The estimated peak memory of a run is larger than the memory that is free."""


@dataclass
class Estimate:
    """An estimated peak (GiB) and where it came from."""

    total_gb: float
    parts: Dict[str, float] = field(default_factory=dict)
    source: str = ""
    extrapolated: bool = False

    def describe(self) -> str:
        parts = " + ".join(f"{name} {value:.1f}" for name, value in self.parts.items() if value >= 0.05)
        return f"{self.total_gb:.1f} GB ({parts}; {self.source})"


# -------------------------------------------------------------------------------------------- the table
_TABLE_CACHE: Dict[str, dict] = {}


def load_table(path: str = TABLE_PATH) -> dict:
    if path not in _TABLE_CACHE:
        try:
            with open(path) as f:
                _TABLE_CACHE[path] = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"memory table {path!r} cannot be read ({e}); regenerate it with "
                             "bench/measure_memory.py or set memory_check false") from e
    return _TABLE_CACHE[path]


def _fit_distance(fit: dict, query: dict) -> Tuple[float, List[str]]:
    """How far a measured fit is from the query (0 = same network and mode), and what differs."""
    differs, distance = [], 0.0
    for key, weight in (("sam_size", 4.0), ("image_size", 2.0), ("num_queries", 1.0)):
        if fit[key] != query[key]:
            differs.append(f"{key} {fit[key]}")
            distance += weight * abs(math.log(query[key] / fit[key]))
    return distance, differs


def _select_fit(table: dict, query: dict) -> Tuple[dict, List[str]]:
    """The measured fit closest to ``query``: same device, backbone and mode; the same checkpointing and AMP when
    measured (else the plain fit, flagged); the table's attention kernel (``fused``) when measured for this
    backbone (LiteMedSAM's attention is not SAM's, so its fits keep serving after a switch)."""
    fits = [f for f in table.get("fits", []) if all(f.get(k) == query[k] for k in ("device", "backbone", "mode"))]
    if not fits:
        raise KeyError(f"no memory measurement for backbone {query['backbone']!r} on {query['device']} "
                       f"({query['mode']}) in the memory table (bench/measure_memory.py adds it)")
    fits = [f for f in fits if f.get("fused") == query["fused"]] or fits
    exact = [f for f in fits if f.get("checkpointing") == query["checkpointing"] and f.get("amp") == query["amp"]]
    best = min(exact or fits, key=lambda f: _fit_distance(f, query)[0])
    differs = _fit_distance(best, query)[1]
    if not exact:  # e.g. AMP or checkpointing not measured for this backbone: the plain setting
        differs.append(f"amp {best['amp']}, checkpointing {best['checkpointing']}")
    return best, differs


KEEP_FREED_SHARE = 0.5  # of the activations; measured up to +37 % of the whole step (keep_freed_memory's docstring)


def estimate_peak_gb(backbone: str, image_size: int, sam_upsample: int, depth: int, num_queries: int,
                     batch: int, mode: str = "train", amp: bool = False, checkpointing: bool = False,
                     device: str = "cpu", data_gb: float = 0.0, table: Optional[dict] = None,
                     fused: Optional[bool] = None, keep_freed: bool = False) -> Estimate:
    """Peak memory of one training step (``mode="train"``, ``batch`` = batch size) or one sliding-window
    forward (``mode="infer"``, ``batch`` = ``sw_batch_size``), in GiB. ``fused``: the encoder's attention kernel
    (``fused_attention``); ``None`` takes the table's default. ``keep_freed``: a CPU process that keeps freed
    memory (:func:`scripts.settings.keep_freed_memory`) holds fragments beyond the peak, planned as half the
    activations (measured for a LiteMedSAM 256x256x4 training step: 15.2 GiB peak without, 18.4-20.8 GiB
    resident with it)."""
    table = table if table is not None else load_table()
    device = "cuda" if str(device).startswith("cuda") else "cpu"
    sam_size = int(image_size) * (1 if backbone == "lite_medsam" else int(sam_upsample))
    query = dict(device=device, backbone=backbone, mode=mode, checkpointing=bool(checkpointing),
                 amp=bool(amp) and device == "cuda", fused=bool(table.get("fused", False)) if fused is None else bool(fused),
                 sam_size=sam_size, image_size=int(image_size), num_queries=int(num_queries))
    fit, differs = _select_fit(table, query)
    # per-slice activations scale with the SAM frame's area (encoder) and the patch area x N (decoder);
    # the measured split between the two is not known, so the larger factor is used (an upper bound)
    scale = max((sam_size / fit["sam_size"]) ** 2,
                (image_size / fit["image_size"]) ** 2 * num_queries / fit["num_queries"])
    slices = int(batch) * int(depth)
    activations = fit["per_slice_gb"] * scale * slices
    source = f"measured {fit['backbone']} {fit['mode']} fit"
    if differs:
        source = f"scaled from the {fit['backbone']} fit with {', '.join(differs)}"
    parts = {"process and weights": fit["base_gb"], f"activations for {slices} slice(s)": activations}
    if mode == "train" and table.get("train_loop_gb"):  # measured: whole runs peak above the bare step
        parts["training loop"] = float(table["train_loop_gb"])
    if keep_freed and device == "cpu":
        parts["freed memory kept (keep_freed_memory)"] = KEEP_FREED_SHARE * activations
    if data_gb:
        parts["data cache"] = data_gb
    return Estimate(total_gb=sum(parts.values()), parts=parts, source=source, extrapolated=bool(differs))


# ------------------------------------------------------------------------------------ what is available
def _read_int(path: str) -> Optional[int]:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_free_bytes() -> Optional[int]:
    """Limit minus usage of this process's memory cgroup (v2, else v1); ``None`` when unlimited."""
    for limit_path, usage_path in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_path), _read_int(usage_path)
        if limit is not None and usage is not None and limit < (1 << 60):
            return max(0, limit - usage)
    return None


def _meminfo_available_bytes() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def current_rss_gb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / GB
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB


def available_gb(device: str = "cpu", limit_gb: Optional[float] = None) -> Tuple[Optional[float], str]:
    """Memory this run may use (GiB) and where the figure comes from; ``None`` when it cannot be known."""
    env = os.environ.get(LIMIT_ENV)
    if limit_gb is None and env:
        try:
            limit_gb = float(env)
        except ValueError as e:
            raise ValueError(f"{LIMIT_ENV}={env!r} is not a number of GB") from e
    if limit_gb is not None:
        return float(limit_gb), "memory_limit_gb" if env is None else LIMIT_ENV
    if str(device).startswith("cuda"):
        import torch

        free, total = torch.cuda.mem_get_info(torch.device(device))
        return free / GB, f"free on {device} ({total / GB:.0f} GB total)"
    free = [b for b in (_meminfo_available_bytes(), _cgroup_free_bytes()) if b is not None]
    if not free:
        return None, "unknown"
    source = "MemAvailable" + (" and the cgroup limit" if _cgroup_free_bytes() is not None else "")
    return min(free) / GB + current_rss_gb(), f"free RAM ({source}) + this process"


# ------------------------------------------------------------------------------------------- data cache
def data_cache_gb(entries: Sequence[dict], cache_rate: float = 1.0, pixdim: Optional[Sequence[float]] = None,
                  in_channels: int = 1, class_indices: bool = True) -> float:
    """Memory of ``CacheDataset`` for ``entries``: float32 image channels and label, plus int64 class indices
    (training) per voxel, after resampling to ``pixdim``. Reads only the NIfTI headers."""
    if not entries or not cache_rate:
        return 0.0
    bytes_per_voxel = 4 * in_channels + 4 + (8 if class_indices else 0)
    cached = entries[: int(math.ceil(len(entries) * float(cache_rate)))]
    images = [e["image"][0] if isinstance(e["image"], (list, tuple)) else e["image"] for e in cached]
    voxels = _resampled_voxels(tuple(str(i) for i in images), tuple(pixdim) if pixdim else None)
    return voxels * bytes_per_voxel / GB


@functools.lru_cache(maxsize=8)
def _resampled_voxels(images: Tuple[str, ...], pixdim: Optional[Tuple[float, ...]]) -> float:
    """Voxels of ``images`` after resampling to ``pixdim``, from their NIfTI headers (cached: a training run asks
    twice, for ``use_checkpoint: auto`` and for the memory check)."""
    import nibabel as nib

    total = 0.0
    for image in images:
        header = nib.load(image).header
        shape, zooms = header.get_data_shape()[:3], header.get_zooms()[:3]
        if pixdim:
            shape = [s * z / p for s, z, p in zip(shape, zooms, pixdim)]
        total += float(math.prod(shape))
    return total


# ------------------------------------------------------------------------------------------------ check
def resolve_use_checkpoint(use_checkpoint, backbone: str, patch_size: Sequence[int], sam_upsample: int,
                           num_queries: int, batch_size: int, amp: bool = False, device="cpu",
                           fused_attention: bool = True, memory_limit_gb: Optional[float] = None,
                           data: Optional[Sequence[dict]] = None, cache_rate: float = 0.0, pixdim=None,
                           in_channels: int = 1, keep_freed_memory: bool = False) -> bool:
    """``use_checkpoint`` of a training run as a bool. ``"auto"``: activation checkpointing (slower steps,
    far less memory) only when the estimated peak of a training step without it is larger than what is
    available; when the estimate or the free memory is unknown, off."""
    if str(use_checkpoint).strip().lower() != "auto":
        return parse_flag(use_checkpoint, "use_checkpoint")
    settings = _run_settings(backbone, patch_size, sam_upsample, num_queries, batch_size, "train", amp, False, device,
                             fused_attention, data_cache_gb(data or [], cache_rate, pixdim, in_channels),
                             keep_freed_memory)
    del settings["checkpointing"]  # estimated both ways below
    try:
        without = estimate_peak_gb(**settings, checkpointing=False)
        with_checkpointing = estimate_peak_gb(**settings, checkpointing=True)
    except KeyError:
        return False
    free, source = available_gb(str(device), memory_limit_gb)
    if free is None or without.total_gb <= free:
        return False
    logger.info(f"use_checkpoint auto: on (estimated peak {without.total_gb:.1f} GB without activation checkpointing, "
                f"{with_checkpointing.total_gb:.1f} GB with it; available {free:.1f} GB, {source})")
    return True


def _run_settings(backbone: str, patch_size: Sequence[int], sam_upsample: int, num_queries: int, batch_size: int,
                  mode: str, amp, use_checkpoint, device, fused_attention, data_gb: float,
                  keep_freed_memory=False) -> dict:
    """The keyword arguments of :func:`estimate_peak_gb` for a run's config values (yes/no values parsed)."""
    return dict(backbone=backbone, image_size=int(patch_size[0]), sam_upsample=int(sam_upsample),
                depth=int(patch_size[2]), num_queries=int(num_queries), batch=int(batch_size), mode=mode,
                amp=parse_flag(amp, "amp"), checkpointing=parse_flag(use_checkpoint, "use_checkpoint"),
                device=str(device), fused=parse_flag(fused_attention, "fused_attention"), data_gb=data_gb,
                keep_freed=parse_flag(keep_freed_memory, "keep_freed_memory"))


def _candidates(settings: dict) -> List[Tuple[str, dict]]:
    """Cheaper settings to suggest, mildest first."""
    options = []
    if settings["batch"] > 1:
        options.append(("--batch_size 1" if settings["mode"] == "train" else "--sw_batch_size 1", {"batch": 1}))
    if not settings["checkpointing"]:
        options.append(("--use_checkpoint true", {"checkpointing": True}))
    if settings["batch"] > 1 and not settings["checkpointing"]:
        flag = "--batch_size 1" if settings["mode"] == "train" else "--sw_batch_size 1"
        options.append((f"{flag} --use_checkpoint true", {"batch": 1, "checkpointing": True}))
    if str(settings["device"]).startswith("cuda") and not settings["amp"]:
        options.append(("--amp true", {"amp": True}))
    return options


def check_memory(backbone: str, patch_size: Sequence[int], sam_upsample: int, num_queries: int, batch_size: int,
                 mode: str = "train", amp: bool = False, use_checkpoint: bool = False, device="cpu",
                 data: Optional[Sequence[dict]] = None, cache_rate: float = 0.0,
                 pixdim: Optional[Sequence[float]] = None, in_channels: int = 1,
                 memory_limit_gb: Optional[float] = None, enabled: bool = True,
                 fused_attention: bool = True, keep_freed_memory: bool = False) -> Optional[Estimate]:
    """Estimate the run's peak memory and raise :class:`InsufficientMemoryError` (estimate, what is free,
    settings that would fit) when it is larger than what is available. Call before building the network."""
    if not parse_flag(enabled, "memory_check"):
        return None
    data_gb = data_cache_gb(data or [], cache_rate, pixdim, in_channels, class_indices=mode == "train")
    settings = _run_settings(backbone, patch_size, sam_upsample, num_queries, batch_size, mode, amp, use_checkpoint,
                             device, fused_attention, data_gb, keep_freed_memory)
    amp, use_checkpoint, device = settings["amp"], settings["checkpointing"], settings["device"]
    try:
        estimate = estimate_peak_gb(**settings)
    except KeyError as e:
        logger.info(f"memory check skipped: {e.args[0]}")
        return None
    free, source = available_gb(device, memory_limit_gb)
    what = "training step" if mode == "train" else "sliding-window inference"
    if free is None:
        logger.info(f"estimated peak memory of a {what}: {estimate.describe()}; free memory unknown")
        return estimate
    if estimate.total_gb <= free:
        logger.info(f"estimated peak memory of a {what}: {estimate.describe()}; available {free:.1f} GB ({source})")
        return estimate
    fits = []
    for flags, change in _candidates(settings):
        candidate = estimate_peak_gb(**{**settings, **change})
        if candidate.total_gb <= free:
            fits.append(f"{flags} (about {candidate.total_gb:.1f} GB)")
    if backbone not in ("lite_medsam", "vit_t"):
        try:
            lite = estimate_peak_gb(**{**settings, "backbone": "lite_medsam", "sam_upsample": 1})
            if lite.total_gb <= free and int(patch_size[0]) == 256:
                fits.append(f"--backbone lite_medsam --sam_upsample 1 (about {lite.total_gb:.1f} GB)")
        except KeyError:
            pass
    advice = ("settings that would fit: " + "; ".join(fits)) if fits else \
        "no single setting change fits: use a machine with more memory or a smaller patch_size"
    raise InsufficientMemoryError(
        f"not enough memory for this {what} of {backbone} (patch {list(patch_size)}, batch {batch_size}, "
        f"use_checkpoint {bool(use_checkpoint)}, amp {bool(amp) and device.startswith('cuda')}): estimated peak "
        f"{estimate.describe()}, available {free:.1f} GB ({source}). {advice}. "
        "If you know better, set --memory_limit_gb N (or MASKSAM_MEMORY_LIMIT_GB) to the memory to plan for"
    )
