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
#define FO_DEPTH 6
#define FO_SLOT_PARAM 0
#define FO_SLOT_GRAD 1
#define FO_SLOT_STATE0 2  // states 0..2 in the rule's torch order (fastopt._rules.Rule.all_state)
#define FO_SLOT_EXTRA 5   // AdaHessian's Hessian diagonal
#define FO_USES(d) (1u << (d))
#define FO_P_G (FO_USES(FO_SLOT_PARAM) | FO_USES(FO_SLOT_GRAD))
#define FO_STATES(n) (((1u << (n)) - 1u) << FO_SLOT_STATE0)
#define FO_MAX_TENSORS 32
#define FO_MAX_ITEMS 256
#define FO_MAX_THREADS 1024  // largest block any kernel here is launched with

typedef long long fo_i64;

// The kernel-argument table of one multi-tensor launch (multi_tensor_apply style): up to
// FO_MAX_TENSORS tensors ("slots") and FO_MAX_ITEMS work items, one item = one chunk of
// chunk_size elements of one slot. Blocks walk the items grid-stride. 3,472 bytes: with
// FoHyper<double>, FoPipe and three pointers (LAMB's pass 1) 3,720, under the 4 KiB
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

// Arithmetic type of a storage type (half/bfloat16 storage will map to float).
template <class T> struct FoOpMath { typedef T type; };

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
// 16 bytes of T: one vectorised load or store (ld.global.v4.f32 / v2.f64).
template <class T> struct alignas(16) FoPack {
    enum { n = 16 / sizeof(T) };
    T x[n];
};

// Runs body(x) for every element i of [begin, end) of one tensor, x[d] = ptr[d][i] in opmath
// (0 where ptr[d] is null or d is not in the compile-time slot mask USED, so a rule's unused
// slots cost no registers), then stores back x[d] for every d set in write_mask. A block
// strides through the range; when every used pointer is 16-byte aligned at `begin` the body
// runs on 16-byte packs, then a scalar tail finishes. The only memory loop of the backend.
template <class T, unsigned USED, class Body>
__device__ __forceinline__ void fo_range_loop(T* const (&ptr_in)[FO_DEPTH], fo_i64 begin, fo_i64 end,
                                              unsigned write_mask, Body& body) {
    typedef typename FoOpMath<T>::type O;
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
                for (int d = 0; d < FO_DEPTH; ++d) x[d] = ptr[d] ? O(r[d].x[k]) : O(0);
                body(x);
#pragma unroll
                for (int d = 0; d < FO_DEPTH; ++d) r[d].x[k] = T(x[d]);
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
        for (int d = 0; d < FO_DEPTH; ++d) x[d] = ptr[d] ? O(ptr[d][i]) : O(0);
        body(x);
#pragma unroll
        for (int d = 0; d < FO_DEPTH; ++d)
            if (ptr[d] && ((write_mask >> d) & 1)) ptr[d][i] = T(x[d]);
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
