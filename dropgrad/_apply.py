"""Applying one step's plan: which tensor is masked, where its elements sit, which kernel.

DropGrad's step decides, for every parameter, a rate, a target and a
granularity (a :class:`Planned` entry). This module turns those entries into
mask operations:

* :func:`locate` finds the tensor to mask (a dense gradient, a sparse
  gradient's values, a DTensor's local shard, or a parameter's update) and the
  global flat index of its elements in the whole, unsharded parameter, which
  is what the keyed masks are a function of. A shard of a tensor sharded along
  dim 0 (FSDP2) is one run of consecutive global indices; anything else gets an
  explicit index tensor.
* :func:`mask_all` masks a list of located tensors: element granularity is
  bucketed by device, dtype and rate so one kernel call serves many tensors;
  row and tensor granularity compute one multiplier per row (or one in all)
  from the same keyed stream and broadcast it.
* :class:`UpdateSnapshots` holds the copies that ``target="update"`` needs:
  after the wrapped step, each snapshotted parameter becomes
  ``before + mask(after - before)``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, TypeGuard

import torch
from torch import Tensor

from ._masking import (
    KeyColumn,
    MaskTarget,
    bernoulli_columns_,
    bernoulli_keyed_,
    bernoulli_reference_,
    gaussian_keyed_,
    gaussian_reference_,
)
from ._random import GAUSSIAN_DOMAIN, MASK_DOMAIN, stream_key_table
from .functional import sparse_value_index

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

__all__ = [
    "Located",
    "Planned",
    "UpdateSnapshots",
    "is_dtensor",
    "locate",
    "mask_all",
    "mask_dense_buckets",
]

Kernel = Callable[..., None]


@dataclass
class Planned:
    """One parameter's settings at this step.

    Attributes:
        index: the parameter's position in ``param_groups`` (state-dict numbering).
        param: the parameter.
        rate: its drop rate now (``None`` or 0: not masked).
        target: ``"gradient"`` or ``"update"``.
        granularity: ``"element"``, ``"row"`` or ``"tensor"``.
    """

    index: int
    param: Tensor
    rate: float | None
    target: str
    granularity: str


@dataclass
class Located:
    """A tensor to mask in place and where its elements sit in the whole parameter.

    Attributes:
        values: the dense tensor to modify.
        start: global flat index of ``values``' first element when its
            elements are consecutive; ``index`` is ``None`` then.
        index: global flat index of every element otherwise (int64).
        first_row: global dim-0 index of ``values``' first row when its rows
            are consecutive; ``row_index`` is ``None`` then.
        row_index: global dim-0 index of every element's row otherwise.
        rows: number of rows ``values`` spans; -1 (the default) for ``values``'
            own size along dim 0 (1 for 0-d), see :meth:`row_count`.
    """

    values: Tensor
    start: int = 0
    index: Tensor | None = None
    first_row: int = 0
    row_index: Tensor | None = None
    rows: int = -1

    def row_count(self) -> int:
        if self.rows >= 0:
            return self.rows
        return self.values.shape[0] if self.values.dim() else 1


def is_dtensor(tensor: Tensor) -> TypeGuard[DTensor]:
    """Whether ``tensor`` is a DTensor, without importing torch.distributed.tensor eagerly."""
    dtensor_module = sys.modules.get("torch.distributed.tensor")
    return dtensor_module is not None and isinstance(tensor, dtensor_module.DTensor)


def _local_layout(tensor: DTensor) -> tuple[torch.Size, tuple[int, ...]]:
    """The local shard's shape and its offset in the global tensor, per dim."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(
        tensor.shape, tensor.device_mesh, tensor.placements
    )
    return torch.Size(shape), tuple(int(o) for o in offset)


def _dense_index(
    local_shape: torch.Size, offset: Sequence[int], global_shape: torch.Size, device: torch.device
) -> Tensor:
    """Global flat index of every element of a box of ``local_shape`` at ``offset``."""
    index = torch.zeros((), dtype=torch.int64, device=device)
    for dim, size in enumerate(local_shape):
        stride = math.prod(global_shape[dim + 1 :])
        positions = (torch.arange(size, dtype=torch.int64, device=device) + offset[dim]) * stride
        index = index.unsqueeze(-1) + positions
    return index.reshape(local_shape)


