"""The backend-dispatch layer (docs/design.md, "Backend contract").

A backend is a module under ``fastopt.kernels`` that, when imported, calls
:func:`register_kernel` once per rule and :func:`register_ops` once.  Nothing
here imports numba or cupy: a backend's module is imported the first time a
step needs it, and a failed import is remembered as the reason it is
unavailable.

The contract a backend implements
---------------------------------
``kernel(params, grads, states, scalars, pre, extras=None) -> None``
    One step of one rule over a list of tensors, the whole of the pipeline (docs/design.md, "Pipeline")
    steps 1 and 3-7 plus ``weight_clip``, writing ``params`` and the state
    arrays in place.  ``params``/``grads``/``extras`` are lists of flat (1-D),
    C-contiguous arrays of one dtype (Newton's ``extras`` are its n*n Hessians,
    flattened); ``states`` maps each state name of the rule (``exp_avg``, ...) to
    a list like ``params``; ``scalars`` are the rule's host scalars as Python
    floats and bools (``fastopt._rules``); ``pre`` is a :class:`Pre`.
    Everything was validated before the call: a kernel never raises on data.

``Ops``
    The non-rule primitives of the pipeline (norms, the non-finite check,
    ``max_norm``), see :class:`Ops`.
"""

from __future__ import annotations

import importlib
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable

#: backend name -> the module (relative to ``fastopt.kernels``) that registers it.
BACKEND_MODULES = {
    "numpy": "reference",
    "numba": "numba_cpu",
    "cupy": "cupy_gpu",
}
BACKEND_NAMES = tuple(BACKEND_MODULES)
ENV_VAR = "FASTOPT_BACKEND"

_KERNELS: dict[tuple[str, str], Callable] = {}
_OPS: dict[str, "Ops"] = {}
_FAILED: dict[str, str] = {}
_LOCK = threading.Lock()


@dataclass(frozen=True)
class Pre:
    """The element-wise pipeline options of one step of one group (docs/design.md, "Pipeline").

    ``inv_scale``: ``1 / grad_scale`` computed in double on the host (as
    torch's GradScaler multiplies by the reciprocal), or None.
    ``scales``: per-tensor factor from ``clip_norm`` and ``clip_global_norm``
    (a float64 array of the backend's kind, one entry per tensor), or None.
    """

    inv_scale: float | None = None
    maximize: bool = False
    clip_value: float | None = None
    scales: Any = None
    weight_clip: float | None = None
    #: the bucket's resolved ``fastopt.precision.Precision`` when it is not plain (16-bit
    #: params, a state dtype other than the param's, master weights or stochastic rounding;
    #: only a backend whose ``Ops.precision_options`` is True receives one), else None
    precision: Any = None
    #: the step ``t`` (stochastic rounding hashes it) and, with a ``precision``, the
    #: ``max_norm`` the kernel applies in the compute dtype before its one rounding
    step: int = 0
    max_norm: float | None = None
    #: the params' shapes (the kernels get flat arrays), for a rule whose math needs them
    #: (``Rule.param_ndim``: Muon's matrix products); None otherwise
    shapes: Any = None


