"""``python -m fastopt demo``: train real networks on raw NumPy arrays with fastopt.

The main job of the package.  A multilayer perceptron learns scikit-learn's
handwritten digits (1,797 8x8 images that ship inside scikit-learn: nothing is
downloaded) with several optimizers in turn, and a table compares them: final
train loss, test accuracy, milliseconds per step and the share of each step
spent in the optimizer.  ``--xor`` trains the classic tiny XOR network instead.

The network is written by hand in NumPy (forward and backward, no framework):
ReLU hidden layers, softmax cross-entropy, He-initialised weights.  Every
optimizer starts from the same weights and sees the same minibatches (both
come from ``--seed``), so the rows of the table differ only by the optimizer.

Everything here is importable: :func:`load_digits_split`, :class:`MLP`,
:func:`make_optimizer`, :func:`train` and :func:`train_xor` are what
``tests/test_demo.py`` runs on every backend.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from .. import _backend, schedules
from .._optim import OPTIMIZERS

# --------------------------------------------------------------------------- optimizers

#: The demo's optimizer names -> (fastopt rule, constructor options, digits lr, XOR lr).
#: The learning rates were tuned by hand on this demo (seed 0, batch 32, 20 epochs for
#: digits; 1000 full-batch steps for XOR); they are the usual orders of magnitude:
#: adaptive methods near 1e-3, Lion 3-10x below Adam (as its paper advises), plain SGD
#: near 0.1 and heavy-ball momentum 0.9 about 10x below plain SGD.  LAMB's step is
#: ``lr * ||p||`` per tensor, so on XOR (where the loss keeps falling as the weights grow)
#: its weights grow like ``(1 + lr) ** t``: 0.05 overflows float32 within 1000 steps.
OPTIMIZER_SPECS = {
    "sgd":      ("sgd",      {},                                 0.1,   0.5),
    "momentum": ("sgd",      {"momentum": 0.9},                  0.01,  0.1),
    "nesterov": ("sgd",      {"momentum": 0.9, "nesterov": True}, 0.01, 0.1),
    "adam":     ("adam",     {},                                 1e-3,  0.05),
    "adamw":    ("adamw",    {"weight_decay": 1e-2},             1e-3,  0.05),
    "rmsprop":  ("rmsprop",  {},                                 1e-3,  0.02),
    "adagrad":  ("adagrad",  {},                                 0.03,  0.2),
    "lion":     ("lion",     {},                                 2e-4,  0.01),
    "adadelta": ("adadelta", {},                                 1.0,   1.0),
    "adamax":   ("adamax",   {},                                 2e-3,  0.05),
    "nadam":    ("nadam",    {},                                 1e-3,  0.05),
    "radam":    ("radam",    {},                                 1e-3,  0.05),
    "lamb":     ("lamb",     {},                                 1e-2,  1e-2),
    # (Rprop's lr is only its starting step size; it adapts per element from there)
    "asgd":      ("asgd",      {},                                0.1,   0.5),
    "rprop":     ("rprop",     {},                                1e-3,  1e-2),
    "adabelief": ("adabelief", {},                                1e-3,  0.05),
    "yogi":      ("yogi",      {},                                1e-3,  0.05),
    "ademamix":  ("ademamix",  {},                                1e-3,  0.05),
    # Muon on the hidden layers' weight matrices and AdamW on the rest (MuonAdamW below);
    # adjust_lr_fn="match_rms_adamw" scales Muon's step to AdamW's update size, so the two
    # share one learning rate (2e-3 was the best of 1e-3/2e-3/3e-3 on this demo)
    "muon":      ("muon",      {"weight_decay": 1e-2, "adjust_lr_fn": "match_rms_adamw"},
                  2e-3,  0.05),
    # Schedule-Free: trained at y, evaluated at x (``_evaluated``: eval() around each test)
    "sf-adamw":  ("schedule_free_adamw", {},                      2.5e-3, 0.05),
    "sf-sgd":    ("schedule_free_sgd",   {},                      0.1,   0.5),
    # LARS (optax's): weight matrices trust-scaled with weight decay, biases in a group with
    # weight_decay=0 and trust_ratio=False (LARSGroups below), as its docs advise.  Digits,
    # 20 epochs, lr tried: 0.1, 0.3, 0.5, 1, 2, 5, 10, 20 -> test accuracy 97.2, 97.8, 97.5,
    # 97.5, 94.7, 93.0, 27.6, 11.1 %; 0.5 sits in the flat middle.  XOR: 0.1-5 all solve it
    "lars":      ("lars",      {"weight_decay": 1e-4, "momentum": 0.9}, 0.5, 0.5),
    # Adafactor as torch.optim.Adafactor: lr 1e-2 (its default) capped by 1/sqrt(t), relative
    # step off, factored second moments for the weight matrices, a full one for the biases.
    # Digits lr tried: 3e-3, 1e-2, 3e-2 -> 98.9, 99.2, 98.6 %; XOR: 1e-2, 5e-2, 0.1 all solve
    # it, 5e-2 to a loss 100x lower than 1e-2 in 1000 steps
    "adafactor": ("adafactor", {},                                1e-2,  5e-2),
    # L-BFGS: full batch, one step per epoch of up to max_iter iterations with torch's
    # strong-Wolfe line search; lr 1 is the line search's first trial step (torch's default).
    # Tried max_iter 5/10/20 x history_size 10/20 x 10/20 epochs: every one reaches a train
    # loss < 1e-4 and 96.7 % test accuracy (the later steps stop at tolerance_change at once)
    "lbfgs":     ("lbfgs",     {"line_search_fn": "strong_wolfe", "max_iter": 20,
                                "history_size": 10},               1.0,   1.0),
}

#: Demo names whose optimizer keeps float32/float64 params and state only: no 16-bit or q8
#: rows (Muon and Adafactor keep matrix-shaped state, L-BFGS flat history vectors).
FLOAT_ONLY = ("muon", "adafactor", "lbfgs")

#: Demo names whose optimizer is closure-based (``step(closure)``, full batch): see :func:`train`.
CLOSURE_BASED = ("lbfgs",)

#: What ``python -m fastopt demo`` trains when ``--optimizer`` is not given.
DEFAULT_OPTIMIZERS = ("sgd", "momentum", "adam", "adamw", "rmsprop", "adagrad", "lion", "muon")


class MuonAdamW:
    """Muon on the hidden layers' weight matrices, AdamW on every other param, as Muon's
    authors recommend (and torch.optim.Muon's docs): the output layer's matrix (its columns
    are per-class vectors, not a map to orthogonalize), biases and BatchNorm gains go to
    AdamW.  Two fastopt optimizers, one per rule (a fastopt optimizer runs one rule over
    its param groups), stepped together with the same options and learning rate.

    ``hidden``: the positions in ``params`` of the matrices Muon gets (default: every 2-D
    param but the last one, the output layer).  A step is Muon's then AdamW's: a
    non-finite grad raises in the first that sees it; the demo treats that as divergence.
    """

    def __init__(self, params, *, lr, weight_decay=1e-2, adjust_lr_fn="match_rms_adamw",
                 hidden=None, backend="auto", **options):
        if hidden is None:
            mats = [i for i, p in enumerate(params) if p.ndim == 2]
            hidden = mats[:-1]
        self.hidden = list(hidden)
        self.rest = [i for i in range(len(params)) if i not in set(self.hidden)]
        self.muon = OPTIMIZERS["muon"]([params[i] for i in self.hidden], lr=lr,
                                       weight_decay=weight_decay, adjust_lr_fn=adjust_lr_fn,
                                       backend=backend, **options)
        self.adamw = OPTIMIZERS["adamw"]([params[i] for i in self.rest], lr=lr,
                                         weight_decay=weight_decay, backend=backend, **options)
        self.backend = self.muon.backend

    def step(self, grads):
        self.muon.step([grads[i] for i in self.hidden])
        return self.adamw.step([grads[i] for i in self.rest])

    def state_nbytes(self) -> int:
        return self.muon.state_nbytes() + self.adamw.state_nbytes()

class LARSGroups:
    """LARS over the network's params in two groups: the weight matrices (trust-scaled, with
    weight decay) and the 1-D params -- biases, BatchNorm gains -- with ``weight_decay=0`` and
    ``trust_ratio=False`` (plain momentum SGD), as optax's LARS masks them.  One optimizer;
    :meth:`step` takes the grads in the params' order and hands them on in the groups'.
    """

    def __init__(self, params, *, lr, weight_decay=1e-4, backend="auto", **options):
        self.mats = [i for i, p in enumerate(params) if p.ndim >= 2]
        self.rest = [i for i, p in enumerate(params) if p.ndim < 2]
        groups = [{"params": [params[i] for i in self.mats]}]
        if self.rest:
            groups.append({"params": [params[i] for i in self.rest], "weight_decay": 0.0,
                           "trust_ratio": False})
        self.opt = OPTIMIZERS["lars"](groups, lr=lr, weight_decay=weight_decay,
                                      backend=backend, **options)
        self.backend = self.opt.backend
        self._order = self.mats + self.rest

    def step(self, grads):
        return self.opt.step([grads[i] for i in self._order])

    def state_nbytes(self) -> int:
        return self.opt.state_nbytes()


SCHEDULES = ("constant", "exponential", "step", "cosine", "warmup")


def make_schedule(kind: str, lr: float, total_steps: int):
    """The learning rate of a run of ``total_steps`` steps: ``lr`` or a schedule peaking at it.

    ``exponential``: ``lr * 0.1 ** (t / T)`` (ends at a tenth of ``lr``);
    ``step``: ``lr`` times 0.3 at each third of the run;
    ``cosine``: half a cosine from ``lr`` to 0;
    ``warmup``: linear warm-up over the first 10% of the steps, then cosine to 0.
    """
    total_steps = max(int(total_steps), 1)
    if kind == "constant":
        return lr
    if kind == "exponential":
        return schedules.exponential_decay(lr, 0.1, steps=total_steps)
    if kind == "step":
        return schedules.step_decay(lr, step_size=max(total_steps // 3, 1), gamma=0.3)
    if kind == "cosine":
        return schedules.cosine_decay(lr, total_steps)
    if kind == "warmup":
        return schedules.warmup_cosine(lr, warmup=max(total_steps // 10, 1), steps=total_steps)
    raise ValueError(f"schedule: expected one of {SCHEDULES}, got {kind!r}")


def default_lr(name: str, xor: bool = False) -> float:
    """The demo's tuned learning rate of ``name`` (digits, or XOR)."""
    return OPTIMIZER_SPECS[name][3 if xor else 2]


