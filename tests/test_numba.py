"""The Numba backend against the NumPy reference (tests/_cases.py drives it).

Skips as a whole only when numba does not import.  The first run compiles
every kernel (cached on disk afterwards, see fastopt.kernels.numba_cpu).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

pytest.importorskip("numba")

import numba  # noqa: E402

import fastopt as fo  # noqa: E402
from _cases import CASE_IDS, CASES, SIZES, TOL, assert_parity  # noqa: E402
from fastopt._backend import Pre  # noqa: E402
from fastopt.kernels import numba_cpu as nc  # noqa: E402

DTYPES = [np.float32, np.float64]
SIZE_SETS = [(s,) for s in SIZES] + [(1, 7, 278011, 3)]


@pytest.mark.parametrize("sizes", SIZE_SETS, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("rule,options", [c[:2] for c in CASES], ids=CASE_IDS)
def test_parity(rule, options, dtype, sizes):
    assert_parity(rule, options, sizes, dtype, "numba")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_parity_many_tensors_split_between_threads(dtype):
    # 300 tensors of 1..5000 elements: several parts, tensors cut at part edges
    sizes = np.random.default_rng(1).integers(1, 5000, 300).tolist()
    assert sum(sizes) > 2 * nc.MIN_PER_THREAD
    assert_parity("adam", {"lr": 1e-2, "clip_global_norm": 0.5, "weight_decay": 0.1}, sizes,
                  dtype, "numba")


def test_parity_without_object_address_tables(monkeypatch):
    # the fallback when the PyArrayObject probe fails: tables of a.ctypes.data
    monkeypatch.setattr(nc, "DATA_OFFSET", -1)
    assert_parity("adam", {"lr": 1e-2, "clip_norm": 0.3}, (1, 7, 278011, 3), np.float32, "numba")


def test_mixed_dtype_group_with_global_norm():
    rng = np.random.default_rng(2)
    params = [rng.standard_normal(100).astype(np.float32), rng.standard_normal(50),
              rng.standard_normal(7).astype(np.float32)]
    grads = [[rng.standard_normal(p.shape).astype(p.dtype) for p in params] for _ in range(3)]
    out = {}
    for be in ("numpy", "numba"):
        ps = [p.copy() for p in params]
        opt = fo.Adam(ps, lr=1e-2, clip_global_norm=0.5, max_norm=3.0, backend=be)
        norms = [opt.step(g).grad_norm for g in grads]
        out[be] = ps, norms
    for w, g in zip(out["numpy"][0], out["numba"][0]):
        np.testing.assert_allclose(g, w, **TOL[np.dtype(np.float32)])
    np.testing.assert_allclose(out["numba"][1], out["numpy"][1], rtol=1e-12)


# ------------------------------------------------------------------ non-finite handling


def _adam_with_bad_last_grad(nonfinite, bad):
    rng = np.random.default_rng(3)
    params = [rng.standard_normal(s).astype(np.float32) for s in (5, 278011, 3)]
    before = [p.copy() for p in params]
    opt = fo.Adam(params, lr=1e-2, amsgrad=True, clip_global_norm=1.0, nonfinite=nonfinite,
                  backend="numba")
    opt.step([rng.standard_normal(p.shape).astype(np.float32) for p in params])
    mid_p = [p.copy() for p in params]
    mid_sd = opt.state_dict()
    grads = [rng.standard_normal(p.shape).astype(np.float32) for p in params]
    grads[-1][-1] = bad
    return opt, params, grads, mid_p, mid_sd, before


def _assert_untouched(opt, params, mid_p, mid_sd):
    for p, w in zip(params, mid_p):
        np.testing.assert_array_equal(p, w)
    sd = opt.state_dict()
    assert sd["step_count"] == mid_sd["step_count"] == 1
    for i, st in mid_sd["state"].items():
        for name, w in st.items():
            np.testing.assert_array_equal(sd["state"][i][name], w)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_raise_writes_nothing(bad):
    opt, params, grads, mid_p, mid_sd, _ = _adam_with_bad_last_grad("raise", bad)
    with pytest.raises(FloatingPointError):
        opt.step(grads)
    _assert_untouched(opt, params, mid_p, mid_sd)


def test_nonfinite_skip_writes_nothing():
    opt, params, grads, mid_p, mid_sd, _ = _adam_with_bad_last_grad("skip", np.nan)
    assert opt.step(grads).skipped
    _assert_untouched(opt, params, mid_p, mid_sd)


def test_nonfinite_after_unscaling_and_in_extras():
    p = [np.ones(4, np.float32)]
    opt = fo.Adam(p, nonfinite="skip", backend="numba")
    # finite grads that overflow float32 once multiplied by 1/grad_scale
    assert opt.step([np.full(4, 3e38, np.float32)], grad_scale=0.5).skipped
    ah = fo.AdaHessian([np.ones(4)], nonfinite="skip", backend="numba")
    assert ah.step([np.ones(4)], [np.array([1.0, np.nan, 1.0, 1.0])]).skipped
    assert not ah.step([np.ones(4)], [np.ones(4)]).skipped


# ------------------------------------------------------------------ functional API


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_functional_api(dtype):
    rng = np.random.default_rng(4)
    params = [rng.standard_normal(s).astype(dtype) for s in (3, 1000)]
    grads = [rng.standard_normal(p.shape).astype(dtype) for p in params]
    out = {}
    for be in ("numpy", "numba"):
        ps = [p.copy() for p in params]
        m = [np.zeros_like(p) for p in params]
        v = [np.zeros_like(p) for p in params]
        for t in (1, 2, 3):
            info = fo.functional.nadam(ps, grads, m, v, step=t, lr=1e-2, weight_decay=0.1,
                                       mu_product=1.0 if t == 1 else mu, backend=be,
                                       clip_norm=0.5)
            mu = info.group_state[0]["mu_product"]
        g = [x.copy() for x in grads]
        norm = fo.functional.clip_grad_norm_(g, 1.0, backend=be)
        fo.functional.clip_grad_value_(g, 0.01, backend=be)
        out[be] = ps + m + v + g, norm, fo.functional.global_norm(ps, backend=be)
    for w, g in zip(out["numpy"][0], out["numba"][0]):
        np.testing.assert_allclose(g, w, **TOL[np.dtype(dtype)])
    np.testing.assert_allclose(out["numba"][1:], out["numpy"][1:], rtol=1e-12)


# ------------------------------------------------------------------ threads


def _train(opt_cls, params, grads, **kw):
    opt = opt_cls(params, backend="numba", **kw)
    for g in grads:
        opt.step(g)


def test_concurrent_steps_match_sequential():
    rng = np.random.default_rng(5)
    jobs = []
    for k in range(4):
        sizes = (300001, 17, 5000 + k)
        params = [rng.standard_normal(s).astype(np.float32) for s in sizes]
        grads = [[rng.standard_normal(s).astype(np.float32) for s in sizes] for _ in range(15)]
        jobs.append((fo.Adam if k % 2 else fo.SGD, params, grads,
                     {"lr": 1e-2} if k % 2 else {"lr": 0.1, "momentum": 0.9}))
    seq = [[p.copy() for p in params] for _, params, _, _ in jobs]
    for (cls, _, grads, kw), ps in zip(jobs, seq):
        _train(cls, ps, grads, **kw)
    conc = [[p.copy() for p in params] for _, params, _, _ in jobs]
    threads = [threading.Thread(target=_train, args=(cls, ps, grads), kwargs=kw)
               for (cls, _, grads, kw), ps in zip(jobs, conc)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(seq, conc):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)


def test_concurrent_steps_under_workqueue_layer():
    # workqueue aborts the process on concurrent launches unless the backend serializes them
    code = textwrap.dedent("""
        import threading, numpy as np, numba, fastopt as fo
        def train(seed):
            rng = np.random.default_rng(seed)
            ps = [rng.standard_normal(200000).astype(np.float32)]
            opt = fo.Adam(ps, backend="numba")
            for _ in range(30):
                opt.step([rng.standard_normal(200000).astype(np.float32)])
        ts = [threading.Thread(target=train, args=(i,)) for i in range(4)]
        [t.start() for t in ts]; [t.join() for t in ts]
        print(numba.threading_layer())
    """)
    env = dict(os.environ, NUMBA_THREADING_LAYER="workqueue", NUMBA_NUM_THREADS="2")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "workqueue"


# ------------------------------------------------------------------ dtype purity

# double arithmetic or a float -> double conversion in LLVM IR
# (inspect_llvm shows the IR as Numba emits it, before LLVM's optimizer)
_DOUBLE_OP = re.compile(r"\bfpext\b|= (fadd|fsub|fmul|fdiv|frem|fneg|fcmp)\b[^=]*\bdouble\b"
                        r"|call [^@]*\bdouble\b[^@]*@|@llvm\.\w+\.f64\b")


def _double_ops(llvm_ir):
    return [ln.strip() for ln in llvm_ir.splitlines() if _DOUBLE_OP.search(ln)]


_APPLIED = [(nc._sgd, 0), (nc._sgd, nc._V_SGD_MOMENTUM), (nc._adam, 0),
            (nc._adam, nc._V_ADAM_AMSGRAD), (nc._adagrad, 0), (nc._rmsprop, 0),
            (nc._rmsprop, nc._V_RMSPROP_CENTERED | nc._V_RMSPROP_MOMENTUM), (nc._adadelta, 0),
            (nc._adamax, 0), (nc._nadam, 0), (nc._radam, 0), (nc._lion, 0),
            (nc._adahessian, 0), (nc._adahessian, nc._V_POW), (nc._lamb_step, 0),
            (nc._scale, 0), (nc._identity, 0)]


def _probe_source():
    """One serial function running the shared update loop (``_apply``) with every body."""
    lines = ["def probe(ptr, off, total, scales, cs, flags):"]
    for body, mode in _APPLIED:
        lines.append(f"    _apply({body.py_func.__name__}, {mode}, 0, 1, ptr, off, total, "
                     f"scales, cs, flags)")
    return "\n".join(lines)


def test_float32_update_loops_have_no_double_arithmetic():
    ns = dict(vars(nc))
    exec(_probe_source(), ns)
    probe = numba.njit(ns["probe"])
    sig = (numba.int64[:, ::1], numba.int64[::1], numba.int64, numba.float32[::1],
           numba.float32[::1], numba.int64)
    probe.compile(sig)
    llvm_ir = probe.inspect_llvm(sig)
    assert "@sqrtf(" in llvm_ir and "@llvm.pow.f32" in llvm_ir  # the loops are in there
    assert _double_ops(llvm_ir) == []


def test_double_detector_catches_a_promotion():
    # the float64-promotion trap: 1 - b1 with an int literal is float64 in Numba
    @numba.njit
    def promoted(x, b1):
        return x * (1 - b1)

    sig = (numba.float32, numba.float32)
    promoted.compile(sig)
    assert _double_ops(promoted.inspect_llvm(sig))


# ------------------------------------------------------------------ misc


def test_registered_everything():
    info = fo.backends()["numba"]
    assert info["available"]
    assert set(info["rules"]) == set(fo._rules.RULES)


def test_warmup_reports_time():
    assert nc.warmup(dtypes=("float64",), rules=["sgd"], variants=False) >= 0


def test_kernel_accepts_empty_pre_on_many_tiny_tensors():
    # 1000 tensors in one call, through the kernel contract directly
    rng = np.random.default_rng(6)
    ps = [rng.standard_normal(256).astype(np.float32) for _ in range(1000)]
    gs = [rng.standard_normal(256).astype(np.float32) for _ in range(1000)]
    want = [p - np.float32(0.1) * g for p, g in zip(ps, gs)]
    s, _ = fo._rules.RULES["sgd"].step_scalars({**fo._rules.RULES["sgd"].defaults, "lr": 0.1}, 1,
                                               {})
    fo._backend.get_kernel("sgd", "numba")(ps, gs, {}, s, Pre())
    for p, w in zip(ps, want):
        np.testing.assert_array_equal(p, w)


def test_huge_finite_float64_grads_are_not_taken_for_non_finite():
    """The one-accumulator check squares the grad: 1e200**2 overflows, the exact re-check must clear it."""
    p = [np.ones(5)]
    opt = fo.SGD(p, lr=1e-300, backend="numba")
    info = opt.step([np.full(5, 1e200)])
    assert not info.skipped and opt.step_count == 1
    np.testing.assert_allclose(p[0], 1.0 - 1e-100)
    with pytest.raises(FloatingPointError):
        opt.step([np.array([1e200, 1.0, np.inf, 1.0, 1.0])])
