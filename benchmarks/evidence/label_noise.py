"""Experiment 3: symmetric label noise, for the claim of "improved robustness against noise".

Setting (pre-declared)
    The digits MLP, 50 training images per class (500), the other 1,297 held out. In the
    noisy setting 40% of the training labels (200 images) are replaced by a different class,
    uniformly over the nine others; the held-out labels stay clean. Adam at 0.001,
    minibatches of 25, 3,000 steps (150 epochs): long enough for the unregularized network
    to fit every noisy label. Evaluated every 100 steps.

Arms
    ``none``; DropGrad at 0.2 and 0.4; Dropout 0.3 after each hidden layer as a reference
    regularizer; each at 0% and 40% label noise. 10 seeds were declared for these arms and
    20 run; a verdict that differs on the 10 declared seeds is marked exploratory.

Step-size control (added after the first results; declared with 20 seeds)
    Adam at ``0.001 * sqrt(1 - p)`` for p = 0.2 and 0.4 (``adam_lr_0.2``, ``adam_lr_0.4``),
    the step shrink DropGrad at rate p causes under Adam (experiment 2), at 0% and 40% noise.
    The same seeds as every other arm.

Longer horizon (added with the control; declared with 20 seeds)
    ``noise_40_long``: 40% noise and 6,000 steps (300 epochs), arms ``LONG_ARMS``.

Pairing
    A seed fixes the split, which labels are changed and to what, the initial weights, the
    batch order and the masks.

Endpoints (pre-declared)
    Primary: final held-out accuracy, margin ±1.0 point. Secondary: the best held-out
    accuracy over the evaluations (an oracle early-stopping number, optimistic for every arm
    alike), margin ±1.0 point; and at 40% noise, the share of the relabelled training images
    that the network predicts as their noisy label at the end ("memorized", lower is
    better), margin ±5 points. Each arm is compared with ``none`` at the same noise level.

    Step-size control family: each control against ``none`` and each DropGrad rate against
    the control of its rate, on the final held-out accuracy and on memorization.

    Matched memorization (declared with the control): for each seed, the final held-out
    accuracy of an arm minus the held-out accuracy of ``none`` with the same seed at the
    point where ``none`` had fitted the same share of the wrong labels that the arm fitted at
    its end (the first evaluation at which ``none`` reached that share, interpolated
    linearly from the evaluation before it). A regularizer that only slows fitting follows
    ``none``'s path and scores 0 here; one that learns more from the clean labels at equal
    memorization scores above 0. Margin ±1.0 point; one Holm family over both horizons.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import figures, report, stats, training
from .figures import FigureRecord

FULL: dict[str, Any] = {
    "seeds": 20,
    "declared_seeds": 10,
    "noise_levels": [0.0, 0.4],
    "train_per_class": 50,
    "batch_size": 25,
    "steps": 3000,
    "eval_every": 100,
    "long_noise": 0.4,
    "long_steps": 6000,
}
QUICK: dict[str, Any] = {
    **FULL,
    "seeds": 2,
    "declared_seeds": 1,
    "steps": 40,
    "eval_every": 20,
    "long_steps": 60,
}

#: The arms of the first run (10 declared seeds, 20 run).
ARMS: dict[str, dict[str, Any]] = {
    "none": {},
    "dropgrad_0.2": {"dropgrad": {"drop_rate": 0.2}},
    "dropgrad_0.4": {"dropgrad": {"drop_rate": 0.4}},
    "dropout_0.3": {"dropout": 0.3},
}
#: The step-size controls: Adam's learning rate times sqrt(1 - p), no mask.
CONTROLS: dict[str, dict[str, Any]] = {
    f"adam_lr_{p}": {"lr": 1e-3 * math.sqrt(1 - p)} for p in (0.2, 0.4)
}
ALL_ARMS = {**ARMS, **CONTROLS}
LONG_ARMS = ("none", "dropgrad_0.4", "adam_lr_0.4", "dropout_0.3")
LABELS = {
    "none": "none",
    "dropgrad_0.2": "DropGrad 0.2",
    "dropgrad_0.4": "DropGrad 0.4",
    "dropout_0.3": "Dropout 0.3",
    "adam_lr_0.2": "Adam, lr × √(1 − 0.2)",
    "adam_lr_0.4": "Adam, lr × √(1 − 0.4)",
}
#: (DropGrad arm, its step-size control).
CONTROL_PAIRS = (("dropgrad_0.2", "adam_lr_0.2"), ("dropgrad_0.4", "adam_lr_0.4"))
LONG = "noise_40_long"
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
MATCHED = report.Endpoint(
    "matched_test_acc",
    "held-out accuracy at matched memorization (%)",
    margin=0.01,
    scale=100,
)


def setting_name(noise: float) -> str:
    return f"noise_{round(100 * noise)}"


def setting_text(setting: str, config: dict[str, Any]) -> str:
    """``40% label noise`` or ``40% label noise, 6,000 steps`` for the longer horizon."""
    noise = setting.split("_")[1]
    if setting == LONG:
        return f"{noise}% label noise, {config['long_steps']:,} steps"
    return f"{noise}% label noise"


def settings(config: dict[str, Any]) -> list[tuple[str, float, int, tuple[str, ...]]]:
    """``(setting, noise, steps, arms)`` for every setting of the experiment."""
    chosen = [
        (setting_name(noise), noise, config["steps"], tuple(ALL_ARMS))
        for noise in config["noise_levels"]
    ]
    if config.get("long_steps"):
        chosen.append((LONG, config["long_noise"], config["long_steps"], LONG_ARMS))
    return chosen


def plan(config: dict[str, Any], runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    common = {key: config[key] for key in ("train_per_class", "batch_size", "eval_every")}
    return [
        training.job(
            "label_noise",
            setting,
            arm,
            seed,
            {**common, **ALL_ARMS[arm], "steps": steps, "label_noise": noise},
        )
        for setting, noise, steps, arms in settings(config)
        for arm in arms
        for seed in range(config["seeds"])
    ]


def matched_accuracy(reference: dict[str, Any], memorized: float) -> tuple[float, bool]:
    """Held-out accuracy of ``reference`` when it had first fitted ``memorized`` of the wrong
    labels, interpolated linearly between evaluations; and whether it ever reached that share
    (if not, its final accuracy is returned)."""
    shares = reference["curves"]["memorized"]
    accuracies = reference["curves"]["test_acc"]
    for k, share in enumerate(shares):
        if share >= memorized:
            if k == 0 or share == shares[k - 1]:
                return accuracies[k], True
            fraction = (memorized - shares[k - 1]) / (share - shares[k - 1])
            return accuracies[k - 1] + fraction * (accuracies[k] - accuracies[k - 1]), True
    return accuracies[-1], False


def matched_comparisons(
    runs: list[dict[str, Any]], pairs: list[tuple[str, str]]
) -> list[stats.Comparison]:
    """One family: each ``(setting, arm)`` against ``none`` at matched memorization."""
    comparisons = []
    for setting, arm in pairs:
        mine = {r["seed"]: r for r in runs if r["setting"] == setting and r["arm"] == arm}
        base = {r["seed"]: r for r in runs if r["setting"] == setting and r["arm"] == "none"}
        seeds = sorted(set(mine) & set(base))
        if not seeds:
            continue
        values = {s: mine[s]["final"]["test_acc"] for s in seeds}
        matched = {s: matched_accuracy(base[s], mine[s]["final"]["memorized"]) for s in seeds}
        comparison = stats.compare(
            values,
            {s: matched[s][0] for s in seeds},
            arm=arm,
            reference="none",
            metric=MATCHED.metric,
            margin=MATCHED.margin,
        )
        comparison.extra["setting"] = setting
        comparison.extra["not_reached"] = sum(not matched[s][1] for s in seeds)
        comparisons.append(comparison)
    return stats.with_holm(comparisons)


STAGES = (plan,)
run = training.run_job


def _tables(
    runs: list[dict[str, Any]],
    config: dict[str, Any],
    endpoint: report.Endpoint,
    comparisons: list[stats.Comparison],
    chosen: list[str],
    arms: list[str],
) -> tuple[list[dict], list[str]]:
    rows: list[dict[str, Any]] = []
    lines: list[str] = []
    for setting in chosen:
        table = report.by_seed(runs, endpoint, setting)
        arm_rows = [
            report.arm_row(setting, arm, *table[arm], endpoint) for arm in arms if arm in table
        ]
        rows += [{"kind": "arm", **row} for row in arm_rows]
        lines += [f"**{setting_text(setting, config)}, {endpoint.label}**", ""]
        lines += report.comparison_table(arm_rows, comparisons, endpoint, LABELS, setting=setting)
        lines.append("")
    return rows, lines


def summarize(runs: list[dict[str, Any]], config: dict[str, Any]) -> tuple[list[dict], list[str]]:
    rows: list[dict[str, Any]] = []
    present = {r["setting"] for r in runs}
    first = [setting_name(noise) for noise in config["noise_levels"]]
    noisy = [s for s, noise in zip(first, config["noise_levels"]) if noise > 0]
    declared = config.get("declared_seeds")
    lines = ["## Experiment 3: symmetric label noise (digits MLP, Adam, 500 training images)", ""]
    lines += [
        f"Primary families: the first arms, {declared} seeds declared; a verdict that differs "
        "on the declared seeds alone is marked exploratory.",
        "",
    ]
    for endpoint, chosen in ((FINAL, first), (BEST, first), (MEMORIZED, noisy)):
        pairs = [(s, arm, "none") for s in chosen for arm in ARMS if arm != "none"]
        comparisons = report.compare_family(runs, endpoint, pairs, declared=declared)
        rows += report.comparison_rows(comparisons)
        lines += [report.endpoint_note(endpoint, len(comparisons)), ""]
        new_rows, new_lines = _tables(runs, config, endpoint, comparisons, chosen, list(ARMS))
        rows += new_rows
        lines += new_lines
    # The step-size controls, in their own families (declared with all their seeds).
    lines += ["### Experiment 3b: the step-size control, Adam at lr × √(1 − p)", ""]
    for endpoint, chosen in ((FINAL, first), (MEMORIZED, noisy)):
        pairs = [(s, control, "none") for s in chosen for _, control in CONTROL_PAIRS]
        pairs += [(s, arm, control) for s in chosen for arm, control in CONTROL_PAIRS]
        comparisons = report.compare_family(runs, endpoint, pairs)
        for c in comparisons:
            c.extra["family"] = "step-size control"
        rows += report.comparison_rows(comparisons)
        lines += [report.endpoint_note(endpoint, len(comparisons)), ""]
        arms = ["none", *(control for _, control in CONTROL_PAIRS), *(a for a, _ in CONTROL_PAIRS)]
        lines += _tables(runs, config, endpoint, comparisons, chosen, arms)[1]
    if LONG in present:
        lines += [
            f"### Experiment 3c: the longer horizon ({config['long_steps']:,} steps, 40% noise)",
            "",
        ]
        for endpoint in (FINAL, BEST, MEMORIZED):
            pairs = [(LONG, arm, "none") for arm in LONG_ARMS if arm != "none"]
            pairs += [(LONG, arm, control) for arm, control in CONTROL_PAIRS if arm in LONG_ARMS]
            comparisons = report.compare_family(runs, endpoint, pairs)
            for c in comparisons:
                c.extra["family"] = "longer horizon"
            rows += report.comparison_rows(comparisons)
            lines += [report.endpoint_note(endpoint, len(comparisons)), ""]
            new_rows, new_lines = _tables(
                runs, config, endpoint, comparisons, [LONG], list(LONG_ARMS)
            )
            rows += new_rows
            lines += new_lines
    # Matched memorization: one family over both horizons.
    pairs = [(s, arm) for s in noisy for arm in ALL_ARMS if arm != "none"]
    pairs += [(LONG, arm) for arm in LONG_ARMS if arm != "none" and LONG in present]
    matched = matched_comparisons(runs, pairs)
    for c in matched:
        c.extra["family"] = "matched memorization"
    rows += report.comparison_rows(matched)
    lines += [
        "### Experiment 3d: held-out accuracy at matched memorization",
        "",
        "Each arm's final held-out accuracy minus that of `none` with the same seed at the "
        "point where `none` had fitted the same share of the wrong labels (interpolated "
        "between evaluations). 0 means the arm follows `none`'s path, later.",
        "",
        report.endpoint_note(MATCHED, len(matched)),
        "",
        "| Setting | Arm | Δ vs none at matched memorization [95% CI] | seeds better/worse/tied "
        "| p sign-flip (Holm) | p TOST (Holm) | seeds where none never fitted as many | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in matched:
        lines.append(
            f"| {setting_text(c.extra['setting'], config)} | {LABELS[c.arm]} "
            f"| {report.fmt_diff(c, MATCHED)} | {report.fmt_counts(c)} "
            f"| {report.fmt_p(c.p_sign)} ({report.fmt_p(c.p_sign_holm)}) "
            f"| {report.fmt_p(c.p_tost)} ({report.fmt_p(c.p_tost_holm)}) "
            f"| {c.extra['not_reached']} | {report.fmt_verdict(c, MATCHED)} |"
        )
    lines.append("")
    return rows, lines


def panels(config: dict[str, Any], present: set[str]) -> list[tuple[str, str, str]]:
    """``(title, setting, key)`` of each curve panel of ``label_noise.png``."""
    chosen = []
    for setting, noise, _, _ in settings(config):
        if setting not in present:
            continue
        keys = [("test_acc", "held-out accuracy (%)")]
        if noise > 0:
            keys.append(("memorized", "relabelled images fitted (%)"))
        chosen += [
            (f"{setting_text(setting, config)}: {ylabel}", setting, key) for key, ylabel in keys
        ]
    return chosen


def path_title(setting: str, config: dict[str, Any]) -> str:
    return f"{setting_text(setting, config)}: held-out accuracy against wrong labels fitted"


#: One colour per arm in every panel.
COLORS = {
    "none": "tab:blue",
    "dropgrad_0.2": "tab:orange",
    "dropgrad_0.4": "tab:green",
    "dropout_0.3": "tab:red",
    "adam_lr_0.2": "tab:purple",
    "adam_lr_0.4": "tab:brown",
}


def plot(
    runs: list[dict[str, Any]], rows: list[dict[str, Any]], config: dict[str, Any], where: Any
) -> list[FigureRecord]:
    plt = figures.pyplot()
    record = FigureRecord("label_noise.png")
    present = {r["setting"] for r in runs}
    chosen = panels(config, present)
    # One row per setting: its curves, then (with label noise) accuracy against memorization.
    layout: list[list[tuple[str, str, str]]] = []
    for setting, noise, _, _ in settings(config):
        if setting not in present:
            continue
        row = [panel for panel in chosen if panel[1] == setting]
        if noise > 0:
            row.append((path_title(setting, config), setting, "path"))
        layout.append(row)
    columns = max(len(row) for row in layout)
    fig, axes = plt.subplots(
        len(layout), columns, figsize=(4.6 * columns, 3.7 * len(layout)), squeeze=False
    )
    for ax_row, row in zip(axes, layout):
        for ax in ax_row[len(row) :]:
            ax.axis("off")
        for ax, (title, setting, key) in zip(ax_row, row):
            mine_by_arm = {
                arm: [r for r in runs if r["setting"] == setting and r["arm"] == arm]
                for arm in ALL_ARMS
            }
            for arm, mine in mine_by_arm.items():
                if not mine:
                    continue
                color = COLORS[arm]
                if key == "path":
                    memorized = 100 * np.array([r["curves"]["memorized"] for r in mine]).mean(0)
                    accuracy = 100 * np.array([r["curves"]["test_acc"] for r in mine]).mean(0)
                    ax.plot(memorized, accuracy, label=LABELS[arm], linewidth=1.2, color=color)
                    record.add(title, LABELS[arm], accuracy)
                    continue
                stacked = 100 * np.array([r["curves"][key] for r in mine])
                steps = mine[0]["curves"]["step"]
                figures.curve(ax, record, title, LABELS[arm], steps, stacked, color=color)
            if key == "path":
                ax.set_title(
                    f"{setting_text(setting, config)}:\naccuracy against wrong labels fitted"
                )
                ax.set_xlabel("relabelled images fitted (%), mean over seeds")
                ax.set_ylabel("held-out accuracy (%), mean over seeds")
            else:
                ax.set_title(title.replace(": ", ":\n"))
                ax.set_xlabel("step")
                ax.set_ylabel(title.split(": ")[1])
            ax.legend()
    fig.suptitle("Label noise: mean over seeds (line), seed range (shaded)")
    figures.save(fig, where, record.file)
    return [record]
