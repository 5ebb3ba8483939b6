"""SAM's prompt encoder and mask decoder with depth adapters and mask classification (paper Fig. 4c).

Everything runs batched over ``B*D*N`` prompt sets, ordered ``(b, d, n)``: each of the N queries of each
slice is one SAM prompt (box + mask), so the frozen decoder predicts one mask per query. A classifier token
(global learnable token + the query's auxiliary token) rides along with SAM's output tokens and a linear head
turns its output into K+1 class logits.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn

from .adapters import image_adapter, prompt_adapter
from .layout import fold_slices, unfold_slices

__all__ = ["AdaptedTwoWayBlock", "AdaptedTwoWayTransformer", "ClassifyingMaskDecoder", "QueryLayout"]


class QueryLayout:
    """The decoder's batch of prompt sets ``(B*D*N, ...)``, ordered ``(b, d, n)``, and the views the adapters need.

    Queries fold into the batch inside slices (query index inner), slices inside volumes
    (:func:`scripts.layout.fold_slices`).
    """

    def __init__(self, batch: int, num_slices: int, num_queries: int) -> None:
        self.b, self.d, self.n = batch, num_slices, num_queries

    def per_query(self, x: torch.Tensor) -> torch.Tensor:
        """``(B*D, ...)`` per slice -> ``(B*D*N, ...)``, each slice repeated for its N queries."""
        return fold_slices(x.unsqueeze(1).expand(-1, self.n, *x.shape[1:]))

    def unfold(self, x: torch.Tensor) -> torch.Tensor:
        """``(B*D*N, ...)`` -> ``(B, D, N, ...)``."""
        return unfold_slices(unfold_slices(x, self.n), self.d)

    def fold(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, D, N, ...)`` -> ``(B*D*N, ...)``."""
        return fold_slices(fold_slices(x))

    def grid_by_query(self, keys: torch.Tensor, side: int) -> torch.Tensor:
        """Image tokens ``(B*D*N, h*w, C)`` -> ``(B*N*D, h, w, C)`` (slices inner, as DConvAdapter wants)."""
        by_query = fold_slices(self.unfold(keys), depth_dim=2)  # (B*N, D, h*w, C)
        return fold_slices(by_query).unflatten(1, (side, side))

    def grid_to_keys(self, grid: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`grid_by_query`."""
        by_query = unfold_slices(grid.flatten(1, 2), self.d)  # (B*N, D, h*w, C)
        return self.fold(unfold_slices(by_query, self.n, depth_dim=2))


class AdaptedTwoWayBlock(nn.Module):
    """One SAM ``TwoWayAttentionBlock`` with DMLPAdapters on the token path and a DConvAdapter on the image path.

    DMLPAdapter after token self-attention, after token->image cross-attention and in parallel with the token
    MLP (x0.5); DConvAdapter after image->token cross-attention (per query, over (D, h, w)). The kinds are
    switches for the ablation (:mod:`scripts.adapters`).
    """

    def __init__(
        self,
        block: nn.Module,
        num_slices: int,
        mlp_adapter_scale: float = 0.5,
        image_adapter_kind: str = "dconv",
        prompt_adapter_kind: str = "dmlp",
    ) -> None:
        super().__init__()
        self.block = block
        dim = block.norm1.normalized_shape[0]
        self.self_attn_adapter = prompt_adapter(prompt_adapter_kind, dim, num_slices)
        self.cross_attn_adapter = prompt_adapter(prompt_adapter_kind, dim, num_slices)
        self.mlp_adapter = prompt_adapter(prompt_adapter_kind, dim, num_slices)
        self.image_adapter = image_adapter(image_adapter_kind, dim, num_slices)
        self.mlp_adapter_scale = mlp_adapter_scale

    def _tokens(self, adapter: nn.Module, x: torch.Tensor, layout: QueryLayout) -> torch.Tensor:
        """Prompt tokens ``(B*D*N, T, C)`` through a depth-on-dim-1 adapter."""
        return layout.fold(adapter(layout.unfold(x)))

    def forward(
        self, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor, key_pe: torch.Tensor,
        layout: QueryLayout, side: int,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        blk = self.block
        if blk.skip_first_layer_pe:
            attn = blk.self_attn(q=queries, k=queries, v=queries)
            queries = attn + self._tokens(self.self_attn_adapter, attn, layout)
        else:
            q = queries + query_pe
            attn = blk.self_attn(q=q, k=q, v=queries)
            queries = queries + attn + self._tokens(self.self_attn_adapter, attn, layout)
        queries = blk.norm1(queries)

        q, k = queries + query_pe, keys + key_pe
        attn = blk.cross_attn_token_to_image(q=q, k=k, v=keys)
        queries = blk.norm2(queries + attn + self._tokens(self.cross_attn_adapter, attn, layout))

        mlp_adapter = self._tokens(self.mlp_adapter, queries, layout)
        queries = blk.norm3(queries + blk.mlp(queries) + self.mlp_adapter_scale * mlp_adapter)

        q, k = queries + query_pe, keys + key_pe
        attn = blk.cross_attn_image_to_token(q=k, k=q, v=queries)
        attn = attn + layout.grid_to_keys(self.image_adapter(layout.grid_by_query(attn, side)))
        keys = blk.norm4(keys + attn)
        return queries, keys


class AdaptedTwoWayTransformer(nn.Module):
    """SAM's ``TwoWayTransformer`` run through :class:`AdaptedTwoWayBlock` s, plus a DMLPAdapter after the final
    token->image attention."""

    def __init__(
        self, transformer: nn.Module, num_slices: int, image_adapter_kind: str = "dconv",
        prompt_adapter_kind: str = "dmlp",
    ) -> None:
        super().__init__()
        self.transformer = transformer
        self.layers = nn.ModuleList(
            [
                AdaptedTwoWayBlock(layer, num_slices, image_adapter_kind=image_adapter_kind,
                                   prompt_adapter_kind=prompt_adapter_kind)
                for layer in transformer.layers
            ]
        )
        self.final_adapter = prompt_adapter(prompt_adapter_kind, transformer.embedding_dim, num_slices)

    def forward(
        self, image_embedding: torch.Tensor, image_pe: torch.Tensor, point_embedding: torch.Tensor, layout: QueryLayout
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """image_embedding, image_pe: ``(B*D*N, C, g, g)``; point_embedding: ``(B*D*N, T, C)``."""
        side = image_embedding.shape[-1]
        keys = image_embedding.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe, layout, side)
        t = self.transformer
        attn = t.final_attn_token_to_image(q=queries + point_embedding, k=keys + key_pe, v=keys)
        attn = attn + layout.fold(self.final_adapter(layout.unfold(attn)))
        queries = t.norm_final_attn(queries + attn)
        return queries, keys


class ClassifyingMaskDecoder(nn.Module):
    """Frozen SAM prompt encoder + adapted mask decoder + classifier token and K+1 class head.

    Args:
        prompt_encoder, mask_decoder: SAM's modules (kept frozen by the caller).
        num_slices: D.
        num_classes: K, background included; the head predicts K+1 (index K = no object).
        grid: g, the side of the image embedding; the dense positional encoding is the top-left g x g corner
            of SAM's grid (the SAM frame convention, model card ``docs/README.md``).
        image_adapter_kind, prompt_adapter_kind: adapter kinds on the image / prompt-token path (ablation).
        depth_pos_embed: add the learnable decoder depth embedding (ablation B5 on).
    """

    def __init__(
        self,
        prompt_encoder: nn.Module,
        mask_decoder: nn.Module,
        num_slices: int,
        num_classes: int,
        grid: int,
        image_adapter_kind: str = "dconv",
        prompt_adapter_kind: str = "dmlp",
        depth_pos_embed: bool = True,
    ) -> None:
        super().__init__()
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.transformer = AdaptedTwoWayTransformer(
            mask_decoder.transformer, num_slices, image_adapter_kind, prompt_adapter_kind
        )
        dim = mask_decoder.transformer_dim
        self.num_slices, self.grid = num_slices, grid
        self.depth_pos_embed = nn.Parameter(torch.zeros(num_slices, dim, grid, grid)) if depth_pos_embed else None
        self.global_class_token = nn.Parameter(torch.randn(1, dim) * 0.02)
        self.class_head = nn.Linear(dim, num_classes + 1)

    def dense_positional_encoding(self) -> torch.Tensor:
        """``(D, C, g, g)``: SAM's dense PE (cropped to the frame) + the learnable decoder depth embedding."""
        pe = self.prompt_encoder.get_dense_pe()[:, :, : self.grid, : self.grid]
        if self.depth_pos_embed is None:
            return pe.expand(self.num_slices, -1, -1, -1)
        return pe + self.depth_pos_embed

    def _per_query_grids(self, image_embedding: torch.Tensor, layout: QueryLayout) -> Tuple[torch.Tensor, torch.Tensor]:
        """The image embedding ``(B*D, C, g, g)`` and the dense PE, each as ``(B*D*N, C, g, g)``."""
        pe = self.dense_positional_encoding()  # (D, C, g, g)
        pos = fold_slices(pe.expand(layout.b, *pe.shape))  # (B*D, C, g, g)
        return layout.per_query(image_embedding), layout.per_query(pos)

    def forward(
        self,
        image_embedding: torch.Tensor,
        boxes_px: torch.Tensor,
        mask_prompt: Optional[torch.Tensor],
        aux_tokens: torch.Tensor,
        points: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            image_embedding: ``(B*D, C, g, g)``.
            boxes_px: ``(B, D, N, 4)`` xyxy in SAM-frame pixels.
            mask_prompt: ``(B, D, N, 4g, 4g)`` mask logits, or ``None`` for no mask prompt (ablation B2).
            aux_tokens: ``(B, D, N, C)``.
            points: optional extra point prompts ``(coords (B*D*N, P, 2) px, labels (B*D*N, P))``.

        Returns:
            class logits ``(B, D, N, K+1)`` and mask logits ``(B, D, N, 4g, 4g)``.
        """
        b, d, n = boxes_px.shape[:3]
        layout = QueryLayout(b, d, n)
        c, g = image_embedding.shape[1], image_embedding.shape[-1]
        sparse, dense = self.prompt_encoder(
            points=points,
            boxes=layout.fold(boxes_px),
            masks=None if mask_prompt is None else layout.fold(mask_prompt).unsqueeze(1),
        )  # sparse (BDN, T_prompt, C), dense (BDN, C, g, g); without a mask prompt SAM's full grid
        dense = dense[..., :g, :g]  # "no mask" is one constant vector: its frame corner is the same

        dec = self.mask_decoder
        output_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)  # (5, C)
        class_token = self.global_class_token + layout.fold(aux_tokens).unsqueeze(1)  # (BDN, 1, C)
        tokens = torch.cat([output_tokens.expand(b * d * n, -1, -1), sparse, class_token], dim=1)

        src, pos = self._per_query_grids(image_embedding, layout)
        hs, keys = self.transformer(src + dense, pos, tokens, layout)
        # multimask_output=False: mask token 0 only.
        upscaled = dec.output_upscaling(keys.transpose(1, 2).reshape(-1, c, g, g))  # (BDN, C/8, 4g, 4g)
        hyper = dec.output_hypernetworks_mlps[0](hs[:, 1])  # (BDN, C/8)
        masks = torch.einsum("qc,qchw->qhw", hyper, upscaled)
        class_logits = self.class_head(hs[:, -1])
        return layout.unfold(class_logits), layout.unfold(masks)

    def decode_prompts(
        self,
        image_embedding: torch.Tensor,
        num_prompts: int = 1,
        boxes_px: Optional[torch.Tensor] = None,
        points: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        mask_prompt: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Prompt-only decoding (model card, "Annotation assist"): user prompts, no class token or head.

        SAM's prompt encoder and the adapted two-way transformer with SAM's own output tokens (IoU token and
        the 4 mask tokens) only; the adapters and the decoder depth embedding apply as trained (at zero they
        add nothing, so the result is plain SAM / LiteMedSAM).

        Args:
            image_embedding: ``(B*D, C, g, g)`` (D = the network's ``num_slices``).
            num_prompts: N, prompt sets per slice, ordered ``(b, d, n)``.
            boxes_px: optional ``(B, D, N, 4)`` xyxy in SAM-frame pixels.
            points: optional ``(coords (B*D*N, P, 2) px, labels (B*D*N, P))``; labels 1/0, -1 padding.
            mask_prompt: optional ``(B, D, N, 4g, 4g)`` mask logits (e.g. the previous round's output).

        Returns:
            mask logits ``(B, D, N, 4, 4g, 4g)`` (token 0 = SAM's single-mask output, 1..3 the multimask
            outputs) and predicted IoU ``(B, D, N, 4)``.
        """
        bd, c, g = image_embedding.shape[0], image_embedding.shape[1], image_embedding.shape[-1]
        d, n = self.num_slices, int(num_prompts)
        if bd % d:
            raise ValueError(f"image_embedding must be (B*D, C, g, g) with D={d}, got {tuple(image_embedding.shape)}")
        b = bd // d
        if boxes_px is None and points is None:
            raise ValueError("decode_prompts needs a box or points")
        if boxes_px is not None and tuple(boxes_px.shape) != (b, d, n, 4):
            raise ValueError(f"boxes_px must be (B, D, N, 4) = {(b, d, n, 4)}, got {tuple(boxes_px.shape)}")
        if points is not None and (points[0].ndim != 3 or points[0].shape[0] != b * d * n):
            raise ValueError(f"point coords must be (B*D*N={b * d * n}, P, 2), got {tuple(points[0].shape)}")
        if mask_prompt is not None and tuple(mask_prompt.shape) != (b, d, n, 4 * g, 4 * g):
            raise ValueError(f"mask_prompt must be (B, D, N, 4g, 4g) = {(b, d, n, 4 * g, 4 * g)}, "
                             f"got {tuple(mask_prompt.shape)}")
        layout = QueryLayout(b, d, n)
        sparse, dense = self.prompt_encoder(
            points=points,
            boxes=None if boxes_px is None else layout.fold(boxes_px),
            masks=None if mask_prompt is None else layout.fold(mask_prompt).unsqueeze(1),
        )
        if mask_prompt is None:  # SAM's "no mask" embedding on this frame's g x g grid (not its full 64 x 64)
            dense = self.prompt_encoder.no_mask_embed.weight.reshape(1, c, 1, 1).expand(b * d * n, c, g, g)

        dec = self.mask_decoder
        output_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)  # (1 + M, C)
        tokens = torch.cat([output_tokens.expand(b * d * n, -1, -1), sparse], dim=1)
        src, pos = self._per_query_grids(image_embedding, layout)
        hs, keys = self.transformer(src + dense, pos, tokens, layout)
        upscaled = dec.output_upscaling(keys.transpose(1, 2).reshape(-1, c, g, g))  # (BDN, C/8, 4g, 4g)
        hyper = torch.stack([mlp(hs[:, 1 + m]) for m, mlp in enumerate(dec.output_hypernetworks_mlps)], dim=1)
        masks = torch.einsum("qmc,qchw->qmhw", hyper, upscaled)
        iou = dec.iou_prediction_head(hs[:, 0])
        return layout.unfold(masks), layout.unfold(iou)
