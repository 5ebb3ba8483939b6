"""MONAI Label task ``masksam_interactive``: a box and/or clicks -> one structure, with or without a trained model.

Request parameters (JSON ``params`` of ``POST /infer/masksam_interactive?image=<id>``; checked by
``lib.params.parse_request`` before any inference, a bad one is answered with HTTP 400 naming it):

- ``label`` or ``target``: the structure, by name (``metadata.json`` ``channel_def``, case-insensitive) or index.
  (3D Slicer sends the segment name as ``label``.)
- ``foreground`` / ``background``: ``[[i, j, k], ...]`` voxel indices (image IJK, as Slicer and OHIF send).
- ``roi``: ``[i0, i1, j0, j1, k0, k1]`` (Slicer's ROI) or ``box``: ``[[i0, j0, k0], [i1, j1, k1]]``: a box on
  slices ``k0..k1``.
- ``propagate`` (default false): carry the structure from the prompted slice(s) through the neighbouring slices
  until it ends (``scripts.prompt_assist.PromptAssist.propagate``).
- ``mask_prompt`` (default false): when this request repeats the previous one's prompts on a slice plus new
  clicks, the previous round's logits become the mask prompt (SAM's interactive loop; measured to lower Dice
  with the zero-shot LiteMedSAM decoder, see docs/benchmarks.md, hence off by default).
- ``mode``: ``auto`` (default), ``prompt`` or ``correct`` (below).
- ``output_mode``: ``target`` (default: a 0/1 uint8 mask of the structure, what 3D Slicer's deepgrow import
  expects) or ``labelmap`` (the whole uint8 label map with the structure changed).
- the current label map: an uploaded ``label`` file (multipart; name the structure with ``target`` then), else
  ``current_label`` (the app fills it from the datastore's saved label), else none (empty).
- ``protect_other_labels`` (default true), ``click_radius`` (default 0, voxels in-plane).

Paths:

- **prompt-only** (``scripts.prompt_assist``): the box/clicks through SAM's prompt encoder and MaskSAM's mask
  decoder for one structure, no generated prompts or class head. Without ``models/model.pt`` this is LiteMedSAM
  exactly (modality adapter bypassed, adapters at zero) on the image as stored; with a trained model it runs
  the trained modality adapter and adapters on the bundle's preprocessed image.
- **correction** (``scripts.interactive.predict_target_mask``, trained model only): the clicks are added to the
  prompts the model generated for the query it classified as the structure.

``auto`` = prompt-only without a trained model or when a box is given; otherwise correction, except on slices
where the model found no query of that class (class probability < 0.5: the model got the structure wrong),
which get the prompt-only path. Only the structure changes, only on the prompted (and propagated) slices.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from typing import Any, Dict, Optional, Tuple

import nibabel as nib
import numpy as np
import torch

from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from monailabel.tasks.infer.bundle import BundleInferTask
from monailabel.utils.others.class_utils import unload_module

from lib.params import BadParameter, InteractiveRequest, check_label_map, parse_request

logger = logging.getLogger(__name__)

CONFIDENT = 0.5  # class probability under which the model is taken to have missed the structure on a slice
CLICK_BOX_MARGIN = 5  # voxels added around the box that zero-shot foreground clicks span


def _bad(message: str) -> MONAILabelException:
    return MONAILabelException(MONAILabelError.INVALID_INPUT, message)


def _bundle_scripts(bundle_path: str):
    """``scripts.prompt_assist`` and ``scripts.interactive`` of the bundle (MONAI Label swaps ``scripts``)."""
    sys.path.insert(0, bundle_path)
    try:
        unload_module("scripts")
        import scripts.interactive as interactive
        import scripts.prompt_assist as prompt_assist

        return prompt_assist, interactive
    finally:
        sys.path.remove(bundle_path)


class MaskSAMInteractiveTask(InferTask):
    """Box/click segmentation of one structure (see the module docstring).

    Args:
        bundle_path: the MaskSAM bundle folder (``configs/``, optional ``models/model.pt``).
        conf: the app's ``--conf`` options; ``assist_cache_mib`` bounds the embedding cache (default 512 MiB:
            128 LiteMedSAM slices of 4 MiB).
        labels: ``{name: index}`` without background.
        num_classes: K, background included (label values 0..K-1).
    """

    def __init__(self, bundle_path: str, conf: Dict[str, str], labels: Dict[str, int], num_classes: int) -> None:
        self.bundle_path = bundle_path
        self.model_path = os.path.join(bundle_path, "models", "model.pt")
        self.num_classes = int(num_classes)
        self.prompt_assist, self.interactive = _bundle_scripts(bundle_path)
        mib = int(conf.get("assist_cache_mib", 512))
        self.cache = self.prompt_assist.EmbeddingCache(mib * 2**20)
        self.trained_task: Optional[BundleInferTask] = None
        if os.path.isfile(self.model_path):
            self.trained_task = BundleInferTask(bundle_path, conf, type=InferType.DEEPGROW, add_post_restore=False,
                                                load_strict=True)
            if not self.trained_task.is_valid():
                raise RuntimeError(f"MONAI Label could not load the MaskSAM bundle {bundle_path} with {self.model_path}")
        trained = self.trained_task is not None
        super().__init__(
            type=InferType.DEEPGROW,
            labels=labels,
            dimension=3,
            description=(
                "MaskSAM annotation assist: a box (roi) and/or foreground/background clicks segment one structure "
                "through SAM's prompt encoder and MaskSAM's mask decoder"
                + (" (trained model: trained adapters; clicks correct the model's own prediction)" if trained else
                   " (no trained model: LiteMedSAM zero-shot)")
                + "; 'propagate' carries it through the neighbouring slices."
            ),
            config={"output_mode": ["target", "labelmap"],
                    "mode": ["auto", "prompt", "correct"] if trained else ["auto", "prompt"], "propagate": False,
                    "mask_prompt": False, "protect_other_labels": True, "click_radius": 0},
        )
        self._lock = threading.Lock()
        self._zero_shot = None
        self._trained: Optional[Tuple[int, Any]] = None  # (id of the loaded network, its PromptAssist)
        self._rounds: "OrderedDict[tuple, tuple]" = OrderedDict()  # mask prompts of the previous round per slice

    def is_valid(self) -> bool:
        return True

    @property
    def has_trained_model(self) -> bool:
        return self.trained_task is not None and os.path.isfile(self.model_path)

    # ------------------------------------------------------------------ assists (built once, cached embeddings)
    def _zero_shot_assist(self):
        if self._zero_shot is None:
            self._zero_shot = self.prompt_assist.PromptAssist(self.prompt_assist.zero_shot_network(), trained=False,
                                                              cache=self.cache)
        return self._zero_shot

    def _trained_assist(self, network):
        if self._trained is None or self._trained[0] != id(network):
            self.cache.clear()  # embeddings of another model (model.pt changed on disk)
            self._trained = (id(network), self.prompt_assist.PromptAssist(network, trained=True, cache=self.cache))
        return self._trained[1]

    # ------------------------------------------------------------------ request
    def __call__(self, request) -> Tuple[Optional[str], Dict]:
        start = time.time()
        image_path = request.get("image")
        if not isinstance(image_path, str) or not os.path.isfile(image_path):
            raise MONAILabelException(MONAILabelError.APP_ERROR, f"image {image_path!r} not found")
        try:
            source = nib.load(image_path)
        except Exception as e:  # noqa: BLE001 - any reader error is the client's file
            raise _bad(f"image {os.path.basename(image_path)} could not be read as NIfTI: {e}") from e
        shape = tuple(int(s) for s in source.shape[:3])
        if len(source.shape) not in (3, 4) or (len(source.shape) == 4 and source.shape[3] != 1):
            raise _bad(f"image {os.path.basename(image_path)} must be a 3D volume, got shape {source.shape}")
        try:
            req = parse_request(request, self.labels, shape)
            label = self._current_label(request, shape)
        except BadParameter as e:
            raise _bad(str(e)) from e
        if req.mode == "correct" and not self.has_trained_model:
            raise _bad("bad parameter 'mode': 'correct' needs a trained models/model.pt; use 'auto' or 'prompt'")

        key = (image_path, os.stat(image_path).st_mtime_ns)
        with self._lock:
            if self.has_trained_model:
                mask, region, info = self._run_trained(request, req, key, source)
            else:
                image = np.asarray(source.dataobj, dtype=np.float32).reshape(shape)
                mask, region, info = self._run_prompt(self._zero_shot_assist(), torch.from_numpy(image)[None], req, key)

        start_label = label if label is not None else np.zeros(shape, dtype=np.uint8)
        corrected = self.interactive.apply_correction(
            start_label, req.target, mask, region, req.foreground, req.background,
            protect_other_labels=req.protect_other_labels, click_radius=req.click_radius,
        )
        out = (corrected == req.target) if req.output_mode == "target" else corrected
        path = tempfile.NamedTemporaryFile(suffix=".nii.gz", delete=False).name
        nib.save(nib.Nifti1Image(np.asarray(out, dtype=np.uint8), source.affine), path)

        result = {
            "target": req.target_name,
            "target_index": req.target,
            "slices": sorted(int(z) for z in np.nonzero(region.any((0, 1)))[0]),
            "changed_voxels": int((corrected != start_label).sum()),
            "start_label": "uploaded/saved label" if label is not None else "empty",
            "output_mode": req.output_mode,
            "path": info.pop("path"),
            "trained_model": self.has_trained_model,
            "seconds": round(time.time() - start, 2),
            **info,
            "embedding_cache": {"entries": len(self.cache), "mib": round(self.cache.bytes / 2**20, 1),
                                "max_mib": round(self.cache.max_bytes / 2**20)},
        }
        if not self.has_trained_model and req.box is None and any(len(req.clicks_on(z)[0]) < 2 for z in req.slices()):
            result["hint"] = ("zero-shot LiteMedSAM was trained with box prompts only and does not segment from one "
                              "click: draw a box (roi), or place two or more foreground clicks near the structure's "
                              f"edges on the slice (they span its box, widened by {CLICK_BOX_MARGIN} voxels)")
        logger.info(f"MaskSAM interactive: {result}")
        return path, result

    def _current_label(self, request, shape) -> Optional[np.ndarray]:
        """The uploaded label file (multipart ``label``) or the saved ``current_label``, checked, else None."""
        for key, source in (("label", "uploaded label file"), ("current_label", "saved label")):
            value = request.get(key)
            if isinstance(value, str) and os.path.isfile(value):
                try:
                    data = np.asarray(nib.load(value).dataobj)
                except Exception as e:  # noqa: BLE001 - the client's file
                    raise BadParameter("label", f"a NIfTI label map ({source})", f"unreadable file: {e}") from e
                return check_label_map(data, shape, self.num_classes, source)
        return None

    # ------------------------------------------------------------------ prompt-only path
    def _mask_prompt(self, req: InteractiveRequest, key, z: int, fg, bg, box):
        """The previous round's prediction on slice ``z`` if this request extends its prompts."""
        entry = self._rounds.get((key, req.target, z))
        if not req.mask_prompt or entry is None:
            return None
        old_fg, old_bg, old_box, pred = entry
        extends = old_box == box and old_fg == fg[: len(old_fg)] and old_bg == bg[: len(old_bg)]
        return pred if extends and len(fg) + len(bg) > len(old_fg) + len(old_bg) else None

    @staticmethod
    def _box_of_clicks(fg, shape, margin: int = CLICK_BOX_MARGIN):
        """Zero-shot LiteMedSAM segments from boxes only (its decoder was trained with boxes): two or more
        foreground clicks on a slice without a box span one, widened by ``margin`` voxels (3D Slicer's deepgrow
        panel sends clicks, not boxes)."""
        pts = np.asarray(fg)
        lo = np.maximum(pts.min(0) - margin, 0)
        hi = np.minimum(pts.max(0) + margin, np.asarray(shape[:2]) - 1)
        return (tuple(int(v) for v in lo), tuple(int(v) for v in hi))

    def _run_prompt(self, assist, volume: torch.Tensor, req: InteractiveRequest, key, slices=None):
        """Prompt-only path in ``volume``'s voxel space -> (mask, region, info)."""
        shape = tuple(volume.shape[1:])
        mask = np.zeros(shape, dtype=bool)
        region = np.zeros(shape, dtype=bool)
        runs = assist.encoder_runs
        seeds = []
        for z in slices if slices is not None else req.slices():
            fg, bg = req.clicks_on(z)
            box, box_slack = None, 0
            if req.box is not None and req.box[0][2] <= z <= req.box[1][2]:
                box = (tuple(req.box[0][:2]), tuple(req.box[1][:2]))
            elif not assist.trained and len(fg) >= 2:
                box, box_slack = self._box_of_clicks(fg, shape), None  # not the structure's tight box: no ring rule
            pred = assist.predict_slice(key, volume, z, box=box, foreground=fg, background=bg,
                                        mask_prompt=self._mask_prompt(req, key, z, fg, bg, box), box_slack=box_slack)
            self._rounds[(key, req.target, z)] = (fg, bg, box, pred)
            while len(self._rounds) > 256:
                self._rounds.popitem(last=False)
            mask[..., z] = pred.mask.numpy()
            region[..., z] = True
            seeds.append(pred)
        if req.propagate:
            prompted = set(int(p.z) for p in seeds)
            for seed in seeds:
                grown = assist.propagate(key, volume, seed)
                for z, pred in grown.slices.items():
                    if z not in prompted and not region[..., z].any():
                        mask[..., z] = pred.mask.numpy()
                        region[..., z] = True
        info = {"path": "prompt-only (trained adapters)" if assist.trained else "prompt-only (LiteMedSAM zero-shot)",
                "encoder_runs": assist.encoder_runs - runs}
        return mask, region, info

    # ------------------------------------------------------------------ trained model
    def _run_trained(self, request, req: InteractiveRequest, key, source):
        """Preprocess with the bundle, run the prompt-only or correction path there, map back to the image grid."""
        task = self.trained_task
        device = "cuda" if torch.cuda.is_available() and str(request.get("device", "cpu")).startswith("cuda") else "cpu"
        data = dict(task.config())  # MONAI Label's own defaults (e.g. model_filename), as its __call__ starts
        data.update({"image": request["image"], "image_path": request["image"], "device": device})
        data = task.run_pre_transforms(data, task.pre_transforms(data))
        image = data[task.input_key]
        meta = image.meta
        a_pre = np.asarray(image.affine, dtype=np.float64)
        a_orig = np.asarray(meta.get("original_affine", a_pre), dtype=np.float64)
        shape = tuple(int(s) for s in source.shape[:3])
        to_pre = self.interactive.voxel_map(a_orig, a_pre)
        pre = image.as_tensor().float()
        pre_shape = tuple(pre.shape[1:])

        def to_pre_points(points):
            return [p for p in self.interactive.map_points(points, to_pre)
                    if all(0 <= c < s for c, s in zip(p, pre_shape))]

        pre_req = InteractiveRequest(**{**req.__dict__, "foreground": to_pre_points(req.foreground),
                                        "background": to_pre_points(req.background)})
        if req.box is not None:
            corners = np.asarray(self.interactive.map_points(np.asarray(req.box, dtype=float), to_pre))
            lo = np.clip(corners.min(0), 0, np.asarray(pre_shape) - 1)
            hi = np.clip(corners.max(0), 0, np.asarray(pre_shape) - 1)
            pre_req.box = (lo.tolist(), hi.tolist())
        network = task._get_network(device, data)
        network.eval()
        assist = self._trained_assist(network)
        pre_key = key + ("trained",)

        use_prompt = req.mode == "prompt" or (req.mode == "auto" and req.box is not None)
        if use_prompt:
            mask, region, info = self._run_prompt(assist, pre, pre_req, pre_key)
        else:
            result = self.interactive.predict_target_mask(network, pre, req.target, foreground=pre_req.foreground,
                                                          background=pre_req.background, box=pre_req.box)
            mask, region = result.mask.numpy(), result.region.numpy()
            missed = [z for z, p in result.confidence.items() if p < CONFIDENT] if req.mode == "auto" else []
            info = {"path": "correction of the model's query", "missed_slices": missed}
            if missed:  # the model did not find the structure there: the prompts alone decide
                p_mask, p_region, p_info = self._run_prompt(assist, pre, pre_req, pre_key, slices=missed)
                mask[..., missed], region[..., missed] = p_mask[..., missed], p_region[..., missed]
                info["path"] += f"; prompt-only on slices {missed}"
                info["encoder_runs"] = p_info["encoder_runs"]
        back = self.interactive.resample_nearest
        return back(mask, to_pre, shape, fill=False), back(region, to_pre, shape, fill=False), info
