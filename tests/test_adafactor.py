"""Adafactor (torch.optim.Adafactor semantics; docs/design.md, "Adafactor").

Oracle: torch.optim.Adafactor in float64 over 20 steps, 0-D/1-D/2-D/3-D params, every option
set.  Parity reference <-> Numba <-> the CUDA sources on the g++ CPU harness on odd shapes
(within ``TOL``: the row, column and RMS sums are float64 sums taken in different orders).
State shapes, ``state_nbytes``, state_dict/checkpoint round trips, the functional API,
fastopt.torch against torch, and the refusals (16-bit params, 8-bit state, bad state shapes).
"""

from __future__ import annotations

import copy
import shutil

import numpy as np
import pytest

import fastopt as fo
from _cases import TOL
from test_cuda_cpu import libs, register  # noqa: F401 -- the g++ harness fixture and backend

torch = pytest.importorskip("torch")

SHAPES = [(5, 7), (3, 4, 6), (9,), (), (1, 3), (13, 1)]
ORACLE_SETS = [{}, {"weight_decay": 0.1, "maximize": True},
               {"lr": 0.05, "eps": (1e-20, 1e-3), "d": 1.5, "beta2_decay": -0.5},
               {"lr": 0.5, "eps": (None, 0.0)}]  # rho = min(lr, 1/sqrt(t)) takes over


def _numba_or_skip():
    if "numba" not in fo.backends() or not fo.backends()["numba"]["available"]:
        pytest.skip("numba is not available")


def _feed(shapes, dtype, steps, seed=0):
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s).astype(dtype) for s in shapes]
    grads = [[rng.standard_normal(s).astype(dtype) for s in shapes] for _ in range(steps)]
    return params, grads


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("k", range(len(ORACLE_SETS)))
def test_matches_torch_over_20_steps(backend, k):
    if backend == "numba":
        _numba_or_skip()
    opts = ORACLE_SETS[k]
    params, grads = _feed(SHAPES, np.float64, 20, seed=k)
    tp = [torch.tensor(p.copy(), requires_grad=True) for p in params]
    topt = torch.optim.Adafactor(tp, **opts)
    opt = fo.Adafactor(params, backend=backend, **opts)
    for gs in grads:
        for t, g in zip(tp, gs):
            t.grad = torch.tensor(g)
        topt.step()
        opt.step(gs)
    for i, (p, t) in enumerate(zip(params, tp)):
        np.testing.assert_allclose(p, t.detach().numpy(), rtol=1e-12, atol=1e-13, err_msg=f"p{i}")
        tst = topt.state[t]
        assert set(opt.state[0][i]) == set(tst) - {"step"}
        for name, a in opt.state[0][i].items():
            assert a.shape == tuple(tst[name].shape), name
            np.testing.assert_allclose(a, tst[name].numpy(), rtol=1e-12, atol=1e-15)


def test_state_shapes_and_bytes():
    """torch's state shapes; an n x m matrix keeps n + m elements (Adam: 2nm)."""
    ps = [np.zeros((256, 512), np.float32), np.zeros((2, 3, 4), np.float32), np.zeros(5, np.float32)]
    opt = fo.Adafactor(ps, backend="numpy")
    assert {k: v.shape for k, v in opt.state[0][0].items()} == {"row_var": (256, 1),
                                                                 "col_var": (1, 512)}
    assert {k: v.shape for k, v in opt.state[0][1].items()} == {"row_var": (2, 3, 1),
                                                                 "col_var": (2, 1, 4)}
    assert {k: v.shape for k, v in opt.state[0][2].items()} == {"variance": (5,)}
    matrix = fo.Adafactor(ps[:1], backend="numpy").state_nbytes()
    adam = fo.Adam(ps[:1], backend="numpy").state_nbytes()
    assert matrix == (256 + 512) * 4 and adam == 2 * 256 * 512 * 4


def _assert_matches_reference(backend, opts, shapes, dtype, steps, seed):
    """``steps`` Adafactor steps on ``backend`` and on the reference from the same params and
    grads: params and every state array agree within the dtype's tolerance."""
    params, grads = _feed(shapes, dtype, steps, seed=seed)
    want = [p.copy() for p in params]
    a = fo.Adafactor(want, backend="numpy", **opts)
    b = fo.Adafactor(params, backend=backend, **opts)
    for gs in grads:
        with np.errstate(invalid="ignore", divide="ignore"):  # the empty dims: nan, as torch
            a.step(gs)
            b.step(gs)
    for i in range(len(shapes)):
        np.testing.assert_allclose(params[i], want[i], err_msg=f"p{i}", **TOL[np.dtype(dtype)])
        for name in a.state[0][i]:
            np.testing.assert_allclose(b.state[0][i][name], a.state[0][i][name],
                                       err_msg=f"{i} {name}", **TOL[np.dtype(dtype)])


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_numba_matches_the_reference(dtype):
    _numba_or_skip()
    opts = {"lr": 0.05, "weight_decay": 0.1, "maximize": True, "clip_value": 0.8,
            "clip_global_norm": 3.0, "weight_clip": 1.5, "max_norm": 9.0, "eps": (1e-20, 1e-3)}
    shapes = SHAPES + [(37, 131), (2, 3, 33, 70), (9001,), (0, 4), (4, 0), (0,)]
    _assert_matches_reference("numba", opts, shapes, dtype, steps=5, seed=3)


