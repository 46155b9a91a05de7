r"""Reduced precision: 16-bit storage formats, rounding and the precision options.

Plain NumPy, written so that the Numba and CUDA kernels can reproduce every
result bit for bit with 32- and 64-bit unsigned integer operations.  Neither
Numba (CPU) nor the kernels rely on a native 16-bit type: a float16 or
bfloat16 array is handed to a kernel as a ``uint16`` view, loaded with the
``*_bits_to_f32`` recipe, updated in float32 and stored with one of the
``f32_to_*_bits_*`` recipes (one rounding per write).  The design notes live
in ``docs/design.md``; what follows is the exact contract.

bfloat16 itself is ``ml_dtypes.bfloat16`` (the NumPy dtype of JAX, TensorFlow
and ONNX; ``pip install 'fastopt[bf16]'``).  It is imported only when a
bfloat16 dtype is asked for; the bit functions below never need it.

Notation: ``u`` is the float32 bit pattern (``uint32``), ``h`` a 16-bit pattern
(``uint16``); every constant is unsigned; arithmetic wraps modulo 2**32 (u32)
or 2**64 (u64); ``>>`` is a logical shift.

1. bfloat16 <-> float32
-----------------------
load:   ``u = u32(h) << 16``  (exact; NaN payloads kept).

store, round to nearest even (``f32_to_bf16_bits_rne``)::

    if (u & 0x7fffffff) > 0x7f800000:             # NaN -> quiet NaN, sign kept
        h = ((u >> 16) & 0x8000) | 0x7fc0
    else:
        h = (u + 0x7fff + ((u >> 16) & 1)) >> 16  # no u32 overflow: u <= 0xff800000

This is IEEE round-to-nearest-even on the bit pattern: subnormals round
like normals, +-inf stay +-inf, and a magnitude at or above 0x7f7f8000 (the
midpoint between the largest finite bfloat16, 0x7f7f = 3.3895e38, and 2**128)
becomes inf, as IEEE overflow does.  NaN becomes the canonical quiet NaN
0x7fc0/0xffc0 -- the same bits ``ml_dtypes``' cast gives (tested on all of them).

2. The counter-based hash (``random_bits``, ``sr_bits``)
--------------------------------------------------------
``mix64`` is the SplitMix64 output function (Stafford's "Mix13" finaliser)::

    G = 0x9e3779b97f4a7c15                  # SplitMix64's increment (odd)
    mix64(z) = z ^= z >> 30; z *= 0xbf58476d1ce4e5b9;
               z ^= z >> 27; z *= 0x94d049bb133111eb;
               z ^ (z >> 31)                 # all u64

    seed_key(seed)       = mix64(seed + G)                    # host, once
    step_key(seed, step) = mix64(seed_key(seed) + step * G)   # host, once per step
    random_bits(seed, step, i) = u32(mix64(step_key(seed, step) + i * G) >> 32)
    sr_bits(seed, step, i)     = u16(mix64(step_key(seed, step) + (i >> 2) * G)
                                     >> (16 * (i & 3)))

``seed`` and ``step`` are integers in [0, 2**64); ``step`` is the step number
``t`` the update is computed for (1 on the first step, the ``t`` of the bias
corrections); ``i`` is the flat C-order index of the element *within its
param* -- not an offset into a packed multi-tensor buffer, not a thread or
chunk index -- which is what makes the bits independent of thread count,
chunking and resume.  A kernel receives ``step_key`` as one u64 scalar.

``random_bits`` (32 bits per element, one ``mix64`` each) is Dropout's
(``fastopt.layers``).  ``sr_bits`` is stochastic rounding's: the four
consecutive elements ``4g .. 4g+3`` share one ``mix64`` output (of group
``g = i >> 2``), element ``i`` taking its 16-bit slice number ``i & 3``
(bits ``16*(i&3)`` to ``16*(i&3)+15``; on a little-endian machine the u64
viewed as four u16 holds the slices in element order).  A kernel hashes once
per group of four -- two 64-bit multiplies, which AVX2 emulates with three
32-bit ones each, for four elements instead of one -- and a range that
starts or ends inside a group takes its head or tail slices of that group's
hash, so any slice of a param gets exactly the bits the whole param would.

Why the quality is enough.  For a fixed (seed, step) the group inputs
``step_key + g*G`` are exactly the SplitMix64 sequence started at
``step_key``: SplitMix64 passes BigCrush and PractRand on its whole 64-bit
output (Steele, Lea and Flood, "Fast splittable pseudorandom number
generators", OOPSLA 2014), so the four 16-bit slices of one output are as
uniform and as independent of each other as the one slice per output used
before; since G is odd the map ``g -> step_key + g*G`` is a bijection, so no
two groups of one step share an input.  Each step starts its sequence at a
pseudo-random point (``step_key`` is itself a SplitMix64 output of the
seed's sequence); the windows of two steps overlap with probability about
2n/2**64 for n groups, and an overlap merely reuses the bits of another
group at another step, which biases nothing.  Stochastic rounding needs 16
uniform, independent bits per element and step: a deviation e from uniform
biases the expected rounding by at most e ulp.  ``tests/test_precision.py``
checks, for ``sr_bits``, the balance of each of the 16 bits, a chi-square
along the index and along the step, a chi-square of neighbouring pairs
(pairs inside a group and pairs across two groups) and avalanche; and the
same for the 32 bits of ``random_bits``.

3. Stochastic rounding float32 -> bfloat16 (``f32_to_bf16_bits_sr``)
----------------------------------------------------------------------
::

    if (u & 0x7fffffff) > 0x7f800000:             # NaN: as in (1)
        h = ((u >> 16) & 0x8000) | 0x7fc0
    else:
        r = sr_bits(seed, step, i)
        h = (u + r) >> 16

Adding ``r`` uniform in [0, 2**16) to the 16 bits that truncation drops
carries into the kept half with probability (dropped bits) / 2**16, which is
the distance to the lower neighbour over the distance between the two
neighbours: the expected result is exactly x.  The sign is in the top bit, so
negative values round their magnitude the same way.  Zero, the bfloat16
values themselves and +-inf (whose dropped bits are 0) come back unchanged.
Overflow (decided here): a magnitude at or below the largest finite
bfloat16 never rounds to inf (its dropped bits are 0); a finite float32
beyond it (3.3895e38 < |x| <= 3.4028e38) rounds to inf with probability
proportional to its distance from 3.3895e38, taking 2**128 as the next value
up -- the way IEEE rounding treats overflow -- so no extra branch is needed.
Only the param write uses stochastic rounding; bfloat16 state is stored RNE.

4. float16 <-> float32 (NumPy has float16; Numba on the CPU does not)
----------------------------------------------------------------------
load (``f16_bits_to_f32``)::

    s = u32(h & 0x8000) << 16; e = (h >> 10) & 0x1f; m = h & 0x3ff
    e == 31:          u = s | 0x7f800000 | (m << 13)     # inf, NaN (payload kept)
    1 <= e <= 30:     u = s | ((e + 112) << 23) | (m << 13)
    e == 0, m == 0:   u = s                               # +-0
    e == 0, m != 0:   u = s | bits(f32(m) * 2**-24)       # subnormal: exact product

store, round to nearest even (``f32_to_f16_bits_rne``)::

    s = (u >> 16) & 0x8000; a = u & 0x7fffffff
    a > 0x7f800000:   h = s | 0x7e00                      # NaN -> quiet NaN, sign kept
    a >= 0x477ff000:  h = s | 0x7c00                      # >= 65520 (the tie above 65504) and inf
    a >= 0x38800000:  h = s | ((a - 0x38000000 + 0xfff + ((a >> 13) & 1)) >> 13)   # normal
    otherwise:        e = a >> 23; m = (a & 0x7fffff) | (0x800000 if e else 0)
                      sh = 126 - max(e, 1)                 # >= 14
                      if sh >= 25: h = s                  # below half the smallest subnormal
                      else: q = m >> sh; rem = m & ((1 << sh) - 1); half = 1 << (sh - 1)
                            h = s | (q + (rem > half or (rem == half and q & 1)))

This equals NumPy's ``astype(np.float16)`` for every non-NaN float32 (tested
on a large sample including every tie, subnormal and overflow boundary);
NumPy's NaN bits depend on how it was built (software keeps the payload,
F16C sets the quiet bit), so the canonical quiet NaN above is the contract.

Porting notes.  Numba: make every operand ``np.uint64``/``np.uint32``
(``z >> np.uint64(30)``, ``np.uint64(i) * G``) -- mixing an unsigned and a
signed integer, a loop index or a literal, promotes to float64 and the bits
are lost.  CUDA: ``unsigned long long`` constants with the ``ull`` suffix,
``__float_as_uint``/``__uint_as_float`` for the views, and no ``-ftz`` or
``--use_fast_math``: NumPy keeps float32 subnormals, so a kernel that flushes
them stops agreeing on tiny values.  ``tests/test_precision.py`` holds a Numba
and a C transcription of the recipes above, checked against this module, and
pinned outputs of ``random_bits`` and ``sr_bits`` for the kernels' own tests.  A master-weight
param is written as the round-to-nearest-even of its float32 master (1, 4).

5. The precision options
------------------------
Params and grads are float16, bfloat16, float32 or float64; arithmetic runs
in float32 for 16-bit params (float64 for float64).  ``resolve_state_dtype``,
``allowed_grad_dtypes`` and the ``check_*`` functions implement the option
rules; ``resolve_precision`` runs all of them for one param.  Their messages
name the option, the param and what was expected.
"""

