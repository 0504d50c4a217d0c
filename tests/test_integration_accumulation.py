"""Gradient accumulation: one mask per optimizer step, never one per micro-batch."""

from __future__ import annotations

import torch
from torch import nn

from dropgrad import DropGrad

MICRO_BATCHES = 4
STEPS = 12


def _make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 2))


def _dropgrad(model: nn.Module) -> DropGrad:
    return DropGrad(
        torch.optim.SGD(model.parameters(), lr=0.1), drop_rate=0.4, full_update_drop=0.4, seed=9
    )


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(8 * MICRO_BATCHES, 5, generator=generator),
            torch.randn(8 * MICRO_BATCHES, 2, generator=generator),
        )
        for _ in range(STEPS)
    ]


def test_masks_drawn_once_per_step_with_accumulation() -> None:
    data = _data()

    full_model = _make_model()
    full = _dropgrad(full_model)
    full_masked: list[torch.Tensor] = []
    for inputs, targets in data:
        nn.functional.mse_loss(full_model(inputs), targets).backward()
        full.step()
        full_masked.append(full_model[0].weight.grad.clone())
        full.zero_grad()

    model = _make_model()
    opt = _dropgrad(model)
    masked: list[torch.Tensor] = []
    for inputs, targets in data:
        step_before = opt.step_count
        for micro_inputs, micro_targets in zip(
            inputs.chunk(MICRO_BATCHES), targets.chunk(MICRO_BATCHES)
        ):
            loss = nn.functional.mse_loss(model(micro_inputs), micro_targets) / MICRO_BATCHES
            loss.backward()
            # Backward passes neither mask nor count: the gradient is still whole,
            # and the masks (keyed by the step counter) stay those of this step.
            assert opt.step_count == step_before
            assert bool((model[0].weight.grad != 0).all())
        opt.step()
        assert opt.step_count == step_before + 1
        masked.append(model[0].weight.grad.clone())
        opt.zero_grad()

    assert opt.step_count == full.step_count == STEPS
    assert opt.skipped_count == full.skipped_count
    assert 0 < opt.skipped_count < STEPS
    for grad, full_grad in zip(masked, full_masked):
        # The same elements are dropped as with one big batch: one draw per step.
        assert torch.equal(grad == 0, full_grad == 0)
        # Summing micro-batch gradients rounds differently from one batch.
        torch.testing.assert_close(grad, full_grad)
    for param, full_param in zip(model.parameters(), full_model.parameters()):
        torch.testing.assert_close(param, full_param)
