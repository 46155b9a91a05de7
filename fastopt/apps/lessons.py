"""``python -m fastopt demo --lesson NAME``: one training technique, its variants side by side.

Each lesson trains every variant from the same weights on the same data (and, where
gradients are noisy, the same noise), prints a table and, with ``--plot FILE.png``,
draws one figure of the loss curves.  The problems are small on purpose, so that a
lesson runs in seconds and the effect it teaches is not lost in noise:

``momentum``     SGD, heavy-ball and Nesterov on an ill-conditioned quadratic
                 (condition number 100): steps to reach 1e-6 of the initial loss.
``adaptive``     SGD, AdaGrad, RMSprop and Adam on a quadratic whose curvatures span
                 four decades: the per-coordinate step sizes of the adaptive methods.
``clipping``     a learning rate above the stability limit: plain SGD explodes, value
                 and norm clipping keep the run finite.
``decay``        SGD on noisy gradients with a constant, exponential, step and cosine
                 learning rate: decay takes the loss below the constant rate's noise floor.
``batchnorm``    a deep ReLU MLP on the digits with and without BatchNorm, plain SGD at a
                 learning rate the plain network does not train well with.
``dropout``      an MLP overfitting 300 training digits with 30% random labels: dropout
                 (p 0.5) narrows the gap between test and train loss.
``second-order`` damped Newton against gradient descent on L2-regularised logistic
                 regression: iterations until the gradient norm is below 1e-8.

Every lesson is a function returning a :class:`Lesson` (rows + curves), which is what
``tests/test_lessons.py`` checks: the direction each lesson teaches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .. import _optim
from . import demo as _demo


@dataclass
class Row:
    variant: str
    metric: float          # what the lesson compares (its ``metric_name``)
    final_loss: float
    curve: list = field(default_factory=list)  # loss per step (or per epoch)
    note: str = ""


@dataclass
class Lesson:
    name: str
    title: str
    metric_name: str
    rows: list

    def row(self, variant) -> Row:
        return next(r for r in self.rows if r.variant == variant)

    def table(self) -> str:
        head = f"{'variant':22} {self.metric_name:>22} {'final loss':>12}  note"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            lines.append(f"{r.variant:22} {r.metric:22.4g} {r.final_loss:12.4g}  {r.note}")
        return "\n".join(lines)


# ------------------------------------------------------------------ quadratics

def _quadratic(curvatures):
    h = np.asarray(curvatures, dtype=np.float64)

    def loss(w):
        return float(0.5 * np.sum(h * w * w))

    def grad(w):
        return h * w

    return h, loss, grad


def _run(make_opt, w0, loss, grad, steps, *, noise=None, target=None):
    """Steps of an optimizer on ``loss``; returns (curve, first step at or below target)."""
    w = w0.copy()
    opt = make_opt([w])
    curve = [loss(w)]
    hit = None
    for t in range(steps):
        g = grad(w)
        if noise is not None:
            g = g + noise[t]
        try:
            opt.step([g])
        except FloatingPointError:  # nothing written: the run has diverged
            curve.append(math.inf)
            break
        curve.append(loss(w))
        if not math.isfinite(curve[-1]) or curve[-1] > 1e30:
            curve[-1] = math.inf
            break
        if target is not None and hit is None and curve[-1] <= target:
            hit = t + 1
    return curve, hit


def momentum(steps=3000, backend="auto"):
    h, loss, grad = _quadratic(np.linspace(1.0, 100.0, 20))
    w0 = np.ones(20)
    lr = 1.0 / 100.0  # 1/L: SGD's usual safe step
    target = 1e-6 * loss(w0)
    variants = {
        "sgd": dict(),
        "heavy-ball (0.9)": dict(momentum=0.9),
        "nesterov (0.9)": dict(momentum=0.9, nesterov=True),
    }
    rows = []
    for name, kw in variants.items():
        curve, hit = _run(lambda p: _optim.SGD(p, lr=lr, backend=backend, **kw), w0, loss, grad,
                          steps, target=target)
        rows.append(Row(name, hit if hit else math.inf, curve[-1], curve,
                        "" if hit else f"not reached in {steps} steps"))
    return Lesson("momentum", "momentum on an ill-conditioned quadratic (condition 100, lr 1/L)",
                  "steps to 1e-6 of loss", rows)


def adaptive(steps=500, backend="auto"):
    n = 20
    h, loss, grad = _quadratic(np.logspace(-2, 2, n))
    w0 = np.ones(n)
    variants = {
        "sgd (lr 0.019)": lambda p: _optim.SGD(p, lr=0.019, backend=backend),
        "adagrad (lr 0.3)": lambda p: _optim.Adagrad(p, lr=0.3, backend=backend),
        "rmsprop (lr 0.01)": lambda p: _optim.RMSprop(p, lr=0.01, backend=backend),
        "adam (lr 0.05)": lambda p: _optim.Adam(p, lr=0.05, backend=backend),
    }
    rows = []
    for name, make in variants.items():
        curve, _ = _run(make, w0, loss, grad, steps)
        rows.append(Row(name, curve[-1], curve[-1], curve))
    return Lesson("adaptive", "curvatures from 0.01 to 100: one global step size against "
                  "per-coordinate ones", f"loss after {steps} steps", rows)


def clipping(steps=200, backend="auto"):
    h, loss, grad = _quadratic(np.linspace(1.0, 100.0, 20))
    w0 = np.ones(20)
    lr = 0.05  # above SGD's stability limit 2/100: the top coordinates grow 4x per step
    variants = {
        "no clipping": dict(),
        "clip_value=1": dict(clip_value=1.0),
        "clip_norm=1": dict(clip_norm=1.0),
    }
    rows = []
    for name, kw in variants.items():
        curve, _ = _run(lambda p: _optim.SGD(p, lr=lr, backend=backend, **kw), w0, loss, grad,
                        steps)
        peak = max(curve)
        rows.append(Row(name, peak, curve[-1], curve,
                        "diverged" if not math.isfinite(curve[-1]) else ""))
    return Lesson("clipping", "lr 0.05 on curvatures up to 100 (stable only below 0.02)",
                  "largest loss seen", rows)


def decay(steps=600, backend="auto", seed=0):
    h, loss, grad = _quadratic(np.linspace(0.5, 5.0, 20))
    w0 = np.ones(20) * 3
    noise = np.random.default_rng(seed).standard_normal((steps, 20))  # the same for every run
    lr = 0.1
    rows = []
    for kind in ("constant", "exponential", "step", "cosine"):
        sched = _demo.make_schedule(kind, lr, steps)
        curve, _ = _run(lambda p: _optim.SGD(p, lr=sched, backend=backend), w0, loss, grad,
                        steps, noise=noise)
        tail = float(np.mean(curve[-max(steps // 20, 1):]))
        rows.append(Row(kind, tail, curve[-1], curve))
    return Lesson("decay", "SGD on noisy gradients (unit Gaussian noise), lr 0.1",
                  "mean loss, last 5% of steps", rows)


def second_order(max_iters=2000, backend="auto", seed=0):
    rng = np.random.default_rng(seed)
    n, d = 200, 6
    x = rng.standard_normal((n, d)) * np.array([1, 1, 3, 0.3, 2, 0.5])
    y = (x @ rng.standard_normal(d) + 0.5 * rng.standard_normal(n) > 0).astype(np.float64)
    lam = 1e-2

    def parts(w):
        z = x @ w
        s = 1 / (1 + np.exp(-z))
        f = float(np.mean(np.logaddexp(0, z) - y * z) + 0.5 * lam * w @ w)
        g = x.T @ (s - y) / n + lam * w
        hess = (x.T * (s * (1 - s))) @ x / n + lam * np.eye(d)
        return f, g, hess

    rows = []
    for name in ("gradient descent", "damped newton"):
        w = np.zeros(d)
        if name == "damped newton":
            opt = _optim.Newton([w], lr=1.0, damping=1e-4, backend=backend)
        else:
            # 1/L with L the largest curvature the loss can have (s(1-s) <= 1/4)
            lr = 1.0 / (np.linalg.eigvalsh(x.T @ x / n).max() / 4 + lam)
            opt = _optim.SGD([w], lr=lr, backend=backend)
        curve, hit = [], None
        for t in range(max_iters):
            f, g, hess = parts(w)
            curve.append(f)
            if np.linalg.norm(g) < 1e-8:
                hit = t
                break
            opt.step([g], [hess]) if name == "damped newton" else opt.step([g])
        rows.append(Row(name, hit if hit is not None else math.inf, curve[-1], curve,
                        "" if hit is not None else f"not converged in {max_iters}"))
    return Lesson("second-order", "L2-regularised logistic regression, 200 points x 6 features",
                  "iterations to |grad| < 1e-8", rows)


# ------------------------------------------------------------------ the digits network

def _train_net(data, *, hidden, opt, lr, epochs, batch_size=32, seed=0, backend="auto",
               max_steps=None, **net_kw):
    """A fresh :class:`fastopt.apps.demo.MLP` trained by minibatches; returns it and the
    mean minibatch loss of every epoch.  Weights and batch order come from ``seed``."""
    rng = np.random.default_rng(seed)
    net = _demo.MLP((data.x_train.shape[1], *hidden, 10), rng, data.x_train.dtype, seed=seed,
                    layer_backend=backend if backend in ("numpy", "numba") else "auto", **net_kw)
    o = _demo.make_optimizer(opt, net.params, lr=lr, backend=backend)
    n = len(data.y_train)
    curve, steps = [], 0
    with np.errstate(over="ignore", invalid="ignore"):
        for _ in range(epochs):
            order = rng.permutation(n)
            losses = []
            for start in range(0, n, batch_size):
                if max_steps is not None and steps == max_steps:
                    break
                idx = order[start:start + batch_size]
                loss, grads = net.loss_and_grads(data.x_train[idx], data.y_train[idx])
                o.step(grads)
                losses.append(loss)
                steps += 1
            if losses:
                curve.append(float(np.mean(losses)))
    return net, curve


def batchnorm(epochs=2, backend="auto", seed=0, max_steps=None):
    data = _demo.load_digits_split(seed)
    rows = []
    for label, bn in (("plain", False), ("batchnorm", True)):
        net, curve = _train_net(data, hidden=(64,) * 6, opt="sgd", lr=0.3, epochs=epochs,
                                seed=seed, backend=backend, max_steps=max_steps, batchnorm=bn)
        loss = net.loss(data.x_train, data.y_train)
        rows.append(Row(label, loss, loss, curve,
                        f"test accuracy {100 * net.accuracy(data.x_test, data.y_test):.1f}%"))
    return Lesson("batchnorm", "6 hidden ReLU layers of 64 on the digits, SGD lr 0.3",
                  "train loss", rows)


def dropout(epochs=40, backend="auto", seed=0, n_train=300, noise=0.3, p=0.5):
    """Overfitting on purpose: 300 training digits, 30% of their labels replaced by random
    ones, one hidden layer of 256, Adam.

    Without dropout the network memorises the wrong labels: its training loss falls far
    below its test loss.  Dropout (p 0.5) keeps it from fitting every example by heart, so
    the gap -- test loss minus train loss, both in evaluation mode (no dropout) on the
    labels it trained on -- is smaller, and the test loss lower.  (On clean labels at this
    size both runs reach ~0 training loss and the gap hardly differs: the noise is what
    makes the effect robust across seeds.)
    """
    full = _demo.load_digits_split(seed)
    y = full.y_train[:n_train].copy()
    rng = np.random.default_rng(1000 + seed)
    flip = rng.random(n_train) < noise
    y[flip] = rng.integers(0, 10, int(flip.sum()))
    data = _demo.Split(full.x_train[:n_train], y, full.x_test, full.y_test)
    rows = []
    for label, rate in (("no dropout", 0.0), (f"dropout p={p:g}", p)):
        net, curve = _train_net(data, hidden=(256,), opt="adam", lr=1e-3, epochs=epochs,
                                batch_size=25, seed=seed, backend=backend, dropout=rate)
        train = net.loss(data.x_train, data.y_train)
        test = net.loss(data.x_test, data.y_test)
        rows.append(Row(label, test - train, train, curve,
                        f"test loss {test:.3f}, test accuracy "
                        f"{100 * net.accuracy(data.x_test, data.y_test):.1f}%"))
    return Lesson("dropout", f"{n_train} training digits, {100 * noise:.0f}% of labels random, "
                  f"256 hidden, Adam lr 1e-3, {epochs} epochs", "test - train loss", rows)


LESSONS = {
    "momentum": momentum,
    "adaptive": adaptive,
    "clipping": clipping,
    "decay": decay,
    "batchnorm": batchnorm,
    "dropout": dropout,
    "second-order": second_order,
}


def plot(lesson: Lesson, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for r in lesson.rows:
        c = np.asarray(r.curve, dtype=np.float64)
        c[~np.isfinite(c)] = np.nan
        ax.plot(np.arange(len(c)), c, label=r.variant)
    ax.set_yscale("log")
    ax.set_xlabel("epoch" if lesson.name in ("batchnorm", "dropout") else "step")
    ax.set_ylabel("loss")
    ax.set_title(f"lesson {lesson.name}: {lesson.title}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(name: str, backend: str = "auto", plot_path: str | None = None) -> int:
    lesson = LESSONS[name](backend=backend)
    print(f"lesson {lesson.name}: {lesson.title}")
    print()
    print(lesson.table())
    if plot_path:
        plot(lesson, plot_path)
        print(f"plot: {plot_path}")
    return 0
