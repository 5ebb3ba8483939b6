"""Interactive correction (scripts.interactive): click -> SAM prompt mapping, windowing, label-merge rules."""

import numpy as np
import pytest
import torch

from scripts import MaskSAM
from scripts.interactive import (
    Box,
    apply_correction,
    correct_label,
    depth_windows,
    predict_target_mask,
    voxel_to_frame,
    window_starts,
)


class FakeNet(torch.nn.Module):
    """A stand-in with MaskSAM's encode/decode interface whose masks show exactly where the prompts landed.

    Query n is confidently class n+1. A query's mask is empty unless prompted: each foreground point paints a
    disk of radius 1.5 voxels around the voxel it maps back to (inverse of the frame mapping, reading x as the
    column and y as the row), and a box override paints the box (pixel edges, box_ops convention).
    """

    def __init__(self, image_size=16, num_slices=4, num_queries=3, num_classes=4, sam_upsample=4):
        super().__init__()
        self.image_size, self.num_slices, self.num_queries = image_size, num_slices, num_queries
        self.num_classes, self.sam_size = num_classes, image_size * sam_upsample
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.calls = []

    def encode(self, x):
        assert x.shape[1:] == (1, self.image_size, self.image_size, self.num_slices)
        b, d, n = x.shape[0], self.num_slices, self.num_queries
        ids = torch.arange(n, dtype=torch.float32).reshape(1, 1, n, 1).expand(b, d, n, 1)  # query ids ride along
        return {"embedding": x, "aux_masks": [torch.zeros(b, d, n, 1, 1)], "aux_boxes": torch.zeros(b, d, n, 4),
                "aux_tokens": ids}

    def decode(self, encoded, points=None, boxes=None):
        ids = encoded["aux_tokens"][0, 0, :, 0].long().tolist()  # the (possibly subset of) queries decoded
        b, h, d, n = encoded["embedding"].shape[0], self.image_size, self.num_slices, len(ids)
        self.calls.append((points, boxes, ids))
        logits = torch.full((b, d, n, self.num_classes + 1), -10.0)
        for q, query in enumerate(ids):
            logits[:, :, q, query + 1] = 10.0
        masks = torch.full((b, d, n, h, h), -10.0)
        rows, cols = torch.meshgrid(torch.arange(h).float(), torch.arange(h).float(), indexing="ij")
        s = self.sam_size / h
        if points is not None:
            coords, labels = points
            coords = coords.reshape(b, d, n, -1, 2)
            labels = labels.reshape(b, d, n, -1)
            for idx in torch.nonzero(labels == 1).tolist():
                bi, di, qi, pi = idx
                x, y = coords[bi, di, qi, pi].tolist()
                j, i = (x + 0.5) / s - 0.5, (y + 0.5) / s - 0.5
                disk = (rows - i) ** 2 + (cols - j) ** 2 <= 1.5**2
                masks[bi, di, qi][disk] = 10.0
        if boxes is not None:
            for bi, di, qi in torch.nonzero(~torch.isnan(boxes).any(-1)).tolist():
                x0, y0, x1, y1 = (boxes[bi, di, qi] / s).round().long().tolist()
                masks[bi, di, qi, y0:y1, x0:x1] = 10.0
        return {"pred_logits": logits, "pred_masks": masks}


def test_helpers():
    assert window_starts(16, 16, 0.5) == [0]
    assert window_starts(40, 16, 0.5) == [0, 8, 16, 24]
    assert window_starts(20, 16, 0.25) == [0, 4]
    assert depth_windows([0, 1, 7], 10, 4) == [(0, [0, 1]), (6, [7])]
    assert depth_windows([9], 10, 4) == [(6, [9])]
    # voxel centre (row i, column j) -> frame (x, y): x follows the column; x4 upsampling keeps centres.
    xy = voxel_to_frame(torch.tensor(2.0), torch.tensor(5.0), image_size=16, sam_size=64)
    assert xy.tolist() == [5 * 4 + 1.5, 2 * 4 + 1.5]
    assert Box.from_any([[3, 4, 1], [1, 2, 2]]) == Box((1, 2, 1), (3, 4, 2))
    assert Box.from_any([]) is None
    with pytest.raises(ValueError):
        Box.from_any([1, 2, 3])


