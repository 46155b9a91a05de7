"""The Numba CPU backend: fused, multi-threaded, multi-tensor kernels.

Layout
------
* One per-element body per rule (``_sgd``, ``_adam``, ...): an
  ``@njit(inline="always")`` function of one element that returns the new
  parameter value and writes the rule's state.  Its math repeats
  ``kernels/reference.py`` operation for operation, in the same order, so a
  float64 step agrees with the reference to the last bits.
* Two drivers, written once and shared by every rule: ``_apply`` (the update
  pass: the pipeline of SPEC section 4 around the body, then ``weight_clip``)
  and ``_reduce`` (a read pass that sums two float64 values per tensor: the
  gradient norms and non-finite flag, ``sumsq``, LAMB's ``|p|`` and ``|r|``).
* One thin ``parallel=True`` entry point per rule and memory variant
  (``_k_adam``, ``_k_adam_amsgrad``, ...) that runs a driver with the rule's
  body.  Variants are flags of the one body: the flags that decide which arrays
  are touched (amsgrad, momentum, centered) are a constant of the entry point,
  so they fold away and the loop vectorizes; the others (nesterov, RAdam's
  rectification, the first SGD step, decoupled decay) are runtime scalars.

Multi-tensor
------------
A call covers a whole list of tensors.  The Python side packs the list into an
``int64`` table (one row per operand: param, grad, up to three states, extra;
one column per tensor) plus the sizes, and the kernel splits the concatenated
element space evenly into one contiguous part per thread: a big tensor is cut
between the threads, many small ones are shared out whole.  The table holds
the *addresses of the array objects* (``id(a)``): building it is
``np.fromiter(map(id, arrays))``, about 60 ns per tensor, where ``a.ctypes.data``
costs about 2.5 us per tensor (1000 tiny tensors: 0.06 ms instead of 2.6 ms
per list).  The kernel reads each array's data pointer out of the
``PyArrayObject`` (its ``data`` field, at an offset found and checked once at
import by probing a known array); where the probe fails the table holds
``a.ctypes.data`` instead.  Nothing is cached between steps, so there is
nothing to invalidate: the optimizer's lists are re-read every call.

Types
-----
Kernels are dtype-pure: every scalar reaches the kernel in an array of the
params' dtype (``_scalars``), cast on the host from the double-precision
values of ``fastopt._rules``, and the bodies use no numeric literals (Numba
types ``x * 1`` with ``x`` float32 as float64).  ``tests/test_numba.py`` reads
the LLVM IR of the float32 kernels and fails on any double arithmetic.  The
reductions accumulate in float64 on purpose (``fastmath={"reassoc"}`` only,
so they vectorize but keep inf/nan semantics).

Threads
-------
Kernels release the GIL (``nogil=True``).  Numba's ``workqueue`` threading
layer aborts the process when two Python threads launch parallel kernels at
once; ``omp`` and ``tbb`` are safe.  Numba picks ``tbb``, then ``omp``, then
``workqueue`` (unless ``NUMBA_THREADING_LAYER`` says otherwise), so the first
launch is made under a lock and if the layer it settled on is ``workqueue``
every later launch takes the lock too (Python threads then step one at a
time); with ``omp``/``tbb`` no lock is taken.  Note that GNU OpenMP is not
fork-safe: a process forked after a step must not step with this backend.

Compilation and caching
-----------------------
Kernels compile lazily, per (rule, dtype), on first use.  They are cached on
disk (``cache=True``, Numba's ``__pycache__`` next to this file or its
user-wide cache directory) unless ``FASTOPT_NUMBA_CACHE=0``.  The known
``parallel=True`` + ``cache=True`` problems were checked against this layout:
a cached *non*-parallel function calling a parallel one segfaults when loaded
(numba#8578): every cached entry point here is itself the parallel function and
calls no other parallel function; a cache written with another
``NUMBA_NUM_THREADS`` crashed (numba#7518, fixed in 0.55 by numba#7625; the
thread count is read at run time here); factory-made closures over jitted
functions get a new cache key every process (numba#6264) so the entry points
are plain module-level functions that name their body as a global; the cache
is invalidated by this file's timestamp only, so every body lives in this
file.  Left open: several processes compiling the same kernel into an empty
cache at the same moment (numba#4807) -- warm the cache once (``warmup()``)
before starting many workers, or set ``FASTOPT_NUMBA_CACHE=0``.
"""

from __future__ import annotations

import ctypes
import math
import os
import threading

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from .._backend import Ops, register_kernel
from .._rules import RULES

BACKEND = "numba"

CACHE = os.environ.get("FASTOPT_NUMBA_CACHE", "1") != "0"

#: Below this many elements per thread a call runs on one thread: waking the
#: pool costs more than the loop (~5 us against ~1 ns per element).
MIN_PER_THREAD = 32768

# only prange is parallelized: array expressions (np.zeros, ...) stay serial loops,
# which also keeps the compile time down (each parfor is a gufunc compiled apart)
_PARALLEL = dict(prange=True, comprehension=False, setitem=False, reduction=False, numpy=False,
                 stencil=False, fusion=False, inplace_binop=False)
_JIT = dict(parallel=_PARALLEL, nogil=True, cache=CACHE)
_JIT_SUM = dict(_JIT, fastmath={"reassoc"})

