"""The DropGrad optimizer: mask gradients, then delegate to the wrapped optimizer."""

from __future__ import annotations

import contextlib
import warnings
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


#: What ``torch.amp.GradScaler`` sets on an optimizer whose step unscales by itself.
_AMP_ATTRIBUTES = ("grad_scale", "found_inf")
_NOT_SET = object()

# torch optimizers that divide by ``sqrt(state) + eps`` (Adamax: by ``max(|g|) + eps``),
# whose state stays 0 while an element's gradients are all exactly 0: with an ``eps`` that
# is 0 in the parameters' dtype (the defaults 1e-8 and Adagrad's 1e-10 are, in float16)
# the step is 0 / 0. tests/test_amp_passthrough.py checks this against torch.
_DIVIDE_BY_EPS = (
    torch.optim.Adagrad,
    torch.optim.Adam,
    torch.optim.AdamW,  # a subclass of Adam only in recent torch
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.RMSprop,
)


def _zero_gradient_nan(optimizer: Optimizer, group: Mapping[str, Any]) -> str | None:
    """Why ``optimizer`` turns an exactly-zero gradient in ``group`` into NaN, or ``None``.

    Fused kernels compute in float32; weight decay coupled to the gradient
    makes it non-zero (AdamW's and ``decoupled_weight_decay=True`` do not).
    """
    if not isinstance(optimizer, _DIVIDE_BY_EPS) or group.get("fused"):
        return None
    eps = group.get("eps")
    if isinstance(eps, bool) or not isinstance(eps, int | float):
        return None
    decoupled = isinstance(optimizer, torch.optim.AdamW) or group.get("decoupled_weight_decay")
    if group.get("weight_decay") and not decoupled:
        return None
    for dtype in sorted({p.dtype for p in group["params"] if p.is_floating_point()}, key=str):
        if float(torch.tensor(eps, dtype=dtype)) == 0.0:
            name = str(dtype).removeprefix("torch.")
            return (
                f"{type(optimizer).__name__} with {name} parameters and eps={eps!r}, which is 0 "
                f"in {name}, turns an exactly-zero gradient into NaN (0 / 0; torch does so "
                "without DropGrad too), and DropGrad zeroes gradient elements: an element "
                f"dropped at every step so far becomes NaN. Use an eps that {name} can hold "
                "(e.g. 1e-4), fused=True, or float32 parameters."
            )
    return None


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
        self._nan_hazard_checked = False

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
        counters are then already advanced, unless GradScaler found an inf)."""
        self._take_back_amp_attributes()  # left by a wrapped step that raised
        if torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "DropGrad.step() cannot be captured in a CUDA graph: the step counter, "
                "the rates and the stream keys are read on the host at every step, so "
                "each replay would repeat the captured step's mask; call step() outside "
                "the captured region"
            )
        found_inf = self.__dict__.get("found_inf")
        if found_inf is not None and bool(found_inf):
            # GradScaler's fused path calls step() on an inf too. Its unscaling path
            # does not call step() at all, and this step is left out as that one is:
            # not counted, nothing masked, the wrapped step not run. Reading the flag
            # costs the one host synchronisation per step that the unscaling path
            # pays as well; the separate unscale pass over every gradient is saved.
            self.optimizer._opt_called = True  # type: ignore[attr-defined]
            return None
        if self._is_state_initialization():
            self._hand_amp_attributes()
            return _Prepared(False, 1.0, None, [])
        settings = self._settings
        runs = plan_step(settings, self.param_groups)
        if not self.__dict__.get("_nan_hazard_checked", True):
            self._warn_of_zero_gradient_nan(runs)
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
        self._hand_amp_attributes()
        return prepared

    def _hand_amp_attributes(self) -> None:
        """Give the wrapped optimizer the ``grad_scale`` and ``found_inf`` that
        GradScaler set on DropGrad (see ``_step_supports_amp_scaling``)."""
        handed = {}
        for name in _AMP_ATTRIBUTES:
            if name in self.__dict__:
                handed[name] = self.optimizer.__dict__.get(name, _NOT_SET)
                setattr(self.optimizer, name, self.__dict__[name])
        if handed:
            self.__dict__["_amp_handed"] = handed

    def _take_back_amp_attributes(self) -> None:
        """Restore the wrapped optimizer's own ``grad_scale`` / ``found_inf`` (usually none)."""
        for name, own in self.__dict__.pop("_amp_handed", {}).items():
            if own is _NOT_SET:
                self.optimizer.__dict__.pop(name, None)
            else:
                setattr(self.optimizer, name, own)

    def _warn_of_zero_gradient_nan(self, runs: list[Run]) -> None:
        """Warn once, at the first step that masks, where the wrapped optimizer turns a
        dropped element into NaN."""
        masked = {id(param) for run in runs if run.rate for param in run.params}
        if not masked:
            return  # nothing masked yet (a scheduler may start at 0): ask again next step
        self._nan_hazard_checked = True
        for group in self.param_groups:
            if not any(id(param) in masked for param in group["params"]):
                continue
            reason = _zero_gradient_nan(self.optimizer, group)
            if reason is not None:
                warnings.warn(f"DropGrad: {reason}", RuntimeWarning, stacklevel=4)
                return

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
        self._take_back_amp_attributes()
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

        Under ``torch.amp.GradScaler``, a wrapped optimizer that unscales in its
        own kernel (fused Adam, AdamW, SGD, Adagrad) gets the loss scale and
        inf flag that GradScaler sets on DropGrad, so no separate unscaling
        pass runs; the results are bit-identical to GradScaler unscaling. A
        step in which GradScaler found an inf is left out, as GradScaler leaves
        it out for other optimizers: not counted, nothing masked, the wrapped
        step not run. Telling costs one host synchronisation per step, which
        GradScaler's unscaling path pays too.

        With float16 parameters and an optimizer that turns an exactly-zero
        gradient into NaN (non-fused Adagrad, Adam, AdamW, Adamax, NAdam, RAdam
        or RMSprop whose ``eps`` is 0 in float16, as the defaults are), the
        first step that masks warns once (``RuntimeWarning``).

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

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """Whether ``step()`` unscales the gradients and skips an inf by itself.

        ``torch.amp.GradScaler`` asks every optimizer. DropGrad answers for the
        wrapped one (fused Adam, AdamW, SGD and Adagrad say yes): GradScaler then
        sets ``grad_scale`` and ``found_inf`` on DropGrad instead of unscaling
        every gradient in a pass of its own, and DropGrad hands both to the
        wrapped step. Masking commutes with the loss scale (a power of two), so
        a run is bit-identical to the one where GradScaler unscales. A step in
        which GradScaler found an inf is left out as GradScaler's unscaling path
        leaves it out: not counted, nothing masked, the wrapped step not run
        (telling costs one host synchronisation a step, as that path pays too).
        """
        return bool(getattr(self.__dict__.get("optimizer"), "_step_supports_amp_scaling", False))

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
