"""Interactive correction: the annotator's clicks (and optional box) as extra SAM prompts for one label.

MaskSAM keeps SAM's prompt encoder and mask decoder, so a structure can be re-segmented with the annotator's
prompts added to the generated ones. For a target label ``k`` and the slices the clicks (or the box) fall on:

1. the image is cut into the network's patches (depth windows of ``D`` slices that hold the clicked slices,
   in-plane windows that hold the clicks or the box); the image encoder and prompt generator run once;
2. per clicked slice, the query whose class is ``k`` (argmax over queries of the class-``k`` probability of the
   prompt-free pass) is selected;
3. that query is decoded again (only the selected queries: the decoder never mixes queries) with the slice's
   clicks as point prompts (foreground 1, background 0, SAM's "not a point" padding elsewhere) and, if
   given, the box replacing its box prompt;
4. the new mask (sigmoid > threshold, averaged where windows overlap) replaces label ``k`` on those slices:
   background voxels newly inside become ``k``, voxels of ``k`` now outside become background, voxels of other
   labels never change (``protect_other_labels=True``). A click is a hard constraint on its own voxel
   (foreground -> ``k`` unless another label holds it, background -> not ``k``).

Coordinates: arrays are ``(X, Y, Z)`` voxel space as loaded by MONAI (the network's ``(H, W, D)``); a click is
``(i, j, z)`` voxel indices along those axes (what MONAI Label clients send, image IJK). Within a slice the
SAM frame's ``x`` runs along the second array axis (W, columns) and ``y`` along the first (H, rows) — see
``scripts.box_ops`` — and a voxel centre ``(i, j)`` maps to frame pixel ``((j + .5) s - .5, (i + .5) s - .5)``
with ``s = sam_size / image_size`` (SAM adds the half pixel back when it embeds points).

Pure torch/numpy: runs and is tested in the project's environment; the MONAI Label task
(``monailabel_app/lib/infer_interactive.py``) only maps clicks and label maps into and out of the bundle's
preprocessed space.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from monai.data.utils import dense_patch_slices

Point = Sequence[float]


@dataclass
class Box:
    """An axis-aligned box in voxel indices, inclusive: ``(i0, j0, z0)`` to ``(i1, j1, z1)``.

    It replaces the target query's box prompt on slices ``z0..z1``."""

    start: Tuple[int, int, int]
    end: Tuple[int, int, int]

    @classmethod
    def from_any(cls, box: Optional[Union["Box", Sequence[float], Sequence[Sequence[float]]]]) -> Optional["Box"]:
        """``Box``, ``[[i0, j0, z0], [i1, j1, z1]]`` or ``[i0, j0, z0, i1, j1, z1]``; ``None``/empty -> None."""
        if box is None or isinstance(box, Box):
            return box
        values = np.asarray(box, dtype=float).reshape(-1)
        if values.size == 0:
            return None
        if values.size != 6:
            raise ValueError(f"box must be [[i0, j0, z0], [i1, j1, z1]] (6 numbers), got {box!r}")
        lo = np.minimum(values[:3], values[3:])
        hi = np.maximum(values[:3], values[3:])
        return cls(tuple(int(round(v)) for v in lo), tuple(int(round(v)) for v in hi))


@dataclass
class CorrectionResult:
    """Output of :func:`predict_target_mask` (in the coordinates of the image it was given)."""

    mask: torch.Tensor  # (X, Y, Z) bool: the new extent of the target label inside ``region``
    region: torch.Tensor  # (X, Y, Z) bool: voxels the correction may change (clicked slices x covered windows)
    slices: List[int] = field(default_factory=list)  # the slices that were re-segmented
    queries: Dict[int, int] = field(default_factory=dict)  # slice -> selected query (last window wins)
    # slice -> the selected query's probability of the target class (low: the model missed the structure there)
    confidence: Dict[int, float] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------- helpers
def _as_points(points: Optional[Sequence[Point]], shape: Sequence[int], what: str) -> np.ndarray:
    """``(P, 3)`` int voxel indices, checked against ``shape`` (X, Y, Z)."""
    if points is None:
        return np.zeros((0, 3), dtype=np.int64)
    arr = np.asarray(points, dtype=float)
    if arr.size == 0:
        return np.zeros((0, 3), dtype=np.int64)
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise ValueError(f"{what} clicks must be a list of [i, j, z] voxel indices, got {points!r}")
    idx = np.rint(arr).astype(np.int64)
    bad = (idx < 0) | (idx >= np.asarray(shape)[None, :])
    if bad.any():
        raise ValueError(f"{what} click(s) {idx[bad.any(1)].tolist()} outside the image of shape {tuple(shape)}")
    return idx


