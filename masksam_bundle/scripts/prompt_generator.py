"""3D prompt generator (paper section 2.4, Fig. 4b; ablation B4 "MaskAvgBBox", paper Table 4).

A 3D U-Net-style decoder runs from the image embedding (grid g) up to the network input resolution H in
``L = log2(H / g)`` x2 steps. Multi-level encoder features join it as skips, deepest feature at the coarsest
stage; when there are more features than stages, the extra (shallower) ones all join the finest stage. From
the decoder stages it produces

* auxiliary mask logits at full resolution plus two coarser deep-supervision heads,
* N learnable boxes per slice (unless the ablation's mask-only mode drops them), and
* N auxiliary classifier tokens per slice (256-d, from 16 x 16 pooled maps).

Stage widths follow the release's networks (:func:`default_decoder_channels`) unless given.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import UnetBasicBlock

from .blocks import LEAKY_RELU, conv_norm_act, upsample_inplane
from .box_ops import masks_to_boxes
from .layout import unfold_slices

# Stage widths, coarsest (the embedding grid g) -> finest (the input side H), of the release's networks, by
# the number of x2 stages L = log2(H / g): ACDC (ViT-B x4, g = 64, H = 256) and Synapse/AMOS (g = H / 16).
RELEASE_DECODER_CHANNELS = {2: (256, 128, 128), 4: (256, 256, 128, 128, 64)}
NUM_AUX_HEADS = 3  # full resolution + two deep-supervision levels
TOKEN_GRID = 16  # aux classifier tokens: 16 x 16 = 256 = SAM's token width


def default_decoder_channels(num_steps: int) -> Tuple[int, ...]:
    """The release's stage widths for ``num_steps`` x2 stages (``num_steps + 1`` widths, coarsest first).

    The release has networks with 2 and 4 stages; for other counts (no release network) the finest
    ``num_steps + 1`` widths of the 4-stage network.
    """
    if num_steps in RELEASE_DECODER_CHANNELS:
        return RELEASE_DECODER_CHANNELS[num_steps]
    widest = RELEASE_DECODER_CHANNELS[4]
    if num_steps + 1 > len(widest):
        return (widest[0],) * (num_steps + 1 - len(widest)) + widest
    return widest[-(num_steps + 1):]


class FeatureLift(nn.Module):
    """Brings one encoder feature ``(B, C, D, r, r)`` to its stage: ``steps`` in-plane x2 upsamplings."""

    def __init__(self, in_channels: int, out_channels: int, steps: int) -> None:
        super().__init__()
        if steps == 0:
            self.layers = conv_norm_act(in_channels, out_channels, kernel_size=1)
        else:
            chain = [upsample_inplane(in_channels, out_channels)]
            chain += [upsample_inplane(out_channels, out_channels) for _ in range(steps - 1)]
            self.layers = nn.Sequential(*chain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class DecoderStage(nn.Module):
    """x2 in-plane upsampling of the path, concatenation with the stage's skips, two Conv3d k3 blocks."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = upsample_inplane(in_channels, out_channels)
        self.conv = UnetBasicBlock(3, out_channels + skip_channels, out_channels, 3, 1, "instance", LEAKY_RELU)

    def forward(self, x: torch.Tensor, skips: List[torch.Tensor]) -> torch.Tensor:
        x = self.up(x)
        return self.conv(torch.cat([x, *skips], dim=1) if skips else x)


