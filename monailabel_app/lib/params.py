"""Request parameters of ``masksam_interactive``: parsed and checked before any inference.

Pure Python + numpy (no MONAI Label import), so the rules are unit-tested in the project's environment
(``tests/test_assist_app.py``). Every problem raises :class:`BadParameter`, which names the parameter, the
expected form and what came; the app answers it with HTTP 400.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

__all__ = ["BadParameter", "InteractiveRequest", "parse_request", "check_label_map", "OUTPUT_MODES", "MODES"]

OUTPUT_MODES = ("target", "labelmap")
MODES = ("auto", "prompt", "correct")


class BadParameter(ValueError):
    """A request parameter that does not have the expected form (HTTP 400)."""

    def __init__(self, param: str, expected: str, got: Any) -> None:
        text = repr(got)
        text = text if len(text) <= 200 else text[:200] + "..."
        super().__init__(f"bad parameter '{param}': expected {expected}, got {text}")
        self.param = param


@dataclass
class InteractiveRequest:
    """A checked ``masksam_interactive`` request (voxel indices of the image as stored)."""

    target: int
    target_name: str
    foreground: List[List[int]] = field(default_factory=list)
    background: List[List[int]] = field(default_factory=list)
    box: Optional[Tuple[List[int], List[int]]] = None  # inclusive (i0, j0, k0), (i1, j1, k1)
    output_mode: str = "target"
    mode: str = "auto"
    propagate: bool = False
    mask_prompt: bool = False
    protect_other_labels: bool = True
    click_radius: int = 0

    def slices(self) -> List[int]:
        """The slices that hold a click or the box."""
        zs = {p[2] for p in self.foreground + self.background}
        if self.box is not None:
            zs |= set(range(self.box[0][2], self.box[1][2] + 1))
        return sorted(zs)

    def clicks_on(self, z: int) -> Tuple[List[List[int]], List[List[int]]]:
        """``([[i, j], ...] foreground, [[i, j], ...] background)`` on slice ``z``."""
        return ([p[:2] for p in self.foreground if p[2] == z], [p[:2] for p in self.background if p[2] == z])


def _first(value):
    """MONAI Label's config options arrive as lists of choices; the first is the value."""
    return value[0] if isinstance(value, (list, tuple)) and len(value) and not isinstance(value[0], (list, tuple)) \
        else value


def _bool(data: Mapping, key: str, default: bool) -> bool:
    value = _first(data.get(key, default))
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise BadParameter(key, "true or false", value)


def _choice(data: Mapping, key: str, choices: Sequence[str], default: str) -> str:
    value = _first(data.get(key, default))
    if not isinstance(value, str) or value.lower() not in choices:
        raise BadParameter(key, f"one of {list(choices)}", value)
    return value.lower()


def _points(data: Mapping, key: str, shape: Sequence[int]) -> List[List[int]]:
    value = data.get(key)
    if value is None or (isinstance(value, (list, tuple)) and len(value) == 0):
        return []
    expected = "a list of [i, j, k] voxel indices, e.g. [[120, 140, 5]]"
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise BadParameter(key, expected, value) from None
    if arr.ndim != 2 or arr.shape[1] != 3 or not np.isfinite(arr).all():
        raise BadParameter(key, expected, value)
    idx = np.rint(arr).astype(np.int64)
    outside = [p for p in idx.tolist() if any(c < 0 or c >= s for c, s in zip(p, shape))]
    if outside:
        raise BadParameter(key, f"voxel indices inside the image of shape {tuple(int(s) for s in shape)}", outside)
    return idx.tolist()


def _array(key: str, value: Any, expected: str, shape: Tuple[int, ...]) -> np.ndarray:
    """``value`` as a float array of ``shape`` or :class:`BadParameter`."""
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise BadParameter(key, expected, value) from None
    if arr.shape != shape:
        raise BadParameter(key, expected, value)
    return arr


