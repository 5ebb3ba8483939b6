"""MONAI Label task: interactive correction of one label of a MaskSAM segmentation with clicks (and a box).

Request parameters (JSON ``params`` of ``POST /infer/<model>?image=<id>``):

- ``label`` or ``target``: the label to correct, by name (``metadata.json`` ``channel_def``, case-insensitive)
  or index. (3D Slicer sends the segment name as ``label``.)
- ``foreground`` / ``background``: ``[[i, j, k], ...]`` voxel indices (image IJK, as Slicer and OHIF send).
- ``box``: ``[[i0, j0, k0], [i1, j1, k1]]`` or ``roi``: ``[i0, i1, j0, j1, k0, k1]`` (Slicer's ROI) — replaces
  the box prompt of the target query on slices ``k0..k1``.
- the current label map: an uploaded ``label`` file (multipart field, only when ``params`` has no ``label``
  key — use ``target`` then), else ``current_label`` (a path; the app fills it from the datastore's saved
  label of the image), else a fresh MaskSAM auto-segmentation is the starting point.
- ``output_mode``: ``labelmap`` (default: the whole corrected label map) or ``target`` (a 0/1 mask of the corrected
  label, for viewers that merge one segment at a time, e.g. 3D Slicer's interactive tools).
- ``protect_other_labels`` (default true), ``click_radius`` (default 0, voxels in-plane).

The clicks are mapped into the bundle's preprocessed space through the image affines, the target label is
re-segmented there by ``scripts.interactive.predict_target_mask`` (SAM's frozen prompt encoder and mask
decoder), and the new mask is mapped back to the image grid (nearest neighbour) and merged with
``scripts.interactive.apply_correction``: only the target label changes, only on the clicked slices.
"""

import logging
import os
import sys
import time
from typing import Any, Callable, Dict, List, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import LoadImage

from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.bundle import BundleInferTask
from monailabel.utils.others.class_utils import unload_module
from monailabel.utils.others.generic import strtobool

logger = logging.getLogger(__name__)


