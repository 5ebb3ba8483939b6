"""Cost of test-time mirroring: seconds per ACDC volume with and without, side by side in one run.

Builds the network, preprocessing and inferer from the bundle's own ``configs/inference.yaml`` (plus the preset
overlays), then predicts each validation volume with ``tta_mirror`` off and on, alternating which goes first,
and reports the median seconds per volume and their ratio. The weights are random: time does not depend on them.

Usage (repo root)::

    python bench/tta_cost.py --preset lite_medsam --volumes 3 --json bench/results/tta_cost_cpu.json
    python bench/tta_cost.py --preset tiny --volumes 1 --crop 64,64,4 --mirror-axes 0 --json /tmp/t.json  # CI smoke
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ACDC_DIR, BUNDLE_ROOT, cpu_model_name, environment, median, ratio, write_json  # noqa: E402

import torch  # noqa: E402

# preset -> (overlay files after inference.yaml, overrides)
PRESETS: Dict[str, tuple] = {
    "lite_medsam": ([], {"backbone": "lite_medsam", "sam_upsample": 1, "patch_size": [256, 256, 4]}),
    "tiny": (["tiny.yaml"], {}),
}


def log(msg: str) -> None:
    print(msg, flush=True)


def build(preset: str):
    from monai.bundle import ConfigParser

    overlays, overrides = PRESETS[preset]
    parser = ConfigParser()
    parser.read_config([str(BUNDLE_ROOT / "configs" / f) for f in ["inference.yaml", *overlays]])
    parser["bundle_root"] = str(BUNDLE_ROOT)
    parser["device"] = "$torch.device('cpu')"
    for key, value in overrides.items():
        parser[key] = value
    network = parser.get_parsed_content("network").eval()
    preprocessing = parser.get_parsed_content("preprocessing")
    inferer = parser.get_parsed_content("inferer")
    return network, preprocessing, inferer, dict(parser.get_parsed_content("model_settings"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="lite_medsam")
    ap.add_argument("--data-dir", type=Path, default=ACDC_DIR)
    ap.add_argument("--volumes", type=int, default=3, help="first N validation volumes")
    ap.add_argument("--crop", type=lambda s: [int(v) for v in s.split(",")],
                    help="centre-crop each preprocessed volume to H,W,D (smoke runs)")
    ap.add_argument("--mirror-axes", type=lambda s: [int(v) for v in s.split(",")],
                    help="override the configs' tta_mirror_axes, e.g. 0 (smoke runs)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    from monai.transforms import CenterSpatialCrop

    torch.manual_seed(0)
    network, preprocessing, inferer, settings = build(args.preset)
    if args.mirror_axes is not None:
        inferer.mirror_axes = tuple(args.mirror_axes)
    from scripts.data import load_datalist

    items = load_datalist(str(args.data_dir / "dataset.json"), "validation", limit=args.volumes)
    env = environment()
    env["cpu_model"] = cpu_model_name()
    out: Dict = {"environment": env, "args": {k: str(v) for k, v in vars(args).items()}, "settings": settings,
                 "mirror_axes": list(inferer.mirror_axes), "per_volume": []}
    plain_s: List[float] = []
    mirrored_s: List[float] = []
    for i, item in enumerate(items):
        image = preprocessing({"image": item["image"]})["image"]
        if args.crop:
            image = CenterSpatialCrop(args.crop)(image)
        x = image.unsqueeze(0)
        order = (False, True) if i % 2 == 0 else (True, False)  # alternate which variant runs first
        times = {}
        for mirror in order:
            inferer.tta_mirror = mirror
            t0 = time.perf_counter()
            with torch.no_grad():
                inferer(x, network)
            times[mirror] = time.perf_counter() - t0
        plain_s.append(times[False])
        mirrored_s.append(times[True])
        name = Path(item["image"]).name
        out["per_volume"].append({"image": name, "shape": list(x.shape[2:]), "plain_s": round(times[False], 2),
                                  "mirrored_s": round(times[True], 2)})
        log(f"{name} {list(x.shape[2:])}: plain {times[False]:.1f} s, mirrored {times[True]:.1f} s")
        # the summary so far after every volume: a run stopped early still leaves consistent figures
        out["volumes_done"] = len(plain_s)
        out["median_plain_s"] = round(median(plain_s), 2)
        out["median_mirrored_s"] = round(median(mirrored_s), 2)
        out["ratio"] = ratio(out["median_mirrored_s"], out["median_plain_s"])
        write_json(args.json, out)
    log(f"median per volume: plain {out['median_plain_s']} s, mirrored {out['median_mirrored_s']} s, "
        f"ratio {out['ratio']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