def make_optimizer(name: str, params, *, lr=None, schedule="constant", total_steps=1,
                   clip_global_norm=None, backend="auto", xor=False, precision=None):
    """A fastopt optimizer for the demo name ``name`` (a key of :data:`OPTIMIZER_SPECS`).

    ``precision``: the precision options (``stochastic_rounding=True``, ...) of 16-bit params.
    """
    if name not in OPTIMIZER_SPECS:
        raise ValueError(f"optimizer: expected one of {sorted(OPTIMIZER_SPECS)}, got {name!r}")
    rule, opts, _, _ = OPTIMIZER_SPECS[name]
    lr = default_lr(name, xor) if lr is None else lr
    opts = dict(opts)
    if rule == "lbfgs":
        from .._lbfgs import LBFGS

        if schedule != "constant":
            raise ValueError(f"schedule: {name} takes a constant learning rate (L-BFGS's lr is "
                             f"its line search's first trial step), got {schedule!r}")
        if precision:
            raise ValueError(f"precision: {name} keeps float32/float64 params and history "
                             f"only, got {precision!r}")
        if clip_global_norm is not None:
            raise ValueError(f"clip_global_norm: {name} has no grad pipeline (torch's LBFGS "
                             f"has none), got {clip_global_norm!r}")
        return LBFGS(params, lr=lr, backend=backend, **opts)
    if clip_global_norm is not None:
        opts["clip_global_norm"] = clip_global_norm
    cls = {"muon": MuonAdamW, "lars": LARSGroups}.get(rule) or OPTIMIZERS[rule]
    return cls(params, lr=make_schedule(schedule, lr, total_steps), backend=backend,
               **opts, **(precision or {}))


def numpy_backends() -> dict:
    """Every backend that takes NumPy arrays: ``{name: None if available else reason}``."""
    out = {}
    for name, info in _backend.backends().items():
        try:
            _backend.resolve(name, "numpy")
        except TypeError:  # a backend of other arrays (cupy)
            continue
        except RuntimeError:
            pass
        out[name] = None if info["available"] else info["reason"]
    return out


# --------------------------------------------------------------------------- data

@dataclass
class Split:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def _shuffled_digits(seed: int):
    """scikit-learn's digits ``(x, y)`` in the order of ``seed``'s permutation."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise SystemExit("the demo needs scikit-learn for its data set: "
                         "pip install 'fastopt[demo]'") from e
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(y))
    return x[order], y[order]


def load_digits_split(seed: int = 0, test_fraction: float = 0.2, dtype=np.float32) -> Split:
    """scikit-learn's digits: shuffled by ``seed``, split, standardised by the train statistics."""
    x, y = _shuffled_digits(seed)
    x, y = x.astype(np.float64), y.astype(np.int64)
    n_test = int(round(len(y) * test_fraction))
    x_train, x_test = x[n_test:], x[:n_test]
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std[std == 0] = 1.0  # the corner pixels are always 0: leave them at 0, never divide by 0
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    return Split(np.ascontiguousarray(x_train, dtype), y[n_test:],
                 np.ascontiguousarray(x_test, dtype), y[:n_test])


# --------------------------------------------------------------------------- network

