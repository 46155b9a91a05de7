"""L-BFGS with torch.optim.LBFGS's semantics, on NumPy or CuPy arrays.

The algorithm is torch's (torch 2.13, ``torch/optim/lbfgs.py``) step for step: the same
stopping tests in the same order, the same history ring (``history_size`` newest pairs
kept when ``y.s > 1e-10``), the same first step length ``min(1, 1/|g|_1) * lr`` and the
same strong-Wolfe line search with cubic interpolation.  The vectors (the flat grad, the
direction, the history) are arrays of the params' own module -- NumPy for NumPy params,
CuPy for CuPy params -- flattened over all params in order, as torch flattens them; the
scalars (dot products, curvatures, step lengths) are host scalars of the params' dtype,
as torch's 0-d tensors are.  See docs/design.md, "LBFGS and SparseAdam".
"""

from __future__ import annotations

import numbers

import numpy as np

from . import _backend
from ._rules import (LBFGS_STATE, OWN_DRIVER_RULES, PIPELINE_DEFAULTS, PRECISION_DEFAULTS,
                     check_hyperparameters)
from ._validate import as_list, check_params

#: the optimizer-wide options of the other classes that LBFGS refuses, and why
_REFUSED = {
    **{k: "torch.optim.LBFGS has no grad pipeline; transform the grads inside the closure"
       for k in PIPELINE_DEFAULTS},
    "nonfinite": "torch.optim.LBFGS has no non-finite check (its stopping tests see the "
                 "closure's values as they are); check inside the closure",
    **{k: "LBFGS keeps its history in the params' dtype (float32 or float64 params only)"
       for k in PRECISION_DEFAULTS},
}


def _cubic_interpolate(x1, f1, g1, x2, f2, g2, bounds=None):
    """The minimizer of the cubic through two points and slopes, clamped to ``bounds``."""
    if bounds is not None:
        lo, hi = bounds
    else:
        lo, hi = (x1, x2) if x1 <= x2 else (x2, x1)
    d1 = g1 + g2 - 3 * (f1 - f2) / (x1 - x2)
    d2_square = d1 ** 2 - g1 * g2
    if d2_square >= 0:
        d2 = np.sqrt(d2_square)
        if x1 <= x2:
            min_pos = x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2 * d2))
        else:
            min_pos = x1 - (x1 - x2) * ((g1 + d2 - d1) / (g1 - g2 + 2 * d2))
        return min(max(min_pos, lo), hi)
    return (lo + hi) / 2.0


