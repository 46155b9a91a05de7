"""Checking a state dict before it is loaded: one pass that either raises or returns a plan.

:func:`plan_load` reads a ``state_dict()``-shaped dict (from
``Optimizer.state_dict()``, a pickle of one, or a checkpoint file read by
:func:`fastopt.load`) against an optimizer and returns a :class:`LoadPlan`:
the group options, host (NumPy) copies of every state array, the step count
and the group state, all checked and converted.  Nothing is written here;
``Optimizer.load_state_dict`` and ``fastopt.load`` write a plan, so a bad
entry anywhere (the last tensor of the last group included) leaves the
optimizer as it was.

Besides structure, shapes and dtypes, the values of the state arrays are
checked: every entry must be finite, and the arrays a rule lists in
``Rule.nonnegative_state`` (running sums, averages or maxima of squares or
magnitudes, such as Adam's ``exp_avg_sq``) must hold no negative entry.  A
NaN there would not raise at the next step: it would silently turn every
later update of that tensor into NaN, and a negative second moment makes
``sqrt(v)`` NaN the same way.
"""

from __future__ import annotations

import copy
import numbers
from dataclasses import dataclass

import numpy as np

from . import precision as _prec
from . import quantization as _q
from ._backend import array_kind
from .precision import Q8, as_dtype, round_to, to_float32
from ._rules import PRECISION_DEFAULTS, check_hyperparameters
from ._validate import normalize_options

#: The map names a state dict and a checkpoint record for each 8-bit state.
MAP_NAMES = {True: "dynamic_signed", False: "dynamic_unsigned"}


@dataclass
class LoadPlan:
    """What loading writes, every piece checked.

    ``options[g]``: the full options of group ``g`` (the optimizer's defaults
    overridden by the loaded ones).  ``state[g][i]``: ``{name: host array}``
    for the ``i``-th param of group ``g``, one entry per state array the loaded
    options need.  ``params``: host arrays for every param in flat order, or
    None (only a checkpoint carries params).
    """

    step_count: int
    options: list
    state: list
    group_state: list
    params: list | None = None


def to_host(a):
    """A NumPy view or copy of ``a`` (a CuPy array is copied to the host)."""
    if array_kind(a) == "cupy":
        return a.get()
    return np.asarray(a)


def check_like(a, p, where: str, label: str) -> None:
    """ValueError unless the host array ``a`` has the dtype and shape of the param ``p``."""
    if a.shape != p.shape or a.dtype != p.dtype:
        raise ValueError(f"{where}: expected {p.dtype} {p.shape} (like {label}), "
                         f"got {a.dtype} {a.shape}")


def check_state_like(a, p, dtype, where: str, label: str) -> None:
    """ValueError unless the host array ``a`` has the shape of the param ``p`` and ``dtype``
    (the state dtype the optimizer resolved for it: a float32 state never loads into a
    bfloat16 optimizer silently, nor the other way round)."""
    if a.shape != p.shape or a.dtype != dtype:
        why = (f"like {label}" if dtype == p.dtype
               else f"the state dtype of {label}, a {p.dtype} param")
        raise ValueError(f"{where}: expected {dtype} {p.shape} ({why}), got {a.dtype} {a.shape}")


def check_values(a: np.ndarray, where: str, nonnegative: bool) -> None:
    """ValueError naming ``where`` and its first bad entry: not finite, or < 0 if ``nonnegative``."""
    if a.dtype.itemsize == 2:  # float16 / bfloat16: checked on their exact float32 values
        a = to_float32(a)
    bad = ~np.isfinite(a)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{where}: expected finite values, got {float(a.flat[i])} at flat index {i} "
                         f"({int(bad.sum())} of {a.size} entries not finite)")
    if nonnegative:
        neg = a < 0
        if neg.any():
            i = int(np.flatnonzero(neg)[0])
            raise ValueError(f"{where}: expected values >= 0 (a sum, average or maximum of squares or "
                             f"magnitudes), got {float(a.flat[i])} at flat index {i}")


