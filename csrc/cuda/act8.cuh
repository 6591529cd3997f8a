/* The qat-q8 mode on the GPU: x quantized as ggml quantizes activations
 * (qat_round.h; Q8_0 blocks of 32 for Q8_0 weights, Q8_K blocks of 256 for
 * 2- and 4-bit ones), and a chunk's products of Q8_0 / IQ2_XXS / Q2_K rows
 * as one int8 tensor-core product a tile.
 *
 * k_act8 writes a product's x once, in the forms its kernel takes:
 *  - codes (int8, a row's n_in in element order), the scale of each 32
 *    (a Q8_K block's one scale repeated over its 8), and the codes' sum over
 *    each 16 (for Q2_K's sub-block minimums), for the int8 kernels: a
 *    chunk's k_linear_q8s / k_linear_2bit (act8_staged.cuh) or k_linear_q8x,
 *    a token's k_q8_mma1 / k_expert_mma1 (int8_decode.cuh);
 *  - or the rounded floats (code x scale) for every other kernel, which then
 *    multiplies them as it multiplies any x. */
#pragma once

#include "act8_codes.cuh"
#include "int8_decode.cuh"
#include "mma_linear.cuh"

/* A warp a block of 256 elements (8 a lane, in order), 8 warps a CTA; grid
 * (row, batch part, 2048-element stretch): act8_warp's forms of each. No
 * barriers: a one-token product's x is one short chain. */
__global__ void __launch_bounds__(256) k_act8(const float *x, int64_t xs, int64_t bx, int n_in, int q8k,
                                              act8_out o) {
    pdl_begin();
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    int row = blockIdx.x, part = blockIdx.y, rows = gridDim.x;
    int e0 = (blockIdx.z * 8 + warp) * 256 + lane * 8;   /* this lane's first element */
    if (e0 >= n_in) return;   /* Q8_0 rows of n_in % 256 != 0 end on a whole 32 (4 lanes) */
    const float *xr = x + part * bx + (int64_t)row * xs + e0;
    float4 u0 = *(const float4 *)xr, u1 = *(const float4 *)(xr + 4);
    float v[8] = {u0.x, u0.y, u0.z, u0.w, u1.x, u1.y, u1.z, u1.w};
    act8_warp(v, __ballot_sync(0xffffffffu, true), q8k, ((int64_t)part * rows + row) * n_in + e0, o);
}

/* ---- k_linear_q8x: tiles of 128 rows x 64 tokens, 32-element K slices ----
 * (the rows act8_staged.cuh's kernels do not take, and their A/B switches'
 * fallback: DS4_CUDA_NO_Q8S, _NO_IQ2S, _NO_Q2KS)
 * 8 warps of 32 rows x 32 tokens (2 x 4 m16n8k32 products a slice). A is a
 * row's 32 int8 weights of the slice (Q8_0 codes as stored, IQ2_XXS signed
 * grid values, Q2_K codes times their sub-block's 4-bit scale), B 8 tokens'
 * 32 codes; operands in shared memory in fragment element order (a lane's
 * 8 k are 8 consecutive bytes, int8_decode.cuh's map). The sums are exact
 * integers; where they become floats depends on where the scales change:
 *  - Q8_0: both scales change every 32, so each slice's sums go to the float
 *    accumulators times row scale x token scale;
 *  - IQ2_XXS: x's scale is one per 256, the row's (2 s + 1) / 8 d per 32: the
 *    slice's sums times 2 s + 1 add up as integers over the 256 block;
 *  - Q2_K: the codes carry the sub-block scales, so the tensor cores add the
 *    whole 256 block themselves; the minimums, sum_j m_j (x's code sum over
 *    sub-block j), are one fp16 product a block (exact: m <= 15, |sum| <= 2032).
 * A 256 block ends with one float step: acc += x scale (d I - dmin M). */
#define Q8X_BM 128
#define Q8X_BN 64
#define Q8X_THREADS 256

/* Rows whose code words are 8-byte aligned (DEV_NARROW rows take the float path). */
static inline bool q8x_fits(const dmat &w) {
    int t = w.type;
    return t == DS4_TYPE_Q8_0 || ((t == DS4_TYPE_IQ2_XXS || t == DS4_TYPE_Q2_K) && w.n_in % 1024 == 0);
}

/* Not volatile: the compiler may interleave independent products (the
 * kernels here came out the same either way; k_linear_f16s's chains want it). */
