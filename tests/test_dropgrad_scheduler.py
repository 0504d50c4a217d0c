"""Drop-rate schedulers: values by step, checkpointing, subclassing and validation."""

from __future__ import annotations

import inspect
import io
import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import pytest
import torch

from dropgrad import (
    CosineAnnealingDropRateScheduler,
    DropRateScheduler,
    LinearDropRateScheduler,
    StepDropRateScheduler,
)

SchedulerFactory = Callable[[], DropRateScheduler]
TwoEndScheduler = LinearDropRateScheduler | CosineAnnealingDropRateScheduler


def rates_over(scheduler: DropRateScheduler, steps: int) -> list[float]:
    """The rate at step_count 0, 1, ..., steps - 1, stepping after each read."""
    rates = []
    for _ in range(steps):
        rates.append(scheduler.get_drop_rate())
        scheduler.step()
    return rates


def make_linear() -> DropRateScheduler:
    return LinearDropRateScheduler(0.5, 0.1, 4)


def make_cosine() -> DropRateScheduler:
    return CosineAnnealingDropRateScheduler(0.1, 0.5, 4)


def make_step() -> DropRateScheduler:
    return StepDropRateScheduler(0.3, {5: 0.0, 2: 0.2})


SCHEDULER_FACTORIES = [make_linear, make_cosine, make_step]


# Expected values worked out by hand from each formula. Schedulers are stateful,
# so each case builds a fresh one.
@pytest.mark.parametrize(
    ("make", "expected"),
    [
        pytest.param(
            lambda: LinearDropRateScheduler(0.5, 0.1, 4),
            [0.5, 0.4, 0.3, 0.2, 0.1, 0.1, 0.1],
            id="linear-down",
        ),
        pytest.param(
            lambda: LinearDropRateScheduler(0.0, 0.8, 2), [0.0, 0.4, 0.8, 0.8], id="linear-up"
        ),
        pytest.param(
            lambda: LinearDropRateScheduler(0.3, 0.3, 3),
            [0.3, 0.3, 0.3, 0.3, 0.3],
            id="linear-flat",
        ),
        pytest.param(
            lambda: LinearDropRateScheduler(0.2, 1.0, 1), [0.2, 1.0, 1.0], id="linear-one-step"
        ),
        pytest.param(
            lambda: LinearDropRateScheduler(
                initial_drop_rate=1.0, final_drop_rate=0.0, num_steps=5
            ),
            [1.0, 0.8, 0.6, 0.4, 0.2, 0.0, 0.0],
            id="linear-keywords",
        ),
        # (1 + cos(pi k / 4)) / 2 = 1, 0.8536, 0.5, 0.1464, 0 for k = 0..4.
        pytest.param(
            lambda: CosineAnnealingDropRateScheduler(0.1, 0.5, 4),
            [0.1, 0.1585786, 0.3, 0.4414214, 0.5, 0.5, 0.5],
            id="cosine-up",
        ),
        pytest.param(
            lambda: CosineAnnealingDropRateScheduler(0.4, 0.0, 2),
            [0.4, 0.2, 0.0, 0.0],
            id="cosine-down",
        ),
        # (1 + cos(pi k / 6)) / 2 = 1, 0.9330, 0.75, 0.5, 0.25, 0.0670, 0 for k = 0..6.
        pytest.param(
            lambda: CosineAnnealingDropRateScheduler(
                initial_drop_rate=0.6, final_drop_rate=0.2, num_steps=6
            ),
            [0.6, 0.5732051, 0.5, 0.4, 0.3, 0.2267949, 0.2, 0.2],
            id="cosine-keywords",
        ),
        pytest.param(
            lambda: StepDropRateScheduler(0.3, {2: 0.2, 5: 0.0}),
            [0.3, 0.3, 0.2, 0.2, 0.2, 0.0, 0.0],
            id="step-sorted",
        ),
        pytest.param(
            lambda: StepDropRateScheduler(0.3, {5: 0.0, 2: 0.2}),
            [0.3, 0.3, 0.2, 0.2, 0.2, 0.0, 0.0],
            id="step-unsorted",
        ),
        # A rate listed at step 0 replaces the initial rate from the start.
        pytest.param(
            lambda: StepDropRateScheduler(0.9, {0: 0.1, 1: 0.4}), [0.1, 0.4, 0.4], id="step-zero"
        ),
        pytest.param(lambda: StepDropRateScheduler(0.25, {}), [0.25, 0.25, 0.25], id="step-empty"),
        pytest.param(
            lambda: StepDropRateScheduler(
                initial_drop_rate=0.5, drop_rate_schedule=OrderedDict([(3, 1.0), (1, 0.0)])
            ),
            [0.5, 0.0, 0.0, 1.0, 1.0],
            id="step-keywords-ordered-dict",
        ),
    ],
)
def test_rates_by_step(make: SchedulerFactory, expected: list[float]) -> None:
    assert rates_over(make(), len(expected)) == pytest.approx(expected, abs=1e-7)