from __future__ import annotations

import operator
import sys
from dataclasses import dataclass

import numpy as np

__all__ = [
    "BF16_EXTRA", "Q8", "Precision", "bfloat16_dtype", "is_bfloat16", "is_16bit", "as_dtype",
    "bf16_bits_to_f32", "f32_to_bf16_bits_rne", "f32_to_bf16_bits_sr",
    "f16_bits_to_f32", "f32_to_f16_bits_rne", "to_float32", "round_to",
    "mix64", "seed_key", "step_key", "random_bits", "sr_bits", "element_index",
    "compute_dtype", "allowed_grad_dtypes", "allowed_state_dtypes", "resolve_state_dtype",
    "check_param_dtype", "check_grad_dtype", "check_master_weights",
    "check_stochastic_rounding", "check_seed", "resolve_precision",
]

#: The pip extra that brings ``ml_dtypes`` (named in every bfloat16 ImportError).
BF16_EXTRA = "fastopt[bf16]"

_U64 = 1 << 64
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)

_F16 = np.dtype(np.float16)
_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)


# --------------------------------------------------------------------------- dtypes

def bfloat16_dtype() -> np.dtype:
    """``np.dtype(ml_dtypes.bfloat16)``, importing ml_dtypes now (ImportError naming the extra)."""
    try:
        import ml_dtypes
    except ImportError as exc:
        raise ImportError(
            "bfloat16 needs the ml_dtypes package, which is not installed: "
            f"pip install '{BF16_EXTRA}' (or pip install ml_dtypes)") from exc
    return np.dtype(ml_dtypes.bfloat16)


