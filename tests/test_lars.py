"""LARS against optax 0.2.8's ``optax.lars`` (CPU jax, float64), and its options and errors.

optax is in the ``oracle`` extra (CI installs ``.[dev]``, which includes it).  jax computes in
float64 only with x64 on: it is switched on for these tests and restored.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastopt as fo

BACKENDS = [b for b in ("numpy", "numba") if fo.backends()[b]["available"]]
STEPS = 20
SIZES = (1, 7, 1001, 5)  # the last param starts at zero: optax's zero-norm rule (trust 1)

#: option sets compared with optax: defaults, weight decay (+ eps), nesterov, momentum 0
CASES = [
    dict(lr=0.1),
    dict(lr=0.3, weight_decay=0.05, trust_coefficient=0.02, eps=1e-3),
    dict(lr=0.2, momentum=0.8, nesterov=True, weight_decay=0.01),
    dict(lr=0.5, momentum=0.0),
]


def _problem(seed=5):
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s) for s in SIZES]
    params[-1][...] = 0.0
    grads = [[rng.standard_normal(s) for s in SIZES] for _ in range(STEPS)]
    return params, grads


def _run_optax(jax, opts, params, grads_per_step):
    optax = pytest.importorskip("optax")
    jnp = jax.numpy
    o = dict(opts)
    tx = optax.lars(o.pop("lr"), **o)
    ps = [jnp.asarray(p) for p in params]
    state = tx.init(ps)
    for grads in grads_per_step:
        updates, state = tx.update([jnp.asarray(g) for g in grads], state, ps)
        ps = optax.apply_updates(ps, updates)
    return [np.asarray(p) for p in ps]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opts", CASES, ids=[f"lars-{i}" for i in range(len(CASES))])
def test_matches_optax_20_steps(jax_x64, opts, backend):
    params, grads = _problem()
    want = _run_optax(jax_x64, opts, params, grads)
    got = [p.copy() for p in params]
    opt = fo.LARS(got, backend=backend, **opts)
    for g in grads:
        opt.step(g)
    assert not np.array_equal(got[-1], params[-1])  # the zero param moved (trust 1)
    for i, (a, b) in enumerate(zip(got, want)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14, err_msg=f"params[{i}]")


@pytest.mark.parametrize("backend", BACKENDS)
def test_trust_ratio_off_is_momentum_sgd_on_the_step(backend):
    """A group with trust_ratio=False (optax's trust_ratio_mask False): m = -lr*u + mu*m."""
    params, grads = _problem(7)
    got = [p.copy() for p in params]
    opt = fo.LARS(got, lr=0.1, momentum=0.5, weight_decay=0.1, trust_ratio=False, backend=backend)
    want = [p.copy() for p in params]
    bufs = [np.zeros_like(p) for p in params]
    for g in grads[:5]:
        opt.step(g)
        for p, gi, m in zip(want, g, bufs):
            m[...] = -0.1 * (gi + 0.1 * p) + 0.5 * m
            p += m
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)


def test_functional_matches_class():
    params, grads = _problem(9)
    a = [p.copy() for p in params]
    b = [p.copy() for p in params]
    bufs = [np.zeros_like(p) for p in params]
    opt = fo.LARS(a, lr=0.2, weight_decay=0.01, nesterov=True, backend="numpy")
    for t, g in enumerate(grads[:3], start=1):
        opt.step(g)
        fo.functional.lars(b, g, bufs, step=t, lr=0.2, weight_decay=0.01, nesterov=True,
                           backend="numpy")
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("bad,name", [
    (dict(trust_coefficient=-1.0), "trust_coefficient"),
    (dict(eps=float("nan")), "eps"),
    (dict(momentum=-0.1), "momentum"),
    (dict(nesterov=1), "nesterov"),
    (dict(trust_ratio="yes"), "trust_ratio"),
    (dict(weight_decay=-1e-3), "weight_decay"),
    (dict(state_dtype="q8"), "state_dtype"),  # float64 params: no 8-bit state
])
def test_bad_options_name_the_parameter(bad, name):
    p = np.ones(5)
    with pytest.raises(ValueError, match=name):
        fo.LARS([p], backend="numpy", **bad)
    np.testing.assert_array_equal(p, np.ones(5))