def _box(data: Mapping, shape: Sequence[int]) -> Optional[Tuple[List[int], List[int]]]:
    """``box`` [[i0, j0, k0], [i1, j1, k1]] or Slicer's ``roi`` [i0, i1, j0, j1, k0, k1] -> inclusive corners."""
    if data.get("box") not in (None, [], ""):
        key, value, expected = "box", data["box"], "[[i0, j0, k0], [i1, j1, k1]] voxel indices"
        arr = _array(key, value, expected, (2, 3))
        lo, hi = np.minimum(arr[0], arr[1]), np.maximum(arr[0], arr[1])
    elif data.get("roi") not in (None, [], ""):
        key, value, expected = "roi", data["roi"], "[i0, i1, j0, j1, k0, k1] voxel indices (a box)"
        arr = _array(key, value, expected, (6,))
        lo, hi = np.minimum(arr[0::2], arr[1::2]), np.maximum(arr[0::2], arr[1::2])
    else:
        return None
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        raise BadParameter(key, expected, value)
    lo, hi = np.rint(lo).astype(np.int64), np.rint(hi).astype(np.int64)
    dims = np.asarray(shape)
    if (hi < 0).any() or (lo >= dims).any():
        raise BadParameter(key, f"a box overlapping the image of shape {tuple(int(s) for s in shape)}", value)
    lo, hi = np.clip(lo, 0, dims - 1), np.clip(hi, 0, dims - 1)
    return lo.tolist(), hi.tolist()


def _target(data: Mapping, labels: Mapping[str, int]) -> Tuple[int, str]:
    names = {str(k).lower(): int(v) for k, v in labels.items()}
    expected = f"a label name {sorted(names, key=names.get)} or index {sorted(names.values())}"
    key = "target" if data.get("target") not in (None, "") else "label"
    value = data.get(key)
    if value is None or value == "":
        raise BadParameter("label", f"the structure to segment: 'label' (or 'target') = {expected}", value)
    if isinstance(value, str) and value.strip().lower() in names:
        index = names[value.strip().lower()]
    else:
        try:
            index = int(value)
        except (TypeError, ValueError):
            raise BadParameter(key, expected, value) from None
        if isinstance(value, float) and value != index or index not in names.values():
            raise BadParameter(key, expected, value)
    return index, next(n for n, v in names.items() if v == index)


def parse_request(data: Mapping[str, Any], labels: Mapping[str, int], shape: Sequence[int]) -> InteractiveRequest:
    """Check a request against the label names and the image shape ``(X, Y, Z)``; raises :class:`BadParameter`.

    ``label`` (or ``target``): structure name or index; ``foreground``/``background``: ``[[i, j, k], ...]``;
    ``box`` ``[[i0, j0, k0], [i1, j1, k1]]`` or ``roi`` ``[i0, i1, j0, j1, k0, k1]``; ``output_mode``
    ``target`` (default, 0/1 mask) or ``labelmap``; ``mode`` ``auto``/``prompt``/``correct``; ``propagate``,
    ``mask_prompt``, ``protect_other_labels`` booleans; ``click_radius`` integer >= 0.
    """
    target, name = _target(data, labels)
    req = InteractiveRequest(
        target=target,
        target_name=name,
        foreground=_points(data, "foreground", shape),
        background=_points(data, "background", shape),
        box=_box(data, shape),
        output_mode=_choice(data, "output_mode", OUTPUT_MODES, "target"),
        mode=_choice(data, "mode", MODES, "auto"),
        propagate=_bool(data, "propagate", False),
        mask_prompt=_bool(data, "mask_prompt", False),
        protect_other_labels=_bool(data, "protect_other_labels", True),
    )
    radius = _first(data.get("click_radius", 0))
    if isinstance(radius, bool) or not isinstance(radius, (int, float, str)) or not str(radius).strip().isdigit():
        raise BadParameter("click_radius", "an integer >= 0 (voxels, in-plane)", radius)
    req.click_radius = int(str(radius).strip())
    if not req.foreground and not req.background and req.box is None:
        raise BadParameter("foreground/background/roi", "at least one click ([[i, j, k], ...]) or a box (roi)",
                           {k: data.get(k) for k in ("foreground", "background", "box", "roi")})
    return req


def check_label_map(label: np.ndarray, shape: Sequence[int], num_classes: int, source: str) -> np.ndarray:
    """An uploaded/saved label map as uint8 ``(X, Y, Z)``; raises :class:`BadParameter` naming ``source``."""
    arr = np.asarray(label)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    elif arr.ndim == 4 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if tuple(arr.shape) != tuple(shape):
        raise BadParameter("label", f"a label map of the image's shape {tuple(int(s) for s in shape)} ({source})",
                           f"shape {tuple(arr.shape)}")
    if not np.issubdtype(arr.dtype, np.number) or not np.isfinite(arr).all():
        raise BadParameter("label", f"a label map of integer values ({source})", f"dtype {arr.dtype}")
    values = np.unique(arr)
    if (values != np.rint(values)).any() or values.min() < 0 or values.max() >= num_classes:
        raise BadParameter("label", f"integer label values 0..{num_classes - 1} ({source})",
                           f"values {values[:10].tolist()}")
    return arr.astype(np.uint8)