__device__ __forceinline__ void mma_f16(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                        uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

/* What a thread loads of one slice of a row (its 8 of the 32 weights,
 * quarter q), unused yet, so the loads fly while the tiles multiply. */
struct q8x_raw {
    uint2 q;         /* Q8_0: 8 codes; Q2_K: 8 code bytes; IQ2_XXS: the code word */
    uint32_t s, t;   /* Q8_0, IQ2_XXS: d; Q2_K: d | dmin << 16, and the sub-block's scale byte */
};

/* Slice k (32 elements) of a repacked row (common.cuh's layouts). */
template <int TYPE>
__device__ __forceinline__ void q8x_load(const uint8_t *row, int n_in, int k, int q, q8x_raw &r) {
    if constexpr (TYPE == DS4_TYPE_Q8_0) {
        r.q = *(const uint2 *)(row + 2 * (n_in / 32) + 32 * k + 8 * q);
        r.s = *(const uint16_t *)(row + 2 * k);
    } else if constexpr (TYPE == DS4_TYPE_IQ2_XXS) {
        int nb = n_in / 256;
        r.q = *(const uint2 *)(row + 2 * nb + 8 * k);   /* 64 b + 8 (k % 8) */
        r.s = *(const uint16_t *)(row + 2 * (k / 8));
    } else {   /* Q2_K slice k: 256-block b = k / 8, n = (k % 8) / 4, s = k % 4; sub-block q / 2 */
        int nb = n_in / 256, b = k / 8, n = (k % 8) / 4, s = k % 4;
        r.q = *(const uint2 *)(row + 20 * nb + 64 * b + 32 * n + 8 * q);
        r.s = *(const uint32_t *)(row + 4 * b);
        r.t = row[4 * nb + 16 * b + 8 * n + 2 * s + q / 2];
    }
}

/* The thread's 8 int8 weights (elements 8 q ..) into a, and the row's
 * scales of the slice: Q8_0 d; IQ2_XXS d / 8 and the integer 2 s + 1;
 * Q2_K d, dmin and sub-block q / 2's minimum m. */
template <int TYPE>
__device__ __forceinline__ void q8x_decode(const q8x_raw &r, int k, int q, uint2 &a, float &scale,
                                           float &scale2, int &mult, const uint64_t *grid,
                                           const uint8_t *signs) {
    if constexpr (TYPE == DS4_TYPE_Q8_0) {
        a = r.q;
        scale = h2f_bits(r.s);
    } else if constexpr (TYPE == DS4_TYPE_IQ2_XXS) {
        uint64_t gv = grid[(r.q.x >> (8 * q)) & 0xff];
        uint32_t sg = signs[(r.q.y >> (7 * q)) & 127];
        a = make_uint2(negate_bytes((uint32_t)gv, sg & 15), negate_bytes((uint32_t)(gv >> 32), sg >> 4));
        scale = h2f_bits(r.s) * 0.125f;
        mult = 2 * (int)(r.q.y >> 28) + 1;
    } else {
        int s = k % 4;
        uint32_t lo = r.t & 0xf;
        a = make_uint2(((r.q.x >> (2 * s)) & 0x03030303u) * lo, ((r.q.y >> (2 * s)) & 0x03030303u) * lo);
        scale = h2f_bits(r.s);
        scale2 = h2f_bits(r.s >> 16);
        mult = (int)(r.t >> 4);
    }
}

/* One 32-element slice of Q8_0 rows on a tile: acc += (A's codes . B's
 * codes) x row scale sr x token scale f, where both scales change every 32
 * (the exact integer sum read off the I2F_BIAS accumulator). */
__device__ __forceinline__ void q8_slice_product(float (&acc)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
                                                 const float (&sr)[2], float f0, float f1) {
    int d[4];
    mma_s8_from(d, I2F_BIAS_BITS, a[0], a[1], a[2], a[3], b0, b1);
#pragma unroll
    for (int c = 0; c < 4; c++)
        acc[c] = fmaf(__int_as_float(d[c]) - I2F_BIAS, sr[c / 2] * (c % 2 ? f1 : f0), acc[c]);
}

/* The same from a lane's 8 bytes of rows g and g + 8 (af[0], af[1]) and of
 * column g (b): the MMA's k order permuted alike in A and B. */
__device__ __forceinline__ void q8_slice_product(float (&acc)[4], const uint2 (&af)[2], uint2 b,
                                                 const float (&sr)[2], float f0, float f1) {
    const uint32_t a[4] = {af[0].x, af[1].x, af[0].y, af[1].y};
    q8_slice_product(acc, a, b.x, b.y, sr, f0, f1);
}

/* Grid: (row tiles, token tiles, experts in use or 1), as k_linear_mma.
 * x rows: a.xrow[p] for pair p, else p; a.q8, a.q8d, a.q8s their forms. */
template <int TYPE>
__global__ void __launch_bounds__(Q8X_THREADS, 2) k_linear_q8x(lin_args a) {
    pdl_begin();
    constexpr bool IQ2 = TYPE == DS4_TYPE_IQ2_XXS, Q2K = TYPE == DS4_TYPE_Q2_K, Q80 = TYPE == DS4_TYPE_Q8_0;
    __shared__ __align__(16) uint8_t wa[Q8X_BM * 32];   /* a row's 32 weights */
    __shared__ __align__(16) uint8_t xb[Q8X_BN * 32];   /* a token's 32 codes */
    __shared__ float wsc[Q8X_BM], wsc2[Q2K ? Q8X_BM : 1], xf[Q8X_BN];
    __shared__ int wmul[IQ2 ? Q8X_BM : 1];
    /* Q2_K: a block's 16 sub-block minimums a row, and code sums a token, fp16 */
    __shared__ __align__(16) __half wmin[Q2K ? Q8X_BM : 1][16 + 8], xsm[Q2K ? Q8X_BN : 1][16 + 8];
    __shared__ uint64_t grid_sh[IQ2 ? 256 : 1];
    __shared__ uint8_t signs_sh[IQ2 ? 128 : 1];
    int tid = threadIdx.x, warp = tid / WARP, lane = tid % WARP;
    int g = lane / 4, tg = lane % 4;
    int wm = warp % 4, wn = warp / 4;   /* the warp's 32 rows x 32 tokens */
    int r0 = blockIdx.x * Q8X_BM;
    lin_block blk;
    if (!lin_block_of(a, blockIdx.z, blk)) return;
    if constexpr (IQ2) {
        for (int i = tid; i < 256; i += Q8X_THREADS) grid_sh[i] = d_iq2_grid[i];
        if (tid < 128) signs_sh[tid] = d_iq2_signs[tid];
        /* read after the first barrier below */
    }
    /* each thread's share of a slice: quarter q of rows wr, wr + 64 and of token xt */
    const int wr = tid / 4, xt = tid / 4, q = tid % 4;
    const uint8_t *wrow0 = blk.w + (int64_t)min(r0 + wr, a.w.n_out - 1) * a.w.row_bytes;
    const uint8_t *wrow1 = blk.w + (int64_t)min(r0 + wr + 64, a.w.n_out - 1) * a.w.row_bytes;
    const int n_in = a.w.n_in, nk = n_in / 32;

    for (int t0 = blk.p0 + blockIdx.y * Q8X_BN; t0 < blk.p1; t0 += gridDim.y * Q8X_BN) {
        int pt = t0 + xt < blk.p1 ? t0 + xt : blk.p1 - 1;   /* past the end: a real row, unused */
        int64_t xr = a.xrow ? a.xrow[pt] : pt;
        const int8_t *xcodes = a.q8 + xr * n_in;
        const float *xds = a.q8d + xr * (n_in / 32), *xss = a.q8s + xr * (n_in / 16);
        float acc[2][4][4];   /* [row frag][token frag][c]: rows g, g + 8 x tokens 2tg, 2tg + 1 */
        int iacc[2][4][4];    /* IQ2_XXS / Q2_K: the 256 block's integer sums */
#pragma unroll
        for (int i = 0; i < 2; i++)
#pragma unroll
            for (int j = 0; j < 4; j++)
#pragma unroll
                for (int c = 0; c < 4; c++) acc[i][j][c] = 0.0f, iacc[i][j][c] = Q2K ? I2F_BIAS_BITS : 0;

        q8x_raw raw0, raw1;
        q8x_load<TYPE>(wrow0, n_in, 0, q, raw0);
        q8x_load<TYPE>(wrow1, n_in, 0, q, raw1);
        uint2 xv = *(const uint2 *)(xcodes + 8 * q);
        float xd = xds[0], xs2 = Q2K ? xss[q / 2] : 0.0f;
        __syncthreads();   /* the tables; the previous tile's last reads */
        for (int k = 0; k < nk; k++) {
            {
                uint2 w2;
                float sc, sc2 = 0.0f;
                int mult = 0;
                q8x_decode<TYPE>(raw0, k, q, w2, sc, sc2, mult, grid_sh, signs_sh);
                *(uint2 *)&wa[wr * 32 + 8 * q] = w2;
                if (q == 0) wsc[wr] = sc;
                if (IQ2 && q == 0) wmul[wr] = mult;
                if (Q2K && q % 2 == 0) wmin[wr][2 * (k % 8) + q / 2] = __int2half_rn(mult);
                if (Q2K && q == 0) wsc2[wr] = sc2;
                q8x_decode<TYPE>(raw1, k, q, w2, sc, sc2, mult, grid_sh, signs_sh);
                *(uint2 *)&wa[(wr + 64) * 32 + 8 * q] = w2;
                if (q == 0) wsc[wr + 64] = sc;
                if (IQ2 && q == 0) wmul[wr + 64] = mult;
                if (Q2K && q % 2 == 0) wmin[wr + 64][2 * (k % 8) + q / 2] = __int2half_rn(mult);
                if (Q2K && q == 0) wsc2[wr + 64] = sc2;
                *(uint2 *)&xb[xt * 32 + 8 * q] = xv;
                if (q == 0) xf[xt] = xd;
                if (Q2K && q % 2 == 0) xsm[xt][2 * (k % 8) + q / 2] = __float2half_rn(xs2);
            }
            __syncthreads();
            if (k + 1 < nk) {   /* the next slice's loads, in flight while we multiply */
                q8x_load<TYPE>(wrow0, n_in, k + 1, q, raw0);
                q8x_load<TYPE>(wrow1, n_in, k + 1, q, raw1);
                xv = *(const uint2 *)(xcodes + 32 * (k + 1) + 8 * q);
                xd = xds[k + 1];
                if (Q2K) xs2 = xss[2 * (k + 1) + q / 2];
            }
            uint2 af[2][2];   /* [row frag][row g / g + 8]: elements 8tg.. */
            float sr[2][2];
            int mr[2][2];
#pragma unroll
            for (int i = 0; i < 2; i++)
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    int r = wm * 32 + i * 16 + g + 8 * h;
                    af[i][h] = *(const uint2 *)&wa[r * 32 + 8 * tg];
                    if constexpr (Q80) sr[i][h] = wsc[r];
                    if constexpr (IQ2) mr[i][h] = wmul[r];
                }
#pragma unroll
            for (int j = 0; j < 4; j++) {
                int tb = wn * 32 + j * 8;
                uint2 b = *(const uint2 *)&xb[(tb + g) * 32 + 8 * tg];   /* B column g: token tb + g */
                float f0 = 0, f1 = 0;
                if constexpr (Q80) f0 = xf[tb + 2 * tg], f1 = xf[tb + 2 * tg + 1];
#pragma unroll
                for (int i = 0; i < 2; i++) {
                    if constexpr (Q2K) {
                        mma_s8(iacc[i][j], af[i][0].x, af[i][1].x, af[i][0].y, af[i][1].y, b.x, b.y);
                    } else if constexpr (IQ2) {
                        int d[4];
                        mma_s8_from(d, 0, af[i][0].x, af[i][1].x, af[i][0].y, af[i][1].y, b.x, b.y);
#pragma unroll
                        for (int c = 0; c < 4; c++) iacc[i][j][c] += d[c] * mr[i][c / 2];
                    } else {
                        q8_slice_product(acc[i][j], af[i], b, sr[i], f0, f1);
                    }
                }
            }
            if (!Q80 && k % 8 == 7) {   /* the 256 block's end: its sums to floats */
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    int tb = wn * 32 + j * 8;
                    float f0 = xf[tb + 2 * tg], f1 = xf[tb + 2 * tg + 1];
                    uint32_t b0 = 0, b1 = 0;
                    if constexpr (Q2K) {   /* B: code sums, 16 sub-blocks x 8 tokens (column g) */
                        b0 = *(const uint32_t *)&xsm[tb + g][2 * tg];
                        b1 = *(const uint32_t *)&xsm[tb + g][2 * tg + 8];
                    }
#pragma unroll
                    for (int i = 0; i < 2; i++) {
                        int rr = wm * 32 + i * 16 + g;
                        float m4[4] = {0, 0, 0, 0};
                        if constexpr (Q2K)
                            mma_f16(m4, *(const uint32_t *)&wmin[rr][2 * tg], *(const uint32_t *)&wmin[rr + 8][2 * tg],
                                    *(const uint32_t *)&wmin[rr][2 * tg + 8],
                                    *(const uint32_t *)&wmin[rr + 8][2 * tg + 8], b0, b1);
#pragma unroll
                        for (int c = 0; c < 4; c++) {
                            int r = rr + 8 * (c / 2);
                            float sum = Q2K ? __int_as_float(iacc[i][j][c]) - I2F_BIAS : (float)iacc[i][j][c];
                            float v = wsc[r] * sum;
                            if constexpr (Q2K) v = fmaf(-wsc2[r], m4[c], v);
                            acc[i][j][c] = fmaf(c % 2 ? f1 : f0, v, acc[i][j][c]);
                            iacc[i][j][c] = Q2K ? I2F_BIAS_BITS : 0;
                        }
                    }
                }
            }
            __syncthreads();
        }
        block_tile_store(acc, blk, a, r0, t0, wm, wn, g, tg);
    }
}
