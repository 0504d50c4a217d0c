"""Experiment 2: is DropGrad more than a step-size or batch-size change? Mechanism controls.

Setting (pre-declared)
    The digits MLP (64-128-128-10), 20 training images per class (200), the other 1,597
    held out; 600 steps of minibatches of 20; Adam at 0.001 unless an arm says otherwise.
    DropGrad runs at 0.4, the rate with the largest predicted effects.

Arms and the question each answers
    ``adam`` / ``adam_dropgrad``: the effect itself.
    ``adam_lr_scaled``: Adam at ``0.001 * sqrt(1 - 0.4)``, the step shrink Adam's second
    moment predicts under DropGrad (its denominator tracks ``E[g^2] / (1 - p)``).
    ``adam_batch_12``: minibatches of ``20 * (1 - 0.4) = 12``, as many steps (fewer
    examples): DropGrad as a smaller batch.
    ``adam_noise_matched``: isotropic Gaussian gradient noise with, at every step, the total
    variance DropGrad at 0.4 would add; only the noise's shape differs from DropGrad's.
    ``adam_noise_fixed`` / ``adam_noise_annealed``: the same variance frozen at its first-step
    value, constant or decayed as ``(1 + t)^-0.55`` (Neelakantan et al., 2015); noise that
    does not vanish when the gradient does.
    ``sgd`` / ``sgd_dropgrad``: plain SGD (learning rate 0.2, no momentum), where a dropped
    coordinate really does not move.
    ``full_batch`` / ``full_batch_dropgrad``: Adam on all 200 images every step, where
    DropGrad is the only noise.

Pairing
    A seed fixes the split, initial weights, batch order and noise streams.

Endpoints (pre-declared)
    Primary: final held-out accuracy; equivalence margin ±1.0 point; comparisons: each
    control and DropGrad against its baseline, and DropGrad against the step-size,
    batch-size and matched-noise controls. Secondary: the natural log of the final training
    loss (a difference of ``ln 2`` is a doubled loss), margin ±ln 1.25, same comparisons.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import figures, report, training
from .figures import FigureRecord

FULL: dict[str, Any] = {"seeds": 20, "steps": 600, "eval_every": 50, "drop_rate": 0.4}
QUICK: dict[str, Any] = {**FULL, "seeds": 2, "steps": 30, "eval_every": 15}

SETTING = "mlp_digits"
LABELS = {
    "adam": "Adam",
    "adam_dropgrad": "Adam + DropGrad",
    "adam_lr_scaled": "Adam, lr × √(1−p)",
    "adam_batch_12": "Adam, batch 20(1−p)",
    "adam_noise_matched": "Adam + isotropic noise, matched",
    "adam_noise_fixed": "Adam + isotropic noise, fixed",
    "adam_noise_annealed": "Adam + isotropic noise, annealed",
    "sgd": "plain SGD",
    "sgd_dropgrad": "plain SGD + DropGrad",
    "full_batch": "full-batch Adam",
    "full_batch_dropgrad": "full-batch Adam + DropGrad",
}
#: (arm, reference) in the order of the tables.
PAIRS = [
    ("adam_dropgrad", "adam"),
    ("adam_lr_scaled", "adam"),
    ("adam_batch_12", "adam"),
    ("adam_noise_matched", "adam"),
    ("adam_noise_fixed", "adam"),
    ("adam_noise_annealed", "adam"),
    ("adam_dropgrad", "adam_lr_scaled"),
    ("adam_dropgrad", "adam_batch_12"),
    ("adam_dropgrad", "adam_noise_matched"),
    ("sgd_dropgrad", "sgd"),
    ("full_batch_dropgrad", "full_batch"),
]
TEST_ACC = report.Endpoint("test_acc", "held-out accuracy (%)", margin=0.01, scale=100)
LOG_TRAIN_LOSS = report.Endpoint(
    "log_train_loss",
    "ln final training loss",
    margin=math.log(1.25),
    higher_is_better=False,
    digits=2,
    read=lambda run: math.log(run["final"]["train_loss"]),
)


def arms(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    p = config["drop_rate"]
    dropgrad = {"drop_rate": p}
    sgd = {"optimizer": "sgd", "lr": 0.2}
    return {
        "adam": {},
        "adam_dropgrad": {"dropgrad": dropgrad},
        "adam_lr_scaled": {"lr": 1e-3 * math.sqrt(1 - p)},
        "adam_batch_12": {"batch_size": round(20 * (1 - p))},
        "adam_noise_matched": {"noise": {"kind": "matched", "drop_rate": p}},
        "adam_noise_fixed": {"noise": {"kind": "fixed", "drop_rate": p}},
        "adam_noise_annealed": {"noise": {"kind": "annealed", "drop_rate": p}},
        "sgd": sgd,
        "sgd_dropgrad": {**sgd, "dropgrad": dropgrad},
        "full_batch": {"batch_size": 200},
        "full_batch_dropgrad": {"batch_size": 200, "dropgrad": dropgrad},
    }


def plan(config: dict[str, Any], runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    common = {"steps": config["steps"], "eval_every": config["eval_every"]}
    return [
        training.job("mechanism", SETTING, arm, seed, {**common, **spec})
        for arm, spec in arms(config).items()
        for seed in range(config["seeds"])
    ]


STAGES = (plan,)
run = training.run_job


def summarize(runs: list[dict[str, Any]], config: dict[str, Any]) -> tuple[list[dict], list[str]]:
    rows: list[dict[str, Any]] = []
    pairs = [(SETTING, arm, reference) for arm, reference in PAIRS]
    lines = [
        "## Experiment 2: mechanism controls (digits MLP, 200 training images, "
        f"DropGrad at {config['drop_rate']})",
        "",
    ]
    for endpoint in (TEST_ACC, LOG_TRAIN_LOSS):
        comparisons = report.compare_family(runs, endpoint, pairs)
        table = report.by_seed(runs, endpoint, SETTING)
        arm_rows = [report.arm_row(SETTING, arm, *table[arm], endpoint) for arm in LABELS]
        rows += [{"kind": "arm", **row} for row in arm_rows]
        rows += report.comparison_rows(comparisons)
        lines += [report.endpoint_note(endpoint, len(comparisons)), ""]
        lines += report.comparison_table(arm_rows, comparisons, endpoint, LABELS, setting=SETTING)
        lines.append("")
    ratios = {
        arm: float(
            np.exp(np.mean([math.log(r["final"]["train_loss"]) for r in runs if r["arm"] == arm]))
        )
        for arm in LABELS
    }
    lines.append(
        "Geometric mean of the final training loss: "
        + ", ".join(f"{LABELS[arm]} {ratios[arm]:.4f}" for arm in LABELS)
        + "."
    )
    lines += ["", report.train_accuracy_note(runs, lambda r: LABELS[r["arm"]])]
    return rows, lines


def plot(
    runs: list[dict[str, Any]], rows: list[dict[str, Any]], config: dict[str, Any], where: Any
) -> list[FigureRecord]:
    plt = figures.pyplot()
    record = FigureRecord("mechanism.png")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, endpoint, scale in ((axes[0], TEST_ACC, 100), (axes[1], LOG_TRAIN_LOSS, 1)):
        chosen = [r for r in rows if r["kind"] == "comparison" and r["metric"] == endpoint.metric]
        figures.intervals(
            ax,
            record,
            f"Δ {endpoint.label}",
            [f"{LABELS[r['arm']]} vs {LABELS[r['reference']]}" for r in chosen],
            [scale * r["diff_mean"] for r in chosen],
            [scale * r["ci_low"] for r in chosen],
            [scale * r["ci_high"] for r in chosen],
            margin=scale * endpoint.margin,
        )
        ax.set_xlabel(f"Δ {endpoint.label} (95% t-interval; dotted: margin)")
    axes[1].set_yticks([])
    fig.suptitle("Mechanism controls: paired differences over seeds")
    figures.save(fig, where, record.file)
    return [record]
