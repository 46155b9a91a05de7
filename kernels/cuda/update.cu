// update.cu -- the fused update kernels of float32/float64 and 16-bit params: the kernel
// templates that run the step pipeline around the rule bodies of rules.cuh over a
// multi-tensor table: fo_update (elementwise rules) and the two passes of fo_trust_stage1/2
// (trust-ratio rules, LAMB), each in a uniform-precision form (fo_range_loop: one storage
// format for every array) and a mixed form for 16-bit params, reduced-precision state and
// master weights (fo_mixed_loop). Variants are runtime flags.
#include "rules.cuh"
// ------------------------------------------------------------------------ elementwise pass
// Bytes per element = sizeof(T) * (3 + 2 * states [+ 1 extra]): read p, g, states, extra;
// write p, states. Adam float32: 28 bytes, AMSGrad 36, SGD without momentum 12.
template <class F, class Rule, int STAGE>
__device__ __forceinline__ void fo_update(const FoTable& tab, const FoHyper<typename F::O>& h,
                                          const FoPipe<typename F::O>& pp, const double* scales) {
    typedef typename F::O O;
    const unsigned write = FO_USES(FO_SLOT_PARAM) | FO_STATES(3);
    for (int w = blockIdx.x; w < tab.n_items; w += gridDim.x) {
        typename F::T* ptr[FO_DEPTH];
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
        fo_range_loop<F, Rule::slots>(ptr, begin, end, write, body);
    }
}

// ------------------------------------------------------------------------ trust-ratio passes
// Pass 1 updates the state and writes per-chunk float64 partial sums of p^2 and r^2
// (fo_finalize in reduce.cu sums them per tensor); pass 2 recomputes r from the new state
// (bit-identical to pass 1's, so no scratch array) and applies the trust ratio. A trust-ratio
// rule carries its own decay (the host refuses an "l2" or "decoupled" stage for this kind).

// bytes per element: sizeof(T) * (2 + 2 * states) (LAMB: read p, g, m, v; write m, v)
template <class F, class Rule>
__device__ __forceinline__ void fo_trust_stage1(const FoTable& tab, const FoHyper<typename F::O>& h,
                                                const FoPipe<typename F::O>& pp, const double* scales,
                                                double* partial_p, double* partial_r) {
    typedef typename F::O O;
    const unsigned write = Rule::pass1_writes;
    for (int w = blockIdx.x; w < tab.n_items; w += gridDim.x) {
        typename F::T* ptr[FO_DEPTH];
        fo_i64 begin, end;
        const int s = fo_item(tab, w, ptr, begin, end);
        const O scale = scales ? O(scales[tab.index[s]]) : O(1);
        double pp2 = 0, rr2 = 0;
        auto body = [&](O (&x)[FO_DEPTH]) {
            const O p = x[FO_SLOT_PARAM];
            O* st = x + FO_SLOT_STATE0;
            const O g = fo_pre_grad(pp, x[FO_SLOT_GRAD], scale);
            Rule::update_state(h, p, g, st[0], st[1], st[2]);
            const double r = (double)Rule::direction(h, p, g, st[0], st[1], st[2]);
            pp2 += (double)p * (double)p;
            rr2 += r * r;
        };
        fo_range_loop<F, Rule::slots>(ptr, begin, end, write, body);
        pp2 = fo_block_sum(pp2);
        rr2 = fo_block_sum(rr2);
        if (threadIdx.x == 0) {
            const fo_i64 c = tab.chunk_base[s] + tab.item_chunk[w];
            partial_p[c] = pp2;
            partial_r[c] = rr2;
        }
    }
}

// bytes per element: LAMB sizeof(T) * (2 + states) (read p, m, v; write p); LARS read p, g, m,
// write p, m. coefs: the per-tensor scalar of Rule.trust_coef (double, rounded to O here).
template <class F, class Rule>
__device__ __forceinline__ void fo_trust_stage2(const FoTable& tab, const FoHyper<typename F::O>& h,
                                                const FoPipe<typename F::O>& pp, const double* scales,
                                                const double* coefs) {
    typedef typename F::O O;
    const unsigned write = Rule::pass2_writes;
    for (int w = blockIdx.x; w < tab.n_items; w += gridDim.x) {
        typename F::T* ptr[FO_DEPTH];
        fo_i64 begin, end;
        const int s = fo_item(tab, w, ptr, begin, end);
        const O coef = O(coefs[tab.index[s]]);
        const O scale = scales ? O(scales[tab.index[s]]) : O(1);
        auto body = [&](O (&x)[FO_DEPTH]) {
            O& p = x[FO_SLOT_PARAM];
            O* st = x + FO_SLOT_STATE0;
            const O g = (Rule::pass2_slots & FO_USES(FO_SLOT_GRAD)) ? fo_pre_grad(pp, x[FO_SLOT_GRAD], scale) : O(0);
            Rule::apply(h, p, g, st[0], st[1], st[2], coef);
            if (pp.flags & FO_WEIGHT_CLIP) p = fo_clamp(p, pp.weight_clip);
        };
        fo_range_loop<F, Rule::pass2_slots>(ptr, begin, end, write, body);
    }
}

