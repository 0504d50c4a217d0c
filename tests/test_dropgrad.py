"""Tests of the DropGrad optimizer wrapper (checkpoints live in test_checkpoint.py)."""

from __future__ import annotations

import copy
import math
import pickle
import re
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from dropgrad import (
    CosineAnnealingDropRateScheduler,
    DropGrad,
    DropRateScheduler,
    LinearDropRateScheduler,
    StepDropRateScheduler,
)
from dropgrad._plan import plan_step, uniform_dense
from dropgrad.kernels import quantize_rate
from dropgrad.kernels._torch_ops import CHUNK_LANES

from ._helpers import ALL_DTYPES

IN_FEATURES = 6


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN_FEATURES, 8), nn.Tanh(), nn.Linear(8, 3))


class EncoderDecoder(nn.Module):
    """Parameter names: encoder.0.*, encoder2.*, decoder.*; 'encoder2' tests prefix matching."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.encoder = nn.Sequential(nn.Linear(IN_FEATURES, 8), nn.Tanh())
        self.encoder2 = nn.Linear(8, 8)
        self.decoder = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(torch.tanh(self.encoder2(self.encoder(x))))


def backward(model: nn.Module, step: int = 0) -> torch.Tensor:
    """Fill the model's grads from a batch that depends only on ``step``."""
    batch = torch.randn(16, IN_FEATURES, generator=torch.Generator().manual_seed(1000 + step))
    loss = model(batch).pow(2).mean()
    loss.backward()
    return loss


