"""The Numba CPU backend: fused, multi-threaded, multi-tensor kernels.

Layout
------
* One per-element body per rule (``_sgd``, ``_adam``, ...): an
  ``@njit(inline="always")`` function of one element that returns the new
  parameter value and writes the rule's state.  Its math repeats
  ``kernels/reference.py`` operation for operation, in the same order, so a
  float64 step agrees with the reference to the last bits.  The Adam-family
  moment update is written once (``_moments``) and shared by every body that
  keeps the two moments.
* Two drivers, written once and shared by every rule: ``_apply`` (the update
  pass: the step pipeline of ``docs/design.md`` around the body -- unscale,
  maximize, clip, the norm-clip factor, the weight-decay stage -- then
  ``weight_clip``) and ``_reduce`` (LAMB's first pass: the moments, and the
  float64 sums of ``p^2`` and ``r^2`` per tensor).
* The read pass of the pipeline (the non-finite check, the gradient norms,
  ``sumsq``) is ``_k_read`` over fixed blocks of ``_BLOCK`` elements: its sums
  are the same bits for any thread count, and its loop vectorizes (at or
  above the speed of a BLAS ``dot`` over the same bytes).
* The weight-decay stage (``Rule.weight_decay``) lives in ``_apply``, not in
  the bodies: L2 adds ``l2 * p`` to the grad only where ``l2 != 0`` (``0 * inf``
  is nan: an inf param must stay inf, as on the reference), decoupled decay
  multiplies the param by ``decay`` (1 when off, and ``p * 1 == p`` exactly).
* One thin ``parallel=True`` entry point per rule and variant (``_k_adam``,
  ``_k_adam_amsgrad``, ...) that runs a driver with the rule's body.  The
  variants (``Rule.variants``: the flags that decide which arrays are touched)
  are a constant of the entry point, so they fold away and the loop
  vectorizes; the other flags (nesterov, RAdam's rectification) are one
  runtime bitmask.  ``_ENTRIES`` maps ``(rule, variant)`` to the entry point
  and the rule's kind (``Rule.kind``) picks the host driver; no code here
  branches on a rule's name.
* The read pass's entry point and every update entry point also have a serial
  twin (``_SERIAL``: the same function compiled without a parallel region; an
  update entry's twin runs its element loop as a jitted function of its own,
  ``_serial_driver``), which the host calls when the call runs as one part; see
  ``_entry``.  A small fast check (the default step's) is ``_k_check``: the host
  calls ``_check_grads`` itself (see below), no entry point of its own.
* Every update entry point can also run the read pass's fast check itself, before
  its loop (``_setup``, ``_check_grads``): the optimizer's step cache (``StepPlan``)
  makes such a *checked* call for a small step, so the check and the update are
  one launch and nothing is written when a grad is not finite.

Scalars and flags
-----------------
Every call passes one scalar array: the pipeline head (``_GINV`` ...
``_ZERO``) followed by the full ``fastopt._rules.KERNEL_SCALARS`` vector of
the step (``Rule.kernel_scalars``).  A body reads a value by its name's slot,
``c[_S_BETA1]``; the slot constants are computed from
``KERNEL_SCALAR_SLOT`` at import, so no position is written twice.  The flags
are ``Rule.kernel_flags`` (bit ``KERNEL_FLAG_BIT[name]``), tested with the
``_F_*`` masks; the variant bits (``Rule.variant``) with the ``_V_*`` masks.

Multi-tensor
------------
A call covers a whole list of tensors.  The Python side packs the list into an
``int64`` table (one row per operand: param, grad, up to three states, extra;
one column per tensor) plus the sizes, and the kernel splits the concatenated
element space evenly into one contiguous part per thread: a big tensor is cut
between the threads, many small ones are shared out whole.  The table holds
the *addresses of the array objects* (``id(a)``): building it is
``np.fromiter(map(id, arrays))``, about 60 ns per tensor, where ``a.ctypes.data``
costs about 2.5 us per tensor (1000 tiny tensors: 0.06 ms instead of 2.6 ms
per list).  The kernel reads each array's data pointer out of the
``PyArrayObject`` (its ``data`` field, at an offset found and checked once at
import by probing a known array); where the probe fails the table holds
``a.ctypes.data`` instead.  Nothing is cached between steps, so there is
nothing to invalidate: the optimizer's lists are re-read every call.

Newton (``Rule.kind == "dense_solve"``) has no fused kernel: its small dense
solves run on the host with NumPy (``np.linalg.solve`` inside ``njit`` would
need scipy, which the ``numba`` extra does not install).

Types
-----
Kernels are dtype-pure: every scalar reaches the kernel in an array of the
params' dtype (``_scalars``), cast on the host from the double-precision
values of ``fastopt._rules``, and the bodies use no numeric literals (Numba
types ``x * 1`` with ``x`` float32 as float64).  ``tests/test_numba.py`` reads
the LLVM IR of the float32 kernels and fails on any double arithmetic.  The
reductions accumulate in float64 on purpose (``fastmath={"reassoc"}`` only,
so they vectorize but keep inf/nan semantics).

Reduced precision
-----------------
float16 and bfloat16 params (and any state dtype other than the param's,
master weights, stochastic rounding) run through the same entry points: the
host passes an int64 *format vector* in place of the int ``flags`` (the flags,
a storage code per operand and tensor, stochastic rounding's step key, the
``max_norm`` buffers; ``_X_*``), and ``_apply``/``_reduce``/``_read_blocks``
are overloads that pick the tiled driver when that argument is an array.  So
the storage type is a parameter of the memory loop, the rule bodies stay as
they are, and Numba compiles a tiled kernel per entry point only when a
reduced-precision step first runs (once for every dtype combination: the
storage codes are run-time values, branched on once per 256-element tile),
while a float32 or float64 step compiles exactly what it did before.

Per tile, the tiled driver loads every operand as float32 (16-bit values
through the bit recipes of ``fastopt.precision``: Numba has no float16
arithmetic on the CPU and cannot type ``ml_dtypes`` arrays, so 16-bit data is
read and written as ``uint16``), runs the pipeline and the rule body on the
float32 tiles, then stores each written operand with one rounding: state to
nearest even, the float32 master as is, the param to nearest even (of the
master when there is one) or stochastically with the counter hash of (seed,
step, index within the param).  ``max_norm`` acts on the float32 params
before that rounding: the host runs the kernel once dry (it writes nothing and
returns the per-tensor sums of squares), then for real with the factors.
LAMB's first pass stores no moments (a 16-bit moment rounded in pass 1 would
feed pass 2 a value the reference never sees): pass 2 recomputes them on its
tiles (``_V_TILE``) and stores them once.

Threads
-------
Kernels release the GIL (``nogil=True``).  Numba's ``workqueue`` threading
layer aborts the process when two Python threads launch parallel kernels at
once; ``omp`` and ``tbb`` are safe.  Numba picks ``tbb``, then ``omp``, then
``workqueue`` (unless ``NUMBA_THREADING_LAYER`` says otherwise), so the first
launch is made under a lock and if the layer it settled on is ``workqueue``
every later launch takes the lock too (Python threads then step one at a
time); with ``omp``/``tbb`` no lock is taken.  Note that GNU OpenMP is not
fork-safe: a process forked after a step must not step with this backend.

Compilation and caching
-----------------------
Kernels compile lazily, per (rule, variant, dtype), on first use: a first
small Adam step compiles ``_check_grads`` (the fast check, which the host calls
directly and every update entry point calls from ``_setup``) and the serial twin
of ``_k_adam`` (about 60 % of the CPU time of ``_k_adam``'s parallel form);
a step over ``2 * MIN_PER_THREAD`` elements on several threads compiles the parallel
form.  The inline overloads are typed without a standalone compile
(``_inline_only``), and a cached kernel loads without Numba's registry refresh
(``_FingerprintCache.load_overload``): a warm first step is about 0.1 s after the
imports.  See "First use" in docs/design.md for the figures.  ``fastopt.warmup()`` / ``python -m fastopt warmup`` compiles them
ahead of time, and a first call that runs for over a second says once on
stderr that it is compiling (``COMPILE_NOTE``).  They are
cached on disk (Numba's ``__pycache__`` next to this file, ``NUMBA_CACHE_DIR``
or its user-wide cache directory) unless ``FASTOPT_NUMBA_CACHE=0``.  The known
``parallel=True`` + ``cache=True`` problems were checked against this layout:
a cached *non*-parallel function calling a parallel one segfaults when loaded
(numba#8578): every cached entry point here is itself the parallel function and
calls no other parallel function; a cache written with another
``NUMBA_NUM_THREADS`` crashed (numba#7518, fixed in 0.55 by numba#7625; the
thread count is read at run time here); factory-made closures over jitted
functions get a new cache key every process (numba#6264) so the entry points
are plain module-level functions that name their body as a global.

Numba keys a cached kernel on the *source of this file* (a hash of it) and
the entry point's bytecode, not on the values of the globals it folded in.
The slot and flag constants come from ``fastopt._rules``: had the vocabulary
changed there with this file untouched, Numba would load kernels that read
the wrong slots.  So every entry point's cache stamp also carries
``FINGERPRINT``, a hash of everything this module derives from
``_rules`` (the scalar and flag vocabularies, the head layout, each rule's
variants, states and kind): a changed fingerprint makes the cached index stale
and the kernel recompiles (``_FingerprintCache``).  Where Numba's cache
internals are not as expected, caching is switched off (``CACHE_ERROR`` says
why) rather than risk stale code.  Left open: several processes compiling the
same kernel into an empty cache at the same moment (numba#4807) -- warm the
cache once (``warmup()``) before starting many workers, or set
``FASTOPT_NUMBA_CACHE=0``.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import sys
import threading
import warnings

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload
from numba.np.unsafe.ndarray import to_fixed_tuple

from .. import precision as _precision
from .._backend import Ops, Pre, register_kernel
from .._rules import (CLIP_EPS, DENSE_SOLVE, ELEMENTWISE, KERNEL_FLAG_BIT, KERNEL_FLAGS,
                      KERNEL_SCALAR_SLOT, KERNEL_SCALARS, ORTHOGONALIZE, RULES, TRUST_RATIO,
                      muon_lr_ratio)
from .._rules import FACTORED, adafactor_eps1

# Numba's SSA pass re-checks its IR after inlining the q8 block driver's helpers and warns
# ("NumbaIRAssumptionWarning: variable '_q8_...' is not in scope") at their first compile.
# The check is Numba's own pedantry (the kernels are tested bit for bit against the
# reference); the warning would only alarm users, so it is silenced for those names.
warnings.filterwarnings("ignore", category=numba.core.errors.NumbaIRAssumptionWarning,
                        message=r"variable '_q8_")

BACKEND = "numba"

CACHE = os.environ.get("FASTOPT_NUMBA_CACHE", "1") != "0"

#: Below this many elements per thread a call runs on one thread: waking the
#: pool costs more than the loop (~5 us against ~1 ns per element).
MIN_PER_THREAD = 32768

# only prange is parallelized: array expressions (np.zeros, ...) stay serial loops,
# which also keeps the compile time down (each parfor is a gufunc compiled apart)
_PARALLEL = dict(prange=True, comprehension=False, setitem=False, reduction=False, numpy=False,
                 stencil=False, fusion=False, inplace_binop=False)

# rows of the operand table (_M: the float32 master copy of a 16-bit param)
_P, _G, _S0, _S1, _S2, _E, _M = range(7)
_ROWS = 7
# the extra row of a checked call's table (see _setup): its float64 sums array
_CHECK = _ROWS
# the pipeline scalars at the head of every scalar array (docs/design.md, "Step pipeline"):
# grad unscale (sign folded in for maximize), clip_value, weight_clip, extra-input
# unscale, and a zero of the dtype (the bodies use no literals)
_HEAD_NAMES = ("ginv", "gclip", "wclip", "einv", "zero")
_GINV, _GCLIP, _WCLIP, _EINV, _ZERO = range(len(_HEAD_NAMES))
_HEAD = len(_HEAD_NAMES)
_NSCALARS = _HEAD + len(KERNEL_SCALARS)


def _slot(name):
    """The position of the kernel scalar ``name`` in a call's scalar array."""
    return _HEAD + KERNEL_SCALAR_SLOT[name]


_S_LR, _S_L2, _S_DECAY, _S_EPS = _slot("lr"), _slot("l2"), _slot("decay"), _slot("eps")
_S_BETA1, _S_ONE_MINUS_BETA1 = _slot("beta1"), _slot("one_minus_beta1")
_S_BETA2, _S_ONE_MINUS_BETA2 = _slot("beta2"), _slot("one_minus_beta2")
_S_STEP_SIZE, _S_BC1, _S_BC2_SQRT = _slot("step_size"), _slot("bc1"), _slot("bc2_sqrt")
_S_MOMENTUM, _S_MOMENTUM_KEEP = _slot("momentum"), _slot("momentum_keep")
_S_MOMENTUM_GAIN = _slot("momentum_gain")
_S_ALPHA, _S_ONE_MINUS_ALPHA = _slot("alpha"), _slot("one_minus_alpha")
_S_RHO, _S_ONE_MINUS_RHO = _slot("rho"), _slot("one_minus_rho")
_S_CLR, _S_C_GRAD, _S_C_AVG = _slot("clr"), _slot("c_grad"), _slot("c_avg")
_S_HESSIAN_POWER, _S_WEIGHT_DECAY = _slot("hessian_power"), _slot("weight_decay")
_S_ETA, _S_ETA_DECAY, _S_MU = _slot("eta"), _slot("eta_decay"), _slot("mu")
_S_ETAPLUS, _S_ETAMINUS = _slot("etaplus"), _slot("etaminus")
_S_STEP_SIZE_MIN, _S_STEP_SIZE_MAX = _slot("step_size_min"), _slot("step_size_max")
_S_EPS_ROOT = _slot("eps_root")
_S_BETA3, _S_ONE_MINUS_BETA3 = _slot("beta3"), _slot("one_minus_beta3")
_S_C_LERP, _S_Y_LR, _S_BC2 = _slot("c_lerp"), _slot("y_lr"), _slot("bc2")
_S_TRUST_COEFFICIENT = _slot("trust_coefficient")

# runtime flags (Rule.kernel_flags bits)
_F_NESTEROV = 1 << KERNEL_FLAG_BIT["nesterov"]
_F_RECTIFY = 1 << KERNEL_FLAG_BIT["rectify"]
_F_AVERAGE_COPY = 1 << KERNEL_FLAG_BIT["average_copy"]
_F_LERP_SWAP = 1 << KERNEL_FLAG_BIT["lerp_swap"]


def _variant_bit(rule, flag):
    """The bit of ``Rule.variant`` that says ``flag`` is on for ``rule``."""
    return 1 << RULES[rule].variants.index(flag)


# variant bits (Rule.variant): constants of an entry point
_V_SGD_MOMENTUM = _variant_bit("sgd", "has_momentum")
_V_ADAM_AMSGRAD = _variant_bit("adam", "amsgrad")
_V_RMSPROP_MOMENTUM = _variant_bit("rmsprop", "has_momentum")
_V_RMSPROP_CENTERED = _variant_bit("rmsprop", "centered")
assert RULES["adamw"].variants == RULES["adam"].variants  # one body, one variant encoding
#: A backend-local variant bit, above the rule's own: a ``hessian_power`` that is not 1.
#: pow is a libm call per element that keeps the loop scalar (AdaHessian ran 6x slower
#: than Adam); a test of it inside the loop is not hoisted by LLVM, so power 1 (the
#: default; pow(d, 1) == d exactly) gets its own entry point without the call.
_V_POW = 1 << 16
#: Backend-local bits the drivers add, never an ``_ENTRIES`` key: ``_V_TRUST2`` marks the
#: second pass of a trust-ratio entry point (its ``scales`` are ``lr * trust``),
#: ``_V_TILE`` tells a body that it runs on the float32 tiles of a reduced-precision call
#: (see "Reduced precision" in the module docstring).
_V_TRUST2 = 1 << 17
_V_TILE = 1 << 18
#: Backend-local, added by LARS's entry point to ``_V_TRUST2``: pass 2's ``scales`` has 2n
#: entries, the per-tensor ``-(lr * trust)`` then the grads' norm-clip factors (LARS's step
#: reads the grad, so it needs both; LAMB's reads only its moments).  The tiled driver takes
#: the norm-clip factors from the format vector and ignores the second half.
_V_GSCALE2 = 1 << 19

# The format vector of a reduced-precision call (int64; see "Reduced precision"): it
# takes the place of the int ``flags`` argument of an entry point, and its type (an
# array, not an int) is what makes Numba compile the tiled drivers for that call.
_X_FLAGS, _X_SR, _X_KEY, _X_DRY, _X_ACC, _X_FAC, _X_GSCALE = range(7)
_X_HEAD = 7  # then one storage code per (operand row, tensor): _X_HEAD + row * n + t
#: storage codes: how an operand is held in memory (its arithmetic is float32)
_C_F32, _C_BF16, _C_F16 = 0, 1, 2
#: elements per float32 tile of the reduced-precision drivers (7 tiles: 7 KiB per thread;
#: 256 measured 0-20 % faster than 512, see docs/design.md "Speed of the tiled loop")
_TILE = 256
#: floats between the starts of two tile rows: 256 + 32, so the seven rows begin at seven
#: different offsets modulo 4 KiB (see ``_tile_buffer``)
_TILE_STRIDE = _TILE + 32
#: where the tile buffer starts modulo 4 KiB, in bytes (see ``_tile_buffer``)
_TILE_PHASE = 512


def _mode(rule, s):
    """The entry point's variant bits for the step scalars ``s`` (``_ENTRIES`` key)."""
    v = rule.variant(s)
    if "hessian_power" in rule.pack and s["hessian_power"] != 1:
        v |= _V_POW
    return v


def _fingerprint():
    """A hash of everything the compiled kernels take from ``fastopt._rules`` (see above)."""
    rules = sorted((r.name, r.kind, r.variants, r.flags, r.all_state, r.extra, r.extra_shape,
                    r.weight_decay) for r in RULES.values())
    text = repr((KERNEL_SCALARS, KERNEL_FLAGS, _HEAD_NAMES, _ROWS, rules))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


FINGERPRINT = _fingerprint()
CACHE_ERROR = None  # why the on-disk cache is off, when it is off for a reason other than the env


def _fingerprint_cache_class(suffix=""):
    """Numba's ``FunctionCache`` with ``FINGERPRINT`` added to every index stamp.

    ``suffix`` is appended to the cache files' names: the serial twin of an entry
    point (``_entry``) is the same Python function as the parallel one, and Numba's
    index key (signature, CPU, bytecode) would not tell their compiled code apart.
    """
    from numba.core.caching import FunctionCache

    class _Stamped:
        """A cache locator whose source stamp also carries the fingerprint."""

        def __init__(self, inner):
            self._inner = inner

        def __getattr__(self, name):
            return getattr(self._inner, name)

        def get_source_stamp(self):
            return (self._inner.get_source_stamp(), "fastopt", FINGERPRINT)

    class _FingerprintImpl(FunctionCache._impl_class):
        def __init__(self, py_func):
            super().__init__(py_func)
            self._locator = _Stamped(self._locator)

        def get_filename_base(self, fullname, abiflags):
            return super().get_filename_base(fullname + suffix, abiflags)

    class _FingerprintCache(FunctionCache):
        _impl_class = _FingerprintImpl

        def load_overload(self, sig, target_context):
            if not _LEAN_LOAD:
                return super().load_overload(sig, target_context)
            # Numba's own load_overload first calls target_context.refresh(), which
            # imports and installs every typing and lowering registry Numba has (and
            # through numba.np.arraymath's BLAS probe, scipy.linalg): 0.5-1 s of a warm
            # process's first step, none of it needed to load machine code.  Rebuilding
            # a cached kernel needs the helper symbols (installed when the context was
            # made) and the NRT's (rtsys.initialize, idempotent); a compile that comes
            # later refreshes the contexts itself (numba.core.compiler.CompilerBase).
            _rtsys.initialize(target_context)
            with self._guard_against_spurious_io_errors():
                return self._load_overload(sig, target_context)

    from numba.core.runtime import rtsys as _rtsys

    # the internals the lean load uses; where they moved, Numba's own load_overload runs
    _LEAN_LOAD = (hasattr(FunctionCache, "_load_overload")
                  and hasattr(FunctionCache, "_guard_against_spurious_io_errors")
                  and hasattr(_rtsys, "initialize"))
    return _FingerprintCache


try:
    _FingerprintCache = _fingerprint_cache_class()
    _SerialCache = _fingerprint_cache_class("_serial")
except Exception as e:  # noqa: BLE001 -- numba's internals moved: no cache rather than a stale one
    _FingerprintCache = _SerialCache = None
    CACHE_ERROR = f"{type(e).__name__}: {e}"


def _cached(dispatcher, serial=False):
    """Turn on the fingerprinted on-disk cache for a jitted entry point (when allowed)."""
    global CACHE_ERROR
    if not CACHE or _FingerprintCache is None:
        return dispatcher
    try:
        cache = (_SerialCache if serial else _FingerprintCache)(dispatcher.py_func)
        if cache._impl.locator.get_source_stamp()[-1] != FINGERPRINT:
            raise RuntimeError("the cache stamp does not carry the fingerprint")
        dispatcher._cache = cache
    except Exception as e:  # noqa: BLE001 -- no writable cache dir, or numba internals moved
        CACHE_ERROR = f"{type(e).__name__}: {e}"
    return dispatcher


#: parallel entry point -> its serial twin: the same function compiled without a
#: parallel region (``prange`` is then ``range``), which the host calls whenever the
#: call runs as one part (one thread, or under ``2 * MIN_PER_THREAD`` elements).
_SERIAL = {}
_TWINS = set()  # the serial twins (they open no parallel region)


def _entry(sums=False, twin=False, contract=False):
    """The decorator of an entry point: parallel, nogil, fingerprint-cached.

    ``twin``: also compile a serial twin (``_SERIAL``) for calls that run as one
    part.  Parfor lowering is about half of a kernel's compile time: a twin compiles
    in about 60 % of the parallel form's CPU time and runs as fast (or faster: no
    parallel region to enter), so a first small step never compiles a parallel form.
    Every update entry point (one that calls ``_apply`` and not ``_reduce``, in the
    template: ``sizes`` second, ``threads`` last) gets a twin without asking: its
    ``_apply`` becomes ``_apply_serial`` (``_serial_form``), whose driver runs the
    element loop as a jitted function of its own; inlined in a serial function the
    loop came out scalar (Adam's 5-13x slower on one thread).  Both forms use NumPy's
    error model (a float division by zero is inf/nan, not an exception): under Python's
    model a division carries a zero test whose branch keeps LLVM from vectorizing the
    loop.  A twin's entry point must take ``sizes`` second and ``threads`` last (the
    template of ``_k_read``).

    ``contract`` (the read pass only): also fastmath "contract", so ``u += y * y``
    becomes one fused multiply-add; see ``_block_sums`` for why its bits are those of
    the separate multiply and add.
    """
    opts = dict(nogil=True, error_model="numpy")
    if sums:
        opts["fastmath"] = {"reassoc", "contract"} if contract else {"reassoc"}

    def make(fn):
        par = _cached(njit(parallel=_PARALLEL, **opts)(fn))
        code = fn.__code__
        update = ("_apply" in code.co_names and "_reduce" not in code.co_names
                  and code.co_varnames[1:2] == ("sizes",)
                  and code.co_varnames[code.co_argcount - 1] == "threads")
        if twin or update:
            assert code.co_varnames[1:2] == ("sizes",), fn.__name__
            src = _serial_form(fn) if update else fn
            _SERIAL[par] = _cached(njit(**opts)(src), serial=True)
            _TWINS.add(_SERIAL[par])
        return par

    return make


def _serial_form(fn):
    """``fn`` with its calls of ``_apply`` made to ``_apply_serial`` (an update entry's twin).

    The same bytecode and module globals, only the name the code loads differs, so Numba
    sees the same source and the twin's own cache files (``_serial``) hold its code.
    """
    code = fn.__code__
    names = tuple("_apply_serial" if n == "_apply" else n for n in code.co_names)
    twin = type(fn)(code.replace(co_names=names), fn.__globals__, fn.__name__,
                    fn.__defaults__, fn.__closure__)
    twin.__qualname__, twin.__doc__ = fn.__qualname__, fn.__doc__
    return twin


# ------------------------------------------------------------------ raw memory


@intrinsic
def _load_i64(typingctx, addr):
    """The int64 stored at address ``addr``."""

    def codegen(context, builder, sig, args):
        return builder.load(builder.inttoptr(args[0], ir.PointerType(ir.IntType(64))))

    return types.int64(types.int64), codegen


@intrinsic
def _as_ptr(typingctx, addr, like):
    """Address ``addr`` as a pointer to the scalar type of ``like``."""
    ptrty = types.CPointer(like)

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(ptrty))

    return ptrty(types.int64, like), codegen


