"""The newer elementwise rules (ASGD, Rprop, AdaBelief, Yogi, AdEMAMix, LARS) against their oracles, 20 steps in float64.

ASGD and Rprop: torch.optim (2.13) on every oracle option set of the test table
(``tests/_cases.py``), params and every state array, on every CPU backend; the
functional API against the class; ASGD's ``eta`` lagging an ``lr`` schedule as
torch's does.  The parity with the reference (numba, the CUDA harness),
convergence, bad input and checkpoints are the table-driven tests of the other
files.
"""

import copy

import numpy as np
import pytest

import fastopt as fo

from _cases import INFOS

torch = pytest.importorskip("torch")

BACKENDS = [b for b in ("numpy", "numba") if fo.backends()[b]["available"]]
STEPS = 20
SIZES = (1, 7, 1001)

TORCH_RULES = [(r, o) for r in ("asgd", "rprop") for o in INFOS[r].oracle]


@pytest.fixture
def float64_default():
    # torch keeps ASGD's eta and mu (and step) in its default dtype: compare in float64
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule,opts", TORCH_RULES, ids=[f"{r}-{i}" for i, (r, _) in enumerate(TORCH_RULES)])
def test_matches_torch_optim_20_steps(float64_default, rule, opts, backend):
    info = INFOS[rule]
    rng = np.random.default_rng(11)
    params = [rng.standard_normal(s) for s in SIZES]
    tparams = [torch.tensor(p, requires_grad=True) for p in params]
    topt = getattr(torch.optim, info.torch)(tparams, **opts)
    opt = info.cls(params, backend=backend, **opts)
    for _ in range(STEPS):
        # Rprop: grads of a fixed sign pattern half the time, so step sizes grow and shrink
        grads = [rng.standard_normal(s) for s in SIZES]
        for tp, g in zip(tparams, grads):
            tp.grad = torch.tensor(g)
        topt.step()
        opt.step(grads)
    for i, (p, tp) in enumerate(zip(params, tparams)):
        np.testing.assert_allclose(p, tp.detach().numpy(), rtol=1e-12, atol=1e-14, err_msg=f"p{i}")
        tst = topt.state[tp]
        for name, a in opt.state[0][i].items():
            np.testing.assert_allclose(a, tst[name].numpy(), rtol=1e-12, atol=1e-14,
                                       err_msg=f"state[{i}][{name}]")
        for name, v in opt.group_state[0].items():  # ASGD: eta, mu for the next step
            assert v == float(tst[name]), name


def test_asgd_eta_lags_an_lr_schedule_as_torch(float64_default):
    """torch sets eta after each step from that step's lr: a schedule reaches eta a step late."""
    rng = np.random.default_rng(3)
    p = rng.standard_normal(5)
    tp = torch.tensor(p, requires_grad=True)
    lam = lambda t: 1.0 / (1 + t)  # noqa: E731
    topt = torch.optim.ASGD([tp], lr=0.1, lambd=0.01, t0=2.0)
    sched = torch.optim.lr_scheduler.LambdaLR(topt, lam)
    opt = fo.ASGD([p], lr=lambda t: 0.1 * lam(t), lambd=0.01, t0=2.0, backend="numpy")
    for _ in range(6):
        g = rng.standard_normal(5)
        tp.grad = torch.tensor(g)
        topt.step()
        sched.step()
        opt.step([g])
    np.testing.assert_allclose(p, tp.detach().numpy(), rtol=1e-13)
    np.testing.assert_allclose(opt.state[0][0]["ax"], topt.state[tp]["ax"].numpy(), rtol=1e-13)
    assert opt.group_state[0]["eta"] == float(topt.state[tp]["eta"])


def test_rprop_step_size_starts_at_lr_and_stays_in_bounds():
    p = np.zeros(4)
    opt = fo.Rprop([p], lr=0.25, etas=(0.5, 2.0), step_sizes=(0.0625, 1.0), backend="numpy")
    assert (opt.state[0][0]["step_size"] == 0.25).all()
    g = np.array([1.0, -1.0, 0.0, 1.0])
    opt.step([g])  # prev = 0: factor 1 everywhere; p -= sign(g) * 0.25
    np.testing.assert_array_equal(p, [-0.25, 0.25, 0.0, -0.25])
    opt.step([np.array([1.0, 1.0, 1.0, -1.0])])  # same, flipped, new, flipped
    np.testing.assert_array_equal(opt.state[0][0]["step_size"], [0.5, 0.125, 0.25, 0.125])
    # a flipped element does not move and forgets its grad
    np.testing.assert_array_equal(p, [-0.75, 0.25, -0.25, -0.25])
    np.testing.assert_array_equal(opt.state[0][0]["prev"], [1.0, 0.0, 1.0, 0.0])
    for _ in range(5):
        opt.step([np.ones(4)])
    assert opt.state[0][0]["step_size"].max() == 1.0  # clamped to step_sizes[1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_matches_the_class(backend):
    rng = np.random.default_rng(5)
    for rule in ("asgd", "rprop"):
        opts = dict(INFOS[rule].oracle[1])
        p1 = [rng.standard_normal(s) for s in (3, 17)]
        p2 = [a.copy() for a in p1]
        opt = INFOS[rule].cls(p1, backend=backend, **opts)
        states = {name: [np.full_like(a, init) for a in p2] for name, init in opt.rule.state(opts)}
        gstate = dict(opt.rule.group_state)
        fn = getattr(fo.functional, rule)
        for t in range(1, 8):
            grads = [rng.standard_normal(a.shape) for a in p1]
            opt.step(grads)
            args = {fo._rules.state_arg(n): v for n, v in states.items()}
            info = fn(p2, grads, **args, step=t, backend=backend, **opts, **gstate)
            gstate = dict(info.group_state[0])
        for a, b in zip(p1, p2):
            np.testing.assert_array_equal(a, b)
        assert gstate == opt.group_state[0]


