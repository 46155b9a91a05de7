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


def test_rne_store_is_the_recipe_on_every_pattern_class(K):
    """The nearest-even bfloat16 store (``_bf16_rne``, an LLVM intrinsic in 32-bit lanes) must
    give ``fastopt.precision``'s bits for every class of float32 pattern: signaling and quiet
    nans of both signs and any payload, infinities, the largest finite values (which round to
    inf), exact ties with an even and an odd kept bit, subnormals and zeros -- in the vector
    body and in the scalar tail of the loop (an odd count), at an odd offset."""
    from fastopt import precision as prec

    rng = np.random.default_rng(3)
    special = np.array([0x7F800001, 0x7FBFFFFF, 0x7FC00000, 0x7FFFFFFF, 0xFF800001, 0xFFC12345,
                        0x7F800000, 0xFF800000, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F7F8000, 0x3F808000,
                        0x3F818000, 0xBF818000, 0x00008000, 0x00018000, 0x00000001, 0x80000000,
                        0, 0x007FFFFF, 0x3F80FFFF, 0x3F807FFF], np.uint32)
    u = rng.integers(0, 2 ** 32, 4099, dtype=np.uint32)
    u[::5] = rng.choice(special, u[::5].size)
    u[:special.size] = special
    x = u.view(np.float32)
    base, n = 5, u.size + 10
    h = np.full(n, 0xABCD, np.uint16)
    K._store(x, h.ctypes.data, K._C_BF16, base, x.size, n, False, np.uint64(0))
    np.testing.assert_array_equal(h[base:base + x.size], prec.f32_to_bf16_bits_rne(x))
    assert (h[:base] == 0xABCD).all() and (h[base + x.size:] == 0xABCD).all()


def _clipped(K, c):
    """The scalars ``c`` with clip_value and weight_clip on (the fused loops' clipping form:
    without them each loop runs a form with no clipping)."""
    c = list(c)
    c[K._GCLIP], c[K._WCLIP] = np.float32(0.75), np.float32(1.25)
    return tuple(c)


@pytest.mark.parametrize("sr,clip", [(False, False), (False, True), (True, False)],
                         ids=["rne", "rne-clip", "sr"])
def test_fused_bf16_adam_loop_matches_the_tile_loop_bit_for_bit(K, sr, clip):
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
    c = _clipped(K, _scalars(K)) if clip else _scalars(K)
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


@pytest.mark.parametrize("kind", ["rne", "master"])
def test_fused_float32_state_loop_matches_the_tile_loop_bit_for_bit(K, kind):
    """bfloat16 params and grads with float32 states (the default for 16-bit params), with or
    without a float32 master, run ``fused_rule32``: the states updated in place as float32,
    the master written as is and the param as its nearest-even rounding (stochastic rounding
    and clipping keep the tiles).  Both loops must be vector code and give the tile loop's
    bits over an odd range of an odd-sized tensor, several steps, nan and inf included, with
    nothing written outside the range."""
    from fastopt import precision as prec

    n, a, b = 1037, 5, 1034
    rng = np.random.default_rng(13)
    p32 = rng.standard_normal(n).astype(np.float32)
    g32 = rng.standard_normal(n).astype(np.float32)
    g32[11], g32[12] = np.nan, -np.inf
    m = rng.standard_normal(n).astype(np.float32)
    v = np.abs(rng.standard_normal(n)).astype(np.float32)
    v[20] = np.inf
    master = p32.copy() if kind == "master" else None
    p = prec.f32_to_bf16_bits_rne(p32)
    g = prec.f32_to_bf16_bits_rne(g32)
    start = [x.copy() for x in (p, g, m, v) + ((master,) if master is not None else ())]
    c = _scalars(K)  # (no clipping: with clip_value or weight_clip the tiles run)
    drv = K._tiled_driver(K._adam, 0)
    args = (np.float32(1), np.float32(1), False)
    for step in range(1, 4):
        param = master[a:b] if master is not None else prec.bf16_bits_to_f32(p[a:b])
        want = (param, prec.bf16_bits_to_f32(g[a:b]), m[a:b], v[a:b])
        buf = np.zeros(K._ROWS * K._TILE_STRIDE, np.float32)
        rows = (K._P, K._G, K._S0, K._S1)
        got = ([], [], [])
        for base in range(0, b - a, K._TILE):
            k = min(K._TILE, b - a - base)
            for r, x in zip(rows, want):
                buf[r * K._TILE_STRIDE:r * K._TILE_STRIDE + k] = x[base:base + k]
            drv.tile_rule(np.int64(0), np.int64(k), buf, c, np.int64(0), *args)
            for r, out in zip((K._P, K._S0, K._S1), got):
                out.append(buf[r * K._TILE_STRIDE:r * K._TILE_STRIDE + k].copy())
        new_p, new_m, new_v = (np.concatenate(o) for o in got)
        want_p = prec.f32_to_bf16_bits_rne(new_p)
        drv.fused_rule32(np.int64(K._V_TILE), p.ctypes.data, g.ctypes.data, m.ctypes.data,
                         v.ctypes.data, 0 if master is None else master.ctypes.data,
                         np.int64(a), np.int64(b), c, np.int64(0), *args)
        np.testing.assert_array_equal(p[a:b], want_p)
        np.testing.assert_array_equal(m[a:b], new_m)
        np.testing.assert_array_equal(v[a:b], new_v)
        if master is not None:
            np.testing.assert_array_equal(master[a:b], new_p)
    for x, s in zip((p, g, m, v) + ((master,) if master is not None else ()), start):
        assert (x[:a] == s[:a]).all() and (x[b:] == s[b:]).all()
    assert (g == start[1]).all()
    assert not np.array_equal(p, start[0])
    rule = drv.fused_rule32
    asm = rule.inspect_asm(rule.signatures[-1])
    # one packed square root per loop (with a master, without): a scalar loop has none
    assert asm.count("sqrtps") >= 2, "a fused float32-state loop is scalar code"


