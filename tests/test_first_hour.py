"""The first hour of a new user, through the CLI as a user types it: a run too short to validate
still leaves a model; a model trained with other settings runs evaluation and inference with only --ckpt_dir;
a misspelt override, a missing datalist and a run that cannot fit in memory stop with the cause on the last
line; plus the pieces underneath (settings record, memory estimate, error report, case limits, one-file input).

Small synthetic volumes in tmp_path; subprocesses use one thread (faster on the shared 2-core machine).
"""

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from helpers import (BUNDLE, TINY, TINY_AFFINE, TRAIN_CONFIGS, chain_error, cli, last_line, make_dataset, parser_for,
                     save)

EVALUATE = "['configs/train.yaml','configs/evaluate.yaml']"
# Test-time mirroring (8 passes per window, tests in test_tta.py) is off where these tests check something else:
# with it, one lite_medsam evaluation of two small cases took 600 s on the shared 2-core machine.
NO_MIRRORING = ("--tta_mirror", "false")


# ------------------------------------------------------------------------------ training leaves a model
def test_run_shorter_than_val_interval_leaves_the_last_weights_and_their_settings(tmp_path):
    data = make_dataset(tmp_path / "data")
    out, models = tmp_path / "out", tmp_path / "models"
    code, stdout, stderr = cli("run", "training", "--config_file", TINY, "--dataset_dir", data, "--output_dir", out,
                               "--ckpt_dir", models, "--max_epochs", 1, "--val_interval", 10,
                               "--iterations_per_epoch", 1)
    assert code == 0, (stdout + stderr)[-4000:]
    assert "no validation ran" in stdout and "saved the last weights (epoch 1, iteration 1)" in stdout
    sd = torch.load(models / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in sd.values())  # still a plain state dict
    record = json.loads((models / "model.json").read_text())
    assert record["selected"].startswith("last weights at epoch 1, iteration 1")
    settings = record["settings"]
    assert settings["backbone"] == "vit_t" and settings["num_queries"] == 4 and settings["patch_size"] == [64, 64, 4]
    assert settings["class_names"] == ["background", "RV", "Myo", "LV"] and settings["pixdim"] == [4.0, 4.0, 1.0]
    assert settings["intensity_transform"]["_target_"] == "NormalizeIntensityd"
    assert settings["intensity_transform"]["channel_wise"] is True
    last = torch.load(out / "checkpoint_last.pt", weights_only=True)["network"]
    assert all(torch.equal(sd[k], last[k]) for k in sd)  # the last weights, not an earlier state


# ------------------------------------------------------------------------ --ckpt_dir alone is enough
@pytest.fixture(scope="module")
def lite_model(tmp_path_factory):
    """A lite_medsam N=4 model (random adapters, 256x256x2 patch, own class names) as training writes it."""
    from scripts.checkpointing import BestModelSaver
    from scripts.network import MaskSAM
    from scripts.settings import describe_transform
    from monai.transforms import NormalizeIntensityd

    root = tmp_path_factory.mktemp("lite")
    torch.manual_seed(0)
    net = MaskSAM(backbone="lite_medsam", num_classes=4, num_queries=4, num_slices=2, image_size=256, sam_upsample=1)
    settings = dict(backbone="lite_medsam", num_classes=4, num_queries=4, patch_size=[256, 256, 2], in_channels=1,
                    sam_upsample=1, class_names=["background", "cavity", "wall", "vessel"],
                    intensity_transform=describe_transform(NormalizeIntensityd(keys="image", channel_wise=True)),
                    orientation=None, pixdim=None)
    saver = BestModelSaver(str(root / "models"), net, settings=settings)
    saver.save_weights(selected="test model", epoch=0)  # the writer training uses: model.pt + model.json
    data = make_dataset(root / "data", num_train=1, num_val=2, shape=(40, 36, 2))  # one window per case
    return {"models": root / "models", "data": data}


def test_inference_with_only_ckpt_dir_uses_the_recorded_settings(lite_model, tmp_path):
    image = lite_model["data"] / "imagesTr" / "c1.nii.gz"  # one file as --dataset_dir
    out = tmp_path / "pred"
    code, stdout, stderr = cli("run", "inference", "--config_file", "configs/inference.yaml",
                               "--ckpt_dir", lite_model["models"], "--dataset_dir", image, "--output_dir", out,
                               *NO_MIRRORING)
    assert code == 0, (stdout + stderr)[-4000:]
    assert "backbone lite_medsam" in stdout and "num_queries 4" in stdout
    assert "built without a SAM checkpoint" not in stdout + stderr
    pred = nib.load(out / "c1_seg.nii.gz")
    assert pred.shape == (40, 36, 2) and np.allclose(pred.affine, TINY_AFFINE)
    assert set(np.unique(np.asarray(pred.dataobj)).tolist()) <= {0, 1, 2, 3}


