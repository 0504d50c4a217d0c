"""DropGrad's settings and counters: what its state *is*, in one value object.

``DropGrad`` holds one :class:`Settings`; the checkpoint code (``_checkpoint.py``)
encodes and decodes it without knowing the optimizer class, and the step
planner (``_plan.py``) reads the per-step rates from it. Every rule that ties
settings together (full update drop borrowing the default rate, a rate being a
probability, ``None`` or a scheduler) is applied here, by the setters.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from torch import Tensor

from ._rates import (
    GRANULARITIES,
    TARGETS,
    check_choice,
    check_distribution,
    check_full_update_drop,
    check_probability,
    match_names,
    named_parameters_of,
)
from .dropgrad_scheduler import DropRateScheduler

__all__ = ["Rate", "Settings", "all_params", "check_group_entries", "check_rate", "param_rates"]

#: A drop rate as DropGrad accepts it: a probability, ``None`` (never drop) or a scheduler.
Rate: TypeAlias = "float | None | DropRateScheduler"
ParamGroups: TypeAlias = "Iterable[Mapping[str, Any]]"


def check_rate(value: Any, argument: str) -> Rate:
    """A rate as DropGrad accepts it: ``None``, a scheduler, or a probability.

    Raises:
        TypeError, ValueError: as ``_rates.check_probability``.
    """
    if value is None or isinstance(value, DropRateScheduler):
        return value
    return check_probability(value, argument)


def current_rate(rate: Rate, where: str) -> float | None:
    """The value of a rate at this step: schedulers are asked and their answer checked."""
    if isinstance(rate, DropRateScheduler):
        value = rate.get_drop_rate()
        label = f"{where}: {type(rate).__name__}.get_drop_rate() at step_count={rate.step_count}"
        return check_probability(value, label)
    return rate


def check_group_entries(group: Mapping[str, Any], where: str) -> None:
    """Validate a param group's own ``drop_rate``, ``target`` and ``granularity``."""
    if "drop_rate" in group:
        check_rate(group["drop_rate"], f"{where}['drop_rate']")
    if "target" in group:
        check_choice(group["target"], f"{where}['target']", TARGETS)
    if "granularity" in group:
        check_choice(group["granularity"], f"{where}['granularity']", GRANULARITIES)


def all_params(param_groups: ParamGroups) -> list[Tensor]:
    """Every parameter in ``param_groups`` order (state-dict numbering)."""
    return [p for group in param_groups for p in group["params"]]


def param_rates(
    param_groups: ParamGroups, params: Mapping[Tensor | str, Any] | None
) -> dict[Tensor, Rate]:
    """Turn DropGrad's ``params`` argument into a map from each parameter to its own rate.

    Raises:
        TypeError: ``params`` is not a dict, or a key or rate has the wrong type.
        ValueError: a key is not a parameter of the groups or matches no name.
    """
    if params is None:
        return {}
    if not isinstance(params, Mapping):
        raise TypeError(
            "params must be a dict mapping Parameters or parameter names to drop "
            f"rates, got {type(params).__name__}"
        )
    groups = list(param_groups)
    known = {id(p) for p in all_params(groups)}
    by_param: dict[Tensor, Rate] = {}
    by_name: dict[str, Rate] = {}
    for key, value in params.items():
        if isinstance(key, Tensor):
            label = f"params[<tensor of shape {tuple(key.shape)}>]"
            if id(key) not in known:
                raise ValueError(
                    f"{label}: this tensor is not updated by the wrapped optimizer; "
                    "use parameters from its param_groups (or add them first)"
                )
            by_param[key] = check_rate(value, label)
        elif isinstance(key, str):
            by_name[key] = check_rate(value, f"params[{key!r}]")
        else:
            raise TypeError(
                "params keys must be Parameters or parameter-name strings, "
                f"got {type(key).__name__} {key!r}"
            )
    resolved: dict[Tensor, Rate] = {}
    if by_name:
        named = named_parameters_of(groups)
        if not named:
            first = next(iter(by_name))
            raise ValueError(
                f"params has string keys such as {first!r} but the wrapped optimizer "
                "has no parameter names; build it from model.named_parameters(), give "
                "each param group a 'name' entry, or key params by Parameter"
            )
        for param, key in match_names(by_name, named).items():
            resolved[param] = by_name[key]
    # A Parameter key is more specific than any name.
    resolved.update(by_param)
    return resolved


@dataclass
class Settings:
    """DropGrad's configuration and counters (no tensors but the rate map's keys).

    Attributes:
        default_rate: the rate of parameters without a group or own rate.
        param_rates: each parameter's own rate (the ``params`` argument).
        full_update_drop: ``False``, ``True`` (skip with the default rate) or
            a skip probability.
        distribution, target, granularity: the defaults (groups may override
            target and granularity).
        seed: the mask key.
        step_count: steps taken, skipped ones included (the ``s`` of the key).
        skipped_count: steps skipped by full update drop.
        last_step_skipped: whether the most recent step was skipped.
    """

    default_rate: Rate
    full_update_drop: bool | float
    distribution: str
    target: str
    granularity: str
    seed: int
    param_rates: dict[Tensor, Rate] = field(default_factory=dict)
    step_count: int = 0
    skipped_count: int = 0
    last_step_skipped: bool = False

    def __post_init__(self) -> None:
        self.default_rate = check_rate(self.default_rate, "drop_rate")
        self.full_update_drop = check_full_update_drop(self.full_update_drop, self.default_rate)
        self.distribution = check_distribution(self.distribution)
        self.target = check_choice(self.target, "target", TARGETS)
        self.granularity = check_choice(self.granularity, "granularity", GRANULARITIES)

    def set_default_rate(self, value: Any) -> None:
        """Replace the default rate; full update drop ``True`` still needs one."""
        rate = check_rate(value, "drop_rate")
        check_full_update_drop(self.full_update_drop, rate)
        self.default_rate = rate

    def default_now(self) -> float | None:
        """The default rate at this step."""
        return current_rate(self.default_rate, "drop_rate")

    def group_rate(
        self, index: int, group: Mapping[str, Any], default: float | None
    ) -> float | None:
        """Param group ``index``'s rate at this step, ``default`` when it has none."""
        if "drop_rate" not in group:
            return default
        where = f"param_groups[{index}]['drop_rate']"
        return current_rate(check_rate(group["drop_rate"], where), where)

    def skip_probability(self) -> float:
        """Full update drop's probability of skipping this step."""
        setting = self.full_update_drop
        if setting is False:
            return 0.0
        if setting is True:
            return self.default_now() or 0.0
        return float(setting)

    def schedulers(self, param_groups: ParamGroups) -> list[DropRateScheduler]:
        """Every distinct scheduler in use, in a fixed order: default, groups, parameters."""
        groups = list(param_groups)
        candidates: list[Any] = [self.default_rate]
        candidates += [group.get("drop_rate") for group in groups]
        if self.param_rates:  # a walk over every parameter, needed only when some have rates
            candidates += [self.param_rates.get(p) for p in all_params(groups)]
        unique: dict[int, DropRateScheduler] = {}
        for rate in candidates:
            if isinstance(rate, DropRateScheduler):
                unique.setdefault(id(rate), rate)
        return list(unique.values())

    def finish_step(self, param_groups: ParamGroups, skipped: bool) -> None:
        """Advance every scheduler and the counters once, after a step."""
        for scheduler in self.schedulers(param_groups):
            scheduler.step()
        self.step_count += 1
        self.skipped_count += int(skipped)
        self.last_step_skipped = skipped
