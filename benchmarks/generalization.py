"""Generalization experiments behind docs/analysis.md.

One command regenerates every table and figure the document quotes::

    python benchmarks/generalization.py            # full run, figures to docs/figures/
    python benchmarks/generalization.py --quick    # CI smoke run, to <results>/quick/

Experiments (CPU only, nothing downloaded):

* ``digits``: scikit-learn's bundled 8x8 handwritten digits with a small
  stratified training split; an MLP and a small CNN; SGD with momentum and Adam;
  no regularization, Dropout, DropConnect (a fresh weight mask per example),
  weight decay, DropGrad at several rates, DropGrad with Dropout.
* ``lm``: a character-level GRU on the text of ``pydoc_data.topics``.
* ``ablations``: drop-rate schedules, weight/bias rates, full update drop,
  Bernoulli against Gaussian masks (MLP + Adam on digits).
* ``motion``: how far coordinates whose gradient was dropped still move under
  plain SGD, SGD with momentum and Adam.

Every run with the same seed shares its data split, initial weights and batch
order, so methods are compared on paired runs. Results go to ``--out`` as JSON
(per run, with curves) and CSV (summaries), plus ``tables.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import sys
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dropgrad import (
    CosineAnnealingDropRateScheduler,
    DropGrad,
    LinearDropRateScheduler,
    StepDropRateScheduler,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "generalization"
DOC_FIGURES = REPO_ROOT / "docs" / "figures"

# ---------------------------------------------------------------- configuration

FULL_CONFIG: dict[str, Any] = {
    "seeds": 5,
    "digits": {
        "n_train_per_class": 20,
        "batch_size": 20,
        "epochs": 60,
        "mlp_hidden": 128,
        "sgd_lr": 0.05,
        "sgd_momentum": 0.9,
        "adam_lr": 1e-3,
        "dropout": 0.3,
        "dropconnect": 0.3,
        "weight_decay": 5e-3,
    },
    "lm": {
        "train_chars": 100_000,
        "val_chars": 50_000,
        "seq_len": 64,
        "batch_size": 32,
        "steps": 600,
        "eval_every": 50,
        "embed": 32,
        "hidden": 128,
        "lr": 3e-3,
        "dropout": 0.2,
        "val_batches": 8,
    },
    "motion": {"steps": 300, "drop_rate": 0.4},
}

QUICK_CONFIG: dict[str, Any] = {
    "seeds": 2,
    "digits": {**FULL_CONFIG["digits"], "epochs": 8},
    "lm": {
        **FULL_CONFIG["lm"],
        "train_chars": 20_000,
        "val_chars": 5_000,
        "steps": 30,
        "eval_every": 15,
        "hidden": 64,
        "val_batches": 4,
    },
    "motion": {"steps": 20, "drop_rate": 0.4},
}

#: Regularization settings of the main digits grid. Everything not named is off.
DIGITS_METHODS: dict[str, dict[str, Any]] = {
    "none": {},
    "dropout": {"dropout": True},
    "dropconnect": {"dropconnect": True},
    "weight_decay": {"weight_decay": True},
    "dropgrad_0.05": {"drop_rate": 0.05},
    "dropgrad_0.1": {"drop_rate": 0.1},
    "dropgrad_0.2": {"drop_rate": 0.2},
    "dropgrad_0.4": {"drop_rate": 0.4},
    "dropgrad_0.1+dropout": {"drop_rate": 0.1, "dropout": True},
}

#: Ablations on MLP + Adam; rows named ``main:<method>`` reuse the main grid's runs.
ABLATION_METHODS: dict[str, dict[str, Any]] = {
    "main:none": {},
    "main:dropgrad_0.2": {"drop_rate": 0.2},
    "schedule_linear_0.4_to_0": {"schedule": "linear"},
    "schedule_cosine_0.4_to_0": {"schedule": "cosine"},
    "schedule_step_0.4_0.2_0": {"schedule": "step"},
    "weights_only_0.2": {"weight_rate": 0.2, "bias_rate": 0.0},
    "biases_only_0.2": {"weight_rate": 0.0, "bias_rate": 0.2},
    "full_update_drop_0.2": {"drop_rate": 0.0, "full_update_drop": 0.2},
    "dropgrad_0.2+full_update_drop": {"drop_rate": 0.2, "full_update_drop": True},
    "main:dropgrad_0.4": {"drop_rate": 0.4},
    "gaussian_0.2": {"drop_rate": 0.2, "distribution": "gaussian"},
    "gaussian_0.4": {"drop_rate": 0.4, "distribution": "gaussian"},
}

LM_METHODS: dict[str, dict[str, Any]] = {
    "none": {},
    "dropout": {"dropout": True},
    "dropgrad_0.1": {"drop_rate": 0.1},
    "dropgrad_0.2": {"drop_rate": 0.2},
}

MOTION_OPTIMIZERS = ("sgd", "sgd_momentum", "adam")


# ---------------------------------------------------------------- models


class PerExampleDropConnectLinear(nn.Linear):
    """A linear layer whose weights are masked with a different mask for each example.

    In training mode every example of the batch gets its own Bernoulli mask over
    the weight matrix (kept weights scaled by ``1/(1-p)``), as DropConnect
    requires; one mask shared by the whole batch regularizes far less. In
    evaluation mode the layer uses the plain weights (the mean network).
    """

    def __init__(self, in_features: int, out_features: int, p: float) -> None:
        super().__init__(in_features, out_features)
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return super().forward(x)
        keep = 1.0 - self.p
        masks = torch.rand((x.shape[0], *self.weight.shape), device=x.device) < keep
        weights = masks * (self.weight / keep)
        return torch.einsum("ni,noi->no", x, weights) + self.bias


def _linear(in_features: int, out_features: int, dropconnect: float) -> nn.Linear:
    if dropconnect > 0.0:
        return PerExampleDropConnectLinear(in_features, out_features, dropconnect)
    return nn.Linear(in_features, out_features)


def build_mlp(hidden: int, dropout: float, dropconnect: float) -> nn.Module:
    return nn.Sequential(
        _linear(64, hidden, dropconnect),
        nn.ReLU(),
        nn.Dropout(dropout),
        _linear(hidden, hidden, dropconnect),
        nn.ReLU(),
        nn.Dropout(dropout),
        _linear(hidden, 10, dropconnect),
    )


def build_cnn(dropout: float, dropconnect: float) -> nn.Module:
    # Dropout and DropConnect act on the fully connected head only: a per-example
    # mask over convolution kernels would need one convolution per example.
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Dropout(dropout),
        _linear(16 * 4 * 4, 64, dropconnect),
        nn.ReLU(),
        nn.Dropout(dropout),
        _linear(64, 10, dropconnect),
    )


class CharGRU(nn.Module):
    def __init__(self, vocab: int, embed: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.gru = nn.GRU(embed, hidden, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        states, _ = self.gru(self.embed(tokens))
        return self.head(self.dropout(states))


# ---------------------------------------------------------------- DropGrad wiring


def make_dropgrad(
    spec: dict[str, Any], base: torch.optim.Optimizer, model: nn.Module, total_steps: int, seed: int
) -> torch.optim.Optimizer:
    """Wrap ``base`` in DropGrad as ``spec`` asks, or return it unchanged."""
    if "schedule" in spec:
        start = 0.4
        if spec["schedule"] == "linear":
            rate: Any = LinearDropRateScheduler(start, 0.0, num_steps=total_steps)
        elif spec["schedule"] == "cosine":
            rate = CosineAnnealingDropRateScheduler(start, 0.0, num_steps=total_steps)
        else:
            third = total_steps // 3
            rate = StepDropRateScheduler(start, {third: 0.2, 2 * third: 0.0})
        return DropGrad(base, drop_rate=rate, seed=seed)
    if "weight_rate" in spec:
        params = {
            p: (spec["bias_rate"] if p.ndim == 1 else spec["weight_rate"])
            for p in model.parameters()
        }
        return DropGrad(base, params=params, seed=seed)
    if "drop_rate" in spec:
        return DropGrad(
            base,
            drop_rate=spec["drop_rate"],
            full_update_drop=spec.get("full_update_drop", False),
            distribution=spec.get("distribution", "bernoulli"),
            seed=seed,
        )
    return base


# ---------------------------------------------------------------- digits


def digits_split(seed: int, per_class: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A stratified split: ``per_class`` training images per digit, the rest held out."""
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    train_index = np.concatenate(
        [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in range(10)]
    )
    test_mask = np.ones(len(labels), dtype=bool)
    test_mask[train_index] = False
    x = torch.tensor(images / 16.0, dtype=torch.float32)
    y = torch.tensor(labels, dtype=torch.long)
    return x[train_index], y[train_index], x[test_mask], y[test_mask]


