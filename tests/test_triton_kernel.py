"""The fused Triton mask kernel, run on CPU tensors by Triton's interpreter.

The kernel is what CUDA tensors are masked with; here it must give bit for bit
what the torch-op path gives (and so what the reference path gives), for every
dtype it takes, odd sizes, odd and 64-bit start offsets, and NaN and inf. Whole
buckets go through the dispatcher with the backend pinned
(``DROPGRAD_BACKEND=triton``), which accepts CPU tensors under the interpreter.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

import pytest
import torch

pytest.importorskip("triton")

from dropgrad import DropGrad, kernels  # noqa: E402
from dropgrad._random import MASK_DOMAIN, StreamKeys, stream_key  # noqa: E402
from dropgrad.kernels import _triton as triton_mask  # noqa: E402
from dropgrad.kernels._reference import LANE_LEVELS, quantize_rate  # noqa: E402

from ._helpers import key_table, mask_with, pinned_backend, triton_mask_one_  # noqa: E402

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


@pytest.fixture(autouse=True)
def interpreter(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Run the kernel under the interpreter, jitted afresh for it."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton_mask, "_kernel_cache", {})
    monkeypatch.setattr(triton_mask, "_table_cache", OrderedDict())
    yield


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(BITS[tensor.dtype.itemsize])


def values(size: int, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(size)
    tensor = torch.randn(size, dtype=torch.float64, generator=generator).to(dtype)
    if size >= 4:
        tensor[:4] = torch.tensor([float("inf"), float("nan"), -0.0, float("-inf")])
    return tensor


def mask_with_kernel(tensor: torch.Tensor, start: int, rate: float, scale: float) -> None:
    threshold = round(rate * LANE_LEVELS)
    factor = scale * LANE_LEVELS / (LANE_LEVELS - threshold)
    key = stream_key(31, MASK_DOMAIN, 4, 2)
    triton_mask_one_(tensor, start, key, threshold, factor)


def torch_op_mask(
    tensors: list[torch.Tensor], starts: list[int], keys: list, rate: float, scale: float = 1.0
) -> None:
    """The torch-op backend's masks, each tensor a bucket of its own."""
    for tensor, start, key in zip(tensors, starts, keys):
        mask_with("torch", [tensor], [start], key_table([key]), rate, scale=scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("size", [1, 2, 3, 1023, 1025, 4099])
@pytest.mark.parametrize("start", [0, 1, 2**32 - 3, 2**33 + 1])
def test_kernel_matches_the_torch_op_path(dtype: torch.dtype, size: int, start: int) -> None:
    expected = values(size, dtype)
    actual = expected.clone()
    key = stream_key(31, MASK_DOMAIN, 4, 2)
    torch_op_mask([expected], [start], [key], 0.3, 1.5)
    mask_with_kernel(actual, start, 0.3, 1.5)
    if dtype == torch.bfloat16:
        # The interpreter emulates bfloat16 by truncating float32, where a GPU
        # rounds to nearest even like torch (tests/test_cuda.py checks the bits
        # there): here the masks must agree exactly and the survivors to one ulp.
        assert torch.equal(actual == 0, expected == 0)
        assert torch.equal(actual.isnan(), expected.isnan())
        finite = expected.isfinite()
        ulps = (bits(actual)[finite].int() - bits(expected)[finite].int()).abs()
        assert ulps.numel() == 0 or int(ulps.max()) <= 1
        return
    assert torch.equal(bits(actual), bits(expected))


@pytest.mark.parametrize("rate", [2**-16, 0.1, 0.5, 65535 / 65536])
def test_kernel_matches_at_extreme_thresholds(rate: float) -> None:
    expected = values(2048, torch.float32)
    actual = expected.clone()
    key = stream_key(31, MASK_DOMAIN, 4, 2)
    torch_op_mask([expected], [5], [key], rate)
    mask_with_kernel(actual, 5, rate, 1.0)
    assert torch.equal(bits(actual), bits(expected))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64], ids=str)
