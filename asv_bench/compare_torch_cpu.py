"""fastopt's numba backend against torch's ``fused=True`` CPU optimizers, side by side.

    python asv_bench/compare_torch_cpu.py [--threads 2] [--reps 15] [--quick]

Both run in this one process on the same number of threads; each repetition
times one step of fastopt and one of torch back to back (alternating which
goes first), and the table quotes the median of the per-repetition ratios, so
a noisy machine slows both sides of a pair alike.  The goals are those of
the numba backend.  Needs ``torch`` (the ``bench`` extra).

Like for like, fastopt runs with ``nonfinite="ignore"`` (torch's fused
optimizers check nothing unless a GradScaler passes ``found_inf``); the row
marked "default" shows fastopt's default ``nonfinite="raise"``, whose check is
one extra read of the grads.
"""

from __future__ import annotations

import argparse
import os
import sys


def _parse():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="skip the 124M-element GPT-2-like case")
    return ap.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None:  # before numba and torch start their thread pools
    os.environ.setdefault("NUMBA_NUM_THREADS", str(ARGS.threads))
    os.environ.setdefault("OMP_NUM_THREADS", str(ARGS.threads))

import numpy as np  # noqa: E402

from fastopt.apps.benchkit import (GPT2_SMALL_SIZES, Progress, bytes_per_element,  # noqa: E402
                                   measure, pairwise)

N16 = 16_777_216


def make(sizes, seed=0):
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s, dtype=np.float32) for s in sizes]
    grads = [rng.standard_normal(s, dtype=np.float32) * np.float32(1e-3) for s in sizes]
    return params, grads


def fastopt_step(cls, sizes, **kw):
    import fastopt as fo

    params, grads = make(sizes)
    kw.setdefault("nonfinite", "ignore")
    opt = getattr(fo, cls)(params, backend="numba", **kw)
    return lambda: opt.step(grads)


def torch_step(cls, sizes, **kw):
    import torch

    params, grads = make(sizes)
    tp = [torch.nn.Parameter(torch.from_numpy(p)) for p in params]
    for p, g in zip(tp, grads):
        p.grad = torch.from_numpy(g)
    opt = getattr(torch.optim, cls)(tp, fused=True, **kw)
    return opt.step


def main(args):
    import numba
    import torch

    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    reps = args.reps
    rows = []
    bar = Progress(8 - args.quick, unit="case")  # the rows below, then a += b

    def vs_torch(name, cls, sizes, goal, fo_kw=None, torch_kw=None):
        bar.update(name)
        fa = fastopt_step(cls, sizes, **(fo_kw or {}))
        fb = torch_step(cls, sizes, **(torch_kw or fo_kw or {}))
        a, b, r = pairwise(fa, fb, reps)
        rows.append((name, "torch fused", a, b, r, goal))
        return a

    adam16 = vs_torch("Adam fp32 16.7M", "Adam", [N16], 1.0, {"lr": 1e-3})
    vs_torch("Adam fp32 16.7M, default nonfinite=raise", "Adam", [N16], 1.25,
             {"lr": 1e-3, "nonfinite": "raise"}, {"lr": 1e-3})
    vs_torch("SGD momentum 16.7M", "SGD", [N16], 0.9, {"lr": 1e-3, "momentum": 0.9})
    vs_torch("Adagrad 16.7M", "Adagrad", [N16], 0.9, {"lr": 1e-2})
    if not args.quick:
        vs_torch("Adam GPT-2 small (148 tensors, 124M)", "Adam", GPT2_SMALL_SIZES, 1.05,
                 {"lr": 1e-3})
    vs_torch("Adam 1000 x 256", "Adam", [256] * 1000, 0.5, {"lr": 1e-3})

    # Adam + clip_global_norm against plain Adam, both fastopt
    bar.update("Adam + clip_global_norm")
    fa = fastopt_step("Adam", [N16], lr=1e-3, clip_global_norm=1.0)
    fb = fastopt_step("Adam", [N16], lr=1e-3)
    a, b, r = pairwise(fa, fb, reps)
    rows.append(("Adam + clip_global_norm 16.7M", "fastopt Adam", a, b, r, 1.25))

    # the bandwidth of an in-place a += b (3 float32 arrays, 12 bytes/element) against Adam's
    # bytes per element (the rule table's count: 28 in float32)
    bar.update("a += b")
    x, y = make([N16])
    x, y = x[0], y[0]

    @numba.njit(parallel=True, nogil=True)
    def add_(a, b):
        for i in numba.prange(a.size):
            a[i] += b[i]

    add_(x, y)
    t_add = measure(lambda: add_(x, y), min_time=0.0, min_runs=reps, max_runs=reps,
                    max_time=float("inf"))
    frac = (bytes_per_element("adam", itemsize=4) / adam16) / (3 * 4 / t_add)
    bar.close()

    print(f"threads={args.threads} reps={reps} numba={numba.__version__} torch={torch.__version__} "
          f"layer={numba.threading_layer()}")
    print(f"{'case':40s} {'baseline':14s} {'fastopt ms':>10s} {'base ms':>9s} {'ratio':>6s} "
          f"{'goal':>6s}  met")
    for name, base, a, b, r, goal in rows:
        print(f"{name:40s} {base:14s} {a * 1e3:10.2f} {b * 1e3:9.2f} {r:6.2f} {'<=' + str(goal):>6s}"
              f"  {'yes' if r <= goal else 'NO'}")
    print(f"Adam 16.7M bytes/s vs numba a += b ({t_add * 1e3:.2f} ms): {frac:.0%} (goal >= 85%: "
          f"{'yes' if frac >= 0.85 else 'NO'})")


if __name__ == "__main__":
    sys.exit(main(ARGS))
