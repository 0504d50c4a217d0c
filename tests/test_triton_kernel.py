"""The fused Triton mask kernel, run on CPU tensors by Triton's interpreter.

The kernel is what CUDA tensors are masked with; here it must give bit for bit
what the torch-op path gives (and so what the reference path gives), for every
dtype it takes, odd sizes, odd and 64-bit start offsets, and NaN and inf. Whole
buckets go through the dispatcher with the backend pinned
(``DROPGRAD_BACKEND=triton``), which accepts CPU tensors under the interpreter.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

pytest.importorskip("triton")

from dropgrad import DropGrad, kernels  # noqa: E402
from dropgrad._random import MASK_DOMAIN, stream_key  # noqa: E402
from dropgrad.kernels import _triton as triton_mask  # noqa: E402
from dropgrad.kernels._reference import LANE_LEVELS  # noqa: E402

from ._helpers import key_table, mask_with, triton_mask_one_  # noqa: E402

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


@pytest.fixture(autouse=True)
def interpreter(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Run the kernel under the interpreter, jitted afresh for it."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton_mask, "_kernel_cache", {})
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


def test_launch_table_lists_the_factor_every_tensor_and_every_block() -> None:
    flats = [torch.empty(n) for n in (5, 0, 2048, 2049)]
    keys = torch.tensor([[1, 2], [3, 4], [5, 6], [7, 8]])
    table, blocks_at = triton_mask.launch_table(flats, [0, 1, 2, 3], keys, 1.25, block=1024)
    assert table.dtype == torch.int64 and blocks_at == 1 + 5 * 4
    assert table[:1].view(torch.float64).item() == 1.25
    assert table[1:blocks_at].view(-1, 5).tolist() == [
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
