// sparse.cu -- torch.optim.SparseAdam's lazy update of the rows an (indices, values) grad names
// (fastopt/_sparse.py; the definition is kernels/reference.py, sparse_adam_rows).
//
// One block per distinct row (grid-stride over rows), the block's threads over the row's
// columns. The duplicates of a row are summed in the order they appear in the grad (the host's
// stable argsort `order` and the segment boundaries `starts`), then the moments and the param
// of that row are updated as torch's _functional.sparse_adam does. Distinct rows never share a
// block, so no two threads write one element. bytes per touched element: 3 reads and 3 writes
// of T plus one read of T per duplicate.
#include "fastopt.cuh"

template <class T>
__device__ __forceinline__ void fo_sparse_adam(T* p, T* m, T* v, const T* vals, const fo_i64* order,
                                               const fo_i64* starts, const fo_i64* rows,
                                               fo_i64 n_rows, fo_i64 width, T step_size, T eps,
                                               T one_minus_beta1, T one_minus_beta2, int maximize) {
    for (fo_i64 u = blockIdx.x; u < n_rows; u += gridDim.x) {
        const fo_i64 r = rows[u], s0 = starts[u], s1 = starts[u + 1];
        for (fo_i64 j = threadIdx.x; j < width; j += blockDim.x) {
            T g = vals[order[s0] * width + j];
            for (fo_i64 e = s0 + 1; e < s1; ++e) g = g + vals[order[e] * width + j];
            if (maximize) g = -g;
            const fo_i64 i = r * width + j;
            const T mo = m[i], vo = v[i];
            const T u1 = (g - mo) * one_minus_beta1;
            const T u2 = (g * g - vo) * one_minus_beta2;
            m[i] = mo + u1;
            v[i] = vo + u2;
            p[i] = p[i] - step_size * ((u1 + mo) / (fo_sqrt(u2 + vo) + eps));
        }
    }
}

#define FO_SPARSE_KERNELS(T, SUF)                                                                     \
    extern "C" __global__ void fo_sparse_adam_##SUF(T* p, T* m, T* v, const T* vals,                  \
                                                    const fo_i64* order, const fo_i64* starts,        \
                                                    const fo_i64* rows, const fo_i64 n_rows,          \
                                                    const fo_i64 width, const T step_size,            \
                                                    const T eps, const T one_minus_beta1,             \
                                                    const T one_minus_beta2, const int maximize) {    \
        fo_sparse_adam<T>(p, m, v, vals, order, starts, rows, n_rows, width, step_size, eps,          \
                          one_minus_beta1, one_minus_beta2, maximize);                                \
    }                                                                                                 \
    FO_EXPORT(fo_sparse_adam_##SUF)

FO_SPARSE_KERNELS(float, f32)
FO_SPARSE_KERNELS(double, f64)
