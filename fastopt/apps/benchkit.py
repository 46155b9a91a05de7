"""What every benchmark of fastopt shares: one timing loop, one progress bar, the GPT-2-small
shape table, the bytes-per-element table and the per-rule benchmark options.

Used by ``python -m fastopt bench`` (:mod:`fastopt.apps.bench`), the asv suite
(``asv_bench/benchmarks``), ``asv_bench/gpu_bench.py`` and
``asv_bench/compare_torch_cpu.py``, so that they all time, count bytes and
shape a GPT-2 step the same way.  Imports the standard library and the rule table
only; torch and CuPy are used when a caller hands them in, tqdm when installed.

Bytes moved by a step
---------------------
A step's bandwidth counts the arrays a *fused* step must touch once each
(reads + writes, one element each): the memory traffic of the best possible
kernel, whatever an implementation actually does.  The count comes from the
rule record (``Rule.accesses``): read and write the param (2), read the grad
(1), read and write each state array the options create (2 each), read a
per-element extra input (AdaHessian's Hessian diagonal, 1); a trust-ratio rule
(LAMB) reads the param and the moments once more in its second pass.  So SGD
moves 3 arrays, Adam 7 (9 with ``amsgrad``), AdaHessian 8, LAMB 10.  A
dense-solve rule (Newton) and an orthogonalizing one (Muon: matrix products) are not
bandwidth-bound and have no entry (None).
"""

from __future__ import annotations

import math
import statistics
import sys
import time

from .._rules import ELEMENTWISE, RULES, TRUST_RATIO

#: The kinds whose step is one or two fused passes over memory (a bandwidth figure applies).
_FUSED_KINDS = (ELEMENTWISE, TRUST_RATIO)

# --------------------------------------------------------------------------- per-rule tables

#: fastopt rule -> torch.optim class name (rules torch.optim does not have are absent).
TORCH_CLASSES = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW", "adagrad": "Adagrad",
                 "rmsprop": "RMSprop", "adadelta": "Adadelta", "adamax": "Adamax",
                 "nadam": "NAdam", "radam": "RAdam", "muon": "Muon"}
TORCH_CLASSES.update(asgd="ASGD", rprop="Rprop")
TORCH_CLASSES.update(adafactor="Adafactor")

#: Learning rates small enough that millions of benchmark steps stay finite.
BENCH_OPTIONS = {"sgd": {"lr": 1e-4}, "rmsprop": {"lr": 1e-4}, "adagrad": {"lr": 1e-4},
                 "adadelta": {"lr": 1e-2}, "adahessian": {"lr": 1e-4}, "newton": {"lr": 1e-3}}

#: The rules a fused element-wise pass (or two, LAMB) can run: not the dense solves (Newton)
#: nor the matrix-product rules (Muon).
ELEMENTWISE_RULES = tuple(r for r, rule in RULES.items() if rule.kind in _FUSED_KINDS)


def arrays_per_element(rule: str, options: dict | None = None) -> int | None:
    """Arrays a fused step of ``rule`` reads plus writes per element; None for a dense solve."""
    r = RULES[rule]
    if r.kind not in _FUSED_KINDS:
        return None
    return sum(r.accesses({**r.defaults, **(options or {})}))


def bytes_per_element(rule: str, options: dict | None = None, itemsize: int = 4) -> int | None:
    """Bytes a fused step of ``rule`` moves per element (``Rule.bytes_per_element``); None for
    a dense solve."""
    r = RULES[rule]
    if r.kind not in _FUSED_KINDS:
        return None
    return r.bytes_per_element({**r.defaults, **(options or {})}, int(itemsize))


#: rule -> arrays per element under its default options (the module docstring's table).
BYTES_TABLE = {r: arrays_per_element(r) for r in RULES}

# --------------------------------------------------------------------------- shapes

#: GPT-2 small (124M): token and position embeddings, 12 blocks of 12 tensors, the final
#: LayerNorm -- 148 tensors, 124,439,808 elements (shapes from the HuggingFace checkpoint).
D_MODEL, N_LAYER, N_VOCAB, N_CTX = 768, 12, 50257, 1024
GPT2_SMALL = ([(N_VOCAB, D_MODEL), (N_CTX, D_MODEL)]
              + [(D_MODEL,), (D_MODEL,),                       # ln_1 weight, bias
                 (D_MODEL, 3 * D_MODEL), (3 * D_MODEL,),       # attn.c_attn
                 (D_MODEL, D_MODEL), (D_MODEL,),               # attn.c_proj
                 (D_MODEL,), (D_MODEL,),                       # ln_2
                 (D_MODEL, 4 * D_MODEL), (4 * D_MODEL,),       # mlp.c_fc
                 (4 * D_MODEL, D_MODEL), (D_MODEL,)] * N_LAYER  # mlp.c_proj
              + [(D_MODEL,), (D_MODEL,)])                      # ln_f
