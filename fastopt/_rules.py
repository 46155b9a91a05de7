"""The table of update rules: hyperparameters, state, checks and host scalars.

Every backend reads this table. A rule's per-element math lives in the
kernels (``fastopt/kernels/reference.py`` defines it, the compiled backends
repeat it once each); what lives here is everything that is *not* per element:

* the hyperparameters and their torch.optim defaults,
* which state arrays a tensor carries (``exp_avg``, ... named as torch names
  them) and their initial value,
* the range checks of every hyperparameter,
* the host scalars of a step (``1 - beta1**t`` and friends), computed once in
  double precision and handed to every kernel as plain Python floats, so no
  backend recomputes them and no float32 kernel sees a float64 promotion.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

#: The epsilon of every norm clip: ``min(1, c / (norm + CLIP_EPS))``.
#: torch.nn.utils.clip_grad_norm_ uses the same 1e-6.
CLIP_EPS = 1e-6

#: Options of the step pipeline (docs/design.md, "Pipeline"), shared by every rule and
#: overridable per param group.
PIPELINE_DEFAULTS = {
    "maximize": False,
    "clip_value": None,
    "clip_norm": None,
    "clip_global_norm": None,
    "weight_clip": None,
    "max_norm": None,
}

NONFINITE_MODES = ("raise", "skip", "ignore")

#: The precision options (``fastopt.precision``), optimizer-wide on every class and
#: taken by every functional rule: the state dtype, float32 master weights of 16-bit
#: params, stochastic rounding of bfloat16 params and the seed of its hash;
#: ``min_8bit_size``: with ``state_dtype="q8"``, tensors of fewer elements keep float32 state.
PRECISION_DEFAULTS = {
    "state_dtype": None,
    "master_weights": False,
    "stochastic_rounding": False,
    "seed": 0,
    "min_8bit_size": 4096,
}


#: The kernel scalar vocabulary.  Every compiled backend passes one scalar array
#: per call whose slot ``KERNEL_SCALAR_SLOT[name]`` holds the value ``name`` (rounded
#: once to the kernel's arithmetic type); kernels read a value by its name's slot and
#: never by a position of their own, so there is exactly one list of positions.
#: A rule fills the names of its ``Rule.pack`` and leaves the other slots 0.
KERNEL_SCALARS = (
    "lr", "l2", "decay", "eps",
    "beta1", "one_minus_beta1", "beta2", "one_minus_beta2",
    "step_size", "bc1", "bc2_sqrt",
    "momentum", "momentum_keep", "momentum_gain",
    "alpha", "one_minus_alpha", "rho", "one_minus_rho",
    "clr", "c_grad", "c_avg", "hessian_power", "weight_decay",
    # rules added later (appended: existing slots keep their positions)
    "eta", "eta_decay", "mu", "etaplus", "etaminus", "step_size_min", "step_size_max",
    "eps_root", "beta3", "one_minus_beta3",
    "c_lerp", "y_lr", "bc2",
    "trust_coefficient",
)
KERNEL_SCALAR_SLOT = {name: k for k, name in enumerate(KERNEL_SCALARS)}

#: The kernel flag vocabulary, bit ``k`` of a call's flags is ``KERNEL_FLAGS[k]``.
#: ``Rule.variants`` are the flags that change which state arrays a step touches
#: (a backend may compile them as constants); the others are runtime switches.
KERNEL_FLAGS = ("nesterov", "rectify", "amsgrad", "has_momentum", "centered",
                "average_copy", "lerp_swap")
KERNEL_FLAG_BIT = {name: k for k, name in enumerate(KERNEL_FLAGS)}

#: Rule kinds: how a backend drives the rule.
ELEMENTWISE = "elementwise"   # one fused pass, each element on its own
TRUST_RATIO = "trust_ratio"   # a read pass of per-tensor norms, then an elementwise pass (LAMB)
DENSE_SOLVE = "dense_solve"   # a linear solve per tensor (Newton): no fused kernel
#: a fused momentum pass, a per-tensor orthogonalization of the 2-D update by Newton-Schulz
#: matrix products (the backend's BLAS), then a fused param pass (Muon); needs each param's shape
ORTHOGONALIZE = "orthogonalize"
#: a read pass of per-row and per-column sums of g^2 into small factored state, a pass for the
#: RMS of the update, then an elementwise pass (Adafactor); needs each param's shape
FACTORED = "factored"
KINDS = (ELEMENTWISE, TRUST_RATIO, DENSE_SOLVE, ORTHOGONALIZE, FACTORED)

#: How ``weight_decay`` enters: ``"l2"`` adds ``wd*p`` to the grad before the rule
#: (guarded by ``wd != 0``: ``0*inf`` would turn an inf param into nan);
#: ``"decoupled"`` multiplies the param by ``1 - lr*wd`` before the rule; ``"rule"``:
#: the rule's own formula uses it (LAMB's ``r = ... + wd*p``); ``None``: no weight decay.
DECAY_KINDS = ("l2", "decoupled", "rule", None)


@dataclass(frozen=True)
class Rule:
    """One update rule: everything about it that is not per-element math.

    ``state(hp)`` lists ``(name, initial_value)`` for every state array the
    rule keeps per tensor under the hyperparameters ``hp`` (variants such as
    ``amsgrad`` add arrays).  ``scalars(hp, t, gstate)`` returns the host
    scalars of step ``t`` (1-based) as a dict and the new group state; it is
    pure, so a skipped step simply drops its result.  The dict holds every name
    of ``pack`` and ``flags`` plus the weight-decay stage's ``l2`` and ``decay``.

    ``kind`` says how a backend drives the rule (see ``KINDS``); ``extra`` names
    an extra per-tensor input of ``step()`` and ``extra_shape`` its shape:
    ``"param"`` (like the param) or ``"square"`` (``(n, n)`` for an ``n``-element
    param).  ``weight_decay`` is the decay stage (see ``DECAY_KINDS``).  ``pack``
    and ``flags`` are the kernel scalars and flags the rule reads, by name.
    """

    name: str
    class_name: str
    defaults: dict
    state: Callable[[dict], tuple]
    scalars: Callable[[dict, int, dict], tuple]
    check: Callable[[dict], None]
    all_state: tuple  # every state name the rule may use, in functional-argument order
    extra: str | None = None  # name of the extra per-tensor input of step()
    group_state: dict = field(default_factory=dict)
    kind: str = ELEMENTWISE
    extra_shape: str = "param"
    weight_decay: str | None = "l2"
    pack: tuple = ()
    flags: tuple = ()
    variants: tuple = ()  # the flags among ``flags`` that decide which state arrays are touched
    #: state arrays that hold a sum, average or maximum of squares or magnitudes: never negative
    #: in a state the rule produced, so loading one with a negative entry is refused
    nonnegative_state: tuple = ()
    #: boolean options that 8-bit state cannot take, with the reason: RMSprop's ``centered``
    #: takes ``sqrt(square_avg - grad_avg**2)`` of two states rounded separately, a difference
    #: that rounds below zero near a minimum (nan); bitsandbytes refuses it for the same reason
    q8_refuses: tuple = ()
    #: the number of dimensions every param must have (Muon: 2), or None for any
    param_ndim: int | None = None
    #: ``state_shape(name, param_shape)``: the shape of state array ``name`` of a param of
    #: ``param_shape``, or None when such a param has no array ``name`` (Adafactor: ``row_var``
    #: and ``col_var`` for >= 2-D params, ``variance`` otherwise).  None: every state array is
    #: shaped like its param (every elementwise rule)
    state_shape: Callable[[str, tuple], tuple | None] | None = None
    #: why ``state_dtype="q8"`` cannot hold this rule's state, or None where it can
    #: (Schedule-Free's ``z`` is an iterate of the params' own magnitude, not a statistic)
    q8_state_refused: str | None = None
    #: a trust-ratio rule's float64 host scalars that its kernels take as arguments, beside the
    #: scalar vector (which holds them rounded to the dtype): the per-tensor trust formula runs on
    #: them in double, as the reference computes it (LAMB: ``lr``; LARS: ``lr``, its trust
    #: coefficient, eps and the ``trust_ratio`` switch as 0.0/1.0)
    trust_scalars: tuple = ("lr",)
    #: a trust-ratio rule's pass-2 scalar per tensor, ``trust_coef(xp, p_norm, u_norm, s)``: from
    #: the float64 arrays of the two norms pass 1 summed and the step's scalars ``s``, in double
    #: (the CUDA host forms it; the reference and the numba kernels write the same formula)
    trust_coef: Callable | None = None
    #: a trust-ratio rule's element accesses ``(param, grad, state)`` per param element over its
    #: two passes, where LAMB's count (pass 1 reads p and the moments, pass 2 reads p and the
    #: moments and writes p) does not fit; None: LAMB's.  LARS: pass 1 reads p and g, pass 2
    #: reads p, g and the momentum and writes p and the momentum: ``(3, 2, 2)``
    trust_accesses: tuple | None = None

    def step_scalars(self, hp: dict, t: int, gstate: dict) -> tuple:
        """``scalars`` plus the weight-decay stage's ``l2`` and ``decay`` (see ``DECAY_KINDS``)."""
        s, gs = self.scalars(hp, t, gstate)
        wd = hp.get("weight_decay", 0.0)
        s["l2"] = wd if self.weight_decay == "l2" else 0.0
        s["decay"] = 1.0 - hp["lr"] * wd if self.weight_decay == "decoupled" else 1.0
        return s, gs

    def kernel_scalars(self, s: dict) -> list:
        """The full ``KERNEL_SCALARS`` vector of a step's scalars ``s`` (unused slots 0)."""
        out = [0.0] * len(KERNEL_SCALARS)
        for name in self.pack + ("l2", "decay"):
            out[KERNEL_SCALAR_SLOT[name]] = float(s[name])
        return out

    def kernel_flags(self, s: dict) -> int:
        """The flag bits (``KERNEL_FLAGS``) of a step's scalars ``s``."""
        return sum(1 << KERNEL_FLAG_BIT[name] for name in self.flags if s[name])

    def variant(self, s: dict) -> int:
        """The variant bits: bit ``k`` set when ``variants[k]`` is on."""
        return sum(1 << k for k, name in enumerate(self.variants) if s[name])

    @property
    def needs_shapes(self) -> bool:
        """Whether the kernels need the params' shapes (``Pre.shapes``), not just flat arrays."""
        return self.param_ndim is not None or self.state_shape is not None

    def state_shape_of(self, name: str, shape: tuple) -> tuple | None:
        """The shape of state ``name`` of a param of ``shape`` (None: that param has none)."""
        shape = tuple(int(d) for d in shape)
        return shape if self.state_shape is None else self.state_shape(name, shape)

    def extra_shape_of(self, shape: tuple, size: int) -> tuple:
        """The expected shape of the extra input of a param of ``shape``/``size``."""
        return (size, size) if self.extra_shape == "square" else tuple(shape)

    def accesses(self, hp: dict) -> tuple:
        """Element accesses per parameter element of one step: ``(param, grad, state, extra)``.

        Reads and writes count once each (an in-place update is 2).  The
        bytes moved per element are ``param*ps + grad*gs + state*ss + extra*es``
        for the item sizes of the param, grad, state and extra arrays.
        """
        n_state = len(self.state(hp))
        param, grad, state = 2, 1, 2 * n_state
        if self.kind == TRUST_RATIO:  # pass 1 only reads p; pass 2 reads p and the moments, writes p
            param, state = param + 1, state + n_state
            if self.trust_accesses is not None:
                param, grad, state = self.trust_accesses
        extra = 1 if (self.extra is not None and self.extra_shape == "param") else 0
        return param, grad, state, extra

    def bytes_per_element(self, hp: dict, itemsize: int, grad_itemsize: int | None = None,
                          state_itemsize: int | None = None) -> int:
        """Bytes one step moves per parameter element (the memory roofline's numerator)."""
        p, g, s, e = self.accesses(hp)
        gs = itemsize if grad_itemsize is None else grad_itemsize
        ss = itemsize if state_itemsize is None else state_itemsize
        return p * itemsize + g * gs + s * ss + e * itemsize