def grads_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def record_base_grads(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[dict]:
    """Grads as the wrapped optimizer sees them at each of its steps (after masking)."""
    seen: list[dict[str, torch.Tensor]] = []
    optimizer.register_step_pre_hook(lambda *_: seen.append(grads_of(model)))
    return seen


def train(opt: torch.optim.Optimizer, model: nn.Module, steps: int, first_step: int = 0) -> None:
    for step in range(first_step, first_step + steps):
        backward(model, step)
        opt.step()
        opt.zero_grad()


def binomial_tolerance(p: float, n: int) -> float:
    """Five standard deviations of the fraction of successes in ``n`` Bernoulli(p) trials."""
    return 5.0 * math.sqrt(p * (1.0 - p) / n)


class ConstantScheduler(DropRateScheduler):
    """Returns whatever rate it was given, valid or not."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def get_drop_rate(self) -> float:
        return self.rate


# ------------------------------------------------------------- 1. an Optimizer


def test_is_an_optimizer_sharing_the_wrapped_state() -> None:
    model = mlp()
    base = torch.optim.Adam(model.parameters(), lr=1e-2)
    opt = DropGrad(base, drop_rate=0.1, seed=0)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.optimizer is base
    assert opt.param_groups is base.param_groups
    assert opt.state is base.state
    assert opt.defaults is base.defaults
    train(opt, model, 2)
    assert len(opt.state) == 4

    saved = copy.deepcopy(base.state_dict())
    groups_before, state_before = base.param_groups, base.state
    base.load_state_dict(saved)
    # load_state_dict rebinds the base's lists; the wrapper must follow.
    assert base.param_groups is not groups_before and base.state is not state_before
    assert opt.param_groups is base.param_groups
    assert opt.state is base.state
    opt.param_groups[0]["lr"] = 0.5
    assert base.param_groups[0]["lr"] == 0.5


LR_SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], object]] = {
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=5),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=10),
    "LambdaLR": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda k: 1.0 / (k + 1)),
    "ExponentialLR": lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.9),
}


def _lr_sequence(make_scheduler, built_on: str | None, full_update_drop: float) -> list[float]:
    model = mlp()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if built_on is None:
        opt: torch.optim.Optimizer = base
        scheduler = make_scheduler(base)
    elif built_on == "base-first":
        # The order of the original README: LR scheduler first, then DropGrad.
        scheduler = make_scheduler(base)
        opt = DropGrad(base, drop_rate=0.2, full_update_drop=full_update_drop, seed=0)
    else:
        opt = DropGrad(base, drop_rate=0.2, full_update_drop=full_update_drop, seed=0)
        scheduler = make_scheduler(base if built_on == "base" else opt)
    lrs = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(6):
            backward(model, step)
            opt.step()
            opt.zero_grad()
            scheduler.step()  # type: ignore[attr-defined]
            lrs.append(base.param_groups[0]["lr"])
    return lrs


@pytest.mark.parametrize("full_update_drop", [0.0, 1.0])
@pytest.mark.parametrize("built_on", ["wrapper", "base", "base-first"])
@pytest.mark.parametrize("name", sorted(LR_SCHEDULERS))
def test_lr_schedulers_accept_wrapper_or_base_without_warning(
    name: str, built_on: str, full_update_drop: float
) -> None:
    # full_update_drop=1.0 skips every step, the first one included.
    make = LR_SCHEDULERS[name]
    lrs = _lr_sequence(make, built_on, full_update_drop)
    assert lrs == _lr_sequence(make, None, 0.0)
    assert len(set(lrs)) > 1


def test_add_param_group_reaches_base_with_default_rate() -> None:
    model, extra = mlp(), nn.Linear(IN_FEATURES, 2)
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = DropGrad(base, drop_rate=1.0, seed=0)
    opt.add_param_group({"params": extra.parameters(), "lr": 0.5})
    assert len(base.param_groups) == 2 and base.param_groups[1]["lr"] == 0.5
    assert base.param_groups[1]["params"][0] is extra.weight
    seen: list[torch.Tensor] = []
    base.register_step_pre_hook(lambda *_: seen.append(extra.weight.grad.clone()))
    extra(torch.ones(1, IN_FEATURES)).sum().backward()
    before = extra.weight.detach().clone()
    opt.step()
    assert torch.count_nonzero(seen[0]) == 0
    assert torch.equal(extra.weight, before)
    assert opt.get_drop_rates() == [1.0, 1.0]


def test_add_param_group_with_its_own_rate() -> None:
    model, extra = mlp(), nn.Linear(IN_FEATURES, 2)
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = DropGrad(base, drop_rate=1.0, seed=0)
    opt.add_param_group({"params": extra.parameters(), "drop_rate": 0.0})
    assert opt.get_drop_rates() == [1.0, 0.0]
    extra(torch.ones(1, IN_FEATURES)).sum().backward()
    expected = extra.weight.grad.clone()
    seen: list[torch.Tensor] = []
    base.register_step_pre_hook(lambda *_: seen.append(extra.weight.grad.clone()))
    opt.step()
    assert torch.equal(seen[0], expected)


@pytest.mark.parametrize(
    ("rate", "error", "shown"),
    [(1.5, ValueError, "1.5"), (float("nan"), ValueError, "nan"), ("0.1", TypeError, "'0.1'")],
)
def test_add_param_group_validates_drop_rate(rate: object, error: type, shown: str) -> None:
    base = torch.optim.SGD(mlp().parameters(), lr=0.1)
    opt = DropGrad(base, drop_rate=0.1, seed=0)
    with pytest.raises(error, match=r"param_group\['drop_rate'\].*" + re.escape(shown)):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(2))], "drop_rate": rate})
    assert len(base.param_groups) == 1


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_delegates(set_to_none: bool) -> None:
    model = mlp()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = DropGrad(base, drop_rate=0.1, seed=0)
    calls: list[bool] = []
    real_zero_grad = base.zero_grad

    def spy(set_to_none: bool = True) -> None:
        calls.append(set_to_none)
        real_zero_grad(set_to_none=set_to_none)

    base.zero_grad = spy  # type: ignore[method-assign]
    backward(model)
    opt.zero_grad(set_to_none=set_to_none)
    assert calls == [set_to_none]
    for p in model.parameters():
        if set_to_none:
            assert p.grad is None
        else:
            assert p.grad is not None and torch.count_nonzero(p.grad) == 0


def test_step_hooks_registered_on_wrapper_fire() -> None:
    model = mlp()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = DropGrad(base, drop_rate=0.1, full_update_drop=0.5, seed=0)
    events: list[tuple[str, object]] = []
    base.register_step_pre_hook(lambda o, a, k: events.append(("base", o)))
    pre = opt.register_step_pre_hook(lambda o, a, k: events.append(("pre", o)))
    opt.register_step_post_hook(lambda o, a, k: events.append(("post", o)))
    for step in range(6):
        backward(model, step)
        opt.step()
    assert 0 < opt.skipped_count < 6  # both kinds of step were exercised
    assert all(who is opt for kind, who in events if kind != "base")
    kinds = [kind for kind, _ in events]
    assert kinds.count("pre") == kinds.count("post") == 6
    assert kinds.count("base") == 6 - opt.skipped_count
    for i, kind in enumerate(kinds):
        if kind == "base":
            assert kinds[i - 1] == "pre" and kinds[i + 1] == "post"
    pre.remove()
    opt.step()
    kinds = [kind for kind, _ in events]
    assert (kinds.count("pre"), kinds.count("post")) == (6, 7)


def test_pickle_round_trip_continues_identically() -> None:
    model = mlp()
    opt = DropGrad(torch.optim.Adam(model.parameters(), lr=1e-2), drop_rate=0.3, seed=4)
    opt.register_step_pre_hook(lambda *_: None)
    train(opt, model, 2)
    restored_model, restored = pickle.loads(pickle.dumps((model, opt)))
    assert isinstance(restored, DropGrad)
    assert restored.step_count == 2 and restored.drop_rate == 0.3
    assert restored.param_groups is restored.optimizer.param_groups
    assert restored.param_groups[0]["params"][0] is next(restored_model.parameters())
    train(opt, model, 3, first_step=2)
    train(restored, restored_model, 3, first_step=2)
    assert_bit_identical(params_of(model), params_of(restored_model))


def test_deepcopy_trains_independently_and_identically() -> None:
    model = mlp()
    opt = DropGrad(
        torch.optim.Adam(model.parameters(), lr=1e-2),
        drop_rate=LinearDropRateScheduler(0.5, 0.1, num_steps=4),
        params={model[0].bias: 0.9},
        full_update_drop=0.2,
        seed=7,
    )
    train(opt, model, 2)
    model_copy, opt_copy = copy.deepcopy((model, opt))
    assert opt_copy.optimizer is not opt.optimizer
    assert opt_copy.drop_rate_scheduler is not opt.drop_rate_scheduler
    assert opt_copy.param_groups[0]["params"][1] is model_copy[0].bias
    assert opt_copy.get_param_drop_rates() == opt.get_param_drop_rates()

    before = params_of(model)
    train(opt_copy, model_copy, 4, first_step=2)
    assert_bit_identical(params_of(model), before)
    assert opt.step_count == 2 and opt.drop_rate_scheduler.step_count == 2

    train(opt, model, 4, first_step=2)
    assert_bit_identical(params_of(model), params_of(model_copy))
    assert (opt.skipped_count, opt.step_count) == (opt_copy.skipped_count, opt_copy.step_count)


def test_copies_do_not_keep_the_lr_scheduler_patch() -> None:
    # An LR scheduler built on the wrapper replaces its step with a closure that
    # refers back to the instance; a copy keeping it would step the original.
    model = mlp()
    opt = DropGrad(torch.optim.SGD(model.parameters(), lr=0.1), drop_rate=0.5, seed=0)
    torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    assert "step" in opt.__dict__
    model_copy, opt_copy = copy.deepcopy((model, opt))
    pickled_model, pickled = pickle.loads(pickle.dumps((model, opt)))
    before = params_of(model)
    for copied_model, copied in ((model_copy, opt_copy), (pickled_model, pickled)):
        backward(copied_model)
        copied.step()
        assert copied.step_count == 1
        assert not torch.equal(copied_model[0].weight, model[0].weight)
    assert opt.step_count == 0
    assert_bit_identical(params_of(model), before)


def test_uninitialised_instance_has_no_shared_attributes() -> None:
    # hasattr() and copy protocols rely on AttributeError here.
    bare = DropGrad.__new__(DropGrad)
    for name in ("param_groups", "state", "defaults"):
        assert not hasattr(bare, name)
    with pytest.raises(AttributeError, match="'DropGrad' object has no attribute 'state'"):
        _ = bare.state


def test_repr_mentions_rate_and_wrapped_optimizer() -> None:
    opt = DropGrad(torch.optim.Adam(mlp().parameters(), lr=1e-3), drop_rate=0.125, seed=0)
    text = repr(opt)
    assert "drop_rate=0.125" in text
    assert "Adam" in text and "lr: 0.001" in text


# ------------------------------------------------------------------ 2. rates


@pytest.mark.parametrize(
    "make_base",
    [
        lambda ps: torch.optim.Adam(ps, lr=1e-2),
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
    ],
    ids=["adam", "sgd-momentum"],
)
@pytest.mark.parametrize("distribution", ["bernoulli", "gaussian"])
def test_rate_zero_is_bit_identical_and_draws_nothing(make_base, distribution: str) -> None:
    bare_model, model = mlp(), mlp()
    train(make_base(bare_model.parameters()), bare_model, 5)
    opt = DropGrad(make_base(model.parameters()), drop_rate=0.0, distribution=distribution, seed=0)
    global_state = torch.get_rng_state()
    train(opt, model, 5)
    assert_bit_identical(params_of(bare_model), params_of(model))
    # The data come from seeded generators of their own: torch's global one is untouched.
    assert torch.equal(torch.get_rng_state(), global_state)


@pytest.mark.parametrize("distribution", ["bernoulli", "gaussian"])
@pytest.mark.parametrize("full_update_drop", [False, 0.5])
def test_rate_one_zeroes_grads_without_nan(distribution: str, full_update_drop: float) -> None:
    model = mlp()
    base = torch.optim.Adam(model.parameters(), lr=1e-2)
    opt = DropGrad(
        base,
        drop_rate=1.0,
        distribution=distribution,
        full_update_drop=full_update_drop,
        seed=0,
    )
    seen = record_base_grads(base, model)
    before = params_of(model)
    for step in range(3):
        backward(model, step)
        model[0].weight.grad[0, 0] = float("inf")  # 0 * inf would be NaN
        model[0].bias.grad[0] = float("nan")
        opt.step()
        opt.zero_grad()
    assert len(seen) == 3 - opt.skipped_count > 0
    for grads in seen:
        for grad in grads.values():
            assert torch.equal(grad, torch.zeros_like(grad))
    after = params_of(model)
    assert all(torch.isfinite(p).all() for p in after.values())
    assert_bit_identical(before, after)


BAD_RATES = [
    (-0.1, ValueError, "-0.1"),
    (1.5, ValueError, "1.5"),
    (float("nan"), ValueError, "nan"),
    (float("inf"), ValueError, "inf"),
    (float("-inf"), ValueError, "-inf"),
    (True, TypeError, "True"),
    ("0.1", TypeError, "'0.1'"),
]


@pytest.mark.parametrize(("rate", "error", "shown"), BAD_RATES)
def test_bad_drop_rate(rate: object, error: type, shown: str) -> None:
    base = torch.optim.SGD(mlp().parameters(), lr=0.1)
    with pytest.raises(error, match=r"^drop_rate .*" + re.escape(shown)):
        DropGrad(base, drop_rate=rate)  # type: ignore[arg-type]
    opt = DropGrad(base, drop_rate=0.1, seed=0)
    with pytest.raises(error, match=r"^drop_rate .*" + re.escape(shown)):
        opt.drop_rate = rate  # type: ignore[assignment]
    assert opt.drop_rate == 0.1


@pytest.mark.parametrize(("rate", "error", "shown"), BAD_RATES)
def test_bad_params_rate(rate: object, error: type, shown: str) -> None:
    model = EncoderDecoder()
    base = torch.optim.SGD(model.named_parameters(), lr=0.1)
    with pytest.raises(error, match=r"params\['decoder'\] .*" + re.escape(shown)):
        DropGrad(base, params={"decoder": rate})  # type: ignore[dict-item]
    with pytest.raises(error, match=r"params\[<tensor of shape \(3, 8\)>\] .*" + re.escape(shown)):
        DropGrad(base, params={model.decoder.weight: rate})  # type: ignore[dict-item]


@pytest.mark.parametrize(("rate", "error", "shown"), BAD_RATES)
def test_bad_group_rate(rate: object, error: type, shown: str) -> None:
    model = mlp()
    base = torch.optim.SGD(
        [{"params": model[0].parameters()}, {"params": model[2].parameters(), "drop_rate": rate}],
        lr=0.1,
    )
    with pytest.raises(error, match=r"param_groups\[1\]\['drop_rate'\] .*" + re.escape(shown)):
        DropGrad(base, drop_rate=0.1)


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (-0.1, ValueError, r"full_update_drop must be in \[0, 1\], got -0.1"),
        (1.5, ValueError, r"full_update_drop must be in \[0, 1\], got 1.5"),
        (float("nan"), ValueError, r"full_update_drop must be in \[0, 1\], got nan"),
        (float("inf"), ValueError, r"full_update_drop must be in \[0, 1\], got inf"),
        ("yes", TypeError, r"full_update_drop must be a bool or a float .* got str 'yes'"),
        (None, TypeError, r"full_update_drop must be a bool or a float .* got NoneType None"),
        (
            1,
            TypeError,
            r"got int 1; pass True to skip with probability drop_rate, or a float such as 1.0",
        ),
        (0, TypeError, r"full_update_drop must be a bool or a float in \[0, 1\], got int 0"),
    ],
)
def test_bad_full_update_drop(value: object, error: type, match: str) -> None:
    base = torch.optim.SGD(mlp().parameters(), lr=0.1)
    with pytest.raises(error, match=match):
        DropGrad(base, drop_rate=0.1, full_update_drop=value)  # type: ignore[arg-type]
    opt = DropGrad(base, drop_rate=0.1, seed=0)
    with pytest.raises(error, match=match):
        opt.full_update_drop = value  # type: ignore[assignment]
    assert opt.full_update_drop is False


@pytest.mark.parametrize(
    ("seed", "error", "match"),
    [
        (-1, ValueError, r"seed must be in \[0, 2\*\*64\), got -1"),
        (2**64, ValueError, r"seed must be in \[0, 2\*\*64\), got 18446744073709551616"),
        (1.5, TypeError, r"seed must be an int or None, got float 1.5"),
        (float("nan"), TypeError, r"seed must be an int or None, got float nan"),
        (float("inf"), TypeError, r"seed must be an int or None, got float inf"),
        (True, TypeError, r"seed must be an int or None, got bool True"),
        ("3", TypeError, r"seed must be an int or None, got str '3'"),
    ],
)
def test_bad_seed(seed: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        DropGrad(torch.optim.SGD(mlp().parameters(), lr=0.1), drop_rate=0.1, seed=seed)  # type: ignore[arg-type]


def test_bad_constructor_arguments() -> None:
    model = mlp()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(
        TypeError, match="optimizer must be a torch.optim.Optimizer, got Sequential"
    ):
        DropGrad(model, drop_rate=0.1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="DropGrad needs a drop rate"):
        DropGrad(base)
    with pytest.raises(ValueError, match="DropGrad needs a drop rate"):
        DropGrad(base, drop_rate=None, params={})
    with pytest.raises(ValueError, match="pass drop_rate or drop_rate_scheduler, not both"):
        DropGrad(base, drop_rate=0.1, drop_rate_scheduler=ConstantScheduler(0.2))
    with pytest.raises(ValueError, match="pass drop_rate or drop_rate_scheduler, not both"):
        DropGrad(base, drop_rate=ConstantScheduler(0.1), drop_rate_scheduler=ConstantScheduler(0.2))
    with pytest.raises(
        TypeError, match="drop_rate_scheduler must be a DropRateScheduler, got float"
    ):
        DropGrad(base, drop_rate_scheduler=0.1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"distribution must be one of .* got 'uniform'"):
        DropGrad(base, drop_rate=0.1, distribution="uniform")


def test_any_rate_source_is_enough() -> None:
    model = mlp()
    plain = torch.optim.SGD(model.parameters(), lr=0.1)
    assert DropGrad(plain, params={model[0].weight: 0.1}).drop_rate is None
    assert DropGrad(plain, drop_rate_scheduler=ConstantScheduler(0.25)).drop_rate == 0.25
    grouped = torch.optim.SGD([{"params": model.parameters(), "drop_rate": 0.3}], lr=0.1)
    assert DropGrad(grouped).get_drop_rates() == [0.3]


# ------------------------------------------------------------- 3. drop_rate


def test_drop_rate_reads_current_default_and_assignment_applies_next_step() -> None:
    model = mlp()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = StepDropRateScheduler(0.2, {1: 0.4})
    opt = DropGrad(base, drop_rate_scheduler=scheduler, seed=0)
    assert opt.drop_rate == 0.2 and opt.drop_rate_scheduler is scheduler
    train(opt, model, 1)
    assert opt.drop_rate == 0.4

    opt.drop_rate = 0.0
    assert opt.drop_rate == 0.0 and opt.drop_rate_scheduler is None
    seen = record_base_grads(base, model)
    backward(model, 5)
    expected = grads_of(model)
    opt.step()
    opt.zero_grad()
    assert_bit_identical(seen[0], expected)

    opt.drop_rate = 1.0
    backward(model, 6)
    opt.step()
    assert all(torch.count_nonzero(g) == 0 for g in seen[1].values())


# ----------------------------------------------------- 4. per-parameter rates


def _rates_seen(opt: DropGrad, base: torch.optim.Optimizer, model: nn.Module) -> dict[str, str]:
    """Classify each grad the wrapped optimizer sees as 'kept', 'zero' or 'masked'."""
    seen = record_base_grads(base, model)
    backward(model)
    original = grads_of(model)
    opt.step()
    result = {}
    for name, grad in seen[0].items():
        if torch.equal(grad, original[name]):
            result[name] = "kept"
        elif torch.count_nonzero(grad) == 0:
            result[name] = "zero"
        else:
            result[name] = "masked"
    return result


def test_string_keys_match_exact_names_and_dotted_prefixes() -> None:
    model = EncoderDecoder()
    base = torch.optim.SGD(model.named_parameters(), lr=0.1)
    assert "param_names" in base.param_groups[0]
    opt = DropGrad(base, params={"encoder": 1.0, "decoder.bias": 1.0}, seed=0)
    assert _rates_seen(opt, base, model) == {
        "encoder.0.weight": "zero",
        "encoder.0.bias": "zero",
        # 'encoder' is not a dotted prefix of 'encoder2'; drop_rate=None leaves it alone.
        "encoder2.weight": "kept",
        "encoder2.bias": "kept",
        "decoder.weight": "kept",
        "decoder.bias": "zero",
    }
    assert opt.get_param_drop_rates() == {
        "encoder.0.weight": 1.0,
        "encoder.0.bias": 1.0,
        "decoder.bias": 1.0,
    }


def test_most_specific_key_wins_and_parameter_beats_names() -> None:
    model = EncoderDecoder()
    base = torch.optim.SGD(model.named_parameters(), lr=0.1)
    params = {
        model.encoder2.bias: 0.0,
        "encoder2.bias": 1.0,
        "encoder.0.weight": 0.0,
        "encoder": 1.0,
        "encoder.0": 0.0,
        "encoder2": 1.0,
    }
    opt = DropGrad(base, drop_rate=1.0, params=params, seed=0)
    assert opt.get_param_drop_rates() == {
        "encoder.0.weight": 0.0,
        "encoder.0.bias": 0.0,
        "encoder2.weight": 1.0,
        "encoder2.bias": 0.0,
    }
    assert _rates_seen(opt, base, model) == {
        "encoder.0.weight": "kept",
        "encoder.0.bias": "kept",
        "encoder2.weight": "zero",
        "encoder2.bias": "kept",
        "decoder.weight": "zero",
        "decoder.bias": "zero",
    }


def test_group_name_entry_names_its_parameters() -> None:
    model = EncoderDecoder()
    base = torch.optim.SGD(
        [
            {"params": model.encoder.parameters(), "name": "encoder"},
            {"params": model.encoder2.parameters(), "name": "middle"},
            {"params": [model.decoder.weight], "name": "decoder.weight"},
            {"params": [model.decoder.bias], "name": "decoder.bias"},
        ],
        lr=0.1,
    )
    opt = DropGrad(
        base, params={"encoder": 1.0, "decoder": 0.0, model.encoder[0].bias: 0.5}, seed=0
    )
    # A name shared by a whole group is ambiguous; those parameters are listed by position.
    assert opt.get_param_drop_rates() == {
        "param_groups[0][0]": 1.0,
        "param_groups[0][1]": 0.5,
        "decoder.weight": 0.0,
        "decoder.bias": 0.0,
    }
    assert _rates_seen(opt, base, model) == {
        "encoder.0.weight": "zero",
        "encoder.0.bias": "masked",
        "encoder2.weight": "kept",
        "encoder2.bias": "kept",
        "decoder.weight": "kept",
        "decoder.bias": "kept",
    }


def test_precedence_params_over_group_over_default() -> None:
    model = EncoderDecoder()
    base = torch.optim.SGD(
        [
            {"params": model.encoder.parameters(), "drop_rate": 0.0},
            {"params": model.encoder2.parameters()},
            {"params": model.decoder.parameters(), "drop_rate": 0.0},
        ],
        lr=0.1,
    )
    opt = DropGrad(base, drop_rate=1.0, params={model.decoder.bias: 1.0}, seed=0)
    assert opt.get_drop_rates() == [0.0, 1.0, 0.0]
    assert opt.get_param_drop_rates() == {"param_groups[2][1]": 1.0}
    assert _rates_seen(opt, base, model) == {
        "encoder.0.weight": "kept",
        "encoder.0.bias": "kept",
        "encoder2.weight": "zero",
        "encoder2.bias": "zero",
        "decoder.weight": "kept",
        "decoder.bias": "zero",
    }


def test_group_drop_rate_none_leaves_group_untouched() -> None:
    model = mlp()
    base = torch.optim.SGD(
        [{"params": model[0].parameters(), "drop_rate": None}, {"params": model[2].parameters()}],
        lr=0.1,
    )
    opt = DropGrad(base, drop_rate=1.0, seed=0)
    assert opt.get_drop_rates() == [None, 1.0]
    assert _rates_seen(opt, base, model) == {
        "0.weight": "kept",
        "0.bias": "kept",
        "2.weight": "zero",
        "2.bias": "zero",
    }


def test_unmatched_parameters_with_no_default_are_bit_identical() -> None:
    model = EncoderDecoder()
    base = torch.optim.Adam(model.named_parameters(), lr=1e-2)
    opt = DropGrad(base, params={"decoder": 0.5}, seed=0)
    seen = record_base_grads(base, model)
    for step in range(4):
        backward(model, step)
        original = grads_of(model)
        opt.step()
        opt.zero_grad()
        for name, grad in seen[step].items():
            if name.startswith("decoder"):
                assert not torch.equal(grad, original[name]), name
            else:
                assert torch.equal(grad, original[name]), name


class TwoHidden(nn.Module):
    """The README's per-parameter example network: hidden1, hidden2 and an output layer."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.hidden1 = nn.Linear(IN_FEATURES, 16)
        self.hidden2 = nn.Linear(16, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden2(torch.tanh(self.hidden1(x)))))


