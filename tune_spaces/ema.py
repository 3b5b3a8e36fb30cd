"""The two moving averages: the mean teacher and the bank of class prototypes."""

from __future__ import annotations

from tune_spaces import _knobs

DESCRIPTION = "moving averages: teacher EMA momentum, prototype bank or batch keys and its momentum"
NUM_SAMPLES = 8
GRACE_PERIOD = 400


def define(trial, adaptation_steps: int | None = None) -> None:
    """The bank's momentum only matters when the pull loss takes its positives from the bank."""
    _knobs.teacher(trial, adaptation_steps)
    keys = trial.suggest_categorical("method.pull_keys", ("bank", "batch"))
    if keys == "bank":
        trial.suggest_categorical("method.proto_momentum", _knobs.PROTO_MOMENTA)
