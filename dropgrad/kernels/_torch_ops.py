"""The torch-op backend: masks built from elementwise torch ops, on any device and dtype.

It computes the reference masks (``_reference.py``) for tensors whose
elements are consecutive in their parameters, with bounded memory and few ops.
Tensors of at most ``2**14`` elements are packed (:func:`_packed_blocks`): a
plan, kept between steps on CPU within a byte bound, puts tensors with about
the same number of words into the rows of a block, so a block's hash inputs are
one broadcast op over a row per tensor, and its elements reach a shared buffer
by one ``torch.stack`` (one foreach copy when their shapes differ) and come
back by one foreach copy: a handful of ops per block rather than a dozen per
tensor. Packing is measured to earn its place: without it a step of Adam over
1,000 tensors of 1,000 elements on this path took 1.37 times as long (1.35 for
Gaussian noise). Larger tensors are masked in place by :func:`iter_blocks`,
several to a block, a tensor larger than a block in pieces. Words are hashed
with eleven integer ops per block. Temporaries stay bounded by the block size
whatever the parameter size, and the result does not depend on how the
elements are cut into blocks, because every element's bits depend only on its
key and global index.

On CPU ``masked_fill_`` and comparisons into bool tensors are not vectorized
and cost more than the hash itself, so each block's lanes become an integer
keep mask instead: clamping a lane to ``[cutoff - 1, cutoff]`` and subtracting
it from ``cutoff - 1`` gives all ones for a kept element and zero for a
dropped one, with no int16 overflow. ANDing the gradient's bits with that mask
(sign-extended to the gradient's itemsize) writes +0 exactly where the
reference writes 0, NaN and inf included, and the survivors are then scaled as
in the reference.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .._random import StreamKey, hash_words_, signed_int32
from ._reference import LANE_OFFSET, contiguous_copies, noise_dtype, normals

__all__ = ["CHUNK_LANES", "accepts", "bernoulli_", "gaussian_", "iter_blocks"]

# At most 2**20 elements per block of ops: a block holds 4 bytes of words per
# element (8 for Gaussian noise, plus the float64 noise itself) and, for runs
# of small tensors, one packed copy of them. Temporaries are bounded by this,
# whatever the parameter size.
CHUNK_LANES = 1 << 20
# Tensors of at most this many elements are packed into one buffer with their
# neighbours: copying them in and out costs less than a dozen ops for each. Larger
# tensors are masked in place, several to a block.
_SMALL_LANES = 1 << 14
# On CPU a packed block holds at most this many elements.
_CPU_PACK_LANES = 1 << 17
# On CPU, larger tensors are masked in blocks of at most 2**18 elements: a
# block's gradient slice, words and scratch (3 MiB in float32) stay in cache
# between the passes over them.
_CPU_BLOCK_LANES = 1 << 18
_MASK32 = (1 << 32) - 1
# Integer dtype with the itemsize of each gradient dtype, to clear dropped elements
# with a bitwise AND (all-zero bits are +0 in every floating and complex dtype).
_BITS_DTYPES = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def accepts(values: Sequence[Tensor], distribution: str) -> bool:
    """Every floating and complex dtype of 2, 4, 8 or 16 bytes, on any device."""
    itemsize = values[0].dtype.itemsize
    return distribution == "gaussian" or itemsize in _BITS_DTYPES or itemsize == 16


class KeyColumn:
    """A step's key table (int64, ``(n, 2)``: ``a, b`` per tensor), read row by row
    or as int32 columns, converting each form once."""

    def __init__(self, table: Tensor) -> None:
        self._table = table.reshape(-1, 2)
        self._rows: list[list[int]] | None = None

    def key(self, row: int) -> StreamKey:
        if self._rows is None:
            self._rows = self._table.tolist()
        return StreamKey._make(self._rows[row])

    def signed(self, rows: Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
        """``a`` and ``b`` of the keys in ``rows`` (default: all, in order) as int32
        with the same bits, on the CPU."""
        table = self._table if rows is None else self._table[list(rows)]
        table = signed_int32(table)
        return table[:, 0].contiguous(), table[:, 1].contiguous()


def bernoulli_(
    values: Sequence[Tensor],
    starts: Sequence[int],
    keys: Tensor,
    threshold: int,
    factor: float,
    chunk_lanes: int = CHUNK_LANES,
) -> None:
    """The reference Bernoulli mask of consecutive tensors (any strides), in place.

    Args:
        values, starts, keys, threshold, factor: as for ``_reference.bernoulli_``.
        chunk_lanes: most elements masked by one block of ops (a positive int);
            bounds the temporaries. The result does not depend on it.
    """
    keys_column = KeyColumn(keys)
    itemsize = values[0].dtype.itemsize
    device = values[0].device
    block_lanes, pack_lanes, small_lanes = _block_sizes(device, chunk_lanes)
    small, large = _by_size(values, small_lanes)
    # threshold is in [1, 65535] here, so both bounds fit in int16.
    low = threshold - LANE_OFFSET - 1
    low_tensor = torch.tensor(low, dtype=torch.int16, device=device)
    # complex128 (16 bytes): one lane per element, clearing both 64-bit halves.
    bits_dtype = _BITS_DTYPES.get(itemsize, torch.int64)

    def keep_lanes(words: Tensor) -> Tensor:
        """All-ones int16 lanes where an element is kept, zero where dropped."""
        lanes = words.view(torch.int16)
        lanes.clamp_(low, low + 1)
        return torch.sub(low_tensor, lanes, out=lanes)

    def apply_(flat: Tensor, keep: Tensor) -> None:
        # The AND sign-extends the int16 mask to the gradient's itemsize itself.
        bits = flat.view(bits_dtype)
        if itemsize == 16:
            bits, keep = bits.view(-1, 2), keep.unsqueeze(1)
        bits.bitwise_and_(keep)
        flat.mul_(factor)

    packs = _packed_blocks(values, starts, keys_column, small, pack_lanes, noise=False)
    for packed, words in packs:
        apply_(packed, keep_lanes(words))
    buffers = _WordBuffers(block_lanes // 2 + 2 if large else 0, device)
    for segments in _large_blocks(values, starts, keys_column, large, block_lanes):
        positions, firsts, counts = [], [], []
        cursor = 0
        for _, _, start, size in segments:
            first_word = start >> 1
            count = ((start + size - 1) >> 1) - first_word + 1
            firsts.append(first_word)
            counts.append(count)
            positions.append(2 * cursor + (start & 1))
            cursor += count
        lanes = keep_lanes(buffers.hashed([s.key for s in segments], firsts, counts))
        for segment, position in zip(segments, positions):
            apply_(segment.flat, lanes[position : position + segment.size])


def gaussian_(
    values: Sequence[Tensor],
    starts: Sequence[int],
    keys: Tensor,
    sigma: float,
    scale: float,
    chunk_lanes: int = CHUNK_LANES,
) -> None:
    """The reference Gaussian multipliers of consecutive tensors (any strides), in place.

    Arguments as for ``_reference.gaussian_``; ``chunk_lanes`` as for :func:`bernoulli_`.
    """
    keys_column = KeyColumn(keys)
    device = values[0].device
    dtype = noise_dtype(values[0].dtype)

    def noise_of(words: Tensor) -> Tensor:
        """One multiplier per element from each pair of words."""
        pairs = words.view(-1, 2)
        noise = (normals(pairs[:, 0], pairs[:, 1]) * sigma + 1.0).to(dtype)
        return noise.mul_(scale) if scale != 1.0 else noise

    # Two words per element, so half as many elements per block as words.
    block_lanes, pack_lanes, small_lanes = (
        max(1, size // 2) for size in _block_sizes(device, chunk_lanes)
    )
    small, large = _by_size(values, small_lanes)
    for packed, words in _packed_blocks(values, starts, keys_column, small, pack_lanes, noise=True):
        packed.mul_(noise_of(words))
    buffers = _WordBuffers(2 * block_lanes + 2 if large else 0, device)
    for segments in _large_blocks(values, starts, keys_column, large, block_lanes):
        noise = noise_of(
            buffers.hashed(
                [s.key for s in segments],
                [2 * s.start for s in segments],
                [2 * s.size for s in segments],
            )
        )
        cursor = 0
        for segment in segments:
            segment.flat.mul_(noise[cursor : cursor + segment.size])
            cursor += segment.size


# ---------------------------------------------------------------- blocks


class Segment(NamedTuple):
    """Consecutive elements of one target inside a block.

    Attributes:
        flat: a contiguous 1-D view of the elements (masked in place).
        key: the target's stream key.
        start: global index of ``flat[0]``.
        size: number of elements.
    """

    flat: Tensor
    key: StreamKey
    start: int
    size: int


def iter_blocks(
    tensors: Sequence[tuple[Tensor, StreamKey, int]], block_lanes: int
) -> Iterator[list[Segment]]:
    """Cut contiguous tensors into blocks of segments, each masked in place.

    Args:
        tensors: ``(tensor, key, start)`` for each contiguous tensor.
        block_lanes: most elements in one block.

    Tensors go several to a block, a tensor larger than a block in pieces of
    ``block_lanes`` elements. Every element is in exactly one segment; blocks
    come out in no particular order, which the keyed masks do not depend on.
    """
    group: list[Segment] = []
    group_total = 0
    make = Segment._make
    for tensor, key, start in tensors:
        size = tensor.numel()
        if size == 0:
            continue
        flat = tensor if tensor.dim() == 1 else tensor.view(-1)
        for offset in range(0, size, block_lanes):
            count = min(block_lanes, size - offset)
            if group_total + count > block_lanes:
                yield group
                group, group_total = [], 0
            piece = flat if count == size else flat[offset : offset + count]
            group.append(make((piece, key, start + offset, count)))
            group_total += count
    if group:
        yield group


_IOTAS: dict[torch.device, Tensor] = {}


def _iota(capacity: int, device: torch.device) -> Tensor:
    """``arange(capacity)`` as int32, kept between steps (read only).

    Built once per device rather than every step: a fresh ``arange`` of a
    block's length is a parallel op, and waiting for torch's thread pool costs
    milliseconds per step when other processes (data loaders) keep the cores busy.
    """
    iota = _IOTAS.get(device)
    if iota is None or iota.numel() < capacity:
        iota = torch.arange(capacity, dtype=torch.int32, device=device)
        _IOTAS[device] = iota
    return iota[:capacity]


class _WordBuffers:
    """Reused int32 buffers for one call: the words and their scratch."""

    def __init__(self, capacity: int, device: torch.device) -> None:
        self.device = device
        self.words = torch.empty(capacity, dtype=torch.int32, device=device)
        self.scratch = torch.empty(capacity, dtype=torch.int32, device=device)
        self.base = torch.empty((), dtype=torch.int32, device=device)

    def hashed(
        self, keys: Sequence[StreamKey], firsts: Sequence[int], counts: Sequence[int]
    ) -> Tensor:
        """Hashed words of consecutive runs, concatenated: run ``j`` holds words
        ``firsts[j] .. firsts[j] + counts[j] - 1`` of stream ``keys[j]``.

        The hash input of position ``q`` in run ``j`` (which starts at ``c_j`` in
        the buffer) is ``b_j + a_j * (first_j + q - c_j)`` modulo ``2**32``.
        """
        total = sum(counts)
        if total > self.words.numel():
            # Every segment may add a word at each end: a block of many short
            # pieces (the ends of tensors just over a block) needs more.
            self.words = torch.empty(total, dtype=torch.int32, device=self.device)
            self.scratch = torch.empty(total, dtype=torch.int32, device=self.device)
        words = self.words[:total]
        iota = _iota(max(counts), self.device)
        # A block holds few runs (large tensors): one op per run, the run's first
        # input plus a_j times the iota.
        at = 0
        for key, first, count in zip(keys, firsts, counts):
            self.base.fill_(key.start(first))
            torch.add(self.base, iota[:count], alpha=key.multiplier, out=words[at : at + count])
            at += count
        return hash_words_(words, self.scratch[:total])


def _block_sizes(device: torch.device, chunk_lanes: int) -> tuple[int, int, int]:
    """Elements per in-place block, per packed block, and the largest packed tensor."""
    small = min(chunk_lanes, _SMALL_LANES)
    if device.type == "cpu":
        return min(chunk_lanes, _CPU_BLOCK_LANES), min(chunk_lanes, _CPU_PACK_LANES), small
    return chunk_lanes, chunk_lanes, small


def _by_size(values: Sequence[Tensor], small_lanes: int) -> tuple[list[int], list[int]]:
    """Positions of the tensors to pack (at most ``small_lanes`` elements) and of
    those to mask in place; empty tensors are in neither."""
    numels = list(map(Tensor.numel, values))
    if len(numels) > 1 and 0 < min(numels) and max(numels) <= small_lanes:
        return list(range(len(numels))), []  # the common case of many small tensors
    small = [i for i, n in enumerate(numels) if 0 < n <= small_lanes]
    if len(small) < 2:  # one small tensor costs less masked in place than copied twice
        small = []
    chosen = set(small)
    return small, [i for i, n in enumerate(numels) if n > 0 and i not in chosen]


def _large_blocks(
    values: Sequence[Tensor],
    starts: Sequence[int],
    keys: KeyColumn,
    rows: Sequence[int],
    block_lanes: int,
) -> Iterator[list[Segment]]:
    """:func:`iter_blocks` of ``values[i]`` for ``i`` in ``rows``, non-contiguous
    ones through contiguous copies that are written back at the end."""
    if not rows:
        return
    dense, write_back = contiguous_copies([values[i] for i in rows])
    yield from iter_blocks([(t, keys.key(i), starts[i]) for t, i in zip(dense, rows)], block_lanes)
    for original, copy in write_back:
        original.copy_(copy)


class _PackBlock(NamedTuple):
    """Small tensors with about the same number of words, masked together.

    Row ``r`` of the block holds tensor ``order[first + r]`` of its plan and
    hashes ``width`` words of its stream. For Bernoulli masks they are
    ``2 * width`` lanes, one per element of the row in the plan's buffer, the
    tensor's elements starting at lane ``start & 1`` (a pad lane first when its
    first element is the high half of a word); for Gaussian noise, two words
    per element, ``width / 2`` elements. Pad elements fill each row's end.

    Attributes:
        first, stop: the block's rows are ``order[first:stop]`` of the plan.
        width: words per row, the most any of its tensors needs.
        views: one view of the plan's buffer per tensor, shaped like it, when
            the plan is kept between steps; ``None`` otherwise.
        stacked: when the block's tensors share one shape and fill their rows
            exactly (no pad lanes), its rows as one view of shape
            ``(rows, *shape)``, which ``torch.stack`` fills in one op (about a
            third of what a foreach copy costs per tiny tensor); ``None``
            otherwise or when ``views`` is ``None``.
    """

    first: int
    stop: int
    width: int
    views: list[Tensor] | None
    stacked: Tensor | None


class _PackPlan(NamedTuple):
    """How a list of small tensors is packed into blocks.

    Tensors are ordered by the power of two above their word count (stably),
    so a block's rows are at most twice as long as any of its tensors needs,
    and tensors of one shape, the common case, need no padding at all. Each
    row's hash inputs are then one broadcast op over the block, with no
    per-element layout to keep.

    Attributes:
        order: tensor positions, in the order the blocks take them.
        in_order: whether ``order`` is ``0, 1, 2, ...``.
        firsts: each ordered tensor's first word index, modulo ``2**32`` (int32).
        shapes, starts: each tensor's shape and first global index (unordered).
        noise: whether the words are Gaussian noise's (two per element) rather
            than Bernoulli lanes (two elements per word).
        blocks: the blocks.
        buffer: packed elements of the largest block. Blocks are masked one
            after another, so every block's views share it, and it stays in
            cache from one block to the next.
        words, scratch: int32 buffers for the largest block's words.
    """

    order: list[int]
    in_order: bool
    firsts: Tensor
    shapes: tuple[torch.Size, ...]
    starts: tuple[int, ...]
    noise: bool
    blocks: list[_PackBlock]
    buffer: Tensor
    words: Tensor
    scratch: Tensor


# Plans of packed blocks, kept between steps on CPU: a model's small gradients
# have the same shapes every step, so after the first step packing them costs two
# foreach copies per block and no Python per tensor. The key holds the thread,
# because a plan's buffers are written during a call. Bounded in bytes: the plans
# used longest ago are dropped to make room (a plan larger than the whole bound
# is built for each call), so a process that masks many different models keeps
# the recent ones.
_PACK_PLANS: OrderedDict[tuple[object, ...], tuple[_PackPlan, int]] = OrderedDict()
_PACK_PLAN_BYTES = 16 << 20
_pack_plan_bytes = 0
_pack_plans_lock = threading.Lock()


def _pack_plan(
    tensors: Sequence[Tensor], starts: Sequence[int], pack_lanes: int, noise: bool
) -> _PackPlan:
    """The packing of ``tensors`` (one dtype, one device) into blocks of at most
    ``pack_lanes`` elements (or one tensor)."""
    global _pack_plan_bytes
    device, dtype = tensors[0].device, tensors[0].dtype
    shapes = tuple([t.shape for t in tensors])
    signature = (threading.get_ident(), device, dtype, shapes, tuple(starts), pack_lanes, noise)
    with _pack_plans_lock:
        kept = _PACK_PLANS.get(signature)
        if kept is not None:
            _PACK_PLANS.move_to_end(signature)
            return kept[0]
    if noise:
        counts = [2 * t.numel() for t in tensors]
        first_words = [2 * start for start in starts]
    else:
        counts = [
            ((start + t.numel() - 1) >> 1) - (start >> 1) + 1 for t, start in zip(tensors, starts)
        ]
        first_words = [start >> 1 for start in starts]
    order = sorted(range(len(tensors)), key=lambda j: counts[j].bit_length())
    blocks: list[_PackBlock] = []
    first = 0
    while first < len(order):
        size_class = counts[order[first]].bit_length()
        stop = first
        width = 0
        while stop < len(order) and counts[order[stop]].bit_length() == size_class:
            wider = max(width, counts[order[stop]])
            if stop > first and _row_elements(wider, noise) * (stop + 1 - first) > pack_lanes:
                break
            width, stop = wider, stop + 1
        blocks.append(_PackBlock(first, stop, width, None, None))
        first = stop
    most_words = max((b.stop - b.first) * b.width for b in blocks)
    most = max((b.stop - b.first) * _row_elements(b.width, noise) for b in blocks)
    firsts = torch.tensor([first_words[j] & _MASK32 for j in order], dtype=torch.int64)
    plan = _PackPlan(
        order,
        order == list(range(len(order))),
        signed_int32(firsts),
        shapes,
        tuple(starts),
        noise,
        blocks,
        # Pad elements (whatever an earlier block left there) are changed, never copied back.
        torch.zeros(most, dtype=dtype, device=device),
        torch.empty(most_words, dtype=torch.int32, device=device),
        torch.empty(most_words, dtype=torch.int32, device=device),
    )
    nbytes = most * dtype.itemsize + 8 * most_words + 4 * len(order)
    if device.type == "cpu" and nbytes <= _PACK_PLAN_BYTES:
        plan = plan._replace(
            blocks=[
                b._replace(views=_block_views(plan, b), stacked=_block_stacked(plan, b))
                for b in blocks
            ]
        )
        with _pack_plans_lock:
            while _PACK_PLANS and _pack_plan_bytes + nbytes > _PACK_PLAN_BYTES:
                _, (_, freed) = _PACK_PLANS.popitem(last=False)
                _pack_plan_bytes -= freed
            _PACK_PLANS[signature] = (plan, nbytes)
            _pack_plan_bytes += nbytes
    return plan


def _row_elements(width: int, noise: bool) -> int:
    """Elements of a row of ``width`` words."""
    return width // 2 if noise else 2 * width


def _block_views(plan: _PackPlan, block: _PackBlock) -> list[Tensor]:
    """Each of the block's tensors as a view of its row of the plan's buffer."""
    row_elements = _row_elements(block.width, plan.noise)
    rows = plan.buffer[: (block.stop - block.first) * row_elements].view(-1, row_elements)
    views = []
    for row, position in enumerate(plan.order[block.first : block.stop]):
        shape = plan.shapes[position]
        lane = 0 if plan.noise else plan.starts[position] & 1
        views.append(rows[row, lane : lane + math.prod(shape)].view(shape))
    return views


def _block_stacked(plan: _PackPlan, block: _PackBlock) -> Tensor | None:
    """The block's rows as one ``(rows, *shape)`` view, when its tensors fill them exactly."""
    positions = plan.order[block.first : block.stop]
    shape = plan.shapes[positions[0]]
    row_elements = _row_elements(block.width, plan.noise)
    if math.prod(shape) != row_elements or any(plan.shapes[j] != shape for j in positions):
        return None
    if not plan.noise and any(plan.starts[j] & 1 for j in positions):
        return None
    rows = block.stop - block.first
    return plan.buffer[: rows * row_elements].view(rows, *shape)


