"""The step pipeline (docs/design.md, "Pipeline"), the same on every backend.

A step runs in two phases so that it is atomic across every tensor of every
group:

1. *read*: for each group, one pass over the grads (``Ops.grad_stats``) when a
   non-finite check or a norm clip needs it.  Nothing is written.  If any grad
   is non-finite the step raises or is skipped here.
2. *write*: the per-tensor clip factors are derived from the sums of squares
   (on the backend's own arrays, so a GPU step keeps them on the device), then
   one fused kernel call per (group, dtype) updates params and state, and
   ``max_norm`` costs one more read and write of the params.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ._backend import Pre, get_kernel, get_ops, is_plain
from ._rules import CLIP_EPS, Rule
from ._widen import check_backend, conversions, widened_step, widens


@dataclass
class StepInfo:
    """What a step did.

    ``skipped``: True when ``nonfinite="skip"`` dropped the step.
    ``grad_norm``: the global gradient norm ‖G‖ before clipping, over the
    tensors of every group that sets ``clip_global_norm`` (None when no group
    does); ``group_grad_norms`` holds it per group (None where not computed).
    ``group_state``: the per-group scalar state after the step (NAdam's
    ``mu_product``), as the functional API returns it.
    """

    skipped: bool = False
    _grad_norm: object = None
    _group_norms: tuple = ()
    group_state: tuple = ()

    # read lazily: on the GPU the norms stay on the device until asked for
    @property
    def grad_norm(self):
        return None if self._grad_norm is None else float(self._grad_norm)

    @property
    def group_grad_norms(self):
        return tuple(None if n is None else float(n) for n in self._group_norms)

    def __repr__(self):
        return f"StepInfo(skipped={self.skipped}, grad_norm={self.grad_norm})"


@dataclass
class Bucket:
    """The tensors of one group that share a dtype, as flat arrays.

    ``index`` maps bucket position -> position in the group.  ``params`` and
    ``states`` are built once per optimizer and passed as the same list
    objects on every step.
    """

    index: list
    params: list
    states: dict
    #: the resolved ``fastopt.precision.Precision`` of the bucket's dtype (None: plain)
    precision: object = None
    #: the params' shapes, in bucket order (kept for rules with ``Rule.param_ndim``)
    shapes: list | None = None


@dataclass
class GroupStep:
    hp: dict                       # hyperparameters with lr resolved to a float
    buckets: list                  # of Bucket
    grads: list                    # flat, in group order
    extras: list | None = None     # flat, in group order (AdaHessian, Newton)
    gstate: dict = field(default_factory=dict)
    #: this GroupStep's own step count, when it is not run_step's ``t`` (fastopt.torch keeps
    #: a count per param: params at different counts are separate GroupSteps of one call)
    t: int | None = None
    #: GroupSteps with the same ``norm_group`` (not None) share one ``clip_global_norm``:
    #: the pieces of one torch param group that sit at different step counts
    norm_group: object = None


def make_buckets(flat_params: list, flat_states: dict, precisions: dict | None = None,
                 param_precisions: list | None = None, shapes: list | None = None) -> list:
    """Split a group into buckets of one dtype and one precision; a group of one is the same lists.

    ``precisions`` maps a param dtype to its resolved precision; a bucket keeps
    it only when it is not plain (see ``fastopt._backend.is_plain``).
    ``param_precisions`` (one per param) overrides it per param: with
    ``state_dtype="q8"`` a tensor below ``min_8bit_size`` keeps float32 state and
    lands in a bucket of its own precision.  A state entry may be None for a param
    that has no such array (a float32-state param has no ``<name>_absmax``); a
    bucket carries only the state names its params all have.  ``shapes`` (the
    params' shapes, for a rule whose kernel needs them) are split the same way.
    """
    if param_precisions is None:
        param_precisions = [(precisions or {}).get(p.dtype) for p in flat_params]
    norm = [None if is_plain(pr) else pr for pr in param_precisions]
    keys = [(p.dtype, pr) for p, pr in zip(flat_params, norm)]
    if len(set(keys)) == 1:
        # a name some params lack (Adafactor's row_var for a vector) keeps None in their places
        states = {k: v for k, v in flat_states.items() if v and any(a is not None for a in v)}
        return [Bucket(list(range(len(flat_params))), flat_params, states, norm[0], shapes)]
    out = []
    for key in sorted(set(keys), key=lambda k: (str(k[0]), repr(k[1]))):
        idx = [i for i, k in enumerate(keys) if k == key]
        states = {k: [v[i] for i in idx] for k, v in flat_states.items()}
        states = {k: v for k, v in states.items() if any(a is not None for a in v)}
        out.append(Bucket(idx, [flat_params[i] for i in idx], states, key[1],
                          None if shapes is None else [shapes[i] for i in idx]))
    return out


def clip_scales(xp, sumsq, hp):
    """Per-tensor factors of steps 5-6 and the group's ‖G‖, from per-tensor sums of squares."""
    norms = xp.sqrt(sumsq)
    scales = xp.ones_like(norms)
    if hp["clip_norm"] is not None:
        scales = xp.minimum(1.0, hp["clip_norm"] / (norms + CLIP_EPS))
    gnorm = None
    if hp["clip_global_norm"] is not None:
        gnorm = xp.sqrt(xp.sum((norms * scales) ** 2))
        scales = scales * xp.minimum(1.0, hp["clip_global_norm"] / (gnorm + CLIP_EPS))
    return scales, gnorm


def run_step(backend: str, rule: Rule, groups: list, t: int, nonfinite: str, inv_scale) -> StepInfo:
    """One step of ``rule`` over validated groups (see the module docstring)."""
    ops = get_ops(backend)
    # Muon/Adafactor buckets of 16-bit params run through fastopt._widen, with the backend's
    # conversions (Ops.widening); a backend without them refuses here, before any write
    check_backend(rule, ops, [b.precision for gs in groups for b in gs.buckets])
    conv = conversions(ops)
    kernel = get_kernel(rule.name, backend)
    xp = ops.xp

    # phase 1: read
    stats = []
    for gs in groups:
        hp = gs.hp
        need = hp["clip_norm"] is not None or hp["clip_global_norm"] is not None
        check = nonfinite != "ignore"
        if need or check:
            stats.append(ops.grad_stats(gs.grads, gs.extras, inv_scale=inv_scale,
                                        clip_value=hp["clip_value"], need_sumsq=need,
                                        check_finite=check))
        else:
            stats.append((None, True))
    if not all(bool(finite) for _, finite in stats):
        if nonfinite == "raise":
            raise FloatingPointError(
                "non-finite gradient (inf or nan) after unscaling; nothing was written "
                "(pass nonfinite='skip' to skip such steps, as a loss scaler does)")
        return StepInfo(skipped=True, group_state=tuple(gs.gstate for gs in groups))

    # phase 2: write.  Per-tensor norms and clip_norm factors first; a global norm is
    # taken over every GroupStep of its norm group (one GroupStep unless ``norm_group``)
    clipped, gsq = [], {}
    for i, (gs, (sumsq, _)) in enumerate(zip(groups, stats)):
        key = i if gs.norm_group is None else ("g", gs.norm_group)
        if sumsq is None:
            clipped.append((key, None))
            continue
        hp = gs.hp
        norms = xp.sqrt(sumsq)
        scales = xp.ones_like(norms)
        if hp["clip_norm"] is not None:
            scales = xp.minimum(1.0, hp["clip_norm"] / (norms + CLIP_EPS))
        clipped.append((key, scales))
        if hp["clip_global_norm"] is not None:
            part = xp.sum((norms * scales) ** 2)
            gsq[key] = part if key not in gsq else gsq[key] + part
    gnorms = {k: xp.sqrt(v) for k, v in gsq.items()}
    total = None
    for k in gnorms:
        total = gnorms[k] * gnorms[k] if total is None else total + gnorms[k] * gnorms[k]
    norms, new_gstates = [], []
    for gs, (key, scales) in zip(groups, clipped):
        hp = gs.hp
        t_g = t if gs.t is None else gs.t
        gnorm = gnorms.get(key) if scales is not None else None
        if gnorm is not None:
            scales = scales * xp.minimum(1.0, hp["clip_global_norm"] / (gnorm + CLIP_EPS))
        norms.append(gnorm)
        scalars, new_gs = rule.step_scalars(hp, t_g, gs.gstate)
        new_gstates.append(new_gs)
        for b in gs.buckets:
            single = len(gs.buckets) == 1
            grads = gs.grads if single else [gs.grads[i] for i in b.index]
            extras = gs.extras if (single or gs.extras is None) else [gs.extras[i] for i in b.index]
            bscales = scales if (single or scales is None) else scales[xp.asarray(b.index)]
            # a reduced-precision bucket applies max_norm in its kernel, before the one
            # rounding of the param; a plain one costs the extra pass below
            pre = Pre(inv_scale=inv_scale, maximize=hp["maximize"], clip_value=hp["clip_value"],
                      scales=bscales, weight_clip=hp["weight_clip"], precision=b.precision,
                      step=t_g, max_norm=hp["max_norm"] if b.precision is not None else None,
                      shapes=b.shapes)
            if widens(rule, b.precision):
                widened_step(kernel, b.params, grads, b.states, scalars, pre, extras,
                             rule.nonnegative_state, conv)
            else:
                kernel(b.params, grads, b.states, scalars, pre, extras)
            if hp["max_norm"] is not None and b.precision is None:
                pn = xp.sqrt(ops.sumsq(b.params))
                ops.scale_(b.params, xp.minimum(1.0, hp["max_norm"] / (pn + CLIP_EPS)))
    return StepInfo(skipped=False, _grad_norm=None if total is None else xp.sqrt(total),
                    _group_norms=tuple(norms),
                    group_state=tuple(new_gstates))
