"""Property tests (hypothesis): random shapes, dtypes, hyperparameters and gradient scales.

* the compiled CPU backend matches the NumPy reference within ``_cases.TOL``;
* ``lr = 0`` leaves the params unchanged (state may change);
* after ``clip_global_norm=c`` the applied gradient has norm <= c (SGD with lr=1 and no
  momentum from zero params: the param change *is* the applied gradient);
* ``weight_clip=c`` keeps every |p| <= c after every step.

The gradients are drawn from a seeded generator (hypothesis picks the seed and the
scale), not element by element: near-ties such as Lion's ``sign(0)`` are a matter of
rounding order, not of correctness, and hypothesis would otherwise go looking for them.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastopt._backend import available
from fastopt._optim import OPTIMIZERS
from fastopt._rules import RULES

from _cases import TOL, cap_shape, extra_input, rule_options, step

CPU_BACKENDS = [b for b in ("numpy", "numba") if available(b)]
COMPILED = [b for b in CPU_BACKENDS if b != "numpy"]
SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

shapes = st.lists(st.one_of(st.tuples(st.integers(0, 300)),
                            st.tuples(st.integers(1, 9), st.integers(1, 9)),
                            st.just(())), min_size=1, max_size=3)
dtypes = st.sampled_from([np.float32, np.float64])
opt_float = lambda lo, hi: st.one_of(st.none(), st.floats(lo, hi))  # noqa: E731


def make(rule, shape_list, dtype, seed, steps, grad_scale=None):
    rng = np.random.default_rng(seed)
    shape_list = [cap_shape(rule, s) for s in shape_list]  # an n x n extra input caps n
    if RULES[rule].param_ndim == 2:  # Muon: every drawn shape as a matrix, a vector as a column
        shape_list = [s if len(s) == 2 else (int(np.prod(s)), 1) for s in shape_list]
    params = [rng.standard_normal(s).astype(dtype) for s in shape_list]
    feed = []
    for _ in range(steps):
        g = [rng.standard_normal(p.shape) for p in params]
        if grad_scale is not None:  # the loss was scaled: so were the grads
            g = [x * grad_scale for x in g]
        g = [np.asarray(x, dtype=dtype) for x in g]  # (x * s of a 0-d array is a scalar)
        e = [extra_input(rule, p, rng) for p in params]
        if grad_scale is not None and e[0] is not None:
            e = [np.asarray(x * grad_scale, dtype=dtype) for x in e]
        feed.append((g, None if e[0] is None else e))
    return params, feed


def run(rule, options, params, feed, backend, grad_scale=None, after_step=None):
    ps = [p.copy() for p in params]
    opt = OPTIMIZERS[rule](ps, backend=backend, **options)
    for g, e in feed:
        step(opt, g, e, grad_scale=grad_scale)
        if after_step is not None:
            after_step(ps)
    return ps, opt.state_dict()["state"]


@st.composite
def problems(draw, pipeline=True, lr=None):
    rule = draw(st.sampled_from(sorted(RULES)))
    return (rule, draw(rule_options(rule, lr=lr, pipeline=pipeline)), draw(shapes), draw(dtypes),
            draw(st.integers(0, 2**32 - 1)),
            draw(st.one_of(st.none(), st.sampled_from([2.0 ** k for k in (-3, 1, 8, 16)]))))


@pytest.mark.skipif(not COMPILED, reason="no compiled CPU backend (numba) is installed")
@pytest.mark.parametrize("backend", COMPILED)
@settings(max_examples=40, **SETTINGS)
@given(problem=problems())
def test_compiled_matches_reference(backend, problem):
    rule, options, shape_list, dtype, seed, scale = problem
    params, feed = make(rule, shape_list, dtype, seed, 3, scale)
    want_p, want_s = run(rule, options, params, feed, "numpy", scale)
    got_p, got_s = run(rule, options, params, feed, backend, scale)
    tol = TOL[np.dtype(dtype)]
    for i, (w, g) in enumerate(zip(want_p, got_p)):
        np.testing.assert_allclose(g, w, err_msg=f"params[{i}] {rule} {options}", **tol)
    for i, st_ in want_s.items():
        for name, w in st_.items():
            np.testing.assert_allclose(got_s[i][name], w, err_msg=f"state[{i}][{name}] {rule} {options}",
                                       **tol)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@settings(max_examples=25, **SETTINGS)
@given(problem=problems(lr=0.0))
def test_zero_lr_leaves_params(backend, problem):
    """lr = 0: no change to any param (weight constraints off: they act on the params directly)."""
    rule, options, shape_list, dtype, seed, scale = problem
    options.update(weight_clip=None, max_norm=None)
    if "step_sizes" in options:  # Rprop: lr is only the first step size; the clamp's floor
        options["step_sizes"] = (0.0, options["step_sizes"][1])  # must be 0 for it to stay 0
    params, feed = make(rule, shape_list, dtype, seed, 2, scale)
    got, _ = run(rule, options, params, feed, backend, scale)
    for i, (p, q) in enumerate(zip(params, got)):
        assert np.array_equal(p, q), f"params[{i}] moved with lr=0: {rule} {options}"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@settings(max_examples=30, **SETTINGS)
@given(shape_list=shapes, dtype=dtypes, seed=st.integers(0, 2**32 - 1),
       c=st.floats(1e-3, 1e3), magnitude=st.sampled_from([1e-4, 1e-2, 1.0, 1e2, 1e4]),
       maximize=st.booleans(), clip_value=opt_float(0.1, 3.0),
       grad_scale=st.one_of(st.none(), st.sampled_from([0.5, 2.0, 1024.0])))
def test_global_norm_clip_bounds_the_applied_gradient(backend, shape_list, dtype, seed, c, magnitude,
                                                      maximize, clip_value, grad_scale):
    rng = np.random.default_rng(seed)
    params = [np.zeros(s, dtype) for s in shape_list]
    grads = [np.asarray(rng.standard_normal(s) * magnitude, dtype=dtype) for s in shape_list]
    opt = OPTIMIZERS["sgd"](params, lr=1.0, clip_global_norm=c, maximize=maximize,
                            clip_value=clip_value, backend=backend)
    info = opt.step(grads, grad_scale=grad_scale)
    applied = [-p.astype(np.float64) for p in params]  # 0 - lr*g is exact: p is -g
    norm = np.sqrt(sum(float(np.dot(a.ravel(), a.ravel())) for a in applied))
    eps = float(np.finfo(dtype).eps)
    assert norm <= c * (1 + 4 * eps), (norm, c)
    # the reported norm is the one before clipping, of the gradient after unscale/maximize/clip_value
    pre = [g.astype(np.float64) / (grad_scale or 1.0) for g in grads]
    if clip_value is not None:
        pre = [np.clip(x, -clip_value, clip_value) for x in pre]
    want = np.sqrt(sum(float(np.dot(x.ravel(), x.ravel())) for x in pre))
    assert info.grad_norm == pytest.approx(want, rel=10 * eps, abs=1e-300)
    if want < c:  # below the threshold the gradient passes untouched
        np.testing.assert_allclose(norm, want, rtol=10 * eps)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@settings(max_examples=25, **SETTINGS)
@given(problem=problems(), c=st.floats(0.05, 2.0), lr=st.floats(1e-3, 1.0))
def test_weight_clip_bounds_every_param(backend, problem, c, lr):
    rule, options, shape_list, dtype, seed, scale = problem
    options.update(weight_clip=c, lr=lr)
    params, feed = make(rule, shape_list, dtype, seed, 3, scale)
    bound = np.dtype(dtype).type(c)  # the clip is applied in the param's precision

    def check(ps):
        for i, p in enumerate(ps):
            assert (np.abs(p) <= bound).all(), f"params[{i}] outside [-{c}, {c}]: {rule} {options}"

    run(rule, options, params, feed, backend, scale, after_step=check)
