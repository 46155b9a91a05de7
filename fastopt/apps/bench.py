"""Benchmark pieces shared by ``python -m fastopt bench`` and the asv suite (``asv_bench/``).

A *case* is one optimizer step of one implementation on fresh arrays:

* ``numpy`` / ``numba`` / ``cupy`` -- a fastopt optimizer class on that backend;
* ``naive-numpy`` -- Adam or SGD written as the NumPy expressions a person types
  (new arrays for every intermediate), the baseline fastopt exists to beat;
* ``torch-fused`` / ``torch-foreach`` -- ``torch.optim`` (CPU) with ``fused=True``
  or ``foreach=True`` on tensors that share memory with the NumPy arrays.

Bytes moved by a step
---------------------
The bandwidth figures count the arrays a *fused* step must touch once each
(reads + writes), from the rule record: see :mod:`fastopt.apps.benchkit`,
which also holds the timing loop, the progress bar and the GPT-2-small shapes
this module shares with ``asv_bench/``.  The reference bandwidth is an
in-place ``a += b`` (3 arrays: read a, read b, write a) on arrays of the same
size and dtype, measured in the same process -- the faster of NumPy's (one
thread) and torch's ``add_`` (multi-threaded) when torch is installed:
``fraction`` is achieved bytes/s over that.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
import statistics
import sys
import time

import numpy as np

from .. import _backend
from .. import precision as _prec
from .._rules import RULES
from .benchkit import (BENCH_OPTIONS, ELEMENTWISE_RULES, TORCH_CLASSES, Progress, _noop,
                       bytes_per_element, measure)

#: Every fastopt backend and every peer a case can run.
FASTOPT_IMPLS = tuple(_backend.BACKEND_NAMES)            # numpy, numba, cupy
PEER_IMPLS = ("naive-numpy", "torch-fused", "torch-foreach")
IMPLS = FASTOPT_IMPLS + PEER_IMPLS

#: The rules the naive NumPy peer implements.
NAIVE_RULES = ("sgd", "adam")


# --------------------------------------------------------------------------- availability

_BACKENDS = None


def backend_info() -> dict:
    """``fastopt.backends()``, asked once per process."""
    global _BACKENDS
    if _BACKENDS is None:
        _BACKENDS = _backend.backends()
    return _BACKENDS


def torch_module():
    """``torch`` or None when it is not installed."""
    try:
        import torch
    except ImportError:
        return None
    return torch


def unavailable(impl: str, rule: str = "adam") -> str | None:
    """Why ``impl`` cannot run ``rule`` here, or None when it can."""
    if impl in FASTOPT_IMPLS:
        # only this backend is loaded: a NumPy case need not import numba (or cupy)
        if not _backend.available(impl):
            return f"backend {impl!r} unavailable: {_backend._FAILED.get(impl)}"
        try:
            _backend.get_kernel(rule, impl)
        except NotImplementedError as e:
            return str(e)
        return None
    if impl == "naive-numpy":
        return None if rule in NAIVE_RULES else f"no naive NumPy {rule}"
    if impl in ("torch-fused", "torch-foreach"):
        if torch_module() is None:
            return "torch is not installed"
        if rule not in TORCH_CLASSES:
            return f"torch.optim has no {rule}"
        if impl == "torch-fused" and "fused" not in inspect.signature(_torch_class(rule)).parameters:
            return f"torch.optim.{TORCH_CLASSES[rule]} has no fused=True"
        if impl == "torch-foreach" and "foreach" not in inspect.signature(_torch_class(rule)).parameters:
            return f"torch.optim.{TORCH_CLASSES[rule]} has no foreach=True"
        return None
    return f"unknown implementation {impl!r}; expected one of {IMPLS}"


def _torch_class(rule):
    return getattr(torch_module().optim, TORCH_CLASSES[rule])


# --------------------------------------------------------------------------- cases


def _xp(impl):
    if impl == "cupy":
        import cupy

        return cupy
    return np


def _random(xp, rng, shape, dtype, lo=-0.5, hi=0.5):
    # rng.random is several times faster than standard_normal for 1e7+ elements
    dt = _prec.as_dtype(dtype)
    a = rng.random(int(np.prod(shape)), dtype=dt if dt.itemsize >= 4 else np.float32).reshape(shape)
    a *= hi - lo
    a += lo
    if dt.itemsize == 2:  # float16/bfloat16: generated in float32, rounded once
        a = a.astype(dt)
    return a if xp is np else xp.asarray(a)


class Case:
    """One optimizer step of ``impl`` on ``shapes`` (a list of tensor shapes) of ``dtype``.

    ``step()`` runs one step, ``sync()`` waits for the device (a no-op on the
    CPU).  Construction raises NotImplementedError when ``impl`` cannot run
    ``rule`` here (asv's way to skip a parameter combination).  ``options``
    override the rule's defaults (and may set pipeline options such as
    ``clip_norm``); ``nonfinite`` is "ignore" by default so that the step is
    the fused pass alone, as torch's optimizers do no such check.
    """

    def __init__(self, impl, rule, shapes, dtype="float32", options=None, nonfinite="ignore",
                 seed=0):
        why = unavailable(impl, rule)
        if why:
            raise NotImplementedError(why)
        self.impl, self.rule, self.dtype = impl, rule, _prec.as_dtype(dtype)
        self.shapes = [tuple(s) if isinstance(s, (tuple, list)) else (int(s),) for s in shapes]
        self.options = {**BENCH_OPTIONS.get(rule, {}), **(options or {})}
        if impl in PEER_IMPLS:  # torch keeps state in the param dtype, with no precision options
            for k in PRECISION_OPTIONS:
                self.options.pop(k, None)
        self.numel = sum(int(np.prod(s)) for s in self.shapes)
        per = bytes_per_element(rule, self.options, self.dtype.itemsize)
        self.bytes_per_step = None if per is None else per * self.numel
        rng = np.random.default_rng(seed)
        xp = _xp(impl)
        self.params = [_random(xp, rng, s, dtype) for s in self.shapes]
        self.grads = [_random(xp, rng, s, dtype) for s in self.shapes]
        self.extras = None
        r = RULES[rule]
        if r.extra is not None and r.extra_shape == "square":
            self.extras = []
            for s in self.shapes:
                n = int(np.prod(s))
                a = rng.random((n, n)) - 0.5
                h = (a @ a.T / n + np.eye(n)).astype(dtype)  # symmetric positive definite
                self.extras.append(h if xp is np else xp.asarray(h))
        elif r.extra is not None:  # one value per param element
            self.extras = [_random(xp, rng, s, dtype) for s in self.shapes]
        self.sync = _noop
        if impl == "cupy":
            self.sync = xp.cuda.Device().synchronize
        if impl in FASTOPT_IMPLS:
            self._setup_fastopt(nonfinite)
        elif impl == "naive-numpy":
            self._setup_naive()
        else:
            self._setup_torch(impl)

    # fastopt ---------------------------------------------------------------

    def _setup_fastopt(self, nonfinite):
        from .._optim import OPTIMIZERS

        self.opt = OPTIMIZERS[self.rule](self.params, backend=self.impl, nonfinite=nonfinite,
                                         **self.options)
        if self.extras is not None:
            self.step = lambda: self.opt.step(self.grads, self.extras)
        else:
            self.step = lambda: self.opt.step(self.grads)

    # naive NumPy -----------------------------------------------------------

    def _setup_naive(self):
        hp = {**RULES[self.rule].defaults, **self.options}
        self.t = 0
        if self.rule == "sgd":
            lr = hp["lr"]

            def step():
                for p, g in zip(self.params, self.grads):
                    p -= lr * g
        else:
            lr, (b1, b2), eps = hp["lr"], hp["betas"], hp["eps"]
            self.m = [np.zeros_like(p) for p in self.params]
            self.v = [np.zeros_like(p) for p in self.params]

            def step():
                self.t += 1
                t = self.t
                for i, (p, g) in enumerate(zip(self.params, self.grads)):
                    # as written in the Adam paper: every line allocates new arrays
                    self.m[i] = b1 * self.m[i] + (1 - b1) * g
                    self.v[i] = b2 * self.v[i] + (1 - b2) * g ** 2
                    m_hat = self.m[i] / (1 - b1 ** t)
                    v_hat = self.v[i] / (1 - b2 ** t)
                    p -= lr * m_hat / (np.sqrt(v_hat) + eps)
        self.step = step

    # torch -----------------------------------------------------------------

    def _setup_torch(self, impl):
        torch = torch_module()
        cls = _torch_class(self.rule)
        hp = {**RULES[self.rule].defaults, **self.options}
        accepted = inspect.signature(cls).parameters
        kw = {k: v for k, v in hp.items() if k in accepted and k not in ("fused", "foreach")}
        kw["fused" if impl == "torch-fused" else "foreach"] = True
        # the tensors share memory with the NumPy arrays: no copies on either side
        # (torch.from_numpy has no bfloat16: its bits go through int16 and a view)
        def tensor(a):
            if _prec.is_bfloat16(a.dtype):
                return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
            return torch.from_numpy(a)

        self.tparams = [tensor(p) for p in self.params]
        for tp, g in zip(self.tparams, self.grads):
            tp.grad = tensor(g)
        try:
            self.opt = cls(self.tparams, **kw)
            self.opt.step()  # fused=True on an unsupported device/dtype fails here, not above
        except (RuntimeError, ValueError) as e:
            raise NotImplementedError(f"torch.optim.{cls.__name__}({impl}): {e}") from None
        self.step = self.opt.step


def make_case(impl, rule, shapes, dtype="float32", options=None, nonfinite="ignore", warm=True):
    """A :class:`Case`, warmed by one step (JIT compile, first-touch page faults)."""
    case = Case(impl, rule, shapes, dtype, options, nonfinite)
    if warm:
        case.step()
        case.sync()
    return case


# --------------------------------------------------------------------------- timing


def add_bandwidth(n, dtype="float32", xp=np, min_time=0.1):
    """Bytes/s of the best in-place ``a += b`` on two length-``n`` arrays (3 arrays of traffic).

    On the CPU both NumPy's ``a += b`` (one thread) and, when torch is installed,
    ``torch``'s ``a.add_(b)`` (all of torch's threads) run, on the same arrays,
    and the faster counts: a multi-threaded kernel is compared with what the
    machine's memory can do, not with one core.
    """
    dt = np.dtype(dtype)
    a = xp.ones(int(n), dtype=dt)
    b = xp.ones(int(n), dtype=dt)
    sync = xp.cuda.Device().synchronize if xp is not np else _noop
    adds = [lambda: a.__iadd__(b)]
    torch = torch_module() if xp is np else None
    if torch is not None:
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        adds.append(lambda: ta.add_(tb))
    best = 0.0
    for add in adds:
        add()
        sync()
        best = max(best, 3 * int(n) * dt.itemsize / measure(add, sync, min_time=min_time))
    return best


def cold_compile_seconds(dtype="float32", rules=None, cache_dir=None, timeout=600):
    """Seconds to load the numba backend and compile one step of every rule, in a fresh process.

    ``cache_dir`` becomes ``NUMBA_CACHE_DIR`` (a new temporary folder when None,
    so nothing is cached); calling twice with the same folder gives the time to
    load compiled kernels from the disk cache instead.
    """
    import subprocess
    import tempfile

    rules = list(rules or RULES)
    code = ("import sys, time\n"
            "import fastopt.apps.bench as b\n"
            "t0 = time.perf_counter()\n"
            f"for r in {rules!r}:\n"
            # a rule whose extra input is n x n (Newton's Hessian) gets a small tensor
            f"    square = b.RULES[r].extra is not None and b.RULES[r].extra_shape == 'square'\n"
            f"    b.make_case('numba', r, [(3,) if square else (1000,)], {str(dtype)!r})\n"
            "print(time.perf_counter() - t0)\n")
    with tempfile.TemporaryDirectory(prefix="fastopt-numba-cache-") as tmp:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir or tmp)
        env.pop("NUMBA_DISABLE_JIT", None)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                             timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"compile subprocess failed:\n{out.stderr[-2000:]}")
    return float(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- mixed precision

#: The options of a fastopt case that torch.optim has no counterpart of.
PRECISION_OPTIONS = ("state_dtype", "master_weights", "stochastic_rounding", "seed")

#: Adam with 16-bit params, each against its baseline in one interleaved run (the mixed-precision targets):
#: (label, impl, param dtype, options, baseline label, goal of the time ratio).
PRECISION_ROWS = (
    ("f32", "numba", "float32", {}, None, None),
    ("torch-fused bf16", "torch-fused", "bfloat16", {}, None, None),
    ("bf16 state=param", "numba", "bfloat16", {"state_dtype": "param"}, "torch-fused bf16", 1.0),
    ("bf16 bf16-state sr", "numba", "bfloat16",
     {"state_dtype": "bfloat16", "stochastic_rounding": True}, "f32", 0.6),
    ("bf16 f32-state", "numba", "bfloat16", {}, "f32", 0.85),
)
PRECISION_N = 16_777_216


def precision_bytes(dtype, options) -> int:
    """Bytes one Adam step moves per element with these precision options (the bytes table)."""
    dt = _prec.as_dtype(dtype)
    sd = _prec.resolve_state_dtype(dt, options.get("state_dtype"))
    per = RULES["adam"].bytes_per_element(RULES["adam"].defaults, dt.itemsize,
                                          state_itemsize=sd.itemsize)
    return per + (8 if options.get("master_weights") else 0)  # the float32 master: read + write


def interleaved(fns, reps):
    """Median seconds of each of ``fns`` from one run that times them in turn.

    Every repetition runs each function once, the order rotated by one each
    time, so load on a shared machine falls on all of them alike; returns the
    per-repetition times (``reps`` rows, one column per function).
    """
    import time

    for fn in fns:
        fn()
    out = np.empty((reps, len(fns)))
    for r in range(reps):
        for k in range(len(fns)):
            j = (k + r) % len(fns)
            t0 = time.perf_counter()
            fns[j]()
            out[r, j] = time.perf_counter() - t0
    return out


def run_precision_bench(n=PRECISION_N, reps=11, torch=True, progress=False,
                        wait_policy="passive"):
    """Adam on ``n`` elements in every ``PRECISION_ROWS`` format, one interleaved run.

    Each row's ``ratio`` is the median over repetitions of its time over its
    baseline's time in the same repetition.  ``wait_policy``: ``OMP_WAIT_POLICY``
    for both OpenMP runtimes, as in ``speed_table`` (idle spinning threads of one
    runtime would take the cores from the other's on a shared machine).
    """
    policy = _set_wait_policy(wait_policy)
    rows = [r for r in PRECISION_ROWS if torch or r[1] not in PEER_IMPLS]
    cases, skipped = {}, []
    with Progress(len(rows), progress) as bar:
        for label, impl, dtype, options, _, _ in rows:
            bar.update(label)
            try:
                cases[label] = make_case(impl, "adam", [n], dtype, options)
            except (NotImplementedError, ImportError) as e:  # no torch, no ml_dtypes
                skipped.append({"format": label, "why": str(e)})
    labels = list(cases)
    times = interleaved([cases[k].step for k in labels], reps)
    col = {k: j for j, k in enumerate(labels)}
    out = []
    for label, impl, dtype, options, base, goal in rows:
        if label not in cases:
            continue
        j = col[label]
        ratio = None
        if base in col:
            ratio = float(np.median(times[:, j] / times[:, col[base]]))
        out.append({"format": label, "impl": impl, "dtype": dtype, "options": options,
                    # torch.optim keeps its state in the param dtype
                    "bytes_per_element": precision_bytes(
                        dtype, {"state_dtype": "param"} if impl in PEER_IMPLS else options),
                    "time_s": float(np.median(times[:, j])), "baseline": base,
                    "ratio": ratio, "goal": goal})
    return {"n": n, "reps": reps, "loadavg": list(os.getloadavg()), "omp_wait_policy": policy,
            "rows": out, "skipped": skipped}


def format_precision_table(result) -> str:
    lines = [f"Adam, {_fmt_size(result['n'])} elements, one interleaved run of {result['reps']} "
             f"repetitions (load average {result['loadavg'][0]:.1f}, OMP_WAIT_POLICY "
             f"{result.get('omp_wait_policy', 'unset')}); ratio: time over the baseline's in the "
             f"same repetition (median)"]
    head = f"{'format':20} {'impl':12} {'B/elem':>6} {'time':>10} {'ratio':>7} {'goal':>6}  baseline"
    lines += [head, "-" * len(head)]
    for r in result["rows"]:
        ratio = f"{r['ratio']:6.2f}x" if r["ratio"] is not None else f"{'-':>7}"
        goal = f"{r['goal']:5.2f}x" if r["goal"] is not None else f"{'-':>6}"
        lines.append(f"{r['format']:20} {r['impl']:12} {r['bytes_per_element']:6d} "
                     f"{_fmt_time(r['time_s']):>10} {ratio} {goal}  {r['baseline'] or ''}")
    for s in result["skipped"]:
        lines.append(f"skipped {s['format']}: {s['why']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the CLI

DEFAULT_RULES = ("sgd", "adam", "adamw", "adagrad", "lion")
DEFAULT_SIZES = (1_000, 1_000_000, 16_000_000)


def _parse_list(text, choices, what):
    items = [x.strip() for x in text.split(",") if x.strip()]
    if items == ["all"]:
        return list(choices)
    bad = [x for x in items if x not in choices]
    if bad or not items:
        raise SystemExit(f"--{what}: expected a comma-separated list of {', '.join(choices)} "
                         f"(or 'all'), got {text!r}")
    return items


def _parse_sizes(text):
    try:
        sizes = [int(float(x)) for x in text.split(",") if x.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise SystemExit(f"--sizes: expected a comma-separated list of sizes such as 1e3,1e6, "
                         f"got {text!r}")
    return sizes


def _fmt_size(n):
    e = int(math.floor(math.log10(n))) if n > 0 else 0
    mant = n / 10 ** e
    return f"{mant:.3g}e{e}" if n >= 1000 else str(n)


def _fmt_time(s):
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if s >= scale:
            return f"{s / scale:7.2f} {unit}"
    return f"{s / 1e-9:7.1f} ns"


def run_bench(rules, impls, sizes, dtype="float32", torch=True, min_time=0.1, progress=False):
    """Time every (rule, impl, size); returns the dict that ``--json`` prints."""
    dtype = np.dtype(dtype)
    peers = []
    if torch and torch_module() is not None:
        peers = ["torch-fused", "torch-foreach"]
    # fastopt first, then torch, then the a += b references (torch's add_ among them):
    # torch's OpenMP workers keep spinning for a while after each call and, on a small
    # machine, would starve the threads of a Numba step timed right after them
    jobs = [(r, i, n) for n in sizes for r in rules for i in impls]
    jobs += [(r, i, n) for n in sizes for r in rules for i in peers]
    gpu = "cupy" in impls
    bar = Progress(len(jobs) + len(sizes) * (1 + gpu), progress)
    times, skipped = {}, []
    for rule, impl, n in jobs:
        bar.update(f"{rule} {impl} {_fmt_size(n)}")
        try:
            case = make_case(impl, rule, [(n,)], dtype)
        except NotImplementedError as e:
            if impl in impls:
                skipped.append({"rule": rule, "impl": impl, "size": n, "why": str(e)})
            continue
        times[(rule, impl, n)] = (measure(case.step, case.sync, min_time=min_time),
                                  case.bytes_per_step)
        del case
    add_bw, add_bw_gpu = {}, {}
    for n in sizes:
        bar.update(f"a += b, {_fmt_size(n)}")
        add_bw[n] = add_bandwidth(n, dtype, min_time=min_time)
        if gpu:  # a GPU row is compared with the GPU's own a += b
            bar.update(f"a += b (cupy), {_fmt_size(n)}")
            add_bw_gpu[n] = add_bandwidth(n, dtype, xp=_xp("cupy"), min_time=min_time)
    bar.close()

    rows, peer_rows = [], []
    for (rule, impl, n), (t, nbytes) in times.items():
        gbps = None if nbytes is None else nbytes / t / 1e9
        ref = add_bw_gpu[n] if impl == "cupy" else add_bw[n]
        row = {"rule": rule, "impl": impl, "size": n, "dtype": dtype.name, "time_s": t,
               "gbps": gbps, "fraction_of_add": None if gbps is None else gbps * 1e9 / ref}
        if impl in peers:
            peer_rows.append(row)
            continue
        base = times.get((rule, "numpy", n))
        row["speedup_vs_numpy"] = None if base is None else base[0] / t
        best = [(times[(rule, p, n)][0], p) for p in peers if (rule, p, n) in times]
        row["torch_impl"] = min(best)[1] if best else None
        row["speedup_vs_torch"] = min(best)[0] / t if best else None
        rows.append(row)
    torch_mod = torch_module() if torch else None
    return {
        "dtype": dtype.name,
        "versions": {"python": sys.version.split()[0], "numpy": np.__version__,
                     "numba": _version("numba") if "numba" in impls else None,
                     "torch": torch_mod.__version__ if torch_mod is not None else None},
        "threads": {"cpu_count": os.cpu_count(),
                    "torch": torch_mod.get_num_threads() if torch_mod is not None else None},
        "add_gbps": {str(n): bw / 1e9 for n, bw in add_bw.items()},
        "add_gbps_cupy": {str(n): bw / 1e9 for n, bw in add_bw_gpu.items()},
        "bytes_per_element": {r: bytes_per_element(r, itemsize=dtype.itemsize) for r in rules},
        "rows": rows, "peers": peer_rows, "skipped": skipped,
    }


#: the shortest time limit of the bounded Muon mode: below it a child's pipe round trip and the
#: scheduler would decide whether torch "finished", not torch
MUON_MIN_LIMIT_S = 1.0


def _muon_problem(n, dtype):
    rng = np.random.default_rng(0)
    return _random(np, rng, (n, n), dtype), _random(np, rng, (n, n), dtype)


def _torch_muon_child(n: int, dtype: str) -> None:
    """The child of the bounded Muon mode: builds torch.optim.Muon on the same problem as the
    parent, prints ``ready``, waits for a line on stdin, runs ONE step and prints its seconds
    (``time.perf_counter`` around the step only)."""
    torch = torch_module()
    p, g = _muon_problem(n, dtype)
    tp = torch.from_numpy(p)
    tp.grad = torch.from_numpy(g)
    opt = torch.optim.Muon([tp], lr=0.02)
    print("ready", flush=True)
    sys.stdin.readline()
    t0 = time.perf_counter()
    opt.step()
    print(f"{time.perf_counter() - t0!r}", flush=True)
    os._exit(0)  # torch's interpreter teardown can take seconds on a loaded machine: skip it


def _torch_muon_bounded(n, dtype, limit_s):
    """torch.optim.Muon's first step on the ``n`` x ``n`` problem in a child process, stopped
    after ``limit_s`` seconds of its step (its import and set-up are not counted): the step's
    seconds, or None when it had not finished (the child is then killed)."""
    code = ("import sys; from fastopt.apps.bench import _torch_muon_child; "
            "_torch_muon_child(int(sys.argv[1]), sys.argv[2])")
    return _bounded_child(code, [str(n), np.dtype(dtype).name], limit_s)


def _bounded_child(code, args, limit_s):
    """Run ``python -c code *args``; the child prints ``ready``, waits for a line on stdin, does
    its timed work and prints its seconds.  Returns them, or None when no answer came within
    ``limit_s`` seconds of the ``go`` line (the child is then killed)."""
    import subprocess
    import threading

    proc = subprocess.Popen([sys.executable, "-c", code, *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"bounded child: expected 'ready', got {line!r} "
                               f"(exit {proc.poll()})")
        # the limit is on the step's answer, not on the child's exit: a reader thread
        got = []
        reader = threading.Thread(target=lambda: got.append(proc.stdout.readline()), daemon=True)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        reader.start()
        reader.join(limit_s)
        if reader.is_alive():
            return None
        if not got[0].strip():
            raise RuntimeError(f"bounded child failed (exit {proc.wait()})")
        return float(got[0])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def muon_vs_torch(n=4096, dtype="float32", backend="numba", rounds=3, progress=False,
                  torch_limit=None, torch_limit_s=None):
    """One Muon step on an ``n`` x ``n`` matrix: fastopt (``backend``) against torch.optim.Muon
    on the CPU; returns the dict ``--json`` prints under ``"muon"``.

    Both run torch's defaults (5 Newton-Schulz steps, Nesterov).  fastopt's products run in
    ``dtype`` on NumPy's BLAS (``syrk`` for the two symmetric ones); torch's in bfloat16, which
    on a CPU can take more than an hour per step at n = 4096.  Two modes:

    * interleaved (``torch_limit`` and ``torch_limit_s`` None): fastopt, torch, fastopt, ... in
      one process, so both see the same machine load; ``ratio`` is fastopt's median time over
      torch's (below 1: fastopt is faster);
    * bounded (``torch_limit``: a factor, e.g. 3; or ``torch_limit_s``: seconds): fastopt's
      median step first, then torch's first step in a child process (:func:`_torch_muon_child`)
      with a time limit of ``max(torch_limit * fastopt's time, MUON_MIN_LIMIT_S)`` (or
      ``torch_limit_s``).  If torch finished, ``ratio`` is the measured one (its one cold step:
      the first step also allocates the momentum buffer); if not, the child is killed, ``ratio``
      is None and ``ratio_upper_bound`` = fastopt's time / the limit: fastopt/torch is below it.

    ``torch_mode`` says which ("interleaved", "bounded"); ``ratio_kind`` whether the figure is
    ``"measured"``, an ``"upper_bound"``, or None (no torch).
    """
    from .._optim import Muon

    bounded = torch_limit is not None or torch_limit_s is not None
    if torch_limit is not None and not (isinstance(torch_limit, (int, float)) and torch_limit > 0):
        raise ValueError(f"torch_limit: expected a positive factor of fastopt's step time, got "
                         f"{torch_limit!r}")
    if torch_limit_s is not None and not (isinstance(torch_limit_s, (int, float)) and torch_limit_s > 0):
        raise ValueError(f"torch_limit_s: expected positive seconds, got {torch_limit_s!r}")
    torch = torch_module()
    p, g = _muon_problem(n, dtype)
    fo_opt = Muon([p.copy()], lr=0.02, backend=backend, nonfinite="ignore")
    fo_step = functools.partial(fo_opt.step, [g])
    t_step = None
    if torch is not None and not bounded:
        tp = torch.from_numpy(p.copy())
        tp.grad = torch.from_numpy(g)
        t_opt = torch.optim.Muon([tp], lr=0.02)
        t_step = t_opt.step
    fo_step()  # compile, first touch
    if t_step is not None:
        t_step()
    bar = Progress(rounds * (1 + (t_step is not None)) + (bounded and torch is not None), progress)
    fo_times, t_times = [], []
    for _ in range(rounds):
        for step, out in ((fo_step, fo_times), (t_step, t_times)):
            if step is None:
                continue
            bar.update("muon")
            t0 = time.perf_counter()
            step()
            out.append(time.perf_counter() - t0)
    fo_t = statistics.median(fo_times)
    limit, finished, bound = None, None, None
    if bounded and torch is not None:
        bar.update("muon torch (bounded)")
        limit = float(torch_limit_s) if torch_limit_s is not None else \
            max(torch_limit * fo_t, MUON_MIN_LIMIT_S)
        t = _torch_muon_bounded(n, dtype, limit)
        finished = t is not None
        if finished:
            t_times.append(t)
        else:
            bound = fo_t / limit
    bar.close()
    t_t = statistics.median(t_times) if t_times else None
    ratio = None if t_t is None else fo_t / t_t
    return {"shape": [n, n], "dtype": np.dtype(dtype).name, "backend": backend, "rounds": rounds,
            "fastopt_s": fo_t, "torch_s": t_t, "ratio": ratio,
            "torch_mode": "bounded" if bounded else "interleaved",
            "torch_limit_s": limit, "torch_finished": finished, "ratio_upper_bound": bound,
            "ratio_kind": "measured" if ratio is not None else ("upper_bound" if bound is not None else None),
            "loadavg": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def format_muon(m) -> str:
    """The table row of :func:`muon_vs_torch`."""
    shape = "x".join(map(str, m["shape"]))
    load = "" if m["loadavg"] is None else f", load average {m['loadavg']:.1f}"
    head = f"muon {m['backend']} {shape} {m['dtype']}: {_fmt_time(m['fastopt_s']).strip()} per step"
    if m.get("torch_mode") == "bounded" and m.get("ratio_kind") == "upper_bound":
        lim = _fmt_time(m["torch_limit_s"]).strip()
        return (f"{head} (median of {m['rounds']}), torch.optim.Muon > {lim} (one step in a child "
                f"process, stopped at the limit), fastopt/torch < {m['ratio_upper_bound']:.3g}{load}")
    torch_t = "-" if m["torch_s"] is None else _fmt_time(m["torch_s"]).strip()
    ratio = "-" if m["ratio"] is None else f"{m['ratio']:.3g}x"
    if m.get("torch_mode") == "bounded":
        how = (f"fastopt median of {m['rounds']} steps, torch one step in a child process "
               f"within its {_fmt_time(m['torch_limit_s']).strip()} limit")
    else:
        how = f"median of {m['rounds']} interleaved steps"
    return (f"{head}, torch.optim.Muon {torch_t}, fastopt/torch {ratio} ({how}{load})")


def _version(mod):
    try:
        return __import__(mod).__version__
    except ImportError:
        return None


def format_table(result) -> str:
    """The human-readable table of :func:`run_bench`'s result."""
    lines = [f"one step, {result['dtype']}. GB/s: the arrays a fused step touches (fastopt.apps.bench)"
             f" / time;\n'of a+=b': that over the fastest in-place a += b (NumPy's or torch's "
             f"add_) at the same size"]
    lines.append("a += b: " + ", ".join(f"{_fmt_size(int(n))} {bw:.1f} GB/s"
                                        for n, bw in result["add_gbps"].items()))
    head = (f"{'rule':10} {'backend':8} {'size':>7} {'time':>10} {'GB/s':>7} {'of a+=b':>8} "
            f"{'vs numpy':>9} {'vs torch':>9}  torch")
    lines += [head, "-" * len(head)]

    def x(v):
        return f"{v:8.2f}x" if v is not None else f"{'-':>9}"

    for r in result["rows"]:
        gbps = f"{r['gbps']:7.2f}" if r["gbps"] is not None else f"{'-':>7}"
        frac = f"{r['fraction_of_add']:8.2f}" if r["fraction_of_add"] is not None else f"{'-':>8}"
        lines.append(f"{r['rule']:10} {r['impl']:8} {_fmt_size(r['size']):>7} "
                     f"{_fmt_time(r['time_s']):>10} {gbps} {frac} {x(r['speedup_vs_numpy'])} "
                     f"{x(r['speedup_vs_torch'])}  {(r['torch_impl'] or '').replace('torch-', '')}")
    for s in result["skipped"]:
        lines.append(f"skipped {s['rule']} {s['impl']} {_fmt_size(s['size'])}: {s['why']}")
    return "\n".join(lines)


def plot(result, path) -> None:
    """A bar chart: achieved GB/s per rule and implementation, one panel per size (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = result["rows"] + result["peers"]
    sizes = sorted({r["size"] for r in rows})
    rules = list(dict.fromkeys(r["rule"] for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    by = {(r["rule"], r["impl"], r["size"]): r for r in rows}
    fig, axes = plt.subplots(len(sizes), 1, figsize=(max(6, 1.4 * len(rules) + 2), 3 * len(sizes) + 0.6),
                             squeeze=False)
    width = 0.8 / max(1, len(impls))
    for ax, n in zip(axes[:, 0], sizes):
        for k, impl in enumerate(impls):
            xs, ys = [], []
            for j, rule in enumerate(rules):
                r = by.get((rule, impl, n))
                if r is not None and r["gbps"] is not None:
                    xs.append(j + (k - (len(impls) - 1) / 2) * width)
                    ys.append(r["gbps"])
            ax.bar(xs, ys, width, label=impl, color=f"C{k}")
        ax.axhline(result["add_gbps"][str(n)], color="k", ls="--", lw=1, label="a += b")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_locator(matplotlib.ticker.LogLocator(subs=(2.0, 5.0)))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.set_xticks(range(len(rules)), rules)
        ax.set_ylabel("GB/s (log)")
        ax.set_title(f"one step, {_fmt_size(n)} {result['dtype']} elements", fontsize="medium")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize="small", frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- 8-bit state


class Q8KernelStep:
    """One step of ``rule`` on the numba backend's kernel, with float32 or q8 state.

    The backend contract is called directly (``kernel(params, grads, states, s,
    pre)``), the same way for both formats, so the two differ only in the state
    format: no read pass (``nonfinite="ignore"``), one tensor of ``n`` float32
    params.  ``state="q8"`` holds codes plus a per-256-block absmax per state
    (docs/design.md, "8-bit state format"); ``"float32"`` plain arrays.
    """

    def __init__(self, rule="adam", n=1 << 24, state="q8", seed=0, options=None,
                 param="float32"):
        # param="bfloat16" with state="q8": bfloat16 params and grads, q8 moments and
        # stochastic rounding (the ~10 bytes/element format)
        why = unavailable("numba", rule)
        if why:
            raise NotImplementedError(why)
        from .. import quantization as q8
        from ..precision import Q8, Precision

        if state not in ("q8", "float32"):
            raise ValueError(f"state: expected 'q8' or 'float32', got {state!r}")
        if param not in ("float32", "bfloat16") or (param == "bfloat16" and state != "q8"):
            raise ValueError(f"param: expected 'float32', or 'bfloat16' with state 'q8', got "
                             f"{param!r} with state {state!r}")
        r = RULES[rule]
        rng = np.random.default_rng(seed)
        self.params = [_random(np, rng, (n,), param)]
        self.grads = [_random(np, rng, (n,), param)]
        self.hp = {**r.defaults, **BENCH_OPTIONS.get(rule, {}), **(options or {})}
        self.rule, self.t, self.gstate = r, 0, dict(r.group_state)
        self.states = {}
        for name, init in r.state(self.hp):
            if state == "q8":
                codes, absmax = q8.quantize_blockwise(np.full(n, init, np.float32),
                                                      signed=name not in r.nonnegative_state)
                self.states[name], self.states[name + "_absmax"] = [codes], [absmax]
            else:
                self.states[name] = [np.full(n, init, np.float32)]
        f32 = np.dtype(np.float32)
        half = param == "bfloat16"
        prec = Precision(param=self.params[0].dtype, compute=f32, state=Q8, master_weights=False,
                         stochastic_rounding=half, seed=0) if state == "q8" else None
        self._prec = prec
        self.kernel = _backend.get_kernel(rule, "numba")
        self.extras = ([_random(np, rng, (n,), "float32")]
                       if r.extra is not None and r.extra_shape == "param" else None)

    def step(self):
        self.t += 1
        s, self.gstate = self.rule.step_scalars(self.hp, self.t, self.gstate)
        pre = _backend.Pre(precision=self._prec, step=self.t)
        self.kernel(self.params, self.grads, self.states, s, pre, self.extras)


def bnb_adam8bit_step(n=1 << 24, seed=0):
    """One ``bitsandbytes.optim.Adam8bit`` step on CPU tensors of ``n`` float32 params.

    An optional peer: NotImplementedError when bitsandbytes or torch is missing.
    """
    try:
        import bitsandbytes as bnb
        import torch
    except ImportError as e:
        raise NotImplementedError(f"bitsandbytes peer unavailable: {e}") from None
    rng = np.random.default_rng(seed)
    p = torch.from_numpy(_random(np, rng, (n,), "float32"))
    p.grad = torch.from_numpy(_random(np, rng, (n,), "float32"))
    opt = bnb.optim.Adam8bit([p], lr=1e-3)
    return opt.step


def q8_ratios(n=1 << 24, reps=5, threads=2, peer=True, progress=False):
    """q8 Adam against float32 Adam (numba) and bitsandbytes' Adam8bit, interleaved.

    Returns a dict of median times and median per-pair ratios (see
    ``benchkit.pairwise``): ``q8_over_f32`` (goal <= 1.5) and, when
    bitsandbytes imports, ``bnb_over_q8`` (goal >= 20).  ``threads`` sets
    Numba's and torch's thread counts.
    """
    from .benchkit import pairwise

    import numba

    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    torch = torch_module()
    if torch is not None:
        torch.set_num_threads(threads)
    q8 = Q8KernelStep("adam", n, "q8")
    f32 = Q8KernelStep("adam", n, "float32")
    t_q8, t_f32, r = pairwise(q8.step, f32.step, reps)
    out = {"n": n, "threads": threads, "load_avg": os.getloadavg()[0],
           "q8_s": t_q8, "f32_s": t_f32, "q8_over_f32": r}
    if peer:
        try:
            bnb = bnb_adam8bit_step(n)
        except NotImplementedError as e:
            out["bnb_skipped"] = str(e)
        else:
            t_bnb, t_q8b, rb = pairwise(bnb, q8.step, max(3, reps // 2))
            out.update(bnb_s=t_bnb, q8_vs_bnb_s=t_q8b, bnb_over_q8=rb)
    return out


# --------------------------------------------------------------------------- --speed

#: The demo's default MLP (``python -m fastopt demo``): 6 tensors, 26,634 params.
DEMO_SIZES = (68 * 128, 128, 128 * 128, 128, 128 * 10, 10)

#: A fresh process's first Adam step: on stdout the seconds of its imports, then of the step.
_FIRST_STEP = {
    "fastopt": ("import time, numpy as np\n"
                "t0 = time.perf_counter()\n"
                "import fastopt as fo\n"
                "fo._backend.get_ops('numba')\n"  # the backend's module: numba and the kernels
                "t1 = time.perf_counter()\n"
                "p = [np.ones(1000, np.float32)]\n"
                "fo.Adam(p, backend='numba').step([np.ones(1000, np.float32)])\n"
                "print(t1 - t0, time.perf_counter() - t1)\n"),
    "torch": ("import time\n"
              "t0 = time.perf_counter()\n"
              "import torch\n"
              "t1 = time.perf_counter()\n"
              "p = torch.nn.Parameter(torch.ones(1000))\n"
              "p.grad = torch.ones(1000)\n"
              "torch.optim.Adam([p], fused=True).step()\n"
              "print(t1 - t0, time.perf_counter() - t1)\n"),
}


def first_step_parts(impl="fastopt", cache_dir=None, timeout=600):
    """``(import_s, step_s)`` of a fresh process's first Adam step (1000 elements).

    ``impl``: ``"fastopt"`` (numba backend; ``cache_dir`` becomes ``NUMBA_CACHE_DIR``:
    an empty folder times the cold compile, a second call with the same folder the
    load from the disk cache) or ``"torch"`` (fused Adam).  ``import_s`` is
    ``import fastopt`` and its numba backend's module (which imports numba), or
    ``import torch``; ``step_s`` the optimizer's construction and first step, which is
    where the kernels compile or load.
    """
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="fastopt-first-step-") as tmp:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir or tmp, FASTOPT_NUMBA_CACHE="1")
        r = subprocess.run([sys.executable, "-c", _FIRST_STEP[impl]], env=env,
                           capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"first {impl} step failed: {r.stderr[-2000:]}")
    imp, step = map(float, r.stdout.split()[-2:])
    return imp, step


def first_step_seconds(impl="fastopt", cache_dir=None, timeout=600):
    """Seconds of a fresh process's first Adam step, its imports included (``first_step_parts``)."""
    return sum(first_step_parts(impl, cache_dir, timeout))


def _speed_steps(cls, sizes, torch_mod, **kw):
    """One fastopt (numba) step and one torch fused step (None without torch) on the same data."""
    import fastopt as fo

    rng = np.random.default_rng(0)
    ps = [rng.standard_normal(n, dtype=np.float32) for n in sizes]
    gs = [rng.standard_normal(n, dtype=np.float32) * np.float32(1e-3) for n in sizes]
    nonfinite = kw.pop("nonfinite", "raise")
    opt = getattr(fo, cls)([p.copy() for p in ps], backend="numba", nonfinite=nonfinite, **kw)
    fo_step = functools.partial(opt.step, gs)
    if cls == "AdaHessian":  # its Hessian diagonal: |a second normal draw|
        fo_step = functools.partial(opt.step, gs, [np.abs(rng.standard_normal(n, dtype=np.float32))
                                                   for n in sizes])
    if torch_mod is None:
        return fo_step, None
    tp = [torch_mod.nn.Parameter(torch_mod.from_numpy(p)) for p in ps]
    for p, g in zip(tp, gs):
        p.grad = torch_mod.from_numpy(g)
    kw.pop("clip_global_norm", None)
    return fo_step, getattr(torch_mod.optim, cls)(tp, fused=True, **kw).step


def _set_wait_policy(policy):
    """Set ``OMP_WAIT_POLICY`` before an OpenMP runtime starts; returns the policy in effect.

    Numba's ``omp`` threading layer and torch each load an OpenMP runtime, which read
    the variable when they start: once numba has opened a parallel region or torch is
    imported, setting it changes nothing for that runtime (the result then says so).
    """
    if policy == "inherit":
        return os.environ.get("OMP_WAIT_POLICY", "unset")
    started = [m for m in ("torch", "numba.np.ufunc.omppool", "numba.np.ufunc.tbbpool",
                           "numba.np.ufunc.workqueue") if m in sys.modules]
    if started:
        return f"{os.environ.get('OMP_WAIT_POLICY', 'unset')} ({', '.join(started)} already loaded)"
    os.environ["OMP_WAIT_POLICY"] = policy
    return policy


def speed_table(n=16_777_216, threads=2, reps=15, torch=True, first_step=True, progress=False,
                wait_policy="passive"):
    """The CPU-speed rows (where users feel it: default step, small models, first call), each from one interleaved run.

    Every ratio is the median of per-pair ratios (``benchkit.pairwise``: the two
    sides timed back to back, alternating which goes first).  Rows: the read pass
    against a BLAS dot of the same bytes; Adam, SGD-momentum and Adagrad at ``n``
    elements with ``nonfinite="ignore"`` and with the default ``"raise"`` against
    torch's fused optimizers; Adam + ``clip_global_norm`` against plain Adam; the
    demo's MLP and 1000 x 256 tensors on one thread; AdaHessian against Adam; and
    (``first_step``) a fresh process's first Adam step with an empty and a warm
    kernel cache, beside torch's (the step's seconds, with the imports on a row of their
    own: ``first_step_parts``).  ``goal`` is the project's target bound on ``ratio`` (None:
    no bound; for the first step the bound is on the step's seconds).

    ``wait_policy``: ``OMP_WAIT_POLICY`` for both OpenMP runtimes of the process
    (``"inherit"``: as the environment has it).  Passive by default: with the
    default (active) policy an idle OpenMP thread spins for a while after each
    parallel region, and where the cores are shared (other processes, or the two
    runtimes of this process) the spinning threads take the cores from the working
    ones -- on a 2-core machine at load 7, a 4M-element Adam step took 20 ms with the
    active policy and 7 ms with the passive one, fastopt and torch alike.
    """
    policy = _set_wait_policy(wait_policy)
    from .benchkit import pairwise

    import numba

    from ..kernels import numba_cpu

    torch_mod = torch_module() if torch else None
    par = min(threads, numba.config.NUMBA_NUM_THREADS)

    def set_threads(k):
        numba.set_num_threads(min(k, numba.config.NUMBA_NUM_THREADS))
        if torch_mod is not None:
            torch_mod.set_num_threads(k)

    rows = []

    def add(case, fa, fb, peer, goal, r=reps):
        if fb is None:
            rows.append(dict(case=case, fastopt_s=measure(fa, min_time=0.05), peer=None,
                             peer_s=None, ratio=None, goal=goal))
            return
        a, b, ratio = pairwise(fa, fb, r)
        rows.append(dict(case=case, fastopt_s=a, peer=peer, peer_s=b, ratio=ratio, goal=goal))

    set_threads(par)
    big = f"{_fmt_size(n)}"
    g = [np.random.default_rng(0).standard_normal(n, dtype=np.float32)]
    read = functools.partial(numba_cpu.OPS.grad_stats, g, None, inv_scale=None, clip_value=None,
                             need_sumsq=False, check_finite=True)
    add(f"read pass (check) {big}", read, functools.partial(np.dot, g[0], g[0]), "BLAS dot",
        1 / 0.8)
    specs = [("Adam", {"lr": 1e-3}, 1.15), ("SGD", {"lr": 1e-3, "momentum": 0.9}, 1.2),
             ("Adagrad", {"lr": 1e-2}, 1.2)]
    names = {"Adam": "Adam", "SGD": "SGD-momentum", "Adagrad": "Adagrad"}
    for nonfinite in ("ignore", "raise"):
        for cls, kw, goal in specs:
            fa, fb = _speed_steps(cls, [n], torch_mod, nonfinite=nonfinite, **kw)
            label = "default" if nonfinite == "raise" else '"ignore"'
            add(f"{names[cls]} {label} {big}", fa, fb, "torch fused",
                goal if nonfinite == "raise" else None)
            if progress:
                print(f"  {rows[-1]['case']}", file=sys.stderr)
    fa, _ = _speed_steps("Adam", [n], None, lr=1e-3, clip_global_norm=1.0)
    fb, _ = _speed_steps("Adam", [n], None, lr=1e-3)
    add(f"Adam + clip_global_norm {big}", fa, fb, "fastopt Adam", 1.15)
    set_threads(1)
    try:
        for model, sizes in (("demo MLP (26,634)", DEMO_SIZES), ("1000 x 256", (256,) * 1000)):
            for nonfinite in ("raise", "ignore"):
                fa, fb = _speed_steps("Adam", sizes, torch_mod, nonfinite=nonfinite, lr=1e-3)
                label = "default" if nonfinite == "raise" else '"ignore"'
                add(f"{model} Adam {label}, 1 thread", fa, fb, "torch fused",
                    0.5 if nonfinite == "raise" else None, reps * 10)
    finally:
        set_threads(par)
    fb, _ = _speed_steps("Adam", [n], None, lr=1e-3, nonfinite="ignore")
    fa, _ = _speed_steps("AdaHessian", [n], None, lr=1e-3, nonfinite="ignore")
    add(f"AdaHessian {big} (32/28 B)", fa, fb, "fastopt Adam", None)
    first = None
    if first_step:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="fastopt-cold-") as tmp:
            cold = first_step_parts("fastopt", tmp)
            warm = first_step_parts("fastopt", tmp)
        peer = first_step_parts("torch") if torch_mod is not None else (None, None)
        # the goals are on the step (compile or cache load); the imports are shown apart
        first = dict(cold_s=cold[1], warm_s=warm[1], torch_s=peer[1], cold_goal_s=3.0,
                     warm_goal_s=0.1, import_s=warm[0], torch_import_s=peer[0])
    return {"n": n, "threads": par, "reps": reps, "load_avg": os.getloadavg()[0],
            "omp_wait_policy": policy, "rows": rows, "first_step": first}


