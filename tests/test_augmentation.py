"""nnU-Net's default augmentation (scripts/augmentation.py and train#random_transforms in configs/train.yaml)."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.transforms import AdjustContrast, Compose, RandAffined, RandCropByLabelClassesd

from scripts.augmentation import (
    RandAffineCropByLabelClassesd,
    RandGammad,
    RandGaussianBlurd,
    RandSimulateLowResolutiond,
    sample_nnunet_factor,
)

BUNDLE_ROOT = Path(__file__).resolve().parents[1] / "masksam_bundle"
PATCH = [256, 256, 4]


def _square_label(shape, box, value=1):
    label = torch.zeros(1, *shape)
    (h0, h1), (w0, w1) = box
    label[0, h0:h1, w0:w1] = value
    return label


def test_rotated_and_scaled_patch_has_no_zero_filled_corners():
    """A constant-1 image, rotated by 45 degrees and scaled by 1.4 (the largest region): every voxel of the patch
    holds image content, because the patch is resampled from the whole volume around the class-balanced centre."""
    shape = (640, 640, 6)
    image = torch.ones(1, *shape)
    label = _square_label(shape, ((310, 330), (310, 330)))  # centres on the foreground: far from the borders
    xform = RandAffineCropByLabelClassesd(
        ["image", "label"], "label", PATCH, num_classes=2, ratios=[0, 1], prob_rotate=1.0,
        rotate_range=(math.pi / 4, math.pi / 4), prob_scale=1.0, scale_range=(1.4, 1.4))
    xform.set_random_state(0)
    out = xform({"image": image, "label": label})
    assert len(out) == 1 and xform.draws == [(math.pi / 4, 1.4)]
    xform.set_random_state(0)  # the centre sampler draws from its own stream, not a copy of the rotation draws
    assert xform.R.uniform() != xform.sampler.cropper.R.uniform()
    patch = out[0]["image"]
    assert tuple(patch.shape) == (1, *PATCH)
    assert float(patch.min()) > 0.999 and float(patch.max()) < 1.001
    # The old recipe (crop first, then rotate the patch) leaves zero-filled corners on the same input: the check
    # above is what tells the two apart.
    crop_then_rotate = Compose([
        RandCropByLabelClassesd(["image", "label"], "label", PATCH, ratios=[0, 1], num_classes=2, warn=False),
        RandAffined(["image", "label"], prob=1.0, rotate_range=(0, 0, (math.pi / 4, math.pi / 4)),
                    mode=["bilinear", "nearest"], padding_mode="zeros"),
    ])
    crop_then_rotate.set_random_state(0)
    corners = crop_then_rotate({"image": image, "label": label})[0]["image"]
    assert float(corners[0, 0, 0, 0]) == 0.0 and float((corners == 0).float().mean()) > 0.1


def test_centre_stays_on_the_sampled_class_after_rotation_and_scaling():
    shape = (300, 320, 4)
    label = _square_label(shape, ((200, 206), (60, 66)), value=2)  # a small class-2 square
    image = torch.randn(1, *shape)
    xform = RandAffineCropByLabelClassesd(["image", "label"], "label", [64, 64, 4], num_classes=3, ratios=[0, 0, 1],
                                          prob_rotate=1.0, prob_scale=1.0)
    for seed in range(5):
        xform.set_random_state(seed)
        out = xform({"image": image, "label": label})[0]
        assert int(out["label"][0, 32, 32, 2]) == 2, (seed, xform.draws)


def test_no_draw_is_an_exact_crop_and_identity_resampling_matches_it():
    shape = (90, 100, 6)
    hh, ww, dd = torch.meshgrid(torch.arange(90.0), torch.arange(100.0), torch.arange(6.0), indexing="ij")
    image = (hh * 1000 + ww * 10 + dd)[None]
    label = _square_label(shape, ((40, 50), (60, 70)))
    xform = RandAffineCropByLabelClassesd(["image", "label"], "label", [32, 32, 4], num_classes=2, ratios=[0, 1],
                                          prob_rotate=0.0, prob_scale=0.0)
    xform.set_random_state(3)
    crop = xform({"image": image, "label": label})[0]["image"]
    c = xform.sampler.cropper.centers[0]
    assert float(crop[0, 16, 16, 2]) == c[0] * 1000 + c[1] * 10 + c[2]  # SpatialCrop's centre voxel
    from monai.transforms import Affine

    identity = Affine(affine=xform.patch_matrix(c, shape, 0.0, 1.0), spatial_size=[32, 32, 4], mode="bilinear",
                      padding_mode="zeros", image_only=True)(image)
    torch.testing.assert_close(identity.as_tensor(), crop.as_tensor(), atol=0.05, rtol=0)


def test_scaling_is_isotropic_in_plane_within_0_7_to_1_4_and_leaves_the_slices():
    """Ramps along H, W and D: the output step per voxel along an axis is the scale applied to it."""
    shape = (400, 400, 6)
    hh, ww, dd = torch.meshgrid(torch.arange(400.0), torch.arange(400.0), torch.arange(6.0), indexing="ij")
    label = _square_label(shape, ((190, 210), (190, 210)))
    xform = RandAffineCropByLabelClassesd(["h", "w", "d"], "label", [64, 64, 4], num_classes=2, ratios=[0, 1],
                                          prob_rotate=0.0, prob_scale=1.0, mode="bilinear")
    scales = []
    for seed in range(40):
        xform.set_random_state(seed)
        out = xform({"h": hh[None], "w": ww[None], "d": dd[None], "label": label})[0]
        step_h = float((out["h"][0, 40, 30, 1] - out["h"][0, 20, 30, 1]) / 20)
        step_w = float((out["w"][0, 30, 40, 1] - out["w"][0, 30, 20, 1]) / 20)
        step_d = float(out["d"][0, 30, 30, 3] - out["d"][0, 30, 30, 0]) / 3
        assert step_h == pytest.approx(xform.draws[0][1], abs=1e-3)
        assert step_w == pytest.approx(step_h, abs=1e-3)  # isotropic in-plane
        assert step_d == pytest.approx(1.0, abs=1e-4)  # the slice axis is not scaled
        assert float(out["h"][0, 40, 30, 1] - out["h"][0, 40, 20, 1]) == pytest.approx(0.0, abs=1e-3)  # no rotation
        scales.append(step_h)
    assert 0.7 <= min(scales) < 0.85 and 1.25 < max(scales) <= 1.4


def test_labels_stay_integer_class_ids():
    shape = (200, 200, 4)
    g = torch.Generator().manual_seed(0)
    label = torch.randint(0, 4, (1, 20, 20, 4), generator=g).float()
    label = torch.nn.functional.interpolate(label[None], size=shape, mode="nearest")[0]  # blocky 4-class map
    xform = RandAffineCropByLabelClassesd(["image", "label"], "label", [96, 96, 4], num_classes=4,
                                          prob_rotate=1.0, prob_scale=1.0)
    for seed in range(4):
        xform.set_random_state(seed)
        out = xform({"image": torch.randn(1, *shape), "label": label})[0]["label"]
        values = torch.unique(out)
        assert set(values.tolist()) <= {0.0, 1.0, 2.0, 3.0} and len(values) >= 2, values


def test_gamma_is_drawn_as_nnunet_and_inverted_gamma_flips_the_image():
    rng = np.random.RandomState(0)
    draws = np.array([sample_nnunet_factor(rng, 0.7, 1.5) for _ in range(4000)])
    assert 0.47 < float((draws < 1).mean()) < 0.53 and draws.min() >= 0.7 and draws.max() <= 1.5
    x = torch.randn(1, 16, 16, 4) * 2 + 1
    inv = RandGammad("image", prob=1.0, invert_image=True)
    inv.set_random_state(1)
    y = inv({"image": x})["image"]
    g = inv.gamma_value
    expected = -AdjustContrast(gamma=g, retain_stats=True)(-x)
    torch.testing.assert_close(torch.as_tensor(y), torch.as_tensor(expected))
    assert float(y.mean()) == pytest.approx(float(x.mean()), abs=1e-4)  # statistics retained
    assert float(y.std()) == pytest.approx(float(x.std()), rel=1e-3)
    assert not torch.allclose(torch.as_tensor(y), x)


def test_blur_keeps_constant_images_and_low_resolution_leaves_the_slice_axis():
    blur = RandGaussianBlurd("image", prob=1.0)
    blur.set_random_state(0)
    const = torch.full((1, 32, 32, 4), 3.0)
    torch.testing.assert_close(torch.as_tensor(blur({"image": const})["image"]), const)  # reflecting borders
    assert all(0.5 <= s <= 1.0 for s in blur.sigmas) and len(blur.sigmas) == 3
    slices = torch.zeros(1, 32, 32, 4)
    slices[..., 2] = 5.0
    low = RandSimulateLowResolutiond("image", prob=1.0, axes=(0, 1))
    low.set_random_state(0)
    out = torch.as_tensor(low({"image": slices})["image"])
    torch.testing.assert_close(out, slices)  # in-plane only: slices never mix
    noise = torch.randn(1, 32, 32, 4, generator=torch.Generator().manual_seed(0))
    coarse = torch.as_tensor(low({"image": noise})["image"])
    assert 0.5 <= low.zoom <= 1.0 and float((coarse - noise).abs().mean()) > 0.1


def _acdc_parser(acdc_dir):
    parser = ConfigParser()
    parser.read_config([str(BUNDLE_ROOT / "configs" / "train.yaml")])
    parser["bundle_root"] = str(BUNDLE_ROOT)
    parser["dataset_dir"] = str(acdc_dir)
    parser["num_train_cases"] = 1
    return parser


def test_whole_random_chain_runs_on_a_real_acdc_case(acdc_dir):
    parser = _acdc_parser(acdc_dir)
    names = [t["_target_"].split(".")[-1] for t in parser["train#random_transforms"]]
    assert names[:2] == ["RandAffineCropByLabelClassesd", "DeleteItemsd"]
    assert {"RandGaussianNoised", "RandGaussianBlurd", "RandScaleIntensityd", "RandScaleIntensityFixedMeand",
            "RandSimulateLowResolutiond", "RandGammad", "RandFlipd"} <= set(names)
    # every random transform forced on: each one runs on real data at least once
    for i, t in enumerate(parser["train#random_transforms"]):
        for key in ("prob", "prob_rotate", "prob_scale"):
            if key in t:
                parser[f"train#random_transforms#{i}#{key}"] = 1.0
    case = parser.get_parsed_content("train#datalist")[0]
    chain = parser.get_parsed_content("train#preprocessing")
    for seed in range(3):
        chain.set_random_state(seed)
        out = chain(case)
        assert isinstance(out, list) and len(out) == 1
        image, label = out[0]["image"], out[0]["label"]
        assert tuple(image.shape) == (1, *PATCH) and tuple(label.shape) == (1, *PATCH)
        assert bool(torch.isfinite(image).all()) and float(image.std()) > 0.1
        assert set(torch.unique(label).tolist()) <= {0.0, 1.0, 2.0, 3.0}
        assert "label_cls_indices" not in out[0]
