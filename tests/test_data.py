"""Data side of the bundle: datalists, folds, per-case checks, atomic files, checkpoint loading, folder inference."""

import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Compose, NormalizeIntensityd

from scripts import data as D
from scripts.checkpointing import load_model_weights, prepare_training_output
from scripts.inference import Predictor, write_label_nifti
from scripts.files import safe_torch_load
from scripts.synthetic import make_demo_dataset
from scripts.transforms import deterministic_transforms

from helpers import raises_chain, save


def test_acdc_datalist_loads_and_is_checked(acdc_dir):
    train = D.load_datalist(acdc_dir / "dataset.json", "training")
    val = D.load_datalist(acdc_dir / "dataset.json", "validation", limit=2)
    assert len(train) == 140 and len(val) == 2
    assert all(os.path.isabs(e["image"]) and os.path.isfile(e["label"]) for e in train)
    with pytest.raises(KeyError, match=r"no key 'test'.*\['training', 'validation'\]"):
        D.load_datalist(acdc_dir / "dataset.json", "test")


def test_missing_files_are_listed_in_one_error(tmp_path):
    img = save(tmp_path / "imagesTr" / "a.nii.gz", np.zeros((4, 4, 4), np.float32))
    lst = {"training": [{"image": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz"},
                        {"image": "imagesTr/b.nii.gz", "label": "labelsTr/b.nii.gz"}]}
    (tmp_path / "d.json").write_text(json.dumps(lst))
    with pytest.raises(FileNotFoundError) as err:
        D.load_datalist(tmp_path / "d.json", "training")
    msg = str(err.value)
    assert "3 file(s)" in msg and "labelsTr/a.nii.gz" in msg and "imagesTr/b.nii.gz" in msg and "labelsTr/b.nii.gz" in msg
    assert img not in msg
    with pytest.raises(FileNotFoundError, match="nope.json"):
        D.load_datalist(tmp_path / "nope.json")


def test_make_datalists_writes_grouped_folds_and_never_overwrites(tmp_path):
    for p in range(6):
        for f in (1, 2):
            save(tmp_path / "imagesTr" / f"patient{p:03d}_frame0{f}_0000.nii.gz", np.zeros((4, 4, 2), np.float32))
            save(tmp_path / "labelsTr" / f"patient{p:03d}_frame0{f}.nii.gz", np.zeros((4, 4, 2), np.uint8))
    paths = D.make_datalists(str(tmp_path), num_folds=3, group_pattern=r"(patient\d+)")
    assert [os.path.basename(p) for p in paths] == ["dataset.json"] + [f"dataset_fold{k}.json" for k in range(3)]
    seen = []
    for k in range(3):
        fold = json.loads((tmp_path / f"dataset_fold{k}.json").read_text())
        val = {e["image"] for e in fold["validation"]}
        train = {e["image"] for e in fold["training"]}
        assert len(val) == 4 and len(train) == 8 and not val & train
        patients = {v.split("/")[1][:10] for v in val}
        assert len(patients) == 2  # both frames of a patient in the same fold
        seen += sorted(val)
        resolved = D.load_datalist(tmp_path / f"dataset_fold{k}.json", "validation")  # files resolve
        assert sorted(e["image"] for e in resolved) == sorted(str(tmp_path / v) for v in val)
    assert len(set(seen)) == 12
    with pytest.raises(FileExistsError, match="overwrite=True"):
        D.make_datalists(str(tmp_path), num_folds=3)


def _case(tmp_path, image, label, img_affine=None, lab_affine=None):
    return {"image": save(tmp_path / "img.nii.gz", image, img_affine), "label": save(tmp_path / "lab.nii.gz", label, lab_affine)}


def _load(case, **kw):
    return Compose(deterministic_transforms(num_classes=4, patch_size=[8, 8, 4], **kw))(case)


def test_case_checks_name_the_files(tmp_path):
    img = np.random.rand(10, 9, 3).astype(np.float32)
    lab = np.zeros((10, 9, 3), np.uint8)
    out = _load(_case(tmp_path, img, lab))
    assert tuple(out["image"].shape) == (1, 10, 9, 4)  # thinner than D and padded
    with raises_chain(ValueError, r"shapes differ.*img.nii.gz.*\(10, 9, 3\).*lab.nii.gz"):
        _load(_case(tmp_path, img, np.zeros((10, 9, 2), np.uint8)))
    shifted = np.eye(4)
    shifted[0, 3] = 5.0
    with raises_chain(ValueError, r"affines differ.*img.nii.gz"):
        _load(_case(tmp_path, img, lab, lab_affine=shifted))
    bad = lab.copy()
    bad[0, 0, 0] = 7
    with raises_chain(ValueError, r"lab.nii.gz: label values \[7\] are outside 0..3"):
        _load(_case(tmp_path, img, bad))
    fractional = lab.astype(np.float32)
    fractional[0, 0, 0], fractional[1, 0, 0] = 1.5, np.nan
    with raises_chain(ValueError, r"lab.nii.gz: label values \[1.5, nan\] are outside 0..3"):
        _load(_case(tmp_path, img, fractional))
    nan = img.copy()
    nan[1, 1, 1] = np.nan
    with raises_chain(ValueError, r"img.nii.gz: 1 NaN/Inf"):
        _load(_case(tmp_path, nan, lab))
    with pytest.warns(UserWarning, match="replaced 1 NaN/Inf"):
        fixed = _load(_case(tmp_path, nan, lab), fix_nonfinite=True)
    assert torch.isfinite(fixed["image"]).all()
    with raises_chain(ValueError, r"img.nii.gz: expected a 3D volume"):
        _load(_case(tmp_path, img[..., 0], lab[..., 0]))


def test_checkpoint_loading_is_safe_and_names_mismatches(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(RuntimeError, match=r"evil.pt.*weights_only=True"):
        safe_torch_load(str(tmp_path / "evil.pt"))
    (tmp_path / "trunc.pt").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(RuntimeError, match="trunc.pt"):
        safe_torch_load(str(tmp_path / "trunc.pt"))

    net = torch.nn.Sequential(torch.nn.Linear(4, 3))
    other = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Linear(5, 2))
    torch.save(other.state_dict(), tmp_path / "other.pt")
    with pytest.raises(ValueError) as err:
        load_model_weights(net, str(tmp_path / "other.pt"), settings={"num_classes": 3})
    msg = str(err.value)
    assert "other.pt" in msg and "unexpected key(s): 1.bias, 1.weight" in msg
    assert "0.weight: checkpoint (5, 4) vs network (3, 4)" in msg
    torch.save({"module." + k: v for k, v in net.state_dict().items()}, tmp_path / "ddp.pt")
    load_model_weights(net, str(tmp_path / "ddp.pt"))  # DDP prefix accepted


def test_training_output_preflight(tmp_path):
    out, ck = tmp_path / "out", tmp_path / "models"
    assert prepare_training_output(str(out), str(ck)) == str(out / "checkpoint_last.pt")
    (ck / "model.pt").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="model.pt"):
        prepare_training_output(str(out), str(ck), resume=True)
    assert prepare_training_output(str(out), str(ck), overwrite=True) == str(out / "checkpoint_last.pt")
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")  # a folder below a file cannot be created, even by root
    with pytest.raises(PermissionError, match=r"output_dir .*a_file/sub.* cannot be written"):
        prepare_training_output(str(blocker / "sub"), str(ck), overwrite=True)


