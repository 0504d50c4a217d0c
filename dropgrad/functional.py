"""Functional DropGrad: mask one gradient tensor, in place or out of place.

:func:`drop_grad` is differentiable, for gradients built with
``torch.autograd.grad(..., create_graph=True)`` inside meta-learning inner loops,
where Tseng et al. (2020) apply gradient dropout. :func:`drop_grad_` is the
in-place sibling the optimizer uses. Given the same generator state both give
bit-identical Bernoulli masks (and identical Gaussian noise for tensors of up to
``2**20`` elements, the in-place chunk size).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._masking import (
    LANE_LEVELS,
    bernoulli_chunked_,
    draw_drop_mask,
    gaussian_,
    gaussian_noise,
    quantize_rate,
)
from ._rates import check_probability

__all__ = ["DISTRIBUTIONS", "check_distribution", "drop_grad", "drop_grad_"]

DISTRIBUTIONS = ("bernoulli", "gaussian")


def check_distribution(distribution: object) -> str:
    """Return ``distribution`` if it names a supported mask distribution.

    Raises:
        ValueError: it is not ``"bernoulli"`` or ``"gaussian"``.
    """
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    return str(distribution)


def _check_dtype(tensor: Tensor) -> None:
    """Gradients are floating or complex; an integer tensor here is a caller's mistake."""
    if not (tensor.dtype.is_floating_point or tensor.dtype.is_complex):
        raise TypeError(f"tensor must be floating point or complex, got dtype {tensor.dtype}")


def drop_grad(
    tensor: Tensor,
    drop_rate: float,
    *,
    distribution: str = "bernoulli",
    generator: torch.Generator | None = None,
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
        drop_rate: probability in ``[0, 1]``; 0 returns a copy and draws no
            random numbers, 1 returns zeros.
        distribution: ``"bernoulli"`` or ``"gaussian"``.
        generator: a ``torch.Generator`` on ``tensor``'s device; ``None`` uses
            torch's default generator for that device.

    Returns:
        A new tensor of the same shape, dtype and layout, connected to
        ``tensor`` in the autograd graph.

    Raises:
        TypeError: ``drop_rate`` is not a real number, or ``tensor`` is not
            floating point or complex.
        ValueError: ``drop_rate`` is outside ``[0, 1]`` or NaN, or
            ``distribution`` is unknown.

    Examples:
        >>> g = torch.ones(8)
        >>> out = drop_grad(g, 0.5, generator=torch.Generator().manual_seed(0))
        >>> sorted(set(out.tolist())) in ([0.0, 2.0], [2.0], [0.0])
        True
    """
    rate = check_probability(drop_rate, "drop_rate")
    _check_dtype(tensor)
    check_distribution(distribution)
    if tensor.is_sparse:
        coalesced = tensor.coalesce()
        values = drop_grad(coalesced.values(), rate, distribution=distribution, generator=generator)
        # The indices come from a coalesced tensor, so they need no invariant check;
        # saying so also keeps torch from warning that checks are implicitly off.
        return torch.sparse_coo_tensor(
            coalesced.indices(),
            values,
            coalesced.shape,
            is_coalesced=True,
            check_invariants=False,
        )
    # The trivial cases stay outside no_grad so that their results, too, are
    # connected to ``tensor`` in the autograd graph; masked_fill rather than a
    # multiplication by zero keeps inf and NaN elements from surviving rate 1.
    if distribution == "gaussian":
        if rate == 0.0:
            return tensor.clone()
        if rate == 1.0:
            return tensor.masked_fill(torch.ones_like(tensor, dtype=torch.bool), 0)
        with torch.no_grad():
            noise = gaussian_noise(tensor.shape, rate, tensor.dtype, tensor.device, generator)
        return (tensor * noise).to(tensor.dtype)
    threshold, keep_scale = quantize_rate(rate)
    if threshold == 0:
        return tensor.clone()
    if threshold == LANE_LEVELS:
        return tensor.masked_fill(torch.ones_like(tensor, dtype=torch.bool), 0)
    with torch.no_grad():
        drop = draw_drop_mask(tensor.shape, threshold, tensor.device, generator)
    return tensor.masked_fill(drop, 0).mul(keep_scale)


def drop_grad_(
    tensor: Tensor,
    drop_rate: float,
    *,
    distribution: str = "bernoulli",
    generator: torch.Generator | None = None,
) -> Tensor:
    """In-place :func:`drop_grad` on a dense tensor; returns ``tensor``.

    Memory stays bounded: masks are drawn in blocks of at most ``2**20`` elements.

    Raises:
        TypeError: ``drop_rate`` is not a real number, or ``tensor`` is sparse
            (coalesce it and mask ``tensor.values()`` instead).
        ValueError: as for :func:`drop_grad`.
    """
    rate = check_probability(drop_rate, "drop_rate")
    _check_dtype(tensor)
    check_distribution(distribution)
    if tensor.is_sparse:
        raise TypeError(
            "drop_grad_ needs a dense tensor; for a sparse COO tensor coalesce it "
            "and pass tensor.values(), or use drop_grad"
        )
    kernel = gaussian_ if distribution == "gaussian" else bernoulli_chunked_
    with torch.no_grad():
        kernel([tensor], rate, generator)
    return tensor
