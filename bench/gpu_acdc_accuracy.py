"""One-shot GPU accuracy run on ACDC (fits in 9 minutes on one H100/H200): our first trained MaskSAM weights.

1. Reads the bundle's own recipe — ``configs/train.yaml`` + ``configs/acdc.yaml`` + ``configs/adamw.yaml`` (AdamW:
   in a run of minutes the paper's SGD leaves the final masks where they started; ``--optimizer sgd`` drops it)
   (+ ``evaluate.yaml`` for the
   evaluation transforms and test-time mirroring) through ``monai.bundle.ConfigParser`` — with the
   ``lite_medsam`` backbone (256 frame, ``sam_upsample 1``): network, loss, optimiser settings, class-balanced
   patch sampling and the nnU-Net augmentation chain, so recipe changes in the configs reach this run.
2. Trains on the ACDC training split (70 patients) with AMP for a fixed wall-clock budget (``--train-seconds``);
   the poly learning-rate schedule runs over the budget (elapsed fraction).
3. Evaluates Dice and HD95 on the validation split (10 patients, 20 volumes) in the input space, with the
   bundle's sliding-window inferer (test-time mirroring as configured) and ``EvaluationReport``.
4. Writes the trained tensors as float16 pieces of at most 15 MiB (``scripts.pretrained``; commit them under
   ``masksam_bundle/models/pretrained/``) and the figures as JSON.
5. If the remaining time allows, trains and evaluates DynUNet (nnU-Net-like, ``bench/common.py``) on the same
   data, patch, augmentation and budget.

Everything goes under ``--out`` (default ``$OUT``): ``gpu_acdc_accuracy.json``, ``pretrained/``,
``eval_lite_medsam/`` and ``eval_dynunet/`` (metrics.json, metrics.csv, overlays).

Usage (repo root)::

    python bench/gpu_acdc_accuracy.py --train-seconds 170 --total-seconds 530      # GPU, writes under $OUT
    python bench/gpu_acdc_accuracy.py --tiny --device cpu --out /tmp/acc_tiny       # CI smoke (vit_t, seconds)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402  (sets OMP_WAIT_POLICY before torch is imported)
    ACDC_DIR, BUNDLE_ROOT, build_dynunet, cpu_model_name, deep_supervised_dice_ce, environment, write_json,
)

import numpy as np  # noqa: E402
import torch  # noqa: E402

GIB = 1024**3
DYNUNET_LR = 1e-2  # nnU-Net's initial learning rate (MaskSAM takes the recipe's)


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------------- recipe
def default_data_dir() -> Path:
    """ACDC beside the repository (development checkouts) or inside it (a copied working tree)."""
    inside = BUNDLE_ROOT.parent / "shared" / "data" / "acdc"
    return ACDC_DIR if (ACDC_DIR / "dataset.json").exists() or not (inside / "dataset.json").exists() else inside


def recipe_parser(args):
    """The bundle configs with this run's overrides; ``tiny`` swaps in the smoke preset (vit_t, 64x64x4)."""
    from monai.bundle import ConfigParser

    files = ["train.yaml", "acdc.yaml"] + (["adamw.yaml"] if args.optimizer == "adamw" else []) + ["evaluate.yaml"]
    files += ["tiny.yaml"] if args.tiny else []
    parser = ConfigParser()
    parser.read_config([str(BUNDLE_ROOT / "configs" / f) for f in files])
    overrides: Dict[str, Any] = {
        "bundle_root": str(BUNDLE_ROOT),
        "dataset_dir": str(args.data_dir),
        "output_dir": str(args.out / "bundle_output"),
        "ckpt_dir": str(args.out / "bundle_output" / "models"),
        "device": f"$torch.device('{args.device}')",
        "num_workers": args.num_workers,
        "seed": args.seed,
    }
    if not args.tiny:
        overrides.update(backbone="lite_medsam", sam_checkpoint=None, sam_upsample=1)
    if args.device.startswith("cuda"):
        overrides["sw_batch_size"] = 8  # more windows per forward: evaluation time, not the result
    if args.val_limit:
        overrides["num_val_cases"] = args.val_limit
    if args.tta_mirror is not None:
        overrides["tta_mirror"] = args.tta_mirror
    for key, value in overrides.items():
        parser[key] = value
    return parser, files, overrides


