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
once. It reads one int64 table (see :func:`launch_table`): each tensor's
address, size and first global index, then each program's tensor and offset.
A step over a thousand small gradients is then one launch rather than a
thousand, which on a GPU is what the time went to.

A step runs :func:`bernoulli_keyed_`: the kernel derives each tensor's stream
key itself, from the seed's hash, the step (both kernel arguments) and the
tensor's position (in the table), and the table is cached on the device per
bucket layout, rebuilt only when a gradient is reallocated or resized. In
steady state a step then copies nothing to the device, never waits for it and
runs no tensor op besides the launch. :func:`bernoulli_` takes the keys as a
table instead and copies a fresh launch table to the device on every call.

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
import math
import os
import struct
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .._random import StreamKeys, splitmix64

__all__ = [
    "TABLE_CACHE_SIZE",
    "accepts",
    "bernoulli_",
    "bernoulli_keyed_",
    "factor_bits",
    "launch_table",
    "multiplication_factor",
    "unavailable",
]

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_BLOCK = 1024
_MASK64 = (1 << 64) - 1
#: How many bucket layouts keep a device table (least recently used dropped first):
#: enough for the buckets of a few optimizers (one per dtype, device and rate each),
#: few enough that a run whose gradients move every step holds little device memory.
TABLE_CACHE_SIZE = 16
_kernel_cache: dict[str, Any] = {}


class _DeviceTable(NamedTuple):
    """A bucket layout's launch table on the tensors' device, its block rows (a view,
    kept so that a launch slices nothing) and the number of programs."""

    table: Tensor
    blocks: Tensor
    programs: int


