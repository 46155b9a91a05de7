"""Memory of one step: a fused step must not allocate arrays proportional to the params.

``peakmem_step`` is asv's peak resident memory of the whole process, so it
includes the params, grads and state that ``setup`` allocates (7 arrays of
64 MB for Adam at 16M float32): compare implementations of one rule.
``track_temporary_bytes`` isolates the step: the peak of the memory the step
allocates through Python's allocators (``tracemalloc``, which sees every NumPy
array), in units of one parameter array -- 0 for a fused in-place kernel,
several for an expression-by-expression NumPy update.  Allocations made
outside Python's allocators (torch's, CuPy's, Numba's runtime) are invisible
to it, so it runs for the NumPy-array implementations only.
"""

import tracemalloc

from .common import BIG, ELEMENTWISE_RULES, FASTOPT_IMPLS, IMPLS, get_case


class Memory:
    params = [list(ELEMENTWISE_RULES), list(IMPLS)]
    param_names = ["rule", "impl"]
    rounds = 1
    timeout = 300

    def setup(self, rule, impl):
        self.case = get_case(impl, rule, [(BIG,)], "float32")

    def peakmem_step(self, rule, impl):
        self.case.step()
        self.case.sync()


class TemporaryMemory:
    params = [list(ELEMENTWISE_RULES), [i for i in FASTOPT_IMPLS if i != "cupy"] + ["naive-numpy"]]
    param_names = ["rule", "impl"]
    rounds = 1

    def setup(self, rule, impl):
        self.case = get_case(impl, rule, [(1_000_000,)], "float32")

    def track_temporary_bytes(self, rule, impl):
        case = self.case
        tracemalloc.start()
        try:
            case.step()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        return peak / (case.numel * case.dtype.itemsize)

    track_temporary_bytes.unit = "param arrays"
