"""A small synthetic multi-organ data set for the no-data demo and for tests.

Each case is a 3D volume with three labelled structures on a smooth, noisy background, loosely shaped like
a short-axis cardiac slab: 1 = a free ellipsoid ("RV"), 3 = an ellipsoid core ("LV") and 2 = the shell around
that core ("Myo"). Positions, radii and intensities vary per case; everything is seeded.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import sys
from typing import Dict, List, Optional, Sequence

import nibabel as nib
import numpy as np

from .files import atomic_write, atomic_write_text

logger = logging.getLogger("masksam.synthetic")

CLASS_NAMES = ["background", "structure_1", "structure_2", "structure_3"]


def _ellipsoid(grid, center, radii) -> np.ndarray:
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii)) <= 1.0


def make_case(shape: Sequence[int], rng: np.random.Generator, spacing=(1.5, 1.5, 8.0)):
    """One (image float32, label uint8) pair of ``shape`` (X, Y, Z) in physical space (mm)."""
    shape = tuple(int(s) for s in shape)
    grid = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    extent = np.array([n * s for n, s in zip(shape, spacing)])
    label = np.zeros(shape, dtype=np.uint8)
    c_lv = extent * rng.uniform([0.45, 0.4, 0.5], [0.6, 0.6, 0.5])
    r_lv = np.array([*(extent[:2].min() * rng.uniform(0.09, 0.13, 2)), extent[2] * 0.9])
    shell = extent[:2].min() * rng.uniform(0.04, 0.06)
    outer = _ellipsoid(grid, c_lv, r_lv + np.array([shell, shell, 0.0]))
    c_rv = c_lv + np.array([-(r_lv[0] + shell) * 1.6, rng.uniform(-0.3, 0.3) * r_lv[1], 0.0])
    r_rv = np.array([r_lv[0] * rng.uniform(0.7, 0.9), r_lv[1] * rng.uniform(1.1, 1.4), extent[2] * 0.9])
    label[_ellipsoid(grid, c_rv, r_rv) & ~outer] = 1
    label[outer] = 2
    label[_ellipsoid(grid, c_lv, r_lv)] = 3
    means = {0: 0.15, 1: rng.uniform(0.65, 0.8), 2: rng.uniform(0.35, 0.45), 3: rng.uniform(0.8, 0.95)}
    image = np.zeros(shape, dtype=np.float32)
    for k, m in means.items():
        image[label == k] = m
    bias = 0.1 * np.sin(grid[0] / extent[0] * np.pi * rng.uniform(0.5, 1.5)) * np.cos(grid[1] / extent[1] * np.pi)
    image = image + bias + rng.normal(0.0, 0.06, shape)
    return image.astype(np.float32), label, np.diag([*spacing, 1.0])


def make_demo_dataset(root: str, num_cases: int = 6, num_val: int = 2, shape: Sequence[int] = (128, 128, 4),
                      seed: int = 0) -> str:
    """Write ``num_cases`` volumes to ``root/imagesTr`` and ``root/labelsTr`` plus ``root/dataset.json``
    (decathlon layout; the last ``num_val`` cases under ``validation``). Returns the dataset.json path.

    An existing set made with the same parameters is reused; one made with other parameters is refused."""
    root = os.path.abspath(str(root))
    params = {"num_cases": int(num_cases), "num_val": int(num_val), "shape": [int(s) for s in shape], "seed": int(seed)}
    datalist = os.path.join(root, "dataset.json")
    if os.path.exists(datalist):
        with open(datalist) as f:
            existing = json.load(f)
        if existing.get("generator") == params:
            logger.info(f"reusing synthetic data set {datalist}")
            return datalist
        raise FileExistsError(f"{datalist} exists and was made with other parameters ({existing.get('generator')}); "
                              f"choose another folder")
    if not 0 < num_val < num_cases:
        raise ValueError(f"need 0 < num_val < num_cases, got num_val={num_val}, num_cases={num_cases}")
    rng = np.random.default_rng(seed)
    entries: List[Dict[str, str]] = []
    for i in range(num_cases):
        image, label, affine = make_case(shape, rng)
        name = f"synth_{i:03d}.nii.gz"
        for folder, array in (("imagesTr", image), ("labelsTr", label)):
            path = os.path.join(root, folder, name)
            atomic_write(path, lambda tmp, a=array: nib.save(nib.Nifti1Image(a, affine), tmp), suffix=".nii.gz")
        entries.append({"image": f"imagesTr/{name}", "label": f"labelsTr/{name}"})
    content = {
        "name": "MaskSAM synthetic demo",
        "description": "ellipsoids of 3 classes on a noisy background (scripts/synthetic.py)",
        "labels": {str(k): n for k, n in enumerate(CLASS_NAMES)},
        "generator": params,
        "training": entries[: num_cases - num_val],
        "validation": entries[num_cases - num_val:],
    }
    atomic_write_text(datalist, json.dumps(content, indent=2) + "\n")
    logger.info(f"wrote {num_cases} synthetic volumes of shape {tuple(shape)} to {root}")
    return datalist


def _python() -> str:
    """How to call this Python on the command line: its short name when that resolves to it, else its path."""
    name = os.path.basename(sys.executable)
    found = shutil.which(name)
    return name if found and os.path.realpath(found) == os.path.realpath(sys.executable) else sys.executable


def demo_report(predictions: Sequence[str], datalist: str, class_names: Sequence[str], output_dir: str,
                ckpt_dir: str, bundle_root: str = ".", best_saver: Optional[object] = None, key: str = "validation") -> Dict:
    """The demo's last step: the evaluation report of its predictions (``evaluation/``: metrics, table and PNG
    overlays with titles and a legend), ``demo_dice.json``, and as the last lines the commands that run
    inference and evaluation with the model it just trained."""
    from .evaluation import report_label_maps

    output_dir, ckpt_dir = os.path.abspath(output_dir), os.path.abspath(ckpt_dir)
    report = report_label_maps(predictions, datalist, class_names, os.path.join(output_dir, "evaluation"), key=key,
                               overwrite=True, extra={"checkpoint": os.path.join(ckpt_dir, "model.pt")})
    summary = report.summary()
    validation = None
    if best_saver is not None and best_saver.best_epoch >= 0:
        validation = {"val_mean_dice": best_saver.best_metric, "epoch": best_saver.best_epoch}
    result = {
        "dice_definition": "per case and foreground class in the input image space (a class absent from the ground "
                           "truth is skipped), mean over cases per class, then over classes: the Dice of "
                           "`run evaluating` and evaluation/metrics.json",
        "mean_dice": summary["mean"]["dice"],
        "mean_per_class": {n: v["dice"] for n, v in summary["per_class"].items()},
        "per_case": {c["case"]: c["dice"] for c in summary["per_case"]},
        "validation_during_training": validation and {
            **validation, "definition": "MONAI MeanDice on the padded/resampled patch grid during training "
                                        "(selects models/model.pt); differs from mean_dice, which is in the image space"},
    }
    atomic_write_text(os.path.join(output_dir, "demo_dice.json"), json.dumps(result, indent=2) + "\n")
    print(report.table(summary), flush=True)
    py, data = _python(), os.path.abspath(os.path.dirname(datalist))
    example = load_images(datalist, key)[0]
    lines = [
        f"demo outputs in {output_dir}",
        f"  model: {ckpt_dir}/model.pt (+ model.json, its settings); predictions: {output_dir}/predictions/",
        f"  pictures: " + ", ".join(report.overlays),
        f"  Dice of the predictions (image space, as `run evaluating`): mean {result['mean_dice']:.4f} "
        + " ".join(f"{n} {v:.4f}" for n, v in result["mean_per_class"].items())
        + (f"; validation Dice during training (patch grid, selects the model): {validation['val_mean_dice']:.4f}"
           if validation else ""),
        f"Use the model it just trained (from {os.path.abspath(bundle_root)}; --tta_mirror false predicts as the demo "
        f"did, without it nnU-Net's test-time mirroring runs 8 passes per window):",
        f"  {py} -m monai.bundle run inference --config_file configs/inference.yaml --ckpt_dir {shlex.quote(ckpt_dir)} "
        f"--dataset_dir {shlex.quote(example)} --output_dir {shlex.quote(output_dir + '/my_inference')} --tta_mirror false",
        f"  {py} -m monai.bundle run evaluating --config_file \"['configs/train.yaml','configs/evaluate.yaml']\" "
        f"--ckpt_dir {shlex.quote(ckpt_dir)} --dataset_dir {shlex.quote(data)} --output_dir {shlex.quote(output_dir + '/my_evaluation')} "
        f"--tta_mirror false",
    ]
    print("\n".join(lines), flush=True)
    return result


def load_images(datalist: str, key: str) -> List[str]:
    from .data import load_datalist

    return [e["image"] for e in load_datalist(datalist, key)]


__all__ = ["CLASS_NAMES", "make_case", "make_demo_dataset", "demo_report", "load_images"]
