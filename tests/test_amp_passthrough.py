"""GradScaler's fused path through DropGrad, and the low-precision zero-gradient warning.

Fused Adam, AdamW, SGD and Adagrad unscale the gradients and skip the update on an
inf inside their kernel; ``torch.amp.GradScaler`` hands them the scale and the inf
flag as the attributes ``grad_scale`` and ``found_inf`` when the optimizer reports
``_step_supports_amp_scaling``. DropGrad reports what the wrapped optimizer does and
hands both attributes through. Masking commutes with the loss scale (a power of
two), so a run is bit-identical to the path where GradScaler unscales the gradients
itself. On the fused path GradScaler calls ``step()`` even when it found an inf;
DropGrad reads the flag (one host synchronisation, which the unscaling path pays as
well) and leaves that step out as the unscaling path does: not counted, nothing
masked, the wrapped step not run.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from dropgrad import DropGrad
from dropgrad.functional import drop_grad

FUSED = ["Adam", "AdamW", "SGD", "Adagrad"]
RATE = 0.3
SEED = 11
STEPS = 6
SCALE = 2.0**10  # GradScaler's scales are powers of two: unscaling is exact


class _ScalerUnscales(DropGrad):
    """DropGrad as GradScaler would see it without the pass-through: it unscales itself."""

    _step_supports_amp_scaling = False


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def _batch(step: int) -> Tensor:
    return torch.randn(8, 4, generator=torch.Generator().manual_seed(100 + step))


def _fused(name: str, model: nn.Module, **kwargs: Any) -> torch.optim.Optimizer:
    return getattr(torch.optim, name)(model.parameters(), lr=0.05, fused=True, **kwargs)


@dataclass
class Run:
    params: list[Tensor]
    grads: list[list[Tensor]]  # .grad after each step
    skipped: list[bool]  # whether full update drop skipped each step
    handed: list[bool]  # whether the wrapped step saw a grad_scale
    step_count: int
    skipped_count: int
    wrapped_state: dict[Any, Any]


def _train(wrapper: type[DropGrad], name: str, *, inf_at: int | None = None, **options: Any) -> Run:
    """``STEPS`` steps under ``GradScaler("cpu")``; an inf in one gradient at ``inf_at``."""
    model = _model()
    inner = _fused(name, model)
    if not getattr(inner, "_step_supports_amp_scaling", False):
        # torch 2.6's fused Adagrad, for one, does not report that its kernel unscales.
        pytest.skip(f"torch {torch.__version__}'s fused {name} leaves unscaling to GradScaler")
    opt = wrapper(inner, drop_rate=RATE, seed=SEED, **options)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    handed: list[bool] = []
    inner.register_step_pre_hook(
        lambda o, args, kwargs: handed.append(getattr(o, "grad_scale", None) is not None)
    )
    grads = []
    skipped = []
    for step in range(STEPS):
        opt.zero_grad()
        scaler.scale(model(_batch(step)).pow(2).mean()).backward()
        if step == inf_at:
            with torch.no_grad():
                model[0].weight.grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
        grads.append([p.grad.clone() for p in model.parameters()])
        skipped.append(opt.last_step_skipped)
        assert not hasattr(inner, "grad_scale") and not hasattr(inner, "found_inf")
    return Run(
        [p.detach().clone() for p in model.parameters()],
        grads,
        skipped,
        handed,
        opt.step_count,
        opt.skipped_count,
        inner.state_dict()["state"],
    )


def _same(actual: Any, expected: Any) -> bool:
    if isinstance(expected, Tensor):
        return actual.dtype == expected.dtype and torch.equal(actual, expected)
    if isinstance(expected, dict):
        return actual.keys() == expected.keys() and all(
            _same(actual[k], expected[k]) for k in expected
        )
    if isinstance(expected, list | tuple):
        return len(actual) == len(expected) and all(map(_same, actual, expected))
    return bool(actual == expected)


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    # Tiny tensors: torch's thread pool only adds wake-up latency to the fused CPU kernels.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------ pass-through


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("name", FUSED)
def test_reports_the_wrapped_optimizers_amp_support(name: str, fused: bool) -> None:
    inner = getattr(torch.optim, name)(_model().parameters(), lr=0.1, fused=fused)
    opt = DropGrad(inner, drop_rate=RATE)
    assert opt._step_supports_amp_scaling is getattr(inner, "_step_supports_amp_scaling", False)
    if not fused:
        assert opt._step_supports_amp_scaling is False


def test_an_optimizer_without_amp_support() -> None:
    opt = DropGrad(torch.optim.RMSprop(_model().parameters()), drop_rate=RATE)
    assert opt._step_supports_amp_scaling is False


@pytest.mark.parametrize(
    "options",
    [{}, {"target": "update"}, {"full_update_drop": 0.3}, {"full_update_drop": True}],
    ids=["gradient", "update", "full-update-drop", "update-and-full-update-drop"],
)
@pytest.mark.parametrize("name", FUSED)
def test_fused_path_is_bit_identical_to_gradscaler_unscaling(
    name: str, options: dict[str, Any]
) -> None:
    if options.get("full_update_drop") is True:
        options = dict(options, target="update")
    fused = _train(DropGrad, name, **options)
    unscaled = _train(_ScalerUnscales, name, **options)
    steps_run = STEPS - fused.skipped_count
    assert fused.handed == [True] * steps_run  # GradScaler took the fused path
    assert unscaled.handed == [False] * steps_run
    assert (fused.step_count, fused.skipped_count) == (unscaled.step_count, unscaled.skipped_count)
    assert _same(fused.params, unscaled.params)
    # The fused kernels unscale .grad in place: after a step it holds the same gradient. A
    # step that full update drop skips runs no kernel, and its .grad keeps the loss scale.
    assert fused.skipped == unscaled.skipped
    for fused_grads, unscaled_grads, skipped in zip(fused.grads, unscaled.grads, fused.skipped):
        expected = [g * SCALE for g in unscaled_grads] if skipped else unscaled_grads
        assert _same(fused_grads, expected)
    assert _same(fused.wrapped_state, unscaled.wrapped_state)


@pytest.mark.parametrize("options", [{}, {"target": "update"}, {"full_update_drop": 0.3}])
@pytest.mark.parametrize("name", FUSED)
def test_a_step_with_an_inf_is_left_out_as_gradscaler_leaves_it_out(
    name: str, options: dict[str, Any]
) -> None:
    inf_at = 2
    fused = _train(DropGrad, name, inf_at=inf_at, **options)
    unscaled = _train(_ScalerUnscales, name, inf_at=inf_at, **options)
    # GradScaler calls step() on the fused path, the unscaling path does not: either way
    # the step is not counted and the wrapped step does not run.
    assert fused.step_count == unscaled.step_count == STEPS - 1
    assert len(fused.handed) == len(unscaled.handed) == STEPS - 1 - fused.skipped_count
    assert _same(fused.params, unscaled.params)
    assert _same(fused.wrapped_state, unscaled.wrapped_state)
    for step, (fused_grads, unscaled_grads) in enumerate(zip(fused.grads, unscaled.grads)):
        if step != inf_at and not fused.skipped[step]:
            assert _same(fused_grads, unscaled_grads)


@pytest.mark.parametrize("name", FUSED)
def test_an_inf_step_against_the_bare_optimizer(name: str) -> None:
    """The fused path, step by step, against the bare fused optimizer (no scaler) fed the
    masks of DropGrad's steps 0, 1, 2, 3, 4 at calls 0, 1, 3, 4, 5 (call 2 has the inf)."""
    inf_at = 2
    fused = _train(DropGrad, name, inf_at=inf_at)
    model = _model()
    bare = _fused(name, model)
    counted = 0
    for step in range(STEPS):
        bare.zero_grad()
        model(_batch(step)).pow(2).mean().backward()
        if step == inf_at:
            continue
        for i, param in enumerate(model.parameters()):
            param.grad = drop_grad(param.grad, RATE, seed=SEED, step=counted, index=i)
        bare.step()
        counted += 1
    assert _same(fused.params, [p.detach() for p in model.parameters()])
    assert _same(fused.wrapped_state, bare.state_dict()["state"])


