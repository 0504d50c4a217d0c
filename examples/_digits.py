"""Shared pieces of the examples: the digits data, a small MLP, batching, evaluation, output.

scikit-learn ships the 8x8 handwritten digits inside its wheel, so the examples
train on real data without downloading anything.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch import Tensor, nn

# The split does not follow --seed: every run, whatever its seed, is scored on
# the same held-out digits.
SPLIT_SEED = 0
HELD_OUT_FRACTION = 0.25
BATCH_SIZE = 32
SMOKE_BATCHES = 5


@dataclass
class Digits:
    train_x: Tensor
    train_y: Tensor
    held_out_x: Tensor
    held_out_y: Tensor


@dataclass
class Settings:
    epochs: int
    seed: int
    smoke: bool
    # None means every batch of every epoch.
    batches_per_epoch: int | None


def parse_args(description: str, argv: Sequence[str] | None, default_epochs: int) -> Settings:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"passes over the data (default {default_epochs}; 1 with --smoke)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of init, data order and masks")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help=f"train on only {SMOKE_BATCHES} batches per epoch, to check that the script runs",
    )
    args = parser.parse_args(argv)
    if args.epochs is None:
        args.epochs = 1 if args.smoke else default_epochs
    if args.epochs < 1:
        parser.error(f"--epochs must be at least 1, got {args.epochs}")
    return Settings(
        epochs=args.epochs,
        seed=args.seed,
        smoke=args.smoke,
        batches_per_epoch=SMOKE_BATCHES if args.smoke else None,
    )


def load_data() -> Digits:
    """Standardized digits, split once into stratified train and held-out sets."""
    features, labels = load_digits(return_X_y=True)
    train_x, held_out_x, train_y, held_out_y = train_test_split(
        features,
        labels,
        test_size=HELD_OUT_FRACTION,
        stratify=labels,
        random_state=SPLIT_SEED,
    )
    # Fit on the training part only so nothing about the held-out digits leaks in.
    scaler = StandardScaler().fit(train_x)
    return Digits(
        train_x=torch.tensor(scaler.transform(train_x), dtype=torch.float32),
        train_y=torch.tensor(train_y, dtype=torch.long),
        held_out_x=torch.tensor(scaler.transform(held_out_x), dtype=torch.float32),
        held_out_y=torch.tensor(held_out_y, dtype=torch.long),
    )


def make_model(seed: int) -> nn.Module:
    """A 64-128-10 MLP whose initial weights depend only on ``seed``."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def batches_per_epoch(data: Digits, settings: Settings) -> int:
    full = -(-len(data.train_y) // BATCH_SIZE)
    return full if settings.batches_per_epoch is None else min(full, settings.batches_per_epoch)


def batches(
    data: Digits, order: torch.Generator, settings: Settings
) -> Iterator[tuple[Tensor, Tensor]]:
    """One epoch of shuffled mini-batches; ``order`` fixes the shuffle."""
    permutation = torch.randperm(len(data.train_y), generator=order)
    for index in permutation.split(BATCH_SIZE)[: batches_per_epoch(data, settings)]:
        yield data.train_x[index], data.train_y[index]


def data_order(seed: int) -> torch.Generator:
    """A generator for the shuffles, separate from torch's global RNG.

    Every run of a script starts one from the same seed, so all runs see the
    batches in the same order whatever else draws random numbers.
    """
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def evaluate(model: nn.Module, data: Digits) -> dict[str, float]:
    """Mean cross-entropy and accuracy on the held-out digits."""
    model.eval()
    logits = model(data.held_out_x)
    model.train()
    loss = nn.functional.cross_entropy(logits, data.held_out_y).item()
    accuracy = (logits.argmax(dim=1) == data.held_out_y).float().mean().item()
    return {"loss": loss, "accuracy": accuracy}


def print_table(
    title: str,
    results: dict[str, dict[str, float]],
    extra_columns: Sequence[tuple[str, str]] = (),
) -> None:
    """Print one row per run: held-out loss and accuracy, then any extra columns.

    ``extra_columns`` lists ``(heading, key)`` pairs; the key names a value in
    each run's result dict, printed as is.
    """
    headings = ["run", "held-out loss", "held-out accuracy"] + [h for h, _ in extra_columns]
    rows = [
        [name, f"{r['loss']:.4f}", f"{r['accuracy']:.4f}"] + [str(r[k]) for _, k in extra_columns]
        for name, r in results.items()
    ]
    widths = [max(len(row[i]) for row in [headings, *rows]) for i in range(len(headings))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:])]
        return "  ".join([first, *rest])

    print(title)
    print(line(headings))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line(row))


def describe(data: Digits, settings: Settings) -> str:
    mode = " (smoke run)" if settings.smoke else ""
    return (
        f"digits: {len(data.train_y)} train / {len(data.held_out_y)} held out, "
        f"{settings.epochs} epoch(s) x {batches_per_epoch(data, settings)} batches, "
        f"seed {settings.seed}{mode}"
    )
