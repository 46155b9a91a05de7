"""Optimizer classes: thin owners of state around the step pipeline.

``Optimizer`` holds the param groups, the state arrays and the step count, and
calls the same pipeline as :mod:`fastopt.functional`.  The rule classes below
only fix the constructor signature and the docstring of each rule.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np

from . import _backend
from . import precision as _prec
from . import quantization as _q
from ._pipeline import StepInfo, make_buckets, run_step
from ._rules import (COPY_OF_PARAM, _lerp_form, PIPELINE_DEFAULTS, PRECISION_DEFAULTS, RULES, Rule,
                     check_hyperparameters, check_lr_value)
from ._state import LoadPlan, plan_load, precision_record, q8_record
from ._validate import (as_list, check_grad_scale, check_nonfinite, check_param_ndim, check_params,
                        expected_layout, check_q8_options, flat, normalize_options,
                        param_precision, prepare_groups, resolve_precisions, step_options)
from ._validate import is_q8 as _is_q8

_OPTIMIZER_WIDE = ("nonfinite", "backend") + tuple(PRECISION_DEFAULTS)


class Optimizer:
    """Base class: param groups, state, ``step``, ``state_dict`` (see docs/design.md).

    ``params`` is a list of arrays or a list of dicts ``{"params": [...], **overrides}``
    where any hyperparameter (and any pipeline option) may be overridden per
    group, as in torch.optim.  ``nonfinite``, ``backend`` and the precision
    options are optimizer-wide: a step is atomic across all groups.
    """

    rule: Rule = None  # set by each subclass

    def __init__(self, params, *, nonfinite="raise", backend="auto", state_dtype=None,
                 master_weights=False, stochastic_rounding=False, seed=0, min_8bit_size=4096,
                 **hyperparameters):
        rule = self.rule
        self.defaults = {**rule.defaults, **PIPELINE_DEFAULTS}
        unknown = set(hyperparameters) - set(self.defaults)
        if unknown:
            raise TypeError(f"{type(self).__name__}() got unexpected keyword argument(s) "
                            f"{sorted(unknown)}")
        self.defaults = normalize_options({**self.defaults, **hyperparameters})
        self.nonfinite = check_nonfinite(nonfinite)
        if backend != "auto" and backend not in _backend.BACKEND_NAMES:
            raise ValueError(f"backend: expected one of {('auto',) + _backend.BACKEND_NAMES}, "
                             f"got {backend!r}")

        self.param_groups = self._parse_groups(params)
        flat_params, labels = [], []
        for gi, g in enumerate(self.param_groups):
            for pi, p in enumerate(g["params"]):
                flat_params.append(p)
                labels.append(self._label("params", gi, pi))
        self._kind = check_params(flat_params, labels)
        check_param_ndim(rule, flat_params, labels)
        for gi, g in enumerate(self.param_groups):
            check_hyperparameters(rule, g, self._where(gi))
        self.precision_options = {"state_dtype": state_dtype, "master_weights": master_weights,
                                  "stochastic_rounding": stochastic_rounding, "seed": seed,
                                  "min_8bit_size": min_8bit_size}
        self._precisions = resolve_precisions(rule, flat_params, labels, self.precision_options)
        self.min_8bit_size = int(min_8bit_size)
        used = {param_precision(self._precisions, p, self.min_8bit_size) for p in flat_params}
        # a group option 8-bit state cannot take is refused at construction and at every step
        # (a group's options may change between steps)
        self._q8_checked = rule.q8_refuses if any(map(_is_q8, used)) else ()
        for gi, g in enumerate(self.param_groups):
            if self._q8_checked:
                check_q8_options(rule, g, self._where(gi))
        self.backend = _backend.resolve(backend, self._kind, tuple(used))
        self._ops = _backend.get_ops(self.backend)
        self.step_count = 0
        self.state = [[{} for _ in g["params"]] for g in self.param_groups]
        self.group_state = [dict(rule.group_state) for _ in self.param_groups]
        self._buckets = [None] * len(self.param_groups)
        self._state_names = [None] * len(self.param_groups)
        self._bucket_names = [None] * len(self.param_groups)
        self._layout = None  # (ids of the params, expected_layout of a grad of each)
        self._plan = None  # a _StepCache (see _plan_step)
        self._last_grads = None  # ids of the last full step's grads
        for gi in range(len(self.param_groups)):
            self._ensure_state(gi)

    # ------------------------------------------------------------------ construction

    def _parse_groups(self, params):
        if _backend.array_kind(params) is not None:
            raise TypeError("params: expected a list of arrays or of param-group dicts, "
                            "got a single array (wrap it in a list)")
        params = as_list(params, "params")
        if params and all(isinstance(g, dict) for g in params):
            groups = []
            for gi, g in enumerate(params):
                if "params" not in g:
                    raise ValueError(f"param_groups[{gi}]: expected a 'params' key, got keys {sorted(g)}")
                bad = set(g) - set(self.defaults) - {"params"}
                bad |= set(g) & set(_OPTIMIZER_WIDE)
                if bad:
                    raise ValueError(f"param_groups[{gi}]: unknown or optimizer-wide option(s) "
                                     f"{sorted(bad)}; per-group options are {sorted(self.defaults)}")
                grp = normalize_options({**self.defaults, **g})
                grp["params"] = as_list(g["params"], f"param_groups[{gi}]['params']")
                if not grp["params"]:
                    raise ValueError(f"param_groups[{gi}]['params']: expected a non-empty list, got []")
                groups.append(grp)
            return groups
        if any(isinstance(g, dict) for g in params):
            raise TypeError("params: expected either arrays or param-group dicts, not a mix")
        return [{**self.defaults, "params": params}]

    def _label(self, name, gi, pi):
        if name == "params" and len(self.param_groups) > 1:
            return f"param_groups[{gi}]['params'][{pi}]"
        return f"{name}[{sum(len(g['params']) for g in self.param_groups[:gi]) + pi}]"

    def _where(self, gi):
        return f"param_groups[{gi}]: " if len(self.param_groups) > 1 else ""

    def _state_names_of(self, options: dict) -> list:
        """``(name, initial value)`` of every state array a param of a group with ``options``
        carries: the rule's, then ``master`` (None: a float32 copy of the param) with
        ``master_weights=True``."""
        names = list(self.rule.state(options))
        if self.precision_options["master_weights"]:
            names.append(("master", None))
        return names

    def _shapes(self, params):
        """The params' shapes when the rule's kernel needs them (``Rule.param_ndim``), else None."""
        return [tuple(p.shape) for p in params] if self.rule.needs_shapes else None

    def state_dtype(self, param, name: str):
        """The dtype the state array ``name`` of ``param`` is stored in (``master``: float32;
        ``fastopt.precision.Q8`` for an 8-bit state: uint8 codes plus ``<name>_absmax``)."""
        if name == "master":
            return _prec.as_dtype("float32")
        return self.precision_of(param).state

    def precision_of(self, param):
        """The resolved ``fastopt.precision.Precision`` of ``param`` (``min_8bit_size`` applied)."""
        return param_precision(self._precisions, param, self.min_8bit_size)

    def is_q8(self, param, name: str) -> bool:
        """Whether the state ``name`` of ``param`` is stored 8-bit (``state_dtype="q8"``)."""
        return name != "master" and self.precision_of(param).state is _prec.Q8

    def _ensure_state(self, gi):
        """Create the state arrays the group's current options need (once, or after a change)."""
        g = self.param_groups[gi]
        names = self._state_names_of(g)
        if self._buckets[gi] is not None and self._state_names[gi] == names:
            return  # the common case: nothing changed since the last step
        self._state_names[gi] = names
        xp = self._ops.xp
        changed = self._buckets[gi] is None
        for p, st in zip(g["params"], self.state[gi]):
            for name, init in names:
                shape = p.shape if name == "master" else self.rule.state_shape_of(name, p.shape)
                if name not in st and shape is not None:
                    if self.rule.state_shape is not None and name != "master":
                        # not param-shaped (Adafactor's factors): the rule's shape, param dtype
                        st[name] = xp.full(shape, init, dtype=self.state_dtype(p, name))
                    elif name == "master":
                        # exact: the param is RNE of it (a device array widens on its device)
                        st[name] = (_prec.to_float32(p) if _backend.array_kind(p) == "numpy"
                                    else p.astype(xp.float32))
                    elif self.is_q8(p, name):
                        # the rule's initial value, quantized (0: the zero code, absmax 0)
                        codes, absmax = _q.quantize_blockwise(
                            np.full(p.shape, init, np.float32),
                            signed=name not in self.rule.nonnegative_state)
                        st[name] = self._ops.asarray(codes)
                        st[name + "_absmax"] = self._ops.asarray(absmax)
                    elif isinstance(init, str) and init == COPY_OF_PARAM:
                        st[name] = _copy_as(p, self.state_dtype(p, name), xp)
                    else:
                        st[name] = xp.full_like(p, init, dtype=self.state_dtype(p, name))
                    changed = True
        if changed or self._bucket_names[gi] != names:
            self._bucket_names[gi] = names
            q8_names = [n + "_absmax" for n, _ in names if n != "master"]
            flat_states = {n: [flat(st[n]) if n in st else None for st in self.state[gi]]
                           for n in [n for n, _ in names] + q8_names}
            flat_states = {n: v for n, v in flat_states.items() if any(a is not None for a in v)}
            self._buckets[gi] = make_buckets(
                [flat(p) for p in g["params"]], flat_states,
                param_precisions=[self.precision_of(p) for p in g["params"]],
                shapes=self._shapes(g["params"]))

    # ------------------------------------------------------------------ public

    @property
    def lr(self):
        """The learning rate the next step uses (first group; a schedule is evaluated)."""
        lr = self.param_groups[0]["lr"]
        return float(lr(self.step_count)) if callable(lr) else lr

    @lr.setter
    def lr(self, value):
        if not callable(value):
            check_lr_value(value)
        for g in self.param_groups:
            g["lr"] = value

    def step(self, grads, grad_scale=None):
        """One step of the pipeline (docs/design.md): params updated in place; returns a ``StepInfo``."""
        return self._step(grads, None, grad_scale)

    def _step(self, grads, extras, grad_scale):
        t = self.step_count + 1
        if self._plan is not None and extras is None and grad_scale is None:
            info = self._cached_step(grads, t)
            if info is not None:
                return info
        inv_scale = check_grad_scale(grad_scale)
        steps = self._prepare(grads, extras, t)
        info = run_step(self.backend, self.rule, steps, t, self.nonfinite, inv_scale)
        if not info.skipped:
            self.step_count = t
            self.group_state = [dict(s) for s in info.group_state]
            if extras is None and inv_scale is None:
                self._plan_step(grads, steps)
        return info

    # ------------------------------------------------------------------ step cache

    def _plan_step(self, grads, steps):
        """After a full step: cache what the next one with the same arrays can reuse.

        Only the second step in a row with the same grad objects builds a plan (a
        training loop whose backward pass makes new grad arrays would only pay for
        it), only for a small step (the fixed cost matters there; the plan also keeps
        the grads alive), and only where the backend makes one (``Ops.step_plan``).
        See docs/design.md, "Pipeline" (the step cache).
        """
        last, self._last_grads = self._last_grads, None
        self._plan = None
        if (type(grads) not in (list, tuple) or len(self.param_groups) != 1
                or type(self)._prepare is not Optimizer._prepare or self._q8_checked
                or len(steps[0].buckets) != 1):
            return
        ids = list(map(id, grads))
        if last != ids:
            self._last_grads = ids
            return
        options = _frozen_options(self.param_groups[0])
        gs = steps[0]
        if options is None or gs.t is not None or gs.norm_group is not None:
            return
        try:
            same = [(type(o), o.shape, o.dtype, o.strides) for o in grads] == self._layout[1]
        except AttributeError:
            same = False
        if not same or sum(g.size for g in gs.grads) > _PLAN_MAX_SIZE:
            return  # a grad was copied or converted by the checks: its values would go stale
        plan = self._ops.step_plan(self.rule, gs.buckets[0], gs.grads, gs.hp)
        if plan is not None:
            g = self.param_groups[0]
            self._plan = _StepCache(plan, gs.hp, tuple(map(type, g.values())), tuple(g.items()),
                                    ids, list(map(id, g["params"])), self._buckets[0],
                                    self.nonfinite, list(grads))

    def _cached_step(self, grads, t):
        """A step through the cached plan, or None (then the full step runs) unless it all matches.

        The exact check: the same grad objects (the cache holds them, so an id is
        not reused) with the layout the full checks accepted (shape, dtype,
        strides), the same param objects, state buckets, ``nonfinite`` and group
        options.  A non-finite grad goes back to the full step, which raises or
        skips with nothing written.
        """
        c = self._plan
        if (type(grads) not in (list, tuple) or list(map(id, grads)) != c.grad_ids
                or len(self.param_groups) != 1):
            return None
        g = self.param_groups[0]
        # the params first: then the group's own list compares equal by identity, element-wise
        if (list(map(id, g["params"])) != c.param_ids or self._buckets[0] is not c.buckets
                or self.nonfinite != c.nonfinite or tuple(map(type, g.values())) != c.types
                or tuple(g.items()) != c.items):
            return None
        if [(type(o), o.shape, o.dtype, o.strides) for o in grads] != self._layout[1]:
            return None
        s, new_gs = self.rule.step_scalars(c.hp, t, self.group_state[0])
        if not c.plan.update(s, check=self.nonfinite != "ignore", step=t):
            return None
        self.step_count = t
        self.group_state = [dict(new_gs)]
        return StepInfo(skipped=False, _group_norms=(None,), group_state=(new_gs,))

    def _prepare(self, grads, extras, t):
        """Every check of the step, before anything is written; returns the GroupSteps."""
        all_params = [p for g in self.param_groups for p in g["params"]]
        ids = [id(p) for p in all_params]
        if self._layout is None or self._layout[0] != ids:
            self._layout = (ids, expected_layout(all_params))
        hps = [step_options(self.rule, g, t, self._where(gi))
               for gi, g in enumerate(self.param_groups)]
        if self._q8_checked:
            for gi, hp in enumerate(hps):
                check_q8_options(self.rule, hp, self._where(gi))
        prepared = prepare_groups(self.rule, hps, [len(g["params"]) for g in self.param_groups],
                                  all_params, grads, extras, kind=self._kind,
                                  caller=f"{type(self).__name__}.step()", want=self._layout[1])
        # everything is checked: only now may a group's state arrays be created
        steps = []
        for gi, pr in enumerate(prepared):
            self._ensure_state(gi)
            steps.append(pr.group_step(self._buckets[gi], self.group_state[gi]))
        return steps

    # ------------------------------------------------------------------ state

    def state_nbytes(self) -> int:
        """Bytes of optimizer state: every state array (``master`` included), in its dtype.

        An 8-bit state counts its codes (1 byte per element) and its absmax (4 bytes per
        256-element block): Adam's two moments cost 8 bytes per param in float32, 4 in
        bfloat16 and about 2.03 in q8 (``fastopt.quantization.bytes_per_param_table``).
        """
        return sum(int(a.nbytes) for per_group in self.state for st in per_group for a in st.values())

    def state_dict(self) -> dict:
        """Host (NumPy) copies of every state array, the step count and every group's options.

        ``param_groups[i]["params"]`` holds flat indices, as torch.optim's does.
        A schedule given as ``lr`` is kept as the (picklable) object itself.
        """
        groups, state, idx = [], {}, 0
        for gi, g in enumerate(self.param_groups):
            d = {k: copy.deepcopy(v) for k, v in g.items() if k != "params"}
            d["params"] = list(range(idx, idx + len(g["params"])))
            groups.append(d)
            for st in self.state[gi]:
                state[idx] = {k: self._ops.to_host(v) for k, v in st.items()}
                idx += 1
        out = {"rule": self.rule.name, "step_count": self.step_count, "param_groups": groups,
               "state": state, "group_state": copy.deepcopy(self.group_state),
               "precision": precision_record(self.precision_options)}
        q8 = q8_record(self)
        if q8 is not None:
            out["q8"] = q8
        return out

    def load_state_dict(self, state_dict: dict, *, convert: bool = False) -> None:
        """Load a ``state_dict`` from any backend; checked whole before anything changes.

        Besides its structure, shapes and dtypes, the state's values are checked:
        finite everywhere, and no negative entry where the rule keeps a sum or
        average of squares (``exp_avg_sq``, Adagrad's ``sum``, ...).

        The precision options saved with the state (``state_dtype``,
        ``master_weights``, ``stochastic_rounding``, ``seed``, ``min_8bit_size``)
        must be this optimizer's: a different seed would silently change a resumed
        run.  A state in another format (8-bit where this optimizer keeps float32
        state, or the reverse, or another float dtype) is refused unless
        ``convert=True``, which decodes 8-bit states (``map[code] * absmax``) and
        quantizes or rounds each array into this optimizer's format explicitly;
        ``master_weights``, ``stochastic_rounding`` and ``seed`` must match even then.
        """
        if not isinstance(convert, bool):
            raise TypeError(f"convert: expected True or False, got {type(convert).__name__}")
        self._write(plan_load(self, state_dict, convert=convert))

    def _write(self, plan: LoadPlan) -> None:
        """Write a checked plan (from :func:`fastopt._state.plan_load`); raises on nothing."""
        device = self._kind != "numpy"
        for gi, (g, options) in enumerate(zip(self.param_groups, plan.options)):
            g.update(options)
            for st, loaded in zip(self.state[gi], plan.state[gi]):
                for name, host in loaded.items():
                    if name in st:
                        st[name][...] = self._ops.asarray(host) if device else host
                    else:
                        st[name] = self._ops.asarray(host)
            self._buckets[gi] = None
            self._ensure_state(gi)
        self.step_count = plan.step_count
        self.group_state = [dict(g) for g in plan.group_state]
        if plan.params is not None:
            all_params = [p for g in self.param_groups for p in g["params"]]
            for p, host in zip(all_params, plan.params):
                p[...] = self._ops.asarray(host) if device else host

    def __repr__(self):
        opts = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        return (f"{type(self).__name__}({sum(len(g['params']) for g in self.param_groups)} params, "
                f"{len(self.param_groups)} group(s), backend={self.backend!r}, {opts})")


