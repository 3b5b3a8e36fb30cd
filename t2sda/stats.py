"""Seed statistics for comparing configs: is a difference beyond seed noise?

A config trained with n seeds gives n values. ``describe`` gives their mean, spread and a
t interval of the mean; ``paired`` compares two configs trained with the *same* seeds (the
per-seed differences carry far less noise than either config alone, because a seed's data
order and initialisation move both the same way), ``unpaired`` compares two independent
samples (Welch). The paired t-test decides a verdict; the Wilcoxon signed-rank and sign tests
are reported beside it as checks that assume no normality, but with fewer than 6 pairs no
two-sided rank test can reach p < 0.05, so they cannot decide at the seed counts a search
affords. No torch, no Ray: scipy only.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import stats as st


class StatsError(ValueError):
    """Too few or unusable values for a statistic: one line naming what is missing."""


@dataclasses.dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    std: float  # sample standard deviation (n - 1)
    ci_low: float
    ci_high: float


@dataclasses.dataclass(frozen=True)
class Difference:
    """a - b: its mean, the interval of that mean, and the tests' p-values (two-sided)."""

    n: int  # pairs (paired) or n_a + n_b (unpaired)
    paired: bool
    mean: float
    std: float  # of the per-seed differences (paired); the standard error x sqrt(n) otherwise
    ci_low: float
    ci_high: float
    p_t: float  # paired t-test (ttest_rel) or Welch's t-test: decides
    p_wilcoxon: float | None = None  # signed-rank, exact for small n (paired only)
    p_sign: float | None = None  # sign test: binomial on the signs (paired only)
    confidence: float = 0.95


def _values(values, what: str) -> np.ndarray:
    x = np.asarray(list(values), dtype=np.float64)
    if x.ndim != 1 or not np.isfinite(x).all():
        raise StatsError(f"{what}: values must be finite numbers, got {list(values)!r}")
    if len(x) < 2:
        raise StatsError(f"{what}: needs at least 2 seeds for a spread, got {len(x)}")
    return x


def _t_interval(mean: float, se: float, df: float, confidence: float) -> tuple[float, float]:
    if se == 0:
        return mean, mean
    half = st.t.ppf(0.5 + confidence / 2, df) * se
    return mean - half, mean + half


def describe(values, *, confidence: float = 0.95, what: str = "values") -> Summary:
    """Mean, sample std and the t interval of the mean of one config's seeds."""
    x = _values(values, what)
    mean, std = float(x.mean()), float(x.std(ddof=1))
    low, high = _t_interval(mean, std / math.sqrt(len(x)), len(x) - 1, confidence)
    return Summary(len(x), mean, std, float(low), float(high))


def paired(a, b, *, confidence: float = 0.95, what: str = "paired seeds") -> Difference:
    """a[i] - b[i] over seeds i trained alike for both configs: mean, t interval, p-values."""
    a, b = _values(a, what), _values(b, what)
    if len(a) != len(b):
        raise StatsError(f"{what}: {len(a)} values against {len(b)}; pairing needs the same seeds")
    d = a - b
    n, mean, std = len(d), float(d.mean()), float(d.std(ddof=1))
    low, high = _t_interval(mean, std / math.sqrt(n), n - 1, confidence)
    if std == 0:  # every seed moved by exactly the same amount: no noise to test against
        p_t = 1.0 if mean == 0 else 0.0
    else:
        p_t = float(st.ttest_rel(a, b).pvalue)
    nonzero = d[d != 0]
    p_w = float(st.wilcoxon(nonzero).pvalue) if len(nonzero) else 1.0
    wins = int((nonzero > 0).sum())
    p_s = float(st.binomtest(wins, len(nonzero)).pvalue) if len(nonzero) else 1.0
    return Difference(n, True, mean, std, float(low), float(high), p_t, p_w, p_s, confidence)


def unpaired(a, b, *, confidence: float = 0.95, what: str = "unpaired seeds") -> Difference:
    """mean(a) - mean(b) for independent samples (Welch: unequal variances)."""
    a, b = _values(a, what), _values(b, what)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    mean, se = float(a.mean() - b.mean()), math.sqrt(va + vb)
    if se == 0:
        return Difference(len(a) + len(b), False, mean, 0.0, mean, mean,
                          1.0 if mean == 0 else 0.0, confidence=confidence)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    low, high = _t_interval(mean, se, df, confidence)
    p = float(st.ttest_ind(a, b, equal_var=False).pvalue)
    return Difference(len(a) + len(b), False, mean, se * math.sqrt(len(a) + len(b)), float(low),
                      float(high), p, confidence=confidence)


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjustment for several configs compared against one default."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    adjusted, running = [0.0] * len(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def smallest_significant(std_diff: float, n: int, *, confidence: float = 0.95) -> float:
    """The smallest mean paired difference that ``n`` seeds with this per-seed spread would call
    significant: the half-width of the t interval, t(n-1) * s / sqrt(n)."""
    if n < 2:
        raise StatsError(f"smallest significant difference: needs at least 2 seeds, got {n}")
    return float(st.t.ppf(0.5 + confidence / 2, n - 1) * std_diff / math.sqrt(n))


def verdict(diff: Difference, *, mode: str = "max", alpha: float | None = None,
            p: float | None = None) -> str:
    """'better', 'worse' or 'no difference' for config a against b, where ``mode`` says which
    direction of the metric is good. Decided by the t-test: its interval excludes 0
    (equivalently p_t < 1 - confidence), or by ``p`` (e.g. Holm-adjusted) against ``alpha``."""
    alpha = 1 - diff.confidence if alpha is None else alpha
    p = diff.p_t if p is None else p
    if p >= alpha or diff.mean == 0:
        return "no difference"
    up = diff.mean > 0
    return "better" if up == (mode == "max") else "worse"
