"""Helpers shared by the benchmark modules (as ``benchmarks/common.py`` in NumPy's suite).

The cases themselves (arrays, optimizers, peers) live in ``fastopt.apps.bench``
and the timing loop, the shapes and the bytes-per-element table in
``fastopt.apps.benchkit``, so that ``python -m fastopt bench`` measures exactly
what this suite measures.  A parameter combination that cannot run here (a
backend that is not available, a rule a peer does not have, no torch) raises
NotImplementedError in ``setup``: asv's way to skip it.
"""

import numpy as np

from fastopt.apps import bench as _bench
from fastopt.apps.bench import FASTOPT_IMPLS, IMPLS, NAIVE_RULES, add_bandwidth  # noqa: F401
from fastopt.apps.benchkit import ELEMENTWISE_RULES, GPT2_SMALL, LAYOUTS, TINY_LIST, measure  # noqa: F401

DTYPES = ("float32", "float64")
SIZES = (1_000, 1_000_000, 16_000_000)
BIG = 16_000_000

_LAST = {}


def get_case(impl, rule, shapes, dtype, options=None, nonfinite="ignore"):
    """A warmed :class:`fastopt.apps.bench.Case`, kept for the next call with the same arguments.

    asv re-runs ``setup`` before every timed sample (asv#966); the step's cost
    does not depend on the values it left behind, so a repeated setup with the
    same parameters reuses the arrays instead of rebuilding (and re-warming)
    hundreds of MB.  Only the latest case is kept, so memory stays one case's.
    """
    key = (impl, rule, tuple(map(tuple, shapes)), str(dtype), repr(sorted((options or {}).items())),
           nonfinite)
    if key not in _LAST:
        _LAST.clear()
        _LAST[key] = _bench.make_case(impl, rule, shapes, dtype, options, nonfinite)
    return _LAST[key]


def xp_of(impl):
    if impl == "cupy":
        import cupy

        return cupy
    return np
