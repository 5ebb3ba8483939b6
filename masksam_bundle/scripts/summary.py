"""Print MaskSAM's trainable / frozen parameter counts for a configuration.

Run from the bundle root::

    python -m scripts.summary --backbone vit_b --image_size 256 --sam_upsample 4 --num_slices 4 --num_queries 8
"""

import argparse
import json
import warnings

from .network import MaskSAM


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="vit_b")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--in_channels", type=int, default=1)
    parser.add_argument("--num_classes", type=int, default=4)
    parser.add_argument("--num_queries", type=int, default=8)
    parser.add_argument("--num_slices", type=int, default=4)
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--sam_upsample", type=int, default=1)
    args = vars(parser.parse_args(argv))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "built without a SAM checkpoint": counts do not depend on weights
        net = MaskSAM(**args)
    counts = net.parameter_counts()
    print(json.dumps({**args, **counts}))
    return counts


if __name__ == "__main__":
    main()
