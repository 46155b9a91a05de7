"""The NumPy reference backend: the definition of correct.

Plain, readable NumPy, one tensor at a time, one function per rule written as
the rule's docstring in fastopt/_optim.py states it.  It allocates temporaries freely and makes many
passes over memory; the compiled backends are tested against it.

Scalars arrive as Python floats (see ``fastopt._rules``): under NumPy 2's
promotion rules (NEP 50) a Python float does not promote a float32 array, so a
float32 tensor is computed in float32 here too.
"""

from __future__ import annotations

import math

import numpy as np

from .. import precision as _prec
from .. import quantization as _q
from .._backend import Ops, register_kernel
from .._rules import CLIP_EPS, RULES, adafactor_eps1, muon_lr_ratio

BACKEND = "numpy"


# ------------------------------------------------------------------ pipeline steps


def processed_grad(g, i, pre):
    """Steps 1, 3, 4 and the norm-clip factors of 5-6 of the pipeline (docs/design.md, "Pipeline"), on a copy of ``g``."""
    g = np.array(g, copy=True)
    if pre.inv_scale is not None:
        g *= pre.inv_scale
    if pre.maximize:
        g = -g
    if pre.clip_value is not None:
        np.clip(g, -pre.clip_value, pre.clip_value, out=g)
    if pre.scales is not None:
        g *= float(pre.scales[i])
    return g


def _widen(a):
    """float32 values of a 16-bit array (exact), the array itself otherwise."""
    return _prec.to_float32(a) if a.dtype.itemsize == 2 else a


class NumpyOps(Ops):
    name = BACKEND
    xp = np
    dtypes = ("float16", "bfloat16", "float32", "float64")
    precision_options = True
    q8_dtypes = ("float16", "bfloat16", "float32")

    def grad_stats(self, grads, extras, *, inv_scale, clip_value, need_sumsq, check_finite):
        # finding an overflow is this check's job: it must not also warn about it
        with np.errstate(over="ignore", invalid="ignore"):
            return self._grad_stats(grads, extras, inv_scale, clip_value, need_sumsq, check_finite)

    def _grad_stats(self, grads, extras, inv_scale, clip_value, need_sumsq, check_finite):
        finite = True
        sumsq = np.zeros(len(grads), dtype=np.float64) if need_sumsq else None
        for i, g in enumerate(grads):
            # a 16-bit grad is unscaled in float32, as the update reads it: an inf that
            # float16 overflow produced is seen, and g * inv_scale does not round to 16 bits
            g = _widen(g)
            x = g * inv_scale if inv_scale is not None else g
            if check_finite and not np.isfinite(x).all():
                finite = False
            if need_sumsq:
                if clip_value is not None:
                    x = np.clip(x, -clip_value, clip_value)
                x = x.astype(np.float64)
                sumsq[i] = np.dot(x, x)
        if check_finite and extras is not None:
            # the kernels unscale the extra inputs too: check them as the kernels will see them
            finite = finite and all(
                np.isfinite(_widen(e) * inv_scale if inv_scale is not None else e).all()
                for e in extras)
        return sumsq, finite

    def sumsq(self, arrays):
        return np.array([np.dot(a.astype(np.float64).ravel(), a.astype(np.float64).ravel())
                         for a in arrays], dtype=np.float64)

    def scale_(self, arrays, factors):
        for a, f in zip(arrays, factors):
            a *= float(f)

    def clip_(self, arrays, c):
        for a in arrays:
            np.clip(a, -c, c, out=a)


OPS = NumpyOps()