@pytest.mark.parametrize("target", ["gradient", "update"])
def test_grad_scale_and_found_inf_reach_the_wrapped_optimizer(target: str) -> None:
    model = _model()
    inner = _fused("Adam", model)
    inner.grad_scale = "the wrapped optimizer's own"
    opt = DropGrad(inner, drop_rate=RATE, seed=SEED, target=target)
    seen: list[tuple[Any, Any]] = []
    inner.register_step_pre_hook(
        lambda o, args, kwargs: seen.append(
            (o.__dict__.get("grad_scale"), o.__dict__.get("found_inf"))
        )
    )
    model(_batch(0)).pow(2).mean().backward()
    before = [p.detach().clone() for p in model.parameters()]

    opt.grad_scale, opt.found_inf = torch.tensor(4.0), torch.tensor(1.0)
    opt.step()  # an inf: left out
    assert seen == [] and opt.step_count == 0
    assert _same([p.detach() for p in model.parameters()], before)

    opt.found_inf = torch.tensor(0.0)
    opt.step()
    assert [(float(scale), float(inf)) for scale, inf in seen] == [(4.0, 0.0)]
    assert opt.step_count == 1
    assert inner.grad_scale == "the wrapped optimizer's own"
    assert "found_inf" not in inner.__dict__
    assert not _same([p.detach() for p in model.parameters()], before)