def test_evaluation_with_only_ckpt_dir_names_the_recorded_classes(lite_model, tmp_path):
    out = tmp_path / "eval"
    code, stdout, stderr = cli("run", "evaluating", "--config_file", EVALUATE, "--ckpt_dir", lite_model["models"],
                               "--dataset_dir", lite_model["data"], "--output_dir", out, "--num_val_cases", "all",
                               *NO_MIRRORING)
    assert code == 0, (stdout + stderr)[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["backbone"] == "lite_medsam" and metrics["patch_size"] == [256, 256, 2]
    assert metrics["num_cases"] == 2 and set(metrics["per_class"]) == {"cavity", "wall", "vessel"}
    header = next(line for line in stdout.splitlines() if line.startswith("case "))
    assert header.split() == ["case", "cavity", "wall", "vessel", "mean"]  # full names, not truncated
    assert "is all 0" not in stdout + stderr  # no HD95 warnings for absent classes
    pngs = sorted((out / "overlays").glob("*.png"))
    assert len(pngs) == 2
    from PIL import Image

    with Image.open(pngs[0]) as im:  # title row + panel names above the 3 panels, legend below
        assert im.width == 3 * 2 * 40 + 8 and im.height > 2 * 36 + 40


def test_a_conflicting_override_names_both_values_before_the_network(lite_model, tmp_path):
    code, stdout, stderr = cli("run", "inference", "--config_file", "configs/inference.yaml",
                               "--ckpt_dir", lite_model["models"], "--dataset_dir", lite_model["data"] / "imagesTr",
                               "--output_dir", tmp_path / "pred", "--num_queries", 8)
    assert code != 0
    line = last_line(stderr)
    assert line.startswith("error: ") and "num_queries: 8 on the command line vs 4 recorded" in line
    assert "model.json" in line and "loaded network weights" not in stdout


# ------------------------------------------------------------------------- the cause on the last line
def test_misspelt_override_exits_non_zero_naming_the_known_key(tmp_path):
    code, stdout, stderr = cli("run", "training", "--config_file", TINY, "--max_epoch", 2,
                               "--output_dir", tmp_path / "out", "--ckpt_dir", tmp_path / "models")
    assert code != 0
    assert last_line(stderr) == "error: unknown override --max_epoch: no config id 'max_epoch'; did you mean --max_epochs?"
    assert not (tmp_path / "out").exists()  # stopped before anything ran


def test_missing_datalist_is_named_on_the_last_line_without_traceback(tmp_path):
    missing = tmp_path / "nowhere" / "dataset.json"
    code, stdout, stderr = cli("run", "training", "--config_file", TINY, "--datalist", missing,
                               "--output_dir", tmp_path / "out", "--ckpt_dir", tmp_path / "models")
    assert code != 0
    assert last_line(stderr) == f"error: datalist '{missing}' does not exist (set `datalist` or `dataset_dir`)"
    assert "Traceback" not in stderr and "Failed to evaluate" not in stderr


# ------------------------------------------------------------------------------- memory-aware start
def test_estimate_over_the_memory_limit_stops_before_the_network_is_built(tmp_path):
    data = make_dataset(tmp_path / "data")
    code, stdout, stderr = cli("run", "training", "--config_file", TINY, "--dataset_dir", data,
                               "--output_dir", tmp_path / "out", "--ckpt_dir", tmp_path / "models",
                               "--memory_limit_gb", 0.25)
    assert code != 0
    line = last_line(stderr)
    assert line.startswith("error: not enough memory for this training step of vit_t (patch [64, 64, 4], batch 1")
    assert "estimated peak" in line and "available 0.2 GB (memory_limit_gb)" in line and "--memory_limit_gb N" in line
    assert "Engine run" not in stdout  # nothing was trained

    parser = parser_for(TRAIN_CONFIGS, dataset_dir=str(data), output_dir=str(tmp_path / "o2"),
                        ckpt_dir=str(tmp_path / "m2"), memory_limit_gb=0.25)
    from scripts.memory import InsufficientMemoryError

    with pytest.raises(Exception) as err:
        parser.get_parsed_content("training")
    assert chain_error(err, InsufficientMemoryError).startswith(
        "not enough memory for this training step of vit_t (patch [64, 64, 4], batch 1")
    assert "network" not in parser.ref_resolver.resolved_content and "network_def" not in parser.ref_resolver.resolved_content


def test_memory_estimate_follows_the_table_and_suggests_settings_that_fit():
    from scripts.memory import InsufficientMemoryError, check_memory, estimate_peak_gb, load_table

    table = load_table()
    fit = next(f for f in table["fits"] if f["backbone"] == "vit_t" and f["mode"] == "train")
    one = estimate_peak_gb("vit_t", 64, 1, depth=4, num_queries=4, batch=1, mode="train")
    two = estimate_peak_gb("vit_t", 64, 1, depth=4, num_queries=4, batch=2, mode="train")
    loop = table.get("train_loop_gb", 0.0)  # whole training runs above the bare step
    assert one.total_gb == pytest.approx(fit["base_gb"] + 4 * fit["per_slice_gb"] + loop, rel=1e-6)
    assert two.total_gb - one.total_gb == pytest.approx(4 * fit["per_slice_gb"], rel=1e-6)
    assert not one.extrapolated and "measured vit_t train fit" in one.source
    bigger = estimate_peak_gb("vit_t", 128, 1, depth=4, num_queries=4, batch=1, mode="train")
    assert bigger.extrapolated and bigger.total_gb > one.total_gb

    limit = (one.total_gb + estimate_peak_gb("vit_t", 64, 1, depth=4, num_queries=4, batch=8).total_gb) / 2
    with pytest.raises(InsufficientMemoryError, match=r"batch 8.*settings that would fit: --batch_size 1 \(about"):
        check_memory("vit_t", [64, 64, 4], 1, 4, 8, memory_limit_gb=limit)
    assert check_memory("vit_t", [64, 64, 4], 1, 4, 1, memory_limit_gb=limit).total_gb == pytest.approx(one.total_gb)
    assert check_memory("vit_t", [64, 64, 4], 1, 4, 8, memory_limit_gb=0.1, enabled=False) is None


def test_memory_estimate_follows_the_attention_kernel():
    """The ACDC vit_b preset: the fused attention's measured fit, SAM's explicit attention its own (larger)."""
    from scripts.memory import check_memory, estimate_peak_gb

    preset = dict(backbone="vit_b", image_size=256, sam_upsample=4, depth=4, num_queries=8, batch=1,
                  checkpointing=True)
    fused, explicit = estimate_peak_gb(**preset, fused=True), estimate_peak_gb(**preset, fused=False)
    assert not fused.extrapolated and not explicit.extrapolated
    assert fused.total_gb < 10 < 13 < explicit.total_gb  # measured: 8.1 vs 13.6 GiB per step (+ training loop)
    assert check_memory("vit_b", [256, 256, 4], 4, 8, 1, use_checkpoint="true", memory_limit_gb=11,
                        fused_attention="true").total_gb == pytest.approx(fused.total_gb)


def test_auto_checkpointing_turns_on_only_when_the_step_would_not_fit(tmp_path):
    from scripts.memory import estimate_peak_gb, resolve_use_checkpoint

    preset = dict(backbone="vit_b", patch_size=[256, 256, 4], sam_upsample=4, num_queries=8, batch_size=2)
    without = estimate_peak_gb("vit_b", 256, 4, depth=4, num_queries=8, batch=2).total_gb
    assert resolve_use_checkpoint("auto", **preset, memory_limit_gb=without + 1) is False
    assert resolve_use_checkpoint("auto", **preset, memory_limit_gb=without - 1) is True
    assert resolve_use_checkpoint("false", **preset, memory_limit_gb=1) is False  # an explicit choice stays
    assert resolve_use_checkpoint(True, **preset, memory_limit_gb=1000) is True
    # train.yaml's default is auto, and the network and the memory check get the resolved value
    data = make_dataset(tmp_path / "data")
    from scripts.data import load_datalist
    from scripts.memory import GB, data_cache_gb

    train = load_datalist(str(data / "dataset.json"), "training")  # 2 cases of 40 x 36 x 3 voxels
    assert data_cache_gb(train, 1.0) == pytest.approx(2 * 40 * 36 * 3 * (4 + 4 + 8) / GB)
    assert data_cache_gb(train, 0.5, class_indices=False) == pytest.approx(40 * 36 * 3 * (4 + 4) / GB)
    assert data_cache_gb(train, 1.0, pixdim=[8.0, 8.0, 1.0]) == pytest.approx(data_cache_gb(train, 1.0) / 4)
    tight = parser_for(TRAIN_CONFIGS, dataset_dir=str(data), memory_limit_gb=0.01)
    assert tight["use_checkpoint"] == "auto" and tight.get_parsed_content("activation_checkpointing") is True
    assert tight.get_parsed_content("network_def").image_encoder.use_checkpoint is True
    roomy = parser_for(TRAIN_CONFIGS, dataset_dir=str(data), memory_limit_gb=1000)
    assert roomy.get_parsed_content("network_def").image_encoder.use_checkpoint is False


def test_available_memory_reads_meminfo_and_the_environment_switch(monkeypatch):
    from scripts.memory import LIMIT_ENV, available_gb

    monkeypatch.setenv(LIMIT_ENV, "3.5")
    assert available_gb() == (3.5, LIMIT_ENV)
    monkeypatch.delenv(LIMIT_ENV)
    free, source = available_gb()
    meminfo = {line.split(":")[0]: int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()}
    assert 0 < free <= meminfo["MemTotal"] / 2**20 and "MemAvailable" in source


# -------------------------------------------------------------------------------------- the pieces
def test_settings_record_rebuilds_the_intensity_transform_and_names_conflicts(tmp_path):
    from monai.transforms import ScaleIntensityRanged

    from scripts.settings import (check_model_settings, describe_transform, read_model_settings,
                                  recorded_transform, write_model_settings)

    window = ScaleIntensityRanged(keys="image", a_min=-175, a_max=250, b_min=0.0, b_max=1.0, clip=True)
    record = describe_transform(window)
    assert record["_target_"] == "ScaleIntensityRanged" and record["a_min"] == -175 and record["clip"] is True
    ckpt = tmp_path / "models" / "model.pt"
    ckpt.parent.mkdir()
    settings = {"backbone": "vit_h", "num_classes": 9, "patch_size": (256, 256, 26), "intensity_transform": window}
    write_model_settings(str(ckpt), settings, selected="test")
    read = read_model_settings(str(ckpt))
    assert read["patch_size"] == [256, 256, 26] and read["intensity_transform"] == record
    rebuilt = recorded_transform(read)
    x = {"image": torch.tensor([[[[-500.0, 0.0, 300.0]]]])}
    assert torch.allclose(torch.as_tensor(rebuilt(dict(x))["image"]), torch.as_tensor(window(dict(x))["image"]))
    assert check_model_settings(str(ckpt), {"backbone": "vit_h", "patch_size": [256, 256, 26]}) == read
    with pytest.raises(ValueError, match=r'num_classes: 4 in the config vs 9 recorded; intensity_transform: .*'
                                         r'"NormalizeIntensityd".* vs .*"ScaleIntensityRanged"'):
        from monai.transforms import NormalizeIntensityd

        check_model_settings(str(ckpt), {"num_classes": 4, "intensity_transform": NormalizeIntensityd(keys="image")})
    (tmp_path / "models" / "model.json").write_text("{not json")
    with pytest.raises(ValueError, match="model settings file .*model.json' cannot be read"):
        read_model_settings(str(ckpt))


def test_error_report_unwraps_monai_wrappers_to_one_last_line():
    from scripts.cli import format_error

    def chain(*errors):
        for outer, inner in zip(errors, errors[1:]):
            outer.__cause__ = inner
        return errors[0]

    err = chain(RuntimeError("Failed to evaluate ConfigExpression: '$x'"), RuntimeError("applying transform <X>"),
                ValueError("/data/a.nii.gz: has 2 channel(s), the network expects in_channels=1"))
    assert format_error(err) == ["error: /data/a.nii.gz: has 2 channel(s), the network expects in_channels=1"]
    err = chain(RuntimeError("Failed to instantiate component 'scripts.network.MaskSAM' with keywords: x"),
                TypeError("__init__() got an unexpected keyword argument 'x'"))
    assert format_error(err) == ["error: TypeError: __init__() got an unexpected keyword argument 'x' "
                                 "(building scripts.network.MaskSAM)"]
    lines = format_error(RuntimeError("2 of 3 image(s) failed:\n  a.nii.gz: bad\n  b.nii.gz: worse"))
    assert lines == ["2 of 3 image(s) failed:", "  a.nii.gz: bad", "  b.nii.gz: worse",
                     "error: 2 of 3 image(s) failed (details above)"]
    assert format_error(KeyError("datalist 'x.json' has no key 'test'")) == ["error: datalist 'x.json' has no key 'test'"]


def test_unknown_override_keys_and_their_closest_ids():
    from scripts.cli import check_command_line, unknown_overrides

    config = {"max_epochs": 1, "network_def": {"backbone": "vit_t"}, "train": {"dataloader": {"num_workers": 0}}}
    assert unknown_overrides(["max_epochs", "network_def#backbone", "network_def#new_arg", "_meta_#version"], config) == []
    assert unknown_overrides(["max_epoch"], config) == ["unknown override --max_epoch: no config id 'max_epoch'; "
                                                        "did you mean --max_epochs?"]
    assert unknown_overrides(["train#dataloadr#num_workers"], config)[0].endswith("did you mean --train#dataloader#num_workers?")
    argv = [os.path.join("x", "monai", "bundle", "__main__.py"), "run", "training", "--config_file",
            str(BUNDLE / "configs" / "train.yaml"), "--learning_rate=0.1", "--num_val_case", "all", "--meta_file", "m"]
    assert check_command_line(argv) == ["unknown override --num_val_case: no config id 'num_val_case'; "
                                        "did you mean --num_val_cases?"]


def test_case_limits_and_one_file_for_inference(tmp_path):
    from scripts.data import inference_list, parse_limit

    assert [parse_limit(v) for v in (None, "all", "None", 0, -1, "0", 3, "5")] == [None] * 6 + [3, 5]
    with pytest.raises(ValueError, match="num_val_cases must be a number of cases or 'all', got 'some'"):
        parse_limit("some", "num_val_cases")
    image = save(tmp_path / "one.nii.gz", np.zeros((4, 4, 2), np.float32))
    assert inference_list(image) == [{"image": image}]
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="is a file but not a .nii/.nii.gz image"):
        inference_list(str(tmp_path / "notes.txt"))
    with pytest.raises(FileNotFoundError, match="image file or folder .*missing.nii.gz' does not exist"):
        inference_list(str(tmp_path / "missing.nii.gz"))


