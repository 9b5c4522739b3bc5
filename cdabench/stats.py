"""The statistics of a leaderboard: mean ± std over seeds, paired differences with a 95 %
t-interval, and Kendall's tau-b between rankings. Plain functions, checked against hand
computations in tests/test_stats.py."""
from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations

from scipy import stats as _scipy_stats


def mean(values: list[float]) -> float:
    """The mean of an exactly rounded sum (math.fsum): the same float in any order and on every
    Python. Built-in sum() rounds at every step, and Python 3.12 changed how (compensated
    summation), so four seeds' accuracies averaging exactly 83.75 printed 83.7 on 3.11 and 83.8 on
    3.12 (tests/results/test_leaderboard_determinism.py)."""
    return math.fsum(values) / len(values)


def std(values: list[float]) -> float:
    """Sample standard deviation (n - 1); 0 for a single value. Exactly rounded sums, as `mean`."""
    if len(values) < 2:
        return 0.0
    m = mean(values)
    return math.sqrt(math.fsum((v - m) ** 2 for v in values) / (len(values) - 1))


# The fewest values (seeds) an interval is computed from. With two, Student's t has one degree of
# freedom (t = 12.7 at 95 %): a seed-to-seed spread of a few points gives an interval of +-70 points,
# which says nothing; from three on (t = 4.3, 3.2, 2.8, ...) the width follows the spread.
MIN_INTERVAL_VALUES = 3


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float | None      # None: too few values for an interval (fewer than MIN_INTERVAL_VALUES)
    high: float | None
    n: int

    @property
    def half_width(self) -> float | None:
        return None if self.low is None else (self.high - self.low) / 2

    def __str__(self) -> str:
        if self.low is None:
            return f"{self.mean:+.1f}, n/a ({self.n} seed{'' if self.n == 1 else 's'})"
        return f"{self.mean:+.1f} [{self.low:+.1f}, {self.high:+.1f}]"


def t_interval(values: list[float], confidence: float = 0.95, min_values: int = MIN_INTERVAL_VALUES) -> Interval:
    """Mean with a two-sided Student-t confidence interval; no interval (low = high = None) from
    fewer than `min_values` values."""
    n = len(values)
    m = mean(values)
    if n < max(2, min_values):
        return Interval(m, None, None, n)
    half = _scipy_stats.t.ppf(0.5 + confidence / 2, n - 1) * std(values) / math.sqrt(n)
    return Interval(m, m - half, m + half, n)


def paired_difference(a: dict, b: dict, confidence: float = 0.95) -> Interval | None:
    """a − b over the keys (seeds) both have, with a t-interval on the paired differences."""
    keys = sorted(set(a) & set(b))
    if not keys:
        return None
    return t_interval([a[k] - b[k] for k in keys], confidence)


def kendall_tau(x: list[float], y: list[float]) -> float:
    """Kendall's tau-b (ties in either ranking corrected for); nan when a ranking is all ties."""
    if len(x) != len(y):
        raise ValueError("kendall_tau needs two rankings of the same items")
    concordant = discordant = ties_x = ties_y = 0
    for i, j in combinations(range(len(x)), 2):
        dx, dy = x[i] - x[j], y[i] - y[j]
        if dx == 0 and dy == 0:
            continue
        if dx == 0:
            ties_x += 1
        elif dy == 0:
            ties_y += 1
        elif (dx > 0) == (dy > 0):
            concordant += 1
        else:
            discordant += 1
    denominator = math.sqrt((concordant + discordant + ties_x) * (concordant + discordant + ties_y))
    return (concordant - discordant) / denominator if denominator else float("nan")


def mean_pairwise_tau(rankings: dict[str, list[float]]) -> tuple[float, dict[tuple[str, str], float]]:
    """Agreement of the method rankings across students: tau for each pair of students, and its mean."""
    pairs = {(a, b): kendall_tau(rankings[a], rankings[b]) for a, b in combinations(sorted(rankings), 2)}
    finite = [t for t in pairs.values() if not math.isnan(t)]
    return (mean(finite) if finite else float("nan")), pairs
