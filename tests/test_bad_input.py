"""Every class of bad input (docs/design.md, "Bad input"), on every CPU backend.

Each case checks three things: the exception type, a message that names the
argument and index, what was expected and what came, and that params, state,
step count, group state and hyperparameters are byte-for-byte as they were —
with the bad tensor first and last in its list (a check that ran tensor by
tensor while writing would pass the first and fail the second).
"""

import copy
import re

import numpy as np
import pytest

import fastopt as fo
from fastopt import functional as F
from fastopt._backend import available
from fastopt._optim import OPTIMIZERS
from fastopt._rules import PIPELINE_DEFAULTS, RULES, state_arg

CPU_BACKENDS = [b for b in ("numpy", "numba") if available(b)]

# 4 tensors, two dtypes (two buckets), a 2-D one; params[3] has params[0]'s shape and dtype
SHAPES = [((3,), np.float64), ((5,), np.float32), ((2, 3), np.float64), ((3,), np.float64)]
LAST = len(SHAPES) - 1


class CupyLike:
    """A stand-in for a ``cupy.ndarray`` (no GPU here): fastopt tells array kinds apart by
    the type's module (``fastopt._backend.array_kind``), so this exercises the real
    NumPy/CuPy-mix check.  A real CuPy mix is only possible on a GPU machine."""

    __module__ = "cupy._core.core"

    def __init__(self, a):
        self.shape, self.dtype, self.size = a.shape, a.dtype, a.size
        self.flags = a.flags
        self.base = None


def make_params(seed=0, rule=None):
    """SHAPES' params; for a rule of 2-D params only (Muon) the 1-D ones as columns."""
    rng = np.random.default_rng(seed)
    ps = [rng.standard_normal(s).astype(dt) for s, dt in SHAPES]
    if rule is not None and RULES[rule].param_ndim == 2:
        ps = [p.reshape(p.size, 1) if p.ndim == 1 else p for p in ps]
    return ps


def make_grads(params, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(p.shape).astype(p.dtype) for p in params]


def extras_for(rule, params, seed=2):
    rng = np.random.default_rng(seed)
    r = RULES[rule]
    if r.extra is None:
        return None
    if r.extra_shape == "square":  # a dense Hessian: 2 I is positive definite
        return [np.eye(p.size, dtype=p.dtype) * 2 for p in params]
    return [rng.standard_normal(p.shape).astype(p.dtype) for p in params]


def do_step(opt, grads, extras=None, **kw):
    if opt.rule.extra is not None:
        return opt.step(grads, extras, **kw)
    return opt.step(grads, **kw)


