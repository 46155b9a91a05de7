"""fastopt.hogwild: lock-free steps of one optimizer from several threads.

With one thread a Hogwild optimizer is the ordinary optimizer, bit for bit.  With
several, the arrays race (documented in fastopt/hogwild.py) so the tests check what
is promised: every accepted step gets its own step number and host scalars, bad
input raises in its own thread and writes nothing, and training still converges.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from fastopt._optim import OPTIMIZERS
from fastopt.hogwild import Hogwild

from _cases import CASES

SIZES = ((5,), (13, 7), (300,))


def feed(rule, seed, steps, dtype=np.float32):
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s).astype(dtype) for s in SIZES]
    grads = [[rng.standard_normal(s).astype(dtype) for s in SIZES] for _ in range(steps)]
    extras = ([[rng.standard_normal(s).astype(dtype) for s in SIZES] for _ in range(steps)]
              if OPTIMIZERS[rule].rule.extra else None)
    return params, grads, extras


@pytest.mark.parametrize("rule, options", [(r, o) for r, o, _ in CASES
                                           if r not in ("newton", "muon", "adafactor")],
                         ids=[c for r, _, c in CASES if r not in ("newton", "muon", "adafactor")])
def test_one_thread_is_the_plain_optimizer(rule, options):
    params, grads, extras = feed(rule, 0, 4)
    mine = [p.copy() for p in params]
    hw = Hogwild(rule, mine, backend="numpy", **options)
    ref = OPTIMIZERS[rule](params, backend="numpy", **options)
    for t, g in enumerate(grads):
        args = (extras[t],) if extras else ()
        a, b = hw.step(g, *args), ref.step(g, *args)
        assert a.grad_norm == b.grad_norm and a.skipped == b.skipped
    assert all(np.array_equal(p, q) for p, q in zip(mine, params))
    sd, want = hw.state_dict(), ref.state_dict()
    assert sd["step_count"] == want["step_count"] and sd["group_state"] == want["group_state"]
    for i in want["state"]:
        for n, a in want["state"][i].items():
            assert np.array_equal(sd["state"][i][n], a), (i, n)
    ref2 = OPTIMIZERS[rule]([p.copy() for p in params], backend="numpy", **options)
    ref2.load_state_dict(sd)  # the single-process format


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_threads_get_distinct_steps_and_exact_host_scalars(backend):
    """NAdam's mu_product is a running product over t: equal to the serial one only if
    every step took its own t, in order, under the bookkeeping lock."""
    n_threads, per_thread = 4, 25
    params, grads, _ = feed("nadam", 1, per_thread)
    hw = Hogwild("nadam", params, lr=1e-3, backend=backend)
    barrier = threading.Barrier(n_threads)

    def worker(i):
        barrier.wait()
        for g in grads:
            hw.step(g)

    hw.run(worker, n_threads)
    serial = OPTIMIZERS["nadam"]([p.copy() for p in params], lr=1e-3, backend=backend)
    for _ in range(n_threads * per_thread):
        serial.step(grads[0])
    assert hw.step_count == n_threads * per_thread
    assert hw.group_state == serial.group_state


def test_threads_converge_on_least_squares():
    """Four threads, plain SGD (the paper's case), each on its own rows of a consistent
    linear system; the step is small enough that stale reads cannot make it diverge."""
    rng = np.random.default_rng(2)
    a = rng.standard_normal((400, 20))
    x_true = rng.standard_normal(20)
    b = a @ x_true
    x = np.zeros(20)
    hw = Hogwild("sgd", [x], lr=0.1, backend="numba")

    def worker(i):
        rows = slice(100 * i, 100 * (i + 1))
        for _ in range(150):
            r = a[rows] @ x - b[rows]
            hw.step([a[rows].T @ r / 100])

    hw.run(worker, 4)
    assert hw.step_count == 600
    assert np.linalg.norm(x - x_true) < 1e-3 * np.linalg.norm(x_true)  # from 100% at x = 0


def test_bad_input_in_one_thread_writes_nothing():
    params, grads, _ = feed("sgd", 3, 5)
    hw = Hogwild("sgd", params, lr=0.1, momentum=0.9, nonfinite="skip", backend="numpy")
    before = [p.copy() for p in params]
    bad = [g.copy() for g in grads[0]]
    bad[1] = bad[1].T.copy()
    with pytest.raises(ValueError, match=r"grads\[1\]: expected shape \(13, 7\), got \(7, 13\)"):
        hw.step(bad)
    poisoned = [g.copy() for g in grads[0]]
    poisoned[2][0] = np.nan
    assert hw.step(poisoned).skipped
    assert hw.step_count == 0 and all(np.array_equal(p, q) for p, q in zip(params, before))

    def worker(i):
        if i == 1:
            hw.step(bad)
        for g in grads:
            hw.step(g)

    with pytest.raises(ValueError, match=r"grads\[1\]"):
        hw.run(worker, 2)
    assert hw.step_count == len(grads)  # thread 0's steps; thread 1 wrote nothing


@pytest.mark.parametrize("args, match", [
    (("newton", [np.zeros(3)]), "dense system"),
    (("muon", [np.zeros((3, 2))]), "matrix products"),
    (("adafactor", [np.zeros((3, 2))]), "row and column sums"),
    (("adam", [np.zeros(3)], {"lr": -1.0}), r"lr: expected a finite number >= 0"),
    (("adam", np.zeros(3)), "single array"),
])
def test_bad_construction(args, match):
    kwargs = args[2] if len(args) > 2 else {}
    with pytest.raises((ValueError, TypeError), match=match):
        Hogwild(args[0], args[1], **kwargs)


def test_run_checks_thread_count():
    hw = Hogwild("sgd", [np.zeros(3)], lr=0.1)
    with pytest.raises(ValueError, match="n_threads: expected an integer >= 1, got 0"):
        hw.run(lambda i: None, 0)


def test_demo_hogwild(capsys):
    from fastopt._cli import main

    assert main(["demo", "--hogwild", "2", "--epochs", "8", "-o", "adam", "--backend", "numpy",
                 "--hidden", "32"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("adam ")]
    assert [r[2] for r in rows] == ["1", "2"]  # threads
    assert int(rows[1][5]) == int(rows[0][5])  # every step of the plan taken
    acc = [float(r[4].rstrip("%")) for r in rows]
    assert acc[1] > 50.0 and abs(acc[1] - acc[0]) < 5.0, out  # it learns, as one thread does (8 epochs: both near 95%, past the steep part where thread timing moved 2-epoch accuracy by 6 points)
