"""The optimizer's step cache (docs/design.md, "Pipeline"): a small step whose arrays come back
unchanged reuses its checked layout and the backend's operand tables, and anything that
differs sends the step back through the full checks.

Each test runs the same sequence on two optimizers, one with the cache and one whose cache
is switched off, and asserts bit-exact params and state (one rounding per write, the same
kernels), and that the cached one did take the cached path where it should.
"""

import numpy as np
import pytest

import fastopt as fo
from fastopt._backend import available

pytestmark = pytest.mark.skipif(not available("numba"), reason="numba backend unavailable")

SHAPES = [(7, 5), (3,), (11,)]  # odd sizes; a 2-D param (its grad goes in as a flat view)


def twins(nonfinite="raise", dtype=np.float32, shapes=SHAPES, data_seed=1, **kw):
    rng = np.random.default_rng(data_seed)
    ps = [rng.standard_normal(s).astype(dtype) for s in shapes]
    a = fo.Adam([p.copy() for p in ps], lr=1e-2, backend="numba", nonfinite=nonfinite, **kw)
    b = fo.Adam([p.copy() for p in ps], lr=1e-2, backend="numba", nonfinite=nonfinite, **kw)
    b._plan_step = lambda grads, steps: None  # the uncached reference
    a.cached = 0
    full = a._cached_step

    def counted(grads, t):
        info = full(grads, t)
        a.cached += info is not None
        return info

    a._cached_step = counted
    grads = [rng.standard_normal(s).astype(dtype) for s in shapes]
    return a, b, grads, rng


def snapshot(opt):
    return ([p.copy() for p in opt.param_groups[0]["params"]],
            [{k: v.copy() for k, v in st.items()} for st in opt.state[0]], opt.step_count)


def assert_same(a, b):
    pa, sa, ta = snapshot(a)
    pb, sb, tb = snapshot(b)
    assert ta == tb
    for x, y in zip(pa, pb):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(sa, sb):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def steps(a, b, grads, rng, n=3):
    """``n`` steps on both, the grads' values changed in place between them (same objects)."""
    for _ in range(n):
        for g in grads:
            g[...] = rng.standard_normal(g.shape).astype(g.dtype)
        a.step(grads)
        b.step(grads)
    assert_same(a, b)


