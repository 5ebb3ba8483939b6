"""Measure MaskSAM's peak memory per training step / sliding-window forward and write the table that the bundle's
memory check reads (``masksam_bundle/scripts/memory_table.json``; see ``scripts/memory.py``).

Each measurement runs in a fresh subprocess: build the network (and loss and SGD for training), run
``--steps`` training steps (``train_step`` of ``common.py``: forward, loss, backward, clipping, step) or forward
passes under ``no_grad`` on one ``(batch, 1, H, W, D)`` patch, and record the process's peak RSS
(``ru_maxrss``: interpreter, libraries, weights and activations) on CPU, or ``max_memory_reserved`` on CUDA.
For every (backbone, SAM frame, patch side, N, mode, AMP, checkpointing, attention kernel) group the peaks are
fitted by ``base + per_slice x slices`` (slices = batch x D); the fit's largest relative error on its own points
and its prediction for the check points (``--check``) are written beside it.

    OMP_WAIT_POLICY=PASSIVE flock /tmp/masksam_heavy.lock python3 bench/measure_memory.py --plan cpu
    python3 bench/measure_memory.py --plan tiny --output /tmp/table.json         # CI-sized (vit_t)
    python3 bench/measure_memory.py --refit bench/results/attention_*.json       # records measured elsewhere

``--refit`` reads records with the fields ``backbone, patch, batch, amp, checkpointing, fused, peak_rss_gb``
(optional ``mode`` = train, ``num_queries`` = 8, ``sam_upsample``, ``device`` = cpu) from other JSON files (e.g.
the speed benchmarks' ``bench/results/``), adds them to the table's records (replacing records of the same
configuration) and refits.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BUNDLE_ROOT, environment, write_json  # noqa: E402  (sets OMP_WAIT_POLICY first)

TABLE = BUNDLE_ROOT / "scripts" / "memory_table.json"
GB = 1024**3

# (backbone, patch side, sam_upsample, N, mode, checkpointing, depths); the last depth of a group is a check
# point left out of the fit when --check is given.
PLANS: Dict[str, List[Tuple]] = {
    "tiny": [
        ("vit_t", 64, 1, 4, "train", False, (1, 2, 4)),
        ("vit_t", 64, 1, 4, "infer", False, (1, 2, 4)),
    ],
    "cpu": [
        ("vit_t", 64, 1, 4, "train", False, (1, 2, 4)),
        ("vit_t", 64, 1, 4, "infer", False, (1, 2, 4)),
        ("lite_medsam", 256, 1, 4, "train", False, (1, 2, 4)),
        ("lite_medsam", 256, 1, 8, "train", False, (1, 2)),
        ("lite_medsam", 256, 1, 4, "infer", False, (1, 2, 4)),
        ("lite_medsam", 256, 1, 8, "infer", False, (1, 2)),
        ("vit_b", 256, 4, 8, "train", False, (1, 2)),
        ("vit_b", 256, 4, 8, "train", True, (1, 2)),
        ("vit_b", 256, 4, 8, "infer", False, (1, 2)),
    ],
    # vit_b inference alone (the shipped CPU table's vit_b inference point and a second checkpointing point at
    # D=4 came from the speed benchmark's records via --refit, after the cpu plan was stopped at D=1 with
    # checkpointing to free the shared machine)
    "cpu_vit_b_infer": [
        ("vit_b", 256, 4, 8, "infer", False, (1, 2)),
    ],
}


# ------------------------------------------------------------------------------------------- one worker
def worker(spec: Dict) -> Dict:
    import torch

    from common import masksam_loss, sgd, synthetic_pair, train_step

    torch.manual_seed(0)
    device = torch.device(spec["device"])
    import warnings

    from scripts import MaskSAM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random frozen SAM weights use the same memory as the official ones
        net = MaskSAM(backbone=spec["backbone"], num_classes=4, num_queries=spec["num_queries"],
                      num_slices=spec["depth"], image_size=spec["image_size"], sam_upsample=spec["sam_upsample"],
                      use_checkpoint=spec["checkpointing"]).to(device)
    image, label = synthetic_pair(spec["batch"], (spec["image_size"], spec["image_size"], spec["depth"]), 4, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    if spec["mode"] == "train":
        net.train()
        loss_fn, optimiser = masksam_loss(4), sgd(net, 1e-3)
        scaler = torch.amp.GradScaler(device.type, enabled=spec["amp"] and device.type == "cuda")
        for _ in range(spec["steps"]):
            t0 = time.perf_counter()
            train_step(net, loss_fn, optimiser, scaler, image, label, spec["amp"] and device.type == "cuda")
            times.append(time.perf_counter() - t0)
    else:
        net.eval()
        with torch.no_grad(), torch.autocast(device.type, enabled=spec["amp"] and device.type == "cuda"):
            for _ in range(spec["steps"]):
                t0 = time.perf_counter()
                net(image)
                times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_reserved(device) / GB
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB
    return {**spec, "peak_rss_gb": round(peak, 3), "step_s": round(min(times), 2)}


def run_worker(spec: Dict, timeout: float) -> Dict:
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {**spec, "status": f"timeout after {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {**spec, "status": f"failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}"}
    return {**json.loads(lines[-1]), "status": "ok"}


# ------------------------------------------------------------------------------------------------ fitting
GROUP_KEYS = ("device", "backbone", "sam_size", "image_size", "num_queries", "mode", "amp", "checkpointing", "fused")


def figure_records(figure: Dict) -> List[Dict]:
    """The speed benchmark's compact figures (``--figures-json``: one entry per configuration with the training
    peak ``peak_rss_gb`` and, when measured, the batch-1 inference peak ``peak_infer_rss_gb``) as records."""
    records = [{**figure, "mode": figure.get("mode") or "train"}]
    if figure.get("peak_infer_rss_gb") is not None:
        records.append({**figure, "mode": "infer", "batch": 1, "checkpointing": False,  # eval: nothing kept
                        "peak_rss_gb": figure["peak_infer_rss_gb"]})
    return records


def normalise_record(r: Dict) -> Optional[Dict]:
    """A record from this script or another benchmark, in this script's fields (None when unusable: not a
    MaskSAM backbone, not measured)."""
    if r.get("status", "ok") != "ok" or r.get("peak_rss_gb") is None or "backbone" not in r:
        return None
    if r["backbone"] == "dynunet":  # the speed benchmark's reference network
        return None
    patch = r.get("patch") or [r["image_size"], r["image_size"], r["depth"]]
    backbone = r["backbone"]
    up = r.get("sam_upsample", 1 if backbone in ("lite_medsam", "vit_t") else (4 if patch[0] == 256 else 1))
    out = {
        "device": "cuda" if str(r.get("device", "cpu")).startswith("cuda") else "cpu",
        "backbone": backbone, "image_size": int(patch[0]), "depth": int(patch[2]),
        "sam_upsample": int(up), "sam_size": int(patch[0]) * (1 if backbone == "lite_medsam" else int(up)),
        "num_queries": int(r.get("num_queries", 8)), "batch": int(r.get("batch", 1)),
        "mode": r.get("mode") or "train", "amp": bool(r.get("amp", False)),
        "checkpointing": bool(r.get("checkpointing", r.get("use_checkpoint", False))),
        "fused": bool(r.get("fused", False)), "peak_rss_gb": float(r["peak_rss_gb"]),
        "step_s": r.get("step_s"), "source": r.get("source", "bench/measure_memory.py"),
    }
    out["slices"] = out["batch"] * out["depth"]
    return out


def fit_group(points: List[Tuple[int, float]]) -> Optional[Tuple[float, float, float]]:
    """Least-squares ``peak = base + per_slice x slices``; (base, per_slice, largest relative error)."""
    xs = [float(x) for x, _ in points]
    if len(set(xs)) < 2:
        return None
    ys = [y for _, y in points]
    n, mx, my = len(xs), sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    slope = max(slope, 0.0)
    base = my - slope * mx
    err = max(abs(base + slope * x - y) / y for x, y in zip(xs, ys))
    return base, slope, err


def build_table(records: List[Dict], check: bool, fused: bool, environment_info: Dict, command: str,
                train_loop: Optional[Dict] = None) -> Dict:
    groups: Dict[Tuple, List[Dict]] = {}
    for r in records:
        groups.setdefault(tuple(r[k] for k in GROUP_KEYS), []).append(r)
    fits, single = [], []
    for key, rs in sorted(groups.items(), key=lambda kv: str(kv[0])):
        rs = sorted(rs, key=lambda r: r["slices"])
        held_out = rs[-1:] if check and len({r["slices"] for r in rs}) >= 3 else []
        fitted = fit_group([(r["slices"], r["peak_rss_gb"]) for r in rs if r not in held_out])
        if fitted is None:
            single.append((key, rs))
            continue
        base, per_slice, err = fitted
        fit = {**dict(zip(GROUP_KEYS, key)), "base_gb": round(base, 3), "per_slice_gb": round(per_slice, 4),
               "fit_max_rel_error": round(err, 3), "points": [[r["slices"], r["peak_rss_gb"]] for r in rs]}
        if held_out:
            r = held_out[0]
            predicted = base + per_slice * r["slices"]
            fit["check"] = {"slices": r["slices"], "measured_gb": r["peak_rss_gb"], "predicted_gb": round(predicted, 3),
                            "rel_error": round((predicted - r["peak_rss_gb"]) / r["peak_rss_gb"], 3)}
        fits.append(fit)
    # one slice count only (e.g. an expensive checkpointing run): the process-and-weights base of the same
    # network and mode without checkpointing/AMP, the slope through the measured point
    for key, rs in single:
        group = dict(zip(GROUP_KEYS, key))
        sibling = next((f for f in fits if all(f[k] == group[k] for k in GROUP_KEYS
                                                if k not in ("checkpointing", "amp"))), None)
        if sibling is None:  # e.g. one inference point: the base of this network's training fit
            sibling = next((f for f in fits if all(f[k] == group[k] for k in GROUP_KEYS
                                                    if k not in ("checkpointing", "amp", "mode"))), None)
        if sibling is None:
            continue
        r = rs[-1]
        per_slice = max((r["peak_rss_gb"] - sibling["base_gb"]) / r["slices"], 0.0)
        fits.append({**group, "base_gb": sibling["base_gb"], "per_slice_gb": round(per_slice, 4),
                     "fit_max_rel_error": 0.0, "points": [[x["slices"], x["peak_rss_gb"]] for x in rs],
                     "base_from": f"the {sibling['mode']} fit with checkpointing {sibling['checkpointing']}, "
                                  f"amp {sibling['amp']} (one slice count measured)"})
    return {
        "format": "masksam-memory-table/1",
        "fused": fused,
        "about": "peak process RSS (CPU) / max_memory_reserved (CUDA) in GiB of one training step (mode train, "
                 "slices = batch x D) or one forward (mode infer, slices = sw_batch_size x D); "
                 "peak = base_gb + per_slice_gb x slices. Written by bench/measure_memory.py; read by "
                 "masksam_bundle/scripts/memory.py.",
        "command": command,
        "environment": environment_info,
        # whole training runs peak above the bare step (data loading, validation, allocator): added for mode train
        "train_loop_gb": (train_loop or {}).get("gb", 0.0),
        "train_loop_runs": (train_loop or {}).get("runs", []),
        "fits": fits,
        "records": records,
    }


# ------------------------------------------------------------------------------------- README's table
# (label, estimate_peak_gb settings) of the README's Memory section; CPU, fp32.
README_ROWS = [
    ("ACDC training, `vit_b` ×4 (1024 frame), batch 2 (the preset)",
     dict(backbone="vit_b", image_size=256, sam_upsample=4, depth=4, num_queries=8, batch=2)),
    ("same, `--use_checkpoint true`",
     dict(backbone="vit_b", image_size=256, sam_upsample=4, depth=4, num_queries=8, batch=2, checkpointing=True)),
    ("same, batch 1, `--use_checkpoint true`",
     dict(backbone="vit_b", image_size=256, sam_upsample=4, depth=4, num_queries=8, batch=1, checkpointing=True)),
    ("same, batch 1, `--use_checkpoint true --fused_attention false` (SAM's explicit attention)",
     dict(backbone="vit_b", image_size=256, sam_upsample=4, depth=4, num_queries=8, batch=1, checkpointing=True,
          fused=False)),
    ("ACDC evaluation / inference, `vit_b`, `sw_batch_size` 2",
     dict(backbone="vit_b", image_size=256, sam_upsample=4, depth=4, num_queries=8, batch=2, mode="infer")),
    ("demo training, `lite_medsam` 256×256×4, N=4, batch 1",
     dict(backbone="lite_medsam", image_size=256, sam_upsample=1, depth=4, num_queries=4, batch=1)),
    ("`lite_medsam` inference, `sw_batch_size` 2, N=4",
     dict(backbone="lite_medsam", image_size=256, sam_upsample=1, depth=4, num_queries=4, batch=2, mode="infer")),
    ("tiny preset training (`vit_t` 64×64×4)",
     dict(backbone="vit_t", image_size=64, sam_upsample=1, depth=4, num_queries=4, batch=1)),
]


def _replace_between(text: str, name: str, body: str) -> str:
    start, end = f"<!-- {name}:start -->\n", f"<!-- {name}:end -->"
    if start not in text or end not in text:
        raise ValueError(f"README has no '{start.strip()}' ... '{end}' markers")
    head, rest = text.split(start, 1)
    return head + start + body + end + rest.split(end, 1)[1]


def render_readme(readme: str, table_path: str) -> None:
    """Rewrite the README's estimated-peak table and its example error from the memory table."""
    sys.path.insert(0, str(BUNDLE_ROOT))
    from scripts.memory import InsufficientMemoryError, check_memory, estimate_peak_gb, resolve_use_checkpoint

    table = json.loads(Path(table_path).read_text())
    rows = ["| run | estimated peak (GB) | from |", "|---|---:|---|"]
    for label, settings in README_ROWS:
        estimate = estimate_peak_gb(**settings, table=table)
        rows.append(f"| {label} | {estimate.total_gb:.1f} | {estimate.source} |")
    try:  # the preset on a 12 GB machine (the error the README shows): use_checkpoint auto turns it on, too little
        preset = ("vit_b", [256, 256, 4], 4, 8, 2)
        checkpointing = resolve_use_checkpoint("auto", *preset, memory_limit_gb=12.0)
        check_memory(*preset, use_checkpoint=checkpointing, memory_limit_gb=12.0)
        example = "(fits)"
    except InsufficientMemoryError as e:
        example = f"error: {e}"
    text = Path(readme).read_text()
    text = _replace_between(text, "memory-table", "\n".join(rows) + "\n")
    text = _replace_between(text, "vitb-example", f"```\n{example}\n```\n")
    Path(readme).write_text(text)
    print(f"rewrote the memory table and example in {readme}")