// ------------------------------------------------------------------------ mixed precision
// 16-bit params (computed in float32), a state dtype other than the param's, master weights,
// stochastic rounding: P is the param's storage format, S the state's (template parameters of
// the memory loop, so each (P, S) pair is its own kernel and the rule bodies are shared). The
// grad and the extra input are P or float32 (FoStore flags). Every array is written once,
// rounded once: states S::store (nearest even), the master as float32, the param P::store of
// the new float32 value (of the master, when there is one) or P::store_sr.
//
// A pass may be "dry" (write == false): it computes the step and writes nothing, for a norm of
// the new params (max_norm, applied before the one rounding) or LAMB's trust ratio; the write
// pass then recomputes the same float32 values from the unchanged inputs.
// bytes per element: read p (or master) + g + states [+ extra]; write p [+ master] + states.
// Four consecutive elements of T: one 16-byte (float32) or 8-byte (16-bit) load or store.
template <class T> struct alignas(4 * sizeof(T)) FoQuad {
    T x[4];
};
template <class T>
__device__ __forceinline__ bool fo_quad_aligned(const void* a, fo_i64 begin, unsigned size) {
    return !a || (reinterpret_cast<unsigned long long>(a) + (unsigned long long)begin * size) % (4 * size) == 0;
}
template <class P>
__device__ __forceinline__ void fo_load_grad4(const void* a, fo_i64 i, bool f32, float (&x)[4][FO_DEPTH], int d) {
    if (!a) {
#pragma unroll
        for (int k = 0; k < 4; ++k) x[k][d] = 0.0f;
    } else if (f32) {
        const FoQuad<float> q = *reinterpret_cast<const FoQuad<float>*>(static_cast<const float*>(a) + i);
#pragma unroll
        for (int k = 0; k < 4; ++k) x[k][d] = q.x[k];
    } else {
        typedef typename P::T PT;
        const FoQuad<PT> q = *reinterpret_cast<const FoQuad<PT>*>(static_cast<const PT*>(a) + i);
#pragma unroll
        for (int k = 0; k < 4; ++k) x[k][d] = P::load(q.x[k]);
    }
}

