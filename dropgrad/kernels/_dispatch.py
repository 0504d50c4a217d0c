"""The one place a mask backend is chosen, and what every backend shares.

:func:`mask_` takes a bucket (tensors of one dtype on one device, masked with
one rate) and does, in order:

1. rate quantization and the trivial rates: a rate that rounds to zero
   computes nothing (rate 0 is bit-identical to not wrapping); a rate of one
   zeroes the tensors instead of multiplying by ``inf``, which would turn
   zeros into NaN;
2. tensors with an explicit index tensor (sparse values, DTensor shards that
   are not one run) go to the reference backend, the only one that takes them;
3. the choice of a backend for the rest: the one pinned by
   ``DROPGRAD_BACKEND``, or the first in :data:`AUTO_ORDER` for the device
   that accepts the bucket; the torch-op backend takes whatever is left;
4. for backends that write through raw data pointers (native, Triton), the
   guards: tensors that require grad under grad mode are left to torch ops
   (which record the change for autograd or refuse it), non-contiguous
   tensors go through contiguous copies that are written back, and each
   tensor's version counter is bumped as an in-place torch op would, so
   autograd notices a masked tensor that a backward pass still needs.

Adding a backend is one module with ``accepts``/``bernoulli_``/``gaussian_``
functions and one :class:`Backend` entry in :data:`BACKENDS` below.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Callable, Sequence
from typing import NamedTuple, cast

import torch
from torch import Tensor

from .._random import StreamKeys
from . import _native, _reference, _torch_ops, _triton
from ._reference import LANE_LEVELS, gaussian_sigma, quantize_rate

__all__ = [
    "AUTO_ORDER",
    "BACKENDS",
    "BACKEND_NAMES",
    "ENVIRONMENT_VARIABLE",
    "Backend",
    "backend_available",
    "mask_",
    "pinned_backend",
    "status",
]

_REQUIRES_GRAD = operator.attrgetter("requires_grad")

#: The environment variable that pins a backend ("auto" or unset: choose per bucket).
ENVIRONMENT_VARIABLE = "DROPGRAD_BACKEND"


def _anywhere() -> str | None:
    return None


class Backend(NamedTuple):
    """One implementation of the mask operations.

    Attributes:
        name: what ``DROPGRAD_BACKEND`` calls it.
        accepts: whether it can mask a bucket ``(tensors, distribution)``
            (tensors of one dtype, once made contiguous for ``raw_pointers``).
        bernoulli: ``(values, starts, keys, threshold, factor)``, see
            ``_reference.bernoulli_``.
        gaussian: ``(values, starts, keys, sigma, scale)``, or ``None``.
        raw_pointers: writes through data pointers, so it needs contiguous
            tensors, no autograd recording and a version-counter bump.
        unavailable: ``None`` when it can run here, else why not.
        bernoulli_keyed: ``bernoulli`` with the keys described
            (:class:`~dropgrad._random.StreamKeys`) rather than tabulated, for a
            backend that derives them where it runs; ``None``: tabulate them.
    """

    name: str
    accepts: Callable[[Sequence[Tensor], str], bool]
    bernoulli: Callable[[Sequence[Tensor], Sequence[int], Tensor, int, float], None]
    gaussian: Callable[[Sequence[Tensor], Sequence[int], Tensor, float, float], None] | None
    raw_pointers: bool = False
    unavailable: Callable[[], str | None] = _anywhere
    bernoulli_keyed: (
        Callable[[Sequence[Tensor], Sequence[int], StreamKeys, int, float], None] | None
    ) = None


# Backends that write through raw data pointers (native, Triton) are marked True.
BACKENDS: dict[str, Backend] = {
    backend.name: backend
    for backend in (
        Backend("reference", _reference.accepts, _reference.bernoulli_, _reference.gaussian_),
        Backend("torch", _torch_ops.accepts, _torch_ops.bernoulli_, _torch_ops.gaussian_),
        Backend(
            "native",
            _native.accepts,
            _native.bernoulli_,
            None,
            True,
            _native.unavailable,
            _native.bernoulli_keyed_,
        ),
        Backend(
            "triton",
            _triton.accepts,
            _triton.bernoulli_,
            None,
            True,
            _triton.unavailable,
            _triton.bernoulli_keyed_,
        ),
    )
}
BACKEND_NAMES = tuple(BACKENDS)
#: Backends tried, in order, when none is pinned; the torch-op backend ends every list.
AUTO_ORDER = {"cpu": ("native",), "cuda": ("triton",)}


def status() -> dict[str, str]:
    """Each backend's state: ``"on"`` or ``"off: <why>"`` (builds the native kernel)."""
    return {name: backend.unavailable() or "on" for name, backend in BACKENDS.items()}


def backend_available(name: str) -> bool:
    """Whether backend ``name`` can run in this process."""
    return BACKENDS[name].unavailable() is None


