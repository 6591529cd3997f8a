/* qat-q8's x forms (ggml's activation quantization, qat_round.h) written by
 * a warp: what k_act8 writes for a product, and what the kernels that
 * produce a one-token product's x (the HC collapse, the q norm, SwiGLU)
 * write beside it, so that the product needs no k_act8 launch of its own
 * (ten a decode layer, five on the main stream's chain: 0.12 ms a token on
 * an H200). The same functions, so the same bits. */
#pragma once

#include "common.cuh"
#include "qat_round.h"

/* The x forms of one product: rows [batch][row][n_in] (batch parts at
 * b * rows * n_in). */
struct act8_out {
    float *xr;                 /* rounded floats, or NULL */
    int8_t *q;                 /* codes, or NULL (then d and s16 unused) */
    float *d, *s16;            /* [.][n_in / 32] scales, [.][n_in / 16] code sums */
};

/* Weights whose products take x through k_act8 (ds4_act8_rounds). */
static inline bool act8_rounds(int type) {
    int t = base_type(type);
    return t == DS4_TYPE_Q8_0 || t == DS4_TYPE_Q2_K || t == DS4_TYPE_Q4_K || t == DS4_TYPE_IQ2_XXS;
}

/* A warp's 256 elements v (8 a lane, in order; element e + 8 lane .. of the
 * outputs) in the forms o asks for. Q8_0 (q8k 0): a block of 32 is 4 lanes,
 * and `live` the lanes holding elements (rows of n_in % 256 != 0 end on a
 * whole 32). Q8_K: the value of largest magnitude over the 256, the first
 * one on ties (ggml's rule); every lane live. */
__device__ __forceinline__ void act8_warp(float (&v)[8], unsigned live, int q8k, int64_t e, act8_out o) {
    int lane = threadIdx.x % WARP;
    float d, inv;
    if (!q8k) {
        float m = 0.0f;
#pragma unroll
        for (int i = 0; i < 8; i++) m = fmaxf(m, fabsf(v[i]));
        m = fmaxf(m, __shfl_xor_sync(live, m, 1));
        m = fmaxf(m, __shfl_xor_sync(live, m, 2));
        d = act8_q8_0_scale(m, &inv);
#pragma unroll
        for (int i = 0; i < 8; i++) v[i] = act8_q8_0_code(v[i], inv);
    } else {
        float m = -1.0f, val = 0.0f;
        int idx = 0;
#pragma unroll
        for (int i = 0; i < 8; i++)
            if (fabsf(v[i]) > m) m = fabsf(v[i]), val = v[i], idx = lane * 8 + i;
#pragma unroll
        for (int o2 = 16; o2 > 0; o2 >>= 1) {
            float m2 = __shfl_xor_sync(0xffffffffu, m, o2), v2 = __shfl_xor_sync(0xffffffffu, val, o2);
            int i2 = __shfl_xor_sync(0xffffffffu, idx, o2);
            if (m2 > m || (m2 == m && i2 < idx)) m = m2, val = v2, idx = i2;
        }
        d = act8_q8_k_scale(val, &inv);
#pragma unroll
        for (int i = 0; i < 8; i++) v[i] = act8_q8_k_code(v[i], inv);
    }
    if (o.xr) {
        *(float4 *)(o.xr + e) = make_float4(v[0] * d, v[1] * d, v[2] * d, v[3] * d);
        *(float4 *)(o.xr + e + 4) = make_float4(v[4] * d, v[5] * d, v[6] * d, v[7] * d);
    }
    if (o.q) {
        uint32_t lo = 0, hi = 0;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            lo |= ((uint32_t)(int)v[i] & 0xffu) << (8 * i);
            hi |= ((uint32_t)(int)v[i + 4] & 0xffu) << (8 * i);
        }
        *(uint2 *)(o.q + e) = make_uint2(lo, hi);
        if (lane % 4 == 0) o.d[e / 32] = d;
        /* the codes' sum over each 16 (2 lanes), exact: |sum| <= 2032 */
        float h = ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
        h += __shfl_xor_sync(live, h, 1);
        if (lane % 2 == 0) o.s16[e / 16] = h;
    }
}

/* A one-token product's x codes written by its producer (q set; xr unused):
 * q0 in Q8_0 form, qk in Q8_K form, either absent (q NULL). */
struct act8_pre {
    act8_out q0, qk;
};

/* Row x (n elements, a multiple of 256, written by this block before the
 * barrier here) into the forms of p at row offset e0: a warp a 256 block
 * of one form. Ends without a barrier. */
__device__ __forceinline__ void d_act8_row(const float *x, int n, act8_pre p, int64_t e0) {
    __syncthreads();   /* x's elements, written by the block's other threads */
    int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP, nw = blockDim.x / WARP, nb = n / 256;
    for (int j = warp; j < 2 * nb; j += nw) {
        int form = j / nb, b = j % nb;
        act8_out o = form ? p.qk : p.q0;
        if (!o.q) continue;
        float4 u0 = *(const float4 *)(x + 256 * b + 8 * lane), u1 = *(const float4 *)(x + 256 * b + 8 * lane + 4);
        float v[8] = {u0.x, u0.y, u0.z, u0.w, u1.x, u1.y, u1.z, u1.w};
        act8_warp(v, 0xffffffffu, form, e0 + 256 * b + 8 * lane, o);
    }
}