def _strong_wolfe(obj, x, t, d, f, g, gtd, c1=1e-4, c2=0.9, tolerance_change=1e-9, max_ls=25):
    """torch's strong-Wolfe line search: ``(f_new, g_new, t, evaluations)``.

    ``obj(x, t, d)`` evaluates the closure at ``x + t*d`` and returns ``(loss, flat grad)``;
    the flat grads it returns are new arrays never written afterwards, so no copies are kept.
    """
    d_norm = _amax(d)
    f_new, g_new = obj(x, t, d)
    evals = 1
    gtd_new = _dot(g_new, d)
    t_prev, f_prev, g_prev, gtd_prev = 0, f, g, gtd
    done = False
    ls_iter = 0
    while ls_iter < max_ls:
        if f_new > (f + c1 * t * gtd) or (ls_iter > 1 and f_new >= f_prev):
            bracket, bracket_f = [t_prev, t], [f_prev, f_new]
            bracket_g, bracket_gtd = [g_prev, g_new], [gtd_prev, gtd_new]
            break
        if abs(gtd_new) <= -c2 * gtd:
            bracket, bracket_f, bracket_g = [t], [f_new], [g_new]
            done = True
            break
        if gtd_new >= 0:
            bracket, bracket_f = [t_prev, t], [f_prev, f_new]
            bracket_g, bracket_gtd = [g_prev, g_new], [gtd_prev, gtd_new]
            break
        min_step = t + 0.01 * (t - t_prev)
        max_step = t * 10
        tmp = t
        t = _cubic_interpolate(t_prev, f_prev, gtd_prev, t, f_new, gtd_new,
                               bounds=(min_step, max_step))
        t_prev, f_prev, g_prev, gtd_prev = tmp, f_new, g_new, gtd_new
        f_new, g_new = obj(x, t, d)
        evals += 1
        gtd_new = _dot(g_new, d)
        ls_iter += 1
    if ls_iter == max_ls:
        bracket, bracket_f, bracket_g = [0, t], [f, f_new], [g, g_new]

    # zoom: shrink the bracket until a point meets the strong Wolfe conditions
    insuf_progress = False
    low, high = (0, 1) if bracket_f[0] <= bracket_f[-1] else (1, 0)
    while not done and ls_iter < max_ls:
        if abs(bracket[1] - bracket[0]) * d_norm < tolerance_change:
            break
        t = _cubic_interpolate(bracket[0], bracket_f[0], bracket_gtd[0],
                               bracket[1], bracket_f[1], bracket_gtd[1])
        eps = 0.1 * (max(bracket) - min(bracket))
        if min(max(bracket) - t, t - min(bracket)) < eps:
            if insuf_progress or t >= max(bracket) or t <= min(bracket):
                t = max(bracket) - eps if abs(t - max(bracket)) < abs(t - min(bracket)) \
                    else min(bracket) + eps
                insuf_progress = False
            else:
                insuf_progress = True
        else:
            insuf_progress = False
        f_new, g_new = obj(x, t, d)
        evals += 1
        gtd_new = _dot(g_new, d)
        ls_iter += 1
        if f_new > (f + c1 * t * gtd) or f_new >= bracket_f[low]:
            bracket[high], bracket_f[high], bracket_g[high] = t, f_new, g_new
            bracket_gtd[high] = gtd_new
            low, high = (0, 1) if bracket_f[0] <= bracket_f[1] else (1, 0)
        else:
            if abs(gtd_new) <= -c2 * gtd:
                done = True
            elif gtd_new * (bracket[high] - bracket[low]) >= 0:
                bracket[high], bracket_f[high] = bracket[low], bracket_f[low]
                bracket_g[high], bracket_gtd[high] = bracket_g[low], bracket_gtd[low]
            bracket[low], bracket_f[low], bracket_g[low] = t, f_new, g_new
            bracket_gtd[low] = gtd_new
    return bracket_f[low], bracket_g[low], bracket[low], evals


def _host(x, dtype):
    """A device 0-d result as a host scalar of ``dtype`` (torch's 0-d tensor in the param dtype)."""
    return dtype.type(x.item() if hasattr(x, "item") else x)


def _dot(a, b):
    return _host(a.dot(b), a.dtype)


def _amax(a):
    return _host(abs(a).max(), a.dtype)


def _asum(a):
    return _host(abs(a).sum(), a.dtype)