#: GPT-2 small as element counts (one flat tensor per parameter).
GPT2_SMALL_SIZES = [math.prod(s) for s in GPT2_SMALL]
#: Many tiny tensors: the per-tensor overhead, not bandwidth, dominates.
TINY_LIST = [(256,)] * 1000
LAYOUTS = {"gpt2-small": GPT2_SMALL, "1000x256": TINY_LIST}

# --------------------------------------------------------------------------- timing


def _noop():
    pass


def wall_clock(sync=_noop):
    """A timer: seconds of ``fn(); sync()`` by ``time.perf_counter``."""
    def once(fn):
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0
    return once


def cuda_events(lib):
    """A timer: seconds of ``fn()`` between two CUDA events on the current stream.

    ``lib`` is the ``cupy`` or the ``torch`` module; the end event is waited for,
    so the time covers the device work ``fn`` queued, and nothing after it.
    """
    if lib.__name__ == "cupy":
        def make():
            return lib.cuda.Event(), lib.cuda.Event()

        def elapsed_ms(a, b):
            return lib.cuda.get_elapsed_time(a, b)
    else:
        def make():
            return lib.cuda.Event(enable_timing=True), lib.cuda.Event(enable_timing=True)

        def elapsed_ms(a, b):
            return a.elapsed_time(b)

    def once(fn):
        start, end = make()
        start.record()
        fn()
        end.record()
        end.synchronize()
        return elapsed_ms(start, end) * 1e-3
    return once


def measure(fn, sync=_noop, min_time=0.1, min_runs=3, max_runs=10_000, max_time=1.0, *,
            warmup=0, timer=None):
    """Median seconds of one ``fn()`` over at least ``min_runs`` runs and ``min_time`` s.

    The one timing loop of every benchmark.  ``timer`` times one run (default:
    :func:`wall_clock` with ``sync``; :func:`cuda_events` for device time);
    ``warmup`` untimed runs come first.  A slow case (a 16M-element NumPy step)
    stops after ``max_time`` s, however few runs; ``min_runs == max_runs``
    gives exactly that many samples.
    """
    once = timer or wall_clock(sync)
    if warmup:
        for _ in range(warmup):
            fn()
        sync()
    times, total = [], 0.0
    while (len(times) < min_runs or (total < min_time and len(times) < max_runs)) \
            and not (times and total >= max_time):
        dt = once(fn)
        times.append(dt)
        total += dt
    return statistics.median(times)


def pairwise(fa, fb, reps, *, timer=None):
    """Median seconds of ``fa`` and of ``fb`` and the median of their per-pair ratios ``a / b``.

    Each repetition times one run of each back to back, alternating which goes
    first, so a noisy machine slows both sides of a pair alike.  Both are run
    once untimed first (compile, first-touch the state).
    """
    once = timer or wall_clock()
    fa(), fb()
    ta, tb, ratios = [], [], []
    for r in range(reps):
        if r % 2:
            b = once(fb)
            a = once(fa)
        else:
            a = once(fa)
            b = once(fb)
        ta.append(a)
        tb.append(b)
        ratios.append(a / b)
    return statistics.median(ta), statistics.median(tb), statistics.median(ratios)


# --------------------------------------------------------------------------- progress


class Progress:
    """A progress bar on stderr: tqdm when installed, else a one-line text bar.

    ``enabled=None`` shows it when stderr is a terminal.
    """

    def __init__(self, total, enabled=None, unit="case"):
        if enabled is None:
            enabled = sys.stderr.isatty()
        self.total, self.n, self.enabled, self.bar = total, 0, enabled, None
        if not enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self.bar = tqdm(total=total, unit=unit, file=sys.stderr, leave=False)

    def update(self, label):
        self.n += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(label, refresh=False)
            self.bar.update(1)
            return
        width = 30
        done = int(width * self.n / max(1, self.total))
        sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {self.n}/{self.total} {label:30}")
        sys.stderr.flush()

    def close(self):
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            sys.stderr.write("\r" + " " * 80 + "\r")
            sys.stderr.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


__all__ = ["TORCH_CLASSES", "BENCH_OPTIONS", "ELEMENTWISE_RULES", "arrays_per_element",
           "bytes_per_element", "BYTES_TABLE", "GPT2_SMALL", "GPT2_SMALL_SIZES", "TINY_LIST",
           "LAYOUTS", "wall_clock", "cuda_events", "measure", "pairwise", "Progress"]
