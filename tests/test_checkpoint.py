"""Checkpoints of DropGrad: state_dict contents, torch.save round trips and exact resumption."""

from __future__ import annotations

import copy
import io
from typing import Any

import pytest
import torch
from torch import nn

from dropgrad import (
    CosineAnnealingDropRateScheduler,
    DropGrad,
    LinearDropRateScheduler,
    StepDropRateScheduler,
)

IN_FEATURES = 6


class EncoderDecoder(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.encoder = nn.Sequential(nn.Linear(IN_FEATURES, 8), nn.Tanh())
        self.middle = nn.Linear(8, 8)
        self.decoder = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(torch.tanh(self.middle(self.encoder(x))))


def build(model_seed: int = 0, dropgrad_seed: int = 123) -> tuple[EncoderDecoder, DropGrad]:
    """A model and a DropGrad using every kind of rate: default and group schedulers,
    per-parameter fixed rates and schedulers, full update drop."""
    model = EncoderDecoder(model_seed)
    base = torch.optim.Adam(
        [
            {
                "params": model.encoder.named_parameters(prefix="encoder"),
                "drop_rate": LinearDropRateScheduler(0.5, 0.1, num_steps=6),
            },
            {"params": model.middle.named_parameters(prefix="middle"), "drop_rate": 0.2},
            {"params": model.decoder.named_parameters(prefix="decoder"), "lr": 5e-3},
        ],
        lr=1e-2,
    )
    opt = DropGrad(
        base,
        drop_rate_scheduler=CosineAnnealingDropRateScheduler(0.4, 0.05, num_steps=8),
        params={
            "decoder.weight": StepDropRateScheduler(0.3, {3: 0.6, 5: 0.1}),
            "middle.bias": 0.7,
        },
        full_update_drop=0.3,
        seed=dropgrad_seed,
    )
    return model, opt


def train(model: nn.Module, opt: torch.optim.Optimizer, first_step: int, steps: int) -> None:
    for step in range(first_step, first_step + steps):
        batch = torch.randn(16, IN_FEATURES, generator=torch.Generator().manual_seed(step))
        model(batch).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


def save_and_load(state: Any) -> Any:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def section(state: dict[str, Any]) -> dict[str, Any]:
    """DropGrad's section of a state dict (every param group carries the same one)."""
    return state["param_groups"][0]["dropgrad"]


def test_state_dict_is_the_wrapped_one_with_a_section_in_every_group() -> None:
    model, opt = build()
    train(model, opt, 0, 3)
    state = opt.state_dict()
    assert set(state) == set(opt.optimizer.state_dict())
    assert state["state"].keys() == opt.optimizer.state_dict()["state"].keys()
    assert all(group["dropgrad"] == section(state) for group in state["param_groups"])
    # The live param groups do not carry it.
    assert all("dropgrad" not in group for group in opt.param_groups)
    section_ = section(state)
    assert section_["seed"] == opt.seed and section_["format_version"] == 2
    assert (section_["target"], section_["granularity"]) == ("gradient", "element")
    assert section_["step_count"] == 3
    assert section_["skipped_count"] == opt.skipped_count
    assert section_["full_update_drop"] == 0.3
    assert section_["distribution"] == "bernoulli"
    # Schedulers are referred to by index: default, then groups, then parameters.
    assert section_["drop_rate"] == {"scheduler": 0}
    assert state["param_groups"][0]["drop_rate"] == {"scheduler": 1}
    assert state["param_groups"][1]["drop_rate"] == 0.2
    assert section_["param_drop_rates"] == {3: 0.7, 4: {"scheduler": 2}}
    assert [s["step_count"] for s in section_["schedulers"]] == [3, 3, 3]
    # Building the dict must not replace the live schedulers in the param groups.
    assert isinstance(opt.param_groups[0]["drop_rate"], LinearDropRateScheduler)


def test_state_dict_loads_with_weights_only() -> None:
    model, opt = build()
    train(model, opt, 0, 2)
    state = opt.state_dict()
    loaded = save_and_load(state)
    assert section(loaded)["param_drop_rates"] == section(state)["param_drop_rates"]
    assert section(loaded)["schedulers"] == section(state)["schedulers"]


@pytest.mark.parametrize(("first", "second"), [(4, 5), (0, 3), (7, 1)])
def test_resume_is_bit_identical_to_uninterrupted_run(first: int, second: int) -> None:
    model, opt = build()
    train(model, opt, 0, first + second)

    interrupted, interrupted_opt = build()
    train(interrupted, interrupted_opt, 0, first)
    checkpoint = save_and_load(
        {"model": interrupted.state_dict(), "optimizer": interrupted_opt.state_dict()}
    )
    # Everything fresh: other initial weights, another seed; the checkpoint must win.
    resumed, resumed_opt = build(model_seed=1, dropgrad_seed=999)
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt.load_state_dict(checkpoint["optimizer"])
    assert resumed_opt.step_count == first
    assert resumed_opt.drop_rate_scheduler is not None
    assert resumed_opt.drop_rate_scheduler.step_count == first
    assert isinstance(resumed_opt.param_groups[0]["drop_rate"], LinearDropRateScheduler)
    assert resumed_opt.param_groups[0]["drop_rate"].step_count == first
    train(resumed, resumed_opt, first, second)

    for (name, expected), actual in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(expected, actual), name
    assert (resumed_opt.step_count, resumed_opt.skipped_count, resumed_opt.last_step_skipped) == (
        opt.step_count,
        opt.skipped_count,
        opt.last_step_skipped,
    )
    assert resumed_opt.get_drop_rates() == opt.get_drop_rates()
    assert resumed_opt.get_param_drop_rates() == opt.get_param_drop_rates()
    if first + second >= 8:
        # Long enough runs exercise both skipped and applied steps.
        assert 0 < opt.skipped_count < opt.step_count


def test_loading_restores_fixed_rates_and_settings() -> None:
    model = nn.Linear(3, 2)
    saved = DropGrad(
        torch.optim.SGD(model.parameters(), lr=0.1),
        drop_rate=0.25,
        params={model.bias: 0.5},
        full_update_drop=True,
        distribution="gaussian",
        seed=3,
    )
    fresh_model = nn.Linear(3, 2)
    fresh = DropGrad(torch.optim.SGD(fresh_model.parameters(), lr=0.1), drop_rate=0.9, seed=4)
    fresh.load_state_dict(save_and_load(saved.state_dict()))
    assert fresh.drop_rate == 0.25
    assert fresh.full_update_drop is True
    assert fresh.distribution == "gaussian"
    assert fresh.get_param_drop_rates() == {"param_groups[0][1]": 0.5}
    assert fresh.seed == 3


def test_plain_optimizer_state_dict_loads_into_wrapped_optimizer() -> None:
    model = EncoderDecoder(0)
    plain = torch.optim.Adam(model.parameters(), lr=1e-2)
    train(model, plain, 0, 2)
    opt = DropGrad(torch.optim.Adam(EncoderDecoder(0).parameters(), lr=1e-1), drop_rate=0.3)
    opt.load_state_dict(save_and_load(plain.state_dict()))
    assert opt.param_groups[0]["lr"] == 1e-2
    assert opt.drop_rate == 0.3 and opt.step_count == 0
    loaded, expected = opt.optimizer.state_dict(), plain.state_dict()
    for key, value in expected["state"].items():
        for name, tensor in value.items():
            assert torch.equal(loaded["state"][key][name], tensor)


def _checkpoint() -> dict[str, Any]:
    model, opt = build()
    train(model, opt, 0, 2)
    return opt.state_dict()


def _assert_load_fails(opt: DropGrad, state: Any, error: type, match: str) -> None:
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(error, match=match):
        opt.load_state_dict(state)
    after = opt.state_dict()
    # A checkpoint that does not fit leaves the optimizer as it was.
    assert after["param_groups"] == before["param_groups"]
    assert after["state"].keys() == before["state"].keys()
    # The param groups, compared above, carry DropGrad's whole section (seed included).
    assert section(after) == section(before)


def small(
    drop_rate: Any = 0.1,
    own: tuple[Any, Any] | None = None,
    group_rates: tuple[Any, ...] | None = None,
    lr: float = 0.1,
) -> DropGrad:
    """DropGrad over a fresh Linear(3, 2); ``own`` gives (weight rate, bias rate);
    ``group_rates`` puts weight and bias in separate groups with these 'drop_rate' entries."""
    model = nn.Linear(3, 2)
    if group_rates is None:
        base = torch.optim.SGD(model.parameters(), lr=lr)
    else:
        groups = [{"params": [p], "drop_rate": r} for p, r in zip(model.parameters(), group_rates)]
        base = torch.optim.SGD(groups, lr=lr)
    params = None
    if own is not None:
        params = {p: r for p, r in zip(model.parameters(), own) if r != "absent"}
    return DropGrad(base, drop_rate=drop_rate, params=params, seed=0)


def linear() -> LinearDropRateScheduler:
    return LinearDropRateScheduler(0.1, 0.0, num_steps=3)


def test_wrong_number_of_schedulers() -> None:
    _assert_load_fails(
        small(drop_rate=linear()),
        _checkpoint(),
        ValueError,
        r"holds 3 drop-rate scheduler\(s\) but this DropGrad has 1",
    )


def test_scheduler_in_checkpoint_fixed_rate_here() -> None:
    saved = small(drop_rate=linear(), own=(0.5, "absent")).state_dict()
    _assert_load_fails(
        small(drop_rate=0.1, own=(linear(), "absent")),
        saved,
        ValueError,
        r"drop_rate is a drop-rate scheduler in the checkpoint but the fixed rate 0.1 in this "
        r"DropGrad; construct DropGrad with the same kind of rate",
    )


def test_fixed_rate_in_checkpoint_scheduler_here() -> None:
    saved = small(drop_rate=0.1, own=(linear(), "absent")).state_dict()
    _assert_load_fails(
        small(drop_rate=linear(), own=(0.5, "absent")),
        saved,
        ValueError,
        r"drop_rate is the fixed rate 0.1 in the checkpoint but a LinearDropRateScheduler in",
    )


def test_per_parameter_scheduler_kind_mismatch() -> None:
    saved = small(drop_rate=0.2, group_rates=(linear(), 0.3)).state_dict()
    _assert_load_fails(
        small(drop_rate=0.2, own=("absent", linear()), group_rates=(0.3, 0.3)),
        saved,
        ValueError,
        r"this DropGrad has a scheduler for a parameter that has no per-parameter rate in the "
        r"checkpoint",
    )
    saved = small(drop_rate=0.2, own=(0.3, linear())).state_dict()
    _assert_load_fails(
        small(drop_rate=0.2, own=(linear(), 0.3)),
        saved,
        ValueError,
        r"the rate of parameter 0 is the fixed rate 0.3 in the checkpoint but a "
        r"LinearDropRateScheduler in this DropGrad",
    )


def test_shared_scheduler_layout_mismatch() -> None:
    shared = linear()
    saved = small(drop_rate=shared, own=(linear(), shared)).state_dict()
    other = linear()
    _assert_load_fails(
        small(drop_rate=linear(), own=(other, other)),
        saved,
        ValueError,
        r"the rate of parameter 1 uses scheduler 0 in the checkpoint but scheduler 1 in this",
    )


def test_group_rate_kind_mismatch() -> None:
    saved = small(group_rates=(linear(), 0.3)).state_dict()
    _assert_load_fails(
        small(group_rates=(0.3, linear())),
        saved,
        ValueError,
        r"param_groups\[0\]\['drop_rate'\] is a drop-rate scheduler in the checkpoint but the "
        r"fixed rate 0.3 in this DropGrad",
    )


def test_wrong_number_of_groups_or_parameters() -> None:
    two_groups = small(group_rates=(0.1, 0.2)).state_dict()
    _assert_load_fails(
        small(),
        two_groups,
        ValueError,
        r"it has 2 parameter group\(s\) but the optimizer has 1",
    )
    six_params = _checkpoint()
    section(six_params)["drop_rate"] = 0.1
    section(six_params)["param_drop_rates"] = {5: 0.5}
    section(six_params)["schedulers"] = []
    for group in six_params["param_groups"]:
        group.pop("drop_rate", None)
    _assert_load_fails(
        small(),
        six_params,
        ValueError,
        r"a per-parameter rate for parameter 5 but the optimizer has 2 parameters",
    )
    # Same group count, different group sizes: the wrapped optimizer refuses it.
    one_group = small(drop_rate=0.1).state_dict()
    one_group["param_groups"][0]["params"] = [0]
    _assert_load_fails(small(), one_group, ValueError, r"doesn't match the size")


@pytest.mark.parametrize(
    ("corrupt", "error", "match"),
    [
        (lambda s: section(s).update(format_version=99), ValueError, r"format_version 99 is"),
        (lambda s: section(s).pop("seed"), ValueError, r"entry lacks \['seed'\]"),
        (
            lambda s: [section(s).pop(k) for k in ("step_count", "schedulers")],
            ValueError,
            r"entry lacks \['schedulers', 'step_count'\]",
        ),
        (
            lambda s: [group.update(dropgrad=[1, 2]) for group in s["param_groups"]],
            ValueError,
            r"'dropgrad' entry must be a dict",
        ),
        (
            lambda s: section(s).update(full_update_drop=1.5),
            ValueError,
            r"full_update_drop must be in \[0, 1\], got 1.5",
        ),
        (
            lambda s: section(s).update(distribution="uniform"),
            ValueError,
            r"distribution must be one of",
        ),
        (
            lambda s: section(s).update(seed=-3),
            ValueError,
            r"seed must be in \[0, 2\*\*64\), got -3",
        ),
        (
            lambda s: section(s).update(seed="7"),
            TypeError,
            r"seed must be an int or None, got str '7'",
        ),
        (
            lambda s: section(s).update(target="weights"),
            ValueError,
            r"state_dict target must be one of \('gradient', 'update'\), got 'weights'",
        ),
        (
            lambda s: section(s).update(granularity=3),
            ValueError,
            r"granularity must be a string, got 3",
        ),
        (
            lambda s: section(s).update(skipped_count=-1),
            ValueError,
            r"skipped_count must be an int >= 0, got -1",
        ),
    ],
    ids=[
        "version",
        "missing",
        "missing-two",
        "not-a-dict",
        "full-update-drop",
        "distribution",
        "seed-range",
        "seed-type",
        "target",
        "granularity",
        "skipped-count",
    ],
)
def test_malformed_section(corrupt, error: type, match: str) -> None:
    state = small(drop_rate=0.1, lr=0.5).state_dict()
    corrupt(state)
    _assert_load_fails(small(drop_rate=0.1), state, error, match)


def test_fixed_rate_in_checkpoint_is_validated() -> None:
    state = small(drop_rate=0.1, lr=0.5).state_dict()
    section(state)["drop_rate"] = 1.5
    _assert_load_fails(
        small(drop_rate=0.1), state, ValueError, r"state_dict drop_rate must be in \[0, 1\]"
    )


def test_state_dict_must_be_a_mapping() -> None:
    _assert_load_fails(small(), [("state", {})], TypeError, r"state_dict must be a dict, got list")


def test_malformed_scheduler_state_changes_nothing() -> None:
    state = small(drop_rate=linear(), lr=0.5).state_dict()
    section(state)["schedulers"][0] = {"num_steps": 3}
    _assert_load_fails(
        small(drop_rate=linear()),
        state,
        ValueError,
        r"LinearDropRateScheduler state_dict has no 'step_count' entry",
    )


def test_state_dict_hooks_registered_on_dropgrad_run() -> None:
    opt = small(drop_rate=0.1)
    events: list[str] = []

    def save_post(optimizer: Any, state: dict) -> dict:
        events.append("save-post")
        return {**state, "extra": 1}

    def load_pre(optimizer: Any, state: dict) -> dict:
        events.append("load-pre")
        # What the pre hook returns is what gets loaded.
        edited = {**section(state), "step_count": 7}
        groups = [{**group, "dropgrad": edited} for group in state["param_groups"]]
        return {**state, "param_groups": groups}

    opt.register_state_dict_pre_hook(lambda optimizer: events.append("save-pre"))
    opt.register_state_dict_post_hook(save_post)
    opt.register_load_state_dict_pre_hook(load_pre)
    opt.register_load_state_dict_post_hook(lambda optimizer: events.append("load-post"))
    state = opt.state_dict()
    assert state["extra"] == 1
    opt.load_state_dict(state)
    assert events == ["save-pre", "save-post", "load-pre", "load-post"]
    assert opt.step_count == 7
    assert section(state)["step_count"] == 0


def test_scheduler_class_mismatch() -> None:
    saved = small(drop_rate=linear()).state_dict()
    other = CosineAnnealingDropRateScheduler(0.1, 0.0, num_steps=3)
    _assert_load_fails(
        small(drop_rate=other),
        saved,
        ValueError,
        "scheduler 0 is a LinearDropRateScheduler in the checkpoint but a "
        "CosineAnnealingDropRateScheduler in this DropGrad",
    )


def test_plain_optimizer_checkpoint_keeps_group_drop_rates() -> None:
    scheduler = linear()
    opt = small(drop_rate=0.2, group_rates=(scheduler, 0.7))
    weight, bias = (g["params"][0] for g in opt.param_groups)
    plain = torch.optim.SGD([{"params": [weight]}, {"params": [bias]}], lr=0.3).state_dict()
    opt.load_state_dict(plain)
    assert opt.param_groups[0]["drop_rate"] is scheduler
    assert opt.param_groups[1]["drop_rate"] == 0.7
    assert opt.param_groups[0]["lr"] == 0.3
    assert opt.get_drop_rates() == [0.1, 0.7]


def test_checkpoint_of_the_generator_format_is_refused() -> None:
    state = small(drop_rate=0.1, lr=0.5).state_dict()
    old = {key: value for key, value in state.items()}
    old["param_groups"] = [
        {k: v for k, v in group.items() if k != "dropgrad"} for group in state["param_groups"]
    ]
    old["dropgrad"] = {"format_version": 1, "generators": {"seed": 1, "states": {}}}
    _assert_load_fails(
        small(drop_rate=0.1),
        old,
        ValueError,
        r"written by an older dropgrad \(format_version 1, with random-generator states\); "
        r"this dropgrad reads format 2",
    )


def test_sections_in_only_some_groups_are_refused() -> None:
    state = small(drop_rate=0.1, group_rates=(0.1, 0.2)).state_dict()
    del state["param_groups"][1]["dropgrad"]
    _assert_load_fails(
        small(drop_rate=0.1, group_rates=(0.1, 0.2)),
        state,
        ValueError,
        r"1 of its 2 param groups carry a 'dropgrad' section",
    )


def test_section_holds_no_tensors_and_loads_with_any_map_location() -> None:
    model, opt = build()
    train(model, opt, 0, 3)

    def tensors_in(value: Any) -> int:
        if isinstance(value, torch.Tensor):
            return 1
        if isinstance(value, dict):
            return sum(tensors_in(v) for v in value.values())
        if isinstance(value, list | tuple):
            return sum(tensors_in(v) for v in value)
        return 0

    state = opt.state_dict()
    assert tensors_in(section(state)) == 0
    buffer = io.BytesIO()
    torch.save(state, buffer)
    for location in ("cpu", "meta"):
        buffer.seek(0)
        loaded = torch.load(buffer, map_location=location, weights_only=True)
        assert section(loaded) == section(state)


def zero_gradient_lr_zero_step(opt: torch.optim.Optimizer) -> None:
    """The step with which torch.distributed.checkpoint creates a fresh optimizer's state."""
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    lrs = [group["lr"] for group in opt.param_groups]
    for group in opt.param_groups:
        group["lr"] = 0.0
    opt.step()
    for group, lr in zip(opt.param_groups, lrs):
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)


