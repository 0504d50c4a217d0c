"""Experiment 5: where the mask goes: gradient or update; element, row or tensor.

Under momentum and Adam a dropped gradient entry still moves its parameter (see the
``motion`` measurement), so masking the gradient and masking the update are different
methods. This experiment runs both, at three granularities, with the two stateful
optimizers people use, on two models.

Settings (pre-declared)
    Digits: the digits MLP on 200 training images (20 per class), 600 steps of minibatches
    of 20, the other 1,597 images held out. Adam at 0.001, and SGD with momentum 0.9 at
    0.05. 20 seeds.

    Language model: the character-level GRU of experiment 6 (``language_model``), same
    split, 500 steps, gradient norm clipped at 1. Adam at 0.003 (experiment 6's rate), and
    SGD with momentum 0.9 at 0.1. 10 seeds. These settings were added after the digits had
    run.

Learning rate of SGD with momentum on the GRU (a selection step, not a comparison)
    Candidates 0.03, 0.1, 0.3 and 1.0, trained without masking on seeds 100 and 101 (never
    used in the comparisons); the rate with the lowest mean minimum validation loss is used:
    0.1 (2.316 nats/char, against 2.448, 2.346 and 2.455). At 0.03 the validation loss still
    fell at the last step. Seed 102 was added later, so that the selection rests on 3 seeds;
    over the three, 0.1 still leads (2.316, against 2.451, 2.354 and 2.461). The check's
    runs are kept (setting ``lm_sgd_lr_check``) and tabulated beside the comparisons.

Arms
    ``none``; ``DropGrad(target=..., granularity=...)`` at rate 0.2 for every combination of
    target ``"gradient"`` / ``"update"`` and granularity ``"element"`` / ``"row"`` /
    ``"tensor"``; and the SkipUpdate configuration: rate 0.5, ``granularity="tensor"``,
    ``target="update"``. The same arms in every setting.

Pairing
    A seed fixes the split (digits), initial weights, batch order or windows, and masks.

Endpoints (pre-declared)
    Digits: primary, final held-out accuracy, margin ±1.0 point; secondary, the natural log
    of the final training loss, margin ±ln 1.25. Language model: those of experiment 6,
    the minimum validation loss (primary) and its rise after the minimum (secondary), both
    in nats per character with margin ±0.01. Every arm against ``none`` within its setting;
    one Holm family per endpoint.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import numpy as np

from . import figures, language_model, report, training
from .figures import FigureRecord

FULL: dict[str, Any] = {
    "seeds": 20,
    "steps": 600,
    "eval_every": 50,
    "drop_rate": 0.2,
    "lm_seeds": 10,
    "lm_sgd_lr": 0.1,
    "lm_lr_candidates": [0.03, 0.1, 0.3, 1.0],
    "lm_lr_check_seeds": [100, 101, 102],
    "lm": {k: v for k, v in language_model.FULL.items() if k != "seeds"},
}
QUICK: dict[str, Any] = {
    **FULL,
    "seeds": 2,
    "steps": 20,
    "eval_every": 10,
    "lm_seeds": 2,
    "lm_lr_candidates": [0.1, 0.3],
    "lm_lr_check_seeds": [100],
    "lm": {k: v for k, v in language_model.QUICK.items() if k != "seeds"},
}

SETTINGS: dict[str, dict[str, Any]] = {
    "adam": {"optimizer": "adam", "lr": 1e-3},
    "sgd_momentum": {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9},
}
SETTING_LABELS = {
    "adam": "Adam",
    "sgd_momentum": "SGD + momentum",
    "lm_adam": "GRU, Adam",
    "lm_sgd_momentum": "GRU, SGD + momentum",
}
LM_SETTINGS = ("lm_adam", "lm_sgd_momentum")
LM_CHECK = "lm_sgd_lr_check"
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


def lm_base(setting: str, config: dict[str, Any]) -> dict[str, Any]:
    if setting == "lm_adam":
        return {"optimizer": "adam", "lr": config["lm"]["lr"]}
    return {"optimizer": "sgd", "lr": config["lm_sgd_lr"], "momentum": 0.9}


def plan(config: dict[str, Any], runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    common = {"steps": config["steps"], "eval_every": config["eval_every"]}
    jobs = [
        training.job("masking", setting, arm, seed, {**common, **base, "dropgrad": dropgrad})
        for setting, base in SETTINGS.items()
        for arm, dropgrad in arms(config).items()
        for seed in range(config["seeds"])
    ]
    jobs += [
        language_model.job(
            "masking",
            setting,
            arm,
            seed,
            {**lm_base(setting, config), "dropgrad": dropgrad},
            config["lm"],
        )
        for setting in LM_SETTINGS
        for arm, dropgrad in arms(config).items()
        for seed in range(config["lm_seeds"])
    ]
    jobs += [
        language_model.job(
            "masking",
            LM_CHECK,
            f"lr={lr:g}",
            seed,
            {"optimizer": "sgd", "lr": lr, "momentum": 0.9},
            config["lm"],
        )
        for lr in config["lm_lr_candidates"]
        for seed in config["lm_lr_check_seeds"]
    ]
    return jobs


def run(job: dict[str, Any]) -> dict[str, Any]:
    return language_model.run(job) if "regularizer" in job else training.run_job(job)


STAGES = (plan,)


def lr_check_lines(runs: list[dict[str, Any]], config: dict[str, Any]) -> list[str]:
    """The selection step for the GRU's SGD learning rate: one row per candidate."""
    lines = [
        "**GRU, SGD + momentum: learning-rate check (selection step, no masking, seeds "
        f"{', '.join(str(s) for s in config['lm_lr_check_seeds'])}; not a comparison)**",
        "",
        "| Learning rate | minimum validation loss (nats/char) | step of the minimum "
        "| rise after the minimum | used |",
        "|---|---|---|---|---|",
    ]
    for lr in config["lm_lr_candidates"]:
        mine = [r["final"] for r in runs if r["setting"] == LM_CHECK and r["arm"] == f"lr={lr:g}"]
        if not mine:
            continue
        steps = ", ".join(str(f["min_step"]) for f in mine)
        lines.append(
            f"| {lr:g} | {np.mean([f['min_val_loss'] for f in mine]):.3f} | {steps} "
            f"| {np.mean([f['rise_after_min'] for f in mine]):.3f} "
            f"| {'yes' if lr == config['lm_sgd_lr'] else ''} |"
        )
    return lines


