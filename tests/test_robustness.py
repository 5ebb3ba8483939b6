"""Robustness checks not covered by test_data.py / test_bundle.py: SIGKILL mid-epoch then resume
through the CLI, background-only volumes, determinism, checkpoint mismatches with the real network, failures
mid-write, bad files in CLI folder inference, output folders checked before heavy work.

Everything uses the tiny preset (vit_t, 64x64x4) on small synthetic volumes written into tmp_path. Subprocesses
and in-process runs use one thread: on the shared 2-core machine that is faster than two.
"""

import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from helpers import (BUNDLE, TINY, TINY_AFFINE, TINY_NET, TRAIN_CONFIGS, chain_error, cli, cli_env, make_dataset,
                     parser_for, save)


@pytest.fixture
def one_thread():
    from monai.utils import set_determinism

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(False)
    set_determinism(seed=None)


def train_in_process(data, out, **overrides):
    """Build the tiny training workflow from the bundle configs, as the CLI does (setup first), and run it.
    Returns (parser, per-iteration records of loss, every loss term and the gradient norm)."""
    from ignite.engine import Events

    settings = dict(dataset_dir=str(data), output_dir=str(out), ckpt_dir=str(out / "models"), max_epochs=1,
                    iterations_per_epoch=1, val_interval=100, num_workers=0)
    parser = parser_for(TRAIN_CONFIGS, **{**settings, **overrides})
    parser.get_parsed_content("setup")
    trainer = parser.get_parsed_content("train#trainer")
    records = []

    def record(engine):
        terms = {k: float(v) for k, v in engine.state.output["loss_terms"].items()}
        records.append({"loss": float(engine.state.output["loss"].detach()), "grad_norm": engine.state.grad_norm, **terms})

    trainer.add_event_handler(Events.ITERATION_COMPLETED, record)
    trainer.run()
    return parser, records


# ----------------------------------------------------------------------------------- SIGKILL + resume (CLI)


def test_sigkill_mid_epoch_then_resume_continues_and_finishes(tmp_path):
    data = make_dataset(tmp_path / "data")
    out, models = tmp_path / "out", tmp_path / "models"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", TINY,
           "--dataset_dir", str(data), "--output_dir", str(out), "--ckpt_dir", str(models),
           "--iterations_per_epoch", "4", "--max_epochs", "1", "--save_interval_iters", "2", "--val_interval", "1"]
    log_path = tmp_path / "first.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, cwd=BUNDLE, stdout=log_file, stderr=subprocess.STDOUT, env=cli_env(quiet=True),
                                start_new_session=True)  # own process group: the kill reaches only this run
    marker = "checkpoint_last.pt (epoch 1, iteration 2)"
    deadline = time.monotonic() + 300
    try:
        while marker not in log_path.read_text():
            assert proc.poll() is None, f"training ended before the kill:\n{log_path.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"no mid-epoch checkpoint in time:\n{log_path.read_text()[-4000:]}"
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    first = log_path.read_text()
    assert "(global 4)" not in first and "Epoch 1/1 done" not in first  # killed mid-epoch

    ck = torch.load(out / "checkpoint_last.pt", weights_only=True)
    assert ck["trainer"]["iteration"] == 2 and ck["trainer"]["epoch_length"] == 4
    assert ck["lr_scheduler"]["last_epoch"] == 2
    momentum = sum(1 for s in ck["optimizer"]["state"].values() if "momentum_buffer" in s)
    assert momentum > 0
    assert not (models / "model.pt").exists()  # no validation before the kill
    assert [p.name for p in out.iterdir() if ".tmp" in p.name] == []  # no half-written checkpoint left

    proc2 = subprocess.run(cmd + ["--resume", "true"], cwd=BUNDLE, capture_output=True, text=True, timeout=400,
                           env=cli_env(quiet=True))
    log = proc2.stdout + proc2.stderr
    assert proc2.returncode == 0, log[-6000:]
    assert "resumed from" in log and "iteration 2, lr " in log
    assert f"optimizer state for {momentum} parameter(s), lr_scheduler step 2" in log
    progress = [line for line in log.splitlines() if "masksam.train" in line and "(global " in line]
    assert [line.split("(global ")[1].split(")")[0] for line in progress] == ["3", "4"], progress
    assert "Epoch 1/1 iter 3/4 (global 3)" in progress[0]
    lr3 = float(progress[0].split(" lr ")[1].split()[0])
    assert lr3 == pytest.approx(1e-3 * (1 - 3 / 4) ** 0.9, rel=1e-3)  # poly schedule continues, not restarts
    assert "Epoch 1/1 done in" in log
    final = torch.load(out / "checkpoint_last.pt", weights_only=True)
    assert final["trainer"]["iteration"] == 4 and final["trainer"]["epoch"] == 1
    assert final["lr_scheduler"]["last_epoch"] == 4
    assert (models / "model.pt").is_file()  # the run finished with its validation


