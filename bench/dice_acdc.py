"""Dice on real data under an equal budget: MaskSAM against DynUNet (nnU-Net-like) on ACDC.

Both models get the same transforms, the same patch, the same data order (seeded) and the same wall-clock
training budget on the ACDC training split (``dataset.json`` key ``training``, 70 patients), then are evaluated
with the same sliding-window inference on the validation patients (key ``validation``, 10 patients; per-class
Dice for RV, Myo, LV and their mean). Each model keeps its own published optimiser settings: MaskSAM the
paper's (SGD 0.99 Nesterov, lr 1e-3, poly 0.9), DynUNet nnU-Net's (same SGD, lr 1e-2); the poly schedule runs
over the budget (elapsed fraction of the wall-clock budget or of ``--max-iters``, whichever is larger).

Recipes:

* ``--recipe cpu`` (default): LiteMedSAM backbone, batch 1, the budget given by ``--train-seconds`` per model.
  On a 2-core CPU this is a handful of MaskSAM iterations — a check that the pipeline trains and evaluates on
  real data, not a reproduction of the paper.
* ``--recipe paper``: the paper's ACDC recipe for ``vit_b`` (×4 up to 1024, batch 2, 500 × 250 iterations, AMP);
  needs a GPU and the official ``sam_vit_b_01ec64.pth`` (``--checkpoint``).

Usage (repo root)::

    python bench/dice_acdc.py --train-seconds 300 --val-frames frame01 --sw-overlap 0 \\
        --json bench/results/dice_acdc_cpu.json
    python bench/dice_acdc.py --recipe paper --checkpoint /path/sam_vit_b_01ec64.pth --json dice_gpu.json
    python bench/dice_acdc.py --tiny --json /tmp/dice_tiny.json          # CI smoke size (vit_t, 64x64x2)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402  (sets OMP_WAIT_POLICY before torch is imported)
    ACDC_DIR, PeakMemory, build_dynunet, cpu_model_name, deep_supervised_dice_ce, environment, masksam_loss,
    sgd, train_step, write_json,
)

import numpy as np  # noqa: E402
import torch  # noqa: E402

CLASS_NAMES = ("RV", "Myo", "LV")
NUM_CLASSES = 4


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------------- data
def deterministic_chain(patch, keys=("image", "label")):
    """Load + channel-first + per-volume z-score (+ pad to the patch). Uses the bundle's own preprocessing
    (``scripts.transforms.deterministic_transforms``) when it is there, else an equivalent MONAI chain."""
    from monai.transforms import EnsureChannelFirstd, EnsureTyped, LoadImaged, NormalizeIntensityd, SpatialPadd

    intensity = NormalizeIntensityd(keys="image", channel_wise=True)
    try:
        from scripts.transforms import deterministic_transforms

        chain = deterministic_transforms(keys=list(keys), patch_size=list(patch), num_classes=NUM_CLASSES,
                                         intensity=intensity)
        return chain, "scripts.transforms.deterministic_transforms"
    except (ImportError, TypeError, AttributeError):
        keys = list(keys)
        return [
            LoadImaged(keys=keys, image_only=True),
            EnsureChannelFirstd(keys=keys),
            intensity,
            EnsureTyped(keys=keys, dtype=torch.float32),
            SpatialPadd(keys=keys, spatial_size=list(patch)),
        ], "bench-local MONAI chain (load, channel-first, z-score, pad)"


def train_transforms(patch, batch: int):
    from monai.transforms import (Compose, RandCropByLabelClassesd, RandFlipd, RandGaussianNoised,
                                  RandScaleIntensityd)

    chain, source = deterministic_chain(patch)
    chain = chain + [
        # Class-balanced crops (RV, Myo, LV and background equally likely as crop centres).
        RandCropByLabelClassesd(keys=["image", "label"], label_key="label", spatial_size=list(patch),
                                num_classes=NUM_CLASSES, ratios=[1] * NUM_CLASSES, num_samples=batch),
        RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=0),
        RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=1),
        RandScaleIntensityd(keys="image", factors=0.25, prob=0.15),
        RandGaussianNoised(keys="image", std=0.1, prob=0.1),
    ]
    return Compose(chain), source


def datalist(data_dir: Path, key: str, frames: str, limit: Optional[int]) -> List[Dict]:
    from monai.data import load_decathlon_datalist

    items = load_decathlon_datalist(str(data_dir / "dataset.json"), True, key, base_dir=str(data_dir))
    if frames != "all":
        items = [d for d in items if frames in Path(d["image"]).name]
    return items[:limit] if limit else items


# --------------------------------------------------------------------------------------------- models
def build(model_name: str, args):
    patch = args.patch
    if model_name == "dynunet":
        model, plan = build_dynunet(patch, NUM_CLASSES, tiny=args.tiny)
        return model, deep_supervised_dice_ce(NUM_CLASSES), args.lr_dynunet, {"strides": plan["strides"],
                                                                              "filters": plan["filters"]}
    from scripts import MaskSAM

    up = args.sam_upsample or {"lite_medsam": 1, "vit_t": 1}.get(model_name, 4)
    model = MaskSAM(backbone=model_name, checkpoint=args.checkpoint, num_classes=NUM_CLASSES,
                    num_queries=args.num_queries, num_slices=patch[2], image_size=patch[0], sam_upsample=up,
                    use_checkpoint=args.use_checkpoint)
    return model, masksam_loss(NUM_CLASSES), args.lr_masksam, {"backbone": model_name, "sam_upsample": up,
                                                              "num_queries": args.num_queries,
                                                              **model.parameter_counts()}


def start_rss_guard(limit_gib: float, output: Dict, json_path: Optional[str]) -> None:
    """Stop this process (after saving what was measured) if its RSS passes ``limit_gib``, instead of letting
    the kernel's OOM killer pick a process on a shared machine."""
    import os
    import threading

    def watch() -> None:
        while True:
            rss = PeakMemory.rss_bytes() / 1024**3
            if rss > limit_gib:
                output["stopped"] = f"process RSS {rss:.1f} GiB passed the {limit_gib:.1f} GiB guard"
                write_json(json_path, output)
                log(f"dice_acdc: {output['stopped']}; stopping")
                os._exit(3)
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()


