"""Basic DropGrad usage: wrap Adam, then train as usual.

Trains the same small MLP on scikit-learn's handwritten digits three times, with
the same initial weights and the same batch order:

* plain Adam;
* ``DropGrad(Adam(...), drop_rate=0.1)``: one rate for every parameter;
* per-parameter rates: 0.1 for weights, 0.01 for biases, given as a dict of
  Parameters with ``drop_rate=None``.

Run it with::

    python examples/basic_usage.py            # full run, about ten seconds
    python examples/basic_usage.py --smoke    # a few steps, to check it works
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

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
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer], data: Digits, settings: Settings
) -> dict[str, float]:
    model = make_model(settings.seed)
    opt = make_optimizer(model)
    order = data_order(settings.seed)
    for _ in range(settings.epochs):
        for x_batch, y_batch in batches(data, order, settings):
            loss = nn.functional.cross_entropy(model(x_batch), y_batch)
            loss.backward()
            opt.step()
            opt.zero_grad()
    return evaluate(model, data)


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    settings = parse_args(__doc__.splitlines()[0], argv, default_epochs=30)
    data = load_data()

    def plain(model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)

    def one_rate(model: nn.Module) -> torch.optim.Optimizer:
        base = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
        return DropGrad(base, drop_rate=0.1, seed=settings.seed)

    def per_parameter(model: nn.Module) -> torch.optim.Optimizer:
        rates = {
            param: 0.1 if "weight" in name else 0.01 for name, param in model.named_parameters()
        }
        base = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
        # drop_rate=None: a parameter missing from the dict would not be masked.
        return DropGrad(base, drop_rate=None, params=rates, seed=settings.seed)

    results = {
        "plain Adam": train(plain, data, settings),
        "DropGrad, drop_rate=0.1": train(one_rate, data, settings),
        "DropGrad, weights 0.1 / biases 0.01": train(per_parameter, data, settings),
    }
    print_table(f"Basic usage ({describe(data, settings)})", results)
    print(
        "Shows: DropGrad wraps an existing optimizer and the training loop stays "
        "backward(); step(); zero_grad()."
    )
    return results


if __name__ == "__main__":
    # The model is too small to gain from intra-op threads; on a busy machine
    # they only wait on each other.
    torch.set_num_threads(1)
    main()
