// update.cu -- the fused update kernels: one __device__ step function per rule (the formulas of
// fastopt/kernels/reference.py and docs/design.md), and the kernel templates that run the step
// pipeline around them over a multi-tensor table: fo_update (elementwise rules) and the two
// passes of fo_trust_stage1/2 (trust-ratio rules, LAMB). Variants are runtime flags.
//
// A step function reads its scalars by name, h.v[FO_S_<NAME>], and its flags by name,
// h.flag(FO_F_<NAME>); fastopt._rules.Rule.pack / flags list what each rule's host side fills.
// It sees the grad after the pipeline and the weight-decay stage, the param after decoupled
// decay, and states s0..s2: the rule's state arrays in fastopt._rules.Rule.all_state order
// (unused ones read as 0 and are not written). The rule bodies are templated on the arithmetic
// type O only; the storage type belongs to the memory loop (fo_range_loop).
#include "fastopt.cuh"

// ----------------------------------------------------------------------- shared formulas
// The running average every moment of this file is: keep*s + gain*x (beta1, 1 - beta1 for
// Adam's m; alpha, 1 - alpha for RMSprop; momentum_keep, momentum_gain for SGD's buffer).
template <class O>
__device__ __forceinline__ O fo_ema(O keep, O gain, O s, O x) {
    return keep * s + gain * x;
}

// The same over a square: keep*s + gain*x*x, multiplied left to right as the reference does
// ((gain*x)*x, not gain*(x*x)), so both round alike.
template <class O>
__device__ __forceinline__ O fo_ema_sq(O keep, O gain, O s, O x) {
    return keep * s + gain * x * x;
}

// The Adam-family moments (reference: _moments), written once for Adam, AdamW, NAdam, RAdam,
// AdaHessian and LAMB: m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*x^2, x = g, or AdaHessian's
// Hessian diagonal.
template <class O>
__device__ __forceinline__ void fo_moments(const FoHyper<O>& h, O& m, O& v, O g, O x) {
    m = fo_ema(h.v[FO_S_BETA1], h.v[FO_S_ONE_MINUS_BETA1], m, g);
    v = fo_ema_sq(h.v[FO_S_BETA2], h.v[FO_S_ONE_MINUS_BETA2], v, x);
}

// sqrt(v / bc2) + eps, written sqrt(v) / sqrt(bc2) + eps as torch.optim.Adam does.
template <class O>
__device__ __forceinline__ O fo_adam_denom(const FoHyper<O>& h, O v) {
    return fo_sqrt(v) / h.v[FO_S_BC2_SQRT] + h.v[FO_S_EPS];
}

// The weight-decay stage (fastopt._rules.DECAY_KINDS), before the rule as in the reference's
// _per_tensor: L2 adds l2*p to the grad, decoupled decay multiplies p by decay = 1 - lr*wd.
// STAGE is the rule's FO_DECAY_OF_<rule> (generated from Rule.weight_decay), so a kernel holds
// only its own stage; the host sends l2 = 0 and decay = 1 for the others anyway. The l2 != 0
// guard is not an optimisation: with weight_decay = 0 an inf param must stay inf (0*inf is nan).
// The decay multiply needs no guard: times exactly 1 it changes nothing, inf and nan included
// (a branch there cost Lion 9 registers).
template <int STAGE, class O>
__device__ __forceinline__ void fo_decay_stage(const FoHyper<O>& h, O& p, O& g) {
    if (STAGE == FO_DECAY_L2 && h.v[FO_S_L2] != O(0)) g = g + h.v[FO_S_L2] * p;
    if (STAGE == FO_DECAY_DECOUPLED) p = p * h.v[FO_S_DECAY];
}

// ----------------------------------------------------------------------------- the rules
// Each struct: `slots`, the table slots its step reads (a compile-time mask: unused slots cost
// no loads and no registers), and step(h, p, g, s0, s1, s2, e).

// b = keep*b + gain*g (keep = 0, gain = 1 at t = 1 make b = g, as torch);
// g = g + momentum*b (nesterov) or b; p -= lr*g
struct FoSGD {
    enum : unsigned { slots = FO_P_G | FO_STATES(1) };
    template <class O>
    static __device__ __forceinline__ void step(const FoHyper<O>& h, O& p, O g, O& b, O&, O&, O) {
        if (h.flag(FO_F_HAS_MOMENTUM)) {
            b = fo_ema(h.v[FO_S_MOMENTUM_KEEP], h.v[FO_S_MOMENTUM_GAIN], b, g);
            g = h.flag(FO_F_NESTEROV) ? g + h.v[FO_S_MOMENTUM] * b : b;
        }
        p = p - h.v[FO_S_LR] * g;
    }
};

