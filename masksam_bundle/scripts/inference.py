"""Folder/datalist inference: preprocess, sliding window, invert, argmax, NIfTI with the source geometry.

``Predictor.run()`` processes every image independently: a file that cannot be read or predicted is
reported and skipped, the others are written, and the run ends with an error listing the failures (so the
command exits non-zero). Outputs are ``<output_dir>/<input name><output_postfix>.nii.gz``; existing outputs
are refused before any work unless ``overwrite`` is set; each file is written atomically.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Callable, Dict, List, Optional, Sequence

import nibabel as nib
import numpy as np
import torch

from .checkpointing import load_model_weights
from .cli import describe_error, parse_flag
from .data import strip_nifti_suffix
from .files import atomic_write, ensure_writable_dir
from .precision import autocast

logger = logging.getLogger("masksam.inference")


def output_path(image: str, output_dir: str, postfix: str = "_seg") -> str:
    return os.path.join(output_dir, f"{strip_nifti_suffix(image)}{postfix}.nii.gz")


def write_label_nifti(label: np.ndarray, reference: str, path: str, dtype=np.uint8) -> str:
    """Write ``label`` (spatial array) with the affine and header geometry of ``reference``, atomically.

    The label must have the reference's spatial shape (first three axes)."""
    ref = nib.load(reference)
    ref_shape = tuple(ref.shape[:3])
    label = np.asarray(label)
    if tuple(label.shape) != ref_shape:
        raise ValueError(f"prediction shape {tuple(label.shape)} differs from the input {reference} {ref_shape}")
    header = ref.header.copy()
    header.set_data_dtype(dtype)
    if len(ref.shape) > 3:  # multi-channel input: the label map is 3D
        header.set_data_shape(ref_shape)
    img = nib.Nifti1Image(label.astype(dtype), ref.affine, header=header)
    img.set_qform(ref.affine, code=int(ref.header["qform_code"]) or 1)
    img.set_sform(ref.affine, code=int(ref.header["sform_code"]) or 1)
    img.header.set_slope_inter(1.0, 0.0)
    return atomic_write(path, lambda tmp: nib.save(img, tmp), suffix=".nii.gz")


def count_window_batches(image_size: Sequence[int], inferer) -> Optional[int]:
    """Network calls a ``SlidingWindowInferer`` makes for an image of ``image_size`` (spatial), or ``None`` for
    other inferers. Mirrors MONAI's scan: the image is padded to the window, windows step by
    ``roi * (1 - overlap)`` (the full window where the image is exactly one window wide)."""
    roi, overlap = getattr(inferer, "roi_size", None), getattr(inferer, "overlap", None)
    if roi is None or overlap is None:
        return None
    overlaps = list(overlap) if isinstance(overlap, (list, tuple)) else [overlap] * len(roi)
    windows = 1
    for size, window, ov in zip(image_size, roi, overlaps):
        size = max(int(size), int(window))
        step = int(window) if size == window else max(int(window * (1 - ov)), 1)
        windows *= int(math.ceil((size - window) / step)) + 1 if size > window else 1
    return int(math.ceil(windows / max(1, int(getattr(inferer, "sw_batch_size", 1)))))


class WindowProgress:
    """The network, counting its calls during one volume's sliding window and logging progress with an ETA at
    most every ``every_s`` seconds (long volumes take minutes on CPU)."""

    def __init__(self, network: Callable, total: Optional[int], name: str, every_s: float = 15.0) -> None:
        self.network, self.total, self.name, self.every_s = network, total, name, every_s
        self.done, self.start = 0, time.perf_counter()
        self._last_log = self.start

    def __call__(self, *args, **kwargs):
        out = self.network(*args, **kwargs)
        self.done += 1
        now = time.perf_counter()
        if now - self._last_log >= self.every_s:
            self._last_log = now
            elapsed = now - self.start
            if self.total and self.done < self.total:
                eta = elapsed / self.done * (self.total - self.done)
                logger.info(f"  {self.name}: window batch {self.done}/{self.total} ({100 * self.done // self.total}%), "
                            f"{elapsed:.0f} s, ETA {eta:.0f} s")
            else:
                logger.info(f"  {self.name}: window batch {self.done}, {elapsed:.0f} s")
        return out


