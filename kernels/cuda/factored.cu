// factored.cu -- Adafactor (fastopt._rules Rule.kind "factored"): the passes around its
// factored second moments, one tensor per launch (kernels/cuda/_host.py, CudaBackend.factored).
//
// A param of >= 2 dims is seen as nr = B*rows rows of cols elements (B batches of rows x cols
// matrices).  fo_af_rows: per row, float64 sums of x^2 and of p^2 (one block per row, a fixed
// block reduction); fo_af_cols: per (batch, column), the float64 sum of x^2 over the rows in
// order (one thread per column); the host updates row_var/col_var (O(rows + cols)) and forms
// rden = max(mean(row_var), eps1) per batch; fo_af_rms: per row, the float64 sum of u^2 with
// u = x / sqrt(max(row_var*col_var/rden, eps1^2)); fo_af_apply: p = clip(p*decay - step*u).
// A 0-/1-D param: fo_af_vec (variance = lerp(variance, x^2), float64 sums of u^2 and p^2 per
// FO_AF_CHUNK elements) and fo_af_vec_apply.  x is the grad after the pipeline (unscale,
// maximize, clip_value, the norm-clip factor), recomputed in every pass.  No atomics: every
// sum is one row's, one column's or one chunk's, so a step repeats bit for bit.
#include "fastopt.cuh"

#define FO_AF_CHUNK 4096  // elements per block of fo_af_vec (the host's plan uses the same)

// nan stays nan; c = inf is no clip (the Numba backend's _clip)
template <class O> __device__ __forceinline__ O fo_af_clip(O x, O c) {
    return x > c ? c : (x < -c ? -c : x);
}

template <class O>
__device__ __forceinline__ O fo_af_x(const O* g, fo_i64 i, O ginv, O gclip, O scale) {
    return fo_af_clip(g[i] * ginv, gclip) * scale;
}

// u = x / sqrt(max(v, eps1^2)), NaN propagating as numpy.maximum
template <class O> __device__ __forceinline__ O fo_af_u(O x, O v, O eps1sq) {
    v = v < eps1sq ? eps1sq : v;
    return x * (O(1) / fo_sqrt(v));
}

template <class O>
__device__ __forceinline__ void fo_af_rows(const O* g, const O* p, double* rsum, double* psq,
                                           fo_i64 nr, fo_i64 cols, O ginv, O gclip, O scale) {
    for (fo_i64 r = blockIdx.x; r < nr; r += gridDim.x) {
        double s = 0, q = 0;
        for (fo_i64 j = threadIdx.x; j < cols; j += blockDim.x) {
            const double x = (double)fo_af_x(g, r * cols + j, ginv, gclip, scale);
            const double y = (double)p[r * cols + j];
            s += x * x;
            q += y * y;
        }
        s = fo_block_sum(s);
        q = fo_block_sum(q);
        if (threadIdx.x == 0) {
            rsum[r] = s;
            psq[r] = q;
        }
    }
}

template <class O>
__device__ __forceinline__ void fo_af_cols(const O* g, double* csum, fo_i64 batches, fo_i64 rows,
                                           fo_i64 cols, O ginv, O gclip, O scale) {
    const fo_i64 n = batches * cols, stride = (fo_i64)gridDim.x * blockDim.x;
    for (fo_i64 k = (fo_i64)blockIdx.x * blockDim.x + threadIdx.x; k < n; k += stride) {
        const fo_i64 b = k / cols, j = k % cols;
        double s = 0;
        for (fo_i64 i = 0; i < rows; ++i) {
            const double x = (double)fo_af_x(g, (b * rows + i) * cols + j, ginv, gclip, scale);
            s += x * x;
        }
        csum[k] = s;
    }
}

template <class O>
__device__ __forceinline__ void fo_af_rms(const O* g, const O* rv, const O* cv, const O* rden,
                                          double* usq, fo_i64 nr, fo_i64 rows, fo_i64 cols, O ginv,
                                          O gclip, O scale, O eps1sq) {
    for (fo_i64 r = blockIdx.x; r < nr; r += gridDim.x) {
        const fo_i64 b = r / rows;
        const O rr = rv[r], den = rden[b];
        double s = 0;
        for (fo_i64 j = threadIdx.x; j < cols; j += blockDim.x) {
            const O x = fo_af_x(g, r * cols + j, ginv, gclip, scale);
            const double u = (double)fo_af_u(x, (rr * cv[b * cols + j]) / den, eps1sq);
            s += u * u;
        }
        s = fo_block_sum(s);
        if (threadIdx.x == 0) usq[r] = s;
    }
}

