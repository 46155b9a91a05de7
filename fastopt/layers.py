r"""Fused BatchNorm and Dropout for networks trained on raw arrays.

.. code-block:: python

    from fastopt import layers
    y, cache = layers.batch_norm_forward(x, gamma, beta, running_mean, running_var,
                                         momentum=0.1, eps=1e-5, training=True)
    dx, dgamma, dbeta = layers.batch_norm_backward(dy, cache)
    h, mask = layers.dropout_forward(y, p=0.5, seed=0, step=t)
    dy = layers.dropout_backward(dh, mask)

Backends, as for the optimizers: ``backend="numpy"`` (the plain reference,
``fastopt/kernels/reference_layers.py``), ``"numba"`` (fused multi-threaded
kernels, ``fastopt/kernels/numba_layers.py``), ``"cupy"`` (the CUDA kernels of
``fastopt/kernels/cuda/layers.cu`` on CuPy arrays, launched on the optimizers'
CuPy device and current stream) and ``"auto"`` (CuPy arrays to ``cupy``; NumPy
arrays to the ``FASTOPT_BACKEND`` environment variable if set, else numba when
it imports, else numpy).  :func:`backends` says which are available and why
not.  Inputs are float32, float64, float16 or bfloat16 arrays (NumPy, or CuPy
with every array of a call on the device; see "16-bit inputs" below).  Every
check runs before anything is written.

BatchNorm
---------
``x`` is ``(N, C)`` or ``(N, C, *spatial)`` (e.g. ``(N, C, H, W)``); statistics
are per channel ``c`` over the ``M = N * prod(spatial)`` values of that channel:

.. math::

    \mu_c = \tfrac1M \sum x, \quad \sigma^2_c = \tfrac1M \sum (x - \mu_c)^2, \quad
    \hat x = (x - \mu_c) / \sqrt{\sigma^2_c + \epsilon}, \quad y = \gamma_c \hat x + \beta_c

computed in float64 accumulators with the two-pass variance (the mean first,
then the squared deviations from it), rounded once to ``x``'s dtype.  In
training the batch statistics are used and the running statistics, when
given, are updated in place as ``torch.nn.functional.batch_norm`` does:
``running_mean = (1 - momentum) * running_mean + momentum * mu`` and the same
for ``running_var`` with the *unbiased* variance ``sigma^2 * M / (M - 1)``.
In evaluation (``training=False``) the running statistics normalise and are
not touched.  ``gamma``/``beta`` may be None (no affine part; their gradient
is then None).

Backward (training), with sums over the channel's M values:
``dbeta = sum dy``, ``dgamma = sum dy * xhat``,
``dx = gamma * invstd * (dy - dbeta / M - xhat * dgamma / M)``; in evaluation
the statistics are constants and ``dx = gamma * invstd * dy``.  The cache keeps
a reference to ``x`` (not a copy): do not modify ``x`` between the forward and
the backward call.

Results are deterministic: the reductions add fixed blocks in a fixed order,
so the same input gives the same bits for any thread count.

Dropout
-------
Element ``i`` (its flat C-order index in ``x``) is kept iff
``fastopt.precision.random_bits(seed, step, i) >= ceil(p * 2**32)``, and kept
elements are multiplied by ``1 / (1 - p)`` (computed in double, rounded to the
dtype, then one multiply in the dtype).  The threshold is exact: ``p * 2**32``
is exact in double, and for an integer ``bits``, ``bits >= p * 2**32`` iff
``bits >= ceil(p * 2**32)``, so the keep probability is exactly
``(2**32 - ceil(p * 2**32)) / 2**32`` (within ``2**-32`` of ``1 - p``).
No mask is stored: :class:`DropoutMask` holds ``(p, seed, step, shape,
dtype)`` and the backward pass regenerates the same bits, identical on every
backend and thread count.  Use a different ``seed`` per layer (the bits of
two same-shaped tensors with one ``(seed, step)`` are equal) and a new
``step`` per training step.  ``p`` must lie in ``[0, 1)``: at ``p = 1`` the
scale ``1 / (1 - p)`` does not exist (drop the layer's output instead).

16-bit inputs
-------------
``x`` (and ``dy``) may be float16 or ``ml_dtypes.bfloat16`` (NumPy, or CuPy on
the ``cupy`` backend); the statistics stay float32: ``gamma``, ``beta`` and
their gradients are float32, ``running_mean``/``running_var`` float32 or
float64, and the reductions accumulate in float64 as above.  The definition
(the ``numpy`` backend): each 16-bit element is widened exactly to float32, the
float32 kernels run (BatchNorm's per-element math in float64, rounded once to
float32; Dropout's ``x * float32(scale)`` in float32), and the float32 result is
rounded to nearest even into the 16-bit dtype (NumPy's and ml_dtypes' casts,
the bits of ``fastopt.precision``'s recipes).  The ``numba`` and ``cupy``
kernels do the same in one pass over the 16-bit bits (no widened copy, no
narrowing pass): BatchNorm gives bit for bit what those backends' float32
kernels give on the widened batch, and Dropout agrees bit for bit with the
reference on every backend.  A nan input gives a nan output; the payload of a
signalling nan may differ between backends.
"""

