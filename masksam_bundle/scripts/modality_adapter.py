"""Modality adapter (paper section 2.6 i): any number of input channels -> SAM's 3 channels."""

from __future__ import annotations

import torch
import torch.nn as nn

from .blocks import conv_norm_act, upsample_inplane

UPSAMPLE_STEPS = {1: 0, 2: 1, 4: 2}


def check_upsample(upsample: int) -> int:
    """The number of in-plane x2 steps of a ``sam_upsample`` factor (1, 2 or 4); anything else raises."""
    if upsample not in UPSAMPLE_STEPS:
        raise ValueError(f"sam_upsample must be 1, 2 or 4, got {upsample}")
    return UPSAMPLE_STEPS[upsample]


class ModalityAdapter(nn.Module):
    """Conv3d k3 blocks, optional in-plane x2 / x4 upsampling, then Conv3d k3 blocks at SAM's resolution.

    The release's ACDC network (x4): a k3 block C_in -> 16, transposed convolutions 16 -> 16 -> 32, k3 blocks
    32 -> 32 and 32 -> 3, each with InstanceNorm + LeakyReLU. Fewer upsampling steps drop transposed
    convolutions (x2: 16 -> 32; x1: the first k3 block after the stem takes 16 -> 32).

    Works on ``(B, C_in, D, H, W)`` (depth before the in-plane axes, so a ``(1, 2, 2)`` transposed
    convolution upsamples in-plane only). No SAM pixel normalisation: the transforms normalise intensities
    and this adapter learns the rest.

    Args:
        in_channels: image channels (modalities).
        upsample: 1, 2 or 4 — in-plane factor to reach SAM's input size.
        stem_width: width of the input block and of all but the last upsampling step (16).
        width: width at SAM's resolution (32).
    """

    def __init__(self, in_channels: int, upsample: int = 1, stem_width: int = 16, width: int = 32) -> None:
        super().__init__()
        steps = check_upsample(upsample)
        layers = [conv_norm_act(in_channels, stem_width)]
        for step in range(steps):
            layers.append(upsample_inplane(stem_width, width if step == steps - 1 else stem_width))
        layers.append(conv_norm_act(width if steps else stem_width, width))
        layers.append(conv_norm_act(width, 3))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``(B, C_in, D, H, W)`` -> ``(B, 3, D, H*up, W*up)``."""
        return self.layers(x)


__all__ = ["ModalityAdapter", "UPSAMPLE_STEPS", "check_upsample"]
