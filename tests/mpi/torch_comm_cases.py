"""ShardedOptimizer over torch.distributed (gloo) instead of MPI: run as W processes,
``torch_comm_cases.py RANK WORLD PORT`` (tests/test_distributed.py starts them)."""

from __future__ import annotations

import functools
import os
import sys

import numpy as np
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fastopt._optim import OPTIMIZERS  # noqa: E402
from fastopt.distributed import ShardedOptimizer, TorchComm  # noqa: E402
from _cases import CASES  # noqa: E402

SHAPES = [((1,), np.float32), ((7,), np.float64), ((30, 11), np.float32), ((1000,), np.float64),
          ((517,), np.float32)]


def main():
    rank, world, port = map(int, sys.argv[1:4])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    comm = TorchComm()
    wanted = {"adam", "sgd-momentum-wd", "nadam", "adahessian", "adam-globalnorm-maxnorm"}
    for rule, options, cid in CASES:
        if cid not in wanted:
            continue
        rng = np.random.default_rng(0)
        params = [rng.standard_normal(s).astype(dt) for s, dt in SHAPES]
        ref_params = [p.copy() for p in params]
        opt = ShardedOptimizer(rule, params, comm, backend="numpy", **options)
        ref = OPTIMIZERS[rule](ref_params, backend="numpy", **options)
        for t in range(3):
            per_rank = []
            for r in range(world):
                g = np.random.default_rng(100 * t + r)
                gr = [g.standard_normal(p.shape).astype(p.dtype) for p in params]
                ex = [g.standard_normal(p.shape).astype(p.dtype) for p in params]
                per_rank.append((gr, ex))
            avg = lambda xs: [functools.reduce(np.add, a) / world for a in zip(*xs)]  # noqa: E731
            extra = OPTIMIZERS[rule].rule.extra is not None
            args = (per_rank[rank][1],) if extra else ()
            opt.step(per_rank[rank][0], *args)
            ref.step(avg([g for g, _ in per_rank]), *((avg([e for _, e in per_rank]),) if extra else ()))
        exact = "norm" not in cid
        for i, (p, q) in enumerate(zip(params, ref_params)):
            ok = np.array_equal(p, q) if exact else np.allclose(p, q, rtol=1e-5, atol=1e-6)
            assert ok, f"rank {rank}: {cid}: params[{i}]"
        full = opt.gather_state_dict()
        back = ShardedOptimizer(rule, [p.copy() for p in params], comm, backend="numpy", **options)
        back.load_full_state_dict(full)
        mine, theirs = opt.state_dict(), back.state_dict()
        assert all(np.array_equal(mine["state"][k][n], theirs["state"][k][n])
                   for k in range(len(mine["state"])) for n in mine["state"][k]), cid
    # bfloat16 params (uint16 views on the wire), q8 state and stochastic rounding
    import ml_dtypes

    bf16 = np.dtype(ml_dtypes.bfloat16)
    options = dict(lr=1e-2, state_dtype="q8", min_8bit_size=300, stochastic_rounding=True, seed=3)
    rng = np.random.default_rng(1)
    params = [rng.standard_normal(n).astype(np.float32).astype(bf16) for n in (1000, 7, 517, 260)]
    ref_params = [p.copy() for p in params]
    opt = ShardedOptimizer("adamw", params, comm, backend="numpy", **options)
    ref = OPTIMIZERS["adamw"](ref_params, backend="numpy", **options)
    for t in range(3):
        per_rank = [[np.random.default_rng(100 * t + r).standard_normal(p.shape).astype(np.float32)
                     for p in params] for r in range(world)]
        opt.step(per_rank[rank])
        ref.step([functools.reduce(np.add, a) / world for a in zip(*per_rank)])
    for i, (p, q) in enumerate(zip(params, ref_params)):
        assert np.array_equal(p.view(np.uint16), q.view(np.uint16)), f"rank {rank}: bf16-q8 {i}"
    full = opt.gather_state_dict()
    back = ShardedOptimizer("adamw", [p.copy() for p in params], comm, backend="numpy", **options)
    back.load_full_state_dict(full)
    mine, theirs = opt.state_dict(), back.state_dict()
    bad = [(k, n) for k in range(len(mine["state"])) for n in mine["state"][k]
           if not np.array_equal(mine["state"][k][n], theirs["state"][k][n])]
    assert not bad, f"rank {rank}: bf16-q8 state after gather/scatter: {bad}"
    print(f"rank {rank} ok torch", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
