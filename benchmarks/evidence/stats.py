"""Paired statistics shared by every experiment.

The unit of analysis is the seed. Two arms run with the same seed share everything the seed
fixes (data split, initial weights, batch order, episodes), so each comparison works on the
per-seed differences ``d_s = metric(arm, s) - metric(reference, s)``. For each comparison this
module gives:

* the mean difference with a Student-t interval;
* an exact sign-flip permutation test: under the null hypothesis that the two arms are
  exchangeable within a seed, every difference is equally likely to carry either sign, so the
  p-value is the share of the ``2**n`` sign patterns whose ``|sum|`` reaches the observed one.
  All patterns are enumerated for ``n <= 20``; above that a fixed-seed Monte Carlo sample is
  used and said so;
* Holm's step-down correction across the comparisons of one experiment;
* a paired TOST (two one-sided t-tests) against a stated equivalence margin, which is what a
  "no effect" claim needs: failing to reject zero is not evidence of absence;
* the tightest equivalence bound the data support: the larger end, in absolute value, of the
  90% t-interval, the smallest margin at which the (unadjusted) TOST would pass;
* counts of seeds better, worse and tied (exactly equal), so ties are shown as ties;
* for bimodal outcomes (runs that collapse), collapse counts and medians instead of a mean
  and a t-interval, which a few collapsed runs would stretch past any meaningful range.

The verdict of a comparison, fixed before any run, is:

``identical``
    every difference is exactly zero;
``better`` / ``worse``
    the Holm-adjusted sign-flip p-value is below ``ALPHA``;
``equivalent``
    not the above, no run collapsed, and the Holm-adjusted TOST p-value is below ``ALPHA``:
    the effect lies within ``±margin`` at the 90% level that TOST corresponds to;
``undetermined``
    anything else.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import stats as _scipy_stats

__all__ = [
    "ALPHA",
    "EXACT_LIMIT",
    "Comparison",
    "compare",
    "equivalence_bound",
    "holm",
    "mean_std",
    "sign_flip_p",
    "t_interval",
    "tost_p",
    "with_holm",
]

#: Significance level of every test in the analysis.
ALPHA = 0.05
#: Largest number of seeds for which the sign-flip test enumerates every sign pattern.
EXACT_LIMIT = 20
#: Sign patterns drawn when ``n > EXACT_LIMIT``.
MONTE_CARLO_DRAWS = 1 << 16


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for fewer than two values)."""
    array = np.asarray(values, dtype=float)
    std = float(array.std(ddof=1)) if len(array) > 1 else 0.0
    return float(array.mean()), std