def _require(cond: bool, name: str, expected: str, value) -> None:
    if not cond:
        raise ValueError(f"{name}: expected {expected}, got {value!r}")


def _real(value) -> bool:
    # numbers.Real admits NumPy scalars (np.float32(0.1) as an lr); bools are not numbers here
    return (isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
            and math.isfinite(value))


def as_host_scalars(hp: dict) -> dict:
    """A copy of ``hp`` with NumPy scalars turned into Python floats.

    Host scalars are computed in double (``1 - beta2**t`` in float32 would lose
    the bias correction's precision), so an ``np.float32`` hyperparameter is
    widened here, once per step, before any rule sees it.
    """
    out = dict(hp)
    for k, v in hp.items():
        if isinstance(v, (np.floating, np.integer)):
            out[k] = float(v)
        elif isinstance(v, tuple) and any(isinstance(x, (np.floating, np.integer)) for x in v):
            out[k] = tuple(x if x is None else float(x) for x in v)  # Adafactor's eps1 may be None
    return out


def check_nonneg(hp: dict, *names: str) -> None:
    for n in names:
        _require(_real(hp[n]) and hp[n] >= 0, n, "a finite number >= 0", hp[n])


def check_positive(hp: dict, *names: str) -> None:
    for n in names:
        _require(_real(hp[n]) and hp[n] > 0, n, "a finite number > 0", hp[n])


def check_unit(hp: dict, name: str, *, closed: bool = False) -> None:
    v = hp[name]
    ok = _real(v) and 0 <= v and (v <= 1 if closed else v < 1)
    _require(ok, name, "a number in [0, 1]" if closed else "a number in [0, 1)", v)


def check_betas(hp: dict) -> None:
    b = hp["betas"]
    _require(isinstance(b, (tuple, list)) and len(b) == 2, "betas", "a pair (beta1, beta2)", b)
    for i, v in enumerate(b):
        _require(_real(v) and 0 <= v < 1, f"betas[{i}]", "a number in [0, 1)", v)


def check_pipeline(hp: dict) -> None:
    """Range checks of the pipeline options."""
    _require(isinstance(hp["maximize"], bool), "maximize", "a bool", hp["maximize"])
    for n in ("clip_value", "clip_norm", "clip_global_norm", "weight_clip", "max_norm"):
        v = hp[n]
        _require(v is None or (_real(v) and v > 0), n, "None or a finite number > 0", v)