def _per_tensor(rule_fn, nonnegative=()):
    """Run a one-tensor rule over a list, with the pipeline around it (docs/design.md, "Pipeline").

    ``nonnegative``: the rule's ``nonnegative_state``, whose 8-bit form uses the
    unsigned dynamic map (every other state uses the signed one).

    The weight-decay stage (``Rule.weight_decay``) runs here, once for every rule:
    L2 adds ``l2*p`` to the grad (only when ``l2 != 0``: ``0*inf`` is nan), decoupled
    decay multiplies the param by ``decay = 1 - lr*wd`` before the rule.
    """

    def kernel(params, grads, states, s, pre, extras=None):
        if pre.precision is not None:
            for i, (p, g) in enumerate(zip(params, grads)):
                _reduced_tensor(rule_fn, p, g, {name: arrs[i] for name, arrs in states.items()},
                                s, pre, i, None if extras is None else extras[i], nonnegative)
            return
        for i, (p, g) in enumerate(zip(params, grads)):
            st = {name: arrs[i] for name, arrs in states.items()}
            e = None
            if extras is not None:
                e = extras[i] * pre.inv_scale if pre.inv_scale is not None else extras[i]
            g = _decay_stage(p, processed_grad(g, i, pre), s)
            rule_fn(p, g, st, s, e)
            if pre.weight_clip is not None:
                np.clip(p, -pre.weight_clip, pre.weight_clip, out=p)

    kernel.__name__ = rule_fn.__name__
    kernel.__doc__ = rule_fn.__doc__
    return kernel


def _decay_stage(p, g, s):
    """The weight-decay stage (``Rule.weight_decay``), once for every rule; returns the grad.

    L2 adds ``l2*p`` to the grad, only when ``l2 != 0`` (``0*inf`` is nan: an inf
    param must stay inf); decoupled decay multiplies ``p`` in place by ``decay``.
    """
    if s["l2"] != 0:
        g = g + s["l2"] * p
    if s["decay"] != 1:
        p *= s["decay"]
    return g


def _reduced_tensor(rule_fn, p, g, stored, s, pre, i, extra, nonnegative=()):
    """One tensor whose param or state is not in the compute dtype (``pre.precision``).

    Everything is computed in float32 on exact float32 copies of the param (or
    of its float32 ``master``), the grad and the state, in the pipeline's order;
    then every array is written once, with one rounding: the state to its
    dtype by round-to-nearest-even, the master as is, the param by
    round-to-nearest-even (of the master, when there is one) or stochastically
    (``fastopt.precision``: the hash of (seed, step ``t``, flat index within
    the param)).  Weight decay, ``weight_clip`` and ``max_norm`` act on the
    float32 value before that rounding, so a change below the 16-bit
    resolution is not lost before the rounding decides.

    8-bit state (``prec.state is Q8``; docs/design.md, "8-bit state format"):
    ``stored[name]`` holds the uint8 codes and ``stored[name + "_absmax"]`` the
    per-block absmax; the float32 state is their decoding
    (``dequantize_blockwise``), the step runs on it exactly as above, and the
    new float32 state is written back as ``quantize_blockwise`` of it (new
    absmax per block, the exact nearest code).  The param step uses the new
    state before quantization.
    """
    prec = pre.precision
    q8 = prec.state is _prec.Q8
    master = stored.get("master")
    work = master.copy() if master is not None else _prec.to_float32(p)
    if q8:
        st = {name: _q.dequantize_blockwise(a, stored[name + "_absmax"],
                                            signed=name not in nonnegative)
              for name, a in stored.items() if name != "master" and not name.endswith("_absmax")}
    else:
        st = {name: _prec.to_float32(a) for name, a in stored.items() if name != "master"}
    g = processed_grad(_prec.to_float32(g), i, pre)
    e = None
    if extra is not None:
        e = _prec.to_float32(extra)
        if pre.inv_scale is not None:
            e *= pre.inv_scale
    g = _decay_stage(work, g, s)
    rule_fn(work, g, st, s, e)
    if pre.weight_clip is not None:
        np.clip(work, -pre.weight_clip, pre.weight_clip, out=work)
    if pre.max_norm is not None:
        norm = np.sqrt(np.dot(work.astype(np.float64), work.astype(np.float64)))
        work *= min(1.0, pre.max_norm / (norm + CLIP_EPS))
    for name, a in st.items():
        if q8:
            codes, absmax = _q.quantize_blockwise(a, signed=name not in nonnegative)
            stored[name][...] = codes
            stored[name + "_absmax"][...] = absmax
        else:
            stored[name][...] = _prec.round_to(a, stored[name].dtype)
    if master is not None:
        master[...] = work
    if prec.stochastic_rounding:
        p[...] = _prec.round_to(work, p.dtype, stochastic_rounding=True, seed=prec.seed,
                                step=pre.step, index=_prec.element_index(p.size))
    else:
        p[...] = _prec.round_to(work, p.dtype)