def snapshot(opt, params):
    """Everything a failed call must leave alone, as bytes and plain values."""
    return (
        [(p.dtype, p.shape, p.tobytes()) for p in params],
        [[{k: (a.dtype, a.shape, a.tobytes()) for k, a in st.items()} for st in gst]
         for gst in opt.state],
        opt.step_count,
        copy.deepcopy(opt.group_state),
        [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
    )


def stepped(rule="adam", backend="numpy", groups=False, **opts):
    """An optimizer over SHAPES that has taken one good step (so its state is not all zeros)."""
    params = make_params(rule=rule)
    arg = params
    if groups:
        arg = [{"params": params[:2]}, {"params": params[2:], "lr": 0.05}]
    opt = OPTIMIZERS[rule](arg, backend=backend, **opts)
    do_step(opt, make_grads(params), extras_for(rule, params))
    return opt, params


def raises_unchanged(opt, params, exc, pattern, fn):
    before = snapshot(opt, params)
    with pytest.raises(exc) as info:
        fn()
    assert re.search(pattern, str(info.value)), f"message {str(info.value)!r} !~ {pattern!r}"
    assert snapshot(opt, params) == before, "a failed call changed params or state"
    return info.value


# ------------------------------------------------------------------ grads of a step

def _bad_grad(kind, i, params):
    """(grads with the i-th replaced, exception, message pattern)."""
    g = make_grads(params)
    p = params[i]
    other = "float32" if p.dtype == np.float64 else "float64"
    if kind == "list":
        g[i] = p.tolist()
        return g, TypeError, rf"grads\[{i}\]: expected a numpy or cupy array, got list"
    if kind == "none":
        g[i] = None
        return g, TypeError, rf"grads\[{i}\]: expected a numpy or cupy array, got NoneType"
    if kind == "int":
        g[i] = np.ones(p.shape, dtype=np.int64)
        return g, TypeError, rf"grads\[{i}\]: expected dtype float16, bfloat16, float32 or float64, got int64"
    if kind == "float16":
        # a float16 grad is a float16 param's (or float32 for any param): not a wider param's
        g[i] = np.ones(p.shape, dtype=np.float16)
        return g, ValueError, (rf"grads\[{i}\]: expected dtype {p.dtype}( or float32)? "
                               rf"\(its param is {p.dtype}\), got float16")
    if kind == "complex":
        g[i] = np.ones(p.shape, dtype=np.complex128)
        return g, TypeError, rf"grads\[{i}\]: expected dtype float16, bfloat16, float32 or float64, got complex128"
    if kind == "cupy-mix":
        g[i] = CupyLike(g[i])
        return g, TypeError, rf"grads\[{i}\]: expected a numpy array like the others, got a cupy array"
    if kind == "dtype":
        # float32 grads are allowed for any param (accumulated grads): a float64 param's
        # odd one out is a bfloat16-free narrower float, float16
        other = "float64" if p.dtype == np.float32 else "float16"
        g[i] = g[i].astype(other)
        return g, ValueError, rf"grads\[{i}\]: expected dtype {p.dtype} .*got {other}"
    if kind == "shape":
        g[i] = np.ones(p.size + 1, dtype=p.dtype)
        return g, ValueError, rf"grads\[{i}\]: expected shape {re.escape(str(p.shape))}, got \({p.size + 1},\)"
    if kind == "transposed-shape":
        g[i] = np.ones(p.shape[::-1] + (1,), dtype=p.dtype)
        return g, ValueError, rf"grads\[{i}\]: expected shape"
    if kind == "is-param":
        g[i] = p
        return g, ValueError, rf"grads\[{i}\]: expected an array separate from its param, got the param"
    if kind == "view-of-param":
        g[i] = p.reshape(p.shape)
        return g, ValueError, rf"grads\[{i}\]: expected an array separate from its param"
    if kind == "is-other-param":  # grads[0] <-> params[3] share shape and dtype
        j = LAST if i == 0 else 0
        g[i] = params[j]
        return g, ValueError, (rf"grads\[{i}\]: expected an array separate from every param.*"
                               rf"got the same array as params\[{j}\]")
    raise AssertionError(kind)


GRAD_KINDS = ["list", "none", "int", "float16", "complex", "cupy-mix", "dtype", "shape",
              "transposed-shape", "is-param", "view-of-param", "is-other-param"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("where", [0, LAST])
@pytest.mark.parametrize("kind", GRAD_KINDS)
def test_bad_grad(kind, where, backend):
    opt, params = stepped("adam", backend, amsgrad=True)
    grads, exc, pattern = _bad_grad(kind, where, params)
    raises_unchanged(opt, params, exc, pattern, lambda: opt.step(grads))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bad_grad_in_last_group(backend):
    opt, params = stepped("sgd", backend, groups=True, momentum=0.9)
    grads = make_grads(params)
    grads[LAST] = grads[LAST].astype(np.float16)  # float32 grads are allowed (accumulated)
    raises_unchanged(opt, params, ValueError, rf"grads\[{LAST}\]: expected dtype float64", lambda: opt.step(grads))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("n", [LAST, LAST + 2, 0])
def test_wrong_number_of_grads(n, backend):
    opt, params = stepped("adam", backend)
    grads = (make_grads(params) + make_grads(params))[:n]
    raises_unchanged(opt, params, ValueError,
                     rf"grads: expected {len(params)} arrays \(one per param\), got {n}",
                     lambda: opt.step(grads))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("grads,pattern", [
    (None, r"grads: expected a list of arrays, got NoneType"),
    (3.0, r"grads: expected a list of arrays, got float"),
    ("grads", r"grads: expected a list of arrays, got str"),
    (np.zeros(3), r"grads: expected a list of arrays, got a single array"),
])
def test_grads_not_a_list(grads, pattern, backend):
    opt, params = stepped("adam", backend)
    raises_unchanged(opt, params, TypeError, pattern, lambda: opt.step(grads))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("rule", [r for r, rule in RULES.items() if rule.extra is not None])
@pytest.mark.parametrize("where", [0, LAST])
def test_bad_extra_input(rule, where, backend):
    opt, params = stepped(rule, backend)
    name = RULES[rule].extra
    grads, extras = make_grads(params), extras_for(rule, params)
    p = params[where]
    want = RULES[rule].extra_shape_of(p.shape, p.size)
    extras[where] = np.ones(p.size + 1, dtype=p.dtype)
    raises_unchanged(opt, params, ValueError,
                     rf"{name}\[{where}\]: expected shape {re.escape(str(want))}, got \({p.size + 1},\)",
                     lambda: opt.step(grads, extras))
    extras = extras_for(rule, params)
    extras[where] = extras[where].astype(np.float16 if p.dtype == np.float64 else np.float64)
    raises_unchanged(opt, params, ValueError, rf"{name}\[{where}\]: expected dtype {p.dtype}",
                     lambda: opt.step(grads, extras))
    extras = extras_for(rule, params)
    extras[where] = p  # an input that is the param it updates
    if RULES[rule].extra_shape == "param":  # only a param-shaped input can alias its param
        raises_unchanged(opt, params, ValueError, rf"{name}\[{where}\]: expected an array separate",
                         lambda: opt.step(grads, extras))
    raises_unchanged(opt, params, TypeError, rf"step\(\) needs {name}", lambda: opt.step(grads, None))


# ------------------------------------------------------------------ params

def _bad_params(kind, i):
    params = make_params()
    p = params[i]
    if kind == "list":
        params[i] = p.tolist()
        return params, TypeError, rf"params\[{i}\]: expected a numpy or cupy array, got list"
    if kind == "int":
        params[i] = np.ones(p.shape, dtype=np.int32)
        return params, TypeError, rf"params\[{i}\]: expected dtype float16, bfloat16, float32 or float64, got int32"
    if kind == "complex":  # float16 and bfloat16 params are taken (tests/test_mixed_precision.py)
        params[i] = p.astype(np.complex64)
        return params, TypeError, (rf"params\[{i}\]: expected dtype float16, bfloat16, float32 or "
                                   rf"float64, got complex64")
    if kind == "bool":
        params[i] = p > 0
        return params, TypeError, rf"params\[{i}\]: expected dtype float16, bfloat16, float32 or float64, got bool"
    if kind == "cupy-mix":
        params[i] = CupyLike(p)
        if i == 0:  # the first array fixes the kind: then the numpy ones are the odd ones out
            return params, TypeError, r"params\[1\]: expected a cupy array like the others, got a numpy array"
        return params, TypeError, rf"params\[{i}\]: expected a numpy array like the others, got a cupy array"
    if kind == "twice":
        j = LAST if i == 0 else 0
        params[i] = params[j]
        return params, ValueError, rf"params\[{max(i, j)}\]: the same array is passed twice \(also as params\[{min(i, j)}\]\)"
    if kind == "overlap":  # two views of one buffer
        j = LAST if i == 0 else 0
        buf = np.zeros(8, dtype=np.float64)
        params[j], params[i] = buf[:3], buf[2:5]
        return params, ValueError, r"params\[\d\]: expected an array of its own, got one that shares memory with params\[\d\]"
    if kind == "non-contiguous":
        params[i] = np.zeros((p.size, 2), dtype=p.dtype)[:, 0].reshape(p.shape) if p.ndim == 1 \
            else np.zeros((p.shape[1], p.shape[0]), dtype=p.dtype).T
        return params, ValueError, rf"params\[{i}\]: expected a C-contiguous array .*got strides"
    if kind == "read-only":
        p.flags.writeable = False
        return params, ValueError, rf"params\[{i}\]: expected a writeable array, got a read-only one"
    raise AssertionError(kind)


PARAM_KINDS = ["list", "int", "complex", "bool", "cupy-mix", "twice", "overlap", "non-contiguous",
               "read-only"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("where", [0, LAST])
@pytest.mark.parametrize("kind", PARAM_KINDS)
def test_bad_params_constructor_and_functional(kind, where, backend):
    params, exc, pattern = _bad_params(kind, where)
    before = [np.array(p, copy=True) if isinstance(p, np.ndarray) else p for p in params]
    with pytest.raises(exc, match=pattern):
        fo.Adam(params, backend=backend)
    with pytest.raises(exc, match=pattern):
        fo.SGD([{"params": params}], backend=backend)  # one group: flat labels
    # the functional API writes params directly, so it must refuse them before writing
    grads = [np.ones(p.shape, dtype=p.dtype) if isinstance(p, np.ndarray) else np.ones(3)
             for p in params]
    with pytest.raises(exc, match=pattern):
        F.sgd(params, grads, step=1, lr=0.1, backend=backend)
    for b, p in zip(before, params):
        if isinstance(p, np.ndarray):
            assert b.tobytes() == p.tobytes()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bad_param_in_second_group_is_named_by_group(backend):
    params = make_params()
    params[LAST] = params[LAST].astype(np.int64)
    with pytest.raises(TypeError, match=r"param_groups\[1\]\['params'\]\[1\]: expected dtype float16, bfloat16, float32 or float64, got int64"):
        fo.Adam([{"params": params[:2]}, {"params": params[2:]}], backend=backend)


@pytest.mark.parametrize("params,exc,pattern", [
    (np.zeros(3), TypeError, r"params: expected a list of arrays or of param-group dicts, got a single array"),
    ([], ValueError, r"params: expected a non-empty list of arrays, got an empty list"),
    (None, TypeError, r"params: expected a list of arrays, got NoneType"),
    ([{"params": [np.zeros(3)]}, np.zeros(3)], TypeError, r"params: expected either arrays or param-group dicts"),
    ([{"lr": 0.1}], ValueError, r"param_groups\[0\]: expected a 'params' key"),
    ([{"params": []}], ValueError, r"param_groups\[0\]\['params'\]: expected a non-empty list, got \[\]"),
    ([{"params": [np.zeros(3)], "nonfinite": "skip"}], ValueError, r"param_groups\[0\]: unknown or optimizer-wide option"),
    ([{"params": [np.zeros(3)], "momentun": 0.9}], ValueError, r"param_groups\[0\]: unknown .*'momentun'"),
])
def test_bad_params_structure(params, exc, pattern):
    with pytest.raises(exc, match=pattern):
        fo.SGD(params, backend="numpy")


def test_unknown_keyword_and_backend():
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'momentum'"):
        fo.Adam([np.zeros(3)], momentum=0.9)
    with pytest.raises(ValueError, match=r"backend: expected one of .*'numba'.*got 'torch'"):
        fo.Adam([np.zeros(3)], backend="torch")
    # a backend of the other array kind is the NumPy/CuPy mix at the dispatch level
    with pytest.raises(TypeError, match=r"backend 'cupy' takes cupy arrays, got numpy arrays"):
        fo.Adam([np.zeros(3)], backend="cupy")
    with pytest.raises(TypeError, match=r"backend 'cupy' takes cupy arrays, got numpy arrays"):
        F.sgd([np.zeros(3)], [np.ones(3)], step=1, lr=0.1, backend="cupy")


# ------------------------------------------------------------------ hyperparameters

NAN, INF = float("nan"), float("inf")

#: hyperparameter -> values out of range (each must give a ValueError naming it)
BAD_VALUES = {
    "lr": [-1e-3, NAN, INF, "0.1", None, True],
    "betas": [(1.0, 0.999), (0.9, 1.0), (-0.1, 0.9), (0.9, NAN), (0.9,), 0.9, (0.9, 0.99, 0.9)],
    "eps": [0.0, -1e-8, NAN, INF, None],
    "weight_decay": [-0.1, NAN, INF, "0"],
    "momentum": [-0.5, NAN, None],
    "dampening": [-0.1, 1.5, NAN],
    "nesterov": [1, "yes", None],
    "amsgrad": [1, "no", None],
    "bias_correction": [0, None],
    "lr_decay": [-0.1, NAN],
    "initial_accumulator_value": [-1.0, INF],
    "alpha": [-0.1, 1.1, NAN],
    "centered": [1, None],
    "rho": [-0.1, 1.5, NAN],
    "momentum_decay": [-1.0, NAN],
    "hessian_power": [0.0, 1.5, -1.0, NAN],
    "damping": [-1.0, NAN],
    "maximize": [1, "yes", None],
    "clip_value": [0.0, -1.0, NAN, INF, "1"],
    "clip_norm": [0.0, -1.0, NAN, INF],
    "clip_global_norm": [0.0, -1.0, NAN, INF],
    "weight_clip": [0.0, -1.0, NAN, INF],
    "max_norm": [0.0, -1.0, NAN, INF],
    "ns_coefficients": [(1.0, 2.0), (1.0, NAN, 2.0), "abc", None],
    "ns_steps": [-1, 100, 2.5, True, None],
    "adjust_lr_fn": ["rms", 1],
    # rules added with the torch.optim 2.13 / optax breadth work
    "lambd": [-1.0, NAN, INF],
    "t0": [NAN, INF, "1"],
    "etas": [(0.5,), (1.0, 1.2), (0.5, 1.0), (0.0, 1.2), (0.5, NAN), 0.5],
    "step_sizes": [(1.0, 0.5), (-1e-6, 50.0), (1e-6, INF), (1e-6,), None],
    "eps_root": [-1e-16, NAN, INF],
    "t_alpha": [0, -5, NAN, INF, "10"],
    "t_beta3": [0, -5, NAN, INF],
    "beta2_decay": [0.1, NAN, INF],
    "d": [0.5, NAN, INF],
    # Schedule-Free: warmup in whole steps, the weights' exponents finite and >= 0
    "warmup_steps": [-1, 1.5, NAN, True],
    "r": [-0.5, NAN, INF],
    "weight_lr_power": [-1.0, NAN, INF],
}
#: (rule, name) -> bad values where a name means something else in that rule: ASGD's
#: ``alpha`` is the exponent of its eta schedule (any finite number >= 0), not an average.
BAD_VALUES_OF = {("asgd", "alpha"): [-0.1, NAN, INF],
                 # AdEMAMix: alpha weighs the slow EMA (any finite number >= 0); three betas
                 ("ademamix", "alpha"): [-0.1, NAN, INF],
                 # (the range of each beta: tests/test_rules_oracles.py)
                 ("ademamix", "betas"): [(0.9,), (0.9, 0.999, 0.9999, 0.9), 0.9],
                 # Adafactor's eps is the pair (eps1 or None, eps2)
                 ("adafactor", "eps"): [(-1.0, 1e-3), (None, -1.0), (None, NAN), 1e-3, (1e-3,)],
                 # Schedule-Free SGD's momentum is an interpolation constant in (0, 1)
                 ("schedule_free_sgd", "momentum"): [0.0, 1.0, -0.5, NAN, None],
                 # (beta1 = 0, which eval() would divide by: tests/test_rules_sf.py)
                 ("schedule_free_adamw", "betas"): [(1.0, 0.999), (0.9, 1.0), (0.9,), 0.9]}
# LARS (optax.lars): eps = 0 is its default; trust_ratio is the per-group trust mask
BAD_VALUES.update({"trust_coefficient": [-1.0, NAN, INF, None], "trust_ratio": [1, "yes", None]})
BAD_VALUES_OF[("lars", "eps")] = [-1e-8, NAN, INF, None]

HP_CASES = [(r, k) for r, rule in RULES.items() for k in list(rule.defaults) + list(PIPELINE_DEFAULTS)]


def _hp_pattern(name, value):
    if name == "betas" and isinstance(value, tuple) and len(value) == 2:
        i = 0 if not (isinstance(value[0], float) and 0 <= value[0] < 1) else 1
        return rf"betas\[{i}\]: expected a number in \[0, 1\), got {re.escape(repr(value[i]))}"
    return rf"{name}: expected .*, got {re.escape(repr(value))}"


def test_every_hyperparameter_has_bad_values():
    names = {k for _, k in HP_CASES}
    assert names <= set(BAD_VALUES), sorted(names - set(BAD_VALUES))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("rule,name", HP_CASES, ids=[f"{r}-{k}" for r, k in HP_CASES])
def test_hyperparameter_out_of_range(rule, name, backend):
    cls = OPTIMIZERS[rule]
    for value in BAD_VALUES_OF.get((rule, name), BAD_VALUES[name]):
        pattern = _hp_pattern(name, value)
        # 1. the constructor
        with pytest.raises(ValueError, match=pattern):
            cls(make_params(rule=rule), backend=backend, **{name: value})
        # 2. set later on the last group (torch style), then step: nothing is written
        opt, params = stepped(rule, backend, groups=True)
        opt.param_groups[-1][name] = value
        raises_unchanged(opt, params, ValueError, r"param_groups\[1\]: " + pattern,
                         lambda: do_step(opt, make_grads(params), extras_for(rule, params)))
        # 3. the functional API, with every state list given
        params = make_params(rule=rule)
        states = {state_arg(n): [np.zeros_like(p) for p in params] for n in RULES[rule].all_state}
        extra = extras_for(rule, params)
        args = (params, make_grads(params)) + ((extra,) if extra is not None else ())
        before = [p.tobytes() for p in params]
        with pytest.raises(ValueError, match=pattern):
            getattr(F, rule)(*args, step=1, backend=backend, **states, **{name: value})
        assert [p.tobytes() for p in params] == before
        assert all(not a.any() for lst in states.values() for a in lst)


def test_nesterov_needs_momentum():
    with pytest.raises(ValueError, match=r"nesterov: expected momentum > 0 and dampening == 0.*got 'momentum=0.0"):
        fo.SGD([np.zeros(3)], nesterov=True)
    with pytest.raises(ValueError, match=r"nesterov: expected .*got 'momentum=0.9, dampening=0.5'"):
        fo.SGD([np.zeros(3)], momentum=0.9, dampening=0.5, nesterov=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("value,pattern", [
    (lambda t: -1.0, r"param_groups\[1\]: lr \(the schedule's value at step 1\): expected a finite number >= 0, got -1.0"),
    (lambda t: NAN, r"lr \(the schedule's value at step 1\): expected a finite number >= 0, got nan"),
    (lambda t: "fast", r"lr \(the schedule's value at step 1\): expected a finite number >= 0, got an error"),
    (lambda t: INF, r"lr \(the schedule's value at step 1\): expected a finite number >= 0, got inf"),
])
def test_schedule_value_out_of_range(value, pattern, backend):
    opt, params = stepped("adam", backend, groups=True, amsgrad=False)
    opt.param_groups[0]["amsgrad"] = True  # group 0 would grow a state array on a good step
    opt.param_groups[1]["lr"] = value
    raises_unchanged(opt, params, ValueError, pattern, lambda: opt.step(make_grads(params)))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_lr_setter(backend):
    opt, params = stepped("sgd", backend)
    for bad in (-0.1, NAN, "1"):
        raises_unchanged(opt, params, ValueError, rf"lr: expected a finite number >= 0, got {re.escape(repr(bad))}",
                         lambda: setattr(opt, "lr", bad))
    assert opt.lr == 1e-3


# ------------------------------------------------------------------ grad_scale, nonfinite

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("scale,exc,pattern", [
    (0.0, ValueError, r"grad_scale: expected a finite number > 0, got 0.0"),
    (-2.0, ValueError, r"grad_scale: expected a finite number > 0, got -2.0"),
    (NAN, ValueError, r"grad_scale: expected a finite number > 0, got nan"),
    (INF, ValueError, r"grad_scale: expected a finite number > 0, got inf"),
    ("2", TypeError, r"grad_scale: expected a float or None, got str"),
    (True, TypeError, r"grad_scale: expected a float or None, got bool"),
    ([2.0], TypeError, r"grad_scale: expected a float or None, got list"),
    (np.array([2.0]), TypeError, r"grad_scale: expected a float or None, got ndarray"),
])
def test_bad_grad_scale(scale, exc, pattern, backend):
    opt, params = stepped("adam", backend)
    raises_unchanged(opt, params, exc, pattern, lambda: opt.step(make_grads(params), grad_scale=scale))
    p = make_params()
    before = [x.tobytes() for x in p]
    with pytest.raises(exc, match=pattern):
        F.sgd(p, make_grads(p), step=1, lr=0.1, grad_scale=scale, backend=backend)
    assert [x.tobytes() for x in p] == before


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("mode", ["warn", None, True, "RAISE", ""])
def test_bad_nonfinite_mode(mode, backend):
    pattern = rf"nonfinite: expected 'raise', 'skip' or 'ignore', got {re.escape(repr(mode))}"
    with pytest.raises(ValueError, match=pattern):
        fo.Adam(make_params(), nonfinite=mode, backend=backend)
    p = make_params()
    before = [x.tobytes() for x in p]
    with pytest.raises(ValueError, match=pattern):
        F.sgd(p, make_grads(p), step=1, lr=0.1, nonfinite=mode, backend=backend)
    assert [x.tobytes() for x in p] == before


# ------------------------------------------------------------------ state_dict

def _sd_cases(opt):
    """(name, mutate(sd) -> sd, exception, pattern) for a 2-group Adam with amsgrad."""
    n = LAST

    def put(path, value):
        def f(sd):
            d = sd
            for k in path[:-1]:
                d = d[k]
            d[path[-1]] = value
            return sd
        return f

    def delete(path):
        def f(sd):
            d = sd
            for k in path[:-1]:
                d = d[k]
            del d[path[-1]]
            return sd
        return f

    return [
        ("not-a-dict", lambda sd: [sd], TypeError, r"state_dict: expected a dict, got list"),
        ("missing-state", delete(["state"]), ValueError, r"state_dict: missing key 'state'"),
        ("wrong-rule", put(["rule"], "sgd"), ValueError, r"state_dict: expected a 'adam' state, got 'sgd'"),
        ("step-negative", put(["step_count"], -1), ValueError, r"state_dict\['step_count'\]: expected an integer >= 0, got -1"),
        ("step-float", put(["step_count"], 1.5), ValueError, r"state_dict\['step_count'\]: expected an integer >= 0, got 1.5"),
        ("step-bool", put(["step_count"], True), ValueError, r"state_dict\['step_count'\]: expected an integer >= 0, got True"),
        ("groups-not-list", put(["param_groups"], "xx"), TypeError, r"state_dict\['param_groups'\]: expected a list of dicts"),
        ("group-not-dict", put(["param_groups", 1], "g"), TypeError, r"state_dict\['param_groups'\]: expected a list of dicts"),
        ("one-group", lambda sd: {**sd, "param_groups": sd["param_groups"][:1]}, ValueError,
         r"state_dict\['param_groups'\]: expected 2 groups, got 1"),
        ("group-size", put(["param_groups", 1, "params"], [2]), ValueError,
         r"state_dict\['param_groups'\]\[1\]: expected 2 params, got 1"),
        ("unknown-option", put(["param_groups", 1, "momentum"], 0.9), ValueError,
         r"state_dict\['param_groups'\]\[1\]: unknown option\(s\) \['momentum'\]"),
        ("bad-hp-last-group", put(["param_groups", 1, "eps"], -1.0), ValueError,
         r"state_dict\['param_groups'\]\[1\]: eps: expected a finite number > 0, got -1.0"),
        ("state-not-dict", put(["state"], []), TypeError, r"state_dict\['state'\]: expected a dict, got list"),
        ("state-missing-last", delete(["state", n]), ValueError,
         rf"state_dict\['state'\]\[{n}\]: missing \(state of params\[{n}\]\)"),
        ("state-entry-not-dict", put(["state", n], [1, 2]), TypeError,
         rf"state_dict\['state'\]\[{n}\]: expected a dict of arrays, got list"),
        ("state-name-missing", delete(["state", n, "max_exp_avg_sq"]), ValueError,
         rf"state_dict\['state'\]\[{n}\]\['max_exp_avg_sq'\]: missing"),
        ("state-shape-last", put(["state", n, "exp_avg"], np.zeros(4)), ValueError,
         rf"state_dict\['state'\]\[{n}\]\['exp_avg'\]: expected float64 \(3,\) \(like params\[{n}\]\), got float64 \(4,\)"),
        ("state-dtype-last", put(["state", n, "exp_avg_sq"], np.zeros(3, np.float32)), ValueError,
         rf"state_dict\['state'\]\[{n}\]\['exp_avg_sq'\]: expected float64 \(3,\) .*got float32 \(3,\)"),
        ("state-strings", put(["state", n, "exp_avg"], np.array(["a", "b", "c"])), ValueError,
         rf"state_dict\['state'\]\[{n}\]\['exp_avg'\]: expected float64 \(3,\) .*got <U1 \(3,\)"),
        ("group-state-keys", put(["group_state"], [{"x": 1.0}, {}]), ValueError,
         r"state_dict\['group_state'\]: expected 2 dicts with keys \[\]"),
    ]


SD_IDS = [c[0] for c in _sd_cases(None)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", SD_IDS)
def test_bad_state_dict(case, backend):
    opt, params = stepped("adam", backend, groups=True, amsgrad=True)
    src, _ = stepped("adam", "numpy", groups=True, amsgrad=True)
    do_step(src, make_grads(params, seed=5))  # a different, valid state to load
    _, mutate, exc, pattern = next(c for c in _sd_cases(opt) if c[0] == case)
    sd = mutate(src.state_dict())
    raises_unchanged(opt, params, exc, pattern, lambda: opt.load_state_dict(sd))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("value", ["abc", NAN, None, True])
def test_bad_group_state_value_leaves_everything(value, backend):
    opt, params = stepped("nadam", backend, groups=True)
    src, _ = stepped("nadam", "numpy", groups=True)
    do_step(src, make_grads(params, seed=5))
    sd = src.state_dict()
    sd["group_state"][1]["mu_product"] = value
    raises_unchanged(opt, params, ValueError,
                     rf"state_dict\['group_state'\]\[1\]\['mu_product'\]: expected a finite number, got {re.escape(repr(value))}",
                     lambda: opt.load_state_dict(sd))


# ------------------------------------------------------------------ state_dict values (defect 3)

#: the state arrays whose entries are sums, averages or maxima of squares or magnitudes,
#: written out here by hand so that the rule table's ``nonnegative_state`` is checked
#: against an independent list
SQUARE_STATE = {
    "adam": {"exp_avg_sq", "max_exp_avg_sq"}, "adamw": {"exp_avg_sq", "max_exp_avg_sq"},
    "adagrad": {"sum"}, "rmsprop": {"square_avg"}, "adadelta": {"square_avg", "acc_delta"},
    "adamax": {"exp_inf"}, "nadam": {"exp_avg_sq"}, "radam": {"exp_avg_sq"},
    "lamb": {"exp_avg_sq"}, "adahessian": {"exp_hessian_diag_sq"},
}
SQUARE_STATE["rprop"] = {"step_size"}  # a magnitude, clamped to step_sizes: never negative
SQUARE_STATE["adabelief"] = {"exp_avg_var"}
SQUARE_STATE["yogi"] = {"exp_avg_sq"}  # v - (1-b2)*sign(v - g^2)*g^2 stays >= 0
SQUARE_STATE["ademamix"] = {"nu"}
SQUARE_STATE["adafactor"] = {"row_var", "col_var", "variance"}
SQUARE_STATE["schedule_free_adamw"] = {"exp_avg_sq"}


def test_rule_table_declares_the_square_state():
    for name, rule in RULES.items():
        assert set(rule.nonnegative_state) == SQUARE_STATE.get(name, set()), name


#: options that make every state array of a rule exist
ALL_STATE_OPTIONS = {"sgd": dict(momentum=0.9), "adam": dict(amsgrad=True), "adamw": dict(amsgrad=True),
                     "rmsprop": dict(momentum=0.9, centered=True)}

#: (rule, state name) for every state array of every rule whose state is param-shaped (the
#: loading checks of Adafactor's factors: tests/test_adafactor.py)
STATE_ENTRIES = [(r, nm) for r in RULES for nm in RULES[r].all_state
                 if RULES[r].state_shape is None]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("rule,name", STATE_ENTRIES, ids=[f"{r}-{n}" for r, n in STATE_ENTRIES])
def test_nonfinite_state_value_is_refused(rule, name, value, backend):
    """A NaN or inf anywhere in a loaded state would poison every later step of its tensor."""
    opts = ALL_STATE_OPTIONS.get(rule, {})
    opt, params = stepped(rule, backend, groups=True, **opts)
    src, _ = stepped(rule, "numpy", groups=True, **opts)
    sd = src.state_dict()
    sd["state"][LAST][name].reshape(-1)[-1] = value  # the last entry of the last tensor
    raises_unchanged(opt, params, ValueError,
                     rf"state_dict\['state'\]\[{LAST}\]\['{name}'\]: expected finite values, "
                     rf"got {re.escape(str(value))} at flat index 2",
                     lambda: opt.load_state_dict(sd))


SQUARE_ENTRIES = sorted((r, nm) for r, names in SQUARE_STATE.items() for nm in names
                        if RULES[r].state_shape is None)  # Adafactor: tests/test_adafactor.py


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("rule,name", SQUARE_ENTRIES, ids=[f"{r}-{n}" for r, n in SQUARE_ENTRIES])
def test_negative_square_state_is_refused(rule, name, backend):
    """sqrt of a negative second moment is NaN: a negative entry there cannot have come from a run."""
    opts = ALL_STATE_OPTIONS.get(rule, {})
    opt, params = stepped(rule, backend, groups=True, **opts)
    src, _ = stepped(rule, "numpy", groups=True, **opts)
    sd = src.state_dict()
    sd["state"][LAST][name][1] = -1e-30  # barely negative still counts
    raises_unchanged(opt, params, ValueError,
                     rf"state_dict\['state'\]\[{LAST}\]\['{name}'\]: expected values >= 0 .*, "
                     rf"got -1e-30 at flat index 1",
                     lambda: opt.load_state_dict(sd))


SIGNED_ENTRIES = [(r, nm) for r, nm in STATE_ENTRIES if nm not in SQUARE_STATE.get(r, ())]


@pytest.mark.parametrize("rule,name", SIGNED_ENTRIES, ids=[f"{r}-{n}" for r, n in SIGNED_ENTRIES])
def test_negative_signed_state_loads(rule, name):
    """First moments and momentum buffers are signed: a negative entry there is ordinary."""
    opts = ALL_STATE_OPTIONS.get(rule, {})
    opt, _ = stepped(rule, "numpy", groups=True, **opts)
    src, _ = stepped(rule, "numpy", groups=True, **opts)
    sd = src.state_dict()
    sd["state"][LAST][name][...] = -2.5
    opt.load_state_dict(sd)
    assert (opt.state[1][1][name] == -2.5).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_negative_zero_and_zero_square_state_load(backend):
    opt, params = stepped("adam", backend, groups=True, amsgrad=True)
    sd = opt.state_dict()
    sd["state"][LAST]["exp_avg_sq"][...] = -0.0
    sd["state"][0]["max_exp_avg_sq"][...] = 0.0
    opt.load_state_dict(sd)
    assert np.signbit(opt.state[1][1]["exp_avg_sq"]).all()


# ------------------------------------------------------------------ the functional API's state lists

def _functional_adam_args(backend):
    params = make_params()
    grads = make_grads(params)
    m = [np.full_like(p, 0.5) for p in params]
    v = [np.full_like(p, 0.25) for p in params]
    return params, grads, m, v


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("where", [0, LAST])
@pytest.mark.parametrize("kind", ["length", "dtype", "shape", "read-only", "non-contiguous",
                                  "same-list-twice", "state-is-grad", "state-is-param",
                                  "state-is-other-param", "not-an-array"])
def test_functional_bad_state(kind, where, backend):
    params, grads, m, v = _functional_adam_args(backend)
    i, p = where, params[where]
    if kind == "length":
        v = v[:-1]
        exc, pattern = ValueError, rf"exp_avg_sqs: expected {len(params)} arrays \(one per param\), got {LAST}"
    elif kind == "dtype":
        v[i] = v[i].astype(np.float32 if p.dtype == np.float64 else np.float64)
        exc, pattern = ValueError, rf"exp_avg_sqs\[{i}\]: expected dtype {p.dtype}"
    elif kind == "shape":
        v[i] = np.zeros(p.size + 1, p.dtype)
        exc, pattern = ValueError, rf"exp_avg_sqs\[{i}\]: expected shape"
    elif kind == "read-only":
        v[i].flags.writeable = False
        exc, pattern = ValueError, rf"exp_avg_sqs\[{i}\]: expected a writeable array, got a read-only one"
    elif kind == "non-contiguous":
        v[i] = np.zeros((p.size, 2), p.dtype)[:, 0].reshape(p.shape) if p.ndim == 1 else np.zeros(p.shape[::-1], p.dtype).T
        exc, pattern = ValueError, rf"exp_avg_sqs\[{i}\]: expected a C-contiguous array, got strides"
    elif kind == "same-list-twice":
        v = m
        exc, pattern = ValueError, r"exp_avg_sqs\[0\]: expected an array of its own .*got the same array as exp_avgs\[0\]"
    elif kind == "state-is-grad":
        grads[i] = v[i]
        exc, pattern = ValueError, rf"grads\[{i}\]: expected an array separate from every param and state array, got the same array as exp_avg_sqs\[{i}\]"
    elif kind == "state-is-param":
        v[i] = p
        exc, pattern = ValueError, rf"exp_avg_sqs\[{i}\]: expected an array separate from its param"
    elif kind == "state-is-other-param":
        j = LAST if i == 0 else 0
        v[i] = params[j]
        exc, pattern = ValueError, rf"exp_avg_sqs\[{i}\]: expected an array of its own .*got the same array as params\[{j}\]"
    elif kind == "not-an-array":
        v[i] = v[i].tolist()
        exc, pattern = TypeError, rf"exp_avg_sqs\[{i}\]: expected a numpy or cupy array, got list"
    written = params + m + [a for a in v if isinstance(a, np.ndarray)]
    before = [a.tobytes() for a in written]
    with pytest.raises(exc, match=pattern):
        F.adam(params, grads, m, v, step=1, lr=0.1, backend=backend)
    assert [a.tobytes() for a in written] == before


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_functional_missing_state_and_bad_step(backend):
    params, grads, m, v = _functional_adam_args(backend)
    written = params + m + v
    before = [a.tobytes() for a in written]
    with pytest.raises(TypeError, match=r"adam\(\): exp_avg_sqs is required with these options"):
        F.adam(params, grads, m, step=1, backend=backend)
    with pytest.raises(TypeError, match=r"adam\(\): max_exp_avg_sqs is required"):
        F.adam(params, grads, m, v, step=1, amsgrad=True, backend=backend)
    for step in (0, -1, 1.5, True, None):
        with pytest.raises(ValueError, match=rf"step: expected the 1-based index of this step \(an int >= 1\), got {re.escape(repr(step))}"):
            F.adam(params, grads, m, v, step=step, backend=backend)
    with pytest.raises(TypeError, match=r"lr: expected a float \(evaluate a schedule"):
        F.adam(params, grads, m, v, step=1, lr=fo.schedules.constant(0.1), backend=backend)
    with pytest.raises(TypeError, match=r"adam\(\) got an unexpected keyword argument 'momentum'"):
        F.adam(params, grads, m, v, step=1, momentum=0.9, backend=backend)
    for mu in (NAN, 0.0, 1.5, "x"):
        with pytest.raises(ValueError, match=rf"mu_product: expected a number in \(0, 1\], got {re.escape(repr(mu))}"):
            F.nadam(params, grads, m, v, step=2, mu_product=mu, backend=backend)
    assert [a.tobytes() for a in written] == before

