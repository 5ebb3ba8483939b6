"""Test-time mirroring (scripts/tta.py) and its switch in the bundle configs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser
from monai.inferers import SlidingWindowInferer

from scripts.network import MaskSAM
from scripts.tta import MirrorEnsemble, MirroringSlidingWindowInferer, mirror_combinations, parse_flag

BUNDLE = Path(__file__).resolve().parents[1] / "masksam_bundle"
TINY = dict(backbone="vit_t", num_classes=4, num_queries=4, num_slices=4, image_size=64, sam_upsample=1)


@pytest.fixture(scope="module")
def tiny_net():
    torch.manual_seed(0)
    return MaskSAM(**TINY).eval()


def test_mirror_combinations_cover_every_subset():
    assert mirror_combinations((0, 1, 2)) == [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]
    assert mirror_combinations(()) == [()]


def test_mirroring_equals_the_mean_of_explicitly_flipped_predictions():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.Softmax(1)).eval()  # not symmetric
    x = torch.randn(1, 1, 64, 64, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        flips = [[], [2], [3], [4], [2, 3], [2, 4], [3, 4], [2, 3, 4]]
        predictions = [torch.flip(net(torch.flip(x, f)), f) if f else net(x) for f in flips]
        plain, expected = predictions[0], sum(predictions) / 8
        inferer = MirroringSlidingWindowInferer(roi_size=[64, 64, 4], sw_batch_size=1, overlap=0.5, mode="gaussian")
        mirrored = inferer(x, net)
        off = MirroringSlidingWindowInferer(roi_size=[64, 64, 4], sw_batch_size=1, overlap=0.5, mode="gaussian",
                                            tta_mirror=False)(x, net)
        reference = SlidingWindowInferer(roi_size=[64, 64, 4], sw_batch_size=1, overlap=0.5, mode="gaussian")(x, net)
    torch.testing.assert_close(torch.as_tensor(mirrored), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.as_tensor(off), torch.as_tensor(reference))
    torch.testing.assert_close(torch.as_tensor(off), plain, atol=1e-5, rtol=1e-4)
    assert (expected - plain).abs().max() > 1e-3  # the network is not mirror-symmetric: the test can fail
    torch.testing.assert_close(torch.as_tensor(mirrored).sum(1), torch.ones(1, 64, 64, 4), atol=1e-4, rtol=0)


def test_mirroring_inside_each_window_of_a_larger_volume(tiny_net):
    """Two windows along W: the wrapper mirrors each window (the network sees exactly its patch size)."""
    x = torch.randn(1, 1, 64, 96, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        mirrored = MirroringSlidingWindowInferer(roi_size=[64, 64, 4], sw_batch_size=2, overlap=0.5,
                                                 mirror_axes=(1,))(x, tiny_net)
        by_hand = SlidingWindowInferer(roi_size=[64, 64, 4], sw_batch_size=2, overlap=0.5)(
            x, lambda p: (tiny_net(p) + torch.flip(tiny_net(torch.flip(p, [3])), [3])) / 2)
    torch.testing.assert_close(torch.as_tensor(mirrored), torch.as_tensor(by_hand), atol=1e-5, rtol=1e-4)


def test_bad_mirror_axes_are_refused():
    with pytest.raises(ValueError, match=r"mirror_axes \[0, 3\] must index the 3 spatial axes"):
        MirroringSlidingWindowInferer(roi_size=[64, 64, 4], mirror_axes=(0, 3))
    with pytest.raises(ValueError, match=r"need 3 spatial axes.*\(1, 1, 8, 8\)"):
        MirrorEnsemble(torch.nn.Identity(), (0, 2))(torch.zeros(1, 1, 8, 8))


def _inferer(files, **overrides):
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / f) for f in files])
    for k, v in overrides.items():
        parser[k] = v
    return parser.get_parsed_content("inferer" if files[0] == "inference.yaml" else "validate#inferer")


def test_configs_mirror_in_evaluation_and_inference_not_in_training_validation():
    assert _inferer(["inference.yaml"]).tta_mirror is True
    assert _inferer(["inference.yaml"]).mirror_axes == (0, 1, 2)
    assert _inferer(["inference.yaml"], tta_mirror=False).tta_mirror is False
    assert _inferer(["train.yaml", "evaluate.yaml"]).tta_mirror is True
    assert _inferer(["train.yaml", "evaluate.yaml"], tta_mirror=False).tta_mirror is False
    assert _inferer(["train.yaml"]).tta_mirror is False  # nnU-Net's online validation does not mirror
    assert _inferer(["inference.yaml", "tiny.yaml"]).tta_mirror is False  # smoke preset: plain, fast


@pytest.mark.parametrize("files,flag,expected", [
    ("['configs/inference.yaml','configs/tiny.yaml']", "true", "True"),  # tiny.yaml turns it off
    # (train.yaml + evaluate.yaml with --tta_mirror false: the ConfigParser test above; one CLI run suffices)
])
def test_switch_through_the_bundle_cli(files, flag, expected):
    """``--tta_mirror false|true`` reaches the inferer as a bool (the CLI hands over the string "false")."""
    inferer = "inferer" if "inference" in files else "validate#inferer"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "show", "--config_file", files,
           "--show", f"$print('tta_mirror =', @{inferer}.tta_mirror)"] + (["--tta_mirror", flag] if flag else [])
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, cwd=BUNDLE, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"tta_mirror = {expected}" in proc.stdout


def test_unclear_switch_values_are_refused():
    assert parse_flag("False", "tta_mirror") is False and parse_flag("yes", "tta_mirror") is True
    with pytest.raises(ValueError, match=r"tta_mirror must be true or false, got 'off\?'"):
        MirroringSlidingWindowInferer(roi_size=[8, 8, 4], tta_mirror="off?")
