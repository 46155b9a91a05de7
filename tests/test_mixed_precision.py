"""Mixed precision on the NumPy reference and the Python API (float16 / bfloat16 params).

torch.optim is the oracle for ``state_dtype="param"`` (torch keeps the state in the param
dtype); the other checks are exact: master weights against a float32 run, stochastic
rounding against its hash, checkpoints bit for bit.  The rounding recipes themselves are
tested in tests/test_precision.py.
"""

import re
import sys

import numpy as np
import pytest

import fastopt as fo
from fastopt import precision as prec

from _cases import ORACLE, TOL

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
F32 = np.dtype(np.float32)
DTYPES16 = [F16, BF16]
SIZES = (1, 7, 1001)


def bits(a):
    return np.asarray(a).view(np.uint16 if a.dtype.itemsize == 2 else f"u{a.dtype.itemsize}").copy()


def rng_arrays(rng, dtype, sizes=SIZES, scale=1.0):
    return [(scale * rng.standard_normal(s)).astype(np.float32).astype(dtype) for s in sizes]


def snapshot(opt, params):
    """Bytes of every param and state array (with dtype and shape) and the step count."""
    def raw(a):
        return (a.dtype.str, a.dtype.name, a.shape, a.tobytes())

    return ([raw(p) for p in params],
            [{k: raw(v) for k, v in st.items()} for g in opt.state for st in g], opt.step_count)


# --------------------------------------------------------------------------- torch as oracle

torch = pytest.importorskip("torch")

#: torch 2.13 on the CPU has fused 16-bit kernels for Adam, AdamW and Adagrad (computed in
#: float32, one rounding per write, as fastopt): they are the oracle proper, held to the TOL
#: row of the dtype.  Its fused SGD is one too but is wrong on the CPU in 16 bits (measured:
#: after the first step a 1001-element bfloat16 param stops changing, while fastopt agrees
#: with torch's float32 SGD), so SGD is compared with foreach only.
FUSED = {"Adam", "AdamW", "Adagrad"}
#: foreach rounds every intermediate (m, v, the decay, the step) to the param dtype, so it is
#: not the same computation: a decay of 1 - 1e-3 is a no-op in bfloat16, centered RMSprop's
#: v - a**2 cancels in 8 bits, SGD's momentum buffer drifts.  Measured over 20 steps the
#: typical element stays within 2 ulps of fastopt and the worst drifts by up to 0.23 (an
#: absolute error on O(1) params after 20 steps of lr up to 0.1): held to 90% of the elements
#: within 2 ulps + 2 ulps of 1, and every element within 0.3.
FOREACH_ULP = {BF16: 2.0 ** -7, F16: 2.0 ** -10}
ORACLE_STEPS = 20

_TORCH = {F16: torch.float16, BF16: torch.bfloat16}


def _cases():
    out = []
    for name, opts in ORACLE:
        if fo._rules.RULES[name.lower()].kind in (fo._rules.ORTHOGONALIZE, fo._rules.FACTORED):
            continue  # Muon, Adafactor take float32/float64 params only (their own tests)
        for impl in ("fused", "foreach"):
            for dtype in DTYPES16:
                if impl == "fused" and name not in FUSED:
                    continue
                # torch's foreach adds eps in float16, where an eps below 2**-24 is 0: its
                # sqrt(v) + eps is then 0 where v underflowed, and the param inf or nan
                eps = opts.get("eps", fo._rules.RULES[name.lower()].defaults.get("eps", 1.0))
                if impl == "foreach" and dtype == F16 and eps < 2.0 ** -24:
                    continue
                out.append((name, opts, impl, dtype))
    return out


_CASES = _cases()


@pytest.mark.parametrize("name,opts,impl,dtype", _CASES,
                         ids=[f"{n}-{i}-{impl}-{d}" for i, (n, _, impl, d) in enumerate(_CASES)])
