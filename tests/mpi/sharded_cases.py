"""Checks of fastopt.distributed run inside ``mpiexec -n W python -m mpi4py`` (see
tests/test_distributed.py).  A failed check raises, and ``python -m mpi4py`` turns an
uncaught exception on any rank into an abort of the whole job: a non-zero exit.

usage: sharded_cases.py MODE [options]; each rank prints ``rank R ok MODE ...`` at the end.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile

import numpy as np
from mpi4py import MPI

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import fastopt as fo  # noqa: E402
from fastopt._optim import OPTIMIZERS  # noqa: E402
from fastopt.distributed import ShardedOptimizer  # noqa: E402
from _cases import CASES, TOL  # noqa: E402

COMM = MPI.COMM_WORLD
RANK, W = COMM.Get_rank(), COMM.Get_size()
NORM_OPTIONS = ("clip_norm", "clip_global_norm", "max_norm")
# uneven sizes, mixed dtypes, 2-D shapes: with W ranks and 256-element blocks most
# tensors are cut by a shard boundary somewhere
SHAPES = [((1,), np.float32), ((7,), np.float64), ((30, 11), np.float32), ((1000,), np.float64),
          ((3,), np.float32), ((517,), np.float32)]
# fewer elements than ranks x blocks: some ranks hold an empty shard of a dtype
TINY = [((3,), np.float32), ((1,), np.float64), ((2, 2), np.float32)]


def make_params(seed=0, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dt) for s, dt in shapes]


def local_inputs(rule, params, step, rank, scale=1.0):
    """The grads (and AdaHessian's diagonals) of ``rank`` at ``step``: any rank can make any rank's."""
    rng = np.random.default_rng(1000 * step + rank + 17)
    grads = [(rng.standard_normal(p.shape) * scale).astype(p.dtype) for p in params]
    extras = ([rng.standard_normal(p.shape).astype(p.dtype) for p in params]
              if OPTIMIZERS[rule].rule.extra else None)
    return grads, extras


def average(lists):
    """(x_0 + x_1 + ... + x_{W-1}) / W per array, left to right in rank order."""
    return [functools.reduce(np.add, xs) / len(xs) for xs in zip(*lists)]


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=True)


def check(cond, what):
    if not cond:
        raise AssertionError(f"rank {RANK}/{W}: {what}")


def agree(value, what):
    """Every rank holds the same float (bit for bit)."""
    vals = COMM.allgather(value)
    check(all(v == vals[0] or (v != v and vals[0] != vals[0]) for v in vals),
          f"{what} differs across ranks: {vals}")


def step(opt, rule, grads, extras, **kw):
    return opt.step(grads, extras, **kw) if extras is not None else opt.step(grads, **kw)


def run_parity(backend, sum_order, steps, only=None, shapes=SHAPES):
    checked = 0
    for rule, options, cid in CASES:
        if OPTIMIZERS[rule].rule.kind != "elementwise" or (only and cid not in only):
            continue
        params = make_params(shapes=shapes)
        ref_params = [p.copy() for p in params]
        opt = ShardedOptimizer(rule, params, backend=backend, sum_order=sum_order, **options)
        ref = OPTIMIZERS[rule](ref_params, backend=backend, **options)
        for t in range(steps):
            inputs = [local_inputs(rule, params, t, r) for r in range(W)]
            grads, extras = inputs[RANK]
            info = step(opt, rule, grads, extras)
            want = step(ref, rule, average([g for g, _ in inputs]),
                        average([e for _, e in inputs]) if extras is not None else None)
            agree(info.grad_norm, f"{cid}: grad_norm")
            check(info.skipped == want.skipped, f"{cid}: skipped")
        exact = not any(options.get(k) is not None for k in NORM_OPTIONS) and (
            sum_order == "rank" or W <= 2)
        for i, (p, q) in enumerate(zip(params, ref_params)):
            if exact:
                check(same_bits(p, q), f"{cid}: params[{i}] not bit-exact "
                                       f"(max diff {np.max(np.abs(p - q))})")
            else:
                check(np.allclose(p, q, **TOL[p.dtype]), f"{cid}: params[{i}] beyond tolerance")
        agree(float(np.sum([np.sum(p, dtype=np.float64) for p in params])), f"{cid}: params")
        if exact and want.grad_norm is not None:
            check(abs(info.grad_norm - want.grad_norm) <= 1e-12 * want.grad_norm, f"{cid}: grad_norm")
        # the gathered state is the single-process state
        full = opt.gather_state_dict(root=0)
        if RANK == 0:
            sd = ref.state_dict()
            check(full["step_count"] == sd["step_count"], f"{cid}: step_count")
            check(full["group_state"] == sd["group_state"], f"{cid}: group_state")
            for i in sd["state"]:
                for n, a in sd["state"][i].items():
                    b = full["state"][i][n]
                    ok = same_bits(a, b) if exact else np.allclose(a, b, **TOL[a.dtype])
                    check(ok, f"{cid}: state[{i}][{n}]")
        checked += 1
    return f"{checked} cases"


def run_checkpoint(backend):
    rule, options = "adam", {"lr": 1e-2, "amsgrad": True}
    params = make_params()
    opt = ShardedOptimizer(rule, params, backend=backend, **options)
    for t in range(3):
        opt.step(local_inputs(rule, params, t, RANK)[0])
    path = COMM.bcast(tempfile.mkdtemp() if RANK == 0 else None) + "/ckpt.npz"
    opt.save(path)
    # a single-process optimizer loads it, and goes on exactly as the sharded one
    single_params = [p.copy() for p in params]
    single = OPTIMIZERS[rule](single_params, backend=backend, **options)
    fo.load(single, path)
    check(single.step_count == 3, "loaded step_count")
    check(all(same_bits(a, b) for a, b in zip(single_params, params)), "loaded params")
    # per-rank shard round trip
    mine = opt.state_dict()
    opt2 = ShardedOptimizer(rule, [p.copy() for p in params], backend=backend, **options)
    opt2.load_state_dict(mine)
    check(opt2.step_count == 3, "shard round trip step_count")
    # the reverse: a single-process checkpoint scattered over the ranks
    inputs = [local_inputs(rule, params, 3, r)[0] for r in range(W)]
    single.step(average(inputs))
    fresh = [np.zeros_like(p) for p in params]
    back = ShardedOptimizer(rule, fresh, backend=backend, **options)
    back.load(path)  # params and state from the file, loaded on rank 0 and scattered
    check(all(same_bits(a, b) for a, b in zip(fresh, params)), "scattered params")
    back.step(inputs[RANK])
    check(all(same_bits(a, b) for a, b in zip(fresh, single_params)), "step after load(path)")
    # load_full_state_dict from an in-memory single-process state_dict
    fresh2 = [p.copy() for p in single_params]
    back2 = ShardedOptimizer(rule, fresh2, backend=backend, **options)
    back2.load_full_state_dict(single.state_dict() if RANK == 0 else None)
    full = back2.gather_state_dict()
    if RANK == 0:
        sd = single.state_dict()
        check(all(same_bits(sd["state"][i][n], full["state"][i][n])
                  for i in sd["state"] for n in sd["state"][i]), "scatter/gather round trip")
    # a checkpoint that does not fit: every rank raises, nothing changes
    before = back2.state_dict()
    bad = single.state_dict() if RANK == 0 else None
    if RANK == 0:
        bad["state"][0]["exp_avg"] = np.zeros(5, np.float32)
    try:
        back2.load_full_state_dict(bad)
    except ValueError as e:
        msg = str(e)
    else:
        raise AssertionError("a bad checkpoint loaded")
    check(("exp_avg" in msg) if RANK == 0 else ("rank(s) [0]" in msg), f"bad-checkpoint message: {msg}")
    after = back2.state_dict()
    check(all(same_bits(before["state"][k][n], after["state"][k][n])
              for k in range(len(before["state"])) for n in before["state"][k]), "state changed")
    if RANK == 0:
        os.remove(path)
        os.rmdir(os.path.dirname(path))
    total = sum(a.nbytes for st in single.state_dict()["state"].values() for a in st.values())
    return f"state bytes on this rank {opt.state_nbytes()} of {total}"


def run_nonfinite(backend):
    params = make_params()
    opt = ShardedOptimizer("adam", params, backend=backend, nonfinite="skip",
                           clip_global_norm=1.0, lr=1e-2)
    grads = local_inputs("adam", params, 0, RANK)[0]
    before = [p.copy() for p in params]
    if RANK == W - 1:
        grads[-1][-1] = np.inf  # the last element: in the last rank's shard only
    info = opt.step(grads)
    check(info.skipped and opt.step_count == 0, "the step was not skipped on every rank")
    check(all(same_bits(a, b) for a, b in zip(before, params)), "params written by a skipped step")
    strict = ShardedOptimizer("adam", params, backend=backend, lr=1e-2)
    try:
        strict.step(grads)
    except FloatingPointError:
        pass
    else:
        raise AssertionError("nonfinite='raise' did not raise")
    info = opt.step(local_inputs("adam", params, 1, RANK)[0])
    check(not info.skipped and opt.step_count == 1, "the next step")
    agree(info.grad_norm, "grad_norm")
    return "skip and raise agree"


def run_bad_grads(backend):
    params = make_params()
    opt = ShardedOptimizer("sgd", params, backend=backend, lr=0.1, momentum=0.9)
    grads = local_inputs("sgd", params, 0, RANK)[0]
    if RANK == 0:
        grads[2] = grads[2].T.copy()  # wrong shape on one rank
    before = [p.copy() for p in params]
    try:
        opt.step(grads)
    except ValueError as e:
        msg = str(e)
    else:
        raise AssertionError("bad grads were accepted")
    check(("grads[2]" in msg) if RANK == 0 else ("rank(s) [0]" in msg), f"message: {msg}")
    check(all(same_bits(a, b) for a, b in zip(before, params)) and opt.step_count == 0,
          "something was written")
    return "agreed"


def run_bad_params(backend):
    shapes = list(SHAPES)
    if RANK == W - 1:
        shapes[3] = ((999,), np.float64)
    try:
        ShardedOptimizer("adam", make_params(shapes=shapes), backend=backend)
    except ValueError as e:
        msg = str(e)
    else:
        raise AssertionError("different params were accepted")
    check("params[3]" in msg and "every rank" in msg, f"message: {msg}")
    for rule in ("lamb", "newton"):
        try:
            ShardedOptimizer(rule, make_params(), backend=backend)
        except ValueError as e:
            check("cannot be sharded" in str(e), str(e))
        else:
            raise AssertionError(f"{rule} was accepted")
    return "refused"


# 16-bit params and the precision options: (id, rule, options, param dtype, grad dtype).  The
# sizes below put shard boundaries inside tensors at W = 2 and 3, so pieces start mid-param
# (stochastic rounding's shifted seed, q8's block alignment) and min_8bit_size=300 leaves
# the small tensors with float32 state in a layout of their own.
PRECISION_SHAPES = [(1000,), (7,), (30, 11), (517,), (3,), (260,)]
PRECISION_CASES = [
    ("adamw-bf16-sr", "adamw", dict(lr=1e-2, stochastic_rounding=True, seed=9), "bfloat16",
     np.float32),
    ("adam-bf16-master-bf16state", "adam", dict(lr=1e-2, master_weights=True,
                                                state_dtype="bfloat16"), "bfloat16", "bfloat16"),
    ("sgd-f16-param-state", "sgd", dict(lr=0.05, momentum=0.9, state_dtype="param"), "float16",
     "float16"),
    ("adam-q8", "adam", dict(lr=1e-2, weight_decay=1e-2, state_dtype="q8", min_8bit_size=300),
     "float32", np.float32),
    ("adagrad-q8", "adagrad", dict(lr=1e-2, initial_accumulator_value=0.1, state_dtype="q8",
                                   min_8bit_size=300), "float32", np.float32),
    ("adamw-bf16-q8-sr", "adamw", dict(lr=1e-2, state_dtype="q8", min_8bit_size=300,
                                       stochastic_rounding=True, seed=4), "bfloat16", np.float32),
]


def _dtype(name):
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _bits(a):
    return a.view(np.uint8) if a.dtype.itemsize else a


def run_precision(backend, steps, only=None):
    """16-bit params, state dtypes, master weights, stochastic rounding and q8 state: the
    sharded step is the one-process step on the averaged grads bit for bit (params, every
    state array); a gathered state scattered onto fresh ranks continues bit for bit, and so
    does a per-rank shard state_dict."""
    checked = 0
    for cid, rule, options, pdt, gdt in PRECISION_CASES:
        if only and cid not in only:
            continue
        pdt, gdt = _dtype(pdt), _dtype(gdt)
        rng = np.random.default_rng(5)
        params = [rng.standard_normal(s).astype(np.float32).astype(pdt) for s in PRECISION_SHAPES]
        ref_params = [p.copy() for p in params]
        opt = ShardedOptimizer(rule, params, backend=backend, **options)
        ref = OPTIMIZERS[rule](ref_params, backend=backend, **options)

        def grads_of(t, r):
            g = np.random.default_rng(1000 * t + r + 17)
            return [g.standard_normal(p.shape).astype(np.float32).astype(gdt) for p in params]

        def step_both(t, opts):
            inputs = [grads_of(t, r) for r in range(W)]
            # what the sharded step sums: the grads widened to float32 for 16-bit params
            wide = [[a.astype(np.float32) if a.dtype.itemsize == 2 else a for a in g]
                    for g in inputs]
            for o in opts:
                o.step(inputs[RANK])
            ref.step(average(wide))

        for t in range(steps):
            step_both(t, [opt])
        for i, (p, q) in enumerate(zip(params, ref_params)):
            check(np.array_equal(_bits(p), _bits(q)), f"{cid}: params[{i}] not bit-exact")
        full = opt.gather_state_dict(root=0)
        if RANK == 0:
            sd = ref.state_dict()
            check(full.get("q8") == sd.get("q8"), f"{cid}: q8 record {full.get('q8')}")
            for i in sd["state"]:
                check(set(sd["state"][i]) == set(full["state"][i]), f"{cid}: state[{i}] names")
                for n, a in sd["state"][i].items():
                    b = full["state"][i][n]
                    check(a.dtype == b.dtype and a.shape == b.shape
                          and np.array_equal(_bits(a), _bits(b)), f"{cid}: state[{i}][{n}]")
        # the gathered state onto fresh ranks, and a shard round trip: both go on exactly
        back_params = [p.copy() for p in params]
        back = ShardedOptimizer(rule, back_params, backend=backend, **options)
        back.load_full_state_dict(full)
        shard_params = [p.copy() for p in params]
        shard = ShardedOptimizer(rule, shard_params, backend=backend, **options)
        shard.load_state_dict(opt.state_dict())
        step_both(steps, [opt, back, shard])
        for i, (p, q, r, s) in enumerate(zip(params, ref_params, back_params, shard_params)):
            check(np.array_equal(_bits(p), _bits(q)) and np.array_equal(_bits(r), _bits(q))
                  and np.array_equal(_bits(s), _bits(q)), f"{cid}: params[{i}] after reload")
        checked += 1
    return f"{checked} precision cases"


def run_raise():
    """One rank raises outside any collective: the job must abort, not hang."""
    if RANK == W - 1:
        raise RuntimeError("deliberate failure on the last rank")
    COMM.Barrier()  # the other ranks wait here until the abort kills them


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode")
    ap.add_argument("--backend", default="numpy")
    ap.add_argument("--sum-order", default="rank")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--tiny", action="store_true", help="params smaller than one block per rank")
    a = ap.parse_args()
    if a.mode == "parity":
        out = run_parity(a.backend, a.sum_order, a.steps, a.only, TINY if a.tiny else SHAPES)
    elif a.mode == "checkpoint":
        out = run_checkpoint(a.backend)
    elif a.mode == "nonfinite":
        out = run_nonfinite(a.backend)
    elif a.mode == "bad":
        out = run_bad_grads(a.backend) + ", " + run_bad_params(a.backend)
    elif a.mode == "raise":
        out = run_raise()
    elif a.mode == "precision":
        out = run_precision(a.backend, a.steps, a.only)
    else:
        raise SystemExit(f"unknown mode {a.mode!r}")
    print(f"rank {RANK} ok {a.mode} {out}", flush=True)


if __name__ == "__main__":
    main()
