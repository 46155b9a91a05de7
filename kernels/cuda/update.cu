// update.cu -- the fused update kernels: one __device__ step function per rule (SPEC section 5),
// and one kernel template that runs the pipeline (SPEC section 4, steps 1 and 3-7 and
// weight_clip) around it over a multi-tensor table. Variants are runtime flags.
//
// Each step function reads its host scalars from h.v[] in the order its comment lists;
// fastopt/kernels/cuda/_host.py (HYPER) packs them in that order. States s0..s2 are the
// rule's state arrays in fastopt._rules.Rule.all_state order; unused ones read as 0 and are
// not written.
#include "fastopt.cuh"

// v: lr, weight_decay, momentum, 1 - dampening; flags: nesterov, first_step
struct FoSGD {
    enum : unsigned { slots = FO_P_G | FO_STATES(1) };  // the table slots its step reads
    template <class O>
    static __device__ __forceinline__ void step(const FoHyper<O>& h, O& p, O g, O& b, O&, O&, O) {
        const O lr = h.v[0], wd = h.v[1], mu = h.v[2], one_minus_damp = h.v[3];
        if (wd != O(0)) g = g + wd * p;
        if (mu != O(0)) {
            b = h.flag(1) ? g : mu * b + one_minus_damp * g;
            g = h.flag(0) ? g + mu * b : b;
        }
        p = p - lr * g;
    }
};

// v: beta1, 1-beta1, beta2, 1-beta2, eps, weight_decay, step_size = lr/bc1, sqrt(bc2),
//    decay = 1 - lr*wd; flags: amsgrad, decoupled (AdamW)
struct FoAdam {
    enum : unsigned { slots = FO_P_G | FO_STATES(3) };  // the table slots its step reads
    template <class O>
    static __device__ __forceinline__ void step(const FoHyper<O>& h, O& p, O g, O& m, O& v, O& vmax, O) {
        const O b1 = h.v[0], omb1 = h.v[1], b2 = h.v[2], omb2 = h.v[3], eps = h.v[4], wd = h.v[5];
        if (h.flag(1)) p = p * h.v[8];
        else if (wd != O(0)) g = g + wd * p;
        m = b1 * m + omb1 * g;
        v = b2 * v + omb2 * g * g;
        O vv = v;
        if (h.flag(0)) { vmax = fo_max(vmax, v); vv = vmax; }
        // sqrt(v / bc2) as sqrt(v) / sqrt(bc2), as torch.optim.Adam does
        const O denom = fo_sqrt(vv) / h.v[7] + eps;
        p = p - h.v[6] * m / denom;
    }
};

// v: clr = lr / (1 + (t-1)*lr_decay), eps, weight_decay
struct FoAdagrad {
    enum : unsigned { slots = FO_P_G | FO_STATES(1) };  // the table slots its step reads
    template <class O>
    static __device__ __forceinline__ void step(const FoHyper<O>& h, O& p, O g, O& sum, O&, O&, O) {
        if (h.v[2] != O(0)) g = g + h.v[2] * p;
        sum = sum + g * g;
        p = p - h.v[0] * g / (fo_sqrt(sum) + h.v[1]);
    }
};

// v: lr, alpha, 1-alpha, eps, weight_decay, momentum; flags: centered
struct FoRMSprop {
    enum : unsigned { slots = FO_P_G | FO_STATES(3) };  // the table slots its step reads
    template <class O>
    static __device__ __forceinline__ void step(const FoHyper<O>& h, O& p, O g, O& sq, O& buf, O& gavg, O) {
        const O lr = h.v[0], a = h.v[1], oma = h.v[2], eps = h.v[3], wd = h.v[4], mu = h.v[5];
        if (wd != O(0)) g = g + wd * p;
        sq = a * sq + oma * g * g;
        O d;
        if (h.flag(0)) {
            gavg = a * gavg + oma * g;
            d = fo_sqrt(sq - gavg * gavg) + eps;
        } else {
            d = fo_sqrt(sq) + eps;
        }
        if (mu > O(0)) {
            buf = mu * buf + g / d;
            p = p - lr * buf;
        } else {
            p = p - lr * g / d;
        }
    }
};

