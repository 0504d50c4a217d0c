"""Experiment 1b: MAML closer to the published code, with a validation checkpoint.

Experiment 1 scores the last meta-iteration, although meta-test accuracy peaks much earlier,
and it has neither the first-order inner loop nor the Gaussian noise of the published code
(hytseng0509/DropGrad: ``methods/drop_grad.py`` multiplies gradients by ``N(1, rate^2)``,
rates 0.1 to 0.2, constant by default or ramped linearly; first-order MAML by default; the
checkpoint with the best validation accuracy is the one reported). This experiment adds
those pieces on the same digits setting, in 5-shot, where experiment 1 left the question
open.

Setting (declared before it ran)
    Experiment 1's 5-shot setting: 3-way episodes, meta-training on digits 0-5, a
    64-64-64-3 MLP, 3 inner SGD steps at 0.5, outer Adam at 0.001 on 4 tasks, 600
    meta-iterations. The digits have too few classes for a class-disjoint validation split,
    so the images of the meta-test classes 6-9 are split in two (a fixed permutation per
    class): validation episodes use one half, test episodes the other. Every
    ``val_every`` meta-iterations, and before the first, the meta-parameters are scored on
    the validation episodes; the best are kept. This selection sees the test classes (not
    the test images), so it is optimistic for every arm alike.

Arms
    ``none`` (second order, as in experiment 1); Bernoulli gradient dropout at 0.1 and 0.2,
    constant and ramped linearly from 0 (``linear_``); Gaussian at 0.2 as in experiment 1,
    ``N(1, p/(1-p))`` (``gaussian_var_0.2``, the variance of Bernoulli 0.2); Gaussian as in
    the published code, ``N(1, p^2)``, at 0.1 and 0.2 (``gaussian_std_``); first-order
    MAML without gradient dropout (``fo_none``) and with the published defaults (Gaussian
    ``N(1, 0.1^2)``, constant: ``fo_gaussian_std_0.1``), at the same inner learning rate.
    Nothing is dropped when scoring.

Seeds
    20 (seeds 0-19) were declared before any run of this experiment (the same seeds, the
    same validation and test episodes, for every arm). About 60 are needed to resolve ±1
    point at experiment 1's 5-shot spread, so 60 (seeds 0-59) were declared afterwards,
    when the results of seeds 0-19 had been seen; seeds 20-59 were added with ``--resume``.
    Each family is also judged on seeds 0-19 alone, and a verdict that differs there is
    marked exploratory.

First-order inner learning rate (added after the results of the declared arms were seen)
    First-order MAML diverged at the inner learning rate 0.5. The rate is selected from
    ``fo_lr_candidates`` (0.05, 0.1, 0.2, 0.5) by the mean best validation accuracy of
    first-order MAML without noise on the 3 ``fo_select_seeds`` (1000-1002, not evaluation
    seeds; the same validation episodes); the published code uses one inner rate with and
    without gradient dropout. First-order MAML without noise and with the published
    defaults then run at that rate on the 60 evaluation seeds (``fo_tuned_`` arms), compared
    in their own Holm family per endpoint.

Endpoints
    Primary: meta-test accuracy of the best-validation checkpoint. Secondary: meta-test
    accuracy after the last meta-iteration. Margin ±1.0 point. Each second-order arm
    against ``none``, each first-order arm against ``fo_none``; one Holm family per
    endpoint.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import data, figures, meta_learning, models, report
from .figures import FigureRecord

FULL: dict[str, Any] = {
    **{k: v for k, v in meta_learning.FULL.items() if k not in ("shots", "curve_every")},
    "seeds": 60,
    "declared_seeds": 20,
    "shots": 5,
    "val_every": 25,
    "val_episodes": 300,
    "split_seed": 30_000,
    "fo_lr_candidates": [0.05, 0.1, 0.2, 0.5],
    "fo_select_seeds": [1000, 1001, 1002],
}
QUICK: dict[str, Any] = {
    **FULL,
    "seeds": 2,
    "iterations": 8,
    "eval_episodes": 30,
    "val_episodes": 20,
    "val_every": 4,
    "arms": ["none", "bernoulli_0.2", "gaussian_std_0.1", "fo_none", "fo_gaussian_std_0.1"],
    "fo_lr_candidates": [0.1, 0.5],
    "fo_select_seeds": [1000],
}

#: Arm -> rate, distribution, ramp, first order. ``gaussian_std_p`` draws N(1, p^2): it is
#: drop_grad's Gaussian at the rate whose p / (1 - p) is p^2.
ARMS: dict[str, dict[str, Any]] = {
    "none": {},
    "bernoulli_0.1": {"rate": 0.1},
    "bernoulli_0.2": {"rate": 0.2},
    "linear_0.1": {"rate": 0.1, "ramp": True},
    "linear_0.2": {"rate": 0.2, "ramp": True},
    "gaussian_var_0.2": {"rate": 0.2, "distribution": "gaussian"},
    "gaussian_std_0.1": {"rate": 0.1**2 / (1 + 0.1**2), "distribution": "gaussian"},
    "gaussian_std_0.2": {"rate": 0.2**2 / (1 + 0.2**2), "distribution": "gaussian"},
    "fo_none": {"first_order": True},
    "fo_gaussian_std_0.1": {
        "rate": 0.1**2 / (1 + 0.1**2),
        "distribution": "gaussian",
        "first_order": True,
    },
}
#: Added after the first results: first-order MAML at an inner learning rate selected on
#: validation (``fo_lr_candidates``, on ``fo_select_seeds``), without and with the published
#: defaults. The rate is filled in when the jobs are planned.
TUNED_ARMS: dict[str, dict[str, Any]] = {
    "fo_tuned_none": {"first_order": True},
    "fo_tuned_gaussian_std_0.1": {**ARMS["fo_gaussian_std_0.1"]},
}
SELECT = "select"
LABELS = {
    "none": "none",
    "bernoulli_0.1": "Bernoulli 0.1",
    "bernoulli_0.2": "Bernoulli 0.2",
    "linear_0.1": "Bernoulli, linear 0 → 0.1",
    "linear_0.2": "Bernoulli, linear 0 → 0.2",
    "gaussian_var_0.2": "Gaussian N(1, p/(1−p)), 0.2",
    "gaussian_std_0.1": "Gaussian N(1, p²), 0.1",
    "gaussian_std_0.2": "Gaussian N(1, p²), 0.2",
    "fo_none": "first-order: none",
    "fo_gaussian_std_0.1": "first-order: Gaussian N(1, p²), 0.1 (published defaults)",
    "fo_tuned_none": "first-order, tuned inner lr: none",
    "fo_tuned_gaussian_std_0.1": "first-order, tuned inner lr: published defaults",
}
SETTING = "5-shot"
BEST = report.Endpoint(
    "best_val_test_acc", "meta-test accuracy at the best validation checkpoint (%)", 0.01, scale=100
)
FINAL = report.Endpoint(
    "test_acc", "meta-test accuracy after the last iteration (%)", 0.01, scale=100
)


def reference(arm: str) -> str:
    if arm in TUNED_ARMS:
        return "fo_tuned_none"
    return "fo_none" if arm.startswith("fo_") else "none"


def arms(config: dict[str, Any]) -> list[str]:
    """The arms run: all of ``ARMS`` unless the configuration names a subset (``--quick``)."""
    return list(config.get("arms", ARMS))


def pairs(config: dict[str, Any]) -> list[tuple[str, str, str]]:
    chosen = arms(config)
    return [(SETTING, a, reference(a)) for a in chosen if a not in ("none", "fo_none")]


def _job(config: dict[str, Any], setting: str, arm: str, seed: int, reg: dict) -> dict:
    return {
        "experiment": "meta_learning_closer",
        "id": f"{setting}/{arm}/{seed:03d}",
        "setting": setting,
        "arm": arm,
        "seed": seed,
        "regularizer": reg,
        "config": config,
        "cost": config["iterations"] * (1.0 if reg.get("first_order") else 2.0),
    }


def plan(config: dict[str, Any], runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The declared arms, and first-order MAML without noise at each candidate inner
    learning rate on the selection seeds (the same validation episodes, other seeds)."""
    jobs = [_job(config, SETTING, a, s, ARMS[a]) for a in arms(config) for s in seeds(config)]
    for lr in config.get("fo_lr_candidates", []):
        reg = {"first_order": True, "inner_lr": lr}
        jobs += [
            _job(config, SELECT, f"fo_none_lr_{lr}", s, reg) for s in config["fo_select_seeds"]
        ]
    return jobs


