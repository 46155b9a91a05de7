"""The functional API: one stateless function per rule, plus norm and clip helpers.

Each rule function takes the params, the grads and one list per state array
(in torch.optim's names, plural: ``exp_avgs``, ``exp_avg_sqs``, ...), updates
them all in place with one step of the pipeline (SPEC section 4) and returns
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
"""

from __future__ import annotations

import inspect

from . import _backend
from ._pipeline import GroupStep, make_buckets, run_step
from ._rules import PIPELINE_DEFAULTS, RULES, CLIP_EPS, as_host_scalars, check_hyperparameters, check_lr_value
from ._validate import (as_list, check_companions, check_disjoint, check_grad_scale,
                        check_nonfinite, check_params)

__all__ = [r.name for r in RULES.values()] + ["global_norm", "clip_grad_norm_", "clip_grad_value_"]


def _plural(name: str) -> str:
    return name + "s"


def _label(name, i):
    return f"{name}[{i}]"


def _make(rule):
    state_args = [_plural(n) for n in rule.all_state]

    def fn(params, grads, *args, step, backend="auto", nonfinite="raise", grad_scale=None, **kw):
        extra = None
        if rule.extra is not None:
            if not args:
                raise TypeError(f"{rule.name}() needs {rule.extra} after grads")
            extra, args = args[0], args[1:]
        if len(args) > len(state_args):
            raise TypeError(f"{rule.name}() takes {len(state_args)} state lists "
                            f"({', '.join(state_args)}), got {len(args)}")
        given = dict(zip(state_args, args))
        for k in list(kw):
            if k in state_args:
                if k in given:
                    raise TypeError(f"{rule.name}() got multiple values for {k!r}")
                given[k] = kw.pop(k)
        mu_product = kw.pop("mu_product", 1.0) if rule.group_state else None
        unknown = set(kw) - set(rule.defaults) - set(PIPELINE_DEFAULTS)
        if unknown:
            raise TypeError(f"{rule.name}() got unexpected keyword argument(s) {sorted(unknown)}")
        hp = {**rule.defaults, **PIPELINE_DEFAULTS, **kw}
        if isinstance(hp.get("betas"), list):
            hp["betas"] = tuple(hp["betas"])
        hp = as_host_scalars(hp)
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise ValueError(f"step: expected the 1-based index of this step (an int >= 1), got {step!r}")
        if callable(hp["lr"]):
            raise TypeError("lr: expected a float (evaluate a schedule before calling the functional API)")
        check_lr_value(hp["lr"])
        check_hyperparameters(rule, hp)
        nonfinite = check_nonfinite(nonfinite)
        inv_scale = check_grad_scale(grad_scale)

        params = as_list(params, "params")
        kind = check_params(params, [f"params[{i}]" for i in range(len(params))])
        be = _backend.resolve(backend, kind)
        grads = check_companions(params, grads, "grads", _label, kind, allow_copy=True)
        if extra is not None:
            shape_of = (lambda p: (p.size, p.size)) if rule.extra == "hessians" else None
            extra = check_companions(params, extra, rule.extra, _label, kind, shape_of=shape_of,
                                     allow_copy=True)
        states, written = {}, [("params", params)]
        for name, _ in rule.state(hp):
            arg = _plural(name)
            if given.get(arg) is None:
                raise TypeError(f"{rule.name}(): {arg} is required with these options")
            checked = check_companions(params, given[arg], arg, _label, kind)
            written.append((arg, checked))
            states[name] = [a.reshape(-1) for a in checked]
            _check_state_writable(states[name], arg, kind)
        check_disjoint(written, [("grads", grads)] + ([(rule.extra, extra)] if extra is not None else []))
        if rule.group_state:
            # a product of momentum coefficients in (0, 1); NaN here would reach every param
            if isinstance(mu_product, bool) or not isinstance(mu_product, (int, float)) \
                    or not 0 < mu_product <= 1:
                raise ValueError(f"mu_product: expected a number in (0, 1], got {mu_product!r}")
        gstate = {"mu_product": float(mu_product)} if rule.group_state else {}
        flat_params = [p.reshape(-1) for p in params]
        gs = GroupStep(hp=hp, buckets=make_buckets(flat_params, states),
                       grads=[g.reshape(-1) for g in grads],
                       extras=None if extra is None else [e.reshape(-1) for e in extra],
                       gstate=gstate)
        return run_step(be, rule, [gs], step, nonfinite, inv_scale)

    params_ = [inspect.Parameter("params", inspect.Parameter.POSITIONAL_OR_KEYWORD),
               inspect.Parameter("grads", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    if rule.extra:
        params_.append(inspect.Parameter(rule.extra, inspect.Parameter.POSITIONAL_OR_KEYWORD))
    params_ += [inspect.Parameter(a, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None)
                for a in state_args]
    params_.append(inspect.Parameter("step", inspect.Parameter.KEYWORD_ONLY))
    for k, v in {**rule.defaults, **PIPELINE_DEFAULTS}.items():
        params_.append(inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v))
    if rule.group_state:
        params_.append(inspect.Parameter("mu_product", inspect.Parameter.KEYWORD_ONLY, default=1.0))
    for k, v in (("grad_scale", None), ("nonfinite", "raise"), ("backend", "auto")):
        params_.append(inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v))
    fn.__signature__ = inspect.Signature(params_)
    fn.__name__ = fn.__qualname__ = rule.name
    from . import _optim

    fn.__doc__ = (f"One {rule.class_name} step on lists of arrays, in place; see "
                  f"fastopt.{rule.class_name} for the math.\n\nState lists: "
                  f"{', '.join(state_args) or 'none'}.\n" + (_optim.OPTIMIZERS[rule.name].__doc__ or ""))
    return fn


def _check_state_writable(arrays, name, kind):
    if kind == "numpy":
        for i, a in enumerate(arrays):
            if not a.flags.writeable:
                raise ValueError(f"{name}[{i}]: expected a writeable array, got a read-only one")


for _r in RULES.values():
    globals()[_r.name] = _make(_r)
del _r


def _ops_for(arrays, name, backend="auto"):
    arrays = as_list(arrays, name)
    if not arrays:
        return arrays, None
    kind = None
    for i, a in enumerate(arrays):
        from ._validate import check_array

        kind = check_array(a, f"{name}[{i}]", kind)
    return arrays, _backend.get_ops(_backend.resolve(backend, kind))


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