class PromptGenerator(nn.Module):
    """Auxiliary masks, learnable boxes and auxiliary classifier tokens from the encoder's outputs.

    Args:
        embed_channels: image embedding width (256).
        feature_channels: widths of the multi-level features, shallow to deep.
        feature_strides: input pixels per cell of each feature (16 for ViT blocks).
        embed_stride: input pixels per embedding cell.
        sam_size: S, the side of the SAM input.
        image_size: H, the network input side (``S / sam_upsample``).
        num_queries: N.
        num_slices: D.
        decoder_channels: ``L + 1`` stage widths, coarsest (grid g) to finest (input side H), with
            ``L = log2(H / g)``; ``None``: the release's (:func:`default_decoder_channels`).
        predict_boxes: learnable box head; ``False`` for the ablation's mask-only prompt generator (B1).
    """

    def __init__(
        self,
        embed_channels: int,
        feature_channels: Sequence[int],
        feature_strides: Sequence[int],
        embed_stride: int,
        sam_size: int,
        image_size: int,
        num_queries: int,
        num_slices: int,
        decoder_channels: Optional[Sequence[int]] = None,
        predict_boxes: bool = True,
    ) -> None:
        super().__init__()
        grid = sam_size // embed_stride
        ratio = image_size / grid
        num_steps = int(round(math.log2(ratio))) if ratio >= 1 else -1
        if num_steps < NUM_AUX_HEADS - 1 or 2**num_steps != ratio:
            raise ValueError(
                f"the prompt generator needs the input side H={image_size} to be the embedding grid g={grid} "
                f"times a power of two >= {2 ** (NUM_AUX_HEADS - 1)}; use a smaller sam_upsample"
            )
        if decoder_channels is None:
            decoder_channels = default_decoder_channels(num_steps)
        if len(decoder_channels) != num_steps + 1 or min(decoder_channels) < 1:
            raise ValueError(
                f"decoder_channels needs {num_steps + 1} positive widths (grid {grid} -> input side {image_size}, "
                f"{num_steps} x2 stages; coarsest first), got {list(decoder_channels)}"
            )
        widths = [int(w) for w in decoder_channels]  # coarsest -> finest
        self.widths = widths
        self.num_queries, self.num_slices, self.image_size = num_queries, num_slices, image_size

        # Skip routing: deepest feature -> stage 1, next -> stage 2, ...; extras join the finest stage.
        self.feature_stage = []
        for rank, index in enumerate(reversed(range(len(feature_channels)))):
            self.feature_stage.append((index, min(rank + 1, num_steps)))
        self.lifts = nn.ModuleDict()
        skip_channels = [0] * (num_steps + 1)
        for index, stage in self.feature_stage:
            feature_res = sam_size // feature_strides[index]
            stage_res = grid * 2**stage
            steps = math.log2(stage_res / feature_res)
            if steps < 0 or steps != int(steps):
                raise ValueError(f"feature {index} at {feature_res}px cannot be lifted to stage {stage} ({stage_res}px)")
            self.lifts[str(index)] = FeatureLift(feature_channels[index], widths[stage], int(steps))
            skip_channels[stage] += widths[stage]

        self.bottom = UnetBasicBlock(3, embed_channels, widths[0], 3, 1, "instance", LEAKY_RELU)
        self.stages = nn.ModuleList(
            [DecoderStage(widths[s - 1], skip_channels[s], widths[s]) for s in range(1, num_steps + 1)]
        )
        # Heads: aux masks on the finest three stages, boxes and tokens pooled from every stage.
        self.mask_heads = nn.ModuleList([nn.Conv3d(widths[-1 - i], num_queries, 1) for i in range(NUM_AUX_HEADS)])
        self.box_head = nn.Conv3d(sum(widths), num_queries, 1) if predict_boxes else None
        self.token_head = nn.Conv3d(sum(widths), num_queries, 1)

    def _unfold(self, x: torch.Tensor) -> torch.Tensor:
        """``(B*D, C, h, w)`` -> ``(B, C, D, h, w)``."""
        return unfold_slices(x, self.num_slices, depth_dim=2)

    def forward(self, embedding: torch.Tensor, features: Sequence[torch.Tensor]) -> Dict[str, object]:
        """
        Args:
            embedding: ``(B*D, 256, g, g)``.
            features: shallow to deep, ``(B*D, C_i, r_i, r_i)``.

        Returns:
            ``aux_masks``: list of 3 logits ``(B, D, N, h, w)``, finest (= H) first;
            ``aux_boxes``: ``(B, D, N, 4)`` xyxy in [0, 1] (without a box head: the boxes of the thresholded
            finest aux masks, detached; see :func:`mask_box_prompt`); ``aux_tokens``: ``(B, D, N, 256)``.
        """
        skips: List[List[torch.Tensor]] = [[] for _ in range(len(self.stages) + 1)]
        for index, stage in self.feature_stage:
            skips[stage].append(self.lifts[str(index)](self._unfold(features[index])))
        x = self.bottom(self._unfold(embedding))
        outputs = [x]
        for stage, block in enumerate(self.stages, start=1):
            x = block(x, skips[stage])
            outputs.append(x)

        aux_masks = [head(outputs[-1 - i]).permute(0, 2, 1, 3, 4) for i, head in enumerate(self.mask_heads)]

        d = self.num_slices
        if self.box_head is None:
            aux_boxes = mask_box_prompt(aux_masks[0])
        else:
            pooled_boxes = torch.cat([F.adaptive_avg_pool3d(o, (d, 2, 2)) for o in outputs], dim=1)
            cells = torch.sigmoid(self.box_head(pooled_boxes))  # (B, N, D, 2, 2)
            x1, y1, px, py = cells.permute(0, 2, 1, 3, 4).flatten(3).unbind(-1)  # each (B, D, N)
            # x2 = x1 + (1 - x1) * px keeps every box valid (x1 <= x2 <= 1).
            aux_boxes = torch.stack([x1, y1, x1 + (1 - x1) * px, y1 + (1 - y1) * py], dim=-1)

        pooled_tokens = torch.cat([F.adaptive_avg_pool3d(o, (d, TOKEN_GRID, TOKEN_GRID)) for o in outputs], dim=1)
        aux_tokens = self.token_head(pooled_tokens).permute(0, 2, 1, 3, 4).flatten(3)  # (B, D, N, 256)
        return {"aux_masks": aux_masks, "aux_boxes": aux_boxes, "aux_tokens": aux_tokens}


