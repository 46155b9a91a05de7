"""Rules of issue 19 part B whose shape is not one fused elementwise pass: Muon.

The generic tests (tests/_cases.py's table: parity, torch.optim oracle, convergence,
checkpoints, bad input) cover Muon through ``param_shape``; here are the checks only
Muon has: 2-D params only, its Newton-Schulz against torch's own bfloat16 one, tall and
wide matrices bit for bit between the backends, and the functional API.
"""

import numpy as np
import pytest

import fastopt as fo
from fastopt.kernels import reference as ref

BACKENDS = [b for b in ("numpy", "numba") if fo.backends()[b]["available"]]
#: odd shapes: wide (iterated as is), tall (iterated transposed), square, a row and a column
SHAPES = [(5, 7), (9, 3), (6, 6), (1, 11), (13, 1)]


def _problem(dtype, steps=20, seed=0):
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    grads = [[rng.standard_normal(s).astype(dtype) for s in SHAPES] for _ in range(steps)]
    return params, grads


@pytest.mark.parametrize("backend", BACKENDS)
def test_muon_refuses_params_that_are_not_matrices(backend):
    bad = [np.zeros((3, 4)), np.zeros(5)]
    with pytest.raises(ValueError, match=r"params\[1\]: expected a 2-D array \(Muon updates "
                                         r"matrices only.*got shape \(5,\)"):
        fo.Muon(bad, backend=backend)
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[0\]: expected a 2-D .*"
                                         r"got shape \(2, 2, 2\)"):
        fo.Muon([{"params": [np.zeros((3, 4))]}, {"params": [np.zeros((2, 2, 2))]}], backend=backend)
    p = [np.ones((3, 4)), np.ones(5)]
    bufs = [np.zeros_like(a) for a in p]
    with pytest.raises(ValueError, match=r"params\[1\]: expected a 2-D array"):
        fo.functional.muon(p, [np.ones_like(a) for a in p], bufs, step=1, backend=backend)
    assert all((a == 1).all() for a in p) and not any(b.any() for b in bufs)  # nothing written


def test_muon_takes_float32_and_float64_only():
    with pytest.raises(TypeError, match=r"params\[0\]: expected dtype float32 or float64"):
        fo.Muon([np.zeros((3, 4), np.float16)])
    with pytest.raises(ValueError, match=r"state_dtype: expected None or 'param' for Muon"):
        fo.Muon([np.zeros((3, 4), np.float32)], state_dtype="bfloat16")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("options", [
    {}, {"nesterov": False, "momentum": 0.3, "weight_decay": 0.01},
    {"momentum": 0.5, "adjust_lr_fn": "match_rms_adamw", "clip_value": 0.5, "maximize": True,
     "weight_clip": 0.4}], ids=["default", "plain", "elementwise-pipeline"])
def test_muon_numba_is_bit_exact_with_the_reference(options, dtype):
    """The same operations in the same order on both (the products are the same NumPy calls):
    every write is one rounding of the same value, so params and buffers agree bit for bit.
    (Not the norm clips: the backends' float64 norms are summed in different orders; the
    table's pipeline case covers them within TOL.)"""
    if "numba" not in BACKENDS:
        pytest.skip("numba is not installed")  # pragma: no cover - numba is a dev dependency
    params, grads = _problem(dtype, steps=7)
    out = {}
    for be in ("numpy", "numba"):
        ps = [p.copy() for p in params]
        opt = fo.Muon(ps, lr=0.02, backend=be, **options)
        for g in grads:
            opt.step(g)
        out[be] = (ps, [st["momentum_buffer"] for st in opt.state[0]])
    for a, b in zip(out["numpy"][0] + out["numpy"][1], out["numba"][0] + out["numba"][1]):
        assert a.dtype == b.dtype == dtype
        np.testing.assert_array_equal(a, b)


def test_newton_schulz_orthogonalizes():
    """5 iterations bring every singular value of U/||U|| into torch's (0.5, 1.5) band with
    the singular vectors of U, for wide and tall matrices."""
    rng = np.random.default_rng(3)
    for shape in ((8, 20), (20, 8)):
        u = rng.standard_normal(shape)
        o = ref.newton_schulz(u, (3.4445, -4.775, 2.0315), 5, 1e-7)
        s = np.linalg.svd(o, compute_uv=False)
        assert o.shape == shape and s.min() > 0.5 and s.max() < 1.5
        uu, _, vt = np.linalg.svd(u, full_matrices=False)
        np.testing.assert_allclose(uu.T @ o @ vt.T, np.diag(np.diag(uu.T @ o @ vt.T)), atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_muon_is_close_to_torch_bfloat16_newton_schulz(backend):
    """Unpatched torch.optim.Muon (its products in bfloat16) over 20 float64 steps: the params
    agree to bfloat16's precision of the updates (8 significant bits).
    tests/test_torch_oracle.py compares with torch's same-dtype products at 1e-10."""
    torch = pytest.importorskip("torch")
    params, grads = _problem(np.float64)
    tparams = [torch.tensor(p, requires_grad=True) for p in params]
    topt = torch.optim.Muon(tparams, lr=0.02)
    ps = [p.copy() for p in params]
    opt = fo.Muon(ps, lr=0.02, backend=backend)
    for g in grads:
        for tp, gg in zip(tparams, g):
            tp.grad = torch.tensor(gg)
        topt.step()
        opt.step(g)
    for p0, p, tp in zip(params, ps, tparams):
        assert np.abs(p - p0).max() > 0.05
        # each step moves an entry by about lr*ratio (the orthogonalized update's entries are
        # O(1)); bfloat16 products get it right to ~2 ulps (2**-7): summed over the steps
        step_size = 0.02 * fo._rules.muon_lr_ratio(None, p.shape)
        np.testing.assert_allclose(p, tp.detach().numpy(), rtol=0,
                                   atol=len(grads) * step_size * 2 ** -7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_muon_functional_matches_the_class(backend):
    params, grads = _problem(np.float64, steps=5)
    ps = [p.copy() for p in params]
    opt = fo.Muon(ps, lr=0.05, nesterov=False, backend=backend)
    fs = [p.copy() for p in params]
    bufs = [np.zeros_like(p) for p in params]
    for t, g in enumerate(grads, 1):
        opt.step(g)
        fo.functional.muon(fs, g, bufs, step=t, lr=0.05, nesterov=False, backend=backend)
    for a, b in zip(ps + [st["momentum_buffer"] for st in opt.state[0]], fs + bufs):
        np.testing.assert_array_equal(a, b)