// The memory loop of mixed storage: when every array is aligned to four of its elements at
// `begin`, a thread takes four consecutive elements per iteration (vector loads and stores of
// each array in its own width), then a scalar tail; element i's values, body and roundings
// are the same either way (the stochastic-rounding bits hash i itself).
template <class P, class S, unsigned USED, class Body>
__device__ __forceinline__ void fo_mixed_loop(const FoTable& tab, int s, fo_i64 begin, fo_i64 end,
                                              const FoStore& st, bool write, Body& body) {
    typedef typename P::T PT;
    typedef typename S::T ST;
    PT* const param = reinterpret_cast<PT*>(tab.ptr[FO_SLOT_PARAM][s]);
    const void* const grad = ((USED >> FO_SLOT_GRAD) & 1) ? reinterpret_cast<const void*>(tab.ptr[FO_SLOT_GRAD][s])
                                                           : nullptr;
    const void* const extra = ((USED >> FO_SLOT_EXTRA) & 1) ? reinterpret_cast<const void*>(tab.ptr[FO_SLOT_EXTRA][s])
                                                             : nullptr;
    float* const master = reinterpret_cast<float*>(tab.ptr[FO_SLOT_MASTER][s]);
    const bool g32 = st.flags & FO_ST_GRAD_F32, e32 = st.flags & FO_ST_EXTRA_F32;
    ST* state[3];
#pragma unroll
    for (int k = 0; k < 3; ++k)
        state[k] = ((USED >> (FO_SLOT_STATE0 + k)) & 1) ? reinterpret_cast<ST*>(tab.ptr[FO_SLOT_STATE0 + k][s])
                                                         : nullptr;
    bool aligned = fo_quad_aligned<PT>(param, begin, sizeof(PT)) && fo_quad_aligned<float>(master, begin, 4) &&
                   fo_quad_aligned<PT>(grad, begin, g32 ? 4 : sizeof(PT)) &&
                   fo_quad_aligned<PT>(extra, begin, e32 ? 4 : sizeof(PT));
#pragma unroll
    for (int k = 0; k < 3; ++k) aligned = aligned && fo_quad_aligned<ST>(state[k], begin, sizeof(ST));
    fo_i64 tail = begin;
    if (aligned) {
        const fo_i64 vend = begin + (end - begin) / 4 * 4;
        for (fo_i64 i = begin + (fo_i64)threadIdx.x * 4; i < vend; i += (fo_i64)blockDim.x * 4) {
            float x[4][FO_DEPTH];
            if (master) {
                const FoQuad<float> q = *reinterpret_cast<const FoQuad<float>*>(master + i);
#pragma unroll
                for (int k = 0; k < 4; ++k) x[k][FO_SLOT_PARAM] = q.x[k];
            } else {
                const FoQuad<PT> q = *reinterpret_cast<const FoQuad<PT>*>(param + i);
#pragma unroll
                for (int k = 0; k < 4; ++k) x[k][FO_SLOT_PARAM] = P::load(q.x[k]);
            }
            fo_load_grad4<P>(grad, i, g32, x, FO_SLOT_GRAD);
            fo_load_grad4<P>(extra, i, e32, x, FO_SLOT_EXTRA);
#pragma unroll
            for (int d = 0; d < 3; ++d) {
                FoQuad<ST> q = {};
                if (state[d]) q = *reinterpret_cast<const FoQuad<ST>*>(state[d] + i);
#pragma unroll
                for (int k = 0; k < 4; ++k) x[k][FO_SLOT_STATE0 + d] = state[d] ? S::load(q.x[k]) : 0.0f;
            }
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                x[k][FO_SLOT_MASTER] = 0.0f;
                body(x[k]);
            }
            if (!write) continue;
#pragma unroll
            for (int d = 0; d < 3; ++d) {
                if (!state[d]) continue;
                FoQuad<ST> q;
#pragma unroll
                for (int k = 0; k < 4; ++k) q.x[k] = S::store(x[k][FO_SLOT_STATE0 + d]);
                *reinterpret_cast<FoQuad<ST>*>(state[d] + i) = q;
            }
            if (master) {
                FoQuad<float> q;
#pragma unroll
                for (int k = 0; k < 4; ++k) q.x[k] = x[k][FO_SLOT_PARAM];
                *reinterpret_cast<FoQuad<float>*>(master + i) = q;
            }
            FoQuad<PT> q;
#pragma unroll
            for (int k = 0; k < 4; ++k)
                q.x[k] = (st.flags & FO_ST_SR) ? P::store_sr(x[k][FO_SLOT_PARAM], st.sr_key, i + k)
                                               : P::store(x[k][FO_SLOT_PARAM]);
            *reinterpret_cast<FoQuad<PT>*>(param + i) = q;
        }
        tail = vend;
    }
    for (fo_i64 i = tail + threadIdx.x; i < end; i += blockDim.x) {
        float x[FO_DEPTH];
        x[FO_SLOT_PARAM] = master ? master[i] : P::load(param[i]);
        x[FO_SLOT_GRAD] = fo_load_grad<P>(grad, i, g32);
        x[FO_SLOT_EXTRA] = fo_load_grad<P>(extra, i, e32);
        x[FO_SLOT_MASTER] = 0.0f;
#pragma unroll
        for (int k = 0; k < 3; ++k) x[FO_SLOT_STATE0 + k] = state[k] ? S::load(state[k][i]) : 0.0f;
        body(x);
        if (!write) continue;
#pragma unroll
        for (int k = 0; k < 3; ++k)
            if (state[k]) state[k][i] = S::store(x[FO_SLOT_STATE0 + k]);
        fo_store_param<P>(param, master, i, x[FO_SLOT_PARAM], st);
    }
}