def test_numba_bits_do_not_depend_on_the_thread_count():
    _numba_or_skip()
    import numba
    from fastopt.kernels import numba_cpu as nc
    shapes = [(300, 229), (70001,)]
    runs = []
    old = numba.get_num_threads()
    try:
        for threads in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            numba.set_num_threads(threads)
            params, grads = _feed(shapes, np.float32, 3, seed=4)
            opt = fo.Adafactor(params, backend="numba")
            for gs in grads:
                opt.step(gs)
            runs.append(params)
    finally:
        numba.set_num_threads(old)
    assert nc.MIN_PER_THREAD < 300 * 229  # the matrix is split between the threads
    for a, b in zip(*runs):
        assert np.array_equal(a, b)


def test_state_dict_round_trip_and_checkpoint(tmp_path):
    params, grads = _feed(SHAPES, np.float64, 6, seed=5)
    ref = [p.copy() for p in params]
    a = fo.Adafactor(ref, backend="numpy", weight_decay=0.01)
    for gs in grads[:3]:
        a.step(gs)
    b_params = [p.copy() for p in ref]
    b = fo.Adafactor(b_params, backend="numpy", weight_decay=0.01)
    b.load_state_dict(a.state_dict())
    path = tmp_path / "af.npz"
    fo.save(a, path)
    c_params = [np.zeros_like(p) for p in ref]
    c = fo.Adafactor(c_params, backend="numpy", weight_decay=0.01)
    fo.load(c, path)
    for gs in grads[3:]:
        for o in (a, b, c):
            o.step(gs)
    for x, y, z in zip(ref, b_params, c_params):
        assert np.array_equal(x, y) and np.array_equal(x, z)
    # a factor of the wrong shape is refused, naming the entry, and nothing is written
    sd = a.state_dict()
    sd["state"][0]["row_var"] = np.zeros((5, 7))
    before = {k: v.copy() for k, v in b.state[0][0].items()}
    with pytest.raises(ValueError, match=r"\['row_var'\]: expected float64 \(5, 1\)"):
        b.load_state_dict(sd)
    assert all(np.array_equal(before[k], b.state[0][0][k]) for k in before)
    sd = a.state_dict()
    sd["state"][1]["col_var"] = -np.ones((3, 1, 6))
    with pytest.raises(ValueError, match=r"\['col_var'\]: expected values >= 0"):
        b.load_state_dict(sd)
    # a non-finite factor or variance (fo.load checks a file's state the same way): refused
    for key, name in ((0, "row_var"), (2, "variance")):
        bad = a.state_dict()
        bad["state"][key][name].reshape(-1)[-1] = np.nan
        with pytest.raises(ValueError, match=rf"\[{key}\]\['{name}'\]: expected finite values"):
            b.load_state_dict(bad)
        assert all(np.array_equal(before[k], b.state[0][0][k]) for k in before)


def test_functional_matches_the_class():
    params, grads = _feed(SHAPES, np.float64, 4, seed=6)
    ref = [p.copy() for p in params]
    opt = fo.Adafactor(ref, backend="numpy", lr=0.03, weight_decay=0.1)
    fac = [len(s) >= 2 for s in SHAPES]
    rows = [np.zeros(s[:-1] + (1,)) if f else None for s, f in zip(SHAPES, fac)]
    cols = [np.zeros(s[:-2] + (1, s[-1])) if f else None for s, f in zip(SHAPES, fac)]
    vs = [None if f else np.zeros(s) for s, f in zip(SHAPES, fac)]
    for t, gs in enumerate(grads, 1):
        opt.step(gs)
        fo.functional.adafactor(params, gs, rows, cols, vs, step=t, lr=0.03, weight_decay=0.1,
                                backend="numpy")
    for p, q in zip(params, ref):
        assert np.array_equal(p, q)
    # a missing, extra or misshapen state entry: a clear error, nothing written
    p0 = [p.copy() for p in params]
    bad = [[None] + rows[1:], rows[:2] + [np.zeros(9)] + rows[3:], [np.zeros((5, 7))] + rows[1:]]
    msgs = [r"row_vars\[0\]: expected an array of shape \(5, 1\)", r"row_vars\[2\]: expected None",
            r"row_vars\[0\]: expected float64 \(5, 1\)"]
    for r, msg in zip(bad, msgs):
        with pytest.raises((TypeError, ValueError), match=msg):
            fo.functional.adafactor(params, grads[0], r, cols, vs, step=5, backend="numpy")
    assert all(np.array_equal(a, b) for a, b in zip(p0, params))


