#!/usr/bin/env bash
# Start the MaskSAM MONAI Label server, offline, on 127.0.0.1 by default.
#
#   monailabel_app/start_server.sh STUDIES_DIR [more `monailabel start_server` arguments]
#
# STUDIES_DIR: a writable folder of .nii/.nii.gz images (MONAI Label keeps its datastore JSON and the saved
# labels in it). Environment: MONAILABEL_HOST (default 127.0.0.1), MONAILABEL_PORT (default 8000),
# MASKSAM_MONAILABEL_VENV (default monailabel_app/.venv, made by setup_env.sh), MASKSAM_BUNDLE (default: the
# repository's masksam_bundle/). Without models/model.pt the server offers the zero-shot annotation assist
# (masksam_interactive) only, and /info/ says how to get automatic segmentation.
set -euo pipefail
APP_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${MASKSAM_MONAILABEL_VENV:-$APP_DIR/.venv}"
if [ $# -lt 1 ]; then
    echo "usage: $0 STUDIES_DIR [monailabel start_server arguments]" >&2
    exit 2
fi
STUDIES="$1"; shift
BUNDLE="${MASKSAM_BUNDLE:-$APP_DIR/../masksam_bundle}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "no MONAI Label environment at $VENV: run  bash $APP_DIR/setup_env.sh" >&2
    exit 1
fi
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
# `python -m monailabel.main` = the `monailabel` command, run by the venv's interpreter (the `monailabel`
# wrapper script calls whichever `python` is first on PATH).
exec "$VENV/bin/python" -m monailabel.main start_server \
    --app "$APP_DIR" --studies "$STUDIES" \
    --host "${MONAILABEL_HOST:-127.0.0.1}" --port "${MONAILABEL_PORT:-8000}" \
    --conf bundle_path "$BUNDLE" --conf zoo_source github --conf sam2 false --conf preload false \
    "$@"
