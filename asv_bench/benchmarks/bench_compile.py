"""Time to JIT-compile the Numba backend: every rule, one step, in a fresh process.

``track_cold_compile`` points ``NUMBA_CACHE_DIR`` at a new, empty folder, so
nothing comes from the disk cache; ``track_cached_compile`` runs a second
process on the folder the first one filled, the cost a user pays on every
later start.  Both include loading the backend (importing numba).
"""

import os
import tempfile

from fastopt.apps import bench as _bench

from .common import DTYPES


class NumbaCompile:
    params = [list(DTYPES)]
    param_names = ["dtype"]
    rounds = 1
    repeat = 1
    timeout = 900

    def setup(self, dtype):
        why = _bench.unavailable("numba")
        if why:
            raise NotImplementedError(why)

    def track_cold_compile(self, dtype):
        return _bench.cold_compile_seconds(dtype)

    track_cold_compile.unit = "seconds"

    def track_cached_compile(self, dtype):
        with tempfile.TemporaryDirectory(prefix="fastopt-numba-cache-") as tmp:
            _bench.cold_compile_seconds(dtype, cache_dir=os.path.join(tmp, "cache"))
            return _bench.cold_compile_seconds(dtype, cache_dir=os.path.join(tmp, "cache"))

    track_cached_compile.unit = "seconds"
