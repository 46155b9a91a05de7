"""Host side of ``layers.cu``: the layer-kernel interface of ``kernels/reference_layers.py``
on a :class:`fastopt.kernels.cuda._host.Device` adapter (CuPy on a GPU, or the g++ CPU
harness of ``tests/test_cuda_layers.py``).

Arguments follow ``_host``'s rule: device addresses as ``numpy.uint64`` (0 for a null
pointer), ``fo_i64`` as ``numpy.int64``, the dropout scale as a NumPy scalar of the
array's dtype; nothing as a Python number.
"""

from __future__ import annotations

import numpy as np

from ...precision import step_key

BACKEND = "cupy"
#: at most this many row blocks per reduction, as in numba_layers (partials: blocks * C)
MAX_BLOCKS = 64
#: blocks of an element-wise launch when the device sets no cap (grid-stride covers the rest)
DEFAULT_GRID = 4096

#: kernel suffix per array dtype; 16-bit batches come as their bits (fastopt.layers'
#: ``_bits_view``: bfloat16 as uint16, float16 as int16) and run ``layers.cu``'s FoBF16/FoF16
_SUF = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64",
        np.dtype(np.uint16): "bf16", np.dtype(np.int16): "f16"}


class CudaLayers:
    #: 16-bit batches are read and written through their bits by the kernels themselves
    FUSED_16BIT = True

    def __init__(self, device):
        self.dev = device

    # -- helpers
    def _grid(self, work: int) -> int:
        cap = getattr(self.dev, "grid_cap", None) or DEFAULT_GRID
        return max(1, min(work, cap))

    def _p(self, a) -> np.uint64:
        return np.uint64(0) if a is None else np.uint64(self.dev.ptr(a))

    def _vec(self, v):
        # a host (NumPy) or device vector as a contiguous float64 array of the device's kind:
        # np.ascontiguousarray would try to copy a CuPy array to the host and raise
        xp = self.dev.xp
        return xp.ascontiguousarray(xp.asarray(v, dtype=np.float64))

    def _launch(self, name, work, *args):
        self.dev.launch(name, self._grid(work), self.dev.block, args)

    def _finalize(self, part, nb, cols):
        out = self.dev.xp.empty(cols, dtype=np.float64)
        self._launch("fo_bn_finalize", cols, self._p(part), np.int64(nb), np.int64(cols),
                     self._p(out))
        return out

    # -- the interface of reference_layers
    def bn_moments(self, x3):
        n, c, s = x3.shape
        nb = max(1, min(n, MAX_BLOCKS))
        suf = _SUF[x3.dtype]
        part = self.dev.xp.empty(nb * c, dtype=np.float64)
        dims = (np.int64(n), np.int64(c), np.int64(s))

        def sums(centre):
            self._launch(f"fo_bn_sum_{suf}", nb * c, self._p(x3), *dims, self._p(centre),
                         np.int64(nb), self._p(part))
            return self._finalize(part, nb, c)

        mean = sums(None) / (n * s)
        var = sums(mean) / (n * s)
        return mean, var

    def bn_apply(self, x3, mean, scale, beta, out):
        n, c, s = x3.shape
        vecs = [self._vec(v) for v in (mean, scale, beta)]
        self._launch(f"fo_bn_apply_{_SUF[x3.dtype]}", x3.size, self._p(x3), np.int64(x3.size),
                     np.int64(c), np.int64(s), *map(self._p, vecs), self._p(out))

    def bn_backward_sums(self, x3, dy3, mean, invstd):
        n, c, s = x3.shape
        nb = max(1, min(n, MAX_BLOCKS))
        part = self.dev.xp.empty(nb * 2 * c, dtype=np.float64)
        m, r = self._vec(mean), self._vec(invstd)
        self._launch(f"fo_bn_bwd_sum_{_SUF[x3.dtype]}", nb * c, self._p(x3), self._p(dy3),
                     np.int64(n), np.int64(c), np.int64(s), self._p(m), self._p(r), np.int64(nb),
                     self._p(part))
        both = self._finalize(part, nb, 2 * c)
        return both[:c], both[c:]

    def bn_backward_dx(self, x3, dy3, mean, invstd, k, a, b, out):
        n, c, s = x3.shape
        vecs = [self._vec(v) for v in (mean, invstd, k, a, b)]
        self._launch(f"fo_bn_dx_{_SUF[x3.dtype]}", x3.size, self._p(x3), self._p(dy3),
                     np.int64(x3.size), np.int64(c), np.int64(s), *map(self._p, vecs),
                     self._p(out))

    def dropout_apply(self, x, seed, step, threshold, scale, out):
        if x.size == 0:
            return
        self._launch(f"fo_dropout_{_SUF[x.dtype]}", x.size, self._p(x), np.int64(x.size),
                     np.uint64(step_key(seed, step)), np.uint64(threshold),
                     np.float32(scale) if x.dtype.itemsize == 2 else x.dtype.type(scale),
                     self._p(out))
