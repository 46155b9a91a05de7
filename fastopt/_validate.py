"""Input checks, run at the entry points before anything is written (docs/design.md, "Bad input").

Messages name the argument and index (``grads[3]``), what was expected and
what came.  The per-step checks have a fast path: for a list of 1000 tiny
tensors they compare tuples built by comprehensions and only walk the list
one element at a time to name the culprit once something is wrong.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import numpy as np

from . import precision as _prec
from ._backend import array_kind
from ._interop import as_native, is_foreign
from ._pipeline import GroupStep
from ._rules import as_host_scalars, check_hyperparameters, check_lr_value

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
#: float16 and bfloat16 too (bfloat16 is ml_dtypes', recognised without importing it)
PARAM_DTYPES = ("float16", "bfloat16", "float32", "float64")


def _float_dtype(dt) -> bool:
    return dt in FLOAT_DTYPES or dt == np.float16 or _prec.is_bfloat16(dt)


def _fmt_kind(a) -> str:
    kind = array_kind(a)
    return f"a {kind} array" if kind else f"{type(a).__name__}"


_NDARRAY = {np.ndarray}


def as_list(arrays, name: str, writeable: bool = True) -> list:
    """``arrays`` as a list of NumPy/CuPy arrays.

    Objects exporting ``__dlpack__`` or ``__cuda_array_interface__`` (torch tensors, JAX
    arrays, numba device arrays) are wrapped over the same memory (``fastopt._interop``);
    ``writeable=False`` for inputs that are only read (grads), so read-only buffers pass.
    """
    if array_kind(arrays) is not None or is_foreign(arrays):
        raise TypeError(f"{name}: expected a list of arrays, got a single array "
                        f"(wrap it in a list: [{name[:-1] if name.endswith('s') else name}])")
    if isinstance(arrays, (str, bytes)) or not hasattr(arrays, "__iter__"):
        raise TypeError(f"{name}: expected a list of arrays, got {type(arrays).__name__}")
    out = list(arrays)
    if set(map(type, out)) <= _NDARRAY:  # the common case: 23 us per 1000 arrays, per step
        return out
    return [as_native(a, f"{name}[{i}]", writeable=writeable) for i, a in enumerate(out)]


def check_array(a, label: str, kind: str | None = None) -> str:
    """TypeError unless ``a`` is a float16/bfloat16/float32/float64 NumPy or CuPy array (of ``kind``)."""
    k = array_kind(a)
    if k is None:
        raise TypeError(f"{label}: expected a numpy or cupy array, got {_fmt_kind(a)}")
    if kind is not None and k != kind:
        raise TypeError(f"{label}: expected a {kind} array like the others, got a {k} array "
                        f"(NumPy and CuPy arrays cannot be mixed in one call)")
    if not _float_dtype(a.dtype):
        raise TypeError(f"{label}: expected dtype float16, bfloat16, float32 or float64, "
                        f"got {a.dtype}")
    return k


def check_params(params: list, labels: list[str]) -> str:
    """Params of an optimizer or a functional call; returns their array kind."""
    if not params:
        raise ValueError("params: expected a non-empty list of arrays, got an empty list")
    kind = check_array(params[0], labels[0])
    seen: dict[int, str] = {}
    for p, label in zip(params, labels):
        check_array(p, label, kind)
        if not p.flags.c_contiguous:
            raise ValueError(f"{label}: expected a C-contiguous array (fastopt updates it in place), "
                             f"got strides {p.strides} for shape {p.shape}")
        if kind == "numpy" and not p.flags.writeable:
            raise ValueError(f"{label}: expected a writeable array, got a read-only one")
        if id(p) in seen:
            raise ValueError(f"{label}: the same array is passed twice (also as {seen[id(p)]})")
        seen[id(p)] = label
    _check_no_overlap(params, labels)
    return kind


def check_param_ndim(rule, params: list, labels: list[str]) -> None:
    """ValueError naming the first param whose number of dimensions is not ``rule.param_ndim``.

    Muon orthogonalizes each param as a matrix: it takes 2-D params only (biases, gains and
    embeddings go to an elementwise rule such as AdamW, see README "Muon")."""
    if rule.param_ndim is None:
        return
    for p, lab in zip(params, labels):
        if p.ndim != rule.param_ndim:
            raise ValueError(f"{lab}: expected a {rule.param_ndim}-D array ({rule.class_name} "
                             f"updates matrices only; give other params to another optimizer "
                             f"such as AdamW), got shape {tuple(p.shape)}")


def _check_no_overlap(arrays, labels) -> None:
    """ValueError if two params share memory (views of one buffer would be updated twice)."""
    spans = []
    for a, label in zip(arrays, labels):
        if a.size == 0:
            continue
        start = _address(a)
        spans.append((start, start + a.nbytes, label))
    spans.sort()
    for (s0, e0, l0), (s1, e1, l1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise ValueError(f"{l1}: expected an array of its own, got one that shares memory with {l0}")


def _overlaps(a, b) -> bool:
    if isinstance(a, np.ndarray):
        return bool(np.may_share_memory(a, b))
    s0, s1 = _address(a), _address(b)
    return s0 < s1 + b.nbytes and s1 < s0 + a.nbytes


def _address(a) -> int:
    if isinstance(a, np.ndarray):
        return a.__array_interface__["data"][0]
    return int(a.data.ptr)


def _c_strides(shape, itemsize) -> tuple:
    out, acc = [], itemsize
    for d in reversed(shape):
        out.append(acc)
        acc *= max(d, 1)
    return tuple(reversed(out))


def expected_layout(params: list, shape_of=None, dtype_of=None) -> list:
    """``(type, shape, dtype, strides)`` a companion of each param must have (the fast path).

    ``dtype_of(p)``: the companion's dtype (default: the param's).
    """
    shape_of = shape_of or (lambda p: p.shape)
    out = []
    for p in params:
        shp = shape_of(p)
        dt = p.dtype if dtype_of is None else dtype_of(p)
        out.append((type(p), shp, dt, _c_strides(shp, dt.itemsize)))
    return out


def grad_dtype_check(p, o, label) -> None:
    """A grad (or extra input) is the param's dtype or, for a 16-bit param, float32."""
    if o.dtype != p.dtype:
        _prec.check_grad_dtype(p.dtype, o.dtype, label)


