"""fastopt.layers: BatchNorm against torch + autograd and finite differences, Dropout's mask.

The NumPy reference (``kernels/reference_layers.py``) is checked against torch;
the Numba kernels against torch and, for Dropout, bit for bit against the
reference.  Design notes: ``docs/design.md`` and the ``fastopt.layers`` docstring.
"""

import importlib.util
import math

import ml_dtypes
import numpy as np
import pytest

from fastopt import layers
from fastopt.precision import random_bits

torch = pytest.importorskip("torch")
F = torch.nn.functional

HAVE_NUMBA = importlib.util.find_spec("numba") is not None
BACKENDS = ["numpy", "numba"] if HAVE_NUMBA else ["numpy"]
needs_numba = pytest.mark.skipif(not HAVE_NUMBA, reason="numba is not installed")
SHAPES = [(16, 5), (4, 3, 5, 6), (3, 4, 7)]

#: (rtol, atol) against torch.  float64: both sides are exact to a few ulps of the
#: float64 sums.  float32: torch accumulates in float32 over M <= 120 values, so its
#: results carry ~1e-6 relative error; ours round a float64 result once.
TOL = {
    np.float64: (1e-10, 1e-12),
    np.float32: (2e-5, 2e-5),
}


def _torch_bn(x, g, b, rm, rv, training, momentum=0.1, eps=1e-5):
    xt = torch.tensor(x, requires_grad=True)
    gt = None if g is None else torch.tensor(g, requires_grad=True)
    bt = None if b is None else torch.tensor(b, requires_grad=True)
    rmt = torch.tensor(rm)
    rvt = torch.tensor(rv)
    yt = F.batch_norm(xt, rmt, rvt, gt, bt, training, momentum, eps)
    return xt, gt, bt, rmt, rvt, yt


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_matches_torch(backend, dtype, shape, training, affine):
    rng = np.random.default_rng(hash((shape, training, affine)) % 2**32)
    c = shape[1]
    x = (rng.standard_normal(shape) * 3 + 2).astype(dtype)
    g = rng.standard_normal(c).astype(dtype) if affine else None
    b = rng.standard_normal(c).astype(dtype) if affine else None
    rm = rng.standard_normal(c).astype(dtype)
    rv = rng.uniform(0.5, 2.0, c).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    xt, gt, bt, rmt, rvt, yt = _torch_bn(x, g, b, rm.copy(), rv.copy(), training, 0.2, 1e-3)
    yt.backward(torch.tensor(dy))

    y, cache = layers.batch_norm_forward(x, g, b, rm, rv, 0.2, 1e-3, training, backend=backend)
    dx, dg, db = layers.batch_norm_backward(dy, cache)
    rtol, atol = TOL[dtype]
    assert y.dtype == dtype and y.shape == shape and dx.dtype == dtype
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=rtol, atol=atol)
    np.testing.assert_allclose(rm, rmt.numpy(), rtol=rtol, atol=atol)
    np.testing.assert_allclose(rv, rvt.numpy(), rtol=rtol, atol=atol)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=rtol, atol=atol * 10)
    if affine:
        m = x.size // c  # the sums grow with M
        np.testing.assert_allclose(dg, gt.grad.numpy(), rtol=rtol, atol=atol * m)
        np.testing.assert_allclose(db, bt.grad.numpy(), rtol=rtol, atol=atol * m)
    else:
        assert dg is None and db is None


def test_batch_norm_training_without_running_stats():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 4))
    y, _ = layers.batch_norm_forward(x, None, None, None, None, training=True, backend="numpy")
    yt = F.batch_norm(torch.tensor(x), None, None, training=True, eps=1e-5)
    np.testing.assert_allclose(y, yt.numpy(), rtol=1e-12, atol=1e-12)