class Ops:
    """Pipeline primitives of a backend; every list holds flat arrays of one dtype."""

    name = "?"
    xp: Any = None  # the array module (numpy or cupy)
    #: the param dtypes the kernels take (names, so asking never imports ml_dtypes)
    dtypes: tuple = ("float32", "float64")
    #: whether the kernels take a ``Pre.precision`` (a state dtype other than the param's,
    #: master weights, stochastic rounding)
    precision_options: bool = False
    #: the param dtypes whose buckets of 8-bit block-quantized state (``state_dtype="q8"``:
    #: uint8 codes plus ``<name>_absmax`` per state, docs/design.md "8-bit state format") the
    #: kernels take; with master weights or stochastic rounding also ``precision_options``
    q8_dtypes: tuple = ()
    #: the float state dtypes (names) the kernels store, None: every one a precision may
    #: resolve to
    state_formats: tuple | None = None
    #: the widening driver's conversions on this backend's arrays (fastopt._widen: an object
    #: with HostConversions' methods); None: the NumPy ones
    widening: Any = None

    def grad_stats(self, grads, extras, *, inv_scale, clip_value, need_sumsq, check_finite):
        """One read pass over the grads.

        Returns ``(sumsq, finite)``: ``sumsq`` the float64 per-tensor sum of
        squares of ``clip(g * inv_scale, -clip_value, clip_value)`` (None
        unless ``need_sumsq``), ``finite`` whether every ``g * inv_scale`` (and
        every extra input) is finite (True unless ``check_finite``).
        """
        raise NotImplementedError

    def sumsq(self, arrays):
        """Per-tensor sums of squares, float64, one array of the backend's kind."""
        raise NotImplementedError

    def step_plan(self, rule, bucket, grads, hp, pointers=False):
        """Optional: a plan for repeated small steps of one bucket, or None (the default).

        A plan has ``finite()`` (the read pass: True, or None when the full step must
        decide) and ``update(s, check=False, step=None)`` (the fused update with the step
        scalars ``s``; with ``check`` it checks the grads first and returns False, with
        nothing written, where the full step must decide, else True; ``step``, the step
        count, is what stochastic rounding hashes: a plan that needs it and gets None
        returns False); the optimizer's step cache
        decides when it may be used (docs/design.md, "Pipeline").  With ``pointers`` the
        plan addresses the grads by the data pointers its caller passes to
        ``set_grads(ptrs)`` before each step.
        """
        return None

    def scale_(self, arrays, factors):
        """``a *= factors[i]`` for each array (factors: float64 array)."""
        raise NotImplementedError

    def clip_(self, arrays, c):
        """``a = clip(a, -c, c)`` in place for each array."""
        raise NotImplementedError

    def asarray(self, host_array):
        """A backend array holding a copy of a NumPy array (state_dict loading)."""
        return self.xp.array(host_array, copy=True)

    def to_host(self, array):
        """A NumPy copy of a backend array."""
        import numpy as np

        return np.array(array, copy=True)


def register_kernel(rule: str, backend: str, fn: Callable) -> None:
    _KERNELS[(rule, backend)] = fn


def register_ops(ops: Ops) -> None:
    _OPS[ops.name] = ops


def _load(backend: str) -> None:
    if backend in _OPS:
        return
    if backend not in BACKEND_MODULES:
        raise ValueError(f"backend: expected one of {('auto',) + BACKEND_NAMES}, got {backend!r}")
    with _LOCK:
        if backend in _OPS:
            return
        if backend in _FAILED:
            raise RuntimeError(f"backend {backend!r} is unavailable: {_FAILED[backend]}")
        try:
            mod = importlib.import_module(f"fastopt.kernels.{BACKEND_MODULES[backend]}")
            register_ops(mod.OPS)
        except Exception as e:  # ImportError, missing CUDA driver, no device, ...
            _FAILED[backend] = f"{type(e).__name__}: {e}"
            raise RuntimeError(f"backend {backend!r} is unavailable: {_FAILED[backend]}") from e


def get_ops(backend: str) -> Ops:
    _load(backend)
    return _OPS[backend]


def get_kernel(rule: str, backend: str) -> Callable:
    _load(backend)
    try:
        return _KERNELS[(rule, backend)]
    except KeyError:
        raise NotImplementedError(f"rule {rule!r} has no kernel on backend {backend!r}") from None


def available(backend: str) -> bool:
    try:
        _load(backend)
        return True
    except RuntimeError:
        return False


def backends() -> dict:
    """Every backend: ``{name: {"available", "reason", "rules", "dtypes", "q8_state"}}``.

    ``dtypes`` lists the param dtypes the backend's kernels take (empty when it
    is unavailable); ``q8_state`` whether its kernels take 8-bit state (``Ops.q8_dtypes``).  Asking loads each backend (imports numba or cupy where
    installed).
    """
    out = {}
    for name in BACKEND_NAMES:
        ok = available(name)
        out[name] = {
            "available": ok,
            "reason": None if ok else _FAILED.get(name),
            "rules": sorted(r for (r, b) in _KERNELS if b == name),
            "dtypes": list(_OPS[name].dtypes) if ok else [],
            "q8_state": bool(ok and _OPS[name].q8_dtypes),
        }
    return out


