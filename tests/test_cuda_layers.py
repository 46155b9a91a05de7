"""``kernels/cuda/layers.cu`` without a GPU: the same source compiled by g++ through the CPU
harness of ``tests/test_cuda_cpu.py`` (its ``libs`` fixture and ``CpuDevice``), driven by the
host code a GPU would run (``fastopt.kernels.cuda._layers_host``), against the NumPy
reference through the public ``fastopt.layers`` API.  Blocks of 1 thread (grid-stride loops)
and of 3 and 8 threads (the block reductions' tree) are both run.  Skips only without g++.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_cuda_cpu import CpuDevice, libs, pytestmark  # noqa: F401 -- the fixture and skip mark

from fastopt import layers
from fastopt.kernels.cuda._layers_host import CudaLayers


@pytest.fixture(params=[(1, None), (3, 5), (8, 2)], ids=["block1", "block3-grid5", "block8-grid2"])
def cudacpu(request, libs, monkeypatch):  # noqa: F811
    block, grid_cap = request.param
    dev = CpuDevice(libs, block=block, grid_cap=grid_cap)
    monkeypatch.setitem(layers._BACKEND_MODULES, "cudacpu", "unused")
    monkeypatch.setitem(layers._LOADED, "cudacpu", CudaLayers(dev))
    return dev


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(37, 5), (3, 4, 5, 7)])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_parity(cudacpu, dtype, shape, training):
    rng = np.random.default_rng(0)
    c = shape[1]
    x = (rng.standard_normal(shape) * 4 + 50).astype(dtype)
    g, b = rng.standard_normal(c).astype(dtype), rng.standard_normal(c).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    out = {}
    for backend in ("numpy", "cudacpu"):
        rm, rv = np.full(c, 0.5), np.full(c, 2.0)
        y, cache = layers.batch_norm_forward(x, g, b, rm, rv, 0.1, 1e-5, training, backend=backend)
        out[backend] = (y, *layers.batch_norm_backward(dy, cache), rm, rv)
    rtol, atol = (1e-12, 1e-11) if dtype == np.float64 else (1e-6, 1e-5)
    for a, r in zip(out["cudacpu"], out["numpy"]):
        np.testing.assert_allclose(a, r, rtol=rtol, atol=atol)
    assert any(n.startswith("fo_bn_sum_") for n in cudacpu.names) == training


def test_batch_norm_deterministic_for_any_grid(libs):  # noqa: F811
    rng = np.random.default_rng(1)
    x3 = rng.standard_normal((70, 3, 11))
    dy3 = rng.standard_normal(x3.shape)
    for block in (1, 8):
        runs = []
        for cap in (None, 3, 1, 3):
            k = CudaLayers(CpuDevice(libs, block=block, grid_cap=cap))
            mean, var = k.bn_moments(x3)
            sums = k.bn_backward_sums(x3, dy3, mean, 1 / np.sqrt(var + 1e-5))
            runs.append(np.concatenate([mean, var, *sums]).tobytes())
        # no atomics: the same bits whatever the grid, run after run
        assert len(set(runs)) == 1, block


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("p", [0.0, 0.2, 0.75])
def test_dropout_bit_exact(cudacpu, dtype, p):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((41, 53)).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    res = {}
    for backend in ("numpy", "cudacpu"):
        y, mask = layers.dropout_forward(x, p, 2**63 + 5, 17, backend=backend)
        res[backend] = (y.tobytes(), layers.dropout_backward(dy, mask, backend=backend).tobytes())
    assert res["cudacpu"] == res["numpy"]
    assert "fo_dropout_" + ("f32" if dtype == np.float32 else "f64") in cudacpu.names


@pytest.mark.parametrize("name", ["float16", "bfloat16"])
@pytest.mark.parametrize("shape", [(37, 5), (3, 4, 5, 7)])
def test_sixteen_bit_fused(cudacpu, name, shape):
    """16-bit batches run layers.cu's FoBF16/FoF16 kernels on their bits (no widened copy):
    BatchNorm gives the bits of the same kernels on the widened float32 batch rounded once
    more (the reference's two roundings), Dropout the reference's bits."""
    import ml_dtypes

    dt = np.dtype(np.float16) if name == "float16" else np.dtype(ml_dtypes.bfloat16)
    rng = np.random.default_rng(3)
    c = shape[1]
    x = (rng.standard_normal(shape) * 3 + 1).astype(np.float32).astype(dt)
    dy = rng.standard_normal(shape).astype(np.float32).astype(dt)
    g = rng.uniform(0.5, 2.0, c).astype(np.float32)
    g[0] = 1e-6 if name == "float16" else 1e-39  # results among the 16-bit subnormals
    b = rng.standard_normal(c).astype(np.float32)
    b[0] = 0.0
    res = {}
    for key, xs, dys in (("16", x, dy), ("32", x.astype(np.float32), dy.astype(np.float32))):
        rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
        y, cache = layers.batch_norm_forward(xs, g, b, rm, rv, backend="cudacpu")
        dx, dg, db = layers.batch_norm_backward(dys, cache)
        res[key] = [y.astype(dt), dx.astype(dt), dg, db, rm, rv]
    assert res["16"][0].dtype == dt and res["16"][1].dtype == dt
    for a, w in zip(res["16"], res["32"]):
        assert a.tobytes() == w.tobytes()
    y0 = np.abs(res["16"][0][:, 0].astype(np.float32))
    assert ((y0 > 0) & (y0 < ml_dtypes.finfo(dt).tiny)).any()
    assert any(n.endswith("_" + ("f16" if name == "float16" else "bf16")) for n in cudacpu.names)
    for p in (0.0, 0.4):
        y0, m0 = layers.dropout_forward(x, p, 7, 2, backend="numpy")
        y1, m1 = layers.dropout_forward(x, p, 7, 2, backend="cudacpu")
        assert y1.dtype == dt and y1.tobytes() == y0.tobytes()
        dx0 = layers.dropout_backward(dy, m0, backend="numpy")
        assert layers.dropout_backward(dy, m1, backend="cudacpu").tobytes() == dx0.tobytes()