# ------------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan", choices=sorted(PLANS), default="cpu")
    parser.add_argument("--only", default="", help="comma-separated backbones of the plan to measure")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true", help="autocast (CUDA only)")
    parser.add_argument("--fused", action="store_true", help="record that the network uses fused attention")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per measurement")
    parser.add_argument("--check", action="store_true", help="leave the largest depth of a group out of its fit")
    parser.add_argument("--output", default=str(TABLE))
    parser.add_argument("--merge", action="store_true", help="keep the records already in --output")
    parser.add_argument("--refit", nargs="*", default=None, help="JSON files with records to add; no measuring")
    parser.add_argument("--readme", default=None, help="only rewrite this README's memory table from --output")
    parser.add_argument("--train_loop_run", nargs=3, action="append", default=[], metavar=("NAME", "RUN_GB", "STEP_GB"),
                        help="a whole training run's peak (/usr/bin/time -v) and the table's estimate of its step "
                             "alone; the largest difference becomes train_loop_gb")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.readme:
        render_readme(args.readme, args.output)
        return
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return

    command = "python3 bench/measure_memory.py " + " ".join(sys.argv[1:])
    old = json.loads(Path(args.output).read_text()) if Path(args.output).is_file() else {}
    records = [r for r in old.get("records", [])] if (args.merge or args.refit is not None) else []
    fused = bool(old.get("fused", False)) if args.refit is not None else args.fused

    def add(record: Dict) -> None:
        same = [k for k in GROUP_KEYS + ("slices",)]
        records[:] = [r for r in records if any(r[k] != record[k] for k in same)] + [record]

    if args.refit is not None:
        for pattern in args.refit:
            for path in sorted(glob.glob(pattern)):
                content = json.loads(Path(path).read_text())
                items = content.get("records") or content.get("results") or (content if isinstance(content, list) else [])
                items = items or [r for f in content.get("figures", []) for r in figure_records(f)]
                for item in items:
                    r = normalise_record({**item, "source": path})
                    if r is not None:
                        add(r)
                        fused = fused or r["fused"]
    else:
        only = {b for b in args.only.split(",") if b}
        for backbone, side, up, n, mode, ckpt, depths in PLANS[args.plan]:
            if only and backbone not in only:
                continue
            for depth in depths:
                spec = dict(backbone=backbone, image_size=side, sam_upsample=up, num_queries=n, mode=mode,
                            checkpointing=ckpt, depth=depth, batch=1, device=args.device, amp=args.amp,
                            fused=args.fused, steps=args.steps)
                result = run_worker(spec, args.timeout)
                print(f"{backbone:12s} {mode:5s} side {side} x{up} N {n} D {depth} ckpt {ckpt}: "
                      f"{result.get('peak_rss_gb', '-')} GB, {result.get('step_s', '-')} s ({result['status']})",
                      flush=True)
                r = normalise_record(result)
                if r is not None:
                    add(r)
    runs = list(old.get("train_loop_runs", [])) if (args.merge or args.refit is not None) else []
    runs = [r for r in runs if r["name"] not in {n for n, _, _ in args.train_loop_run}]
    runs += [{"name": n, "run_gb": float(a), "step_estimate_gb": float(b)} for n, a, b in args.train_loop_run]
    loop = {"gb": round(max([r["run_gb"] - r["step_estimate_gb"] for r in runs] + [0.0]), 2), "runs": runs}
    table = build_table(records, args.check, fused, environment(), command, loop)
    write_json(args.output, table)
    for fit in table["fits"]:
        check = fit.get("check")
        print(f"{fit['backbone']:12s} {fit['mode']:5s} frame {fit['sam_size']} N {fit['num_queries']} "
              f"ckpt {fit['checkpointing']}: {fit['base_gb']:.2f} + {fit['per_slice_gb']:.3f} x slices GB "
              f"(fit error {fit['fit_max_rel_error']:.1%}"
              + (f"; check at {check['slices']} slices: measured {check['measured_gb']}, predicted "
                 f"{check['predicted_gb']}" if check else "") + ")")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
