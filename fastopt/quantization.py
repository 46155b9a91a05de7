"""8-bit block-quantized arrays in the bitsandbytes format (``state_dtype="q8"``).

An array of ``n`` elements is stored as ``n`` uint8 *codes* (shaped like the
array) plus one float32 *absmax* per block of ``blocksize`` consecutive
elements in C order (default 256; the last block may be partial).  A code
indexes a 256-entry *dynamic quantization map* (:func:`dynamic_map`): the
signed map for arrays that take both signs (first moments, momentum buffers),
the unsigned map for non-negative ones (second moments, accumulators).  An
element decodes to ``map[code] * absmax[block]``.

Everything here is plain NumPy written down so that a Numba or CUDA kernel can
reproduce it bit for bit: the maps are float32 constants, the nearest code is
an exact function of float32 inputs (:func:`quantize_blockwise` and
:func:`nearest_code` give the per-element recipe; :func:`code_thresholds` and
:func:`code_table` are its tables), and no step depends on the order of a
reduction (a block's absmax is a max, exact in any order).  The optimizers'
``state_dtype="q8"`` stores each moment this way (docs/design.md, State and
checkpoints).

    >>> import numpy as np
    >>> from fastopt import quantization as q
    >>> x = np.linspace(-1, 1, 1000, dtype=np.float32)
    >>> codes, absmax = q.quantize_blockwise(x)
    >>> y = q.dequantize_blockwise(codes, absmax, signed=True)
"""

from __future__ import annotations

import functools
import numbers

import numpy as np

__all__ = ["BLOCKSIZE", "MIN_8BIT_SIZE", "dynamic_map", "code_thresholds", "code_table",
           "zero_code", "nearest_code", "quantize_blockwise", "dequantize_blockwise",
           "q8_nbytes", "state_nbytes", "bytes_per_param", "bytes_per_param_table"]

#: Elements per absmax block (bitsandbytes' and torchao's blockwise default).
BLOCKSIZE = 256

#: Tensors with fewer elements keep float32 state (bitsandbytes' ``min_8bit_size``:
#: small tensors such as biases and norm weights are the most sensitive to rounding).
MIN_8BIT_SIZE = 4096

_F32 = np.float32
_F64 = np.float64


