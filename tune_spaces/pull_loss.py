"""The pull loss: tau, lambda, the weighting schedule with gamma and warm-up, EMA momentum."""

from __future__ import annotations

from tune_spaces import _knobs

DESCRIPTION = "pull loss: temperature, weight, weighting schedule (gamma, warm-up), teacher EMA"
NUM_SAMPLES = 6
GRACE_PERIOD = 400


def define(trial, adaptation_steps: int | None = None) -> None:
    """Weight mode stays the preset's (iou), so gamma always acts and is always sampled."""
    _knobs.pull(trial)
    _knobs.schedule(trial, adaptation_steps)
    _knobs.gamma(trial)
    _knobs.teacher(trial, adaptation_steps)
