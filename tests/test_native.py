"""The native CPU mask kernel: bit-for-bit the reference path, and a safe fallback."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest
import torch

import dropgrad
from dropgrad import DropGrad, kernels
from dropgrad._random import MASK_DOMAIN, StreamKeys, stream_key, stream_key_table
from dropgrad.kernels import _native

from ._helpers import ALL_DTYPES, key_table, mask_with, pinned_backend, random_tensor
from .test_masking import TENSOR_SETS, TensorFactory, assert_bit_identical

HAS_COMPILER = _native._compiler() is not None
needs_compiler = pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler on this machine")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def native_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Counts the tensors the native kernel masks; fails the test where it cannot build."""
    if not HAS_COMPILER:
        pytest.skip("no C compiler on this machine")
    assert kernels.backend_available("native"), kernels.status()["native"]
    calls: list[int] = []
    call = _native._call

    def counting(lib, values, *args):  # type: ignore[no-untyped-def]
        calls.append(len(values))
        call(lib, values, *args)

    monkeypatch.setattr(_native, "_call", counting)
    yield calls


def keys_of(count: int, step: int = 3) -> torch.Tensor:
    """Key table of tensors ``0 .. count - 1`` (tensor ``i`` is parameter ``i``)."""
    return stream_key_table(77, MASK_DOMAIN, step, list(range(count)))


def one_key(seed: int, step: int, index: int) -> torch.Tensor:
    return key_table([stream_key(seed, MASK_DOMAIN, step, index)])


def mask_three_ways(
    make: TensorFactory, dtype: torch.dtype, rate: float, scale: float, starts_of=None
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Reference, torch-op and native results for the same keys and global offsets.

    The native results are what the dispatcher picks on its own (``auto``): the native
    kernel where it takes the bucket, torch ops otherwise.
    """
    reference, torch_ops, native = make(dtype), make(dtype), make(dtype)
    starts = starts_of(len(reference)) if starts_of else [7 * i for i in range(len(reference))]
    keys = keys_of(len(reference))
    mask_with("reference", reference, starts, keys, rate, scale=scale)
    mask_with("torch", torch_ops, starts, keys, rate, scale=scale)
    mask_with("auto", native, starts, keys, rate, scale=scale)
    return reference, torch_ops, native


@pytest.mark.parametrize("make", TENSOR_SETS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize(("rate", "scale"), [(0.3, 1.0), (0.05, 3.0), (0.9, 0.5), (0.5, -2.0)])
def test_native_is_bit_identical_to_reference_and_torch_ops(
    native_calls: list[int], make: TensorFactory, dtype: torch.dtype, rate: float, scale: float
) -> None:
    reference, torch_ops, native = mask_three_ways(make, dtype, rate, scale)
    for want, other, got in zip(reference, torch_ops, native):
        assert_bit_identical(got, want)
        assert_bit_identical(other, want)
    has_elements = any(t.numel() for t in reference)
    # float32 and float64 go through the native kernel; other dtypes use torch ops.
    assert bool(native_calls) == (has_elements and dtype in (torch.float32, torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_every_size_and_word_offset_matches_the_reference(
    native_calls: list[int], dtype: torch.dtype
) -> None:
    """Sizes 1 to 9 at starts 0 to 3 and past 2**33 (word indices wrap modulo 2**32):
    the lone high-half element first, the pair loop and a lone low-half element last."""
    # 2**32 and 3 * 2**31: word indices with the top bit set, and across the wrap.
    for base in (0, 2**32 - 2, 3 * 2**31, 2**33):

        def make(dtype: torch.dtype) -> list[torch.Tensor]:
            return [random_tensor(n, dtype=dtype, seed=n) for n in range(1, 10) for _ in range(4)]

        def starts_of(count: int, base: int = base) -> list[int]:
            return [base + i % 4 for i in range(count)]

        reference, _, native = mask_three_ways(make, dtype, 0.5, 1.0, starts_of)
        for got, want in zip(native, reference):
            assert_bit_identical(got, want)
    assert native_calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("scale", [1.0, -1.0, 1e-30, float("inf")])
def test_nan_inf_and_signed_zeros_follow_the_reference(
    native_calls: list[int], dtype: torch.dtype, scale: float
) -> None:
    """Dropped NaN and inf become +0 (then times the factor, as in the reference);
    kept ones stay NaN or inf; the factor's rounding to float32 matches torch's."""
    special = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-45, 3.4e38, -1e308]
    values = torch.tensor(special * 64, dtype=torch.float64).to(dtype)
    reference, native = values.clone(), values.clone()
    key = one_key(5, 1, 2)
    mask_with("reference", [reference], [3], key, 0.5, scale=scale)
    mask_with("auto", [native], [3], key, 0.5, scale=scale)
    assert_bit_identical(native, reference)
    assert native_calls


def test_a_large_tensor_and_many_small_ones_in_one_call(native_calls: list[int]) -> None:
    sizes = [3_000_001, *range(1, 400)]
    tensors = [random_tensor(n, seed=n) for n in sizes]
    starts = [(n * 11) % 5 for n in sizes]
    reference = [t.clone() for t in tensors]
    table = keys_of(len(sizes), step=4)
    # The table a step passes holds each parameter's stream key.
    assert table.tolist() == [list(stream_key(77, MASK_DOMAIN, 4, i)) for i in range(len(sizes))]
    mask_with("reference", reference, starts, table, 0.2)
    kernels.mask_(tensors, starts, table, 0.2, "bernoulli")
    for got, want in zip(tensors, reference):
        assert_bit_identical(got, want)
    assert native_calls == [len(sizes)]  # one call for the whole list


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("target", ["gradient", "update"])
def test_training_is_bit_identical_with_and_without_the_native_kernel(
    native_calls: list[int], dtype: torch.dtype, target: str
) -> None:
    def train() -> list[torch.Tensor]:
        torch.manual_seed(0)
        net = torch.nn.Sequential(
            torch.nn.Linear(13, 64), torch.nn.Tanh(), torch.nn.Linear(64, 3)
        ).to(dtype)
        opt = DropGrad(
            torch.optim.Adam(net.parameters(), lr=1e-2), drop_rate=0.3, seed=11, target=target
        )
        data = torch.randn(32, 13, dtype=dtype)
        for _ in range(5):
            opt.zero_grad()
            net(data).square().mean().backward()
            opt.step()
        return [p.detach().clone() for p in net.parameters()]

    native = train()
    assert native_calls
    calls = len(native_calls)
    with pinned_backend("torch"):
        torch_ops = train()
    assert len(native_calls) == calls
    for got, want in zip(native, torch_ops):
        assert_bit_identical(got, want)


# ------------------------------------------------------------ building and falling back


def run_fresh(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a new interpreter (the kernel is built once per process)."""
    full_env = {**os.environ, **env}
    full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-W", "always", "-c", code],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=300,
    )


