"""8-bit block-quantized optimizer state (``state_dtype="q8"``) on the reference backend.

The definition (docs/design.md, "8-bit state format"): per tensor, decode each
8-bit state (``map[code] * absmax``), run the float32 step of the rule, write
the param from the new unquantized state, quantize the new state
(``fastopt.quantization.quantize_blockwise``).  Checked here: the reference step
against that definition built by hand (bit for bit), every rule's free-running
trajectory against the float32-state optimizer, the resync protocol (one step
from the same decoded state), ``min_8bit_size``, state dicts and checkpoints,
``state_nbytes`` and bad input.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import fastopt as fo
from fastopt import precision as prec
from fastopt import quantization as q

F32 = np.dtype(np.float32)
N_BIG = 4096 + 3 * 256 + 77     # above min_8bit_size, with a partial last block
N_SMALL = 300                   # below it: float32 state


def _grads(rng, params):
    return [rng.standard_normal(p.shape).astype(np.float32) for p in params]


# ---------------------------------------------------------------------------------- definition


def _hand_adam(p, m_q, v_q, g, t, lr=1e-2, b1=0.9, b2=0.999, eps=1e-8):
    """One Adam step on one float32 tensor with 8-bit moments, written from the definition."""
    m = q.dequantize_blockwise(*m_q, signed=True)
    v = q.dequantize_blockwise(*v_q, signed=False)
    bc1 = 1 - b1 ** t
    bc2_sqrt = math.sqrt(1 - b2 ** t)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    p = p - lr / bc1 * m / (np.sqrt(v) / bc2_sqrt + eps)
    return p, q.quantize_blockwise(m, signed=True), q.quantize_blockwise(v, signed=False)


def test_reference_step_is_the_definition_bit_for_bit():
    rng = np.random.default_rng(1)
    params = [rng.standard_normal(n).astype(np.float32) for n in (N_BIG, 4096, 2 * 4096 + 1)]
    hand = [p.copy() for p in params]
    ms = [q.quantize_blockwise(np.zeros(p.shape, F32), signed=True) for p in params]
    vs = [q.quantize_blockwise(np.zeros(p.shape, F32), signed=False) for p in params]
    opt = fo.Adam(params, lr=1e-2, state_dtype="q8", backend="numpy")
    for t in range(1, 5):
        grads = _grads(rng, params)
        opt.step(grads)
        for i, g in enumerate(grads):
            hand[i], ms[i], vs[i] = _hand_adam(hand[i], ms[i], vs[i], g, t)
    for i, p in enumerate(params):
        st = opt.state[0][i]
        np.testing.assert_array_equal(p.view(np.uint32), hand[i].view(np.uint32))
        np.testing.assert_array_equal(st["exp_avg"], ms[i][0])
        np.testing.assert_array_equal(st["exp_avg_absmax"].view(np.uint32), ms[i][1].view(np.uint32))
        np.testing.assert_array_equal(st["exp_avg_sq"], vs[i][0])
        np.testing.assert_array_equal(st["exp_avg_sq_absmax"].view(np.uint32),
                                      vs[i][1].view(np.uint32))
        assert st["exp_avg"].dtype == np.uint8 and st["exp_avg"].shape == p.shape
        assert st["exp_avg_absmax"].shape == (-(-p.size // 256),)


def test_bfloat16_params_with_q8_state_and_stochastic_rounding_follow_the_definition():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = np.dtype(ml_dtypes.bfloat16)
    rng = np.random.default_rng(2)
    p0 = rng.standard_normal(N_BIG).astype(np.float32).astype(bf16)
    p = p0.copy()
    opt = fo.Adam([p], lr=1e-2, state_dtype="q8", stochastic_rounding=True, seed=7,
                  backend="numpy")
    hand = p0.copy()
    m_q = q.quantize_blockwise(np.zeros(p.shape, F32), signed=True)
    v_q = q.quantize_blockwise(np.zeros(p.shape, F32), signed=False)
    for t in range(1, 4):
        g = rng.standard_normal(p.shape).astype(np.float32)
        opt.step([g])
        work, m_q, v_q = _hand_adam(prec.to_float32(hand), m_q, v_q, g, t)
        hand = prec.round_to(work, bf16, stochastic_rounding=True, seed=7, step=t,
                             index=prec.element_index(hand.size))
    np.testing.assert_array_equal(p.view(np.uint16), hand.view(np.uint16))
    np.testing.assert_array_equal(opt.state[0][0]["exp_avg_sq"], v_q[0])


def test_float16_params_with_q8_state_follow_the_definition():
    rng = np.random.default_rng(12)
    p0 = rng.standard_normal(N_BIG).astype(np.float16)
    p = p0.copy()
    opt = fo.Adam([p], lr=1e-2, state_dtype="q8", backend="numpy")
    hand = p0.copy()
    m_q = q.quantize_blockwise(np.zeros(p.shape, F32), signed=True)
    v_q = q.quantize_blockwise(np.zeros(p.shape, F32), signed=False)
    for t in range(1, 4):
        g = rng.standard_normal(p.shape).astype(np.float16)
        opt.step([g])
        work, m_q, v_q = _hand_adam(hand.astype(np.float32), m_q, v_q, g.astype(np.float32), t)
        hand = work.astype(np.float16)  # NumPy's cast is round to nearest even
    np.testing.assert_array_equal(p.view(np.uint16), hand.view(np.uint16))
    np.testing.assert_array_equal(opt.state[0][0]["exp_avg"], m_q[0])


def test_master_weights_stay_float32_beside_q8_moments():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    p = np.ones(N_BIG, np.float32).astype(ml_dtypes.bfloat16)
    opt = fo.AdamW([p], state_dtype="q8", master_weights=True, backend="numpy")
    opt.step([np.full(p.shape, 0.5, np.float32)])
    st = opt.state[0][0]
    assert st["master"].dtype == F32 and st["exp_avg"].dtype == np.uint8
    np.testing.assert_array_equal(p.view(np.uint16), prec.round_to(st["master"], p.dtype).view(np.uint16))


def test_initial_state_is_the_quantized_initial_value():
    p = np.zeros(N_BIG, np.float32)
    opt = fo.Adagrad([p], initial_accumulator_value=0.1, state_dtype="q8")
    st = opt.state[0][0]
    decoded = q.dequantize_blockwise(st["sum"], st["sum_absmax"], signed=False)
    np.testing.assert_array_equal(decoded, np.full(p.shape, np.float32(0.1)))
    adam = fo.Adam([np.zeros(N_BIG, np.float32)], state_dtype="q8").state[0][0]
    assert (adam["exp_avg"] == q.zero_code(True)).all() and (adam["exp_avg_sq"] == q.zero_code(False)).all()
    assert not adam["exp_avg_absmax"].any()


# ---------------------------------------------------------------------------------- trajectories

# (class name, options, steps taken with the Hessian diagonal): every rule with 8-bit state, every
# variant that changes which states a step keeps; learning rates that make real progress
RULE_CASES = [
    ("SGD", dict(lr=0.05, momentum=0.9)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, dampening=0.0)),
    ("Adam", dict(lr=1e-2)),
    ("Adam", dict(lr=1e-2, amsgrad=True, weight_decay=1e-3)),
    ("AdamW", dict(lr=1e-2, weight_decay=1e-2)),
    ("NAdam", dict(lr=1e-2)),
    ("RAdam", dict(lr=1e-2)),
    ("Adamax", dict(lr=1e-2)),
    ("Adagrad", dict(lr=0.1)),
    ("RMSprop", dict(lr=1e-3)),
    ("RMSprop", dict(lr=1e-3, momentum=0.9)),
    ("Adadelta", dict(lr=1.0)),
    ("Lion", dict(lr=1e-3, weight_decay=1e-2)),
    ("AdaHessian", dict(lr=0.1)),
    ("LAMB", dict(lr=1e-2, weight_decay=1e-2)),
    # LARS: one signed momentum buffer; the trust ratio reads p and u = g + wd*p, not the state
    ("LARS", dict(lr=1.0, trust_coefficient=0.02, weight_decay=1e-3)),
    ("LARS", dict(lr=0.05, nesterov=True)),
]


def _least_squares(seed=0, m=2048, n_in=72, n_out=64, batch=64, steps=200):
    """Minibatch least squares, ``0.5/|B| * ||A_B X - B_B||^2`` over a fixed sequence of batches
    of 64 rows, ``X`` of 72 x 64 = 4608 elements (above min_8bit_size).

    Stochastic grads, as in training: with full-batch (deterministic) grads the 8-bit
    rounding of a settled moment is the same error at every step, and the trajectories
    drift apart faster (measured: Adam 0.046, RMSprop 0.085 of the distance travelled).
    """
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((m, n_in)).astype(np.float32)
    x_true = rng.standard_normal((n_in, n_out)).astype(np.float32)
    b = (a @ x_true + 0.1 * rng.standard_normal((m, n_out))).astype(np.float32)
    order = rng.integers(0, m, (steps, batch))
    hdiag = np.repeat((a * a).sum(0)[:, None] / m, n_out, axis=1).astype(np.float32)

    def grad(x, t):
        ab, bb = a[order[t]], b[order[t]]
        return (ab.T @ (ab @ x - bb) / batch).astype(np.float32)

    return np.zeros((n_in, n_out), np.float32), grad, hdiag


def _run(cls_name, options, steps, **precision):
    x0, grad, hdiag = _least_squares()
    x = x0.copy()
    opt = getattr(fo, cls_name)([x], backend="numpy", **options, **precision)
    for t in range(steps):
        if cls_name == "AdaHessian":
            opt.step([grad(x, t)], [hdiag])
        else:
            opt.step([grad(x, t)])
    return x0, x, opt


@pytest.mark.parametrize("cls_name,options", RULE_CASES,
                         ids=[f"{c}-{'-'.join(sorted(o))}" for c, o in RULE_CASES])
def test_free_running_trajectory_stays_near_the_float32_one(cls_name, options):
    """200 steps: ||p_q8 - p_32|| / ||p_32 - p_0|| < 0.05 (the trajectory criterion)."""
    x0, x32, _ = _run(cls_name, options, 200)
    _, x8, opt = _run(cls_name, options, 200, state_dtype="q8")
    assert all(a.dtype == np.uint8 for n, a in opt.state[0][0].items() if not n.endswith("_absmax"))
    moved = np.linalg.norm((x32 - x0).astype(np.float64))
    assert moved > 1.0  # the run went somewhere: the ratio means something
    ratio = np.linalg.norm((x8 - x32).astype(np.float64)) / moved
    assert ratio < 0.05, ratio


@pytest.mark.parametrize("cls_name,options", RULE_CASES,
                         ids=[f"{c}-{'-'.join(sorted(o))}" for c, o in RULE_CASES])
def test_resync_one_step_from_the_same_decoded_state(cls_name, options):
    """bitsandbytes' protocol: give the float32 optimizer the decoded 8-bit state, step both
    once with the same grad; the params agree bit for bit (the step uses the unquantized new
    state) and the new states agree within the 8-bit resolution of their block."""
    x0, x8, opt8 = _run(cls_name, options, 5, state_dtype="q8")
    _, grad, hdiag = _least_squares()
    x32 = x8.copy()
    opt32 = getattr(fo, cls_name)([x32], backend="numpy", **options)
    opt32.load_state_dict(opt8.state_dict(), convert=True)
    g = grad(x8, 5)
    extra = [[hdiag]] if cls_name == "AdaHessian" else []
    opt8.step([g], *extra)
    opt32.step([g], *extra)
    np.testing.assert_array_equal(x8.view(np.uint32), x32.view(np.uint32))
    rule = opt8.rule
    for name, a in opt32.state[0][0].items():
        st8 = opt8.state[0][0]
        absmax = st8[name + "_absmax"]
        dec = q.dequantize_blockwise(st8[name], absmax, signed=name not in rule.nonnegative_state)
        block_max = np.repeat(absmax, 256)[:a.size].reshape(a.shape)
        err = np.abs(dec - a)
        assert (err <= 0.01 * block_max).all(), (name, float((err / np.maximum(block_max, 1e-30)).max()))


# ---------------------------------------------------------------------------------- min_8bit_size


def test_min_8bit_size_keeps_small_tensors_float32_in_their_own_bucket():
    rng = np.random.default_rng(3)
    params = [rng.standard_normal(n).astype(np.float32) for n in (4095, 4096, N_SMALL, N_BIG)]
    opt = fo.Adam(params, state_dtype="q8")
    kinds = [opt.state[0][i]["exp_avg"].dtype for i in range(4)]
    assert kinds == [F32, np.uint8, F32, np.uint8]
    assert "exp_avg_absmax" not in opt.state[0][0]
    buckets = opt._buckets[0]
    assert sorted(b.index for b in buckets) == [[0, 2], [1, 3]]
    for b in buckets:
        q8 = b.precision is not None and b.precision.state is prec.Q8
        assert set(b.states) == ({"exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax"}
                                 if q8 else {"exp_avg", "exp_avg_sq"})
    # the float32-state tensors step exactly as a float32 optimizer steps them
    small = [params[0].copy(), params[2].copy()]
    ref = fo.Adam(small, backend="numpy")
    for _ in range(3):
        grads = _grads(rng, params)
        opt.step(grads)
        ref.step([grads[0], grads[2]])
    np.testing.assert_array_equal(params[0], small[0])
    np.testing.assert_array_equal(params[2], small[1])
    everything = fo.Adam([np.ones(N_SMALL, np.float32)], state_dtype="q8", min_8bit_size=0)
    assert everything.state[0][0]["exp_avg"].dtype == np.uint8


def test_functional_q8_pairs_match_the_class():
    rng = np.random.default_rng(4)
    params = [rng.standard_normal(n).astype(np.float32) for n in (N_BIG, N_SMALL)]
    mine = [p.copy() for p in params]
    opt = fo.RMSprop(params, lr=1e-3, momentum=0.9, state_dtype="q8")

    def fresh(signed):
        return [q.quantize_blockwise(np.zeros(N_BIG, F32), signed=signed), np.zeros(N_SMALL, F32)]

    sq, mom = fresh(False), fresh(True)
    for t in range(1, 4):
        grads = _grads(rng, params)
        opt.step(grads)
        fo.functional.rmsprop(mine, grads, sq, mom, step=t, lr=1e-3, momentum=0.9,
                              state_dtype="q8")
    for a, b in zip(params, mine):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(sq[0][0], opt.state[0][0]["square_avg"])
    np.testing.assert_array_equal(mom[0][1], opt.state[0][0]["momentum_buffer_absmax"])
    np.testing.assert_array_equal(sq[1], opt.state[0][1]["square_avg"])


# ---------------------------------------------------------------------------------- state dicts


def _stepped(cls=fo.Adam, steps=3, seed=5, **options):
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(n).astype(np.float32) for n in (N_BIG, N_SMALL)]
    opt = cls(params, lr=1e-2, **options)
    for _ in range(steps):
        opt.step(_grads(rng, params))
    return opt, params


def _state_bits(opt):
    return [{k: a.tobytes() for k, a in st.items()} for st in opt.state[0]]


def test_state_dict_records_codes_absmax_maps_and_precision():
    opt, _ = _stepped(state_dtype="q8")
    sd = opt.state_dict()
    assert sd["q8"] == {"blocksize": 256, "maps": {"exp_avg": "dynamic_signed",
                                                   "exp_avg_sq": "dynamic_unsigned"}}
    assert sd["precision"] == {"state_dtype": "q8", "master_weights": False,
                               "stochastic_rounding": False, "seed": 0, "min_8bit_size": 4096}
    assert set(sd["state"][0]) == {"exp_avg", "exp_avg_absmax", "exp_avg_sq", "exp_avg_sq_absmax"}
    assert set(sd["state"][1]) == {"exp_avg", "exp_avg_sq"}  # below min_8bit_size


def test_state_dict_round_trip_is_bit_exact_and_resumes_the_run():
    opt, params = _stepped(state_dtype="q8")
    sd = opt.state_dict()
    twin = fo.Adam([p.copy() for p in params], lr=1e-2, state_dtype="q8")
    twin.load_state_dict(sd)
    assert _state_bits(twin) == _state_bits(opt)
    rng = np.random.default_rng(9)
    for _ in range(2):
        g = _grads(rng, params)
        opt.step(g)
        twin.step(g)
    assert _state_bits(twin) == _state_bits(opt)
    for a, b in zip(params, [p for p in twin.param_groups[0]["params"]]):
        np.testing.assert_array_equal(a, b)


def test_checkpoint_round_trip_is_bit_exact(tmp_path):
    opt, params = _stepped(state_dtype="q8", seed=6)
    path = tmp_path / "q8.npz"
    fo.save(opt, path)
    twin = fo.Adam([np.zeros_like(p) for p in params], lr=1e-2, state_dtype="q8")
    fo.load(twin, path)
    assert _state_bits(twin) == _state_bits(opt)
    for a, b in zip(params, twin.param_groups[0]["params"]):
        np.testing.assert_array_equal(a, b)
    plain = fo.Adam([np.zeros_like(p) for p in params], lr=1e-2)
    with pytest.raises(ValueError, match=r"state_dtype'\]: expected None .* got 'q8'; pass convert=True"):
        fo.load(plain, path)
    fo.load(plain, path, convert=True)
    st = plain.state[0][0]
    want = q.dequantize_blockwise(opt.state[0][0]["exp_avg"], opt.state[0][0]["exp_avg_absmax"], True)
    np.testing.assert_array_equal(st["exp_avg"], want)


def test_checkpoint_keeps_bfloat16_bits_and_the_seed(tmp_path):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = np.dtype(ml_dtypes.bfloat16)
    rng = np.random.default_rng(8)
    params = [rng.standard_normal(N_BIG).astype(np.float32).astype(bf16)]
    opt = fo.Adam(params, state_dtype="bfloat16", stochastic_rounding=True, seed=3)
    opt.step([rng.standard_normal(N_BIG).astype(np.float32)])
    path = tmp_path / "bf16.npz"
    fo.save(opt, path)
    twin = fo.Adam([np.zeros(N_BIG, bf16)], state_dtype="bfloat16", stochastic_rounding=True, seed=3)
    fo.load(twin, path)
    assert twin.state[0][0]["exp_avg"].dtype == bf16
    assert _state_bits(twin) == _state_bits(opt)
    np.testing.assert_array_equal(twin.param_groups[0]["params"][0].view(np.uint16),
                                  params[0].view(np.uint16))
    other = fo.Adam([np.zeros(N_BIG, bf16)], state_dtype="bfloat16", stochastic_rounding=True, seed=4)
    before = _state_bits(other)
    with pytest.raises(ValueError, match=r"\['precision'\]\['seed'\]: expected 4 .* got 3"):
        fo.load(other, path)
    assert _state_bits(other) == before


def test_convert_both_ways_quantizes_and_decodes_explicitly():
    f32, params = _stepped()
    q8 = fo.Adam([p.copy() for p in params], lr=1e-2, state_dtype="q8")
    with pytest.raises(ValueError, match=r"state_dtype'\]: expected 'q8' .* got None; pass convert=True"):
        q8.load_state_dict(f32.state_dict())
    sd = f32.state_dict()
    del sd["precision"]  # an older state dict: the arrays themselves are refused
    with pytest.raises(ValueError, match=r"\[0\]\['exp_avg'\]: expected an 8-bit state .* "
                                         r"pass convert=True to quantize it"):
        q8.load_state_dict(sd)
    q8.load_state_dict(f32.state_dict(), convert=True)
    for name, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        codes, absmax = q.quantize_blockwise(f32.state[0][0][name], signed=signed)
        np.testing.assert_array_equal(q8.state[0][0][name], codes)
        np.testing.assert_array_equal(q8.state[0][0][name + "_absmax"], absmax)
        np.testing.assert_array_equal(q8.state[0][1][name], f32.state[0][1][name])  # small: as is
    back = fo.Adam([p.copy() for p in params], lr=1e-2)
    sd = q8.state_dict()
    del sd["precision"]
    with pytest.raises(ValueError, match=r"\[0\]\['exp_avg'\]: expected a float32 array .* "
                                         r"pass convert=True to decode it"):
        back.load_state_dict(sd)
    back.load_state_dict(q8.state_dict(), convert=True)
    st = q8.state[0][0]
    np.testing.assert_array_equal(back.state[0][0]["exp_avg_sq"], q.dequantize_blockwise(
        st["exp_avg_sq"], st["exp_avg_sq_absmax"], signed=False))


@pytest.mark.parametrize("edit,pattern", [
    (lambda sd: sd["q8"]["maps"].__setitem__("exp_avg", "dynamic_unsigned"),
     r"state_dict\['q8'\]\['maps'\]\['exp_avg'\]: expected 'dynamic_signed'"),
    (lambda sd: sd["q8"].__setitem__("blocksize", 128), r"state_dict\['q8'\]: expected \{'blocksize': 256"),
    (lambda sd: sd.pop("q8"), r"state_dict\['q8'\]: missing"),
    (lambda sd: sd["state"][0].__setitem__("exp_avg_absmax", np.zeros(3, np.float32)),
     r"\['exp_avg_absmax'\]: expected float32 \(20,\)"),
    (lambda sd: sd["state"][0]["exp_avg_sq_absmax"].__setitem__(4, np.nan),
     r"\['exp_avg_sq_absmax'\]: expected finite values, got nan at flat index 4"),
    (lambda sd: sd["state"][0]["exp_avg_absmax"].__setitem__(2, -1.0),
     r"\['exp_avg_absmax'\]: expected values >= 0"),
    (lambda sd: sd["state"][0].__setitem__("exp_avg", sd["state"][0]["exp_avg"].astype(np.int8)),
     r"\['exp_avg'\]: expected uint8 codes of shape \(4941,\)"),
    (lambda sd: sd["precision"].__setitem__("seed", 1), r"\['precision'\]\['seed'\]: expected 0"),
    (lambda sd: sd["precision"].__setitem__("stochastic_rounding", True),
     r"\['precision'\]\['stochastic_rounding'\]: expected False"),
    (lambda sd: sd["precision"].__setitem__("min_8bit_size", 0),
     r"\['precision'\]\['min_8bit_size'\]: expected 4096 .* pass convert=True"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_bad_q8_state_dicts_are_refused_and_nothing_is_written(edit, pattern):
    opt, params = _stepped(state_dtype="q8")
    sd = opt.state_dict()
    edit(sd)
    before, pbefore = _state_bits(opt), [p.copy() for p in params]
    with pytest.raises(ValueError, match=pattern):
        opt.load_state_dict(sd)
    assert _state_bits(opt) == before
    for a, b in zip(params, pbefore):
        np.testing.assert_array_equal(a, b)


def test_precision_options_mismatch_is_an_error_even_with_convert():
    opt, params = _stepped(state_dtype="q8")
    other = fo.Adam([p.copy() for p in params], lr=1e-2, state_dtype="q8", seed=5)
    before = _state_bits(other)
    with pytest.raises(ValueError, match=r"\['precision'\]\['seed'\]: expected 5 \(this optimizer's "
                                         r"seed\), got 0 \(a resumed run must use the options"):
        other.load_state_dict(opt.state_dict(), convert=True)
    assert _state_bits(other) == before
    same = fo.Adam([p.copy() for p in params], lr=1e-2, state_dtype="q8", seed=0)
    same.load_state_dict(opt.state_dict())
    assert _state_bits(same) == _state_bits(opt)
    with pytest.raises(TypeError, match=r"convert: expected True or False"):
        opt.load_state_dict(opt.state_dict(), convert="yes")


# ---------------------------------------------------------------------------------- bytes


def test_state_nbytes_per_format_matches_the_table():
    n = 256 * 40
    table = q.bytes_per_param_table(n=n)
    for fmt in ("float32", "bfloat16", "q8"):
        opt = fo.Adam([np.zeros(n, np.float32)], state_dtype=fmt)
        assert opt.state_nbytes() == table[fmt] * n, fmt
    assert table == {"float32": 8.0, "bfloat16": 4.0, "q8": 2.03125}
    mixed = fo.Adam([np.zeros(n, np.float32), np.zeros(N_SMALL, np.float32)], state_dtype="q8")
    assert mixed.state_nbytes() == 2 * (n + 4 * 40) + 8 * N_SMALL


# ---------------------------------------------------------------------------------- bad input


def test_newton_and_float64_refuse_q8():
    with pytest.raises(ValueError, match=r"state_dtype: expected None for Newton, got 'q8'"):
        fo.Newton([np.ones(3, np.float32)], state_dtype="q8")
    with pytest.raises(ValueError, match=r"state_dtype: .*float64.* got 'q8'"):
        fo.Adam([np.ones(N_BIG)], state_dtype="q8")


def test_centered_rmsprop_refuses_q8_at_construction_step_and_functional():
    big = np.ones(N_BIG, np.float32)
    with pytest.raises(ValueError, match=r"centered: expected False with state_dtype='q8'"):
        fo.RMSprop([big.copy()], centered=True, state_dtype="q8")
    opt = fo.RMSprop([big.copy()], state_dtype="q8")
    opt.param_groups[0]["centered"] = True
    p0 = opt.param_groups[0]["params"][0].copy()
    with pytest.raises(ValueError, match=r"centered: expected False with state_dtype='q8'"):
        opt.step([np.full(N_BIG, 0.5, np.float32)])
    np.testing.assert_array_equal(opt.param_groups[0]["params"][0], p0)
    assert opt.step_count == 0
    codes, absmax = np.zeros(N_BIG, np.uint8), np.zeros(-(-N_BIG // 256), np.float32)
    with pytest.raises(ValueError, match=r"centered: expected False with state_dtype='q8'"):
        fo.functional.rmsprop([big.copy()], [np.ones(N_BIG, np.float32)], [(codes, absmax)],
                              None, [(codes.copy(), absmax.copy())], step=1, centered=True,
                              state_dtype="q8")
    # small tensors keep float32 state, so centered is fine there
    fo.RMSprop([np.ones(10, np.float32)], centered=True, state_dtype="q8").step(
        [np.ones(10, np.float32)])


@pytest.mark.parametrize("value,exc", [(-1, ValueError), (True, TypeError), (2.5, TypeError)])
def test_bad_min_8bit_size(value, exc):
    with pytest.raises(exc, match=r"min_8bit_size: expected an integer >= 0"):
        fo.Adam([np.ones(3, np.float32)], state_dtype="q8", min_8bit_size=value)


def test_q8_buckets_go_to_a_backend_with_q8_kernels_for_their_dtype():
    """numba has q8 kernels for float32 and 16-bit params (master weights and stochastic
    rounding too): auto sends both there, and an explicit backend="numba" takes them."""
    pytest.importorskip("numba")
    ml = pytest.importorskip("ml_dtypes")
    assert fo.Adam([np.ones(N_BIG, np.float32)], state_dtype="q8", backend="numba").backend == "numba"
    assert fo.Adam([np.ones(N_BIG, np.float32)], state_dtype="q8").backend == "numba"
    bf = np.ones(N_BIG, ml.bfloat16)
    assert fo.Adam([bf], state_dtype="q8").backend == "numba"
    for opts in ({"stochastic_rounding": True}, {"master_weights": True}):
        assert fo.Adam([bf], state_dtype="q8", backend="numba", **opts).backend == "numba"


@pytest.mark.parametrize("bad,exc,pattern", [
    (lambda p: np.zeros(p.shape, np.float32), TypeError,
     r"exp_avgs\[0\]: expected a \(codes, absmax\) pair .* 4941 elements >= min_8bit_size"),
    (lambda p: (np.zeros(p.shape, np.int8), np.zeros(20, np.float32)), ValueError,
     r"exp_avgs\[0\] codes: expected uint8 \(4941,\), got int8"),
    (lambda p: (np.zeros(p.shape, np.uint8), np.zeros(19, np.float32)), ValueError,
     r"exp_avgs\[0\] absmax: expected float32 \(20,\), got float32 \(19,\)"),
    (lambda p: (np.zeros(p.shape, np.uint8), [0.0] * 20), TypeError,
     r"exp_avgs\[0\] absmax: expected a numpy array, got list"),
], ids=["plain", "codes-dtype", "absmax-shape", "absmax-list"])
def test_functional_bad_q8_state_writes_nothing(bad, exc, pattern):
    p = np.ones(N_BIG, np.float32)
    v = q.quantize_blockwise(np.zeros(N_BIG, F32), signed=False)
    vbefore = (v[0].copy(), v[1].copy())
    with pytest.raises(exc, match=pattern):
        fo.functional.adam([p], [np.ones(N_BIG, np.float32)], [bad(p)], [v], step=1,
                           state_dtype="q8")
    assert (p == 1).all()
    np.testing.assert_array_equal(v[0], vbefore[0])
    np.testing.assert_array_equal(v[1], vbefore[1])


def test_functional_refuses_one_q8_pair_twice():
    p = np.ones(N_BIG, np.float32)
    pair = q.quantize_blockwise(np.zeros(N_BIG, F32), signed=True)
    with pytest.raises(ValueError, match=r"expected an array of its own"):
        fo.functional.adam([p], [np.ones(N_BIG, np.float32)], [pair], [pair], step=1,
                           state_dtype="q8")
    assert (p == 1).all()


# ---------------------------------------------------------------------------------- the demo


def test_demo_adam_q8_is_within_one_point_of_float32():
    pytest.importorskip("sklearn")
    from fastopt.apps import demo

    data = demo.load_digits_split(0)
    f32 = demo.train("adam", data, backend="numpy")
    q8 = demo.train("adam", data, backend="numpy", precision={"state_dtype": "q8"},
                    label="adam q8")
    assert f32.test_acc > 0.95
    assert abs(q8.test_acc - f32.test_acc) <= 0.01, (q8.test_acc, f32.test_acc)
    assert f32.state_bytes / f32.n_params == 8.0
    assert q8.state_bytes < 0.35 * f32.state_bytes  # the two large weights are 8-bit
    assert "state B/param" in demo.format_table([f32, q8], state=True)


def test_demo_state_q8_cli(capsys):
    pytest.importorskip("sklearn")
    from fastopt import _cli

    assert _cli.main(["demo", "--state", "q8", "--xor", "--no-progress"]) == 2
    assert "--state q8 trains the float32 digits MLP only" in capsys.readouterr().err
    assert _cli.main(["demo", "--state", "q8", "-e", "1", "--backend", "numpy",
                      "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "adam q8" in out and "state B/param" in out


def test_state_dtype_options_that_give_the_same_arrays_load_without_convert():
    """None, "param" and "float32" all give float32 params float32 state: no convert needed;
    a different format still needs convert=True."""
    a = fo.Adam([np.ones(5, np.float32)])
    a.step([np.ones(5, np.float32)])
    for same in ("float32", "param", np.float32):
        fo.Adam([np.ones(5, np.float32)], state_dtype=same).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match=r"state_dict\['precision'\]\['state_dtype'\]"):
        fo.Adam([np.ones(5, np.float32)], state_dtype="bfloat16").load_state_dict(a.state_dict())


@pytest.mark.parametrize("name", ["asgd", "rprop", "adabelief", "yogi", "ademamix"])
def test_rules_without_a_fused_q8_kernel_take_the_reference_step_on_numba(name):
    """The numba backend runs the reference's q8 step for a rule that has no fused q8 entry
    point: the same codes, absmax and params as backend="numpy"."""
    pytest.importorskip("numba")
    cls = fo._optim.OPTIMIZERS[name]
    rng = np.random.default_rng(3)
    p0 = rng.standard_normal(N_BIG).astype(np.float32)
    a = cls([p0.copy()], state_dtype="q8", backend="numba")
    b = cls([p0.copy()], state_dtype="q8", backend="numpy")
    for _ in range(3):
        g = rng.standard_normal(N_BIG).astype(np.float32)
        a.step([g])
        b.step([g])
    np.testing.assert_array_equal(a.param_groups[0]["params"][0], b.param_groups[0]["params"][0])
    for k, v in b.state[0][0].items():
        np.testing.assert_array_equal(a.state[0][0][k], v)