# ------------------------------------------------------------------------- determinism, background-only


def test_same_seed_same_first_iteration_losses(tmp_path, one_thread):
    data = make_dataset(tmp_path / "data")
    _, a = train_in_process(data, tmp_path / "a", seed=7)
    _, b = train_in_process(data, tmp_path / "b", seed=7, deterministic=True)
    _, c = train_in_process(data, tmp_path / "c", seed=8)
    assert len(a) == len(b) == 1 and len(a[0]) > 3
    assert a[0] == b[0]  # loss, every term and the gradient norm, bit for bit
    assert a[0]["loss"] != c[0]["loss"]


def test_background_only_trains_without_nan_and_predicts_background(tmp_path, one_thread):
    from scripts.loss import MaskSAMLoss
    from scripts.network import MaskSAM

    torch.manual_seed(0)
    net = MaskSAM(**TINY_NET).train()
    loss = MaskSAMLoss(num_classes=4)(net(torch.randn(1, 1, 64, 64, 4)), torch.zeros(1, 1, 64, 64, 4))
    loss.backward()
    assert math.isfinite(loss.item()) and loss.item() > 0
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)

    data = make_dataset(tmp_path / "data", background_only=True)
    parser, records = train_in_process(data, tmp_path / "train", seed=3, iterations_per_epoch=4,
                                       learning_rate=0.01)
    assert len(records) == 4
    for r in records:
        assert all(math.isfinite(v) for v in r.values()), r
    assert records[-1]["loss"] < records[0]["loss"]
    weights = tmp_path / "models" / "model.pt"
    weights.parent.mkdir()
    torch.save(parser.get_parsed_content("network").state_dict(), weights)

    images = tmp_path / "images"
    save(images / "bg.nii.gz", np.random.default_rng(1).normal(0, 0.2, (40, 30, 2)).astype(np.float32), TINY_AFFINE)
    infer = parser_for([str(BUNDLE / "configs" / "inference.yaml"), str(BUNDLE / "configs" / "tiny.yaml")],
                       dataset_dir=str(images), output_dir=str(tmp_path / "pred"), ckpt_dir=str(weights.parent))
    infer.get_parsed_content("inference")
    pred = nib.load(tmp_path / "pred" / "bg_seg.nii.gz")
    assert pred.shape == (40, 30, 2)  # thinner and smaller in-plane than the patch: padded, cropped back
    np.testing.assert_allclose(pred.affine, TINY_AFFINE)
    assert np.unique(np.asarray(pred.dataobj)).tolist() == [0]


# ---------------------------------------------------------------- checkpoints from another backbone or K


