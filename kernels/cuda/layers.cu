// layers.cu -- BatchNorm and Dropout (fastopt.layers), the CUDA twin of
// kernels/reference_layers.py (the definition) and kernels/numba_layers.py.
//
// BatchNorm sees x as (N, C, S), C-contiguous. Statistics are float64 on every dtype:
// a reduction writes one float64 partial per (row block, channel) -- the row blocks are a
// function of N only, summed inside a block by fo_block_sum's fixed tree -- and
// fo_bn_finalize adds a channel's partials in block order. No atomics: deterministic run to
// run and for any grid size; a different block size changes which thread adds which
// element, so the last bits of the sums depend on it (the launcher's block is fixed).
// Per-element math is double, rounded once to T; a 16-bit format (fastopt.cuh's FoBF16,
// FoF16: uint16 bits) is read exactly and written as the float32 rounding of that double,
// rounded again to nearest even -- the reference's float32 kernel followed by its cast.
// Known limit of this first version: a reduction item is one channel, so for S == 1 the
// threads of a block read with a stride of C elements (uncoalesced).
//
// Dropout: random_bits(seed, step, i) of fastopt.precision -- the SplitMix64 finaliser of
// step_key + i * G, upper 32 bits -- with step_key computed on the host; an element is kept
// iff bits >= threshold = ceil(p * 2^32). Bit-identical to the reference.
#include "fastopt.cuh"

#define FO_G 0x9e3779b97f4a7c15ull

// Sums over the rows [b*n/nb, (b+1)*n/nb) of channel j, one item per (b, j), grid-stride.
// centre == nullptr: sum x; else sum (x - centre[j])^2. part[b * c + j].
// bytes per element: sizeof(T) (one read).
template <class F, class T = typename F::T>
__device__ __forceinline__ void fo_bn_sum(const T* x, fo_i64 n, fo_i64 c, fo_i64 s,
                                          const double* centre, fo_i64 nb, double* part) {
    for (fo_i64 w = blockIdx.x; w < nb * c; w += gridDim.x) {
        const fo_i64 b = w / c, j = w % c;
        const fo_i64 lo = b * n / nb, hi = (b + 1) * n / nb;
        const double m = centre ? centre[j] : 0.0;
        double acc = 0;
        for (fo_i64 q = threadIdx.x; q < (hi - lo) * s; q += blockDim.x) {
            const fo_i64 i = lo + q / s, k = q % s;
            const double v = (double)F::load(x[(i * c + j) * s + k]);
            acc += centre ? (v - m) * (v - m) : v;
        }
        acc = fo_block_sum(acc);
        if (threadIdx.x == 0) part[b * c + j] = acc;
    }
}

// The two backward sums, sum dy and sum dy * xhat: part[(2 * b) * c + j] and
// part[(2 * b + 1) * c + j], so fo_bn_finalize over 2 * c columns gives both.
// bytes per element: 2 * sizeof(T).
template <class F, class T = typename F::T>
__device__ __forceinline__ void fo_bn_bwd_sum(const T* x, const T* dy, fo_i64 n, fo_i64 c, fo_i64 s,
                                              const double* mean, const double* invstd, fo_i64 nb,
                                              double* part) {
    for (fo_i64 w = blockIdx.x; w < nb * c; w += gridDim.x) {
        const fo_i64 b = w / c, j = w % c;
        const fo_i64 lo = b * n / nb, hi = (b + 1) * n / nb;
        const double m = mean[j], r = invstd[j];
        double a0 = 0, a1 = 0;
        for (fo_i64 q = threadIdx.x; q < (hi - lo) * s; q += blockDim.x) {
            const fo_i64 e = ((lo + q / s) * c + j) * s + q % s;
            const double g = (double)F::load(dy[e]);
            a0 += g;
            a1 += g * (((double)F::load(x[e]) - m) * r);
        }
        a0 = fo_block_sum(a0);
        a1 = fo_block_sum(a1);
        if (threadIdx.x == 0) {
            part[2 * b * c + j] = a0;
            part[(2 * b + 1) * c + j] = a1;
        }
    }
}

// out[j] = sum over b of part[b * cols + j], in block order: part is (nb, cols).
__device__ __forceinline__ void fo_bn_fin(const double* part, fo_i64 nb, fo_i64 cols, double* out) {
    const fo_i64 stride = (fo_i64)gridDim.x * blockDim.x;
    for (fo_i64 j = (fo_i64)blockIdx.x * blockDim.x + threadIdx.x; j < cols; j += stride) {
        double acc = 0;
        for (fo_i64 b = 0; b < nb; ++b) acc += part[b * cols + j];
        out[j] = acc;
    }
}

// A double result as an element of format F: one rounding for float/double, for a 16-bit
// format the float32 rounding first, then F::store's nearest even.
template <class F>
__device__ __forceinline__ typename F::T fo_bn_out(double v) {
    return F::store((typename F::O)v);
}

