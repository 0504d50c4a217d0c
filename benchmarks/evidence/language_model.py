"""Experiment 6: a character-level language model that overfits its training text.

Setting (pre-declared)
    The text of ``pydoc_data.topics`` cut into 500-character blocks and shuffled once (seed
    0): the first 5,000 characters of blocks are the training text, the next 10,000 the
    validation text, so both sample the same documents (an in-domain split). A GRU
    (embedding 32, 96 hidden units, linear read-out) trained with Adam at 0.003, gradient
    norm clipped at 1, 500 steps of 32 random windows of 32 characters: about 100 passes over
    the training text, enough to pass the validation minimum and overfit well beyond it.
    Every 25 steps the whole validation text is scored (every non-overlapping 32-character
    window) and so is the whole training text.

Arms
    ``none``; Dropout 0.2 on the GRU outputs; DropGrad at 0.1 and 0.2; and Adam at
    0.003 × √(1 − 0.2), the step shrink DropGrad 0.2 causes under Adam (experiment 2 found
    DropGrad at 0.4 equivalent to Adam at lr × √0.6). This control was added after the
    first four arms had run; it asks whether DropGrad's smaller rise after the minimum is
    more than the slower fitting of a smaller step.

Pairing
    The split is the same for every run; a seed fixes the initial weights, the windows and
    the masks.

Endpoints (pre-declared)
    Primary: the minimum validation loss (nats per character) over the evaluations, lower
    is better, margin ±0.01 nats (1% in perplexity). Secondary: the rise after the minimum
    (final minus minimum validation loss; smaller means less overfitting), margin ±0.01.
    Each arm is compared with ``none``, and DropGrad 0.2 with the learning-rate control.

Experiment 5 (``masking``) runs this model too, with its own optimizer and DropGrad
arguments: :func:`run` reads ``optimizer``, ``lr``, ``momentum`` and ``dropgrad`` from the
job's ``regularizer`` when they are there.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import data, figures, models, report, stats
from .figures import FigureRecord

FULL: dict[str, Any] = {
    "seeds": 10,
    "train_chars": 5_000,
    "val_chars": 10_000,
    "block": 500,
    "split_seed": 0,
    "seq_len": 32,
    "batch_size": 32,
    "steps": 500,
    "eval_every": 25,
    "embed": 32,
    "hidden": 96,
    "lr": 3e-3,
    "clip": 1.0,
}
QUICK: dict[str, Any] = {**FULL, "seeds": 2, "steps": 10, "eval_every": 5, "val_chars": 2_000}

ARMS: dict[str, dict[str, Any]] = {
    "none": {},
    "dropout_0.2": {"dropout": 0.2},
    "dropgrad_0.1": {"drop_rate": 0.1},
    "dropgrad_0.2": {"drop_rate": 0.2},
    "adam_lr_matched_0.2": {"lr_scale": math.sqrt(1 - 0.2)},
}
LABELS = {
    "none": "none",
    "dropout_0.2": "Dropout 0.2",
    "dropgrad_0.1": "DropGrad 0.1",
    "dropgrad_0.2": "DropGrad 0.2",
    "adam_lr_matched_0.2": "Adam, lr × √(1 − 0.2)",
}
#: ``(arm, reference)``: every arm against none, and DropGrad 0.2 against its step shrink.
PAIRS = [(arm, "none") for arm in ARMS if arm != "none"] + [("dropgrad_0.2", "adam_lr_matched_0.2")]
SETTING = "char_gru"
MIN_VAL = report.Endpoint(
    "min_val_loss",
    "minimum validation loss (nats/char)",
    margin=0.01,
    higher_is_better=False,
    digits=3,
)
RISE = report.Endpoint(
    "rise_after_min",
    "rise after the minimum (nats/char)",
    margin=0.01,
    higher_is_better=False,
    digits=3,
)


def job(
    experiment: str, setting: str, arm: str, seed: int, spec: dict[str, Any], config: dict[str, Any]
) -> dict[str, Any]:
    """A runner job that trains the GRU of ``config`` with the arm's ``spec``."""
    return {
        "experiment": experiment,
        "id": f"{setting}/{arm}/{seed:03d}",
        "setting": setting,
        "arm": arm,
        "seed": seed,
        "regularizer": spec,
        "config": config,
        "cost": 10.0 * config["steps"],
    }


def plan(config: dict[str, Any], runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        job("language_model", SETTING, arm, seed, spec, config)
        for arm, spec in ARMS.items()
        for seed in range(config["seeds"])
    ]


STAGES = (plan,)


@torch.no_grad()
def score(model: nn.Module, text: Tensor, seq_len: int, batch: int = 64) -> float:
    """Mean next-character loss over every non-overlapping window of ``text``."""
    model.eval()
    windows = (len(text) - 1) // seq_len
    inputs = text[: windows * seq_len].view(windows, seq_len)
    targets = text[1 : windows * seq_len + 1].view(windows, seq_len)
    total = 0.0
    for start in range(0, windows, batch):
        logits = model(inputs[start : start + batch])
        total += float(
            F.cross_entropy(
                logits.flatten(0, 1), targets[start : start + batch].flatten(), reduction="sum"
            )
        )
    model.train()
    return total / targets.numel()


