"""16-bit SparseAdam outside the raw class: ``fastopt.functional.sparse_adam`` and
``fastopt.torch.SparseAdam`` with float16/bfloat16 params, 16-bit state, master weights and
stochastic rounding.

Both run the raw class's driver (``fastopt._sparse.widened_rows``), so on the same inputs
they must give the raw ``fastopt.SparseAdam``'s bits (tests/test_sparse16.py checks those
against the whole-table definition).  torch.optim.SparseAdam on bfloat16 (every operation
rounded to bfloat16) is compared within ``TOL["sparse-adam-torch-bf16"]``.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

import fastopt as fo
from _cases import TOL
from test_sparse16 import SHAPES, _bits
from test_sparse16 import _problem as _sparse16_problem

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
F32 = np.dtype(np.float32)
LR = 0.05
STEPS = 3
CONFIGS = [
    (F16, {}),
    (BF16, {}),
    (BF16, {"state_dtype": "param"}),
    (BF16, {"stochastic_rounding": True, "seed": 7, "state_dtype": "bfloat16"}),
    (F16, {"master_weights": True, "maximize": True}),
    (BF16, {"master_weights": True, "state_dtype": "param"}),
]
IDS = ["f16", "bf16", "bf16-param-state", "bf16-sr-bf16state", "f16-master-maximize",
       "bf16-master-param-state"]
PREC = ("state_dtype", "master_weights", "stochastic_rounding", "seed")


def _problem(dtype):
    """tests/test_sparse16.py's problem (same shapes, rows and duplicates) over STEPS steps."""
    return _sparse16_problem(dtype, STEPS)


def _raw(dtype, opts, backend="numpy"):
    """The raw class over STEPS steps: (params, its state list)."""
    params, grads = _problem(dtype)
    opt = fo.SparseAdam(params, lr=LR, backend=backend, **opts)
    for g in grads:
        opt.step(g)
    return params, opt.state[0]


def _assert_same(params, states, want_params, want_states):
    for i, (p, q) in enumerate(zip(params, want_params)):
        assert p.dtype == q.dtype
        np.testing.assert_array_equal(_bits(p), _bits(q), err_msg=f"params[{i}]")
        for n, a in want_states[i].items():
            if n == "step":
                assert int(states[i][n]) == a
                continue
            b = np.asarray(states[i][n])
            assert b.dtype == a.dtype, n
            np.testing.assert_array_equal(_bits(b), _bits(a), err_msg=f"{n}[{i}]")


# ----------------------------------------------------------------------------- functional


@pytest.mark.parametrize("dtype,opts", CONFIGS, ids=IDS)
def test_functional_is_the_class_bit_for_bit(dtype, opts):
    want_p, want_st = _raw(dtype, opts)
    params, grads = _problem(dtype)
    prec = {k: v for k, v in opts.items() if k in PREC}
    sdt = fo.precision.resolve_state_dtype(dtype, opts.get("state_dtype"))
    m = [np.zeros(p.shape, sdt) for p in params]
    v = [np.zeros(p.shape, sdt) for p in params]
    masters = [fo.precision.to_float32(p) for p in params] if opts.get("master_weights") \
        else None
    for t, g in enumerate(grads, 1):
        fo.functional.sparse_adam(params, g, m, v, [t, t], masters, lr=LR,
                                  maximize=opts.get("maximize", False), backend="numpy", **prec)
    states = [{"exp_avg": m[i], "exp_avg_sq": v[i], "step": STEPS,
               **({"master": masters[i]} if masters else {})} for i in range(len(params))]
    _assert_same(params, states, want_p, want_st)


def test_functional_numba_is_the_reference():
    if not fo.backends()["numba"]["available"]:
        pytest.skip("numba is not available")
    opts = {"stochastic_rounding": True, "seed": 3}
    want_p, want_st = _raw(BF16, opts, "numpy")
    params, grads = _problem(BF16)
    m = [np.zeros(p.shape, F32) for p in params]
    v = [np.zeros(p.shape, F32) for p in params]
    for t, g in enumerate(grads, 1):
        fo.functional.sparse_adam(params, g, m, v, [t, t], lr=LR, backend="numba", **opts)
    states = [{"exp_avg": m[i], "exp_avg_sq": v[i], "step": STEPS} for i in range(2)]
    _assert_same(params, states, want_p, want_st)