def check_lr_value(lr, where: str = "lr") -> None:
    _require(_real(lr) and lr >= 0, where, "a finite number >= 0", lr)


# --------------------------------------------------------------------------- rules


def _sgd_state(hp):
    return (("momentum_buffer", 0.0),) if hp["momentum"] != 0 else ()


def _sgd_scalars(hp, t, gs):
    mu, first = hp["momentum"], t == 1
    s = dict(lr=hp["lr"], weight_decay=hp["weight_decay"], momentum=mu,
             dampening=hp["dampening"], nesterov=bool(hp["nesterov"]), first_step=first,
             has_momentum=mu != 0,
             # the buffer update b = keep*b + gain*g: at t=1 keep=0, gain=1 make b = g (torch)
             momentum_keep=0.0 if first else mu, momentum_gain=1.0 if first else 1.0 - hp["dampening"])
    return s, gs


def _sgd_check(hp):
    check_nonneg(hp, "momentum", "weight_decay")
    check_unit(hp, "dampening", closed=True)
    _require(isinstance(hp["nesterov"], bool), "nesterov", "a bool", hp["nesterov"])
    if hp["nesterov"]:
        _require(hp["momentum"] > 0 and hp["dampening"] == 0, "nesterov",
                 "momentum > 0 and dampening == 0 (as torch.optim.SGD)",
                 f"momentum={hp['momentum']}, dampening={hp['dampening']}")


def _adam_state(hp):
    names = (("exp_avg", 0.0), ("exp_avg_sq", 0.0))
    return names + ((("max_exp_avg_sq", 0.0),) if hp.get("amsgrad") else ())


def _betas(hp):
    """The moment coefficients; ``1 - beta`` in double here, once, for every backend."""
    b1, b2 = hp["betas"]
    return dict(beta1=b1, one_minus_beta1=1.0 - b1, beta2=b2, one_minus_beta2=1.0 - b2)


def _bias_corrections(hp, t):
    """``1 - beta**t`` in double on the host, once per step (docs/design.md, "Host scalars").

    Computed before any cast: in float16/bfloat16 ``1 - 0.999**t`` rounds to 0 for
    small ``t`` (optax's ``bias_correction`` warns of the same trap).
    """
    b1, b2 = hp["betas"]
    if not hp.get("bias_correction", True):
        return 1.0, 1.0
    return 1.0 - b1 ** t, 1.0 - b2 ** t


def _adam_scalars(hp, t, gs):
    bc1, bc2 = _bias_corrections(hp, t)
    s = dict(_betas(hp), lr=hp["lr"], eps=hp["eps"], weight_decay=hp["weight_decay"],
             amsgrad=bool(hp["amsgrad"]), bc1=bc1, bc2_sqrt=math.sqrt(bc2),
             # the fused kernels use: p -= step_size * m / (sqrt(v) / bc2_sqrt + eps)
             step_size=hp["lr"] / bc1)
    return s, gs


def _adam_check(hp):
    check_betas(hp)
    check_positive(hp, "eps")
    check_nonneg(hp, "weight_decay")
    _require(isinstance(hp["amsgrad"], bool), "amsgrad", "a bool", hp["amsgrad"])
    _require(isinstance(hp["bias_correction"], bool), "bias_correction", "a bool",
             hp["bias_correction"])


def _adagrad_scalars(hp, t, gs):
    clr = hp["lr"] / (1.0 + (t - 1) * hp["lr_decay"])
    return dict(clr=clr, eps=hp["eps"], weight_decay=hp["weight_decay"]), gs


def _adagrad_check(hp):
    check_nonneg(hp, "lr_decay", "weight_decay", "initial_accumulator_value")
    check_positive(hp, "eps")


def _rmsprop_state(hp):
    names = [("square_avg", 0.0)]
    if hp["momentum"] > 0:
        names.append(("momentum_buffer", 0.0))
    if hp["centered"]:
        names.append(("grad_avg", 0.0))
    return tuple(names)


def _rmsprop_scalars(hp, t, gs):
    return dict(lr=hp["lr"], alpha=hp["alpha"], one_minus_alpha=1.0 - hp["alpha"], eps=hp["eps"],
                weight_decay=hp["weight_decay"], momentum=hp["momentum"],
                has_momentum=hp["momentum"] > 0, centered=bool(hp["centered"])), gs


def _rmsprop_check(hp):
    check_unit(hp, "alpha", closed=True)
    check_positive(hp, "eps")
    check_nonneg(hp, "weight_decay", "momentum")
    _require(isinstance(hp["centered"], bool), "centered", "a bool", hp["centered"])


def _adadelta_scalars(hp, t, gs):
    return dict(lr=hp["lr"], rho=hp["rho"], one_minus_rho=1.0 - hp["rho"], eps=hp["eps"],
                weight_decay=hp["weight_decay"]), gs


def _adadelta_check(hp):
    check_unit(hp, "rho", closed=True)
    check_positive(hp, "eps")
    check_nonneg(hp, "weight_decay")


def _adamax_scalars(hp, t, gs):
    b1 = hp["betas"][0]
    return dict(_betas(hp), lr=hp["lr"], eps=hp["eps"], weight_decay=hp["weight_decay"],
                clr=hp["lr"] / (1.0 - b1 ** t)), gs


def _adam_family_check(hp):
    check_betas(hp)
    check_positive(hp, "eps")
    check_nonneg(hp, "weight_decay")


def _nadam_scalars(hp, t, gs):
    """torch.optim.NAdam's momentum schedule; ``mu_product`` is group state."""
    b1, b2 = hp["betas"]
    md = hp["momentum_decay"]
    mu = b1 * (1.0 - 0.5 * 0.96 ** (t * md))
    mu_next = b1 * (1.0 - 0.5 * 0.96 ** ((t + 1) * md))
    mu_product = gs["mu_product"] * mu
    mu_product_next = mu_product * mu_next
    s = dict(_betas(hp), eps=hp["eps"], weight_decay=hp["weight_decay"],
             bc2_sqrt=math.sqrt(1.0 - b2 ** t),
             # p -= c_grad * g / denom + c_avg * m / denom
             c_grad=hp["lr"] * (1.0 - mu) / (1.0 - mu_product),
             c_avg=hp["lr"] * mu_next / (1.0 - mu_product_next))
    return s, {"mu_product": mu_product}


def _nadam_check(hp):
    _adam_family_check(hp)
    check_nonneg(hp, "momentum_decay")


def _radam_scalars(hp, t, gs):
    """torch.optim.RAdam: rectified when rho_t > 5, else the un-adapted step."""
    b1, b2 = hp["betas"]
    bc1, bc2 = 1.0 - b1 ** t, 1.0 - b2 ** t
    rho_inf = 2.0 / (1.0 - b2) - 1.0
    rho_t = rho_inf - 2.0 * t * b2 ** t / bc2
    rectify = rho_t > 5.0
    rect = (math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
            if rectify else 0.0)
    s = dict(_betas(hp), eps=hp["eps"], weight_decay=hp["weight_decay"], rectify=rectify,
             # rectified:   p -= step_size * m / (sqrt(v) + eps), step_size = lr*rect*sqrt(bc2)/bc1
             # un-adapted:  p -= step_size * m,                 step_size = lr/bc1
             step_size=(hp["lr"] * rect * math.sqrt(bc2) / bc1) if rectify else hp["lr"] / bc1)
    return s, gs