// Elementwise rule, mixed storage. partial != null: the dry max_norm pass (per-chunk sums of
// the new p^2); factors != null: the write pass scales p by factors[tensor] before rounding.
template <class P, class S, class Rule, int STAGE>
__device__ __forceinline__ void fo_update_mixed(const FoTable& tab, const FoHyper<float>& h, const FoPipe<float>& pp,
                                                const double* scales, const FoStore& st, double* partial,
                                                const double* factors) {
    const bool dry = partial != nullptr;
    for (int w = blockIdx.x; w < tab.n_items; w += gridDim.x) {
        const int s = tab.item_slot[w];
        const fo_i64 begin = (fo_i64)tab.item_chunk[w] * tab.chunk_size;
        const fo_i64 end = begin + tab.chunk_size < tab.size[s] ? begin + tab.chunk_size : tab.size[s];
        const float scale = scales ? (float)scales[tab.index[s]] : 1.0f;
        const double f = factors ? factors[tab.index[s]] : 1.0;
        double acc = 0;
        auto body = [&](float (&x)[FO_DEPTH]) {
            float& p = x[FO_SLOT_PARAM];
            float g = fo_pre_grad(pp, x[FO_SLOT_GRAD], scale);
            fo_decay_stage<STAGE>(h, p, g);
            Rule::step(h, p, g, x[FO_SLOT_STATE0], x[FO_SLOT_STATE0 + 1], x[FO_SLOT_STATE0 + 2],
                       x[FO_SLOT_EXTRA] * pp.inv_scale);
            fo_finish_param(pp, p, dry, acc, f);
        };
        fo_mixed_loop<P, S, Rule::slots>(tab, s, begin, end, st, !dry, body);
        if (dry) fo_put_partial(tab, w, s, partial, fo_block_sum(acc));
    }
}

// Trust-ratio rule, mixed storage, pass 1: dry, sums of p^2 and r^2 per chunk. (Unlike the
// uniform pass 1 it writes no state: a state rounded to 16 bits would give pass 2 another r
// than the float32 one the reference takes, so pass 2 recomputes the state from the grad.)
template <class P, class S, class Rule>
__device__ __forceinline__ void fo_trust_mixed1(const FoTable& tab, const FoHyper<float>& h, const FoPipe<float>& pp,
                                                const double* scales, const FoStore& st, double* partial_p,
                                                double* partial_r) {
    for (int w = blockIdx.x; w < tab.n_items; w += gridDim.x) {
        const int s = tab.item_slot[w];
        const fo_i64 begin = (fo_i64)tab.item_chunk[w] * tab.chunk_size;
        const fo_i64 end = begin + tab.chunk_size < tab.size[s] ? begin + tab.chunk_size : tab.size[s];
        const float scale = scales ? (float)scales[tab.index[s]] : 1.0f;
        double pp2 = 0, rr2 = 0;
        auto body = [&](float (&x)[FO_DEPTH]) {
            fo_trust_norms<Rule>(h, pp, x, scale, pp2, rr2);
        };
        fo_mixed_loop<P, S, Rule::slots>(tab, s, begin, end, st, false, body);
        pp2 = fo_block_sum(pp2);
        rr2 = fo_block_sum(rr2);
        fo_put_partial(tab, w, s, partial_p, pp2);
        fo_put_partial(tab, w, s, partial_r, rr2);
    }
}

// Pass 2: the state again, then p -= lr * trust * r; dry (partial) or scaled (factors) as
// fo_update_mixed.
template <class P, class S, class Rule>
__device__ __forceinline__ void fo_trust_mixed2(const FoTable& tab, const FoHyper<float>& h, const FoPipe<float>& pp,
                                                const double* scales, const FoStore& st, const double* coefs,
                                                double* partial, const double* factors) {
    const bool dry = partial != nullptr;
    for (int w = blockIdx.x; w < tab.n_items; w += gridDim.x) {
        const int s = tab.item_slot[w];
        const fo_i64 begin = (fo_i64)tab.item_chunk[w] * tab.chunk_size;
        const fo_i64 end = begin + tab.chunk_size < tab.size[s] ? begin + tab.chunk_size : tab.size[s];
        const float scale = scales ? (float)scales[tab.index[s]] : 1.0f;
        const double coef = coefs[tab.index[s]];
        const double f = factors ? factors[tab.index[s]] : 1.0;
        double acc = 0;
        auto body = [&](float (&x)[FO_DEPTH]) {
            fo_trust_apply<Rule>(h, pp, x, scale, coef);
            fo_finish_param(pp, x[FO_SLOT_PARAM], dry, acc, f);
        };
        fo_mixed_loop<P, S, Rule::slots>(tab, s, begin, end, st, !dry, body);
        if (dry) fo_put_partial(tab, w, s, partial, fo_block_sum(acc));
    }
}

// ------------------------------------------------------------------------ the kernels
// extern "C" names, so NVRTC, nvcc and the CPU harness all see the same symbols and no
// template name expressions are needed. fastopt/kernels/cuda/_host.py derives a kernel's name
// from the rule's kind and name: fo_update_<rule>_<suffix> for an elementwise rule,
// fo_trust_stage{1,2}_<rule>_<suffix> for a trust-ratio rule; suffix: the storage type (f32,
// f64), or <param>_<state> for mixed storage (bf16_f32: bfloat16 params, float32 state).
#define FO_ARGS(F) const FoTable tab, const FoHyper<F::O> h, const FoPipe<F::O> pp