def test_points_reach_the_right_voxel_and_query():
    net = FakeNet()
    image = torch.zeros(1, 16, 16, 6)
    res = predict_target_mask(net, image, target=2, foreground=[[3, 11, 4]], background=[[12, 2, 4]])
    assert res.slices == [4] and res.queries == {4: 1}  # query 1 holds class 2
    # Only slice 4 is touched; the mask is the disk around the foreground click (row 3, column 11).
    assert res.region[..., 4].all() and not res.region[..., [0, 1, 2, 3, 5]].any()
    on = torch.nonzero(res.mask).tolist()
    assert [3, 11, 4] in on and all(z == 4 and abs(i - 3) <= 1 and abs(j - 11) <= 1 for i, j, z in on)
    # First pass: all queries, no prompts. Second pass: only query 1 (class 2), with the clicks on slice 4
    # (window starts at slice 2 -> local slice 2): foreground 1, background 0, padding -1 elsewhere.
    assert net.calls[0][0] is None and net.calls[0][2] == [0, 1, 2]
    (coords, labels), _, ids = net.calls[-1]
    assert ids == [1]
    labels = labels.reshape(1, 4, 1, -1)
    assert sorted(labels[0, 4 - 2, 0].tolist()) == [0, 1]
    assert (labels[0, [0, 1, 3]] == -1).all()


def test_box_override_and_padding_offsets():
    net = FakeNet()
    image = torch.zeros(1, 10, 12, 3)  # smaller than the 16 x 16 x 4 patch: padded, results cropped back
    res = predict_target_mask(net, image, target=3, box=[[2, 5, 1], [4, 8, 2]])
    assert res.mask.shape == (10, 12, 3) and res.slices == [1, 2]
    expected = torch.zeros(10, 12, 3, dtype=torch.bool)
    expected[2:5, 5:9, 1:3] = True
    assert torch.equal(res.mask, expected)
    assert res.region[..., 1:3].all() and not res.region[..., 0].any()


def test_large_slices_use_only_windows_with_clicks():
    net = FakeNet()
    image = torch.zeros(1, 40, 40, 4)
    res = predict_target_mask(net, image, target=1, foreground=[[2, 3, 0]])
    assert res.mask[2, 3, 0]
    # Only in-plane windows that contain the click were run: rows/columns 0..15 on slice 0.
    assert res.region[:16, :16, 0].all() and not res.region[16:, :, 0].any() and not res.region[:, 16:, 0].any()
    with pytest.raises(ValueError, match="outside the image"):
        predict_target_mask(net, image, target=1, foreground=[[40, 0, 0]])
    with pytest.raises(ValueError, match="target label"):
        predict_target_mask(net, image, target=0, foreground=[[1, 1, 0]])
    with pytest.raises(ValueError, match="at least one"):
        predict_target_mask(net, image, target=1)


def test_apply_correction_rules():
    label = np.zeros((8, 8, 3), dtype=np.uint8)
    label[0:3, 0:3, 1] = 2  # target, partly outside the new mask
    label[5:8, 5:8, 1] = 3  # another label, under the new mask
    label[0:3, 0:3, 0] = 2  # target on an untouched slice
    mask = np.zeros_like(label, dtype=bool)
    mask[2:7, 2:7, 1] = True
    region = np.zeros_like(mask)
    region[..., 1] = True
    out = apply_correction(label, 2, mask, region, background=[[2, 2, 1]])
    assert out.dtype == label.dtype
    assert (out[..., 0] == label[..., 0]).all() and (out[..., 2] == label[..., 2]).all()
    assert (out[5:8, 5:8, 1] == 3).all()  # other labels protected
    grow = mask[..., 1] & (label[..., 1] == 0)
    grow[2, 2] = False  # background click wins
    assert (out[..., 1][grow] == 2).all()
    assert out[2, 2, 1] == 0 and (out[0:2, 0:3, 1] == 0).all()
    assert set(np.unique(out)) <= {0, 2, 3}
    # Without protection the other label under the mask is taken over; a foreground click is forced.
    out2 = apply_correction(torch.as_tensor(label)[None], 2, mask, region, foreground=[[7, 0, 1]],
                            protect_other_labels=False)
    assert out2.shape == (1, 8, 8, 3) and out2.dtype == torch.uint8
    assert (out2[0, 5:7, 5:7, 1] == 2).all() and out2[0, 7, 7, 1] == 3 and out2[0, 7, 0, 1] == 2