# rows of the operand table
_P, _G, _S0, _S1, _S2, _E = range(6)
_ROWS = 6
# the pipeline scalars at the head of every scalar array (SPEC section 4)
_GINV, _GCLIP, _WCLIP, _EINV, _ZERO = range(5)
_HEAD = 5
_NSCALARS = 16  # head + the rule's scalars, zero padded
_NFLAGS = 2


# ------------------------------------------------------------------ raw memory


@intrinsic
def _load_i64(typingctx, addr):
    """The int64 stored at address ``addr``."""

    def codegen(context, builder, sig, args):
        return builder.load(builder.inttoptr(args[0], ir.PointerType(ir.IntType(64))))

    return types.int64(types.int64), codegen


@intrinsic
def _as_ptr(typingctx, addr, like):
    """Address ``addr`` as a pointer to the scalar type of ``like``."""
    ptrty = types.CPointer(like)

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(ptrty))

    return ptrty(types.int64, like), codegen


def _probe_data_offset() -> int:
    """Byte offset of the data pointer inside a ``PyArrayObject``, or -1 if not found.

    ``PyArrayObject_fields`` is ``{PyObject_HEAD; char *data; ...}``; the head's
    size depends on the CPython build (16 bytes normally, more when
    free-threaded), so look for the pointer and check it on several arrays.
    """
    probes = [np.empty(n) for n in (3, 5, 11)]
    for off in range(8, 72, 8):
        if all(ctypes.c_int64.from_address(id(a) + off).value == a.ctypes.data for a in probes):
            return off
    return -1


DATA_OFFSET = _probe_data_offset()


def _ids(arrays, n):
    if DATA_OFFSET >= 0:
        return np.fromiter(map(id, arrays), np.int64, n)
    return np.fromiter((a.ctypes.data for a in arrays), np.int64, n)


# ------------------------------------------------------------------ shared drivers


@njit(inline="always")
def _pointers(tab, deref):
    """Data pointers from the operand table (object addresses when ``deref >= 0``)."""
    if deref < 0:
        return tab
    out = np.zeros_like(tab)
    for r in range(tab.shape[0]):
        for t in range(tab.shape[1]):
            if tab[r, t] != 0:
                out[r, t] = _load_i64(tab[r, t] + deref)
    return out