class LBFGS:
    """L-BFGS (torch.optim.LBFGS semantics): ``step(closure)`` with ``closure() -> (loss, grads)``.

    ``closure`` re-evaluates the objective at the params' current values and returns the loss
    (a real number) and ``grads``, a list of arrays matching ``params`` in order, shape, dtype
    and array module.  A step calls it up to ``max_eval`` times (the line search evaluates at
    trial points and puts the params back).  One param group only, as torch's; float32 or
    float64 params (NumPy or CuPy).  There is no grad pipeline (clipping, non-finite checks,
    ``maximize``): torch's LBFGS has none, so those options are refused -- transform the
    grads inside the closure.  A closure that raises, or returns something malformed, leaves
    the params and the optimizer's state as they were before the step.

    ``history_size`` pairs of flat vectors are kept: ``(2*history_size + 3) * n`` elements of
    state for ``n`` param elements.  ``backend``: ``"auto"`` (``"numpy"`` for NumPy params,
    ``"cupy"`` for CuPy params), ``"numpy"`` (the two-loop recursion in NumPy calls),
    ``"numba"`` (each axpy of the recursion fused with the next dot product in one pass; see
    docs/design.md for what that measured), ``"cupy"`` (CuPy calls, cuBLAS dots).
    """

    rule = OWN_DRIVER_RULES["lbfgs"]

    def __init__(self, params, lr=1.0, max_iter=20, max_eval=None, tolerance_grad=1e-7,
                 tolerance_change=1e-9, history_size=100, line_search_fn=None, *,
                 backend="auto", **options):
        for k in options:
            if k in _REFUSED:
                raise ValueError(f"{k}: LBFGS does not take this option ({_REFUSED[k]})")
            raise TypeError(f"LBFGS() got an unexpected keyword argument {k!r}")
        hp = dict(lr=lr, max_iter=max_iter, max_eval=max_eval, tolerance_grad=tolerance_grad,
                  tolerance_change=tolerance_change, history_size=history_size,
                  line_search_fn=line_search_fn)
        params = list(params) if not isinstance(params, dict) else [params]
        if params and isinstance(params[0], dict):
            if len(params) != 1:
                raise ValueError("params: LBFGS doesn't support per-parameter options "
                                 f"(parameter groups): expected one group, got {len(params)}")
            group = dict(params[0])
            if "params" not in group:
                raise ValueError("params[0]: expected a dict with a 'params' list")
            for k in group:
                if k != "params" and k not in hp:
                    raise ValueError(f"params[0][{k!r}]: not an LBFGS option "
                                     f"(expected one of {sorted(hp)})")
            hp.update({k: v for k, v in group.items() if k != "params"})
            params = as_list(group["params"], "params")
        else:
            params = as_list(params, "params")
        labels = [f"params[{i}]" for i in range(len(params))]
        self._kind = check_params(params, labels)
        for p, lab in zip(params, labels):
            if p.dtype not in (np.float32, np.float64) or p.dtype != params[0].dtype:
                raise TypeError(f"{lab}: expected float32 or float64 params of one dtype "
                                f"(LBFGS keeps flat history vectors in the params' dtype), "
                                f"got {p.dtype} (params[0] is {params[0].dtype})")
        if hp["max_eval"] is None:
            mi = hp["max_iter"]
            hp["max_eval"] = mi * 5 // 4 if isinstance(mi, numbers.Integral) else mi
        check_hyperparameters(self.rule, {**hp, **PIPELINE_DEFAULTS}, "")
        if callable(hp["lr"]):
            raise TypeError("lr: expected a number (LBFGS takes no schedule), got a callable")
        if backend not in ("auto",) + _backend.BACKEND_NAMES:
            raise ValueError(f"backend: expected one of {('auto',) + _backend.BACKEND_NAMES}, "
                             f"got {backend!r}")
        if self._kind == "cupy":
            if backend not in ("auto", "cupy"):
                raise ValueError(f"backend: expected 'auto' or 'cupy' for cupy params, got "
                                 f"{backend!r}")
            self.backend = "cupy"
        else:
            if backend not in ("auto", "numpy", "numba"):
                raise ValueError(f"backend: expected 'auto', 'numpy' or 'numba' for numpy "
                                 f"params, got {backend!r}")
            # "auto" is the NumPy two-loop: the fused Numba passes did not measurably pay on
            # the 2-core machine (docs/design.md, "LBFGS and SparseAdam")
            self.backend = "numpy" if backend == "auto" else _backend.resolve(backend, "numpy")
        self._axpy_dot = None
        if self.backend == "numba":
            from .kernels import numba_cpu
            self._axpy_dot = numba_cpu.axpy_dot
        want = self.backend
        if want == "cupy":
            import cupy as xp
        else:
            xp = np
        self._xp = xp
        self.defaults = dict(hp)
        self.param_groups = [{"params": params, **hp}]
        self._dtype = np.dtype(params[0].dtype)
        self._numel = sum(int(p.size) for p in params)
        self.step_count = 0
        self._st = {"func_evals": 0, "n_iter": 0}

    # ----------------------------------------------------------------- params as one vector

    @property
    def _params(self):
        return self.param_groups[0]["params"]

    def _add(self, t, d):
        """params += t * d, over the params' flat slices (torch's ``_add_grad``)."""
        off = 0
        for p in self._params:
            n = p.size
            p += t * d[off:off + n].reshape(p.shape)
            off += n

    def _set(self, xs):
        for p, x in zip(self._params, xs):
            p[...] = x

    def _evaluate(self, closure):
        out = closure()
        if not (isinstance(out, tuple) and len(out) == 2):
            raise TypeError(f"closure: expected it to return a pair (loss, grads), got "
                            f"{type(out).__name__}")
        loss, grads = out
        try:
            loss = float(loss)
        except (TypeError, ValueError):
            raise TypeError(f"closure: expected a real number as the loss, got "
                            f"{type(loss).__name__}") from None
        grads = as_list(grads, "grads", writeable=False)
        params = self._params
        if len(grads) != len(params):
            raise ValueError(f"closure: expected {len(params)} grads (one per param), "
                             f"got {len(grads)}")
        for i, (g, p) in enumerate(zip(grads, params)):
            if type(g) is not type(p) or g.shape != p.shape or g.dtype != p.dtype:
                raise ValueError(f"closure: grads[{i}]: expected a {type(p).__module__} array "
                                 f"of shape {p.shape} and dtype {p.dtype} like params[{i}], got "
                                 f"{type(g).__module__} {getattr(g, 'shape', None)} "
                                 f"{getattr(g, 'dtype', None)}")
        return loss, self._xp.concatenate([g.reshape(-1) for g in grads])

    # ----------------------------------------------------------------- the step

    def _two_loop(self, flat_grad, old_dirs, old_stps, ro, h_diag):
        """The two-loop recursion: ``d = H (-g)`` from the history pairs (torch's order)."""
        num_old = len(old_dirs)
        al = [None] * num_old
        q = -flat_grad
        if self._axpy_dot is not None and num_old:
            return self._two_loop_fused(q, old_dirs, old_stps, ro, h_diag)
        for i in range(num_old - 1, -1, -1):
            al[i] = _dot(old_stps[i], q) * ro[i]
            q -= al[i] * old_dirs[i]
        d = q * h_diag
        for i in range(num_old):
            be_i = _dot(old_dirs[i], d) * ro[i]
            d += (al[i] - be_i) * old_stps[i]
        return d

    def _two_loop_fused(self, q, y, s, ro, h_diag):
        """The same recursion with each axpy fused with the next dot product of its vector
        (``kernels/numba_cpu.py``, ``axpy_dot``: one pass instead of three)."""
        k, dt, fused = len(y), self._dtype.type, self._axpy_dot
        al = [None] * k
        al[k - 1] = _dot(s[k - 1], q) * ro[k - 1]
        for i in range(k - 1, 0, -1):  # q -= al[i]*y[i], then al[i-1] = ro[i-1] * s[i-1].q
            al[i - 1] = dt(fused(q, -al[i], y[i], s[i - 1])) * ro[i - 1]
        q -= al[0] * y[0]
        d = q * h_diag
        be = _dot(y[0], d) * ro[0]
        for i in range(k - 1):  # d += (al[i] - be_i)*s[i], then be_{i+1} = ro[i+1] * y[i+1].d
            be = dt(fused(d, al[i] - be, s[i], y[i + 1])) * ro[i + 1]
        d += (al[k - 1] - be) * s[k - 1]
        return d

    def step(self, closure):
        """One LBFGS step (up to ``max_iter`` iterations); returns the closure's first loss."""
        if not callable(closure):
            raise TypeError("closure: expected a callable returning (loss, grads) (LBFGS "
                            f"re-evaluates the objective), got {type(closure).__name__}")
        saved = [p.copy() for p in self._params]
        st = dict(self._st)
        for k in ("old_dirs", "old_stps", "ro"):
            if k in st:
                st[k] = list(st[k])
        try:
            loss = self._run(closure, st)
        except BaseException:
            self._set(saved)
            raise
        self._st = st
        self.step_count += 1
        return loss

    def _run(self, closure, st):
        g = self.param_groups[0]
        lr, max_iter, max_eval = float(g["lr"]), g["max_iter"], g["max_eval"]
        tol_grad, tol_change = g["tolerance_grad"], g["tolerance_change"]
        history_size = g["history_size"]
        dtype = self._dtype

        orig_loss, flat_grad = self._evaluate(closure)
        loss = orig_loss
        current_evals = 1
        st["func_evals"] += 1
        if _amax(flat_grad) <= tol_grad:
            return orig_loss
        d, t = st.get("d"), st.get("t")
        old_dirs, old_stps, ro = st.get("old_dirs"), st.get("old_stps"), st.get("ro")
        h_diag = st.get("H_diag")
        prev_flat_grad, prev_loss = st.get("prev_flat_grad"), st.get("prev_loss")

        n_iter = 0
        while n_iter < max_iter:
            n_iter += 1
            st["n_iter"] += 1
            if st["n_iter"] == 1:
                d = -flat_grad
                old_dirs, old_stps, ro = [], [], []
                h_diag = 1
            else:
                y = flat_grad - prev_flat_grad
                s = d * t
                ys = _dot(y, s)
                if ys > 1e-10:
                    if len(old_dirs) == history_size:  # the ring: drop the oldest pair
                        old_dirs.pop(0)
                        old_stps.pop(0)
                        ro.pop(0)
                    old_dirs.append(y)
                    old_stps.append(s)
                    ro.append(dtype.type(1.0) / ys)
                    h_diag = ys / _dot(y, y)
                d = self._two_loop(flat_grad, old_dirs, old_stps, ro, h_diag)
            prev_flat_grad = flat_grad
            prev_loss = loss
            if st["n_iter"] == 1:
                t = min(1.0, 1.0 / _asum(flat_grad)) * lr
            else:
                t = lr
            gtd = _dot(flat_grad, d)
            if gtd > -tol_change:  # not a descent direction
                break

            ls_evals = 0
            if g["line_search_fn"] == "strong_wolfe":
                x_init = [p.copy() for p in self._params]

                def obj(x, t_, d_):
                    self._add(t_, d_)
                    try:
                        return self._evaluate(closure)
                    finally:
                        self._set(x)

                loss, flat_grad, t, ls_evals = _strong_wolfe(obj, x_init, t, d, loss, flat_grad,
                                                             gtd, max_ls=max_eval - current_evals)
                self._add(t, d)
                opt_cond = _amax(flat_grad) <= tol_grad
            else:
                self._add(t, d)
                opt_cond = False
                if n_iter != max_iter:
                    loss, flat_grad = self._evaluate(closure)
                    opt_cond = _amax(flat_grad) <= tol_grad
                    ls_evals = 1
            current_evals += ls_evals
            st["func_evals"] += ls_evals
            if n_iter == max_iter or current_evals >= max_eval or opt_cond:
                break
            if _amax(d * t) <= tol_change:
                break
            if abs(loss - prev_loss) < tol_change:
                break
        st.update(d=d, t=t, old_dirs=old_dirs, old_stps=old_stps, ro=ro, H_diag=h_diag,
                  prev_flat_grad=prev_flat_grad, prev_loss=prev_loss)
        return orig_loss

    # ----------------------------------------------------------------- state

    @property
    def state(self) -> dict:
        """torch.optim.LBFGS's state entries (a read-only view: vectors are backend arrays)."""
        return dict(self._st)

    def state_nbytes(self) -> int:
        st = self._st
        vecs = [st.get("d"), st.get("prev_flat_grad")] + list(st.get("old_dirs", ())) \
            + list(st.get("old_stps", ()))
        return sum(int(v.nbytes) for v in vecs if v is not None)

    def _to_host(self, a):
        return a.get() if self._kind == "cupy" else np.array(a, copy=True)

    def state_dict(self) -> dict:
        """Host copies of the state, in the layout of every fastopt ``state_dict``.

        ``state[0]`` holds the vectors: ``d``, ``prev_flat_grad`` (length ``n``) and
        ``old_dirs``, ``old_stps`` (``(k, n)``: the ``k`` history pairs, oldest first) and
        ``ro`` (``(k,)``); ``group_state[0]`` the scalars ``t``, ``H_diag``, ``prev_loss``,
        ``n_iter``, ``func_evals``.  ``fastopt.save``/``fastopt.load`` store it without pickle.
        """
        st = self._st
        arrays, scalars = {}, {"n_iter": st["n_iter"], "func_evals": st["func_evals"]}
        if st.get("d") is not None:
            n, k = self._numel, len(st["old_dirs"])
            arrays["d"] = self._to_host(st["d"])
            arrays["prev_flat_grad"] = self._to_host(st["prev_flat_grad"])
            arrays["old_dirs"] = np.empty((k, n), self._dtype)
            arrays["old_stps"] = np.empty((k, n), self._dtype)
            for i in range(k):
                arrays["old_dirs"][i] = self._to_host(st["old_dirs"][i])
                arrays["old_stps"][i] = self._to_host(st["old_stps"][i])
            arrays["ro"] = np.array(st["ro"], dtype=self._dtype).reshape(k)
            scalars.update(t=float(st["t"]), H_diag=float(st["H_diag"]),
                           prev_loss=float(st["prev_loss"]))
        groups = [{k: v for k, v in self.param_groups[0].items() if k != "params"}]
        groups[0]["params"] = list(range(len(self._params)))
        return {"rule": self.rule.name, "step_count": self.step_count, "param_groups": groups,
                "state": {0: arrays} if arrays else {}, "group_state": [scalars],
                "precision": None}

    def load_state_dict(self, state_dict: dict, params=None) -> None:
        """Load a ``state_dict`` (checked whole first; nothing changes on an error)."""
        sd = state_dict
        if not isinstance(sd, dict) or sd.get("rule") != self.rule.name:
            raise ValueError(f"state_dict: expected an LBFGS state_dict (rule 'lbfgs'), got "
                             f"{sd.get('rule') if isinstance(sd, dict) else type(sd).__name__!r}")
        groups = sd.get("param_groups")
        if not (isinstance(groups, list) and len(groups) == 1 and isinstance(groups[0], dict)):
            raise ValueError("state_dict['param_groups']: expected one group")
        hp = {k: v for k, v in groups[0].items() if k != "params"}
        if set(hp) != set(self.defaults):
            raise ValueError(f"state_dict['param_groups'][0]: expected the options "
                             f"{sorted(self.defaults)}, got {sorted(hp)}")
        if groups[0].get("params") != list(range(len(self._params))):
            raise ValueError(f"state_dict['param_groups'][0]['params']: expected "
                             f"{list(range(len(self._params)))}, got {groups[0].get('params')!r}")
        check_hyperparameters(self.rule, {**hp, **PIPELINE_DEFAULTS}, "state_dict: ")
        gs = sd.get("group_state")
        if not (isinstance(gs, list) and len(gs) == 1 and isinstance(gs[0], dict)):
            raise ValueError("state_dict['group_state']: expected one dict of LBFGS scalars")
        scalars = gs[0]
        counts = {}
        for k in ("n_iter", "func_evals"):
            v = scalars.get(k)
            if not (isinstance(v, numbers.Real) and not isinstance(v, bool) and v >= 0
                    and float(v).is_integer()):
                raise ValueError(f"state_dict: {k}: expected an int >= 0, got {v!r}")
            counts[k] = int(v)
        state = sd.get("state")
        arrays = state.get(0, state.get("0")) if isinstance(state, dict) and state else None
        new = dict(counts)
        if arrays is not None:
            n = self._numel
            k = len(arrays.get("ro", ()))
            shapes = {"d": (n,), "prev_flat_grad": (n,), "old_dirs": (k, n), "old_stps": (k, n),
                      "ro": (k,)}
            if set(arrays) != set(shapes):
                raise ValueError(f"state_dict['state'][0]: expected the arrays {sorted(shapes)}, "
                                 f"got {sorted(arrays)}")
            for name, shape in shapes.items():
                a = arrays[name]
                if not isinstance(a, np.ndarray) or a.shape != shape or a.dtype != self._dtype:
                    raise ValueError(f"state_dict: {name}: expected a {self._dtype} NumPy array of "
                                     f"shape {shape}, got {getattr(a, 'dtype', type(a).__name__)} "
                                     f"{getattr(a, 'shape', '')}")
                if not np.isfinite(a).all():
                    raise ValueError(f"state_dict: {name}: expected finite values")
            if k > hp["history_size"]:
                raise ValueError(f"state_dict: old_dirs: {k} history pairs exceed history_size="
                                 f"{hp['history_size']}")
            for name in ("t", "H_diag", "prev_loss"):
                v = scalars.get(name)
                if not (isinstance(v, numbers.Real) and not isinstance(v, bool)):
                    raise ValueError(f"state_dict: {name}: expected a number, got {v!r}")
            if counts["n_iter"] == 0:
                raise ValueError("state_dict: n_iter: expected >= 1 when the state has vectors")
            xp = self._xp
            new.update(d=xp.asarray(arrays["d"]), prev_flat_grad=xp.asarray(arrays["prev_flat_grad"]),
                       old_dirs=[xp.asarray(r) for r in arrays["old_dirs"]],
                       old_stps=[xp.asarray(r) for r in arrays["old_stps"]],
                       ro=[self._dtype.type(r) for r in arrays["ro"]],
                       t=float(scalars["t"]), H_diag=self._dtype.type(scalars["H_diag"]),
                       prev_loss=float(scalars["prev_loss"]))
        step_count = sd.get("step_count")
        if not (isinstance(step_count, numbers.Integral) and step_count >= 0):
            raise ValueError(f"state_dict['step_count']: expected an int >= 0, got {step_count!r}")
        if params is not None:
            for p, a in zip(self._params, params):
                p[...] = self._xp.asarray(a)
        self.param_groups[0].update(hp)
        self._st = new
        self.step_count = int(step_count)

    # fastopt.load hands the checked file contents here (its generic plan is per tensor)
    def _load_checkpoint(self, sd: dict, params) -> None:
        self.load_state_dict(sd, params)

    def __repr__(self):
        opts = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        return f"LBFGS({len(self._params)} params, backend={self.backend!r}, {opts})"
