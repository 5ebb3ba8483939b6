"""CPU training-step time and resident memory with glibc's default allocation and with ``keep_freed_memory``.

One LiteMedSAM MaskSAM training step (256x256x4, N = 8, K = 4, AdamW, a synthetic two-structure label) repeated
``--steps`` times in one process; per step: wall seconds, the process's system (kernel) seconds, and resident /
peak memory. Run it once per mode, one after the other on a quiet machine:

    python bench/malloc_step.py --mode default --steps 4
    python bench/malloc_step.py --mode keep --steps 5

``keep`` calls :func:`scripts.settings.keep_freed_memory` before the network is built (where ``train.yaml``'s
``initialize`` calls it); the first step faults everything in once in both modes.
"""

from __future__ import annotations

from common import BUNDLE_ROOT  # noqa: F401,I001 (sets OMP_WAIT_POLICY and the bundle import path)

import argparse
import resource
import time

import torch

from scripts.loss import MaskSAMLoss
from scripts.network import MaskSAM
from scripts.settings import keep_freed_memory


def resident_gib() -> tuple:
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(("VmRSS", "VmHWM")):
                values[line.split(":")[0]] = int(line.split()[1]) / 2**20
    return values["VmRSS"], values["VmHWM"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("default", "keep"), required=True)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    if args.mode == "keep":
        assert keep_freed_memory("cpu"), "keep_freed_memory did not apply (not glibc?)"
    torch.manual_seed(0)
    depth = 4
    net = MaskSAM("lite_medsam", num_classes=4, num_queries=8, num_slices=depth, image_size=256, sam_upsample=1)
    loss_fn = MaskSAMLoss(4, num_points=32768)
    image = torch.randn(1, 1, 256, 256, depth)
    label = torch.zeros(1, 1, 256, 256, depth)
    label[:, :, 80:150, 90:160] = 1
    label[:, :, 100:130, 110:140] = 3
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    net.train()
    for step in range(args.steps):
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.time()
        loss = loss_fn(net(image), label)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        del loss
        after = resource.getrusage(resource.RUSAGE_SELF)
        rss, peak = resident_gib()
        print(f"{args.mode} step {step} wall {time.time() - start:.1f} s, system {after.ru_stime - before.ru_stime:.1f} s, "
              f"resident/peak {rss:.1f}/{peak:.1f} GiB", flush=True)


if __name__ == "__main__":
    main()