def test_evaluate_and_inference_configs_read_every_recorded_setting():
    """Every id training records (model_settings + preprocessing_settings of train.yaml) is read back from
    model.json by evaluate.yaml and inference.yaml, with train.yaml's value as the default: a switch added to
    model_settings must be added there too."""
    import yaml

    from monai.bundle import ConfigParser

    train = ConfigParser.load_config_file(str(BUNDLE / "configs" / "train.yaml"))
    recorded = list(train["model_settings"]) + list(train["preprocessing_settings"])
    for name in ("evaluate.yaml", "inference.yaml"):
        cfg = yaml.safe_load((BUNDLE / "configs" / name).read_text())
        parser = ConfigParser(dict(cfg) if name == "inference.yaml" else {**train, **cfg})
        parser.update({"bundle_root": str(BUNDLE), "ckpt_dir": "/nonexistent"})
        for key in recorded:
            assert "@trained" in str(cfg.get(key)), f"{name} does not read {key!r} from model.json"
            if key != "intensity_transform":
                default = parser.get_parsed_content(key)
                expected = train[key]
                assert default == expected, f"{name}: default of {key!r} {default!r} differs from train.yaml {expected!r}"


# ------------------------------------------------------------------------- yes/no settings from the CLI
def test_false_from_the_command_line_means_false_everywhere(tmp_path):
    """python-fire hands ``--overwrite false`` over as the string "false" (``bool("false")`` is True): a fresh
    run must still refuse to replace a previous run's checkpoint, and the network switches must be off."""
    from scripts.cli import describe_error

    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint_last.pt").write_bytes(b"a previous run")
    cli_strings = dict(overwrite="false", resume="false", amp="false", depth_pos_embed="false",
                       fused_attention="false", use_checkpoint="true", allow_random_sam="false", deterministic="no")
    parser = parser_for(TRAIN_CONFIGS, output_dir=str(out),
                        ckpt_dir=str(tmp_path / "models"), **cli_strings)
    with pytest.raises(Exception) as refused:
        parser.get_parsed_content("last_checkpoint")
    assert "FileExistsError" in describe_error(refused.value) and "checkpoint_last.pt" in describe_error(refused.value)
    assert (out / "checkpoint_last.pt").read_bytes() == b"a previous run"
    assert parser.get_parsed_content("use_amp") is False
    assert parser.get_parsed_content("model_settings")["depth_pos_embed"] is False
    net = parser.get_parsed_content("network_def")
    assert net.image_encoder.depth_embed is None and net.image_encoder.use_checkpoint is True
    assert all(not block.fused_attention for block in net.image_encoder.blocks)
    with pytest.raises(Exception) as unclear:
        parser_for(TRAIN_CONFIGS, output_dir=str(out), overwrite="nope",
                   ckpt_dir=str(tmp_path / "models")).get_parsed_content("last_checkpoint")
    assert describe_error(unclear.value) == "ValueError: overwrite must be true or false, got 'nope'"