def test_readme_per_parameter_snippet() -> None:
    net, bare_net = TwoHidden(), TwoHidden()
    rates = {net.hidden1.weight: 0.2, net.hidden2.weight: 0.05}
    opt = DropGrad(torch.optim.Adam(net.parameters(), lr=1e-3), params=rates)
    train(opt, net, 1)
    train(torch.optim.Adam(bare_net.parameters(), lr=1e-3), bare_net, 1)
    assert opt.get_param_drop_rates() == {"param_groups[0][0]": 0.2, "param_groups[0][2]": 0.05}
    # After one step from the same gradients, the parameters without a rate have taken
    # exactly the bare Adam step, and the two masked weight matrices have not.
    for (name, p), bare in zip(net.named_parameters(), bare_net.parameters()):
        masked = name in ("hidden1.weight", "hidden2.weight")
        assert torch.equal(p, bare) != masked, name


def test_readme_encoder_decoder_snippet() -> None:
    net = EncoderDecoder()
    opt_unwrapped = torch.optim.Adam(net.named_parameters(), lr=1e-3)
    opt = DropGrad(opt_unwrapped, params={"encoder": 0.1, "decoder": 0.2})
    train(opt, net, 2)
    assert opt.get_param_drop_rates() == {
        "encoder.0.weight": 0.1,
        "encoder.0.bias": 0.1,
        "decoder.weight": 0.2,
        "decoder.bias": 0.2,
    }


