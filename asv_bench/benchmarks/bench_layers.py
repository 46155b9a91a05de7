"""fastopt.layers: BatchNorm forward + backward against torch CPU, Dropout against a copy.

``BatchNorm.track_ratio_to_torch`` is the headline figure: our forward + backward time over
``torch.nn.functional.batch_norm`` + autograd's, both in training mode on the same batch (float32,
or bfloat16/float16 with float32 statistics on both sides), timed alternately in one loop of the same process (the median of the per-pair
ratios), so a busy machine slows both sides alike.  ``Dropout.track_fraction_of_copy`` is
the achieved bandwidth (one read, one write per element) over ``np.copyto``'s on arrays of
the same size, measured in the same process.
Bytes: BatchNorm forward + backward makes 5 reads and 2 writes of the batch (docs/design.md,
Layers), so on a memory-bound machine the ratio is bounded by torch's time over that floor.
Note: torch's and numba's OpenMP pools spin after a parallel region; on a machine with few
cores run with ``OMP_WAIT_POLICY=PASSIVE`` or each side's spinning slows the other.
"""

import time

import numpy as np

from fastopt import layers

from .common import measure

BN_SHAPES = {"4096x1024": (4096, 1024), "32x64x32x32": (32, 64, 32, 32)}
IMPLS = ("numpy", "numba", "torch")
DTYPES = ("float32", "bfloat16", "float16")


def _np_dtype(name):
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _to_torch(a, torch):
    if a.dtype.name == "bfloat16":  # torch.from_numpy does not know ml_dtypes' bfloat16
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())
DROPOUT_SIZES = {"1M": 1 << 20, "16M": 1 << 24}


def _torch():
    try:
        import torch
    except ImportError:
        raise NotImplementedError("torch is not installed") from None
    return torch


def _backend_or_skip(impl):
    info = layers.backends().get(impl)
    if info is None or not info["available"]:
        raise NotImplementedError(f"layers backend {impl} unavailable")


class BatchNorm:
    params = [list(BN_SHAPES), list(IMPLS), list(DTYPES)]
    param_names = ["shape", "impl", "dtype"]
    timeout = 300

    def setup(self, shape, impl, dtype="float32"):
        shp = BN_SHAPES[shape]
        c = shp[1]
        rng = np.random.default_rng(0)
        self.dtype = dtype
        self.x = rng.standard_normal(shp).astype(np.float32).astype(_np_dtype(dtype))
        self.dy = rng.standard_normal(shp).astype(np.float32).astype(_np_dtype(dtype))
        self.g, self.b = np.ones(c, np.float32), np.zeros(c, np.float32)
        self.rm, self.rv = np.zeros(c, np.float32), np.ones(c, np.float32)
        if impl == "torch":
            torch = _torch()
            self.xt = _to_torch(self.x, torch).requires_grad_()
            self.gt = torch.ones(c, requires_grad=True)
            self.bt = torch.zeros(c, requires_grad=True)
            self.rmt, self.rvt = torch.zeros(c), torch.ones(c)
            self.dyt = _to_torch(self.dy, torch)
            self.run = self._torch_step
        else:
            _backend_or_skip(impl)
            self.impl = impl
            self.run = self._ours
        self.run()  # numba: compile (or load the cache) outside the timing

    def _ours(self, impl=None):
        y, cache = layers.batch_norm_forward(self.x, self.g, self.b, self.rm, self.rv, 0.1, 1e-5,
                                             True, backend=impl or self.impl)
        return layers.batch_norm_backward(self.dy, cache)

    def _torch_step(self):
        torch = _torch()
        self.xt.grad = self.gt.grad = self.bt.grad = None
        y = torch.nn.functional.batch_norm(self.xt, self.rmt, self.rvt, self.gt, self.bt, True,
                                           0.1, 1e-5)
        y.backward(self.dyt)

    def time_forward_backward(self, shape, impl, dtype="float32"):
        self.run()

    def track_ratio_to_torch(self, shape, impl, dtype="float32"):
        if impl == "torch":
            raise NotImplementedError("the ratio of torch to itself")
        t = BatchNorm()
        t.setup(shape, "torch", dtype)
        ratios = []
        for _ in range(15):
            t0 = time.perf_counter()
            self.run()
            t1 = time.perf_counter()
            t.run()
            t2 = time.perf_counter()
            ratios.append((t1 - t0) / (t2 - t1))
        return float(np.median(ratios))

    track_ratio_to_torch.unit = "our time / torch's"


class Dropout:
    params = [list(DROPOUT_SIZES), list(IMPLS), list(DTYPES)]
    param_names = ["size", "impl", "dtype"]
    timeout = 300

    def setup(self, size, impl, dtype="float32"):
        n = DROPOUT_SIZES[size]
        self.x = np.random.default_rng(0).standard_normal(n).astype(np.float32).astype(
            _np_dtype(dtype))
        if impl == "torch":
            torch = _torch()
            xt = _to_torch(self.x, torch)
            gen = torch.Generator().manual_seed(0)

            def run():
                # torch draws a Bernoulli mask and stores it: its usual path
                keep = torch.empty_like(xt).bernoulli_(0.5, generator=gen)
                return xt * keep * 2.0

            self.run = run
        else:
            _backend_or_skip(impl)
            self.run = lambda: layers.dropout_forward(self.x, 0.5, 0, 1, backend=impl)
        self.run()
        out = np.empty_like(self.x)
        t = measure(self.run, min_time=0.2)
        self.gbps = 2 * self.x.nbytes / t / 1e9
        self.copy_gbps = 2 * self.x.nbytes / measure(lambda: np.copyto(out, self.x),
                                                     min_time=0.2) / 1e9

    def time_forward(self, size, impl, dtype="float32"):
        self.run()

    def track_gbps(self, size, impl, dtype="float32"):
        return self.gbps

    track_gbps.unit = "GB/s"

    def track_fraction_of_copy(self, size, impl, dtype="float32"):
        return self.gbps / self.copy_gbps

    track_fraction_of_copy.unit = "fraction of np.copyto"