from __future__ import annotations

import importlib
import math
import numbers
import os
import threading
from dataclasses import dataclass

import numpy as np

from . import precision as _precision

__all__ = [
    "BatchNormCache", "DropoutMask", "backends", "batch_norm_backward", "batch_norm_forward",
    "dropout_backward", "dropout_forward",
]

_BACKEND_MODULES = {"numpy": "reference_layers", "numba": "numba_layers", "cupy": "cupy_gpu"}
_ENV_VAR = "FASTOPT_BACKEND"
_LOADED: dict = {}
_FAILED: dict = {}
_LOCK = threading.Lock()
_U64 = 1 << 64


# ------------------------------------------------------------------ dispatch


def _load(name: str):
    if name in _LOADED:
        return _LOADED[name]
    if name in _FAILED:
        raise RuntimeError(f"layers backend {name!r} is unavailable: {_FAILED[name]}")
    with _LOCK:
        if name not in _LOADED and name not in _FAILED:
            try:
                mod = importlib.import_module(f"fastopt.kernels.{_BACKEND_MODULES[name]}")
                if name == "cupy":  # layers.cu on the optimizers' CuPy device (its modules)
                    from .kernels.cuda._layers_host import CudaLayers
                    mod = CudaLayers(mod.DEVICE)
                _LOADED[name] = mod
            except Exception as e:  # numba or cupy missing or broken, no CUDA device
                _FAILED[name] = f"{type(e).__name__}: {e}"
    return _load(name)


#: the input dtypes every layers backend takes (16-bit with float32 statistics)
DTYPES = ("float32", "float64", "float16", "bfloat16")


def backends() -> dict:
    """Each layers backend: ``{name: {"available": bool, "reason": str | None, "dtypes":
    tuple, "fused_16bit": bool}}`` (loads them).  ``fused_16bit``: the kernels read and
    write 16-bit batches themselves; else they run on a widened float32 copy."""
    out = {}
    for name in _BACKEND_MODULES:
        try:
            k = _load(name)
            out[name] = {"available": True, "reason": None, "dtypes": DTYPES,
                         "fused_16bit": bool(getattr(k, "FUSED_16BIT", False))}
        except RuntimeError:
            out[name] = {"available": False, "reason": _FAILED[name], "dtypes": (),
                         "fused_16bit": False}
    return out


def _resolve(backend, kind="numpy"):
    """The kernels for ``backend`` and arrays of ``kind`` (``"numpy"`` or ``"cupy"``)."""
    choices = ("auto",) + tuple(_BACKEND_MODULES)
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected one of {choices}, got {type(backend).__name__}")
    if backend == "auto":
        backend = os.environ.get(_ENV_VAR, "auto") or "auto"
        if kind == "cupy":  # an environment override names a CPU backend: CuPy arrays stay
            backend = "cupy"
    if backend == "auto":
        try:
            return _load("numba")
        except RuntimeError:
            return _load("numpy")
    if backend not in _BACKEND_MODULES:
        raise ValueError(f"backend: expected one of {choices}, got {backend!r}")
    if (backend == "cupy") != (kind == "cupy"):
        raise TypeError(f"backend {backend!r} takes {'cupy' if backend == 'cupy' else 'numpy'} "
                        f"arrays, got {kind} arrays")
    return _load(backend)


def _kind(a) -> str | None:
    """``"numpy"`` or ``"cupy"`` for an array, None for anything else (never imports cupy)."""
    if isinstance(a, np.ndarray):
        return "numpy"
    if (type(a).__module__ or "").startswith("cupy") and hasattr(a, "__cuda_array_interface__"):
        return "cupy"
    return None


def _xp(kind):
    if kind == "cupy":
        import cupy
        return cupy
    return np


