"""``python -m fastopt demo --distributed`` and ``--hogwild N``: the digits MLP trained in parallel.

``--distributed`` (under ``mpiexec -n W python -m mpi4py -m fastopt demo --distributed``):
data parallelism with :class:`fastopt.distributed.ShardedOptimizer`.  Every rank
builds the same network and the same minibatch order (both from ``--seed``);
rank ``r`` takes rows ``r, r + W, r + 2W, ...`` of every minibatch, computes its
grads (the mean over its rows) and steps; the optimizer averages the grads and
each rank keeps 1/W of the optimizer state.  Rank 0 then replays the run in one
process (the same per-rank grads, averaged in rank order, stepped by the plain
optimizer) and prints the largest difference between the two final networks:
0.0 means the sharded run is bit-for-bit the single-process one.

``--hogwild N``: N threads share one network and one
:class:`fastopt.hogwild.Hogwild` optimizer; thread ``i`` takes minibatches
``i, i + N, ...`` of each epoch, reads the live params, computes grads and steps
without locks.  The table compares it with the ordinary one-thread run.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import sys
import time

import numpy as np

from .demo import MLP, OPTIMIZER_SPECS, _lr_for, _parse_optimizers, _training, load_digits_split, \
    make_schedule, default_lr, train
from .._optim import OPTIMIZERS

#: What --distributed / --hogwild train when --optimizer is not given.
DEFAULT = ("adam",)


def _options(name, args, total_steps):
    rule, opts, _, _ = OPTIMIZER_SPECS[name]
    lr = _lr_for(args.lr, name)
    lr = default_lr(name) if lr is None else lr
    opts = dict(opts, lr=make_schedule(args.schedule, lr, total_steps))
    if args.clip_global_norm is not None:
        opts["clip_global_norm"] = args.clip_global_norm
    return rule, opts, lr


def _batches(rng, n, batch_size):
    order = rng.permutation(n)
    return [order[s:s + batch_size] for s in range(0, n, batch_size)]


def _setup(name, data, args, epochs=None):
    """What every run of this module shares: the same options, batch order and initial
    weights.  Returns ``(epochs, n, rule, options, lr, rng, net)``."""
    epochs = epochs or args.epochs or 20
    n = len(data.y_train)
    rule, opts, lr = _options(name, args, epochs * math.ceil(n / args.batch_size))
    rng = np.random.default_rng(args.seed)
    n_classes = int(max(data.y_train.max(), data.y_test.max())) + 1
    net = MLP((data.x_train.shape[1], *args.hidden, n_classes), rng, data.x_train.dtype)
    return epochs, n, rule, opts, lr, rng, net


@_training
def train_distributed(name, data, args, comm, backend):
    """One data-parallel run; returns (net, optimizer, per-step local grads of every rank or None)."""
    from ..distributed import ShardedOptimizer

    W, r = comm.Get_size(), comm.Get_rank()
    epochs, n, rule, opts, lr, rng, net = _setup(name, data, args)
    opt = ShardedOptimizer(rule, net.params, comm, backend=backend, **opts)
    opt_s, steps = 0.0, 0
    t0 = time.perf_counter()
    for _ in range(epochs):
        for idx in _batches(rng, n, args.batch_size):
            mine = idx[r::W]
            _, grads = net.loss_and_grads(data.x_train[mine], data.y_train[mine])
            t1 = time.perf_counter()
            opt.step(grads)
            opt_s += time.perf_counter() - t1
            steps += 1
    return net, opt, steps, time.perf_counter() - t0, opt_s, lr


@_training
def replay_single(name, data, args, W, backend):
    """The same run in one process: the W per-rank grads of each step averaged in rank order."""
    epochs, n, rule, opts, _, rng, net = _setup(name, data, args)
    opt = OPTIMIZERS[rule](net.params, backend=backend, **opts)
    for _ in range(epochs):
        for idx in _batches(rng, n, args.batch_size):
            per_rank = [net.loss_and_grads(data.x_train[idx[k::W]], data.y_train[idx[k::W]])[1]
                        for k in range(W)]
            opt.step([functools.reduce(np.add, gs) / W for gs in zip(*per_rank)])
    return net, opt


def run_distributed(args, backend) -> int:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    W, r = comm.Get_size(), comm.Get_rank()
    names = _parse_optimizers(args.optimizer) if args.optimizer else list(DEFAULT)
    data = load_digits_split(args.seed, dtype=np.dtype(args.dtype))
    if r == 0:
        print(f"fastopt demo --distributed: {W} rank(s), each takes 1/{W} of every batch of "
              f"{args.batch_size}; ZeRO-1 (each rank holds 1/{W} of the optimizer state)")
    rows = []
    for name in names:
        net, opt, steps, wall, opt_s, lr = train_distributed(name, data, args, comm, backend)
        held = comm.gather(opt.state_nbytes(), root=0)
        if r != 0:
            continue
        ref_net, ref_opt = replay_single(name, data, args, W, backend)
        diff = max(float(np.max(np.abs(a - b))) for a, b in zip(net.params, ref_net.params))
        full = sum(a.nbytes for st in ref_opt.state_dict()["state"].values() for a in st.values())
        rows.append((name, lr, net.loss(data.x_train, data.y_train), net.accuracy(data.x_test, data.y_test),
                     ref_net.accuracy(data.x_test, data.y_test), diff, 1e3 * wall / steps,
                     1e3 * opt_s / steps, held, full))
    if r == 0:
        head = (f"{'optimizer':10} {'lr':>8} {'train loss':>10} {'test acc':>8} {'1-proc acc':>10} "
                f"{'max |diff|':>10} {'ms/step':>8} {'opt ms':>7}  state bytes per rank")
        print(head)
        print("-" * len(head))
        for name, lr, loss, acc, ref_acc, diff, ms, oms, held, full in rows:
            print(f"{name:10} {lr:8.2g} {loss:10.4f} {100 * acc:7.1f}% {100 * ref_acc:9.1f}% "
                  f"{diff:10.3g} {ms:8.3f} {oms:7.3f}  {' + '.join(map(str, held))} = {sum(held)} "
                  f"(one process: {full})")
        print("\n1-proc acc: the same run replayed in one process (each step's per-rank grads "
              "averaged in rank order); max |diff|: the largest difference between the two final "
              "networks' weights (0 = bit-for-bit).")
    return 0


def run_hogwild(args, backend) -> int:
    n_threads = args.hogwild
    names = _parse_optimizers(args.optimizer) if args.optimizer else list(DEFAULT)
    data = load_digits_split(args.seed, dtype=np.dtype(args.dtype))
    epochs = args.epochs or 20
    print(f"fastopt demo --hogwild {n_threads}: {n_threads} threads share one MLP and one "
          f"optimizer, lock-free; {epochs} epochs of batch {args.batch_size}, thread i takes "
          f"batches i, i+{n_threads}, ...")
    head = (f"{'optimizer':10} {'lr':>8} {'threads':>7} {'train loss':>10} {'test acc':>8} "
            f"{'steps':>6} {'wall s':>7}")
    lines = [head, "-" * len(head)]
    for name in names:
        t0 = time.perf_counter()
        one = train(name, data, epochs=epochs, batch_size=args.batch_size, hidden=tuple(args.hidden),
                    lr=_lr_for(args.lr, name), schedule=args.schedule,
                    clip_global_norm=args.clip_global_norm, backend=backend, seed=args.seed)
        lines.append(f"{name:10} {one.lr:8.2g} {1:7d} {one.train_loss:10.4f} {100 * one.test_acc:7.1f}% "
                     f"{one.steps:6d} {time.perf_counter() - t0:7.2f}")
        t0 = time.perf_counter()
        net, hw, lr = train_hogwild(name, data, args, n_threads, epochs, backend)
        lines.append(f"{name:10} {lr:8.2g} {n_threads:7d} {net.loss(data.x_train, data.y_train):10.4f} "
                     f"{100 * net.accuracy(data.x_test, data.y_test):7.1f}% {hw.step_count:6d} "
                     f"{time.perf_counter() - t0:7.2f}")
    print("\n".join(lines))
    print("\nHogwild runs are not reproducible: threads race on the params and the optimizer "
          "state (see fastopt/hogwild.py).")
    return 0


@_training
def train_hogwild(name, data, args, n_threads, epochs, backend):
    from ..hogwild import Hogwild

    epochs, n, rule, opts, lr, rng, net = _setup(name, data, args, epochs)
    hw = Hogwild(rule, net.params, backend=backend, **opts)
    plan = [_batches(rng, n, args.batch_size) for _ in range(epochs)]

    def worker(i):
        for batches in plan:
            for idx in batches[i::n_threads]:
                _, grads = net.loss_and_grads(data.x_train[idx], data.y_train[idx])
                hw.step(grads)

    hw.run(worker, n_threads)
    return net, hw, lr


def run(args, backend) -> int:
    """Dispatch of ``demo --distributed`` / ``demo --hogwild N`` (``backend`` resolved by the demo)."""
    if args.xor:
        print("error: --xor trains one process; --distributed and --hogwild train the digits MLP",
              file=sys.stderr)
        return 2
    if args.distributed and args.hogwild:
        print("error: choose one of --distributed and --hogwild", file=sys.stderr)
        return 2
    names = _parse_optimizers(args.optimizer) if args.optimizer else DEFAULT
    if any(OPTIMIZER_SPECS[n][0] == "muon" for n in names):
        print("error: --distributed and --hogwild take element-wise rules (Muon orthogonalizes "
              "whole matrices; a shard is not one)", file=sys.stderr)
        return 2
    whole = [n for n in names if OPTIMIZER_SPECS[n][0] in ("lars", "adafactor", "lbfgs")]
    if whole:
        print(f"error: --distributed and --hogwild take element-wise rules ({', '.join(whole)}: "
              f"per-tensor trust ratios, factored moments or a full-batch closure)",
              file=sys.stderr)
        return 2
    if args.distributed and any(OPTIMIZER_SPECS[n][0] == "lamb" for n in names):
        print("error: --distributed takes element-wise rules (LAMB's trust ratio is not sharded)",
              file=sys.stderr)
        return 2
    if args.distributed:
        if importlib.util.find_spec("mpi4py") is None:
            print("error: --distributed needs mpi4py: pip install 'fastopt[mpi]', then "
                  "mpiexec -n 2 python -m mpi4py -m fastopt demo --distributed", file=sys.stderr)
            return 2
        return run_distributed(args, backend)
    return run_hogwild(args, backend)
