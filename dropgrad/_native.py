"""The native CPU mask kernel: built on first use, checked, and optional.

``_native_masks.c`` masks a list of contiguous float32 or float64 tensors in
one pass each (hash, compare, clear, scale), where the torch-op path needs a
dozen passes over int32 buffers and, for small tensors, two packing copies.
The result is bit-for-bit the same; only the time differs.

The source ships with the package and is compiled the first time a step needs
it, with the C compiler named by ``$CC`` or found on ``PATH`` (``cc``,
``gcc``, ``clang``) and ``-O3 -march=native``. The library is cached under
``$DROPGRAD_CACHE_DIR`` (default ``$XDG_CACHE_HOME/dropgrad``, else
``~/.cache/dropgrad``), named by a hash of the source, the compiler, the flags
and the CPU, so a cache shared between different machines never hands one a
library built for another; it is written to a temporary name and renamed, so
processes building at once (one per rank) do not see each other's half-written
files. Before first use the library masks a few tensors that the plain
reference path masks too, and is used only if every bit agrees.

Everything falls back to the torch-op path, silently when there is no
compiler, with one warning when building or the check fails. Setting
``DROPGRAD_NATIVE=0`` turns the kernel off; :func:`status` builds it and says
whether steps use it.
"""

from __future__ import annotations

import ctypes
import getpass
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from array import array
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["available", "bernoulli_", "disabled", "library", "status"]

_SOURCE = Path(__file__).with_name("_native_masks.c")
_ABI = 1
_DTYPE_CODES = {torch.float32: 0, torch.float64: 1}
_FLAGS = ["-O3", "-std=c99", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math"]
# Tried in order: the first the compiler accepts tunes for this CPU.
_ARCH_FLAGS: tuple[list[str], ...] = (["-march=native"], ["-mcpu=native"], [])

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_tried = False
_status = "not built yet"
_enabled = True


def _compiler() -> str | None:
    named = os.environ.get("CC")
    if named:
        return shutil.which(named) or None
    for candidate in ("cc", "gcc", "clang"):
        found = shutil.which(candidate)
        if found:
            return found
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
    return platform.machine() + platform.processor() + "".join(lines)


def _cache_dir() -> Path:
    named = os.environ.get("DROPGRAD_CACHE_DIR")
    if named:
        return Path(named)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dropgrad"


def _writable_cache_dir() -> Path:
    """The cache directory, or a per-user one under the temporary directory when it
    cannot be created or written (a read-only home, say)."""
    directory = _cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if os.access(directory, os.W_OK):
            return directory
    except OSError:
        pass
    fallback = Path(tempfile.gettempdir()) / f"dropgrad-{getpass.getuser()}"
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback


def _build(compiler: str) -> Path:
    """Compile the source (or find it already compiled); returns the library's path.

    Raises:
        RuntimeError: the compiler rejected every flag set (its message included).
    """
    source = _SOURCE.read_bytes()
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, timeout=60
    ).stdout
    errors = []
    for arch in _ARCH_FLAGS:
        flags = _FLAGS + arch
        digest = hashlib.sha256(
            b"\0".join(
                [source, compiler.encode(), version.encode(), " ".join(flags).encode()]
                + [_cpu_identity().encode()]
            )
        ).hexdigest()[:20]
        directory = _writable_cache_dir()
        target = directory / f"dropgrad_masks_{digest}.so"
        if target.exists():
            return target
        handle, partial = tempfile.mkstemp(dir=directory, prefix=".build-", suffix=".so")
        os.close(handle)
        result = subprocess.run(
            [compiler, *flags, "-o", partial, str(_SOURCE)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if result.returncode == 0:
            os.replace(partial, target)  # atomic: other processes see all or nothing
            return target
        os.unlink(partial)
        errors.append(f"{' '.join(arch) or '(no arch flag)'}: {result.stderr.strip()}")
    raise RuntimeError("compiling the native mask kernel failed:\n" + "\n".join(errors))


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
    ]
    return lib


def _self_check(lib: ctypes.CDLL) -> str | None:
    """Mask a few tensors natively and by the reference path; None when every bit agrees."""
    from ._masking import MaskTarget, bernoulli_reference_, quantize_rate
    from ._random import MASK_DOMAIN, stream_key

    generator = torch.Generator().manual_seed(0)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0])
    for dtype in _DTYPE_CODES:
        for rate, scale, start in ((0.3, 1.0, 0), (0.7, 0.5, 5), (0.001, 3.0, 2**40 + 1)):
            values = torch.cat([special, torch.randn(1000, generator=generator) * 1e3])
            values = values.to(dtype)
            key = stream_key(123, MASK_DOMAIN, 7, len(values) + start)
            expected = values.clone()
            bernoulli_reference_([MaskTarget(expected, key, start)], rate, scale)
            threshold, keep_scale = quantize_rate(rate)
            _call(lib, [values], [start], _key_table([key]), threshold, scale * keep_scale)
            if not torch.equal(_bits(values), _bits(expected)):
                return f"{dtype} at rate {rate} differs from the reference path"
    return None


