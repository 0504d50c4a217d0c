"""The reference implementation: what a mask *is*, one tensor at a time.

Every backend computes exactly these bits; the golden-digest and backend tests
hold each one to this module. Nothing here is fast, and nothing needs to be.

Every random decision comes from the keyed word streams of ``dropgrad._random``:
the decision for element ``i`` of a parameter is a function of that parameter's
stream key and ``i``, the element's index in the whole (unsharded, flattened)
parameter.

**Bernoulli.** Element ``i`` reads the 16-bit lane ``i % 2`` of word ``i // 2``
(the low half for even ``i``), takes its value ``v`` as a signed 16-bit integer
plus 32768 (the unsigned bits with the top bit flipped, a uniform value in
``[0, 65536)``) and is dropped when ``v < t = round(p * 65536)`` (at most 65535
for ``p < 1``). The realized drop probability is exactly ``t / 65536`` (within
``2**-17`` of ``p``; ``2**-16`` just below 1) and survivors are multiplied by
``factor = scale * 65536 / (65536 - t)``, the inverse of the keep probability
actually realized, so the expected result equals the input exactly. A dropped
element becomes +0, NaN and inf included.

**Gaussian.** Element ``i`` reads words ``2i`` and ``2i + 1`` of its noise stream
as two uniforms and turns them into one standard normal ``z`` by Box-Muller (in
float64), giving the multiplier ``(1 + z * sigma) * scale`` with
``sigma = sqrt(p / (1 - p))``, applied in the tensor's noise dtype
(:func:`noise_dtype`).

Rates that need no random numbers (0 and 1) are handled before any backend is
called (see ``_dispatch.py``): backends only ever see ``1 <= t <= 65535`` and
``0 < p < 1``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .._random import StreamKey, words_reference

__all__ = [
    "LANE_LEVELS",
    "LANE_OFFSET",
    "accepts",
    "bernoulli_",
    "contiguous_copies",
    "gaussian_",
    "gaussian_sigma",
    "lanes_reference",
    "noise_dtype",
    "normals",
    "quantize_rate",
]

LANE_LEVELS = 1 << 16
# Lanes are read as signed int16, so thresholds are shifted by half the range.
LANE_OFFSET = 1 << 15
_MASK32 = (1 << 32) - 1


def accepts(values: Sequence[Tensor], distribution: str) -> bool:
    """The reference masks anything: every dtype, device and layout of index."""
    return True


def quantize_rate(rate: float) -> tuple[int, float]:
    """Threshold on 16-bit lanes for ``rate`` and the survivor scale it implies.

    Returns:
        ``(threshold, keep_scale)`` where ``threshold / 65536`` is the realized
        drop probability and ``keep_scale = 65536 / (65536 - threshold)``
        (``inf`` when every element is dropped, which only a rate of 1 does).
    """
    if rate >= 1.0:
        return LANE_LEVELS, math.inf
    # A rate just below 1 keeps at least one level, so the result stays
    # unbiased instead of being rounded to "drop everything".
    threshold = min(round(rate * LANE_LEVELS), LANE_LEVELS - 1)
    return threshold, LANE_LEVELS / (LANE_LEVELS - threshold)


def gaussian_sigma(rate: float) -> float:
    """The Gaussian multiplier's standard deviation, the Bernoulli mask's: ``sqrt(p / (1 - p))``."""
    return math.sqrt(rate / (1.0 - rate))


def noise_dtype(dtype: torch.dtype) -> torch.dtype:
    """Real dtype multipliers are computed in: float64 for double types, float32 otherwise."""
    return torch.float64 if dtype in (torch.float64, torch.complex128) else torch.float32


def global_index(values: Tensor, start: int, index: Tensor | None) -> Tensor:
    """Global flat index of every element of ``values`` (int64, flattened)."""
    if index is not None:
        return index.reshape(-1).to(torch.int64)
    count = values.numel()
    return torch.arange(start, start + count, dtype=torch.int64, device=values.device)


def lanes_reference(key: StreamKey, index: Tensor) -> Tensor:
    """The lane value of each global element ``index`` (int64 values in ``[0, 65536)``).

    The value is the element's 16 bits read as a signed integer plus 32768,
    which is how the torch-op backend compares them (as ``int16``); it equals
    the unsigned bits with the top bit flipped.
    """
    words = words_reference(key, index >> 1)
    return ((words >> ((index & 1) * 16)) & 0xFFFF) ^ LANE_OFFSET


def normals(first: Tensor, second: Tensor) -> Tensor:
    """Standard normals (float64) from pairs of 32-bit words, by Box-Muller.

    The words are read as unsigned and centred in their cells, so the uniforms
    lie strictly inside (0, 1) and the logarithm is finite.
    """
    to_unit = 1.0 / 4294967296.0
    u1 = ((first.to(torch.int64) & _MASK32).to(torch.float64) + 0.5) * to_unit
    u2 = ((second.to(torch.int64) & _MASK32).to(torch.float64) + 0.5) * to_unit
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)


def contiguous_copies(
    tensors: Sequence[Tensor],
) -> tuple[list[Tensor], list[tuple[Tensor, Tensor]]]:
    """Contiguous versions of ``tensors`` and the ``(original, copy)`` pairs to write back."""
    if all(map(Tensor.is_contiguous, tensors)):  # the usual case, without a loop in Python
        return list(tensors), []
    dense: list[Tensor] = []
    write_back: list[tuple[Tensor, Tensor]] = []
    for tensor in tensors:
        if tensor.is_contiguous():
            dense.append(tensor)
        else:
            copy = tensor.contiguous()
            dense.append(copy)
            write_back.append((tensor, copy))
    return dense, write_back


def _keys(keys: Tensor) -> list[StreamKey]:
    return [StreamKey._make(row) for row in keys.reshape(-1, 2).tolist()]


def bernoulli_(
    values: Sequence[Tensor],
    starts: Sequence[int],
    keys: Tensor,
    threshold: int,
    factor: float,
    indices: Sequence[Tensor | None] | None = None,
) -> None:
    """Drop elements in place: lane value below ``threshold`` -> +0, the rest times ``factor``.

    Args:
        values: tensors of one dtype on one device, any strides.
        starts: each tensor's first global index (ignored where ``indices`` has one).
        keys: int64 ``(len(values), 2)``: each tensor's stream key ``a, b``.
        threshold: in ``[1, 65535]``.
        factor: survivors' multiplier, ``scale * keep_scale``.
        indices: per tensor, ``None`` (consecutive from its start) or the global
            index of every element (int64, the tensor's shape).
    """
    for number, (tensor, key) in enumerate(zip(values, _keys(keys))):
        index = None if indices is None else indices[number]
        drop = lanes_reference(key, global_index(tensor, starts[number], index)) < threshold
        tensor.masked_fill_(drop.view(tensor.shape), 0).mul_(factor)


def gaussian_(
    values: Sequence[Tensor],
    starts: Sequence[int],
    keys: Tensor,
    sigma: float,
    scale: float,
    indices: Sequence[Tensor | None] | None = None,
) -> None:
    """Multiply each tensor in place by ``(1 + z * sigma) * scale``; arguments as for
    :func:`bernoulli_`, with ``sigma`` from :func:`gaussian_sigma`."""
    for number, (tensor, key) in enumerate(zip(values, _keys(keys))):
        index = global_index(tensor, starts[number], None if indices is None else indices[number])
        z = normals(words_reference(key, 2 * index), words_reference(key, 2 * index + 1))
        noise = (z * sigma + 1.0).to(noise_dtype(tensor.dtype))
        if scale != 1.0:
            noise.mul_(scale)
        tensor.mul_(noise.view(tensor.shape))
