"""MONAI Label end to end: the real server on 127.0.0.1 with a temporary copy of the bundle and a tiny checkpoint
(both tasks), and with no checkpoint at all (the zero-shot annotation assist: LiteMedSAM through the prompt path).

The server runs in MONAI Label's own environment (monailabel_app/setup_env.sh; it needs numpy < 2). Without that
environment the server tests are skipped, except under CI=true, where they fail: CI must create it.
"""

import email
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from helpers import BUNDLE as BUNDLE_ROOT, REPO_ROOT, save

APP_DIR = REPO_ROOT / "monailabel_app"
VENV = Path(os.environ.get("MASKSAM_MONAILABEL_VENV", APP_DIR / ".venv"))
CASE = "patient002_frame01"
# The tiny preset (configs/tiny.yaml) as the bundle's inference config: vit_t, 64x64x4 patch, 4 mm in-plane
# resampling, so the Spacingd path that used to crash under MONAI Label (image_path) is exercised.
TINY = dict(backbone="vit_t", num_queries=4, patch_size=[64, 64, 4], sam_upsample=1, pixdim=[4.0, 4.0, 1.0],
            amp=False, sw_batch_size=4)


def test_safe_spacing_tolerates_image_path(acdc_dir):
    """The bundle's preprocessing with Spacingd works with MONAI Label's string ``image_path`` key."""
    from monai.transforms import Compose

    from scripts.transforms import deterministic_transforms

    image = str(acdc_dir / "imagesTr" / f"{CASE}.nii.gz")
    pre = Compose(deterministic_transforms(keys=["image"], patch_size=[64, 64, 4], pixdim=[4.0, 4.0, 1.0]))
    out = pre({"image": image, "image_path": image})
    assert out["image_path"] == image
    assert out["image"].shape[1] == 64 and out["image"].pixdim.tolist()[:2] == [4.0, 4.0]  # 232 x 256 at 4 mm
    back = pre.inverse({"image": out["image"]})["image"]
    assert tuple(back.shape[1:]) == tuple(nib.load(image).shape)


# ------------------------------------------------------------------------------------------ server fixture
def _venv_python() -> Path:
    python = VENV / "bin" / "python"
    if not python.exists():
        msg = f"MONAI Label environment missing ({python}); create it with: bash monailabel_app/setup_env.sh"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return python


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_bundle(dst: Path) -> Path:
    """A temporary copy of the bundle with the tiny preset as its inference config and a random tiny model.pt."""
    from scripts import MaskSAM

    shutil.copytree(BUNDLE_ROOT, dst, ignore=shutil.ignore_patterns("*.pt", "*.pth", "*.ts", "eval", "outputs",
                                                                   "__pycache__", "runs"))
    cfg_path = dst / "configs" / "inference.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg.update(TINY)
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    torch.manual_seed(0)
    net = MaskSAM(backbone="vit_t", in_channels=1, num_classes=4, num_queries=TINY["num_queries"],
                  num_slices=TINY["patch_size"][2], image_size=TINY["patch_size"][0], sam_upsample=1)
    (dst / "models").mkdir(exist_ok=True)
    torch.save(net.state_dict(), dst / "models" / "model.pt")
    return dst


