"""The first two steps of every rule against values worked out by hand, and convergence.

The expectations are written with Python's ``math`` on scalars, independently
of the reference kernels, straight from the math in each class's docstring (a one-element
tensor is enough to pin every formula; the reference applies them element-wise).
"""

import math

import numpy as np
import pytest

import fastopt as fo

from _cases import CONVERGE, ROSEN, as_param, extra_from_hessian

P0, G1, G2 = 0.5, 0.2, -0.4


def two_steps(cls, *, extra=None, **opts):
    p = np.array([P0])
    opt = cls([p], backend="numpy", **opts)
    out = []
    for g, e in ((G1, extra[0] if extra else None), (G2, extra[1] if extra else None)):
        if e is None:
            opt.step([np.array([g])])
        else:
            # the extra input of a one-element param: a (1,) diagonal or a (1, 1) matrix
            shape = cls.rule.extra_shape_of((1,), 1)
            opt.step([np.array([g])], [np.array([e]).reshape(shape)])
        out.append(float(p[0]))
    return out


def close(got, want):
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_sgd_plain_and_weight_decay():
    lr, wd = 0.1, 0.01
    p1 = P0 - lr * (G1 + wd * P0)
    p2 = p1 - lr * (G2 + wd * p1)
    close(two_steps(fo.SGD, lr=lr, weight_decay=wd), [p1, p2])


@pytest.mark.parametrize("nesterov,dampening", [(False, 0.0), (True, 0.0), (False, 0.5)])
def test_sgd_momentum(nesterov, dampening):
    lr, mu = 0.1, 0.9
    b1 = G1  # the first step copies the gradient, whatever the dampening (torch)
    d1 = G1 + mu * b1 if nesterov else b1
    p1 = P0 - lr * d1
    b2 = mu * b1 + (1 - dampening) * G2
    d2 = G2 + mu * b2 if nesterov else b2
    p2 = p1 - lr * d2
    close(two_steps(fo.SGD, lr=lr, momentum=mu, nesterov=nesterov, dampening=dampening), [p1, p2])


def _adam_ref(lr, b1, b2, eps, wd=0.0, decoupled=False, amsgrad=False, bc=True):
    p, m, v, vmax, out = P0, 0.0, 0.0, 0.0, []
    for t, g in ((1, G1), (2, G2)):
        if decoupled:
            p *= 1 - lr * wd
        else:
            g = g + wd * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        vmax = max(vmax, v)
        vv = vmax if amsgrad else v
        bc1 = 1 - b1 ** t if bc else 1.0
        bc2 = 1 - b2 ** t if bc else 1.0
        p -= lr / bc1 * m / (math.sqrt(vv / bc2) + eps)
        out.append(p)
    return out


@pytest.mark.parametrize("opts", [{}, {"weight_decay": 0.1}, {"amsgrad": True},
                                  {"bias_correction": False}])
def test_adam(opts):
    want = _adam_ref(1e-2, 0.9, 0.999, 1e-8, wd=opts.get("weight_decay", 0.0),
                     amsgrad=opts.get("amsgrad", False), bc=opts.get("bias_correction", True))
    close(two_steps(fo.Adam, lr=1e-2, **opts), want)


def test_adam_amsgrad_keeps_the_max():
    # with a small second gradient v shrinks, amsgrad keeps the larger first v
    p = np.array([P0])
    opt = fo.Adam([p], lr=1e-2, amsgrad=True, backend="numpy")
    opt.step([np.array([1.0])])
    opt.step([np.array([1e-3])])
    st = opt.state[0][0]
    assert st["max_exp_avg_sq"][0] > st["exp_avg_sq"][0]


def test_adamw_decouples_decay():
    want = _adam_ref(1e-2, 0.9, 0.999, 1e-8, wd=0.1, decoupled=True)
    close(two_steps(fo.AdamW, lr=1e-2, weight_decay=0.1), want)


def test_adagrad():
    lr, lrd, wd, s0, eps = 0.1, 0.5, 0.01, 0.1, 1e-10
    p, s, out = P0, s0, []
    for t, g in ((1, G1), (2, G2)):
        g = g + wd * p
        clr = lr / (1 + (t - 1) * lrd)
        s += g * g
        p -= clr * g / (math.sqrt(s) + eps)
        out.append(p)
    close(two_steps(fo.Adagrad, lr=lr, lr_decay=lrd, weight_decay=wd, initial_accumulator_value=s0), out)


