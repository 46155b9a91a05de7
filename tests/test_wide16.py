"""16-bit params for Muon and Adafactor: the widening driver (fastopt/_widen.py).

The definition: a step widens the param (or its float32 master), the grad and the state to
float32, runs the rule's float32 step and writes each array back once (state RNE to its
dtype, master as is, param RNE or stochastically rounded).  The oracle here is that recipe
spelled out with the float32 functional API; numba against the reference; torch's own bf16
optimizers within a TOL row; the fastopt.torch adapter against the raw API.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastopt as fo
from _cases import TOL
from fastopt import precision as prec

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)

SHAPES = {"muon": [(5, 7), (9, 3)], "adafactor": [(5, 7), (2, 3, 4), (6,)]}
STATES = {"muon": ["momentum_buffer"], "adafactor": ["row_var", "col_var", "variance"]}
#: (param dtype, options); the pipeline options (decay, clips, max_norm, grad scale) in some
CONFIGS = [
    (F16, {}),
    (F16, {"master_weights": True, "weight_decay": 0.1, "max_norm": 3.0}),
    (BF16, {"state_dtype": "param", "weight_clip": 0.9, "grad_scale": 4.0}),
    (BF16, {"master_weights": True, "state_dtype": "bfloat16", "clip_value": 0.7}),
    (BF16, {"stochastic_rounding": True, "seed": 11, "max_norm": 2.5, "weight_decay": 0.05}),
    (BF16, {"stochastic_rounding": True, "state_dtype": "param", "maximize": True}),
]
IDS = ["f16", "f16-master-decay-maxnorm", "bf16-param-state-wclip-scale",
       "bf16-master-bf16state-clip", "bf16-sr-maxnorm-decay", "bf16-sr-param-state-maximize"]
CLASSES = {"muon": fo.Muon, "adafactor": fo.Adafactor}
LR = {"muon": 0.05, "adafactor": 0.02}
PRECISION_KEYS = ("state_dtype", "master_weights", "stochastic_rounding", "seed")


def _problem(rule, dtype, steps=3, seed=0):
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s).astype(dtype) for s in SHAPES[rule]]
    grads = [[rng.standard_normal(s).astype(dtype) for s in SHAPES[rule]] for _ in range(steps)]
    return params, grads


def _run(rule, dtype, opts, backend, steps=3, seed=0):
    params, grads = _problem(rule, dtype, steps, seed)
    scale = opts.get("grad_scale")
    opt = CLASSES[rule](params, lr=LR[rule], backend=backend,
                        **{k: v for k, v in opts.items() if k != "grad_scale"})
    for g in grads:
        opt.step(g, grad_scale=scale)
    return params, opt


def _states(rule, opt):
    return [(i, n, st[n]) for i, st in enumerate(opt.state[0]) for n in STATES[rule] + ["master"]
            if n in st]


def _bits(a):
    return np.asarray(a).view(np.uint16 if a.dtype.itemsize == 2 else np.uint32)


def write_params(params, masters, work, dtype, opts, step):
    """An oracle's last write of a widened step: each float32 result ``work[i]`` kept as the
    master (with master weights) and the param rounded once to ``dtype``, to nearest even or
    stochastically with the element's flat index in its param (``opts``' precision options).
    Shared with tests/test_sparse16.py's whole-table oracle."""
    for i, w in enumerate(work):
        if masters:
            masters[i] = w
        params[i] = prec.round_to(w, dtype, stochastic_rounding=bool(
            opts.get("stochastic_rounding")), seed=opts.get("seed", 0), step=step,
            index=prec.element_index(w.shape))


