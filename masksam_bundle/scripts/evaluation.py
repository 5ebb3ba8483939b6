"""Evaluation report: per-case / per-class Dice and HD95, ``metrics.json``, ``metrics.csv``, a printed table
and PNG overlays (image | ground truth | prediction, titled, with a legend of the class names) of the worst and
best cases.

``EvaluationReport`` is an evaluator handler; it expects decollated outputs with one-hot ``pred`` and
``label`` (K, H, W, D) in the original image space (``Invertd`` + ``AsDiscreted`` in the postprocessing).
:func:`report_label_maps` runs the same report on label-map files (the demo), so every Dice the bundle reports
after training has one definition: per case and foreground class in the input image space, a class absent
from the ground truth skipped (NaN), averaged over cases per class, then over classes.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import warnings
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.metrics import compute_dice, compute_hausdorff_distance

from .cli import parse_flag
from .data import strip_nifti_suffix
from .files import atomic_write, atomic_write_text, ensure_writable_dir

logger = logging.getLogger("masksam.evaluate")

# one colour per class (index 0 = background, transparent); cycles for K > 12
PALETTE = [(0, 0, 0), (230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (245, 130, 48),
           (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128)]


def _nan_to_none(value):
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _spacing(meta_tensor) -> Optional[List[float]]:
    affine = getattr(meta_tensor, "affine", None)
    if affine is None:
        return None
    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    return np.linalg.norm(a, axis=0).tolist()


def colorize(label2d: np.ndarray) -> np.ndarray:
    rgb = np.zeros(label2d.shape + (3,), dtype=np.uint8)
    for k in np.unique(label2d):
        if k > 0:
            rgb[label2d == k] = class_color(k)
    return rgb


def class_color(k: int) -> tuple:
    return PALETTE[1 + (int(k) - 1) % (len(PALETTE) - 1)]


def overlay_png(image2d: np.ndarray, gt2d: np.ndarray, pred2d: np.ndarray, path: str, alpha: float = 0.5,
                scale: int = 2, title: str = "", class_names: Optional[Sequence[str]] = None) -> str:
    """Save image | image+ground truth | image+prediction side by side (one colour per class), with ``title``
    above, the panel names, and a legend of ``class_names`` (background first) below."""
    from PIL import Image, ImageDraw, ImageFont  # pillow: requirements.txt

    img = np.asarray(image2d, dtype=np.float64)
    lo, hi = np.percentile(img, [0.5, 99.5]) if img.size else (0.0, 1.0)
    gray = np.clip((img - lo) / max(hi - lo, 1e-8), 0, 1)
    gray = (np.stack([gray] * 3, -1) * 255).astype(np.float64)

    def blend(label):
        color = colorize(label).astype(np.float64)
        mask = (label > 0)[..., None]
        return np.where(mask, (1 - alpha) * gray + alpha * color, gray)

    panels = [gray, blend(gt2d), blend(pred2d)]
    # array axes are (X, Y): show X horizontally as radiologists' viewers do for axial slices
    tiles = [Image.fromarray(np.transpose(p, (1, 0, 2)).clip(0, 255).astype(np.uint8)) for p in panels]
    tiles = [t.resize((t.width * scale, t.height * scale), Image.NEAREST) for t in tiles]
    font = ImageFont.load_default(size=14)
    line, gap = 20, 4
    names = list(class_names or [])
    present = sorted({int(k) for k in np.unique(np.concatenate([np.ravel(gt2d), np.ravel(pred2d)])) if k > 0}
                     | set(range(1, len(names))))
    width = sum(t.width for t in tiles) + gap * 2
    legend_rows, row, x = [], [], 0
    for k in present:  # wrap the legend to the picture's width
        label = names[k] if k < len(names) else f"class {k}"
        w = 16 + 6 + int(font.getlength(label)) + 16
        if row and x + w > width:
            legend_rows.append(row)
            row, x = [], 0
        row.append((k, label))
        x += w
    if row:
        legend_rows.append(row)
    top = line * (2 if title else 1)
    canvas = Image.new("RGB", (width, top + tiles[0].height + line * max(1, len(legend_rows)) + gap), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 2), title, fill="black", font=font)
    x = 0
    for tile, name in zip(tiles, ("image", "ground truth", "prediction")):
        draw.text((x + 4, top - line + 2), name, fill="black", font=font)
        canvas.paste(tile, (x, top))
        x += tile.width + gap
    y = top + tiles[0].height + gap
    for row in legend_rows:
        x = 4
        for k, label in row:
            draw.rectangle([x, y + 2, x + 14, y + 16], fill=class_color(k), outline="black")
            draw.text((x + 20, y + 1), label, fill="black", font=font)
            x += 16 + 6 + int(font.getlength(label)) + 16
        y += line
    return atomic_write(path, lambda tmp: canvas.save(tmp, format="PNG"))


def prepare_evaluation_output(output_dir: str, overwrite: bool = False) -> str:
    """Before the network, checkpoint and data are loaded: ``output_dir`` must be writable and must not hold a
    previous report (unless ``overwrite``). ``EvaluationReport`` checks again when the evaluator starts."""
    overwrite = parse_flag(overwrite, "overwrite")
    ensure_writable_dir(output_dir, "output_dir")
    existing = [os.path.join(output_dir, n) for n in ("metrics.json", "metrics.csv")
                if os.path.exists(os.path.join(output_dir, n))]
    if existing and not overwrite:
        raise FileExistsError(f"evaluation report exists: {existing}; pass overwrite=true or another output_dir")
    return str(output_dir)


class EvaluationReport:
    """Collect per-case metrics while the evaluator runs; write the report when it completes.

    Args:
        output_dir: where ``metrics.json``, ``metrics.csv`` and ``overlays/`` go.
        class_names: K names, background first.
        num_overlays: how many worst and how many best cases get a PNG overlay.
        overwrite: replace an existing report (otherwise refused before evaluation starts).
        extra: additional fields for ``metrics.json`` (e.g. checkpoint and datalist paths).
    """

    def __init__(self, output_dir: str, class_names: Sequence[str], num_overlays: int = 2,
                 overwrite: bool = False, extra: Optional[Dict] = None, hd_percentile: float = 95.0) -> None:
        self.output_dir, self.class_names = str(output_dir), list(class_names)
        self.fg_names = self.class_names[1:]
        self.num_overlays, self.overwrite, self.extra = int(num_overlays), parse_flag(overwrite, "overwrite"), dict(extra or {})
        self.hd_percentile = hd_percentile
        self.cases: List[Dict] = []
        self._slices: Dict[str, tuple] = {}
        self.json_path = os.path.join(self.output_dir, "metrics.json")
        self.csv_path = os.path.join(self.output_dir, "metrics.csv")

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self._completed)

    def _started(self, engine: Engine) -> None:
        ensure_writable_dir(self.output_dir, "output_dir")
        existing = [p for p in (self.json_path, self.csv_path) if os.path.exists(p)]
        if existing and not self.overwrite:
            raise FileExistsError(f"evaluation report exists: {existing}; pass overwrite=true or another output_dir")
        self.cases, self._slices = [], {}

    def _iteration_completed(self, engine: Engine) -> None:
        outputs = engine.state.output
        if isinstance(outputs, dict):
            raise TypeError("EvaluationReport needs decollated evaluator outputs (decollate=True)")
        for item in outputs:
            self.add_case(item)

    def add_case(self, item: Dict) -> Dict:
        pred, label = torch.as_tensor(item["pred"]).float(), torch.as_tensor(item["label"]).float()
        k = len(self.class_names)
        if pred.shape[0] != k or label.shape[0] != k or pred.shape != label.shape:
            raise ValueError(f"EvaluationReport: pred {tuple(pred.shape)} / label {tuple(label.shape)} must be "
                             f"one-hot with K={k} channels and equal shapes")
        image = item.get("image")
        filename = str(getattr(image, "meta", {}).get("filename_or_obj", f"case{len(self.cases)}"))
        case = strip_nifti_suffix(filename)
        dice = compute_dice(pred[None], label[None], include_background=False, ignore_empty=True)[0].tolist()
        spacing = _spacing(image) if image is not None else None
        with warnings.catch_warnings():  # a class missing from prediction or ground truth: NaN, documented
            warnings.filterwarnings("ignore", message=r"the (prediction|ground truth) of class \d+ is all 0")
            # MONAI 1.6's own Hausdorff code passes an argument it deprecated (always_return_as_numpy)
            warnings.filterwarnings("ignore", message=r".*always_return_as_numpy", category=FutureWarning)
            hd = compute_hausdorff_distance(pred[None], label[None], include_background=False,
                                            percentile=self.hd_percentile, spacing=spacing)[0].tolist()
        row = {
            "case": case,
            "image": filename,
            "dice": dict(zip(self.fg_names, [float(v) for v in dice])),
            "hd95": dict(zip(self.fg_names, [float(v) if math.isfinite(v) else float("nan") for v in hd])),
        }
        row["mean_dice"] = _nanmean(list(row["dice"].values()))
        row["mean_hd95"] = _nanmean(list(row["hd95"].values()))
        self.cases.append(row)
        if image is not None and self.num_overlays > 0:
            gt = label.argmax(0).numpy()
            z = int(np.argmax((gt > 0).reshape(-1, gt.shape[-1]).sum(0)))
            self._slices[case] = (torch.as_tensor(image)[0, ..., z].numpy(), gt[..., z], pred.argmax(0).numpy()[..., z], z)
        logger.info(f"{case}: Dice " + " ".join(f"{n} {v:.4f}" for n, v in row["dice"].items())
                    + " | HD95 " + " ".join(f"{n} {v:.2f}" for n, v in row["hd95"].items()))
        return row

    def summary(self) -> Dict:
        per_class = {n: {"dice": _nanmean([c["dice"][n] for c in self.cases]),
                         "hd95": _nanmean([c["hd95"][n] for c in self.cases])} for n in self.fg_names}
        return {
            **self.extra,
            "num_cases": len(self.cases),
            "class_names": self.class_names,
            "mean": {"dice": _nanmean([v["dice"] for v in per_class.values()]),
                     "hd95": _nanmean([v["hd95"] for v in per_class.values()])},
            "per_class": per_class,
            "per_case": self.cases,
            "notes": "Dice/HD95 per foreground class in the input image space; HD95 in mm from the affine "
                     "(voxels for identity affines); NaN/null where a class is absent from the ground truth "
                     "(Dice) or from the prediction or ground truth (HD95); means ignore NaN.",
        }

    def table(self, summary: Dict) -> str:
        """Dice per case and class (full class names as column headers), then the mean Dice and HD95 rows."""
        width = max([len(c["case"]) for c in self.cases] + [9])
        names = self.fg_names
        cols = [max(len(n), 8) for n in names]
        header = f"{'case':<{width}} " + " ".join(f"{n:>{w}}" for n, w in zip(names, cols)) + f" {'mean':>8}"
        lines = ["Dice per case (HD95 in mm)", header]
        for c in self.cases:
            lines.append(f"{c['case']:<{width}} " + " ".join(f"{c['dice'][n]:>{w}.4f}" for n, w in zip(names, cols))
                         + f" {c['mean_dice']:>8.4f}")
        pc = summary["per_class"]
        lines.append(f"{'MEAN Dice':<{width}} " + " ".join(f"{pc[n]['dice']:>{w}.4f}" for n, w in zip(names, cols))
                     + f" {summary['mean']['dice']:>8.4f}")
        lines.append(f"{'MEAN HD95':<{width}} " + " ".join(f"{pc[n]['hd95']:>{w}.2f}" for n, w in zip(names, cols))
                     + f" {summary['mean']['hd95']:>8.2f}")
        return "\n".join(lines)

    def write(self) -> Dict:
        summary = self.summary()
        atomic_write_text(self.json_path, json.dumps(_nan_to_none(summary), indent=2) + "\n")
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["case", "image"] + [f"dice_{n}" for n in self.fg_names] + ["mean_dice"]
                        + [f"hd95_{n}" for n in self.fg_names] + ["mean_hd95"])
        for c in self.cases:
            writer.writerow([c["case"], c["image"]] + [f"{c['dice'][n]:.6f}" for n in self.fg_names]
                            + [f"{c['mean_dice']:.6f}"] + [f"{c['hd95'][n]:.4f}" for n in self.fg_names]
                            + [f"{c['mean_hd95']:.4f}"])
        atomic_write_text(self.csv_path, buf.getvalue())
        ranked = sorted(self.cases, key=lambda c: (c["mean_dice"] if math.isfinite(c["mean_dice"]) else -1.0))
        picks = [("worst", c) for c in ranked[: self.num_overlays]]
        picks += [("best", c) for c in ranked[::-1][: self.num_overlays] if c not in ranked[: self.num_overlays]]
        self.overlays = []
        for tag, c in picks:
            if c["case"] in self._slices:
                img, gt, pr, z = self._slices[c["case"]]
                dice = " ".join(f"{n} {v:.2f}" for n, v in c["dice"].items())
                title = f"{c['case']} slice z={z} ({tag}): mean Dice {c['mean_dice']:.3f} | {dice}"
                path = os.path.join(self.output_dir, "overlays", f"{tag}_{c['case']}_z{z}.png")
                self.overlays.append(overlay_png(img, gt, pr, path, title=title, class_names=self.class_names))
        return summary

    def _completed(self, engine: Engine) -> None:
        if not self.cases:
            raise RuntimeError("evaluation saw no cases")
        summary = self.write()
        print(self.table(summary), flush=True)
        logger.info(f"wrote {self.json_path}, {self.csv_path} and overlays in {self.output_dir}/overlays")


def report_label_maps(predictions: Sequence[str], datalist: str, class_names: Sequence[str], output_dir: str,
                      key: str = "validation", postfix: str = "_seg", overwrite: bool = False,
                      extra: Optional[Dict] = None) -> EvaluationReport:
    """The evaluation report (metrics.json/csv, overlays, table) of written label maps against the ``key``
    labels of ``datalist`` -- the same Dice and HD95 as ``run evaluating``, computed from files."""
    import nibabel as nib
    from monai.data import MetaTensor

    from .data import load_datalist

    labels = {strip_nifti_suffix(e["image"]): e for e in load_datalist(datalist, key)}
    report = EvaluationReport(output_dir, class_names, num_overlays=len(predictions), overwrite=overwrite, extra=extra)
    report._started(None)
    k = len(class_names)
    for pred_path in predictions:
        case = strip_nifti_suffix(pred_path)
        case = case[: -len(postfix)] if postfix and case.endswith(postfix) else case
        if case not in labels:
            raise KeyError(f"prediction {pred_path!r} has no case {case!r} in {datalist} [{key}]")
        image_nii = nib.load(labels[case]["image"])
        pred = torch.as_tensor(np.asarray(nib.load(pred_path).dataobj), dtype=torch.long)
        gt = torch.as_tensor(np.asarray(nib.load(labels[case]["label"]).dataobj), dtype=torch.long)
        one_hot = lambda x: torch.nn.functional.one_hot(x.clamp(0, k - 1), k).movedim(-1, 0).float()  # noqa: E731
        image = MetaTensor(torch.as_tensor(np.asarray(image_nii.dataobj), dtype=torch.float32)[None],
                           affine=torch.as_tensor(image_nii.affine), meta={"filename_or_obj": labels[case]["image"]})
        report.add_case({"pred": one_hot(pred), "label": one_hot(gt), "image": image})
    report.write()
    return report


__all__ = [
    "colorize",
    "class_color",
    "overlay_png",
    "prepare_evaluation_output",
    "EvaluationReport",
    "report_label_maps",
]
