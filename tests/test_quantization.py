"""fastopt.quantization: the dynamic maps, the exact nearest code, block quantization, sizes.

The oracle for codes is a brute-force search written here independently of the
module: float64 distances from a float32 value to all 256 map entries (exact
for the entries that can be nearest), ties to the entry nearer zero.
bitsandbytes and torch are optional peers: the tests that compare against them
skip when they are not installed.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest

from fastopt import quantization as q

F32 = np.float32
SIGNS = [True, False]


def brute_code(y, signed):
    """Exact nearest entry of the map to each float32 ``y`` (ties: the entry nearer zero)."""
    y = np.asarray(y, F32).reshape(-1).astype(np.float64)
    # Beyond [-1, 1] the nearest entry is an end of the map; clipping to +-2 keeps that
    # and keeps every distance exact in float64 (|3e38 - c| would round all c alike).
    y = np.clip(y, -2.0, 2.0)
    c = q.dynamic_map(signed).astype(np.float64)
    # argmin takes the first minimum; visiting entries by |value| makes that the one nearer zero
    order = np.argsort(np.abs(c), kind="stable")
    co = c[order]
    out = np.empty(y.size, np.int64)
    for s in range(0, y.size, 1 << 15):
        d = np.abs(y[s:s + (1 << 15), None] - co[None, :])
        out[s:s + (1 << 15)] = order[np.argmin(d, axis=1)]
    out[np.isnan(y)] = 0  # documented: NaN compares false everywhere and gets code 0
    return out.astype(np.uint8)


def bracket_code(y, signed):
    """The same oracle in O(log 256): the nearest entry is one of the two around ``y``.

    Independent of the module's thresholds (it brackets ``y`` between map entries, not
    midpoints); checked against ``brute_code`` below, used where millions of values make
    the 256-way brute force too slow for a shared machine.
    """
    y32 = np.clip(np.asarray(y, F32).reshape(-1), F32(-2), F32(2))
    hi = np.clip(np.searchsorted(q.dynamic_map(signed), y32, side="left"), 1, 255)
    y = y32.astype(np.float64)
    c = q.dynamic_map(signed).astype(np.float64)
    lo = hi - 1
    d_lo, d_hi = np.abs(y - c[lo]), np.abs(c[hi] - y)
    take_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (np.abs(c[hi]) < np.abs(c[lo])))
    out = np.where(take_hi, hi, lo)
    out[np.isnan(y)] = 0
    return out.astype(np.uint8)


def count_below(y, signed):
    """The definition of the code: how many thresholds lie below y (NaN: 0)."""
    y = np.asarray(y, F32)
    out = np.searchsorted(q.code_thresholds(signed), y, side="left")
    out[np.isnan(y)] = 0
    return out.astype(np.uint8)


def all_recipes_equal(y, signed, want):
    """Both recipes of nearest_code and the threshold count give the oracle's codes."""
    assert np.array_equal(count_below(y, signed), want)
    assert np.array_equal(q.nearest_code(y, signed), want)
    assert np.array_equal(q.nearest_code(y, signed, method="bsearch"), want)


def brute_quantize(x, signed, blocksize=256):
    """quantize_blockwise by its definition: block max, divide, brute-force code, sign guard."""
    flat = np.asarray(x, F32).reshape(-1)
    codes = np.empty(flat.size, np.uint8)
    absmax = []
    for b in range(0, flat.size, blocksize):
        blk = flat[b:b + blocksize]
        m = F32(np.nan) if np.isnan(blk).any() else F32(np.max(np.abs(blk)))
        absmax.append(m)
        with np.errstate(divide="ignore", invalid="ignore"):
            y = blk / m if m != 0 else np.zeros_like(blk)
        c = brute_code(y, signed)
        if signed:
            c[(blk < 0) & (c == 127)] = 126
        codes[b:b + blocksize] = c
    return codes.reshape(np.shape(x)), np.array(absmax, F32)


def f32_bits(lo, hi, step):
    """Every ``step``-th float32 bit pattern from ``lo`` to ``hi`` (non-negative floats)."""
    a = np.frombuffer(F32(lo).tobytes(), np.uint32)[0]
    b = np.frombuffer(F32(hi).tobytes(), np.uint32)[0]
    return np.arange(a, b + 1, step, dtype=np.uint32).view(F32)


