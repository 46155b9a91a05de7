"""SparseAdam: torch.optim.SparseAdam oracle, reference <-> numba <-> CUDA harness parity,
fastopt.torch.SparseAdam on nn.Embedding(sparse=True), checkpoints and bad input.

SparseAdam is not in the test table (``tests/_cases.py``): its grads are ``(indices, values)``
rows, which the table's generic tests cannot make; its rule record lives in
``fastopt._rules.OWN_DRIVER_RULES`` (kind ``sparse_rows``), outside ``RULES``.
"""

from __future__ import annotations

import copy
import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile

import numpy as np
import pytest

import fastopt as fo
from _cases import TOL
from fastopt import _backend, _sparse
from fastopt.kernels import reference
from fastopt.kernels.cuda import _host

STEPS = 20
# an embedding table with an odd row width, a 3-D table (rows of shape (2, 3)), a 1-D one
SHAPES = ((13, 5), (9, 2, 3), (7,))
NNZ = (17, 6, 4)  # more than the rows: repeated indices every step


def _grads(rng, t, dtype, shapes=SHAPES):
    out = []
    for k, (shape, nnz) in enumerate(zip(shapes, NNZ)):
        if k == 1 and t % 3 == 2:
            out.append(None)  # no grad: the param's step does not advance
            continue
        idx = rng.integers(0, shape[0], nnz)
        idx[1] = idx[0]  # at least one duplicate
        vals = rng.standard_normal((nnz,) + shape[1:]).astype(dtype)
        out.append((idx, vals))
    return out


def _torch_grad(torch, g, shape):
    idx, vals = g
    return torch.sparse_coo_tensor(torch.tensor(idx)[None], torch.tensor(vals), shape)


# (the reference and Numba agree bit for bit: test_parity_reference_numba_cuda_harness)
@pytest.mark.parametrize("backend,options", [
    ("numba", {}), ("numba", {"lr": 0.05, "betas": (0.8, 0.99), "eps": 1e-6, "maximize": True}),
    ("numpy", {"lr": 0.05, "betas": (0.8, 0.99), "eps": 1e-6, "maximize": True})],
    ids=["defaults-numba", "options-numba", "options-numpy"])
