"""SAM image encoders with depth embeddings and DConvAdapters (paper Fig. 4a; model card ``docs/README.md``).

Both encoders take slices folded into the batch, ``(B*D, 3, S, S)``, and return

* the image embedding ``(B*D, 256, g, g)`` (``g = S / embed_stride``), and
* multi-level features, shallow to deep, each ``(B*D, C_i, r_i, r_i)``, for the prompt generator.

The original SAM modules stay inside (frozen); the wrappers re-run their forward with the adapters inserted.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn as nn
from segment_anything.modeling.image_encoder import Attention as SamAttention
from segment_anything.modeling.image_encoder import window_partition, window_unpartition
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from .adapters import image_adapter
from .attention import sam_attention, tiny_vit_attention
from .layout import fold_slices, unfold_slices

__all__ = ["AdaptedTinyViTBlock", "AdaptedTinyViTEncoder", "AdaptedViTBlock", "AdaptedViTEncoder", "EncoderOutput"]

EncoderOutput = Tuple[torch.Tensor, List[torch.Tensor]]


class _AdaptedBlock(nn.Module):
    """A frozen transformer block of width ``dim`` with the two adapters of paper Fig. 4a: one on the attention
    output, one parallel to the MLP (scaled by ``mlp_adapter_scale``). Subclasses define ``forward``."""

    def __init__(self, block: nn.Module, dim: int, num_slices: int, mlp_adapter_scale: float, adapter: str,
                 fused_attention: bool) -> None:
        super().__init__()
        self.block = block
        self.fused_attention = fused_attention
        self.attn_adapter = image_adapter(adapter, dim, num_slices)
        self.mlp_adapter = image_adapter(adapter, dim, num_slices)
        self.mlp_adapter_scale = mlp_adapter_scale


class AdaptedViTBlock(_AdaptedBlock):
    """A SAM ViT block with a DConvAdapter on the attention output and one parallel to the MLP (x0.5).

    ``adapter`` picks another adapter kind for the ablation (:data:`scripts.adapters.IMAGE_ADAPTERS`).

    The attention-side adapter runs after window un-partitioning, so its depth convolution always sees the
    full per-slice token grid (the authors' release ran it on windows, a release bug; model card ``docs/README.md``).
    The attention itself runs through :func:`scripts.attention.sam_attention` (fused SDPA unless
    ``fused_attention`` is false; relative-position tables cropped to the grid).
    """

    def __init__(
        self, block: nn.Module, num_slices: int, mlp_adapter_scale: float = 0.5, adapter: str = "dconv",
        fused_attention: bool = True,
    ) -> None:
        dim = block.norm1.normalized_shape[0]
        super().__init__(block, dim, num_slices, mlp_adapter_scale, adapter, fused_attention)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """``(B', H, W, C)`` windows or grids -> the same shape."""
        if isinstance(self.block.attn, SamAttention):
            return sam_attention(self.block.attn, x, self.fused_attention)
        return self.block.attn(x)  # an attention module replaced by the caller (e.g. in tests) runs as it is

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``(B*D, h, w, C)``."""
        blk = self.block
        shortcut = x
        x = blk.norm1(x)
        if blk.window_size > 0:
            h, w = x.shape[1], x.shape[2]
            x, pad_hw = window_partition(x, blk.window_size)
            x = self.attention(x)
            x = window_unpartition(x, blk.window_size, pad_hw, (h, w))
        else:
            x = self.attention(x)
        x = shortcut + x + self.attn_adapter(x)
        normed = blk.norm2(x)
        return x + blk.mlp(normed) + self.mlp_adapter_scale * self.mlp_adapter(normed)


class AdaptedViTEncoder(nn.Module):
    """SAM's ``ImageEncoderViT`` for an input of side S <= 1024 (the SAM frame, model card ``docs/README.md``).

    The absolute position embedding is cropped to its top-left ``S/16 x S/16`` corner (SAM's own
    "pad bottom-right to 1024" convention); the relative-position tables of the global blocks likewise to their
    central ``2g - 1`` rows, the offsets that exist (:func:`scripts.attention.crop_rel_pos`).
    A learnable, zero-initialised depth embedding (one C-vector per slice) is added after the patch embedding.
    ``fused_attention`` (default) runs attention through SDPA without ``N x N`` matrices; false runs SAM's
    explicit matrices (same result, for comparison and debugging).
    """

    def __init__(
        self, encoder: nn.Module, num_slices: int, use_checkpoint: bool = False, adapter: str = "dconv",
        depth_embed: bool = True, fused_attention: bool = True,
    ) -> None:
        super().__init__()
        self.patch_embed = encoder.patch_embed
        self.pos_embed = encoder.pos_embed  # (1, 64, 64, C) frozen
        self.neck = encoder.neck
        self.blocks = nn.ModuleList(
            [AdaptedViTBlock(b, num_slices, adapter=adapter, fused_attention=fused_attention) for b in encoder.blocks]
        )
        dim = self.pos_embed.shape[-1] if self.pos_embed is not None else encoder.blocks[0].norm1.normalized_shape[0]
        self.depth_embed = nn.Parameter(torch.zeros(num_slices, dim)) if depth_embed else None
        self.num_slices = num_slices
        self.use_checkpoint = use_checkpoint
        # Multi-level features: the outputs of the global-attention blocks (ViT-B: 2, 5, 8, 11).
        self.feature_blocks = [i for i, b in enumerate(encoder.blocks) if b.window_size == 0]
        self.feature_channels = [dim] * len(self.feature_blocks)
        self.feature_strides = [16] * len(self.feature_blocks)

    def forward(self, x: torch.Tensor) -> EncoderOutput:
        x = self.patch_embed(x)  # (B*D, g, g, C)
        g = x.shape[1]
        if self.pos_embed is not None:
            x = x + self.pos_embed[:, :g, :g, :]
        if self.depth_embed is not None:
            x = fold_slices(unfold_slices(x, self.num_slices) + self.depth_embed[:, None, None, :])
        features = []
        for i, blk in enumerate(self.blocks):
            if self.use_checkpoint and self.training and torch.is_grad_enabled():
                x = activation_checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
            if i in self.feature_blocks:
                features.append(x.permute(0, 3, 1, 2))
        embedding = self.neck(x.permute(0, 3, 1, 2))  # (B*D, 256, g, g)
        return embedding, features


class AdaptedTinyViTBlock(_AdaptedBlock):
    """A TinyViT block (LiteMedSAM) with the same two DConvAdapters as :class:`AdaptedViTBlock`; its window
    attention runs through :func:`scripts.attention.tiny_vit_attention` (SDPA unless ``fused_attention`` is false)."""

    def __init__(
        self, block: nn.Module, num_slices: int, mlp_adapter_scale: float = 0.5, adapter: str = "dconv",
        fused_attention: bool = True,
    ) -> None:
        super().__init__(block, block.dim, num_slices, mlp_adapter_scale, adapter, fused_attention)

    def _window_attention(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """x: ``(B, h*w, C)`` -> attention output ``(B, h, w, C)`` on the un-windowed grid."""
        blk = self.block
        b, _, c = x.shape
        ws = blk.window_size
        if h == ws and w == ws:
            return tiny_vit_attention(blk.attn, x, self.fused_attention).view(b, h, w, c)
        windows, pad_hw = window_partition(x.view(b, h, w, c), ws)  # (B*nW, ws, ws, C), zero-padded
        windows = tiny_vit_attention(blk.attn, windows.flatten(1, 2), self.fused_attention)
        return window_unpartition(windows.unflatten(1, (ws, ws)), ws, pad_hw, (h, w))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``(B*D, h*w, C)`` tokens (TinyViT's layout)."""
        blk = self.block
        h, w = blk.input_resolution
        b, length, c = x.shape
        attn = self._window_attention(x, h, w)
        x = x + blk.drop_path((attn + self.attn_adapter(attn)).view(b, length, c))
        x = x.transpose(1, 2).reshape(b, c, h, w)
        x = blk.local_conv(x).view(b, c, length).transpose(1, 2)
        # TinyViT's Mlp normalises inside, so the parallel adapter sees the same input as the MLP.
        adapter = self.mlp_adapter(x.view(b, h, w, c)).view(b, length, c)
        return x + blk.drop_path(blk.mlp(x)) + self.mlp_adapter_scale * adapter


class AdaptedTinyViTEncoder(nn.Module):
    """LiteMedSAM's TinyViT encoder (input 256, embedding 64 x 64) with depth embedding and adapters.

    Multi-level features are the outputs of its four stages (after their patch merging).
    """

    def __init__(
        self, encoder: nn.Module, num_slices: int, use_checkpoint: bool = False, adapter: str = "dconv",
        depth_embed: bool = True, fused_attention: bool = True,
    ) -> None:
        super().__init__()
        self.patch_embed = encoder.patch_embed
        self.layers = encoder.layers
        self.neck = encoder.neck
        self.num_slices = num_slices
        self.use_checkpoint = use_checkpoint
        # Replace each attention block of stages 1..3 by its adapted wrapper (stage 0 is convolutional).
        self.adapted_blocks = nn.ModuleList()
        for layer in list(encoder.layers)[1:]:
            wrapped = [
                AdaptedTinyViTBlock(b, num_slices, adapter=adapter, fused_attention=fused_attention) for b in layer.blocks
            ]
            self.adapted_blocks.append(nn.ModuleList(wrapped))
        width = encoder.patch_embed.seq[-1].c.out_channels
        self.depth_embed = nn.Parameter(torch.zeros(num_slices, width)) if depth_embed else None
        self.feature_channels = [self._out_dim(layer) for layer in encoder.layers]
        self.feature_strides = [2, 4, 4, 4]

    @staticmethod
    def _out_dim(layer: nn.Module) -> int:
        if layer.downsample is not None:
            return layer.downsample.out_dim
        return layer.dim

    def _run(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return activation_checkpoint(module, x, use_reentrant=False)
        return module(x)

    def forward(self, x: torch.Tensor) -> EncoderOutput:
        x = self.patch_embed(x)  # (B*D, 64, 256, 256)
        if self.depth_embed is not None:
            x = fold_slices(unfold_slices(x, self.num_slices) + self.depth_embed[:, :, None, None])
        features = []
        x = self._run(self.layers[0], x)  # conv stage -> tokens (B*D, L, C)
        features.append(x)
        for layer, blocks in zip(list(self.layers)[1:], self.adapted_blocks):
            for blk in blocks:
                x = self._run(blk, x)
            if layer.downsample is not None:
                x = layer.downsample(x)
            features.append(x)
        grids = [_tokens_to_grid(f) for f in features]
        embedding = self.neck(grids[-1])  # (B*D, 256, 64, 64)
        return embedding, grids


def _tokens_to_grid(tokens: torch.Tensor) -> torch.Tensor:
    """``(B, L, C)`` square token grid -> ``(B, C, r, r)``."""
    b, length, c = tokens.shape
    side = int(round(length**0.5))
    return tokens.transpose(1, 2).reshape(b, c, side, side)