class ConstantNet(torch.nn.Module):
    """(B, K, H, W, D) probabilities: class 2 everywhere with a little margin."""

    def forward(self, x):
        p = torch.full((x.shape[0], 4, *x.shape[2:]), 0.1)
        p[:, 2] = 0.7
        return p


def test_folder_inference_skips_bad_files_and_reports_them(tmp_path):
    from monai.inferers import SlidingWindowInferer
    from monai.transforms import AsDiscreted, Invertd

    folder = tmp_path / "in"
    affine = np.diag([1.5, 1.5, 8.0, 1.0])
    save(folder / "small.nii.gz", np.random.rand(5, 7, 2).astype(np.float32), affine)  # smaller than the patch
    save(folder / "ok.nii.gz", np.random.rand(20, 17, 6).astype(np.float32), affine)
    (folder / "broken.nii.gz").write_bytes(b"\x1f\x8b\x08\x00 truncated")
    pre = Compose(deterministic_transforms(keys=["image"], patch_size=[8, 8, 4],
                                           intensity=NormalizeIntensityd(keys="image")))
    post = Compose([Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=False),
                    AsDiscreted(keys="pred", argmax=True)])
    predictor = Predictor(ConstantNet(), pre, SlidingWindowInferer([8, 8, 4], overlap=0.5, mode="gaussian"), post,
                          D.list_images(str(folder)), str(tmp_path / "out"))
    with pytest.raises(RuntimeError, match=r"1 of 3 image\(s\) failed:\n  .*broken.nii.gz"):
        predictor.run()
    for name, shape in (("small", (5, 7, 2)), ("ok", (20, 17, 6))):
        pred = nib.load(tmp_path / "out" / f"{name}_seg.nii.gz")
        assert pred.shape == shape and np.allclose(pred.affine, affine)
        assert np.all(np.asarray(pred.dataobj) == 2)
    with pytest.raises(FileExistsError, match="already exist"):
        predictor.run()
    with pytest.raises(ValueError, match=r"prediction shape \(3, 3, 3\) differs"):
        write_label_nifti(np.zeros((3, 3, 3)), str(folder / "ok.nii.gz"), str(tmp_path / "x.nii.gz"))


def test_synthetic_demo_set(tmp_path):
    path = make_demo_dataset(str(tmp_path / "demo"), num_cases=3, num_val=1, shape=(32, 32, 4), seed=1)
    content = json.loads(open(path).read())
    assert len(content["training"]) == 2 and len(content["validation"]) == 1
    entries = D.load_datalist(path, "training")
    label = np.asarray(nib.load(entries[0]["label"]).dataobj)
    assert set(np.unique(label).tolist()) == {0, 1, 2, 3}
    assert make_demo_dataset(str(tmp_path / "demo"), num_cases=3, num_val=1, shape=(32, 32, 4), seed=1) == path
    with pytest.raises(FileExistsError, match="other parameters"):
        make_demo_dataset(str(tmp_path / "demo"), num_cases=4, num_val=1, shape=(32, 32, 4), seed=1)
