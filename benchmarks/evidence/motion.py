"""Do coordinates whose gradient was dropped still move? A measurement, not a comparison.

Setting
    The digits MLP on 200 training images with DropGrad at 0.4 for 300 steps of minibatches of
    20, under plain SGD (learning rate 0.05), SGD with momentum 0.9 (0.05) and Adam (0.001).
    From step 11 on (so that optimizer state exists), every gradient entry that was non-zero
    before DropGrad and zero after it counts as dropped; we record whether its parameter
    changed in that step and by how much, against the entries whose gradient was kept.

Reported per optimizer (mean ± sd over seeds): the share of entries dropped, the share of
dropped entries that still moved, and the mean absolute movement of dropped entries
relative to kept ones.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from . import data, figures, models, stats
from .figures import FigureRecord

FULL: dict[str, Any] = {"seeds": 10, "steps": 300, "drop_rate": 0.4, "warmup": 10}
QUICK: dict[str, Any] = {**FULL, "seeds": 2, "steps": 20}

#: Optimizer key -> (constructor arguments, label). Plain SGD is not "SGD + momentum".
OPTIMIZERS: dict[str, tuple[dict[str, Any], str]] = {
    "sgd": ({"name": "sgd", "lr": 0.05, "momentum": 0.0}, "plain SGD"),
    "sgd_momentum": ({"name": "sgd", "lr": 0.05, "momentum": 0.9}, "SGD + momentum"),
    "adam": ({"name": "adam", "lr": 1e-3}, "Adam"),
}
LABELS = {key: label for key, (_, label) in OPTIMIZERS.items()}
METRICS = (
    "dropped_fraction",
    "dropped_moved_fraction",
    "update_ratio_dropped_to_kept",
)
SETTING = "mlp_digits"


def plan(config: dict[str, Any], runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "experiment": "motion",
            "id": f"{SETTING}/{arm}/{seed:03d}",
            "setting": SETTING,
            "arm": arm,
            "seed": seed,
            "config": config,
            "cost": config["steps"],
        }
        for arm in OPTIMIZERS
        for seed in range(config["seeds"])
    ]


STAGES = (plan,)


def run(job: dict[str, Any]) -> dict[str, Any]:
    from dropgrad import DropGrad

    config, seed = job["config"], job["seed"]
    x_all, y_all = data.digits()
    split = data.stratified_split(seed, 20)
    x_train, y_train = x_all[split.train], y_all[split.train]
    torch.manual_seed(seed)
    model = models.mlp(128)
    params = list(model.parameters())
    settings, _ = OPTIMIZERS[job["arm"]]
    if settings["name"] == "sgd":
        base: torch.optim.Optimizer = torch.optim.SGD(
            params, lr=settings["lr"], momentum=settings["momentum"]
        )
    else:
        base = torch.optim.Adam(params, lr=settings["lr"])
    optimizer = DropGrad(base, drop_rate=config["drop_rate"], seed=seed)
    dropped_total = dropped_moved = kept_total = 0
    dropped_movement = kept_movement = 0.0
    batches = data.index_stream(len(y_train), 20, config["steps"], seed)
    for step, batch in enumerate(batches):
        optimizer.zero_grad()
        F.cross_entropy(model(x_train[batch]), y_train[batch]).backward()
        raw = [p.grad.clone() for p in params]
        before = [p.detach().clone() for p in params]
        optimizer.step()
        if step < config["warmup"]:
            continue
        for p, g, old in zip(params, raw, before):
            dropped = (g != 0) & (p.grad == 0)
            kept = p.grad != 0
            movement = (p.detach() - old).abs()
            dropped_total += int(dropped.sum())
            dropped_moved += int((movement[dropped] > 0).sum())
            dropped_movement += float(movement[dropped].sum())
            kept_total += int(kept.sum())
            kept_movement += float(movement[kept].sum())
    mean_dropped = dropped_movement / max(dropped_total, 1)
    mean_kept = kept_movement / max(kept_total, 1)
    return {
        "final": {
            "dropped_fraction": dropped_total / max(dropped_total + kept_total, 1),
            "dropped_moved_fraction": dropped_moved / max(dropped_total, 1),
            "mean_abs_update_dropped": mean_dropped,
            "mean_abs_update_kept": mean_kept,
            "update_ratio_dropped_to_kept": mean_dropped / mean_kept if mean_kept else 0.0,
        }
    }


def summarize(runs: list[dict[str, Any]], config: dict[str, Any]) -> tuple[list[dict], list[str]]:
    rows = []
    for arm in OPTIMIZERS:
        mine = [r["final"] for r in runs if r["arm"] == arm]
        if not mine:
            continue
        row: dict[str, Any] = {"kind": "arm", "setting": SETTING, "arm": arm, "n": len(mine)}
        for metric in METRICS:
            row[f"{metric}_mean"], row[f"{metric}_std"] = stats.mean_std([f[metric] for f in mine])
        rows.append(row)
    lines = [
        "## Do dropped coordinates still move? (digits MLP, DropGrad at "
        f"{config['drop_rate']}, {config['steps']} steps)",
        "",
        "| Optimizer | Gradient entries dropped (%) | Dropped entries that still moved (%) "
        "| Mean movement, dropped / kept |",
        "|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {LABELS[row['arm']]} "
            f"| {100 * row['dropped_fraction_mean']:.1f} ± {100 * row['dropped_fraction_std']:.1f} "
            f"| {100 * row['dropped_moved_fraction_mean']:.1f} ± "
            f"{100 * row['dropped_moved_fraction_std']:.1f} "
            f"| {row['update_ratio_dropped_to_kept_mean']:.3f} ± "
            f"{row['update_ratio_dropped_to_kept_std']:.3f} |"
        )
    return rows, lines


def plot(
    runs: list[dict[str, Any]], rows: list[dict[str, Any]], config: dict[str, Any], where: Any
) -> list[FigureRecord]:
    plt = figures.pyplot()
    record = FigureRecord("optimizer_motion.png")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    # Each bar's label comes from the same row as its value.
    labels = [LABELS[row["arm"]] for row in rows]
    moved = "dropped entries that still moved (%)"
    figures.bars(
        axes[0],
        record,
        moved,
        labels,
        [100 * row["dropped_moved_fraction_mean"] for row in rows],
        [100 * row["dropped_moved_fraction_std"] for row in rows],
    )
    axes[0].set_ylabel(moved)
    ratio = "mean |update|: dropped / kept"
    figures.bars(
        axes[1],
        record,
        ratio,
        labels,
        [row["update_ratio_dropped_to_kept_mean"] for row in rows],
        [row["update_ratio_dropped_to_kept_std"] for row in rows],
    )
    axes[1].set_ylabel(ratio)
    fig.suptitle("What a dropped gradient entry does under each optimizer")
    figures.save(fig, where, record.file)
    return [record]