def _rule(name):
    def deco(fn):
        register_kernel(name, BACKEND, _per_tensor(fn, RULES[name].nonnegative_state))
        return fn

    return deco


# ------------------------------------------------------------------ the rules


def _moments(st, g, s, second="exp_avg_sq", fed=None):
    """m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*x^2 with x = g (or AdaHessian's D); returns (m, v)."""
    m, v = st["exp_avg"], st[second]
    x = g if fed is None else fed
    m[...] = s["beta1"] * m + (1 - s["beta1"]) * g
    v[...] = s["beta2"] * v + (1 - s["beta2"]) * x * x
    return m, v


@_rule("sgd")
def sgd(p, g, st, s, _):
    """g += wd*p; b = g at t=1 else mu*b + (1-dampening)*g; g = g + mu*b (nesterov) or b; p -= lr*g."""
    if s["momentum"] != 0:
        b = st["momentum_buffer"]
        if s["first_step"]:
            b[...] = g
        else:
            b[...] = s["momentum"] * b + (1 - s["dampening"]) * g
        g = g + s["momentum"] * b if s["nesterov"] else b
    p -= s["lr"] * g


def _adam_like(p, g, st, s):
    m, v = _moments(st, g, s)
    if s["amsgrad"]:
        vmax = st["max_exp_avg_sq"]
        np.maximum(vmax, v, out=vmax)
        v = vmax
    # sqrt(v / bc2) written as sqrt(v) / sqrt(bc2), as torch.optim.Adam does
    denom = np.sqrt(v) / s["bc2_sqrt"] + s["eps"]
    p -= s["lr"] / s["bc1"] * m / denom


@_rule("adam")
def adam(p, g, st, s, _):
    """g += wd*p; m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g^2; p -= lr/bc1 * m / (sqrt(v/bc2) + eps)."""
    _adam_like(p, g, st, s)


@_rule("adamw")
def adamw(p, g, st, s, _):
    """Adam with decoupled decay: p *= 1 - lr*wd first."""
    _adam_like(p, g, st, s)


@_rule("adagrad")
def adagrad(p, g, st, s, _):
    """g += wd*p; s += g^2; p -= clr * g / (sqrt(s) + eps), clr = lr / (1 + (t-1)*lr_decay)."""
    acc = st["sum"]
    acc += g * g
    p -= s["clr"] * g / (np.sqrt(acc) + s["eps"])


@_rule("rmsprop")
def rmsprop(p, g, st, s, _):
    """v = a*v + (1-a)*g^2; centered: v - avg^2; d = sqrt(.) + eps; momentum buffer or p -= lr*g/d."""
    v = st["square_avg"]
    v[...] = s["alpha"] * v + (1 - s["alpha"]) * g * g
    if s["centered"]:
        a = st["grad_avg"]
        a[...] = s["alpha"] * a + (1 - s["alpha"]) * g
        d = np.sqrt(v - a * a) + s["eps"]
    else:
        d = np.sqrt(v) + s["eps"]
    if s["momentum"] > 0:
        b = st["momentum_buffer"]
        b[...] = s["momentum"] * b + g / d
        p -= s["lr"] * b
    else:
        p -= s["lr"] * g / d


@_rule("adadelta")
def adadelta(p, g, st, s, _):
    """v = rho*v + (1-rho)*g^2; delta = sqrt(u+eps)/sqrt(v+eps)*g; u = rho*u + (1-rho)*delta^2; p -= lr*delta."""
    v, u = st["square_avg"], st["acc_delta"]
    v[...] = s["rho"] * v + (1 - s["rho"]) * g * g
    delta = np.sqrt(u + s["eps"]) / np.sqrt(v + s["eps"]) * g
    u[...] = s["rho"] * u + (1 - s["rho"]) * delta * delta
    p -= s["lr"] * delta


@_rule("adamax")
def adamax(p, g, st, s, _):
    """m = b1*m + (1-b1)*g; u = max(b2*u, |g| + eps); p -= lr/(1-b1^t) * m/u."""
    m, u = st["exp_avg"], st["exp_inf"]
    m[...] = s["beta1"] * m + (1 - s["beta1"]) * g
    u[...] = np.maximum(s["beta2"] * u, np.abs(g) + s["eps"])
    p -= s["clr"] * m / u


