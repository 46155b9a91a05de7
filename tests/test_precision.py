"""fastopt.precision: 16-bit formats, the counter-based hash, stochastic rounding, the options.

The conversions are checked against ml_dtypes' and NumPy's own casts (all 2**16
16-bit patterns, a large sample of float32 patterns with every tie, subnormal,
overflow boundary and NaN payload); the hash against an independent pure-Python
transcription and against Numba and C transcriptions of the module docstring's
recipe, so the kernel ports start from a checked text.
"""

from __future__ import annotations

import math
import pickle
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastopt.precision as P

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
F16, F32, F64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)

ALL16 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
MASK64 = (1 << 64) - 1


def f32(bits) -> np.ndarray:
    return np.asarray(bits, dtype=np.uint32).view(np.float32)


def float32_sample(n_random: int = 1 << 21, seed: int = 12) -> np.ndarray:
    """float32 bit patterns: random ones plus every structured case a rounding can get wrong."""
    rng = np.random.default_rng(seed)
    hi = ALL16.astype(np.uint32) << 16
    # for every 16-bit prefix: exact, just above, below/at/above the halfway point, just below the next
    lows = np.array([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF], dtype=np.uint32)
    bf_cases = (hi[:, None] | lows[None, :]).ravel()
    # float16's grid sits at bit 13: the same around every float16 value of float32's patterns
    h = ALL16.view(np.float16)
    h32 = h[np.isfinite(h)].astype(np.float32).view(np.uint32)
    d = np.array([-0x1001, -0x1000, -0xFFF, -1, 0, 1, 0xFFF, 0x1000, 0x1001], dtype=np.int64)
    f16_cases = (h32[:, None].astype(np.int64) + d[None, :]).ravel()
    f16_cases = f16_cases[(f16_cases >= 0) & (f16_cases < 1 << 32)].astype(np.uint32)
    # float16 subnormal ties: odd multiples of 2**-25 (half of the smallest subnormal) and neighbours
    k = np.arange(0, 2050, dtype=np.float64)
    ties = ((k + 0.5) * 2.0 ** -24).astype(np.float32).view(np.uint32)
    ties = np.concatenate([ties, ties + 1, ties - 1])
    edges = np.array([0, 1, 0x7FFFFF, 0x800000, 0x7F7F0000, 0x7F7F7FFF, 0x7F7F8000, 0x7F7F8001,
                      0x7F7FFFFF, 0x7F800000, 0x7F800001, 0x7FA00000, 0x7FBFFFFF, 0x7FC00000,
                      0x7FC00001, 0x7FFFFFFF, 0x477FE000, 0x477FEFFF, 0x477FF000, 0x477FF001,
                      0x47800000, 0x387FFFFF, 0x38800000, 0x33000000, 0x33000001, 0x32FFFFFF],
                     dtype=np.uint32)
    signed = np.concatenate([edges, ties, f16_cases, bf_cases])
    signed = np.concatenate([signed, signed | np.uint32(0x80000000)])
    rand = rng.integers(0, 1 << 32, size=n_random, dtype=np.uint64).astype(np.uint32)
    return np.concatenate([signed, rand])


# --------------------------------------------------------------------------- bfloat16

def test_bf16_load_is_ml_dtypes_cast_on_every_pattern():
    got = P.bf16_bits_to_f32(ALL16).view(np.uint32)
    want = ALL16.view(BF16).astype(np.float32).view(np.uint32)
    np.testing.assert_array_equal(got, want)


def test_bf16_rne_round_trips_every_bf16_pattern():
    x = P.bf16_bits_to_f32(ALL16)
    got = P.f32_to_bf16_bits_rne(x)
    nan = np.isnan(x)
    np.testing.assert_array_equal(got[~nan], ALL16[~nan])
    # NaN: the quiet NaN with its sign, as ml_dtypes gives it
    np.testing.assert_array_equal(got[nan], (ALL16[nan] & 0x8000) | 0x7FC0)


def test_bf16_rne_is_ml_dtypes_cast_bit_for_bit():
    u = float32_sample()
    x = f32(u)
    with np.errstate(invalid="ignore"):
        want = x.astype(BF16).view(np.uint16)
    got = P.f32_to_bf16_bits_rne(x)
    bad = np.flatnonzero(got != want)
    assert bad.size == 0, [(hex(u[i]), hex(got[i]), hex(want[i])) for i in bad[:5]]


@pytest.mark.parametrize("bits, want", [
    (0x3F808000, 0x3F80),   # 1 + 2**-8: a tie, to the even 1.0
    (0x3F818000, 0x3F82),   # 1 + 3 * 2**-8: a tie, up to the even neighbour
    (0x3F808001, 0x3F81),   # just above the tie: up
    (0x3F807FFF, 0x3F80),   # just below: down
    (0x7F7F7FFF, 0x7F7F),   # below the overflow midpoint: the largest finite bfloat16
    (0x7F7F8000, 0x7F80),   # the midpoint between 0x7f7f and 2**128: a tie, to inf (0x7f80 is even)
    (0x7F7FFFFF, 0x7F80),   # float32's max: inf
    (0xFF7FFFFF, 0xFF80),
    (0x7F800000, 0x7F80),   # inf
    (0xFF800000, 0xFF80),
    (0x7F800001, 0x7FC0),   # signalling NaN -> quiet NaN
    (0xFFA12345, 0xFFC0),   # sign kept
    (0x80000000, 0x8000),   # -0
    (0x00000001, 0x0000),   # the smallest float32 subnormal: far below half a bfloat16 subnormal
    (0x00008000, 0x0000),   # a subnormal tie: to even 0
    (0x00018000, 0x0002),   # a subnormal tie: to even 2
    (0x007FFFFF, 0x0080),   # the largest subnormal rounds up into the smallest normal
])
def test_bf16_rne_known_values(bits, want):
    assert int(P.f32_to_bf16_bits_rne(f32([bits]))[0]) == want