def _bits(values: Tensor) -> Tensor:
    return values.view(torch.int32 if values.dtype == torch.float32 else torch.int64)


def _key_table(keys: Sequence[tuple[int, int]]) -> Tensor:
    return torch.tensor([list(k) for k in keys], dtype=torch.int64)


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
                lib = _load(_build(compiler))
                problem = _self_check(lib)
            except (OSError, RuntimeError, subprocess.SubprocessError) as error:
                lib, problem = None, str(error)
            if problem is None:
                _library, _status = lib, f"on: built by {compiler}"
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
    return _status if _enabled else "off: disabled in this process"


def available() -> bool:
    """Whether steps use the native kernel (builds it on the first call)."""
    return _enabled and library() is not None


@contextmanager
def disabled() -> Iterator[None]:
    """Use the torch-op path inside the ``with`` block (tests compare both paths)."""
    global _enabled
    previous, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = previous


def supports(values: Sequence[Tensor]) -> bool:
    """Whether :func:`bernoulli_` can mask ``values`` (CPU, float32 or float64)."""
    first = values[0]
    return first.device.type == "cpu" and first.dtype in _DTYPE_CODES and available()


def bernoulli_(
    values: Sequence[Tensor],
    starts: Sequence[int],
    keys: Tensor,
    threshold: int,
    factor: float,
) -> bool:
    """Mask contiguous CPU tensors of one dtype in place; False (nothing done) when the
    native kernel cannot.

    Args:
        values: contiguous tensors of one dtype on the CPU.
        starts: each tensor's first global index.
        keys: int64, shape ``(len(values), 2)``: each tensor's key ``a, b``.
        threshold: lane threshold in ``[1, 65535]``.
        factor: what every element is multiplied by after the drop.
    """
    if not supports(values):
        return False
    lib = library()
    assert lib is not None
    if any(map(Tensor.numel, values)):
        _call(lib, values, starts, keys, threshold, factor)
    return True


def _call(
    lib: ctypes.CDLL,
    values: Sequence[Tensor],
    starts: Sequence[int],
    keys: Tensor,
    threshold: int,
    factor: float,
) -> None:
    pointers = array("Q", [t.data_ptr() for t in values])
    sizes = array("q", [t.numel() for t in values])
    firsts = array("q", starts)
    table = keys.contiguous()
    code = lib.dropgrad_bernoulli(
        _DTYPE_CODES[values[0].dtype],
        len(values),
        pointers.buffer_info()[0],
        sizes.buffer_info()[0],
        firsts.buffer_info()[0],
        table.data_ptr(),
        threshold,
        factor,
    )
    if code != 0:  # pragma: no cover - the dtype was checked above
        raise RuntimeError(f"native mask kernel returned {code}")
