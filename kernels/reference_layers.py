"""The NumPy reference of the layer kernels (BatchNorm, Dropout): plain, readable, correct.

Every function here is the definition the Numba (``numba_layers.py``) and CUDA
(``cuda/layers.cu``) kernels are tested against.  They take arrays that
``fastopt.layers`` has already validated and reshaped:

* BatchNorm sees ``x`` as ``(N, C, S)``: batch, channel, and the spatial
  elements of one channel flattened (``S = 1`` for an ``(N, C)`` input,
  ``H * W`` for ``(N, C, H, W)``).  Per-channel vectors are float64.
  Statistics accumulate in float64 and the variance is two-pass (mean first,
  then the mean of squared deviations), so a channel whose mean is large
  next to its spread keeps its digits.
* Dropout sees flat arrays and the integer ``threshold = ceil(p * 2**32)``:
  element ``i`` (flat C-order index) is kept iff
  ``fastopt.precision.random_bits(seed, step, i) >= threshold``.

Per-element arithmetic of BatchNorm is float64, rounded once to the output
dtype; Dropout multiplies in the array's own dtype (``x * scale`` with
``scale = dtype(1 / (1 - p))``), which every backend reproduces bit for bit.
"""

from __future__ import annotations

import numpy as np

from ..precision import random_bits

BACKEND = "numpy"



def bn_moments(x3):
    """Per-channel ``(mean, biased variance)`` of ``x3`` (N, C, S), float64, two-pass."""
    x64 = x3.astype(np.float64)
    mean = x64.mean(axis=(0, 2))
    var = ((x64 - mean[None, :, None]) ** 2).mean(axis=(0, 2))
    return mean, var


def bn_apply(x3, mean, scale, beta, out):
    """``out = (x - mean) * scale + beta`` per channel, in float64, rounded once into ``out``."""
    x64 = x3.astype(np.float64)
    out[...] = (x64 - mean[None, :, None]) * scale[None, :, None] + beta[None, :, None]


def bn_backward_sums(x3, dy3, mean, invstd):
    """Per-channel ``(sum dy, sum dy * xhat)`` with ``xhat = (x - mean) * invstd``, float64."""
    x64 = x3.astype(np.float64)
    dy64 = dy3.astype(np.float64)
    xhat = (x64 - mean[None, :, None]) * invstd[None, :, None]
    return dy64.sum(axis=(0, 2)), (dy64 * xhat).sum(axis=(0, 2))


def bn_backward_dx(x3, dy3, mean, invstd, k, a, b, out):
    """``out = k * (dy - a - xhat * b)`` per channel, in float64, rounded once into ``out``.

    Training passes ``k = gamma * invstd``, ``a = mean(dy)``, ``b = mean(dy * xhat)``;
    evaluation (fixed statistics) passes ``a = b = 0``.
    """
    x64 = x3.astype(np.float64)
    dy64 = dy3.astype(np.float64)
    xhat = (x64 - mean[None, :, None]) * invstd[None, :, None]
    c = lambda v: v[None, :, None]  # noqa: E731 -- broadcast a channel vector
    out[...] = c(k) * (dy64 - c(a) - xhat * c(b))


def dropout_keep(seed, step, threshold, n):
    """The keep mask of ``n`` elements: ``random_bits(seed, step, i) >= threshold``."""
    bits = random_bits(seed, step, np.arange(n, dtype=np.uint64))
    return bits.astype(np.uint64) >= np.uint64(threshold)


def dropout_apply(x, seed, step, threshold, scale, out):
    """``out = x * scale`` where kept, 0 elsewhere (flat arrays; ``scale`` of ``x``'s dtype)."""
    keep = dropout_keep(seed, step, threshold, x.size)
    out[...] = np.where(keep, x * scale, x.dtype.type(0))
