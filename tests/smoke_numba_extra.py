"""Smoke check of the ``numba`` extra installed alone: ``pip install -e ".[numba]" pytest``.

``.ci/run`` runs this file in a second, small virtual environment.  The main
environment installs ``.[dev]``, where scikit-learn brings scipy along, and
that hid a defect: ``np.linalg.solve`` inside an njit function needs scipy, so
``fo.Newton(p, backend="numba").step(g, H)`` raised ``ImportError`` after its
input checks had passed for anyone who had installed only ``fastopt[numba]``.

One Adam step and one Newton step on the numba backend are compared with the
NumPy reference, each in a child process.  The file is a script, not a pytest module (its name does not
start with ``test_``), because in the main environment scipy is present and the
first check below would fail by design.  Exit status: the number of failed
checks.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time

import numpy as np

import fastopt as fo


def _environment():
    """The point of the check: numba present, scipy absent."""
    assert importlib.util.find_spec("scipy") is None, (
        "scipy is installed, so this environment cannot show what the numba extra alone lacks")
    info = fo.backends()["numba"]
    assert info["available"], f"the numba backend does not load: {info['reason']}"


def _one_step(make, feed):
    """Params after one step of ``make(params, backend)`` on numpy and on numba."""
    out = {}
    for backend in ("numpy", "numba"):
        params = [p.copy() for p in feed[0]]
        make(params, backend).step(*feed[1:])
        out[backend] = params
    return out


def _compare(out):
    for want, got in zip(out["numpy"], out["numba"]):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13)


def _adam():
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(37), rng.standard_normal((3, 5))]
    grads = [rng.standard_normal(p.shape) for p in params]
    _compare(_one_step(lambda ps, b: fo.Adam(ps, lr=1e-2, weight_decay=0.1, backend=b),
                       (params, grads)))


def _newton():
    rng = np.random.default_rng(1)
    params = [rng.standard_normal(4), rng.standard_normal((2, 3))]
    grads = [rng.standard_normal(p.shape) for p in params]
    hessians = []
    for p in params:
        a = rng.standard_normal((p.size, p.size))
        hessians.append(a @ a.T / p.size + np.eye(p.size))  # symmetric positive definite
    _compare(_one_step(lambda ps, b: fo.Newton(ps, lr=0.5, damping=1e-2, backend=b),
                       (params, grads, hessians)))


CHECKS = {"environment": ("numba extra alone: scipy absent, numba loads", _environment),
          "adam": ("Adam step, numba == numpy", _adam),
          "newton": ("Newton step, numba == numpy", _newton)}


def main() -> int:
    """Each check in a child process: a kernel can abort the interpreter (with a warm Numba
    cache compiled where scipy was present, the Newton step dies of "Specified LAPACK function
    could not be found" instead of raising), and the other checks must still report."""
    failed = 0
    for key, (name, _) in CHECKS.items():
        start = time.perf_counter()
        rc = subprocess.run([sys.executable, __file__, key]).returncode
        took = time.perf_counter() - start
        if rc:
            failed += 1
            print(f"FAIL  {name} (exit status {rc}, {took:.1f} s)", flush=True)
        else:
            print(f"ok    {name} ({took:.1f} s)", flush=True)
    return failed


if __name__ == "__main__":
    if len(sys.argv) == 2:
        CHECKS[sys.argv[1]][1]()  # one check, in this (child) process; an exception exits 1
        sys.exit(0)
    sys.exit(main())
