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
backend ``cudacpu``).  Skips only without g++.
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
            cpp = so[:-3] + ".cpp"
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
    assert [f(k) for k in range(30, 35)] == [_host.DEPTH, _host.MAX_TENSORS, _host.MAX_ITEMS,
                                             len(KERNEL_SCALARS), _host.MAX_THREADS]
    # the largest argument list stays under CUDA's 4 KiB of kernel parameters
    big = t.itemsize + _host.hyper_dtype(np.dtype(np.float64)).itemsize \
        + _host.pipe_dtype(np.dtype(np.float64)).itemsize + 3 * 8
    assert big <= 4096


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


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("rule", ELEMENTWISE_RULES)
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
                "dense_solve": [], "orthogonalize": []}[r.kind]
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
