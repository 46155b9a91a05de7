"""Core API: pipeline order, param groups, state round trip, dispatch, functional API, schedules."""

import inspect
import math
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

import fastopt as fo
from fastopt import schedules as S
from fastopt._rules import PIPELINE_DEFAULTS, RULES, state_arg

from _cases import CASES, CASE_IDS, INFOS, make_problem

# --------------------------------------------------------------------------- the pipeline


def test_pipeline_order_by_hand():
    """Pipeline steps 1-8 (docs/design.md) by hand on two tensors with SGD(lr=1) (p -= g)."""
    a, b = np.array([1.0, 2.0, -3.0]), np.array([0.25, -0.25])
    ga, gb = np.array([4.0, -8.0, 2.0]), np.array([1.0, 1.0])
    opt = fo.SGD([a, b], lr=1.0, maximize=True, clip_value=3.0, clip_norm=2.0,
                 clip_global_norm=1.0, weight_clip=2.5, max_norm=2.0, backend="numpy")
    info = opt.step([ga, gb], grad_scale=2.0)
    # 1 unscale: [2,-4,1], [.5,.5]; 3 maximize: [-2,4,-1], [-.5,-.5]; 4 clip 3: [-2,3,-1]
    xa, xb = np.array([-2.0, 3.0, -1.0]), np.array([-0.5, -0.5])
    # 5 per-tensor norm 2: |xa| = sqrt(14) > 2 is scaled, |xb| = sqrt(.5) is not
    xa = xa * min(1.0, 2.0 / (math.sqrt(14.0) + 1e-6))
    # 6 global norm 1 over both; grad_norm is G before this clip
    G = math.sqrt(np.sum(xa ** 2) + np.sum(xb ** 2))
    f = min(1.0, 1.0 / (G + 1e-6))
    xa, xb = xa * f, xb * f
    assert info.grad_norm == pytest.approx(G, rel=1e-12)
    # 7 the rule; 8 weight clip then max norm per tensor
    pa = np.clip(np.array([1.0, 2.0, -3.0]) - xa, -2.5, 2.5)
    pb = np.clip(np.array([0.25, -0.25]) - xb, -2.5, 2.5)
    pa = pa * min(1.0, 2.0 / (np.linalg.norm(pa) + 1e-6))
    pb = pb * min(1.0, 2.0 / (np.linalg.norm(pb) + 1e-6))
    np.testing.assert_allclose(a, pa, rtol=1e-13)
    np.testing.assert_allclose(b, pb, rtol=1e-13)


def test_grad_norm_is_none_without_global_clip_and_grads_untouched():
    p, g = np.ones(4), np.full(4, 2.0)
    info = fo.Adam([p], clip_norm=1.0, backend="numpy").step([g])
    assert info.grad_norm is None and not info.skipped
    np.testing.assert_array_equal(g, 2.0)  # the caller's gradients are never modified


def test_schedule_is_called_with_t_minus_1():
    seen = []

    def sched(step):
        seen.append(step)
        return 0.1

    opt = fo.SGD([np.ones(2)], lr=sched, backend="numpy")
    assert opt.lr == 0.1 and seen == [0]
    for _ in range(3):
        opt.step([np.ones(2)])
    assert seen[1:] == [0, 1, 2] and opt.step_count == 3


def test_lr_from_schedule_drives_the_step():
    p = np.zeros(1)
    opt = fo.SGD([p], lr=S.piecewise_constant([1], [1.0, 0.5]), backend="numpy")
    opt.step([np.ones(1)])
    opt.step([np.ones(1)])
    assert p[0] == -1.5


def test_param_groups_override_per_group():
    a, b = np.ones(3), np.ones(3)
    opt = fo.SGD([{"params": [a]}, {"params": [b], "lr": 0.5, "weight_decay": 1.0}], lr=0.1,
                 backend="numpy")
    opt.step([np.ones(3), np.ones(3)])
    np.testing.assert_allclose(a, 0.9)
    np.testing.assert_allclose(b, 1 - 0.5 * 2.0)
    assert opt.param_groups[1]["lr"] == 0.5 and opt.param_groups[0]["lr"] == 0.1