@pytest.mark.parametrize("centered,momentum", [(False, 0.0), (True, 0.0), (False, 0.9), (True, 0.9)])
def test_rmsprop(centered, momentum):
    lr, a, eps = 1e-2, 0.99, 1e-8
    p, v, ga, b, out = P0, 0.0, 0.0, 0.0, []
    for g in (G1, G2):
        v = a * v + (1 - a) * g * g
        if centered:
            ga = a * ga + (1 - a) * g
            d = math.sqrt(v - ga * ga) + eps
        else:
            d = math.sqrt(v) + eps
        if momentum:
            b = momentum * b + g / d
            p -= lr * b
        else:
            p -= lr * g / d
        out.append(p)
    close(two_steps(fo.RMSprop, lr=lr, alpha=a, centered=centered, momentum=momentum), out)


def test_adadelta():
    lr, rho, eps = 1.0, 0.9, 1e-6
    p, v, u, out = P0, 0.0, 0.0, []
    for g in (G1, G2):
        v = rho * v + (1 - rho) * g * g
        d = math.sqrt(u + eps) / math.sqrt(v + eps) * g
        u = rho * u + (1 - rho) * d * d
        p -= lr * d
        out.append(p)
    close(two_steps(fo.Adadelta, lr=lr, rho=rho, eps=eps), out)


def test_adamax():
    lr, b1, b2, eps = 2e-3, 0.9, 0.999, 1e-8
    p, m, u, out = P0, 0.0, 0.0, []
    for t, g in ((1, G1), (2, G2)):
        m = b1 * m + (1 - b1) * g
        u = max(b2 * u, abs(g) + eps)
        p -= lr / (1 - b1 ** t) * m / u
        out.append(p)
    close(two_steps(fo.Adamax, lr=lr), out)


def test_nadam():
    lr, b1, b2, eps, psi = 2e-3, 0.9, 0.999, 1e-8, 4e-3
    p, m, v, prod, out = P0, 0.0, 0.0, 1.0, []
    for t, g in ((1, G1), (2, G2)):
        mu = b1 * (1 - 0.5 * 0.96 ** (t * psi))
        mu_next = b1 * (1 - 0.5 * 0.96 ** ((t + 1) * psi))
        prod *= mu
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        d = math.sqrt(v / (1 - b2 ** t)) + eps
        p -= lr * (1 - mu) / (1 - prod) * g / d + lr * mu_next / (1 - prod * mu_next) * m / d
        out.append(p)
    close(two_steps(fo.NAdam, lr=lr), out)


def test_radam_unrectified_then_rectified():
    # with beta2 = 0.5, rho_inf = 3 < 5: never rectified; with beta2 = 0.999 rho_t <= 5 for t < 6
    lr, b1, b2 = 1e-2, 0.9, 0.999
    p, m, out = P0, 0.0, []
    for t, g in ((1, G1), (2, G2)):
        m = b1 * m + (1 - b1) * g
        p -= lr / (1 - b1 ** t) * m
        out.append(p)
    close(two_steps(fo.RAdam, lr=lr), out)


def test_radam_rectified_step_matches_formula():
    lr, b1, b2, eps = 1e-2, 0.9, 0.999, 1e-8
    p = np.array([P0])
    opt = fo.RAdam([p], lr=lr, backend="numpy")
    pp, m, v = P0, 0.0, 0.0
    rng = np.random.default_rng(1)
    for t in range(1, 9):
        g = float(rng.standard_normal())
        opt.step([np.array([g])])
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        rho_inf = 2 / (1 - b2) - 1
        rho_t = rho_inf - 2 * t * b2 ** t / (1 - b2 ** t)
        mhat = m / (1 - b1 ** t)
        if rho_t > 5:
            r = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
            pp -= lr * mhat * r * math.sqrt(1 - b2 ** t) / (math.sqrt(v) + eps)
        else:
            pp -= lr * mhat
        close(float(p[0]), pp)


def test_lion():
    lr, b1, b2, wd = 1e-2, 0.9, 0.99, 0.1
    p, m, out = P0, 0.0, []
    for g in (G1, G2):
        c = b1 * m + (1 - b1) * g
        p *= 1 - lr * wd
        p -= lr * math.copysign(1.0, c) if c else 0.0
        m = b2 * m + (1 - b2) * g
        out.append(p)
    close(two_steps(fo.Lion, lr=lr, weight_decay=wd), out)