class Predictor:
    """Run a trained network over a list of images (``[{"image": path}, ...]``).

    Args:
        network: the network (weights loaded from ``checkpoint`` when given).
        preprocessing: dict transform producing ``data["image"]`` (C, H, W, D) MetaTensor.
        inferer: e.g. ``SlidingWindowInferer`` with the training patch.
        postprocessing: dict transform on ``{"image", "pred"}`` that inverts the preprocessing
            (``Invertd``) and takes the argmax; ``data["pred"]`` must end as (1, H, W, D) in input space.
        data: the images to predict.
        output_dir: where label maps are written.
        checkpoint: trained weights (``models/model.pt``); ``None`` uses the network as it is.
        overwrite: replace existing outputs (otherwise they are refused before any work).
        amp, amp_dtype: autocast on CUDA with this dtype (``scripts.precision``); CPU runs float32.
    """

    def __init__(self, network: torch.nn.Module, preprocessing: Callable, inferer: Callable,
                 postprocessing: Callable, data: Sequence[Dict], output_dir: str,
                 checkpoint: Optional[str] = None, device="cpu", overwrite: bool = False,
                 output_postfix: str = "_seg", amp: bool = False, settings: Optional[Dict] = None,
                 amp_dtype: str = "auto") -> None:
        self.network, self.preprocessing, self.inferer = network, preprocessing, inferer
        self.postprocessing, self.data, self.output_dir = postprocessing, list(data), str(output_dir)
        self.checkpoint, self.device, self.overwrite = checkpoint, torch.device(device), parse_flag(overwrite, "overwrite")
        self.output_postfix, self.amp, self.settings = output_postfix, parse_flag(amp, "amp"), settings
        self.amp_dtype = amp_dtype

    def plan(self) -> List[tuple]:
        """(input, output) pairs; refuses outputs that exist or that would replace an input."""
        ensure_writable_dir(self.output_dir, "output_dir")
        pairs = [(d["image"], output_path(d["image"], self.output_dir, self.output_postfix)) for d in self.data]
        outputs = [o for _, o in pairs]
        dup = sorted({o for o in outputs if outputs.count(o) > 1})
        if dup:
            raise ValueError(f"several inputs would write the same output file: {dup}")
        clobber = [o for i, o in pairs if os.path.abspath(i) == os.path.abspath(o)]
        if clobber:
            raise ValueError(f"outputs would replace input images: {clobber}; choose another output_dir/postfix")
        existing = [o for o in outputs if os.path.exists(o)]
        if existing and not self.overwrite:
            raise FileExistsError(
                f"{len(existing)} output file(s) already exist, e.g. {existing[:5]}; pass overwrite=true to "
                "replace them or choose another output_dir"
            )
        return pairs

    def predict_one(self, image: str) -> np.ndarray:
        data = self.preprocessing({"image": image})
        x = data["image"].unsqueeze(0).to(self.device)
        network = WindowProgress(self.network, count_window_batches(x.shape[2:], self.inferer), os.path.basename(image))
        with torch.no_grad(), autocast(self.device, self.amp, self.amp_dtype):
            pred = self.inferer(x, network)
        data["pred"] = pred[0].float().cpu()
        data["image"] = data["image"].cpu()
        data = self.postprocessing(data)
        label = torch.as_tensor(data["pred"]).squeeze(0)
        return label.cpu().numpy()

    def run(self) -> List[str]:
        pairs = self.plan()
        if self.checkpoint:
            load_model_weights(self.network, self.checkpoint, self.settings)
        self.network.eval()
        written, failures = [], []
        start = time.perf_counter()
        for i, (image, out) in enumerate(pairs, 1):
            t0 = time.perf_counter()
            try:
                label = self.predict_one(image)
                write_label_nifti(label, image, out)
            except Exception as e:  # report, skip, carry on with the other images
                failures.append(f"{image}: {describe_error(e)}")
                logger.error(f"[{i}/{len(pairs)}] FAILED {image}: {describe_error(e)}")
                continue
            written.append(out)
            labels = np.unique(label).astype(int).tolist()
            logger.info(f"[{i}/{len(pairs)}] {image} -> {out} shape {tuple(label.shape)} labels {labels} "
                        f"({time.perf_counter() - t0:.1f} s)")
        logger.info(f"inference: {len(written)} written, {len(failures)} failed in {time.perf_counter() - start:.1f} s")
        if failures:
            raise RuntimeError(f"{len(failures)} of {len(pairs)} image(s) failed:\n  " + "\n  ".join(failures))
        return written


__all__ = ["output_path", "write_label_nifti", "count_window_batches", "WindowProgress", "Predictor"]