def test_global_norm_is_per_group():
    a, b = np.zeros(1), np.zeros(1)
    opt = fo.SGD([{"params": [a], "clip_global_norm": 1.0}, {"params": [b]}], lr=1.0, backend="numpy")
    info = opt.step([np.array([3.0]), np.array([4.0])])
    assert a[0] == pytest.approx(-1.0, rel=1e-6) and b[0] == -4.0
    assert info.group_grad_norms == (3.0, None) and info.grad_norm == 3.0


def test_mixed_dtypes_in_one_group():
    a, b = np.ones(5, np.float32), np.ones(3, np.float64)
    opt = fo.Adam([a, b], lr=0.1, clip_global_norm=1.0, backend="numpy")
    opt.step([np.ones(5, np.float32), np.ones(3, np.float64)])
    assert a.dtype == np.float32 and opt.state[0][0]["exp_avg"].dtype == np.float32
    np.testing.assert_allclose(a, 0.9, rtol=1e-6)
    np.testing.assert_allclose(b, 0.9, rtol=1e-7)  # eps/|g| ~ 3e-8


def test_state_dtype_follows_param_and_float32_stays_float32():
    for rule, opts, _ in CASES:
        params, grads, extras = make_problem(rule, (5,), np.float32, steps=2)
        cls = fo._optim.OPTIMIZERS[rule]
        opt = cls(params, backend="numpy", **opts)
        for g, e in zip(grads, extras):
            opt.step(g, e) if cls.rule.extra else opt.step(g)
        assert params[0].dtype == np.float32
        for st in opt.state[0]:
            assert all(v.dtype == np.float32 for v in st.values()), rule


def test_nonfinite_skip_and_raise_basics():
    p = np.ones(3)
    opt = fo.Adam([p], nonfinite="skip", backend="numpy")
    info = opt.step([np.array([1.0, np.nan, 1.0])])
    assert info.skipped and opt.step_count == 0 and np.all(p == 1)
    opt = fo.Adam([p], backend="numpy")
    with pytest.raises(FloatingPointError):
        opt.step([np.array([1.0, np.inf, 1.0])])
    assert np.all(p == 1) and opt.step_count == 0
    fo.Adam([p], nonfinite="ignore", backend="numpy").step([np.array([1.0, np.nan, 1.0])])
    assert np.isnan(p[1])


# --------------------------------------------------------------------------- state


@pytest.mark.parametrize("rule,opts,cid", CASES, ids=CASE_IDS)
def test_state_dict_round_trip_is_bit_identical(rule, opts, cid):
    cls = fo._optim.OPTIMIZERS[rule]
    params, grads, extras = make_problem(rule, (1, 7, 33), np.float64)

    def steps(opt, lo, hi):
        for g, e in zip(grads[lo:hi], extras[lo:hi]):
            opt.step(g, e) if cls.rule.extra else opt.step(g)

    if "lr" in opts:  # exercise a schedule too
        opts = dict(opts, lr=S.exponential_decay(opts["lr"], 0.9))
    straight = [p.copy() for p in params]
    steps(cls(straight, backend="numpy", **opts), 0, 7)

    resumed = [p.copy() for p in params]
    first = cls(resumed, backend="numpy", **opts)
    steps(first, 0, 3)
    sd = pickle.loads(pickle.dumps(first.state_dict()))
    second = cls(resumed, backend="numpy", **opts)
    second.load_state_dict(sd)
    assert second.step_count == 3
    steps(second, 3, 7)
    for w, g in zip(straight, resumed):
        np.testing.assert_array_equal(g, w)


def test_state_dict_holds_host_copies():
    p = np.ones(3)
    opt = fo.Adam([p], backend="numpy")
    opt.step([np.ones(3)])
    sd = opt.state_dict()
    sd["state"][0]["exp_avg"][:] = 123.0
    assert np.all(opt.state[0][0]["exp_avg"] != 123.0)
    assert sd["step_count"] == 1 and sd["param_groups"][0]["params"] == [0]
    assert sd["param_groups"][0]["betas"] == (0.9, 0.999)


