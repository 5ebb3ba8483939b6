"""Speed and memory: MaskSAM against MONAI DynUNet (configured like nnU-Net) and SwinUNETR, same run, same patch.

For each preset (ACDC, Synapse, AMOS; spec section 9) and model it measures

* ``infer_patch``: one eval forward on a patch (no grad), median seconds;
* ``train_step``: forward + loss + backward + clip + SGD step on a patch, median seconds;
* ``infer_volume``: sliding-window inference (patch ROI, overlap 0.5, Gaussian blending) over a representative
  volume of the preset; measured where ``volume`` is in the job's phases, else estimated as
  ``windows x infer_patch`` at batch 1 and flagged ``estimate``;
* peak memory per phase (CPU: sampled process RSS; GPU: CUDA max allocated),

then every figure as a ratio to DynUNet's figure of the same preset **in the same run**.

Each (preset, model) job runs in its own subprocess, so one job's memory cannot leak into the next, a job that
grows past ``--max-rss-gib`` is stopped (and reported as such) instead of pushing the machine into swap, and a
job past its time allowance is stopped with what it measured so far. Jobs that cannot run at the preset
depth on this machine (ViT-H on CPU) run at a smaller depth ``d`` and are scaled to the preset depth D:
time x D/d, memory = weights-loaded RSS + (peak - weights-loaded RSS) x D/d — flagged ``estimate``.

Usage (repo root)::

    python bench/speed_memory.py --plan cpu --budget 1800 --json bench/results/speed_cpu.json
    python bench/speed_memory.py --preset acdc --models lite_medsam,dynunet --repeats 5
    python bench/speed_memory.py --plan tiny --inprocess --json /tmp/tiny.json      # CI smoke size
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402  (sets OMP_WAIT_POLICY before torch is imported)
    BASELINES, GIB, MASKSAM_BACKBONES, PRESETS, NotApplicable, PeakMemory, build_dynunet, build_masksam,
    build_swinunetr, cpu_model_name, deep_supervised_dice_ce, environment, masksam_loss, ratio, sgd,
    amp_autocast, count_flops, swin_patch, synthetic_pair, timed_runs, train_step, write_json,
)

import torch  # noqa: E402
from scripts.interactive import window_starts  # noqa: E402

PHASES = ("infer", "train", "volume")  # "flops" (FLOPs of one train step and one eval forward) on request

# Default CPU plan: (preset, model, depth or None for the preset depth, phases), in priority order — the
# budget runs out at the end of the list first. Depth-reduced MaskSAM jobs are scaled and flagged.
PLANS: Dict[str, List] = {
    "cpu": [
        # Each preset's DynUNet reference and its paper backbone first, then the other models.
        ("acdc", "dynunet", None, PHASES),
        ("acdc", "lite_medsam", None, PHASES),
        ("synapse", "dynunet", None, ("infer", "train")),
        ("synapse", "vit_h", 1, ("infer", "train")),
        ("amos", "dynunet", None, ("infer", "train")),
        ("amos", "vit_h", 1, ("infer", "train")),
        ("acdc", "swinunetr", None, PHASES),
        ("acdc", "vit_b", None, ("infer",)),
        ("acdc", "vit_b", 1, ("train",)),
        ("synapse", "lite_medsam", 2, ("infer", "train")),
        ("synapse", "swinunetr", None, ("infer", "train")),
        ("amos", "lite_medsam", None, ("infer",)),  # reported as not applicable (fixed 256 frame)
        ("amos", "vit_b", 1, ("infer", "train")),
        ("synapse", "vit_b", 2, ("infer", "train")),
        ("amos", "swinunetr", None, ("infer", "train")),
    ],
    # Eval forward of one ACDC patch (batch 1), the code before against the fused switch, DynUNet as reference.
    "acdc_inference": [
        ("acdc", "vit_b", None, ("infer",), dict(label="vit_b explicit infer", batch=1, fused_attention=False)),
        ("acdc", "vit_b", None, ("infer",), dict(label="vit_b fused infer", batch=1)),
        ("acdc", "dynunet", None, ("infer",), dict(label="dynunet b1", batch=1)),
    ],
    "gpu": [(p, m, None, PHASES) for p in ("acdc", "synapse", "amos")
            for m in ("dynunet", "swinunetr", "lite_medsam", "vit_b", "vit_h")],
    "tiny": [("tiny", m, None, PHASES) for m in ("dynunet", "swinunetr", "vit_t")],
    # Issue 13 before/after on CPU: the ACDC preset (vit_b, 256x256x4 x4 to 1024) with SAM's explicit attention
    # (the code before, `fused_attention: false`) and with the fused attention, batch 1 and 2, against DynUNet.
    # A vit_b step takes minutes on 2 shared cores: run with --warmup 0 --repeats 1 (one timed run each) and a
    # --budget; jobs past it are listed as skipped.
    "acdc_attention": [
        ("acdc", "dynunet", None, ("infer", "train"), dict(label="dynunet b1", batch=1, warmup=1, repeats=3)),
        ("acdc", "vit_b", None, ("infer", "train"),
         dict(label="vit_b explicit b1 ckpt", batch=1, use_checkpoint=True, fused_attention=False)),
        ("acdc", "vit_b", None, ("infer", "train"), dict(label="vit_b fused b1", batch=1)),
        ("acdc", "vit_b", None, ("train",), dict(label="vit_b fused b2 ckpt", batch=2, use_checkpoint=True)),
        ("acdc", "vit_b", None, ("train",), dict(label="vit_b fused b1 ckpt", batch=1, use_checkpoint=True)),
        ("acdc", "vit_b", None, ("train",),
         dict(label="vit_b explicit b2 ckpt", batch=2, use_checkpoint=True, fused_attention=False,
              not_run="known to exceed 20 GB: OOM-killed at 22.1 GB on the 24 GB machine (issue 13)")),
        ("acdc", "vit_b", None, ("train",),
         dict(label="vit_b explicit b1", batch=1, fused_attention=False,
              not_run="> 20 GB expected (the b1 checkpointed step already peaks near 16 GB; without "
                      "checkpointing all 12 blocks keep their activations and the 4 global blocks their "
                      "4096 x 4096 probabilities, 0.8 GB per slice and block)")),
    ],
}
METRICS = ("infer_patch_s", "train_step_s", "infer_volume_s", "peak_infer_gib", "peak_train_gib",
           "peak_volume_gib")


def log(msg: str) -> None:
    print(msg, flush=True)


def sliding_windows(volume, roi, overlap: float = 0.5) -> int:
    """Number of windows MONAI's sliding_window_inference visits (its scan-interval rule, per axis)."""
    return math.prod(len(window_starts(v, r, overlap)) for v, r in zip(volume, roi))


