"""DropGrad's own random number generators, one per device.

Masks and skip decisions never touch torch's global RNG, so wrapping an
optimizer does not change what the rest of a training script draws, and a
checkpoint that stores these generators resumes the exact mask sequence.
"""

from __future__ import annotations

import hashlib
import numbers
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["SKIP_STREAM", "DeviceGenerators", "resolve_seed"]

_SEED_LIMIT = 2**63
#: Name of the stream that makes full-update skip decisions.
SKIP_STREAM = "skip"


def resolve_seed(seed: Any) -> int:
    """Validate ``seed`` or, for ``None``, draw one from torch's global RNG.

    When ``torch.distributed`` is initialized and ``seed`` is ``None``, rank 0's
    draw is broadcast, so data-parallel replicas that seed torch differently per
    rank still draw identical masks. An explicit seed is used as given on every
    rank.

    Raises:
        TypeError: ``seed`` is not an int (bools are refused).
        ValueError: ``seed`` is outside ``[0, 2**63)``.
    """
    if seed is None:
        drawn = int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
        if dist.is_available() and dist.is_initialized():
            shared = [drawn]
            dist.broadcast_object_list(shared, src=0)
            drawn = int(shared[0])
        return drawn
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__} {seed!r}")
    value = int(seed)
    if not 0 <= value < _SEED_LIMIT:
        raise ValueError(f"seed must be in [0, 2**63), got {seed!r}")
    return value


def _device_key(device: torch.device) -> str:
    """Canonical name of a device, with the current index filled in for bare 'cuda'."""
    if device.type != "cpu" and device.index is None:
        module = getattr(torch, device.type, None)
        if module is not None and hasattr(module, "current_device"):
            device = torch.device(device.type, module.current_device())
    return str(device)


def _describe(value: Any) -> str:
    """A short description of a malformed state, without dumping its tensors."""
    if isinstance(value, Mapping):
        return "a dict with " + ", ".join(
            f"{key!r}: {type(item).__name__}" for key, item in value.items()
        )
    return type(value).__name__


def _stream_seed(seed: int, stream: str) -> int:
    """Seed of a named stream: the base seed itself for the default stream,
    otherwise a 64-bit hash of both, so streams are unrelated to each other."""
    if not stream:
        return seed
    digest = hashlib.blake2b(f"{seed}/{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class DeviceGenerators:
    """Lazily created ``torch.Generator`` objects, one per device and stream, from one seed.

    The default stream of a device draws masks for ordinary (replicated)
    gradients, so data-parallel ranks draw identical masks. Full-update skip
    decisions have a CPU stream of their own (:data:`SKIP_STREAM`), so they do
    not depend on how many mask bits a process consumed and every rank makes
    the same decisions. Sharded gradients use a per-rank stream, so different
    shards of one tensor get independent masks.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._generators: dict[str, torch.Generator] = {}
        # States loaded for devices not used yet in this process.
        self._pending: dict[str, torch.Tensor] = {}

    def get(self, device: torch.device, stream: str = "") -> torch.Generator:
        """The generator of ``stream`` on ``device``, created and seeded on first use."""
        device_name = _device_key(device)
        key = f"{device_name}/{stream}" if stream else device_name
        generator = self._generators.get(key)
        if generator is None:
            generator = torch.Generator(device=device_name)
            generator.manual_seed(_stream_seed(self.seed, stream))
            if key in self._pending:
                generator.set_state(self._pending.pop(key))
            self._generators[key] = generator
        return generator

    def skip_generator(self) -> torch.Generator:
        """The CPU generator of full-update skip decisions, used for nothing else."""
        return self.get(torch.device("cpu"), SKIP_STREAM)

    def state_dict(self) -> dict[str, Any]:
        states = dict(self._pending)
        states.update({key: g.get_state() for key, g in self._generators.items()})
        return {"seed": self.seed, "states": states}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore seed and generator states; devices absent here are restored on first use.

        Raises:
            ValueError: ``state_dict`` is not one :meth:`state_dict` returns.
        """
        states = state_dict.get("states") if isinstance(state_dict, Mapping) else None
        if (
            not isinstance(states, Mapping)
            or not all(isinstance(s, torch.Tensor) for s in states.values())
            or not isinstance(state_dict.get("seed"), numbers.Integral)
        ):
            raise ValueError(
                "generator state must be a dict with an int 'seed' and a dict 'states' of "
                f"device name to state tensor, got {_describe(state_dict)}"
            )
        self.seed = resolve_seed(state_dict["seed"])
        self._generators = {}
        self._pending = {str(key): state.clone() for key, state in states.items()}
