"""The settings a trained model needs, recorded beside its weights: ``models/model.json`` next to ``model.pt``;
and the process-wide run settings the configs' ``initialize`` sections apply (:func:`configure_determinism`,
:func:`timestamped_dir`).

``model.pt`` stays a plain state dict (what ``ckpt_export``, MONAI Label and the zoo tools read); the JSON file
beside it (same name, ``.json``) records the config ids the weights depend on: the network settings
(``model_settings`` of ``train.yaml``: backbone, K, N, patch, ``sam_upsample``, ... and any switch added there)
and the preprocessing (``class_names``, ``intensity_transform``, ``orientation``, ``pixdim``). Evaluation,
inference and MONAI Label read it (``configs/evaluate.yaml`` / ``inference.yaml``: ``trained``), so that
``--ckpt_dir DIR`` alone rebuilds the network the weights came from; a value set otherwise (command line or a
config file listed later) that differs is an error naming both.

Example ``model.json``::

    {"format": "masksam-model-settings/1", "weights": "model.pt",
     "selected": "best val_mean_dice 0.8123 at epoch 40", "epoch": 40, "iteration": 10000,
     "settings": {"backbone": "vit_b", "num_classes": 4, "class_names": ["background", "RV", "Myo", "LV"],
                  "num_queries": 8, "patch_size": [256, 256, 4], "in_channels": 1, "sam_upsample": 4,
                  "intensity_transform": {"_target_": "NormalizeIntensityd", "keys": ["image"], ...},
                  "orientation": null, "pixdim": null}}
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import math
import os
import sys
import tempfile
import time
from typing import Any, Dict, List, Mapping, Optional

import torch

from .cli import _parse_flags, is_bundle_cli, parse_flag
from .files import atomic_write_text

__all__ = [
    "FORMAT",
    "settings_path",
    "describe_transform",
    "transform_from_record",
    "write_model_settings",
    "read_model_settings",
    "recorded_transform",
    "check_model_settings",
    "configure_determinism",
    "timestamped_dir",
    "keep_freed_memory",
]

logger = logging.getLogger("masksam.settings")

FORMAT = "masksam-model-settings/1"
_SKIP = object()


def settings_path(ckpt_path: str) -> str:
    """``models/model.pt`` -> ``models/model.json``."""
    return os.path.splitext(os.fspath(ckpt_path))[0] + ".json"


# ------------------------------------------------------------------------------------- transforms as JSON
def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else _SKIP
    if isinstance(value, (list, tuple)):
        items = [_jsonable(v) for v in value]
        return _SKIP if any(v is _SKIP for v in items) else items
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return _jsonable(value.item())
    if hasattr(value, "item") and getattr(value, "size", None) == 1:  # numpy scalars
        return _jsonable(value.item())
    return _SKIP


def _find_attribute(obj: Any, name: str):
    """``obj.name`` or, one level down, ``obj.<member>.name`` (MONAI dict transforms wrap an array transform)."""
    if name in vars(obj):
        return True, vars(obj)[name]
    for member in vars(obj).values():
        if hasattr(member, "__dict__") and not isinstance(member, type) and name in vars(member):
            return True, vars(member)[name]
    return False, None


def _target_name(cls: type) -> str:
    import monai.transforms

    return cls.__name__ if getattr(monai.transforms, cls.__name__, None) is cls else f"{cls.__module__}.{cls.__qualname__}"


def transform_from_record(record: Optional[Mapping]) -> Any:
    """Instantiate a transform recorded by :func:`describe_transform` (``None`` -> ``None``)."""
    if not record:
        return None
    from monai.bundle import ConfigParser

    config = {k: v for k, v in record.items() if not k.startswith("_") or k == "_target_"}
    return ConfigParser({"transform": config}).get_parsed_content("transform")


def _same_output(a: Any, b: Any, keys) -> bool:
    from monai.data import MetaTensor

    probe = torch.linspace(-50.0, 300.0, 2 * 6 * 5 * 3).reshape(2, 6, 5, 3)
    probe[:, 0] = 0.0  # some zeros (nonzero=True normalisation)
    data = {k: MetaTensor(probe.clone()) for k in keys}
    out_a, out_b = a(copy.deepcopy(data)), b(copy.deepcopy(data))
    return all(torch.allclose(torch.as_tensor(out_a[k]), torch.as_tensor(out_b[k]), atol=1e-5) for k in keys)


def describe_transform(transform: Any) -> Optional[Dict[str, Any]]:
    """A MONAI config dict (``_target_`` + arguments) that rebuilds ``transform``, checked by applying both to a
    probe image. A transform whose arguments cannot be read back is recorded as ``{"_target_": ..., "_recorded_":
    false}`` (its type is still compared; its arguments are not)."""
    if transform is None:
        return None
    cls = type(transform)
    record: Dict[str, Any] = {"_target_": _target_name(cls)}
    for name, param in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        found, value = _find_attribute(transform, name)
        value = _jsonable(value) if found else _SKIP
        if value is not _SKIP:
            record[name] = value
    keys = record.get("keys") or []
    try:
        rebuilt = transform_from_record(record)
        faithful = bool(keys) and _same_output(transform, rebuilt, keys)
    except Exception:  # noqa: BLE001 - any failure means: arguments not recoverable
        faithful = False
    if not faithful:
        logger.warning(f"the arguments of intensity transform {record['_target_']} cannot be recorded in model.json; "
                       "evaluation and inference will use the intensity_transform of their config")
        return {"_target_": record["_target_"], "_recorded_": False}
    return record


def recorded_transform(settings: Mapping, key: str = "intensity_transform") -> Any:
    """The transform recorded under ``key`` in ``settings`` (from :func:`read_model_settings`), or ``None``."""
    record = settings.get(key)
    if not record or record.get("_recorded_") is False:
        return None
    return transform_from_record(record)


# ------------------------------------------------------------------------------------------ read / write
def _normalise(value: Any) -> Any:
    """JSON-like form used in the file and for comparisons (tuples -> lists, transforms -> records)."""
    if isinstance(value, Mapping):
        return {str(k): _normalise(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if hasattr(value, "__call__") and hasattr(value, "__dict__"):
        return describe_transform(value)
    return repr(value)


def write_model_settings(ckpt_path: str, settings: Mapping, **info: Any) -> str:
    """Write ``<ckpt stem>.json`` atomically: ``settings`` plus ``info`` (e.g. ``selected``, ``epoch``)."""
    content = {"format": FORMAT, "weights": os.path.basename(os.fspath(ckpt_path)), **_normalise(info),
               "settings": _normalise(settings)}
    return atomic_write_text(settings_path(ckpt_path), json.dumps(content, indent=2) + "\n")


def read_model_file(ckpt_path: str) -> Optional[Dict[str, Any]]:
    """The whole ``model.json`` beside ``ckpt_path``, or ``None`` when there is none."""
    path = settings_path(ckpt_path)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            content = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"model settings file {path!r} cannot be read: {e}; delete it to use the config's settings, "
                         "or restore it from the training run") from e
    if not isinstance(content, dict) or not isinstance(content.get("settings"), dict):
        raise ValueError(f"model settings file {path!r} has no 'settings' object (format {FORMAT!r} expected)")
    return content


def read_model_settings(ckpt_path: str) -> Dict[str, Any]:
    """The recorded settings of the model at ``ckpt_path`` (``{}`` without a ``model.json``), logged once."""
    content = read_model_file(ckpt_path)
    if content is None:
        if os.path.isfile(os.fspath(ckpt_path)):
            logger.info(f"no {settings_path(ckpt_path)} beside the weights: using the config's model settings")
        return {}
    settings = content["settings"]
    shown = ", ".join(f"{k} {v}" for k, v in settings.items() if k != "intensity_transform")
    logger.info(f"model settings from {settings_path(ckpt_path)} ({content.get('selected', 'weights')}): {shown}")
    return dict(settings)


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-9)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        if a.get("_recorded_") is False or b.get("_recorded_") is False:
            return a.get("_target_") == b.get("_target_")
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return a == b


def _command_line_keys() -> List[str]:
    return list(_parse_flags(sys.argv[2:])[1]) if is_bundle_cli() else []


def check_model_settings(ckpt_path: str, current: Mapping) -> Dict[str, Any]:
    """Raise naming both values where ``current`` (the config's final values) differs from the settings recorded
    beside ``ckpt_path``. Returns the recorded settings (``{}`` without a ``model.json``). Runs before the
    network is built."""
    content = read_model_file(ckpt_path)
    recorded = dict(content["settings"]) if content else {}
    current = _normalise(current)
    from_cli = set(_command_line_keys())
    conflicts = []
    for key, value in current.items():
        if key in recorded and not _equal(recorded[key], value):
            where = "on the command line" if key in from_cli else "in the config"
            conflicts.append(f"{key}: {json.dumps(value)} {where} vs {json.dumps(recorded[key])} recorded")
    if conflicts:
        raise ValueError(
            f"the model in {os.path.dirname(os.path.abspath(ckpt_path))} was trained with other settings than the "
            f"ones given ({settings_path(ckpt_path)}): " + "; ".join(conflicts)
            + ". Drop those overrides (the recorded settings are used by default) or use the model they belong to"
        )
    return recorded


# ------------------------------------------------------------------------------------- run settings
def configure_determinism(deterministic: bool | str) -> bool:
    """Apply ``deterministic`` (after ``monai.utils.set_determinism``): true, PyTorch's deterministic algorithms
    (a warning where an operation has none) and no cuDNN autotuning; false, cuDNN autotuning (faster
    convolutions, small run-to-run differences on GPU). Returns the setting as a bool."""
    deterministic = parse_flag(deterministic, "deterministic")
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = not deterministic
    return deterministic


def timestamped_dir(name: str) -> str:
    """``<system temp dir>/<name>/<YYYYmmdd-HHMMSS>``: a fresh folder per run outside the repository (the path
    only; the run creates it)."""
    return os.path.join(tempfile.gettempdir(), name, time.strftime("%Y%m%d-%H%M%S"))


# glibc mallopt parameters (malloc.h): M_TRIM_THRESHOLD, M_MMAP_MAX.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory(device: Any = "cpu", enabled: Any = True) -> bool:
    """On a CPU run under glibc, keep freed memory in the process instead of returning it to the system.

    glibc serves every allocation above 32 MiB with its own ``mmap`` and unmaps it on free, so each training
    step faults its activations in afresh, page by page; on the 2-core development machine that kernel time was
    larger than the compute (a LiteMedSAM 256x256x4 training step: 122-135 s wall of which 103-120 s system
    time; 41-45 s with under 2 s after this call; ``docs/benchmarks.md`` "Proof of learning"). With ``mmap``
    off and trimming above 2 GiB only, freed blocks are reused by the next step. The cost: the process keeps its
    peak plus fragments (that step: 15.2 GiB peak without; 18.4-20.8 GiB resident with it), which the memory
    estimate counts (:func:`scripts.memory.estimate_peak_gb`, ``keep_freed``). Off by default
    (``keep_freed_memory`` in ``train.yaml``). Does nothing when ``enabled`` is false, on a CUDA device or without
    glibc. Returns whether it applied. Process-wide: call it once, before the training loop.
    """
    if not parse_flag(enabled, "keep_freed_memory"):
        return False
    if torch.device(device).type != "cpu" or not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        applied = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
    if applied:
        logger.info("CPU run: freed memory stays in the process (keep_freed_memory), so steps do not re-fault it")
    return applied