#define FO_UPDATE_KERNEL(NAME, RULE, F, SUF)                                                \
    extern "C" __global__ void fo_update_##NAME##_##SUF(FO_ARGS(F), const double* scales) { \
        fo_update<F, RULE, FO_DECAY_OF_##NAME>(tab, h, pp, scales);                      \
    }                                                                                     \
    FO_EXPORT(fo_update_##NAME##_##SUF)

#define FO_MIXED_KERNEL(NAME, RULE, P, S, SUF)                                                          \
    extern "C" __global__ void fo_update_##NAME##_##SUF(FO_ARGS(FoF32), const double* scales,          \
                                                        const FoStore st, double* partial,             \
                                                        const double* factors) {                       \
        fo_update_mixed<P, S, RULE, FO_DECAY_OF_##NAME>(tab, h, pp, scales, st, partial, factors);     \
    }                                                                                                   \
    FO_EXPORT(fo_update_##NAME##_##SUF)

// every (param, state) storage pair fastopt.precision allows beyond the uniform ones
#define FO_MIXED_ALL(M, NAME, RULE)          \
    M(NAME, RULE, FoF16, FoF32, f16_f32)     \
    M(NAME, RULE, FoF16, FoBF16, f16_bf16)   \
    M(NAME, RULE, FoF16, FoF16, f16_f16)     \
    M(NAME, RULE, FoBF16, FoF32, bf16_f32)   \
    M(NAME, RULE, FoBF16, FoBF16, bf16_bf16) \
    M(NAME, RULE, FoF32, FoBF16, f32_bf16)

#define FO_ELEMENTWISE(NAME, RULE)            \
    FO_UPDATE_KERNEL(NAME, RULE, FoF32, f32) \
    FO_UPDATE_KERNEL(NAME, RULE, FoF64, f64) \
    FO_MIXED_ALL(FO_MIXED_KERNEL, NAME, RULE)

#define FO_TRUST_KERNELS(NAME, RULE, F, SUF)                                                      \
    extern "C" __global__ void fo_trust_stage1_##NAME##_##SUF(FO_ARGS(F), const double* scales,  \
                                                              double* partial_p, double* partial_r) { \
        fo_trust_stage1<F, RULE>(tab, h, pp, scales, partial_p, partial_r);                      \
    }                                                                                             \
    FO_EXPORT(fo_trust_stage1_##NAME##_##SUF)                                                     \
    extern "C" __global__ void fo_trust_stage2_##NAME##_##SUF(FO_ARGS(F), const double* scales,  \
                                                              const double* coefs) {              \
        fo_trust_stage2<F, RULE>(tab, h, pp, scales, coefs);                                     \
    }                                                                                             \
    FO_EXPORT(fo_trust_stage2_##NAME##_##SUF)

#define FO_TRUST_MIXED(NAME, RULE, P, S, SUF)                                                         \
    extern "C" __global__ void fo_trust_stage1_##NAME##_##SUF(FO_ARGS(FoF32), const double* scales,  \
                                                              const FoStore st, double* partial_p,   \
                                                              double* partial_r) {                   \
        fo_trust_mixed1<P, S, RULE>(tab, h, pp, scales, st, partial_p, partial_r);                   \
    }                                                                                                 \
    FO_EXPORT(fo_trust_stage1_##NAME##_##SUF)                                                         \
    extern "C" __global__ void fo_trust_stage2_##NAME##_##SUF(                                        \
        FO_ARGS(FoF32), const double* scales, const FoStore st, const double* coefs,                  \
        double* partial, const double* factors) { \
        fo_trust_mixed2<P, S, RULE>(tab, h, pp, scales, st, coefs, partial, factors);     \
    }                                                                                                 \
    FO_EXPORT(fo_trust_stage2_##NAME##_##SUF)

#define FO_TRUST_RATIO(NAME, RULE)             \
    FO_TRUST_KERNELS(NAME, RULE, FoF32, f32) \
    FO_TRUST_KERNELS(NAME, RULE, FoF64, f64) \
    FO_MIXED_ALL(FO_TRUST_MIXED, NAME, RULE)

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
FO_ELEMENTWISE(schedule_free_adamw, FoSFAdamW)
FO_ELEMENTWISE(schedule_free_sgd, FoSFSGD)
FO_TRUST_RATIO(lars, FoLARS)
