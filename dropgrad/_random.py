"""DropGrad's own random number generators, one per device.

Masks and skip decisions never touch torch's global RNG, so wrapping an
optimizer does not change what the rest of a training script draws, and a
checkpoint that stores these generators resumes the exact mask sequence.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DeviceGenerators", "resolve_seed"]

_SEED_LIMIT = 2**63


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


class DeviceGenerators:
    """Lazily created ``torch.Generator`` objects, one per device, from one seed.

    The CPU generator also makes the full-update skip decisions, so those agree
    across devices and across data-parallel ranks.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._generators: dict[str, torch.Generator] = {}
        # States loaded for devices not used yet in this process.
        self._pending: dict[str, torch.Tensor] = {}

    def get(self, device: torch.device) -> torch.Generator:
        """The generator for ``device``, created and seeded on first use."""
        key = _device_key(device)
        generator = self._generators.get(key)
        if generator is None:
            generator = torch.Generator(device=key)
            generator.manual_seed(self.seed)
            if key in self._pending:
                generator.set_state(self._pending.pop(key))
            self._generators[key] = generator
        return generator

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
                f"device name to state tensor, got {state_dict!r}"
            )
        self.seed = resolve_seed(state_dict["seed"])
        self._generators = {}
        self._pending = {str(key): state.clone() for key, state in states.items()}
