"""Experiment 3: symmetric label noise, for the claim of "improved robustness against noise".

Setting (pre-declared)
    The digits MLP, 50 training images per class (500), the other 1,297 held out. In the
    noisy setting 40% of the training labels (200 images) are replaced by a different class,
    uniformly over the nine others; the held-out labels stay clean. Adam at 0.001,
    minibatches of 25, 3,000 steps (150 epochs): long enough for the unregularized network
    to fit every noisy label. Evaluated every 100 steps.

Arms
    ``none``; DropGrad at 0.2 and 0.4; Dropout 0.3 after each hidden layer as a reference
    regularizer; each at 0% and 40% label noise.

Pairing
    A seed fixes the split, which labels are changed and to what, the initial weights, the
    batch order and the masks.

Endpoints (pre-declared)
    Primary: final held-out accuracy, margin ±1.0 point. Secondary: the best held-out
    accuracy over the evaluations (an oracle early-stopping number, optimistic for every arm
    alike), margin ±1.0 point; and at 40% noise, the share of the relabelled training images
    that the network predicts as their noisy label at the end ("memorized", lower is
    better), margin ±5 points. Each arm is compared with ``none`` at the same noise level.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import figures, report, training
from .figures import FigureRecord

FULL: dict[str, Any] = {
    "seeds": 20,
    "noise_levels": [0.0, 0.4],
    "train_per_class": 50,
    "batch_size": 25,
    "steps": 3000,
    "eval_every": 100,
}
QUICK: dict[str, Any] = {**FULL, "seeds": 2, "steps": 40, "eval_every": 20}

ARMS: dict[str, dict[str, Any]] = {
    "none": {},
    "dropgrad_0.2": {"dropgrad": {"drop_rate": 0.2}},
    "dropgrad_0.4": {"dropgrad": {"drop_rate": 0.4}},
    "dropout_0.3": {"dropout": 0.3},
}
LABELS = {
    "none": "none",
    "dropgrad_0.2": "DropGrad 0.2",
    "dropgrad_0.4": "DropGrad 0.4",
    "dropout_0.3": "Dropout 0.3",
}
FINAL = report.Endpoint("test_acc", "final held-out accuracy (%)", margin=0.01, scale=100)
BEST = report.Endpoint(
    "best_test_acc",
    "best held-out accuracy (%)",
    margin=0.01,
    scale=100,
    read=lambda run: max(run["curves"]["test_acc"]),
)
MEMORIZED = report.Endpoint(
    "memorized", "relabelled images fitted (%)", margin=0.05, higher_is_better=False, scale=100
)


def setting_name(noise: float) -> str:
    return f"noise_{round(100 * noise)}"


def plan(config: dict[str, Any], runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    common = {key: config[key] for key in ("train_per_class", "batch_size", "steps", "eval_every")}
    return [
        training.job(
            "label_noise",
            setting_name(noise),
            arm,
            seed,
            {**common, **spec, "label_noise": noise},
        )
        for noise in config["noise_levels"]
        for arm, spec in ARMS.items()
        for seed in range(config["seeds"])
    ]


STAGES = (plan,)
run = training.run_job


def summarize(runs: list[dict[str, Any]], config: dict[str, Any]) -> tuple[list[dict], list[str]]:
    rows: list[dict[str, Any]] = []
    settings = [setting_name(noise) for noise in config["noise_levels"]]
    noisy = [s for s, noise in zip(settings, config["noise_levels"]) if noise > 0]
    lines = ["## Experiment 3: symmetric label noise (digits MLP, Adam, 500 training images)", ""]
    for endpoint, chosen in ((FINAL, settings), (BEST, settings), (MEMORIZED, noisy)):
        pairs = [(s, arm, "none") for s in chosen for arm in ARMS if arm != "none"]
        comparisons = report.compare_family(runs, endpoint, pairs)
        rows += report.comparison_rows(comparisons)
        lines += [report.endpoint_note(endpoint, len(comparisons)), ""]
        for setting in chosen:
            table = report.by_seed(runs, endpoint, setting)
            arm_rows = [report.arm_row(setting, arm, *table[arm], endpoint) for arm in ARMS]
            rows += [{"kind": "arm", **row} for row in arm_rows]
            label = f"{setting.split('_')[1]}% label noise"
            lines += [f"**{label}, {endpoint.label}**", ""]
            lines += report.comparison_table(
                arm_rows, comparisons, endpoint, LABELS, setting=setting
            )
            lines.append("")
    return rows, lines


def plot(
    runs: list[dict[str, Any]], rows: list[dict[str, Any]], config: dict[str, Any], where: Any
) -> list[FigureRecord]:
    plt = figures.pyplot()
    record = FigureRecord("label_noise.png")
    settings = [setting_name(noise) for noise in config["noise_levels"]]
    panels = [(s, "test_acc", "held-out accuracy (%)") for s in settings]
    panels += [(s, "memorized", "relabelled images fitted (%)") for s in settings if s != "noise_0"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    for ax, (setting, key, ylabel) in zip(axes[0], panels):
        title = f"{setting.split('_')[1]}% label noise: {ylabel}"
        for arm in ARMS:
            chosen = [r for r in runs if r["setting"] == setting and r["arm"] == arm]
            if not chosen:
                continue
            stacked = 100 * np.array([r["curves"][key] for r in chosen])
            figures.curve(ax, record, title, LABELS[arm], chosen[0]["curves"]["step"], stacked)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
    axes[0, 0].legend()
    fig.suptitle("Label noise: mean over seeds (line), seed range (shaded)")
    figures.save(fig, where, record.file)
    return [record]