def test_refusals():
    p16 = [np.zeros((3, 4), np.float16)]
    with pytest.raises(ValueError, match=r"state_dtype: expected None, 'param', 'float32' or "
                                         r"'bfloat16' for Adafactor"):
        fo.Adafactor(p16, state_dtype="q8", min_8bit_size=0)
    with pytest.raises(ValueError, match=r"state_dtype: expected None or 'param' for Adafactor"):
        fo.Adafactor([np.zeros((300, 40), np.float32)], state_dtype="q8", min_8bit_size=0)
    with pytest.raises(ValueError, match=r"state_dtype: expected None or 'param'"):
        fo.Adafactor([np.zeros(4, np.float32)], state_dtype="bfloat16")
    for opts, msg in [({"beta2_decay": 0.1}, "beta2_decay: expected a finite number <= 0"),
                      ({"d": 0.5}, "d: expected a finite number >= 1"),
                      ({"eps": (-1.0, 1e-3)}, r"eps: expected a pair .*got \(-1.0, 0.001\)"),
                      ({"eps": (None, -1.0)}, r"eps: expected a pair .*got \(None, -1.0\)"),
                      ({"eps": 1e-3}, r"eps: expected a pair"),
                      ({"weight_decay": -1.0}, "weight_decay: expected a finite number >= 0")]:
        with pytest.raises(ValueError, match=msg):
            fo.Adafactor([np.zeros(3)], **opts)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_torch_adapter_matches_torch_and_loads_its_state(backend):
    if backend == "numba":
        _numba_or_skip()
    import fastopt.torch as fot
    a, b = _mlp(), _mlp()
    ta = torch.optim.Adafactor(a.parameters(), lr=0.02, weight_decay=0.01)
    fb = fot.Adafactor(b.parameters(), lr=0.02, weight_decay=0.01, backend=backend)
    x, y = torch.randn(11, 5, dtype=torch.float64), torch.randn(11, 3, dtype=torch.float64)
    for k in range(20):
        for m, o in ((a, ta), (b, fb)):
            o.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            o.step()
        if k == 9:  # torch's state_dict loads into fastopt.torch and back (copies: torch's
            # load keeps the very tensors it is given, which the two would then share)
            fb.load_state_dict(copy.deepcopy(ta.state_dict()))
            ta.load_state_dict(copy.deepcopy(fb.state_dict()))
    for p, q in zip(a.parameters(), b.parameters()):
        np.testing.assert_allclose(q.detach().numpy(), p.detach().numpy(), rtol=1e-12, atol=1e-13)
        for name, v in ta.state[p].items():
            assert fb.state[q][name].shape == v.shape, name
            np.testing.assert_allclose(fb.state[q][name].numpy(), v.numpy(), rtol=1e-12, atol=1e-15)
    # torch's messages
    for kw, msg in [({"beta2_decay": 0.5}, "beta2_decay should be <= 0"),
                    ({"d": 0.5}, "Clipping threshold d should be >= 1"),
                    ({"eps": (-1, 1e-3)}, "epsilon1 should be >= 0")]:
        with pytest.raises(ValueError, match=msg):
            fot.Adafactor(a.parameters(), **kw)


# --------------------------------------------------------------------------- the CUDA sources


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("layout", [dict(grid_cap=None, block=1), dict(grid_cap=3, block=1),
                                    dict(grid_cap=5, block=3)], ids=["grid", "cap3", "block3"])
def test_cuda_harness_matches_the_reference(libs, monkeypatch, dtype, layout):
    """factored.cu on the g++ CPU harness (kernels/cuda/_host.py, CudaBackend.factored)."""
    if shutil.which("g++") is None:
        pytest.skip("g++ is not on PATH")
    k = register(monkeypatch, libs, chunk_size=1024, **layout)
    opts = {"lr": 0.05, "weight_decay": 0.1, "maximize": True, "clip_value": 0.8,
            "clip_norm": 2.0, "weight_clip": 1.5, "eps": (None, 1e-3)}
    shapes = SHAPES + [(37, 131), (2, 3, 33, 7), (9001,), (0, 4), (4, 0)]
    _assert_matches_reference("cudacpu", opts, shapes, dtype, steps=4, seed=8)
    names = {n for n in k.dev.names if n.startswith("fo_af_")}  # besides the norm clip's
    assert {n[:-4] for n in names} == {"fo_af_rows", "fo_af_cols", "fo_af_rms", "fo_af_apply",
                                       "fo_af_vec", "fo_af_vec_apply"}


def test_step_temporaries_are_per_row_and_column():
    """A step allocates float64 sums per row and per column (and the O(rows + cols) factor
    updates), never per element: tests/test_memory.py leaves the factored kind to this test."""
    import tracemalloc
    backends = ["numpy"] if "numba" not in fo.backends() else ["numba"]
    for backend in backends:
        params, grads = _feed([(600, 500)], np.float32, 3, seed=9)
        opt = fo.Adafactor(params, backend=backend)
        opt.step(grads[0])
        opt.step(grads[1])
        tracemalloc.start()
        try:
            opt.step(grads[2])
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 64 * 1024 + 8 * 8 * (600 + 500), (backend, peak, params[0].nbytes)
