"""The Numba backend's 16-bit rule loop: vectorized in every compiled copy, and cacheable.

A kernel's parfor body is compiled twice by Numba (once on its own, once inside the entry
point), and a process that has just compiled the kernel runs the first copy, while the
on-disk cache stores the second (docs/design.md, "Speed of the tiled loop").  The rule loop
of the tiled driver is therefore a jitted function of its own that must be vector code in its
own compile; these tests read that compile's assembly instead of timing anything.
"""

import numpy as np
import pytest

import fastopt as fo

pytestmark = pytest.mark.skipif(not fo._backend.available("numba"), reason="numba not installed")


@pytest.fixture(scope="module")
def K():
    from fastopt.kernels import numba_cpu

    return numba_cpu


def _run_tile_rule(K, body, mode, c):
    rule = K._tiled_driver(body, mode).tile_rule
    buf = np.zeros(K._ROWS * K._TILE_STRIDE, np.float32)
    buf[:] = np.linspace(0.5, 1.5, buf.size, dtype=np.float32)
    rule(np.int64(0), np.int64(K._TILE), buf, c, np.int64(0), np.float32(1), np.float32(1), False)
    return rule, buf


def _scalars(K):
    c = np.full(K._NSCALARS, 0.5, np.float32)
    c[K._GINV] = 1
    c[K._GCLIP] = c[K._WCLIP] = np.inf
    c[K._ZERO] = 0
    c[K._S_DECAY] = 1
    return tuple(c)


def test_adam_tile_rule_is_vector_code_in_its_own_compile(K):
    rule, buf = _run_tile_rule(K, K._adam, 0, _scalars(K))
    asm = rule.inspect_asm(rule.signatures[-1])
    # the packed square root of Adam's denominator; a scalar loop has only sqrtss
    assert "sqrtps" in asm, "the 16-bit Adam rule loop compiled to scalar code"
    # and it computed something: the params row (row _P) changed from its start values
    start = np.linspace(0.5, 1.5, buf.size, dtype=np.float32)
    assert not np.array_equal(buf[:K._TILE], start[:K._TILE])


def test_tiled_drivers_are_made_once_per_body_and_mode(K):
    a = K._tiled_driver(K._adam, 0)
    assert K._tiled_driver(K._adam, 0) is a
    assert K._tiled_driver(K._adam, K._V_ADAM_AMSGRAD) is not a
    assert K._tiled_driver(K._sgd, 0) is not a


def test_16bit_lion_kernel_has_no_runtime_addresses(K):
    """A jitted body passed as an argument to a non-inlined function becomes a run-time
    address (a "dynamic global"), and Numba then refuses to cache the kernel."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    p = np.linspace(-1, 1, 1029).astype(ml_dtypes.bfloat16)
    opt = fo.Lion([p], lr=1e-3, backend="numba", state_dtype="param")
    opt.step([np.ones(1029, ml_dtypes.bfloat16)])
    # (1029 elements run as one part: the entry point's serial twin, K._SERIAL)
    libs = [cres.library for fn in (K._k_lion, K._SERIAL[K._k_lion])
            for sig, cres in fn.overloads.items()
            if isinstance(sig[4], __import__("numba").types.Array)]
    assert libs, "the 16-bit Lion step did not run the tiled kernel"
    assert not any(lib.has_dynamic_globals for lib in libs)


def test_sr_store_at_an_odd_offset_is_the_hash_of_each_index(K):
    """The SR store hashes once per group of four elements (``fastopt.precision.sr_bits``)
    from the tile's first index: a store of elements [base, base + m), starting and ending
    anywhere inside a group, must round each with its own index's bits, as
    fastopt.precision defines them, and write nothing outside that range."""
    from fastopt import precision as prec

    n = 1400
    seed, step = 2024, 7
    key = np.uint64(prec.step_key(seed, step))
    for base, m in ((1000, 77), (1001, 77), (1003, K._TILE), (2, 1), (1, 2)):
        x = np.random.default_rng(base).standard_normal(m).astype(np.float32)
        x[m // 2] = np.nan
        h = np.full(n, 0xABCD, np.uint16)
        K._store(x, h.ctypes.data, K._C_BF16, base, m, n, True, key)
        want = prec.f32_to_bf16_bits_sr(x, seed, step, np.arange(base, base + m))
        np.testing.assert_array_equal(h[base:base + m], want)
        assert (h[:base] == 0xABCD).all() and (h[base + m:] == 0xABCD).all()


@pytest.mark.parametrize("sr", [False, True], ids=["rne", "sr"])
def test_fused_bf16_adam_loop_matches_the_tile_loop_bit_for_bit(K, sr):
    """A tensor whose param, grad and two states are all bfloat16 (states nearest even, the
    param nearest even or stochastically) runs ``fused_rule`` (load, pipeline, body, store per
    element, no tile buffer): it must be vector code and give the bits of the tile loop
    followed by one rounding per write (the param's stochastic one hashed by its own index),
    over an odd range of an odd-sized tensor, with nothing written outside that range."""
    from fastopt import precision as prec

    n, a, b = 1033, 3, 1030
    rng = np.random.default_rng(11)
    f32 = [rng.standard_normal(n).astype(np.float32) for _ in range(4)]
    f32[3] = np.abs(f32[3])  # the second moment
    f32[0][7], f32[1][9] = np.nan, np.inf
    bits = [prec.f32_to_bf16_bits_rne(x) for x in f32]  # p, g, m, v
    start = [h.copy() for h in bits]
    c = _scalars(K)
    drv = K._tiled_driver(K._adam, 0)
    args = (np.float32(1), np.float32(1), False)
    seed = 99
    for step in range(1, 4):  # several steps, each reading what the last one stored
        want = [prec.bf16_bits_to_f32(h[a:b]) for h in bits]
        buf = np.zeros(K._ROWS * K._TILE_STRIDE, np.float32)
        rows = (K._P, K._G, K._S0, K._S1)
        got_p, got_m, got_v = [], [], []
        for base in range(0, b - a, K._TILE):  # the tile loop on the same values
            m = min(K._TILE, b - a - base)
            for r, x in zip(rows, want):
                buf[r * K._TILE_STRIDE:r * K._TILE_STRIDE + m] = x[base:base + m]
            drv.tile_rule(np.int64(0), np.int64(m), buf, c, np.int64(0), *args)
            for r, out in zip((K._P, K._S0, K._S1), (got_p, got_m, got_v)):
                out.append(buf[r * K._TILE_STRIDE:r * K._TILE_STRIDE + m].copy())
        expect = [prec.f32_to_bf16_bits_rne(np.concatenate(o)) for o in (got_p, got_m, got_v)]
        if sr:
            expect[0] = prec.f32_to_bf16_bits_sr(np.concatenate(got_p), seed, step,
                                                 np.arange(a, b))
        drv.fused_rule(np.int64(K._V_TILE), *(h.ctypes.data for h in bits), np.int64(a),
                       np.int64(b), c, np.int64(0), *args, sr,
                       np.uint64(prec.step_key(seed, step)))
        for h, e in zip((bits[0], bits[2], bits[3]), expect):
            np.testing.assert_array_equal(h[a:b], e)
    for h, s in zip(bits, start):
        assert (h[:a] == s[:a]).all() and (h[b:] == s[b:]).all()
    assert (bits[1] == start[1]).all()  # the grad is only read
    assert not np.array_equal(bits[0], start[0])
    rule = drv.fused_rule
    assert "sqrtps" in rule.inspect_asm(rule.signatures[-1]), "the fused loop is scalar code"
