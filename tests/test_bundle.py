"""End-to-end bundle tests through the MONAI bundle CLI, with the tiny preset (vit_t, 64x64x4) on ACDC.

One short training run is shared by the module (fixture ``trained``); resume, evaluation and inference build on
its checkpoints. Every command runs in a subprocess exactly as a user would type it.
"""

import json
import os
import re
import shlex
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from helpers import BUNDLE, REPO_ROOT, TINY, TINY_NET, cli


def bundle_cli(*args, cwd=BUNDLE, timeout=600, expect_ok=True, launcher=None, stdout_only=False):
    """Run a bundle command with two threads and Python warnings hidden; (return code, stdout or the whole log)."""
    code, stdout, stderr = cli(*args, cwd=cwd, timeout=timeout, launcher=launcher, quiet=True,
                               threads=os.environ.get("OMP_NUM_THREADS", "2"))
    log = stdout + stderr
    if expect_ok:
        assert code == 0, f"command failed ({code}): {args}\n{log[-6000:]}"
    return code, stdout if stdout_only else log


def loss_term_names():
    from scripts.loss import MaskSAMLoss
    from scripts.network import MaskSAM

    torch.manual_seed(0)
    net = MaskSAM(**TINY_NET).train()
    criterion = MaskSAMLoss(num_classes=4).criterion
    label = torch.zeros(1, 1, 64, 64, 4)
    label[:, :, 10:30, 10:30] = 1
    label[:, :, 35:50, 35:50] = 3
    return sorted(criterion(net(torch.randn(1, 1, 64, 64, 4)), label)) + ["loss_total"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, acdc_dir):
    root = tmp_path_factory.mktemp("train")
    out, models = root / "out", root / "models"
    _, log = bundle_cli("run", "training", "--config_file", TINY, "--dataset_dir", acdc_dir,
                        "--output_dir", out, "--ckpt_dir", models)
    return {"root": root, "out": out, "models": models, "log": log, "acdc": acdc_dir}


def test_training_writes_checkpoints_and_logs_every_loss_term(trained):
    from scripts.network import MaskSAM

    best, last = trained["models"] / "model.pt", trained["out"] / "checkpoint_last.pt"
    assert best.is_file() and last.is_file()
    sd = torch.load(best, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in sd.values()) and not any(k.startswith("module.") for k in sd)
    MaskSAM(**TINY_NET).load_state_dict(sd, strict=True)  # plain state dict of the tiny network
    ck = torch.load(last, weights_only=True)
    assert {"network", "optimizer", "lr_scheduler", "trainer", "settings"} <= set(ck)
    assert ck["trainer"]["iteration"] == 2 and ck["trainer"]["epoch"] == 1
    assert ck["lr_scheduler"]["last_epoch"] == 2  # poly LR stepped per iteration
    assert ck["settings"]["backbone"] == "vit_t" and ck["settings"]["num_classes"] == 4
    record = json.loads((trained["models"] / "model.json").read_text())  # the settings beside model.pt
    assert record["selected"].startswith("best val_mean_dice ") and record["epoch"] == 1
    assert record["settings"]["backbone"] == "vit_t" and record["settings"]["patch_size"] == [64, 64, 4]
    assert "holds the best validated weights" in trained["log"]

    log = trained["log"]
    lines = [line for line in log.splitlines() if "masksam.train" in line and "(global " in line]
    assert len(lines) == 2, log[-3000:]
    for name in loss_term_names():
        assert all(f" {name} " in line for line in lines), (name, lines[0])
    assert all(" grad_norm " in line and " lr " in line and " s/it" in line for line in lines)
    assert "Epoch 1/1 done in" in log
    assert "val_dice_RV" in log and "val_dice_Myo" in log and "val_dice_LV" in log

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(trained["out"])).Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm"} <= scalars
    assert {f"train/{n}" for n in loss_term_names()} <= scalars