def test_matches_torch_optim_in_16_bits(name, opts, impl, dtype):
    rng = np.random.default_rng(11)
    params = rng_arrays(rng, dtype)
    tparams = [torch.tensor(p.astype(np.float32)).to(_TORCH[dtype]).requires_grad_() for p in params]
    topt = getattr(torch.optim, name)(tparams, **opts, **{impl: True})
    opt = getattr(fo, name)(params, backend="numpy", state_dtype="param", **opts)
    for _ in range(ORACLE_STEPS):
        grads = rng_arrays(rng, dtype)
        for tp, g in zip(tparams, grads):
            tp.grad = torch.tensor(g.astype(np.float32)).to(_TORCH[dtype])
        topt.step()
        opt.step(grads)
    for st in opt.state[0]:
        assert all(a.dtype == dtype for a in st.values())  # "param": torch's state dtype
    got = np.concatenate([p.astype(np.float32) for p in params])
    want = np.concatenate([tp.detach().float().numpy() for tp in tparams])
    if impl == "fused":
        np.testing.assert_allclose(got, want, **TOL[dtype])
        return
    ulp = FOREACH_ULP[dtype]
    close = np.abs(got - want) <= 2 * ulp * (1 + np.abs(want))
    assert close.mean() >= 0.9, f"{close.mean():.3f} of the elements within 2 ulps"
    assert np.abs(got - want).max() <= 0.3


# --------------------------------------------------------------------------- exact properties

# Newton and Muon take float32/float64 params only (their dense solve / matrix products)
RULES16 = [r for r in fo._optim.OPTIMIZERS
           if fo._rules.RULES[r].kind not in (fo._rules.DENSE_SOLVE, fo._rules.ORTHOGONALIZE,
                                              fo._rules.FACTORED)]


def _feed(rule, params, rng, dtype=None):
    grads = [rng.standard_normal(p.shape).astype(np.float32).astype(dtype or p.dtype) for p in params]
    extras = None
    if fo._rules.RULES[rule].extra is not None:
        extras = [np.abs(rng.standard_normal(p.shape)).astype(np.float32).astype(dtype or p.dtype)
                  for p in params]
    return grads, extras


def _step(opt, grads, extras, **kw):
    return opt.step(grads, extras, **kw) if extras is not None else opt.step(grads, **kw)


@pytest.mark.parametrize("dtype", DTYPES16, ids=str)
@pytest.mark.parametrize("rule", RULES16)
def test_master_weights_follow_a_float32_run_and_round_to_the_param(rule, dtype):
    """The master is updated exactly as a float32 param would be; the param is RNE(master)."""
    cls = fo._optim.OPTIMIZERS[rule]
    rng = np.random.default_rng(3)
    start = rng_arrays(rng, dtype, sizes=(5, 300))
    params = [p.copy() for p in start]
    ref = [p.astype(np.float32) for p in start]
    wd = {"weight_decay": 0.01} if "weight_decay" in cls.rule.defaults else {}  # Rprop has none
    opt = cls(params, backend="numpy", master_weights=True, **wd)
    opt32 = cls(ref, backend="numpy", **wd)
    for _ in range(10):
        grads, extras = _feed(rule, ref, rng, F32)
        _step(opt, grads, extras)
        _step(opt32, grads, extras)
        for p, r, st in zip(params, ref, opt.state[0]):
            assert st["master"].dtype == F32
            np.testing.assert_array_equal(bits(st["master"]), bits(r))
            np.testing.assert_array_equal(bits(p), bits(prec.round_to(st["master"], dtype)))


@pytest.mark.parametrize("dtype", DTYPES16, ids=str)
def test_one_rounding_per_write(dtype):
    """A 16-bit step is the float32 step of its exact float32 values, then one RNE per array."""
    rng = np.random.default_rng(5)
    params = rng_arrays(rng, dtype)
    ref = [p.astype(np.float32) for p in params]
    grads = rng_arrays(rng, dtype)
    opt = fo.AdamW(params, lr=1e-2, weight_decay=0.1, backend="numpy")
    opt32 = fo.AdamW(ref, lr=1e-2, weight_decay=0.1, backend="numpy")
    opt.step(grads)
    opt32.step([g.astype(np.float32) for g in grads])
    for p, r in zip(params, ref):
        np.testing.assert_array_equal(bits(p), bits(prec.round_to(r, dtype)))
    for st, st32 in zip(opt.state[0], opt32.state[0]):  # default state: float32, exact
        for k in st:
            np.testing.assert_array_equal(bits(st[k]), bits(st32[k]))