def test_bit_functions_refuse_other_dtypes_without_casting():
    with pytest.raises(TypeError, match=r"x: expected dtype float32, got float64"):
        P.f32_to_bf16_bits_rne(np.ones(3))
    with pytest.raises(TypeError, match=r"x: expected a numpy array or scalar of dtype float32, got list"):
        P.f32_to_f16_bits_rne([1.0])
    with pytest.raises(TypeError, match=r"bits: expected dtype uint16, got int32"):
        P.bf16_bits_to_f32(np.ones(3, np.int32))
    with pytest.raises(TypeError, match=r"bits: expected dtype uint16, got float16"):
        P.f16_bits_to_f32(np.ones(3, np.float16))


# --------------------------------------------------------------------------- float16

def test_f16_load_is_numpy_cast_on_every_pattern():
    got = P.f16_bits_to_f32(ALL16)
    want = ALL16.view(np.float16).astype(np.float32)
    nan = np.isnan(want)
    np.testing.assert_array_equal(got.view(np.uint32)[~nan], want.view(np.uint32)[~nan])
    assert np.isnan(got[nan]).all()
    # NaN payloads are kept (the quiet bit lands on float32's quiet bit)
    np.testing.assert_array_equal(got.view(np.uint32)[nan] & 0x7FFFFF,
                                  (ALL16[nan].astype(np.uint32) & 0x3FF) << 13)


def test_f16_rne_is_numpy_cast_on_non_nan_and_quiet_nan_otherwise():
    u = float32_sample(seed=3)
    x = f32(u)
    with np.errstate(invalid="ignore", over="ignore"):
        want = x.astype(np.float16).view(np.uint16)
    got = P.f32_to_f16_bits_rne(x)
    nan = np.isnan(x)
    bad = np.flatnonzero((got != want) & ~nan)
    assert bad.size == 0, [(hex(u[i]), hex(got[i]), hex(want[i])) for i in bad[:5]]
    np.testing.assert_array_equal(got[nan], ((u[nan] >> 16) & 0x8000) | 0x7E00)


def test_numpy_float16_cast_is_round_to_nearest_even():
    """NumPy's cast, judged on its own: the nearest float16, ties to the even significand."""
    u = float32_sample(n_random=1 << 18, seed=4)
    x = f32(u)
    x = x[np.isfinite(x) & (np.abs(x) < 65504)]
    y = x.astype(np.float16)
    with np.errstate(over="ignore"):  # nextafter(+-65504) is +-inf: only where y is not the result
        lo = np.where(y.astype(np.float32) <= x, y, np.nextafter(y, np.float16(-np.inf)))
        hi = np.nextafter(lo, np.float16(np.inf))
    xd = x.astype(np.float64)
    dlo, dhi = xd - lo.astype(np.float64), hi.astype(np.float64) - xd
    assert (dlo >= 0).all() and (dhi >= 0).all()
    nearest = np.where(dlo < dhi, lo, np.where(dhi < dlo, hi,
                       np.where(lo.view(np.uint16) & 1 == 0, lo, hi)))
    # -0.0 and 0.0 compare equal: compare values, and signs where the value is zero
    np.testing.assert_array_equal(y.astype(np.float64), nearest.astype(np.float64))
    assert (np.signbit(y) == np.signbit(x)).all()


@pytest.mark.parametrize("value, want", [
    (65519.0, 0x7BFF),           # below the midpoint above 65504: 65504
    (65520.0, 0x7C00),           # the midpoint: a tie, to inf (0x7c00 is even)
    (2049.0, 0x6800),            # a tie between 2048 and 2050: to 2048
    (2051.0, 0x6802),            # a tie between 2050 and 2052: to 2052
    (2.0 ** -25, 0x0000),        # half the smallest subnormal: a tie, to 0
    (3 * 2.0 ** -25, 0x0002),    # a subnormal tie: to even 2
    (2.0 ** -14 - 2.0 ** -26, 0x0400),  # the largest subnormal region rounds into the smallest normal
    (-0.0, 0x8000),
])
def test_f16_rne_known_values(value, want):
    assert int(P.f32_to_f16_bits_rne(np.array([value], np.float32))[0]) == want


# --------------------------------------------------------------------------- lazy bfloat16

def test_bit_functions_and_import_never_import_ml_dtypes():
    code = textwrap.dedent("""
        import sys, numpy as np
        import fastopt, fastopt.precision as P
        x = np.linspace(-3, 3, 11, dtype=np.float32)
        P.f32_to_bf16_bits_rne(x); P.f32_to_bf16_bits_sr(x, 1, 2, P.element_index(x.shape))
        P.f32_to_f16_bits_rne(x); P.bf16_bits_to_f32(np.arange(5, dtype=np.uint16))
        P.resolve_state_dtype(np.float16); P.resolve_state_dtype(np.float32, "float32")
        P.allowed_state_dtypes(np.float16); P.is_bfloat16(np.float32)
        P.resolve_precision(np.float16, np.float32, master_weights=True)
        assert "ml_dtypes" not in sys.modules, "ml_dtypes was imported"
    """)
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bfloat16_without_ml_dtypes_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # makes `import ml_dtypes` fail
    for call in (P.bfloat16_dtype, lambda: P.as_dtype("bfloat16"),
                 lambda: P.resolve_state_dtype(np.float16, "bfloat16"),
                 lambda: P.round_to(np.ones(2, np.float32), "bfloat16")):
        with pytest.raises(ImportError, match=r"pip install 'fastopt\[bf16\]'"):
            call()
    # the rest keeps working
    assert P.resolve_state_dtype(np.float16) == F32