def _lion_scalars(hp, t, gs):
    return dict(_betas(hp), lr=hp["lr"], weight_decay=hp["weight_decay"]), gs


def _lion_check(hp):
    check_betas(hp)
    check_nonneg(hp, "weight_decay")


def _lamb_scalars(hp, t, gs):
    bc1, bc2 = _bias_corrections(hp, t)
    return dict(_betas(hp), lr=hp["lr"], eps=hp["eps"], weight_decay=hp["weight_decay"],
                bc1=bc1, bc2_sqrt=math.sqrt(bc2)), gs


def _lamb_trust_coef(xp, pn, rn, s):
    """LAMB's ``lr * |p|/|r|`` per tensor (ratio 1 where either norm is 0)."""
    ok = (pn > 0) & (rn > 0)
    return s["lr"] * xp.where(ok, pn / xp.where(ok, rn, 1.0), 1.0)


def _lamb_check(hp):
    _adam_family_check(hp)
    _require(isinstance(hp["bias_correction"], bool), "bias_correction", "a bool",
             hp["bias_correction"])


def _adahessian_scalars(hp, t, gs):
    b1, b2 = hp["betas"]
    bc1, bc2 = 1.0 - b1 ** t, 1.0 - b2 ** t
    return dict(_betas(hp), lr=hp["lr"], eps=hp["eps"], weight_decay=hp["weight_decay"],
                hessian_power=hp["hessian_power"], bc2_sqrt=math.sqrt(bc2),
                step_size=hp["lr"] / bc1), gs


def _adahessian_check(hp):
    _adam_family_check(hp)
    hpow = hp["hessian_power"]
    _require(_real(hpow) and 0 < hpow <= 1, "hessian_power", "a number in (0, 1]", hpow)


def _newton_scalars(hp, t, gs):
    return dict(lr=hp["lr"], damping=hp["damping"]), gs


def _newton_check(hp):
    check_nonneg(hp, "damping")


_ADAM_DEFAULTS = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
_BETAS = ("beta1", "one_minus_beta1", "beta2", "one_minus_beta2")
_ADAM_STATE = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
_ADAM_SQUARES = ("exp_avg_sq", "max_exp_avg_sq")

RULES: dict[str, Rule] = {}


def _add(rule: Rule) -> None:
    assert rule.kind in KINDS and rule.weight_decay in DECAY_KINDS, rule.name
    assert set(rule.pack) <= set(KERNEL_SCALARS) and set(rule.flags) <= set(KERNEL_FLAGS), rule.name
    assert set(rule.variants) <= set(rule.flags), rule.name
    assert set(rule.nonnegative_state) <= set(rule.all_state), rule.name
    RULES[rule.name] = rule


_add(Rule("sgd", "SGD", dict(lr=1e-3, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0),
          _sgd_state, _sgd_scalars, _sgd_check, ("momentum_buffer",),
          pack=("lr", "momentum", "momentum_keep", "momentum_gain"),
          flags=("nesterov", "has_momentum"), variants=("has_momentum",)))
_add(Rule("adam", "Adam", dict(_ADAM_DEFAULTS, amsgrad=False, bias_correction=True),
          _adam_state, _adam_scalars, _adam_check, _ADAM_STATE,
          pack=_BETAS + ("eps", "step_size", "bc2_sqrt"), flags=("amsgrad",), variants=("amsgrad",),
          nonnegative_state=_ADAM_SQUARES))
_add(Rule("adamw", "AdamW", dict(_ADAM_DEFAULTS, weight_decay=1e-2, amsgrad=False, bias_correction=True),
          _adam_state, _adam_scalars, _adam_check, _ADAM_STATE, weight_decay="decoupled",
          pack=_BETAS + ("eps", "step_size", "bc2_sqrt"), flags=("amsgrad",), variants=("amsgrad",),
          nonnegative_state=_ADAM_SQUARES))
_add(Rule("adagrad", "Adagrad", dict(lr=1e-2, lr_decay=0.0, weight_decay=0.0,
                                     initial_accumulator_value=0.0, eps=1e-10),
          lambda hp: (("sum", float(hp["initial_accumulator_value"])),),
          _adagrad_scalars, _adagrad_check, ("sum",), pack=("clr", "eps"), nonnegative_state=("sum",)))
_add(Rule("rmsprop", "RMSprop", dict(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
                                     centered=False),
          _rmsprop_state, _rmsprop_scalars, _rmsprop_check,
          ("square_avg", "momentum_buffer", "grad_avg"),
          pack=("lr", "alpha", "one_minus_alpha", "eps", "momentum"),
          flags=("has_momentum", "centered"), variants=("has_momentum", "centered"),
          nonnegative_state=("square_avg",),
          q8_refuses=(("centered", "sqrt(square_avg - grad_avg**2) of two separately quantized "
                                   "states rounds below zero near a minimum"),)))
_add(Rule("adadelta", "Adadelta", dict(lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0),
          lambda hp: (("square_avg", 0.0), ("acc_delta", 0.0)),
          _adadelta_scalars, _adadelta_check, ("square_avg", "acc_delta"),
          pack=("lr", "rho", "one_minus_rho", "eps"), nonnegative_state=("square_avg", "acc_delta")))
_add(Rule("adamax", "Adamax", dict(_ADAM_DEFAULTS, lr=2e-3),
          lambda hp: (("exp_avg", 0.0), ("exp_inf", 0.0)),
          _adamax_scalars, _adam_family_check, ("exp_avg", "exp_inf"),
          pack=_BETAS + ("eps", "clr"), nonnegative_state=("exp_inf",)))
_add(Rule("nadam", "NAdam", dict(_ADAM_DEFAULTS, lr=2e-3, momentum_decay=4e-3),
          lambda hp: (("exp_avg", 0.0), ("exp_avg_sq", 0.0)),
          _nadam_scalars, _nadam_check, ("exp_avg", "exp_avg_sq"),
          group_state={"mu_product": 1.0}, pack=_BETAS + ("eps", "bc2_sqrt", "c_grad", "c_avg"),
          nonnegative_state=("exp_avg_sq",)))
_add(Rule("radam", "RAdam", dict(_ADAM_DEFAULTS),
          lambda hp: (("exp_avg", 0.0), ("exp_avg_sq", 0.0)),
          _radam_scalars, _adam_family_check, ("exp_avg", "exp_avg_sq"),
          pack=_BETAS + ("eps", "step_size"), flags=("rectify",), nonnegative_state=("exp_avg_sq",)))
_add(Rule("lion", "Lion", dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0),
          lambda hp: (("exp_avg", 0.0),), _lion_scalars, _lion_check, ("exp_avg",),
          weight_decay="decoupled", pack=("lr",) + _BETAS))
_add(Rule("lamb", "LAMB", dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0,
                               bias_correction=True),
          lambda hp: (("exp_avg", 0.0), ("exp_avg_sq", 0.0)),
          _lamb_scalars, _lamb_check, ("exp_avg", "exp_avg_sq"), kind=TRUST_RATIO,
          weight_decay="rule", pack=("lr",) + _BETAS + ("eps", "weight_decay", "bc1", "bc2_sqrt"),
          nonnegative_state=("exp_avg_sq",), trust_coef=_lamb_trust_coef))
