"""Which exact attention is fastest for SAM's ViT blocks: forward + backward of one ``vit_b`` attention.

Variants (all give SAM's result with the decomposed relative-position bias, to float tolerance):

* ``explicit`` — SAM's own computation: ``(N, N)`` logits, bias added, softmax, kept for backward;
* ``mask`` — ``scaled_dot_product_attention`` with the bias materialised as an additive float mask ``(N, N)``;
* ``fused`` — ``scaled_dot_product_attention`` without a mask, the bias folded into the query/key width
  (head dim ``64 + h + w``, value zero-padded to it) — what ``scripts.attention.sam_attention`` runs.

Blocks: ``global`` (the 64 x 64 token grid of the 1024 frame, 12 heads of 64) and ``window`` (the same grid cut
into 25 windows of 14 x 14, as SAM pads 64 to 70). ``--scope block`` times the whole adapted ViT-B block
(attention, MLP, adapters) instead of the attention alone; ``--precisions fp32,bf16`` adds CPU bf16 autocast (the
quick check of whether bf16 helps on a CPU). The SAM weights are frozen and the input needs a gradient,
as in MaskSAM training. Each (block, variant) runs in its own subprocess (warm-up, then timed runs), so the peak
RSS of one cannot hide in another's; ``--rounds`` repeats the whole sweep, so that load changes on a shared
machine hit every variant alike. The time is the median over all timed runs of all rounds.

    python bench/attention_variants.py --rounds 3 --repeats 1 --json bench/results/attention_variants_cpu.json
    python bench/attention_variants.py --scope block --variants fused --precisions fp32,bf16 \\
        --json bench/results/block_precision_cpu.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import GIB, PeakMemory, cpu_model_name, environment, median, write_json  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

VARIANTS = ("explicit", "mask", "fused")
BLOCKS = ("global", "window")
VIT_B = dict(dim=768, heads=12, grid=64, window=14)


def masked_sdpa(attn, x: torch.Tensor) -> torch.Tensor:
    """SDPA with the decomposed bias materialised as an additive ``(B, heads, N, N)`` float mask."""
    from scripts.attention import _qkv, rel_pos_logits

    b, h, w, _ = x.shape
    q, k, v = _qkv(attn, x)
    heads, n, d = q.shape[1:]
    rel_h, rel_w = rel_pos_logits(q.reshape(b * heads, n, d), attn.rel_pos_h, attn.rel_pos_w, (h, w))
    bias = (rel_h.view(b, heads, n, h, 1) + rel_w.view(b, heads, n, 1, w)).reshape(b, heads, n, n)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scale)
    return attn.proj(out.permute(0, 2, 1, 3).reshape(b, h, w, -1))


def build(block: str, variant: str, slices: int, grid: int, scope: str):
    """The module to time and its input ``x`` (requires grad): one attention, or one adapted ViT-B block."""
    from functools import partial

    from segment_anything.modeling.image_encoder import Attention, Block, window_partition
    from scripts.attention import sam_attention
    from scripts.image_encoder import AdaptedViTBlock

    torch.manual_seed(0)
    window = 0 if block == "global" else VIT_B["window"]
    x = torch.randn(slices, grid, grid, VIT_B["dim"])
    if scope == "block":
        if variant == "mask":
            raise ValueError("--scope block runs the network's own attention: variants explicit or fused")
        sam_block = Block(VIT_B["dim"], VIT_B["heads"], qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                          use_rel_pos=True, window_size=window, input_size=(grid, grid))
        module = AdaptedViTBlock(sam_block, num_slices=slices, fused_attention=variant == "fused")
        for adapter in (module.attn_adapter, module.mlp_adapter):  # trained adapters are not zero
            torch.nn.init.normal_(adapter.up.weight, std=0.02)
        sam_block.requires_grad_(False)
        return module, x.requires_grad_(True)
    side = window or grid
    attn = Attention(VIT_B["dim"], VIT_B["heads"], use_rel_pos=True, input_size=(side, side))
    torch.nn.init.normal_(attn.rel_pos_h, std=0.02)
    torch.nn.init.normal_(attn.rel_pos_w, std=0.02)
    attn.requires_grad_(False)
    if window:
        x = window_partition(x, window)[0]  # (slices * 25, 14, 14, C)
    run = {"explicit": lambda t: sam_attention(attn, t, fused=False), "fused": lambda t: sam_attention(attn, t),
           "mask": lambda t: masked_sdpa(attn, t)}[variant]
    return run, x.requires_grad_(True)


def worker(block: str, variant: str, slices: int, warmup: int, repeats: int, grid: int = VIT_B["grid"],
           scope: str = "attention", precision: str = "fp32") -> Dict:
    module, x = build(block, variant, slices, grid, scope)

    def run(t: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            return module(t).float()

    def step() -> None:
        x.grad = None
        run(x).square().mean().backward()


    base = PeakMemory.rss_bytes()
    times: List[float] = []
    with PeakMemory(torch.device("cpu")) as mem:
        for i in range(warmup + repeats):
            t0 = time.perf_counter()
            step()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return {"block": block, "variant": variant, "scope": scope, "precision": precision, "slices": slices,
            "tokens": int(x[0].numel() // VIT_B["dim"]),
            "batch": int(x.shape[0]), "fwd_bwd_s": round(median(times), 4), "all_s": [round(t, 4) for t in times],
            "peak_rss_above_start_gib": round((mem.peak_bytes - base) / GIB, 3),
            "max_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 3)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slices", type=int, default=1, help="slices in the batch (B*D)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per subprocess")
    ap.add_argument("--rounds", type=int, default=3, help="sweeps over all (block, variant) pairs")
    ap.add_argument("--grid", type=int, default=VIT_B["grid"], help="tokens per side (64 = the 1024 frame)")
    ap.add_argument("--scope", choices=("attention", "block"), default="attention")
    ap.add_argument("--precisions", default="fp32", help="comma-separated: fp32, bf16 (CPU autocast)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--blocks", default=",".join(BLOCKS))
    ap.add_argument("--json")
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        block, variant, precision = args.worker
        print(json.dumps(worker(block, variant, args.slices, args.warmup, args.repeats, args.grid, args.scope,
                                precision)))
        return 0

    env = {**environment(), "cpu_model": cpu_model_name()}
    configs = [(b, v, p) for b in args.blocks.split(",") for v in args.variants.split(",")
               for p in args.precisions.split(",")]
    runs: Dict = {c: [] for c in configs}
    for round_ in range(args.rounds):
        for config in configs:
            cmd = [sys.executable, __file__, "--worker", *config, "--slices", str(args.slices), "--warmup",
                   str(args.warmup), "--repeats", str(args.repeats), "--grid", str(args.grid), "--scope", args.scope]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                runs[config].append({"status": "error", "reason": proc.stderr.strip().splitlines()[-1:]})
            else:
                runs[config].append({**json.loads(proc.stdout.strip().splitlines()[-1]), "status": "ok"})
            r = runs[config][-1]
            print(f"round {round_ + 1}: {' '.join(config):24s} fwd+bwd {r.get('fwd_bwd_s', '-')!s:>8s} s   peak RSS "
                  f"above start {r.get('peak_rss_above_start_gib', '-')!s:>6s} GiB   {r.get('reason', '')}", flush=True)
    results = []
    for (block, variant, precision), rs in runs.items():
        ok = [r for r in rs if r["status"] == "ok"]
        if not ok:
            results.append({"block": block, "variant": variant, "precision": precision, "status": "error",
                            "reason": rs[-1].get("reason")})
            continue
        times = [t for r in ok for t in r["all_s"]]
        results.append({**ok[0], "fwd_bwd_s": round(median(times), 4), "all_s": times, "rounds": len(ok),
                        "peak_rss_above_start_gib": max(r["peak_rss_above_start_gib"] for r in ok),
                        "max_rss_gib": max(r["max_rss_gib"] for r in ok), "status": "ok"})
    for r in results:  # speed-ups within a block: against explicit fp32 attention and against fp32
        same_block = [q for q in results if q["block"] == r["block"] and q["status"] == "ok"]
        explicit = next((q for q in same_block if q["variant"] == "explicit" and q["precision"] == "fp32"), None)
        fp32 = next((q for q in same_block if q["variant"] == r["variant"] and q["precision"] == "fp32"), None)
        if r["status"] == "ok" and explicit:
            r["speedup_vs_explicit"] = round(explicit["fwd_bwd_s"] / r["fwd_bwd_s"], 2)
        if r["status"] == "ok" and fp32 and r["precision"] != "fp32":
            r["speedup_vs_fp32"] = round(fp32["fwd_bwd_s"] / r["fwd_bwd_s"], 2)
    write_json(args.json, {"environment": env, "args": vars(args), "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
