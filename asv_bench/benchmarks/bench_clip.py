"""Gradient clipping and the rest of the step pipeline (see docs/design.md), on Adam.

``Pipeline`` prices each pipeline option against the bare fused step
(``mode="none"``): a norm clip costs one extra read of the grads, the
non-finite check one read, ``clip_value`` nothing (it is in the fused pass),
``max_norm`` a read and a write of the params.  The grads are a list of 8
tensors so that per-tensor and global norms differ.
``ClipGradNorm`` is the stand-alone ``clip_grad_norm_`` against torch's.
"""

import numpy as np

import fastopt

from .common import FASTOPT_IMPLS, _bench, get_case, xp_of

MODES = {
    "none": ({}, "ignore"),
    "nonfinite-check": ({}, "raise"),
    "clip_value": ({"clip_value": 0.1}, "ignore"),
    "clip_norm": ({"clip_norm": 1.0}, "ignore"),
    "clip_global_norm": ({"clip_global_norm": 1.0}, "ignore"),
    "max_norm": ({"max_norm": 10.0}, "ignore"),
}
PIECES = 8


class Pipeline:
    params = [list(FASTOPT_IMPLS), list(MODES), [1_000_000, 16_000_000]]
    param_names = ["backend", "mode", "n"]
    rounds = 1
    repeat = (3, 20, 1.0)
    warmup_time = 0  # setup took one step already (JIT, page faults)

    def setup(self, backend, mode, n):
        options, nonfinite = MODES[mode]
        self.case = get_case(backend, "adam", [(n // PIECES,)] * PIECES, "float32", options, nonfinite)

    def time_step(self, backend, mode, n):
        self.case.step()
        self.case.sync()


class ClipGradNorm:
    """``fastopt.functional.clip_grad_norm_`` (per backend) and ``torch.nn.utils.clip_grad_norm_``."""

    params = [list(FASTOPT_IMPLS) + ["torch-foreach"], [1_000_000, 16_000_000]]
    param_names = ["impl", "n"]
    rounds = 1
    repeat = (3, 20, 1.0)
    warmup_time = 0  # setup took one step already (JIT, page faults)

    def setup(self, impl, n):
        rng = np.random.default_rng(0)
        host = [rng.random(n // PIECES, dtype=np.float32) for _ in range(PIECES)]
        self.sync = _bench._noop
        if impl == "torch-foreach":
            torch = _bench.torch_module()
            if torch is None:
                raise NotImplementedError("torch is not installed")
            grads = [torch.from_numpy(h) for h in host]
            params = [torch.empty_like(g) for g in grads]  # clip_grad_norm_ reads p.grad
            for p, g in zip(params, grads):
                p.grad = g
            self.clip = lambda: torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        else:
            why = _bench.unavailable(impl)
            if why:
                raise NotImplementedError(why)
            xp = xp_of(impl)
            grads = [xp.asarray(h) for h in host]
            if impl == "cupy":
                self.sync = xp.cuda.Device().synchronize
            self.clip = lambda: fastopt.functional.clip_grad_norm_(grads, 1.0, backend=impl)
        self.clip()
        self.sync()

    def time_clip_grad_norm(self, impl, n):
        self.clip()
        self.sync()