def test_nadam_mu_product_is_group_state():
    opt = fo.NAdam([np.ones(2)], backend="numpy")
    opt.step([np.ones(2)])
    mu1 = 0.9 * (1 - 0.5 * 0.96 ** 0.004)
    assert opt.group_state[0]["mu_product"] == pytest.approx(mu1, rel=1e-15)


# --------------------------------------------------------------------------- dispatch


def _run(code, **env):
    e = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e,
                          check=True).stdout.strip()


def test_import_loads_neither_numba_nor_cupy():
    out = _run("import sys, fastopt; print('numba' in sys.modules, 'cupy' in sys.modules)")
    assert out == "False False"


def test_env_var_overrides_auto():
    code = ("import numpy as np, fastopt; o = fastopt.SGD([np.ones(2)]); print(o.backend)")
    assert _run(code, FASTOPT_BACKEND="numpy") == "numpy"


def test_backends_report_reasons():
    info = fo.backends()
    assert set(info) == {"numpy", "numba", "cupy"}
    assert info["numpy"]["available"] and set(info["numpy"]["rules"]) == set(RULES)
    for name, b in info.items():
        assert b["available"] or b["reason"], name


def test_auto_prefers_numba_when_it_imports(monkeypatch):
    monkeypatch.delenv("FASTOPT_BACKEND", raising=False)
    opt = fo.SGD([np.ones(2)])
    assert opt.backend == ("numba" if fo.backends()["numba"]["available"] else "numpy")


def test_bad_backend_names():
    with pytest.raises(ValueError, match="backend"):
        fo.SGD([np.ones(2)], backend="tpu")


def test_cupy_backend_with_numpy_arrays_is_a_type_error():
    with pytest.raises((TypeError, RuntimeError), match="cupy"):
        fo.SGD([np.ones(2)], backend="cupy")


def test_cli_info_lists_backends_and_rules():
    out = subprocess.run([sys.executable, "-m", "fastopt", "info"], capture_output=True, text=True,
                         check=True).stdout
    assert "numpy" in out and "cupy" in out and "AdaHessian" in out


# --------------------------------------------------------------------------- functional


def test_functional_adam_matches_the_class():
    rng = np.random.default_rng(0)
    p1 = rng.standard_normal(11)
    p2 = p1.copy()
    m, v = np.zeros(11), np.zeros(11)
    opt = fo.Adam([p1], lr=1e-2, weight_decay=0.1, clip_global_norm=1.0, backend="numpy")
    for t in range(1, 6):
        g = rng.standard_normal(11)
        opt.step([g])
        info = fo.functional.adam([p2], [g], [m], [v], step=t, lr=1e-2, weight_decay=0.1,
                                  clip_global_norm=1.0, backend="numpy")
        assert info.grad_norm == pytest.approx(np.linalg.norm(g))
    np.testing.assert_array_equal(p1, p2)
    np.testing.assert_array_equal(m, opt.state[0][0]["exp_avg"])


def test_functional_nadam_returns_mu_product():
    p, m, v = np.ones(3), np.zeros(3), np.zeros(3)
    info = fo.functional.nadam([p], [np.ones(3)], [m], [v], step=1)
    mu = info.group_state[0]["mu_product"]
    info = fo.functional.nadam([p], [np.ones(3)], [m], [v], step=2, mu_product=mu)
    q = np.ones(3)
    o = fo.NAdam([q], backend="numpy")
    o.step([np.ones(3)])
    o.step([np.ones(3)])
    np.testing.assert_allclose(p, q, rtol=1e-15)


def test_functional_requires_state_the_options_need():
    p = np.ones(2)
    with pytest.raises(TypeError, match="max_exp_avg_sqs"):
        fo.functional.adam([p], [p.copy()], [np.zeros(2)], [np.zeros(2)], step=1, amsgrad=True)
    with pytest.raises(ValueError, match="step"):
        fo.functional.sgd([p], [p.copy()], step=0)