def _check_top(sd, rule) -> int:
    if not isinstance(sd, dict):
        raise TypeError(f"state_dict: expected a dict, got {type(sd).__name__}")
    for key in ("rule", "step_count", "param_groups", "state"):
        if key not in sd:
            raise ValueError(f"state_dict: missing key {key!r}")
    if sd["rule"] != rule.name:
        raise ValueError(f"state_dict: expected a {rule.name!r} state, got {sd['rule']!r}")
    sc = sd["step_count"]
    if isinstance(sc, bool) or not isinstance(sc, numbers.Integral) or sc < 0:
        raise ValueError(f"state_dict['step_count']: expected an integer >= 0, got {sc!r}")
    groups = sd["param_groups"]
    if not isinstance(groups, (list, tuple)) or not all(
            isinstance(g, dict) and isinstance(g.get("params"), (list, tuple)) for g in groups):
        raise TypeError("state_dict['param_groups']: expected a list of dicts with a 'params' "
                        f"list each, got {type(groups).__name__} {groups!r:.200}")
    if not isinstance(sd["state"], dict):
        raise TypeError(f"state_dict['state']: expected a dict, got {type(sd['state']).__name__}")
    return int(sc)


def _check_group_state(sd, rule, n_groups) -> list:
    gs = sd.get("group_state") or [dict(rule.group_state) for _ in range(n_groups)]
    if (not isinstance(gs, (list, tuple)) or len(gs) != n_groups
            or any(not isinstance(g, dict) or set(g) != set(rule.group_state) for g in gs)):
        raise ValueError(f"state_dict['group_state']: expected {n_groups} dicts with keys "
                         f"{sorted(rule.group_state)}, got {gs!r:.200}")
    out = []
    for gi, g in enumerate(gs):
        for k, v in g.items():
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not np.isfinite(v):
                raise ValueError(f"state_dict['group_state'][{gi}][{k!r}]: expected a finite "
                                 f"number, got {v!r}")
        out.append({k: float(v) for k, v in g.items()})
    return out


def precision_record(options: dict) -> dict:
    """The precision options as plain JSON values (a dtype as its name), for a state dict."""
    out = {}
    for k in PRECISION_DEFAULTS:
        v = options.get(k, PRECISION_DEFAULTS[k])
        if k == "state_dtype" and v is not None and v not in ("q8", "param"):
            v = as_dtype(v, "state_dtype").name  # "half", np.float32, ... by their dtype's name
        elif isinstance(v, (np.integer, np.bool_)):
            v = v.item()
        out[k] = v
    return out


def q8_record(optimizer) -> dict | None:
    """``{"blocksize": 256, "maps": {state name: map name}}`` when any state is 8-bit, else None."""
    maps = {}
    for g, per_group in zip(optimizer.param_groups, optimizer.state):
        for p, st in zip(g["params"], per_group):
            for name in st:
                if optimizer.is_q8(p, name) and not name.endswith("_absmax"):
                    maps[name] = MAP_NAMES[name not in optimizer.rule.nonnegative_state]
    if not maps:
        return None
    return {"blocksize": _q.BLOCKSIZE, "maps": dict(sorted(maps.items()))}


def _check_precision(optimizer, sd, convert: bool) -> None:
    """ValueError unless the state dict's precision options are the optimizer's.

    ``state_dtype`` and ``min_8bit_size`` decide only the format of the state
    arrays, so ``convert=True`` accepts a difference (each array is converted);
    ``master_weights``, ``stochastic_rounding`` and ``seed`` decide the run itself.
    A state dict without the entry (an older one) is checked by its arrays only.
    """
    theirs = sd.get("precision")
    if theirs is None:
        return
    if not isinstance(theirs, dict):
        raise TypeError(f"state_dict['precision']: expected a dict, got {type(theirs).__name__}")
    mine = precision_record(optimizer.precision_options)
    for k, v in mine.items():
        got = theirs.get(k, PRECISION_DEFAULTS[k])
        if k == "state_dtype" and got is not None and not isinstance(got, str):
            try:
                got = as_dtype(got, "state_dtype").name
            except (TypeError, ValueError):
                pass
        if got == v or (convert and k in ("state_dtype", "min_8bit_size")):
            continue
        if k == "state_dtype" and _same_state_format(optimizer, got, v):
            continue  # e.g. None and "float32" for float32 params: the same arrays
        if k == "min_8bit_size" and mine["state_dtype"] != "q8":
            continue  # decides nothing without 8-bit state
        hint = ("; pass convert=True to convert the state to this optimizer's format"
                if k in ("state_dtype", "min_8bit_size") else
                " (a resumed run must use the options it was saved with)")
        raise ValueError(f"state_dict['precision'][{k!r}]: expected {v!r} (this optimizer's "
                         f"{k}), got {got!r}{hint}")