class MaskSAMInteractiveTask(BundleInferTask):
    """Click/box correction of one label through MaskSAM's SAM prompt encoder (see module docstring)."""

    def __init__(self, path: str, conf: Dict[str, str], **kwargs):
        super().__init__(
            path,
            conf,
            type=InferType.DEEPGROW,
            add_post_restore=False,
            load_strict=True,
            **kwargs,
        )
        if not self.is_valid():
            return
        self.description = (
            "MaskSAM interactive correction: foreground/background clicks (and an optional box) become SAM point/box "
            "prompts for the query of the chosen label on the clicked slices; only that label changes there."
        )
        self._config.update({"output_mode": ["labelmap", "target"], "protect_other_labels": True, "click_radius": 0})

    # ------------------------------------------------------------------ pipeline pieces
    def post_transforms(self, data=None) -> Sequence[Callable]:
        return []  # run_inferer already returns the label map on the image grid

    def inverse_transforms(self, data=None):
        return None

    def _scripts(self):
        """``scripts.interactive`` from the bundle folder (MONAI Label swaps ``scripts`` between bundles)."""
        sys.path.insert(0, self.bundle_path)
        try:
            unload_module("scripts")
            import scripts.interactive as interactive

            return interactive
        finally:
            sys.path.remove(self.bundle_path)

    def _target_index(self, value) -> int:
        labels = {str(k).lower(): int(v) for k, v in (self.labels or {}).items()}
        if isinstance(value, str) and value.lower() in labels:
            return labels[value.lower()]
        try:
            index = int(value)
        except (TypeError, ValueError):
            index = None
        if index is None or index not in labels.values():
            raise MONAILabelException(
                MONAILabelError.INVALID_INPUT,
                f"unknown target label {value!r}; expected one of {sorted(labels, key=labels.get)} or their indices "
                f"{sorted(labels.values())}",
            )
        return index

    @staticmethod
    def _option(data, key, default):
        value = data.get(key, default)
        return value[0] if isinstance(value, (list, tuple)) else value

    def run_inferer(self, data: Dict[str, Any], convert_to_batch=True, device="cuda"):
        start = time.time()
        interactive = self._scripts()

        label_param = data.get("label")
        current = data.get("current_label")
        if isinstance(label_param, str) and os.path.isfile(label_param):  # an uploaded label map
            current, label_param = label_param, None
        target_value = data.get("target", label_param)
        if target_value is None:
            raise MONAILabelException(MONAILabelError.INVALID_INPUT, "name the label to correct: params 'label' or 'target'")
        target = self._target_index(target_value)
        names = {int(v): k for k, v in self.labels.items()}

        foreground = data.get("foreground") or []
        background = data.get("background") or []
        if not foreground and isinstance(data.get(names[target]), list):  # DeepEdit-style {name: clicks}
            foreground = data[names[target]]
        box = data.get("box")
        roi = data.get("roi")
        if not box and roi:
            if len(roi) != 6:
                raise MONAILabelException(MONAILabelError.INVALID_INPUT, f"roi must be [i0, i1, j0, j1, k0, k1], got {roi}")
            box = [[roi[0], roi[2], roi[4]], [roi[1], roi[3], roi[5]]]

        image = data[self.input_key]
        if not isinstance(image, MetaTensor):
            raise MONAILabelException(MONAILabelError.INFERENCE_ERROR, "preprocessing must keep image metadata")
        meta = image.meta
        a_pre = np.asarray(image.affine, dtype=np.float64)
        a_orig = np.asarray(meta.get("original_affine", a_pre), dtype=np.float64)
        orig_shape = tuple(int(s) for s in np.asarray(meta.get("spatial_shape", image.shape[1:])).reshape(-1)[:3])
        to_pre = interactive.voxel_map(a_orig, a_pre)

        def _check(points, what):
            pts = np.asarray(points, dtype=float).reshape(-1, 3) if len(points) else np.zeros((0, 3))
            bad = [p for p in np.rint(pts).astype(int).tolist() if any(c < 0 or c >= s for c, s in zip(p, orig_shape))]
            if bad:
                raise MONAILabelException(
                    MONAILabelError.INVALID_INPUT, f"{what} click(s) {bad} outside the image of shape {orig_shape}"
                )
            return np.rint(pts).astype(int).tolist()

        foreground, background = _check(foreground, "foreground"), _check(background, "background")
        pre_box = None
        if box:
            corners = np.asarray(interactive.map_points(np.asarray(box, dtype=float).reshape(2, 3), to_pre))
            pre_box = [corners.min(0).tolist(), corners.max(0).tolist()]

        network = self._get_network(device, data)
        network.eval()
        pre_image = image.as_tensor().float()
        result = interactive.predict_target_mask(
            network,
            pre_image,
            target,
            foreground=interactive.map_points(foreground, to_pre),
            background=interactive.map_points(background, to_pre),
            box=pre_box,
        )
        # Back to the image grid: each original voxel takes its nearest preprocessed voxel (to_pre).
        mask = interactive.resample_nearest(result.mask.numpy(), to_pre, orig_shape, fill=False)
        region = interactive.resample_nearest(result.region.numpy(), to_pre, orig_shape, fill=False)

        if current:
            label = np.asarray(LoadImage(image_only=True)(current))
            label = label[0] if label.ndim == 4 and label.shape[0] == 1 else label
            if tuple(label.shape) != orig_shape:
                raise MONAILabelException(
                    MONAILabelError.INVALID_INPUT,
                    f"current label map {current} has shape {tuple(label.shape)}, the image has {orig_shape}",
                )
            label = np.rint(label).astype(np.uint8)
            source = "uploaded/saved label"
        else:
            with torch.no_grad():
                probs = self.inferer(data)(pre_image[None].to(torch.device(device)), network)
            label_pre = torch.as_tensor(probs)[0].argmax(0).to(torch.uint8).cpu().numpy()
            label = interactive.resample_nearest(label_pre, to_pre, orig_shape, fill=0)
            source = "MaskSAM auto-segmentation"

        corrected = interactive.apply_correction(
            label,
            target,
            mask,
            region,
            foreground,
            background,
            protect_other_labels=strtobool(str(self._option(data, "protect_other_labels", True))),
            click_radius=int(self._option(data, "click_radius", 0)),
        )
        mode = str(self._option(data, "output_mode", "labelmap")).lower()
        out = (corrected == target).astype(np.uint8) if mode == "target" else corrected.astype(np.uint8)
        data[self.output_label_key] = MetaTensor(torch.as_tensor(out), affine=torch.as_tensor(a_orig))
        data[self.output_json_key] = {
            "target": names[target],
            "target_index": target,
            "slices": [int(s) for s in sorted(set(np.nonzero(region)[2].tolist()))],
            "changed_voxels": int((corrected != label).sum()),
            "start_label": source,
            "output_mode": mode,
            "seconds": round(time.time() - start, 2),
        }
        logger.info(f"MaskSAM interactive: {data[self.output_json_key]}")
        return data
