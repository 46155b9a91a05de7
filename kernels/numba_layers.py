"""The Numba CPU kernels of the layers (BatchNorm, Dropout): fused and multi-threaded.

Same interface and same math as ``kernels/reference_layers.py`` (the definition
of correct); ``fastopt.layers`` validates and reshapes before calling here, so
the kernels assume C-contiguous arrays of one float dtype and never raise.

Self-contained on purpose: every ``@njit`` function these kernels call is
defined in this file.  Numba's on-disk cache (``cache=True``) keys an entry on
the timestamp of the file that *defines* the function only, so a kernel
calling a helper from another module would keep running the stale helper from
its cache after that module changed.

BatchNorm (``x`` as ``(N, C, S)``)
    Reductions split the batch axis into a fixed number of row blocks (a
    function of N only, never of the thread count), one float64 partial per
    (block, channel), then add the blocks in block order: the result is
    deterministic and the same for every ``NUMBA_NUM_THREADS``.  Loops run n,
    c, s, so memory is read in order for both (N, C) and (N, C, H, W).
    Forward: 3 reads + 1 write of the batch (mean, variance, apply); backward:
    4 reads + 1 write (the two sums, then dx).
Dropout
    ``random_bits(seed, step, i)`` of ``fastopt.precision`` transcribed with
    u64 arithmetic: the step key is computed on the host once per call, each
    element costs one SplitMix64 finaliser.  Bytes per element: 1 read + 1 write.
"""

from __future__ import annotations

import os

import numpy as np
from numba import njit, prange

from ..precision import step_key

BACKEND = "numba"

CACHE = os.environ.get("FASTOPT_NUMBA_CACHE", "1") != "0"
_JIT = dict(parallel=True, nogil=True, cache=CACHE)

#: at most this many row blocks per reduction (partials: blocks * C float64)
MAX_BLOCKS = 64
#: elements per parallel chunk of the element-wise passes
CHUNK = 1 << 16

_G = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)
_S32 = np.uint64(32)


def _blocks(n: int) -> int:
    return max(1, min(n, MAX_BLOCKS))


# ------------------------------------------------------------------ BatchNorm


@njit(**_JIT)
def _k_sum(x3, centre, nblocks):
    """Per-channel float64 sums of ``x`` (``centre`` None) or of ``(x - centre)**2``."""
    n, c, s = x3.shape
    part = np.zeros((nblocks, c), dtype=np.float64)
    for b in prange(nblocks):
        lo = b * n // nblocks
        hi = (b + 1) * n // nblocks
        acc = part[b]
        for i in range(lo, hi):
            for j in range(c):
                t = 0.0
                if centre is None:
                    for k in range(s):
                        t += np.float64(x3[i, j, k])
                else:
                    m = centre[j]
                    for k in range(s):
                        d = np.float64(x3[i, j, k]) - m
                        t += d * d
                acc[j] += t
    out = np.zeros(c, dtype=np.float64)
    for b in range(nblocks):  # fixed order: deterministic
        for j in range(c):
            out[j] += part[b, j]
    return out


def bn_moments(x3):
    """Per-channel ``(mean, biased variance)``, float64, two-pass (see the reference)."""
    n, c, s = x3.shape
    m = n * s
    nb = _blocks(n)
    mean = _k_sum(x3, None, nb) / m
    var = _k_sum(x3, mean, nb) / m
    return mean, var


@njit(**_JIT)
def _k_apply(x3, mean, scale, beta, out):
    n, c, s = x3.shape
    for i in prange(n):
        for j in range(c):
            m = mean[j]
            sc = scale[j]
            be = beta[j]
            for k in range(s):
                out[i, j, k] = (np.float64(x3[i, j, k]) - m) * sc + be


def bn_apply(x3, mean, scale, beta, out):
    """``out = (x - mean) * scale + beta`` per channel (float64 math, one rounding)."""
    _k_apply(x3, mean, scale, beta, out)


@njit(**_JIT)
def _k_backward_sums(x3, dy3, mean, invstd, nblocks):
    n, c, s = x3.shape
    part = np.zeros((2, nblocks, c), dtype=np.float64)
    for b in prange(nblocks):
        lo = b * n // nblocks
        hi = (b + 1) * n // nblocks
        for i in range(lo, hi):
            for j in range(c):
                m = mean[j]
                r = invstd[j]
                t0 = 0.0
                t1 = 0.0
                for k in range(s):
                    g = np.float64(dy3[i, j, k])
                    t0 += g
                    t1 += g * ((np.float64(x3[i, j, k]) - m) * r)
                part[0, b, j] += t0
                part[1, b, j] += t1
    sdy = np.zeros(c, dtype=np.float64)
    sdyx = np.zeros(c, dtype=np.float64)
    for b in range(nblocks):
        for j in range(c):
            sdy[j] += part[0, b, j]
            sdyx[j] += part[1, b, j]
    return sdy, sdyx


def bn_backward_sums(x3, dy3, mean, invstd):
    """Per-channel ``(sum dy, sum dy * xhat)``, float64."""
    return _k_backward_sums(x3, dy3, mean, invstd, _blocks(x3.shape[0]))


@njit(**_JIT)
def _k_backward_dx(x3, dy3, mean, invstd, kk, a, b, out):
    n, c, s = x3.shape
    for i in prange(n):
        for j in range(c):
            m = mean[j]
            r = invstd[j]
            kj = kk[j]
            aj = a[j]
            bj = b[j]
            for k in range(s):
                xhat = (np.float64(x3[i, j, k]) - m) * r
                out[i, j, k] = kj * (np.float64(dy3[i, j, k]) - aj - xhat * bj)


def bn_backward_dx(x3, dy3, mean, invstd, k, a, b, out):
    """``out = k * (dy - a - xhat * b)`` per channel (float64 math, one rounding)."""
    _k_backward_dx(x3, dy3, mean, invstd, k, a, b, out)


# ------------------------------------------------------------------ Dropout


@njit(inline="always")
def _bits(key, i):
    """``random_bits`` for element ``i`` given the step key (every operand u64)."""
    z = key + np.uint64(i) * _G
    z = z ^ (z >> _S30)
    z = z * _M1
    z = z ^ (z >> _S27)
    z = z * _M2
    z = z ^ (z >> _S31)
    return z >> _S32


@njit(**_JIT)
def _k_dropout(x, key, threshold, scale, out, chunk):
    n = x.size
    nchunks = (n + chunk - 1) // chunk
    for b in prange(nchunks):
        lo = b * chunk
        hi = min(n, lo + chunk)
        for i in range(lo, hi):
            if _bits(key, i) >= threshold:
                out[i] = x[i] * scale
            else:
                out[i] = 0


def dropout_apply(x, seed, step, threshold, scale, out):
    """``out = x * scale`` where ``random_bits(seed, step, i) >= threshold``, else 0."""
    if x.size == 0:
        return
    _k_dropout(x, np.uint64(step_key(seed, step)), np.uint64(threshold), scale, out, CHUNK)
