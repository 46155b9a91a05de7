"""Hogwild: several threads step one optimizer on shared params, without locks on the arrays.

Niu, Recht, Ré and Wright (2011) showed that SGD run by several processors on
shared memory, each reading the params, computing a grad and writing its update
with no lock at all, converges nearly as well as the serial run when updates
are sparse, and scales because nobody waits.  fastopt's compiled kernels
release the GIL (the Numba backend is ``nogil=True``), so Python threads can
do the same::

    hw = fastopt.hogwild.Hogwild("adam", params, lr=1e-3)
    def worker(i):
        for batch in my_batches(i):
            hw.step(grads_of(params, batch))      # params are read and written live
    hw.run(worker, n_threads=4)

What is and is not shared
-------------------------
* The arrays (params and the rule's state: ``exp_avg``, ...) are shared and
  updated by the kernels of several threads at the same time, with no lock.
* The host bookkeeping of a step is taken under a short lock: its step number
  ``t`` (each accepted step gets its own, 1, 2, 3, ...), the learning rate of
  the schedule at ``t - 1``, the host scalars (``1 - beta1**t``) and NAdam's
  running ``mu_product``.  So ``step_count`` counts accepted steps exactly and
  the bias corrections are those of a serial run of as many steps.
* Input checks, the non-finite check and the grad-norm clips are per call, on
  that call's grads, before anything is written (a bad call raises in its own
  thread and writes nothing).

The state race (read this before using a stateful rule)
-------------------------------------------------------
Two kernels that update the same element at the same time race on it.  Each
element's update is a read-modify-write of the param and of every state array
of the rule; if thread B writes element ``i`` between thread A's read and write
of it, B's update to that element is lost (A writes a value computed from the
old one).  For a stateful rule the race is also *between* arrays: A may read
``exp_avg[i]`` after B updated it and ``exp_avg_sq[i]`` before, and take a step
from a pair of moments that no serial run ever holds.  Nothing becomes
non-finite from this (every value written is one some thread computed), but:

* runs are not reproducible: the result depends on thread timing;
* with dense grads (every step touches every element, as in an MLP) the
  collisions are not rare: the paper's sparsity assumption does not hold, and
  the guarantee is empirical only (``python -m fastopt demo --hogwild 2``
  reaches the single-thread accuracy on digits);
* Adam-family moments become averages over the steps that happened to win;
  plain SGD (no state) is the case the paper analyses.

For exact, reproducible data parallelism use :mod:`fastopt.distributed`.

Numba's ``workqueue`` threading layer cannot launch parallel kernels from two
threads at once: when Numba settles on it, the backend serializes the kernel
launches (see ``fastopt/kernels/numba_cpu.py``) and the threads then overlap
only outside the optimizer.  With ``omp`` or ``tbb`` the kernels overlap too.
"""

from __future__ import annotations

import threading

import numpy as np

from . import _backend
from ._pipeline import StepInfo, clip_scales
from ._rules import COPY_OF_PARAM, DENSE_SOLVE, FACTORED, ORTHOGONALIZE, as_host_scalars, check_lr_value
from ._validate import check_companions, check_disjoint, check_grad_scale, expected_layout
from .distributed import Part, check_param_list, read_stats, resolve_rule, split_options, write_step


