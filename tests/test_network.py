"""MaskSAM network: shapes, checkpoints, identity start, un-windowed 3D depth convolution, frozen SAM, learning."""

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from scripts import MaskSAM
from segment_anything.modeling.image_encoder import window_partition, window_unpartition

from scripts.adapters import IMAGE_ADAPTERS, PROMPT_ADAPTERS, image_adapter, prompt_adapter
from scripts.backbones import (
    CheckpointMismatchError,
    build_sam_parts,
    lite_medsam_checkpoint_path,
    read_state_dict,
    require_sam_checkpoint,
)
from scripts.box_ops import masks_to_boxes
from scripts.image_encoder import AdaptedTinyViTEncoder, AdaptedViTBlock, AdaptedViTEncoder
from scripts.prompt_generator import mask_avg_box, mask_avg_box_prompt, mask_box_prompt

K = 4


def _shapes(out):
    return {k: (tuple(v.shape) if torch.is_tensor(v) else [tuple(a.shape) for a in v]) for k, v in out.items()}


@pytest.mark.parametrize("image_size,num_slices", [(64, 2), (128, 3)])
def test_vit_t_train_and_eval_outputs(image_size, num_slices):
    torch.manual_seed(0)
    n, b = 5, 2
    net = MaskSAM(backbone="vit_t", num_classes=K, num_queries=n, num_slices=num_slices, image_size=image_size)
    x = torch.randn(b, 1, image_size, image_size, num_slices)
    net.train()
    with torch.no_grad():
        out = net(x)
    h, d = image_size, num_slices
    assert _shapes(out) == {
        "pred_logits": (b, d, n, K + 1),
        "pred_masks": (b, d, n, h, h),
        "aux_masks": [(b, d, n, h, h), (b, d, n, h // 2, h // 2), (b, d, n, h // 4, h // 4)],
        "aux_boxes": (b, d, n, 4),
        "prompt_boxes": (b, d, n, 4),
    }
    for boxes in (out["aux_boxes"], out["prompt_boxes"]):
        assert boxes.min() >= 0 and boxes.max() <= 1
        assert torch.all(boxes[..., 2] >= boxes[..., 0]) and torch.all(boxes[..., 3] >= boxes[..., 1])

    net.eval()
    with torch.no_grad():
        probs = net(x)
    assert tuple(probs.shape) == (b, K, h, h, d)
    assert probs.min() >= 0 and probs.max() <= 1
    torch.testing.assert_close(probs.sum(1), torch.ones(b, h, h, d), atol=1e-4, rtol=0)


def test_sam_upsample_frames():
    torch.manual_seed(0)
    for up in (2, 4):
        net = MaskSAM(backbone="vit_t", num_classes=3, num_queries=2, num_slices=2, image_size=64, sam_upsample=up).train()
        with torch.no_grad():
            out = net(torch.randn(1, 1, 64, 64, 2))
        assert net.sam_size == 64 * up
        assert tuple(out["pred_masks"].shape) == (1, 2, 2, 64, 64)


def test_lite_medsam_real_weights_forward():
    torch.manual_seed(0)
    net = MaskSAM(backbone="lite_medsam", num_classes=K, num_queries=3, num_slices=1, image_size=256)
    packaged = read_state_dict(lite_medsam_checkpoint_path())
    encoder_weight = "image_encoder.layers.2.blocks.0.attn.qkv.weight"
    torch.testing.assert_close(
        net.image_encoder.layers[2].blocks[0].attn.qkv.weight, packaged[encoder_weight], rtol=0, atol=0
    )
    torch.testing.assert_close(
        net.decoder.mask_decoder.iou_token.weight, packaged["mask_decoder.iou_token.weight"], rtol=0, atol=0
    )
    x = torch.rand(1, 1, 256, 256, 1)
    net.train()
    with torch.no_grad():
        out = net(x)
    assert _shapes(out) == {
        "pred_logits": (1, 1, 3, K + 1),
        "pred_masks": (1, 1, 3, 256, 256),
        "aux_masks": [(1, 1, 3, 256, 256), (1, 1, 3, 128, 128), (1, 1, 3, 64, 64)],
        "aux_boxes": (1, 1, 3, 4),
        "prompt_boxes": (1, 1, 3, 4),
    }
    assert torch.isfinite(out["pred_masks"]).all()
    net.eval()
    with torch.no_grad():
        probs = net(x)
    assert tuple(probs.shape) == (1, K, 256, 256, 1)
    torch.testing.assert_close(probs.sum(1), torch.ones(1, 256, 256, 1), atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def vit_b_checkpoint(tmp_path_factory):
    from segment_anything import sam_model_registry

    torch.manual_seed(1)
    sam = sam_model_registry["vit_b"]()  # random weights in the official state-dict format
    path = tmp_path_factory.mktemp("sam") / "sam_vit_b_01ec64.pth"
    torch.save(sam.state_dict(), path)
    return path, sam.state_dict(), sum(p.numel() for p in sam.parameters())


def test_official_vit_b_checkpoint_loads(vit_b_checkpoint):
    path, state, num_params = vit_b_checkpoint
    net = MaskSAM(backbone="vit_b", checkpoint=str(path), num_classes=K, num_queries=8, num_slices=4,
                  image_size=256, sam_upsample=4)
    encoder = net.image_encoder
    for name in ["blocks.0.attn.qkv.weight", "blocks.11.mlp.lin2.bias", "neck.0.weight", "pos_embed"]:
        own = encoder.pos_embed if name == "pos_embed" else encoder.get_parameter(
            name.replace("blocks.0.", "blocks.0.block.").replace("blocks.11.", "blocks.11.block.")
        )
        torch.testing.assert_close(own, state[f"image_encoder.{name}"], rtol=0, atol=0)
    decoder = net.decoder
    for name in ["transformer.layers.0.self_attn.q_proj.weight", "output_hypernetworks_mlps.0.layers.2.weight"]:
        torch.testing.assert_close(decoder.mask_decoder.get_parameter(name), state[f"mask_decoder.{name}"], rtol=0, atol=0)
    torch.testing.assert_close(
        decoder.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix,
        state["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"], rtol=0, atol=0,
    )
    counts = net.parameter_counts()
    assert counts["frozen"] == num_params


def test_mismatched_checkpoint_names_keys(vit_b_checkpoint, tmp_path):
    path, state, _ = vit_b_checkpoint
    # vit_b weights into vit_l: shapes and block counts differ.
    with pytest.raises(CheckpointMismatchError) as err:
        build_sam_parts("vit_l", str(path))
    message = str(err.value)
    assert str(path) in message and "missing key(s)" in message and "image_encoder.blocks.12." in message and "shape mismatch(es)" in message
    # A checkpoint with one key dropped and one foreign key added.
    broken = dict(state)
    broken.pop("mask_decoder.iou_token.weight")
    broken["adapter.extra"] = torch.zeros(1)
    broken_path = tmp_path / "broken.pth"
    torch.save(broken, broken_path)
    with pytest.raises(CheckpointMismatchError) as err:
        build_sam_parts("vit_b", str(broken_path))
    assert "mask_decoder.iou_token.weight" in str(err.value) and "adapter.extra" in str(err.value)
    with pytest.raises(FileNotFoundError, match="does_not_exist.pth"):
        build_sam_parts("vit_b", str(tmp_path / "does_not_exist.pth"))


def test_zero_adapters_reproduce_plain_sam_vit_encoder():
    torch.manual_seed(0)
    parts = build_sam_parts("vit_t")
    plain = parts.image_encoder.eval()
    x = torch.randn(2, 3, 1024, 1024)  # 2 slices at SAM's native frame
    with torch.no_grad():
        expected = plain(x)
        adapted = AdaptedViTEncoder(plain, num_slices=2).eval()
        embedding, features = adapted(x)
        torch.testing.assert_close(embedding, expected, atol=1e-5, rtol=1e-5)
        assert len(features) == 2 and tuple(features[0].shape) == (2, 128, 64, 64)
        # The comparison can fail: a non-zero adapter changes the output.
        nn.init.normal_(adapted.blocks[0].attn_adapter.up.weight, std=0.1)
        assert (adapted(x)[0] - expected).abs().max() > 1e-3


def test_zero_adapters_reproduce_plain_lite_medsam_encoder():
    torch.manual_seed(0)
    parts = build_sam_parts("lite_medsam")
    plain = parts.image_encoder.eval()
    x = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        expected = plain(x)
        adapted = AdaptedTinyViTEncoder(plain, num_slices=2).eval()
        embedding, features = adapted(x)
    torch.testing.assert_close(embedding, expected, atol=1e-4, rtol=1e-4)
    assert [tuple(f.shape[1:]) for f in features] == [(128, 128, 128), (160, 64, 64), (320, 64, 64), (320, 64, 64)]


class _Zero(nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


def _windowed_adapter_forward(adapted: AdaptedViTBlock, x: torch.Tensor) -> torch.Tensor:
    """The mutation to catch: the release's placement, the attention-side adapter on window-partitioned tokens."""
    blk = adapted.block
    shortcut, h, w = x, x.shape[1], x.shape[2]
    windows, pad_hw = window_partition(blk.norm1(x), blk.window_size)
    windows = blk.attn(windows)
    windows = windows + adapted.attn_adapter(windows)  # "depth" then runs across the windows of one slice
    x = shortcut + window_unpartition(windows, blk.window_size, pad_hw, (h, w))
    normed = blk.norm2(x)
    return x + blk.mlp(normed) + adapted.mlp_adapter_scale * adapted.mlp_adapter(normed)


def _spread_of_one_token(forward, d, side, c, token):
    """``(D, h, w)`` output change after perturbing one input token (a random vector, not a constant shift,
    which LayerNorm would remove)."""
    torch.manual_seed(1)
    x = torch.randn(d, side, side, c)
    moved = x.clone()
    moved[token] += 5.0 * torch.randn(c)
    with torch.no_grad():
        return (forward(moved) - forward(x)).abs().sum(-1)


def _violations_of_unwindowed_3d_convolution(change, token):
    """What is wrong with the spread of one token through one DConvAdapter: it must reach exactly its 3x3x3
    neighbourhood on the un-windowed (D, h, w) grid."""
    d0, h0, w0 = token
    expected = torch.zeros_like(change, dtype=torch.bool)
    expected[max(d0 - 1, 0) : d0 + 2, max(h0 - 1, 0) : h0 + 2, max(w0 - 1, 0) : w0 + 2] = True
    reached = change > 1e-6
    problems = []
    if not reached[d0, h0 + 1, w0]:
        problems.append("in-plane neighbour across the window boundary not reached")
    if not (reached[d0 - 1, h0, w0] and reached[d0 + 1, h0, w0]):
        problems.append("neighbouring slices not reached")
    if not reached[expected].all():
        problems.append(f"{int((~reached[expected]).sum())} of the 27 neighbours not reached")
    if reached[~expected].any():
        problems.append(f"reached {int(reached[~expected].sum())} tokens outside the 3x3x3 neighbourhood")
    return problems


def test_dconv_adapter_runs_a_3d_convolution_on_the_unwindowed_grid():
    """Through a window-attention block, one token's change reaches exactly its 3x3x3 neighbourhood: in-plane
    neighbours across a window boundary and neighbouring slices. Attention and MLP are replaced by per-token
    maps, and only the attention-side adapter is non-zero, so only that adapter can move information.

    The same check fails for the mutations it guards against: the adapter run on window-partitioned tokens
    (the release's placement) and a depth-only (3, 1, 1) kernel (an earlier version of this bundle).
    """
    torch.manual_seed(0)
    block = build_sam_parts("vit_t").image_encoder.blocks[0]
    assert block.window_size == 14
    block.attn, block.mlp = nn.Identity(), _Zero()
    d, side, c = 5, 20, 128  # 20 x 20 grid: padded to two 14 x 14 windows per axis
    token = (2, 13, 13)  # last row/column of the first window: (2, 14, 13) lies in the next window
    adapted = AdaptedViTBlock(block, num_slices=d)
    nn.init.normal_(adapted.attn_adapter.up.weight, std=0.5)  # the MLP-side adapter stays zero

    change = _spread_of_one_token(adapted, d, side, c, token)
    assert _violations_of_unwindowed_3d_convolution(change, token) == []

    windowed = _spread_of_one_token(lambda x: _windowed_adapter_forward(adapted, x), d, side, c, token)
    problems = _violations_of_unwindowed_3d_convolution(windowed, token)
    assert "in-plane neighbour across the window boundary not reached" in problems
    assert "neighbouring slices not reached" in problems

    conv = adapted.attn_adapter.depth_conv
    depth_only = nn.Conv3d(conv.in_channels, conv.out_channels, (3, 1, 1), padding=(1, 0, 0), groups=conv.groups)
    adapted.attn_adapter.depth_conv = depth_only
    problems = _violations_of_unwindowed_3d_convolution(_spread_of_one_token(adapted, d, side, c, token), token)
    assert "in-plane neighbour across the window boundary not reached" in problems


@pytest.mark.parametrize("kind", IMAGE_ADAPTERS)
def test_every_image_adapter_starts_at_zero_and_keeps_volumes_apart(kind):
    torch.manual_seed(0)
    adapter = image_adapter(kind, 16, num_slices=3)
    x = torch.randn(2 * 3, 4, 4, 16)  # two volumes of 3 slices, folded
    assert torch.count_nonzero(adapter(x)) == 0
    for p in adapter.parameters():  # any non-zero weights: the output moves, but only within a volume
        nn.init.normal_(p, std=0.3)
    moved = x.clone()
    moved[1] += torch.randn(4, 4, 16)
    with torch.no_grad():
        change = (adapter(moved) - adapter(x)).abs().flatten(1).sum(1)
    assert torch.all(change[3:] == 0) and change[1] > 0
    assert (change[0] > 0) == (kind != "vanilla")  # every kind but the vanilla adapter mixes slices


@pytest.mark.parametrize("kind", PROMPT_ADAPTERS)
def test_every_prompt_adapter_starts_at_zero(kind):
    adapter = prompt_adapter(kind, 32, num_slices=4)
    assert torch.count_nonzero(adapter(torch.randn(2, 4, 3, 5, 32))) == 0
    with pytest.raises(ValueError, match="4 slices"):
        adapter(torch.randn(2, 3, 3, 5, 32))
    with pytest.raises(ValueError, match="no spatial grid"):
        prompt_adapter("dconv", 32, num_slices=4)


def test_masks_to_boxes_and_mask_avg_box_prompt():
    masks = torch.zeros(3, 8, 10, dtype=torch.bool)
    masks[0, 2:5, 3:7] = True  # rows 2..4, cols 3..6
    masks[1, 7, 9] = True  # one pixel in the corner
    boxes, nonempty = masks_to_boxes(masks)
    torch.testing.assert_close(boxes[0], torch.tensor([0.3, 0.25, 0.7, 0.625]))
    torch.testing.assert_close(boxes[1], torch.tensor([0.9, 0.875, 1.0, 1.0]))
    assert nonempty.tolist() == [True, True, False]

    logits = torch.where(masks, 5.0, -5.0)
    learnable = torch.tensor([[0.1, 0.05, 0.5, 0.625], [0.0, 0.0, 1.0, 1.0], [0.2, 0.2, 0.4, 0.4]], requires_grad=True)
    prompt = mask_avg_box_prompt(logits, learnable)
    assert not prompt.requires_grad
    torch.testing.assert_close(prompt[0], torch.tensor([0.2, 0.15, 0.6, 0.625]))
    torch.testing.assert_close(prompt[2], learnable[2].detach())  # empty aux mask: learnable box alone

    # The supervised box prompt (box_loss_on="prompt"): the same values, gradient x0.5 where averaged.
    supervised = mask_avg_box(logits, learnable)
    torch.testing.assert_close(supervised.detach(), prompt)
    supervised.sum().backward()
    torch.testing.assert_close(learnable.grad, torch.tensor([[0.5] * 4, [0.5] * 4, [1.0] * 4]))
    # Mask-only prompts (ablation B1): the aux mask's box, the whole frame where it is empty.
    torch.testing.assert_close(mask_box_prompt(logits), torch.stack([boxes[0], boxes[1], torch.tensor([0.0, 0, 1, 1])]))


def test_sam_weights_frozen_and_gradients_reach_trainable_only():
    torch.manual_seed(0)
    net = MaskSAM(backbone="vit_t", num_classes=3, num_queries=3, num_slices=2, image_size=64).train()
    sam = build_sam_parts("vit_t")
    sam_params = sum(p.numel() for m in (sam.image_encoder, sam.prompt_encoder, sam.mask_decoder) for p in m.parameters())
    counts = net.parameter_counts()
    assert counts["frozen"] == sam_params and counts["trainable"] > 0
    for module in net.frozen_modules:
        assert all(not p.requires_grad for p in module.parameters())
        assert not module.training  # frozen SAM stays in eval mode during training

    out = net(torch.randn(2, 1, 64, 64, 2))
    loss = out["pred_logits"].logsumexp(-1).mean() + out["pred_masks"].sigmoid().mean()
    loss = loss + sum(a.sigmoid().mean() for a in out["aux_masks"]) + out["aux_boxes"].mean()
    loss.backward()
    without_grad = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
    assert without_grad == []
    assert all(p.grad is None for p in net.parameters() if not p.requires_grad)
    # The adapters inside the frozen encoder and decoder get a gradient.
    assert net.image_encoder.blocks[0].attn_adapter.up.weight.grad.abs().sum() > 0
    assert net.decoder.transformer.layers[0].image_adapter.up.weight.grad.abs().sum() > 0
    assert net.decoder.class_head.weight.grad.abs().sum() > 0


def test_few_steps_on_a_fixed_batch_lower_a_set_objective():
    torch.manual_seed(0)
    net = MaskSAM(backbone="vit_t", num_classes=3, num_queries=2, num_slices=2, image_size=64).train()
    x = torch.randn(1, 1, 64, 64, 2)
    target_masks = torch.zeros(1, 2, 2, 64, 64)
    target_masks[:, :, 0, 16:48, 16:48] = 1
    target_masks[:, :, 1] = 1 - target_masks[:, :, 0]
    target_classes = torch.tensor([1, 0]).expand(1, 2, 2)

    def objective():
        out = net(x)
        ce = F.cross_entropy(out["pred_logits"].reshape(-1, 4), target_classes.reshape(-1))
        bce = F.binary_cross_entropy_with_logits(out["pred_masks"], target_masks)
        aux = F.binary_cross_entropy_with_logits(out["aux_masks"][0], target_masks)
        return ce + bce + aux

    trainable = [p for p in net.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(trainable, lr=1e-3)
    losses = []
    for _ in range(6):
        optimiser.zero_grad()
        loss = objective()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_bad_inputs_raise_clear_errors():
    net = MaskSAM(backbone="vit_t", in_channels=2, num_classes=3, num_queries=2, num_slices=3, image_size=64)
    with pytest.raises(ValueError, match=r"in_channels=2, got 1 channels"):
        net(torch.randn(1, 1, 64, 64, 3))
    with pytest.raises(ValueError, match=r"num_slices=3, got depth 5"):
        net(torch.randn(1, 2, 64, 64, 5))
    with pytest.raises(ValueError, match=r"64x64, got 48x64"):
        net(torch.randn(1, 2, 48, 64, 3))
    with pytest.raises(ValueError, match=r"5D input"):
        net(torch.randn(2, 64, 64, 3))
    with pytest.raises(ValueError, match="lite_medsam works in a 256x256 frame"):
        MaskSAM(backbone="lite_medsam", image_size=128)
    with pytest.raises(ValueError, match="backbone must be one of"):
        MaskSAM(backbone="vit_x")
    with pytest.raises(ValueError, match="sam_upsample must be 1, 2 or 4"):
        MaskSAM(backbone="vit_t", image_size=64, sam_upsample=3)
    with pytest.raises(ValueError, match="multiple of 16"):
        MaskSAM(backbone="vit_t", image_size=100)


def test_vit_without_checkpoint_builds_silently_but_training_requires_one(tmp_path):
    """Building for inference (a trained model.pt follows) prints no SAM-checkpoint warning; the training
    check names ``sam_checkpoint`` and the official file, unless random SAM weights are allowed explicitly."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_sam_parts("vit_b")
    assert not [w for w in caught if "checkpoint" in str(w.message)]

    with pytest.raises(ValueError, match=r"sam_checkpoint.*sam_vit_b_01ec64\.pth.*allow_random_sam"):
        require_sam_checkpoint("vit_b", None)
    with pytest.raises(FileNotFoundError, match=r"sam_checkpoint .*missing\.pth.*sam_vit_h_4b8939\.pth"):
        require_sam_checkpoint("vit_h", str(tmp_path / "missing.pth"))
    require_sam_checkpoint("vit_b", None, allow_random_sam=True)
    for backbone in ("lite_medsam", "vit_t"):  # packaged weights / a test backbone: nothing to require
        require_sam_checkpoint(backbone, None)
    present = tmp_path / "sam_vit_l_0b3195.pth"
    present.write_bytes(b"")
    require_sam_checkpoint("vit_l", str(present))


def test_monai_batches_with_metadata_reach_the_loss():
    """A collated MONAI batch (MetaTensors with per-item metadata) goes through the network into the loss."""
    from monai.data import MetaTensor, list_data_collate

    from scripts import MaskSAMLoss

    torch.manual_seed(0)
    net = MaskSAM(backbone="vit_t", num_classes=K, num_queries=5, num_slices=2, image_size=64).train()
    items = [
        {
            "image": MetaTensor(torch.randn(1, 64, 64, 2), meta={"filename_or_obj": f"case{i}.nii.gz"}),
            "label": MetaTensor(torch.randint(0, K, (1, 64, 64, 2)).float(), meta={"filename_or_obj": f"seg{i}.nii.gz"}),
        }
        for i in range(2)
    ]
    batch = list_data_collate(items)
    out = net(batch["image"])
    assert not isinstance(out["pred_masks"], MetaTensor)
    loss = MaskSAMLoss(num_classes=K, seed=0)(out, batch["label"])
    assert torch.isfinite(loss) and loss > 0