# ------------------------------------------------------------------ zero-gradient NaN warning

_OPTIMIZERS = [
    "Adadelta",
    "Adafactor",
    "Adagrad",
    "Adam",
    "Adamax",
    "AdamW",
    "ASGD",
    "NAdam",
    "RAdam",
    "RMSprop",
    "Rprop",
    "SGD",
]
_VARIANTS: list[dict[str, Any]] = [
    {},
    {"foreach": True},
    {"fused": True},
    {"weight_decay": 0.1},
    {"decoupled_weight_decay": True},
    {"eps": 1e-4},
]


def _construct(name: str, dtype: torch.dtype, kwargs: dict[str, Any]) -> Any:
    """Parameters and the optimizer, or ``None`` where torch refuses the combination."""
    params = [torch.ones(3, 4, dtype=dtype, requires_grad=True)]
    try:
        return params, getattr(torch.optim, name)(params, **kwargs)
    except (TypeError, ValueError, RuntimeError):
        return None


def _zero_gradient_gives_nan(name: str, dtype: torch.dtype, kwargs: dict[str, Any]) -> bool:
    """The bare optimizer over several steps of exactly-zero gradients ends with NaN."""
    params, opt = _construct(name, dtype, kwargs)
    for _ in range(8):  # RAdam's first steps take no square root, its sixth does
        params[0].grad = torch.zeros_like(params[0])
        opt.step()
    return not bool(torch.isfinite(params[0].detach()).all())


def _warnings_of_first_steps(opt: DropGrad, params: list[Tensor]) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            params[0].grad = torch.ones_like(params[0])
            opt.step()
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", _OPTIMIZERS)
def test_warning_exactly_where_a_zero_gradient_gives_nan(name: str, dtype: torch.dtype) -> None:
    """Across torch's optimizers and dtypes: one warning, naming the optimizer and dtype,
    for just the combinations whose bare step turns an exactly-zero gradient into NaN."""
    for kwargs in _VARIANTS:
        built = _construct(name, dtype, kwargs)
        if built is None:
            continue
        params, inner = built
        caught = _warnings_of_first_steps(DropGrad(inner, drop_rate=RATE, seed=SEED), params)
        where = f"{name}({kwargs}) in {dtype}"
        if _zero_gradient_gives_nan(name, dtype, kwargs):
            assert len(caught) == 1, f"{where}: {caught}"
            assert name in caught[0] and str(dtype).removeprefix("torch.") in caught[0]
        else:
            assert caught == [], f"{where}: {caught}"


def test_warning_message() -> None:
    params = [torch.ones(3, 4, dtype=torch.float16, requires_grad=True)]
    opt = DropGrad(torch.optim.Adagrad(params), drop_rate=RATE)
    params[0].grad = torch.ones_like(params[0])
    with pytest.warns(RuntimeWarning, match=r"Adagrad .*float16.*NaN"):
        opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        opt.step()  # once only


def test_no_warning_without_a_positive_rate() -> None:
    params = [torch.ones(3, 4, dtype=torch.float16, requires_grad=True)]
    opt = DropGrad(torch.optim.Adagrad(params), drop_rate=0.0)
    assert _warnings_of_first_steps(opt, params) == []
