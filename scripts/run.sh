#!/usr/bin/env bash
# Set up (idempotent), then the main job on the embedded default data: the pull-loss search
# (Ray Tune + Optuna + ASHA, each trial a Ray Train run) on `digits`, on a local Ray, then the
# confirmation of the best against the default (3 paired seeds) and its verdict as the last line.
# Extra flags go to tune.py, e.g. scripts/run.sh --num-samples 4 --name demo
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
exec .venv/bin/python tune.py --space pull_loss "$@"