def test_params_errors() -> None:
    model = EncoderDecoder()
    named = torch.optim.SGD(model.named_parameters(), lr=0.1)
    unnamed = torch.optim.SGD(model.parameters(), lr=0.1)
    stranger = nn.Parameter(torch.ones(4, 5))
    with pytest.raises(
        ValueError, match=r"params\[<tensor of shape \(4, 5\)>\]: this tensor is not updated"
    ):
        DropGrad(named, params={stranger: 0.1})
    with pytest.raises(ValueError, match=r"params key 'enc' matches no parameter name"):
        DropGrad(named, params={"enc": 0.1})
    with pytest.raises(ValueError, match=r"params key 'encoder.0.weight.x' matches no"):
        DropGrad(named, params={"encoder.0.weight.x": 0.1})
    with pytest.raises(ValueError, match=r"string keys such as 'encoder' .* no parameter names"):
        DropGrad(unnamed, params={"encoder": 0.1})
    with pytest.raises(TypeError, match=r"params must be a dict .* got list"):
        DropGrad(unnamed, params=[(model.decoder.bias, 0.1)])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"params keys must be .* got int 0"):
        DropGrad(unnamed, params={0: 0.1})  # type: ignore[dict-item]


# -------------------------------------------------------------- 5. masking


def _one_big_param(numel: int, dtype: torch.dtype) -> tuple[nn.Parameter, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    if dtype.is_complex:
        real = torch.rand(2 * numel, generator=generator, dtype=torch.float64) + 0.5
        values = torch.view_as_complex(real.view(numel, 2)).to(dtype)
    else:
        values = (torch.rand(numel, generator=generator, dtype=torch.float64) + 0.5).to(dtype)
    param = nn.Parameter(torch.zeros(numel, dtype=dtype))
    param.grad = values.clone()
    return param, values


@pytest.mark.parametrize(
    "dtype",
    ALL_DTYPES,
)
@pytest.mark.parametrize("rate", [0.1, 0.3, 0.75])
def test_drop_fraction_and_survivor_scale(dtype: torch.dtype, rate: float) -> None:
    numel = 40_000
    param, original = _one_big_param(numel, dtype)
    base = torch.optim.SGD([param], lr=0.1)
    opt = DropGrad(base, drop_rate=rate, seed=11)
    seen: list[torch.Tensor] = []
    base.register_step_pre_hook(lambda *_: seen.append(param.grad.clone()))
    opt.step()
    masked = seen[0]
    threshold, keep_scale = quantize_rate(rate)
    realized = threshold / 65536
    dropped = masked == 0
    fraction = dropped.double().mean().item()
    assert abs(fraction - realized) <= binomial_tolerance(realized, numel)
    assert torch.equal(masked[~dropped], original[~dropped].mul(keep_scale))


def test_sparse_gradients_are_coalesced_then_masked() -> None:
    torch.manual_seed(0)
    embedding = nn.Embedding(200, 8, sparse=True)
    base = torch.optim.SparseAdam(embedding.parameters(), lr=1e-2)
    opt = DropGrad(base, drop_rate=0.5, seed=0)
    seen: list[torch.Tensor] = []
    base.register_step_pre_hook(lambda *_: seen.append(embedding.weight.grad.clone()))
    _, keep_scale = quantize_rate(0.5)
    for step in range(3):
        # Every index appears several times, so the raw gradient has duplicates.
        indices = torch.randint(0, 200, (300,), generator=torch.Generator().manual_seed(step))
        embedding(indices).pow(2).sum().backward()
        assert not embedding.weight.grad.is_coalesced()
        expected = embedding.weight.grad.coalesce()
        opt.step()
        opt.zero_grad()
        masked = seen[step]
        assert masked.is_sparse and masked.is_coalesced()
        assert torch.equal(masked._indices(), expected._indices())
        values, reference = masked._values(), expected._values()
        dropped = values == 0
        assert torch.equal(values[~dropped], reference[~dropped] * keep_scale)
        n = values.numel()
        assert abs(dropped.double().mean().item() - 0.5) <= binomial_tolerance(0.5, n)
    assert torch.isfinite(embedding.weight).all()


def test_parameters_without_grad_are_skipped() -> None:
    model = mlp()
    unused = nn.Parameter(torch.ones(3))
    base = torch.optim.Adam([*model.parameters(), unused], lr=1e-2)
    opt = DropGrad(base, drop_rate=0.5, params={unused: 1.0}, seed=0)
    train(opt, model, 2)
    assert unused.grad is None
    assert torch.equal(unused, torch.ones(3))
    assert unused not in base.state


def test_gaussian_multiplier_mean_and_variance() -> None:
    numel, rate = 200_000, 0.3
    param = nn.Parameter(torch.zeros(numel, dtype=torch.float64))
    param.grad = torch.ones(numel, dtype=torch.float64)
    base = torch.optim.SGD([param], lr=0.1)
    opt = DropGrad(base, drop_rate=rate, distribution="gaussian", seed=5)
    seen: list[torch.Tensor] = []
    base.register_step_pre_hook(lambda *_: seen.append(param.grad.clone()))
    opt.step()
    multiplier = seen[0]
    variance = rate / (1 - rate)
    # Sample mean: sd sqrt(var / n); sample variance of a normal: sd var * sqrt(2 / (n - 1)).
    assert abs(multiplier.mean().item() - 1.0) <= 5 * math.sqrt(variance / numel)
    assert abs(multiplier.var().item() - variance) <= 5 * variance * math.sqrt(2 / (numel - 1))
    assert multiplier.unique().numel() > numel // 2  # noise, not a mask


def _lbfgs_setup(
    rate: float,
) -> tuple[nn.Parameter, DropGrad, list[torch.Tensor], Callable, list[torch.Tensor]]:
    """LBFGS on a quadratic; records the flat gradient LBFGS reads after each evaluation."""
    target = torch.linspace(-1, 1, 4000)
    param = nn.Parameter(torch.zeros(4000))
    base = torch.optim.LBFGS([param], lr=0.5, max_iter=4, history_size=3)
    seen: list[torch.Tensor] = []
    gather = base._gather_flat_grad

    def spy() -> torch.Tensor:
        flat = gather()
        seen.append(flat.clone())
        return flat

    base._gather_flat_grad = spy  # type: ignore[method-assign]
    evaluations: list[torch.Tensor] = []

    def closure() -> torch.Tensor:
        base.zero_grad()
        loss = (param - target).pow(2).sum()
        loss.backward()
        evaluations.append(param.grad.clone())
        return loss

    return param, DropGrad(base, drop_rate=rate, seed=1), seen, closure, evaluations


def test_lbfgs_never_sees_an_unmasked_gradient() -> None:
    param, opt, seen, closure, evaluations = _lbfgs_setup(0.5)
    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor)
    assert len(seen) == len(evaluations) >= 3
    for flat, raw in zip(seen, evaluations):
        assert torch.count_nonzero(raw) == raw.numel()
        fraction = (flat == 0).double().mean().item()
        assert abs(fraction - 0.5) <= binomial_tolerance(0.5, flat.numel())
    assert not torch.equal(seen[0], seen[1])  # a fresh mask per evaluation


