"""Mask kernels: rate quantization, fast/reference agreement, statistics, memory.

These tests pin down the torch-op backend (blocks, packing plans, chunk sizes),
so every mask here is computed with ``DROPGRAD_BACKEND=torch`` (the reference
backend where a test names it); ``test_native.py`` holds the native kernel to
the same reference.
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from types import ModuleType

import pytest
import torch

from dropgrad._random import GAUSSIAN_DOMAIN, MASK_DOMAIN, domain_of, stream_key, stream_key_table
from dropgrad.kernels import _dispatch, _reference
from dropgrad.kernels import _torch_ops as torch_ops
from dropgrad.kernels._reference import (
    LANE_LEVELS,
    gaussian_sigma,
    lanes_reference,
    quantize_rate,
)
from dropgrad.kernels._torch_ops import CHUNK_LANES

from ._helpers import ALL_DTYPES, key_table, mask_with, peak_temporary_bytes, random_tensor

SEED = 20260
DTYPES = ALL_DTYPES


@pytest.fixture(autouse=True)
def torch_op_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DROPGRAD_BACKEND", "torch")


def generator(seed: int = SEED) -> int:
    """The seed the kernels below key their masks with (tensor ``i`` is parameter ``i``)."""
    return seed


def keys_for(count: int, seed: int, domain: int = MASK_DOMAIN, step: int = 3) -> torch.Tensor:
    """Key table of tensors ``0 .. count - 1`` (parameter ``i`` is tensor ``i``)."""
    return stream_key_table(seed, domain, step, list(range(count)))


@contextmanager
def torch_op_chunks(chunk_lanes: int) -> Iterator[None]:
    """The torch-op backend, as the dispatcher calls it, with blocks of ``chunk_lanes``."""
    entry = _dispatch.BACKENDS["torch"]
    chunked = entry._replace(
        bernoulli=functools.partial(torch_ops.bernoulli_, chunk_lanes=chunk_lanes),
        gaussian=functools.partial(torch_ops.gaussian_, chunk_lanes=chunk_lanes),
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(_dispatch.BACKENDS, "torch", chunked)
        yield


def mask_(
    tensors: Sequence[torch.Tensor],
    rate: float,
    seed: int,
    scale: float = 1.0,
    *,
    backend: str = "torch",
    distribution: str = "bernoulli",
    starts: Sequence[int] | None = None,
    chunk_lanes: int | None = None,
) -> None:
    """Mask ``tensors`` through ``kernels.mask_`` (rate quantization and the trivial
    rates included) with ``backend`` pinned and tensor ``i`` keyed as parameter ``i``."""
    keys = keys_for(len(tensors), seed, domain_of(distribution))
    starts = list(starts) if starts is not None else [0] * len(tensors)
    with torch_op_chunks(chunk_lanes) if chunk_lanes is not None else nullcontext():
        mask_with(backend, tensors, starts, keys, rate, distribution, scale)


def keyed(
    backend: str, chunk_lanes: int | None = None, distribution: str = "bernoulli"
) -> Callable[..., None]:
    """A kernel with the signature (tensors, rate, seed, scale=1.0)."""

    def run(tensors: list[torch.Tensor], rate: float, seed: int, scale: float = 1.0) -> None:
        mask_(
            tensors,
            rate,
            seed,
            scale,
            backend=backend,
            distribution=distribution,
            chunk_lanes=chunk_lanes,
        )

    return run


# (tensors, rate, seed, scale=1.0) -> None, masking in place.
Kernel = Callable[..., None]
BERNOULLI_KERNELS = [
    pytest.param(keyed("reference"), id="reference"),
    pytest.param(keyed("torch"), id="fast"),
    pytest.param(keyed("torch", 64), id="fast-64"),
]
# Large-sample statistics skip the tiny-chunk variant, which would only cost
# time: the bit-identity tests below tie it to the reference path.
STAT_KERNELS = BERNOULLI_KERNELS[:2]
gaussian_ = keyed("torch", distribution="gaussian")
ALL_KERNELS = [*BERNOULLI_KERNELS, pytest.param(gaussian_, id="gaussian")]


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The bytes of ``tensor``'s elements in logical order, for bit-exact comparison."""
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def assert_bit_identical(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    assert torch.equal(bits(actual), bits(expected))


def binomial_tolerance(probability: float, count: int) -> float:
    """Five standard deviations of the fraction of successes in ``count`` trials."""
    return 5 * math.sqrt(probability * (1 - probability) / count)


# ---------------------------------------------------------------------------
# quantize_rate


@pytest.mark.parametrize(
    ("rate", "threshold", "scale"),
    [
        (0.0, 0, 1.0),
        (1e-6, 0, 1.0),  # 0.0655 lanes rounds to none
        (2**-16, 1, 65536 / 65535),
        (0.25, 16384, 4 / 3),
        (0.5, 32768, 2.0),
        (0.75, 49152, 4.0),
        (0.99999, 65535, 65536.0),  # 65535.34 lanes
        # Rounds to every lane, but a rate below 1 keeps one level so the mask stays unbiased.
        (1 - 2**-18, 65535, 65536.0),
        (1.0, 65536, math.inf),
    ],
)
def test_quantize_rate_known_values(rate: float, threshold: int, scale: float) -> None:
    assert quantize_rate(rate) == (threshold, scale)
    assert type(quantize_rate(rate)[0]) is int


QUANTIZATION_GRID = sorted(
    {
        0.0,
        1e-6,
        1e-5,
        2**-17,
        3 * 2**-17,
        1e-4,
        1e-3,
        0.01,
        0.1,
        1 / 3,
        0.5,
        2 / 3,
        0.9,
        0.99,
        0.999,
        0.9999,
        0.99999,
        1 - 2**-17,
        1 - 2**-18,
        1 - 1e-9,
        1.0,
        *(k / 97 for k in range(98)),
    }
)


@pytest.mark.parametrize("rate", QUANTIZATION_GRID)
def test_quantize_rate_realizes_the_requested_rate_within_half_a_level(rate: float) -> None:
    threshold, scale = quantize_rate(rate)
    realized = threshold / LANE_LEVELS
    assert 0 <= threshold <= LANE_LEVELS
    # Half a level, except just below 1 where one level is always kept.
    assert abs(realized - rate) <= (2**-16 if rate > 1 - 2**-17 and rate < 1 else 2**-17)
    assert abs(realized - rate) < 1e-4
    if threshold == LANE_LEVELS:
        assert scale == math.inf
    else:
        # The survivor scale is the inverse of the realized keep probability.
        assert scale == LANE_LEVELS / (LANE_LEVELS - threshold)


def test_quantize_rate_is_monotone() -> None:
    thresholds = [quantize_rate(k / 4099)[0] for k in range(4100)]
    assert thresholds == sorted(thresholds)
    assert thresholds[0] == 0
    assert thresholds[-1] == LANE_LEVELS


# ---------------------------------------------------------------------------
# The torch-op backend (fast) against the reference backend

TensorFactory = Callable[[torch.dtype], list[torch.Tensor]]


def one_big_tensor(dtype: torch.dtype) -> list[torch.Tensor]:
    return [random_tensor(1001, 7, dtype=dtype)]


def many_small_tensors(dtype: torch.dtype) -> list[torch.Tensor]:
    sizes = [1, 3, 5, 7, 2, 11, 13, 63, 64, 65, 1, 129, 1, 250, 9]
    tensors = [random_tensor(size, dtype=dtype, seed=i) for i, size in enumerate(sizes)]
    return [*tensors, random_tensor(3, 5, dtype=dtype), random_tensor(dtype=dtype, seed=99)]


def with_zero_size_tensors(dtype: torch.dtype) -> list[torch.Tensor]:
    return [
        torch.empty(0, dtype=dtype),
        random_tensor(37, dtype=dtype),
        torch.empty(3, 0, dtype=dtype),
        random_tensor(70, dtype=dtype, seed=1),
        torch.empty(0, 5, dtype=dtype),
    ]


def only_zero_size_tensors(dtype: torch.dtype) -> list[torch.Tensor]:
    return [torch.empty(0, dtype=dtype), torch.empty(4, 0, 2, dtype=dtype)]


def non_contiguous_tensors(dtype: torch.dtype) -> list[torch.Tensor]:
    transposed = random_tensor(9, 31, dtype=dtype).t()
    sliced = random_tensor(20, 12, dtype=dtype, seed=1)[3:17, ::3]
    permuted = random_tensor(5, 6, 7, dtype=dtype, seed=2).permute(2, 0, 1)
    contiguous = random_tensor(101, dtype=dtype, seed=3)
    assert not any(t.is_contiguous() for t in (transposed, sliced, permuted))
    return [transposed, contiguous, sliced, permuted]


TENSOR_SETS = [
    pytest.param(one_big_tensor, id="big"),
    pytest.param(many_small_tensors, id="small"),
    pytest.param(with_zero_size_tensors, id="zero-size-mixed"),
    pytest.param(only_zero_size_tensors, id="zero-size-only"),
    pytest.param(non_contiguous_tensors, id="non-contiguous"),
]


def mask_both_ways(
    make: TensorFactory, dtype: torch.dtype, rate: float, scale: float, chunk_lanes: int
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Originals, reference results and fast results, with the same keys.

    Tensor ``i`` starts at global index ``7 * i`` of its parameter, so odd
    offsets (a segment starting in the middle of a word) are covered too.
    """
    originals = make(dtype)
    reference = make(dtype)
    fast = make(dtype)
    starts = [7 * i for i in range(len(originals))]
    mask_(reference, rate, SEED, scale, backend="reference", starts=starts)
    mask_(fast, rate, SEED, scale, starts=starts, chunk_lanes=chunk_lanes)
    return originals, reference, fast


@pytest.mark.parametrize("make", TENSOR_SETS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("chunk_lanes", [4, 64, 1000])
def test_fast_is_bit_identical_to_reference(
    make: TensorFactory, dtype: torch.dtype, chunk_lanes: int
) -> None:
    originals, reference, chunked = mask_both_ways(make, dtype, 0.3, 1.0, chunk_lanes)
    for actual, expected in zip(chunked, reference):
        assert_bit_identical(actual, expected)
    # Guard against both paths doing nothing: something must have been dropped.
    total = sum(t.numel() for t in originals)
    if total:
        dropped = sum(int((t == 0).sum()) for t in reference)
        assert 0 < dropped < total


@pytest.mark.parametrize("make", TENSOR_SETS)
@pytest.mark.parametrize(("rate", "scale"), [(0.3, 0.5), (0.05, 3.0), (0.0, 0.25), (1.0, 2.0)])
def test_fast_matches_reference_with_a_scale(
    make: TensorFactory, rate: float, scale: float
) -> None:
    originals, reference, chunked = mask_both_ways(make, torch.float32, rate, scale, 64)
    for original, actual, expected in zip(originals, chunked, reference):
        assert_bit_identical(actual, expected)
        threshold, keep_scale = quantize_rate(rate)
        if threshold == 0:
            assert_bit_identical(actual, original * scale)
        elif threshold == LANE_LEVELS:
            assert_bit_identical(actual, torch.zeros_like(original))
        else:
            kept = actual != 0
            assert torch.equal(actual[kept], original[kept] * (scale * keep_scale))


def test_fast_matches_reference_across_default_sized_chunks() -> None:
    count = 2 * CHUNK_LANES + 12345
    originals, reference, chunked = mask_both_ways(
        lambda dtype: [torch.ones(count, dtype=dtype)], torch.float32, 0.5, 1.0, CHUNK_LANES
    )
    assert_bit_identical(chunked[0], reference[0])


def test_fast_leaves_the_rest_of_a_sliced_base_alone() -> None:
    for kernel in (keyed("reference"), keyed("torch")):
        base = random_tensor(20, 12)
        original = base.clone()
        view = base[3:17, ::3]
        kernel([view], 0.5, generator())
        untouched = torch.ones_like(base, dtype=torch.bool)
        untouched[3:17, ::3] = False
        assert torch.equal(base[untouched], original[untouched])
        assert (view == 0).any()


def test_lanes_reference_agrees_with_the_kernels() -> None:
    threshold, _ = quantize_rate(0.4)
    key = stream_key(SEED, MASK_DOMAIN, 3, 0)
    lanes = lanes_reference(key, torch.arange(33 * 17, dtype=torch.int64))
    assert int(lanes.min()) >= 0 and int(lanes.max()) < LANE_LEVELS
    ones = torch.ones(33, 17)
    torch_ops.bernoulli_([ones], [0], key_table([key]), threshold, 1.0, chunk_lanes=64)
    assert torch.equal((lanes < threshold).view(33, 17), ones == 0)


# ---------------------------------------------------------------------------
# Statistics of the Bernoulli mask

STAT_COUNT = 1 << 20
STAT_RATES = [0.01, 0.1, 0.3, 0.5, 0.9]


@pytest.mark.parametrize("kernel", STAT_KERNELS)
@pytest.mark.parametrize("rate", STAT_RATES)
def test_fraction_dropped_matches_the_rate(kernel: Kernel, rate: float) -> None:
    threshold, _ = quantize_rate(rate)
    realized = threshold / LANE_LEVELS
    ones = torch.ones(STAT_COUNT)
    kernel([ones], rate, generator())
    dropped = ones == 0
    assert abs(dropped.double().mean().item() - realized) <= binomial_tolerance(
        realized, STAT_COUNT
    )
    # Each of the two lanes of a 32-bit word is uniform on its own ...
    per_lane = dropped.view(-1, 2).double().mean(dim=0)
    lane_tolerance = binomial_tolerance(realized, STAT_COUNT // 2)
    assert (per_lane - realized).abs().max().item() <= lane_tolerance
    # ... and independent of its neighbour, within a word and across words.
    pair_probability = realized**2
    pair_tolerance = binomial_tolerance(pair_probability, STAT_COUNT // 2)
    words = dropped.view(-1, 2)
    within = (words[:, 0] & words[:, 1]).double().mean().item()
    across = (words[:-1, 1] & words[1:, 0]).double().mean().item()
    assert abs(within - pair_probability) <= pair_tolerance
    assert abs(across - pair_probability) <= pair_tolerance


@pytest.mark.parametrize("kernel", STAT_KERNELS)
@pytest.mark.parametrize("rate", STAT_RATES)
def test_masked_mean_is_unbiased(kernel: Kernel, rate: float) -> None:
    threshold, _ = quantize_rate(rate)
    realized = threshold / LANE_LEVELS
    ones = torch.ones(STAT_COUNT, dtype=torch.float64)
    kernel([ones], rate, generator(SEED + 1))
    # Each element is 0 or 1/(1-q): mean 1, variance q/(1-q).
    standard_error = math.sqrt(realized / (1 - realized) / STAT_COUNT)
    assert abs(ones.mean().item() - 1.0) <= 5 * standard_error


@pytest.mark.parametrize("kernel", BERNOULLI_KERNELS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("rate", [0.1, 0.37, 0.9])
def test_survivors_are_scaled_by_the_inverse_realized_keep_probability(
    kernel: Kernel, dtype: torch.dtype, rate: float
) -> None:
    threshold, _ = quantize_rate(rate)
    original = random_tensor(1 << 14, dtype=dtype)
    masked = original.clone()
    kernel([masked], rate, generator())
    kept = masked != 0
    factor = LANE_LEVELS / (LANE_LEVELS - threshold)
    assert torch.equal(masked[kept], original[kept] * factor)
    ones = torch.ones(1 << 10, dtype=torch.float64)
    kernel([ones], rate, generator())
    assert set(ones.unique().tolist()) == {0.0, factor}


@pytest.mark.parametrize("kernel", BERNOULLI_KERNELS)
def test_complex_elements_are_dropped_whole(kernel: Kernel) -> None:
    original = random_tensor(1 << 16, dtype=torch.complex64)
    masked = original.clone()
    kernel([masked], 0.3, generator())
    real_zero, imag_zero = masked.real == 0, masked.imag == 0
    assert torch.equal(real_zero, imag_zero)
    realized = quantize_rate(0.3)[0] / LANE_LEVELS
    fraction = real_zero.double().mean().item()
    assert abs(fraction - realized) <= binomial_tolerance(realized, masked.numel())
    kept = ~real_zero
    assert torch.equal(masked[kept], original[kept] * quantize_rate(0.3)[1])


# A Bernoulli rate below half a lane level rounds to threshold 0; Gaussian noise
# is drawn for every positive rate, so only rate 0 is a no-op there.
@pytest.mark.parametrize(
    ("kernel", "rate"),
    [
        *[
            pytest.param(k.values[0], rate, id=f"{k.id}-{rate}")
            for k in BERNOULLI_KERNELS
            for rate in (0.0, 1e-6)
        ],
        pytest.param(gaussian_, 0.0, id="gaussian-0.0"),
    ],
)
def test_rate_rounding_to_zero_draws_nothing_and_changes_nothing(
    kernel: Kernel, rate: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object) -> None:
        raise AssertionError("no random bits may be computed")

    monkeypatch.setattr(torch_ops, "hash_words_", refuse)
    monkeypatch.setattr(_reference, "words_reference", refuse)
    tensors = non_contiguous_tensors(torch.float32)
    originals = [t.clone() for t in tensors]
    kernel(tensors, rate, generator())
    for actual, expected in zip(tensors, originals):
        assert_bit_identical(actual, expected)


@pytest.mark.parametrize("kernel", ALL_KERNELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rate_one_gives_exact_zeros_even_for_inf_and_nan(
    kernel: Kernel, dtype: torch.dtype
) -> None:
    special = torch.tensor([math.inf, -math.inf, math.nan, -0.0, 1.5, -2.0]).to(dtype)
    tensors = [special, random_tensor(7, 9, dtype=dtype).t()]
    source = generator()
    kernel(tensors, 1.0, source)
    for tensor in tensors:
        assert_bit_identical(tensor, torch.zeros_like(tensor))


# ---------------------------------------------------------------------------
# Gaussian multiplicative noise


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("rate", [0.05, 0.3, 0.5, 0.9])
@pytest.mark.parametrize("chunk_lanes", [CHUNK_LANES, 1000])
def test_gaussian_multiplier_has_mean_one_and_bernoulli_variance(
    dtype: torch.dtype, rate: float, chunk_lanes: int
) -> None:
    multiplier = torch.ones(STAT_COUNT, dtype=dtype)
    mask_([multiplier], rate, SEED, distribution="gaussian", chunk_lanes=chunk_lanes)
    samples = multiplier.double()
    variance = rate / (1 - rate)
    # Mean of n normal draws: standard error sqrt(var / n). Sample variance of
    # n normal draws: Var(s^2) = 2 var^2 / (n - 1).
    mean_tolerance = 5 * math.sqrt(variance / STAT_COUNT)
    variance_tolerance = 5 * variance * math.sqrt(2 / (STAT_COUNT - 1))
    assert abs(samples.mean().item() - 1.0) <= mean_tolerance
    assert abs(samples.var().item() - variance) <= variance_tolerance


def test_gaussian_scales_complex_elements_by_one_real_factor() -> None:
    original = random_tensor(4096, dtype=torch.complex64)
    noisy = original.clone()
    gaussian_([noisy], 0.4, generator())
    real_factor = noisy.real / original.real
    imag_factor = noisy.imag / original.imag
    torch.testing.assert_close(real_factor, imag_factor, rtol=1e-5, atol=1e-6)
    assert real_factor.std().item() > 0.5


def test_gaussian_scale_multiplies_the_noise() -> None:
    plain = [random_tensor(3000), random_tensor(5, 7, seed=1).t()]
    scaled = [t.clone() for t in plain]
    mask_(plain, 0.2, SEED, distribution="gaussian", chunk_lanes=64)
    mask_(scaled, 0.2, SEED, 0.5, distribution="gaussian", chunk_lanes=64)
    for unscaled, result in zip(plain, scaled):
        torch.testing.assert_close(result, unscaled * 0.5, rtol=1e-6, atol=0)


def test_gaussian_rate_zero_applies_only_the_scale() -> None:
    tensors = [random_tensor(100), random_tensor(4, 6, seed=1).t()]
    expected = [t * 3.0 for t in tensors]
    gaussian_(tensors, 0.0, generator(), scale=3.0)
    for actual, wanted in zip(tensors, expected):
        assert_bit_identical(actual, wanted)


# ---------------------------------------------------------------------------
# Memory


MEMORY_CHUNK = 1 << 14
# Per element of a block, Bernoulli holds 6 bytes of words (an int32 iota, words
# and scratch for every two elements) and a packed float32 copy (4); Gaussian,
# whose blocks hold half as many elements, two words an element (24 bytes with
# iota and scratch) and its float64 uniforms, normals and noise (about 28): 26
# bytes per block element, bounded with room to spare by 48.
MEMORY_BOUND = 48 * MEMORY_CHUNK


def test_fast_kernels_hold_chunk_sized_temporaries() -> None:
    big = torch.ones(1 << 21)
    smalls = [torch.ones(3000) for _ in range(200)]

    # The measurement sees whole-tensor temporaries: the reference path holds
    # int64 indices and words for every element (tens of MiB here).
    reference_peak = peak_temporary_bytes(
        lambda: backend_run(_reference, "bernoulli", [big], [0], keys_for(1, SEED), 0.3)
    )
    assert reference_peak >= 8 * big.numel()

    def fast(distribution: str, tensors: list[torch.Tensor]) -> Callable[[], None]:
        keys = keys_for(len(tensors), SEED, domain_of(distribution))
        starts = [0] * len(tensors)
        return lambda: backend_run(
            torch_ops, distribution, tensors, starts, keys, 0.3, chunk_lanes=MEMORY_CHUNK
        )

    runs = {
        "bernoulli-big": fast("bernoulli", [big]),
        "bernoulli-packed": fast("bernoulli", smalls),
        "gaussian-big": fast("gaussian", [big]),
        "gaussian-packed": fast("gaussian", smalls),
    }
    # Packing plans kept between steps are bounded separately (see
    # test_packing_plans_are_kept_between_steps_within_their_memory_bound); here
    # every call builds its blocks, one at a time.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch_ops, "_PACK_PLAN_BYTES", 0)
        peaks = {name: peak_temporary_bytes(run) for name, run in runs.items()}
    assert all(0 < peak <= MEMORY_BOUND for peak in peaks.values()), peaks


@pytest.mark.parametrize("count", [1, 3, 16, 17, 40, 300])
@pytest.mark.parametrize("largest", [3_000, 60_000])
def test_blocks_with_few_or_many_runs_match_the_reference(count: int, largest: int) -> None:
    """A block's hash inputs are written run by run for up to 16 runs and with repeated
    run constants beyond; both ways must give the reference's masks, at odd offsets."""
    sizes = torch.randint(1, largest, (count,), generator=torch.Generator().manual_seed(count))
    tensors = [torch.randn(int(size)) for size in sizes]
    fast = [t.clone() for t in tensors]
    reference = [t.clone() for t in tensors]

    starts = [3 * i + 1 for i in range(count)]
    keys = stream_key_table(11, MASK_DOMAIN, 4, list(range(count)))
    backend_run(torch_ops, "bernoulli", fast, starts, keys, 0.3)
    backend_run(_reference, "bernoulli", reference, starts, keys, 0.3)
    for got, want in zip(fast, reference):
        assert torch.equal(got, want)


def backend_run(
    backend: ModuleType,
    distribution: str,
    values: Sequence[torch.Tensor],
    starts: Sequence[int],
    keys: torch.Tensor,
    rate: float,
    **options: int,
) -> None:
    """A backend module's own ``bernoulli_`` or ``gaussian_`` at ``0 < rate < 1``, unscaled."""
    if distribution == "bernoulli":
        threshold, keep_scale = quantize_rate(rate)
        backend.bernoulli_(values, starts, keys, threshold, keep_scale, **options)
    else:
        backend.gaussian_(values, starts, keys, gaussian_sigma(rate), 1.0, **options)


def fast_kernel_of(distribution: str) -> Callable[..., None]:
    """``(values, starts, keys, rate, chunk_lanes=...)`` on the torch-op backend."""
    return functools.partial(backend_run, torch_ops, distribution)


def reference_kernel_of(distribution: str) -> Callable[..., None]:
    """``(values, starts, keys, rate)`` on the reference backend."""
    return functools.partial(backend_run, _reference, distribution)


KERNEL_PAIRS = {
    "bernoulli": (fast_kernel_of("bernoulli"), reference_kernel_of("bernoulli"), MASK_DOMAIN),
    "gaussian": (fast_kernel_of("gaussian"), reference_kernel_of("gaussian"), GAUSSIAN_DOMAIN),
}


@pytest.mark.parametrize("kernel", sorted(KERNEL_PAIRS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64, torch.complex128])
def test_packing_plans_are_kept_between_steps_within_their_memory_bound(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, kernel: str
) -> None:
    """Small tensors (non-contiguous ones among them, of many sizes, at odd global
    offsets, over several blocks) are packed by a plan built once and reused with
    the next step's keys; with no room left, plans are built during each call. Both
    give the reference's results, and the kept plans stay within their byte bound."""
    fast_kernel, reference_kernel, domain = KERNEL_PAIRS[kernel]
    sizes = torch.randint(1, 3_000, (60,), generator=torch.Generator().manual_seed(5))
    contiguous = [torch.randn(int(size), dtype=dtype) for size in sizes]
    strided = [torch.randn(40, 30, dtype=dtype).t(), torch.randn(7, 5, 3, dtype=dtype)[:, 1]]
    assert not any(t.is_contiguous() for t in strided)

    def masked_pair(step: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        pairs = []
        for _ in range(2):
            values = [t.clone() for t in contiguous]
            for original in strided:  # a copy with the same strides
                copy = torch.empty_strided(original.shape, original.stride(), dtype=dtype)
                values.append(copy.copy_(original))
            pairs.append(values)
        fast, reference = pairs

        starts = [7 * i for i in range(len(fast))]
        keys = stream_key_table(3, domain, step, list(range(len(fast))))
        fast_kernel(fast, starts, keys, 0.4, chunk_lanes=1 << 14)
        reference_kernel(reference, starts, keys, 0.4)
        assert not fast[-1].is_contiguous()
        return fast, reference

    monkeypatch.setattr(torch_ops, "_PACK_PLANS", OrderedDict())
    monkeypatch.setattr(torch_ops, "_pack_plan_bytes", 0)
    for step in range(3):
        fast, reference = masked_pair(step)
        for got, want in zip(fast, reference):
            assert_bit_identical(got, want)
        assert len(torch_ops._PACK_PLANS) == 1  # built at step 0, reused since
    plan, nbytes = next(iter(torch_ops._PACK_PLANS.values()))
    assert plan.blocks is not None and len(plan.blocks) > 1
    assert 0 < torch_ops._pack_plan_bytes == nbytes <= torch_ops._PACK_PLAN_BYTES

    monkeypatch.setattr(torch_ops, "_PACK_PLANS", OrderedDict())
    monkeypatch.setattr(torch_ops, "_pack_plan_bytes", 0)
    monkeypatch.setattr(torch_ops, "_PACK_PLAN_BYTES", 0)
    fast, reference = masked_pair(4)
    for got, want in zip(fast, reference):
        assert_bit_identical(got, want)
    assert torch_ops._PACK_PLANS == {}


def test_packing_plans_used_longest_ago_make_room_for_new_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The kept plans are a least-recently-used cache bounded in bytes: a plan found
    again moves to the back, and a new plan that does not fit evicts from the front."""
    tensors = [torch.randn(100) for _ in range(20)]
    keys = stream_key_table(9, MASK_DOMAIN, 0, list(range(len(tensors))))

    def mask_at(offset: int) -> None:
        starts = [offset + 100 * i for i in range(len(tensors))]  # a plan per offset
        reference = [t.clone() for t in tensors]
        fast = [t.clone() for t in tensors]
        backend_run(_reference, "bernoulli", reference, starts, keys, 0.3)
        backend_run(torch_ops, "bernoulli", fast, starts, keys, 0.3)
        for got, want in zip(fast, reference):
            assert_bit_identical(got, want)

    def kept_offsets() -> list[int]:
        # A plan's signature holds the starts of its tensors (at position 4).
        return [signature[4][0] for signature in torch_ops._PACK_PLANS]  # type: ignore[index]

    monkeypatch.setattr(torch_ops, "_PACK_PLANS", OrderedDict())
    monkeypatch.setattr(torch_ops, "_pack_plan_bytes", 0)
    mask_at(0)
    ((_, nbytes),) = torch_ops._PACK_PLANS.values()
    monkeypatch.setattr(torch_ops, "_PACK_PLAN_BYTES", 2 * nbytes)  # room for two plans
    mask_at(2)
    assert kept_offsets() == [0, 2]
    mask_at(0)  # found again: now the most recently used
    assert kept_offsets() == [2, 0]
    mask_at(4)  # evicts the plan used longest ago
    assert kept_offsets() == [0, 4]
    assert torch_ops._pack_plan_bytes == 2 * nbytes
    monkeypatch.setattr(torch_ops, "_PACK_PLAN_BYTES", nbytes - 1)
    mask_at(6)  # larger than the whole bound: built for the call, nothing evicted
    assert kept_offsets() == [0, 4]


@pytest.mark.parametrize("kernel", sorted(KERNEL_PAIRS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.complex128])
@pytest.mark.parametrize("odd_start", [False, True])
def test_blocks_of_one_shape_are_filled_by_one_stack(
    monkeypatch: pytest.MonkeyPatch, kernel: str, dtype: torch.dtype, odd_start: bool
) -> None:
    """Tensors of one shape that fill their rows exactly are packed by one
    torch.stack (transposed ones among them); one that starts at the high half of
    a word needs a pad lane, so Bernoulli blocks fall back to one copy per tensor.
    Both give the reference's results."""
    fast_kernel, reference_kernel, domain = KERNEL_PAIRS[kernel]
    generator = torch.Generator().manual_seed(8)
    tensors = [torch.randn(8, 5, generator=generator).to(dtype) for _ in range(30)]
    tensors += [torch.randn(5, 8, generator=generator).to(dtype).t() for _ in range(3)]
    starts = [40 * i for i in range(len(tensors))]
    if odd_start:
        starts[4] += 1
    fast = [t.clone().t().contiguous().t() if not t.is_contiguous() else t.clone() for t in tensors]
    reference = [t.clone() for t in tensors]
    assert not fast[-1].is_contiguous()

    keys = stream_key_table(5, domain, 2, list(range(len(tensors))))
    monkeypatch.setattr(torch_ops, "_PACK_PLANS", OrderedDict())
    monkeypatch.setattr(torch_ops, "_pack_plan_bytes", 0)
    fast_kernel(fast, starts, keys, 0.4)
    reference_kernel(reference, starts, keys, 0.4)
    for got, want in zip(fast, reference):
        assert_bit_identical(got, want)
    ((plan, _),) = torch_ops._PACK_PLANS.values()
    stacked = [block.stacked is not None for block in plan.blocks]
    assert stacked == [not (odd_start and kernel == "bernoulli")]


@pytest.mark.parametrize("kernel", sorted(KERNEL_PAIRS))
def test_blocks_of_many_short_pieces_match_the_reference(kernel: str) -> None:
    """Tensors just over a block leave one-element pieces, which share blocks by the
    dozen: every piece may cost an extra word, more than a block's elements need."""
    fast_kernel, reference_kernel, domain = KERNEL_PAIRS[kernel]
    tensors = [torch.randn(65) for _ in range(100)]
    fast = [t.clone() for t in tensors]
    reference = [t.clone() for t in tensors]
    starts = [5 * i + 1 for i in range(len(tensors))]
    keys = stream_key_table(8, domain, 1, list(range(len(tensors))))
    fast_kernel(fast, starts, keys, 0.3, chunk_lanes=64)
    reference_kernel(reference, starts, keys, 0.3)
    for got, want in zip(fast, reference):
        assert_bit_identical(got, want)
