#!/usr/bin/env bash
# Set up (idempotent), then the main job on the embedded default data: one T2S-DA training
# run on `digits` (source-only warm-up, then adaptation), logged to runs/ for TensorBoard.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
exec .venv/bin/python -m t2sda train --preset digits "$@"
