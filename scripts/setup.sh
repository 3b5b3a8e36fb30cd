#!/usr/bin/env bash
# Idempotent set-up: .venv at the repo root with t2sda installed editable (+ dev and export extras).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
# A marker holding the hash of the inputs lets repeated runs skip pip entirely.
stamp=".venv/.t2sda-setup"
want="$(cat pyproject.toml scripts/constraints.txt | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch first, pinned, so nothing below pulls a different build.
.venv/bin/python -m pip install --quiet -c scripts/constraints.txt torch torchvision
.venv/bin/python -m pip install --quiet -c scripts/constraints.txt -e ".[dev,export]"
echo "$want" > "$stamp"
