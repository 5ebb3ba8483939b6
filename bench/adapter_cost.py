"""Per-iteration cost of the release-capacity prompt generator, modality adapter and 3x3x3 DConvAdapter
(issue 10) against the network before it, side by side in one process (interleaved runs).

"before" is the ``scripts`` package of an earlier commit (``--base``, default: the merge base with ``main``),
extracted with ``git archive`` into a temporary package; "after" is the working tree's. Both build MaskSAM
with the same arguments, so each gets its own defaults (widths, modality adapter, kernel). The "after" model
also runs with the ACDC recipe's 32768 sampled loss points ("after, 32768 points").

    python bench/adapter_cost.py --models lite_medsam:1:2,vit_t:4:4 --repeats 3 \\
        --json bench/results/adapter_cost_cpu.json

A model is ``backbone:sam_upsample:depth`` on the ACDC patch 256 x 256 (K = 4, N = 8, batch 1, fp32, SGD).
Each timed run is one training step (forward + loss + backward + clipping + SGD), and the modality adapter and
prompt generator alone (forward + backward on the same inputs). Figures are medians; compare ratios, which
come from the same run.
"""

from __future__ import annotations

from common import (  # noqa: I001  (sets OMP_WAIT_POLICY before torch is imported)
    BUNDLE_ROOT, REPO_ROOT, PeakMemory, cpu_model_name, environment, median, sgd, synthetic_pair, train_step,
    write_json,
)

import argparse
import importlib
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List

import torch

NUM_CLASSES, NUM_QUERIES, SIDE = 4, 8, 256


def load_before_package(base: str, folder: Path) -> str:
    """Extract ``masksam_bundle/scripts`` of commit ``base`` as the package ``scripts_before``; its name."""
    archive = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", base, "masksam_bundle/scripts"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    (folder / "masksam_bundle" / "scripts").rename(folder / "scripts_before")
    sys.path.insert(0, str(folder))
    return "scripts_before"


def merge_base() -> str:
    return subprocess.run(["git", "-C", str(REPO_ROOT), "merge-base", "HEAD", "main"], check=True,
                          capture_output=True, text=True).stdout.strip()


class Variant:
    """One network (and loss) to time, with its pieces exposed for the component timings."""

    def __init__(self, name: str, package: str, backbone: str, upsample: int, depth: int, num_points: int):
        network = importlib.import_module(f"{package}.network")
        loss = importlib.import_module(f"{package}.loss")
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the "before" code warns about random frozen SAM weights
            self.model = network.MaskSAM(backbone=backbone, num_classes=NUM_CLASSES, num_queries=NUM_QUERIES,
                                         num_slices=depth, image_size=SIDE, sam_upsample=upsample).train()
        self.loss = loss.MaskSAMLoss(num_classes=NUM_CLASSES, num_points=num_points, seed=0)
        self.optimiser = sgd(self.model, 1e-3)
        self.scaler = torch.amp.GradScaler("cpu", enabled=False)
        self.name, self.depth = name, depth
        self.trainable = self.model.parameter_counts()["trainable"]
        self.parts = {
            "modality adapter": sum(p.numel() for p in self.model.modality_adapter.parameters()),
            "prompt generator": sum(p.numel() for p in self.model.prompt_generator.parameters()),
        }

    def step(self, image, label) -> None:
        train_step(self.model, self.loss, self.optimiser, self.scaler, image, label, amp=False)

    def modality_adapter(self, image) -> None:
        self.model.modality_adapter(image.permute(0, 1, 4, 2, 3)).sum().backward()

    def prompt_generator(self, embedding, features) -> None:
        out = self.model.prompt_generator(embedding, features)
        (sum(m.sum() for m in out["aux_masks"]) + out["aux_boxes"].sum() + out["aux_tokens"].sum()).backward()


def interleaved(variants: List[Variant], job: Callable[[Variant], None], warmup: int, repeats: int,
                label: str) -> Dict[str, Dict]:
    """``warmup`` then ``repeats`` rounds; each round runs every variant once, in turn."""
    times: Dict[str, List[float]] = {v.name: [] for v in variants}
    for round_ in range(warmup + repeats):
        for v in variants:
            t0 = time.perf_counter()
            job(v)
            elapsed = time.perf_counter() - t0
            kind = "warm-up" if round_ < warmup else "run"
            print(f"  {label} / {v.name}: {kind} {elapsed:.2f} s", flush=True)
            if round_ >= warmup:
                times[v.name].append(elapsed)
    return {name: {"median_s": round(median(t), 3), "runs": len(t), "all_s": [round(x, 3) for x in t]}
            for name, t in times.items()}