def test_state_creation_step_of_get_optimizer_state_dict_is_not_counted() -> None:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model, opt = build()
    get_optimizer_state_dict(model, opt)
    assert opt.optimizer.state, "the zero-gradient step ran and created Adam's state"
    assert (opt.step_count, opt.skipped_count) == (0, 0)
    assert all(s.step_count == 0 for s in opt._settings.schedulers(opt.param_groups))
    # The reference has the same Adam state, created behind DropGrad's back: both runs
    # must now take the same masks and skips at every step.
    reference_model, reference = build()
    zero_gradient_lr_zero_step(reference.optimizer)
    train(model, opt, 0, 8)
    train(reference_model, reference, 0, 8)
    assert opt.skipped_count == reference.skipped_count > 0
    for p, q in zip(model.parameters(), reference_model.parameters()):
        assert torch.equal(p, q)


def test_a_zero_learning_rate_step_with_gradients_is_counted() -> None:
    model = EncoderDecoder(0)
    opt = DropGrad(torch.optim.Adam(model.parameters(), lr=0.0), drop_rate=0.3, seed=5)
    train(model, opt, 0, 1)  # lr 0 but real gradients: an ordinary step
    assert opt.step_count == 1 and opt.optimizer.state
    zero_gradient_lr_zero_step(opt)  # Adam's state exists now: an ordinary step too
    assert opt.step_count == 2
