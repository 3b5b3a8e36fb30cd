"""t2sda.stats against scipy.stats and hand arithmetic on constructed numbers."""

import math

import numpy as np
import pytest
from scipy import stats as st

from t2sda import stats


def test_describe_is_the_t_interval_of_the_mean():
    x = [50.1, 51.3, 49.2, 52.0]
    s = stats.describe(x)
    ref = st.t.interval(0.95, len(x) - 1, loc=np.mean(x), scale=st.sem(x))
    assert (s.n, s.mean, s.std) == (4, pytest.approx(np.mean(x)), pytest.approx(np.std(x, ddof=1)))
    assert (s.ci_low, s.ci_high) == (pytest.approx(ref[0]), pytest.approx(ref[1]))
    wide = stats.describe(x, confidence=0.99)
    assert wide.ci_low < s.ci_low and wide.ci_high > s.ci_high


def test_paired_matches_scipy_and_sees_what_unpaired_cannot():
    # Seeds move both configs together (+-2); the config adds +0.6 to every seed, +-0.1.
    seed_effect = np.array([-2.0, 0.5, 2.1])
    a = 50 + seed_effect + np.array([0.7, 0.5, 0.6])
    b = 50 + seed_effect
    d = stats.paired(a, b)
    ref = st.ttest_rel(a, b)
    assert d.paired and d.n == 3
    assert d.mean == pytest.approx(0.6)
    assert d.p_t == pytest.approx(ref.pvalue)
    ci = ref.confidence_interval(0.95)
    assert (d.ci_low, d.ci_high) == (pytest.approx(ci.low), pytest.approx(ci.high))
    assert d.p_wilcoxon == pytest.approx(st.wilcoxon(a - b).pvalue)
    assert d.p_sign == pytest.approx(st.binomtest(3, 3).pvalue) == pytest.approx(0.25)
    assert stats.verdict(d) == "better" and d.ci_low > 0
    # The same numbers as independent samples: the seed spread swamps the +0.6.
    u = stats.unpaired(a, b)
    welch = st.ttest_ind(a, b, equal_var=False)
    assert not u.paired and u.p_t == pytest.approx(welch.pvalue)
    wci = welch.confidence_interval(0.95)
    assert (u.ci_low, u.ci_high) == (pytest.approx(wci.low), pytest.approx(wci.high))
    assert stats.verdict(u) == "no difference" and u.ci_low < 0 < u.ci_high


def test_verdict_follows_the_metric_direction_and_the_given_p():
    a, b = [40.0, 41.0, 39.5], [43.0, 44.2, 42.4]
    d = stats.paired(a, b)
    assert stats.verdict(d, mode="max") == "worse"
    assert stats.verdict(d, mode="min") == "better"  # e.g. entropy: lower is better
    assert stats.verdict(d, p=0.2) == "no difference"
    noise = stats.paired([50.0, 49.0, 51.0], [49.5, 50.0, 50.6])
    assert stats.verdict(noise) == "no difference"


def test_constant_differences_and_ties():
    same = stats.paired([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert (same.mean, same.p_t, same.p_wilcoxon, same.ci_low, same.ci_high) == (0, 1.0, 1.0, 0, 0)
    assert stats.verdict(same) == "no difference"
    shifted = stats.paired([2.0, 3.0, 4.0], [1.0, 2.0, 3.0])  # +1 on every seed, no spread
    assert shifted.p_t == 0.0 and stats.verdict(shifted) == "better"


def test_one_seed_or_mismatched_seeds_are_refused_with_one_line():
    with pytest.raises(stats.StatsError, match="at least 2 seeds for a spread, got 1"):
        stats.describe([50.0])
    with pytest.raises(stats.StatsError, match="at least 2 seeds for a spread, got 1"):
        stats.paired([50.0], [49.0])
    with pytest.raises(stats.StatsError, match="3 values against 2"):
        stats.paired([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(stats.StatsError, match="finite"):
        stats.describe([1.0, math.nan])
    with pytest.raises(stats.StatsError, match="got 1"):
        stats.smallest_significant(1.0, 1)


def test_holm_and_the_smallest_significant_difference():
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert stats.holm([0.5]) == [0.5]
    # 3 seeds, per-seed spread 1.0: t(2, 0.975) / sqrt(3) = 2.48
    assert stats.smallest_significant(1.0, 3) == pytest.approx(st.t.ppf(0.975, 2) / math.sqrt(3))
    # that difference is the edge of significance: just above it is called, just below not
    edge = stats.smallest_significant(1.0, 3)
    for scale, called in ((1.01, "better"), (0.99, "no difference")):
        d = stats.paired(np.array([-1.0, 0.0, 1.0]) + edge * scale, [0.0, 0.0, 0.0])
        assert d.std == pytest.approx(1.0) and stats.verdict(d) == called