class MLP:
    """A ReLU multilayer perceptron with a softmax cross-entropy loss, by hand in NumPy.

    ``params`` is ``[W1, b1, W2, b2, ...]`` (``W`` of shape ``(fan_in, fan_out)``),
    the list the optimizer updates in place; with ``batchnorm`` every hidden layer
    normalises its pre-activation (``fastopt.layers.batch_norm_forward``) and its
    ``gamma, beta`` follow at the end of ``params``.  ``dropout=p`` drops hidden
    activations after the ReLU in training (``fastopt.layers.dropout_forward``, a
    seed per layer, the step counter as the hash's step).  :meth:`loss_and_grads`
    runs in training mode; :meth:`loss`, :meth:`predict` and :meth:`accuracy` in
    evaluation mode (running statistics, no dropout).
    """

    def __init__(self, sizes, rng, dtype=np.float32, *, batchnorm=False, dropout=0.0, seed=0,
                 layer_backend="auto"):
        self.sizes = tuple(sizes)
        self.params = []
        for fan_in, fan_out in zip(self.sizes[:-1], self.sizes[1:]):
            w = rng.standard_normal((fan_in, fan_out)) * math.sqrt(2.0 / fan_in)  # He init for ReLU
            self.params += [np.ascontiguousarray(w, dtype), np.zeros(fan_out, dtype)]
        self.batchnorm, self.dropout = bool(batchnorm), float(dropout)
        self.seed, self.step, self.layer_backend = int(seed), 0, layer_backend
        self.running = []  # per hidden layer: (running_mean, running_var)
        if self.batchnorm:
            for width in self.sizes[1:-1]:
                self.params += [np.ones(width, dtype), np.zeros(width, dtype)]
                self.running.append((np.zeros(width, dtype), np.ones(width, dtype)))

    def _bn_index(self, i):
        return 2 * (len(self.sizes) - 1) + 2 * i  # gamma of hidden layer i; beta follows

    def _forward(self, x, train=False):
        """The activations of every layer, and per hidden layer what backward needs.

        The caches are returned, never kept on ``self``: Hogwild threads share one network.
        """
        from .. import layers

        acts = [x]
        caches = []  # per hidden layer: (relu mask, batchnorm cache, dropout mask)
        n_layers = len(self.sizes) - 1
        for i in range(n_layers):
            w, b = self._compute(self.params[2 * i]), self._compute(self.params[2 * i + 1])
            z = acts[-1] @ w
            z += b
            if i < n_layers - 1:
                bn = drop = None
                if self.batchnorm:
                    g, beta = self.params[self._bn_index(i)], self.params[self._bn_index(i) + 1]
                    z, bn = layers.batch_norm_forward(z, g, beta, *self.running[i], 0.1, 1e-5,
                                                      train, backend=self.layer_backend)
                np.maximum(z, 0, out=z)
                relu = z > 0
                if train and self.dropout > 0:
                    z, drop = layers.dropout_forward(z, self.dropout, self.seed * 1024 + i,
                                                     self.step, backend=self.layer_backend)
                caches.append((relu, bn, drop))
            acts.append(z)
        return acts, caches

    @staticmethod
    def _compute(a):
        """16-bit weights are stored in 16 bits and computed with in float32 (mixed precision:
        the grads come out float32, which fastopt takes for 16-bit params)."""
        return a.astype(np.float32) if a.dtype.itemsize == 2 else a

    @staticmethod
    def _log_softmax(logits):
        shifted = logits - logits.max(axis=1, keepdims=True)  # exp never overflows
        return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))

    def loss(self, x, y) -> float:
        """The mean cross-entropy over ``(x, y)``."""
        logp = self._log_softmax(self._forward(x)[0][-1])
        return float(-logp[np.arange(len(y)), y].mean()) + 0.0  # + 0.0: never -0.0

    def predict(self, x):
        return self._forward(x)[0][-1].argmax(axis=1)

    def accuracy(self, x, y) -> float:
        return float((self.predict(x) == y).mean())

    def loss_and_grads(self, x, y):
        """``(loss, grads)``: the mean cross-entropy and its gradient, one array per param."""
        from .. import layers

        self.step += 1  # dropout's hash step: a new mask every call
        acts, caches = self._forward(x, train=True)
        logp = self._log_softmax(acts[-1])
        n = len(y)
        loss = float(-logp[np.arange(n), y].mean())
        # d loss / d logits = (softmax - onehot) / n
        delta = np.exp(logp)
        delta[np.arange(n), y] -= 1.0
        delta /= n
        grads = [None] * len(self.params)
        for i in range(len(self.sizes) - 2, -1, -1):
            grads[2 * i] = acts[i].T @ delta
            grads[2 * i + 1] = delta.sum(axis=0)
            if i:
                delta = delta @ self._compute(self.params[2 * i]).T
                relu, bn, drop = caches[i - 1]
                if drop is not None:
                    delta = layers.dropout_backward(delta, drop, backend=self.layer_backend)
                delta *= relu  # ReLU'
                if bn is not None:
                    delta, dg, db = layers.batch_norm_backward(delta, bn)
                    grads[self._bn_index(i - 1)], grads[self._bn_index(i - 1) + 1] = dg, db
        return loss, grads


# --------------------------------------------------------------------------- progress

class _PlainBar:
    """The stand-in for tqdm when it is not installed: one line on stderr, redrawn every 5%."""

    def __init__(self, total, desc):
        self.total, self.desc, self.n, self.postfix = max(total, 1), desc, 0, ""
        self._shown = -1
        self._tty = sys.stderr.isatty()

    def update(self, k=1):
        self.n += k
        pct = 100 * self.n // self.total
        if self._tty and pct // 5 != self._shown:
            self._shown = pct // 5
            self._draw(end="")

    def set_postfix_str(self, s):
        self.postfix = s

    def _draw(self, end):
        filled = 20 * self.n // self.total
        sys.stderr.write(f"\r{self.desc:>10} [{'#' * filled}{'.' * (20 - filled)}] "
                         f"{100 * self.n // self.total:3d}% {self.postfix}{end}")
        sys.stderr.flush()

    def close(self):
        self._draw(end="\n")


def _progress_bar(total, desc, enabled):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return _PlainBar(total, desc)
    return tqdm(total=total, desc=f"{desc:>10}", unit="step", leave=True, file=sys.stderr,
                dynamic_ncols=True)


# --------------------------------------------------------------------------- training

