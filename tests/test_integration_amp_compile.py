"""DropGrad with mixed precision (GradScaler, bf16 autocast, fused optimizers) and compile."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

from dropgrad import DropGrad, LinearDropRateScheduler
from dropgrad.kernels import quantize_rate

DROP_RATE = 0.3
# A power of two: scaling the loss and unscaling the gradients are then exact,
# so a scaled run can be compared bit for bit with an unscaled one.
INIT_SCALE = 2.0**10
COMPILE_STEPS = 12


def _make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 3))


def _batches(count: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(8, 6, generator=generator), torch.randn(8, 3, generator=generator))
        for _ in range(count)
    ]


def _scheduled_dropgrad(inner: torch.optim.Optimizer) -> DropGrad:
    return DropGrad(
        inner, drop_rate_scheduler=LinearDropRateScheduler(0.1, 0.4, num_steps=10), seed=7
    )


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# ------------------------------------------------------------------ GradScaler


def test_grad_scaler_masks_unscaled_gradients() -> None:
    """The wrapped step sees unscaled gradients and the run equals one without a scaler."""
    batches = _batches(6)

    plain_model = _make_model()
    plain = _scheduled_dropgrad(torch.optim.SGD(plain_model.parameters(), lr=0.1))
    for inputs, targets in batches:
        nn.functional.mse_loss(plain_model(inputs), targets).backward()
        plain.step()
        plain.zero_grad()

    model = _make_model()
    opt = _scheduled_dropgrad(torch.optim.SGD(model.parameters(), lr=0.1))
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
    seen_by_dropgrad: list[torch.Tensor] = []
    opt.register_step_pre_hook(lambda *_: seen_by_dropgrad.append(model[0].weight.grad.clone()))
    for inputs, targets in batches:
        loss = nn.functional.mse_loss(model(inputs), targets)
        expected = torch.autograd.grad(loss, model[0].weight, retain_graph=True)[0]
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        assert torch.equal(seen_by_dropgrad[-1], expected)
        opt.zero_grad()

    assert len(seen_by_dropgrad) == len(batches)
    assert opt.step_count == plain.step_count == len(batches)
    for param, plain_param in zip(model.parameters(), plain_model.parameters()):
        assert torch.equal(param, plain_param)


def _train_unscaled(
    model: nn.Module, opt: torch.optim.Optimizer, batches: list[tuple[torch.Tensor, torch.Tensor]]
) -> None:
    """The reference run: the same batches without a GradScaler."""
    for inputs, targets in batches:
        nn.functional.mse_loss(model(inputs), targets).backward()
        opt.step()
        opt.zero_grad()


def _scaled_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss_factor: float = 1.0,
) -> None:
    """One GradScaler step; ``loss_factor=math.inf`` makes the scaler skip it."""
    loss = nn.functional.mse_loss(model(inputs), targets) * loss_factor
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()


def _section(opt: DropGrad) -> dict:
    return opt.state_dict()["param_groups"][0]["dropgrad"]


def test_grad_scaler_inf_step_leaves_dropgrad_untouched() -> None:
    """A step GradScaler skips for inf/NaN does not advance schedulers or counters."""
    batches = _batches(5)
    bad_step = 2

    reference_model = _make_model()
    reference = _scheduled_dropgrad(torch.optim.SGD(reference_model.parameters(), lr=0.1))
    _train_unscaled(reference_model, reference, batches)

    model = _make_model()
    opt = _scheduled_dropgrad(torch.optim.SGD(model.parameters(), lr=0.1))
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
    for index, (inputs, targets) in enumerate(batches):
        if index == bad_step:
            before = (_section(opt), _params(model), scaler.get_scale())
            _scaled_step(model, opt, scaler, inputs, targets, loss_factor=math.inf)
            section, params, scale = before
            after = _section(opt)
            assert after["step_count"] == section["step_count"] == bad_step
            # Seed, counters, rates and scheduler states: all untouched.
            assert after == section
            assert opt.drop_rate == pytest.approx(0.1 + 0.03 * bad_step)
            assert all(torch.equal(a, b) for a, b in zip(_params(model), params))
            assert scaler.get_scale() == scale / 2
            opt.zero_grad()
        _scaled_step(model, opt, scaler, inputs, targets)
        opt.zero_grad()

    # The inf step left no trace: the run equals the one that never saw it.
    assert opt.step_count == reference.step_count == len(batches)
    for param, reference_param in zip(model.parameters(), reference_model.parameters()):
        assert torch.equal(param, reference_param)


def test_fused_optimizer_under_grad_scaler() -> None:
    """A fused wrapped optimizer gets unscaled, masked gradients and skips inf steps."""
    batches = _batches(6)
    bad_step = 3

    reference_model = _make_model()
    reference = _scheduled_dropgrad(torch.optim.Adam(reference_model.parameters(), lr=1e-2))
    _train_unscaled(reference_model, reference, batches)

    model = _make_model()
    fused = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
    opt = _scheduled_dropgrad(fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
    for index, (inputs, targets) in enumerate(batches):
        if index == bad_step:
            params = _params(model)
            _scaled_step(model, opt, scaler, inputs, targets, loss_factor=math.inf)
            assert all(torch.equal(a, b) for a, b in zip(_params(model), params))
            assert float(fused.state[model[0].weight]["step"]) == bad_step
            opt.zero_grad()
        _scaled_step(model, opt, scaler, inputs, targets)
        opt.zero_grad()

    assert opt.step_count == len(batches)
    assert float(fused.state[model[0].weight]["step"]) == len(batches)
    # Fused and for-each Adam round differently, hence a float32 tolerance, not equality.
    for param, reference_param in zip(model.parameters(), reference_model.parameters()):
        torch.testing.assert_close(param, reference_param)


# --------------------------------------------------------------- bf16 autocast


def test_bfloat16_autocast_on_cpu() -> None:
    model = _make_model()
    opt = DropGrad(torch.optim.Adam(model.parameters(), lr=1e-2), drop_rate=DROP_RATE, seed=3)
    before_mask: list[torch.Tensor] = []
    after_mask: list[torch.Tensor] = []
    opt.register_step_pre_hook(lambda *_: before_mask.append(model[0].weight.grad.clone()))
    opt.optimizer.register_step_pre_hook(lambda *_: after_mask.append(model[0].weight.grad.clone()))
    generator = torch.Generator().manual_seed(5)
    inputs = torch.randn(64, 6, generator=generator)
    targets = inputs @ torch.randn(6, 3, generator=generator)
    losses = []
    for _ in range(60):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            prediction = model(inputs)
        assert prediction.dtype == torch.bfloat16
        loss = nn.functional.mse_loss(prediction.float(), targets)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))

    _, keep_scale = quantize_rate(DROP_RATE)
    dropped = kept = 0
    for raw, masked in zip(before_mask, after_mask):
        assert raw.dtype == masked.dtype == torch.float32
        survivors = masked != 0
        torch.testing.assert_close(masked[survivors], raw[survivors] * keep_scale)
        dropped += int((~survivors & (raw != 0)).sum())
        kept += int(survivors.sum())
    total = dropped + kept
    assert abs(dropped / total - DROP_RATE) < 5 * math.sqrt(DROP_RATE * (1 - DROP_RATE) / total)
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])


# ---------------------------------------------------------------- torch.compile


def _train(
    model: nn.Module, opt: DropGrad, step: Callable[..., torch.Tensor], steps: int
) -> list[float]:
    losses = []
    for inputs, targets in _batches(steps):
        losses.append(float(step(model, opt, inputs, targets)))
    return losses


def _eager_step(
    model: nn.Module, opt: DropGrad, inputs: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    loss = nn.functional.mse_loss(model(inputs), targets)
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.detach()


def _dropgrad(model: nn.Module) -> DropGrad:
    return DropGrad(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        drop_rate=DROP_RATE,
        full_update_drop=0.3,
        seed=11,
    )


@pytest.fixture(scope="module")
def eager_run() -> tuple[list[torch.Tensor], list[float]]:
    model = _make_model()
    losses = _train(model, _dropgrad(model), _eager_step, COMPILE_STEPS)
    return _params(model), losses


def test_compiled_model_matches_eager(
    eager_run: tuple[list[torch.Tensor], list[float]],
) -> None:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = _make_model()
    # aot_eager traces like the default backend but skips C++ code generation,
    # which would dominate the test's run time on CPU.
    compiled = torch.compile(model, backend="aot_eager")
    opt = _dropgrad(model)
    losses = _train(compiled, opt, _eager_step, COMPILE_STEPS)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    eager_params, eager_losses = eager_run
    assert opt.skipped_count > 0
    # Same seed, same masks and skips; only the compiled kernels' rounding may differ.
    torch.testing.assert_close(losses, eager_losses)
    for param, eager_param in zip(_params(model), eager_params):
        torch.testing.assert_close(param, eager_param)


def test_compiled_training_step_calls_step(
    eager_run: tuple[list[torch.Tensor], list[float]],
) -> None:
    """A compiled function that calls opt.step() runs (with graph breaks) and matches eager."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = _make_model()
    opt = _dropgrad(model)
    compiled_step = torch.compile(_eager_step, backend="aot_eager")
    losses = _train(model, opt, compiled_step, COMPILE_STEPS)
    eager_params, eager_losses = eager_run
    # Dynamo compiled the forward and backward around the breaks at opt.step().
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    assert opt.step_count == COMPILE_STEPS
    torch.testing.assert_close(losses, eager_losses)
    for param, eager_param in zip(_params(model), eager_params):
        torch.testing.assert_close(param, eager_param)
