"""Full update drop: DropGrad skips whole optimizer steps at random.

With ``full_update_drop=True`` each step is skipped with probability equal to
the drop rate; a float sets its own skip probability ``q``. Steps that do run
have their gradients divided by ``1 - q``, so the expected update is unchanged.
``opt.skipped_count`` and ``opt.step_count`` say how many steps were skipped.

Three runs on scikit-learn's handwritten digits, with the same initial weights
and the same batch order:

* plain Adam;
* ``DropGrad(Adam(...), drop_rate=0.1, full_update_drop=True)``;
* ``DropGrad(Adam(...), drop_rate=0.1, full_update_drop=0.25)``.

Run it with::

    python examples/full_update_drop.py            # full run, about ten seconds
    python examples/full_update_drop.py --smoke    # a few steps, to check it works
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from _digits import (
    Digits,
    Settings,
    batches,
    data_order,
    describe,
    evaluate,
    load_data,
    make_model,
    parse_args,
    print_table,
)
from torch import nn

from dropgrad import DropGrad

LEARNING_RATE = 1e-3


def train(
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    data: Digits,
    settings: Settings,
) -> dict[str, Any]:
    model = make_model(settings.seed)
    opt = make_optimizer(model)
    order = data_order(settings.seed)
    steps = 0
    for _ in range(settings.epochs):
        for x_batch, y_batch in batches(data, order, settings):
            loss = nn.functional.cross_entropy(model(x_batch), y_batch)
            loss.backward()
            opt.step()
            opt.zero_grad()
            steps += 1
    result: dict[str, Any] = evaluate(model, data)
    if isinstance(opt, DropGrad):
        result["skipped"], result["steps"] = opt.skipped_count, opt.step_count
        # True borrows the drop rate as the skip probability.
        setting = opt.full_update_drop
        skip_probability = opt.drop_rate if setting is True else float(setting)
    else:
        result["skipped"], result["steps"], skip_probability = 0, steps, 0.0
    result["skipped / steps"] = f"{result['skipped']} / {result['steps']}"
    result["expected skips"] = f"{skip_probability * result['steps']:.1f}"
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    settings = parse_args(__doc__.splitlines()[0], argv, default_epochs=30)
    data = load_data()

    def plain(model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)

    def skip_at_drop_rate(model: nn.Module) -> torch.optim.Optimizer:
        base = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
        return DropGrad(base, drop_rate=0.1, full_update_drop=True, seed=settings.seed)

    def skip_at_quarter(model: nn.Module) -> torch.optim.Optimizer:
        base = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
        return DropGrad(base, drop_rate=0.1, full_update_drop=0.25, seed=settings.seed)

    results = {
        "plain Adam": train(plain, data, settings),
        "DropGrad 0.1, full_update_drop=True": train(skip_at_drop_rate, data, settings),
        "DropGrad 0.1, full_update_drop=0.25": train(skip_at_quarter, data, settings),
    }
    print_table(
        f"Full update drop ({describe(data, settings)})",
        results,
        extra_columns=[("skipped / steps", "skipped / steps"), ("expected", "expected skips")],
    )
    print(
        "Shows: full_update_drop skips about q of all steps (q = drop rate for True, "
        "else the float given)."
    )
    return results


if __name__ == "__main__":
    # The model is too small to gain from intra-op threads; on a busy machine
    # they only wait on each other.
    torch.set_num_threads(1)
    main()