def test_weight_decay_acts_before_rounding():
    """A decay far below bfloat16's resolution still moves an SR param on average."""
    p = np.ones(1 << 14, dtype=BF16)
    opt = fo.AdamW([p], lr=1e-3, weight_decay=1e-2, backend="numpy", stochastic_rounding=True)
    zero = np.zeros(p.shape, dtype=BF16)
    for _ in range(100):
        opt.step([zero])  # zero grad: only the decay 1 - 1e-5 acts
    want = (1 - 1e-5) ** 100
    assert abs(float(p.astype(np.float32).mean()) - want) < 1e-4
    q = np.ones(4, dtype=BF16)
    nearest = fo.AdamW([q], lr=1e-3, weight_decay=1e-2, backend="numpy")
    for _ in range(100):
        nearest.step([np.zeros(4, dtype=BF16)])
    assert (q == 1).all()  # round to nearest loses it


@pytest.mark.parametrize("rule", ["sgd", "adam"])
def test_stagnation_nearest_stalls_stochastic_rounding_does_not(rule):
    """bf16 1.0 plus 1e-4 per step for 1000 steps: nearest stays 1.0, SR averages 1.1."""
    n = 1 << 14
    out = {}
    for sr in (False, True):
        p = np.ones(n, dtype=BF16)
        if rule == "sgd":
            opt = fo.SGD([p], lr=1.0, backend="numpy", stochastic_rounding=sr, seed=1)
        else:  # Adam with a constant grad takes steps of lr (m/sqrt(v) = -1 after bias correction)
            opt = fo.Adam([p], lr=1e-4, eps=1e-30, backend="numpy", stochastic_rounding=sr, seed=1)
        g = np.full(n, -1e-4, dtype=np.float32)  # float32 grads: accumulated ones are
        for _ in range(1000):
            opt.step([g])
        out[sr] = p.astype(np.float32)
    assert (out[False] == 1).all()
    assert abs(float(out[True].mean()) - 1.1) < 0.005
    # each element is a martingale around its float32 path whose steps have variance at most
    # ulp**2/4 (ulp = 2**-7 above 1): its spread after 1000 steps is below sqrt(1000)*ulp/2
    assert float(out[True].std()) < 1000 ** 0.5 * 2.0 ** -7 / 2


def test_stochastic_rounding_bits_follow_seed_and_hash():
    rng = np.random.default_rng(0)
    start = rng_arrays(rng, BF16, sizes=(2000,))
    grads = rng_arrays(rng, BF16, sizes=(2000,))
    runs = {}
    for seed in (0, 0, 7):
        p = start[0].copy()
        opt = fo.Adam([p], lr=1e-3, backend="numpy", stochastic_rounding=True, seed=seed)
        opt.step(grads)
        runs.setdefault(seed, []).append(bits(p))
    np.testing.assert_array_equal(runs[0][0], runs[0][1])
    assert (runs[0][0] != runs[7][0]).mean() > 0.2
    # the param is the SR of the float32 update with index = flat index, step = t = 1
    ref = [start[0].astype(np.float32)]
    fo.Adam(ref, lr=1e-3, backend="numpy").step([grads[0].astype(np.float32)])
    want = prec.f32_to_bf16_bits_sr(ref[0], 0, 1, prec.element_index(2000))
    np.testing.assert_array_equal(runs[0][0], want)


@pytest.mark.parametrize("options", [dict(stochastic_rounding=True), dict(master_weights=True),
                                     dict(state_dtype="bfloat16", stochastic_rounding=True),
                                     dict(state_dtype="param")], ids=str)
def test_resume_from_checkpoint_is_bit_identical(options, tmp_path):
    rng = np.random.default_rng(9)
    start = rng_arrays(rng, BF16, sizes=(3, 4, 500))
    feed = [rng_arrays(rng, BF16, sizes=(3, 4, 500)) for _ in range(10)]
    straight = [p.copy() for p in start]
    a = fo.AdamW(straight, lr=1e-2, backend="numpy", seed=5, **options)
    for g in feed:
        a.step(g)
    first = [p.copy() for p in start]
    b = fo.AdamW(first, lr=1e-2, backend="numpy", seed=5, **options)
    for g in feed[:4]:
        b.step(g)
    fo.save(b, tmp_path / "c.npz")
    resumed = [np.zeros_like(p) for p in start]
    c = fo.AdamW(resumed, lr=1e-2, backend="numpy", seed=5, **options)
    fo.load(c, tmp_path / "c.npz")
    for g in feed[4:]:
        c.step(g)
    assert snapshot(c, resumed) == snapshot(a, straight)