def _loss(x, g, b, w, rm, rv, training, backend):
    y, _ = layers.batch_norm_forward(x, g, b, rm.copy(), rv.copy(), 0.1, 1e-3, training,
                                     backend=backend)
    return float(np.sum(y * w))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_finite_differences(backend, training):
    rng = np.random.default_rng(2)
    shape = (3, 2, 2, 3)
    x = rng.standard_normal(shape)
    g = rng.standard_normal(2)
    b = rng.standard_normal(2)
    w = rng.standard_normal(shape)  # loss = sum(y * w), so dy = w
    rm, rv = rng.standard_normal(2), rng.uniform(0.5, 2, 2)
    _, cache = layers.batch_norm_forward(x, g, b, rm.copy(), rv.copy(), 0.1, 1e-3, training,
                                         backend=backend)
    dx, dg, db = layers.batch_norm_backward(w, cache)
    h = 1e-6
    for arr, grad in ((x, dx), (g, dg), (b, db)):
        num = np.empty_like(arr)
        for i in np.ndindex(arr.shape):
            old = arr[i]
            arr[i] = old + h
            up = _loss(x, g, b, w, rm, rv, training, backend)
            arr[i] = old - h
            down = _loss(x, g, b, w, rm, rv, training, backend)
            arr[i] = old
            num[i] = (up - down) / (2 * h)
        np.testing.assert_allclose(grad, num, rtol=1e-6, atol=1e-7)