def mask_avg_box(aux_mask_logits: torch.Tensor, learnable_boxes: torch.Tensor) -> torch.Tensor:
    """MaskAvgBBox: mean of the thresholded aux mask's tight box and the learnable box.

    Where the aux mask is empty the learnable box is used alone (a deviation, model card ``docs/README.md``;
    the release averaged with a zero box, which drags empty-mask prompts towards the corner). The mask box is a
    constant; gradients reach the learnable box (x0.5 where averaged), so a box loss can supervise this average
    as the release does.

    Args:
        aux_mask_logits: ``(..., H, W)``; sigmoid > 0.5 is logit > 0.
        learnable_boxes: ``(..., 4)`` xyxy in [0, 1].

    Returns:
        ``(..., 4)`` float32 xyxy in [0, 1].
    """
    with torch.no_grad():
        mask_boxes, nonempty = masks_to_boxes(aux_mask_logits > 0)
    learnable = learnable_boxes.float()  # float32 under AMP too: x 1024 frame pixels needs the precision
    return torch.where(nonempty[..., None], 0.5 * (mask_boxes + learnable), learnable)


def mask_avg_box_prompt(aux_mask_logits: torch.Tensor, learnable_boxes: torch.Tensor) -> torch.Tensor:
    """:func:`mask_avg_box` without gradient: the box prompt SAM's frozen prompt encoder receives."""
    with torch.no_grad():
        return mask_avg_box(aux_mask_logits, learnable_boxes.detach())


def mask_box_prompt(aux_mask_logits: torch.Tensor) -> torch.Tensor:
    """Box prompt from the aux mask alone (ablation B1): the tight box of sigmoid > 0.5, detached.

    Where the aux mask is empty the whole frame ``[0, 0, 1, 1]`` (a prompt that constrains nothing).

    Args:
        aux_mask_logits: ``(..., H, W)``.

    Returns:
        ``(..., 4)`` xyxy in [0, 1], no gradient.
    """
    with torch.no_grad():
        mask_boxes, nonempty = masks_to_boxes(aux_mask_logits > 0)
        whole_frame = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=mask_boxes.dtype, device=mask_boxes.device)
        return torch.where(nonempty[..., None], mask_boxes, whole_frame)


__all__ = [
    "PromptGenerator",
    "default_decoder_channels",
    "mask_avg_box",
    "mask_avg_box_prompt",
    "mask_box_prompt",
    "RELEASE_DECODER_CHANNELS",
]
