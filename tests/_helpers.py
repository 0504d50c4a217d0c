"""Helpers shared by the test modules."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch.profiler import ProfilerActivity, profile

from dropgrad import kernels
from dropgrad._random import StreamKey
from dropgrad.kernels import _triton

#: Every gradient dtype DropGrad supports.
ALL_DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.complex64,
    torch.complex128,
]


def seeded_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_tensor(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    """Values with no zeros, so a zero in the output always means a dropped element."""
    source = torch.Generator().manual_seed(seed)
    if dtype.is_complex:
        values = torch.randn(shape, dtype=torch.complex128, generator=source)
        values += (1 + 1j) * torch.sign(values.real)
    else:
        values = torch.randn(shape, dtype=torch.float64, generator=source)
        values += torch.sign(values)
    return values.to(dtype)


def peak_temporary_bytes(run: Callable[[], None]) -> int:
    """Highest amount of CPU memory ``run`` holds at once beyond what it started with.

    Memory allocated inside a top-level op and still held when it returns is
    charged at the op's start; the later free shows up as a negative memory
    event. Allocations that live and die within one aten op are not counted:
    this measures the temporaries the Python code keeps.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as recorded:
        run()
    events = sorted(recorded.events(), key=lambda e: (e.time_range.start, -e.time_range.end))
    held = peak = 0
    open_until = -math.inf
    for event in events:
        if event.time_range.start < open_until:
            continue  # nested inside a top-level op, whose usage already includes it
        open_until = event.time_range.end
        held += event.cpu_memory_usage
        peak = max(peak, held)
    return peak


def key_table(keys: Sequence[StreamKey]) -> torch.Tensor:
    """The int64 ``(n, 2)`` key table the kernels take, from a list of stream keys."""
    return torch.tensor([[key.a, key.b] for key in keys], dtype=torch.int64).reshape(-1, 2)


@contextmanager
def pinned_backend(name: str) -> Iterator[None]:
    """Pin the mask backend (``DROPGRAD_BACKEND``) inside the block, then restore it."""
    with _environment("DROPGRAD_BACKEND", name):
        yield


@contextmanager
def _environment(variable: str, value: str) -> Iterator[None]:
    before = os.environ.get(variable)
    os.environ[variable] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[variable]
        else:
            os.environ[variable] = before


def mask_with(
    backend: str,
    values: Sequence[torch.Tensor],
    starts: Sequence[int],
    keys: torch.Tensor,
    rate: float,
    distribution: str = "bernoulli",
    scale: float = 1.0,
    indices: Sequence[torch.Tensor | None] | None = None,
) -> None:
    """``kernels.mask_`` with ``backend`` pinned (``"auto"``: the usual choice)."""
    with pinned_backend(backend):
        kernels.mask_(values, starts, keys, rate, distribution, scale=scale, indices=indices)


def triton_mask_one_(
    tensor: torch.Tensor, start: int, key: StreamKey, threshold: int, factor: float
) -> None:
    """The Triton kernel on one contiguous tensor (a bucket of one), in place."""
    _triton.bernoulli_([tensor], [start], key_table([key]), threshold, factor)