# ---------------------------------------------------------------- 8-bit momentum (state_dtype="q8")

Q8_SIZES = (4999, 4096, 7)  # a partial last block; a bias below min_8bit_size keeps float32


def _q8_run(backend, steps=3, **opts):
    from fastopt import quantization as q

    rng = np.random.default_rng(11)
    params = [rng.standard_normal(n).astype(np.float32) for n in Q8_SIZES]
    opt = fo.LARS([{"params": params[:2]},
                   {"params": params[2:], "weight_decay": 0.0, "trust_ratio": False}],
                  lr=0.5, weight_decay=1e-3, state_dtype="q8", backend=backend, **opts)
    for _ in range(steps):
        opt.step([rng.standard_normal(n).astype(np.float32) for n in Q8_SIZES])
    return q, params, opt


@pytest.mark.parametrize("nesterov", [False, True])
def test_q8_momentum_is_the_decoded_float32_step_then_quantized(nesterov):
    """The definition: decode the buffer, the float32 LARS step, quantize the new buffer; the
    bias (7 elements) keeps a float32 buffer; every backend gives the reference's bits."""
    q, ref, opt = _q8_run("numpy", nesterov=nesterov)
    big = opt.state[0][0]
    assert big["momentum_buffer"].dtype == np.uint8 and big["momentum_buffer"].shape == (4999,)
    assert big["momentum_buffer_absmax"].shape == (20,)
    assert opt.state[1][0]["momentum_buffer"].dtype == np.float32  # below min_8bit_size
    # one more step by hand from the decoded state, with the float32 rule on a copy
    rng = np.random.default_rng(5)
    g = rng.standard_normal(4999).astype(np.float32)
    m = q.dequantize_blockwise(big["momentum_buffer"], big["momentum_buffer_absmax"], signed=True)
    p32 = ref[0].copy()
    f32 = fo.LARS([p32], lr=0.5, weight_decay=1e-3, nesterov=nesterov, backend="numpy")
    f32.step([np.zeros_like(g)])  # creates the buffer; then overwrite params and buffer
    p32[...] = ref[0]
    f32.state[0][0]["momentum_buffer"][...] = m
    f32.step_count = opt.step_count
    grads = [g, np.zeros(4096, np.float32), np.zeros(7, np.float32)]
    opt.step(grads)
    f32.step([g])
    np.testing.assert_array_equal(ref[0].view(np.uint32), p32.view(np.uint32))
    codes, absmax = q.quantize_blockwise(f32.state[0][0]["momentum_buffer"], signed=True)
    np.testing.assert_array_equal(big["momentum_buffer"], codes)
    np.testing.assert_array_equal(big["momentum_buffer_absmax"], absmax)
    for backend in BACKENDS[1:]:
        _, other, opt_b = _q8_run(backend, nesterov=nesterov, steps=4)
        _, same, opt_r = _q8_run("numpy", nesterov=nesterov, steps=4)
        for a, b in zip(other, same):
            np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))
        for k, v in opt_r.state[0][0].items():
            np.testing.assert_array_equal(opt_b.state[0][0][k], v)


def test_q8_bad_state_pair_names_it_and_writes_nothing():
    from fastopt import quantization as q

    p = np.ones(4999, np.float32)
    codes = np.zeros(4999, np.uint8)
    absmax = np.zeros(19, np.float32)  # 20 blocks of 256 expected
    with pytest.raises(ValueError, match=r"momentum_buffers\[0\] absmax: expected float32 \(20,\)"):
        fo.functional.lars([p], [np.ones(4999, np.float32)], [(codes, absmax)], step=1,
                           state_dtype="q8", backend="numpy")
    assert (p == 1).all() and (codes == 0).all() and (absmax == 0).all()
    with pytest.raises(TypeError, match=r"momentum_buffers\[0\]: expected a \(codes, absmax\) pair"):
        fo.functional.lars([p], [np.ones(4999, np.float32)], [np.zeros(4999, np.float32)],
                           step=1, state_dtype="q8", backend="numpy")
    assert (p == 1).all()
    pair = q.quantize_blockwise(np.zeros(4999, np.float32), signed=True)
    fo.functional.lars([p], [np.ones(4999, np.float32)], [pair], step=1, state_dtype="q8",
                       backend="numpy")
    assert (p < 1).all()  # the right pair steps