def adversarial(signed):
    """Midpoints and their float32 neighbours, map entries, zeros, subnormals, the ends."""
    c = q.dynamic_map(signed).astype(np.float64)
    mid = (c[:-1] + c[1:]) / 2
    near = mid.astype(F32)
    vals = [near, q.dynamic_map(signed), q.code_thresholds(signed)]
    for base in (near, q.code_thresholds(signed), q.dynamic_map(signed)):
        up, down = base.copy(), base.copy()
        for _ in range(3):
            up = np.nextafter(up, F32(np.inf))
            down = np.nextafter(down, F32(-np.inf))
            vals += [up, down]
    tiny = np.finfo(F32).smallest_subnormal
    specials = [0.0, -0.0, tiny, -tiny, 2 * tiny, np.finfo(F32).smallest_normal,
                -np.finfo(F32).smallest_normal, F32(1e-38) * F32(0.5), 1e-30, -1e-30,
                1.0, -1.0, np.nextafter(F32(1), F32(2)), np.nextafter(F32(-1), F32(-2)),
                np.nextafter(F32(1), F32(0)), np.nextafter(F32(-1), F32(0)), 1.5, -1.5,
                np.finfo(F32).max, -np.finfo(F32).max, np.inf, -np.inf]
    vals.append(np.array(specials, F32))
    return np.concatenate(vals).astype(F32)


# ---------------------------------------------------------------- the maps

@pytest.mark.parametrize("signed", SIGNS)
def test_map_structure(signed):
    m = q.dynamic_map(signed)
    assert m.dtype == F32 and m.shape == (256,)
    assert np.all(np.diff(m) > 0)
    assert m[255] == 1.0
    z = q.zero_code(signed)
    assert m[z] == 0 and z == (127 if signed else 0)
    if signed:
        # negatives mirror the positives below 1.0 exactly; -1 is not in the map
        assert np.array_equal(-m[:127][::-1], m[128:255])
    else:
        assert m[0] == 0 and np.all(m[1:] > 0)


@pytest.mark.parametrize("signed", SIGNS)
def test_map_matches_its_definition_in_real_arithmetic(signed):
    # 10**(i-6) * (0.1 + 0.9*(j+1/2)/k) for the k = 2**i (signed) or 2**(i+1) bins of step i:
    # the float32 construction may only differ by its roundings (a few ulps)
    ideal = [0.0, 1.0]
    for i in range(7):
        k = 2 ** i if signed else 2 ** (i + 1)
        v = [10.0 ** (i - 6) * (0.1 + 0.9 * (j + 0.5) / k) for j in range(k)]
        ideal += v + ([-x for x in v] if signed else [])
    ideal = np.sort(np.array(ideal))
    m = q.dynamic_map(signed).astype(np.float64)
    np.testing.assert_allclose(m, ideal, rtol=4 * np.finfo(F32).eps, atol=0)


@pytest.mark.parametrize("signed", SIGNS)
def test_map_bit_identical_to_bitsandbytes(signed):
    bnbf = pytest.importorskip("bitsandbytes.functional")
    theirs = bnbf.create_dynamic_map(signed=signed).numpy()
    assert np.array_equal(q.dynamic_map(signed).view(np.uint32), theirs.view(np.uint32))


def test_linspace_matches_torch():
    torch = pytest.importorskip("torch")
    for steps in (2, 3, 5, 9, 17, 33, 65, 129, 257, 1000):
        ours = q._linspace_f32(0.1, 1.0, steps)
        theirs = torch.linspace(0.1, 1.0, steps, dtype=torch.float32).numpy()
        assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32)), steps


def test_map_is_a_fresh_copy_and_cached_constant_is_read_only():
    a = q.dynamic_map(True)
    a[0] = 5
    assert q.dynamic_map(True)[0] != 5
    with pytest.raises(ValueError):
        q._map(True)[0] = 5


# ---------------------------------------------------------------- the lookup

@pytest.mark.parametrize("signed", SIGNS)
def test_thresholds_sit_on_the_exact_midpoints(signed):
    c = q.dynamic_map(signed).astype(np.float64)
    mid = (c[:-1] + c[1:]) / 2
    assert np.array_equal(mid - c[:-1], c[1:] - mid)  # exact in float64
    t = q.code_thresholds(signed)
    assert t.dtype == F32 and t.shape == (255,) and np.all(np.diff(t) > 0)
    above = np.nextafter(t, F32(np.inf)).astype(np.float64)
    t64 = t.astype(np.float64)
    pos = mid > 0
    # above zero: t is the largest float32 <= mid; below: the largest float32 < mid
    assert np.all(t64[pos] <= mid[pos]) and np.all(above[pos] > mid[pos])
    assert np.all(t64[~pos] < mid[~pos]) and np.all(above[~pos] >= mid[~pos])
    assert not np.any(mid == 0)


