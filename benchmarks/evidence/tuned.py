"""Experiment 4: a tuned, equal-budget comparison on a train / validation / test split.

Without tuning, a null result can always be blamed on a badly chosen learning rate. Here
every method, the unregularized baseline included, gets the same small grid and is selected
on validation data, then evaluated once on fresh seeds.

Setting (pre-declared)
    Digits, per seed 20 training and 20 validation images per class (200 each), the other
    1,397 images as the test set. 600 steps of minibatches of 20. Four settings: the MLP
    (64-128-128-10) and a small CNN (two 3x3 convolutions with 8 and 16 channels, 2x2
    max-pooling, 256-64-10), each with Adam and with SGD and momentum 0.9.

Grid (the same size for every regularizer)
    Learning rate: Adam 0.0003, 0.001, 0.003; SGD 0.01, 0.03, 0.1. Strength: Dropout rate
    0.1, 0.3, 0.5 (after each hidden layer of the MLP, before each fully connected layer of
    the CNN); weight decay 0.0001, 0.001, 0.01 (the optimizer's coupled L2 term); DropGrad
    rate 0.1, 0.2, 0.4. The baseline has no strength to tune, so it gets the learning-rate
    grid only (3 points against 9).

Selection
    Each grid point is trained on 3 selection seeds (1000-1002, never used for testing); the
    point with the highest mean validation accuracy wins, ties going to the lower mean
    validation loss, then to the earlier grid point.

Endpoint (pre-declared)
    Test accuracy of the selected configuration on 20 fresh seeds (0-19), each method against
    the tuned baseline within its setting; equivalence margin ±1.0 point.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import figures, report, training
from .figures import FigureRecord

FULL: dict[str, Any] = {
    "seeds": 20,
    "selection_seeds": [1000, 1001, 1002],
    "settings": ["mlp_adam", "mlp_sgd", "cnn_adam", "cnn_sgd"],
    "train_per_class": 20,
    "val_per_class": 20,
    "steps": 600,
}
QUICK: dict[str, Any] = {
    **FULL,
    "seeds": 2,
    "selection_seeds": [1000],
    "settings": ["mlp_adam"],
    "steps": 20,
}

SETTINGS: dict[str, dict[str, Any]] = {
    "mlp_adam": {"model": "mlp", "optimizer": "adam"},
    "mlp_sgd": {"model": "mlp", "optimizer": "sgd", "momentum": 0.9},
    "cnn_adam": {"model": "cnn", "optimizer": "adam"},
    "cnn_sgd": {"model": "cnn", "optimizer": "sgd", "momentum": 0.9},
}
SETTING_LABELS = {
    "mlp_adam": "MLP, Adam",
    "mlp_sgd": "MLP, SGD + momentum",
    "cnn_adam": "CNN, Adam",
    "cnn_sgd": "CNN, SGD + momentum",
}
LEARNING_RATES = {"adam": [3e-4, 1e-3, 3e-3], "sgd": [0.01, 0.03, 0.1]}
#: Method -> (strength name, grid). The baseline has none.
STRENGTHS: dict[str, tuple[str, list[float]]] = {
    "none": ("", []),
    "dropout": ("dropout", [0.1, 0.3, 0.5]),
    "weight_decay": ("weight_decay", [1e-4, 1e-3, 1e-2]),
    "dropgrad": ("drop_rate", [0.1, 0.2, 0.4]),
}
LABELS = {
    "none": "none",
    "dropout": "Dropout",
    "weight_decay": "weight decay",
    "dropgrad": "DropGrad",
}
TEST_ACC = report.Endpoint("test_acc", "test accuracy (%)", margin=0.01, scale=100)
SELECT_PREFIX = "select:"


def grid(setting: str, method: str) -> list[tuple[str, dict[str, Any]]]:
    """``(arm name, spec)`` for every grid point of ``method`` in ``setting``."""
    base = SETTINGS[setting]
    name, strengths = STRENGTHS[method]
    points = []
    for lr in LEARNING_RATES[base["optimizer"]]:
        spec = {**base, "lr": lr}
        if not strengths:
            points.append((f"{method}@lr={lr:g}", spec))
        for value in strengths:
            extra: dict[str, Any] = {name: value}
            if method == "dropgrad":
                extra = {"dropgrad": {"drop_rate": value}}
            points.append((f"{method}@lr={lr:g},{name}={value:g}", {**spec, **extra}))
    return points


def _common(config: dict[str, Any]) -> dict[str, Any]:
    return {
        "train_per_class": config["train_per_class"],
        "val_per_class": config["val_per_class"],
        "steps": config["steps"],
        "eval_every": config["steps"],
    }


def plan_selection(config: dict[str, Any], runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        training.job("tuned", SELECT_PREFIX + setting, arm, seed, {**_common(config), **spec})
        for setting in config["settings"]
        for method in STRENGTHS
        for arm, spec in grid(setting, method)
        for seed in config["selection_seeds"]
    ]


def selection(runs: list[dict[str, Any]], config: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (setting, method): the winning grid point and its validation numbers."""
    chosen = []
    for setting in config["settings"]:
        for method in STRENGTHS:
            scored = []
            for order, (arm, spec) in enumerate(grid(setting, method)):
                mine = [
                    r for r in runs if r["setting"] == SELECT_PREFIX + setting and r["arm"] == arm
                ]
                if not mine:
                    continue
                val_acc = float(np.mean([r["final"]["val_acc"] for r in mine]))
                val_loss = float(np.mean([r["final"]["val_loss"] for r in mine]))
                scored.append((-val_acc, val_loss, order, arm, spec))
            if not scored:
                continue
            scored.sort()
            neg_acc, val_loss, _, arm, spec = scored[0]
            # The winner's lead over the runner-up, in validation images over all selection
            # seeds (0 for a tie broken by the validation loss).
            images = config["val_per_class"] * 10 * len(config["selection_seeds"])
            lead = round((scored[1][0] - neg_acc) * images) if len(scored) > 1 else None
            chosen.append(
                {
                    "kind": "selection",
                    "setting": setting,
                    "arm": method,
                    "selected": arm,
                    "val_acc": -neg_acc,
                    "val_loss": val_loss,
                    "grid_points": len(scored),
                    "lead_images": lead,
                    "validation_images": images,
                    "spec": spec,
                }
            )
    return chosen