def test_fusable_picks_the_loop_of_each_format(K):
    """``_fusable``: bfloat16 param and grad with two bfloat16 states and no master ->
    ``fused_rule``; with two float32 states, master or not -> ``fused_rule32``; anything else
    (stochastic rounding with float32 states, a bfloat16 state with a master, a third state,
    an extra input, a float16 param, a float32 grad, max_norm) -> the tiles (-1)."""
    def case(p=K._C_BF16, g=K._C_BF16, s=K._C_BF16, master=False, sr=0, s2=False, e=False,
             dry=0):
        ptr = np.zeros((K._ROWS, 1), np.int64)
        ptr[[K._P, K._G, K._S0, K._S1], 0] = 64
        ptr[K._M, 0] = 64 * master
        ptr[K._S2, 0] = 64 * s2
        ptr[K._E, 0] = 64 * e
        fmt = np.zeros(K._X_HEAD + K._ROWS, np.int64)
        fmt[K._X_HEAD + np.array([K._P, K._G, K._S0, K._S1, K._M])] = [p, g, s, s, K._C_F32]
        fmt[K._X_SR], fmt[K._X_DRY] = sr, dry
        return K._fusable(ptr, fmt, 0, 1)

    assert case() == K._C_BF16
    assert case(sr=1) == K._C_BF16
    assert case(s=K._C_F32) == K._C_F32
    assert case(s=K._C_F32, master=True) == K._C_F32
    for kw in (dict(s=K._C_F32, sr=1), dict(master=True), dict(s2=True), dict(e=True),
               dict(p=K._C_F16, g=K._C_F16), dict(g=K._C_F32), dict(dry=1)):
        assert case(**kw) == -1, kw


def test_one_state_bodies_compile_no_fused_loop(K):
    assert K._two_state_body(K._adam) and K._two_state_body(K._rmsprop)
    assert not K._two_state_body(K._sgd) and not K._two_state_body(K._scale)
    assert K._tiled_driver(K._sgd, 0).fused_rule is K._no_fused_rule
    assert K._tiled_driver(K._adam, 0).fused_rule32 is not K._no_fused_rule32


def test_per_body_loops_have_their_own_symbols(K):
    # Numba names machine code by qualified name and argument types (plus a per-process
    # counter): per-body closures that shared a name ran one another's code once both
    # were loaded from the cache (tests/test_numba_contract.py has the end-to-end case).
    # The module-level stubs of one-state bodies are shared and keep their own name.
    stub, stub32 = (K._no_fused_rule.py_func.__qualname__,
                    K._no_fused_rule32.py_func.__qualname__)
    drivers = [K._tiled_driver(b, 0) for b in (K._adam, K._nadam, K._adamax)]
    for attr in ("tile_rule", "fused_rule", "fused_rule32"):
        names = {getattr(d, attr).py_func.__qualname__ for d in drivers}
        assert len(names) == len(drivers), attr
    K._tiled_driver(K._sgd, 0), K._tiled_driver(K._lion, 0)
    assert K._no_fused_rule.py_func.__qualname__ == stub
    assert K._no_fused_rule32.py_func.__qualname__ == stub32
