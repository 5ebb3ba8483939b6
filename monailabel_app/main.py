"""MONAI Label app for the MaskSAM bundle: auto-segmentation + interactive correction, fully offline.

Models (``GET /info`` lists them):

- ``masksam``: MONAI Label's own ``BundleInferTask`` on the bundle (``configs/inference.yaml``,
  ``configs/metadata.json``, ``models/model.pt``): the whole-volume MaskSAM label map (sliding window).
- ``masksam_interactive``: ``lib.infer_interactive.MaskSAMInteractiveTask``: the annotator's clicks/box as
  SAM prompts for one label on the clicked slices; the other labels are left untouched.

The network is built from ``configs/inference.yaml``, which reads the settings recorded beside the weights
(``models/model.json``: backbone, classes, N, patch, ...), so any model the bundle trained works unchanged; the
label names the app announces come from that file too (``trained_labels``), else from ``metadata.json``.

The bundle is found, in this order: ``--conf bundle_path DIR``; ``<app>/model/<name>`` where ``name`` is
``--conf models`` (default ``masksam_bundle``; the monaibundle sample app's convention); the repository's own
``masksam_bundle/`` beside this folder. Nothing is downloaded: no zoo lookup, no SAM2 (``--conf sam2 true``
would add MONAI Label's SAM2 tasks, which download weights), no dcmqi tools for a local studies folder.
Start it with ``monailabel_app/start_server.sh STUDIES_DIR`` (binds 127.0.0.1 by default).
"""

import json
import logging
import os
from typing import Dict, Optional

import monailabel
from monailabel.interfaces.app import MONAILabelApp
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
REQUIRED = ("configs/inference.yaml", "configs/metadata.json", "models/model.pt")


def resolve_bundle(app_dir: str, conf: Dict[str, str]) -> str:
    name = (conf.get("models") or "masksam_bundle").split(",")[0].strip()
    candidates = [conf.get("bundle_path"), os.path.join(app_dir, "model", name),
                  os.path.join(app_dir, os.pardir, "masksam_bundle")]
    for path in candidates:
        if path and os.path.isdir(path):
            path = os.path.realpath(path)
            missing = [f for f in REQUIRED if not os.path.isfile(os.path.join(path, f))]
            if missing:
                raise FileNotFoundError(
                    f"MaskSAM bundle {path} lacks {missing}: MONAI Label reads configs/inference.yaml, "
                    "configs/metadata.json and models/model.pt (train a model or copy its state dict there)"
                )
            return path
        if path == conf.get("bundle_path") and path:
            raise FileNotFoundError(f"--conf bundle_path {path}: not a folder")
    raise FileNotFoundError(f"no MaskSAM bundle found; looked in {[c for c in candidates if c]}")


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
        logger.info(f"+++ MaskSAM bundle (local): {self.bundle_path}")
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name=f"MaskSAM ({monailabel.__version__})",
            description="MaskSAM auto-segmentation and click/box correction through SAM's prompt encoder",
            version=monailabel.__version__,
        )

    def init_infers(self) -> Dict[str, InferTask]:
        infers: Dict[str, InferTask] = {}
        auto = BundleInferTask(self.bundle_path, self.conf, type="segmentation", load_strict=True)
        interactive = MaskSAMInteractiveTask(self.bundle_path, self.conf)
        labels = trained_labels(self.bundle_path)  # the trained model's classes, not metadata.json's ACDC names
        for name, task in ((AUTO, auto), (INTERACTIVE, interactive)):
            if not task.is_valid():
                raise RuntimeError(f"MONAI Label could not load the MaskSAM bundle {self.bundle_path} for {name!r}")
            if labels:
                task.labels = labels
            logger.info(f"+++ Adding Inferer:: {name} => {task}")
            infers[name] = task

        if strtobool(self.conf.get("sam2", "false")):  # off by default: SAM2 downloads its weights
            from monailabel.sam2.infer import Sam2InferTask
            from monailabel.interfaces.tasks.infer_v2 import InferType

            model_dir = os.path.join(self.app_dir, "model")
            infers["sam_2d"] = Sam2InferTask(model_dir=model_dir, type=InferType.DEEPGROW, dimension=2)
            infers["sam_3d"] = Sam2InferTask(model_dir=model_dir, type=InferType.DEEPGROW, dimension=3)
        return infers

    def init_trainers(self) -> Dict[str, TrainTask]:
        return {}  # training runs through the bundle's own configs/train.yaml, not through this app

    def init_strategies(self) -> Dict[str, Strategy]:
        return {"random": Random(), "first": First()}

    def infer(self, request, datastore=None):
        """For the interactive model without an uploaded label map, start from the label saved for the image
        (``final``, else ``original``) when the datastore has one."""
        if request.get("model") == INTERACTIVE and not request.get("current_label"):
            label = request.get("label")
            uploaded = isinstance(label, str) and os.path.isfile(label)
            image_id = request.get("image")
            if not uploaded and isinstance(image_id, str) and not os.path.exists(image_id):
                store = datastore if datastore else self.datastore()
                for tag in ("final", "original"):
                    label_id = store.get_label_by_image_id(image_id, tag)
                    if label_id:
                        request = dict(request, current_label=store.get_label_uri(label_id, tag))
                        break
        return super().infer(request, datastore)