def test_lbfgs_with_rate_one_makes_no_progress() -> None:
    param, opt, seen, closure, _ = _lbfgs_setup(1.0)
    for _ in range(3):
        opt.step(closure)
    assert all(torch.count_nonzero(flat) == 0 for flat in seen)
    assert torch.equal(param.detach(), torch.zeros(4000))


def _mixed_size_run(backend: str, full_update_drop: float) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    shapes = [(3,), (CHUNK_LANES + 13,), (7, 5), (1000, 3), (1,), (300_001,), (2, 2)]
    params = [nn.Parameter(torch.randn(s, generator=generator)) for s in shapes]
    params.append(nn.Parameter(torch.randn(10, 10, dtype=torch.float64, generator=generator)))
    opt = DropGrad(
        torch.optim.Adam(params, lr=1e-2),
        drop_rate=0.3,
        params={params[4]: 0.9, params[5]: 0.05},
        full_update_drop=full_update_drop,
        seed=9,
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DROPGRAD_BACKEND", backend)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, dtype=p.dtype, generator=generator)
            # A transposed view exercises the non-contiguous path.
            params[3].grad = torch.randn(3, 1000, generator=generator).t()
            opt.step()
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("full_update_drop", [0.0, 0.25])
def test_fast_and_reference_masks_train_identically(full_update_drop: float) -> None:
    reference = _mixed_size_run("reference", full_update_drop)
    fast = _mixed_size_run("auto", full_update_drop)
    for a, b in zip(reference, fast):
        assert torch.equal(a, b)


def _group_plan_run(
    per_parameter: bool, distribution: str, full_update_drop: float
) -> list[torch.Tensor]:
    """Train a model whose groups cover the cases the planner sorts out, planned one run
    per group or (with every parameter given its group's rate as its own) one per
    parameter."""
    generator = torch.Generator().manual_seed(3)
    dense = [nn.Parameter(torch.randn(s, generator=generator)) for s in [(40, 30), (7,), (5, 5)]]
    doubles = nn.Parameter(torch.randn(6, 4, dtype=torch.float64, generator=generator))
    halves = nn.Parameter(torch.randn(33, dtype=torch.bfloat16, generator=generator))
    embedding = nn.Embedding(20, 3, sparse=True)
    with torch.no_grad():
        embedding.weight.copy_(torch.randn(20, 3, generator=generator))
    unused = nn.Parameter(torch.zeros(4))  # never gets a gradient
    frozen = nn.Parameter(torch.randn(9, generator=generator))
    # A group whose gradients are all present, dense and of one dtype and device.
    uniform = [nn.Parameter(torch.randn(s, generator=generator)) for s in [(3, 4), (2_000,)]]
    base = torch.optim.SGD(
        [
            {"params": uniform, "drop_rate": 0.4},
            {"params": dense + [unused], "drop_rate": 0.3},
            {"params": [doubles, halves]},
            {"params": [frozen], "drop_rate": 0.0},
            {"params": [embedding.weight], "drop_rate": 0.5},
        ],
        lr=0.1,
    )
    own: dict[torch.Tensor, float] = {}
    if per_parameter:
        for group in base.param_groups:
            own.update((param, group.get("drop_rate", 0.2)) for param in group["params"])
    opt = DropGrad(
        base,
        drop_rate=0.2,
        params=own,
        distribution=distribution,
        full_update_drop=full_update_drop,
        seed=11,
    )
    params = uniform + dense + [doubles, halves, frozen]
    for step in range(4):
        for p in params:
            p.grad = torch.randn(p.shape, dtype=p.dtype, generator=generator)
        # A transposed view exercises the non-contiguous path.
        dense[0].grad = torch.randn(30, 40, generator=generator).t()
        embedding(torch.tensor([1, 4, 4, 7 + step])).sum().backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in params + [embedding.weight, unused]]