def test_checkpoint_of_another_k_or_backbone_names_the_mismatch(tmp_path):
    from scripts.checkpointing import load_model_weights
    from scripts.inference import Predictor
    from scripts.network import MaskSAM

    net = MaskSAM(**TINY_NET)
    torch.save(MaskSAM(**{**TINY_NET, "num_classes": 3}).state_dict(), tmp_path / "k3.pt")
    with pytest.raises(ValueError) as err:
        load_model_weights(net, str(tmp_path / "k3.pt"), settings={"backbone": "vit_t", "num_classes": 4})
    msg = str(err.value)
    assert "k3.pt" in msg and "'num_classes': 4" in msg and "shape mismatch" in msg
    assert "checkpoint (4," in msg and "vs network (5," in msg  # K (+ no-object) rows of the class head
    assert "likely cause: num_classes (K): checkpoint 3 vs network 4" in msg
    torch.save(MaskSAM(**{**TINY_NET, "num_queries": 8}).state_dict(), tmp_path / "n8.pt")
    with pytest.raises(ValueError, match=r"(?s)n8.pt.*likely cause: num_queries \(N\): checkpoint 8 vs network 4"):
        load_model_weights(net, str(tmp_path / "n8.pt"))
    assert len(msg) < 2000 and "tensor(" not in msg  # a summary, not a state-dict dump

    lite = MaskSAM(**{**TINY_NET, "backbone": "lite_medsam", "image_size": 256})
    torch.save(lite.state_dict(), tmp_path / "lite.pt")
    with pytest.raises(ValueError) as err:
        load_model_weights(net, str(tmp_path / "lite.pt"))
    msg = str(err.value)
    assert "lite.pt" in msg and "missing key(s)" in msg and "unexpected key(s)" in msg and "in all)" in msg
    assert "likely cause: another backbone (layer names differ" in msg
    assert len(msg) < 2000 and "tensor(" not in msg

    # a resumable checkpoint carries its settings: the error names them
    torch.save({"network": lite.state_dict(), "settings": {"backbone": "lite_medsam", "num_classes": 4}},
               tmp_path / "last.pt")
    with pytest.raises(ValueError, match=r"last.pt.*other model settings: backbone: checkpoint 'lite_medsam' "
                                         r"vs config 'vit_t'"):
        load_model_weights(net, str(tmp_path / "last.pt"), settings={"backbone": "vit_t", "num_classes": 4})

    # inference refuses before predicting anything
    image = save(tmp_path / "in" / "x.nii.gz", np.zeros((8, 8, 4), np.float32), TINY_AFFINE)
    predictor = Predictor(net, lambda d: d, None, None, [{"image": image}], str(tmp_path / "out"),
                          checkpoint=str(tmp_path / "k3.pt"))
    with pytest.raises(ValueError, match="k3.pt.*does not match"):
        predictor.run()
    assert list((tmp_path / "out").iterdir()) == []


# ---------------------------------------------------------------------------------- failures mid-write