def locate(tensor: Tensor) -> Located:
    """Where the elements of ``tensor`` (a gradient or a parameter) sit globally.

    A sparse COO tensor must be coalesced; its values are returned.
    """
    if type(tensor) is Tensor and not tensor.is_sparse:  # the usual case, first and cheap
        return Located(tensor)
    if tensor.is_sparse:
        values = tensor._values()
        index = sparse_value_index(tensor)
        indices = tensor._indices()
        if indices.shape[0] == 0:  # no sparse dims: the values are the whole tensor
            row_index = index // max(1, math.prod(tensor.shape[1:]))
        else:
            row_index = indices[0].view(-1, *([1] * (values.dim() - 1))).expand(values.shape)
        return Located(values, index=index, row_index=row_index)
    if is_dtensor(tensor):
        local = tensor.to_local()
        local_shape, offset = _local_layout(tensor)
        global_shape = tensor.shape
        rows = local_shape[0] if len(local_shape) else 1
        if tuple(local_shape[1:]) == tuple(global_shape[1:]):
            # Sharded along dim 0 at most (FSDP2): one run of consecutive elements.
            first_row = offset[0] if len(offset) else 0
            start = first_row * math.prod(global_shape[1:])
            return Located(local, start=start, first_row=first_row, rows=rows)
        index = _dense_index(local_shape, offset, global_shape, local.device)
        row_stride = math.prod(global_shape[1:])
        return Located(local, index=index, row_index=index // row_stride, rows=rows)
    return Located(tensor)


def _kernel(distribution: str, implementation: str) -> Kernel:
    if distribution == "gaussian":
        return gaussian_reference_ if implementation == "reference" else gaussian_keyed_
    return bernoulli_reference_ if implementation == "reference" else bernoulli_keyed_


def _apply_rows_(located: Located, multipliers: Tensor, bernoulli: bool) -> None:
    """Multiply each row of ``located.values`` by its multiplier; zero the dropped rows.

    ``multipliers`` has one entry per row (consecutive rows) or per element
    (``row_index`` given). For Bernoulli the zeros are written with
    ``masked_fill_``, so inf and NaN in a dropped row become 0 as element masks
    make them.
    """
    values = located.values
    factors = multipliers
    if located.row_index is None:
        # Broadcast one factor over each row, whatever the strides of values.
        factors = multipliers.view(-1, *([1] * (values.dim() - 1)))
    values.mul_(factors)
    if bernoulli:
        values.masked_fill_(factors == 0, 0)


def _row_targets(
    located: Located, key: Any, granularity: str, dtype: torch.dtype
) -> tuple[MaskTarget, bool]:
    """The vector of ones whose masking gives each row's multiplier."""
    device = located.values.device
    noise_dtype = torch.float64 if dtype in (torch.float64, torch.complex128) else torch.float32
    if granularity == "tensor":
        return MaskTarget(torch.ones(1, dtype=noise_dtype, device=device), key, 0), True
    if located.row_index is not None:
        ones = torch.ones(located.row_index.shape, dtype=noise_dtype, device=device)
        return MaskTarget(ones, key, index=located.row_index), False
    ones = torch.ones(located.row_count(), dtype=noise_dtype, device=device)
    return MaskTarget(ones, key, located.first_row), False


def mask_all(
    entries: Sequence[tuple[Planned, Located]],
    seed: int,
    step: int,
    distribution: str,
    scale: float,
    implementation: str = "fast",
) -> None:
    """Mask every located tensor in place with its parameter's keyed stream.

    Args:
        entries: each parameter's plan with the tensor to mask; entries with a
            rate of ``None`` or 0 are only multiplied by ``scale``.
        seed: DropGrad's seed.
        step: DropGrad's step counter (the ``s`` of the key).
        distribution: ``"bernoulli"`` or ``"gaussian"``.
        scale: factor applied to every tensor (``1 / (1 - q)`` under full update drop).
        implementation: ``"fast"`` or ``"reference"`` (the plain path the fast
            one is tested against).
    """
    kernel = _kernel(distribution, implementation)
    bernoulli = distribution == "bernoulli"
    if scale != 1.0:
        unmasked = [located.values for plan, located in entries if not plan.rate]
        if unmasked:
            torch._foreach_mul_(unmasked, scale)
    masked = [(plan, located) for plan, located in entries if plan.rate]
    if not masked:
        return
    domain = GAUSSIAN_DOMAIN if distribution == "gaussian" else MASK_DOMAIN
    table = stream_key_table(seed, domain, step, [plan.index for plan, _ in masked])
    keys = KeyColumn.from_table(table)
    # Element masks are bucketed by (device, dtype, rate), one kernel call each; a
    # bucket holds its tensors, their first global indices, their index tensors
    # (None when consecutive) and their rows of the key table.
    buckets: dict[tuple[torch.device, torch.dtype, float], _Bucket] = {}
    for row, (plan, located) in enumerate(masked):
        values = located.values
        rate = plan.rate or 0.0  # positive here; the fallback only narrows the type
        if plan.granularity == "element" or (plan.granularity == "row" and values.dim() <= 1):
            where = (values.device, values.dtype, rate)
            bucket = buckets.get(where)
            if bucket is None:
                bucket = buckets[where] = _Bucket([], [], [], [])
            bucket.values.append(values)
            bucket.starts.append(located.start)
            bucket.indices.append(located.index)
            bucket.rows.append(row)
            continue
        if values.numel() == 0:
            continue
        ones, whole = _row_targets(located, keys.key(row), plan.granularity, values.dtype)
        kernel([ones], rate, scale)
        if whole:
            multiplier = float(ones.values[0])
            if bernoulli and multiplier == 0.0:
                values.zero_()
            else:
                values.mul_(multiplier)
        else:
            _apply_rows_(located, ones.values, bernoulli)
    for (_, _, rate), bucket in buckets.items():
        # Rows are appended in increasing order, so a bucket as long as the
        # table holds every row, in order.
        own = keys if len(bucket.rows) == len(table) else KeyColumn.from_table(table[bucket.rows])
        indices = None if all(index is None for index in bucket.indices) else bucket.indices
        _mask_bucket(kernel, bucket.values, bucket.starts, indices, own, rate, scale)


def _mask_bucket(
    kernel: Kernel,
    values: list[Tensor],
    starts: list[int],
    indices: list[Tensor | None] | None,
    keys: KeyColumn,
    rate: float,
    scale: float,
) -> None:
    """Mask one bucket's tensors, ``keys`` holding their stream keys in order.

    ``indices`` is ``None`` when every tensor's elements are consecutive from
    its start; fast Bernoulli masks then take the key table as it is.
    """
    if kernel is bernoulli_keyed_ and indices is None:
        bernoulli_columns_(values, starts, keys, rate, scale)
        return
    targets = [
        MaskTarget(tensor, keys.key(number), start, None if indices is None else indices[number])
        for number, (tensor, start) in enumerate(zip(values, starts))
    ]
    kernel(targets, rate, scale)


def mask_dense_buckets(
    buckets: Mapping[tuple[torch.device, torch.dtype, float], tuple[list[Tensor], list[int]]],
    seed: int,
    step: int,
    distribution: str,
    scale: float,
) -> None:
    """Mask whole dense tensors elementwise, one kernel call per bucket.

    The same result as :func:`mask_all` with the fast kernels for entries whose
    tensors are whole, plain dense tensors (their elements start at global index
    0) with a positive rate at element granularity, without one object per tensor.

    Args:
        buckets: ``(device, dtype, rate)`` to the tensors of that bucket and their
            parameters' positions in ``param_groups``.
        seed, step, distribution, scale: as for :func:`mask_all`.
    """
    kernel = _kernel(distribution, "fast")
    domain = GAUSSIAN_DOMAIN if distribution == "gaussian" else MASK_DOMAIN
    for (_, _, rate), (values, positions) in buckets.items():
        keys = KeyColumn.from_table(stream_key_table(seed, domain, step, positions))
        _mask_bucket(kernel, values, [0] * len(values), None, keys, rate, scale)


class _Bucket(NamedTuple):
    values: list[Tensor]
    starts: list[int]
    indices: list[Tensor | None]
    rows: list[int]


class UpdateSnapshots:
    """Copies of the parameters whose update is masked, taken before the wrapped step.

    Each copy is of the local data (a DTensor's shard); together they cost one
    copy of every update-masked parameter, released after the step.
    """

    def __init__(self, plans: Sequence[Planned]) -> None:
        self._entries: list[tuple[Planned, Located, Tensor]] = []
        with torch.no_grad():
            for plan in plans:
                located = locate(plan.param.detach())
                self._entries.append((plan, located, located.values.clone()))

    def __bool__(self) -> bool:
        return bool(self._entries)

    @torch.no_grad()
    def mask_updates(
        self, seed: int, step: int, distribution: str, scale: float, implementation: str
    ) -> None:
        """Turn each parameter into ``before + mask(after - before)``, in place."""
        for _, located, before in self._entries:
            located.values.sub_(before)
        mask_all(
            [(plan, located) for plan, located, _ in self._entries],
            seed,
            step,
            distribution,
            scale,
            implementation,
        )
        for _, located, before in self._entries:
            located.values.add_(before)
        self._entries = []
