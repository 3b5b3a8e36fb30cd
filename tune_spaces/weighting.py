"""Dynamic class re-weighting on its own: score, exponent, its EMA and its schedule."""

from __future__ import annotations

from tune_spaces import _knobs

DESCRIPTION = "dynamic class weights: mode, gamma, score momentum, schedule and warm-up"
NUM_SAMPLES = 8
GRACE_PERIOD = 400


def define(trial, adaptation_steps: int | None = None) -> None:
    """Uniform mode is one arm of the search: it shows whether weighting pays at all."""
    _knobs.weights(trial, adaptation_steps)
