// q8.cu -- the fused step of every rule with 8-bit block-quantized state (state_dtype="q8",
// fastopt.quantization: uint8 codes shaped like the param plus one float32 absmax per block of
// FO_QBLOCK elements, a partial last block allowed). One thread block per quant block, fused:
//
//   st = map[code] * absmax_old            (dequantize, float32; the rule's map per state)
//   the pipeline and the rule body in float32 (rules.cuh), the param written once (P::store,
//   P::store_sr, or the float32 master and its rounding), from the new UNquantized state
//   absmax_new = max |st| over the block   (fo_block_max: exact, NaN-propagating)
//   code = nearest map entry of st / absmax_new (the bucket table of
//          fastopt.quantization.nearest_code: one table load and one comparison), with the
//          sign guard (a negative value whose nearest code is the zero code gets the one below)
//
// Passes may be dry (write == false) exactly as in update.cu: LAMB's and LARS's norms, max_norm's
// norm.
// Work items are chunks of a multiple of FO_QBLOCK elements (the host makes them so), so a
// quant block never straddles two items. bytes per element: read p (or master) + g + 1 per
// state [+ extra]; write p [+ master] + 1 per state; plus 4 bytes per state per 256 elements.
#include "rules.cuh"

#define FO_QBLOCK 256      // fastopt.quantization.BLOCKSIZE
#define FO_QBUCKETS 2944   // buckets of the nearest-code table per sign
#define FO_QSTATES 3       // state slots

// fastopt.quantization.nearest_code (method "table") of a float32 y, for one map.
__device__ __forceinline__ unsigned fo_nearest_code(float y, const unsigned char* table, const float* thr) {
    const unsigned bits = fo_f2u(y);
    unsigned b = bits & 0x7fffffffu;
    b = b < 0x34000000u ? 0x34000000u : b;
    b = b > 0x3f7fffffu ? 0x3f7fffffu : b;
    b = (b - 0x34000000u) >> 16;
    const unsigned base = table[(bits >> 31) * FO_QBUCKETS + b];
    const unsigned code = base + (y > thr[base] ? 1u : 0u);
    return y != y ? 0u : code;
}

// The code of value v of a block whose new absmax is a (quantize_blockwise's per-element rule).
__device__ __forceinline__ unsigned char fo_q8_code(float v, float a, bool is_signed, const unsigned char* table,
                                                   const float* thr) {
    const float y = a == 0.0f ? 0.0f : v / a;  // an all-zero block: zero codes, no NaN
    unsigned c = fo_nearest_code(y, table, thr);
    if (is_signed && v < 0.0f && c == 127u) c = 126u;  // the sign guard
    return (unsigned char)c;
}

// The decoded value of a code: map[code] * absmax, one float32 multiply (dequantize_blockwise).
__device__ __forceinline__ float fo_q8_decode(unsigned char code, const float* map, float absmax) {
    return map[code] * absmax;
}