def test_functional_refuses_bad_group_state():
    p = [np.zeros(3)]
    with pytest.raises(ValueError, match=r"mu: expected a number in \(0, 1\], got nan"):
        fo.functional.asgd(p, [np.ones(3)], [np.zeros(3)], step=2, mu=float("nan"))
    with pytest.raises(ValueError, match=r"eta: expected a finite number >= 0, got -1.0"):
        fo.functional.asgd(p, [np.ones(3)], [np.zeros(3)], step=2, eta=-1.0)
    assert not p[0].any()


def test_fastopt_torch_state_dict_loads_into_torch(float64_default):
    """ASGD's per-param eta/mu/ax and Rprop's prev/step_size move between the adapter and torch."""
    import fastopt.torch as ft

    for name, opts in (("ASGD", dict(lr=0.05, t0=1.0)), ("Rprop", dict(lr=0.05))):
        torch.manual_seed(0)
        a = torch.nn.Parameter(torch.randn(9))
        b = torch.nn.Parameter(a.detach().clone())
        fa = getattr(ft, name)([a], backend="numpy", **opts)
        for _ in range(3):
            a.grad = torch.randn(9)
            fa.step()
        tb = getattr(torch.optim, name)([b], **opts)
        b.data.copy_(a.data)
        tb.load_state_dict(copy.deepcopy(fa.state_dict()))  # a checkpoint: no shared tensors
        for _ in range(4):
            g = torch.randn(9)
            a.grad, b.grad = g.clone(), g.clone()
            fa.step()
            tb.step()
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


# --------------------------------------------------------------------------- optax oracles
# optax (0.2.8, CPU jax) is in the ``oracle`` extra; CI installs ``.[dev]``, which includes it.
# jax computes in float64 only with x64 on: it is switched on for these tests and restored.

#: rule -> option sets compared with optax, each exercising one of its options
OPTAX_CASES = [
    ("adabelief", dict(lr=1e-2)),
    ("adabelief", dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-8, eps_root=0.0, nesterov=True)),
    ("adabelief", dict(lr=1e-2, weight_decay=0.1, maximize=True)),
    ("yogi", dict(lr=1e-2)),
    ("yogi", dict(lr=3e-2, betas=(0.5, 0.9), eps=1e-6, weight_decay=0.1)),
    ("yogi", dict(lr=1e-2, maximize=True)),
]


def _optax_transform(optax, rule, o):
    b1, b2 = o.get("betas", (0.9, 0.999))
    if rule == "adabelief":
        tx = optax.adabelief(o["lr"], b1=b1, b2=b2, eps=o.get("eps", 1e-16),
                             eps_root=o.get("eps_root", 1e-16), nesterov=o.get("nesterov", False))
    else:
        tx = optax.yogi(o["lr"], b1=b1, b2=b2, eps=o.get("eps", 1e-3))
    if o.get("weight_decay"):  # L2: the decayed weights join the gradient before the rule
        tx = optax.chain(optax.add_decayed_weights(o["weight_decay"]), tx)
    return tx


def _run_optax(jax_x64, rule, opts, params, grads_per_step):
    optax = pytest.importorskip("optax")
    jnp = jax_x64.numpy
    tx = _optax_transform(optax, rule, opts)
    ps = [jnp.asarray(p) for p in params]
    state = tx.init(ps)
    for grads in grads_per_step:
        gs = [jnp.asarray(-g if opts.get("maximize") else g) for g in grads]
        updates, state = tx.update(gs, state, ps)
        ps = optax.apply_updates(ps, updates)
    return [np.asarray(p) for p in ps]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule,opts", OPTAX_CASES, ids=[f"{r}-{i}" for i, (r, _) in enumerate(OPTAX_CASES)])
def test_matches_optax_20_steps(jax_x64, rule, opts, backend):
    rng = np.random.default_rng(13)
    params = [rng.standard_normal(s) for s in SIZES]
    grads = [[rng.standard_normal(s) for s in SIZES] for _ in range(STEPS)]
    want = _run_optax(jax_x64, rule, opts, params, grads)
    got = [p.copy() for p in params]
    opt = INFOS[rule].cls(got, backend=backend, **opts)
    for g in grads:
        opt.step(g)
    for i, (a, b) in enumerate(zip(got, want)):
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-13, err_msg=f"params[{i}]")