def _same_state_format(optimizer, a, b) -> bool:
    """Whether state_dtype options ``a`` and ``b`` give every param of the optimizer the same
    state dtype (None and "param" and "float32" can all mean float32)."""
    try:
        return all(_prec.resolve_state_dtype(dt, a) == _prec.resolve_state_dtype(dt, b)
                   for dt in {p.dtype for g in optimizer.param_groups for p in g["params"]})
    except (TypeError, ValueError):
        return False


def _check_q8_meta(sd) -> dict:
    meta = sd.get("q8")
    if meta is None:
        raise ValueError("state_dict['q8']: missing (the block size and map names of its 8-bit "
                         "states)")
    if (not isinstance(meta, dict) or meta.get("blocksize") != _q.BLOCKSIZE
            or not isinstance(meta.get("maps"), dict)):
        raise ValueError(f"state_dict['q8']: expected {{'blocksize': {_q.BLOCKSIZE}, 'maps': "
                         f"{{state name: map name}}}}, got {meta!r:.200}")
    return meta


def _load_array(optimizer, sd, st, nm, p, where, label, nonneg, convert):
    """The state array(s) of ``nm`` of param ``p`` in the optimizer's format: ``{name: host array}``.

    Detects the format of the state dict's entry (8-bit: uint8 codes plus
    ``<nm>_absmax``), checks it whole, and converts it when ``convert`` allows.
    """
    theirs_q8 = st.get(nm + "_absmax") is not None
    mine_q8 = optimizer.is_q8(p, nm)
    signed = nm not in nonneg
    if theirs_q8:
        meta = _check_q8_meta(sd)
        want_map = MAP_NAMES[signed]
        if meta["maps"].get(nm) != want_map:
            raise ValueError(f"state_dict['q8']['maps'][{nm!r}]: expected {want_map!r}, got "
                             f"{meta['maps'].get(nm)!r}")
        codes, absmax = to_host(st[nm]), to_host(st[nm + "_absmax"])
        if codes.dtype != np.uint8 or codes.shape != p.shape:
            raise ValueError(f"{where}: expected uint8 codes of shape {p.shape} (8-bit state of "
                             f"{label}), got {codes.dtype} {codes.shape}")
        nb = -(-p.size // _q.BLOCKSIZE)
        wa = where[:-2] + "_absmax']"
        if absmax.dtype != np.float32 or absmax.shape != (nb,):
            raise ValueError(f"{wa}: expected float32 ({nb},) (one per {_q.BLOCKSIZE}-element "
                             f"block of {label}), got {absmax.dtype} {absmax.shape}")
        check_values(absmax, wa, True)
        if mine_q8:
            return {nm: codes.copy(), nm + "_absmax": absmax.copy()}
        if not convert:
            raise ValueError(f"{where}: expected a {optimizer.state_dtype(p, nm)} array (this "
                             f"optimizer keeps {label}'s state unquantized), got an 8-bit state "
                             f"(codes + absmax); pass convert=True to decode it")
        values = _q.dequantize_blockwise(codes, absmax, signed=signed)
        return {nm: round_to(values, optimizer.state_dtype(p, nm))}
    a = to_host(st[nm])
    if not mine_q8:
        want = optimizer.state_dtype(p, nm)
        if convert and nm != "master" and a.shape == p.shape and a.dtype != want \
                and a.dtype.kind in "fV" and a.dtype.itemsize in (2, 4) and want.itemsize in (2, 4):
            check_values(a, where, nm in nonneg)
            return {nm: round_to(to_float32(a) if a.dtype.itemsize == 2 else a, want)}
        check_state_like(a, p, want, where, label)
        check_values(a, where, nm in nonneg)
        return {nm: a}
    if not convert:
        raise ValueError(f"{where}: expected an 8-bit state (uint8 codes and {nm + '_absmax'!r}; "
                         f"{label} has state_dtype='q8'), got a {a.dtype} array; pass "
                         f"convert=True to quantize it")
    if a.shape != p.shape or not (a.dtype.kind == "f" or a.dtype.name == "bfloat16"):
        raise ValueError(f"{where}: expected a float array of shape {p.shape} to quantize, got "
                         f"{a.dtype} {a.shape}")
    check_values(a, where, nm in nonneg)
    codes, absmax = _q.quantize_blockwise(a, signed=signed)
    return {nm: codes, nm + "_absmax": absmax}


def _load_shaped(optimizer, a, nm, p, shape, where, label, nonneg):
    """A state array that is not shaped like its param (``Rule.state_shape``: Adafactor's
    factors), checked for the rule's shape, the param's state dtype and its values."""
    a = to_host(a)
    want = optimizer.state_dtype(p, nm)
    if not isinstance(a, np.ndarray) or a.shape != shape or a.dtype != want:
        raise ValueError(f"{where}: expected {want} {shape} (the {nm} of {label}, a {p.dtype} "
                         f"{tuple(p.shape)} param), got {getattr(a, 'dtype', type(a).__name__)} "
                         f"{getattr(a, 'shape', '')}")
    check_values(a, where, nonneg)
    return a


def plan_load(optimizer, state_dict, params: list | None = None, *,
              convert: bool = False) -> LoadPlan:
    """Check ``state_dict`` against ``optimizer`` whole; returns the :class:`LoadPlan` to write.

    ``params`` (host arrays in flat order, a checkpoint's) are checked for the
    dtype and shape of the optimizer's params and carried in the plan.
    Raises TypeError or ValueError naming the first bad entry.  ``convert``:
    see ``Optimizer.load_state_dict``.
    """
    rule, defaults = optimizer.rule, optimizer.defaults
    mine = optimizer.param_groups
    sd = state_dict
    step_count = _check_top(sd, rule)
    _check_precision(optimizer, sd, convert)
    groups = sd["param_groups"]
    if len(groups) != len(mine):
        raise ValueError(f"state_dict['param_groups']: expected {len(mine)} groups, got {len(groups)}")
    options, state, idx = [], [], 0
    nonneg = set(rule.nonnegative_state)
    for gi, (g, theirs) in enumerate(zip(mine, groups)):
        n = len(g["params"])
        if len(theirs["params"]) != n:
            raise ValueError(f"state_dict['param_groups'][{gi}]: expected {n} params, "
                             f"got {len(theirs['params'])}")
        hp = normalize_options({**defaults, **{k: v for k, v in theirs.items() if k != "params"}})
        unknown = set(hp) - set(defaults)
        if unknown:
            raise ValueError(f"state_dict['param_groups'][{gi}]: unknown option(s) {sorted(unknown)}")
        check_hyperparameters(rule, hp, f"state_dict['param_groups'][{gi}]: ")
        # the rule's state plus ``master`` with master_weights (the optimizer decides)
        names = [nm for nm, _ in optimizer._state_names_of(hp)]
        gstate = []
        for pi, p in enumerate(g["params"]):
            key = theirs["params"][pi]
            st = sd["state"].get(key, sd["state"].get(str(key)))
            if st is None:
                raise ValueError(f"state_dict['state'][{key}]: missing (state of params[{idx + pi}])")
            if not isinstance(st, dict):
                raise TypeError(f"state_dict['state'][{key}]: expected a dict of arrays, "
                                f"got {type(st).__name__}")
            arrays = {}
            for nm in names:
                where = f"state_dict['state'][{key}][{nm!r}]"
                shape = tuple(p.shape) if nm == "master" else rule.state_shape_of(nm, p.shape)
                if shape is None:
                    continue  # this param keeps no such array (Adafactor: row_var of a vector)
                if st.get(nm) is None:
                    raise ValueError(f"{where}: missing")
                if rule.state_shape is not None and nm != "master":
                    arrays[nm] = _load_shaped(optimizer, st[nm], nm, p, shape, where,
                                              f"params[{idx + pi}]", nm in nonneg)
                    continue
                arrays.update(_load_array(optimizer, sd, st, nm, p, where, f"params[{idx + pi}]",
                                          nonneg, convert))
            gstate.append(arrays)
        options.append({k: copy.deepcopy(v) for k, v in hp.items()})
        state.append(gstate)
        idx += n
    group_state = _check_group_state(sd, rule, len(groups))
    if params is not None:
        flat = [p for g in mine for p in g["params"]]
        if len(params) != len(flat):
            raise ValueError(f"params: expected {len(flat)} arrays (one per param), got {len(params)}")
        params = [to_host(a) for a in params]
        for i, (a, p) in enumerate(zip(params, flat)):
            check_like(a, p, f"params[{i}]", f"params[{i}]")
    return LoadPlan(step_count=step_count, options=options, state=state, group_state=group_state,
                    params=params)