# --------------------------------------------------------------------------------------------- one job
def measure(job: Dict, partial_path: Optional[str] = None) -> Dict:
    """Build one model and measure the job's phases; writes partial results to ``partial_path`` as it goes."""
    from monai.inferers import sliding_window_inference

    t_start = time.perf_counter()
    deadline = t_start + job.get("seconds", 1e9)
    device = torch.device(job.get("device", "cpu"))
    preset = PRESETS[job["preset"]]
    model_name = job["model"]
    full_depth = preset["patch"][2]
    depth = job.get("depth") or full_depth
    batch = job.get("batch") or (1 if device.type == "cpu" else preset["batch"])
    k = preset["num_classes"]
    tiny = preset.get("tiny", False)
    amp = bool(job.get("amp", False))
    amp_dtype = job.get("amp_dtype") or "auto"
    res: Dict = {
        "preset": job["preset"], "model": model_name, "device": str(device), "batch": batch,
        "preset_depth": full_depth, "measured_depth": depth, "amp": amp,
        "use_checkpoint": bool(job.get("use_checkpoint", False)), "phases": list(job["phases"]),
        "fused_attention": bool(job.get("fused_attention", True)), "status": "running",
    }
    if amp:
        from scripts.precision import resolve_amp_dtype

        res["amp_dtype"] = str(resolve_amp_dtype(device, amp_dtype)).replace("torch.", "")
    if job.get("label"):
        res["label"] = job["label"]

    def save() -> None:
        write_json(partial_path, res)

    patch = [preset["patch"][0], preset["patch"][1], depth]
    try:
        if model_name == "dynunet":
            model, plan = build_dynunet(patch, k, tiny=tiny)
            res["config"] = {"strides": plan["strides"], "filters": plan["filters"], "deep_supervision": True}
            loss_fn, roi = deep_supervised_dice_ce(k), list(patch)
        elif model_name == "swinunetr":
            model = build_swinunetr(k, tiny=tiny)
            roi = swin_patch(patch)
            res["config"] = {"feature_size": 12 if tiny else 48, "padded_patch": roi}
            loss_fn = deep_supervised_dice_ce(k)
        elif model_name in MASKSAM_BACKBONES:
            model = build_masksam(model_name, job["preset"], depth, use_checkpoint=res["use_checkpoint"],
                                  fused_attention=res["fused_attention"])
            res["config"] = {"num_queries": preset["num_queries"], "num_classes": k,
                             "sam_upsample": preset["sam_upsample"][model_name], "sam_size": model.sam_size}
            loss_fn, roi = masksam_loss(k), list(patch)
        else:
            raise ValueError(f"unknown model {model_name!r}; choose from {MASKSAM_BACKBONES + BASELINES}")
    except NotApplicable as err:
        res.update(status="not applicable", reason=str(err))
        save()
        return res
    model = model.to(device)
    res["patch"] = roi
    res["params_total_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    res["params_trainable_m"] = round(sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6, 2)
    res["build_s"] = round(time.perf_counter() - t_start, 2)
    res["base_gib"] = round((torch.cuda.memory_allocated() if device.type == "cuda" else PeakMemory.rss_bytes())
                            / GIB, 3)
    image, label = synthetic_pair(batch, roi, k, device)
    warmup, repeats = job.get("warmup", 1), job.get("repeats", 3)
    tag = f"{job['preset']}/{model_name}"
    save()

    def autocast():
        return amp_autocast(device, amp, amp_dtype)

    for phase in job["phases"]:
        if time.perf_counter() > deadline:
            res[f"{phase}_skipped"] = "time allowance used up"
            continue
        res["current_phase"] = phase
        save()
        if phase == "infer":
            model.eval()

            def step():
                with torch.no_grad(), autocast():
                    model(image)

            with PeakMemory(device) as mem:
                t = timed_runs(step, device, warmup, repeats, deadline, f"{tag} infer patch", log)
            res.update(infer_patch_s=t["median_s"], infer_patch_runs=t["runs"], infer_patch_all_s=t["all_s"],
                       peak_infer_gib=mem.gib)
        elif phase == "train":
            model.train()
            optimiser = sgd(model, 1e-3)
            scaler = torch.amp.GradScaler(device.type, enabled=amp)  # skips steps with non-finite grads

            def step():
                train_step(model, loss_fn, optimiser, scaler, image, label, amp, amp_dtype)

            with PeakMemory(device) as mem:
                t = timed_runs(step, device, warmup, repeats, deadline, f"{tag} train step", log)
            res.update(train_step_s=t["median_s"], train_step_runs=t["runs"], train_step_all_s=t["all_s"],
                       peak_train_gib=mem.gib)
            del optimiser
        elif phase == "flops":
            # Executed FLOPs (torch.utils.flop_counter): checkpointed blocks count their recomputation too.
            model.train()
            optimiser = sgd(model, 1e-3)
            scaler = torch.amp.GradScaler(device.type, enabled=amp)
            res["train_step_flops"] = count_flops(
                lambda: train_step(model, loss_fn, optimiser, scaler, image, label, amp, amp_dtype))
            model.eval()

            def forward():
                with torch.no_grad(), autocast():
                    model(image)

            res["infer_patch_flops"] = count_flops(forward)
            del optimiser
        elif phase == "volume":
            model.eval()
            vol_shape = list(preset["volume"])
            volume = torch.rand(1, 1, *vol_shape, device=device)

            def step():
                with torch.no_grad(), autocast():
                    sliding_window_inference(volume, roi, 1, model, overlap=0.5, mode="gaussian")

            with PeakMemory(device) as mem:
                # The model is warm from the patch phase; a whole volume is timed without a further warm-up.
                t = timed_runs(step, device, job.get("volume_warmup", 0), job.get("volume_repeats", 1), deadline,
                               f"{tag} volume {vol_shape}", log)
            res.update(infer_volume_s=t["median_s"], infer_volume_runs=t["runs"], peak_volume_gib=mem.gib,
                       volume=vol_shape, volume_windows=sliding_windows(vol_shape, roi))
            del volume
        save()
    res.pop("current_phase", None)
    res["status"] = "ok"
    res["max_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 3)
    save()
    return res


def finalise(res: Dict) -> Dict:
    """Scale depth-reduced measurements to the preset depth and estimate missing volume figures."""
    preset = PRESETS[res["preset"]]
    if res.get("status") not in ("ok", "partial"):
        return res
    scale = res["preset_depth"] / res["measured_depth"]
    if scale != 1:
        res["estimate"] = True
        res["estimate_note"] = (f"measured at depth {res['measured_depth']}, scaled x{scale:g} to depth "
                                f"{res['preset_depth']} (time x D/d; memory = base + (peak - base) x D/d)")
        for key in ("infer_patch_s", "train_step_s"):
            if res.get(key) is not None:
                res[f"{key}_measured"] = res[key]
                res[key] = round(res[key] * scale, 3)
        for key in ("peak_infer_gib", "peak_train_gib"):
            if res.get(key) is not None:
                res[f"{key}_measured"] = res[key]
                res[key] = round(res["base_gib"] + (res[key] - res["base_gib"]) * scale, 2)
    if res.get("infer_volume_s") is None and res.get("infer_patch_s") is not None and res.get("batch") == 1:
        roi = res.get("patch") or list(preset["patch"])
        roi = roi[:2] + [preset["patch"][2]] if res["model"] != "swinunetr" else roi
        windows = sliding_windows(preset["volume"], roi)
        res["volume"], res["volume_windows"] = list(preset["volume"]), windows
        res["infer_volume_s"] = round(windows * res["infer_patch_s"], 2)
        res["infer_volume_estimate"] = True
    return res


# --------------------------------------------------------------------------------------------- parent
def available_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable"):
                return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return 8.0


def child_rss_gib(pid: int) -> float:
    """RSS of a process and its children (GiB)."""
    total = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS"):
                total += int(line.split()[1]) * 1024
    except OSError:
        return 0.0
    return total / GIB


def run_subprocess(job: Dict, max_rss_gib: float) -> Dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = [sys.executable, __file__, "--worker", json.dumps(job), "--json", out]
        proc = subprocess.Popen(cmd)
        peak, reason = 0.0, None
        hard_deadline = time.monotonic() + job["seconds"] + 120  # build time + grace
        while proc.poll() is None:
            rss = child_rss_gib(proc.pid)
            peak = max(peak, rss)
            if rss > max_rss_gib:
                reason = f"stopped: process RSS passed the {max_rss_gib:.1f} GiB guard"
            elif time.monotonic() > hard_deadline:
                reason = "stopped: time allowance exceeded"
            if reason:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                break
            time.sleep(0.05)
        res = json.loads(Path(out).read_text()) if os.path.exists(out) else {}
        res.setdefault("preset", job["preset"])
        res.setdefault("model", job["model"])
        res["guard_peak_rss_gib"] = round(peak, 2)
        if reason:
            phase = res.pop("current_phase", None)
            res["status"] = "partial" if any(res.get(m) is not None for m in METRICS) else "stopped"
            res["reason"] = reason + (f" during phase '{phase}'" if phase else "")
        elif proc.returncode != 0:
            res["status"] = "error"
            res["reason"] = f"worker exited with code {proc.returncode}"
        return res


def memory_fallback(res: Dict, job: Dict) -> Optional[Dict]:
    """A MaskSAM job stopped by the RSS guard is re-run at half its depth for the phases it did not finish
    (figures then scaled and flagged as estimates); ``None`` when that is not possible."""
    if "RSS" not in str(res.get("reason", "")) or job["model"] not in MASKSAM_BACKBONES:
        return None
    depth = job.get("depth") or PRESETS[job["preset"]]["patch"][2]
    if depth <= 1:
        return None
    done = {"infer": "infer_patch_s", "train": "train_step_s", "volume": "infer_volume_s"}
    phases = [p for p in job["phases"] if res.get(done[p]) is None and p != "volume"]
    return dict(job, depth=max(1, depth // 2), phases=phases) if phases else None


def result_key(r: Dict) -> str:
    key = f"{r['preset']}/{r.get('label') or r['model']}"
    return key + (f"@d={r['measured_depth']}" if r.get("estimate") else "")


def ratios_to_dynunet(results: List[Dict]) -> Dict:
    table: Dict = {}
    for preset in dict.fromkeys(r["preset"] for r in results):
        refs = [r for r in results if r["preset"] == preset and r["model"] == "dynunet"]
        if not refs:
            continue
        for r in results:
            if r["preset"] != preset or r["model"] == "dynunet":
                continue
            ref = next((d for d in refs if d.get("batch") == r.get("batch")), refs[0])  # same batch when measured
            table[result_key(r)] = {m: ratio(r.get(m), ref.get(m)) for m in METRICS}
    return table


FIGURES_SCHEMA = {
    "backbone": "model: vit_b, lite_medsam, ... or dynunet (the reference)",
    "preset": "bench preset (common.PRESETS); patch = [H, W, D] of one training/inference patch",
    "batch": "patches per training step",
    "amp": "autocast on (CUDA: bf16 where supported, else fp16)",
    "checkpointing": "activation checkpointing of the image-encoder blocks (use_checkpoint)",
    "fused": "fused SDPA attention in the ViT encoder (fused_attention); false = SAM's explicit attention",
    "peak_rss_gb": "peak resident memory of the training phase, GiB (2**30 bytes), whole process incl. weights "
                   "and interpreter (CPU); CUDA max allocated on GPU",
    "step_s": "median seconds of one training step (forward, loss, backward, clip, SGD)",
    "infer_patch_s": "median seconds of one eval forward of one patch (batch 1), when measured",
    "peak_infer_rss_gb": "peak resident memory of the inference phase, GiB",
    "status": "ok | not run | partial | stopped | error | skipped; reason says why",
    "estimate": "true when a figure is scaled from a smaller depth (speed_memory.finalise)",
}


def compact_figures(output: Dict, source: Optional[str]) -> Dict:
    """One flat record per configuration (schema :data:`FIGURES_SCHEMA`), for the memory estimator."""
    records = []
    for r in output["results"]:
        records.append({
            "backbone": r["model"], "preset": r["preset"], "label": r.get("label"),
            "patch": r.get("patch") or list(PRESETS[r["preset"]]["patch"]), "batch": r.get("batch"),
            "amp": bool(r.get("amp")), "checkpointing": bool(r.get("use_checkpoint")),
            "fused": bool(r.get("fused_attention", True)) if r["model"] in MASKSAM_BACKBONES else None,
            "peak_rss_gb": r.get("peak_train_gib"), "step_s": r.get("train_step_s"),
            "infer_patch_s": r.get("infer_patch_s"), "peak_infer_rss_gb": r.get("peak_infer_gib"),
            "status": r.get("status"), "reason": r.get("reason"), "estimate": bool(r.get("estimate")),
        })
    return {"schema": FIGURES_SCHEMA, "device": output["args"].get("device"), "environment": output["environment"],
            "source": source, "figures": records}


def fmt(v, digits=2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def print_table(results: List[Dict], ratios: Dict) -> None:
    log("\npreset/model                 infer patch s (xDyn)   train step s (xDyn)   volume s (xDyn)    "
        "peak infer/train GiB  notes")
    for r in results:
        key = result_key(r)
        q = ratios.get(key, {})
        note = r.get("status", "")
        if r.get("estimate"):
            note += f" est@d={r['measured_depth']}"
        if r.get("infer_volume_estimate"):
            note += " vol=est"
        if r.get("reason"):
            note += f" ({r['reason']})"
        log(f"{key:28s} {fmt(r.get('infer_patch_s')):>8s} ({fmt(q.get('infer_patch_s')):>6s})   "
            f"{fmt(r.get('train_step_s')):>8s} ({fmt(q.get('train_step_s')):>6s})   "
            f"{fmt(r.get('infer_volume_s'), 1):>8s} ({fmt(q.get('infer_volume_s')):>6s})   "
            f"{fmt(r.get('peak_infer_gib')):>6s}/{fmt(r.get('peak_train_gib')):<6s}        {note}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plan", choices=sorted(PLANS), help="a predefined job list (default: cpu without CUDA)")
    ap.add_argument("--preset", help="comma-separated presets (overrides --plan)")
    ap.add_argument("--models", default="dynunet,swinunetr,lite_medsam,vit_b,vit_h",
                    help="comma-separated models for --preset")
    ap.add_argument("--depth", type=int, help="measure MaskSAM at this depth and scale (estimate)")
    ap.add_argument("--phases", default="infer,train,volume")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, help="default: 1 on CPU, the preset batch (2) on GPU")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--amp", action="store_true", help="autocast (fp16 on CUDA, bf16 on CPU)")
    ap.add_argument("--use-checkpoint", action="store_true", help="MaskSAM activation checkpointing")
    ap.add_argument("--explicit-attention", action="store_true",
                    help="MaskSAM with SAM's explicit attention (fused_attention: false), the code before issue 13")
    ap.add_argument("--budget", type=float, default=1800, help="seconds for the whole run; later jobs are skipped")
    ap.add_argument("--job-seconds", type=float, default=420, help="time allowance of one job")
    ap.add_argument("--max-rss-gib", type=float, help="stop a job whose RSS passes this (default 80%% of free RAM)")
    ap.add_argument("--inprocess", action="store_true", help="no subprocess per job (smoke tests)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--figures-json", help="also write one compact record per configuration here (memory estimator)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        measure(json.loads(args.worker), args.json)
        return 0

    if args.preset:
        jobs = [(p, m, args.depth if m in MASKSAM_BACKBONES else None, tuple(args.phases.split(",")))
                for p in args.preset.split(",") for m in args.models.split(",")]
    else:
        jobs = PLANS[args.plan or ("gpu" if args.device.startswith("cuda") else "cpu")]
    max_rss = args.max_rss_gib or round(min(0.8 * available_gib(), 64.0), 1)
    env = environment()
    env["cpu_model"] = cpu_model_name()
    log(f"speed_memory: {len(jobs)} jobs, budget {args.budget:.0f} s, RSS guard {max_rss} GiB, "
        f"load {env.get('load_avg_1_5_15')}")
    results: List[Dict] = []
    t0 = time.monotonic()
    output = {"environment": env, "args": vars(args), "results": results}
    for preset, model, depth, phases, *options in jobs:
        options = dict(options[0]) if options else {}  # per-job overrides of the command-line settings
        left = args.budget - (time.monotonic() - t0)
        job = dict(preset=preset, model=model, depth=depth, phases=list(phases), device=args.device,
                   batch=args.batch, warmup=args.warmup, repeats=args.repeats, amp=args.amp,
                   use_checkpoint=args.use_checkpoint, fused_attention=not args.explicit_attention,
                   seconds=min(args.job_seconds, left))
        job.update(options)
        if job.get("not_run") or left < 30:
            reason = job.get("not_run") or "run budget used up"
            results.append({"preset": preset, "model": model, "label": job.get("label"), "batch": job["batch"],
                            "use_checkpoint": job["use_checkpoint"], "amp": job["amp"],
                            "fused_attention": job["fused_attention"], "status": "not run" if job.get("not_run")
                            else "skipped", "reason": reason})
            log(f"\n== {job.get('label') or preset + '/' + model}: not run ({reason})")
            continue
        log(f"\n== {job.get('label') or preset + '/' + model} depth={depth or 'preset'} phases={','.join(phases)} "
            f"(allowance {job['seconds']:.0f} s, {left:.0f} s of budget left)")
        res = measure(job) if args.inprocess else run_subprocess(job, max_rss)
        results.append(finalise(res))
        retry = memory_fallback(res, job)
        if retry and args.budget - (time.monotonic() - t0) > 60:
            retry["seconds"] = min(args.job_seconds, args.budget - (time.monotonic() - t0))
            log(f"\n== {preset}/{model}: did not fit under {max_rss} GiB; measuring at depth {retry['depth']} "
                f"to estimate phases {','.join(retry['phases'])}")
            results.append(finalise(run_subprocess(retry, max_rss)))
        output["ratios_to_dynunet"] = ratios_to_dynunet(results)
        output["elapsed_s"] = round(time.monotonic() - t0, 1)
        write_json(args.json, output)
        log(f"   -> {res.get('status')} {res.get('reason', '')}")
    output["ratios_to_dynunet"] = ratios_to_dynunet(results)
    output["elapsed_s"] = round(time.monotonic() - t0, 1)
    write_json(args.json, output)
    if args.figures_json:
        write_json(args.figures_json, compact_figures(output, args.json))
    print_table(results, output["ratios_to_dynunet"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