@torch.no_grad()
def _evaluate(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    model.eval()
    logits = model(x)
    loss = F.cross_entropy(logits, y).item()
    accuracy = (logits.argmax(1) == y).float().mean().item()
    model.train()
    return loss, accuracy


def train_digits(job: dict[str, Any]) -> dict[str, Any]:
    """One digits run; ``job`` holds model, optimizer, method, seed and config."""
    torch.set_num_threads(1)
    cfg, spec, seed = job["config"], job["spec"], job["seed"]
    x_train, y_train, x_test, y_test = digits_split(seed, cfg["n_train_per_class"])
    torch.manual_seed(seed)
    dropout = cfg["dropout"] if spec.get("dropout") else 0.0
    dropconnect = cfg["dropconnect"] if spec.get("dropconnect") else 0.0
    if job["model"] == "mlp":
        model = build_mlp(cfg["mlp_hidden"], dropout, dropconnect)
    else:
        model = build_cnn(dropout, dropconnect)
    weight_decay = cfg["weight_decay"] if spec.get("weight_decay") else 0.0
    if job["optimizer"] == "sgd":
        base: torch.optim.Optimizer = torch.optim.SGD(
            model.parameters(),
            lr=cfg["sgd_lr"],
            momentum=cfg["sgd_momentum"],
            weight_decay=weight_decay,
        )
    else:
        base = torch.optim.Adam(model.parameters(), lr=cfg["adam_lr"], weight_decay=weight_decay)
    n = len(y_train)
    steps_per_epoch = math.ceil(n / cfg["batch_size"])
    optimizer = make_dropgrad(spec, base, model, steps_per_epoch * cfg["epochs"], seed)
    # Batch order has its own generator so every method sees the same batches.
    order = torch.Generator().manual_seed(seed)
    curves: dict[str, list[float]] = defaultdict(list)
    for _ in range(cfg["epochs"]):
        permutation = torch.randperm(n, generator=order)
        for start in range(0, n, cfg["batch_size"]):
            batch = permutation[start : start + cfg["batch_size"]]
            optimizer.zero_grad()
            F.cross_entropy(model(x_train[batch]), y_train[batch]).backward()
            optimizer.step()
        train_loss, train_acc = _evaluate(model, x_train, y_train)
        test_loss, test_acc = _evaluate(model, x_test, y_test)
        curves["train_loss"].append(train_loss)
        curves["train_acc"].append(train_acc)
        curves["test_loss"].append(test_loss)
        curves["test_acc"].append(test_acc)
    return {
        "experiment": job["experiment"],
        "model": job["model"],
        "optimizer": job["optimizer"],
        "method": job["method"],
        "seed": seed,
        "n_train": n,
        "n_test": len(y_test),
        "final": {key: values[-1] for key, values in curves.items()},
        "curves": dict(curves),
    }


# ---------------------------------------------------------------- language model


def pydoc_text() -> str:
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return "\n".join(topics[key] for key in sorted(topics))


def lm_data(cfg: dict[str, Any]) -> tuple[Tensor, Tensor, int]:
    """Training text from the start of the corpus, validation text from its end."""
    text = pydoc_text()
    vocabulary = sorted(set(text))
    index = {ch: i for i, ch in enumerate(vocabulary)}
    encoded = torch.tensor([index[ch] for ch in text], dtype=torch.long)
    return encoded[: cfg["train_chars"]], encoded[-cfg["val_chars"] :], len(vocabulary)


@torch.no_grad()
def _lm_loss(model: nn.Module, data: Tensor, seq_len: int, max_batches: int) -> float:
    """Mean next-character loss over non-overlapping windows (the first ``max_batches*32``)."""
    model.eval()
    windows = (len(data) - 1) // seq_len
    starts = torch.arange(windows)[: max_batches * 32] * seq_len
    total, count = 0.0, 0
    for chunk in starts.split(32):
        inputs = torch.stack([data[s : s + seq_len] for s in chunk.tolist()])
        targets = torch.stack([data[s + 1 : s + seq_len + 1] for s in chunk.tolist()])
        logits = model(inputs)
        total += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
        count += targets.numel()
    model.train()
    return total / count


def train_lm(job: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(1)
    cfg, spec, seed = job["config"], job["spec"], job["seed"]
    train, val, vocab = lm_data(cfg)
    torch.manual_seed(seed)
    dropout = cfg["dropout"] if spec.get("dropout") else 0.0
    model = CharGRU(vocab, cfg["embed"], cfg["hidden"], dropout)
    base = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    optimizer = make_dropgrad(spec, base, model, cfg["steps"], seed)
    order = torch.Generator().manual_seed(seed)
    seq_len = cfg["seq_len"]
    curves: dict[str, list[float]] = defaultdict(list)
    for step in range(1, cfg["steps"] + 1):
        starts = torch.randint(0, len(train) - seq_len - 1, (cfg["batch_size"],), generator=order)
        inputs = torch.stack([train[s : s + seq_len] for s in starts.tolist()])
        targets = torch.stack([train[s + 1 : s + seq_len + 1] for s in starts.tolist()])
        optimizer.zero_grad()
        loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % cfg["eval_every"] == 0 or step == cfg["steps"]:
            curves["step"].append(step)
            curves["train_loss"].append(_lm_loss(model, train, seq_len, cfg["val_batches"]))
            curves["val_loss"].append(_lm_loss(model, val, seq_len, cfg["val_batches"]))
    final_val = curves["val_loss"][-1]
    return {
        "experiment": "lm",
        "model": "char_gru",
        "optimizer": "adam",
        "method": job["method"],
        "seed": seed,
        "final": {
            "train_loss": curves["train_loss"][-1],
            "val_loss": final_val,
            "val_ppl": math.exp(final_val),
            "train_ppl": math.exp(curves["train_loss"][-1]),
        },
        "curves": dict(curves),
    }


# ---------------------------------------------------------------- optimizer state motion


def measure_motion(job: dict[str, Any]) -> dict[str, Any]:
    """Track, step by step, how far coordinates whose gradient was dropped still move.

    A coordinate counts as dropped at a step when its raw gradient was non-zero
    and DropGrad zeroed it. Its update at that step is compared with the update
    of coordinates whose gradient was kept.
    """
    torch.set_num_threads(1)
    cfg, seed = job["config"], job["seed"]
    digits_cfg = job["digits_config"]
    x_train, y_train, _, _ = digits_split(seed, digits_cfg["n_train_per_class"])
    torch.manual_seed(seed)
    model = build_mlp(digits_cfg["mlp_hidden"], 0.0, 0.0)
    params = list(model.parameters())
    if job["optimizer"] == "sgd":
        base: torch.optim.Optimizer = torch.optim.SGD(params, lr=digits_cfg["sgd_lr"])
    elif job["optimizer"] == "sgd_momentum":
        base = torch.optim.SGD(params, lr=digits_cfg["sgd_lr"], momentum=digits_cfg["sgd_momentum"])
    else:
        base = torch.optim.Adam(params, lr=digits_cfg["adam_lr"])
    optimizer = DropGrad(base, drop_rate=cfg["drop_rate"], seed=seed)
    order = torch.Generator().manual_seed(seed)
    n, batch_size = len(y_train), digits_cfg["batch_size"]
    dropped_moved = dropped_total = 0
    dropped_abs = kept_abs = 0.0
    kept_total = 0
    step = 0
    while step < cfg["steps"]:
        permutation = torch.randperm(n, generator=order)
        for start in range(0, n, batch_size):
            if step >= cfg["steps"]:
                break
            batch = permutation[start : start + batch_size]
            optimizer.zero_grad()
            F.cross_entropy(model(x_train[batch]), y_train[batch]).backward()
            raw = [p.grad.clone() for p in params]
            before = [p.detach().clone() for p in params]
            optimizer.step()
            # Skip the first steps: the optimizer state is still empty there.
            if step >= 10:
                for p, g, old in zip(params, raw, before):
                    dropped = (g != 0) & (p.grad == 0)
                    kept = p.grad != 0
                    delta = (p.detach() - old).abs()
                    dropped_total += int(dropped.sum())
                    dropped_moved += int((delta[dropped] > 0).sum())
                    dropped_abs += float(delta[dropped].sum())
                    kept_total += int(kept.sum())
                    kept_abs += float(delta[kept].sum())
            step += 1
    mean_dropped = dropped_abs / max(dropped_total, 1)
    mean_kept = kept_abs / max(kept_total, 1)
    return {
        "experiment": "motion",
        "optimizer": job["optimizer"],
        "seed": seed,
        "drop_rate": cfg["drop_rate"],
        "dropped_fraction": dropped_total / max(dropped_total + kept_total, 1),
        "dropped_moved_fraction": dropped_moved / max(dropped_total, 1),
        "mean_abs_update_dropped": mean_dropped,
        "mean_abs_update_kept": mean_kept,
        "update_ratio_dropped_to_kept": mean_dropped / mean_kept if mean_kept else float("nan"),
    }


# ---------------------------------------------------------------- job orchestration


def build_jobs(config: dict[str, Any], experiments: Iterable[str]) -> list[dict[str, Any]]:
    seeds = list(range(config["seeds"]))
    jobs: list[dict[str, Any]] = []
    experiments = set(experiments)
    if "digits" in experiments or "ablations" in experiments:
        for model in ("mlp", "cnn"):
            for opt in ("sgd", "adam"):
                for method, spec in DIGITS_METHODS.items():
                    if "digits" not in experiments and not (
                        model == "mlp" and opt == "adam" and f"main:{method}" in ABLATION_METHODS
                    ):
                        continue
                    for seed in seeds:
                        jobs.append(
                            {
                                "kind": "digits",
                                "experiment": "digits",
                                "model": model,
                                "optimizer": opt,
                                "method": method,
                                "spec": spec,
                                "seed": seed,
                                "config": config["digits"],
                            }
                        )
    if "ablations" in experiments:
        for method, spec in ABLATION_METHODS.items():
            if method.startswith("main:"):
                continue
            for seed in seeds:
                jobs.append(
                    {
                        "kind": "digits",
                        "experiment": "ablations",
                        "model": "mlp",
                        "optimizer": "adam",
                        "method": method,
                        "spec": spec,
                        "seed": seed,
                        "config": config["digits"],
                    }
                )
    if "lm" in experiments:
        for method, spec in LM_METHODS.items():
            for seed in seeds:
                jobs.append(
                    {
                        "kind": "lm",
                        "method": method,
                        "spec": spec,
                        "seed": seed,
                        "config": config["lm"],
                    }
                )
    if "motion" in experiments:
        for opt in MOTION_OPTIMIZERS:
            for seed in seeds:
                jobs.append(
                    {
                        "kind": "motion",
                        "optimizer": opt,
                        "seed": seed,
                        "config": config["motion"],
                        "digits_config": config["digits"],
                    }
                )
    # Longest jobs first keeps both workers busy until the end.
    weight = {"lm": 0, "digits": 1, "motion": 2}
    jobs.sort(key=lambda j: (weight[j["kind"]], j.get("model") != "cnn"))
    return jobs


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    if job["kind"] == "digits":
        result = train_digits(job)
    elif job["kind"] == "lm":
        result = train_lm(job)
    else:
        result = measure_motion(job)
    result["seconds"] = time.perf_counter() - started
    return result


def run_jobs(jobs: list[dict[str, Any]], workers: int) -> list[dict[str, Any]]:
    from tqdm import tqdm

    progress = tqdm(total=len(jobs), desc="runs", unit="run", file=sys.stderr)
    results: list[dict[str, Any]] = []
    if workers <= 1:
        for job in jobs:
            results.append(run_job(job))
            progress.update()
    else:
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        with context.Pool(workers) as pool:
            for result in pool.imap_unordered(run_job, jobs):
                results.append(result)
                progress.update()
    progress.close()
    return results


# ---------------------------------------------------------------- statistics and tables


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    array = np.asarray(values, dtype=float)
    std = float(array.std(ddof=1)) if len(array) > 1 else 0.0
    return float(array.mean()), std


def t_quantile(n: int) -> float:
    """Two-sided 95% Student-t quantile with ``n - 1`` degrees of freedom."""
    if n < 2:
        return float("nan")
    from scipy import stats

    return float(stats.t.ppf(0.975, n - 1))


def paired_summary(
    runs: list[dict[str, Any]], metric: str, baseline: str, group_keys: tuple[str, ...]
) -> list[dict[str, Any]]:
    """Per (group, method): mean ± std of ``metric`` and of its paired difference to ``baseline``.

    The paired difference is taken per seed (same split, initial weights and
    batches); ``ci95`` is the half-width of its 95% t interval.
    """
    by_group: dict[tuple[Any, ...], dict[str, dict[int, float]]] = defaultdict(
        lambda: defaultdict(dict)
    )
    for run in runs:
        key = tuple(run[k] for k in group_keys)
        by_group[key][run["method"]][run["seed"]] = run["final"][metric]
    rows: list[dict[str, Any]] = []
    for key, methods in by_group.items():
        reference = methods.get(baseline, {})
        for method, values in methods.items():
            seeds = sorted(values)
            mean, std = mean_std([values[s] for s in seeds])
            row: dict[str, Any] = dict(zip(group_keys, key))
            row.update({"method": method, "metric": metric, "n_seeds": len(seeds)})
            row.update({"mean": mean, "std": std})
            paired = [values[s] - reference[s] for s in seeds if s in reference]
            if method != baseline and paired:
                d_mean, d_std = mean_std(paired)
                row["diff_mean"] = d_mean
                row["diff_std"] = d_std
                row["diff_ci95"] = t_quantile(len(paired)) * d_std / math.sqrt(len(paired))
                row["n_better"] = sum(d > 0 for d in paired)
            rows.append(row)
    return rows


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    fields: list[str] = []
    for row in rows:
        fields.extend(k for k in row if k not in fields)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}
            )


