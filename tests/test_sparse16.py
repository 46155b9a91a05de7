"""SparseAdam with 16-bit params or state, master weights, stochastic rounding
(fastopt/_sparse.py ``widened_rows``).

The definition: widen the WHOLE table (param or master, moments) to float32, take the float32
row step, round every element once (moments RNE to their dtype, param RNE or stochastically
with the hash of its flat index in the full param).  Untouched rows round back to their own
bits, so the driver, which widens only the touched rows, must give the same bits everywhere.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastopt as fo
from fastopt import precision as prec
from fastopt._rules import OWN_DRIVER_RULES
from fastopt._sparse import coalesce
from fastopt.kernels import reference
from test_wide16 import write_params

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
F32 = np.dtype(np.float32)
RULE = OWN_DRIVER_RULES["sparse_adam"]
SHAPES = ((13, 5), (9, 2, 3))  # an odd row width; rows of shape (2, 3)
NNZ = (7, 4)  # fewer than the rows: untouched rows every step; one duplicate each
LR = 0.05
CONFIGS = [
    (F16, {}),
    (BF16, {"state_dtype": "bfloat16"}),
    (BF16, {"stochastic_rounding": True, "seed": 7, "state_dtype": "param"}),
    (F16, {"master_weights": True, "maximize": True}),
    (F32, {"state_dtype": "bfloat16"}),
]
IDS = ["f16", "bf16-bf16state", "bf16-sr-param-state", "f16-master-maximize", "f32-bf16state"]
PREC_KEYS = ("state_dtype", "master_weights", "stochastic_rounding", "seed")


def _bits(a):
    a = np.asarray(a)
    return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def _problem(dtype, steps, seed=0):
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    grads = []
    for _ in range(steps):
        g = []
        for shape, nnz in zip(SHAPES, NNZ):
            idx = rng.integers(0, shape[0], nnz)
            idx[1] = idx[0]
            g.append((idx, rng.standard_normal((nnz,) + shape[1:]).astype(dtype)))
        grads.append(g)
    return params, grads


def _run(dtype, opts, backend, steps=4):
    params, grads = _problem(dtype, steps)
    opt = fo.SparseAdam(params, lr=LR, backend=backend, **opts)
    before = []
    for g in grads:
        before.append([p.copy() for p in params])
        opt.step(g)
    return params, opt, grads, before


def _oracle(dtype, opts, steps=4):
    params, grads = _problem(dtype, steps)
    sdt = prec.resolve_state_dtype(dtype, opts.get("state_dtype"))
    m = [np.zeros(p.shape, sdt) for p in params]
    v = [np.zeros(p.shape, sdt) for p in params]
    masters = [prec.to_float32(p) for p in params] if opts.get("master_weights") else None
    hp = dict(lr=LR, betas=(0.9, 0.999), eps=1e-8, maximize=opts.get("maximize", False))
    for t, g in enumerate(grads, 1):
        s, _ = RULE.scalars(hp, t, {})
        work = []
        for i, (idx, vals) in enumerate(g):
            w = masters[i].copy() if masters else prec.to_float32(params[i])
            work.append(w)
            mw, vw = prec.to_float32(m[i]), prec.to_float32(v[i])
            order, starts, rows = coalesce(idx.astype(np.int64))
            n = w.shape[0]
            reference.sparse_adam_rows(w.reshape(n, -1), mw.reshape(n, -1), vw.reshape(n, -1),
                                       prec.to_float32(vals).reshape(len(idx), -1), order,
                                       starts, rows, s, hp["maximize"])
            m[i], v[i] = prec.round_to(mw, sdt), prec.round_to(vw, sdt)
        write_params(params, masters, work, dtype, opts, t)
    return params, m, v, masters


@pytest.mark.parametrize("dtype,opts", CONFIGS, ids=IDS)
def test_rows_step_is_the_whole_widened_table_step(dtype, opts):
    """Bit for bit against the whole-table definition (SR: the full-param flat index), and
    untouched rows keep their bits."""
    params, opt, grads, before = _run(dtype, opts, "numpy")
    want_p, want_m, want_v, want_master = _oracle(dtype, opts)
    for i, p in enumerate(params):
        st = opt.state[0][i]
        assert p.dtype == dtype and st["exp_avg"].dtype == want_m[i].dtype
        np.testing.assert_array_equal(_bits(p), _bits(want_p[i]))
        np.testing.assert_array_equal(_bits(st["exp_avg"]), _bits(want_m[i]))
        np.testing.assert_array_equal(_bits(st["exp_avg_sq"]), _bits(want_v[i]))
        if want_master:
            np.testing.assert_array_equal(_bits(st["master"]), _bits(want_master[i]))
        untouched = np.setdiff1d(np.arange(p.shape[0]), grads[-1][i][0])
        assert untouched.size
        np.testing.assert_array_equal(_bits(p[untouched]), _bits(before[-1][i][untouched]))
        assert (_bits(p) != _bits(before[0][i])).any()


def test_stochastic_rounding_hashes_the_full_param_index():
    """The same row step rounds with the flat indices of where the row sits in the param,
    not of its place (0) in the compact table of touched rows."""
    x = np.full((6, 16), 1.0, BF16)
    vals = np.full((1, 16), 0.5, BF16)
    x32 = prec.to_float32(x)
    fo.SparseAdam([x32], lr=1e-3, backend="numpy").step([(np.array([0]), prec.to_float32(vals))])
    row = x32[:1]  # the float32 value of a stepped row (every row starts equal)
    full = prec.element_index((6, 16))
    for r in (0, 5):
        p = x.copy()
        fo.SparseAdam([p], lr=1e-3, stochastic_rounding=True, seed=1,
                      backend="numpy").step([(np.array([r]), vals)])
        want = prec.round_to(row, BF16, stochastic_rounding=True, seed=1, step=1,
                             index=full[r:r + 1])
        np.testing.assert_array_equal(_bits(p[r:r + 1]), _bits(want))
    # the two placements round differently somewhere (else the test could not tell them apart)
    r0 = prec.round_to(row, BF16, stochastic_rounding=True, seed=1, step=1, index=full[0:1])
    r5 = prec.round_to(row, BF16, stochastic_rounding=True, seed=1, step=1, index=full[5:6])
    assert (_bits(r0) != _bits(r5)).any()


@pytest.mark.parametrize("dtype,opts", CONFIGS, ids=IDS)
def test_numba_matches_the_reference_bit_for_bit(dtype, opts):
    if not fo.backends()["numba"]["available"]:
        pytest.skip("numba is not available")
    ref_p, ref, _, _ = _run(dtype, opts, "numpy")
    got_p, got, _, _ = _run(dtype, opts, "numba")
    assert got.backend == "numba"
    for a, b in zip(ref_p, got_p):
        np.testing.assert_array_equal(_bits(a), _bits(b))
    for sa, sb in zip(ref.state[0], got.state[0]):
        assert sorted(sa) == sorted(sb)
        for n in sa:
            if n != "step":
                np.testing.assert_array_equal(_bits(sa[n]), _bits(sb[n]), err_msg=n)


def test_state_dict_round_trip_resumes_bit_for_bit():
    opts = {"master_weights": True, "state_dtype": "bfloat16"}
    params, grads = _problem(BF16, steps=2, seed=3)
    opt = fo.SparseAdam(params, lr=LR, backend="numpy", **opts)
    opt.step(grads[0])
    sd = opt.state_dict()
    assert sd["state"][0]["exp_avg"].dtype == BF16 and sd["state"][0]["master"].dtype == F32
    copies = [p.copy() for p in params]
    again = fo.SparseAdam(copies, lr=LR, backend="numpy", **opts)
    again.load_state_dict(sd)
    opt.step(grads[1])
    again.step(grads[1])
    for a, b in zip(params, copies):
        np.testing.assert_array_equal(_bits(a), _bits(b))
    other = fo.SparseAdam([p.copy() for p in params], lr=LR, backend="numpy")
    with pytest.raises(ValueError, match=r"state_dict\['precision'\]"):
        other.load_state_dict(sd)
    assert other.state[0][0] == {}


def test_bad_input_writes_nothing():
    p = np.ones((5, 2), BF16)
    for kw, exc, msg in [
            ({"state_dtype": "q8"}, ValueError, r"state_dtype: expected None, 'param' or "
                                                r"'bfloat16' for SparseAdam.*256-element"),
            ({"master_weights": True, "stochastic_rounding": True}, ValueError,
             "stochastic_rounding: expected False with master_weights"),
            ({"state_dtype": "float16"}, ValueError, "state_dtype"),
            ({"min_8bit_size": 0}, ValueError, "min_8bit_size: SparseAdam does not take")]:
        with pytest.raises(exc, match=msg):
            fo.SparseAdam([p], **kw)
    with pytest.raises(ValueError, match="stochastic_rounding: expected False for params"):
        fo.SparseAdam([np.ones((5, 2), F16)], stochastic_rounding=True)
    with pytest.raises(ValueError, match="master_weights: expected False for params"):
        fo.SparseAdam([np.ones((5, 2), F32)], master_weights=True)
    opt = fo.SparseAdam([p], lr=LR, backend="numpy")
    with pytest.raises(ValueError, match="values: expected shape .* and dtype bfloat16"):
        opt.step([(np.array([1]), np.ones((1, 2), F32))])
    with pytest.raises(FloatingPointError, match="non-finite"):
        opt.step([(np.array([1]), np.array([[np.inf, 1.0]], BF16))])
    assert (p == 1).all() and opt.state[0][0] == {}


def test_checkpoint_keeps_bfloat16_bits_and_the_master(tmp_path):
    params, grads = _problem(BF16, steps=2, seed=4)
    opts = {"master_weights": True, "state_dtype": "bfloat16"}
    opt = fo.SparseAdam(params, lr=LR, backend="numpy", **opts)
    opt.step(grads[0])
    fo.save(opt, tmp_path / "sparse16.npz")
    copies = [p.copy() for p in params]
    again = fo.SparseAdam(copies, lr=LR, backend="numpy", **opts)
    fo.load(again, tmp_path / "sparse16.npz")
    assert again.state[0][0]["exp_avg"].dtype == BF16 and "master" in again.state[0][0]
    opt.step(grads[1])
    again.step(grads[1])
    for a, b in zip(params, copies):
        np.testing.assert_array_equal(_bits(a), _bits(b))
