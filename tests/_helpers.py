"""Helpers shared by the test modules."""

from __future__ import annotations

import torch

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
