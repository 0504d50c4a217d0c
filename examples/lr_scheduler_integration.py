"""DropGrad together with a learning-rate scheduler and a drop-rate scheduler.

The LR scheduler is built on the optimizer whose ``step()`` the loop calls: the
DropGrad wrapper (for the plain run, the bare optimizer). Each batch calls
``opt.step()``; each epoch ends with ``lr_scheduler.step()``. A drop-rate scheduler passed as
``drop_rate_scheduler=`` is advanced by DropGrad itself, once per step.

Three runs on scikit-learn's handwritten digits, all with cosine-annealed Adam,
the same initial weights and the same batch order:

* plain Adam;
* DropGrad with a fixed drop rate of 0.1;
* DropGrad whose drop rate falls linearly from 0.2 to 0 over training.

Run it with::

    python examples/lr_scheduler_integration.py            # full run, about ten seconds
    python examples/lr_scheduler_integration.py --smoke    # a few steps, to check it works
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from _digits import (
    Digits,
    Settings,
    batches,
    batches_per_epoch,
    data_order,
    describe,
    evaluate,
    load_data,
    make_model,
    parse_args,
    print_table,
)
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR

from dropgrad import DropGrad, LinearDropRateScheduler

LEARNING_RATE = 3e-3


def train(
    wrap: Callable[[torch.optim.Optimizer], torch.optim.Optimizer],
    data: Digits,
    settings: Settings,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Train once; also return the LR and drop rate that each epoch started with."""
    model = make_model(settings.seed)
    opt = wrap(torch.optim.Adam(model.parameters(), lr=LEARNING_RATE))
    # Built on the object the loop steps, as frameworks such as Lightning require.
    lr_scheduler = CosineAnnealingLR(opt, T_max=settings.epochs)
    order = data_order(settings.seed)
    schedule = []
    for epoch in range(settings.epochs):
        schedule.append(
            {
                "epoch": epoch,
                "lr": lr_scheduler.get_last_lr()[0],
                "drop_rate": getattr(opt, "drop_rate", None),
            }
        )
        for x_batch, y_batch in batches(data, order, settings):
            loss = nn.functional.cross_entropy(model(x_batch), y_batch)
            loss.backward()
            opt.step()
            opt.zero_grad()
        lr_scheduler.step()
    return evaluate(model, data), schedule


def print_schedule(schedule: list[dict[str, Any]]) -> None:
    """Print the LR and drop rate at the first, last and a few middle epochs."""
    last = len(schedule) - 1
    shown = sorted({0, last // 4, last // 2, 3 * last // 4, last})
    print("epoch  lr at start  drop rate at start")
    for epoch in shown:
        entry = schedule[epoch]
        print(f"{epoch:>5}  {entry['lr']:>11.6f}  {entry['drop_rate']:>18.4f}")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    settings = parse_args(__doc__.splitlines()[0], argv, default_epochs=30)
    data = load_data()
    total_steps = settings.epochs * batches_per_epoch(data, settings)

    def plain(base: torch.optim.Optimizer) -> torch.optim.Optimizer:
        return base

    def fixed_rate(base: torch.optim.Optimizer) -> torch.optim.Optimizer:
        return DropGrad(base, drop_rate=0.1, seed=settings.seed)

    def scheduled_rate(base: torch.optim.Optimizer) -> torch.optim.Optimizer:
        drop_rate_scheduler = LinearDropRateScheduler(
            initial_drop_rate=0.2, final_drop_rate=0.0, num_steps=total_steps
        )
        return DropGrad(base, drop_rate_scheduler=drop_rate_scheduler, seed=settings.seed)

    results: dict[str, Any] = {}
    results["plain Adam + cosine LR"], _ = train(plain, data, settings)
    results["DropGrad 0.1 + cosine LR"], _ = train(fixed_rate, data, settings)
    results["DropGrad 0.2 -> 0 + cosine LR"], schedule = train(scheduled_rate, data, settings)
    print_table(f"LR scheduler integration ({describe(data, settings)})", results)
    print()
    print("Schedules of the last run (LR per epoch, drop rate per step):")
    print_schedule(schedule)
    print(
        "Shows: an LR scheduler on the DropGrad wrapper and a drop-rate scheduler inside "
        "DropGrad work side by side."
    )
    results["schedule"] = schedule
    return results


if __name__ == "__main__":
    # The model is too small to gain from intra-op threads; on a busy machine
    # they only wait on each other.
    torch.set_num_threads(1)
    main()