def is_bfloat16(dtype) -> bool:
    """True for ml_dtypes' bfloat16; never imports ml_dtypes (an array of it already did)."""
    if isinstance(dtype, str):
        return dtype == "bfloat16"
    dt = _np_dtype(dtype)
    return dt is not None and dt.name == "bfloat16" and dt.type.__module__.split(".")[0] == "ml_dtypes"


def is_16bit(dtype) -> bool:
    """True for float16 and bfloat16."""
    if isinstance(dtype, str):
        return dtype in ("float16", "half", "bfloat16")
    return is_bfloat16(dtype) or _np_dtype(dtype) == _F16


def _np_dtype(dtype):
    """``np.dtype(dtype)``, or None where that fails -- and for None (NumPy reads it as float64)."""
    if dtype is None:
        return None
    try:
        return np.dtype(dtype)
    except TypeError:
        return None


def as_dtype(dtype, name: str = "dtype") -> np.dtype:
    """One of the four supported float dtypes from a dtype, a scalar type or its name.

    ``"bfloat16"`` imports ml_dtypes (ImportError naming ``fastopt[bf16]`` when
    missing); anything else is a TypeError naming ``name``.
    """
    if isinstance(dtype, str):
        if dtype == "bfloat16":
            return bfloat16_dtype()
        if dtype not in ("float16", "half", "float32", "float64"):
            raise TypeError(f"{name}: expected float16, bfloat16, float32 or float64, got {dtype!r}")
        return np.dtype(dtype)
    if is_bfloat16(dtype):
        return np.dtype(dtype)
    dt = _np_dtype(dtype)
    # `dt is None` first: a dtype compares equal to None when it is float64 (np.dtype(None))
    if dt is None or dt not in (_F16, _F32, _F64):
        got = dt if dt is not None else type(dtype).__name__
        raise TypeError(f"{name}: expected float16, bfloat16, float32 or float64, got {got}")
    return dt


