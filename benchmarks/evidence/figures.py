"""Plotting helpers that record what they plot.

Every figure function of an experiment returns a :class:`FigureRecord`: for each panel, the
label drawn in the legend or on the axis and the values drawn under it. The records are
written to ``figures.json`` beside the tables, and the tests compare them with the summary
rows, so a label attached to the wrong series is caught (as Figure 5 of the earlier analysis,
whose bars carried each other's optimizer names, would have been).

PNG files are written without the "Software" metadata entry, so that rebuilding a figure
from the same results with the same libraries gives the same bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

DPI = 80


@dataclass
class FigureRecord:
    """``panels[panel title][label]`` is the list of values drawn for ``label`` in that panel."""

    file: str
    panels: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def add(self, panel: str, label: str, values: Sequence[float]) -> None:
        self.panels.setdefault(panel, {})[label] = [float(v) for v in values]


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.titlesize": 9, "legend.fontsize": 7})
    return plt


def save(fig: Any, where: Path, name: str) -> str:
    where.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(where / name, dpi=DPI, metadata={"Software": None})
    pyplot().close(fig)
    return name


def bars(
    ax: Any,
    record: FigureRecord,
    panel: str,
    labels: Sequence[str],
    values: Sequence[float],
    errors: Sequence[float] | None = None,
    *,
    horizontal: bool = False,
    colors: Sequence[str] | None = None,
) -> None:
    """Draw one bar per label and record ``label -> [value]``."""
    positions = np.arange(len(labels))
    draw = ax.barh if horizontal else ax.bar
    kwargs: dict[str, Any] = {"capsize": 3}
    if errors is not None:
        kwargs["xerr" if horizontal else "yerr"] = errors
    if colors is not None:
        kwargs["color"] = list(colors)
    draw(positions, values, **kwargs)
    if horizontal:
        ax.set_yticks(positions, labels)
        ax.invert_yaxis()
    else:
        ax.set_xticks(positions, labels, rotation=30, ha="right")
    for label, value in zip(labels, values):
        record.add(panel, label, [value])


def curve(
    ax: Any,
    record: FigureRecord,
    panel: str,
    label: str,
    x: Sequence[float],
    stacked: np.ndarray,
    *,
    band: bool = True,
    color: str | None = None,
) -> None:
    """Plot the mean over rows of ``stacked`` (seeds by points), shading the seed range."""
    mean = stacked.mean(0)
    (line,) = ax.plot(x, mean, label=label, linewidth=1.2, color=color)
    if band and len(stacked) > 1:
        ax.fill_between(x, stacked.min(0), stacked.max(0), alpha=0.12, color=line.get_color())
    record.add(panel, label, mean)


def intervals(
    ax: Any,
    record: FigureRecord,
    panel: str,
    labels: Sequence[str],
    means: Sequence[float],
    lows: Sequence[float],
    highs: Sequence[float],
    *,
    margin: float | None = None,
) -> None:
    """Paired differences with their intervals, one row per label, zero and margin marked."""
    positions = np.arange(len(labels))
    means_a = np.asarray(means, dtype=float)
    errors = np.vstack([means_a - np.asarray(lows), np.asarray(highs) - means_a])
    ax.errorbar(means_a, positions, xerr=errors, fmt="o", capsize=3, color="tab:blue")
    ax.axvline(0.0, color="black", linewidth=0.8)
    if margin is not None:
        for edge in (-margin, margin):
            ax.axvline(edge, color="grey", linestyle=":", linewidth=0.8)
    ax.set_yticks(positions, labels)
    ax.invert_yaxis()
    for label, mean, low, high in zip(labels, means, lows, highs):
        record.add(panel, label, [mean, low, high])


def loss_curves(
    runs: list[dict[str, Any]],
    arms: Sequence[str],
    labels: dict[str, str],
    file: str,
    title: str,
    where: Path,
) -> list[FigureRecord]:
    """Training and validation loss of a language model per arm, mean over seeds with the
    seed range shaded (the runs carry ``curves`` with ``step``, ``train_loss``, ``val_loss``)."""
    plt = pyplot()
    record = FigureRecord(file)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, ylabel in (
        (axes[0], "train_loss", "training loss (nats/char)"),
        (axes[1], "val_loss", "validation loss (nats/char)"),
    ):
        for arm in arms:
            chosen = [r for r in runs if r["arm"] == arm]
            if not chosen:
                continue
            stacked = np.array([r["curves"][key] for r in chosen])
            curve(ax, record, ylabel, labels[arm], chosen[0]["curves"]["step"], stacked)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
    axes[1].legend()
    fig.suptitle(title)
    save(fig, where, record.file)
    return [record]