def t_interval(diffs: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean of ``diffs`` and the ends of its two-sided Student-t interval.

    With one difference the interval is ``(nan, nan)``; with zero spread it is the point.
    """
    mean, std = mean_std(diffs)
    n = len(diffs)
    if n < 2:
        return mean, float("nan"), float("nan")
    half = float(_scipy_stats.t.ppf(0.5 + level / 2, n - 1)) * std / math.sqrt(n)
    return mean, mean - half, mean + half


def sign_flip_p(diffs: Sequence[float], *, seed: int = 0) -> tuple[float, bool]:
    """Two-sided sign-flip permutation p-value of the paired differences and whether it is exact.

    The statistic is ``|sum(d)|``. For ``n <= EXACT_LIMIT`` the subset sums are built by
    doubling (``2**n`` values), so the p-value is exact: with ten positive differences it is
    ``2 / 1024``, the all-plus and all-minus patterns. Above the limit ``MONTE_CARLO_DRAWS``
    patterns are drawn from a generator seeded with ``seed`` and ``(1 + hits) / (1 + draws)``
    is returned. Differences of exactly zero do not change under a flip and are kept.
    """
    d = np.asarray(diffs, dtype=float)
    if d.size == 0:
        return float("nan"), True
    observed = abs(float(d.sum()))
    # Sums accumulated in a different order differ in the last bits; a relative tolerance keeps
    # a pattern that equals the observed one from being missed.
    tolerance = 1e-9 * max(1.0, float(np.abs(d).sum()))
    if d.size <= EXACT_LIMIT:
        flipped = np.zeros(1)
        for value in d:
            flipped = np.concatenate([flipped, flipped + value])
        # A pattern that flips the subset S has sum total - 2 * sum(S).
        statistics = np.abs(d.sum() - 2.0 * flipped)
        return float(np.mean(statistics >= observed - tolerance)), True
    rng = np.random.default_rng(seed)
    signs = rng.choice(np.array([-1.0, 1.0]), size=(MONTE_CARLO_DRAWS, d.size))
    hits = int(np.sum(np.abs(signs @ d) >= observed - tolerance))
    return (1 + hits) / (1 + MONTE_CARLO_DRAWS), False


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given; NaN stays NaN and is not counted."""
    indexed = [(p, i) for i, p in enumerate(p_values) if not math.isnan(p)]
    indexed.sort()
    m = len(indexed)
    adjusted = [float("nan")] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(indexed):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def equivalence_bound(diffs: Sequence[float]) -> float:
    """The smallest margin within which a paired TOST at level 0.05 shows equivalence.

    That is ``max(|low|, |high|)`` of the 90% t-interval of the mean difference (unadjusted
    for multiple comparisons); NaN with fewer than two differences.
    """
    if len(diffs) < 2:
        return float("nan")
    _, low, high = t_interval(diffs, level=0.90)
    return max(abs(low), abs(high))


def tost_p(diffs: Sequence[float], margin: float) -> float:
    """Paired TOST p-value for ``|mean difference| < margin`` (two one-sided t-tests).

    Rejecting at level ``alpha`` is the same as the ``1 - 2 alpha`` t-interval lying inside
    ``(-margin, margin)``.
    """
    n = len(diffs)
    mean, std = mean_std(diffs)
    if n < 2:
        return float("nan")
    # Equal differences have a sample deviation of rounding size, not zero.
    if std <= 1e-12 * max(1.0, abs(mean)):
        return 0.0 if abs(mean) < margin else 1.0
    se = std / math.sqrt(n)
    lower = float(_scipy_stats.t.sf((mean + margin) / se, n - 1))
    upper = float(_scipy_stats.t.cdf((mean - margin) / se, n - 1))
    return max(lower, upper)


@dataclass
class Comparison:
    """One paired comparison: ``arm`` against ``reference`` on ``metric``, per seed.

    ``diff_*`` are arm minus reference. ``n_better`` counts seeds on which the arm was better
    in the direction ``higher_is_better`` gives; ``n_tied`` counts exact equality.
    """

    arm: str
    reference: str
    metric: str
    higher_is_better: bool
    margin: float
    n: int
    diff_mean: float
    diff_median: float
    ci_low: float
    ci_high: float
    p_sign: float
    p_sign_exact: bool
    p_tost: float
    bound90: float
    n_better: int
    n_worse: int
    n_tied: int
    collapsed_arm: int = 0
    collapsed_reference: int = 0
    p_sign_holm: float = float("nan")
    p_tost_holm: float = float("nan")
    verdict: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def any_collapsed(self) -> bool:
        return bool(self.collapsed_arm or self.collapsed_reference)

    def as_row(self) -> dict[str, Any]:
        row = asdict(self)
        row.update(row.pop("extra"))
        return row


def compare(
    arm_values: dict[int, float],
    reference_values: dict[int, float],
    *,
    arm: str,
    reference: str,
    metric: str,
    margin: float,
    higher_is_better: bool = True,
    arm_collapsed: dict[int, bool] | None = None,
    reference_collapsed: dict[int, bool] | None = None,
) -> Comparison:
    """Pair two arms by seed and compute everything except the Holm-adjusted values.

    Only seeds present in both arms are used. ``*_collapsed`` flag runs that collapsed; when
    any did, no TOST is computed (an equivalence claim would be meaningless).
    """
    seeds = sorted(set(arm_values) & set(reference_values))
    diffs = [arm_values[s] - reference_values[s] for s in seeds]
    mean, low, high = t_interval(diffs)
    p_sign, exact = sign_flip_p(diffs)
    collapsed_arm = sum(bool((arm_collapsed or {}).get(s)) for s in seeds)
    collapsed_reference = sum(bool((reference_collapsed or {}).get(s)) for s in seeds)
    sign = 1.0 if higher_is_better else -1.0
    return Comparison(
        arm=arm,
        reference=reference,
        metric=metric,
        higher_is_better=higher_is_better,
        margin=margin,
        n=len(seeds),
        diff_mean=mean,
        diff_median=float(np.median(diffs)) if diffs else float("nan"),
        ci_low=low,
        ci_high=high,
        p_sign=p_sign,
        p_sign_exact=exact,
        p_tost=float("nan") if collapsed_arm or collapsed_reference else tost_p(diffs, margin),
        bound90=float("nan") if collapsed_arm or collapsed_reference else equivalence_bound(diffs),
        n_better=sum(sign * d > 0 for d in diffs),
        n_worse=sum(sign * d < 0 for d in diffs),
        n_tied=sum(d == 0 for d in diffs),
        collapsed_arm=collapsed_arm,
        collapsed_reference=collapsed_reference,
    )


def with_holm(comparisons: list[Comparison]) -> list[Comparison]:
    """Fill the Holm-adjusted p-values and the verdict of every comparison of one experiment.

    The sign-flip p-values form one family and the TOST p-values another.
    """
    for c, adjusted in zip(comparisons, holm([c.p_sign for c in comparisons])):
        c.p_sign_holm = adjusted
    for c, adjusted in zip(comparisons, holm([c.p_tost for c in comparisons])):
        c.p_tost_holm = adjusted
    for c in comparisons:
        c.verdict = _verdict(c)
    return comparisons


def _verdict(c: Comparison) -> str:
    if c.n == 0:
        return "no data"
    if c.n_tied == c.n:
        return "identical"
    if c.p_sign_holm < ALPHA:
        good = (c.diff_mean > 0) == c.higher_is_better
        return "better" if good else "worse"
    if not c.any_collapsed and c.p_tost_holm < ALPHA:
        return "equivalent"
    return "undetermined"