def format_speed_table(res) -> str:
    """The ``--speed`` rows as text (``speed_table``'s result)."""
    lines = [f"numba backend, {res['threads']} threads (small models: 1), median of "
             f"{res['reps']} interleaved pairs, load average {res['load_avg']:.1f}, "
             f"OMP_WAIT_POLICY {res.get('omp_wait_policy', 'unset')}",
             f"{'case':44} {'fastopt':>10}  {'peer':14} {'peer time':>10}  {'ratio':>6}  goal"]
    for r in res["rows"]:
        peer = "-" if r["peer"] is None else r["peer"]
        pt = "-" if r["peer_s"] is None else _fmt_time(r["peer_s"])
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        goal = ""
        if r["goal"] is not None and r["ratio"] is not None:
            ok = "met" if r["ratio"] <= r["goal"] else "NOT met"
            goal = f"<= {r['goal']:.2f} {ok}"
        lines.append(f"{r['case']:44} {_fmt_time(r['fastopt_s']):>10}  {peer:14} {pt:>10}  "
                     f"{ratio:>6}  {goal}")
    f = res["first_step"]
    if f is not None:
        torch_s = "-" if f["torch_s"] is None else f"{f['torch_s']:.2f} s"
        for what, key, goal in (("cold cache", "cold_s", "cold_goal_s"),
                                ("warm cache", "warm_s", "warm_goal_s")):
            ok = "met" if f[key] <= f[goal] else "NOT met"
            lines.append(f"{'first Adam step, fresh process, ' + what:44} {f[key]:>8.2f} s  "
                         f"{'torch fused':14} {torch_s:>10}  {'':>6}  <= {f[goal]} s {ok}")
        if f.get("import_s") is not None:
            torch_i = "-" if f.get("torch_import_s") is None else f"{f['torch_import_s']:.2f} s"
            lines.append(f"{'its imports (fastopt + numba backend)':44} "
                         f"{f['import_s']:>8.2f} s  {'import torch':14} {torch_i:>10}")
    return "\n".join(lines)