@_rule("nadam")
def nadam(p, g, st, s, _):
    """torch.optim.NAdam: p -= c_grad * g/denom + c_avg * m/denom, denom = sqrt(v/bc2) + eps."""
    m, v = _moments(st, g, s)
    denom = np.sqrt(v) / s["bc2_sqrt"] + s["eps"]
    p -= s["c_grad"] * g / denom
    p -= s["c_avg"] * m / denom


@_rule("radam")
def radam(p, g, st, s, _):
    """torch.optim.RAdam: rectified step when rho_t > 5, else p -= lr/bc1 * m."""
    m, v = _moments(st, g, s)
    if s["rectify"]:
        p -= s["step_size"] * m / (np.sqrt(v) + s["eps"])
    else:
        p -= s["step_size"] * m


@_rule("lion")
def lion(p, g, st, s, _):
    """c = b1*m + (1-b1)*g; p *= 1 - lr*wd; p -= lr*sign(c); m = b2*m + (1-b2)*g."""
    m = st["exp_avg"]
    c = s["beta1"] * m + (1 - s["beta1"]) * g
    p -= s["lr"] * np.sign(c)
    m[...] = s["beta2"] * m + (1 - s["beta2"]) * g


@_rule("lamb")
def lamb(p, g, st, s, _):
    """Adam moments; r = m_hat/(sqrt(v_hat)+eps) + wd*p; trust = |p|/|r| (1 if either is 0); p -= lr*trust*r."""
    m, v = _moments(st, g, s)
    r = (m / s["bc1"]) / (np.sqrt(v) / s["bc2_sqrt"] + s["eps"]) + s["weight_decay"] * p
    p_norm = np.sqrt(np.dot(p.astype(np.float64), p.astype(np.float64)))
    r_norm = np.sqrt(np.dot(r.astype(np.float64), r.astype(np.float64)))
    trust = p_norm / r_norm if p_norm > 0 and r_norm > 0 else 1.0
    p -= (s["lr"] * trust) * r


@_rule("adahessian")
def adahessian(p, g, st, s, d):
    """Adam with v fed by the Hessian diagonal: v = b2*v + (1-b2)*D^2; denom = (sqrt(v/bc2))^k + eps."""
    m, v = _moments(st, g, s, second="exp_hessian_diag_sq", fed=d)
    denom = (np.sqrt(v) / s["bc2_sqrt"]) ** s["hessian_power"] + s["eps"]
    p -= s["step_size"] * m / denom


@_rule("newton")
def newton(p, g, st, s, h):
    """p -= lr * solve(H + damping*I, g), H the n-by-n Hessian of the n-element tensor."""
    n = p.size
    a = h.reshape(n, n) + s["damping"] * np.eye(n, dtype=p.dtype)
    p -= s["lr"] * np.linalg.solve(a, g)


# ------------------------------------------------------------------ Muon (Rule.kind "orthogonalize")


def lerp_form(x, y, swap, c):
    """torch's ``lerp`` in the form ``fastopt._rules._lerp_form`` gives: ``x + c*(y - x)``,
    with ``x`` and ``y`` exchanged when ``swap``."""
    if swap:
        x, y = y, x
    return x + c * (y - x)


def newton_schulz(u, coefficients, steps, eps):
    """torch.optim.Muon's orthogonalization of the matrix ``u``, in ``u``'s dtype.

    The wide orientation (rows <= cols) is iterated so that the Gram matrix is the small
    one: ``X = u / max(||u||_F, eps)``; ``steps`` times ``A = X X^T``,
    ``B = b A + c A A``, ``X = a X + B X``.  torch computes it in bfloat16; fastopt in
    the param's dtype (docs/design.md, "Muon").
    """
    a, b, c = coefficients
    tall = u.shape[0] > u.shape[1]
    x = u.T if tall else u
    x = x / max(float(np.linalg.norm(x)), eps)
    for _ in range(steps):
        gram = x @ x.T
        # gram is symmetric: gram @ gram.T is gram @ gram, and NumPy hands it to BLAS syrk
        x = a * x + (b * gram + c * (gram @ gram.T)) @ x
    return x.T if tall else x


