#!/usr/bin/env bash
# Set up (idempotent), then the whole test suite: fast CPU tests plus the slow/ray-marked ones,
# on two pytest-xdist workers (T2SDA_TEST_WORKERS=0: one process); the Ray tests share one.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
export RAY_AUTH_MODE=disabled
.venv/bin/ruff check .
workers="${T2SDA_TEST_WORKERS:-2}"
parallel=()
if [ "$workers" != 0 ]; then
    parallel=(-n "$workers" --dist loadgroup)
fi
exec .venv/bin/python -m pytest "${parallel[@]}" --durations=25 "$@"
