"""Where the mask goes (target="gradient" | "update") and what one decision covers
(granularity="element" | "row" | "tensor")."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import dropgrad.dropgrad_opt as dropgrad_opt
from dropgrad import DropGrad
from dropgrad.kernels import LANE_LEVELS, quantize_rate

from ._helpers import peak_temporary_bytes

RATE = 0.5
TARGETS = ["gradient", "update"]
GRANULARITIES = ["element", "row", "tensor"]


def binomial_tolerance(probability: float, count: int) -> float:
    """Five standard deviations of a fraction of successes in ``count`` trials."""
    return 5 * math.sqrt(probability * (1 - probability) / count)


def realized_keep(rate: float) -> float:
    threshold, _ = quantize_rate(rate)
    return 1 - threshold / LANE_LEVELS


def fixed_grads(shapes: list[torch.Size], step: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(shape, dtype=torch.float64, generator=generator) for shape in shapes]


def make_params(*shapes: tuple[int, ...]) -> list[nn.Parameter]:
    generator = torch.Generator().manual_seed(7)
    return [
        nn.Parameter(torch.randn(shape, dtype=torch.float64, generator=generator))
        for shape in shapes
    ]


def run_steps(
    opt: torch.optim.Optimizer, params: list[nn.Parameter], steps: range
) -> list[list[torch.Tensor]]:
    """Feed predetermined gradients; return the parameters after each step."""
    history = []
    for step in steps:
        for param, grad in zip(params, fixed_grads([p.shape for p in params], step)):
            param.grad = grad
        opt.step()
        history.append([p.detach().clone() for p in params])
    return history


def test_update_target_leaves_the_optimizer_state_as_if_unwrapped() -> None:
    bare_params = make_params((40, 30), (30,))
    params = copy.deepcopy(bare_params)
    bare = torch.optim.Adam(bare_params, lr=1e-2)
    opt = DropGrad(torch.optim.Adam(params, lr=1e-2), drop_rate=RATE, target="update", seed=3)
    run_steps(bare, bare_params, range(5))
    run_steps(opt, params, range(5))
    for bare_param, param in zip(bare_params, params):
        bare_state, state = bare.state[bare_param], opt.state[param]
        assert set(state) == set(bare_state)
        for name in bare_state:
            assert torch.equal(state[name], bare_state[name]), name
    # The parameters themselves differ: their updates were masked.
    assert not torch.equal(params[0], bare_params[0])


@pytest.mark.parametrize(
    "make_base",
    [
        pytest.param(lambda p: torch.optim.Adam(p, lr=1e-2), id="adam"),
        pytest.param(lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1), id="adamw"),
        pytest.param(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), id="sgd-momentum"),
    ],
)
def test_each_element_moves_by_zero_or_its_bare_update_over_keep(make_base: Callable) -> None:
    params = make_params((256, 64))
    bare_params = copy.deepcopy(params)
    before = params[0].detach().clone()
    opt = DropGrad(make_base(params), drop_rate=RATE, target="update", seed=11)
    run_steps(opt, params, range(1))
    run_steps(make_base(bare_params), bare_params, range(1))
    _, keep_scale = quantize_rate(RATE)
    bare_update = bare_params[0].detach() - before
    moved = params[0].detach() != before
    # Dropped elements did not move at all, decoupled weight decay included.
    assert torch.equal(params[0].detach()[~moved], before[~moved])
    # Kept ones moved by exactly the bare update over the realized keep probability,
    # computed as DropGrad defines it: before + (after - before) * (1 / keep).
    expected = before + bare_update * keep_scale
    assert torch.equal(params[0].detach()[moved], expected[moved])
    fraction = moved.double().mean().item()
    keep = realized_keep(RATE)
    assert abs(fraction - keep) <= binomial_tolerance(keep, moved.numel())


@pytest.mark.parametrize("rate", [0.05, 0.3, 0.8])
def test_fraction_of_moved_elements_matches_the_rate(rate: float) -> None:
    params = make_params((512, 128))
    before = params[0].detach().clone()
    opt = DropGrad(torch.optim.Adam(params, lr=1e-2), drop_rate=rate, target="update", seed=5)
    run_steps(opt, params, range(1))
    fraction = (params[0].detach() != before).double().mean().item()
    keep = realized_keep(rate)
    assert abs(fraction - keep) <= binomial_tolerance(keep, before.numel())


@pytest.mark.parametrize("target", TARGETS)
def test_row_granularity_moves_whole_rows(target: str) -> None:
    params = make_params((600, 9), (600,))
    before = [p.detach().clone() for p in params]
    opt = DropGrad(
        torch.optim.SGD(params, lr=0.1),
        drop_rate=RATE,
        target=target,
        granularity="row",
        seed=21,
    )
    run_steps(opt, params, range(1))
    moved = params[0].detach() != before[0]
    rows_moved = moved.all(dim=1)
    assert torch.equal(rows_moved, moved.any(dim=1)), "a row moved only in part"
    keep = realized_keep(RATE)
    assert abs(rows_moved.double().mean().item() - keep) <= binomial_tolerance(keep, 600)
    # A 1-D parameter has one decision per element, as under element granularity.
    bias_moved = (params[1].detach() != before[1]).double().mean().item()
    assert abs(bias_moved - keep) <= binomial_tolerance(keep, 600)


@pytest.mark.parametrize("target", TARGETS)
def test_tensor_granularity_moves_whole_parameters(target: str) -> None:
    params = make_params(*[(5, 4)] * 200)
    opt = DropGrad(
        torch.optim.SGD(params, lr=0.1),
        drop_rate=RATE,
        target=target,
        granularity="tensor",
        seed=8,
    )
    before = [p.detach().clone() for p in params]
    run_steps(opt, params, range(1))
    moved = []
    for param, old in zip(params, before):
        changed = param.detach() != old
        assert bool(changed.all()) or not bool(changed.any()), "a parameter moved only in part"
        moved.append(bool(changed.all()))
    keep = realized_keep(RATE)
    assert abs(sum(moved) / len(moved) - keep) <= binomial_tolerance(keep, len(moved))


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_rate_zero_is_bit_identical_to_the_bare_optimizer(target: str, granularity: str) -> None:
    params = make_params((30, 20), (20,))
    bare_params = copy.deepcopy(params)
    opt = DropGrad(
        torch.optim.AdamW(params, lr=1e-2),
        drop_rate=0.0,
        target=target,
        granularity=granularity,
    )
    history = run_steps(opt, params, range(4))
    bare_history = run_steps(torch.optim.AdamW(bare_params, lr=1e-2), bare_params, range(4))
    for step, bare_step in zip(history, bare_history):
        for param, bare_param in zip(step, bare_step):
            assert torch.equal(param, bare_param)


def _build(
    params: list[nn.Parameter], target: str, granularity: str, distribution: str
) -> DropGrad:
    return DropGrad(
        torch.optim.Adam(params, lr=1e-2),
        drop_rate=0.3,
        target=target,
        granularity=granularity,
        distribution=distribution,
        full_update_drop=0.2,
        seed=17,
    )


@pytest.mark.parametrize("distribution", ["bernoulli", "gaussian"])
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_resume_is_bit_identical(target: str, granularity: str, distribution: str) -> None:
    params = make_params((12, 7), (7,))
    resumed_params = copy.deepcopy(params)
    opt = _build(params, target, granularity, distribution)
    run_steps(opt, params, range(3))
    checkpoint = copy.deepcopy(opt.state_dict())
    resumed_params = [nn.Parameter(p.detach().clone()) for p in params]
    uninterrupted = run_steps(opt, params, range(3, 8))
    # A fresh DropGrad with default settings: the checkpoint restores target and granularity.
    resumed = DropGrad(
        torch.optim.Adam(resumed_params, lr=1e-2),
        drop_rate=0.3,
        seed=0,
        distribution=distribution,
        full_update_drop=0.2,
    )
    resumed.load_state_dict(checkpoint)
    assert (resumed.target, resumed.granularity) == (target, granularity)
    continued = run_steps(resumed, resumed_params, range(3, 8))
    for step, other in zip(uninterrupted, continued):
        for param, resumed_param in zip(step, other):
            assert torch.equal(param, resumed_param)


def test_group_entries_override_the_defaults_and_round_trip() -> None:
    weight, bias = make_params((50, 6), (50,))
    base = torch.optim.SGD(
        [
            {"params": [weight], "target": "update", "granularity": "row"},
            {"params": [bias]},
        ],
        lr=0.1,
    )
    opt = DropGrad(base, drop_rate=RATE, seed=4)
    before = weight.detach().clone()
    weight.grad = torch.ones_like(weight)
    bias.grad = torch.ones_like(bias)
    opt.step()
    moved = weight.detach() != before
    assert torch.equal(moved.all(dim=1), moved.any(dim=1))
    # The bias group uses the defaults: its gradient was masked element by element.
    assert bool((bias.grad == 0).any()) and bool((bias.grad != 0).any())
    state = opt.state_dict()
    assert state["param_groups"][0]["target"] == "update"
    fresh = DropGrad(
        torch.optim.SGD([{"params": [weight]}, {"params": [bias]}], lr=0.1), drop_rate=RATE
    )
    fresh.load_state_dict(state)
    assert fresh.param_groups[0]["granularity"] == "row"
    assert "target" not in fresh.param_groups[1]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"target": "weights"},
            ValueError,
            r"^target must be one of \('gradient', 'update'\), got 'weights'$",
        ),
        ({"target": 1}, TypeError, r"^target must be a string, one of .*, got int 1$"),
        (
            {"granularity": "column"},
            ValueError,
            r"^granularity must be one of \('element', 'row', 'tensor'\), got 'column'$",
        ),
        ({"granularity": None}, TypeError, r"^granularity must be a string, one of .*got NoneType"),
    ],
)
def test_bad_target_or_granularity(kwargs: dict[str, Any], error: type, message: str) -> None:
    (param,) = make_params((3,))
    with pytest.raises(error, match=message):
        DropGrad(torch.optim.SGD([param], lr=0.1), drop_rate=0.1, **kwargs)


@pytest.mark.parametrize(
    ("entry", "value", "error", "message"),
    [
        ("target", "param", ValueError, r"^param_groups\[0\]\['target'\] must be one of"),
        ("granularity", 3, TypeError, r"^param_groups\[0\]\['granularity'\] must be a string"),
    ],
)
def test_bad_group_entries(entry: str, value: Any, error: type, message: str) -> None:
    (param,) = make_params((3,))
    with pytest.raises(error, match=message):
        DropGrad(torch.optim.SGD([{"params": [param], entry: value}], lr=0.1), drop_rate=0.1)


def test_setting_target_and_granularity_validates() -> None:
    (param,) = make_params((3,))
    opt = DropGrad(torch.optim.SGD([param], lr=0.1), drop_rate=0.1)
    opt.target, opt.granularity = "update", "tensor"
    assert (opt.target, opt.granularity) == ("update", "tensor")
    with pytest.raises(ValueError, match="^target must be one of"):
        opt.target = "grad"
    with pytest.raises(ValueError, match="^granularity must be one of"):
        opt.granularity = "rows"


def test_only_parameters_with_a_positive_rate_are_copied(monkeypatch: pytest.MonkeyPatch) -> None:
    masked, unmasked = make_params((10, 3), (10, 3))
    copied: list[list[int]] = []
    original = dropgrad_opt.UpdateSnapshots

    class Recording(original):  # type: ignore[misc, valid-type]
        def __init__(self, runs: Any) -> None:
            runs = list(runs)
            copied.append([position for run in runs for position in run.positions])
            super().__init__(runs)

    monkeypatch.setattr(dropgrad_opt, "UpdateSnapshots", Recording)
    opt = DropGrad(
        torch.optim.Adam([masked, unmasked], lr=1e-2),
        drop_rate=None,
        params={masked: 0.5, unmasked: 0.0},
        target="update",
    )
    run_steps(opt, [masked, unmasked], range(2))
    assert copied == [[0], [0]]


def test_update_target_with_a_closure_masks_the_final_change() -> None:
    params = make_params((64,))
    bare_params = copy.deepcopy(params)
    before = params[0].detach().clone()

    def closure_for(param: nn.Parameter, optimizer: torch.optim.Optimizer) -> Callable:
        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = ((param - 1.0) ** 2).sum()
            loss.backward()
            return loss

        return closure

    opt = DropGrad(
        torch.optim.LBFGS(params, lr=0.5, max_iter=5), drop_rate=RATE, target="update", seed=2
    )
    bare = torch.optim.LBFGS(bare_params, lr=0.5, max_iter=5)
    opt.step(closure_for(params[0], opt))
    bare.step(closure_for(bare_params[0], bare))
    _, keep_scale = quantize_rate(RATE)
    moved = params[0].detach() != before
    assert 0 < int(moved.sum()) < moved.numel()
    expected = before + (bare_params[0].detach() - before) * keep_scale
    assert torch.equal(params[0].detach()[moved], expected[moved])
    assert torch.equal(params[0].detach()[~moved], before[~moved])


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_update_target_with_sparse_gradients(granularity: str) -> None:
    torch.manual_seed(0)
    embedding = nn.Embedding(40, 6, sparse=True)
    before = embedding.weight.detach().clone()
    opt = DropGrad(
        torch.optim.SparseAdam(embedding.parameters(), lr=0.1),
        drop_rate=RATE,
        target="update",
        granularity=granularity,
        seed=6,
    )
    indices = torch.arange(40)
    embedding(indices).sum().backward()
    opt.step()
    moved = embedding.weight.detach() != before
    if granularity == "tensor":
        assert bool(moved.all()) or not bool(moved.any())
    else:
        assert 0 < int(moved.sum()) < moved.numel()
    if granularity == "row":
        assert torch.equal(moved.all(dim=1), moved.any(dim=1))


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_sparse_gradient_masks_match_the_dense_ones(granularity: str) -> None:
    """A sparse gradient's values get the decisions of their dense positions."""
    torch.manual_seed(0)
    sparse_layer = nn.Embedding(30, 4, sparse=True)
    dense_layer = copy.deepcopy(sparse_layer)
    dense_layer.sparse = False
    seen: dict[str, torch.Tensor] = {}
    for name, layer, base in (
        ("sparse", sparse_layer, torch.optim.SparseAdam(sparse_layer.parameters(), lr=0.1)),
        ("dense", dense_layer, torch.optim.Adam(dense_layer.parameters(), lr=0.1)),
    ):
        opt = DropGrad(base, drop_rate=RATE, granularity=granularity, seed=9)
        base.register_step_pre_hook(
            lambda optimizer, *_, name=name: seen.__setitem__(
                name, optimizer.param_groups[0]["params"][0].grad.to_dense().clone()
            )
        )
        layer(torch.arange(30)).sum().backward()
        opt.step()
    assert torch.equal(seen["sparse"], seen["dense"])


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("granularity", ["row", "tensor"])
def test_gaussian_combines_with_every_target_and_granularity(target: str, granularity: str) -> None:
    params = make_params((100, 5))
    before = params[0].detach().clone()
    bare_params = copy.deepcopy(params)
    opt = DropGrad(
        torch.optim.SGD(params, lr=0.1),
        drop_rate=0.3,
        distribution="gaussian",
        target=target,
        granularity=granularity,
        seed=12,
    )
    run_steps(opt, params, range(1))
    run_steps(torch.optim.SGD(bare_params, lr=0.1), bare_params, range(1))
    # Plain SGD: the masked update is the bare update times one multiplier per row
    # (per tensor), whichever of the two is masked.
    ratio = (params[0].detach() - before) / (bare_params[0].detach() - before)
    per_row = ratio[:, :1].expand_as(ratio)
    assert torch.allclose(ratio, per_row, rtol=1e-9, atol=0)
    if granularity == "tensor":
        assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio), rtol=1e-9, atol=0)
    else:
        assert ratio[:, 0].unique().numel() > 50


