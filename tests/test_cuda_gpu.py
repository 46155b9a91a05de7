"""GPU parity of the ``cupy`` backend against the NumPy reference (marker ``gpu``).

The whole module skips without CuPy or a CUDA device.  Every ``CASES`` entry, float32 and
float64, on one multi-tensor list of sizes {1, 7, 278011, 2**24 + 3} (Newton: its small
sizes), 7 steps; params and every state array compared with ``TOL``.  Plus: many tensors
(several launches' worth of table slots), the non-finite skip/raise, state_dict round trips,
unaligned views (the scalar path), and a tensor past 2**31 elements (64-bit indexing).
"""

from __future__ import annotations

import numpy as np
import pytest

from fastopt._optim import OPTIMIZERS
from fastopt._rules import RULES

from _cases import CASE_IDS, CASES, STEPS, TOL, assert_same_run, make_problem, run, step


def _gpu_reason():
    try:
        import cupy
    except ImportError as e:
        return f"CuPy is not installed ({e})"
    try:
        if cupy.cuda.runtime.getDeviceCount() == 0:
            return "no CUDA device"
    except Exception as e:  # CUDARuntimeError without a driver
        return f"no usable CUDA device ({e})"
    return None


_REASON = _gpu_reason()
if _REASON is not None:  # one skip for the module, not one per test
    pytest.skip(_REASON, allow_module_level=True)
pytestmark = pytest.mark.gpu

import cupy  # noqa: E402

from fastopt import _backend  # noqa: E402

SIZES_GPU = (1, 7, 278011, 2**24 + 3)


def run_gpu(rule, options, params, grads, extras, **kw):
    """``_cases.run`` on the device: host problem in, host params and state_dict out."""
    ps = [cupy.asarray(p) for p in params]
    opt = OPTIMIZERS[rule](ps, backend="cupy", **options, **kw)
    infos = []
    for g, e in zip(grads, extras):
        gg = [cupy.asarray(x) for x in g]
        ee = None if e[0] is None else [cupy.asarray(x) for x in e]
        infos.append(step(opt, gg, ee))
    return [cupy.asnumpy(p) for p in ps], opt.state_dict(), infos


def compare(rule, options, sizes, dtype, seed=0):
    params, grads, extras = make_problem(rule, sizes, dtype, seed)
    want_p, want_sd = run(rule, options, params, grads, extras, "numpy")
    got_p, got_sd, _ = run_gpu(rule, options, params, grads, extras)
    assert_same_run(want_p, want_sd, got_p, got_sd, dtype)


def test_backend_is_available():
    info = _backend.backends()["cupy"]
    assert info["available"], info["reason"]
    assert len(info["rules"]) == len(RULES)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("k", range(len(CASES)), ids=CASE_IDS)
def test_parity(k, dtype):
    rule, options, _ = CASES[k]
    compare(rule, options, SIZES_GPU, dtype)


@pytest.fixture
def small_chunks():
    """2048-element chunks, so a few thousand elements already span launches."""
    from fastopt.kernels import cupy_gpu

    old = cupy_gpu.DEVICE.chunk_size
    cupy_gpu.DEVICE.chunk_size = 2048
    yield
    cupy_gpu.DEVICE.chunk_size = old


# A rule with an (n, n) extra input is left out here: its tensors are capped at 7 elements
# and solved one by one (no multi-tensor launch to split).
MULTI = [k for k, c in enumerate(CASES) if RULES[c[0]].extra_shape != "square"]


@pytest.mark.parametrize("k", MULTI, ids=[CASE_IDS[k] for k in MULTI])
def test_parity_many_tensors(k, small_chunks):
    """300 tensors, zero-element ones among them: 10+ launches per step, tensors split
    across launches."""
    rule, options, _ = CASES[k]
    rng = np.random.default_rng(5)
    sizes = [int(s) for s in rng.integers(0, 5000, 300)]
    sizes[0] = sizes[150] = 0
    sizes[7] = 3 * 65536 + 5
    compare(rule, options, sizes, np.float32, seed=1)


