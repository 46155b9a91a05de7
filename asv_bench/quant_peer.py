"""fastopt.quantization.quantize_blockwise against bitsandbytes' CPU blockwise quantizer.

    python asv_bench/quant_peer.py [--n 16777216] [--threads 2] [--reps 7]

Both quantize the same float32 array (blocksize 256, bitsandbytes' signed and
unsigned dynamic maps) in this one process.  Each repetition times one call of
each back to back, alternating which goes first, and the table quotes the
median of the per-repetition time ratios, so a noisy machine slows both sides
of a pair alike.  fastopt's quantizer here is the plain NumPy reference (one
thread); bitsandbytes runs its C++ kernel on ``--threads`` OpenMP threads.

It also reports what the two produce: absmax must agree bit for bit; the codes
differ where bitsandbytes' uniform 65536-bin lookup table does not pick the
nearest map entry, and the table shows how often, and the mean round-trip
error of each (in units of the block absmax).  Needs ``bitsandbytes`` and ``torch``
(optional peers).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def _parse():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1 << 24, help="elements (default 16.7M)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    return ap.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None:  # before torch starts its thread pools
    os.environ.setdefault("OMP_NUM_THREADS", str(ARGS.threads))

import numpy as np  # noqa: E402

from fastopt import quantization as fq  # noqa: E402


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def compare(n: int, reps: int, threads: int) -> list[dict]:
    try:
        import torch
        import bitsandbytes.functional as bnbf
    except ImportError as exc:  # an optional peer: say so, do not fail
        sys.exit(f"quant_peer: bitsandbytes/torch not importable ({exc}); nothing to compare")
    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    base = rng.standard_normal(n).astype(np.float32)
    rows = []
    for label, signed, data in (("signed map, randn", True, base),
                                ("unsigned map, randn**2", False, base * base)):
        code = bnbf.create_dynamic_map(signed=signed)
        tdata = torch.from_numpy(data)

        def ours():
            return fq.quantize_blockwise(data, signed=signed)

        def theirs():
            c, s = bnbf.quantize_blockwise(tdata, code=code, blocksize=256)
            return c.numpy(), s.absmax.numpy()

        ours(), theirs()  # warm: bitsandbytes builds its lookup table on first use
        ratios, t_ours, t_theirs = [], [], []
        for rep in range(reps):
            if rep % 2:
                tt, (ct, at) = _timed(theirs)
                to, (co, ao) = _timed(ours)
            else:
                to, (co, ao) = _timed(ours)
                tt, (ct, at) = _timed(theirs)
            ratios.append(to / tt)
            t_ours.append(to)
            t_theirs.append(tt)
        m = fq.dynamic_map(signed).astype(np.float64)
        # distances from the normalized value as both define it: x / absmax in float32
        y = (data / np.repeat(ao, 256)[:n]).astype(np.float64)
        err_o = np.abs(y - m[co])
        err_t = np.abs(y - m[ct])
        rows.append(dict(
            case=label, ratio=statistics.median(ratios),
            ms_ours=1e3 * statistics.median(t_ours), ms_theirs=1e3 * statistics.median(t_theirs),
            absmax_equal=bool(np.array_equal(ao, at)),
            codes_differ=float(np.mean(co != ct)),
            theirs_farther=float(np.mean(err_t > err_o)),
            ours_farther=float(np.mean(err_o > err_t)),
            err_ours=float(err_o.mean()), err_theirs=float(err_t.mean())))
    return rows


def main() -> None:
    rows = compare(ARGS.n, ARGS.reps, ARGS.threads)
    print(f"quantize_blockwise, n={ARGS.n}, blocksize 256, bitsandbytes on {ARGS.threads} "
          f"threads, median of {ARGS.reps} interleaved pairs")
    print(f"{'case':24} {'ours/bnb':>9} {'ours ms':>8} {'bnb ms':>8} {'absmax=':>7} "
          f"{'codes differ':>12} {'bnb farther':>11} {'ours farther':>12} "
          f"{'mean |err| ours':>15} {'bnb':>9}")
    for r in rows:
        print(f"{r['case']:24} {r['ratio']:9.2f} {r['ms_ours']:8.1f} {r['ms_theirs']:8.1f} "
              f"{str(r['absmax_equal']):>7} {r['codes_differ']:12.2e} {r['theirs_farther']:11.2e} "
              f"{r['ours_farther']:12.2e} {r['err_ours']:15.3e} {r['err_theirs']:9.3e}")


if __name__ == "__main__":
    main()
