"""CPU execution harness of the CUDA kernels: the .cu sources run as C++, no GPU needed.

The same source strings the CuPy loader hands to NVRTC (``_host.read_source``) are compiled
by g++ with ``tests/cuda_cpu/shim.h`` (``__global__``, ``threadIdx``, ... and a host launcher
per kernel) into one shared library per source file.  A ``Device`` adapter launches them
through ctypes with ONE thread per block and a chosen number of blocks, so the grid-stride
item loops, the scalar tails, the multi-tensor tables and the block reductions all run (a few
tests also run blocks of 3 and 8 threads, as std::threads meeting at a barrier, to exercise
the block-stride loops and the reduction tree).  The
host code is ``fastopt.kernels.cuda._host`` unchanged (the one ``cupy_gpu`` runs on a GPU):
tables, chunking, scalar packing.  Parity: every ``CASES`` entry, float32 and float64,
against the NumPy reference through the full optimizer pipeline (registered as a test-only
backend ``cudacpu``); 16-bit params (state dtypes, master weights, stochastic rounding) and q8
state bit for bit against the reference and the q8 definition; the nearest-code port against
``fastopt.quantization``.  Skips only without g++.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import replace

import numpy as np
import pytest

from _cases import CASE_IDS, CASES, SIZES, STEPS, TOL, assert_parity, assert_same_run, make_problem, run
from fastopt import _backend, _rules
from fastopt._optim import OPTIMIZERS
from fastopt._backend import Ops, Pre
from fastopt._rules import ELEMENTWISE, KERNEL_FLAGS, KERNEL_SCALARS, RULES, Rule
from fastopt.kernels.cuda import _host

HERE = os.path.dirname(os.path.abspath(__file__))
SHIM_DIR = os.path.join(HERE, "cuda_cpu")
CXXFLAGS = ["-std=c++20", "-pthread", "-O2", "-fPIC", "-shared", "-fno-strict-aliasing", "-Wall", "-Wextra",
            "-Werror", "-Wno-unknown-pragmas"]

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not on PATH")


def _translation_unit(src):
    text = '#include "shim.h"\n' + _host.read_source(src)
    if src == "update.cu":
        with open(os.path.join(SHIM_DIR, "layout.cpp")) as f:
            text += "\n" + f.read()
    return text


@pytest.fixture(scope="session")
def libs():
    """{source: ctypes.CDLL}, built once per session (in parallel) under a content-hash name."""
    with open(os.path.join(SHIM_DIR, "shim.h")) as f:
        shim = f.read()
    out_dir = os.path.join(tempfile.gettempdir(), f"fastopt-cuda-cpu-{os.getuid()}")
    os.makedirs(out_dir, exist_ok=True)
    procs, paths = [], {}
    for src in _host.SOURCES:
        tu = _translation_unit(src)
        key = hashlib.sha256((shim + tu + " ".join(CXXFLAGS)).encode()).hexdigest()[:16]
        so = os.path.join(out_dir, f"{src[:-3]}-{key}.so")
        paths[src] = so
        if not os.path.exists(so):
            # per-process names: two pytest workers may build the same source at once
            cpp = f"{so[:-3]}.{os.getpid()}.cpp"
            with open(cpp, "w") as f:
                f.write(tu)
            tmp = f"{so}.{os.getpid()}.tmp"
            procs.append((src, tmp, so, subprocess.Popen(
                ["g++", *CXXFLAGS, "-I", SHIM_DIR, "-o", tmp, cpp],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    for src, tmp, so, p in procs:
        out, _ = p.communicate()
        assert p.returncode == 0, f"g++ failed on {src}:\n{out}"
        os.replace(tmp, so)
    return {src: ctypes.CDLL(path) for src, path in paths.items()}


class CpuDevice(_host.Device):
    """Launches the g++-compiled kernels: blocks in order, ``block`` threads each (default 1)."""

    xp = np
    block = 1

    def __init__(self, libs, chunk_size=1024, grid_cap=None, block=1):
        self.libs, self.chunk_size, self.grid_cap, self.block = libs, chunk_size, grid_cap, block
        self.names = []

    def ptr(self, a):
        assert a.flags.c_contiguous
        return a.ctypes.data

    def launch(self, name, grid, block, args):
        fn = getattr(self.libs[_host.source_of(name)], "fo_cpu_" + name)
        bufs = []
        for a in args:  # what CuPy passes: size-one arrays by value, NumPy scalars as their type
            assert isinstance(a, (np.ndarray, np.generic)) and a.size == 1, type(a)
            bufs.append(np.array(a, copy=True))
        argv = (ctypes.c_void_p * len(bufs))(*[b.ctypes.data for b in bufs])
        assert 1 <= grid and block == self.block
        assert fn(ctypes.c_uint(grid), ctypes.c_uint(block), argv) == 0
        self.names.append(name)

    def to_host(self, a):
        return a


def register(monkeypatch, libs, name="cudacpu", **device_kw):
    """Register the harness as a backend ``name`` (undone by monkeypatch after the test)."""
    kernels = _host.CudaBackend(CpuDevice(libs, **device_kw))
    ops = _host.make_ops(Ops, kernels, name)
    monkeypatch.setitem(_backend.BACKEND_MODULES, name, "cupy_gpu")
    monkeypatch.setattr(_backend, "BACKEND_NAMES", _backend.BACKEND_NAMES + (name,))
    monkeypatch.setitem(_backend._OPS, name, ops)
    for rule in RULES:
        monkeypatch.setitem(_backend._KERNELS, (rule, name), functools.partial(kernels.update, rule))
    return kernels


# grid caps and chunk sizes cycle over the cases: one block for everything, a few blocks
# striding over items, one block per item; chunks from 64 elements (many launches) up
LAYOUTS = [dict(chunk_size=1024, grid_cap=None), dict(chunk_size=64, grid_cap=3),
           dict(chunk_size=4096, grid_cap=1), dict(chunk_size=512, grid_cap=64)]


def test_struct_layouts_match(libs):
    f = libs["update.cu"].fo_cpu_layout
    f.restype = ctypes.c_longlong
    t = _host.TABLE_DTYPE
    assert f(0) == t.itemsize
    for k, field in enumerate(["ptr", "size", "chunk_base", "chunk_size", "index", "item_chunk",
                               "n_items", "item_slot"], start=1):
        assert f(k) == t.fields[field][1], field
    for k, o in ((10, np.float32), (12, np.float64)):
        h = _host.hyper_dtype(np.dtype(o))
        assert (f(k), f(k + 1)) == (h.itemsize, h.fields["flags"][1])
    for k, o in ((20, np.float32), (22, np.float64)):
        pdt = _host.pipe_dtype(np.dtype(o))
        assert (f(k), f(k + 1)) == (pdt.itemsize, pdt.fields["flags"][1])
    assert (f(24), f(25)) == (_host.STORE_DTYPE.itemsize, _host.STORE_DTYPE.fields["flags"][1])
    assert (f(26), f(27), f(28)) == (_host.Q8_DTYPE.itemsize, _host.Q8_DTYPE.fields["absmax"][1],
                                     _host.Q8_DTYPE.fields["unsigned_mask"][1])
    assert [f(k) for k in range(30, 35)] == [_host.DEPTH, _host.MAX_TENSORS, _host.MAX_ITEMS,
                                             len(KERNEL_SCALARS), _host.MAX_THREADS]
    # the largest argument list stays under CUDA's 4 KiB of kernel parameters
    big = t.itemsize + _host.hyper_dtype(np.dtype(np.float64)).itemsize \
        + _host.pipe_dtype(np.dtype(np.float64)).itemsize + 3 * 8
    assert big <= 4096
    # ... and the longest of the 16-bit and q8 kernels (LAMB's q8 pass 2)
    q8 = t.itemsize + _host.hyper_dtype(np.dtype(np.float32)).itemsize \
        + _host.pipe_dtype(np.dtype(np.float32)).itemsize + 8 + _host.STORE_DTYPE.itemsize \
        + _host.Q8_DTYPE.itemsize + 4 * 8
    assert q8 <= 4096


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("k", range(len(CASES)), ids=CASE_IDS)
def test_parity(libs, monkeypatch, k, dtype):
    rule, options, _ = CASES[k]
    register(monkeypatch, libs, **LAYOUTS[(k + (dtype is np.float64)) % len(LAYOUTS)])
    assert_parity(rule, options, SIZES, dtype, "cudacpu")


@pytest.mark.parametrize("rule,options", [
    ("adam", {"lr": 1e-2, "amsgrad": True, "clip_global_norm": 0.5}),
    ("lamb", {"lr": 1e-2, "weight_decay": 0.01, "clip_norm": 0.5}),
    ("sgd", {"lr": 0.1, "momentum": 0.5, "clip_value": 0.2, "max_norm": 1.0, "maximize": True}),
    ("adahessian", {"lr": 0.1}),
], ids=["adam", "lamb", "sgd", "adahessian"])
def test_parity_many_tensors(libs, monkeypatch, rule, options):
    """70 tensors (three launches' worth of slots), zero-element ones among them."""
    rng = np.random.default_rng(1)
    sizes = [int(s) for s in rng.integers(0, 700, 70)]
    sizes[3] = sizes[40] = 0
    k = register(monkeypatch, libs, chunk_size=128, grid_cap=5)
    assert_parity(rule, options, sizes, np.float32, "cudacpu")
    assert k.launches > 3 * 7


@pytest.mark.parametrize("block", [3, 8])
@pytest.mark.parametrize("rule,options", [
    ("adam", {"lr": 1e-2, "clip_global_norm": 0.5, "max_norm": 2.0}),
    ("lamb", {"lr": 1e-2, "weight_decay": 0.01}),
], ids=["adam-globalnorm-maxnorm", "lamb"])
def test_parity_threaded_blocks(libs, monkeypatch, rule, options, block):
    """Several threads per block: packs spread over threads, the reduction tree over a
    non-power-of-two (3) and a power-of-two (8) block."""
    register(monkeypatch, libs, chunk_size=256, grid_cap=7, block=block)
    assert_parity(rule, options, (1, 7, 1029, 3001), np.float64, "cudacpu")


ELEMENTWISE_RULES = [name for name, r in RULES.items() if r.kind == ELEMENTWISE]


#: Schedule-Free interpolates y toward z, which starts as a copy of the param: inf - inf is nan
#: for an inf param (the schedulefree package's lerp makes the same nan), so no inf survives
INF_KEEPING_RULES = [r for r in ELEMENTWISE_RULES if not r.startswith("schedule_free")]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("rule", INF_KEEPING_RULES)
def test_inf_param_stays_inf_without_weight_decay(libs, monkeypatch, rule, dtype):
    """With weight_decay=0 an inf param stays inf, as in the reference: the L2 stage is skipped
    when l2 == 0 (0*inf would be nan) and decoupled decay multiplies by nothing. Infs sit in
    packed bodies and in scalar tails (chunks of 64, a 130-element tensor)."""
    register(monkeypatch, libs, chunk_size=64, grid_cap=2)
    params, grads, extras = make_problem(rule, (5, 130), dtype, seed=5, steps=2)
    params[0][[1, 4]] = np.inf
    params[1][[100, 129]] = -np.inf
    options = {"weight_decay": 0.0} if "weight_decay" in RULES[rule].defaults else {}
    want_p, want_sd = run(rule, options, params, grads, extras, "numpy")
    assert np.isposinf(want_p[0][[1, 4]]).all() and np.isneginf(want_p[1][[100, 129]]).all()
    got_p, got_sd = run(rule, options, params, grads, extras, "cudacpu")
    assert_same_run(want_p, want_sd, got_p, got_sd, dtype)  # inf and nan where the reference has them


@pytest.mark.parametrize("k", range(len(CASES)), ids=CASE_IDS)
def test_kernels_read_only_their_rules_scalars(libs, monkeypatch, k):
    """Every scalar slot a rule does not pack holds NaN and every flag bit it does not list is
    set: a kernel that read a scalar or flag missing from its Rule.pack / Rule.flags (or a
    stale slot constant) would leave the reference."""
    real_scalars, real_flags = Rule.kernel_scalars, Rule.kernel_flags

    def scalars(self, s):
        used = {_rules.KERNEL_SCALAR_SLOT[n] for n in self.pack + ("l2", "decay")}
        return [v if j in used else float("nan") for j, v in enumerate(real_scalars(self, s))]

    def flags(self, s):
        foreign = sum(1 << _rules.KERNEL_FLAG_BIT[n] for n in KERNEL_FLAGS if n not in self.flags)
        return real_flags(self, s) | foreign

    monkeypatch.setattr(Rule, "kernel_scalars", scalars)
    monkeypatch.setattr(Rule, "kernel_flags", flags)
    rule, options, _ = CASES[k]
    register(monkeypatch, libs, chunk_size=64, grid_cap=3)
    assert_parity(rule, options, (1, 3, 7) if rule == "newton" else (1, 7, 300), np.float64, "cudacpu")


def test_kernel_names_follow_the_rule_kind(libs, monkeypatch):
    """Dispatch reads Rule.kind and Rule.name: per step, one fo_update_<rule> launch for an
    elementwise rule, fo_trust_stage1/2_<rule> around the norm sums for a trust-ratio rule,
    none for a dense solve or an orthogonalization (array-module ops and matmul)."""
    k = register(monkeypatch, libs, chunk_size=1024)
    for name, r in RULES.items():
        k.dev.names.clear()
        assert_parity(name, {}, (1, 3, 7) if r.kind == "dense_solve" else (1, 7), np.float64, "cudacpu")
        rule_launches = [n for n in k.dev.names if n.startswith(("fo_update_", "fo_trust_"))]
        want = {"elementwise": [f"fo_update_{name}_f64"],
                "trust_ratio": [f"fo_trust_stage1_{name}_f64", f"fo_trust_stage2_{name}_f64"],
                "dense_solve": [], "orthogonalize": [], "factored": []}[r.kind]
        assert rule_launches == want * STEPS, name


def test_update_refuses_what_it_cannot_run(libs):
    """An unknown kind, or a trust-ratio rule with an L2 or decoupled stage (pass 1 does not
    write the param): a clear error, and nothing written."""
    k = _host.CudaBackend(CpuDevice(libs))
    rng = np.random.default_rng(6)
    p, g = rng.standard_normal(9), rng.standard_normal(9)
    st = {"exp_avg": [np.zeros(9)], "exp_avg_sq": [np.zeros(9)]}
    before = p.copy()
    lamb = RULES["lamb"]
    s, _ = lamb.step_scalars({**lamb.defaults, "weight_decay": 0.1}, 1, {})
    for bad, err, match in ((replace(lamb, weight_decay="decoupled"), NotImplementedError, "weight_decay"),
                            (replace(lamb, weight_decay="l2"), NotImplementedError, "weight_decay"),
                            (replace(RULES["adam"], kind="banded"), ValueError, "rule.kind")):
        with pytest.raises(err, match=match):
            k.update(bad, [p], [g], st, s, Pre())
    np.testing.assert_array_equal(p, before)
    assert not st["exp_avg"][0].any() and k.launches == 0
    with pytest.raises(ValueError, match=f"values: expected the {len(KERNEL_SCALARS)} kernel scalars"):
        _host.pack_hyper(np.float32, [0.1, 0.9])


@pytest.mark.parametrize("mode", ["skip", "raise"])
def test_nonfinite(libs, monkeypatch, mode):
    from fastopt import Adam

    register(monkeypatch, libs, chunk_size=64, grid_cap=2)
    rng = np.random.default_rng(2)
    params = [rng.standard_normal(n).astype(np.float32) for n in (5, 300, 17)]
    before = [p.copy() for p in params]
    opt = Adam(params, lr=0.1, nonfinite=mode, backend="cudacpu")
    grads = [np.ones_like(p) for p in params]
    grads[1][257] = np.inf
    if mode == "raise":
        with pytest.raises(FloatingPointError):
            opt.step(grads)
    else:
        assert opt.step(grads).skipped
        assert opt.step_count == 0
    for p, b in zip(params, before):
        np.testing.assert_array_equal(p, b)
    grads[1][257] = 1.0
    assert not opt.step(grads).skipped
    assert not np.array_equal(params[1], before[1])


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_unaligned_views_take_the_scalar_path(libs, monkeypatch, dtype):
    """Arrays offset by one element from a 16-byte boundary: no packed loads, same numbers."""
    k = register(monkeypatch, libs, chunk_size=256, grid_cap=4)
    rng = np.random.default_rng(3)
    n = 1001
    bufs = {name: rng.standard_normal(n + 1).astype(dtype) for name in ("p", "g", "m", "v")}
    bufs["v"] = np.abs(bufs["v"])
    views = {name: b[1:] for name, b in bufs.items()}
    assert views["p"].ctypes.data % 16 != 0
    want = {name: v.copy() for name, v in views.items()}
    scalars, _ = RULES["adam"].step_scalars({**RULES["adam"].defaults, "lr": 0.01}, 3, {})
    pre = Pre(inv_scale=0.5, clip_value=0.7, maximize=True, weight_clip=1.5,
              scales=np.array([0.8]))
    _backend.get_kernel("adam", "numpy")([want["p"]], [want["g"]],
                                          {"exp_avg": [want["m"]], "exp_avg_sq": [want["v"]]},
                                          scalars, pre)
    k.update("adam", [views["p"]], [views["g"]],
             {"exp_avg": [views["m"]], "exp_avg_sq": [views["v"]]}, scalars, pre)
    for name in ("p", "m", "v"):
        np.testing.assert_allclose(views[name], want[name], **TOL[np.dtype(dtype)])


def test_ops_match_reference(libs, monkeypatch):
    """grad_stats (inv_scale, clip, non-finite flag on grads and extras), sumsq, scale_, clip_,
    on a list that mixes dtypes and holds an empty tensor."""
    k = register(monkeypatch, libs, chunk_size=64, grid_cap=3)
    ops, ref = _backend.get_ops("cudacpu"), _backend.get_ops("numpy")
    rng = np.random.default_rng(4)
    arrays = [rng.standard_normal(n).astype(dt) * 3
              for n, dt in ((300, np.float32), (0, np.float32), (1, np.float64), (1029, np.float64))]
    kw = dict(inv_scale=0.25, clip_value=0.5, need_sumsq=True, check_finite=True)
    got, finite = ops.grad_stats(arrays, None, **kw)
    want, _ = ref.grad_stats(arrays, None, **kw)
    assert finite and got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-12)
    extras = [a.copy() for a in arrays]
    extras[3][1000] = np.nan
    assert ops.grad_stats(arrays, extras, **kw)[1] is False
    bad = [a.copy() for a in arrays]
    bad[0][299] = -np.inf
    assert ops.grad_stats(bad, None, **{**kw, "need_sumsq": False}) == (None, False)
    np.testing.assert_allclose(ops.sumsq(arrays), ref.sumsq(arrays), rtol=1e-12)
    factors = np.array([0.5, 2.0, 3.0, 0.1])
    a1, a2 = [a.copy() for a in arrays], [a.copy() for a in arrays]
    ops.scale_(a1, factors)
    ref.scale_(a2, factors)
    ops.clip_(a1, 0.3)
    ref.clip_(a2, 0.3)
    for x, y in zip(a1, a2):
        np.testing.assert_array_equal(x, y)
    assert set(k.dev.names) >= {"fo_stats_f32", "fo_stats_f64", "fo_finalize_sums",
                                "fo_scale_f32", "fo_clip_f64"}