def _packed_blocks(
    values: Sequence[Tensor],
    starts: Sequence[int],
    keys: KeyColumn,
    small: Sequence[int],
    pack_lanes: int,
    noise: bool,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Pack ``values[i]`` for ``i`` in ``small``; yield each block's elements (in the
    plan's buffer) with its hashed words, and copy the elements back once the
    caller has changed them in place."""
    if not small:
        return
    device = values[0].device
    every = len(small) == len(values)
    if every:
        tensors, small_starts = values, starts
    else:
        tensors, small_starts = [values[i] for i in small], [starts[i] for i in small]
    plan = _pack_plan(tensors, small_starts, pack_lanes, noise)
    in_order = plan.in_order and every
    multipliers, offsets = keys.signed(None if in_order else [small[j] for j in plan.order])
    multipliers, offsets = multipliers.to(device), offsets.to(device)
    # Word w of a tensor's stream hashes b + a * (first + w): fold the first
    # word index into the offset, so each row of a block hashes b' + a * w.
    offsets.add_(multipliers * plan.firsts.to(device))
    iota = _iota(max(packed.width for packed in plan.blocks), device)
    for packed in plan.blocks:
        if plan.in_order:
            members = list(tensors[packed.first : packed.stop])
        else:
            members = [tensors[j] for j in plan.order[packed.first : packed.stop]]
        views = packed.views if packed.views is not None else _block_views(plan, packed)
        if packed.stacked is not None:
            torch.stack(members, out=packed.stacked)
        else:
            torch._foreach_copy_(views, members)
        rows = packed.stop - packed.first
        words = plan.words[: rows * packed.width].view(rows, packed.width)
        torch.mul(multipliers[packed.first : packed.stop, None], iota[: packed.width], out=words)
        words.add_(offsets[packed.first : packed.stop, None])
        words = hash_words_(words.view(-1), plan.scratch[: words.numel()])
        yield plan.buffer[: rows * _row_elements(packed.width, noise)], words
        torch._foreach_copy_(members, views)
