"""The widening driver: 16-bit params for the rules whose kernels are float32/float64 only.

Muon (``Rule.kind`` "orthogonalize") and Adafactor ("factored") have one kernel per
backend, written for float32/float64 arrays.  A bucket of float16/bfloat16 params (or
of 16-bit state, master weights, stochastic rounding) runs them here, the same way on
every backend (docs/design.md, "Precision"):

1. widen: exact float32 copies of the param (or of its float32 ``master``), the grad
   and every state array;
2. run the backend's own float32 kernel of the rule on the copies, with no precision
   (it applies the grad pipeline, the decay stage, the rule and ``weight_clip``);
3. ``max_norm`` on the float32 param copy, per tensor;
4. write each array back once: the state rounded to nearest-even to its dtype, the
   master as is, the param to nearest-even or stochastically (the counter hash of
   (seed, step, flat index in the param), ``fastopt.precision``).

This is the order of ``kernels/reference.py`` ``_reduced_tensor``, the definition for
the elementwise rules, so a widened step is one rounding per write too.

8-bit state (``state_dtype="q8"``, Muon only: its momentum buffer is elementwise;
Adafactor's factors are not and ``resolve_precision`` refuses them): step 1 decodes
each state from its uint8 codes and ``<name>_absmax`` (``dequantize_blockwise``, the
signed map unless the rule lists the state in ``nonnegative_state``) and step 4
writes ``quantize_blockwise`` of the new float32 state back (codes and absmax), as
``_reduced_tensor``'s q8 path does.  Such buckets are widened for float32 params too.  The driver
works on NumPy arrays; the CuPy backend refuses such buckets (:func:`check_backend`).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from . import precision as _prec
from . import quantization as _q
from ._rules import CLIP_EPS, FACTORED, ORTHOGONALIZE

#: the rule kinds whose 16-bit buckets run through :func:`widened_step`
WIDENED_KINDS = (ORTHOGONALIZE, FACTORED)


def widens(rule, precision) -> bool:
    """Whether a bucket of ``rule`` with the resolved ``precision`` (None: plain) is widened:
    every non-plain bucket of Muon/Adafactor (16-bit params or state, master weights,
    stochastic rounding, and Muon's 8-bit state with float32 params as well)."""
    return precision is not None and rule.kind in WIDENED_KINDS


def check_backend(rule, backend: str, precisions) -> None:
    """TypeError, before anything is written, where ``backend`` cannot widen ``rule``'s buckets."""
    if backend == "cupy" and any(widens(rule, p) for p in precisions):
        p = next(p for p in precisions if widens(rule, p))
        raise TypeError(f"backend 'cupy': {rule.name} takes float32/float64 params with state "
                        f"in the param's dtype on the GPU (got {p.param} params, state "
                        f"{getattr(p.state, 'name', p.state)}, master_weights="
                        f"{p.master_weights}); the 16-bit form of {rule.name} runs on "
                        f"NumPy arrays (backend='numpy' or 'numba')")


def widened_step(kernel, params, grads, states, scalars, pre, extras=None,
                 nonnegative=()) -> None:
    """One step of ``kernel`` (a backend's float32 kernel) over a reduced-precision bucket.

    Arguments as the backend contract's (``fastopt._backend``); ``pre.precision`` is
    the bucket's resolved precision, ``states`` may hold ``master`` (float32 copies).
    With 8-bit state ``states`` holds each state's uint8 codes and ``<name>_absmax``;
    ``nonnegative`` (the rule's ``nonnegative_state``) names those on the unsigned map.
    """
    prec = pre.precision
    q8 = prec.state is _prec.Q8
    masters = states.get("master")
    # to_float32 always copies; a state entry is None for a param without that array
    # (Adafactor: a vector has ``variance``, a matrix ``row_var``/``col_var``)
    work = [np.array(masters[i], dtype=np.float32, copy=True) if masters is not None
            else _prec.to_float32(p) for i, p in enumerate(params)]
    wgrads = [_prec.to_float32(g) for g in grads]
    names = [n for n in states if n != "master" and not (q8 and n.endswith("_absmax"))]
    if q8:
        wstates = {n: [None if a is None else
                       _q.dequantize_blockwise(a, states[n + "_absmax"][i],
                                               signed=n not in nonnegative)
                       for i, a in enumerate(states[n])] for n in names}
    else:
        wstates = {n: [None if a is None else _prec.to_float32(a) for a in states[n]]
                   for n in names}
    wextras = None if extras is None else [_prec.to_float32(e) for e in extras]
    kernel(work, wgrads, wstates, scalars,
           dataclasses.replace(pre, precision=None, max_norm=None), wextras)
    if pre.max_norm is not None:
        for w in work:
            w64 = w.astype(np.float64)
            w *= min(1.0, pre.max_norm / (math.sqrt(float(np.dot(w64, w64))) + CLIP_EPS))
    for name, arrs in wstates.items():
        for i, (stored, a) in enumerate(zip(states[name], arrs)):
            if stored is None:
                continue
            if q8:
                codes, absmax = _q.quantize_blockwise(a, signed=name not in nonnegative)
                stored[...] = codes
                states[name + "_absmax"][i][...] = absmax
            else:
                stored[...] = _prec.round_to(a, stored.dtype)
    for i, (p, w) in enumerate(zip(params, work)):
        if masters is not None:
            masters[i][...] = w
        if prec.stochastic_rounding:
            p[...] = _prec.round_to(w, p.dtype, stochastic_rounding=True, seed=prec.seed,
                                    step=pre.step, index=_prec.element_index(p.size))
        else:
            p[...] = _prec.round_to(w, p.dtype)