def test_non_contiguous_tensors_are_masked_through_contiguous_copies(
    launches: CountingKernel, dtype: torch.dtype
) -> None:
    # What a CUDA step hands the kernel: several tensors, some transposed or strided,
    # each with its own key and start; the copies are written back into the originals.
    def views() -> list[torch.Tensor]:
        return [
            values(37 * 106, dtype).view(37, 106)[:, ::2],
            values(3 * 64, dtype).view(3, 64).t(),
            values(1001, dtype),
            values(120, dtype).view(4, 5, 6).permute(2, 1, 0),
        ]

    expected, actual = views(), views()
    assert [t.is_contiguous() for t in actual] == [False, False, True, False]
    keys = [stream_key(31, MASK_DOMAIN, 4, k) for k in range(len(actual))]
    starts = [0, 7, 2**32 - 1, 2**33 + 3]
    torch_op_mask(expected, starts, keys, 0.3, 1.5)
    mask_with("triton", actual, starts, key_table(keys), 0.3, scale=1.5)
    assert len(launches.grids) == 1
    assert [t.is_contiguous() for t in actual] == [False, False, True, False]
    for got, want in zip(actual, expected):
        assert torch.equal(bits(got), bits(want))


def test_dropped_specials_become_positive_zero() -> None:
    tensor = torch.full((4096,), float("nan"))
    tensor[1::2] = float("-inf")
    mask_with_kernel(tensor, 0, 0.5, 1.0)
    dropped = ~(tensor.isnan() | tensor.isinf())
    assert 0 < int(dropped.sum()) < tensor.numel()
    assert torch.equal(bits(tensor[dropped]), torch.zeros(int(dropped.sum()), dtype=torch.int32))


def test_kernel_writes_only_its_slice() -> None:
    base = values(3000, torch.float32)
    original = base.clone()
    part = base[1000:2001]
    mask_with_kernel(part, 1000, 0.5, 1.0)
    assert torch.equal(bits(base[:1000]), bits(original[:1000]))
    assert torch.equal(bits(base[2001:]), bits(original[2001:]))
    assert bool((part == 0).any())


def test_empty_tensor_is_a_no_op() -> None:
    mask_with_kernel(torch.empty(0), 0, 0.5, 1.0)


def test_accepted_only_where_it_can_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bernoulli masks of real dtypes, on CUDA or under the interpreter; strides are the
    dispatcher's business (it hands the kernel contiguous copies)."""
    assert kernels.backend_available("triton")
    assert triton_mask.unavailable() is None
    assert triton_mask.accepts([torch.ones(8)], "bernoulli")
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        assert triton_mask.accepts([torch.ones(8, dtype=dtype)], "bernoulli")
    assert not triton_mask.accepts([torch.ones(8)], "gaussian")
    assert not triton_mask.accepts([torch.ones(8, dtype=torch.complex64)], "bernoulli")
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not triton_mask.accepts([torch.ones(8)], "bernoulli")