_add(Rule("adahessian", "AdaHessian", dict(lr=0.15, betas=(0.9, 0.999), eps=1e-4, hessian_power=1.0,
                                           weight_decay=0.0),
          lambda hp: (("exp_avg", 0.0), ("exp_hessian_diag_sq", 0.0)),
          _adahessian_scalars, _adahessian_check, ("exp_avg", "exp_hessian_diag_sq"),
          extra="hessian_diags", pack=_BETAS + ("eps", "step_size", "bc2_sqrt", "hessian_power"),
          nonnegative_state=("exp_hessian_diag_sq",)))
_add(Rule("newton", "Newton", dict(lr=1.0, damping=1e-4),
          lambda hp: (), _newton_scalars, _newton_check, (), extra="hessians",
          kind=DENSE_SOLVE, extra_shape="square", weight_decay=None))


# --------------------------------------------------------------------------- ASGD, Rprop


def _asgd_scalars(hp, t, gs):
    """torch.optim.ASGD: ``eta`` and ``mu`` are state, set at the end of each step for the next.

    torch keeps them per param (``state["eta"]``, ``state["mu"]``) and computes
    them after step ``t`` from that step's ``lr``: ``eta = lr / (1 + lambd*lr*t)**alpha``,
    ``mu = 1 / max(1, t - t0)``; the first step uses ``eta = lr`` and ``mu = 1``.
    So with a schedule ``eta`` lags one step behind ``lr``, exactly as in torch:
    these host scalars depend on the group state, not on ``(hp, t)`` alone.  The start
    value ``eta = 0`` stands for "``lr``" at step 1; a positive one is used as it is
    (fastopt.torch starts it at ``lr`` rounded to torch's scalar dtype, as torch does).
    """
    lr, lambd = hp["lr"], hp["lambd"]
    eta = gs["eta"] if t > 1 or gs["eta"] > 0 else lr
    mu = 1.0 if t == 1 else gs["mu"]
    s = dict(lr=lr, weight_decay=hp["weight_decay"], eta=eta, mu=mu,
             # p = p * (1 - lambd*eta) - eta*g; torch computes 1 - lambd*eta in double too
             eta_decay=1.0 - lambd * eta,
             # torch copies p into ax when mu == 1 (exactly), else ax += (p - ax) * mu
             average_copy=mu == 1.0)
    new = {"eta": lr / ((1.0 + lambd * lr * t) ** hp["alpha"]), "mu": 1.0 / max(1.0, t - hp["t0"])}
    return s, new


def _asgd_check(hp):
    check_nonneg(hp, "lambd", "alpha", "weight_decay")
    _require(_real(hp["t0"]), "t0", "a finite number", hp["t0"])


def _rprop_state(hp):
    """``prev`` (the last grad, zeroed where its sign flipped) and the per-element ``step_size``,
    which starts at ``lr`` as torch's (the only use of ``lr``: later changes of it do nothing)."""
    lr = hp["lr"]
    if callable(lr):  # a schedule: the lr of the first step
        lr = float(lr(0))
    return (("prev", 0.0), ("step_size", float(lr)))


def _rprop_scalars(hp, t, gs):
    (em, ep), (smin, smax) = hp["etas"], hp["step_sizes"]
    return dict(lr=hp["lr"], etaminus=em, etaplus=ep, step_size_min=smin, step_size_max=smax), gs


def _rprop_check(hp):
    e, z = hp["etas"], hp["step_sizes"]
    _require(isinstance(e, (tuple, list)) and len(e) == 2 and all(_real(x) for x in e)
             and 0 < e[0] < 1 < e[1], "etas", "a pair (etaminus, etaplus) with "
             "0 < etaminus < 1 < etaplus", e)
    _require(isinstance(z, (tuple, list)) and len(z) == 2 and all(_real(x) for x in z)
             and 0 <= z[0] <= z[1], "step_sizes", "a pair (min, max) of finite numbers with "
             "0 <= min <= max", z)


_add(Rule("asgd", "ASGD", dict(lr=1e-2, lambd=1e-4, alpha=0.75, t0=1e6, weight_decay=0.0),
          lambda hp: (("ax", 0.0),), _asgd_scalars, _asgd_check, ("ax",),
          group_state={"eta": 0.0, "mu": 1.0}, pack=("eta", "eta_decay", "mu"),
          flags=("average_copy",)))
_add(Rule("rprop", "Rprop", dict(lr=1e-2, etas=(0.5, 1.2), step_sizes=(1e-6, 50.0)),
          _rprop_state, _rprop_scalars, _rprop_check, ("prev", "step_size"), weight_decay=None,
          pack=("etaminus", "etaplus", "step_size_min", "step_size_max"),
          nonnegative_state=("step_size",)))


# --------------------------------------------------------------------------- AdaBelief, Yogi
# optax 0.2.8's semantics and defaults (optax.adabelief, optax.yogi); ``weight_decay`` is the L2
# stage, as optax.chain(optax.add_decayed_weights(wd), optax.adabelief(...)).


def _adabelief_scalars(hp, t, gs):
    """optax.scale_by_belief: m_hat = m/bc1, or with nesterov b1*m/bc1(t+1) + (1-b1)*g/bc1(t).

    The step is ``p -= c_avg * m / d + c_grad * g / d`` with ``d = sqrt(s/bc2) + eps``.
    """
    b1, b2 = hp["betas"]
    lr, bc1 = hp["lr"], 1.0 - b1 ** t
    nesterov = bool(hp["nesterov"])
    s = dict(_betas(hp), lr=lr, eps=hp["eps"], eps_root=hp["eps_root"],
             weight_decay=hp["weight_decay"], nesterov=nesterov,
             bc2_sqrt=math.sqrt(1.0 - b2 ** t),
             c_avg=lr * b1 / (1.0 - b1 ** (t + 1)) if nesterov else lr / bc1,
             c_grad=lr * (1.0 - b1) / bc1 if nesterov else 0.0)
    return s, gs


def _adabelief_check(hp):
    _adam_family_check(hp)
    check_nonneg(hp, "eps_root")
    _require(isinstance(hp["nesterov"], bool), "nesterov", "a bool", hp["nesterov"])


def _yogi_scalars(hp, t, gs):
    bc1, bc2 = _bias_corrections(hp, t)
    return dict(_betas(hp), lr=hp["lr"], eps=hp["eps"], weight_decay=hp["weight_decay"],
                bc2_sqrt=math.sqrt(bc2), step_size=hp["lr"] / bc1), gs


def _yogi_check(hp):
    _adam_family_check(hp)
    check_nonneg(hp, "initial_accumulator_value")


_add(Rule("adabelief", "AdaBelief", dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-16, eps_root=1e-16,
                                         weight_decay=0.0, nesterov=False),
          lambda hp: (("exp_avg", 0.0), ("exp_avg_var", 0.0)),
          _adabelief_scalars, _adabelief_check, ("exp_avg", "exp_avg_var"),
          pack=_BETAS + ("eps", "eps_root", "bc2_sqrt", "c_avg", "c_grad"), flags=("nesterov",),
          nonnegative_state=("exp_avg_var",)))
