"""A NumPy-backed stand-in for CuPy -- a DEVELOPER smoke tool, never on CI's import path.

``cupy.RawModule`` compiles the source string with g++ and ``tests/cuda_cpu/shim.h`` (one
thread per block), arrays are a NumPy subclass whose ``.data.ptr`` is the host address, and
``fastopt._backend.array_kind`` is patched to call them "cupy".  So ``kernels/cupy_gpu.py``,
``tests/test_cuda_gpu.py`` and ``asv_bench/gpu_bench.py`` can be run end to end on a machine
without a GPU, to catch Python-level mistakes before a GPU session:

    PYTHONPATH=tests/cuda_cpu/fakecupy pytest tests/test_cuda_gpu.py -k "not test_parity["
    PYTHONPATH=tests/cuda_cpu/fakecupy python asv_bench/gpu_bench.py /tmp/out --quick

Timings it reports are meaningless; it proves nothing about CUDA itself.
"""
import ctypes
import hashlib
import os
import subprocess
import sys
import tempfile
import types

import numpy as _np

__version__ = "0.0-fake"

class _Mem:
    def __init__(self, a): self.ptr = a.ctypes.data if a.size else 0

class ndarray(_np.ndarray):
    @property
    def data(self): return _Mem(self)
    def get(self): return _np.array(self)

def _w(x):
    if isinstance(x, _np.ndarray) and not isinstance(x, ndarray): return x.view(ndarray)
    return x

def asarray(x, dtype=None): return _np.array(x, dtype=dtype, copy=True).view(ndarray)
def array(x, dtype=None, copy=True): return asarray(x, dtype)
def asnumpy(a): return _np.array(a).view(_np.ndarray).copy()

def __getattr__(name):
    f = getattr(_np, name)
    if callable(f) and not isinstance(f, type):
        def g(*a, **k): return _w(f(*a, **k))
        return g
    return f

linalg = types.SimpleNamespace(solve=lambda a, b: _w(_np.linalg.solve(a, b)),
                                norm=lambda a: _w(_np.asarray(_np.linalg.norm(a))))

class _Gen:
    def __init__(self, seed): self.g = _np.random.default_rng(seed)
    def standard_normal(self, size=None, dtype=_np.float64): return _w(self.g.standard_normal(size, dtype=dtype))
random = types.SimpleNamespace(default_rng=_Gen)

class _Pool:
    def free_all_blocks(self): pass
def get_default_memory_pool(): return _Pool()

SHIM = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_CACHE = os.path.join(tempfile.gettempdir(), f"fastopt-fakecupy-{os.getuid()}")
class _Kernel:
    def __init__(self, fn): self.fn = fn
    def __call__(self, grid, block, args):
        bufs = [_np.array(a, copy=True) for a in args]
        for b in bufs: assert b.size == 1, b
        argv = (ctypes.c_void_p * len(bufs))(*[b.ctypes.data for b in bufs])
        assert self.fn(ctypes.c_uint(grid[0]), ctypes.c_uint(1), argv) == 0
class RawModule:
    def __init__(self, code, options=()):
        key = hashlib.sha256(code.encode()).hexdigest()[:12]
        os.makedirs(_CACHE, exist_ok=True)
        so = os.path.join(_CACHE, f"mod-{key}.so")
        if not os.path.exists(so):
            open(so[:-3] + ".cpp", "w").write('#include "shim.h"\n' + code)
            subprocess.check_call(["g++", "-std=c++20", "-pthread", "-O2", "-fPIC", "-shared",
                                   "-fno-strict-aliasing", "-I", SHIM, "-o", so, so[:-3] + ".cpp"])
        self.lib = ctypes.CDLL(so)
    def get_function(self, name): return _Kernel(getattr(self.lib, "fo_cpu_" + name))

class _Event:
    def record(self):
        import time
        self.t = time.perf_counter()
    def synchronize(self): pass
class _Device:
    def __init__(self, i=0): pass
    def synchronize(self): pass
    mem_info = (1 << 30, 1 << 34)
_rt = types.SimpleNamespace(getDeviceCount=lambda: 1, getDevice=lambda: 0,
                            getDeviceProperties=lambda i: {"name": b"fake-cpu"})
cuda = types.SimpleNamespace(runtime=_rt, Device=_Device, Event=_Event,
                             get_elapsed_time=lambda a, b: (b.t - a.t) * 1e3)

# the fake's arrays ARE numpy subclasses: make fastopt see them as cupy arrays
import fastopt._backend as _fb
_orig_kind = _fb.array_kind
def _kind(a):
    return "cupy" if isinstance(a, ndarray) else _orig_kind(a)
_fb.array_kind = _kind
for _m in ("fastopt._validate", "fastopt._optim", "fastopt.functional"):
    _mod = sys.modules.get(_m) or __import__(_m, fromlist=["x"])
    if hasattr(_mod, "array_kind"): _mod.array_kind = _kind