_table_cache: OrderedDict[Hashable, _DeviceTable] = OrderedDict()


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

    # Scalars that change from step to step (or with a rate schedule) are not
    # specialized on, so the step being 1 or a multiple of 16 compiles nothing new.
    # Triton reads the annotations of a jitted function: only tl.constexpr may appear.
    @triton.jit(do_not_specialize=["threshold", "factor_bits", "seed_hash", "step"])
    def keyed_bernoulli_kernel(  # type: ignore[no-untyped-def]
        typed_ptr,
        table_ptr,
        blocks_ptr,
        threshold,
        factor_bits,
        seed_hash,
        step,
        KEYED: tl.constexpr,
        WIDE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # Block `program` covers elements [first, first + BLOCK) of tensor `row`.
        program = tl.program_id(0).to(tl.int64)
        row = tl.load(blocks_ptr + 2 * program)
        first = tl.load(blocks_ptr + 2 * program + 1)
        entry = table_ptr + 5 * row  # see launch_table
        # The address, as an int64, becomes a pointer to the bucket's dtype.
        values_ptr = tl.load(entry).to(typed_ptr.dtype)
        count = tl.load(entry + 1)
        start = tl.load(entry + 2)
        if KEYED:
            # The stream key of the tensor's position, as _random.stream_key computes
            # it: SplitMix64 of (seed hash ^ step), then of that ^ position, in
            # unsigned 64-bit arithmetic (every argument here is non-negative).
            key = seed_hash.to(tl.uint64) ^ step.to(tl.uint64)
            for link in tl.static_range(2):
                if link == 1:
                    key = key ^ tl.load(entry + 3).to(tl.uint64, bitcast=True)
                z = key + 0x9E3779B97F4A7C15
                z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
                z = (z ^ (z >> 27)) * 0x94D049BB133111EB
                key = z ^ (z >> 31)
            multiplier = (key & 0xFFFFFFFF).to(tl.uint32) | 1
            offset = (key >> 32).to(tl.uint32)
        else:
            multiplier = tl.load(entry + 3).to(tl.uint32)
            offset = tl.load(entry + 4).to(tl.uint32)
        positions = first + tl.arange(0, BLOCK)
        inside = positions < count
        values = tl.load(values_ptr + positions, mask=inside, other=0.0)
        index = positions + start
        word = (index >> 1).to(tl.uint32)
        # Constants as uint32 tensors, so every product wraps modulo 2**32.
        x = word * multiplier + offset
        x = x ^ (x >> 16)
        x = x * tl.full([BLOCK], 0x7FEB352D, tl.uint32)
        x = x ^ (x >> 15)
        x = x * tl.full([BLOCK], 0x846CA68B, tl.uint32)
        x = x ^ (x >> 16)
        shift = ((index & 1) * 16).to(tl.uint32)
        lane = ((x >> shift) & 0xFFFF) ^ 0x8000
        keep = lane >= threshold.to(tl.uint32)
        # The factor arrives as its float64 bits (a float argument would be float32),
        # already rounded to the multiplication's precision: float64 for float64
        # values (WIDE), float32 (torch's opmath) for everything narrower, to which it
        # converts exactly.
        factor = factor_bits.to(tl.uint64).to(tl.float64, bitcast=True)
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
    ``dtype``: float64 for float64, float32 (the opmath type) for narrower types.

    Rounded in Python (to nearest even; beyond float32's range, to an infinity), so a
    step runs no tensor op and reads no value back for it.
    """
    if dtype == torch.float64:
        return float(factor)
    try:
        return float(struct.unpack("<f", struct.pack("<f", factor))[0])
    except OverflowError:  # rounds to an infinity in float32
        return math.copysign(math.inf, factor)


def factor_bits(factor: float, dtype: torch.dtype) -> int:
    """The float64 bits of :func:`multiplication_factor`, as an int in ``[0, 2**64)``:
    what the kernel takes, since a float kernel argument would be rounded to float32."""
    rounded = multiplication_factor(factor, dtype)
    return int(struct.unpack("<Q", struct.pack("<d", rounded))[0])


def launch_table(
    tensors: Sequence[Tensor],
    starts: Sequence[int],
    columns: Tensor,
    block: int = _BLOCK,
) -> tuple[Tensor, int]:
    """Everything one launch reads but its scalars, as one int64 CPU tensor, and where
    its block rows begin.

    Layout: one row of five per tensor (address, size, first global index, then the
    two ``columns`` of the tensor's row: its key ``a, b`` for :func:`bernoulli_`, its
    position and 0 for :func:`bernoulli_keyed_`); then, from the returned position
    on, one row of two per program (the tensor's row, the offset of the program's
    first element in it), ``ceil(size / block)`` rows per tensor and none for an
    empty one. One buffer, so one copy reaches the device.
    """
    sizes = [t.numel() for t in tensors]
    addresses = torch.tensor(
        [[t.data_ptr() for t in tensors], sizes, list(starts)], dtype=torch.int64
    )
    rows_of_tensors = torch.cat((addresses.t(), columns.reshape(-1, 2).to(torch.int64)), dim=1)
    counts = (torch.tensor(sizes, dtype=torch.int64) + block - 1) // block
    rows = torch.repeat_interleave(torch.arange(len(tensors)), counts)
    firsts = torch.cumsum(counts, 0) - counts  # each tensor's first program
    offsets = (torch.arange(rows.numel()) - firsts[rows]) * block
    table = torch.cat(
        (rows_of_tensors.reshape(-1), torch.stack((rows, offsets), dim=1).reshape(-1))
    )
    return table, 5 * len(tensors)


def _check(tensors: Sequence[Tensor], starts: Sequence[int], keys: int, threshold: int) -> None:
    """Refuse arguments the kernel would misread, naming the argument and what it takes."""
    if len(starts) != len(tensors) or keys != len(tensors):
        raise ValueError(
            f"starts and keys must have one entry per tensor ({len(tensors)}), "
            f"got {len(starts)} starts and {keys} keys"
        )
    if isinstance(threshold, bool) or not isinstance(threshold, int):
        raise TypeError(f"threshold must be an int, got {type(threshold).__name__} {threshold!r}")
    if not 1 <= threshold <= 65535:
        raise ValueError(f"threshold must be in [1, 65535], got {threshold}")


def _launch(
    tensors: Sequence[Tensor],
    table: Tensor,
    blocks: Tensor,
    programs: int,
    threshold: int,
    factor: float,
    seed_hash: int = 0,
    step: int = 0,
    keyed: bool = False,
) -> None:
    """One launch over a table already on the tensors' device, on its current stream."""
    dtype, device = tensors[0].dtype, tensors[0].device
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        _load_kernel()[(programs,)](
            tensors[0],
            table,
            blocks,
            threshold,
            factor_bits(factor, dtype),
            seed_hash,
            step,
            KEYED=keyed,
            WIDE=dtype == torch.float64,
            BLOCK=_BLOCK,
        )


def bernoulli_(
    tensors: Sequence[Tensor],
    starts: Sequence[int],
    keys: Tensor,
    threshold: int,
    factor: float,
) -> None:
    """Mask contiguous tensors of one dtype on one device in place, in one launch, with
    their keys given as a table (copied to the device with the rest of the launch table
    on every call; :func:`bernoulli_keyed_` is the path that avoids that).

    Args:
        tensors: contiguous tensors that :func:`accepts` takes.
        starts: each tensor's first global index in its parameter.
        keys: int64, shape ``(len(tensors), 2)``: each tensor's key ``a, b``.
        threshold: lane values below it are dropped, in ``[1, 65535]``.
        factor: what survivors are multiplied by (rounded here as torch's ``mul_`` would).

    Raises:
        ValueError: ``starts`` or ``keys`` do not match ``tensors``, or ``threshold``
            is outside ``[1, 65535]``.
        TypeError: ``threshold`` is not an int.
    """
    keys = keys.reshape(-1, 2)
    _check(tensors, starts, keys.shape[0], threshold)
    if not any(t.numel() for t in tensors):
        return
    table, blocks_at = launch_table(tensors, starts, keys)
    device = tensors[0].device
    if device.type == "cuda":
        # Pinned memory lets the copy queue behind the work before it without stalling
        # the host; torch's caching host allocator keeps the buffer until the copy is
        # done. The copy goes to the tensors' device's current stream, as the launch.
        with torch.cuda.device(device):
            table = table.pin_memory().to(device, non_blocking=True)
    programs = (table.numel() - blocks_at) // 2
    _launch(tensors, table, table[blocks_at:], programs, threshold, factor)


def _signed64(value: int) -> int:
    """The int64 with the same 64 bits as ``value`` (positions may reach ``2**64 - 1``)."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def _device_table(
    tensors: Sequence[Tensor], starts: Sequence[int], positions: Sequence[int]
) -> _DeviceTable:
    """The keyed launch table of this bucket layout on its device, built (and copied)
    only when the layout is new: a tensor reallocated or resized (as
    ``zero_grad(set_to_none=True)`` and a fresh backward may do) is a new layout.

    The key holds every address and size, so a cached table never points at memory
    the bucket no longer uses; at most :data:`TABLE_CACHE_SIZE` layouts are kept.
    On CUDA it also holds the current stream: a table is copied, read and (once
    dropped) freed on one stream, so its copy is ordered before every launch that
    reads it and its memory is never reused while such a launch may still run.
    """
    first = tensors[0]
    stream = torch.cuda.current_stream(first.device).cuda_stream if first.is_cuda else None
    layout = (
        first.device,
        stream,
        first.dtype,
        tuple((t.data_ptr(), t.numel()) for t in tensors),
        tuple(starts),
        tuple(positions),
    )
    cached = _table_cache.get(layout)
    if cached is not None:
        _table_cache.move_to_end(layout)
        return cached
    signed = [_signed64(p) for p in positions]
    columns = torch.tensor([[p, 0] for p in signed], dtype=torch.int64).reshape(-1, 2)
    table, blocks_at = launch_table(tensors, starts, columns)
    if first.device.type == "cuda":
        # Built once per layout: a blocking copy is fine, and nothing is pinned for long.
        table = table.to(first.device)
    built = _DeviceTable(table, table[blocks_at:], (table.numel() - blocks_at) // 2)
    _table_cache[layout] = built
    while len(_table_cache) > TABLE_CACHE_SIZE:
        _table_cache.popitem(last=False)
    return built


def bernoulli_keyed_(
    tensors: Sequence[Tensor],
    starts: Sequence[int],
    keys: StreamKeys,
    threshold: int,
    factor: float,
) -> None:
    """:func:`bernoulli_` with the keys derived in the kernel, for a step that does no
    host-to-device copy, no host synchronisation and no tensor op besides the launch.

    Each tensor's key is SplitMix64 of ``step key ^ position`` (as
    :func:`~dropgrad._random.stream_key`), computed by the kernel from the seed's
    hash and the step, which are kernel arguments (plain integers, known on the host
    at every step, so nothing has to be kept or updated on the device), and the
    tensor's position, which is in the launch table. That table (addresses, sizes,
    first global indices, positions, each program's block) is cached on the device
    per bucket layout and rebuilt only when the layout changes.

    Args:
        tensors: contiguous tensors that :func:`accepts` takes.
        starts: each tensor's first global index in its parameter.
        keys: the seed, domain, step and each tensor's position (``len(tensors)`` of
            them), all in ``[0, 2**64)``.
        threshold: lane values below it are dropped, in ``[1, 65535]``.
        factor: what survivors are multiplied by (rounded here as torch's ``mul_`` would).

    Raises:
        ValueError: ``starts`` or ``keys.positions`` do not match ``tensors``, or
            ``threshold`` is outside ``[1, 65535]``.
        TypeError: ``threshold`` is not an int.
    """
    _check(tensors, starts, len(keys.positions), threshold)
    if not tensors:
        return
    device_table = _device_table(tensors, starts, keys.positions)
    if device_table.programs == 0:
        return  # only empty tensors
    seed_hash = splitmix64((keys.seed ^ keys.domain) & _MASK64)
    _launch(
        tensors,
        device_table.table,
        device_table.blocks,
        device_table.programs,
        threshold,
        factor,
        seed_hash,
        keys.step & _MASK64,
        keyed=True,
    )
