"""Proof of learning: overfit one fixed ACDC patch and watch the eval-mode segmentation of that patch.

The whole training chain runs as the bundle runs it — the bundle's preprocessing of the volume, the network,
the dataset mapping, the Hungarian matching, the loss terms, the optimiser and the eval-mode semantic output —
on one patch, again and again. Every iteration logs each loss term and the per-class Dice of the eval-mode
output on the patch; the run writes a JSON and a PNG learning curve (loss terms and Dice against iterations).

**The patch (a fixed rule, no choice by hand).** Over the training list of ``dataset.json``, the slab of D
consecutive slices in which every slice holds every class, maximising the smallest per-slice voxel count of any
foreground class (ties: dataset order, then lower slices). In-plane, the H x W window centred on the slab's
foreground centroid, clipped to the volume (the preprocessing pads volumes smaller than the patch). The volume
goes through the bundle's deterministic preprocessing (z-score over the volume; ``--spacing`` resamples first).

**Eval-mode Dice without a second forward pass.** The network computes the same thing in train and eval mode
(frozen SAM always runs in eval mode, the prompt generator's InstanceNorm keeps no running statistics, there is
no dropout), so the eval-mode output is :func:`scripts.network.semantic_probabilities` of the train-mode set
predictions. The script checks that claim on the last logged iteration against a real ``net.eval()`` forward pass
(max abs difference recorded in the JSON). The Dice logged at iteration i is that of the network after i
optimiser steps.

**Defaults are the bundle's recipe** (``configs/train.yaml`` + ``acdc.yaml``): SGD lr 1e-3, momentum 0.99,
Nesterov, weight decay 3e-5, poly 0.9 over ``--iterations``, gradient clipping at 12, the loss weights, 32768
sampled points. ``--optimizer adamw`` is the release's AMOS optimiser (weight decay 3e-5, ``configs/adamw.yaml``);
``--head-lr-scale`` gives
the randomly initialised parts (prompt generator, class head, class token, modality adapter) a larger learning
rate than the zero-initialised adapters.

    python bench/overfit_patch.py --backbone lite_medsam                       # the recipe, up to 60 minutes
    python bench/overfit_patch.py --backbone lite_medsam --optimizer adamw --lr 1e-3
    python bench/overfit_patch.py --backbone vit_t --image-size 64 --spacing 4 --num-queries 4 --iterations 300

CPU runs keep freed memory in the process (``scripts.settings.keep_freed_memory``; ``--default-malloc`` turns it
off): without it every iteration faults gigabytes of activations in afresh and the kernel's page-fault time
exceeds the compute.
"""

from __future__ import annotations

from common import ACDC_DIR, BUNDLE_ROOT, cpu_model_name, environment, write_json  # noqa: I001 (sets OMP)

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import nibabel as nib
import numpy as np
import torch

from scripts.loss import MaskSAMLoss
from scripts.loss.criterion import TERM_NAMES
from scripts.network import MaskSAM, semantic_probabilities
from scripts.settings import keep_freed_memory

STRUCTURES = ("RV", "Myo", "LV")
NUM_CLASSES = 4
THRESHOLDS = (0.5, 0.9)
# The parts built from scratch (random initialisation); the adapters start at zero and SAM is frozen.
FRESH_PREFIXES = ("prompt_generator.", "modality_adapter.", "decoder.class_head.", "decoder.global_class_token")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------- the patch
def choose_patch(dataset_dir: Path, depth: int, limit: Optional[int] = None) -> Dict:
    """The fixed patch rule of the module docstring; reads the training labels only."""
    datalist = json.loads((dataset_dir / "dataset.json").read_text())["training"][:limit]
    best: Optional[Dict] = None
    for order, item in enumerate(datalist):
        label = np.asarray(nib.load(str(dataset_dir / item["label"])).dataobj).astype(np.int64)
        counts = np.stack([(label == k).sum(axis=(0, 1)) for k in range(1, NUM_CLASSES)])  # (K-1, Z)
        for z in range(label.shape[2] - depth + 1):
            slab = counts[:, z:z + depth]
            score = int(slab.min())  # 0 unless every slice holds every foreground class
            if score > 0 and (best is None or score > best["score"]):
                fg = np.argwhere(label[:, :, z:z + depth] > 0)
                best = dict(score=score, order=order, image=item["image"], label=item["label"], z=z,
                            centroid=[float(c) for c in fg[:, :2].mean(0)])
    if best is None:
        raise RuntimeError(f"no {depth}-slice slab with every class on every slice in {dataset_dir}/dataset.json")
    return best


