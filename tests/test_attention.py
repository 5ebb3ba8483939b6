"""Fused SAM/TinyViT attention and relative-position tables for frames smaller than 1024 (scripts/attention.py).

The references are segment_anything's own code: its ``Attention`` / ``ImageEncoderViT`` forward and its
``get_rel_pos``; for S < 1024 the reference is SAM's code run with the tables cropped to the grid (spec section 2).
"""

import copy

import pytest
import torch
import torch.nn as nn
from segment_anything.modeling.image_encoder import Attention, ImageEncoderViT, get_rel_pos

from scripts.attention import crop_rel_pos, rel_pos_for_grid, rel_pos_logits, sam_attention, tiny_vit_attention
from scripts.backbones import build_sam_parts
from scripts.image_encoder import AdaptedViTEncoder

FRAME_GRID = 64  # tokens per side of SAM's 1024 frame


def _attention(dim=64, heads=2, side=FRAME_GRID, seed=0) -> Attention:
    torch.manual_seed(seed)
    attn = Attention(dim, num_heads=heads, use_rel_pos=True, input_size=(side, side))
    nn.init.normal_(attn.rel_pos_h, std=0.3)  # SAM zero-initialises them; trained tables are not zero
    nn.init.normal_(attn.rel_pos_w, std=0.3)
    return attn


def _with_cropped_tables(attn: Attention, side: int) -> Attention:
    """SAM's own Attention built for a ``side`` grid, holding the central rows of ``attn``'s tables."""
    ref = Attention(attn.qkv.in_features, num_heads=attn.num_heads, use_rel_pos=True, input_size=(side, side))
    ref.load_state_dict({**attn.state_dict(), "rel_pos_h": crop_rel_pos(attn.rel_pos_h, side).clone(),
                         "rel_pos_w": crop_rel_pos(attn.rel_pos_w, side).clone()})
    return ref


def _forward_and_grads(fn, x, params, seed=1):
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    grads = torch.autograd.grad(out, [x, *params], upstream)
    return out.detach(), grads


# ------------------------------------------------------------------------------------ relative-position tables
def test_crop_at_1024_is_sams_table():
    attn = _attention()
    table = attn.rel_pos_h
    assert crop_rel_pos(table, FRAME_GRID).data_ptr() == table.data_ptr()
    torch.testing.assert_close(crop_rel_pos(table, FRAME_GRID), table, rtol=0, atol=0)
    torch.testing.assert_close(rel_pos_for_grid(table, FRAME_GRID), get_rel_pos(FRAME_GRID, FRAME_GRID, table),
                               rtol=0, atol=0)
    assert crop_rel_pos(table, 16).shape == (31, table.shape[1])
    with pytest.raises(ValueError, match="2\\*65-1 = 129 rows"):
        crop_rel_pos(table, 65)


@pytest.mark.parametrize("grid", [16, 37])
def test_smaller_grid_gives_the_same_bias_for_the_same_token_pair(grid):
    """A token pair at the same coordinates has the same offset in a g-grid and in the 64-grid: same bias."""
    attn = _attention(dim=32, heads=1)
    torch.manual_seed(1)
    q_frame = torch.randn(1, FRAME_GRID, FRAME_GRID, 32)  # queries of the full frame
    q_small = q_frame[:, :grid, :grid]  # the same tokens in the top-left g x g corner (S = 16 g)

    def bias(q, side):
        rel_h, rel_w = rel_pos_logits(q.reshape(1, side * side, 32), attn.rel_pos_h, attn.rel_pos_w, (side, side))
        return (rel_h.view(1, side, side, side, 1) + rel_w.view(1, side, side, 1, side)).detach()  # (B, qh, qw, kh, kw)

    small, frame = bias(q_small, grid), bias(q_frame, FRAME_GRID)
    torch.testing.assert_close(small, frame[:, :grid, :grid, :grid, :grid], rtol=1e-5, atol=1e-5)
    # segment_anything's interpolation rescales the distances and fails the same comparison.
    r_q = q_small.reshape(1, grid, grid, 32)
    interp = (torch.einsum("bhwc,hkc->bhwk", r_q, get_rel_pos(grid, grid, attn.rel_pos_h))[..., :, None]
              + torch.einsum("bhwc,wkc->bhwk", r_q, get_rel_pos(grid, grid, attn.rel_pos_w))[..., None, :]).detach()
    assert (interp - frame[:, :grid, :grid, :grid, :grid]).abs().max() > 1e-2


