"""Arrays from other frameworks, wrapped without a copy for the raw API.

fastopt's kernels take NumPy arrays (CPU) and CuPy arrays (GPU).  Objects that
export their memory through the DLPack protocol (``__dlpack__``: torch tensors,
JAX arrays, numba/CuPy arrays) or ``__cuda_array_interface__`` (numba.cuda
device arrays, older CuPy) are wrapped here as a NumPy or CuPy array over the
*same* memory, so an in-place update reaches the caller's object.

What works (also in the README's interop table):

* CPU DLPack producers: wrapped with ``np.from_dlpack`` (zero-copy).
* CUDA producers (``__cuda_array_interface__`` or DLPack on a CUDA device):
  wrapped with ``cupy.from_dlpack`` / ``cupy.asarray`` when CuPy imports.
* A producer that flags its buffer read-only (JAX arrays are immutable; a
  read-only NumPy array exported through DLPack 1.0) can be read (a grad) but
  not updated: as a param or state it is a ``ValueError`` that says why.
* A torch tensor that requires grad refuses to export itself: the error says
  to pass ``tensor.detach()`` (or to use ``fastopt.torch``).

Anything NumPy/CuPy arrays already are is returned unchanged.
"""

from __future__ import annotations

import numpy as np

from ._backend import array_kind

# DLPack device types (dlpack.h: kDLCPU = 1, kDLCUDA = 2, kDLCUDAHost = 3, kDLCUDAManaged = 13)
_DL_CPU, _DL_CUDA, _DL_CUDA_HOST, _DL_CUDA_MANAGED = 1, 2, 3, 13


def is_foreign(a) -> bool:
    """True for an object that is not a NumPy/CuPy array but exports its memory."""
    return array_kind(a) is None and (hasattr(a, "__dlpack__")
                                      or hasattr(a, "__cuda_array_interface__"))


def as_native(a, label: str, *, writeable: bool = False):
    """``a`` as a NumPy or CuPy array over the same memory (``a`` itself if it already is one).

    ``writeable``: the array will be written in place (a param, a state array);
    a read-only buffer is then a ``ValueError`` naming ``label``.  Objects that
    are neither arrays nor memory exporters come back unchanged, for the
    caller's usual type check to reject.
    """
    if not is_foreign(a):
        return a
    if hasattr(a, "__cuda_array_interface__"):
        out = _cuda(a, label, lambda cp: cp.asarray(a))
        if writeable and a.__cuda_array_interface__.get("data", (0, False))[1]:
            raise ValueError(f"{label}: expected a writeable array, got a read-only "
                             f"__cuda_array_interface__ buffer from {type(a).__name__} "
                             "(fastopt updates it in place)")
        return out
    try:
        dev = int(a.__dlpack_device__()[0]) if hasattr(a, "__dlpack_device__") else _DL_CPU
    except Exception as e:  # a producer that cannot say where its memory is
        raise TypeError(f"{label}: {type(a).__name__}.__dlpack_device__() failed: {e}") from e
    if dev in (_DL_CUDA, _DL_CUDA_MANAGED):
        return _cuda(a, label, lambda cp: cp.from_dlpack(a))
    if dev not in (_DL_CPU, _DL_CUDA_HOST):
        raise TypeError(f"{label}: expected memory NumPy or CuPy can reach, got a "
                        f"{type(a).__name__} on DLPack device type {dev}")
    try:
        out = np.from_dlpack(a)
    except (BufferError, RuntimeError, TypeError) as e:
        hint = ""
        if "requires grad" in str(e) or "require gradient" in str(e) or \
                getattr(a, "requires_grad", False):
            hint = " (pass tensor.detach(), or use fastopt.torch for torch training loops)"
        raise TypeError(f"{label}: {type(a).__name__} could not be wrapped without a copy "
                        f"through DLPack: {e}{hint}") from e
    if writeable and not out.flags.writeable:
        raise ValueError(f"{label}: expected a writeable array, got a read-only buffer from "
                         f"{type(a).__name__} (its producer marks it immutable, as JAX does for "
                         "every array); fastopt updates params and state in place")
    return out


def _cuda(a, label, wrap):
    try:
        import cupy
    except ImportError as e:
        raise TypeError(f"{label}: a CUDA array ({type(a).__name__}) needs CuPy to be wrapped "
                        "without a copy: pip install 'fastopt[cuda12]' or 'fastopt[cuda13]'") from e
    return wrap(cupy)