// Adam and AdamW (their difference is the decay stage): moments; AMSGrad keeps the running
// max of v; p -= step_size * m / (sqrt(v)/sqrt(bc2) + eps), step_size = lr/bc1
struct FoAdam {
    enum : unsigned { slots = FO_P_G | FO_STATES(3) };
    template <class O>
    static __device__ __forceinline__ void step(const FoHyper<O>& h, O& p, O g, O& m, O& v, O& vmax, O) {
        fo_moments(h, m, v, g, g);
        O vv = v;
        if (h.flag(FO_F_AMSGRAD)) {
            vmax = fo_max(vmax, v);
            vv = vmax;
        }
        p = p - h.v[FO_S_STEP_SIZE] * m / fo_adam_denom(h, vv);
    }
};

// sum += g^2; p -= clr * g / (sqrt(sum) + eps), clr = lr / (1 + (t-1)*lr_decay)
struct FoAdagrad {
    enum : unsigned { slots = FO_P_G | FO_STATES(1) };
    template <class O>
    static __device__ __forceinline__ void step(const FoHyper<O>& h, O& p, O g, O& sum, O&, O&, O) {
        sum = sum + g * g;
        p = p - h.v[FO_S_CLR] * g / (fo_sqrt(sum) + h.v[FO_S_EPS]);
    }
};

// sq = alpha*sq + (1-alpha)*g^2; centered: gavg likewise, d = sqrt(sq - gavg^2) + eps, else
// sqrt(sq) + eps; with momentum buf = momentum*buf + g/d, p -= lr*buf; else p -= lr*g/d
struct FoRMSprop {
    enum : unsigned { slots = FO_P_G | FO_STATES(3) };
    template <class O>
    static __device__ __forceinline__ void step(const FoHyper<O>& h, O& p, O g, O& sq, O& buf, O& gavg, O) {
        const O a = h.v[FO_S_ALPHA], oma = h.v[FO_S_ONE_MINUS_ALPHA];
        sq = fo_ema_sq(a, oma, sq, g);
        O d;
        if (h.flag(FO_F_CENTERED)) {
            gavg = fo_ema(a, oma, gavg, g);
            d = fo_sqrt(sq - gavg * gavg) + h.v[FO_S_EPS];
        } else {
            d = fo_sqrt(sq) + h.v[FO_S_EPS];
        }
        if (h.flag(FO_F_HAS_MOMENTUM)) {
            buf = h.v[FO_S_MOMENTUM] * buf + g / d;
            p = p - h.v[FO_S_LR] * buf;
        } else {
            p = p - h.v[FO_S_LR] * g / d;
        }
    }
};

// sq = rho*sq + (1-rho)*g^2; delta = sqrt(acc + eps)/sqrt(sq + eps)*g;
// acc = rho*acc + (1-rho)*delta^2; p -= lr*delta
struct FoAdadelta {
    enum : unsigned { slots = FO_P_G | FO_STATES(2) };
    template <class O>
    static __device__ __forceinline__ void step(const FoHyper<O>& h, O& p, O g, O& sq, O& acc, O&, O) {
        const O rho = h.v[FO_S_RHO], omr = h.v[FO_S_ONE_MINUS_RHO], eps = h.v[FO_S_EPS];
        sq = fo_ema_sq(rho, omr, sq, g);
        const O delta = fo_sqrt(acc + eps) / fo_sqrt(sq + eps) * g;
        acc = fo_ema_sq(rho, omr, acc, delta);
        p = p - h.v[FO_S_LR] * delta;
    }
};

// m = b1*m + (1-b1)*g; u = max(b2*u, |g| + eps); p -= clr * m/u, clr = lr/(1 - b1^t)
struct FoAdamax {
    enum : unsigned { slots = FO_P_G | FO_STATES(2) };
    template <class O>
    static __device__ __forceinline__ void step(const FoHyper<O>& h, O& p, O g, O& m, O& u, O&, O) {
        m = fo_ema(h.v[FO_S_BETA1], h.v[FO_S_ONE_MINUS_BETA1], m, g);
        u = fo_max(h.v[FO_S_BETA2] * u, fo_abs(g) + h.v[FO_S_EPS]);
        p = p - h.v[FO_S_CLR] * m / u;
    }
};

