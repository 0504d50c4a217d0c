"""Every optimizer in torch's own optimizer table, wrapped in DropGrad.

torch tests its optimizers over one table, ``optim_db`` in
``torch.testing._internal.common_optimizers``: each optimizer with its notable
constructor variants. Each input of the table, with every implementation flag off
and with each flag the optimizer supports on CPU (foreach, differentiable, fused)
turned on alone, is run here in float32, float64, float16 and bfloat16, in
complex64 where the table marks complex support, and with sparse gradients where
it marks sparse support (torch's sparse arguments), for:

* rate 0: bit-identical to the bare optimizer over several steps (parameters,
  optimizer state, returned losses), without and with a closure (float32,
  float64 and sparse both ways; only with one where the optimizer requires it);
* rate > 0: ``.grad`` after each step holds exactly the mask that
  ``drop_grad(g, p, seed=s, step=k, index=i)`` gives, and the parameters, state
  and losses are bit-identical to the bare optimizer fed those masked gradients;
  the run stays finite wherever the bare optimizer's does, except where an
  exactly-zero gradient alone makes the bare optimizer produce NaN
  (``ZERO_GRADIENT_NAN``, checked against torch), where DropGrad warns once
  (and nowhere else), and for LBFGS;
* the state dict round-trips, and a fresh DropGrad loaded from it resumes
  bit-identically.

Cases the bare optimizer cannot run on CPU (fused kernels with complex
parameters; a bare run that raises) are skipped with the reason.

The table is read in a child interpreter: importing ``torch.testing._internal``
changes process-wide settings (it freezes ``torch.backends`` flags and patches
TorchScript calls), which the rest of the suite must not inherit. The child
sends back plain data: optimizer names, flags and constructor arguments.
"""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
import tempfile
import textwrap
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor

from dropgrad import DropGrad
from dropgrad.functional import drop_grad

STEPS = 3
RATE = 0.3
SEED = 2024
SHAPES = [(4, 3), (3, 5)]  # two-dimensional: Muon takes nothing else
SPARSE_SHAPE = (6, 3)
DENSE_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
COMPLEX_DTYPE = torch.complex64
# The global-cliquey flags (torch's term): at most one of them is on in a variant.
IMPLEMENTATION_FLAGS = ("foreach", "differentiable", "fused")

# ------------------------------------------------------------------ the table

_READ_TABLE = textwrap.dedent(
    """
    import sys, types, unittest
    import torch
    try:
        import expecttest  # noqa: F401
    except ImportError:
        # torch.testing._internal.common_utils imports it for its TestCase base
        # class only; the table needs nothing from it.
        stand_in = types.ModuleType("expecttest")
        stand_in.TestCase = unittest.TestCase
        stand_in.ACCEPT = False
        sys.modules["expecttest"] = stand_in
    from torch.testing._internal.common_optimizers import optim_db

    dtypes = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64]
    table = []
    def inputs_for(info, dtype):
        try:
            return info.optim_inputs_func("cpu", dtype)
        except TypeError:  # older tables: no dtype argument
            return info.optim_inputs_func("cpu")

    for info in optim_db:
        inputs = {}
        for dtype in dtypes:
            inputs[str(dtype)] = [
                (oi.desc, oi.kwargs, oi.params is None) for oi in inputs_for(info, dtype)
            ]
        # Attributes a table of an older torch may lack take their neutral value.
        sparse_metadata = getattr(info, "metadata_for_sparse", None) or ({},)
        table.append(dict(
            name=info.name,
            module=info.optim_cls.__module__,
            supported_impls=tuple(getattr(info, "supported_impls", ())),
            supports_fused_on=tuple(getattr(info, "supports_fused_on", ())),
            supports_complex=bool(getattr(info, "supports_complex", False)),
            supports_sparse=bool(getattr(info, "supports_sparse", False)),
            only_supports_sparse_grads=bool(getattr(info, "only_supports_sparse_grads", False)),
            step_requires_closure=bool(getattr(info, "step_requires_closure", False)),
            sparse_kwargs=dict(sparse_metadata[0]),
            inputs=inputs,
        ))
    # To a file: torch's testing modules may print to stdout while they load.
    torch.save(dict(version=torch.__version__, table=table), sys.argv[1])
    """
)


