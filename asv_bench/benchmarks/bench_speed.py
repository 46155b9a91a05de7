"""The numba backend where users feel its speed: the read pass, the
default step, small models, the first step.  The ratios against torch and the
goals are in ``asv_bench/numba_speed.py`` (one interleaved run); these are the
plain times asv tracks between commits.
"""

import os
import tempfile

# before numba or torch start an OpenMP runtime: with the default (active) wait policy
# idle OpenMP threads spin after each parallel region and, on a shared machine, take
# the cores from the working threads (see fastopt.apps.bench.speed_table)
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import numpy as np  # noqa: E402

from fastopt.apps import bench as _bench  # noqa: E402

N16 = 16_777_216
DEMO_SIZES = [68 * 128, 128, 128 * 128, 128, 128 * 10, 10]


def _skip_without_numba():
    why = _bench.unavailable("numba")
    if why:
        raise NotImplementedError(why)


class ReadPass:
    """The non-finite check of a default step (one read of the grads, 4 B/elem)."""

    params = [["check", "exact"]]
    param_names = ["pass"]

    def setup(self, kind):
        _skip_without_numba()
        from fastopt.kernels import numba_cpu

        self.ops = numba_cpu.OPS
        self.g = [np.random.default_rng(0).standard_normal(N16, dtype=np.float32)]
        self.clip = None if kind == "check" else 1.0
        self.time_read(kind)

    def time_read(self, kind):
        self.ops.grad_stats(self.g, None, inv_scale=None, clip_value=self.clip, need_sumsq=True,
                            check_finite=True)


class DefaultStep:
    """One step with the default ``nonfinite="raise"`` (check + update)."""

    params = [["adam", "sgd-momentum", "adagrad", "adam-clip-global-norm", "adahessian"],
              ["16.7M", "demo", "1000x256"]]
    param_names = ["rule", "model"]
    timeout = 300

    def setup(self, rule, model):
        _skip_without_numba()
        import fastopt as fo

        sizes = {"16.7M": [N16], "demo": DEMO_SIZES, "1000x256": [256] * 1000}[model]
        rng = np.random.default_rng(0)
        ps = [rng.standard_normal(n, dtype=np.float32) for n in sizes]
        self.grads = [rng.standard_normal(n, dtype=np.float32) * np.float32(1e-3) for n in sizes]
        self.extras = None
        if rule == "adam":
            self.opt = fo.Adam(ps, backend="numba")
        elif rule == "adam-clip-global-norm":
            self.opt = fo.Adam(ps, clip_global_norm=1.0, backend="numba")
        elif rule == "sgd-momentum":
            self.opt = fo.SGD(ps, lr=1e-3, momentum=0.9, backend="numba")
        elif rule == "adagrad":
            self.opt = fo.Adagrad(ps, backend="numba")
        else:
            self.opt = fo.AdaHessian(ps, lr=1e-3, backend="numba")
            self.extras = [np.abs(g) for g in self.grads]
        self.time_step(rule, model)

    def time_step(self, rule, model):
        if self.extras is None:
            self.opt.step(self.grads)
        else:
            self.opt.step(self.grads, self.extras)


class FirstStep:
    """The first Adam step of a fresh process (import included), cold and warm kernel cache."""

    rounds = 1
    repeat = 1
    timeout = 900

    def setup(self):
        _skip_without_numba()

    def _first(self, cache):
        return _bench.first_step_seconds("fastopt", cache)

    def track_cold_first_step(self):
        with tempfile.TemporaryDirectory(prefix="fastopt-cold-") as tmp:
            return self._first(tmp)

    track_cold_first_step.unit = "seconds"

    def track_warm_first_step(self):
        with tempfile.TemporaryDirectory(prefix="fastopt-warm-") as tmp:
            self._first(tmp)
            return self._first(tmp)

    track_warm_first_step.unit = "seconds"

    def track_cold_first_step_after_imports(self):
        """The step alone (``first_step_parts``): what its kernels' compile costs."""
        with tempfile.TemporaryDirectory(prefix="fastopt-cold-") as tmp:
            return _bench.first_step_parts("fastopt", tmp)[1]

    track_cold_first_step_after_imports.unit = "seconds"

    def track_warm_first_step_after_imports(self):
        """The step alone on a warm cache: what loading its kernels costs."""
        with tempfile.TemporaryDirectory(prefix="fastopt-warm-") as tmp:
            self._first(tmp)
            return _bench.first_step_parts("fastopt", tmp)[1]

    track_warm_first_step_after_imports.unit = "seconds"

    def track_torch_first_step(self):
        """The peer: torch's fused Adam, first step of a fresh process (import included)."""
        if _bench.torch_module() is None:
            raise NotImplementedError("torch is not installed")
        return _bench.first_step_seconds("torch")

    track_torch_first_step.unit = "seconds"


class TorchFusedStep:
    """The peer of ``DefaultStep``: torch's fused optimizer on the same sizes (``--speed`` rows)."""

    params = [["adam", "sgd-momentum", "adagrad"], ["16.7M", "demo", "1000x256"]]
    param_names = ["rule", "model"]
    timeout = 300

    def setup(self, rule, model):
        _skip_without_numba()  # the arrays come from the pair builder the --speed table uses
        torch = _bench.torch_module()
        if torch is None:
            raise NotImplementedError("torch is not installed")
        sizes = {"16.7M": [N16], "demo": DEMO_SIZES, "1000x256": [256] * 1000}[model]
        cls, kw = {"adam": ("Adam", {"lr": 1e-3}), "sgd-momentum": ("SGD", {"lr": 1e-3, "momentum": 0.9}),
                   "adagrad": ("Adagrad", {"lr": 1e-2})}[rule]
        _, self.step = _bench._speed_steps(cls, sizes, torch, **kw)
        self.step()

    def time_step(self, rule, model):
        self.step()
