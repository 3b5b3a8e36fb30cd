#!/usr/bin/env bash
# Set up (idempotent), then the whole test suite: fast CPU tests plus the slow/ray-marked ones.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
export RAY_AUTH_MODE=disabled
.venv/bin/ruff check .
exec .venv/bin/python -m pytest --durations=25 "$@"
