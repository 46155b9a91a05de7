"""fastopt.torch's pointer-plan step (``Optimizer._fast_step``) against its full step.

The fast step runs the same kernels as the full one through a plan that takes the
grads' data pointers each step; every test here runs two optimizers side by side,
one with the fast step switched off, and asks for bit-identical params and state.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("numba")

import fastopt.torch as ft  # noqa: E402


def _no_fast(opt):
    opt._fast_step = lambda plan, grads, nonfinite: False
    return opt


def _pair(cls, n_params=4, size=37, dtype=torch.float32, seed=0, **opts):
    g = torch.Generator().manual_seed(seed)
    shapes = [(size,), (3, size), (size, 2), (5,)][:n_params]
    a = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in shapes]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    return cls(a, backend="numba", **opts), _no_fast(cls(b, backend="numba", **opts)), a, b


def _grads(params, step, scale=1.0, seed=1):
    g = torch.Generator().manual_seed(seed + step)
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) * scale for p in params]


def _same(a, b, oa, ob):
    for x, y in zip(a, b):
        assert torch.equal(x.detach(), y.detach())
    for x, y in zip(a, b):
        sa, sb = oa.state[x], ob.state[y]
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k


def _step_both(fa, fb, a, b, grads):
    """``grads`` on ``a``, copies of them on ``b``; one step of each; bit-identical after it."""
    for pa, pb, g in zip(a, b, grads):
        pa.grad, pb.grad = g, None if g is None else g.clone()
    fa.step()
    fb.step()
    _same(a, b, fa, fb)


def _fast_steps(opt):
    """How many of the next steps ran through the pointer plan: wraps ``_fast_step``."""
    count = [0]
    inner = opt._fast_step

    def counting(plan, grads, nonfinite):
        ok = inner(plan, grads, nonfinite)
        count[0] += ok
        return ok

    opt._fast_step = counting
    return count


@pytest.mark.parametrize("cls,opts", [
    (ft.Adam, dict(lr=1e-2)),
    (ft.AdamW, dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
    (ft.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, maximize=True)),
    (ft.NAdam, dict(lr=1e-2)),  # a group state (mu_product) kept per param by torch
    (ft.Adagrad, dict(lr=0.1, weight_decay=0.01)),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fast_step_is_bit_identical_to_the_full_step(cls, opts, dtype):
    fa, fb, a, b = _pair(cls, dtype=dtype, **opts)
    used = _fast_steps(fa)
    for t in range(6):
        _step_both(fa, fb, a, b, _grads(a, t))  # new grad tensors each step (set_to_none)
    assert used[0] >= 5  # the first step builds the plan; the rest take the fast step


def test_fast_step_falls_back_for_grads_it_cannot_take():
    fa, fb, a, b = _pair(ft.Adam, lr=1e-2)
    used = _fast_steps(fa)
    for t in range(3):
        _step_both(fa, fb, a, b, _grads(a, t))
    before = used[0]
    # a non-contiguous grad (a transposed view): the full step copies it
    g = _grads(a, 10)
    g[1] = torch.randn(a[1].shape[::-1]).t()
    assert not g[1].is_contiguous()
    _step_both(fa, fb, a, b, g)
    assert used[0] == before
    # a broadcast grad (stride 0): the full step reads a contiguous copy
    g = _grads(a, 12)
    g[0] = torch.full((1,), 0.25).expand(a[0].shape)
    before = used[0]
    _step_both(fa, fb, a, b, g)
    assert used[0] == before
    # and back to plain grads: the fast step again
    _step_both(fa, fb, a, b, _grads(a, 13))
    assert used[0] == before + 1
    # a grad with torch's lazy negation bit: its memory holds -g, the fast step must not read it
    for pa, pb, x in zip(a, b, _grads(a, 13)):
        pa.grad, pb.grad = x, x.clone()
    a[3].grad = torch._neg_view(-b[3].grad)  # the same values, memory holding their negation
    assert a[3].grad.is_neg() and torch.equal(a[3].grad, b[3].grad)
    before = used[0]
    fa.step()
    fb.step()
    _same(a, b, fa, fb)
    assert used[0] == before
    # a param without a grad this step: a new plan; that param is one step behind from now on, so its
    # group runs at two step counts (the full step, as torch keeps a step per param)
    g = _grads(a, 11)
    g[2] = None
    _step_both(fa, fb, a, b, g)
    for t in range(14, 16):
        _step_both(fa, fb, a, b, _grads(a, t))


@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
def test_non_finite_grad_after_fast_steps_writes_nothing(nonfinite):
    fa, fb, a, b = _pair(ft.Adam, lr=1e-2, nonfinite=nonfinite)
    used = _fast_steps(fa)
    for t in range(3):
        _step_both(fa, fb, a, b, _grads(a, t))
    assert used[0] >= 2
    g = _grads(a, 5)
    g[2][0, 1] = float("inf")
    for pa, pb, x in zip(a, b, g):
        pa.grad, pb.grad = x, x.clone()
    snapshot = [p.detach().clone() for p in a]
    state = {k: v.clone() for k, v in fa.state[a[0]].items()}
    if nonfinite == "raise":
        with pytest.raises(FloatingPointError):
            fa.step()
        with pytest.raises(FloatingPointError):
            fb.step()
    else:
        fa.step()
        fb.step()
    for p, s in zip(a, snapshot):
        assert torch.equal(p.detach(), s)
    for k, v in fa.state[a[0]].items():
        assert torch.equal(v, state[k]), k
    _same(a, b, fa, fb)


def test_option_changes_reach_the_fast_step():
    """An LR scheduler (lr every step), maximize switched on, weight_clip set: the same
    params as the full step each time."""
    fa, fb, a, b = _pair(ft.Adam, lr=1e-2)
    sa = torch.optim.lr_scheduler.StepLR(fa, step_size=1, gamma=0.7)
    sb = torch.optim.lr_scheduler.StepLR(fb, step_size=1, gamma=0.7)
    used = _fast_steps(fa)
    for t in range(8):
        if t == 4:
            for o in (fa, fb):
                o.param_groups[0]["maximize"] = True
        if t == 5:
            for o in (fa, fb):
                o.param_groups[0]["amsgrad"] = True  # a new state: a new plan
        if t == 6:
            for o in (fa, fb):
                o.param_groups[0]["weight_clip"] = 0.5
        _step_both(fa, fb, a, b, _grads(a, t))
        sa.step()
        sb.step()
    assert used[0] >= 6
    assert max(float(p.detach().abs().max()) for p in a) <= 0.5


def test_nesterov_switched_on_mid_run_changes_the_kernel():
    """A flag that picks the kernel's variant without changing the state (nesterov)."""
    fa, fb, a, b = _pair(ft.SGD, lr=0.1, momentum=0.9)
    for t in range(6):
        if t == 3:
            for o in (fa, fb):
                o.param_groups[0]["nesterov"] = True
        _step_both(fa, fb, a, b, _grads(a, t))