@needs_numba
@pytest.mark.parametrize("shape", [(300, 17), (5, 3, 9, 11)])
def test_batch_norm_numba_matches_reference_and_is_deterministic(shape):
    import numba

    rng = np.random.default_rng(3)
    x = rng.standard_normal(shape).astype(np.float32) * 10 + 100  # large mean: two-pass matters
    c = shape[1]
    g, b = np.ones(c, np.float32), np.zeros(c, np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    out = {}
    for backend in BACKENDS:
        y, cache = layers.batch_norm_forward(x, g, b, None, None, backend=backend)
        out[backend] = (y, *layers.batch_norm_backward(dy, cache))
    for a, r in zip(out["numba"], out["numpy"]):
        np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-5 * math.sqrt(x.size // c))
    # the normalised output has unit variance despite the mean of 100
    per_channel = np.moveaxis(out["numba"][0], 1, 0).reshape(c, -1).astype(np.float64)
    np.testing.assert_allclose(per_channel.var(axis=1), 1.0, rtol=1e-4)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        y1, cache1 = layers.batch_norm_forward(x, g, b, None, None, backend="numba")
        one = (y1, *layers.batch_norm_backward(dy, cache1))
    finally:
        numba.set_num_threads(before)
    for a, r in zip(out["numba"], one):
        assert a.tobytes() == r.tobytes()


# ------------------------------------------------------------------ Dropout


def test_dropout_bits_are_precision_random_bits():
    # the reference's keep rule, spelled out from fastopt.precision
    mask = layers.DropoutMask(0.25, 7, 3, (5, 8), np.dtype(np.float32))
    bits = random_bits(7, 3, np.arange(40)).reshape(5, 8)
    assert mask.threshold == 2**30
    np.testing.assert_array_equal(mask.keep(), bits >= 2**30)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("p", [0.0, 1e-3, 0.3, 0.5, 0.9])
@pytest.mark.parametrize("shape", [(7,), (300, 301), (2, 3, 4, 5)])
def test_dropout_numba_bit_exact_with_reference(dtype, p, shape):
    rng = np.random.default_rng(4)
    x = rng.standard_normal(shape).astype(dtype)
    ys = [layers.dropout_forward(x, p, 11, 5, backend=b)[0] for b in BACKENDS]
    assert ys[0].dtype == dtype and ys[0].shape == shape
    assert ys[0].tobytes() == ys[1].tobytes()
    dy = rng.standard_normal(shape).astype(dtype)
    mask = layers.dropout_forward(x, p, 11, 5, backend="numpy")[1]
    dxs = [layers.dropout_backward(dy, mask, backend=b) for b in BACKENDS]
    assert dxs[0].tobytes() == dxs[1].tobytes()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_kept_fraction_scale_and_backward_mask(backend, p):
    n = 200_003
    rng = np.random.default_rng(5)
    x = rng.uniform(0.5, 2.0, n).astype(np.float32)  # no zeros: y == 0 means dropped
    y, mask = layers.dropout_forward(x, p, 123, 9, backend=backend)
    kept = y != 0
    sd = math.sqrt(n * p * (1 - p))
    assert abs(kept.sum() - n * (1 - p)) < 6 * sd  # binomial, 6 sigma
    np.testing.assert_array_equal(kept, mask.keep())
    scale = np.float32(1 / (1 - p))
    np.testing.assert_array_equal(y[kept], x[kept] * scale)
    dy = rng.uniform(0.5, 2.0, n).astype(np.float32)
    dx = layers.dropout_backward(dy, mask, backend=backend)
    np.testing.assert_array_equal(dx != 0, kept)
    np.testing.assert_array_equal(dx[kept], dy[kept] * scale)
    # a new step draws a new mask; the same (seed, step) the same one
    y2, _ = layers.dropout_forward(x, p, 123, 10, backend=backend)
    assert (y2 != 0).tolist() != kept.tolist()
    y3, _ = layers.dropout_forward(x, p, 123, 9, backend=backend)
    assert y3.tobytes() == y.tobytes()


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_p_zero_and_one(backend):
    x = np.random.default_rng(6).standard_normal((33, 3))
    y, mask = layers.dropout_forward(x, 0.0, 0, 1, backend=backend)
    assert mask.threshold == 0 and y.tobytes() == x.tobytes()
    assert mask.keep().all()
    with pytest.raises(ValueError, match=r"p: expected a number in \[0, 1\)"):
        layers.dropout_forward(x, 1.0, 0, 1, backend=backend)
    # the smallest positive threshold: p * 2**32 rounds up
    assert layers.DropoutMask(2.0**-33, 0, 0, (1,), x.dtype).threshold == 1


def test_dropout_non_contiguous_input_uses_c_order_index():
    x = np.arange(1.0, 61.0).reshape(6, 10)[:, ::2]
    y, mask = layers.dropout_forward(x, 0.5, 3, 4)
    np.testing.assert_array_equal(y != 0, mask.keep())
    np.testing.assert_array_equal(y[mask.keep()], x[mask.keep()] * 2)


# ------------------------------------------------------------------ bad input


def _bn_args(**over):
    rng = np.random.default_rng(7)
    a = dict(x=rng.standard_normal((4, 3)), gamma=np.ones(3), beta=np.zeros(3),
             running_mean=np.zeros(3), running_var=np.ones(3), momentum=0.1, eps=1e-5,
             training=True)
    a.update(over)
    return a


@pytest.mark.parametrize("over, exc, pattern", [
    (dict(x=[[1.0, 2.0]]), TypeError, "x: expected a numpy.ndarray"),
    (dict(x=np.ones((4, 3), np.int32)), TypeError,
     "x: expected dtype float32, float64, float16 or bfloat16, got int32"),
    (dict(x=np.ones((4, 3), np.float16)), ValueError,
     r"gamma: expected dtype float32 \(the statistics of a float16 x\)"),
    (dict(x=np.ones(3)), ValueError, r"x: expected shape \(N, C\)"),
    (dict(x=np.ones((1, 3))), ValueError, "more than one value per channel"),
    (dict(gamma=np.ones(4)), ValueError, r"gamma: expected shape \(3,\)"),
    (dict(beta=np.ones(3, np.float32)), ValueError, "beta: expected dtype float64"),
    (dict(running_var=None), ValueError, "both arrays or both None"),
    (dict(training=False, running_mean=None, running_var=None), ValueError,
     "expected arrays when training=False"),
    (dict(momentum=1.5), ValueError, r"momentum: expected a number in \[0, 1\]"),
    (dict(eps=0.0), ValueError, "eps: expected a number in"),
    (dict(training="yes"), TypeError, "training: expected a bool"),
])
def test_batch_norm_bad_input(over, exc, pattern):
    a = _bn_args(**over)
    rm = a["running_mean"]
    saved = None if rm is None else rm.copy()
    with pytest.raises(exc, match=pattern):
        layers.batch_norm_forward(**a)
    if rm is not None:
        np.testing.assert_array_equal(rm, saved)  # nothing written


def test_batch_norm_bad_running_stats_and_backward():
    a = _bn_args()
    ro = np.zeros(3)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="running_mean: expected a writable array"):
        layers.batch_norm_forward(**dict(a, running_mean=ro))
    with pytest.raises(ValueError, match="running_var: expected an array apart"):
        layers.batch_norm_forward(**dict(a, running_var=a["running_mean"]))
    with pytest.raises(ValueError, match="backend: expected one of"):
        layers.batch_norm_forward(**a, backend="fortran")
    np.testing.assert_array_equal(a["running_mean"], 0)
    _, cache = layers.batch_norm_forward(**a)
    with pytest.raises(ValueError, match=r"dy: expected shape \(4, 3\)"):
        layers.batch_norm_backward(np.ones((3, 4)), cache)
    with pytest.raises(ValueError, match="dy: expected dtype float64"):
        layers.batch_norm_backward(np.ones((4, 3), np.float32), cache)
    with pytest.raises(TypeError, match="cache: expected the BatchNormCache"):
        layers.batch_norm_backward(np.ones((4, 3)), {"x": 1})


@pytest.mark.parametrize("kw, exc, pattern", [
    (dict(p=-0.1), ValueError, r"p: expected a number in \[0, 1\)"),
    (dict(p=float("nan")), ValueError, "p: expected a number"),
    (dict(p="0.5"), TypeError, "p: expected a real number"),
    (dict(p=True), TypeError, "p: expected a real number"),
    (dict(seed=-1), ValueError, r"seed: expected an integer in \[0, 2\*\*64\)"),
    (dict(seed=2**64), ValueError, "seed: expected an integer"),
    (dict(step=1.0), TypeError, "step: expected an integer"),
    (dict(x=np.ones(4, np.int64)), TypeError, "x: expected dtype float32, float64, float16"),
    (dict(x=np.ones(4, np.uint16)), TypeError,
     "x: expected dtype float32, float64, float16 or bfloat16"),
    (dict(x=(1.0, 2.0)), TypeError, "x: expected a numpy.ndarray"),
])
def test_dropout_bad_input(kw, exc, pattern):
    a = dict(x=np.ones(4), p=0.5, seed=0, step=1)
    a.update(kw)
    with pytest.raises(exc, match=pattern):
        layers.dropout_forward(**a)


def test_dropout_backward_bad_input():
    _, mask = layers.dropout_forward(np.ones((2, 3), np.float32), 0.5, 0, 1)
    with pytest.raises(ValueError, match=r"dy: expected shape \(2, 3\)"):
        layers.dropout_backward(np.ones((3, 2), np.float32), mask)
    with pytest.raises(ValueError, match="dy: expected dtype float32"):
        layers.dropout_backward(np.ones((2, 3)), mask)
    with pytest.raises(TypeError, match="mask: expected the DropoutMask"):
        layers.dropout_backward(np.ones((2, 3), np.float32), 0)


# ------------------------------------------------------------------ dispatch


@needs_numba
def test_backends_and_auto(monkeypatch):
    info = layers.backends()
    assert info["numpy"] == {"available": True, "reason": None, "dtypes": layers.DTYPES,
                             "fused_16bit": False}
    assert info["numba"]["available"] and info["numba"]["fused_16bit"]
    x = np.ones((4, 2))
    monkeypatch.setenv("FASTOPT_BACKEND", "numpy")
    assert layers.batch_norm_forward(x, None, None, None, None)[1].backend.BACKEND == "numpy"
    monkeypatch.delenv("FASTOPT_BACKEND")
    assert layers.batch_norm_forward(x, None, None, None, None)[1].backend.BACKEND == "numba"


def test_cupy_backend_dispatch_without_a_gpu():
    """CuPy arrays go to the CUDA kernels (tests/test_cuda_gpu.py runs them on a GPU); here:
    the backend is listed with its reason, and NumPy arrays never reach it."""
    info = layers.backends()
    assert set(info) == {"numpy", "numba", "cupy"}
    try:
        import cupy  # noqa: F401
    except ImportError:
        assert not info["cupy"]["available"] and "cupy" in info["cupy"]["reason"].lower()
    x = np.ones((4, 2), np.float32)
    with pytest.raises(TypeError, match="backend 'cupy' takes cupy arrays, got numpy arrays"):
        layers.batch_norm_forward(x, None, None, None, None, backend="cupy")
    with pytest.raises(TypeError, match="backend 'cupy' takes cupy arrays"):
        layers.dropout_forward(x, 0.5, 0, 1, backend="cupy")


@needs_numba
def test_numba_layers_defines_every_jitted_function_it_uses():
    # Numba's cache tracks only the defining file: a helper imported from another
    # module would run stale after that module changed.
    from numba.core.registry import CPUDispatcher

    import fastopt.kernels.numba_layers as mod

    jitted = [v for v in vars(mod).values() if isinstance(v, CPUDispatcher)]
    assert jitted and all(f.py_func.__module__ == mod.__name__ for f in jitted)


@needs_numba
@pytest.mark.parametrize("block_rows", [1, 7, 300])
@pytest.mark.parametrize("c, s", [(17, 1), (3, 11)])
def test_numba_blocked_moments_merge(monkeypatch, block_rows, c, s):
    # (N, C, S) statistics are two-pass per block of rows, merged pairwise (Chan et
    # al.); 300 = 42 * 7 + 6 leaves an uneven last block.  (N, C) ones are single-pass
    # shifted sums (BLOCK_ELEMENTS does not apply): the same bounds hold
    from fastopt.kernels import numba_layers, reference_layers

    x3 = (np.random.default_rng(8).standard_normal((300, c, s)) * 0.01 + 1e4)
    monkeypatch.setattr(numba_layers, "BLOCK_ELEMENTS", c * s * block_rows)
    mean, var = numba_layers.bn_moments(x3)
    rmean, rvar = reference_layers.bn_moments(x3)
    np.testing.assert_allclose(mean, rmean, rtol=1e-14)
    np.testing.assert_allclose(var, rvar, rtol=1e-9)


@needs_numba
@pytest.mark.parametrize("first", [0.0, 1e3])
def test_numba_shifted_moments_with_a_large_mean_and_an_outlying_first_row(first):
    # (N, C) moments sum x - x[0] and its square in one pass: a mean of 1e4 cancels in
    # the shift; a first row far from the mean costs (mean - x[0])**2 / var float64
    # ulps, still far below float32's.  303 rows: 64 blocks of 4 or 5 rows, each with
    # a row left over after the groups of four
    from fastopt.kernels import numba_layers, reference_layers

    x = np.random.default_rng(9).standard_normal((303, 19)).astype(np.float32) + 1e4
    x[0] += np.float32(first)
    mean, var = numba_layers.bn_moments(x.reshape(303, 19, 1))
    rmean, rvar = reference_layers.bn_moments(x.reshape(303, 19, 1))
    np.testing.assert_allclose(mean, rmean, rtol=1e-14)
    np.testing.assert_allclose(var, rvar, rtol=1e-9)
    assert (var > 0).all()


def test_an_unavailable_backend_is_reported_with_its_reason(monkeypatch):
    monkeypatch.setattr(layers, "_FAILED", {})
    monkeypatch.setitem(layers._BACKEND_MODULES, "broken", "no_such_kernels")
    info = layers.backends()["broken"]
    assert not info["available"] and "ModuleNotFoundError" in info["reason"]
    with pytest.raises(RuntimeError, match="layers backend 'broken' is unavailable"):
        layers.dropout_forward(np.ones(3), 0.5, 0, 1, backend="broken")


# --------------------------------------------------------------------------- 16-bit inputs

SIXTEEN = ["float16", "bfloat16"]


def _np16(name):
    return np.dtype(np.float16) if name == "float16" else np.dtype(ml_dtypes.bfloat16)


def _t16(name):
    return torch.float16 if name == "float16" else torch.bfloat16


def _to_torch(a):
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())


