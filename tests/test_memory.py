"""A step on the compiled CPU backend allocates nothing proportional to the params.

Two meters: ``tracemalloc`` sees every NumPy allocation made on the Python side
(NumPy reports its buffers to it), and Numba's NRT statistics count the arrays
allocated inside the jitted kernels (which tracemalloc cannot see).  The
reference backend allocates temporaries by design and is not measured.
"""

import tracemalloc

import numpy as np
import pytest

from fastopt._backend import available
from fastopt._optim import OPTIMIZERS
from fastopt._rules import FACTORED, ORTHOGONALIZE, RULES

from _cases import CASES, cap_sizes, extra_input

pytestmark = pytest.mark.skipif(not available("numba"), reason="numba is not installed")

BIG = 1_000_003  # float64: 8 MB per array


def nrt_allocations():
    from numba.core.runtime import _nrt_python, rtsys

    if not _nrt_python.memsys_stats_enabled():
        _nrt_python.memsys_enable_stats()
    return rtsys.get_allocation_stats().alloc


def measure(rule, options, n):
    rng = np.random.default_rng(0)
    sizes = cap_sizes(rule, (n, 17, 1))  # a rule with an n x n extra input gets small tensors
    params = [rng.standard_normal(s) for s in sizes]
    grads = [rng.standard_normal(s) for s in sizes]
    extras = [extra_input(rule, p, rng) for p in params]
    opt = OPTIMIZERS[rule](params, backend="numba", **options)
    step = (lambda: opt.step(grads, extras)) if opt.rule.extra else (lambda: opt.step(grads))
    step()  # compile, create state
    step()
    nrt0 = nrt_allocations()
    tracemalloc.start()
    try:
        step()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, nrt_allocations() - nrt0, sum(p.nbytes for p in params)


#: Muon's Newton-Schulz products need matrix temporaries by nature (tests/test_rules_b.py
#: bounds them), Adafactor per-row and per-column sums, O(rows + cols) like its state
#: (tests/test_adafactor.py bounds them); every other rule is measured here.
_MEASURED = [(c[0], c[1], c[2]) for c in CASES if RULES[c[0]].kind not in (ORTHOGONALIZE, FACTORED)]


@pytest.mark.parametrize("rule,options", [(c[0], c[1]) for c in _MEASURED], ids=[c[2] for c in _MEASURED])
def test_step_allocates_nothing_proportional_to_params(rule, options):
    peak, nrt, nbytes = measure(rule, options, BIG)
    # a few kB of Python objects (lists, the scalar arrays, StepInfo) at most
    assert peak < 64 * 1024, f"{rule}: a step traced {peak} bytes for {nbytes} bytes of params"
    small_peak, small_nrt, _ = measure(rule, options, 1000)
    assert peak < small_peak + 16 * 1024, (peak, small_peak)
    # the same number of kernel-side arrays whatever the size (none should be per element)
    assert nrt == small_nrt, (nrt, small_nrt)