def load_patch(dataset_dir: Path, choice: Dict, size: int, depth: int, spacing: Optional[float]):
    """The bundle's deterministic preprocessing of the chosen volume, then the H x W x D window."""
    from scripts.transforms import deterministic_transforms
    from monai.transforms import Compose, NormalizeIntensityd

    pixdim = None if spacing is None else [spacing, spacing, 1.0]
    chain = Compose(deterministic_transforms(
        keys=["image", "label"], patch_size=[size, size, depth], num_classes=NUM_CLASSES,
        intensity=NormalizeIntensityd(keys="image", nonzero=False, channel_wise=True), pixdim=pixdim,
    ))
    data = chain({"image": str(dataset_dir / choice["image"]), "label": str(dataset_dir / choice["label"])})
    image, label = data["image"].as_tensor(), data["label"].as_tensor()  # (1, X, Y, Z), padded to the patch
    zoom = 1.0
    if spacing is not None:
        zoom = float(nib.load(str(dataset_dir / choice["label"])).header.get_zooms()[0]) / spacing
    starts = []
    for axis, centre in enumerate(choice["centroid"]):
        extent = image.shape[1 + axis]
        start = int(round(centre * zoom - size / 2))
        starts.append(min(max(start, 0), extent - size))
    (x0, y0), z0 = starts, choice["z"]
    window = (slice(None), slice(x0, x0 + size), slice(y0, y0 + size), slice(z0, z0 + depth))
    return image[window][None].float(), label[window][None].round().long(), dict(start=[x0, y0, z0])


# --------------------------------------------------------------------------------------------- the run
def dice_per_class(probabilities: torch.Tensor, label: torch.Tensor) -> List[float]:
    """Dice of argmax(probabilities) per foreground class; ``(1, K, H, W, D)`` vs ``(1, 1, H, W, D)``."""
    pred = probabilities.argmax(1)
    truth = label[:, 0]
    out = []
    for k in range(1, probabilities.shape[1]):
        p, t = pred == k, truth == k
        total = int(p.sum() + t.sum())
        out.append(1.0 if total == 0 else 2.0 * int((p & t).sum()) / total)
    return out


def build_optimizer(net: torch.nn.Module, name: str, lr: float, head_lr_scale: float, weight_decay: Optional[float]):
    fresh, adapters = [], []
    for pname, p in net.named_parameters():
        if p.requires_grad:
            (fresh if pname.startswith(FRESH_PREFIXES) else adapters).append(p)
    groups = [dict(params=adapters, lr=lr), dict(params=fresh, lr=lr * head_lr_scale)]
    if name == "sgd":  # the recipe (train.yaml)
        return torch.optim.SGD(groups, lr=lr, momentum=0.99, nesterov=True,
                               weight_decay=3e-5 if weight_decay is None else weight_decay)
    if name == "adamw":  # the release's AMOS optimiser (configs/amos.yaml, configs/adamw.yaml)
        return torch.optim.AdamW(groups, lr=lr, weight_decay=3e-5 if weight_decay is None else weight_decay)
    raise ValueError(f"--optimizer must be sgd or adamw, got {name!r}")


def first_crossings(history: List[Dict]) -> Dict:
    """Per class and threshold: the first logged iteration (and minutes) whose eval-mode Dice reaches it."""
    out = {}
    for c, name in enumerate(STRUCTURES):
        for threshold in THRESHOLDS:
            hit = next((h for h in history if h["dice"][c] >= threshold), None)
            out[f"{name}>={threshold}"] = None if hit is None else dict(iteration=hit["iteration"],
                                                                        minutes=round(hit["seconds"] / 60, 1))
    all_hit = next((h for h in history if min(h["dice"]) >= THRESHOLDS[-1]), None)
    out[f"all>={THRESHOLDS[-1]}"] = None if all_hit is None else dict(
        iteration=all_hit["iteration"], minutes=round(all_hit["seconds"] / 60, 1))
    return out


