"""Statistics of the multi-seed demo: 95 % intervals of a mean and of paired differences, and verdicts.

A demo run trains every method once per seed; within a seed the methods share the training sample, its order
and the adapter initialisation, so the difference of two methods on one seed is a *paired* observation. The
comparison of method A with method B is the mean over seeds of d_s = metric(A, s) − metric(B, s), with

* a Student-t interval (default): mean ± t_{0.975, n−1} · sd / √n, exact for normally distributed d_s. With
  three seeds t_{0.975, 2} = 4.303, so a difference is called only when it is consistent across seeds;
* or a paired bootstrap percentile interval (``--interval bootstrap``): the mean of n differences resampled with
  replacement, 10,000 times. Its interval never leaves the range of the observed differences, which for
  n = 3 covers the true mean with probability at most 1 − 2·(1/2)³ = 75 % (all three on one side is 25 %):
  use it with 10 or more seeds.

A verdict names a winner only when the interval excludes zero; otherwise it says the difference is not
significant at this size. One seed gives no interval and no verdict. The seeds are the only source of variation
the interval covers: the held-out set is the same for every seed (its sampling error is not in the interval).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

LEVEL = 0.95
INTERVALS = ("t", "bootstrap")
BOOTSTRAP_RESAMPLES = 10_000


# ---------------------------------------------------------------------------------------------- Student t
def t_cdf_two_sided(t: float, df: int) -> float:
    """P(|T| ≤ t) for Student's t with integer ``df`` ≥ 1 (closed form, Abramowitz & Stegun 26.7.3–4)."""
    if df < 1 or int(df) != df:
        raise ValueError(f"df={df!r}: the closed form needs an integer number of degrees of freedom >= 1.")
    if t <= 0:
        return 0.0
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2 == 1:  # odd: (2/π)·(θ + sinθ·cosθ·[1 + 2/3·cos²θ + 2·4/(3·5)·cos⁴θ + ... up to cos^(df−3)θ])
        total, term = (1.0, 1.0) if df > 1 else (0.0, 0.0)
        for k in range(1, (df - 3) // 2 + 1):
            term *= (2 * k) / (2 * k + 1) * c2
            total += term
        return (2 / math.pi) * (theta + math.sin(theta) * math.cos(theta) * total)
    total, term = 1.0, 1.0  # even: sinθ·[1 + 1/2·cos²θ + 1·3/(2·4)·cos⁴θ + ... up to cos^(df−2)θ]
    for k in range(1, (df - 2) // 2 + 1):
        term *= (2 * k - 1) / (2 * k) * c2
        total += term
    return math.sin(theta) * total


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (0.5 < p < 1) of Student's t with integer ``df``, by bisection on the closed-form CDF."""
    if not 0.5 < p < 1:
        raise ValueError(f"p={p!r}: only upper quantiles 0.5 < p < 1 are needed here.")
    target = 2 * p - 1  # P(|T| <= q) = 2p − 1
    lo, hi = 0.0, 1.0
    while t_cdf_two_sided(hi, df) < target:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_cdf_two_sided(mid, df) < target:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    return (lo + hi) / 2


# ---------------------------------------------------------------------------------------------- intervals
@dataclass(frozen=True)
class Interval:
    """The mean of ``n`` values and its ``level`` interval [low, high] (NaN when n < 2); ``kind`` says how."""

    mean: float
    low: float
    high: float
    n: int
    kind: str
    level: float = LEVEL

    @property
    def defined(self) -> bool:
        return self.n >= 2 and math.isfinite(self.low) and math.isfinite(self.high)

    @property
    def excludes_zero(self) -> bool:
        """True when the interval lies strictly on one side of 0 (a degenerate [0, 0] does not)."""
        return self.defined and (self.low > 0 or self.high < 0)

    def to_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


def t_interval(values: Sequence[float], level: float = LEVEL) -> Interval:
    """mean ± t_{(1+level)/2, n−1} · s / √n (s the sample standard deviation, n − 1 in its denominator)."""
    values = _finite(values)
    n, mean = len(values), _mean(values)
    if n < 2:
        return Interval(mean, math.nan, math.nan, n, "t", level)
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile((1 + level) / 2, n - 1) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, "t", level)


def bootstrap_interval(
    values: Sequence[float], level: float = LEVEL, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> Interval:
    """Percentile interval of the mean over ``resamples`` resamples with replacement (deterministic by ``seed``)."""
    values = _finite(values)
    n, mean = len(values), _mean(values)
    if n < 2:
        return Interval(mean, math.nan, math.nan, n, "bootstrap", level)
    rng = random.Random(seed)
    means = sorted(_mean(rng.choices(values, k=n)) for _ in range(resamples))
    alpha = (1 - level) / 2
    return Interval(mean, _percentile(means, alpha), _percentile(means, 1 - alpha), n, "bootstrap", level)


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default ``linear`` method)."""
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _finite(values: Sequence[float]) -> list[float]:
    out = [float(v) for v in values]
    if not out:
        raise ValueError("an interval needs at least one value.")
    bad = [v for v in out if not math.isfinite(v)]
    if bad:
        raise ValueError(f"an interval needs finite values; got {bad[:3]} among {len(out)}.")
    return out


def interval(values: Sequence[float], kind: str = "t", level: float = LEVEL) -> Interval:
    """:func:`t_interval` or :func:`bootstrap_interval` of ``values`` by ``kind``."""
    if kind == "t":
        return t_interval(values, level)
    if kind == "bootstrap":
        return bootstrap_interval(values, level)
    raise ValueError(f"interval kind {kind!r} is not allowed; choose one of {', '.join(INTERVALS)}.")


def paired_differences(a: Mapping[int, float], b: Mapping[int, float]) -> list[float]:
    """a[s] − b[s] for every seed s both methods ran (in seed order)."""
    seeds = sorted(set(a) & set(b))
    return [a[s] - b[s] for s in seeds]


# ---------------------------------------------------------------------------------------------- verdicts
@dataclass(frozen=True)
class Comparison:
    """The paired difference ``method − baseline`` of one metric over seeds, and what it allows to say."""

    metric: str
    method: str
    baseline: str
    interval: Interval
    lower_is_better: bool | None  # None: a measurement without a "better" direction

    @property
    def significant(self) -> bool:
        return self.interval.excludes_zero

    def verdict(self, label: Mapping[str, str], metric_label: str, digits: int = 4) -> str:
        """One line: the difference, its interval and the verdict (a winner only when 0 is excluded)."""
        a, b = label.get(self.method, self.method), label.get(self.baseline, self.baseline)
        iv = self.interval
        head = f"{metric_label}: {a} − {b} = {iv.mean:+.{digits}g}"
        if not iv.defined:
            return f"{head} (1 seed: no interval, no verdict; use --seeds 3 or more)"
        span = (
            f"{round(100 * iv.level)} % interval [{iv.low:+.{digits}g}, {iv.high:+.{digits}g}], {iv.n} seeds"
        )
        if not self.significant:
            return f"{head} ({span}): not significant at this size"
        direction = "lower" if iv.high < 0 else "higher"
        if self.lower_is_better is None:
            return f"{head} ({span}): {a} {direction} than {b} (significant)"
        better = (direction == "lower") == self.lower_is_better
        return f"{head} ({span}): {a if better else b} better (significant)"

    def to_dict(self) -> dict[str, object]:
        return {
            "metric": self.metric,
            "method": self.method,
            "baseline": self.baseline,
            "lower_is_better": self.lower_is_better,
            "significant": self.significant,
            **{f"diff_{k}": v for k, v in self.interval.to_dict().items()},
        }


def compare(
    per_seed: Mapping[str, Mapping[int, float]],
    metric: str,
    method: str,
    baseline: str,
    lower_is_better: bool | None,
    kind: str = "t",
) -> Comparison:
    """The :class:`Comparison` of ``method`` with ``baseline`` from ``{method: {seed: value}}``."""
    diffs = paired_differences(per_seed[method], per_seed[baseline])
    if not diffs:
        raise ValueError(f"{method} and {baseline} share no seed; a paired comparison needs common seeds.")
    return Comparison(metric, method, baseline, interval(diffs, kind), lower_is_better)