def check_companions(params: list, others, name: str, label_of, kind: str, *,
                     shape_of=None, allow_copy: bool = False, want=None, dtype_check=None,
                     dtype_of=None) -> list:
    """Grads (or state, or extra inputs) that must match ``params`` one to one.

    Returns the list, with non-contiguous entries replaced by contiguous copies
    when ``allow_copy`` (grads are only read, so a copy is harmless).  ``want``
    is ``expected_layout(params, shape_of, dtype_of)``, which a caller may cache.
    The dtype must be ``dtype_of(p)`` (default: the param's), or pass
    ``dtype_check(p, o, label)`` (which raises) when more than one is allowed.
    """
    others = as_list(others, name, writeable=not allow_copy)
    if len(others) != len(params):
        raise ValueError(f"{name}: expected {len(params)} arrays (one per param), got {len(others)}")
    shape_of = shape_of or (lambda p: p.shape)
    if want is None:
        want = expected_layout(params, shape_of, dtype_of)
    try:
        # one comprehension checks type, shape, dtype and C-contiguity (strides of a C-ordered
        # array of that shape) for the common case: a list of 1000 tiny grads costs ~0.3 ms
        kinds_ok = [(type(o), o.shape, o.dtype, o.strides) for o in others] == want
    except AttributeError:
        kinds_ok = False
    if not kinds_ok:
        others = list(others)
        for i, (p, o) in enumerate(zip(params, others)):
            label = label_of(name, i)
            check_array(o, label, kind)
            if dtype_check is not None:
                dtype_check(p, o, label)
            elif dtype_of is not None:
                if o.dtype != dtype_of(p):
                    raise ValueError(f"{label}: expected dtype {dtype_of(p)} (the state dtype of "
                                     f"its param, {p.dtype}), got {o.dtype}")
            elif o.dtype != p.dtype:
                raise ValueError(f"{label}: expected dtype {p.dtype} (the dtype of its param), got {o.dtype}")
            if o.shape != shape_of(p):
                raise ValueError(f"{label}: expected shape {shape_of(p)}, got {o.shape}")
            if not o.flags.c_contiguous:
                if not allow_copy:
                    raise ValueError(f"{label}: expected a C-contiguous array, got strides {o.strides}")
                others[i] = o.copy(order="C") if kind == "numpy" else o.copy()
    for i, (p, o) in enumerate(zip(params, others)):
        # fresh arrays have no base: only views pay for the memory-overlap test (the grad
        # may be the view, or the param a view of the grad's buffer)
        if o is p or ((o.base is not None or p.base is not None) and o.size and _overlaps(o, p)):
            raise ValueError(f"{label_of(name, i)}: expected an array separate from its param, "
                             f"got the param itself or a view of it")
    return others


