"""Approval statistics: how sure are we that users approve more answers after a change than before?

Pure functions (the standard library only), used by `perennial simulate-users` and `benchmarks/loop.py`:

- `wilson_interval(k, n)`: the Wilson score interval of a proportion (good with small n and rates near 0 or 1,
  where the textbook "p ± 1.96·se" interval collapses or leaves [0, 1]);
- `newcombe_interval(k_before, n_before, k_after, n_after)`: an interval for the difference after - before,
  Newcombe's hybrid score method (method 10 of Newcombe 1998) built from the two Wilson intervals;
- `two_proportion_test(...)`: the pooled two-proportion z-test (= Pearson's chi-square without continuity
  correction, R's `prop.test(correct = FALSE)`), two-sided and one-sided ("after is higher") p-values;
- `compare(before, after)`: all of the above for one before/after pair, with a one-line summary naming both
  sample sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

DEFAULT_CONFIDENCE = 0.95
#: one-sided level below which `compare` calls a difference significant
DEFAULT_ALPHA = 0.05


def _check(k: int, n: int) -> None:
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"a proportion needs 0 <= k <= n (got k={k}, n={n})")


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1 exclusive (got {confidence})")
    return NormalDist().inv_cdf(0.5 + confidence / 2.0)


def normal_sf(z: float) -> float:
    """P(Z > z) for a standard normal Z (accurate in the far tail, unlike 1 - cdf)."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def wilson_interval(k: int, n: int, confidence: float = DEFAULT_CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of the proportion k/n; (0, 1) when n is 0 (nothing is known)."""
    _check(k, n)
    z = _z(confidence)
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    lo, hi = centre - half, centre + half
    # exact ends at k = 0 and k = n (rounding would leave 1e-17 or 0.9999999999999999)
    return (0.0 if k == 0 else max(0.0, lo), 1.0 if k == n else min(1.0, hi))


def newcombe_interval(k_before: int, n_before: int, k_after: int, n_after: int,
                      confidence: float = DEFAULT_CONFIDENCE) -> tuple[float, float]:
    """Interval for p_after - p_before (Newcombe's hybrid score interval, no continuity correction)."""
    l1, u1 = wilson_interval(k_after, n_after, confidence)
    l2, u2 = wilson_interval(k_before, n_before, confidence)
    p1 = k_after / n_after if n_after else 0.0
    p2 = k_before / n_before if n_before else 0.0
    d = p1 - p2
    lo = d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    hi = d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return (max(-1.0, lo), min(1.0, hi))


@dataclass(frozen=True)
class TestResult:
    """The pooled two-proportion z-test of after vs before."""

    z: float
    p_two_sided: float
    #: one-sided: the evidence that `after` is higher than `before`
    p_greater: float

    @property
    def p_less(self) -> float:
        return normal_sf(-self.z)


def two_proportion_test(k_before: int, n_before: int, k_after: int, n_after: int) -> TestResult:
    """Pooled two-proportion z-test (the normal approximation; fine from about 5 successes and 5 failures a side,
    rough below). Both samples must be non-empty; with no variance at all (every answer approved, or none) there
    is no evidence either way: z = 0."""
    _check(k_before, n_before)
    _check(k_after, n_after)
    if n_before == 0 or n_after == 0:
        raise ValueError("a two-proportion test needs both samples non-empty "
                         f"(before n={n_before}, after n={n_after})")
    pooled = (k_before + k_after) / (n_before + n_after)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n_before + 1 / n_after))
    z = 0.0 if se == 0 else (k_after / n_after - k_before / n_before) / se
    return TestResult(z=z, p_two_sided=min(1.0, 2 * normal_sf(abs(z))), p_greater=normal_sf(z))


@dataclass(frozen=True)
class Proportion:
    """k approvals out of n answers."""

    k: int
    n: int

    def __post_init__(self) -> None:
        _check(self.k, self.n)

    @property
    def rate(self) -> float | None:
        return self.k / self.n if self.n else None

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.k, self.n)

    def format(self) -> str:
        """`0.750 [0.301, 0.954] n=4` (rate, Wilson 95% interval, sample size); `- n=0` without data."""
        if not self.n:
            return "- n=0"
        lo, hi = self.interval
        return f"{self.rate:.3f} [{lo:.3f}, {hi:.3f}] n={self.n}"


@dataclass(frozen=True)
class Comparison:
    before: Proportion
    after: Proportion
    confidence: float = DEFAULT_CONFIDENCE
    alpha: float = DEFAULT_ALPHA

    @property
    def difference(self) -> float | None:
        if self.before.rate is None or self.after.rate is None:
            return None
        return self.after.rate - self.before.rate

    @property
    def difference_interval(self) -> tuple[float, float] | None:
        if not self.before.n or not self.after.n:
            return None
        return newcombe_interval(self.before.k, self.before.n, self.after.k, self.after.n, self.confidence)

    @property
    def test(self) -> TestResult | None:
        if not self.before.n or not self.after.n:
            return None
        return two_proportion_test(self.before.k, self.before.n, self.after.k, self.after.n)

    @property
    def verdict(self) -> str:
        """`higher` / `lower` (one-sided p below alpha), `not significant`, or `no data`."""
        t = self.test
        if t is None:
            return "no data"
        if t.p_greater < self.alpha:
            return "higher"
        if t.p_less < self.alpha:
            return "lower"
        return "not significant"

    def format(self) -> str:
        text = f"before {self.before.format()} -> after {self.after.format()}"
        d, di, t = self.difference, self.difference_interval, self.test
        if d is None or di is None or t is None:
            return text + ": no comparison (a side has no answers)"
        return (f"{text}: difference {d:+.3f} [{di[0]:+.3f}, {di[1]:+.3f}], z={t.z:.2f}, "
                f"p(after > before)={t.p_greater:.3g}, two-sided p={t.p_two_sided:.3g}: {self.verdict}")

    def to_dict(self) -> dict:
        di, t = self.difference_interval, self.test
        return {
            "before": {"approved": self.before.k, "n": self.before.n, "rate": self.before.rate, "interval": list(self.before.interval)},
            "after": {"approved": self.after.k, "n": self.after.n, "rate": self.after.rate, "interval": list(self.after.interval)},
            "difference": self.difference,
            "differenceInterval": list(di) if di else None,
            "z": t.z if t else None,
            "pGreater": t.p_greater if t else None,
            "pTwoSided": t.p_two_sided if t else None,
            "confidence": self.confidence,
            "verdict": self.verdict,
        }


def compare(before: Proportion, after: Proportion, confidence: float = DEFAULT_CONFIDENCE,
            alpha: float = DEFAULT_ALPHA) -> Comparison:
    """Approval before vs after: both rates with Wilson intervals and sample sizes, the difference with Newcombe's
    interval, the two-proportion z-test and a verdict at one-sided `alpha`."""
    _z(confidence)
    return Comparison(before, after, confidence, alpha)