def test_functional_bad_input_writes_nothing():
    p = np.ones((5, 2), BF16)
    m, v = np.zeros((5, 2), F32), np.zeros((5, 2), F32)
    g = (np.array([1, 3]), np.ones((2, 2), BF16))
    f = fo.functional.sparse_adam
    cases = [
        (dict(state_dtype="q8"), ValueError, r"state_dtype: expected None, 'param' or "
                                             r"'bfloat16' for SparseAdam"),
        (dict(master_weights=True), TypeError, "masters: expected a list of float32"),
        (dict(masters=[np.zeros((5, 2), F32)]), ValueError, "masters: expected None without"),
        (dict(master_weights=True, masters=[np.zeros((5, 2), BF16)]), ValueError,
         r"masters\[0\]: expected .* dtype float32"),
        (dict(state_dtype="param"), ValueError, r"exp_avgs\[0\]: expected .* dtype bfloat16"),
        (dict(stochastic_rounding=True, master_weights=True, masters=[np.zeros((5, 2), F32)]),
         ValueError, "stochastic_rounding: expected False with master_weights"),
    ]
    for kw, exc, msg in cases:
        kw = dict(kw)
        masters = kw.pop("masters", None)
        with pytest.raises(exc, match=msg):
            f([p], [g], [m], [v], [1], masters, **kw)
    with pytest.raises(ValueError, match=r"values: expected shape .* and dtype bfloat16"):
        f([p], [(g[0], g[1].astype(F32))], [m], [v], [1])
    with pytest.raises(ValueError, match=r"exp_avg_sqs\[0\]: expected a writeable"):
        ro = np.zeros((5, 2), F32)
        ro.flags.writeable = False
        f([p], [g], [m], [ro], [1])
    assert (p == 1).all() and not m.any() and not v.any()


# ----------------------------------------------------------------------------- fastopt.torch

torch = pytest.importorskip("torch")
_TORCH = {BF16: torch.bfloat16, F16: torch.float16, F32: torch.float32}


def _tensor(a):
    """A torch tensor with the bits of NumPy array ``a`` (bfloat16 through an int16 view)."""
    if a.dtype == BF16:
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())


def _numpy(t):
    t = t.detach()
    return t.view(torch.int16).numpy().view(BF16) if t.dtype == torch.bfloat16 else t.numpy()


def _sparse_grad(g, shape):
    idx, vals = g
    return torch.sparse_coo_tensor(torch.from_numpy(idx)[None], _tensor(vals), shape,
                                   check_invariants=True)


@pytest.mark.parametrize("dtype,opts", CONFIGS, ids=IDS)
def test_torch_adapter_is_the_class_bit_for_bit(dtype, opts):
    import fastopt.torch as ft

    want_p, want_st = _raw(dtype, opts)
    params, grads = _problem(dtype)
    tps = [torch.nn.Parameter(_tensor(p)) for p in params]
    opt = ft.SparseAdam(tps, lr=LR, backend="numpy", **opts)
    for g in grads:
        for tp, gi, shape in zip(tps, g, SHAPES):
            tp.grad = _sparse_grad(gi, shape)
        opt.step()
    states = [{k: (_numpy(v) if isinstance(v, torch.Tensor) else v)
               for k, v in opt.state[tp].items()} for tp in tps]
    _assert_same([_numpy(tp) for tp in tps], states, want_p, want_st)
    # state under torch's names; float32 moments by default for 16-bit params, as the other
    # fastopt.torch optimizers keep them; "param": the param's dtype, as torch.optim's
    want = {None: torch.float32, "param": tps[0].dtype,
            "bfloat16": torch.bfloat16}[opts.get("state_dtype")]
    assert opt.state[tps[0]]["exp_avg"].dtype == want
    assert isinstance(opt.state[tps[0]]["step"], int)