def _linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=torch.float32)`` as x86-64 torch computes it.

    torch's CPU kernel (``aten/src/ATen/native/cpu/RangeFactoriesKernel.cpp``)
    rounds ``start``, ``end`` and ``step = (end - start) / (steps - 1)`` to
    float32, then fills the first half from the start and the second half from
    the end: ``start + step*i`` for ``i < steps//2``, ``end - step*(steps-1-i)``
    otherwise.  The x86-64 wheels evaluate that expression as one fused
    multiply-add, so each point is rounded once.  That matters: a separate
    float32 multiply and add changes 42 entries of the signed map and 31 of
    the unsigned one (the tests check this function against torch).
    Here the product and the sum are exact in float64 (the product has at most
    32 significant bits and, with ``start`` or ``end``, spans fewer than 53),
    and one cast to float32 is that single rounding.
    """
    s, e = _F32(start), _F32(end)
    step = _F32((e - s) / _F32(steps - 1))
    i = np.arange(steps, dtype=_F64)
    from_start = _F64(s) + _F64(step) * i
    from_end = _F64(e) - _F64(step) * (steps - 1 - i)
    return np.where(i < steps // 2, from_start, from_end).astype(_F32)


@functools.lru_cache(maxsize=2)
def _map(signed: bool) -> np.ndarray:
    values = [np.zeros(1, _F32), np.ones(1, _F32)]
    for i in range(7):
        # Exponent step i covers [0.1, 1] * 10**(i-6) with 2**i (signed) or 2**(i+1)
        # (unsigned) levels: the bin centres of a uniform split of [0.1, 1].
        edges = _linspace_f32(0.1, 1.0, (2 ** i if signed else 2 ** (i + 1)) + 1)
        centres = (edges[:-1] + edges[1:]) / _F32(2)  # float32 sum, exact halving
        scaled = _F32(10.0 ** (i - 6)) * centres  # torch rounds the Python scalar to float32 first
        values.append(scaled)
        if signed:
            values.append(-scaled)
    out = np.sort(np.concatenate(values))
    assert out.shape == (256,) and np.all(np.diff(out) > 0)
    out.flags.writeable = False
    return out


def _check_signed(signed, name: str = "signed") -> bool:
    if not isinstance(signed, (bool, np.bool_)):
        raise TypeError(f"{name}: expected True (signed map) or False (unsigned map), "
                        f"got {signed!r}")
    return bool(signed)


def dynamic_map(signed: bool = True) -> np.ndarray:
    """The 256-entry dynamic quantization map of bitsandbytes, as float32, sorted ascending.

    Built from its definition, ``create_dynamic_map(signed, max_exponent_bits=7,
    total_bits=8)`` in bitsandbytes' ``bitsandbytes/functional.py`` (Dettmers,
    "8-Bit Approximations for Parallelism in Deep Learning", arXiv:1511.04561):
    a decimal exponent ``e = i - 6`` for ``i = 0..6`` and a linear fraction
    whose resolution grows with the exponent.  For each ``i`` take
    ``k = 2**i + 1`` (signed) or ``k = 2**(i+1) + 1`` (unsigned) evenly spaced
    points from 0.1 to 1, the ``k - 1`` midpoints of consecutive points, and
    multiply them by ``10**e``; the signed map also takes their negatives.
    Add 0 and 1 and sort.

    * signed: 127 negative values from -0.99297 to -5.5e-7, then 0 (index 127),
      127 positive values from 5.5e-7 to 0.99297, then 1.0 (index 255); -1 is
      not in the map.
    * unsigned: 0 (index 0), 254 positive values from 3.25e-7 to 0.99648, then
      1.0 (index 255).

    Every step is float32 as bitsandbytes does it with torch: the points are
    ``torch.linspace(..., dtype=float32)`` (see ``_linspace_f32`` for its
    rounding), the midpoints a float32 sum halved, the scale ``10**e`` rounded
    to float32 and multiplied in float32.  The result equals bitsandbytes
    0.50.2's ``create_dynamic_map`` bit for bit on x86-64 (tested when it is
    installed); ports must copy these 256 constants rather than recompute them.

    Returns a new writeable array each call.
    """
    return _map(_check_signed(signed)).copy()


@functools.lru_cache(maxsize=2)
def _thresholds(signed: bool) -> np.ndarray:
    c = _map(signed).astype(_F64)
    # The midpoint of two neighbouring float32 entries is exact in float64: both
    # carry 24 significant bits and neighbours are within a factor 16 of each
    # other (or one is zero), so their sum needs fewer than 30 bits.
    mid = (c[:-1] + c[1:]) / 2
    assert np.all(mid - c[:-1] == c[1:] - mid)
    t = mid.astype(_F32)
    # y > t must mean "y is nearer the upper entry, or tied and the upper entry is
    # nearer zero".  Above zero a tie goes down, so t is the largest float32 <= mid;
    # below zero a tie goes up, so t is the largest float32 < mid.
    too_high = (t.astype(_F64) > mid) | ((mid < 0) & (t.astype(_F64) == mid))
    t[too_high] = np.nextafter(t[too_high], _F32(-np.inf))
    assert np.all(np.diff(t) > 0)
    t.flags.writeable = False
    return t


def code_thresholds(signed: bool = True) -> np.ndarray:
    """The 255 float32 decision thresholds that define the nearest code, sorted ascending.

    ``code(y) = #{k : y > T[k]}`` for a float32 ``y`` equals the exact nearest
    entry of ``dynamic_map(signed)`` (distances in real arithmetic, not in
    float32), with a tie (``y`` exactly halfway between two entries) going to
    the entry nearer zero.  ``T[k]`` is the midpoint ``m = (map[k] + map[k+1])/2``
    moved down onto the float32 grid: the largest float32 ``<= m`` when
    ``m > 0``, the largest float32 ``< m`` when ``m < 0`` (no midpoint is 0).
    NaN is greater than nothing and gets code 0.  Ports copy these constants
    (or rebuild them this way in double precision); :func:`nearest_code` gives
    two ways to evaluate the count.
    """
    return _thresholds(_check_signed(signed)).copy()


def zero_code(signed: bool = True) -> int:
    """The code of 0.0: 127 in the signed map, 0 in the unsigned map."""
    return int(np.flatnonzero(_map(_check_signed(signed)) == 0)[0])


# The bucket table of nearest_code: |y| in [2**-23, 1) is cut into 128 buckets per
# binary exponent (the top 7 mantissa bits), 23 binades, per sign.
_BUCKET_SHIFT = 16                  # 23 mantissa bits - 7 kept
_U_LO = 0x34000000                  # bits of 2**-23, below every |threshold|
_U_HI = 0x3F7FFFFF                  # bits of the largest float32 below 1
_N_BUCKETS = (0x3F800000 - _U_LO) >> _BUCKET_SHIFT  # 2944


@functools.lru_cache(maxsize=2)
def _buckets(signed: bool) -> np.ndarray:
    t = _thresholds(signed)
    i = np.arange(_N_BUCKETS, dtype=np.uint32)
    lo = (np.uint32(_U_LO) + (i << np.uint32(_BUCKET_SHIFT))).view(_F32)
    hi = (np.uint32(_U_LO) + ((i + 1) << np.uint32(_BUCKET_SHIFT))).view(_F32)
    # y = +a, a in [lo, hi): #{t < y} = #{t < lo} + [t_j < y] with j = #{t < lo},
    # provided at most one threshold lies in [lo, hi).  y = -a, a in [lo, hi):
    # y in (-hi, -lo], so j = #{t <= -hi} and at most one threshold in (-hi, -lo].
    pos = np.searchsorted(t, lo, side="left")
    neg = np.searchsorted(t, -hi, side="right")
    assert np.all(np.searchsorted(t, hi, side="left") - pos <= 1)
    assert np.all(np.searchsorted(t, -lo, side="right") - neg <= 1)
    # below 2**-23 every y falls between the two thresholds around 0 (bucket 0 serves
    # it), at and above 1 beyond the last (the top bucket holds t[254])
    assert np.all(np.abs(t) >= np.float32(2.0 ** -23)) and t[-1] >= lo[-1] and t[0] > -1
    table = np.stack([pos, neg]).astype(np.uint8)
    assert table.max() <= 254  # t[base] is always one of the 255 thresholds
    table.flags.writeable = False
    return table


def code_table(signed: bool = True) -> np.ndarray:
    """The bucket table of :func:`nearest_code`: uint8 of shape ``(2, 2944)`` (sign, bucket).

    Entry ``[s, b]`` is where the count of thresholds starts for the float32
    values of sign ``s`` whose magnitude has the bit pattern ``0x34000000 +
    (b << 16)`` up to the next bucket: ``#{T < lo}`` for ``s = 0`` and
    ``#{T <= -hi}`` for ``s = 1``.  No bucket holds more than one threshold, so
    one comparison finishes the count.  5888 bytes; ports copy them.
    """
    return _buckets(_check_signed(signed)).copy()


@functools.lru_cache(maxsize=2)
def _bucket_thresholds(signed: bool) -> np.ndarray:
    # T[B] per bucket: the one comparison's threshold, so the two loads of a
    # lookup do not depend on each other
    return _thresholds(signed)[_buckets(signed).reshape(-1).astype(np.intp)]


def _bucket_codes(y: np.ndarray, signed: bool) -> np.ndarray:
    """nearest_code's table recipe on a flat float32 array (no checks)."""
    u32 = np.uint32
    bits = y.view(u32)
    b = bits & u32(0x7FFFFFFF)
    np.maximum(b, u32(_U_LO), out=b)
    np.minimum(b, u32(_U_HI), out=b)
    b -= u32(_U_LO)
    b >>= u32(_BUCKET_SHIFT)
    sign = bits >> u32(31)
    sign *= u32(_N_BUCKETS)
    b += sign
    idx = b.astype(np.intp)  # take() wants intp; converting once serves both loads
    code = _buckets(signed).reshape(-1).take(idx)
    code += y > _bucket_thresholds(signed).take(idx)
    code[np.isnan(y)] = 0
    return code