def _from_torch(t):
    if t.dtype == torch.bfloat16:
        return t.detach().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.detach().numpy()


def _ulps_off(a, b, dtype):
    """max |a - b| in units of the dtype's epsilon times max(1, |b|)."""
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(1.0, np.abs(b)))) / float(
        ml_dtypes.finfo(dtype).eps)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", SIXTEEN)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_sixteen_bit_matches_torch(backend, name, shape, training):
    """float16/bfloat16 x with float32 statistics against torch's batch_norm on the same
    16-bit tensor (torch computes in float32 and rounds once too): within one epsilon of the
    dtype, which is the most two roundings of nearby float32 values can differ by."""
    dt = _np16(name)
    rng = np.random.default_rng([len(name), *shape, training])  # stable: str hashes vary per process
    c = shape[1]
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(np.float32).astype(dt)
    g = rng.uniform(0.5, 2.0, c).astype(np.float32)
    b = rng.standard_normal(c).astype(np.float32)
    rm = rng.standard_normal(c).astype(np.float32)
    rv = rng.uniform(0.5, 2.0, c).astype(np.float32)
    rm0, rv0 = rm.copy(), rv.copy()
    y, cache = layers.batch_norm_forward(x, g, b, rm, rv, 0.1, 1e-5, training, backend=backend)
    assert y.dtype == dt and y.shape == shape
    xt = _to_torch(x).requires_grad_()
    gt = torch.tensor(g, requires_grad=True)
    bt = torch.tensor(b, requires_grad=True)
    rmt, rvt = torch.tensor(rm0), torch.tensor(rv0)
    yt = F.batch_norm(xt, rmt, rvt, gt, bt, training, 0.1, 1e-5)
    assert yt.dtype == _t16(name)
    assert _ulps_off(y, _from_torch(yt), dt) <= 1.0
    np.testing.assert_allclose(rm, rmt.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rv, rvt.numpy(), rtol=1e-5, atol=1e-6)
    dy = rng.standard_normal(shape).astype(np.float32).astype(dt)
    dx, dg, db = layers.batch_norm_backward(dy, cache)
    assert dx.dtype == dt and dg.dtype == np.float32 and db.dtype == np.float32
    yt.backward(_to_torch(dy))
    # torch's float32 sums over at most 120 values vs our float64 ones
    assert _ulps_off(dx, _from_torch(xt.grad), dt) <= 2.0
    np.testing.assert_allclose(dg, gt.grad.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(db, bt.grad.numpy(), rtol=1e-4, atol=1e-4)


@needs_numba
@pytest.mark.parametrize("name", SIXTEEN)
def test_batch_norm_sixteen_bit_numba_matches_reference(name):
    dt = _np16(name)
    rng = np.random.default_rng(8)
    x = rng.standard_normal((37, 5, 3, 7)).astype(np.float32).astype(dt)
    dy = rng.standard_normal(x.shape).astype(np.float32).astype(dt)
    g, b = np.ones(5, np.float32) * 1.5, np.full(5, 0.25, np.float32)
    out = []
    for be in BACKENDS:
        y, cache = layers.batch_norm_forward(x, g, b, np.zeros(5, np.float32),
                                             np.ones(5, np.float32), training=True, backend=be)
        out.append((y, *layers.batch_norm_backward(dy, cache)))
    (y0, dx0, dg0, db0), (y1, dx1, dg1, db1) = out
    # the float32 kernels agree to a float32 ulp; after rounding to 16 bits that is at most
    # one 16-bit step where a float32 result sits next to a rounding boundary
    assert _ulps_off(y1, y0, dt) <= 1.0 and _ulps_off(dx1, dx0, dt) <= 1.0
    assert np.mean(y1.view(np.uint16) != y0.view(np.uint16)) < 1e-3
    np.testing.assert_allclose(dg1, dg0, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(db1, db0, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", SIXTEEN)
@pytest.mark.parametrize("p", [0.0, 0.3, 0.9])
def test_dropout_sixteen_bit_bit_exact(name, p):
    """Same mask as float32 (the bits depend on the index only), kept values the nearest
    16-bit value of float32(x) * float32(scale), and every backend gives the same bits."""
    dt = _np16(name)
    rng = np.random.default_rng(9)
    x = rng.uniform(0.5, 2.0, (301, 17)).astype(np.float32).astype(dt)
    ys = [layers.dropout_forward(x, p, 5, 2, backend=be) for be in BACKENDS]
    y, mask = ys[0]
    assert y.dtype == dt and mask.dtype == dt
    for other, _ in ys[1:]:
        assert other.tobytes() == y.tobytes()
    keep = mask.keep()
    np.testing.assert_array_equal(y != 0, keep)
    want = (x.astype(np.float32) * np.float32(1 / (1 - p))).astype(dt)
    np.testing.assert_array_equal(y[keep].view(np.uint16), want[keep].view(np.uint16))
    y32, _ = layers.dropout_forward(x.astype(np.float32), p, 5, 2)
    np.testing.assert_array_equal(y32 != 0, keep)
    dy = rng.uniform(0.5, 2.0, x.shape).astype(np.float32).astype(dt)
    dxs = [layers.dropout_backward(dy, mask, backend=be) for be in BACKENDS]
    assert all(d.tobytes() == dxs[0].tobytes() for d in dxs)
    np.testing.assert_array_equal(dxs[0] != 0, keep)
    with pytest.raises(ValueError, match=f"dy: expected dtype {name}"):
        layers.dropout_backward(dy.astype(np.float32), mask)


def test_batch_norm_sixteen_bit_bad_statistics():
    x = np.ones((4, 3), ml_dtypes.bfloat16)
    a = dict(x=x, gamma=np.ones(3, np.float32), beta=np.zeros(3, np.float32),
             running_mean=np.zeros(3, np.float32), running_var=np.ones(3, np.float32))
    with pytest.raises(TypeError, match=r"gamma: expected dtype float32 or float64 \(statistics"):
        layers.batch_norm_forward(**dict(a, gamma=np.ones(3, ml_dtypes.bfloat16)))
    with pytest.raises(TypeError, match="running_mean: expected dtype float32 or float64"):
        layers.batch_norm_forward(**dict(a, running_mean=np.zeros(3, np.float16)))
    _, cache = layers.batch_norm_forward(**a)
    with pytest.raises(ValueError, match="dy: expected dtype bfloat16"):
        layers.batch_norm_backward(np.ones((4, 3), np.float16), cache)


@needs_numba
@pytest.mark.parametrize("name", SIXTEEN)
@pytest.mark.parametrize("shape", [(37, 5), (9, 3, 5, 7), (301, 17)])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_sixteen_bit_numba_fused_is_float32_kernel_rounded(name, shape, training):
    """The numba kernels read and write 16-bit batches through their bits; the result is
    bit for bit what their float32 kernels give on the widened batch, rounded once to the
    16-bit dtype (as the reference does).  Values cover 16-bit subnormals (scaled by a small
    gamma), float16 overflow (a large gamma) and a nan channel."""
    dt = _np16(name)
    rng = np.random.default_rng([len(name), *shape, training])
    c = shape[1]
    x = (rng.standard_normal(shape) * 3 + 1).astype(np.float32).astype(dt)
    x[(0, 2) + (0,) * (len(shape) - 2)] = np.nan  # channel 2 turns nan
    dy = rng.standard_normal(shape).astype(np.float32).astype(dt)
    g = rng.uniform(0.5, 2.0, c).astype(np.float32)
    g[0], g[1] = 1e-6, 2e5  # subnormal and overflowing float16 results
    b = rng.standard_normal(c).astype(np.float32)
    b[:2] = 0.0
    stats = dict(running_mean=rng.standard_normal(c).astype(np.float32),
                 running_var=rng.uniform(0.5, 2.0, c).astype(np.float32))
    got, want = [], []
    for xs, dys, res in ((x, dy, got), (x.astype(np.float32), dy.astype(np.float32), want)):
        st = {k: v.copy() for k, v in stats.items()}
        y, cache = layers.batch_norm_forward(xs, g, b, training=training, backend="numba", **st)
        dx, dg, db = layers.batch_norm_backward(dys, cache)
        res += [y.astype(dt), dx.astype(dt), dg, db, st["running_mean"], st["running_var"]]
    assert got[0].dtype == dt and got[1].dtype == dt
    for a, w in zip(got, want):
        assert a.shape == w.shape
        bits = np.uint16 if a.dtype.itemsize == 2 else np.uint32
        same = a.view(bits) == w.view(bits)
        assert np.all(same | (np.isnan(a.astype(np.float32)) & np.isnan(w.astype(np.float32))))
    nan_y = np.isnan(got[0].astype(np.float32))  # training: the nan spreads over channel 2
    assert nan_y[:, 2].all() if training else nan_y.sum() == 1
    assert not nan_y[:, 3:].any()
    if name == "float16" and training:
        assert np.isinf(got[0][:, 1]).any()  # overflow rounds to inf as the cast does
        y0 = np.abs(got[0][:, 0].astype(np.float32))
        assert ((y0 > 0) & (y0 < ml_dtypes.finfo(dt).tiny)).any()  # subnormals


@needs_numba
@pytest.mark.parametrize("name", SIXTEEN)
def test_dropout_sixteen_bit_numba_fused_special_values(name):
    """Dropout's fused 16-bit path on the values where rounding is delicate: 16-bit
    subnormals, the largest finite values (float16: scale pushes them to inf), inf and nan;
    the same bits as the reference."""
    dt = _np16(name)
    fi = ml_dtypes.finfo(dt)
    vals = np.array([0.0, -0.0, float(fi.smallest_subnormal), -float(fi.smallest_subnormal),
                     float(fi.tiny), float(fi.max), -float(fi.max), np.inf, -np.inf, np.nan,
                     1.0, 1.0 + float(fi.eps), 3.0], np.float32)
    x = np.tile(vals, 23).astype(dt)
    for p in (0.1, 0.5):
        y0, m0 = layers.dropout_forward(x, p, 11, 3, backend="numpy")
        y1, m1 = layers.dropout_forward(x, p, 11, 3, backend="numba")
        assert y1.dtype == dt and y1.view(np.uint16).tobytes() == y0.view(np.uint16).tobytes()


@needs_numba
@pytest.mark.parametrize("hardware", [True, False], ids=["f16c", "integer"])
def test_numba_sixteen_bit_conversions_are_numpys(monkeypatch, hardware):
    """The numba layer kernels' float32 <-> 16-bit conversions, with the CPU's float16
    instructions and with the integer recipes used where the CPU has none: the bits of
    NumPy's / ml_dtypes' nearest-even casts on every float16 value, the float32 midpoints
    between neighbours (ties) and one float32 ulp either side, the subnormal and overflow
    boundaries and random bit patterns; float16 -> float32 exact on every non-nan pattern."""
    from numba import njit

    from fastopt.kernels import numba_layers as nl

    monkeypatch.setattr(nl, "HARDWARE_F16", hardware)

    @njit(cache=False)
    def convert(a, h, bf, back):
        for i in range(a.size):
            h[i] = nl._f32_to_f16(a[i])
            bf[i] = nl._f32_to_bf16(a[i])
        for i in range(back.size):
            back[i] = nl._f16_to_f32(np.uint16(i))

    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    finite = np.sort(every[np.isfinite(every)].astype(np.float32))
    mids = ((finite[1:].astype(np.float64) + finite[:-1]) / 2).astype(np.float32)
    bits = np.concatenate([finite, mids]).view(np.uint32)
    rng = np.random.default_rng(4)
    bits = np.concatenate([bits, bits + 1, bits - 1, rng.integers(0, 2**32, 1 << 16, np.uint64)
                           .astype(np.uint32), np.array([0x7F800000, 0xFF800000, 0x7FC00000,
                                                         0x477FEFFF, 0x477FF000, 0x33000000,
                                                         0x33000001, 0x387FFFFF], np.uint32)])
    a = bits.view(np.float32)
    h, bf = np.empty(a.size, np.uint16), np.empty(a.size, np.uint16)
    back = np.empty(1 << 16, np.float32)
    convert(a, h, bf, back)
    llvm = next(iter(convert.inspect_llvm().values()))
    assert ("fptrunc" in llvm) == hardware
    with np.errstate(over="ignore", invalid="ignore"):
        want_h = a.astype(np.float16).view(np.uint16)
        want_bf = a.astype(ml_dtypes.bfloat16).view(np.uint16)
    nan = np.isnan(a)
    np.testing.assert_array_equal(h[~nan], want_h[~nan])
    np.testing.assert_array_equal(bf[~nan], want_bf[~nan])
    assert np.isnan(h.view(np.float16)[nan]).all() and np.isnan(bf.view(ml_dtypes.bfloat16)[nan]).all()
    ok = ~np.isnan(every)
    np.testing.assert_array_equal(back.view(np.uint32)[ok], every.astype(np.float32).view(np.uint32)[ok])
    assert np.isnan(back[~ok]).all()