def _overlap(a, b) -> bool:
    """Whether two arrays of one kind may share memory (CuPy: their byte ranges overlap)."""
    if isinstance(a, np.ndarray):
        return np.shares_memory(a, b)
    lo_a, lo_b = a.data.ptr, b.data.ptr
    return lo_a < lo_b + b.nbytes and lo_b < lo_a + a.nbytes


# ------------------------------------------------------------------ validation


def _float_array(a, name: str, sixteen: bool = False, kind: str = "numpy"):
    """``a`` if it is a float32/float64 array of ``kind`` (or, with ``sixteen``,
    float16/bfloat16)."""
    got = _kind(a)
    if got != kind:
        what = "a numpy.ndarray" if kind == "numpy" else "a cupy.ndarray (like x)"
        raise TypeError(f"{name}: expected {what} of float32 or float64, "
                        f"got {type(a).__module__}.{type(a).__name__}")
    if _precision.is_16bit(a.dtype):
        if sixteen:
            return a
        raise TypeError(f"{name}: expected dtype float32 or float64 (statistics stay in float32 "
                        f"for 16-bit inputs), got {a.dtype}")
    if a.dtype not in (np.float32, np.float64):
        what = "float32, float64, float16 or bfloat16" if sixteen else "float32 or float64"
        raise TypeError(f"{name}: expected dtype {what}, got {a.dtype}")
    return a


def _wide(a):
    """The dtype the kernels see for an input of ``a``'s dtype: float32 for 16-bit inputs."""
    return np.dtype(np.float32) if _precision.is_16bit(a.dtype) else a.dtype


def _widen(a):
    """``a`` as the kernels take it: 16-bit widened exactly to float32 (a copy), else as is."""
    return a.astype(np.float32) if _precision.is_16bit(a.dtype) else a


def _bits_view(a):
    """A 16-bit array as the integer view the fused kernels take (bfloat16: uint16, float16:
    int16; the view's dtype tells the kernel which format the bits are in)."""
    return a.view(np.int16 if a.dtype == np.float16 else np.uint16)


def _operands(k, arrays, dtype):
    """The kernels' inputs and an empty output for ``arrays`` (all of ``dtype``) on backend
    ``k``: ``(inputs, out, out_view)``.  A backend with ``FUSED_16BIT`` reads and writes
    16-bit arrays through their bits, so ``out`` has ``dtype``; any other runs its float32
    kernels on widened copies and ``out`` is float32 (narrowed by the caller)."""
    xp = _xp(_kind(arrays[0]))
    if _precision.is_16bit(dtype) and getattr(k, "FUSED_16BIT", False):
        out = xp.empty(arrays[0].shape, dtype)
        return [_bits_view(a) for a in arrays], out, _bits_view(out)
    ins = [_widen(a) for a in arrays]
    out = xp.empty_like(ins[0])
    return ins, out, out


def _narrow(out, dtype):
    """A kernel result as ``dtype``: a float32 result of a 16-bit call rounded to nearest
    even; anything already in ``dtype`` (the fused kernels' output, float32/float64 calls)
    as is, no copy.

    NumPy's float16 cast and ml_dtypes' bfloat16 cast round to nearest even, the same bits
    as ``fastopt.precision``'s recipes for every non-NaN value (its tests check them); they
    run in C, ten times faster than the recipes in NumPy (4M elements: 7 ms against 76).
    """
    return out.astype(dtype, copy=False)


def _vector(a, name: str, c: int, dtype=None, writable: bool = False, x_dtype=None,
            kind="numpy"):
    if a is None:
        return None
    _float_array(a, name, kind=kind)
    if a.shape != (c,):
        raise ValueError(f"{name}: expected shape ({c},) (one value per channel), got {a.shape}")
    if dtype is not None and a.dtype != dtype:
        why = "that of x" if dtype == x_dtype else f"the statistics of a {x_dtype} x"
        raise ValueError(f"{name}: expected dtype {dtype} ({why}), got {a.dtype}")
    if writable and kind == "numpy" and not a.flags.writeable:
        raise ValueError(f"{name}: expected a writable array (it is updated in place), "
                         "got a read-only one")
    return a


