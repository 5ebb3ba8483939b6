"""Shared test set-up: the bundle root on sys.path (so `import scripts` works as in MONAI bundles)."""

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLE_ROOT = REPO_ROOT / "masksam_bundle"
ACDC_DIR = REPO_ROOT.parent / "shared" / "data" / "acdc"

if str(BUNDLE_ROOT) not in sys.path:
    sys.path.insert(0, str(BUNDLE_ROOT))

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="session")
def acdc_dir() -> Path:
    if not (ACDC_DIR / "dataset.json").exists():
        pytest.fail(f"ACDC data expected at {ACDC_DIR} (../shared/data/acdc beside the repository)")
    return ACDC_DIR
