"""Simulated-annotator benchmark of the prompt-only assist on ACDC (per structure and slice).

The standard protocol of interactive segmentation (RITM / SAM style), per structure (RV, Myo, LV) on every
slice where it is present, on the ACDC validation patients:

* **box protocol:** the tight ground-truth box of the structure on the slice, then corrective clicks;
* **click protocol:** a first positive click at the interior point farthest from the structure's boundary, then
  corrective clicks.

Each corrective click goes to the centre (the point farthest from its boundary) of the largest connected error
region of the current prediction: positive on a missed region, negative on a false one. Every round decodes the
box (if any) and all clicks so far; with ``--mask-prompt on`` the previous round's low-resolution logits are the
mask prompt too (SAM's own interactive loop). Reported per structure: Dice after the box, box + 1, box + 2 clicks;
Dice after 1, 3, 5 clicks; NoC@85 / NoC@90 (clicks needed to reach that Dice, ``--max-clicks`` when never
reached, RITM's convention) and the share of structures that never reach it; seconds per interaction (the first
on a slice runs the image encoder, the later ones hit the embedding cache; a zero-shot click round with a box
reuses that box's decode and runs no decoder pass); and the 3D Dice of one box on the structure's largest slice
propagated through the volume.

The assist's rules are the defaults of ``PromptAssist`` (tight-box ring rule, click edits, zero-shot clicks with a
box not decoded); ``--ring-rule off``, ``--click-edits off``, ``--decode-clicks on`` measure without them. Every
embedding of a volume stays cached while its structures and protocols run (512 MiB, about 128 slices).

    python bench/interactive_acdc.py --json bench/results/interactive_acdc_zero_shot.json
    python bench/interactive_acdc.py --patients 1 --slices 1 --max-clicks 3 --json /tmp/i.json    # smoke size
    python bench/interactive_acdc.py --report bench/results/interactive_acdc_zero_shot.json      # Markdown tables
    python bench/interactive_acdc.py --checkpoint masksam_bundle/models/model.pt \\
        --config masksam_bundle/configs/inference.yaml --json bench/results/interactive_acdc_trained.json
"""

from __future__ import annotations

from common import ACDC_DIR, BUNDLE_ROOT, cpu_model_name, environment, median, write_json  # noqa: I001 (sets OMP)

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

from scripts.prompt_assist import PromptAssist, tight_box, zero_shot_network

