// rules.cuh -- the per-element math of every rule: one __device__ step per rule (the formulas
// of fastopt/kernels/reference.py and docs/design.md), the formulas they share, and the
// weight-decay stage. Included by update.cu (float32/float64 and 16-bit kernels) and q8.cu
// (8-bit state kernels): the bodies exist once, templated on the arithmetic type O only.
//
// A step function reads its scalars by name, h.v[FO_S_<NAME>], and its flags by name,
// h.flag(FO_F_<NAME>); fastopt._rules.Rule.pack / flags list what each rule's host side fills.
// It sees the grad after the pipeline and the weight-decay stage, the param after decoupled
// decay, and states s0..s2: the rule's state arrays in fastopt._rules.Rule.all_state order
// (unused ones read as 0 and are not written). The storage type belongs to the memory loops.
#pragma once
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

// A trust-ratio rule (the two passes of update.cu and q8.cu): update_state(h, p, g, s0, s1, s2)
// in pass 1 (and again in the 16-bit and q8 pass 2, which recompute it), direction(h, p, g, s0,
// s1, s2) = the vector whose norm pass 1 sums with |p|'s, then apply(h, p, g, s0, s1, s2, coef)
// in pass 2 with coef the per-tensor scalar the host forms from the two norms
// (fastopt._rules.Rule.trust_coef). pass1_writes: the slots pass 1 stores (its state);
// pass2_slots / pass2_writes: what pass 2 of the uniform kernels loads and stores.
//
// LAMB: r = (m/bc1) / (sqrt(v)/sqrt(bc2) + eps) + weight_decay*p (its own decay: stage "rule"),
// p -= coef * r, coef = lr * |p|/|r| (1 if either is 0). The step is formed in C, the type of
// coef: the opmath type, or double in the 16-bit and q8 kernels (the reference's float32 p
// minus a float64 array, rounded once).
struct FoLAMB {
    enum : unsigned { slots = FO_P_G | FO_STATES(2), pass1_writes = FO_STATES(3),
                      pass2_slots = FO_USES(FO_SLOT_PARAM) | FO_STATES(2),
                      pass2_writes = FO_USES(FO_SLOT_PARAM) };
    template <class O>
    static __device__ __forceinline__ void update_state(const FoHyper<O>& h, O, O g, O& m, O& v, O&) {
        fo_moments(h, m, v, g, g);
    }
    template <class O>
    static __device__ __forceinline__ O direction(const FoHyper<O>& h, O p, O, O m, O v, O) {
        return (m / h.v[FO_S_BC1]) / fo_adam_denom(h, v) + h.v[FO_S_WEIGHT_DECAY] * p;
    }
    template <class O, class C>
    static __device__ __forceinline__ void apply(const FoHyper<O>& h, O& p, O g, O& m, O& v, O& s2, C coef) {
        p = O((C)p - coef * (C)direction(h, p, g, m, v, s2));
    }
};