template <class O>
__device__ __forceinline__ void fo_af_apply(O* p, const O* g, const O* rv, const O* cv,
                                            const O* rden, fo_i64 nr, fo_i64 rows, fo_i64 cols,
                                            O ginv, O gclip, O scale, O eps1sq, O decay, O step,
                                            O wclip) {
    const fo_i64 n = nr * cols, stride = (fo_i64)gridDim.x * blockDim.x;
    for (fo_i64 i = (fo_i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const fo_i64 r = i / cols, j = i % cols, b = r / rows;
        const O x = fo_af_x(g, i, ginv, gclip, scale);
        const O u = fo_af_u(x, (rv[r] * cv[b * cols + j]) / rden[b], eps1sq);
        const O a = p[i] * decay;
        const O d = step * u;
        p[i] = fo_af_clip(a - d, wclip);
    }
}

template <class O>
__device__ __forceinline__ void fo_af_vec(const O* g, const O* p, O* var, double* usq, double* psq,
                                          fo_i64 n, O ginv, O gclip, O scale, O eps1sq, O c,
                                          int swap) {
    const fo_i64 n_chunks = (n + FO_AF_CHUNK - 1) / FO_AF_CHUNK;
    for (fo_i64 w = blockIdx.x; w < n_chunks; w += gridDim.x) {
        const fo_i64 end = (w + 1) * FO_AF_CHUNK < n ? (w + 1) * FO_AF_CHUNK : n;
        double s = 0, q = 0;
        for (fo_i64 i = w * FO_AF_CHUNK + threadIdx.x; i < end; i += blockDim.x) {
            const O x = fo_af_x(g, i, ginv, gclip, scale);
            const O x2 = x * x;
            O v = var[i];
            v = swap ? x2 + c * (v - x2) : v + c * (x2 - v);
            var[i] = v;
            const double u = (double)fo_af_u(x, v, eps1sq);
            const double y = (double)p[i];
            s += u * u;
            q += y * y;
        }
        s = fo_block_sum(s);
        q = fo_block_sum(q);
        if (threadIdx.x == 0) {
            usq[w] = s;
            psq[w] = q;
        }
    }
}

template <class O>
__device__ __forceinline__ void fo_af_vec_apply(O* p, const O* g, const O* var, fo_i64 n, O ginv,
                                                O gclip, O scale, O eps1sq, O decay, O step,
                                                O wclip) {
    const fo_i64 stride = (fo_i64)gridDim.x * blockDim.x;
    for (fo_i64 i = (fo_i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const O u = fo_af_u(fo_af_x(g, i, ginv, gclip, scale), var[i], eps1sq);
        const O a = p[i] * decay;
        const O d = step * u;
        p[i] = fo_af_clip(a - d, wclip);
    }
}

#define FO_AF_KERNELS(O, SUF)                                                                      \
    extern "C" __global__ void fo_af_rows_##SUF(const O* g, const O* p, double* rsum, double* psq, \
                                                fo_i64 nr, fo_i64 cols, O ginv, O gclip, O scale) { \
        fo_af_rows<O>(g, p, rsum, psq, nr, cols, ginv, gclip, scale);                              \
    }                                                                                              \
    FO_EXPORT(fo_af_rows_##SUF)                                                                    \
    extern "C" __global__ void fo_af_cols_##SUF(const O* g, double* csum, fo_i64 batches,          \
                                                fo_i64 rows, fo_i64 cols, O ginv, O gclip,         \
                                                O scale) {                                         \
        fo_af_cols<O>(g, csum, batches, rows, cols, ginv, gclip, scale);                           \
    }                                                                                              \
    FO_EXPORT(fo_af_cols_##SUF)                                                                    \
    extern "C" __global__ void fo_af_rms_##SUF(const O* g, const O* rv, const O* cv,               \
                                               const O* rden, double* usq, fo_i64 nr, fo_i64 rows, \
                                               fo_i64 cols, O ginv, O gclip, O scale, O eps1sq) {  \
        fo_af_rms<O>(g, rv, cv, rden, usq, nr, rows, cols, ginv, gclip, scale, eps1sq);            \
    }                                                                                              \
    FO_EXPORT(fo_af_rms_##SUF)                                                                     \
    extern "C" __global__ void fo_af_apply_##SUF(O* p, const O* g, const O* rv, const O* cv,      \
                                                 const O* rden, fo_i64 nr, fo_i64 rows,            \
                                                 fo_i64 cols, O ginv, O gclip, O scale, O eps1sq,  \
                                                 O decay, O step, O wclip) {                       \
        fo_af_apply<O>(p, g, rv, cv, rden, nr, rows, cols, ginv, gclip, scale, eps1sq, decay,      \
                       step, wclip);                                                               \
    }                                                                                              \
    FO_EXPORT(fo_af_apply_##SUF)                                                                   \
    extern "C" __global__ void fo_af_vec_##SUF(const O* g, const O* p, O* var, double* usq,        \
                                               double* psq, fo_i64 n, O ginv, O gclip, O scale,    \
                                               O eps1sq, O c, int swap) {                          \
        fo_af_vec<O>(g, p, var, usq, psq, n, ginv, gclip, scale, eps1sq, c, swap);                 \
    }                                                                                              \
    FO_EXPORT(fo_af_vec_##SUF)                                                                     \
    extern "C" __global__ void fo_af_vec_apply_##SUF(O* p, const O* g, const O* var, fo_i64 n,     \
                                                     O ginv, O gclip, O scale, O eps1sq, O decay,  \
                                                     O step, O wclip) {                            \
        fo_af_vec_apply<O>(p, g, var, n, ginv, gclip, scale, eps1sq, decay, step, wclip);          \
    }                                                                                              \
    FO_EXPORT(fo_af_vec_apply_##SUF)

FO_AF_KERNELS(float, f32)
FO_AF_KERNELS(double, f64)
