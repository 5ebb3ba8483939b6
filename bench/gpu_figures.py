"""GPU figures in a few minutes: MaskSAM ``vit_b`` ACDC preset against DynUNet, with and without AMP.

On a CUDA machine it measures, for the ACDC preset (256×256×4 patch, batch 2, N=8, K=4; ``vit_b`` ×4 up to 1024),
per configuration:

* training throughput — iterations/s and slices/s (forward + loss + backward + clip + SGD step);
* peak CUDA memory (max allocated) of the training step and of inference;
* model-FLOP utilisation (MFU): the FLOPs of one training step (and one eval forward) counted with
  ``torch.utils.flop_counter.FlopCounterMode``, divided by the median time and by the GPU's dense peak for the
  precision used (bf16/fp16 tensor cores under AMP; TF32 or FP32 otherwise) — a table by device name
  (``common.GPU_PEAK_TFLOPS``: H100, H200, A100), or ``--peak-tflops``. Counted FLOPs are those executed:
  the fused attention's zero padding and checkpointing's recomputation count too;
* inference time per patch and per ACDC-sized volume (256×256×10, sliding window, overlap 0.5, Gaussian);

for AMP (bf16 where supported: ``scripts.precision``), AMP with SAM's explicit attention (the code before
issue 13), fp32, AMP + activation checkpointing and AMP in fp16, and the same for DynUNet (nnU-Net-like); then
writes everything as JSON with the GPU model and date. Warm-up iterations are excluded; medians of the timed
iterations. The run stops starting new jobs after ``--max-seconds`` (default 480 s, so it stays under 10 minutes).

Usage (repo root)::

    python bench/gpu_figures.py --json bench/results/gpu_figures.json
    python bench/gpu_figures.py --device cpu --tiny --json /tmp/gpu_tiny.json   # CI smoke (vit_t, CPU)
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402  (sets OMP_WAIT_POLICY first)
    cpu_model_name, environment, gpu_peak_tflops, ratio, write_json,
)

import torch  # noqa: E402

from speed_memory import finalise, measure  # noqa: E402


def log(msg: str) -> None:
    print(msg, flush=True)


def jobs_for(preset: str, masksam: str) -> List[Dict]:
    """Jobs in priority order (the time budget cuts the end of the list first)."""
    full, short = ["train", "infer", "volume", "flops"], ["train", "infer", "flops"]
    return [
        dict(label=f"{masksam} amp", model=masksam, amp=True, phases=full),
        dict(label="dynunet amp", model="dynunet", amp=True, phases=full),
        dict(label=f"{masksam} amp explicit-attention", model=masksam, amp=True, fused_attention=False, phases=short),
        dict(label=f"{masksam} fp32", model=masksam, amp=False, phases=short),
        dict(label="dynunet fp32", model="dynunet", amp=False, phases=short),
        dict(label=f"{masksam} amp+checkpoint", model=masksam, amp=True, use_checkpoint=True, phases=["train", "flops"]),
        dict(label=f"{masksam} amp fp16", model=masksam, amp=True, amp_dtype="float16", phases=["train", "infer"]),
    ]


def precision_of(res: Dict) -> str:
    """``bf16 | fp16`` under AMP, else ``tf32`` when float32 matmuls may use TF32, else ``fp32``."""
    if res.get("amp"):
        return {"bfloat16": "bf16", "float16": "fp16"}[res["amp_dtype"]]
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"


def add_rates(res: Dict, device_name: str, peak_override: Optional[float]) -> None:
    """slices/s, achieved TFLOP/s and MFU from a measured job (in place)."""
    if res.get("train_step_s"):
        res["train_iters_per_s"] = round(1 / res["train_step_s"], 3)
        res["train_slices_per_s"] = round(res["batch"] * res["measured_depth"] / res["train_step_s"], 2)
    precision = precision_of(res)
    peak = peak_override or gpu_peak_tflops(device_name, precision)
    res["precision"], res["peak_tflops"] = precision, peak
    res["peak_source"] = "--peak-tflops" if peak_override else ("GPU_PEAK_TFLOPS" if peak else "unknown device")
    for kind, time_key in (("train_step", "train_step_s"), ("infer_patch", "infer_patch_s")):
        flops, seconds = res.get(f"{kind}_flops"), res.get(time_key)
        if flops and seconds:
            tflops = flops / seconds / 1e12
            res[f"{kind}_tflops_per_s"] = round(tflops, 3)
            res[f"{kind}_mfu"] = round(tflops / peak, 4) if peak else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="smoke size: the tiny preset with vit_t (runs on CPU)")
    ap.add_argument("--batch", type=int, help="default: the preset batch (2)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--max-seconds", type=float, default=480)
    ap.add_argument("--peak-tflops", type=float,
                    help="the device's dense peak TFLOPS for the MFU (default: by GPU name, common.GPU_PEAK_TFLOPS)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_figures: --device cuda but torch sees no CUDA device here; run it on a GPU machine, or use "
              "--device cpu --tiny for a smoke run", file=sys.stderr)
        return 2
    preset, masksam = ("tiny", "vit_t") if args.tiny else ("acdc", "vit_b")
    if args.tiny:
        args.warmup, args.repeats = min(args.warmup, 1), min(args.repeats, 2)

    env = environment()
    env["cpu_model"] = cpu_model_name()
    device_name = env.get("gpu", "") if args.device.startswith("cuda") else f"CPU {env['cpu_model']}"
    out: Dict = {"environment": env, "args": vars(args), "preset": preset, "results": {}}
    log(f"gpu_figures on {env.get('gpu', 'CPU ' + env['cpu_model'])}, {env['date_utc']}")
    t0 = time.monotonic()
    specs = jobs_for(preset, masksam)
    if not args.device.startswith("cuda"):  # the smoke run: CPU autocast is bf16 only here
        specs = [spec for spec in specs if spec.get("amp_dtype") != "float16"]
    for spec in specs:
        left = args.max_seconds - (time.monotonic() - t0)
        label = spec.pop("label")
        if left < 20:
            out["results"][label] = {"status": "skipped", "reason": "time budget used up"}
            continue
        job = dict(preset=preset, device=args.device, batch=args.batch, warmup=args.warmup, repeats=args.repeats,
                   volume_warmup=1 if not args.tiny else 0, volume_repeats=3 if not args.tiny else 1,
                   seconds=left, **spec)
        log(f"\n== {label}")
        res = finalise(measure(job))
        add_rates(res, device_name, args.peak_tflops)
        out["results"][label] = res
        write_json(args.json, out)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    ref = {bool(r.get("amp")): r for k, r in out["results"].items() if k.startswith("dynunet") and r.get("model")}
    out["ratios_to_dynunet"] = {
        label: {m: ratio(r.get(m), ref[bool(r.get("amp"))].get(m))
                for m in ("train_step_s", "infer_patch_s", "infer_volume_s", "peak_train_gib")}
        for label, r in out["results"].items()
        if not label.startswith("dynunet") and r.get("model") and bool(r.get("amp")) in ref
    }
    out["elapsed_s"] = round(time.monotonic() - t0, 1)
    write_json(args.json, out)
    log("\nlabel                              it/s  slices/s  train GiB  train MFU  patch s  infer GiB  volume s")
    for label, r in out["results"].items():
        log(f"{label:32s} {r.get('train_iters_per_s', '-')!s:>6s} {r.get('train_slices_per_s', '-')!s:>9s} "
            f"{r.get('peak_train_gib', '-')!s:>10s} {r.get('train_step_mfu', '-')!s:>10s} "
            f"{r.get('infer_patch_s', '-')!s:>8s} {r.get('peak_infer_gib', '-')!s:>10s} {r.get('infer_volume_s', '-')!s:>9s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