def _oracle(rule, dtype, opts, steps=3, seed=0):
    """The recipe by hand: float32 functional steps on widened copies, one rounding per write."""
    params, grads = _problem(rule, dtype, steps, seed)
    hp = {k: v for k, v in opts.items() if k not in PRECISION_KEYS}
    sdt = prec.resolve_state_dtype(dtype, opts.get("state_dtype"))
    masters = [prec.to_float32(p).copy() for p in params] if opts.get("master_weights") else None
    shape_of = fo._rules.RULES[rule].state_shape_of
    stored = [{n: np.zeros(shape_of(n, s), sdt) for n in STATES[rule]
               if shape_of(n, s) is not None} for s in SHAPES[rule]]
    for t, g in enumerate(grads, 1):
        work = [m.copy() for m in masters] if masters else [prec.to_float32(p) for p in params]
        wide = [{n: prec.to_float32(a).astype(np.float32) for n, a in st.items()} for st in stored]
        g32 = [prec.to_float32(x) for x in g]
        if rule == "muon":
            fo.functional.muon(work, g32, [w["momentum_buffer"] for w in wide], step=t,
                               lr=LR[rule], backend="numpy", **hp)
        else:
            fo.functional.adafactor(work, g32, [w.get("row_var") for w in wide],
                                    [w.get("col_var") for w in wide],
                                    [w.get("variance") for w in wide], step=t, lr=LR[rule],
                                    backend="numpy", **hp)
        for st, w in zip(stored, wide):
            for n in st:
                st[n] = prec.round_to(w[n], sdt)
        write_params(params, masters, work, dtype, opts, t)
    return params, stored, masters


@pytest.mark.parametrize("dtype,opts", CONFIGS, ids=IDS)
@pytest.mark.parametrize("rule", ["muon", "adafactor"])
def test_reference_is_the_widened_float32_step(rule, dtype, opts):
    params, opt = _run(rule, dtype, opts, "numpy")
    want_p, want_st, want_m = _oracle(rule, dtype, opts)
    for p, w in zip(params, want_p):
        assert p.dtype == dtype
        np.testing.assert_array_equal(_bits(p), _bits(w))
    for i, n, a in _states(rule, opt):
        want = want_m[i] if n == "master" else want_st[i][n]
        assert a.dtype == want.dtype, (i, n)
        np.testing.assert_array_equal(_bits(a), _bits(want), err_msg=f"{i} {n}")
    if opts.get("master_weights"):  # the param is the RNE of its master after every step
        for p, st in zip(params, opt.state[0]):
            np.testing.assert_array_equal(_bits(p), _bits(prec.round_to(st["master"], dtype)))


@pytest.mark.parametrize("dtype,opts", CONFIGS, ids=IDS)
@pytest.mark.parametrize("rule", ["muon", "adafactor"])
def test_numba_matches_the_reference(rule, dtype, opts):
    """Muon: bit for bit (both backends run the same NumPy products; the fused momentum and
    apply passes round as the reference does).  Adafactor: within TOL of the param dtype (its
    float32 kernels sum rows, columns and RMS in float64 in other orders, so a float32 value
    can differ in its last bit and land on the other side of a 16-bit rounding)."""
    if not fo.backends()["numba"]["available"]:
        pytest.skip("numba is not available")
    ref_p, ref = _run(rule, dtype, opts, "numpy")
    got_p, got = _run(rule, dtype, opts, "numba")
    assert got.backend == "numba"
    pairs = list(zip(ref_p, got_p)) + [(a, b) for (_, _, a), (_, _, b) in
                                        zip(_states(rule, ref), _states(rule, got))]
    for a, b in pairs:
        assert a.dtype == b.dtype
        if rule == "muon":
            np.testing.assert_array_equal(_bits(a), _bits(b))
        else:
            np.testing.assert_allclose(a.astype(np.float64), b.astype(np.float64),
                                       **TOL[a.dtype if a.dtype.itemsize == 2 else dtype])


@pytest.mark.parametrize("rule", ["muon", "adafactor"])
def test_stochastic_rounding_is_reproducible_and_seeded(rule):
    opts = {"stochastic_rounding": True, "seed": 5}
    a, _ = _run(rule, BF16, opts, "numpy")
    b, _ = _run(rule, BF16, opts, "numpy")
    c, _ = _run(rule, BF16, dict(opts, seed=6), "numpy")
    for x, y in zip(a, b):
        np.testing.assert_array_equal(_bits(x), _bits(y))
    assert any((_bits(x) != _bits(z)).any() for x, z in zip(a, c))