def test_functional_signatures_name_state_lists():
    import inspect

    sig = inspect.signature(fo.functional.adam)
    assert list(sig.parameters)[:5] == ["params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"]
    assert sig.parameters["lr"].default == 1e-3
    assert "hessian_diags" in inspect.signature(fo.functional.adahessian).parameters


# the keywords of a class or functional signature that are not hyperparameters
_NOT_HP = {"params", "grads", "step", "grad_scale", "nonfinite", "backend", "masters", "min_8bit_size",
           "state_dtype", "master_weights", "stochastic_rounding", "seed"}


def _signature_defaults(fn, skip=()):
    import inspect

    return {name: p.default for name, p in inspect.signature(fn).parameters.items()
            if name not in _NOT_HP and name not in skip}


@pytest.mark.parametrize("rule", list(RULES))
def test_signature_defaults_are_the_rule_tables(rule):
    """A class's and a functional's keyword defaults are the rule table's (plus the pipeline's)."""
    r = RULES[rule]
    want = {**r.defaults, **PIPELINE_DEFAULTS}
    cls = fo._optim.OPTIMIZERS[rule]
    assert cls.__name__ == r.class_name and getattr(fo, r.class_name) is cls
    assert _signature_defaults(cls) == want
    # the functional form also takes the state lists (exp_avgs, ...), the extra input and the
    # group state (NAdam's mu_product, starting at the table's initial value)
    fn = getattr(fo.functional, rule)
    per_tensor = {state_arg(n) for n in r.all_state} | ({r.extra} if r.extra else set())
    assert per_tensor <= set(inspect.signature(fn).parameters)
    assert _signature_defaults(fn, skip=per_tensor | set(r.group_state)) == want
    # (less the group state a functional step fixes: Schedule-Free's train_mode)
    taken = {k: v for k, v in r.group_state.items() if k not in fo.functional._GSTATE_FIXED}
    assert {k: v for k, v in _signature_defaults(fn).items() if k in r.group_state} == taken


def test_the_test_table_covers_every_rule():
    """tests/_cases.py has one record per rule, and its option sets name real options."""
    assert list(INFOS) == list(RULES)
    for rule, info in INFOS.items():
        known = set(RULES[rule].defaults) | set(PIPELINE_DEFAULTS)
        assert info.cases and info.converge and info.rosen, rule
        for opts in [c.options for c in info.cases] + list(info.oracle) + list(info.converge) + \
                [info.rosen[0], info.bench]:
            assert set(opts) <= known, (rule, set(opts) - known)
        if info.oracle:
            assert info.torch == RULES[rule].class_name, rule
    assert len(set(CASE_IDS)) == len(CASE_IDS)


def _signature_from_rule_table(rule):
    """What a rule function's signature must be, built from the rule table alone."""
    import inspect

    from fastopt._rules import PIPELINE_DEFAULTS, PRECISION_DEFAULTS

    P = inspect.Parameter
    out = [P("params", P.POSITIONAL_OR_KEYWORD), P("grads", P.POSITIONAL_OR_KEYWORD)]
    if rule.extra:
        out.append(P(rule.extra, P.POSITIONAL_OR_KEYWORD))
    out += [P(state_arg(n), P.POSITIONAL_OR_KEYWORD, default=None) for n in rule.all_state]
    out.append(P("masters", P.POSITIONAL_OR_KEYWORD, default=None))  # master_weights=True
    out.append(P("step", P.KEYWORD_ONLY))
    out += [P(k, P.KEYWORD_ONLY, default=v) for k, v in {**rule.defaults, **PIPELINE_DEFAULTS}.items()]
    out += [P(k, P.KEYWORD_ONLY, default=v) for k, v in rule.group_state.items()
            if k not in fo.functional._GSTATE_FIXED]
    out += [P(k, P.KEYWORD_ONLY, default=v)
            for k, v in (("grad_scale", None), ("nonfinite", "raise"), ("backend", "auto"))]
    out += [P(k, P.KEYWORD_ONLY, default=v) for k, v in PRECISION_DEFAULTS.items()]
    return inspect.Signature(out)