#: The most elements a cached step plan covers: above it the fixed cost of a step is small
#: beside its arithmetic, and the plan would keep large grads alive between steps.
_PLAN_MAX_SIZE = 1 << 21

_SCALAR_TYPES = (int, float, bool, str, type(None))


def _frozen_options(g):
    """A group's options as ``(key, type, value)`` triples, or None where a value is not an
    immutable scalar or a tuple of them (a schedule, a list that could change in place):
    such a group gets no step cache."""
    out = []
    for k, v in g.items():
        if k == "params":
            continue
        tv = type(v)
        if tv is tuple:
            if not all(type(x) in _SCALAR_TYPES for x in v):
                return None
        elif tv not in _SCALAR_TYPES:
            return None
        out.append((k, tv, v))
    return tuple(out)


@dataclass
class _StepCache:
    plan: object
    hp: dict
    #: the group's option types and (key, value) pairs when the plan was made: every value
    #: an immutable scalar or a tuple of them (``_frozen_options``), so equal means unchanged
    types: tuple
    items: tuple
    grad_ids: list
    param_ids: list
    buckets: list
    nonfinite: str
    grads: list  # held: their ids stay theirs while the cache lives


def _copy_as(p, dtype, xp):
    """A copy of param ``p`` in ``dtype`` (a state that starts as the param, Schedule-Free's z):
    exact when ``dtype`` is at least as wide, else rounded to nearest even once."""
    if _backend.array_kind(p) != "numpy":
        return p.astype(dtype, copy=True)
    if p.dtype == dtype:
        return p.copy()
    x = _prec.to_float32(p) if p.dtype.itemsize == 2 else p.astype(np.float32)
    return x.astype(dtype) if dtype.itemsize > 4 else _prec.round_to(x, dtype)