def network_config(parser) -> Dict[str, Any]:
    """``network_def`` with every reference resolved to a plain value (what ``scripts.pretrained`` stores)."""
    config = {"_target_": parser["network_def"]["_target_"]}
    for key in parser["network_def"]:
        if key != "_target_":
            config[key] = parser.get_parsed_content(f"network_def#{key}")
    return config


def recipe_summary(parser) -> Dict[str, Any]:
    keys = ("backbone", "patch_size", "batch_size", "num_queries", "num_classes", "learning_rate", "momentum",
            "weight_decay", "grad_clip", "lr_power", "sam_upsample", "tta_mirror", "tta_mirror_axes")
    summary = {k: parser.get_parsed_content(k) for k in keys if k in parser}
    summary["augmentation"] = [t["_target_"].split(".")[-1] for t in parser["train#random_transforms"]]
    return summary


# --------------------------------------------------------------------------------------------- training
def batches(loader):
    """Endless iterator over the loader's epochs."""
    while True:
        yield from loader


def plain(x: torch.Tensor) -> torch.Tensor:
    return x.as_tensor() if hasattr(x, "as_tensor") else x


def train_for(network, loss_fn, optimizer, loader, seconds: float, lr: float, power: float, grad_clip: float,
              device: torch.device, amp: bool, log_every: int = 25) -> Dict[str, Any]:
    """SGD steps as the bundle trains (autocast fp16 + GradScaler on CUDA, clipping after unscaling) until
    ``seconds`` have passed; poly LR over the elapsed fraction of the budget."""
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    params = [p for p in network.parameters() if p.requires_grad]
    network.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses: List[float] = []
    t0 = time.perf_counter()
    it = 0
    for batch in batches(loader):
        progress = (time.perf_counter() - t0) / seconds
        if progress >= 1:
            break
        for group in optimizer.param_groups:
            group["lr"] = lr * (1 - progress) ** power
        image, label = plain(batch["image"]).to(device), plain(batch["label"]).to(device)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, enabled=amp):
            out = network(image)
        loss = loss_fn(out, label)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
        scaler.step(optimizer)
        scaler.update()
        it += 1
        losses.append(float(loss.detach()))
        if it <= 3 or it % log_every == 0:
            log(f"  iter {it}: loss {losses[-1]:.4f} lr {optimizer.param_groups[0]['lr']:.2e} "
                f"({time.perf_counter() - t0:.0f} s)")
    wall = time.perf_counter() - t0
    return {"iterations": it, "train_wall_s": round(wall, 1), "s_per_iter": round(wall / max(it, 1), 4),
            "loss_first": round(losses[0], 4) if losses else None,
            "loss_last_50_mean": round(float(np.mean(losses[-50:])), 4) if losses else None,
            "peak_train_gib": round(torch.cuda.max_memory_allocated() / GIB, 2) if device.type == "cuda" else None}


# --------------------------------------------------------------------------------------------- evaluation
def evaluate(network, parser, out_dir: Path, device: torch.device, amp: bool, extra: Dict) -> Dict[str, Any]:
    """Dice and HD95 per validation volume with the bundle's evaluation transforms, inferer and report."""
    from scripts.evaluation import EvaluationReport

    items = parser.get_parsed_content("validate#datalist")
    preprocessing = parser.get_parsed_content("validate#preprocessing")
    postprocessing = parser.get_parsed_content("validate#postprocessing")
    inferer = parser.get_parsed_content("validate#inferer")
    report = EvaluationReport(str(out_dir), parser.get_parsed_content("class_names"), num_overlays=2,
                              overwrite=True, extra=extra)
    network.eval()
    t0 = time.perf_counter()
    for i, item in enumerate(items, 1):
        data = preprocessing(item)
        x = data["image"].unsqueeze(0).to(device)
        with torch.no_grad(), torch.autocast(device.type, enabled=amp):
            pred = inferer(x, network)
        data["pred"] = pred[0].float().cpu()  # a MetaTensor: Invertd needs its trace
        data = postprocessing(data)
        row = report.add_case(data)
        log(f"  eval {i}/{len(items)} {row['case']}: mean Dice {row['mean_dice']:.4f}")
    summary = report.write()
    return {"eval_wall_s": round(time.perf_counter() - t0, 1), "num_cases": summary["num_cases"],
            "mean": summary["mean"], "per_class": summary["per_class"], "tta_mirror": inferer.tta_mirror,
            "report": str(out_dir)}