def plain(x: torch.Tensor) -> torch.Tensor:
    """MetaTensor -> torch.Tensor (the batch's metadata is not needed here and MetaTensor slicing of a batch
    with per-crop metadata fails inside the set criterion)."""
    return x.as_tensor() if hasattr(x, "as_tensor") else x


def poly_lr(optimiser, base_lr: float, progress: float) -> None:
    for group in optimiser.param_groups:
        group["lr"] = base_lr * (1 - min(progress, 0.999)) ** 0.9


def train(model, loss_fn, lr: float, loader, args, device) -> Dict:
    optimiser = sgd(model, lr)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp)
    model.train()
    t0 = time.perf_counter()
    it, losses = 0, []
    budget = args.train_seconds
    done = False
    while not done:
        for batch in loader:
            elapsed = time.perf_counter() - t0
            progress = max(elapsed / budget if budget else 0.0, it / args.max_iters if args.max_iters else 0.0)
            if progress >= 1:
                done = True
                break
            poly_lr(optimiser, lr, progress)
            image, label = plain(batch["image"]).to(device), plain(batch["label"]).to(device)
            loss = train_step(model, loss_fn, optimiser, scaler, image, label, args.amp)
            it += 1
            losses.append(float(loss.detach()))
            if it <= 3 or it % args.log_every == 0:
                log(f"  iter {it}: loss {losses[-1]:.4f}  ({time.perf_counter() - t0:.0f} s)")
    wall = time.perf_counter() - t0
    return {"iterations": it, "train_wall_s": round(wall, 3), "samples": it * args.batch,
            "s_per_iter": round(wall / max(it, 1), 2), "loss_first": losses[0] if losses else None,
            "loss_last_10_mean": round(float(np.mean(losses[-10:])), 4) if losses else None}