PARAM_DTYPES = [F16, BF16, F32, np.dtype(np.float64)]


def _state_options(dtype):
    out = [dict()]
    if dtype != np.float64:
        out += [dict(state_dtype="bfloat16"), dict(state_dtype="param")]
    if dtype.itemsize == 2:
        out.append(dict(master_weights=True))
    if dtype == BF16:
        out.append(dict(stochastic_rounding=True))
    return out


_ROUND_TRIPS = [(d, o) for d in PARAM_DTYPES for o in _state_options(d)]


@pytest.mark.parametrize("dtype,options", _ROUND_TRIPS, ids=[f"{d}-{o}" for d, o in _ROUND_TRIPS])
def test_state_dict_and_checkpoint_keep_every_dtype(dtype, options, tmp_path):
    rng = np.random.default_rng(1)
    params = rng_arrays(rng, dtype, sizes=(6, 33))
    opt = fo.Adam(params, lr=1e-2, amsgrad=True, backend="numpy", **options)
    for _ in range(3):
        opt.step(rng_arrays(rng, dtype, sizes=(6, 33)))
    want = snapshot(opt, params)
    assert opt.state_nbytes() == sum(a.nbytes for st in opt.state[0] for a in st.values())
    sd = opt.state_dict()
    for st in sd["state"].values():
        for k, a in st.items():
            assert a.dtype == (F32 if k == "master" else opt.state_dtype(params[0], k))
    fresh = [np.zeros_like(p) for p in params]
    other = fo.Adam(fresh, lr=1e-2, amsgrad=True, backend="numpy", **options)
    other.load_state_dict(sd)
    assert snapshot(other, params)[1:] == want[1:]
    fo.save(opt, tmp_path / "c.npz")
    with np.load(tmp_path / "c.npz", allow_pickle=False) as z:  # no pickle anywhere
        assert all(z[k].dtype != object for k in z.files)
    third = fo.Adam(fresh, lr=1e-2, amsgrad=True, backend="numpy", **options)
    fo.load(third, tmp_path / "c.npz")
    assert snapshot(third, fresh) == want


def test_state_nbytes_counts_the_formats():
    n = 1000
    sizes = {}
    for dtype, options in [(F32, {}), (BF16, {}), (BF16, dict(state_dtype="bfloat16")),
                           (BF16, dict(master_weights=True)), (F16, dict(state_dtype="param"))]:
        opt = fo.Adam([np.zeros(n, dtype)], backend="numpy", **options)
        sizes[(dtype.name, tuple(options.items()))] = opt.state_nbytes()
    assert list(sizes.values()) == [8 * n, 8 * n, 4 * n, 12 * n, 4 * n]


def test_grad_scale_unscales_float16_in_float32():
    rng = np.random.default_rng(2)
    start = rng_arrays(rng, F16, sizes=(50,))
    g16 = (rng.standard_normal(50) * 1e4).astype(F16)  # a scaled grad near float16's top
    scale = 65536.0
    a = [start[0].copy()]
    fo.Adam(a, lr=1e-2, backend="numpy").step([g16], grad_scale=scale)
    b = [start[0].copy()]
    fo.Adam(b, lr=1e-2, backend="numpy").step([g16.astype(np.float32) * (1 / scale)])
    np.testing.assert_array_equal(bits(a[0]), bits(b[0]))


def test_nonfinite_check_sees_float16_overflow():
    p = np.ones(4, dtype=F16)
    opt = fo.Adam([p], backend="numpy")
    with np.errstate(over="ignore"):
        g = (np.array([1.0, 2.0, 7e4, 3.0], dtype=np.float32)).astype(F16)  # 7e4 -> inf
    before = snapshot(opt, [p])
    with pytest.raises(FloatingPointError):
        opt.step([g], grad_scale=1024.0)
    assert snapshot(opt, [p]) == before
    skip = fo.Adam([p], backend="numpy", nonfinite="skip")
    assert skip.step([g]).skipped and snapshot(skip, [p])[0] == before[0]


