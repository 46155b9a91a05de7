"""The one table of rules and option sets that drives parity, dtype, dispatch and bench tests.

``CASES`` lists every rule with the option sets worth testing (each variant
flag and each pipeline step at least once).  ``TOL`` is the one tolerance
table of every comparison between a compiled backend and the NumPy reference.
"""

from __future__ import annotations

import numpy as np

import fastopt
from fastopt._optim import OPTIMIZERS

# (rule, options, id)
CASES = [
    ("sgd", {"lr": 0.1}, "sgd"),
    ("sgd", {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}, "sgd-momentum-wd"),
    ("sgd", {"lr": 0.1, "momentum": 0.9, "nesterov": True}, "sgd-nesterov"),
    ("sgd", {"lr": 0.1, "momentum": 0.9, "dampening": 0.9}, "sgd-ema"),
    ("adam", {"lr": 1e-2}, "adam"),
    ("adam", {"lr": 1e-2, "weight_decay": 0.1, "amsgrad": True}, "adam-amsgrad-wd"),
    ("adam", {"lr": 1e-2, "bias_correction": False, "maximize": True}, "adam-nobc-maximize"),
    ("adamw", {"lr": 1e-2, "weight_decay": 0.1}, "adamw"),
    ("adamw", {"lr": 1e-2, "amsgrad": True}, "adamw-amsgrad"),
    ("adagrad", {"lr": 0.1, "lr_decay": 0.01, "weight_decay": 0.01,
                 "initial_accumulator_value": 0.1}, "adagrad"),
    ("rmsprop", {"lr": 1e-2}, "rmsprop"),
    ("rmsprop", {"lr": 1e-2, "momentum": 0.9, "centered": True, "weight_decay": 0.01},
     "rmsprop-centered-momentum"),
    ("adadelta", {"lr": 1.0, "weight_decay": 0.01}, "adadelta"),
    ("adamax", {"lr": 1e-2, "weight_decay": 0.01}, "adamax"),
    ("nadam", {"lr": 1e-2, "weight_decay": 0.01}, "nadam"),
    ("radam", {"lr": 1e-2, "weight_decay": 0.01}, "radam"),  # 7 steps cross rho_t > 5 at t=6
    ("lion", {"lr": 1e-3, "weight_decay": 0.1}, "lion"),
    ("lamb", {"lr": 1e-2, "weight_decay": 0.01}, "lamb"),
    ("adahessian", {"lr": 0.1, "weight_decay": 0.01, "hessian_power": 0.5}, "adahessian"),
    ("newton", {"lr": 0.5, "damping": 1e-2}, "newton"),
    # the pipeline, on Adam
    ("adam", {"lr": 1e-2, "clip_value": 0.5, "weight_clip": 0.9}, "adam-clipvalue-weightclip"),
    ("adam", {"lr": 1e-2, "clip_norm": 0.3}, "adam-clipnorm"),
    ("adam", {"lr": 1e-2, "clip_global_norm": 0.5, "max_norm": 2.0}, "adam-globalnorm-maxnorm"),
    ("sgd", {"lr": 0.1, "momentum": 0.5, "clip_value": 0.2, "clip_norm": 1.0,
             "clip_global_norm": 0.5, "maximize": True, "weight_clip": 1.0}, "sgd-all-pipeline"),
]

CASE_IDS = [c[2] for c in CASES]

#: Tolerances of every compiled-vs-reference comparison: (rtol, atol) per dtype, after
#: STEPS steps.  A fused kernel reorders a few roundings per element per step (a
#: multiply by a host-computed reciprocal, an FMA, sqrt(v)/c against sqrt(v/c)),
#: so the error grows like steps * a few ulp of the dtype.
TOL = {
    # float32: ulp 1.2e-7; 7 steps * ~4 roundings of relative error each ~= 3e-6,
    # doubled for rules that divide by a small sqrt(v) + eps.
    np.dtype(np.float32): dict(rtol=1e-5, atol=1e-6),
    # float64: ulp 2.2e-16; the same count gives ~1e-14.
    np.dtype(np.float64): dict(rtol=1e-12, atol=1e-13),
}
STEPS = 7
SIZES = (1, 7, 278011)
NEWTON_SIZES = (1, 3, 7)  # Newton's Hessian is n*n


def extra_input(rule: str, p: np.ndarray, rng) -> np.ndarray | None:
    """AdaHessian's Hessian diagonal or Newton's (symmetric positive definite) Hessian."""
    if rule == "adahessian":
        return rng.standard_normal(p.shape).astype(p.dtype)
    if rule == "newton":
        n = p.size
        a = rng.standard_normal((n, n))
        return (a @ a.T / n + np.eye(n)).astype(p.dtype)
    return None


def make_problem(rule: str, sizes, dtype, seed: int = 0, steps: int = STEPS):
    """Params and, per step, grads (and extras) for a parity run."""
    rng = np.random.default_rng(seed)
    if rule == "newton":
        sizes = [min(s, 7) for s in sizes]
    params = [rng.standard_normal(s).astype(dtype) for s in sizes]
    grads, extras = [], []
    for _ in range(steps):
        grads.append([rng.standard_normal(s).astype(dtype) for s in sizes])
        extras.append([extra_input(rule, p, rng) for p in params])
    return params, grads, extras


def make_feed(rule: str, sizes, dtype, seed: int = 0, steps: int = STEPS):
    """``make_problem`` as params and one ``(grads, extras or None)`` pair per step."""
    params, grads, extras = make_problem(rule, sizes, dtype, seed, steps)
    return params, [(g, None if e[0] is None else e) for g, e in zip(grads, extras)]


def run(rule: str, options: dict, params, grads, extras, backend: str):
    """Steps an optimizer of ``rule`` on copies of ``params``; returns (params, state_dict)."""
    ps = [p.copy() for p in params]
    opt = OPTIMIZERS[rule](ps, backend=backend, **options)
    for g, e in zip(grads, extras):
        if rule in ("adahessian", "newton"):
            opt.step(g, e)
        else:
            opt.step(g)
    return ps, opt.state_dict()


def assert_parity(rule, options, sizes, dtype, backend, seed=0):
    """Compare params and every state array of ``backend`` with the NumPy reference."""
    params, grads, extras = make_problem(rule, sizes, dtype, seed)
    want_p, want_sd = run(rule, options, params, grads, extras, "numpy")
    got_p, got_sd = run(rule, options, params, grads, extras, backend)
    assert_same_run(want_p, want_sd, got_p, got_sd, dtype)


def assert_same_run(want_p, want_sd, got_p, got_sd, dtype):
    """Params (host arrays) and every state array of two runs agree within ``TOL``."""
    tol = TOL[np.dtype(dtype)]
    for i, (w, g) in enumerate(zip(want_p, got_p)):
        assert g.dtype == w.dtype
        np.testing.assert_allclose(g, w, err_msg=f"params[{i}]", **tol)
    for i, st in want_sd["state"].items():
        for name, w in st.items():
            g = got_sd["state"][i][name]
            np.testing.assert_allclose(g, w, err_msg=f"state[{i}][{name}]", **tol)


__all__ = ["CASES", "CASE_IDS", "TOL", "STEPS", "SIZES", "make_problem", "run", "assert_parity",
           "assert_same_run", "make_feed",
           "fastopt"]