def test_full_update_drop_scales_the_kept_update_of_an_unmasked_parameter() -> None:
    """With full update drop, update-masked parameters at rate 0 still get 1 / (1 - q)."""
    params = make_params((20,))
    bare_params = copy.deepcopy(params)
    before = params[0].detach().clone()
    opt = DropGrad(
        torch.optim.Adam(params, lr=1e-2),
        drop_rate=0.0,
        full_update_drop=0.25,
        target="update",
        seed=1,
    )
    for step in range(6):
        run_steps(opt, params, range(step, step + 1))
        if not opt.last_step_skipped:
            break
    assert not opt.last_step_skipped
    run_steps(torch.optim.Adam(bare_params, lr=1e-2), bare_params, range(step, step + 1))
    expected = before + (bare_params[0].detach() - before) * (1 / 0.75)
    assert torch.equal(params[0].detach(), expected)


def test_update_target_holds_one_copy_of_the_masked_parameters() -> None:
    """Extra memory of an update-masked step: the copy of the masked parameters plus
    the mask kernels' bounded temporaries (16 MiB at most), nothing in proportion
    to the parameters beyond that copy."""
    masked = nn.Parameter(torch.zeros(1 << 21))
    unmasked = nn.Parameter(torch.zeros(1 << 21))
    masked.grad = torch.ones_like(masked)
    unmasked.grad = torch.ones_like(unmasked)
    opt = DropGrad(
        torch.optim.SGD([masked, unmasked], lr=0.1),
        drop_rate=None,
        params={masked: 0.5},
        target="update",
        seed=1,
    )
    # The step without torch's profiling wrapper, whose one record_function scope
    # would net the copy out (allocated and freed inside it).
    step = type(opt).step.__wrapped__
    peak = peak_temporary_bytes(lambda: step(opt))
    copy_bytes = masked.numel() * masked.element_size()
    assert copy_bytes <= peak <= copy_bytes + 16 * 2**20
