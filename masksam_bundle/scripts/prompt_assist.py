"""Prompt-only annotation assist (model card `docs/README.md`, "Annotation assist"): the annotator's box and clicks -> one structure.

SAM's prompt encoder and MaskSAM's (adapted) mask decoder stay in the network, so a user's prompts can be
decoded for one structure without the generated prompts, the classifier token or the class head
(:meth:`scripts.network.MaskSAM.decode_prompts`). Two modes:

* **zero-shot** (no trained model): the network is MaskSAM on the ``lite_medsam`` backbone with its adapters at
  zero (:func:`zero_shot_network`); the randomly initialised modality adapter is bypassed and each slice is
  fed to the encoder as LiteMedSAM's own input (intensities clipped to the 0.5-99.5 percentiles of the slice,
  scaled to [0, 1], 3 channels, longest side resized to 256, padded bottom-right; prompt coordinates scaled
  the same way), so the path is exactly LiteMedSAM. Each slice is encoded alone.
* **trained** (a trained ``model.pt``): the bundle's preprocessed volume goes through the trained modality
  adapter and adapted encoder in windows of ``num_slices`` slices and ``image_size`` in-plane
  (:meth:`MaskSAM.embed`); the decoder's depth adapters need all D slices of a window prompted, so the target
  slice's prompts are given to every slice of its window and the target slice's output is kept.

Image embeddings are cached per image and slice (zero-shot) or window (trained) in a bounded LRU
(:class:`EmbeddingCache`), so only the first interaction on a slice runs the image encoder; every further box or
click costs one decoder pass. A round's low-resolution logits are the mask prompt of the next round on that
slice (SAM's own interactive loop), and :meth:`PromptAssist.propagate` carries a structure from one slice to
its neighbours (box of the neighbour's mask + its logits as mask prompt) until the structure ends.

Two rules make a box-trained decoder (LiteMedSAM) useful beyond filled blobs, both on by default:

* **tight-box ring rule** (:func:`ring_logits`): an annotator's box is tight, so the structure touches all four
  sides. A decoded mask that stays clear of every side by more than ``ring_clearance`` of the box's extent is the
  *hole* of a ring-shaped structure (LiteMedSAM returns the LV cavity for the myocardium's box; none of its 4 mask
  tokens gives the filled disk), so the structure is the ellipse inscribed in the box minus that hole.
* **clicks as local edits** (:func:`click_edit`): a click the chosen mask contradicts adds (foreground) or removes
  (background) the voxels around it that look like the clicked voxel, within its distance to the mask's boundary.
  Zero-shot, clicks reach only these edits and the candidate choice, not the decoder: LiteMedSAM was trained with
  boxes only, from a click alone all 4 of its outputs are empty, and with a box clicks pull its mask away.

Coordinates: a volume is ``(C, X, Y, Z)`` as MONAI loads it; a click is ``(i, j, z)`` voxel indices; within a
slice the SAM frame's ``x`` runs along ``j`` (columns, Y) and ``y`` along ``i`` (rows, X), as in
``scripts.interactive`` and ``scripts.box_ops``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, Hashable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

__all__ = [
    "LITE_MEDSAM_SIDE",
    "EmbeddingCache",
    "PromptAssist",
    "SliceFrame",
    "SlicePrediction",
    "VolumePrediction",
    "box_clearance",
    "click_edit",
    "inscribed_ellipse",
    "lite_medsam_input",
    "ring_logits",
    "tight_box",
    "zero_shot_network",
]

LITE_MEDSAM_SIDE = 256  # LiteMedSAM's input frame (pixels)
NO_OBJECT_LOGIT = -20.0  # logit given to voxels a frame does not cover
EDIT_LOGIT = 10.0  # |logit| of voxels a click edit sets (sure, but below the frame's "no object")


# --------------------------------------------------------------------------------------------- frames
@dataclass(frozen=True)
class SliceFrame:
    """Where a slice of ``shape`` (H rows, W columns) voxels sits in a SAM frame of ``side`` pixels.

    Voxel ``(i, j)`` covers frame pixels ``[(j - oj) s, (j - oj + 1) s) x [(i - oi) s, (i - oi + 1) s)`` with
    ``s = scale`` and ``(oi, oj) = origin`` (the voxel at the frame's top-left corner; negative = padding).
    Zero-shot: origin 0, ``s = 256 / max(H, W)`` (LiteMedSAM's resize + bottom-right padding).
    """

    shape: Tuple[int, int]
    origin: Tuple[int, int]
    scale: float
    side: int

    def points(self, ij: torch.Tensor) -> torch.Tensor:
        """Voxel centres ``(P, 2)`` (i, j) -> frame pixels ``(P, 2)`` (x, y); SAM adds the half pixel back."""
        ij = ij.float()
        s = self.scale
        return torch.stack([(ij[:, 1] - self.origin[1] + 0.5) * s - 0.5, (ij[:, 0] - self.origin[0] + 0.5) * s - 0.5],
                           dim=-1)

    def box(self, start: Sequence[int], end: Sequence[int]) -> torch.Tensor:
        """Inclusive voxel box ``(i0, j0)``..``(i1, j1)`` -> xyxy frame pixels on the voxels' outer edges."""
        s, (oi, oj) = self.scale, self.origin
        return torch.tensor([(start[1] - oj) * s, (start[0] - oi) * s, (end[1] + 1 - oj) * s, (end[0] + 1 - oi) * s],
                            dtype=torch.float32)

    def to_slice(self, lowres: torch.Tensor) -> torch.Tensor:
        """Decoder logits ``(..., L, L)`` over the frame -> ``(..., H, W)`` logits on the slice's voxels.

        Upsampled to the frame, cropped to the voxels the frame covers and resized to them (LiteMedSAM's own
        post-processing in zero-shot mode); voxels outside the frame get :data:`NO_OBJECT_LOGIT`.
        """
        lead = lowres.shape[:-2]
        up = F.interpolate(lowres.reshape(-1, 1, *lowres.shape[-2:]).float(), size=(self.side, self.side),
                           mode="bilinear", align_corners=False)
        h, w = self.shape
        out = torch.full((up.shape[0], 1, h, w), NO_OBJECT_LOGIT)
        span = self.side / self.scale  # voxels the frame covers along each axis
        rows = (max(0, self.origin[0]), min(h, int(np.floor(self.origin[0] + span + 1e-6))))
        cols = (max(0, self.origin[1]), min(w, int(np.floor(self.origin[1] + span + 1e-6))))
        if rows[1] > rows[0] and cols[1] > cols[0]:
            px = [int(round((v - o) * self.scale)) for v, o in ((rows[0], self.origin[0]), (rows[1], self.origin[0]),
                                                                 (cols[0], self.origin[1]), (cols[1], self.origin[1]))]
            crop = up[:, :, px[0]: px[1], px[2]: px[3]]
            out[:, :, rows[0]: rows[1], cols[0]: cols[1]] = F.interpolate(
                crop, size=(rows[1] - rows[0], cols[1] - cols[0]), mode="bilinear", align_corners=False)
        return out.reshape(*lead, h, w)


def lite_medsam_input(image: torch.Tensor, side: int = LITE_MEDSAM_SIDE) -> Tuple[torch.Tensor, SliceFrame]:
    """LiteMedSAM's own input for one slice ``(H, W)``: ``(3, side, side)`` in [0, 1] and its frame.

    Intensities clipped to the slice's 0.5-99.5 percentiles and scaled to [0, 1], repeated to 3 channels,
    resized (bilinear, antialiased) so the longest side is ``side``, padded bottom-right with zeros.
    """
    if image.ndim != 2:
        raise ValueError(f"lite_medsam_input expects one slice (H, W), got shape {tuple(image.shape)}")
    x = torch.as_tensor(image).float()
    lo, hi = torch.quantile(x.flatten(), torch.tensor([0.005, 0.995], dtype=x.dtype))
    x = (x.clamp(lo, hi) - lo) / (hi - lo).clamp_min(1e-8)
    h, w = x.shape
    scale = side / max(h, w)
    nh, nw = int(round(h * scale)), int(round(w * scale))
    if (nh, nw) != (h, w):
        x = F.interpolate(x[None, None], size=(nh, nw), mode="bilinear", align_corners=False,
                          antialias=scale < 1)[0, 0]
    x = F.pad(x, (0, side - nw, 0, side - nh))
    return x.expand(3, side, side).contiguous(), SliceFrame((h, w), (0, 0), scale, side)


def zero_shot_network():
    """MaskSAM on the packaged LiteMedSAM weights with every adapter at zero, one slice per window: the
    prompt path of this network is exactly LiteMedSAM (model card, "Annotation assist")."""
    from .network import MaskSAM

    return MaskSAM(backbone="lite_medsam", in_channels=1, num_classes=2, num_queries=1, num_slices=1,
                   image_size=LITE_MEDSAM_SIDE, sam_upsample=1).eval()


# --------------------------------------------------------------------------------------------- cache
class EmbeddingCache:
    """Least-recently-used store of image embeddings, bounded by bytes (thread-safe).

    A LiteMedSAM slice embedding is 256 x 64 x 64 float32 = 4 MiB, so the default 512 MiB holds 128 slices
    (about 12 ACDC volumes); a ``vit_b`` window of 4 slices at g = 64 is 16 MiB.
    """

    def __init__(self, max_bytes: int = 512 * 2**20) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be > 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._items: "OrderedDict[Hashable, Tuple[torch.Tensor, object]]" = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable):
        """``(embedding, extra)`` for ``key`` (marked most recently used) or ``None``."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item

    def put(self, key: Hashable, embedding: torch.Tensor, extra: object = None) -> None:
        size = embedding.element_size() * embedding.numel()
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= old[0].element_size() * old[0].numel()
            self._items[key] = (embedding, extra)
            self.bytes += size
            while self.bytes > self.max_bytes and len(self._items) > 1:
                _, (evicted, _) = self._items.popitem(last=False)
                self.bytes -= evicted.element_size() * evicted.numel()

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.bytes = 0


# --------------------------------------------------------------------------------------------- prediction
@dataclass
class SlicePrediction:
    """One structure on one slice."""

    z: int
    logits: torch.Tensor  # (H, W) mask logits on the slice's voxels (after the ring rule and click edits)
    lowres: torch.Tensor  # (L, L) decoder logits over the frame (before them): the next round's mask prompt
    iou: float  # the decoder's predicted IoU of the chosen mask
    frame: SliceFrame
    encoded: bool = False  # True when this call ran the image encoder (cache miss)
    ring: bool = False  # True when the tight-box ring rule turned the decoded mask into a ring
    edits: int = 0  # clicks applied as local edits

    @property
    def mask(self) -> torch.Tensor:
        """``(H, W)`` bool."""
        return self.logits > 0


@dataclass
class VolumePrediction:
    """One structure over several slices: ``mask (X, Y, Z)`` bool and the per-slice predictions."""

    mask: torch.Tensor
    slices: Dict[int, SlicePrediction] = field(default_factory=dict)


def _points_tensor(points: Optional[Sequence[Sequence[float]]], what: str) -> torch.Tensor:
    if points is None or len(points) == 0:
        return torch.zeros((0, 2))
    arr = torch.as_tensor(np.asarray(points, dtype=np.float64)).float()
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"{what} clicks of one slice must be [[i, j], ...], got shape {tuple(arr.shape)}")
    return arr


def _clicks_honoured(mask: torch.Tensor, fg: torch.Tensor, bg: torch.Tensor) -> int:
    """How many clicks a ``(H, W)`` mask agrees with: foreground clicks inside, background clicks outside."""
    h, w = mask.shape
    count = 0
    for points, inside in ((fg, True), (bg, False)):
        for i, j in points.round().long().tolist():
            if 0 <= i < h and 0 <= j < w and bool(mask[i, j]) == inside:
                count += 1
    return count


def tight_box(mask: torch.Tensor) -> Optional[Tuple[Tuple[int, int], Tuple[int, int]]]:
    """Inclusive voxel box ``((i0, j0), (i1, j1))`` of a ``(H, W)`` mask, ``None`` when empty."""
    idx = torch.nonzero(mask)
    if idx.numel() == 0:
        return None
    lo, hi = idx.min(0).values.tolist(), idx.max(0).values.tolist()
    return (lo[0], lo[1]), (hi[0], hi[1])


# --------------------------------------------------------------------------------------------- ring rule, edits
Box = Tuple[Sequence[int], Sequence[int]]


def box_clearance(mask: torch.Tensor, box: Box, slack: int = 0) -> float:
    """How far a ``(H, W)`` mask stays from the sides of the inclusive voxel ``box``: the smallest of the four gaps
    between the mask's bounding box and the box's sides, less ``slack`` voxels (a box known to be that much loose),
    as a fraction of the box's extent along that axis. 0 when the mask touches a side, negative when it crosses
    one, ``-inf`` for an empty mask."""
    inner = tight_box(mask)
    if inner is None:
        return float("-inf")
    (i0, j0), (i1, j1) = box
    (a0, b0), (a1, b1) = inner
    h, w = i1 - i0 + 1, j1 - j0 + 1
    return min((a0 - i0 - slack) / h, (b0 - j0 - slack) / w, (i1 - a1 - slack) / h, (j1 - b1 - slack) / w)


def inscribed_ellipse(shape: Tuple[int, int], box: Box, slack: int = 0) -> torch.Tensor:
    """``(H, W)`` bool: the ellipse inscribed in the inclusive voxel ``box`` shrunk by ``slack`` voxels per side."""
    (i0, j0), (i1, j1) = box
    ci, cj = (i0 + i1) / 2, (j0 + j1) / 2
    ri, rj = max(0.5, (i1 - i0 + 1) / 2 - slack), max(0.5, (j1 - j0 + 1) / 2 - slack)
    ii = torch.arange(shape[0], dtype=torch.float32)[:, None]
    jj = torch.arange(shape[1], dtype=torch.float32)[None, :]
    return ((ii - ci) / ri) ** 2 + ((jj - cj) / rj) ** 2 <= 1.0


def ring_logits(logits: torch.Tensor, box: Box, slack: int = 0, min_clearance: float = 0.05
                ) -> Optional[torch.Tensor]:
    """The tight-box ring rule on ``(H, W)`` mask logits decoded from ``box``.

    A tight box's structure touches all four sides. When the decoded mask stays clear of every side by more than
    ``min_clearance`` of the box's extent (:func:`box_clearance`), it is the hole of a ring, and the structure is
    the ellipse inscribed in the box minus the hole: returns those logits (the decoder's own soft boundary at the
    hole). ``None`` when the rule does not apply (the mask reaches a side, or is empty).
    """
    if logits.ndim != 2:
        raise ValueError(f"ring_logits expects (H, W) logits, got shape {tuple(logits.shape)}")
    if box_clearance(logits > 0, box, slack) <= min_clearance:
        return None
    outer = inscribed_ellipse(tuple(logits.shape), box, slack)
    return torch.minimum(-logits, torch.where(outer, -NO_OBJECT_LOGIT, NO_OBJECT_LOGIT))


def click_edit(mask: torch.Tensor, image: torch.Tensor, click: Sequence[int], tolerance: float = 1.0
               ) -> torch.Tensor:
    """``(H, W)`` bool region a click adds to (clicked outside) or removes from (clicked inside) a ``(H, W)`` mask.

    The region is the voxels connected to the click that lie within its distance to the mask's boundary (a
    corrective click sits inside the error it corrects, whose extent there is at most that distance) and whose
    intensities in ``image (C, H, W)`` differ from the clicked voxel's by at most ``tolerance`` standard deviations
    of the intensities inside the mask, per channel. Empty when the mask is empty (no scale to edit at).
    """
    if image.ndim != 3 or tuple(image.shape[1:]) != tuple(mask.shape):
        raise ValueError(f"click_edit expects image (C, H, W) over the mask's {tuple(mask.shape)}, "
                         f"got {tuple(image.shape)}")
    m = mask.numpy().astype(bool)
    i, j = int(click[0]), int(click[1])
    if not m.any() or not (0 <= i < m.shape[0] and 0 <= j < m.shape[1]):
        return torch.zeros_like(mask, dtype=torch.bool)
    inside = bool(m[i, j])
    reach = max(1.5, float(ndimage.distance_transform_edt(m if inside else ~m)[i, j]))
    x = image.float().numpy()
    spread = x[:, m].std(axis=1) if m.sum() > 1 else x.reshape(len(x), -1).std(axis=1)
    similar = (np.abs(x - x[:, i, j, None, None]) <= tolerance * np.maximum(spread, 1e-6)[:, None, None]).all(0)
    ii, jj = np.ogrid[: m.shape[0], : m.shape[1]]
    candidate = similar & ((ii - i) ** 2 + (jj - j) ** 2 <= reach**2)
    labels, _ = ndimage.label(candidate)
    return torch.from_numpy(labels == labels[i, j])


class PromptAssist:
    """Box/click segmentation of one structure through MaskSAM's prompt path, with cached embeddings.

    Args:
        net: a :class:`scripts.network.MaskSAM` (``zero_shot_network()`` when there is no trained model).
        trained: False = zero-shot (modality adapter bypassed, LiteMedSAM input per slice, needs the
            ``lite_medsam`` backbone with ``num_slices=1``); True = the trained modality adapter and adapters
            on the bundle's preprocessed volume.
        cache: the embedding cache (a private 512 MiB one by default).
        select_by_clicks: among the decoder's candidate masks (its multimask outputs when asked for, and the box
            alone when a box comes with decoded clicks) keep the one that honours the most clicks (foreground
            inside, background outside), then the highest predicted IoU. Off: SAM's plain choice.
        ring_rule: apply the tight-box ring rule (:func:`ring_logits`) to every candidate decoded from a box.
        ring_clearance: the rule's threshold: the mask's smallest gap to a box side, as a fraction of the box.
        click_edits: apply each click the chosen mask contradicts as a local edit (:func:`click_edit`).
        edit_tolerance: the edits' intensity tolerance in standard deviations of the mask's intensities.
        decode_clicks: give clicks to the decoder when a box is there too; default: only a trained model
            (LiteMedSAM was trained with boxes only). Without a box, clicks are always decoded.
    """

    def __init__(self, net: torch.nn.Module, trained: bool, cache: Optional[EmbeddingCache] = None,
                 select_by_clicks: bool = True, ring_rule: bool = True, ring_clearance: float = 0.05,
                 click_edits: bool = True, edit_tolerance: float = 1.0, decode_clicks: Optional[bool] = None
                 ) -> None:
        if not trained and (net.backbone != "lite_medsam" or net.num_slices != 1):
            raise ValueError("zero-shot assist needs MaskSAM on lite_medsam with num_slices=1 (zero_shot_network()), "
                             f"got backbone={net.backbone!r}, num_slices={net.num_slices}")
        self.net = net.eval()
        self.trained = trained
        self.select_by_clicks = select_by_clicks
        self.ring_rule, self.ring_clearance = ring_rule, float(ring_clearance)
        self.click_edits, self.edit_tolerance = click_edits, float(edit_tolerance)
        self.decode_clicks = trained if decode_clicks is None else bool(decode_clicks)
        self.cache = cache if cache is not None else EmbeddingCache()
        self.encoder_runs = 0
        self.decoder_runs = 0
        self.device = next(net.parameters()).device
        # The last box-only decodes (256 KiB each): a click round that does not reach the decoder reuses its box's.
        self._box_decodes: "OrderedDict[Hashable, Tuple[torch.Tensor, torch.Tensor]]" = OrderedDict()

    # ------------------------------------------------------------------ embeddings
    def _zero_shot_embedding(self, key: Hashable, volume: torch.Tensor, z: int):
        hit = self.cache.get((key, "zero-shot", z))
        if hit is not None:
            return hit[0], hit[1], 0, False
        image, frame = lite_medsam_input(volume[0, :, :, z])
        with torch.no_grad():
            embedding = self.net.image_encoder(image[None].to(self.device))[0]  # modality adapter bypassed
        self.encoder_runs += 1
        self.cache.put((key, "zero-shot", z), embedding, frame)
        return embedding, frame, 0, True

    def _trained_embedding(self, key: Hashable, volume: torch.Tensor, z: int, centre: Tuple[float, float]):
        net = self.net
        p, d = int(net.image_size), int(net.num_slices)
        _, x, y, depth = volume.shape

        def start(size: int, window: int, c: float) -> int:
            if size <= window:
                return -((window - size) // 2)  # symmetric padding, as SpatialPadd
            # centred on the prompt, on a quarter-window grid so neighbouring prompts share a window
            step = max(1, window // 4)
            return int(min(max(0, round((c - window / 2) / step) * step), size - window))

        z0 = min(max(0, z - (d - 1) // 2), depth - d) if depth >= d else -((d - depth) // 2)
        oi, oj = start(x, p, centre[0]), start(y, p, centre[1])
        cache_key = (key, "trained", z0, oi, oj)
        hit = self.cache.get(cache_key)
        if hit is None:
            window = _window(volume, (oi, oj, z0), (p, p, d))
            with torch.no_grad():
                embedding = net.embed(window[None].to(self.device))  # (D, C, g, g)
            self.encoder_runs += 1
            frame = SliceFrame((x, y), (oi, oj), net.sam_size / p, net.sam_size)
            self.cache.put(cache_key, embedding, frame)
            return embedding, frame, z - z0, True
        return hit[0], hit[1], z - z0, False

    # ------------------------------------------------------------------ one slice
    @torch.no_grad()
    def predict_slice(
        self,
        key: Hashable,
        volume: torch.Tensor,
        z: int,
        box: Optional[Tuple[Sequence[int], Sequence[int]]] = None,
        foreground: Optional[Sequence[Sequence[float]]] = None,
        background: Optional[Sequence[Sequence[float]]] = None,
        mask_prompt: Optional[SlicePrediction] = None,
        multimask: Optional[bool] = None,
        box_slack: Optional[int] = 0,
    ) -> SlicePrediction:
        """Segment one structure on slice ``z`` from a box and/or clicks.

        Args:
            key: identifies the image for the embedding cache (e.g. its path and modification time).
            volume: ``(C, X, Y, Z)``: raw intensities (zero-shot) or the bundle's preprocessed image (trained).
            z: the slice.
            box: ``((i0, j0), (i1, j1))`` inclusive voxel box on the slice.
            foreground, background: ``[[i, j], ...]`` voxel clicks on the slice.
            mask_prompt: the previous round's prediction on this slice; its low-res logits become the mask
                prompt (ignored if it was made in another frame).
            multimask: choose among SAM's 3 multimask outputs by predicted IoU; default: only for a single click
                without box or mask prompt (SAM's rule for ambiguous prompts).
            box_slack: voxels by which ``box`` is known to be loose on each side (0: an annotator's tight box);
                ``None``: the box is not a structure's box at all (e.g. spanned by clicks), no ring rule.
        """
        volume = torch.as_tensor(volume)
        if volume.ndim != 4:
            raise ValueError(f"volume must be (C, X, Y, Z), got shape {tuple(volume.shape)}")
        if not 0 <= int(z) < volume.shape[-1]:
            raise ValueError(f"slice {z} outside the volume's {volume.shape[-1]} slices")
        z = int(z)
        fg, bg = _points_tensor(foreground, "foreground"), _points_tensor(background, "background")
        if box is None and len(fg) + len(bg) == 0:
            raise ValueError("a prompt needs a box or at least one click")
        if self.trained:
            if box is not None:
                centre = ((box[0][0] + box[1][0]) / 2, (box[0][1] + box[1][1]) / 2)
            else:
                centre = tuple(torch.cat([fg, bg]).mean(0).tolist())
            embedding, frame, local, encoded = self._trained_embedding(key, volume, z, centre)
        else:
            embedding, frame, local, encoded = self._zero_shot_embedding(key, volume, z)

        d = int(self.net.num_slices)
        g = embedding.shape[-1]
        boxes = None
        if box is not None:
            boxes = frame.box(box[0], box[1]).reshape(1, 1, 1, 4).expand(1, d, 1, 4).to(self.device)
        decode_points = len(fg) + len(bg) > 0 and (self.decode_clicks or box is None)
        points = None
        if decode_points:
            coords = frame.points(torch.cat([fg, bg])).to(self.device)
            labels = torch.cat([torch.ones(len(fg)), torch.zeros(len(bg))]).to(self.device)
            points = (coords[None].expand(d, -1, -1), labels[None].expand(d, -1))
        masks_in = None
        if mask_prompt is not None and mask_prompt.frame == frame:
            masks_in = mask_prompt.lowres.reshape(1, 1, 1, 4 * g, 4 * g).expand(1, d, 1, 4 * g, 4 * g).to(self.device)
        if multimask is None:
            multimask = box is None and masks_in is None and len(fg) + len(bg) == 1
        box_only = (key, z, frame, tuple(box[0]), tuple(box[1])) if box is not None and masks_in is None else None
        if points is None and box_only is not None:
            masks, iou = self._decode_box(box_only, embedding, boxes, local)
        else:
            masks, iou = self.net.decode_prompts(embedding, 1, boxes=boxes, points=points, mask_prompt=masks_in)
            self.decoder_runs += 1
            masks, iou = masks[0, local, 0].float().cpu(), iou[0, local, 0].float().cpu()  # (4, L, L), (4,)
        candidates = [(m, float(iou[m])) for m in ((1, 2, 3) if multimask else (0,))]
        lowres_all = [masks]
        if self.select_by_clicks and decode_points and box is not None:
            # The box alone is a candidate too: a decoder trained on boxes only (LiteMedSAM) can be misled by
            # clicks, and a click is ground truth at its voxel, so the candidate that honours most clicks wins.
            alone, alone_iou = self._decode_box(box_only, embedding, boxes, local)
            lowres_all.append(alone[:1])
            candidates.append((4, float(alone_iou[0])))
        flat = torch.cat(lowres_all)  # (4 or 5, L, L): index 4 = the box-only single-mask output
        ring_box = self.ring_rule and box is not None and box_slack is not None
        best, best_score = None, None
        for index, predicted_iou in candidates:
            logits = frame.to_slice(flat[index])
            ring = ring_logits(logits, box, box_slack, self.ring_clearance) if ring_box else None
            logits = logits if ring is None else ring
            score = (_clicks_honoured(logits > 0, fg, bg) if self.select_by_clicks else 0, predicted_iou)
            if best_score is None or score > best_score:
                best, best_score = (index, logits, predicted_iou, ring is not None), score
        index, logits, predicted_iou, is_ring = best
        edits = 0
        if self.click_edits and len(fg) + len(bg):
            image = volume[:, :, :, z].float()
            for click, positive in [(c, True) for c in fg.round().long().tolist()] + \
                                   [(c, False) for c in bg.round().long().tolist()]:
                mask = logits > 0
                if not (0 <= click[0] < mask.shape[0] and 0 <= click[1] < mask.shape[1]) or \
                        bool(mask[click[0], click[1]]) == positive:
                    continue  # outside the slice, or the mask already agrees with this click
                region = click_edit(mask, image, click, self.edit_tolerance)
                logits = torch.where(region, torch.full_like(logits, EDIT_LOGIT if positive else -EDIT_LOGIT), logits)
                edits += 1
        return SlicePrediction(z=z, logits=logits, lowres=flat[index], iou=predicted_iou, frame=frame,
                               encoded=encoded, ring=is_ring, edits=edits)

    def _decode_box(self, memo_key: Optional[Hashable], embedding: torch.Tensor, boxes: torch.Tensor, local: int
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Box-only decode ``(4, L, L), (4,)``, memoised per image, slice, frame and box (bounded, 64 entries)."""
        hit = self._box_decodes.get(memo_key) if memo_key is not None else None
        if hit is not None:
            self._box_decodes.move_to_end(memo_key)
            return hit
        masks, iou = self.net.decode_prompts(embedding, 1, boxes=boxes)
        self.decoder_runs += 1
        out = (masks[0, local, 0].float().cpu(), iou[0, local, 0].float().cpu())
        if memo_key is not None:
            self._box_decodes[memo_key] = out
            while len(self._box_decodes) > 64:
                self._box_decodes.popitem(last=False)
        return out

    # ------------------------------------------------------------------ 3D
    @torch.no_grad()
    def propagate(
        self,
        key: Hashable,
        volume: torch.Tensor,
        seed: SlicePrediction,
        min_area_ratio: float = 0.1,
        min_iou: float = 0.5,
        margin: int = 2,
        max_slices: Optional[int] = None,
    ) -> VolumePrediction:
        """Carry the structure of ``seed`` through the neighbouring slices, both ways.

        Each next slice is prompted with the box of its neighbour's mask (widened by ``margin`` voxels) and the
        neighbour's low-res logits as mask prompt. A direction stops at the volume's end, when the mask comes out
        empty or smaller than ``min_area_ratio`` x the seed's area, or when the decoder's predicted IoU drops
        below ``min_iou`` (the structure has ended); the slice that stopped it is not kept.

        Returns the ``(X, Y, Z)`` mask with the seed slice and every accepted neighbour.
        """
        volume = torch.as_tensor(volume)
        _, x, y, depth = volume.shape
        out = torch.zeros((x, y, depth), dtype=torch.bool)
        out[..., seed.z] = seed.mask
        slices = {seed.z: seed}
        seed_area = int(seed.mask.sum())
        if seed_area == 0:
            return VolumePrediction(out, slices)
        for step in (1, -1):
            previous, z = seed, seed.z + step
            while 0 <= z < depth and (max_slices is None or abs(z - seed.z) <= max_slices):
                box = tight_box(previous.mask)
                if box is None:
                    break
                lo = (max(0, box[0][0] - margin), max(0, box[0][1] - margin))
                hi = (min(x - 1, box[1][0] + margin), min(y - 1, box[1][1] + margin))
                pred = self.predict_slice(key, volume, z, box=(lo, hi), mask_prompt=previous, box_slack=margin)
                area = int(pred.mask.sum())
                if area == 0 or area < min_area_ratio * seed_area or pred.iou < min_iou:
                    break
                out[..., z] = pred.mask
                slices[z] = pred
                previous, z = pred, z + step
        return VolumePrediction(out, slices)


def _window(volume: torch.Tensor, origin: Sequence[int], size: Sequence[int]) -> torch.Tensor:
    """``volume[:, o0:o0+s0, o1:o1+s1, o2:o2+s2]`` with zero padding where the window leaves the volume."""
    pads, crops = [], []
    for o, s, n in zip(origin, size, volume.shape[1:]):
        lo, hi = max(0, o), min(n, o + s)
        crops.append(slice(lo, hi))
        pads.append((lo - o, o + s - hi))
    part = volume[(slice(None), *crops)].float()
    flat = [p for pair in reversed(pads) for p in pair]
    return F.pad(part, flat) if any(flat) else part
