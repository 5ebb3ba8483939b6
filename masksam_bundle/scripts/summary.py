"""Print MaskSAM's trainable / frozen parameter counts for a configuration.

Run from the bundle root::

    python -m scripts.summary --backbone vit_b --image_size 256 --sam_upsample 4 --num_slices 4 --num_queries 8

Ablation switches as in the configs, e.g. ``--image_adapter vanilla --prompt_adapter vanilla --no_depth_pos_embed``.
"""

from __future__ import annotations

import argparse
import json
from typing import Dict, List, Optional

from .adapters import IMAGE_ADAPTERS, PROMPT_ADAPTERS
from .network import PROMPT_MODES, MaskSAM


def main(argv: Optional[List[str]] = None) -> Dict[str, int]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="vit_b")
    parser.add_argument("--checkpoint", default=None, help="not needed: counts do not depend on the weights")
    parser.add_argument("--in_channels", type=int, default=1)
    parser.add_argument("--num_classes", type=int, default=4)
    parser.add_argument("--num_queries", type=int, default=8)
    parser.add_argument("--num_slices", type=int, default=4)
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--sam_upsample", type=int, default=1)
    parser.add_argument("--decoder_channels", type=int, nargs="+", default=None,
                        help="prompt-generator stage widths, coarsest first (default: the release's)")
    parser.add_argument("--prompt_mode", default="mask_avg_box", choices=PROMPT_MODES)
    parser.add_argument("--image_adapter", default="dconv", choices=IMAGE_ADAPTERS)
    parser.add_argument("--prompt_adapter", default="dmlp", choices=PROMPT_ADAPTERS)
    parser.add_argument("--no_depth_pos_embed", dest="depth_pos_embed", action="store_false")
    args = vars(parser.parse_args(argv))
    net = MaskSAM(**args)
    counts = net.parameter_counts()
    print(json.dumps({**args, "decoder_widths": net.prompt_generator.widths, **counts}))
    return counts


__all__ = ["main"]


if __name__ == "__main__":
    main()