def evaluate(model, items, args, device, is_masksam: bool) -> Dict:
    from monai.data import DataLoader, Dataset
    from monai.inferers import sliding_window_inference
    from monai.metrics import DiceMetric
    from monai.networks.utils import one_hot
    from monai.transforms import Compose, EnsureChannelFirstd, EnsureTyped, LoadImaged, NormalizeIntensityd

    xforms = [LoadImaged(keys=["image", "label"], image_only=True), EnsureChannelFirstd(keys=["image", "label"]),
              NormalizeIntensityd(keys="image", channel_wise=True),
              EnsureTyped(keys=["image", "label"], dtype=torch.float32)]
    if args.val_crop:  # smoke runs only: a centre crop keeps the number of windows small
        from monai.transforms import CenterSpatialCropd

        xforms.append(CenterSpatialCropd(keys=["image", "label"], roi_size=args.val_crop))
    chain = Compose(xforms)
    loader = DataLoader(Dataset(items, chain), batch_size=1, num_workers=0)
    metric = DiceMetric(include_background=False, reduction="none")
    model.eval()
    per_case, t0 = [], time.perf_counter()
    for i, batch in enumerate(loader):
        image, label = plain(batch["image"]).to(device), plain(batch["label"]).to(device)
        t = time.perf_counter()
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda"
                                             else torch.bfloat16, enabled=args.amp):
            out = sliding_window_inference(image, args.patch, 1, model, overlap=args.sw_overlap, mode="gaussian")
        pred = out.float().argmax(1, keepdim=True)  # MaskSAM: probabilities; DynUNet: logits — argmax either way
        dice = metric(one_hot(pred, NUM_CLASSES), one_hot(label.long(), NUM_CLASSES))[0].cpu().numpy()
        name = Path(items[i]["image"]).name.replace(".nii.gz", "")
        per_case.append({"case": name, "shape": list(image.shape[2:]), "seconds": round(time.perf_counter() - t, 1),
                         **{c: round(float(v), 4) for c, v in zip(CLASS_NAMES, dice)}})
        log(f"  eval {i + 1}/{len(items)} {name} {list(image.shape[2:])}: "
            + " ".join(f"{c} {v:.3f}" for c, v in zip(CLASS_NAMES, dice)) + f" ({per_case[-1]['seconds']} s)")
    means = {c: round(float(np.nanmean([p[c] for p in per_case])), 4) for c in CLASS_NAMES}
    means["mean"] = round(float(np.mean([means[c] for c in CLASS_NAMES])), 4)
    return {"dice": means, "per_case": per_case, "eval_wall_s": round(time.perf_counter() - t0, 3)}