@pytest.mark.parametrize("signed", SIGNS)
def test_lookup_equals_brute_force_on_adversarial_values(signed):
    y = adversarial(signed)
    all_recipes_equal(y, signed, brute_code(y, signed))
    # the set really holds ties, and both sides of each
    c = q.dynamic_map(signed).astype(np.float64)
    mid = (c[:-1] + c[1:]) / 2
    ties = np.isin(y.astype(np.float64), mid)
    assert ties.sum() > 50
    # a tie goes to the entry nearer zero
    for v in y[ties][:40]:
        k = int(q.nearest_code(np.array([v], F32), signed)[0])
        other = k + 1 if v > c[k] else k - 1
        assert abs(c[k]) < abs(c[other])


def test_lookup_special_values():
    y = np.array([np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, 2.0, -2.0], F32)
    for method in ("table", "bsearch"):
        assert q.nearest_code(y, True, method).tolist() == [0, 0, 255, 0, 127, 127, 255, 0]
        assert q.nearest_code(y, False, method).tolist() == [0, 0, 255, 0, 0, 0, 255, 0]


@pytest.mark.parametrize("signed", SIGNS)
def test_lookup_equals_brute_force_over_sampled_bit_patterns(signed):
    # every 5003rd float32 bit pattern from 0 to 1.5 (prime stride: all mantissa
    # residues), both signs, through the 256-way brute force
    pos = f32_bits(0.0, 1.5, 5003)
    y = np.concatenate([pos, -pos])
    assert y.size > 400_000
    want = brute_code(y, signed)
    assert np.array_equal(bracket_code(y, signed), want)  # the fast oracle is the oracle
    all_recipes_equal(y, signed, want)


@pytest.mark.slow
@pytest.mark.parametrize("signed", SIGNS)
def test_lookup_dense_windows_around_every_threshold(signed):
    # every float32 within 2000 ulps of each threshold: 255 x 4001 values
    t = q.code_thresholds(signed)
    bits = t.view(np.int32).astype(np.int64)
    raw = bits[:, None] + np.arange(-2000, 2001)[None, :]  # steps the magnitude, either sign
    y = np.unique(raw.astype(np.int32)).view(F32)
    y = y[np.isfinite(y)]
    all_recipes_equal(y, signed, bracket_code(y, signed))


@pytest.mark.slow
@pytest.mark.parametrize("signed", SIGNS)
@pytest.mark.parametrize("lo,hi", [(0.5, 1.0), (2.0 ** -23, 2.0 ** -21),
                                   (0.0, float(np.finfo(F32).smallest_normal))])
def test_lookup_exhaustive_over_bit_pattern_ranges(signed, lo, hi):
    # every float32 of [0.5, 1] (the widest-spaced codes, the top bucket, 1.0), of
    # [2**-23, 2**-21] (bucket 0 and the thresholds next to zero, 1.6e-7 and 2.75e-7),
    # and every subnormal (clamped into bucket 0), both signs: 8.4M, 16.8M and 8.4M
    # values per map through the table recipe; beyond 1 and between 2**-126 and
    # 2**-23 the sampled and adversarial tests cover the clamps
    pos = f32_bits(lo, hi, 1)
    for y in (pos, -pos):
        assert np.array_equal(q.nearest_code(y, signed), bracket_code(y, signed))
    # the binary search and the plain count on every 61st of them
    y = np.concatenate([pos[::61], -pos[::61]])
    want = bracket_code(y, signed)
    assert np.array_equal(q.nearest_code(y, signed, method="bsearch"), want)
    assert np.array_equal(count_below(y, signed), want)