// Runs body(x) over each element of the quant blocks of [begin, end) of slot s, states
// dequantized into x, then (write) stores the param and requantizes each state's block.
template <class P, unsigned USED, class Body>
__device__ __forceinline__ void fo_q8_loop(const FoTable& tab, int s, fo_i64 begin, fo_i64 end, const FoStore& st,
                                           const FoQ8& q, bool write, Body& body) {
    typedef typename P::T PT;
    __shared__ float qbuf[FO_QSTATES][FO_QBLOCK];  // the new unquantized states of the block
    PT* const param = reinterpret_cast<PT*>(tab.ptr[FO_SLOT_PARAM][s]);
    const void* const grad = ((USED >> FO_SLOT_GRAD) & 1) ? reinterpret_cast<const void*>(tab.ptr[FO_SLOT_GRAD][s])
                                                           : nullptr;
    const void* const extra = ((USED >> FO_SLOT_EXTRA) & 1) ? reinterpret_cast<const void*>(tab.ptr[FO_SLOT_EXTRA][s])
                                                             : nullptr;
    float* const master = reinterpret_cast<float*>(tab.ptr[FO_SLOT_MASTER][s]);
    unsigned char* codes[FO_QSTATES];
    float* absmax[FO_QSTATES];
    const float* map[FO_QSTATES];
    const unsigned char* table[FO_QSTATES];
    const float* thr[FO_QSTATES];
#pragma unroll
    for (int k = 0; k < FO_QSTATES; ++k) {
        codes[k] = ((USED >> (FO_SLOT_STATE0 + k)) & 1)
                       ? reinterpret_cast<unsigned char*>(tab.ptr[FO_SLOT_STATE0 + k][s]) : nullptr;
        absmax[k] = codes[k] ? reinterpret_cast<float*>(q.absmax[(fo_i64)tab.index[s] * FO_QSTATES + k]) : nullptr;
        const int u = (q.unsigned_mask >> k) & 1;
        map[k] = q.maps + u * 256;
        table[k] = q.table + u * 2 * FO_QBUCKETS;
        thr[k] = q.thresholds + u * 255;
    }
    for (fo_i64 b0 = begin; b0 < end; b0 += FO_QBLOCK) {
        const fo_i64 b1 = b0 + FO_QBLOCK < end ? b0 + FO_QBLOCK : end;
        const fo_i64 qb = b0 / FO_QBLOCK;
        float old[FO_QSTATES], amax[FO_QSTATES];
#pragma unroll
        for (int k = 0; k < FO_QSTATES; ++k) {
            old[k] = codes[k] ? absmax[k][qb] : 0.0f;
            amax[k] = 0.0f;
        }
        for (fo_i64 i = b0 + threadIdx.x; i < b1; i += blockDim.x) {
            float x[FO_DEPTH];
            x[FO_SLOT_PARAM] = master ? master[i] : P::load(param[i]);
            x[FO_SLOT_GRAD] = fo_load_grad<P>(grad, i, st.flags & FO_ST_GRAD_F32);
            x[FO_SLOT_EXTRA] = fo_load_grad<P>(extra, i, st.flags & FO_ST_EXTRA_F32);
            x[FO_SLOT_MASTER] = 0.0f;
#pragma unroll
            for (int k = 0; k < FO_QSTATES; ++k)
                x[FO_SLOT_STATE0 + k] = codes[k] ? fo_q8_decode(codes[k][i], map[k], old[k]) : 0.0f;
            body(x);
            if (!write) continue;
#pragma unroll
            for (int k = 0; k < FO_QSTATES; ++k) {
                if (!codes[k]) continue;
                const float v = x[FO_SLOT_STATE0 + k];
                qbuf[k][i - b0] = v;
                amax[k] = fo_max(amax[k], fo_abs(v));
            }
            fo_store_param<P>(param, master, i, x[FO_SLOT_PARAM], st);
        }
        if (!write) continue;
#pragma unroll
        for (int k = 0; k < FO_QSTATES; ++k) {
            if (!codes[k]) continue;  // the same for every thread of the block
            const float a = fo_block_max(amax[k]);
            const bool is_signed = !((q.unsigned_mask >> k) & 1);
            // each thread requantizes the elements it computed: no barrier needed for qbuf
            for (fo_i64 i = b0 + threadIdx.x; i < b1; i += blockDim.x)
                codes[k][i] = fo_q8_code(qbuf[k][i - b0], a, is_signed, table[k], thr[k]);
            if (threadIdx.x == 0) absmax[k][qb] = a;
        }
    }
}

// Elementwise rule with q8 state (partial / factors: as fo_update_mixed in update.cu).
template <class P, class Rule, int STAGE>
__device__ __forceinline__ void fo_q8_update(const FoTable& tab, const FoHyper<float>& h, const FoPipe<float>& pp,
                                             const double* scales, const FoStore& st, const FoQ8& q, double* partial,
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
        fo_q8_loop<P, Rule::slots>(tab, s, begin, end, st, q, !dry, body);
        if (dry) fo_put_partial(tab, w, s, partial, fo_block_sum(acc));
    }
}

