"""DropGrad under Hugging Face Accelerate: prepare, train, save_state and load_state."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator  # a plain import: CI installs accelerate
from accelerate.optimizer import AcceleratedOptimizer
from torch import nn

from dropgrad import DropGrad, LinearDropRateScheduler

STEPS = 10
SAVE_AT = 4


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(5)
    return [
        (torch.randn(16, 6, generator=generator), torch.randn(16, 2, generator=generator))
        for _ in range(STEPS)
    ]


def build(model_seed: int) -> tuple[nn.Module, DropGrad]:
    torch.manual_seed(model_seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = DropGrad(
        torch.optim.AdamW(model.parameters(), lr=1e-2),
        drop_rate_scheduler=LinearDropRateScheduler(0.1, 0.4, num_steps=STEPS),
        full_update_drop=0.3,
        seed=21,
    )
    return model, opt


def train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    steps: range,
    backward: Callable[[torch.Tensor], object],
) -> None:
    data = batches()
    for index in steps:
        inputs, targets = data[index]
        loss = nn.functional.mse_loss(model(inputs), targets)
        backward(loss)
        opt.step()
        opt.zero_grad()


def test_accelerate_prepare_trains_like_plain_and_resumes_exactly(tmp_path: Path) -> None:
    # Reference: the same DropGrad without Accelerate.
    plain_model, plain_opt = build(model_seed=0)
    train(plain_model, plain_opt, range(STEPS), lambda loss: loss.backward())

    accelerator = Accelerator(cpu=True)
    model, opt = build(model_seed=0)
    model, prepared = accelerator.prepare(model, opt)
    assert isinstance(prepared, AcceleratedOptimizer)
    assert prepared.optimizer is opt
    train(model, prepared, range(SAVE_AT), accelerator.backward)
    accelerator.save_state(str(tmp_path / "checkpoint"))
    train(model, prepared, range(SAVE_AT, STEPS), accelerator.backward)

    # A fresh model (other initial weights) and DropGrad resume from the saved state.
    resumed_accelerator = Accelerator(cpu=True)
    resumed_model, resumed_opt = build(model_seed=1)
    resumed_model, resumed_prepared = resumed_accelerator.prepare(resumed_model, resumed_opt)
    resumed_accelerator.load_state(str(tmp_path / "checkpoint"))
    assert resumed_opt.step_count == SAVE_AT
    train(resumed_model, resumed_prepared, range(SAVE_AT, STEPS), resumed_accelerator.backward)

    for ours, reference, resumed in zip(
        model.parameters(), plain_model.parameters(), resumed_model.parameters()
    ):
        assert torch.equal(ours, reference)
        assert torch.equal(resumed, reference)
    assert opt.step_count == plain_opt.step_count == resumed_opt.step_count == STEPS
    assert opt.skipped_count == plain_opt.skipped_count == resumed_opt.skipped_count
    assert 0 < plain_opt.skipped_count < STEPS  # the skip stream was exercised
    assert resumed_opt.drop_rate == plain_opt.drop_rate