@pytest.mark.parametrize("rule", ["muon", "adafactor"])
def test_bad_input_writes_nothing(rule):
    cls = CLASSES[rule]
    p16 = [np.ones((3, 4), BF16)]
    if rule == "adafactor":  # Muon takes q8 (its momentum is elementwise): tests below
        with pytest.raises(ValueError, match=r"state_dtype: expected None, 'param', 'float32' "
                                             r"or 'bfloat16' for Adafactor"):
            cls(p16, state_dtype="q8", min_8bit_size=0)
    with pytest.raises(ValueError, match=r"master_weights: expected False for params\[0\] of "
                                         r"dtype float32"):
        cls([np.ones((3, 4), np.float32)], master_weights=True)
    with pytest.raises(ValueError, match=r"stochastic_rounding: expected False for params\[0\] "
                                         r"of dtype float16"):
        cls([np.ones((3, 4), F16)], stochastic_rounding=True)
    with pytest.raises(ValueError, match=r"state_dtype: expected None or 'param' for "
                                         r"(Muon|Adafactor) with float32 params"):
        cls([np.ones((3, 4), np.float32)], state_dtype="bfloat16")
    opt = cls(p16, lr=0.1)
    with pytest.raises(FloatingPointError, match="non-finite gradient"):
        opt.step([np.full((3, 4), np.inf, BF16)])
    assert (p16[0] == 1).all() and all(not a.any() for _, _, a in _states(rule, opt)
                                       if a is not opt.state[0][0].get("master"))


def test_a_backend_without_device_conversions_refuses_before_writing():
    """The driver converts through ``Ops.widening`` (CuPy: kernels of widen.cu/q8.cu, tested in
    tests/test_cuda_widen.py); a backend whose arrays are not NumPy's and that has none refuses
    a widened bucket before any read or write, naming itself and the precision."""
    from types import SimpleNamespace

    from fastopt import _widen
    from fastopt._rules import RULES

    pr = prec.resolve_precision(BF16, kind="orthogonalize")
    ops = SimpleNamespace(name="fake", xp=SimpleNamespace(), widening=None)
    with pytest.raises(TypeError, match="backend 'fake': muon takes float32/float64 params.*"
                                        "bfloat16 params, state float32"):
        _widen.check_backend(RULES["muon"], ops, [None, pr])
    _widen.check_backend(RULES["muon"], ops, [None])  # a plain bucket is fine
    _widen.check_backend(RULES["adam"], ops, [pr])  # an elementwise rule has its own kernels
    _widen.check_backend(RULES["muon"], SimpleNamespace(name="numpy", xp=np, widening=None), [pr])
    ops.widening = _widen.HOST
    _widen.check_backend(RULES["muon"], ops, [pr])


def _torch_bf16(torch, a):
    return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16).clone()


def _numpy_bf16(t):
    return t.detach().view(__import__("torch").int16).numpy().view(BF16)


@pytest.mark.parametrize("rule", ["muon", "adafactor"])
def test_close_to_torch_bf16(rule):
    """torch.optim.Muon/Adafactor on bf16 params (all their arithmetic in bfloat16) against
    ours with state_dtype="param" (bf16 state, float32 arithmetic): TOL["<rule>-torch-bf16"]."""
    torch = pytest.importorskip("torch")
    steps = 5
    params, grads = _problem(rule, BF16, steps, seed=2)
    tps = [_torch_bf16(torch, p).requires_grad_() for p in params]
    topt = {"muon": torch.optim.Muon, "adafactor": torch.optim.Adafactor}[rule](tps, lr=LR[rule])
    opt = CLASSES[rule](params, lr=LR[rule], state_dtype="param", backend="numpy")
    for g in grads:
        for tp, x in zip(tps, g):
            tp.grad = _torch_bf16(torch, x)
        topt.step()
        opt.step(g)
    tol = TOL[f"{rule}-torch-bf16"]
    for p0, p, tp in zip(_problem(rule, BF16, steps, seed=2)[0], params, tps):
        assert np.abs(p.astype(np.float64) - p0.astype(np.float64)).max() > tol["atol"]
        np.testing.assert_allclose(p.astype(np.float64), _numpy_bf16(tp).astype(np.float64),
                                   **tol)


