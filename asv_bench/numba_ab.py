"""The numba backend's kernels against those of another git revision, interleaved.

    python asv_bench/numba_ab.py [--rev main] [--threads 2] [--reps 21] [--n 16777216]

Loads ``kernels/numba_cpu.py`` as it is at ``--rev`` next to the working tree's
copy in this one process and times one kernel call of each, back to back
(alternating which goes first), for the same arrays and host scalars; prints
the median of the per-pair ratios (working tree / rev).  Only the kernel call
is timed (``Pre()``: no pipeline options, no read pass).  The old copy caches
its kernels under ``$TMPDIR/fastopt-numba-ab/<rev>``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile


def _parse():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", default="main")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=21)
    ap.add_argument("--n", type=int, default=16_777_216)
    ap.add_argument("--rules", default="adam,sgd,sgd-momentum,adamw,adagrad,adahessian")
    return ap.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None:  # before numba starts its thread pool
    os.environ.setdefault("NUMBA_NUM_THREADS", str(ARGS.threads))
    os.environ.setdefault("OMP_NUM_THREADS", str(ARGS.threads))
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare_torch_cpu import pairwise  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_rev(rev):
    """``kernels/numba_cpu.py`` at ``rev`` as the module ``fastopt.kernels._numba_ab``."""
    src = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:kernels/numba_cpu.py"], check=True,
                         capture_output=True, text=True).stdout
    sha = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", rev], check=True,
                         capture_output=True, text=True).stdout.strip()
    folder = os.path.join(tempfile.gettempdir(), "fastopt-numba-ab", sha)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "numba_cpu.py")
    if not os.path.exists(path) or open(path).read() != src:
        with open(path, "w") as f:
            f.write(src)
    import fastopt.kernels  # noqa: F401 -- the package its relative imports resolve in

    spec = importlib.util.spec_from_file_location("fastopt.kernels._numba_ab", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


CASES = [("adam", {}), ("sgd", {}), ("sgd", {"momentum": 0.9}), ("adamw", {}),
         ("adagrad", {}), ("adahessian", {})]


def _label(case):
    return case[0] + ("-momentum" if case[1].get("momentum") else "")


def main():
    from fastopt._backend import Pre
    from fastopt._rules import RULES

    old = load_rev(ARGS.rev)
    # the working tree's module registers last, so fastopt's registry holds it
    from fastopt.kernels import numba_cpu as new
    print(f"numba kernels: working tree / {ARGS.rev}, {ARGS.n} float32, "
          f"{ARGS.threads} threads, median of {ARGS.reps} interleaved pairs")
    rng = np.random.default_rng(0)
    n = ARGS.n
    wanted = ARGS.rules.split(",")
    for name, opt in [c for c in CASES if _label(c) in wanted]:
        rule = RULES[name]
        hp = {**rule.defaults, **opt}
        s, _ = rule.step_scalars(hp, 2, dict(rule.group_state))
        kernels = []
        for mod in (new, old):
            p = [rng.standard_normal(n, dtype=np.float32)]
            g = [rng.standard_normal(n, dtype=np.float32) * np.float32(1e-3)]
            st = {k: [np.zeros(n, np.float32)] for k, _ in rule.state(hp)}
            ex = [rng.standard_normal(n, dtype=np.float32)] if rule.extra else None
            if mod is new:
                k = new._DRIVERS[rule.kind](rule)
            else:
                k = old._make_kernel(name)
            kernels.append(lambda k=k, p=p, g=g, st=st, ex=ex: k(p, g, st, s, Pre(), ex))
        tn, to, ratio = pairwise(kernels[0], kernels[1], ARGS.reps)
        label = name + "".join(f" {k}={v}" for k, v in opt.items())
        print(f"  {label:22} new {tn * 1e3:7.2f} ms  old {to * 1e3:7.2f} ms  ratio {ratio:.3f}")


if __name__ == "__main__":
    main()