def test_torch_oracle(backend, options):
    """20 float64 steps against torch.optim.SparseAdam: params and both moments, every param."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    init = [rng.standard_normal(s) for s in SHAPES]
    ps = [a.copy() for a in init]
    opt = fo.SparseAdam(ps, backend=backend, **options)
    tps = [torch.tensor(a, requires_grad=True) for a in init]
    topt = torch.optim.SparseAdam(tps, **options)
    for t in range(STEPS):
        grads = _grads(rng, t, np.float64)
        opt.step(grads)
        for tp, g, shape in zip(tps, grads, SHAPES):
            tp.grad = None if g is None else _torch_grad(torch, g, shape)
        topt.step()
    tol = TOL["sparse-adam-torch"]
    for i, tp in enumerate(tps):
        np.testing.assert_allclose(ps[i], tp.detach().numpy(), **tol)
        for name in ("exp_avg", "exp_avg_sq"):
            np.testing.assert_allclose(opt.state[0][i][name], topt.state[tp][name].numpy(), **tol)
        assert opt.state[0][i]["step"] == topt.state[tp]["step"]


# ----------------------------------------------------------------- kernel parity


def _cuda_harness():
    """The g++ build of sparse.cu (tests/test_cuda_cpu.py's harness, this one source only)."""
    if shutil.which("g++") is None:
        pytest.skip("g++ is not on PATH")
    import test_cuda_cpu as h

    with open(os.path.join(h.SHIM_DIR, "shim.h")) as f:
        shim = f.read()
    tu = h._translation_unit("sparse.cu")
    key = hashlib.sha256((shim + tu + " ".join(h.CXXFLAGS)).encode()).hexdigest()[:16]
    out_dir = os.path.join(tempfile.gettempdir(), f"fastopt-cuda-cpu-{os.getuid()}")
    os.makedirs(out_dir, exist_ok=True)
    so = os.path.join(out_dir, f"sparse-{key}.so")  # the name test_cuda_cpu's fixture uses
    if not os.path.exists(so):
        cpp, tmp = f"{so[:-3]}.{os.getpid()}.cpp", f"{so}.{os.getpid()}.tmp"
        with open(cpp, "w") as f:
            f.write(tu)
        r = subprocess.run(["g++", *h.CXXFLAGS, "-I", h.SHIM_DIR, "-o", tmp, cpp],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        os.replace(tmp, so)
    return h, {"sparse.cu": ctypes.CDLL(so)}


@pytest.fixture(scope="module")
def harness():
    return _cuda_harness()


def _kernel_run(kernel, dtype, maximize, shapes=SHAPES):
    rng = np.random.default_rng(3)
    ps = [rng.standard_normal(s).astype(dtype) for s in shapes]
    ms = [np.zeros_like(p) for p in ps]
    vs = [np.zeros_like(p) for p in ps]
    hp = dict(lr=0.01, betas=(0.9, 0.999), eps=1e-8)
    for t in range(1, 8):
        for k, g in enumerate(_grads(rng, t, dtype, shapes)):
            if g is None:
                continue
            idx, vals = g
            s, _ = _sparse.RULE.scalars(hp, t, {})
            order, starts, rows = _sparse.coalesce(idx.astype(np.int64))
            r = ps[k].shape[0]
            kernel(ps[k].reshape(r, -1), ms[k].reshape(r, -1), vs[k].reshape(r, -1),
                   vals.reshape(len(idx), -1), order, starts, rows, s, maximize)
    return ps + ms + vs


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_parity_reference_numba_cuda_harness(harness, dtype, maximize):
    """The three kernels agree bit for bit (one rounding per operation, the same order; the
    harness with one and with 3 threads per block, grid caps 1 and 2 striding over rows)."""
    numba_cpu = pytest.importorskip("fastopt.kernels.numba_cpu")
    want = _kernel_run(reference.sparse_adam_rows, dtype, maximize)
    got = _kernel_run(numba_cpu.sparse_adam_rows, dtype, maximize)
    for a, b in zip(want, got):
        np.testing.assert_array_equal(a, b)
    h, libs = harness
    for kw in (dict(block=1, grid_cap=None), dict(block=3, grid_cap=2), dict(block=1, grid_cap=1)):
        cuda = _host.CudaBackend(h.CpuDevice(libs, **kw))
        got = _kernel_run(cuda.sparse_adam_rows, dtype, maximize)
        for a, b in zip(want, got):
            np.testing.assert_array_equal(a, b)
        assert cuda.launches > 0


def test_coalesce_sums_in_order_of_appearance():
    idx = np.array([4, 1, 4, 4, 0, 1], np.int64)
    order, starts, rows = _sparse.coalesce(idx)
    assert rows.tolist() == [0, 1, 4] and starts.tolist() == [0, 1, 3, 6]
    assert order.tolist() == [4, 1, 5, 0, 2, 3]  # stable: duplicates keep their order
    vals = np.array([[1e16], [1.0], [1.0], [-1e16], [2.0], [3.0]])
    g = reference.coalesced_rows(vals, order, starts)
    # (1e16 + 1) - 1e16 = 0 in float64: left to right, as the indices appear
    assert g[:, 0].tolist() == [2.0, 4.0, 0.0]
    order, starts, rows = _sparse.coalesce(np.zeros(0, np.int64))
    assert rows.size == 0 and starts.tolist() == [0]


# ----------------------------------------------------------------- class behaviour


def test_lazy_rows_and_per_param_steps():
    p = np.ones((6, 3))
    q = np.ones(4)
    opt = fo.SparseAdam([p, q], lr=0.1, backend="numpy")
    opt.step([(np.array([2, 2]), np.ones((2, 3))), None])
    assert opt.state[0][1] == {}  # no grad: no state, no step
    np.testing.assert_array_equal(p[[0, 1, 3, 4, 5]], 1.0)  # untouched rows
    assert (p[2] < 1).all() and opt.state[0][0]["step"] == 1
    opt.step([(np.zeros(0, np.int64), np.zeros((0, 3))), (np.array([1]), np.ones(1))])
    assert opt.state[0][0]["step"] == 2 and opt.state[0][1]["step"] == 1  # torch counts nnz=0
    np.testing.assert_array_equal(q[[0, 2, 3]], 1.0)


def test_checkpoint_roundtrip(tmp_path):
    rng = np.random.default_rng(5)
    a = [rng.standard_normal(s) for s in SHAPES]
    opt = fo.SparseAdam(a, lr=0.02, backend="numpy")
    for t in range(3):
        opt.step(_grads(rng, t, np.float64))
    fo.save(opt, tmp_path / "sa.npz")
    b = [np.zeros(s) for s in SHAPES]
    opt2 = fo.SparseAdam(b, lr=0.02, backend="numpy")
    fo.load(opt2, tmp_path / "sa.npz")
    g = _grads(rng, 3, np.float64)
    opt.step(g)
    opt2.step(g)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert opt2.state[0][0]["step"] == opt.state[0][0]["step"] == 4
    sd = opt.state_dict()
    sd["state"][0]["exp_avg_sq"] = -sd["state"][0]["exp_avg_sq"] - 1
    with pytest.raises(ValueError, match="exp_avg_sq"):
        opt2.load_state_dict(sd)


def test_bad_input_writes_nothing():
    p = np.ones((5, 2))
    opt = fo.SparseAdam([p], backend="numpy")
    cases = [
        ([np.ones((5, 2))], TypeError, "does not support dense gradients.*pair \\(indices, values\\)"),
        ([(np.array([1]), np.ones((1, 3)))], ValueError, "values: expected shape \\(1, 2\\)"),
        ([(np.array([5]), np.ones((1, 2)))], ValueError, "indices: expected row numbers in \\[0, 5\\)"),
        ([(np.array([1.0]), np.ones((1, 2)))], TypeError, "indices: expected a 1-D integer array"),
        ([(np.array([1]), np.ones((1, 2), np.float32))], ValueError, "dtype float64"),
        ([(np.array([1]), np.array([[np.nan, 1.0]]))], FloatingPointError, "non-finite"),
        ([], ValueError, "expected 1 entries"),
    ]
    for grads, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            opt.step(grads)
    np.testing.assert_array_equal(p, 1.0)
    assert opt.state[0][0] == {}
    skip = fo.SparseAdam([p], nonfinite="skip", backend="numpy")
    assert skip.step([(np.array([1]), np.array([[np.inf, 1.0]]))]) is False
    np.testing.assert_array_equal(p, 1.0)
    for kw, exc, msg in [({"lr": 0.0}, ValueError, "lr"), ({"eps": -1.0}, ValueError, "eps"),
                         ({"betas": (1.0, 0.9)}, ValueError, "betas\\[0\\]"),
                         ({"clip_norm": 1.0}, ValueError, "clip_norm: SparseAdam does not take"),
                         ({"state_dtype": "q8"}, ValueError, "state_dtype.*re-quantize"),
                         ({"amsgrad": True}, TypeError, "amsgrad")]:
        with pytest.raises(exc, match=msg):
            fo.SparseAdam([p], **kw)
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
        fo.SparseAdam([np.ones((3, 2), np.int32)])


def test_functional_matches_class():
    rng = np.random.default_rng(9)
    a = rng.standard_normal((8, 3))
    b = a.copy()
    opt = fo.SparseAdam([a], lr=0.03, backend="numpy")
    m, v = np.zeros_like(b), np.zeros_like(b)
    for t in range(1, 4):
        g = (rng.integers(0, 8, 5), rng.standard_normal((5, 3)))
        opt.step([g])
        fo.functional.sparse_adam([b], [g], [m], [v], [t], lr=0.03, backend="numpy")
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="state_steps\\[0\\]: expected an int >= 1"):
        fo.functional.sparse_adam([b], [g], [m], [v], [0])


def test_fastopt_torch_embedding():
    """fastopt.torch.SparseAdam on nn.Embedding(sparse=True) against torch.optim.SparseAdam,
    and torch's state_dict loads into it."""
    torch = pytest.importorskip("torch")
    import fastopt.torch as fot

    torch.manual_seed(0)
    embs = [torch.nn.Embedding(11, 4, sparse=True).double() for _ in range(2)]
    embs[1].load_state_dict(embs[0].state_dict())
    opts = [torch.optim.SparseAdam(embs[0].parameters(), lr=0.05),
            fot.SparseAdam(embs[1].parameters(), lr=0.05)]
    gen = torch.Generator().manual_seed(1)
    for t in range(6):
        x = torch.randint(0, 11, (3, 5), generator=gen)
        if t == 4:
            # a deep copy: torch's load_state_dict keeps same-dtype tensors as they are (shared)
            opts[1].load_state_dict(copy.deepcopy(opts[0].state_dict()))
            embs[1].load_state_dict(embs[0].state_dict())
        for e, o in zip(embs, opts):
            o.zero_grad()
            (e(x) ** 2).sum().backward()
            o.step()
    torch.testing.assert_close(embs[1].weight, embs[0].weight, **TOL["sparse-adam-torch"])
    with pytest.raises(RuntimeError, match="does not support dense gradients"):
        lin = torch.nn.Linear(2, 2).double()
        o = fot.SparseAdam(lin.parameters())
        lin(torch.ones(1, 2, dtype=torch.float64)).sum().backward()
        o.step()


def test_backend_auto_resolves():
    p = np.ones((3, 2))
    opt = fo.SparseAdam([p])
    assert opt.backend in ("numba", "numpy") and opt.backend == _backend.resolve("auto", "numpy")
