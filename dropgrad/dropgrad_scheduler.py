"""Drop-rate schedulers: the drop rate as a function of the optimizer step.

A scheduler is a small stateful object. ``get_drop_rate()`` answers the rate at
the current ``step_count``; ``step()`` advances it. When a scheduler is handed to
``dropgrad.DropGrad``, DropGrad advances it exactly once per optimizer step,
after that step's masks are drawn, so the k-th ``DropGrad.step()`` (0-based) uses
the value at ``step_count == k``. Users never step a scheduler they gave to
DropGrad.
"""

from __future__ import annotations

import copy
import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

from ._rates import check_probability

__all__ = [
    "CosineAnnealingDropRateScheduler",
    "DropRateScheduler",
    "LinearDropRateScheduler",
    "StepDropRateScheduler",
]


def _check_step_index(value: Any, argument: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{argument} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{argument} must be >= {minimum}, got {value!r}")
    return int(value)


class DropRateScheduler(ABC):
    """Base class of drop-rate schedulers.

    Subclasses implement ``get_drop_rate``, which returns the rate at the
    current ``step_count`` as a float in ``[0, 1]``. Everything else
    (stepping, checkpointing) is provided. The constructor takes no arguments;
    a subclass that defines its own calls ``super().__init__()``.

    ``state_dict()`` holds every instance attribute, so a subclass that keeps its
    configuration in plain attributes (numbers, strings, dicts and lists of them)
    checkpoints without further code.

    Examples:
        >>> class Halving(DropRateScheduler):
        ...     def __init__(self, rate):
        ...         super().__init__()
        ...         self.rate = rate
        ...     def get_drop_rate(self):
        ...         return self.rate / 2 ** self.step_count
        >>> s = Halving(0.4)
        >>> s.step()
        >>> s.get_drop_rate()
        0.2
    """

    step_count: int = 0
    """Steps taken so far. A class default, so a subclass that skips
    ``super().__init__()`` still starts at 0."""

    def __init__(self) -> None:
        self.step_count = 0

    @abstractmethod
    def get_drop_rate(self) -> float:
        """The drop rate at the current ``step_count``."""

    def step(self) -> None:
        """Advance the schedule by one optimizer step."""
        self.step_count += 1

    def state_dict(self) -> dict[str, Any]:
        """A copy of the scheduler's attributes, loadable with ``torch.load(weights_only=True)``."""
        return {"step_count": self.step_count, **copy.deepcopy(self.__dict__)}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore attributes saved by ``state_dict``.

        Raises:
            TypeError: ``state_dict`` is not a mapping.
            ValueError: it has no valid ``step_count``.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        if "step_count" not in state_dict:
            raise ValueError(
                f"{type(self).__name__} state_dict has no 'step_count' entry; "
                f"keys are {sorted(state_dict)}"
            )
        _check_step_index(state_dict["step_count"], "state_dict['step_count']", minimum=0)
        self.__dict__.update(copy.deepcopy(dict(state_dict)))

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items())
        return f"{type(self).__name__}({fields})"


class _TwoEndScheduler(DropRateScheduler):
    """Shared validation of schedulers that move from one rate to another."""

    def __init__(self, initial_drop_rate: float, final_drop_rate: float, num_steps: int) -> None:
        super().__init__()
        self.initial_drop_rate = check_probability(initial_drop_rate, "initial_drop_rate")
        self.final_drop_rate = check_probability(final_drop_rate, "final_drop_rate")
        self.num_steps = _check_step_index(num_steps, "num_steps", minimum=1)

    def _progress(self) -> float:
        """Fraction of the schedule done, clamped to ``[0, 1]``."""
        return min(self.step_count, self.num_steps) / self.num_steps


