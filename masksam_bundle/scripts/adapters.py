"""Depth-aware adapters (paper section 2.5, Fig. 3; spec section 5).

Both adapters are bottlenecks whose last Linear is zero-initialised, so a freshly built MaskSAM computes
exactly what the frozen SAM computes. Slices travel folded into the batch as ``(b d)``; each adapter
unfolds them to reach the depth axis.
"""

import torch
import torch.nn as nn


class DConvAdapter(nn.Module):
    """3D depth-convolution adapter for image tokens.

    Linear C -> C/4, GELU, depth-wise convolution along the slice axis over the un-windowed token grid with an
    inner skip, channel LayerNorm, GELU, Linear C/4 -> C (zero-initialised).

    The convolution has kernel ``(3, 1, 1)`` over ``(D, h, w)`` and one group per channel: it mixes the same
    (h, w) token of neighbouring slices only. In-plane mixing is the attention's job; the adapter adds what a
    2D model lacks, the depth context.

    Args:
        dim: token width C.
        num_slices: D, the number of slices folded into the batch.
        reduction: bottleneck factor (4 in the paper).
    """

    def __init__(self, dim: int, num_slices: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(dim // reduction, 1)
        self.num_slices = num_slices
        self.down = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.depth_conv = nn.Conv3d(hidden, hidden, kernel_size=(3, 1, 1), padding=(1, 0, 0), groups=hidden)
        self.norm = nn.LayerNorm(hidden)
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``(B*D, h, w, C)`` tokens on the full (un-windowed) grid -> same shape."""
        bd, h, w, _ = x.shape
        d = self.num_slices
        z = self.act(self.down(x))  # (B*D, h, w, c)
        c = z.shape[-1]
        volume = z.reshape(bd // d, d, h, w, c).permute(0, 4, 1, 2, 3)  # (B, c, D, h, w)
        conv = self.depth_conv(volume).permute(0, 2, 3, 4, 1).reshape(bd, h, w, c)
        z = z + self.act(self.norm(conv))
        return self.up(z)


class DMLPAdapter(nn.Module):
    """3D depth-MLP adapter for prompt tokens.

    Linear 256 -> 64, GELU, an inverted-bottleneck MLP over the depth axis (D -> 4D -> D) with inner skip,
    Linear 64 -> 256 (zero-initialised).

    Args:
        dim: token width (256 in SAM's decoder).
        num_slices: D.
        hidden: bottleneck width (64).
        depth_expansion: the depth MLP's expansion (4).
    """

    def __init__(self, dim: int, num_slices: int, hidden: int = 64, depth_expansion: int = 4) -> None:
        super().__init__()
        self.num_slices = num_slices
        self.down = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.depth_mlp = nn.Sequential(
            nn.Linear(num_slices, depth_expansion * num_slices),
            nn.GELU(),
            nn.Linear(depth_expansion * num_slices, num_slices),
        )
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``(B, D, Q, T, C)`` tokens (Q queries, T tokens each) -> same shape."""
        if x.shape[1] != self.num_slices:
            raise ValueError(f"DMLPAdapter expects {self.num_slices} slices on dim 1, got shape {tuple(x.shape)}")
        z = self.act(self.down(x))  # (B, D, Q, T, c)
        along_depth = z.movedim(1, -1)  # (B, Q, T, c, D)
        z = z + self.depth_mlp(along_depth).movedim(-1, 1)
        return self.up(z)
