"""Counter-based randomness: every random bit is a pure function of its coordinates.

DropGrad keeps no random-number-generator state. The keep-or-drop decision for
element ``i`` of parameter ``k`` at DropGrad step ``s`` is computed from
``(seed, s, k, i)`` alone, so it is the same on every device, in every process
and under every way of cutting the parameter into shards, and a checkpoint
needs only the seed and the step counter to resume the exact mask sequence.

The construction has two levels:

* **Stream keys** (:func:`stream_key`, plain Python integers). The 64-bit
  SplitMix64 finalizer is chained over the seed, a domain constant (masks,
  Gaussian noise and full-update skips use different ones), the step and the
  parameter index. Each link is a bijection of 64-bit integers, so distinct
  ``(step, index)`` pairs under one seed give distinct keys. A key is split
  into an odd 32-bit multiplier ``a`` and a 32-bit offset ``b``.
* **Words** (:func:`hash_words_`, tensor ops). Word ``w`` of a stream is
  ``lowbias32(b + a * w mod 2**32)``, where ``lowbias32`` is a 32-bit
  xorshift-multiply integer hash (C. Wellons' "hash prospector", bias about
  0.17, lower than MurmurHash3's finalizer). Because ``a`` differs between
  streams, two streams never run through the same hash inputs in the same
  order: their inputs coincide only at isolated positions, as two independent
  random sequences would, never along a shifted run.

Each 32-bit word holds two 16-bit *lanes*: element ``2w`` of a parameter reads
the low half of word ``w`` and element ``2w + 1`` the high half (on a
little-endian machine this is simply the word buffer viewed as ``int16``).
The Gaussian variant reads two whole words per element (see ``kernels/_reference.py``).

torch has no unsigned 32-bit arithmetic, so words live in ``int32`` tensors;
multiplication and addition wrap modulo ``2**32`` exactly as unsigned
arithmetic would, and a logical right shift is an arithmetic shift followed by
a mask that clears the copied sign bits.
"""

from __future__ import annotations

import numbers
import sys
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "GAUSSIAN_DOMAIN",
    "MASK_DOMAIN",
    "SEED_LIMIT",
    "SKIP_DOMAIN",
    "StreamKey",
    "StreamKeys",
    "default_seed",
    "domain_of",
    "hash_words_",
    "resolve_seed",
    "signed_int32",
    "skip_decision",
    "splitmix64",
    "stream_key",
    "stream_key_table",
    "words_reference",
]

SEED_LIMIT = 2**64
_MASK64 = (1 << 64) - 1
_MASK32 = (1 << 32) - 1
_GOLDEN_GAMMA = 0x9E3779B97F4A7C15
# Domain constants keep the streams of different purposes apart: a mask stream
# and a skip stream never share a key, whatever the step and index.
MASK_DOMAIN = 0x6D61736B  # "mask"
GAUSSIAN_DOMAIN = 0x6E6F6973  # "nois"
SKIP_DOMAIN = 0x736B6970  # "skip"
# Domain of the seed derived from torch's initial seed, so DropGrad's bits are
# unrelated to the numbers torch's own generator produces from that seed.
_DEFAULT_SEED_DOMAIN = 0x64656661  # "defa"

# lowbias32 constants (Wellons), as signed int32 for torch.
_HASH_MUL1 = 0x7FEB352D
_HASH_MUL2 = 0x846CA68B - (1 << 32)

if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for is little-endian
    raise ImportError("dropgrad's lane layout assumes a little-endian machine")


def splitmix64(value: int) -> int:
    """The SplitMix64 output function of ``value + golden gamma`` (64-bit, a bijection)."""
    z = (value + _GOLDEN_GAMMA) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _to_int32(value: int) -> int:
    """The signed int32 with the same 32 bits as ``value``."""
    value &= _MASK32
    return value - (1 << 32) if value >= 1 << 31 else value


class StreamKey(NamedTuple):
    """The two halves of a stream key: word ``w`` hashes ``b + a * w`` (mod ``2**32``)."""

    a: int  # odd, in [0, 2**32)
    b: int  # in [0, 2**32)

    def start(self, word: int) -> int:
        """Hash input of word ``word``, as a signed int32 for torch."""
        return _to_int32(self.b + self.a * word)

    @property
    def multiplier(self) -> int:
        """``a`` as a signed int32 for torch."""
        return _to_int32(self.a)


def stream_key(seed: int, domain: int, step: int, index: int) -> StreamKey:
    """The key of the stream for ``(seed, domain, step, index)``.

    ``step`` and ``index`` are non-negative ints below ``2**64``; ``index`` is
    the parameter's position in ``param_groups`` (0 for streams that are not
    per parameter).
    """
    key = splitmix64(seed ^ domain)
    key = splitmix64(key ^ (step & _MASK64))
    key = splitmix64(key ^ (index & _MASK64))
    return StreamKey(a=(key & _MASK32) | 1, b=key >> 32)


def _signed64(value: int) -> int:
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def _splitmix64_tensor(values: Tensor) -> Tensor:
    """:func:`splitmix64` of every int64 element (read as unsigned 64-bit), wrapping."""
    z = values + _signed64(_GOLDEN_GAMMA)
    for shift, multiplier in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB), (31, 0)):
        # z ^= z >>> shift, with the sign bits of the arithmetic shift cleared.
        z = z ^ ((z >> shift) & ((1 << (64 - shift)) - 1))
        if multiplier:
            z = z * _signed64(multiplier)
    return z


