"""Masks as a pure function of (seed, step, parameter, element).

The words, the keys, invariance to blocks and shards, seeds, statistics of the
decisions, skip decisions, the functional keyed form, and torch.compile.
Statistical tolerances are five standard deviations of the statistic under
independent draws, with fixed seeds.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from dropgrad import DropGrad, drop_grad, drop_grad_, kernels
from dropgrad._random import (
    MASK_DOMAIN,
    StreamKey,
    hash_words_,
    skip_decision,
    splitmix64,
    stream_key,
    stream_key_table,
    words_reference,
)
from dropgrad.kernels import _torch_ops
from dropgrad.kernels._reference import (
    LANE_LEVELS,
    gaussian_sigma,
    lanes_reference,
    quantize_rate,
)

from ._helpers import key_table

M32 = (1 << 32) - 1
M64 = (1 << 64) - 1
DISTRIBUTIONS = ["bernoulli", "gaussian"]


def keyed_mask_(
    distribution: str,
    values: torch.Tensor,
    key: StreamKey,
    rate: float,
    start: int = 0,
    index: torch.Tensor | None = None,
) -> None:
    """Mask one tensor with ``key`` as a step would (``kernels.mask_``, backend chosen as usual)."""
    indices = None if index is None else [index]
    kernels.mask_([values], [start], key_table([key]), rate, distribution, indices=indices)


def torch_op_mask_(
    distribution: str,
    values: torch.Tensor,
    key: StreamKey,
    rate: float,
    start: int,
    chunk_lanes: int,
) -> None:
    """The torch-op backend itself, with blocks of at most ``chunk_lanes`` elements."""
    keys = key_table([key])
    if distribution == "bernoulli":
        threshold, keep_scale = quantize_rate(rate)
        _torch_ops.bernoulli_([values], [start], keys, threshold, keep_scale, chunk_lanes)
    else:
        _torch_ops.gaussian_([values], [start], keys, gaussian_sigma(rate), 1.0, chunk_lanes)


def tolerance(probability: float, count: int) -> float:
    return 5 * math.sqrt(probability * (1 - probability) / count)


# ---------------------------------------------------------------- words and keys


def test_scalar_hashes_match_their_written_out_definitions() -> None:
    def splitmix_by_hand(x: int) -> int:
        z = (x + 0x9E3779B97F4A7C15) & M64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        return z ^ (z >> 31)

    def lowbias_by_hand(x: int) -> int:
        x ^= x >> 16
        x = (x * 0x7FEB352D) & M32
        x ^= x >> 15
        x = (x * 0x846CA68B) & M32
        return x ^ (x >> 16)

    for value in (0, 1, 2**31, 2**32 - 1, 0xDEADBEEF, 123456789):
        # Word w of the stream with key (a=1, b=0) is the hash of w itself.
        word = words_reference(StreamKey(1, 0), torch.tensor([value], dtype=torch.int64))
        assert int(word) == lowbias_by_hand(value)
    for value in (0, 1, 2**63, M64, 0x0123456789ABCDEF):
        assert splitmix64(value) == splitmix_by_hand(value)
    # SplitMix64's first output for seed 0 is a published constant.
    assert splitmix64(0) == 0xE220A8397B1DCDAF


def test_hash_words_on_int32_equals_the_int64_reference() -> None:
    key = stream_key(99, MASK_DOMAIN, 7, 11)
    first = 2**32 - 5000  # crosses the 2**32 wrap of the word index
    count = 10_000
    words = torch.arange(count, dtype=torch.int32).mul_(key.multiplier).add_(key.start(first))
    hash_words_(words, torch.empty_like(words))
    expected = words_reference(key, torch.arange(first, first + count, dtype=torch.int64))
    assert torch.equal(words.to(torch.int64) & M32, expected)


def test_vectorized_keys_equal_scalar_keys() -> None:
    indices = [0, 1, 5, 17, 1000, 2**40, 2**64 - 1]
    for count in (1, 3, len(indices)):
        chosen = indices[:count] * 4
        table = stream_key_table(5, MASK_DOMAIN, 2**63 + 3, chosen)
        assert table.dtype == torch.int64 and table.shape == (len(chosen), 2)
        assert table.tolist() == [list(stream_key(5, MASK_DOMAIN, 2**63 + 3, i)) for i in chosen]
    assert stream_key_table(5, MASK_DOMAIN, 0, []).shape == (0, 2)


def test_keys_of_different_steps_indices_and_domains_differ() -> None:
    keys = {
        stream_key(1, domain, step, index)
        for domain in (MASK_DOMAIN, MASK_DOMAIN + 1)
        for step in range(20)
        for index in range(20)
    }
    assert len(keys) == 800
    assert all(key.a % 2 == 1 for key in keys)


# ---------------------------------------------------------------- invariance


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_result_does_not_depend_on_block_size(distribution: str) -> None:
    key = stream_key(3, MASK_DOMAIN, 1, 2)
    base = torch.randn(20_011, dtype=torch.float64)
    results = []
    for chunk_lanes in (2, 6, 64, 4096, 1 << 20):
        values = base.clone()
        torch_op_mask_(distribution, values, key, 0.3, 5, chunk_lanes)
        results.append(values)
    assert all(torch.equal(result, results[0]) for result in results)
    # What a step computes (the native kernel, where it takes the tensor) is the same.
    values = base.clone()
    keyed_mask_(distribution, values, key, 0.3, 5)
    assert torch.equal(values, results[0])


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("cuts", [(1,), (7, 8), (3, 1000, 1001, 5000)])
def test_shards_get_their_slice_of_the_whole_mask(distribution: str, cuts: tuple[int, ...]) -> None:
    key = stream_key(3, MASK_DOMAIN, 1, 2)
    whole = torch.randn(6001, dtype=torch.float64)
    expected = whole.clone()
    keyed_mask_(distribution, expected, key, 0.4)
    edges = [0, *cuts, whole.numel()]
    shards = [whole[a:b].clone() for a, b in zip(edges, edges[1:])]
    # One bucket of every shard, each with the parameter's key and its own start.
    keys = key_table([key] * len(shards))
    kernels.mask_(shards, edges[:-1], keys, 0.4, distribution)
    assert torch.equal(torch.cat(shards), expected)


@pytest.mark.parametrize(
    ("distribution", "period"), [("bernoulli", 1 << 33), ("gaussian", 1 << 31)]
)
def test_mask_repeats_with_the_documented_period(distribution: str, period: int) -> None:
    # Word indices wrap at 2**32: a word covers two Bernoulli elements, a Gaussian
    # element takes two words.
    key = stream_key(3, MASK_DOMAIN, 1, 2)
    base = torch.randn(1001, dtype=torch.float64)
    near, far, half = base.clone(), base.clone(), base.clone()
    keyed_mask_(distribution, near, key, 0.5, 5)
    keyed_mask_(distribution, far, key, 0.5, 5 + period)
    keyed_mask_(distribution, half, key, 0.5, 5 + period // 2)
    assert torch.equal(near, far)
    assert not torch.equal(near, half)


def test_index_target_gets_the_decisions_of_its_positions() -> None:
    key = stream_key(3, MASK_DOMAIN, 1, 2)
    whole = torch.randn(3000, dtype=torch.float64)
    expected = whole.clone()
    keyed_mask_("bernoulli", expected, key, 0.5)
    order = torch.randperm(3000, generator=torch.Generator().manual_seed(0))
    shuffled = whole[order].clone()
    keyed_mask_("bernoulli", shuffled, key, 0.5, index=order)
    assert torch.equal(shuffled, expected[order])


# ---------------------------------------------------------------- seeds


def _masked_grads(seed: int | None, rate: float = 0.5, steps: int = 1) -> list[torch.Tensor]:
    weight = nn.Parameter(torch.zeros(64, 64))
    base = torch.optim.SGD([weight], lr=0.0)
    opt = DropGrad(base, drop_rate=rate, seed=seed)
    seen: list[torch.Tensor] = []
    base.register_step_pre_hook(lambda *_: seen.append(weight.grad.clone()))
    for _ in range(steps):
        weight.grad = torch.ones_like(weight)
        opt.step()
    return seen


def test_all_64_bits_of_the_seed_matter() -> None:
    masks = [_masked_grads(seed)[0] for seed in (7, 7 + 2**32, 7 + 2**63, 2**64 - 1)]
    for i in range(len(masks)):
        for j in range(i):
            assert not torch.equal(masks[i], masks[j])


def test_default_seed_follows_torch_manual_seed_and_draws_nothing() -> None:
    torch.manual_seed(3)
    state = torch.get_rng_state()
    first = DropGrad(torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=0.1), drop_rate=0.1)
    assert torch.equal(torch.get_rng_state(), state)
    second = DropGrad(torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=0.1), drop_rate=0.1)
    torch.manual_seed(4)
    third = DropGrad(torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=0.1), drop_rate=0.1)
    assert first.seed == second.seed != third.seed
    assert 0 <= first.seed < 2**64


def test_default_seed_and_rate_zero_leave_dropout_training_bit_identical() -> None:
    def run(wrap: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 32), nn.Dropout(0.5), nn.Linear(32, 1))
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        if wrap:
            opt = DropGrad(opt, drop_rate=0.0)
        for _ in range(5):
            model(torch.randn(16, 8)).square().mean().backward()
            opt.step()
            opt.zero_grad()
        return [p.detach().clone() for p in model.parameters()]

    for wrapped, bare in zip(run(True), run(False)):
        assert torch.equal(wrapped, bare)


# ---------------------------------------------------------------- statistics


@pytest.mark.parametrize("rate", [0.001, 0.01, 0.1, 0.5, 0.9, 0.99, 0.999])
def test_realized_drop_fraction(rate: float) -> None:
    count = 1 << 20
    ones = torch.ones(count)
    keyed_mask_("bernoulli", ones, stream_key(11, MASK_DOMAIN, 0, 0), rate)
    realized = quantize_rate(rate)[0] / LANE_LEVELS
    fraction = (ones == 0).double().mean().item()
    assert abs(fraction - realized) <= tolerance(realized, count)


def _dropped(step: int, index: int, count: int, rate: float = 0.3) -> torch.Tensor:
    ones = torch.ones(count)
    keyed_mask_("bernoulli", ones, stream_key(12, MASK_DOMAIN, step, index), rate)
    return ones == 0


@pytest.mark.parametrize(
    ("first", "second"),
    [
        pytest.param((0, 0, "even"), (0, 0, "odd"), id="two-lanes-of-one-word"),
        pytest.param((0, 0, "all"), (0, 1, "all"), id="parameters-in-one-step"),
        pytest.param((0, 0, "all"), (1, 0, "all"), id="consecutive-steps"),
    ],
)
def test_decisions_are_independent(first: tuple, second: tuple) -> None:
    count = 1 << 20
    realized = quantize_rate(0.3)[0] / LANE_LEVELS

    def pick(spec: tuple) -> torch.Tensor:
        step, index, part = spec
        dropped = _dropped(step, index, count)
        return {"even": dropped[0::2], "odd": dropped[1::2], "all": dropped}[part]

    a, b = pick(first), pick(second)
    joint = (a & b).double().mean().item()
    assert abs(joint - realized**2) <= tolerance(realized**2, a.numel())


def test_lane_values_are_uniform() -> None:
    count = 1 << 20
    lanes = lanes_reference(
        stream_key(13, MASK_DOMAIN, 0, 0), torch.arange(count, dtype=torch.int64)
    )
    counts = torch.bincount(lanes >> 8, minlength=256).double()
    expected = count / 256
    statistic = float(((counts - expected) ** 2 / expected).sum())
    # 255 degrees of freedom: the chi-square's upper 1e-6 quantile is about 389
    # (scipy.stats.chi2.isf(1e-6, 255) = 389.5).
    assert statistic < 389.5


def test_gaussian_noise_has_mean_one_and_the_bernoulli_variance() -> None:
    count = 1 << 20
    rate = 0.3
    noise = torch.ones(count, dtype=torch.float64)
    keyed_mask_("gaussian", noise, stream_key(14, MASK_DOMAIN, 0, 0), rate)
    variance = rate / (1 - rate)
    assert abs(noise.mean().item() - 1) <= 5 * math.sqrt(variance / count)
    assert abs(noise.var().item() - variance) <= 5 * variance * math.sqrt(2 / (count - 1))


# ---------------------------------------------------------------- skip decisions


def test_skip_decisions_depend_on_seed_and_step_only() -> None:
    decisions = [skip_decision(21, step, 0.3) for step in range(20_000)]
    assert decisions == [skip_decision(21, step, 0.3) for step in range(20_000)]
    fraction = sum(decisions) / len(decisions)
    assert abs(fraction - 0.3) <= tolerance(0.3, len(decisions))
    assert decisions != [skip_decision(22, step, 0.3) for step in range(20_000)]
    assert not skip_decision(21, 5, 0.0) and skip_decision(21, 5, 1.0)


def test_resumed_run_skips_the_same_steps() -> None:
    def build() -> DropGrad:
        weight = nn.Parameter(torch.ones(10))
        return DropGrad(
            torch.optim.SGD([weight], lr=0.1), drop_rate=0.2, full_update_drop=0.5, seed=8
        )

    def run(opt: DropGrad, steps: int) -> list[bool]:
        skipped = []
        for _ in range(steps):
            opt.param_groups[0]["params"][0].grad = torch.ones(10)
            opt.step()
            skipped.append(opt.last_step_skipped)
        return skipped

    uninterrupted = build()
    expected = run(uninterrupted, 40)
    first = build()
    head = run(first, 15)
    resumed = build()
    resumed.load_state_dict(first.state_dict())
    assert head + run(resumed, 25) == expected
    assert 0 < sum(expected) < 40


# ---------------------------------------------------------------- the functional keyed form


@pytest.mark.parametrize("distribution", ["bernoulli", "gaussian"])
def test_functional_keyed_form_is_what_dropgrad_applies(distribution: str) -> None:
    weight, bias = nn.Parameter(torch.zeros(30, 20)), nn.Parameter(torch.zeros(20))
    base = torch.optim.SGD([weight, bias], lr=0.0)
    opt = DropGrad(base, drop_rate=0.3, distribution=distribution, seed=41)
    seen: list[torch.Tensor] = []
    base.register_step_pre_hook(lambda *_: seen.append(bias.grad.clone()))
    grads = [torch.randn(20, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    for grad in grads:
        weight.grad, bias.grad = torch.ones(30, 20), grad.clone()
        opt.step()
    for step, (grad, masked) in enumerate(zip(grads, seen)):
        kwargs = {"distribution": distribution, "seed": 41, "step": step, "index": 1}
        assert torch.equal(drop_grad(grad, 0.3, **kwargs), masked)
        assert torch.equal(drop_grad_(grad.clone(), 0.3, **kwargs), masked)


def test_functional_keyed_form_argument_errors() -> None:
    g = torch.ones(4)
    with pytest.raises(ValueError, match="^pass seed \\(a keyed mask\\) or generator, not both$"):
        drop_grad(g, 0.5, seed=1, generator=torch.Generator())
    with pytest.raises(ValueError, match="step and index select a keyed mask and need a seed"):
        drop_grad(g, 0.5, step=3)
    with pytest.raises(TypeError, match="^step must be an int, got float 1.5$"):
        drop_grad_(g, 0.5, seed=1, step=1.5)
    with pytest.raises(ValueError, match=r"^index must be in \[0, 2\*\*64\), got -1$"):
        drop_grad(g, 0.5, seed=1, index=-1)
    with pytest.raises(
        ValueError, match=r"^seed must be in \[0, 2\*\*64\), got 18446744073709551616"
    ):
        drop_grad(g, 0.5, seed=2**64)


def test_non_tensors_are_refused_with_a_type_error() -> None:
    for function, name in ((drop_grad, "drop_grad"), (drop_grad_, "drop_grad_")):
        for value in ([1.0], 1.0, None, np.ones(3)):
            with pytest.raises(TypeError, match=f"^{name}: tensor must be a torch.Tensor, got"):
                function(value, 0.5)  # type: ignore[arg-type]


# ---------------------------------------------------------------- torch.compile


def test_compiled_training_step_with_opt_step_matches_eager() -> None:
    def run(compiled: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 2))
        # SGD with momentum: its traced step computes exactly what its eager step does
        # (a traced Adam rounds differently, with or without DropGrad), so the compiled
        # run, whose wrapped step is traced, must match bit for bit.
        opt = DropGrad(
            torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9),
            drop_rate=0.3,
            granularity="element",
            full_update_drop=0.25,
            seed=5,
        )

        def train_step(inputs: torch.Tensor) -> torch.Tensor:
            loss = model(inputs).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            return loss

        step = torch.compile(train_step, backend="aot_eager") if compiled else train_step
        generator = torch.Generator().manual_seed(1)
        for _ in range(4):
            step(torch.randn(8, 6, generator=generator))
        assert opt.step_count == 4
        return [p.detach().clone() for p in model.parameters()]

    torch._dynamo.reset()
    for compiled, eager in zip(run(True), run(False)):
        assert torch.equal(compiled, eager)
