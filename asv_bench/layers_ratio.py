"""BatchNorm forward + backward: numba over torch CPU at the same dtype, and each 16-bit
dtype over our float32, from one interleaved loop (the asv ``BatchNorm`` class's setups).

    python asv_bench/layers_ratio.py [--reps 15]

Sets ``OMP_WAIT_POLICY=passive`` before numba's and torch's OpenMP start (two runtimes whose
idle threads spin slow each other on a small machine).
"""

import argparse
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmarks.bench_layers import BN_SHAPES, DTYPES, BatchNorm  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args(argv)
    print(f"load average {os.getloadavg()[0]:.1f}, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}")
    print(f"{'shape':12s} {'dtype':9s} {'numba ms':>9s} {'torch ms':>9s} {'numba/torch':>12s} "
          f"{'numba/f32':>10s}")
    for shape in BN_SHAPES:
        runs = {}
        for dt in DTYPES:
            for impl in ("numba", "torch"):
                b = BatchNorm()
                b.setup(shape, impl, dt)
                runs[(dt, impl)] = b.run
        ts = {k: [] for k in runs}
        for _ in range(args.reps):
            for k, f in runs.items():
                t = time.perf_counter()
                f()
                ts[k].append(time.perf_counter() - t)
        med = {k: float(np.median(v)) for k, v in ts.items()}
        for dt in DTYPES:
            r = np.median(np.array(ts[(dt, "numba")]) / np.array(ts[(dt, "torch")]))
            print(f"{shape:12s} {dt:9s} {1e3 * med[(dt, 'numba')]:9.2f} {1e3 * med[(dt, 'torch')]:9.2f} "
                  f"{r:12.2f} {med[(dt, 'numba')] / med[('float32', 'numba')]:10.2f}")


if __name__ == "__main__":
    main()