def run(args) -> Dict:
    torch.manual_seed(args.seed)
    dataset_dir = Path(args.dataset_dir)
    choice = choose_patch(dataset_dir, args.depth, args.limit_cases)
    image, label, where = load_patch(dataset_dir, choice, args.image_size, args.depth, args.spacing)
    present = [int((label == k).sum()) for k in range(NUM_CLASSES)]
    log(f"patch: {choice['image']} slices {choice['z']}..{choice['z'] + args.depth - 1}, window start {where['start']}, "
        f"voxels per class {present}")

    net = MaskSAM(backbone=args.backbone, num_classes=NUM_CLASSES, num_queries=args.num_queries,
                  num_slices=args.depth, image_size=args.image_size, sam_upsample=args.sam_upsample,
                  decoder_channels=args.decoder_channels)
    loss_fn = MaskSAMLoss(NUM_CLASSES, num_points=args.num_points, seed=args.seed)
    optimizer = build_optimizer(net, args.optimizer, args.lr, args.head_lr_scale, args.weight_decay)
    scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=args.iterations, power=0.9)
    params = [p for p in net.parameters() if p.requires_grad]

    history: List[Dict] = []
    start = time.perf_counter()
    deadline = start + 60 * args.minutes if args.minutes else math.inf
    for iteration in range(args.iterations + 1):
        net.train()
        sets = net.forward_sets(image)
        with torch.no_grad():
            probabilities = semantic_probabilities(sets["pred_logits"], sets["pred_masks"])
        dice = dice_per_class(probabilities, label)
        terms = loss_fn.criterion(sets, label)
        total = loss_fn.criterion.weighted_sum(terms)
        record = dict(iteration=iteration, seconds=round(time.perf_counter() - start, 1), dice=dice,
                      loss=total.item(), terms={k: round(v.item(), 4) for k, v in terms.items()},
                      lr=optimizer.param_groups[0]["lr"])
        history.append(record)
        log(f"it {iteration:4d} {record['seconds']:7.0f}s loss {record['loss']:.3f} "
            + " ".join(f"{k[5:]} {v:.3f}" for k, v in record["terms"].items())
            + " | Dice " + " ".join(f"{n} {d:.3f}" for n, d in zip(STRUCTURES, dice)))
        done = min(dice) >= args.stop_at if args.stop_at else False
        if iteration == args.iterations or done or time.perf_counter() > deadline:
            break
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        optimizer.step()
        scheduler.step()
        if iteration == 0:
            # From the second step on, once the optimiser state exists: allocated during the first step into the
            # holes the freed activations left, it would otherwise split the kept heap (fragmentation).
            keep_freed_memory(image.device, not args.default_malloc)

    # The claim of the docstring, checked on the last logged iteration (no step after it): a real eval-mode
    # forward pass gives the probabilities computed from the train-mode sets.
    net.eval()
    with torch.no_grad():
        eval_output = net(image)
    eval_check = float((eval_output - probabilities).abs().max())
    final_dice = dice_per_class(eval_output, label)
    return dict(
        environment={**environment(), "cpu_model": cpu_model_name()},
        args=vars(args), patch=dict(**choice, **where, voxels_per_class=present),
        eval_mode_check_max_abs_diff=eval_check,
        final_eval_forward_dice=dict(zip(STRUCTURES, final_dice)),
        last_logged_iteration=history[-1]["iteration"], minutes=round((time.perf_counter() - start) / 60, 1),
        crossings=first_crossings(history), history=history,
    )