def test_real_network_prompts_change_only_the_target_on_clicked_slices():
    torch.manual_seed(0)
    net = MaskSAM(backbone="vit_t", num_classes=4, num_queries=3, num_slices=2, image_size=64).eval()
    x = torch.randn(1, 1, 64, 64, 2)
    with torch.no_grad():
        enc = net.encode(x)
        plain = net.decode(enc)
        torch.testing.assert_close(plain["pred_masks"], net.forward_sets(x)["pred_masks"])
        coords = torch.zeros(1 * 2 * 3, 1, 2)
        labels = torch.full((6, 1), -1)
        coords[0, 0] = torch.tensor([40.0, 10.0])
        labels[0, 0] = 1
        pointed = net.decode(enc, points=(coords, labels))
        assert not torch.allclose(pointed["pred_masks"][0, 0, 0], plain["pred_masks"][0, 0, 0])
        boxes = torch.full((1, 2, 3, 4), float("nan"))
        same = net.decode(enc, boxes=boxes)
        torch.testing.assert_close(same["pred_masks"], plain["pred_masks"])
        boxes[0, 1, 2] = torch.tensor([5.0, 5.0, 30.0, 30.0])
        boxed = net.decode(enc, boxes=boxes)
        assert not torch.allclose(boxed["pred_masks"][0, 1, 2], plain["pred_masks"][0, 1, 2])
        # Queries are decoded independently: a subset decode gives the same masks and classes.
        from scripts.interactive import _query_subset

        sub = net.decode(_query_subset(enc, [2]))
        torch.testing.assert_close(sub["pred_masks"][:, :, 0], plain["pred_masks"][:, :, 2], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(sub["pred_logits"][:, :, 0], plain["pred_logits"][:, :, 2], atol=1e-4, rtol=1e-4)
        with pytest.raises(ValueError, match="boxes must have shape"):
            net.decode(enc, boxes=torch.zeros(1, 2, 3))

    image = torch.randn(1, 70, 60, 5)
    label = torch.randint(0, 4, (70, 60, 5), dtype=torch.uint8)
    label[10:20, 10:20, 3] = 0
    out = correct_label(net, image, label, target=1, foreground=[[15, 15, 3]], background=[[50, 40, 3]])
    assert out.shape == label.shape and out.dtype == label.dtype
    changed = out != label
    assert out[15, 15, 3] == 1 and out[50, 40, 3] != 1
    assert not changed[..., [0, 1, 2, 4]].any()  # only the clicked slice
    assert set(out[changed].tolist()) <= {0, 1} and set(label[changed].tolist()) <= {0, 1}
    for k in (2, 3):
        assert torch.equal(out == k, label == k)  # other labels untouched


def test_geometry_helpers():
    from scripts.interactive import map_points, resample_nearest, voxel_map

    orig = np.eye(4)
    pre = np.diag([4.0, 4.0, 1.0, 1.0])
    pre[0, 3] = -8.0  # 4 mm grid, padded by 2 voxels along the first axis
    to_pre = voxel_map(orig, pre)
    assert map_points([[8, 4, 3], [0, 0, 0]], to_pre) == [[4, 1, 3], [2, 0, 0]]
    small = np.zeros((10, 6, 5), dtype=np.uint8)
    small[4, 1, 3] = 7
    back = resample_nearest(small, voxel_map(orig, pre), (32, 24, 5))
    assert back.shape == (32, 24, 5) and back.dtype == np.uint8
    # Original voxels whose nearest 4 mm cell is (4, 1): i in 7..10 (rounding), j in 3..5 (rounding).
    assert back[8, 4, 3] == 7 and back[0, 0, 3] == 0 and (back[..., [0, 1, 2, 4]] == 0).all()
    assert set(np.unique(back)) == {0, 7}
    ident = resample_nearest(small, np.eye(4), small.shape)
    assert np.array_equal(ident, small)