@pytest.mark.parametrize("rule", ["muon", "adafactor"])
def test_torch_adapter_matches_the_raw_api(rule):
    torch = pytest.importorskip("torch")
    import fastopt.torch as ft

    params, grads = _problem(rule, BF16, steps=5, seed=4)
    tps = [_torch_bf16(torch, p).requires_grad_() for p in params]
    cls = {"muon": ft.Muon, "adafactor": ft.Adafactor}[rule]
    topt = cls(tps, lr=LR[rule], backend="numpy")
    opt = CLASSES[rule](params, lr=LR[rule], backend="numpy")
    for g in grads:
        for tp, x in zip(tps, g):
            tp.grad = _torch_bf16(torch, x)
        topt.step()
        opt.step(g)
    for p, tp in zip(params, tps):
        assert tp.dtype == torch.bfloat16
        np.testing.assert_array_equal(_bits(p), _bits(_numpy_bf16(tp)))


@pytest.mark.parametrize("rule", ["muon", "adafactor"])
def test_state_dict_resumes_bit_for_bit(rule):
    """bf16 state and a master survive state_dict/load_state_dict: the next step is the same."""
    opts = {"state_dtype": "bfloat16", "master_weights": True}
    params, grads = _problem(rule, BF16, steps=2, seed=7)
    opt = CLASSES[rule](params, lr=LR[rule], backend="numpy", **opts)
    opt.step(grads[0])
    copies = [p.copy() for p in params]
    again = CLASSES[rule](copies, lr=LR[rule], backend="numpy", **opts)
    again.load_state_dict(opt.state_dict())
    opt.step(grads[1])
    again.step(grads[1])
    for a, b in zip(params + [a for _, _, a in _states(rule, opt)],
                    copies + [a for _, _, a in _states(rule, again)]):
        np.testing.assert_array_equal(_bits(a), _bits(b))


# ------------------------------------------------------------------ Muon with 8-bit momentum

#: a q8 matrix (6144 elements, above min_8bit_size) and a small one that keeps float32 state
Q8_SHAPES = [(64, 96), (5, 7)]
Q8_CONFIGS = [(np.dtype(np.float32), {}), (BF16, {"stochastic_rounding": True, "seed": 3}),
              (F16, {"master_weights": True, "weight_decay": 0.1, "max_norm": 20.0})]
Q8_IDS = ["f32", "bf16-sr", "f16-master-decay-maxnorm"]


def _q8_problem(dtype, steps, seed=1):
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s).astype(dtype) for s in Q8_SHAPES]
    grads = [[rng.standard_normal(s).astype(dtype) for s in Q8_SHAPES] for _ in range(steps)]
    return params, grads


def _q8_run(dtype, opts, backend, steps=3):
    params, grads = _q8_problem(dtype, steps)
    opt = fo.Muon(params, lr=LR["muon"], state_dtype="q8", backend=backend, **opts)
    for g in grads:
        opt.step(g)
    return params, opt


def _q8_oracle(dtype, opts, steps=3):
    """decode -> the float32 Muon step (functional, plain) -> quantize; the param rounded once
    (the small matrix keeps a float32 buffer, min_8bit_size)."""
    params, grads = _q8_problem(dtype, steps)
    hp = {k: v for k, v in opts.items() if k not in PRECISION_KEYS}
    masters = [prec.to_float32(p) for p in params] if opts.get("master_weights") else None
    codes, absmax = fo.quantization.quantize_blockwise(np.zeros(Q8_SHAPES[0], np.float32),
                                                       signed=True)
    small = np.zeros(Q8_SHAPES[1], np.float32)
    for t, g in enumerate(grads, 1):
        work = [m.copy() for m in masters] if masters else [prec.to_float32(p) for p in params]
        buf = fo.quantization.dequantize_blockwise(codes, absmax, signed=True)
        fo.functional.muon(work, [prec.to_float32(x) for x in g], [buf, small], step=t,
                           lr=LR["muon"], backend="numpy", **hp)
        codes, absmax = fo.quantization.quantize_blockwise(buf, signed=True)
        write_params(params, masters, work, dtype, opts, t)
    return params, codes, absmax, small