def voxel_to_frame(i: torch.Tensor, j: torch.Tensor, image_size: int, sam_size: int) -> torch.Tensor:
    """Voxel centres ``(i row, j column)`` of a patch -> SAM-frame pixel coordinates ``(x, y)``, ``(..., 2)``."""
    s = sam_size / image_size
    return torch.stack([(j + 0.5) * s - 0.5, (i + 0.5) * s - 0.5], dim=-1)


def window_starts(size: int, window: int, overlap: float) -> List[int]:
    """Start indices along one axis of the windows MONAI's ``sliding_window_inference`` visits: its scan
    interval ``max(int(window * (1 - overlap)), 1)``, the last window flush with the end, one window when
    ``size <= window`` (MONAI pads the axis to the window). The one home of this rule (``bench/speed_memory.py``
    counts windows with it); the enumeration is MONAI's ``dense_patch_slices``."""
    if size <= window:
        return [0]
    interval = max(int(window * (1.0 - overlap)), 1)
    return [int(axis.start) for (axis,) in dense_patch_slices((size,), (window,), (interval,))]


def depth_windows(slices: Sequence[int], depth: int, num_slices: int) -> List[Tuple[int, List[int]]]:
    """Cover the clicked ``slices`` with windows of ``num_slices`` slices (clicked slice near the centre).

    Returns ``[(start, [slices in this window]), ...]``; ``depth >= num_slices``."""
    out: List[Tuple[int, List[int]]] = []
    pending = sorted(set(int(z) for z in slices))
    while pending:
        z = pending[0]
        start = min(max(0, z - (num_slices - 1) // 2), depth - num_slices)
        inside = [s for s in pending if start <= s < start + num_slices]
        out.append((start, inside))
        pending = [s for s in pending if s not in inside]
    return out


def _pad_amounts(shape: Sequence[int], minimum: Sequence[int]) -> List[Tuple[int, int]]:
    """Symmetric padding (as ``SpatialPadd``'s default) up to ``minimum`` per axis."""
    pads = []
    for size, need in zip(shape, minimum):
        extra = max(0, int(need) - int(size))
        pads.append((extra // 2, extra - extra // 2))
    return pads


# --------------------------------------------------------------------------------------------- core
@torch.no_grad()
def predict_target_mask(
    net: torch.nn.Module,
    image: torch.Tensor,
    target: int,
    foreground: Optional[Sequence[Point]] = None,
    background: Optional[Sequence[Point]] = None,
    box: Optional[Union["Box", Sequence[float], Sequence[Sequence[float]]]] = None,
    overlap: float = 0.5,
    threshold: float = 0.5,
    batch_size: int = 2,
) -> CorrectionResult:
    """Re-segment label ``target`` on the slices the clicks/box fall on, with them as SAM prompts.

    Args:
        net: a :class:`scripts.MaskSAM` (``encode``/``decode``, ``image_size``, ``num_slices``, ``sam_size``).
        image: ``(C, X, Y, Z)`` preprocessed image (the network's input space, intensity-normalised).
        target: the label index ``k`` (1..K-1; background cannot be a target).
        foreground, background: ``[[i, j, z], ...]`` voxel indices into ``image``'s spatial axes.
        box: optional :class:`Box` (or its list forms) replacing the box prompt of the target query.
        overlap: in-plane window overlap when the slice is larger than the patch.
        threshold: on the sigmoid of the target query's mask logits.
        batch_size: windows per forward pass.
    """
    image = torch.as_tensor(image)
    if image.ndim != 4:
        raise ValueError(f"image must be (C, X, Y, Z), got shape {tuple(image.shape)}")
    num_classes = int(net.num_classes)
    if not 1 <= int(target) < num_classes:
        raise ValueError(f"target label must be in 1..{num_classes - 1} (0 is background), got {target}")
    target = int(target)
    shape = tuple(image.shape[1:])
    fg = _as_points(foreground, shape, "foreground")
    bg = _as_points(background, shape, "background")
    box = Box.from_any(box)
    if len(fg) == 0 and len(bg) == 0 and box is None:
        raise ValueError("interactive correction needs at least one foreground/background click or a box")

    hp, dp = int(net.image_size), int(net.num_slices)
    pads = _pad_amounts(shape, (hp, hp, dp))
    offset = np.array([p[0] for p in pads])
    padded = F.pad(image, [p for pair in reversed(pads) for p in pair]) if any(sum(p) for p in pads) else image
    px, py, pz = padded.shape[1:]
    fg_p, bg_p = fg + offset, bg + offset
    box_p = None
    if box is not None:
        lo = np.clip(np.asarray(box.start), 0, np.asarray(shape) - 1) + offset
        hi = np.clip(np.asarray(box.end), 0, np.asarray(shape) - 1) + offset
        box_p = (lo, hi)

    clicked = set(fg_p[:, 2].tolist()) | set(bg_p[:, 2].tolist())
    if box_p is not None:
        clicked |= set(range(int(box_p[0][2]), int(box_p[1][2]) + 1))

    device = next(net.parameters()).device
    prob_sum = torch.zeros((px, py, pz), dtype=torch.float32)
    count = torch.zeros((px, py, pz), dtype=torch.float32)
    queries: Dict[int, int] = {}
    confidence: Dict[int, float] = {}

    # Work items: (depth start, slices, in-plane start (x0, y0)) for windows holding a click/box of a slice.
    items = []
    for z0, zs in depth_windows(sorted(clicked), pz, dp):
        for x0 in window_starts(px, hp, overlap):
            for y0 in window_starts(py, hp, overlap):
                wanted = []
                for z in zs:
                    pts = [p for p in np.concatenate([fg_p, bg_p]) if p[2] == z]
                    hit = any(x0 <= p[0] < x0 + hp and y0 <= p[1] < y0 + hp for p in pts)
                    if box_p is not None and box_p[0][2] <= z <= box_p[1][2]:
                        lo, hi = box_p
                        hit |= lo[0] < x0 + hp and hi[0] >= x0 and lo[1] < y0 + hp and hi[1] >= y0
                    if hit:
                        wanted.append(z)
                if wanted:
                    items.append((z0, wanted, x0, y0))

    net_was_training = net.training
    net.eval()
    try:
        for start in range(0, len(items), max(1, batch_size)):
            chunk = items[start : start + max(1, batch_size)]
            x = torch.stack([padded[:, x0 : x0 + hp, y0 : y0 + hp, z0 : z0 + dp] for z0, _, x0, y0 in chunk])
            probs = _decode_chunk(net, x.to(device=device, dtype=torch.float32), chunk, target, fg_p, bg_p, box_p,
                                  queries, confidence)
            for (z0, zs, x0, y0), p in zip(chunk, probs):
                for z in zs:
                    prob_sum[x0 : x0 + hp, y0 : y0 + hp, z] += p[..., z - z0]
                    count[x0 : x0 + hp, y0 : y0 + hp, z] += 1
    finally:
        net.train(net_was_training)

    region = count > 0
    mask = region & (prob_sum / count.clamp_min(1) > threshold)
    crop = tuple(slice(o, o + s) for o, s in zip(offset, shape))
    slices = sorted(int(z) - int(offset[2]) for z in clicked if 0 <= int(z) - int(offset[2]) < shape[2])
    return CorrectionResult(mask=mask[crop], region=region[crop], slices=slices,
                            queries={int(z) - int(offset[2]): n for z, n in queries.items()},
                            confidence={int(z) - int(offset[2]): p for z, p in confidence.items()})


def _query_subset(encoded: Dict[str, object], queries: Sequence[int]) -> Dict[str, object]:
    """The encoder output restricted to some queries: the mask decoder treats queries independently (its
    adapters mix slices of one query, never queries), so decoding a subset gives the same masks, cheaper."""
    q = list(queries)
    return {
        "embedding": encoded["embedding"],
        "aux_masks": [a[:, :, q] for a in encoded["aux_masks"]],
        "aux_boxes": encoded["aux_boxes"][:, :, q],
        "aux_tokens": encoded["aux_tokens"][:, :, q],
    }


def _decode_chunk(net, x, chunk, target, fg_p, bg_p, box_p, queries, confidence) -> torch.Tensor:
    """One batch of windows -> ``(B, H, W, D)`` target probabilities of the prompted query."""
    b, hp, dp = x.shape[0], int(net.image_size), int(net.num_slices)
    encoded = net.encode(x)
    plain = net.decode(encoded)
    class_prob = plain["pred_logits"].float().softmax(-1)[..., target]  # (B, D, N)
    chosen = class_prob.argmax(-1)  # (B, D)
    # Only the selected queries are decoded again, with the prompts.
    subset = sorted(set(chosen.flatten().tolist()))
    local = torch.tensor([subset.index(int(v)) for v in chosen.flatten().tolist()], device=x.device).reshape(b, dp)
    n = len(subset)

    # Per (b, d): the window-local clicks of that slice.
    per_set: Dict[Tuple[int, int], List[Tuple[float, float, int]]] = {}
    boxes = None
    for bi, (z0, zs, x0, y0) in enumerate(chunk):
        for z in zs:
            d = z - z0
            queries[z] = int(chosen[bi, d])
            confidence[z] = float(class_prob[bi, d, chosen[bi, d]])
            for pts, lab in ((fg_p, 1), (bg_p, 0)):
                for p in pts:
                    if p[2] == z and x0 <= p[0] < x0 + hp and y0 <= p[1] < y0 + hp:
                        per_set.setdefault((bi, d), []).append((p[0] - x0, p[1] - y0, lab))
            if box_p is not None and box_p[0][2] <= z <= box_p[1][2]:
                lo, hi = box_p
                s = net.sam_size / hp
                i0, j0 = max(lo[0] - x0, 0), max(lo[1] - y0, 0)
                i1, j1 = min(hi[0] - x0, hp - 1), min(hi[1] - y0, hp - 1)
                if boxes is None:
                    boxes = torch.full((b, dp, n, 4), float("nan"), device=x.device)
                # Pixel edges, x along columns (j), y along rows (i): the box_ops convention, in frame pixels.
                boxes[bi, d, local[bi, d]] = torch.tensor([j0 * s, i0 * s, (j1 + 1) * s, (i1 + 1) * s],
                                                          device=x.device, dtype=torch.float32)

    points = None
    num_points = max((len(v) for v in per_set.values()), default=0)
    if num_points:
        coords = torch.zeros((b, dp, n, num_points, 2), device=x.device)
        labels = torch.full((b, dp, n, num_points), -1, dtype=torch.int64, device=x.device)
        for (bi, d), pts in per_set.items():
            q = int(local[bi, d])
            ij = torch.tensor([[p[0], p[1]] for p in pts], dtype=torch.float32, device=x.device)
            coords[bi, d, q, : len(pts)] = voxel_to_frame(ij[:, 0], ij[:, 1], hp, net.sam_size)
            labels[bi, d, q, : len(pts)] = torch.tensor([p[2] for p in pts], device=x.device)
        points = (coords.reshape(b * dp * n, num_points, 2), labels.reshape(b * dp * n, num_points))

    prompted = net.decode(_query_subset(encoded, subset), points=points, boxes=boxes)
    masks = prompted["pred_masks"].float().sigmoid()  # (B, D, n, H, W)
    index = local[:, :, None, None, None].expand(-1, -1, 1, *masks.shape[-2:])
    target_prob = masks.gather(2, index)[:, :, 0]  # (B, D, H, W)
    return target_prob.permute(0, 2, 3, 1).cpu()  # (B, H, W, D)


def apply_correction(
    label,
    target: int,
    mask,
    region,
    foreground: Optional[Sequence[Point]] = None,
    background: Optional[Sequence[Point]] = None,
    protect_other_labels: bool = True,
    click_radius: int = 0,
):
    """Merge a new target mask into a label map; only label ``target`` changes, only inside ``region``.

    Inside ``region``: background (or, with ``protect_other_labels=False``, any label) under ``mask`` becomes
    ``target``; ``target`` outside ``mask`` becomes background 0. Clicks are hard constraints on the voxels
    within ``click_radius`` (in-plane) of them: foreground -> ``target``, background -> not ``target``.

    Args:
        label: ``(X, Y, Z)`` integer label map (numpy or torch; a leading channel of 1 is accepted).
        mask, region: ``(X, Y, Z)`` bool, same space as ``label``.

    Returns:
        the corrected label map, same type and dtype as ``label``.
    """
    is_torch = torch.is_tensor(label)
    lab = label.detach().cpu().numpy() if is_torch else np.asarray(label)
    squeeze = lab.ndim == 4 and lab.shape[0] == 1
    arr = lab[0] if squeeze else lab
    mask = np.asarray(mask.cpu() if torch.is_tensor(mask) else mask).astype(bool).reshape(arr.shape)
    region = np.asarray(region.cpu() if torch.is_tensor(region) else region).astype(bool).reshape(arr.shape)
    mask = mask.copy()
    region = region.copy()
    for points, value in ((foreground, True), (background, False)):
        for i, j, z in _as_points(points, arr.shape, "foreground" if value else "background"):
            sl = (slice(max(0, i - click_radius), i + click_radius + 1),
                  slice(max(0, j - click_radius), j + click_radius + 1), z)
            mask[sl] = value
            region[sl] = True
    out = arr.copy()
    free = (arr == 0) if protect_other_labels else (arr != target)
    out[region & mask & free] = target
    out[region & ~mask & (arr == target)] = 0
    if squeeze:
        out = out[None]
    return torch.as_tensor(out, dtype=label.dtype) if is_torch else out.astype(lab.dtype, copy=False)


def correct_label(
    net: torch.nn.Module,
    image: torch.Tensor,
    label,
    target: int,
    foreground: Optional[Sequence[Point]] = None,
    background: Optional[Sequence[Point]] = None,
    box: Optional[Union["Box", Sequence[float], Sequence[Sequence[float]]]] = None,
    protect_other_labels: bool = True,
    click_radius: int = 0,
    **kwargs,
):
    """:func:`predict_target_mask` + :func:`apply_correction` when image and label share one voxel space."""
    result = predict_target_mask(net, image, target, foreground, background, box, **kwargs)
    return apply_correction(label, target, result.mask, result.region, foreground, background,
                            protect_other_labels=protect_other_labels, click_radius=click_radius)


# --------------------------------------------------------------------------------------------- geometry
def voxel_map(src_affine, dst_affine) -> np.ndarray:
    """4x4 matrix taking voxel indices of an image with ``src_affine`` to those of one with ``dst_affine``
    (both voxel -> world, the same world), e.g. original file -> the bundle's preprocessed space."""
    return np.linalg.inv(np.asarray(dst_affine, dtype=np.float64)) @ np.asarray(src_affine, dtype=np.float64)


def map_points(points: Optional[Sequence[Point]], matrix: np.ndarray) -> List[List[int]]:
    """Apply a :func:`voxel_map` matrix to ``[[i, j, z], ...]`` and round to voxel indices."""
    if points is None or len(points) == 0:
        return []
    p = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    q = p @ matrix[:3, :3].T + matrix[:3, 3]
    return np.rint(q).astype(np.int64).tolist()


def resample_nearest(volume, matrix: np.ndarray, out_shape: Sequence[int], fill=0) -> np.ndarray:
    """Nearest-neighbour resampling: ``out[v] = volume[round(matrix @ v)]`` (``fill`` outside ``volume``).

    ``matrix`` maps OUTPUT voxel indices to ``volume``'s voxel indices (``voxel_map(out_affine, in_affine)``).
    Used to bring masks and label maps between the original image grid and the preprocessed grid."""
    vol = np.asarray(volume.cpu() if torch.is_tensor(volume) else volume)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in out_shape], indexing="ij"), axis=-1).reshape(-1, 3)
    src = np.rint(grid @ matrix[:3, :3].T + matrix[:3, 3]).astype(np.int64)
    inside = np.all((src >= 0) & (src < np.asarray(vol.shape[:3])), axis=1)
    out = np.full(int(np.prod(out_shape)), fill, dtype=vol.dtype)
    out[inside] = vol[src[inside, 0], src[inside, 1], src[inside, 2]]
    return out.reshape(tuple(int(s) for s in out_shape))


__all__ = [
    "Box",
    "CorrectionResult",
    "voxel_to_frame",
    "window_starts",
    "depth_windows",
    "predict_target_mask",
    "apply_correction",
    "correct_label",
    "voxel_map",
    "map_points",
    "resample_nearest",
]
