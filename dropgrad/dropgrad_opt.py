"""The DropGrad optimizer: mask gradients, then delegate to the wrapped optimizer."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim import optimizer as torch_optimizer

from . import _checkpoint
from ._plan import Batch, Run, UpdateSnapshots, is_dtensor, plan_step
from ._random import resolve_seed, skip_decision
from ._rates import (
    GRANULARITIES,
    TARGETS,
    check_choice,
    check_distribution,
    check_full_update_drop,
    named_parameters_of,
)
from ._settings import (
    Rate,
    Settings,
    check_group_entries,
    check_rate,
    current_rate,
    param_rates,
)
from .dropgrad_scheduler import DropRateScheduler

__all__ = ["DropGrad", "Rate"]

# Not pickled or deep-copied, as in torch.optim: hook dictionaries may hold
# lambdas, and "step" is the per-instance patch an LR scheduler installs, which
# refers back to this very instance (a copy keeping it would step the original).
_UNPICKLED_ATTRIBUTES = (
    "step",
    "_optimizer_step_pre_hooks",
    "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)


@contextlib.contextmanager
def _global_step_hooks_suspended() -> Iterator[None]:
    """Hold back the global optimizer step hooks; restore them, and any added meanwhile.

    torch keeps these hooks in two process-wide dicts, so they are held back
    for the whole process while the wrapped step runs: an optimizer stepped by
    another thread at that moment does not fire them either (the README says so).
    """
    hook_dicts: tuple[dict[int, Any], ...] = (
        torch_optimizer._global_optimizer_pre_hooks,
        torch_optimizer._global_optimizer_post_hooks,
    )
    saved = [dict(hooks) for hooks in hook_dicts]
    for hooks in hook_dicts:
        hooks.clear()
    try:
        yield
    finally:
        for hooks, kept in zip(hook_dicts, saved):
            added = dict(hooks)
            hooks.clear()
            hooks.update(kept)
            hooks.update(added)


class _Prepared(NamedTuple):
    """What a step that runs the wrapped optimizer carries from before it to after it.

    Attributes:
        counted: ``False`` for the state-creation step of
            ``torch.distributed.checkpoint`` (passed through unmasked, not counted).
        scale: full update drop's factor for the steps it keeps.
        snapshots: copies of the update-masked parameters.
        gradient_runs: the runs whose gradients are masked.
    """

    counted: bool
    scale: float
    snapshots: UpdateSnapshots | None
    gradient_runs: list[Run]


class _SharedWithWrapped:
    """An attribute that lives on the wrapped optimizer.

    ``param_groups``, ``state`` and ``defaults`` must be the wrapped optimizer's
    own objects, even after its ``load_state_dict`` replaces them, so DropGrad
    reads them through on every access. ``Optimizer.__init__`` assigns them
    before the wrapped optimizer is attached; those throwaway values are kept on
    the instance until then.
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name
        self.local_name = f"_before_wrap_{name}"

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        wrapped = obj.__dict__.get("optimizer")
        if wrapped is not None:
            return getattr(wrapped, self.name)
        try:
            return obj.__dict__[self.local_name]
        except KeyError:
            # hasattr() and copy protocols expect AttributeError on an uninitialised instance.
            raise AttributeError(
                f"{type(obj).__name__!r} object has no attribute {self.name!r}"
            ) from None

    def __set__(self, obj: Any, value: Any) -> None:
        wrapped = obj.__dict__.get("optimizer")
        if wrapped is None:
            obj.__dict__[self.local_name] = value
        else:
            setattr(wrapped, self.name, value)