def _bsearch_codes(y: np.ndarray, signed: bool) -> np.ndarray:
    """nearest_code's binary-search recipe (no checks)."""
    t = _thresholds(signed)
    code = np.zeros(y.shape, np.intp)
    for s in (128, 64, 32, 16, 8, 4, 2, 1):
        code += s * (y > t[code + (s - 1)])
    return code.astype(np.uint8)


def nearest_code(y, signed: bool = True, method: str = "table") -> np.ndarray:
    """Code of the exact nearest ``dynamic_map(signed)`` entry to each float32 ``y``, as uint8.

    The code is ``#{k : y > T[k]}`` over ``T = code_thresholds(signed)`` (ties to
    the entry nearer zero, NaN to code 0).  Two recipes give it exactly, for
    kernels to port; both return the same code on every float32 (tested
    exhaustively over bit-pattern ranges and on every midpoint's neighbours).

    ``method="table"`` (one table load and one comparison; what
    :func:`quantize_blockwise` uses), with ``B = code_table(signed)``::

        bits = float32 bits of y (uint32)
        b    = bits & 0x7FFFFFFF                     # |y|, monotone as an integer
        b    = min(max(b, 0x34000000), 0x3F7FFFFF)   # clamp |y| into [2**-23, 1)
        b    = (b - 0x34000000) >> 16                # binade and top 7 mantissa bits
        base = B[bits >> 31][b]                      # 0..2943 per sign
        code = base + (y > T[base] ? 1 : 0)          # T[B] may be tabled too
        if y != y: code = 0                          # NaN

    The clamp is exact, not an approximation: every threshold has magnitude
    at least 2**-23, so all smaller ``|y|`` share bucket 0's answer, and the
    top bucket holds ``T[254]``, so ``|y| >= 1`` (inf included) gets 255 or 0.

    ``method="bsearch"``: a branch-free binary search, eight compare-and-add
    steps (``T[code + s - 1]``, largest index read 254), NaN giving 0 by
    itself::

        code = 0
        for s in 128, 64, 32, 16, 8, 4, 2, 1:
            code += s if y > T[code + s - 1] else 0

    ``-0.0`` and subnormals compare as the numbers they are.  ``y`` must be
    float32: a float64 would round differently from a kernel's float32.
    """
    y = np.asarray(y)
    if y.dtype != _F32:
        raise TypeError(f"y: expected float32 values, got dtype {y.dtype}")
    signed = _check_signed(signed)
    if method == "table":
        return _bucket_codes(y.reshape(-1), signed).reshape(y.shape)
    if method == "bsearch":
        return _bsearch_codes(y, signed)
    raise ValueError(f"method: expected 'table' or 'bsearch', got {method!r}")


