"""q8 Adam on the numba backend: its time against float32 Adam and bitsandbytes, and where it goes.

    python asv_bench/q8_numba.py [--n 16777216] [--threads 2] [--reps 7] [--no-peer]

One process, interleaved pairs (``fastopt.apps.bench.q8_ratios``; the median of
per-pair ratios, so a noisy machine slows both sides alike): q8 Adam over
float32 Adam, both the numba kernel through the backend contract on one tensor
of ``--n`` float32 params (no read pass); bitsandbytes 0.50's
``bnb.optim.Adam8bit`` on CPU tensors over q8 Adam, when bitsandbytes imports.

Then bfloat16 params with q8 moments and stochastic rounding (the ~10 bytes/element
format, ``Q8KernelStep(param="bfloat16")``) over float32 Adam, interleaved the same way.

Then the breakdown: the q8 kernel's phases run alone over the same blocks with
the kernel's own helpers (``_q8_load``, ``_q8_store``), each timed against the
full step in interleaved pairs: *decode* (codes -> float32 scratch, both
moments), *encode* (float32 scratch -> absmax + codes, both moments; the
absmax and the code search are split by running the absmax loop alone); the
update is what remains.  Shares are of the full q8 step.  The encode's input
is filled into the scratch from 64 blocks kept in cache and that fill is timed
alone and subtracted (``net``): an earlier version filled it from two float32
arrays of ``--n`` elements, streaming 8 bytes per element from memory that the
real step never reads, and charged that to "absmax" (9.9 ms of a 31.8 ms step).
Since the float32 kernel takes the absmax of states 0 and 1 inside its update loop,
"absmax" here is what a pass of its own would cost (an upper bound); ``perf`` samples
of the kernel put it at ~3% (docs/design.md, "8-bit optimizer state").
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _parse():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1 << 24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--no-peer", action="store_true", help="skip bitsandbytes")
    return ap.parse_args()


def bf16_ratio(n, reps):
    """bfloat16 params + q8 Adam moments + stochastic rounding over float32 Adam (numba)."""
    from fastopt.apps.bench import Q8KernelStep
    from fastopt.apps.benchkit import pairwise

    bf = Q8KernelStep("adam", n, "q8", param="bfloat16")
    f32 = Q8KernelStep("adam", n, "float32")
    t_bf, t_f32, r = pairwise(bf.step, f32.step, reps)
    # param 2 + grad 2 read, param 2 written, two moments 1 + 1 byte each way, absmax
    return {"s": t_bf, "f32_s": t_f32, "bf16_q8_sr_over_f32": r,
            "bytes_per_elem": 2 + 2 + 2 + 2 * 2 + 2 * 2 * 4 / 256}


def breakdown(n, reps, threads):
    import numba
    import numpy as np
    from numba import njit, prange

    from fastopt.apps.bench import Q8KernelStep
    from fastopt.apps.benchkit import pairwise
    from fastopt.kernels import numba_cpu as nc

    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    case = Q8KernelStep("adam", n, "q8")
    case.step()  # states away from zero
    qm, qk, qt, qz = nc._q8_tables(case.rule)
    st = case.states
    tab = np.zeros((nc._QROWS, 1), np.int64)
    for row, arr in [(nc._QP, case.params[0]), (nc._QG, case.grads[0]),
                     (nc._QC0, st["exp_avg"][0]), (nc._QC0 + 1, st["exp_avg_sq"][0]),
                     (nc._QA0, st["exp_avg_absmax"][0]), (nc._QA0 + 1, st["exp_avg_sq_absmax"][0])]:
        tab[row, 0] = id(arr)
    sizes = np.array([n])
    # encode writes codes: work on copies so the step's state is not disturbed
    codes = [st["exp_avg"][0].copy(), st["exp_avg_sq"][0].copy()]
    amax = [st["exp_avg_absmax"][0].copy(), st["exp_avg_sq_absmax"][0].copy()]
    tab_w = tab.copy()
    for k in range(2):
        tab_w[nc._QC0 + k, 0], tab_w[nc._QA0 + k, 0] = id(codes[k]), id(amax[k])
    # the encode's input: 64 blocks of values with the states' signs (in cache: the real step
    # encodes scratch it has just written, so the phase must not stream float32 from memory)
    nsrc = 64 * nc._QB
    src = [np.random.default_rng(1).standard_normal(nsrc).astype(np.float32) for _ in range(2)]
    src[1] = np.abs(src[1])

    @njit(parallel=True)
    def decode(tab, sizes, deref, qm, threads):
        ptr, off, boff, parts = nc._q8_setup(tab, sizes, deref, threads)
        out = np.zeros(parts, np.float32)
        for k in prange(parts):
            j, hi, t = nc._q8_block(k, parts, boff)
            z = np.float32(0)
            w = np.empty((nc._NQ + 3, nc._QB), np.float32)
            acc = z
            while j < hi:
                m = min(nc._QB, sizes[0] - j * nc._QB)
                nc._q8_load(ptr, 0, 0, j, j * nc._QB, m, qm, w, z)
                nc._q8_load(ptr, 1, 0, j, j * nc._QB, m, qm, w, z)
                acc += w[0, 0] + w[1, 0]
                j += 1
            out[k] = acc
        return out

    @njit(parallel=True)
    def encode(tab, sizes, deref, qk, qt, qz, s0, s1, mode, threads):
        # mode 0: the scratch fill alone (subtracted below); 1: + the absmax loops;
        # 2: + the whole _q8_store (absmax, codes, absmax and codes written)
        ptr, off, boff, parts = nc._q8_setup(tab, sizes, deref, threads)
        out = np.zeros(parts, np.uint32)
        for k in prange(parts):
            j, hi, t = nc._q8_block(k, parts, boff)
            w = np.empty((nc._NQ + 3, nc._QB), np.float32)
            wb = w.view(np.uint32)
            w[nc._NQ + 1, 1] = np.float32(0)
            acc = nc._QU_ZERO
            while j < hi:
                a = j * nc._QB
                m = min(nc._QB, sizes[0] - a)
                r = (j % 64) * nc._QB
                for i in range(m):
                    w[0, i] = s0[r + i]
                    w[1, i] = s1[r + i]
                if mode == 2:
                    nc._q8_store(ptr, 0, 0, j, a, m, qk, qt, qz, w, wb)
                    nc._q8_store(ptr, 1, 0, j, a, m, qk, qt, qz, w, wb)
                elif mode == 1:
                    for q in range(2):
                        top = nc._QU_ZERO
                        for i in range(m):
                            top = max(top, wb[q, i] & nc._QU_ABS)
                        acc = max(acc, top)
                else:
                    acc = max(acc, wb[0, 0] ^ wb[1, m - 1])
                j += 1
            out[k] = acc
        return out

    full = case.step
    rows = {}
    for name, mode in [("decode", -1), ("encode(+fill)", 2), ("absmax(+fill)", 1), ("fill", 0)]:
        if mode < 0:
            fn = lambda: decode(tab, sizes, nc.DATA_OFFSET, qm, threads)  # noqa: E731
        else:
            fn = lambda mode=mode: encode(tab_w, sizes, nc.DATA_OFFSET, qk, qt, qz,  # noqa: E731
                                          src[0], src[1], mode, threads)
        t_part, t_full, r = pairwise(fn, full, reps)
        rows[name] = {"s": t_part, "share_of_q8_step": r}
    fill = rows["fill"]["share_of_q8_step"]
    rows["net"] = {"encode": rows["encode(+fill)"]["share_of_q8_step"] - fill,
                   "absmax": rows["absmax(+fill)"]["share_of_q8_step"] - fill,
                   "decode": rows["decode"]["share_of_q8_step"]}
    rows["net"]["codes"] = rows["net"]["encode"] - rows["net"]["absmax"]
    rows["net"]["update_and_rest"] = 1 - rows["net"]["encode"] - rows["net"]["decode"]
    return rows


def lookup_floor(reps, n=1 << 20, inner=2, k=400):
    """What a q8 step costs above float32 Adam when memory is not the limit, and why.

    One thread, one tensor of ``n`` = 1,048,576 params (the step's working set, 10 MB
    for q8 and 16 MB for float32, fits the 32 MB L3 cache, and the host's share of a
    call is ~1%), each side run ``inner`` times per timing, interleaved as above: the q8 and
    float32 Adam steps through the kernel, per element.  Then the per-element
    price of the lookups q8 adds (each run alone over 64 blocks in L1): the
    kernel's decode of one state (``_q8_load``: a code byte, a map entry, a
    multiply), its encode of one state (``_q8_encode16``: a division, an AVX2
    gather from the code table, a comparison), and a bare 8-lane gather of
    32-bit entries from a 1 KiB table (the lookup alone).  A q8 Adam step does
    two decodes and two encodes per element, so ``f32 + 2 decode + 2 encode`` is
    what the step costs with no other overhead; ``lookup_bound`` is that over the
    float32 step, ``gather_bound`` the same with four bare gathers in place of the
    kernel's lookups (docs/design.md, "8-bit optimizer state").  The lookups are
    timed ``k`` times over their blocks, the median of ``max(3, reps)`` runs
    (``benchkit.measure``).
    """
    import numba
    import numpy as np
    from llvmlite import ir
    from numba import njit, types
    from numba.extending import intrinsic

    from fastopt import quantization
    from fastopt.apps.bench import Q8KernelStep
    from fastopt.apps.benchkit import measure, pairwise
    from fastopt.kernels import numba_cpu as nc

    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    q8, f32 = Q8KernelStep("adam", n, "q8"), Q8KernelStep("adam", n, "float32")

    def many(case):
        def run():
            for _ in range(inner):
                case.step()
        return run

    t_q8, t_f32, r = pairwise(many(q8), many(f32), reps)
    out = {"n": n, "threads": 1, "q8_ns": t_q8 / (inner * n) * 1e9,
           "f32_ns": t_f32 / (inner * n) * 1e9, "q8_over_f32": r}

    @intrinsic
    def gather8(typingctx, iaddr, taddr, oaddr):
        # 8 int32 indices at iaddr -> the 8 int32 table entries, stored at oaddr
        def codegen(context, builder, sig, args):
            i8, i32 = ir.IntType(8), ir.IntType(32)
            vi = ir.VectorType(i32, 8)
            fnty = ir.FunctionType(vi, [vi, ir.PointerType(i8), vi, vi, i8])
            g = builder.module.declare_intrinsic("llvm.x86.avx2.gather.d.d.256", fnty=fnty)
            idx = builder.load(builder.inttoptr(args[0], ir.PointerType(vi)), align=4)
            ones = ir.Constant(vi, [ir.Constant(i32, -1)] * 8)
            zero = ir.Constant(vi, [ir.Constant(i32, 0)] * 8)
            v = builder.call(g, [zero, builder.inttoptr(args[1], ir.PointerType(i8)), idx, ones,
                                 ir.Constant(i8, 4)])
            builder.store(v, builder.inttoptr(args[2], ir.PointerType(vi)), align=4)
            return context.get_dummy_value()
        return types.void(types.int64, types.int64, types.int64), codegen

    qm, qk, qt, qz = nc._q8_tables(q8.rule)
    nb, qb = 64, nc._QB
    rng = np.random.default_rng(2)
    x = rng.standard_normal(nb * qb).astype(np.float32)
    am = np.abs(x).reshape(nb, qb).max(1)
    codes = rng.integers(0, 256, nb * qb).astype(np.uint8)
    idx = codes.astype(np.int32)
    got = np.zeros(nb * qb, np.int32)
    kt = qk[0].copy()
    table = qm[0].view(np.int32).copy()
    tab = np.zeros((nc._QROWS, 1), np.int64)
    tab[nc._QC0, 0], tab[nc._QA0, 0] = id(codes), id(am)

    @njit
    def decode(tab, qm, reps):
        ptr = nc._pointers(tab, nc.DATA_OFFSET)
        w = np.empty((nc._NQ + 3, nc._QB), np.float32)
        acc = np.float32(0)
        for _ in range(reps):
            for j in range(nb):
                nc._q8_load(ptr, 0, 0, j, j * nc._QB, nc._QB, qm, w, np.float32(0))
                acc += w[0, 5]
        return acc

    @njit
    def encode(x, am, kt, zc, out, reps):
        xa, ka, ca = x.ctypes.data, kt.ctypes.data, out.ctypes.data
        for _ in range(reps):
            for j in range(nb):
                for i in range(0, nc._QB, 16):
                    k = j * nc._QB + i
                    nc._q8_encode16(xa + 4 * k, am[j], ka, zc, ca + k)
        return out[0]

    @njit
    def bare(idx, table, got, reps):
        ia, ta, ga = idx.ctypes.data, table.ctypes.data, got.ctypes.data
        for _ in range(reps):
            for k in range(0, idx.shape[0], 8):
                gather8(ia + 4 * k, ta, ga + 4 * k)
        return got[0]

    out8 = np.zeros(nb * qb, np.uint8)
    jobs = {"decode_ns": lambda k: decode(tab, qm, k)}
    if nc._Q8_GATHER:  # the encode's and the bare gather need AVX2 (else: not measured)
        jobs["encode_ns"] = lambda k: encode(x, am, kt, qz[0], out8, k)
        jobs["gather_ns"] = lambda k: bare(idx, table, got, k)
    runs = max(3, reps)
    for name, fn in jobs.items():
        t = measure(lambda fn=fn: fn(k), min_runs=runs, max_runs=runs, warmup=1)
        out[name] = t / (k * nb * qb) * 1e9
    if nc._Q8_GATHER:  # what was timed did the right thing: the quantizer's codes, the entries
        assert np.array_equal(out8, quantization.quantize_blockwise(x, signed=True)[0])
        assert np.array_equal(got, table[idx])
        bound = out["f32_ns"] + 2 * out["decode_ns"] + 2 * out["encode_ns"]
        out["lookup_bound"] = bound / out["f32_ns"]
        out["gather_bound"] = (out["f32_ns"] + 4 * out["gather_ns"]) / out["f32_ns"]
    numba.set_num_threads(threads)
    return out


def main():
    args = _parse()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    from fastopt.apps.bench import q8_ratios

    res = q8_ratios(args.n, args.reps, args.threads, peer=not args.no_peer)
    res["bf16_q8_sr"] = bf16_ratio(args.n, args.reps)
    res["breakdown"] = breakdown(args.n, args.reps, args.threads)
    res["floor"] = lookup_floor(args.reps)
    json.dump(res, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