def _opts(local: dict) -> dict:
    """Constructor locals -> keyword arguments of Optimizer.__init__."""
    return {k: v for k, v in local.items() if k not in ("self", "params", "__class__")}


_PIPELINE_DOC = """
    Pipeline options (any of them per group; their order is in docs/design.md): ``maximize``,
    ``clip_value``, ``clip_norm`` (per tensor), ``clip_global_norm`` (all
    tensors of the group), ``weight_clip``, ``max_norm``; optimizer-wide
    ``nonfinite`` ('raise' | 'skip' | 'ignore') and ``backend``
    ('auto' | 'numpy' | 'numba' | 'cupy').

    Precision (optimizer-wide; ``fastopt.precision`` has the exact rounding recipes): params
    may be float16 or bfloat16 (``ml_dtypes.bfloat16``, ``pip install 'fastopt[bf16]'``) besides
    float32/float64, their grads the param dtype or float32; 16-bit params are computed in
    float32 with one rounding per write.  ``state_dtype``: None (float32 for 16-bit params,
    else the param dtype), ``"param"`` (torch's behaviour), ``"float32"``, ``"bfloat16"`` or
    ``"q8"``: 8-bit block-quantized state in the bitsandbytes format (uint8 codes plus a
    float32 absmax per 256 elements, about 1.02 bytes per state element; not for float64
    params or Newton), kept float32 for tensors below ``min_8bit_size`` elements (4096);
    ``load_state_dict(sd, convert=True)`` moves a state between formats.
    ``master_weights=True`` (16-bit params) keeps
    a float32 ``master`` in state and writes the param as its round-to-nearest-even.
    ``stochastic_rounding=True`` (bfloat16 params, no master) rounds the param write up or
    down with probability by distance, its bits a hash of (``seed``, step, element index).
    A backend without kernels for a precision is a TypeError when named explicitly;
    ``backend="auto"`` sends such NumPy params to ``numpy``, which has them all.
"""