MASK_AND_REPORT = """
import torch
from dropgrad import DropGrad, kernels
from dropgrad.kernels import _native
p = torch.nn.Parameter(torch.ones(1000))
opt = DropGrad(torch.optim.SGD([p], lr=1.0), drop_rate=0.5, seed=3)
p.grad = torch.ones(1000)
opt.step()
print("STATUS", _native.status())
print("BACKEND", kernels.status()["native"])
print("SUM", float(p.detach().sum()))
"""


def report(result: subprocess.CompletedProcess[str]) -> tuple[str, float]:
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)
    # The dispatcher reports the backend "on", or off with the kernel's own reason.
    status = lines["STATUS"]
    assert lines["BACKEND"] == ("on" if status.startswith("on: ") else status)
    return status, float(lines["SUM"])


@needs_compiler
def test_built_once_into_the_cache_and_reused(tmp_path: Path) -> None:
    env = {"DROPGRAD_CACHE_DIR": str(tmp_path / "cache")}
    status, total = report(run_fresh(MASK_AND_REPORT, env))
    assert status.startswith("on: built by")
    assert total == expected_sum_of_mask_and_report()
    built = sorted((tmp_path / "cache").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"  # no partial files left behind
    stamp = built[0].stat().st_mtime_ns
    status_again, total_again = report(run_fresh(MASK_AND_REPORT, env))
    assert status_again == status and total_again == total
    assert sorted((tmp_path / "cache").iterdir()) == built
    assert built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt
    # The torch-op path in a process that never builds gives the same step.
    off_status, off_total = report(run_fresh(MASK_AND_REPORT, {**env, "DROPGRAD_NATIVE": "0"}))
    assert off_status == "off: DROPGRAD_NATIVE=0"
    assert off_total == total


def test_no_compiler_falls_back_silently(tmp_path: Path) -> None:
    result = run_fresh(
        MASK_AND_REPORT,
        {"CC": str(tmp_path / "no-such-compiler"), "DROPGRAD_CACHE_DIR": str(tmp_path)},
    )
    status, _ = report(result)
    assert status == "off: no C compiler found ($CC, cc, gcc or clang)"
    assert "RuntimeWarning" not in result.stderr
    assert not list(tmp_path.iterdir())


def test_a_failing_compiler_warns_once_and_falls_back(tmp_path: Path) -> None:
    failing = shutil.which("false")
    if failing is None:
        pytest.skip("no `false` program to stand in for a broken compiler")
    code = MASK_AND_REPORT + "\nopt.step()\nprint('AGAIN', _native.status())\n"
    result = run_fresh(code, {"CC": failing, "DROPGRAD_CACHE_DIR": str(tmp_path)})
    status, total = report(result)
    assert status.startswith("off: RuntimeError: building the native mask kernel failed")
    assert result.stderr.count("RuntimeWarning: dropgrad's native CPU mask kernel is not used") == 1
    assert not list(tmp_path.iterdir())  # the partial output was removed
    assert total == expected_sum_of_mask_and_report()


def expected_sum_of_mask_and_report() -> float:
    """What MASK_AND_REPORT's step leaves, by the reference path in this process."""
    grad = torch.ones(1000)
    mask_with("reference", [grad], [0], one_key(3, 0, 0), 0.5)
    return float((torch.ones(1000) - grad).sum())


def test_a_library_failing_its_check_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    if not HAS_COMPILER:
        pytest.skip("no C compiler on this machine")
    monkeypatch.setattr(_native, "_tried", False)
    monkeypatch.setattr(_native, "_library", None)
    monkeypatch.setattr(_native, "_status", "not built yet")
    monkeypatch.setattr(_native, "_self_check", lambda lib: "float32 at rate 0.3 differs")
    with pytest.warns(RuntimeWarning, match=r"not used \(float32 at rate 0.3 differs\)"):
        assert not kernels.backend_available("native")
    assert _native.status() == "off: float32 at rate 0.3 differs"
    assert kernels.status()["native"] == "off: float32 at rate 0.3 differs"
    grad = random_tensor(64)
    expected = grad.clone()
    key = one_key(2, 0, 0)
    mask_with("reference", [expected], [0], key, 0.5)
    mask_with("auto", [grad], [0], key, 0.5)
    assert_bit_identical(grad, expected)


def test_pinning_the_torch_op_backend_keeps_the_native_kernel_out(
    native_calls: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``DROPGRAD_BACKEND=torch`` masks with torch ops, the same bits, through a whole step."""
    tensors = [random_tensor(1000), random_tensor(30, 7, seed=1).t(), random_tensor(5).double()]
    keys = keys_of(len(tensors))
    for dtype_group in ([0, 1], [2]):  # one dtype per bucket
        chosen = [tensors[i] for i in dtype_group]
        reference = [t.clone() for t in chosen]
        mask_with("reference", reference, dtype_group, keys[dtype_group], 0.4)
        mask_with("torch", chosen, dtype_group, keys[dtype_group], 0.4)
        for got, want in zip(chosen, reference):
            assert_bit_identical(got, want)
    assert not native_calls
    monkeypatch.setenv("DROPGRAD_BACKEND", "torch")
    p = torch.nn.Parameter(torch.ones(1000))
    p.grad = torch.ones(1000)
    DropGrad(torch.optim.SGD([p], lr=1.0), drop_rate=0.5, seed=3).step()
    assert not native_calls
    assert float(p.detach().sum()) == expected_sum_of_mask_and_report()
    # The same step with the native kernel, chosen by default.
    monkeypatch.delenv("DROPGRAD_BACKEND")
    q = torch.nn.Parameter(torch.ones(1000))
    q.grad = torch.ones(1000)
    DropGrad(torch.optim.SGD([q], lr=1.0), drop_rate=0.5, seed=3).step()
    assert native_calls == [1]
    assert_bit_identical(q.detach(), p.detach())


@pytest.mark.parametrize("value", ["fastest", "cuda", "native2"])
def test_an_unknown_backend_name_is_refused(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("DROPGRAD_BACKEND", value)
    with pytest.raises(ValueError) as raised:
        kernels.mask_([torch.ones(8)], [0], one_key(1, 0, 0), 0.5, "bernoulli")
    message = str(raised.value)
    assert "DROPGRAD_BACKEND" in message and repr(value) in message
    for name in ("auto", *kernels.BACKEND_NAMES):
        assert name in message
    # A step refuses it too, rather than silently choosing a backend.
    p = torch.nn.Parameter(torch.ones(8))
    p.grad = torch.ones(8)
    with pytest.raises(ValueError, match="DROPGRAD_BACKEND"):
        DropGrad(torch.optim.SGD([p], lr=1.0), drop_rate=0.5, seed=3).step()


@pytest.mark.parametrize("value", ["auto", "AUTO", " torch ", "Reference", ""])
def test_backend_names_are_read_without_case_or_spaces(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    expected = torch.ones(64)
    mask_with("reference", [expected], [0], one_key(1, 0, 0), 0.5)
    monkeypatch.setenv("DROPGRAD_BACKEND", value)
    got = torch.ones(64)
    kernels.mask_([got], [0], one_key(1, 0, 0), 0.5, "bernoulli")
    assert_bit_identical(got, expected)


def test_pinning_an_unavailable_backend_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_native, "_tried", True)
    monkeypatch.setattr(_native, "_library", None)
    monkeypatch.setattr(_native, "_status", "off: no C compiler found ($CC, cc, gcc or clang)")
    assert not kernels.backend_available("native")
    monkeypatch.setenv("DROPGRAD_BACKEND", "native")
    values = torch.ones(8)
    with pytest.raises(RuntimeError, match=r"DROPGRAD_BACKEND=native .*no C compiler found"):
        kernels.mask_([values], [0], one_key(1, 0, 0), 0.5, "bernoulli")
    assert torch.equal(values, torch.ones(8))  # nothing was masked
    # Without the pin, the torch-op backend stands in for it.
    monkeypatch.delenv("DROPGRAD_BACKEND")
    expected = torch.ones(8)
    mask_with("reference", [expected], [0], one_key(1, 0, 0), 0.5)
    kernels.mask_([values], [0], one_key(1, 0, 0), 0.5, "bernoulli")
    assert_bit_identical(values, expected)


@needs_compiler
def test_a_pinned_native_backend_leaves_what_it_cannot_mask_to_torch_ops(
    native_calls: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pinned, the native kernel masks what it takes; other dtypes and Gaussian noise
    still get their masks, from torch ops."""
    monkeypatch.setenv("DROPGRAD_BACKEND", "native")
    for dtype, distribution in (
        (torch.float32, "bernoulli"),
        (torch.float16, "bernoulli"),
        (torch.float32, "gaussian"),
    ):
        got, expected = random_tensor(300, dtype=dtype), random_tensor(300, dtype=dtype)
        mask_with("reference", [expected], [5], one_key(1, 0, 0), 0.3, distribution)
        kernels.mask_([got], [5], one_key(1, 0, 0), 0.3, distribution)
        assert_bit_identical(got, expected)
    assert native_calls == [1]


def test_the_source_is_package_data() -> None:
    """The wheel must carry the C file (CI also builds the kernel from an installed wheel)."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from 3.11")

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "kernels/_native_masks.c" in config["tool"]["setuptools"]["package-data"]["dropgrad"]
    assert _native._SOURCE == Path(dropgrad.__file__).parent / "kernels" / "_native_masks.c"
    assert _native._SOURCE.is_file()
    assert "dropgrad_bernoulli" in _native._SOURCE.read_text()


def test_a_masked_tensor_saved_for_backward_fails_the_backward_pass(
    native_calls: list[int],
) -> None:
    """Like an in-place torch op, the native kernel bumps the version counter."""
    for use_native in (True, False):
        x = torch.randn(64, requires_grad=True)
        y = x * 2
        z = (y * y).sum()  # saves y for the backward pass
        with torch.no_grad():
            mask_with("auto" if use_native else "torch", [y], [0], one_key(1, 0, 0), 0.5)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            z.backward()
    assert native_calls == [1]


def test_tensors_that_require_grad_are_left_to_torch_ops(native_calls: list[int]) -> None:
    leaf = torch.randn(64, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        mask_with("auto", [leaf], [0], one_key(1, 0, 0), 0.5)
    assert not native_calls
    # Pinned, too: the guard sends it to torch ops and their checks.
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        mask_with("native", [leaf], [0], one_key(1, 0, 0), 0.5)
    assert not native_calls
    with torch.no_grad():  # where torch allows the change, the native kernel makes it
        mask_with("auto", [leaf], [0], one_key(1, 0, 0), 0.5)
    assert native_calls == [1]


def test_mixed_dtypes_are_left_to_torch_ops(native_calls: list[int]) -> None:
    tensors = [random_tensor(9), random_tensor(5, dtype=torch.float16), random_tensor(7).double()]
    reference = [t.clone() for t in tensors]
    mask_with("reference", reference, [0, 1, 2], keys_of(3), 0.5)
    mask_with("auto", tensors, [0, 1, 2], keys_of(3), 0.5)
    for got, want in zip(tensors, reference):
        assert_bit_identical(got, want)
    assert not native_calls


def test_a_key_table_that_does_not_fit_is_refused(native_calls: list[int]) -> None:
    tensors = [random_tensor(4), random_tensor(4)]
    with pytest.raises(ValueError, match=r"2 tensors need 2 starts and an int64 key table"):
        _native.bernoulli_(tensors, [0, 0], torch.zeros(1, 2, dtype=torch.int64), 100, 1.0)
    with pytest.raises(ValueError, match=r"got 2 starts and torch.int32 keys of shape \(2, 2\)"):
        _native.bernoulli_(tensors, [0, 0], torch.zeros(2, 2, dtype=torch.int32), 100, 1.0)
    with pytest.raises(ValueError, match="every tensor must be contiguous"):
        _native.bernoulli_(
            [torch.ones(4, 2).t()], [0], torch.zeros(1, 2, dtype=torch.int64), 100, 1.0
        )
    assert not native_calls


def test_non_contiguous_tensors_go_through_copies(native_calls: list[int]) -> None:
    base = random_tensor(30, 40)
    view = base[2:27:2, 1::3].t()  # strided, transposed, offset into its storage
    assert not view.is_contiguous()
    untouched = base.clone()
    expected = view.clone()
    key = one_key(4, 2, 0)
    mask_with("reference", [expected], [3], key, 0.4)
    mask_with("auto", [view], [3], key, 0.4)
    assert_bit_identical(view, expected)
    outside = torch.ones_like(base, dtype=torch.bool)
    outside[2:27:2, 1::3] = False
    assert torch.equal(base[outside], untouched[outside])
    assert native_calls == [1]


def test_cc_may_carry_arguments(tmp_path: Path) -> None:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("no gcc on this machine")
    env = {"CC": "gcc -m64", "DROPGRAD_CACHE_DIR": str(tmp_path)}
    status, total = report(run_fresh(MASK_AND_REPORT, env))
    assert status.startswith(f"on: built by {gcc} -m64, ")
    assert total == expected_sum_of_mask_and_report()


def test_a_default_cache_others_can_write_to_is_not_used(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Whoever can write into the cache can put code into this process: a default
    directory that is group- or world-writable is passed over for a private one."""
    monkeypatch.delenv("DROPGRAD_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    shared = tmp_path / "xdg" / "dropgrad"
    shared.mkdir(parents=True)
    shared.chmod(0o777)
    chosen = _native._build_dir()
    assert chosen == tmp_path / "tmp" / f"dropgrad-{os.getuid()}"
    assert chosen.stat().st_mode & 0o777 == 0o700
    # The private fallback taken over by others too: a fresh directory for this process.
    chosen.chmod(0o777)
    fresh = _native._build_dir()
    assert fresh.parent == tmp_path / "tmp" and fresh.name.startswith("dropgrad-")
    assert fresh != chosen and fresh.stat().st_mode & 0o777 == 0o700
    # A private default is used.
    shared.chmod(0o700)
    assert _native._build_dir() == shared


def test_a_named_cache_directory_is_trusted(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    named = tmp_path / "team-cache"
    named.mkdir()
    named.chmod(0o775)
    monkeypatch.setenv("DROPGRAD_CACHE_DIR", str(named))
    assert _native._build_dir() == named


@needs_compiler
def test_an_unwritable_cache_directory_falls_back_to_a_temporary_one(tmp_path: Path) -> None:
    blocked = tmp_path / "file-not-directory"
    blocked.write_text("")
    env = {"DROPGRAD_CACHE_DIR": str(blocked / "cache"), "TMPDIR": str(tmp_path / "tmp")}
    (tmp_path / "tmp").mkdir()
    status, total = report(run_fresh(MASK_AND_REPORT, env))
    assert status.startswith("on: built by")
    assert total == expected_sum_of_mask_and_report()
    (built,) = (tmp_path / "tmp").glob("dropgrad-*/dropgrad_masks_*.so")
    assert built.is_file()


@needs_compiler
def test_processes_building_at_once_each_load_a_whole_library(tmp_path: Path) -> None:
    """Ranks that start together all build into one cache: each writes its own temporary
    file and renames it, so none loads a half-written library."""
    env = {**os.environ, "DROPGRAD_CACHE_DIR": str(tmp_path)}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", MASK_AND_REPORT],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(3)
    ]
    expected = expected_sum_of_mask_and_report()
    for process in processes:
        stdout, stderr = process.communicate(timeout=300)
        result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
        status, total = report(result)
        assert status.startswith("on: built by")
        assert total == expected
    (built,) = tmp_path.iterdir()
    assert built.name.startswith("dropgrad_masks_") and built.suffix == ".so"


def test_any_error_while_building_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not only compiler errors: a lookup failing in an odd container, say."""
    if not HAS_COMPILER:
        pytest.skip("no C compiler on this machine")

    def broken(compiler: list[str]) -> NoReturn:
        raise KeyError("getpwuid(): uid not found: 1234")

    monkeypatch.setattr(_native, "_tried", False)
    monkeypatch.setattr(_native, "_library", None)
    monkeypatch.setattr(_native, "_status", "not built yet")
    monkeypatch.setattr(_native, "_build", broken)
    with pytest.warns(RuntimeWarning, match=r"not used \(KeyError: 'getpwuid\(\)"):
        assert not kernels.backend_available("native")
    assert _native.status().startswith("off: KeyError")
    p = torch.nn.Parameter(torch.ones(100))
    p.grad = torch.ones(100)
    DropGrad(torch.optim.SGD([p], lr=1.0), drop_rate=0.5, seed=3).step()
    assert 0 < int((p.detach() == 1).sum()) < 100


@needs_compiler
@pytest.mark.parametrize("parts", [1, 2, 3, 5, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_bucket_masked_in_parts_matches_the_reference(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, parts: int
) -> None:
    """The kernel cuts a bucket into runs of nearly equal length, cutting tensors
    (odd offsets included) and skipping empty ones; 40 runs of 31 elements leave
    some runs empty."""
    monkeypatch.setattr(_native, "_threads_for", lambda total: parts)
    generator = torch.Generator().manual_seed(parts)
    tensors = [torch.randn(n, dtype=dtype, generator=generator) for n in (0, 9, 1, 16, 0, 5)]
    starts = [3, 2**40 + 1, 0, 7, 0, 2**33]
    keys = keys_of(len(tensors))
    expected = [t.clone() for t in tensors]
    kernels._reference.bernoulli_(expected, starts, keys, 20_000, 1.25)
    _native.bernoulli_(tensors, starts, keys, 20_000, 1.25)
    for got, want in zip(tensors, expected):
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))


def test_thread_count_follows_torch_and_the_bucket_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    least = _native.PARALLEL_MIN_ELEMENTS
    assert [_native._threads_for(n) for n in (0, least - 1, 2 * least, 10 * least)] == [1, 1, 2, 4]


def torch_libgomp() -> Path | None:
    """torch's own libgomp, where it carries the name gcc's programs ask for (some
    wheels rename theirs, libgomp-<hash>.so.1, and the loader cannot reuse it then)."""
    found = Path(torch.__file__).parent / "lib" / "libgomp.so.1"
    return found if found.exists() else None


def mapped_file(address: int) -> str | None:
    """The file mapped at ``address`` in this process, from /proc/self/maps."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        low, high = (int(bound, 16) for bound in fields[0].split("-"))
        if low <= address < high:
            return fields[5] if len(fields) > 5 else None
    return None


@needs_compiler
def test_the_parallel_kernel_runs_on_torchs_own_openmp_runtime() -> None:
    """Built with -fopenmp, the library names libgomp.so.1; the loader binds it to the
    copy torch already loaded, so its parts run on torch's threads, not a second pool.
    (Other libraries may bring other copies, scikit-learn for one.)"""
    lib = _native.library()
    assert lib is not None
    bundled = torch_libgomp()
    if not lib.dropgrad_native_openmp() or bundled is None or not Path("/proc/self/maps").exists():
        pytest.skip("no OpenMP build here, or no libgomp.so.1 of torch's own to share")
    # Looked up through the library's handle: the definition its calls are bound to.
    entry = ctypes.cast(lib.GOMP_parallel, ctypes.c_void_p).value
    assert entry is not None
    used = mapped_file(entry)
    assert used is not None and Path(used).resolve() == bundled.resolve()


def compiler_wrapper(path: Path, on_openmp: str) -> Path:
    """A compiler that logs each compilation to ``path.log`` and, given ``-fopenmp``,
    runs the shell code ``on_openmp`` (the arguments are in ``$@``)."""
    compiler = _native._compiler()
    assert compiler is not None
    path.write_text(
        f"""#!/bin/sh
case " $* " in *" -o "*) echo "$*" >> {path}.log ;; esac
for word in "$@"; do
    if [ "$word" = -fopenmp ]; then {on_openmp}; fi
done
exec {" ".join(compiler)} "$@"
"""
    )
    path.chmod(0o755)
    return path


def compilations(wrapper: Path) -> list[str]:
    log = Path(f"{wrapper}.log")
    return log.read_text().splitlines() if log.exists() else []


@needs_compiler
def test_a_compiler_without_openmp_builds_a_one_thread_kernel_once(tmp_path: Path) -> None:
    refusing = "echo \"unsupported option '-fopenmp'\" >&2; exit 1"
    wrapper = compiler_wrapper(tmp_path / "cc-without-openmp", refusing)
    env = {"CC": str(wrapper), "DROPGRAD_CACHE_DIR": str(tmp_path / "cache")}
    for _ in range(2):  # the second process loads the library the first one built
        status, total = report(run_fresh(MASK_AND_REPORT, env))
        assert status == f"on: built by {wrapper}, one thread (built without OpenMP)"
        assert total == expected_sum_of_mask_and_report()
        built = compilations(wrapper)
        assert ["-fopenmp" in line for line in built] == [True, False], built


@needs_compiler
def test_an_openmp_build_that_does_not_load_gives_way_to_one_without(tmp_path: Path) -> None:
    """As with a runtime library that sits only in the compiler's own directory."""
    (tmp_path / "hidden").mkdir()
    stub = tmp_path / "stub.c"
    stub.write_text("int dropgrad_test_stub(void) { return 0; }\n")
    compiler = _native._compiler()
    assert compiler is not None
    subprocess.run(
        [*compiler, "-shared", "-fPIC", "-o", str(tmp_path / "hidden" / "libhidden.so"), str(stub)],
        check=True,
    )
    linking = f'exec {" ".join(compiler)} "$@" -L{tmp_path / "hidden"} -Wl,--no-as-needed -lhidden'
    wrapper = compiler_wrapper(tmp_path / "cc-hidden-runtime", linking)
    env = {"CC": str(wrapper), "DROPGRAD_CACHE_DIR": str(tmp_path / "cache")}
    status, total = report(run_fresh(MASK_AND_REPORT, env))
    assert status == f"on: built by {wrapper}, one thread (built without OpenMP)"
    assert total == expected_sum_of_mask_and_report()
    assert ["-fopenmp" in line for line in compilations(wrapper)] == [True, False]


THREADS_STARTED = """
import os, torch
torch.set_num_threads(2)
from dropgrad.kernels import _native, mask_
from dropgrad._random import MASK_DOMAIN, StreamKeys
def tasks():
    return len(os.listdir("/proc/self/task"))
keys = StreamKeys(5, MASK_DOMAIN, 2, [0])
small, large = torch.randn(100_000), torch.randn(3_000_000)
before = tasks()
print("OPENMP", _native.library().dropgrad_native_openmp())
built = tasks()
mask_([small], [0], keys, 0.1, "bernoulli")
after_small = tasks()
mask_([large], [0], keys, 0.1, "bernoulli")
print("TASKS", before, built, after_small, tasks())
"""


@needs_compiler
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="no /proc/self/task here")
def test_only_a_large_bucket_starts_threads(tmp_path: Path) -> None:
    """Building and checking the kernel, or masking a small bucket, starts no thread
    (a process forked after OpenMP threads started must use one thread); a large
    bucket is masked on a team of two."""
    result = run_fresh(THREADS_STARTED, {"DROPGRAD_BACKEND": "native", "OMP_NUM_THREADS": "2"})
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    if lines["OPENMP"] != "1":
        pytest.skip("the kernel was built without OpenMP here")
    before, built, after_small, after_large = map(int, lines["TASKS"].split())
    assert before == built == after_small
    assert after_large == before + 1  # the calling thread and one OpenMP thread


FORKED_CHILD = """
import os, torch
from dropgrad.kernels import _native, mask_
from dropgrad._random import MASK_DOMAIN, StreamKeys
keys = StreamKeys(5, MASK_DOMAIN, 2, [0])
mask_([torch.randn(3_000_000)], [0], keys, 0.1, "bernoulli")  # the parallel kernel, here
pid = os.fork()
if pid == 0:
    torch.set_num_threads(1)  # as torch's DataLoader does in its worker processes
    grad = torch.randn(3_000_000, generator=torch.Generator().manual_seed(1))
    want = grad.clone()
    mask_([grad], [0], keys, 0.1, "bernoulli")
    os.environ["DROPGRAD_BACKEND"] = "reference"
    mask_([want], [0], keys, 0.1, "bernoulli")
    os._exit(0 if torch.equal(grad, want) else 3)
print("CHILD", os.waitpid(pid, 0)[1])
"""


@needs_compiler
@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_forked_child_with_one_torch_thread_masks_after_the_parent_ran_in_parallel() -> None:
    """Like torch's own OpenMP ops, a forked child must use one thread: GNU libgomp's
    threads are not in the child (torch's ops hang there too with more). That the
    parent's mask ran on several threads is tested above."""
    result = run_fresh(FORKED_CHILD, {"DROPGRAD_BACKEND": "native", "OMP_NUM_THREADS": "2"})
    assert result.returncode == 0, result.stderr
    assert "CHILD 0" in result.stdout


KEYED_CASES = [
    # (seed, step, positions): small, and every value near 2**64 or 2**63
    (77, 3, [0, 1, 2, 3]),
    (2**64 - 1, 2**64 - 1, [2**64 - 1, 2**63, 2**63 - 1, 0]),
    (2**63 + 5, 2**40 + 3, [7, 2**32, 2**32 - 1, 123_456_789]),
]


@needs_compiler
@pytest.mark.parametrize("parts", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("seed", "step", "positions"), KEYED_CASES)
def test_keys_derived_in_the_kernel_are_the_tabulated_ones(
    monkeypatch: pytest.MonkeyPatch,
    seed: int,
    step: int,
    positions: list[int],
    dtype: torch.dtype,
    parts: int,
) -> None:
    monkeypatch.setattr(_native, "_threads_for", lambda total: parts)
    described = StreamKeys(seed, MASK_DOMAIN, step, positions)
    generator = torch.Generator().manual_seed(step % 1000)
    tensors = [torch.randn(n, dtype=dtype, generator=generator) for n in (33, 0, 8, 1001)]
    starts = [0, 5, 2**40 + 1, 3]
    expected = [t.clone() for t in tensors]
    kernels._reference.bernoulli_(expected, starts, described.table(), 20_000, 1.25)
    _native.bernoulli_keyed_(tensors, starts, described, 20_000, 1.25)
    for got, want in zip(tensors, expected):
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))