def check_disjoint(written: list, read: list = ()) -> None:
    """ValueError if an array that is written (a param, a state array) is passed twice.

    ``written`` and ``read`` are ``(name, arrays)`` pairs.  A written array may
    appear only once among all of them (e.g. ``exp_avgs`` passed again as
    ``exp_avg_sqs``, or ``grads[1] is params[0]``); read-only inputs may repeat
    among themselves.  Compares identities only (a set, cheap for long lists);
    views of the same buffer are caught per param by :func:`check_companions`.
    """
    w_ids = [id(a) for _, arrs in written for a in arrs]
    w_set = set(w_ids)
    if len(w_set) == len(w_ids) and all(w_set.isdisjoint(map(id, arrs)) for _, arrs in read):
        return
    seen: dict[int, str] = {}
    for name, arrs in written:
        for i, a in enumerate(arrs):
            if id(a) in seen:
                raise ValueError(f"{name}[{i}]: expected an array of its own (it is written in "
                                 f"place), got the same array as {seen[id(a)]}")
            seen[id(a)] = f"{name}[{i}]"
    for name, arrs in read:
        for i, a in enumerate(arrs):
            if id(a) in seen:
                raise ValueError(f"{name}[{i}]: expected an array separate from every param and "
                                 f"state array, got the same array as {seen[id(a)]}")


def check_grad_scale(grad_scale) -> float | None:
    """``1 / grad_scale`` in double, or None."""
    if grad_scale is None:
        return None
    if isinstance(grad_scale, np.ndarray) and grad_scale.ndim == 0 and grad_scale.dtype.kind in "fiu":
        grad_scale = grad_scale[()]  # a loss scaler's 0-d array
    if isinstance(grad_scale, bool) or not isinstance(grad_scale, (int, float, np.floating, np.integer)):
        raise TypeError(f"grad_scale: expected a float or None, got {type(grad_scale).__name__}")
    g = float(grad_scale)
    if not (math.isfinite(g) and g > 0):
        raise ValueError(f"grad_scale: expected a finite number > 0, got {grad_scale!r}")
    return 1.0 / g


def resolve_precisions(rule, params: list, labels: list, options: dict) -> dict:
    """``{param dtype: fastopt.precision.Precision}`` for the precision options of a call.

    Every check of ``fastopt.precision.resolve_precision`` (per param dtype, the
    first param of that dtype named in messages), plus: ``min_8bit_size`` is an
    integer >= 0, and ``state_dtype="q8"`` is refused for a rule without an
    elementwise state (Newton).  Tensors below ``min_8bit_size`` elements are
    resolved per param by :func:`param_precision`.
    """
    sd = options["state_dtype"]
    check_min_8bit_size(options.get("min_8bit_size", 4096))
    if isinstance(sd, str) and sd == "q8" and rule.kind == "dense_solve":
        raise ValueError(f"state_dtype: expected None for {rule.class_name}, got 'q8' (the dense "
                         "Newton solve keeps no state to quantize)")
    if isinstance(sd, str) and sd == "q8" and rule.q8_state_refused:
        raise ValueError(f"state_dtype: expected None, a float dtype or 'param' for "
                         f"{rule.class_name}, got 'q8' ({rule.q8_state_refused})")
    out = {}
    for p, lab in zip(params, labels):
        if p.dtype not in out:
            out[p.dtype] = _prec.resolve_precision(
                p.dtype, state_dtype=sd, master_weights=options["master_weights"],
                stochastic_rounding=options["stochastic_rounding"], seed=options["seed"],
                kind=rule.kind, label=lab)
    return out


def check_q8_options(rule, hp: dict, where: str = "") -> None:
    """ValueError for an option of ``rule`` that 8-bit state cannot take (``Rule.q8_refuses``)."""
    for name, why in rule.q8_refuses:
        if hp.get(name):
            raise ValueError(f"{where}{name}: expected False with state_dtype='q8' ({why}; use "
                             "state_dtype='bfloat16' or float32 state for this variant)")


def check_min_8bit_size(value) -> int:
    """``min_8bit_size`` as an int >= 0 (TypeError/ValueError naming it otherwise)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"min_8bit_size: expected an integer >= 0, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"min_8bit_size: expected an integer >= 0, got {value!r}")
    return int(value)


@functools.lru_cache(maxsize=None)
def _float32_state(prec):
    return dataclasses.replace(prec, state=np.dtype(np.float32))


def param_precision(precisions: dict, p, min_8bit_size: int):
    """The precision of one param: its dtype's, except that a q8 state of a tensor with
    fewer than ``min_8bit_size`` elements is float32 (bitsandbytes' rule: biases and norm
    weights are the tensors most sensitive to rounding, and they are small)."""
    prec = precisions[p.dtype]
    if prec.state is _prec.Q8 and p.size < min_8bit_size:
        return _float32_state(prec)
    return prec


def is_q8(prec) -> bool:
    return prec is not None and prec.state is _prec.Q8


def check_nonfinite(mode) -> str:
    if mode not in ("raise", "skip", "ignore"):
        raise ValueError(f"nonfinite: expected 'raise', 'skip' or 'ignore', got {mode!r}")
    return mode


# --------------------------------------------------------------------------- one step's inputs


def label(name: str, i: int) -> str:
    """``grads[3]``: the flat index over every param of the call (all groups of an optimizer)."""
    return f"{name}[{i}]"


def normalize_options(options: dict) -> dict:
    """A copy of a group's options with ``betas`` as a tuple (a list is accepted and stored as one)."""
    out = dict(options)
    if isinstance(out.get("betas"), list):
        out["betas"] = tuple(out["betas"])
    if isinstance(out.get("eps"), list):  # Adafactor's (eps1, eps2)
        out["eps"] = tuple(out["eps"])
    return out


