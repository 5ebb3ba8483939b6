"""Shared test set-up: the bundle root on sys.path (so `import scripts` works as in MONAI bundles), tests/ on
sys.path (so test modules import their shared helpers as `from helpers import ...`), and the ACDC fixture."""

import os
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
for _path in (TESTS_DIR, TESTS_DIR.parent / "masksam_bundle"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from helpers import ACDC_DIR, BUNDLE, REPO_ROOT  # noqa: E402  (re-exported: `from conftest import REPO_ROOT`)

BUNDLE_ROOT = BUNDLE

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="session")
def acdc_dir() -> Path:
    if not (ACDC_DIR / "dataset.json").exists():
        pytest.fail(f"ACDC data expected at {ACDC_DIR} (../shared/data/acdc beside the repository)")
    return ACDC_DIR