@pytest.mark.parametrize("mode", ["skip", "raise"])
def test_nonfinite(mode):
    from fastopt import Adam

    rng = np.random.default_rng(2)
    params = [cupy.asarray(rng.standard_normal(n).astype(np.float32)) for n in (5, 300_001, 17)]
    before = [p.copy() for p in params]
    opt = Adam(params, lr=0.1, nonfinite=mode, backend="cupy")
    grads = [cupy.ones_like(p) for p in params]
    grads[1][257] = cupy.nan
    if mode == "raise":
        with pytest.raises(FloatingPointError):
            opt.step(grads)
    else:
        assert opt.step(grads).skipped
        assert opt.step_count == 0
    for p, b in zip(params, before):
        assert bool((p == b).all())
    grads[1][257] = 1.0
    assert not opt.step(grads).skipped


def test_state_dict_round_trip_is_bitwise():
    from fastopt import Adam

    params, grads, _ = make_problem("adam", (1000, 65536 * 2 + 3), np.float32, steps=STEPS)
    a, sd_a, _ = run_gpu("adam", {"lr": 1e-2, "clip_global_norm": 0.5}, params, grads,
                         [[None, None]] * STEPS)
    ps = [cupy.asarray(p) for p in params]
    opt = Adam(ps, lr=1e-2, clip_global_norm=0.5, backend="cupy")
    for g in grads[:3]:
        opt.step([cupy.asarray(x) for x in g])
    sd = opt.state_dict()
    ps2 = [p.copy() for p in ps]
    opt2 = Adam(ps2, lr=1e-2, clip_global_norm=0.5, backend="cupy")
    opt2.load_state_dict(sd)
    for g in grads[3:]:
        opt2.step([cupy.asarray(x) for x in g])
    for x, y in zip(a, ps2):
        np.testing.assert_array_equal(x, cupy.asnumpy(y))


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_unaligned_views(dtype):
    """Params offset by one element from a 16-byte boundary take the scalar path."""
    from fastopt import Adam

    params, grads, _ = make_problem("adam", (100_003,), dtype)
    buf = cupy.empty(params[0].size + 1, dtype=dtype)
    view = buf[1:]
    view[...] = cupy.asarray(params[0])
    assert view.data.ptr % 16 != 0
    opt = Adam([view], lr=1e-2, backend="cupy")
    gbuf = cupy.empty_like(buf)
    for g in grads:
        gbuf[1:] = cupy.asarray(g[0])
        opt.step([gbuf[1:]])
    want, _ = run("adam", {"lr": 1e-2}, params, grads, [[None]] * STEPS, "numpy")
    np.testing.assert_allclose(cupy.asnumpy(view), want[0], **TOL[np.dtype(dtype)])


@pytest.mark.slow
def test_tensor_past_2_31_elements():
    """SGD on 2**31 + 21 float32 elements (17 GiB with its grad): the last elements move."""
    from fastopt import SGD

    n = 2**31 + 21
    free, _ = cupy.cuda.Device().mem_info
    if free < 2 * 4 * n + (1 << 30):
        pytest.skip(f"needs {2 * 4 * n / 2**30:.0f} GiB of free device memory, {free / 2**30:.0f} free")
    p = cupy.zeros(n, dtype=np.float32)
    g = cupy.ones(n, dtype=np.float32)
    g[-1] = 2.0
    opt = SGD([p], lr=0.5, nonfinite="ignore", backend="cupy")
    opt.step([g])
    assert float(p[0]) == -0.5 and float(p[2**31 + 3]) == -0.5 and float(p[-1]) == -1.0
    assert float(p.sum(dtype=np.float64)) == -0.5 * (n - 1) - 1.0


