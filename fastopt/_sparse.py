"""SparseAdam with torch.optim.SparseAdam's semantics: lazy Adam over the rows a grad names.

A grad is a pair ``(indices, values)``: ``indices`` a 1-D integer array of row numbers of
the param (an embedding table, ``(num_rows, *row_shape)``), ``values`` the rows' grads,
``(nnz, *row_shape)``.  Duplicate indices are summed first (torch's ``coalesce``), in the
order they appear; then only the named rows' moments and params change, with the bias
corrections of the param's own step count (torch keeps ``step`` per param, and a param
whose grad is None is not stepped).  The fused kernels are ``sparse_adam_rows`` in
``kernels/reference.py`` (the definition), ``kernels/numba_cpu.py`` and
``kernels/cuda/sparse.cu``; see docs/design.md, "LBFGS and SparseAdam".

16-bit params (float16/bfloat16), 16-bit state, master weights and stochastic rounding
(NumPy arrays, the class only) widen only the touched rows, as ``fastopt._widen`` does for
whole tensors: the rows the coalesced grad names are gathered into a compact float32
table (the param's rows, or its float32 master's, and the moments' rows), the backend's
float32 row kernel steps that table with the indices renumbered 0..k-1, and each row is
written back once: the moments rounded to nearest-even to their dtype, the master as is,
the param to nearest-even or stochastically with the counter hash of (seed, the param's
step, the element's flat index in the FULL param) -- the same bits as stepping a widened
copy of the whole table and rounding it, untouched rows keeping theirs.  8-bit state is
refused: a block of 256 codes spans rows, so writing a touched row would re-quantize the
untouched rows of its blocks (a new absmax moves their codes).
"""

from __future__ import annotations

import numbers

import numpy as np

from . import _backend
from . import precision as _prec
from ._rules import (NONFINITE_MODES, OWN_DRIVER_RULES, PIPELINE_DEFAULTS, as_host_scalars,
                     check_hyperparameters)
from ._state import precision_record
from ._validate import array_kind, as_list, check_params

RULE = OWN_DRIVER_RULES["sparse_adam"]
DENSE_MESSAGE = "SparseAdam does not support dense gradients, please consider Adam instead"

_REFUSED = {
    **{k: "torch.optim.SparseAdam has no grad pipeline besides maximize"
       for k in PIPELINE_DEFAULTS if k != "maximize"},
    "min_8bit_size": "it sizes state_dtype='q8', which SparseAdam refuses",
}

#: why ``state_dtype="q8"`` is refused (see the module docstring)
Q8_REFUSED = ("a row update would re-quantize whole 256-element blocks of untouched rows; "
              "use None, 'param' or 'bfloat16'")


def coalesce(indices, xp=np):
    """``(order, starts, rows)`` of a 1-D int64 index array: ``order`` a stable argsort,
    ``starts`` the boundaries of its runs of equal indices (``len(rows) + 1`` entries) and
    ``rows`` the distinct indices, ascending."""
    n = int(indices.shape[0])
    # stable, so a row's duplicates stay in their order of appearance: NumPy needs
    # kind="stable"; CuPy's argsort is always stable (it accepts no other kind)
    order = xp.argsort(indices, kind="stable") if xp is np else xp.argsort(indices)
    order = order.astype(np.int64, copy=False)
    srt = indices[order]
    change = xp.flatnonzero(srt[1:] != srt[:-1]) + 1
    starts = xp.concatenate([xp.zeros(1, np.int64), change.astype(np.int64),
                             xp.full(1, n, np.int64)]) if n else xp.zeros(1, np.int64)
    rows = srt[starts[:-1]]
    return order, starts, rows


def kernel_of(backend: str):
    """The ``sparse_adam_rows`` of a concrete backend (its module is loaded first)."""
    _backend.get_ops(backend)
    if backend == "numpy":
        from .kernels import reference
        return reference.sparse_adam_rows
    if backend == "numba":
        from .kernels import numba_cpu
        return numba_cpu.sparse_adam_rows
    from .kernels import cupy_gpu
    return cupy_gpu.KERNELS.sparse_adam_rows