// moments; p -= c_grad*g/denom + c_avg*m/denom (torch.optim.NAdam's momentum schedule, folded
// into c_grad and c_avg on the host)
struct FoNAdam {
    enum : unsigned { slots = FO_P_G | FO_STATES(2) };
    template <class O>
    static __device__ __forceinline__ void step(const FoHyper<O>& h, O& p, O g, O& m, O& v, O&, O) {
        fo_moments(h, m, v, g, g);
        const O denom = fo_adam_denom(h, v);
        p = p - h.v[FO_S_C_GRAD] * g / denom;
        p = p - h.v[FO_S_C_AVG] * m / denom;
    }
};

// moments; rectified: p -= step_size * m / (sqrt(v) + eps), else p -= step_size * m
// (step_size carries the rectification and both bias corrections, see _rules._radam_scalars)
struct FoRAdam {
    enum : unsigned { slots = FO_P_G | FO_STATES(2) };
    template <class O>
    static __device__ __forceinline__ void step(const FoHyper<O>& h, O& p, O g, O& m, O& v, O&, O) {
        fo_moments(h, m, v, g, g);
        if (h.flag(FO_F_RECTIFY)) p = p - h.v[FO_S_STEP_SIZE] * m / (fo_sqrt(v) + h.v[FO_S_EPS]);
        else p = p - h.v[FO_S_STEP_SIZE] * m;
    }
};

// c = b1*m + (1-b1)*g; p -= lr*sign(c); m = b2*m + (1-b2)*g
struct FoLion {
    enum : unsigned { slots = FO_P_G | FO_STATES(1) };
    template <class O>
    static __device__ __forceinline__ void step(const FoHyper<O>& h, O& p, O g, O& m, O&, O&, O) {
        const O c = fo_ema(h.v[FO_S_BETA1], h.v[FO_S_ONE_MINUS_BETA1], m, g);
        p = p - h.v[FO_S_LR] * fo_sign(c);
        m = fo_ema(h.v[FO_S_BETA2], h.v[FO_S_ONE_MINUS_BETA2], m, g);
    }
};

// moments with v fed by the Hessian diagonal e (already unscaled);
// p -= step_size * m / ((sqrt(v)/sqrt(bc2))^hessian_power + eps)
struct FoAdaHessian {
    enum : unsigned { slots = FO_P_G | FO_STATES(2) | FO_USES(FO_SLOT_EXTRA) };
    template <class O>
    static __device__ __forceinline__ void step(const FoHyper<O>& h, O& p, O g, O& m, O& v, O&, O e) {
        fo_moments(h, m, v, g, e);
        O root = fo_sqrt(v) / h.v[FO_S_BC2_SQRT];
        if (h.v[FO_S_HESSIAN_POWER] != O(1)) root = fo_pow(root, h.v[FO_S_HESSIAN_POWER]);
        p = p - h.v[FO_S_STEP_SIZE] * m / (root + h.v[FO_S_EPS]);
    }
};

// LAMB, a trust-ratio rule: update_state(h, p, g, s0, s1, s2) in pass 1, direction(h, p, s0,
// s1, s2) = r in both passes, then p -= lr * trust * r, trust = |p|/|r| (1 if either is 0).
// r = (m/bc1) / (sqrt(v)/sqrt(bc2) + eps) + weight_decay*p (LAMB's own decay: stage "rule").
struct FoLAMB {
    enum : unsigned { slots = FO_P_G | FO_STATES(2) };
    template <class O>
    static __device__ __forceinline__ void update_state(const FoHyper<O>& h, O, O g, O& m, O& v, O&) {
        fo_moments(h, m, v, g, g);
    }
    template <class O>
    static __device__ __forceinline__ O direction(const FoHyper<O>& h, O p, O m, O v, O) {
        return (m / h.v[FO_S_BC1]) / fo_adam_denom(h, v) + h.v[FO_S_WEIGHT_DECAY] * p;
    }
};

// torch.optim.ASGD: p = p*(1 - lambd*eta) - eta*g (eta_decay = 1 - lambd*eta from the host);
// the average ax = p when mu == 1 (torch copies), else ax + (p - ax)*mu
struct FoASGD {
    enum : unsigned { slots = FO_P_G | FO_STATES(1) };
    template <class O>
    static __device__ __forceinline__ void step(const FoHyper<O>& h, O& p, O g, O& ax, O&, O&, O) {
        p = p * h.v[FO_S_ETA_DECAY] - h.v[FO_S_ETA] * g;
        ax = h.flag(FO_F_AVERAGE_COPY) ? p : ax + (p - ax) * h.v[FO_S_MU];
    }
};

