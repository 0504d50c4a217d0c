"""Mask kernels: where gradient elements are dropped and survivors rescaled.

Random bits are drawn as 64-bit words and read as four 16-bit *lanes*, one lane
per gradient element. An element is dropped when its lane falls below a
threshold ``t = round(p * 65536)`` (at most 65535 for ``p < 1``), so the realized
drop probability is exactly ``t / 65536`` (within ``2**-17`` of the requested
``p``, ``2**-16`` just below 1) and survivors are scaled
by ``65536 / (65536 - t)``, the inverse of the keep probability actually
realized. The expected gradient is therefore unchanged exactly, not just
approximately.

Two implementations of the Bernoulli mask live here:

* :func:`bernoulli_reference_` draws the lanes for a whole bucket of tensors at
  once and masks each tensor with ``masked_fill_`` and ``mul_``. It is simple
  and always correct.
* :func:`bernoulli_chunked_` hands the same lanes out in order from a
  :class:`_LaneStream`, block by block. Tensors larger than a block are masked
  in place in blocks of at most ``CHUNK_LANES`` lanes; runs of small tensors are
  packed into one buffer, masked, and copied back, so a thousand small gradients
  cost a handful of ops. Each block is masked with vectorized integer ops (see
  :func:`bernoulli_chunked_`) rather than ``masked_fill_``. Temporaries stay
  bounded whatever the parameter size.

On CPU, word draws are sequential whatever their sizes, and the stream keeps the
lanes left over at the end of a draw for the next block, so both
implementations give every element the same lane and produce bit-identical
gradients; the tests hold the fast path to that.
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
# At most 2**20 lanes per block of ops: the Bernoulli kernel holds 2 bytes of
# random words per lane and, for runs of small tensors, one packed copy of them;
# the Gaussian one a chunk of noise (4 or 8 bytes a lane) and a packed copy.
# Temporaries are bounded by this, whatever the parameter size.
CHUNK_LANES = 1 << 20
# torch runs an elementwise CPU op on one thread when it has at most this many
# elements (at::internal::GRAIN_SIZE). An optimizer step over tensors this small
# never wakes the thread pool, and when the cores are shared with other work a
# wake-up can cost milliseconds, far more than the work itself. Small tensors are
# therefore packed into blocks no larger than this, so masking them stays serial
# too; larger tensors are masked in place, where the thread pool pays off.
_SERIAL_LANES = 1 << 15
# On CPU, larger tensors are masked in blocks of at most 2**18 lanes: a block's
# gradient slice and random words (1.5 MiB in float32) stay in the two L2 caches
# between the passes over them, which measured faster than 2**17 or 2**20.
_CPU_BLOCK_LANES = 1 << 18
assert CHUNK_LANES % _LANES_PER_WORD == 0  # gaussian_ chunks stay word aligned


def quantize_rate(rate: float) -> tuple[int, float]:
    """Threshold on 16-bit lanes for ``rate`` and the survivor scale it implies.

    Returns:
        ``(threshold, keep_scale)`` where ``threshold / 65536`` is the realized
        drop probability and ``keep_scale = 65536 / (65536 - threshold)``
        (``inf`` when every element is dropped, which only a rate of 1 does).
    """
    if rate >= 1.0:
        return LANE_LEVELS, math.inf
    # A rate just below 1 keeps at least one level, so the gradient stays
    # unbiased instead of being rounded to "drop everything".
    threshold = min(round(rate * LANE_LEVELS), LANE_LEVELS - 1)
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


def _chunks(
    tensors: Sequence[Tensor], sizes: Sequence[int], chunk_lanes: int
) -> Iterator[tuple[list[Tensor], list[int]]]:
    """Split the elements of contiguous ``tensors`` into chunks of at most ``chunk_lanes``.

    Yields each chunk as 1-D pieces (whole flattened tensors, or slices of a
    tensor that crosses a chunk boundary) with the pieces' element counts.
    """
    pieces: list[Tensor] = []
    counts: list[int] = []
    filled = 0
    for tensor, size in zip(tensors, sizes):
        if size == 0:
            continue
        # 1-D tensors, the usual small ones (biases, norms), need no view.
        flat = tensor if tensor.dim() == 1 else tensor.view(-1)
        if filled + size <= chunk_lanes:
            pieces.append(flat)
            counts.append(size)
            filled += size
        else:
            start = 0
            while start < size:
                take = min(chunk_lanes - filled, size - start)
                pieces.append(flat[start : start + take])
                counts.append(take)
                filled += take
                start += take
                if filled == chunk_lanes and start < size:
                    yield pieces, counts
                    pieces, counts, filled = [], [], 0
        if filled == chunk_lanes:
            yield pieces, counts
            pieces, counts, filled = [], [], 0
    if pieces:
        yield pieces, counts


def _map_chunks_(
    tensors: Sequence[Tensor],
    chunk_lanes: int,
    op: Callable[[Tensor, int], None],
) -> None:
    """Run ``op(buffer, count)`` on consecutive chunks of the tensors' elements, in place.

    A chunk that lies inside one tensor is a flat view of it. A chunk made of
    several tensors is packed into one reused buffer with ``cat`` and unpacked
    with one ``_foreach_copy_``, so a thousand small gradients cost a handful
    of ops. Non-contiguous tensors are masked through a contiguous copy.
    """
    contiguous: list[Tensor] = []
    copied: list[tuple[Tensor, Tensor]] = []
    for tensor in tensors:
        if tensor.is_contiguous():
            contiguous.append(tensor)
        else:
            dense = tensor.contiguous()
            copied.append((tensor, dense))
            contiguous.append(dense)
    sizes = [tensor.numel() for tensor in contiguous]
    packing: Tensor | None = None
    for pieces, counts in _chunks(contiguous, sizes, chunk_lanes):
        if len(pieces) == 1:
            op(pieces[0], counts[0])
            continue
        count = sum(counts)
        if packing is None:
            packing_lanes = min(chunk_lanes, sum(sizes))
            packing = torch.empty(packing_lanes, dtype=pieces[0].dtype, device=pieces[0].device)
        packed = torch.cat(pieces, out=packing[:count])
        op(packed, count)
        torch._foreach_copy_(pieces, list(packed.split(counts)))
    for tensor, dense in copied:
        tensor.copy_(dense)


class _LaneStream:
    """Consecutive 16-bit lanes from ``generator``, handed out in any counts.

    Words are drawn as needed; the up to three lanes left over at the end of a
    draw are moved into a spare word in front of the buffer and handed out
    first next time, so the lanes come out in exactly the order that one draw
    of all of them would produce. A view returned by :meth:`take` may be
    modified in place and stays valid until the next call.
    """

    def __init__(self, capacity: int, device: torch.device, generator: torch.Generator | None):
        self._generator = generator
        self._words = torch.empty(
            1 + -(-capacity // _LANES_PER_WORD), dtype=torch.int64, device=device
        )
        self._lanes = self._words.view(torch.int16)
        self._left = 0  # lanes not handed out yet, ending at lane _left_end
        self._left_end = _LANES_PER_WORD

    def take(self, count: int) -> Tensor:
        """The next ``count`` lanes, int16, as a view into the stream's buffer."""
        left, spare = self._left, _LANES_PER_WORD
        if left and self._left_end != spare:
            # Move the leftovers of the last draw next to where new words start.
            end = self._left_end
            self._lanes[spare - left : spare].copy_(self._lanes[end - left : end])
        start = spare - left
        if count <= left:
            self._left, self._left_end = left - count, spare
            return self._lanes[start : start + count]
        words = -(-(count - left) // _LANES_PER_WORD)
        # from=-2**63 with no upper bound asks for the full 64-bit range: every lane uniform.
        self._words[1 : 1 + words].random_(-(2**63), None, generator=self._generator)
        drawn_end = spare + words * _LANES_PER_WORD
        self._left, self._left_end = drawn_end - (start + count), drawn_end
        return self._lanes[start : start + count]


# Integer dtype with the itemsize of each gradient dtype, to clear dropped elements
# with a bitwise AND (all-zero bits are +0 in every floating and complex dtype).
_BITS_DTYPES = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def bernoulli_chunked_(
    tensors: Sequence[Tensor],
    rate: float,
    generator: torch.Generator | None,
    scale: float = 1.0,
    chunk_lanes: int = CHUNK_LANES,
) -> None:
    """Same result as :func:`bernoulli_reference_`, with bounded memory and few ops.

    Args:
        tensors: dense tensors of one dtype on one device (any strides).
        rate: drop probability in ``[0, 1]``.
        generator: source of the lanes (``None``: the device's default generator).
        scale: extra factor applied to every element (full update drop uses it).
        chunk_lanes: most lanes masked by one block of ops (a positive int);
            bounds the temporaries. The result does not depend on it on CPU.

    On CPU ``masked_fill_`` and comparisons into bool tensors are not
    vectorized and cost more than the random draw itself, so each block of
    lanes becomes an integer keep mask instead: clamping a lane to
    ``[cutoff - 1, cutoff]`` and subtracting it from ``cutoff - 1`` gives all
    ones for a kept element and zero for a dropped one, with no int16
    overflow. ANDing the gradient's bits with that mask (sign-extended to the
    gradient's itemsize) writes +0 exactly where the reference writes 0, NaN
    and inf included, and the survivors are then scaled as in the reference.
    """
    if not tensors:
        return
    threshold, keep_scale = quantize_rate(rate)
    if _trivial_(tensors, threshold, scale):
        return
    itemsize = tensors[0].dtype.itemsize
    if itemsize not in _BITS_DTYPES and itemsize != 16:
        bernoulli_reference_(tensors, rate, generator, scale)
        return
    # complex128 (16 bytes): one lane per element, clearing both 64-bit halves.
    bits_dtype = _BITS_DTYPES.get(itemsize, torch.int64)
    factor = scale * keep_scale
    device, dtype = tensors[0].device, tensors[0].dtype
    # threshold is in [1, 65535] here, so both bounds fit in int16.
    low = threshold - _LANE_OFFSET - 1
    low_tensor = torch.tensor(low, dtype=torch.int16, device=device)

    dense = [t if t.is_contiguous() else t.contiguous() for t in tensors]
    sizes = [t.numel() for t in dense]
    if device.type == "cpu":
        pack_lanes = min(chunk_lanes, _SERIAL_LANES)
        chunk_lanes = min(chunk_lanes, _CPU_BLOCK_LANES)
    else:
        pack_lanes = chunk_lanes
    stream = _LaneStream(min(chunk_lanes, sum(sizes)), device, generator)

    def keep_mask(count: int) -> Tensor:
        """All-ones int16 for each of the next ``count`` lanes that keeps, zero for each drop."""
        keep = stream.take(count)
        keep.clamp_(low, low + 1)
        return torch.sub(low_tensor, keep, out=keep)

    def apply_(flat: Tensor, keep: Tensor) -> None:
        # The AND sign-extends the int16 mask to the gradient's itemsize itself;
        # widening it in a separate pass first costs more memory traffic.
        bits = flat.view(bits_dtype)
        if itemsize == 16:
            bits, keep = bits.view(-1, 2), keep.unsqueeze(1)
        bits.bitwise_and_(keep)
        flat.mul_(factor)

    # Small tensors are packed into one buffer; larger ones share one keep mask
    # per group but are masked in place. Both are flushed before the other
    # kind is collected, so lanes go to elements in tensor order, as in the
    # reference.
    pack: list[Tensor] = []
    pack_sizes: list[int] = []
    group: list[Tensor] = []
    group_sizes: list[int] = []
    packing: Tensor | None = None
    pack_total = group_total = 0

    def mask_pack_() -> None:
        nonlocal packing, pack_total
        if len(pack) == 1:
            apply_(pack[0], keep_mask(pack_total))
        elif pack:
            if packing is None:
                packing = torch.empty(pack_lanes, dtype=dtype, device=device)
            packed = torch.cat(pack, out=packing[:pack_total])
            apply_(packed, keep_mask(pack_total))
            torch._foreach_copy_(pack, list(packed.split(pack_sizes)))
        pack.clear()
        pack_sizes.clear()
        pack_total = 0

    def mask_group_() -> None:
        nonlocal group_total
        if group:
            keep = keep_mask(group_total)
            for flat, part in zip(group, keep.split(group_sizes)):
                apply_(flat, part)
        group.clear()
        group_sizes.clear()
        group_total = 0

    for tensor, size in zip(dense, sizes):
        if size == 0:
            continue
        # 1-D tensors, the usual small ones (biases, norms), need no view.
        flat = tensor if tensor.dim() == 1 else tensor.view(-1)
        if size <= pack_lanes:
            mask_group_()
            if pack_total + size > pack_lanes:
                mask_pack_()
            pack.append(flat)
            pack_sizes.append(size)
            pack_total += size
            continue
        mask_pack_()
        if size > chunk_lanes:
            mask_group_()
            for start in range(0, size, chunk_lanes):
                count = min(chunk_lanes, size - start)
                apply_(flat[start : start + count], keep_mask(count))
            continue
        if group_total + size > chunk_lanes:
            mask_group_()
        group.append(flat)
        group_sizes.append(size)
        group_total += size
    mask_pack_()
    mask_group_()
    for tensor, copy in zip(tensors, dense):
        if copy is not tensor:
            tensor.copy_(copy)


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