def _real(value, name: str, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    v = float(value)
    lo_ok = v > lo if lo_open else v >= lo
    hi_ok = v < hi if hi_open else v <= hi
    if not (math.isfinite(v) and lo_ok and hi_ok):
        rng = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise ValueError(f"{name}: expected a number in {rng}, got {value!r}")
    return v


def _u64(value, name: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an integer in [0, 2**64), got {type(value).__name__}")
    v = int(value)
    if not 0 <= v < _U64:
        raise ValueError(f"{name}: expected an integer in [0, 2**64), got {v}")
    return v


# ------------------------------------------------------------------ BatchNorm


@dataclass(frozen=True)
class BatchNormCache:
    """What :func:`batch_norm_backward` needs: ``x`` (by reference) and float64 statistics."""

    x3: np.ndarray          # x as (N, C, S), C-contiguous
    shape: tuple
    gamma: np.ndarray | None  # float64 copy
    has_beta: bool
    mean: np.ndarray        # float64 (C,): the statistics that normalised
    invstd: np.ndarray      # float64 (C,): 1 / sqrt(var + eps)
    training: bool
    backend: object


def batch_norm_forward(x, gamma, beta, running_mean, running_var, momentum=0.1, eps=1e-5,
                       training=True, *, backend="auto"):
    """Batch normalisation of ``x`` (N, C, ...) per channel; returns ``(y, cache)``.

    The math, the running-statistics update and the dtypes are in this module's
    docstring.  ``running_mean``/``running_var``: float32/float64 arrays of shape
    (C,), updated in place in training (both or neither), required in evaluation.
    """
    kind = _kind(x) or "numpy"
    _float_array(x, "x", sixteen=True, kind=kind)
    xp = _xp(kind)
    if x.ndim < 2:
        raise ValueError(f"x: expected shape (N, C) or (N, C, *spatial), got {x.shape}")
    if x.size == 0:
        raise ValueError(f"x: expected a non-empty batch, got shape {x.shape}")
    if not isinstance(training, (bool, np.bool_)):
        raise TypeError(f"training: expected a bool, got {type(training).__name__}")
    training = bool(training)
    n, c = x.shape[0], x.shape[1]
    m = x.size // c
    gamma = _vector(gamma, "gamma", c, _wide(x), x_dtype=x.dtype, kind=kind)
    beta = _vector(beta, "beta", c, _wide(x), x_dtype=x.dtype, kind=kind)
    running_mean = _vector(running_mean, "running_mean", c, writable=True, kind=kind)
    running_var = _vector(running_var, "running_var", c, writable=True, kind=kind)
    momentum = _real(momentum, "momentum", 0.0, 1.0)
    eps = _real(eps, "eps", 0.0, math.inf, lo_open=True, hi_open=True)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean, running_var: expected both arrays or both None, got "
                         f"{'None' if running_mean is None else 'an array'} and "
                         f"{'None' if running_var is None else 'an array'}")
    if running_mean is not None and _overlap(running_mean, running_var):
        raise ValueError("running_var: expected an array apart from running_mean, got the same memory")
    if not training and running_mean is None:
        raise ValueError("running_mean, running_var: expected arrays when training=False "
                         "(evaluation normalises with them), got None")
    if training and m < 2:
        raise ValueError(f"x: expected more than one value per channel in training, got shape "
                         f"{x.shape}")
    if running_mean is not None and (_overlap(x, running_mean) or _overlap(x, running_var)):
        raise ValueError("running_mean, running_var: expected arrays apart from x, got shared memory")
    k = _resolve(backend, kind)

    x3 = xp.ascontiguousarray(x).reshape(n, c, -1)
    (xk,), y3, yk = _operands(k, [x3], x.dtype)  # 16-bit: bits, or a widened copy
    if training:
        mean, var = k.bn_moments(xk)
    else:
        mean = running_mean.astype(np.float64)
        var = running_var.astype(np.float64)
    invstd = 1.0 / xp.sqrt(var + eps)
    g64 = None if gamma is None else gamma.astype(np.float64)
    scale = invstd if g64 is None else invstd * g64
    b64 = xp.zeros(c) if beta is None else beta.astype(np.float64)
    k.bn_apply(xk, mean, scale, b64, yk)
    y3 = _narrow(y3, x.dtype)
    if training and running_mean is not None:
        running_mean[...] = (1.0 - momentum) * running_mean.astype(np.float64) + momentum * mean
        running_var[...] = ((1.0 - momentum) * running_var.astype(np.float64)
                            + momentum * var * (m / (m - 1)))
    cache = BatchNormCache(x3, x.shape, g64, beta is not None, mean, invstd, training, k)
    return y3.reshape(x.shape), cache


def batch_norm_backward(dy, cache):
    """Gradients of :func:`batch_norm_forward`: ``(dx, dgamma, dbeta)`` in x's dtype.

    ``dgamma`` (``dbeta``) is None when ``gamma`` (``beta``) was None.
    """
    if not isinstance(cache, BatchNormCache):
        raise TypeError("cache: expected the BatchNormCache batch_norm_forward returned, got "
                        f"{type(cache).__name__}")
    x3 = cache.x3
    kind = _kind(x3)
    xp = _xp(kind)
    _float_array(dy, "dy", sixteen=True, kind=kind)
    if dy.shape != cache.shape:
        raise ValueError(f"dy: expected shape {cache.shape} (that of x), got {dy.shape}")
    if dy.dtype != x3.dtype:
        raise ValueError(f"dy: expected dtype {x3.dtype} (that of x), got {dy.dtype}")
    k = cache.backend
    n, c, _ = x3.shape
    m = x3.size // c
    (xk, dy3), dx3, dxk = _operands(k, [x3, xp.ascontiguousarray(dy).reshape(x3.shape)],
                                    x3.dtype)
    sdy, sdyx = k.bn_backward_sums(xk, dy3, cache.mean, cache.invstd)
    kk = cache.invstd if cache.gamma is None else cache.invstd * cache.gamma
    if cache.training:
        a, b = sdy / m, sdyx / m
    else:
        a = b = xp.zeros(c)
    k.bn_backward_dx(xk, dy3, cache.mean, cache.invstd, kk, a, b, dxk)
    dx3 = _narrow(dx3, x3.dtype)
    wide = _wide(x3)
    dgamma = None if cache.gamma is None else sdyx.astype(wide)
    dbeta = sdy.astype(wide) if cache.has_beta else None
    return dx3.reshape(cache.shape), dgamma, dbeta


# ------------------------------------------------------------------ Dropout


@dataclass(frozen=True)
class DropoutMask:
    """A dropout mask as its seed: ``(p, seed, step)`` plus the shape and dtype it covers.

    :meth:`keep` materialises the boolean mask (for inspection; the kernels
    never store it).
    """

    p: float
    seed: int
    step: int
    shape: tuple
    dtype: np.dtype

    @property
    def threshold(self) -> int:
        """``ceil(p * 2**32)``: an element is kept iff its 32 random bits are at least this."""
        return math.ceil(self.p * 2.0 ** 32)  # p * 2**32 is exact in double

    @property
    def scale(self) -> float:
        """``1 / (1 - p)`` in double (the kernels multiply by it rounded to the dtype)."""
        return 1.0 / (1.0 - self.p)

    def keep(self) -> np.ndarray:
        """The boolean keep mask, shape ``self.shape``."""
        from .kernels.reference_layers import dropout_keep

        n = int(np.prod(self.shape, dtype=np.int64))
        return dropout_keep(self.seed, self.step, self.threshold, n).reshape(self.shape)


def _dropout(k, x, mask: DropoutMask):
    xp = _xp(_kind(x))
    (flat,), out, outk = _operands(k, [xp.ascontiguousarray(x).reshape(-1)], x.dtype)
    k.dropout_apply(flat, mask.seed, mask.step, mask.threshold, _wide(x).type(mask.scale), outk)
    return _narrow(out, x.dtype).reshape(x.shape)


def dropout_forward(x, p, seed, step, *, backend="auto"):
    """Inverted dropout of ``x`` with probability ``p``; returns ``(y, mask)``.

    ``seed`` and ``step`` are integers in [0, 2**64); the mask (a
    :class:`DropoutMask`, no array) is what :func:`dropout_backward` needs.
    Keep rule, threshold rounding and scale: this module's docstring.
    """
    kind = _kind(x) or "numpy"
    _float_array(x, "x", sixteen=True, kind=kind)
    p = _real(p, "p", 0.0, 1.0, hi_open=True)
    seed = _u64(seed, "seed")
    step = _u64(step, "step")
    k = _resolve(backend, kind)
    mask = DropoutMask(p, seed, step, tuple(x.shape), x.dtype)
    return _dropout(k, x, mask), mask


def dropout_backward(dy, mask, *, backend="auto"):
    """``dx = dy * scale`` where the forward pass kept the element, else 0 (same bits)."""
    if not isinstance(mask, DropoutMask):
        raise TypeError("mask: expected the DropoutMask dropout_forward returned, got "
                        f"{type(mask).__name__}")
    kind = _kind(dy) or "numpy"
    _float_array(dy, "dy", sixteen=True, kind=kind)
    if tuple(dy.shape) != mask.shape:
        raise ValueError(f"dy: expected shape {mask.shape} (that of x), got {dy.shape}")
    if dy.dtype != mask.dtype:
        raise ValueError(f"dy: expected dtype {mask.dtype} (that of x), got {dy.dtype}")
    return _dropout(_resolve(backend, kind), dy, mask)
