"""Checkpoints: DropGrad's state dict, built and loaded.

A DropGrad state dict is the wrapped optimizer's own state dict in which every
param group carries one extra entry, ``"dropgrad"``: DropGrad's section, with
the seed, the counters, the rates, the target and granularity and the scheduler
states. There is no random-generator state: masks are a function of the seed
and the step counter (see ``_random.py``), so the section is small, holds no
tensors, and loads with any ``map_location``.

The section lives in the param groups, like ``lr``, because that is what every
generic checkpointing path carries: ``torch.distributed.checkpoint``'s
``get_optimizer_state_dict`` / ``set_optimizer_state_dict`` keep only ``state``
and ``param_groups``, and FSDP, Lightning and the Hugging Face ``Trainer`` pass
param groups through untouched. Parameters are referred to by their integer
position in ``param_groups`` (torch's convention), so a checkpoint loads into a
fresh model. Scheduler objects never enter the dict: a rate that is a scheduler
is stored as ``{"scheduler": index}`` and the scheduler's own ``state_dict()``
is stored in a list, so everything loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import copy
import numbers
from collections.abc import Mapping
from typing import Any

import torch
from torch.optim import Optimizer

from ._random import resolve_seed
from ._rates import (
    GRANULARITIES,
    TARGETS,
    check_choice,
    check_distribution,
    check_full_update_drop,
    check_probability,
)
from ._settings import Rate, Settings, all_params
from .dropgrad_scheduler import DropRateScheduler

__all__ = ["FORMAT_VERSION", "SECTION_KEY", "build_state_dict", "load_state_dict"]

SECTION_KEY = "dropgrad"
_ABSENT = object()
FORMAT_VERSION = 2
_SECTION_FIELDS = (
    "format_version",
    "seed",
    "drop_rate",
    "param_drop_rates",
    "full_update_drop",
    "distribution",
    "target",
    "granularity",
    "schedulers",
    "scheduler_types",
    "step_count",
    "skipped_count",
    "last_step_skipped",
)


def _encode(rate: Rate, scheduler_index: Mapping[int, int]) -> Any:
    if isinstance(rate, DropRateScheduler):
        return {"scheduler": scheduler_index[id(rate)]}
    return rate


def _describe(rate: Any) -> str:
    if isinstance(rate, DropRateScheduler):
        return f"a {type(rate).__name__}"
    if isinstance(rate, Mapping):
        return "a drop-rate scheduler"
    return f"the fixed rate {rate!r}"


def _decode(saved: Any, current: Rate, where: str, scheduler_index: Mapping[int, int]) -> Rate:
    """The rate to use after loading; schedulers must line up with the checkpoint's."""
    if isinstance(saved, Mapping) != isinstance(current, DropRateScheduler):
        raise ValueError(
            f"cannot load state_dict: {where} is {_describe(saved)} in the checkpoint but "
            f"{_describe(current)} in this DropGrad; construct DropGrad with the same kind "
            "of rate (fixed or scheduler) before loading"
        )
    if isinstance(current, DropRateScheduler):
        index = scheduler_index[id(current)]
        if saved.get("scheduler") != index:
            raise ValueError(
                f"cannot load state_dict: {where} uses scheduler {saved.get('scheduler')!r} "
                f"in the checkpoint but scheduler {index} in this DropGrad"
            )
        return current
    if saved is None:
        return None
    return check_probability(saved, f"state_dict {where}")


def build_state_dict(settings: Settings, wrapped: Optimizer) -> dict[str, Any]:
    """The wrapped optimizer's state dict plus the section that encodes ``settings``."""
    schedulers = settings.schedulers(wrapped.param_groups)
    scheduler_index = {id(s): i for i, s in enumerate(schedulers)}
    state = dict(wrapped.state_dict())
    position = {param: i for i, param in enumerate(all_params(wrapped.param_groups))}
    section = {
        "format_version": FORMAT_VERSION,
        "seed": settings.seed,
        "drop_rate": _encode(settings.default_rate, scheduler_index),
        "param_drop_rates": {
            position[param]: _encode(rate, scheduler_index)
            for param, rate in settings.param_rates.items()
        },
        "full_update_drop": settings.full_update_drop,
        "distribution": settings.distribution,
        "target": settings.target,
        "granularity": settings.granularity,
        "schedulers": [s.state_dict() for s in schedulers],
        "scheduler_types": [type(s).__qualname__ for s in schedulers],
        "step_count": settings.step_count,
        "skipped_count": settings.skipped_count,
        "last_step_skipped": settings.last_step_skipped,
    }
    groups = []
    for group in state["param_groups"]:
        group = dict(group)
        if "drop_rate" in group:
            group["drop_rate"] = _encode(group["drop_rate"], scheduler_index)
        group[SECTION_KEY] = section
        groups.append(group)
    state["param_groups"] = groups
    return state