# --------------------------------------------------------------------------- AdEMAMix
# Oracle: bitsandbytes' own reference implementation (``_ReferenceAdEMAMix``, plain torch, in
# the pinned bitsandbytes of the bench extra).  It rebinds alpha and beta3 while it loops over
# a group's params (each param after the first gets the warmup applied again), so it runs
# one optimizer per tensor here; fastopt applies the warmup once per step, as bitsandbytes'
# fused AdEMAMix does.

ADEMAMIX_CASES = [
    dict(lr=1e-2),
    dict(lr=1e-2, betas=(0.8, 0.99, 0.999), alpha=3.0, eps=1e-6, weight_decay=0.1),
    dict(lr=1e-2, t_alpha=7, t_beta3=12),
    dict(lr=5e-3, t_alpha=30, weight_decay=0.0, maximize=True),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opts", ADEMAMIX_CASES, ids=[f"ademamix-{i}" for i in range(len(ADEMAMIX_CASES))])
def test_ademamix_matches_bitsandbytes_reference_20_steps(float64_default, opts, backend):
    bnb_ademamix = pytest.importorskip("bitsandbytes.optim.ademamix")
    opts = dict(opts)
    bnb_opts = {k: v for k, v in opts.items() if k != "maximize"}
    bnb_opts.setdefault("weight_decay", 1e-2)  # fastopt's default is bitsandbytes' AdEMAMix's
    rng = np.random.default_rng(17)
    params = [rng.standard_normal(s) for s in SIZES]
    tparams = [torch.tensor(p, requires_grad=True) for p in params]
    topts = [bnb_ademamix._ReferenceAdEMAMix([tp], **bnb_opts) for tp in tparams]
    opt = fo.AdEMAMix(params, backend=backend, **opts)
    sign = -1.0 if opts.get("maximize") else 1.0
    for _ in range(STEPS):
        grads = [rng.standard_normal(s) for s in SIZES]
        for tp, to, g in zip(tparams, topts, grads):
            tp.grad = torch.tensor(sign * g)
            to.step()
        opt.step(grads)
    for i, (p, tp, to) in enumerate(zip(params, tparams, topts)):
        np.testing.assert_allclose(p, tp.detach().numpy(), rtol=1e-11, atol=1e-13, err_msg=f"p{i}")
        m1_m2 = to.state[tp]["m1_m2"].numpy()
        np.testing.assert_allclose(opt.state[0][i]["m1"], m1_m2[0], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(opt.state[0][i]["m2"], m1_m2[1], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(opt.state[0][i]["nu"], to.state[tp]["nu"].numpy(), rtol=1e-12)


def test_ademamix_warmups_reach_alpha_and_beta3():
    rule = fo._rules.RULES["ademamix"]
    hp = {**rule.defaults, "t_alpha": 10, "t_beta3": 10}
    s1, _ = rule.scalars(hp, 1, {})
    s10, _ = rule.scalars(hp, 10, {})
    s50, _ = rule.scalars(hp, 50, {})
    assert s1["alpha"] == pytest.approx(0.5) and s10["alpha"] == 5.0 and s50["alpha"] == 5.0
    b1, _, b3 = hp["betas"]
    assert b1 < s1["beta3"] < s10["beta3"] and s10["beta3"] == pytest.approx(b3, rel=1e-15)
    assert s50["beta3"] == b3


@pytest.mark.parametrize("betas,where", [((1.0, 0.999, 0.9999), r"betas\[0\]"),
                                         ((0.9, 0.999, 1.0), r"betas\[2\]"),
                                         ((0.9, float("nan"), 0.99), r"betas\[1\]"),
                                         ((0.9, 0.999), "betas")])
def test_ademamix_bad_betas(betas, where):
    p = np.ones(3)
    with pytest.raises(ValueError, match=where + ": expected"):
        fo.AdEMAMix([p], betas=betas)
    with pytest.raises(ValueError, match=r"betas: expected beta1 > 0 and beta3 > 0 with t_beta3"):
        fo.AdEMAMix([p], betas=(0.0, 0.999, 0.9999), t_beta3=10)


# --------------------------------------------------------------------------- the demo rows

@pytest.mark.parametrize("name", ["asgd", "rprop", "adabelief", "yogi", "ademamix"])
def test_demo_trains_with_the_new_rules(name):
    from fastopt.apps import demo as _demo

    digits = _demo.load_digits_split(seed=0)
    r = _demo.train(name, digits, epochs=1, max_steps=45, backend="numpy", seed=0)
    assert r.diverged_at is None and r.train_loss < 0.3 * r.initial_loss, name
    assert r.test_acc > 0.8, name  # chance is 0.1
    x = _demo.train_xor(name, steps=300, seed=0, backend="numpy")
    assert x.accuracy == 1.0 and x.loss < 0.05, name
