"""``python -m fastopt demo --torch``: one PyTorch loop, with torch.optim and with fastopt.torch.

A PyTorch MLP (``nn.Linear`` + ReLU, cross-entropy) learns scikit-learn's
digits with SGD + momentum and with Adam, once with ``torch.optim`` and once
with ``fastopt.torch`` -- the one changed line of the loop.  Both runs of an
optimizer start from the same weights and see the same minibatches (all from
``--seed``), so their rows differ only by the optimizer's arithmetic: the loss
and accuracy agree within float32 rounding, and the ``opt ms/step`` columns
compare the optimizers' own time per step.

Importable: :func:`train_torch` and :func:`compare` are what ``tests/test_demo.py``
and ``tests/test_torch_adapter.py`` would call; the CLI prints :func:`format_rows`.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

import numpy as np

from .demo import load_digits_split

#: optimizer name -> (torch.optim / fastopt.torch class name, options).  The rates are
#: the NumPy demo's tuned ones for the same network and batch size.
TORCH_OPTIMIZERS = {
    "momentum": ("SGD", dict(lr=0.01, momentum=0.9)),
    "adam": ("Adam", dict(lr=1e-3)),
}

#: |loss(fastopt) - loss(torch)| / loss(torch) above which the table flags a mismatch.
#: The runs differ by float32 rounding only (a few ulps per step); over a few hundred
#: steps of training that stays far below 1e-3.
LOSS_RTOL = 1e-3


@dataclass
class TorchResult:
    name: str            # momentum | adam
    impl: str            # torch.optim | fastopt.torch
    train_loss: float
    test_acc: float
    opt_ms: float        # the optimizer's step alone, mean ms per step
    step_ms: float       # forward + backward + step, mean ms per step


def make_model(sizes, seed, dtype):
    import torch
    from torch import nn

    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).to(dtype)


def train_torch(name, impl, data, *, epochs=20, batch_size=32, hidden=(128, 128), seed=0,
                dtype="float32"):
    """One run: returns a :class:`TorchResult`."""
    import torch
    import torch.nn.functional as F

    import fastopt.torch as ft

    tdtype = getattr(torch, dtype)
    sizes = (data.x_train.shape[1], *hidden, 10)
    model = make_model(sizes, seed, tdtype)
    cls_name, options = TORCH_OPTIMIZERS[name]
    module = torch.optim if impl == "torch.optim" else ft
    opt = getattr(module, cls_name)(model.parameters(), **options)
    x_train = torch.from_numpy(np.ascontiguousarray(data.x_train)).to(tdtype)
    y_train = torch.from_numpy(data.y_train)
    rng = np.random.default_rng(seed + 1)  # the batch order: the same for every run
    opt_s = total_s = 0.0
    steps = 0
    for _ in range(epochs):
        order = torch.from_numpy(rng.permutation(len(y_train)))
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            t0 = time.perf_counter()
            opt.zero_grad()
            F.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
            t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            if steps:  # the first step compiles (Numba) or allocates the state
                opt_s += t2 - t1
                total_s += t2 - t0
            steps += 1
    with torch.no_grad():
        train_loss = F.cross_entropy(model(x_train), y_train).item()
        x_test = torch.from_numpy(np.ascontiguousarray(data.x_test)).to(tdtype)
        acc = (model(x_test).argmax(1).numpy() == data.y_test).mean()
    n = max(steps - 1, 1)
    return TorchResult(name, impl, train_loss, float(acc), 1e3 * opt_s / n, 1e3 * total_s / n)


def compare(names=("momentum", "adam"), data=None, **kw):
    """Both implementations of each optimizer, torch.optim first; a list of result pairs."""
    data = data if data is not None else load_digits_split(kw.get("seed", 0),
                                                           dtype=np.dtype(kw.get("dtype",
                                                                                 "float32")))
    out = []
    for name in names:
        out.append((train_torch(name, "torch.optim", data, **kw),
                    train_torch(name, "fastopt.torch", data, **kw)))
    return out


def format_rows(pairs) -> str:
    head = (f"{'optimizer':10} {'implementation':15} {'train loss':>10} {'test acc':>8} "
            f"{'opt ms/step':>11} {'ms/step':>8}  agreement")
    lines = [head, "-" * len(head)]
    for ref, ours in pairs:
        for r in (ref, ours):
            note = ""
            if r is ours:
                d = abs(ours.train_loss - ref.train_loss) / max(ref.train_loss, 1e-12)
                same = d <= LOSS_RTOL and abs(ours.test_acc - ref.test_acc) <= 1 / 300
                note = (f"loss {d:.1e} rel., acc {100 * (ours.test_acc - ref.test_acc):+.1f} pt: "
                        + ("equal within tolerance" if same else "DIFFERENT"))
            lines.append(f"{r.name:10} {r.impl:15} {r.train_loss:10.4f} {100 * r.test_acc:7.1f}% "
                         f"{r.opt_ms:11.3f} {r.step_ms:8.3f}  {note}".rstrip())
    return "\n".join(lines)


def run_torch(args) -> int:
    """``python -m fastopt demo --torch`` (options shared with the NumPy demo)."""
    try:
        import torch
    except ImportError:
        print("error: --torch needs PyTorch: pip install 'fastopt[torch]'", file=sys.stderr)
        return 2
    names = args.optimizer or list(TORCH_OPTIMIZERS)
    names = [n for part in names for n in part.split(",") if n]
    bad = [n for n in names if n not in TORCH_OPTIMIZERS]
    if bad:
        print(f"error: --torch trains {', '.join(TORCH_OPTIMIZERS)}; got {', '.join(bad)}",
              file=sys.stderr)
        return 2
    threads = args.threads or 1
    torch.set_num_threads(threads)
    try:
        import numba

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    except ImportError:
        pass
    epochs = args.epochs or 20
    data = load_digits_split(args.seed, dtype=np.dtype(args.dtype))
    sizes = (64, *args.hidden, 10)
    print(f"fastopt demo --torch: torch MLP {'-'.join(map(str, sizes))} on scikit-learn digits "
          f"({len(data.y_train)} train / {len(data.y_test)} test), {args.dtype}, {epochs} epochs "
          f"of batch {args.batch_size}, {threads} thread(s), seed {args.seed}")
    pairs = compare(names, data, epochs=epochs, batch_size=args.batch_size,
                    hidden=tuple(args.hidden), seed=args.seed, dtype=args.dtype)
    print()
    print(format_rows(pairs))
    print()
    print("Each pair: same initial weights, same batches; only the optimizer line differs "
          "(torch.optim.X -> fastopt.torch.X).\nopt ms/step: optimizer.step() alone; ms/step: "
          "zero_grad + forward + backward + step (means, first step excluded).")
    bad = [ours for ref, ours in pairs
           if not math.isclose(ours.train_loss, ref.train_loss, rel_tol=LOSS_RTOL)]
    return 1 if bad else 0