def _single_threaded_blas():
    """Run the network's matrix products on one BLAS thread while training.

    They are tiny (32 x 64 @ 64 x 128): waking OpenBLAS's worker threads costs
    more than the product.  Measured on the 2-core machine: 0.13 ms per
    forward + backward with one thread, 2.6-3.5 ms with two.  threadpoolctl comes
    with scikit-learn (the demo's data); without it the BLAS keeps its threads.
    Only the BLAS is limited: a backend's own threads (numba's) are untouched.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _training(fn):
    """One BLAS thread, and no overflow warnings: a diverging run is reported in the table
    (the optimizer's non-finite check stops it), not by NumPy warnings on the way there."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _single_threaded_blas(), np.errstate(over="ignore", invalid="ignore"):
            return fn(*args, **kwargs)
    return wrapper


class _StepTimes:
    """Per-step time and optimizer share of a run with ``steps``, ``step_s``, ``opt_s``."""

    @property
    def ms_per_step(self) -> float:
        return 1e3 * self.step_s / max(self.steps, 1)

    @property
    def opt_share(self) -> float:
        return self.opt_s / self.step_s if self.step_s > 0 else 0.0


@dataclass
class Result(_StepTimes):
    """One optimizer's run.  Times are of the training steps only (see :func:`train`)."""

    name: str
    lr: float
    backend: str
    initial_loss: float
    train_loss: float
    test_acc: float
    steps: int
    step_s: float          # forward + backward + optimizer, summed over the steps
    opt_s: float           # the optimizer's part of step_s
    warmup_s: float = 0.0  # the untimed first step on scratch copies (the JIT compile on numba)
    epoch_losses: list = field(default_factory=list)  # mean minibatch loss of each epoch
    epoch_test_acc: list = field(default_factory=list)
    diverged_at: int | None = None  # the step whose gradient was not finite (training stopped)
    state_bytes: int = 0   # the optimizer's state_nbytes() at the end of the run
    n_params: int = 0      # parameter elements of the network



def _warm_up(name, params, grads, **opt_kwargs) -> float:
    """One step on scratch copies, so that a JIT compile (numba) is not timed as a step.

    The copies have the real shapes, dtypes and options, so the compiled
    specialisation is the one the training run uses.
    """
    t0 = time.perf_counter()
    scratch = [p.copy() for p in params]
    opt = make_optimizer(name, scratch, **opt_kwargs)
    if name in CLOSURE_BASED:  # one iteration on a closure that returns the same grads
        opt.param_groups[0]["max_iter"] = opt.param_groups[0]["max_eval"] = 1
        opt.step(lambda: (1.0, [g.copy() for g in grads]))
    else:
        opt.step([g.copy() for g in grads])
    return time.perf_counter() - t0


def _closure_step(opt, net, x, y):
    """One step of a closure-based optimizer on ``(x, y)``: ``(first loss, seconds spent
    in the closure)``; a non-finite loss or grad raises FloatingPointError (divergence)."""
    spent = 0.0

    def closure():
        nonlocal spent
        t0 = time.perf_counter()
        loss, grads = net.loss_and_grads(x, y)
        spent += time.perf_counter() - t0
        if not (math.isfinite(loss) and all(np.isfinite(g).all() for g in grads)):
            raise FloatingPointError("non-finite loss or grads")
        return loss, grads

    loss = opt.step(closure)
    return float(loss), spent


@_training
def train(name: str, data: Split, *, epochs=20, batch_size=32, hidden=(128, 128), lr=None,
          schedule="constant", clip_global_norm=None, backend="auto", seed=0, max_steps=None,
          progress=False, param_dtype=None, precision=None, label=None, batchnorm=False,
          dropout=0.0) -> Result:
    """Train a fresh :class:`MLP` on ``data`` with the demo optimizer ``name``.

    The weights and the minibatch order come from ``seed`` alone, so every
    optimizer of one run starts from the same point.  ``max_steps`` stops early
    (tests).  ``step_s`` times the forward, backward and optimizer step of every
    minibatch (not the batch gathering, the evaluation or the progress bar).
    ``param_dtype`` (float16/bfloat16) stores the weights in 16 bits (computed with in
    the data's float32) and ``precision`` holds the optimizer's precision options;
    ``label`` names the row (default ``name``).
    ``batchnorm``/``dropout``: the hidden layers' BatchNorm and dropout probability
    (:class:`MLP`), run on the optimizer's backend where it takes NumPy arrays.
    """
    dtype = data.x_train.dtype if param_dtype is None else param_dtype
    rng = np.random.default_rng(seed)
    n_classes = int(max(data.y_train.max(), data.y_test.max())) + 1
    net = MLP((data.x_train.shape[1], *hidden, n_classes), rng, dtype, batchnorm=batchnorm,
              dropout=dropout, seed=seed,
              layer_backend=backend if backend in ("numpy", "numba") else "auto")
    n = len(data.y_train)
    closure_based = name in CLOSURE_BASED
    if closure_based:  # full batch: one step (up to max_iter iterations) per epoch
        batch_size = n
    per_epoch = math.ceil(n / batch_size)
    total = epochs * per_epoch if max_steps is None else min(max_steps, epochs * per_epoch)
    opt_kwargs = dict(lr=lr, schedule=schedule, total_steps=total,
                      clip_global_norm=clip_global_norm, backend=backend, precision=precision)
    opt = make_optimizer(name, net.params, **opt_kwargs)
    xor = False
    base_lr = default_lr(name, xor) if lr is None else lr  # the schedule's peak
    initial_loss = net.loss(data.x_train, data.y_train)

    if batchnorm or dropout:  # a training pass would move the running stats and the step
        grads0 = [np.zeros_like(p) for p in net.params]
    else:
        _, grads0 = net.loss_and_grads(data.x_train[:batch_size], data.y_train[:batch_size])
    warmup_s = _warm_up(name, net.params, grads0, **opt_kwargs)

    bar = _progress_bar(total, name, progress)
    step_s = opt_s = 0.0
    steps = 0
    diverged_at = None
    epoch_losses, epoch_acc = [], []
    clock = time.perf_counter
    for _ in range(epochs):
        order = rng.permutation(n)
        losses = []
        for start in range(0, n, batch_size):
            if steps == total:
                break
            idx = order[start:start + batch_size]
            xb, yb = data.x_train[idx], data.y_train[idx]
            t0 = clock()
            try:
                if closure_based:  # the optimizer's part: the step less its closure calls
                    loss, in_closure = _closure_step(opt, net, xb, yb)
                    t1 = t0 + in_closure
                else:
                    loss, grads = net.loss_and_grads(xb, yb)
                    t1 = clock()
                    opt.step(grads)
            except FloatingPointError:  # nothing was written; the run has diverged
                diverged_at = steps + 1
                break
            t2 = clock()
            step_s += t2 - t0
            opt_s += t2 - t1
            steps += 1
            losses.append(loss)
            if bar is not None:
                bar.update(1)
        if losses:
            epoch_losses.append(float(np.mean(losses)))
            with _evaluated(opt):
                epoch_acc.append(net.accuracy(data.x_test, data.y_test))
            if bar is not None:
                bar.set_postfix_str(f"loss {epoch_losses[-1]:.4f} test {100 * epoch_acc[-1]:.1f}%")
        if steps == total or diverged_at:
            break
    if bar is not None:
        bar.close()
    if _schedule_free(opt):  # the trained params: x for a Schedule-Free run
        opt.eval()
    return Result(name=label or name, lr=base_lr, backend=opt.backend, initial_loss=initial_loss,
                  train_loss=net.loss(data.x_train, data.y_train),
                  test_acc=net.accuracy(data.x_test, data.y_test), steps=steps, step_s=step_s,
                  opt_s=opt_s, warmup_s=warmup_s, epoch_losses=epoch_losses,
                  epoch_test_acc=epoch_acc, diverged_at=diverged_at,
                  state_bytes=opt.state_nbytes(), n_params=sum(p.size for p in net.params))


def _schedule_free(opt) -> bool:
    """Whether ``opt`` trains at one point and evaluates at another (``train()``/``eval()``)."""
    return callable(getattr(opt, "eval", None)) and callable(getattr(opt, "train", None))


@contextlib.contextmanager
def _evaluated(opt):
    """The params at the point to evaluate: a Schedule-Free optimizer's x (``eval()``, then
    ``train()`` again); any other optimizer's params as they are."""
    if _schedule_free(opt):
        opt.eval()
    try:
        yield
    finally:
        if _schedule_free(opt):
            opt.train()


# --------------------------------------------------------------------------- XOR

# the two bits coded as -1/+1: with 0/1 the input (0, 0) reaches the ReLUs as their biases
# alone, and a run whose biases go negative never separates it (LAMB did, 3 seeds in 4)
XOR_X = np.array([[-1.0, -1.0], [-1.0, 1.0], [1.0, -1.0], [1.0, 1.0]])
XOR_Y = np.array([0, 1, 1, 0])


@dataclass
class XorResult:
    name: str
    lr: float
    backend: str
    initial_loss: float
    loss: float
    accuracy: float
    probabilities: list  # P(class 1) for the four inputs, in XOR_X order
    steps: int
    losses: list = field(default_factory=list)
    diverged_at: int | None = None


@_training
def train_xor(name: str, *, steps=1000, hidden=8, lr=None, schedule="constant",
              clip_global_norm=None, backend="auto", seed=0, dtype=np.float32) -> XorResult:
    """The tiny network that XOR needs (2 -> ``hidden`` ReLU -> 2), full-batch steps."""
    x = XOR_X.astype(dtype)
    net = MLP((2, hidden, 2), np.random.default_rng(seed), dtype)
    xor = True
    opt = make_optimizer(name, net.params, lr=lr, schedule=schedule, total_steps=steps,
                         clip_global_norm=clip_global_norm, backend=backend, xor=xor)
    base_lr = default_lr(name, xor) if lr is None else lr  # the schedule's peak
    initial_loss = net.loss(x, XOR_Y)
    losses = []
    diverged_at = None
    for t in range(steps):
        try:
            if name in CLOSURE_BASED:
                loss, _ = _closure_step(opt, net, x, XOR_Y)
            else:
                loss, grads = net.loss_and_grads(x, XOR_Y)
                opt.step(grads)
        except FloatingPointError:  # nothing was written; the run has diverged
            diverged_at = t + 1
            break
        losses.append(loss)
    if _schedule_free(opt):
        opt.eval()
    logits = net._forward(x)[0][-1]
    prob = np.exp(MLP._log_softmax(logits))[:, 1]
    return XorResult(name=name, lr=base_lr, backend=opt.backend, initial_loss=initial_loss,
                     loss=net.loss(x, XOR_Y), accuracy=net.accuracy(x, XOR_Y),
                     probabilities=[float(p) for p in prob], steps=len(losses), losses=losses,
                     diverged_at=diverged_at)


# --------------------------------------------------------------------------- sparse

#: The digits' pixel values are integers 0..16: 17 intensity levels per pixel.
DIGIT_LEVELS = 17


def load_digit_tokens(seed: int = 0, test_fraction: float = 0.2):
    """The digits as bags of tokens: ``(tokens_train, y_train, tokens_test, y_test)``.

    Image pixel ``j`` at intensity level ``v`` (0..16) is token ``17 * j + v``, one of
    64 x 17 = 1088 rows of an embedding table; every image is 64 tokens (int64).  The split
    and its order are :func:`load_digits_split`'s for the same ``seed``.
    """
    x, y = _shuffled_digits(seed)
    levels = np.rint(x).astype(np.int64)
    tokens = DIGIT_LEVELS * np.arange(x.shape[1]) + levels
    y = y.astype(np.int64)
    n_test = int(round(len(y) * test_fraction))
    return tokens[n_test:], y[n_test:], tokens[:n_test], y[:n_test]


class EmbeddingBag:
    """An embedding table and a linear classifier: an image's vector is the mean of its
    tokens' rows (``table[tokens].mean(1)``), its logits that vector times ``W`` plus ``b``.
    ``params`` is ``[table, W, b]``; :meth:`loss_and_grads` gives the table's grad as
    ``(indices, values)`` (one row per token occurrence, duplicates left for the optimizer to
    sum), the others dense."""

    def __init__(self, n_rows, dim, n_classes, rng, dtype=np.float32):
        self.table = np.ascontiguousarray(rng.standard_normal((n_rows, dim)), dtype)
        self.w = np.ascontiguousarray(rng.standard_normal((dim, n_classes)) / math.sqrt(dim),
                                      dtype)
        self.b = np.zeros(n_classes, dtype)
        self.params = [self.table, self.w, self.b]

    def logits(self, tokens):
        return self.table[tokens].mean(axis=1) @ self.w + self.b

    def loss(self, tokens, y) -> float:
        logp = MLP._log_softmax(self.logits(tokens))
        return float(-logp[np.arange(len(y)), y].mean()) + 0.0

    def accuracy(self, tokens, y) -> float:
        return float((self.logits(tokens).argmax(axis=1) == y).mean())

    def loss_and_grads(self, tokens, y):
        """``(loss, (indices, values), dW, db)`` of the mean cross-entropy over the batch."""
        n, k = tokens.shape
        h = self.table[tokens].mean(axis=1)
        logp = MLP._log_softmax(h @ self.w + self.b)
        loss = float(-logp[np.arange(n), y].mean())
        delta = np.exp(logp)
        delta[np.arange(n), y] -= 1.0
        delta /= n
        dh = (delta @ self.w.T) / k  # each of an image's k tokens gets 1/k of its vector's grad
        values = np.repeat(dh.astype(self.table.dtype), k, axis=0)
        return loss, (tokens.reshape(-1), values), h.T @ delta, delta.sum(axis=0)


@dataclass
class SparseResult(_StepTimes):
    name: str
    initial_loss: float
    train_loss: float
    test_acc: float
    steps: int
    rows_per_step: float   # table rows the optimizer read and wrote per step (mean)
    step_s: float          # forward + backward + optimizer, summed over the steps
    opt_s: float
    backend: str = ""


#: ``--sparse``'s learning rate for both the table and the classifier.  Tried 3e-3, 1e-2,
#: 3e-2 (10 epochs, dim 16 and 32): test accuracy 76-87, 90-93, 92-94 %, SparseAdam and dense
#: Adam within 0.6 points of each other at every setting; 3e-2 and dim 32 were the best.
SPARSE_LR = 3e-2


@_training
def train_sparse(sparse: bool, *, epochs=10, batch_size=32, dim=32, lr=SPARSE_LR, seed=0,
                 backend="auto", max_steps=None, data=None) -> SparseResult:
    """Train :class:`EmbeddingBag` on the digit tokens: the table with SparseAdam (``sparse``:
    only the rows of the batch's tokens) or with dense Adam (a dense grad, zero outside those
    rows: every row's moments decay and every row moves each step), ``W, b`` with Adam.
    Both runs start from the same weights and see the same batches (``seed``)."""
    from .._sparse import SparseAdam

    tok_train, y_train, tok_test, y_test = load_digit_tokens(seed) if data is None else data
    rng = np.random.default_rng(seed)
    n_rows = 64 * DIGIT_LEVELS
    net = EmbeddingBag(n_rows, dim, 10, rng)
    head = OPTIMIZERS["adam"]([net.w, net.b], lr=lr, backend=backend)
    table_opt = (SparseAdam([net.table], lr=lr, backend=backend) if sparse
                 else OPTIMIZERS["adam"]([net.table], lr=lr, backend=backend))
    initial = net.loss(tok_train, y_train)
    n = len(y_train)
    total = epochs * math.ceil(n / batch_size)
    if max_steps is not None:
        total = min(total, max_steps)
    steps, rows, step_s, opt_s = 0, 0, 0.0, 0.0
    clock = time.perf_counter
    while steps < total:
        order = rng.permutation(n)
        for start in range(0, n, batch_size):
            if steps == total:
                break
            idx = order[start:start + batch_size]
            tb, yb = tok_train[idx], y_train[idx]
            t0 = clock()
            loss, (ri, rv), dw, db = net.loss_and_grads(tb, yb)
            if not sparse:
                dense = np.zeros_like(net.table)
                np.add.at(dense, ri, rv)
            t1 = clock()
            table_opt.step([(ri, rv)] if sparse else [dense])
            head.step([dw, db])
            t2 = clock()
            step_s += t2 - t0
            opt_s += t2 - t1
            rows += len(np.unique(ri)) if sparse else n_rows
            steps += 1
    return SparseResult(name="SparseAdam" if sparse else "Adam (dense)", initial_loss=initial,
                        train_loss=net.loss(tok_train, y_train),
                        test_acc=net.accuracy(tok_test, y_test), steps=steps,
                        rows_per_step=rows / max(steps, 1), step_s=step_s, opt_s=opt_s,
                        backend=table_opt.backend)


# --------------------------------------------------------------------------- plotting

def plot_results(results, path, title):
    """Loss curves of every optimizer on one figure (and the test accuracy beside them)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; a PNG file is the whole point
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    xor = isinstance(results[0], XorResult)
    fig, axes = plt.subplots(1, 1 if xor else 2, figsize=(6 if xor else 11, 4.2), squeeze=False)
    ax = axes[0][0]
    for r in results:
        if xor:
            ax.plot(np.arange(1, len(r.losses) + 1), r.losses, label=f"{r.name} (lr {r.lr:g})")
        else:
            ax.plot(np.arange(1, len(r.epoch_losses) + 1), r.epoch_losses, marker=".",
                    label=f"{r.name} (lr {r.lr:g})")
    ax.set_yscale("log")
    ax.set_xlabel("step" if xor else "epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("train loss (cross-entropy)" + ("" if xor else ", epoch mean"))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    if not xor:
        ax2 = axes[0][1]
        for r in results:
            ax2.plot(np.arange(1, len(r.epoch_test_acc) + 1), 100 * np.asarray(r.epoch_test_acc),
                     marker=".", label=r.name)
        ax2.set_xlabel("epoch")
        ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax2.set_ylabel("test accuracy (%)")
        lo = min(min(r.epoch_test_acc) for r in results if r.epoch_test_acc)
        ax2.set_ylim(max(0.0, 100 * lo - 2), 100.5)
        ax2.grid(True, alpha=0.3)
        ax2.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- command line

def _parse_optimizers(values) -> list:
    names = []
    for v in values or ():
        for tok in v.split(","):
            tok = tok.strip().lower()
            if not tok:
                continue
            if tok == "all":
                names += [n for n in OPTIMIZER_SPECS if n not in names]
                continue
            if tok not in OPTIMIZER_SPECS:
                raise argparse.ArgumentTypeError(
                    f"--optimizer: expected names from {', '.join(OPTIMIZER_SPECS)} (or 'all'), "
                    f"got {tok!r}")
            if tok not in names:
                names.append(tok)
    return names or list(DEFAULT_OPTIMIZERS)


def _parse_lr(text) -> dict:
    """``--lr 0.01`` (every optimizer) or ``--lr adam=2e-3,sgd=0.2`` -> ``{name or '*': lr}``."""
    out = {}
    for tok in text.split(","):
        key, sep, val = tok.strip().rpartition("=")
        key = key.strip().lower() if sep else "*"
        try:
            lr = float(val)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a float or NAME=FLOAT pairs, got {text!r}")
        if not (math.isfinite(lr) and lr > 0):
            raise argparse.ArgumentTypeError(
                f"a learning rate must be a finite number > 0, got {val!r}")
        if key != "*" and key not in OPTIMIZER_SPECS:
            raise argparse.ArgumentTypeError(f"unknown optimizer {key!r} in --lr")
        out[key] = lr
    return out


def _positive_float(text):
    v = float(text)
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return v


def _probability(text):
    v = float(text)
    if not (0.0 <= v < 1.0):
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1), got {text!r}")
    return v


def _positive_int(text):
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return v


def register(sub) -> None:
    """Add the ``demo`` subcommand to the CLI's subparsers."""
    p = sub.add_parser(
        "demo", help="train an MLP on scikit-learn's digits (or XOR) with several optimizers",
        description="Train a hand-written NumPy MLP on scikit-learn's digits with several "
                    "fastopt optimizers and compare them (train loss, test accuracy, ms per "
                    "step, the optimizer's share of the step).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--optimizer", "-o", nargs="+", metavar="NAME",
                   help=f"one or several of {', '.join(OPTIMIZER_SPECS)} or 'all' (space or comma "
                        f"separated); default: {' '.join(DEFAULT_OPTIMIZERS)}")
    p.add_argument("--backend", "-b", default="auto", choices=("auto",) + _backend.BACKEND_NAMES,
                   help="kernel backend; auto = numba when it imports, else numpy")
    p.add_argument("--epochs", "-e", type=_positive_int, default=None,
                   help="passes over the training set (default 20; with --xor: full-batch steps, "
                        "default 1000)")
    p.add_argument("--lr", type=_parse_lr, default=None,
                   help="learning rate for every optimizer, or NAME=LR pairs (adam=2e-3,sgd=0.2); "
                        "default: a tuned rate per optimizer")
    p.add_argument("--schedule", choices=SCHEDULES, default="constant",
                   help="learning-rate schedule over the run (fastopt.schedules), peaking at --lr")
    p.add_argument("--clip-global-norm", type=_positive_float, default=None, metavar="C",
                   help="clip the global gradient norm to C before each update")
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.add_argument("--hidden", type=_positive_int, nargs="+", default=[128, 128],
                   help="hidden layer widths")
    p.add_argument("--dtype", choices=("float32", "float64", "bfloat16"), default="float32",
                   help="bfloat16: each optimizer trains bfloat16 weights (computed with in "
                        "float32) three ways -- plain round-to-nearest, stochastic rounding, "
                        "float32 master weights -- beside a float32 run (needs ml_dtypes)")
    p.add_argument("--state", choices=("float32", "q8"), default="float32",
                   help="q8: Adam (or --optimizer) with 8-bit block-quantized moments beside "
                        "float32 ones, and bfloat16 weights + q8 moments + stochastic rounding; "
                        "the table adds the state's bytes per parameter")
    p.add_argument("--seed", type=int, default=0, help="data split, initial weights, batch order")
    p.add_argument("--plot", metavar="FILE.png", default=None,
                   help="save the loss curves of every optimizer on one figure (matplotlib)")
    p.add_argument("--xor", action="store_true", help="train the small XOR network instead")
    p.add_argument("--torch", action="store_true",
                   help="train a PyTorch MLP with torch.optim and with fastopt.torch side by side "
                        "(SGD+momentum and Adam; needs torch)")
    from .lessons import LESSONS

    p.add_argument("--lesson", choices=tuple(LESSONS), default=None,
                   help="instead of the optimizer table: one technique's variants side by side "
                        "(fastopt.apps.lessons); --plot draws its loss curves")
    p.add_argument("--sparse", action="store_true",
                   help="instead of the MLP: an embedding-bag model of the digits (64 pixels x "
                        "17 intensity levels = 1088 table rows, an image the mean of its 64 "
                        "tokens' rows, then a linear layer); the table trained by SparseAdam "
                        "(only the batch's rows) beside dense Adam")
    p.add_argument("--batchnorm", action="store_true",
                   help="BatchNorm on every hidden layer (fastopt.layers)")
    p.add_argument("--dropout", type=_probability, default=0.0, metavar="P",
                   help="drop hidden activations with probability P in training (fastopt.layers)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="numba backend: threads of its kernels (numba.set_num_threads); "
                        "default: 1 when the model is smaller than two kernel parts (the default "
                        "MLP is), else numba's (NUMBA_NUM_THREADS)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--distributed", action="store_true",
                   help="data-parallel on MPI with the ZeRO-1 ShardedOptimizer (run under "
                        "mpiexec -n W python -m mpi4py -m fastopt demo --distributed)")
    p.add_argument("--hogwild", type=_positive_int, default=None, metavar="N",
                   help="N threads train one MLP with one optimizer, lock-free (fastopt.hogwild)")
    p.set_defaults(func=run)


def _numba_threads(requested, n_elements):
    """Set the numba backend's thread count for the run; returns it (or an error message).

    Without ``--threads``: one thread when the whole model is below two of the
    kernel's parts (``MIN_PER_THREAD`` elements each).  The kernel runs such a
    call as one part anyway, but a ``parallel=True`` launch still wakes the
    whole pool, and on a busy 2-core machine that wake-up dominated the step:
    measured with the default MLP (26,634 parameters) at load average 6,
    7-22 ms per step with numba's 2 threads against 0.4-0.7 ms with one.
    """
    import numba

    from ..kernels import numba_cpu

    most = numba.config.NUMBA_NUM_THREADS
    if requested is None:
        per_part = getattr(numba_cpu, "MIN_PER_THREAD", 32768)
        requested = 1 if n_elements < 2 * per_part else numba.get_num_threads()
    elif requested > most:
        return f"--threads: expected at most NUMBA_NUM_THREADS={most}, got {requested}"
    numba.set_num_threads(requested)
    return requested


def _lr_for(lrs, name):
    if not lrs:
        return None
    return lrs.get(name, lrs.get("*"))


def run(args) -> int:
    """The ``demo`` command."""
    t_start = time.perf_counter()
    if getattr(args, "torch", False):
        from .torch_demo import run_torch

        return run_torch(args)
    try:
        names = _parse_optimizers(args.optimizer)
    except argparse.ArgumentTypeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        backend = _backend.resolve(args.backend, "numpy")
    except (TypeError, RuntimeError) as e:
        print(f"error: --backend {args.backend}: {e} (the demo trains on NumPy arrays)",
              file=sys.stderr)
        return 2
    if args.lesson:
        from .lessons import run as run_lesson
        return run_lesson(args.lesson, backend, args.plot)
    if getattr(args, "sparse", False):
        return _run_sparse(args, backend, t_start)
    xor = args.xor
    sizes = (2, 8, 2) if xor else (64, *args.hidden, 10)
    threads = None
    if backend == "numba":
        threads = _numba_threads(args.threads, sum(a * b + b for a, b in zip(sizes, sizes[1:])))
        if isinstance(threads, str):
            print(f"error: {threads}", file=sys.stderr)
            return 2
    q8 = getattr(args, "state", "float32") == "q8"
    if q8 and (xor or args.distributed or args.hogwild or args.batchnorm or args.dropout
               or args.dtype != "float32"):
        print("error: --state q8 trains the float32 digits MLP only (not --xor, --distributed, "
              "--hogwild, --batchnorm, --dropout or --dtype other than float32; it adds a "
              "bfloat16 + q8 + stochastic rounding row itself)", file=sys.stderr)
        return 2
    if q8 and args.optimizer is None:
        names = ["adam"]
    if args.dtype == "bfloat16" and (xor or args.distributed or args.hogwild or args.batchnorm
                                     or args.dropout):
        print("error: --dtype bfloat16 trains the digits MLP only (not --xor, --distributed, "
              "--hogwild, --batchnorm or --dropout)", file=sys.stderr)
        return 2
    if (args.distributed or args.hogwild) and (args.batchnorm or args.dropout):
        print("error: --batchnorm and --dropout are not available with --distributed/--hogwild",
              file=sys.stderr)
        return 2
    if args.distributed or args.hogwild:
        from .distributed_demo import run as run_parallel
        return run_parallel(args, backend)
    if xor:
        if args.batchnorm or args.dropout:
            print("error: --batchnorm and --dropout apply to the digits network, not --xor",
                  file=sys.stderr)
            return 2
        return _run_xor(args, names, backend, t_start)

    epochs = args.epochs or 20
    variants = [(None, None, "")]  # (param dtype, precision options, row suffix)
    if args.dtype == "bfloat16":
        from ..precision import bfloat16_dtype
        try:
            bf16 = bfloat16_dtype()
        except ImportError as e:
            print(f"error: --dtype bfloat16: {e}", file=sys.stderr)
            return 2
        # 16-bit params run where their kernels are: backend 'auto' picks numpy for them
        variants += [(bf16, {}, " bf16"), (bf16, {"stochastic_rounding": True}, " bf16+SR"),
                     (bf16, {"master_weights": True}, " bf16+master")]
    q8_note = None
    if q8:
        # beside the float32-state run: 8-bit moments, and bfloat16 weights with 8-bit
        # moments and stochastic rounding (about 10 bytes per element moved per step)
        variants += [(None, {"state_dtype": "q8"}, " q8")]
        from ..precision import bfloat16_dtype
        try:
            variants += [(bfloat16_dtype(), {"state_dtype": "q8", "stochastic_rounding": True},
                          " bf16+q8+SR")]
        except ImportError as e:
            q8_note = f"(no bf16+q8+SR row: {e})"
    dtype = np.dtype("float32" if args.dtype == "bfloat16" else args.dtype)
    data = load_digits_split(args.seed, dtype=dtype)
    per_epoch = math.ceil(len(data.y_train) / args.batch_size)
    print(f"fastopt demo: MLP {'-'.join(map(str, sizes))} on scikit-learn digits "
          f"({len(data.y_train)} train / {len(data.y_test)} test images), {dtype.name}")
    print(f"backend {backend}, {epochs} epochs x {per_epoch} steps of batch {args.batch_size}, "
          f"schedule {args.schedule}"
          + (f", clip_global_norm {args.clip_global_norm:g}" if args.clip_global_norm else "")
          + (f", numba threads {threads}" if threads else "")
          + (", batchnorm" if args.batchnorm else "")
          + (f", dropout {args.dropout:g}" if args.dropout else "")
          + f", seed {args.seed}")
    results = []
    skipped = []
    closure_skipped = []
    if args.schedule != "constant" or args.clip_global_norm:
        # L-BFGS's lr is its line search's first trial step, and it has no grad pipeline
        closure_skipped = [n for n in names if n in CLOSURE_BASED]
        names = [n for n in names if n not in CLOSURE_BASED]
        if not names:
            print(f"error: {', '.join(closure_skipped)} takes neither --schedule nor "
                  f"--clip-global-norm (a constant lr, no grad pipeline)", file=sys.stderr)
            return 2
    for name in names:
        for pdtype, precision, suffix in variants:
            if name in FLOAT_ONLY and (pdtype is not None or precision):
                skipped.append(name)  # float32/float64 params and state only
                continue
            results.append(train(name, data, epochs=epochs, batch_size=args.batch_size,
                                 hidden=tuple(args.hidden), lr=_lr_for(args.lr, name),
                                 schedule=args.schedule, clip_global_norm=args.clip_global_norm,
                                 backend=backend if pdtype is None and not precision
                                 else args.backend,
                                 seed=args.seed, progress=not args.no_progress,
                                 param_dtype=pdtype, precision=precision, label=name + suffix,
                                 batchnorm=args.batchnorm, dropout=args.dropout))
    print()
    print(format_table(results, state=q8))
    if "muon" in names:
        print("muon: Muon on the hidden layers' weight matrices, AdamW on the output layer and "
              "the biases (two optimizers, one lr; adjust_lr_fn='match_rms_adamw')")
    if "lars" in names:
        print("lars: the weight matrices trust-scaled with weight decay; biases with "
              "weight_decay=0, trust_ratio=False (one optimizer, two param groups)")
    if "lbfgs" in names:
        print(f"lbfgs: full batch, one step per epoch of up to "
              f"{OPTIMIZER_SPECS['lbfgs'][1]['max_iter']} iterations (strong-Wolfe line search); "
              f"ms/step is per L-BFGS step, opt share excludes its closure's forward/backward")
    if closure_skipped:
        print(f"no {', '.join(closure_skipped)} row: it takes neither --schedule nor "
              f"--clip-global-norm (a constant lr, no grad pipeline)")
    if skipped:
        print(f"no 16-bit or q8 rows for {', '.join(dict.fromkeys(skipped))} (float32 params "
              f"and state only)")
    if q8:
        print(f"q8 rows: 8-bit block-quantized moments (state_dtype='q8': uint8 codes + a float32 "
              f"absmax per 256 elements; tensors under 4096 elements keep float32 state), backend "
              f"{results[-1].backend}; bf16+q8+SR: bfloat16 weights, q8 moments, stochastic "
              f"rounding" + (f" {q8_note}" if q8_note else ""))
    elif len(variants) > 1:
        print(f"bf16 rows: bfloat16 weights (forward/backward in float32), state float32, backend "
              f"{results[-1].backend}; bf16 = round to nearest, +SR = stochastic rounding, "
              f"+master = float32 master weights")
    warm = sum(r.warmup_s for r in results)
    print()
    print("lr: the learning rate (the peak of the schedule); train loss: cross-entropy over the "
          "whole training set after the last step;\nms/step: forward + backward + optimizer step "
          "(mean over the run); opt share: the optimizer's part of it.")
    if args.plot:
        plot_results(results, args.plot,
                     f"fastopt demo: MLP {'-'.join(map(str, sizes))} on digits, backend {backend}, "
                     f"{dtype.name}, schedule {args.schedule}")
        print(f"plot: {args.plot}")
    print(f"wall time {time.perf_counter() - t_start:.1f} s (first steps / JIT warm-up "
          f"{warm:.1f} s)")
    return 0


def format_table(results, state: bool = False) -> str:
    """The results table; ``state=True`` adds the optimizer state's bytes per parameter."""
    w = max([10] + [len(r.name) for r in results])
    head = f"{'optimizer':{w}} {'lr':>8} {'train loss':>10} {'test acc':>8} {'ms/step':>8} " \
           f"{'opt share':>9}" + (f" {'state B/param':>13}" if state else "")
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r.name:{w}} {r.lr:8.2g} {r.train_loss:10.4f} {100 * r.test_acc:7.1f}% "
                     f"{r.ms_per_step:8.3f} {100 * r.opt_share:8.0f}%"
                     + (f" {r.state_bytes / max(r.n_params, 1):13.2f}" if state else "")
                     + (f"  diverged at step {r.diverged_at}" if r.diverged_at else ""))
    return "\n".join(lines)


