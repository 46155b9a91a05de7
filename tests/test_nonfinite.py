"""Pipeline step 2 (docs/design.md): a non-finite gradient never reaches a parameter silently.

``nonfinite="raise"`` raises FloatingPointError and writes nothing;
``"skip"`` drops the whole step atomically (params, state, step count, group
state untouched, ``info.skipped``), and the next good step continues exactly
as if the bad one had never been offered.  Checked for every case of the rule
table, for inf and nan, in the last element of the last tensor (the tail a
chunked reduction might miss) and in the first, with several groups, with
``grad_scale`` (unscaling that overflows), with ``clip_value`` and the norm
clips (which must not hide an inf: the check comes first), and for
AdaHessian's ``hessian_diags`` and Newton's ``hessians``.
"""

import copy

import numpy as np
import pytest

import fastopt as fo
from fastopt import functional as F
from fastopt._backend import available
from fastopt._optim import OPTIMIZERS

from _cases import CASE_IDS, CASES, EXTRA_RULES, cap_sizes, extra_input, param_shape

CPU_BACKENDS = [b for b in ("numpy", "numba") if available(b)]
SIZES = (5, 1, 3001)  # the last tensor is long enough to be split into parts by a parallel kernel


def problem(rule, dtype=np.float64, sizes=SIZES, seed=0):
    rng = np.random.default_rng(seed)
    sizes = [param_shape(rule, s) for s in cap_sizes(rule, sizes)]  # Muon: matrices
    params = [rng.standard_normal(s).astype(dtype) for s in sizes]
    return params, rng


def grads_for(params, rng):
    return [rng.standard_normal(p.shape).astype(p.dtype) for p in params]


def extras(rule, params, rng):
    e = [extra_input(rule, p, rng) for p in params]
    return None if e[0] is None else e


def step(opt, g, e=None, **kw):
    return opt.step(g, e, **kw) if opt.rule.extra else opt.step(g, **kw)


def snapshot(opt, params):
    return ([p.tobytes() for p in params],
            [[{k: a.tobytes() for k, a in st.items()} for st in gst] for gst in opt.state],
            opt.step_count, copy.deepcopy(opt.group_state))


def poison(arrays, value, where="last"):
    """A copy of ``arrays`` with one element set to ``value`` (last element of the last tensor)."""
    out = [a.copy() for a in arrays]
    i = len(out) - 1 if where == "last" else 0
    flat = out[i].reshape(-1)
    flat[-1 if where == "last" else 0] = value
    return out


