"""The functional API: one stateless function per rule, plus norm and clip helpers.

Each rule function takes the params, the grads and one list per state array
(in torch.optim's names, plural: ``exp_avgs``, ``exp_avg_sqs``, ...), updates
them all in place with one step of the pipeline (docs/design.md) and returns
a :class:`~fastopt.StepInfo`::

    info = fastopt.functional.adam(params, grads, exp_avgs, exp_avg_sqs,
                                   step=t, lr=1e-3, betas=(0.9, 0.999))

``step`` is the 1-based index of this step.  Optional state lists
(``max_exp_avg_sqs`` for ``amsgrad=True``, ``momentum_buffers`` for momentum)
may be omitted when their option is off.  NAdam also takes ``mu_product``
(the product of its momentum coefficients so far, 1.0 at the start) and returns
the new one in ``info.group_state[0]["mu_product"]``.  The optimizer classes
call these same pieces.  ``lr`` here is a float (a schedule is the classes'
business: evaluate it yourself).

The precision options are the classes' (``state_dtype``, ``master_weights``,
``stochastic_rounding``, ``seed``; see :class:`fastopt.Adam`): the state lists
must then have the resolved state dtype (float32 for 16-bit params by
default), and ``master_weights=True`` takes ``masters``, a float32 copy of
each param (start it as the exact float32 value of the param).  ``step`` is
the step number stochastic rounding hashes.

With ``state_dtype="q8"`` each state entry of a param with at least
``min_8bit_size`` elements (4096) is a ``(codes, absmax)`` pair, updated in
place: uint8 codes shaped like the param and a float32 absmax per block of 256
elements (``fastopt.quantization.quantize_blockwise`` of the initial value
makes one; docs/design.md, "8-bit state format"); a smaller param's entry is a
float32 array.
"""

from __future__ import annotations

import math

import numpy as np

from . import _backend
from . import precision as _prec
from . import quantization as _q
from ._backend import array_kind
from ._pipeline import StepInfo, make_buckets, run_step
from ._rules import CLIP_EPS, PRECISION_DEFAULTS, RULES, Rule, state_arg
from ._validate import (as_list, check_array, check_companions, check_grad_scale, check_nonfinite,
                        check_min_8bit_size, check_param_ndim, check_params, check_q8_options,
                        flat, is_q8, label, param_precision, prepare_groups, resolve_precisions,
                        step_options)

__all__ = ["sgd", "adam", "adamw", "adagrad", "rmsprop", "adadelta", "adamax", "nadam", "radam",
           "lion", "lamb", "adahessian", "newton", "muon", "global_norm", "clip_grad_norm_",
           "clip_grad_value_"]
__all__ += ["asgd", "rprop", "adabelief", "yogi", "ademamix"]
__all__ += ["adafactor"]
__all__ += ["schedule_free_adamw", "schedule_free_sgd"]
__all__ += ["lars"]

_CALL_OPTIONS = ("step", "grad_scale", "nonfinite", "backend", "mu_product", "eta", "mu",
                 "lr_max", "weight_sum")

#: The group state a rule function takes and returns (``Rule.group_state``): name -> (test,
#: what it must be).  NaN here would reach every param, so each is range checked.
_GSTATE_CHECKS = {
    "mu_product": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "eta": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "mu": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    # Schedule-Free: the largest lr so far (-1 before the first step) and the sum of weights
    "lr_max": (lambda v: math.isfinite(v) and v >= -1, "a finite number >= -1"),
    "weight_sum": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
}

#: Group state a rule function does not take: Schedule-Free's train/eval switch (a functional
#: step is always a training step, on the y the params hold).
_GSTATE_FIXED = {"train_mode": 1.0}


def _shaped_state_list(rule, params, arrays, arg, name, kind, dtype_of) -> list:
    """The list ``arg`` of a state that is not shaped like its param (``Rule.state_shape``):
    entry ``i`` is None where params[i] keeps no such array, else a C-contiguous, writable
    array of the rule's shape and the param's state dtype."""
    arrays = as_list(arrays, arg)
    if len(arrays) != len(params):
        raise ValueError(f"{arg}: expected {len(params)} entries (one per param), got {len(arrays)}")
    for i, (p, a) in enumerate(zip(params, arrays)):
        shape = rule.state_shape_of(name, p.shape)
        lab = label(arg, i)
        if shape is None:
            if a is not None:
                raise ValueError(f"{lab}: expected None ({label('params', i)} of shape "
                                 f"{tuple(p.shape)} keeps no {name}), got {type(a).__name__}")
            continue
        if a is None:
            raise TypeError(f"{lab}: expected an array of shape {shape} (the {name} of "
                            f"{label('params', i)}), got None")
        check_array(a, lab, kind)
        want = dtype_of(p)
        if a.shape != shape or a.dtype != want:
            raise ValueError(f"{lab}: expected {want} {shape} (the {name} of {label('params', i)}, "
                             f"shape {tuple(p.shape)}), got {a.dtype} {a.shape}")
        if not a.flags.c_contiguous:
            raise ValueError(f"{lab}: expected a C-contiguous array, got strides {a.strides}")
        if kind == "numpy" and not a.flags.writeable:
            raise ValueError(f"{lab}: expected a writeable array, got a read-only one")
    return arrays