STRUCTURES = {"RV": 1, "Myo": 2, "LV": 3}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------- annotator
def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    total = int(pred.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int((pred & truth).sum()) / total


def deepest_point(region: np.ndarray) -> Tuple[int, int]:
    """The voxel of ``region`` farthest from its boundary (the image border counts as boundary)."""
    dist = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
    i, j = np.unravel_index(int(dist.argmax()), dist.shape)
    return int(i), int(j)


def next_click(pred: np.ndarray, truth: np.ndarray) -> Optional[Tuple[Tuple[int, int], bool]]:
    """Centre of the largest connected error region and its type (True = missed -> positive click)."""
    best = None
    for error, positive in ((truth & ~pred, True), (pred & ~truth, False)):
        labels, count = ndimage.label(error)
        if count == 0:
            continue
        sizes = np.bincount(labels.ravel())[1:]
        k = int(sizes.argmax())
        if best is None or sizes[k] > best[0]:
            best = (int(sizes[k]), labels == k + 1, positive)
    return None if best is None else (deepest_point(best[1]), best[2])


class Annotator:
    """Runs the protocols for one slice and structure and records Dice and seconds per interaction."""

    def __init__(self, assist: PromptAssist, key: str, volume: torch.Tensor, mask_prompt: bool,
                 timings: Dict[str, List[float]]) -> None:
        self.assist, self.key, self.volume, self.mask_prompt, self.timings = assist, key, volume, mask_prompt, timings

    def _predict(self, z: int, box, fg, bg, previous):
        start, decodes = time.perf_counter(), self.assist.decoder_runs
        pred = self.assist.predict_slice(self.key, self.volume, z, box=box, foreground=fg, background=bg,
                                         mask_prompt=previous if self.mask_prompt else None)
        kind = ("encoder+decoder" if pred.encoded else "decoder (cached)" if self.assist.decoder_runs > decodes
                else "no decoder pass (box decode reused)")
        self.timings[kind].append(time.perf_counter() - start)
        return pred

    def run(self, z: int, truth: np.ndarray, box, first_click: bool, clicks: int, stop_at: float,
            min_clicks: int) -> List[float]:
        """Dice after the first prompt (box or first click) and after each corrective click."""
        fg: List[List[int]] = []
        bg: List[List[int]] = []
        if first_click:
            fg.append(list(deepest_point(truth)))
        pred = self._predict(z, box, fg, bg, None)
        scores = [dice(pred.mask.numpy(), truth)]
        while len(fg) + len(bg) < clicks:
            if scores[-1] >= stop_at and len(fg) + len(bg) >= min_clicks:
                break
            click = next_click(pred.mask.numpy(), truth)
            if click is None:
                break
            (fg if click[1] else bg).append(list(click[0]))
            pred = self._predict(z, box, fg, bg, pred)
            scores.append(dice(pred.mask.numpy(), truth))
        return scores


def noc(scores: Sequence[float], threshold: float, max_clicks: int) -> Tuple[int, bool]:
    """(clicks to reach ``threshold``, reached) for a click-protocol Dice list (index 0 = 1 click)."""
    for n, s in enumerate(scores, start=1):
        if s >= threshold:
            return n, True
    return max_clicks, False


def at(scores: Sequence[float], index: int) -> float:
    """Dice after ``index`` prompts; the last value when the protocol stopped earlier (it stops only at a perfect
    or above-target Dice after the minimum number of clicks, so later clicks would not have been placed)."""
    return scores[min(index, len(scores) - 1)]


# --------------------------------------------------------------------------------------------- models
def load_trained(checkpoint: str, configs: Sequence[str]):
    """The bundle's network with trained weights and the intensity normalisation of its config."""
    from monai.bundle import ConfigParser

    from scripts.checkpointing import load_model_weights

    parser = ConfigParser()
    parser.read_config(list(configs))
    parser["bundle_root"] = str(BUNDLE_ROOT)
    if parser.get("pixdim") or parser.get("orientation"):
        raise SystemExit("--checkpoint: this benchmark scores on the image grid; the config resamples or reorients "
                         "(pixdim / orientation set), which it does not support")
    net = parser.get_parsed_content("network_def", instantiate=True)
    load_model_weights(net, checkpoint, parser.get_parsed_content("model_settings"))
    return net.eval(), parser.get_parsed_content("intensity_transform", instantiate=True)


# --------------------------------------------------------------------------------------------- report
def render(data: Dict) -> str:
    """Markdown tables of one results JSON (for docs/benchmarks.md; no figure typed by hand)."""
    env, a = data["environment"], data["args"]
    lines = [f"Mode: {data['mode']}; {data['volumes']} volumes of {len(data['patients'])} validation patients "
             f"({', '.join(data['patients'])}); mask prompt from the previous round: {a['mask_prompt']}; candidate "
             f"selection by clicks: {a.get('click_selection', 'on')}; tight-box ring rule: {a.get('ring_rule', 'off')}; "
             f"click edits: {a.get('click_edits', 'off')}; clicks with a box decoded: "
             f"{a.get('decode_clicks', 'on (older run)')}; at most "
             f"{a['max_clicks']} clicks. Machine: {env.get('cpu_model')}, {env.get('cpu_count')} cores, "
             f"{env.get('torch_threads')} torch threads, load average at start {env.get('load_avg_1_5_15')} "
             f"(shared); {env.get('date_utc')}; run took {data['elapsed_s']} s.", "",
             "| structure | n | box | box+1 | box+2 | 1 click | 3 clicks | 5 clicks | NoC@85 | NoC@90 | "
             "not reaching 90 % |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in data["summary"].items():
        lines.append(f"| {name} | {s.get('n', '')} | {s['dice box']:.3f} | {s['dice box+1']:.3f} | "
                     f"{s['dice box+2']:.3f} | {s['dice 1 click']:.3f} | {s['dice 3 clicks']:.3f} | "
                     f"{s['dice 5 clicks']:.3f} | {s['NoC@85']:.2f} | {s['NoC@90']:.2f} | "
                     f"{s['NoC@90 not reached %']:.0f} % |")
    t = data["seconds_per_interaction"]
    if t:
        lines += ["", "| interaction | median s | n |", "|---|---|---|"]
        lines += [f"| {k} | {v['median']:.2f} | {v['n']} |" for k, v in t.items() if v["median"] is not None]
    if data.get("propagation_dice_3d"):
        prop = data["propagation_dice_3d"]
        lines += ["", "3D Dice of one tight box on the structure's largest slice, propagated: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in prop.items()) + "."]
    return "\n".join(lines)


def restrict(data: Dict, patients: Optional[int], skip: int = 0) -> Dict:
    """A results JSON cut to its first ``patients`` patients after the first ``skip`` (e.g. those a rule was tuned
    on); summary recomputed, timings and propagation dropped."""
    keep = data["patients"][skip:][:patients]
    records = [r for r in data["records"] if r["case"].split("_")[0] in keep]
    return {**data, "patients": keep, "volumes": len({r["case"] for r in records}), "records": records,
            "summary": summarise(records, data["args"]["max_clicks"]), "propagation_dice_3d": {},
            "seconds_per_interaction": {}, "elapsed_s": f"{data['elapsed_s']} (whole run)"}


# --------------------------------------------------------------------------------------------- main
def summarise(records: List[Dict], max_clicks: int) -> Dict:
    out: Dict = {}
    for name in STRUCTURES:
        rs = [r for r in records if r["structure"] == name]
        if not rs:
            continue
        s: Dict = {"n": len(rs)}
        for label, key, index in (("box", "box", 0), ("box+1", "box", 1), ("box+2", "box", 2),
                                  ("1 click", "clicks", 0), ("3 clicks", "clicks", 2), ("5 clicks", "clicks", 4)):
            s[f"dice {label}"] = round(float(np.mean([at(r[key], index) for r in rs])), 4)
        for thr in (0.85, 0.90):
            nocs = [noc(r["clicks"], thr, max_clicks) for r in rs]
            s[f"NoC@{int(thr * 100)}"] = round(float(np.mean([n for n, _ in nocs])), 2)
            s[f"NoC@{int(thr * 100)} not reached %"] = round(100.0 * float(np.mean([not ok for _, ok in nocs])), 1)
        out[name] = s
    keys = [k for k in next(iter(out.values())) if k != "n"] if out else []
    out["mean"] = {k: round(float(np.mean([out[n][k] for n in STRUCTURES if n in out])), 4) for k in keys}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", type=Path, default=ACDC_DIR)
    ap.add_argument("--patients", type=int, default=None, help="first N validation patients (default: all)")
    ap.add_argument("--skip-patients", type=int, default=0,
                    help="with --report: leave out the first N patients (e.g. those a rule was tuned on)")
    ap.add_argument("--frames", default="frame01,frame02", help="which frames of each patient")
    ap.add_argument("--slices", type=int, default=None, help="at most this many slices per volume (central ones)")
    ap.add_argument("--structures", default="RV,Myo,LV")
    ap.add_argument("--max-clicks", type=int, default=10)
    ap.add_argument("--mask-prompt", choices=("on", "off"), default="off",
                    help="previous round's logits as mask prompt (SAM's loop); see the docs for both measured")
    ap.add_argument("--click-selection", choices=("on", "off"), default="on",
                    help="keep the decoder candidate that honours most clicks (on) or SAM's plain choice (off)")
    ap.add_argument("--ring-rule", choices=("on", "off"), default="on",
                    help="tight-box ring rule: a mask clear of all four box sides is a ring's hole (PromptAssist)")
    ap.add_argument("--click-edits", choices=("on", "off"), default="on",
                    help="apply each click the chosen mask contradicts as a local edit (PromptAssist)")
    ap.add_argument("--decode-clicks", choices=("auto", "on", "off"), default="auto",
                    help="give clicks that come with a box to the decoder (auto: only a trained model)")
    ap.add_argument("--checkpoint", default=None, help="a trained model.pt: benchmark the trained prompt path")
    ap.add_argument("--config", nargs="+", default=[str(BUNDLE_ROOT / "configs" / "inference.yaml")])
    ap.add_argument("--no-propagation", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--report", nargs="+", default=None, help="print the Markdown tables of results JSON file(s)")
    args = ap.parse_args(argv)
    if args.report:
        results = [json.loads(Path(p).read_text()) for p in args.report]
        if args.patients is not None or args.skip_patients:  # same patients: summaries recomputed from the records
            results = [restrict(r, args.patients, args.skip_patients) for r in results]
        print("\n\n".join(render(r) for r in results))
        return 0
    torch.set_grad_enabled(False)

    data = json.loads((args.data_dir / "dataset.json").read_text())
    frames = [f.strip() for f in args.frames.split(",") if f.strip()]
    items = [e for e in data["validation"] if any(f in e["image"] for f in frames)]
    patients = sorted({Path(e["image"]).name.split("_")[0] for e in items})
    if args.patients is not None:
        patients = patients[: args.patients]
        items = [e for e in items if Path(e["image"]).name.split("_")[0] in patients]
    structures = {n: STRUCTURES[n] for n in args.structures.split(",")}

    rules = dict(select_by_clicks=args.click_selection == "on", ring_rule=args.ring_rule == "on",
                 click_edits=args.click_edits == "on",
                 decode_clicks=None if args.decode_clicks == "auto" else args.decode_clicks == "on")
    if args.checkpoint:
        net, intensity = load_trained(args.checkpoint, args.config)
        assist, mode = PromptAssist(net, trained=True, **rules), "trained"
    else:
        net, intensity = zero_shot_network(), None
        assist = PromptAssist(net, trained=False, **rules)
        mode = "zero-shot (LiteMedSAM, adapters at zero)"
    log(f"interactive_acdc: {mode}; {len(items)} volumes of {len(patients)} patients; mask prompt {args.mask_prompt}")

    started = time.time()
    env = dict(environment(), cpu_model=cpu_model_name())
    timings: Dict[str, List[float]] = {"encoder+decoder": [], "decoder (cached)": [],
                                       "no decoder pass (box decode reused)": []}
    records: List[Dict] = []
    propagation: List[Dict] = []
    for item in items:
        case = Path(item["image"]).name.replace(".nii.gz", "")
        image = np.asarray(nib.load(str(args.data_dir / item["image"])).dataobj, dtype=np.float32)
        label = np.rint(np.asarray(nib.load(str(args.data_dir / item["label"])).dataobj)).astype(np.int64)
        volume = torch.from_numpy(image)[None]
        if intensity is not None:
            volume = torch.as_tensor(intensity({"image": volume})["image"]).float()
        annotator = Annotator(assist, case, volume, args.mask_prompt == "on", timings)
        zs = list(range(image.shape[2]))
        if args.slices is not None and len(zs) > args.slices:
            mid = len(zs) // 2
            zs = zs[max(0, mid - args.slices // 2): max(0, mid - args.slices // 2) + args.slices]
        for z in zs:
            for name, k in structures.items():
                truth = label[..., z] == k
                if not truth.any():
                    continue
                box = tight_box(torch.from_numpy(truth))
                box_scores = annotator.run(z, truth, box, False, 2, 2.0, 2)
                click_scores = annotator.run(z, truth, None, True, args.max_clicks, 0.90, 5)
                records.append({"case": case, "z": z, "structure": name, "area": int(truth.sum()),
                                "box": [round(v, 4) for v in box_scores], "clicks": [round(v, 4) for v in click_scores]})
        if not args.no_propagation:
            for name, k in structures.items():
                truth3d = label == k
                if not truth3d.any():
                    continue
                z0 = int(truth3d.sum((0, 1)).argmax())
                seed = assist.predict_slice(case, volume, z0, box=tight_box(torch.from_numpy(truth3d[..., z0])))
                pred3d = assist.propagate(case, volume, seed).mask.numpy()
                propagation.append({"case": case, "structure": name, "seed_slice": z0,
                                    "slices_truth": int(truth3d.any((0, 1)).sum()),
                                    "slices_predicted": int(pred3d.any((0, 1)).sum()),
                                    "dice_3d": round(dice(pred3d, truth3d), 4)})
        log(f"  {case}: {len(records)} structure-slices so far, {time.time() - started:.0f} s")

    summary = summarise(records, args.max_clicks)
    prop_summary = {n: round(float(np.mean([p["dice_3d"] for p in propagation if p["structure"] == n])), 4)
                    for n in structures if any(p["structure"] == n for p in propagation)}
    output = {
        "environment": env,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "mode": mode,
        "patients": patients,
        "volumes": len(items),
        "summary": summary,
        "seconds_per_interaction": {k: {"median": median(v), "n": len(v)} for k, v in timings.items()},
        "embedding_cache": {"entries": len(assist.cache), "bytes": assist.cache.bytes, "hits": assist.cache.hits,
                            "misses": assist.cache.misses},
        "propagation_dice_3d": prop_summary,
        "propagation": propagation,
        "records": records,
        "elapsed_s": round(time.time() - started, 1),
    }
    write_json(args.json, output)
    log(json.dumps({"summary": summary, "seconds_per_interaction": output["seconds_per_interaction"],
                    "propagation_dice_3d": prop_summary}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