# Pairs whose difference is inexact in binary: 0.5 + (0.1 - 0.5) is 0.09999999999999998.
@pytest.mark.parametrize(
    ("initial", "final", "num_steps"),
    [(0.1, 0.5, 4), (0.5, 0.1, 4), (0.9, 0.0, 10), (0.3, 0.7, 100), (0.7, 0.3, 3), (1.0, 1.0, 7)],
)
@pytest.mark.parametrize("cls", [LinearDropRateScheduler, CosineAnnealingDropRateScheduler])
def test_two_end_schedules_hit_their_ends_exactly(
    cls: type[TwoEndScheduler], initial: float, final: float, num_steps: int
) -> None:
    rates = rates_over(cls(initial, final, num_steps), num_steps + 3)
    assert rates[0] == initial
    assert rates[num_steps:] == [final] * 3
    low, high = min(initial, final), max(initial, final)
    assert all(low <= rate <= high for rate in rates)


@pytest.mark.parametrize(("initial", "final"), [(0.1, 0.5), (0.9, 0.0), (0.0, 1.0)])
def test_cosine_midpoint_is_the_mean_of_the_ends(initial: float, final: float) -> None:
    scheduler = CosineAnnealingDropRateScheduler(initial, final, 10)
    assert rates_over(scheduler, 6)[5] == pytest.approx((initial + final) / 2, abs=1e-12)


def test_linear_and_cosine_are_monotone_between_the_ends() -> None:
    for cls in (LinearDropRateScheduler, CosineAnnealingDropRateScheduler):
        rates = rates_over(cls(0.8, 0.1, 20), 25)
        assert all(a > b for a, b in zip(rates[:20], rates[1:21]))
        assert all(0.1 - 1e-12 <= r <= 0.8 + 1e-12 for r in rates)


def test_step_schedule_copies_and_sorts_its_input() -> None:
    schedule = {7: 0.1, 3: 0.2}
    scheduler = StepDropRateScheduler(0.0, schedule)
    schedule[1] = 1.0
    assert list(scheduler.drop_rate_schedule) == [3, 7]
    assert rates_over(scheduler, 2) == [0.0, 0.0]


def test_rates_are_returned_as_floats() -> None:
    scheduler = StepDropRateScheduler(0, {1: 1})
    assert [type(r) for r in rates_over(scheduler, 2)] == [float, float]
    assert type(LinearDropRateScheduler(0, 1, 2).get_drop_rate()) is float


@pytest.mark.parametrize(
    ("cls", "names"),
    [
        (LinearDropRateScheduler, ["initial_drop_rate", "final_drop_rate", "num_steps"]),
        (CosineAnnealingDropRateScheduler, ["initial_drop_rate", "final_drop_rate", "num_steps"]),
        (StepDropRateScheduler, ["initial_drop_rate", "drop_rate_schedule"]),
    ],
)
def test_constructor_signatures(cls: type[DropRateScheduler], names: list[str]) -> None:
    parameters = inspect.signature(cls).parameters.values()
    assert [p.name for p in parameters] == names
    assert all(p.kind is p.POSITIONAL_OR_KEYWORD and p.default is p.empty for p in parameters)


def test_positional_and_keyword_arguments_agree() -> None:
    pairs = [
        (
            LinearDropRateScheduler(0.5, 0.1, 4),
            LinearDropRateScheduler(initial_drop_rate=0.5, final_drop_rate=0.1, num_steps=4),
        ),
        (
            CosineAnnealingDropRateScheduler(0.5, 0.1, 4),
            CosineAnnealingDropRateScheduler(
                num_steps=4, final_drop_rate=0.1, initial_drop_rate=0.5
            ),
        ),
        (
            StepDropRateScheduler(0.5, {2: 0.1}),
            StepDropRateScheduler(drop_rate_schedule={2: 0.1}, initial_drop_rate=0.5),
        ),
    ]
    for positional, keyword in pairs:
        assert positional.state_dict() == keyword.state_dict()
        assert rates_over(positional, 6) == rates_over(keyword, 6)


def test_base_class_is_abstract() -> None:
    with pytest.raises(TypeError, match="abstract"):
        DropRateScheduler()  # type: ignore[abstract]


