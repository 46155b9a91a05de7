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
    c, s, so memory is read in order for both (N, C) and (N, C, H, W); (N, C)
    inputs (S = 1) have their own 2-D kernels whose innermost loop runs over the
    channels and vectorizes.  Forward: 2 reads + 1 write of the batch
    (cache-blocked two-pass statistics, apply);
    backward: 4 reads + 1 write (the two sums, then dx).
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
# the inner sums over s are one dependency chain unless LLVM may reassociate them; the
# order it picks is fixed at compile time, so results stay the same run to run and for
# every thread count (not across CPUs with other vector widths)
_JIT_SUM = dict(_JIT, fastmath={"reassoc"})

#: at most this many row blocks per reduction (partials: blocks * C float64)
MAX_BLOCKS = 64
#: elements of one row block of an (N, C) reduction: kept in cache between its two passes
BLOCK_ELEMENTS = 1 << 15
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


@njit(inline="always")
def _chan_merge(mu, m2, n, rows, s):
    """Chan et al.'s pairwise merge of per-block means ``mu`` and sums of squared
    deviations ``m2`` (blocks of ``rows`` rows of ``s`` values each, the last one partial),
    in block order so the result is deterministic; returns ``(mean, biased variance)``."""
    c = mu.shape[1]
    mean = mu[0].copy()
    q = m2[0].copy()
    na = min(n, rows) * s
    for b in range(1, mu.shape[0]):
        nbk = (min(n, (b + 1) * rows) - b * rows) * s
        tot = na + nbk
        w = nbk / tot
        ww = na * w
        for j in range(c):
            d = mu[b, j] - mean[j]
            mean[j] += d * w
            q[j] += m2[b, j] + d * d * ww
        na = tot
    return mean, q / (n * s)


@njit(**_JIT)
def _k_moments2(x, rows):
    """(N, C) input: two-pass mean and M2 per block of ``rows`` rows (the second pass
    re-reads the block from cache), then Chan's merge of the blocks in block order."""
    n, c = x.shape
    nblocks = (n + rows - 1) // rows
    mu = np.zeros((nblocks, c), dtype=np.float64)
    m2 = np.zeros((nblocks, c), dtype=np.float64)
    for b in prange(nblocks):
        lo = b * rows
        hi = min(n, lo + rows)
        mb = mu[b]
        qb = m2[b]
        for i in range(lo, hi):
            for j in range(c):
                mb[j] += np.float64(x[i, j])
        inv = 1.0 / (hi - lo)
        for j in range(c):
            mb[j] *= inv
        for i in range(lo, hi):
            for j in range(c):
                d = np.float64(x[i, j]) - mb[j]
                qb[j] += d * d
    return _chan_merge(mu, m2, n, rows, 1)


@njit(**_JIT_SUM)
def _k_moments3(x3, rows):
    """(N, C, S) input: as ``_k_moments2``, the two passes run over each block's rows
    while they are in cache; the sums over s of one (row, channel) come first."""
    n, c, s = x3.shape
    nblocks = (n + rows - 1) // rows
    mu = np.zeros((nblocks, c), dtype=np.float64)
    m2 = np.zeros((nblocks, c), dtype=np.float64)
    for b in prange(nblocks):
        lo = b * rows
        hi = min(n, lo + rows)
        mb = mu[b]
        qb = m2[b]
        for i in range(lo, hi):
            for j in range(c):
                t = 0.0
                for k in range(s):
                    t += np.float64(x3[i, j, k])
                mb[j] += t
        inv = 1.0 / ((hi - lo) * s)
        for j in range(c):
            mb[j] *= inv
        for i in range(lo, hi):
            for j in range(c):
                m = mb[j]
                t = 0.0
                for k in range(s):
                    d = np.float64(x3[i, j, k]) - m
                    t += d * d
                qb[j] += t
    return _chan_merge(mu, m2, n, rows, s)


