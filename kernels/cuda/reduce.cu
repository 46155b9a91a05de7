// reduce.cu -- the non-rule primitives of the pipeline (fastopt._backend.Ops): per-tensor
// sums of squares and the non-finite flag, computed on the device, and in-place scale/clip.
//
// Norms are two launches with no atomics, so they are deterministic: fo_stats writes one
// float64 partial sum per chunk, fo_finalize adds a tensor's partials in chunk order.
#include "fastopt.cuh"

// Slot 0 of each tensor: partial[chunk] = sum(clip(x * inv_scale)^2) in float64, and
// *nonfinite = 1 if any x * inv_scale is inf or NaN (either output may be null).
// bytes per element: sizeof(T) (one read).
// F: the storage format (a 16-bit grad is unscaled in float32, so a float16 overflow is seen).
template <class F>
__device__ __forceinline__ void fo_stats(const FoTable& tab, const FoPipe<typename F::O>& pp,
                                         double* partial, int* nonfinite) {
    typedef typename F::O O;
    for (int w = blockIdx.x; w < tab.n_items; w += gridDim.x) {
        typename F::T* ptr[FO_DEPTH];
        fo_i64 begin, end;
        const int s = fo_item(tab, w, ptr, begin, end);
        double acc = 0;
        bool bad = false;
        auto body = [&](O (&x)[FO_DEPTH]) {
            O g = x[0] * pp.inv_scale;
            bad = bad || !fo_isfinite(g);
            if (pp.flags & FO_CLIP_VALUE) g = fo_clamp(g, pp.clip_value);
            const double d = (double)g;
            acc += d * d;
        };
        fo_range_loop<F, FO_USES(0)>(ptr, begin, end, 0u, body);
        if (bad && nonfinite) *nonfinite = 1;  // every writer stores the same value
        if (partial) {
            acc = fo_block_sum(acc);
            if (threadIdx.x == 0) partial[tab.chunk_base[s] + tab.item_chunk[w]] = acc;
        }
    }
}

// out[index[s]] = sum of the tensor's chunk partials, one table item per tensor.
__device__ __forceinline__ void fo_finalize(const FoTable& tab, const double* partial, double* out) {
    for (int w = blockIdx.x; w < tab.n_items; w += gridDim.x) {
        const int s = tab.item_slot[w];
        const fo_i64 n_chunks = (tab.size[s] + tab.chunk_size - 1) / tab.chunk_size;
        double acc = 0;
        for (fo_i64 c = threadIdx.x; c < n_chunks; c += blockDim.x) acc += partial[tab.chunk_base[s] + c];
        acc = fo_block_sum(acc);
        if (threadIdx.x == 0) out[tab.index[s]] = acc;
    }
}

// x *= factors[index] (a float64 factor cast to the opmath type, as numpy's a *= float(f)).
// bytes per element: 2 * sizeof(T).
template <class F>
__device__ __forceinline__ void fo_scale(const FoTable& tab, const double* factors) {
    typedef typename F::O O;
    for (int w = blockIdx.x; w < tab.n_items; w += gridDim.x) {
        typename F::T* ptr[FO_DEPTH];
        fo_i64 begin, end;
        const int s = fo_item(tab, w, ptr, begin, end);
        const O f = O(factors[tab.index[s]]);
        auto body = [&](O (&x)[FO_DEPTH]) { x[0] = x[0] * f; };
        fo_range_loop<F, FO_USES(0)>(ptr, begin, end, 1u, body);
    }
}

// x = clip(x, -c, c). bytes per element: 2 * sizeof(T).
template <class F>
__device__ __forceinline__ void fo_clip(const FoTable& tab, typename F::O c) {
    typedef typename F::O O;
    for (int w = blockIdx.x; w < tab.n_items; w += gridDim.x) {
        typename F::T* ptr[FO_DEPTH];
        fo_i64 begin, end;
        fo_item(tab, w, ptr, begin, end);
        auto body = [&](O (&x)[FO_DEPTH]) { x[0] = fo_clamp(x[0], c); };
        fo_range_loop<F, FO_USES(0)>(ptr, begin, end, 1u, body);
    }
}

#define FO_REDUCE_KERNELS(F, SUF)                                                                   \
    extern "C" __global__ void fo_stats_##SUF(const FoTable tab, const FoPipe<F::O> pp,              \
                                              double* partial, int* nonfinite) {                    \
        fo_stats<F>(tab, pp, partial, nonfinite);                                                   \
    }                                                                                               \
    FO_EXPORT(fo_stats_##SUF)                                                                       \
    extern "C" __global__ void fo_scale_##SUF(const FoTable tab, const double* factors) {            \
        fo_scale<F>(tab, factors);                                                                  \
    }                                                                                               \
    FO_EXPORT(fo_scale_##SUF)                                                                       \
    extern "C" __global__ void fo_clip_##SUF(const FoTable tab, const F::O c) {                      \
        fo_clip<F>(tab, c);                                                                         \
    }                                                                                               \
    FO_EXPORT(fo_clip_##SUF)

FO_REDUCE_KERNELS(FoF32, f32)
FO_REDUCE_KERNELS(FoF64, f64)
FO_REDUCE_KERNELS(FoBF16, bf16)
FO_REDUCE_KERNELS(FoF16, f16)

extern "C" __global__ void fo_finalize_sums(const FoTable tab, const double* partial, double* out) {
    fo_finalize(tab, partial, out);
}
FO_EXPORT(fo_finalize_sums)
