"""Render the JSON written by the bench scripts as Markdown tables (for docs/benchmarks.md), so no figure is
typed by hand.

    python bench/report.py --speed bench/results/speed_cpu.json --dice bench/results/dice_acdc_cpu.json \\
        [--gpu bench/results/gpu_figures.json] [--attention bench/results/speed_acdc_attention_cpu.json] \\
        [--variants bench/results/attention_variants_cpu.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _f(v, digits=2, suffix=""):
    return "–" if v is None else f"{v:.{digits}f}{suffix}"


def _env_line(env: dict) -> str:
    where = env.get("gpu") or f"CPU {env.get('cpu_model', env.get('host_cpu'))}, {env.get('cpu_count')} cores"
    return (f"{where}; torch {env.get('torch')}, MONAI {env.get('monai')}, {env.get('torch_threads')} threads, "
            f"OMP_WAIT_POLICY={env.get('OMP_WAIT_POLICY')}; started {env.get('date_utc')}, "
            f"load average at start {env.get('load_avg_1_5_15')}")


def speed_tables(data: dict) -> str:
    lines = [f"Machine: {_env_line(data['environment'])}. Run took {data.get('elapsed_s')} s.", ""]
    ratios = data.get("ratios_to_dynunet", {})
    head = ("| preset | model | patch (H×W×D) | infer / patch s | × DynUNet | train step s | × DynUNet | "
            "volume s | × DynUNet | peak infer GiB | peak train GiB | notes |")
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for r in data["results"]:
        key = f"{r['preset']}/{r['model']}" + (f"@d={r['measured_depth']}" if r.get("estimate") else "")
        q = ratios.get(key, {})
        notes = []
        if r.get("status") not in ("ok",):
            reason = str(r.get("reason", "")).replace("stopped: ", "")
            notes.append(f"**{r.get('status')}**" + (f": {reason}" if reason else ""))
        if r.get("estimate"):
            notes.append(f"estimate: measured at D={r['measured_depth']}, scaled to D={r['preset_depth']}")
        if r.get("infer_volume_estimate"):
            notes.append(f"volume estimated: {r['volume_windows']} windows × patch time")
        elif r.get("infer_volume_s") is not None:
            notes.append(f"volume {'×'.join(map(str, r['volume']))}, {r['volume_windows']} windows, measured")
        if r["model"] == "swinunetr" and r.get("patch"):
            notes.append("patch padded to " + "×".join(map(str, r["patch"])))
        if r.get("infer_patch_runs") or r.get("train_step_runs"):
            notes.append(f"runs {r.get('infer_patch_runs', 0)}/{r.get('train_step_runs', 0)}")
        patch = "×".join(map(str, r.get("patch", []))) if r.get("patch") else "–"
        lines.append(
            f"| {r['preset']} | {r['model']} | {patch} | {_f(r.get('infer_patch_s'))} | {_f(q.get('infer_patch_s'))} | "
            f"{_f(r.get('train_step_s'))} | {_f(q.get('train_step_s'))} | {_f(r.get('infer_volume_s'), 1)} | "
            f"{_f(q.get('infer_volume_s'))} | {_f(r.get('peak_infer_gib'))} | {_f(r.get('peak_train_gib'))} | "
            f"{'; '.join(notes)} |")
    return "\n".join(lines)


def dice_table(data: dict) -> str:
    a = data["args"]
    lines = [f"Machine: {_env_line(data['environment'])}.",
             f"Budget: {a['train_seconds']} s of training per model, batch {a['batch']}, patch "
             f"{'×'.join(map(str, a['patch']))}; train {data['train_volumes']} volumes; eval {data['val_volumes']} "
             f"volumes of {data['val_patients']} patients (frames: {a['val_frames']}), sliding window overlap "
             f"{a['sw_overlap']}; transforms: {data.get('transforms')}.", "",
             "| model | iterations | s / iter | train wall s | eval wall s | RV | Myo | LV | mean Dice |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in data["models"].items():
        d = r.get("dice", {})
        lines.append(f"| {name} | {r['iterations']} | {r['s_per_iter']} | {r['train_wall_s']} | "
                     f"{r.get('eval_wall_s', '–')} | {_f(d.get('RV'), 3)} | {_f(d.get('Myo'), 3)} | "
                     f"{_f(d.get('LV'), 3)} | {_f(d.get('mean'), 3)} |")
    return "\n".join(lines)


def gpu_table(data: dict) -> str:
    lines = [f"Machine: {_env_line(data['environment'])}.", "",
             "| run | precision | it/s | slices/s | peak train GiB | train TFLOP/s | train MFU | infer / patch s | "
             "peak infer GiB | infer MFU | infer / volume s |", "|" + "---|" * 11]
    for label, r in data["results"].items():
        mfu = [_f(100 * r[k], 1, " %") if r.get(k) is not None else "–" for k in ("train_step_mfu", "infer_patch_mfu")]
        lines.append(f"| {label} | {r.get('precision', '–')} | {r.get('train_iters_per_s', '–')} | "
                     f"{r.get('train_slices_per_s', '–')} | {r.get('peak_train_gib', '–')} | "
                     f"{r.get('train_step_tflops_per_s', '–')} | {mfu[0]} | {r.get('infer_patch_s', '–')} | "
                     f"{r.get('peak_infer_gib', '–')} | {mfu[1]} | {r.get('infer_volume_s', '–')} |")
    peaks = {r.get("precision"): (r.get("peak_tflops"), r.get("peak_source")) for r in data["results"].values()
             if r.get("precision")}
    lines += ["", "MFU = counted FLOPs (torch.utils.flop_counter, as executed) / median time / dense peak: " +
              ", ".join(f"{p} {v[0]} TFLOPS ({v[1]})" for p, v in peaks.items()) + "."]
    return "\n".join(lines)


def attention_table(data: dict) -> str:
    """The issue-13 before/after table (speed_memory --plan acdc_attention)."""
    results = data["results"]
    before = next((r for r in results if r.get("label") == "vit_b explicit b1 ckpt"), {})
    dyn = {r.get("batch"): r for r in results if r["model"] == "dynunet"}
    lines = [f"Machine: {_env_line(data['environment'])}. Run took {data.get('elapsed_s')} s.", "",
             "| configuration | attention | batch | checkpointing | train step s | speed-up vs before (b1) | "
             "× DynUNet (same batch) | peak train RSS GiB | infer / patch s | peak infer RSS GiB | notes |",
             "|" + "---|" * 11]
    for r in results:
        is_sam = r["model"] != "dynunet"
        attention = ("fused" if r.get("fused_attention", True) else "explicit (before)") if is_sam else "–"
        speedup = (_f(before["train_step_s"] / r["train_step_s"], 2, "×")
                   if is_sam and before.get("train_step_s") and r.get("train_step_s") else "–")
        ref = dyn.get(r.get("batch"), {})
        vs_dyn = _f(r["train_step_s"] / ref["train_step_s"], 1, "×") if is_sam and r.get("train_step_s") and \
            ref.get("train_step_s") else "–"
        notes = []
        if r.get("status") != "ok":
            notes.append(f"**{r.get('status')}**: {r.get('reason', '')}")
        runs = [f"{k} {r[k + '_runs']}" for k in ("train_step", "infer_patch") if r.get(k + "_runs")]
        if runs:
            notes.append("timed runs: " + ", ".join(runs))
        if r.get("max_rss_gib"):
            notes.append(f"process max RSS {r['max_rss_gib']:.2f} GiB")
        lines.append(f"| {r.get('label') or r['model']} | {attention} | {r.get('batch')} | "
                     f"{('yes' if r.get('use_checkpoint') else 'no') if is_sam else '–'} | "
                     f"{_f(r.get('train_step_s'), 1)} | {speedup} | "
                     f"{vs_dyn} | {_f(r.get('peak_train_gib'))} | {_f(r.get('infer_patch_s'), 1)} | "
                     f"{_f(r.get('peak_infer_gib'))} | {'; '.join(notes)} |")
    return "\n".join(lines)


def variants_table(data: dict) -> str:
    """attention_variants.py: one vit_b attention (or whole block), forward + backward."""
    a = data["args"]
    what = "whole adapted ViT-B block" if a.get("scope") == "block" else "attention alone"
    lines = [f"Machine: {_env_line(data['environment'])}. {what}, {a['slices']} slice(s); each figure the median of "
             f"{a.get('rounds', 1)} round(s) × {a['repeats']} timed run(s) after {a['warmup']} warm-up(s), "
             "configurations interleaved.", "",
             "| block | variant | precision | tokens per window | fwd+bwd s | speed-up vs explicit fp32 | "
             "speed-up vs fp32 | peak RSS above start GiB |", "|" + "---|" * 8]
    for r in data["results"]:
        lines.append(f"| {r['block']} | {r['variant']} | {r.get('precision', 'fp32')} | {r.get('tokens', '–')} | "
                     f"{_f(r.get('fwd_bwd_s'))} | {_f(r.get('speedup_vs_explicit'))} | {_f(r.get('speedup_vs_fp32'))} | "
                     f"{_f(r.get('peak_rss_above_start_gib'))} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--speed", type=Path)
    ap.add_argument("--dice", type=Path)
    ap.add_argument("--gpu", type=Path)
    ap.add_argument("--attention", type=Path, help="speed_memory.py --plan acdc_attention output")
    ap.add_argument("--variants", type=Path, help="attention_variants.py output")
    args = ap.parse_args(argv)
    for path, render in ((args.speed, speed_tables), (args.dice, dice_table), (args.gpu, gpu_table),
                         (args.attention, attention_table), (args.variants, variants_table)):
        if path:
            print(render(json.loads(path.read_text())), end="\n\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
