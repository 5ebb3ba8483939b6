"""GPU figures in a few minutes: MaskSAM ``vit_b`` ACDC preset against DynUNet, with and without AMP.

On a CUDA machine it measures, for the ACDC preset (256×256×4 patch, batch 2, N=8, K=4; ``vit_b`` ×4 up to 1024):

* training throughput — iterations/s and slices/s (forward + loss + backward + clip + SGD step);
* peak CUDA memory (max allocated) of the training step, without AMP, with AMP (fp16 autocast + GradScaler),
  and with AMP plus activation checkpointing in the encoder (``use_checkpoint``);
* inference time per patch and per ACDC-sized volume (256×256×10, sliding window, overlap 0.5, Gaussian);

and the same for DynUNet (nnU-Net-like), then writes everything as JSON with the GPU model and date. Warm-up
iterations are excluded; medians of the timed iterations. The whole run stops starting new jobs after
``--max-seconds`` (default 480 s, so a run stays under 10 minutes).

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
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_model_name, environment, ratio, write_json  # noqa: E402  (sets OMP_WAIT_POLICY first)

import torch  # noqa: E402

from speed_memory import finalise, measure  # noqa: E402


def log(msg: str) -> None:
    print(msg, flush=True)


def jobs_for(preset: str, masksam: str) -> List[Dict]:
    """(label, job) pairs in priority order."""
    phases = ["train", "infer", "volume"]
    return [
        dict(label=f"{masksam} fp32", model=masksam, amp=False, phases=phases),
        dict(label=f"{masksam} amp", model=masksam, amp=True, phases=phases),
        dict(label="dynunet fp32", model="dynunet", amp=False, phases=phases),
        dict(label="dynunet amp", model="dynunet", amp=True, phases=phases),
        dict(label=f"{masksam} amp+checkpoint", model=masksam, amp=True, use_checkpoint=True, phases=["train"]),
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="smoke size: the tiny preset with vit_t (runs on CPU)")
    ap.add_argument("--batch", type=int, help="default: the preset batch (2)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--max-seconds", type=float, default=480)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        log("gpu_figures: no CUDA device here; run it on a GPU machine (or --device cpu --tiny for a smoke run)")
        return 2
    preset, masksam = ("tiny", "vit_t") if args.tiny else ("acdc", "vit_b")
    if args.tiny:
        args.warmup, args.repeats = min(args.warmup, 1), min(args.repeats, 2)

    env = environment()
    env["cpu_model"] = cpu_model_name()
    out: Dict = {"environment": env, "args": vars(args), "preset": preset, "results": {}}
    log(f"gpu_figures on {env.get('gpu', 'CPU ' + env['cpu_model'])}, {env['date_utc']}")
    t0 = time.monotonic()
    for spec in jobs_for(preset, masksam):
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
        if res.get("train_step_s"):
            slices = res["batch"] * res["measured_depth"]
            res["train_iters_per_s"] = round(1 / res["train_step_s"], 3)
            res["train_slices_per_s"] = round(slices / res["train_step_s"], 2)
        out["results"][label] = res
        write_json(args.json, out)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    ref = {k.split()[1]: v for k, v in out["results"].items() if k.startswith("dynunet")}
    out["ratios_to_dynunet"] = {
        label: {m: ratio(r.get(m), ref.get(label.split()[1], {}).get(m))
                for m in ("train_step_s", "infer_patch_s", "infer_volume_s", "peak_train_gib")}
        for label, r in out["results"].items() if not label.startswith("dynunet") and label.split()[1] in ref
    }
    out["elapsed_s"] = round(time.monotonic() - t0, 1)
    write_json(args.json, out)
    log("\nlabel                      it/s    slices/s  train GiB  patch s   volume s")
    for label, r in out["results"].items():
        log(f"{label:26s} {r.get('train_iters_per_s', '-')!s:>7s} {r.get('train_slices_per_s', '-')!s:>9s} "
            f"{r.get('peak_train_gib', '-')!s:>9s}  {r.get('infer_patch_s', '-')!s:>7s}  {r.get('infer_volume_s', '-')!s:>8s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
