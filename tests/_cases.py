"""The one table of optimizers that drives the tests: one ``OptimInfo`` record per rule.

As torch's ``optim_db`` (``torch/testing/_internal/common_optimizers.py``), each
record holds everything the tests need to know about one rule beyond the rule
record itself (``fastopt._rules.RULES``):

* ``cases`` -- the option sets worth testing against the NumPy reference (each
  variant flag and each pipeline step at least once);
* ``oracle`` -- option sets compared with ``torch.optim.<torch>`` (``torch`` is
  None where torch has no such optimizer);
* ``converge`` / ``converge_atol`` -- options that reach a quadratic's minimum;
  ``rosen`` -- ``(options, steps)`` that reach Rosenbrock's;
* ``strategy`` -- the hypothesis draws of the rule's own hyperparameters;
* ``bench`` -- the benchmark's options (``fastopt.apps.benchkit.BENCH_OPTIONS``).

The extra input of a step (AdaHessian's Hessian diagonal, Newton's Hessian) is
generated from ``Rule.extra``/``Rule.extra_shape``, never from a rule's name.
Every list the test modules parametrize over (``CASES``, ``ORACLE``,
``CONVERGE``, ``ROSEN``) and the hypothesis strategy ``rule_options`` are
derived from ``INFOS``.  ``TOL`` is the one tolerance table of every comparison
between a compiled backend and the NumPy reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from hypothesis import strategies as st

import fastopt
from fastopt._optim import OPTIMIZERS
from fastopt._rules import RULES, Rule
from fastopt.apps.benchkit import BENCH_OPTIONS, TORCH_CLASSES


@dataclass(frozen=True)
class Case:
    """One option set of a rule; ``pipeline`` marks the sets that exercise the step pipeline."""

    id: str
    options: dict
    pipeline: bool = False


@dataclass(frozen=True)
class OptimInfo:
    """Everything the tests know about one rule (see the module docstring)."""

    rule: str
    cases: tuple
    converge: tuple
    rosen: tuple
    oracle: tuple = ()
    converge_atol: float = 1e-2
    strategy: Callable | None = None  # (draw) -> the rule's own hyperparameters
    bench: dict = field(default_factory=dict)

    @property
    def spec(self) -> Rule:
        return RULES[self.rule]

    @property
    def cls(self):
        return OPTIMIZERS[self.rule]

    @property
    def torch(self) -> str | None:
        return TORCH_CLASSES.get(self.rule)


# --------------------------------------------------------------------------- hypothesis draws


def _sgd_draws(draw):
    o = {"momentum": draw(st.sampled_from([0.0, 0.5, 0.9]))}
    o["nesterov"] = o["momentum"] > 0 and draw(st.booleans())
    o["dampening"] = 0.0 if o["nesterov"] else draw(st.sampled_from([0.0, 0.5]))
    return o


def _adam_draws(draw):
    return {"amsgrad": draw(st.booleans()), "bias_correction": draw(st.booleans())}


def _lamb_draws(draw):
    return {"bias_correction": draw(st.booleans())}


def _lars_draws(draw):
    return {"momentum": draw(st.sampled_from([0.0, 0.9])), "nesterov": draw(st.booleans()),
            "trust_coefficient": draw(st.sampled_from([1e-3, 0.1])),
            "trust_ratio": draw(st.booleans())}


def _adagrad_draws(draw):
    return {"lr_decay": draw(st.floats(0.0, 0.1)),
            "initial_accumulator_value": draw(st.floats(0.0, 1.0))}


def _rmsprop_draws(draw):
    return {"alpha": draw(st.floats(0.0, 0.999)), "momentum": draw(st.sampled_from([0.0, 0.9])),
            "centered": draw(st.booleans())}


def _adadelta_draws(draw):
    return {"rho": draw(st.floats(0.0, 0.99))}


def _nadam_draws(draw):
    return {"momentum_decay": draw(st.floats(0.0, 0.01))}


def _adahessian_draws(draw):
    return {"hessian_power": draw(st.floats(0.1, 1.0))}


def _asgd_draws(draw):
    return {"lambd": draw(st.sampled_from([0.0, 1e-4, 0.1])), "alpha": draw(st.floats(0.0, 1.0)),
            "t0": draw(st.sampled_from([0.0, 2.0, 1e6]))}


def _rprop_draws(draw):
    return {"etas": (draw(st.floats(0.1, 0.9)), draw(st.floats(1.1, 2.0))),
            "step_sizes": (draw(st.sampled_from([0.0, 1e-6])), draw(st.floats(0.1, 50.0)))}


def _adabelief_draws(draw):
    return {"nesterov": draw(st.booleans()), "eps_root": draw(st.sampled_from([0.0, 1e-16, 1e-8]))}


def _yogi_draws(draw):
    return {"initial_accumulator_value": draw(st.sampled_from([0.0, 1e-6, 0.1]))}


def _ademamix_draws(draw):
    return {"betas": (draw(st.floats(0.1, 0.99)), draw(st.floats(0.9, 0.9999)),
                      draw(st.floats(0.9, 0.9999))),
            "alpha": draw(st.floats(0.0, 8.0)), "t_alpha": draw(st.sampled_from([None, 3, 100])),
            "t_beta3": draw(st.sampled_from([None, 3, 100]))}


def _sf_common_draws(draw):
    return {"warmup_steps": draw(st.sampled_from([0, 1, 3])), "r": draw(st.sampled_from([0.0, 0.5, 1.0])),
            "weight_lr_power": draw(st.sampled_from([0.0, 1.0, 2.0]))}


def _sf_adamw_draws(draw):
    # beta1 > 0: eval() moves the params by 1 - 1/beta1
    return {**_sf_common_draws(draw), "betas": (draw(st.floats(0.1, 0.99)), draw(st.floats(0.9, 0.9999)))}


def _sf_sgd_draws(draw):
    return {**_sf_common_draws(draw), "momentum": draw(st.floats(0.1, 0.95))}


def _newton_draws(draw):
    return {"damping": draw(st.floats(1e-4, 1.0))}


def _muon_draws(draw):
    return {"momentum": draw(st.sampled_from([0.0, 0.3, 0.5, 0.95])), "nesterov": draw(st.booleans()),
            "adjust_lr_fn": draw(st.sampled_from([None, "original", "match_rms_adamw"])),
            "ns_steps": draw(st.integers(0, 6))}


def _adafactor_draws(draw):
    return {"beta2_decay": draw(st.sampled_from([-0.8, -0.5, 0.0])),
            "eps": (draw(st.sampled_from([None, 1e-30, 1e-8])), draw(st.sampled_from([1e-3, 0.0]))),
            "d": draw(st.sampled_from([1.0, 1.5]))}


# --------------------------------------------------------------------------- the table

_cosine = fastopt.schedules.cosine_decay

_RECORDS = [
    OptimInfo(
        "sgd",
        cases=(Case("sgd", {"lr": 0.1}),
               Case("sgd-momentum-wd", {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}),
               Case("sgd-nesterov", {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
               Case("sgd-ema", {"lr": 0.1, "momentum": 0.9, "dampening": 0.9}),
               Case("sgd-all-pipeline", {"lr": 0.1, "momentum": 0.5, "clip_value": 0.2,
                                         "clip_norm": 1.0, "clip_global_norm": 0.5,
                                         "maximize": True, "weight_clip": 1.0}, pipeline=True)),
        oracle=(dict(lr=0.1), dict(lr=0.1, momentum=0.9, weight_decay=0.01),
                dict(lr=0.1, momentum=0.9, nesterov=True),
                dict(lr=0.1, momentum=0.9, dampening=0.5, maximize=True)),
        converge=(dict(lr=0.1), dict(lr=0.05, momentum=0.9, nesterov=True)),
        rosen=(dict(lr=1e-3, momentum=0.9), 20000),
        strategy=_sgd_draws),
    OptimInfo(
        "adam",
        cases=(Case("adam", {"lr": 1e-2}),
               Case("adam-amsgrad-wd", {"lr": 1e-2, "weight_decay": 0.1, "amsgrad": True}),
               Case("adam-nobc-maximize", {"lr": 1e-2, "bias_correction": False, "maximize": True}),
               Case("adam-clipvalue-weightclip", {"lr": 1e-2, "clip_value": 0.5, "weight_clip": 0.9},
                    pipeline=True),
               Case("adam-clipnorm", {"lr": 1e-2, "clip_norm": 0.3}, pipeline=True),
               Case("adam-globalnorm-maxnorm", {"lr": 1e-2, "clip_global_norm": 0.5, "max_norm": 2.0},
                    pipeline=True)),
        oracle=(dict(lr=1e-2), dict(lr=1e-2, weight_decay=0.1, amsgrad=True),
                dict(lr=1e-2, maximize=True)),
        converge=(dict(lr=0.05),),
        rosen=(dict(lr=0.02), 6000),
        strategy=_adam_draws),
    OptimInfo(
        "adamw",
        cases=(Case("adamw", {"lr": 1e-2, "weight_decay": 0.1}),
               Case("adamw-amsgrad", {"lr": 1e-2, "amsgrad": True})),
        oracle=(dict(lr=1e-2, weight_decay=0.1), dict(lr=1e-2, amsgrad=True)),
        converge=(dict(lr=0.05, weight_decay=1e-4),),
        rosen=(dict(lr=0.02, weight_decay=0.0), 6000),
        strategy=_adam_draws),
    OptimInfo(
        "adagrad",
        cases=(Case("adagrad", {"lr": 0.1, "lr_decay": 0.01, "weight_decay": 0.01,
                                "initial_accumulator_value": 0.1}),),
        oracle=(dict(lr=0.1, lr_decay=0.01, weight_decay=0.01, initial_accumulator_value=0.1),),
        converge=(dict(lr=0.5),),
        rosen=(dict(lr=0.5), 20000),
        strategy=_adagrad_draws),
    OptimInfo(
        "rmsprop",
        cases=(Case("rmsprop", {"lr": 1e-2}),
               Case("rmsprop-centered-momentum", {"lr": 1e-2, "momentum": 0.9, "centered": True,
                                                  "weight_decay": 0.01})),
        oracle=(dict(lr=1e-2), dict(lr=1e-2, momentum=0.9, centered=True, weight_decay=0.01)),
        converge=(dict(lr=0.01),),
        rosen=(dict(lr=1e-3), 20000),
        strategy=_rmsprop_draws),
    OptimInfo(
        "adadelta",
        cases=(Case("adadelta", {"lr": 1.0, "weight_decay": 0.01}),),
        oracle=(dict(lr=1.0, weight_decay=0.01),),
        converge=(dict(lr=10.0),),
        # Adadelta stalls in Rosenbrock's valley at a fixed lr; annealed, it gets there
        rosen=(dict(lr=_cosine(1.0, 20000), rho=0.95, eps=1e-4), 20000),
        strategy=_adadelta_draws),
    OptimInfo(
        "adamax",
        cases=(Case("adamax", {"lr": 1e-2, "weight_decay": 0.01}),),
        oracle=(dict(lr=1e-2, weight_decay=0.01),),
        converge=(dict(lr=0.05),),
        rosen=(dict(lr=0.02), 20000)),
    OptimInfo(
        "nadam",
        cases=(Case("nadam", {"lr": 1e-2, "weight_decay": 0.01}),),
        oracle=(dict(lr=1e-2, weight_decay=0.01),),
        converge=(dict(lr=0.05),),
        rosen=(dict(lr=0.02), 6000),
        strategy=_nadam_draws),
    OptimInfo(
        "radam",
        cases=(Case("radam", {"lr": 1e-2, "weight_decay": 0.01}),),  # 7 steps cross rho_t > 5 at t=6
        oracle=(dict(lr=1e-2, weight_decay=0.01),),
        converge=(dict(lr=0.05),),
        # RAdam's first un-adapted steps are lr * m: a steep start needs a small lr
        rosen=(dict(lr=3e-3), 20000)),
    OptimInfo(
        "lion",
        cases=(Case("lion", {"lr": 1e-3, "weight_decay": 0.1}),),
        converge=(dict(lr=0.01),),
        converge_atol=0.05,  # Lion moves by lr*sign: it hovers within ~lr of the minimum
        rosen=(dict(lr=1e-3), 6000)),
    OptimInfo(
        "lamb",
        cases=(Case("lamb", {"lr": 1e-2, "weight_decay": 0.01}),),
        # LAMB's step is ~lr*|p| whatever the gradient: it needs a decaying lr to settle
        converge=(dict(lr=_cosine(0.05, 3000)),),
        rosen=(dict(lr=_cosine(0.01, 8000)), 8000),
        strategy=_lamb_draws),
    OptimInfo(
        "adahessian",
        cases=(Case("adahessian", {"lr": 0.1, "weight_decay": 0.01, "hessian_power": 0.5}),),
        converge=(dict(lr=0.3),),
        rosen=(dict(lr=0.1, hessian_power=0.5), 8000),
        strategy=_adahessian_draws),
    OptimInfo(
        "newton",
        cases=(Case("newton", {"lr": 0.5, "damping": 1e-2}),),
        converge=(dict(lr=1.0),),
        rosen=(dict(lr=1.0, damping=1e-3), 200),
        strategy=_newton_draws),
    # ---- torch.optim's ASGD and Rprop
    OptimInfo(
        "asgd",
        # t0=2: mu = 1/(t - 2) from step 4 on, so the averaging path runs (mu == 1 copies)
        cases=(Case("asgd", {"lr": 0.05, "lambd": 0.1, "t0": 2.0, "weight_decay": 0.01}),
               Case("asgd-copy-maximize", {"lr": 0.05, "maximize": True})),
        oracle=(dict(lr=0.05), dict(lr=0.05, lambd=0.1, alpha=0.5, t0=3.0, weight_decay=0.01),
                dict(lr=0.02, t0=0.0, maximize=True)),
        converge=(dict(lr=0.1, t0=10.0),),
        rosen=(dict(lr=1e-3), 20000),
        strategy=_asgd_draws),
    OptimInfo(
        "rprop",
        cases=(Case("rprop", {"lr": 0.01}),
               Case("rprop-bounds-maximize", {"lr": 0.1, "etas": (0.3, 1.5),
                                              "step_sizes": (1e-3, 0.2), "maximize": True}),
               Case("rprop-pipeline", {"lr": 0.01, "clip_value": 0.5, "weight_clip": 2.0,
                                       "clip_global_norm": 1.0}, pipeline=True)),
        oracle=(dict(lr=0.01), dict(lr=0.1, etas=(0.3, 1.5), step_sizes=(1e-3, 0.2)),
                dict(lr=0.01, maximize=True)),
        converge=(dict(lr=0.01),),
        rosen=(dict(lr=1e-3, step_sizes=(1e-9, 0.01)), 20000),
        strategy=_rprop_draws),
    # ---- optax's AdaBelief and Yogi (oracle: tests/test_rules_oracles.py)
    OptimInfo(
        "adabelief",
        cases=(Case("adabelief", {"lr": 1e-2, "weight_decay": 0.01}),
               Case("adabelief-nesterov-eps", {"lr": 1e-2, "nesterov": True, "eps": 1e-8,
                                               "eps_root": 0.0})),
        converge=(dict(lr=0.05),),
        rosen=(dict(lr=0.02), 6000),
        strategy=_adabelief_draws),
    OptimInfo(
        "yogi",
        cases=(Case("yogi", {"lr": 1e-2, "weight_decay": 0.01}),
               Case("yogi-init-maximize", {"lr": 1e-2, "initial_accumulator_value": 0.5,
                                           "maximize": True})),
        converge=(dict(lr=0.05),),
        rosen=(dict(lr=0.02), 6000),
        strategy=_yogi_draws),
    # ---- AdEMAMix (oracle: bitsandbytes' reference, tests/test_rules_oracles.py)
    OptimInfo(
        "ademamix",
        cases=(Case("ademamix", {"lr": 1e-2}),
               Case("ademamix-warmups", {"lr": 1e-2, "betas": (0.9, 0.99, 0.999), "t_alpha": 5,
                                         "t_beta3": 4, "weight_decay": 0.1, "maximize": True})),
        converge=(dict(lr=0.02, alpha=2.0, betas=(0.9, 0.999, 0.99), weight_decay=0.0),),
        # the slow EMA overshoots Rosenbrock's valley unless beta3 is modest and warmed up
        rosen=(dict(lr=0.01, betas=(0.9, 0.999, 0.999), t_alpha=2000, t_beta3=2000,
                    weight_decay=0.0), 8000),
        strategy=_ademamix_draws),
]

# Muon updates 2-D params only: every test makes its params through ``param_shape``.
_RECORDS.append(OptimInfo(
    "muon",
    cases=(Case("muon", {"lr": 0.02}),
           Case("muon-plain-match-wd", {"lr": 0.02, "nesterov": False, "momentum": 0.3,
                                        "adjust_lr_fn": "match_rms_adamw", "weight_decay": 0.01}),
           Case("muon-all-pipeline", {"lr": 0.02, "clip_value": 0.5, "clip_norm": 1.0,
                                      "clip_global_norm": 2.0, "maximize": True, "weight_clip": 1.5,
                                      "max_norm": 20.0}, pipeline=True)),
    oracle=(dict(lr=0.02), dict(lr=0.02, nesterov=False, momentum=0.3, weight_decay=0.0),
            dict(lr=0.02, momentum=0.5, adjust_lr_fn="match_rms_adamw", weight_decay=0.01),
            dict(lr=0.02, adjust_lr_fn="original", ns_steps=3, eps=1e-5,
                 ns_coefficients=(2.0, -1.5, 0.5))),
    # an orthogonalized step has a fixed size (lr * ratio): it needs a decaying lr to settle
    converge=(dict(lr=_cosine(0.3, 3000), weight_decay=0.0),),
    rosen=(dict(lr=_cosine(0.02, 20000), weight_decay=0.0, momentum=0.9), 20000),
    strategy=_muon_draws))

# Adafactor (torch.optim.Adafactor; its own tests: tests/test_adafactor.py).  Its state is not
# param-shaped: ``param_shape`` gives it matrices (factored row_var/col_var) for every size but
# 1, which stays a vector (full variance), so the table-driven tests run both state layouts.
_RECORDS.append(OptimInfo(
    "adafactor",
    cases=(Case("adafactor", {"lr": 1e-2}),
           Case("adafactor-wd-eps-d", {"lr": 0.05, "weight_decay": 0.1, "eps": (1e-20, 1e-3),
                                       "d": 1.5, "beta2_decay": -0.5, "maximize": True}),
           Case("adafactor-all-pipeline", {"lr": 1e-2, "clip_value": 0.5, "clip_norm": 1.0,
                                           "clip_global_norm": 2.0, "weight_clip": 1.5,
                                           "max_norm": 20.0}, pipeline=True)),
    oracle=(dict(), dict(lr=0.05, weight_decay=0.1, maximize=True),
            dict(lr=0.05, eps=(1e-20, 1e-3), d=1.5, beta2_decay=-0.5)),
    converge=(dict(lr=0.1),),
    rosen=(dict(lr=0.02), 8000),
    strategy=_adafactor_draws))

# ---- Schedule-Free AdamW and SGD (oracle: schedulefree 1.4.1, tests/test_rules_sf.py).
# The params hold y (train mode) throughout these tests; momentum 0.5 and r = 1 reach both of
# torch's lerp forms (weights above and below 1/2).
_RECORDS += [
    OptimInfo(
        "schedule_free_adamw",
        cases=(Case("sf-adamw", {"lr": 1e-2, "weight_decay": 0.01, "warmup_steps": 3}),
               Case("sf-adamw-r-power-maximize", {"lr": 1e-2, "r": 0.5, "weight_lr_power": 1.0,
                                                  "betas": (0.8, 0.99), "maximize": True})),
        converge=(dict(lr=0.05),),
        rosen=(dict(lr=0.003, betas=(0.9, 0.99)), 8000),
        strategy=_sf_adamw_draws),
    OptimInfo(
        "schedule_free_sgd",
        cases=(Case("sf-sgd", {"lr": 0.1, "weight_decay": 0.01, "warmup_steps": 2}),
               Case("sf-sgd-r-maximize", {"lr": 0.1, "momentum": 0.5, "r": 1.0,
                                          "maximize": True})),
        converge=(dict(lr=0.1),),
        # r = 1 weights the late iterates up: the average settles in Rosenbrock's valley
        rosen=(dict(lr=1.5e-3, momentum=0.9, r=1.0), 20000),
        strategy=_sf_sgd_draws),
]

# LARS (optax.lars's semantics; its optax oracle is tests/test_lars.py).  Like LAMB its step is
# ~lr*trust_coefficient*|p| whatever the gradient: the problems use trust_coefficient 1 and a
# decaying lr.
_RECORDS += [
    OptimInfo(
        "lars",
        cases=(Case("lars", {"lr": 0.1, "weight_decay": 0.01, "trust_coefficient": 0.1}),
               Case("lars-nesterov-eps", {"lr": 0.1, "nesterov": True, "eps": 1e-3,
                                          "trust_coefficient": 0.05, "momentum": 0.5})),
        converge=(dict(lr=_cosine(0.05, 3000), trust_coefficient=1.0),),
        rosen=(dict(lr=_cosine(0.01, 8000), trust_coefficient=1.0), 8000),
        strategy=_lars_draws),
]

#: rule -> its record, in the rule table's order.
INFOS: dict[str, OptimInfo] = {}
for _info in _RECORDS:
    INFOS[_info.rule] = OptimInfo(**{**_info.__dict__, "bench": dict(BENCH_OPTIONS.get(_info.rule, {}))})
del _info

# --------------------------------------------------------------------------- derived lists

#: (rule, options, id): every record's own option sets, then the pipeline ones.
CASES = ([(i.rule, c.options, c.id) for i in INFOS.values() for c in i.cases if not c.pipeline]
         + [(i.rule, c.options, c.id) for i in INFOS.values() for c in i.cases if c.pipeline])
CASE_IDS = [c[2] for c in CASES]

#: (torch.optim class name, options): compared with torch.optim in float64.
ORACLE = [(i.torch, o) for i in INFOS.values() if i.torch for o in i.oracle]

#: (optimizer class, options, atol): minimises a quadratic.
CONVERGE = [(i.cls, o, i.converge_atol) for i in INFOS.values() for o in i.converge]

#: class name -> (options, steps): minimises Rosenbrock's function.
ROSEN = {i.spec.class_name: i.rosen for i in INFOS.values()}

#: rule -> the benchmark's options (lower learning rates, so millions of steps stay finite).
BENCH = {r: i.bench for r, i in INFOS.items()}


_opt_float = lambda lo, hi: st.one_of(st.none(), st.floats(lo, hi))  # noqa: E731


@st.composite
def rule_options(draw, rule, lr=None, pipeline=True):
    """In-range hyperparameters of ``rule`` (away from the edges where float32 is meaningless).

    The hyperparameters many rules share are drawn here, by their presence in the
    rule's defaults; the rule's own ones by its record's ``strategy``.
    """
    info = INFOS[rule]
    d = info.spec.defaults
    o = {"lr": draw(st.floats(1e-4, 0.1)) if lr is None else lr}
    if "betas" in d:
        o["betas"] = (draw(st.floats(0.0, 0.99)), draw(st.floats(0.9, 0.9999)))
    if "eps" in d:
        o["eps"] = draw(st.floats(1e-8, 1e-3))
    if "weight_decay" in d:
        o["weight_decay"] = draw(st.sampled_from([0.0, 0.01, 0.1]))
    if info.strategy is not None:
        o.update(info.strategy(draw))
    if pipeline:
        o["maximize"] = draw(st.booleans())
        o["clip_value"] = draw(_opt_float(0.1, 3.0))
        o["clip_norm"] = draw(_opt_float(0.1, 10.0))
        o["clip_global_norm"] = draw(_opt_float(0.1, 10.0))
        o["weight_clip"] = draw(_opt_float(0.5, 3.0))
        o["max_norm"] = draw(_opt_float(0.5, 20.0))
    return o


# --------------------------------------------------------------------------- problems

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
    # float16 params (computed in float32, one rounding per write): two implementations that
    # both round once per write agree bit for bit until their float32 arithmetic differs in
    # the last float32 bit (an FMA, sqrt(v)/sqrt(bc2) against sqrt(v/bc2)) right at a float16
    # rounding midpoint: then the param differs by one float16 ulp (2**-10 relative, 9.8e-4)
    # and the later steps carry that on; 2 ulps over 7 to 20 steps, atol one subnormal-range
    # an element that crossed 0 keeps the absolute error of its O(1) past: atol is 2 ulps of 1.
    np.dtype(np.float16): dict(rtol=2 * 2.0 ** -10, atol=2 * 2.0 ** -10),
}
try:  # bfloat16 (ml_dtypes, the bf16 extra): the same argument with bfloat16's 8-bit
    # significand, ulp 2**-7 relative at most: 2 ulps.
    import ml_dtypes as _ml_dtypes

    TOL[np.dtype(_ml_dtypes.bfloat16)] = dict(rtol=2 * 2.0 ** -7, atol=2 * 2.0 ** -7)
except ImportError:  # pragma: no cover - the bf16 extra is part of the test extras
    pass
#: torch oracles of the rules outside the table (their tests are tests/test_sparse_adam.py and
#: tests/test_lbfgs.py), float64.  SparseAdam: torch's coalesce may add a row's duplicates in
#: another order than fastopt's order of appearance (one rounding each), else the same ops.
#: LBFGS: torch's dot products (its own BLAS-1 loops) and fused add-with-alpha round
#: differently from NumPy's; over 20 steps of up to 20 iterations and a line search those
#: last-bit differences grow to ~1e-11 relative on the well-conditioned test problems.
TOL["sparse-adam-torch"] = dict(rtol=1e-12, atol=1e-13)
TOL["lbfgs-torch"] = dict(rtol=1e-8, atol=1e-9)
#: torch.optim.Muon/Adafactor on bfloat16 params (every operation in bfloat16) against fastopt
#: with state_dtype="param" (bf16 state, float32 arithmetic, one rounding per write), over 5
#: steps of O(1) params (|p| < 4, where a bfloat16 ulp is at most 2**-6): where the two updates
#: differ, the param can round to the other neighbour, one ulp per step at most.  Muon: torch's
#: Newton-Schulz in bfloat16 has errors of 1-2% in its O(1) entries, times lr*ratio ~0.05-0.09,
#: ~0.002 a step on top: 5 steps * 2**-6 (measured 2**-5).  Adafactor: its bf16 update is
#: alpha*u with ~0.5% error, far below a param ulp: one ulp in all (measured 2**-8).
TOL["muon-torch-bf16"] = dict(rtol=0, atol=5 * 2.0 ** -6)
TOL["adafactor-torch-bf16"] = dict(rtol=0, atol=2.0 ** -6)
#: torch.optim.SparseAdam on a bfloat16 embedding (moments and every operation in bfloat16)
#: against fastopt.torch.SparseAdam (float32 arithmetic on the touched rows, one rounding per
#: write; bfloat16 or float32 moments): the updates (lr * ~1) differ by ~1% where torch's
#: bfloat16 moments and quotient round, far below a param ulp, but an element near a rounding
#: midpoint can land on the other neighbour, and keeps that ulp afterwards.  O(1) params
#: (|p| < 4, ulp <= 2**-6), 6 steps: 2 ulps (measured 2**-7 over 4 seeds).
TOL["sparse-adam-torch-bf16"] = dict(rtol=0, atol=2 * 2.0 ** -6)
STEPS = 7
SIZES = (1, 7, 278011)
#: The largest tensor of a rule whose extra input is an ``(n, n)`` matrix (Newton's Hessian).
SQUARE_EXTRA_MAX = 7
NEWTON_SIZES = (1, 3, 7)


#: The rules whose ``step()`` takes an extra per-tensor input (``Rule.extra``).
EXTRA_RULES = [r for r, rule in RULES.items() if rule.extra is not None]


def takes_extra(rule: str) -> bool:
    """Whether ``step()`` of ``rule`` takes a second per-tensor input."""
    return RULES[rule].extra is not None


def cap_shape(rule: str, shape: tuple) -> tuple:
    """``shape``, or ``(SQUARE_EXTRA_MAX,)`` when the rule's extra input is ``(n, n)`` and the
    tensor has more elements than that (a dense Hessian grows as n squared)."""
    if takes_extra(rule) and RULES[rule].extra_shape == "square":
        return shape if int(np.prod(shape)) <= SQUARE_EXTRA_MAX else (SQUARE_EXTRA_MAX,)
    return shape


def cap_sizes(rule: str, sizes):
    """``sizes`` (element counts of flat tensors) through :func:`cap_shape`."""
    return [cap_shape(rule, (s,))[0] for s in sizes]


def extra_input(rule: str, p: np.ndarray, rng) -> np.ndarray | None:
    """The extra input of ``rule`` for param ``p``, shaped by ``Rule.extra_shape``; None without one.

    ``"param"``: a standard normal array like ``p`` (a Hessian diagonal estimate);
    ``"square"``: a symmetric positive definite ``(n, n)`` matrix for an ``n``-element ``p``.
    """
    r = RULES[rule]
    if r.extra is None:
        return None
    if r.extra_shape == "square":
        n = p.size
        a = rng.standard_normal((n, n))
        return (a @ a.T / n + np.eye(n)).astype(p.dtype)
    return rng.standard_normal(p.shape).astype(p.dtype)


def extra_from_hessian(rule: str, h: np.ndarray) -> np.ndarray | None:
    """What ``rule`` takes as its extra input given a problem's full Hessian ``h``.

    ``"square"``: ``h`` itself; ``"param"``: ``|diag(h)|`` (a diagonal curvature
    estimate is taken positive, as AdaHessian's Hutchinson estimate squared is).
    """
    r = RULES[rule]
    if r.extra is None:
        return None
    if r.extra_shape == "square":
        return h
    return np.abs(np.diag(h)).copy()


def param_shape(rule: str, size: int) -> tuple:
    """The shape of a test param of ``size`` elements: ``(size,)``, or for a rule that takes
    2-D params only (``Rule.param_ndim``, Muon) the most nearly square ``(rows, cols)`` with
    ``rows >= cols`` (7 -> (7, 1), 1001 -> (77, 13)): tall, wide after a transpose, and 1-wide
    matrices all occur."""
    if RULES[rule].param_ndim != 2 and (RULES[rule].state_shape is None or size == 1):
        return (size,)
    cols = max(d for d in range(1, int(size ** 0.5) + 1) if size % d == 0)
    return (size // cols, cols)


def as_param(rule: str, x: np.ndarray) -> np.ndarray:
    """``x`` (1-D) as a view of the shape the rule's params need (see :func:`param_shape`)."""
    return x.reshape(param_shape(rule, x.size))


def make_problem(rule: str, sizes, dtype, seed: int = 0, steps: int = STEPS):
    """Params and, per step, grads (and extras) for a parity run."""
    rng = np.random.default_rng(seed)
    sizes = [param_shape(rule, s) for s in cap_sizes(rule, sizes)]
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


def step(opt, grads, extras=None, **kw):
    """``opt.step`` with the extra input when the rule takes one."""
    if opt.rule.extra is not None:
        return opt.step(grads, extras, **kw)
    return opt.step(grads, **kw)


def run(rule: str, options: dict, params, grads, extras, backend: str):
    """Steps an optimizer of ``rule`` on copies of ``params``; returns (params, state_dict)."""
    ps = [p.copy() for p in params]
    opt = OPTIMIZERS[rule](ps, backend=backend, **options)
    for g, e in zip(grads, extras):
        step(opt, g, e)
    return ps, opt.state_dict()


def assert_parity(rule, options, sizes, dtype, backend, seed=0):
    """Compare params and every state array of ``backend`` with the NumPy reference."""
    params, grads, extras = make_problem(rule, sizes, dtype, seed)
    want_p, want_sd = run(rule, options, params, grads, extras, "numpy")
    got_p, got_sd = run(rule, options, params, grads, extras, backend)
    assert_same_run(want_p, want_sd, got_p, got_sd, dtype)


def assert_same_run(want_p, want_sd, got_p, got_sd, dtype):
    """Two runs agree: params (host arrays) and every state array within ``TOL``, and the
    step count and group state exactly (both are host arithmetic, the same on every backend)."""
    tol = TOL[np.dtype(dtype)]
    assert len(got_p) == len(want_p)
    for i, (w, g) in enumerate(zip(want_p, got_p)):
        assert g.dtype == w.dtype
        np.testing.assert_allclose(g, w, err_msg=f"params[{i}]", **tol)
    assert got_sd["step_count"] == want_sd["step_count"], "step_count"
    assert got_sd["group_state"] == want_sd["group_state"], "group_state"
    assert set(got_sd["state"]) == set(want_sd["state"]), "state: tensors with state"
    for i, st_ in want_sd["state"].items():
        assert set(got_sd["state"][i]) == set(st_), f"state[{i}]: names"
        for name, w in st_.items():
            g = got_sd["state"][i][name]
            np.testing.assert_allclose(g, w, err_msg=f"state[{i}][{name}]", **tol)


__all__ = ["Case", "OptimInfo", "INFOS", "CASES", "CASE_IDS", "ORACLE", "CONVERGE", "ROSEN", "BENCH",
           "rule_options", "TOL", "STEPS", "SIZES", "SQUARE_EXTRA_MAX", "NEWTON_SIZES",
           "EXTRA_RULES", "takes_extra", "cap_shape", "param_shape", "as_param", "cap_sizes", "extra_input", "extra_from_hessian", "make_problem",
           "make_feed", "step", "run", "assert_parity", "assert_same_run", "fastopt"]
