"""On a GPU, masks are bit-identical to the CPU's: the same keyed bits, the same rescaling.

Skipped where CUDA is not available (CI has no GPU); run on a machine with one.
Both CUDA backends are checked, pinned with ``DROPGRAD_BACKEND``: the fused
Triton kernel, and the torch-op backend used when Triton is missing.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from dropgrad import DropGrad, drop_grad, kernels
from dropgrad._random import MASK_DOMAIN, StreamKeys, stream_key, stream_key_table
from dropgrad.kernels import _triton

from ._helpers import key_table, mask_with, pinned_backend

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64]
SIZES = [1, 2, 3, 1023, 4097, 1_000_003]
STARTS = [0, 1, 2**32 - 3, 2**33 + 1]


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The bytes of ``tensor``, with every NaN written as one canonical NaN.

    A GPU's arithmetic returns its own canonical NaN where the CPU keeps the
    input's payload; which elements are NaN must still agree exactly.
    """
    tensor = tensor.detach().cpu().contiguous().reshape(-1)
    if tensor.is_floating_point():
        tensor = torch.where(tensor.isnan(), torch.full_like(tensor, float("nan")), tensor)
    return tensor.view(torch.uint8)


def _with_specials(size: int, dtype: torch.dtype) -> torch.Tensor:
    values = torch.randn(size, dtype=torch.float64, generator=torch.Generator().manual_seed(size))
    values = values.to(dtype)
    if size > 3 and not dtype.is_complex:
        values[:3] = torch.tensor([float("inf"), float("nan"), -0.0], dtype=torch.float64)
    return values


def needs_backend(name: str) -> None:
    if not kernels.backend_available(name):
        pytest.skip(f"backend {name!r} is not available here: {kernels.status()[name]}")


class CountingKernel:
    """Stands in for the jitted Triton kernel and counts its launches."""

    def __init__(self, kernel: object) -> None:
        self.kernel = kernel
        self.grids: list[tuple[int, ...]] = []

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., object]:
        self.grids.append(grid)
        return self.kernel[grid]  # type: ignore[index]


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> CountingKernel:
    needs_backend("triton")
    counting = CountingKernel(_triton._load_kernel())
    monkeypatch.setitem(_triton._kernel_cache, "kernel", counting)
    return counting


