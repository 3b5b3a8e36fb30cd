#!/usr/bin/env bash
# GPU check on a lent machine: set-up (scripts/setup.sh), then scripts/gpu_check.py under an
# 8-minute limit; arguments go to the script. With T2SDA_PYTHON set (an offline image whose python
# already holds torch and timm) the set-up is skipped and that python runs this checkout.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ -n "${T2SDA_PYTHON:-}" ] || { bash scripts/setup.sh && T2SDA_PYTHON=.venv/bin/python; }
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}" \
    exec timeout 480 "$T2SDA_PYTHON" scripts/gpu_check.py "$@"
