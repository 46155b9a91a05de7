"""asv_bench/benchmarks/bench_layers.py: every class sets up, times and tracks (tiny sizes)."""

import importlib
import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_TORCH = importlib.util.find_spec("torch") is not None


@pytest.fixture()
def bench(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "asv_bench"))
    mod = importlib.import_module("benchmarks.bench_layers")
    monkeypatch.setattr(mod, "BN_SHAPES", {"4096x1024": (64, 16), "32x64x32x32": (4, 3, 5, 5)})
    monkeypatch.setattr(mod, "DROPOUT_SIZES", {"1M": 5000, "16M": 7000})
    yield mod
    sys.modules.pop("benchmarks.bench_layers", None)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("impl", ["numpy", "numba", "torch"])
def test_batch_norm_benchmark(bench, impl, dtype):
    if impl == "torch" and not HAS_TORCH:
        pytest.skip("torch is not installed")
    b = bench.BatchNorm()
    for shape in bench.BN_SHAPES:
        b.setup(shape, impl, dtype)
        assert b.x.dtype.name == dtype
        b.time_forward_backward(shape, impl, dtype)
        if impl == "torch":
            with pytest.raises(NotImplementedError):
                b.track_ratio_to_torch(shape, impl, dtype)
        else:
            assert b.track_ratio_to_torch(shape, impl, dtype) > 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("impl", ["numpy", "numba", "torch"])
def test_dropout_benchmark(bench, impl, dtype):
    if impl == "torch" and not HAS_TORCH:
        pytest.skip("torch is not installed")
    d = bench.Dropout()
    d.setup("1M", impl, dtype)
    d.time_forward("1M", impl, dtype)
    assert d.track_gbps("1M", impl, dtype) > 0 and d.track_fraction_of_copy("1M", impl, dtype) > 0


def test_unavailable_backend_skips_the_asv_way(bench, monkeypatch):
    from fastopt import layers

    monkeypatch.setattr(layers, "backends", lambda: {"numpy": {"available": True, "reason": None},
                                                     "numba": {"available": False, "reason": "x"}})
    with pytest.raises(NotImplementedError, match="numba"):
        bench.Dropout().setup("1M", "numba")