def test_functional_signatures_follow_the_rule_table():
    """The written-out functions stay in step with fastopt/_rules.py (names, order, defaults)."""
    import inspect

    from fastopt._rules import RULES

    for name, rule in RULES.items():
        got = inspect.signature(getattr(fo.functional, name)).replace(return_annotation=inspect.Signature.empty)
        assert got == _signature_from_rule_table(rule), name
    # + SparseAdam, a rule outside RULES (fastopt._rules.OWN_DRIVER_RULES) with a functional form
    assert set(fo.functional.__all__) == set(RULES) | {"global_norm", "clip_grad_norm_", "clip_grad_value_",
                                                       "sparse_adam"}


def test_functional_rules_are_written_out():
    """Every rule function is a ``def`` in functional.py's source, so IDEs and type checkers see it."""
    import ast
    import inspect

    from fastopt._rules import RULES

    tree = ast.parse(inspect.getsource(fo.functional))
    defs = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert set(RULES) <= defs
    assert isinstance(next(n for n in tree.body if isinstance(n, ast.Assign)
                           and n.targets[0].id == "__all__").value, ast.List)
    for name in RULES:
        fn = getattr(fo.functional, name)
        assert fn.__name__ == name and fn.__module__ == "fastopt.functional"
        assert RULES[name].class_name in fn.__doc__


@pytest.mark.parametrize("rule", ["newton", "adahessian"])
def test_class_and_functional_check_inputs_alike(rule):
    """One prepare path: the same bad extra input gets the same message from both APIs."""
    import re

    from fastopt._rules import RULES

    r = RULES[rule]
    params = [np.ones(3), np.ones(4)]
    grads = [np.ones(3), np.ones(4)]
    good = [np.eye(3), np.eye(4)] if r.extra_shape == "square" else [np.ones(3), np.ones(4)]
    bad = [good[0], np.ones(5)]
    state = [[np.zeros_like(p) for p in params] for _ in r.all_state]
    msgs = []
    for call in (lambda: fo._optim.OPTIMIZERS[rule]([p.copy() for p in params], backend="numpy").step(grads, bad),
                 lambda: getattr(fo.functional, rule)([p.copy() for p in params], grads, bad, *state,
                                                       step=1, backend="numpy")):
        with pytest.raises(ValueError) as info:
            call()
        msgs.append(str(info.value))
    want = f"{r.extra}[1]: expected shape {r.extra_shape_of((4,), 4)}, got (5,)"
    assert msgs == [want, want], msgs
    with pytest.raises(TypeError, match=re.escape(f"needs {r.extra}")):
        getattr(fo.functional, rule)([np.ones(3)], [np.ones(3)], None,
                                     *[[np.zeros(3)] for _ in r.all_state], step=1, backend="numpy")


def test_betas_list_is_stored_and_used_as_a_tuple():
    p = [np.ones(3)]
    opt = fo.Adam([{"params": p, "betas": [0.8, 0.9]}], backend="numpy")
    assert opt.param_groups[0]["betas"] == (0.8, 0.9)
    assert fo.Adam([np.ones(3)], betas=[0.8, 0.9], backend="numpy").defaults["betas"] == (0.8, 0.9)
    q = np.ones(3)
    opt.step([np.full(3, 0.5)])
    fo.functional.adam([q], [np.full(3, 0.5)], [np.zeros(3)], [np.zeros(3)], step=1, betas=[0.8, 0.9],
                       backend="numpy")
    np.testing.assert_array_equal(p[0], q)


def test_global_norm_and_clip_helpers():
    a, b = np.array([3.0, 0.0]), np.array([4.0], np.float32)
    assert fo.functional.global_norm([a, b]) == pytest.approx(5.0)
    total = fo.functional.clip_grad_norm_([a, b], 1.0)
    assert total == pytest.approx(5.0)
    np.testing.assert_allclose(a, [3 / (5 + 1e-6), 0.0])
    np.testing.assert_allclose(b, [4 / (5 + 1e-6)], rtol=1e-6)
    fo.functional.clip_grad_value_([a], 0.1)
    np.testing.assert_array_equal(a, [0.1, 0.0])