def _run_xor(args, names, backend, t_start) -> int:
    steps = args.epochs or 1000
    dtype = np.dtype(args.dtype)
    print(f"fastopt demo --xor: MLP 2-8-2 on the four XOR points, {steps} full-batch steps, "
          f"backend {backend}, {dtype.name}, schedule {args.schedule}, seed {args.seed}")
    results = [train_xor(name, steps=steps, lr=_lr_for(args.lr, name), schedule=args.schedule,
                         clip_global_norm=args.clip_global_norm, backend=backend, seed=args.seed,
                         dtype=dtype) for name in names]
    print()
    head = f"{'optimizer':10} {'lr':>8} {'loss':>10} {'correct':>7}  P(1) for 00 01 10 11"
    print(head)
    print("-" * len(head))
    for r in results:
        probs = " ".join(f"{p:.2f}" for p in r.probabilities)
        print(f"{r.name:10} {r.lr:8.2g} {r.loss:10.2e} {round(4 * r.accuracy):5d}/4  {probs}"
              + (f"  diverged at step {r.diverged_at}" if r.diverged_at else ""))
    if args.plot:
        plot_results(results, args.plot, f"fastopt demo: XOR, backend {backend}")
        print(f"plot: {args.plot}")
    print(f"wall time {time.perf_counter() - t_start:.1f} s")
    return 0