// torch.optim.Rprop: d = g*prev; the step size is multiplied by etaplus (d > 0), etaminus
// (d < 0: the grad then counts as 0) or 1 (d == 0; nan stays nan), clamped to [min, max];
// p -= sign(g)*size; prev = g
struct FoRprop {
    enum : unsigned { slots = FO_P_G | FO_STATES(2) };
    template <class O>
    static __device__ __forceinline__ void step(const FoHyper<O>& h, O& p, O g, O& prev, O& size, O&, O) {
        const O d = g * prev;
        O si = size;
        if (d > O(0)) {
            si = si * h.v[FO_S_ETAPLUS];
        } else if (d < O(0)) {
            si = si * h.v[FO_S_ETAMINUS];
            g = O(0);
        } else if (d != d) {
            si = si * d;
        }
        if (si < h.v[FO_S_STEP_SIZE_MIN]) si = h.v[FO_S_STEP_SIZE_MIN];
        else if (si > h.v[FO_S_STEP_SIZE_MAX]) si = h.v[FO_S_STEP_SIZE_MAX];
        size = si;
        prev = g;
        p = p - (g > O(0) ? si : (g < O(0) ? -si : g * si));
    }
};

// optax.adabelief: m = b1*m + (1-b1)*g; s = b2*s + (1-b2)*(g - m)^2 + eps_root;
// d = sqrt(s)/sqrt(bc2) + eps; p -= c_avg*m/d, and with nesterov also c_grad*g/d
struct FoAdaBelief {
    enum : unsigned { slots = FO_P_G | FO_STATES(2) };
    template <class O>
    static __device__ __forceinline__ void step(const FoHyper<O>& h, O& p, O g, O& m, O& s, O&, O) {
        m = fo_ema(h.v[FO_S_BETA1], h.v[FO_S_ONE_MINUS_BETA1], m, g);
        const O r = g - m;
        s = fo_ema_sq(h.v[FO_S_BETA2], h.v[FO_S_ONE_MINUS_BETA2], s, r) + h.v[FO_S_EPS_ROOT];
        const O d = fo_adam_denom(h, s);
        p = p - h.v[FO_S_C_AVG] * m / d;
        if (h.flag(FO_F_NESTEROV)) p = p - h.v[FO_S_C_GRAD] * g / d;
    }
};

// optax.yogi: m = b1*m + (1-b1)*g; v = v - (1-b2)*sign(v - g^2)*g^2 (sign(nan) = nan);
// p -= step_size * m / (sqrt(v)/sqrt(bc2) + eps), step_size = lr/bc1
struct FoYogi {
    enum : unsigned { slots = FO_P_G | FO_STATES(2) };
    template <class O>
    static __device__ __forceinline__ void step(const FoHyper<O>& h, O& p, O g, O& m, O& v, O&, O) {
        m = fo_ema(h.v[FO_S_BETA1], h.v[FO_S_ONE_MINUS_BETA1], m, g);
        const O g2 = g * g, dv = v - g2;
        O w = h.v[FO_S_ONE_MINUS_BETA2];
        w = dv > O(0) ? w : (dv < O(0) ? -w : dv * O(0));
        v = v - w * g2;
        p = p - h.v[FO_S_STEP_SIZE] * m / fo_adam_denom(h, v);
    }
};

// AdEMAMix (Pagliardini et al. 2024): m1 = b1*m1 + (1-b1)*g, m2 = b3*m2 + (1-b3)*g (b3 and
// alpha after their warmups, on the host), nu = b2*nu + (1-b2)*g^2;
// p -= lr * (m1/bc1 + alpha*m2) / (sqrt(nu)/sqrt(bc2) + eps) (decoupled decay before)
struct FoAdEMAMix {
    enum : unsigned { slots = FO_P_G | FO_STATES(3) };
    template <class O>
    static __device__ __forceinline__ void step(const FoHyper<O>& h, O& p, O g, O& m1, O& m2, O& nu, O) {
        m1 = fo_ema(h.v[FO_S_BETA1], h.v[FO_S_ONE_MINUS_BETA1], m1, g);
        m2 = fo_ema(h.v[FO_S_BETA3], h.v[FO_S_ONE_MINUS_BETA3], m2, g);
        nu = fo_ema_sq(h.v[FO_S_BETA2], h.v[FO_S_ONE_MINUS_BETA2], nu, g);
        p = p - h.v[FO_S_LR] * ((m1 / h.v[FO_S_BC1] + h.v[FO_S_ALPHA] * m2) / fo_adam_denom(h, nu));
    }
};

