// fastopt.cuh -- the pieces every fastopt CUDA kernel shares: the multi-tensor table, the
// kernel scalars, the step pipeline (docs/design.md), the one memory loop, and the block
// reduction.
//
// Kernels assume flat, C-contiguous arrays of one dtype per launch (validated in Python).
// Indices are 64-bit throughout (a tensor may hold >= 2^31 elements); chunk numbers are
// 32-bit (2^31 chunks of any sane chunk size is far beyond any device memory).
//
// This header is also compiled as plain C++ by the CPU harness (tests/cuda_cpu/shim.h
// defines __global__, threadIdx, ...), so it uses only what that shim provides. The CuPy
// loader inlines it into each .cu source (CuPy's cache key does not see included files).
#pragma once

// The kernel scalar slots (FO_NSCALARS, FO_S_<NAME>) and flag bits (FO_F_<NAME>) are not
// written here: fastopt.kernels.cuda._host.read_source prepends them to every source, generated
// from fastopt._rules.KERNEL_SCALARS / KERNEL_FLAGS, the one list of positions.
#ifndef FO_NSCALARS
#error "compile the text of fastopt.kernels.cuda._host.read_source(): it defines the kernel scalar slots"
#endif

#ifndef FO_EXPORT
#define FO_EXPORT(name)  // the CPU harness defines this to emit a host launcher per kernel
#endif

// Slots of the pointer table: every multi-tensor launch passes up to FO_DEPTH arrays per tensor.
#define FO_DEPTH 7
#define FO_SLOT_PARAM 0
#define FO_SLOT_GRAD 1
#define FO_SLOT_STATE0 2  // states 0..2 in the rule's torch order (fastopt._rules.Rule.all_state)
#define FO_SLOT_EXTRA 5   // AdaHessian's Hessian diagonal
#define FO_SLOT_MASTER 6  // the float32 master copy of a 16-bit param (master_weights=True)
#define FO_USES(d) (1u << (d))
#define FO_P_G (FO_USES(FO_SLOT_PARAM) | FO_USES(FO_SLOT_GRAD))
#define FO_STATES(n) (((1u << (n)) - 1u) << FO_SLOT_STATE0)
#define FO_MAX_TENSORS 32
#define FO_MAX_ITEMS 256
#define FO_MAX_THREADS 1024  // largest block any kernel here is launched with

typedef long long fo_i64;

// The kernel-argument table of one multi-tensor launch (multi_tensor_apply style): up to
// FO_MAX_TENSORS tensors ("slots") and FO_MAX_ITEMS work items, one item = one chunk of
// chunk_size elements of one slot. Blocks walk the items grid-stride. 3,728 bytes: with
// FoHyper<double>, FoPipe and three pointers (LAMB's pass 1) 3,976, under the 4 KiB
// kernel-parameter limit. fastopt/kernels/cuda/_host.py mirrors this layout (TABLE_DTYPE);
// the harness checks the two agree.
struct FoTable {
    unsigned long long ptr[FO_DEPTH][FO_MAX_TENSORS];  // device addresses, 0 = unused slot
    fo_i64 size[FO_MAX_TENSORS];        // elements of each slot's tensor
    fo_i64 chunk_base[FO_MAX_TENSORS];  // index of the tensor's chunk 0 in a partial-sum buffer
    fo_i64 chunk_size;                  // elements per chunk, a multiple of 4
    int index[FO_MAX_TENSORS];          // the tensor's position in the caller's list
    int item_chunk[FO_MAX_ITEMS];
    int n_items;
    unsigned char item_slot[FO_MAX_ITEMS];
};

// ------------------------------------------------------------------ storage formats
// A storage format F: F::T the element type in memory, F::O the arithmetic type, F::load and
// F::store (one rounding, to nearest even) between them. float16 and bfloat16 are uint16 bit
// patterns converted by the integer recipes of fastopt/precision.py (no cuda_fp16.h / cuda_bf16.h,
// so the CPU harness runs the very same conversions), computed in float32. F::store_sr is the
// param write under stochastic rounding (bfloat16 only; the host never asks it of another format).
__device__ __forceinline__ unsigned fo_f2u(float x) { return __float_as_uint(x); }
__device__ __forceinline__ float fo_u2f(unsigned u) { return __uint_as_float(u); }