def _is_float_dtype(dtype) -> bool:
    # ml_dtypes.bfloat16 has kind "V"; it is accepted by name so ml_dtypes stays optional
    return dtype.kind == "f" or dtype.name == "bfloat16"


def _check_blocksize(blocksize) -> int:
    if (not isinstance(blocksize, numbers.Integral) or isinstance(blocksize, (bool, np.bool_))
            or blocksize < 1):
        raise ValueError(f"blocksize: expected an integer >= 1, got {blocksize!r}")
    return int(blocksize)


def _n_blocks(n: int, blocksize: int) -> int:
    return -(-n // blocksize)


def quantize_blockwise(x, signed: bool | None = None, blocksize: int = BLOCKSIZE):
    """Quantize ``x`` to 8-bit codes and per-block absmax: ``(codes, absmax)``.

    ``x``: a float NumPy array of any shape (float16, bfloat16, float32 or
    float64); it is first rounded to float32 (to nearest even; a float64
    beyond the float32 range becomes inf).  ``signed``: which map (True:
    :func:`dynamic_map` ``(True)``; False: the unsigned map); None picks the
    signed map when any element is negative.  ``blocksize``: elements per
    block, counted over ``x`` in C order; the last block may be partial.

    Returns ``codes`` (uint8, shaped like ``x``) and ``absmax`` (float32,
    ``ceil(x.size / blocksize)`` entries).  Per block, exactly::

        absmax = max |x_i| over the block          (NaN if any x_i is NaN)
        per element:
          y    = x / absmax   (float32 IEEE division; y = 0 when absmax == 0)
          code = nearest_code(y)                    (exact nearest map entry,
                                                     ties to the entry nearer 0,
                                                     NaN to 0)
          if signed and x < 0 and code == 127:      (the sign guard)
              code = 126

    The sign guard is bitsandbytes' (its blockwise 8-bit optimizer kernels,
    ``kOptimizerStatic8bit{1,2}StateBlockwise`` in ``csrc/kernels.cu``: when
    the code's sign bit differs from the value's, step one code towards the
    value's sign): a negative value too small for
    any negative code would round to 0 and lose its sign; it gets the smallest
    negative code instead.  With an exact nearest code that is the guard's only
    effect.  One deliberate difference: bitsandbytes tests the sign *bit*, so
    it sends ``-0.0`` to code 126 (a small negative number); here the test is
    ``x < 0`` and ``-0.0`` keeps the zero code, so zeros decode to zeros.

    How this differs from bitsandbytes' own quantizers: its CUDA search
    (``dQuantize``) resolves an exact tie by the path its binary search took,
    and its CPU quantizer (0.50) looks codes up in a table over 65536 uniform
    bins of ``[-1, 1]``, which cannot resolve the map's entries near zero (they
    are ~1e-6 apart), so small values get codes that are not the nearest.  Here
    the code is always the nearest; ties have the one rule above.

    Division (not a multiply by ``1/absmax``) keeps ``|y| <= 1`` and gives
    exactly 1.0 for the element that is the absmax; every backend computes it
    correctly rounded (CUDA: plain ``/`` without fast-math, or ``__fdiv_rn``).

    Non-finite input is not an error here (the optimizers decide that before
    anything is quantized): a block holding a NaN gets absmax NaN and every
    code 0; a block holding ±inf (and no NaN) gets absmax inf, code 0 for the
    infinite elements (``inf/inf`` is NaN) and the zero code (126 when
    negative) for the finite ones.  Either way every element of a block with a
    non-finite element decodes to a non-finite value (NaN or ±inf), so the
    damage stays visible and stays in its block.  An all-zero block
    gets absmax 0 and the zero code: no NaN.
    """
    if not isinstance(x, np.ndarray):
        raise TypeError(f"x: expected a numpy array, got {type(x).__name__}")
    if not _is_float_dtype(x.dtype):
        raise TypeError(f"x: expected a float array (float16, bfloat16, float32 or float64), "
                        f"got dtype {x.dtype}")
    if signed is not None:
        signed = _check_signed(signed)
    blocksize = _check_blocksize(blocksize)

    with np.errstate(over="ignore"):
        flat = np.asarray(x, dtype=_F32).reshape(-1)
    n = flat.size
    nb = _n_blocks(n, blocksize)
    if signed is None:
        signed = bool(np.any(flat < 0))
    if n == 0:
        return np.zeros(x.shape, np.uint8), np.zeros(0, _F32)

    full = n // blocksize * blocksize
    absmax = np.empty(nb, _F32)
    y = np.empty(n, _F32)
    with np.errstate(divide="ignore", invalid="ignore"):
        if full:
            blocks = flat[:full].reshape(-1, blocksize)
            absmax[:full // blocksize] = np.abs(blocks).max(axis=1)  # NaN propagates
            np.divide(blocks, absmax[:full // blocksize, None],
                      out=y[:full].reshape(-1, blocksize))
        if full < n:
            absmax[-1] = np.abs(flat[full:]).max()
            np.divide(flat[full:], absmax[-1], out=y[full:])
    empty = absmax == 0
    if empty.any():  # all-zero blocks: 0/0 would be NaN
        y[np.repeat(empty, blocksize)[:n]] = 0
    codes = _bucket_codes(y, signed)
    if signed:
        zero = zero_code(True)
        codes[(flat < 0) & (codes == zero)] = zero - 1
    return codes.reshape(x.shape), absmax


def dequantize_blockwise(codes, absmax, signed: bool, blocksize: int = BLOCKSIZE) -> np.ndarray:
    """Decode :func:`quantize_blockwise` output: ``map[code] * absmax[block]``, float32.

    ``codes``: a uint8 array of any shape; ``absmax``: float32, one entry per
    block of ``blocksize`` codes in C order (``ceil(codes.size / blocksize)``
    entries); ``signed``: which map the codes index (it is not stored in the
    codes, so it is required).  Each element is one float32 multiply, rounded
    once; a non-finite absmax decodes its block to non-finite values (``0 * inf``
    is NaN).  Returns a new float32 array shaped like ``codes``.
    """
    if not isinstance(codes, np.ndarray) or codes.dtype != np.uint8:
        got = f"dtype {codes.dtype}" if isinstance(codes, np.ndarray) else type(codes).__name__
        raise TypeError(f"codes: expected a uint8 numpy array, got {got}")
    if not isinstance(absmax, np.ndarray) or absmax.dtype != _F32:
        got = f"dtype {absmax.dtype}" if isinstance(absmax, np.ndarray) else type(absmax).__name__
        raise TypeError(f"absmax: expected a float32 numpy array, got {got}")
    signed = _check_signed(signed)
    blocksize = _check_blocksize(blocksize)
    nb = _n_blocks(codes.size, blocksize)
    if absmax.shape != (nb,):
        raise ValueError(f"absmax: expected shape ({nb},) (one entry per block of {blocksize} "
                         f"of the {codes.size} codes), got shape {absmax.shape}")
    out = _map(signed).take(codes.reshape(-1).astype(np.intp))
    full = codes.size // blocksize * blocksize
    with np.errstate(invalid="ignore"):  # 0 * inf under a non-finite absmax is NaN, as documented
        blocks = out[:full].reshape(-1, blocksize)
        blocks *= absmax[:full // blocksize, None]
        if full < codes.size:
            out[full:] *= absmax[-1]
    return out.reshape(codes.shape)


def _check_count(n, name: str) -> int:
    if not isinstance(n, numbers.Integral) or isinstance(n, (bool, np.bool_)) or n < 0:
        raise ValueError(f"{name}: expected an integer >= 0, got {n!r}")
    return int(n)


def q8_nbytes(n: int, blocksize: int = BLOCKSIZE) -> int:
    """Bytes of one q8 array of ``n`` elements: ``n`` codes plus 4 bytes of absmax per block."""
    n = _check_count(n, "n")
    return n + 4 * _n_blocks(n, _check_blocksize(blocksize))


def _itemsize(state_dtype) -> int:
    if isinstance(state_dtype, str) and state_dtype == "bfloat16":
        return 2  # named without importing ml_dtypes
    try:
        dt = np.dtype(state_dtype)
    except TypeError:
        dt = None
    if dt is None or not _is_float_dtype(dt):
        raise ValueError(f"state_dtype: expected 'q8' or a float dtype (float16, bfloat16, "
                         f"float32, float64), got {state_dtype!r}")
    return dt.itemsize


def state_nbytes(n: int, state_dtype="float32", *, num_states: int = 1,
                 blocksize: int = BLOCKSIZE, min_8bit_size: int = MIN_8BIT_SIZE) -> int:
    """Bytes of ``num_states`` state arrays of ``n`` elements each in the format ``state_dtype``.

    ``state_dtype`` is ``"q8"`` or a float dtype.  A q8 array under
    ``min_8bit_size`` elements is kept in float32 (4 bytes per element), as
    the optimizers keep it; otherwise it costs :func:`q8_nbytes`.
    """
    n = _check_count(n, "n")
    num_states = _check_count(num_states, "num_states")
    min_8bit_size = _check_count(min_8bit_size, "min_8bit_size")
    if isinstance(state_dtype, str) and state_dtype == "q8":
        one = 4 * n if n < min_8bit_size else q8_nbytes(n, blocksize)
    else:
        one = _itemsize(state_dtype) * n
    return num_states * one


def bytes_per_param(state_dtype, *, num_states: int = 2, n: int | None = None,
                    blocksize: int = BLOCKSIZE, min_8bit_size: int = MIN_8BIT_SIZE) -> float:
    """State bytes per parameter element of a rule keeping ``num_states`` arrays (Adam: 2).

    With ``n`` it is ``state_nbytes(n, ...) / n`` for one tensor of ``n``
    elements; without, the large-tensor limit: ``num_states * itemsize``, or
    ``num_states * (1 + 4 / blocksize)`` for q8 (Adam: 2.03125).
    """
    if n is None:
        num_states = _check_count(num_states, "num_states")
        if isinstance(state_dtype, str) and state_dtype == "q8":
            return num_states * (1 + 4 / _check_blocksize(blocksize))
        return float(num_states * _itemsize(state_dtype))
    n = _check_count(n, "n")
    if n == 0:
        raise ValueError("n: expected an integer >= 1 (bytes per element of an empty tensor "
                         "are undefined), got 0")
    return state_nbytes(n, state_dtype, num_states=num_states, blocksize=blocksize,
                        min_8bit_size=min_8bit_size) / n


def bytes_per_param_table(num_states: int = 2, n: int | None = None) -> dict:
    """``{format: bytes per parameter}`` for float32, bfloat16 and q8 state (Adam by default).

    For Adam's two moments: float32 8, bfloat16 4, q8 2.03125.
    """
    return {fmt: bytes_per_param(fmt, num_states=num_states, n=n)
            for fmt in ("float32", "bfloat16", "q8")}