class SGD(Optimizer):
    r"""Stochastic gradient descent, optionally with (Nesterov) momentum, as torch.optim.SGD.

    .. math::
        g \mathrel{+}= \lambda p;\quad b_1 = g,\ b_t = \mu b_{t-1} + (1-\tau) g;\quad
        g = g + \mu b_t \text{ (nesterov) or } b_t;\quad p \mathrel{-}= \eta g
    """ + _PIPELINE_DOC
    rule = RULES["sgd"]

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, nesterov=False,
                 weight_decay=0.0, *, maximize=False, clip_value=None, clip_norm=None,
                 clip_global_norm=None, weight_clip=None, max_norm=None, nonfinite="raise",
                 backend="auto", state_dtype=None, master_weights=False,
                 stochastic_rounding=False, seed=0, min_8bit_size=4096):
        super().__init__(params, **_opts(locals()))


class Adam(Optimizer):
    r"""Adam (Kingma & Ba), as torch.optim.Adam; ``weight_decay`` is L2 (added to the gradient).

    .. math::
        m = \beta_1 m + (1-\beta_1) g;\quad v = \beta_2 v + (1-\beta_2) g^2;\quad
        p \mathrel{-}= \frac{\eta}{1-\beta_1^t}\,\frac{m}{\sqrt{v/(1-\beta_2^t)} + \epsilon}

    ``amsgrad`` uses the running maximum of ``v``; ``bias_correction=False`` drops both
    ``1 - beta**t`` terms.
    """ + _PIPELINE_DOC
    rule = RULES["adam"]

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, *, bias_correction=True, maximize=False, clip_value=None,
                 clip_norm=None, clip_global_norm=None, weight_clip=None, max_norm=None,
                 nonfinite="raise", backend="auto", state_dtype=None, master_weights=False,
                 stochastic_rounding=False, seed=0, min_8bit_size=4096):
        super().__init__(params, **_opts(locals()))


class AdamW(Optimizer):
    r"""Adam with decoupled weight decay (Loshchilov & Hutter), as torch.optim.AdamW.

    ``p *= 1 - lr * weight_decay`` before the Adam update; the decay is scaled by ``lr``
    (torch's convention; optax's ``adamw`` scales it by the learning rate too).
    """ + _PIPELINE_DOC
    rule = RULES["adamw"]

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, bias_correction=True, maximize=False, clip_value=None,
                 clip_norm=None, clip_global_norm=None, weight_clip=None, max_norm=None,
                 nonfinite="raise", backend="auto", state_dtype=None, master_weights=False,
                 stochastic_rounding=False, seed=0, min_8bit_size=4096):
        super().__init__(params, **_opts(locals()))


class Adagrad(Optimizer):
    r"""Adagrad, as torch.optim.Adagrad.

    .. math::
        s \mathrel{+}= g^2;\quad p \mathrel{-}= \frac{\eta}{1 + (t-1)\,\text{lr\_decay}}
        \,\frac{g}{\sqrt{s} + \epsilon}
    """ + _PIPELINE_DOC
    rule = RULES["adagrad"]

    def __init__(self, params, lr=1e-2, lr_decay=0.0, weight_decay=0.0,
                 initial_accumulator_value=0.0, eps=1e-10, *, maximize=False, clip_value=None,
                 clip_norm=None, clip_global_norm=None, weight_clip=None, max_norm=None,
                 nonfinite="raise", backend="auto", state_dtype=None, master_weights=False,
                 stochastic_rounding=False, seed=0, min_8bit_size=4096):
        super().__init__(params, **_opts(locals()))


class RMSprop(Optimizer):
    r"""RMSprop, as torch.optim.RMSprop (epsilon outside the square root).

    .. math::
        v = \alpha v + (1-\alpha) g^2;\quad d = \sqrt{v - \bar g^2 \text{ (centered)}} + \epsilon;
        \quad p \mathrel{-}= \eta\, g / d \text{ or, with momentum, } b = \mu b + g/d,\ p \mathrel{-}= \eta b
    """ + _PIPELINE_DOC
    rule = RULES["rmsprop"]

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
                 centered=False, *, maximize=False, clip_value=None, clip_norm=None,
                 clip_global_norm=None, weight_clip=None, max_norm=None, nonfinite="raise",
                 backend="auto", state_dtype=None, master_weights=False,
                 stochastic_rounding=False, seed=0, min_8bit_size=4096):
        super().__init__(params, **_opts(locals()))