def _cmd_bench(args) -> int:
    info = backend_info()
    cpu = [b for b in FASTOPT_IMPLS if info[b]["available"]]
    rules = _parse_list(args.rules, ELEMENTWISE_RULES, "rules")
    impls = _parse_list(args.backends, FASTOPT_IMPLS, "backends") if args.backends else cpu
    for b in impls:
        if not info[b]["available"]:
            print(f"backend {b!r} unavailable: {info[b]['reason']}", file=sys.stderr)
    impls = [b for b in impls if info[b]["available"]]
    if not impls:
        raise SystemExit("no available backend to benchmark")
    sizes = _parse_sizes(args.sizes)
    progress = not args.no_progress and sys.stderr.isatty()
    if args.muon_only:
        rules = []
    if args.speed:
        res = speed_table(int(args.speed_n), args.threads, args.reps, torch=not args.no_torch,
                          first_step=not args.no_first_step, progress=progress,
                          wait_policy=args.omp_wait_policy)
        print(json.dumps(res, indent=1) if args.json else format_speed_table(res))
        return 0
    if args.precision:
        res = run_precision_bench(torch=not args.no_torch, progress=progress,
                                  wait_policy=args.omp_wait_policy)
        print(json.dumps(res, indent=1) if args.json else format_precision_table(res))
        return 0
    result = run_bench(rules, impls, sizes, args.dtype, torch=not args.no_torch,
                       min_time=args.min_time, progress=progress) if rules else None
    muon = None
    if not args.muon_limit >= 0:  # NaN too
        raise SystemExit(f"--muon-limit: expected 0 (interleaved) or a positive factor, got "
                         f"{args.muon_limit}")
    if args.muon:
        muon = muon_vs_torch(args.muon, args.dtype, "numba" if "numba" in impls else impls[0],
                             rounds=args.muon_rounds, progress=progress,
                             torch_limit=args.muon_limit or None)
    if args.json:
        print(json.dumps({**(result or {}), "muon": muon}, indent=1))
    else:
        if result is not None:
            print(format_table(result))
        if muon is not None:
            print(format_muon(muon))
    if args.plot:
        plot(result, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def register(sub) -> None:
    """Add ``bench`` to the ``python -m fastopt`` subcommands."""
    p = sub.add_parser(
        "bench", help="time one optimizer step per rule, backend and size (a quick table)",
        description="Time one step of each rule on each backend and size, against NumPy's "
                    "in-place a += b bandwidth and torch.optim (fused/foreach) when installed. "
                    "'vs numpy' is the speedup over fastopt's plain NumPy backend. "
                    "For the full suite use asv (asv_bench/).")
    p.add_argument("--rules", default=",".join(DEFAULT_RULES),
                   help=f"comma-separated rules or 'all' (default: {','.join(DEFAULT_RULES)})")
    p.add_argument("--backends", default=None,
                   help="comma-separated backends (default: every available one)")
    p.add_argument("--sizes", default="1e3,1e6,1.6e7",
                   help="comma-separated element counts (default: 1e3,1e6,1.6e7)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--min-time", type=float, default=0.1,
                   help="seconds of timing per case, at least 3 runs (default: 0.1)")
    p.add_argument("--no-torch", action="store_true", help="do not time torch.optim")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead")
    p.add_argument("--precision", action="store_true",
                   help="instead: Adam on 16.7M elements with bfloat16 params (state in the "
                        "param dtype, bfloat16 state + stochastic rounding, float32 state) against "
                        "float32 Adam and torch fused Adam on bfloat16, one interleaved run")
    p.add_argument("--speed", action="store_true",
                   help="instead: the numba backend where users feel it: default "
                        "steps, small models, the read pass and the first step, beside torch")
    p.add_argument("--speed-n", type=float, default=16_777_216, metavar="N",
                   help="--speed: elements of the big-tensor rows (default: 16777216)")
    p.add_argument("--threads", type=int, default=2, help="--speed: threads (default: 2)")
    p.add_argument("--reps", type=int, default=15,
                   help="--speed: interleaved pairs per row (small models: 10x; default: 15)")
    p.add_argument("--no-first-step", action="store_true",
                   help="--speed: skip the fresh-process first-step rows")
    p.add_argument("--omp-wait-policy", choices=("passive", "active", "inherit"),
                   default="passive",
                   help="--speed, --precision: OMP_WAIT_POLICY for both OpenMP runtimes (numba's and torch's); "
                        "'inherit' leaves the environment as it is (default: passive, see "
                        "speed_table)")
    p.add_argument("--plot", metavar="FILE.png", help="also write a bar chart (needs matplotlib)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--muon", type=int, default=0, metavar="N",
                   help="also time one Muon step on an N x N matrix against torch.optim.Muon, "
                        "interleaved (e.g. 4096; default: off)")
    p.add_argument("--muon-rounds", type=int, default=3, metavar="K",
                   help="interleaved Muon steps of each (default: 3)")
    p.add_argument("--muon-only", action="store_true", help="the Muon row only (with --muon)")
    p.add_argument("--muon-limit", type=float, default=3.0, metavar="F",
                   help="--muon: run torch's step in a child process stopped after F times "
                        "fastopt's step (at least 1 s); if it has not finished, report "
                        "fastopt/torch < 1/F (an upper bound). 0: interleave both in this "
                        "process instead (default: 3)")
    p.set_defaults(func=_cmd_bench)