@pytest.mark.parametrize("dtype,opts", Q8_CONFIGS, ids=Q8_IDS)
def test_muon_q8_is_decode_step_quantize(dtype, opts):
    params, opt = _q8_run(dtype, opts, "numpy")
    want_p, codes, absmax, small = _q8_oracle(dtype, opts)
    st = opt.state[0]
    assert st[0]["momentum_buffer"].dtype == np.uint8 and "momentum_buffer_absmax" not in st[1]
    np.testing.assert_array_equal(st[0]["momentum_buffer"], codes)
    np.testing.assert_array_equal(st[0]["momentum_buffer_absmax"].view(np.uint32),
                                  absmax.view(np.uint32))
    np.testing.assert_array_equal(st[1]["momentum_buffer"].view(np.uint32), small.view(np.uint32))
    for p, w in zip(params, want_p):
        assert p.dtype == dtype
        np.testing.assert_array_equal(_bits(p), _bits(w))


@pytest.mark.parametrize("dtype,opts", Q8_CONFIGS, ids=Q8_IDS)
def test_muon_q8_numba_matches_the_reference_bit_for_bit(dtype, opts):
    if not fo.backends()["numba"]["available"]:
        pytest.skip("numba is not available")
    ref_p, ref = _q8_run(dtype, opts, "numpy")
    got_p, got = _q8_run(dtype, opts, "numba")
    assert got.backend == "numba"
    for a, b in zip(ref_p, got_p):
        np.testing.assert_array_equal(_bits(a), _bits(b))
    for sa, sb in zip(ref.state[0], got.state[0]):
        assert sorted(sa) == sorted(sb)
        for n in sa:
            np.testing.assert_array_equal(sa[n].view(np.uint8), sb[n].view(np.uint8), err_msg=n)


def test_muon_q8_trajectory_stays_near_the_float32_one():
    """test_q8_state's criterion on its least-squares problem (one 72 x 64 matrix, 200
    minibatch steps): ||p_q8 - p_32|| / ||p_32 - p_0|| < 0.05."""
    from test_q8_state import _run as q8_run

    opts = dict(lr=0.02, weight_decay=0.0)
    x0, x32, _ = q8_run("Muon", opts, 200)
    _, x8, opt = q8_run("Muon", opts, 200, state_dtype="q8")
    assert opt.state[0][0]["momentum_buffer"].dtype == np.uint8
    moved = np.linalg.norm((x32 - x0).astype(np.float64))
    assert moved > 1.0
    ratio = np.linalg.norm((x8 - x32).astype(np.float64)) / moved
    assert ratio < 0.05, ratio


def test_muon_q8_state_dict_round_trip_and_nbytes():
    params, grads = _q8_problem(BF16, steps=2, seed=8)
    opt = fo.Muon(params, lr=LR["muon"], state_dtype="q8", backend="numpy")
    opt.step(grads[0])
    sd = opt.state_dict()
    assert sd["state"][0]["momentum_buffer"].dtype == np.uint8 and "q8" in sd
    copies = [p.copy() for p in params]
    again = fo.Muon(copies, lr=LR["muon"], state_dtype="q8", backend="numpy")
    again.load_state_dict(sd)
    opt.step(grads[1])
    again.step(grads[1])
    for a, b in zip(params, copies):
        np.testing.assert_array_equal(_bits(a), _bits(b))
    for sa, sb in zip(opt.state[0], again.state[0]):
        for n in sa:
            np.testing.assert_array_equal(sa[n].view(np.uint8), sb[n].view(np.uint8), err_msg=n)
    n_big, n_small = 64 * 96, 5 * 7
    assert opt.state_nbytes() == fo.quantization.q8_nbytes(n_big) + 4 * n_small
    assert fo.quantization.q8_nbytes(n_big) == n_big + 4 * (n_big // 256)


def test_muon_q8_refusals():
    with pytest.raises(ValueError, match=r"state_dtype.*float64.*'q8'"):
        fo.Muon([np.zeros((300, 40))], state_dtype="q8")
    with pytest.raises(ValueError, match=r"state_dtype: expected None or 'param' for Adafactor "
                                         r"with float32 params"):
        fo.Adafactor([np.zeros((300, 40), np.float32)], state_dtype="q8", min_8bit_size=0)
