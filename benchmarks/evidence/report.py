"""Summaries of paired runs: arm statistics, comparison rows, CSV and Markdown tables.

Experiments describe their runs as ``(setting, arm, seed) -> value`` and their comparisons as
``(arm, reference)`` pairs; this module turns that into rows (for the CSV files) and table
text (for ``tables.md``), using :mod:`.stats` for every number. A family for Holm's
correction is one endpoint of one experiment: every comparison passed to one call of
:func:`compare_family`.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import stats

Run = dict[str, Any]


@dataclass(frozen=True)
class Endpoint:
    """A metric read from ``run["final"]`` (or computed by ``read``), how to print and judge it.

    ``scale`` multiplies values for printing (100 for accuracies shown in percent) and
    ``margin`` is the equivalence margin in the metric's own units.
    """

    metric: str
    label: str
    margin: float
    higher_is_better: bool = True
    scale: float = 1.0
    digits: int = 1
    read: Callable[[Run], float] | None = None

    def value(self, run: Run) -> float:
        return float(self.read(run)) if self.read else float(run["final"][self.metric])

    @property
    def margin_text(self) -> str:
        return f"±{self.margin * self.scale:.{self.digits}f}"


def by_seed(
    runs: Iterable[Run], endpoint: Endpoint, setting: str | None = None
) -> dict[str, tuple[dict[int, float], dict[int, bool]]]:
    """``arm -> (seed -> value, seed -> collapsed)`` for the runs of one setting."""
    table: dict[str, tuple[dict[int, float], dict[int, bool]]] = defaultdict(lambda: ({}, {}))
    for run in runs:
        if setting is not None and run.get("setting") != setting:
            continue
        values, collapsed = table[run["arm"]]
        values[run["seed"]] = endpoint.value(run)
        collapsed[run["seed"]] = bool(run["final"].get("collapsed", False))
    return dict(table)


def arm_row(
    setting: str | None, arm: str, values: dict[int, float], collapsed: dict[int, bool], e: Endpoint
) -> dict[str, Any]:
    """Per-arm statistics of one endpoint."""
    ordered = [values[s] for s in sorted(values)]
    mean, std = stats.mean_std(ordered)
    return {
        "setting": setting or "",
        "arm": arm,
        "metric": e.metric,
        "n": len(ordered),
        "mean": mean,
        "std": std,
        "median": float(np.median(ordered)),
        "min": min(ordered),
        "max": max(ordered),
        "collapsed": sum(collapsed.get(s, False) for s in values),
    }


def compare_family(
    runs: Sequence[Run],
    endpoint: Endpoint,
    pairs: Sequence[tuple[str | None, str, str]],
    *,
    declared: int | None = None,
) -> list[stats.Comparison]:
    """Compare each ``(setting, arm, reference)`` on ``endpoint``; Holm across all of them.

    ``declared`` is the number of seeds declared before the first results of this family
    were known. When the runs hold more seeds, the family is also judged on seeds
    ``0 .. declared - 1`` alone; a comparison whose verdict differs there is marked
    exploratory (``extra["declared_verdict"]``), since its verdict moved with seeds added
    after results were seen.
    """
    comparisons = _compare_family(runs, endpoint, pairs)
    if declared is None or all(c.n <= declared for c in comparisons):
        return comparisons
    early = _compare_family([r for r in runs if r["seed"] < declared], endpoint, pairs)
    before = {(c.extra["setting"], c.arm, c.reference): c for c in early}
    for c in comparisons:
        first = before.get((c.extra["setting"], c.arm, c.reference))
        c.extra["declared_seeds"] = declared
        c.extra["declared_verdict"] = first.verdict if first else ""
        c.extra["exploratory"] = bool(first and first.verdict != c.verdict)
    return comparisons


def _compare_family(
    runs: Sequence[Run],
    endpoint: Endpoint,
    pairs: Sequence[tuple[str | None, str, str]],
) -> list[stats.Comparison]:
    comparisons = []
    cache: dict[str | None, dict[str, tuple[dict[int, float], dict[int, bool]]]] = {}
    for setting, arm, reference in pairs:
        if setting not in cache:
            cache[setting] = by_seed(runs, endpoint, setting)
        table = cache[setting]
        if arm not in table or reference not in table:
            continue
        comparison = stats.compare(
            table[arm][0],
            table[reference][0],
            arm=arm,
            reference=reference,
            metric=endpoint.metric,
            margin=endpoint.margin,
            higher_is_better=endpoint.higher_is_better,
            arm_collapsed=table[arm][1],
            reference_collapsed=table[reference][1],
        )
        comparison.extra["setting"] = setting or ""
        comparisons.append(comparison)
    return stats.with_holm(comparisons)


# ---------------------------------------------------------------- text


def fmt_arm(row: dict[str, Any] | None, e: Endpoint) -> str:
    """``mean ± sd``, or ``median m (k/n collapsed)`` when any run collapsed."""
    if row is None:
        return "n/a"
    s, d = e.scale, e.digits
    if row["collapsed"]:
        return f"median {row['median'] * s:.{d}f} ({row['collapsed']}/{row['n']} collapsed)"
    return f"{row['mean'] * s:.{d}f} ± {row['std'] * s:.{d}f}"


def fmt_diff(c: stats.Comparison | None, e: Endpoint) -> str:
    """``+0.2 [-0.1, +0.5]`` (mean and 95% t-interval), or the median when runs collapsed."""
    if c is None:
        return "—"
    s, d = e.scale, e.digits
    if c.any_collapsed:
        return f"median {c.diff_median * s:+.{d}f}"
    if math.isnan(c.ci_low):
        return f"{c.diff_mean * s:+.{d}f}"
    return f"{c.diff_mean * s:+.{d}f} [{c.ci_low * s:+.{d}f}, {c.ci_high * s:+.{d}f}]"


def fmt_counts(c: stats.Comparison | None) -> str:
    """Seeds on which the arm was better / worse / tied."""
    return "—" if c is None else f"{c.n_better}/{c.n_worse}/{c.n_tied}"


def fmt_p(p: float) -> str:
    if math.isnan(p):
        return "—"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def fmt_bound(c: stats.Comparison, e: Endpoint) -> str:
    """The tightest equivalence bound, ``±0.2``, in the endpoint's printed units."""
    return f"±{c.bound90 * e.scale:.{e.digits + (1 if e.scale == 100 else 0)}f}"


