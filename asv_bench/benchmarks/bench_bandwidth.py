"""Achieved memory bandwidth of one step, and its fraction of an in-place ``a += b``.

Bytes per step count the arrays a fused step must touch once each (the table
in ``fastopt.apps.benchkit``: Adam reads p, g, m, v and writes p, m, v = 7 arrays);
an implementation that makes more passes shows up as fewer GB/s.  The
reference ``a += b`` (3 arrays) runs in the same process on arrays of the same
size and dtype, on the same device: for CPU rows the faster of NumPy's
(one thread) and torch's ``add_`` (all threads; when torch is installed), so a
multi-threaded step is held to the machine's bandwidth, not one core's; CuPy's
for ``cupy``.
At 16M float32 elements (64 MB per array) every array is far outside the caches.
"""

import numpy as np

from .common import BIG, ELEMENTWISE_RULES, IMPLS, add_bandwidth, get_case, measure, xp_of


class Bandwidth:
    params = [list(ELEMENTWISE_RULES), list(IMPLS)]
    param_names = ["rule", "impl"]
    rounds = 1
    timeout = 300

    def setup(self, rule, impl):
        case = get_case(impl, rule, [(BIG,)], "float32")
        t = measure(case.step, case.sync, min_time=0.3)
        self.bytes_per_s = case.bytes_per_step / t
        self.add_bytes_per_s = add_bandwidth(BIG, np.float32, xp=xp_of(impl), min_time=0.3)

    def track_gbps(self, rule, impl):
        return self.bytes_per_s / 1e9

    track_gbps.unit = "GB/s"

    def track_fraction_of_add(self, rule, impl):
        return self.bytes_per_s / self.add_bytes_per_s

    track_fraction_of_add.unit = "fraction of a += b"