def test_missing_triton_means_unusable(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def refuse_triton(name: str, *args: object, **kwargs: object) -> object:
        if name == "triton" or name.startswith("triton."):
            raise ImportError("no triton here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", refuse_triton)
    assert not triton_mask.accepts([torch.ones(8)], "bernoulli")
    assert triton_mask.unavailable() == "off: Triton cannot be imported"
    assert kernels.status()["triton"] == "off: Triton cannot be imported"
    assert not kernels.backend_available("triton")
    # Pinned, it refuses to run; not pinned, the torch-op backend masks instead.
    monkeypatch.setenv("DROPGRAD_BACKEND", "triton")
    with pytest.raises(RuntimeError, match=r"DROPGRAD_BACKEND=triton .*Triton cannot be imported"):
        kernels.mask_(
            [torch.ones(8)], [0], key_table([stream_key(1, MASK_DOMAIN, 0, 0)]), 0.5, "bernoulli"
        )
    monkeypatch.delenv("DROPGRAD_BACKEND")
    p = torch.nn.Parameter(torch.ones(64))
    p.grad = torch.ones(64)
    DropGrad(torch.optim.SGD([p], lr=1.0), drop_rate=0.5, seed=3).step()
    assert 0 < int((p.detach() == 1).sum()) < 64


# ------------------------------------------------------------ one launch for many tensors


class CountingKernel:
    """Stands in for the jitted kernel and counts its launches."""

    def __init__(self, kernel: object) -> None:
        self.kernel = kernel
        self.grids: list[tuple[int, ...]] = []

    def __getitem__(self, grid: tuple[int, ...]) -> object:
        self.grids.append(grid)
        return self.kernel[grid]  # type: ignore[index]


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> CountingKernel:
    counting = CountingKernel(triton_mask._load_kernel())
    monkeypatch.setitem(triton_mask._kernel_cache, "kernel", counting)
    return counting


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64], ids=str)
def test_many_tensors_are_masked_by_one_launch(
    launches: CountingKernel, dtype: torch.dtype
) -> None:
    """Sizes around the block size, empty tensors among them, odd and 64-bit starts:
    one launch, and every tensor as the torch-op path masks it on its own."""
    # The last tensor starts at 2**32 and spans several blocks: bit 32 of a start matters.
    sizes = [0, 1, 2, 3, 1023, 1024, 1025, 0, 2049, 4099, 7, 3000]
    starts = [0, 1, 2**32 - 1, 2**33 + 1, 5, 0, 3, 9, 2**40, 1, 6, 2**32]
    expected = [values(n, dtype) for n in sizes]
    actual = [t.clone() for t in expected]
    keys = [stream_key(31, MASK_DOMAIN, 4, row) for row in range(len(sizes))]
    torch_op_mask(expected, starts, keys, 0.3, 1.5)
    mask_with("triton", actual, starts, key_table(keys), 0.3, scale=1.5)
    blocks = sum((n + 1023) // 1024 for n in sizes)
    assert launches.grids == [(blocks,)]
    for got, want in zip(actual, expected):
        assert torch.equal(bits(got), bits(want))


def test_launch_table_lists_every_tensor_and_every_block() -> None:
    flats = [torch.empty(n) for n in (5, 0, 2048, 2049)]
    keys = torch.tensor([[1, 2], [3, 4], [5, 6], [7, 8]])
    table, blocks_at = triton_mask.launch_table(flats, [0, 1, 2, 3], keys, block=1024)
    assert table.dtype == torch.int64 and blocks_at == 5 * 4
    assert table[:blocks_at].view(-1, 5).tolist() == [
        [t.data_ptr(), t.numel(), start, a, b]
        for t, start, (a, b) in zip(flats, [0, 1, 2, 3], keys.tolist())
    ]
    assert table[blocks_at:].view(-1, 2).tolist() == [
        [0, 0],
        [2, 0],
        [2, 1024],
        [3, 0],
        [3, 1024],
        [3, 2048],
    ]


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        (torch.float64, 1 / 3),
        (torch.float32, 0.3333333432674408),
        (torch.bfloat16, 0.3333333432674408),
    ],
)
def test_the_factor_is_rounded_as_torch_multiplies(dtype: torch.dtype, expected: float) -> None:
    assert triton_mask.multiplication_factor(1 / 3, dtype) == expected


def test_lists_one_launch_cannot_take_are_refused(launches: CountingKernel) -> None:
    """Every address is read as the first tensor's dtype, on its device: a mixed list
    goes to torch ops, which handle it, even with the Triton backend pinned."""
    mixed = [values(2048, torch.float32), values(2048, torch.float16)]
    assert not triton_mask.accepts(mixed, "bernoulli")
    keys = [stream_key(31, MASK_DOMAIN, 4, k) for k in range(2)]
    expected = [t.clone() for t in mixed]
    torch_op_mask(expected, [0, 0], keys, 0.3)
    mask_with("triton", mixed, [0, 0], key_table(keys), 0.3)
    for got, want in zip(mixed, expected):
        assert torch.equal(bits(got), bits(want))
    mask_with("triton", [], [], key_table([]), 0.3)  # an empty bucket: nothing to do
    assert launches.grids == []


def test_kernel_bumps_version_counters(launches: CountingKernel) -> None:
    x = torch.randn(64, requires_grad=True)
    y = x * 2
    z = (y * y).sum()
    keys = key_table([stream_key(31, MASK_DOMAIN, 4, 0)])
    rate = 30000 / LANE_LEVELS
    with torch.no_grad():
        mask_with("triton", [y], [0], keys, rate, scale=2.0)
    assert len(launches.grids) == 1
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z.backward()
    # Under grad mode, a tensor that requires grad is left to torch ops and their checks:
    # a leaf is refused, a result of other ops gets the torch-op backend's mask.
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        mask_with("triton", [torch.ones(3, requires_grad=True)], [0], keys, rate, scale=2.0)
    masked = torch.ones(64, requires_grad=True) * 1.0
    expected = torch.ones(64)
    mask_with("triton", [masked], [0], keys, rate, scale=2.0)
    mask_with("torch", [expected], [0], keys, rate, scale=2.0)
    assert torch.equal(bits(masked.detach()), bits(expected))
    assert len(launches.grids) == 1


def test_only_empty_tensors_launch_nothing(launches: CountingKernel) -> None:
    keys = torch.tensor([[1, 2], [3, 4]])
    triton_mask.bernoulli_([torch.empty(0), torch.empty(0)], [0, 0], keys, 7, 1.0)
    assert launches.grids == []


# ------------------------------------------------- keys derived in the kernel, cached tables