def run(job: dict[str, Any]) -> dict[str, Any]:
    config, seed, reg = job["config"], job["seed"], job["regularizer"]
    split = data.in_domain_text_split(
        config["train_chars"], config["val_chars"], config["block"], config["split_seed"]
    )
    torch.manual_seed(seed)
    model = models.CharGRU(
        split.vocabulary_size, config["embed"], config["hidden"], reg.get("dropout", 0.0)
    )
    lr = reg.get("lr", config["lr"]) * reg.get("lr_scale", 1.0)
    optimizer: torch.optim.Optimizer
    decay = reg.get("weight_decay", 0.0)
    if reg.get("optimizer", "adam") == "sgd":
        optimizer = torch.optim.SGD(
            model.parameters(), lr=lr, momentum=reg.get("momentum", 0.0), weight_decay=decay
        )
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=decay)
    dropgrad = reg.get("dropgrad") or (
        {"drop_rate": reg["drop_rate"]} if "drop_rate" in reg else None
    )
    if dropgrad:
        from dropgrad import DropGrad

        optimizer = DropGrad(optimizer, **dropgrad, seed=seed)
    windows = torch.Generator().manual_seed(seed)
    seq_len, train = config["seq_len"], split.train
    curves: dict[str, list[float]] = {"step": [], "train_loss": [], "val_loss": []}
    for step in range(1, config["steps"] + 1):
        starts = torch.randint(
            0, len(train) - seq_len - 1, (config["batch_size"],), generator=windows
        )
        offsets = starts[:, None] + torch.arange(seq_len)
        optimizer.zero_grad()
        logits = model(train[offsets])
        F.cross_entropy(logits.flatten(0, 1), train[offsets + 1].flatten()).backward()
        nn.utils.clip_grad_norm_(model.parameters(), config["clip"])
        optimizer.step()
        if step % config["eval_every"] == 0 or step == config["steps"]:
            curves["step"].append(step)
            curves["train_loss"].append(score(model, train, seq_len))
            curves["val_loss"].append(score(model, split.val, seq_len))
    val = np.asarray(curves["val_loss"])
    best = int(val.argmin())
    return {
        "final": {
            "min_val_loss": float(val[best]),
            "min_step": curves["step"][best],
            "final_val_loss": float(val[-1]),
            "rise_after_min": float(val[-1] - val[best]),
            "final_train_loss": curves["train_loss"][-1],
            "collapsed": not math.isfinite(float(val[-1])),
        },
        "curves": curves,
    }


def summarize(runs: list[dict[str, Any]], config: dict[str, Any]) -> tuple[list[dict], list[str]]:
    rows: list[dict[str, Any]] = []
    pairs = [(SETTING, arm, reference) for arm, reference in PAIRS]
    lines = [
        "## Experiment 6: character-level GRU on an in-domain split of pydoc_data.topics",
        "",
    ]
    for endpoint in (MIN_VAL, RISE):
        comparisons = report.compare_family(runs, endpoint, pairs)
        table = report.by_seed(runs, endpoint, SETTING)
        arm_rows = [
            report.arm_row(SETTING, arm, *table[arm], endpoint) for arm in ARMS if arm in table
        ]
        rows += [{"kind": "arm", **row} for row in arm_rows]
        rows += report.comparison_rows(comparisons)
        lines += [report.endpoint_note(endpoint, len(comparisons)), ""]
        lines += report.comparison_table(arm_rows, comparisons, endpoint, LABELS, setting=SETTING)
        lines.append("")
    lines += [
        "| Arm | step of the minimum (mean, range) | final validation loss | final training loss |",
        "|---|---|---|---|",
    ]
    for arm in ARMS:
        mine = [r["final"] for r in runs if r["arm"] == arm]
        if not mine:
            continue
        steps = [f["min_step"] for f in mine]
        val_mean, val_std = stats.mean_std([f["final_val_loss"] for f in mine])
        lines.append(
            f"| {LABELS[arm]} | {np.mean(steps):.0f} ({min(steps)}–{max(steps)}) "
            f"| {val_mean:.3f} ± {val_std:.3f} "
            f"| {np.mean([f['final_train_loss'] for f in mine]):.3f} |"
        )
    return rows, lines


def plot(
    runs: list[dict[str, Any]], rows: list[dict[str, Any]], config: dict[str, Any], where: Any
) -> list[FigureRecord]:
    return figures.loss_curves(
        runs,
        ARMS,
        LABELS,
        "language_model.png",
        "Character-level GRU, in-domain split: mean over seeds, seed range shaded",
        where,
    )