# --------------------------------------------------------------------------- schedules


def test_schedules_closed_forms():
    t = np.arange(0, 50)
    cases = [
        (S.constant(0.3), lambda t: 0.3),
        (S.exponential_decay(1.0, 0.5, steps=10), lambda t: 0.5 ** (t / 10)),
        (S.exponential_decay(1.0, 0.5, steps=10, staircase=True), lambda t: 0.5 ** (t // 10)),
        (S.step_decay(0.1, 7, 0.5), lambda t: 0.1 * 0.5 ** (t // 7)),
        (S.multistep(0.1, [5, 20], 0.1), lambda t: 0.1 * 0.1 ** ((t >= 5) + (t >= 20))),
        (S.linear(1.0, 0.0, 40), lambda t: 1.0 * (1 - min(t, 40) / 40)),
        (S.linear(1.0, 0.2, 40), lambda t: 1.0 + (0.2 - 1.0) * min(t, 40) / 40),
        (S.polynomial(1.0, 0.1, 30, 2.0), lambda t: 0.1 + 0.9 * (1 - min(t, 30) / 30) ** 2),
        (S.cosine_decay(1.0, 30, 0.1), lambda t: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 30) / 30))),
        (S.warmup_cosine(1.0, 10, 40), lambda t: t / 10 if t < 10 else
         0.5 * (1 + math.cos(math.pi * min(t - 10, 30) / 30))),
        (S.piecewise_constant([10, 30], [1.0, 0.5, 0.1]), lambda t: 1.0 if t < 10 else 0.5 if t < 30 else 0.1),
        (S.join([S.constant(0.5), S.linear(0.5, 0.0, 10)], [20]),
         lambda t: 0.5 if t < 20 else 0.5 * (1 - min(t - 20, 10) / 10)),
    ]
    for sched, f in cases:
        for k in t:
            assert sched(int(k)) == pytest.approx(f(int(k)), rel=1e-12, abs=1e-15), (sched, k)


def test_schedules_pickle_and_config_round_trip():
    s = S.join([S.warmup_cosine(1.0, 5, 20), S.multistep(0.1, [3], 0.5)], [20])
    assert pickle.loads(pickle.dumps(s)) == s
    import json

    cfg = json.loads(json.dumps(s.config()))
    assert S.from_config(cfg) == s
    assert [S.from_config(cfg)(k) for k in range(30)] == [s(k) for k in range(30)]


def test_schedule_bad_arguments():
    with pytest.raises(ValueError, match="steps"):
        S.cosine_decay(1.0, 0)
    with pytest.raises(ValueError, match="milestones"):
        S.multistep(1.0, [5, 3])
    with pytest.raises(ValueError, match="values"):
        S.piecewise_constant([1, 2], [1.0])
    with pytest.raises(ValueError, match="step"):
        S.constant(1.0)(-1)
    with pytest.raises(ValueError, match="schedule config"):
        S.from_config({"schedule": "os.system"})


def test_negative_schedule_value_is_caught_before_writing():
    p = np.ones(2)
    opt = fo.SGD([p], lr=lambda t: -1.0, backend="numpy")
    with pytest.raises(ValueError, match="lr"):
        opt.step([np.ones(2)])
    assert np.all(p == 1) and opt.step_count == 0


def test_numpy_scalars_are_accepted_and_widened_to_double():
    """np.float32 hyperparameters work; host scalars are still computed in double."""
    a, b = np.ones(3, np.float32), np.ones(3, np.float32)
    fo.Adam([a], lr=np.float32(0.01), betas=(np.float32(0.9), np.float64(0.999)),
            backend="numpy").step([np.ones(3, np.float32)], grad_scale=np.array(2.0))
    fo.Adam([b], lr=float(np.float32(0.01)), betas=(float(np.float32(0.9)), 0.999),
            backend="numpy").step([np.ones(3, np.float32)], grad_scale=2.0)
    np.testing.assert_array_equal(a, b)