def compute_dtype(param_dtype) -> np.dtype:
    """The arithmetic dtype: float64 for float64 params, float32 for everything else."""
    return _F64 if as_dtype(param_dtype, "param dtype") == _F64 else _F32


# --------------------------------------------------------------------------- bit views

def _need(x, dtype: np.dtype, name: str, hint: str = "") -> np.ndarray:
    """A NumPy array of exactly ``dtype`` (no silent cast: a cast would round a second time)."""
    if not isinstance(x, (np.ndarray, np.generic)):
        raise TypeError(f"{name}: expected a numpy array or scalar of dtype {dtype}, "
                        f"got {type(x).__name__}")
    a = np.asarray(x)
    if a.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype}, got {a.dtype}{hint}")
    return a


def bf16_bits_to_f32(bits) -> np.ndarray:
    """float32 values of bfloat16 bit patterns (``uint16``); exact."""
    h = _need(bits, np.dtype(np.uint16), "bits", " (view a bfloat16 array as uint16)")
    return (h.astype(np.uint32) << np.uint32(16)).view(np.float32)


def _nan_bf16(u: np.ndarray) -> np.ndarray:
    return ((u >> np.uint32(16)) & np.uint32(0x8000)) | np.uint32(0x7FC0)


def _is_nan_bits(u: np.ndarray) -> np.ndarray:
    return (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)


def f32_to_bf16_bits_rne(x) -> np.ndarray:
    """bfloat16 bits (``uint16``) of float32 ``x``, rounded to nearest, ties to even.

    NaN -> the quiet NaN 0x7fc0 with the sign of x; overflow -> inf (section 1 of
    the module docstring has the exact bit recipe the kernels use).
    """
    u = _need(x, _F32, "x", " (cast to float32 first)").view(np.uint32)
    rounded = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    return np.where(_is_nan_bits(u), _nan_bf16(u), rounded).astype(np.uint16)


def f32_to_bf16_bits_sr(x, seed, step, index) -> np.ndarray:
    """bfloat16 bits (``uint16``) of float32 ``x``, rounded stochastically.

    ``index``: the flat index within its param of each element of ``x`` (an
    integer array broadcastable to ``x``; ``element_index`` builds it; ``step``
    may be an array too, and the result has the broadcast shape).  The
    result rounds up with probability equal to x's distance from the lower
    bfloat16 neighbour over the gap, using ``sr_bits(seed, step, index)``;
    NaN -> quiet NaN, +-inf unchanged (section 3 of the module docstring).
    """
    u = _need(x, _F32, "x", " (cast to float32 first)").view(np.uint32)
    r = sr_bits(seed, step, index).astype(np.uint32)
    try:
        np.broadcast_shapes(r.shape, u.shape)
    except ValueError:
        raise ValueError(f"index: expected a shape broadcastable to x's {u.shape}, got "
                         f"{np.shape(index)} (step: {np.shape(step)})") from None
    rounded = (u + r) >> np.uint32(16)  # u <= 0xff800000 for non-NaN: no u32 overflow
    return np.where(_is_nan_bits(u), _nan_bf16(u), rounded).astype(np.uint16)


def f16_bits_to_f32(bits) -> np.ndarray:
    """float32 values of float16 bit patterns (``uint16``) by integer operations; exact."""
    h = _need(bits, np.dtype(np.uint16), "bits", " (view a float16 array as uint16)").astype(np.uint32)
    s = (h & np.uint32(0x8000)) << np.uint32(16)
    e = (h >> np.uint32(10)) & np.uint32(0x1F)
    m = h & np.uint32(0x3FF)
    normal = s | ((e + np.uint32(112)) << np.uint32(23)) | (m << np.uint32(13))
    special = s | np.uint32(0x7F800000) | (m << np.uint32(13))
    # a subnormal is m * 2**-24: exact in float32 (m < 2**10) and a normal float32
    sub = s | (m.astype(np.float32) * np.float32(2.0 ** -24)).view(np.uint32)
    u = np.where(e == 31, special, np.where(e == 0, sub, normal))
    return u.view(np.float32)