def test_functional_takes_the_precision_options():
    rng = np.random.default_rng(4)
    start = rng_arrays(rng, BF16, sizes=(9, 40))
    grads = rng_arrays(rng, BF16, sizes=(9, 40))
    cls_params = [p.copy() for p in start]
    opt = fo.Adam(cls_params, lr=1e-2, backend="numpy", master_weights=True,
                  state_dtype="bfloat16")
    opt.step(grads)
    params = [p.copy() for p in start]
    m = [np.zeros(p.shape, BF16) for p in params]
    v = [np.zeros(p.shape, BF16) for p in params]
    masters = [p.astype(np.float32) for p in params]
    fo.functional.adam(params, grads, m, v, masters=masters, step=1, lr=1e-2, backend="numpy",
                       master_weights=True, state_dtype="bfloat16")
    for p, q, st, mm, vv, ms in zip(params, cls_params, opt.state[0], m, v, masters):
        np.testing.assert_array_equal(bits(p), bits(q))
        np.testing.assert_array_equal(bits(mm), bits(st["exp_avg"]))
        np.testing.assert_array_equal(bits(vv), bits(st["exp_avg_sq"]))
        np.testing.assert_array_equal(bits(ms), bits(st["master"]))
    with pytest.raises(ValueError, match=r"exp_avgs\[0\]: expected dtype float32 \(the state dtype"):
        fo.functional.adam(params, grads, [p.copy() for p in params], v, step=2, backend="numpy")
    with pytest.raises(TypeError, match=r"masters is required"):
        fo.functional.adam(params, grads, m, v, step=2, backend="numpy", master_weights=True,
                           state_dtype="bfloat16")


# --------------------------------------------------------------------------- backends

def test_backends_list_their_dtypes_and_auto_sends_16_bit_to_a_backend_that_has_them(capsys):
    info = fo.backends()
    all4 = ["float16", "bfloat16", "float32", "float64"]
    assert info["numpy"]["dtypes"] == all4
    assert info["numba"]["dtypes"] == (all4 if info["numba"]["available"] else [])
    assert info["cupy"]["dtypes"] == (["float32", "float64"] if info["cupy"]["available"] else [])
    want = "numba" if info["numba"]["available"] else "numpy"
    for dtype, options in [(BF16, {}), (F16, {}), (F32, dict(state_dtype="bfloat16"))]:
        assert fo.Adam([np.zeros(3, dtype)], **options).backend == want
    from fastopt._cli import main
    main(["info"])
    assert re.search(r"numpy\s+yes\s+\d+ rules; param dtypes float16, bfloat16, float32, float64",
                     capsys.readouterr().out)


@pytest.mark.skipif(not fo._backend.available("numba"), reason="numba not installed")
@pytest.mark.parametrize("dtype,options", [(BF16, {}), (F16, {}), (F32, dict(state_dtype="bfloat16"))],
                         ids=["bf16", "f16", "f32-bf16-state"])
def test_explicit_numba_takes_reduced_precision(dtype, options):
    # its kernels are compared with the reference bit for bit in tests/test_numba_precision.py
    assert fo.Adam([np.zeros(3, dtype)], backend="numba", **options).backend == "numba"


# --------------------------------------------------------------------------- bad input

def _adam_stepped(dtype=BF16, **options):
    rng = np.random.default_rng(8)
    params = rng_arrays(rng, dtype, sizes=(4, 5))
    opt = fo.Adam(params, backend="numpy", **options)
    opt.step(rng_arrays(rng, dtype, sizes=(4, 5)))
    return opt, params


@pytest.mark.parametrize("pdtype,gdtype", [(BF16, F16), (F16, BF16), (BF16, np.float64),
                                            (F32, BF16), (np.float64, F16)], ids=str)
def test_grad_dtype_must_be_the_params_or_float32(pdtype, gdtype):
    opt, params = _adam_stepped(np.dtype(pdtype))
    grads = [np.ones(p.shape, dtype=gdtype) for p in params]
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match=r"grads\[0\]: expected dtype .*\(its param is .*\), got"):
        opt.step(grads)
    assert snapshot(opt, params) == before
    if np.dtype(pdtype).itemsize == 2:  # float32 grads (accumulated ones) are taken
        opt.step([np.ones(p.shape, np.float32) for p in params])