def check_sparse_grad(grad, p, label: str, kind: str):
    """``(indices as int64, values)`` of a checked ``(indices, values)`` grad of param ``p``."""
    if array_kind(grad) is not None or not isinstance(grad, (tuple, list)) or len(grad) != 2:
        what = "a dense array" if array_kind(grad) is not None else type(grad).__name__
        raise TypeError(f"{label}: {DENSE_MESSAGE}: expected a pair (indices, values) of a 1-D "
                        f"integer array of row numbers and their rows, got {what}")
    idx, vals = grad
    for name, a in (("indices", idx), ("values", vals)):
        k = array_kind(a)
        if k != kind:
            raise TypeError(f"{label}: {name}: expected a {kind} array like the param, got "
                            f"{k + ' array' if k else type(a).__name__}")
    if idx.ndim != 1 or idx.dtype.kind not in "iu":
        raise TypeError(f"{label}: indices: expected a 1-D integer array, got {idx.ndim}-D "
                        f"{idx.dtype}")
    want = (idx.shape[0],) + tuple(p.shape[1:])
    if vals.shape != want or vals.dtype != p.dtype:
        raise ValueError(f"{label}: values: expected shape {want} (nnz, *row_shape) and dtype "
                         f"{p.dtype}, got {tuple(vals.shape)} {vals.dtype}")
    if idx.shape[0] and (int(idx.min()) < 0 or int(idx.max()) >= p.shape[0]):
        raise ValueError(f"{label}: indices: expected row numbers in [0, {p.shape[0]}), got "
                         f"[{int(idx.min())}, {int(idx.max())}]")
    return idx.astype(np.int64, copy=False), vals


def _rows2d(a):
    return a.reshape(a.shape[0], -1)


def _check_steps_etc(hp, where):
    check_hyperparameters(RULE, {**PIPELINE_DEFAULTS, **hp}, where)
    if callable(hp["lr"]):
        raise TypeError(f"{where}lr: expected a number (SparseAdam takes no schedule), "
                        "got a callable")


def widened_rows(kernel, p, st, vals, order, starts, rows, s, maximize, prec) -> None:
    """One SparseAdam step of a reduced-precision param (``prec``), widening only its touched
    rows (see the module docstring): gather, the float32 row ``kernel`` on the compact
    table, one rounding per element written back."""
    p2, m2, v2 = _rows2d(p), _rows2d(st["exp_avg"]), _rows2d(st["exp_avg_sq"])
    master = st.get("master")
    # fancy indexing copies: every table below is a fresh C-contiguous array
    work = _rows2d(master)[rows] if master is not None else _prec.to_float32(p2[rows])
    m = _prec.to_float32(m2[rows])
    v = _prec.to_float32(v2[rows])
    g = _prec.to_float32(vals.reshape(vals.shape[0], -1))
    local = np.arange(rows.shape[0], dtype=np.int64)  # row r of the table is param row rows[r]
    kernel(work, m, v, g, order, starts, local, s, maximize)
    m2[rows] = _prec.round_to(m, m2.dtype)
    v2[rows] = _prec.round_to(v, v2.dtype)
    if master is not None:
        _rows2d(master)[rows] = work
    if prec.stochastic_rounding:
        width = p2.shape[1]
        index = (rows.astype(np.uint64)[:, None] * np.uint64(width)
                 + np.arange(width, dtype=np.uint64)[None, :])
        p2[rows] = _prec.round_to(work, p2.dtype, stochastic_rounding=True, seed=prec.seed,
                                  step=st["step"], index=index)
    else:
        p2[rows] = _prec.round_to(work, p2.dtype)


def check_row_params(params, labels) -> None:
    """TypeError unless every param is a float16/bfloat16/float32/float64 array with a row axis."""
    for p, lab in zip(params, labels):
        if p.ndim < 1 or not (p.dtype in (np.float32, np.float64) or _prec.is_16bit(p.dtype)):
            raise TypeError(f"{lab}: expected a float16, bfloat16, float32 or float64 array "
                            f"with a row axis (SparseAdam updates rows of embedding tables), "
                            f"got {p.ndim}-D {p.dtype}")


