"""The statistics of an ablation: per arm a mean over seeds with its t interval, and per arm its
paired difference to ``uniform`` (same seed, same data order), with the verdict a reader can
trust: "not distinguishable" whenever the interval covers 0, and how many seeds the observed
spread would need for the difference to show."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` values and its two-sided t interval at :data:`LEVEL` (NaN bounds for
    n < 2: one value has no spread)."""

    mean: float
    low: float
    high: float
    n: int
    sd: float

    @property
    def covers_zero(self) -> bool:
        return not (self.low > 0 or self.high < 0)


def t_interval(values: list[float] | np.ndarray, level: float = LEVEL) -> Interval:
    """The mean of ``values`` and mean +- t_{(1+level)/2, n-1} sd / sqrt(n)."""
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, math.nan)
    mean = float(x.mean())
    if n < 2:
        return Interval(mean, math.nan, math.nan, 1, math.nan)
    sd = float(x.std(ddof=1))
    half = float(stats.t.ppf((1 + level) / 2, n - 1)) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, sd)


def seeds_needed(mean: float, sd: float, level: float = LEVEL, limit: int = 10_000) -> int | None:
    """The smallest n whose t interval, with this spread, would exclude 0 for a difference of
    this size: t_{n-1} sd / sqrt(n) < |mean|. None when no spread or no difference."""
    if not (math.isfinite(mean) and math.isfinite(sd)) or mean == 0 or sd == 0:
        return None
    for n in range(2, limit + 1):
        if float(stats.t.ppf((1 + level) / 2, n - 1)) * sd / math.sqrt(n) < abs(mean):
            return n
    return None


def verdict(arm: str, diff: Interval, metric: str, lower_is_better: bool = True) -> str:
    """One sentence on ``arm`` against uniform from the paired differences (arm - uniform)."""
    if diff.n == 0:
        return (f"{arm} vs uniform: no pair to compare (no seed where both have a finished "
                "run)")  # fmt: skip
    if diff.n < 2:
        return (f"{arm} vs uniform: one paired seed, no interval: run at least 2 seeds "
                "(--seeds)")  # fmt: skip
    where = (
        f"{diff.mean:+.4g} {metric} (95% CI {diff.low:+.4g} to {diff.high:+.4g}, {diff.n} seeds)"
    )
    if diff.covers_zero:
        need = seeds_needed(diff.mean, diff.sd)
        more = (
            f"; with this spread about {need} seeds would tell a difference this size"
            if need is not None
            else ""
        )
        return f"{arm} vs uniform: not distinguishable with {diff.n} seeds: {where}{more}"
    better = (diff.mean < 0) == lower_is_better
    return f"{arm} vs uniform: {'better' if better else 'worse'} than uniform: {where}"