// v: lr, rho, 1-rho, eps, weight_decay
struct FoAdadelta {
    enum : unsigned { slots = FO_P_G | FO_STATES(2) };  // the table slots its step reads
    template <class O>
    static __device__ __forceinline__ void step(const FoHyper<O>& h, O& p, O g, O& sq, O& acc, O&, O) {
        const O lr = h.v[0], rho = h.v[1], omr = h.v[2], eps = h.v[3], wd = h.v[4];
        if (wd != O(0)) g = g + wd * p;
        sq = rho * sq + omr * g * g;
        const O delta = fo_sqrt(acc + eps) / fo_sqrt(sq + eps) * g;
        acc = rho * acc + omr * delta * delta;
        p = p - lr * delta;
    }
};

// v: beta1, 1-beta1, beta2, eps, weight_decay, clr = lr/(1 - beta1^t)
struct FoAdamax {
    enum : unsigned { slots = FO_P_G | FO_STATES(2) };  // the table slots its step reads
    template <class O>
    static __device__ __forceinline__ void step(const FoHyper<O>& h, O& p, O g, O& m, O& u, O&, O) {
        if (h.v[4] != O(0)) g = g + h.v[4] * p;
        m = h.v[0] * m + h.v[1] * g;
        u = fo_max(h.v[2] * u, fo_abs(g) + h.v[3]);
        p = p - h.v[5] * m / u;
    }
};

// v: beta1, 1-beta1, beta2, 1-beta2, eps, weight_decay, sqrt(bc2), c_grad, c_avg
// (torch.optim.NAdam's momentum schedule, folded into c_grad and c_avg on the host)
struct FoNAdam {
    enum : unsigned { slots = FO_P_G | FO_STATES(2) };  // the table slots its step reads
    template <class O>
    static __device__ __forceinline__ void step(const FoHyper<O>& h, O& p, O g, O& m, O& v, O&, O) {
        if (h.v[5] != O(0)) g = g + h.v[5] * p;
        m = h.v[0] * m + h.v[1] * g;
        v = h.v[2] * v + h.v[3] * g * g;
        const O denom = fo_sqrt(v) / h.v[6] + h.v[4];
        p = p - h.v[7] * g / denom;
        p = p - h.v[8] * m / denom;
    }
};

// v: beta1, 1-beta1, beta2, 1-beta2, eps, weight_decay, step_size; flags: rectify
struct FoRAdam {
    enum : unsigned { slots = FO_P_G | FO_STATES(2) };  // the table slots its step reads
    template <class O>
    static __device__ __forceinline__ void step(const FoHyper<O>& h, O& p, O g, O& m, O& v, O&, O) {
        if (h.v[5] != O(0)) g = g + h.v[5] * p;
        m = h.v[0] * m + h.v[1] * g;
        v = h.v[2] * v + h.v[3] * g * g;
        if (h.flag(0)) p = p - h.v[6] * m / (fo_sqrt(v) + h.v[4]);
        else p = p - h.v[6] * m;
    }
};

// v: lr, beta1, 1-beta1, beta2, 1-beta2, decay = 1 - lr*wd
struct FoLion {
    enum : unsigned { slots = FO_P_G | FO_STATES(1) };  // the table slots its step reads
    template <class O>
    static __device__ __forceinline__ void step(const FoHyper<O>& h, O& p, O g, O& m, O&, O&, O) {
        const O c = h.v[1] * m + h.v[2] * g;
        p = p * h.v[5];
        p = p - h.v[0] * fo_sign(c);
        m = h.v[3] * m + h.v[4] * g;
    }
};

// v: beta1, 1-beta1, beta2, 1-beta2, eps, weight_decay, step_size = lr/bc1, sqrt(bc2),
//    hessian_power; e: the Hessian diagonal (already unscaled)
struct FoAdaHessian {
    enum : unsigned { slots = FO_P_G | FO_STATES(2) | FO_USES(FO_SLOT_EXTRA) };  // the table slots its step reads
    template <class O>
    static __device__ __forceinline__ void step(const FoHyper<O>& h, O& p, O g, O& m, O& v, O&, O e) {
        if (h.v[5] != O(0)) g = g + h.v[5] * p;
        m = h.v[0] * m + h.v[1] * g;
        v = h.v[2] * v + h.v[3] * e * e;
        O root = fo_sqrt(v) / h.v[7];
        if (h.v[8] != O(1)) root = fo_pow(root, h.v[8]);
        p = p - h.v[6] * m / (root + h.v[4]);
    }
};