class Adadelta(Optimizer):
    r"""Adadelta (Zeiler), as torch.optim.Adadelta.

    .. math::
        v = \rho v + (1-\rho) g^2;\quad \delta = \frac{\sqrt{u+\epsilon}}{\sqrt{v+\epsilon}} g;
        \quad u = \rho u + (1-\rho)\delta^2;\quad p \mathrel{-}= \eta \delta
    """ + _PIPELINE_DOC
    rule = RULES["adadelta"]

    def __init__(self, params, lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0, *, maximize=False,
                 clip_value=None, clip_norm=None, clip_global_norm=None, weight_clip=None,
                 max_norm=None, nonfinite="raise", backend="auto", state_dtype=None, master_weights=False,
                 stochastic_rounding=False, seed=0, min_8bit_size=4096):
        super().__init__(params, **_opts(locals()))


class Adamax(Optimizer):
    r"""Adamax (the infinity-norm Adam), as torch.optim.Adamax.

    .. math::
        m = \beta_1 m + (1-\beta_1) g;\quad u = \max(\beta_2 u, |g| + \epsilon);\quad
        p \mathrel{-}= \frac{\eta}{1-\beta_1^t}\,\frac{m}{u}
    """ + _PIPELINE_DOC
    rule = RULES["adamax"]

    def __init__(self, params, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *,
                 maximize=False, clip_value=None, clip_norm=None, clip_global_norm=None,
                 weight_clip=None, max_norm=None, nonfinite="raise", backend="auto", state_dtype=None, master_weights=False,
                 stochastic_rounding=False, seed=0, min_8bit_size=4096):
        super().__init__(params, **_opts(locals()))


class NAdam(Optimizer):
    r"""NAdam (Dozat), as torch.optim.NAdam with its ``momentum_decay`` schedule.

    .. math::
        \mu_t = \beta_1(1 - \tfrac12 0.96^{t\psi});\quad
        p \mathrel{-}= \eta\frac{1-\mu_t}{1-\prod_{i\le t}\mu_i}\frac{g}{d}
        + \eta\frac{\mu_{t+1}}{1-\prod_{i\le t+1}\mu_i}\frac{m}{d},\ d = \sqrt{v/(1-\beta_2^t)} + \epsilon
    """ + _PIPELINE_DOC
    rule = RULES["nadam"]

    def __init__(self, params, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 momentum_decay=4e-3, *, maximize=False, clip_value=None, clip_norm=None,
                 clip_global_norm=None, weight_clip=None, max_norm=None, nonfinite="raise",
                 backend="auto", state_dtype=None, master_weights=False,
                 stochastic_rounding=False, seed=0, min_8bit_size=4096):
        super().__init__(params, **_opts(locals()))


class RAdam(Optimizer):
    r"""Rectified Adam (Liu et al.), as torch.optim.RAdam.

    Rectified step ``lr * r_t * sqrt(1-beta2^t)/(1-beta1^t) * m / (sqrt(v) + eps)`` when
    ``rho_t > 5``, else the un-adapted step ``lr/(1-beta1^t) * m``.
    """ + _PIPELINE_DOC
    rule = RULES["radam"]

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *,
                 maximize=False, clip_value=None, clip_norm=None, clip_global_norm=None,
                 weight_clip=None, max_norm=None, nonfinite="raise", backend="auto", state_dtype=None, master_weights=False,
                 stochastic_rounding=False, seed=0, min_8bit_size=4096):
        super().__init__(params, **_opts(locals()))


class Lion(Optimizer):
    r"""Lion (Chen et al., 2023), sign momentum with decoupled decay.

    .. math::
        c = \beta_1 m + (1-\beta_1) g;\quad p \mathrel{*}= 1-\eta\lambda;\quad
        p \mathrel{-}= \eta\,\mathrm{sign}(c);\quad m = \beta_2 m + (1-\beta_2) g
    """ + _PIPELINE_DOC
    rule = RULES["lion"]

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, *, maximize=False,
                 clip_value=None, clip_norm=None, clip_global_norm=None, weight_clip=None,
                 max_norm=None, nonfinite="raise", backend="auto", state_dtype=None, master_weights=False,
                 stochastic_rounding=False, seed=0, min_8bit_size=4096):
        super().__init__(params, **_opts(locals()))


class LAMB(Optimizer):
    r"""LAMB (You et al.): Adam moments with a per-tensor trust ratio, decoupled decay.

    .. math::
        r = \frac{\hat m}{\sqrt{\hat v} + \epsilon} + \lambda p;\quad
        p \mathrel{-}= \eta \frac{\lVert p\rVert}{\lVert r\rVert} r
        \quad(\text{ratio } 1 \text{ if either norm is } 0)
    """ + _PIPELINE_DOC
    rule = RULES["lamb"]

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, *,
                 bias_correction=True, maximize=False, clip_value=None, clip_norm=None,
                 clip_global_norm=None, weight_clip=None, max_norm=None, nonfinite="raise",
                 backend="auto", state_dtype=None, master_weights=False,
                 stochastic_rounding=False, seed=0, min_8bit_size=4096):
        super().__init__(params, **_opts(locals()))


class AdaHessian(Optimizer):
    r"""AdaHessian (Yao et al.): Adam whose second moment is fed by a Hessian-diagonal estimate.

    ``step(grads, hessian_diags)``: ``v = beta2*v + (1-beta2)*D^2``,
    ``p -= lr/(1-beta1^t) * m / ((sqrt(v/(1-beta2^t)))^k + eps)``.
    ``weight_decay`` is L2, as for every rule but AdamW, Lion and LAMB.
    ``grad_scale`` unscales the Hessian diagonals too, and the non-finite check covers them.
    """ + _PIPELINE_DOC
    rule = RULES["adahessian"]

    def __init__(self, params, lr=0.15, betas=(0.9, 0.999), eps=1e-4, hessian_power=1.0,
                 weight_decay=0.0, *, maximize=False, clip_value=None, clip_norm=None,
                 clip_global_norm=None, weight_clip=None, max_norm=None, nonfinite="raise",
                 backend="auto", state_dtype=None, master_weights=False,
                 stochastic_rounding=False, seed=0, min_8bit_size=4096):
        super().__init__(params, **_opts(locals()))

    def step(self, grads, hessian_diags, grad_scale=None):
        return self._step(grads, hessian_diags, grad_scale)