# ------------------------------------------------------------------ 16-bit params and q8 state
# On the device nvcc fuses multiply-adds, so a float32 step may differ from the reference's in
# its last bit: params and states are compared within TOL (two 16-bit ulps), where the CPU
# harness (tests/test_cuda_cpu.py) is bit-exact. The nearest-code port is exact here too.

from dataclasses import replace  # noqa: E402

from fastopt import precision as fprec  # noqa: E402
from fastopt import quantization as quant  # noqa: E402
from fastopt._backend import Pre  # noqa: E402
from fastopt.precision import Precision  # noqa: E402

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
F16, F32 = np.dtype(np.float16), np.dtype(np.float32)
REDUCED_RULES = [name for name, r in RULES.items()
                 if r.kind not in ("dense_solve", "orthogonalize", "factored")]
# a rule whose state cannot be 8-bit (Rule.q8_state_refused: Schedule-Free's z) has no q8 kernel
Q8_RULES = [r for r in REDUCED_RULES if not RULES[r].q8_state_refused]
FIRST_CASE = {rule: options for rule, options, _ in reversed(CASES)}
PRECISIONS = [
    (F16, {}), (F16, {"state_dtype": "param"}), (F16, {"state_dtype": "bfloat16", "master_weights": True}),
    (BF16, {"stochastic_rounding": True, "seed": 7}), (BF16, {"state_dtype": "param"}),
    (BF16, {"state_dtype": "bfloat16", "stochastic_rounding": True}), (BF16, {"master_weights": True}),
    (F32, {"state_dtype": "bfloat16"}),
]


def _device_array(a):
    """A CuPy copy of a host array; a bfloat16 one needs CuPy's bfloat16 dtype (CuPy >= 14)."""
    if a.dtype == BF16:
        try:
            return cupy.asarray(a.view(np.uint16)).view(BF16)
        except Exception as e:  # older CuPy: no bfloat16 arrays to hand fastopt
            pytest.skip(f"this CuPy has no bfloat16 arrays ({e})")
    return cupy.asarray(a)


@pytest.mark.parametrize("prec", range(len(PRECISIONS)),
                         ids=[f"{d.name}-{'-'.join(f'{k}={v}' for k, v in o.items()) or 'default'}"
                              for d, o in PRECISIONS])
@pytest.mark.parametrize("rule", REDUCED_RULES)
def test_parity_16bit(rule, prec):
    dtype, popts = PRECISIONS[prec]
    options = {**FIRST_CASE[rule], **popts}
    params, grads, extras = make_problem(rule, (1, 7, 278011, 2**20 + 3), np.float32, seed=prec)
    params = [p.astype(dtype) for p in params]
    grads = [[g.astype(dtype) for g in gs] for gs in grads]
    want_p, want_sd = run(rule, options, params, grads, extras, "numpy")
    ps = [_device_array(p) for p in params]
    opt = OPTIMIZERS[rule](ps, backend="cupy", **options)
    for g, e in zip(grads, extras):
        step(opt, [_device_array(x) for x in g], None if e[0] is None else [cupy.asarray(x) for x in e])
    # a bfloat16 param or state is compared in bfloat16's ulps
    coarsest = BF16 if BF16 == dtype or popts.get("state_dtype") == "bfloat16" else dtype
    assert_same_run(want_p, want_sd, [cupy.asnumpy(p.view(np.uint16)).view(dtype) if dtype == BF16
                                      else cupy.asnumpy(p) for p in ps], opt.state_dict(), coarsest)