# --------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None,
                    help="output folder (default: $OUT)")
    ap.add_argument("--train-seconds", type=float, help="wall-clock training budget per model (default 170)")
    ap.add_argument("--total-seconds", type=float, default=530,
                    help="DynUNet runs only if it can finish before this many seconds since the start")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--data-dir", type=Path, default=default_data_dir(),
                    help="ACDC with its decathlon dataset.json (default: ../shared/data/acdc or ./shared/data/acdc)")
    ap.add_argument("--num-workers", type=int, help="data-loading processes (default: CPU count - 2, at most 12)")
    ap.add_argument("--val-limit", type=int, help="evaluate only the first N validation volumes")
    ap.add_argument("--tta-mirror", type=lambda s: s.lower() in ("1", "true", "yes"),
                    help="override the configs' test-time mirroring (true/false)")
    ap.add_argument("--max-piece-mib", type=float, default=15.0)
    ap.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw",
                    help="adamw: + configs/adamw.yaml (default: a minutes-long run needs it, docs/benchmarks.md "
                         "'Proof of learning'); sgd: the paper's recipe as it is")
    ap.add_argument("--no-dynunet", action="store_true")
    ap.add_argument("--seed", type=int, default=12345)
    ap.add_argument("--tiny", action="store_true", help="smoke size: configs/tiny.yaml (vit_t), a few seconds")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    if args.out is None:
        ap.error("--out is required when $OUT is not set")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        log("gpu_acdc_accuracy: no CUDA device here (use --device cpu --tiny for a smoke run)")
        return 2
    if args.train_seconds is None:
        args.train_seconds = 4.0 if args.tiny else 170.0
    if args.num_workers is None:
        args.num_workers = 0 if args.tiny else max(1, min(12, (os.cpu_count() or 4) - 2))
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / "gpu_acdc_accuracy.json"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    from monai.data import DataLoader
    from monai.utils import set_determinism

    from scripts.pretrained import save_pieces

    parser, files, overrides = recipe_parser(args)
    set_determinism(args.seed)
    amp = bool(parser.get_parsed_content("amp")) and device.type == "cuda"
    env = environment()
    env["cpu_model"] = cpu_model_name()
    command = "python bench/gpu_acdc_accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:])
    output: Dict[str, Any] = {
        "environment": env, "command": command, "config_files": files,
        "overrides": {k: v for k, v in overrides.items() if k not in ("bundle_root", "dataset_dir", "output_dir",
                                                                       "ckpt_dir")},
        "recipe": recipe_summary(parser), "amp": amp, "train_seconds_budget": args.train_seconds, "models": {},
    }
    log(f"gpu_acdc_accuracy on {env.get('gpu', 'CPU ' + env['cpu_model'])}: {output['recipe']}")

    # data: the recipe's cached training set and augmentation, one loader shared by both models
    t = time.perf_counter()
    dataset = parser.get_parsed_content("train#dataset")
    loader = DataLoader(dataset, batch_size=parser.get_parsed_content("batch_size"), shuffle=True, drop_last=True,
                        num_workers=args.num_workers, persistent_workers=args.num_workers > 0,
                        pin_memory=device.type == "cuda")
    output["train_volumes"] = len(dataset)
    output["data_load_s"] = round(time.perf_counter() - t, 1)
    log(f"cached {len(dataset)} training volumes in {output['data_load_s']} s")

    # MaskSAM with the recipe
    name = str(parser.get_parsed_content("backbone"))
    network = parser.get_parsed_content("network")
    log(f"\n== MaskSAM {name}: {network.parameter_counts()}")
    result: Dict[str, Any] = {"parameters": network.parameter_counts()}
    result.update(train_for(network, parser.get_parsed_content("loss"), parser.get_parsed_content("optimizer"),
                            loader, args.train_seconds, float(parser.get_parsed_content("learning_rate")),
                            float(parser.get_parsed_content("lr_power")), float(parser.get_parsed_content("grad_clip")),
                            device, amp))
    output["models"][name] = result
    write_json(str(json_path), output)
    pieces_dir = args.out / "pretrained"
    manifest = save_pieces(network, str(pieces_dir), network_config(parser),
                           max_piece_bytes=int(args.max_piece_mib * 2**20), overwrite=True,
                           extra={"command": command, "config_files": files, "overrides": output["overrides"],
                                  "date_utc": env["date_utc"], "device": env.get("gpu", env["cpu_model"]),
                                  "iterations": result["iterations"], "train_wall_s": result["train_wall_s"]})
    result["weights"] = {"dir": str(pieces_dir), "pieces": [p["file"] for p in manifest["pieces"]],
                         "max_piece_bytes": max(p["bytes"] for p in manifest["pieces"]),
                         "total_bytes": sum(p["bytes"] for p in manifest["pieces"])}
    result.update(evaluate(network, parser, args.out / f"eval_{name}", device, amp, {"model": name}))
    write_json(str(json_path), output)
    log(f"   {name}: mean Dice {result['mean']['dice']:.4f}, HD95 {result['mean']['hd95']:.2f} "
        f"({result['iterations']} iterations, eval {result['eval_wall_s']} s)")
    del network
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # DynUNet under the same budget, if it can finish in time
    left = args.total_seconds - (time.perf_counter() - start)
    needed = args.train_seconds + result["eval_wall_s"] + 15
    if args.no_dynunet or left < needed:
        reason = "--no-dynunet" if args.no_dynunet else f"{left:.0f} s left, {needed:.0f} s needed"
        output["models"]["dynunet"] = {"status": "skipped", "reason": reason}
        log(f"\n== DynUNet skipped: {reason}")
    else:
        patch = list(parser.get_parsed_content("patch_size"))
        dynunet, plan = build_dynunet(patch, int(parser.get_parsed_content("num_classes")), tiny=args.tiny)
        dynunet = dynunet.to(device)
        optimizer = torch.optim.SGD([p for p in dynunet.parameters() if p.requires_grad], lr=DYNUNET_LR,
                                    momentum=float(parser.get_parsed_content("momentum")), nesterov=True,
                                    weight_decay=float(parser.get_parsed_content("weight_decay")))
        log(f"\n== DynUNet: strides {plan['strides']}, filters {plan['filters']}, lr {DYNUNET_LR}")
        dyn: Dict[str, Any] = {"lr": DYNUNET_LR, "strides": plan["strides"], "filters": plan["filters"]}
        dyn.update(train_for(dynunet, deep_supervised_dice_ce(int(parser.get_parsed_content("num_classes"))),
                             optimizer, loader, args.train_seconds, DYNUNET_LR,
                             float(parser.get_parsed_content("lr_power")),
                             float(parser.get_parsed_content("grad_clip")), device, amp))
        output["models"]["dynunet"] = dyn
        dyn.update(evaluate(dynunet, parser, args.out / "eval_dynunet", device, amp, {"model": "dynunet"}))
        log(f"   dynunet: mean Dice {dyn['mean']['dice']:.4f}, HD95 {dyn['mean']['hd95']:.2f} "
            f"({dyn['iterations']} iterations)")
    output["elapsed_s"] = round(time.perf_counter() - start, 1)
    write_json(str(json_path), output)
    log(f"\nwrote {json_path} and {pieces_dir} in {output['elapsed_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