def bn_moments(x3):
    """Per-channel ``(mean, biased variance)``, float64, two-pass (see the reference).

    Two-pass within blocks of rows small enough to stay in cache, merged with Chan
    et al.'s pairwise update -- one read of x from memory.  The blocks depend on the
    shape only, so the result does not depend on the thread count.
    """
    n, c, s = x3.shape
    if s == 1:
        return _k_moments2(x3.reshape(n, c), max(1, BLOCK_ELEMENTS // c))
    # rows per block: the cache budget, but at least enough blocks for the threads to share
    rows = max(1, min(BLOCK_ELEMENTS // (c * s), n // MAX_BLOCKS))
    return _k_moments3(x3, rows)


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


@njit(**_JIT)
def _k_apply2(x, mean, scale, beta, out):
    n, c = x.shape
    for i in prange(n):
        for j in range(c):
            out[i, j] = (np.float64(x[i, j]) - mean[j]) * scale[j] + beta[j]


def bn_apply(x3, mean, scale, beta, out):
    """``out = (x - mean) * scale + beta`` per channel (float64 math, one rounding)."""
    n, c, s = x3.shape
    if s == 1:  # channels innermost: the loop over them vectorizes
        _k_apply2(x3.reshape(n, c), mean, scale, beta, out.reshape(n, c))
    else:
        _k_apply(x3, mean, scale, beta, out)


@njit(**_JIT_SUM)
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


@njit(**_JIT)
def _k_backward_sums2(x, dy, mean, invstd, nblocks):
    n, c = x.shape
    part = np.zeros((2, nblocks, c), dtype=np.float64)
    for b in prange(nblocks):
        lo = b * n // nblocks
        hi = (b + 1) * n // nblocks
        p0 = part[0, b]
        p1 = part[1, b]
        for i in range(lo, hi):
            for j in range(c):
                g = np.float64(dy[i, j])
                p0[j] += g
                p1[j] += g * ((np.float64(x[i, j]) - mean[j]) * invstd[j])
    sdy = np.zeros(c, dtype=np.float64)
    sdyx = np.zeros(c, dtype=np.float64)
    for b in range(nblocks):
        for j in range(c):
            sdy[j] += part[0, b, j]
            sdyx[j] += part[1, b, j]
    return sdy, sdyx


def bn_backward_sums(x3, dy3, mean, invstd):
    """Per-channel ``(sum dy, sum dy * xhat)``, float64."""
    n, c, s = x3.shape
    if s == 1:
        return _k_backward_sums2(x3.reshape(n, c), dy3.reshape(n, c), mean, invstd, _blocks(n))
    return _k_backward_sums(x3, dy3, mean, invstd, _blocks(n))


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


@njit(**_JIT)
def _k_backward_dx2(x, dy, mean, invstd, kk, a, b, out):
    n, c = x.shape
    for i in prange(n):
        for j in range(c):
            xhat = (np.float64(x[i, j]) - mean[j]) * invstd[j]
            out[i, j] = kk[j] * (np.float64(dy[i, j]) - a[j] - xhat * b[j])


def bn_backward_dx(x3, dy3, mean, invstd, k, a, b, out):
    """``out = k * (dy - a - xhat * b)`` per channel (float64 math, one rounding)."""
    n, c, s = x3.shape
    if s == 1:
        _k_backward_dx2(x3.reshape(n, c), dy3.reshape(n, c), mean, invstd, k, a, b,
                        out.reshape(n, c))
    else:
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
    zero = scale - scale  # +0 of the dtype (scale is finite)
    for b in prange(nchunks):
        lo = b * chunk
        hi = min(n, lo + chunk)
        for i in range(lo, hi):
            # a select, not a branch: the keep test is a coin flip the predictor cannot learn
            v = x[i] * scale
            out[i] = v if _bits(key, i) >= threshold else zero


def dropout_apply(x, seed, step, threshold, scale, out):
    """``out = x * scale`` where ``random_bits(seed, step, i) >= threshold``, else 0."""
    if x.size == 0:
        return
    _k_dropout(x, np.uint64(step_key(seed, step)), np.uint64(threshold), scale, out, CHUNK)
