"""One step's plan: each parameter's settings, the tensor it contributes, and the buckets.

A step goes through three stages, all here:

* :func:`plan_step` turns the param groups and DropGrad's :class:`Settings`
  into :class:`Run` entries: consecutive parameters that share a rate, target
  and granularity at this step (one per param group, unless parameters have
  rates of their own or are listed twice, which torch tolerates: such a
  parameter is masked once, at its first position).
* :func:`locate` finds the tensor to mask (a dense gradient, a sparse
  gradient's values, a DTensor's local shard, or a parameter's update) and the
  global flat index of its elements in the whole, unsharded parameter, which
  is what the keyed masks are a function of. A shard of a tensor sharded along
  dim 0 (FSDP2) is one run of consecutive global indices; anything else gets an
  explicit index tensor.
* A :class:`Batch` collects the located tensors of a step, bucketed by device,
  dtype and rate at element granularity so one kernel call
  (``kernels.mask_``) serves many tensors; row and tensor granularity compute
  one multiplier per row (or one in all) from the same keyed stream, on a
  vector of ones, and broadcast it.

:class:`UpdateSnapshots` holds the copies that ``target="update"`` needs: after
the wrapped step, each snapshotted parameter becomes ``before + mask(after - before)``.
"""

from __future__ import annotations

import math
import operator
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, TypeGuard, cast

import torch
from torch import Tensor

from . import kernels
from ._random import StreamKeys, domain_of, stream_key_table
from ._settings import Settings, current_rate

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

__all__ = [
    "Batch",
    "Located",
    "Run",
    "UpdateSnapshots",
    "is_dtensor",
    "locate",
    "plan_step",
    "sparse_value_index",
]


class Run(NamedTuple):
    """Parameters that share their settings at this step.

    Attributes:
        params: the parameters.
        positions: each one's position in ``param_groups`` (state-dict numbering).
        rate: their drop rate now (``None`` or 0: not masked).
        target: ``"gradient"`` or ``"update"``.
        granularity: ``"element"``, ``"row"`` or ``"tensor"``.
    """

    params: Sequence[Tensor]
    positions: Sequence[int]
    rate: float | None
    target: str
    granularity: str


def plan_step(settings: Settings, param_groups: Sequence[Mapping[str, Any]]) -> list[Run]:
    """Every parameter, once, with its position, rate, target and granularity at this step.

    Schedulers are asked once each: the default once, a group's once, a
    parameter's own once.
    """
    default = settings.default_now()
    own_rates = settings.param_rates
    count = sum(len(group["params"]) for group in param_groups)
    seen: set[int] = set()
    for group in param_groups:
        seen.update(map(id, group["params"]))
    duplicated = len(seen) != count
    seen.clear()
    runs: list[Run] = []
    position = 0
    for i, group in enumerate(param_groups):
        params = group["params"]
        rate = settings.group_rate(i, group, default)
        target = group.get("target", settings.target)
        granularity = group.get("granularity", settings.granularity)
        if not own_rates and not duplicated:
            runs.append(
                Run(params, range(position, position + len(params)), rate, target, granularity)
            )
            position += len(params)
            continue
        for param in params:
            position += 1
            if id(param) in seen:
                continue
            seen.add(id(param))
            # A tensor's hash is a Python call: look it up only when some have rates.
            own = own_rates.get(param, _MISSING) if own_rates else _MISSING
            param_rate = rate if own is _MISSING else current_rate(own, "params")  # type: ignore[arg-type]
            runs.append(Run([param], [position - 1], param_rate, target, granularity))
    return runs


_MISSING = object()


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


def sparse_value_index(coalesced: Tensor) -> Tensor:
    """Dense flat index of every element of a coalesced COO tensor's values (int64).

    The values have shape ``(nnz, *dense_dims)``; element ``(n, j...)`` sits at
    dense position ``(indices[:, n], j...)`` of the whole tensor.
    """
    indices = coalesced._indices()
    shape = coalesced.shape
    sparse_dims = indices.shape[0]
    dense_shape = shape[sparse_dims:]
    dense_size = math.prod(dense_shape)
    flat = torch.zeros(indices.shape[1], dtype=torch.int64, device=indices.device)
    for dim in range(sparse_dims):
        flat = flat * shape[dim] + indices[dim]
    inner = torch.arange(dense_size, dtype=torch.int64, device=indices.device)
    return (flat.unsqueeze(1) * dense_size + inner).view(-1, *dense_shape)


_DTYPE_OF = operator.attrgetter("dtype")
_DEVICE_OF = operator.attrgetter("device")
_LAYOUT_OF = operator.attrgetter("layout")
_GRAD_OF = operator.attrgetter("grad")


def uniform_dense(tensors: list[Any]) -> tuple[torch.device, torch.dtype] | None:
    """The device and dtype of ``tensors`` when all are plain dense tensors sharing them."""
    if not tensors or set(map(type, tensors)) != {Tensor}:
        return None  # a None, a subclass (DTensor) or nothing at all
    if set(map(_LAYOUT_OF, tensors)) != {torch.strided}:
        return None
    dtypes = set(map(_DTYPE_OF, tensors))
    devices = set(map(_DEVICE_OF, tensors))
    if len(dtypes) != 1 or len(devices) != 1:
        return None
    return next(iter(devices)), next(iter(dtypes))


class _Bucket(NamedTuple):
    values: list[Tensor]
    starts: list[int]
    indices: list[Tensor | None]
    positions: list[int]


class _Shaped(NamedTuple):
    position: int
    located: Located
    rate: float
    granularity: str