def test_plan_covers_every_chunk_once():
    sizes = (0, 5, 4096 * 300 + 1, 0, 17, *range(1, 60))
    p = _host.plan(sizes, 4096)
    seen = []
    for ln in p.launches:
        assert len(ln.tensors) <= _host.MAX_TENSORS and len(ln.items) <= _host.MAX_ITEMS
        assert all(sizes[i] > 0 for i in ln.tensors)
        seen += [(ln.tensors[s], c) for s, c in ln.items]
    want = [(i, c) for i, n in enumerate(sizes) for c in range(-(-n // 4096))]
    assert seen == want and p.total_chunks == len(want)
    for i, n in enumerate(sizes):  # chunk_base: a prefix sum over non-empty tensors
        assert p.chunk_base[i] == sum(-(-m // 4096) for m in sizes[:i])
    fin = [i for ln in p.finalize for i in ln.tensors]
    assert fin == [i for i, n in enumerate(sizes) if n]


def test_plan_of_a_tensor_past_2_31_elements():
    """Chunk numbers stay small and element offsets are 64-bit in the table."""
    n = 2**31 + 4099
    p = _host.plan((7, n), 65536)
    items = [it for ln in p.launches for it in ln.items]
    assert len(items) == 1 + -(-n // 65536)
    last = p.launches[-1]
    t = _host.pack_table(last, [[None, None]] + [None] * 5, (7, n), p.chunk_base, 65536, lambda a: 0)
    slot, chunk = last.items[-1]
    assert t["size"][0][slot] == n
    assert int(t["item_chunk"][0][len(last.items) - 1]) * 65536 < n <= (chunk + 1) * 65536
    assert t.dtype.fields["size"][0].base == np.int64


def test_sources_inline_their_headers():
    for src in _host.SOURCES:
        text = _host.read_source(src)
        assert "#include \"" not in text and "struct FoTable" in text


def test_scalar_slots_come_from_the_rule_vocabulary(monkeypatch):
    """The slot and bit constants are generated from fastopt._rules into the source string,
    so the vocabulary has one list of positions and CuPy's cache key follows it."""
    text = _host.read_source("update.cu")
    assert f"#define FO_NSCALARS {len(KERNEL_SCALARS)}" in text
    for k, name in enumerate(KERNEL_SCALARS):
        assert f"FO_S_{name.upper()} = {k}," in text or f"FO_S_{name.upper()} = {k}\n" in text
    for k, name in enumerate(KERNEL_FLAGS):
        assert f"FO_F_{name.upper()} = {k}," in text or f"FO_F_{name.upper()} = {k}\n" in text
    for name, r in RULES.items():  # each rule's decay stage, for fo_update's compile-time choice
        assert f"#define FO_DECAY_OF_{name} FO_DECAY_{str(r.weight_decay).upper()}\n" in text
    kernel_dir = os.path.dirname(_host.__file__)
    for fname in sorted(os.listdir(kernel_dir)):
        if fname.endswith((".cu", ".cuh")):
            with open(os.path.join(kernel_dir, fname)) as f:
                raw = f.read()
            # no position of its own: no slot constant defined, no scalar read by a number
            assert not re.search(r"FO_[SF]_[A-Z0-9_]+\s*=", raw), fname
            assert not re.search(r"\.v\[\s*\d", raw), fname
    monkeypatch.setattr(_rules, "KERNEL_SCALARS", KERNEL_SCALARS[1:] + KERNEL_SCALARS[:1] + ("new",))
    moved = _host.read_source("update.cu")
    assert moved != text and f"#define FO_NSCALARS {len(KERNEL_SCALARS) + 1}" in moved
    assert _host.hyper_dtype(np.float32)["v"].shape == (len(KERNEL_SCALARS) + 1,)


# ------------------------------------------------------------------ 16-bit params (mixed)
# The harness computes in float32 exactly as the reference does (g++ on x86-64 contracts no
# FMA; every scalar is rounded once on the host), and each write is rounded once by the
# same integer recipes, so a 16-bit run agrees with the reference BIT FOR BIT: params,
# states and masters, stochastic rounding included. (On a GPU nvcc fuses multiply-adds: there
# tests/test_cuda_gpu.py compares within TOL.)

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
F16, F32 = np.dtype(np.float16), np.dtype(np.float32)
REDUCED_RULES = [name for name, r in RULES.items()
                 if r.kind not in ("dense_solve", "orthogonalize", "factored")]
FIRST_CASE = {rule: options for rule, options, _ in reversed(CASES)}

#: the covering design: param dtype x state {f32, param, bf16} x master x SR x grad dtype,
#: each row run for every rule (float32 params with bfloat16 state last)
PRECISIONS = [
    (F16, {}, False),
    (F16, {"state_dtype": "param"}, False),
    (F16, {"state_dtype": "bfloat16", "master_weights": True}, True),
    (F16, {"master_weights": True}, False),
    (BF16, {"stochastic_rounding": True, "seed": 7}, False),
    (BF16, {"state_dtype": "param", "stochastic_rounding": True, "seed": 2**64 - 3}, True),
    (BF16, {"state_dtype": "bfloat16", "master_weights": True}, False),
    (BF16, {"state_dtype": "bfloat16"}, True),
    (BF16, {}, False),
    (F32, {"state_dtype": "bfloat16"}, False),
]
PREC_IDS = [f"{dt.name}-{'-'.join(f'{k}={v}' for k, v in o.items()) or 'default'}{'-g32' if g else ''}"
            for dt, o, g in PRECISIONS]


def _problem16(rule, sizes, dtype, grad_f32, seed=0):
    params, grads, extras = make_problem(rule, sizes, np.float32, seed)
    params = [p.astype(dtype) for p in params]
    gdt = F32 if grad_f32 else dtype
    grads = [[g.astype(gdt) for g in gs] for gs in grads]
    extras = [[None if e is None else e.astype(gdt) for e in es] for es in extras]
    return params, grads, extras


def _bits(a):
    a = np.ascontiguousarray(a)
    return a.view(np.uint8).reshape(-1)


def assert_bit_identical(want_p, want_sd, got_p, got_sd):
    for i, (w, g) in enumerate(zip(want_p, got_p)):
        assert g.dtype == w.dtype, f"params[{i}]"
        np.testing.assert_array_equal(_bits(g), _bits(w), err_msg=f"params[{i}] bits")
    assert got_sd["step_count"] == want_sd["step_count"]
    assert set(got_sd["state"]) == set(want_sd["state"])
    for i, st_ in want_sd["state"].items():
        assert set(got_sd["state"][i]) == set(st_), f"state[{i}]: names"
        for name, w in st_.items():
            g = np.asarray(got_sd["state"][i][name])
            assert g.dtype == np.asarray(w).dtype, f"state[{i}][{name}]"
            np.testing.assert_array_equal(_bits(g), _bits(w), err_msg=f"state[{i}][{name}] bits")


@pytest.mark.parametrize("prec", range(len(PRECISIONS)), ids=PREC_IDS)
@pytest.mark.parametrize("rule", REDUCED_RULES)
def test_parity_16bit_bit_exact(libs, monkeypatch, rule, prec):
    dtype, popts, grad_f32 = PRECISIONS[prec]
    k = register(monkeypatch, libs, **LAYOUTS[(prec + len(rule)) % len(LAYOUTS)])
    options = {**FIRST_CASE[rule], **popts}
    params, grads, extras = _problem16(rule, (1, 7, 1029, 3001), dtype, grad_f32, seed=prec)
    want = run(rule, options, params, grads, extras, "numpy")
    got = run(rule, options, params, grads, extras, "cudacpu")
    if options.get("hessian_power", 1) != 1:
        # (sqrt(v)/c)**k: C's powf and NumPy's float32 power may differ in the last bit, which
        # a float32 master or state keeps: the one place 16-bit parity needs TOL
        assert_same_run(*want, *got, dtype)
    else:
        assert_bit_identical(*want, *got)
    suf = f"{_host.suffix(dtype)}_{_host.suffix(popts.get('state_dtype', 'float32').replace('param', dtype.name))}"
    assert any(n.endswith(suf) for n in k.dev.names), (suf, set(k.dev.names))


@pytest.mark.parametrize("rule,options", [
    ("adam", {"lr": 1e-2, "clip_global_norm": 0.5, "max_norm": 2.0, "weight_clip": 1.5,
              "clip_value": 1.0, "maximize": True}),
    ("lamb", {"lr": 1e-2, "weight_decay": 0.01, "max_norm": 3.0, "clip_norm": 0.5}),
    ("sgd", {"lr": 0.1, "momentum": 0.5, "max_norm": 1.0, "weight_decay": 0.01}),
], ids=["adam", "lamb", "sgd"])
@pytest.mark.parametrize("popts", [{"stochastic_rounding": True, "seed": 5},
                                   {"state_dtype": "bfloat16", "master_weights": True}],
                         ids=["sr", "bf16state-master"])
def test_parity_16bit_pipeline(libs, monkeypatch, rule, options, popts):
    """max_norm acts in float32 before the one rounding (a dry norm pass, then the write),
    grad_scale unscales bfloat16 grads in float32, norm clips read the 16-bit grads."""
    register(monkeypatch, libs, chunk_size=256, grid_cap=3)
    params, grads, extras = _problem16(rule, (5, 700, 2051), BF16, False, seed=3)
    scaled = [[(g.astype(np.float32) * 64).astype(BF16) for g in gs] for gs in grads]
    kw = {**options, **popts}

    def run_scaled(backend):
        ps = [p.copy() for p in params]
        opt = OPTIMIZERS[rule](ps, backend=backend, **kw)
        for g in scaled:
            opt.step(g, grad_scale=64.0)
        return ps, opt.state_dict()

    assert_bit_identical(*run_scaled("numpy"), *run_scaled("cudacpu"))


@pytest.mark.parametrize("block", [3, 8])
def test_parity_16bit_threaded_blocks(libs, monkeypatch, block):
    """Several threads per block (the element stride of the mixed loop, the dry norm pass)."""
    register(monkeypatch, libs, chunk_size=256, grid_cap=5, block=block)
    for rule, options in (("adam", {"lr": 1e-2, "max_norm": 2.0}), ("lamb", {"lr": 1e-2})):
        params, grads, extras = _problem16(rule, (1, 1029, 3001), BF16, False, seed=4)
        kw = {**options, "stochastic_rounding": True, "seed": 1}
        assert_bit_identical(*run(rule, kw, params, grads, extras, "numpy"),
                             *run(rule, kw, params, grads, extras, "cudacpu"))


def test_16bit_grad_stats_see_float16_overflow(libs, monkeypatch):
    """The read pass unscales a float16 grad in float32: an inf that float16 produced is seen,
    and a large scaled grad that is finite in float32 is not called inf."""
    register(monkeypatch, libs, chunk_size=64, grid_cap=2)
    ops, ref = _backend.get_ops("cudacpu"), _backend.get_ops("numpy")
    g = (np.random.default_rng(0).standard_normal(300) * 3e3).astype(np.float16)
    kw = dict(inv_scale=1 / 1024, clip_value=None, need_sumsq=True, check_finite=True)
    got, finite = ops.grad_stats([g], None, **kw)
    want, _ = ref.grad_stats([g], None, **kw)
    assert finite
    np.testing.assert_allclose(got, want, rtol=1e-12)
    g[17] = np.inf
    assert ops.grad_stats([g], None, **kw)[1] is False


def test_cupy_ops_list_the_reduced_dtypes(libs, monkeypatch):
    register(monkeypatch, libs)
    ops = _backend.get_ops("cudacpu")
    assert {"float16", "bfloat16"} <= set(ops.dtypes) and ops.precision_options and ops.q8_dtypes


# ------------------------------------------------------------------ q8 state
from fastopt import precision as fprec  # noqa: E402
from fastopt import quantization as quant  # noqa: E402
from fastopt.precision import Precision  # noqa: E402

# a rule whose state cannot be 8-bit (Rule.q8_state_refused: Schedule-Free's z) has no q8 kernel
Q8_RULES = [r for r in REDUCED_RULES if not RULES[r].q8_state_refused]


def _q8_problem(rule, sizes, dtype, seed, master=False):
    """Params, grads/extras for 4 steps and q8 states: codes + absmax quantized from random
    states (non-negative for the unsigned-map states), with all-zero and adversarial blocks."""
    r = RULES[rule]
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    feed = []
    for _ in range(4):
        gs = [rng.standard_normal(n).astype(np.float32) for n in sizes]
        es = [np.abs(rng.standard_normal(n)).astype(np.float32) for n in sizes] if r.extra else None
        feed.append((gs, es))
    hp = {**r.defaults, **FIRST_CASE[rule], **({"momentum": 0.9, "weight_decay": 0.01} if rule == "sgd" else {})}
    names = [n for n, _ in r.state(hp)]
    states = {}
    for name in names:
        signed = name not in r.nonnegative_state
        codes, absmax = [], []
        for n in sizes:
            x = rng.standard_normal(n).astype(np.float32) * np.float32(0.1)
            if not signed:
                x = np.abs(x) * x  # small squares, many near the map's dense end
            if n > 256:
                x[:256] = 0  # an all-zero block
            if n > 600:  # adversarial: a block of tiny values of both signs, one huge
                x[512:600] = np.float32(1e-30) * rng.standard_normal(88).astype(np.float32)
                x[599] = np.float32(3.0)
            c, a = quant.quantize_blockwise(x, signed)
            codes.append(c)
            absmax.append(a)
        states[name] = codes
        states[name + "_absmax"] = absmax
    if master:
        states["master"] = [p.copy() for p in params]
    params = [p.astype(dtype) for p in params]
    return params, feed, states, hp


def _q8_reference_step(rule, params, grads, states, s, pre, extras):
    """The definition of one q8 step (docs/design.md): dequantize every q8 state, the float32
    reference step, quantize the new states."""
    r = RULES[rule]
    st32 = {}
    for name in r.all_state:
        if name in states:
            signed = name not in r.nonnegative_state
            st32[name] = [quant.dequantize_blockwise(c, a, signed)
                          for c, a in zip(states[name], states[name + "_absmax"])]
    if "master" in states:
        st32["master"] = states["master"]
    prec = replace(pre.precision, state=F32)
    _backend.get_kernel(rule, "numpy")(params, grads, st32, s, replace(pre, precision=prec), extras)
    for name in r.all_state:
        if name in states:
            signed = name not in r.nonnegative_state
            for i, x in enumerate(st32[name]):
                states[name][i][...], states[name + "_absmax"][i][...] = quant.quantize_blockwise(x, signed)


def _copy_states(states):
    return {k: [a.copy() for a in v] for k, v in states.items()}


def _run_q8(rule, impl, params, feed, states, hp, pre):
    params = [p.copy() for p in params]
    states = _copy_states(states)
    gstate = dict(RULES[rule].group_state)
    for t, (gs, es) in enumerate(feed, start=1):
        s, gstate = RULES[rule].step_scalars(hp, t, gstate)
        impl(params, gs, states, s, replace(pre, step=t), es)
    return params, states


@pytest.mark.parametrize("dtype,popts", [
    (F32, {}), (BF16, {"stochastic_rounding": True, "seed": 9}), (F16, {"master_weights": True}),
    (BF16, {"master_weights": True}),
], ids=["f32", "bf16-sr", "f16-master", "bf16-master"])
@pytest.mark.parametrize("rule", Q8_RULES)
def test_q8_parity_bit_exact(libs, rule, dtype, popts):
    """Every rule's q8 kernel against the definition: codes, absmax and params bit for bit
    over 4 steps; sizes with partial last blocks, an all-zero block, tiny-and-huge blocks."""
    sizes = (1, 7, 255, 700, 1029)
    master = popts.get("master_weights", False)
    params, feed, states, hp = _q8_problem(rule, sizes, dtype, seed=len(rule), master=master)
    prec = Precision(param=dtype, compute=F32, state=fprec.Q8, master_weights=master,
                     stochastic_rounding=popts.get("stochastic_rounding", False), seed=popts.get("seed", 0))
    pre = Pre(precision=prec, clip_value=2.0, weight_clip=3.0, inv_scale=0.5)
    want_p, want_s = _run_q8(rule, functools.partial(_q8_reference_step, rule), params, feed, states, hp, pre)
    k = _host.CudaBackend(CpuDevice(libs, chunk_size=512, grid_cap=3))
    got_p, got_s = _run_q8(rule, functools.partial(k.update, rule), params, feed, states, hp, pre)
    for i, (w, g) in enumerate(zip(want_p, got_p)):
        np.testing.assert_array_equal(_bits(g), _bits(w), err_msg=f"params[{i}]")
    assert set(got_s) == set(want_s)
    for name in want_s:
        for i, (w, g) in enumerate(zip(want_s[name], got_s[name])):
            np.testing.assert_array_equal(_bits(g), _bits(w), err_msg=f"{name}[{i}]")
    assert all(n.startswith(("fo_q8_", "fo_finalize")) for n in k.dev.names)


@pytest.mark.parametrize("block", [1, 3, 8])
@pytest.mark.parametrize("rule,options", [("adam", {"max_norm": 1.5, "amsgrad": True}),
                                          ("lamb", {"max_norm": 4.0}), ("rmsprop", {"centered": True,
                                                                                    "momentum": 0.9}),
                                          ("lars", {"max_norm": 4.0, "nesterov": True,
                                                    "weight_decay": 0.01})],
                         ids=["adam-maxnorm-amsgrad", "lamb-maxnorm", "rmsprop-3-states",
                              "lars-maxnorm-nesterov"])
def test_q8_parity_threaded_and_max_norm(libs, rule, options, block):
    """Several threads per block (the absmax block reduction and the requantize stride) and
    max_norm's dry pass, LAMB's two passes with three."""
    sizes = (3, 513, 1100)
    params, feed, states, hp = _q8_problem(rule, sizes, BF16, seed=block)
    hp = {**hp, **{k: v for k, v in options.items() if k != "max_norm"}}
    if options.get("amsgrad") or options.get("centered") or options.get("momentum"):
        r = RULES[rule]
        for name, _ in r.state(hp):
            if name not in states:
                signed = name not in r.nonnegative_state
                states[name] = [np.full(n, quant.zero_code(signed), np.uint8) for n in sizes]
                states[name + "_absmax"] = [np.zeros(-(-n // 256), np.float32) for n in sizes]
    prec = Precision(param=BF16, compute=F32, state=fprec.Q8, master_weights=False,
                     stochastic_rounding=True, seed=4)
    pre = Pre(precision=prec, max_norm=options.get("max_norm"), scales=np.array([0.5, 1.0, 0.25]))
    want = _run_q8(rule, functools.partial(_q8_reference_step, rule), params, feed, states, hp, pre)
    k = _host.CudaBackend(CpuDevice(libs, chunk_size=256, grid_cap=2, block=block))
    got = _run_q8(rule, functools.partial(k.update, rule), params, feed, states, hp, pre)
    for w, g in zip(want[0], got[0]):
        np.testing.assert_array_equal(_bits(g), _bits(w))
    for name in want[1]:
        for w, g in zip(want[1][name], got[1][name]):
            np.testing.assert_array_equal(_bits(g), _bits(w), err_msg=name)


def _nearest_code_inputs():
    """float32 values for the port of nearest_code: a sampled sweep of bit patterns over
    [2**-30, 2) of both signs, every threshold and its two float32 neighbours, the map's own
    entries, zeros, subnormals, 1, inf, NaN."""
    rng = np.random.default_rng(12)
    sweep = np.arange(0x30800000, 0x40000000, 97, dtype=np.uint32).view(np.float32)
    out = [sweep, -sweep, rng.standard_normal(4096).astype(np.float32)]
    for signed in (True, False):
        t = quant.code_thresholds(signed)
        out += [t, np.nextafter(t, np.float32(np.inf)), np.nextafter(t, np.float32(-np.inf)),
                quant.dynamic_map(signed)]
    out.append(np.array([0.0, -0.0, 1e-45, -1e-45, 1.17e-38, -1.17e-38, 1.0, -1.0, 0.99999994,
                         np.inf, -np.inf, np.nan], dtype=np.float32))
    return np.concatenate(out).astype(np.float32)


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_q8_nearest_code_port_equals_the_reference(libs, signed):
    """fo_nearest_code against fastopt.quantization.nearest_code on every input above: blocks
    of 255 values and one 1.0, so the block's absmax is 1 and y is the value itself."""
    y = _nearest_code_inputs()
    y = y[np.isfinite(y) & (np.abs(y) <= 1)]
    pad = -len(y) % 255
    y = np.concatenate([y, np.zeros(pad, np.float32)]).reshape(-1, 255)
    x = np.ascontiguousarray(np.concatenate([y, np.ones((len(y), 1), np.float32)], axis=1).reshape(-1))
    k = _host.CudaBackend(CpuDevice(libs, grid_cap=64))
    codes, absmax = k.quantize(x, signed)
    assert (absmax == 1).all()
    want = quant.nearest_code(x, signed)
    if signed:
        want[(x < 0) & (want == 127)] = 126
    np.testing.assert_array_equal(codes, want)


@pytest.mark.parametrize("block", [1, 8])
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_q8_device_quantize_equals_quantize_blockwise(libs, signed, block):
    """Whole blocks: absmax (NaN and inf blocks included), partial last block, zero block."""
    x = _nearest_code_inputs() * np.float32(3.5)
    x = np.concatenate([x, np.zeros(256, np.float32), np.full(3, -2.0, np.float32)])
    if not signed:
        x = np.abs(x)
    k = _host.CudaBackend(CpuDevice(libs, grid_cap=16, block=block))
    codes, absmax = k.quantize(np.ascontiguousarray(x), signed)
    want_c, want_a = quant.quantize_blockwise(x, signed)
    np.testing.assert_array_equal(codes, want_c)
    np.testing.assert_array_equal(absmax.view(np.uint32) & 0x7fffffff, want_a.view(np.uint32) & 0x7fffffff)


def test_reduced_refuses_what_it_has_no_kernel_for(libs):
    """A (param, state) pair without a mixed kernel, or q8 state on float64 params (which
    fastopt.precision refuses before any backend): a clear error naming both, nothing written."""
    k = _host.CudaBackend(CpuDevice(libs))
    p = np.ones(9, np.float64)
    g = np.ones(9, np.float64)
    st = {"exp_avg": [np.zeros(9)], "exp_avg_sq": [np.zeros(9)]}
    s, _ = RULES["adam"].step_scalars(RULES["adam"].defaults, 1, {})
    for state, match in ((np.dtype(np.float16), "state dtype float16"), (fprec.Q8, "q8 state")):
        prec = Precision(param=np.dtype(np.float64), compute=np.dtype(np.float64), state=state,
                         master_weights=False, stochastic_rounding=False, seed=0)
        with pytest.raises(NotImplementedError, match=match):
            k.update("adam", [p], [g], st, s, Pre(precision=prec, step=1))
    assert (p == 1).all() and not st["exp_avg"][0].any() and k.launches == 0
    with pytest.raises(TypeError, match="dtype: expected float16, bfloat16, float32 or float64"):
        _host.suffix(np.int32)


@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "offset-by-one"])
def test_16bit_vector_and_scalar_paths_agree_with_the_reference(libs, offset):
    """Aligned arrays take the four-element path of the mixed loop, arrays one element off a
    boundary the scalar path; both give the reference's bits (bfloat16 params, float32 grads,
    bfloat16 state, stochastic rounding; float16 params with a master)."""
    rng = np.random.default_rng(13)
    n = 1027
    k = _host.CudaBackend(CpuDevice(libs, chunk_size=256, grid_cap=3))
    for pdt, sdt, master, sr in ((BF16, BF16, False, True), (F16, F32, True, False)):
        def view(x, dt):
            buf = np.empty(n + 1, dt)
            buf[offset:offset + n] = x.astype(dt)
            return buf[offset:offset + n]

        p0 = rng.standard_normal(n).astype(np.float32)
        arrays = {"p": view(p0, pdt), "g": view(rng.standard_normal(n), F32),
                  "m": view(rng.standard_normal(n) * 0.1, sdt), "v": view(rng.random(n) * 0.01, sdt)}
        if master:
            arrays["master"] = view(p0, F32)
        if offset:
            assert arrays["g"].ctypes.data % 16 != 0
        want = {name: a.copy() for name, a in arrays.items()}
        prec = Precision(param=pdt, compute=F32, state=sdt, master_weights=master, stochastic_rounding=sr,
                         seed=21)
        pre = Pre(precision=prec, step=3, inv_scale=0.5)
        s, _ = RULES["adam"].step_scalars({**RULES["adam"].defaults, "lr": 0.01}, 3, {})

        def states(d):
            out = {"exp_avg": [d["m"]], "exp_avg_sq": [d["v"]]}
            if master:
                out["master"] = [d["master"]]
            return out

        _backend.get_kernel("adam", "numpy")([want["p"]], [want["g"]], states(want), s, pre)
        k.update("adam", [arrays["p"]], [arrays["g"]], states(arrays), s, pre)
        for name in arrays:
            np.testing.assert_array_equal(_bits(arrays[name]), _bits(want[name]), err_msg=name)
