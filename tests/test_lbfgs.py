"""LBFGS: torch.optim.LBFGS oracle (Rosenbrock, logistic regression; both line_search_fn
values; a small history_size so the ring drops pairs), fastopt.torch.LBFGS, state_dict and
checkpoints, atomic steps and bad input.

LBFGS is not in the test table (``tests/_cases.py``): a step is a loop of closure calls over
flattened params, which the table's generic tests cannot drive; its rule record lives in
``fastopt._rules.OWN_DRIVER_RULES`` (kind ``closure``), outside ``RULES``.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastopt as fo
from _cases import TOL

torch = pytest.importorskip("torch")

STEPS = 20
SPLIT = (3, 4)  # two params, odd sizes: the flat vector spans both


def _rosenbrock(x):
    return np.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)


def _rosenbrock_grad(x):
    g = np.zeros_like(x)
    g[:-1] += -400.0 * x[:-1] * (x[1:] - x[:-1] ** 2) - 2.0 * (1.0 - x[:-1])
    g[1:] += 200.0 * (x[1:] - x[:-1] ** 2)
    return g


def _logistic_data():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((40, 7))
    y = (X @ rng.standard_normal(7) + 0.3 * rng.standard_normal(40) > 0).astype(np.float64)
    return X, y


def _logistic(w, X, y):
    z = X @ w
    return np.mean(np.logaddexp(0.0, z) - y * z) + 0.01 * np.dot(w, w)


def _logistic_grad(w, X, y):
    z = X @ w
    return X.T @ (1.0 / (1.0 + np.exp(-z)) - y) / len(y) + 0.02 * w


def _problem(name):
    if name == "rosenbrock":
        return np.linspace(-1.2, 1.0, sum(SPLIT)), _rosenbrock, _rosenbrock_grad
    X, y = _logistic_data()
    return (np.zeros(7), lambda w: _logistic(w, X, y), lambda w: _logistic_grad(w, X, y))


def _torch_loss(name, x):
    if name == "rosenbrock":
        return torch.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)
    X, y = map(torch.tensor, _logistic_data())
    z = X @ x
    return torch.mean(torch.nn.functional.softplus(z) - y * z) + 0.01 * torch.dot(x, x)


def _fastopt_run(name, options, steps=STEPS, opt_cls=fo.LBFGS):
    x0, f, grad = _problem(name)
    ps = [x0[:SPLIT[0]].copy(), x0[SPLIT[0]:].copy()]
    opt = opt_cls(ps, **options)

    def closure():
        x = np.concatenate(ps)
        g = grad(x)
        return f(x), [g[:SPLIT[0]].copy(), g[SPLIT[0]:].copy()]

    losses = [opt.step(closure) for _ in range(steps)]
    return ps, opt, losses


# Rosenbrock without a line search takes lr=1 steps across its curved valley: the iterates
# are chaotic (torch's and NumPy's last-bit differences grow to O(1) after ~12 steps), so it
# is compared with the strong-Wolfe search only; logistic regression with both.
ORACLE = [
    ("rosenbrock", {"line_search_fn": "strong_wolfe", "history_size": 3}),
    ("logistic", {"line_search_fn": None, "history_size": 2, "max_iter": 4}),
    ("logistic", {"line_search_fn": "strong_wolfe", "history_size": 3, "max_iter": 5,
                  "lr": 0.8}),
    ("logistic", {"line_search_fn": None, "history_size": 100, "tolerance_change": 1e-12,
                  "tolerance_grad": 1e-12, "max_eval": 7}),
]


# the default NumPy two-loop on every case; the fused Numba two-loop on the first three (the
# fourth, 100 pairs at tolerance 1e-12, is ~2000 tiny launches: slow on a loaded CI machine)
_IDS = ["rosen-wolfe-h3", "logit-none-h2", "logit-wolfe-h3", "logit-none-tol"]
ORACLE_RUNS = [(n, o, "numpy", i) for (n, o), i in zip(ORACLE, _IDS)] + \
    [(n, o, "numba", i) for (n, o), i in zip(ORACLE[:3], _IDS)]


@pytest.mark.parametrize("name,options,backend", [r[:3] for r in ORACLE_RUNS],
                         ids=[f"{r[3]}-{r[2]}" for r in ORACLE_RUNS])
def test_torch_oracle(name, options, backend):
    """20 float64 steps against torch.optim.LBFGS: params, losses and every state entry
    (numba: the two-loop recursion's fused axpy + dot passes)."""
    if backend == "numba":
        pytest.importorskip("numba")
    ps, opt, losses = _fastopt_run(name, {**options, "backend": backend})
    assert opt.backend == backend
    x0, _, _ = _problem(name)
    tx = [torch.tensor(x0[:SPLIT[0]], requires_grad=True),
          torch.tensor(x0[SPLIT[0]:], requires_grad=True)]
    topt = torch.optim.LBFGS(tx, **options)  # noqa: the options are torch's names

    def closure():
        topt.zero_grad()
        loss = _torch_loss(name, torch.cat(tx))
        loss.backward()
        return loss

    tlosses = [float(topt.step(closure)) for _ in range(STEPS)]
    tol = TOL["lbfgs-torch"]
    np.testing.assert_allclose(np.concatenate(ps), torch.cat(tx).detach().numpy(), **tol)
    np.testing.assert_allclose(losses, tlosses, **tol)
    ts, st = topt.state[tx[0]], opt.state
    assert (st["n_iter"], st["func_evals"]) == (ts["n_iter"], ts["func_evals"])
    assert len(st["old_dirs"]) == len(ts["old_dirs"]) <= options["history_size"]
    if options["history_size"] < 5:  # the ring was exercised: pairs were dropped
        assert ts["n_iter"] > options["history_size"] + 1
    for k in ("old_dirs", "old_stps"):
        for a, b in zip(st[k], ts[k]):
            np.testing.assert_allclose(a, b.numpy(), **tol)
    for k in ("d", "prev_flat_grad"):
        np.testing.assert_allclose(st[k], ts[k].numpy(), **tol)
    np.testing.assert_allclose(float(st["prev_loss"]), float(ts["prev_loss"]), **tol)
    if name == "rosenbrock":
        # converged to 1e-10 after ~12 steps: the last pairs' y = g - g_prev cancel to ~1e-9,
        # so their 1/(y.s) and y.s/y.y carry the grads' last-bit differences amplified to ~1e-7
        # relative (the params, the losses and the evaluation counts agree all the same)
        return
    np.testing.assert_allclose([float(r) for r in st["ro"]], [float(r) for r in ts["ro"]], **tol)
    for k in ("t", "H_diag"):
        np.testing.assert_allclose(float(st[k]), float(ts[k]), **tol)


def test_converges_float32():
    ps, opt, losses = _fastopt_run("rosenbrock", {"line_search_fn": "strong_wolfe"}, steps=5)
    assert _rosenbrock(np.concatenate(ps)) < 1e-8
    x0, f, grad = _problem("logistic")
    w = x0.astype(np.float32)
    opt = fo.LBFGS([w], history_size=5)
    for _ in range(5):
        opt.step(lambda: (f(w.astype(np.float64)), [grad(w.astype(np.float64)).astype(np.float32)]))
    assert w.dtype == np.float32 and opt.state["d"].dtype == np.float32
    assert np.abs(grad(w.astype(np.float64))).max() < 1e-4


def test_fastopt_torch_lbfgs_matches_torch_and_loads_its_state():
    torch.manual_seed(0)
    X = torch.randn(30, 5, dtype=torch.float64)
    y = (X.sum(1) > 0).double()
    models = [torch.nn.Linear(5, 1).double() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    import fastopt.torch as fot

    opts = [torch.optim.LBFGS(models[0].parameters(), history_size=4, line_search_fn="strong_wolfe",
                              max_iter=6),
            fot.LBFGS(models[1].parameters(), history_size=4, line_search_fn="strong_wolfe",
                      max_iter=6)]

    def closure_of(m, o):
        def closure():
            o.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(m(X).squeeze(1), y)
            loss.backward()
            return loss
        return closure

    for t in range(4):
        if t == 2:  # torch's state_dict loads into fastopt.torch.LBFGS
            import copy
            opts[1].load_state_dict(copy.deepcopy(opts[0].state_dict()))
            models[1].load_state_dict(models[0].state_dict())
        out = [o.step(closure_of(m, o)) for m, o in zip(models, opts)]
        assert isinstance(out[1], torch.Tensor)
        np.testing.assert_allclose(float(out[1]), float(out[0]), **TOL["lbfgs-torch"])
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(b, a, **TOL["lbfgs-torch"])
    st = opts[1].state[next(models[1].parameters())]
    assert {"d", "t", "old_dirs", "old_stps", "ro", "H_diag", "prev_flat_grad", "prev_loss",
            "n_iter", "func_evals"} <= set(st)
    with pytest.raises(ValueError, match="parameter groups"):
        fot.LBFGS([{"params": [models[1].weight]}, {"params": [models[1].bias]}])


def test_state_dict_and_checkpoint_resume(tmp_path):
    opts = {"line_search_fn": "strong_wolfe", "history_size": 3, "max_iter": 4}
    ps, opt, _ = _fastopt_run("logistic", opts, steps=3)
    fo.save(opt, tmp_path / "lbfgs.npz")
    sd = opt.state_dict()
    assert sd["state"][0]["old_dirs"].shape == (3, 7)
    x0, f, grad = _problem("logistic")
    for load in ("state_dict", "file"):
        qs = [np.zeros(SPLIT[0]), np.zeros(SPLIT[1])]
        opt2 = fo.LBFGS(qs, **opts)
        if load == "file":
            fo.load(opt2, tmp_path / "lbfgs.npz")
        else:
            opt2.load_state_dict(sd)
            for q, p in zip(qs, ps):
                q[...] = p
        for o, arrs in ((opt2, qs),):
            def closure(arrs=arrs):
                x = np.concatenate(arrs)
                g = grad(x)
                return f(x), [g[:SPLIT[0]].copy(), g[SPLIT[0]:].copy()]
            o.step(closure)
        ref = [p.copy() for p in ps]
        opt_ref = fo.LBFGS(ref, **opts)
        opt_ref.load_state_dict(sd)

        def closure_ref():
            x = np.concatenate(ref)
            g = grad(x)
            return f(x), [g[:SPLIT[0]].copy(), g[SPLIT[0]:].copy()]
        opt_ref.step(closure_ref)
        for a, b in zip(qs, ref):
            np.testing.assert_array_equal(a, b)
    bad = opt.state_dict()
    bad["state"][0]["ro"] = bad["state"][0]["ro"][:1]
    with pytest.raises(ValueError, match="old_dirs"):
        opt.load_state_dict(bad)
    bad = opt.state_dict()
    bad["state"][0]["d"][0] = np.nan
    with pytest.raises(ValueError, match="d: expected finite"):
        opt.load_state_dict(bad)


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
def test_failing_closure_leaves_params_and_state(line_search_fn):
    """The 2nd call fails: after a move of the params (None) or at a trial point (Wolfe)."""
    x0, f, grad = _problem("logistic")
    w = x0.copy()
    opt = fo.LBFGS([w], line_search_fn=line_search_fn, max_iter=2)
    opt.step(lambda: (f(w), [grad(w)]))
    before, st = w.copy(), opt.state
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return f(w), [grad(w)]

    with pytest.raises(RuntimeError, match="boom"):
        opt.step(flaky)
    np.testing.assert_array_equal(w, before)
    assert opt.state["func_evals"] == st["func_evals"] and opt.state["d"] is st["d"]


def test_bad_input():
    w = np.ones(3)
    opt = fo.LBFGS([w])
    assert opt.backend == "numpy"  # "auto": the NumPy two-loop (docs/design.md)
    cases = [
        (lambda: 1.0, TypeError, "closure: expected it to return a pair \\(loss, grads\\)"),
        (lambda: (1.0, [np.ones(4)]), ValueError, "grads\\[0\\]: expected a numpy array of shape \\(3,\\)"),
        (lambda: (1.0, [np.ones(3), np.ones(3)]), ValueError, "expected 1 grads"),
        (lambda: ("x", [np.ones(3)]), TypeError, "real number as the loss"),
        (lambda: (1.0, [np.ones(3, np.float32)]), ValueError, "dtype float64"),
    ]
    for closure, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            opt.step(closure)
        np.testing.assert_array_equal(w, 1.0)
    with pytest.raises(TypeError, match="closure: expected a callable"):
        opt.step(None)
    for kw, exc, msg in [({"lr": -1.0}, ValueError, "lr"),
                         ({"max_iter": 0}, ValueError, "max_iter: expected an int >= 1"),
                         ({"history_size": 1.5}, ValueError, "history_size"),
                         ({"line_search_fn": "armijo"}, ValueError, "line_search_fn"),
                         ({"tolerance_grad": -1.0}, ValueError, "tolerance_grad"),
                         ({"clip_norm": 1.0}, ValueError, "clip_norm: LBFGS does not take"),
                         ({"nonfinite": "skip"}, ValueError, "nonfinite: LBFGS does not take"),
                         ({"state_dtype": "q8"}, ValueError, "state_dtype"),
                         ({"momentum": 0.9}, TypeError, "momentum"),
                         ({"backend": "cupy"}, ValueError, "backend")]:
        with pytest.raises(exc, match=msg):
            fo.LBFGS([np.ones(3)], **kw)
    with pytest.raises(ValueError, match="parameter groups"):
        fo.LBFGS([{"params": [np.ones(2)]}, {"params": [np.ones(2)]}])
    with pytest.raises(TypeError, match="float32 or float64"):
        fo.LBFGS([np.ones(3, np.float16)])