@pytest.mark.parametrize("dtype,options,exc,pattern", [
    (F16, dict(stochastic_rounding=True), ValueError, r"stochastic_rounding: expected False .*float16"),
    (F32, dict(stochastic_rounding=True), ValueError, r"stochastic_rounding: expected False .*float32"),
    (BF16, dict(stochastic_rounding=True, master_weights=True), ValueError,
     r"stochastic_rounding: expected False with master_weights=True"),
    (F32, dict(master_weights=True), ValueError, r"master_weights: expected False .*float32"),
    (np.float64, dict(state_dtype="bfloat16"), ValueError, r"state_dtype: expected one of float64"),
    (F16, dict(state_dtype="q8", min_8bit_size=-1), ValueError, r"min_8bit_size: expected an integer >= 0"),
    (F16, dict(state_dtype="int8"), ValueError, r"state_dtype: expected None, 'param'"),
    (BF16, dict(seed=-1), ValueError, r"seed: expected an integer in \[0, 2\*\*64\)"),
    (BF16, dict(master_weights=1), TypeError, r"master_weights: expected True or False"),
], ids=lambda x: str(x)[:30])
def test_bad_precision_options(dtype, options, exc, pattern):
    p = np.ones(3, dtype)
    before = bits(p)
    with pytest.raises(exc, match=pattern):
        fo.Adam([p], backend="numpy", **options)
    with pytest.raises(exc, match=pattern):
        fo.functional.adam([p], [np.ones(3, dtype)], [np.zeros(3, F32)], [np.zeros(3, F32)], step=1,
                           backend="numpy", **options)
    np.testing.assert_array_equal(bits(p), before)


def test_newton_refuses_16_bit_params():
    with pytest.raises(TypeError, match=r"params\[0\]: expected dtype float32 or float64 \(the dense"):
        fo.Newton([np.ones(3, BF16)])


def test_bfloat16_without_ml_dtypes_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # import ml_dtypes -> ImportError
    p = np.ones(3, np.float32)
    with pytest.raises(ImportError, match=r"fastopt\[bf16\]"):
        fo.Adam([p], state_dtype="bfloat16")


def test_loading_a_state_of_another_dtype_is_refused():
    opt, params = _adam_stepped(BF16)  # float32 state
    sd = opt.state_dict()
    sd["state"][1]["exp_avg"] = sd["state"][1]["exp_avg"].astype(BF16)
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match=r"state_dict\['state'\]\[1\]\['exp_avg'\]: expected float32 "
                                         r"\(5,\) \(the state dtype of params\[1\], a bfloat16 param\)"):
        opt.load_state_dict(sd)
    assert snapshot(opt, params) == before
    master, mparams = _adam_stepped(BF16, master_weights=True)
    with pytest.raises(ValueError, match=r"\['precision'\]\['master_weights'\]: expected True"):
        master.load_state_dict(sd)  # saved without master weights
    del sd["precision"]  # an older state dict, without its options: its arrays still decide
    with pytest.raises(ValueError, match=r"\['master'\]: missing"):
        master.load_state_dict(sd)


def test_a_group_of_mixed_dtypes_runs_each_bucket_its_way():
    """float32, float16 and bfloat16 params in one optimizer: each is the run of its own."""
    rng = np.random.default_rng(12)
    start = [rng.standard_normal(6).astype(np.float32).astype(d) for d in (F32, F16, BF16)]
    grads = [rng.standard_normal(6).astype(np.float32) for _ in start]
    together = [p.copy() for p in start]
    fo.Adam(together, lr=1e-2, max_norm=0.5, weight_clip=0.3, backend="numpy").step(grads)
    for p, alone, g in zip(together, start, grads):
        q = [alone.copy()]
        fo.Adam(q, lr=1e-2, max_norm=0.5, weight_clip=0.3, backend="numpy").step([g])
        np.testing.assert_array_equal(bits(p), bits(q[0]))
    assert float(np.abs(together[2].astype(np.float32)).max()) <= 0.3


def test_demo_trains_bfloat16_three_ways(capsys):
    pytest.importorskip("sklearn")
    from fastopt._cli import main
    assert main(["demo", "--dtype", "bfloat16", "-o", "adam", "--epochs", "1", "--no-progress",
                 "--hidden", "16"]) == 0
    out = capsys.readouterr().out
    for row in ("adam ", "adam bf16 ", "adam bf16+SR ", "adam bf16+master "):
        assert re.search(rf"^{re.escape(row)}\s+0\.001\s+\d\.\d{{4}}\s+\d+\.\d%", out, re.M), row