# --------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", choices=("cpu", "paper"), default="cpu")
    ap.add_argument("--models", help="comma-separated; default: lite_medsam,dynunet (paper: vit_b,dynunet)")
    ap.add_argument("--data-dir", type=Path, default=ACDC_DIR)
    ap.add_argument("--train-seconds", type=float, help="wall-clock training budget per model (cpu default 300)")
    ap.add_argument("--max-iters", type=int, help="iteration cap per model (paper: 500 x 250)")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--patch", type=lambda s: [int(v) for v in s.split(",")], help="H,W,D (default 256,256,4)")
    ap.add_argument("--num-queries", type=int, default=8)
    ap.add_argument("--sam-upsample", type=int)
    ap.add_argument("--checkpoint", help="official SAM checkpoint for vit_b/l/h")
    ap.add_argument("--use-checkpoint", action="store_true", help="activation checkpointing in the encoder")
    ap.add_argument("--amp", action="store_true")
    ap.add_argument("--lr-masksam", type=float, default=1e-3)
    ap.add_argument("--lr-dynunet", type=float, default=1e-2)
    ap.add_argument("--val-frames", default="all", help="all, frame01 or frame02 (one frame per patient)")
    ap.add_argument("--val-limit", type=int, help="evaluate only the first N validation volumes")
    ap.add_argument("--train-limit", type=int, help="train on the first N training volumes only")
    ap.add_argument("--sw-overlap", type=float, default=0.5)
    ap.add_argument("--val-crop", type=lambda s: [int(v) for v in s.split(",")],
                    help="centre-crop validation volumes to H,W,D (smoke runs; -1 keeps an axis)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="CI smoke size: vit_t, 64x64x2 patch, seconds of training")
    ap.add_argument("--max-rss-gib", type=float, help="stop if this process passes it (default 80%% of free RAM)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    if args.recipe == "paper":
        args.models = args.models or "vit_b,dynunet"
        args.batch = args.batch or 2
        args.max_iters = args.max_iters or 500 * 250
        args.train_seconds = args.train_seconds or 0  # no wall-clock cap: the iteration count ends training
        args.amp = True
        if not args.checkpoint:
            log("warning: the paper recipe starts from sam_vit_b_01ec64.pth; pass --checkpoint")
    if args.tiny:
        args.models = args.models or "vit_t,dynunet"
        args.patch = args.patch or [64, 64, 2]
        args.num_queries = 5
        args.train_seconds = args.train_seconds or 5
        args.val_limit = args.val_limit or 1
        args.val_crop = args.val_crop or [64, 64, 4]
        args.sw_overlap = 0.0
        args.train_limit = args.train_limit or 4
    args.models = args.models or "lite_medsam,dynunet"
    args.patch = args.patch or [256, 256, 4]
    args.batch = args.batch or 1
    if args.train_seconds is None:
        args.train_seconds = 300
    device = torch.device(args.device)

    from monai.data import DataLoader, Dataset, list_data_collate
    from monai.utils import set_determinism

    train_items = datalist(args.data_dir, "training", "all", args.train_limit)
    val_items = datalist(args.data_dir, "validation", args.val_frames, args.val_limit)
    env = environment()
    env["cpu_model"] = cpu_model_name()
    output = {"environment": env, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "train_volumes": len(train_items), "val_volumes": len(val_items),
              "val_patients": len({Path(d["image"]).name.split("_")[0] for d in val_items}), "models": {}}
    from speed_memory import available_gib

    max_rss = args.max_rss_gib or round(0.8 * available_gib(), 1)
    output["max_rss_gib"] = max_rss
    start_rss_guard(max_rss, output, args.json)
    log(f"dice_acdc: {args.models} | train {len(train_items)} volumes, {args.train_seconds:.0f} s"
        f"{f' / {args.max_iters} iters' if args.max_iters else ''} per model | eval {len(val_items)} volumes "
        f"({output['val_patients']} patients), overlap {args.sw_overlap} | load {env.get('load_avg_1_5_15')}")

    for name in args.models.split(","):
        set_determinism(args.seed)
        transforms, source = train_transforms(args.patch, args.batch)
        output["transforms"] = source
        loader = DataLoader(Dataset(train_items, transforms), batch_size=1, shuffle=True, num_workers=0,
                            collate_fn=list_data_collate)
        model, loss_fn, lr, config = build(name, args)
        model = model.to(device)
        log(f"\n== {name}: lr {lr}, {config}")
        with PeakMemory(device) as mem:
            train_stats = train(model, loss_fn, lr, loader, args, device)
        result = {"config": config, "lr": lr, **train_stats, "peak_train_gib": mem.gib}
        output["models"][name] = result
        write_json(args.json, output)
        result.update(evaluate(model, val_items, args, device, name != "dynunet"))
        write_json(args.json, output)
        log(f"   {name}: " + " ".join(f"{k} {v:.4f}" for k, v in result["dice"].items())
            + f" | {train_stats['iterations']} iters in {train_stats['train_wall_s']} s, eval {result['eval_wall_s']} s")
        del model, loss_fn
    log("\nmodel          iters   RV      Myo     LV      mean")
    for name, r in output["models"].items():
        d = r["dice"]
        log(f"{name:14s} {r['iterations']:5d}   {d['RV']:.4f}  {d['Myo']:.4f}  {d['LV']:.4f}  {d['mean']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