def _lookup(rows: list[dict[str, Any]], **where: Any) -> dict[str, Any] | None:
    for row in rows:
        if all(row.get(k) == v for k, v in where.items()):
            return row
    return None


def _pm(row: dict[str, Any] | None, scale: float = 1.0, digits: int = 1) -> str:
    if row is None:
        return "n/a"
    return f"{row['mean'] * scale:.{digits}f} ± {row['std'] * scale:.{digits}f}"


def _diff(row: dict[str, Any] | None, scale: float = 1.0, digits: int = 1) -> str:
    if row is None or "diff_mean" not in row:
        return "—"
    ci = row["diff_ci95"] * scale
    ci_text = f" (±{ci:.{digits}f})" if math.isfinite(ci) else ""
    return f"{row['diff_mean'] * scale:+.{digits}f}{ci_text}"


def digits_table(
    acc_rows: list[dict[str, Any]], loss_rows: list[dict[str, Any]], model: str, optimizer: str
) -> str:
    lines = [
        f"| Method ({model.upper()}, {'SGD+momentum' if optimizer == 'sgd' else 'Adam'}) "
        "| Test accuracy (%) | Δ vs none (95% CI) | Seeds better | Test loss | Train acc. (%) |",
        "|---|---|---|---|---|---|",
    ]
    for method in DIGITS_METHODS:
        acc = _lookup(acc_rows, model=model, optimizer=optimizer, method=method, metric="test_acc")
        loss = _lookup(loss_rows, model=model, optimizer=optimizer, method=method)
        train = _lookup(
            acc_rows, model=model, optimizer=optimizer, method=method, metric="train_acc"
        )
        if acc is None:
            continue
        better = f"{acc['n_better']}/{acc['n_seeds']}" if "n_better" in acc else "—"
        lines.append(
            f"| {method} | {_pm(acc, 100)} | {_diff(acc, 100)} | {better} "
            f"| {_pm(loss, 1, 3)} | {_pm(train, 100)} |"
        )
    return "\n".join(lines)