def _read_table() -> tuple[list[dict[str, Any]], str | None]:
    """torch's optimizer table as plain data, or ``[]`` and the reason it could not be read."""
    with tempfile.TemporaryDirectory(prefix="dropgrad-optim-db-") as directory:
        path = os.path.join(directory, "table.pt")
        done = subprocess.run(
            [sys.executable, "-c", _READ_TABLE, path], capture_output=True, timeout=300, check=False
        )
        if done.returncode != 0:
            last = done.stderr.decode(errors="replace").strip().splitlines()[-1:]
            return [], f"torch's optim_db could not be read: {' '.join(last)}"
        read = torch.load(path, weights_only=False)
    return read["table"], None


TABLE, TABLE_PROBLEM = _read_table()


@dataclass(frozen=True)
class Case:
    """One optimizer, one constructor variant of the table, one dtype and gradient layout."""

    name: str
    module: str
    desc: str
    kwargs: dict[str, Any]
    dtype: torch.dtype
    sparse: bool
    requires_closure: bool

    @property
    def optim_cls(self) -> type[torch.optim.Optimizer]:
        module = sys.modules.get(self.module) or __import__(self.module, fromlist=[self.name])
        return getattr(module, self.name)

    @property
    def differentiable(self) -> bool:
        return bool(self.kwargs.get("differentiable"))

    @property
    def fused(self) -> bool:
        return bool(self.kwargs.get("fused"))

    @property
    def id(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        layout = "-sparse" if self.sparse else ""
        return f"{self.name}-{self.desc}-{dtype}{layout}".replace(" ", "_")


def _variants(entry: dict[str, Any], dtype: torch.dtype) -> Iterator[tuple[str, dict[str, Any]]]:
    """Each constructor variant on CPU: the table's inputs, each with every flag off and with
    each implementation flag the optimizer supports on CPU turned on alone (as torch does)."""
    flags = [
        flag
        for flag in entry["supported_impls"]
        if flag in IMPLEMENTATION_FLAGS and (flag != "fused" or "cpu" in entry["supports_fused_on"])
    ]
    for desc, kwargs, params_free in entry["inputs"][str(dtype)]:
        if not params_free:
            continue  # the table leaves parameters to the test; none of its inputs sets them
        base = dict(kwargs, **dict.fromkeys(flags, False))
        yield desc, base
        for flag in flags:
            yield f"{desc} & {flag}", dict(base, **{flag: True})


def _cases() -> list[Case]:
    cases = []
    for entry in TABLE:
        closure = entry["step_requires_closure"]
        if not entry["only_supports_sparse_grads"]:
            dtypes = DENSE_DTYPES + ([COMPLEX_DTYPE] if entry["supports_complex"] else [])
            for dtype in dtypes:
                for desc, kwargs in _variants(entry, dtype):
                    cases.append(
                        Case(entry["name"], entry["module"], desc, kwargs, dtype, False, closure)
                    )
        if entry["supports_sparse"] or entry["only_supports_sparse_grads"]:
            # torch's sparse configurations: its tuned arguments for sparse gradients, and for
            # an optimizer that takes nothing else every variant of the table.
            configs = [("sparse config", entry["sparse_kwargs"])]
            if entry["only_supports_sparse_grads"]:
                configs += list(_variants(entry, torch.float32))
            for dtype in (torch.float32, torch.float64):
                for desc, kwargs in configs:
                    cases.append(
                        Case(entry["name"], entry["module"], desc, kwargs, dtype, True, closure)
                    )
    return cases


CASES = _cases()

pytestmark = [
    # torch's own optimizers read .grad of the non-leaf parameters a differentiable step uses,
    # and sparse Adagrad builds sparse tensors without saying whether to check them.
    pytest.mark.filterwarnings(
        "ignore:The .grad attribute of a Tensor that is not a leaf Tensor:UserWarning"
    ),
    pytest.mark.filterwarnings("ignore:Sparse invariant checks are implicitly disabled"),
    # DropGrad's warning of float16 optimizers that make a zero gradient NaN: checked below.
    pytest.mark.filterwarnings("ignore:DropGrad.*turns an exactly-zero gradient into NaN"),
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Every tensor here is tiny: torch's thread pool only adds wake-up latency, which on a
    busy machine made a fused CPU step 10 to 70 times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _skip_reason(case: Case) -> str | None:
    """Why torch's table offers a case that the bare optimizer cannot run on CPU."""
    if case.fused and case.dtype.is_complex:
        return "torch's fused kernels take floating-point parameters only, not complex"
    return None


def _params(cases: list[Case]) -> list[Any]:
    if not cases:
        return [pytest.param(None, marks=pytest.mark.skip(reason=TABLE_PROBLEM or "no cases"))]
    params = []
    for case in cases:
        reason = _skip_reason(case)
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        params.append(pytest.param(case, id=case.id, marks=marks))
    return params


def _bare_or_skip(run: Callable[[], Any]) -> Any:
    """``run()``, a run of the bare optimizer; a failure of torch's own is a skip, not a test
    failure: there is nothing for DropGrad to match."""
    try:
        return run()
    except (RuntimeError, ValueError, ZeroDivisionError) as error:
        pytest.skip(f"the bare optimizer fails on its own: {type(error).__name__}: {error}")


# ------------------------------------------------------------------ the runs


def _initial_values(case: Case) -> list[Tensor]:
    source = torch.Generator().manual_seed(7)
    shapes = [SPARSE_SHAPE, SPARSE_SHAPE] if case.sparse else SHAPES
    values = []
    for shape in shapes:
        real = torch.randn(shape, dtype=torch.float64, generator=source)
        if case.dtype.is_complex:
            real = torch.complex(real, torch.randn(shape, dtype=torch.float64, generator=source))
        values.append(real.to(case.dtype))
    return values


def _make_params(values: list[Tensor], case: Case, *, history: bool = True) -> list[Tensor]:
    """Leaf parameters; for ``differentiable=True`` non-leaf ones, as torch's tests of it use
    (such a step updates them with autograd recording), or with ``history=False`` tensors
    that do not require grad (a differentiable step refuses to update a leaf that does)."""
    if case.differentiable:
        if not history:
            return [v.clone() for v in values]
        return [v.clone().requires_grad_().clone() for v in values]
    return [v.clone().requires_grad_() for v in values]


def _gradients(params: list[Tensor], case: Case, step: int) -> tuple[Tensor, list[Tensor]]:
    """The loss and its gradients at ``params``: a weighted quadratic whose targets move with
    ``step``, worked out in float64 (no autograd, so a differentiable optimizer's history in
    the parameters is left alone) and rounded to the parameters' dtype.

    Sparse gradients keep a few rows, one of them split over two entries (uncoalesced), as
    torch's sparse tests give them.
    """
    source = torch.Generator().manual_seed(100 + step)
    loss = torch.zeros((), dtype=torch.float64)
    grads = []
    for i, param in enumerate(params):
        value = param.detach().to(torch.complex128 if param.is_complex() else torch.float64)
        target = torch.randn(param.shape, dtype=torch.float64, generator=source)
        weight = float(i + 1)
        diff = value - target
        loss = loss + weight * diff.abs().square().sum()
        grad = (2 * weight * diff).to(param.dtype)
        if case.sparse:
            rows = torch.tensor([step % 6, (step + 2) % 6, step % 6, 5])
            values = grad[rows].clone()
            values[0] *= 0.5
            values[2] = grad[rows[2]] - values[0]
            grad = torch.sparse_coo_tensor(
                rows.unsqueeze(0), values, grad.shape, check_invariants=True
            )
        grads.append(grad)
    return loss, grads


def _make_optimizer(case: Case, params: list[Tensor]) -> torch.optim.Optimizer:
    # Each optimizer gets its own copy: a tensor lr or beta must not be shared between runs.
    return case.optim_cls(params, **copy.deepcopy(case.kwargs))


GradientMap = Callable[[int, int, Tensor], Tensor]


def _run(
    case: Case,
    optimizer: torch.optim.Optimizer,
    params: list[Tensor],
    steps: range,
    *,
    closure: bool,
    feed: GradientMap | None = None,
    after_step: Callable[[int], None] | None = None,
) -> list[Any]:
    """Step ``optimizer`` over ``steps``; the losses returned by ``step``.

    ``feed(step, index, grad)`` changes the gradient each evaluation gives (the masked
    reference); ``after_step(step)`` checks something after each step.
    """

    def set_gradients(step: int) -> Tensor:
        loss, grads = _gradients(params, case, step)
        for i, (param, grad) in enumerate(zip(params, grads)):
            param.grad = grad if feed is None else feed(step, i, grad)
        return loss

    returned = []
    for step in steps:
        if closure:

            def evaluate(step: int = step) -> Tensor:
                optimizer.zero_grad()
                return set_gradients(step)

            returned.append(optimizer.step(evaluate))
        else:
            optimizer.zero_grad()
            set_gradients(step)
            returned.append(optimizer.step())
        if after_step is not None:
            after_step(step)
    return returned


def _closure_modes(case: Case) -> list[bool]:
    """With a closure only where the optimizer requires one; both ways for float32, float64
    and sparse gradients (the closure path does not depend on the dtype)."""
    if case.requires_closure:
        return [True]
    if case.sparse or case.dtype in (torch.float32, torch.float64):
        return [False, True]
    return [False]


def _steps(case: Case) -> int:
    """An optimizer that requires a closure (LBFGS) evaluates it up to 25 times a step."""
    return 2 if case.requires_closure else STEPS


def _wrap(case: Case, params: list[Tensor], rate: float, seed: int = SEED) -> DropGrad:
    return DropGrad(_make_optimizer(case, params), drop_rate=rate, seed=seed)


def _bits(tensor: Tensor) -> Tensor:
    """The tensor's bytes, so that NaN payloads and signed zeros count."""
    tensor = tensor.detach()
    if tensor.is_sparse:
        tensor = tensor.coalesce()
        return torch.cat([_bits(tensor.indices()), _bits(tensor.values())])
    if tensor.is_complex():
        tensor = torch.view_as_real(tensor.resolve_conj())
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def assert_same(actual: Any, expected: Any, where: str = "") -> None:
    """Recursive bit-for-bit equality of tensors, containers and plain values."""
    if isinstance(expected, Tensor):
        assert isinstance(actual, Tensor), f"{where}: {type(actual).__name__}, not a tensor"
        assert (actual.dtype, actual.shape, actual.layout) == (
            expected.dtype,
            expected.shape,
            expected.layout,
        ), f"{where}: {actual.dtype} {tuple(actual.shape)} vs {expected.dtype} {expected.shape}"
        assert torch.equal(_bits(actual), _bits(expected)), f"{where}: values differ"
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys(), (
            f"{where}: keys {sorted(map(str, actual))} vs {sorted(map(str, expected))}"
        )
        for key in expected:
            assert_same(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, list | tuple):
        assert type(actual) is type(expected) and len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, f"{where}[{i}]")
    elif isinstance(expected, float) and math.isnan(expected):
        assert isinstance(actual, float) and math.isnan(actual), where
    else:
        assert actual == expected, f"{where}: {actual!r} vs {expected!r}"


def _same(actual: Any, expected: Any) -> bool:
    try:
        assert_same(actual, expected)
    except AssertionError:
        return False
    return True


def _state(optimizer: torch.optim.Optimizer) -> dict[Any, Any]:
    return optimizer.state_dict()["state"]


def _finite(params: list[Tensor]) -> bool:
    return all(bool(torch.isfinite(p.detach()).all()) for p in params)


# ------------------------------------------------------------------ documented hazards

# Where an exactly-zero gradient alone (no DropGrad) makes the bare optimizer's step NaN on
# CPU: an ``eps`` that rounds to zero in float16 leaves 0 / 0 for an element whose gradients
# so far are all zero. DropGrad at a positive rate makes exact zeros routine. An entry
# means that some variant of the table does it; test_zero_gradient_hazards_match_torch
# checks the set against torch for every variant.
ZERO_GRADIENT_NAN = {
    (name, torch.float16) for name in ("Adagrad", "Adamax", "NAdam", "RAdam", "RMSprop")
}


def _zero_gradient_gives_nan(case: Case) -> bool:
    """Whether the bare optimizer's step turns an exactly-zero gradient into NaN."""
    values = [torch.ones(shape, dtype=case.dtype) for shape in SHAPES]
    params = _make_params(values, case)
    optimizer = _make_optimizer(case, params)

    def zero() -> Tensor:
        optimizer.zero_grad()
        for param in params:
            param.grad = torch.zeros_like(param)
        return torch.zeros((), dtype=torch.float64)

    for _ in range(8):  # RAdam's first steps take no square root, its sixth does
        if case.requires_closure:
            optimizer.step(zero)
        else:
            zero()
            optimizer.step()
    return not _finite(params)


def _hazard_key(case: Case) -> tuple[str, torch.dtype]:
    return case.name, case.dtype


# ------------------------------------------------------------------ tests


def _masked(step: int, index: int, grad: Tensor) -> Tensor:
    """The gradient as DropGrad with ``SEED`` masks parameter ``index`` at step ``step``."""
    return drop_grad(grad, RATE, seed=SEED, step=step, index=index)


@pytest.mark.parametrize("case", _params(CASES))
def test_matches_the_bare_optimizer_and_the_functional_masks(case: Case) -> None:
    for closure in _closure_modes(case):
        _check_against_bare(case, closure)


def _check_against_bare(case: Case, closure: bool) -> None:
    values = _initial_values(case)
    steps = range(_steps(case))
    where = f"closure={closure}"
    bare_params = _make_params(values, case)
    bare = _make_optimizer(case, bare_params)
    bare_returned = _bare_or_skip(lambda: _run(case, bare, bare_params, steps, closure=closure))

    # Rate 0: the bare optimizer, bit for bit.
    params = _make_params(values, case)
    wrapped = _wrap(case, params, 0.0)
    returned = _run(case, wrapped, params, steps, closure=closure)
    assert_same(params, bare_params, f"{where}, rate 0, parameters")
    assert_same(_state(wrapped.optimizer), _state(bare), f"{where}, rate 0, state")
    assert_same(returned, bare_returned, f"{where}, rate 0, returned losses")
    assert wrapped.step_count == len(steps)

    # Rate > 0: the bare optimizer fed the masks drop_grad gives for each step and parameter
    # position; .grad after each step holds the masked gradient it used.
    reference_params = _make_params(values, case)
    reference = _make_optimizer(case, reference_params)
    used: list[list[Tensor]] = []

    def record(step: int) -> None:
        used.append([p.grad.detach().clone() for p in reference_params])

    expected = _run(
        case, reference, reference_params, steps, closure=closure, feed=_masked, after_step=record
    )
    params = _make_params(values, case)
    wrapped = _wrap(case, params, RATE)

    def check(step: int) -> None:
        assert_same([p.grad for p in params], used[step], f"{where}, step {step}, .grad")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        returned = _run(case, wrapped, params, steps, closure=closure, after_step=check)
    warned = [w for w in caught if str(w.message).startswith("DropGrad:")]
    assert_same(params, reference_params, f"{where}, rate {RATE}, parameters")
    assert_same(_state(wrapped.optimizer), _state(reference), f"{where}, rate {RATE}, state")
    assert_same(returned, expected, f"{where}, rate {RATE}, returned losses")

    # Finite wherever the bare optimizer, fed the unmasked gradients, is; unless the bare
    # optimizer itself turns an exactly-zero gradient into NaN (a documented hazard), or the
    # optimizer is LBFGS, whose curvature history masks that change every step break (in
    # float16 it overflows; documented too).
    if _finite(bare_params) and not _finite(params) and case.name != "LBFGS":
        assert _zero_gradient_gives_nan(case), (
            f"{where}: NaN or inf with DropGrad where the bare optimizer stays finite"
        )
        assert _hazard_key(case) in ZERO_GRADIENT_NAN
        assert warned, f"{where}: NaN from a zero gradient, and DropGrad did not warn"
    # DropGrad's warning of that hazard: once, and only where it is real.
    assert len(warned) <= 1, warned
    if warned:
        assert issubclass(warned[0].category, RuntimeWarning)
        assert not case.sparse and _zero_gradient_gives_nan(case), str(warned[0].message)


@pytest.mark.parametrize("case", _params(CASES))
def test_state_dict_round_trips_and_resumes(case: Case) -> None:
    """A fresh DropGrad loaded from a checkpoint resumes the masks and the wrapped optimizer
    where they were, bit for bit; the wrapped optimizer's part comes back as torch's own
    ``load_state_dict`` makes it (which turns some scalar states of a float64 or float16
    optimizer into float32: ASGD's ``eta`` and ``mu``, NAdam's ``mu_product``, LBFGS's ``t``).

    A differentiable optimizer's state carries autograd history, which no state dict
    deep-copies (torch refuses to copy non-leaf tensors), so its run starts from tensors
    without one.
    """
    closure = case.requires_closure
    end = _steps(case)
    half = end // 2
    values = _initial_values(case)
    probe_params = _make_params(values, case, history=False)
    probe = _make_optimizer(case, probe_params)
    _bare_or_skip(
        lambda: _run(case, probe, probe_params, range(end), closure=closure, feed=_masked)
    )
    params = _make_params(values, case, history=False)
    wrapped = _wrap(case, params, RATE)
    _run(case, wrapped, params, range(half), closure=closure)
    saved = copy.deepcopy(wrapped.state_dict())
    saved_wrapped_part = copy.deepcopy(wrapped.optimizer.state_dict())
    values_then = [p.detach().clone() for p in params]
    _run(case, wrapped, params, range(half, end), closure=closure)

    # The reference: the bare optimizer loaded from the wrapped one's own state dict, fed the
    # masks DropGrad gives from step `half` on.
    bare_params = _make_params(values_then, case, history=False)
    bare = _make_optimizer(case, bare_params)
    bare.load_state_dict(copy.deepcopy(saved_wrapped_part))
    lossless = _same(bare.state_dict(), saved_wrapped_part)

    resumed_params = _make_params(values_then, case, history=False)
    # Another seed: loading restores the checkpoint's.
    resumed = _wrap(case, resumed_params, RATE, seed=SEED + 1)
    resumed.load_state_dict(copy.deepcopy(saved))
    assert_same(resumed.state_dict(), dict(saved, state=bare.state_dict()["state"]), "loaded")
    assert (resumed.seed, resumed.step_count) == (SEED, half)

    _run(case, bare, bare_params, range(half, end), closure=closure, feed=_masked)
    _run(case, resumed, resumed_params, range(half, end), closure=closure)
    assert_same(resumed_params, bare_params, "parameters, against the bare optimizer")
    assert_same(_state(resumed.optimizer), _state(bare), "state, against the bare optimizer")
    if lossless:
        # torch's own round trip changes nothing: the run goes on as if never interrupted.
        assert_same(resumed_params, params, "parameters, against the uninterrupted run")
        assert_same(resumed.state_dict(), wrapped.state_dict(), "state dict at the end")


def test_zero_gradient_hazards_match_torch() -> None:
    """``ZERO_GRADIENT_NAN`` lists exactly the low-precision optimizers whose bare step turns
    an exactly-zero gradient into NaN for some variant of the table."""
    if not CASES:
        pytest.skip(TABLE_PROBLEM or "no cases")
    found = {
        _hazard_key(case)
        for case in CASES
        if case.dtype in (torch.float16, torch.bfloat16)
        and not case.sparse
        and _zero_gradient_gives_nan(case)
    }
    assert found == ZERO_GRADIENT_NAN


def test_every_optimizer_in_the_table_is_covered() -> None:
    if not TABLE:
        pytest.skip(TABLE_PROBLEM or "empty table")
    assert {case.name for case in CASES} == {entry["name"] for entry in TABLE}


_FEATURES: dict[str, Callable[[Case], bool]] = {
    "foreach": lambda case: bool(case.kwargs.get("foreach")),
    "differentiable": lambda case: case.differentiable,
    "fused": lambda case: case.fused,
    "maximize": lambda case: bool(case.kwargs.get("maximize")),
    "weight_decay": lambda case: bool(case.kwargs.get("weight_decay")),
    "tensor lr": lambda case: isinstance(case.kwargs.get("lr"), Tensor),
    "complex parameters": lambda case: case.dtype.is_complex and _skip_reason(case) is None,
    "sparse gradients": lambda case: case.sparse,
    "float16": lambda case: case.dtype == torch.float16,
    "a required closure": lambda case: case.requires_closure,
}


@pytest.mark.parametrize("feature", list(_FEATURES))
def test_the_table_covers(feature: str) -> None:
    """What the cases above cover; a torch whose table lacks a kind of variant says so here."""
    if not any(map(_FEATURES[feature], CASES)):
        pytest.skip(f"torch {torch.__version__}'s optim_db has no CPU variant with {feature}")