// Trust-ratio rule with q8 state: pass 1 (dry) sums p^2 and r^2; pass 2 applies the trust
// ratio, writes the param and requantizes the state (dry under max_norm's norm pass).
template <class P, class Rule>
__device__ __forceinline__ void fo_q8_trust1(const FoTable& tab, const FoHyper<float>& h, const FoPipe<float>& pp,
                                             const double* scales, const FoStore& st, const FoQ8& q,
                                             double* partial_p, double* partial_r) {
    for (int w = blockIdx.x; w < tab.n_items; w += gridDim.x) {
        const int s = tab.item_slot[w];
        const fo_i64 begin = (fo_i64)tab.item_chunk[w] * tab.chunk_size;
        const fo_i64 end = begin + tab.chunk_size < tab.size[s] ? begin + tab.chunk_size : tab.size[s];
        const float scale = scales ? (float)scales[tab.index[s]] : 1.0f;
        double pp2 = 0, rr2 = 0;
        auto body = [&](float (&x)[FO_DEPTH]) { fo_trust_norms<Rule>(h, pp, x, scale, pp2, rr2); };
        fo_q8_loop<P, Rule::slots>(tab, s, begin, end, st, q, false, body);
        pp2 = fo_block_sum(pp2);
        rr2 = fo_block_sum(rr2);
        fo_put_partial(tab, w, s, partial_p, pp2);
        fo_put_partial(tab, w, s, partial_r, rr2);
    }
}

template <class P, class Rule>
__device__ __forceinline__ void fo_q8_trust2(const FoTable& tab, const FoHyper<float>& h, const FoPipe<float>& pp,
                                             const double* scales, const FoStore& st, const FoQ8& q,
                                             const double* coefs, double* partial,
                                             const double* factors) {
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
        fo_q8_loop<P, Rule::slots>(tab, s, begin, end, st, q, !dry, body);
        if (dry) fo_put_partial(tab, w, s, partial, fo_block_sum(acc));
    }
}

// ------------------------------------------------------------------------ the kernels
// fastopt.quantization.quantize_blockwise of n float32 values on the device (state conversion,
// and the test of the nearest-code port): one thread block per quant block, grid-stride.
extern "C" __global__ void fo_q8_quantize(const float* x, const fo_i64 n, const FoQ8 q, const int is_unsigned,
                                          unsigned char* codes, float* absmax) {
    const unsigned char* table = q.table + (is_unsigned ? 2 * FO_QBUCKETS : 0);
    const float* thr = q.thresholds + (is_unsigned ? 255 : 0);
    const fo_i64 nb = (n + FO_QBLOCK - 1) / FO_QBLOCK;
    for (fo_i64 qb = blockIdx.x; qb < nb; qb += gridDim.x) {
        const fo_i64 b0 = qb * FO_QBLOCK, b1 = b0 + FO_QBLOCK < n ? b0 + FO_QBLOCK : n;
        float m = 0.0f;
        for (fo_i64 i = b0 + threadIdx.x; i < b1; i += blockDim.x) m = fo_max(m, fo_abs(x[i]));
        const float a = fo_block_max(m);
        for (fo_i64 i = b0 + threadIdx.x; i < b1; i += blockDim.x)
            codes[i] = fo_q8_code(x[i], a, !is_unsigned, table, thr);
        if (threadIdx.x == 0) absmax[qb] = a;
    }
}
FO_EXPORT(fo_q8_quantize)

