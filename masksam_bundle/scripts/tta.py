"""Test-time mirroring (nnU-Net's default): average a network's output over mirrored copies of its input.

``MirrorEnsemble`` wraps any network ``(B, C, *spatial) -> (B, K, *spatial)``; ``MirroringSlidingWindowInferer``
is MONAI's ``SlidingWindowInferer`` that wraps the network in it per window, so every window is predicted
``2 ** len(mirror_axes)`` times (8 for the three axes MaskSAM trains mirrored) and the averaged outputs are
blended as usual. ``tta_mirror=False`` gives the plain sliding window.
"""

from __future__ import annotations

import itertools
from typing import Callable, List, Sequence, Tuple, Union

import torch
import torch.nn as nn
from monai.inferers import SlidingWindowInferer

__all__ = ["MirrorEnsemble", "MirroringSlidingWindowInferer", "mirror_combinations", "parse_flag"]


def parse_flag(value: Union[bool, int, str], name: str) -> bool:
    """A yes/no setting as a bool. The bundle CLI passes ``--tta_mirror false`` as the *string* ``"false"``
    (which ``bool()`` would read as true), so strings are parsed and anything unclear is refused."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise ValueError(f"{name} must be true or false, got {value!r}")


def mirror_combinations(axes: Sequence[int]) -> List[Tuple[int, ...]]:
    """Every subset of ``axes`` (spatial axis indices), the empty one (no flip) first."""
    axes = tuple(int(a) for a in axes)
    return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


class MirrorEnsemble(nn.Module):
    """Mean of ``flip(network(flip(x, s)), s)`` over every subset ``s`` of the spatial ``axes``.

    Args:
        network: ``(B, C, *spatial) -> (B, K, *spatial)``; for MaskSAM in eval mode the per-voxel class
            probabilities, so the mean is again a distribution.
        axes: spatial axes to mirror (0 = H, 1 = W, 2 = D for MONAI's ``(B, C, H, W, D)``).

    The mean is accumulated in float32 (AMP outputs may be float16).
    """

    def __init__(self, network: Callable[[torch.Tensor], torch.Tensor], axes: Sequence[int] = (0, 1, 2)) -> None:
        super().__init__()
        self.network = network
        self.axes = tuple(int(a) for a in axes)
        if len(set(self.axes)) != len(self.axes) or any(a < 0 for a in self.axes):
            raise ValueError(f"mirror axes must be distinct non-negative spatial axes, got {list(axes)}")

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        spatial = x.ndim - 2
        if self.axes and max(self.axes) >= spatial:
            raise ValueError(f"mirror axes {list(self.axes)} need {max(self.axes) + 1} spatial axes; the input "
                             f"(B, C, *spatial) has shape {tuple(x.shape)}")
        total = None
        combos = mirror_combinations(self.axes)
        for combo in combos:
            dims = [a + 2 for a in combo]
            out = self.network(torch.flip(x, dims) if dims else x, *args, **kwargs)
            out = (torch.flip(out, dims) if dims else out).float()
            total = out if total is None else total + out
        return total / len(combos)


class MirroringSlidingWindowInferer(SlidingWindowInferer):
    """``SlidingWindowInferer`` with test-time mirroring inside each window.

    Args:
        tta_mirror: average over the mirrored inputs (default, as nnU-Net); ``False`` = plain sliding window.
        mirror_axes: spatial axes to mirror; nnU-Net mirrors every axis the training mirrored.
        Other arguments: as ``monai.inferers.SlidingWindowInferer``.
    """

    def __init__(self, *args, tta_mirror: bool = True, mirror_axes: Sequence[int] = (0, 1, 2), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tta_mirror = parse_flag(tta_mirror, "tta_mirror")
        self.mirror_axes = tuple(int(a) for a in mirror_axes)
        spatial = len(self.roi_size) if isinstance(self.roi_size, Sequence) else 3
        if any(a < 0 or a >= spatial for a in self.mirror_axes):
            raise ValueError(f"mirror_axes {list(mirror_axes)} must index the {spatial} spatial axes of "
                             f"roi_size {self.roi_size}")

    def __call__(self, inputs: torch.Tensor, network: Callable, *args, **kwargs):
        if self.tta_mirror and self.mirror_axes:
            network = MirrorEnsemble(network, self.mirror_axes)
        return super().__call__(inputs, network, *args, **kwargs)
