"""Experiment 5: where the mask goes: gradient or update; element, row or tensor.

Under momentum and Adam a dropped gradient entry still moves its parameter (see the
``motion`` measurement), so masking the gradient and masking the update are different
methods. This experiment runs both, at three granularities, with the two stateful
optimizers people use.

Setting (pre-declared)
    The digits MLP on 200 training images (20 per class), 600 steps of minibatches of 20,
    the other 1,597 images held out. Adam at 0.001, and SGD with momentum 0.9 at 0.05.

Arms
    ``none``; ``DropGrad(target=..., granularity=...)`` at rate 0.2 for every combination of
    target ``"gradient"`` / ``"update"`` and granularity ``"element"`` / ``"row"`` /
    ``"tensor"``; and the SkipUpdate configuration: rate 0.5, ``granularity="tensor"``,
    ``target="update"``.

Pairing
    A seed fixes the split, initial weights, batch order and masks.

Endpoints (pre-declared)
    Primary: final held-out accuracy, margin ±1.0 point. Secondary: the natural log of the
    final training loss, margin ±ln 1.25. Every arm against ``none`` within its optimizer.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

from . import figures, report, training
from .figures import FigureRecord

FULL: dict[str, Any] = {"seeds": 20, "steps": 600, "eval_every": 50, "drop_rate": 0.2}
QUICK: dict[str, Any] = {**FULL, "seeds": 2, "steps": 20, "eval_every": 10}

SETTINGS: dict[str, dict[str, Any]] = {
    "adam": {"optimizer": "adam", "lr": 1e-3},
    "sgd_momentum": {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9},
}
SETTING_LABELS = {"adam": "Adam", "sgd_momentum": "SGD + momentum"}
TARGETS = ("gradient", "update")
GRANULARITIES = ("element", "row", "tensor")
TEST_ACC = report.Endpoint("test_acc", "held-out accuracy (%)", margin=0.01, scale=100)
LOG_TRAIN_LOSS = report.Endpoint(
    "log_train_loss",
    "ln final training loss",
    margin=math.log(1.25),
    higher_is_better=False,
    digits=2,
    read=lambda run: math.log(run["final"]["train_loss"]),
)


def unavailable() -> str | None:
    try:
        from dropgrad import DropGrad
    except ImportError as error:  # pragma: no cover - depends on the checkout
        return f"dropgrad does not import ({error})"
    parameters = inspect.signature(DropGrad).parameters
    if "target" not in parameters or "granularity" not in parameters:
        return "DropGrad has no target= / granularity= arguments in this checkout"
    return None


def arms(config: dict[str, Any]) -> dict[str, dict[str, Any] | None]:
    """Arm name -> DropGrad keyword arguments (``None`` for the unmasked baseline)."""
    chosen: dict[str, dict[str, Any] | None] = {"none": None}
    for target in TARGETS:
        for granularity in GRANULARITIES:
            chosen[f"{target}_{granularity}"] = {
                "drop_rate": config["drop_rate"],
                "target": target,
                "granularity": granularity,
            }
    chosen["skipupdate"] = {"drop_rate": 0.5, "target": "update", "granularity": "tensor"}
    return chosen


def label(arm: str, config: dict[str, Any]) -> str:
    if arm == "none":
        return "none"
    if arm == "skipupdate":
        return "SkipUpdate (update, tensor, 0.5)"
    target, granularity = arm.split("_")
    return f"{target}, {granularity}, {config['drop_rate']:g}"


def plan(config: dict[str, Any], runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    common = {"steps": config["steps"], "eval_every": config["eval_every"]}
    return [
        training.job("masking", setting, arm, seed, {**common, **base, "dropgrad": dropgrad})
        for setting, base in SETTINGS.items()
        for arm, dropgrad in arms(config).items()
        for seed in range(config["seeds"])
    ]


STAGES = (plan,)
run = training.run_job


def summarize(runs: list[dict[str, Any]], config: dict[str, Any]) -> tuple[list[dict], list[str]]:
    names = list(arms(config))
    labels = {arm: label(arm, config) for arm in names}
    pairs = [(s, arm, "none") for s in SETTINGS for arm in names if arm != "none"]
    rows: list[dict[str, Any]] = []
    lines = ["## Experiment 5: where the mask goes (digits MLP, 200 training images)", ""]
    for endpoint in (TEST_ACC, LOG_TRAIN_LOSS):
        comparisons = report.compare_family(runs, endpoint, pairs)
        rows += report.comparison_rows(comparisons)
        lines += [report.endpoint_note(endpoint, len(comparisons)), ""]
        for setting in SETTINGS:
            table = report.by_seed(runs, endpoint, setting)
            arm_rows = [
                report.arm_row(setting, a, *table[a], endpoint) for a in names if a in table
            ]
            rows += [{"kind": "arm", **row} for row in arm_rows]
            lines += [f"**{SETTING_LABELS[setting]}, {endpoint.label}**", ""]
            lines += report.comparison_table(
                arm_rows, comparisons, endpoint, labels, setting=setting
            )
            lines.append("")
    lines.append(
        report.train_accuracy_note(
            runs, lambda r: f"{SETTING_LABELS[r['setting']]}, {label(r['arm'], config)}"
        )
    )
    return rows, lines


def plot(
    runs: list[dict[str, Any]], rows: list[dict[str, Any]], config: dict[str, Any], where: Any
) -> list[FigureRecord]:
    plt = figures.pyplot()
    record = FigureRecord("masking.png")
    fig, axes = plt.subplots(1, len(SETTINGS), figsize=(6 * len(SETTINGS), 3.8), squeeze=False)
    for ax, setting in zip(axes[0], SETTINGS):
        chosen = [
            r
            for r in rows
            if r["kind"] == "comparison" and r["metric"] == "test_acc" and r["setting"] == setting
        ]
        figures.intervals(
            ax,
            record,
            f"{SETTING_LABELS[setting]}: Δ held-out accuracy",
            [label(r["arm"], config) for r in chosen],
            [100 * r["diff_mean"] for r in chosen],
            [100 * r["ci_low"] for r in chosen],
            [100 * r["ci_high"] for r in chosen],
            margin=100 * TEST_ACC.margin,
        )
        ax.set_title(SETTING_LABELS[setting])
        ax.set_xlabel("Δ held-out accuracy vs none (points, 95% t-interval)")
    figures.save(fig, where, record.file)
    return [record]