class Server:
    def __init__(self, url: str, log: Path, image: Path, label: Path):
        self.url, self.log, self.image, self.label = url, log, image, label

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def post(self, path: str, fields=None, files=None, timeout: float = 300.0, expect_error: bool = False):
        """multipart/form-data POST with the standard library; returns (status, content-type, body bytes).

        An HTTP error fails the test, unless ``expect_error``: then it is returned the same way."""
        boundary = uuid.uuid4().hex
        body = io.BytesIO()
        for name, value in (fields or {}).items():
            body.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode())
            body.write(value.encode() + b"\r\n")
        for name, file in (files or {}).items():
            body.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{file.name}"\r\n'
                       "Content-Type: application/octet-stream\r\n\r\n".encode())
            body.write(file.read_bytes() + b"\r\n")
        body.write(f"--{boundary}--\r\n".encode())
        req = urllib.request.Request(self.url + path, data=body.getvalue(), method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.headers.get("Content-Type", ""), resp.read()
        except urllib.error.HTTPError as e:
            if expect_error:
                return e.code, e.headers.get("Content-Type", ""), e.read()
            raise AssertionError(f"{path}: HTTP {e.code}: {e.read()[:2000]!r}\n--- server log ---\n{self.log_tail()}")


def _start_server(root: Path, bundle: Path, acdc_dir: Path):
    """Start ``start_server.sh`` on a free port of 127.0.0.1 with one ACDC image; yields a :class:`Server`."""
    app = root / "app"
    shutil.copytree(APP_DIR, app, ignore=shutil.ignore_patterns(".venv", "logs", "bin", "model", "__pycache__"))
    studies = root / "studies"
    studies.mkdir()
    image = studies / f"{CASE}.nii.gz"
    shutil.copy(acdc_dir / "imagesTr" / image.name, image)
    port = _free_port()
    log = root / "server.log"
    env = dict(os.environ, MASKSAM_MONAILABEL_VENV=str(VENV), MASKSAM_BUNDLE=str(bundle),
               MONAILABEL_PORT=str(port), OMP_WAIT_POLICY="PASSIVE")
    env.pop("MONAILABEL_HOST", None)  # the default host is what is under test
    with open(log, "wb") as out:
        proc = subprocess.Popen(["bash", str(app / "start_server.sh"), str(studies)], env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    srv = Server(f"http://127.0.0.1:{port}", log, image, acdc_dir / "labelsTr" / image.name)
    try:
        deadline = time.time() + 240
        while True:
            if proc.poll() is not None:
                pytest.fail(f"MONAI Label server exited with {proc.returncode}:\n{srv.log_tail()}")
            try:
                with urllib.request.urlopen(srv.url + "/info/", timeout=5) as resp:
                    srv.info = json.loads(resp.read())
                break
            except (urllib.error.URLError, ConnectionError, socket.timeout):
                if time.time() > deadline:
                    pytest.fail(f"MONAI Label server not up after 240 s:\n{srv.log_tail()}")
                time.sleep(1)
        yield srv
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server's own process group (start_new_session)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory, acdc_dir):
    """The app with a (random, tiny) trained model.pt: both tasks."""
    _venv_python()  # skips (or fails in CI) when the MONAI Label environment is missing
    root = tmp_path_factory.mktemp("monailabel")
    yield from _start_server(root, _tiny_bundle(root / "masksam_bundle"), acdc_dir)


@pytest.fixture(scope="module")
def server_no_model(tmp_path_factory, acdc_dir):
    """The app on a bundle without models/model.pt: the zero-shot assist only."""
    _venv_python()
    root = tmp_path_factory.mktemp("monailabel_no_model")
    bundle = root / "masksam_bundle"
    shutil.copytree(BUNDLE_ROOT, bundle, ignore=shutil.ignore_patterns("*.pt", "*.pth", "*.ts", "eval", "outputs",
                                                                     "__pycache__", "runs"))
    assert not (bundle / "models" / "model.pt").exists()
    yield from _start_server(root, bundle, acdc_dir)


def _multipart(content_type: str, body: bytes):
    """(params dict, file bytes) from MONAI Label's multipart answer (output=all)."""
    msg = email.message_from_bytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    params, image = None, None
    for part in msg.get_payload():
        if part.get_filename():
            image = part.get_payload(decode=True)
        else:
            params = json.loads(part.get_payload(decode=True))
    return params, image


def _nifti(data: bytes, tmp_path: Path, name: str):
    path = tmp_path / f"{name}.nii.gz"
    path.write_bytes(data)
    img = nib.load(str(path))
    return np.asarray(img.dataobj), img.affine


# ------------------------------------------------------------------------------------------ tests
@pytest.mark.slow
def test_server_info_offline_on_loopback(server):
    assert f"Uvicorn running on {server.url}" in server.log_tail(200000)
    models = server.info["models"]
    assert models["masksam"]["type"] == "segmentation"
    assert models["masksam"]["labels"] == {"rv": 1, "myo": 2, "lv": 3}
    assert models["masksam_interactive"]["type"] == "deepgrow"
    assert "sam_2d" not in models and "sam_3d" not in models


@pytest.mark.slow
def test_auto_segmentation_over_http(server, tmp_path):
    status, ctype, body = server.post(f"/infer/masksam?image={CASE}&output=image")
    assert status == 200
    label, affine = _nifti(body, tmp_path, "auto")
    ref = nib.load(str(server.image))
    assert label.shape == ref.shape and label.dtype == np.uint8
    assert set(np.unique(label).tolist()) <= {0, 1, 2, 3}
    np.testing.assert_allclose(affine, ref.affine, atol=1e-4)


@pytest.mark.slow
def test_interactive_correction_over_http(server, tmp_path):
    truth = np.asarray(nib.load(str(server.label)).dataobj)
    z = 5
    lv = np.argwhere(truth[..., z] == 3)
    inside = [int(v) for v in np.rint(lv.mean(0))] + [z]
    assert truth[tuple(inside)] == 3
    # A background voxel just outside the LV/myocardium ring (annotator: "this belongs to LV").
    i0 = inside[0]
    j_out = next(j for j in range(inside[1], truth.shape[1]) if truth[i0, j, z] == 0)
    outside = [i0, j_out + 2, z]
    assert truth[tuple(outside)] == 0
    params = {"target": "LV", "foreground": [outside], "background": [inside], "output_mode": "labelmap"}

    status, ctype, body = server.post(f"/infer/masksam_interactive?image={CASE}&output=all",
                                      fields={"params": json.dumps(params)}, files={"label": server.label})
    assert status == 200
    result, data = _multipart(ctype, body)
    new, affine = _nifti(data, tmp_path, "corrected")
    assert new.shape == truth.shape and new.dtype == np.uint8 and set(np.unique(new).tolist()) <= {0, 1, 2, 3}
    assert result["target_index"] == 3 and result["slices"] == [z] and result["trained_model"]
    # Clicks without a box correct the model's own query (or, where it missed the LV, the prompts alone decide).
    assert result["path"].startswith("correction of the model's query")
    # The clicks changed the target label at (and around) them ...
    assert new[tuple(outside)] == 3 and new[tuple(inside)] != 3
    changed = new != truth
    assert changed.any() and result["changed_voxels"] == int(changed.sum())
    # ... only on the clicked slice, only between background and the target; other labels untouched.
    assert set(np.nonzero(changed)[2].tolist()) == {z}
    assert set(new[changed].tolist()) <= {0, 3} and set(truth[changed].tolist()) <= {0, 3}
    for k in (1, 2):
        assert np.array_equal(new == k, truth == k)

    # Same request, binary output (the default) for viewers that merge one segment (3D Slicer's deepgrow import).
    params.pop("output_mode")
    status, ctype, body = server.post(f"/infer/masksam_interactive?image={CASE}&output=image",
                                      fields={"params": json.dumps(params)}, files={"label": server.label})
    mask, _ = _nifti(body, tmp_path, "target")
    assert np.array_equal(mask.astype(bool), new == 3)


@pytest.mark.slow
def test_trained_model_box_uses_the_prompt_path(server, tmp_path):
    params = {"label": "lv", "roi": [87, 131, 107, 150, 5, 5]}
    status, ctype, body = server.post(f"/infer/masksam_interactive?image={CASE}&output=all",
                                      fields={"params": json.dumps(params)})
    result, data = _multipart(ctype, body)
    mask, _ = _nifti(data, tmp_path, "trained_box")
    assert status == 200 and result["path"] == "prompt-only (trained adapters)" and result["encoder_runs"] <= 1
    assert mask.dtype == np.uint8 and set(np.unique(mask).tolist()) <= {0, 1} and not mask[..., :5].any()
    params["background"] = [[100, 120, 5]]  # a further click on the slice: its window's embedding is cached
    status, _, body = server.post(f"/infer/masksam_interactive?image={CASE}&output=json",
                                  fields={"params": json.dumps(params)})
    assert status == 200 and json.loads(body)["encoder_runs"] == 0


# ------------------------------------------------------------------------------------------ no trained model
def _error(server, path, params=None, files=None):
    fields = None if params is None else {"params": params if isinstance(params, str) else json.dumps(params)}
    status, _, body = server.post(path, fields=fields, files=files, expect_error=True)
    return status, json.loads(body).get("detail", "")


@pytest.mark.slow
def test_no_model_server_offers_the_assist_and_says_how_to_get_auto(server_no_model):
    info = server_no_model.info
    assert set(info["models"]) == {"masksam_interactive"}
    assert info["models"]["masksam_interactive"]["labels"] == {"rv": 1, "myo": 2, "lv": 3}
    for text in (info["auto_segmentation"], info["description"], server_no_model.log_tail(200000)):
        assert "needs a trained models/model.pt" in text and "configs/train.yaml" in text
    status, detail = _error(server_no_model, f"/infer/masksam?image={CASE}")
    assert status == 404 and "needs a trained models/model.pt" in detail


@pytest.mark.slow
def test_no_model_box_segments_the_lv(server_no_model, tmp_path):
    """A box (Slicer's roi) on one slice, no trained model: LiteMedSAM zero-shot through the bundle's prompt path."""
    truth = np.asarray(nib.load(str(server_no_model.label)).dataobj)
    z = 5
    rows, cols = np.nonzero(truth[..., z] == 3)
    roi = [int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max()), z, z]
    status, ctype, body = server_no_model.post(f"/infer/masksam_interactive?image={CASE}&output=all",
                                               fields={"params": json.dumps({"label": "lv", "roi": roi})})
    result, data = _multipart(ctype, body)
    mask, affine = _nifti(data, tmp_path, "zero_shot")
    assert status == 200 and result["path"] == "prompt-only (LiteMedSAM zero-shot)" and not result["trained_model"]
    assert mask.dtype == np.uint8 and mask.shape == truth.shape and set(np.unique(mask).tolist()) == {0, 1}
    np.testing.assert_allclose(affine, nib.load(str(server_no_model.image)).affine, atol=1e-4)
    pred, gt = mask[..., z].astype(bool), truth[..., z] == 3
    dice = 2 * (pred & gt).sum() / (pred.sum() + gt.sum())
    assert dice >= 0.8, dice
    assert not np.delete(mask, z, axis=2).any()  # one slice prompted, no propagation asked for
    # A click on the same slice: the embedding is cached, only the decoder runs.
    params = {"label": "lv", "roi": roi, "foreground": [[int(rows.mean()), int(cols.mean()), z]]}
    status, ctype, body = server_no_model.post(f"/infer/masksam_interactive?image={CASE}&output=json",
                                               fields={"params": json.dumps(params)})
    assert status == 200 and json.loads(body)["encoder_runs"] == 0
    # Slicer's deepgrow panel sends clicks only: foreground clicks at the LV's edges span the box zero-shot needs.
    lv = np.argwhere(truth[..., z] == 3)
    edges = [lv[lv[:, a].argmin()] for a in (0, 1)] + [lv[lv[:, a].argmax()] for a in (0, 1)]
    params = {"label": "lv", "foreground": [[int(i), int(j), z] for i, j in edges]}
    status, ctype, body = server_no_model.post(f"/infer/masksam_interactive?image={CASE}&output=all",
                                               fields={"params": json.dumps(params)})
    result, data = _multipart(ctype, body)
    pred = _nifti(data, tmp_path, "clicks")[0][..., z].astype(bool)
    assert status == 200 and "hint" not in result and 2 * (pred & gt).sum() / (pred.sum() + gt.sum()) >= 0.8


@pytest.mark.slow
def test_no_model_errors_reach_the_client(server_no_model, tmp_path):
    url = f"/infer/masksam_interactive?image={CASE}&output=image"
    status, detail = _error(server_no_model, url, {"label": "lv", "roi": [1, 2, 3]})
    assert status == 400 and "bad parameter 'roi'" in detail and "[i0, i1, j0, j1, k0, k1]" in detail
    status, detail = _error(server_no_model, url, {"label": "aorta", "roi": [1, 2, 3, 4, 5, 5]})
    assert status == 400 and "bad parameter 'label'" in detail and "'lv'" in detail
    status, detail = _error(server_no_model, url, "{not json")
    assert status == 400 and "bad parameter 'params'" in detail
    status, detail = _error(server_no_model, url, {"label": "lv", "mode": "correct", "roi": [1, 2, 3, 4, 5, 5]})
    assert status == 400 and "needs a trained models/model.pt" in detail
    status, detail = _error(server_no_model, "/infer/masksam_interactive?image=no_such_image&output=image",
                            {"label": "lv", "roi": [1, 2, 3, 4, 5, 5]})
    assert status == 404 and "'no_such_image' not found" in detail
    # An uploaded label of the wrong shape is refused before any inference runs.
    small = tmp_path / "small_label.nii.gz"
    save(small, np.zeros((10, 10, 10), dtype=np.uint8))
    runs = server_no_model.log_tail(10**7).count("MaskSAM interactive:")
    status, detail = _error(server_no_model, url, {"target": "lv", "roi": [1, 2, 3, 4, 5, 5]}, files={"label": small})
    assert status == 400 and "bad parameter 'label'" in detail and "(232, 256, 10)" in detail
    not_nifti = tmp_path / "label.nii.gz"
    not_nifti.write_bytes(b"not an image")
    status, detail = _error(server_no_model, url, {"target": "lv", "roi": [1, 2, 3, 4, 5, 5]},
                            files={"label": not_nifti})
    assert status == 400 and "bad parameter 'label'" in detail and "unreadable" in detail
    assert server_no_model.log_tail(10**7).count("MaskSAM interactive:") == runs