// ------------------------------------------------------------------------ elementwise pass
// Bytes per element = sizeof(T) * (3 + 2 * states [+ 1 extra]): read p, g, states, extra;
// write p, states. Adam float32: 28 bytes, AMSGrad 36, SGD without momentum 12.
template <class T, class Rule, int STAGE>
__device__ __forceinline__ void fo_update(const FoTable& tab, const FoHyper<typename FoOpMath<T>::type>& h,
                                          const FoPipe<typename FoOpMath<T>::type>& pp,
                                          const double* scales) {
    typedef typename FoOpMath<T>::type O;
    const unsigned write = FO_USES(FO_SLOT_PARAM) | FO_STATES(3);
    for (int w = blockIdx.x; w < tab.n_items; w += gridDim.x) {
        T* ptr[FO_DEPTH];
        fo_i64 begin, end;
        const int s = fo_item(tab, w, ptr, begin, end);
        const O scale = scales ? O(scales[tab.index[s]]) : O(1);
        auto body = [&](O (&x)[FO_DEPTH]) {
            O& p = x[FO_SLOT_PARAM];
            O g = fo_pre_grad(pp, x[FO_SLOT_GRAD], scale);
            fo_decay_stage<STAGE>(h, p, g);
            Rule::step(h, p, g, x[FO_SLOT_STATE0], x[FO_SLOT_STATE0 + 1], x[FO_SLOT_STATE0 + 2],
                       x[FO_SLOT_EXTRA] * pp.inv_scale);
            if (pp.flags & FO_WEIGHT_CLIP) p = fo_clamp(p, pp.weight_clip);
        };
        fo_range_loop<T, Rule::slots>(ptr, begin, end, write, body);
    }
}

// ------------------------------------------------------------------------ trust-ratio passes
// Pass 1 updates the state and writes per-chunk float64 partial sums of p^2 and r^2
// (fo_finalize in reduce.cu sums them per tensor); pass 2 recomputes r from the new state
// (bit-identical to pass 1's, so no scratch array) and applies the trust ratio. A trust-ratio
// rule carries its own decay (the host refuses an "l2" or "decoupled" stage for this kind).

// bytes per element: sizeof(T) * (2 + 2 * states) (LAMB: read p, g, m, v; write m, v)
template <class T, class Rule>
__device__ __forceinline__ void fo_trust_stage1(const FoTable& tab,
                                                const FoHyper<typename FoOpMath<T>::type>& h,
                                                const FoPipe<typename FoOpMath<T>::type>& pp,
                                                const double* scales, double* partial_p, double* partial_r) {
    typedef typename FoOpMath<T>::type O;
    const unsigned write = FO_STATES(3);
    for (int w = blockIdx.x; w < tab.n_items; w += gridDim.x) {
        T* ptr[FO_DEPTH];
        fo_i64 begin, end;
        const int s = fo_item(tab, w, ptr, begin, end);
        const O scale = scales ? O(scales[tab.index[s]]) : O(1);
        double pp2 = 0, rr2 = 0;
        auto body = [&](O (&x)[FO_DEPTH]) {
            const O p = x[FO_SLOT_PARAM];
            O* st = x + FO_SLOT_STATE0;
            Rule::update_state(h, p, fo_pre_grad(pp, x[FO_SLOT_GRAD], scale), st[0], st[1], st[2]);
            const double r = (double)Rule::direction(h, p, st[0], st[1], st[2]);
            pp2 += (double)p * (double)p;
            rr2 += r * r;
        };
        fo_range_loop<T, Rule::slots>(ptr, begin, end, write, body);
        pp2 = fo_block_sum(pp2);
        rr2 = fo_block_sum(rr2);
        if (threadIdx.x == 0) {
            const fo_i64 c = tab.chunk_base[s] + tab.item_chunk[w];
            partial_p[c] = pp2;
            partial_r[c] = rr2;
        }
    }
}