def test_grad_scaler_and_native_scale_take_the_full_step():
    fa, fb, a, b = _pair(ft.Adam, lr=1e-2)
    used = _fast_steps(fa)
    for t in range(4):
        for pa, pb, g in zip(a, b, _grads(a, t, scale=8.0)):
            pa.grad, pb.grad = g, g.clone()
        fa.step(grad_scale=8.0)
        fb.step(grad_scale=8.0)
        _same(a, b, fa, fb)
    assert used[0] == 0


def test_fast_step_reads_the_grads_in_place_each_step():
    """Grads accumulated in place (zero_grad(set_to_none=False)): same tensors, new values."""
    fa, fb, a, b = _pair(ft.SGD, lr=0.1, momentum=0.9)
    for p in a + b:
        p.grad = torch.zeros_like(p)
    used = _fast_steps(fa)
    for t in range(5):
        for pa, pb, g in zip(a, b, _grads(a, t)):
            pa.grad.copy_(g)
            pb.grad.copy_(g)
        fa.step()
        fb.step()
        _same(a, b, fa, fb)
    assert used[0] >= 4
    ref = np.asarray(a[0].detach())
    assert np.all(np.isfinite(ref))


def test_sparse_grad_after_fast_steps_is_the_full_steps_error():
    fa, fb, a, b = _pair(ft.Adam, lr=1e-2)
    used = _fast_steps(fa)
    for t in range(3):
        for pa, g in zip(a, _grads(a, t)):
            pa.grad = g
        fa.step()
    assert used[0] >= 2
    a[0].grad = a[0].grad.to_sparse()
    snapshot = [p.detach().clone() for p in a]
    with pytest.raises(RuntimeError, match="sparse"):
        fa.step()
    for p, s in zip(a, snapshot):
        assert torch.equal(p.detach(), s)