@njit(inline="always")
def _setup(tab, sizes, deref, threads):
    """Data pointers, prefix offsets, total size and the number of parts (threads)."""
    n = sizes.shape[0]
    off = np.zeros(n + 1, np.int64)
    for t in range(n):
        off[t + 1] = off[t] + sizes[t]
    total = off[n]
    # the thread count comes from the host: numba.get_num_threads() inside a kernel
    # goes through a ctypes pointer, which makes the kernel uncacheable
    parts = min(threads, max(1, total // MIN_PER_THREAD))
    return _pointers(tab, deref), off, total, parts


@njit(inline="always")
def _clip(x, c):
    # nan stays nan (as np.clip); c = inf is no clip
    if x > c:
        return c
    if x < -c:
        return -c
    return x


@njit(inline="always")
def _range(k, parts, off, total, t):
    """The elements ``[a, b)`` of tensor ``t`` that part ``k`` covers.

    Part ``k`` of ``parts`` covers ``[total*k/parts, total*(k+1)/parts)`` of the
    concatenated tensors.
    """
    lo = total * k // parts
    hi = total * (k + 1) // parts
    return max(lo, off[t]) - off[t], min(hi, off[t + 1]) - off[t]


@njit(inline="always")
def _views(ptr, t, n, z):
    """Tensor ``t``'s operands as arrays of ``n`` elements of ``z``'s type."""
    return (numba.carray(_as_ptr(ptr[_P, t], z), n), numba.carray(_as_ptr(ptr[_G, t], z), n),
            numba.carray(_as_ptr(ptr[_S0, t], z), n), numba.carray(_as_ptr(ptr[_S1, t], z), n),
            numba.carray(_as_ptr(ptr[_S2, t], z), n), numba.carray(_as_ptr(ptr[_E, t], z), n))


# Tuples cannot enter a parallel region (they would be gufunc arguments), so each
# part builds its scalar and flag tuples from the arrays.
@njit(inline="always")
def _scalar_tuple(cs):
    return (cs[0], cs[1], cs[2], cs[3], cs[4], cs[5], cs[6], cs[7],
            cs[8], cs[9], cs[10], cs[11], cs[12], cs[13], cs[14], cs[15])


@njit(inline="always")
def _flag_tuple(fs):
    return (fs[0] != 0, fs[1] != 0)


@njit(inline="always")
def _tensors(k, parts, off, total):
    """The first tensor of part ``k`` and the end of the part."""
    lo = total * k // parts
    return np.searchsorted(off, lo, side="right") - 1, total * (k + 1) // parts


@njit(inline="always")
def _apply(body, mode, k, parts, ptr, off, total, scales, cs, fs):
    """Part ``k`` of the update pass: SPEC section 4 steps 1, 3-8 around ``body``.

    ``mode`` is a constant of the calling entry point (the variants that change
    which arrays are touched); it folds away, so each loop is branch-free.
    """
    n = off.shape[0] - 1
    t, hi = _tensors(k, parts, off, total)
    while t < n and off[t] < hi:
        a, b = _range(k, parts, off, total, t)
        p, g, s0, s1, s2, e = _views(ptr, t, off[t + 1] - off[t], cs[0])
        c = _scalar_tuple(cs)
        f = _flag_tuple(fs)
        ts = scales[t]
        # unsigned indices: a signed one costs a negative-index wraparound per
        # access, which keeps LLVM from vectorizing the loop
        for i in range(np.uint64(a), np.uint64(b)):
            x = _clip(g[i] * c[_GINV], c[_GCLIP]) * ts
            p[i] = _clip(body(i, x, p[i], s0, s1, s2, e, c, f, ts, mode), c[_WCLIP])
        t += 1


@njit(inline="always")
def _reduce(body, mode, k, parts, ptr, off, total, scales, cs, fs, acc):
    """Part ``k`` of a read pass: ``acc[k, t]`` = the float64 sums of the pair ``body`` returns.

    ``body`` gets the *unclipped* scaled grad ``g * c[_GINV]`` and finishes the
    pipeline itself where it needs to (``_grad``).
    """
    n = off.shape[0] - 1
    t, hi = _tensors(k, parts, off, total)
    while t < n and off[t] < hi:
        a, b = _range(k, parts, off, total, t)
        p, g, s0, s1, s2, e = _views(ptr, t, off[t + 1] - off[t], cs[0])
        c = _scalar_tuple(cs)
        f = _flag_tuple(fs)
        ts = scales[t]
        u = 0.0
        w = 0.0
        for i in range(np.uint64(a), np.uint64(b)):
            du, dw = body(i, g[i] * c[_GINV], p[i], s0, s1, s2, e, c, f, ts, mode)
            u += du
            w += dw
        acc[k, t, 0] = u
        acc[k, t, 1] = w
        t += 1


@njit(inline="always")
def _grad(x, c, ts):
    """Steps 4-6 on an unscaled grad, as ``_apply`` does them."""
    return _clip(x, c[_GCLIP]) * ts


# ------------------------------------------------------------------ rule bodies
# body(i, g, p, s0, s1, s2, e, c, f, ts, mode) -> new p.  g is the grad after the
# pipeline, p the param; s0..s2 are the rule's states in the order of
# Rule.all_state; c[_HEAD:] are the rule's scalars and f its runtime flags in the
# order _PACK lists them; mode is the entry point's constant.  Each expression
# keeps the reference's order of operations.  Weight decay is always applied
# (wd = 0 adds +-0): a flag would only be one more branch.


@njit(inline="always")
def _sgd(i, g, p, buf, s1, s2, e, c, f, ts, mode):  # 8 B/elem (+8 with momentum)
    lr, wd, mu, keep, gain = c[5], c[6], c[7], c[8], c[9]
    g = g + wd * p
    if mode:  # momentum; at t=1 keep=0, gain=1 make b = g
        b = keep * buf[i] + gain * g
        buf[i] = b
        g = g + mu * b if f[0] else b  # f[0]: nesterov
    return p - lr * g


@njit(inline="always")
def _adam(i, g, p, m, v, vmax, e, c, f, ts, mode):  # 28 B/elem (+8 with amsgrad)
    b1, b1c, b2, b2c, eps, wd, step_size, bc2_sqrt, decay = (c[5], c[6], c[7], c[8], c[9],
                                                             c[10], c[11], c[12], c[13])
    p = p * decay      # AdamW's decoupled decay (decay = 1 for Adam)
    g = g + wd * p     # Adam's L2 decay (wd = 0 for AdamW)
    mi = b1 * m[i] + b1c * g
    vi = b2 * v[i] + b2c * g * g
    m[i] = mi
    v[i] = vi
    if mode:  # amsgrad
        vi = max(vmax[i], vi)
        vmax[i] = vi
    # sqrt(v / bc2) as sqrt(v) / sqrt(bc2), as torch.optim.Adam and the reference
    return p - step_size * mi / (np.sqrt(vi) / bc2_sqrt + eps)


@njit(inline="always")
def _adagrad(i, g, p, acc, s1, s2, e, c, f, ts, mode):  # 20 B/elem
    clr, eps, wd = c[5], c[6], c[7]
    g = g + wd * p
    a = acc[i] + g * g
    acc[i] = a
    return p - clr * g / (np.sqrt(a) + eps)


@njit(inline="always")
def _rmsprop(i, g, p, sq, buf, gavg, e, c, f, ts, mode):  # 20 B/elem (+8 momentum, +8 centered)
    lr, alpha, alpha1, eps, wd, mu = c[5], c[6], c[7], c[8], c[9], c[10]
    g = g + wd * p
    v = alpha * sq[i] + alpha1 * g * g
    sq[i] = v
    if mode & 2:  # centered
        a = alpha * gavg[i] + alpha1 * g
        gavg[i] = a
        d = np.sqrt(v - a * a) + eps
    else:
        d = np.sqrt(v) + eps
    if mode & 1:  # momentum
        b = mu * buf[i] + g / d
        buf[i] = b
        return p - lr * b
    return p - lr * g / d


@njit(inline="always")
def _adadelta(i, g, p, sq, acc, s2, e, c, f, ts, mode):  # 28 B/elem
    lr, rho, rho1, eps, wd = c[5], c[6], c[7], c[8], c[9]
    g = g + wd * p
    v = rho * sq[i] + rho1 * g * g
    sq[i] = v
    u = acc[i]
    delta = np.sqrt(u + eps) / np.sqrt(v + eps) * g
    acc[i] = rho * u + rho1 * delta * delta
    return p - lr * delta


@njit(inline="always")
def _adamax(i, g, p, m, u, s2, e, c, f, ts, mode):  # 28 B/elem
    b1, b1c, b2, eps, wd, clr = c[5], c[6], c[7], c[8], c[9], c[10]
    g = g + wd * p
    mi = b1 * m[i] + b1c * g
    m[i] = mi
    ui = max(b2 * u[i], abs(g) + eps)
    u[i] = ui
    return p - clr * mi / ui


@njit(inline="always")
def _nadam(i, g, p, m, v, s2, e, c, f, ts, mode):  # 28 B/elem
    b1, b1c, b2, b2c, eps, wd, bc2_sqrt, c_grad, c_avg = (c[5], c[6], c[7], c[8], c[9],
                                                          c[10], c[11], c[12], c[13])
    g = g + wd * p
    mi = b1 * m[i] + b1c * g
    vi = b2 * v[i] + b2c * g * g
    m[i] = mi
    v[i] = vi
    denom = np.sqrt(vi) / bc2_sqrt + eps
    p = p - c_grad * g / denom
    return p - c_avg * mi / denom


@njit(inline="always")
def _radam(i, g, p, m, v, s2, e, c, f, ts, mode):  # 28 B/elem
    b1, b1c, b2, b2c, eps, wd, step_size = c[5], c[6], c[7], c[8], c[9], c[10], c[11]
    g = g + wd * p
    mi = b1 * m[i] + b1c * g
    vi = b2 * v[i] + b2c * g * g
    m[i] = mi
    v[i] = vi
    if f[0]:  # rectified (rho_t > 5)
        return p - step_size * mi / (np.sqrt(vi) + eps)
    return p - step_size * mi


@njit(inline="always")
def _lion(i, g, p, m, s1, s2, e, c, f, ts, mode):  # 20 B/elem
    lr, b1, b1c, b2, b2c, decay = c[5], c[6], c[7], c[8], c[9], c[10]
    mi = m[i]
    u = b1 * mi + b1c * g
    # lr * sign(u): sign(0) = 0 and sign(nan) = nan, as np.sign
    step = lr if u > c[_ZERO] else (-lr if u < c[_ZERO] else lr * u)
    m[i] = b2 * mi + b2c * g
    return p * decay - step


@njit(inline="always")
def _adahessian(i, g, p, m, v, s2, e, c, f, ts, mode):  # 32 B/elem: + the Hessian diagonal
    b1, b1c, b2, b2c, eps, wd, step_size, bc2_sqrt, k = (c[5], c[6], c[7], c[8], c[9],
                                                         c[10], c[11], c[12], c[13])
    g = g + wd * p
    d = e[i] * c[_EINV]
    mi = b1 * m[i] + b1c * g
    vi = b2 * v[i] + b2c * d * d
    m[i] = mi
    v[i] = vi
    return p - step_size * mi / ((np.sqrt(vi) / bc2_sqrt) ** k + eps)


@njit(inline="always")
def _lamb_r(p, mi, vi, c):
    """LAMB's direction r = m_hat / (sqrt(v_hat) + eps) + wd * p."""
    eps, wd, bc1, bc2_sqrt = c[9], c[10], c[11], c[12]
    return (mi / bc1) / (np.sqrt(vi) / bc2_sqrt + eps) + wd * p


@njit(inline="always")
def _lamb_moments(i, u, p, m, v, s2, e, c, f, ts, mode):  # pass 1, 28 B/elem: (p^2, r^2)
    b1, b1c, b2, b2c = c[5], c[6], c[7], c[8]
    g = _grad(u, c, ts)
    mi = b1 * m[i] + b1c * g
    vi = b2 * v[i] + b2c * g * g
    m[i] = mi
    v[i] = vi
    r = np.float64(_lamb_r(p, mi, vi, c))
    pd = np.float64(p)
    return pd * pd, r * r


@njit(inline="always")
def _lamb_step(i, g, p, m, v, s2, e, c, f, ts, mode):  # pass 2, 16 B/elem; ts = lr * trust
    return p - ts * _lamb_r(p, m[i], v[i], c)


@njit(inline="always")
def _stats(i, u, p, s0, s1, s2, e, c, f, ts, mode):  # 4 B/elem
    """The square of the clipped grad in float64, and u * 0: 0 if u is finite, else nan."""
    x = np.float64(_clip(u, c[_GCLIP]))
    return x * x, np.float64(u) * 0.0


@njit(inline="always")
def _sumsq(i, u, p, s0, s1, s2, e, c, f, ts, mode):  # 4 B/elem
    """The square of the unclipped grad in float64 only: one accumulator, half the work of
    ``_stats``.  An inf or nan in ``u`` makes the sum inf or nan, so this also serves as the
    non-finite check when no clip_value hides one (the caller re-checks exactly on a
    non-finite sum, since a finite float64 beyond 1e154 overflows when squared)."""
    x = np.float64(u)
    return x * x, 0.0


@njit(inline="always")
def _scale(i, g, p, s0, s1, s2, e, c, f, ts, mode):  # 8 B/elem (ts: the factor)
    return p * ts


@njit(inline="always")
def _identity(i, g, p, s0, s1, s2, e, c, f, ts, mode):  # 8 B/elem (clip_: _apply clips)
    return p


# ------------------------------------------------------------------ entry points
# One parallel entry point per (body, mode): a template instantiation, five
# lines each.  They cannot be made by a factory: a closure over a jitted body
# gets a new cache key in every process (numba#6264), and a cached function must
# itself be the parallel one (numba#8578).  The mode must be a constant inside
# the prange loop to fold away, hence one entry per mode.


@njit(**_JIT)
def _k_sgd(tab, sizes, scales, cs, fs, deref, threads):
    ptr, off, total, parts = _setup(tab, sizes, deref, threads)
    for k in prange(parts):
        _apply(_sgd, 0, k, parts, ptr, off, total, scales, cs, fs)


@njit(**_JIT)
def _k_sgd_momentum(tab, sizes, scales, cs, fs, deref, threads):
    ptr, off, total, parts = _setup(tab, sizes, deref, threads)
    for k in prange(parts):
        _apply(_sgd, 1, k, parts, ptr, off, total, scales, cs, fs)


@njit(**_JIT)
def _k_adam(tab, sizes, scales, cs, fs, deref, threads):
    ptr, off, total, parts = _setup(tab, sizes, deref, threads)
    for k in prange(parts):
        _apply(_adam, 0, k, parts, ptr, off, total, scales, cs, fs)


@njit(**_JIT)
def _k_adam_amsgrad(tab, sizes, scales, cs, fs, deref, threads):
    ptr, off, total, parts = _setup(tab, sizes, deref, threads)
    for k in prange(parts):
        _apply(_adam, 1, k, parts, ptr, off, total, scales, cs, fs)


@njit(**_JIT)
def _k_adagrad(tab, sizes, scales, cs, fs, deref, threads):
    ptr, off, total, parts = _setup(tab, sizes, deref, threads)
    for k in prange(parts):
        _apply(_adagrad, 0, k, parts, ptr, off, total, scales, cs, fs)


@njit(**_JIT)
def _k_rmsprop(tab, sizes, scales, cs, fs, deref, threads):
    ptr, off, total, parts = _setup(tab, sizes, deref, threads)
    for k in prange(parts):
        _apply(_rmsprop, 0, k, parts, ptr, off, total, scales, cs, fs)


@njit(**_JIT)
def _k_rmsprop_momentum(tab, sizes, scales, cs, fs, deref, threads):
    ptr, off, total, parts = _setup(tab, sizes, deref, threads)
    for k in prange(parts):
        _apply(_rmsprop, 1, k, parts, ptr, off, total, scales, cs, fs)


@njit(**_JIT)
def _k_rmsprop_centered(tab, sizes, scales, cs, fs, deref, threads):
    ptr, off, total, parts = _setup(tab, sizes, deref, threads)
    for k in prange(parts):
        _apply(_rmsprop, 2, k, parts, ptr, off, total, scales, cs, fs)


@njit(**_JIT)
def _k_rmsprop_centered_momentum(tab, sizes, scales, cs, fs, deref, threads):
    ptr, off, total, parts = _setup(tab, sizes, deref, threads)
    for k in prange(parts):
        _apply(_rmsprop, 3, k, parts, ptr, off, total, scales, cs, fs)


@njit(**_JIT)
def _k_adadelta(tab, sizes, scales, cs, fs, deref, threads):
    ptr, off, total, parts = _setup(tab, sizes, deref, threads)
    for k in prange(parts):
        _apply(_adadelta, 0, k, parts, ptr, off, total, scales, cs, fs)


@njit(**_JIT)
def _k_adamax(tab, sizes, scales, cs, fs, deref, threads):
    ptr, off, total, parts = _setup(tab, sizes, deref, threads)
    for k in prange(parts):
        _apply(_adamax, 0, k, parts, ptr, off, total, scales, cs, fs)


@njit(**_JIT)
def _k_nadam(tab, sizes, scales, cs, fs, deref, threads):
    ptr, off, total, parts = _setup(tab, sizes, deref, threads)
    for k in prange(parts):
        _apply(_nadam, 0, k, parts, ptr, off, total, scales, cs, fs)


@njit(**_JIT)
def _k_radam(tab, sizes, scales, cs, fs, deref, threads):
    ptr, off, total, parts = _setup(tab, sizes, deref, threads)
    for k in prange(parts):
        _apply(_radam, 0, k, parts, ptr, off, total, scales, cs, fs)


@njit(**_JIT)
def _k_lion(tab, sizes, scales, cs, fs, deref, threads):
    ptr, off, total, parts = _setup(tab, sizes, deref, threads)
    for k in prange(parts):
        _apply(_lion, 0, k, parts, ptr, off, total, scales, cs, fs)


@njit(**_JIT)
def _k_adahessian(tab, sizes, scales, cs, fs, deref, threads):
    ptr, off, total, parts = _setup(tab, sizes, deref, threads)
    for k in prange(parts):
        _apply(_adahessian, 0, k, parts, ptr, off, total, scales, cs, fs)


@njit(**_JIT_SUM)
def _k_lamb(tab, sizes, scales, cs, fs, deref, threads, lr):
    """LAMB: pass 1 updates the moments and sums p^2 and r^2 per tensor, pass 2 steps."""
    ptr, off, total, parts = _setup(tab, sizes, deref, threads)
    acc = np.zeros((parts, sizes.shape[0], 2))
    for k in prange(parts):
        _reduce(_lamb_moments, 0, k, parts, ptr, off, total, scales, cs, fs, acc)
    coef = np.empty_like(scales)
    for t in range(sizes.shape[0]):
        pn = math.sqrt(acc[:, t, 0].sum())
        rn = math.sqrt(acc[:, t, 1].sum())
        trust = pn / rn if pn > 0.0 and rn > 0.0 else 1.0
        coef[t] = lr * trust  # one rounding to the dtype per tensor
    for k in prange(parts):
        _apply(_lamb_step, 0, k, parts, ptr, off, total, coef, cs, fs)


@njit(**_JIT_SUM)
def _k_stats(tab, sizes, scales, cs, fs, deref, threads):
    ptr, off, total, parts = _setup(tab, sizes, deref, threads)
    acc = np.zeros((parts, sizes.shape[0], 2))
    for k in prange(parts):
        _reduce(_stats, 0, k, parts, ptr, off, total, scales, cs, fs, acc)
    return acc.sum(axis=0)


@njit(**_JIT_SUM)
def _k_sumsq(tab, sizes, scales, cs, fs, deref, threads):
    ptr, off, total, parts = _setup(tab, sizes, deref, threads)
    acc = np.zeros((parts, sizes.shape[0], 2))
    for k in prange(parts):
        _reduce(_sumsq, 0, k, parts, ptr, off, total, scales, cs, fs, acc)
    return acc.sum(axis=0)


@njit(**_JIT)
def _k_scale(tab, sizes, scales, cs, fs, deref, threads):
    ptr, off, total, parts = _setup(tab, sizes, deref, threads)
    for k in prange(parts):
        _apply(_scale, 0, k, parts, ptr, off, total, scales, cs, fs)


@njit(**_JIT)
def _k_clip(tab, sizes, scales, cs, fs, deref, threads):
    ptr, off, total, parts = _setup(tab, sizes, deref, threads)
    for k in prange(parts):
        _apply(_identity, 0, k, parts, ptr, off, total, scales, cs, fs)


@njit(nogil=True, cache=CACHE)
def _k_newton(tab, sizes, cs, deref, lr, damping):
    """Newton: per tensor, ``p -= lr * solve(H + damping*I, g)`` through LAPACK ``?gesv``.

    Serial: SPEC section 5 calls these small problems (n*n Hessians); one
    tensor is one LAPACK call (np.linalg.solve inside njit, as the reference
    does it, so both factorize the same way).  ``cs[_HEAD]`` is this tensor's
    norm-clip scale.
    """
    ptr = _pointers(tab, deref)
    z = cs[0]
    for t in range(sizes.shape[0]):
        n = sizes[t]
        p = numba.carray(_as_ptr(ptr[_P, t], z), n)
        g = numba.carray(_as_ptr(ptr[_G, t], z), n)
        h = numba.carray(_as_ptr(ptr[_E, t], z), (n, n))
        x = np.empty_like(p)
        for i in range(n):
            x[i] = _clip(g[i] * cs[_GINV], cs[_GCLIP]) * cs[_HEAD]
        a = h * cs[_EINV]
        for i in range(n):
            a[i, i] += damping
        d = np.linalg.solve(a, x)
        for i in range(n):
            p[i] = _clip(p[i] - lr * d[i], cs[_WCLIP])


# ------------------------------------------------------------------ host side

_LOCK = threading.Lock()
_serialize = True  # until the first launch tells which threading layer Numba chose


def _launch(fn, *args):
    """Call a parallel kernel; serialized only under the thread-unsafe workqueue layer."""
    global _serialize
    if not _serialize:
        return fn(*args, numba.get_num_threads())
    with _LOCK:
        out = fn(*args, numba.get_num_threads())
        try:
            _serialize = numba.threading_layer() == "workqueue"
        except ValueError:  # no parallel region has run yet (one part only)
            pass
        return out


def _head(pre):
    """The pipeline scalars of SPEC section 4 (cast to the dtype by ``_scalars``)."""
    inv = 1.0 if pre.inv_scale is None else pre.inv_scale
    ginv = -inv if pre.maximize else inv  # -(g*s) == g*(-s) exactly
    gclip = math.inf if pre.clip_value is None else pre.clip_value
    wclip = math.inf if pre.weight_clip is None else pre.weight_clip
    return [ginv, gclip, wclip, inv, 0.0]


def _adam_pack(s, decoupled):
    return [s["beta1"], 1 - s["beta1"], s["beta2"], 1 - s["beta2"], s["eps"],
            0.0 if decoupled else s["weight_decay"], s["step_size"], s["bc2_sqrt"],
            s["decay"] if decoupled else 1.0]


def _sgd_pack(s):
    first = s["first_step"]
    return [s["lr"], s["weight_decay"], s["momentum"], 0.0 if first else s["momentum"],
            1.0 if first else 1 - s["dampening"]]


# rule -> (entry point for the scalars s, the rule's scalars, runtime flags).  The
# scalars are Python floats computed in double (1 - beta too, as in the reference).
_PACK = {
    "sgd": (lambda s: _k_sgd_momentum if s["momentum"] != 0 else _k_sgd,
            _sgd_pack, lambda s: [s["nesterov"]]),
    "adam": (lambda s: _k_adam_amsgrad if s["amsgrad"] else _k_adam,
             lambda s: _adam_pack(s, False), lambda s: []),
    "adamw": (lambda s: _k_adam_amsgrad if s["amsgrad"] else _k_adam,
              lambda s: _adam_pack(s, True), lambda s: []),
    "adagrad": (lambda s: _k_adagrad, lambda s: [s["clr"], s["eps"], s["weight_decay"]],
                lambda s: []),
    "rmsprop": (lambda s: (_k_rmsprop, _k_rmsprop_momentum, _k_rmsprop_centered,
                           _k_rmsprop_centered_momentum)[(s["momentum"] > 0) + 2 * s["centered"]],
                lambda s: [s["lr"], s["alpha"], 1 - s["alpha"], s["eps"], s["weight_decay"],
                           s["momentum"]],
                lambda s: []),
    "adadelta": (lambda s: _k_adadelta,
                 lambda s: [s["lr"], s["rho"], 1 - s["rho"], s["eps"], s["weight_decay"]],
                 lambda s: []),
    "adamax": (lambda s: _k_adamax,
               lambda s: [s["beta1"], 1 - s["beta1"], s["beta2"], s["eps"], s["weight_decay"],
                          s["clr"]],
               lambda s: []),
    "nadam": (lambda s: _k_nadam,
              lambda s: [s["beta1"], 1 - s["beta1"], s["beta2"], 1 - s["beta2"], s["eps"],
                         s["weight_decay"], s["bc2_sqrt"], s["c_grad"], s["c_avg"]],
              lambda s: []),
    "radam": (lambda s: _k_radam,
              lambda s: [s["beta1"], 1 - s["beta1"], s["beta2"], 1 - s["beta2"], s["eps"],
                         s["weight_decay"], s["step_size"]],
              lambda s: [s["rectify"]]),
    "lion": (lambda s: _k_lion,
             lambda s: [s["lr"], s["beta1"], 1 - s["beta1"], s["beta2"], 1 - s["beta2"],
                        s["decay"]],
             lambda s: []),
    "lamb": (lambda s: _k_lamb,
             lambda s: [s["beta1"], 1 - s["beta1"], s["beta2"], 1 - s["beta2"], s["eps"],
                        s["weight_decay"], s["bc1"], s["bc2_sqrt"]],
             lambda s: []),
    "adahessian": (lambda s: _k_adahessian,
                   lambda s: [s["beta1"], 1 - s["beta1"], s["beta2"], 1 - s["beta2"], s["eps"],
                              s["weight_decay"], s["step_size"], s["bc2_sqrt"],
                              s["hessian_power"]],
                   lambda s: []),
}


def _scalars(dt, values):
    """The scalar array of a call, in the kernel's dtype (dtype-pure kernels)."""
    cs = np.zeros(_NSCALARS, dt)
    cs[:len(values)] = values
    return cs


def _flags(values):
    fs = np.zeros(_NFLAGS, np.int64)
    fs[:len(values)] = values
    return fs


def _table(rows, n):
    """The operand table: ``rows`` is a list of (row, list of arrays)."""
    tab = np.zeros((_ROWS, n), np.int64)
    for r, arrays in rows:
        tab[r] = _ids(arrays, n)
    return tab


def _sizes(arrays, n):
    return np.fromiter(map(len, arrays), np.int64, n)


def _newton_kernel(params, grads, states, s, pre, extras=None):
    n = len(params)
    dt = params[0].dtype
    tab = _table([(_P, params), (_G, grads), (_E, extras)], n)
    sizes = _sizes(params, n)
    for t in range(n):  # the norm-clip scale is per tensor: one call each
        head = _head(pre) + [1.0 if pre.scales is None else float(pre.scales[t])]
        _k_newton(np.ascontiguousarray(tab[:, t:t + 1]), sizes[t:t + 1], _scalars(dt, head),
                  DATA_OFFSET, dt.type(s["lr"]), dt.type(s["damping"]))


def _make_kernel(rule_name):
    slots = RULES[rule_name].all_state
    entry_of, pack, flags = _PACK[rule_name]
    lamb = rule_name == "lamb"

    def kernel(params, grads, states, s, pre, extras=None):
        n = len(params)
        dt = params[0].dtype
        rows = [(_P, params), (_G, grads)]
        rows += [(_S0 + k, states[name]) for k, name in enumerate(slots) if name in states]
        if extras is not None:
            rows.append((_E, extras))
        args = (_table(rows, n), _sizes(params, n),
                np.ones(n, dt) if pre.scales is None else np.asarray(pre.scales, dt),
                _scalars(dt, _head(pre) + pack(s)), _flags(flags(s)), DATA_OFFSET)
        if lamb:
            _launch(lambda *a: _k_lamb(*a, float(s["lr"])), *args)
        else:
            _launch(entry_of(s), *args)

    kernel.__name__ = f"{rule_name}_numba"
    kernel.__doc__ = f"The fused {rule_name} step (see fastopt.kernels.numba_cpu)."
    return kernel


def _by_dtype(arrays):
    """``[(dtype, positions)]``; one entry (positions None) when all share a dtype."""
    dts = {a.dtype for a in arrays}
    if len(dts) == 1:
        return [(dts.pop(), None)]
    return [(dt, [i for i, a in enumerate(arrays) if a.dtype == dt]) for dt in sorted(dts, key=str)]


class NumbaOps(Ops):
    """The pipeline primitives: one fused, multi-tensor pass each."""

    name = BACKEND
    xp = np

    def _each_dtype(self, entry, arrays, factors, head):
        arrays = list(arrays)
        out = []
        for dt, pos in _by_dtype(arrays):
            sub = arrays if pos is None else [arrays[i] for i in pos]
            n = len(sub)
            if factors is None:
                scales = np.ones(n, dt)
            else:
                f = np.asarray(factors, np.float64)
                scales = (f if pos is None else f[pos]).astype(dt)
            res = _launch(entry, _table([(_P, sub), (_G, sub)], n), _sizes(sub, n), scales,
                          _scalars(dt, head), _flags([]), DATA_OFFSET)
            out.append((pos, res))
        return out

    def _stats(self, arrays, inv, clip, entry=_k_stats):
        """(n, 2) float64: per tensor sum of clip(a*inv)^2, and nan iff some a*inv is non-finite."""
        parts = self._each_dtype(entry, arrays, None,
                                 [inv, math.inf if clip is None else clip, math.inf, 1.0, 0.0])
        if len(parts) == 1:
            return parts[0][1]
        out = np.empty((len(arrays), 2))
        for pos, res in parts:
            out[pos] = res
        return out

    def grad_stats(self, grads, extras, *, inv_scale, clip_value, need_sumsq, check_finite):
        inv = 1.0 if inv_scale is None else inv_scale
        if clip_value is None:
            # fast path: one float64 accumulator; a non-finite sum is re-checked exactly below
            res = self._stats(grads, inv, None, _k_sumsq)
            if np.isfinite(res[:, 0].sum()):
                res[:, 1] = 0.0
                check_finite = check_finite and extras is not None
            else:
                res = self._stats(grads, inv, None)
        else:
            res = self._stats(grads, inv, clip_value)
        finite = True
        if check_finite:
            finite = not np.isnan(res[:, 1].sum())
            if finite and extras is not None:
                # the extra inputs (Hessians) are unscaled too: check them as the kernels see them
                finite = not np.isnan(self._stats(extras, inv, None)[:, 1].sum())
        return (np.ascontiguousarray(res[:, 0]) if need_sumsq else None), finite

    def sumsq(self, arrays):
        return np.ascontiguousarray(self._stats(arrays, 1.0, None)[:, 0])

    def scale_(self, arrays, factors):
        self._each_dtype(_k_scale, arrays, factors, [1.0, math.inf, math.inf, 1.0, 0.0])

    def clip_(self, arrays, c):
        self._each_dtype(_k_clip, arrays, None, [1.0, math.inf, float(c), 1.0, 0.0])


OPS = NumbaOps()

for _name in RULES:
    register_kernel(_name, BACKEND, _newton_kernel if _name == "newton" else _make_kernel(_name))
del _name


def warmup(dtypes=("float32", "float64"), rules=None, variants=True):
    """Compile (or load from the cache) the kernels for ``dtypes``; returns the seconds taken.

    ``rules``: the rule names (default all); ``variants``: also the amsgrad,
    momentum and centered variants.  Run it once before starting many
    processes that share a cold cache (numba#4807).
    """
    import time

    from .._backend import Pre, get_kernel

    options = {"sgd": [{}, {"momentum": 0.9}], "adam": [{}, {"amsgrad": True}],
               "rmsprop": [{}, {"momentum": 0.9}, {"centered": True},
                           {"momentum": 0.9, "centered": True}]}
    t0 = time.perf_counter()
    for dt in map(np.dtype, dtypes):
        for name in rules or RULES:
            rule = RULES[name]
            for opt in (options.get(name, [{}]) if variants else [{}]):
                hp = {**rule.defaults, **opt}
                states = {k: [np.zeros(3, dt)] for k, _ in rule.state(hp)}
                extras = None
                if name == "newton":
                    extras = [np.eye(3, dtype=dt).reshape(-1)]
                elif rule.extra is not None:
                    extras = [np.zeros(3, dt)]
                s, _ = rule.scalars(hp, 1, dict(rule.group_state))
                get_kernel(name, BACKEND)([np.zeros(3, dt)], [np.zeros(3, dt)], states, s, Pre(),
                                          extras)
        for clip in (None, 1.0):  # the one-accumulator fast path and the exact pass
            OPS.grad_stats([np.zeros(3, dt)], None, inv_scale=None, clip_value=clip, need_sumsq=True,
                           check_finite=True)
        OPS.scale_([np.zeros(3, dt)], np.ones(1))
        OPS.clip_([np.zeros(3, dt)], 1.0)
    return time.perf_counter() - t0