def f32_to_f16_bits_rne(x) -> np.ndarray:
    """float16 bits (``uint16``) of float32 ``x``, rounded to nearest, ties to even.

    Integer operations only (section 4 of the module docstring), equal to
    NumPy's cast for every non-NaN input; NaN -> quiet NaN 0x7e00 with x's sign.
    """
    u = _need(x, _F32, "x", " (cast to float32 first)").view(np.uint32)
    s = (u >> np.uint32(16)) & np.uint32(0x8000)
    a = u & np.uint32(0x7FFFFFFF)
    with np.errstate(over="ignore"):
        normal = (a - np.uint32(0x38000000) + np.uint32(0xFFF) + ((a >> np.uint32(13)) & np.uint32(1))) \
            >> np.uint32(13)
    e = a >> np.uint32(23)
    m = (a & np.uint32(0x7FFFFF)) | np.where(e != 0, np.uint32(0x800000), np.uint32(0))
    sh = np.uint32(126) - np.maximum(e, np.uint32(1))
    sh = np.minimum(sh, np.uint32(25))           # >= 25 rounds to zero; keeps shifts < 32
    q = m >> sh
    rem = m & ((np.uint32(1) << sh) - np.uint32(1))
    half = np.uint32(1) << (sh - np.uint32(1))
    up = (rem > half) | ((rem == half) & ((q & np.uint32(1)) == 1))
    sub = np.where(sh >= 25, np.uint32(0), q + up.astype(np.uint32))
    h = np.where(a > np.uint32(0x7F800000), np.uint32(0x7E00),
                 np.where(a >= np.uint32(0x477FF000), np.uint32(0x7C00),
                          np.where(a >= np.uint32(0x38800000), normal, sub)))
    return (s | h).astype(np.uint16)


def to_float32(a) -> np.ndarray:
    """float32 values of a float16, bfloat16 or float32 NumPy array (exact; a copy)."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"a: expected a numpy array, got {type(a).__name__}")
    if is_bfloat16(a.dtype):
        return bf16_bits_to_f32(a.view(np.uint16))
    if a.dtype == _F16:
        return f16_bits_to_f32(a.view(np.uint16))
    if a.dtype == _F32:
        return a.copy()
    raise TypeError(f"a: expected dtype float16, bfloat16 or float32, got {a.dtype}")


def round_to(x, dtype, *, stochastic_rounding: bool = False, seed=0, step=None, index=None):
    """float32 ``x`` stored as ``dtype`` (float16, bfloat16 or float32): one rounding.

    Nearest-even by default; ``stochastic_rounding=True`` (bfloat16 only) takes
    ``seed``, ``step`` and ``index`` as :func:`f32_to_bf16_bits_sr` does.
    """
    x = _need(x, _F32, "x", " (cast to float32 first)")
    dt = as_dtype(dtype)
    if stochastic_rounding:
        if not is_bfloat16(dt):
            raise ValueError(f"stochastic_rounding: expected False for dtype {dt}, got True "
                             "(stochastic rounding is defined for bfloat16 only)")
        if step is None or index is None:
            raise TypeError("round_to: stochastic_rounding=True needs step= and index=")
        return f32_to_bf16_bits_sr(x, seed, step, index).view(dt)
    if is_bfloat16(dt):
        return f32_to_bf16_bits_rne(x).view(dt)
    if dt == _F16:
        return f32_to_f16_bits_rne(x).view(np.float16)
    if dt == _F32:
        return x.copy()
    raise TypeError(f"dtype: expected float16, bfloat16 or float32, got {dt}")


# --------------------------------------------------------------------------- the hash

def _check_u64(value, name: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an integer in [0, 2**64), got {type(value).__name__}")
    v = operator.index(value)
    if not 0 <= v < _U64:
        raise ValueError(f"{name}: expected an integer in [0, 2**64), got {v}")
    return v


def _mix64_int(z: int) -> int:
    m = _U64 - 1
    z ^= z >> 30
    z = (z * 0xBF58476D1CE4E5B9) & m
    z ^= z >> 27
    z = (z * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def mix64(z) -> np.ndarray:
    """SplitMix64's output function on a ``uint64`` array (wrapping arithmetic)."""
    z = _need(z, np.dtype(np.uint64), "z")
    with np.errstate(over="ignore"):
        z = z ^ (z >> np.uint64(30))
        z = z * _M1
        z = z ^ (z >> np.uint64(27))
        z = z * _M2
        return z ^ (z >> np.uint64(31))