@needs_compiler
def test_a_step_on_the_native_kernel_builds_no_key_table(
    monkeypatch: pytest.MonkeyPatch, native_calls: list[int]
) -> None:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n)) for n in (10, 3000, 7)]
    for param in params:
        param.grad = torch.randn_like(param)
    want = [param.grad.clone() for param in params]
    kernels._reference.bernoulli_(
        want,
        [0, 0, 0],
        StreamKeys(9, MASK_DOMAIN, 0, [0, 1, 2]).table(),
        *kernels._reference.quantize_rate(0.3),
    )

    def no_table(self: StreamKeys) -> torch.Tensor:
        raise AssertionError("a key table was built")

    monkeypatch.setattr(StreamKeys, "table", no_table)
    with pinned_backend("native"):
        DropGrad(torch.optim.SGD(params, lr=0.0), drop_rate=0.3, seed=9).step()
    assert native_calls == [3]
    for param, grad in zip(params, want):
        assert torch.equal(param.grad, grad)


def test_described_keys_that_do_not_fit_are_refused(native_calls: list[int]) -> None:
    tensors = [random_tensor(4), random_tensor(4)]
    with pytest.raises(
        ValueError, match=r"2 tensors need 2 starts and 2 positions, got 2 starts and 1 positions"
    ):
        _native.bernoulli_keyed_(tensors, [0, 0], StreamKeys(1, MASK_DOMAIN, 0, [0]), 100, 1.0)
    with pytest.raises(ValueError, match="every tensor must be contiguous"):
        _native.bernoulli_keyed_(
            [torch.ones(4, 2).t()], [0], StreamKeys(1, MASK_DOMAIN, 0, [0]), 100, 1.0
        )
    assert not native_calls
