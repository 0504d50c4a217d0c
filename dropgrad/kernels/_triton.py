"""The Bernoulli keyed mask as one fused Triton kernel, for CUDA tensors.

The torch-op backend (``_torch_ops.py``) builds the mask in about fifteen elementwise
passes (an affine index, eleven hash ops, the keep mask, the AND and the scale),
each reading and writing memory. On a GPU that traffic is the whole cost, so
this kernel does everything in registers: each program loads a block of a
gradient, computes every element's word index, hashes it, picks the element's
16-bit lane, compares it with the threshold and stores either the scaled
element or +0, in one pass.

One launch masks a whole list of tensors of one dtype on one device (a step's
bucket), the way torch's foreach and fused optimizers take all parameters at
once. It reads one int64 table, copied to the device once per call (see
:func:`launch_table`): the survivors' factor, then each tensor's address, size,
first global index and stream key, then each program's tensor and offset. A
step over a thousand small gradients is then one launch rather than a
thousand, which on a GPU is what the time went to.

It computes exactly the reference masks (``_reference.py``), bit for bit:

* word ``w = i >> 1`` of the element's global index ``i`` (taken modulo
  ``2**32``), hash input ``b + a * w`` and the ``lowbias32`` hash, all in
  unsigned 32-bit arithmetic;
* lane value ``v = ((h >> 16 * (i & 1)) & 0xFFFF) ^ 0x8000`` (the signed lane
  plus 32768, see ``_reference.lanes_reference``), dropped when ``v < threshold``;
* survivors multiplied by the factor in float32 for 16- and 32-bit inputs (the
  factor rounded to float32 first) and in float64 for float64, as torch's
  ``mul_`` by a Python float does; dropped elements become +0, NaN and inf too.

Triton is imported lazily, on the first CUDA mask, so ``import dropgrad`` never
needs it; where it is missing the torch-op backend runs instead. The kernel is
tested on CPU through Triton's interpreter: with ``TRITON_INTERPRET=1`` this
backend also accepts CPU tensors, when it is pinned (``DROPGRAD_BACKEND=triton``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["accepts", "bernoulli_", "launch_table", "multiplication_factor", "unavailable"]

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
        table_ptr,
        blocks_ptr,
        threshold,
        WIDE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # Block `program` covers elements [first, first + BLOCK) of tensor `row`.
        program = tl.program_id(0).to(tl.int64)
        row = tl.load(blocks_ptr + 2 * program)
        first = tl.load(blocks_ptr + 2 * program + 1)
        entry = table_ptr + 1 + 5 * row  # see launch_table
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
        # The factor arrives as float64 bits, already rounded to the multiplication's
        # precision: float64 for float64 values (WIDE), float32 (torch's opmath) for
        # everything narrower, to which it converts exactly.
        factor = tl.load(table_ptr).to(tl.float64, bitcast=True)
        if not WIDE:
            factor = factor.to(tl.float32)
        scaled = values.to(factor.dtype) * factor
        # Round to nearest even, as torch does (the interpreter would truncate otherwise).
        result = tl.where(keep, scaled, 0.0).to(values.dtype, fp_downcast_rounding="rtne")
        tl.store(values_ptr + positions, result, mask=inside)

    _kernel_cache["kernel"] = keyed_bernoulli_kernel
    return keyed_bernoulli_kernel


def unavailable() -> str | None:
    """``None`` when Triton can be imported and the kernel built, else why not."""
    return None if _load_kernel() is not None else "off: Triton cannot be imported"


def accepts(tensors: Sequence[Tensor], distribution: str) -> bool:
    """Whether one launch of the fused kernel can mask ``tensors`` together.

    It needs a Bernoulli mask, Triton, tensors of one supported dtype (float16,
    bfloat16, float32, float64) on one CUDA device, or CPU tensors under
    Triton's interpreter (``TRITON_INTERPRET=1``, for tests). Never raises.
    """
    first = tensors[0]
    if distribution != "bernoulli" or first.dtype not in _SUPPORTED_DTYPES:
        return False
    if not first.is_cuda and not (
        first.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
    ):
        return False
    if len(tensors) > 1 and (
        len({t.dtype for t in tensors}) > 1 or len({t.device for t in tensors}) > 1
    ):
        return False  # every address is read as the first tensor's type, on its device
    return _load_kernel() is not None


def multiplication_factor(factor: float, dtype: torch.dtype) -> float:
    """``factor`` rounded to the precision torch's ``mul_`` by a Python float uses for
    ``dtype``: float64 for float64, float32 (the opmath type) for narrower types."""
    if dtype == torch.float64:
        return float(factor)
    return torch.tensor(factor, dtype=torch.float32).item()


def launch_table(
    tensors: Sequence[Tensor],
    starts: Sequence[int],
    keys: Tensor,
    factor: float,
    block: int = _BLOCK,
) -> tuple[Tensor, int]:
    """Everything one launch reads, as one int64 CPU tensor, and where its block rows begin.

    Layout: element 0 holds the factor's float64 bits (already rounded, see
    :func:`multiplication_factor`); then one row of five per tensor (address,
    size, first global index, key ``a``, key ``b``); then, from the returned
    position on, one row of two per program (the tensor's row, the offset of the
    program's first element in it), ``ceil(size / block)`` rows per tensor and
    none for an empty one. One buffer, so one copy reaches the device.
    """
    sizes = [t.numel() for t in tensors]
    columns = torch.tensor(
        [[t.data_ptr() for t in tensors], sizes, list(starts)], dtype=torch.int64
    )
    rows_of_tensors = torch.cat((columns.t(), keys.reshape(-1, 2).to(torch.int64)), dim=1)
    counts = (torch.tensor(sizes, dtype=torch.int64) + block - 1) // block
    rows = torch.repeat_interleave(torch.arange(len(tensors)), counts)
    firsts = torch.cumsum(counts, 0) - counts  # each tensor's first program
    offsets = (torch.arange(rows.numel()) - firsts[rows]) * block
    factor_bits = torch.tensor([factor], dtype=torch.float64).view(torch.int64)
    table = torch.cat(
        (factor_bits, rows_of_tensors.reshape(-1), torch.stack((rows, offsets), dim=1).reshape(-1))
    )
    return table, 1 + 5 * len(tensors)


def bernoulli_(
    tensors: Sequence[Tensor],
    starts: Sequence[int],
    keys: Tensor,
    threshold: int,
    factor: float,
) -> None:
    """Mask contiguous tensors of one dtype on one device in place, in one launch.

    Args:
        tensors: contiguous tensors that :func:`accepts` takes.
        starts: each tensor's first global index in its parameter.
        keys: int64, shape ``(len(tensors), 2)``: each tensor's key ``a, b``.
        threshold: lane values below it are dropped, in ``[1, 65535]``.
        factor: what survivors are multiplied by (rounded here as torch's ``mul_`` would).
    """
    if not tensors or not any(t.numel() for t in tensors):
        return
    dtype = tensors[0].dtype
    table, blocks_at = launch_table(tensors, starts, keys, multiplication_factor(factor, dtype))
    device = tensors[0].device
    kernel = _load_kernel()
    # The copy and the launch go to the tensors' device and its current stream, so the
    # kernel is ordered after the copy even when another device is the current one.
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        if device.type == "cuda":
            # Pinned memory lets the copy queue behind the work before it without
            # stalling the host; torch's caching host allocator keeps the buffer until
            # the copy is done.
            table = table.pin_memory().to(device, non_blocking=True)
        kernel[((table.numel() - blocks_at) // 2,)](
            tensors[0],
            table,
            table[blocks_at:],
            threshold,
            WIDE=dtype == torch.float64,
            BLOCK=_BLOCK,
        )
