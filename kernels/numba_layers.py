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
    (statistics, apply); backward: 4 reads + 1 write (the two sums in one pass,
    then dx).  (N, C, S) statistics are two-pass within cache-sized row blocks,
    merged with Chan's update; (N, C) statistics are single-pass sums shifted by
    each channel's first value (see ``_k_moments2``).  The element-wise passes use
    per-channel coefficients folded on the host (``x * scale + shift``;
    ``k * dy + c2 * x + c3``) so each element costs few loads: every pass of the
    (N, C) kernels runs near this machine's memory bandwidth.
16-bit batches
    bfloat16 and float16 arrays come as integer views of their bits (see "16-bit
    elements" below); every kernel above reads them exactly and rounds its float64
    result to float32 and then to the 16-bit format, so the bits are those of the
    float32 kernels on the widened batch without the widened copy.
Dropout
    ``random_bits(seed, step, i)`` of ``fastopt.precision`` transcribed with
    u64 arithmetic: the step key is computed on the host once per call, each
    element costs one SplitMix64 finaliser.  Bytes per element: 1 read + 1 write.
"""

from __future__ import annotations

import os

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from ..precision import step_key

BACKEND = "numba"
#: 16-bit batches are read and written through their bits (see "16-bit elements" below)
FUSED_16BIT = True

CACHE = os.environ.get("FASTOPT_NUMBA_CACHE", "1") != "0"
_JIT = dict(parallel=True, nogil=True, cache=CACHE)
# numpy's error model for the (N, C) kernels: a division in a loop carries no
# ZeroDivisionError branch, which would keep the loop from vectorizing
_JIT2 = dict(_JIT, error_model="numpy")
# the inner sums over s are one dependency chain unless LLVM may reassociate them; the
# order it picks is fixed at compile time, so results stay the same run to run and for
# every thread count (not across CPUs with other vector widths)
_JIT_SUM = dict(_JIT, fastmath={"reassoc"})

#: at most this many row blocks per reduction (partials: blocks * C float64)
MAX_BLOCKS = 64
#: elements of one row block of an (N, C, S) moments reduction: kept in cache between its
#: two passes
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


# ------------------------------------------------------------------ 16-bit elements
#
# float16 and bfloat16 batches reach these kernels as integer views of their bits (Numba
# types neither dtype): bfloat16 as uint16, float16 as int16, so the view's dtype picks the
# conversion when a kernel is compiled and the loops carry no branch on it.  Loads are
# exact (every 16-bit value is a float32); a store rounds the float64 result to float32
# first and then to the 16-bit format, nearest even: the same two roundings as the
# reference, which runs its float32 kernel and casts the float32 result.  These helpers
# repeat the bit recipes of ``fastopt.precision`` (and of the optimizer kernels) because
# this module must not call into another one (see the module docstring).

def _i32(v):
    return ir.Constant(ir.IntType(32), v)


def _u32_of16(builder, h):
    """A 16-bit integer argument zero-extended to i32."""
    return builder.zext(h, ir.IntType(32))


@intrinsic
def _bf16_to_f32(typingctx, h):
    """bfloat16 bits (a 16-bit integer) -> float32: the bits shifted into the top half."""

    def codegen(context, builder, sig, args):
        u = _u32_of16(builder, args[0])
        return builder.bitcast(builder.shl(u, _i32(16)), ir.FloatType())

    if not isinstance(h, types.Integer) or h.bitwidth != 16:
        return None
    return types.float32(h), codegen


def _hardware_f16() -> bool:
    """Whether LLVM lowers float <-> half conversions to instructions on this CPU (x86's F16C,
    every 64-bit ARM): then the float16 helpers below are one instruction per 4-8 values."""
    import llvmlite.binding as llvm

    triple = llvm.get_process_triple()
    if triple.startswith(("aarch64", "arm64")):
        return True
    try:
        return bool(llvm.get_host_cpu_features().get("f16c", False))
    except RuntimeError:
        return False


#: float16 conversions by the CPU's instructions (else the integer recipes below); either
#: gives the nearest-even bits NumPy's cast gives (tested on every float32 bit pattern class)
HARDWARE_F16 = _hardware_f16()


@intrinsic
def _f16_to_f32(typingctx, h):
    """float16 bits (a 16-bit integer) -> float32, exactly.  Without F16C: the magnitude
    bits moved into float32's place and scaled by 2**112 give every finite value
    (subnormals included: the product is exact); inf and nan keep their payload under an
    all-ones exponent."""

    def codegen(context, builder, sig, args):
        if HARDWARE_F16:
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
        i32 = ir.IntType(32)
        u = _u32_of16(builder, args[0])
        a = builder.and_(u, _i32(0x7FFF))
        f = builder.fmul(builder.bitcast(builder.shl(a, _i32(13)), ir.FloatType()),
                         ir.Constant(ir.FloatType(), 2.0 ** 112))
        special = builder.or_(_i32(0x7F800000),
                              builder.shl(builder.and_(a, _i32(0x3FF)), _i32(13)))
        mag = builder.select(builder.icmp_unsigned(">=", a, _i32(0x7C00)), special,
                             builder.bitcast(f, i32))
        sign = builder.shl(builder.and_(u, _i32(0x8000)), _i32(16))
        return builder.bitcast(builder.or_(mag, sign), ir.FloatType())

    if not isinstance(h, types.Integer) or h.bitwidth != 16:
        return None
    return types.float32(h), codegen


@intrinsic
def _f32_to_bf16(typingctx, x):
    """float32 -> bfloat16 bits (uint16), nearest even; nan -> a quiet nan with its sign.
    In 32-bit integer lanes (Numba's own integer arithmetic would widen them to 64)."""

    def codegen(context, builder, sig, args):
        u = builder.bitcast(args[0], ir.IntType(32))
        hi = builder.lshr(u, _i32(16))
        rne = builder.lshr(builder.add(builder.add(u, _i32(0x7FFF)),
                                       builder.and_(hi, _i32(1))), _i32(16))
        nan = builder.or_(builder.and_(hi, _i32(0x8000)), _i32(0x7FC0))
        isnan = builder.icmp_unsigned(">", builder.and_(u, _i32(0x7FFFFFFF)),
                                      _i32(0x7F800000))
        return builder.trunc(builder.select(isnan, nan, rne), ir.IntType(16))

    return types.uint16(types.float32), codegen


@intrinsic
def _f32_to_f16(typingctx, x):
    """float32 -> float16 bits (uint16), nearest even; overflow -> inf, nan -> a quiet nan
    with its sign.  Normal results: the exponent rebiased and the low 13 bits rounded in
    integer arithmetic; subnormal ones: a float32 add of 0.5 leaves the value in units of
    2**-24 in the low mantissa bits, rounded by the FPU's nearest even."""

    def codegen(context, builder, sig, args):
        if HARDWARE_F16:
            return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
        i32 = ir.IntType(32)
        u = builder.bitcast(args[0], i32)
        a = builder.and_(u, _i32(0x7FFFFFFF))
        big = builder.select(builder.icmp_unsigned(">", a, _i32(0x7F800000)),
                             _i32(0x7E00), _i32(0x7C00))
        magic = (127 - 15 + 23 - 10 + 1) << 23  # 0.5
        fs = builder.fadd(builder.bitcast(a, ir.FloatType()),
                          builder.bitcast(_i32(magic), ir.FloatType()))
        sub = builder.sub(builder.bitcast(fs, i32), _i32(magic))
        odd = builder.and_(builder.lshr(a, _i32(13)), _i32(1))
        norm = builder.lshr(builder.add(builder.add(builder.sub(a, _i32(0x38000000)),
                                                    _i32(0xFFF)), odd), _i32(13))
        low = builder.select(builder.icmp_unsigned("<", a, _i32(0x38800000)), sub, norm)
        mag = builder.select(builder.icmp_unsigned(">=", a, _i32(0x477FF000)), big, low)
        sign = builder.and_(builder.lshr(u, _i32(16)), _i32(0x8000))
        return builder.trunc(builder.or_(mag, sign), ir.IntType(16))

    return types.uint16(types.float32), codegen


def _wide(v):
    """An element as the kernels compute with it: float32 for a 16-bit one, else itself."""


@overload(_wide, inline="always")
def _wide_ov(v):
    if v == types.uint16:
        def bf16(v):
            return _bf16_to_f32(v)
        return bf16
    if v == types.int16:
        def f16(v):
            return _f16_to_f32(v)
        return f16

    def same(v):
        return v
    return same


def _narrow(v, like):
    """Float ``v`` as an element of the array ``like`` (16-bit: rounded via float32)."""


@overload(_narrow, inline="always")
def _narrow_ov(v, like):
    if like.dtype == types.uint16:
        def bf16(v, like):
            return _f32_to_bf16(np.float32(v))
        return bf16
    if like.dtype == types.int16:
        def f16(v, like):
            return np.int16(_f32_to_f16(np.float32(v)))
        return f16

    def same(v, like):
        return v
    return same


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


@njit(**_JIT2)
def _k_moments2(x, nblocks):
    """(N, C) input: single-pass float64 sums of ``d = x - x[0]`` and ``d * d`` per
    channel (shifted by the channel's first value, so a large mean cancels before the
    squares), ``nblocks`` row blocks of fixed bounds summed in block order.  Rows go
    four at a time into one update of the per-channel accumulators: the loop over the
    channels vectorizes and the accumulators are loaded and stored a quarter as often.
    ``var = (S2 - S1 * S1 / n) / n`` loses ``(mean - x[0])**2 / var`` float64 ulps to
    cancellation: none that a float32 result could show unless the first row sits
    thousands of standard deviations from the mean."""
    n, c = x.shape
    k = np.empty(c, dtype=np.float64)
    for j in range(c):
        k[j] = np.float64(_wide(x[0, j]))
    part = np.zeros((2, nblocks, c), dtype=np.float64)
    for b in prange(nblocks):
        lo = b * n // nblocks
        hi = (b + 1) * n // nblocks
        mid = lo + (hi - lo) // 4 * 4
        p0 = part[0, b]
        p1 = part[1, b]
        for i in range(lo, mid, 4):
            x0 = x[i]
            x1 = x[i + 1]
            x2 = x[i + 2]
            x3 = x[i + 3]
            for j in range(c):
                kj = k[j]
                d0 = np.float64(_wide(x0[j])) - kj
                d1 = np.float64(_wide(x1[j])) - kj
                d2 = np.float64(_wide(x2[j])) - kj
                d3 = np.float64(_wide(x3[j])) - kj
                p0[j] += (d0 + d1) + (d2 + d3)
                p1[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
        for i in range(mid, hi):
            x0 = x[i]
            for j in range(c):
                d = np.float64(_wide(x0[j])) - k[j]
                p0[j] += d
                p1[j] += d * d
    s1 = np.zeros(c, dtype=np.float64)
    s2 = np.zeros(c, dtype=np.float64)
    for b in range(nblocks):
        for j in range(c):
            s1[j] += part[0, b, j]
            s2[j] += part[1, b, j]
    mean = np.empty(c, dtype=np.float64)
    var = np.empty(c, dtype=np.float64)
    for j in range(c):
        dm = s1[j] / n
        mean[j] = k[j] + dm
        var[j] = max(0.0, (s2[j] - s1[j] * dm) / n)
    return mean, var


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
                    t += np.float64(_wide(x3[i, j, k]))
                mb[j] += t
        inv = 1.0 / ((hi - lo) * s)
        for j in range(c):
            mb[j] *= inv
        for i in range(lo, hi):
            for j in range(c):
                m = mb[j]
                t = 0.0
                for k in range(s):
                    d = np.float64(_wide(x3[i, j, k])) - m
                    t += d * d
                qb[j] += t
    return _chan_merge(mu, m2, n, rows, s)


def bn_moments(x3):
    """Per-channel ``(mean, biased variance)``, float64; one read of x from memory.

    (N, C, S): two-pass within blocks of rows small enough to stay in cache, merged
    with Chan et al.'s pairwise update.  (N, C): single-pass shifted sums (see
    ``_k_moments2``), where the second in-cache pass would cost as much as the read.
    The blocks depend on the shape only, so the result does not depend on the
    thread count.
    """
    n, c, s = x3.shape
    if s == 1:
        return _k_moments2(x3.reshape(n, c), _blocks(n))
    # rows per block: the cache budget, but at least enough blocks for the threads to share
    rows = max(1, min(BLOCK_ELEMENTS // (c * s), n // MAX_BLOCKS))
    return _k_moments3(x3, rows)


@njit(**_JIT2)
def _k_apply(x3, scale, shift, out):
    n, c, s = x3.shape
    for i in prange(n):
        for j in range(c):
            sc = scale[j]
            sh = shift[j]
            for k in range(s):
                out[i, j, k] = _narrow(np.float64(_wide(x3[i, j, k])) * sc + sh, out)


@njit(**_JIT2)
def _k_apply2(x, scale, shift, out):
    n, c = x.shape
    for i in prange(n):
        x0 = x[i]
        o0 = out[i]
        for j in range(c):
            o0[j] = _narrow(np.float64(_wide(x0[j])) * scale[j] + shift[j], o0)


def bn_apply(x3, mean, scale, beta, out):
    """``out = (x - mean) * scale + beta`` per channel, as ``x * scale + (beta - mean *
    scale)``: float64 math, one rounding to out's dtype, two coefficient loads per
    element.  Against the reference's order this differs by float64 ulps of ``mean *
    scale``, far below a float32 ulp of the result unless ``|mean|`` is ~1e6 standard
    deviations."""
    n, c, s = x3.shape
    shift = beta - mean * scale
    if s == 1:  # channels innermost: the loop over them vectorizes
        _k_apply2(x3.reshape(n, c), scale, shift, out.reshape(n, c))
    else:
        _k_apply(x3, scale, shift, out)


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
                    g = np.float64(_wide(dy3[i, j, k]))
                    t0 += g
                    t1 += g * ((np.float64(_wide(x3[i, j, k])) - m) * r)
                part[0, b, j] += t0
                part[1, b, j] += t1
    sdy = np.zeros(c, dtype=np.float64)
    sdyx = np.zeros(c, dtype=np.float64)
    for b in range(nblocks):
        for j in range(c):
            sdy[j] += part[0, b, j]
            sdyx[j] += part[1, b, j]
    return sdy, sdyx


@njit(**_JIT2)
def _k_backward_sums2(x, dy, mean, invstd, nblocks):
    """Sums of ``dy`` and ``dy * (x - mean)`` (times invstd once per channel at the
    end), rows four at a time per accumulator update as in ``_k_moments2``."""
    n, c = x.shape
    part = np.zeros((2, nblocks, c), dtype=np.float64)
    for b in prange(nblocks):
        lo = b * n // nblocks
        hi = (b + 1) * n // nblocks
        mid = lo + (hi - lo) // 4 * 4
        p0 = part[0, b]
        p1 = part[1, b]
        for i in range(lo, mid, 4):
            x0 = x[i]
            x1 = x[i + 1]
            x2 = x[i + 2]
            x3 = x[i + 3]
            g0 = dy[i]
            g1 = dy[i + 1]
            g2 = dy[i + 2]
            g3 = dy[i + 3]
            for j in range(c):
                m = mean[j]
                a0 = np.float64(_wide(g0[j]))
                a1 = np.float64(_wide(g1[j]))
                a2 = np.float64(_wide(g2[j]))
                a3 = np.float64(_wide(g3[j]))
                p0[j] += (a0 + a1) + (a2 + a3)
                p1[j] += ((a0 * (np.float64(_wide(x0[j])) - m) + a1 * (np.float64(_wide(x1[j])) - m))
                          + (a2 * (np.float64(_wide(x2[j])) - m) + a3 * (np.float64(_wide(x3[j])) - m)))
        for i in range(mid, hi):
            x0 = x[i]
            g0 = dy[i]
            for j in range(c):
                a0 = np.float64(_wide(g0[j]))
                p0[j] += a0
                p1[j] += a0 * (np.float64(_wide(x0[j])) - mean[j])
    sdy = np.zeros(c, dtype=np.float64)
    sdyx = np.zeros(c, dtype=np.float64)
    for b in range(nblocks):
        for j in range(c):
            sdy[j] += part[0, b, j]
            sdyx[j] += part[1, b, j]
    for j in range(c):
        sdyx[j] *= invstd[j]
    return sdy, sdyx


def bn_backward_sums(x3, dy3, mean, invstd):
    """Per-channel ``(sum dy, sum dy * xhat)``, float64."""
    n, c, s = x3.shape
    if s == 1:
        return _k_backward_sums2(x3.reshape(n, c), dy3.reshape(n, c), mean, invstd, _blocks(n))
    return _k_backward_sums(x3, dy3, mean, invstd, _blocks(n))


@njit(**_JIT2)
def _k_backward_dx(x3, dy3, c1, c2, c3, out):
    n, c, s = x3.shape
    for i in prange(n):
        for j in range(c):
            a1 = c1[j]
            a2 = c2[j]
            a3 = c3[j]
            for k in range(s):
                out[i, j, k] = _narrow(a1 * np.float64(_wide(dy3[i, j, k]))
                                      + (a2 * np.float64(_wide(x3[i, j, k])) + a3), out)


@njit(**_JIT2)
def _k_backward_dx2(x, dy, c1, c2, c3, out):
    n, c = x.shape
    for i in prange(n):
        x0 = x[i]
        g0 = dy[i]
        o0 = out[i]
        for j in range(c):
            o0[j] = _narrow(c1[j] * np.float64(_wide(g0[j])) + (c2[j] * np.float64(_wide(x0[j])) + c3[j]),
                            o0)


def bn_backward_dx(x3, dy3, mean, invstd, k, a, b, out):
    """``out = k * (dy - a - xhat * b)`` per channel, as ``k * dy + (c2 * x + c3)`` with
    ``c2 = -k * invstd * b`` and ``c3 = k * (invstd * b * mean - a)`` (float64 math, one
    rounding; three coefficient loads per element instead of five).  With ``a = b = 0``
    (evaluation) it is ``k * dy`` exactly."""
    n, c, s = x3.shape
    rb = invstd * b
    c2 = -(k * rb)
    c3 = k * (rb * mean - a)
    if s == 1:
        _k_backward_dx2(x3.reshape(n, c), dy3.reshape(n, c), k, c2, c3, out.reshape(n, c))
    else:
        _k_backward_dx(x3, dy3, k, c2, c3, out)


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
            v = _wide(x[i]) * scale
            out[i] = _narrow(v if _bits(key, i) >= threshold else zero, out)


def dropout_apply(x, seed, step, threshold, scale, out):
    """``out = x * scale`` where ``random_bits(seed, step, i) >= threshold``, else 0."""
    if x.size == 0:
        return
    _k_dropout(x, np.uint64(step_key(seed, step)), np.uint64(threshold), scale, out, CHUNK)
