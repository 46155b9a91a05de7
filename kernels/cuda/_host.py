"""Host side of the CUDA kernels: sources, multi-tensor tables, scalar packing, launches.

Everything here is plain NumPy and knows nothing of CuPy: a :class:`Device` adapter
supplies the array module, device addresses and the launch call.  ``fastopt.kernels.cupy_gpu``
runs it with a CuPy adapter on a GPU; the CPU harness in ``tests/`` runs the *same* code
with an adapter that launches the same ``.cu`` sources compiled as C++ (one thread per
block), so the table building and scalar packing below are tested without a GPU.

Kernel arguments are what ``cuLaunchKernel`` takes: a size-one NumPy array holding a C
struct (passed by value; CuPy does this for size-one ``numpy.ndarray`` arguments), a
``numpy.uint64`` device address, or a NumPy scalar of the declared C type.  Nothing is
passed as a Python float or int (CuPy would send a double or a long long).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import numpy as np

from ..._rules import RULES

# --------------------------------------------------------------------------- sources

SOURCES = ("update.cu", "reduce.cu")
NVRTC_OPTIONS = ()  # NVRTC's default dialect (C++17 in CUDA 12/13) is enough; C++14 would do
_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"[ \t]*$', re.M)


def source_of(kernel: str) -> str:
    """The source file (one RawModule) that defines an ``extern "C"`` kernel name."""
    return "update.cu" if kernel.startswith(("fo_update_", "fo_lamb_")) else "reduce.cu"


def read_source(name: str) -> str:
    """The text of a ``.cu``/``.cuh`` file with its local ``#include "..."`` inlined.

    CuPy's compile cache is keyed by the source string, which does not see included
    files; inlining them makes a header change a new key.
    """
    seen: set = set()

    def expand(fname):
        text = resources.files("fastopt.kernels.cuda").joinpath(fname).read_text()
        text = text.replace("#pragma once", "")

        def sub(m):
            inc = m.group(1)
            if inc in seen:
                return ""
            seen.add(inc)
            return f"// ---- {inc}\n{expand(inc)}\n// ---- end {inc}"

        return _INCLUDE.sub(sub, text)

    return expand(name)


# --------------------------------------------------------------------------- layouts

DEPTH = 6                 # FO_DEPTH
SLOT_PARAM, SLOT_GRAD, SLOT_STATE0, SLOT_EXTRA = 0, 1, 2, 5
MAX_TENSORS = 32          # FO_MAX_TENSORS
MAX_ITEMS = 256           # FO_MAX_ITEMS
NSCALARS = 16             # FO_NSCALARS
MAX_THREADS = 1024        # FO_MAX_THREADS

#: struct FoTable of fastopt.cuh
TABLE_DTYPE = np.dtype([
    ("ptr", np.uint64, (DEPTH, MAX_TENSORS)),
    ("size", np.int64, (MAX_TENSORS,)),
    ("chunk_base", np.int64, (MAX_TENSORS,)),
    ("chunk_size", np.int64),
    ("index", np.int32, (MAX_TENSORS,)),
    ("item_chunk", np.int32, (MAX_ITEMS,)),
    ("n_items", np.int32),
    ("item_slot", np.uint8, (MAX_ITEMS,)),
], align=True)

SUFFIX = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}
OPMATH = {np.dtype(np.float32): np.dtype(np.float32), np.dtype(np.float64): np.dtype(np.float64)}


@lru_cache(maxsize=None)
def hyper_dtype(opmath) -> np.dtype:
    """struct FoHyper<O>."""
    return np.dtype([("v", opmath, (NSCALARS,)), ("flags", np.int32)], align=True)


@lru_cache(maxsize=None)
def pipe_dtype(opmath) -> np.dtype:
    """struct FoPipe<O>."""
    return np.dtype([("inv_scale", opmath), ("clip_value", opmath), ("weight_clip", opmath),
                     ("flags", np.int32)], align=True)


MAXIMIZE, CLIP_VALUE, WEIGHT_CLIP = 1, 2, 4  # FO_MAXIMIZE, ...


def pack_hyper(opmath, values, flags=()) -> np.ndarray:
    """A FoHyper: ``values`` (host doubles) rounded once to the opmath type, flag bits in order."""
    h = np.zeros(1, hyper_dtype(opmath))
    h["v"][0, :len(values)] = np.asarray(values, dtype=np.float64).astype(opmath)
    h["flags"][0] = sum(1 << k for k, f in enumerate(flags) if f)
    return h


def pack_pipe(opmath, *, inv_scale=None, maximize=False, clip_value=None, weight_clip=None):
    p = np.zeros(1, pipe_dtype(opmath))
    p["inv_scale"][0] = 1.0 if inv_scale is None else inv_scale
    p["clip_value"][0] = 0.0 if clip_value is None else clip_value
    p["weight_clip"][0] = 0.0 if weight_clip is None else weight_clip
    p["flags"][0] = ((MAXIMIZE if maximize else 0) | (CLIP_VALUE if clip_value is not None else 0)
                     | (WEIGHT_CLIP if weight_clip is not None else 0))
    return p


# Each rule's kernel and host scalars, in the order its step function in update.cu reads
# them (the comment above each struct there lists the same names).
def _b(s):
    return s["beta1"], 1.0 - s["beta1"], s["beta2"], 1.0 - s["beta2"]


HYPER = {
    "sgd": ("sgd", lambda s: ((s["lr"], s["weight_decay"], s["momentum"], 1.0 - s["dampening"]),
                              (s["nesterov"], s["first_step"]))),
    "adam": ("adam", lambda s: ((*_b(s), s["eps"], s["weight_decay"], s["step_size"],
                                 s["bc2_sqrt"], s["decay"]), (s["amsgrad"], False))),
    "adamw": ("adam", lambda s: ((*_b(s), s["eps"], s["weight_decay"], s["step_size"],
                                  s["bc2_sqrt"], s["decay"]), (s["amsgrad"], True))),
    "adagrad": ("adagrad", lambda s: ((s["clr"], s["eps"], s["weight_decay"]), ())),
    "rmsprop": ("rmsprop", lambda s: ((s["lr"], s["alpha"], 1.0 - s["alpha"], s["eps"],
                                       s["weight_decay"], s["momentum"]), (s["centered"],))),
    "adadelta": ("adadelta", lambda s: ((s["lr"], s["rho"], 1.0 - s["rho"], s["eps"],
                                         s["weight_decay"]), ())),
    "adamax": ("adamax", lambda s: ((s["beta1"], 1.0 - s["beta1"], s["beta2"], s["eps"],
                                     s["weight_decay"], s["clr"]), ())),
    "nadam": ("nadam", lambda s: ((*_b(s), s["eps"], s["weight_decay"], s["bc2_sqrt"],
                                   s["c_grad"], s["c_avg"]), ())),
    "radam": ("radam", lambda s: ((*_b(s), s["eps"], s["weight_decay"], s["step_size"]),
                                  (s["rectify"],))),
    "lion": ("lion", lambda s: ((s["lr"], *_b(s), s["decay"]), ())),
    "lamb": ("lamb", lambda s: ((*_b(s), s["eps"], s["weight_decay"], s["bc1"], s["bc2_sqrt"],
                                 s["lr"]), ())),
    "adahessian": ("adahessian", lambda s: ((*_b(s), s["eps"], s["weight_decay"], s["step_size"],
                                             s["bc2_sqrt"], s["hessian_power"]), ())),
}

# --------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class Launch:
    """One multi-tensor launch: ``tensors[slot]`` = position in the list; items = (slot, chunk)."""

    tensors: tuple
    items: tuple


@dataclass(frozen=True)
class Plan:
    launches: tuple
    chunk_base: tuple   # per tensor: its first chunk's index in a partial-sum buffer
    total_chunks: int
    finalize: tuple     # launches with one item per non-empty tensor (fo_finalize_sums)


@lru_cache(maxsize=256)
def plan(sizes: tuple, chunk_size: int, max_tensors: int = MAX_TENSORS,
         max_items: int = MAX_ITEMS) -> Plan:
    """Split tensors of ``sizes`` elements into chunks and launches (multi_tensor_apply style).

    A launch closes when its slots or items are full; a tensor whose chunks do not fit
    continues in the next launch.  Zero-element tensors get no slot and no chunk.
    """
    if chunk_size <= 0 or chunk_size % 4:
        raise ValueError(f"chunk_size: expected a positive multiple of 4, got {chunk_size}")
    launches, tensors, items = [], [], []
    chunk_base, total = [], 0

    def close():
        nonlocal tensors, items
        if items:
            launches.append(Launch(tuple(tensors), tuple(items)))
        tensors, items = [], []

    for i, n in enumerate(sizes):
        chunk_base.append(total)
        if n == 0:
            continue
        n_chunks = -(-n // chunk_size)
        total += n_chunks
        for c in range(n_chunks):
            if not tensors or tensors[-1] != i:
                if len(tensors) == max_tensors:
                    close()
                tensors.append(i)
            items.append((len(tensors) - 1, c))
            if len(items) == max_items:
                close()  # the tensor's next chunk, if any, opens the next launch
    close()
    nonempty = [i for i, n in enumerate(sizes) if n > 0]
    finalize = tuple(
        Launch(tuple(nonempty[k:k + max_tensors]), tuple((j, 0) for j in range(len(nonempty[k:k + max_tensors]))))
        for k in range(0, len(nonempty), max_tensors))
    return Plan(tuple(launches), tuple(chunk_base), total, finalize)


def pack_table(launch: Launch, slots, sizes, chunk_base, chunk_size, ptr) -> np.ndarray:
    """The FoTable of one launch; ``slots[d]`` is a list of arrays (or None) for slot d."""
    t = np.zeros(1, TABLE_DTYPE)
    tab = t[0]
    for s, i in enumerate(launch.tensors):
        for d, arrays in enumerate(slots):
            if arrays is not None and arrays[i] is not None:
                tab["ptr"][d, s] = ptr(arrays[i])
        tab["size"][s] = sizes[i]
        tab["chunk_base"][s] = chunk_base[i]
        tab["index"][s] = i
    tab["chunk_size"] = chunk_size
    n = len(launch.items)
    tab["n_items"] = n
    if n:
        it = np.asarray(launch.items, dtype=np.int64)
        tab["item_slot"][:n] = it[:, 0]
        tab["item_chunk"][:n] = it[:, 1]
    return t


# --------------------------------------------------------------------------- the device


class Device:
    """What the launch code needs from a device; subclasses: CuPy, the CPU harness.

    ``chunk_size`` elements per work item, ``block`` threads per block, ``grid_cap`` the
    most blocks per launch (None: one block per item).
    """

    xp = None
    chunk_size = 65536
    block = 256
    grid_cap = None

    def ptr(self, a) -> int:
        raise NotImplementedError

    def launch(self, name: str, grid: int, block: int, args: tuple) -> None:
        raise NotImplementedError

    def to_host(self, a) -> np.ndarray:
        raise NotImplementedError

    def read_flag(self, a) -> bool:
        """A host read of a one-element device int32 array (the one sync of a checked step)."""
        return bool(self.to_host(a)[0])


def _addr(dev, a):
    return np.uint64(0 if a is None else dev.ptr(a))


class CudaBackend:
    """The kernels of every rule and the Ops primitives, over a :class:`Device`."""

    def __init__(self, dev: Device):
        self.dev = dev
        self.launches = 0  # launch counter (benchmarks report launches per step)

    # -- launching

    def _run(self, name, dtype, slots, sizes, args, *, tables=None, p=None):
        dev = self.dev
        p = p or plan(tuple(sizes), dev.chunk_size)
        kname = f"{name}_{SUFFIX[np.dtype(dtype)]}" if dtype is not None else name
        for ln in (p.launches if tables is None else tables):
            t = pack_table(ln, slots, sizes, p.chunk_base, dev.chunk_size, dev.ptr)
            grid = len(ln.items) if dev.grid_cap is None else min(len(ln.items), dev.grid_cap)
            dev.launch(kname, grid, dev.block, (t,) + tuple(args))
            self.launches += 1
        return p

    def _finalize(self, p, sizes, partial, out):
        self._run("fo_finalize_sums", None, [None] * DEPTH, sizes,
                  (_addr(self.dev, partial), _addr(self.dev, out)), tables=p.finalize, p=p)

    @staticmethod
    def _by_dtype(arrays):
        """Positions of ``arrays`` grouped by dtype (Ops lists may mix dtypes across a group)."""
        groups = {}
        for i, a in enumerate(arrays):
            groups.setdefault(np.dtype(a.dtype), []).append(i)
        return groups.items()

    def _pipe(self, dtype, pre):
        return pack_pipe(OPMATH[np.dtype(dtype)], inv_scale=pre.inv_scale, maximize=pre.maximize,
                         clip_value=pre.clip_value, weight_clip=pre.weight_clip)

    def _scales(self, pre, n):
        if pre.scales is None:
            return None
        return self.dev.xp.ascontiguousarray(pre.scales, dtype=np.float64).reshape(n)

    # -- the rules

    def update(self, rule, params, grads, states, scalars, pre, extras=None):
        """The ``fastopt._backend`` kernel contract for every rule (Newton: see :meth:`newton`)."""
        if not params:
            return
        if rule == "newton":
            return self.newton(params, grads, states, scalars, pre, extras)
        if rule == "lamb":
            return self.lamb(params, grads, states, scalars, pre)
        dtype = params[0].dtype
        opm = OPMATH[np.dtype(dtype)]
        kname, pack = HYPER[rule]
        values, flags = pack(scalars)
        slots = self._slots(rule, params, grads, states, extras)
        scales = self._scales(pre, len(params))
        self._run(f"fo_update_{kname}", dtype, slots, [p.size for p in params],
                  (pack_hyper(opm, values, flags), self._pipe(dtype, pre), _addr(self.dev, scales)))

    @staticmethod
    def _slots(rule, params, grads, states, extras):
        slots = [None] * DEPTH
        slots[SLOT_PARAM], slots[SLOT_GRAD] = params, grads
        for k, name in enumerate(RULES[rule].all_state):
            slots[SLOT_STATE0 + k] = states.get(name)
        slots[SLOT_EXTRA] = extras
        return slots

    def lamb(self, params, grads, states, scalars, pre):
        xp, dtype = self.dev.xp, params[0].dtype
        opm = OPMATH[np.dtype(dtype)]
        values, flags = HYPER["lamb"][1](scalars)
        h, pp = pack_hyper(opm, values, flags), self._pipe(dtype, pre)
        sizes = [p.size for p in params]
        slots = self._slots("lamb", params, grads, states, None)
        p = plan(tuple(sizes), self.dev.chunk_size)
        part_p = xp.empty(max(p.total_chunks, 1), dtype=np.float64)  # every chunk is written
        part_r = xp.empty_like(part_p)
        scales = self._scales(pre, len(params))
        self._run("fo_lamb_stage1", dtype, slots, sizes,
                  (h, pp, _addr(self.dev, scales), _addr(self.dev, part_p), _addr(self.dev, part_r)), p=p)
        p_sq = xp.zeros(len(params), dtype=np.float64)
        r_sq = xp.zeros_like(p_sq)
        self._finalize(p, sizes, part_p, p_sq)
        self._finalize(p, sizes, part_r, r_sq)
        slots[SLOT_GRAD] = None
        self._run("fo_lamb_stage2", dtype, slots, sizes,
                  (h, pp, _addr(self.dev, p_sq), _addr(self.dev, r_sq)), p=p)

    def newton(self, params, grads, states, s, pre, extras):
        """``p -= lr * solve(H + damping*I, g)`` per tensor with the array module's solver.

        Not a fused kernel: a dense n-by-n solve per tensor (SPEC: small problems).  The
        pipeline runs in the array module's element-wise ops, in the reference's order.
        """
        xp = self.dev.xp
        for i, (p, g) in enumerate(zip(params, grads)):
            g = g.copy()
            if pre.inv_scale is not None:
                g *= pre.inv_scale
            if pre.maximize:
                g = -g
            if pre.clip_value is not None:
                xp.clip(g, -pre.clip_value, pre.clip_value, out=g)
            if pre.scales is not None:
                g *= pre.scales[i].astype(p.dtype)  # stays on the device: no float()
            h = extras[i] * pre.inv_scale if pre.inv_scale is not None else extras[i]
            n = p.size
            a = h.reshape(n, n) + s["damping"] * xp.eye(n, dtype=p.dtype)
            p -= s["lr"] * xp.linalg.solve(a, g)
            if pre.weight_clip is not None:
                xp.clip(p, -pre.weight_clip, pre.weight_clip, out=p)

    # -- the Ops primitives

    def stats(self, arrays, *, inv_scale=None, clip_value=None, need_sumsq=True, flag=None):
        """Per-tensor float64 sums of squares of clip(a * inv_scale) (or None) on the device;
        sets ``flag[0] = 1`` where any a * inv_scale is non-finite (when a flag is given)."""
        xp = self.dev.xp
        out = xp.zeros(len(arrays), dtype=np.float64) if need_sumsq else None
        for dtype, idx in self._by_dtype(arrays):
            sub = [arrays[i] for i in idx]
            sizes = [a.size for a in sub]
            p = plan(tuple(sizes), self.dev.chunk_size)
            if not p.launches:
                continue
            part = xp.empty(p.total_chunks, dtype=np.float64) if need_sumsq else None
            pipe = pack_pipe(OPMATH[dtype], inv_scale=inv_scale, clip_value=clip_value)
            self._run("fo_stats", dtype, [sub] + [None] * (DEPTH - 1), sizes,
                      (pipe, _addr(self.dev, part), _addr(self.dev, flag)), p=p)
            if need_sumsq:
                sums = xp.zeros(len(sub), dtype=np.float64)
                self._finalize(p, sizes, part, sums)
                out[xp.asarray(idx)] = sums
        return out

    def scale_(self, arrays, factors):
        xp = self.dev.xp
        factors = xp.ascontiguousarray(factors, dtype=np.float64).reshape(len(arrays))
        for dtype, idx in self._by_dtype(arrays):
            sub = [arrays[i] for i in idx]
            f = factors if len(idx) == len(arrays) else factors[xp.asarray(idx)]
            self._run("fo_scale", dtype, [sub] + [None] * (DEPTH - 1), [a.size for a in sub],
                      (_addr(self.dev, f),))

    def clip_(self, arrays, c):
        for dtype, idx in self._by_dtype(arrays):
            sub = [arrays[i] for i in idx]
            self._run("fo_clip", dtype, [sub] + [None] * (DEPTH - 1), [a.size for a in sub],
                      (OPMATH[dtype].type(c),))


def make_ops(base, backend: CudaBackend, name: str):
    """An ``Ops`` instance named ``name`` over ``backend`` (``base``: fastopt._backend.Ops)."""

    class CudaOps(base):
        xp = backend.dev.xp

        def grad_stats(self, grads, extras, *, inv_scale, clip_value, need_sumsq, check_finite):
            xp = backend.dev.xp
            flag = xp.zeros(1, dtype=np.int32) if check_finite else None
            sumsq = backend.stats(grads, inv_scale=inv_scale, clip_value=clip_value,
                                  need_sumsq=need_sumsq, flag=flag)
            if check_finite and extras is not None:
                backend.stats(extras, need_sumsq=False, flag=flag)
            finite = (not backend.dev.read_flag(flag)) if check_finite else True
            return sumsq, finite

        def sumsq(self, arrays):
            return backend.stats(arrays)

        def scale_(self, arrays, factors):
            backend.scale_(arrays, factors)

        def clip_(self, arrays, c):
            backend.clip_(arrays, c)

        def to_host(self, array):
            return np.array(backend.dev.to_host(array), copy=True)

    CudaOps.name = name
    return CudaOps()