class Newton(Optimizer):
    r"""Damped Newton's method, per tensor: ``p -= lr * solve(H + damping*I, g)``.

    ``step(grads, hessians)`` with ``hessians[i]`` of shape ``(n, n)``, ``n = params[i].size``;
    for small problems (the backend's dense linear algebra).  ``grad_scale`` unscales the
    Hessians too.  ``maximize`` negates ``g`` only (so the step ascends for a negative-definite H).
    """ + _PIPELINE_DOC
    rule = RULES["newton"]

    def __init__(self, params, lr=1.0, damping=1e-4, *, maximize=False, clip_value=None,
                 clip_norm=None, clip_global_norm=None, weight_clip=None, max_norm=None,
                 nonfinite="raise", backend="auto", state_dtype=None, master_weights=False,
                 stochastic_rounding=False, seed=0, min_8bit_size=4096):
        super().__init__(params, **_opts(locals()))

    def step(self, grads, hessians, grad_scale=None):
        return self._step(grads, hessians, grad_scale)


class Muon(Optimizer):
    r"""Muon (Jordan et al., 2024), as torch.optim.Muon: orthogonalized momentum for 2-D params.

    .. math::
        B = \mu B + (1-\mu) g;\quad U = (1-\mu) g + \mu B \text{ (nesterov) or } B;\quad
        O = \mathrm{NS}_k(U);\quad p \mathrel{*}= 1-\eta\lambda;\quad p \mathrel{-}= \eta\,r(A, B)\,O

    ``NS_k`` is ``ns_steps`` Newton-Schulz iterations with ``ns_coefficients`` (a, b, c) on
    ``U / max(||U||_F, eps)``; ``r`` is torch's lr adjustment for an A x B param:
    ``sqrt(max(1, A/B))`` (``adjust_lr_fn=None`` or ``"original"``) or ``0.2*sqrt(max(A, B))``
    (``"match_rms_adamw"``).  Params must be 2-D (hidden weight matrices; give biases, gains,
    embeddings and the output layer to AdamW).  The products run in the param's dtype on the
    backend's BLAS (torch runs them in bfloat16); float16/bfloat16 params in float32 on copies,
    each array rounded once (docs/design.md, "Precision"; numpy and numba backends; no
    ``state_dtype="q8"``).
    """ + _PIPELINE_DOC
    rule = RULES["muon"]

    def __init__(self, params, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                 ns_coefficients=(3.4445, -4.775, 2.0315), eps=1e-7, ns_steps=5,
                 adjust_lr_fn=None, *, maximize=False, clip_value=None, clip_norm=None,
                 clip_global_norm=None, weight_clip=None, max_norm=None, nonfinite="raise",
                 backend="auto", state_dtype=None, master_weights=False,
                 stochastic_rounding=False, seed=0, min_8bit_size=4096):
        super().__init__(params, **_opts(locals()))


class ASGD(Optimizer):
    r"""Averaged SGD (Polyak & Juditsky), as torch.optim.ASGD; ``weight_decay`` is L2.

    .. math::
        p \mathrel{*}= 1 - \lambda\eta_t;\quad p \mathrel{-}= \eta_t g;\quad
        a = p \text{ if } \mu_t = 1 \text{ else } a + \mu_t (p - a)

    ``eta`` and ``mu`` are set after each step for the next, as torch does:
    ``eta = lr / (1 + lambd*lr*t)**alpha``, ``mu = 1 / max(1, t - t0)`` (the first step uses
    ``eta = lr``, ``mu = 1``); they are the group state (``state_dict()["group_state"]``),
    so with an ``lr`` schedule ``eta`` follows the previous step's ``lr``, as in torch.  The
    averaged iterate is the state array ``ax``: evaluate with it.
    """ + _PIPELINE_DOC
    rule = RULES["asgd"]

    def __init__(self, params, lr=1e-2, lambd=1e-4, alpha=0.75, t0=1e6, weight_decay=0.0, *,
                 maximize=False, clip_value=None, clip_norm=None, clip_global_norm=None,
                 weight_clip=None, max_norm=None, nonfinite="raise", backend="auto",
                 state_dtype=None, master_weights=False, stochastic_rounding=False, seed=0, min_8bit_size=4096):
        super().__init__(params, **_opts(locals()))


class Rprop(Optimizer):
    r"""Resilient backpropagation (Riedmiller & Braun), as torch.optim.Rprop.

    Per element, with ``d = g * prev``: the step size grows by ``etaplus`` where ``d > 0``,
    shrinks by ``etaminus`` where ``d < 0`` (and that grad counts as 0), is clamped to
    ``step_sizes``; ``p -= sign(g) * step_size``; ``prev = g``.  ``step_size`` starts at
    ``lr``, which is its only use (as in torch).  No weight decay, as torch.
    """ + _PIPELINE_DOC
    rule = RULES["rprop"]

    def __init__(self, params, lr=1e-2, etas=(0.5, 1.2), step_sizes=(1e-6, 50.0), *,
                 maximize=False, clip_value=None, clip_norm=None, clip_global_norm=None,
                 weight_clip=None, max_norm=None, nonfinite="raise", backend="auto",
                 state_dtype=None, master_weights=False, stochastic_rounding=False, seed=0, min_8bit_size=4096):
        super().__init__(params, **_opts(locals()))


class AdaBelief(Optimizer):
    r"""AdaBelief (Zhuang et al., 2020), as ``optax.adabelief`` (0.2.8) with its defaults.

    .. math::
        m = \beta_1 m + (1-\beta_1) g;\quad s = \beta_2 s + (1-\beta_2)(g - m)^2 + \epsilon_r;
        \quad p \mathrel{-}= \eta\,\frac{m/(1-\beta_1^t)}{\sqrt{s/(1-\beta_2^t)} + \epsilon}

    ``nesterov=True`` replaces ``m/(1-b1^t)`` by ``b1*m/(1-b1^(t+1)) + (1-b1)*g/(1-b1^t)``.
    ``weight_decay`` is L2 (``optax.add_decayed_weights`` chained before it); 0 as optax.
    optax's defaults ``eps = eps_root = 1e-16`` (the paper: ``eps=1e-8, eps_root=0``).
    """ + _PIPELINE_DOC
    rule = RULES["adabelief"]

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-16, eps_root=1e-16,
                 weight_decay=0.0, nesterov=False, *, maximize=False, clip_value=None,
                 clip_norm=None, clip_global_norm=None, weight_clip=None, max_norm=None,
                 nonfinite="raise", backend="auto", state_dtype=None, master_weights=False,
                 stochastic_rounding=False, seed=0, min_8bit_size=4096):
        super().__init__(params, **_opts(locals()))