def assert_same_bits(got: torch.Tensor, want: torch.Tensor) -> None:
    if got.dtype == torch.bfloat16:
        # The interpreter truncates bfloat16 results (see the first test): the masks
        # must agree exactly, the survivors to one ulp.
        assert torch.equal(got == 0, want == 0)
        finite = want.isfinite()
        ulps = (bits(got)[finite].int() - bits(want)[finite].int()).abs()
        assert ulps.numel() == 0 or int(ulps.max()) <= 1
        return
    assert torch.equal(bits(got), bits(want))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_keyed_kernel_matches_the_reference(dtype: torch.dtype) -> None:
    """Keys derived in the kernel are the table's keys: at several steps (1 and a
    multiple of 16 among them, which Triton would otherwise specialize on), with
    positions past 2**32 and up to 2**64 - 1, seeds near 2**64, starts past 2**32 and
    empty tensors in the bucket."""
    sizes = [0, 3, 1025, 1, 2049]
    starts = [0, 2**32 - 1, 2**33 + 5, 7, 2**40]
    positions = [0, 2**32 + 1, 2**63 - 1, 2**63, 2**64 - 1]
    threshold, keep_scale = quantize_rate(0.3)
    for seed, step in ((2**64 - 1, 1), (2**64 - 3, 16), (5, 2**63 + 7)):
        keys = StreamKeys(seed, MASK_DOMAIN, step, positions)
        expected = [values(n, dtype) for n in sizes]
        actual = [t.clone() for t in expected]
        mask_with("reference", expected, starts, keys.table(), 0.3, scale=1.5)
        triton_mask.bernoulli_keyed_(actual, starts, keys, threshold, 1.5 * keep_scale)
        for got, want in zip(actual, expected):
            assert_same_bits(got, want)


class CountingBuilds:
    """Counts the launch tables built (for either path)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        build = triton_mask.launch_table

        def counting(*args: object, **kwargs: object) -> object:
            self.count += 1
            return build(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(triton_mask, "launch_table", counting)


def keyed(tensors: list[torch.Tensor], step: int, positions: list[int] | None = None) -> None:
    keys = StreamKeys(7, MASK_DOMAIN, step, positions or list(range(len(tensors))))
    triton_mask.bernoulli_keyed_(tensors, [0] * len(tensors), keys, 20000, 1.25)


def test_the_device_table_is_reused_until_a_gradient_moves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    builds = CountingBuilds(monkeypatch)
    tensors = [torch.ones(3), torch.ones(1030)]
    for step in range(3):
        keyed(tensors, step)
    assert builds.count == 1
    reallocated = [tensors[0], torch.ones(1030)]  # zero_grad(set_to_none=True) may do this
    keyed(reallocated, 3)
    assert builds.count == 2
    tensors[1].resize_(5)  # same address, another size
    keyed(tensors, 4)
    assert builds.count == 3
    keyed(tensors, 5, positions=[4, 9])  # other parameters' gradients
    assert builds.count == 4
    keyed(reallocated, 6)  # an earlier layout, still cached
    assert builds.count == 4


def test_the_table_cache_is_bounded_least_recently_used_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(triton_mask, "TABLE_CACHE_SIZE", 2)
    builds = CountingBuilds(monkeypatch)
    first, second, third = [torch.ones(2)], [torch.ones(3)], [torch.ones(4)]
    for tensors in (first, second, first, third):  # `second` is then the oldest
        keyed(tensors, 0)
    assert builds.count == 3 and len(triton_mask._table_cache) == 2
    keyed(first, 1)
    keyed(third, 1)
    assert builds.count == 3
    keyed(second, 1)
    assert builds.count == 4 and len(triton_mask._table_cache) == 2


def test_a_steady_keyed_step_runs_no_tensor_op_besides_the_launch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No table, copy or key computed on the host once the layout is cached (what
    benchmarks/op_count.py counts per DropGrad step); the interpreter's own copies
    inside the launch are not the kernel's."""
    from torch.profiler import ProfilerActivity, profile, record_function

    kernel = triton_mask._load_kernel()

    class Labelled:
        def __getitem__(self, grid: tuple[int, ...]) -> object:
            def launch(*args: object, **kwargs: object) -> None:
                with record_function("launch"):
                    kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setitem(triton_mask._kernel_cache, "kernel", Labelled())
    tensors = [torch.ones(10), torch.ones(1500)]
    keyed(tensors, 0)
    with profile(activities=[ProfilerActivity.CPU]) as recorded:
        keyed(tensors, 1)

    def in_launch(event: object) -> bool:
        while event is not None:
            if event.name == "launch":  # type: ignore[attr-defined]
                return True
            event = event.cpu_parent  # type: ignore[attr-defined]
        return False

    events = recorded.events()
    assert sum(event.name == "launch" for event in events) == 1
    outside = [e.name for e in events if e.name.startswith("aten::") and not in_launch(e)]
    assert outside == []