// SplitMix64's output function, with the step key computed on the host
// (fastopt.precision.step_key). Dropout (layers.cu) draws random_bits(seed, step, i) =
// mix64(step_key + i*G) >> 32; stochastic rounding draws sr_bits(seed, step, i), the 16-bit
// slice i & 3 of mix64(step_key + (i >> 2)*G) -- four consecutive elements share one hash (on the
// GPU each thread simply computes its element's group hash). i: the flat index within the param.
__device__ __forceinline__ unsigned long long fo_mix64(unsigned long long z) {
    z ^= z >> 30;
    z *= 0xbf58476d1ce4e5b9ull;
    z ^= z >> 27;
    z *= 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
__device__ __forceinline__ unsigned fo_sr_bits(unsigned long long step_key, fo_i64 i) {
    const unsigned long long u = (unsigned long long)i;
    return (unsigned)(fo_mix64(step_key + (u >> 2) * 0x9e3779b97f4a7c15ull) >> (16u * (unsigned)(u & 3u)))
           & 0xffffu;
}

struct FoF32 {
    typedef float T;
    typedef float O;
    static __device__ __forceinline__ O load(T x) { return x; }
    static __device__ __forceinline__ T store(O x) { return x; }
    static __device__ __forceinline__ T store_sr(O x, unsigned long long, fo_i64) { return x; }
};
struct FoF64 {
    typedef double T;
    typedef double O;
    static __device__ __forceinline__ O load(T x) { return x; }
    static __device__ __forceinline__ T store(O x) { return x; }
    static __device__ __forceinline__ T store_sr(O x, unsigned long long, fo_i64) { return x; }
};
// bfloat16: the top half of a float32 (precision.py, recipes 1 and 3)
struct FoBF16 {
    typedef unsigned short T;
    typedef float O;
    static __device__ __forceinline__ O load(T h) { return fo_u2f((unsigned)h << 16); }
    static __device__ __forceinline__ T store(O x) {
        const unsigned u = fo_f2u(x);
        if ((u & 0x7fffffffu) > 0x7f800000u) return (T)(((u >> 16) & 0x8000u) | 0x7fc0u);
        return (T)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
    static __device__ __forceinline__ T store_sr(O x, unsigned long long key, fo_i64 i) {
        const unsigned u = fo_f2u(x);
        if ((u & 0x7fffffffu) > 0x7f800000u) return (T)(((u >> 16) & 0x8000u) | 0x7fc0u);
        return (T)((u + fo_sr_bits(key, i)) >> 16);
    }
};
// IEEE binary16 (precision.py, recipe 4)
struct FoF16 {
    typedef unsigned short T;
    typedef float O;
    static __device__ __forceinline__ O load(T h) {
        const unsigned s = (unsigned)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
        if (e == 31) return fo_u2f(s | 0x7f800000u | (m << 13));
        if (e != 0) return fo_u2f(s | ((e + 112) << 23) | (m << 13));
        if (m == 0) return fo_u2f(s);
        return fo_u2f(s | fo_f2u((float)m * 5.9604644775390625e-8f));  // m * 2**-24, exact
    }
    static __device__ __forceinline__ T store(O x) {
        const unsigned u = fo_f2u(x), s = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
        if (a > 0x7f800000u) return (T)(s | 0x7e00u);
        if (a >= 0x477ff000u) return (T)(s | 0x7c00u);
        if (a >= 0x38800000u) return (T)(s | ((a - 0x38000000u + 0xfffu + ((a >> 13) & 1u)) >> 13));
        const unsigned e = a >> 23, m = (a & 0x7fffffu) | (e ? 0x800000u : 0u);
        const unsigned sh = 126u - (e > 1u ? e : 1u);
        if (sh >= 25u) return (T)s;
        const unsigned q = m >> sh, rem = m & ((1u << sh) - 1u), half = 1u << (sh - 1u);
        return (T)(s | (q + ((rem > half || (rem == half && (q & 1u))) ? 1u : 0u)));
    }
    static __device__ __forceinline__ T store_sr(O x, unsigned long long, fo_i64) { return store(x); }
};

// A step's kernel scalars (fastopt._rules.Rule.kernel_scalars), computed once per step in
// double on the host and rounded once to the opmath type there. Read by name: v[FO_S_BETA1] is
// beta1; a slot the rule does not use holds 0. flags: bit FO_F_<NAME> of Rule.kernel_flags.
template <class O> struct FoHyper {
    O v[FO_NSCALARS];
    int flags;
    __device__ __forceinline__ bool flag(int bit) const { return (flags >> bit) & 1; }
};

// The element-wise pipeline options (fastopt._backend.Pre, less the per-tensor scales).
enum { FO_MAXIMIZE = 1, FO_CLIP_VALUE = 2, FO_WEIGHT_CLIP = 4 };
template <class O> struct FoPipe {
    O inv_scale;  // 1 when no grad_scale was given (a multiply by 1 is exact)
    O clip_value;
    O weight_clip;
    int flags;
};

// ------------------------------------------------------------------------------ math
__device__ __forceinline__ float fo_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double fo_sqrt(double x) { return sqrt(x); }
__device__ __forceinline__ float fo_abs(float x) { return fabsf(x); }
__device__ __forceinline__ double fo_abs(double x) { return fabs(x); }
__device__ __forceinline__ float fo_pow(float x, float y) { return powf(x, y); }
__device__ __forceinline__ double fo_pow(double x, double y) { return pow(x, y); }
// NaN-propagating like numpy.maximum/minimum/clip (fmaxf would drop a NaN)
template <class O> __device__ __forceinline__ O fo_max(O a, O b) { return (a != a || a > b) ? a : b; }
template <class O> __device__ __forceinline__ O fo_min(O a, O b) { return (a != a || a < b) ? a : b; }
template <class O> __device__ __forceinline__ O fo_clamp(O x, O c) { return fo_min(fo_max(x, -c), c); }
template <class O> __device__ __forceinline__ O fo_sign(O x) { return O((x > O(0)) - (x < O(0))); }
template <class O> struct FoLimits;
template <> struct FoLimits<float> { static __device__ __forceinline__ float max() { return 3.402823466e+38f; } };
template <> struct FoLimits<double> { static __device__ __forceinline__ double max() { return 1.7976931348623157e+308; } };
// no isfinite(): |x| <= max is false for inf and NaN, and needs nothing from a math header
template <class O> __device__ __forceinline__ bool fo_isfinite(O x) { return fo_abs(x) <= FoLimits<O>::max(); }

// The grad's way into a rule, in the reference's order (processed_grad): unscale, negate when
// maximizing, clip by value, then the per-tensor norm-clip factor.
template <class O>
__device__ __forceinline__ O fo_pre_grad(const FoPipe<O>& pp, O g, O scale) {
    g = g * pp.inv_scale;
    if (pp.flags & FO_MAXIMIZE) g = -g;
    if (pp.flags & FO_CLIP_VALUE) g = fo_clamp(g, pp.clip_value);
    return g * scale;
}

// ------------------------------------------------------------------------ memory loop
// 16 bytes of T: one vectorised load or store (ld.global.v4.f32 / v2.f64 / v4.b32 of 8 halves).
template <class T> struct alignas(16) FoPack {
    enum { n = 16 / sizeof(T) };
    T x[n];
};

// Runs body(x) for every element i of [begin, end) of one tensor, x[d] = ptr[d][i] in opmath
// (0 where ptr[d] is null or d is not in the compile-time slot mask USED, so a rule's unused
// slots cost no registers), then stores back x[d] for every d set in write_mask. A block
// strides through the range; when every used pointer is 16-byte aligned at `begin` the body
// runs on 16-byte packs, then a scalar tail finishes. The only memory loop of the backend.
// F is the storage format of every slot (the rule kernels of uniform precision and the Ops
// primitives; fo_mixed_loop in update.cu is the loop of mixed storage).
template <class F, unsigned USED, class Body>
__device__ __forceinline__ void fo_range_loop(typename F::T* const (&ptr_in)[FO_DEPTH], fo_i64 begin,
                                              fo_i64 end, unsigned write_mask, Body& body) {
    typedef typename F::T T;
    typedef typename F::O O;
    const int V = FoPack<T>::n;
    T* ptr[FO_DEPTH];
#pragma unroll
    for (int d = 0; d < FO_DEPTH; ++d) ptr[d] = ((USED >> d) & 1) ? ptr_in[d] : nullptr;
    bool aligned = true;
#pragma unroll
    for (int d = 0; d < FO_DEPTH; ++d)
        if (ptr[d]) aligned = aligned && (reinterpret_cast<unsigned long long>(ptr[d] + begin) % 16 == 0);
    fo_i64 tail = begin;
    if (aligned) {
        const fo_i64 vend = begin + (end - begin) / V * V;
        for (fo_i64 i = begin + (fo_i64)threadIdx.x * V; i < vend; i += (fo_i64)blockDim.x * V) {
            FoPack<T> r[FO_DEPTH];
#pragma unroll
            for (int d = 0; d < FO_DEPTH; ++d)
                if (ptr[d]) r[d] = *reinterpret_cast<const FoPack<T>*>(ptr[d] + i);
#pragma unroll
            for (int k = 0; k < V; ++k) {
                O x[FO_DEPTH];
#pragma unroll
                for (int d = 0; d < FO_DEPTH; ++d) x[d] = ptr[d] ? F::load(r[d].x[k]) : O(0);
                body(x);
#pragma unroll
                for (int d = 0; d < FO_DEPTH; ++d) r[d].x[k] = F::store(x[d]);
            }
#pragma unroll
            for (int d = 0; d < FO_DEPTH; ++d)
                if (ptr[d] && ((write_mask >> d) & 1)) *reinterpret_cast<FoPack<T>*>(ptr[d] + i) = r[d];
        }
        tail = vend;
    }
    for (fo_i64 i = tail + threadIdx.x; i < end; i += blockDim.x) {
        O x[FO_DEPTH];
#pragma unroll
        for (int d = 0; d < FO_DEPTH; ++d) x[d] = ptr[d] ? F::load(ptr[d][i]) : O(0);
        body(x);
#pragma unroll
        for (int d = 0; d < FO_DEPTH; ++d)
            if (ptr[d] && ((write_mask >> d) & 1)) ptr[d][i] = F::store(x[d]);
    }
}

// Work item w of a table: its slot's pointers and element range.
template <class T>
__device__ __forceinline__ int fo_item(const FoTable& tab, int w, T* (&ptr)[FO_DEPTH], fo_i64& begin,
                                       fo_i64& end) {
    const int s = tab.item_slot[w];
#pragma unroll
    for (int d = 0; d < FO_DEPTH; ++d) ptr[d] = reinterpret_cast<T*>(tab.ptr[d][s]);
    begin = (fo_i64)tab.item_chunk[w] * tab.chunk_size;
    end = begin + tab.chunk_size < tab.size[s] ? begin + tab.chunk_size : tab.size[s];
    return s;
}

// ------------------------------------------------------------------------- reductions
// Sum over the block, the same for any blockDim.x from 1 to FO_MAX_THREADS (a tree over the
// next power of two; lanes past blockDim.x are skipped), so the CPU harness's one thread per
// block gets the same answer as a full block. Fixed order: deterministic run to run.
// Every thread of the block must call it; every thread gets the sum.
__device__ __forceinline__ double fo_block_sum(double v) {
    __shared__ double buf[FO_MAX_THREADS];
    const unsigned t = threadIdx.x, n = blockDim.x;
    buf[t] = v;
    __syncthreads();
    unsigned half = 1;
    while (half < n) half <<= 1;
    for (half >>= 1; half > 0; half >>= 1) {
        if (t < half && t + half < n) buf[t] += buf[t + half];
        __syncthreads();
    }
    const double total = buf[0];
    __syncthreads();  // buf is reused by the next call
    return total;
}

// The NaN-propagating maximum over the block (a block's absmax): exact, so any order gives it.
__device__ __forceinline__ float fo_block_max(float v) {
    __shared__ float mbuf[FO_MAX_THREADS];
    const unsigned t = threadIdx.x, n = blockDim.x;
    mbuf[t] = v;
    __syncthreads();
    unsigned half = 1;
    while (half < n) half <<= 1;
    for (half >>= 1; half > 0; half >>= 1) {
        if (t < half && t + half < n) mbuf[t] = fo_max(mbuf[t], mbuf[t + half]);
        __syncthreads();
    }
    const float total = mbuf[0];
    __syncthreads();
    return total;
}