def _check_section(section: Any) -> Mapping[str, Any]:
    if not isinstance(section, Mapping):
        raise ValueError(
            f"cannot load state_dict: its {SECTION_KEY!r} entry must be a dict, "
            f"got {type(section).__name__}"
        )
    missing = [field for field in _SECTION_FIELDS if field not in section]
    if missing:
        raise ValueError(f"cannot load state_dict: the {SECTION_KEY!r} entry lacks {missing}")
    if section["format_version"] != FORMAT_VERSION:
        raise ValueError(
            f"cannot load state_dict: format_version {section['format_version']!r} is not "
            f"supported (this dropgrad reads version {FORMAT_VERSION})"
        )
    for field in ("target", "granularity"):
        if not isinstance(section[field], str):
            raise ValueError(
                f"cannot load state_dict: {field} must be a string, got {section[field]!r}"
            )
    for field in ("step_count", "skipped_count"):
        count = section[field]
        if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 0:
            raise ValueError(f"cannot load state_dict: {field} must be an int >= 0, got {count!r}")
    return section


def load_state_dict(
    settings: Settings, wrapped: Optimizer, state_dict: Mapping[str, Any]
) -> Settings:
    """Load a state dict made by :func:`build_state_dict` (or a plain optimizer's) into
    ``wrapped``; returns the settings to use from now on (``settings`` is not changed).

    Everything is validated before anything is changed, so a state dict that
    does not fit leaves the optimizer as it was.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
    if SECTION_KEY in state_dict:
        _refuse_top_level_section(state_dict[SECTION_KEY])
    base_state = dict(state_dict)
    raw_section, base_state["param_groups"] = _take_sections(state_dict.get("param_groups", []))
    if raw_section is _ABSENT:
        # A plain optimizer checkpoint: load it into the wrapped optimizer and
        # keep DropGrad's own configuration, including the groups' drop_rate
        # entries that the wrapped optimizer's load would replace.
        kept = [group.get("drop_rate", _ABSENT) for group in wrapped.param_groups]
        wrapped.load_state_dict(base_state)
        for group, rate in zip(wrapped.param_groups, kept):
            if rate is not _ABSENT and "drop_rate" not in group:
                group["drop_rate"] = rate
        return settings
    section = _check_section(raw_section)

    schedulers = settings.schedulers(wrapped.param_groups)
    scheduler_index = {id(s): i for i, s in enumerate(schedulers)}
    if len(section["schedulers"]) != len(schedulers):
        raise ValueError(
            f"cannot load state_dict: it holds {len(section['schedulers'])} drop-rate "
            f"scheduler(s) but this DropGrad has {len(schedulers)}"
        )
    for i, (saved_type, scheduler) in enumerate(zip(section["scheduler_types"], schedulers)):
        if saved_type != type(scheduler).__qualname__:
            raise ValueError(
                f"cannot load state_dict: drop-rate scheduler {i} is a {saved_type} in the "
                f"checkpoint but a {type(scheduler).__qualname__} in this DropGrad"
            )
    default = _decode(section["drop_rate"], settings.default_rate, "drop_rate", scheduler_index)

    params = all_params(wrapped.param_groups)
    param_rates: dict[torch.Tensor, Rate] = {}
    for position, saved in section["param_drop_rates"].items():
        if not isinstance(position, int) or not 0 <= position < len(params):
            raise ValueError(
                f"cannot load state_dict: it has a per-parameter rate for parameter "
                f"{position!r} but the optimizer has {len(params)} parameters"
            )
        param = params[position]
        current = settings.param_rates.get(param)
        where = f"the rate of parameter {position}"
        param_rates[param] = _decode(saved, current, where, scheduler_index)
    for param, current in settings.param_rates.items():
        if isinstance(current, DropRateScheduler) and param not in param_rates:
            raise ValueError(
                "cannot load state_dict: this DropGrad has a scheduler for a parameter "
                "that has no per-parameter rate in the checkpoint"
            )

    saved_groups = base_state.get("param_groups", [])
    if len(saved_groups) != len(wrapped.param_groups):
        raise ValueError(
            f"cannot load state_dict: it has {len(saved_groups)} parameter group(s) but "
            f"the optimizer has {len(wrapped.param_groups)}"
        )
    group_schedulers: dict[int, DropRateScheduler] = {}
    for i, (saved_group, group) in enumerate(zip(saved_groups, wrapped.param_groups)):
        saved = saved_group.get("drop_rate")
        current = group.get("drop_rate")
        if isinstance(saved, Mapping) or isinstance(current, DropRateScheduler):
            where = f"param_groups[{i}]['drop_rate']"
            decoded = _decode(saved, current, where, scheduler_index)
            assert isinstance(decoded, DropRateScheduler)
            group_schedulers[i] = decoded

    loaded = Settings(
        default_rate=default,
        full_update_drop=check_full_update_drop(section["full_update_drop"], default),
        distribution=check_distribution(section["distribution"]),
        target=check_choice(section["target"], "state_dict target", TARGETS),
        granularity=check_choice(section["granularity"], "state_dict granularity", GRANULARITIES),
        seed=resolve_seed(section["seed"]),
        param_rates=param_rates,
        step_count=int(section["step_count"]),
        skipped_count=int(section["skipped_count"]),
        last_step_skipped=bool(section["last_step_skipped"]),
    )
    for i, saved_group in enumerate(saved_groups):
        for entry, choices in (("target", TARGETS), ("granularity", GRANULARITIES)):
            if entry in saved_group:
                where = f"state_dict param_groups[{i}][{entry!r}]"
                check_choice(saved_group[entry], where, choices)
    # Trial loads into copies (a shallow copy suffices: loading replaces attributes,
    # it does not mutate them), so a malformed scheduler state fails before the
    # wrapped optimizer is changed.
    for scheduler, scheduler_state in zip(schedulers, section["schedulers"]):
        copy.copy(scheduler).load_state_dict(scheduler_state)

    wrapped.load_state_dict(base_state)
    # The wrapped optimizer deep-copies group entries; put the live schedulers back.
    for i, scheduler in group_schedulers.items():
        wrapped.param_groups[i]["drop_rate"] = scheduler
    for scheduler, scheduler_state in zip(schedulers, section["schedulers"]):
        scheduler.load_state_dict(scheduler_state)
    return loaded


def _refuse_top_level_section(section: Any) -> None:
    """A top-level ``"dropgrad"`` entry is the format of dropgrad 0.2, which is not read."""
    version = section.get("format_version") if isinstance(section, Mapping) else None
    raise ValueError(
        f"cannot load state_dict: it was written by an older dropgrad (format_version "
        f"{version!r}, with random-generator states); this dropgrad reads format "
        f"{FORMAT_VERSION}, whose masks are keyed by seed and step, so the old mask "
        "sequence cannot be resumed. To continue with new masks, load the wrapped "
        "optimizer's part with opt.optimizer.load_state_dict(...) after removing the "
        "'dropgrad' entry"
    )


def _take_sections(groups: Any) -> tuple[Any, list[Any]]:
    """DropGrad's section from the saved param groups, and the groups without it.

    Every group of a DropGrad checkpoint carries the same section; a checkpoint
    whose groups carry none is a plain optimizer's.

    Raises:
        ValueError: only some groups carry a section.
    """
    if not isinstance(groups, list | tuple):
        return _ABSENT, groups
    sections = [g.get(SECTION_KEY, _ABSENT) if isinstance(g, Mapping) else _ABSENT for g in groups]
    present = [s for s in sections if s is not _ABSENT]
    if not present:
        return _ABSENT, list(groups)
    if len(present) != len(groups):
        raise ValueError(
            f"cannot load state_dict: {len(present)} of its {len(groups)} param groups carry "
            f"a {SECTION_KEY!r} section; a DropGrad checkpoint has one in every group"
        )
    stripped = [{k: v for k, v in g.items() if k != SECTION_KEY} for g in groups]
    return present[0], stripped
