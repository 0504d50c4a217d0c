"""The Bernoulli keyed mask as one fused Triton kernel, for CUDA tensors.

The torch-op path of ``_masking.py`` builds the mask in about fifteen elementwise
passes (an affine index, eleven hash ops, the keep mask, the AND and the scale),
each reading and writing memory. On a GPU that traffic is the whole cost, so
this kernel does everything in registers: each program loads a block of a
gradient, computes every element's word index, hashes it, picks the element's
16-bit lane, compares it with the threshold and stores either the scaled
element or +0, in one pass.

One launch masks a whole list of tensors of one dtype (a step's bucket), the
way torch's foreach and fused optimizers take all parameters at once: a small
int64 table, copied to the device once per call, holds each tensor's address,
size, first global index and stream key, and a second one each program's
tensor and offset. A step over a thousand small gradients is then one launch
rather than a thousand, which on a GPU is what the time went to.

It computes exactly what the torch-op path computes, bit for bit:

* word ``w = i >> 1`` of the element's global index ``i`` (taken modulo
  ``2**32``), hash input ``b + a * w`` and the ``lowbias32`` hash, all in
  unsigned 32-bit arithmetic;
* lane value ``v = ((h >> 16 * (i & 1)) & 0xFFFF) ^ 0x8000`` (the signed lane
  plus 32768, see ``lanes_reference``), dropped when ``v < threshold``;
* survivors multiplied by the factor in float32 for 16- and 32-bit inputs (the
  factor rounded to float32 first) and in float64 for float64, as torch's
  ``mul_`` by a Python float does; dropped elements become +0, NaN and inf too.

Triton is imported lazily, on the first CUDA mask, so ``import dropgrad`` never
needs it; where it is missing the torch-op path runs instead. The kernel is
tested on CPU through Triton's interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ._random import StreamKey

__all__ = [
    "bernoulli_keyed_triton_",
    "bernoulli_multi_triton_",
    "factor_tensor",
    "launch_tables",
    "triton_usable",
]

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_BLOCK = 1024
_kernel_cache: dict[str, Any] = {}


def _load_kernel() -> Any:
    """The jitted kernel, built on first use; ``None`` when Triton cannot be imported."""
    if "kernel" in _kernel_cache:
        return _kernel_cache["kernel"]
    try:
        import triton
        import triton.language as tl
    except Exception:  # any import failure means "no Triton": fall back to torch ops
        _kernel_cache["kernel"] = None
        return None

    # Triton reads the annotations of a jitted function: only tl.constexpr may appear.
    @triton.jit
    def keyed_bernoulli_kernel(  # type: ignore[no-untyped-def]
        typed_ptr,
        tensors_ptr,
        blocks_ptr,
        threshold,
        factor_ptr,
        BLOCK: tl.constexpr,
    ):
        # Block `program` covers elements [first, first + BLOCK) of tensor `row`.
        program = tl.program_id(0).to(tl.int64)
        row = tl.load(blocks_ptr + 2 * program)
        first = tl.load(blocks_ptr + 2 * program + 1)
        entry = tensors_ptr + 5 * row  # five columns, see launch_tables
        # The address, as an int64, becomes a pointer to the bucket's dtype.
        values_ptr = tl.load(entry).to(typed_ptr.dtype)
        count = tl.load(entry + 1)
        start = tl.load(entry + 2)
        multiplier = tl.load(entry + 3)
        offset = tl.load(entry + 4)
        positions = first + tl.arange(0, BLOCK)
        inside = positions < count
        values = tl.load(values_ptr + positions, mask=inside, other=0.0)
        index = positions + start
        word = (index >> 1).to(tl.uint32)
        # Constants as uint32 tensors, so every product wraps modulo 2**32.
        x = word * multiplier.to(tl.uint32) + offset.to(tl.uint32)
        x = x ^ (x >> 16)
        x = x * tl.full([BLOCK], 0x7FEB352D, tl.uint32)
        x = x ^ (x >> 15)
        x = x * tl.full([BLOCK], 0x846CA68B, tl.uint32)
        x = x ^ (x >> 16)
        shift = ((index & 1) * 16).to(tl.uint32)
        lane = ((x >> shift) & 0xFFFF) ^ 0x8000
        keep = lane >= threshold.to(tl.uint32)
        # The factor arrives in the multiplication's own precision: float64 for
        # float64 values, float32 (torch's opmath) for everything narrower.
        factor = tl.load(factor_ptr)
        scaled = values.to(factor.dtype) * factor
        # Round to nearest even, as torch does (the interpreter would truncate otherwise).
        result = tl.where(keep, scaled, 0.0).to(values.dtype, fp_downcast_rounding="rtne")
        tl.store(values_ptr + positions, result, mask=inside)

    _kernel_cache["kernel"] = keyed_bernoulli_kernel
    return keyed_bernoulli_kernel


def triton_usable(tensor: Tensor) -> bool:
    """Whether the fused kernel can mask ``tensor``.

    It needs Triton, a contiguous tensor of a supported dtype (float16,
    bfloat16, float32, float64), and a CUDA device, or a CPU tensor under
    Triton's interpreter (``TRITON_INTERPRET=1``, for tests). Never raises.
    """
    if tensor.dtype not in _SUPPORTED_DTYPES or not tensor.is_contiguous():
        return False
    if not tensor.is_cuda and not (
        tensor.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
    ):
        return False
    return _load_kernel() is not None


def factor_tensor(factor: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The survivors' factor as the kernel reads it: rounded to the precision torch's
    ``mul_`` uses for ``dtype`` (float64 for float64, float32 otherwise)."""
    precision = torch.float64 if dtype == torch.float64 else torch.float32
    return torch.tensor([factor], dtype=precision, device=device)


