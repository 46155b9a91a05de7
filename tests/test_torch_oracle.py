"""Cross-check against torch.optim (2.13) where torch has the rule: float64, 7 steps, odd sizes.

Skips as a whole only when torch is not installed (it is an optional test
dependency: ``pip install -e ".[oracle]"``).  Run on every available CPU
backend, so the compiled kernels meet torch too.
"""

import numpy as np
import pytest

import fastopt as fo

from _cases import ORACLE, param_shape  # ORACLE: (torch.optim class, options) of every record

torch = pytest.importorskip("torch")

BACKENDS = [b for b in ("numpy", "numba") if fo.backends()[b]["available"]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,opts", ORACLE, ids=[f"{n}-{i}" for i, (n, _) in enumerate(ORACLE)])
def test_matches_torch_optim(name, opts, backend):
    # torch keeps step counters and NAdam's mu_product in the default dtype (float32 unless
    # set); fastopt computes host scalars in double, so compare with torch in float64 throughout
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        _compare(name, opts, backend)
    finally:
        torch.set_default_dtype(old)


def _newton_schulz_same_dtype(grad, ns_coefficients, ns_steps, eps):
    """torch.optim.Muon's ``_zeropower_via_newtonschulz`` without its cast to bfloat16.

    torch runs the Newton-Schulz products in bfloat16 whatever the param dtype; fastopt in
    the param's dtype.  With this in its place, torch.optim.Muon is the float64 oracle of
    everything else Muon does (the momentum lerps, the lr adjustment, the decay); the
    bfloat16 original is compared in tests/test_rules_b.py within a bfloat16 tolerance.
    """
    a, b, c = ns_coefficients
    tall = grad.size(0) > grad.size(1)
    x = grad.T if tall else grad
    x = x / x.norm().clamp(min=eps)
    for _ in range(ns_steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def _compare(name, opts, backend):
    if name == "Muon":
        from torch.optim import _muon
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(_muon, "_zeropower_via_newtonschulz", _newton_schulz_same_dtype)
            return _compare_run(name, opts, backend)
    return _compare_run(name, opts, backend)


def _compare_run(name, opts, backend):
    rng = np.random.default_rng(7)
    rule = getattr(fo, name).rule.name
    sizes = [param_shape(rule, s) for s in (1, 7, 1001)]  # Muon: matrices
    params = [rng.standard_normal(s) for s in sizes]
    tparams = [torch.tensor(p, requires_grad=True) for p in params]
    topt = getattr(torch.optim, name)(tparams, **opts)
    opt = getattr(fo, name)(params, backend=backend, **opts)
    for _ in range(7):
        grads = [rng.standard_normal(s) for s in sizes]
        for tp, g in zip(tparams, grads):
            tp.grad = torch.tensor(g)
        topt.step()
        opt.step(grads)
    for p, tp in zip(params, tparams):
        np.testing.assert_allclose(p, tp.detach().numpy(), rtol=1e-10, atol=1e-12)


def test_clip_grad_norm_matches_torch():
    rng = np.random.default_rng(0)
    gs = [rng.standard_normal(s) for s in (3, 10)]
    ts = [torch.tensor(g, requires_grad=True) for g in gs]
    for t, g in zip(ts, gs):
        t.grad = torch.tensor(g)
    want = torch.nn.utils.clip_grad_norm_(ts, 0.5)
    got = fo.functional.clip_grad_norm_(gs, 0.5)
    assert got == pytest.approx(float(want), rel=1e-12)
    for t, g in zip(ts, gs):
        np.testing.assert_allclose(g, t.grad.numpy(), rtol=1e-12)