def test_bf16_extra_in_pyproject():
    import tomllib
    from pathlib import Path
    meta = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    extras = meta["optional-dependencies"]
    assert any(req.startswith("ml_dtypes") for req in extras["bf16"])
    assert P.BF16_EXTRA == "fastopt[bf16]"


def test_to_float32_and_round_to():
    x = np.array([1.0, 1.00390625, -2.5e-6, 70000.0, np.inf, np.nan], np.float32)
    b = P.round_to(x, "bfloat16")
    assert b.dtype == BF16
    np.testing.assert_array_equal(b.view(np.uint16), x.astype(BF16).view(np.uint16))
    np.testing.assert_array_equal(P.to_float32(b), b.astype(np.float32))
    h = P.round_to(x, np.float16)
    assert h.dtype == F16 and h[3] == np.inf
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(P.to_float32(h)[:5], x.astype(np.float16).astype(np.float32)[:5])
    s = P.round_to(x, BF16, stochastic_rounding=True, seed=5, step=1, index=P.element_index(6))
    np.testing.assert_array_equal(s.view(np.uint16),
                                  P.f32_to_bf16_bits_sr(x, 5, 1, np.arange(6)))
    with pytest.raises(ValueError, match=r"stochastic_rounding: expected False for dtype float16"):
        P.round_to(x, np.float16, stochastic_rounding=True, step=1, index=np.arange(6))
    with pytest.raises(TypeError, match=r"a: expected dtype float16, bfloat16 or float32, got float64"):
        P.to_float32(np.ones(2))


# --------------------------------------------------------------------------- the hash

G = 0x9E3779B97F4A7C15


