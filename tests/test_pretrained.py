"""Pretrained pieces (scripts/pretrained.py): fp16 trained tensors in files <= the size limit, and the loader that
rebuilds a full model.pt from them and the packaged LiteMedSAM weights."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scripts.network import MaskSAM
from scripts.pretrained import (
    MANIFEST,
    load_trained_state,
    main,
    read_pieces,
    rebuild_model,
    save_pieces,
    trained_state,
)

BUNDLE = Path(__file__).resolve().parents[1] / "masksam_bundle"
LITE = dict(backbone="lite_medsam", num_classes=4, num_queries=4, num_slices=4, image_size=256, sam_upsample=1)
LITE_CONFIG = {"_target_": "scripts.network.MaskSAM", "checkpoint": None, "in_channels": 1, **LITE}
MIB = 2**20


@pytest.fixture(scope="module")
def trained_lite(tmp_path_factory):
    """A lite_medsam MaskSAM whose trained tensors differ from a fresh build, saved as 4-MiB pieces."""
    torch.manual_seed(0)
    net = MaskSAM(**LITE)
    with torch.no_grad():
        for t in trained_state(net).values():
            if t.is_floating_point():
                t.add_(torch.randn_like(t) * 0.05)
    pieces = tmp_path_factory.mktemp("pieces")
    manifest = save_pieces(net, str(pieces), LITE_CONFIG, max_piece_bytes=4 * MIB, extra={"note": "test"})
    return net, pieces, manifest


def test_only_trained_tensors_are_stored_in_fp16_pieces_under_the_limit(trained_lite):
    net, pieces, manifest = trained_lite
    trained = trained_state(net)
    assert set(manifest["tensors"]) == set(trained)
    assert not any(k.startswith(("image_encoder.encoder.", "decoder.sam_")) and k in trained for k in manifest)
    frozen = set(net.state_dict()) - set(trained)
    assert frozen and not frozen & set(manifest["tensors"])  # the frozen LiteMedSAM weights are not stored
    files = sorted(pieces.glob("masksam.part*.pt"))
    assert len(files) == len(manifest["pieces"]) >= 4  # ~16 MiB of fp16 in 4-MiB pieces
    assert all(f.stat().st_size <= 4 * MIB for f in files)
    part = torch.load(files[0], weights_only=True)
    assert all(v.dtype == torch.float16 for v in part.values() if v.is_floating_point())
    # a tensor larger than a piece (the 8-MiB depth embedding of the 64x64 token grid) is cut into chunks
    assert manifest["tensors"]["decoder.depth_pos_embed"]["chunks"] == 3
    assert manifest["frozen_weights"] == "packaged" and manifest["note"] == "test"


def test_rebuilt_model_pt_holds_packaged_frozen_and_fp16_trained_weights(trained_lite, tmp_path):
    net, pieces, _ = trained_lite
    out = tmp_path / "models" / "model.pt"
    rebuild_model(str(pieces), str(out))
    sd = torch.load(out, weights_only=True)
    fresh = MaskSAM(**LITE)
    fresh.load_state_dict(sd, strict=True)  # a complete plain state dict
    original, trained = net.state_dict(), trained_state(net)
    for key, value in sd.items():
        if key in trained:
            assert value.dtype == torch.float32
            torch.testing.assert_close(value, original[key].half().float(), rtol=0, atol=0)
        else:
            torch.testing.assert_close(value, original[key], rtol=0, atol=0)  # packaged LiteMedSAM weights
    with pytest.raises(FileExistsError, match="--overwrite"):
        rebuild_model(str(pieces), str(out))
    rebuild_model(str(pieces), str(out), overwrite=True)


def test_missing_corrupt_and_mismatched_pieces_are_named(trained_lite, tmp_path):
    _, pieces, manifest = trained_lite
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in pieces.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    second = manifest["pieces"][1]["file"]
    (broken / second).unlink()
    with pytest.raises(FileNotFoundError, match=rf"1 of {len(manifest['pieces'])} piece\(s\) missing.*{second}"):
        read_pieces(str(broken))
    (broken / second).write_bytes((pieces / second).read_bytes()[:-10])
    with pytest.raises(ValueError, match=rf"{second}: SHA-256 differs"):
        read_pieces(str(broken))
    (broken / second).write_bytes((pieces / second).read_bytes())
    _, tensors = read_pieces(str(broken))
    other = MaskSAM(**{**LITE, "num_queries": 6})  # another N: the per-query heads differ
    cause = r"likely cause: num_queries \(N\): checkpoint 4 vs network 6(.|\n)*shape mismatch\(es\)"
    with pytest.raises(ValueError, match=cause):
        load_trained_state(other, tensors)
    del tensors[next(iter(tensors))]
    with pytest.raises(ValueError, match=r"1 missing key\(s\)"):
        load_trained_state(MaskSAM(**LITE), tensors)
    fresh = MaskSAM(**LITE)
    frozen_key = sorted(set(fresh.state_dict()) - set(trained_state(fresh)))[0]
    with pytest.raises(ValueError, match=rf"pieces hold 1 tensor\(s\) of the frozen SAM modules: {frozen_key}"):
        load_trained_state(fresh, {**tensors, frozen_key: fresh.state_dict()[frozen_key]})


def test_cli_rebuilds_and_never_overwrites(trained_lite, tmp_path, capsys):
    """``python -m scripts.pretrained`` (its ``main``): exit 1 with the reason, nothing replaced; then a rebuild."""
    _, pieces, _ = trained_lite
    out = tmp_path / "model.pt"
    out.write_bytes(b"keep me")
    args = ["--pieces", str(pieces), "--output", str(out)]
    assert main(args) == 1 and "exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"
    assert main(args + ["--overwrite"]) == 0
    printed = capsys.readouterr().out
    assert "--backbone lite_medsam" in printed and "--patch_size '[256,256,4]'" in printed
    assert set(torch.load(out, weights_only=True)) == set(MaskSAM(**LITE).state_dict())
    assert main(["--pieces", str(tmp_path / "none"), "--output", str(tmp_path / "x.pt")]) == 1
    assert f"no {MANIFEST} in" in capsys.readouterr().err


def test_module_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "scripts.pretrained", "--pieces", str(tmp_path), "--output",
                           str(tmp_path / "model.pt")], cwd=BUNDLE, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert proc.returncode == 1 and f"no {MANIFEST} in" in proc.stderr


def test_random_frozen_backbones_cannot_be_rebuilt(tmp_path):
    torch.manual_seed(0)
    tiny = dict(backbone="vit_t", num_classes=4, num_queries=4, num_slices=4, image_size=64, sam_upsample=1)
    save_pieces(MaskSAM(**tiny), str(tmp_path), {"_target_": "scripts.network.MaskSAM", **tiny})
    assert json.loads((tmp_path / MANIFEST).read_text())["frozen_weights"] == "not restorable"
    with pytest.raises(ValueError, match="vit_t.*frozen weights are random"):
        rebuild_model(str(tmp_path), str(tmp_path / "model.pt"))
    with pytest.raises(FileExistsError, match="manifest.json exists"):
        save_pieces(MaskSAM(**tiny), str(tmp_path), {"_target_": "scripts.network.MaskSAM", **tiny})