def no_table(self: StreamKeys) -> torch.Tensor:
    raise AssertionError("a key table was built")


def test_described_keys_reach_the_keyed_kernel(
    monkeypatch: pytest.MonkeyPatch, launches: CountingKernel
) -> None:
    """The dispatcher hands StreamKeys to the kernel as they are: no key table is made."""
    expected = [values(2000, torch.float32), values(9, torch.float32)]
    actual = [t.clone() for t in expected]
    keys = StreamKeys(2**64 - 2, MASK_DOMAIN, 3, [2**40, 1])
    mask_with("reference", expected, [0, 4], keys.table(), 0.3)
    monkeypatch.setattr(StreamKeys, "table", no_table)
    with pinned_backend("triton"):
        kernels.mask_(actual, [0, 4], keys, 0.3, "bernoulli")
    assert len(launches.grids) == 1
    for got, want in zip(actual, expected):
        assert torch.equal(bits(got), bits(want))


def test_dropgrad_steps_on_the_keyed_kernel_match_the_reference(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Whole training steps, gradients freed and reallocated between them."""
    builds = CountingBuilds(monkeypatch)
    trained = {}
    for backend in ("reference", "triton"):
        if backend == "triton":  # the keys reach the kernel described, never tabulated
            monkeypatch.setattr(StreamKeys, "table", no_table)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.Linear(30, 2))
        optimizer = DropGrad(torch.optim.SGD(model.parameters(), lr=0.1), drop_rate=0.3, seed=11)
        with pinned_backend(backend):
            for _ in range(3):
                model(torch.randn(8, 40)).square().sum().backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        trained[backend] = [p.detach().clone() for p in model.parameters()]
    assert 1 <= builds.count <= 3  # one per layout the gradients took
    for got, want in zip(trained["triton"], trained["reference"]):
        assert torch.equal(bits(got), bits(want))


def test_bad_arguments_are_refused() -> None:
    keys = StreamKeys(1, MASK_DOMAIN, 0, [0])
    tensor = torch.ones(4)
    with pytest.raises(ValueError, match=r"threshold must be in \[1, 65535\], got 0"):
        triton_mask.bernoulli_keyed_([tensor], [0], keys, 0, 1.0)
    with pytest.raises(ValueError, match=r"threshold must be in \[1, 65535\], got 65536"):
        triton_mask.bernoulli_([tensor], [0], key_table([stream_key(1, 2, 3, 4)]), 65536, 1.0)
    with pytest.raises(TypeError, match="threshold must be an int, got float 0.5"):
        triton_mask.bernoulli_keyed_([tensor], [0], keys, 0.5, 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"one entry per tensor \(1\), got 2 starts and 1 keys"):
        triton_mask.bernoulli_keyed_([tensor], [0, 0], keys, 7, 1.0)
    with pytest.raises(ValueError, match=r"one entry per tensor \(2\), got 2 starts and 1 keys"):
        triton_mask.bernoulli_([tensor, tensor], [0, 0], torch.tensor([[1, 2]]), 7, 1.0)
    triton_mask.bernoulli_keyed_([], [], keys._replace(positions=[]), 7, 1.0)  # nothing to do
    assert torch.equal(tensor, torch.ones(4))


def test_factor_rounding_matches_torch_and_reaches_the_kernel_exactly() -> None:
    generator = torch.Generator().manual_seed(0)
    for factor in (torch.rand(50, dtype=torch.float64, generator=generator) * 4).tolist():
        as_float32 = torch.tensor(factor, dtype=torch.float32).item()
        assert triton_mask.multiplication_factor(factor, torch.float16) == as_float32
        assert triton_mask.multiplication_factor(factor, torch.float64) == factor
    assert triton_mask.multiplication_factor(1e300, torch.float32) == float("inf")
    assert triton_mask.multiplication_factor(-1e300, torch.bfloat16) == float("-inf")
    bits64 = triton_mask.factor_bits(1 / 3, torch.float64)
    assert 0 <= bits64 < 2**64
    assert torch.tensor([bits64 - 2**64 * (bits64 >= 2**63)]).view(torch.float64).item() == 1 / 3