def py_mix(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def py_step_key(seed: int, step: int) -> int:
    return py_mix((py_mix((seed + G) & MASK64) + step * G) & MASK64)


def py_random_bits(seed: int, step: int, index: int) -> int:
    """The docstring's definition in Python integers (independent of the NumPy code)."""
    return py_mix((py_step_key(seed, step) + index * G) & MASK64) >> 32


def py_sr_bits(seed: int, step: int, index: int) -> int:
    """``sr_bits`` by the docstring's definition in Python integers: slice ``index % 4`` of
    the hash of group ``index // 4``."""
    return (py_mix((py_step_key(seed, step) + (index // 4) * G) & MASK64) >> (16 * (index % 4))) & 0xFFFF


SEEDS = [0, 1, 2, 12345, 1 << 63, MASK64]
STEPS = [0, 1, 2, 1000, 10 ** 9, MASK64]
INDICES = [0, 1, 2, 3, 255, 256, (1 << 32) - 1, 1 << 32, (1 << 40) + 3, MASK64]


def test_random_bits_match_the_written_definition():
    idx = np.array(INDICES, dtype=np.uint64)
    for seed in SEEDS:
        for step in STEPS:
            got = P.random_bits(seed, step, idx)
            assert got.dtype == np.uint32
            assert got.tolist() == [py_random_bits(seed, step, i) for i in INDICES]
            assert P.step_key(seed, step) == py_step_key(seed, step)
    z = np.array([0, 1, G, MASK64], dtype=np.uint64)
    assert P.mix64(z).tolist() == [py_mix(int(v)) for v in z]


def test_random_bits_golden_values():
    """Pinned outputs: a change of definition breaks every stored SR run; ports test against these."""
    assert [int(v) for v in P.random_bits(0, 1, np.arange(4))] == \
        [py_random_bits(0, 1, i) for i in range(4)] == [3030037623, 595752380, 4170851686, 1193283101]
    assert P.step_key(0, 1) == 0xA706DD2F4D197E6F


def test_sr_bits_match_the_written_definition():
    idx = np.array(INDICES, dtype=np.uint64)
    for seed in SEEDS:
        for step in STEPS:
            got = P.sr_bits(seed, step, idx)
            assert got.dtype == np.uint16
            assert got.tolist() == [py_sr_bits(seed, step, i) for i in INDICES]


def test_sr_bits_known_answers():
    """Pinned outputs of the definition (Python integers): ports test against these."""
    # step_key(0, 1) = 0xa706dd2f4d197e6f; mix64 of it (group 0) = 0xb49ab477bb8685e2,
    # whose four 16-bit slices, lowest first, are the bits of elements 0..3
    assert py_mix(P.step_key(0, 1)) == 0xB49AB477BB8685E2
    assert [py_sr_bits(0, 1, i) for i in range(8)] == \
        [0x85E2, 0xBB86, 0xB477, 0xB49A, 48785, 14588, 30140, 9090]
    assert P.sr_bits(0, 1, np.arange(8)).tolist() == [py_sr_bits(0, 1, i) for i in range(8)]
    far = [5, 6, (1 << 40) + 3, MASK64]
    assert [py_sr_bits(12345, 7, i) for i in far] == [3112, 10953, 6753, 61966]
    assert P.sr_bits(12345, 7, np.array(far, np.uint64)).tolist() == [3112, 10953, 6753, 61966]
    # the group shares the hash that random_bits (Dropout's) draws for element 0: its top 32 bits
    assert P.random_bits(0, 1, np.arange(1)).tolist() == [0xB49AB477]


def test_sr_bits_of_a_range_at_any_offset():
    """A range that starts or ends inside a group of four gets the whole param's bits."""
    full = P.sr_bits(21, 3, P.element_index(64))
    for lo, hi in ((5, 64), (1, 3), (2, 7), (3, 4), (6, 61), (0, 1)):
        np.testing.assert_array_equal(P.sr_bits(21, 3, P.element_index(hi - lo, offset=lo)),
                                      full[lo:hi])


@pytest.mark.parametrize("offset", [0, 1, 2, 3, 5, MASK64 - 40])
def test_sr_bits_of_a_range_hash_each_group_once_with_the_same_bits(offset):
    """A range of consecutive indices at one step takes the path that hashes each group of
    four once; it gives the per-element definition's bits (a reversed index, which is no
    range, takes the elementwise path), at any start and size, in any shape."""
    for n in (16, 17, 33, 41):
        idx = P.element_index(n, offset=offset)
        got = P.sr_bits(77, 5, idx)
        np.testing.assert_array_equal(got, P.sr_bits(77, 5, idx[::-1])[::-1])
        assert got.tolist()[:3] + got.tolist()[-2:] == \
            [py_sr_bits(77, 5, offset + j) for j in (0, 1, 2, n - 2, n - 1)]
    idx = P.element_index((3, 11), offset=offset)
    np.testing.assert_array_equal(P.sr_bits(77, 5, idx), P.sr_bits(77, 5, idx.ravel()[::-1])[::-1]
                                  .reshape(3, 11))


def test_random_bits_broadcast_step_and_index():
    steps = np.arange(1, 4)[:, None]
    got = P.random_bits(7, steps, np.arange(5))
    assert got.shape == (3, 5)
    for t in range(3):
        np.testing.assert_array_equal(got[t], P.random_bits(7, t + 1, np.arange(5)))


@pytest.mark.parametrize("call, exc, msg", [
    (lambda: P.random_bits(-1, 1, [0]), ValueError, r"seed: expected an integer in \[0, 2\*\*64\), got -1"),
    (lambda: P.random_bits(1 << 64, 1, [0]), ValueError, r"seed: expected an integer in \[0, 2\*\*64\)"),
    (lambda: P.random_bits(1.5, 1, [0]), TypeError, r"seed: expected an integer .* got float"),
    (lambda: P.random_bits(True, 1, [0]), TypeError, r"seed: expected an integer .* got bool"),
    (lambda: P.random_bits(0, -3, [0]), ValueError, r"step: expected an integer in \[0, 2\*\*64\), got -3"),
    (lambda: P.random_bits(0, np.array([1, -1]), [0]), ValueError, r"step: expected non-negative"),
    (lambda: P.random_bits(0, 1, np.array([0.5])), TypeError, r"index: expected a non-negative integer"),
    (lambda: P.random_bits(0, 1, [-2]), ValueError, r"index: expected non-negative integers, got -2"),
    (lambda: P.check_seed("7"), TypeError, r"seed: expected an integer .* got str"),
])
def test_random_bits_bad_input(call, exc, msg):
    with pytest.raises(exc, match=msg):
        call()


@pytest.mark.parametrize("call, exc, msg", [
    (lambda: P.sr_bits(-1, 1, [0]), ValueError, r"seed: expected an integer in \[0, 2\*\*64\), got -1"),
    (lambda: P.sr_bits(0, -3, [0]), ValueError, r"step: expected an integer in \[0, 2\*\*64\), got -3"),
    (lambda: P.sr_bits(0, 1, np.array([0.5])), TypeError, r"index: expected a non-negative integer"),
    (lambda: P.sr_bits(0, 1, [-2]), ValueError, r"index: expected non-negative integers, got -2"),
])
def test_sr_bits_bad_input(call, exc, msg):
    with pytest.raises(exc, match=msg):
        call()


def chi2_uniform(counts: np.ndarray) -> float:
    """(chi2 - dof) / sqrt(2 dof): about N(0, 1) for uniform counts with many cells."""
    e = counts.sum() / counts.size
    chi2 = float(((counts - e) ** 2).sum() / e)
    dof = counts.size - 1
    return (chi2 - dof) / math.sqrt(2 * dof)


@pytest.mark.parametrize("seed", [0xDEADBEEF])
def test_random_bits_quality_along_the_index(seed):
    """Dropout's 32 bits per element (stochastic rounding's: test_sr_bits_quality)."""
    n = 1 << 22
    r = P.random_bits(seed, 1, np.arange(n, dtype=np.uint64))
    # every one of the 32 bits is set half of the time (sigma = 0.5 / sqrt(n) = 2.4e-4)
    freq = np.array([np.count_nonzero((r >> np.uint32(b)) & np.uint32(1)) / n for b in range(32)])
    assert np.abs(freq - 0.5).max() < 6 * 0.5 / math.sqrt(n), freq
    # the low 16 bits: uniform over all 65536 values (64 per cell)
    assert abs(chi2_uniform(np.bincount(r & 0xFFFF, minlength=1 << 16))) < 5
    # neighbouring elements independent: top bytes of (r[i], r[i+1]) uniform over 65536 pairs
    pair = ((r[:-1] >> 24) << 8) | (r[1:] >> 24)
    assert abs(chi2_uniform(np.bincount(pair, minlength=1 << 16))) < 5
    # and no linear correlation of the low bits between neighbours (sigma = 1 / sqrt(n) = 4.9e-4)
    lo = (r & 0xFFFF).astype(np.float64)
    assert abs(np.corrcoef(lo[:-1], lo[1:])[0, 1]) < 6 / math.sqrt(n)


def test_random_bits_quality_along_the_step():
    """One element over many steps: what the stagnation average relies on."""
    n_steps = 1 << 20
    steps = np.arange(1, n_steps + 1, dtype=np.uint64)[:, None]
    r = P.random_bits(3, steps, np.array([0, 1, 12345], dtype=np.uint64))
    for col in r.T:
        assert abs(chi2_uniform(np.bincount((col & 0xFFFF) >> 4, minlength=1 << 12))) < 5
        pair = ((col[:-1] >> 24) << 8) | (col[1:] >> 24)
        assert abs(chi2_uniform(np.bincount(pair, minlength=1 << 16))) < 5
    # the same index at consecutive steps is not a shifted copy of the index sequence
    assert (r[:, 0] != r[:, 1]).mean() > 0.999


def test_random_bits_avalanche():
    """Flipping one input bit of the index, step or seed flips each output bit half of the time."""
    rng = np.random.default_rng(9)
    idx = rng.integers(0, 1 << 62, size=1 << 14, dtype=np.uint64)
    base = P.random_bits(11, 5, idx)
    for b in (0, 1, 17, 40, 62):
        flipped = P.random_bits(11, 5, idx ^ np.uint64(1 << b))
        frac = ((base ^ flipped)[:, None] >> np.arange(32, dtype=np.uint32) & 1).mean(axis=0)
        assert np.abs(frac - 0.5).max() < 0.05, (b, frac)
    for other in (P.random_bits(11, 4, idx), P.random_bits(10, 5, idx)):
        frac = ((base ^ other)[:, None] >> np.arange(32, dtype=np.uint32) & 1).mean(axis=0)
        assert np.abs(frac - 0.5).max() < 0.05


def _top_byte_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return ((a >> 8).astype(np.int64) << 8) | (b >> 8).astype(np.int64)


def sr_quality_checks(bits, n: int = 1 << 20, n_steps: int = 1 << 17):
    """The quality checks of stochastic rounding's 16 bits, lazily: yields (name, passed).

    ``bits(seed, step, index)`` -> uint16 (``P.sr_bits`` or a deliberately bad
    variant).  Bounds are about 5-6 sigma, so a good generator fails with
    probability ~1e-6 per check; the bad variants below fail by hundreds of sigma.
    """
    r = bits(1, 1, np.arange(n, dtype=np.uint64))
    # every one of the 16 bits is set half of the time (sigma = 0.5 / sqrt(n))
    freq = np.array([np.count_nonzero((r >> b) & 1) / n for b in range(16)])
    yield "bit balance", bool(np.abs(freq - 0.5).max() < 6 * 0.5 / math.sqrt(n))
    # uniform over all 65536 values along the index (16 per cell); two-sided: too even fails too
    yield "chi2 along the index", abs(chi2_uniform(np.bincount(r, minlength=1 << 16))) < 5
    # pairs of elements: every two slices of one group's hash, and the last slice of a group
    # with the first of the next; top bytes of the pair uniform over 65536 cells
    q = r.reshape(-1, 4)
    pairs = [(f"in-group slices {a},{b}", q[:, a], q[:, b]) for a in range(4) for b in range(a + 1, 4)]
    pairs.append(("across groups", q[:-1, 3], q[1:, 0]))
    for name, a, b in pairs:
        yield f"pairs {name}", abs(chi2_uniform(np.bincount(_top_byte_pairs(a, b), minlength=1 << 16))) < 5
    lo = r.astype(np.float64)
    yield "neighbour correlation", abs(np.corrcoef(lo[:-1], lo[1:])[0, 1]) < 6 / math.sqrt(n)
    # one element over many steps (what the stagnation average relies on): the four
    # slices of one group and an element far away
    steps = np.arange(1, n_steps + 1, dtype=np.uint64)[:, None]
    rs = bits(3, steps, np.array([0, 1, 2, 3, 12345], dtype=np.uint64))
    for k, col in enumerate(rs.T):
        yield f"chi2 along the step ({k})", abs(chi2_uniform(np.bincount(col >> 4, minlength=1 << 12))) < 5
        yield f"step pairs ({k})", \
            abs(chi2_uniform(np.bincount(_top_byte_pairs(col[:-1], col[1:]), minlength=1 << 16))) < 5
    # avalanche: flipping one bit of the index (inside the group or of the group), of the
    # step or of the seed flips each of the 16 bits half of the time
    rng = np.random.default_rng(9)
    idx = rng.integers(0, 1 << 62, size=1 << 14, dtype=np.uint64)
    base = bits(11, 5, idx)
    others = [(f"index bit {b}", bits(11, 5, idx ^ np.uint64(1 << b))) for b in (0, 1, 2, 3, 19, 40, 62)]
    others += [("step", bits(11, 4, idx)), ("seed", bits(10, 5, idx))]
    for name, other in others:
        frac = ((base ^ other)[:, None] >> np.arange(16, dtype=np.uint16) & 1).mean(axis=0)
        yield f"avalanche {name}", bool(np.abs(frac - 0.5).max() < 0.05)


def test_sr_bits_quality():
    failed = [name for name, ok in sr_quality_checks(P.sr_bits) if not ok]
    assert failed == []


def _unmixed_sr_bits(seed, step, index):
    """The group counter itself, not hashed (its slices are far too regular)."""
    t = np.asarray(step, dtype=np.uint64)
    i = np.asarray(index, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = P.mix64(np.uint64(P.seed_key(seed)) + t * np.uint64(G)) + (i >> np.uint64(2)) * np.uint64(G)
    return ((z >> ((i & np.uint64(3)) << np.uint64(4))) & np.uint64(0xFFFF)).astype(np.uint16)


@pytest.mark.parametrize("bad", [
    lambda s, t, i: P.sr_bits(s, t, np.asarray(i, np.uint64) & ~np.uint64(3)),  # one slice per group
    lambda s, t, i: P.sr_bits(s, np.asarray(t, np.uint64) * np.uint64(0) + np.uint64(1), i),  # no step
    _unmixed_sr_bits,
], ids=["one-slice-per-group", "step-blind", "unmixed"])
def test_sr_bits_quality_checks_catch_bad_bits(bad):
    """The checks above are not vacuous: each bad variant fails one of them."""
    assert not all(ok for _, ok in sr_quality_checks(bad))


def test_numba_transcription_of_the_recipe_matches():
    """The module docstring's recipe, written as a Numba kernel author would, reproduces NumPy."""
    numba = pytest.importorskip("numba")
    u64, u32 = np.uint64, np.uint32

    @numba.njit(cache=False)
    def sr_kernel(x_bits, key, out):
        g = u64(0x9E3779B97F4A7C15)
        for i in range(x_bits.size):
            u = x_bits[i]
            if (u & u32(0x7FFFFFFF)) > u32(0x7F800000):
                out[i] = np.uint16(((u >> u32(16)) & u32(0x8000)) | u32(0x7FC0))
                continue
            z = key + (u64(i) >> u64(2)) * g  # the group of four elements
            z = (z ^ (z >> u64(30))) * u64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> u64(27))) * u64(0x94D049BB133111EB)
            z = z ^ (z >> u64(31))
            r = u32(z >> ((u64(i) & u64(3)) * u64(16))) & u32(0xFFFF)  # its slice i & 3
            out[i] = np.uint16((u + r) >> u32(16))

    x = f32(float32_sample(n_random=1 << 16, seed=8)[: 1 << 17])
    out = np.empty(x.size, np.uint16)
    sr_kernel(x.view(np.uint32), np.uint64(P.step_key(99, 7)), out)
    np.testing.assert_array_equal(out, P.f32_to_bf16_bits_sr(x, 99, 7, np.arange(x.size)))


C_RECIPE = r"""
#include <cstdint>
#include <cstdio>
#include <cstdlib>
static inline uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static inline uint16_t bf16_rne(uint32_t u) {
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)(((u >> 16) & 0x8000u) | 0x7fc0u);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
static inline uint16_t bf16_sr(uint32_t u, uint64_t key, uint64_t i) {
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)(((u >> 16) & 0x8000u) | 0x7fc0u);
    uint32_t r = (uint32_t)(mix64(key + (i >> 2) * 0x9e3779b97f4a7c15ull) >> (16 * (i & 3))) & 0xffffu;
    return (uint16_t)((u + r) >> 16);
}
static inline uint16_t f16_rne(uint32_t u) {
    uint32_t s = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (uint16_t)(s | 0x7e00u);
    if (a >= 0x477ff000u) return (uint16_t)(s | 0x7c00u);
    if (a >= 0x38800000u) return (uint16_t)(s | ((a - 0x38000000u + 0xfffu + ((a >> 13) & 1u)) >> 13));
    uint32_t e = a >> 23, m = (a & 0x7fffffu) | (e ? 0x800000u : 0u);
    uint32_t sh = 126u - (e ? e : 1u);
    if (sh >= 25u) return (uint16_t)s;
    uint32_t q = m >> sh, rem = m & ((1u << sh) - 1u), half = 1u << (sh - 1u);
    return (uint16_t)(s | (q + ((rem > half) || (rem == half && (q & 1u)))));
}
int main(int argc, char** argv) {
    uint64_t key = std::strtoull(argv[1], nullptr, 10);
    uint32_t u;
    uint64_t i = 0;
    while (std::fread(&u, 4, 1, stdin) == 1) {
        uint16_t out[3] = {bf16_rne(u), bf16_sr(u, key, i++), f16_rne(u)};
        std::fwrite(out, 2, 3, stdout);
    }
    return 0;
}
"""


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not on PATH")
def test_c_transcription_of_the_recipe_matches(tmp_path):
    """The same recipe in C (what the CUDA kernels will compile) agrees bit for bit."""
    src, exe = tmp_path / "recipe.cpp", tmp_path / "recipe"
    src.write_text(C_RECIPE)
    subprocess.run(["g++", "-std=c++17", "-O2", "-o", str(exe), str(src)], check=True)
    u = float32_sample(n_random=1 << 18, seed=10)
    key = P.step_key(2024, 31)
    res = subprocess.run([str(exe), str(key)], input=u.tobytes(), capture_output=True, check=True)
    out = np.frombuffer(res.stdout, dtype=np.uint16).reshape(-1, 3)
    x = f32(u)
    np.testing.assert_array_equal(out[:, 0], P.f32_to_bf16_bits_rne(x))
    np.testing.assert_array_equal(out[:, 1], P.f32_to_bf16_bits_sr(x, 2024, 31, np.arange(x.size)))
    np.testing.assert_array_equal(out[:, 2], P.f32_to_f16_bits_rne(x))


# --------------------------------------------------------------------------- stochastic rounding

def bf16_neighbours(x: np.ndarray):
    """(lower, upper) bfloat16 bits around finite float32 x (by magnitude: truncation and one up)."""
    u = x.view(np.uint32)
    lo = (u >> 16).astype(np.uint16)
    hi = np.where((u & 0xFFFF) == 0, lo, lo + np.uint16(1))
    return lo, hi


def test_sr_is_unbiased():
    """The mean of 1e5 roundings of each of 32 values is the value (within 3e-5 relative)."""
    rng = np.random.default_rng(5)
    x = (rng.uniform(0.5, 2.0, 32) * 10.0 ** rng.integers(-6, 6, 32)
         * rng.choice([-1, 1], 32)).astype(np.float32)
    n = 100_000
    steps = np.arange(1, n + 1, dtype=np.uint64)[:, None]
    bits = P.f32_to_bf16_bits_sr(x, 42, steps, np.arange(32))
    assert bits.shape == (n, 32)
    vals = P.bf16_bits_to_f32(bits).astype(np.float64)
    mean = vals.mean(axis=0)
    xd = x.astype(np.float64)
    rel = np.abs(mean - xd) / np.abs(xd)
    assert rel.max() < 3e-5, rel.max()
    # and within 5 sigma of the exact binomial spread of each value
    lo, hi = (P.bf16_bits_to_f32(b).astype(np.float64) for b in bf16_neighbours(x))
    p = (xd - lo) / (hi - lo)
    sigma = np.abs(hi - lo) * np.sqrt(p * (1 - p) / n)
    assert (np.abs(mean - xd) <= 5 * sigma).all()


def test_sr_output_is_one_of_the_two_neighbours():
    u = float32_sample(n_random=1 << 20, seed=6)
    x = f32(u)
    x = x[np.isfinite(x) & (np.abs(x) <= 3.3895314e38)]
    got = P.f32_to_bf16_bits_sr(x, 1, 1, np.arange(x.size))
    lo, hi = bf16_neighbours(x)
    assert ((got == lo) | (got == hi)).all()
    # both neighbours occur where there are two
    two = lo != hi
    assert 0.3 < (got[two] == hi[two]).mean() < 0.7


def test_sr_leaves_representable_values_and_specials_alone():
    x = P.bf16_bits_to_f32(ALL16)
    got = P.f32_to_bf16_bits_sr(x, 3, 9, np.arange(x.size))
    nan = np.isnan(x)
    np.testing.assert_array_equal(got[~nan], ALL16[~nan])  # +-0, subnormals, max finite, +-inf
    np.testing.assert_array_equal(got[nan], (ALL16[nan] & 0x8000) | 0x7FC0)
    # a float32 NaN with any payload: quiet NaN with its sign, never a carry into the sign bit
    payload = f32(np.array([0x7FFFFFFF, 0xFFFFFFFF, 0x7F800001, 0x7FC0FFFF] * 1000, np.uint32))
    got = P.f32_to_bf16_bits_sr(payload, 3, 9, np.arange(payload.size))
    assert set(got.tolist()) == {0x7FC0, 0xFFC0}


def test_sr_overflow_only_beyond_the_largest_finite_bfloat16():
    n = 1 << 16
    below = np.full(n, np.float32(3.3895314e38))    # the largest finite bfloat16 exactly
    assert (P.f32_to_bf16_bits_sr(below, 1, 1, np.arange(n)) == 0x7F7F).all()
    just_below = f32(np.full(n, 0x7F7EFFFF, np.uint32))  # rounds to 0x7f7e or 0x7f7f, never inf
    assert set(P.f32_to_bf16_bits_sr(just_below, 1, 1, np.arange(n)).tolist()) <= {0x7F7E, 0x7F7F}
    # beyond it: max finite or inf, with probability by the distance to 2**128
    beyond = f32(np.full(n, 0x7F7FC000, np.uint32))
    got = P.f32_to_bf16_bits_sr(-beyond, 1, 1, np.arange(n))
    assert set(got.tolist()) == {0xFF7F, 0xFF80}
    assert abs((got == 0xFF80).mean() - 0.75) < 0.01


def test_sr_stagnation():
    """bf16 1.0 + 1e-4 per step for 1000 steps: stays 1.0 rounded to nearest, 1.1 on average with SR."""
    n = 4096
    idx = P.element_index(n)
    inc = np.float32(1e-4)
    rne = np.full(n, 0x3F80, np.uint16)
    sr = rne.copy()
    for t in range(1, 1001):
        rne = P.f32_to_bf16_bits_rne(P.bf16_bits_to_f32(rne) + inc)
        sr = P.f32_to_bf16_bits_sr(P.bf16_bits_to_f32(sr) + inc, 2026, t, idx)
    assert (rne == 0x3F80).all()
    mean = P.bf16_bits_to_f32(sr).astype(np.float64).mean()
    assert abs(mean - 1.1) < 0.005, mean


def test_sr_seeds_and_chunking():
    rng = np.random.default_rng(7)
    x = rng.standard_normal(10_001).astype(np.float32)
    idx = P.element_index(x.size)
    a = P.f32_to_bf16_bits_sr(x, 123, 17, idx)
    np.testing.assert_array_equal(a, P.f32_to_bf16_bits_sr(x, 123, 17, idx))  # same seed: same bits
    inexact = (x.view(np.uint32) & 0xFFFF) != 0
    for other in (P.f32_to_bf16_bits_sr(x, 124, 17, idx), P.f32_to_bf16_bits_sr(x, 123, 18, idx)):
        differ = (a != other)[inexact].mean()
        assert differ > 0.3, differ  # each inexact element decides anew (about 2p(1-p) differ)
    # a slice computed with its own index offset gives the same bits as the whole array
    cuts = [0, 1, 7, 4096, 4097, 9999, x.size]
    parts = [P.f32_to_bf16_bits_sr(x[s:e], 123, 17, P.element_index(e - s, offset=s))
             for s, e in zip(cuts[:-1], cuts[1:])]
    np.testing.assert_array_equal(np.concatenate(parts), a)
    # and the shape does not matter, only the flat index
    np.testing.assert_array_equal(
        P.f32_to_bf16_bits_sr(x[:10_000].reshape(100, 100), 123, 17, P.element_index((100, 100))).ravel(),
        a[:10_000])


def test_sr_bad_index_shape():
    with pytest.raises(ValueError, match=r"index: expected a shape broadcastable to x's \(4,\)"):
        P.f32_to_bf16_bits_sr(np.ones(4, np.float32), 0, 1, np.arange(3))


# --------------------------------------------------------------------------- why float32 state

def test_bf16_second_moment_stalls():
    """The README's example: Adam's exp_avg_sq for grads of 1e-4 under beta2 = 0.999."""
    b2, g2 = np.float32(0.999), np.float32(1e-4) ** 2
    assert P.f32_to_bf16_bits_rne(b2) == 0x3F80  # 0.999 itself rounds to 1.0 in bfloat16
    v32 = np.zeros(1, np.float32)
    v16 = np.zeros(1, np.uint16)
    trace = {}
    for t in range(1, 5001):
        v32 = b2 * v32 + (np.float32(1) - b2) * g2
        v16 = P.f32_to_bf16_bits_rne(b2 * P.bf16_bits_to_f32(v16) + (np.float32(1) - b2) * g2)
        if t in (1000, 5000):
            bc = 1 - 0.999 ** t
            trace[t] = (float(v32[0]) / bc / float(g2), float(P.bf16_bits_to_f32(v16)[0]) / bc / float(g2))
    assert abs(trace[5000][0] - 1) < 1e-3                 # float32: v-hat = g**2
    assert trace[1000][1] < 0.5 and trace[5000][1] < 0.3  # bfloat16: stuck near 0.27 g**2
    assert trace[1000][1] * (1 - 0.999 ** 1000) == pytest.approx(trace[5000][1] * (1 - 0.999 ** 5000))


# --------------------------------------------------------------------------- the options

@pytest.mark.parametrize("param, state, want", [
    (np.float16, None, F32), ("bfloat16", None, F32), (np.float32, None, F32), (np.float64, None, F64),
    (np.float16, "param", F16), ("bfloat16", "param", BF16), (np.float32, "param", F32),
    (np.float64, "param", F64),
    (np.float16, "bfloat16", BF16), ("bfloat16", BF16, BF16), (np.float32, "bfloat16", BF16),
    (np.float16, np.float16, F16), (np.float16, "float32", F32), ("bfloat16", np.float32, F32),
    (np.float16, "q8", P.Q8), ("bfloat16", "q8", P.Q8), (np.float32, "q8", P.Q8),
    (np.float64, np.float64, F64),
])
def test_resolve_state_dtype(param, state, want):
    got = P.resolve_state_dtype(param, state)
    assert got is want if want is P.Q8 else got == want


@pytest.mark.parametrize("param, state, exc, msg", [
    ("bfloat16", np.float16, ValueError, r"state_dtype: expected one of float32, bfloat16 for params\[0\] "
                                         r"of dtype bfloat16, got float16"),
    (np.float32, "float16", ValueError, r"expected one of float32, bfloat16 .* got float16"),
    (np.float64, "float32", ValueError, r"expected one of float64 for params\[0\] of dtype float64"),
    (np.float64, "q8", ValueError, r"state_dtype: .* got 'q8'"),
    (np.float32, "int8", ValueError, r"state_dtype: expected None, 'param', 'q8', .* got 'int8'"),
    (np.float32, np.int8, TypeError, r"state_dtype: expected float16, bfloat16, float32 or float64, got int8"),
    (np.float32, 3, TypeError, r"state_dtype: expected float16, bfloat16, float32 or float64"),
    (np.int32, None, TypeError, r"params\[0\] dtype: expected float16, bfloat16, float32 or float64, got int32"),
])
def test_resolve_state_dtype_bad_input(param, state, exc, msg):
    with pytest.raises(exc, match=msg):
        P.resolve_state_dtype(param, state)


def test_q8_marker_is_one_object():
    assert pickle.loads(pickle.dumps(P.Q8)) is P.Q8
    assert repr(P.Q8) == "fastopt.precision.Q8"


def test_grad_dtypes():
    assert P.allowed_grad_dtypes(np.float16) == (F16, F32)
    assert P.allowed_grad_dtypes(BF16) == (BF16, F32)
    assert P.allowed_grad_dtypes(np.float32) == (F32,)
    assert P.allowed_grad_dtypes(np.float64) == (F64, F32)
    P.check_grad_dtype(BF16, np.float32)
    P.check_grad_dtype(np.float16, np.float16)
    with pytest.raises(ValueError, match=r"grads\[2\]: expected dtype bfloat16 or float32 "
                                         r"\(its param is bfloat16\), got float16"):
        P.check_grad_dtype(BF16, np.float16, "grads[2]")
    with pytest.raises(ValueError, match=r"grads\[0\]: expected dtype float32 .* got float64"):
        P.check_grad_dtype(np.float32, np.float64)


def test_master_weights_and_stochastic_rounding_rules():
    assert P.check_master_weights(np.float16, True) and P.check_master_weights(BF16, True)
    assert not P.check_master_weights(np.float32, False)
    with pytest.raises(ValueError, match=r"master_weights: expected False for params\[3\] of dtype "
                                         r"float32, got True"):
        P.check_master_weights(np.float32, True, "params[3]")
    with pytest.raises(TypeError, match=r"master_weights: expected True or False, got str"):
        P.check_master_weights(np.float16, "yes")
    assert P.check_stochastic_rounding(BF16, True)
    for dt in (np.float16, np.float32, np.float64):
        with pytest.raises(ValueError, match=r"stochastic_rounding: expected False for params\[1\] of dtype"):
            P.check_stochastic_rounding(dt, True, label="params[1]")
    with pytest.raises(ValueError, match=r"stochastic_rounding: expected False with master_weights=True"):
        P.check_stochastic_rounding(BF16, True, True)
    with pytest.raises(TypeError, match=r"stochastic_rounding: expected True or False, got int"):
        P.check_stochastic_rounding(BF16, 1)


def test_resolve_precision():
    p = P.resolve_precision(BF16, np.float32, stochastic_rounding=True, seed=9, label="params[4]")
    assert (p.param, p.compute, p.state, p.master_weights, p.stochastic_rounding, p.seed) == \
        (BF16, F32, F32, False, True, 9)
    p = P.resolve_precision(np.float16, state_dtype="param", master_weights=True)
    assert (p.compute, p.state, p.master_weights) == (F32, F16, True)
    assert P.resolve_precision(np.float64).compute == F64
    with pytest.raises(TypeError, match=r"params\[2\]: expected dtype float32 or float64 \(the dense "
                                        r"Newton solve"):
        P.resolve_precision(np.float16, kind="dense_solve", label="params[2]")
    assert P.resolve_precision(np.float32, kind="dense_solve").compute == F32
    with pytest.raises(ValueError, match=r"grads\[4\]: expected dtype bfloat16 or float32"):
        P.resolve_precision(BF16, np.float64, label="params[4]")
    with pytest.raises(ValueError, match=r"seed: expected an integer in \[0, 2\*\*64\), got -1"):
        P.resolve_precision(BF16, seed=-1)