_add(Rule("yogi", "Yogi", dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-3, weight_decay=0.0,
                               initial_accumulator_value=1e-6),
          lambda hp: (("exp_avg", float(hp["initial_accumulator_value"])),
                      ("exp_avg_sq", float(hp["initial_accumulator_value"]))),
          _yogi_scalars, _yogi_check, ("exp_avg", "exp_avg_sq"),
          pack=_BETAS + ("eps", "bc2_sqrt", "step_size"), nonnegative_state=("exp_avg_sq",)))


# --------------------------------------------------------------------------- AdEMAMix


def _ademamix_warmups(hp, t):
    """AdEMAMix's alpha and beta3 at step ``t`` (Pagliardini et al. 2024; bitsandbytes' AdEMAMix).

    ``t_alpha``: alpha rises linearly, ``min(t*alpha/t_alpha, alpha)``.  ``t_beta3``: beta3
    rises so that the slow EMA's half-life grows linearly from beta1's to beta3's:
    ``min(exp(ln b1 * ln b3 / ((1 - t/T) ln b3 + (t/T) ln b1)), b3)``.
    """
    b1, _, b3 = hp["betas"]
    alpha = hp["alpha"]
    if hp["t_alpha"] is not None:
        alpha = min(t * alpha / hp["t_alpha"], alpha)
    if hp["t_beta3"] is not None:
        x = t / hp["t_beta3"]
        lb1, lb3 = math.log(b1), math.log(b3)
        b3 = min(math.exp(lb1 * lb3 / ((1.0 - x) * lb3 + x * lb1)), b3)
    return alpha, b3


def _ademamix_scalars(hp, t, gs):
    b1, b2, _ = hp["betas"]
    alpha, b3 = _ademamix_warmups(hp, t)
    s = dict(beta1=b1, one_minus_beta1=1.0 - b1, beta2=b2, one_minus_beta2=1.0 - b2,
             beta3=b3, one_minus_beta3=1.0 - b3, alpha=alpha, lr=hp["lr"], eps=hp["eps"],
             weight_decay=hp["weight_decay"], bc1=1.0 - b1 ** t,
             bc2_sqrt=math.sqrt(1.0 - b2 ** t))
    return s, gs


def _ademamix_check(hp):
    b = hp["betas"]
    _require(isinstance(b, (tuple, list)) and len(b) == 3, "betas",
             "a triple (beta1, beta2, beta3)", b)
    for i, v in enumerate(b):
        _require(_real(v) and 0 <= v < 1, f"betas[{i}]", "a number in [0, 1)", v)
    check_nonneg(hp, "alpha", "weight_decay")
    check_positive(hp, "eps")
    for n in ("t_alpha", "t_beta3"):
        v = hp[n]
        _require(v is None or (_real(v) and v > 0), n, "None or a number of steps > 0", v)
    if hp["t_beta3"] is not None:  # the warmup takes logarithms of both
        _require(b[0] > 0 and b[2] > 0, "betas", "beta1 > 0 and beta3 > 0 with t_beta3", b)


_add(Rule("ademamix", "AdEMAMix", dict(lr=1e-3, betas=(0.9, 0.999, 0.9999), alpha=5.0, eps=1e-8,
                                       weight_decay=1e-2, t_alpha=None, t_beta3=None),
          lambda hp: (("m1", 0.0), ("m2", 0.0), ("nu", 0.0)),
          _ademamix_scalars, _ademamix_check, ("m1", "m2", "nu"), weight_decay="decoupled",
          pack=("lr",) + _BETAS + ("beta3", "one_minus_beta3", "alpha", "eps", "bc1", "bc2_sqrt"),
          nonnegative_state=("nu",)))


#: State names whose plural (the functional API's list argument, ``exp_avg`` -> ``exp_avgs``)
#: would be a hyperparameter's name: Rprop's per-element ``step_size`` against its
#: ``step_sizes`` bounds.
_STATE_ARG_OVERRIDES = {"step_size": "step_size_states"}


def state_arg(name: str) -> str:
    """The functional API's argument for the per-tensor list of state ``name`` (its plural)."""
    return _STATE_ARG_OVERRIDES.get(name, name + "s")


def check_hyperparameters(rule: Rule, hp: dict, where: str = "") -> None:
    """Every range check of a group's hyperparameters; ``lr`` may be a schedule."""
    try:
        if not callable(hp["lr"]):
            check_lr_value(hp["lr"])
        rule.check(hp)
        check_pipeline(hp)
    except ValueError as e:
        raise ValueError(f"{where}{e}") from None


# --------------------------------------------------------------------------- Muon

#: torch.optim.Muon's Newton-Schulz coefficients (a, b, c) and step count.
MUON_NS_COEFFICIENTS = (3.4445, -4.775, 2.0315)
MUON_ADJUST_LR_FNS = (None, "original", "match_rms_adamw")


def _lerp_form(w):
    """torch's ``lerp(a, b, w)`` as ``x + c * (y - x)``: ``(swap, c)``.

    torch evaluates ``a + w*(b - a)`` when ``|w| < 0.5`` and ``b - (b - a)*(1 - w)``
    otherwise; the second is ``b + (1 - w)*(a - b)`` exactly (a negation is exact),
    so both are ``x + c*(y - x)`` with ``(x, y) = (a, b)`` or, swapped, ``(b, a)``.
    ``1 - w`` is taken here in double, as torch takes it from the double weight.
    """
    return (False, w) if abs(w) < 0.5 else (True, 1.0 - w)


def muon_lr_ratio(adjust_lr_fn, shape) -> float:
    """The factor torch.optim.Muon applies to ``lr`` for a param of ``shape`` (rows, cols)."""
    a, b = shape[0], shape[1]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1.0, a / b))
    return 0.2 * math.sqrt(max(a, b))  # "match_rms_adamw" (Moonshot's RMS matching)


def _muon_scalars(hp, t, gs):
    mu = hp["momentum"]
    buf_swap, buf_c = _lerp_form(1.0 - mu)     # buf = lerp(buf, g, 1 - mu)
    nest_swap, nest_c = _lerp_form(mu)         # update = lerp(g, buf, mu) with nesterov
    return dict(lr=hp["lr"], weight_decay=hp["weight_decay"], momentum=mu,
                nesterov=bool(hp["nesterov"]), eps=hp["eps"], ns_steps=int(hp["ns_steps"]),
                ns_coefficients=tuple(float(x) for x in hp["ns_coefficients"]),
                adjust_lr_fn=hp["adjust_lr_fn"], buf_swap=buf_swap, buf_c=buf_c,
                nest_swap=nest_swap, nest_c=nest_c), gs


def _muon_check(hp):
    check_unit(hp, "momentum", closed=True)
    check_nonneg(hp, "weight_decay")
    check_positive(hp, "eps")
    _require(isinstance(hp["nesterov"], bool), "nesterov", "a bool", hp["nesterov"])
    c = hp["ns_coefficients"]
    _require(isinstance(c, (tuple, list)) and len(c) == 3 and all(_real(x) for x in c),
             "ns_coefficients", "a tuple of three finite numbers (a, b, c)", c)
    n = hp["ns_steps"]
    _require(isinstance(n, numbers.Integral) and not isinstance(n, (bool, np.bool_)) and 0 <= n < 100,
             "ns_steps", "an int in [0, 100)", n)
    _require(hp["adjust_lr_fn"] in MUON_ADJUST_LR_FNS, "adjust_lr_fn",
             f"one of {MUON_ADJUST_LR_FNS}", hp["adjust_lr_fn"])