def muon_kernel(params, grads, states, s, pre, extras=None):
    """torch.optim.Muon per 2-D tensor (``pre.shapes``): ``buf = lerp(buf, g, 1 - mu)``;
    ``u = lerp(g, buf, mu)`` (nesterov) or ``buf``; ``O = NS(u)``; ``p *= 1 - lr*wd``;
    ``p -= lr * ratio(shape) * O``; then ``weight_clip``."""
    for i, (p, g) in enumerate(zip(params, grads)):
        shape = pre.shapes[i]
        g = _decay_stage(p, processed_grad(g, i, pre), s)
        buf = states["momentum_buffer"][i]
        buf[...] = lerp_form(buf, g, s["buf_swap"], s["buf_c"])
        u = lerp_form(g, buf, s["nest_swap"], s["nest_c"]) if s["nesterov"] else buf
        o = newton_schulz(u.reshape(shape), s["ns_coefficients"], s["ns_steps"], s["eps"])
        p -= (s["lr"] * muon_lr_ratio(s["adjust_lr_fn"], shape)) * o.reshape(-1)
        if pre.weight_clip is not None:
            np.clip(p, -pre.weight_clip, pre.weight_clip, out=p)


register_kernel("muon", BACKEND, muon_kernel)


# ------------------------------------------------------------------ ASGD, Rprop


@_rule("asgd")
def asgd(p, g, st, s, _):
    """torch.optim.ASGD: p = p*(1 - lambd*eta) - eta*g; ax = p if mu == 1 else ax + (p - ax)*mu."""
    p *= s["eta_decay"]
    p -= s["eta"] * g
    ax = st["ax"]
    if s["average_copy"]:
        ax[...] = p
    else:
        ax += (p - ax) * s["mu"]


@_rule("rprop")
def rprop(p, g, st, s, _):
    """torch.optim.Rprop: per-element step sizes grow by etaplus where g keeps its sign, shrink
    by etaminus where it flips (and that grad counts as 0), clamped to step_sizes; p -= sign(g)*size."""
    prev, size = st["prev"], st["step_size"]
    d = np.sign(g * prev)
    factor = np.where(d > 0, s["etaplus"], np.where(d < 0, s["etaminus"], np.where(d == 0, 1.0, d)))
    factor = factor.astype(p.dtype)
    size[...] = np.clip(size * factor, s["step_size_min"], s["step_size_max"])
    g = np.where(d < 0, np.zeros_like(g), g)
    p -= np.sign(g) * size
    prev[...] = g


# ------------------------------------------------------------------ AdaBelief, Yogi


@_rule("adabelief")
def adabelief(p, g, st, s, _):
    """optax.adabelief: m = b1*m + (1-b1)*g; s = b2*s + (1-b2)*(g - m)^2 + eps_root;
    p -= c_avg*m/d + c_grad*g/d, d = sqrt(s/bc2) + eps (c_grad = 0 without nesterov)."""
    m, v = st["exp_avg"], st["exp_avg_var"]
    m[...] = s["beta1"] * m + (1 - s["beta1"]) * g
    e = g - m
    v[...] = s["beta2"] * v + (1 - s["beta2"]) * e * e + s["eps_root"]
    d = np.sqrt(v) / s["bc2_sqrt"] + s["eps"]
    p -= s["c_avg"] * m / d
    if s["nesterov"]:
        p -= s["c_grad"] * g / d


@_rule("yogi")
def yogi(p, g, st, s, _):
    """optax.yogi: m = b1*m + (1-b1)*g; v = v - (1-b2)*sign(v - g^2)*g^2;
    p -= lr/bc1 * m / (sqrt(v/bc2) + eps)."""
    m, v = st["exp_avg"], st["exp_avg_sq"]
    m[...] = s["beta1"] * m + (1 - s["beta1"]) * g
    g2 = g * g
    v[...] = v - (1 - s["beta2"]) * np.sign(v - g2) * g2
    p -= s["step_size"] * m / (np.sqrt(v) / s["bc2_sqrt"] + s["eps"])


# ------------------------------------------------------------------ AdEMAMix