def seed_key(seed) -> int:
    """``mix64(seed + G)`` as a Python int: the start of the seed's sequence of step keys."""
    return _mix64_int((_check_u64(seed, "seed") + 0x9E3779B97F4A7C15) % _U64)


def step_key(seed, step) -> int:
    """The u64 a kernel receives for one step: ``mix64(seed_key(seed) + step * G)``."""
    t = _check_u64(step, "step")
    return _mix64_int((seed_key(seed) + t * 0x9E3779B97F4A7C15) % _U64)


def _as_u64_array(value, name: str) -> np.ndarray:
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return np.asarray(_check_u64(value, name), dtype=np.uint64)
    a = np.asarray(value) if isinstance(value, (np.ndarray, list, tuple, range)) else None
    if a is None or a.dtype.kind not in "iu":
        got = a.dtype if a is not None else type(value).__name__
        raise TypeError(f"{name}: expected a non-negative integer or integer array, got {got}")
    if a.dtype.kind == "i" and a.size and a.min() < 0:
        raise ValueError(f"{name}: expected non-negative integers, got {int(a.min())}")
    return a.astype(np.uint64)


def random_bits(seed, step, index) -> np.ndarray:
    """uint32 random bits of (seed, step, element index); no state, same on every backend.

    ``seed``: an int in [0, 2**64); ``step`` and ``index``: non-negative ints or
    integer arrays, broadcast together.  Definition and the argument for its
    quality: section 2 of the module docstring.
    """
    skey = seed_key(seed)
    t = _as_u64_array(step, "step")
    i = _as_u64_array(index, "index")
    with np.errstate(over="ignore"):
        k = mix64(np.uint64(skey) + t * _GAMMA)
        z = mix64(k + i * _GAMMA)
    return (z >> np.uint64(32)).astype(np.uint32)


def sr_bits(seed, step, index) -> np.ndarray:
    """uint16 stochastic-rounding bits of (seed, step, element index); same on every backend.

    Slice ``index & 3`` of the hash of the group ``index >> 2`` (four consecutive
    elements share one ``mix64``).  Arguments as :func:`random_bits`; definition
    and quality argument: section 2 of the module docstring.  An index of consecutive
    integers (``element_index``) at one step hashes each group once, as the kernels do;
    any other index is hashed element by element, with the same bits.
    """
    skey = seed_key(seed)
    t = _as_u64_array(step, "step")
    i = _as_u64_array(index, "index")
    with np.errstate(over="ignore"):
        k = mix64(np.uint64(skey) + t * _GAMMA)
        fast = _sr_bits_of_a_range(k, i)
        if fast is not None:
            return fast
        z = mix64(k + (i >> np.uint64(2)) * _GAMMA)
    return ((z >> ((i & np.uint64(3)) << np.uint64(4))) & np.uint64(0xFFFF)).astype(np.uint16)


def _sr_bits_of_a_range(k: np.ndarray, i: np.ndarray):
    """``sr_bits`` of consecutive indices (C order) at one step key ``k``, one ``mix64``
    per group of four, as the kernels do: the hashes' uint16 view holds the slices in
    element order on a little-endian machine.  None when ``i`` is not such a range."""
    if k.ndim != 0 or i.size < 16 or sys.byteorder != "little":
        return None
    flat = i.reshape(-1)
    lo, n = int(flat[0]), flat.size
    if int(flat[-1]) - lo != n - 1 or not np.array_equal(flat, np.arange(lo, lo + n, dtype=np.uint64)):
        return None
    groups = np.arange(((lo & 3) + n + 3) >> 2, dtype=np.uint64) + np.uint64(lo >> 2)
    z = mix64(k + groups * _GAMMA)
    return z.view(np.uint16)[lo & 3:(lo & 3) + n].reshape(i.shape)


