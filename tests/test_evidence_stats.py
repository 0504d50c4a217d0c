"""The paired statistics of the evidence experiments, against values worked out by hand."""

from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as scipy_stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.evidence import stats  # noqa: E402


def _brute_force_sign_flip(diffs: list[float]) -> float:
    observed = abs(sum(diffs))
    hits = total = 0
    for signs in itertools.product((1.0, -1.0), repeat=len(diffs)):
        total += 1
        hits += abs(sum(s * d for s, d in zip(signs, diffs))) >= observed - 1e-12
    return hits / total


def test_sign_flip_of_ten_positive_differences_is_two_in_1024():
    p, exact = stats.sign_flip_p([0.5] * 10)
    assert exact
    assert p == 2 / 1024


@pytest.mark.parametrize(
    ("diffs", "expected"),
    [
        ([1.0, 2.0, 3.0], 2 / 8),  # only the all-plus and all-minus patterns reach |6|
        ([1.0, -1.0, 2.0], 6 / 8),  # |sum| >= 2 for six of the eight patterns
        ([0.0, 0.0, 0.0], 1.0),  # zeros do not change under a flip
        ([0.3], 1.0),
    ],
)
def test_sign_flip_small_cases(diffs, expected):
    assert stats.sign_flip_p(diffs) == (pytest.approx(expected), True)


def test_sign_flip_matches_brute_force_enumeration():
    rng = np.random.default_rng(0)
    for n in (2, 5, 9):
        diffs = list(rng.normal(0.2, 1.0, size=n).round(3))
        assert stats.sign_flip_p(diffs)[0] == pytest.approx(_brute_force_sign_flip(diffs))


def test_sign_flip_counts_patterns_equal_to_the_observed_sum_despite_rounding():
    # 0.1 + 0.2 != 0.3 in floating point; the pattern (+0.1, +0.2, -0.3) sums to 0 either way,
    # and the all-plus pattern must count as reaching the observed statistic.
    p, _ = stats.sign_flip_p([0.1, 0.2, 0.3, -0.6])
    assert p == pytest.approx(_brute_force_sign_flip([0.1, 0.2, 0.3, -0.6]))


def test_sign_flip_above_the_exact_limit_samples_with_a_fixed_seed():
    diffs = [1.0] * (stats.EXACT_LIMIT + 5)
    p, exact = stats.sign_flip_p(diffs)
    assert not exact
    # Hitting |sum| = 25 needs all signs equal (probability 2^-24): almost never drawn.
    assert 1 / (1 + stats.MONTE_CARLO_DRAWS) <= p < 1e-3
    assert stats.sign_flip_p(diffs) == (p, exact)


def test_t_interval_known_value():
    mean, low, high = stats.t_interval([0.1, 0.0, 0.2])
    half = 4.302652729749464 * 0.1 / math.sqrt(3)  # t(0.975, 2) * sd / sqrt(n)
    assert mean == pytest.approx(0.1)
    assert (low, high) == (pytest.approx(0.1 - half), pytest.approx(0.1 + half))


def test_t_interval_of_one_value_is_undefined():
    mean, low, high = stats.t_interval([0.4])
    assert mean == 0.4 and math.isnan(low) and math.isnan(high)


def test_holm_known_values_and_order():
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    adjusted = stats.holm([0.02, float("nan"), 0.01])
    assert adjusted[0] == pytest.approx(0.02) and adjusted[2] == pytest.approx(0.02)
    assert math.isnan(adjusted[1])


def test_tost_known_value():
    diffs = [0.1, -0.1, 0.0, 0.2, -0.2]
    se = math.sqrt(0.025) / math.sqrt(5)
    expected = scipy_stats.t.sf(0.3 / se, 4)
    assert stats.tost_p(diffs, 0.3) == pytest.approx(expected)


def test_tost_rejects_exactly_when_the_90_percent_interval_is_inside_the_margin():
    rng = np.random.default_rng(1)
    for _ in range(50):
        diffs = list(rng.normal(rng.uniform(-0.5, 0.5), 0.3, size=8))
        _, low, high = stats.t_interval(diffs, level=0.90)
        margin = 0.6
        assert (stats.tost_p(diffs, margin) < 0.05) == (-margin < low and high < margin)


def test_tost_of_constant_differences():
    assert stats.tost_p([0.2, 0.2, 0.2], 0.5) == 0.0
    assert stats.tost_p([0.7, 0.7, 0.7], 0.5) == 1.0


def _compare(arm, reference, **kwargs):
    seeds = range(len(arm))
    return stats.compare(
        dict(zip(seeds, arm)),
        dict(zip(seeds, reference)),
        arm="a",
        reference="r",
        metric="m",
        margin=kwargs.pop("margin", 0.01),
        **kwargs,
    )


def test_compare_counts_better_worse_and_tied_in_the_metric_direction():
    c = _compare([0.6, 0.5, 0.9, 0.4], [0.5, 0.5, 0.7, 0.6])
    assert (c.n_better, c.n_worse, c.n_tied) == (2, 1, 1)
    c = _compare([0.6, 0.5, 0.9, 0.4], [0.5, 0.5, 0.7, 0.6], higher_is_better=False)
    assert (c.n_better, c.n_worse, c.n_tied) == (1, 2, 1)


def test_compare_pairs_by_seed_and_ignores_unpaired_seeds():
    c = stats.compare(
        {0: 1.0, 1: 2.0, 5: 9.0},
        {0: 0.5, 1: 1.0, 7: 0.0},
        arm="a",
        reference="r",
        metric="m",
        margin=1,
    )
    assert c.n == 2
    assert c.diff_mean == pytest.approx(0.75)


def test_verdicts():
    identical = stats.with_holm([_compare([0.9] * 6, [0.9] * 6)])[0]
    assert identical.verdict == "identical"
    better = stats.with_holm([_compare([0.9 + 0.01 * i for i in range(10)], [0.5] * 10)])[0]
    assert better.verdict == "better"
    worse_loss = stats.with_holm([_compare([2.0] * 10, [1.0] * 10, higher_is_better=False)])[0]
    assert worse_loss.verdict == "worse"
    rng = np.random.default_rng(2)
    noise = list(rng.normal(0.0, 0.001, size=20))
    equivalent = stats.with_holm([_compare(noise, [0.0] * 20, margin=0.01)])[0]
    assert equivalent.verdict == "equivalent"
    wide = stats.with_holm([_compare([0.1, -0.1, 0.05, -0.02], [0.0] * 4, margin=0.01)])[0]
    assert wide.verdict == "undetermined"


def test_a_collapsed_run_rules_out_an_equivalence_claim():
    rng = np.random.default_rng(3)
    arm = list(rng.normal(0.0, 0.001, size=20))
    c = stats.compare(
        dict(enumerate(arm)),
        dict(enumerate([0.0] * 20)),
        arm="a",
        reference="r",
        metric="m",
        margin=0.01,
        arm_collapsed={3: True},
    )
    stats.with_holm([c])
    assert c.collapsed_arm == 1 and math.isnan(c.p_tost)
    assert c.verdict == "undetermined"


def test_holm_is_applied_across_the_family():
    strong = _compare([1.0] * 10, [0.0] * 10)  # p = 2/1024
    weak = _compare([1.0] * 9 + [-1.0], [0.0] * 10)
    family = stats.with_holm([strong, weak])
    assert family[0].p_sign_holm == pytest.approx(2 * family[0].p_sign)
    assert family[1].p_sign_holm == pytest.approx(max(family[1].p_sign, family[0].p_sign_holm))
