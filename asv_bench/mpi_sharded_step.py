"""Per-step phases of fastopt.distributed.ShardedOptimizer, under MPI.

    mpiexec -n 1 python -m mpi4py asv_bench/mpi_sharded_step.py            # W = 1
    mpiexec -n 2 python -m mpi4py asv_bench/mpi_sharded_step.py            # W = 2
    ... --layout 1000x256 --rule sgd --steps 20 --sum-order mpi

Shapes: GPT-2 small (148 tensors, 124M float32 elements) by default, from
fastopt.apps.bench.LAYOUTS.  Every rank times its own steps; rank 0 prints the
median over ranks of each rank's median per phase (``reduce``: pack + the
reduce-scatter + the average; ``stats``: norms and flags and their allgather;
``update``: the fused kernel on the rank's shard; ``allgather``: params to every
rank), the state bytes each rank holds and the bytes each rank sends per step.
Not an asv suite: asv cannot launch MPI jobs; this is the script to run by hand.
With ``--interleave`` each step of the sharded optimizer alternates with a
plain single-process step of the same rule on a copy of the params (no MPI),
so the ratio of the two comes from one run (needs memory for a second copy of
params and the full state).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from mpi4py import MPI

from fastopt._optim import OPTIMIZERS
from fastopt.apps.bench import BENCH_OPTIONS, LAYOUTS
from fastopt.distributed import ShardedOptimizer


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layout", default="gpt2-small", choices=sorted(LAYOUTS))
    ap.add_argument("--rule", default="adam")
    ap.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--sum-order", default="rank", choices=("rank", "mpi"))
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--interleave", action="store_true")
    a = ap.parse_args()

    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    dtype = np.dtype(a.dtype)
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(s, dtype=np.float32).astype(dtype, copy=False) * 0.02
              for s in LAYOUTS[a.layout]]
    grads = [rng.standard_normal(s, dtype=np.float32).astype(dtype, copy=False) * 1e-3
             for s in LAYOUTS[a.layout]]
    opts = dict(BENCH_OPTIONS.get(a.rule, {"lr": 1e-4}), backend=a.backend)
    opt = ShardedOptimizer(a.rule, params, comm, sum_order=a.sum_order, **opts)
    plain = None
    if a.interleave:
        plain = OPTIMIZERS[a.rule]([p.copy() for p in params], **opts)
        plain.step(grads)  # warm (JIT)
    opt.step(grads)  # warm: JIT, first touch of the buffers
    phases = {k: [] for k in ("reduce", "stats", "update", "allgather", "step", "plain")}
    for _ in range(a.steps):
        comm.Barrier()
        t0 = time.perf_counter()
        opt.step(grads)
        phases["step"].append(time.perf_counter() - t0)
        for k, v in opt.last_timings.items():
            phases[k].append(v)
        if plain is not None:
            t0 = time.perf_counter()
            plain.step(grads)
            phases["plain"].append(time.perf_counter() - t0)
    mine = np.array([np.median(phases[k]) if phases[k] else np.nan
                     for k in ("reduce", "stats", "update", "allgather", "step", "plain")])
    every = np.empty((world, mine.size))
    comm.Allgather(mine, every)
    held = np.empty(world, np.int64)
    comm.Allgather(np.array([opt.state_nbytes()], np.int64), held)
    if rank == 0:
        n = sum(p.size for p in params)
        med = np.median(every, axis=0) * 1e3
        sent = 2 * (world - 1) / world * n * dtype.itemsize  # reduce-scatter + allgather
        print(f"{a.layout}: {len(params)} tensors, {n:,} {dtype.name} elements; {a.rule}, W={world}, "
              f"sum_order={a.sum_order}, {a.steps} steps (median ms over steps, then ranks)")
        print(f"  reduce {med[0]:8.1f}  stats {med[1]:6.1f}  update {med[2]:8.1f}  "
              f"allgather {med[3]:8.1f}  whole step {med[4]:8.1f} ms"
              + (f"  | plain one-process step {med[5]:8.1f} ms, ratio {med[4] / med[5]:.2f}"
                 if a.interleave else ""))
        print(f"  state per rank: {', '.join(f'{b / 2**20:.1f} MiB' for b in held)} "
              f"(total {held.sum() / 2**20:.1f} MiB); sent per rank per step "
              f"{sent / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