def resolve_precisions(params, labels, kind, options) -> dict:
    """``{param dtype: resolved Precision, or None where the plain row kernel steps it}``.

    ``options``: ``state_dtype``, ``master_weights``, ``stochastic_rounding``, ``seed`` (the
    raw API's checks and messages, first param of each dtype named); ``state_dtype="q8"`` is
    refused (see the module docstring), and so are 16-bit params or state on CuPy arrays."""
    state_dtype = options["state_dtype"]
    if isinstance(state_dtype, str) and state_dtype == "q8":
        raise ValueError(f"state_dtype: expected None, 'param' or 'bfloat16' for SparseAdam, "
                         f"got 'q8' ({Q8_REFUSED})")
    out = {}
    for p, lab in zip(params, labels):
        if p.dtype not in out:
            pr = _prec.resolve_precision(p.dtype, kind=RULE.kind, label=lab, **options)
            out[p.dtype] = None if _backend.is_plain(pr) else pr
    if kind != "numpy" and any(out.values()):
        raise TypeError("backend 'cupy': SparseAdam takes float32/float64 params with state "
                        "in their dtype on the GPU; 16-bit params or state, master_weights "
                        "and stochastic_rounding run on NumPy arrays")
    return out


class SparseAdam:
    """Lazy Adam for embedding tables (torch.optim.SparseAdam semantics).

    ``step(grads)``: ``grads[i]`` is ``(indices, values)`` for param ``i`` (``indices``: 1-D
    integer row numbers, duplicates allowed and summed; ``values``: ``(nnz, *row_shape)`` in
    the param's dtype) or None (the param is not stepped).  Only the named rows of the param
    and of its ``exp_avg``/``exp_avg_sq`` are read and written.  A dense grad is a TypeError
    (torch: "SparseAdam does not support dense gradients").  Param groups as in torch;
    ``maximize`` is the only pipeline option (torch's); ``nonfinite`` checks the values.
    """

    rule = RULE

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, *, maximize=False,
                 nonfinite="raise", backend="auto", state_dtype=None, master_weights=False,
                 stochastic_rounding=False, seed=0, **options):
        for k in options:
            if k in _REFUSED:
                raise ValueError(f"{k}: SparseAdam does not take this option ({_REFUSED[k]})")
            raise TypeError(f"SparseAdam() got an unexpected keyword argument {k!r}")
        if nonfinite not in NONFINITE_MODES:
            raise ValueError(f"nonfinite: expected one of {NONFINITE_MODES}, got {nonfinite!r}")
        self.nonfinite = nonfinite
        self.defaults = dict(lr=lr, betas=betas, eps=eps, maximize=maximize)
        params = list(params)
        if params and isinstance(params[0], dict):
            groups = []
            for gi, g in enumerate(params):
                if not isinstance(g, dict) or "params" not in g:
                    raise ValueError(f"params[{gi}]: expected a dict with a 'params' list")
                extra = set(g) - set(self.defaults) - {"params"}
                if extra:
                    raise ValueError(f"params[{gi}]: {sorted(extra)} are not SparseAdam options "
                                     f"(expected {sorted(self.defaults)})")
                groups.append({**self.defaults, **g, "params": as_list(g["params"], "params")})
        else:
            groups = [{**self.defaults, "params": as_list(params, "params")}]
        flat, labels = [], []
        for gi, g in enumerate(groups):
            for pi, p in enumerate(g["params"]):
                flat.append(p)
                labels.append(f"param_groups[{gi}]['params'][{pi}]" if len(groups) > 1
                              else f"params[{pi}]")
        self._kind = check_params(flat, labels)
        check_row_params(flat, labels)
        self._prec_options = dict(state_dtype=state_dtype, master_weights=master_weights,
                                  stochastic_rounding=stochastic_rounding, seed=seed)
        self._precisions = resolve_precisions(flat, labels, self._kind, self._prec_options)
        for gi, g in enumerate(groups):
            _check_steps_etc({k: v for k, v in g.items() if k != "params"},
                             f"param_groups[{gi}]: " if len(groups) > 1 else "")
        self.backend = _backend.resolve(backend, self._kind)
        self._kernel = kernel_of(self.backend)
        self._xp = np if self._kind == "numpy" else __import__("cupy")
        self.param_groups = groups
        self.state = [[{} for _ in g["params"]] for g in groups]
        self.step_count = 0

    @property
    def _params(self):
        return [p for g in self.param_groups for p in g["params"]]

    def step(self, grads):
        """One step; ``grads`` as the class docstring says.  Returns True, or False when
        ``nonfinite="skip"`` skipped it (nothing written)."""
        grads = list(grads) if isinstance(grads, (list, tuple)) else grads
        if not isinstance(grads, list):
            raise TypeError(f"grads: expected a list of (indices, values) pairs or None, got "
                            f"{type(grads).__name__}")
        params = self._params
        if len(grads) != len(params):
            raise ValueError(f"grads: expected {len(params)} entries (one per param), got "
                             f"{len(grads)}")
        work, finite, k = [], True, 0
        for gi, g in enumerate(self.param_groups):
            _check_steps_etc({k_: v for k_, v in g.items() if k_ != "params"}, "")
            for pi, p in enumerate(g["params"]):
                grad = grads[k]
                if grad is not None:
                    idx, vals = check_sparse_grad(grad, p, f"grads[{k}]", self._kind)
                    if self.nonfinite != "ignore" and vals.size and \
                            not bool(self._xp.isfinite(vals).all()):
                        finite = False
                    work.append((gi, pi, p, idx, vals))
                k += 1
        if not finite:
            if self.nonfinite == "raise":
                raise FloatingPointError("grads: non-finite values (nonfinite='raise'; "
                                         "nothing was written)")
            return False
        for gi, pi, p, idx, vals in work:
            hp = as_host_scalars({k_: v for k_, v in self.param_groups[gi].items()
                                  if k_ != "params"})
            st = self.state[gi][pi]
            pr = self._precisions[p.dtype]
            if not st:
                xp = self._xp
                sdt = p.dtype if pr is None else pr.state
                st.update(step=0, exp_avg=xp.zeros_like(p, dtype=sdt),
                          exp_avg_sq=xp.zeros_like(p, dtype=sdt))
                if pr is not None and pr.master_weights:
                    st["master"] = _prec.to_float32(p)
            st["step"] += 1
            if idx.shape[0] == 0:
                continue  # torch counts the step and skips the update
            s, _ = RULE.scalars(hp, st["step"], {})
            order, starts, rows = coalesce(idx, self._xp)
            if pr is not None:
                widened_rows(self._kernel, p, st, vals, order, starts, rows, s,
                             hp["maximize"], pr)
                continue
            self._kernel(_rows2d(p), _rows2d(st["exp_avg"]), _rows2d(st["exp_avg_sq"]),
                         vals.reshape(vals.shape[0], -1),
                         order, starts, rows, s, hp["maximize"])
        self.step_count += 1
        return True

    # ----------------------------------------------------------------- state

    def state_nbytes(self) -> int:
        return sum(int(st[n].nbytes) for g in self.state for st in g for n in RULE.all_state
                   if n in st)

    def state_dict(self) -> dict:
        """Host copies of every param's ``exp_avg``, ``exp_avg_sq`` and ``step`` (an int64 0-d
        array), numbered over all groups, in the layout of every fastopt ``state_dict``."""
        groups, state, i = [], {}, 0
        for gi, g in enumerate(self.param_groups):
            d = {k: v for k, v in g.items() if k != "params"}
            d["params"] = list(range(i, i + len(g["params"])))
            groups.append(d)
            for st in self.state[gi]:
                if st:
                    state[i] = {n: (st[n].get() if self._kind == "cupy" else np.array(st[n]))
                                for n in RULE.all_state + ("master",) if n in st}
                    state[i]["step"] = np.array(st["step"], np.int64)
                i += 1
        return {"rule": RULE.name, "step_count": self.step_count, "param_groups": groups,
                "state": state, "group_state": [{} for _ in groups],
                "precision": precision_record(self._prec_options)}

    def load_state_dict(self, state_dict: dict, params=None) -> None:
        """Load a ``state_dict`` (checked whole first; nothing changes on an error)."""
        sd = state_dict
        if not isinstance(sd, dict) or sd.get("rule") != RULE.name:
            raise ValueError("state_dict: expected a SparseAdam state_dict (rule 'sparse_adam')")
        groups = sd.get("param_groups")
        if not (isinstance(groups, list) and len(groups) == len(self.param_groups)):
            raise ValueError(f"state_dict['param_groups']: expected {len(self.param_groups)} "
                             "groups")
        options, i = [], 0
        for gi, (g, mine) in enumerate(zip(groups, self.param_groups)):
            n = len(mine["params"])
            if not isinstance(g, dict) or g.get("params") != list(range(i, i + n)):
                raise ValueError(f"state_dict['param_groups'][{gi}]['params']: expected "
                                 f"{list(range(i, i + n))}")
            hp = {k: v for k, v in g.items() if k != "params"}
            if set(hp) != set(self.defaults):
                raise ValueError(f"state_dict['param_groups'][{gi}]: expected the options "
                                 f"{sorted(self.defaults)}, got {sorted(hp)}")
            if isinstance(hp["betas"], list):
                hp["betas"] = tuple(hp["betas"])
            _check_steps_etc(hp, f"state_dict['param_groups'][{gi}]: ")
            options.append(hp)
            i += n
        theirs, mine = sd.get("precision"), precision_record(self._prec_options)
        if theirs is None:  # a state_dict of a fastopt before 16-bit SparseAdam: the defaults
            theirs = precision_record({})
        if theirs != mine:
            raise ValueError(f"state_dict['precision']: expected this optimizer's precision "
                             f"options {mine}, got {theirs}")
        params_all = self._params
        state = sd.get("state")
        if not isinstance(state, dict):
            raise ValueError("state_dict['state']: expected a dict")
        loaded = {}
        for key, st in state.items():
            j = int(key) if isinstance(key, (numbers.Integral, str)) and str(key).isdigit() else -1
            if not 0 <= j < len(params_all) or not isinstance(st, dict):
                raise ValueError(f"state_dict['state']: bad entry {key!r}")
            p = params_all[j]
            pr = self._precisions[p.dtype]
            has_master = pr is not None and pr.master_weights
            want = {"exp_avg", "exp_avg_sq", "step"} | ({"master"} if has_master else set())
            if set(st) != want:
                raise ValueError(f"state_dict['state'][{j}]: expected {sorted(want)}, got "
                                 f"{sorted(st)}")
            for name in RULE.all_state + (("master",) if has_master else ()):
                a = st[name]
                dt = (np.dtype(np.float32) if name == "master" else
                      p.dtype if pr is None else pr.state)
                if not isinstance(a, np.ndarray) or a.shape != p.shape or a.dtype != dt:
                    raise ValueError(f"state_dict['state'][{j}]['{name}']: expected a {dt} "
                                     f"NumPy array of shape {p.shape}")
                if not np.isfinite(a).all():
                    raise ValueError(f"state_dict['state'][{j}]['{name}']: expected finite values")
            if (st["exp_avg_sq"] < 0).any():
                raise ValueError(f"state_dict['state'][{j}]['exp_avg_sq']: expected values >= 0 "
                                 "(an average of squares)")
            step = np.asarray(st["step"])
            if step.shape != () or step.dtype.kind not in "iu" or int(step) < 1:
                raise ValueError(f"state_dict['state'][{j}]['step']: expected an int >= 1")
            loaded[j] = st
        step_count = sd.get("step_count")
        if not (isinstance(step_count, numbers.Integral) and step_count >= 0):
            raise ValueError("state_dict['step_count']: expected an int >= 0")
        # checked: write
        xp = self._xp
        i = 0
        for gi, g in enumerate(self.param_groups):
            g.update(options[gi])
            for pi in range(len(g["params"])):
                st = loaded.get(i)
                self.state[gi][pi] = {} if st is None else {
                    "step": int(st["step"]),
                    **{n: xp.array(a) for n, a in st.items() if n != "step"}}
                i += 1
        if params is not None:
            for p, a in zip(params_all, params):
                p[...] = xp.asarray(a)
        self.step_count = int(step_count)

    def _load_checkpoint(self, sd: dict, params) -> None:
        self.load_state_dict(sd, params)

    def __repr__(self):
        return (f"SparseAdam({len(self._params)} params, {len(self.param_groups)} group(s), "
                f"backend={self.backend!r}, {self.defaults})")