@pytest.mark.parametrize("signed", SIGNS)
def test_code_table_invariants(signed):
    b = q.code_table(signed)
    t = q.code_thresholds(signed).astype(np.float64)
    assert b.shape == (2, 2944) and b.dtype == np.uint8 and b.max() <= 254
    assert np.all(np.diff(b[0].astype(int)) >= 0) and np.all(np.diff(b[1].astype(int)) <= 0)
    # bucket k covers |y| in [lo_k, lo_{k+1}); its start counts the thresholds below it
    edges = (np.uint32(0x34000000) + (np.arange(2945, dtype=np.uint32) << np.uint32(16)))
    edges = edges.view(F32).astype(np.float64)
    assert edges[-1] == 1.0
    for k in (0, 1, 500, 1000, 2000, 2943):
        assert b[0, k] == np.sum(t < edges[k])
        assert b[1, k] == np.sum(t <= -edges[k + 1])
        assert np.sum((t >= edges[k]) & (t < edges[k + 1])) <= 1


def test_nearest_code_wants_float32():
    with pytest.raises(TypeError, match="y: expected float32"):
        q.nearest_code(np.zeros(3), True)
    with pytest.raises(TypeError, match="signed"):
        q.nearest_code(np.zeros(3, F32), "yes")
    with pytest.raises(ValueError, match="method: expected 'table' or 'bsearch'"):
        q.nearest_code(np.zeros(3, F32), True, method="linear")
    y = np.linspace(-1, 1, 60, dtype=F32).reshape(3, 4, 5)[:, ::2]  # any shape, strided
    flat = q.nearest_code(np.ascontiguousarray(y))
    assert np.array_equal(q.nearest_code(y), flat)


# ---------------------------------------------------------------- blockwise

@pytest.mark.parametrize("signed", SIGNS)
@pytest.mark.parametrize("n,blocksize", [(1000, 256), (256, 256), (255, 256), (1, 256),
                                         (777, 64), (5000, 4096), (33, 1)])