def _tables(
    runs: list[dict[str, Any]],
    config: dict[str, Any],
    settings: tuple[str, ...],
    endpoints: tuple[report.Endpoint, ...],
) -> tuple[list[dict], list[str]]:
    """One Holm family per endpoint over ``settings``, one table per setting and endpoint."""
    names = list(arms(config))
    labels = {arm: label(arm, config) for arm in names}
    pairs = [(s, arm, "none") for s in settings for arm in names if arm != "none"]
    rows: list[dict[str, Any]] = []
    lines: list[str] = []
    for endpoint in endpoints:
        comparisons = report.compare_family(runs, endpoint, pairs)
        rows += report.comparison_rows(comparisons)
        lines += [report.endpoint_note(endpoint, len(comparisons)), ""]
        for setting in settings:
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
    return rows, lines


def summarize(runs: list[dict[str, Any]], config: dict[str, Any]) -> tuple[list[dict], list[str]]:
    digits = [r for r in runs if r["setting"] in SETTINGS]
    rows, body = _tables(digits, config, tuple(SETTINGS), (TEST_ACC, LOG_TRAIN_LOSS))
    lines = ["## Experiment 5: where the mask goes (digits MLP, 200 training images)", ""]
    lines += body
    lines.append(
        report.train_accuracy_note(
            digits, lambda r: f"{SETTING_LABELS[r['setting']]}, {label(r['arm'], config)}"
        )
    )
    lm_runs = [r for r in runs if r["setting"] in LM_SETTINGS]
    if lm_runs or any(r["setting"] == LM_CHECK for r in runs):
        lm_rows, lm_body = _tables(
            lm_runs, config, LM_SETTINGS, (language_model.MIN_VAL, language_model.RISE)
        )
        rows += lm_rows
        lines += [
            "",
            "## Experiment 5: where the mask goes (character-level GRU of experiment 6)",
            "",
            *lr_check_lines(runs, config),
            "",
            *lm_body,
            "| Setting | Arm | step of the minimum (mean, range) | final training loss |",
            "|---|---|---|---|",
        ]
        for setting in LM_SETTINGS:
            for arm in arms(config):
                mine = [r["final"] for r in lm_runs if (r["setting"], r["arm"]) == (setting, arm)]
                if not mine:
                    continue
                steps = [f["min_step"] for f in mine]
                lines.append(
                    f"| {SETTING_LABELS[setting]} | {label(arm, config)} "
                    f"| {np.mean(steps):.0f} ({min(steps)}–{max(steps)}) "
                    f"| {np.mean([f['final_train_loss'] for f in mine]):.3f} |"
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
    records = [record]
    lm_rows = [r for r in rows if r["kind"] == "comparison" and r["setting"] in LM_SETTINGS]
    if lm_rows:
        records.append(plot_language_model(lm_rows, config, where))
    return records


def plot_language_model(
    rows: list[dict[str, Any]], config: dict[str, Any], where: Any
) -> FigureRecord:
    plt = figures.pyplot()
    record = FigureRecord("masking_language_model.png")
    endpoints = (language_model.MIN_VAL, language_model.RISE)
    fig, axes = plt.subplots(
        len(LM_SETTINGS), len(endpoints), figsize=(12, 3.8 * len(LM_SETTINGS)), squeeze=False
    )
    for ax_row, setting in zip(axes, LM_SETTINGS):
        for ax, endpoint in zip(ax_row, endpoints):
            chosen = [r for r in rows if (r["setting"], r["metric"]) == (setting, endpoint.metric)]
            figures.intervals(
                ax,
                record,
                f"{SETTING_LABELS[setting]}: Δ {endpoint.label}",
                [label(r["arm"], config) for r in chosen],
                [r["diff_mean"] for r in chosen],
                [r["ci_low"] for r in chosen],
                [r["ci_high"] for r in chosen],
                margin=endpoint.margin,
            )
            ax.set_title(f"{SETTING_LABELS[setting]}: {endpoint.label.split(' (')[0]}")
            ax.set_xlabel("Δ vs none (nats/char, 95% t-interval)")
            ax.xaxis.set_major_locator(plt.MaxNLocator(6))
    figures.save(fig, where, record.file)
    return record