// The fused pass: bytes per element = sizeof(T) * (3 + 2 * states [+ 1 extra]): read p, g,
// states, extra; write p, states. Adam float32: 28 bytes, AMSGrad 36, SGD without momentum 12.
template <class T, class Rule>
__device__ __forceinline__ void fo_update(const FoTable& tab, const FoHyper<typename FoOpMath<T>::type>& h,
                                          const FoPipe<typename FoOpMath<T>::type>& pp,
                                          const double* scales) {
    typedef typename FoOpMath<T>::type O;
    const unsigned write = (1u << FO_SLOT_PARAM) | (7u << FO_SLOT_STATE0);
    for (int w = blockIdx.x; w < tab.n_items; w += gridDim.x) {
        T* ptr[FO_DEPTH];
        fo_i64 begin, end;
        const int s = fo_item(tab, w, ptr, begin, end);
        const O scale = scales ? O(scales[tab.index[s]]) : O(1);
        auto body = [&](O (&x)[FO_DEPTH]) {
            const O g = fo_pre_grad(pp, x[FO_SLOT_GRAD], scale);
            Rule::step(h, x[FO_SLOT_PARAM], g, x[FO_SLOT_STATE0], x[FO_SLOT_STATE0 + 1],
                       x[FO_SLOT_STATE0 + 2], x[FO_SLOT_EXTRA] * pp.inv_scale);
            if (pp.flags & FO_WEIGHT_CLIP) x[FO_SLOT_PARAM] = fo_clamp(x[FO_SLOT_PARAM], pp.weight_clip);
        };
        fo_range_loop<T, Rule::slots>(ptr, begin, end, write, body);
    }
}

// --------------------------------------------------------------------------------- LAMB
// v: beta1, 1-beta1, beta2, 1-beta2, eps, weight_decay, bc1, sqrt(bc2), lr.
// Two passes: stage 1 updates the moments and writes per-chunk float64 partial sums of p^2
// and r^2 (fo_finalize in reduce.cu sums them per tensor); stage 2 recomputes r from the new
// moments (bit-identical to stage 1's, so no scratch array) and applies the trust ratio.
template <class O>
__device__ __forceinline__ O fo_lamb_r(const FoHyper<O>& h, O p, O m, O v) {
    return (m / h.v[6]) / (fo_sqrt(v) / h.v[7] + h.v[4]) + h.v[5] * p;
}

// bytes per element: sizeof(T) * 6 (read p, g, m, v; write m, v)
template <class T>
__device__ __forceinline__ void fo_lamb_stage1(const FoTable& tab, const FoHyper<typename FoOpMath<T>::type>& h,
                                               const FoPipe<typename FoOpMath<T>::type>& pp,
                                               const double* scales, double* partial_p, double* partial_r) {
    typedef typename FoOpMath<T>::type O;
    const unsigned write = 3u << FO_SLOT_STATE0;
    for (int w = blockIdx.x; w < tab.n_items; w += gridDim.x) {
        T* ptr[FO_DEPTH];
        fo_i64 begin, end;
        const int s = fo_item(tab, w, ptr, begin, end);
        const O scale = scales ? O(scales[tab.index[s]]) : O(1);
        double pp2 = 0, rr2 = 0;
        auto body = [&](O (&x)[FO_DEPTH]) {
            const O g = fo_pre_grad(pp, x[FO_SLOT_GRAD], scale);
            O& m = x[FO_SLOT_STATE0];
            O& v = x[FO_SLOT_STATE0 + 1];
            m = h.v[0] * m + h.v[1] * g;
            v = h.v[2] * v + h.v[3] * g * g;
            const double r = (double)fo_lamb_r(h, x[FO_SLOT_PARAM], m, v);
            const double p = (double)x[FO_SLOT_PARAM];
            pp2 += p * p;
            rr2 += r * r;
        };
        fo_range_loop<T, FO_P_G | FO_STATES(2)>(ptr, begin, end, write, body);
        pp2 = fo_block_sum(pp2);
        rr2 = fo_block_sum(rr2);
        if (threadIdx.x == 0) {
            const fo_i64 c = tab.chunk_base[s] + tab.item_chunk[w];
            partial_p[c] = pp2;
            partial_r[c] = rr2;
        }
    }
}