// out = (x - mean) * scale + beta per channel. bytes per element: 2 * sizeof(T).
template <class F, class T = typename F::T>
__device__ __forceinline__ void fo_bn_apply(const T* x, fo_i64 total, fo_i64 c, fo_i64 s,
                                            const double* mean, const double* scale,
                                            const double* beta, T* out) {
    const fo_i64 stride = (fo_i64)gridDim.x * blockDim.x;
    for (fo_i64 e = (fo_i64)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        const fo_i64 j = (e / s) % c;
        out[e] = fo_bn_out<F>(((double)F::load(x[e]) - mean[j]) * scale[j] + beta[j]);
    }
}

// out = k * (dy - a - xhat * b) per channel. bytes per element: 3 * sizeof(T).
template <class F, class T = typename F::T>
__device__ __forceinline__ void fo_bn_dx(const T* x, const T* dy, fo_i64 total, fo_i64 c, fo_i64 s,
                                         const double* mean, const double* invstd, const double* k,
                                         const double* a, const double* b, T* out) {
    const fo_i64 stride = (fo_i64)gridDim.x * blockDim.x;
    for (fo_i64 e = (fo_i64)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        const fo_i64 j = (e / s) % c;
        const double xhat = ((double)F::load(x[e]) - mean[j]) * invstd[j];
        out[e] = fo_bn_out<F>(k[j] * ((double)F::load(dy[e]) - a[j] - xhat * b[j]));
    }
}

// fo_mix64: fastopt.cuh (shared with the stochastic rounding of 16-bit params)
// out = x * scale where random_bits >= threshold, else 0, in F's arithmetic type (float32
// for 16-bit formats) rounded once by F::store. bytes per element: 2 * sizeof(T).
template <class F, class T = typename F::T, class O = typename F::O>
__device__ __forceinline__ void fo_dropout(const T* x, fo_i64 total, unsigned long long key,
                                           unsigned long long threshold, O scale, T* out) {
    const fo_i64 stride = (fo_i64)gridDim.x * blockDim.x;
    for (fo_i64 e = (fo_i64)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        const unsigned long long bits = fo_mix64(key + (unsigned long long)e * FO_G) >> 32;
        out[e] = F::store(bits >= threshold ? F::load(x[e]) * scale : O(0));
    }
}

#define FO_LAYER_KERNELS(F, SUF)                                                                    \
    FO_LAYER_KERNELS_T(F, F::T, F::O, SUF)
#define FO_LAYER_KERNELS_T(F, T, O, SUF)                                                                    \
    extern "C" __global__ void fo_bn_sum_##SUF(const T* x, fo_i64 n, fo_i64 c, fo_i64 s,            \
                                               const double* centre, fo_i64 nb, double* part) {     \
        fo_bn_sum<F>(x, n, c, s, centre, nb, part);                                                  \
    }                                                                                               \
    FO_EXPORT(fo_bn_sum_##SUF)                                                                      \
    extern "C" __global__ void fo_bn_bwd_sum_##SUF(const T* x, const T* dy, fo_i64 n, fo_i64 c,     \
                                                   fo_i64 s, const double* mean,                    \
                                                   const double* invstd, fo_i64 nb, double* part) { \
        fo_bn_bwd_sum<F>(x, dy, n, c, s, mean, invstd, nb, part);                                    \
    }                                                                                               \
    FO_EXPORT(fo_bn_bwd_sum_##SUF)                                                                  \
    extern "C" __global__ void fo_bn_apply_##SUF(const T* x, fo_i64 total, fo_i64 c, fo_i64 s,      \
                                                 const double* mean, const double* scale,           \
                                                 const double* beta, T* out) {                      \
        fo_bn_apply<F>(x, total, c, s, mean, scale, beta, out);                                      \
    }                                                                                               \
    FO_EXPORT(fo_bn_apply_##SUF)                                                                    \
    extern "C" __global__ void fo_bn_dx_##SUF(const T* x, const T* dy, fo_i64 total, fo_i64 c,      \
                                              fo_i64 s, const double* mean, const double* invstd,   \
                                              const double* k, const double* a, const double* b,    \
                                              T* out) {                                             \
        fo_bn_dx<F>(x, dy, total, c, s, mean, invstd, k, a, b, out);                                 \
    }                                                                                               \
    FO_EXPORT(fo_bn_dx_##SUF)                                                                       \
    extern "C" __global__ void fo_dropout_##SUF(const T* x, fo_i64 total, unsigned long long key,   \
                                                unsigned long long threshold, O scale, T* out) {    \
        fo_dropout<F>(x, total, key, threshold, scale, out);                                         \
    }                                                                                               \
    FO_EXPORT(fo_dropout_##SUF)

FO_LAYER_KERNELS(FoF32, f32)
FO_LAYER_KERNELS(FoF64, f64)
FO_LAYER_KERNELS(FoBF16, bf16)
FO_LAYER_KERNELS(FoF16, f16)

extern "C" __global__ void fo_bn_finalize(const double* part, fo_i64 nb, fo_i64 cols, double* out) {
    fo_bn_fin(part, nb, cols, out);
}
FO_EXPORT(fo_bn_finalize)