_add(Rule("muon", "Muon", dict(lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                               ns_coefficients=MUON_NS_COEFFICIENTS, eps=1e-7, ns_steps=5,
                               adjust_lr_fn=None),
          lambda hp: (("momentum_buffer", 0.0),), _muon_scalars, _muon_check, ("momentum_buffer",),
          kind=ORTHOGONALIZE, weight_decay="decoupled", param_ndim=2))


# --------------------------------------------------------------------------- LBFGS, SparseAdam
#
# Two rules that the bucketed step pipeline cannot drive, so they are kept out of ``RULES``
# (whose every entry the generic machinery -- functional API, buckets, q8, 16-bit tiles,
# sharding, the table-driven tests -- steps the same way) and listed in ``OWN_DRIVER_RULES``
# with a kind that says why.  Their classes (``fastopt/_lbfgs.py``, ``fastopt/_sparse.py``)
# drive them; see docs/design.md, "LBFGS and SparseAdam".

#: a closure-driven quasi-Newton method over the flattened params (LBFGS): each step calls a
#: closure several times and keeps flat history vectors, not per-tensor elementwise state
CLOSURE = "closure"
#: lazy updates of the rows an ``(indices, values)`` grad touches (SparseAdam): the grad is not
#: param-shaped and every param keeps its own step count
SPARSE_ROWS = "sparse_rows"
OWN_DRIVER_KINDS = (CLOSURE, SPARSE_ROWS)
OWN_DRIVER_RULES: dict[str, Rule] = {}

#: torch.optim.LBFGS's state entries (flat over all params, one set per optimizer)
LBFGS_STATE = ("d", "t", "old_dirs", "old_stps", "ro", "H_diag", "prev_flat_grad", "prev_loss",
               "n_iter", "func_evals")
LBFGS_LINE_SEARCH_FNS = (None, "strong_wolfe")


def _int_at_least(hp, name, low):
    v = hp[name]
    _require(isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_)) and v >= low,
             name, f"an int >= {low}", v)


def _lbfgs_check(hp):
    _int_at_least(hp, "max_iter", 1)
    _int_at_least(hp, "max_eval", 1)
    _int_at_least(hp, "history_size", 1)
    check_nonneg(hp, "tolerance_grad", "tolerance_change")
    _require(hp["line_search_fn"] in LBFGS_LINE_SEARCH_FNS, "line_search_fn",
             f"one of {LBFGS_LINE_SEARCH_FNS}", hp["line_search_fn"])


def _no_scalars(hp, t, gs):
    # LBFGS computes its scalars (step length, curvature products) from the closure's values
    # inside the step; nothing is fixed by (hp, t) alone
    return {}, gs


def _sparse_adam_scalars(hp, t, gs):
    """Host scalars of a param at its own step ``t`` (torch keeps ``step`` per param)."""
    bc1, bc2 = _bias_corrections(hp, t)
    s = dict(lr=hp["lr"], eps=hp["eps"], **_betas(hp))
    s["step_size"] = hp["lr"] * math.sqrt(bc2) / bc1
    return s, gs


def _sparse_adam_check(hp):
    check_positive(hp, "lr", "eps")  # torch: "Invalid learning rate" for lr <= 0
    check_betas(hp)
    _require(isinstance(hp["maximize"], bool), "maximize", "a bool", hp["maximize"])


OWN_DRIVER_RULES["lbfgs"] = Rule(
    "lbfgs", "LBFGS", dict(lr=1.0, max_iter=20, max_eval=None, tolerance_grad=1e-7,
                           tolerance_change=1e-9, history_size=100, line_search_fn=None),
    lambda hp: (), _no_scalars, _lbfgs_check, LBFGS_STATE, kind=CLOSURE, weight_decay=None)
OWN_DRIVER_RULES["sparse_adam"] = Rule(
    "sparse_adam", "SparseAdam", dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, maximize=False),
    lambda hp: (("exp_avg", 0.0), ("exp_avg_sq", 0.0)), _sparse_adam_scalars, _sparse_adam_check,
    ("exp_avg", "exp_avg_sq"), kind=SPARSE_ROWS, weight_decay=None,
    pack=("step_size", "eps") + _BETAS, nonnegative_state=("exp_avg_sq",))


# --------------------------------------------------------------------------- Adafactor

def adafactor_state_shape(name: str, shape: tuple) -> tuple | None:
    """torch.optim.Adafactor's state shapes: a param of >= 2 dims keeps ``row_var``
    (``shape[:-1] + (1,)``) and ``col_var`` (``shape[:-2] + (1, shape[-1])``), factored over
    its last two dims and batched over the leading ones; a 0-D or 1-D param keeps a full
    ``variance``.  An n x m matrix costs n + m state elements instead of n*m."""
    factored = len(shape) >= 2
    if name == "row_var":
        return shape[:-1] + (1,) if factored else None
    if name == "col_var":
        return shape[:-2] + (1, shape[-1]) if factored else None
    if name == "variance":
        return None if factored else shape
    raise KeyError(name)


def adafactor_eps1(s: dict, dtype) -> float:
    """Adafactor's ``eps1`` for a param of ``dtype``: the hyperparameter, or (None) the dtype's
    machine epsilon, as torch.optim.Adafactor takes ``torch.finfo(param.dtype).eps``."""
    return float(np.finfo(dtype).eps) if s["eps1"] is None else s["eps1"]


def _adafactor_scalars(hp, t, gs):
    eps1, eps2 = hp["eps"]
    w = float(t) ** hp["beta2_decay"]          # torch's one_minus_beta2_t (double)
    swap, c = _lerp_form(w)                    # var = lerp(var, mean of g^2, w)
    return dict(lr=hp["lr"], weight_decay=hp["weight_decay"],
                rho=min(hp["lr"], 1.0 / math.sqrt(t)),   # torch's rho_t (relative step off)
                eps1=None if eps1 is None else float(eps1), eps2=float(eps2), d=float(hp["d"]),
                var_swap=swap, var_c=c), gs


def _adafactor_check(hp):
    b = hp["beta2_decay"]
    _require(_real(b) and b <= 0, "beta2_decay", "a finite number <= 0", b)
    e = hp["eps"]
    _require(isinstance(e, (tuple, list)) and len(e) == 2
             and (e[0] is None or (_real(e[0]) and e[0] >= 0)) and _real(e[1]) and e[1] >= 0,
             "eps", "a pair (eps1, eps2): eps1 None (the dtype's epsilon) or a finite number "
             ">= 0, eps2 a finite number >= 0", e)
    _require(_real(hp["d"]) and hp["d"] >= 1, "d", "a finite number >= 1", hp["d"])
    check_nonneg(hp, "weight_decay")


_add(Rule("adafactor", "Adafactor", dict(lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0,
                                         weight_decay=0.0),
          lambda hp: (("row_var", 0.0), ("col_var", 0.0), ("variance", 0.0)),
          _adafactor_scalars, _adafactor_check, ("row_var", "col_var", "variance"),
          kind=FACTORED, weight_decay="decoupled", state_shape=adafactor_state_shape,
          nonnegative_state=("row_var", "col_var", "variance")))