# ------------------------------------------------------------------------------------ fused attention, one block
@pytest.mark.parametrize("side,grid", [(FRAME_GRID, FRAME_GRID), (14, 14), (FRAME_GRID, 23)],
                         ids=["global-1024", "window", "global-S368"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "explicit"])
def test_attention_equals_sams_forward_and_gradients(side, grid, fused):
    attn = _attention(side=side)
    reference = attn if grid == side else _with_cropped_tables(attn, grid)
    x = torch.randn(1 if grid == FRAME_GRID else 3, grid, grid, 64)
    own, own_grads = _forward_and_grads(lambda t: sam_attention(attn, t, fused=fused), x,
                                        [attn.qkv.weight, attn.rel_pos_h, attn.rel_pos_w])
    ref, ref_grads = _forward_and_grads(reference, x, [reference.qkv.weight, reference.rel_pos_h, reference.rel_pos_w])
    torch.testing.assert_close(own, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(own_grads[0], ref_grads[0], rtol=1e-4, atol=1e-5)  # input
    torch.testing.assert_close(own_grads[1], ref_grads[1], rtol=1e-4, atol=1e-4)  # qkv weight
    # Table gradients: the cropped rows get the reference's, the rows outside the grid's offsets none.
    start = (side - grid)
    torch.testing.assert_close(own_grads[2][start : start + 2 * grid - 1], ref_grads[2], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(own_grads[3][start : start + 2 * grid - 1], ref_grads[3], rtol=1e-4, atol=1e-4)
    assert own_grads[2][:start].abs().sum() == 0 and own_grads[2][start + 2 * grid - 1 :].abs().sum() == 0


@pytest.mark.parametrize("side,grid", [(FRAME_GRID, FRAME_GRID), (14, 14), (FRAME_GRID, 23)],
                         ids=["global-1024", "window", "global-S368"])
def test_inference_path_in_query_blocks_equals_sams_forward(side, grid, monkeypatch):
    """Without autograd on CPU the fused switch runs SAM's computation in blocks of query rows."""
    import scripts.attention as attention

    monkeypatch.setattr(attention, "CHUNK_ELEMENTS", 2 * grid * grid * 7)  # several blocks, the last one short
    attn = _attention(side=side)
    reference = attn if grid == side else _with_cropped_tables(attn, grid)
    x = torch.randn(1, grid, grid, 64)
    with torch.no_grad():
        torch.testing.assert_close(sam_attention(attn, x), reference(x), rtol=1e-4, atol=1e-5)


def test_fused_attention_keeps_no_token_by_token_matrix():
    """What autograd saves for backward: the fused path keeps O(N) tensors, the explicit one an N x N matrix."""
    attn = _attention(dim=32, heads=1)
    attn.requires_grad_(False)
    x = torch.randn(1, 32, 32, 32, requires_grad=True)  # N = 1024 tokens
    n = 32 * 32

    def largest_saved(fused):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            sam_attention(attn, x, fused=fused).sum().backward()
        return max(sizes)

    assert largest_saved(fused=False) >= n * n
    assert largest_saved(fused=True) < n * n / 4


# ------------------------------------------------------------------------------------ whole encoder
def _sam_encoder_for(encoder: ImageEncoderViT, image_size: int) -> ImageEncoderViT:
    """segment_anything's encoder for an S x S input, holding the 1024-frame weights with the frame convention:
    absolute embedding cropped to its top-left corner, global-block tables to their central rows."""
    grid = image_size // 16
    ref = copy.deepcopy(encoder)
    ref.pos_embed = nn.Parameter(encoder.pos_embed[:, :grid, :grid].clone())
    for blk in ref.blocks:
        if blk.window_size == 0:
            blk.attn.rel_pos_h = nn.Parameter(crop_rel_pos(blk.attn.rel_pos_h, grid).clone())
            blk.attn.rel_pos_w = nn.Parameter(crop_rel_pos(blk.attn.rel_pos_w, grid).clone())
    return ref


@pytest.mark.parametrize("image_size", [pytest.param(1024, marks=pytest.mark.slow), 256])
def test_fused_encoder_equals_sams_encoder(image_size):
    """vit_t (windowed blocks 0, 2 and global blocks 1, 3), zero adapters: the adapted encoder with fused
    attention computes segment_anything's encoder, forward and input gradients; the explicit switch agrees."""
    torch.manual_seed(0)
    plain = build_sam_parts("vit_t").image_encoder.eval()
    for blk in plain.blocks:  # non-zero tables so that the bias matters
        nn.init.normal_(blk.attn.rel_pos_h, std=0.1)
        nn.init.normal_(blk.attn.rel_pos_w, std=0.1)
    reference = _sam_encoder_for(plain, image_size)
    x = torch.randn(1, 3, image_size, image_size)
    ref, (ref_grad,) = _forward_and_grads(reference, x, [])
    fused = AdaptedViTEncoder(plain, num_slices=1).eval()
    own, (own_grad,) = _forward_and_grads(lambda t: fused(t)[0], x, [])
    torch.testing.assert_close(own, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(own_grad, ref_grad, rtol=1e-4, atol=1e-5)

    # With non-zero adapters (no SAM reference): fused and explicit agree on outputs and adapter gradients.
    for blk in fused.blocks:
        nn.init.normal_(blk.attn_adapter.up.weight, std=0.05)
    explicit = AdaptedViTEncoder(plain, num_slices=1, fused_attention=False).eval()
    explicit.load_state_dict(fused.state_dict())
    adapter = [fused.blocks[0].attn_adapter.down.weight]
    own, own_grads = _forward_and_grads(lambda t: fused(t)[0], x, adapter)
    exp, exp_grads = _forward_and_grads(lambda t: explicit(t)[0], x,
                                        [explicit.blocks[0].attn_adapter.down.weight])
    torch.testing.assert_close(own, exp, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(own_grads[1], exp_grads[1], rtol=1e-3, atol=1e-5)


# ------------------------------------------------------------------------------------ TinyViT (lite_medsam)
@pytest.fixture(scope="module")
def tiny_vit():
    return build_sam_parts("lite_medsam").image_encoder


@pytest.mark.parametrize("layer", [1, 2], ids=["7x7-windows", "14x14-windows"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_tiny_vit_attention_equals_its_own_forward_and_gradients(tiny_vit, layer, mode):
    """LiteMedSAM's real weights and bias tables; TinyViT switches between a cached and a fresh bias by mode."""
    attn = tiny_vit.layers[layer].blocks[0].attn
    attn.train(mode == "train")
    n = attn.attention_bias_idxs.shape[0]
    x = torch.randn(6, n, attn.qkv.in_features, generator=torch.Generator().manual_seed(layer))
    own, own_grads = _forward_and_grads(lambda t: tiny_vit_attention(attn, t), x, [attn.qkv.weight])
    ref, ref_grads = _forward_and_grads(attn, x, [attn.qkv.weight])
    torch.testing.assert_close(own, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(own_grads[0], ref_grads[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(own_grads[1], ref_grads[1], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=f"windows \\(B, {n}, C\\)"):
        tiny_vit_attention(attn, x[:, :-1])