def sparse_adam(params, grads, exp_avgs, exp_avg_sqs, state_steps, masters=None, *,
                lr=1e-3, betas=(0.9, 0.999), eps=1e-8, maximize=False, backend="auto",
                state_dtype=None, master_weights=False, stochastic_rounding=False,
                seed=0) -> None:
    """SparseAdam (torch.optim.SparseAdam), functional: torch's ``F.sparse_adam`` signature,
    plus the precision options of :class:`SparseAdam` (``fastopt.functional.sparse_adam``
    documents the arguments).

    ``grads[i]`` is ``(indices, values)`` (see :class:`fastopt.SparseAdam`); ``state_steps[i]``
    the param's step count *after* this step (1 on its first), as torch's functional takes it
    (also the step stochastic rounding hashes).  Updates the named rows of ``params``,
    ``exp_avgs``, ``exp_avg_sqs`` (and ``masters``) in place; every input is checked before
    anything is written.
    """
    params = as_list(params, "params")
    labels = [f"params[{i}]" for i in range(len(params))]
    kind = check_params(params, labels)
    check_row_params(params, labels)
    hp = dict(lr=lr, betas=betas, eps=eps, maximize=maximize)
    _check_steps_etc(hp, "")
    precisions = resolve_precisions(params, labels, kind, dict(
        state_dtype=state_dtype, master_weights=master_weights,
        stochastic_rounding=stochastic_rounding, seed=seed))
    n = len(params)
    lists = {"grads": list(grads), "exp_avgs": as_list(exp_avgs, "exp_avgs"),
             "exp_avg_sqs": as_list(exp_avg_sqs, "exp_avg_sqs"), "state_steps": list(state_steps)}
    if master_weights:
        if masters is None:
            raise TypeError("masters: expected a list of float32 arrays (one per param: "
                            "master_weights=True), got None")
        lists["masters"] = as_list(masters, "masters")
    elif masters is not None:
        raise ValueError("masters: expected None without master_weights=True, got a list")
    for name, lst in lists.items():
        if len(lst) != n:
            raise ValueError(f"{name}: expected {n} entries (one per param), got {len(lst)}")
    work = []
    for i, p in enumerate(params):
        pr = precisions[p.dtype]
        sdt = p.dtype if pr is None else pr.state
        for name, dt in (("exp_avgs", sdt), ("exp_avg_sqs", sdt),
                         ("masters", np.dtype(np.float32))):
            if name not in lists:
                continue
            a = lists[name][i]
            if array_kind(a) != kind or a.shape != p.shape or a.dtype != dt \
                    or not a.flags.c_contiguous or (kind == "numpy" and not a.flags.writeable):
                raise ValueError(f"{name}[{i}]: expected a writeable C-contiguous {kind} array "
                                 f"of shape {p.shape} and dtype {dt} (params[{i}] is {p.dtype}), "
                                 f"got {getattr(a, 'dtype', type(a).__name__)} "
                                 f"{getattr(a, 'shape', '')}")
        t = lists["state_steps"][i]
        if not (isinstance(t, numbers.Integral) and not isinstance(t, bool) and t >= 1):
            raise ValueError(f"state_steps[{i}]: expected an int >= 1, got {t!r}")
        idx, vals = check_sparse_grad(lists["grads"][i], p, f"grads[{i}]", kind)
        st = {"exp_avg": lists["exp_avgs"][i], "exp_avg_sq": lists["exp_avg_sqs"][i],
              "step": int(t)}
        if "masters" in lists:
            st["master"] = lists["masters"][i]
        work.append((p, st, idx, vals, pr))
    kernel = kernel_of(_backend.resolve(backend, kind))
    xp = np if kind == "numpy" else __import__("cupy")
    hp = as_host_scalars(hp)
    for p, st, idx, vals, pr in work:
        if idx.shape[0] == 0:
            continue
        s, _ = RULE.scalars(hp, st["step"], {})
        order, starts, rows = coalesce(idx, xp)
        if pr is not None:
            widened_rows(kernel, p, st, vals, order, starts, rows, s, maximize, pr)
            continue
        kernel(_rows2d(p), _rows2d(st["exp_avg"]), _rows2d(st["exp_avg_sq"]),
               vals.reshape(vals.shape[0], -1), order, starts, rows, s, maximize)