def test_fresh_run_refuses_to_replace_checkpoints(trained):
    code, log = bundle_cli("run", "training", "--config_file", TINY, "--dataset_dir", trained["acdc"],
                           "--output_dir", trained["out"], "--ckpt_dir", trained["models"], expect_ok=False)
    assert code != 0 and "a previous run's checkpoint(s) exist" in log and "resume=true" in log


def test_resume_continues_from_last_checkpoint(trained):
    _, log = bundle_cli("run", "training", "--config_file", TINY, "--dataset_dir", trained["acdc"],
                        "--output_dir", trained["out"], "--ckpt_dir", trained["models"],
                        "--max_epochs", 2, "--resume", "true")
    assert "resumed from" in log and "epoch 1, iteration 2" in log
    assert "(global 1)" not in log and "Epoch 2/2 iter 1/2 (global 3)" in log
    ck = torch.load(trained["out"] / "checkpoint_last.pt", weights_only=True)
    assert ck["trainer"]["iteration"] == 4 and ck["trainer"]["epoch"] == 2
    # the poly schedule follows the new total (2 epochs x 2 iterations): lr at step 3 = lr0 * (1 - 3/4)^0.9
    assert ck["lr_scheduler"]["last_epoch"] == 4
    line = next(l for l in log.splitlines() if "(global 3)" in l)
    lr = float(line.split(" lr ")[1].split()[0])
    assert lr == pytest.approx(1e-3 * (1 - 3 / 4) ** 0.9, rel=1e-3)