@_rule("ademamix")
def ademamix(p, g, st, s, _):
    """AdEMAMix: a fast and a slow EMA of g (beta1, beta3) and Adam's v;
    p -= lr * (m1/bc1 + alpha*m2) / (sqrt(nu/bc2) + eps), after p *= 1 - lr*wd."""
    m1, m2, nu = st["m1"], st["m2"], st["nu"]
    m1[...] = s["beta1"] * m1 + (1 - s["beta1"]) * g
    m2[...] = s["beta3"] * m2 + s["one_minus_beta3"] * g
    nu[...] = s["beta2"] * nu + (1 - s["beta2"]) * g * g
    d = np.sqrt(nu) / s["bc2_sqrt"] + s["eps"]
    p -= s["lr"] * ((m1 / s["bc1"] + s["alpha"] * m2) / d)


# ------------------------------------------------------------------ SparseAdam (Rule.kind "sparse_rows")


def coalesced_rows(vals, order, starts):
    """The summed grad row of each distinct index: ``g[k] = vals[order[starts[k]]] + ...``.

    ``order`` is a stable argsort of the indices and ``starts`` the segment boundaries of equal
    indices in it (``fastopt._sparse.coalesce``), so duplicates are added in the order they
    appear in the grad, left to right, starting from the first (no ``0 +``).
    """
    first = starts[:-1]
    counts = np.diff(starts)
    g = vals[order[first]].copy()
    for r in range(1, int(counts.max()) if counts.size else 0):
        sel = np.flatnonzero(counts > r)
        g[sel] = g[sel] + vals[order[first[sel] + r]]
    return g


def sparse_adam_rows(p, m, v, vals, order, starts, rows, s, maximize):
    """torch.optim.SparseAdam on the rows ``rows`` of the 2-D views ``p``, ``m``, ``v``.

    As torch's ``_functional.sparse_adam`` computes it: with ``g`` the coalesced grad row
    (negated under ``maximize``), ``u1 = (g - m)*(1 - beta1)``, ``m += u1``,
    ``u2 = (g*g - v)*(1 - beta2)``, ``v += u2``, then
    ``p -= step_size * (m_old + u1) / (sqrt(v_old + u2) + eps)`` with
    ``step_size = lr*sqrt(1 - beta2**t)/(1 - beta1**t)`` of the param's own step ``t``.
    Rows the grad does not name are not read or written.
    """
    g = coalesced_rows(vals, order, starts)
    if maximize:
        g = -g
    m_old, v_old = m[rows], v[rows]
    u1 = (g - m_old) * s["one_minus_beta1"]
    u2 = (g * g - v_old) * s["one_minus_beta2"]
    m[rows] = m_old + u1
    v[rows] = v_old + u2
    p[rows] = p[rows] - s["step_size"] * ((u1 + m_old) / (np.sqrt(u2 + v_old) + s["eps"]))


# ------------------------------------------------------------------ Adafactor (Rule.kind "factored")


def adafactor_kernel(params, grads, states, s, pre, extras=None):
    """torch.optim.Adafactor per tensor (``pre.shapes``), in the param's dtype.

    ``alpha = max(eps2, RMS(p)) * rho`` (before the decay); ``p *= 1 - lr*wd``.  A param of
    >= 2 dims, seen as a batch of (n, m) matrices: ``row_var = lerp(row_var, mean_j g^2, w)``,
    ``col_var = lerp(col_var, mean_i g^2, w)``, ``V = row_var col_var / max(mean_i row_var,
    eps1)``; a 0-/1-D param: ``variance = lerp(variance, g^2, w)``, ``V = variance``.  Then
    ``u = g / sqrt(max(V, eps1^2))``, ``p -= alpha / max(1, RMS(u)/d) * u``, ``weight_clip``.
    The sums of squares (rows, columns, RMS) are taken in float64 and each mean rounds once
    to the dtype.  ``w = t**beta2_decay``; the lerp is torch's (``_rules._lerp_form``).
    """
    for i, (p, g) in enumerate(zip(params, grads)):
        shape, dt = pre.shapes[i], p.dtype
        x = processed_grad(g, i, pre)
        eps1 = adafactor_eps1(s, dt)
        n = max(p.size, 1)
        alpha = max(s["eps2"], math.sqrt(float(np.dot(p.astype(np.float64), p.astype(np.float64))))
                    / math.sqrt(n)) * s["rho"]
        if s["decay"] != 1:
            p *= s["decay"]
        c = dt.type(s["var_c"])
        if len(shape) >= 2:
            rows, cols = shape[-2], shape[-1]
            xm = x.reshape((int(np.prod(shape[:-2])), rows, cols))
            sq = xm.astype(np.float64) ** 2
            row_mean = (sq.sum(axis=2) / cols).astype(dt)          # (B, rows)
            col_mean = (sq.sum(axis=1) / rows).astype(dt)          # (B, cols)
            r = states["row_var"][i].reshape(row_mean.shape)
            cv = states["col_var"][i].reshape(col_mean.shape)
            r[...] = lerp_form(r, row_mean, s["var_swap"], c)
            cv[...] = lerp_form(cv, col_mean, s["var_swap"], c)
            rmean = (r.astype(np.float64).sum(axis=1) / rows).astype(dt)
            rden = np.maximum(rmean, dt.type(eps1))               # (B,)
            v = (r[:, :, None] * cv[:, None, :]) / rden[:, None, None]
            v = v.reshape(-1)
        else:
            var = states["variance"][i]
            var[...] = lerp_form(var, x * x, s["var_swap"], c)
            v = var
        u = x * (1 / np.sqrt(np.maximum(v, dt.type(eps1 * eps1))))
        u64 = u.astype(np.float64)
        denom = max(1.0, math.sqrt(float(np.dot(u64, u64))) / (math.sqrt(n) * s["d"]))
        p -= dt.type(alpha / denom) * u
        if pre.weight_clip is not None:
            np.clip(p, -pre.weight_clip, pre.weight_clip, out=p)


