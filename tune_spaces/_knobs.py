"""Groups of ``trial.suggest_*`` calls that several spaces share, so a knob has one range.

Ranges are sized for the ``digits`` preset (adaptation from step 600); the ones counted in
steps (teacher half-life, weighting warm-up) shrink to the adaptation steps a trial has, e.g.
300 in the default digits search (trials of 900 steps). Names are dotted config keys, so a
sampled dict is ``Config.with_overrides``-ready.
"""

from __future__ import annotations

import math

# Momenta on a grid even in log(1 - m): a log-uniform float over m itself is nearly uniform,
# and a parameter named after the config key has to hold m, not 1 - m.
TEACHER_MOMENTA = (0.98, 0.99, 0.995, 0.998, 0.999, 0.9995, 0.9998, 0.9999)
# A teacher whose half-life (ln 0.5 / ln m steps) exceeds this share of the adaptation steps
# hardly moves before the run ends: on digits (600 adaptation steps) m >= 0.999 (half-life
# 693) stalled at ~40 mIoU. Such momenta are left out of the space for that preset.
MAX_HALF_LIFE_SHARE = 0.5
WEIGHT_MOMENTA = (0.5, 0.8, 0.9, 0.95, 0.98, 0.99)
PROTO_MOMENTA = (0.9, 0.95, 0.99, 0.995, 0.999)
WEIGHT_SCHEDULES = ("constant", "linear", "cosine", "step")
MAX_WARMUP = 500  # steps; with 600 adaptation steps a step schedule still switches
WARMUP_STEP = 50


def pull(trial) -> None:
    """Temperature tau and weight lambda of the pull loss, both spanning 1.5-2 decades."""
    trial.suggest_float("method.pull_temperature", 0.03, 1.0, log=True)
    trial.suggest_float("method.pull_weight", 0.01, 1.0, log=True)


def max_warmup(adaptation_steps: int | None) -> int:
    """The longest weighting warm-up searched: MAX_WARMUP, or at most the adaptation itself
    (a warm-up as long as the adaptation blends to the end), at least one WARMUP_STEP."""
    if adaptation_steps is None:
        return MAX_WARMUP
    return max(WARMUP_STEP, min(MAX_WARMUP, adaptation_steps // WARMUP_STEP * WARMUP_STEP))


def schedule(trial, adaptation_steps: int | None = None) -> None:
    """How uniform weights blend into dynamic ones; constant has no warm-up to choose."""
    name = trial.suggest_categorical("method.weight_schedule", WEIGHT_SCHEDULES)
    if name != "constant":
        trial.suggest_int("method.weight_warmup", WARMUP_STEP, max_warmup(adaptation_steps),
                          step=WARMUP_STEP)


def gamma(trial) -> None:
    """Focus exponent of w_c = (1 - a_c)^gamma; 1 is the default, so the range centres on it."""
    trial.suggest_float("method.weight_gamma", 0.25, 4.0, log=True)


def weights(trial, adaptation_steps: int | None = None) -> None:
    """The whole re-weighting: its score, then (unless uniform) exponent, EMA and schedule."""
    mode = trial.suggest_categorical("method.weight_mode", ("iou", "confidence", "uniform"))
    if mode == "uniform":  # uniform ignores every other weighting knob
        return
    gamma(trial)
    trial.suggest_categorical("method.weight_momentum", WEIGHT_MOMENTA)
    schedule(trial, adaptation_steps)


def half_life(momentum: float) -> float:
    """Steps after which an EMA with this momentum keeps half the weight of its old value."""
    return math.log(0.5) / math.log(momentum)


def teacher_momenta(adaptation_steps: int | None) -> tuple[float, ...]:
    """The momenta whose half-life fits the preset's adaptation (all of them when unknown);
    at least the two fastest, so the parameter is still searched on a very short run."""
    if adaptation_steps is None:
        return TEACHER_MOMENTA
    limit = MAX_HALF_LIFE_SHARE * adaptation_steps
    fitting = tuple(m for m in TEACHER_MOMENTA if half_life(m) <= limit)
    return fitting if len(fitting) >= 2 else TEACHER_MOMENTA[:2]


def teacher(trial, adaptation_steps: int | None = None) -> None:
    """Mean-teacher momentum, 0.98-0.9999, cut to what the preset's adaptation steps allow."""
    trial.suggest_categorical("method.ema_momentum", teacher_momenta(adaptation_steps))