def _q8_case(rule, sizes, seed):
    r = RULES[rule]
    rng = np.random.default_rng(seed)
    hp = {**r.defaults, **FIRST_CASE[rule], **({"momentum": 0.9} if rule == "sgd" else {})}
    params = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    grads = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    extras = [np.abs(rng.standard_normal(n)).astype(np.float32) for n in sizes] if r.extra else None
    states = {}
    for name, _ in r.state(hp):
        signed = name not in r.nonnegative_state
        x = [rng.standard_normal(n).astype(np.float32) * np.float32(0.1) for n in sizes]
        q = [quant.quantize_blockwise(v if signed else v * v, signed) for v in x]
        states[name] = [c for c, _ in q]
        states[name + "_absmax"] = [a for _, a in q]
    return hp, params, grads, extras, states


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16-sr"])
@pytest.mark.parametrize("rule", Q8_RULES)
def test_q8_one_step_matches_the_definition(rule, dtype):
    """One step from the same q8 state: params within TOL, absmax within 1e-5, codes equal
    or one apart (a last-bit difference of the float32 state at a decision threshold)."""
    from fastopt.kernels import cupy_gpu

    sizes = (1, 7, 255, 70_001, 2**20 + 3)
    hp, params, grads, extras, states = _q8_case(rule, sizes, seed=3)
    params = [p.astype(dtype) for p in params]
    prec = Precision(param=dtype, compute=F32, state=fprec.Q8, master_weights=False,
                     stochastic_rounding=dtype == BF16, seed=11)
    pre = Pre(precision=prec, step=1)
    s, _ = RULES[rule].step_scalars(hp, 1, dict(RULES[rule].group_state))
    # the definition on the host: dequantize, the float32 reference step, quantize
    want_p = [p.copy() for p in params]
    st32 = {n: [quant.dequantize_blockwise(c, a, n not in RULES[rule].nonnegative_state)
                for c, a in zip(states[n], states[n + "_absmax"])] for n in states if not n.endswith("_absmax")}
    _backend.get_kernel(rule, "numpy")(want_p, grads, st32, s, replace(pre, precision=replace(prec, state=F32)),
                                       extras)
    got_p = [_device_array(p) for p in params]
    dst = {n: [cupy.asarray(a) for a in v] for n, v in states.items()}
    cupy_gpu.KERNELS.update(rule, got_p, [cupy.asarray(g) for g in grads], dst, s, pre,
                            None if extras is None else [cupy.asarray(e) for e in extras])
    for w, g in zip(want_p, got_p):
        g = cupy.asnumpy(g.view(np.uint16)).view(BF16) if dtype == BF16 else cupy.asnumpy(g)
        np.testing.assert_allclose(g.astype(np.float32), w.astype(np.float32), **TOL[dtype])
    for name, xs in st32.items():
        signed = name not in RULES[rule].nonnegative_state
        for i, x in enumerate(xs):
            wc, wa = quant.quantize_blockwise(x, signed)
            gc, ga = cupy.asnumpy(dst[name][i]), cupy.asnumpy(dst[name + "_absmax"][i])
            np.testing.assert_allclose(ga, wa, rtol=1e-5, atol=0)
            assert (np.abs(gc.astype(int) - wc.astype(int)) <= 1).all(), name
            assert (gc != wc).mean() < 1e-3, name


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_q8_device_quantize_is_exact(signed):
    """fo_q8_quantize (block absmax, division, bucket lookup, sign guard) bit for bit."""
    from fastopt.kernels import cupy_gpu

    rng = np.random.default_rng(8)
    sweep = np.arange(0x30800000, 0x40000000, 89, dtype=np.uint32).view(np.float32)
    x = np.concatenate([sweep, -sweep, rng.standard_normal(1 << 20).astype(np.float32) * 1e-3,
                        np.zeros(256, np.float32), np.float32([1e-45, -1e-45, 0.5])])
    if not signed:
        x = np.abs(x)
    codes, absmax = cupy_gpu.KERNELS.quantize(cupy.asarray(x), signed)
    want_c, want_a = quant.quantize_blockwise(x, signed)
    np.testing.assert_array_equal(cupy.asnumpy(codes), want_c)
    np.testing.assert_array_equal(cupy.asnumpy(absmax), want_a)


# ------------------------------------------------------- the widening driver (Muon, Adafactor)