def seeds(config: dict[str, Any]) -> range:
    return range(config["seeds"])


def selected_lr(runs: list[dict[str, Any]], config: dict[str, Any]) -> tuple[float, list]:
    """The candidate with the highest mean best validation accuracy over the selection
    seeds (ties to the smaller rate), and ``(rate, mean)`` for every candidate."""
    means = []
    for lr in config["fo_lr_candidates"]:
        mine = [r for r in runs if r["setting"] == SELECT and r["arm"] == f"fo_none_lr_{lr}"]
        means.append((lr, float(np.mean([r["final"]["best_val_acc"] for r in mine]))))
    best = max(means, key=lambda m: (m[1], -m[0]))
    return best[0], means


def plan_tuned(config: dict[str, Any], runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Both tuned arms at the selected inner learning rate, on the evaluation seeds."""
    if not config.get("fo_lr_candidates"):
        return []
    lr, _ = selected_lr(runs, config)
    return [
        _job(config, SETTING, arm, s, {**TUNED_ARMS[arm], "inner_lr": lr})
        for arm in TUNED_ARMS
        for s in seeds(config)
    ]


STAGES = (plan, plan_tuned)


def image_halves(config: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of the meta-test classes' images: the validation half and the test half."""
    _, labels = data._digits_arrays()
    rng = np.random.default_rng(config["split_seed"])
    val, test = [], []
    for c in config["test_classes"]:
        rows = rng.permutation(np.flatnonzero(labels == c))
        val.append(rows[: len(rows) // 2])
        test.append(rows[len(rows) // 2 :])
    return np.sort(np.concatenate(val)), np.sort(np.concatenate(test))


def episodes(config: dict[str, Any], half: np.ndarray, count: int, seed: int) -> data.Episodes:
    return data.sample_episodes(
        tuple(config["test_classes"]),
        config["n_way"],
        config["shots"],
        config["n_query"],
        count,
        np.random.default_rng(seed),
        rows=half,
    )


def run(job: dict[str, Any]) -> dict[str, Any]:
    config, seed, reg = job["config"], job["seed"], job["regularizer"]
    shots = config["shots"]
    # The inner learning rate of this arm, in meta-training and when scoring.
    config = {**config, "inner_lr": reg.get("inner_lr", config["inner_lr"])}
    scoring = {**config, "eval_chunk": config["eval_chunk"]}
    sizes = [64, config["hidden"], config["hidden"], config["n_way"]]
    meta_params = models.init_mlp_params(sizes, torch.Generator().manual_seed(seed))
    outer = torch.optim.Adam(meta_params, lr=config["outer_lr"])
    batch, iterations = config["meta_batch"], config["iterations"]
    tasks = data.sample_episodes(
        tuple(config["train_classes"]),
        config["n_way"],
        shots,
        config["n_query"],
        iterations * batch,
        np.random.default_rng(seed),
    )
    val_half, test_half = image_halves(config)
    val_episodes = episodes(config, val_half, config["val_episodes"], config["split_seed"] + 1)
    test_episodes = episodes(config, test_half, config["eval_episodes"], config["split_seed"] + 2)
    masks = torch.Generator().manual_seed(seed + 1)
    curve: dict[str, list[float]] = {"iteration": [], "val_acc": []}
    best = (-1.0, 0, [p.detach().clone() for p in meta_params])

    def checkpoint(iteration: int) -> None:
        nonlocal best
        value = meta_learning.accuracy(meta_params, val_episodes, scoring)
        curve["iteration"].append(iteration)
        curve["val_acc"].append(value)
        if value > best[0]:
            best = (value, iteration, [p.detach().clone() for p in meta_params])

    checkpoint(0)
    training_seconds = 0.0
    for iteration in range(iterations):
        started = time.perf_counter()
        episode = tasks.slice(iteration * batch, (iteration + 1) * batch)
        rate = reg.get("rate", 0.0)
        if reg.get("ramp"):
            rate *= iteration / max(iterations - 1, 1)
        adapted = meta_learning.adapt(
            [p.expand(batch, *p.shape) for p in meta_params],
            episode.support_x,
            episode.support_y,
            steps=config["inner_steps"],
            lr=config["inner_lr"],
            create_graph=not reg.get("first_order", False),
            drop_rate=rate,
            distribution=reg.get("distribution", "bernoulli"),
            generator=masks,
        )
        logits = models.batched_mlp(adapted, episode.query_x)
        loss = F.cross_entropy(logits.flatten(0, 1), episode.query_y.flatten())
        outer.zero_grad()
        if reg.get("first_order", False):
            # First-order MAML: the query gradient at the adapted parameters, applied to the
            # meta-parameters (the inner steps are not differentiated through).
            grads = torch.autograd.grad(loss, adapted)
            for p, g in zip(meta_params, grads):
                p.grad = g.sum(0)
        else:
            loss.backward()
        outer.step()
        training_seconds += time.perf_counter() - started
        if (iteration + 1) % config["val_every"] == 0 or iteration + 1 == iterations:
            checkpoint(iteration + 1)
    final = meta_learning.accuracy(meta_params, test_episodes, scoring)
    at_best = meta_learning.accuracy(best[2], test_episodes, scoring)
    return {
        "final": {
            "test_acc": final,
            "best_val_test_acc": at_best,
            "best_val_acc": best[0],
            "best_iteration": best[1],
            "final_val_acc": curve["val_acc"][-1],
            "collapsed": False,
        },
        "curves": curve,
        "ms_per_iteration": round(1000 * training_seconds / iterations, 2),
    }


def summarize(runs: list[dict[str, Any]], config: dict[str, Any]) -> tuple[list[dict], list[str]]:
    rows: list[dict[str, Any]] = []
    lines = [
        "## Experiment 1b: MAML closer to the published code (digits, 5-shot, 3-way)",
        "",
        f"{report.seeds_note(config)} Checkpoint chosen on {config['val_episodes']} "
        "validation episodes built from half of the meta-test classes' images; scored on "
        f"{config['eval_episodes']} test episodes from the other half.",
        "",
    ]
    for endpoint in (BEST, FINAL):
        declared = config.get("declared_seeds")
        comparisons = report.compare_family(runs, endpoint, pairs(config), declared=declared)
        rows += report.comparison_rows(comparisons)
        table = report.by_seed(runs, endpoint, SETTING)
        arm_rows = [report.arm_row(SETTING, a, *table[a], endpoint) for a in ARMS if a in table]
        rows += [{"kind": "arm", **row} for row in arm_rows]
        lines += [report.endpoint_note(endpoint, len(comparisons)), ""]
        lines += report.comparison_table(arm_rows, comparisons, endpoint, LABELS, setting=SETTING)
        lines.append("")
    if any(r["arm"] in TUNED_ARMS for r in runs):
        tuned_rows, tuned_lines = summarize_tuned(runs, config)
        rows += tuned_rows
        lines += tuned_lines
    lines += [
        "| Arm | best checkpoint: iteration (mean, range) | validation accuracy: best, final "
        "(mean, %) | ms per meta-iteration |",
        "|---|---|---|---|",
    ]
    for arm in [*ARMS, *TUNED_ARMS]:
        mine = [r for r in runs if r["arm"] == arm]
        if not mine:
            continue
        its = [r["final"]["best_iteration"] for r in mine]
        ms = np.mean([r["ms_per_iteration"] for r in mine])
        best = 100 * np.mean([r["final"]["best_val_acc"] for r in mine])
        last = 100 * np.mean([r["final"]["final_val_acc"] for r in mine])
        lines.append(
            f"| {LABELS[arm]} | {np.mean(its):.0f} ({min(its)}–{max(its)}) "
            f"| {best:.1f}, {last:.1f} | {ms:.1f} |"
        )
    return rows, lines


def summarize_tuned(
    runs: list[dict[str, Any]], config: dict[str, Any]
) -> tuple[list[dict], list[str]]:
    """The selection of the first-order inner learning rate, and the tuned pair in its own
    Holm family per endpoint (added after the first results; declared with all its seeds)."""
    lr, means = selected_lr(runs, config)
    n_select = len(config["fo_select_seeds"])
    lines = [
        "**First-order MAML at a tuned inner learning rate** (added after the results of the "
        f"declared arms were seen). Selected on the mean best validation accuracy of "
        f"first-order MAML without noise over {n_select} selection seeds "
        f"({', '.join(str(s) for s in config['fo_select_seeds'])}):",
        "",
        "| inner learning rate | mean best validation accuracy (%) |",
        "|---|---|",
        *[f"| {c}{' (selected)' if c == lr else ''} | {100 * m:.1f} |" for c, m in means],
        "",
    ]
    rows: list[dict[str, Any]] = []
    pair = [(SETTING, "fo_tuned_gaussian_std_0.1", "fo_tuned_none")]
    for endpoint in (BEST, FINAL):
        comparisons = report.compare_family(runs, endpoint, pair)
        rows += report.comparison_rows(comparisons)
        table = report.by_seed(runs, endpoint, SETTING)
        arm_rows = [
            report.arm_row(SETTING, a, *table[a], endpoint) for a in TUNED_ARMS if a in table
        ]
        rows += [{"kind": "arm", **row} for row in arm_rows]
        lines += [report.endpoint_note(endpoint, len(comparisons)), ""]
        lines += report.comparison_table(arm_rows, comparisons, endpoint, LABELS, setting=SETTING)
        lines.append("")
    return rows, lines


def plot(
    runs: list[dict[str, Any]], rows: list[dict[str, Any]], config: dict[str, Any], where: Any
) -> list[FigureRecord]:
    plt = figures.pyplot()
    record = FigureRecord("meta_learning_closer.png")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    title = "5-shot: validation accuracy from iteration 0"
    shown = ("none", "bernoulli_0.2", "gaussian_std_0.1", "fo_none", "fo_gaussian_std_0.1")
    for arm in (*shown, "fo_tuned_none"):
        mine = [r for r in runs if r["arm"] == arm]
        if not mine:
            continue
        stacked = 100 * np.array([r["curves"]["val_acc"] for r in mine])
        figures.curve(axes[0], record, title, LABELS[arm], mine[0]["curves"]["iteration"], stacked)
    axes[0].set_title(f"{title}\n(mean over seeds, seed range shaded)")
    axes[0].set_xlabel("meta-iteration")
    axes[0].set_ylabel("validation accuracy (%)")
    axes[0].legend()
    chosen = [r for r in rows if r["kind"] == "comparison" and r["metric"] == BEST.metric]
    figures.intervals(
        axes[1],
        record,
        "Δ meta-test accuracy at the best validation checkpoint",
        [LABELS[r["arm"]] for r in chosen],
        [100 * r["diff_mean"] for r in chosen],
        [100 * r["ci_low"] for r in chosen],
        [100 * r["ci_high"] for r in chosen],
        margin=100 * BEST.margin,
    )
    axes[1].set_title("Δ at the best validation checkpoint\n(each arm vs its own none)")
    axes[1].set_xlabel("points, 95% t-interval; dotted: ±1.0")
    figures.save(fig, where, record.file)
    return [record]
