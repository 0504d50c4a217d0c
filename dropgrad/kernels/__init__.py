"""Mask kernels: the reference that defines every mask, the backends that compute it fast.

* ``_reference.py`` says what a mask is (lanes, thresholds, Gaussian noise),
  one tensor at a time; every other backend is held to it bit for bit.
* Backends implement the same operations on a *bucket* (tensors of one dtype
  on one device, each with its first global index and stream key):
  ``_torch_ops.py`` (elementwise torch ops, any device and dtype),
  ``_native.py`` (a C kernel for float32/float64 on the CPU, built on first
  use) and ``_triton.py`` (one Triton launch per bucket on CUDA).
* ``_dispatch.py`` holds what they share and chooses one, in one place:
  :func:`mask_`. The environment variable ``DROPGRAD_BACKEND`` pins a backend
  (``auto``, the default, ``reference``, ``torch``, ``native`` or ``triton``);
  :func:`status` says which can run here.
"""

from ._dispatch import BACKEND_NAMES, BACKENDS, backend_available, mask_, status
from ._reference import LANE_LEVELS, LANE_OFFSET, noise_dtype, quantize_rate

__all__ = [
    "BACKENDS",
    "BACKEND_NAMES",
    "LANE_LEVELS",
    "LANE_OFFSET",
    "backend_available",
    "mask_",
    "noise_dtype",
    "quantize_rate",
    "status",
]