def test_torch_adapter_against_torch_on_bfloat16():
    """torch.optim.SparseAdam on a bfloat16 embedding (state and every operation in bfloat16)
    and fastopt.torch.SparseAdam(state_dtype="param") (float32 arithmetic, one rounding per
    write), 5 steps through nn.Embedding(sparse=True); then torch's state_dict loads into the
    default fastopt optimizer (float32 moments: converted exactly) and its state back into
    torch's."""
    import fastopt.torch as ft

    torch.manual_seed(0)
    embs = [torch.nn.Embedding(11, 7, sparse=True).to(torch.bfloat16) for _ in range(3)]
    for e in embs[1:]:
        e.load_state_dict(embs[0].state_dict())
    opts = [torch.optim.SparseAdam(embs[0].parameters(), lr=0.02),
            ft.SparseAdam(embs[1].parameters(), lr=0.02, state_dtype="param"),
            ft.SparseAdam(embs[2].parameters(), lr=0.02)]
    gen = torch.Generator().manual_seed(1)
    for t in range(5):
        x = torch.randint(0, 11, (3, 4), generator=gen)
        for e, o in zip(embs, opts):
            o.zero_grad()
            (e(x).float() ** 2).sum().backward()
            o.step()
    w = [e.weight.detach().float() for e in embs]
    assert not torch.equal(w[0], embs[0].weight.new_tensor(0.0).expand_as(w[0]))
    for other in w[1:]:
        torch.testing.assert_close(other, w[0], **TOL["sparse-adam-torch-bf16"])
    assert opts[1].state[embs[1].weight]["exp_avg"].dtype == torch.bfloat16
    assert opts[2].state[embs[2].weight]["exp_avg"].dtype == torch.float32
    # torch's bfloat16 state into the default fastopt optimizer: float32 moments at its step
    opts[2].load_state_dict(copy.deepcopy(opts[0].state_dict()))
    embs[2].load_state_dict(embs[0].state_dict())
    x = torch.randint(0, 11, (3, 4), generator=gen)
    for e, o in ((embs[0], opts[0]), (embs[2], opts[2])):
        o.zero_grad()
        (e(x).float() ** 2).sum().backward()
        o.step()
    st = opts[2].state[embs[2].weight]
    assert st["exp_avg"].dtype == torch.float32 and st["step"] == 6
    torch.testing.assert_close(embs[2].weight.float(), embs[0].weight.float(),
                               **TOL["sparse-adam-torch-bf16"])
    # and back: torch casts the float32 moments to the param's dtype
    opts[0].load_state_dict(copy.deepcopy(opts[2].state_dict()))
    assert opts[0].state[embs[0].weight]["exp_avg"].dtype == torch.bfloat16


def test_torch_adapter_bad_input_writes_nothing():
    import fastopt.torch as ft

    w = torch.nn.Parameter(torch.ones(5, 3, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"state_dtype: expected None, 'param' or 'bfloat16' "
                                         r"for SparseAdam, got 'q8'"):
        ft.SparseAdam([w], state_dtype="q8")
    with pytest.raises(ValueError, match="master_weights: expected False for params"):
        ft.SparseAdam([torch.nn.Parameter(torch.ones(5, 3))], master_weights=True)
    with pytest.raises(TypeError, match="expected a float32, float64, float16 or bfloat16"):
        ft.SparseAdam([torch.nn.Parameter(torch.ones(5, 3, dtype=torch.float64)),
                       torch.ones(4, dtype=torch.int32)])
    opt = ft.SparseAdam([w], lr=0.1, master_weights=True)
    idx = torch.tensor([[1, 2]])
    w.grad = torch.sparse_coo_tensor(idx, torch.tensor([[1.0, float("inf"), 0.0]] * 2,
                                                        dtype=torch.bfloat16), (5, 3),
                                     check_invariants=True)
    with pytest.raises(FloatingPointError, match="non-finite"):
        opt.step()
    assert (w.detach() == 1).all() and len(opt.state) == 0
    w.grad = torch.sparse_coo_tensor(idx, torch.ones(2, 3, dtype=torch.bfloat16), (5, 3),
                                     check_invariants=True)
    opt.state[w]["exp_avg"] = torch.zeros(4, 3)  # a state loaded for another table
    with pytest.raises(ValueError, match=r"state\[params\[0\]\]\['exp_avg'\]: expected a tensor "
                                         r"of shape \(5, 3\)"):
        opt.step()
    assert (w.detach() == 1).all() and set(opt.state[w]) == {"exp_avg"}