class Batch:
    """The tensors a step masks, bucketed; :meth:`mask_` masks them all.

    Args:
        scale: factor applied to every tensor added, masked or not
            (``1 / (1 - q)`` under full update drop).
    """

    def __init__(self, scale: float) -> None:
        self.scale = scale
        self._buckets: dict[tuple[torch.device, torch.dtype, float], _Bucket] = {}
        self._shaped: list[_Shaped] = []
        self._scaled: list[Tensor] = []

    def _bucket(self, device: torch.device, dtype: torch.dtype, rate: float) -> _Bucket:
        bucket = self._buckets.get((device, dtype, rate))
        if bucket is None:
            bucket = self._buckets[(device, dtype, rate)] = _Bucket([], [], [], [])
        return bucket

    def add(self, position: int, located: Located, rate: float | None, granularity: str) -> None:
        """Add one located tensor of the parameter at ``position``."""
        values = located.values
        if not rate:
            if self.scale != 1.0:
                self._scaled.append(values)
            return
        if granularity == "element" or (granularity == "row" and values.dim() <= 1):
            bucket = self._bucket(values.device, values.dtype, rate)
            bucket.values.append(values)
            bucket.starts.append(located.start)
            bucket.indices.append(located.index)
            bucket.positions.append(position)
        elif values.numel():
            self._shaped.append(_Shaped(position, located, rate, granularity))

    def add_gradients(self, run: Run) -> None:
        """Add the gradients of a run's parameters (``None`` ones are skipped).

        A masked sparse gradient is coalesced first (duplicate indices must be
        summed before logical elements are masked) and put back into ``.grad``.
        """
        if not run.rate and self.scale == 1.0:
            return
        grads = list(map(_GRAD_OF, run.params))
        if run.rate and run.granularity == "element":
            uniform = uniform_dense(grads)
            if uniform is not None:
                # The usual run: every gradient present, dense, of one dtype and
                # device; checked a property at a time rather than per gradient.
                bucket = self._bucket(*uniform, run.rate)
                bucket.values.extend(cast(list[Tensor], grads))
                bucket.starts.extend([0] * len(grads))
                bucket.indices.extend([None] * len(grads))
                bucket.positions.extend(run.positions)
                return
        for param, grad, position in zip(run.params, grads, run.positions):
            if grad is None:
                continue
            if grad.is_sparse:
                if not run.rate:
                    # Scaling uncoalesced values is exact, so .grad stays as it was.
                    self.add(position, Located(grad._values()), run.rate, run.granularity)
                    continue
                grad = grad.coalesce()
                param.grad = grad
            self.add(position, locate(grad), run.rate, run.granularity)

    @torch.no_grad()
    def mask_(self, seed: int, step: int, distribution: str) -> None:
        """Mask (and scale) everything added, in place, with each parameter's keyed stream."""
        if self._scaled:
            torch._foreach_mul_(self._scaled, self.scale)
        domain = domain_of(distribution)
        for (_, _, rate), bucket in self._buckets.items():
            keys = StreamKeys(seed, domain, step, bucket.positions)
            indices = None if bucket.indices.count(None) == len(bucket.indices) else bucket.indices
            kernels.mask_(
                bucket.values,
                bucket.starts,
                keys,
                rate,
                distribution,
                scale=self.scale,
                indices=indices,
            )
        if self._shaped:
            table = stream_key_table(seed, domain, step, [entry.position for entry in self._shaped])
            for row, entry in enumerate(self._shaped):
                _mask_rows_(entry, table[row], distribution, self.scale)


def _mask_rows_(entry: _Shaped, key: Tensor, distribution: str, scale: float) -> None:
    """Row or tensor granularity: mask a vector of ones, one per row (or one in all),
    with the element kernel, and multiply each row by its entry."""
    located = entry.located
    values = located.values
    device, dtype = values.device, kernels.noise_dtype(values.dtype)
    if entry.granularity == "tensor":
        ones, start, index = torch.ones(1, dtype=dtype, device=device), 0, None
    elif located.row_index is not None:
        ones = torch.ones(located.row_index.shape, dtype=dtype, device=device)
        start, index = 0, located.row_index
    else:
        ones, start, index = (
            torch.ones(located.row_count(), dtype=dtype, device=device),
            located.first_row,
            None,
        )
    kernels.mask_([ones], [start], key, entry.rate, distribution, scale=scale, indices=[index])
    if entry.granularity == "tensor":
        multiplier = float(ones[0])
        if distribution == "bernoulli" and multiplier == 0.0:
            values.zero_()
        else:
            values.mul_(multiplier)
    else:
        _apply_rows_(located, ones, distribution == "bernoulli")


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


class UpdateSnapshots:
    """Copies of the parameters whose update is masked, taken before the wrapped step.

    Each copy is of the local data (a DTensor's shard); together they cost one
    copy of every update-masked parameter, released after the step.
    """

    def __init__(self, runs: Iterable[Run]) -> None:
        self._entries: list[tuple[int, Located, Tensor, float | None, str]] = []
        with torch.no_grad():
            for run in runs:
                for param, position in zip(run.params, run.positions):
                    located = locate(param.detach())
                    clone = located.values.clone()
                    self._entries.append((position, located, clone, run.rate, run.granularity))

    def __bool__(self) -> bool:
        return bool(self._entries)

    @torch.no_grad()
    def mask_updates(self, batch: Batch, seed: int, step: int, distribution: str) -> None:
        """Turn each parameter into ``before + mask(after - before)``, in place."""
        for _, located, before, _, _ in self._entries:
            located.values.sub_(before)
        for position, located, _, rate, granularity in self._entries:
            batch.add(position, located, rate, granularity)
        batch.mask_(seed, step, distribution)
        for _, located, before, _, _ in self._entries:
            located.values.add_(before)
        self._entries = []
