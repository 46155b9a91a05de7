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
``_reduced_tensor``'s q8 path does.  Such buckets are widened for float32 params too.

The conversions (widen, write back, decode, encode, ``max_norm``) are an object with the
methods of :class:`HostConversions`, picked per backend: ``Ops.widening`` (None: the NumPy
definitions, for the ``numpy`` and ``numba`` backends).  The CUDA backend's is
``fastopt.kernels.cuda._host.DeviceConversions``: small kernels of ``widen.cu`` and ``q8.cu``
that give the same bits on device arrays, stochastic rounding included (docs/design.md,
"Precision").  A backend whose arrays are not NumPy's and that has no such object refuses
the bucket before anything is written (:func:`check_backend`).
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


class HostConversions:
    """The driver's conversions on NumPy arrays: the definitions of ``fastopt.precision`` and
    ``fastopt.quantization``.  A device backend supplies an object with the same methods."""

    @staticmethod
    def to_float32(a):
        """An exact float32 copy of a float16, bfloat16 or float32 array."""
        return _prec.to_float32(a)

    @staticmethod
    def store(x, out, precision=None, step=None) -> None:
        """``out[...]`` = float32 ``x`` rounded once to ``out``'s dtype: to nearest even, or
        stochastically when ``precision.stochastic_rounding`` (the counter hash of
        (``precision.seed``, ``step``, flat index in ``out``))."""
        if precision is not None and precision.stochastic_rounding:
            out[...] = _prec.round_to(x, out.dtype, stochastic_rounding=True, seed=precision.seed,
                                      step=step, index=_prec.element_index(out.shape))
        else:
            out[...] = _prec.round_to(x, out.dtype)

    @staticmethod
    def dequantize(codes, absmax, signed: bool):
        return _q.dequantize_blockwise(codes, absmax, signed=signed)

    @staticmethod
    def quantize_into(x, signed: bool, codes, absmax) -> None:
        """``codes[...], absmax[...] = quantize_blockwise(x, signed)``."""
        c, a = _q.quantize_blockwise(x, signed=signed)
        codes[...] = c
        absmax[...] = a

    @staticmethod
    def max_norm_(arrays, max_norm) -> None:
        """Each float32 array times ``min(1, max_norm / (||a|| + CLIP_EPS))`` (the norm in
        float64, the factor rounded once to float32 by the multiply)."""
        for w in arrays:
            w64 = w.astype(np.float64)
            w *= min(1.0, max_norm / (math.sqrt(float(np.dot(w64, w64))) + CLIP_EPS))


HOST = HostConversions()


def conversions(ops):
    """The conversions object of a backend's ``ops`` (``Ops.widening``, else the NumPy one)."""
    conv = getattr(ops, "widening", None)
    return HOST if conv is None else conv


def check_backend(rule, ops, precisions) -> None:
    """TypeError, before anything is written, where the backend of ``ops`` cannot widen
    ``rule``'s buckets: its arrays are not NumPy's and it has no ``Ops.widening``."""
    if getattr(ops, "widening", None) is not None or getattr(ops, "xp", np) is np:
        return
    p = next((p for p in precisions if widens(rule, p)), None)
    if p is not None:
        raise TypeError(f"backend {ops.name!r}: {rule.name} takes float32/float64 params with "
                        f"state in the param's dtype there (got {p.param} params, state "
                        f"{getattr(p.state, 'name', p.state)}, master_weights="
                        f"{p.master_weights}): the backend has no device form of the widening "
                        f"driver (Ops.widening); use backend='numpy', 'numba' or 'cupy'")


def widened_step(kernel, params, grads, states, scalars, pre, extras=None,
                 nonnegative=(), conv=HOST) -> None:
    """One step of ``kernel`` (a backend's float32 kernel) over a reduced-precision bucket.

    Arguments as the backend contract's (``fastopt._backend``); ``pre.precision`` is
    the bucket's resolved precision, ``states`` may hold ``master`` (float32 copies).
    With 8-bit state ``states`` holds each state's uint8 codes and ``<name>_absmax``;
    ``nonnegative`` (the rule's ``nonnegative_state``) names those on the unsigned map.
    ``conv``: the conversions for the arrays' kind (:func:`conversions`).
    """
    prec = pre.precision
    q8 = prec.state is _prec.Q8
    masters = states.get("master")
    # every conversion copies; a state entry is None for a param without that array
    # (Adafactor: a vector has ``variance``, a matrix ``row_var``/``col_var``)
    work = [conv.to_float32(masters[i] if masters is not None else p) for i, p in enumerate(params)]
    wgrads = [conv.to_float32(g) for g in grads]
    names = [n for n in states if n != "master" and not (q8 and n.endswith("_absmax"))]
    if q8:
        wstates = {n: [None if a is None else
                       conv.dequantize(a, states[n + "_absmax"][i], n not in nonnegative)
                       for i, a in enumerate(states[n])] for n in names}
    else:
        wstates = {n: [None if a is None else conv.to_float32(a) for a in states[n]]
                   for n in names}
    wextras = None if extras is None else [conv.to_float32(e) for e in extras]
    kernel(work, wgrads, wstates, scalars,
           dataclasses.replace(pre, precision=None, max_norm=None), wextras)
    if pre.max_norm is not None:
        conv.max_norm_(work, pre.max_norm)
    for name, arrs in wstates.items():
        for i, (stored, a) in enumerate(zip(states[name], arrs)):
            if stored is None:
                continue
            if q8:
                conv.quantize_into(a, name not in nonnegative, stored, states[name + "_absmax"][i])
            else:
                conv.store(a, stored)
    for i, (p, w) in enumerate(zip(params, work)):
        if masters is not None:
            masters[i][...] = w
        conv.store(w, p, prec, pre.step)