def pinned_backend() -> str:
    """The backend ``DROPGRAD_BACKEND`` pins, or ``"auto"``.

    Raises:
        ValueError: the variable names no backend.
        RuntimeError: the pinned backend cannot run here (the reason is given).
    """
    name = os.environ.get(ENVIRONMENT_VARIABLE, "auto").strip().lower() or "auto"
    if name == "auto":
        return name
    backend = BACKENDS.get(name)
    if backend is None:
        raise ValueError(
            f"{ENVIRONMENT_VARIABLE} must be 'auto' or one of {BACKEND_NAMES}, got {name!r}"
        )
    reason = backend.unavailable()
    if reason is not None:
        raise RuntimeError(f"{ENVIRONMENT_VARIABLE}={name} pins a backend that is {reason}")
    return name


def mask_(
    values: Sequence[Tensor],
    starts: Sequence[int],
    keys: Tensor | StreamKeys,
    rate: float,
    distribution: str,
    *,
    scale: float = 1.0,
    indices: Sequence[Tensor | None] | None = None,
) -> None:
    """Mask a bucket of tensors in place with their keyed streams.

    Args:
        values: tensors of one dtype on one device (any strides).
        starts: each tensor's first global index in its parameter.
        keys: int64, shape ``(len(values), 2)``: each tensor's stream key ``a, b``
            (``dropgrad._random.stream_key_table``), or those keys described
            (:class:`~dropgrad._random.StreamKeys`, computed only where needed).
        rate: drop probability in ``[0, 1]``; for ``"gaussian"``, the rate whose
            Bernoulli variance the noise matches.
        distribution: ``"bernoulli"`` or ``"gaussian"``.
        scale: extra factor applied to every element (full update drop's).
        indices: per tensor, ``None`` or the global index of every element.

    Raises:
        ValueError, RuntimeError: as for :func:`pinned_backend`.
    """
    if not values:
        return
    bernoulli = distribution == "bernoulli"
    threshold, keep_scale = quantize_rate(rate)
    if threshold == LANE_LEVELS:
        torch._foreach_zero_(list(values))
        return
    if threshold == 0 if bernoulli else rate == 0.0:
        if scale != 1.0:
            torch._foreach_mul_(list(values), scale)
        return
    pinned = pinned_backend()
    described = keys if isinstance(keys, StreamKeys) else None
    table = None if described is not None else cast(Tensor, keys).reshape(-1, 2)
    factor, sigma = scale * keep_scale, gaussian_sigma(rate)

    def key_table() -> Tensor:
        nonlocal table
        if table is None:
            assert described is not None
            table = described.table()
        return table

    def run(backend: Backend, values: Sequence[Tensor], starts: Sequence[int]) -> None:
        if bernoulli and backend.bernoulli_keyed is not None and described is not None:
            backend.bernoulli_keyed(values, starts, described, threshold, factor)
        elif bernoulli:
            backend.bernoulli(values, starts, key_table(), threshold, factor)
        else:
            assert backend.gaussian is not None
            backend.gaussian(values, starts, key_table(), sigma, scale)

    if indices is not None and any(index is not None for index in indices):
        # Only the reference backend takes index tensors.
        indexed = [i for i, index in enumerate(indices) if index is not None]
        chosen = ([values[i] for i in indexed], [starts[i] for i in indexed], key_table()[indexed])
        picked = [indices[i] for i in indexed]
        if bernoulli:
            _reference.bernoulli_(*chosen, threshold, factor, picked)
        else:
            _reference.gaussian_(*chosen, sigma, scale, picked)
        runs = [i for i, index in enumerate(indices) if index is None]
        if not runs:
            return
        values, starts = [values[i] for i in runs], [starts[i] for i in runs]
        table = key_table()[runs]
        described = described.select(runs) if described is not None else None
    if pinned == "auto":
        names = AUTO_ORDER.get(values[0].device.type, ())
    else:
        names = (pinned,)
    for name in names:
        backend = BACKENDS[name]
        if backend.raw_pointers:
            if _raw_pointer_run(backend, values, starts, distribution, run):
                return
        elif backend.accepts(values, distribution):
            run(backend, values, starts)
            return
    torch_ops = _torch_ops.accepts(values, distribution)
    run(BACKENDS["torch" if torch_ops else "reference"], values, starts)


def _raw_pointer_run(
    backend: Backend,
    values: Sequence[Tensor],
    starts: Sequence[int],
    distribution: str,
    run: Callable[[Backend, Sequence[Tensor], Sequence[int]], None],
) -> bool:
    """Run a backend that writes through data pointers; False, with nothing done,
    when the guards or the backend refuse the bucket."""
    if distribution != "bernoulli" and backend.gaussian is None:
        return False
    if torch.is_grad_enabled() and any(map(_REQUIRES_GRAD, values)):
        return False
    dense, write_back = _reference.contiguous_copies(values)
    if not backend.accepts(dense, distribution):
        return False
    run(backend, dense, starts)
    torch.autograd.graph.increment_version(dense)
    for original, copy in write_back:
        original.copy_(copy)
    return True
