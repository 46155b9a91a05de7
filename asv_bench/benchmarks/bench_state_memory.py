"""Bytes of optimizer state per parameter for each state format (float32, bfloat16, q8).

``track_state_bytes_per_param``: what the optimizer reports (``state_nbytes() / n``).
``track_allocated_bytes_per_param``: the same measured from outside, with
``tracemalloc`` (which sees every NumPy array): the bytes that building the
optimizer allocates and keeps, per parameter element.  The two must agree;
for Adam they are 8 (float32), 4 (bfloat16) and 2.03 (q8: one uint8 code per
element and a float32 absmax per 256 elements, ``fastopt.quantization.
bytes_per_param_table``).  ``peakmem_construct_and_step``: asv's peak resident
memory of the process after building the optimizer and taking one step (the
params and grads of ``setup`` included; the reference q8 step also allocates
float32 temporaries of one tensor).
"""

import tracemalloc

import numpy as np

import fastopt as fo

N = 1 << 22  # 4M float32 params: large enough that every format's overhead is visible
FORMATS = ("float32", "bfloat16", "q8")
RULES = ("adam", "sgd-momentum", "adagrad")
_CLASSES = {"adam": (fo.Adam, {}), "sgd-momentum": (fo.SGD, {"momentum": 0.9}),
            "adagrad": (fo.Adagrad, {})}


def _make(rule, fmt, params):
    cls, opts = _CLASSES[rule]
    if fmt == "bfloat16":
        try:
            import ml_dtypes  # noqa: F401
        except ImportError:
            raise NotImplementedError("bfloat16 state needs ml_dtypes") from None
    return cls(params, lr=1e-3, state_dtype=fmt, **opts)


class StateBytes:
    params = [list(RULES), list(FORMATS)]
    param_names = ["rule", "format"]
    rounds = 1
    timeout = 300

    def setup(self, rule, fmt):
        self.params_ = [np.zeros(N, np.float32)]
        self.grads = [np.full(N, 1e-3, np.float32)]

    def track_state_bytes_per_param(self, rule, fmt):
        return _make(rule, fmt, self.params_).state_nbytes() / N

    track_state_bytes_per_param.unit = "bytes/param"

    def track_allocated_bytes_per_param(self, rule, fmt):
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            opt = _make(rule, fmt, self.params_)
            kept = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        del opt
        return kept / N

    track_allocated_bytes_per_param.unit = "bytes/param"

    def peakmem_construct_and_step(self, rule, fmt):
        _make(rule, fmt, self.params_).step(self.grads)


class FactoredStateBytes:
    """Adafactor's factored second moments against Adam's two full moments on one 2048 x 2048
    float32 matrix: state bytes per param element (Adam 8; Adafactor (2048 + 2048) * 4 / 2048**2,
    about 0.0039)."""

    params = [["adam", "adafactor"]]
    param_names = ["rule"]
    rounds = 1

    def setup(self, rule):
        self.params_ = [np.zeros((2048, 2048), np.float32)]

    def track_state_bytes_per_param(self, rule):
        cls = fo.Adam if rule == "adam" else fo.Adafactor
        return cls(self.params_, backend="numpy").state_nbytes() / self.params_[0].size

    track_state_bytes_per_param.unit = "bytes/param"