def test_failure_mid_write_keeps_previous_checkpoint_and_prediction(tmp_path, monkeypatch):
    """A full disk or a Ctrl-C during a write leaves the previous file intact and no temporary beside it."""
    from scripts.inference import write_label_nifti
    from scripts.files import atomic_torch_save, atomic_write

    ck = tmp_path / "ck" / "checkpoint_last.pt"
    atomic_torch_save({"iteration": torch.tensor(2)}, str(ck))
    reference = save(tmp_path / "in" / "case.nii.gz", np.zeros((6, 5, 3), np.float32), TINY_AFFINE)
    pred = tmp_path / "pred" / "case_seg.nii.gz"
    write_label_nifti(np.full((6, 5, 3), 2), reference, str(pred))

    def partial(obj, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", partial)
    monkeypatch.setattr(nib, "save", partial)
    with pytest.raises(OSError, match="No space left"):
        atomic_torch_save({"iteration": torch.tensor(3)}, str(ck))
    with pytest.raises(OSError, match="No space left"):
        write_label_nifti(np.full((6, 5, 3), 1), reference, str(pred))
    monkeypatch.undo()

    def interrupted(tmp):  # Ctrl-C halfway through any atomic write
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(str(ck), interrupted)

    assert int(torch.load(ck, weights_only=True)["iteration"]) == 2
    assert np.unique(np.asarray(nib.load(pred).dataobj)).tolist() == [2]
    assert os.listdir(ck.parent) == ["checkpoint_last.pt"] and os.listdir(pred.parent) == ["case_seg.nii.gz"]


# --------------------------------------------------------------------------- folder inference (CLI)


def test_cli_folder_inference_reports_bad_files_and_exits_non_zero(tmp_path):
    from scripts.network import MaskSAM

    models = tmp_path / "models"
    models.mkdir()
    torch.manual_seed(0)
    torch.save(MaskSAM(**TINY_NET).state_dict(), models / "model.pt")
    images = tmp_path / "images"
    rng = np.random.default_rng(0)
    save(images / "a_thin.nii.gz", rng.normal(size=(40, 30, 2)).astype(np.float32), TINY_AFFINE)
    save(images / "b_ok.nii.gz", rng.normal(size=(70, 66, 5)).astype(np.float32), TINY_AFFINE)
    good = Path(save(tmp_path / "tmp.nii.gz", rng.normal(size=(20, 20, 4)).astype(np.float32), TINY_AFFINE)).read_bytes()
    (images / "c_truncated.nii.gz").write_bytes(good[: int(len(good) * 0.8)])  # header intact, data cut
    save(images / "d_two_channels.nii.gz", rng.normal(size=(20, 20, 4, 2)).astype(np.float32), TINY_AFFINE)
    save(images / "e_flat2d.nii.gz", rng.normal(size=(20, 20)).astype(np.float32), TINY_AFFINE)
    nan = rng.normal(size=(20, 20, 4)).astype(np.float32)
    nan[1, 2, 3] = np.inf
    save(images / "f_inf.nii.gz", nan, TINY_AFFINE)

    out = tmp_path / "pred"
    code, stdout, stderr = cli("run", "inference", "--config_file", "['configs/inference.yaml','configs/tiny.yaml']",
                               "--dataset_dir", images, "--output_dir", out, "--ckpt_dir", models, timeout=300,
                               quiet=True)
    log = stdout + stderr
    assert code != 0, log[-4000:]
    assert sorted(p.name for p in out.iterdir()) == ["a_thin_seg.nii.gz", "b_ok_seg.nii.gz"]
    for name, shape in (("a_thin", (40, 30, 2)), ("b_ok", (70, 66, 5))):
        pred = nib.load(out / f"{name}_seg.nii.gz")
        assert pred.shape == shape and np.allclose(pred.affine, TINY_AFFINE)
    summary = log[log.index("4 of 6 image(s) failed:"):]
    assert f"{images / 'c_truncated.nii.gz'}: ValueError: {images / 'c_truncated.nii.gz'}: cannot be read (EOFError" in summary
    assert "d_two_channels.nii.gz: has 2 channel(s), the network expects in_channels=1" in summary
    assert "e_flat2d.nii.gz: expected a 3D volume" in summary
    assert "f_inf.nii.gz: 1 NaN/Inf intensity value(s)" in summary and "fix_nonfinite=true" in summary


def test_truncated_nifti_in_a_training_case_names_the_file(tmp_path):
    from monai.transforms import Compose

    from scripts.transforms import deterministic_transforms

    image = Path(save(tmp_path / "img.nii.gz", np.random.rand(30, 30, 6).astype(np.float32), TINY_AFFINE))
    label = save(tmp_path / "lab.nii.gz", np.zeros((30, 30, 6), np.uint8), TINY_AFFINE)
    image.write_bytes(image.read_bytes()[:-200])  # the gzip stream ends early
    with pytest.raises(Exception) as err:
        Compose(deterministic_transforms(num_classes=4, patch_size=[8, 8, 4]))({"image": str(image), "label": label})
    assert re.search(r"img.nii.gz: cannot be read \(EOFError: .*truncated", chain_error(err, ValueError))

    load = deterministic_transforms(keys=["image"])[0]
    load._loader.image_only = False  # what MONAI Label's BundleInferTask does: reaches the wrapped LoadImage
    out = load({"image": label})
    assert out["image"].shape == (30, 30, 6) and "image_meta_dict" in out


# ------------------------------------------------------------------- output folders before heavy work


def test_unwritable_or_occupied_output_is_refused_before_network_and_data(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("a file, so no folder can be created below it (even as root)")
    nowhere = str(tmp_path / "does_not_exist")
    workflows = {
        "training": (TRAIN_CONFIGS, {}),
        "evaluating": (TRAIN_CONFIGS + [str(BUNDLE / "configs" / "evaluate.yaml")], {}),
        "inference": ([str(BUNDLE / "configs" / "inference.yaml"), str(BUNDLE / "configs" / "tiny.yaml")], {}),
    }
    for run_id, (configs, extra) in workflows.items():
        parser = parser_for(configs, output_dir=str(blocker / "sub"), dataset_dir=nowhere,
                            datalist=nowhere + "/dataset.json", ckpt_dir=str(tmp_path / "models"), **extra)
        with pytest.raises(Exception) as err:
            parser.get_parsed_content(run_id)
        assert re.search(r"output_dir '.*a_file/sub' cannot be written", chain_error(err, PermissionError)), run_id
        resolved = parser.ref_resolver.resolved_content
        assert "network" not in resolved and "network_def" not in resolved, run_id

    report = tmp_path / "eval"
    report.mkdir()
    (report / "metrics.json").write_text("{}")
    parser = parser_for(workflows["evaluating"][0], output_dir=str(report), dataset_dir=nowhere,
                        datalist=nowhere + "/dataset.json", ckpt_dir=str(tmp_path / "models"))
    with pytest.raises(Exception) as err:
        parser.get_parsed_content("evaluating")
    assert re.search(r"evaluation report exists: .*metrics.json.*overwrite=true", chain_error(err, FileExistsError))
    assert "network" not in parser.ref_resolver.resolved_content
    assert (report / "metrics.json").read_text() == "{}"
