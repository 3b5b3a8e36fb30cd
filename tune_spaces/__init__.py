"""Search spaces for ``tune.py``: one module per space, found by name.

A space module defines DESCRIPTION, NUM_SAMPLES, GRACE_PERIOD and ``define(trial)`` (METRIC,
MODE and REDUCTION_FACTOR default to val/mIoU, max and 2), an Optuna define-by-run function whose parameter
names are dotted config keys, so a sampled dict goes straight into ``Config.with_overrides``.
Modules whose names start with ``_`` hold shared pieces and are not spaces.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import pkgutil
from collections.abc import Callable

import optuna

from t2sda.config import ConfigError

_ABSENT = object()  # stands for "not drawn" beside real categorical values


@dataclasses.dataclass(frozen=True)
class Space:
    name: str
    description: str
    metric: str
    mode: str
    num_samples: int
    grace_period: int
    reduction_factor: int
    define: Callable[[optuna.Trial], None]


def available() -> list[str]:
    """Space names, read from the package so a new file is a new space with no registry."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def load(name: str, *, adaptation_steps: int | None = None) -> Space:
    """The space ``name``; ``adaptation_steps`` (the preset's train.iters - self_training_start)
    lets ranges that depend on the run's length (the teacher's momentum) fit it."""
    names = available()
    if name not in names:
        raise ConfigError(f"unknown search space {name!r} (available: {', '.join(names)})")
    module = importlib.import_module(f"{__name__}.{name}")
    return Space(
        name=name,
        description=module.DESCRIPTION,
        metric=getattr(module, "METRIC", "val/mIoU"),
        mode=getattr(module, "MODE", "max"),
        num_samples=module.NUM_SAMPLES,
        grace_period=module.GRACE_PERIOD,
        reduction_factor=getattr(module, "REDUCTION_FACTOR", 2),
        define=functools.partial(module.define, adaptation_steps=adaptation_steps),
    )


def draw(space: Space, n: int, *, seed: int = 0) -> list[optuna.Trial]:
    """``n`` random trials of one in-memory study: values plus the distributions they came from."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "new study created" line per call
    try:
        study = optuna.create_study(
            direction="maximize" if space.mode == "max" else "minimize",
            sampler=optuna.samplers.RandomSampler(seed=seed),
        )
    finally:
        optuna.logging.set_verbosity(verbosity)
    drawn = []
    for _ in range(n):
        trial = study.ask()
        space.define(trial)
        drawn.append(trial)
    return drawn


def sample(space: Space, seed: int) -> dict:
    """One parameter dict, for tests and dry runs without Ray."""
    return dict(draw(space, 1, seed=seed)[0].params)


def describe(space: Space, *, draws: int = 200, first_rung: int | None = None) -> str:
    """The parameters and their ranges, read off sampled trials so it cannot drift from define();
    ``first_rung``: the step of ASHA's first rung on the preset (else the space's grace)."""
    trials = draw(space, draws)
    asha = (f"ASHA first rung at step {first_rung}" if first_rung is not None
            else f"ASHA grace {space.grace_period} steps")
    lines = [
        f"{space.name}: {space.description}",
        f"  {space.metric} ({space.mode}), {space.num_samples} trials, "
        f"{asha}, reduction {space.reduction_factor}",
    ]
    for name in _define_order(trials):
        dist = next(trial.distributions[name] for trial in trials if name in trial.params)
        lines.append(f"  {name:<28} {_range(dist)}{_condition(name, trials)}")
    return "\n".join(lines)


def _define_order(trials: list[optuna.Trial]) -> list[str]:
    """Every name once, in define() order: a conditional name goes right after its predecessor."""
    names: list[str] = []
    for trial in trials:
        previous = -1
        for name in trial.params:
            if name not in names:
                names.insert(previous + 1, name)
            previous = names.index(name)
    return names


def _range(dist: optuna.distributions.BaseDistribution) -> str:
    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        return "one of " + ", ".join(map(str, dist.choices))
    kind = "int" if isinstance(dist, optuna.distributions.IntDistribution) else "float"
    scale = "log" if dist.log else f"step {dist.step:g}" if dist.step not in (None, 1) else "uniform"
    return f"{kind} {dist.low:g}..{dist.high:g} ({scale})"


def _condition(name: str, trials: list[optuna.Trial]) -> str:
    """When a conditional parameter is drawn: the first categorical whose values tell it apart."""
    having = [t for t in trials if name in t.params]
    if len(having) == len(trials):
        return ""
    lacking = [t for t in trials if name not in t.params]
    for other, dist in having[0].distributions.items():
        if other == name or not isinstance(dist, optuna.distributions.CategoricalDistribution):
            continue
        if not all(other in t.params for t in having):
            continue
        with_values = {t.params[other] for t in having}
        if with_values.isdisjoint(t.params.get(other, _ABSENT) for t in lacking):
            shown = [str(c) for c in dist.choices if c in with_values]
            return f"  (only when {other} is {' or '.join(shown)})"
    return "  (conditional)"