def step_options(rule, options: dict, t: int, where: str = "", *, schedules: bool = True) -> dict:
    """A group's options for step ``t`` as host scalars, every range checked.

    NumPy scalars are widened to Python floats; a schedule as ``lr`` is
    evaluated at ``t - 1`` and its value checked (``schedules=False``, the
    functional API: a schedule is a TypeError).
    """
    hp = as_host_scalars(normalize_options(options))
    if callable(hp["lr"]) and not schedules:
        raise TypeError("lr: expected a float (evaluate a schedule before calling the functional API)")
    check_hyperparameters(rule, hp, where)
    if callable(hp["lr"]):
        at = f"{where}lr (the schedule's value at step {t - 1})"
        try:
            hp["lr"] = float(hp["lr"](t - 1))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{at}: expected a finite number >= 0, got an error: {e}") from e
        check_lr_value(hp["lr"], at)
    return hp


@dataclass
class Prepared:
    """One group's checked inputs of a step; a :class:`GroupStep` once its state buckets exist."""

    hp: dict
    grads: list
    extras: list | None

    def group_step(self, buckets: list, gstate: dict) -> GroupStep:
        return GroupStep(hp=self.hp, buckets=buckets, grads=self.grads, extras=self.extras,
                         gstate=gstate)


def flat(a):
    return a if a.ndim == 1 else a.reshape(-1)


def _widen_to_float64(params, arrays):
    if all(a.dtype == p.dtype for p, a in zip(params, arrays)):
        return arrays
    return [a.astype(p.dtype) if a.dtype != p.dtype and p.dtype.itemsize == 8 else a
            for p, a in zip(params, arrays)]


def prepare_groups(rule, hps: list, sizes: list, params: list, grads, extras, *, kind: str,
                   caller: str, written: list = (), want=None) -> list:
    """The input checks of one step of ``rule``, for the classes and the functional API alike.

    ``params`` are all params of the call in flat order, split into groups of
    ``sizes`` whose options ``hps`` came from :func:`step_options`.  Checks the
    grads (and the rule's extra input, shaped by ``Rule.extra_shape_of``)
    against the params, and that no written array (the params, and the
    ``(name, arrays)`` pairs of ``written``: the functional API's state lists)
    is passed twice or also as an input.  Nothing is written; returns one
    :class:`Prepared` per group, grads and extras flat.  ``want`` is
    ``expected_layout(params)``, which a caller may cache.
    """
    grads = check_companions(params, grads, "grads", label, kind, allow_copy=True, want=want,
                             dtype_check=grad_dtype_check)
    read = [("grads", grads)]
    if rule.extra is not None:
        if extras is None:
            raise TypeError(f"{caller} needs {rule.extra}")
        extras = check_companions(params, extras, rule.extra, label, kind, allow_copy=True,
                                  shape_of=lambda p: rule.extra_shape_of(p.shape, p.size),
                                  dtype_check=grad_dtype_check)
        read.append((rule.extra, extras))
    check_disjoint([("params", params), *written], read)
    # a float32 grad of a float64 param is widened here (exactly), so that the float32/float64
    # kernels see one dtype per bucket; a 16-bit param's float32 grad goes to its kernel as is
    grads = _widen_to_float64(params, grads)
    if extras is not None:
        extras = _widen_to_float64(params, extras)
    # flattened inline, not through flat(): a call per tensor is ~5% of this for 1000 small ones
    flat_grads = [g if g.ndim == 1 else g.reshape(-1) for g in grads]
    flat_extras = None if extras is None else [e if e.ndim == 1 else e.reshape(-1) for e in extras]
    if len(sizes) == 1:
        return [Prepared(hp=hps[0], grads=flat_grads, extras=flat_extras)]
    out, start = [], 0
    for hp, n in zip(hps, sizes):
        out.append(Prepared(hp=hp, grads=flat_grads[start:start + n],
                            extras=None if extras is None else flat_extras[start:start + n]))
        start += n
    return out
