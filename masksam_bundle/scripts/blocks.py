"""The 3D convolution blocks shared by the modality adapter and the prompt generator (MONAI ``Convolution``).

Every block is convolution + InstanceNorm + LeakyReLU(0.01), as in the authors' release. Tensors are
``(B, C, D, H, W)``: depth before the in-plane axes, so a ``(1, 2, 2)`` kernel acts in-plane only.
"""

from __future__ import annotations

import torch.nn as nn
from monai.networks.blocks import Convolution

__all__ = ["LEAKY_RELU", "conv_norm_act", "upsample_inplane"]

LEAKY_RELU = ("leakyrelu", {"negative_slope": 0.01, "inplace": True})


def conv_norm_act(in_channels: int, out_channels: int, kernel_size: int = 3) -> nn.Module:
    """Conv3d (same padding) + InstanceNorm + LeakyReLU: ``(B, C_in, D, H, W)`` -> ``(B, C_out, D, H, W)``."""
    return Convolution(3, in_channels, out_channels, kernel_size=kernel_size, act=LEAKY_RELU, norm="instance")


def upsample_inplane(in_channels: int, out_channels: int) -> nn.Module:
    """ConvTranspose3d (1, 2, 2) + InstanceNorm + LeakyReLU: ``(B, C_in, D, H, W)`` -> ``(B, C_out, D, 2H, 2W)``."""
    return Convolution(
        3, in_channels, out_channels, strides=(1, 2, 2), kernel_size=(1, 2, 2), act=LEAKY_RELU, norm="instance",
        is_transposed=True, padding=0, output_padding=0,
    )
