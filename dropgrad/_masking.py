"""Mask kernels: where gradient elements are dropped and survivors rescaled.

Random bits are drawn as 64-bit words and read as four 16-bit *lanes*, one lane
per gradient element. An element is dropped when its lane falls below a
threshold ``t = round(p * 65536)``, so the realized drop probability is exactly
``t / 65536`` (within ``2**-17`` of the requested ``p``) and survivors are scaled
by ``65536 / (65536 - t)``, the inverse of the keep probability actually
realized. The expected gradient is therefore unchanged exactly, not just
approximately.

Two implementations of the Bernoulli mask live here:

* :func:`bernoulli_reference_` draws the lanes for a whole bucket of tensors at
  once and masks each tensor with plain ops. It is simple and always correct.
* :func:`bernoulli_chunked_` streams the same lanes in fixed-size chunks and
  masks many small tensors with one ``cat``/``masked_fill_``/``_foreach_copy_``
  round trip per chunk. Temporaries stay at ``CHUNK_LANES`` elements whatever the
  parameter size, and the number of launched ops no longer grows with the number
  of tensors. On CPU, word draws are sequential and chunk sizes are multiples
  of four lanes, so both implementations consume the generator identically and
  produce bit-identical gradients; the tests hold the fast path to that.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

__all__ = [
    "CHUNK_LANES",
    "LANE_LEVELS",
    "bernoulli_chunked_",
    "bernoulli_reference_",
    "draw_drop_mask",
    "gaussian_",
    "gaussian_noise",
    "quantize_rate",
]

LANE_LEVELS = 1 << 16
_LANES_PER_WORD = 4
# Lanes are read as signed int16, so thresholds are shifted by half the range.
_LANE_OFFSET = 1 << 15
# 2**20 lanes per chunk: 2 MiB of random words, 1 MiB of mask and at most one
# chunk-sized copy of the packed small gradients (4 MiB in float32).
CHUNK_LANES = 1 << 20
assert CHUNK_LANES % _LANES_PER_WORD == 0  # keeps chunked and one-shot draws aligned


def quantize_rate(rate: float) -> tuple[int, float]:
    """Threshold on 16-bit lanes for ``rate`` and the survivor scale it implies.

    Returns:
        ``(threshold, keep_scale)`` where ``threshold / 65536`` is the realized
        drop probability and ``keep_scale = 65536 / (65536 - threshold)``
        (``inf`` when every element is dropped).
    """
    threshold = round(rate * LANE_LEVELS)
    if threshold >= LANE_LEVELS:
        return LANE_LEVELS, math.inf
    return threshold, LANE_LEVELS / (LANE_LEVELS - threshold)


def _draw_lanes(count: int, device: torch.device, generator: torch.Generator | None) -> Tensor:
    """``count`` uniform 16-bit lanes (int16), from ``ceil(count / 4)`` 64-bit words."""
    words = torch.empty(-(-count // _LANES_PER_WORD), dtype=torch.int64, device=device)
    # from=-2**63 with no upper bound asks for the full 64-bit range: every lane uniform.
    words.random_(-(2**63), None, generator=generator)
    return words.view(torch.int16)[:count]


def draw_drop_mask(
    shape: torch.Size, threshold: int, device: torch.device, generator: torch.Generator | None
) -> Tensor:
    """Boolean tensor of ``shape``, each element True with probability ``threshold / 65536``."""
    count = math.prod(shape)
    return _draw_lanes(count, device, generator).view(shape) < threshold - _LANE_OFFSET


def _trivial_(tensors: Sequence[Tensor], threshold: int, scale: float) -> bool:
    """Handle rates that need no random numbers; True when nothing is left to do.

    A rate that rounds to zero draws nothing (so rate 0 is bit-identical to not
    wrapping), and a rate of one zeroes the tensors instead of multiplying by
    ``inf``, which would turn zeros into NaN.
    """
    if threshold == 0:
        if scale != 1.0:
            torch._foreach_mul_(list(tensors), scale)
        return True
    if threshold == LANE_LEVELS:
        torch._foreach_zero_(list(tensors))
        return True
    return False


def bernoulli_reference_(
    tensors: Sequence[Tensor],
    rate: float,
    generator: torch.Generator | None,
    scale: float = 1.0,
) -> None:
    """Drop elements of ``tensors`` in place with probability ``rate``; the plain path.

    Args:
        tensors: dense tensors of one dtype on one device (any strides).
        rate: drop probability in ``[0, 1]``.
        generator: source of the lanes (``None``: the device's default generator).
        scale: extra factor applied to every element (full update drop uses it).
    """
    threshold, keep_scale = quantize_rate(rate)
    if _trivial_(tensors, threshold, scale):
        return
    total = sum(t.numel() for t in tensors)
    lanes = _draw_lanes(total, tensors[0].device, generator)
    factor = scale * keep_scale
    offset = 0
    for tensor in tensors:
        count = tensor.numel()
        drop = lanes[offset : offset + count].view(tensor.shape) < threshold - _LANE_OFFSET
        tensor.masked_fill_(drop, 0).mul_(factor)
        offset += count


def _chunks(flats: Sequence[Tensor], chunk_lanes: int) -> Iterator[list[Tensor]]:
    """Split the concatenation of 1-D ``flats`` into pieces of at most ``chunk_lanes`` elements."""
    pieces: list[Tensor] = []
    filled = 0
    for flat in flats:
        start, size = 0, flat.numel()
        while start < size:
            take = min(chunk_lanes - filled, size - start)
            pieces.append(flat[start : start + take])
            filled += take
            start += take
            if filled == chunk_lanes:
                yield pieces
                pieces, filled = [], 0
    if pieces:
        yield pieces


def _map_chunks_(
    tensors: Sequence[Tensor],
    chunk_lanes: int,
    op: Callable[[Tensor, int], None],
) -> None:
    """Run ``op(buffer, count)`` on consecutive chunks of the tensors' elements, in place.

    A chunk that lies inside one tensor is a view of it. A chunk made of several
    small tensors is packed into one buffer with ``cat`` and written back with a
    single ``_foreach_copy_``, so a thousand small gradients cost a handful of
    ops. Non-contiguous tensors are masked through a contiguous copy.
    """
    flats: list[Tensor] = []
    copied: list[tuple[Tensor, Tensor]] = []
    for tensor in tensors:
        if tensor.is_contiguous():
            flats.append(tensor.view(-1))
        else:
            flat = tensor.contiguous().view(-1)
            copied.append((tensor, flat))
            flats.append(flat)
    for pieces in _chunks(flats, chunk_lanes):
        count = sum(piece.numel() for piece in pieces)
        if len(pieces) == 1:
            op(pieces[0], count)
            continue
        packed = torch.cat(pieces)
        op(packed, count)
        torch._foreach_copy_(pieces, list(packed.split([p.numel() for p in pieces])))
    for tensor, flat in copied:
        tensor.copy_(flat.view(tensor.shape))


def bernoulli_chunked_(
    tensors: Sequence[Tensor],
    rate: float,
    generator: torch.Generator | None,
    scale: float = 1.0,
    chunk_lanes: int = CHUNK_LANES,
) -> None:
    """Same result as :func:`bernoulli_reference_`, with bounded memory and few ops.

    ``chunk_lanes`` must be a positive multiple of 4 for the two paths to agree.
    """
    threshold, keep_scale = quantize_rate(rate)
    if _trivial_(tensors, threshold, scale):
        return
    factor = scale * keep_scale
    cutoff = threshold - _LANE_OFFSET
    device = tensors[0].device

    def mask_(buffer: Tensor, count: int) -> None:
        drop = _draw_lanes(count, device, generator) < cutoff
        buffer.masked_fill_(drop, 0).mul_(factor)

    _map_chunks_(tensors, chunk_lanes, mask_)


def _noise_dtype(dtype: torch.dtype) -> torch.dtype:
    """Real dtype noise is drawn in: float64 for double types, float32 otherwise."""
    return torch.float64 if dtype in (torch.float64, torch.complex128) else torch.float32


def gaussian_noise(
    shape: torch.Size,
    rate: float,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator | None,
) -> Tensor:
    """Multiplicative noise from N(1, rate / (1 - rate)) for a tensor of ``dtype``; ``rate < 1``."""
    noise = torch.empty(shape, dtype=_noise_dtype(dtype), device=device)
    return noise.normal_(1.0, math.sqrt(rate / (1.0 - rate)), generator=generator)


def gaussian_(
    tensors: Sequence[Tensor],
    rate: float,
    generator: torch.Generator | None,
    scale: float = 1.0,
    chunk_lanes: int = CHUNK_LANES,
) -> None:
    """Multiply ``tensors`` in place by noise from N(1, rate / (1 - rate)).

    The variance matches that of the Bernoulli mask with the same rate (Tseng et
    al., 2020). Rate 0 leaves the tensors untouched (times ``scale``) and draws
    nothing; rate 1 zeroes them.
    """
    if rate == 0.0:
        _trivial_(tensors, 0, scale)
        return
    if rate == 1.0:
        _trivial_(tensors, LANE_LEVELS, scale)
        return
    dtype, device = tensors[0].dtype, tensors[0].device

    def multiply_(buffer: Tensor, count: int) -> None:
        noise = gaussian_noise(torch.Size([count]), rate, dtype, device, generator)
        if scale != 1.0:
            noise.mul_(scale)
        buffer.mul_(noise)

    _map_chunks_(tensors, chunk_lanes, multiply_)