class DropGrad(Optimizer):
    r"""Wrap an optimizer so that each step sees randomly dropped gradients.

    Before the wrapped optimizer's ``step()``, every gradient element is zeroed
    independently with probability ``p`` (the parameter's drop rate) and the
    survivors are divided by the keep probability, so the expected gradient is
    unchanged: ``g_i <- m_i * g_i / (1 - p)`` with ``m_i ~ Bernoulli(1 - p)``.

    DropGrad is a real ``torch.optim.Optimizer`` that shares the wrapped
    optimizer's ``param_groups``, ``state`` and ``defaults``: LR schedulers,
    ``torch.amp.GradScaler`` and training frameworks accept it, and its
    ``state_dict()`` checkpoints both optimizers.

    Args:
        optimizer: the optimizer to wrap (any ``torch.optim.Optimizer``).
        drop_rate: default rate for every parameter: a float in ``[0, 1]``,
            ``None`` (parameters without their own rate are not masked) or a
            ``DropRateScheduler``. Default ``None``.
        params: optional per-parameter rates: a dict from a ``Parameter`` of
            ``optimizer``, or a parameter name / dotted module prefix (e.g.
            ``'encoder'``), to a rate. The most specific key wins; a
            ``Parameter`` key beats any name. A param group's own
            ``'drop_rate'`` entry sits between these and ``drop_rate``.
        drop_rate_scheduler: a ``DropRateScheduler`` giving the default
            rate; an alternative to passing one as ``drop_rate``.
        full_update_drop: ``False`` (default), ``True`` or a probability ``q``.
            When on, each step is skipped entirely with probability ``q``
            (``True``: ``q`` is the current default rate) and otherwise every
            gradient is also divided by ``1 - q``.
        distribution: ``"bernoulli"`` (default) or ``"gaussian"``, which
            multiplies each element by noise from ``N(1, p / (1 - p))``.
        seed: the key of every mask (an int in ``[0, 2**64)``): the decision
            for element ``i`` of parameter ``k`` at step ``s`` is a function of
            ``(seed, s, k, i)`` only. ``None`` (default) derives it from
            ``torch.initial_seed()`` without drawing from any generator, so
            ``torch.manual_seed`` makes a run reproducible and wrapping changes
            nothing else the script draws; under ``torch.distributed`` rank 0's
            value is used on every rank.
        target: ``"gradient"`` (default) masks the gradient before the wrapped
            step; ``"update"`` lets the wrapped optimizer see the whole
            gradient and masks the change it makes to each parameter,
            ``p = p_before + m * (p_after - p_before) / keep``. Everything the
            optimizer puts into that change is masked, decoupled weight decay
            included. It costs one copy of every parameter with a positive
            rate, held during the step. A param group's ``'target'`` entry
            overrides it.
        granularity: what one keep-or-drop decision covers: ``"element"``
            (default), ``"row"`` (each slice along dim 0: an output neuron or
            filter; one decision per element of a 1-D parameter) or
            ``"tensor"`` (the whole parameter). A param group's
            ``'granularity'`` entry overrides it.

    Raises:
        TypeError: ``optimizer`` is not an Optimizer, or an argument has the
            wrong type (bools and strings are not rates).
        ValueError: a rate is outside ``[0, 1]`` or NaN, no rate source is
            given, both ``drop_rate`` and ``drop_rate_scheduler`` are given, a
            ``params`` key does not belong to the optimizer,
            ``full_update_drop=True`` has no default rate to borrow, or
            ``target`` / ``granularity`` is not one of the choices above.

    Attributes:
        optimizer (torch.optim.Optimizer): the wrapped optimizer.
        seed (int): the mask key in use (an int in ``[0, 2**64)``).
        step_count (int): number of ``step()`` calls made, skipped ones included
            (the ``s`` of the mask key).
        skipped_count (int): number of steps skipped by full update drop.
        last_step_skipped (bool): whether the most recent step was skipped.

    Examples:
        >>> net = torch.nn.Linear(4, 2)
        >>> base = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> opt = DropGrad(base, drop_rate=0.1, seed=0)
        >>> net(torch.randn(3, 4)).sum().backward()
        >>> opt.step(); opt.zero_grad()
        >>> opt.step_count
        1
    """

    param_groups = _SharedWithWrapped()
    state = _SharedWithWrapped()
    defaults = _SharedWithWrapped()

    def __init__(
        self,
        optimizer: Optimizer,
        drop_rate: float | DropRateScheduler | None = None,
        params: Mapping[Tensor | str, float | DropRateScheduler | None] | None = None,
        *,
        drop_rate_scheduler: DropRateScheduler | None = None,
        full_update_drop: bool | float = False,
        distribution: str = "bernoulli",
        seed: int | None = None,
        target: str = "gradient",
        granularity: str = "element",
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if isinstance(optimizer, DropGrad):
            raise TypeError(
                "optimizer is already a DropGrad; wrap the inner optimizer "
                "(its .optimizer) once, with all the rates you need"
            )
        default = check_rate(drop_rate, "drop_rate")
        if drop_rate_scheduler is not None:
            if not isinstance(drop_rate_scheduler, DropRateScheduler):
                raise TypeError(
                    "drop_rate_scheduler must be a DropRateScheduler, "
                    f"got {type(drop_rate_scheduler).__name__}"
                )
            if default is not None:
                raise ValueError(
                    f"pass drop_rate or drop_rate_scheduler, not both (got drop_rate="
                    f"{drop_rate!r} and drop_rate_scheduler={drop_rate_scheduler!r})"
                )
            default = drop_rate_scheduler
        for i, group in enumerate(optimizer.param_groups):
            check_group_entries(group, f"param_groups[{i}]")
        target = check_choice(target, "target", TARGETS)
        granularity = check_choice(granularity, "granularity", GRANULARITIES)
        own_rates = param_rates(optimizer.param_groups, params)
        if (
            default is None
            and not own_rates
            and not any("drop_rate" in g for g in optimizer.param_groups)
        ):
            raise ValueError(
                "DropGrad needs a drop rate: pass drop_rate, drop_rate_scheduler or params "
                "(or give a param group a 'drop_rate' entry)"
            )
        settings = Settings(
            default_rate=default,
            full_update_drop=full_update_drop,
            distribution=distribution,
            target=target,
            granularity=granularity,
            seed=resolve_seed(seed),
            param_rates=own_rates,
        )

        # Optimizer.__init__ sets up the hook dictionaries and wraps step() so
        # step hooks fire; the empty group it builds is discarded once the
        # wrapped optimizer is attached (see _SharedWithWrapped).
        super().__init__([{"params": []}], {})
        self.optimizer = optimizer
        for name in ("param_groups", "state", "defaults"):
            self.__dict__.pop(f"_before_wrap_{name}", None)

        self._settings = settings

    # ------------------------------------------------------------------ settings

    @property
    def seed(self) -> int:
        """The mask key in use (an int in ``[0, 2**64)``)."""
        return self._settings.seed

    @property
    def step_count(self) -> int:
        """``step()`` calls made, skipped ones included (the ``s`` of the mask key)."""
        return self._settings.step_count

    @property
    def skipped_count(self) -> int:
        """Steps skipped by full update drop."""
        return self._settings.skipped_count

    @property
    def last_step_skipped(self) -> bool:
        """Whether the most recent step was skipped by full update drop."""
        return self._settings.last_step_skipped

    @property
    def drop_rate(self) -> float | None:
        """The default rate at the next step (a scheduler's current value when one is set).

        Assigning a float, ``None`` or a scheduler replaces the default from the
        next step on.
        """
        return self._settings.default_now()

    @drop_rate.setter
    def drop_rate(self, value: float | DropRateScheduler | None) -> None:
        self._settings.set_default_rate(value)

    @property
    def drop_rate_scheduler(self) -> DropRateScheduler | None:
        """The scheduler behind the default rate, or ``None``."""
        rate = self._settings.default_rate
        return rate if isinstance(rate, DropRateScheduler) else None

    @property
    def full_update_drop(self) -> bool | float:
        """``False``, ``True`` (skip with the default rate) or the skip probability."""
        return self._settings.full_update_drop

    @full_update_drop.setter
    def full_update_drop(self, value: bool | float) -> None:
        settings = self._settings
        settings.full_update_drop = check_full_update_drop(value, settings.default_rate)

    @property
    def distribution(self) -> str:
        """``"bernoulli"`` or ``"gaussian"``; assigning another value raises ``ValueError``."""
        return self._settings.distribution

    @distribution.setter
    def distribution(self, value: str) -> None:
        self._settings.distribution = check_distribution(value)

    @property
    def target(self) -> str:
        """Default mask target, ``"gradient"`` or ``"update"``; a group's ``'target'`` wins."""
        return self._settings.target

    @target.setter
    def target(self, value: str) -> None:
        self._settings.target = check_choice(value, "target", TARGETS)

    @property
    def granularity(self) -> str:
        """Default granularity, ``"element"``, ``"row"`` or ``"tensor"``; a group's entry wins."""
        return self._settings.granularity

    @granularity.setter
    def granularity(self, value: str) -> None:
        self._settings.granularity = check_choice(value, "granularity", GRANULARITIES)

    def get_drop_rates(self) -> list[float | None]:
        """The rate each param group gets at the next step, like ``get_last_lr()``.

        A parameter with its own rate in ``params`` overrides its group's; see
        ``get_param_drop_rates``.
        """
        default = self.drop_rate
        groups = self.param_groups
        return [self._settings.group_rate(i, g, default) for i, g in enumerate(groups)]

    def get_param_drop_rates(self) -> dict[str, float | None]:
        """The next-step rate of each parameter that has its own rate in ``params``.

        Keys are parameter names where the optimizer knows them, else
        ``"param_groups[i][j]"``. A name shared by several parameters (a param
        group's ``'name'`` entry names all of its parameters) is not used, so no
        parameter's rate hides another's.
        """
        named = named_parameters_of(self.param_groups)
        uses = Counter(name for name, _ in named)
        names = {id(p): n for n, p in named if uses[n] == 1}
        own_rates = self._settings.param_rates
        rates: dict[str, float | None] = {}
        for i, group in enumerate(self.param_groups):
            for j, param in enumerate(group["params"]):
                if param in own_rates:
                    key = names.get(id(param), f"param_groups[{i}][{j}]")
                    rates[key] = current_rate(own_rates[param], key)
        return rates

    # ------------------------------------------------------------------ steps
    # ------------------------------------------------------------------ steps

    def _is_state_initialization(self) -> bool:
        """Whether this step only creates the wrapped optimizer's state.

        ``torch.distributed.checkpoint.state_dict`` builds a fresh optimizer's
        state by one ``step()`` with all-zero gradients and every learning rate
        set to 0 (``_init_optim_state``). Such a step moves no parameter
        whatever DropGrad does, so DropGrad passes it through unmasked and does
        not count it: the mask sequence and the schedulers stay where a resumed
        run expects them.
        """
        if self.optimizer.state:
            return False
        grads = []
        for group in self.param_groups:
            lr = group.get("lr")
            if lr is None or float(lr) != 0.0:
                return False
            grads += [p.grad for p in group["params"] if p.grad is not None]
        if not grads:
            return False
        for grad in grads:
            local = grad._values() if grad.is_sparse else grad
            if is_dtensor(local):
                local = local.to_local()
            if bool(local.any()):
                return False
        return True

    def _run_wrapped_step(self, closure: Callable[[], Any] | None) -> Any:
        """Call the wrapped optimizer's ``step`` (with ``closure`` when one is given).

        Hooks registered globally with ``register_optimizer_step_pre_hook`` /
        ``_post_hook`` have already fired for this training step, for the
        DropGrad the user called: a profiler or step counter must see one step,
        not two. They are held back for the wrapped call, whose own instance
        hooks still fire. (Like torch's hook dictionaries, this is not meant
        for steps running concurrently in several threads.)
        """
        with _global_step_hooks_suspended():
            if closure is None:
                return self.optimizer.step()
            return self.optimizer.step(closure)

    @torch.compiler.disable
    def _before_wrapped_step(self, closure: Callable[[], Any] | None) -> _Prepared | None:
        """Plan the step and draw full update drop's decision; mask the gradients now
        unless a closure will produce them. ``None`` when the step is skipped (its
        counters are then already advanced)."""
        if self._is_state_initialization():
            return _Prepared(False, 1.0, None, [])
        settings = self._settings
        runs = plan_step(settings, self.param_groups)
        skip_probability = settings.skip_probability()
        if skip_decision(settings.seed, settings.step_count, skip_probability):
            # LR schedulers built on the wrapped optimizer check that its step
            # ran; a deliberately skipped step counts as run for them.
            self.optimizer._opt_called = True  # type: ignore[attr-defined]
            settings.finish_step(self.param_groups, skipped=True)
            return None
        scale = 1.0 / (1.0 - skip_probability)
        snapshots = UpdateSnapshots(
            run for run in runs if run.target == "update" and (run.rate or scale != 1.0)
        )
        gradient_runs = [run for run in runs if run.target == "gradient"]
        prepared = _Prepared(True, scale, snapshots, gradient_runs)
        if closure is None:
            self._mask_gradients(prepared)
        return prepared

    @torch.compiler.disable
    def _mask_gradients(self, prepared: _Prepared) -> None:
        if not prepared.counted:
            return
        settings = self._settings
        batch = Batch(prepared.scale)
        for run in prepared.gradient_runs:
            batch.add_gradients(run)
        batch.mask_(settings.seed, settings.step_count, settings.distribution)

    @torch.compiler.disable
    def _after_wrapped_step(self, prepared: _Prepared) -> None:
        """Mask the updates of ``target="update"`` parameters; advance the counters."""
        if not prepared.counted:
            return
        settings = self._settings
        if prepared.snapshots:
            batch = Batch(prepared.scale)
            prepared.snapshots.mask_updates(
                batch, settings.seed, settings.step_count, settings.distribution
            )
        settings.finish_step(self.param_groups, skipped=False)

    # Under torch.compile, DropGrad's own work (the plan, the masks, the counters)
    # runs eagerly in the three functions above, behind graph breaks: it depends on
    # Python counters that change every step, which dynamo would specialise on. The
    # wrapped optimizer's step between them is traced and compiled as it would be
    # without DropGrad; dynamo guards only on whether the step was skipped, so a
    # run compiles at most two versions of this function.
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Mask the gradients (or the update) and run the wrapped optimizer's step.

        With a ``closure`` (e.g. LBFGS) and ``target="gradient"``, the gradients
        are masked after every evaluation, so the wrapped optimizer never sees
        an unmasked gradient; with ``target="update"`` the final change is
        masked. When full update drop skips the step, the wrapped ``step()`` is
        not called at all, but the closure is still evaluated once and its loss
        returned. Schedulers advance once per call either way.

        Returns:
            The loss from ``closure``, or whatever the wrapped ``step()`` returns.
        """
        prepared = self._before_wrapped_step(closure)
        if prepared is None:
            if closure is None:
                return None
            with torch.enable_grad():
                return closure()
        if closure is None:
            loss = self._run_wrapped_step(None)
        else:

            def masked_closure() -> Any:
                with torch.enable_grad():
                    value = closure()
                self._mask_gradients(prepared)
                return value

            loss = self._run_wrapped_step(masked_closure)
        self._after_wrapped_step(prepared)
        return loss

    # ------------------------------------------------------- optimizer plumbing

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Delegate to the wrapped optimizer's ``zero_grad``."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the wrapped optimizer; its parameters get the default rate.

        ``'drop_rate'``, ``'target'`` and ``'granularity'`` entries in the group
        set the group's own.

        Raises:
            TypeError: ``param_group`` is not a dict, or an entry has the wrong type.
            ValueError: an entry has an invalid value.
        """
        if not isinstance(param_group, Mapping):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        if "optimizer" not in self.__dict__:
            # Called by Optimizer.__init__ for its placeholder group.
            super().add_param_group(dict(param_group))
            return
        check_group_entries(param_group, "param_group")
        self.optimizer.add_param_group(dict(param_group))

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict plus DropGrad's under ``"dropgrad"``.

        DropGrad's part (the seed, counters, rates, target, granularity and
        scheduler states; no tensors) is also kept in every param group, so
        checkpointing paths that keep only ``state`` and ``param_groups``
        (``torch.distributed.checkpoint``, Lightning, the Hugging Face
        ``Trainer``) carry it too. It loads with ``torch.load(weights_only=True)``
        and any ``map_location``. State-dict hooks registered on DropGrad run as
        on any optimizer.
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state = _checkpoint.build_state_dict(self._settings, self.optimizer)
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            replaced = post_hook(self, state)
            if replaced is not None:
                state = replaced
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a state dict from ``state_dict`` (or a plain optimizer's).

        Loading into a fresh DropGrad around a fresh optimizer continues the run
        bit-identically. DropGrad must be built with the same kind of rate
        (fixed or scheduler) in the same places as the saved one. As torch
        optimizers restore ``lr``, loading replaces this DropGrad's fixed rates
        (the default, group and per-parameter ones), ``full_update_drop``, the
        distribution, target, granularity and seed with the checkpoint's; a
        plain optimizer's state dict (no DropGrad part) keeps them.

        Raises:
            ValueError: the state dict does not fit this optimizer; the message
                says what differs.
        """
        # A shallow copy, as torch.optim makes, that the hooks may edit.
        loaded: Any = dict(state_dict) if isinstance(state_dict, Mapping) else state_dict
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            replaced = pre_hook(self, loaded)
            if replaced is not None:
                loaded = replaced
        self._settings = _checkpoint.load_state_dict(self._settings, self.optimizer, loaded)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def __getattr__(self, name: str) -> Any:
        """Look up what DropGrad does not define on the wrapped optimizer.

        Schedule-Free's ``train()`` / ``eval()``, ``ZeroRedundancyOptimizer``'s
        ``consolidate_state_dict()`` and other optimizers' own methods work on
        the wrapper. Only called when normal lookup fails. Private names do not
        fall through: torch probes private attributes of every optimizer
        (``_opt_called``, hook dictionaries, profiling names), and the wrapper
        must keep its own rather than silently share the wrapped one's.

        Raises:
            AttributeError: neither DropGrad nor the wrapped optimizer has it.
        """
        wrapped = self.__dict__.get("optimizer")
        if name.startswith("_") or wrapped is None:
            # wrapped is None while unpickling or copying, before __dict__ is filled.
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        try:
            return getattr(wrapped, name)
        except AttributeError:
            raise AttributeError(
                f"{type(self).__name__!r} object has no attribute {name!r}, and neither has "
                f"the wrapped {type(wrapped).__name__}"
            ) from None

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in _UNPICKLED_ATTRIBUTES}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)

    def __repr__(self) -> str:
        settings = self._settings
        rate = settings.default_rate
        own_rates = settings.param_rates
        own = f", {len(own_rates)} per-parameter rate(s)" if own_rates else ""
        inner = "\n".join("    " + line for line in repr(self.optimizer).splitlines())
        return (
            f"DropGrad(drop_rate={rate!r}{own}, full_update_drop={settings.full_update_drop!r}, "
            f"distribution={self.distribution!r},\n  optimizer=\n{inner}\n)"
        )