def _run(rule: Rule, args: dict) -> StepInfo:
    """The body of every rule function: ``args`` are its arguments by name (its ``locals()``).

    The state lists are the rule's state names in the plural (``exp_avgs``);
    every other argument but the call options of ``_CALL_OPTIONS`` is a
    hyperparameter or a pipeline option.
    """
    args = dict(args)
    params, grads = args.pop("params"), args.pop("grads")
    extra = args.pop(rule.extra) if rule.extra is not None else None
    given = {name: args.pop(state_arg(name)) for name in rule.all_state}
    step, grad_scale, nonfinite, backend = (args.pop(k) for k in _CALL_OPTIONS[:4])
    given_gstate = {k: args.pop(k) for k in _GSTATE_CHECKS if k in args}
    masters = args.pop("masters")
    popts = {k: args.pop(k) for k in PRECISION_DEFAULTS}
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"step: expected the 1-based index of this step (an int >= 1), got {step!r}")
    hp = step_options(rule, args, step, schedules=False)
    nonfinite = check_nonfinite(nonfinite)
    inv_scale = check_grad_scale(grad_scale)

    params = as_list(params, "params")
    labels = [label("params", i) for i in range(len(params))]
    kind = check_params(params, labels)
    check_param_ndim(rule, params, labels)
    precisions = resolve_precisions(rule, params, labels, popts)
    min8 = check_min_8bit_size(popts["min_8bit_size"])
    pprec = [param_precision(precisions, p, min8) for p in params]
    be = _backend.resolve(backend, kind, tuple(set(pprec)))
    any_q8 = any(is_q8(pr) for pr in pprec)
    if any_q8:
        check_q8_options(rule, hp)
    states, written = {}, []
    names = [(state_arg(name), name, lambda p: param_precision(precisions, p, min8).state)
             for name, _ in rule.state(hp)]
    if popts["master_weights"]:
        names.append(("masters", "master", lambda p: np.dtype(np.float32)))
    elif masters is not None:
        raise ValueError("masters: expected None without master_weights=True, got a list")
    for arg, name, dtype_of in names:
        arrays = masters if name == "master" else given[name]
        if arrays is None:
            raise TypeError(f"{rule.name}(): {arg} is required with these options")
        if any_q8 and name != "master":
            codes, absmax = _q8_state_list(params, arrays, arg, kind, pprec, dtype_of)
            written += [(arg, codes), (arg + " absmax", [a for a in absmax if a is not None])]
            states[name] = [flat(a) for a in codes]
            states[name + "_absmax"] = absmax
            continue
        if rule.state_shape is not None and name != "master":
            checked = _shaped_state_list(rule, params, arrays, arg, name, kind, dtype_of)
            written.append((arg, [a for a in checked if a is not None]))
            states[name] = [None if a is None else flat(a) for a in checked]
            continue
        checked = check_companions(params, arrays, arg, label, kind, dtype_of=dtype_of)
        _check_writable(checked, arg, kind)
        written.append((arg, checked))
        states[name] = [flat(a) for a in checked]
    (prepared,) = prepare_groups(rule, [hp], [len(params)], params, grads, extra, kind=kind,
                                 caller=f"{rule.name}()", written=written)
    gstate = {}
    for k in rule.group_state:
        if k in _GSTATE_FIXED:
            gstate[k] = _GSTATE_FIXED[k]
            continue
        v = given_gstate[k]
        ok, expected = _GSTATE_CHECKS[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not ok(v):
            raise ValueError(f"{k}: expected {expected}, got {v!r}")
        gstate[k] = float(v)
    group = prepared.group_step(make_buckets([flat(p) for p in params], states,
                                             param_precisions=pprec,
                                             shapes=[tuple(p.shape) for p in params]
                                             if rule.needs_shapes else None), gstate)
    return run_step(be, rule, [group], step, nonfinite, inv_scale)


def _q8_state_list(params, arrays, arg, kind, pprec, dtype_of):
    """Check a state list under ``state_dtype="q8"``; returns ``(codes, absmax)`` lists.

    The entry of a param whose state is 8-bit is a ``(codes, absmax)`` pair: uint8
    codes shaped like the param and a float32 absmax of ``ceil(n / 256)`` entries
    (``fastopt.quantization.quantize_blockwise`` makes one); a param below
    ``min_8bit_size`` elements has a float32 array instead (its absmax entry is None).
    """
    if array_kind(arrays) is not None or isinstance(arrays, (str, bytes)) \
            or not hasattr(arrays, "__iter__"):
        raise TypeError(f"{arg}: expected a list with one state per param, got "
                        f"{type(arrays).__name__}")
    arrays = list(arrays)
    if len(arrays) != len(params):
        raise ValueError(f"{arg}: expected {len(params)} entries (one per param), got {len(arrays)}")
    codes, absmax, plain = list(arrays), [None] * len(arrays), []
    for i, (p, a, pr) in enumerate(zip(params, arrays, pprec)):
        lab = f"{arg}[{i}]"
        if not is_q8(pr):
            plain.append(i)
            continue
        if not (isinstance(a, tuple) and len(a) == 2):
            raise TypeError(f"{lab}: expected a (codes, absmax) pair (the 8-bit state of "
                            f"params[{i}], {p.size} elements >= min_8bit_size), got "
                            f"{type(a).__name__}")
        c, m = a
        nb = -(-p.size // _q.BLOCKSIZE)
        for what, x, dt, shape in (("codes", c, np.uint8, p.shape), ("absmax", m, np.float32, (nb,))):
            if array_kind(x) != kind:
                raise TypeError(f"{lab} {what}: expected a {kind} array, got {type(x).__name__}")
            if x.dtype != dt or x.shape != shape:
                raise ValueError(f"{lab} {what}: expected {np.dtype(dt)} {shape}, got "
                                 f"{x.dtype} {x.shape}")
            if not x.flags.c_contiguous:
                raise ValueError(f"{lab} {what}: expected a C-contiguous array, got strides "
                                 f"{x.strides}")
            if kind == "numpy" and not x.flags.writeable:
                raise ValueError(f"{lab} {what}: expected a writeable array, got a read-only one")
        if kind == "numpy" and np.may_share_memory(c, p):
            raise ValueError(f"{lab} codes: expected an array separate from its param")
        codes[i], absmax[i] = c, m
    if plain:
        checked = check_companions([params[i] for i in plain], [arrays[i] for i in plain], arg,
                                   lambda n, j: label(n, plain[j]), kind, dtype_of=dtype_of)
        _check_writable(checked, arg, kind)
        for i, a in zip(plain, checked):
            codes[i] = a
    return codes, absmax


def _check_writable(arrays, name, kind):
    if kind == "numpy":
        for i, a in enumerate(arrays):
            if not a.flags.writeable:
                raise ValueError(f"{name}[{i}]: expected a writeable array, got a read-only one")


# One function per rule, written out so that IDEs and type checkers see them; the arguments
# mirror the rule table (fastopt/_rules.py), which tests/test_core_api.py checks.

def sgd(params, grads, momentum_buffers=None, masters=None, *, step, lr=1e-3, momentum=0.0, dampening=0.0,
        nesterov=False, weight_decay=0.0, maximize=False, clip_value=None, clip_norm=None,
        clip_global_norm=None, weight_clip=None, max_norm=None, grad_scale=None, nonfinite="raise",
        backend="auto", state_dtype=None,
        master_weights=False, stochastic_rounding=False, seed=0, min_8bit_size=4096) -> StepInfo:
    """One :class:`fastopt.SGD` step over lists of arrays, in place (the math is on the class).

    State lists: ``momentum_buffers`` (needed when ``momentum != 0``).
    """
    return _run(RULES["sgd"], locals())


def adam(params, grads, exp_avgs=None, exp_avg_sqs=None, max_exp_avg_sqs=None, masters=None, *, step, lr=1e-3,
        betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, bias_correction=True,
        maximize=False, clip_value=None, clip_norm=None, clip_global_norm=None, weight_clip=None,
        max_norm=None, grad_scale=None, nonfinite="raise", backend="auto", state_dtype=None,
        master_weights=False, stochastic_rounding=False, seed=0, min_8bit_size=4096) -> StepInfo:
    """One :class:`fastopt.Adam` step over lists of arrays, in place (the math is on the class).

    State lists: ``exp_avgs``, ``exp_avg_sqs``; ``max_exp_avg_sqs`` with ``amsgrad=True``.
    """
    return _run(RULES["adam"], locals())


def adamw(params, grads, exp_avgs=None, exp_avg_sqs=None, max_exp_avg_sqs=None, masters=None, *, step, lr=1e-3,
        betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, bias_correction=True,
        maximize=False, clip_value=None, clip_norm=None, clip_global_norm=None, weight_clip=None,
        max_norm=None, grad_scale=None, nonfinite="raise", backend="auto", state_dtype=None,
        master_weights=False, stochastic_rounding=False, seed=0, min_8bit_size=4096) -> StepInfo:
    """One :class:`fastopt.AdamW` step over lists of arrays, in place (the math is on the class).

    State lists: ``exp_avgs``, ``exp_avg_sqs``; ``max_exp_avg_sqs`` with ``amsgrad=True``.
    """
    return _run(RULES["adamw"], locals())


def adagrad(params, grads, sums=None, masters=None, *, step, lr=1e-2, lr_decay=0.0, weight_decay=0.0,
        initial_accumulator_value=0.0, eps=1e-10, maximize=False, clip_value=None, clip_norm=None,
        clip_global_norm=None, weight_clip=None, max_norm=None, grad_scale=None, nonfinite="raise",
        backend="auto", state_dtype=None,
        master_weights=False, stochastic_rounding=False, seed=0, min_8bit_size=4096) -> StepInfo:
    """One :class:`fastopt.Adagrad` step over lists of arrays, in place (the math is on the class).

    State lists: ``sums`` (start them at ``initial_accumulator_value``).
    """
    return _run(RULES["adagrad"], locals())


def rmsprop(params, grads, square_avgs=None, momentum_buffers=None, grad_avgs=None, masters=None, *, step,
        lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False,
        maximize=False, clip_value=None, clip_norm=None, clip_global_norm=None, weight_clip=None,
        max_norm=None, grad_scale=None, nonfinite="raise", backend="auto", state_dtype=None,
        master_weights=False, stochastic_rounding=False, seed=0, min_8bit_size=4096) -> StepInfo:
    """One :class:`fastopt.RMSprop` step over lists of arrays, in place (the math is on the class).

    State lists: ``square_avgs``; ``momentum_buffers`` with ``momentum > 0``; ``grad_avgs`` with
    ``centered=True``.
    """
    return _run(RULES["rmsprop"], locals())


def adadelta(params, grads, square_avgs=None, acc_deltas=None, masters=None, *, step, lr=1.0, rho=0.9, eps=1e-6,
        weight_decay=0.0, maximize=False, clip_value=None, clip_norm=None, clip_global_norm=None,
        weight_clip=None, max_norm=None, grad_scale=None, nonfinite="raise",
        backend="auto", state_dtype=None,
        master_weights=False, stochastic_rounding=False, seed=0, min_8bit_size=4096) -> StepInfo:
    """One :class:`fastopt.Adadelta` step over lists of arrays, in place (the math is on the class).

    State lists: ``square_avgs``, ``acc_deltas``.
    """
    return _run(RULES["adadelta"], locals())


def adamax(params, grads, exp_avgs=None, exp_infs=None, masters=None, *, step, lr=2e-3, betas=(0.9, 0.999),
        eps=1e-8, weight_decay=0.0, maximize=False, clip_value=None, clip_norm=None,
        clip_global_norm=None, weight_clip=None, max_norm=None, grad_scale=None, nonfinite="raise",
        backend="auto", state_dtype=None,
        master_weights=False, stochastic_rounding=False, seed=0, min_8bit_size=4096) -> StepInfo:
    """One :class:`fastopt.Adamax` step over lists of arrays, in place (the math is on the class).

    State lists: ``exp_avgs``, ``exp_infs``.
    """
    return _run(RULES["adamax"], locals())


def nadam(params, grads, exp_avgs=None, exp_avg_sqs=None, masters=None, *, step, lr=2e-3, betas=(0.9, 0.999),
        eps=1e-8, weight_decay=0.0, momentum_decay=4e-3, maximize=False, clip_value=None,
        clip_norm=None, clip_global_norm=None, weight_clip=None, max_norm=None, mu_product=1.0,
        grad_scale=None, nonfinite="raise", backend="auto", state_dtype=None,
        master_weights=False, stochastic_rounding=False, seed=0, min_8bit_size=4096) -> StepInfo:
    """One :class:`fastopt.NAdam` step over lists of arrays, in place (the math is on the class).

    State lists: ``exp_avgs``, ``exp_avg_sqs``; ``mu_product`` is the product of the momentum
    coefficients so far (1.0 at the start), the new one is ``info.group_state[0]["mu_product"]``.
    """
    return _run(RULES["nadam"], locals())


def radam(params, grads, exp_avgs=None, exp_avg_sqs=None, masters=None, *, step, lr=1e-3, betas=(0.9, 0.999),
        eps=1e-8, weight_decay=0.0, maximize=False, clip_value=None, clip_norm=None,
        clip_global_norm=None, weight_clip=None, max_norm=None, grad_scale=None, nonfinite="raise",
        backend="auto", state_dtype=None,
        master_weights=False, stochastic_rounding=False, seed=0, min_8bit_size=4096) -> StepInfo:
    """One :class:`fastopt.RAdam` step over lists of arrays, in place (the math is on the class).

    State lists: ``exp_avgs``, ``exp_avg_sqs``.
    """
    return _run(RULES["radam"], locals())


def lion(params, grads, exp_avgs=None, masters=None, *, step, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0,
        maximize=False, clip_value=None, clip_norm=None, clip_global_norm=None, weight_clip=None,
        max_norm=None, grad_scale=None, nonfinite="raise", backend="auto", state_dtype=None,
        master_weights=False, stochastic_rounding=False, seed=0, min_8bit_size=4096) -> StepInfo:
    """One :class:`fastopt.Lion` step over lists of arrays, in place (the math is on the class).

    State lists: ``exp_avgs``.
    """
    return _run(RULES["lion"], locals())


def lamb(params, grads, exp_avgs=None, exp_avg_sqs=None, masters=None, *, step, lr=1e-3, betas=(0.9, 0.999),
        eps=1e-6, weight_decay=0.0, bias_correction=True, maximize=False, clip_value=None,
        clip_norm=None, clip_global_norm=None, weight_clip=None, max_norm=None, grad_scale=None,
        nonfinite="raise", backend="auto", state_dtype=None,
        master_weights=False, stochastic_rounding=False, seed=0, min_8bit_size=4096) -> StepInfo:
    """One :class:`fastopt.LAMB` step over lists of arrays, in place (the math is on the class).

    State lists: ``exp_avgs``, ``exp_avg_sqs``.
    """
    return _run(RULES["lamb"], locals())


def adahessian(params, grads, hessian_diags, exp_avgs=None, exp_hessian_diag_sqs=None, masters=None, *, step,
        lr=0.15, betas=(0.9, 0.999), eps=1e-4, hessian_power=1.0, weight_decay=0.0,
        maximize=False, clip_value=None, clip_norm=None, clip_global_norm=None, weight_clip=None,
        max_norm=None, grad_scale=None, nonfinite="raise", backend="auto", state_dtype=None,
        master_weights=False, stochastic_rounding=False, seed=0, min_8bit_size=4096) -> StepInfo:
    """One :class:`fastopt.AdaHessian` step over lists of arrays, in place (the math is on the class).

    State lists: ``exp_avgs``, ``exp_hessian_diag_sqs``; ``hessian_diags`` is read like ``grads``.
    """
    return _run(RULES["adahessian"], locals())


def newton(params, grads, hessians, masters=None, *, step, lr=1.0, damping=1e-4, maximize=False,
        clip_value=None, clip_norm=None, clip_global_norm=None, weight_clip=None, max_norm=None,
        grad_scale=None, nonfinite="raise", backend="auto", state_dtype=None,
        master_weights=False, stochastic_rounding=False, seed=0, min_8bit_size=4096) -> StepInfo:
    """One :class:`fastopt.Newton` step over lists of arrays, in place (the math is on the class).

    State lists: none; ``hessians[i]`` is ``(n, n)`` for an ``n``-element ``params[i]``.
    """
    return _run(RULES["newton"], locals())


def muon(params, grads, momentum_buffers=None, masters=None, *, step, lr=1e-3, weight_decay=0.1,
         momentum=0.95, nesterov=True, ns_coefficients=(3.4445, -4.775, 2.0315), eps=1e-7,
         ns_steps=5, adjust_lr_fn=None, maximize=False, clip_value=None, clip_norm=None,
         clip_global_norm=None, weight_clip=None, max_norm=None, grad_scale=None,
         nonfinite="raise", backend="auto", state_dtype=None, master_weights=False,
         stochastic_rounding=False, seed=0, min_8bit_size=4096) -> StepInfo:
    """One :class:`fastopt.Muon` step over lists of 2-D arrays, in place (the math is on the class).

    State lists: ``momentum_buffers``.
    """
    return _run(RULES["muon"], locals())


def adafactor(params, grads, row_vars=None, col_vars=None, variances=None, masters=None, *, step,
              lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0, weight_decay=0.0,
              maximize=False, clip_value=None, clip_norm=None, clip_global_norm=None,
              weight_clip=None, max_norm=None, grad_scale=None, nonfinite="raise",
              backend="auto", state_dtype=None, master_weights=False, stochastic_rounding=False,
              seed=0, min_8bit_size=4096) -> StepInfo:
    """One :class:`fastopt.Adafactor` step over lists of arrays, in place (the math is on the class).

    State lists, one entry per param, starting at 0: ``row_vars`` (shape ``p.shape[:-1] +
    (1,)``) and ``col_vars`` (``p.shape[:-2] + (1, p.shape[-1])``) for params of two or more
    dims, None for the others; ``variances`` (shaped like the param) for 0-/1-D params, None
    for the others.  ``step`` drives ``t**beta2_decay`` and ``min(lr, 1/sqrt(t))``.
    """
    return _run(RULES["adafactor"], locals())


def _ops_for(arrays, name, backend="auto"):
    arrays = as_list(arrays, name)
    if not arrays:
        return arrays, None
    kind = None
    for i, a in enumerate(arrays):
        kind = check_array(a, f"{name}[{i}]", kind)
    # 16-bit arrays need a backend that takes them ('auto' picks one, an explicit one may refuse)
    precs = {a.dtype: _prec.resolve_precision(a.dtype) for a in arrays if a.dtype.itemsize == 2}
    return arrays, _backend.get_ops(_backend.resolve(backend, kind, tuple(precs.values())))


def global_norm(arrays, *, backend="auto") -> float:
    """The 2-norm of all arrays taken together, ``sqrt(sum_i ||a_i||^2)``, accumulated in float64."""
    arrays, ops = _ops_for(arrays, "arrays", backend)
    if ops is None:
        return 0.0
    return float(ops.xp.sqrt(ops.xp.sum(ops.sumsq([a.reshape(-1) for a in arrays]))))


def clip_grad_norm_(grads, max_norm, *, backend="auto") -> float:
    """Scale ``grads`` in place so their global norm is at most ``max_norm``; returns the norm before.

    As torch.nn.utils.clip_grad_norm_: factor ``min(1, max_norm / (norm + 1e-6))``.
    """
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not max_norm > 0:
        raise ValueError(f"max_norm: expected a number > 0, got {max_norm!r}")
    grads, ops = _ops_for(grads, "grads", backend)
    if ops is None:
        return 0.0
    _check_writable_contiguous(grads, "grads")
    flat = [g.reshape(-1) for g in grads]
    total = ops.xp.sqrt(ops.xp.sum(ops.sumsq(flat)))
    factor = ops.xp.minimum(1.0, max_norm / (total + CLIP_EPS))
    ops.scale_(flat, ops.xp.full(len(flat), factor, dtype="float64"))
    return float(total)


def clip_grad_value_(grads, clip_value, *, backend="auto") -> None:
    """Clip every element of ``grads`` in place to ``[-clip_value, clip_value]``."""
    if isinstance(clip_value, bool) or not isinstance(clip_value, (int, float)) or not clip_value > 0:
        raise ValueError(f"clip_value: expected a number > 0, got {clip_value!r}")
    grads, ops = _ops_for(grads, "grads", backend)
    if ops is None:
        return
    _check_writable_contiguous(grads, "grads")
    ops.clip_([g.reshape(-1) for g in grads], float(clip_value))


def _check_writable_contiguous(arrays, name):
    for i, a in enumerate(arrays):
        if not a.flags.c_contiguous:
            raise ValueError(f"{name}[{i}]: expected a C-contiguous array, got strides {a.strides}")
        if hasattr(a.flags, "writeable") and not a.flags.writeable:
            raise ValueError(f"{name}[{i}]: expected a writeable array, got a read-only one")


def asgd(params, grads, axs=None, masters=None, *, step, lr=1e-2, lambd=1e-4, alpha=0.75, t0=1e6,
         weight_decay=0.0, maximize=False, clip_value=None, clip_norm=None, clip_global_norm=None,
         weight_clip=None, max_norm=None, eta=0.0, mu=1.0, grad_scale=None, nonfinite="raise",
         backend="auto", state_dtype=None, master_weights=False, stochastic_rounding=False,
         seed=0, min_8bit_size=4096) -> StepInfo:
    """One :class:`fastopt.ASGD` step over lists of arrays, in place (the math is on the class).

    State lists: ``axs`` (the averages, start them at 0).  ``eta`` and ``mu`` are the values the
    previous step returned in ``info.group_state[0]`` (step 1 ignores them and uses ``lr``
    and 1, as torch does).
    """
    return _run(RULES["asgd"], locals())


def rprop(params, grads, prevs=None, step_size_states=None, masters=None, *, step, lr=1e-2,
          etas=(0.5, 1.2), step_sizes=(1e-6, 50.0), maximize=False, clip_value=None,
          clip_norm=None, clip_global_norm=None, weight_clip=None, max_norm=None, grad_scale=None,
          nonfinite="raise", backend="auto", state_dtype=None, master_weights=False,
          stochastic_rounding=False, seed=0, min_8bit_size=4096) -> StepInfo:
    """One :class:`fastopt.Rprop` step over lists of arrays, in place (the math is on the class).

    State lists: ``prevs`` (start them at 0) and ``step_size_states`` (the per-element step
    sizes, torch's ``step_size``: start them at ``lr``; not ``step_sizes``, which is the
    bounds' name).
    """
    return _run(RULES["rprop"], locals())


def adabelief(params, grads, exp_avgs=None, exp_avg_vars=None, masters=None, *, step, lr=1e-3,
              betas=(0.9, 0.999), eps=1e-16, eps_root=1e-16, weight_decay=0.0, nesterov=False,
              maximize=False, clip_value=None, clip_norm=None, clip_global_norm=None,
              weight_clip=None, max_norm=None, grad_scale=None, nonfinite="raise", backend="auto",
              state_dtype=None, master_weights=False, stochastic_rounding=False,
              seed=0, min_8bit_size=4096) -> StepInfo:
    """One :class:`fastopt.AdaBelief` step over lists of arrays, in place (the math is on the class).

    State lists: ``exp_avgs``, ``exp_avg_vars`` (start them at 0).
    """
    return _run(RULES["adabelief"], locals())


def yogi(params, grads, exp_avgs=None, exp_avg_sqs=None, masters=None, *, step, lr=1e-2,
         betas=(0.9, 0.999), eps=1e-3, weight_decay=0.0, initial_accumulator_value=1e-6,
         maximize=False, clip_value=None, clip_norm=None, clip_global_norm=None, weight_clip=None,
         max_norm=None, grad_scale=None, nonfinite="raise", backend="auto", state_dtype=None,
         master_weights=False, stochastic_rounding=False, seed=0, min_8bit_size=4096) -> StepInfo:
    """One :class:`fastopt.Yogi` step over lists of arrays, in place (the math is on the class).

    State lists: ``exp_avgs``, ``exp_avg_sqs`` (start both at ``initial_accumulator_value``).
    """
    return _run(RULES["yogi"], locals())


def ademamix(params, grads, m1s=None, m2s=None, nus=None, masters=None, *, step, lr=1e-3,
             betas=(0.9, 0.999, 0.9999), alpha=5.0, eps=1e-8, weight_decay=1e-2, t_alpha=None,
             t_beta3=None, maximize=False, clip_value=None, clip_norm=None, clip_global_norm=None,
             weight_clip=None, max_norm=None, grad_scale=None, nonfinite="raise", backend="auto",
             state_dtype=None, master_weights=False, stochastic_rounding=False,
             seed=0, min_8bit_size=4096) -> StepInfo:
    """One :class:`fastopt.AdEMAMix` step over lists of arrays, in place (the math is on the class).

    State lists: ``m1s`` (fast EMAs), ``m2s`` (slow EMAs), ``nus`` (second moments), all
    starting at 0.  ``step`` drives the bias corrections and the warmups.
    """
    return _run(RULES["ademamix"], locals())


# SparseAdam's grads are (indices, values) rows, which the bucketed pipeline of the functions
# above does not take: it runs fastopt/_sparse.py's driver.  LBFGS has no functional form: its
# step is a loop of closure calls over state, which torch too exposes only as a class.


def sparse_adam(params, grads, exp_avgs, exp_avg_sqs, state_steps, masters=None, *,
                lr=1e-3, betas=(0.9, 0.999), eps=1e-8, maximize=False, backend="auto",
                state_dtype=None, master_weights=False, stochastic_rounding=False,
                seed=0) -> None:
    """SparseAdam (torch.optim.SparseAdam), torch's ``F.sparse_adam`` signature.

    ``grads[i]`` is ``(indices, values)``: a 1-D integer array of row numbers of param ``i``
    (duplicates allowed, summed in order of appearance) and the rows' grads,
    ``(nnz, *params[i].shape[1:])``, in the param's dtype.  ``state_steps[i]`` is the
    param's step count *after* this step (1 on its first), as torch's functional takes it.
    Only the named rows of ``params``, ``exp_avgs`` and ``exp_avg_sqs`` are updated, in
    place; every input is checked before anything is written.  See
    :class:`fastopt.SparseAdam`.

    The precision options are :class:`fastopt.SparseAdam`'s (float16/bfloat16 params on
    NumPy arrays; only the touched rows are widened to float32, each element written back
    with one rounding): ``exp_avgs``/``exp_avg_sqs`` then have the resolved state dtype
    (float32 for 16-bit params by default, ``state_dtype="param"`` the param's,
    ``"bfloat16"``); ``master_weights=True`` takes ``masters``, one float32 array per param
    (start it as the param's exact float32 value) that the rows are stepped on, the param
    being its round-to-nearest-even; ``stochastic_rounding`` (bfloat16 params without
    masters) rounds the param with the counter hash of ``seed``, ``state_steps[i]`` and each
    element's flat index in the whole param.  ``state_dtype="q8"`` is refused (a row
    update would re-quantize the untouched rows sharing its 256-element blocks).  With the
    same inputs the results are bit for bit those of the class.
    """
    from . import _sparse

    _sparse.sparse_adam(params, grads, exp_avgs, exp_avg_sqs, state_steps, masters, lr=lr,
                        betas=betas, eps=eps, maximize=maximize, backend=backend,
                        state_dtype=state_dtype, master_weights=master_weights,
                        stochastic_rounding=stochastic_rounding, seed=seed)


__all__ += ["sparse_adam"]


def schedule_free_adamw(params, grads, zs=None, exp_avg_sqs=None, masters=None, *, step,
                        lr=0.0025, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                        warmup_steps=0, r=0.0, weight_lr_power=2.0, maximize=False,
                        clip_value=None, clip_norm=None, clip_global_norm=None, weight_clip=None,
                        max_norm=None, lr_max=-1.0, weight_sum=0.0, grad_scale=None,
                        nonfinite="raise", backend="auto", state_dtype=None, master_weights=False,
                        stochastic_rounding=False, seed=0, min_8bit_size=4096) -> StepInfo:
    """One :class:`fastopt.AdamWScheduleFree` training step (params hold y), in place.

    State lists: ``zs`` (start them as copies of the params) and ``exp_avg_sqs`` (at 0).
    ``lr_max`` and ``weight_sum`` are the values the previous step returned in
    ``info.group_state[0]`` (start: -1 and 0, as the package).  Evaluate at
    ``x = y + (1 - 1/beta1) * (z - y)`` (the class's ``eval()``).
    """
    return _run(RULES["schedule_free_adamw"], locals())


def schedule_free_sgd(params, grads, zs=None, masters=None, *, step, lr=1.0, momentum=0.9,
                      weight_decay=0.0, warmup_steps=0, r=0.0, weight_lr_power=2.0,
                      maximize=False, clip_value=None, clip_norm=None, clip_global_norm=None,
                      weight_clip=None, max_norm=None, lr_max=-1.0, weight_sum=0.0,
                      grad_scale=None, nonfinite="raise", backend="auto", state_dtype=None,
                      master_weights=False, stochastic_rounding=False, seed=0,
                      min_8bit_size=4096) -> StepInfo:
    """One :class:`fastopt.SGDScheduleFree` training step (params hold y), in place.

    State list: ``zs`` (start them as copies of the params); ``lr_max`` and ``weight_sum`` as
    for :func:`schedule_free_adamw`.
    """
    return _run(RULES["schedule_free_sgd"], locals())


def lars(params, grads, momentum_buffers=None, masters=None, *, step, lr=1e-3, weight_decay=0.0,
         trust_coefficient=1e-3, eps=0.0, momentum=0.9, nesterov=False, trust_ratio=True,
         maximize=False, clip_value=None, clip_norm=None, clip_global_norm=None, weight_clip=None,
         max_norm=None, grad_scale=None, nonfinite="raise", backend="auto", state_dtype=None,
         master_weights=False, stochastic_rounding=False, seed=0, min_8bit_size=4096) -> StepInfo:
    """One :class:`fastopt.LARS` step over lists of arrays, in place (the math is on the class).

    State lists: ``momentum_buffers``.
    """
    return _run(RULES["lars"], locals())