def is_plain(precision) -> bool:
    """True when a resolved precision needs nothing but the float32/float64 kernels."""
    return precision is None or (
        precision.param in _plain_dtypes() and precision.state == precision.param
        and not precision.master_weights and not precision.stochastic_rounding)


def _plain_dtypes():
    import numpy as np

    return (np.dtype(np.float32), np.dtype(np.float64))


def supports(ops: "Ops", precision) -> bool:
    """Whether a backend's kernels take params of this resolved precision."""
    if is_plain(precision):
        return True
    if _is_q8(precision):
        return precision.param.name in ops.q8_dtypes and (
            ops.precision_options or not (precision.master_weights or precision.stochastic_rounding))
    if ops.state_formats is not None and \
            getattr(precision.state, "name", None) not in ops.state_formats:
        return False
    return precision.param.name in ops.dtypes and ops.precision_options


def _is_q8(precision) -> bool:
    from .precision import Q8  # here, not at the top: this module imports no fastopt module

    return precision.state is Q8


def _unsupported(backend: str, precision) -> TypeError:
    ops = _OPS.get(backend)
    if _is_q8(precision):
        what = (f"the {backend!r} backend's kernels for 8-bit state (state_dtype='q8') "
                f"do not take {precision.param} params"
                + (" with master_weights or stochastic_rounding" if ops is not None
                   and precision.param.name in ops.q8_dtypes else "") + " yet")
    elif ops is not None and precision.param.name in ops.dtypes and ops.precision_options:
        what = f"the {backend!r} backend's kernels do not store state as {precision.state}"
    elif precision.param.name in ("float16", "bfloat16"):
        what = f"the {precision.param.name} kernels of the {backend!r} backend have not landed yet"
    else:
        what = (f"the {backend!r} backend's kernels do not take state_dtype other than the param's, "
                "master_weights or stochastic_rounding yet")
    hint = ("use backend='numpy' (or 'auto', which sends such NumPy params there)"
            if backend != "cupy" else "use NumPy arrays with backend='numpy'")
    state = "q8" if _is_q8(precision) else getattr(precision.state, "name", precision.state)
    return TypeError(f"backend {backend!r}: {what} ({precision.param} params, state "
                     f"{state}); {hint}")


def array_kind(a) -> str | None:
    """``"numpy"`` or ``"cupy"`` for an array, None for anything else."""
    import numpy as np

    if isinstance(a, np.ndarray):
        return "numpy"
    mod = type(a).__module__ or ""
    if mod.startswith("cupy"):
        return "cupy"
    return None


def resolve(backend: str, kind: str, precisions=()) -> str:
    """The concrete backend for ``backend``, arrays of ``kind`` and resolved ``precisions``.

    CuPy arrays go to ``cupy``; NumPy arrays to ``numba`` when it imports and
    its kernels take every precision (float16/bfloat16 params, float32, 16-bit
    state, master weights, stochastic rounding), else to ``numpy`` (today: the
    8-bit state format).  ``FASTOPT_BACKEND`` overrides
    ``auto``.  An explicit backend whose kernels do not take a precision is a
    TypeError saying so.
    """
    special = [p for p in precisions if not is_plain(p)]
    if backend == "auto":
        backend = os.environ.get(ENV_VAR, "auto") or "auto"
    if backend == "auto":
        if kind == "cupy":
            backend = "cupy"
        elif available("numba") and all(supports(_OPS["numba"], p) for p in special):
            return "numba"
        else:
            return "numpy"
    if backend not in BACKEND_MODULES:
        raise ValueError(f"backend: expected one of {('auto',) + BACKEND_NAMES}, got {backend!r}")
    wants = "cupy" if backend == "cupy" else "numpy"
    if wants != kind:
        raise TypeError(f"backend {backend!r} takes {wants} arrays, got {kind} arrays")
    _load(backend)
    for p in special:
        if not supports(_OPS[backend], p):
            raise _unsupported(backend, p)
    return backend