# --------------------------------------------------------------------------- Schedule-Free
# The ``schedulefree`` package's (1.4.1) AdamWScheduleFree and SGDScheduleFree (Defazio et al.
# 2024). The param holds y while training; the state keeps z (starting as a copy of the param)
# and AdamW's exp_avg_sq. ``lr_max`` and ``weight_sum`` are group state, updated each step on the
# host exactly as the package does. ``train()``/``eval()`` on the classes move the param between
# y and x = lerp(y, z, 1 - 1/beta1) (fastopt/_optim.py).

#: The initial value of a state array that starts as a copy of its param (``Rule.state``).
COPY_OF_PARAM = "param"

_SF_Q8 = ("z is an iterate of the params' own magnitude, not a statistic: 8-bit blockwise "
          "codes would move the params themselves by up to a code's width")


def _sf_weights(hp, t, gs, b1):
    """The package's host scalars of step ``t`` (its ``k = t - 1``): lr with warmup, lr_max,
    weight_sum, the interpolation weight ckp1 and y's step factor ``lr*(b1*(1-ckp1) - 1)``."""
    k = t - 1
    warm = hp["warmup_steps"]
    sched = (k + 1) / warm if k < warm else 1.0
    lr = hp["lr"] * sched
    lr_max = max(lr, gs["lr_max"])
    weight = ((k + 1) ** hp["r"]) * (lr_max ** hp["weight_lr_power"])
    weight_sum = gs["weight_sum"] + weight
    try:
        ckp1 = weight / weight_sum
    except ZeroDivisionError:
        ckp1 = 0.0
    swap, c = _lerp_form(ckp1)
    s = dict(lr=lr, y_lr=lr * (b1 * (1.0 - ckp1) - 1.0), c_lerp=c, lerp_swap=swap,
             weight_decay=hp["weight_decay"])
    return s, {**gs, "lr_max": lr_max, "weight_sum": weight_sum}


def _sf_adamw_scalars(hp, t, gs):
    b1, b2 = hp["betas"]
    s, new = _sf_weights(hp, t, gs, b1)
    s.update(beta2=b2, one_minus_beta2=1.0 - b2, eps=hp["eps"], bc2=1.0 - b2 ** t)
    return s, new


def _sf_sgd_scalars(hp, t, gs):
    return _sf_weights(hp, t, gs, hp["momentum"])


def _sf_common_check(hp):
    check_nonneg(hp, "weight_decay", "r", "weight_lr_power")
    w = hp["warmup_steps"]
    _require(isinstance(w, numbers.Integral) and not isinstance(w, (bool, np.bool_)) and w >= 0,
             "warmup_steps", "an int >= 0", w)


def _sf_adamw_check(hp):
    _sf_common_check(hp)
    check_betas(hp)
    _require(hp["betas"][0] > 0, "betas[0]", "a number in (0, 1) (eval() divides by beta1)",
             hp["betas"][0])
    check_positive(hp, "eps")


def _sf_sgd_check(hp):
    _sf_common_check(hp)
    m = hp["momentum"]
    _require(_real(m) and 0 < m < 1, "momentum", "a number in (0, 1) (as SGDScheduleFree)", m)


#: ``train_mode`` (1: the params hold y, 0: x) is the classes' ``train()``/``eval()`` switch; it
#: lives in the group state so that state_dict() and checkpoints carry it (as the package keeps
#: it per param group). A functional step is always a training step on y.
_SF_GSTATE = {"lr_max": -1.0, "weight_sum": 0.0, "train_mode": 1.0}
_SF_PACK = ("lr", "y_lr", "c_lerp")
_add(Rule("schedule_free_adamw", "AdamWScheduleFree",
          dict(lr=0.0025, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, warmup_steps=0, r=0.0,
               weight_lr_power=2.0),
          lambda hp: (("z", COPY_OF_PARAM), ("exp_avg_sq", 0.0)),
          _sf_adamw_scalars, _sf_adamw_check, ("z", "exp_avg_sq"), group_state=_SF_GSTATE,
          weight_decay="rule", pack=_SF_PACK + ("beta2", "one_minus_beta2", "eps", "bc2",
                                                "weight_decay"),
          flags=("lerp_swap",), nonnegative_state=("exp_avg_sq",), q8_state_refused=_SF_Q8))
_add(Rule("schedule_free_sgd", "SGDScheduleFree",
          dict(lr=1.0, momentum=0.9, weight_decay=0.0, warmup_steps=0, r=0.0,
               weight_lr_power=2.0),
          lambda hp: (("z", COPY_OF_PARAM),), _sf_sgd_scalars, _sf_sgd_check, ("z",),
          group_state=_SF_GSTATE, pack=_SF_PACK, flags=("lerp_swap",), q8_state_refused=_SF_Q8))


# --------------------------------------------------------------------------- LARS
# optax 0.2.8's lars: chain(add_decayed_weights(wd), scale_by_trust_ratio(trust_coefficient, eps),
# scale_by_learning_rate(lr), trace(momentum, nesterov)).  Per tensor u = g + wd*p,
# trust = trust_coefficient*|p|/(|u| + eps) (1 where |p| or |u| is 0), d = -(lr*trust)*u,
# m = d + momentum*m, p += m (nesterov: p += d + momentum*m).  optax's weight_decay_mask and
# trust_ratio_mask are per-group options here: a group with weight_decay=0 and trust_ratio=False
# (biases, norms) gets plain momentum SGD on its grads.


def _lars_scalars(hp, t, gs):
    return dict(lr=hp["lr"], weight_decay=hp["weight_decay"], momentum=hp["momentum"],
                eps=hp["eps"], trust_coefficient=hp["trust_coefficient"],
                trust_ratio=1.0 if hp["trust_ratio"] else 0.0, nesterov=bool(hp["nesterov"])), gs


def _lars_trust_coef(xp, pn, un, s):
    """LARS's ``-(lr * trust)`` per tensor, optax's ``trust_coefficient*|p|/(|u| + eps)`` (1 where
    either norm is 0, or with ``trust_ratio`` off)."""
    ok = (pn > 0) & (un > 0) & (s["trust_ratio"] != 0)
    trust = xp.where(ok, s["trust_coefficient"] * pn / (xp.where(ok, un, 1.0) + s["eps"]), 1.0)
    return -(s["lr"] * trust)


def _lars_check(hp):
    check_nonneg(hp, "weight_decay", "momentum", "eps", "trust_coefficient")
    for n in ("nesterov", "trust_ratio"):
        _require(isinstance(hp[n], bool), n, "a bool", hp[n])


_add(Rule("lars", "LARS", dict(lr=1e-3, weight_decay=0.0, trust_coefficient=1e-3, eps=0.0,
                               momentum=0.9, nesterov=False, trust_ratio=True),
          lambda hp: (("momentum_buffer", 0.0),), _lars_scalars, _lars_check, ("momentum_buffer",),
          kind=TRUST_RATIO, weight_decay="rule",
          pack=("lr", "momentum", "eps", "weight_decay", "trust_coefficient"), flags=("nesterov",),
          trust_scalars=("lr", "trust_coefficient", "eps", "trust_ratio"),
          trust_coef=_lars_trust_coef, trust_accesses=(3, 2, 2)))
