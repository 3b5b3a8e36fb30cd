"""Everything that varies over training, as pure functions of the step.

Each is logged to TensorBoard under ``train/`` so a run's schedule can be read off its curves.
"""

from __future__ import annotations

import math


def lr_factor(step: int, *, total: int, warmup: int, power: float) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then polynomial decay to 0 at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(total - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    return (1.0 - progress) ** power


def ema_momentum(step: int, *, momentum: float) -> float:
    """Mean-teacher momentum alpha_k = min(1 - 1/(k+1), momentum).

    ``step`` counts teacher updates; early updates copy the student almost fully so a
    randomly initialised teacher does not linger for thousands of steps.
    """
    return min(1.0 - 1.0 / (step + 1), momentum)


def ramp(step: int, *, start: int, length: int) -> float:
    """0 before ``start``, then linear to 1 over ``length`` steps (a step at 0 length)."""
    if step < start:
        return 0.0
    if length <= 0:
        return 1.0
    return min((step - start + 1) / length, 1.0)


def weight_blend(step: int, *, schedule: str, start: int, length: int) -> float:
    """How far class weights have moved from uniform (0) to dynamic (1).

    constant: dynamic from the first adaptation step; linear / cosine: ramp over ``length``
    steps; step: uniform for ``length`` steps, then dynamic at once.
    """
    if schedule == "constant":
        return 1.0
    t = ramp(step, start=start, length=length)
    if schedule == "linear":
        return t
    if schedule == "cosine":
        return 0.5 - 0.5 * math.cos(math.pi * t)
    if schedule == "step":
        return 1.0 if step >= start + length else 0.0
    raise ValueError(f"unknown weight schedule {schedule!r}")