class LinearDropRateScheduler(_TwoEndScheduler):
    """Straight line from ``initial_drop_rate`` at step 0 to ``final_drop_rate`` at ``num_steps``.

    A ``DropRateScheduler``: at step ``k`` the rate is
    ``initial_drop_rate + (final_drop_rate - initial_drop_rate) * min(k, num_steps) / num_steps``,
    so it stays at ``final_drop_rate`` after ``num_steps``.

    Args:
        initial_drop_rate: rate at step 0, in ``[0, 1]``.
        final_drop_rate: rate from step ``num_steps`` on, in ``[0, 1]``.
        num_steps: length of the ramp, an int >= 1.

    Raises:
        TypeError: a rate is not a real number, or ``num_steps`` is not an int.
        ValueError: a rate is outside ``[0, 1]`` or NaN, or ``num_steps < 1``.

    Examples:
        >>> s = LinearDropRateScheduler(0.4, 0.0, num_steps=4)
        >>> rates = []
        >>> for _ in range(6):
        ...     rates.append(round(s.get_drop_rate(), 3)); s.step()
        >>> rates
        [0.4, 0.3, 0.2, 0.1, 0.0, 0.0]
    """

    def get_drop_rate(self) -> float:
        # start + (end - start) can miss end in the last bit; the end is returned as given.
        if self.step_count >= self.num_steps:
            return self.final_drop_rate
        start, end = self.initial_drop_rate, self.final_drop_rate
        return start + (end - start) * self._progress()


class CosineAnnealingDropRateScheduler(_TwoEndScheduler):
    """Half cosine from ``initial_drop_rate`` at step 0 to ``final_drop_rate`` at ``num_steps``.

    A ``DropRateScheduler``: at step ``k`` the rate is
    ``final + (initial - final) * (1 + cos(pi * min(k, num_steps) / num_steps)) / 2``,
    so it stays at ``final_drop_rate`` after ``num_steps``.

    Args:
        initial_drop_rate: rate at step 0, in ``[0, 1]``.
        final_drop_rate: rate from step ``num_steps`` on, in ``[0, 1]``.
        num_steps: length of the schedule, an int >= 1.

    Raises:
        TypeError: a rate is not a real number, or ``num_steps`` is not an int.
        ValueError: a rate is outside ``[0, 1]`` or NaN, or ``num_steps < 1``.

    Examples:
        >>> s = CosineAnnealingDropRateScheduler(0.2, 0.0, num_steps=2)
        >>> round(s.get_drop_rate(), 6)
        0.2
        >>> s.step(); round(s.get_drop_rate(), 6)
        0.1
    """

    def get_drop_rate(self) -> float:
        # end + (start - end) can miss start in the last bit; both ends are returned as given.
        if self.step_count == 0:
            return self.initial_drop_rate
        if self.step_count >= self.num_steps:
            return self.final_drop_rate
        start, end = self.initial_drop_rate, self.final_drop_rate
        return end + (start - end) * (1.0 + math.cos(math.pi * self._progress())) / 2.0


class StepDropRateScheduler(DropRateScheduler):
    """Piecewise-constant rate.

    A ``DropRateScheduler`` whose rate changes at the steps listed in
    ``drop_rate_schedule`` and stays constant in between.

    Args:
        initial_drop_rate: rate before the first step listed in the schedule.
        drop_rate_schedule: maps a step index (int >= 0) to the rate that holds
            from that step on, until the next listed step.

    Raises:
        TypeError: the schedule is not a mapping, a key is not an int, or a rate
            is not a real number.
        ValueError: a key is negative, or a rate is outside ``[0, 1]`` or NaN.

    Examples:
        >>> s = StepDropRateScheduler(0.3, {2: 0.1, 4: 0.0})
        >>> rates = []
        >>> for _ in range(5):
        ...     rates.append(s.get_drop_rate()); s.step()
        >>> rates
        [0.3, 0.3, 0.1, 0.1, 0.0]
    """

    def __init__(self, initial_drop_rate: float, drop_rate_schedule: Mapping[int, float]) -> None:
        super().__init__()
        self.initial_drop_rate = check_probability(initial_drop_rate, "initial_drop_rate")
        if not isinstance(drop_rate_schedule, Mapping):
            raise TypeError(
                "drop_rate_schedule must be a mapping from step index to drop rate, "
                f"got {type(drop_rate_schedule).__name__}"
            )
        schedule: dict[int, float] = {}
        for step, rate in drop_rate_schedule.items():
            index = _check_step_index(step, "drop_rate_schedule key", minimum=0)
            schedule[index] = check_probability(rate, f"drop_rate_schedule[{step!r}]")
        self.drop_rate_schedule = dict(sorted(schedule.items()))

    def get_drop_rate(self) -> float:
        rate = self.initial_drop_rate
        for step, scheduled in self.drop_rate_schedule.items():
            if step > self.step_count:
                break
            rate = scheduled
        return rate