def test_evaluation_writes_metrics_json_csv_and_overlays(trained):
    out = trained["root"] / "evaluation"
    _, log = bundle_cli("run", "evaluating", "--config_file",
                        "['configs/train.yaml','configs/tiny.yaml','configs/evaluate.yaml']",
                        "--dataset_dir", trained["acdc"], "--output_dir", out, "--ckpt_dir", trained["models"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_cases"] == 2 and len(metrics["per_case"]) == 2
    assert set(metrics["per_class"]) == {"RV", "Myo", "LV"}
    for name, values in metrics["per_class"].items():
        assert 0.0 <= values["dice"] <= 1.0
        assert "hd95" in values
    assert 0.0 <= metrics["mean"]["dice"] <= 1.0
    assert {"dice", "hd95", "case", "mean_dice"} <= set(metrics["per_case"][0])
    rows = (out / "metrics.csv").read_text().strip().splitlines()
    assert rows[0].startswith("case,image,dice_RV,dice_Myo,dice_LV") and len(rows) == 3
    overlays = sorted(p.name for p in (out / "overlays").glob("*.png"))  # 2 worst of 2 cases, no "best" left
    cases = sorted(c["case"] for c in metrics["per_case"])
    assert [re.sub(r"^worst_(.*)_z\d+\.png$", r"\1", name) for name in overlays] == cases, overlays
    assert "MEAN Dice" in log


def test_inference_from_repo_root_writes_niftis_with_input_geometry(trained, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    names = ["patient002_frame01", "patient019_frame02"]
    for n in names:
        (images / f"{n}.nii.gz").symlink_to(trained["acdc"] / "imagesTr" / f"{n}.nii.gz")
    out = tmp_path / "pred"
    args = ["run", "inference", "--config_file",
            "['masksam_bundle/configs/inference.yaml','masksam_bundle/configs/tiny.yaml']",
            "--bundle_root", "masksam_bundle", "--dataset_dir", images, "--output_dir", out,
            "--ckpt_dir", trained["models"]]
    bundle_cli(*args, cwd=REPO_ROOT)
    for n in names:
        src, pred = nib.load(images / f"{n}.nii.gz"), nib.load(out / f"{n}_seg.nii.gz")
        assert pred.shape == src.shape
        np.testing.assert_allclose(pred.affine, src.affine)
        values = set(np.unique(np.asarray(pred.dataobj)).tolist())
        assert values <= {0, 1, 2, 3}
        assert pred.get_data_dtype() == np.uint8
    code, log = bundle_cli(*args, cwd=REPO_ROOT, expect_ok=False)  # never overwrite silently
    assert code != 0 and "already exist" in log


def test_multi_gpu_config_runs_two_gloo_processes(tmp_path, acdc_dir):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517", "-m"]
    _, log = bundle_cli("run", "training", "--config_file",
                        "['configs/train.yaml','configs/tiny.yaml','configs/multi_gpu_train.yaml']",
                        "--dataset_dir", acdc_dir, "--output_dir", tmp_path / "out", "--ckpt_dir", tmp_path / "models",
                        launcher=launcher)
    assert log.count("SupervisedTrainer - INFO - Engine run resuming from iteration 0") == 2  # two ranks trained
    assert sum("(global 1)" in line for line in log.splitlines()) == 1  # only rank 0 logs progress
    sd = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in sd)  # DDP wrapper removed
    ck = torch.load(tmp_path / "out" / "checkpoint_last.pt", weights_only=True)
    assert ck["trainer"]["iteration"] == 2


def test_verify_net_in_out(tmp_path):
    _, log = bundle_cli("verify_net_in_out", "--net_id", "network_def", "--meta_file", "configs/metadata.json",
                        "--config_file", "['configs/inference.yaml','configs/tiny.yaml']",
                        "--_meta_#network_data_format#inputs#image#spatial_shape", "[64,64,4]")
    assert "data shape of network is verified with no error" in log


@pytest.mark.slow
def test_demo_main_job_runs_end_to_end(tmp_path):
    """The README's main job (synthetic data, LiteMedSAM backbone), shortened to one iteration and 3 volumes;
    its last line is a command that evaluates the model it trained, and that command works."""
    out = tmp_path / "demo"
    _, log = bundle_cli("run", "demo", "--config_file", "['configs/train.yaml','configs/demo.yaml']",
                        "--output_dir", out, "--iterations_per_epoch", 1, "--demo_num_cases", 3,
                        "--demo_num_val", 1, stdout_only=True)
    assert (out / "models" / "model.pt").is_file() and (out / "checkpoint_last.pt").is_file()
    preds = sorted((out / "predictions").glob("*_seg.nii.gz"))
    assert [p.name for p in preds] == ["synth_002_seg.nii.gz"]
    src = nib.load(out / "demo_data" / "imagesTr" / "synth_002.nii.gz")
    pred = nib.load(preds[0])
    assert pred.shape == src.shape and np.allclose(pred.affine, src.affine)
    assert set(np.unique(np.asarray(pred.dataobj)).tolist()) <= {0, 1, 2, 3}
    summary = json.loads((out / "demo_dice.json").read_text())
    assert set(summary["mean_per_class"]) == {"structure_1", "structure_2", "structure_3"}
    metrics = json.loads((out / "evaluation" / "metrics.json").read_text())
    assert summary["mean_dice"] == pytest.approx(metrics["mean"]["dice"], nan_ok=True)  # one Dice definition
    assert summary["validation_during_training"]["val_mean_dice"] is not None
    assert [p.name for p in (out / "evaluation" / "overlays").glob("*.png")] != []
    assert (out / "models" / "model.json").is_file()

    lines = [line for line in log.splitlines() if line.strip()]  # stdout: the demo's last printed lines
    infer_cmd, eval_cmd = lines[-2].split(), lines[-1].split()
    assert infer_cmd[1:5] == ["-m", "monai.bundle", "run", "inference"] and "--ckpt_dir" in infer_cmd
    assert eval_cmd[1:5] == ["-m", "monai.bundle", "run", "evaluating"] and "--ckpt_dir" in eval_cmd
    assert "Use the model it just trained" in lines[-3]
    # the printed evaluation command, as printed (one volume, the demo's own model and settings)
    _, eval_log = bundle_cli(*shlex.split(lines[-1])[3:])
    evaluated = json.loads((out / "my_evaluation" / "metrics.json").read_text())
    assert evaluated["backbone"] == "lite_medsam" and evaluated["num_cases"] == 1
    assert evaluated["mean"]["dice"] == pytest.approx(metrics["mean"]["dice"], abs=0.01, nan_ok=True)