WIDENED = [
    ("muon", BF16, {"stochastic_rounding": True, "seed": 11, "max_norm": 2.5}),
    ("muon", F16, {"master_weights": True, "weight_decay": 0.1}),
    ("adafactor", BF16, {"state_dtype": "bfloat16", "stochastic_rounding": True, "seed": 3}),
    ("adafactor", F16, {"master_weights": True, "max_norm": 2.0}),
    ("muon-q8", BF16, {"stochastic_rounding": True, "seed": 5}),
    ("muon-q8", F32, {}),
]


def _host_array(a):
    return cupy.asnumpy(a.view(np.uint16)).view(BF16) if a.dtype == BF16 else cupy.asnumpy(a)


@pytest.mark.parametrize("rule,dtype,opts", WIDENED,
                         ids=[f"{r}-{d.name}-{'-'.join(o) or 'default'}" for r, d, o in WIDENED])
def test_widened_muon_adafactor_on_cupy(rule, dtype, opts):
    """16-bit Muon/Adafactor and q8 Muon on CuPy arrays (fastopt/_widen.py with the device
    conversions of widen.cu and q8.cu) against the NumPy backend, 3 steps: params and 16-bit
    or float32 state within TOL of the coarsest dtype (cuBLAS and NumPy's BLAS sum the
    Newton-Schulz products in other orders, so a value may land on the other side of a 16-bit
    rounding), q8 codes equal or one apart, absmax within 1e-4."""
    q8 = rule.endswith("-q8")
    name = rule.removesuffix("-q8")
    shapes = [(1024, 300), (5, 7)] if q8 else ([(301, 257), (5, 7)] if name == "muon"
                                               else [(301, 257), (2, 3, 9), (4097,)])
    rng = np.random.default_rng(9)
    params = [rng.standard_normal(s).astype(np.float32).astype(dtype) for s in shapes]
    grads = [[rng.standard_normal(s).astype(np.float32).astype(dtype) for s in shapes]
             for _ in range(3)]
    kw = dict(opts, lr=0.05, **({"state_dtype": "q8", "min_8bit_size": 1000} if q8 else {}))
    want_p = [p.copy() for p in params]
    ref = OPTIMIZERS[name](want_p, backend="numpy", **kw)
    got_p = [_device_array(p) for p in params]
    opt = OPTIMIZERS[name](got_p, backend="cupy", **kw)
    for g in grads:
        ref.step(g)
        opt.step([_device_array(x) for x in g])
    coarsest = BF16 if dtype == BF16 or kw.get("state_dtype") == "bfloat16" else dtype
    for w, g in zip(want_p, got_p):
        np.testing.assert_allclose(_host_array(g).astype(np.float64), w.astype(np.float64),
                                   **TOL[coarsest])
    for sw, sg in zip(ref.state[0], opt.state[0]):
        assert sorted(sw) == sorted(sg)
        for n, w in sw.items():
            g = _host_array(sg[n])
            assert g.dtype == w.dtype, n
            if w.dtype == np.uint8:
                assert (np.abs(g.astype(int) - w.astype(int)) <= 1).all(), n
            elif n.endswith("_absmax"):
                np.testing.assert_allclose(g, w, rtol=1e-4, atol=0, err_msg=n)
            else:
                np.testing.assert_allclose(g.astype(np.float64), w.astype(np.float64),
                                           err_msg=n, **TOL[coarsest])


