"""Rules whose shape is not one fused elementwise pass: Muon.

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


def test_muon_state_dtype_refusals():
    # q8 is taken for float32/16-bit params (tests/test_wide16.py), not for float64
    with pytest.raises(ValueError, match=r"state_dtype.*float64.*'q8'"):
        fo.Muon([np.zeros((3, 4), np.float64)], state_dtype="q8", min_8bit_size=0)
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


def test_muon_step_temporaries_are_bounded():
    """A numba Muon step allocates the Newton-Schulz iterate, its product and (with Nesterov)
    the update: at most 3 param-sized arrays plus two Gram matrices of the short side."""
    import tracemalloc

    if "numba" not in BACKENDS:
        pytest.skip("numba is not installed")  # pragma: no cover - numba is a dev dependency
    rng = np.random.default_rng(0)
    p = [rng.standard_normal((600, 150))]
    g = [rng.standard_normal((600, 150))]
    opt = fo.Muon(p, backend="numba")
    opt.step(g)  # compile, create state
    tracemalloc.start()
    try:
        opt.step(g)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * p[0].nbytes + 2 * 150 * 150 * 8 + 64 * 1024, peak


# --------------------------------------------------------------------------- fastopt.torch.Muon


def _same_dtype_ns(grad, ns_coefficients, ns_steps, eps):
    """torch.optim.Muon's Newton-Schulz without its cast to bfloat16 (see test_torch_oracle)."""
    import torch

    a, b, c = ns_coefficients
    tall = grad.size(0) > grad.size(1)
    x = grad.T if tall else grad
    x = x / x.norm().clamp(min=eps)
    for _ in range(ns_steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def _mlp(torch, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(13, 31), torch.nn.Tanh(), torch.nn.Linear(31, 17),
                               torch.nn.Tanh(), torch.nn.Linear(17, 5)).double()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", [{}, {"nesterov": False, "momentum": 0.5,
                                          "adjust_lr_fn": "match_rms_adamw"}], ids=["default", "plain"])
def test_torch_adapter_muon_with_adamw_groups_matches_torch(backend, options):
    """The README's recipe: Muon on the hidden matrices, AdamW on the rest, 20 float64 steps
    against torch.optim.Muon (same-dtype Newton-Schulz) and torch.optim.AdamW; the state
    dicts cross-load both ways."""
    torch = pytest.importorskip("torch")
    import copy

    import fastopt.torch as ft
    from torch.optim import _muon

    def split(model):
        hidden = [p for p in model.parameters() if p.ndim == 2]
        return hidden, [p for p in model.parameters() if p.ndim != 2]

    mf, mt = _mlp(torch), _mlp(torch)
    hf, rf = split(mf)
    ht, rt = split(mt)
    of = [ft.Muon(hf, lr=0.02, backend=backend, **options), ft.AdamW(rf, lr=1e-3, backend=backend)]
    ot = [torch.optim.Muon(ht, lr=0.02, **options), torch.optim.AdamW(rt, lr=1e-3)]
    gen = torch.Generator().manual_seed(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_muon, "_zeropower_via_newtonschulz", _same_dtype_ns)
        for _ in range(20):
            x = torch.randn(16, 13, generator=gen, dtype=torch.float64)
            y = torch.randint(0, 5, (16,), generator=gen)
            for o in of:
                o.zero_grad()
            torch.nn.functional.cross_entropy(mf(x), y).backward()
            for a, b in zip(mf.parameters(), mt.parameters()):
                b.grad = a.grad.clone()  # the same grads: the runs differ by the optimizers only
            for o in of + ot:
                o.step()
        for a, b in zip(mf.parameters(), mt.parameters()):
            np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), rtol=1e-10, atol=1e-12)
        # state under torch's names: torch's Muon state loads into fastopt's and back
        sd_t = copy.deepcopy(ot[0].state_dict())
        for k, st in sd_t["state"].items():
            np.testing.assert_allclose(of[0].state_dict()["state"][k]["momentum_buffer"].numpy(),
                                       st["momentum_buffer"].numpy(), rtol=1e-10, atol=1e-12)
        again = ft.Muon(split(copy.deepcopy(mf))[0], lr=0.02, backend=backend, **options)
        again.load_state_dict(sd_t)
        back = torch.optim.Muon(split(copy.deepcopy(mt))[0], lr=0.02, **options)
        back.load_state_dict(copy.deepcopy(of[0].state_dict()))


def test_torch_adapter_muon_errors_are_torchs():
    torch = pytest.importorskip("torch")
    import fastopt.torch as ft

    w, b = torch.nn.Parameter(torch.zeros(3, 4)), torch.nn.Parameter(torch.zeros(4))
    for cls in (ft.Muon, torch.optim.Muon):
        with pytest.raises(ValueError, match=r"Muon only supports 2D parameters whereas we found "
                                             r"a parameter with size: torch.Size\(\[4\]\)"):
            cls([w, b])
        with pytest.raises(ValueError, match="Learning rate should be >= 0 but is: -1"):
            cls([w], lr=-1)
        with pytest.raises(ValueError, match="momentum should be >= 0 but is: -0.1"):
            cls([w], momentum=-0.1)
        with pytest.raises(ValueError, match="weight decay should be >= 0 but is: -0.1"):
            cls([w], weight_decay=-0.1)
        with pytest.raises(ValueError, match="Adjust learning rate function rms is not supported"):
            cls([w], adjust_lr_fn="rms")
    opt = ft.Muon([w])
    with pytest.raises(ValueError, match="Muon only supports 2D parameters"):
        opt.add_param_group({"params": [b]})
    assert len(opt.param_groups) == 1
    assert ft.Muon([w]).defaults["lr"] == torch.optim.Muon([w]).defaults["lr"]
    for k, v in torch.optim.Muon([w]).defaults.items():
        assert ft.Muon([w]).defaults[k] == v, k


@pytest.mark.parametrize("backend", BACKENDS)
def test_muon_matches_torch_over_20_steps_for_every_oracle_set(backend):
    """Every option set of the table's Muon oracle, 20 float64 steps on wide, tall, square,
    row and column matrices, against torch.optim.Muon with its Newton-Schulz in float64."""
    torch = pytest.importorskip("torch")
    from torch.optim import _muon

    from _cases import INFOS, TOL

    tol = TOL[np.dtype(np.float64)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_muon, "_zeropower_via_newtonschulz", _same_dtype_ns)
        for k, opts in enumerate(INFOS["muon"].oracle):
            params, grads = _problem(np.float64, steps=20, seed=k)
            ps = [p.copy() for p in params]
            opt = fo.Muon(ps, backend=backend, **opts)
            tps = [torch.tensor(p, requires_grad=True) for p in params]
            topt = torch.optim.Muon(tps, **opts)
            for g in grads:
                for tp, gg in zip(tps, g):
                    tp.grad = torch.tensor(gg)
                topt.step()
                opt.step(g)
            for i, (p, tp) in enumerate(zip(ps, tps)):
                np.testing.assert_allclose(p, tp.detach().numpy(), err_msg=f"{opts} params[{i}]", **tol)
                np.testing.assert_allclose(opt.state[0][i]["momentum_buffer"],
                                           topt.state[tp]["momentum_buffer"].numpy(),
                                           err_msg=f"{opts} momentum_buffer[{i}]", **tol)
