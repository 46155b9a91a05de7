"""The Numba backend's 16-bit kernels against the NumPy reference, bit for bit.

float16 and bfloat16 params (and float32 params with bfloat16 state) run on Numba through the
tiled drivers of ``kernels/numba_cpu.py`` (docs/design.md, "Numba backend"): float32
arithmetic, the unchanged rule bodies, one rounding per write.  The reference does the same
operations in the same order, so every param, state and master array must agree bit for bit,
stochastic rounding included (the same counter hash of (seed, step, index)).

Compile cost: Numba specializes an entry point on whether its call is reduced precision, not
on the dtype combination, so each rule variant compiles one tiled kernel whatever the dtypes;
the whole cross product (every rule x {float16, bfloat16} x state {float32, param, bfloat16}
x master {on, off} x stochastic rounding {on, off for bfloat16}) then costs run time only.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

import fastopt as fo
from fastopt import precision as prec
from fastopt._backend import get_ops, supports
from fastopt._rules import DENSE_SOLVE, FACTORED, ORTHOGONALIZE, RULES

from _cases import assert_same_run, extra_input

ml_dtypes = pytest.importorskip("ml_dtypes")
pytestmark = pytest.mark.skipif(not fo._backend.available("numba"), reason="numba not installed")

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
F32 = np.dtype(np.float32)
#: odd sizes: a single element, a tail shorter than a vector, several 512-element tiles
SIZES = (1, 7, 1029, 2500)
STEPS = 3

#: One option set per entry point of the Numba backend (each variant of each rule), with
#: weight decay wherever the rule has it (the decay stage runs in float32 before rounding).
RULE_CASES = [
    ("sgd", {"lr": 0.1, "weight_decay": 0.01}),
    ("sgd", {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
    ("adam", {"lr": 1e-2, "weight_decay": 0.1}),
    ("adam", {"lr": 1e-2, "amsgrad": True}),
    ("adamw", {"lr": 1e-2, "weight_decay": 0.1}),
    ("adagrad", {"lr": 0.1, "lr_decay": 0.01, "weight_decay": 0.01}),
    ("rmsprop", {"lr": 1e-2}),
    ("rmsprop", {"lr": 1e-2, "momentum": 0.9}),
    ("rmsprop", {"lr": 1e-2, "centered": True}),
    ("rmsprop", {"lr": 1e-2, "momentum": 0.9, "centered": True, "weight_decay": 0.01}),
    ("adadelta", {"lr": 1.0, "weight_decay": 0.01}),
    ("adamax", {"lr": 1e-2, "weight_decay": 0.01}),
    ("nadam", {"lr": 1e-2, "weight_decay": 0.01}),
    ("radam", {"lr": 1e-2, "weight_decay": 0.01}),
    ("lion", {"lr": 1e-3, "weight_decay": 0.1}),
    ("lamb", {"lr": 1e-2, "weight_decay": 0.01}),
    ("adahessian", {"lr": 0.1, "weight_decay": 0.01}),
    ("adahessian", {"lr": 0.1, "hessian_power": 0.5}),
    ("asgd", {"lr": 1e-2, "t0": 1, "weight_decay": 0.01}),
    ("rprop", {"lr": 1e-2}),
    ("adabelief", {"lr": 1e-2, "nesterov": True, "weight_decay": 0.01}),
    ("yogi", {"lr": 1e-2, "weight_decay": 0.01}),
    ("ademamix", {"lr": 1e-2, "t_alpha": 5, "t_beta3": 5}),
    ("schedule_free_adamw", {"lr": 1e-2, "weight_decay": 0.01, "warmup_steps": 2}),
    ("schedule_free_sgd", {"lr": 0.1, "momentum": 0.5, "r": 1.0, "weight_decay": 0.01}),
    ("lars", {"lr": 0.1, "weight_decay": 0.01, "trust_coefficient": 0.1, "nesterov": True}),
]
#: every rule with an elementwise or trust-ratio kernel (Newton and Muon keep float32/float64)
assert {r for r, _ in RULE_CASES} == {n for n, r in RULES.items()
                                      if r.kind not in (DENSE_SOLVE, ORTHOGONALIZE, FACTORED)}


def _precisions():
    """(id, param dtype, precision options): the whole cross product of the precision options."""
    out = []
    for dt in (F16, BF16):
        for state in (None, "param", "bfloat16"):
            writes = [("rne", {}), ("master", {"master_weights": True})]
            if dt == BF16:
                writes.append(("sr", {"stochastic_rounding": True, "seed": 7}))
            for wid, w in writes:
                opts = dict(w)
                if state is not None:
                    opts["state_dtype"] = state
                out.append((f"{dt.name}-{state or 'f32state'}-{wid}", dt, opts))
    out.append(("float32-bfloat16state", F32, {"state_dtype": "bfloat16"}))
    return out


PRECISIONS = _precisions()


def bits(a):
    a = np.asarray(a)
    return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def problem(rule, dtype, sizes=SIZES, steps=STEPS, grad_dtype=None, seed=0):
    """Params, and per step grads and extra inputs, as exact values of the storage dtypes."""
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s).astype(np.float32).astype(dtype) for s in sizes]
    feed = []
    for _ in range(steps):
        gd = dtype if grad_dtype is None else grad_dtype
        grads = [rng.standard_normal(s).astype(np.float32).astype(gd) for s in sizes]
        extras = None
        if RULES[rule].extra is not None:
            extras = [extra_input(rule, p.astype(np.float32), rng).astype(gd) for p in params]
        feed.append((grads, extras))
    return params, feed


def run(rule, options, params, feed, backend, **step_kw):
    ps = [p.copy() for p in params]
    opt = getattr(fo, RULES[rule].class_name)(ps, backend=backend, **options)
    assert opt.backend == backend
    infos = []
    for grads, extras in feed:
        args = (grads,) if extras is None else (grads, extras)
        infos.append(opt.step(*args, **step_kw))
    return ps, opt.state_dict(), infos


def assert_bit_identical(want, got):
    (wp, wsd, _), (gp, gsd, _) = want, got
    for i, (w, g) in enumerate(zip(wp, gp)):
        assert g.dtype == w.dtype
        np.testing.assert_array_equal(bits(g), bits(w), err_msg=f"params[{i}]")
    assert gsd["step_count"] == wsd["step_count"]
    assert set(gsd["state"]) == set(wsd["state"])
    for i, st in wsd["state"].items():
        assert set(gsd["state"][i]) == set(st)
        for name, w in st.items():
            g = gsd["state"][i][name]
            assert g.dtype == w.dtype, (i, name)
            np.testing.assert_array_equal(bits(g), bits(w), err_msg=f"state[{i}][{name}]")


def assert_parity(rule, options, params, feed, **step_kw):
    want = run(rule, options, params, feed, "numpy", **step_kw)
    got = run(rule, options, params, feed, "numba", **step_kw)
    assert_bit_identical(want, got)
    return want, got


# --------------------------------------------------------------------------- the cross product


@pytest.mark.parametrize("pid,dtype,popts", PRECISIONS, ids=[p[0] for p in PRECISIONS])
@pytest.mark.parametrize("rule,options", RULE_CASES,
                         ids=[f"{r}{k}" for k, (r, _) in enumerate(RULE_CASES)])
def test_every_rule_and_precision_is_bit_identical(rule, options, pid, dtype, popts):
    params, feed = problem(rule, dtype)
    if options.get("hessian_power", 1) != 1:
        # the one operation two float32 implementations round differently: pow (Numba calls
        # libm's powf, NumPy its own float32 power loop; measured: 1 element in 2500 one float32
        # ulp apart after 3 steps), so AdaHessian with a power other than 1 is held to TOL
        opts = {**options, **popts}
        want = run(rule, opts, params, feed, "numpy")
        got = run(rule, opts, params, feed, "numba")
        assert_same_run(want[0], want[1], got[0], got[1], dtype)
        return
    assert_parity(rule, {**options, **popts}, params, feed)


# --------------------------------------------------------------------------- grads and pipeline


@pytest.mark.parametrize("rule", ["adam", "sgd", "lamb", "adahessian"])
@pytest.mark.parametrize("dtype", [F16, BF16], ids=["float16", "bfloat16"])
def test_float32_grads_on_16_bit_params(rule, dtype):
    """Accumulated float32 grads (and float32 Hessian diagonals) with 16-bit params."""
    params, feed = problem(rule, dtype, grad_dtype=F32)
    assert_parity(rule, {"lr": 1e-2, "momentum": 0.9} if rule == "sgd" else {"lr": 1e-2},
                  params, feed)


def test_grads_mixing_float32_and_16_bit_in_one_list():
    params, feed = problem("adam", BF16, seed=3)
    feed = [([g if k % 2 else g.astype(F32) for k, g in enumerate(grads)], None)
            for grads, _ in feed]
    assert {g.dtype for g in feed[0][0]} == {BF16, F32}
    assert_parity("adam", {"lr": 1e-2, "stochastic_rounding": True}, params, feed)


PIPELINE = {"clip_value": 0.8, "clip_norm": 3.0, "clip_global_norm": 5.0, "maximize": True,
            "weight_clip": 1.5, "max_norm": 20.0}


@pytest.mark.parametrize("rule", ["adam", "lamb"])
@pytest.mark.parametrize("pid,dtype,popts",
                         [("f16-master", F16, {"master_weights": True}),
                          ("bf16-sr-bf16state", BF16, {"stochastic_rounding": True, "seed": 3,
                                                       "state_dtype": "bfloat16"}),
                          ("bf16-param", BF16, {"state_dtype": "param"})],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_pipeline_options_and_max_norm_before_the_rounding(rule, pid, dtype, popts):
    """Every pipeline step, grad_scale included; max_norm acts in float32 before the write.

    max_norm is chosen so that it binds (the norm of each tensor exceeds it after a step)."""
    params, feed = problem(rule, dtype, sizes=(7, 1029, 2500))
    opts = {"lr": 1e-2, **PIPELINE, **popts}
    want, got = assert_parity(rule, opts, params, feed, grad_scale=4.0)
    assert max(np.linalg.norm(p.astype(np.float64)) for p in want[0]) <= 20.0 * (1 + 2 ** -7)
    for w, g in zip(want[2], got[2]):
        assert w.grad_norm == pytest.approx(g.grad_norm, rel=1e-12)


def test_tensor_split_between_threads_and_many_tiny_tensors():
    """A tensor cut between parts (over 2 * 32768 elements) and 300 tiny tensors in one list."""
    sizes = (70001,) + (1, 3, 5) * 100
    params, feed = problem("adam", BF16, sizes=sizes, steps=2)
    assert_parity("adam", {"lr": 1e-2, "stochastic_rounding": True, "seed": 11,
                           "state_dtype": "bfloat16", "max_norm": 50.0}, params, feed)


# --------------------------------------------------------------------------- the read pass


def test_float16_overflow_is_non_finite_and_skip_writes_nothing():
    """A float16 grad that overflowed to inf: raise and skip see it, nothing is written."""
    params, feed = problem("adam", F16, sizes=(7, 1029))
    grads = [g.copy() for g in feed[0][0]]
    grads[1][500] = np.float16(70000.0)  # rounds to inf in float16
    assert np.isinf(grads[1][500])
    for backend in ("numba", "numpy"):
        ps = [p.copy() for p in params]
        opt = fo.Adam(ps, lr=1e-2, backend=backend, nonfinite="skip", master_weights=True)
        before = [p.copy() for p in ps], {k: v.copy() for k, v in opt.state[0][1].items()}
        assert opt.step(grads).skipped
        for p, b in zip(ps, before[0]):
            np.testing.assert_array_equal(bits(p), bits(b))
        for k, v in opt.state[0][1].items():
            np.testing.assert_array_equal(bits(v), bits(before[1][k]))
        assert opt.step_count == 0
        with pytest.raises(FloatingPointError):
            fo.Adam([p.copy() for p in params], lr=1e-2, backend=backend).step(grads)


def test_read_pass_on_16_bit_grads_matches_the_reference():
    """Sums of squares (with and without clip_value) and the finite flag, per dtype."""
    rng = np.random.default_rng(4)
    ops, ref = get_ops("numba"), get_ops("numpy")
    for dt in (F16, BF16):
        grads = [(100 * rng.standard_normal(s)).astype(np.float32).astype(dt) for s in (1, 9000, 7)]
        grads.append(rng.standard_normal(5).astype(np.float32))  # a float32 grad in the list
        for clip in (None, 30.0):
            got = ops.grad_stats(grads, None, inv_scale=0.5, clip_value=clip, need_sumsq=True,
                                 check_finite=True)
            want = ref.grad_stats(grads, None, inv_scale=0.5, clip_value=clip, need_sumsq=True,
                                  check_finite=True)
            np.testing.assert_allclose(got[0], want[0], rtol=1e-13)
            assert got[1] is True and want[1] is True
        np.testing.assert_allclose(ops.sumsq(grads), ref.sumsq(grads), rtol=1e-13)
        bad = [g.copy() for g in grads]
        bad[1][8999] = np.nan
        assert not ops.grad_stats(bad, None, inv_scale=None, clip_value=None, need_sumsq=False,
                                  check_finite=True)[1]


def test_scale_and_clip_on_16_bit_arrays_round_once():
    rng = np.random.default_rng(2)
    ops = get_ops("numba")
    for dt in (F16, BF16):
        a = [rng.standard_normal(s).astype(np.float32).astype(dt) for s in (3, 600)]
        # two calls, two roundings: the scaled value is rounded, then clipped to 0.5 (exact)
        want = [np.clip(prec.round_to(prec.to_float32(x) * np.float32(0.3), dt), dt.type(-0.5),
                        dt.type(0.5)).astype(dt) for x in a]
        ops.scale_(a, np.array([0.3, 0.3]))
        ops.clip_(a, 0.5)
        for w, g in zip(want, a):
            np.testing.assert_array_equal(bits(g), bits(w))


# --------------------------------------------------------------------------- stochastic rounding


def test_stochastic_rounding_bits_are_the_hash_of_seed_step_and_index():
    """One SGD step from 1.0 by a sub-resolution amount: each element rounds up exactly where
    ``sr_bits(seed, 1, i)`` says so, on Numba as defined in fastopt.precision."""
    n = 4099
    p = [np.ones(n, BF16)]
    g = [np.full(n, -1.0, F32)]
    lr = 2.0 ** -9  # a quarter of bfloat16's spacing above 1.0
    fo.SGD(p, lr=lr, backend="numba", stochastic_rounding=True, seed=123).step(g)
    x = np.full(n, 1.0 + lr, np.float32)
    want = prec.f32_to_bf16_bits_sr(x, 123, 1, np.arange(n))
    np.testing.assert_array_equal(bits(p[0]), want)
    assert 0.2 < (bits(p[0]) != bits(np.ones(1, BF16))[0]).mean() < 0.3


# --------------------------------------------------------------------------- dispatch


def test_auto_and_env_choose_numba_for_16_bit(monkeypatch):
    for dt, opts in [(BF16, {}), (F16, {"master_weights": True}), (F32, {"state_dtype": "bfloat16"})]:
        assert fo.Adam([np.zeros(3, dt)], **opts).backend == "numba"
        assert fo.Adam([np.zeros(3, dt)], backend="numba", **opts).backend == "numba"
    monkeypatch.setenv("FASTOPT_BACKEND", "numba")
    assert fo.AdamW([np.zeros(3, BF16)], stochastic_rounding=True).backend == "numba"


def test_backends_list_numba_dtypes_and_newton_keeps_its_type_error():
    assert fo.backends()["numba"]["dtypes"] == ["float16", "bfloat16", "float32", "float64"]
    with pytest.raises(TypeError, match="dense Newton solve"):
        fo.Newton([np.zeros(3, BF16)], backend="numba")
    # the 8-bit block format of 16-bit params: the q8 block driver takes it (tests/test_numba_q8.py)
    q8 = prec.resolve_precision(BF16, state_dtype="q8")
    assert supports(get_ops("numba"), q8)
    assert supports(get_ops("numpy"), q8)


def test_info_lists_numba_dtypes():
    out = subprocess.run([sys.executable, "-m", "fastopt", "info"], capture_output=True, text=True,
                         check=True, env=dict(os.environ, FASTOPT_BACKEND="")).stdout
    assert "param dtypes float16, bfloat16, float32, float64" in out.split("numba", 1)[1]


# --------------------------------------------------------------------------- the benchmark rows


def test_precision_bench_rows_and_bytes_table():
    """``python -m fastopt bench --precision`` on a small size: every format, its bytes, ratios."""
    from fastopt.apps import bench

    res = bench.run_precision_bench(n=5001, reps=2)
    rows = {r["format"]: r for r in res["rows"]}
    want = {"f32": 28, "bf16 state=param": 14, "bf16 bf16-state sr": 14, "bf16 f32-state": 22}
    if "torch-fused bf16" in rows:
        want["torch-fused bf16"] = 14
    assert {k: rows[k]["bytes_per_element"] for k in want} == want
    for label in ("bf16 bf16-state sr", "bf16 f32-state"):
        assert rows[label]["baseline"] == "f32" and rows[label]["ratio"] > 0
    assert bench.precision_bytes("bfloat16", {"master_weights": True}) == 30
    assert "bf16 f32-state" in bench.format_precision_table(res)


def test_tiled_rule_loop_has_no_zero_division_test():
    # A rule body compiled under Numba's default (Python) error model tests every
    # float divisor for zero to raise ZeroDivisionError, an early loop exit that kept the
    # loop over the float32 tiles scalar (6x slower).  A serial probe with the default error
    # model runs the tiled driver: the overload's NumPy error model must reach the body.
    import numba

    from fastopt.kernels import numba_cpu as nc

    ns = dict(vars(nc))
    exec("def probe(ptr, off, total, scales, cs, fmt):\n"
         "    _apply(_adam, 0, 0, 1, ptr, off, total, scales, cs, fmt)\n", ns)
    probe = numba.njit(ns["probe"])
    sig = (numba.int64[:, ::1], numba.int64[::1], numba.int64, numba.float32[::1],
           numba.float32[::1], numba.int64[::1])
    probe.compile(sig)
    llvm_ir = probe.inspect_llvm(sig)
    assert "@sqrtf(" in llvm_ir or "@llvm.sqrt" in llvm_ir  # the body is in there
    assert "ZeroDivisionError" not in llvm_ir