@intrinsic
def _prefetch(typingctx, addr):
    """Ask the core to bring the cache line at address ``addr`` into L1 (no fault if invalid)."""

    def codegen(context, builder, sig, args):
        vp = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [vp, i32, i32, i32])
        fn = builder.module.globals.get("llvm.prefetch.p0") or ir.Function(
            builder.module, fnty, "llvm.prefetch.p0")
        # read, keep in all levels (locality 3), data cache
        builder.call(fn, [builder.inttoptr(args[0], vp), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return types.void(types.int64), codegen


def _probe_data_offset() -> int:
    """Byte offset of the data pointer inside a ``PyArrayObject``, or -1 if not found.

    ``PyArrayObject_fields`` is ``{PyObject_HEAD; char *data; ...}``; the head's
    size depends on the CPython build (16 bytes normally, more when
    free-threaded), so look for the pointer and check it on several arrays.
    """
    probes = [np.empty(n) for n in (3, 5, 11)]
    for off in range(8, 72, 8):
        if all(ctypes.c_int64.from_address(id(a) + off).value == a.ctypes.data for a in probes):
            return off
    return -1


DATA_OFFSET = _probe_data_offset()


def _data_pointers(arrays, n):
    """The arrays' data pointers, read on the host (~0.2 us a tensor; ``_ids`` ~0.05 us)."""
    if DATA_OFFSET >= 0:
        at = ctypes.c_int64.from_address
        return np.fromiter((at(i + DATA_OFFSET).value for i in map(id, arrays)), np.int64, n)
    return np.fromiter((a.ctypes.data for a in arrays), np.int64, n)


def _ids(arrays, n):
    if DATA_OFFSET >= 0:
        return np.fromiter(map(id, arrays), np.int64, n)
    return np.fromiter((a.ctypes.data for a in arrays), np.int64, n)


# ------------------------------------------------------------------ shared drivers


@njit(inline="always")
def _pointers(tab, deref):
    """Data pointers from the operand table (object addresses when ``deref >= 0``)."""
    if deref < 0:
        return tab
    # np.empty and explicit fills, not np.zeros: every NumPy constructor Numba compiles
    # adds to a kernel's first compile (see _last_le)
    out = np.empty_like(tab)
    for r in range(tab.shape[0]):
        for t in range(tab.shape[1]):
            out[r, t] = _load_i64(tab[r, t] + deref) if tab[r, t] != 0 else 0
    return out


@njit(inline="always")
def _setup(tab, sizes, cs, deref, threads):
    """Data pointers, prefix offsets, total size and the number of parts (threads).

    A *checked* call (the operand table has the extra row ``_CHECK``; only the
    optimizer's step cache makes one, for a step that runs as one part) first runs
    the read pass's non-finite check over the grads in this same call
    (``_check_grads``): where it fails, the number of parts is 0, so the update
    loop writes nothing.
    """
    n = sizes.shape[0]
    off = np.empty(n + 1, np.int64)
    off[0] = 0
    for t in range(n):
        off[t + 1] = off[t] + sizes[t]
    total = off[n]
    # the thread count comes from the host: numba.get_num_threads() inside a kernel
    # goes through a ctypes pointer, which makes the kernel uncacheable
    parts = min(threads, max(1, total // MIN_PER_THREAD))
    ptr = _pointers(tab, deref)
    if tab.shape[0] > _CHECK and not _check_grads(ptr, sizes, off, cs, ptr[_CHECK, 0]):
        parts = 0
    return ptr, off, total, parts


@njit(inline="always")
def _clip(x, c):
    # nan stays nan (as np.clip); c = inf is no clip
    if x > c:
        return c
    if x < -c:
        return -c
    return x


@njit(inline="always")
def _maximum(a, b):
    # as np.maximum: a nan in either argument is the result (Python's max drops a nan b)
    if a != a:
        return a
    return a if a > b else b


@njit(inline="always")
def _range(k, parts, off, total, t):
    """The elements ``[a, b)`` of tensor ``t`` that part ``k`` covers.

    Part ``k`` of ``parts`` covers ``[total*k/parts, total*(k+1)/parts)`` of the
    concatenated tensors.
    """
    lo = total * k // parts
    hi = total * (k + 1) // parts
    return max(lo, off[t]) - off[t], min(hi, off[t + 1]) - off[t]


@njit(inline="always")
def _views(ptr, t, n, z):
    """Tensor ``t``'s operands as arrays of ``n`` elements of ``z``'s type."""
    return (numba.carray(_as_ptr(ptr[_P, t], z), n), numba.carray(_as_ptr(ptr[_G, t], z), n),
            numba.carray(_as_ptr(ptr[_S0, t], z), n), numba.carray(_as_ptr(ptr[_S1, t], z), n),
            numba.carray(_as_ptr(ptr[_S2, t], z), n), numba.carray(_as_ptr(ptr[_E, t], z), n))


@njit(inline="always")
def _last_le(a, x):
    """The last ``t`` with ``a[t] <= x`` (``a`` ascending, ``a[0] <= x``).

    ``np.searchsorted(a, x, side="right") - 1``, written out: Numba's
    ``searchsorted`` alone took 2.5 s to compile in a probe, the loop 0.2 s.
    """
    lo, hi = 0, a.shape[0]  # a[lo] <= x; the answer is in [lo, hi)
    while hi - lo > 1:
        mid = (lo + hi) >> 1
        if a[mid] <= x:
            lo = mid
        else:
            hi = mid
    return lo


@njit(inline="always")
def _tensors(k, parts, off, total):
    """The first tensor of part ``k`` and the end of the part."""
    lo = total * k // parts
    return _last_le(off, lo), total * (k + 1) // parts


# Tuples cannot enter a parallel region (they would be gufunc arguments), so each
# part turns the scalar array into a tuple itself: its values are then plain SSA
# values that LLVM keeps in registers, where loads from ``cs`` inside the loop
# might alias the params being written and would be repeated every element.
#
# ``_apply`` and ``_reduce`` are typed by their last operand, ``f``: an int (the
# flag bits) picks the full-precision driver, an int64 array (the format vector of
# a reduced-precision call) the tiled one.  Numba resolves the overload when it
# types an entry point for its argument types, so a float32 or float64 call
# compiles exactly the code it always did, and a tiled kernel is compiled only
# when a reduced-precision step first runs.
def _apply(body, mode, k, parts, ptr, off, total, scales, cs, f):
    """Part ``k`` of the update pass: the step pipeline around ``body`` (see the overload)."""
    raise NotImplementedError("only callable from a jitted function")


def _reduce(body, mode, k, parts, ptr, off, total, scales, cs, f, acc):
    """Part ``k`` of LAMB's first pass (see the overload)."""
    raise NotImplementedError("only callable from a jitted function")


def _apply_serial(body, mode, k, parts, ptr, off, total, scales, cs, f):
    """``_apply`` in an update entry point's serial twin (see ``_serial_driver``)."""
    raise NotImplementedError("only callable from a jitted function")


_SERIAL_DRIVERS = {}


def _own_symbol(fn, rule_body, mode):
    """Name a jitted closure made per rule body and mode after them; returns ``fn``.

    Numba's machine-code symbol for a function is its module, qualified name, a
    per-process counter and its argument types.  The closures made per rule body
    (``rule_loop``, ``tile_rule``, ``fused_rule``) share a qualified name and argument
    types, so two of them compiled in different processes can get the same symbol, and
    a process that loads both kernels from the on-disk cache links every call to the
    first one loaded: a cached NAdam step ran Adam's loop
    (``tests/test_numba_contract.py``).  The body's name and the mode in the
    qualified name make the symbols differ.
    """
    name = getattr(rule_body, "__name__", None) or rule_body.py_func.__name__
    fn.py_func.__qualname__ = f"{fn.py_func.__qualname__}_{name}_{mode}".replace("-", "m")
    return fn


def _serial_driver(rule_body, rule_mode):
    """``_apply_full`` for a serial twin: the element loop a jitted function of its own.

    Inlined into a serial function, the loop of ``_apply_full`` came out scalar (one
    LLVM optimization of the whole; the parfor body of the parallel form is optimized
    once on its own and again where it is linked).  As a function of its own
    (``rule_loop``, made once per rule body and mode: both closure constants, as in
    ``_tiled_driver``; ``rule_mode`` None when the entry's mode was not a literal, e.g.
    ``A | B``: it then goes through as an argument) it is optimized in its own library
    and again, inlined, in the twin's: the loop is vector code (``sqrtps``/``divps`` for Adam), runs as fast as the
    parallel form on one thread, and computes the same bits.  The twin compiles in
    about 60 % of the parallel form's time: no parfor lowering.
    """
    key = (rule_body, rule_mode)
    driver = _SERIAL_DRIVERS.get(key)
    if driver is not None:
        return driver
    loop_mode = -1 if rule_mode is None else rule_mode

    @njit(nogil=True, error_model="numpy")
    def rule_loop(mode, a, b, p, g, s0, s1, s2, e, c, f, ts, gs, use_l2):
        l2, decay = c[_S_L2], c[_S_DECAY]
        # the statements of _apply_full's loop, in the same order
        for i in range(np.uint64(a), np.uint64(b)):
            x = _clip(g[i] * c[_GINV], c[_GCLIP]) * gs
            pi = p[i]
            if use_l2:
                x = x + l2 * pi
            pi = pi * decay
            p[i] = _clip(rule_body(i, x, pi, s0, s1, s2, e, c, f, ts,
                                   mode if loop_mode < 0 else loop_mode), c[_WCLIP])

    _own_symbol(rule_loop, rule_body, loop_mode)

    def _apply_serial_full(body, mode, k, parts, ptr, off, total, scales, cs, f):
        n = off.shape[0] - 1
        t, hi = _tensors(k, parts, off, total)
        c = to_fixed_tuple(cs, _NSCALARS)
        use_l2 = c[_S_L2] != c[_ZERO]
        while t < n and off[t] < hi:
            a, b = _range(k, parts, off, total, t)
            p, g, s0, s1, s2, e = _views(ptr, t, off[t + 1] - off[t], cs[0])
            ts = scales[t]
            gs = scales[n + t] if mode & _V_GSCALE2 else ts
            rule_loop(mode, a, b, p, g, s0, s1, s2, e, c, f, ts, gs, use_l2)
            t += 1

    _apply_serial_full.rule_loop = rule_loop
    _SERIAL_DRIVERS[key] = _apply_serial_full
    return _apply_serial_full


def _apply_full(body, mode, k, parts, ptr, off, total, scales, cs, f):
    """Part ``k`` of the update pass: the step pipeline around ``body``.

    Unscale, maximize and clip_value (``_GINV``, ``_GCLIP``), the norm-clip
    factor ``scales[t]``, the weight-decay stage, the body, ``weight_clip``.
    ``mode`` is a constant of the calling entry point (the variants that change
    which arrays are touched); it folds away, so each loop is branch-free.
    """
    n = off.shape[0] - 1
    t, hi = _tensors(k, parts, off, total)
    c = to_fixed_tuple(cs, _NSCALARS)
    l2, decay = c[_S_L2], c[_S_DECAY]
    use_l2 = l2 != c[_ZERO]
    while t < n and off[t] < hi:
        a, b = _range(k, parts, off, total, t)
        p, g, s0, s1, s2, e = _views(ptr, t, off[t + 1] - off[t], cs[0])
        ts = scales[t]
        gs = scales[n + t] if mode & _V_GSCALE2 else ts  # (a constant test: folds away)
        # unsigned indices: a signed one costs a negative-index wraparound per
        # access, which keeps LLVM from vectorizing the loop
        for i in range(np.uint64(a), np.uint64(b)):
            x = _clip(g[i] * c[_GINV], c[_GCLIP]) * gs
            pi = p[i]
            if use_l2:  # L2 decay; never 0 * p, which is nan for an inf param
                x = x + l2 * pi
            pi = pi * decay  # decoupled decay; decay = 1 leaves every p (inf, nan) as it is
            p[i] = _clip(body(i, x, pi, s0, s1, s2, e, c, f, ts, mode), c[_WCLIP])
        t += 1


def _reduce_full(body, mode, k, parts, ptr, off, total, scales, cs, f, acc):
    """Part ``k`` of a read pass: ``acc[k, t]`` = the float64 sums of the pair ``body`` returns.

    ``body`` gets the *unclipped* scaled grad ``g * c[_GINV]`` and finishes the
    pipeline itself where it needs to (``_grad``).
    """
    n = off.shape[0] - 1
    t, hi = _tensors(k, parts, off, total)
    c = to_fixed_tuple(cs, _NSCALARS)
    while t < n and off[t] < hi:
        a, b = _range(k, parts, off, total, t)
        p, g, s0, s1, s2, e = _views(ptr, t, off[t + 1] - off[t], cs[0])
        ts = scales[t]
        u = 0.0
        w = 0.0
        for i in range(np.uint64(a), np.uint64(b)):
            du, dw = body(i, g[i] * c[_GINV], p[i], s0, s1, s2, e, c, f, ts, mode)
            u += du
            w += dw
        acc[k, t, 0] = u
        acc[k, t, 1] = w
        t += 1


# ------------------------------------------------------------------ reduced precision
# 16-bit storage (docs/design.md, "Precision"; the bit recipes of fastopt.precision,
# ported operation for operation).  An operand's storage code (_C_*) says how it is
# held; the tiled drivers load a tile of every operand into float32, run the
# pipeline and the unchanged rule body on the tiles, and store each written operand
# once: state and float16 params round to nearest even, a bfloat16 param to nearest
# even or stochastically, the float32 master as is.  A tensor with a bfloat16 param
# and grad and two states skips the tiles: ``fused_rule`` (bfloat16 states) and
# ``fused_rule32`` (float32 states, master or not) load, update and store per element
# (docs/design.md, "The fused bfloat16 loop"; ``_fusable`` picks).

_U16, _U32, _U64 = np.uint16, np.uint32, np.uint64
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_F16_SUBNORMAL = np.float32(2.0 ** -24)
_ZERO_U16 = np.uint16(0)
_ZERO_F32 = np.float32(0)
_INF_F32 = np.float32(np.inf)


@intrinsic
def _f32_bits(typingctx, x):
    """The uint32 bit pattern of float32 ``x``."""

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@intrinsic
def _bits_f32(typingctx, u):
    """The float32 whose bit pattern is uint32 ``u``."""

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


@njit(inline="always")
def _bf16_load(h):
    return _bits_f32(_U32(h) << _U32(16))


@njit(inline="always")
def _f16_load(h):
    u = _U32(h)
    s = (u & _U32(0x8000)) << _U32(16)
    e = (u >> _U32(10)) & _U32(0x1F)
    m = u & _U32(0x3FF)
    if e == _U32(31):
        return _bits_f32(s | _U32(0x7F800000) | (m << _U32(13)))
    if e != _U32(0):
        return _bits_f32(s | ((e + _U32(112)) << _U32(23)) | (m << _U32(13)))
    # zero, or a subnormal m * 2**-24: exact in float32
    return _bits_f32(s | _f32_bits(np.float32(m) * _F16_SUBNORMAL))


@njit(inline="always")
def _nan16(u):
    return _U16(((u >> _U32(16)) & _U32(0x8000)) | _U32(0x7FC0))


@intrinsic
def _bf16_rne(typingctx, x):
    """float32 -> bfloat16 bits, nearest even; nan -> the quiet nan ``_nan16`` gives.

    The recipe of ``fastopt.precision`` written as LLVM IR in 32-bit lanes, so
    that a vectorized loop tests for nan with one unordered compare (``u & 0x7FFFFFFF
    > 0x7F800000`` is an unsigned compare AVX2 lacks: three instructions), picks
    between the rounded value and the nan pattern while both are still 32-bit, and
    narrows once.  Written with ``if`` in Numba, LLVM narrowed both candidates and
    the mask apart (three packs and three lane permutes per 16 values) and blended
    them: 16 % slower in ``fused_rule``, 25 % in the tile store loop
    (docs/design.md, "The fused bfloat16 loop").  Same bits.
    """

    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        u = builder.bitcast(args[0], i32)
        hi = builder.lshr(u, i32(16))
        rne = builder.lshr(builder.add(builder.add(u, i32(0x7FFF)), builder.and_(hi, i32(1))),
                           i32(16))
        nan = builder.or_(builder.and_(hi, i32(0x8000)), i32(0x7FC0))
        isnan = builder.fcmp_unordered("uno", args[0], args[0])
        return builder.trunc(builder.select(isnan, nan, rne), ir.IntType(16))

    return types.uint16(types.float32), codegen


@njit(inline="always")
def _mix64(z):
    """SplitMix64's output function (``fastopt.precision.mix64``) of the u64 ``z``."""
    z = (z ^ (z >> _U64(30))) * _MIX1
    z = (z ^ (z >> _U64(27))) * _MIX2
    return z ^ (z >> _U64(31))


@njit(inline="always")
def _bf16_sr_bits(x, r):
    """bfloat16 bits of float32 ``x`` rounded stochastically with the 16 random bits ``r``.

    Both candidates are computed first and one is selected: with an early ``return`` for
    NaN, LLVM sank the load of ``r`` from the bits buffer into the non-NaN branch, and that
    conditional load kept the store loops scalar (the hash it replaces was pure arithmetic,
    safe to speculate); a select mask built as ``0 - (u is NaN)`` came out in 64-bit lanes
    (Numba widens u32 arithmetic), a quarter of the lanes per vector."""
    u = _f32_bits(x)
    v = _U32((u + _U32(r)) >> _U32(16))
    n = _U32(_nan16(u))
    return _U16(n if (u & _U32(0x7FFFFFFF)) > _U32(0x7F800000) else v)


# Stochastic rounding's bits (``fastopt.precision.sr_bits``): element i takes the 16-bit
# slice i & 3 of mix64(key + (i >> 2) * G), one hash per group of four elements.  A
# chunk of at most _SR_CHUNK elements hashes its groups into a stack buffer of u64
# (``_sr_fill``); on a little-endian CPU the buffer's uint16 view holds the slices in
# element order, so element a + j of a chunk starting at a reads u16 number (a & 3) + j.
_SR_CHUNK = 1024  # elements per _sr_fill (a multiple of _TILE)
_SR_WORDS = _SR_CHUNK // 4 + 2  # groups covering a chunk that starts anywhere in a group
if sys.byteorder != "little":  # the uint16 view would hold the slices in reverse order
    raise ImportError("the numba backend's stochastic rounding reads the 16-bit slices of a u64 "
                      "in little-endian order; this CPU is big-endian")


@intrinsic
def _sr_scratch(typingctx):
    """``_SR_WORDS`` u64 on the stack (the function's entry block): the chunk's hashes."""
    from numba.core import cgutils

    def codegen(context, builder, sig, args):
        return cgutils.alloca_once(builder, ir.IntType(64), size=_SR_WORDS)

    return types.CPointer(types.uint64)(), codegen


@intrinsic
def _u16_view(typingctx, ptr):
    """The u64 pointer ``ptr`` as a pointer to uint16 (its 16-bit slices, lowest first)."""

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(16).as_pointer())

    return types.CPointer(types.uint16)(types.CPointer(types.uint64)), codegen


@njit(inline="always")
def _sr_fill(w, key, a, m):
    """``w[k] = mix64(key + (a // 4 + k) * G)`` for the groups that cover elements
    ``[a, a + m)`` (``m <= _SR_CHUNK``): then element ``a + j``'s bits are ``u16[(a & 3) + j]``
    of ``w``.  The hash input advances by G per group: a running sum, no multiply."""
    ua = _U64(a)
    z = key + (ua >> _U64(2)) * _GOLDEN
    for k in range(((ua & _U64(3)) + _U64(m) + _U64(3)) >> _U64(2)):
        w[k] = _mix64(z)
        z += _GOLDEN


@njit(inline="always")
def _sr_store(h, ua, src, m, key, w):
    """``h[ua + j]`` = ``src[j]`` rounded stochastically for ``j < m`` (``ua`` the index of
    the first element within its param; ``w`` an ``_sr_scratch`` buffer), by chunks of
    ``_SR_CHUNK``: hash the chunk's groups, then one loop that reads the bits."""
    r = _u16_view(w)
    done = _U64(0)
    um = _U64(m)
    while done < um:
        c = min(_U64(_SR_CHUNK), um - done)
        a = ua + done
        _sr_fill(w, key, a, c)
        o = a & _U64(3)
        for j in range(c):
            h[a + j] = _bf16_sr_bits(src[done + j], r[o + j])
        done += c


@njit(inline="always")
def _f16_rne(x):
    u = _f32_bits(x)
    s = (u >> _U32(16)) & _U32(0x8000)
    a = u & _U32(0x7FFFFFFF)
    if a > _U32(0x7F800000):
        return _U16(s | _U32(0x7E00))
    if a >= _U32(0x477FF000):
        return _U16(s | _U32(0x7C00))
    if a >= _U32(0x38800000):
        return _U16(s | ((a - _U32(0x38000000) + _U32(0xFFF) + ((a >> _U32(13)) & _U32(1)))
                         >> _U32(13)))
    e = a >> _U32(23)
    m = (a & _U32(0x7FFFFF)) | (_U32(0x800000) if e != _U32(0) else _U32(0))
    sh = _U32(126) - (e if e > _U32(1) else _U32(1))
    if sh >= _U32(25):
        return _U16(s)
    q = m >> sh
    rem = m & ((_U32(1) << sh) - _U32(1))
    half = _U32(1) << (sh - _U32(1))
    up = _U32(1) if rem > half or (rem == half and (q & _U32(1)) != _U32(0)) else _U32(0)
    return _U16(s | (q + up))


@njit(nogil=True)
def _load(tile, addr, code, base, m, n):
    """``tile[:m]`` = float32 values of elements ``[base, base + m)`` of an ``n``-element operand."""
    ub = _U64(base)  # unsigned indices: no wraparound test per access, the loops vectorize
    if code == _C_F32:
        src = numba.carray(_as_ptr(addr, _ZERO_F32), n)
        for j in range(_U64(m)):
            tile[j] = src[ub + j]
    elif code == _C_BF16:
        h = numba.carray(_as_ptr(addr, _ZERO_U16), n)
        for j in range(_U64(m)):
            tile[j] = _bf16_load(h[ub + j])
    else:
        h = numba.carray(_as_ptr(addr, _ZERO_U16), n)
        for j in range(_U64(m)):
            tile[j] = _f16_load(h[ub + j])


@njit(nogil=True)
def _store(tile, addr, code, base, m, n, sr, key):
    """Elements ``[base, base + m)`` of an operand = ``tile[:m]``, rounded once to its storage."""
    ub = _U64(base)
    if code == _C_F32:
        dst = numba.carray(_as_ptr(addr, _ZERO_F32), n)
        for j in range(_U64(m)):
            dst[ub + j] = tile[j]
    elif code == _C_BF16:
        h = numba.carray(_as_ptr(addr, _ZERO_U16), n)
        if sr:  # the bits of the element's index within its param, one hash per 4 elements
            _sr_store(h, ub, tile, m, key, _sr_scratch())
        else:
            for j in range(_U64(m)):
                h[ub + j] = _bf16_rne(tile[j])
    else:
        h = numba.carray(_as_ptr(addr, _ZERO_U16), n)
        for j in range(_U64(m)):
            h[ub + j] = _f16_rne(tile[j])


@njit(nogil=True)
def _load_tiles(tiles, ptr, fmt, t, nt, base, m, n):
    """Load the param (its master when there is one), grad, state and extra tiles of tensor t."""
    if ptr[_M, t] != 0:
        # (the master's code, _C_F32, read from the vector: a literal argument would make
        # Numba compile _load once more for it, as below for _store: ~0.3-0.6 s each)
        _load(tiles[0], ptr[_M, t], fmt[_X_HEAD + _M * nt + t], base, m, n)
    else:
        _load(tiles[0], ptr[_P, t], fmt[_X_HEAD + _P * nt + t], base, m, n)
    _load(tiles[1], ptr[_G, t], fmt[_X_HEAD + _G * nt + t], base, m, n)
    for r in range(_S0, _E + 1):
        if ptr[r, t] != 0:
            _load(tiles[r], ptr[r, t], fmt[_X_HEAD + r * nt + t], base, m, n)


@njit(nogil=True)
def _prefetch_tiles(ptr, fmt, t, nt, base, m, n):
    """Prefetch elements ``[base, base + m)`` of every operand of tensor t (the next tile).

    The tile loop reads memory only in its loaders; while the rule loop runs on
    the tiles no load is in flight, so without this the next tile's loads wait on
    memory that could have been fetched during the rule loop.
    """
    for r in range(_ROWS):
        a = ptr[r, t]
        if a == 0 or (r == _P and ptr[_M, t] != 0):  # the master is read instead
            continue
        size = 4 if r == _M or fmt[_X_HEAD + r * nt + t] == _C_F32 else 2
        lo = a + base * size
        for line in range(lo, lo + m * size, 64):
            _prefetch(line)


@njit(nogil=True)
def _store_f64(addr, i, value):
    """``value`` into element ``i`` of the float64 buffer at ``addr``."""
    numba.carray(_as_ptr(addr, value), i + 1)[i] = value


@njit(nogil=True)
def _finish_tile(tiles, ptr, fmt, t, nt, base, m, n):
    """After the body ran on a tile: store it, or (a dry run) return the sum of p^2.

    The params (``tiles[_P]``) are scaled by the ``max_norm`` factor first when
    there is one; the state, the master and the param are then written once,
    each rounded to its storage.
    """
    pt = tiles[_P]
    if fmt[_X_DRY] != 0:
        u = 0.0
        for j in range(_U64(m)):
            y = np.float64(pt[j])
            u += y * y
        return u
    if fmt[_X_FAC] != 0:
        # float64, as the reference multiplies its float32 params by a float64 scalar:
        # the product is taken in double and rounded once
        fac = numba.carray(_as_ptr(fmt[_X_FAC], 0.0), nt)[t]
        for j in range(_U64(m)):
            pt[j] = np.float64(pt[j]) * fac
    key = _U64(fmt[_X_KEY])
    # Run-time values where literals would do (False; the master's code _C_F32): Numba
    # compiles a jitted callee once per argument types, a literal being a type of its
    # own, so literals here compiled _store three times per cold tiled kernel.
    rne = fmt[_X_DRY] != 0  # False: a dry run has returned above
    for r in range(_S0, _S2 + 1):
        if ptr[r, t] != 0:
            _store(tiles[r], ptr[r, t], fmt[_X_HEAD + r * nt + t], base, m, n, rne, key)
    if ptr[_M, t] != 0:
        _store(pt, ptr[_M, t], fmt[_X_HEAD + _M * nt + t], base, m, n, rne, key)
    _store(pt, ptr[_P, t], fmt[_X_HEAD + _P * nt + t], base, m, n, fmt[_X_SR] != 0, key)
    return 0.0


@njit(inline="always")
def _tile_buffer():
    """The ``(_ROWS, _TILE_STRIDE)`` float32 tiles of one part, at a fixed 4 KiB phase.

    The tile loops store to one row and load from another (and from the operands)
    in the same iteration; x86 cores take a load whose address equals an earlier
    in-flight store's modulo 4 KiB as dependent on it until the full addresses are
    checked ("4K aliasing").  With rows 512 floats apart, rows r and r + 2 were
    exactly 4 KiB apart, and where the buffer began in its page depended on the
    heap's history (in one process, allocations made before the steps moved a
    one-thread bfloat16 Adam step between 7.2 and 11.5 ms).  So the rows are
    padded (``_TILE_STRIDE``) and the buffer starts ``_TILE_PHASE`` bytes past a
    4 KiB boundary, away from the operands (large arrays start 16 bytes past a
    page).  A precaution: its effect was not measured apart from the changes of
    ``_tiled_driver``.

    Returns the flat buffer; ``_tile_row`` cuts the rows out of it.
    """
    size = _ROWS * _TILE_STRIDE
    raw = np.empty(size + 1024, np.float32)
    o = ((_TILE_PHASE - np.int64(raw.ctypes.data) % 4096) % 4096) // 4  # < 1024 spare floats
    return raw[o:o + size]


@njit(inline="always")
def _tile_row(buf, r):
    """Row ``r`` of the flat tile buffer (``r`` a constant: see ``_apply_tiled``)."""
    return buf[r * _TILE_STRIDE:r * _TILE_STRIDE + _TILE]


#: (rule body, entry point mode) -> its ``_apply_tiled`` (see ``_tiled_driver``)
_TILED_DRIVERS = {}


@intrinsic
def _scratch_f32(typingctx):
    """A one-float32 stack slot in the function's entry block (its pointer).

    ``fused_rule`` hands the rule body such slots as its one-element state
    arrays: LLVM promotes them to registers, so the body's ``m[i]`` reads and
    writes become plain values inside the element loop.
    """
    from numba.core import cgutils

    def codegen(context, builder, sig, args):
        return cgutils.alloca_once(builder, ir.FloatType())

    return types.CPointer(types.float32)(), codegen


def _tiled_driver(rule_body, rule_mode):
    """``_apply_tiled`` for one rule body and mode: the driver the ``_apply`` overload picks.

    The rule loop over the tiles is a jitted function of its own (``tile_rule``),
    not inlined by Numba.  Written inline in the driver, the loop came out scalar
    in the copy of the kernel that a compiling process runs (Numba's parfor
    lowering compiles the loop's function once on its own and once more inside the
    entry point, and the process calls the first copy; only the second, which the
    on-disk cache stores, was vectorized -- see "Speed of the tiled loop" in
    docs/design.md).  As a function of its own, with the rows at constant offsets
    of one flat buffer (so LLVM sees that they cannot overlap and needs no run-time
    overlap checks), it vectorizes in every copy.  The body is a closure variable,
    not an argument: a jitted function passed as an argument to a non-inlined
    function becomes a run-time address, which keeps Numba from caching the kernel.
    ``rule_mode`` (the entry point's variant bits, a constant of its source) is a
    closure constant too, so the body's variant tests fold away in ``tile_rule``'s
    own compile; ``None`` when the caller's mode was not a literal (it then goes
    through as an argument).
    """
    key = (rule_body, rule_mode)
    driver = _TILED_DRIVERS.get(key)
    if driver is not None:
        return driver
    tile_mode = -1 if rule_mode is None else rule_mode | _V_TILE
    may_fuse = _two_state_body(rule_body)

    @njit(inline="always")
    def fused_element(j, mode, p, g, h0, h1, s0, s1, s2, e, c, f, ts, gs, use_l2, clip):
        # The pipeline and the rule body for element j; stores the two states and
        # returns the new param (float32, not yet rounded).  ``clip``: a constant of
        # the calling loop; False where clip_value and weight_clip are both inf, where
        # each _clip is x itself (nan and inf included), so the loop skips them.
        s0[0] = _bf16_load(h0[j])
        s1[0] = _bf16_load(h1[j])
        x = _bf16_load(g[j]) * c[_GINV]
        if clip:
            x = _clip(x, c[_GCLIP])
        x = x * gs
        pi = _bf16_load(p[j])
        if use_l2:  # L2 decay; never 0 * p, which is nan for an inf param
            x = x + c[_S_L2] * pi
        pi = pi * c[_S_DECAY]
        pn = rule_body(0, x, pi, s0, s1, s2, e, c, f, ts, mode if tile_mode < 0 else tile_mode)
        if clip:
            pn = _clip(pn, c[_WCLIP])
        h0[j] = _bf16_rne(s0[0])
        h1[j] = _bf16_rne(s1[0])
        return pn

    @njit(nogil=True, error_model="numpy")
    def fused_rule(mode, pa, ga, s0a, s1a, a, b, c, f, ts, gs, use_l2, sr, key):
        # Elements [a, b) of a tensor whose param, grad and two states are all
        # bfloat16 (states rounded to nearest even, the param too or, with sr,
        # stochastically): per element, load the bits as float32, run the pipeline
        # and the rule body, store each value with one rounding -- no tile buffer.
        # The body's state arrays are one-float stack slots (index 0) that LLVM
        # keeps in registers; four raw operand pointers need six run-time overlap
        # checks, within LLVM's default limit of eight, so the loop vectorizes
        # (checked with the loop-vectorize remarks; docs/design.md).
        p = numba.carray(_as_ptr(pa, _ZERO_U16), b)
        g = numba.carray(_as_ptr(ga, _ZERO_U16), b)
        h0 = numba.carray(_as_ptr(s0a, _ZERO_U16), b)
        h1 = numba.carray(_as_ptr(s1a, _ZERO_U16), b)
        s0, s1 = numba.carray(_scratch_f32(), 1), numba.carray(_scratch_f32(), 1)
        s2, e = numba.carray(_scratch_f32(), 1), numba.carray(_scratch_f32(), 1)
        if sr:  # by chunks: hash the chunk's groups of four (_sr_fill), then the loop
            w = _sr_scratch()
            r = _u16_view(w)
            j0 = _U64(a)
            while j0 < _U64(b):
                j1 = min(j0 + _U64(_SR_CHUNK), _U64(b))
                _sr_fill(w, key, j0, j1 - j0)
                o = (j0 & _U64(3)) - j0  # element j reads r[j + o] (u64 arithmetic wraps back)
                for j in range(j0, j1):
                    pn = fused_element(j, mode, p, g, h0, h1, s0, s1, s2, e, c, f, ts, gs, use_l2,
                                       True)
                    p[j] = _bf16_sr_bits(pn, r[j + o])
                j0 = j1
        elif c[_GCLIP] == _INF_F32 and c[_WCLIP] == _INF_F32:  # no clipping: ~8 % faster
            for j in range(_U64(a), _U64(b)):
                pn = fused_element(j, mode, p, g, h0, h1, s0, s1, s2, e, c, f, ts, gs, use_l2,
                                   False)
                p[j] = _bf16_rne(pn)
        else:
            for j in range(_U64(a), _U64(b)):
                pn = fused_element(j, mode, p, g, h0, h1, s0, s1, s2, e, c, f, ts, gs, use_l2,
                                   True)
                p[j] = _bf16_rne(pn)

    @njit(inline="always")
    def fused_element32(j, mode, pi, g, s0, s1, s2, e, c, f, ts, gs, use_l2):
        # fused_element for float32 states and no clipping (see fused_rule32): the body
        # reads and writes the state arrays themselves at j (no conversion); ``pi`` is the
        # param's float32 value (of the bfloat16 param, or of its float32 master).
        # Returns the new param, unrounded.
        x = _bf16_load(g[j]) * c[_GINV] * gs
        if use_l2:
            x = x + c[_S_L2] * pi
        pi = pi * c[_S_DECAY]
        return rule_body(j, x, pi, s0, s1, s2, e, c, f, ts, mode if tile_mode < 0 else tile_mode)

    @njit(nogil=True, error_model="numpy")
    def fused_rule32(mode, pa, ga, s0a, s1a, ma, a, b, c, f, ts, gs, use_l2):
        # Elements [a, b) of a tensor with a bfloat16 param and grad and two float32
        # states, with or without a float32 master (``ma``: its address, or 0): the
        # states are updated in place as float32, the master (when there is one) written
        # as is, and the param written as the nearest-even rounding of the new value
        # (without a master the param is read from its bits).  Five operand pointers,
        # four written: each of the two loops vectorizes.  Only where clip_value and
        # weight_clip are both inf (the default; each clip is then x itself), and with no
        # stochastic rounding (here it measured no faster than the tiles): a clipping form
        # of both loops would add ~0.5 s to every cold compile (docs/design.md).
        p = numba.carray(_as_ptr(pa, _ZERO_U16), b)
        g = numba.carray(_as_ptr(ga, _ZERO_U16), b)
        s0 = numba.carray(_as_ptr(s0a, _ZERO_F32), b)
        s1 = numba.carray(_as_ptr(s1a, _ZERO_F32), b)
        s2, e = numba.carray(_scratch_f32(), 1), numba.carray(_scratch_f32(), 1)
        if ma != 0:
            w = numba.carray(_as_ptr(ma, _ZERO_F32), b)
            for j in range(_U64(a), _U64(b)):
                pn = fused_element32(j, mode, w[j], g, s0, s1, s2, e, c, f, ts, gs, use_l2)
                w[j] = pn
                p[j] = _bf16_rne(pn)
        else:
            for j in range(_U64(a), _U64(b)):
                pn = fused_element32(j, mode, _bf16_load(p[j]), g, s0, s1, s2, e, c, f, ts,
                                     gs, use_l2)
                p[j] = _bf16_rne(pn)

    if may_fuse:  # per-body closures: each its own symbol (the module-level stubs are one)
        _own_symbol(fused_rule, rule_body, tile_mode)
        _own_symbol(fused_rule32, rule_body, tile_mode)
    else:  # no rule of this body keeps two states: compile no fused loop
        fused_rule, fused_rule32 = _no_fused_rule, _no_fused_rule32

    @njit(nogil=True, error_model="numpy")
    def tile_rule(mode, m, buf, c, f, ts, gs, use_l2):
        # The pipeline of _apply_full and the rule body over the first m floats of
        # the tiles.
        pt, gt = _tile_row(buf, _P), _tile_row(buf, _G)
        s0, s1, s2, e = (_tile_row(buf, _S0), _tile_row(buf, _S1), _tile_row(buf, _S2),
                         _tile_row(buf, _E))
        l2, decay = c[_S_L2], c[_S_DECAY]
        for j in range(_U64(m)):
            x = _clip(gt[j] * c[_GINV], c[_GCLIP]) * gs
            pi = pt[j]
            if use_l2:  # L2 decay; never 0 * p, which is nan for an inf param
                x = x + l2 * pi
            pi = pi * decay
            pt[j] = _clip(rule_body(j, x, pi, s0, s1, s2, e, c, f, ts,
                                    mode if tile_mode < 0 else tile_mode), c[_WCLIP])

    _own_symbol(tile_rule, rule_body, tile_mode)

    def _apply_tiled(body, mode, k, parts, ptr, off, total, scales, cs, f):
        """Part ``k`` of the update pass of a reduced-precision call (``f``: the format vector).

        Per tile of ``_TILE`` elements: load every operand as float32, run the same
        pipeline as ``_apply_full`` on the tiles, then either add the squares of the
        new params to the ``max_norm`` sums (a dry run writes nothing) or scale them
        by the ``max_norm`` factor and store every written operand with its one
        rounding.  The grads' norm-clip factors come through the vector
        (``_X_GSCALE``): the second pass of a trust-ratio rule gets ``lr * trust``
        (float64, see ``_k_lamb_exact``) as ``scales``.
        """
        nt = off.shape[0] - 1
        t, hi = _tensors(k, parts, off, total)
        c = to_fixed_tuple(cs, _NSCALARS)
        use_l2 = c[_S_L2] != c[_ZERO]
        noclip = c[_GCLIP] == _INF_F32 and c[_WCLIP] == _INF_F32
        fmt = f
        f = fmt[_X_FLAGS]
        dry = fmt[_X_DRY] != 0
        gscale = numba.carray(_as_ptr(fmt[_X_GSCALE], cs[0]), nt)  # the norm-clip factors
        buf = _tile_buffer()
        tiles = buf.reshape((_ROWS, _TILE_STRIDE))  # the same memory, for the loaders
        while t < nt and off[t] < hi:
            a, b = _range(k, parts, off, total, t)
            n = off[t + 1] - off[t]
            ts, gs = scales[t], gscale[t]
            fuse = _fusable(ptr, fmt, t, nt) if may_fuse else -1
            if fuse == _C_BF16:  # all bfloat16: no tiles
                fused_rule(mode | _V_TILE, ptr[_P, t], ptr[_G, t], ptr[_S0, t], ptr[_S1, t],
                           a, b, c, f, ts, gs, use_l2, fmt[_X_SR] != 0, _U64(fmt[_X_KEY]))
                t += 1
                continue
            if fuse == _C_F32 and noclip:  # bfloat16 param and grad, float32 states
                fused_rule32(mode | _V_TILE, ptr[_P, t], ptr[_G, t], ptr[_S0, t],
                             ptr[_S1, t], ptr[_M, t], a, b, c, f, ts, gs, use_l2)
                t += 1
                continue
            sumsq = 0.0
            base = a
            while base < b:
                m = min(_TILE, b - base)
                _load_tiles(tiles, ptr, fmt, t, nt, base, m, n)
                if base + m < b:
                    _prefetch_tiles(ptr, fmt, t, nt, base + m, min(_TILE, b - base - m), n)
                tile_rule(mode | _V_TILE, m, buf, c, f, ts, gs, use_l2)
                sumsq += _finish_tile(tiles, ptr, fmt, t, nt, base, m, n)
                base += m
            if dry:
                _store_f64(fmt[_X_ACC], k * nt + t, sumsq)  # acc[k, t] of the (parts, nt) sums
            t += 1

    _apply_tiled.tile_rule = tile_rule  # for tests/test_numba_tile_loop.py
    _apply_tiled.fused_rule = fused_rule
    _apply_tiled.fused_rule32 = fused_rule32
    _TILED_DRIVERS[key] = _apply_tiled
    return _apply_tiled


@njit(nogil=True)
def _no_fused_rule(mode, pa, ga, s0a, s1a, a, b, c, f, ts, gs, use_l2, sr, key):
    """``fused_rule`` of a body that never has two states (never called: see below)."""


@njit(nogil=True)
def _no_fused_rule32(mode, pa, ga, s0a, s1a, ma, a, b, c, f, ts, gs, use_l2):
    """``fused_rule32`` of a body that never has two states (never called)."""


_TWO_STATE_BODIES = None


def _two_state_body(body) -> bool:
    """Whether some rule whose entry point runs ``body`` keeps two or more states and no
    extra input, so that ``_fusable`` can pick a fused loop for it.

    The fused loops (both compiled into every tiled kernel that may use them) were ~2.2 s
    of the ~9 s compile of a cold bfloat16 Adam kernel (CPU, load 3); a body of a
    one-state rule (SGD, Adagrad, Lion, ...), or ``_scale``/``_identity`` (``scale_``,
    ``clip_``), gets stubs in their place and ``_fusable`` is not consulted.  Read from
    ``_ENTRIES`` (the global names each entry point's code loads) and ``RULES``.
    """
    global _TWO_STATE_BODIES
    if _TWO_STATE_BODIES is None:
        names = set()
        for (name, _), entry in _ENTRIES.items():
            rule = RULES[name]
            if len(rule.all_state) >= 2 and rule.extra is None:
                for fn in (entry, _EXACT.get(entry, entry)):
                    names.update(fn.py_func.__code__.co_names)
        _TWO_STATE_BODIES = frozenset(names)
    return getattr(body, "py_func", body).__name__ in _TWO_STATE_BODIES


@njit(inline="always")
def _fusable(ptr, fmt, t, nt):
    """Which per-element loop can run tensor t's update: ``_C_BF16`` for ``fused_rule``,
    ``_C_F32`` for ``fused_rule32``, else -1 (the tiles).

    Both need a bfloat16 param and grad, exactly two states (no third, no extra input)
    and no ``max_norm`` (dry run or factor).  ``fused_rule``: two bfloat16 states and no
    master (the param rounds to nearest even or stochastically); ``fused_rule32``: two
    float32 states, with or without a float32 master, the param rounded to nearest even
    (the caller also requires clip_value and weight_clip to be inf for that one).
    """
    if fmt[_X_DRY] != 0 or fmt[_X_FAC] != 0:
        return -1
    if ptr[_S2, t] != 0 or ptr[_E, t] != 0 or ptr[_S0, t] == 0 or ptr[_S1, t] == 0:
        return -1
    if fmt[_X_HEAD + _P * nt + t] != _C_BF16 or fmt[_X_HEAD + _G * nt + t] != _C_BF16:
        return -1
    state = fmt[_X_HEAD + _S0 * nt + t]
    if fmt[_X_HEAD + _S1 * nt + t] != state:
        return -1
    if state == _C_BF16 and ptr[_M, t] == 0:
        return _C_BF16
    if state == _C_F32 and fmt[_X_SR] == 0:
        return _C_F32
    return -1


def _reduce_tiled(body, mode, k, parts, ptr, off, total, scales, cs, f, acc):
    """``_reduce_full`` on float32 tiles: the body's state writes stay in the tiles.

    LAMB's first pass needs this step's moments only for the norms; the second
    pass recomputes them from the stored state (``_V_TILE``) and stores them
    once, so a 16-bit state is rounded once and pass 2 sees the float32 moments
    the reference sees.
    """
    nt = off.shape[0] - 1
    t, hi = _tensors(k, parts, off, total)
    c = to_fixed_tuple(cs, _NSCALARS)
    fmt = f
    f = fmt[_X_FLAGS]
    tiles = _tile_buffer().reshape((_ROWS, _TILE_STRIDE))
    pt, gt = tiles[_P], tiles[_G]
    s0, s1, s2, e = tiles[_S0], tiles[_S1], tiles[_S2], tiles[_E]
    while t < nt and off[t] < hi:
        a, b = _range(k, parts, off, total, t)
        n = off[t + 1] - off[t]
        ts = scales[t]
        u = 0.0
        w = 0.0
        base = a
        while base < b:
            m = min(_TILE, b - base)
            _load_tiles(tiles, ptr, fmt, t, nt, base, m, n)
            for j in range(m):
                du, dw = body(j, gt[j] * c[_GINV], pt[j], s0, s1, s2, e, c, f, ts,
                              mode | _V_TILE)
                u += du
                w += dw
            base += m
        acc[k, t, 0] = u
        acc[k, t, 1] = w
        t += 1


# Numba compiles an inlined overload once on its own before inlining it, and a
# rule body called from it is compiled then, inheriting that compile's error
# model; whichever compile of a body's signature comes first is the one every
# later caller links.  The Python model (Numba's default) tests every float
# divisor for zero to raise ZeroDivisionError: an early exit that keeps LLVM
# from vectorizing the loop (the 16-bit tile loop ran scalar, ~4 ns/elem).  The
# NumPy model (x / 0 is inf or nan, as in the reference) is set here and on the
# entry points, so the body is the same code whatever compiles it first.
_BODY_JIT = {"error_model": "numpy"}


# ``prefer_literal``: the entry point's mode (a constant in its source) is first offered
# as a literal; the tiled driver bakes it into its rule loop (``_tiled_driver``).  The
# full-precision driver takes it too: declined, it was typed with a plain int, which
# compiled the rule body once more for that int (the literal call that the inlined
# code makes compiles it anyway); the machine code is the same either way (the mode
# is a constant of the entry point and folds away in LLVM).
@overload(_apply, inline="always", prefer_literal=True, jit_options=_BODY_JIT)
def _apply_overload(body, mode, k, parts, ptr, off, total, scales, cs, f):
    literal = isinstance(mode, types.IntegerLiteral)
    if isinstance(f, types.Array):
        return _tiled_driver(body.dispatcher, mode.literal_value if literal else None)
    return _apply_full


@overload(_apply_serial, inline="always", prefer_literal=True, jit_options=_BODY_JIT)
def _apply_serial_overload(body, mode, k, parts, ptr, off, total, scales, cs, f):
    literal = isinstance(mode, types.IntegerLiteral)
    if isinstance(f, types.Array):  # reduced precision: the tiled driver, as in _apply
        return _tiled_driver(body.dispatcher, mode.literal_value if literal else None)
    return _serial_driver(body.dispatcher, mode.literal_value if literal else None)


@overload(_reduce, inline="always", jit_options=_BODY_JIT)
def _reduce_overload(body, mode, k, parts, ptr, off, total, scales, cs, f, acc):
    return _reduce_tiled if isinstance(f, types.Array) else _reduce_full


def _inline_only(func):
    """Type an ``inline="always"`` overload of ``func`` without compiling it on its own.

    Numba types such an overload by running the type inference of the implementation
    it returns (that is all the inliner needs), but first compiles the implementation
    as a standalone function as well -- typing, lowering, LLVM -- only to check that it
    compiles, and throws the result away (``_build_impl`` and ``get_call_template`` in
    ``numba.core.typing.templates``).  For ``_apply`` that was a quarter of an entry
    point's compile (with one more compile of the rule body, for an ``int`` mode that
    the inlined code never uses).  Here the implementation's dispatcher is made with
    compiling disabled: the type inference and the inlined code are the same, so the
    entry point's machine code is the same, and an implementation that fails to type
    still fails the entry point's compile with Numba's error.
    """
    from numba.core.typing.templates import builtin_registry

    templates = [t for f, ty in builtin_registry.globals if f is func
                 for t in getattr(ty, "templates", ())]
    templates = [t for t in templates if hasattr(t, "_get_jit_decorator")]
    if not templates:
        return  # numba's internals moved: leave the overload as it is (only slower to compile)
    for t in templates:
        make = t._get_jit_decorator

        def _get_jit_decorator(self, make=make):
            jitter = make(self)

            def with_options(**options):
                decorate = jitter(**options)

                def typed_only(pyfunc):
                    disp = decorate(pyfunc)
                    disp._can_compile = False  # (disable_compile() wants a signature first)
                    return disp

                return typed_only

            return with_options

        t._get_jit_decorator = _get_jit_decorator


_inline_only(_apply)
_inline_only(_apply_serial)
_inline_only(_reduce)


@njit(inline="always")
def _grad(x, c, ts):
    """The clip_value and norm-clip steps on an unscaled grad, as ``_apply`` does them."""
    return _clip(x, c[_GCLIP]) * ts


# ------------------------------------------------------------------ rule bodies
# body(i, g, p, s0, s1, s2, e, c, f, ts, mode) -> new p.  g is the grad after the
# pipeline and the L2 stage, p the param after the decoupled-decay stage; s0..s2 are
# the rule's states in the order of Rule.all_state; c is the scalar tuple (read by
# name: c[_S_...]), f the runtime flag bits (_F_...), mode the entry point's variant
# bits (_V_...).  Each expression keeps the reference's order of operations.


@njit(inline="always")
def _moments(i, m, v, g, x, c):
    """m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*x*x (x = g, or AdaHessian's D); returns (m, v)."""
    mi = c[_S_BETA1] * m[i] + c[_S_ONE_MINUS_BETA1] * g
    vi = c[_S_BETA2] * v[i] + c[_S_ONE_MINUS_BETA2] * x * x
    m[i] = mi
    v[i] = vi
    return mi, vi


@njit(inline="always")
def _sgd(i, g, p, buf, s1, s2, e, c, f, ts, mode):  # 12 B/elem (+8 with momentum)
    if mode & _V_SGD_MOMENTUM:  # at t=1 keep=0, gain=1 make b = g
        b = c[_S_MOMENTUM_KEEP] * buf[i] + c[_S_MOMENTUM_GAIN] * g
        buf[i] = b
        g = g + c[_S_MOMENTUM] * b if f & _F_NESTEROV else b
    return p - c[_S_LR] * g


@njit(inline="always")
def _adam(i, g, p, m, v, vmax, e, c, f, ts, mode):  # 28 B/elem (+8 with amsgrad)
    mi, vi = _moments(i, m, v, g, g, c)
    if mode & _V_ADAM_AMSGRAD:
        vi = _maximum(vmax[i], vi)
        vmax[i] = vi
    # sqrt(v / bc2) as sqrt(v) / sqrt(bc2), as torch.optim.Adam and the reference
    return p - c[_S_STEP_SIZE] * mi / (np.sqrt(vi) / c[_S_BC2_SQRT] + c[_S_EPS])


@njit(inline="always")
def _adagrad(i, g, p, acc, s1, s2, e, c, f, ts, mode):  # 20 B/elem
    a = acc[i] + g * g
    acc[i] = a
    return p - c[_S_CLR] * g / (np.sqrt(a) + c[_S_EPS])


@njit(inline="always")
def _rmsprop(i, g, p, sq, buf, gavg, e, c, f, ts, mode):  # 20 B/elem (+8 momentum, +8 centered)
    alpha, alpha1, eps = c[_S_ALPHA], c[_S_ONE_MINUS_ALPHA], c[_S_EPS]
    v = alpha * sq[i] + alpha1 * g * g
    sq[i] = v
    if mode & _V_RMSPROP_CENTERED:
        a = alpha * gavg[i] + alpha1 * g
        gavg[i] = a
        d = np.sqrt(v - a * a) + eps
    else:
        d = np.sqrt(v) + eps
    if mode & _V_RMSPROP_MOMENTUM:
        b = c[_S_MOMENTUM] * buf[i] + g / d
        buf[i] = b
        return p - c[_S_LR] * b
    return p - c[_S_LR] * g / d


@njit(inline="always")
def _adadelta(i, g, p, sq, acc, s2, e, c, f, ts, mode):  # 28 B/elem
    rho, rho1, eps = c[_S_RHO], c[_S_ONE_MINUS_RHO], c[_S_EPS]
    v = rho * sq[i] + rho1 * g * g
    sq[i] = v
    u = acc[i]
    delta = np.sqrt(u + eps) / np.sqrt(v + eps) * g
    acc[i] = rho * u + rho1 * delta * delta
    return p - c[_S_LR] * delta


@njit(inline="always")
def _adamax(i, g, p, m, u, s2, e, c, f, ts, mode):  # 28 B/elem
    # m alone: the infinity norm takes the place of v (u = max(b2*u, |g| + eps))
    mi = c[_S_BETA1] * m[i] + c[_S_ONE_MINUS_BETA1] * g
    m[i] = mi
    ui = _maximum(c[_S_BETA2] * u[i], abs(g) + c[_S_EPS])
    u[i] = ui
    return p - c[_S_CLR] * mi / ui


@njit(inline="always")
def _nadam(i, g, p, m, v, s2, e, c, f, ts, mode):  # 28 B/elem
    mi, vi = _moments(i, m, v, g, g, c)
    denom = np.sqrt(vi) / c[_S_BC2_SQRT] + c[_S_EPS]
    p = p - c[_S_C_GRAD] * g / denom
    return p - c[_S_C_AVG] * mi / denom


@njit(inline="always")
def _radam(i, g, p, m, v, s2, e, c, f, ts, mode):  # 28 B/elem
    mi, vi = _moments(i, m, v, g, g, c)
    if f & _F_RECTIFY:  # rho_t > 5
        return p - c[_S_STEP_SIZE] * mi / (np.sqrt(vi) + c[_S_EPS])
    return p - c[_S_STEP_SIZE] * mi


@njit(inline="always")
def _lion(i, g, p, m, s1, s2, e, c, f, ts, mode):  # 20 B/elem
    # not _moments: Lion interpolates with beta1 for the step and beta2 for the state
    lr, mi = c[_S_LR], m[i]
    u = c[_S_BETA1] * mi + c[_S_ONE_MINUS_BETA1] * g
    # lr * sign(u): sign(0) = 0 and sign(nan) = nan, as np.sign
    step = lr if u > c[_ZERO] else (-lr if u < c[_ZERO] else lr * u)
    m[i] = c[_S_BETA2] * mi + c[_S_ONE_MINUS_BETA2] * g
    return p - step


@njit(inline="always")
def _adahessian(i, g, p, m, v, s2, e, c, f, ts, mode):  # 32 B/elem: + the Hessian diagonal
    mi, vi = _moments(i, m, v, g, e[i] * c[_EINV], c)
    d = np.sqrt(vi) / c[_S_BC2_SQRT]
    if mode & _V_POW:  # power 1 skips the pow call (see _V_POW)
        d = d ** c[_S_HESSIAN_POWER]
    return p - c[_S_STEP_SIZE] * mi / (d + c[_S_EPS])


@njit(inline="always")
def _lamb_r(p, mi, vi, c):
    """LAMB's direction r = m_hat / (sqrt(v_hat) + eps) + wd * p (its own decay, in r)."""
    return ((mi / c[_S_BC1]) / (np.sqrt(vi) / c[_S_BC2_SQRT] + c[_S_EPS])
            + c[_S_WEIGHT_DECAY] * p)


@njit(inline="always")
def _lamb_moments(i, u, p, m, v, s2, e, c, f, ts, mode):  # pass 1, 28 B/elem: (p^2, r^2)
    g = _grad(u, c, ts)
    mi, vi = _moments(i, m, v, g, g, c)
    r = np.float64(_lamb_r(p, mi, vi, c))
    pd = np.float64(p)
    return pd * pd, r * r


@njit(inline="always")
def _lamb_step(i, g, p, m, v, s2, e, c, f, ts, mode):  # pass 2, 16 B/elem; ts = lr * trust
    if mode & _V_TILE:  # reduced precision: pass 1 stored no moments (see _reduce_tiled)
        mi, vi = _moments(i, m, v, g, g, c)
        return p - ts * _lamb_r(p, mi, vi, c)
    return p - ts * _lamb_r(p, m[i], v[i], c)


@njit(inline="always")
def _lars_u(g, p, c):
    """LARS's direction u = g + wd * p (its own decay; none when wd is 0, as optax skips it)."""
    wd = c[_S_WEIGHT_DECAY]
    return g + wd * p if wd != c[_ZERO] else g


@njit(inline="always")
def _lars_norms(i, x, p, m, s1, s2, e, c, f, ts, mode):  # pass 1, 8 B/elem: (p^2, u^2), no writes
    u = np.float64(_lars_u(_grad(x, c, ts), p, c))
    pd = np.float64(p)
    return pd * pd, u * u


@njit(inline="always")
def _lars_step(i, g, p, m, s1, s2, e, c, f, ts, mode):  # pass 2, 20 B/elem; ts = -(lr * trust)
    d = ts * _lars_u(g, p, c)
    mi = d + c[_S_MOMENTUM] * m[i]  # optax's trace: new = update + momentum * old
    m[i] = mi
    if f & _F_NESTEROV:
        return p + (d + c[_S_MOMENTUM] * mi)
    return p + mi


@njit(inline="always")
def _asgd(i, g, p, ax, s1, s2, e, c, f, ts, mode):  # 20 B/elem
    p = p * c[_S_ETA_DECAY] - c[_S_ETA] * g
    if f & _F_AVERAGE_COPY:  # mu == 1: torch copies p (ax + (p - ax) * 1 may round)
        ax[i] = p
    else:
        a = ax[i]
        ax[i] = a + (p - a) * c[_S_MU]
    return p


@njit(inline="always")
def _rprop(i, g, p, prev, size, s2, e, c, f, ts, mode):  # 28 B/elem
    z = c[_ZERO]
    d = g * prev[i]
    si = size[i]
    # the factor is etaplus, etaminus or 1 (no literal: times 1 is si itself); nan stays nan
    if d > z:
        si = si * c[_S_ETAPLUS]
    elif d < z:
        si = si * c[_S_ETAMINUS]
        g = z  # a flipped sign: this grad counts as 0 (torch zeroes it)
    elif d != d:
        si = si * d
    # clamp as torch: nan stays nan
    if si < c[_S_STEP_SIZE_MIN]:
        si = c[_S_STEP_SIZE_MIN]
    elif si > c[_S_STEP_SIZE_MAX]:
        si = c[_S_STEP_SIZE_MAX]
    size[i] = si
    prev[i] = g
    # p -= sign(g) * size: sign(0) = 0 and sign(nan) = nan, as np.sign
    return p - (si if g > z else (-si if g < z else g * si))


@njit(inline="always")
def _adabelief(i, g, p, m, v, s2, e, c, f, ts, mode):  # 28 B/elem
    mi = c[_S_BETA1] * m[i] + c[_S_ONE_MINUS_BETA1] * g
    m[i] = mi
    r = g - mi  # the belief residual: how far g is from its prediction
    vi = c[_S_BETA2] * v[i] + c[_S_ONE_MINUS_BETA2] * r * r + c[_S_EPS_ROOT]
    v[i] = vi
    d = np.sqrt(vi) / c[_S_BC2_SQRT] + c[_S_EPS]
    p = p - c[_S_C_AVG] * mi / d
    if f & _F_NESTEROV:
        p = p - c[_S_C_GRAD] * g / d
    return p


@njit(inline="always")
def _yogi(i, g, p, m, v, s2, e, c, f, ts, mode):  # 28 B/elem
    mi = c[_S_BETA1] * m[i] + c[_S_ONE_MINUS_BETA1] * g
    m[i] = mi
    g2 = g * g
    vi = v[i]
    dv = vi - g2
    w = c[_S_ONE_MINUS_BETA2]
    # (1 - b2) * sign(v - g^2), sign(nan) = nan as np.sign
    w = w if dv > c[_ZERO] else (-w if dv < c[_ZERO] else dv * c[_ZERO])
    vi = vi - w * g2
    v[i] = vi
    return p - c[_S_STEP_SIZE] * mi / (np.sqrt(vi) / c[_S_BC2_SQRT] + c[_S_EPS])


@njit(inline="always")
def _ademamix(i, g, p, m1, m2, nu, e, c, f, ts, mode):  # 36 B/elem
    a = c[_S_BETA1] * m1[i] + c[_S_ONE_MINUS_BETA1] * g
    b = c[_S_BETA3] * m2[i] + c[_S_ONE_MINUS_BETA3] * g
    v = c[_S_BETA2] * nu[i] + c[_S_ONE_MINUS_BETA2] * g * g
    m1[i] = a
    m2[i] = b
    nu[i] = v
    d = np.sqrt(v) / c[_S_BC2_SQRT] + c[_S_EPS]
    return p - c[_S_LR] * ((a / c[_S_BC1] + c[_S_ALPHA] * b) / d)


@njit(inline="always")
def _sf_interpolate(i, p, z, u, c, f):
    """Schedule-Free's y = lerp(y, z, ckp1) (torch's form: c_lerp, lerp_swap); y += y_lr*u;
    z -= lr*u; returns the new y (the param)."""
    zi = z[i]
    if f & _F_LERP_SWAP:
        p = zi + c[_S_C_LERP] * (p - zi)
    else:
        p = p + c[_S_C_LERP] * (zi - p)
    p = p + c[_S_Y_LR] * u
    z[i] = zi - c[_S_LR] * u
    return p


@njit(inline="always")
def _sf_adamw(i, g, p, z, v, s2, e, c, f, ts, mode):  # 28 B/elem
    vi = c[_S_BETA2] * v[i] + c[_S_ONE_MINUS_BETA2] * g * g
    v[i] = vi
    u = g / (np.sqrt(vi / c[_S_BC2]) + c[_S_EPS])
    wd = c[_S_WEIGHT_DECAY]
    if wd != c[_ZERO]:  # the decay at y; never 0 * p, which is nan for an inf param
        u = u + wd * p
    return _sf_interpolate(i, p, z, u, c, f)


@njit(inline="always")
def _sf_sgd(i, g, p, z, s1, s2, e, c, f, ts, mode):  # 20 B/elem
    return _sf_interpolate(i, p, z, g, c, f)


# The read pass (the non-finite check, the norms) sums fixed blocks of _BLOCK
# elements of each tensor: every block is summed by the same code wherever a part
# boundary falls, and the block sums of a tensor are added in block order, so the
# result does not depend on the thread count (nor on timing).  Inside a block the
# loop vectorizes (fastmath "reassoc": several independent accumulators; inf and
# nan semantics kept) and each square is added by one fused multiply-add
# (fastmath "contract"; see _block_sums).
_BLOCK = 8192


def _read_blocks(k, parts, ptr, off, boff, cs, flags, out):
    """Part ``k`` of the read pass (see the overload: ``flags`` an int or a format vector)."""
    raise NotImplementedError("only callable from a jitted function")


@njit(inline="always")
def _block_sums(x, a, b, ginv, gclip, exact):
    """(sum of clip(x*ginv)^2, sum of x*ginv*0) over ``x[a:b]`` (see ``_read_blocks_full``).

    Its callers compile it with fastmath "reassoc" and "contract": ``u += y * y`` is one
    fused multiply-add.  For float32 grads that is the same bits as a multiply and an
    add, since the square of a float32 value is exact in float64 (48 significant bits);
    for float64 grads the square is no longer rounded before the add (every numba path
    sums through this function, so they still agree bit for bit).  ``y * 0.0`` is
    exact too.  The fast form skips the multiply by ``ginv`` when it is 1 (no loss
    scale, the common case): ``x * 1`` is ``x`` for every float, nan and inf included.
    Together they made the read pass of 16.7M float32 grads 0.85-0.94x as long in A/B
    runs (docs/design.md, "Numba backend").
    """
    u = 0.0
    w = 0.0
    if exact:
        for i in range(np.uint64(a), np.uint64(b)):
            y = x[i] * ginv
            z = np.float64(_clip(y, gclip))
            u += z * z
            w += np.float64(y) * 0.0
    elif ginv == 1:
        for i in range(np.uint64(a), np.uint64(b)):
            y = np.float64(x[i])
            u += y * y
    else:
        for i in range(np.uint64(a), np.uint64(b)):
            y = np.float64(x[i] * ginv)
            u += y * y
    return u, w


def _read_blocks_full(k, parts, ptr, off, boff, cs, flags, out):
    """Part ``k``: ``out[j]`` = (sum of clip(g*ginv)^2, sum of g*ginv*0) over block ``j``.

    ``flags`` is 1 for the exact pass.  Without it only the first sum, of the
    *unclipped* squares: an inf or nan makes it inf or nan, which is the
    non-finite check when no clip_value hides one (the caller re-checks exactly
    when it is not finite: a finite float64 beyond 1e154 overflows when
    squared).  The second sum is 0 when every ``g*ginv`` is finite and nan
    otherwise.
    """
    exact = flags != 0
    nb = boff[boff.shape[0] - 1]
    j, hi = nb * k // parts, nb * (k + 1) // parts
    t = _last_le(boff, j)
    c = to_fixed_tuple(cs, _NSCALARS)
    ginv, gclip = c[_GINV], c[_GCLIP]
    while j < hi:
        while boff[t + 1] <= j:
            t += 1
        n = off[t + 1] - off[t]
        g = numba.carray(_as_ptr(ptr[_G, t], cs[0]), n)
        a = (j - boff[t]) * _BLOCK
        b = min(a + _BLOCK, n)
        out[j, 0], out[j, 1] = _block_sums(g, a, b, ginv, gclip, exact)
        j += 1


def _read_blocks_tiled(k, parts, ptr, off, boff, cs, flags, out):
    """``_read_blocks_full`` over 16-bit (or float32) grads: each block loaded as float32 first.

    ``flags``: the format vector (``_X_FLAGS``: 1 for the exact pass; the grads'
    storage codes), so a float16 overflow to inf is seen as the update will see it.
    """
    exact = flags[_X_FLAGS] != 0
    nt = off.shape[0] - 1
    nb = boff[boff.shape[0] - 1]
    j, hi = nb * k // parts, nb * (k + 1) // parts
    t = np.searchsorted(boff, j, side="right") - 1
    c = to_fixed_tuple(cs, _NSCALARS)
    ginv, gclip = c[_GINV], c[_GCLIP]
    tile = np.empty(_BLOCK, np.float32)
    while j < hi:
        while boff[t + 1] <= j:
            t += 1
        n = off[t + 1] - off[t]
        a = (j - boff[t]) * _BLOCK
        b = min(a + _BLOCK, n)
        _load(tile, ptr[_G, t], flags[_X_HEAD + _G * nt + t], a, b - a, n)
        out[j, 0], out[j, 1] = _block_sums(tile, 0, b - a, ginv, gclip, exact)
        j += 1


@overload(_read_blocks, inline="always")
def _read_blocks_overload(k, parts, ptr, off, boff, cs, flags, out):
    return _read_blocks_tiled if isinstance(flags, types.Array) else _read_blocks_full


_inline_only(_read_blocks)


def _check_grads(ptr, sizes, off, cs, addr):
    """The read pass's fast check (``_k_read`` with flags 0) inside a checked update call.

    The same blocks, the same block sums (``_block_sums``) added in the same order as
    the read pass (bit for bit: ``tests/test_step_cache.py`` compares them), run as one
    part.  Writes the per-tensor sums to the float64 array at ``addr`` from index 1 and
    their total at index 0; True when the total is finite (every grad is then finite,
    as on the host: a finite sum of squares has no inf or nan term).  A non-finite total
    leaves the decision to the full step (its exact check tells an inf grad from a sum
    that overflowed), so the update writes nothing.  The grads of a small step are then
    still in cache when the update reads them.  Written out rather than through
    ``_read_blocks``: it compiles (once per dtype, with the first entry point) in about
    a sixth of the time.

    It is also the read pass's fast form for a call that runs as one part: the host
    calls it directly (``_k_check``, ``_check_sums``), so it is cached on disk like an
    entry point, and a small step's first call compiles it once for both uses.
    """
    n = sizes.shape[0]
    ginv, gclip = cs[_GINV], cs[_GCLIP]
    sums = numba.carray(_as_ptr(addr, 0.0), n + 1)
    total = 0.0
    for t in range(n):
        m = off[t + 1] - off[t]
        g = numba.carray(_as_ptr(ptr[_G, t], cs[0]), m)
        u = 0.0
        for a in range(0, m, _BLOCK):
            u += _block_sums(g, a, min(a + _BLOCK, m), ginv, gclip, False)[0]
        sums[t + 1] = u
        total += u
    sums[0] = total
    return np.isfinite(total)


_check_grads = _cached(njit(nogil=True, error_model="numpy",
                             fastmath={"reassoc", "contract"})(_check_grads))


@njit(inline="always")
def _scale(i, g, p, s0, s1, s2, e, c, f, ts, mode):  # 8 B/elem (ts: the factor)
    return p * ts


@njit(inline="always")
def _identity(i, g, p, s0, s1, s2, e, c, f, ts, mode):  # 8 B/elem (clip_: _apply clips)
    return p


# ------------------------------------------------------------------ entry points
# One parallel entry point per (body, variant): a template instantiation, five
# lines each.  They cannot be made by a factory: a closure over a jitted body
# gets a new cache key in every process (numba#6264), and a cached function must
# itself be the parallel one (numba#8578).  The variant must be a constant inside
# the prange loop to fold away, hence one entry per variant.


@_entry()
def _k_sgd(tab, sizes, scales, cs, flags, deref, threads):
    ptr, off, total, parts = _setup(tab, sizes, cs, deref, threads)
    for k in prange(parts):
        _apply(_sgd, 0, k, parts, ptr, off, total, scales, cs, flags)


@_entry()
def _k_sgd_momentum(tab, sizes, scales, cs, flags, deref, threads):
    ptr, off, total, parts = _setup(tab, sizes, cs, deref, threads)
    for k in prange(parts):
        _apply(_sgd, _V_SGD_MOMENTUM, k, parts, ptr, off, total, scales, cs, flags)


@_entry()
def _k_adam(tab, sizes, scales, cs, flags, deref, threads):
    ptr, off, total, parts = _setup(tab, sizes, cs, deref, threads)
    for k in prange(parts):
        _apply(_adam, 0, k, parts, ptr, off, total, scales, cs, flags)


@_entry()
def _k_adam_amsgrad(tab, sizes, scales, cs, flags, deref, threads):
    ptr, off, total, parts = _setup(tab, sizes, cs, deref, threads)
    for k in prange(parts):
        _apply(_adam, _V_ADAM_AMSGRAD, k, parts, ptr, off, total, scales, cs, flags)


@_entry()
def _k_adagrad(tab, sizes, scales, cs, flags, deref, threads):
    ptr, off, total, parts = _setup(tab, sizes, cs, deref, threads)
    for k in prange(parts):
        _apply(_adagrad, 0, k, parts, ptr, off, total, scales, cs, flags)


@_entry()
def _k_rmsprop(tab, sizes, scales, cs, flags, deref, threads):
    ptr, off, total, parts = _setup(tab, sizes, cs, deref, threads)
    for k in prange(parts):
        _apply(_rmsprop, 0, k, parts, ptr, off, total, scales, cs, flags)


@_entry()
def _k_rmsprop_momentum(tab, sizes, scales, cs, flags, deref, threads):
    ptr, off, total, parts = _setup(tab, sizes, cs, deref, threads)
    for k in prange(parts):
        _apply(_rmsprop, _V_RMSPROP_MOMENTUM, k, parts, ptr, off, total, scales, cs, flags)


@_entry()
def _k_rmsprop_centered(tab, sizes, scales, cs, flags, deref, threads):
    ptr, off, total, parts = _setup(tab, sizes, cs, deref, threads)
    for k in prange(parts):
        _apply(_rmsprop, _V_RMSPROP_CENTERED, k, parts, ptr, off, total, scales, cs, flags)


@_entry()
def _k_rmsprop_centered_momentum(tab, sizes, scales, cs, flags, deref, threads):
    ptr, off, total, parts = _setup(tab, sizes, cs, deref, threads)
    for k in prange(parts):
        _apply(_rmsprop, _V_RMSPROP_CENTERED | _V_RMSPROP_MOMENTUM, k, parts, ptr, off, total, scales, cs, flags)


@_entry()
def _k_adadelta(tab, sizes, scales, cs, flags, deref, threads):
    ptr, off, total, parts = _setup(tab, sizes, cs, deref, threads)
    for k in prange(parts):
        _apply(_adadelta, 0, k, parts, ptr, off, total, scales, cs, flags)


@_entry()
def _k_adamax(tab, sizes, scales, cs, flags, deref, threads):
    ptr, off, total, parts = _setup(tab, sizes, cs, deref, threads)
    for k in prange(parts):
        _apply(_adamax, 0, k, parts, ptr, off, total, scales, cs, flags)


@_entry()
def _k_nadam(tab, sizes, scales, cs, flags, deref, threads):
    ptr, off, total, parts = _setup(tab, sizes, cs, deref, threads)
    for k in prange(parts):
        _apply(_nadam, 0, k, parts, ptr, off, total, scales, cs, flags)


@_entry()
def _k_radam(tab, sizes, scales, cs, flags, deref, threads):
    ptr, off, total, parts = _setup(tab, sizes, cs, deref, threads)
    for k in prange(parts):
        _apply(_radam, 0, k, parts, ptr, off, total, scales, cs, flags)


@_entry()
def _k_lion(tab, sizes, scales, cs, flags, deref, threads):
    ptr, off, total, parts = _setup(tab, sizes, cs, deref, threads)
    for k in prange(parts):
        _apply(_lion, 0, k, parts, ptr, off, total, scales, cs, flags)


@_entry()
def _k_adahessian(tab, sizes, scales, cs, flags, deref, threads):
    ptr, off, total, parts = _setup(tab, sizes, cs, deref, threads)
    for k in prange(parts):
        _apply(_adahessian, 0, k, parts, ptr, off, total, scales, cs, flags)


@_entry()
def _k_adahessian_pow(tab, sizes, scales, cs, flags, deref, threads):
    ptr, off, total, parts = _setup(tab, sizes, cs, deref, threads)
    for k in prange(parts):
        _apply(_adahessian, _V_POW, k, parts, ptr, off, total, scales, cs, flags)


@_entry()
def _k_asgd(tab, sizes, scales, cs, flags, deref, threads):
    ptr, off, total, parts = _setup(tab, sizes, cs, deref, threads)
    for k in prange(parts):
        _apply(_asgd, 0, k, parts, ptr, off, total, scales, cs, flags)


@_entry()
def _k_rprop(tab, sizes, scales, cs, flags, deref, threads):
    ptr, off, total, parts = _setup(tab, sizes, cs, deref, threads)
    for k in prange(parts):
        _apply(_rprop, 0, k, parts, ptr, off, total, scales, cs, flags)


@_entry()
def _k_adabelief(tab, sizes, scales, cs, flags, deref, threads):
    ptr, off, total, parts = _setup(tab, sizes, cs, deref, threads)
    for k in prange(parts):
        _apply(_adabelief, 0, k, parts, ptr, off, total, scales, cs, flags)


@_entry()
def _k_yogi(tab, sizes, scales, cs, flags, deref, threads):
    ptr, off, total, parts = _setup(tab, sizes, cs, deref, threads)
    for k in prange(parts):
        _apply(_yogi, 0, k, parts, ptr, off, total, scales, cs, flags)


@_entry()
def _k_ademamix(tab, sizes, scales, cs, flags, deref, threads):
    ptr, off, total, parts = _setup(tab, sizes, cs, deref, threads)
    for k in prange(parts):
        _apply(_ademamix, 0, k, parts, ptr, off, total, scales, cs, flags)


@_entry()
def _k_sf_adamw(tab, sizes, scales, cs, flags, deref, threads):
    ptr, off, total, parts = _setup(tab, sizes, cs, deref, threads)
    for k in prange(parts):
        _apply(_sf_adamw, 0, k, parts, ptr, off, total, scales, cs, flags)


@_entry()
def _k_sf_sgd(tab, sizes, scales, cs, flags, deref, threads):
    ptr, off, total, parts = _setup(tab, sizes, cs, deref, threads)
    for k in prange(parts):
        _apply(_sf_sgd, 0, k, parts, ptr, off, total, scales, cs, flags)


@_entry(sums=True)
def _k_lamb(tab, sizes, scales, cs, flags, deref, lr, threads):
    """LAMB: pass 1 updates the moments and sums p^2 and r^2 per tensor, pass 2 steps.

    ``lr`` is a float64: ``lr * trust`` is rounded to the dtype once per tensor.
    """
    ptr, off, total, parts = _setup(tab, sizes, cs, deref, threads)
    acc = np.zeros((parts, sizes.shape[0], 2))
    for k in prange(parts):
        _reduce(_lamb_moments, 0, k, parts, ptr, off, total, scales, cs, flags, acc)
    coef = _trust_coef(acc, scales, lr)
    for k in prange(parts):
        _apply(_lamb_step, _V_TRUST2, k, parts, ptr, off, total, coef, cs, flags)


@_entry()
def _k_lamb_exact(tab, sizes, scales, cs, flags, deref, lr, threads):
    """``_k_lamb`` without fast-math: the entry point of a reduced-precision LAMB step.

    ``_k_lamb`` lets LLVM reassociate (its float64 sums then vectorize), which
    also turns pass 2's ``(1-b2) * g * g`` into ``(1-b2) * (g * g)``; the moments
    a 16-bit step recomputes and stores must be the reference's bits.  And the
    reference's ``p -= (lr * trust) * r`` multiplies a float32 ``r`` by a float64
    scalar: the step is computed in double and rounded once, so ``lr * trust``
    stays a float64 here (the tiled driver rounds the new param to float32).
    """
    ptr, off, total, parts = _setup(tab, sizes, cs, deref, threads)
    acc = np.zeros((parts, sizes.shape[0], 2))
    for k in prange(parts):
        _reduce(_lamb_moments, 0, k, parts, ptr, off, total, scales, cs, flags, acc)
    coef = _trust_coef(acc, np.zeros(sizes.shape[0]), lr)
    for k in prange(parts):
        _apply(_lamb_step, _V_TRUST2, k, parts, ptr, off, total, coef, cs, flags)


@njit(inline="always")
def _trust_coef(acc, scales, lr):
    """Per tensor ``lr * |p| / |r|`` (1 for a zero norm) from LAMB's pass-1 sums."""
    coef = np.empty_like(scales)
    for t in range(scales.shape[0]):
        pn = math.sqrt(acc[:, t, 0].sum())
        rn = math.sqrt(acc[:, t, 1].sum())
        trust = pn / rn if pn > 0.0 and rn > 0.0 else 1.0
        coef[t] = lr * trust  # one rounding to the dtype per tensor
    return coef


@_entry()
def _k_lars(tab, sizes, scales, cs, flags, deref, lr, tc, eps, on, threads):
    """LARS: pass 1 sums p^2 and u^2 per tensor (writes nothing), pass 2 steps.

    ``lr``, ``tc`` (trust_coefficient), ``eps`` and ``on`` (trust_ratio, 0.0 or 1.0) are
    float64 (``Rule.trust_scalars``).  No fast-math: it would regroup pass 2's nesterov
    ``p + (d + mu*m)``; the read pass's float64 sums then do not vectorize (16 B/elem of 36).
    """
    ptr, off, total, parts = _setup(tab, sizes, cs, deref, threads)
    acc = np.zeros((parts, sizes.shape[0], 2))
    for k in prange(parts):
        _reduce(_lars_norms, 0, k, parts, ptr, off, total, scales, cs, flags, acc)
    coef = _lars_coef(acc, scales, lr, tc, eps, on)
    for k in prange(parts):
        _apply(_lars_step, _V_TRUST2 | _V_GSCALE2, k, parts, ptr, off, total, coef, cs, flags)


@njit(inline="always")
def _lars_coef(acc, scales, lr, tc, eps, on):
    """Pass 2's scales (``_V_GSCALE2``): per tensor ``-(lr * trust)`` with optax's trust ratio
    ``tc * |p| / (|u| + eps)`` (1 where a norm is 0 or ``on`` is 0), rounded to the dtype once,
    then the norm-clip factors ``scales``."""
    n = scales.shape[0]
    coef = np.empty(2 * n, scales.dtype)
    for t in range(n):
        trust = 1.0
        if on != 0.0:
            pn = math.sqrt(acc[:, t, 0].sum())
            un = math.sqrt(acc[:, t, 1].sum())
            if pn > 0.0 and un > 0.0:
                trust = tc * pn / (un + eps)
        coef[t] = -(lr * trust)
        coef[n + t] = scales[t]
    return coef


@_entry(sums=True, twin=True, contract=True)
def _k_read(tab, sizes, scales, cs, flags, deref, threads):
    """The read pass: per tensor (sum of squares, non-finite flag), see ``_read_blocks``.

    ``flags`` is 1 for the exact pass (clipped squares and the flag), 0 for the
    one-accumulator pass.  4 B/elem.
    """
    ptr, off, total, parts = _setup(tab, sizes, cs, deref, threads)
    n = sizes.shape[0]
    boff = np.empty(n + 1, np.int64)
    boff[0] = 0
    for t in range(n):
        boff[t + 1] = boff[t] + (sizes[t] + _BLOCK - 1) // _BLOCK
    out = np.empty((boff[n], 2))
    for k in prange(parts):
        _read_blocks(k, parts, ptr, off, boff, cs, flags, out)
    res = np.empty((n, 2))
    for t in range(n):
        res[t, 0] = 0.0
        res[t, 1] = 0.0
        for j in range(boff[t], boff[t + 1]):
            res[t, 0] += out[j, 0]
            res[t, 1] += out[j, 1]
    return res


#: The read pass's fast form (``_k_read`` with flags 0) for a call that runs as one part:
#: ``_check_grads`` itself, called from the host (``_check_sums``) with the data pointers
#: read there.  It used to be an entry point of its own around ``_check_grads``; that
#: wrapper was ~0.3 s of a cold first step's compile (its own typing and LLVM), while
#: ``_check_grads`` is compiled with the first update entry point anyway (``_setup``).
_k_check = _check_grads


@_entry()
def _k_scale(tab, sizes, scales, cs, flags, deref, threads):
    ptr, off, total, parts = _setup(tab, sizes, cs, deref, threads)
    for k in prange(parts):
        _apply(_scale, 0, k, parts, ptr, off, total, scales, cs, flags)


@_entry()
def _k_clip(tab, sizes, scales, cs, flags, deref, threads):
    ptr, off, total, parts = _setup(tab, sizes, cs, deref, threads)
    for k in prange(parts):
        _apply(_identity, 0, k, parts, ptr, off, total, scales, cs, flags)


#: (rule, Rule.variant bits) -> the entry point of an elementwise or trust-ratio rule.
_ENTRIES = {
    ("sgd", 0): _k_sgd, ("sgd", _V_SGD_MOMENTUM): _k_sgd_momentum,
    ("adam", 0): _k_adam, ("adam", _V_ADAM_AMSGRAD): _k_adam_amsgrad,
    ("adamw", 0): _k_adam, ("adamw", _V_ADAM_AMSGRAD): _k_adam_amsgrad,
    ("adagrad", 0): _k_adagrad,
    ("rmsprop", 0): _k_rmsprop, ("rmsprop", _V_RMSPROP_MOMENTUM): _k_rmsprop_momentum,
    ("rmsprop", _V_RMSPROP_CENTERED): _k_rmsprop_centered,
    ("rmsprop", _V_RMSPROP_CENTERED | _V_RMSPROP_MOMENTUM): _k_rmsprop_centered_momentum,
    ("adadelta", 0): _k_adadelta, ("adamax", 0): _k_adamax, ("nadam", 0): _k_nadam,
    ("radam", 0): _k_radam, ("lion", 0): _k_lion, ("adahessian", 0): _k_adahessian,
    ("adahessian", _V_POW): _k_adahessian_pow,
    ("lamb", 0): _k_lamb,
    ("asgd", 0): _k_asgd, ("rprop", 0): _k_rprop,
    ("adabelief", 0): _k_adabelief, ("yogi", 0): _k_yogi, ("ademamix", 0): _k_ademamix,
    ("schedule_free_adamw", 0): _k_sf_adamw, ("schedule_free_sgd", 0): _k_sf_sgd,
    ("lars", 0): _k_lars,
}


#: The entry points a reduced-precision call uses instead (no fast-math; see _k_lamb_exact).
_EXACT = {_k_lamb: _k_lamb_exact}


# ------------------------------------------------------------------ host side

_LOCK = threading.Lock()
_serialize = True  # until the first launch tells which threading layer Numba chose


_seen = set()  # (entry point, dtype) pairs launched in this process
_noted = False

COMPILE_NOTE = ("fastopt: compiling the numba kernels of this step (first use only: they are "
                "cached on disk; `python -m fastopt warmup` compiles them ahead of time)\n")


def _note_compiling():
    global _noted
    if not _noted:
        _noted = True
        sys.stderr.write(COMPILE_NOTE)
        sys.stderr.flush()


#: Which compiled form ``_pick`` calls: None (by the size of the call), or "serial" /
#: "parallel" to force one (``warmup`` compiles both).
_FORCE = None


def _pick(fn, args):
    """``(kernel, threads)``: the serial twin when the call runs as one part, else ``fn``."""
    threads = numba.get_num_threads()
    serial = _SERIAL.get(fn)
    if serial is None or _FORCE == "parallel":
        return fn, threads
    if _FORCE == "serial" or threads == 1 or int(args[1].sum()) < 2 * MIN_PER_THREAD:
        return serial, 1
    return fn, threads


def _launch(fn, *args):
    """Call a kernel; on a first call that runs for over a second, say once that it compiles."""
    fn, threads = _pick(fn, args)
    key = (fn, args[3].dtype, isinstance(args[4], np.ndarray))  # a format vector: tiled
    if key in _seen:
        return _run(fn, threads, args)
    timer = threading.Timer(1.0, _note_compiling)
    timer.daemon = True
    timer.start()
    try:
        return _run(fn, threads, args)
    finally:
        timer.cancel()
        _seen.add(key)


def _call(fn, *args):
    """Call a kernel (its serial twin when it runs as one part), see ``_run``."""
    fn, threads = _pick(fn, args)
    return _run(fn, threads, args)


def _run(fn, threads, args):
    """Call a kernel; serialized only under the thread-unsafe workqueue layer."""
    global _serialize
    if not _serialize or fn in _TWINS:  # a serial twin opens no parallel region
        return fn(*args, threads)
    with _LOCK:
        out = fn(*args, threads)
        try:
            _serialize = numba.threading_layer() == "workqueue"
        except ValueError:  # no parallel region has run yet (one part only)
            pass
        return out


def _head(pre):
    """The pipeline scalars (``_HEAD_NAMES``), cast to the dtype by ``_scalars``."""
    inv = 1.0 if pre.inv_scale is None else pre.inv_scale
    ginv = -inv if pre.maximize else inv  # -(g*s) == g*(-s) exactly
    gclip = math.inf if pre.clip_value is None else pre.clip_value
    wclip = math.inf if pre.weight_clip is None else pre.weight_clip
    return [ginv, gclip, wclip, inv, 0.0]


def _plain_head(inv=1.0, clip=math.inf, wclip=math.inf):
    """The head of a call that is not a rule step (read pass, scale_, clip_)."""
    return [inv, clip, wclip, 1.0, 0.0]


#: The kernel scalars of a call that runs no rule (scale_, clip_): no decay stage.
_NO_RULE = [0.0] * len(KERNEL_SCALARS)
_NO_RULE[KERNEL_SCALAR_SLOT["decay"]] = 1.0


def _scalars(dt, head, values=_NO_RULE):
    """The scalar array of a call (head + kernel scalars), in the kernel's dtype."""
    cs = np.empty(_NSCALARS, dt)
    cs[:_HEAD] = head
    cs[_HEAD:] = values
    return cs


def _pointer_table(rows, n):
    """``_table`` with the arrays' data pointers in place of their object addresses."""
    tab = np.zeros((_ROWS, n), np.int64)
    for r, arrays in rows:
        tab[r] = [a.ctypes.data for a in arrays]
    return tab


def _table(rows, n):
    """The operand table: ``rows`` is a list of (row, list of arrays)."""
    tab = np.zeros((_ROWS, n), np.int64)
    for r, arrays in rows:
        tab[r] = _ids(arrays, n)
    return tab


def _sizes(arrays, n):
    return np.fromiter(map(len, arrays), np.int64, n)


#: dtype name -> storage code of the reduced-precision drivers
_CODES = {"float32": _C_F32, "bfloat16": _C_BF16, "float16": _C_F16}
_F32 = np.dtype(np.float32)


def _is_reduced(dt) -> bool:
    """Whether arrays of ``dt`` go through the tiled drivers (16-bit storage)."""
    return dt.itemsize == 2


def _format(rows, n, flags, uniform=()):
    """The format vector of a reduced-precision call: ``flags`` and a storage code per operand.

    ``rows`` as for ``_table``; the rows in ``uniform`` hold one dtype by
    construction (a bucket's params and states) and are coded from their first
    array, the others (grads and extra inputs: the param's dtype or float32)
    tensor by tensor.
    """
    fmt = np.zeros(_X_HEAD + _ROWS * n, np.int64)
    fmt[_X_FLAGS] = flags
    for r, arrays in rows:
        at = _X_HEAD + r * n
        dts = {arrays[0].dtype} if r in uniform else {a.dtype for a in arrays}
        if len(dts) == 1:
            fmt[at:at + n] = _CODES[dts.pop().name]
        else:
            fmt[at:at + n] = [_CODES[a.dtype.name] for a in arrays]
    return fmt


def _solve_kernel(rule):
    """A dense-solve rule (Newton) on the host, in the reference's pipeline order.

    Per tensor: the grad through unscale, maximize, clip_value and its norm-clip
    factor; ``p -= lr * solve(H * inv_scale + damping * I, g)``; ``weight_clip``.
    NumPy's LAPACK does the solve: ``np.linalg.solve`` inside ``njit`` would need
    scipy, which the ``numba`` extra does not install.
    """

    def kernel(params, grads, states, s, pre, extras=None):
        ginv, gclip, wclip, einv = _head(pre)[:4]
        for t, (p, g, h) in enumerate(zip(params, grads, extras)):
            dt, n = p.dtype.type, p.size
            x = g * dt(ginv)
            np.clip(x, -dt(gclip), dt(gclip), out=x)
            if pre.scales is not None:
                x *= dt(pre.scales[t])
            a = h.reshape(n, n) * dt(einv) + dt(s["damping"]) * np.eye(n, dtype=p.dtype)
            p -= dt(s["lr"]) * np.linalg.solve(a, x)
            np.clip(p, -dt(wclip), dt(wclip), out=p)

    return kernel


def _fused_kernel(rule):
    """An elementwise or trust-ratio rule: one entry point call per step (``_ENTRIES``)."""
    slots = rule.all_state
    extra_row = rule.extra is not None and rule.extra_shape == "param"
    trust = rule.kind == TRUST_RATIO
    name = rule.name

    def kernel(params, grads, states, s, pre, extras=None):
        n = len(params)
        dt = params[0].dtype
        rows = [(_P, params), (_G, grads)]
        rows += [(_S0 + k, states[st]) for k, st in enumerate(slots) if st in states]
        if extra_row:
            rows.append((_E, extras))
        if pre.precision is not None:
            return _reduced_call(rule, rows, n, states, s, pre)
        args = (_table(rows, n), _sizes(params, n),
                np.ones(n, dt) if pre.scales is None else np.asarray(pre.scales, dt),
                _scalars(dt, _head(pre), rule.kernel_scalars(s)), rule.kernel_flags(s),
                DATA_OFFSET)
        if trust:
            args += tuple(float(s[k]) for k in rule.trust_scalars)
        _launch(_ENTRIES[name, _mode(rule, s)], *args)

    return kernel


def _reduced_call(rule, rows, n, states, s, pre):
    """One step of a bucket whose param or state is 16-bit (``pre.precision`` is set).

    The same entry point as a float32 step, with the format vector in place of
    the flags (the storage codes, stochastic rounding's step key): Numba then
    compiles the tiled drivers for it.  Arithmetic is float32.  ``max_norm``
    acts on the float32 params before their one rounding, so it costs a dry
    run of the same kernel first (it writes nothing and returns the sums of
    squares of the new params), then the real one with the factors.
    """
    prec = pre.precision
    params = rows[0][1]
    if "master" in states:
        rows = rows + [(_M, states["master"])]
    uniform = {_P, _S0, _S1, _S2, _M}
    fmt = _format(rows, n, rule.kernel_flags(s), uniform)
    if prec.stochastic_rounding:
        fmt[_X_SR] = 1
        fmt[_X_KEY] = np.array(_precision.step_key(prec.seed, pre.step), np.uint64).view(np.int64)
    scales = np.ones(n, _F32) if pre.scales is None else np.asarray(pre.scales, _F32)
    args = [_table(rows, n), _sizes(params, n), scales,
            _scalars(_F32, _head(pre), rule.kernel_scalars(s)), fmt, DATA_OFFSET]
    fmt[_X_GSCALE] = scales.ctypes.data  # (LAMB's pass 2 gets lr * trust as its scales)
    if rule.kind == TRUST_RATIO:
        args += [float(s[k]) for k in rule.trust_scalars]
    entry = _ENTRIES[rule.name, _mode(rule, s)]
    entry = _EXACT.get(entry, entry)
    if pre.max_norm is not None:
        acc = np.zeros((numba.get_num_threads(), n))
        fmt[_X_DRY], fmt[_X_ACC] = 1, acc.ctypes.data
        _launch(entry, *args)
        fac = np.minimum(1.0, pre.max_norm / (np.sqrt(acc.sum(axis=0)) + CLIP_EPS))
        fmt[_X_DRY], fmt[_X_FAC] = 0, fac.ctypes.data
    _launch(entry, *args)


class _GradRead:
    """The grads' check of a cached plan (``ReducedStepPlan``, ``Q8StepPlan``): the read
    pass's fast form, one float64 sum per tensor; ``self.ones`` (float32 ones per tensor)
    and ``self.sizes`` are the plan's own."""

    def _read_setup(self, grads, n):
        read_rows = [(_P, grads), (_G, grads)]
        self.read_table = _table(read_rows, n)
        gdt = grads[0].dtype
        if _is_reduced(gdt) or any(g.dtype != gdt for g in grads):
            self.read_fmt = _format(read_rows, n, 0)  # the tiled read (16-bit grads)
            self.read_fmt[_X_GSCALE] = self.ones.ctypes.data
            self.read_ones, gdt = self.ones, _F32
        else:  # float32 grads (of float32 params with a 16-bit state): the plain read
            self.read_fmt, self.read_ones = 0, np.ones(n, gdt)
        self.read_cs = _scalars(gdt, _plain_head())

    def finite(self):
        """Whether every grad is finite: True, or None when the exact check must decide."""
        res = _call(_k_read, self.read_table, self.sizes, self.read_ones, self.read_cs,
                    self.read_fmt, DATA_OFFSET)
        return True if math.isfinite(res.sum()) else None


class ReducedStepPlan(_GradRead):
    """The step cache's plan (see ``StepPlan``) for a bucket with a precision.

    A 16-bit step through the full pipeline spent most of a small step's time on the
    host (the option checks, the bucket and its ``Pre``, ``_reduced_call``'s tables and
    format vector): bfloat16 Adam at 32,768 elements on one thread took 143 us a step,
    56 us through this plan (load 3; docs/design.md, "Pipeline"); the float32 step
    skips all that through ``StepPlan``.  This plan builds the
    operand table, the format vector (storage codes, the master row) and the scalar
    array once and per step refreshes only the scalars, the flags and stochastic
    rounding's step key.  The grads' non-finite check is the read pass's fast form (on
    16-bit grads the tiled ``_k_read``, as ``NumbaOps._stats`` runs it), a call of its
    own before the update; a non-finite sum returns False and the full step decides.
    Made by ``NumbaOps.step_plan`` for the cases ``StepPlan`` takes (no max_norm, no
    norm or value clipping) with an elementwise precision (not q8) and object addresses
    (not the data pointers of fastopt.torch's plans).
    """

    def __init__(self, rule, bucket, grads, hp):
        params, states = bucket.params, bucket.states
        n = len(params)
        self.rule, self.keep = rule, (params, grads, states)
        rows = [(_P, params), (_G, grads)]
        rows += [(_S0 + k, states[st]) for k, st in enumerate(rule.all_state) if st in states]
        if "master" in states:
            rows.append((_M, states["master"]))
        self.prec = bucket.precision
        self.fmt = _format(rows, n, 0, {_P, _S0, _S1, _S2, _M})
        self.fmt[_X_SR] = int(bool(self.prec is not None and self.prec.stochastic_rounding))
        self.ones = np.ones(n, _F32)  # the norm-clip factors (none: ones), also the read's
        self.fmt[_X_GSCALE] = self.ones.ctypes.data
        self.table = _table(rows, n)
        self.sizes = _sizes(params, n)
        pre = Pre(maximize=hp["maximize"], clip_value=None, weight_clip=hp["weight_clip"])
        self.cs = _scalars(_F32, _head(pre), _NO_RULE)
        self.slots = [(_HEAD + KERNEL_SCALAR_SLOT[k], k) for k in rule.pack + ("l2", "decay")]
        self._read_setup(grads, n)
        self.entry = None

    def update(self, s, check=False, step=None):
        """The fused update with the step scalars ``s``; ``step``: the step count (the
        stochastic-rounding hash needs it: without it such a plan returns False).
        Returns False, with nothing written, where the full step must decide."""
        rule, cs, fmt = self.rule, self.cs, self.fmt
        if fmt[_X_SR]:
            if step is None:
                return False
            fmt[_X_KEY] = np.array(_precision.step_key(self.prec.seed, step),
                                   np.uint64).view(np.int64)
        if check and self.finite() is None:
            return False
        for i, k in self.slots:
            cs[i] = float(s[k])
        fn = self.entry
        if fn is None:
            fn = self.entry = _ENTRIES[rule.name, _mode(rule, s)]
        fmt[_X_FLAGS] = rule.kernel_flags(s)
        _call(fn, self.table, self.sizes, self.ones, cs, fmt, DATA_OFFSET)
        return True


#: Rule.kind -> the host driver that makes the rule's kernel.
_DRIVERS = {ELEMENTWISE: _fused_kernel, TRUST_RATIO: _fused_kernel, DENSE_SOLVE: _solve_kernel}


# ------------------------------------------------------------------ Muon (Rule.kind "orthogonalize")
# Two fused passes around NumPy's BLAS: the grad pipeline and the momentum buffer in one
# pass (``_k_muon_momentum``), the Newton-Schulz products on the host (``_newton_schulz``),
# then the decay stage, the update and weight_clip in one pass over the param
# (``_k_muon_apply``).  The operation order is the reference's (kernels/reference.py).

_M_BUF_SWAP, _M_NEST_SWAP, _M_NESTEROV = 1, 2, 4


@_entry()
def _k_muon_momentum(g, buf, upd, cs, flags, threads):
    """``x = clip(g*ginv)*scale``; ``buf = lerp(buf, x)``; ``upd = lerp(x, buf)`` (nesterov).

    ``cs`` = (ginv, gclip, scale, buf_c, nest_c) in the dtype; the lerps are torch's in
    the ``x + c*(y - x)`` form of ``fastopt._rules._lerp_form`` (``flags`` says which swap).
    """
    n = g.shape[0]
    ginv, gclip, scale, bc, nc = cs[0], cs[1], cs[2], cs[3], cs[4]
    bswap, nswap, nest = flags & _M_BUF_SWAP, flags & _M_NEST_SWAP, flags & _M_NESTEROV
    parts = min(threads, max(1, n // MIN_PER_THREAD))
    for k in prange(parts):
        for i in range(n * k // parts, n * (k + 1) // parts):
            x = _clip(g[i] * ginv, gclip) * scale
            b = buf[i]
            b = x + bc * (b - x) if bswap else b + bc * (x - b)
            buf[i] = b
            if nest:
                upd[i] = b + nc * (x - b) if nswap else x + nc * (b - x)


@_entry()
def _k_muon_apply(p, o, cs, threads):
    """``p = p*decay - alr*o`` (decay 1: off), then ``clip(p, -wclip, wclip)``; ``p`` flat, ``o``
    the matrix (a transposed view for a tall param).  ``cs`` = (decay, alr, wclip)."""
    rows, cols = o.shape
    decay, alr, wclip = cs[0], cs[1], cs[2]
    parts = min(threads, max(1, rows * cols // MIN_PER_THREAD), rows)
    for k in prange(parts):
        for r in range(rows * k // parts, rows * (k + 1) // parts):
            for j in range(cols):
                i = r * cols + j
                p[i] = _clip(p[i] * decay - alr * o[r, j], wclip)


def _newton_schulz(u, shape, coefficients, steps, eps):
    """The reference's ``newton_schulz`` with preallocated products (same operations, same order).

    ``gram @ gram.T`` is ``gram @ gram`` (the Gram matrix is symmetric) and lets NumPy call
    BLAS ``syrk``, half the work of ``gemm``.
    """
    a, b, c = coefficients
    x = u.reshape(shape)
    tall = shape[0] > shape[1]
    if tall:
        x = x.T
    x = x / max(float(np.linalg.norm(x)), eps)
    dt = x.dtype.type
    r = x.shape[0]
    gram, sq, y = np.empty((r, r), x.dtype), np.empty((r, r), x.dtype), np.empty_like(x)
    for _ in range(steps):
        np.matmul(x, x.T, out=gram)
        np.matmul(gram, gram.T, out=sq)
        gram *= dt(b)
        sq *= dt(c)
        gram += sq
        np.matmul(gram, x, out=y)
        x *= dt(a)
        x += y
    return x.T if tall else x


def _orthogonalize_kernel(rule):
    """Muon on the host: the two fused passes around NumPy's matrix products, per tensor."""

    def kernel(params, grads, states, s, pre, extras=None):
        ginv, gclip, wclip = _head(pre)[:3]
        flags = ((_M_BUF_SWAP if s["buf_swap"] else 0) | (_M_NEST_SWAP if s["nest_swap"] else 0)
                 | (_M_NESTEROV if s["nesterov"] else 0))
        for t, (p, g, buf) in enumerate(zip(params, grads, states["momentum_buffer"])):
            dt, shape = p.dtype, pre.shapes[t]
            scale = 1.0 if pre.scales is None else float(pre.scales[t])
            upd = np.empty_like(p) if s["nesterov"] else buf
            _launch(_k_muon_momentum, g, buf, upd,
                    np.array([ginv, gclip, scale, s["buf_c"], s["nest_c"]], dt), flags)
            o = _newton_schulz(upd, shape, s["ns_coefficients"], s["ns_steps"], s["eps"])
            alr = s["lr"] * muon_lr_ratio(s["adjust_lr_fn"], shape)
            _call(_k_muon_apply, p, o, np.array([s["decay"], alr, wclip], dt))

    return kernel


_DRIVERS[ORTHOGONALIZE] = _orthogonalize_kernel


# ------------------------------------------------------------------ Adafactor (Rule.kind "factored")
# Per tensor, three passes over the grad (the grad pipeline recomputed in each, nothing
# stored), with the O(rows + cols) factor updates on the host between them, in the
# reference's order (kernels/reference.py, ``adafactor_kernel``):
# 1. ``_k_af_sums``: float64 sums of x^2 per row and per column and of p^2 per row;
# 2. ``_k_af_rms``: float64 sums of u^2 per row, ``u = x / sqrt(max(V, eps1^2))`` from the new
#    factors;
# 3. ``_k_af_apply``: ``p = clip(p*decay - step*u, wclip)``.
# A 0-/1-D param (full ``variance``) takes ``_k_af_vec`` (variance update, sums of u^2 and
# p^2 per fixed block) and ``_k_af_vec_apply``.  Every sum is one row's, one column's or one
# fixed block's, added in index order, then the partial sums in order on the host: the bits
# do not depend on the thread count.
_AF_COLS = 64  # columns per job of the column-sum loop


@njit(inline="always")
def _af_x(g, i, cs):
    return _clip(g[i] * cs[0], cs[1]) * cs[2]  # the grad pipeline: (ginv, gclip, scale)


@njit(inline="always")
def _af_u(x, v, cs):
    e = cs[3]  # eps1^2; nan stays nan (np.maximum)
    v = e if v < e else v
    return x * (cs[4] / math.sqrt(v))  # cs[4] is 1 in the dtype


@_entry(sums=True)
def _k_af_sums(g, p, rsum, cs, csum, psq, rows, cols, threads):
    """Pass 1 of a (B*rows, cols) param: ``rsum``/``psq`` per row, ``csum`` per (batch, col)."""
    nr = rsum.shape[0]
    parts = min(threads, max(1, nr * cols // MIN_PER_THREAD), nr)
    for k in prange(parts):
        for r in range(nr * k // parts, nr * (k + 1) // parts):
            s = 0.0
            q = 0.0
            for j in range(r * cols, (r + 1) * cols):
                x = np.float64(_af_x(g, j, cs))
                s += x * x
                y = np.float64(p[j])
                q += y * y
            rsum[r] = s
            psq[r] = q
    batches = csum.shape[0] // cols if cols > 0 else 0
    ncb = (cols + _AF_COLS - 1) // _AF_COLS
    jobs = batches * ncb
    parts = min(threads, max(1, nr * cols // MIN_PER_THREAD), jobs)
    for k in prange(parts):
        for job in range(jobs * k // parts, jobs * (k + 1) // parts):
            b = job // ncb
            c0 = (job % ncb) * _AF_COLS
            c1 = min(cols, c0 + _AF_COLS)
            for j in range(c0, c1):
                csum[b * cols + j] = 0.0
            for i in range(rows):
                base = (b * rows + i) * cols
                for j in range(c0, c1):
                    x = np.float64(_af_x(g, base + j, cs))
                    csum[b * cols + j] += x * x


@_entry(sums=True)
def _k_af_rms(g, rv, cv, cs, rden, usq, rows, cols, threads):
    """Pass 2: ``usq[r]`` = float64 sum over row r of u^2, ``V = rv[r]*cv[b, j] / rden[b]``."""
    nr = usq.shape[0]
    parts = min(threads, max(1, nr * cols // MIN_PER_THREAD), nr)
    for k in prange(parts):
        for r in range(nr * k // parts, nr * (k + 1) // parts):
            b = r // rows
            rr, den = rv[r], rden[b]
            s = 0.0
            for j in range(cols):
                u = np.float64(_af_u(_af_x(g, r * cols + j, cs), (rr * cv[b * cols + j]) / den, cs))
                s += u * u
            usq[r] = s


@_entry()
def _k_af_apply(p, g, rv, cs, cv, rden, rows, cols, threads):
    """Pass 3: ``p = clip(p*decay - step*u, wclip)``; ``cs[5:8]`` = (decay, step, wclip)."""
    nr = rv.shape[0]
    decay, step, wclip = cs[5], cs[6], cs[7]
    parts = min(threads, max(1, nr * cols // MIN_PER_THREAD), nr)
    for k in prange(parts):
        for r in range(nr * k // parts, nr * (k + 1) // parts):
            b = r // rows
            rr, den = rv[r], rden[b]
            for j in range(cols):
                i = r * cols + j
                u = _af_u(_af_x(g, i, cs), (rr * cv[b * cols + j]) / den, cs)
                p[i] = _clip(p[i] * decay - step * u, wclip)


@_entry(sums=True)
def _k_af_vec(g, p, var, cs, swap, usq, psq, threads):
    """Pass 1 of a 0-/1-D param: ``var = lerp(var, x^2)`` (``cs[5]`` its weight, ``swap``
    the form), float64 sums of u^2 and p^2 per ``_BLOCK``-element block."""
    n = g.shape[0]
    nb = usq.shape[0]
    c = cs[5]
    parts = min(threads, max(1, n // MIN_PER_THREAD), nb)
    for k in prange(parts):
        for blk in range(nb * k // parts, nb * (k + 1) // parts):
            s = 0.0
            q = 0.0
            for i in range(blk * _BLOCK, min(n, (blk + 1) * _BLOCK)):
                x = _af_x(g, i, cs)
                x2 = x * x
                v = var[i]
                v = x2 + c * (v - x2) if swap else v + c * (x2 - v)
                var[i] = v
                u = np.float64(_af_u(x, v, cs))
                s += u * u
                y = np.float64(p[i])
                q += y * y
            usq[blk] = s
            psq[blk] = q


@_entry()
def _k_af_vec_apply(p, g, var, cs, threads):
    """Pass 2 of a 0-/1-D param: ``p = clip(p*decay - step*u, wclip)``."""
    n = p.shape[0]
    decay, step, wclip = cs[5], cs[6], cs[7]
    parts = min(threads, max(1, n // MIN_PER_THREAD))
    for k in prange(parts):
        for i in range(n * k // parts, n * (k + 1) // parts):
            u = _af_u(_af_x(g, i, cs), var[i], cs)
            p[i] = _clip(p[i] * decay - step * u, wclip)


def _af_lerp(a, b, swap, c):
    return b + c * (a - b) if swap else a + c * (b - a)


def _factored_kernel(rule):
    """Adafactor on the host: the fused passes around the O(rows + cols) factor updates."""

    def kernel(params, grads, states, s, pre, extras=None):
        ginv, gclip, wclip = _head(pre)[:3]
        for t, (p, g) in enumerate(zip(params, grads)):
            dt, shape = p.dtype, pre.shapes[t]
            scale = 1.0 if pre.scales is None else float(pre.scales[t])
            eps1 = adafactor_eps1(s, dt)
            n = max(p.size, 1)
            c = dt.type(s["var_c"])
            cs = np.array([ginv, gclip, scale, eps1 * eps1, 1.0, s["var_c"], 0.0, wclip], dt)
            if len(shape) >= 2:
                rows, cols = int(shape[-2]), int(shape[-1])
                nr = int(np.prod(shape[:-1]))
                batches = int(np.prod(shape[:-2]))
                rsum, psq = np.empty(nr), np.empty(nr)
                csum = np.empty(batches * cols)
                _launch(_k_af_sums, g, p, rsum, cs, csum, psq, rows, cols)
                rv, cv = states["row_var"][t], states["col_var"][t]
                with np.errstate(invalid="ignore", divide="ignore"):  # an empty dim: nan, as torch
                    rv[...] = _af_lerp(rv, (rsum / cols).astype(dt), s["var_swap"], c)
                    cv[...] = _af_lerp(cv, (csum / rows).astype(dt), s["var_swap"], c)
                    rmean = (rv.reshape(batches, rows).astype(np.float64).sum(axis=1)
                             / rows).astype(dt)
                rden = np.maximum(rmean, dt.type(eps1))
                usq = np.empty(nr)
                _launch(_k_af_rms, g, rv, cv, cs, rden, usq, rows, cols)
            else:
                nb = -(-p.size // _BLOCK)
                usq, psq = np.empty(nb), np.empty(nb)
                _launch(_k_af_vec, g, p, states["variance"][t], cs, bool(s["var_swap"]), usq, psq)
            alpha = max(s["eps2"], math.sqrt(float(psq.sum())) / math.sqrt(n)) * s["rho"]
            denom = max(1.0, math.sqrt(float(usq.sum())) / (math.sqrt(n) * s["d"]))
            cs[5], cs[6] = s["decay"], alpha / denom
            if len(shape) >= 2:
                _call(_k_af_apply, p, g, rv, cs, cv, rden, rows, cols)
            else:
                _call(_k_af_vec_apply, p, g, states["variance"][t], cs)

    return kernel


_DRIVERS[FACTORED] = _factored_kernel


def _check_table():
    """Every fused rule has an entry for each variant; the stages are the driver's."""
    for rule in RULES.values():
        if rule.kind in (DENSE_SOLVE, ORTHOGONALIZE, FACTORED):
            continue
        for v in range(1 << len(rule.variants)):
            assert (rule.name, v) in _ENTRIES, (rule.name, v)
            assert "hessian_power" not in rule.pack or (rule.name, v | _V_POW) in _ENTRIES
        # pass 1 of the trust-ratio driver runs no decay stage: such a rule decays in its body
        assert rule.kind != TRUST_RATIO or rule.weight_decay in ("rule", None), rule.name


_check_table()


def _check_sums(arrays, sizes, dt, inv):
    """(n, 2) float64: ``_check_grads``'s per-tensor sums of squares of ``a * inv``, then zeros."""
    n = len(arrays)
    sums = np.empty(n + 1)
    ptr = np.zeros((_G + 1, n), np.int64)  # (_check_grads reads row _G only)
    ptr[_G] = _data_pointers(arrays, n)
    off = np.zeros(n + 1, np.int64)
    np.cumsum(sizes, out=off[1:])
    args = (ptr, sizes, off, _scalars(dt, _plain_head(inv)), sums.ctypes.data)
    key = (_k_check, args[3].dtype, False)
    if key in _seen:
        _k_check(*args)
    else:  # the first call: say so when it compiles (as _launch does)
        timer = threading.Timer(1.0, _note_compiling)
        timer.daemon = True
        timer.start()
        try:
            _k_check(*args)
        finally:
            timer.cancel()
            _seen.add(key)
    res = np.zeros((n, 2))
    res[:, 0] = sums[1:]
    return res


def _by_dtype(arrays):
    """``[(dtype, positions)]``; one entry (positions None) when all share a dtype."""
    dts = {a.dtype for a in arrays}
    if len(dts) == 1:
        return [(dts.pop(), None)]
    return [(dt, [i for i, a in enumerate(arrays) if a.dtype == dt]) for dt in sorted(dts, key=str)]


class NumbaOps(Ops):
    """The pipeline primitives: one fused, multi-tensor pass each."""

    name = BACKEND
    xp = np
    dtypes = ("float16", "bfloat16", "float32", "float64")
    precision_options = True
    #: the state dtypes the tiled drivers store (the 8-bit block format is not one of them)
    state_formats = ("float16", "bfloat16", "float32")

    def _each_dtype(self, entry, arrays, factors, head, flags=0):
        arrays = list(arrays)
        out = []
        for dt, pos in _by_dtype(arrays):
            sub = arrays if pos is None else [arrays[i] for i in pos]
            n = len(sub)
            rows = [(_P, sub), (_G, sub)]
            fl = flags
            if _is_reduced(dt):  # 16-bit arrays: float32 arithmetic, the tiled drivers
                fl = _format(rows, n, flags, {_P, _G})
                dt = _F32
            if factors is None:
                scales = np.ones(n, dt)
            else:
                f = np.asarray(factors, np.float64)
                scales = (f if pos is None else f[pos]).astype(dt)
            if fl is not flags:
                fl[_X_GSCALE] = scales.ctypes.data
            res = _launch(entry, _table(rows, n), _sizes(sub, n), scales,
                          _scalars(dt, head), fl, DATA_OFFSET)
            out.append((pos, res))
        return out

    def _stats(self, arrays, inv, clip, exact=True):
        """(n, 2) float64: per tensor sum of clip(a*inv)^2, and nan iff some a*inv is non-finite.

        ``exact=False``: the unclipped sum only (the flag column is 0), see ``_read_blocks``.
        """
        if not exact and clip is None:
            res = self._small_check(arrays, inv)
            if res is not None:
                return res
        parts = self._each_dtype(_k_read, arrays, None,
                                 _plain_head(inv, math.inf if clip is None else clip), int(exact))
        if len(parts) == 1:
            return parts[0][1]
        out = np.empty((len(arrays), 2))
        for pos, res in parts:
            out[pos] = res
        return out

    @staticmethod
    def _small_check(arrays, inv):
        """``_stats(arrays, inv, None, exact=False)`` through ``_check_grads``, or None.

        Only for a float32 or float64 list that runs as one part (the case of a small
        model's step, and of the first step of any example): it then needs no read-pass
        kernel of its own, whose compile was about 40 % of a cold first Adam step.
        """
        arrays = list(arrays)
        n = len(arrays)
        dt = arrays[0].dtype if n else None
        if dt not in (np.float32, np.float64) or any(a.dtype != dt for a in arrays):
            return None
        sizes = _sizes(arrays, n)
        if numba.get_num_threads() > 1 and int(sizes.sum()) >= 2 * MIN_PER_THREAD:
            return None
        return _check_sums(arrays, sizes, dt, inv)

    def grad_stats(self, grads, extras, *, inv_scale, clip_value, need_sumsq, check_finite):
        inv = 1.0 if inv_scale is None else inv_scale
        if clip_value is None:
            # fast path: one float64 accumulator; a non-finite sum is re-checked exactly below
            res = self._stats(grads, inv, None, exact=False)
            if np.isfinite(res[:, 0].sum()):
                res[:, 1] = 0.0
                check_finite = check_finite and extras is not None
            else:
                res = self._stats(grads, inv, None)
        else:
            res = self._stats(grads, inv, clip_value)
        finite = True
        if check_finite:
            finite = not np.isnan(res[:, 1].sum())
            if finite and extras is not None:
                # the extra inputs (Hessians) are unscaled too: check them as the kernels see them
                finite = not np.isnan(self._stats(extras, inv, None)[:, 1].sum())
        return (np.ascontiguousarray(res[:, 0]) if need_sumsq else None), finite

    def sumsq(self, arrays):
        return np.ascontiguousarray(self._stats(arrays, 1.0, None, exact=False)[:, 0])

    def step_plan(self, rule, bucket, grads, hp, pointers=False):
        """A :class:`StepPlan` for repeated steps of one bucket, or None where it cannot.

        Only an elementwise rule's single bucket with no extra input, no norm or value
        clipping and no ``max_norm`` qualifies: a plain float32/float64 one gets a
        ``StepPlan``, one with a precision (16-bit params or state, master weights,
        stochastic rounding; not with ``pointers``) a ``ReducedStepPlan``, one with q8
        state a ``Q8StepPlan`` (for a rule with a fused q8 entry point);
        the caller (the optimizer's
        step cache, docs/design.md "Pipeline") keeps the plan only while the same
        param, grad and state arrays come back with the same options.  ``pointers``:
        the plan holds data pointers, and the caller hands it the grads' pointers
        before every step (``StepPlan.set_grads``; fastopt.torch, whose grads are
        new tensors at every backward pass).
        """
        if (rule.kind != ELEMENTWISE or rule.extra is not None or hp["clip_norm"] is not None
                or hp["clip_global_norm"] is not None or hp["max_norm"] is not None
                or hp["clip_value"] is not None):
            return None
        if bucket.precision is not None or _is_reduced(bucket.params[0].dtype):
            prec = bucket.precision  # 16-bit storage: the tiled kernel (ReducedStepPlan)
            if pointers:
                return None  # (fastopt.torch's data-pointer plans)
            if prec is not None and prec.state is _precision.Q8:
                return Q8StepPlan.make(rule, bucket, grads, hp)  # 8-bit state
            if prec is not None and not isinstance(prec.state, np.dtype):
                return None
            return ReducedStepPlan(rule, bucket, grads, hp)
        return StepPlan(rule, bucket, grads, hp, pointers)


    def scale_(self, arrays, factors):
        self._each_dtype(_k_scale, arrays, factors, _plain_head())

    def clip_(self, arrays, c):
        self._each_dtype(_k_clip, arrays, None, _plain_head(wclip=float(c)))


class StepPlan:
    """The host side of a small step, built once while the same arrays come back.

    Holds the operand tables of the read pass and of the update (object addresses:
    the kernels read each array's data pointer at call time, and the plan keeps the
    arrays alive, so an address cannot be reused), the sizes, the clip factors (ones)
    and the scalar arrays, whose values are refreshed per step.  ``finite`` runs the
    read pass (its fast form: one float64 sum per tensor), ``update`` the fused step;
    ``update(s, check=True)`` checks the grads first, in the same kernel call when
    the step runs as one part (a *checked* call: the table's extra row ``_CHECK``
    points the kernel at ``sums``, see ``_setup``), else by ``finite`` before it.
    """

    def __init__(self, rule, bucket, grads, hp, pointers=False):
        params, states = bucket.params, bucket.states
        n = len(params)
        dt = params[0].dtype
        self.rule, self.keep = rule, (params, grads, states)
        rows = [(_P, params), (_G, grads)]
        rows += [(_S0 + k, states[st]) for k, st in enumerate(rule.all_state) if st in states]
        # object addresses (the kernels read each array's data pointer), or with
        # ``pointers`` the data pointers themselves (the grad rows: set_grads)
        table = _pointer_table if pointers else _table
        self.deref = -1 if pointers else DATA_OFFSET
        self.table = table(rows, n)
        self.read_table = table([(_P, grads), (_G, grads)], n)
        #: the checked call's total of the per-tensor sums of squares, then the sums
        self.sums = np.zeros(n + 1)
        self.checked_table = np.zeros((_CHECK + 1, n), np.int64)
        self.checked_table[:_ROWS] = self.table
        self.checked_table[_CHECK, 0] = table([(0, [self.sums])], 1)[0, 0]  # (an operand like the others)
        self.sizes = _sizes(params, n)
        self.total = int(self.sizes.sum())
        self.ones = np.ones(n, dt)
        pre = Pre(maximize=hp["maximize"], clip_value=None, weight_clip=hp["weight_clip"])
        self.cs = _scalars(dt, _head(pre), _NO_RULE)
        self.read_cs = _scalars(dt, _plain_head())
        # the slots that Rule.kernel_scalars fills (the others stay as _NO_RULE has them:
        # 0, and decay, which every rule sets), written one by one: converting the whole
        # list to an array took ~4 us a step
        self.slots = [(_HEAD + KERNEL_SCALAR_SLOT[k], k) for k in rule.pack + ("l2", "decay")]
        self.entry = None  # the entry point: the variant comes from the (fixed) options

    def _pick(self, fn):
        """As the module's ``_pick`` (``_FORCE`` included) for this plan's fixed size."""
        threads = numba.get_num_threads()
        serial = _SERIAL.get(fn)
        if serial is None or _FORCE == "parallel":
            return fn, threads
        if _FORCE == "serial" or threads == 1 or self.total < 2 * MIN_PER_THREAD:
            return serial, 1
        return fn, threads

    def finite(self):
        """Whether every grad is finite: True, or None when the exact check must decide."""
        fn, threads = self._pick(_k_read)
        res = _run(fn, threads, (self.read_table, self.sizes, self.ones, self.read_cs, 0,
                                 self.deref))
        # the fast form leaves the flag column 0: the whole sum is finite iff every grad is
        return True if math.isfinite(res.sum()) else None

    def update(self, s, check=False, step=None):
        """The fused update with the step scalars ``s`` (``Rule.step_scalars``).

        ``check``: the grads are checked first; returns False, with nothing written,
        where the check leaves the decision to the full step (a non-finite sum), else True.
        ``step`` (the step count) is for ``ReducedStepPlan``'s stochastic rounding; unused here.
        """
        rule, cs = self.rule, self.cs
        for i, k in self.slots:
            cs[i] = float(s[k])  # (as Rule.kernel_scalars: float, then the dtype)
        fn = self.entry
        if fn is None:
            fn = self.entry = _ENTRIES[rule.name, _mode(rule, s)]
        fn, threads = self._pick(fn)  # the serial twin when the step runs as one part
        args = (self.table, self.sizes, self.ones, cs, rule.kernel_flags(s), self.deref)
        if check:
            if threads == 1 or self.total < 2 * MIN_PER_THREAD:  # one part: check in the call
                self.sums[0] = math.nan  # (a call that did not check reads as failed)
                _run(fn, threads, (self.checked_table,) + args[1:])
                return math.isfinite(self.sums[0])
            if self.finite() is None:
                return False
        _run(fn, threads, args)
        return True

    def set_grads(self, ptrs):
        """The grads' data pointers for the next step (a plan made with ``pointers``).

        The caller keeps the grads alive until the step has run and has checked that
        each is a C-contiguous array of its param's dtype and size.
        """
        self.table[_G] = ptrs
        self.checked_table[_G] = ptrs
        self.read_table[_P] = ptrs
        self.read_table[_G] = ptrs


OPS = NumbaOps()


def _register():
    for rule in RULES.values():
        kernel = _DRIVERS[rule.kind](rule)
        kernel.__name__ = f"{rule.name}_numba"
        kernel.__doc__ = f"The fused {rule.name} step (see fastopt.kernels.numba_cpu)."
        register_kernel(rule.name, BACKEND, kernel)


_register()


def warmup_jobs(dtypes=("float32", "float64"), rules=None, variants=True):
    """The ``(label, run)`` pairs that ``warmup`` runs: one per kernel it compiles."""
    from .._backend import Pre, get_kernel

    jobs = []
    for dt in map(_precision.as_dtype, dtypes):
        z = lambda dt=dt: np.zeros(3, dt)  # noqa: E731
        reduced = _is_reduced(dt)
        for name in rules or RULES:
            rule = RULES[name]
            if reduced and rule.kind == DENSE_SOLVE:
                continue  # Newton takes float32/float64 only
            pre = Pre()
            if reduced:  # state float32, the default: the same tiled kernel as any other
                pre = Pre(precision=_precision.resolve_precision(dt, kind=rule.kind), step=1)
            flags = rule.variants if variants else ()
            for v in range(1 << len(flags)):
                hp = {**rule.defaults, **{f: bool(v >> k & 1) for k, f in enumerate(flags)}}
                if hp.get("has_momentum") and not hp.get("momentum"):
                    hp["momentum"] = 0.9  # the variant flag of SGD and RMSprop is momentum > 0
                hp.pop("has_momentum", None)
                states = {k: [np.zeros(3, _F32) if reduced else z()] for k, _ in rule.state(hp)}
                extras = None
                if rule.extra is not None:
                    shape = rule.extra_shape_of((3,), 3)
                    extras = [np.eye(3, dtype=dt).reshape(-1) if len(shape) == 2 else z()]
                s, _ = rule.step_scalars(hp, 1, dict(rule.group_state))
                on = [f for k, f in enumerate(flags) if v >> k & 1]
                # a rule that needs the shapes (Muon: matrices) gets the 3 elements as a 1 x 3 one
                pre = Pre(shapes=[(1, 3)] if rule.param_ndim == 2 else None)
                label = " ".join([name, dt.name] + on)
                jobs.append((label, lambda name=name, states=states, s=s, extras=extras, z=z,
                             pre=pre: get_kernel(name, BACKEND)([z()], [z()], states, s, pre,
                                                                extras)))
        jobs.append((f"grad checks {dt.name}", lambda z=z: (
            OPS.grad_stats([z()], None, inv_scale=None, clip_value=None, need_sumsq=True,
                           check_finite=True),
            OPS.grad_stats([z()], None, inv_scale=None, clip_value=1.0, need_sumsq=True,
                           check_finite=True))))
        jobs.append((f"max_norm and clip {dt.name}",
                     lambda z=z: (OPS.scale_([z()], np.ones(1)), OPS.clip_([z()], 1.0))))
    return jobs


def warmup(dtypes=("float32", "float64"), rules=None, variants=True, progress=None):
    """Compile (or load from the cache) the kernels for ``dtypes``; returns the seconds taken.

    ``rules``: the rule names (default all); ``variants``: also the variants
    (amsgrad, momentum, centered); ``progress(done, total, label)`` is called
    before each kernel and once at the end.  Run it once before starting many
    processes that share a cold cache (numba#4807).
    """
    import time

    global _FORCE
    jobs = warmup_jobs(dtypes, rules, variants)
    t0 = time.perf_counter()
    for k, (label, run) in enumerate(jobs):
        if progress is not None:
            progress(k, len(jobs), label)
        # both compiled forms of each entry point: the serial twin (steps that run as one
        # part) and the parallel function (bigger steps), see ``_entry``
        try:
            for _FORCE in ("serial", "parallel"):
                run()
        finally:
            _FORCE = None
    if progress is not None:
        progress(len(jobs), len(jobs), "done")
    return time.perf_counter() - t0


# ================================================================== q8 block driver
# 8-bit block-quantized state (``state_dtype="q8"``; docs/design.md, "8-bit state
# format"): a state is uint8 codes shaped like the param plus one float32 absmax per
# block of ``_QB`` elements, decoded as ``map[code] * absmax``.  The work item is a
# block, never an element range: a block's absmax needs every new value of the
# block, so a part covers whole blocks, and blocks restart at each tensor (a block
# never straddles two).  Per block, in one pass over memory:
#
#   dequantize every q8 state into float32 scratch (``_QB`` per state, per part)
#   -> the step pipeline and the rule's own body on the scratch (``_q8_apply``: the
#      same statements as ``_apply``) -> the param written once
#   -> the new absmax of each state block (for float32 params taken in the update
#      loop for states 0 and 1, ``_q8_top`` otherwise) -> the exact nearest code of
#      each element (``_q8_codes``: a code table over the top 16 bits of
#      ``y = x / absmax``, 8 elements per AVX2 gather, 16 per call and store, with
#      the sign guard) -> codes and absmax written.
#
# The param step reads the new *unquantized* state (the scratch), as the reference.
# Bodies index the scratch with the element's position in its block, so the extra
# input (AdaHessian's Hessian diagonal) is passed as the block's slice.
#
# 16-bit params (float16, bfloat16; master weights, stochastic rounding) take the same
# entry points with a *q8 format vector* (int64, ``_Y_*``) in place of the int flags:
# ``_q8_apply``/``_q8_sums`` are overloads typed by that argument, so a float32 call
# compiles what it always did.  Per block the param (its float32 master when there
# is one), the grad and the extra input are read into float32 scratch with the bit
# helpers of the reduced-precision section (``_bf16_load``, ``_f16_load``), the
# pipeline and body run on the scratch as above, and after the codes the master is
# written as is and the param rounded once (``_bf16_rne``, ``_sr_store`` with the
# element's index in its param, ``_f16_rne``): the reference's ``_reduced_tensor``
# order.  ``max_norm`` with 16-bit params (its factor must act before that rounding)
# takes the reference's q8 step.

_QB = 256  # fastopt.quantization.BLOCKSIZE (asserted on the host side)
_NQ = 3  # q8 states per rule at most (Rule.all_state)
# rows of the q8 operand table: param, grad, codes of state k, absmax of state k, extra
_QP, _QG, _QC0, _QA0, _QE = 0, 1, 2, 2 + _NQ, 2 + 2 * _NQ
_QM = _QE + 1  # the float32 master copy of a 16-bit param (0: none)
_QROWS = _QM + 1
# the q8 format vector of a 16-bit call: flags, stochastic rounding, its step key, the
# param's storage code (_C_*), then a storage code per tensor for the grads and extras
_Y_FLAGS, _Y_SR, _Y_KEY, _Y_P = 0, 1, 2, 3
_Y_HEAD = 4
# The code table (_q8_tables): one uint32 per value of the top 16 bits of y (sign,
# exponent, 7 mantissa bits), the bucket's first code << 16 | the low 16 bits of the
# one threshold inside the bucket (sign-folded; 0xFFFF when none)
_Q_SHIFT, _Q_LOW = 16, 0xFFFF
# uint32 constants: the code loop stays in 32-bit lanes (a Python int is an int64 to
# Numba, and uint32 op int64 widens every lane)
_QU_ZERO, _QU_ABS, _QU_SHIFT = np.uint32(0), np.uint32(0x7FFFFFFF), np.uint32(_Q_SHIFT)


def _has_avx2() -> bool:
    """True when this host compiles AVX2 (the encode's 8-lane table gather)."""
    try:
        import llvmlite.binding as llb

        return (os.uname().machine in ("x86_64", "AMD64")
                and "+avx2" in llb.get_host_cpu_features().flatten().split(","))
    except Exception:  # noqa: BLE001 -- no feature list: the scalar path is always correct
        return False


#: Whether ``_q8_store`` looks codes up 8 at a time with an AVX2 gather (else scalar).
#: A compile-time constant of the kernels, from the host CPU only: Numba's cache index
#: carries the CPU name and features, so no other machine loads this choice.
_Q8_GATHER = _has_avx2()


@intrinsic
def _put(typingctx, addr, k, value):
    """Store ``value`` at element ``k`` of the array of its type at address ``addr``.

    An intrinsic, not ``_as_ptr(addr, z)[k] = value``: inside a parfor, Numba's
    dead-code pass dropped that single store through a pointer made in an inlined
    function (it sees no array it could alias), so a block's absmax was never written.
    """

    def codegen(context, builder, sig, args):
        ptr = builder.inttoptr(args[0], context.get_value_type(types.CPointer(sig.args[2])))
        builder.store(args[2], builder.gep(ptr, [args[1]]))
        return context.get_dummy_value()

    return types.void(types.int64, types.int64, value), codegen


def _q8_encode_codegen(nvec):
    """The codegen of ``_q8_encode8`` (``nvec`` 1) and ``_q8_encode16`` (2): per 8-lane
    vector the division, one gather of table entries, the comparison and the sign guard;
    the ``8 * nvec`` codes leave in one byte store."""
    def codegen(context, builder, sig, args):
        i8, i32, f32 = ir.IntType(8), ir.IntType(32), ir.FloatType()
        vi, vf = ir.VectorType(i32, 8), ir.VectorType(f32, 8)

        def splat(ty, value):
            return ir.Constant(ty, [ir.Constant(ty.element, value)] * ty.count)

        def bcast(vty, scalar):
            v = builder.insert_element(ir.Constant(vty, ir.Undefined), scalar, ir.Constant(i32, 0))
            return builder.shuffle_vector(v, ir.Constant(vty, ir.Undefined), splat(vi, 0))

        fnty = ir.FunctionType(vi, [vi, ir.PointerType(i8), vi, vi, i8])
        gather = builder.module.declare_intrinsic("llvm.x86.avx2.gather.d.d.256", fnty=fnty)
        table = builder.inttoptr(args[2], ir.PointerType(i8))
        am, zc = bcast(vf, args[1]), bcast(vi, args[3])
        xp = builder.inttoptr(args[0], ir.PointerType(vf))
        codes = []
        for h in range(nvec):
            x = builder.load(builder.gep(xp, [ir.Constant(i32, h)]), align=4)
            y = builder.bitcast(builder.fdiv(x, am), vi)
            entry = builder.call(gather, [splat(vi, 0), table, builder.lshr(y, splat(vi, _Q_SHIFT)),
                                          splat(vi, -1), ir.Constant(i8, 4)])
            low = builder.and_(builder.xor(y, builder.ashr(y, splat(vi, 31))), splat(vi, _Q_LOW))
            above = builder.icmp_signed(">", low, builder.and_(entry, splat(vi, _Q_LOW)))
            code = builder.add(builder.lshr(entry, splat(vi, _Q_SHIFT)), builder.zext(above, vi))
            neg = builder.fcmp_ordered("<", x, splat(vf, 0.0))
            guard = builder.and_(neg, builder.icmp_unsigned("==", code, zc))
            codes.append(builder.sub(code, builder.zext(guard, vi)))
        if nvec == 2:
            lanes = ir.Constant(ir.VectorType(i32, 16), [ir.Constant(i32, k) for k in range(16)])
            code = builder.shuffle_vector(codes[0], codes[1], lanes)
        else:
            code = codes[0]
        vb = ir.VectorType(i8, 8 * nvec)
        builder.store(builder.trunc(code, vb), builder.inttoptr(args[4], ir.PointerType(vb)),
                      align=1)
        return context.get_dummy_value()

    return codegen


@intrinsic
def _q8_encode8(typingctx, xaddr, am, kaddr, zc, caddr):
    """Codes of the 8 float32 at ``xaddr`` in a block of absmax ``am``, as 8 bytes at ``caddr``.

    One AVX2 vector: ``y = x / am`` (IEEE division, no fast-math flags), the code
    table entry of each ``bits(y) >> 16`` fetched with one gather, the code
    ``entry >> 16`` plus one when the low 16 bits of ``y`` (inverted for a
    negative ``y``, whose order is reversed) exceed the entry's low 16 bits, then
    the sign guard (``x < 0`` and code ``zc`` -> ``zc - 1``) and the byte store.
    ``am`` must not be 0.  ``_q8_codes``'s scalar loop is the same lookup per element.
    """
    return (types.void(types.int64, types.float32, types.int64, types.uint32, types.int64),
            _q8_encode_codegen(1))


@intrinsic
def _q8_encode16(typingctx, xaddr, am, kaddr, zc, caddr):
    """``_q8_encode8`` on 16 float32 (two vectors, lane for lane the same operations),
    the 16 codes packed into one 16-byte store: fewer pack and store instructions
    per code than two ``_q8_encode8`` calls (~7% of the encode, one thread)."""
    return (types.void(types.int64, types.float32, types.int64, types.uint32, types.int64),
            _q8_encode_codegen(2))


@njit(inline="always")
def _q8_setup(tab, sizes, deref, threads):
    """Data pointers, element and block prefix offsets per tensor, and the number of parts."""
    n = sizes.shape[0]
    off = np.zeros(n + 1, np.int64)
    boff = np.zeros(n + 1, np.int64)
    for t in range(n):
        off[t + 1] = off[t] + sizes[t]
        boff[t + 1] = boff[t] + (sizes[t] + _QB - 1) // _QB
    parts = min(threads, max(1, off[n] // MIN_PER_THREAD))
    return _pointers(tab, deref), off, boff, parts


@njit(inline="always")
def _q8_load(ptr, q, t, blk, a, m, qm, w, z):
    """Decode block ``blk`` (elements ``[a, a+m)``) of q8 state ``q`` of tensor ``t`` into ``w[q]``."""
    codes = _as_ptr(ptr[_QC0 + q, t], np.uint8(0))
    scale = _as_ptr(ptr[_QA0 + q, t], z)[blk]
    row = w[q]
    mp = qm[q]
    au = np.uint64(a)
    for i in range(np.uint64(m)):  # unsigned indices, as in _apply
        row[i] = mp[codes[au + i]] * scale


@njit(inline="always")
def _q8_top(xb, m):
    """The bits of the absmax of ``xb[:m]`` (the float32 bits of a block, as uint32): the
    integer max over ``bits & 0x7FFFFFFF`` (for non-negative floats the integer order is
    the float order and every nan is above inf, so nan propagates; vectorized)."""
    top = _QU_ZERO
    for i in range(np.uint64(m)):
        v = np.uint32(xb[i] & _QU_ABS)
        top = v if v > top else top  # uint32 lanes (uint32 & uint32 is a uint64 to Numba)
    return top


@njit(inline="always")
def _q8_store(ptr, q, t, blk, a, m, qk, qt, qz, w, wb):
    """Encode ``w[q][:m]`` as block ``blk`` of q8 state ``q``: its absmax, then each nearest code
    (``_q8_top``, then ``_q8_codes``)."""
    _q8_codes(ptr, q, t, blk, a, m, _q8_top(wb[q], m), qk, qt, qz, w, wb)


@njit(inline="always")
def _q8_codes(ptr, q, t, blk, a, m, top, qk, qt, qz, w, wb):
    """Block ``blk`` of q8 state ``q`` from ``w[q][:m]`` whose absmax has the bits ``top``.

    Exactly ``fastopt.quantization.quantize_blockwise``: absmax = max |x| (nan if
    any x is nan), y = x / absmax (an all-zero block gets the code of y = 0, no
    nan), code = #{thresholds < y} from the code table ``qk[q]`` indexed by the
    top 16 bits of y (one load and one comparison; see ``_q8_tables``), nan -> 0,
    and the sign guard: a negative x whose code is the zero code ``qz[q]`` gets
    the code below it (``qz[q]`` is 256 for the unsigned map, which has no guard).

    With AVX2 (``_Q8_GATHER``) 16 elements at a time go through ``_q8_encode16``
    (division, one gather of table entries per 8, guard, one 16-byte store), 8
    through ``_q8_encode8``, the tail of a partial block through the scalar
    loop; without AVX2 every element takes the scalar path (``qt[q]``: the
    bucket's threshold as a float32).  The absmax is written last.
    """
    x = w[q]
    mu, au = np.uint64(m), np.uint64(a)
    wb[_NQ + 1, 0] = top
    am = w[_NQ + 1, 0]
    kt, tt = qk[q], qt[q]
    zc = qz[q]
    codes = _as_ptr(ptr[_QC0 + q, t], np.uint8(0))
    if top == _QU_ZERO:
        zero = np.uint8(kt[0] >> _QU_SHIFT)  # the code of y = +0.0 (x = -0.0 is not < 0)
        for i in range(mu):
            codes[au + i] = zero
    else:
        i = 0
        if _Q8_GATHER:
            xa = np.int64(x.ctypes.data)
            ka = np.int64(kt.ctypes.data)
            ca = ptr[_QC0 + q, t] + a
            while i + 16 <= m:
                _q8_encode16(xa + 4 * i, am, ka, zc, ca + i)
                i += 16
            if i + 8 <= m:
                _q8_encode8(xa + 4 * i, am, ka, zc, ca + i)
                i += 8
        zero = w[_NQ + 1, 1]  # 0.0 (set by the caller)
        while i < m:
            xi = x[i]
            y = xi / am  # IEEE division: the absmax element gives exactly 1
            k = _f32_bits(y) >> _QU_SHIFT
            code = (kt[k] >> _QU_SHIFT) + np.uint32(y > tt[k])  # nan: code 0, +inf threshold
            code = code - np.uint32((code == zc) & (xi < zero))  # the sign guard
            codes[au + i] = np.uint8(code)
            i += 1
    _put(ptr[_QA0 + q, t], blk, am)


@njit(inline="always")
def _q8_block(k, parts, boff):
    """The blocks ``[j, hi)`` part ``k`` covers and the tensor of block ``j``."""
    nb = boff[boff.shape[0] - 1]
    j, hi = nb * k // parts, nb * (k + 1) // parts
    return j, hi, np.searchsorted(boff, j, side="right") - 1


def _q8_apply(body, mode, k, parts, ptr, off, boff, scales, coef, cs, f, qm, qk, qt, qz):
    """Part ``k`` of a q8 update pass (see the overload: ``f`` an int or a q8 format vector)."""
    raise NotImplementedError("only callable from a jitted function")


def _q8_sums(k, parts, ptr, off, boff, scales, cs, f, qm, acc):
    """LAMB pass 1 on q8 moments (see the overload)."""
    raise NotImplementedError("only callable from a jitted function")


def _q8_apply_f32(body, mode, k, parts, ptr, off, boff, scales, coef, cs, f, qm, qk, qt, qz):
    """Part ``k`` of a q8 update pass: per block, decode, ``_apply``'s statements, encode.

    ``coef[t]`` is what the body gets as ``ts`` (``scales`` for every rule but
    LAMB, whose pass 2 gets ``lr * trust``); the grad is scaled by ``scales[t]``.
    """
    j, hi, t = _q8_block(k, parts, boff)
    c = to_fixed_tuple(cs, _NSCALARS)
    z = c[_ZERO]
    l2, decay = c[_S_L2], c[_S_DECAY]
    use_l2 = l2 != z
    w = np.empty((_NQ + 3, _QB), cs.dtype)  # states, y, [absmax, zero], codes
    wb = w.view(np.uint32)
    w[_NQ + 1, 1] = z
    s0, s1, s2 = w[0], w[1], w[2]
    b0, b1 = wb[0], wb[1]
    while j < hi:
        while boff[t + 1] <= j:
            t += 1
        blk = j - boff[t]
        a = blk * _QB
        m = min(_QB, off[t + 1] - off[t] - a)
        p = _as_ptr(ptr[_QP, t], z)
        g = _as_ptr(ptr[_QG, t], z)
        e = numba.carray(_as_ptr(ptr[_QE, t], z), off[t + 1] - off[t])[a:a + m]
        for q in range(_NQ):
            if ptr[_QC0 + q, t] != 0:
                _q8_load(ptr, q, t, blk, a, m, qm, w, z)
        ts, tc = scales[t], coef[t]
        au = np.uint64(a)
        top0 = _QU_ZERO
        top1 = _QU_ZERO
        # unsigned indices, as in _apply: a signed one keeps LLVM from vectorizing
        for i in range(np.uint64(m)):
            x = _clip(g[au + i] * c[_GINV], c[_GCLIP]) * ts
            pi = p[au + i]
            if use_l2:  # as _apply: never 0 * p
                x = x + l2 * pi
            pi = pi * decay
            p[au + i] = _clip(body(i, x, pi, s0, s1, s2, e, c, f, tc, mode), c[_WCLIP])
            # the absmax bits of states 0 and 1 (_q8_top) as the body writes them (a row
            # the rule has no state in holds stale scratch: its top is never used)
            v = np.uint32(b0[i] & _QU_ABS)
            top0 = v if v > top0 else top0
            v = np.uint32(b1[i] & _QU_ABS)
            top1 = v if v > top1 else top1
        if ptr[_QC0, t] != 0:
            _q8_codes(ptr, 0, t, blk, a, m, top0, qk, qt, qz, w, wb)
        if ptr[_QC0 + 1, t] != 0:
            _q8_codes(ptr, 1, t, blk, a, m, top1, qk, qt, qz, w, wb)
        for q in range(2, _NQ):
            if ptr[_QC0 + q, t] != 0:
                _q8_store(ptr, q, t, blk, a, m, qk, qt, qz, w, wb)
        j += 1


def _q8_sums_f32(k, parts, ptr, off, boff, scales, cs, f, qm, acc):
    """LAMB pass 1, part ``k``: ``acc[j]`` = float64 (sum p^2, sum r^2) of block ``j``.

    The moments are decoded and updated in scratch only (nothing is written):
    pass 2 decodes them again and repeats the same update bit for bit.
    """
    j, hi, t = _q8_block(k, parts, boff)
    c = to_fixed_tuple(cs, _NSCALARS)
    z = c[_ZERO]
    w = np.empty((_NQ + 1, _QB), cs.dtype)
    s0, s1, s2 = w[0], w[1], w[2]
    while j < hi:
        while boff[t + 1] <= j:
            t += 1
        blk = j - boff[t]
        a = blk * _QB
        m = min(_QB, off[t + 1] - off[t] - a)
        p = _as_ptr(ptr[_QP, t], z)
        g = _as_ptr(ptr[_QG, t], z)
        for q in range(_NQ):
            if ptr[_QC0 + q, t] != 0:
                _q8_load(ptr, q, t, blk, a, m, qm, w, z)
        ts = scales[t]
        u = 0.0
        v = 0.0
        for i in range(m):
            du, dv = _lamb_moments(i, g[a + i] * c[_GINV], p[a + i], s0, s1, s2, s2, c, f, ts, 0)
            u += du
            v += dv
        acc[j, 0] = u
        acc[j, 1] = v
        j += 1


@njit(inline="always")
def _q8_in(dst, addr, code, a, m):
    """``dst[:m]`` = float32 values of elements ``[a, a+m)`` of an operand held as ``code``."""
    ua = np.uint64(a)
    if code == _C_F32:
        src = _as_ptr(addr, _ZERO_F32)
        for i in range(np.uint64(m)):
            dst[i] = src[ua + i]
    elif code == _C_BF16:
        h = _as_ptr(addr, _ZERO_U16)
        for i in range(np.uint64(m)):
            dst[i] = _bf16_load(h[ua + i])
    else:
        h = _as_ptr(addr, _ZERO_U16)
        for i in range(np.uint64(m)):
            dst[i] = _f16_load(h[ua + i])


@njit(inline="always")
def _q8_out(src, addr, code, a, m, sr, key):
    """Elements ``[a, a+m)`` of an operand held as ``code`` = ``src[:m]``, rounded once.

    bfloat16 to nearest even or (``sr``) stochastically with the hash of the
    element's index in its param; float16 to nearest even; float32 as is.
    """
    ua = np.uint64(a)
    if code == _C_F32:
        dst = _as_ptr(addr, _ZERO_F32)
        for i in range(np.uint64(m)):
            dst[ua + i] = src[i]
    elif code == _C_BF16:
        h = _as_ptr(addr, _ZERO_U16)
        if sr:
            _sr_store(h, ua, src, m, key, _sr_scratch())
        else:
            for i in range(np.uint64(m)):
                h[ua + i] = _bf16_rne(src[i])
    else:
        h = _as_ptr(addr, _ZERO_U16)
        for i in range(np.uint64(m)):
            h[ua + i] = _f16_rne(src[i])


@njit(inline="always")
def _q8_in16(ptr, fmt, t, nt, a, m, h):
    """Read the param (its master when there is one), grad and extra of block ``[a, a+m)``
    of tensor ``t`` into the float32 rows of ``h``."""
    if ptr[_QM, t] != 0:
        _q8_in(h[0], ptr[_QM, t], _C_F32, a, m)
    else:
        _q8_in(h[0], ptr[_QP, t], fmt[_Y_P], a, m)
    _q8_in(h[1], ptr[_QG, t], fmt[_Y_HEAD + t], a, m)
    if ptr[_QE, t] != 0:
        _q8_in(h[2], ptr[_QE, t], fmt[_Y_HEAD + nt + t], a, m)


def _q8_apply_16(body, mode, k, parts, ptr, off, boff, scales, coef, cs, f, qm, qk, qt, qz):
    """``_q8_apply_f32`` for 16-bit params (``f``: the q8 format vector).

    Per block: the param or master, grad and extra into float32 scratch, the q8
    states decoded, the same pipeline and body, the codes and absmax, then the
    master as is and the param with its one rounding.
    """
    fmt = f  # the overloads' argument names must match; the body gets the flags
    nt = off.shape[0] - 1
    j, hi, t = _q8_block(k, parts, boff)
    c = to_fixed_tuple(cs, _NSCALARS)
    z = c[_ZERO]
    l2, decay = c[_S_L2], c[_S_DECAY]
    use_l2 = l2 != z
    f = fmt[_Y_FLAGS]
    sr = fmt[_Y_SR] != 0
    key = np.uint64(fmt[_Y_KEY])
    w = np.empty((_NQ + 3, _QB), cs.dtype)  # states, y, [absmax, zero], codes
    wb = w.view(np.uint32)
    w[_NQ + 1, 1] = z
    h = np.empty((3, _QB), cs.dtype)  # param, grad, extra
    pt, gt, et = h[0], h[1], h[2]
    s0, s1, s2 = w[0], w[1], w[2]
    while j < hi:
        while boff[t + 1] <= j:
            t += 1
        blk = j - boff[t]
        a = blk * _QB
        m = min(_QB, off[t + 1] - off[t] - a)
        _q8_in16(ptr, fmt, t, nt, a, m, h)
        for q in range(_NQ):
            if ptr[_QC0 + q, t] != 0:
                _q8_load(ptr, q, t, blk, a, m, qm, w, z)
        ts, tc = scales[t], coef[t]
        for i in range(np.uint64(m)):
            x = _clip(gt[i] * c[_GINV], c[_GCLIP]) * ts
            pi = pt[i]
            if use_l2:
                x = x + l2 * pi
            pi = pi * decay
            pt[i] = _clip(body(i, x, pi, s0, s1, s2, et, c, f, tc, mode), c[_WCLIP])
        for q in range(_NQ):
            if ptr[_QC0 + q, t] != 0:
                _q8_store(ptr, q, t, blk, a, m, qk, qt, qz, w, wb)
        if ptr[_QM, t] != 0:
            _q8_out(pt, ptr[_QM, t], _C_F32, a, m, False, key)
        _q8_out(pt, ptr[_QP, t], fmt[_Y_P], a, m, sr, key)
        j += 1


def _q8_sums_16(k, parts, ptr, off, boff, scales, cs, f, qm, acc):
    """``_q8_sums_f32`` for 16-bit params: p and g through the float32 scratch."""
    fmt = f  # the overloads' argument names must match; the body gets the flags
    nt = off.shape[0] - 1
    j, hi, t = _q8_block(k, parts, boff)
    c = to_fixed_tuple(cs, _NSCALARS)
    z = c[_ZERO]
    f = fmt[_Y_FLAGS]
    w = np.empty((_NQ + 1, _QB), cs.dtype)
    s0, s1, s2 = w[0], w[1], w[2]
    h = np.empty((3, _QB), cs.dtype)
    pt, gt = h[0], h[1]
    while j < hi:
        while boff[t + 1] <= j:
            t += 1
        blk = j - boff[t]
        a = blk * _QB
        m = min(_QB, off[t + 1] - off[t] - a)
        _q8_in16(ptr, fmt, t, nt, a, m, h)
        for q in range(_NQ):
            if ptr[_QC0 + q, t] != 0:
                _q8_load(ptr, q, t, blk, a, m, qm, w, z)
        ts = scales[t]
        u = 0.0
        v = 0.0
        for i in range(m):
            du, dv = _lamb_moments(i, gt[i] * c[_GINV], pt[i], s0, s1, s2, s2, c, f, ts, 0)
            u += du
            v += dv
        acc[j, 0] = u
        acc[j, 1] = v
        j += 1


@overload(_q8_apply, inline="always")
def _q8_apply_overload(body, mode, k, parts, ptr, off, boff, scales, coef, cs, f, qm, qk, qt,
                       qz):
    return _q8_apply_16 if isinstance(f, types.Array) else _q8_apply_f32


@overload(_q8_sums, inline="always")
def _q8_sums_overload(k, parts, ptr, off, boff, scales, cs, f, qm, acc):
    return _q8_sums_16 if isinstance(f, types.Array) else _q8_sums_f32


@njit(inline="always")
def _lamb_q8(i, g, p, m, v, s2, e, c, f, ts, mode):  # LAMB pass 2 on decoded moments
    # the moments again (pass 1 wrote only scratch), then _lamb_step's update; ts = lr * trust
    mi, vi = _moments(i, m, v, g, g, c)
    return p - ts * _lamb_r(p, mi, vi, c)


def _q8_lars_sums(k, parts, ptr, off, boff, scales, cs, f, acc):
    """LARS pass 1 on a q8 bucket (see the overload): ``acc[j]`` = float64 (sum p^2, sum u^2)
    of block ``j``.  The norms need the param and grad only: the momentum is not decoded."""
    raise NotImplementedError("only callable from a jitted function")


def _q8_lars_sums_f32(k, parts, ptr, off, boff, scales, cs, f, acc):
    j, hi, t = _q8_block(k, parts, boff)
    c = to_fixed_tuple(cs, _NSCALARS)
    z = c[_ZERO]
    while j < hi:
        while boff[t + 1] <= j:
            t += 1
        a = (j - boff[t]) * _QB
        m = min(_QB, off[t + 1] - off[t] - a)
        p = _as_ptr(ptr[_QP, t], z)
        g = _as_ptr(ptr[_QG, t], z)
        ts = scales[t]
        u = 0.0
        v = 0.0
        for i in range(m):
            du, dv = _lars_norms(i, g[a + i] * c[_GINV], p[a + i], p, p, p, p, c, f, ts, 0)
            u += du
            v += dv
        acc[j, 0] = u
        acc[j, 1] = v
        j += 1


def _q8_lars_sums_16(k, parts, ptr, off, boff, scales, cs, f, acc):
    """``_q8_lars_sums_f32`` for 16-bit params: p (or its master) and g through float32."""
    fmt = f
    nt = off.shape[0] - 1
    j, hi, t = _q8_block(k, parts, boff)
    c = to_fixed_tuple(cs, _NSCALARS)
    f = fmt[_Y_FLAGS]
    h = np.empty((3, _QB), cs.dtype)
    pt, gt = h[0], h[1]
    while j < hi:
        while boff[t + 1] <= j:
            t += 1
        a = (j - boff[t]) * _QB
        m = min(_QB, off[t + 1] - off[t] - a)
        _q8_in16(ptr, fmt, t, nt, a, m, h)
        ts = scales[t]
        u = 0.0
        v = 0.0
        for i in range(m):
            du, dv = _lars_norms(i, gt[i] * c[_GINV], pt[i], pt, pt, pt, pt, c, f, ts, 0)
            u += du
            v += dv
        acc[j, 0] = u
        acc[j, 1] = v
        j += 1


@overload(_q8_lars_sums, inline="always")
def _q8_lars_sums_overload(k, parts, ptr, off, boff, scales, cs, f, acc):
    return _q8_lars_sums_16 if isinstance(f, types.Array) else _q8_lars_sums_f32


# One entry point per rule; the variant is a runtime argument tested once per call
# (each branch instantiates the driver with a constant mode, so every inner loop is
# still specialised).  Fewer entry points than _ENTRIES: a q8 entry compiles several
# loops per body, and the parity tests compile every one of them cold.


@_entry()
def _k_q8_sgd(tab, sizes, scales, cs, flags, deref, variant, qm, qk, qt, qz, threads):
    ptr, off, boff, parts = _q8_setup(tab, sizes, deref, threads)
    for k in prange(parts):  # only the momentum variant has a state
        _q8_apply(_sgd, _V_SGD_MOMENTUM, k, parts, ptr, off, boff, scales, scales, cs, flags,
                  qm, qk, qt, qz)


@_entry()
def _k_q8_adam(tab, sizes, scales, cs, flags, deref, variant, qm, qk, qt, qz, threads):
    ptr, off, boff, parts = _q8_setup(tab, sizes, deref, threads)
    if variant == _V_ADAM_AMSGRAD:
        for k in prange(parts):
            _q8_apply(_adam, _V_ADAM_AMSGRAD, k, parts, ptr, off, boff, scales, scales, cs,
                      flags, qm, qk, qt, qz)
    else:
        for k in prange(parts):
            _q8_apply(_adam, 0, k, parts, ptr, off, boff, scales, scales, cs, flags,
                      qm, qk, qt, qz)


@_entry()
def _k_q8_adagrad(tab, sizes, scales, cs, flags, deref, variant, qm, qk, qt, qz, threads):
    ptr, off, boff, parts = _q8_setup(tab, sizes, deref, threads)
    for k in prange(parts):
        _q8_apply(_adagrad, 0, k, parts, ptr, off, boff, scales, scales, cs, flags,
                  qm, qk, qt, qz)


@_entry()
def _k_q8_rmsprop(tab, sizes, scales, cs, flags, deref, variant, qm, qk, qt, qz, threads):
    ptr, off, boff, parts = _q8_setup(tab, sizes, deref, threads)
    if variant == _V_RMSPROP_CENTERED | _V_RMSPROP_MOMENTUM:
        for k in prange(parts):
            _q8_apply(_rmsprop, _V_RMSPROP_CENTERED | _V_RMSPROP_MOMENTUM, k, parts, ptr, off,
                      boff, scales, scales, cs, flags, qm, qk, qt, qz)
    elif variant == _V_RMSPROP_CENTERED:
        for k in prange(parts):
            _q8_apply(_rmsprop, _V_RMSPROP_CENTERED, k, parts, ptr, off, boff, scales, scales,
                      cs, flags, qm, qk, qt, qz)
    elif variant == _V_RMSPROP_MOMENTUM:
        for k in prange(parts):
            _q8_apply(_rmsprop, _V_RMSPROP_MOMENTUM, k, parts, ptr, off, boff, scales, scales,
                      cs, flags, qm, qk, qt, qz)
    else:
        for k in prange(parts):
            _q8_apply(_rmsprop, 0, k, parts, ptr, off, boff, scales, scales, cs, flags,
                      qm, qk, qt, qz)


@_entry()
def _k_q8_adadelta(tab, sizes, scales, cs, flags, deref, variant, qm, qk, qt, qz, threads):
    ptr, off, boff, parts = _q8_setup(tab, sizes, deref, threads)
    for k in prange(parts):
        _q8_apply(_adadelta, 0, k, parts, ptr, off, boff, scales, scales, cs, flags,
                  qm, qk, qt, qz)


@_entry()
def _k_q8_adamax(tab, sizes, scales, cs, flags, deref, variant, qm, qk, qt, qz, threads):
    ptr, off, boff, parts = _q8_setup(tab, sizes, deref, threads)
    for k in prange(parts):
        _q8_apply(_adamax, 0, k, parts, ptr, off, boff, scales, scales, cs, flags,
                  qm, qk, qt, qz)


@_entry()
def _k_q8_nadam(tab, sizes, scales, cs, flags, deref, variant, qm, qk, qt, qz, threads):
    ptr, off, boff, parts = _q8_setup(tab, sizes, deref, threads)
    for k in prange(parts):
        _q8_apply(_nadam, 0, k, parts, ptr, off, boff, scales, scales, cs, flags,
                  qm, qk, qt, qz)


@_entry()
def _k_q8_radam(tab, sizes, scales, cs, flags, deref, variant, qm, qk, qt, qz, threads):
    ptr, off, boff, parts = _q8_setup(tab, sizes, deref, threads)
    for k in prange(parts):
        _q8_apply(_radam, 0, k, parts, ptr, off, boff, scales, scales, cs, flags,
                  qm, qk, qt, qz)


@_entry()
def _k_q8_lion(tab, sizes, scales, cs, flags, deref, variant, qm, qk, qt, qz, threads):
    ptr, off, boff, parts = _q8_setup(tab, sizes, deref, threads)
    for k in prange(parts):
        _q8_apply(_lion, 0, k, parts, ptr, off, boff, scales, scales, cs, flags,
                  qm, qk, qt, qz)


@_entry()
def _k_q8_adahessian(tab, sizes, scales, cs, flags, deref, variant, qm, qk, qt, qz, threads):
    ptr, off, boff, parts = _q8_setup(tab, sizes, deref, threads)
    if variant == _V_POW:
        for k in prange(parts):
            _q8_apply(_adahessian, _V_POW, k, parts, ptr, off, boff, scales, scales, cs, flags,
                      qm, qk, qt, qz)
    else:
        for k in prange(parts):
            _q8_apply(_adahessian, 0, k, parts, ptr, off, boff, scales, scales, cs, flags,
                      qm, qk, qt, qz)


@_entry()  # no fastmath "reassoc" (see the docstring)
def _k_q8_lamb(tab, sizes, scales, cs, flags, deref, lr, qm, qk, qt, qz, threads):
    """LAMB on q8 moments: pass 1 sums p^2 and r^2 per block, pass 2 decodes again and steps.

    The block sums of a tensor are added in block order, so the trust ratio has
    the same bits for any thread count.  ``lr`` is a float64, as in ``_k_lamb``.
    No ``reassoc`` here (``_k_lamb`` has it for its sums): it would also regroup
    ``(1-b2) * g * g`` in the moment update, and the codes must be the
    reference's bit for bit.
    """
    ptr, off, boff, parts = _q8_setup(tab, sizes, deref, threads)
    n = sizes.shape[0]
    acc = np.empty((boff[n], 2))
    for k in prange(parts):
        _q8_sums(k, parts, ptr, off, boff, scales, cs, flags, qm, acc)
    coef = np.empty_like(scales)
    for t in range(n):
        pn = 0.0
        rn = 0.0
        for j in range(boff[t], boff[t + 1]):
            pn += acc[j, 0]
            rn += acc[j, 1]
        pn = math.sqrt(pn)
        rn = math.sqrt(rn)
        trust = pn / rn if pn > 0.0 and rn > 0.0 else 1.0
        coef[t] = lr * trust  # one rounding to float32 per tensor
    for k in prange(parts):
        _q8_apply(_lamb_q8, 0, k, parts, ptr, off, boff, scales, coef, cs, flags,
                  qm, qk, qt, qz)


@_entry()  # no fastmath "reassoc": nesterov's p + (d + mu*m), as _k_lars
def _k_q8_lars(tab, sizes, scales, cs, flags, deref, lr, tc, eps, on, qm, qk, qt, qz, threads):
    """LARS on a q8 momentum buffer: pass 1 sums p^2 and u^2 per block (the buffer is not
    read), pass 2 decodes the buffer, steps (``_lars_step``) and encodes it.

    The block sums of a tensor are added in block order (any thread count, the same
    bits).  ``lr``, ``tc``, ``eps``, ``on`` are float64 (``Rule.trust_scalars``), the
    coefficient ``-(lr * trust)`` rounded once per tensor, as ``_lars_coef``.
    """
    ptr, off, boff, parts = _q8_setup(tab, sizes, deref, threads)
    n = sizes.shape[0]
    acc = np.empty((boff[n], 2))
    for k in prange(parts):
        _q8_lars_sums(k, parts, ptr, off, boff, scales, cs, flags, acc)
    coef = np.empty_like(scales)
    for t in range(n):
        trust = 1.0
        if on != 0.0:
            pn = 0.0
            un = 0.0
            for j in range(boff[t], boff[t + 1]):
                pn += acc[j, 0]
                un += acc[j, 1]
            pn = math.sqrt(pn)
            un = math.sqrt(un)
            if pn > 0.0 and un > 0.0:
                trust = tc * pn / (un + eps)
        coef[t] = -(lr * trust)  # one rounding to the dtype per tensor
    for k in prange(parts):
        _q8_apply(_lars_step, 0, k, parts, ptr, off, boff, scales, coef, cs, flags,
                  qm, qk, qt, qz)


#: rule -> its q8 entry point (AdamW shares Adam's; Newton has no state to quantize).
_Q8_ENTRIES = {
    "sgd": _k_q8_sgd, "adam": _k_q8_adam, "adamw": _k_q8_adam, "adagrad": _k_q8_adagrad,
    "rmsprop": _k_q8_rmsprop, "adadelta": _k_q8_adadelta, "adamax": _k_q8_adamax,
    "nadam": _k_q8_nadam, "radam": _k_q8_radam, "lion": _k_q8_lion,
    "adahessian": _k_q8_adahessian, "lamb": _k_q8_lamb, "lars": _k_q8_lars,
}


# ------------------------------------------------------------------ q8 host side


def _q8_tables(rule):
    """Per state slot of ``rule``: the map, the code tables and the zero code.

    Built from ``fastopt.quantization`` (the definition), so the kernel's codes
    are its codes.  ``qm[k]`` the 256 map values.  The code of a float32 ``y``
    is ``#{T < y}`` over the 255 thresholds ``T = code_thresholds(signed)``; the
    kernel indexes by ``bits(y) >> 16`` (sign, exponent, top 7 mantissa bits:
    65536 buckets of consecutive floats, no clamp).  No bucket holds more than
    one threshold (asserted), so per bucket ``code = c0 + [T_j < y]`` with ``c0``
    the count of thresholds below the bucket's values and ``T_j`` the threshold
    inside it, if any; buckets without one (every bucket of ``|y| < 2**-23`` or
    ``|y| >= 1``; the buckets of exponent 255, nan: code 0) have a constant code.  Two encodings
    of that one answer: ``qk[k]`` uint32 ``c0 << 16 | L`` for the vector path,
    ``L`` the low 16 bits of ``T_j`` (bitwise inverted in a negative bucket,
    where a larger magnitude is a smaller number; 0xFFFF when there is no
    ``T_j``: ``low16 > L`` is then never true), and ``qt[k]`` float32 ``T_j``
    (+inf when none) for the scalar path, which compares ``y > qt[k]``.  Both
    equal ``nearest_code`` on every float32 but +inf, which shares its bucket with
    nans (``y = x / absmax`` is never infinite; ``tests/test_numba_q8.py`` checks
    every threshold's neighbours and the bucket edges).  ``qz[k]`` is the signed
    map's zero code (the sign guard) or 256 (no code) for the unsigned map.
    Unsigned when the state is in ``Rule.nonnegative_state``.  ~1.5 MB per rule,
    built once; the buckets real states hit (|y| in [2**-23, 1)) span ~24 KB.
    """
    from .. import quantization as q8

    assert q8.BLOCKSIZE == _QB and len(rule.all_state) <= _NQ
    top = np.arange(1 << 16, dtype=np.uint32)
    first = (top << np.uint32(_Q_SHIFT)).view(np.float32)
    last = ((top << np.uint32(_Q_SHIFT)) | np.uint32(_Q_LOW)).view(np.float32)
    neg = top >> np.uint32(15) == 1
    lo, hi = np.where(neg, last, first), np.where(neg, first, last)  # the bucket is [lo, hi]
    nan = top & np.uint32(0x7F80) == 0x7F80  # exponent all ones: every nan, and inf (never a y)
    qm = np.zeros((_NQ, 256), np.float32)
    qk = np.zeros((_NQ, 1 << 16), np.uint32)
    qt = np.zeros((_NQ, 1 << 16), np.float32)
    qz = np.full(_NQ, 256, np.uint32)
    for k, name in enumerate(rule.all_state):
        signed = name not in rule.nonnegative_state
        thr = q8.code_thresholds(signed)
        below = np.searchsorted(thr, lo, side="left")  # #{T < lo}
        inside = np.searchsorted(thr, hi, side="left") - below  # #{lo <= T < hi}
        assert np.all(inside[~nan] <= 1)
        inside = (inside == 1) & ~nan
        tj = thr[np.minimum(below, thr.size - 1)]
        low = tj.view(np.uint32) & np.uint32(_Q_LOW)
        low = np.where(neg, np.uint32(_Q_LOW) - low, low)
        low = np.where(inside, low, np.uint32(_Q_LOW))
        c0 = np.where(nan, 0, below).astype(np.uint32)
        qm[k] = q8.dynamic_map(signed)
        qk[k] = (c0 << np.uint32(_Q_SHIFT)) | low
        qt[k] = np.where(inside, tj, np.float32(np.inf))
        if signed:
            qz[k] = q8.zero_code(True)
    return qm, qk, qt, qz


_Q8_TABLES = {}  # rule name -> _q8_tables(rule), built on first use


def _q8_tables_of(rule):
    """``_q8_tables(rule)``, built once per process (the kernel and ``Q8StepPlan`` share it)."""
    tables = _Q8_TABLES.get(rule.name)
    if tables is None:  # two threads at once may both build it: the same values
        tables = _Q8_TABLES.setdefault(rule.name, _q8_tables(rule))
    return tables


def _q8_check(params, states, present):
    """The q8 arrays fit their params (the kernel writes through raw pointers): ValueError if not."""
    n = len(params)
    sizes = _sizes(params, n)
    nblocks = (sizes + _QB - 1) // _QB
    for name in present:
        for key, dtype, want in ((name, np.uint8, sizes), (name + "_absmax", np.float32, nblocks)):
            arrays = states.get(key)
            if arrays is None or len(arrays) != n:
                raise ValueError(f"states[{key!r}]: expected a list of {n} arrays (q8 state "
                                 f"{name!r}: codes and a per-block absmax), got "
                                 f"{None if arrays is None else len(arrays)}")
            bad = [i for i, a in enumerate(arrays)
                   if not (isinstance(a, np.ndarray) and a.dtype == dtype and a.flags.c_contiguous
                           and a.size == want[i])]
            if bad:
                i = bad[0]
                a = arrays[i]
                raise ValueError(
                    f"states[{key!r}][{i}]: expected a C-contiguous {np.dtype(dtype)} array of "
                    f"{want[i]} elements, got {type(a).__name__} "
                    f"{getattr(a, 'dtype', '')} of {getattr(a, 'size', '?')} elements")


def _q8_check_master(params, masters):
    """The float32 masters fit their 16-bit params: ValueError if not (nothing written)."""
    if len(masters) != len(params):
        raise ValueError(f"states['master']: expected a list of {len(params)} float32 arrays, "
                         f"got {len(masters)}")
    for i, (p, mst) in enumerate(zip(params, masters)):
        if not (isinstance(mst, np.ndarray) and mst.dtype == np.float32
                and mst.flags.c_contiguous and mst.size == p.size):
            raise ValueError(f"states['master'][{i}]: expected a C-contiguous float32 array of "
                             f"{p.size} elements, got {type(mst).__name__} "
                             f"{getattr(mst, 'dtype', '')} of {getattr(mst, 'size', '?')} "
                             f"elements")


def _q8_format(params, grads, extras, flags, pre):
    """The q8 format vector of a 16-bit call (``_Y_*``): flags, stochastic rounding and its
    step key, the params' storage code, a storage code per grad and extra input."""
    n = len(params)
    fmt = np.zeros(_Y_HEAD + 2 * n, np.int64)
    fmt[_Y_FLAGS] = flags
    fmt[_Y_P] = _CODES[params[0].dtype.name]
    fmt[_Y_HEAD:_Y_HEAD + n] = [_CODES[g.dtype.name] for g in grads]
    if extras is not None:
        fmt[_Y_HEAD + n:] = [_CODES[e.dtype.name] for e in extras]
    prec = pre.precision
    if prec.stochastic_rounding:
        fmt[_Y_SR] = 1
        fmt[_Y_KEY] = np.array(_precision.step_key(prec.seed, pre.step), np.uint64).view(np.int64)
    return fmt


def _q8_kernel(rule, plain):
    """``plain`` (the registered kernel), taking over the buckets whose state is q8.

    A q8 bucket (``pre.precision.state is fastopt.precision.Q8``) of float32
    params runs ``_Q8_ENTRIES[rule]``; ``max_norm`` (which the pipeline leaves to
    the kernel for such a bucket) follows as one more pass over the params.  A
    q8 bucket of float16 or bfloat16 params runs the same entry with the q8
    format vector (master weights, stochastic rounding), or the reference's q8
    step when it has ``max_norm``.  Every other bucket goes to ``plain`` unchanged.
    """
    from .. import precision as _prec
    from .._rules import CLIP_EPS

    slots = rule.all_state
    entry = _Q8_ENTRIES.get(rule.name)
    trust = rule.kind == TRUST_RATIO
    extra_row = rule.extra is not None and rule.extra_shape == "param"

    def kernel(params, grads, states, s, pre, extras=None):
        prec = pre.precision
        if prec is None or prec.state is not _prec.Q8:
            return plain(params, grads, states, s, pre, extras)
        if entry is None:
            # a rule without a fused q8 entry point (the rules added after the q8 driver) takes
            # the reference's q8 step: the same definition, one NumPy pass per array
            from .._backend import get_kernel
            return get_kernel(rule.name, "numpy")(params, grads, states, s, pre, extras)
        n = len(params)
        dt = params[0].dtype
        half = _is_reduced(dt)
        if dt != np.float32 and not half:
            raise TypeError(f"params: expected float32 params (or float16, bfloat16) for a q8 "
                            f"bucket on the numba backend, got {dt}")
        if half and pre.max_norm is not None:
            # the max_norm factor acts on the float32 params before their one rounding, which
            # this one-pass driver has already done per block: the reference's q8 step
            from .._backend import get_kernel
            return get_kernel(rule.name, "numpy")(params, grads, states, s, pre, extras)
        present = [name for name in slots if name in states]
        if present:
            _q8_check(params, states, present)
            if half and "master" in states:
                _q8_check_master(params, states["master"])
            tables = _q8_tables_of(rule)
            tab = np.zeros((_QROWS, n), np.int64)
            tab[_QP] = _ids(params, n)
            tab[_QG] = _ids(grads, n)
            for k, name in enumerate(slots):
                if name in states:
                    tab[_QC0 + k] = _ids(states[name], n)
                    tab[_QA0 + k] = _ids(states[name + "_absmax"], n)
            if extra_row:
                tab[_QE] = _ids(extras, n)
            flags = rule.kernel_flags(s)
            if half:
                if "master" in states:
                    tab[_QM] = _ids(states["master"], n)
                flags = _q8_format(params, grads, extras if extra_row else None, flags, pre)
                dt = _F32  # 16-bit params: float32 arithmetic, as the reference
            scales = np.ones(n, dt) if pre.scales is None else np.asarray(pre.scales, dt)
            args = (tab, _sizes(params, n), scales,
                    _scalars(dt, _head(pre), rule.kernel_scalars(s)), flags,
                    DATA_OFFSET,
                    *([float(s[k]) for k in rule.trust_scalars] if trust else [_mode(rule, s)]),
                    *tables)
            _launch(entry, *args)
        else:  # no state this step (SGD without momentum): nothing to quantize
            plain(params, grads, states, s, pre, extras)
        if pre.max_norm is not None:
            pn = np.sqrt(OPS.sumsq(params))
            OPS.scale_(params, np.minimum(1.0, pre.max_norm / (pn + CLIP_EPS)))

    kernel.__name__ = plain.__name__
    kernel.__doc__ = plain.__doc__
    return kernel


#: The param dtypes whose q8 buckets these kernels take (``fastopt._backend.supports``).
NumbaOps.q8_dtypes = ("float32", "float16", "bfloat16")


class Q8StepPlan(_GradRead):
    """The step cache's plan (see ``StepPlan``) for a bucket whose state is q8.

    The full path rebuilt, every step, what does not change while the same arrays
    come back: ``_q8_check``'s layout checks of the codes and absmax (and masters),
    the operand table, the sizes, the q8 format vector of 16-bit params, and the
    scalar array; at 10 tensors of 4,096 float32 elements that host work was over
    half of a ~350 us Adam step (docs/design.md, "Pipeline").  This plan checks once
    when it is made (the full step has just accepted the same arrays) and per step
    refreshes only the scalars, the flags and stochastic rounding's step key.  The
    table holds object addresses (the kernel reads each array's data pointer at call
    time) and the plan keeps the arrays alive, so an address cannot be reused; the
    caller (``Optimizer._cached_step``) sees a new grad, param or state bucket, or
    changed options, and takes the full path.  The grads are checked by the read pass's
    fast form before the update (``_k_read``, tiled for 16-bit grads); a non-finite
    sum returns False with nothing written and the full step decides (raise or skip).
    Made by ``NumbaOps.step_plan`` (``make``) for a rule with a q8 entry point.
    """

    @classmethod
    def make(cls, rule, bucket, grads, hp):
        """The plan, or None where the bucket takes another path than the q8 entry point."""
        params = bucket.params
        dt = params[0].dtype
        if (rule.name not in _Q8_ENTRIES or rule.kind != ELEMENTWISE
                or (dt != np.float32 and not _is_reduced(dt))):
            return None
        if not any(name in bucket.states for name in rule.all_state):
            return None  # no state (SGD without momentum): the plain kernel's step
        return cls(rule, bucket, grads, hp)

    def __init__(self, rule, bucket, grads, hp):
        params, states = bucket.params, bucket.states
        n = len(params)
        present = [name for name in rule.all_state if name in states]
        _q8_check(params, states, present)  # (the kernel writes through raw pointers)
        half = _is_reduced(params[0].dtype)
        if half and "master" in states:
            _q8_check_master(params, states["master"])
        self.rule, self.keep = rule, (params, grads, states)
        tab = np.zeros((_QROWS, n), np.int64)
        tab[_QP] = _ids(params, n)
        tab[_QG] = _ids(grads, n)
        for k, name in enumerate(rule.all_state):
            if name in states:
                tab[_QC0 + k] = _ids(states[name], n)
                tab[_QA0 + k] = _ids(states[name + "_absmax"], n)
        self.prec = bucket.precision
        self.fmt = None
        if half:
            if "master" in states:
                tab[_QM] = _ids(states["master"], n)
            # flags and the step key are written per step
            self.fmt = _q8_format(params, grads, None, 0, Pre(precision=self.prec, step=0))
        self.table = tab
        self.sizes = _sizes(params, n)
        self.total = int(self.sizes.sum())
        self.ones = np.ones(n, _F32)  # the norm-clip factors (none: ones)
        pre = Pre(maximize=hp["maximize"], clip_value=None, weight_clip=hp["weight_clip"])
        self.cs = _scalars(_F32, _head(pre), _NO_RULE)
        self.slots = [(_HEAD + KERNEL_SCALAR_SLOT[k], k) for k in rule.pack + ("l2", "decay")]
        self.tables = _q8_tables_of(rule)
        self.entry = _Q8_ENTRIES[rule.name]
        self.mode = None  # the variant: from the (fixed) options, at the first update
        self._read_setup(grads, n)  # the grads' check: the read pass's fast form

    def update(self, s, check=False, step=None):
        """The fused q8 update with the step scalars ``s``; ``step``: the step count
        (stochastic rounding's key: without it such a plan returns False).  Returns
        False, with nothing written, where the full step must decide."""
        rule, cs, fmt = self.rule, self.cs, self.fmt
        flags = rule.kernel_flags(s)
        if fmt is not None:
            if fmt[_Y_SR]:
                if step is None:
                    return False
                fmt[_Y_KEY] = np.array(_precision.step_key(self.prec.seed, step),
                                       np.uint64).view(np.int64)
            fmt[_Y_FLAGS] = flags
            flags = fmt
        if check and self.finite() is None:
            return False
        for i, k in self.slots:
            cs[i] = float(s[k])  # (as Rule.kernel_scalars: float, then float32)
        if self.mode is None:
            self.mode = _mode(rule, s)
        _run(self.entry, numba.get_num_threads(),
             (self.table, self.sizes, self.ones, cs, flags, DATA_OFFSET, self.mode, *self.tables))
        return True


def q8_warmup_jobs(dtypes=("float32",), rules=None, variants=True):
    """The ``(label, run)`` pairs that compile the q8 entry points (``fastopt.warmup(q8=True)``).

    One step of 3 elements (one partial block) per rule with a q8 entry and
    per variant the 8-bit state allows, for float32 params and, when a 16-bit
    dtype is asked for, for 16-bit params (one compile serves float16 and
    bfloat16, master weights and stochastic rounding: they are run-time values
    of the q8 format vector).  float64 params take no q8 state.
    """
    from .. import quantization as q8
    from .._backend import Pre, get_kernel

    jobs = []
    for dt in map(_precision.as_dtype, dtypes):
        if dt == np.float64:
            continue
        prec = _precision.Precision(param=dt, compute=_F32, state=_precision.Q8,
                                    master_weights=False, stochastic_rounding=False, seed=0)
        for name in rules or RULES:
            rule = RULES[name]
            if name not in _Q8_ENTRIES:
                continue
            refused = {opt for opt, _ in rule.q8_refuses}
            flags = rule.variants if variants else ()
            for v in range(1 << len(flags)):
                on = [f for k, f in enumerate(flags) if v >> k & 1]
                if refused & set(on):
                    continue
                hp = {**rule.defaults, **{f: f in on for f in flags}}
                if hp.get("has_momentum") and not hp.get("momentum"):
                    hp["momentum"] = 0.9  # the variant flag of SGD and RMSprop is momentum > 0
                hp.pop("has_momentum", None)
                states = {}
                for st, _ in rule.state(hp):
                    states[st] = [np.zeros(3, np.uint8)]
                    states[st + "_absmax"] = [np.zeros(1, np.float32)]
                if not states:
                    continue  # nothing to quantize (SGD without momentum)
                extras = None
                if rule.extra is not None:
                    extras = [np.zeros(3, _F32)]
                s, _ = rule.step_scalars(hp, 1, dict(rule.group_state))
                label = " ".join([name, dt.name, "q8"] + on)
                jobs.append((label, lambda name=name, states=states, s=s, extras=extras, dt=dt,
                             prec=prec: get_kernel(name, BACKEND)(
                                 [np.zeros(3, dt)], [np.zeros(3, dt)], states, s,
                                 Pre(precision=prec, step=1), extras)))
    assert q8.BLOCKSIZE == _QB
    return jobs


def q8_warmup(dtypes=("float32",), rules=None, variants=True, progress=None):
    """Compile (or load from the cache) the q8 entry points; returns the seconds taken."""
    import time

    jobs = q8_warmup_jobs(dtypes, rules, variants)
    t0 = time.perf_counter()
    for k, (label, run) in enumerate(jobs):
        if progress is not None:
            progress(k, len(jobs), label)
        run()
    if progress is not None:
        progress(len(jobs), len(jobs), "done")
    return time.perf_counter() - t0


def _register_q8():
    from .. import _backend

    for rule in RULES.values():
        if rule.kind != DENSE_SOLVE:
            register_kernel(rule.name, BACKEND,
                            _q8_kernel(rule, _backend._KERNELS[(rule.name, BACKEND)]))


_register_q8()


# ------------------------------------------------------------------ SparseAdam (Rule.kind "sparse_rows")
# One fused pass over the rows an (indices, values) grad names: the duplicates of a row are
# summed in the order they appear (the host's stable argsort ``order`` and segment ``starts``,
# fastopt._sparse.coalesce), then torch's lazy Adam update of that row's moments and param.
# Distinct rows are split between the threads, so no two threads write one row.  The
# operation order is the reference's (kernels/reference.py, ``sparse_adam_rows``).


@_entry()
def _k_sparse_adam(p, m, v, vals, order, starts, rows, cs, maximize, threads):
    """``p``, ``m``, ``v``: 2-D (rows, width); ``vals``: (nnz, width); ``cs`` = (step_size, eps,
    1 - beta1, 1 - beta2) in the dtype."""
    nr = rows.shape[0]
    width = p.shape[1]
    ss, eps, omb1, omb2 = cs[0], cs[1], cs[2], cs[3]
    parts = min(threads, max(1, nr * width // MIN_PER_THREAD), max(nr, 1))
    for k in prange(parts):
        for u in range(nr * k // parts, nr * (k + 1) // parts):
            r = rows[u]
            s0, s1 = starts[u], starts[u + 1]
            for j in range(width):
                g = vals[order[s0], j]
                for e in range(s0 + 1, s1):
                    g = g + vals[order[e], j]
                if maximize:
                    g = -g
                mo = m[r, j]
                vo = v[r, j]
                u1 = (g - mo) * omb1
                u2 = (g * g - vo) * omb2
                m[r, j] = mo + u1
                v[r, j] = vo + u2
                p[r, j] = p[r, j] - ss * ((u1 + mo) / (np.sqrt(u2 + vo) + eps))


def sparse_adam_rows(p, m, v, vals, order, starts, rows, s, maximize):
    """The ``fastopt._sparse`` kernel contract (see ``kernels/reference.py``) on Numba."""
    cs = np.array([s["step_size"], s["eps"], s["one_minus_beta1"], s["one_minus_beta2"]], p.dtype)
    _launch(_k_sparse_adam, p, m, v, vals, order, starts, rows, cs, bool(maximize))


# ------------------------------------------------------------------ LBFGS two-loop (Rule.kind "closure")
# The two-loop recursion of fastopt/_lbfgs.py alternates an axpy on one vector with a dot
# product of that same vector: ``q += a*y`` then ``s.q``.  One pass does both (NumPy needs a
# product pass, an update pass and a dot: 7 element accesses instead of 4, and a temporary).
# The dot is summed in float64 per contiguous part (one per thread, as the other entry points
# split their elements), the parts then added in order on the host: a run repeats bit for bit
# at a given thread count.

_LBFGS_PARTS_MAX = 256  # the host's buffer of per-part sums (threads are far fewer)


@_entry(sums=True)
def _k_axpy_dot(x, a, y, s, out, threads):
    """``x += a[0]*y``; ``out[k]`` = the float64 sum of ``s*x`` (new ``x``) over part ``k``;
    parts beyond the number used are left as they are (the host zeroes ``out``)."""
    n = x.shape[0]
    c = a[0]
    parts = min(threads, max(1, n // MIN_PER_THREAD), out.shape[0])
    for k in prange(parts):
        acc = 0.0
        for i in range(n * k // parts, n * (k + 1) // parts):
            v = x[i] + c * y[i]
            x[i] = v
            acc += s[i] * v
        out[k] = acc


def axpy_dot(x, a, y, s):
    """``x += a*y`` in place (``a`` rounded once to ``x``'s dtype); returns ``s.x`` as a float."""
    out = np.zeros(_LBFGS_PARTS_MAX)
    _launch(_k_axpy_dot, x, np.array([a], x.dtype), y, s, out)
    return float(out.sum())
