"""The Numba q8 block driver against the definition of a q8 step, bit for bit.

The expected result is built here from the definition of ``state_dtype="q8"``
(docs/design.md, "8-bit state format"), not from an optimizer class: decode
every q8 state with ``fastopt.quantization.dequantize_blockwise``, run the
reference kernel's float32 step on the decoded states (its reduced-precision
path: float32 compute, the param written once, ``max_norm`` inside), encode the
new states with ``quantize_blockwise``.  The Numba kernel must give the same
codes, absmax and param bits; the two exceptions are named where they occur
(LAMB's trust ratio and ``max_norm`` take float64 norms summed in another
order, so the param is compared within ``TOL``; their codes stay exact).

Skips as a whole only when numba does not import.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("numba")

from _cases import TOL  # noqa: E402
from fastopt import quantization as q8  # noqa: E402
from fastopt._backend import Pre, get_kernel, get_ops, resolve, supports  # noqa: E402
from fastopt._rules import RULES  # noqa: E402
from fastopt.kernels import numba_cpu as nc  # noqa: E402
from fastopt.precision import Q8, Precision  # noqa: E402

F32 = np.dtype(np.float32)
PREC_Q8 = Precision(param=F32, compute=F32, state=Q8, master_weights=False,
                    stochastic_rounding=False, seed=0)
# the reference's reduced-precision path with float32 state: the float32 step of the definition
PREC_F32 = Precision(param=F32, compute=F32, state=F32, master_weights=False,
                     stochastic_rounding=False, seed=0)

# partial last blocks, one to three blocks, a one-element tensor, and one big enough
# (> 2 * MIN_PER_THREAD elements in all) that two parts share the blocks
SIZES = (300, 256, 5, 700, 1)
BIG = (70001, 513)
STEPS = 7

# (rule, rule options, pipeline options): every rule with state, every variant
CASES = [
    ("sgd", {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}, {}),
    ("sgd", {"lr": 0.1, "momentum": 0.9, "nesterov": True}, {}),
    ("sgd", {"lr": 0.1, "momentum": 0.5, "dampening": 0.3},
     {"clip_value": 0.8, "maximize": True, "weight_clip": 1.5, "scales": True}),
    ("adam", {"lr": 1e-2}, {}),
    ("adam", {"lr": 1e-2, "weight_decay": 0.1, "amsgrad": True}, {"inv_scale": 0.25}),
    ("adam", {"lr": 1e-2, "bias_correction": False}, {"max_norm": 3.0, "scales": True}),
    ("adamw", {"lr": 1e-2, "weight_decay": 0.1}, {}),
    ("adamw", {"lr": 1e-2, "amsgrad": True}, {}),
    ("adagrad", {"lr": 0.1, "lr_decay": 0.01, "weight_decay": 0.01,
                 "initial_accumulator_value": 0.1}, {}),
    ("rmsprop", {"lr": 1e-2}, {}),
    ("rmsprop", {"lr": 1e-2, "momentum": 0.9}, {}),
    ("rmsprop", {"lr": 1e-2, "centered": True}, {}),
    ("rmsprop", {"lr": 1e-2, "momentum": 0.9, "centered": True, "weight_decay": 0.01}, {}),
    ("adadelta", {"lr": 1.0, "weight_decay": 0.01}, {}),
    ("adamax", {"lr": 1e-2, "weight_decay": 0.01}, {}),
    ("nadam", {"lr": 1e-2, "weight_decay": 0.01}, {}),
    ("radam", {"lr": 1e-2, "weight_decay": 0.01}, {}),  # rectified from t = 6
    ("lion", {"lr": 1e-3, "weight_decay": 0.1}, {}),
    ("lamb", {"lr": 1e-2, "weight_decay": 0.01}, {}),
    ("lars", {"lr": 0.5, "weight_decay": 0.01, "trust_coefficient": 0.02, "nesterov": True},
     {"clip_value": 0.8}),
    ("adahessian", {"lr": 0.15}, {}),
    ("adahessian", {"lr": 0.15, "hessian_power": 0.5}, {"inv_scale": 0.5}),
]


def _id(case):
    rule, opts, pipe = case
    flags = [k for k, v in {**opts, **pipe}.items() if k != "lr"]
    return "-".join([rule] + flags)


def _bits(a):
    """float32 bits, every nan as one pattern: the sign of a nan that an invalid operation
    made (sqrt of a negative centered variance) is not something either side defines."""
    b = np.ascontiguousarray(a).view(np.uint32).copy()
    b[np.isnan(a)] = 0x7FC00000
    return b


def _signed(rule, name):
    return name not in RULES[rule].nonnegative_state


def _hp(rule, opts):
    return {**RULES[rule].defaults, **opts}


def _pre(pipe, n, t, precision):
    scales = np.linspace(0.3, 1.0, n) if pipe.get("scales") else None
    return Pre(inv_scale=pipe.get("inv_scale"), maximize=pipe.get("maximize", False),
               clip_value=pipe.get("clip_value"), scales=scales,
               weight_clip=pipe.get("weight_clip"), precision=precision, step=t,
               max_norm=pipe.get("max_norm"))


def _initial_states(rule, hp, sizes, rng, random):
    """``{name: [(codes, absmax)]}``: the rule's start value, or random states (both signs
    for a signed map, magnitudes spread over decades, some all-zero blocks)."""
    out = {}
    for name, init in RULES[rule].state(hp):
        per = []
        for n in sizes:
            if random:
                x = (rng.standard_normal(n) * 10.0 ** rng.integers(-6, 1, n)).astype(np.float32)
                if not _signed(rule, name):
                    x = np.abs(x)
                x[: min(n, 256)][::3] = 0
                if n > 512:
                    x[256:512] = 0  # an all-zero block
            else:
                x = np.full(n, init, np.float32)
            per.append(q8.quantize_blockwise(x, signed=_signed(rule, name)))
        out[name] = per
    return out


def _reference_step(rule, params, grads, states, s, pre, extras):
    """The definition: decode, the reference float32 step, encode (in place)."""
    st32 = {name: [q8.dequantize_blockwise(c, a, _signed(rule, name)) for c, a in per]
            for name, per in states.items()}
    get_kernel(rule, "numpy")(params, grads, st32, s, pre, extras)
    for name, per in states.items():
        states[name] = [q8.quantize_blockwise(x, signed=_signed(rule, name)) for x in st32[name]]


def _numba_step(rule, params, grads, states, s, pre, extras):
    flat = {}
    for name, per in states.items():
        flat[name] = [c for c, _ in per]
        flat[name + "_absmax"] = [a for _, a in per]
    get_kernel(rule, "numba")(params, grads, flat, s, pre, extras)


def _run(rule, opts, pipe, sizes, grads_of, random_state, steps=STEPS, seed=0):
    rng = np.random.default_rng(seed)
    hp = _hp(rule, opts)
    p0 = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    init = _initial_states(rule, hp, sizes, rng, random_state)
    runs = {}
    for side in ("ref", "numba"):
        params = [p.copy() for p in p0]
        states = {k: [(c.copy(), a.copy()) for c, a in v] for k, v in init.items()}
        gstate = dict(RULES[rule].group_state)
        for t in range(1, steps + 1):
            grads, extras = grads_of(t, sizes)
            s, gstate = RULES[rule].step_scalars(hp, t, gstate)
            if side == "ref":
                _reference_step(rule, params, grads, states, s,
                                _pre(pipe, len(sizes), t, PREC_F32), extras)
            else:
                _numba_step(rule, params, grads, states, s,
                            _pre(pipe, len(sizes), t, PREC_Q8), extras)
        runs[side] = params, states
    return runs


def _random_grads(rule, seed=1):
    def grads_of(t, sizes):
        rng = np.random.default_rng([seed, t])
        grads = [(rng.standard_normal(n) * 10.0 ** rng.integers(-4, 1, n)).astype(np.float32)
                 for n in sizes]
        extras = None
        if RULES[rule].extra is not None:
            extras = [rng.standard_normal(n).astype(np.float32) for n in sizes]
        return grads, extras
    return grads_of


def _assert_same(rule, runs, param_exact=True):
    (pr, sr), (pn, sn) = runs["ref"], runs["numba"]
    for name in sr:
        for i, ((cr, ar), (cn, an)) in enumerate(zip(sr[name], sn[name])):
            np.testing.assert_array_equal(cn, cr, err_msg=f"{rule} {name}[{i}] codes")
            np.testing.assert_array_equal(_bits(an), _bits(ar), err_msg=f"{rule} {name}[{i}] absmax")
    for i, (a, b) in enumerate(zip(pn, pr)):
        if param_exact:
            np.testing.assert_array_equal(_bits(a), _bits(b), err_msg=f"{rule} param[{i}]")
        else:
            np.testing.assert_allclose(a, b, **TOL[F32], err_msg=f"{rule} param[{i}]")


@pytest.mark.parametrize("random_state", [False, True], ids=["zero-start", "random-state"])
@pytest.mark.parametrize("rule,opts,pipe", CASES, ids=[_id(c) for c in CASES])
def test_q8_step_matches_definition(rule, opts, pipe, random_state):
    runs = _run(rule, opts, pipe, SIZES, _random_grads(rule), random_state)
    # LAMB's trust ratio and max_norm divide by float64 norms that the reference sums
    # with np.dot and the kernel in blocks: the float32 factor may differ by one ulp
    exact = RULES[rule].kind != "trust_ratio" and "max_norm" not in pipe
    _assert_same(rule, runs, param_exact=exact)


@pytest.mark.parametrize("rule,opts", [("adam", {"lr": 1e-2, "amsgrad": True}),
                                       ("lamb", {"lr": 1e-2})], ids=["adam", "lamb"])
def test_q8_parts_split_blocks(rule, opts):
    # over 2 * MIN_PER_THREAD elements: the blocks are shared between parts (threads)
    runs = _run(rule, opts, {}, BIG + SIZES, _random_grads(rule), True, steps=3)
    _assert_same(rule, runs, param_exact=rule != "lamb")


# ------------------------------------------------------------------ adversarial values


def _adversarial(signed, rng, n):
    """Values that sit on the quantizer's edges, in blocks whose absmax is exactly 1.

    Every threshold and both float32 neighbours, every map entry, zeros and -0.0,
    subnormals, tiny negatives (the sign guard), and log-uniform values; each
    256-block starts with 1.0 so that y = x / absmax = x exactly.  The tail adds an
    all-zero block and blocks scaled by 3.7 (y = x / 3.7 rounds).
    """
    t = q8.code_thresholds(signed)
    m = q8.dynamic_map(signed)
    tiny = np.array([0.0, -0.0, 1e-45, -1e-45, 1e-40, -1e-40, 1.2e-38, -1.2e-38, -1e-9,
                     -2e-7, -5e-7, 1e-9, 3e-7, -1.0, 0.5], np.float32)
    vals = np.concatenate([t, np.nextafter(t, np.float32(np.inf)),
                           np.nextafter(t, np.float32(-np.inf)), m, tiny,
                           (10.0 ** rng.uniform(-9, 0, 2000)).astype(np.float32)])
    vals = vals[np.abs(vals) <= 1]
    if signed:
        vals = np.concatenate([vals, -vals[rng.random(vals.size) < 0.5]])
    else:
        vals = np.abs(vals)
    rng.shuffle(vals)
    nblk = -(-vals.size // 255)
    x = np.zeros(nblk * 256, np.float32)
    body = np.zeros(nblk * 255, np.float32)
    body[:vals.size] = vals
    x.reshape(nblk, 256)[:, 0] = 1.0
    x.reshape(nblk, 256)[:, 1:] = body.reshape(nblk, 255)
    tail = np.concatenate([np.zeros(256, np.float32), x[:3 * 256] * np.float32(3.7)])
    return np.concatenate([x, tail, x[:n]])


def _brute_codes(x, absmax, signed):
    """Codes by brute force: the argmin over the map of |map - x/absmax| in float64 (exact
    for float32 operands), a tie to the entry nearer zero, then the sign guard."""
    den = np.repeat(absmax, 256)[:x.size]
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.where(den == 0, np.float32(0), x / den).astype(np.float32)
    m = q8.dynamic_map(signed).astype(np.float64)
    d = np.abs(m[None, :] - y.astype(np.float64)[:, None])
    tie = d == d.min(axis=1, keepdims=True)
    code = np.where(tie, np.abs(m)[None, :], np.inf).argmin(axis=1)
    if signed:
        code[(x < 0) & (code == q8.zero_code(True))] -= 1
    return code


def test_q8_codes_on_adversarial_values_signed():
    # SGD momentum at t = 1 stores b = g exactly (keep 0, gain 1): the new state is the
    # grad, so the quantizer sees these values as they are
    rng = np.random.default_rng(5)
    g = _adversarial(True, rng, 77)
    runs = _run("sgd", {"lr": 0.1, "momentum": 0.9}, {}, (g.size,),
                lambda t, sizes: ([g.copy()], None), False, steps=1)
    _assert_same("sgd", runs)
    codes, absmax = runs["numba"][1]["momentum_buffer"][0]
    np.testing.assert_array_equal(codes, _brute_codes(g, absmax, True))
    assert (absmax == 0).any() and not np.isnan(absmax).any()
    assert set(codes[g == np.float32(-1e-9)]) == {126}  # the sign guard
    assert set(codes[g == 0]) == {127}  # -0.0 included: it keeps the zero code


def test_q8_codes_on_adversarial_values_unsigned():
    # Adamax with eps = 0 from a zero state stores u = max(b2 * 0, |g| + 0) = |g| exactly
    rng = np.random.default_rng(6)
    g = _adversarial(False, rng, 300)
    g[rng.random(g.size) < 0.5] *= -1
    runs = _run("adamax", {"lr": 1e-2, "eps": 0.0}, {}, (g.size,),
                lambda t, sizes: ([g.copy()], None), False, steps=1)
    _assert_same("adamax", runs)
    codes, absmax = runs["numba"][1]["exp_inf"][0]
    np.testing.assert_array_equal(codes, _brute_codes(np.abs(g), absmax, False))
    assert set(codes[g == 0]) == {0}


def test_q8_nonfinite_block_stays_in_its_block():
    # nonfinite="ignore": an inf grad makes its block's state non-finite and no other block's
    def grads_of(t, sizes):
        g = np.random.default_rng([7, t]).standard_normal(sizes[0]).astype(np.float32)
        g[300] = np.inf if t == 1 else g[300]
        return [g], None

    with np.errstate(invalid="ignore"):  # the reference's inf - inf in that block
        runs = _run("adam", {"lr": 1e-2}, {}, (1000,), grads_of, True, steps=2)
    _assert_same("adam", runs)
    _, states = runs["numba"]
    absmax = states["exp_avg"][0][1]
    assert not np.isfinite(absmax[1]) and np.isfinite(absmax[[0, 2, 3]]).all()


# ------------------------------------------------------------------ dispatch and bad input


def test_q8_float32_buckets_route_to_numba():
    assert supports(get_ops("numba"), PREC_Q8)
    assert resolve("auto", "numpy", [PREC_Q8]) in ("numba", "numpy")  # env may pin numpy
    assert resolve("numba", "numpy", [PREC_Q8]) == "numba"
    assert supports(get_ops("numpy"), PREC_Q8)  # the reference keeps taking them


def test_q8_bad_state_arrays_are_refused_before_writing():
    rng = np.random.default_rng(8)
    p = [rng.standard_normal(300).astype(np.float32)]
    g = [rng.standard_normal(300).astype(np.float32)]
    hp = _hp("adam", {"lr": 1e-2})
    s, _ = RULES["adam"].step_scalars(hp, 1, {})
    good = {"exp_avg": [np.zeros(300, np.uint8)], "exp_avg_absmax": [np.zeros(2, np.float32)],
            "exp_avg_sq": [np.zeros(300, np.uint8)], "exp_avg_sq_absmax": [np.zeros(2, np.float32)]}
    kernel = get_kernel("adam", "numba")
    for key, bad, what in [("exp_avg_absmax", np.zeros(1, np.float32), "2 elements"),
                           ("exp_avg_sq", np.zeros(300, np.float32), "uint8"),
                           ("exp_avg", np.zeros(299, np.uint8), "300 elements")]:
        states = {**good, key: [bad]}
        before = p[0].copy()
        with pytest.raises(ValueError, match=rf"states\['{key}'\]\[0\].*{what}"):
            kernel(p, g, states, s, _pre({}, 1, 1, PREC_Q8))
        np.testing.assert_array_equal(p[0], before)
    with pytest.raises(TypeError, match="params: expected float32"):
        kernel([p[0].astype(np.float64)], [g[0].astype(np.float64)], good, s,
               _pre({}, 1, 1, PREC_Q8))


def test_q8_thread_count_does_not_change_bits():
    import numba

    sizes = BIG + SIZES
    out = []
    for threads in (1, numba.config.NUMBA_NUM_THREADS):
        numba.set_num_threads(threads)
        try:
            runs = _run("lamb", {"lr": 1e-2, "weight_decay": 0.01}, {}, sizes,
                        _random_grads("lamb"), True, steps=2)
        finally:
            numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        out.append(runs["numba"])
    (p1, s1), (p2, s2) = out
    for a, b in zip(p1, p2):
        np.testing.assert_array_equal(_bits(a), _bits(b))
    for name in s1:
        for (c1, a1), (c2, a2) in zip(s1[name], s2[name]):
            np.testing.assert_array_equal(c1, c2)
            np.testing.assert_array_equal(_bits(a1), _bits(a2))
    assert nc._Q8_ENTRIES["lamb"] is nc._k_q8_lamb


def test_q8_driver_has_no_double_arithmetic():
    # the q8 driver's decode, update and encode loops on float32 stay float32 (the bodies
    # themselves are checked in test_numba.py); LAMB's float64 sums are pass 1's, not here
    import numba
    from test_numba import _double_ops

    @numba.njit
    def probe(ptr, off, boff, scales, cs, qm, qb, qt, qz):
        nc._q8_apply(nc._adam, nc._V_ADAM_AMSGRAD, 0, 1, ptr, off, boff, scales, scales, cs, 0,
                     qm, qb, qt, qz)
        nc._q8_apply(nc._lamb_q8, 0, 0, 1, ptr, off, boff, scales, scales, cs, 0,
                     qm, qb, qt, qz)

    tables = nc._q8_tables(RULES["adam"])
    args = (np.zeros((nc._QROWS, 1), np.int64), np.zeros(2, np.int64), np.zeros(2, np.int64),
            np.ones(1, np.float32), np.zeros(nc._NSCALARS, np.float32)) + tables
    sig = tuple(numba.typeof(a) for a in args)
    probe.compile(sig)
    llvm_ir = probe.inspect_llvm(sig)
    assert "@sqrtf(" in llvm_ir  # the update loops are in there
    assert _double_ops(llvm_ir) == []


def test_bench_q8_kernel_step_runs_both_formats():
    # the case behind the q8 benchmark rows (fastopt.apps.bench, asv bench_q8): it steps,
    # and its q8 state after a step is the quantized float32 state of the same step
    from fastopt.apps.bench import Q8KernelStep

    cases = {fmt: Q8KernelStep("adam", 1000, fmt) for fmt in ("q8", "float32")}
    before = cases["q8"].params[0].copy()
    for c in cases.values():
        c.step()
    assert not np.array_equal(before, cases["q8"].params[0])
    np.testing.assert_array_equal(cases["q8"].params[0], cases["float32"].params[0])
    for name in ("exp_avg", "exp_avg_sq"):
        codes, absmax = q8.quantize_blockwise(cases["float32"].states[name][0],
                                              signed=_signed("adam", name))
        np.testing.assert_array_equal(cases["q8"].states[name][0], codes)
        np.testing.assert_array_equal(cases["q8"].states[name + "_absmax"][0], absmax)
    with pytest.raises(ValueError, match="state: expected 'q8' or 'float32'"):
        Q8KernelStep("adam", 10, "int8")


def test_q8_bench_lookup_floor_runs_and_measures_the_right_lookups():
    # asv_bench/q8_numba.py's floor section (README's q8 table): tiny sizes, one pass; inside,
    # the timed encode's codes are checked against quantize_blockwise and the bare gather's
    # entries against the table
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), os.pardir, "asv_bench", "q8_numba.py")
    spec = importlib.util.spec_from_file_location("q8_numba_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    import numba

    before = numba.get_num_threads()
    out = mod.lookup_floor(1, n=4096, inner=1, k=1)
    assert numba.get_num_threads() == before  # the thread count is given back
    assert out["n"] == 4096 and out["threads"] == 1
    keys = ["q8_ns", "f32_ns", "decode_ns"] + (["encode_ns", "gather_ns"] if nc._Q8_GATHER else [])
    assert all(out[key] > 0 for key in keys)
    if nc._Q8_GATHER:
        assert out["lookup_bound"] > 1 and out["gather_bound"] > 1  # f32 + positive costs
    else:
        assert "lookup_bound" not in out


# ------------------------------------------------------------------ 16-bit params


def _half_run(rule, opts, pipe, param, master, sr, steps=3, sizes=SIZES):
    """Both sides from the same start: the reference's q8 step (``_reduced_tensor``) and the
    numba kernel, on 16-bit params (and grads) with q8 state, a float32 master or SR."""
    from fastopt.precision import bfloat16_dtype

    dt = bfloat16_dtype() if param == "bfloat16" else np.dtype(np.float16)
    prec = Precision(param=dt, compute=F32, state=Q8, master_weights=master,
                     stochastic_rounding=sr, seed=11)
    rng = np.random.default_rng(3)
    hp = _hp(rule, opts)
    p32 = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    init = {}
    for name, (codes_absmax) in _initial_states(rule, hp, sizes, rng, True).items():
        init[name] = [c for c, _ in codes_absmax]
        init[name + "_absmax"] = [a for _, a in codes_absmax]
    if master:
        init["master"] = [p.copy() for p in p32]
    runs = {}
    for side in ("numpy", "numba"):
        params = [p.astype(dt) for p in p32]
        states = {k: [a.copy() for a in v] for k, v in init.items()}
        gstate = dict(RULES[rule].group_state)
        kernel = get_kernel(rule, side)
        for t in range(1, steps + 1):
            grads, extras = _random_grads(rule)(t, sizes)
            grads = [g.astype(dt) for g in grads]
            s, gstate = RULES[rule].step_scalars(hp, t, gstate)
            kernel(params, grads, states, s, _pre(pipe, len(sizes), t, prec), extras)
        runs[side] = params, states
    return runs


HALF_CASES = [
    ("adam", {"lr": 1e-2, "weight_decay": 0.1}, {"clip_value": 0.8, "scales": True},
     "bfloat16", False, True),
    ("adam", {"lr": 1e-2, "amsgrad": True}, {"inv_scale": 0.25}, "bfloat16", True, False),
    ("adam", {"lr": 1e-2}, {"weight_clip": 1.5}, "float16", False, False),
    ("adam", {"lr": 1e-2}, {}, "float16", True, False),
    ("lamb", {"lr": 1e-2, "weight_decay": 0.01}, {}, "bfloat16", True, True),
    ("lars", {"lr": 0.5, "weight_decay": 0.01, "trust_coefficient": 0.02}, {"scales": True},
     "bfloat16", False, True),
]


@pytest.mark.parametrize("rule,opts,pipe,param,master,sr", HALF_CASES,
                         ids=[f"{c[0]}-{c[3]}-{'master' if c[4] else 'nomaster'}"
                              f"-{'sr' if c[5] else 'rne'}" for c in HALF_CASES])
def test_q8_half_params_match_reference(rule, opts, pipe, param, master, sr):
    runs = _half_run(rule, opts, pipe, param, master, sr)
    (pr, sr_), (pn, sn) = runs["numpy"], runs["numba"]
    for key in sr_:
        for i, (a, b) in enumerate(zip(sn[key], sr_[key])):
            if a.dtype == np.uint8:
                np.testing.assert_array_equal(a, b, err_msg=f"{rule} {key}[{i}] codes")
            elif RULES[rule].kind == "trust_ratio":  # float64 norms summed in another order
                np.testing.assert_allclose(a, b, **TOL[F32], err_msg=f"{rule} {key}[{i}]")
            else:
                np.testing.assert_array_equal(_bits(a), _bits(b), err_msg=f"{rule} {key}[{i}]")
    for i, (a, b) in enumerate(zip(pn, pr)):
        assert a.dtype == b.dtype and a.dtype.itemsize == 2
        ua, ub = a.view(np.uint16), b.view(np.uint16)
        if RULES[rule].kind == "trust_ratio":
            # one ulp of the float32 trust factor may move a rounding: a few 16-bit ulps at most
            assert np.mean(ua != ub) < 0.01, f"{rule} param[{i}]"
        else:
            np.testing.assert_array_equal(ua, ub, err_msg=f"{rule} param[{i}]")


def test_q8_half_params_route_to_numba_and_max_norm_falls_back():
    from fastopt.precision import bfloat16_dtype

    bf = Precision(param=bfloat16_dtype(), compute=F32, state=Q8, master_weights=False,
                   stochastic_rounding=True, seed=0)
    assert supports(get_ops("numba"), bf)
    assert resolve("numba", "numpy", [bf]) == "numba"
    # max_norm: the reference's q8 step, so the result is the reference's bit for bit
    runs = _half_run("adam", {"lr": 1e-2}, {"max_norm": 3.0}, "bfloat16", False, True, steps=2,
                     sizes=(300, 5))
    for a, b in zip(runs["numba"][0], runs["numpy"][0]):
        np.testing.assert_array_equal(a.view(np.uint16), b.view(np.uint16))


def test_q8_half_master_of_wrong_size_is_refused_before_writing():
    runs_input = np.random.default_rng(9)
    from fastopt.precision import bfloat16_dtype

    bf = bfloat16_dtype()
    prec = Precision(param=bf, compute=F32, state=Q8, master_weights=True,
                     stochastic_rounding=False, seed=0)
    p = [runs_input.standard_normal(300).astype(bf)]
    g = [runs_input.standard_normal(300).astype(bf)]
    s, _ = RULES["adam"].step_scalars(_hp("adam", {"lr": 1e-2}), 1, {})
    states = {"exp_avg": [np.zeros(300, np.uint8)], "exp_avg_absmax": [np.zeros(2, np.float32)],
              "exp_avg_sq": [np.zeros(300, np.uint8)],
              "exp_avg_sq_absmax": [np.zeros(2, np.float32)],
              "master": [np.zeros(299, np.float32)]}
    before = p[0].copy()
    with pytest.raises(ValueError, match=r"states\['master'\]\[0\].*300 elements"):
        get_kernel("adam", "numba")(p, g, states, s, _pre({}, 1, 1, prec))
    np.testing.assert_array_equal(p[0].view(np.uint16), before.view(np.uint16))


def test_q8_warmup_compiles_the_q8_entries():
    import inspect

    import fastopt as fo

    labels = [label for label, _ in nc.q8_warmup_jobs(("float32", "bfloat16", "float64"),
                                                      ["adam", "sgd", "rmsprop"], True)]
    # float64 takes no q8 state, SGD without momentum has none, centered RMSprop is refused
    assert labels == [f"{r} {d} q8{v}" for d in ("float32", "bfloat16")
                      for r, v in [("adam", ""), ("adam", " amsgrad"), ("sgd", " has_momentum"),
                                   ("rmsprop", ""), ("rmsprop", " has_momentum")]]
    seen = []
    # adam's q8 entries for both param kinds (compiled by the parity tests above: here a load)
    assert nc.q8_warmup(("float32", "bfloat16"), ["adam"], False,
                        lambda k, n, label: seen.append(label)) >= 0
    assert seen == ["adam float32 q8", "adam bfloat16 q8", "done"]
    assert "q8" in inspect.signature(fo.warmup).parameters


def _table_codes(y, qk, qt, q):
    """Both encodings of the kernel's code table, emulated in NumPy: the vector path's packed
    entry (code << 16 | sign-folded low 16 bits of the bucket's threshold) and the scalar
    path's float32 threshold."""
    u = y.view(np.uint32)
    e = qk[q][u >> 16]
    low = (u ^ (u.view(np.int32) >> 31).view(np.uint32)) & 0xFFFF
    vector = (e >> 16) + (low > (e & 0xFFFF))
    scalar = (qk[q][u >> 16] >> 16) + (y > qt[q][u >> 16])
    return vector, scalar


@pytest.mark.parametrize("signed", [True, False])
def test_q8_code_table_equals_nearest_code_on_edges(signed):
    # every threshold and its float32 neighbours (both signs), the first and last float of
    # every bucket of |y| <= 1, zeros, subnormals, 1, nans of several payloads: both table
    # encodings give nearest_code's code (a one-off scan of all 2**32 bit patterns agreed
    # too, +inf aside: it shares its bucket with nans and y = x / absmax is never infinite)
    rule = RULES["adam"]
    q = rule.all_state.index("exp_avg" if signed else "exp_avg_sq")
    qm, qk, qt, qz = nc._q8_tables(rule)
    assert qk.dtype == np.uint32 and qt.dtype == np.float32
    t = q8.code_thresholds(signed)
    u32 = np.uint32
    top = np.arange(0x3F81, dtype=u32) << u32(16)
    edges = np.concatenate([top, top | u32(0xFFFF)]).view(np.float32)
    near = np.concatenate([t, np.nextafter(t, np.float32(np.inf)),
                           np.nextafter(t, np.float32(-np.inf)), edges,
                           np.array([0.0, 1e-45, 1e-40, 2.0 ** -23, 1.0], np.float32)])
    y = np.concatenate([near, -near])
    vector, scalar = _table_codes(y, qk, qt, q)
    want = q8.nearest_code(y, signed)
    np.testing.assert_array_equal(vector, want)
    np.testing.assert_array_equal(scalar, want)
    nans = np.array([0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFFFFFFF, 0x7FA00000], u32)
    vector, scalar = _table_codes(nans.view(np.float32), qk, qt, q)
    assert not vector.any() and not scalar.any()  # nan -> code 0
    assert qm[q].tolist() == q8.dynamic_map(signed).tolist()
    assert qz[q] == (q8.zero_code(True) if signed else 256)
