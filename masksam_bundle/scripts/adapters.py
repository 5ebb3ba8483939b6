"""Adapters (paper section 2.5, Fig. 3) and the variants of the ablation (paper Table 4).

Design decisions: the model card ``docs/README.md``, "Architecture".

Every adapter is a bottleneck (Linear C -> C/4, GELU, ..., Linear C/4 -> C) whose last Linear is
zero-initialised, so a freshly built MaskSAM computes exactly what the frozen SAM computes. They differ in how
they reach the depth axis D:

* ``dconv`` — :class:`DConvAdapter`, a 3D depth-wise convolution in the middle (the full model, image tokens);
* ``dmlp`` — :class:`DMLPAdapter`, an inverted-bottleneck MLP over D in the middle (the full model, prompt
  tokens; ablation B8 everywhere);
* ``dmlp_after_up`` / ``dmlp_before_down`` — a vanilla adapter with the depth MLP after the up FC / before the
  down FC (ablation B6 / B7);
* ``vanilla`` — no depth layer (Houlsby et al.; ablation B1-B5).

Two tensor layouts meet them, one per insertion site:

* image tokens: ``(B*D, h, w, C)``, slices folded into the batch (slice index inner) — :func:`image_adapter`;
* prompt tokens: ``(B, D, Q, T, C)`` — :func:`prompt_adapter`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .layout import fold_slices, unfold_slices

IMAGE_ADAPTERS = ("dconv", "dmlp", "dmlp_after_up", "dmlp_before_down", "vanilla")
PROMPT_ADAPTERS = ("dmlp", "dmlp_after_up", "dmlp_before_down", "vanilla")
REDUCTION = 4  # bottleneck width C/4 (768 -> 192 in ViT-B, 256 -> 64 in SAM's decoder)


def _zero_init(linear: nn.Linear) -> nn.Linear:
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    return linear


class DepthMLP(nn.Module):
    """Inverted-bottleneck MLP over the depth axis (D -> 4D -> D) with a skip: ``x + mlp(x)`` along dim 1.

    Args:
        num_slices: D.
        expansion: hidden depth width factor (4).
        zero_init: zero-initialise the last layer, so the block starts as the identity (needed where it is the
            adapter's last layer).
    """

    def __init__(self, num_slices: int, expansion: int = 4, zero_init: bool = False) -> None:
        super().__init__()
        self.num_slices = num_slices
        last = nn.Linear(expansion * num_slices, num_slices)
        self.mlp = nn.Sequential(
            nn.Linear(num_slices, expansion * num_slices), nn.GELU(), _zero_init(last) if zero_init else last
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``(B, D, ..., C)`` -> same shape."""
        if x.shape[1] != self.num_slices:
            raise ValueError(f"depth MLP expects {self.num_slices} slices on dim 1, got shape {tuple(x.shape)}")
        return x + self.mlp(x.movedim(1, -1)).movedim(-1, 1)


class DConvAdapter(nn.Module):
    """3D depth-convolution adapter for image tokens.

    Linear C -> C/4, GELU, a depth-wise Conv3d (kernel 3x3x3, padding 1, one group per channel) over the
    un-windowed ``(D, h, w)`` token grid with an inner skip, channel LayerNorm, GELU, Linear C/4 -> C
    (zero-initialised). The convolution mixes in-plane neighbours and neighbouring slices ("3D depth-wise
    convolution ... spatial relationships" in the paper; the release's kernel). Callers give it the full
    per-slice grid, never window-partitioned tokens (a release bug; model card ``docs/README.md``, "Architecture").

    Args:
        dim: token width C.
        num_slices: D, the number of slices folded into the batch.
        reduction: bottleneck factor (4 in the paper).
    """

    def __init__(self, dim: int, num_slices: int, reduction: int = REDUCTION) -> None:
        super().__init__()
        hidden = max(dim // reduction, 1)
        self.num_slices = num_slices
        self.down = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.depth_conv = nn.Conv3d(hidden, hidden, kernel_size=3, padding=1, groups=hidden)
        self.norm = nn.LayerNorm(hidden)
        self.up = _zero_init(nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``(B*D, h, w, C)`` tokens on the full (un-windowed) grid, slice index inner -> same shape."""
        z = self.act(self.down(x))  # (B*D, h, w, c)
        volume = unfold_slices(z, self.num_slices).movedim(-1, 1)  # (B, c, D, h, w)
        conv = fold_slices(self.depth_conv(volume).movedim(1, -1))  # (B*D, h, w, c)
        z = z + self.act(self.norm(conv))
        return self.up(z)


class DMLPAdapter(nn.Module):
    """3D depth-MLP adapter (and the vanilla adapter with a depth MLP elsewhere, for the ablation).

    ``placement="middle"`` (the paper's DMLPAdapter): Linear C -> C/4, GELU, depth MLP (D -> 4D -> D, inner
    skip), Linear C/4 -> C (zero-initialised). ``"after_up"`` / ``"before_down"`` move the depth MLP (at width
    C) after the up FC / before the down FC (ablation B6 / B7); ``None`` has no depth MLP (vanilla, B1-B5).

    Args:
        dim: token width C.
        num_slices: D.
        hidden: bottleneck width (C/4 by default; 64 in SAM's decoder).
        depth_expansion: the depth MLP's expansion (4).
        placement: ``"middle"``, ``"after_up"``, ``"before_down"`` or ``None``.
    """

    PLACEMENTS = ("middle", "after_up", "before_down", None)

    def __init__(
        self,
        dim: int,
        num_slices: int,
        hidden: Optional[int] = None,
        depth_expansion: int = 4,
        placement: Optional[str] = "middle",
    ) -> None:
        super().__init__()
        if placement not in self.PLACEMENTS:
            raise ValueError(f"placement must be one of {self.PLACEMENTS}, got {placement!r}")
        hidden = hidden or max(dim // REDUCTION, 1)
        self.num_slices, self.placement = num_slices, placement
        self.down = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        # After the up FC the depth MLP is the adapter's last layer: zero it too, so the adapter starts at 0.
        last = placement == "after_up"
        self.depth_mlp = DepthMLP(num_slices, depth_expansion, zero_init=last) if placement is not None else None
        self.up = _zero_init(nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``(B, D, ..., C)`` tokens, depth on dim 1 -> same shape."""
        if x.shape[1] != self.num_slices:
            raise ValueError(f"DMLPAdapter expects {self.num_slices} slices on dim 1, got shape {tuple(x.shape)}")
        if self.placement == "before_down":
            x = self.depth_mlp(x)
        z = self.act(self.down(x))
        if self.placement == "middle":
            z = self.depth_mlp(z)
        out = self.up(z)
        return self.depth_mlp(out) if self.placement == "after_up" else out


class SliceFolded(nn.Module):
    """Runs a depth-on-dim-1 adapter on image tokens folded as ``(B*D, h, w, C)``."""

    def __init__(self, adapter: nn.Module, num_slices: int) -> None:
        super().__init__()
        self.adapter, self.num_slices = adapter, num_slices

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``(B*D, h, w, C)``, slice index inner -> same shape."""
        return fold_slices(self.adapter(unfold_slices(x, self.num_slices)))


_PLACEMENT = {"dmlp": "middle", "dmlp_after_up": "after_up", "dmlp_before_down": "before_down", "vanilla": None}


def image_adapter(kind: str, dim: int, num_slices: int) -> nn.Module:
    """An adapter for image tokens ``(B*D, h, w, C)`` of kind in :data:`IMAGE_ADAPTERS`."""
    if kind not in IMAGE_ADAPTERS:
        raise ValueError(f"image_adapter must be one of {IMAGE_ADAPTERS}, got {kind!r}")
    if kind == "dconv":
        return DConvAdapter(dim, num_slices)
    return SliceFolded(DMLPAdapter(dim, num_slices, placement=_PLACEMENT[kind]), num_slices)


def prompt_adapter(kind: str, dim: int, num_slices: int) -> nn.Module:
    """An adapter for prompt tokens ``(B, D, Q, T, C)`` of kind in :data:`PROMPT_ADAPTERS`."""
    if kind not in PROMPT_ADAPTERS:
        raise ValueError(f"prompt_adapter must be one of {PROMPT_ADAPTERS} (no spatial grid for dconv), got {kind!r}")
    return DMLPAdapter(dim, num_slices, placement=_PLACEMENT[kind])


__all__ = [
    "DConvAdapter",
    "DMLPAdapter",
    "DepthMLP",
    "SliceFolded",
    "image_adapter",
    "prompt_adapter",
    "IMAGE_ADAPTERS",
    "PROMPT_ADAPTERS",
]