def measure_model(spec: str, before_package: str, warmup: int, repeats: int) -> Dict:
    backbone, upsample, depth = spec.split(":")
    upsample, depth = int(upsample), int(depth)
    variants = [
        Variant("before", before_package, backbone, upsample, depth, 112 * 112),
        Variant("after", "scripts", backbone, upsample, depth, 112 * 112),
        Variant("after, 32768 points", "scripts", backbone, upsample, depth, 32768),
    ]
    image, label = synthetic_pair(1, (SIDE, SIDE, depth), NUM_CLASSES, torch.device("cpu"))
    with torch.no_grad():  # encoder outputs, the same for both versions (frozen SAM, zero-initialised adapters)
        folded = variants[1].model.modality_adapter(image.permute(0, 1, 4, 2, 3))
        folded = folded.transpose(1, 2).reshape(depth, 3, *folded.shape[-2:])
        embedding, features = variants[1].model.image_encoder(folded)
    result = {"model": spec, "backbone": backbone, "sam_upsample": upsample, "depth": depth,
              "trainable": {v.name: v.trainable for v in variants[:2]},
              "parts": {v.name: v.parts for v in variants[:2]}}
    print(f"{spec}: trainable {result['trainable']}", flush=True)
    with PeakMemory(torch.device("cpu")) as peak:
        result["train_step"] = interleaved(variants, lambda v: v.step(image, label), warmup, repeats, spec)
    result["peak_rss_gib_all_variants"] = peak.gib
    pair = variants[:2]
    result["modality_adapter"] = interleaved(pair, lambda v: v.modality_adapter(image), 1, repeats,
                                             f"{spec} modality adapter")
    result["prompt_generator"] = interleaved(pair, lambda v: v.prompt_generator(embedding, features), 1, repeats,
                                             f"{spec} prompt generator")
    for key in ("train_step", "modality_adapter", "prompt_generator"):
        before = result[key]["before"]["median_s"]
        result[key]["ratio_after_to_before"] = {
            name: round(v["median_s"] / before, 2) for name, v in result[key].items() if name != "before"
        }
    return result


def markdown(data: Dict) -> str:
    lines = [
        "| model (patch 256×256×D, batch 1) | trainable before → after | train step before | after | × | "
        "after, 32768 points | × | modality adapter × | prompt generator × |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["results"]:
        step = r["train_step"]
        lines.append(
            f"| `{r['backbone']}` ×{r['sam_upsample']}, D={r['depth']} | "
            f"{r['trainable']['before']:,} → {r['trainable']['after']:,} | {step['before']['median_s']:.2f} s | "
            f"{step['after']['median_s']:.2f} s | {step['ratio_after_to_before']['after']:.2f} | "
            f"{step['after, 32768 points']['median_s']:.2f} s | "
            f"{step['ratio_after_to_before']['after, 32768 points']:.2f} | "
            f"{r['modality_adapter']['ratio_after_to_before']['after']:.2f} "
            f"({r['modality_adapter']['before']['median_s']:.2f} → {r['modality_adapter']['after']['median_s']:.2f} s) | "
            f"{r['prompt_generator']['ratio_after_to_before']['after']:.2f} "
            f"({r['prompt_generator']['before']['median_s']:.2f} → {r['prompt_generator']['after']['median_s']:.2f} s) |"
        )
    return "\n".join(lines)


def main(argv=None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="lite_medsam:1:2,vit_t:4:4",
                        help="comma-separated backbone:sam_upsample:depth on the 256x256 ACDC patch")
    parser.add_argument("--base", default=None, help="commit of the 'before' network (default: merge base with main)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    base = args.base or merge_base()
    env = {**environment(), "cpu_model": cpu_model_name()}
    started = time.perf_counter()
    data = {"environment": env, "base_commit": base, "args": vars(args), "results": []}
    with tempfile.TemporaryDirectory() as tmp:
        package = load_before_package(base, Path(tmp))
        for spec in args.models.split(","):
            data["results"].append(measure_model(spec, package, args.warmup, args.repeats))
            data["elapsed_s"] = round(time.perf_counter() - started, 1)
            write_json(args.json, data)  # after every model: a run stopped later keeps what it measured
    print(markdown(data))
    return data


if __name__ == "__main__":
    sys.path.insert(0, str(BUNDLE_ROOT))
    main()