def digits_overview(acc_rows: list[dict[str, Any]]) -> str:
    """Test accuracy and paired difference to ``none`` for every method and setting."""
    settings = [(m, o) for m in ("mlp", "cnn") for o in ("sgd", "adam")]
    header = " | ".join(f"{m.upper()}, {OPT_LABEL[o]}" for m, o in settings)
    lines = [
        f"| Method | {header} |",
        "|---|" + "---|" * len(settings),
    ]
    for method in DIGITS_METHODS:
        cells = []
        for model, optimizer in settings:
            row = _lookup(
                acc_rows, model=model, optimizer=optimizer, method=method, metric="test_acc"
            )
            if row is None:
                cells.append("n/a")
            elif "diff_mean" in row:
                cells.append(f"{_pm(row, 100)} [{_diff(row, 100)}]")
            else:
                cells.append(_pm(row, 100))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summarize(
    results: list[dict[str, Any]], out: Path, config: dict[str, Any]
) -> dict[str, list[dict[str, Any]]]:
    """Write every summary CSV and ``tables.md``; return the summary rows."""
    digits_runs = [r for r in results if r["experiment"] == "digits"]
    ablation_runs = [r for r in results if r["experiment"] == "ablations"]
    lm_runs = [r for r in results if r["experiment"] == "lm"]
    motion_runs = [r for r in results if r["experiment"] == "motion"]
    keys = ("model", "optimizer")
    summaries: dict[str, list[dict[str, Any]]] = {}
    tables: list[str] = [
        "# Generated tables",
        "",
        "Written by `python benchmarks/generalization.py`; do not edit by hand.",
        f"Seeds per row: {config['seeds']}. Values are mean ± sample std over seeds; "
        "Δ is the mean paired difference to the unregularized run with the same seed, "
        "with the half-width of its 95% t interval.",
        "",
    ]
    if digits_runs:
        acc = paired_summary(digits_runs, "test_acc", "none", keys)
        acc += paired_summary(digits_runs, "train_acc", "none", keys)
        loss = paired_summary(digits_runs, "test_loss", "none", keys)
        summaries["digits"] = acc + loss
        write_csv(out / "digits_summary.csv", acc + loss)
        tables += ["## Digits: overview", "", digits_overview(acc), "", "## Digits: per setting"]
        for model in ("mlp", "cnn"):
            for optimizer in ("sgd", "adam"):
                tables += ["", digits_table(acc, loss, model, optimizer)]
        tables.append("")
    if ablation_runs:
        reused = [
            {**r, "method": f"main:{r['method']}"}
            for r in digits_runs
            if r["model"] == "mlp"
            and r["optimizer"] == "adam"
            and f"main:{r['method']}" in ABLATION_METHODS
        ]
        pool = reused + ablation_runs
        acc = paired_summary(pool, "test_acc", "main:none", keys)
        loss = paired_summary(pool, "test_loss", "main:none", keys)
        summaries["ablations"] = acc + loss
        write_csv(out / "ablations_summary.csv", acc + loss)
        tables += [
            "## Ablations (MLP, Adam, digits)",
            "",
            "| Variant | Test accuracy (%) | Δ vs none (95% CI) | Seeds better | Test loss |",
            "|---|---|---|---|---|",
        ]
        for method in ABLATION_METHODS:
            a = _lookup(acc, method=method)
            lo = _lookup(loss, method=method)
            if a is None:
                continue
            better = f"{a['n_better']}/{a['n_seeds']}" if "n_better" in a else "—"
            tables.append(
                f"| {method} | {_pm(a, 100)} | {_diff(a, 100)} | {better} | {_pm(lo, 1, 3)} |"
            )
        tables.append("")
    if lm_runs:
        for run in lm_runs:
            run["model"] = "char_gru"
        ppl = paired_summary(lm_runs, "val_ppl", "none", keys)
        train_ppl = paired_summary(lm_runs, "train_ppl", "none", keys)
        summaries["lm"] = ppl + train_ppl
        write_csv(out / "lm_summary.csv", ppl + train_ppl)
        tables += [
            "## Character-level language model (GRU, Adam, pydoc_data.topics)",
            "",
            "| Method | Validation perplexity | Δ vs none (95% CI) | Seeds worse "
            "| Training perplexity |",
            "|---|---|---|---|---|",
        ]
        for method in LM_METHODS:
            p = _lookup(ppl, method=method)
            t = _lookup(train_ppl, method=method)
            if p is None:
                continue
            # For perplexity, "better" in paired_summary means higher, i.e. worse.
            worse = f"{p['n_better']}/{p['n_seeds']}" if "n_better" in p else "—"
            tables.append(
                f"| {method} | {_pm(p, 1, 3)} | {_diff(p, 1, 3)} | {worse} | {_pm(t, 1, 3)} |"
            )
        tables.append("")
    if motion_runs:
        rows = []
        for optimizer in MOTION_OPTIMIZERS:
            runs = [r for r in motion_runs if r["optimizer"] == optimizer]
            if not runs:
                continue
            row: dict[str, Any] = {"optimizer": optimizer, "n_seeds": len(runs)}
            for metric in (
                "dropped_fraction",
                "dropped_moved_fraction",
                "mean_abs_update_dropped",
                "mean_abs_update_kept",
                "update_ratio_dropped_to_kept",
            ):
                mean, std = mean_std([r[metric] for r in runs])
                row[f"{metric}_mean"] = mean
                row[f"{metric}_std"] = std
            rows.append(row)
        summaries["motion"] = rows
        write_csv(out / "motion_summary.csv", rows)
        tables += [
            "## Do dropped coordinates still move? (MLP, digits, drop rate "
            f"{config['motion']['drop_rate']})",
            "",
            "| Optimizer | Gradient entries dropped (%) | Dropped entries that still moved (%) "
            "| Mean update, dropped / kept |",
            "|---|---|---|---|",
        ]
        for row in rows:
            tables.append(
                f"| {row['optimizer']} "
                f"| {100 * row['dropped_fraction_mean']:.1f} ± "
                f"{100 * row['dropped_fraction_std']:.1f} "
                f"| {100 * row['dropped_moved_fraction_mean']:.1f} ± "
                f"{100 * row['dropped_moved_fraction_std']:.1f} "
                f"| {row['update_ratio_dropped_to_kept_mean']:.3f} ± "
                f"{row['update_ratio_dropped_to_kept_std']:.3f} |"
            )
        tables.append("")
    (out / "tables.md").write_text("\n".join(tables) + "\n")
    return summaries