def test_quantize_blockwise_equals_definition(signed, n, blocksize):
    rng = np.random.default_rng(n + blocksize)
    x = (rng.standard_normal(n) * np.exp(rng.uniform(-20, 5, n))).astype(F32)
    if not signed:
        x = np.abs(x)
    x[::97] = 0.0
    codes, absmax = q.quantize_blockwise(x, signed=signed, blocksize=blocksize)
    assert codes.dtype == np.uint8 and codes.shape == x.shape
    assert absmax.dtype == F32 and absmax.shape == (-(-n // blocksize),)
    want_codes, want_absmax = brute_quantize(x, signed, blocksize)
    assert np.array_equal(absmax, want_absmax)
    assert np.array_equal(codes, want_codes)


def test_quantize_keeps_the_shape_and_blocks_in_c_order():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((13, 7, 11)).astype(F32)
    codes, absmax = q.quantize_blockwise(x)
    flat_codes, flat_absmax = q.quantize_blockwise(x.reshape(-1))
    assert codes.shape == x.shape and np.array_equal(codes.reshape(-1), flat_codes)
    assert np.array_equal(absmax, flat_absmax)
    xt = np.asfortranarray(x)
    assert np.array_equal(q.quantize_blockwise(xt)[0], codes)


def test_absmax_element_decodes_exactly():
    x = np.array([0.25, -3.0, 1.5, 3.0, -0.5], F32)
    codes, absmax = q.quantize_blockwise(x, signed=True)
    assert absmax.tolist() == [3.0]
    assert codes[3] == 255 and codes[1] == 0  # +absmax -> 1.0, -absmax -> -0.99297
    out = q.dequantize_blockwise(codes, absmax, signed=True)
    assert out[3] == 3.0


def test_sign_guard():
    x = np.array([1.0, -1e-9, 1e-9, -0.0, 0.0, -2e-7, -3e-7], F32)
    codes, _ = q.quantize_blockwise(x, signed=True)
    # -1e-9 and -2e-7 are nearest to 0 but negative: the smallest negative code instead;
    # -3e-7 is nearer -5.5e-7 anyway; +1e-9 rounds to 0; -0.0 is zero and keeps the zero code
    assert codes.tolist() == [255, 126, 127, 127, 127, 126, 126]
    out = q.dequantize_blockwise(codes, np.array([1.0], F32), signed=True)
    assert np.all(out[[1, 5, 6]] < 0) and out[2] == 0 and out[3] == 0
    # a subnormal negative whose quotient underflows to -0.0 is still negative
    x = np.array([10.0, -np.finfo(F32).smallest_subnormal], F32)
    assert q.quantize_blockwise(x, signed=True)[0].tolist() == [255, 126]
    # the unsigned map has no negative codes: a negative value gets 0
    codes, _ = q.quantize_blockwise(np.array([1.0, -0.5, -1e-9], F32), signed=False)
    assert codes.tolist() == [255, 0, 0]


def test_signed_none_picks_the_map_from_the_data():
    x = np.array([0.5, 1.0, 0.0], F32)
    assert np.array_equal(q.quantize_blockwise(x)[0], q.quantize_blockwise(x, signed=False)[0])
    x[0] = -0.5
    assert np.array_equal(q.quantize_blockwise(x)[0], q.quantize_blockwise(x, signed=True)[0])


@pytest.mark.parametrize("signed", SIGNS)
def test_all_zero_block_gives_no_nan(signed):
    x = np.zeros(600, F32)
    x[300:] = np.linspace(-1, 1, 300) if signed else np.linspace(0, 1, 300)
    x[5] = -0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        codes, absmax = q.quantize_blockwise(x, signed=signed)
        out = q.dequantize_blockwise(codes, absmax, signed=signed)
    assert absmax[0] == 0 and np.all(codes[:256] == q.zero_code(signed))
    assert np.all(out[:256] == 0) and np.all(np.isfinite(out))
    codes, absmax = q.quantize_blockwise(np.zeros((0, 3), F32))
    assert codes.shape == (0, 3) and absmax.shape == (0,)
    assert q.dequantize_blockwise(codes, absmax, signed).shape == (0, 3)


def test_non_finite_input_as_documented():
    x = np.ones(768, F32)
    x[3] = np.nan          # block 0: NaN
    x[256 + 4] = np.inf     # block 1: inf
    x[256 + 5] = -2.0
    x[512 + 6] = -np.inf    # block 2: -inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        codes, absmax = q.quantize_blockwise(x, signed=True)
        out = q.dequantize_blockwise(codes, absmax, signed=True)
    assert np.isnan(absmax[0]) and absmax[1] == np.inf and absmax[2] == np.inf
    assert np.all(codes[:256] == 0) and np.all(np.isnan(out[:256]))
    # inf/inf is NaN -> code 0; finite/inf is +-0 -> the zero code, or 126 when negative
    assert codes[260] == 0 and codes[261] == 126 and codes[262] == 127 and codes[518] == 0
    # a block with a non-finite element decodes to non-finite values only
    assert not np.any(np.isfinite(out))
    unsigned_out = q.dequantize_blockwise(*q.quantize_blockwise(np.abs(x), signed=False), False)
    assert not np.any(np.isfinite(unsigned_out))


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_other_float_dtypes_round_to_float32_first(dtype):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(700).astype(dtype)
    got = q.quantize_blockwise(x)
    want = q.quantize_blockwise(x.astype(F32))
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    big = np.array([1e300, -1.0], np.float64)  # beyond float32: inf, as the cast says
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert q.quantize_blockwise(big)[1][0] == np.inf


@pytest.mark.parametrize("signed", SIGNS)
def test_dequantize_is_map_times_absmax(signed):
    rng = np.random.default_rng(2)
    codes = rng.integers(0, 256, 1000).astype(np.uint8)
    absmax = rng.uniform(0, 10, 4).astype(F32)
    out = q.dequantize_blockwise(codes, absmax, signed)
    want = q.dynamic_map(signed)[codes] * np.repeat(absmax, 256)[:1000]
    assert out.dtype == F32 and np.array_equal(out, want)
    out2 = q.dequantize_blockwise(codes.reshape(10, 100), absmax, signed)
    assert out2.shape == (10, 100) and np.array_equal(out2.reshape(-1), out)


@pytest.mark.parametrize("signed", SIGNS)
def test_round_trip_is_idempotent(signed):
    rng = np.random.default_rng(3)
    x = rng.standard_normal(3000).astype(F32)
    if not signed:
        x = x * x
    x[::256] = 100.0  # a positive block max decodes to itself (map[255] = 1), so absmax survives
    codes, absmax = q.quantize_blockwise(x, signed=signed)
    y = q.dequantize_blockwise(codes, absmax, signed)
    codes2, absmax2 = q.quantize_blockwise(y, signed=signed)
    assert np.array_equal(absmax2, absmax)
    assert np.array_equal(codes2, codes)


# bitsandbytes' own round-trip thresholds, tests/test_functional.py,
# Test8BitBlockwiseQuantizeFunctional.test_dynamic_blockwise_quantization (blocksize 256,
# float32, 1024x1024): mean |A1 - A2| and mean |A1 - A2| / |A1 + 1e-8|, averaged over
# iterations; randn uses the signed map, rand the map of the `signed` parameter.
@pytest.mark.parametrize("kind,signed,max_abs,max_rel", [
    ("randn", True, 0.011, 0.018),
    ("rand", True, 0.0036, 0.015),
    ("rand", False, 0.0023, 0.012),
])
def test_round_trip_error_below_bitsandbytes_thresholds(kind, signed, max_abs, max_rel):
    rng = np.random.default_rng(4)
    abs_errs, rel_errs = [], []
    for _ in range(2):
        a1 = (rng.standard_normal((1024, 1024)) if kind == "randn"
              else rng.random((1024, 1024))).astype(F32)
        codes, absmax = q.quantize_blockwise(a1, signed=signed)
        a2 = q.dequantize_blockwise(codes, absmax, signed)
        diff = np.abs(a1 - a2)
        abs_errs.append(diff.mean())
        rel_errs.append((diff / np.abs(a1 + F32(1e-8))).mean())
    assert np.mean(abs_errs) < max_abs
    assert np.mean(rel_errs) < max_rel


def test_against_bitsandbytes_cpu():
    torch = pytest.importorskip("torch")
    bnbf = pytest.importorskip("bitsandbytes.functional")
    rng = np.random.default_rng(5)
    x = (rng.standard_normal(100_000) * np.exp(rng.uniform(-12, 0, 100_000))).astype(F32)
    for signed, data in ((True, x), (False, x * x)):
        code = bnbf.create_dynamic_map(signed=signed)
        theirs, state = bnbf.quantize_blockwise(torch.from_numpy(data), code=code, blocksize=256)
        theirs = theirs.numpy()
        ours, absmax = q.quantize_blockwise(data, signed=signed)
        assert np.array_equal(absmax, state.absmax.numpy())
        # their decoder is ours: same codes and absmax give the same floats
        deq = bnbf.dequantize_blockwise(torch.from_numpy(ours), absmax=torch.from_numpy(absmax),
                                        code=code, blocksize=256).numpy()
        assert np.array_equal(deq, q.dequantize_blockwise(ours, absmax, signed))
        # exact nearest is never farther than their table lookup, element by element
        y = (data / np.repeat(absmax, 256)[:data.size]).astype(np.float64)
        m = q.dynamic_map(signed).astype(np.float64)
        assert np.all(np.abs(y - m[ours]) <= np.abs(y - m[theirs]))


# ---------------------------------------------------------------- bad input

def test_bad_input_is_named():
    x = np.ones(10, F32)
    with pytest.raises(TypeError, match="x: expected a numpy array, got list"):
        q.quantize_blockwise([1.0, 2.0])
    with pytest.raises(TypeError, match="x: expected a float array.*int64"):
        q.quantize_blockwise(np.arange(4))
    with pytest.raises(TypeError, match="signed: expected True"):
        q.quantize_blockwise(x, signed="signed")
    for bs in (0, -256, 2.5, True, "256"):
        with pytest.raises(ValueError, match="blocksize: expected an integer >= 1"):
            q.quantize_blockwise(x, blocksize=bs)
    codes, absmax = q.quantize_blockwise(x)
    with pytest.raises(TypeError, match="codes: expected a uint8 numpy array, got dtype int8"):
        q.dequantize_blockwise(codes.astype(np.int8), absmax, True)
    with pytest.raises(TypeError, match="absmax: expected a float32 numpy array, got dtype float6"):
        q.dequantize_blockwise(codes, absmax.astype(np.float64), True)
    with pytest.raises(ValueError, match=r"absmax: expected shape \(1,\).*got shape \(2,\)"):
        q.dequantize_blockwise(codes, np.ones(2, F32), True)
    with pytest.raises(TypeError, match="signed"):
        q.dequantize_blockwise(codes, absmax, None)
    with pytest.raises(TypeError, match="signed"):
        q.dynamic_map(1)


def test_quantize_does_not_touch_its_input():
    x = np.array([-0.0, 1e-9, -1e-9, np.nan, 3.0], F32)
    before = x.copy()
    q.quantize_blockwise(x)
    assert np.array_equal(x.view(np.uint32), before.view(np.uint32))


# ---------------------------------------------------------------- sizes

@pytest.mark.parametrize("n", [0, 1, 255, 256, 257, 4095, 4096, 4097, 1 << 24, 16_777_259])
def test_q8_nbytes_is_codes_plus_absmax(n):
    blocks = (n + 255) // 256
    assert q.q8_nbytes(n) == n + 4 * blocks
    assert q.q8_nbytes(n, blocksize=64) == n + 4 * ((n + 63) // 64)
    if n:  # and it is what quantize_blockwise really returns
        small = min(n, 5000)
        codes, absmax = q.quantize_blockwise(np.ones(small, F32))
        assert codes.nbytes + absmax.nbytes == q.q8_nbytes(small)


def test_state_nbytes_per_format():
    assert q.state_nbytes(1000, "float32") == 4000
    assert q.state_nbytes(1000, np.float16, num_states=2) == 4000
    assert q.state_nbytes(1000, "bfloat16", num_states=2) == 4000
    assert q.state_nbytes(1000, "float64") == 8000
    # q8 only from min_8bit_size elements on; below it the state stays float32
    assert q.state_nbytes(4095, "q8", num_states=2) == 2 * 4 * 4095
    assert q.state_nbytes(4096, "q8", num_states=2) == 2 * (4096 + 4 * 16)
    assert q.state_nbytes(100, "q8", min_8bit_size=0) == 100 + 4
    assert q.state_nbytes(0, "q8") == 0


def test_adam_bytes_per_param_table():
    assert q.bytes_per_param_table() == {"float32": 8.0, "bfloat16": 4.0, "q8": 2.03125}
    assert q.bytes_per_param("q8") == 2 * (1 + 4 / 256)
    n = 1 << 24
    assert q.bytes_per_param_table(n=n) == {"float32": 8.0, "bfloat16": 4.0,
                                            "q8": 2 * (n + 4 * n // 256) / n}
    n = 4097  # a partial block costs a whole absmax
    assert q.bytes_per_param("q8", n=n) == 2 * (n + 4 * 17) / n
    assert q.bytes_per_param("q8", n=1000) == 8.0  # under min_8bit_size: float32
    assert q.bytes_per_param("float32", num_states=1) == 4.0


def test_size_helpers_reject_bad_input():
    with pytest.raises(ValueError, match="n: expected an integer >= 0"):
        q.q8_nbytes(-1)
    with pytest.raises(ValueError, match="n: expected an integer >= 0"):
        q.state_nbytes(2.5, "q8")
    with pytest.raises(ValueError, match="num_states: expected an integer >= 0"):
        q.state_nbytes(10, "q8", num_states=True)
    with pytest.raises(ValueError, match="state_dtype: expected 'q8' or a float dtype"):
        q.state_nbytes(10, "int8")
    with pytest.raises(ValueError, match="state_dtype: expected 'q8' or a float dtype"):
        q.bytes_per_param("q4")
    with pytest.raises(ValueError, match="n: expected an integer >= 1"):
        q.bytes_per_param("q8", n=0)


def test_import_needs_only_numpy():
    code = ("import sys, fastopt.quantization as q; q.dynamic_map(True); "
            "bad = [m for m in ('torch', 'numba', 'cupy', 'bitsandbytes') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- the recipe, compiled

def test_table_recipe_transcribed_to_numba_is_bit_identical():
    # The docstring recipe of nearest_code, transcribed line by line into scalar float32 /
    # uint32 code as a compiled kernel will run it: proof that the recipe needs nothing
    # NumPy-specific (no float64, no vectorised tricks) to give the same codes.
    numba = pytest.importorskip("numba")

    @numba.njit(cache=False)
    def codes_of(y, table, thresholds, out):
        bits_all = y.view(np.uint32)
        for i in range(y.size):
            bits = bits_all[i]
            b = bits & np.uint32(0x7FFFFFFF)
            b = min(max(b, np.uint32(0x34000000)), np.uint32(0x3F7FFFFF))
            b = (b - np.uint32(0x34000000)) >> np.uint32(16)
            base = table[bits >> np.uint32(31), b]
            code = base + (1 if y[i] > thresholds[base] else 0)
            out[i] = 0 if y[i] != y[i] else code

    for signed in SIGNS:
        pos = f32_bits(0.0, 1.5, 1009)
        y = np.concatenate([adversarial(signed), pos, -pos,
                            f32_bits(0.5, 1.0, 1), -f32_bits(2.0 ** -23, 2.0 ** -22, 1)])
        out = np.empty(y.size, np.uint8)
        codes_of(y, q.code_table(signed), q.code_thresholds(signed), out)
        assert np.array_equal(out, q.nearest_code(y, signed))