@pytest.mark.parametrize("distribution", ["bernoulli", "gaussian"])
@pytest.mark.parametrize("full_update_drop", [0.0, 0.25])
def test_per_group_and_per_parameter_runs_mask_alike(
    distribution: str, full_update_drop: float
) -> None:
    general = _group_plan_run(True, distribution, full_update_drop)
    grouped = _group_plan_run(False, distribution, full_update_drop)
    for a, b in zip(general, grouped):
        assert torch.equal(a, b)


def test_uniform_dense_recognizes_only_present_dense_gradients_of_one_kind() -> None:
    a, b = torch.zeros(3), torch.ones(2, 2)
    assert uniform_dense([a, b]) == (torch.device("cpu"), torch.float32)
    sparse = torch.zeros(4).to_sparse()
    for grads in ([], [a, None], [a, sparse], [a, b.double()], [a, nn.Parameter(b)]):
        assert uniform_dense(grads) is None


def test_the_common_case_is_one_run_per_group() -> None:
    params = [nn.Parameter(torch.zeros(50)) for _ in range(3)]
    opt = DropGrad(torch.optim.SGD(params, lr=1.0), drop_rate=0.5, seed=0)
    runs = plan_step(opt._settings, opt.param_groups)
    assert [(list(r.positions), r.rate, r.target, r.granularity) for r in runs] == [
        ([0, 1, 2], 0.5, "gradient", "element")
    ]
    for p in params:
        p.grad = torch.ones(50)
    opt.step()
    assert all(0 < torch.count_nonzero(p) < 50 for p in params)


