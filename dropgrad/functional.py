"""Functional DropGrad: mask one gradient tensor, in place or out of place.

`drop_grad` is differentiable, for gradients built with
``torch.autograd.grad(..., create_graph=True)`` inside meta-learning inner loops,
where Tseng et al. (2020) apply gradient dropout. `drop_grad_` is the
in-place sibling.

Randomness comes in two forms:

* **Keyed** (``seed=...``): the mask is a pure function of
  ``(seed, step, index)`` and each element's position, exactly the mask that
  `DropGrad` built with that ``seed`` applies to parameter
  number ``index`` at its step ``step``. Nothing is drawn from any generator.
* **From a generator** (``generator=...``, or neither argument: torch's default
  generator for the tensor's device): 16-bit lanes drawn as 64-bit words, for
  code that manages ``torch.Generator`` state itself.

Given the same key, or the same generator state, both functions give
bit-identical results (for Gaussian noise drawn from a generator, up to the
``2**20``-element block size of the in-place form).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor

from . import kernels
from ._plan import sparse_value_index
from ._random import domain_of, resolve_seed, stream_key_table
from ._rates import DISTRIBUTIONS, check_distribution, check_probability
from .kernels import LANE_LEVELS, LANE_OFFSET, noise_dtype, quantize_rate

__all__ = ["DISTRIBUTIONS", "check_distribution", "drop_grad", "drop_grad_"]

_COUNTER_LIMIT = 2**64
_LANES_PER_WORD = 4
# The in-place generator form draws its numbers in blocks of this many elements.
_GENERATOR_BLOCK = 1 << 20


def _check_tensor(tensor: Any, function: str) -> Tensor:
    """Gradients are floating or complex tensors; anything else is a caller's mistake."""
    if not isinstance(tensor, Tensor):
        raise TypeError(
            f"{function}: tensor must be a torch.Tensor, got {type(tensor).__name__} {tensor!r}"
        )
    if not (tensor.dtype.is_floating_point or tensor.dtype.is_complex):
        raise TypeError(f"tensor must be floating point or complex, got dtype {tensor.dtype}")
    return tensor


