"""The device form of the widening driver (fastopt/_widen.py) without a GPU: ``widen.cu`` and
q8.cu's decode/encode compiled by g++ through the CPU harness of ``tests/test_cuda_cpu.py``
(its ``libs`` fixture, ``CpuDevice`` and ``register``), driven by the host code a GPU runs
(``fastopt.kernels.cuda._host.DeviceConversions``).

Each kernel bit for bit against its definition (``fastopt.precision.round_to``,
``fastopt.quantization``) on odd sizes with nan, inf, signed zeros, subnormals and the
rounding ties, blocks of 1 and 8 threads; then 16-bit Muon and Adafactor and q8 Muon through
the whole optimizer pipeline on the harness backend against the NumPy backend.  Skips only
without g++.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_cuda_cpu import CpuDevice, libs, pytestmark, register  # noqa: F401 -- fixture, skip mark

from fastopt import _widen
from fastopt import precision as prec
from fastopt import quantization as quant
from fastopt._optim import OPTIMIZERS
from fastopt.kernels.cuda import _host

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)


def _bits(a):
    a = np.ascontiguousarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def _conv(libs, block=1, grid_cap=None):
    return _host.DeviceConversions(_host.CudaBackend(CpuDevice(libs, block=block, grid_cap=grid_cap)))


def _floats(n, seed):
    """float32 values that exercise every branch of the 16-bit recipes: nan of both signs, inf,
    zeros, float32 and float16 subnormals, values past float16's range, exact ties of both
    formats, and random bit patterns."""
    rng = np.random.default_rng(seed)
    special = np.float32([np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-45, -3e-39, 6e-8,
                          -3e-8, 65504.0, 65520.0, -7e4, 3.4e38, 1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8,
                          1.0 + 2.0 ** -11, 1.0 + 3 * 2.0 ** -11, 2.0 ** -25, 2.0 ** -24 * 1.5])
    rand = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32).view(np.float32)
    normal = rng.standard_normal(n).astype(np.float32) * np.float32(3)
    x = np.where(rng.random(n) < 0.3, rand, normal).astype(np.float32)
    x[:special.size] = special
    return x


@pytest.mark.parametrize("block,grid_cap", [(1, None), (8, 3)], ids=["block1", "block8-grid3"])
@pytest.mark.parametrize("dtype", [F16, BF16], ids=["f16", "bf16"])
def test_load_and_store_equal_the_precision_recipes(libs, dtype, block, grid_cap):
    conv = _conv(libs, block, grid_cap)
    x = _floats(1029, seed=block)
    # load: every 16-bit pattern (nan payloads, infs, subnormals, both zeros), exact
    h = np.arange(2**16, dtype=np.uint16).view(dtype)
    got = conv.to_float32(h)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(_bits(got), _bits(prec.to_float32(h)))
    # store, nearest even
    out = np.zeros(x.size, dtype)
    conv.store(x, out)
    np.testing.assert_array_equal(_bits(out), _bits(prec.round_to(x, dtype)))
    # float32: a copy and a plain write
    w = conv.to_float32(x)
    assert w is not x and np.shares_memory(w, x) is False
    np.testing.assert_array_equal(_bits(w), _bits(x))


@pytest.mark.parametrize("block", [1, 8])
@pytest.mark.parametrize("seed,step", [(7, 1), (2**64 - 3, 12345)])
def test_stochastic_rounding_store_equals_round_to(libs, seed, step, block):
    """The bfloat16 param write under SR: the counter hash of (seed, step, flat index), bit for
    bit ``round_to(..., stochastic_rounding=True)``; NaN quiet, inf kept."""
    conv = _conv(libs, block, 5)
    x = _floats(3001, seed=3)
    pr = prec.resolve_precision(BF16, stochastic_rounding=True, seed=seed)
    out = np.zeros(x.size, BF16)
    conv.store(x, out, pr, step)
    want = prec.round_to(x, BF16, stochastic_rounding=True, seed=seed, step=step,
                         index=prec.element_index(x.size))
    np.testing.assert_array_equal(_bits(out), _bits(want))
    rne = prec.round_to(x, BF16)
    assert (_bits(out) != _bits(rne)).mean() > 0.2  # it did round stochastically
    # float16 has no SR: its store under the same precision object rounds to nearest even
    out16 = np.zeros(x.size, F16)
    conv.store(x, out16)
    np.testing.assert_array_equal(_bits(out16), _bits(prec.round_to(x, F16)))


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_q8_decode_and_encode_equal_the_definition(libs, signed):
    """fo_q8_dequantize is dequantize_blockwise and fo_q8_quantize written into existing
    arrays is quantize_blockwise, bit for bit; a partial last block, non-finite absmax."""
    conv = _conv(libs, 8, 2)
    rng = np.random.default_rng(4)
    n = 5 * 256 + 37
    codes = rng.integers(0, 256, n).astype(np.uint8)
    codes[:256] = np.arange(256)
    absmax = (np.abs(rng.standard_normal(6)) + 0.1).astype(np.float32)
    absmax[2], absmax[3], absmax[4] = np.nan, np.inf, 0.0
    got = conv.dequantize(codes, absmax, signed)
    np.testing.assert_array_equal(_bits(got), _bits(quant.dequantize_blockwise(codes, absmax, signed)))
    x = _floats(n, seed=5)
    x[300:600] = rng.standard_normal(300).astype(np.float32) * np.float32(1e-3)
    x[600:900] = 0.0
    x = x if signed else np.abs(x)
    # NaN payloads: a block's absmax is "a NaN" (quantize_blockwise); which payload NumPy's max
    # and the kernel's fo_max keep is not part of the format, so the NaNs here are the quiet one
    x[np.isnan(x)] = np.nan
    c, a = np.full(n, 99, np.uint8), np.full(6, 9.0, np.float32)
    conv.quantize_into(x, signed, c, a)
    wc, wa = quant.quantize_blockwise(x, signed)
    np.testing.assert_array_equal(c, wc)
    np.testing.assert_array_equal(_bits(a), _bits(wa))
    with pytest.raises(TypeError, match="quantize: expected float32 x, uint8 codes of its size"):
        conv.quantize_into(x, signed, c[:-1], a)


def test_max_norm_matches_the_host(libs):
    conv = _conv(libs, 3, 4)
    rng = np.random.default_rng(6)
    arrays = [rng.standard_normal(n).astype(np.float32) * 3 for n in (1, 1029, 3001)] + [
        np.zeros(0, np.float32)]
    want = [a.copy() for a in arrays]
    _widen.HOST.max_norm_(want, 2.0)
    conv.max_norm_(arrays, 2.0)
    for w, g in zip(want, arrays):  # the float64 sums differ in order only: the same float32 factor
        np.testing.assert_array_equal(_bits(g), _bits(w))


SHAPES = {"muon": [(5, 7), (33, 9)], "adafactor": [(5, 7), (2, 3, 9), (11,)]}
CONFIGS = [
    ("muon", F16, {"master_weights": True, "weight_decay": 0.1, "max_norm": 3.0}),
    ("muon", BF16, {"stochastic_rounding": True, "seed": 11, "max_norm": 2.5}),
    ("muon", BF16, {"state_dtype": "param", "nesterov": False, "weight_clip": 0.9}),
    ("adafactor", BF16, {"state_dtype": "bfloat16", "stochastic_rounding": True, "seed": 3}),
    ("adafactor", F16, {"master_weights": True, "max_norm": 2.0}),
    ("muon-q8", BF16, {"stochastic_rounding": True, "seed": 5}),
    ("muon-q8", np.dtype(np.float32), {"max_norm": 4.0}),
]


@pytest.mark.parametrize("rule,dtype,opts", CONFIGS,
                         ids=[f"{r}-{d.name}-{'-'.join(o)}" for r, d, o in CONFIGS])
def test_widened_step_on_the_harness_matches_numpy(libs, monkeypatch, rule, dtype, opts):
    """Three steps through the optimizer (the pipeline's Ops.widening): Muon bit for bit (its
    float32 step runs the same array-module ops as the reference), Adafactor within TOL (the
    float64 sums of factored.cu run in another order; TOL's 16-bit row)."""
    from _cases import TOL

    k = register(monkeypatch, libs, chunk_size=256, grid_cap=3)
    q8 = rule.endswith("-q8")
    name = rule.removesuffix("-q8")
    shapes = [(300, 4), (5, 7)] if q8 else SHAPES[name]
    rng = np.random.default_rng(len(opts))
    params = [rng.standard_normal(s).astype(np.float32).astype(dtype) for s in shapes]
    grads = [[rng.standard_normal(s).astype(np.float32).astype(dtype) for s in shapes]
             for _ in range(3)]
    kw = dict(opts, lr=0.05, **({"state_dtype": "q8", "min_8bit_size": 1000} if q8 else {}))
    runs = {}
    for backend in ("numpy", "cudacpu"):
        ps = [p.copy() for p in params]
        opt = OPTIMIZERS[name](ps, backend=backend, **kw)
        for g in grads:
            opt.step(g)
        runs[backend] = (ps, opt.state[0])
    (want_p, want_st), (got_p, got_st) = runs["numpy"], runs["cudacpu"]
    pairs = list(zip(want_p, got_p)) + [(a[n], b[n]) for a, b in zip(want_st, got_st) for n in a]
    for w, g in pairs:
        assert g.dtype == w.dtype
        if name == "muon":
            np.testing.assert_array_equal(_bits(g), _bits(w))
        else:
            coarse = w.dtype if w.dtype.itemsize == 2 else dtype
            np.testing.assert_allclose(g.astype(np.float64), w.astype(np.float64), **TOL[coarse])
    launched = set(k.dev.names)
    if dtype != np.float32:
        assert {f"fo_widen_load_{_host.suffix(dtype)}", f"fo_widen_store_{_host.suffix(dtype)}"} <= launched
    if q8:
        assert {"fo_q8_dequantize", "fo_q8_quantize"} <= launched
        assert got_st[0]["momentum_buffer"].dtype == np.uint8
    if "max_norm" in opts:
        assert {"fo_stats_f32", "fo_scale_f32"} <= launched

