"""Validation of drop rates and resolution of per-parameter rate maps.

Every public entry point that accepts a probability funnels it through
:func:`check_probability`, so the error messages have one shape: they name the
argument, show the value and state the valid range.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

import torch

__all__ = [
    "DISTRIBUTIONS",
    "GRANULARITIES",
    "TARGETS",
    "check_choice",
    "check_distribution",
    "check_full_update_drop",
    "check_probability",
    "match_names",
    "named_parameters_of",
]


def check_probability(value: Any, argument: str) -> float:
    """Return ``value`` as a float in ``[0, 1]`` or raise.

    Raises:
        TypeError: ``value`` is a bool, a string or anything that is not a real number.
        ValueError: ``value`` is NaN, infinite or outside ``[0, 1]``.
    """
    # bool is a subclass of int; True as a rate is almost always a mistake.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{argument} must be a float in [0, 1], got {type(value).__name__} {value!r}"
        )
    try:
        rate = float(value)
    except OverflowError:  # an int too large for a float is out of range, not a crash
        rate = math.inf
    if math.isnan(rate) or not 0.0 <= rate <= 1.0:
        raise ValueError(f"{argument} must be in [0, 1], got {value!r}")
    return rate


def check_full_update_drop(value: Any, default_rate: object) -> bool | float:
    """Validate ``full_update_drop``: ``False``, ``True`` or a probability.

    ``True`` borrows the current default drop rate as the skip probability, so
    it needs one: ``default_rate`` must not be ``None``.

    ``numpy.bool_`` counts as a bool. An int that is not a bool is refused:
    ``1`` would read as "skip every step", which is never what ``True`` means.

    Raises:
        TypeError: ``value`` is an int, or neither a bool nor a real number.
        ValueError: ``value`` is outside ``[0, 1]`` or NaN, or it is ``True``
            while the default drop rate is ``None``.
    """
    if type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"):
        value = bool(value)  # numpy.bool_ (named numpy.bool since NumPy 2)
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        # An int 1 would mean "skip every step", while True means "borrow drop_rate".
        raise TypeError(
            f"full_update_drop must be a bool or a float in [0, 1], got int {value!r}; "
            "pass True to skip with probability drop_rate, or a float such as "
            f"{float(value)!r} for a fixed skip probability"
        )
    if isinstance(value, bool):
        if value and default_rate is None:
            raise ValueError(
                "full_update_drop=True takes its skip probability from drop_rate, but "
                "drop_rate is None; pass a float full_update_drop instead"
            )
        return value
    if not isinstance(value, numbers.Real):
        raise TypeError(
            "full_update_drop must be a bool or a float in [0, 1], "
            f"got {type(value).__name__} {value!r}"
        )
    return check_probability(value, "full_update_drop")


def named_parameters_of(
    param_groups: Iterable[Mapping[str, Any]],
) -> list[tuple[str, torch.Tensor]]:
    """The ``(name, parameter)`` pairs an optimizer knows names for.

    Names come from a group's ``param_names`` list (torch fills it when the
    optimizer was built from ``model.named_parameters()``) or, failing that, from
    a group's ``name`` entry, which then names every parameter of the group.
    """
    named: list[tuple[str, torch.Tensor]] = []
    for group in param_groups:
        params = group["params"]
        names = group.get("param_names")
        if names is not None and len(names) == len(params):
            named.extend(zip(names, params))
        elif isinstance(group.get("name"), str):
            named.extend((group["name"], p) for p in params)
    return named


def _prefix_match_length(key: str, name: str) -> int | None:
    """Specificity of ``key`` as a match for ``name``; ``None`` when it does not match.

    A key matches its exact name or any name below it as a dotted module prefix:
    ``'encoder'`` matches ``'encoder.0.weight'`` but not ``'encoder2.weight'``.
    An exact match outranks every prefix match.
    """
    if name == key:
        return len(key) + 1
    if name.startswith(key + "."):
        return len(key)
    return None


def match_names(
    keys: Iterable[str], named: list[tuple[str, torch.Tensor]]
) -> dict[torch.Tensor, str]:
    """Map each named parameter to the most specific key that matches it.

    Raises:
        ValueError: a key matches no parameter name.
    """
    best: dict[torch.Tensor, tuple[int, str]] = {}
    for key in keys:
        matched = False
        for name, param in named:
            length = _prefix_match_length(key, name)
            if length is None:
                continue
            matched = True
            current = best.get(param)
            if current is None or length > current[0]:
                best[param] = (length, key)
        if not matched:
            examples = ", ".join(repr(n) for n, _ in named[:5])
            raise ValueError(
                f"params key {key!r} matches no parameter name; a key must be an exact "
                f"name or a dotted module prefix of one (known names include {examples})"
            )
    return {param: key for param, (_, key) in best.items()}


#: Where the mask goes: the gradient before the wrapped step, or the change it makes.
TARGETS = ("gradient", "update")
#: What one keep-or-drop decision covers.
GRANULARITIES = ("element", "row", "tensor")


def check_choice(value: Any, argument: str, choices: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of the strings ``choices``.

    Raises:
        TypeError: ``value`` is not a string.
        ValueError: ``value`` is not one of ``choices``.
    """
    if not isinstance(value, str):
        raise TypeError(
            f"{argument} must be a string, one of {choices}, got {type(value).__name__} {value!r}"
        )
    if value not in choices:
        raise ValueError(f"{argument} must be one of {choices}, got {value!r}")
    return value


#: The mask distributions: keep-or-drop, or multiplicative Gaussian noise.
DISTRIBUTIONS = ("bernoulli", "gaussian")


def check_distribution(distribution: object) -> str:
    """Return ``distribution`` if it names a supported mask distribution.

    Raises:
        ValueError: it is not ``"bernoulli"`` or ``"gaussian"``.
    """
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    return str(distribution)