def _check_counter(value: Any, argument: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{argument} must be an int, got {type(value).__name__} {value!r}")
    if not 0 <= int(value) < _COUNTER_LIMIT:
        raise ValueError(f"{argument} must be in [0, 2**64), got {value!r}")
    return int(value)


def _key_of(
    seed: int | None,
    generator: torch.Generator | None,
    step: int,
    index: int,
    distribution: str,
) -> Tensor | None:
    """The stream key for the keyed form (a one-row key table); ``None`` for the
    generator form."""
    step = _check_counter(step, "step")
    index = _check_counter(index, "index")
    if seed is None:
        if step or index:
            raise ValueError(
                f"step and index select a keyed mask and need a seed (got step={step}, "
                f"index={index} and seed=None)"
            )
        return None
    if generator is not None:
        raise ValueError("pass seed (a keyed mask) or generator, not both")
    return stream_key_table(resolve_seed(seed), domain_of(distribution), step, [index])


def _generator_lanes(count: int, device: torch.device, generator: torch.Generator | None) -> Tensor:
    """``count`` uniform 16-bit lanes (int16), from ``ceil(count / 4)`` 64-bit words."""
    words = torch.empty(-(-count // _LANES_PER_WORD), dtype=torch.int64, device=device)
    # from=-2**63 with no upper bound asks for the full 64-bit range: every lane uniform.
    words.random_(-(2**63), None, generator=generator)
    return words.view(torch.int16)[:count]


def _generator_noise(
    count: int,
    rate: float,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator | None,
) -> Tensor:
    """Multiplicative noise from N(1, rate / (1 - rate)), drawn from ``generator``."""
    noise = torch.empty(count, dtype=noise_dtype(dtype), device=device)
    return noise.normal_(1.0, math.sqrt(rate / (1.0 - rate)), generator=generator)


def _multiplier(
    tensor: Tensor, rate: float, distribution: str, key: Tensor | None, generator: Any
) -> Tensor:
    """For Bernoulli, the boolean drop mask; for Gaussian, the noise (``tensor``'s shape)."""
    count, device = tensor.numel(), tensor.device
    if key is None:
        if distribution == "gaussian":
            return _generator_noise(count, rate, tensor.dtype, device, generator).view(tensor.shape)
        threshold, _ = quantize_rate(rate)
        lanes = _generator_lanes(count, device, generator)
        return (lanes < threshold - LANE_OFFSET).view(tensor.shape)
    ones = torch.ones(count, dtype=noise_dtype(tensor.dtype), device=device)
    kernels.mask_([ones], [0], key, rate, distribution)
    if distribution == "gaussian":
        return ones.view(tensor.shape)
    return (ones == 0).view(tensor.shape)


def drop_grad(
    tensor: Tensor,
    drop_rate: float,
    *,
    distribution: str = "bernoulli",
    generator: torch.Generator | None = None,
    seed: int | None = None,
    step: int = 0,
    index: int = 0,
) -> Tensor:
    """Return a copy of ``tensor`` with DropGrad's mask applied; differentiable.

    With ``distribution="bernoulli"`` (the default) each element is zeroed
    independently with probability ``drop_rate`` and survivors are multiplied
    by the inverse of the realized keep probability, so ``E[drop_grad(g)] = g``.
    With ``"gaussian"`` every element is multiplied by noise from
    ``N(1, drop_rate / (1 - drop_rate))``. Complex elements are kept or dropped
    whole. Sparse COO tensors are coalesced and their values masked.

    Args:
        tensor: any floating or complex tensor, dense or sparse COO, any device.
        drop_rate: probability in ``[0, 1]``; 0 returns a copy and computes no
            random numbers, 1 returns zeros.
        distribution: ``"bernoulli"`` or ``"gaussian"``.
        generator: a ``torch.Generator`` on ``tensor``'s device; ``None`` (and
            no ``seed``) uses torch's default generator for that device.
        seed: an int in ``[0, 2**64)`` for a keyed mask: the mask
            `DropGrad` with this seed gives parameter ``index``
            at step ``step`` (element granularity). Default ``None``.
        step: DropGrad step of the keyed mask, an int in ``[0, 2**64)``; default 0.
        index: parameter index of the keyed mask, an int in ``[0, 2**64)``; default 0.

    Returns:
        A new tensor of the same shape, dtype and layout, connected to
        ``tensor`` in the autograd graph.

    Raises:
        TypeError: ``tensor`` is not a floating or complex ``torch.Tensor``,
            or ``drop_rate``, ``seed``, ``step`` or ``index`` is not a number
            of the right kind.
        ValueError: ``drop_rate`` is outside ``[0, 1]`` or NaN,
            ``distribution`` is unknown, both ``seed`` and ``generator`` are
            given, or ``step`` / ``index`` are given without ``seed``.

    Examples:
        >>> g = torch.ones(8)
        >>> out = drop_grad(g, 0.5, seed=0)
        >>> sorted(set(out.tolist())) in ([0.0, 2.0], [2.0], [0.0])
        True
        >>> torch.equal(out, drop_grad(g, 0.5, seed=0))
        True
    """
    _check_tensor(tensor, "drop_grad")
    rate = check_probability(drop_rate, "drop_rate")
    check_distribution(distribution)
    key = _key_of(seed, generator, step, index, distribution)
    if tensor.is_sparse:
        coalesced = tensor.coalesce()
        values = coalesced.values()
        if key is None:
            masked = drop_grad(values, rate, distribution=distribution, generator=generator)
        else:
            masked = _keyed_sparse_values(coalesced, rate, distribution, key)
        # The indices come from a coalesced tensor, so they need no invariant check;
        # saying so also keeps torch from warning that checks are implicitly off.
        return torch.sparse_coo_tensor(
            coalesced.indices(),
            masked,
            coalesced.shape,
            is_coalesced=True,
            check_invariants=False,
        )
    # The trivial cases stay outside no_grad so that their results, too, are
    # connected to ``tensor`` in the autograd graph; masked_fill rather than a
    # multiplication by zero keeps inf and NaN elements from surviving rate 1.
    threshold, keep_scale = quantize_rate(rate)
    if threshold == 0 or (distribution == "gaussian" and rate == 0.0):
        return tensor.clone()
    if rate == 1.0:
        return tensor.masked_fill(torch.ones_like(tensor, dtype=torch.bool), 0)
    with torch.no_grad():
        multiplier = _multiplier(tensor, rate, distribution, key, generator)
    if distribution == "gaussian":
        return (tensor * multiplier).to(tensor.dtype)
    return tensor.masked_fill(multiplier, 0).mul(keep_scale)


def _keyed_sparse_values(coalesced: Tensor, rate: float, distribution: str, key: Tensor) -> Tensor:
    """Mask a coalesced sparse tensor's values by their elements' dense positions."""
    index = sparse_value_index(coalesced)
    values = coalesced.values()
    with torch.no_grad():
        multiplier = torch.ones(values.shape, dtype=torch.float64, device=values.device)
        kernels.mask_([multiplier], [0], key, rate, distribution, indices=[index])
    if distribution == "gaussian":
        return (values * multiplier).to(values.dtype)
    if rate == 1.0:
        return values.masked_fill(torch.ones_like(values, dtype=torch.bool), 0)
    _, keep_scale = quantize_rate(rate)
    return values.masked_fill(multiplier == 0, 0).mul(keep_scale)


def drop_grad_(
    tensor: Tensor,
    drop_rate: float,
    *,
    distribution: str = "bernoulli",
    generator: torch.Generator | None = None,
    seed: int | None = None,
    step: int = 0,
    index: int = 0,
) -> Tensor:
    """In-place `drop_grad` on a dense tensor; returns ``tensor``.

    Takes the same arguments as `drop_grad`. Memory stays bounded: masks
    are computed in blocks of at most ``2**20`` elements.

    Raises:
        TypeError: as for `drop_grad`, or ``tensor`` is sparse (coalesce
            it and mask ``tensor.values()`` instead).
        ValueError: as for `drop_grad`.
    """
    _check_tensor(tensor, "drop_grad_")
    rate = check_probability(drop_rate, "drop_rate")
    check_distribution(distribution)
    key = _key_of(seed, generator, step, index, distribution)
    if tensor.is_sparse:
        raise TypeError(
            "drop_grad_ needs a dense tensor; for a sparse COO tensor coalesce it "
            "and pass tensor.values(), or use drop_grad"
        )
    with torch.no_grad():
        if key is not None:
            kernels.mask_([tensor], [0], key, rate, distribution)
        else:
            _generator_mask_(tensor, rate, distribution, generator)
    return tensor


def _generator_mask_(
    tensor: Tensor, rate: float, distribution: str, generator: torch.Generator | None
) -> None:
    """The generator form in place, in blocks of ``_GENERATOR_BLOCK`` elements drawn in order."""
    threshold, keep_scale = quantize_rate(rate)
    if threshold == 0 or (distribution == "gaussian" and rate == 0.0):
        return
    if threshold == LANE_LEVELS:
        tensor.zero_()
        return
    dense = tensor if tensor.is_contiguous() else tensor.contiguous()
    flat = dense.view(-1)
    for start in range(0, flat.numel(), _GENERATOR_BLOCK):
        block = flat[start : start + _GENERATOR_BLOCK]
        multiplier = _multiplier(block, rate, distribution, None, generator)
        if distribution == "gaussian":
            block.mul_(multiplier)
        else:
            block.masked_fill_(multiplier, 0).mul_(keep_scale)
    if dense is not tensor:
        tensor.copy_(dense)
