"""The CPU-speed targets (where users feel it), measured for the numba backend.

    python asv_bench/numba_speed.py [--threads 2] [--reps 15] [--skip-compile]

Every ratio comes from one interleaved run in this process (``pairwise`` of
``compare_torch_cpu.py``: each repetition times both sides back to back,
alternating which goes first; the median of the per-pair ratios), on
``--threads`` threads with ``OMP_WAIT_POLICY=passive``.  The first-use rows
time fresh processes with an empty and with a warm kernel cache.

1. the read pass (the non-finite check / norms) against a reference read of the
   same bytes (NumPy's multi-threaded BLAS ``dot``), as a share of bandwidth;
2. default ``nonfinite="raise"`` steps against torch's fused optimizers, and
   Adam + ``clip_global_norm`` against plain Adam;
3. small models (the demo's MLP, 1000 x 256 tensors) against torch fused, 1 thread;
4. the first Adam step of a fresh process, cold and warm cache;
5. AdaHessian against Adam.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile


def _parse():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--skip-compile", action="store_true", help="skip the first-use rows")
    ap.add_argument("--only", default="1,2,3,4,5", help="comma-separated goal numbers")
    return ap.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None:  # before numba and torch start their thread pools
    os.environ.setdefault("NUMBA_NUM_THREADS", str(ARGS.threads))
    os.environ.setdefault("OMP_NUM_THREADS", str(ARGS.threads))
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare_torch_cpu import N16, fastopt_step, make, pairwise, torch_step  # noqa: E402

#: The demo's default MLP (``python -m fastopt demo``): 6 tensors, 26,634 params.
DEMO_SIZES = [68 * 128, 128, 128 * 128, 128, 128 * 10, 10]

def row(name, a, b, r, versus, goal):
    ok = "met" if r <= goal else "NOT met"
    print(f"  {name:44} {a * 1e3:9.3f} ms  vs {versus:18} {b * 1e3:9.3f} ms  "
          f"ratio {r:5.2f}  (goal <= {goal}: {ok})")


def main():
    import numba
    import torch

    from fastopt.kernels import numba_cpu as nc

    torch.set_num_threads(ARGS.threads)
    numba.set_num_threads(ARGS.threads)
    reps = ARGS.reps
    only = set(ARGS.only.split(","))
    print(f"numba backend, CPU-speed targets: {ARGS.threads} threads, median of {reps} "
          f"interleaved pairs")

    if "1" in only:
        g = make([N16])[1]
        read = lambda: nc.OPS.grad_stats(g, None, inv_scale=None, clip_value=None,  # noqa: E731
                                         need_sumsq=False, check_finite=True)
        exact = lambda: nc.OPS.grad_stats(g, None, inv_scale=None, clip_value=1.0,  # noqa: E731
                                          need_sumsq=True, check_finite=True)
        dot = lambda: np.dot(g[0], g[0])  # noqa: E731
        a, b, r = pairwise(dot, read, reps)
        print(f"  1. read pass (check) 16.7M fp32: {b * 1e3:.2f} ms, BLAS dot {a * 1e3:.2f} ms: "
              f"{r:.2f} of the reference bandwidth (goal >= 0.8: {'met' if r >= 0.8 else 'NOT met'})")
        a, b, r = pairwise(dot, exact, reps)
        print(f"     exact pass (clip_value, flag) 16.7M fp32: {b * 1e3:.2f} ms: {r:.2f} of it")

    if "2" in only:
        for name, cls, kw, goal in [("2. Adam default 16.7M", "Adam", {"lr": 1e-3}, 1.15),
                                    ("2. SGD-momentum default 16.7M", "SGD",
                                     {"lr": 1e-3, "momentum": 0.9}, 1.2),
                                    ("2. Adagrad default 16.7M", "Adagrad", {"lr": 1e-2}, 1.2)]:
            fa = fastopt_step(cls, [N16], nonfinite="raise", **kw)
            fb = torch_step(cls, [N16], **kw)
            row(name, *pairwise(fa, fb, reps), "torch fused", goal)
        fa = fastopt_step("Adam", [N16], lr=1e-3, nonfinite="raise", clip_global_norm=1.0)
        fb = fastopt_step("Adam", [N16], lr=1e-3, nonfinite="raise")
        row("2. Adam + clip_global_norm 16.7M (default)", *pairwise(fa, fb, reps),
            "fastopt Adam", 1.15)

    if "3" in only:
        numba.set_num_threads(1)
        torch.set_num_threads(1)
        for name, sizes in [("3. demo MLP (26,634), Adam default, 1 thr", DEMO_SIZES),
                            ("3. 1000 x 256, Adam default, 1 thr", [256] * 1000)]:
            fa = fastopt_step("Adam", sizes, lr=1e-3, nonfinite="raise")
            fb = torch_step("Adam", sizes, lr=1e-3)
            row(name, *pairwise(fa, fb, reps * 20), "torch fused", 0.5)
        numba.set_num_threads(ARGS.threads)
        torch.set_num_threads(ARGS.threads)

    if "5" in only:
        import fastopt as fo

        params, grads = make([N16])
        hd = [np.abs(x) for x in make([N16], seed=1)[1]]
        ah = fo.AdaHessian(params, lr=1e-3, nonfinite="ignore", backend="numba")
        fa = lambda: ah.step(grads, hd)  # noqa: E731
        fb = fastopt_step("Adam", [N16], lr=1e-3)
        a, b, r = pairwise(fa, fb, reps)
        print(f"  5. AdaHessian / Adam 16.7M: {r:.2f} (bytes: 32/28 = {32 / 28:.2f})")

    if "4" in only and not ARGS.skip_compile:
        from fastopt.apps.bench import first_step_parts

        with tempfile.TemporaryDirectory(prefix="fastopt-cold-") as tmp:
            cold = first_step_parts("fastopt", tmp)
            warm = first_step_parts("fastopt", tmp)
        print(f"  4. first Adam step, fresh process (after its imports): cold cache "
              f"{cold[1]:.2f} s (goal <= 3: {'met' if cold[1] <= 3 else 'NOT met'}), warm cache "
              f"{warm[1]:.2f} s (goal <= 0.1: {'met' if warm[1] <= 0.1 else 'NOT met'}); "
              f"import fastopt {warm[0]:.2f} s")


if __name__ == "__main__":
    main()