class Yogi(Optimizer):
    r"""Yogi (Zaheer et al., 2018), as ``optax.yogi`` (0.2.8) with its defaults.

    .. math::
        m = \beta_1 m + (1-\beta_1) g;\quad v = v - (1-\beta_2)\,\mathrm{sign}(v - g^2)\,g^2;
        \quad p \mathrel{-}= \eta\,\frac{m/(1-\beta_1^t)}{\sqrt{v/(1-\beta_2^t)} + \epsilon}

    Both moments start at ``initial_accumulator_value`` (1e-6, as optax).  ``weight_decay``
    is L2.  optax has no default learning rate; ``lr=1e-2`` is the paper's.
    """ + _PIPELINE_DOC
    rule = RULES["yogi"]

    def __init__(self, params, lr=1e-2, betas=(0.9, 0.999), eps=1e-3, weight_decay=0.0,
                 initial_accumulator_value=1e-6, *, maximize=False, clip_value=None,
                 clip_norm=None, clip_global_norm=None, weight_clip=None, max_norm=None,
                 nonfinite="raise", backend="auto", state_dtype=None, master_weights=False,
                 stochastic_rounding=False, seed=0, min_8bit_size=4096):
        super().__init__(params, **_opts(locals()))


class AdEMAMix(Optimizer):
    r"""AdEMAMix (Pagliardini et al., 2024): Adam with a second, slow first moment.

    .. math::
        m_1 = \beta_1 m_1 + (1-\beta_1) g;\quad m_2 = \beta_3 m_2 + (1-\beta_3) g;\quad
        \nu = \beta_2 \nu + (1-\beta_2) g^2;\quad
        p \mathrel{-}= \eta\,\frac{m_1/(1-\beta_1^t) + \alpha m_2}{\sqrt{\nu/(1-\beta_2^t)} + \epsilon}

    ``betas = (beta1, beta2, beta3)``; ``m2`` has no bias correction (it fills slowly on
    purpose).  Warmups as in the paper and bitsandbytes' ``AdEMAMix``: ``t_alpha`` steps
    of linear rise of ``alpha``, ``t_beta3`` steps over which ``beta3`` rises from ``beta1``
    with a linearly growing half-life.  ``weight_decay`` is decoupled (``p *= 1 - lr*wd``
    first); defaults are bitsandbytes' (``weight_decay=1e-2``).
    """ + _PIPELINE_DOC
    rule = RULES["ademamix"]

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999, 0.9999), alpha=5.0, eps=1e-8,
                 weight_decay=1e-2, t_alpha=None, t_beta3=None, *, maximize=False,
                 clip_value=None, clip_norm=None, clip_global_norm=None, weight_clip=None,
                 max_norm=None, nonfinite="raise", backend="auto", state_dtype=None,
                 master_weights=False, stochastic_rounding=False, seed=0, min_8bit_size=4096):
        super().__init__(params, **_opts(locals()))


class Adafactor(Optimizer):
    r"""Adafactor (Shazeer & Stern, 2018), as torch.optim.Adafactor: factored second moments.

    .. math::
        \alpha = \max(\epsilon_2, \mathrm{RMS}(p))\,\min(\eta, t^{-1/2});\quad
        p \mathrel{*}= 1-\eta\lambda;\quad w = t^{\beta_{2,decay}};\quad
        R = \mathrm{lerp}(R, \overline{g^2}^{\,cols}, w);\quad
        C = \mathrm{lerp}(C, \overline{g^2}^{\,rows}, w);\quad
        V = \frac{R C}{\max(\overline{R}, \epsilon_1)};\quad
        u = \frac{g}{\sqrt{\max(V, \epsilon_1^2)}};\quad
        p \mathrel{-}= \frac{\alpha}{\max(1, \mathrm{RMS}(u)/d)}\,u

    A param of two or more dims keeps a row factor ``row_var`` (``shape[:-1] + (1,)``) and a
    column factor ``col_var`` (``shape[:-2] + (1, shape[-1])``) over its last two dims,
    batched over the leading ones: n + m state elements for an n x m matrix instead of Adam's
    2nm.  A 0-/1-D param keeps a full ``variance`` (``V``).  ``eps = (eps1, eps2)``; ``eps1``
    None is the param dtype's machine epsilon.  ``weight_decay`` is decoupled.  The
    relative step is torch's (``lr`` capped by ``1/sqrt(t)``).  float16/bfloat16 params run in
    float32 on copies, each array rounded once (docs/design.md, "Precision"; numpy and numba
    backends); the factors are not elementwise state: no 8-bit form, and float32/float64
    params keep them in their own dtype.
    """ + _PIPELINE_DOC
    rule = RULES["adafactor"]

    def __init__(self, params, lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0,
                 weight_decay=0.0, *, maximize=False, clip_value=None, clip_norm=None,
                 clip_global_norm=None, weight_clip=None, max_norm=None, nonfinite="raise",
                 backend="auto", state_dtype=None, master_weights=False,
                 stochastic_rounding=False, seed=0, min_8bit_size=4096):
        super().__init__(params, **_opts(locals()))


class _ScheduleFree(Optimizer):
    """The ``train()``/``eval()`` switch of the Schedule-Free rules (the ``schedulefree`` package's).

    While training the params hold ``y``, the point the gradients are taken at; ``eval()`` moves
    them to ``x = lerp(y, z, 1 - 1/beta)`` (the average the method guarantees, the one to
    evaluate and save for inference) and ``train()`` moves them back, ``y = lerp(x, z, 1 - beta)``.
    ``beta`` is ``betas[0]`` (AdamW) or ``momentum`` (SGD).  Each group's mode is its
    ``group_state["train_mode"]`` (1 or 0), so ``state_dict()`` and checkpoints carry it.  An
    optimizer starts in train mode (the package starts in eval mode and wants ``train()`` first;
    before the first step z equals the param, so either switch leaves the params as they are).
    ``step()`` in eval mode is a RuntimeError, as the package's step.
    """

    def _beta(self, g):
        raise NotImplementedError

    @property
    def training(self) -> bool:
        """Whether every group is in train mode (the params hold y)."""
        return all(gs["train_mode"] == 1.0 for gs in self.group_state)

    def train(self):
        """Params to y (no-op for a group already in train mode); returns self."""
        return self._switch(1.0, lambda b: 1.0 - b)

    def eval(self):
        """Params to x, the average to evaluate (no-op for a group in eval mode); returns self."""
        return self._switch(0.0, lambda b: 1.0 - 1.0 / b)

    def _switch(self, mode, weight):
        for gi, g in enumerate(self.param_groups):
            if self.group_state[gi]["train_mode"] == mode:
                continue
            swap, c = _lerp_form(weight(float(self._beta(g))))
            for p, st in zip(g["params"], self.state[gi]):
                _lerp_to_z(p, st, swap, c)
            self.group_state[gi]["train_mode"] = mode
        return self

    def _step(self, grads, extras, grad_scale):
        if not self.training:
            raise RuntimeError(f"{type(self).__name__}.step(): the optimizer is in eval mode "
                               "(the params hold x); call train() before stepping")
        return super()._step(grads, extras, grad_scale)