class Hogwild:
    """One optimizer of ``rule`` (a fastopt class or its name) over ``params``, steppable from many threads.

    ``options`` are the rule's constructor options.  ``step`` has the wrapped
    class's signature and returns a ``StepInfo``; ``run(worker, n_threads)``
    starts the threads.  See the module docstring for the state race.
    Element-wise rules and LAMB; Newton (a dense solve per tensor), Muon (matrix
    products per tensor) and Adafactor (row and column sums per tensor) are refused.
    """

    def __init__(self, rule, params, **options):
        self._cls = resolve_rule(rule)
        self.rule = self._cls.rule
        if self.rule.kind == DENSE_SOLVE:
            raise ValueError(f"rule: {self._cls.__name__} solves a dense system per tensor; "
                             f"Hogwild takes the fused (element-wise and LAMB) rules")
        if self.rule.kind == FACTORED:
            raise ValueError(f"rule: {self._cls.__name__} needs whole-tensor row and column sums "
                             f"of the grads; Hogwild takes the fused (element-wise and LAMB) rules")
        if self.rule.kind == ORTHOGONALIZE:
            raise ValueError(f"rule: {self._cls.__name__} orthogonalizes each matrix with matrix "
                             f"products; Hogwild takes the fused (element-wise and LAMB) rules")
        self.hp, self.nonfinite, backend = split_options(self._cls, options)
        self.params = check_param_list(params)
        self.backend = _backend.resolve(backend, "numpy")
        self._options = dict(options)
        self._want = expected_layout(self.params)
        self._lock = threading.Lock()
        self.step_count = 0
        self._gstate = dict(self.rule.group_state)
        names = self.rule.state(self.hp)
        # Schedule-Free's z starts as a copy of its param (COPY_OF_PARAM), every other state as
        # the rule's start value
        self._state = [{n: p.copy() if isinstance(init, str) and init == COPY_OF_PARAM
                        else np.full_like(p, init) for n, init in names} for p in self.params]
        dtypes = sorted({p.dtype for p in self.params}, key=str)
        self._groups = [[i for i, p in enumerate(self.params) if p.dtype == dt] for dt in dtypes]

    @property
    def group_state(self) -> list:
        """The per-group scalar state (NAdam's ``mu_product``), one dict per group, as the
        optimizer classes hold it."""
        return [dict(self._gstate)]

    def state_nbytes(self) -> int:
        return sum(a.nbytes for st in self._state for a in st.values())

    def state_dict(self) -> dict:
        """The single-process ``state_dict`` (loads into ``rule(params, ...)``); a snapshot
        taken while other threads step may mix steps (see the module docstring)."""
        group = {k: v for k, v in self.hp.items()}
        group["params"] = list(range(len(self.params)))
        with self._lock:
            return {"rule": self.rule.name, "step_count": self.step_count, "param_groups": [group],
                    "state": {i: {n: a.copy() for n, a in st.items()} for i, st in enumerate(self._state)},
                    "group_state": [dict(self._gstate)]}

    def step(self, grads, *args, grad_scale=None):
        """One lock-free step from the calling thread; the wrapped class's signature."""
        n_extra = 1 if self.rule.extra is not None else 0
        if len(args) > n_extra + 1 or (len(args) == n_extra + 1 and grad_scale is not None):
            raise TypeError(f"step() takes grads{', ' + self.rule.extra if n_extra else ''} and "
                            f"grad_scale, got {1 + len(args)} positional arguments")
        if len(args) < n_extra:
            raise TypeError(f"{self._cls.__name__}.step() needs {self.rule.extra}")
        if len(args) == n_extra + 1:
            grad_scale = args[-1]
        extras = args[0] if n_extra else None

        inv_scale = check_grad_scale(grad_scale)
        label = lambda name, i: f"{name}[{i}]"  # noqa: E731
        grads = check_companions(self.params, grads, "grads", label, "numpy", allow_copy=True,
                                 want=self._want)
        if extras is not None:
            extras = check_companions(self.params, extras, self.rule.extra, label, "numpy",
                                      allow_copy=True, want=self._want)
        check_disjoint([("params", self.params)],
                       [("grads", grads)] + ([(self.rule.extra, extras)] if extras is not None else []))
        hp = as_host_scalars(self.hp)
        parts = [Part(params=[self.params[i].reshape(-1) for i in idx],
                      grads=[grads[i].reshape(-1) for i in idx],
                      extras=None if extras is None else [extras[i].reshape(-1) for i in idx],
                      states={n: [self._state[i][n].reshape(-1) for i in idx]
                              for n in self._state[idx[0]]},
                      tensor=np.array(idx, np.intp)) for idx in self._groups]
        ops = _backend.get_ops(self.backend)
        kernel = _backend.get_kernel(self.rule.name, self.backend)

        sumsq, finite = read_stats(ops, parts, len(self.params), hp, inv_scale, self.nonfinite)
        if not finite:
            if self.nonfinite == "raise":
                raise FloatingPointError("non-finite gradient (inf or nan) after unscaling; nothing "
                                         "was written (pass nonfinite='skip' to skip such steps)")
            return StepInfo(skipped=True, group_state=(dict(self._gstate),))
        scales = gnorm = None
        if sumsq is not None:
            scales, gnorm = clip_scales(np, sumsq, hp)

        with self._lock:  # this step's number and host scalars; the arrays take no lock
            t = self.step_count + 1
            if callable(hp["lr"]):
                hp["lr"] = float(hp["lr"](t - 1))
                check_lr_value(hp["lr"], f"lr (the schedule's value at step {t - 1})")
            scalars, new_gs = self.rule.step_scalars(hp, t, self._gstate)
            self.step_count = t
            self._gstate = dict(new_gs)
        # whole tensors (LAMB's trust ratio sees each tensor entire): the pipeline's phase 2
        write_step(ops, kernel, parts, len(self.params), scales, hp, scalars, inv_scale,
                   lambda partial: partial)
        return StepInfo(skipped=False, _grad_norm=gnorm, _group_norms=(gnorm,),
                        group_state=(dict(new_gs),))

    def run(self, worker, n_threads: int) -> list:
        """Run ``worker(i)`` in ``n_threads`` threads (i = 0..n-1) and wait for all of them.

        Returns the workers' return values in thread order; if any worker
        raised, the first exception (by thread index) is raised after every
        thread has finished.
        """
        if isinstance(n_threads, bool) or not isinstance(n_threads, int) or n_threads < 1:
            raise ValueError(f"n_threads: expected an integer >= 1, got {n_threads!r}")
        results, errors = [None] * n_threads, [None] * n_threads

        def target(i):
            try:
                results[i] = worker(i)
            except BaseException as e:  # re-raised in the caller's thread below
                errors[i] = e

        threads = [threading.Thread(target=target, args=(i,), name=f"hogwild-{i}")
                   for i in range(n_threads)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        for e in errors:
            if e is not None:
                raise e
        return results

    def __repr__(self):
        return f"Hogwild({self._cls.__name__}, {len(self.params)} params, step {self.step_count})"


__all__ = ["Hogwild"]