class Halving(DropRateScheduler):
    """A user scheduler that only implements get_drop_rate."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def get_drop_rate(self) -> float:
        return self.rate / 2**self.step_count


def test_user_subclass_gets_stepping_and_checkpointing() -> None:
    scheduler = Halving(0.8)
    assert scheduler.step_count == 0
    assert rates_over(scheduler, 4) == [0.8, 0.4, 0.2, 0.1]
    assert scheduler.step_count == 4
    assert scheduler.state_dict() == {"step_count": 4, "rate": 0.8}
    resumed = Halving(0.1)
    resumed.load_state_dict(scheduler.state_dict())
    assert resumed.rate == 0.8
    assert resumed.get_drop_rate() == 0.05
    assert repr(resumed) == "Halving(step_count=4, rate=0.8)"


def test_step_advances_step_count_by_one() -> None:
    scheduler = make_linear()
    for expected in range(1, 6):
        scheduler.step()
        assert scheduler.step_count == expected


@pytest.mark.parametrize("factory", SCHEDULER_FACTORIES)
def test_state_dict_is_a_detached_copy(factory: SchedulerFactory) -> None:
    scheduler = factory()
    state = scheduler.state_dict()
    state["step_count"] = 99
    if "drop_rate_schedule" in state:
        state["drop_rate_schedule"][0] = 1.0
    assert scheduler.step_count == 0
    assert scheduler.get_drop_rate() == factory().get_drop_rate()


@pytest.mark.parametrize(
    ("factory", "make_differently_configured"),
    [
        (make_linear, lambda: LinearDropRateScheduler(1.0, 1.0, 100)),
        (make_cosine, lambda: CosineAnnealingDropRateScheduler(1.0, 1.0, 100)),
        (make_step, lambda: StepDropRateScheduler(1.0, {})),
        (lambda: Halving(0.8), lambda: Halving(0.1)),
    ],
)
def test_resuming_from_a_checkpoint_repeats_the_sequence(
    factory: SchedulerFactory, make_differently_configured: SchedulerFactory
) -> None:
    uninterrupted = rates_over(factory(), 9)

    first_half = factory()
    rates = rates_over(first_half, 3)
    buffer = io.BytesIO()
    torch.save(first_half.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert state == first_half.state_dict()

    # A scheduler built with other settings takes all of them from the checkpoint.
    resumed = make_differently_configured()
    resumed.load_state_dict(state)
    assert resumed.step_count == 3
    assert resumed.state_dict() == first_half.state_dict()
    rates += rates_over(resumed, 6)
    assert rates == uninterrupted


def test_loaded_state_is_not_shared_with_the_source() -> None:
    state: dict[str, Any] = {
        "step_count": 1,
        "initial_drop_rate": 0.3,
        "drop_rate_schedule": {1: 0.2},
    }
    scheduler = StepDropRateScheduler(0.0, {})
    scheduler.load_state_dict(state)
    state["drop_rate_schedule"][1] = 0.9
    assert scheduler.get_drop_rate() == 0.2


RATE_ERRORS = [
    (True, TypeError, "must be a float in \\[0, 1\\], got bool True"),
    (False, TypeError, "must be a float in \\[0, 1\\], got bool False"),
    ("0.5", TypeError, "must be a float in \\[0, 1\\], got str '0.5'"),
    (None, TypeError, "must be a float in \\[0, 1\\], got NoneType None"),
    (math.nan, ValueError, "must be in \\[0, 1\\], got nan"),
    (math.inf, ValueError, "must be in \\[0, 1\\], got inf"),
    (-math.inf, ValueError, "must be in \\[0, 1\\], got -inf"),
    (-0.1, ValueError, "must be in \\[0, 1\\], got -0.1"),
    (1.5, ValueError, "must be in \\[0, 1\\], got 1.5"),
    (2, ValueError, "must be in \\[0, 1\\], got 2"),
]


@pytest.mark.parametrize("cls", [LinearDropRateScheduler, CosineAnnealingDropRateScheduler])
@pytest.mark.parametrize(("rate", "error", "message"), RATE_ERRORS)
def test_two_end_schedulers_reject_bad_rates(
    cls: type[TwoEndScheduler], rate: Any, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match="^initial_drop_rate " + message):
        cls(rate, 0.1, 4)
    with pytest.raises(error, match="^final_drop_rate " + message):
        cls(0.1, rate, 4)


@pytest.mark.parametrize("cls", [LinearDropRateScheduler, CosineAnnealingDropRateScheduler])
@pytest.mark.parametrize(
    ("num_steps", "error", "message"),
    [
        (0, ValueError, "num_steps must be >= 1, got 0"),
        (-1, ValueError, "num_steps must be >= 1, got -1"),
        (1.5, TypeError, "num_steps must be an int, got float 1.5"),
        (4.0, TypeError, "num_steps must be an int, got float 4.0"),
        (True, TypeError, "num_steps must be an int, got bool True"),
        ("4", TypeError, "num_steps must be an int, got str '4'"),
        (None, TypeError, "num_steps must be an int, got NoneType None"),
    ],
)
def test_two_end_schedulers_reject_bad_num_steps(
    cls: type[TwoEndScheduler], num_steps: Any, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match="^" + message + "$"):
        cls(0.5, 0.1, num_steps)


@pytest.mark.parametrize(("rate", "error", "message"), RATE_ERRORS)
def test_step_scheduler_rejects_bad_rates(rate: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match="^initial_drop_rate " + message):
        StepDropRateScheduler(rate, {})
    with pytest.raises(error, match="^drop_rate_schedule\\[3\\] " + message):
        StepDropRateScheduler(0.1, {0: 0.2, 3: rate})


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        ([(1, 0.1)], "got list"),
        (None, "got NoneType"),
        (0.1, "got float"),
        ("1:0.1", "got str"),
    ],
)
def test_step_scheduler_rejects_a_schedule_that_is_not_a_mapping(
    schedule: Any, message: str
) -> None:
    with pytest.raises(TypeError, match="^drop_rate_schedule must be a mapping.*" + message):
        StepDropRateScheduler(0.1, schedule)


@pytest.mark.parametrize(
    ("key", "error", "message"),
    [
        (-1, ValueError, "drop_rate_schedule key must be >= 0, got -1"),
        (1.0, TypeError, "drop_rate_schedule key must be an int, got float 1.0"),
        ("2", TypeError, "drop_rate_schedule key must be an int, got str '2'"),
        (True, TypeError, "drop_rate_schedule key must be an int, got bool True"),
        (None, TypeError, "drop_rate_schedule key must be an int, got NoneType None"),
    ],
)
def test_step_scheduler_rejects_bad_keys(key: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match="^" + message + "$"):
        StepDropRateScheduler(0.1, {0: 0.2, key: 0.3})


@pytest.mark.parametrize("factory", SCHEDULER_FACTORIES)
@pytest.mark.parametrize(
    ("state", "error", "message"),
    [
        ([("step_count", 1)], TypeError, "^state_dict must be a mapping, got list$"),
        (None, TypeError, "^state_dict must be a mapping, got NoneType$"),
        ({}, ValueError, "state_dict has no 'step_count' entry; keys are \\[\\]"),
        (
            {"num_steps": 3},
            ValueError,
            "state_dict has no 'step_count' entry; keys are \\['num_steps'\\]",
        ),
        ({"step_count": -1}, ValueError, "^state_dict\\['step_count'\\] must be >= 0, got -1$"),
        (
            {"step_count": 1.5},
            TypeError,
            "^state_dict\\['step_count'\\] must be an int, got float 1.5$",
        ),
        (
            {"step_count": True},
            TypeError,
            "^state_dict\\['step_count'\\] must be an int, got bool True$",
        ),
    ],
)
def test_load_state_dict_rejects_bad_states(
    factory: SchedulerFactory, state: Any, error: type[Exception], message: str
) -> None:
    scheduler = factory()
    scheduler.step()
    before = scheduler.state_dict()
    with pytest.raises(error, match=message):
        scheduler.load_state_dict(state)
    assert scheduler.state_dict() == before


def test_missing_step_count_message_names_the_class() -> None:
    with pytest.raises(ValueError, match="^CosineAnnealingDropRateScheduler state_dict has no"):
        make_cosine().load_state_dict({"initial_drop_rate": 0.1})


class _NoSuperInit(DropRateScheduler):
    """A subclass that forgets ``super().__init__()``."""

    def __init__(self, rate: float) -> None:
        self.rate = rate

    def get_drop_rate(self) -> float:
        return self.rate / (1 + self.step_count)


def test_subclass_without_super_init_still_counts_steps() -> None:
    scheduler = _NoSuperInit(0.4)
    assert scheduler.state_dict() == {"step_count": 0, "rate": 0.4}
    scheduler.step()
    assert scheduler.get_drop_rate() == 0.2
    fresh = _NoSuperInit(0.4)
    fresh.load_state_dict(scheduler.state_dict())
    assert fresh.step_count == 1