def _lerp_to_z(p, st, swap, c):
    """``p = lerp(p, z, w)`` in torch's form (``swap``, ``c``: ``fastopt._rules._lerp_form``).

    A 16-bit param is computed in float32 (on its float32 master when it has one) and
    rounded once, as a step writes it.
    """
    z = st["z"]
    master = st.get("master")
    if master is not None or p.dtype.itemsize == 2:
        x = master if master is not None else _prec.to_float32(p)
        zz = _prec.to_float32(z) if z.dtype.itemsize == 2 else z.astype(np.float32, copy=False)
        x = zz + c * (x - zz) if swap else x + c * (zz - x)
        if master is not None:
            master[...] = x
        p[...] = _prec.round_to(x, p.dtype)  # nearest even, also under stochastic rounding
        return
    if swap:
        p[...] = z + c * (p - z)
    else:
        p += c * (z - p)


class AdamWScheduleFree(_ScheduleFree):
    r"""Schedule-Free AdamW (Defazio et al., 2024), as ``schedulefree.AdamWScheduleFree`` (1.4.1).

    Per step ``t`` (``k = t - 1``), on the host: ``lr_t = lr * min(1, (k+1)/warmup_steps)``,
    ``lr_max = max(lr_max, lr_t)``, ``w = (k+1)**r * lr_max**weight_lr_power``,
    ``weight_sum += w``, ``c = w / weight_sum`` (0 when both are 0); per element:

    .. math::
        v = eta_2 v + (1-eta_2) g^2;\quad u = rac{g}{\sqrt{v/(1-eta_2^t)} + \epsilon}
        + \lambda y;\quad y = \mathrm{lerp}(y, z, c) + \eta_t(eta_1(1-c) - 1)\,u;\quad
        z \mathrel{-}= \eta_t u

    The param holds ``y`` while training; ``z`` (state) starts as a copy of the param.  The
    weight decay ``weight_decay`` is applied at ``y`` after the normalisation, as the package
    does.  ``train()``/``eval()`` switch the params between ``y`` and the average
    ``x = lerp(y, z, 1 - 1/beta1)``: call ``eval()`` before evaluating or saving for inference.
    ``state_dtype="q8"`` is refused (``z`` is an iterate, not a statistic).
    """ + _PIPELINE_DOC
    rule = RULES["schedule_free_adamw"]

    def __init__(self, params, lr=0.0025, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 warmup_steps=0, r=0.0, weight_lr_power=2.0, *, maximize=False, clip_value=None,
                 clip_norm=None, clip_global_norm=None, weight_clip=None, max_norm=None,
                 nonfinite="raise", backend="auto", state_dtype=None, master_weights=False,
                 stochastic_rounding=False, seed=0, min_8bit_size=4096):
        super().__init__(params, **_opts(locals()))

    def _beta(self, g):
        return g["betas"][0]


class SGDScheduleFree(_ScheduleFree):
    r"""Schedule-Free SGD (Defazio et al., 2024), as ``schedulefree.SGDScheduleFree`` (1.4.1).

    The host scalars are AdamWScheduleFree's (``lr_t``, ``lr_max``, ``weight_sum``, ``c``);
    per element, with ``weight_decay`` added at ``y`` (``g += wd * y``):

    .. math::
        y = \mathrm{lerp}(y, z, c) + \eta_t(\mu(1-c) - 1)\,g;\quad z \mathrel{-}= \eta_t g

    ``momentum`` (``mu``, in (0, 1)) is the interpolation constant; ``train()``/``eval()`` as
    on :class:`AdamWScheduleFree` with ``beta1 = momentum``.
    """ + _PIPELINE_DOC
    rule = RULES["schedule_free_sgd"]

    def __init__(self, params, lr=1.0, momentum=0.9, weight_decay=0.0, warmup_steps=0, r=0.0,
                 weight_lr_power=2.0, *, maximize=False, clip_value=None, clip_norm=None,
                 clip_global_norm=None, weight_clip=None, max_norm=None, nonfinite="raise",
                 backend="auto", state_dtype=None, master_weights=False,
                 stochastic_rounding=False, seed=0, min_8bit_size=4096):
        super().__init__(params, **_opts(locals()))

    def _beta(self, g):
        return g["momentum"]


class LARS(Optimizer):
    r"""LARS (You et al. 2017), optax's semantics: momentum SGD on a per-tensor trust-scaled step.

    .. math::
        u = g + \lambda p;\quad
        \tau = c\,\frac{\lVert p\rVert}{\lVert u\rVert + \epsilon}
        \quad(1 \text{ if either norm is } 0);\quad
        m = -\eta\tau u + \mu m;\quad p \mathrel{+}= m
        \quad(\text{nesterov: } p \mathrel{+}= -\eta\tau u + \mu m)

    As ``optax.lars`` (``trust_coefficient`` ``c``, ``eps``, ``momentum`` ``mu``, defaults
    alike; the momentum buffer holds the lr-scaled step, optax's ``trace``).  optax's masks are
    per-group options: put biases and norm scales in a group with ``weight_decay=0`` and
    ``trust_ratio=False`` (then ``tau = 1``).  ``state_dtype="q8"`` keeps the momentum buffer
    8-bit (signed map; the trust ratio comes from the params and grads, not from the state).
    """ + _PIPELINE_DOC
    rule = RULES["lars"]

    def __init__(self, params, lr=1e-3, weight_decay=0.0, trust_coefficient=1e-3, eps=0.0,
                 momentum=0.9, nesterov=False, *, trust_ratio=True, maximize=False,
                 clip_value=None, clip_norm=None, clip_global_norm=None, weight_clip=None,
                 max_norm=None, nonfinite="raise", backend="auto", state_dtype=None,
                 master_weights=False, stochastic_rounding=False, seed=0, min_8bit_size=4096):
        super().__init__(params, **_opts(locals()))


OPTIMIZERS = {cls.rule.name: cls for cls in
              (SGD, Adam, AdamW, Adagrad, RMSprop, Adadelta, Adamax, NAdam, RAdam, Lion, LAMB,
               AdaHessian, Newton, Muon, ASGD, Rprop, AdaBelief, Yogi, AdEMAMix, Adafactor,
               AdamWScheduleFree, SGDScheduleFree, LARS)}