def fmt_verdict(c: stats.Comparison | None, e: Endpoint) -> str:
    """The verdict; an equivalence with its margin and the tightest bound the data support;
    ``exploratory`` where the verdict moved with seeds added after results were seen."""
    if c is None:
        return "—"
    text = c.verdict
    if c.verdict == "equivalent":
        text = f"equivalent ({e.margin_text}; tightest {fmt_bound(c, e)})"
    if c.extra.get("exploratory"):
        before, declared = c.extra["declared_verdict"], c.extra["declared_seeds"]
        text += f" (exploratory: {before} on the {declared} declared seeds)"
    return text


def comparison_table(
    arm_rows: Sequence[dict[str, Any]],
    comparisons: Sequence[stats.Comparison],
    e: Endpoint,
    labels: dict[str, str],
    *,
    setting: str | None = None,
    first_column: str = "Arm",
) -> list[str]:
    """A Markdown table: every arm of ``arm_rows`` (in order) and its comparison, if any.

    An arm compared with several references gets one line per comparison.
    """
    lines = [
        f"| {first_column} | {e.label} | Δ vs reference [95% CI] | reference "
        "| seeds better/worse/tied | p sign-flip (Holm) | p TOST (Holm) | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    wanted = setting or ""
    for row in arm_rows:
        if row["setting"] != wanted:
            continue
        mine = [c for c in comparisons if c.arm == row["arm"] and c.extra["setting"] == wanted]
        for c in mine or [None]:
            p = "—" if c is None else f"{fmt_p(c.p_sign)} ({fmt_p(c.p_sign_holm)})"
            tost = "—" if c is None else f"{fmt_p(c.p_tost)} ({fmt_p(c.p_tost_holm)})"
            reference = "—" if c is None else labels.get(c.reference, c.reference)
            lines.append(
                f"| {labels.get(row['arm'], row['arm'])} | {fmt_arm(row, e)} | {fmt_diff(c, e)} "
                f"| {reference} | {fmt_counts(c)} | {p} | {tost} | {fmt_verdict(c, e)} |"
            )
    return lines


def endpoint_note(e: Endpoint, n_comparisons: int) -> str:
    return (
        f"Endpoint: {e.label}; equivalence margin {e.margin_text}; "
        f"{n_comparisons} comparisons in the Holm family."
    )


def train_accuracy_note(runs: Sequence[Run], labels: Callable[[Run], str]) -> str:
    """One sentence: how many runs ended at 100% training accuracy, and every one that did not.

    ``labels(run)`` names a run's setting and arm. Reads ``run["final"]["train_acc"]``.
    """
    below = sorted(
        (labels(r), r["seed"], r["final"]["train_acc"]) for r in runs if r["final"]["train_acc"] < 1
    )
    text = f"Final training accuracy: 100% in {len(runs) - len(below)} of {len(runs)} runs"
    if not below:
        return text + "."
    listed = "; ".join(f"{name}, seed {seed}: {100 * acc:.1f}%" for name, seed, acc in below)
    return f"{text}; below 100%: {listed}."


# ---------------------------------------------------------------- files


def _cell(value: Any) -> Any:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return value


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    fields: list[str] = []
    for row in rows:
        fields.extend(k for k in row if k not in fields)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(v) for k, v in row.items()})


def comparison_rows(comparisons: Sequence[stats.Comparison]) -> list[dict[str, Any]]:
    return [{"kind": "comparison", **c.as_row()} for c in comparisons]


def seeds_note(config: dict[str, Any]) -> str:
    """How many seeds were declared, and when (``declared_seeds``: how many before any
    result; the rest were added after those were seen)."""
    declared = config.get("declared_seeds")
    if declared is None or declared >= config["seeds"]:
        return f"{config['seeds']} seeds declared."
    return (
        f"{config['seeds']} seeds; the first {declared} declared before any result, the rest "
        f"after those were seen: a verdict that differs on seeds 0–{declared - 1} alone is "
        "marked exploratory."
    )