// fastopt.quantization.dequantize_blockwise of n codes on the device (the widening driver's
// 8-bit state, fastopt/_widen.py): out[i] = map[codes[i]] * absmax[i / FO_QBLOCK], float32; the
// map is the signed one unless is_unsigned. Grid-stride over elements. bytes per element: 1 read
// + 4 written (and 4 read per 256 elements).
extern "C" __global__ void fo_q8_dequantize(const unsigned char* codes, const float* absmax, const fo_i64 n,
                                            const FoQ8 q, const int is_unsigned, float* out) {
    const float* map = q.maps + (is_unsigned ? 256 : 0);
    const fo_i64 stride = (fo_i64)gridDim.x * blockDim.x;
    for (fo_i64 i = (fo_i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        out[i] = fo_q8_decode(codes[i], map, absmax[i / FO_QBLOCK]);
}
FO_EXPORT(fo_q8_dequantize)

// fo_q8_update_<rule>_<param> and fo_q8_trust_stage{1,2}_<rule>_<param>, param f32, f16, bf16.
#define FO_Q8_ARGS const FoTable tab, const FoHyper<float> h, const FoPipe<float> pp, const double* scales, \
                   const FoStore st, const FoQ8 q

#define FO_Q8_UPDATE(NAME, RULE, P, SUF)                                                                  \
    extern "C" __global__ void fo_q8_update_##NAME##_##SUF(FO_Q8_ARGS, double* partial, const double* factors) { \
        fo_q8_update<P, RULE, FO_DECAY_OF_##NAME>(tab, h, pp, scales, st, q, partial, factors);          \
    }                                                                                                     \
    FO_EXPORT(fo_q8_update_##NAME##_##SUF)

#define FO_Q8_TRUST(NAME, RULE, P, SUF)                                                                   \
    extern "C" __global__ void fo_q8_trust_stage1_##NAME##_##SUF(FO_Q8_ARGS, double* partial_p,          \
                                                                 double* partial_r) {                    \
        fo_q8_trust1<P, RULE>(tab, h, pp, scales, st, q, partial_p, partial_r);                          \
    }                                                                                                     \
    FO_EXPORT(fo_q8_trust_stage1_##NAME##_##SUF)                                                          \
    extern "C" __global__ void fo_q8_trust_stage2_##NAME##_##SUF(FO_Q8_ARGS, const double* coefs,        \
                                                                 double* partial, const double* factors) { \
        fo_q8_trust2<P, RULE>(tab, h, pp, scales, st, q, coefs, partial, factors);            \
    }                                                                                                     \
    FO_EXPORT(fo_q8_trust_stage2_##NAME##_##SUF)

#define FO_Q8_ALL(M, NAME, RULE)   \
    M(NAME, RULE, FoF32, f32)      \
    M(NAME, RULE, FoF16, f16)      \
    M(NAME, RULE, FoBF16, bf16)

FO_Q8_ALL(FO_Q8_UPDATE, sgd, FoSGD)
FO_Q8_ALL(FO_Q8_UPDATE, adam, FoAdam)
FO_Q8_ALL(FO_Q8_UPDATE, adamw, FoAdam)
FO_Q8_ALL(FO_Q8_UPDATE, adagrad, FoAdagrad)
FO_Q8_ALL(FO_Q8_UPDATE, rmsprop, FoRMSprop)
FO_Q8_ALL(FO_Q8_UPDATE, adadelta, FoAdadelta)
FO_Q8_ALL(FO_Q8_UPDATE, adamax, FoAdamax)
FO_Q8_ALL(FO_Q8_UPDATE, nadam, FoNAdam)
FO_Q8_ALL(FO_Q8_UPDATE, radam, FoRAdam)
FO_Q8_ALL(FO_Q8_UPDATE, lion, FoLion)
FO_Q8_ALL(FO_Q8_UPDATE, adahessian, FoAdaHessian)
FO_Q8_ALL(FO_Q8_TRUST, lamb, FoLAMB)
FO_Q8_ALL(FO_Q8_TRUST, lars, FoLARS)  // pass 1 needs no state; the loop decodes it anyway (1 B/elem)
FO_Q8_ALL(FO_Q8_UPDATE, asgd, FoASGD)
FO_Q8_ALL(FO_Q8_UPDATE, rprop, FoRprop)
FO_Q8_ALL(FO_Q8_UPDATE, adabelief, FoAdaBelief)
FO_Q8_ALL(FO_Q8_UPDATE, yogi, FoYogi)
FO_Q8_ALL(FO_Q8_UPDATE, ademamix, FoAdEMAMix)