register_kernel("adafactor", BACKEND, adafactor_kernel)


# ------------------------------------------------------------------ Schedule-Free AdamW, SGD


def _sf_interpolate(p, z, u, s):
    """y = lerp(y, z, ckp1) in torch's form (``c_lerp``, ``lerp_swap``); y += y_lr*u; z -= lr*u."""
    if s["lerp_swap"]:
        p[...] = z + s["c_lerp"] * (p - z)
    else:
        p += s["c_lerp"] * (z - p)
    p += s["y_lr"] * u
    z -= s["lr"] * u


@_rule("schedule_free_adamw")
def schedule_free_adamw(p, g, st, s, _):
    """schedulefree.AdamWScheduleFree: v = b2*v + (1-b2)*g^2; u = g / (sqrt(v/bc2) + eps),
    plus wd*y (decay at y); then the y/z interpolation of ``_sf_interpolate``."""
    z, v = st["z"], st["exp_avg_sq"]
    v[...] = s["beta2"] * v + s["one_minus_beta2"] * g * g
    u = g / (np.sqrt(v / s["bc2"]) + s["eps"])
    if s["weight_decay"] != 0:
        u = u + s["weight_decay"] * p
    _sf_interpolate(p, z, u, s)


@_rule("schedule_free_sgd")
def schedule_free_sgd(p, g, st, s, _):
    """schedulefree.SGDScheduleFree: g += wd*y (the L2 stage, at y), then ``_sf_interpolate``."""
    _sf_interpolate(p, st["z"], g, s)


# ------------------------------------------------------------------ LARS (Rule.kind "trust_ratio")


@_rule("lars")
def lars(p, g, st, s, _):
    """u = g + wd*p; trust = tc*|p|/(|u| + eps) (1 if either norm is 0, or trust_ratio off);
    m = -(lr*trust)*u + mu*m; p += m (nesterov: p += -(lr*trust)*u + mu*m).

    optax.lars's order: the trust ratio and -lr are one float64 scalar per tensor, rounded once
    to the dtype where it multiplies ``u``.
    """
    m = st["momentum_buffer"]
    u = g + s["weight_decay"] * p if s["weight_decay"] != 0 else g  # optax skips a zero decay
    trust = 1.0
    if s["trust_ratio"]:
        p_norm = math.sqrt(np.dot(p.astype(np.float64), p.astype(np.float64)))
        u_norm = math.sqrt(np.dot(u.astype(np.float64), u.astype(np.float64)))
        if p_norm > 0 and u_norm > 0:
            trust = s["trust_coefficient"] * p_norm / (u_norm + s["eps"])
    d = -(s["lr"] * trust) * u
    m[...] = d + s["momentum"] * m
    p += d + s["momentum"] * m if s["nesterov"] else m