// bytes per element: sizeof(T) * (2 + states) (LAMB: read p, m, v; write p)
template <class T, class Rule>
__device__ __forceinline__ void fo_trust_stage2(const FoTable& tab,
                                                const FoHyper<typename FoOpMath<T>::type>& h,
                                                const FoPipe<typename FoOpMath<T>::type>& pp,
                                                const double* p_sumsq, const double* r_sumsq) {
    typedef typename FoOpMath<T>::type O;
    const unsigned write = FO_USES(FO_SLOT_PARAM);
    for (int w = blockIdx.x; w < tab.n_items; w += gridDim.x) {
        T* ptr[FO_DEPTH];
        fo_i64 begin, end;
        const int s = fo_item(tab, w, ptr, begin, end);
        const double pn = sqrt(p_sumsq[tab.index[s]]), rn = sqrt(r_sumsq[tab.index[s]]);
        const double trust = (pn > 0 && rn > 0) ? pn / rn : 1.0;
        const O coef = O((double)h.v[FO_S_LR] * trust);
        auto body = [&](O (&x)[FO_DEPTH]) {
            O& p = x[FO_SLOT_PARAM];
            const O* st = x + FO_SLOT_STATE0;
            p = p - coef * Rule::direction(h, p, st[0], st[1], st[2]);
            if (pp.flags & FO_WEIGHT_CLIP) p = fo_clamp(p, pp.weight_clip);
        };
        fo_range_loop<T, Rule::slots & ~FO_USES(FO_SLOT_GRAD)>(ptr, begin, end, write, body);
    }
}

// ------------------------------------------------------------------------ the kernels
// extern "C" names, so NVRTC, nvcc and the CPU harness all see the same symbols and no
// template name expressions are needed. fastopt/kernels/cuda/_host.py derives a kernel's name
// from the rule's kind and name: fo_update_<rule>_<suffix> for an elementwise rule,
// fo_trust_stage{1,2}_<rule>_<suffix> for a trust-ratio rule; suffix: the storage type.
#define FO_ARGS(T) const FoTable tab, const FoHyper<FoOpMath<T>::type> h, const FoPipe<FoOpMath<T>::type> pp

#define FO_UPDATE_KERNEL(NAME, RULE, T, SUF)                                                \
    extern "C" __global__ void fo_update_##NAME##_##SUF(FO_ARGS(T), const double* scales) { \
        fo_update<T, RULE, FO_DECAY_OF_##NAME>(tab, h, pp, scales);                      \
    }                                                                                     \
    FO_EXPORT(fo_update_##NAME##_##SUF)

#define FO_ELEMENTWISE(NAME, RULE)            \
    FO_UPDATE_KERNEL(NAME, RULE, float, f32) \
    FO_UPDATE_KERNEL(NAME, RULE, double, f64)

#define FO_TRUST_KERNELS(NAME, RULE, T, SUF)                                                      \
    extern "C" __global__ void fo_trust_stage1_##NAME##_##SUF(FO_ARGS(T), const double* scales,  \
                                                              double* partial_p, double* partial_r) { \
        fo_trust_stage1<T, RULE>(tab, h, pp, scales, partial_p, partial_r);                      \
    }                                                                                             \
    FO_EXPORT(fo_trust_stage1_##NAME##_##SUF)                                                     \
    extern "C" __global__ void fo_trust_stage2_##NAME##_##SUF(FO_ARGS(T), const double* p_sumsq, \
                                                              const double* r_sumsq) {            \
        fo_trust_stage2<T, RULE>(tab, h, pp, p_sumsq, r_sumsq);                                  \
    }                                                                                             \
    FO_EXPORT(fo_trust_stage2_##NAME##_##SUF)

#define FO_TRUST_RATIO(NAME, RULE)             \
    FO_TRUST_KERNELS(NAME, RULE, float, f32) \
    FO_TRUST_KERNELS(NAME, RULE, double, f64)

FO_ELEMENTWISE(sgd, FoSGD)
FO_ELEMENTWISE(adam, FoAdam)
FO_ELEMENTWISE(adamw, FoAdam)
FO_ELEMENTWISE(adagrad, FoAdagrad)
FO_ELEMENTWISE(rmsprop, FoRMSprop)
FO_ELEMENTWISE(adadelta, FoAdadelta)
FO_ELEMENTWISE(adamax, FoAdamax)
FO_ELEMENTWISE(nadam, FoNAdam)
FO_ELEMENTWISE(radam, FoRAdam)
FO_ELEMENTWISE(lion, FoLion)
FO_ELEMENTWISE(adahessian, FoAdaHessian)
FO_TRUST_RATIO(lamb, FoLAMB)
FO_ELEMENTWISE(asgd, FoASGD)
FO_ELEMENTWISE(rprop, FoRprop)
FO_ELEMENTWISE(adabelief, FoAdaBelief)
FO_ELEMENTWISE(yogi, FoYogi)
FO_ELEMENTWISE(ademamix, FoAdEMAMix)
