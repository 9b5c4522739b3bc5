"""Statistics against hand computations."""
from __future__ import annotations

import math

import pytest

from cdabench import stats


def test_mean_std():
    assert stats.mean([1.0, 2.0, 6.0]) == 3.0
    # sample std: sqrt(((1-3)^2 + (2-3)^2 + (6-3)^2) / 2) = sqrt(7)
    assert stats.std([1.0, 2.0, 6.0]) == pytest.approx(math.sqrt(7.0))
    assert stats.std([5.0]) == 0.0


def test_t_interval_by_hand():
    values = [1.0, 2.0, 6.0]
    # t_{0.975, 2} = 4.302652729911275; half width = t * sqrt(7) / sqrt(3)
    half = 4.302652729911275 * math.sqrt(7.0) / math.sqrt(3.0)
    interval = stats.t_interval(values)
    assert interval.mean == 3.0
    assert interval.low == pytest.approx(3.0 - half)
    assert interval.high == pytest.approx(3.0 + half)
    single = stats.t_interval([4.0])
    assert single.low is None and single.n == 1
    assert str(single) == "+4.0, n/a (1 seed)"


def test_two_values_give_no_interval():
    # t_{0.975, 1} = 12.7: two seeds 2 points apart would give [-13.7, +17.7], which says nothing
    pair = stats.t_interval([1.0, 3.0])
    assert (pair.mean, pair.low, pair.high, pair.n) == (2.0, None, None, 2)
    assert str(pair) == "+2.0, n/a (2 seeds)"
    assert stats.t_interval([1.0, 3.0], min_values=2).half_width == pytest.approx(12.706204736174707 * math.sqrt(2) / math.sqrt(2))


def test_paired_difference_uses_common_seeds_only():
    a = {0: 90.0, 1: 92.0, 2: 50.0}
    b = {0: 88.0, 1: 91.0}
    a = {0: 90.0, 1: 92.0, 2: 50.0, 3: 70.0}
    b = {0: 88.0, 1: 91.0, 3: 64.0, 4: 10.0}
    diff = stats.paired_difference(a, b)
    # seeds 0, 1, 3: differences 2, 1, 6: mean 3, sd sqrt(7), t_{0.975,2} = 4.302652729911275
    half = 4.302652729911275 * math.sqrt(7.0) / math.sqrt(3.0)
    assert diff.mean == pytest.approx(3.0) and diff.n == 3
    assert diff.low == pytest.approx(3.0 - half) and diff.high == pytest.approx(3.0 + half)
    assert stats.paired_difference({0: 1.0}, {1: 1.0}) is None


def test_kendall_tau_by_hand():
    assert stats.kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert stats.kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    # x = [1, 2, 3, 4], y = [1, 3, 2, 4]: pairs (6): one discordant (2,3) -> (5 - 1) / 6
    assert stats.kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)
    # tau-b with a tie in y: x = [1, 2, 3], y = [1, 1, 2]: C = 2, D = 0, ties_y = 1
    # tau_b = 2 / sqrt((2 + 0 + 0) * (2 + 0 + 1)) = 2 / sqrt(6)
    assert stats.kendall_tau([1, 2, 3], [1, 1, 2]) == pytest.approx(2 / math.sqrt(6))
    assert math.isnan(stats.kendall_tau([1, 1], [1, 1]))


def test_kendall_tau_matches_scipy():
    from scipy.stats import kendalltau
    x, y = [3.0, 1.0, 4.0, 1.5, 5.0, 9.0], [2.0, 7.0, 1.0, 8.0, 2.5, 8.5]
    assert stats.kendall_tau(x, y) == pytest.approx(kendalltau(x, y).statistic)


def test_mean_pairwise_tau():
    mean_tau, pairs = stats.mean_pairwise_tau({"a": [1, 2, 3], "b": [1, 2, 3], "c": [3, 2, 1]})
    assert pairs[("a", "b")] == 1.0 and pairs[("a", "c")] == -1.0 and pairs[("b", "c")] == -1.0
    assert mean_tau == pytest.approx(-1 / 3)