@pytest.mark.parametrize(
    "change", ["per-parameter rate", "update target", "row granularity", "listed twice"]
)
def test_the_plan_follows_what_parameters_share(change: str) -> None:
    params = [nn.Parameter(torch.zeros(6, 5)) for _ in range(2)]
    group: dict[str, Any] = {"params": list(params)}
    if change == "update target":
        group["target"] = "update"
    if change == "row granularity":
        group["granularity"] = "row"
    if change == "listed twice":
        group["params"].append(params[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about the duplicate
        base = torch.optim.SGD([group], lr=1.0)
    own = {params[1]: 0.9} if change == "per-parameter rate" else None
    opt = DropGrad(base, drop_rate=0.5, params=own, seed=0)
    runs = [
        (list(r.positions), r.rate, r.target, r.granularity)
        for r in plan_step(opt._settings, opt.param_groups)
    ]
    target = "update" if change == "update target" else "gradient"
    granularity = "row" if change == "row granularity" else "element"
    if change == "per-parameter rate":
        assert runs == [([0], 0.5, target, granularity), ([1], 0.9, target, granularity)]
    elif change == "listed twice":  # masked once, at its first position
        assert runs == [([0], 0.5, target, granularity), ([1], 0.5, target, granularity)]
    else:
        assert runs == [([0, 1], 0.5, target, granularity)]


# ------------------------------------------------------------ 6. schedulers


def _step_scheduler() -> StepDropRateScheduler:
    return StepDropRateScheduler(0.0, {2: 1.0})


@pytest.mark.parametrize("placement", ["drop_rate_scheduler", "drop_rate", "params", "group"])
def test_scheduler_advances_once_per_step(placement: str) -> None:
    model = mlp()
    scheduler = _step_scheduler()
    if placement == "group":
        base = torch.optim.SGD([{"params": model.parameters(), "drop_rate": scheduler}], lr=0.1)
        opt = DropGrad(base, seed=0)
    else:
        base = torch.optim.SGD(model.parameters(), lr=0.1)
        kwargs = {
            "drop_rate_scheduler": {"drop_rate_scheduler": scheduler},
            "drop_rate": {"drop_rate": scheduler},
            # One instance serving every parameter must still advance once.
            "params": {"params": dict.fromkeys(model.parameters(), scheduler)},
        }[placement]
        opt = DropGrad(base, seed=0, **kwargs)  # type: ignore[arg-type]
    seen = record_base_grads(base, model)
    originals = []
    for step in range(4):
        assert scheduler.step_count == step
        backward(model, step)
        originals.append(grads_of(model))
        opt.step()
        opt.zero_grad()
    assert scheduler.step_count == 4
    for step in (0, 1):
        assert_bit_identical(seen[step], originals[step])
    for step in (2, 3):
        assert all(torch.count_nonzero(g) == 0 for g in seen[step].values())


def test_distinct_schedulers_each_advance_once() -> None:
    model = EncoderDecoder()
    default, group, own = (ConstantScheduler(0.1) for _ in range(3))
    base = torch.optim.SGD(
        [
            {"params": model.encoder.parameters(), "drop_rate": group},
            {"params": [*model.encoder2.parameters(), *model.decoder.parameters()]},
        ],
        lr=0.1,
    )
    opt = DropGrad(base, drop_rate=default, params={model.decoder.weight: own}, seed=0)
    train(opt, model, 3)
    assert [s.step_count for s in (default, group, own)] == [3, 3, 3]


def test_scheduler_returning_invalid_rate_raises() -> None:
    model = mlp()
    opt = DropGrad(torch.optim.SGD(model.parameters(), lr=0.1), drop_rate=ConstantScheduler(1.5))
    backward(model)
    with pytest.raises(
        ValueError, match=r"drop_rate: ConstantScheduler.get_drop_rate\(\) at step_count=0 .*1.5"
    ):
        opt.step()
    with pytest.raises(ValueError, match=r"ConstantScheduler.get_drop_rate\(\)"):
        _ = opt.drop_rate
    assert opt.step_count == 0

    base = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = DropGrad(base, params={model[0].weight: ConstantScheduler(float("nan"))})
    with pytest.raises(
        ValueError, match=r"^params: ConstantScheduler.get_drop_rate\(\) at step_count=0 .*nan"
    ):
        opt.step()


# ------------------------------------------------------- 7. full update drop


def test_full_skip_leaves_wrapped_optimizer_untouched() -> None:
    model = mlp()
    base = torch.optim.Adam(model.parameters(), lr=1e-2)
    scheduler = LinearDropRateScheduler(0.5, 0.0, num_steps=10)
    opt = DropGrad(base, drop_rate_scheduler=scheduler, full_update_drop=0.5, seed=3)
    calls: list[int] = []
    base.register_step_pre_hook(lambda *_: calls.append(opt.step_count))
    history = []
    for step in range(12):
        before = (params_of(model), copy.deepcopy(base.state_dict()["state"]))
        backward(model, step)
        opt.step()
        opt.zero_grad()
        history.append(opt.last_step_skipped)
        after_state = base.state_dict()["state"]
        if opt.last_step_skipped:
            assert_bit_identical(before[0], params_of(model))
            assert before[1].keys() == after_state.keys()
            for key, value in before[1].items():
                for name in value:
                    assert torch.equal(value[name], after_state[key][name])
        else:
            assert not torch.equal(before[0]["0.weight"], model[0].weight)
    assert True in history and False in history
    assert calls == [k for k, skipped in enumerate(history) if not skipped]
    assert opt.step_count == 12 and scheduler.step_count == 12
    assert opt.skipped_count == sum(history)


def test_full_skip_still_evaluates_closure_once() -> None:
    model = mlp()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = ConstantScheduler(0.2)
    opt = DropGrad(base, drop_rate=scheduler, full_update_drop=1.0, seed=0)
    calls = []

    def closure() -> torch.Tensor:
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        return backward(model)

    before = params_of(model)
    with torch.no_grad():
        loss = opt.step(closure)
    assert calls == [True]
    assert isinstance(loss, torch.Tensor) and loss.requires_grad
    assert_bit_identical(before, params_of(model))
    assert (opt.last_step_skipped, opt.step_count, opt.skipped_count) == (True, 1, 1)
    assert scheduler.step_count == 1
    assert opt.step() is None


def test_full_update_drop_zero_never_skips_and_q_scales_survivors() -> None:
    model = mlp()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = DropGrad(base, drop_rate=0.0, full_update_drop=0.0, seed=0)
    train(opt, model, 20)
    assert opt.skipped_count == 0 and not opt.last_step_skipped

    opt = DropGrad(base, drop_rate=0.0, seed=0)
    opt.full_update_drop = 0.5
    seen: dict[int, dict[str, torch.Tensor]] = {}
    # step_count is still the index of the running step when the wrapped step starts.
    base.register_step_pre_hook(lambda *_: seen.__setitem__(opt.step_count, grads_of(model)))
    originals = []
    for step in range(20):
        backward(model, step)
        originals.append(grads_of(model))
        opt.step()
        opt.zero_grad()
    assert 0 < opt.skipped_count < 20
    assert len(seen) == 20 - opt.skipped_count
    for step, masked in seen.items():
        for name, original in originals[step].items():
            assert torch.equal(masked[name], original.mul(2.0))


def test_full_update_drop_scale_combines_with_mask_scale() -> None:
    numel, rate, q = 40_000, 0.3, 0.5
    param = nn.Parameter(torch.zeros(numel))
    base = torch.optim.SGD([param], lr=0.1)
    opt = DropGrad(base, drop_rate=rate, full_update_drop=q, seed=8)
    seen: list[torch.Tensor] = []
    base.register_step_pre_hook(lambda *_: seen.append(param.grad.clone()))
    while not seen:
        param.grad = torch.ones(numel)
        opt.step()
    _, keep_scale = quantize_rate(rate)
    survivors = seen[0][seen[0] != 0]
    assert torch.equal(survivors, torch.ones_like(survivors).mul(keep_scale / (1 - q)))
    realized = 1 - survivors.numel() / numel
    assert abs(realized - rate) <= binomial_tolerance(rate, numel)


@pytest.mark.parametrize("q", [0.2, 0.6])
def test_skip_frequency_matches_q(q: float) -> None:
    param = nn.Parameter(torch.zeros(2))
    opt = DropGrad(torch.optim.SGD([param], lr=0.1), drop_rate=0.0, full_update_drop=q, seed=2)
    steps = 600
    for _ in range(steps):
        param.grad = torch.ones(2)
        opt.step()
    assert opt.step_count == steps
    assert abs(opt.skipped_count / steps - q) <= binomial_tolerance(q, steps)


def test_skip_decisions_do_not_depend_on_mask_draws() -> None:
    """Skips come from their own stream: ranks holding shards of different sizes agree."""

    def skips(numel: int) -> list[bool]:
        param = nn.Parameter(torch.zeros(numel))
        opt = DropGrad(
            torch.optim.SGD([param], lr=0.1), drop_rate=0.3, full_update_drop=0.5, seed=11
        )
        decisions = []
        for _ in range(40):
            param.grad = torch.ones(numel)
            opt.step()
            decisions.append(opt.last_step_skipped)
        return decisions

    small, large = skips(3), skips(5000)
    assert small == large
    assert 0 < sum(small) < len(small)


def test_full_update_drop_true_uses_current_default_rate() -> None:
    param = nn.Parameter(torch.zeros(2))
    base = torch.optim.SGD([param], lr=0.1)
    scheduler = StepDropRateScheduler(0.0, {3: 1.0})
    opt = DropGrad(base, drop_rate_scheduler=scheduler, full_update_drop=True, seed=0)
    skipped = []
    for _ in range(6):
        param.grad = torch.ones(2)
        opt.step()
        skipped.append(opt.last_step_skipped)
    assert skipped == [False, False, False, True, True, True]

    with pytest.raises(ValueError, match=r"full_update_drop=True .* drop_rate is None"):
        DropGrad(base, drop_rate=None, params={param: 0.1}, full_update_drop=True)
    with pytest.raises(ValueError, match=r"full_update_drop=True .* drop_rate is None"):
        opt.drop_rate = None
    plain = DropGrad(base, drop_rate=None, params={param: 0.1})
    with pytest.raises(ValueError, match=r"full_update_drop=True .* drop_rate is None"):
        plain.full_update_drop = True


# ------------------------------------------------------------- 8. randomness


def test_step_leaves_global_rng_untouched() -> None:
    model = mlp()
    opt = DropGrad(
        torch.optim.Adam(model.parameters(), lr=1e-2),
        drop_rate=0.5,
        full_update_drop=0.3,
        distribution="bernoulli",
        seed=0,
    )
    backward(model)
    state = torch.get_rng_state()
    for _ in range(5):
        opt.step()
    assert torch.equal(torch.get_rng_state(), state)
    gaussian = DropGrad(opt.optimizer, drop_rate=0.5, distribution="gaussian", seed=0)
    gaussian.step()
    assert torch.equal(torch.get_rng_state(), state)


def _masks(seed: int | None, global_seed: int | None = None) -> list[torch.Tensor]:
    if global_seed is not None:
        torch.manual_seed(global_seed)
    param = nn.Parameter(torch.zeros(5000))
    base = torch.optim.SGD([param], lr=0.1)
    opt = DropGrad(base, drop_rate=0.5, seed=seed)
    seen: list[torch.Tensor] = []
    base.register_step_pre_hook(lambda *_: seen.append(param.grad == 0))
    for _ in range(3):
        param.grad = torch.ones(5000)
        opt.step()
    return seen


def test_seed_none_follows_torch_manual_seed() -> None:
    first, second = _masks(None, global_seed=21), _masks(None, global_seed=21)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    other = _masks(None, global_seed=22)
    assert not torch.equal(first[0], other[0])


def test_same_seed_same_masks_different_seed_different_masks() -> None:
    torch.manual_seed(1)
    first = _masks(5)
    torch.manual_seed(2)  # an explicit seed ignores the global RNG
    second = _masks(5)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not torch.equal(first[0], first[1])
    assert not torch.equal(first[0], _masks(6)[0])


# ---------------------------------------------------------- 11. observability


def test_get_drop_rates_and_param_drop_rates_follow_schedulers() -> None:
    model = EncoderDecoder()
    group_scheduler = LinearDropRateScheduler(0.4, 0.0, num_steps=2)
    own = CosineAnnealingDropRateScheduler(0.2, 0.0, num_steps=2)
    base = torch.optim.SGD(
        [
            {"params": model.encoder.named_parameters(prefix="encoder")},
            {"params": model.encoder2.named_parameters(prefix="encoder2"), "drop_rate": 0.05},
            {
                "params": model.decoder.named_parameters(prefix="decoder"),
                "drop_rate": group_scheduler,
            },
        ],
        lr=0.1,
    )
    opt = DropGrad(
        base,
        drop_rate=StepDropRateScheduler(0.3, {1: 0.1}),
        params={"decoder.weight": own, "encoder.0.bias": 0.5},
        seed=0,
    )
    assert opt.get_drop_rates() == [0.3, 0.05, 0.4]
    assert opt.get_param_drop_rates() == {"encoder.0.bias": 0.5, "decoder.weight": 0.2}
    train(opt, model, 1)
    assert opt.get_drop_rates() == [0.1, 0.05, pytest.approx(0.2)]
    assert opt.get_param_drop_rates() == {
        "encoder.0.bias": 0.5,
        "decoder.weight": pytest.approx(0.1),
    }
    train(opt, model, 1, first_step=1)
    assert opt.get_drop_rates() == [0.1, 0.05, 0.0]
    assert opt.get_param_drop_rates() == {
        "encoder.0.bias": 0.5,
        "decoder.weight": pytest.approx(0.0),
    }


def test_sparse_gradient_at_rate_zero_is_untouched() -> None:
    """Rate 0 must not even coalesce: the bare optimizer sees the very same gradient."""
    torch.manual_seed(0)
    bare, wrapped = nn.Embedding(50, 8, sparse=True), nn.Embedding(50, 8, sparse=True)
    wrapped.load_state_dict(bare.state_dict())
    bare_opt = torch.optim.SGD(bare.parameters(), lr=0.37)
    opt = DropGrad(torch.optim.SGD(wrapped.parameters(), lr=0.37), drop_rate=0.0, seed=0)
    for step in range(5):
        indices = torch.randint(0, 50, (500,), generator=torch.Generator().manual_seed(step))
        for module, optimizer in ((bare, bare_opt), (wrapped, opt)):
            module(indices).sum().backward()
            grad_before = module.weight.grad
            optimizer.step()
            assert module.weight.grad is grad_before
            optimizer.zero_grad()
        assert torch.equal(bare.weight, wrapped.weight)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_parameter_listed_twice_is_masked_once(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DROPGRAD_BACKEND", backend)
    numel = 20_000
    param = nn.Parameter(torch.zeros(numel))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about the duplicate
        base = torch.optim.SGD([param, param], lr=1.0)
    opt = DropGrad(base, drop_rate=0.5, seed=0)
    param.grad = torch.ones(numel)
    opt.step()
    _, keep_scale = quantize_rate(0.5)
    survivors = param.grad[param.grad != 0]
    assert torch.equal(survivors, torch.full_like(survivors, keep_scale))
    assert abs(1 - survivors.numel() / numel - 0.5) <= binomial_tolerance(0.5, numel)


def test_wrapping_a_dropgrad_is_refused() -> None:
    inner = DropGrad(torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1), drop_rate=0.1)
    with pytest.raises(TypeError, match="optimizer is already a DropGrad"):
        DropGrad(inner, drop_rate=0.1)


def test_huge_integer_rate_is_a_value_error() -> None:
    base = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)
    with pytest.raises(ValueError, match=r"drop_rate must be in \[0, 1\], got 1000000"):
        DropGrad(base, drop_rate=10**400)


def test_distribution_attribute_is_validated() -> None:
    param = nn.Parameter(torch.zeros(4))
    opt = DropGrad(torch.optim.SGD([param], lr=0.1), drop_rate=0.5, seed=0)
    opt.distribution = "gaussian"
    param.grad = torch.ones(4)
    opt.step()
    # Gaussian noise, not a 0-or-2 mask: no element is exactly 0 or 2.
    assert not bool(((param.grad == 0) | (param.grad == 2)).any())
    with pytest.raises(ValueError, match=r"distribution must be one of .* got 'uniform'"):
        opt.distribution = "uniform"
    assert opt.distribution == "gaussian"