def bernoulli_keyed_triton_(
    flat: Tensor, start: int, key: StreamKey, threshold: int, factor: Tensor
) -> None:
    """Mask the contiguous 1-D ``flat`` in place with the keyed Bernoulli mask.

    Args:
        flat: a contiguous 1-D tensor (see :func:`triton_usable`).
        start: global index of ``flat[0]`` in the whole parameter (any int >= 0).
        key: the parameter's stream key at this step.
        threshold: lane values below it are dropped, in ``[1, 65535]``.
        factor: what survivors are multiplied by, from :func:`factor_tensor`.
    """
    keys = torch.tensor([[key.a, key.b]], dtype=torch.int64)
    bernoulli_multi_triton_([flat], [start], keys, threshold, factor)


def launch_tables(
    flats: Sequence[Tensor], starts: Sequence[int], keys: Tensor, block: int = _BLOCK
) -> tuple[Tensor, Tensor]:
    """The kernel's two int64 tables, on the CPU.

    Returns:
        ``(tensors, blocks)``: ``tensors`` has one row per tensor (address, size,
        first global index, key ``a``, key ``b``); ``blocks`` one row per program
        (the tensor's row, the offset of the program's first element in it),
        ``ceil(size / block)`` rows per tensor, none for an empty one.
    """
    sizes = [t.numel() for t in flats]
    columns = torch.tensor([[t.data_ptr() for t in flats], sizes, list(starts)], dtype=torch.int64)
    tensors = torch.cat((columns.t(), keys.reshape(-1, 2).to(torch.int64)), dim=1).contiguous()
    counts = (torch.tensor(sizes, dtype=torch.int64) + block - 1) // block
    rows = torch.repeat_interleave(torch.arange(len(flats)), counts)
    firsts = torch.cumsum(counts, 0) - counts  # each tensor's first program
    offsets = (torch.arange(rows.numel()) - firsts[rows]) * block
    return tensors, torch.stack((rows, offsets), dim=1).contiguous()


def bernoulli_multi_triton_(
    flats: Sequence[Tensor],
    starts: Sequence[int],
    keys: Tensor,
    threshold: int,
    factor: Tensor,
) -> None:
    """Mask contiguous 1-D tensors of one dtype and device in place, in one launch.

    Args:
        flats: contiguous 1-D tensors (see :func:`triton_usable`).
        starts: each tensor's first global index in its parameter.
        keys: int64, shape ``(len(flats), 2)``: each tensor's key ``a, b``.
        threshold: lane values below it are dropped, in ``[1, 65535]``.
        factor: what survivors are multiplied by, from :func:`factor_tensor`.
    """
    if not flats or not any(t.numel() for t in flats):
        return
    tensors, blocks = launch_tables(flats, starts, keys)
    device = flats[0].device
    if device.type == "cuda":
        # Pinned memory lets the copies run after the queued work without stalling the
        # host; torch's caching host allocator keeps the buffer until they are done.
        tensors = tensors.pin_memory().to(device, non_blocking=True)
        blocks = blocks.pin_memory().to(device, non_blocking=True)
    kernel = _load_kernel()
    kernel[(blocks.shape[0],)](
        flats[0],
        tensors,
        blocks,
        threshold,
        factor,
        BLOCK=_BLOCK,
    )
