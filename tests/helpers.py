"""Helpers shared by the test modules: paths, the tiny preset, a NIfTI writer, matchers for an exception's
cause chain, the bundle command line and the bundle config parser.

Test modules import them as ``from helpers import ...`` (conftest.py puts tests/ on ``sys.path``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import nibabel as nib
import numpy as np

__all__ = [
    "ACDC_DIR", "BUNDLE", "CONFIGS", "REPO_ROOT", "TINY", "TINY_AFFINE", "TINY_NET", "TRAIN_CONFIGS",
    "chain_error", "cli", "cli_env", "error_chain", "last_line", "make_dataset", "parser_for", "raises_chain", "save",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLE = REPO_ROOT / "masksam_bundle"
CONFIGS = BUNDLE / "configs"
ACDC_DIR = REPO_ROOT.parent / "shared" / "data" / "acdc"

TINY = "['configs/train.yaml','configs/tiny.yaml']"  # the tiny preset as a --config_file value
TRAIN_CONFIGS = [str(CONFIGS / "train.yaml"), str(CONFIGS / "tiny.yaml")]
TINY_NET = dict(backbone="vit_t", num_classes=4, num_queries=4, num_slices=4, image_size=64, sam_upsample=1)
TINY_AFFINE = np.diag([4.0, 4.0, 1.0, 1.0])  # the tiny preset's pixdim: no resampling, only padding


def save(path: Union[str, Path], array, affine: Optional[np.ndarray] = None) -> str:
    """Write ``array`` as NIfTI at ``path`` (parent folders created; ``affine`` defaults to the identity)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), np.eye(4) if affine is None else affine), str(path))
    return str(path)


def make_dataset(root, num_train=2, num_val=1, shape=(40, 36, 3), background_only=False, seed=0) -> Path:
    """A decathlon folder of blob labels (classes 1..3) or all-zero labels on noise, at the tiny preset's spacing;
    shapes smaller than the 64x64x4 patch."""
    rng = np.random.default_rng(seed)
    entries = []
    for i in range(num_train + num_val):
        label = np.zeros(shape, np.uint8)
        if not background_only:
            for k, (x, y) in enumerate([(8, 8), (20, 10), (12, 22)], start=1):
                label[x:x + 8, y:y + 8, :] = k
        image = (label * 0.5 + rng.normal(0, 0.2, shape)).astype(np.float32)
        entries.append({"image": f"imagesTr/c{i}.nii.gz", "label": f"labelsTr/c{i}.nii.gz"})
        save(Path(root) / entries[-1]["image"], image, TINY_AFFINE)
        save(Path(root) / entries[-1]["label"], label, TINY_AFFINE)
    (Path(root) / "dataset.json").write_text(json.dumps({"training": entries[:num_train],
                                                         "validation": entries[num_train:]}))
    return Path(root)


def error_chain(error: Optional[BaseException]) -> Iterator[BaseException]:
    """``error``, then its cause (or context), and so on: MONAI wraps a transform's or a config expression's
    error in its own ``RuntimeError``."""
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


def chain_error(excinfo, exc_type: type) -> str:
    """The message of the first ``exc_type`` in the chain of ``pytest.raises``' ``excinfo``; fails if there is none."""
    for error in error_chain(excinfo.value):
        if isinstance(error, exc_type):
            return str(error)
    raise AssertionError(f"no {exc_type.__name__} in the chain of {excinfo.value!r}")


class raises_chain:
    """Like ``pytest.raises(exc, match=...)`` but matches anywhere in the exception's cause chain."""

    def __init__(self, exc: type, match: str):
        self.exc, self.match = exc, match

    def __enter__(self):
        return self

    def __exit__(self, typ, value, tb):
        assert value is not None, "no exception raised"
        chain = list(error_chain(value))
        hits = [e for e in chain if isinstance(e, self.exc) and re.search(self.match, str(e), re.S)]
        assert hits, f"no {self.exc.__name__} matching {self.match!r} in {[repr(e) for e in chain]}"
        return True


def cli_env(threads: Union[int, str] = 1, quiet: bool = False) -> dict:
    """The environment of a bundle command: ``threads`` OpenMP/MKL threads, no debug or memory-limit switch from
    the caller's shell; ``quiet`` hides Python warnings."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.pop("MASKSAM_DEBUG", None)
    env.pop("MASKSAM_MEMORY_LIMIT_GB", None)
    if quiet:
        env["PYTHONWARNINGS"] = "ignore"
    return env


def cli(*args, cwd: Path = BUNDLE, timeout: int = 600, launcher: Optional[Sequence[str]] = None,
        threads: Union[int, str] = 1, quiet: bool = False) -> tuple[int, str, str]:
    """Run ``python -m monai.bundle ARGS`` (or ``launcher + monai.bundle ARGS``) in ``cwd``;
    (return code, stdout, stderr)."""
    cmd = list(launcher or [sys.executable, "-m"]) + ["monai.bundle", *[str(a) for a in args]]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=cli_env(threads, quiet))
    return proc.returncode, proc.stdout, proc.stderr


def last_line(text: str) -> str:
    """The last non-blank line of ``text`` ("" if none)."""
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def parser_for(configs: Sequence[str], **overrides):
    """A ``ConfigParser`` of ``configs`` (names in masksam_bundle/configs/ or paths) with ``bundle_root`` set and
    ``overrides`` applied, as ``python -m monai.bundle run`` builds it."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(CONFIGS / name) for name in configs])
    parser.update({"bundle_root": str(BUNDLE), **overrides})
    return parser