def _run_sparse(args, backend, t_start) -> int:
    if args.optimizer or args.xor or args.distributed or args.hogwild or args.batchnorm \
            or args.dropout or args.dtype != "float32" or getattr(args, "state", "float32") != \
            "float32" or args.schedule != "constant" or args.clip_global_norm:
        print("error: --sparse trains its own pair (SparseAdam and dense Adam, float32); it "
              "takes --epochs, --batch-size, --lr, --seed and --backend only", file=sys.stderr)
        return 2
    epochs = args.epochs or 10
    lr = _lr_for(args.lr, "*") or SPARSE_LR
    data = load_digit_tokens(args.seed)
    n_rows = 64 * DIGIT_LEVELS
    if backend == "numba":
        threads = _numba_threads(args.threads, n_rows * 32 + 33 * 10)
        if isinstance(threads, str):
            print(f"error: {threads}", file=sys.stderr)
            return 2
    print(f"fastopt demo --sparse: the digits as bags of 64 (pixel, level) tokens, an embedding "
          f"table of {n_rows} x 32, an image the mean of its tokens' rows, then a linear layer "
          f"(Adam); {len(data[1])} train / {len(data[3])} test images, {epochs} epochs of batch "
          f"{args.batch_size}, lr {lr:g}, backend {backend}, seed {args.seed}")
    t_warm = time.perf_counter()
    for sparse in (True, False):  # one untimed step each: a JIT compile is not timed as steps
        train_sparse(sparse, max_steps=1, batch_size=args.batch_size, lr=lr, seed=args.seed,
                     backend=backend, data=data)
    warm = time.perf_counter() - t_warm
    results = [train_sparse(sparse, epochs=epochs, batch_size=args.batch_size, lr=lr,
                            seed=args.seed, backend=backend, data=data) for sparse in (True, False)]
    print()
    head = (f"{'table optimizer':15} {'train loss':>10} {'test acc':>8} {'rows/step':>14} "
            f"{'ms/step':>8} {'opt share':>9}")
    print(head)
    print("-" * len(head))
    for r in results:
        print(f"{r.name:15} {r.train_loss:10.4f} {100 * r.test_acc:7.1f}% "
              f"{r.rows_per_step:6.0f} of {n_rows:<4d} {r.ms_per_step:8.3f} "
              f"{100 * r.opt_share:8.0f}%")
    print()
    print("rows/step: the table rows the optimizer reads and writes per step (SparseAdam: the "
          "batch's distinct tokens; dense Adam: every row,\nits grad zero outside the batch's). "
          "SparseAdam is lazy Adam: a row's moments decay only on the steps that touch it.")
    print(f"wall time {time.perf_counter() - t_start:.1f} s (first steps / JIT warm-up "
          f"{warm:.1f} s)")
    return 0