def collapse_lines(runs: list[dict[str, Any]], config: dict[str, Any]) -> list[str]:
    """The grid points where any selection run collapsed: collapse rate and median accuracy.

    A collapsed run (clean training accuracy under 50%, or a non-finite loss) ends near chance,
    so these points are described by how many runs collapsed and their median, not a mean.
    """
    lines = [
        "Grid points with collapsed selection runs (clean training accuracy under 50%):",
        "",
        "| Setting | Grid point | Runs collapsed | Median validation accuracy (%) |",
        "|---|---|---|---|",
    ]
    found = 0
    for setting in config["settings"]:
        for method in STRENGTHS:
            for arm, _ in grid(setting, method):
                mine = [
                    r for r in runs if r["setting"] == SELECT_PREFIX + setting and r["arm"] == arm
                ]
                collapsed = sum(bool(r["final"]["collapsed"]) for r in mine)
                if not collapsed:
                    continue
                found += 1
                median = 100 * float(np.median([r["final"]["val_acc"] for r in mine]))
                lines.append(
                    f"| {SETTING_LABELS[setting]} | `{arm}` | {collapsed}/{len(mine)} "
                    f"| {median:.1f} |"
                )
    if not found:
        return ["No selection run collapsed."]
    return lines


def plan_final(config: dict[str, Any], runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        training.job("tuned", row["setting"], row["arm"], seed, {**_common(config), **row["spec"]})
        for row in selection(runs, config)
        for seed in range(config["seeds"])
    ]


STAGES = (plan_selection, plan_final)
run = training.run_job


def summarize(runs: list[dict[str, Any]], config: dict[str, Any]) -> tuple[list[dict], list[str]]:
    chosen = selection(runs, config)
    final = [r for r in runs if not r["setting"].startswith(SELECT_PREFIX)]
    pairs = [(s, m, "none") for s in config["settings"] for m in STRENGTHS if m != "none"]
    comparisons = report.compare_family(final, TEST_ACC, pairs)
    lines = [
        "## Experiment 4: tuned, equal-budget comparison (digits, train / validation / test)",
        "",
        f"Selection on {len(config['selection_seeds'])} seed(s); test on {config['seeds']} fresh "
        "seeds.",
        "",
        "| Setting | Method | Selected configuration | Validation accuracy (%) | Grid points "
        "| lead over the runner-up (validation images) |",
        "|---|---|---|---|---|---|",
    ]
    for row in chosen:
        lead = (
            "—"
            if row["lead_images"] is None
            else f"{row['lead_images']} of {row['validation_images']}"
        )
        lines.append(
            f"| {SETTING_LABELS[row['setting']]} | {LABELS[row['arm']]} "
            f"| `{row['selected'].split('@')[1]}` | {100 * row['val_acc']:.1f} "
            f"| {row['grid_points']} | {lead} |"
        )
    lines += [
        "",
        *collapse_lines(runs, config),
        "",
        report.endpoint_note(TEST_ACC, len(comparisons)),
        "",
    ]
    rows: list[dict[str, Any]] = [{k: v for k, v in r.items() if k != "spec"} for r in chosen]
    for setting in config["settings"]:
        table = report.by_seed(final, TEST_ACC, setting)
        arm_rows = [
            report.arm_row(setting, m, *table[m], TEST_ACC) for m in STRENGTHS if m in table
        ]
        rows += [{"kind": "arm", **row} for row in arm_rows]
        lines += [f"**{SETTING_LABELS[setting]}**", ""]
        lines += report.comparison_table(arm_rows, comparisons, TEST_ACC, LABELS, setting=setting)
        lines.append("")
    rows += report.comparison_rows(comparisons)
    lines.append(
        report.train_accuracy_note(
            final, lambda r: f"{SETTING_LABELS[r['setting']]}, {LABELS[r['arm']]}"
        )
    )
    return rows, lines


def plot(
    runs: list[dict[str, Any]], rows: list[dict[str, Any]], config: dict[str, Any], where: Any
) -> list[FigureRecord]:
    plt = figures.pyplot()
    record = FigureRecord("tuned.png")
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * 3 * len(config["settings"])))
    chosen = [r for r in rows if r["kind"] == "comparison"]
    figures.intervals(
        ax,
        record,
        "Δ test accuracy vs tuned baseline",
        [f"{SETTING_LABELS[r['setting']]}: {LABELS[r['arm']]}" for r in chosen],
        [100 * r["diff_mean"] for r in chosen],
        [100 * r["ci_low"] for r in chosen],
        [100 * r["ci_high"] for r in chosen],
        margin=100 * TEST_ACC.margin,
    )
    ax.set_xlabel("Δ test accuracy vs the tuned baseline (points, 95% t-interval)")
    ax.set_title("Tuned comparison:\neach method at its validation-selected configuration")
    figures.save(fig, where, record.file)
    return [record]