# --------------------------------------------------------------------------------------------- the picture
def learning_curve_png(result: Dict, path: str) -> None:
    """Two panels against iterations: the loss terms (log scale) and the eval-mode Dice per class."""
    from PIL import Image, ImageDraw, ImageFont

    history = result["history"]
    width, height, margin = 560, 260, 46
    font = ImageFont.load_default(size=12)
    canvas = Image.new("RGB", (2 * width, height + 48), "white")
    draw = ImageDraw.Draw(canvas)
    last = max(history[-1]["iteration"], 1)
    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#000000"]

    def panel(x0: int, title: str, series: Dict[str, List[float]], lo: float, hi: float, log_scale: bool,
              guides: Sequence[float] = ()) -> None:
        def ty(v: float) -> float:
            v = min(max(v, lo), hi)
            f = (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)) if log_scale else (v - lo) / (hi - lo)
            return height - margin - f * (height - 2 * margin) + 20

        def tx(i: int) -> float:
            return x0 + margin + i / last * (width - 2 * margin)

        draw.rectangle([x0 + margin, 20 + margin, x0 + width - margin, height - margin + 20], outline="black")
        draw.text((x0 + margin, 4), title, fill="black", font=font)
        for v in ([lo, hi] if not log_scale else [10 ** e for e in range(int(math.floor(math.log10(lo))),
                                                                         int(math.ceil(math.log10(hi))) + 1)]):
            draw.text((x0 + 4, ty(v) - 6), f"{v:g}", fill="black", font=font)
        for v in guides:  # the thresholds the crossings are counted at
            draw.line([(tx(0), ty(v)), (tx(last), ty(v))], fill="#cccccc", width=1)
            draw.text((x0 + 4, ty(v) - 6), f"{v:g}", fill="#888888", font=font)
        draw.text((x0 + margin, height - margin + 24), "0", fill="black", font=font)
        draw.text((x0 + width - margin - 20, height - margin + 24), f"{last} it", fill="black", font=font)
        for n, (name, values) in enumerate(series.items()):
            points = [(tx(h["iteration"]), ty(v)) for h, v in zip(history, values)]
            if len(points) > 1:
                draw.line(points, fill=colours[n % len(colours)], width=2)
            draw.text((x0 + margin + 95 * (n % 5), height - margin + 38 + 13 * (n // 5)), name,
                      fill=colours[n % len(colours)], font=font)

    terms = {name[5:]: [max(h["terms"][name], 1e-4) for h in history] for name in TERM_NAMES}
    terms["total"] = [max(h["loss"], 1e-4) for h in history]
    panel(0, "loss terms (log)", terms, 1e-3, 10.0, True)
    dice = {name: [h["dice"][c] for h in history] for c, name in enumerate(STRUCTURES)}
    panel(width, "eval-mode Dice on the patch", dice, 0.0, 1.0, False, guides=THRESHOLDS)
    canvas.save(path, format="PNG")


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="lite_medsam", choices=("lite_medsam", "vit_t"))
    parser.add_argument("--image-size", type=int, default=256, help="in-plane patch side H = W (recipe: 256)")
    parser.add_argument("--depth", type=int, default=4, help="D, slices per patch (recipe: 4)")
    parser.add_argument("--sam-upsample", type=int, default=1, help="1 for lite_medsam at 256")
    parser.add_argument("--spacing", type=float, default=None, help="in-plane mm to resample to (recipe: voxel space)")
    parser.add_argument("--num-queries", type=int, default=8, help="N (recipe: 8)")
    parser.add_argument("--decoder-channels", type=int, nargs="+", default=None, help="recipe: the release's")
    parser.add_argument("--num-points", type=int, default=32768, help="sampled points per mask (acdc.yaml: 32768)")
    parser.add_argument("--optimizer", default="sgd", choices=("sgd", "adamw"))
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--head-lr-scale", type=float, default=1.0,
                        help="learning-rate factor for the randomly initialised parts (recipe: 1)")
    parser.add_argument("--weight-decay", type=float, default=None, help="sgd 3e-5 (recipe), adamw 3e-5 (the release)")
    parser.add_argument("--grad-clip", type=float, default=12.0)
    parser.add_argument("--iterations", type=int, default=500, help="the poly schedule's length and the cap")
    parser.add_argument("--minutes", type=float, default=60.0, help="stop after this many minutes (0: no limit)")
    parser.add_argument("--stop-at", type=float, default=None, help="stop once every class's Dice reaches this")
    parser.add_argument("--default-malloc", action="store_true",
                        help="glibc's default (freed memory returned to the system); default: keep_freed_memory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dataset-dir", default=str(ACDC_DIR))
    parser.add_argument("--limit-cases", type=int, default=None, help="search the first N training cases only")
    parser.add_argument("--json", default=None)
    parser.add_argument("--png", default=None)
    args = parser.parse_args(argv)

    result = run(args)
    crossings = result["crossings"]
    log("first iteration (minutes) reaching: " + ", ".join(
        f"{k} {'never' if v is None else str(v['iteration']) + ' (' + str(v['minutes']) + ' min)'}"
        for k, v in crossings.items()))
    log(f"final eval forward Dice: {result['final_eval_forward_dice']}; eval-mode check max abs diff "
        f"{result['eval_mode_check_max_abs_diff']:.2e}")
    write_json(args.json, result)
    if args.png:
        learning_curve_png(result, args.png)
    return result


if __name__ == "__main__":
    main()
