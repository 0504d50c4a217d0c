"""The native CPU mask kernel: built on first use, checked, and optional.

``_native_masks.c`` masks a list of contiguous float32 or float64 tensors in
one pass each (hash, compare, clear, scale), where the torch-op path needs a
dozen passes over int32 buffers and, for small tensors, two packing copies.
The result is bit-for-bit the same; only the time differs.

The source ships with the package and is compiled the first time a step needs
it, with the C compiler named by ``$CC`` or found on ``PATH`` (``cc``,
``gcc``, ``clang``), ``-O3 -march=native`` and ``-fopenmp`` (each left out
where the compiler refuses it, or, for ``-fopenmp``, where the library then
does not load). A bucket of at least ``2 * PARALLEL_MIN_ELEMENTS`` elements is
cut into runs masked on OpenMP threads; built by gcc, these are torch's own
(the loader hands the library the ``libgomp.so.1`` torch has already loaded).
The library is cached under
``$DROPGRAD_CACHE_DIR`` (default ``$XDG_CACHE_HOME/dropgrad``, else
``~/.cache/dropgrad``; see :func:`_build_dir` for the fallbacks and why a
default directory must be writable by this user alone), named by a hash of the
source, the compiler, the flag sets and the CPU, so a cache shared between
different machines never hands one a library built for another; it is written
to a temporary name and renamed, so processes building at once (one per rank)
do not see each other's half-written files. Before first use the library masks
tensors that the plain reference path masks too, and is used only if every
bit agrees.

The dispatcher (``_dispatch.py``) makes non-contiguous tensors contiguous
and writes them back, and bumps each tensor's version counter as an in-place
torch op would, so autograd notices a masked tensor that a backward pass still
needs; tensors that require grad under grad mode, and inference tensors outside
inference mode, are left to the torch-op backend and its own checks.

Everything falls back to the torch-op backend, silently when there is no
compiler, with one warning when building or the check fails. Setting
``DROPGRAD_NATIVE=0`` keeps the kernel from being built at all; :func:`status`
builds it and says whether it is in use.
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import operator
import os
import platform
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import warnings
from array import array
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from .._random import MASK_DOMAIN, StreamKeys
from . import _reference
from ._reference import quantize_rate

_DTYPE_OF = operator.attrgetter("dtype")
_IS_CPU = operator.attrgetter("is_cpu")

__all__ = [
    "DTYPES",
    "accepts",
    "bernoulli_",
    "bernoulli_keyed_",
    "library",
    "status",
    "unavailable",
]

_SOURCE = Path(__file__).with_name("_native_masks.c")
_ABI = 4
# The dtypes the kernel masks, with their codes in the C source.
DTYPES = {torch.float32: 0, torch.float64: 1}
_FLAGS = ["-O3", "-std=c99", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math"]
# Tried in order: the first the compiler accepts tunes for this CPU, and runs a large
# bucket's parts on OpenMP threads (with -fopenmp; without, one after another).
_ARCH_FLAGS: tuple[list[str], ...] = (["-march=native"], ["-mcpu=native"], [])
_PARALLEL_FLAGS: tuple[list[str], ...] = (["-fopenmp"], [])
_FLAG_SETS = list(itertools.product(_ARCH_FLAGS, _PARALLEL_FLAGS))

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_tried = False
_status = "not built yet"


def _compiler() -> list[str] | None:
    """The compiler command: ``$CC`` split like a shell would (``ccache gcc`` or
    ``gcc -m64`` included), else the first of ``cc``, ``gcc``, ``clang`` on ``PATH``."""
    named = os.environ.get("CC", "").strip()
    if named:
        try:
            words = shlex.split(named)
        except ValueError:
            return None
        found = shutil.which(words[0]) if words else None
        return [found, *words[1:]] if found else None
    for candidate in ("cc", "gcc", "clang"):
        found = shutil.which(candidate)
        if found:
            return [found]
    return None


def _cpu_identity() -> str:
    """What ``-march=native`` depends on: the CPU model and its feature flags."""
    lines: list[str] = []
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                name = line.split(":", 1)[0].strip()
                if name in ("model name", "flags", "Features", "CPU part") and line not in lines:
                    lines.append(line)
                if not line.strip() and lines:
                    break  # the first processor's block is enough
    except OSError:
        pass
    if sys.platform == "darwin":
        lines.append(_output(["sysctl", "-n", "machdep.cpu.brand_string", "machdep.cpu.features"]))
    return platform.machine() + platform.processor() + "".join(lines)


def _output(command: list[str]) -> str:
    """What ``command`` prints, or an empty string when it cannot run."""
    try:
        return subprocess.run(
            command, capture_output=True, text=True, errors="replace", timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _make_dir(directory: Path) -> bool:
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError:
        return False
    return directory.is_dir() and os.access(directory, os.W_OK)


def _private(directory: Path) -> bool:
    """Whether only this user can write into ``directory``: a library found there was
    built by this user, not planted by someone else."""
    info = directory.stat()
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        return False
    return not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _build_dir() -> Path:
    """Where the library is built and looked for.

    ``$DROPGRAD_CACHE_DIR`` when set (the user vouches for it: whoever can write
    there can put code into this process); else ``$XDG_CACHE_HOME/dropgrad`` or
    ``~/.cache/dropgrad``, then ``<tmp>/dropgrad-<uid>``, each only when this user
    alone can write to it; else a fresh private temporary directory, which caches
    nothing beyond this process.
    """
    named = os.environ.get("DROPGRAD_CACHE_DIR")
    if named and _make_dir(Path(named)):
        return Path(named)
    if not named:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        default = Path(base) / "dropgrad"
        if _make_dir(default) and _private(default):
            return default
    user = os.getuid() if hasattr(os, "getuid") else "user"
    shared_tmp = Path(tempfile.gettempdir()) / f"dropgrad-{user}"
    if _make_dir(shared_tmp) and _private(shared_tmp):
        return shared_tmp
    return Path(tempfile.mkdtemp(prefix="dropgrad-"))


def _build(compiler: list[str]) -> ctypes.CDLL:
    """Compile the source, or find it already compiled, and load it.

    The flag sets are tried in order, and the first that the compiler accepts and
    whose library loads is taken: a ``-fopenmp`` build whose runtime library the
    loader cannot find is passed over for the next. One cache name covers the
    whole list of flag sets (with the source, the compiler and its version and the
    CPU), so later processes load what the first one built without trying the
    flag sets it found wanting again.

    Raises:
        RuntimeError: no flag set gave a library that loads (the compiler's or the
            loader's messages included).
    """
    source = _SOURCE.read_bytes()
    version = _output([*compiler, "--version"])
    candidates = [_FLAGS + arch + parallel for arch, parallel in _FLAG_SETS]
    identity = [source, " ".join(compiler).encode(), version.encode(), repr(candidates).encode()]
    identity.append(_cpu_identity().encode())
    digest = hashlib.sha256(b"\0".join(identity)).hexdigest()[:20]
    directory = _build_dir()
    target = directory / f"dropgrad_masks_{digest}.so"
    if target.exists():
        return _load(target)
    errors = []
    for (arch, parallel), flags in zip(_FLAG_SETS, candidates):
        named = " ".join(arch + parallel) or "(no flags)"
        handle, partial = tempfile.mkstemp(dir=directory, prefix=".build-", suffix=".so")
        os.close(handle)
        try:
            result = subprocess.run(
                [*compiler, *flags, "-o", partial, str(_SOURCE)],
                capture_output=True,
                text=True,
                errors="replace",
                timeout=300,
            )
            if result.returncode != 0:
                errors.append(f"{named}: {result.stderr.strip()}")
                continue
            try:
                lib = _load(Path(partial))
            except (OSError, RuntimeError) as error:
                errors.append(f"{named}: built, but it does not load: {error}")
                continue
            try:
                os.replace(partial, target)  # atomic: others see all of it or nothing
            except OSError:
                if not target.exists():  # not a library another process just put there
                    raise
            return lib
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
    raise RuntimeError("building the native mask kernel failed:\n" + "\n".join(errors))


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.dropgrad_native_abi.restype = ctypes.c_int
    lib.dropgrad_native_abi.argtypes = []
    if lib.dropgrad_native_abi() != _ABI:
        raise RuntimeError(f"{path} has ABI {lib.dropgrad_native_abi()}, expected {_ABI}")
    lib.dropgrad_bernoulli.restype = ctypes.c_int
    lib.dropgrad_bernoulli.argtypes = [
        ctypes.c_int32,  # dtype code
        ctypes.c_int64,  # number of tensors
        ctypes.c_void_p,  # uint64 data pointers
        ctypes.c_void_p,  # int64 sizes
        ctypes.c_void_p,  # int64 first global indices
        ctypes.c_void_p,  # int64 keys, (a, b) per tensor
        ctypes.c_uint32,  # threshold
        ctypes.c_double,  # factor
        ctypes.c_int32,  # runs to cut the elements into
        ctypes.c_int32,  # threads to mask the runs on, at most
    ]
    lib.dropgrad_bernoulli_keyed.restype = ctypes.c_int
    lib.dropgrad_bernoulli_keyed.argtypes = [
        *lib.dropgrad_bernoulli.argtypes[:5],
        ctypes.c_void_p,  # uint64 positions
        ctypes.c_uint64,  # step key
        *lib.dropgrad_bernoulli.argtypes[6:],
    ]
    lib.dropgrad_native_openmp.restype = ctypes.c_int
    lib.dropgrad_native_openmp.argtypes = []
    return lib


def _self_check(lib: ctypes.CDLL) -> str | None:
    """Mask tensors natively and by the reference path; None when every bit agrees.

    Each call passes several tensors (so the per-tensor addresses, sizes, starts
    and keys are read right), with odd sizes, starts past ``2**32`` (word indices
    with the top bit set, and wrapping), special values, and negative factors,
    and cuts them into 7 runs, some of which cut a tensor at an odd offset; the
    keys are read from a table, and derived in the kernel from a seed, step and
    positions near ``2**64``.
    """
    generator = torch.Generator().manual_seed(0)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-310])
    starts = [0, 5, 2**32 - 1, 2**32 + 2, 2**33 + 2**31 + 1]
    sizes = [1001, 7, 300, 1000, 999]
    described = StreamKeys(2**64 - 5, MASK_DOMAIN, 2**63 + 7, [3, 2**64 - 1, 0, 2**63, 12])
    table = described.table()
    keyings: tuple[Tensor | StreamKeys, ...] = (table, described)
    for dtype, (rate, scale), keys in itertools.product(
        DTYPES, ((0.3, 1.0), (0.7, -0.5), (0.001, 3.0)), keyings
    ):
        values = [
            torch.cat([special, torch.randn(size, generator=generator) * 1e3]).to(dtype)
            for size in sizes
        ]
        expected = [t.clone() for t in values]
        threshold, keep_scale = quantize_rate(rate)
        _reference.bernoulli_(expected, starts, table, threshold, scale * keep_scale)
        # Cut into more runs than tensors, as a large bucket is, on this thread: no
        # OpenMP threads are started just by building the kernel (a process forked
        # after they were could not use more than one thread).
        _call(lib, values, starts, keys, threshold, scale * keep_scale, parts=7, threads=1)
        for got, want in zip(values, expected):
            if not torch.equal(_bits(got), _bits(want)):
                how = "derived" if keys is described else "tabulated"
                return f"{dtype} at rate {rate} with {how} keys differs from the reference path"
    return None


def _bits(values: Tensor) -> Tensor:
    return values.view(torch.int32 if values.dtype == torch.float32 else torch.int64)


def library() -> ctypes.CDLL | None:
    """The checked native library, built on the first call; None when unavailable."""
    global _library, _tried, _status
    if _tried:
        return _library
    with _lock:
        if _tried:
            return _library
        if os.environ.get("DROPGRAD_NATIVE", "1").strip() == "0":
            _status = "off: DROPGRAD_NATIVE=0"
        elif (compiler := _compiler()) is None:
            _status = "off: no C compiler found ($CC, cc, gcc or clang)"
        else:
            try:
                lib = _build(compiler)
                problem = _self_check(lib)
            except Exception as error:  # whatever went wrong, the torch-op path still works
                lib, problem = None, f"{type(error).__name__}: {error}"
            if problem is None:
                assert lib is not None
                threads = (
                    "large buckets on several threads (OpenMP)"
                    if lib.dropgrad_native_openmp()
                    else "one thread (built without OpenMP)"
                )
                _library, _status = lib, f"on: built by {' '.join(compiler)}, {threads}"
            else:
                _status = f"off: {problem}"
                warnings.warn(
                    f"dropgrad's native CPU mask kernel is not used ({problem}); masks are "
                    "computed with torch ops instead: the same values, more slowly. Set "
                    "DROPGRAD_NATIVE=0 to skip the attempt.",
                    RuntimeWarning,
                    stacklevel=3,
                )
        _tried = True
        return _library


def status() -> str:
    """Whether the native kernel is in use, and if not, why (builds it if not tried yet)."""
    library()
    return _status


def unavailable() -> str | None:
    """``None`` when the kernel is built and checked, else why not (builds it if needed)."""
    return None if library() is not None else status()


def accepts(values: Sequence[Tensor], distribution: str) -> bool:
    """Whether :func:`bernoulli_` can mask ``values`` (once made contiguous): Bernoulli
    masks of tensors all on the CPU, all float32 or all float64, no inference tensor
    outside inference mode, and the kernel built and checked."""
    first = values[0]
    if distribution != "bernoulli" or first.dtype not in DTYPES or not first.is_cpu:
        return False
    # Attribute reads only, through map (no Python frame per tensor): a thousand
    # tensors cost well under 0.1 ms here.
    if len(values) > 1 and (len(set(map(_DTYPE_OF, values))) > 1 or not all(map(_IS_CPU, values))):
        return False
    # Torch ops raise torch's own error for these.
    if not torch.is_inference_mode_enabled() and any(map(Tensor.is_inference, values)):
        return False
    return library() is not None


def bernoulli_(
    values: Sequence[Tensor],
    starts: Sequence[int],
    keys: Tensor,
    threshold: int,
    factor: float,
) -> None:
    """Mask contiguous tensors that :func:`accepts` takes, in place.

    The caller tells autograd about the change (the dispatcher bumps the
    version counters, as for the Triton kernel).

    Args:
        values: contiguous tensors of one dtype on the CPU.
        starts: each tensor's first global index.
        keys: int64, shape ``(len(values), 2)``: each tensor's key ``a, b``.
        threshold: lane threshold in ``[1, 65535]``.
        factor: what every element is multiplied by after the drop.

    Raises:
        ValueError: ``starts`` or the key table do not fit ``values``, or a tensor is
            not contiguous (the kernel reads each one as a flat run of elements).
    """
    if len(starts) != len(values) or keys.dtype != torch.int64 or keys.shape != (len(values), 2):
        raise ValueError(
            f"native mask kernel: {len(values)} tensors need {len(values)} starts and an "
            f"int64 key table of shape ({len(values)}, 2), got {len(starts)} starts and "
            f"{keys.dtype} keys of shape {tuple(keys.shape)}"
        )
    _mask(values, starts, keys.cpu(), threshold, factor)


def bernoulli_keyed_(
    values: Sequence[Tensor],
    starts: Sequence[int],
    keys: StreamKeys,
    threshold: int,
    factor: float,
) -> None:
    """:func:`bernoulli_` with the keys derived in the kernel from the step key and
    each tensor's position (the same keys as ``keys.table()``): a step with many
    tensors builds no key table with torch ops.

    Raises:
        ValueError: ``starts`` or ``keys.positions`` do not fit ``values``, or a tensor
            is not contiguous.
    """
    if len(starts) != len(values) or len(keys.positions) != len(values):
        raise ValueError(
            f"native mask kernel: {len(values)} tensors need {len(values)} starts and "
            f"{len(values)} positions, got {len(starts)} starts and "
            f"{len(keys.positions)} positions"
        )
    _mask(values, starts, keys, threshold, factor)


def _mask(
    values: Sequence[Tensor],
    starts: Sequence[int],
    keys: Tensor | StreamKeys,
    threshold: int,
    factor: float,
) -> None:
    if not all(map(Tensor.is_contiguous, values)):
        raise ValueError("native mask kernel: every tensor must be contiguous")
    lib = library()
    assert lib is not None
    if any(map(Tensor.numel, values)):
        _call(lib, values, starts, keys, threshold, factor)


#: Elements per thread below which a bucket is masked by one thread: a thread's share
#: must outweigh handing it over (tens of microseconds).
PARALLEL_MIN_ELEMENTS = 1 << 19


def _threads_for(total: int) -> int:
    """How many threads mask a bucket of ``total`` elements: torch's intra-op thread
    count, at most one per ``PARALLEL_MIN_ELEMENTS`` elements."""
    return max(1, min(torch.get_num_threads(), total // PARALLEL_MIN_ELEMENTS))


def _call(
    lib: ctypes.CDLL,
    values: Sequence[Tensor],
    starts: Sequence[int],
    keys: Tensor | StreamKeys,
    threshold: int,
    factor: float,
    parts: int | None = None,
    threads: int | None = None,
) -> None:
    """One kernel call, with the keys tabulated (a CPU int64 tensor) or described.
    ``parts``: runs to cut the bucket into (default: by its size, see
    :func:`_threads_for`); ``threads``: at most this many mask them (default:
    torch's intra-op thread count)."""
    pointers = array("Q", map(Tensor.data_ptr, values))
    sizes = array("q", map(Tensor.numel, values))
    firsts = array("q", starts)
    bucket = (
        DTYPES[values[0].dtype],
        len(values),
        pointers.buffer_info()[0],
        sizes.buffer_info()[0],
        firsts.buffer_info()[0],
    )
    # ctypes releases the GIL for the call; the kernel cuts the bucket into this many
    # runs and masks them on OpenMP threads (see _native_masks.c).
    schedule = (
        _threads_for(sum(sizes)) if parts is None else parts,
        torch.get_num_threads() if threads is None else threads,
    )
    if isinstance(keys, StreamKeys):
        positions = array("Q", keys.positions)
        code = lib.dropgrad_bernoulli_keyed(
            *bucket,
            positions.buffer_info()[0],
            keys.step_key(),
            threshold,
            factor,
            *schedule,
        )
    else:
        table = keys.contiguous()
        code = lib.dropgrad_bernoulli(*bucket, table.data_ptr(), threshold, factor, *schedule)
    if code:  # pragma: no cover - the dtype was checked above, and a table is tiny
        raise RuntimeError(f"native mask kernel returned {code}")
