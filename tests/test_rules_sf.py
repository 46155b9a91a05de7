"""Schedule-Free AdamW and SGD against the ``schedulefree`` package (1.4.1), torch float64.

20 steps over odd sizes, warmup on and off, weight decay, ``r`` and ``weight_lr_power``, with
``eval()``/``train()`` switches in the middle of the run: the params (y in train mode, x in
eval mode), ``z``, ``exp_avg_sq`` and the package's ``lr_max``/``weight_sum`` must agree.
The compiled backends are held to the reference by the table-driven parity tests
(tests/_cases.py rows); here the numba backend is also run through the switches once.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastopt as fo
from fastopt import functional as F

torch = pytest.importorskip("torch")
schedulefree = pytest.importorskip("schedulefree")

SIZES = (1, 7, 33)
STEPS = 20
#: eval() after these steps, train() again two steps later (params compared in both modes)
SWITCH_AT = (6, 13)

ADAMW_OPTIONS = [
    dict(lr=0.01),
    dict(lr=0.02, warmup_steps=5, weight_decay=0.1),
    dict(lr=0.01, betas=(0.5, 0.99), eps=1e-6, r=1.0, weight_lr_power=1.0, weight_decay=0.01),
]
SGD_OPTIONS = [
    dict(lr=0.1),
    dict(lr=0.2, warmup_steps=4, weight_decay=0.05),
    dict(lr=0.1, momentum=0.5, r=0.5, weight_lr_power=0.0),
]
CASES = ([(fo.AdamWScheduleFree, schedulefree.AdamWScheduleFree, o) for o in ADAMW_OPTIONS]
         + [(fo.SGDScheduleFree, schedulefree.SGDScheduleFree, o) for o in SGD_OPTIONS])
IDS = [f"{c.__name__}-{i}" for i, (c, _, _) in enumerate(CASES)]


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(n) for n in SIZES]
    grads = [[rng.standard_normal(n) for n in SIZES] for _ in range(STEPS)]
    return params, grads


def _close(a, b, what):
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14, err_msg=what)


def _run_both(cls, tcls, options, backend="numpy"):
    params, grads = _problem()
    ours = [p.copy() for p in params]
    opt = cls(ours, backend=backend, **options)
    theirs = [torch.tensor(p.copy(), requires_grad=True) for p in params]
    topt = tcls(theirs, foreach=False, **options)
    topt.train()
    for k, gs in enumerate(grads):
        opt.step(gs)
        for t, g in zip(theirs, gs):
            t.grad = torch.tensor(g.copy())
        topt.step()
        if k in SWITCH_AT:
            opt.eval()
            topt.eval()
            assert not opt.training and opt.group_state[0]["train_mode"] == 0.0
            for i, (a, t) in enumerate(zip(ours, theirs)):
                _close(a, t.detach().numpy(), f"x of params[{i}] after step {k + 1}")
            opt.train()
            topt.train()
    return opt, ours, topt, theirs


@pytest.mark.parametrize("cls,tcls,options", CASES, ids=IDS)
def test_matches_schedulefree(cls, tcls, options):
    opt, ours, topt, theirs = _run_both(cls, tcls, options)
    for i, (a, t) in enumerate(zip(ours, theirs)):
        _close(a, t.detach().numpy(), f"y of params[{i}]")
        tst = topt.state[t]
        for name, arr in opt.state[0][i].items():
            _close(arr, tst[name].numpy(), f"state[{i}][{name}]")
    g = topt.param_groups[0]
    assert opt.group_state[0]["lr_max"] == g["lr_max"]
    np.testing.assert_allclose(opt.group_state[0]["weight_sum"], g["weight_sum"], rtol=1e-14)
    # and x, the point to evaluate
    opt.eval()
    topt.eval()
    for i, (a, t) in enumerate(zip(ours, theirs)):
        _close(a, t.detach().numpy(), f"final x of params[{i}]")


def test_numba_through_the_switches():
    pytest.importorskip("numba")
    cls, tcls, options = CASES[1]
    opt, ours, topt, theirs = _run_both(cls, tcls, options, backend="numba")
    for i, (a, t) in enumerate(zip(ours, theirs)):
        _close(a, t.detach().numpy(), f"y of params[{i}]")


def test_functional_is_the_class():
    params, grads = _problem(1)
    a = [p.copy() for p in params]
    b = [p.copy() for p in params]
    opts = dict(lr=0.02, warmup_steps=3, weight_decay=0.1, r=0.5)
    opt = fo.AdamWScheduleFree(a, backend="numpy", **opts)
    zs, vs = [p.copy() for p in b], [np.zeros_like(p) for p in b]
    gstate = {"lr_max": -1.0, "weight_sum": 0.0}
    for t, gs in enumerate(grads[:5], start=1):
        opt.step(gs)
        info = F.schedule_free_adamw(b, gs, zs, vs, step=t, backend="numpy", **opts, **gstate)
        gstate = {k: info.group_state[0][k] for k in gstate}
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert gstate == {k: opt.group_state[0][k] for k in gstate}


def test_step_in_eval_mode_is_refused_and_switches_are_idempotent():
    params, grads = _problem(2)
    opt = fo.SGDScheduleFree(params, lr=0.1, backend="numpy")
    before = [p.copy() for p in params]
    opt.eval()  # before the first step z is the param: x = y
    for p, q in zip(params, before):
        np.testing.assert_array_equal(p, q)
    with pytest.raises(RuntimeError, match="eval mode.*train\\(\\)"):
        opt.step(grads[0])
    assert opt.step_count == 0
    opt.train().step(grads[0])
    opt.step(grads[1])
    y = [p.copy() for p in params]
    opt.train()  # already training: nothing moves
    for p, q in zip(params, y):
        np.testing.assert_array_equal(p, q)
    opt.eval()
    x = [p.copy() for p in params]
    opt.eval()
    for p, q in zip(params, x):
        np.testing.assert_array_equal(p, q)
    assert any(not np.array_equal(p, q) for p, q in zip(x, y))


def test_state_dict_and_checkpoint_carry_the_mode(tmp_path):
    params, grads = _problem(3)
    opt = fo.AdamWScheduleFree(params, lr=0.01, backend="numpy")
    for gs in grads[:3]:
        opt.step(gs)
    opt.eval()
    sd = opt.state_dict()
    assert sd["group_state"][0]["train_mode"] == 0.0
    other = fo.AdamWScheduleFree([p.copy() for p in params], lr=0.01, backend="numpy")
    other.load_state_dict(sd)
    assert not other.training
    path = tmp_path / "sf.npz"
    fo.save(opt, path)
    third = fo.AdamWScheduleFree([np.zeros_like(p) for p in params], lr=0.01, backend="numpy")
    fo.load(third, path)
    assert not third.training
    for a, b in zip(third.param_groups[0]["params"], params):
        np.testing.assert_array_equal(a, b)
    # resumed in train mode, both step alike
    opt.train()
    third.train()
    opt.step(grads[3])
    third.step(grads[3])
    for a, b in zip(third.param_groups[0]["params"], params):
        np.testing.assert_array_equal(a, b)


def test_bad_options_name_the_parameter():
    p = [np.zeros(3)]
    with pytest.raises(ValueError, match=r"betas\[0\]: expected a number in \(0, 1\)"):
        fo.AdamWScheduleFree(p, betas=(0.0, 0.999))
    with pytest.raises(ValueError, match="state_dtype: .*got 'q8' \\(z is an iterate"):
        fo.AdamWScheduleFree([np.zeros(5000, np.float32)], state_dtype="q8")
    with pytest.raises(ValueError, match="lr_max: expected a finite number >= -1"):
        F.schedule_free_sgd(p, [np.ones(3)], [np.zeros(3)], step=1, lr_max=float("nan"))
    with pytest.raises(ValueError, match="weight_sum: expected a finite number >= 0"):
        F.schedule_free_sgd(p, [np.ones(3)], [np.zeros(3)], step=1, weight_sum=-1.0)
    np.testing.assert_array_equal(p[0], 0.0)  # nothing written


def test_sixteen_bit_switch_rounds_once():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = np.dtype(ml_dtypes.bfloat16)
    rng = np.random.default_rng(4)
    p32 = rng.standard_normal(17).astype(np.float32)
    p = p32.astype(bf16)
    opt = fo.SGDScheduleFree([p], lr=0.1, backend="numpy")
    for _ in range(3):
        opt.step([rng.standard_normal(17).astype(bf16)])
    z = opt.state[0][0]["z"]  # float32 state of a bfloat16 param
    assert z.dtype == np.float32
    y = p.astype(np.float32)
    opt.eval()
    want = (y + np.float32(1 - 1 / 0.9) * (z - y)).astype(bf16)
    np.testing.assert_array_equal(p.view(np.uint16), want.view(np.uint16))
