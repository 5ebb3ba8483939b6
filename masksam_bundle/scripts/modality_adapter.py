"""Modality adapter (paper section 2.6 i; spec section 3): any number of input channels -> SAM's 3 channels."""

import torch
import torch.nn as nn
from monai.networks.blocks import Convolution

_ACT = ("leakyrelu", {"negative_slope": 0.01, "inplace": True})


class ModalityAdapter(nn.Module):
    """Conv3d k3 + InstanceNorm + LeakyReLU blocks, optional in-plane x2 / x4 upsampling, 1x1x1 conv to 3.

    Works on ``(B, C_in, D, H, W)`` (depth before the in-plane axes, so a ``(1, 2, 2)`` transposed
    convolution upsamples in-plane only). No SAM pixel normalisation: the transforms normalise intensities
    and this adapter learns the rest.

    Args:
        in_channels: image channels (modalities).
        upsample: 1, 2 or 4 — in-plane factor to reach SAM's input size.
        width: hidden width (the inverted bottleneck: C_in -> width -> 3).
    """

    def __init__(self, in_channels: int, upsample: int = 1, width: int = 32) -> None:
        super().__init__()
        if upsample not in (1, 2, 4):
            raise ValueError(f"sam_upsample must be 1, 2 or 4, got {upsample}")
        layers = [Convolution(3, in_channels, width, kernel_size=3, act=_ACT, norm="instance")]
        for _ in range({1: 0, 2: 1, 4: 2}[upsample]):
            layers.append(
                Convolution(
                    3, width, width, strides=(1, 2, 2), kernel_size=(1, 2, 2), act=_ACT, norm="instance",
                    is_transposed=True, padding=0, output_padding=0,
                )
            )
        layers.append(Convolution(3, width, 3, kernel_size=1, conv_only=True))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``(B, C_in, D, H, W)`` -> ``(B, 3, D, H*up, W*up)``."""
        return self.layers(x)