# ---------------------------------------------------------------- figures

CURVE_METHODS = ("none", "dropout", "dropconnect", "weight_decay", "dropgrad_0.1", "dropgrad_0.4")
OPT_LABEL = {"sgd": "SGD + momentum", "adam": "Adam"}


def _curve_band(runs: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean curve over seeds with the lowest and highest seed (mean ± std can go negative)."""
    stacked = np.array([r["curves"][key] for r in runs], dtype=float)
    return stacked.mean(0), stacked.min(0), stacked.max(0)


def make_figures(results: list[dict[str, Any]], summaries: dict[str, Any], where: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    where.mkdir(parents=True, exist_ok=True)
    digits_runs = [r for r in results if r["experiment"] == "digits"]
    if digits_runs:
        settings = [(m, o) for m in ("mlp", "cnn") for o in ("sgd", "adam")]
        rows = (("train_loss", "train loss"), ("test_loss", "test loss"), ("test_acc", "test acc."))
        fig, axes = plt.subplots(3, 4, figsize=(16, 10), sharex=True)
        for col, (model, opt) in enumerate(settings):
            for row_index, (key, label) in enumerate(rows):
                ax = axes[row_index, col]
                for method in CURVE_METHODS:
                    runs = [
                        r
                        for r in digits_runs
                        if (r["model"], r["optimizer"], r["method"]) == (model, opt, method)
                    ]
                    if not runs:
                        continue
                    mean, low, high = _curve_band(runs, key)
                    epochs = np.arange(1, len(mean) + 1)
                    ax.plot(epochs, mean, label=method, linewidth=1.2)
                    ax.fill_between(epochs, low, high, alpha=0.12)
                if key == "train_loss":
                    ax.set_yscale("log")
                ax.set_ylabel(label)
                if row_index == 0:
                    ax.set_title(f"{model.upper()}, {OPT_LABEL[opt]}")
                if row_index == 2:
                    ax.set_xlabel("epoch")
        axes[0, 0].legend(fontsize=8)
        fig.suptitle("Digits, 200 training images: mean over seeds (line), seed range (shaded)")
        fig.tight_layout()
        fig.savefig(where / "digits_curves.png", dpi=80)
        plt.close(fig)

        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        rates = [0.0, 0.05, 0.1, 0.2, 0.4]
        for model, opt in settings:
            for ax, metric in zip(axes, ("test_acc", "test_loss")):
                means, stds = [], []
                for rate in rates:
                    method = "none" if rate == 0 else f"dropgrad_{rate:g}"
                    values = [
                        r["final"][metric]
                        for r in digits_runs
                        if (r["model"], r["optimizer"], r["method"]) == (model, opt, method)
                    ]
                    means.append(np.mean(values) if values else np.nan)
                    stds.append(np.std(values, ddof=1) if len(values) > 1 else 0.0)
                scale = 100 if metric == "test_acc" else 1
                ax.errorbar(
                    rates,
                    np.array(means) * scale,
                    yerr=np.array(stds) * scale,
                    marker="o",
                    capsize=3,
                    label=f"{model.upper()}, {OPT_LABEL[opt]}",
                )
        axes[0].set_ylabel("test accuracy (%)")
        axes[1].set_ylabel("test loss")
        for ax in axes:
            ax.set_xlabel("DropGrad drop rate (0 = no DropGrad)")
        axes[0].legend(fontsize=8)
        fig.suptitle("Digits: final held-out metrics against the drop rate (mean ± std)")
        fig.tight_layout()
        fig.savefig(where / "digits_drop_rate.png", dpi=80)
        plt.close(fig)

    if "ablations" in summaries:
        rows = [
            r
            for r in summaries["ablations"]
            if r["metric"] == "test_acc" and r["method"] in ABLATION_METHODS
        ]
        order = {m: i for i, m in enumerate(ABLATION_METHODS)}
        rows.sort(key=lambda r: order[r["method"]])
        fig, ax = plt.subplots(figsize=(9, 4.5))
        positions = np.arange(len(rows))
        ax.barh(
            positions,
            [100 * r["mean"] for r in rows],
            xerr=[100 * r["std"] for r in rows],
            color=["grey" if r["method"].startswith("main:") else "tab:blue" for r in rows],
            capsize=3,
        )
        ax.set_yticks(positions, [r["method"] for r in rows])
        ax.invert_yaxis()
        low = min(100 * (r["mean"] - r["std"]) for r in rows)
        high = max(100 * (r["mean"] + r["std"]) for r in rows)
        ax.set_xlim(low - 1, high + 1)
        ax.set_xlabel("test accuracy (%)")
        ax.set_title("Ablations, MLP + Adam on digits (grey: runs of the main grid)")
        fig.tight_layout()
        fig.savefig(where / "ablations.png", dpi=80)
        plt.close(fig)

    lm_runs = [r for r in results if r["experiment"] == "lm"]
    if lm_runs:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for method in LM_METHODS:
            runs = [r for r in lm_runs if r["method"] == method]
            if not runs:
                continue
            steps = np.array(runs[0]["curves"]["step"])
            for ax, key in zip(axes, ("train_loss", "val_loss")):
                mean, low, high = _curve_band(runs, key)
                ax.plot(steps, np.exp(mean), label=method)
                ax.fill_between(steps, np.exp(low), np.exp(high), alpha=0.12)
        axes[0].set_ylabel("training perplexity")
        axes[1].set_ylabel("validation perplexity")
        for ax in axes:
            ax.set_xlabel("step")
            ax.set_yscale("log")
        axes[1].legend()
        fig.suptitle("Character-level GRU on pydoc_data.topics: mean over seeds, seed range shaded")
        fig.tight_layout()
        fig.savefig(where / "lm_curves.png", dpi=80)
        plt.close(fig)

    if "motion" in summaries:
        rows = summaries["motion"]
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        names = [OPT_LABEL.get(r["optimizer"], "plain SGD") for r in rows]
        axes[0].bar(
            names,
            [100 * r["dropped_moved_fraction_mean"] for r in rows],
            yerr=[100 * r["dropped_moved_fraction_std"] for r in rows],
            capsize=3,
        )
        axes[0].set_ylabel("dropped entries that still moved (%)")
        axes[1].bar(
            names,
            [r["update_ratio_dropped_to_kept_mean"] for r in rows],
            yerr=[r["update_ratio_dropped_to_kept_std"] for r in rows],
            capsize=3,
        )
        axes[1].set_ylabel("mean |update|: dropped / kept")
        fig.suptitle("What a dropped gradient entry does under stateful optimizers")
        fig.tight_layout()
        fig.savefig(where / "optimizer_motion.png", dpi=80)
        plt.close(fig)


# ---------------------------------------------------------------- entry point


def _display_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings for CI (< 3 min)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"results directory (default: {_display_path(DEFAULT_OUT)}, "
        "and its quick/ subdirectory with --quick)",
    )
    parser.add_argument("--seeds", type=int, default=None, help="seeds per configuration")
    parser.add_argument(
        "--workers",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="parallel processes, one thread each (default: 2)",
    )
    parser.add_argument(
        "--experiments",
        nargs="+",
        default=["digits", "ablations", "lm", "motion"],
        choices=["digits", "ablations", "lm", "motion"],
        help="which experiments to run (default: all)",
    )
    parser.add_argument(
        "--summarize-only",
        action="store_true",
        help="rebuild tables and figures from the *_runs.json files already in --out",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = json.loads(json.dumps(QUICK_CONFIG if args.quick else FULL_CONFIG))
    if args.seeds is not None:
        if args.seeds < 1:
            raise SystemExit("--seeds must be at least 1")
        config["seeds"] = args.seeds
    out: Path = args.out or (DEFAULT_OUT / "quick" if args.quick else DEFAULT_OUT)
    out.mkdir(parents=True, exist_ok=True)
    # Only the full run with the default results directory refreshes the document's
    # figures; every other run keeps its figures beside its results.
    full_default = not args.quick and out.resolve() == DEFAULT_OUT.resolve()
    figures = DOC_FIGURES if full_default else out / "figures"
    experiments = ("digits", "ablations", "lm", "motion")
    if args.summarize_only:
        meta_path = out / "meta.json"
        if meta_path.exists():
            config = json.loads(meta_path.read_text())["config"]
        results = []
        for experiment in experiments:
            path = out / f"{experiment}_runs.json"
            if path.exists():
                results += json.loads(path.read_text())
        summaries = summarize(results, out, config)
        make_figures(results, summaries, figures)
        return 0
    jobs = build_jobs(config, args.experiments)
    print(f"{len(jobs)} runs, {args.workers} worker(s), results to {out}", file=sys.stderr)
    started = time.time()
    results = run_jobs(jobs, args.workers)
    elapsed = time.time() - started
    results.sort(
        key=lambda r: (
            r["experiment"],
            r.get("model", ""),
            r["optimizer"],
            r.get("method", ""),
            r["seed"],
        )
    )
    for experiment in experiments:
        subset = [r for r in results if r["experiment"] == experiment]
        if subset:
            (out / f"{experiment}_runs.json").write_text(json.dumps(subset, indent=1) + "\n")
    summaries = summarize(results, out, config)
    make_figures(results, summaries, figures)
    command = "python benchmarks/generalization.py" + " ".join(
        [""] + (argv if argv is not None else sys.argv[1:])
    )
    meta = {
        "command": command,
        "quick": args.quick,
        "config": config,
        "experiments": args.experiments,
        "workers": args.workers,
        "runs": len(results),
        "wall_seconds": round(elapsed, 1),
        "cpu_seconds_in_runs": round(sum(r["seconds"] for r in results), 1),
        "figures": _display_path(figures),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"done in {elapsed:.0f} s; tables in {out / 'tables.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