// bytes per element: sizeof(T) * 4 (read p, m, v; write p)
template <class T>
__device__ __forceinline__ void fo_lamb_stage2(const FoTable& tab, const FoHyper<typename FoOpMath<T>::type>& h,
                                               const FoPipe<typename FoOpMath<T>::type>& pp,
                                               const double* p_sumsq, const double* r_sumsq) {
    typedef typename FoOpMath<T>::type O;
    const unsigned write = 1u << FO_SLOT_PARAM;
    for (int w = blockIdx.x; w < tab.n_items; w += gridDim.x) {
        T* ptr[FO_DEPTH];
        fo_i64 begin, end;
        const int s = fo_item(tab, w, ptr, begin, end);
        const double pn = sqrt(p_sumsq[tab.index[s]]), rn = sqrt(r_sumsq[tab.index[s]]);
        const double trust = (pn > 0 && rn > 0) ? pn / rn : 1.0;
        const O coef = O((double)h.v[8] * trust);
        auto body = [&](O (&x)[FO_DEPTH]) {
            O& p = x[FO_SLOT_PARAM];
            p = p - coef * fo_lamb_r(h, p, x[FO_SLOT_STATE0], x[FO_SLOT_STATE0 + 1]);
            if (pp.flags & FO_WEIGHT_CLIP) p = fo_clamp(p, pp.weight_clip);
        };
        fo_range_loop<T, FO_USES(FO_SLOT_PARAM) | FO_STATES(2)>(ptr, begin, end, write, body);
    }
}

// ------------------------------------------------------------------------ the kernels
// extern "C" names, so NVRTC, nvcc and the CPU harness all see the same symbols and no
// template name expressions are needed. Suffix: the storage type.
#define FO_UPDATE_KERNEL(NAME, RULE, T, SUF)                                                          \
    extern "C" __global__ void fo_update_##NAME##_##SUF(                                            \
        const FoTable tab, const FoHyper<FoOpMath<T>::type> h, const FoPipe<FoOpMath<T>::type> pp, \
        const double* scales) {                                                                    \
        fo_update<T, RULE>(tab, h, pp, scales);                                                    \
    }                                                                                              \
    FO_EXPORT(fo_update_##NAME##_##SUF)

#define FO_RULE_KERNELS(NAME, RULE)             \
    FO_UPDATE_KERNEL(NAME, RULE, float, f32)  \
    FO_UPDATE_KERNEL(NAME, RULE, double, f64)

FO_RULE_KERNELS(sgd, FoSGD)
FO_RULE_KERNELS(adam, FoAdam)  // Adam and AdamW (flag "decoupled")
FO_RULE_KERNELS(adagrad, FoAdagrad)
FO_RULE_KERNELS(rmsprop, FoRMSprop)
FO_RULE_KERNELS(adadelta, FoAdadelta)
FO_RULE_KERNELS(adamax, FoAdamax)
FO_RULE_KERNELS(nadam, FoNAdam)
FO_RULE_KERNELS(radam, FoRAdam)
FO_RULE_KERNELS(lion, FoLion)
FO_RULE_KERNELS(adahessian, FoAdaHessian)

#define FO_LAMB_KERNELS(T, SUF)                                                                    \
    extern "C" __global__ void fo_lamb_stage1_##SUF(                                               \
        const FoTable tab, const FoHyper<FoOpMath<T>::type> h, const FoPipe<FoOpMath<T>::type> pp, \
        const double* scales, double* partial_p, double* partial_r) {                             \
        fo_lamb_stage1<T>(tab, h, pp, scales, partial_p, partial_r);                              \
    }                                                                                              \
    FO_EXPORT(fo_lamb_stage1_##SUF)                                                                \
    extern "C" __global__ void fo_lamb_stage2_##SUF(                                               \
        const FoTable tab, const FoHyper<FoOpMath<T>::type> h, const FoPipe<FoOpMath<T>::type> pp, \
        const double* p_sumsq, const double* r_sumsq) {                                            \
        fo_lamb_stage2<T>(tab, h, pp, p_sumsq, r_sumsq);                                          \
    }                                                                                              \
    FO_EXPORT(fo_lamb_stage2_##SUF)

FO_LAMB_KERNELS(float, f32)
FO_LAMB_KERNELS(double, f64)