def domain_of(distribution: str) -> int:
    """The domain of a distribution's mask streams: Bernoulli lanes or Gaussian noise."""
    return GAUSSIAN_DOMAIN if distribution == "gaussian" else MASK_DOMAIN


def stream_key_table(seed: int, domain: int, step: int, indices: Sequence[int]) -> Tensor:
    """:func:`stream_key` for many parameter indices at once, as a CPU int64 tensor of
    shape ``(n, 2)``: ``a, b`` per row (vectorized, the same values).

    A step of a model with a thousand parameters needs a thousand keys; one
    SplitMix64 round per key in Python would cost milliseconds, and kernels read
    their keys from this table without one Python object per key.
    """
    step_key = StreamKeys(seed, domain, step, ()).step_key()
    # Parameter positions fit in int64; larger indices take the exact signed form.
    positions = list(indices)
    if positions and max(positions) >= 1 << 63:
        positions = [_signed64(i) for i in positions]
    keys = _splitmix64_tensor(torch.tensor(positions, dtype=torch.int64) ^ _signed64(step_key))
    keys = keys.reshape(-1)
    return torch.stack(((keys & _MASK32) | 1, (keys >> 32) & _MASK32), dim=1)


class StreamKeys(NamedTuple):
    """The keys of a bucket's streams, described rather than computed.

    A kernel that derives keys itself (the Triton kernel, from the seed's hash,
    the step and each tensor's position, on the device) takes this as it is;
    every other backend reads :meth:`table`, the same keys as a CPU tensor.
    """

    seed: int
    domain: int
    step: int
    positions: Sequence[int]

    def table(self) -> Tensor:
        """:func:`stream_key_table` of these positions."""
        return stream_key_table(self.seed, self.domain, self.step, self.positions)

    def select(self, rows: Sequence[int]) -> StreamKeys:
        """The keys of the tensors at ``rows`` of the bucket."""
        return self._replace(positions=[self.positions[row] for row in rows])

    def step_key(self) -> int:
        """The 64-bit value that, XORed with a position and put through one SplitMix64
        round, gives the position's key (what :func:`stream_key` computes in between)."""
        return splitmix64(splitmix64(self.seed ^ self.domain) ^ (self.step & _MASK64))


def signed_int32(values: Tensor) -> Tensor:
    """int64 values in ``[0, 2**32)`` as the int32 values with the same 32 bits."""
    return (values - ((values >> 31) << 32)).to(torch.int32)


def skip_decision(seed: int, step: int, probability: float) -> bool:
    """Whether full update drop skips step ``step``: a function of ``(seed, step)`` only.

    The uniform number is the top 53 bits of one more SplitMix64 round of the
    skip stream's key, so every rank and every resumed run decides alike.
    """
    if probability <= 0.0:
        return False
    if probability >= 1.0:
        return True
    key = stream_key(seed, SKIP_DOMAIN, step, 0)
    uniform = (splitmix64((key.b << 32) | key.a) >> 11) / float(1 << 53)
    return uniform < probability


def hash_words_(words: Tensor, scratch: Tensor) -> Tensor:
    """Hash ``words`` (int32, holding the hash inputs) in place; returns ``words``.

    ``scratch`` is an int32 tensor of the same shape that the logical shifts
    write into. Eleven elementwise ops; every op wraps modulo ``2**32``.
    """
    for shift, multiplier in ((16, _HASH_MUL1), (15, _HASH_MUL2), (16, 0)):
        # x ^= x >>> shift, with the sign bits of the arithmetic shift cleared.
        torch.bitwise_right_shift(words, shift, out=scratch)
        scratch.bitwise_and_((1 << (32 - shift)) - 1)
        words.bitwise_xor_(scratch)
        if multiplier:
            words.mul_(multiplier)
    return words


def words_reference(key: StreamKey, word_index: Tensor) -> Tensor:
    """Word ``word_index`` of stream ``key``, as int64 values in ``[0, 2**32)``.

    The plain path: every step is done in int64 and masked to 32 bits, so no op
    relies on wrapping. The fast paths are tested bit-for-bit against it.
    """
    x = (word_index.to(torch.int64) * key.a + key.b) & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def resolve_seed(seed: Any) -> int:
    """Validate ``seed`` or, for ``None``, derive the default seed.

    Raises:
        TypeError: ``seed`` is not an int (bools are refused).
        ValueError: ``seed`` is outside ``[0, 2**64)``.
    """
    if seed is None:
        return default_seed()
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__} {seed!r}")
    value = int(seed)
    if not 0 <= value < SEED_LIMIT:
        raise ValueError(f"seed must be in [0, 2**64), got {seed!r}")
    return value


def default_seed() -> int:
    """A seed derived from ``torch.initial_seed()``, drawing nothing from any generator.

    ``torch.manual_seed(n)`` therefore fixes DropGrad's masks too, and building
    DropGrad does not change what the rest of the script draws. Under
    ``torch.distributed`` rank 0's value is broadcast, so replicas whose
    scripts seed torch differently per rank still draw identical masks.
    """
    seed = splitmix64(torch.initial_seed() ^ _DEFAULT_SEED_DOMAIN)
    if dist.is_available() and dist.is_initialized():
        shared = [seed]
        dist.broadcast_object_list(shared, src=0)
        seed = int(shared[0])
    return seed
