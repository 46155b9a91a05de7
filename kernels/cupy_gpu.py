"""The ``cupy`` backend: CUDA C kernels (``kernels/cuda/*.cu``) through ``cupy.RawModule``.

Importing this module imports CuPy and checks for a device; without either it raises, and
``fastopt.backends()`` reports the message.  ``import fastopt`` never imports it.

* Sources are read with ``importlib.resources``; their ``#include "..."`` headers are inlined
  into the source string after the kernel scalar/flag constants generated from
  ``fastopt._rules`` (``_host.vocabulary_header``), so a header or vocabulary change is a new
  CuPy cache key.
* One ``RawModule`` per source file (``update.cu``: the rules on float32/float64 and 16-bit
  params, ``q8.cu``: the rules on 8-bit state, ``reduce.cu``: norms and the non-finite flag),
  compiled on first use; kernels are ``extern "C"`` and cached per name, i.e. per (rule,
  storage formats); ``_host.CudaBackend.update`` picks them by ``Rule.kind`` and the bucket's
  precision.  A bfloat16 CuPy array reaches a kernel as the address of its bits (uint16).
* Muon/Adafactor buckets with a precision run ``fastopt._widen``'s driver with
  ``OPS.widening`` (``_host.DeviceConversions``: ``widen.cu`` and q8.cu's decode/encode), so
  16-bit and q8 buckets of theirs stay on the device.
* The launch logic (multi-tensor tables, chunking, scalars cast to the declared C types) is
  ``fastopt.kernels.cuda._host``, which the CPU harness in ``tests/`` runs unchanged.
* A step has no host synchronization except the read of the non-finite flag when
  ``nonfinite`` is ``"raise"`` or ``"skip"`` (``nonfinite="ignore"`` never syncs); norms and
  clip factors stay on the device.
"""

from __future__ import annotations

import functools
import threading

from .._backend import Ops, register_kernel
from .._rules import RULES
from .cuda import _host

try:
    import cupy
except ImportError as e:  # pragma: no cover - depends on the machine
    raise ImportError(f"CuPy is not installed ({e}); install fastopt[cuda12] or fastopt[cuda13]") from e

try:
    _N_DEVICES = cupy.cuda.runtime.getDeviceCount()
except Exception as e:  # pragma: no cover - CUDARuntimeError: no driver, no device
    raise RuntimeError(f"CuPy is installed but no CUDA device is usable: {e}") from e
if _N_DEVICES == 0:  # pragma: no cover
    raise RuntimeError("CuPy is installed but no CUDA device was found")

BACKEND = "cupy"


class CupyDevice(_host.Device):
    """CuPy's launches on the current device and stream."""

    xp = cupy
    chunk_size = 65536
    block = 256

    def __init__(self):
        self._modules = {}  # (source, device id) -> RawModule
        self._kernels = {}  # (kernel name, device id) -> RawKernel
        self._lock = threading.Lock()

    def _module(self, src, dev_id):
        key = (src, dev_id)
        mod = self._modules.get(key)
        if mod is None:
            with self._lock:
                mod = self._modules.get(key)
                if mod is None:
                    mod = cupy.RawModule(code=_host.read_source(src), options=_host.NVRTC_OPTIONS)
                    self._modules[key] = mod
        return mod

    def kernel(self, name):
        dev_id = cupy.cuda.runtime.getDevice()
        k = self._kernels.get((name, dev_id))
        if k is None:
            k = self._module(_host.source_of(name), dev_id).get_function(name)
            self._kernels[(name, dev_id)] = k
        return k

    def ptr(self, a):
        return a.data.ptr

    def launch(self, name, grid, block, args):
        self.kernel(name)((grid,), (block,), args)

    def to_host(self, a):
        return cupy.asnumpy(a)


DEVICE = CupyDevice()
KERNELS = _host.CudaBackend(DEVICE)
OPS = _host.make_ops(Ops, KERNELS, BACKEND)

for _name, _rule in RULES.items():
    register_kernel(_name, BACKEND, functools.partial(KERNELS.update, _rule))

__all__ = ["OPS", "KERNELS", "DEVICE", "CupyDevice"]