# --------------------------------------------------------------------------- fastopt.layers


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(4097, 33), (5, 7, 9, 11)])
@pytest.mark.parametrize("training", [True, False])
def test_layers_batch_norm_on_cupy_matches_the_reference(dtype, shape, training):
    """CuPy arrays go to layers.cu through backend='auto'; every output stays on the device."""
    from fastopt import layers

    rng = np.random.default_rng(0)
    c = shape[1]
    x = (rng.standard_normal(shape) * 3 + 20).astype(dtype)
    g, b = rng.standard_normal(c).astype(dtype), rng.standard_normal(c).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    out = {}
    for kind, xp in (("cpu", np), ("gpu", cupy)):
        rm, rv = xp.full(c, 0.5), xp.full(c, 2.0)
        backend = "numpy" if kind == "cpu" else "auto"
        y, cache = layers.batch_norm_forward(xp.asarray(x), xp.asarray(g), xp.asarray(b), rm, rv,
                                             0.1, 1e-5, training, backend=backend)
        res = (y, *layers.batch_norm_backward(xp.asarray(dy), cache), rm, rv)
        if kind == "gpu":
            assert all(isinstance(a, cupy.ndarray) for a in res)
            res = tuple(cupy.asnumpy(a) for a in res)
        out[kind] = res
    rtol, atol = (1e-12, 1e-11) if dtype == np.float64 else (1e-6, 1e-5)
    for a, r in zip(out["gpu"], out["cpu"]):
        np.testing.assert_allclose(a, r, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("p", [0.0, 0.3, 0.9])
def test_layers_dropout_on_cupy_bit_exact(dtype, p):
    from fastopt import layers

    rng = np.random.default_rng(1)
    x = rng.standard_normal((1001, 257)).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    y, mask = layers.dropout_forward(x, p, 3, 8, backend="numpy")
    yg, maskg = layers.dropout_forward(cupy.asarray(x), p, 3, 8)
    assert isinstance(yg, cupy.ndarray) and cupy.asnumpy(yg).tobytes() == y.tobytes()
    dx = layers.dropout_backward(dy, mask, backend="numpy")
    dxg = layers.dropout_backward(cupy.asarray(dy), maskg)
    assert cupy.asnumpy(dxg).tobytes() == dx.tobytes()


def test_layers_on_cupy_bad_input():
    from fastopt import layers

    x = cupy.ones((4, 3), cupy.float32)
    with pytest.raises(TypeError, match=r"gamma: expected a cupy.ndarray \(like x\)"):
        layers.batch_norm_forward(x, np.ones(3, np.float32), None, None, None)
    with pytest.raises(TypeError, match="backend 'numba' takes numpy arrays, got cupy"):
        layers.dropout_forward(x, 0.5, 0, 1, backend="numba")
    with pytest.raises(TypeError, match="dy: expected dtype float16"):
        layers.dropout_backward(x, layers.dropout_forward(x.astype(cupy.float16), 0.5, 0, 1)[1])


@pytest.mark.parametrize("shape", [(1001, 37), (9, 5, 7, 3)])
def test_layers_float16_on_cupy(shape):
    """float16 CuPy batches run layers.cu's FoF16 kernels on their bits: Dropout bit for bit
    with the reference; BatchNorm bit for bit with the same kernels on the widened batch,
    rounded (the reference's two roundings)."""
    from fastopt import layers

    rng = np.random.default_rng(2)
    x = rng.standard_normal(shape).astype(np.float16)
    dy = rng.standard_normal(shape).astype(np.float16)
    c = shape[1]
    g, b = cupy.ones(c, cupy.float32) * 1.5, cupy.full(c, 0.25, cupy.float32)
    y, mask = layers.dropout_forward(cupy.asarray(x), 0.3, 4, 9)
    assert y.dtype == cupy.float16
    assert cupy.asnumpy(y).tobytes() == layers.dropout_forward(x, 0.3, 4, 9,
                                                               backend="numpy")[0].tobytes()
    res = {}
    for name, xs, dys in (("16", x, dy), ("32", x.astype(np.float32), dy.astype(np.float32))):
        yg, cache = layers.batch_norm_forward(cupy.asarray(xs), g, b, None, None)
        dxg, dgg, dbg = layers.batch_norm_backward(cupy.asarray(dys), cache)
        res[name] = [cupy.asnumpy(a).astype(np.float16 if a.dtype != cupy.float32 or
                                             a.ndim > 1 else np.float32)
                     for a in (yg, dxg, dgg, dbg)]
    for a, w in zip(res["16"], res["32"]):
        assert a.tobytes() == w.tobytes()
