"""Experiment 7: a small transformer language model on a larger text, at two training lengths.

Everything else in these experiments is an MLP, a small CNN or a 96-unit GRU on 15,000
characters. This experiment trains a character-level transformer on far more text.

Setting (declared before it ran)
    The text of ``pydoc_data.topics`` (about 465,000 characters, shipped with Python), cut
    into 500-character blocks and shuffled once (seed 0); ``train_chars`` of blocks for
    training and the next ``val_chars`` for validation, as in experiment 6 (an in-domain
    split). A pre-norm causal transformer: embedding width 64, 2 layers, 4 heads,
    feed-forward width 256, learned positions, context 64. Adam at 0.001, gradient norm
    clipped at 1, minibatches of 16 windows, constant learning rate. The validation text is
    scored every ``eval_every`` steps on ``val_windows`` fixed windows.

Two training lengths
    With a constant learning rate, a run of ``long_steps`` steps passes through exactly the
    state a run of ``short_steps`` steps ends in; the endpoints are read at both lengths
    from the same runs.

Arms
    ``none``; DropGrad 0.2; Adam at 0.001 × √(1 − 0.2), the step shrink DropGrad 0.2 causes
    under Adam (the learning-rate-matched control); Dropout 0.1 on the attention and
    feed-forward outputs (the positive control).

Seeds
    10, declared before any run (a seed fixes the initial weights, the windows and the masks).

Endpoints
    Validation loss (nats per character) at the short and at the long length, lower is
    better; margin ±0.01. Each arm against ``none`` and DropGrad against the control; one
    Holm family per endpoint.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import data, figures, report
from .figures import FigureRecord

FULL: dict[str, Any] = {
    "seeds": 10,
    "train_chars": 200_000,
    "val_chars": 50_000,
    "block": 500,
    "split_seed": 0,
    "context": 64,
    "width": 64,
    "layers": 2,
    "heads": 4,
    "ff": 256,
    "batch_size": 16,
    "lr": 1e-3,
    "clip": 1.0,
    "short_steps": 300,
    "long_steps": 1000,
    "eval_every": 100,
    "val_windows": 256,
}
QUICK: dict[str, Any] = {
    **FULL,
    "seeds": 2,
    "train_chars": 20_000,
    "val_chars": 5_000,
    "short_steps": 4,
    "long_steps": 8,
    "eval_every": 4,
    "val_windows": 16,
}

ARMS: dict[str, dict[str, Any]] = {
    "none": {},
    "dropgrad_0.2": {"drop_rate": 0.2},
    "adam_lr_matched_0.2": {"lr_scale": math.sqrt(1 - 0.2)},
    "dropout_0.1": {"dropout": 0.1},
}
LABELS = {
    "none": "none",
    "dropgrad_0.2": "DropGrad 0.2",
    "adam_lr_matched_0.2": "Adam, lr × √(1 − 0.2)",
    "dropout_0.1": "Dropout 0.1",
}
PAIRS = [(a, "none") for a in ARMS if a != "none"] + [("dropgrad_0.2", "adam_lr_matched_0.2")]
SETTING = "transformer"


def endpoint(steps: int) -> report.Endpoint:
    return report.Endpoint(
        f"val_loss_{steps}",
        f"validation loss after {steps:,} steps (nats/char)",
        margin=0.01,
        higher_is_better=False,
        digits=3,
    )


class Block(nn.Module):
    def __init__(self, width: int, heads: int, ff: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        self.ff = nn.Sequential(nn.Linear(width, ff), nn.GELU(), nn.Linear(ff, width))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        h = self.norm1(x)
        attended, _ = self.attention(h, h, h, attn_mask=mask, need_weights=False)
        x = x + self.dropout(attended)
        return x + self.dropout(self.ff(self.norm2(x)))


class CharTransformer(nn.Module):
    def __init__(self, vocabulary: int, config: dict[str, Any], dropout: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary, config["width"])
        self.position = nn.Parameter(torch.zeros(config["context"], config["width"]))
        nn.init.normal_(self.position, std=0.02)
        self.blocks = nn.ModuleList(
            Block(config["width"], config["heads"], config["ff"], dropout)
            for _ in range(config["layers"])
        )
        self.norm = nn.LayerNorm(config["width"])
        self.head = nn.Linear(config["width"], vocabulary)
        context = config["context"]
        causal = torch.triu(torch.ones(context, context, dtype=torch.bool), diagonal=1)
        self.register_buffer("causal", causal, persistent=False)

    def forward(self, tokens: Tensor) -> Tensor:
        length = tokens.shape[1]
        x = self.embed(tokens) + self.position[:length]
        mask = self.causal[:length, :length]
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.norm(x))


def plan(config: dict[str, Any], runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "experiment": "transformer_lm",
            "id": f"{SETTING}/{arm}/{seed:03d}",
            "setting": SETTING,
            "arm": arm,
            "seed": seed,
            "regularizer": spec,
            "config": config,
            "cost": 20.0 * config["long_steps"],
        }
        for arm, spec in ARMS.items()
        for seed in range(config["seeds"])
    ]


STAGES = (plan,)


@torch.no_grad()
def score(model: nn.Module, windows: Tensor) -> float:
    model.eval()
    logits = model(windows[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten())
    model.train()
    return float(loss)


def run(job: dict[str, Any]) -> dict[str, Any]:
    config, seed, reg = job["config"], job["seed"], job["regularizer"]
    split = data.in_domain_text_split(
        config["train_chars"], config["val_chars"], config["block"], config["split_seed"]
    )
    context = config["context"]
    fixed = torch.Generator().manual_seed(config["split_seed"] + 1)
    starts = torch.randint(
        0, len(split.val) - context - 1, (config["val_windows"],), generator=fixed
    )
    val_windows = split.val[starts[:, None] + torch.arange(context + 1)]
    torch.manual_seed(seed)
    model = CharTransformer(split.vocabulary_size, config, reg.get("dropout", 0.0))
    optimizer: torch.optim.Optimizer = torch.optim.Adam(
        model.parameters(), lr=config["lr"] * reg.get("lr_scale", 1.0)
    )
    if "drop_rate" in reg:
        from dropgrad import DropGrad

        optimizer = DropGrad(optimizer, drop_rate=reg["drop_rate"], seed=seed)
    windows = torch.Generator().manual_seed(seed)
    curves: dict[str, list[float]] = {"step": [], "train_loss": [], "val_loss": []}
    running = []
    for step in range(1, config["long_steps"] + 1):
        begin = torch.randint(
            0, len(split.train) - context - 1, (config["batch_size"],), generator=windows
        )
        batch = split.train[begin[:, None] + torch.arange(context + 1)]
        optimizer.zero_grad()
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), config["clip"])
        optimizer.step()
        running.append(float(loss.detach()))
        if step % config["eval_every"] == 0 or step in (
            config["short_steps"],
            config["long_steps"],
        ):
            curves["step"].append(step)
            curves["train_loss"].append(float(np.mean(running)))
            curves["val_loss"].append(score(model, val_windows))
            running = []
    at = dict(zip(curves["step"], curves["val_loss"]))
    final = {
        f"val_loss_{config['short_steps']}": at[config["short_steps"]],
        f"val_loss_{config['long_steps']}": at[config["long_steps"]],
        "collapsed": not math.isfinite(at[config["long_steps"]]),
    }
    return {"final": final, "curves": curves}


def summarize(runs: list[dict[str, Any]], config: dict[str, Any]) -> tuple[list[dict], list[str]]:
    rows: list[dict[str, Any]] = []
    pairs = [(SETTING, arm, reference) for arm, reference in PAIRS]
    lines = [
        "## Experiment 7: a character-level transformer on pydoc_data.topics, two lengths",
        "",
        f"{config['seeds']} seeds declared; {config['train_chars']:,} training and "
        f"{config['val_chars']:,} validation characters.",
        "",
    ]
    for steps in (config["short_steps"], config["long_steps"]):
        e = endpoint(steps)
        comparisons = report.compare_family(runs, e, pairs)
        table = report.by_seed(runs, e, SETTING)
        arm_rows = [report.arm_row(SETTING, a, *table[a], e) for a in ARMS if a in table]
        rows += [{"kind": "arm", **row} for row in arm_rows]
        rows += report.comparison_rows(comparisons)
        lines += [report.endpoint_note(e, len(comparisons)), ""]
        lines += report.comparison_table(arm_rows, comparisons, e, LABELS, setting=SETTING)
        lines.append("")
    return rows, lines


def plot(
    runs: list[dict[str, Any]], rows: list[dict[str, Any]], config: dict[str, Any], where: Any
) -> list[FigureRecord]:
    return figures.loss_curves(
        runs,
        ARMS,
        LABELS,
        "transformer_lm.png",
        "Character-level transformer: mean over seeds, seed range shaded",
        where,
    )