def _twins(rule, options, backend, nonfinite):
    """Two optimizers on equal params, after two good steps each; the second never sees the bad step."""
    params, rng = problem(rule)
    ps_a, ps_b = [p.copy() for p in params], [p.copy() for p in params]
    a = OPTIMIZERS[rule](ps_a, backend=backend, nonfinite=nonfinite, **options)
    b = OPTIMIZERS[rule](ps_b, backend=backend, nonfinite=nonfinite, **options)
    for _ in range(2):
        g, e = grads_for(params, rng), extras(rule, params, rng)
        step(a, g, e)
        step(b, g, e)
    return a, ps_a, b, ps_b, rng, params


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("mode", ["raise", "skip"])
@pytest.mark.parametrize("rule,options", [(c[0], c[1]) for c in CASES], ids=CASE_IDS)
def test_nonfinite_grad_writes_nothing(rule, options, mode, value, backend):
    a, ps_a, b, ps_b, rng, params = _twins(rule, options, backend, mode)
    g, e = grads_for(params, rng), extras(rule, params, rng)
    before = snapshot(a, ps_a)
    bad = poison(g, value)
    if mode == "raise":
        with pytest.raises(FloatingPointError, match="non-finite gradient"):
            step(a, bad, e)
    else:
        info = step(a, bad, e)
        assert info.skipped
    assert snapshot(a, ps_a) == before
    # the next good step continues exactly as if the bad one had never been offered
    info = step(a, g, e)
    assert not info.skipped
    step(b, g, e)
    assert snapshot(a, ps_a) == snapshot(b, ps_b)
    assert all(np.isfinite(p).all() for p in ps_a)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("mode", ["raise", "skip"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("where", ["first", "last"])
def test_nonfinite_in_any_group_skips_all_groups(where, dtype, mode, backend):
    """Atomic across groups: a nan in one group stops the update of every group."""
    params, rng = problem("adam", dtype)
    groups = [{"params": params[:1], "lr": 0.1}, {"params": params[1:], "clip_global_norm": 1.0,
                                                  "amsgrad": True}]
    opt = fo.Adam(groups, backend=backend, nonfinite=mode)
    opt.step(grads_for(params, rng))
    before = snapshot(opt, params)
    bad = poison(grads_for(params, rng), np.nan, where)
    if mode == "raise":
        with pytest.raises(FloatingPointError):
            opt.step(bad)
    else:
        assert opt.step(bad).skipped
    assert snapshot(opt, params) == before


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mode", ["raise", "skip"])
def test_unscaling_that_overflows_is_caught(mode, dtype, backend):
    """Finite grads whose unscaled value ``g / grad_scale`` overflows the param dtype."""
    params, rng = problem("sgd", dtype)
    opt = fo.SGD(params, lr=0.1, momentum=0.9, backend=backend, nonfinite=mode)
    opt.step(grads_for(params, rng))
    before = snapshot(opt, params)
    big = np.finfo(dtype).max / 4
    g = poison(grads_for(params, rng), big)
    assert all(np.isfinite(x).all() for x in g)
    if mode == "raise":
        with pytest.raises(FloatingPointError):
            opt.step(g, grad_scale=1e-3)
    else:
        assert opt.step(g, grad_scale=1e-3).skipped
    assert snapshot(opt, params) == before
    # the same grads with a scale that keeps them finite are a normal step
    assert not opt.step(g, grad_scale=1e3).skipped
    assert all(np.isfinite(p).all() for p in params)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("value", [np.inf, np.nan])
@pytest.mark.parametrize("options", [
    {"clip_value": 0.5}, {"clip_norm": 0.5}, {"clip_global_norm": 0.5},
    {"clip_value": 0.5, "clip_global_norm": 0.5, "maximize": True, "weight_clip": 1.0},
], ids=["clip_value", "clip_norm", "clip_global_norm", "all"])
def test_clipping_does_not_hide_nonfinite(options, value, backend):
    """clip(inf) would be finite: the check must run on the unclipped gradient (pipeline step 2 before step 4)."""
    params, rng = problem("sgd")
    opt = fo.SGD(params, lr=0.1, backend=backend, nonfinite="skip", **options)
    before = snapshot(opt, params)
    info = opt.step(poison(grads_for(params, rng), value), grad_scale=2.0)
    assert info.skipped
    assert snapshot(opt, params) == before


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("mode", ["raise", "skip"])
@pytest.mark.parametrize("rule", EXTRA_RULES)
@pytest.mark.parametrize("value", [np.inf, np.nan])
def test_nonfinite_extra_input(rule, value, mode, backend):
    """AdaHessian's hessian_diags and Newton's hessians are checked like grads (finite grads)."""
    a, ps_a, _, _, rng, params = _twins(rule, {"lr": 0.1}, backend, mode)
    g, e = grads_for(params, rng), extras(rule, params, rng)
    before = snapshot(a, ps_a)
    bad = poison(e, value)
    if mode == "raise":
        with pytest.raises(FloatingPointError):
            a.step(g, bad)
    else:
        assert a.step(g, bad).skipped
    assert snapshot(a, ps_a) == before
    # and scaled: a finite Hessian that overflows once unscaled
    big = poison(e, np.finfo(np.float64).max / 4)
    if mode == "raise":
        with pytest.raises(FloatingPointError):
            a.step(g, big, grad_scale=1e-3)
    else:
        assert a.step(g, big, grad_scale=1e-3).skipped
    assert snapshot(a, ps_a) == before


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ignore_does_not_check(backend):
    """``"ignore"`` is the explicit opt-out: the nan is the caller's (documented) choice."""
    params, rng = problem("sgd")
    opt = fo.SGD(params, lr=0.1, backend=backend, nonfinite="ignore")
    info = opt.step(poison(grads_for(params, rng), np.nan))
    assert not info.skipped and opt.step_count == 1
    assert np.isnan(params[-1].reshape(-1)[-1])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("mode", ["raise", "skip"])
def test_functional_nonfinite(mode, backend):
    params, rng = problem("adam")
    m = [np.full_like(p, 0.1) for p in params]
    v = [np.full_like(p, 0.2) for p in params]
    written = params + m + v
    before = [a.tobytes() for a in written]
    bad = poison(grads_for(params, rng), np.inf)
    if mode == "raise":
        with pytest.raises(FloatingPointError):
            F.adam(params, bad, m, v, step=3, lr=0.1, nonfinite=mode, backend=backend)
    else:
        info = F.adam(params, bad, m, v, step=3, lr=0.1, nonfinite=mode, backend=backend)
        assert info.skipped
    assert [a.tobytes() for a in written] == before


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nadam_skip_keeps_group_state(backend):
    """NAdam's mu_product (group state) must not advance on a skipped step."""
    a, ps_a, b, ps_b, rng, params = _twins("nadam", {"lr": 0.01}, backend, "skip")
    mu = copy.deepcopy(a.group_state)
    assert a.step(poison(grads_for(params, rng), np.nan)).skipped
    assert a.group_state == mu