def test_cached_plan_step_skips_the_plan_lookup_and_sees_every_change():
    """``_step`` first tries the previous step's plan (``_fast_step(plan, None, ...)``), which
    checks in one pass what ``_current_plan`` checks.  Every change that would leave it with
    stale views sends the step down the full path (or to a new plan); the results stay
    those of the full step."""
    fa, fb, a, b = _pair(ft.Adam, lr=1e-2)
    used = _fast_steps(fa)
    lookups = [0]
    inner = fa._current_plan

    def counting(grads_of):
        lookups[0] += 1
        return inner(grads_of)

    fa._current_plan = counting
    for t in range(4):
        _step_both(fa, fb, a, b, _grads(a, t))
    assert used[0] == 4 and lookups[0] == 1  # the first step built the plan; no lookup since
    # an lr change (a scheduler): re-checked in place, still the cached plan
    for o in (fa, fb):
        o.param_groups[0]["lr"] = 3e-2
    _step_both(fa, fb, a, b, _grads(a, 4))
    assert used[0] == 5 and lookups[0] == 1

    def changes(k):
        # each one on both optimizers; the next step must take it into account
        if k == 0:  # a state dict replaced whole (by copies: the old views would be stale)
            for o, p in ((fa, a[1]), (fb, b[1])):
                o.state[p] = {n: v.clone() for n, v in o.state[p].items()}
        elif k == 1:  # one state tensor replaced by hand
            fa.state[a[0]]["exp_avg"] = torch.full_like(a[0], 0.5)
            fb.state[b[0]]["exp_avg"] = torch.full_like(b[0], 0.5)
        elif k == 2:  # the param's storage swapped (what module.to() does)
            a[2].data, b[2].data = a[2].detach().clone(), b[2].detach().clone()
        elif k == 3:  # a param of the group replaced by another tensor
            for o, ps in ((fa, a), (fb, b)):
                ps[3] = torch.nn.Parameter(torch.linspace(-1, 1, 5))
                o.param_groups[0]["params"][3] = ps[3]

    for k in range(4):
        changes(k)
        before = lookups[0]
        _step_both(fa, fb, a, b, _grads(a, 5 + k))
        assert lookups[0] == before + 1  # the cached plan refused: the full path looked up
        _step_both(fa, fb, a, b, _grads(a, 10 + k))
        if k < 3:  # (the new param of k == 3 starts at step 0: two step counts, the full path)
            assert lookups[0] == before + 1  # and the plan it made is the cached one again
    assert not torch.equal(fa.state[a[3]]["exp_avg"], torch.zeros(5))


def test_cached_plan_step_refuses_a_grad_whose_data_was_swapped():
    """``grad.data = ...`` changes a grad's dtype or layout without a new tensor object (nor a
    version bump): the per-step grad checks see it, and the full step raises."""
    fa, fb, a, b = _pair(ft.Adam, lr=1e-2)
    used = _fast_steps(fa)
    for t in range(3):
        _step_both(fa, fb, a, b, _grads(a, t))
    before = used[0]
    snapshot = [p.detach().clone() for p in a]
    a[0].grad.data = torch.zeros(a[0].shape, dtype=torch.float64)
    with pytest.raises(ValueError, match="the grad of a torch.float32 param"):
        fa.step()
    g = _grads(a, 7)
    g[1] = g[1].t().contiguous().t()  # a column-major grad with the param's shape
    for p, x in zip(a, g):
        p.grad = x
    assert not a[1].grad.is_contiguous()
    assert used[0] == before
    for p, s in zip(a, snapshot):
        assert torch.equal(p.detach(), s)
    fa.step()  # the full step reads a contiguous copy
    assert used[0] == before
