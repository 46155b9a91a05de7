"""Python threads, each stepping its own optimizer at the same time, get exactly the
results of running them one after another (on every CPU backend).

The Numba kernels release the GIL and are themselves multi-threaded, so this
exercises concurrent launches of parallel kernels (which Numba's ``workqueue``
threading layer does not allow: the backend must serialize or use a safe layer),
concurrent use of one kernel by several threads, and the shared dispatch tables.
"""

import threading

import numpy as np
import pytest

import fastopt as fo
from fastopt import functional as F
from fastopt._backend import available
from fastopt._optim import OPTIMIZERS

from _cases import CASES, make_feed

CPU_BACKENDS = [b for b in ("numpy", "numba") if available(b)]
STEPS = 5
SIZES = (20001, 3, 1, 4097)  # big enough that steps of different threads overlap


def job(rule, options, seed, dtype):
    params, feed = make_feed(rule, SIZES, dtype, seed, STEPS)
    return rule, options, params, feed


def run_job(j, backend, barrier=None):
    rule, options, params, feed = j
    ps = [p.copy() for p in params]
    opt = OPTIMIZERS[rule](ps, backend=backend, **options)
    if barrier is not None:
        barrier.wait()
    for g, e in feed:
        opt.step(g, e) if opt.rule.extra else opt.step(g)
    sd = opt.state_dict()
    return [p.tobytes() for p in ps], {i: {k: a.tobytes() for k, a in st.items()}
                                       for i, st in sd["state"].items()}, sd["group_state"]


def run_threads(target, args_list):
    results, errors = [None] * len(args_list), []

    def wrap(i, args):
        try:
            results[i] = target(*args)
        except BaseException as e:  # noqa: BLE001 -- reported below
            errors.append(e)

    threads = [threading.Thread(target=wrap, args=(i, a)) for i, a in enumerate(args_list)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)
    return results


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_threads_with_different_rules(backend):
    """Every case of the table at once, one thread each, float32 and float64 alternating."""
    jobs = [job(rule, options, seed, (np.float32, np.float64)[seed % 2])
            for seed, (rule, options, _) in enumerate(CASES)]
    want = [run_job(j, backend) for j in jobs]  # one after another (also warms the JIT)
    barrier = threading.Barrier(len(jobs))
    got = run_threads(run_job, [(j, backend, barrier) for j in jobs])
    for w, g, (rule, options, _, _) in zip(want, got, jobs):
        assert g == w, f"{rule} {options}"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_threads_sharing_one_kernel(backend):
    """Six threads on the same rule (one compiled kernel), different data."""
    jobs = [job("adam", {"lr": 1e-2, "amsgrad": True, "clip_global_norm": 1.0}, seed, np.float32)
            for seed in range(6)]
    want = [run_job(j, backend) for j in jobs]
    barrier = threading.Barrier(len(jobs))
    assert run_threads(run_job, [(j, backend, barrier) for j in jobs]) == want


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_threads_functional_api(backend):
    """The stateless functional API from several threads at once."""
    def fn(seed, barrier):
        rng = np.random.default_rng(seed)
        params = [rng.standard_normal(s) for s in SIZES]
        m = [np.zeros_like(p) for p in params]
        v = [np.zeros_like(p) for p in params]
        if barrier is not None:
            barrier.wait()
        mu = 1.0
        for t in range(1, STEPS + 1):
            g = [rng.standard_normal(p.shape) for p in params]
            info = F.nadam(params, g, m, v, step=t, lr=1e-2, mu_product=mu, backend=backend)
            mu = info.group_state[0]["mu_product"]
        return [a.tobytes() for a in params + m + v], mu

    want = [fn(s, None) for s in range(6)]
    barrier = threading.Barrier(6)
    assert run_threads(fn, [(s, barrier) for s in range(6)]) == want


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_threads_with_nonfinite_skips(backend):
    """A thread whose steps are skipped does not disturb the others, and vice versa."""
    def fn(seed, poison, barrier):
        rng = np.random.default_rng(seed)
        params = [rng.standard_normal(s) for s in SIZES]
        opt = fo.RMSprop(params, lr=1e-2, momentum=0.9, centered=True, nonfinite="skip",
                         backend=backend)
        if barrier is not None:
            barrier.wait()
        skipped = 0
        for t in range(STEPS):
            g = [rng.standard_normal(p.shape) for p in params]
            if poison and t % 2:
                g[-1][-1] = np.nan
            skipped += opt.step(g).skipped
        return [p.tobytes() for p in params], opt.step_count, skipped

    args = [(s, s % 2 == 1) for s in range(6)]
    want = [fn(s, p, None) for s, p in args]
    assert [w[2] for w in want] == [0, 2, 0, 2, 0, 2]
    barrier = threading.Barrier(len(args))
    assert run_threads(fn, [(s, p, barrier) for s, p in args]) == want
