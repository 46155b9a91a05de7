// widen.cu -- the conversions of the widening driver (fastopt/_widen.py) on the device: Muon and
// Adafactor have float32/float64 kernels only, so a bucket of 16-bit params (or 16-bit state,
// master weights, stochastic rounding) is stepped on float32 copies and written back once.
//
//   fo_widen_load_<f16|bf16>:  out = x as float32 (exact: the storage format's load)
//   fo_widen_store_<f16|bf16>: out = x rounded once to the format: nearest even, or with
//                              FO_ST_SR in st.flags the param's stochastic rounding, keyed by
//                              st.sr_key (fastopt.precision.step_key(seed, t), on the host) and
//                              the element's flat index in the param
//
// The store is fo_store_param of rules.cuh, the same write the mixed-precision and q8 kernels
// make, so a change to the rounding recipes (FoBF16::store / store_sr in fastopt.cuh) reaches the
// widened rules too. The 8-bit state of the driver uses q8.cu's fo_q8_dequantize and
// fo_q8_quantize. One array per launch, flat and contiguous, a grid-stride loop over elements.
// bytes per element: 2 read + 4 written (load), 4 read + 2 written (store).
#include "rules.cuh"

template <class P>
__device__ __forceinline__ void fo_widen_load(const typename P::T* x, fo_i64 n, float* out) {
    const fo_i64 stride = (fo_i64)gridDim.x * blockDim.x;
    for (fo_i64 i = (fo_i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) out[i] = P::load(x[i]);
}

template <class P>
__device__ __forceinline__ void fo_widen_store(const float* x, fo_i64 n, const FoStore& st, typename P::T* out) {
    const fo_i64 stride = (fo_i64)gridDim.x * blockDim.x;
    for (fo_i64 i = (fo_i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        fo_store_param<P>(out, nullptr, i, x[i], st);
}

#define FO_WIDEN_KERNELS(P, SUF)                                                                          \
    extern "C" __global__ void fo_widen_load_##SUF(const P::T* x, const fo_i64 n, float* out) {          \
        fo_widen_load<P>(x, n, out);                                                                     \
    }                                                                                                    \
    FO_EXPORT(fo_widen_load_##SUF)                                                                       \
    extern "C" __global__ void fo_widen_store_##SUF(const float* x, const fo_i64 n, const FoStore st,    \
                                                    P::T* out) {                                         \
        fo_widen_store<P>(x, n, st, out);                                                                \
    }                                                                                                    \
    FO_EXPORT(fo_widen_store_##SUF)

FO_WIDEN_KERNELS(FoBF16, bf16)
FO_WIDEN_KERNELS(FoF16, f16)