@pytest.mark.parametrize("backend", ["triton", "torch"], ids=["triton", "torch-ops"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("start", STARTS)
def test_bernoulli_cuda_matches_cpu(
    backend: str, dtype: torch.dtype, size: int, start: int
) -> None:
    # Pinned, the Triton backend still leaves what it cannot take (complex) to torch ops.
    needs_backend(backend)
    key = key_table([stream_key(2026, MASK_DOMAIN, 5, 3)])
    cpu = _with_specials(size, dtype)
    cuda = cpu.cuda()
    mask_with("auto", [cpu], [start], key, 0.3, scale=1.25)
    mask_with(backend, [cuda], [start], key, 0.3, scale=1.25)
    assert torch.equal(_bits(cuda), _bits(cpu))


def test_cuda_buckets_go_to_the_triton_kernel_by_default(launches: CountingKernel) -> None:
    """Unpinned, a CUDA bucket of real tensors is one launch; Gaussian noise and complex
    tensors, which the kernel does not take, go to torch ops."""
    keys = stream_key_table(2026, MASK_DOMAIN, 1, [0, 1])
    tensors = [torch.randn(5000, device="cuda"), torch.randn(70, 30, device="cuda").t()]
    expected = [t.cpu() for t in tensors]
    mask_with("auto", tensors, [0, 9], keys, 0.3)
    mask_with("reference", expected, [0, 9], keys, 0.3)
    assert len(launches.grids) == 1
    assert not tensors[1].is_contiguous()  # masked through a copy, written back
    for got, want in zip(tensors, expected):
        assert torch.equal(_bits(got), _bits(want))
    mask_with("auto", [torch.ones(64, device="cuda")], [0], keys[:1], 0.3, "gaussian")
    complex_values = torch.ones(64, dtype=torch.complex64, device="cuda")
    mask_with("auto", [complex_values], [0], keys[:1], 0.3)
    assert len(launches.grids) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_one_launch_over_many_tensors_matches_cpu(dtype: torch.dtype) -> None:
    """A bucket of tensors of many sizes, masked by one launch at several steps in a row
    (each step's tables are copied while the previous step's kernel may still run)."""
    sizes = [0, 1, 3, 1023, 1024, 1025, 70_001, 5, 2**20 + 3]
    cpu = [_with_specials(n, dtype) for n in sizes]
    cuda = [t.cuda() for t in cpu]
    starts = [3 * row for row in range(len(sizes))]
    for step in range(3):
        keys = stream_key_table(2026, MASK_DOMAIN, step, list(range(len(sizes))))
        for tensors in (cpu, cuda):
            kernels.mask_(tensors, starts, keys, 0.3, "bernoulli", scale=1.25)
    for got, want in zip(cuda, cpu):
        assert torch.equal(_bits(got), _bits(want))


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str
)
def test_keys_derived_in_the_kernel_match_cpu(launches: CountingKernel, dtype: torch.dtype) -> None:
    """Described keys (what a DropGrad step passes) reach the kernel as they are, at
    steps 1 and 16 and past 2**63, with seeds near 2**64, positions past 2**32 and up
    to 2**64 - 1 and starts past 2**32: the bits are the CPU reference's."""
    sizes = [0, 1, 3, 1025, 70_001, 5]
    starts = [0, 7, 2**32 - 1, 2**33 + 1, 9, 2**40]
    positions = [0, 1, 2**32 + 1, 2**63 - 1, 2**63, 2**64 - 1]
    cpu = [_with_specials(n, dtype) for n in sizes]
    cuda = [t.cuda() for t in cpu]
    for seed, step in ((2**64 - 1, 1), (2**64 - 3, 16), (5, 2**63 + 7)):
        keys = StreamKeys(seed, MASK_DOMAIN, step, positions)
        mask_with("reference", cpu, starts, keys.table(), 0.3, scale=1.25)
        with pinned_backend("triton"):
            kernels.mask_(cuda, starts, keys, 0.3, "bernoulli", scale=1.25)
    assert len(launches.grids) == 3
    for got, want in zip(cuda, cpu):
        assert torch.equal(_bits(got), _bits(want))


def test_a_steady_keyed_mask_copies_nothing_and_never_waits(launches: CountingKernel) -> None:
    """Once a bucket's launch table is cached (the first mask of its layout), a mask is
    the launch alone: no host-to-device copy, no host synchronisation, no aten op."""
    from torch.profiler import ProfilerActivity, profile

    tensors = [torch.randn(5000, device="cuda"), torch.randn(3, device="cuda")]

    def mask(step: int) -> None:
        keys = StreamKeys(2026, MASK_DOMAIN, step, [0, 1])
        kernels.mask_(tensors, [0, 0], keys, 0.3, "bernoulli")

    mask(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as recorded:
            mask(1)
            mask(2)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    names = [event.name for event in recorded.events()]
    assert not [name for name in names if "HtoD" in name or "Memcpy" in name]
    assert not [name for name in names if name.startswith("aten::")]
    assert len(launches.grids) == 3


def test_each_stream_reads_a_launch_table_copied_on_it(launches: CountingKernel) -> None:
    """A cached launch table is only read on the stream it was copied on: masking on
    another stream copies one there, and the bits are the same."""
    tensors = [torch.randn(3000, device="cuda")]
    expected = [t.cpu() for t in tensors]
    keys = StreamKeys(7, MASK_DOMAIN, 3, [0])
    mask_with("reference", expected, [0], keys.table(), 0.3)
    mask_with("reference", expected, [0], keys.table(), 0.3)
    kernels.mask_(tensors, [0], keys, 0.3, "bernoulli")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        kernels.mask_(tensors, [0], keys, 0.3, "bernoulli")
    torch.cuda.current_stream().wait_stream(side)
    assert len(launches.grids) == 2
    streams = {layout[1] for layout in _triton._table_cache}
    assert side.cuda_stream in streams and len(streams) >= 2
    assert torch.equal(_bits(tensors[0]), _bits(expected[0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_gaussian_cuda_matches_cpu_to_rounding(dtype: torch.dtype) -> None:
    # Box-Muller's log and cos are not correctly rounded on either device.
    key = key_table([stream_key(2026, MASK_DOMAIN, 5, 3)])
    cpu = torch.ones(100_003, dtype=dtype)
    cuda = cpu.cuda()
    kernels.mask_([cpu], [7], key, 0.3, "gaussian")
    kernels.mask_([cuda], [7], key, 0.3, "gaussian")
    # Relative to the noise (about 1): absolute differences of a few float ulps.
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=0, atol=8 * torch.finfo(dtype).eps)


@pytest.mark.parametrize("granularity", ["element", "row", "tensor"])
def test_dropgrad_masked_gradients_match_across_devices(granularity: str) -> None:
    seen: dict[str, list[torch.Tensor]] = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(33, 65), torch.nn.Linear(65, 7)).to(device)
        base = torch.optim.SGD(model.parameters(), lr=0.0)
        opt = DropGrad(base, drop_rate=0.4, granularity=granularity, seed=11)
        grads: list[torch.Tensor] = []

        def record(optimizer: torch.optim.Optimizer, *_: object, into: list = grads) -> None:
            into.extend(p.grad.detach().cpu().clone() for p in optimizer.param_groups[0]["params"])

        base.register_step_pre_hook(record)
        generator = torch.Generator().manual_seed(1)
        for _ in range(3):
            for param in model.parameters():
                param.grad = torch.randn(param.shape, generator=generator).to(device)
            opt.step()
        seen[device] = grads
    for cpu_grad, cuda_grad in zip(seen["cpu"], seen["cuda"]):
        assert torch.equal(_bits(cpu_grad), _bits(cuda_grad))


def test_functional_keyed_form_matches_across_devices() -> None:
    tensor = torch.randn(10_001)
    expected = drop_grad(tensor, 0.25, seed=3, step=4, index=5)
    actual = drop_grad(tensor.cuda(), 0.25, seed=3, step=4, index=5)
    assert torch.equal(_bits(actual), _bits(expected))


def test_checkpoint_loaded_onto_the_gpu_resumes_exactly() -> None:
    """The Hugging Face Trainer loads optimizer checkpoints with map_location=<its GPU>."""
    import io

    def build() -> tuple[torch.nn.Module, DropGrad]:
        torch.manual_seed(0)
        model = torch.nn.Linear(40, 9).cuda()
        opt = DropGrad(torch.optim.AdamW(model.parameters(), lr=1e-2), drop_rate=0.3, seed=4)
        return model, opt

    def train(model: torch.nn.Module, opt: DropGrad, steps: range) -> None:
        for step in steps:
            generator = torch.Generator().manual_seed(step)
            inputs = torch.randn(16, 40, generator=generator).cuda()
            model(inputs).square().mean().backward()
            opt.step()
            opt.zero_grad()

    model, opt = build()
    train(model, opt, range(3))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    train(model, opt, range(3, 6))
    buffer.seek(0)
    saved = torch.load(buffer, map_location="cuda:0", weights_only=True)
    resumed_model, resumed_opt = build()
    resumed_model.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["opt"])
    train(resumed_model, resumed_opt, range(3, 6))
    for resumed, uninterrupted in zip(resumed_model.parameters(), model.parameters()):
        assert torch.equal(resumed, uninterrupted)


class _ScalerUnscales(DropGrad):
    """DropGrad as GradScaler would see it without the pass-through: it unscales itself."""

    _step_supports_amp_scaling = False


def _amp_run(wrapper: type[DropGrad], name: str, **options: object) -> tuple[list, int]:
    """Six steps of a fused CUDA optimizer under GradScaler("cuda"), an inf at step 3."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)
    ).cuda()
    inner = getattr(torch.optim, name)(model.parameters(), lr=0.05, fused=True)
    opt = wrapper(inner, drop_rate=0.3, seed=11, **options)  # type: ignore[arg-type]
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10)
    generator = torch.Generator().manual_seed(100)
    for step in range(6):
        opt.zero_grad()
        batch = torch.randn(8, 4, generator=generator).cuda()
        scaler.scale(model(batch).pow(2).mean()).backward()
        if step == 3:
            with torch.no_grad():
                model[0].weight.grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
    return [p.detach().cpu() for p in model.parameters()], opt.step_count


@pytest.mark.parametrize("options", [{}, {"target": "update"}, {"full_update_drop": 0.3}])
@pytest.mark.parametrize("name", ["Adam", "AdamW", "SGD"])
def test_fused_amp_pass_through_matches_gradscaler_unscaling(name: str, options: dict) -> None:
    passed, passed_steps = _amp_run(DropGrad, name, **options)
    unscaled, unscaled_steps = _amp_run(_ScalerUnscales, name, **options)
    # The inf step is left out on both paths: five counted steps of six.
    assert passed_steps == unscaled_steps == 5
    for a, b in zip(passed, unscaled):
        assert torch.equal(a, b)


def test_capturing_a_step_in_a_cuda_graph_is_refused() -> None:
    param = torch.nn.Parameter(torch.ones(64, device="cuda"))
    opt = DropGrad(torch.optim.SGD([param], lr=0.1), drop_rate=0.3, seed=1)
    param.grad = torch.ones_like(param)
    opt.step()  # warm-up outside the capture, as CUDA graphs need
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        with torch.cuda.graph(graph):
            opt.step()
    assert opt.step_count == 1