def element_index(shape, offset: int = 0) -> np.ndarray:
    """The within-param flat indices of a C-ordered block of ``shape`` starting at ``offset``."""
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    n = int(np.prod(shape, dtype=np.int64))
    start = _check_u64(offset, "offset")
    return np.arange(start, start + n, dtype=np.uint64).reshape(shape)


# --------------------------------------------------------------------------- the options

class _Q8Marker:
    """Returned by :func:`resolve_state_dtype` for ``"q8"`` (the 8-bit block format)."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "fastopt.precision.Q8"

    def __reduce__(self):
        return (_Q8Marker, ())


#: Marker of the 8-bit state format (uint8 codes + a float32 absmax per block).
Q8 = _Q8Marker()


def check_param_dtype(dtype, label: str = "params[0]") -> np.dtype:
    """The param's dtype if fastopt takes it (float16/bfloat16/float32/float64), else TypeError."""
    return as_dtype(dtype, f"{label} dtype")


def allowed_grad_dtypes(param_dtype) -> tuple:
    """Grad dtypes a param takes: its own, or float32 (accumulated grads)."""
    dt = as_dtype(param_dtype, "param dtype")
    return (dt,) if dt == _F32 else (dt, _F32)


def check_grad_dtype(param_dtype, grad_dtype, label: str = "grads[0]") -> None:
    """ValueError unless ``grad_dtype`` is one of :func:`allowed_grad_dtypes`."""
    allowed = allowed_grad_dtypes(param_dtype)
    gd = _np_dtype(grad_dtype)
    if gd is None or gd not in allowed:
        names = " or ".join(str(d) for d in allowed)
        got = gd if gd is not None else repr(grad_dtype)
        raise ValueError(f"{label}: expected dtype {names} (its param is {allowed[0]}), got {got}")


def allowed_state_dtypes(param_dtype) -> tuple:
    """Names of the float dtypes ``state_dtype=`` may give for a param of ``param_dtype``.

    16-bit and float32 params compute in float32, so their state is float32 or
    bfloat16 (float32's range, half the bytes); float16 state only for float16
    params (torch's ``"param"`` behaviour: float16's range loses second moments
    below 6e-8 and above 65504).  float64 params keep float64 state.  Names,
    not dtypes, so that asking never imports ml_dtypes.
    """
    dt = as_dtype(param_dtype, "param dtype")
    if dt == _F64:
        return ("float64",)
    return ("float32", "bfloat16", "float16") if dt == _F16 else ("float32", "bfloat16")


def resolve_state_dtype(param_dtype, state_dtype=None, label: str = "params[0]"):
    """The dtype of the moment buffers of a param: a ``np.dtype``, or :data:`Q8`.

    ``None``: float32 for float16/bfloat16 params, else the param dtype.
    ``"param"``: the param dtype (torch's behaviour).  ``"q8"``: the 8-bit
    block format (:data:`Q8`; not for float64 params).  A dtype or its name:
    one of :func:`allowed_state_dtypes`.
    """
    dt = as_dtype(param_dtype, f"{label} dtype")
    if state_dtype is None:
        return _F32 if is_16bit(dt) else dt
    if isinstance(state_dtype, str) and state_dtype == "param":
        return dt
    if isinstance(state_dtype, str) and state_dtype == "q8":
        if dt == _F64:
            raise ValueError(f"state_dtype: expected None, 'param' or float64 for {label} of dtype "
                             "float64, got 'q8' (the 8-bit state is for float32 and 16-bit params)")
        return Q8
    if isinstance(state_dtype, str) and state_dtype not in ("float16", "half", "bfloat16", "float32",
                                                           "float64"):
        raise ValueError(f"state_dtype: expected None, 'param', 'q8', 'float32' or 'bfloat16', "
                         f"got {state_dtype!r}")
    sd = as_dtype(state_dtype, "state_dtype")
    allowed = allowed_state_dtypes(dt)
    if sd.name not in allowed:
        names = ", ".join(allowed)
        raise ValueError(f"state_dtype: expected one of {names} for {label} of dtype {dt}, got {sd}")
    return sd