// LARS (optax.lars): u = g + weight_decay*p (none when weight_decay is 0, as optax), pass 1
// writes nothing; pass 2: d = coef*u with coef = -(lr * trust) rounded to O (the reference's
// Python-float scalar times a float32 array is float32), m = d + momentum*m (optax's trace),
// p += m, or with nesterov p += d + momentum*m.
struct FoLARS {
    enum : unsigned { slots = FO_P_G | FO_STATES(1), pass1_writes = 0u, pass2_slots = slots,
                      pass2_writes = FO_USES(FO_SLOT_PARAM) | FO_STATES(1) };
    template <class O>
    static __device__ __forceinline__ void update_state(const FoHyper<O>&, O, O, O&, O&, O&) {}
    template <class O>
    static __device__ __forceinline__ O direction(const FoHyper<O>& h, O p, O g, O, O, O) {
        return h.v[FO_S_WEIGHT_DECAY] != O(0) ? g + h.v[FO_S_WEIGHT_DECAY] * p : g;
    }
    template <class O, class C>
    static __device__ __forceinline__ void apply(const FoHyper<O>& h, O& p, O g, O& m, O&, O&, C coef) {
        const O d = O(coef) * direction(h, p, g, m, m, m);
        m = d + h.v[FO_S_MOMENTUM] * m;
        p = h.flag(FO_F_NESTEROV) ? p + (d + h.v[FO_S_MOMENTUM] * m) : p + m;
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

// Schedule-Free (the schedulefree package): y = lerp(y, z, ckp1) in torch's form (lerp_swap:
// z + c*(y - z), else y + c*(z - y); c = c_lerp), then y += y_lr*u and z -= lr*u.
template <class O>
__device__ __forceinline__ void fo_sf_interpolate(const FoHyper<O>& h, O& p, O& z, O u) {
    p = h.flag(FO_F_LERP_SWAP) ? z + h.v[FO_S_C_LERP] * (p - z) : p + h.v[FO_S_C_LERP] * (z - p);
    p = p + h.v[FO_S_Y_LR] * u;
    z = z - h.v[FO_S_LR] * u;
}

// AdamWScheduleFree: v = b2*v + (1-b2)*g^2; u = g / (sqrt(v/bc2) + eps) (+ wd*y, the decay at
// y, guarded as the L2 stage); then fo_sf_interpolate.
struct FoSFAdamW {
    enum : unsigned { slots = FO_P_G | FO_STATES(2) };
    template <class O>
    static __device__ __forceinline__ void step(const FoHyper<O>& h, O& p, O g, O& z, O& v, O&, O) {
        v = fo_ema_sq(h.v[FO_S_BETA2], h.v[FO_S_ONE_MINUS_BETA2], v, g);
        O u = g / (fo_sqrt(v / h.v[FO_S_BC2]) + h.v[FO_S_EPS]);
        if (h.v[FO_S_WEIGHT_DECAY] != O(0)) u = u + h.v[FO_S_WEIGHT_DECAY] * p;
        fo_sf_interpolate(h, p, z, u);
    }
};

// SGDScheduleFree: the grad (with the L2 stage's wd*y) straight into fo_sf_interpolate.
struct FoSFSGD {
    enum : unsigned { slots = FO_P_G | FO_STATES(1) };
    template <class O>
    static __device__ __forceinline__ void step(const FoHyper<O>& h, O& p, O g, O& z, O&, O&, O) {
        fo_sf_interpolate(h, p, z, g);
    }
};

// ------------------------------------------------------------------ shared by the step kernels
// Kernel argument of the mixed-precision and q8 kernels: how the param is written and which
// inputs are float32 (a 16-bit param's grad and extra input are its dtype or float32).
enum { FO_ST_SR = 1, FO_ST_GRAD_F32 = 2, FO_ST_EXTRA_F32 = 4 };
struct FoStore {
    unsigned long long sr_key;  // fastopt.precision.step_key(seed, t) under stochastic rounding
    int flags;                  // FO_ST_*
};

// The q8 kernels' (q8.cu) tables. device addresses the host packs once per launch (fastopt/kernels/cuda/_host.py, Q8_DTYPE).
struct FoQ8 {
    const float* maps;               // [2][256]: the signed map, then the unsigned one
    const unsigned char* table;      // [2 maps][2 signs][FO_QBUCKETS]: code_table()
    const float* thresholds;         // [2 maps][255]: code_thresholds()
    const unsigned long long* absmax;  // [tensor index][FO_QSTATES]: its absmax array per state
    unsigned unsigned_mask;          // bit k: state k uses the unsigned map
};

// A grad or extra input: float32, or the param's format P; 0 where there is none.
template <class P>
__device__ __forceinline__ float fo_load_grad(const void* a, fo_i64 i, bool f32) {
    if (!a) return 0.0f;
    return f32 ? static_cast<const float*>(a)[i] : P::load(static_cast<const typename P::T*>(a)[i]);
}

// The one write of the param: the master copy as is and the param as its nearest-even
// rounding, or (no master) the param by nearest even or stochastically (FO_ST_SR).
template <class P>
__device__ __forceinline__ void fo_store_param(typename P::T* param, float* master, fo_i64 i, float p,
                                               const FoStore& st) {
    if (master) master[i] = p;
    param[i] = (st.flags & FO_ST_SR) ? P::store_sr(p, st.sr_key, i) : P::store(p);
}

// The tail every mixed and q8 step shares after the rule: weight_clip, then either the dry
// pass's sum of p^2 (acc) or max_norm's factor f, applied in double and rounded once to float32
// as the reference's float32 params times a float64 factor (f = 1 without max_norm: exact).
__device__ __forceinline__ void fo_finish_param(const FoPipe<float>& pp, float& p, bool dry, double& acc, double f) {
    if (pp.flags & FO_WEIGHT_CLIP) p = fo_clamp(p, pp.weight_clip);
    if (dry) acc += (double)p * (double)p;
    else p = (float)((double)p * f);
}

// Thread 0 of the block writes a chunk's partial sum (index chunk_base + chunk, as fo_finalize reads).
__device__ __forceinline__ void fo_put_partial(const FoTable& tab, int w, int s, double* partial, double v) {
    if (threadIdx.x == 0) partial[tab.chunk_base[s] + tab.item_chunk[w]] = v;
}

// A trust-ratio rule's element in a dry pass: the new state (in x, not stored) and the sums
// of p^2 and r^2.
template <class Rule>
__device__ __forceinline__ void fo_trust_norms(const FoHyper<float>& h, const FoPipe<float>& pp,
                                               float (&x)[FO_DEPTH], float scale, double& pp2, double& rr2) {
    const float p = x[FO_SLOT_PARAM];
    float* st = x + FO_SLOT_STATE0;
    const float g = fo_pre_grad(pp, x[FO_SLOT_GRAD], scale);
    Rule::update_state(h, p, g, st[0], st[1], st[2]);
    const double r = (double)Rule::direction(h, p, g, st[0], st[1], st[2]);
    pp2 += (double)p * (double)p;
    rr2 += r * r;
}

// ... and in the write pass: the same state, then the rule's apply with the per-tensor coef
// kept in double (see FoLAMB, FoLARS).
template <class Rule>
__device__ __forceinline__ void fo_trust_apply(const FoHyper<float>& h, const FoPipe<float>& pp,
                                               float (&x)[FO_DEPTH], float scale, double coef) {
    float& p = x[FO_SLOT_PARAM];
    float* st = x + FO_SLOT_STATE0;
    const float g = fo_pre_grad(pp, x[FO_SLOT_GRAD], scale);
    Rule::update_state(h, p, g, st[0], st[1], st[2]);
    Rule::apply(h, p, g, st[0], st[1], st[2], coef);
}
