"""Approval statistics (perennial.stats): Wilson intervals, the difference of two proportions with Newcombe's
interval and the two-proportion z-test, checked against published values."""

from __future__ import annotations

import math

import pytest
from perennial.stats import (
    Proportion,
    compare,
    newcombe_interval,
    normal_sf,
    two_proportion_test,
    wilson_interval,
)


# Newcombe (1998), "Two-sided confidence intervals for the single proportion", Stat. Med. 17:857, Table I,
# method 3 (Wilson score, no continuity correction).
@pytest.mark.parametrize(("k", "n", "lo", "hi"), [
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0, 0.1611),
    (1, 29, 0.0061, 0.1718),
    (20, 20, 0.8389, 1.0),
    (8, 10, 0.4902, 0.9433),
])
def test_wilson_interval_matches_published_values(k: int, n: int, lo: float, hi: float) -> None:
    got = wilson_interval(k, n)
    assert got == (pytest.approx(lo, abs=5e-5), pytest.approx(hi, abs=5e-5))


def test_wilson_interval_without_data_is_everything_and_bounds_are_checked() -> None:
    assert wilson_interval(0, 0) == (0.0, 1.0)
    for k, n in [(-1, 3), (4, 3), (1, -1)]:
        with pytest.raises(ValueError):
            wilson_interval(k, n)
    with pytest.raises(ValueError):
        wilson_interval(1, 2, confidence=1.0)


def test_a_wider_confidence_gives_a_wider_interval() -> None:
    lo90, hi90 = wilson_interval(30, 100, confidence=0.90)
    lo99, hi99 = wilson_interval(30, 100, confidence=0.99)
    assert lo99 < lo90 < 0.3 < hi90 < hi99


# Newcombe (1998), "Interval estimation for the difference between independent proportions", Stat. Med.
# 17:873, Table II, method 10 (hybrid score interval from Wilson intervals, no continuity correction).
@pytest.mark.parametrize(("k1", "n1", "k2", "n2", "lo", "hi"), [
    (56, 70, 48, 80, 0.0524, 0.3339),
    (9, 10, 3, 10, 0.1705, 0.8090),
    (5, 56, 0, 29, -0.0381, 0.1926),
    (0, 10, 0, 20, -0.1611, 0.2775),
    (0, 10, 0, 10, -0.2775, 0.2775),
    (10, 10, 0, 20, 0.6791, 1.0),
    (10, 10, 0, 10, 0.6075, 1.0),
])
def test_newcombe_interval_matches_published_values(k1: int, n1: int, k2: int, n2: int, lo: float, hi: float) -> None:
    # the paper's theta is p1 - p2; ours is after - before: (before=k2/n2, after=k1/n1)
    got = newcombe_interval(k2, n2, k1, n1)
    assert got == (pytest.approx(lo, abs=5e-4), pytest.approx(hi, abs=5e-4))


def test_normal_tail() -> None:
    assert normal_sf(0.0) == pytest.approx(0.5)
    assert normal_sf(1.959964) == pytest.approx(0.025, abs=1e-6)
    assert normal_sf(-1.644854) == pytest.approx(0.95, abs=1e-6)


def chi_square_2x2(a: int, b: int, c: int, d: int) -> float:
    """Pearson's chi-square of the table [[a, b], [c, d]] by the textbook shortcut N(ad - bc)^2 / (row and column
    totals): an independent route to z^2 of the pooled two-proportion test."""
    n = a + b + c + d
    return n * (a * d - b * c) ** 2 / ((a + b) * (c + d) * (a + c) * (b + d))


def test_the_2x2_shortcut_reference() -> None:
    assert chi_square_2x2(56, 14, 48, 32) == pytest.approx(7.0234, abs=1e-4)


@pytest.mark.parametrize(("before", "after", "z", "p_two", "p_greater"), [
    # 56/70 vs 48/80: chi-square 7.0234 (1 df), p = 0.008045
    ((48, 80), (56, 70), math.sqrt(chi_square_2x2(56, 14, 48, 32)), 0.008045, 0.008045 / 2),
    ((56, 70), (48, 80), -math.sqrt(chi_square_2x2(56, 14, 48, 32)), 0.008045, 1 - 0.008045 / 2),
    # 15/50 vs 25/50: chi-square 4.1667, p = 0.04123
    ((15, 50), (25, 50), math.sqrt(chi_square_2x2(25, 25, 15, 35)), 0.04123, 0.04123 / 2),
    # no variance at all: no evidence either way
    ((10, 10), (5, 5), 0.0, 1.0, 0.5),
    ((0, 10), (0, 5), 0.0, 1.0, 0.5),
])
def test_two_proportion_test(before: tuple[int, int], after: tuple[int, int], z: float, p_two: float, p_greater: float) -> None:
    t = two_proportion_test(*before, *after)
    assert t.z == pytest.approx(z, abs=2e-4)
    assert t.p_two_sided == pytest.approx(p_two, abs=2e-5)
    assert t.p_greater == pytest.approx(p_greater, abs=2e-5)


def test_two_proportion_test_needs_both_samples() -> None:
    with pytest.raises(ValueError, match="both"):
        two_proportion_test(0, 0, 3, 4)


def test_compare_reports_both_sides_with_sizes_and_a_verdict() -> None:
    c = compare(Proportion(20, 100), Proportion(80, 100))
    assert c.difference == pytest.approx(0.6)
    assert c.before.interval[1] < c.after.interval[0]
    assert c.difference_interval[0] > 0
    assert c.test is not None and c.test.p_greater < 1e-6
    assert c.verdict == "higher"
    text = c.format()
    assert "n=100" in text and "0.200" in text and "0.800" in text and "+0.600" in text
    assert compare(Proportion(40, 100), Proportion(45, 100)).verdict == "not significant"
    assert compare(Proportion(80, 100), Proportion(20, 100)).verdict == "lower"
    empty = compare(Proportion(0, 0), Proportion(5, 10))
    assert empty.test is None and empty.verdict == "no data" and "n=0" in empty.format()


def test_proportion_rate_and_validation() -> None:
    assert Proportion(3, 4).rate == 0.75
    assert Proportion(0, 0).rate is None
    with pytest.raises(ValueError):
        Proportion(5, 4)
    assert Proportion(3, 4).format() == "0.750 [0.301, 0.954] n=4"