def _check_bool(value, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected True or False, got {type(value).__name__}")
    return bool(value)


def check_master_weights(param_dtype, master_weights, label: str = "params[0]") -> bool:
    """``master_weights=True`` is for float16/bfloat16 params only (ValueError otherwise)."""
    on = _check_bool(master_weights, "master_weights")
    dt = as_dtype(param_dtype, f"{label} dtype")
    if on and not is_16bit(dt):
        raise ValueError(f"master_weights: expected False for {label} of dtype {dt}, got True "
                         "(a float32 master copy is kept only for float16 and bfloat16 params)")
    return on


def check_stochastic_rounding(param_dtype, stochastic_rounding, master_weights=False,
                              label: str = "params[0]") -> bool:
    """``stochastic_rounding=True`` is for bfloat16 params without master weights only."""
    on = _check_bool(stochastic_rounding, "stochastic_rounding")
    master = _check_bool(master_weights, "master_weights")
    dt = as_dtype(param_dtype, f"{label} dtype")
    if on and not is_bfloat16(dt):
        raise ValueError(f"stochastic_rounding: expected False for {label} of dtype {dt}, got True "
                         "(stochastic rounding is for bfloat16 params)")
    if on and master:
        raise ValueError(f"stochastic_rounding: expected False with master_weights=True, got True "
                         f"({label} is written as round-to-nearest-even of its float32 master)")
    return on


def check_seed(seed) -> int:
    """``seed`` as a Python int in [0, 2**64) (TypeError/ValueError naming it otherwise)."""
    return _check_u64(seed, "seed")


@dataclass(frozen=True)
class Precision:
    """The resolved precision options of one param."""

    param: np.dtype
    compute: np.dtype
    state: object          # np.dtype or Q8
    master_weights: bool
    stochastic_rounding: bool
    seed: int


def resolve_precision(param_dtype, grad_dtype=None, *, state_dtype=None, master_weights=False,
                      stochastic_rounding=False, seed=0, kind: str | None = None,
                      label: str = "params[0]") -> Precision:
    """Every option check for one param, in order, before anything is written.

    ``kind``: the rule's kind (``fastopt._rules`` kinds); ``"dense_solve"``
    (Newton) takes float32/float64 params only.  ``label`` names the param in
    messages; the grad is named ``grads[...]`` with the same index.
    """
    dt = check_param_dtype(param_dtype, label)
    if kind == "dense_solve" and dt not in (_F32, _F64):
        raise TypeError(f"{label}: expected dtype float32 or float64 (the dense Newton solve has "
                        f"no reduced-precision form), got {dt}")
    if grad_dtype is not None:
        check_grad_dtype(dt, grad_dtype, label.replace("params", "grads", 1))
    state = resolve_state_dtype(dt, state_dtype, label)
    # Muon and Adafactor take 16-bit params through the widening driver (fastopt._widen,
    # docs/design.md "Precision"): float32 copies, the float32 kernel, one rounding per write.
    # Muon's momentum buffer is elementwise state, so the driver also decodes and re-encodes
    # it in the 8-bit block format (float32 or 16-bit params); Adafactor's row/column
    # factors are not elementwise: q8 stays refused there.
    what = {"factored": "Adafactor's row/column factors", "orthogonalize": "Muon's momentum buffer"}
    if kind == "factored" and state is Q8 and is_16bit(dt):
        raise ValueError(f"state_dtype: expected None, 'param', 'float32' or 'bfloat16' for "
                         f"Adafactor (the 8-bit block format is for elementwise moments, not "
                         f"{what[kind]}), got 'q8'")
    if kind in what and not is_16bit(dt) and state != dt and \
            not (kind == "orthogonalize" and state is Q8):
        q8_too = " or the 8-bit 'q8'" if kind == "orthogonalize" else ""
        raise ValueError(f"state_dtype: expected None or 'param' for "
                         f"{'Adafactor' if kind == 'factored' else 'Muon'} with {dt} params "
                         f"({what[kind]}: kept in the param's dtype{q8_too}; a narrower float "
                         f"state is for float16/bfloat16 params), got {state_dtype!r}")
    master = check_master_weights(dt, master_weights, label)
    sr = check_stochastic_rounding(dt, stochastic_rounding, master, label)
    return Precision(param=dt, compute=compute_dtype(dt), state=state, master_weights=master,
                     stochastic_rounding=sr, seed=check_seed(seed))
