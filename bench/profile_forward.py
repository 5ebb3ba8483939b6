"""Where MaskSAM's forward spends its time: seconds per module (forward hooks) and the top operators
(``torch.profiler``), for one eval forward after a warm-up.

    python bench/profile_forward.py --backbone lite_medsam --image-size 256 --depth 4 --queries 8 \\
        --json bench/results/profile_lite_medsam.json
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_model_name, environment, write_json  # noqa: E402  (sets OMP_WAIT_POLICY first)

import torch  # noqa: E402

GROUPS = {
    "image_encoder": "image encoder (frozen SAM + adapters)",
    "prompt_generator": "prompt generator (3D U-Net decoder)",
    "decoder": "mask decoder (prompt encoder + two-way transformer + heads)",
    "decoder.transformer": "  of which two-way transformer",
    "modality_adapter": "modality adapter",
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", default="lite_medsam")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--sam-upsample", type=int, default=1)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--queries", type=int, default=8)
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    from scripts import MaskSAM
    from scripts.adapters import DConvAdapter, DMLPAdapter

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = MaskSAM(backbone=args.backbone, num_classes=args.classes, num_queries=args.queries,
                      num_slices=args.depth, image_size=args.image_size, sam_upsample=args.sam_upsample).eval()
    x = torch.rand(1, 1, args.image_size, args.image_size, args.depth)

    seconds = collections.defaultdict(float)
    started = {}

    def pre(key):
        def hook(module, inputs):
            started[id(module)] = time.perf_counter()
        return hook

    def post(key):
        def hook(module, inputs, output):
            seconds[key] += time.perf_counter() - started[id(module)]
        return hook

    for name, module in net.named_modules():
        key = None
        if isinstance(module, DConvAdapter):
            key = "DConvAdapters (encoder)" if name.startswith("image_encoder") else "DConvAdapters (decoder)"
        elif isinstance(module, DMLPAdapter):
            key = "DMLPAdapters"
        elif name in GROUPS:
            key = GROUPS[name]
        if key:
            module.register_forward_pre_hook(pre(key))
            module.register_forward_hook(post(key))

    with torch.no_grad():
        net(x)  # warm-up
        seconds.clear()
        t0 = time.perf_counter()
        net(x)
        total = time.perf_counter() - t0
        module_seconds = dict(seconds)  # the timed forward only (the profiled one below runs the hooks too)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            net(x)
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[: args.top]
    op_total = sum(e.self_cpu_time_total for e in prof.key_averages())
    out = {
        "environment": {**environment(), "cpu_model": cpu_model_name()}, "args": vars(args),
        "forward_s": round(total, 2),
        "modules_s": {k: round(v, 2) for k, v in sorted(module_seconds.items(), key=lambda kv: -kv[1])},
        "top_ops": [{"op": e.key, "self_s": round(e.self_cpu_time_total / 1e6, 2),
                     "share": round(e.self_cpu_time_total / op_total, 3), "calls": e.count} for e in ops],
    }
    write_json(args.json, out)
    print(f"eval forward {total:.2f} s  ({args.backbone}, B=1, D={args.depth}, N={args.queries}, {args.image_size}²)")
    for k, v in out["modules_s"].items():
        print(f"  {k:62s} {v:7.2f} s  {100 * v / total:5.1f} %")
    print("top operators (self CPU, profiled forward):")
    for e in out["top_ops"]:
        print(f"  {e['op']:32s} {e['self_s']:7.2f} s  {100 * e['share']:5.1f} %  ({e['calls']} calls)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