def test_lamb_trust_ratio_on_a_vector():
    lr, b1, b2, eps, wd = 1e-2, 0.9, 0.999, 1e-6, 0.01
    p = np.array([0.5, -1.0, 2.0])
    g = [np.array([0.2, 0.1, -0.3]), np.array([-0.4, 0.2, 0.1])]
    pp, m, v = p.copy(), np.zeros(3), np.zeros(3)
    opt = fo.LAMB([p], lr=lr, weight_decay=wd, backend="numpy")
    for t, gt in ((1, g[0]), (2, g[1])):
        opt.step([gt])
        m = b1 * m + (1 - b1) * gt
        v = b2 * v + (1 - b2) * gt * gt
        r = (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps) + wd * pp
        trust = math.sqrt(sum(pp * pp)) / math.sqrt(sum(r * r))
        pp = pp - lr * trust * r
        np.testing.assert_allclose(p, pp, rtol=1e-12)


def test_lamb_zero_param_uses_trust_one():
    p = np.zeros(3)
    fo.LAMB([p], lr=0.1, backend="numpy").step([np.array([1.0, -1.0, 2.0])])
    # m_hat/(sqrt(v_hat)+eps) = sign(g) * 1/(1+eps/|g|) at t=1, trust 1
    np.testing.assert_allclose(p, -0.1 * np.array([1.0, -1.0, 1.0]), rtol=1e-5)


@pytest.mark.parametrize("k", [1.0, 0.5])
def test_adahessian(k):
    lr, b1, b2, eps = 0.15, 0.9, 0.999, 1e-4
    d = (0.3, -0.6)
    p, m, v, out = P0, 0.0, 0.0, []
    for t, g, dt in ((1, G1, d[0]), (2, G2, d[1])):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * dt * dt
        p -= lr / (1 - b1 ** t) * m / (math.sqrt(v / (1 - b2 ** t)) ** k + eps)
        out.append(p)
    close(two_steps(fo.AdaHessian, extra=d, hessian_power=k), out)


def test_newton_scalar_and_matrix():
    h = (2.0, 4.0)
    p1 = P0 - 1.0 * G1 / (h[0] + 1e-4)
    p2 = p1 - 1.0 * G2 / (h[1] + 1e-4)
    close(two_steps(fo.Newton, extra=h), [p1, p2])
    # one exact Newton step solves a quadratic 0.5 x'Ax - b'x
    a = np.array([[3.0, 1.0], [1.0, 2.0]])
    b = np.array([1.0, -1.0])
    x = np.zeros(2)
    fo.Newton([x], damping=0.0, backend="numpy").step([a @ x - b], [a])
    np.testing.assert_allclose(x, np.linalg.solve(a, b), rtol=1e-12)


# --------------------------------------------------------------------------- convergence


def _minimise(cls, opts, x0, grad, hess, steps):
    x = np.array(x0, dtype=np.float64)
    opt = cls([as_param(cls.rule.name, x)], backend="numpy", **opts)  # Muon: x as an n x 1 matrix
    for _ in range(steps):
        g = grad(x)
        # the rule's extra input from the Hessian (a diagonal or the matrix, by Rule.extra_shape)
        extra = extra_from_hessian(cls.rule.name, hess(x))
        if extra is None:
            opt.step([as_param(cls.rule.name, g)])
        else:
            opt.step([g], [extra])
    return x


@pytest.mark.parametrize("cls,opts,atol", CONVERGE,
                         ids=[f"{c.__name__}-{i}" for i, (c, _, _) in enumerate(CONVERGE)])
def test_converges_on_a_quadratic(cls, opts, atol):
    a = np.diag([1.0, 3.0, 0.5])
    b = np.array([1.0, -2.0, 0.5])
    xstar = np.linalg.solve(a, b)
    x = _minimise(cls, opts, [2.0, 2.0, -2.0], lambda x: a @ x - b, lambda x: a, 3000)
    np.testing.assert_allclose(x, xstar, atol=atol)  # 1e-2; Lion's lr*sign steps hover: 0.05


def _rosen_grad(x):
    return np.array([-2 * (1 - x[0]) - 400 * x[0] * (x[1] - x[0] ** 2), 200 * (x[1] - x[0] ** 2)])


def _rosen_hess(x):
    return np.array([[2 - 400 * x[1] + 1200 * x[0] ** 2, -400 * x[0]], [-400 * x[0], 200.0]])


@pytest.mark.parametrize("name", sorted(ROSEN))
def test_converges_on_rosenbrock(name):
    cls = getattr(fo, name)
    opts, steps = ROSEN[name]
    x = _minimise(cls, opts, [-1.2, 1.0], _rosen_grad, _rosen_hess, steps)
    np.testing.assert_allclose(x, [1.0, 1.0], atol=0.05)