@pytest.mark.parametrize("nonfinite", ["raise", "ignore"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cached_steps_match_full_steps(nonfinite, dtype):
    kw = dict(maximize=True, weight_clip=0.5) if dtype == np.float32 else {}
    a, b, grads, rng = twins(nonfinite, dtype, **kw)
    steps(a, b, grads, rng, 4)
    assert a.cached == 2 and b._plan is None  # two full steps, then the cache


def test_a_new_grad_array_is_checked_again():
    a, b, grads, rng = twins()
    steps(a, b, grads, rng)
    assert a._plan is not None
    before = snapshot(a)
    bad = list(grads)
    bad[1] = np.zeros(4, np.float32)  # a new object with the wrong shape
    with pytest.raises(ValueError, match=r"grads\[1\].*shape"):
        a.step(bad)
    after = snapshot(a)
    for x, y in zip(before[0], after[0]):
        np.testing.assert_array_equal(x, y)
    assert before[2] == after[2]
    grads[1] = rng.standard_normal(3).astype(np.float32)  # a new, good array in the same list
    steps(a, b, grads, rng, 1)


def test_a_reshaped_or_restrided_grad_is_checked_again():
    a, b, grads, rng = twins()
    steps(a, b, grads, rng)
    g0 = grads[0]
    g0.shape = (5, 7)  # the same object, reshaped in place
    with pytest.raises(ValueError, match=r"grads\[0\].*shape"):
        a.step(grads)
    g0.shape = (7, 5)
    # the same values through a non-contiguous view: the full checks copy it
    grads[0] = np.asfortranarray(g0.T).T.copy(order="F")
    assert not grads[0].flags.c_contiguous
    n = a.cached
    steps(a, b, grads, rng, 3)
    assert a._plan is None and a.cached == n  # a copied grad is never cached


def test_a_param_list_changed_in_place_is_checked_again():
    a, b, grads, rng = twins()
    steps(a, b, grads, rng)
    for opt in (a, b):
        opt.param_groups[0]["params"][2] = np.zeros(4, np.float32)  # wrong shape for its grad
        with pytest.raises(ValueError, match=r"grads\[2\]"):
            opt.step(grads)


def test_changed_options_and_loaded_state_take_effect():
    a, b, grads, rng = twins()
    steps(a, b, grads, rng)
    for opt in (a, b):
        opt.param_groups[0]["lr"] = 0.5
    steps(a, b, grads, rng, 2)
    sd = b.state_dict()
    steps(a, b, grads, rng, 1)
    a.load_state_dict(sd)
    b.load_state_dict(sd)
    n = a.cached
    steps(a, b, grads, rng, 3)
    assert a.cached == n + 1


@pytest.mark.parametrize("value", [np.inf, np.nan])
def test_a_nonfinite_grad_after_caching_writes_nothing(value):
    a, b, grads, rng = twins("skip")
    steps(a, b, grads, rng)
    assert a._plan is not None
    before = snapshot(a)
    grads[2][-1] = value
    assert a.step(grads).skipped
    after = snapshot(a)
    for x, y in zip(before[0] + [v for st in before[1] for v in st.values()],
                    after[0] + [v for st in after[1] for v in st.values()]):
        np.testing.assert_array_equal(x, y)
    assert before[2] == after[2]
    b.step(grads)
    steps(a, b, grads, rng, 2)
    a.nonfinite = b.nonfinite = "raise"
    grads[0][0, 0] = value
    with pytest.raises(FloatingPointError):
        a.step(grads)
    assert a.step_count == b.step_count


def _adam_pair(sizes, seed=2, **kw):
    """A cached and an uncached Adam over float32 tensors of ``sizes``, and their grads."""
    rng = np.random.default_rng(seed)
    ps = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    a = fo.Adam([p.copy() for p in ps], lr=1e-2, backend="numba", **kw)
    b = fo.Adam([p.copy() for p in ps], lr=1e-2, backend="numba", **kw)
    b._plan_step = lambda grads, steps: None
    return a, b, [rng.standard_normal(n).astype(np.float32) for n in sizes], rng


@pytest.fixture
def one_thread():
    import numba

    threads = numba.get_num_threads()
    numba.set_num_threads(1)  # every call runs as one part: the checked call
    yield
    numba.set_num_threads(threads)


def test_the_checked_update_sums_as_the_read_pass(one_thread):
    """One part: the grads are checked inside the update call, with the read pass's sums."""
    from fastopt.kernels import numba_cpu as nc

    sizes = [21 * nc._BLOCK + 5, 7, nc._BLOCK + 1]  # several blocks, odd tails
    a, b, grads, rng = _adam_pair(sizes, maximize=True)  # maximize: the check sees -g
    steps(a, b, grads, rng, 3)
    for g in grads:  # magnitudes over many binades: the sums' rounding shows any reordering
        g *= (10.0 ** rng.uniform(-4, 4, g.size)).astype(np.float32)
    a.step(grads)
    b.step(grads)
    assert_same(a, b)
    plan = a._plan.plan
    read = nc.OPS._stats(grads, 1.0, None, exact=False)[:, 0]
    np.testing.assert_array_equal(plan.sums[1:], read)  # bit for bit
    assert plan.sums[0] == sum(read.tolist()) and np.isfinite(plan.sums[0])
    before = snapshot(a)
    grads[0][3 * nc._BLOCK + 2] = np.nan  # in the last, partial block of the first tensor
    s, _ = a.rule.step_scalars(a._plan.hp, a.step_count + 1, a.group_state[0])
    assert plan.update(s, check=True) is False and np.isnan(plan.sums[0])
    assert_same_snapshot(before, snapshot(a))


def assert_same_snapshot(x, y):
    assert x[2] == y[2]
    for u, v in zip(x[0] + [w for st in x[1] for w in st.values()],
                    y[0] + [w for st in y[1] for w in st.values()]):
        np.testing.assert_array_equal(u, v)


def test_a_nonfinite_grad_in_a_two_part_cached_step_raises_with_nothing_written():
    """Two parts (two threads, 2 * MIN_PER_THREAD elements): the read pass runs before the update."""
    import numba

    from fastopt.kernels import numba_cpu as nc

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs two numba threads")
    threads = numba.get_num_threads()
    numba.set_num_threads(2)
    try:
        a, b, grads, rng = _adam_pair([2 * nc.MIN_PER_THREAD + 3])
        steps(a, b, grads, rng, 3)
        assert a._plan is not None
        before = snapshot(a)
        grads[0][-1] = np.inf
        with pytest.raises(FloatingPointError):
            a.step(grads)
        assert_same_snapshot(before, snapshot(a))
    finally:
        numba.set_num_threads(threads)


@pytest.mark.parametrize("cls, kw", [
    ("Adam", dict(weight_decay=0.1, maximize=True)),
    ("RMSprop", dict(momentum=0.9, centered=True)),  # its entry's mode is not a literal
])
def test_serial_twin_steps_bit_for_bit_as_the_parallel_form(monkeypatch, cls, kw):
    """A step that runs as one part takes the update's serial twin (docs/design.md, "Numba
    backend"): the same bits as the parallel form, full steps and cached (checked) ones."""
    from fastopt.kernels import numba_cpu as nc

    rng = np.random.default_rng(3)
    ps = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    grads = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    twin = getattr(fo, cls)([p.copy() for p in ps], lr=1e-2, backend="numba", **kw)
    par = getattr(fo, cls)([p.copy() for p in ps], lr=1e-2, backend="numba", **kw)
    for _ in range(4):  # the first two full steps, then the step cache's checked calls
        for g in grads:
            g[...] = rng.standard_normal(g.shape).astype(np.float32)
        twin.step(grads)
        monkeypatch.setattr(nc, "_FORCE", "parallel")
        par.step(grads)
        monkeypatch.setattr(nc, "_FORCE", None)
    assert twin._plan is not None and par._plan is not None
    entry = twin._plan.plan.entry
    assert nc._SERIAL[entry].overloads and entry.overloads  # both forms did run
    assert_same(twin, par)


#: buckets with a precision (the tiled kernel, ``ReducedStepPlan``): nearest-even bfloat16
#: with its state, stochastic rounding (the step key refreshed per cached step), float32 state
#: and master weights, float16, float32 params with bfloat16 state
_PRECISIONS = [
    ("bfloat16", {"state_dtype": "param"}),
    ("bfloat16", {"state_dtype": "bfloat16", "stochastic_rounding": True, "seed": 7}),
    ("bfloat16", {"master_weights": True, "weight_decay": 0.1}),
    ("float16", {"maximize": True, "weight_clip": 0.5}),
    ("float32", {"state_dtype": "bfloat16"}),
]


@pytest.mark.parametrize("dtype,kw", _PRECISIONS,
                         ids=["bf16", "bf16-sr", "bf16-master", "f16", "f32-bf16-state"])
def test_cached_16bit_steps_match_full_steps(dtype, kw):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    dt = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    a, b, grads, rng = twins("skip", dt, **kw)
    steps(a, b, grads, rng, 4)
    assert a.cached == 2 and b._plan is None  # two full steps, then the cache
    before = snapshot(a)
    grads[1][-1] = np.nan  # a non-finite grad: the cached step hands over, nothing written
    assert a.step(grads).skipped and b.step(grads).skipped
    after = snapshot(a)
    for x, y in zip(before[0] + [v for st in before[1] for v in st.values()],
                    after[0] + [v for st in after[1] for v in st.values()]):
        np.testing.assert_array_equal(x, y)
    steps(a, b, grads, rng, 3)
    assert a.cached >= 4


# ------------------------------------------------------------------ 8-bit state (Q8StepPlan)
Q8_SHAPES = [(300,), (7, 5), (3,)]  # 300: a whole block and a partial one


def q8_twins(nonfinite="skip", dtype=np.float32, **kw):
    """A cached and an uncached Adam with q8 state (every tensor: ``min_8bit_size=1``)."""
    return twins(nonfinite, dtype, shapes=Q8_SHAPES, data_seed=3, state_dtype="q8", min_8bit_size=1,
                 **kw)


def _q8_plan(opt):
    from fastopt.kernels.numba_cpu import Q8StepPlan

    return opt._plan is not None and isinstance(opt._plan.plan, Q8StepPlan)


@pytest.mark.parametrize("dtype,kw", [
    ("float32", {}),
    ("float32", {"maximize": True, "weight_clip": 0.5, "weight_decay": 0.1, "amsgrad": True}),
    ("bfloat16", {"stochastic_rounding": True, "seed": 5}),  # the q8 format vector, its key
], ids=["plain", "options", "bf16-sr"])
def test_cached_q8_steps_match_full_steps(dtype, kw):
    if dtype == "bfloat16":
        dtype = np.dtype(pytest.importorskip("ml_dtypes").bfloat16)
    a, b, grads, rng = q8_twins("raise", dtype, **kw)
    steps(a, b, grads, rng, 5)
    assert _q8_plan(a) and a.cached == 3 and b._plan is None  # two full steps, then the cache
    before = snapshot(a)
    grads[0][-1] = np.nan  # a non-finite grad: the cached step hands over, nothing written
    with pytest.raises(FloatingPointError):
        a.step(grads)
    after = snapshot(a)
    assert_same_snapshot(before, after)
    with pytest.raises(FloatingPointError):
        b.step(grads)
    steps(a, b, grads, rng, 3)


def test_a_nonfinite_grad_after_q8_caching_writes_nothing():
    a, b, grads, rng = q8_twins("skip")
    steps(a, b, grads, rng, 3)
    assert _q8_plan(a)
    before = snapshot(a)
    grads[1][2, 3] = np.inf
    assert a.step(grads).skipped and b.step(grads).skipped
    assert_same_snapshot(before, snapshot(a))
    steps(a, b, grads, rng, 3)
    assert a.cached >= 3


def test_q8_plan_sees_lr_loaded_state_and_a_swapped_param():
    a, b, grads, rng = q8_twins("raise")
    steps(a, b, grads, rng, 3)
    for opt in (a, b):
        opt.param_groups[0]["lr"] = 0.5  # changed options: the full path, then a new plan
    steps(a, b, grads, rng, 3)
    sd = b.state_dict()
    steps(a, b, grads, rng, 1)
    n = a.cached
    for opt in (a, b):  # new state arrays (load_state_dict rebuilds the buckets)
        opt.load_state_dict(sd)
    steps(a, b, grads, rng, 3)
    assert a.cached == n + 1 and _q8_plan(a)
    new = rng.standard_normal(35).astype(np.float32).reshape(7, 5)
    for opt in (a, b):  # a swapped param of the same shape: its state stays, the table must not
        opt.param_groups[0]["params"][1] = new.copy()
    steps(a, b, grads, rng, 3)
    assert a.cached == n + 2 and _q8_plan(a)
