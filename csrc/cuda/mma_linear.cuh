/* Prefill linear on the tensor cores: y[t][r] = sum_k W[r][k] x[t][k] for a
 * chunk of tokens, W in a block-quantized or 16-bit format.
 *
 * A block owns MM_BM weight rows (64 for float rows of small grids, below)
 * x MM_BN tokens and walks the inputs MM_BK at a time: its threads bring the
 * slice's raw weight bytes and x into registers one slice ahead (so the
 * loads fly while the tensor cores work), then decode them into shared
 * memory, and the warps multiply the tiles with
 * mma.sync m16n8k16 (bf16 in, fp32 accumulators).
 *
 * Precision: the CPU engine is float32, and issue 6 holds CUDA to 1e-3 of it
 * over 43 layers whose routers and indexers pick discrete top-k sets, so the
 * products must be float32-grade, not bf16-grade:
 *  - quantized rows go to the tensor cores as their integer codes (Q8_0's
 *    int8, Q2_K's 0..3, Q4_K's 0..15, IQ2_XXS's signed grid values: exact
 *    in bf16), and each 16-element sub-block's scale (and Q2_K / Q4_K's
 *    min, times the sub-block sum of x) is applied in fp32 afterwards;
 *  - F16 rows are split into two bf16 halves (8 + 3 significant bits: exact);
 *  - x is split into three bf16 parts, x = h + m + l (24 bits: float32).
 * Every code x part product is then exact, and only the fp32 summation
 * order differs from the CPU. Three tensor-core products per tile (five for
 * F16) still cost far less than re-dequantizing rows on the CUDA cores. */
#pragma once

#include <cuda_bf16.h>

#include "kernels.cuh"

#define MM_BM 128
#define MM_BN 64
#define MM_BK 32
#define MM_THREADS 256
#define MM_LD (MM_BK + 8)   /* bf16 per shared row: the pad puts a warp's fragment loads in 32 banks */

/* Formats this kernel takes (F32 weights keep the CUDA-core path: three
 * bf16 parts of a float32 weight would cost nine products). */
static inline bool mma_fits(const dmat &w) {
    int t = base_type(w.type);
    bool type_ok = t == DS4_TYPE_F16 || t == DS4_TYPE_BF16 || t == DS4_TYPE_Q8_0 ||
                   t == DS4_TYPE_Q2_K || t == DS4_TYPE_Q4_K || t == DS4_TYPE_IQ2_XXS;
    return type_ok && w.n_in % MM_BK == 0;
}

__device__ __forceinline__ void mma_bf16(float c[4], const uint32_t a[4], const uint32_t b[2]) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

/* Four 8 x 8 bf16 matrices from shared memory, lane l giving the address of
 * row l % 8 of matrix l / 8; each lane gets its fragment pair of each. */
__device__ __forceinline__ void ldsm_x4(uint32_t r[4], const __nv_bfloat16 *p) {
    ldsm_x4_at(r, (uint32_t)__cvta_generic_to_shared(p));
}

__device__ __forceinline__ uint32_t pack_bf16(float a, float b) {
    __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
    return *(uint32_t *)&v;
}

/* ---- one 8-element group of a row: raw bytes, then codes and scales ---- */

/* What a group needs from memory, loaded with no use yet (so the loads stay
 * in flight across the tile multiply). */
struct raw8 {
    uint32_t v[4];
};

template <int TYPE>
__device__ __forceinline__ void raw_load(const uint8_t *row, int n_in, int e0, raw8 &r) {
    constexpr int BT = base_type(TYPE);
    constexpr bool NARROW = TYPE & DEV_NARROW;
    if constexpr (BT == DS4_TYPE_F16 || BT == DS4_TYPE_BF16) {
        uint4 u = *(const uint4 *)((const uint16_t *)row + e0);
        r.v[0] = u.x, r.v[1] = u.y, r.v[2] = u.z, r.v[3] = u.w;
    } else if constexpr (BT == DS4_TYPE_Q8_0) {
        r.v[0] = *(const uint16_t *)(row + 2 * (e0 / 32));
        load8<NARROW>(row + 2 * (n_in / 32) + e0, r.v[1], r.v[2]);
    } else if constexpr (BT == DS4_TYPE_Q2_K) {
        int nb = n_in / 256, b = e0 / 256;
        int j = e0 % 256, n = j / 128, s = (j % 128) / 32, h = (j % 32) / 16, l0 = j % 16;
        load8<NARROW>(row + 20 * nb + 64 * b + 32 * n + 16 * h + l0, r.v[0], r.v[1]);
        r.v[2] = row[4 * nb + 16 * b + 8 * n + 2 * s + h];
        r.v[3] = *(const uint32_t *)(row + 4 * b);   /* d, dmin */
    } else if constexpr (BT == DS4_TYPE_Q4_K) {
        const uint8_t *b = row + (e0 / 256) * 144;
        int j = e0 % 256, c = j / 64, l0 = j % 32, sub = 2 * c + (j % 64) / 32;
        const uint8_t *s = b + 4, *q = b + 16 + 32 * c + l0;
        r.v[0] = d_u32(q);
        r.v[1] = d_u32(q + 4);
        r.v[2] = d_u32(b);
        r.v[3] = sub < 4 ? (uint32_t)s[sub] | (uint32_t)s[sub + 4] << 8
                         : (uint32_t)s[sub + 4] | (uint32_t)s[sub - 4] << 8 | (uint32_t)s[sub] << 16;
    } else if constexpr (BT == DS4_TYPE_IQ2_XXS) {
        int nb = n_in / 256, b = e0 / 256;
        load8<NARROW>(row + 2 * nb + 64 * b + 8 * ((e0 % 256) / 32), r.v[0], r.v[1]);
        r.v[2] = *(const uint16_t *)(row + 2 * b);
    }
}

/* The group's codes (exact small integers) as bf16 pairs in c[4], and w =
 * scale * code - mn for all 8. F16 / BF16 rows: c = the high bf16 halves,
 * lo = the rest (F16 only), scale 1. */
template <int TYPE>
__device__ __forceinline__ void raw_decode(const raw8 &r, int e0, uint32_t c[4], uint32_t lo[4],
                                           float &scale, float &mn, const uint64_t *grid,
                                           const uint8_t *signs) {
    constexpr int BT = base_type(TYPE);
    scale = 1.0f;
    mn = 0.0f;
    if constexpr (BT == DS4_TYPE_F16) {
#pragma unroll
        for (int i = 0; i < 4; i++) {
            float2 f = __half22float2(*(const __half2 *)&r.v[i]);
            __nv_bfloat162 h = __floats2bfloat162_rn(f.x, f.y);
            float2 back = __bfloat1622float2(h);
            c[i] = *(uint32_t *)&h;
            lo[i] = pack_bf16(f.x - back.x, f.y - back.y);
        }
    } else if constexpr (BT == DS4_TYPE_BF16) {
#pragma unroll
        for (int i = 0; i < 4; i++) c[i] = r.v[i];
    } else if constexpr (BT == DS4_TYPE_Q8_0) {
        scale = h2f_bits(r.v[0]);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            uint32_t w = r.v[1 + i / 2] >> (16 * (i % 2));
            c[i] = pack_bf16((float)(int8_t)(w & 0xff), (float)(int8_t)((w >> 8) & 0xff));
        }
    } else if constexpr (BT == DS4_TYPE_Q2_K) {
        int s = ((e0 % 256) % 128) / 32;
        uint32_t sc = r.v[2];
        scale = h2f_bits(r.v[3]) * (float)(sc & 0xf);
        mn = h2f_bits(r.v[3] >> 16) * (float)(sc >> 4);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            uint32_t w = r.v[i / 2] >> (16 * (i % 2));
            c[i] = pack_bf16((float)((w >> (2 * s)) & 3), (float)((w >> (8 + 2 * s)) & 3));
        }
    } else if constexpr (BT == DS4_TYPE_Q4_K) {
        int j = e0 % 256, hi = (j % 64) / 32, sub = 2 * (j / 64) + hi;
        uint32_t k = r.v[3], sc, m;
        if (sub < 4) {
            sc = k & 63;
            m = (k >> 8) & 63;
        } else {
            uint32_t s4 = k & 0xff, sm4 = (k >> 8) & 0xff, s0 = (k >> 16) & 0xff;
            sc = (s4 & 0x0f) | ((sm4 >> 6) << 4);
            m = (s4 >> 4) | ((s0 >> 6) << 4);
        }
        scale = h2f_bits(r.v[2]) * (float)sc;
        mn = h2f_bits(r.v[2] >> 16) * (float)m;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            uint32_t w = (r.v[i / 2] >> (16 * (i % 2))) >> (hi ? 4 : 0);
            c[i] = pack_bf16((float)(w & 0xf), (float)((w >> 8) & 0xf));
        }
    } else if constexpr (BT == DS4_TYPE_IQ2_XXS) {
        int k = ((e0 % 256) % 32) / 8;
        uint32_t a0 = r.v[0], a1 = r.v[1];
        scale = h2f_bits(r.v[2]) * (0.5f + (float)(a1 >> 28)) * 0.25f;
        uint64_t g = grid[(a0 >> (8 * k)) & 0xff];
        uint32_t sg = signs[(a1 >> (7 * k)) & 127];
#pragma unroll
        for (int i = 0; i < 4; i++) {
            float v0 = (float)((g >> (16 * i)) & 0xff), v1 = (float)((g >> (16 * i + 8)) & 0xff);
            c[i] = pack_bf16((sg >> (2 * i)) & 1 ? -v0 : v0, (sg >> (2 * i + 1)) & 1 ? -v1 : v1);
        }
    }
}

/* x = h + m + l as bf16 (the residual of each part goes to the next). */
__device__ __forceinline__ void split3(float a, float b, uint32_t &h, uint32_t &m, uint32_t &l) {
    __nv_bfloat162 hh = __floats2bfloat162_rn(a, b);
    float2 f = __bfloat1622float2(hh);
    a -= f.x, b -= f.y;
    __nv_bfloat162 mm = __floats2bfloat162_rn(a, b);
    f = __bfloat1622float2(mm);
    h = *(uint32_t *)&hh;
    m = *(uint32_t *)&mm;
    l = pack_bf16(a - f.x, b - f.y);
}

/* A warp's 32 rows x 8 J tokens of a block tile (128 x 64, J = 4; 64 x
 * 64, J = 2) into y (rows past n_out and tokens past the block's pairs
 * dropped). C fragment: c0, c1 at (row g, tokens 2tg, 2tg + 1), c2, c3 at
 * row g + 8. */
template <int J = 4>
__device__ __forceinline__ void block_tile_store(const float (&acc)[2][J][4], const lin_block &blk,
                                                 const lin_args &a, int r0, int t0, int wm, int wn, int g,
                                                 int tg) {
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < J; j++)
#pragma unroll
            for (int c = 0; c < 4; c++) {
                int r = r0 + wm * 32 + i * 16 + g + (c >= 2 ? 8 : 0);
                int p = t0 + wn * 8 * J + j * 8 + 2 * tg + (c & 1);
                if (r < a.w.n_out && p < blk.p1) blk.y[(int64_t)p * a.ys + r] = acc[i][j][c];
            }
}

/* Grid: (row tiles, token tiles, experts in use). Plain mode: tokens
 * 0..n_tok-1. Expert mode (a.active): blockIdx.z picks the expert, whose
 * grouped pairs are its tokens; the block walks them MM_BN at a time from
 * tile blockIdx.y, gridDim.y tiles apart.
 * BM: the block's rows, 128 (warps of 32 rows x 32 tokens) or 64 (32 rows x
 * 16 tokens: twice the blocks for a matrix of few rows, whose 128-row grid
 * left most SMs idle, as the router's 256 rows gave 64 blocks). Each
 * output's products and sums are the same either way: the same bits. */
template <int TYPE, int BM = MM_BM>
__global__ void __launch_bounds__(MM_THREADS, 2) k_linear_mma(lin_args a) {
    static_assert(BM == 128 || BM == 64, "k_linear_mma: 128- or 64-row tiles");
    pdl_begin();
    constexpr int BT = base_type(TYPE);
    constexpr bool FLOATW = BT == DS4_TYPE_F16 || BT == DS4_TYPE_BF16;
    constexpr bool WLO = BT == DS4_TYPE_F16;                  /* weights in two parts */
    constexpr bool MINS = BT == DS4_TYPE_Q2_K || BT == DS4_TYPE_Q4_K;
    /* warps along the rows (8 / RW along the tokens); a warp's 8-token tiles (MM_BN over 8 / RW warps) */
    constexpr int RW = BM / 32, J = RW;
    __shared__ __align__(16) __nv_bfloat16 wc[BM * MM_LD], wl[WLO ? BM * MM_LD : 8];
    __shared__ __align__(16) __nv_bfloat16 xs[3][MM_BN * MM_LD];
    __shared__ float scale_sh[BM][MM_BK / 16], min_sh[BM][MM_BK / 16];
    __shared__ float xsum[MM_BN][MM_BK / 16];
    __shared__ uint64_t grid_sh[BT == DS4_TYPE_IQ2_XXS ? 256 : 1];
    __shared__ uint8_t signs_sh[BT == DS4_TYPE_IQ2_XXS ? 128 : 1];
    int tid = threadIdx.x, warp = tid / WARP, lane = tid % WARP;
    int g = lane / 4, tg = lane % 4;        /* the fragment's row group, thread in group */
    int wm = warp % RW, wn = warp / RW;     /* the warp's 32 rows x 8 J tokens */
    int r0 = blockIdx.x * BM;
    lin_block blk;
    if (!lin_block_of(a, blockIdx.z, blk)) return;
    const uint8_t *base = blk.w;
    const int p0 = blk.p0, p1 = blk.p1;
    if constexpr (BT == DS4_TYPE_IQ2_XXS) {
        for (int i = tid; i < 256; i += MM_THREADS) grid_sh[i] = d_iq2_grid[i];
        if (tid < 128) signs_sh[tid] = d_iq2_signs[tid];
        /* the first decode below comes after a barrier */
    }
    /* each thread's share of a slice: weight groups of 8 (row, k) at rows
     * wr0 and (BM 128) wr0 + 64; one x group of 8 (token, k) */
    const int wr0 = tid / 4, wr1 = wr0 + 64, wk = (tid % 4) * 8;
    const uint8_t *wrow0 = base + (int64_t)min(r0 + wr0, a.w.n_out - 1) * a.w.row_bytes;
    const uint8_t *wrow1 = base + (int64_t)min(r0 + wr1, a.w.n_out - 1) * a.w.row_bytes;
    const int xt = tid / 4, xk = (tid % 4) * 8;

    for (int t0 = p0 + blockIdx.y * MM_BN; t0 < p1; t0 += gridDim.y * MM_BN) {
        int pt = t0 + xt < p1 ? t0 + xt : p1 - 1;   /* past the end: a real row, unused */
        const float *xrow = blk.x + (int64_t)(a.xrow ? a.xrow[pt] : pt) * a.xs;
        float acc[2][J][4];
#pragma unroll
        for (int i = 0; i < 2; i++)
#pragma unroll
            for (int j = 0; j < J; j++)
#pragma unroll
                for (int c = 0; c < 4; c++) acc[i][j][c] = 0.0f;

        raw8 q0, q1;
        float4 x0, x1;
        raw_load<TYPE>(wrow0, a.w.n_in, wk, q0);
        if constexpr (BM == 128) raw_load<TYPE>(wrow1, a.w.n_in, wk, q1);
        x0 = *(const float4 *)(xrow + xk);
        x1 = *(const float4 *)(xrow + xk + 4);
        __syncthreads();   /* the tables; the previous tile's last reads */
        for (int k0 = 0; k0 < a.w.n_in; k0 += MM_BK) {
            /* decode the slice in registers into shared memory */
            {
                uint32_t c[4], lo[4];
                float sc, mn;
                raw_decode<TYPE>(q0, k0 + wk, c, lo, sc, mn, grid_sh, signs_sh);
                *(uint4 *)&wc[wr0 * MM_LD + wk] = make_uint4(c[0], c[1], c[2], c[3]);
                if constexpr (WLO) *(uint4 *)&wl[wr0 * MM_LD + wk] = make_uint4(lo[0], lo[1], lo[2], lo[3]);
                scale_sh[wr0][wk / 16] = sc;   /* both groups of a 16 agree */
                min_sh[wr0][wk / 16] = mn;
                if constexpr (BM == 128) {
                    raw_decode<TYPE>(q1, k0 + wk, c, lo, sc, mn, grid_sh, signs_sh);
                    *(uint4 *)&wc[wr1 * MM_LD + wk] = make_uint4(c[0], c[1], c[2], c[3]);
                    if constexpr (WLO) *(uint4 *)&wl[wr1 * MM_LD + wk] = make_uint4(lo[0], lo[1], lo[2], lo[3]);
                    scale_sh[wr1][wk / 16] = sc;
                    min_sh[wr1][wk / 16] = mn;
                }
                uint32_t h[4], m[4], l[4];
                split3(x0.x, x0.y, h[0], m[0], l[0]);
                split3(x0.z, x0.w, h[1], m[1], l[1]);
                split3(x1.x, x1.y, h[2], m[2], l[2]);
                split3(x1.z, x1.w, h[3], m[3], l[3]);
                *(uint4 *)&xs[0][xt * MM_LD + xk] = make_uint4(h[0], h[1], h[2], h[3]);
                *(uint4 *)&xs[1][xt * MM_LD + xk] = make_uint4(m[0], m[1], m[2], m[3]);
                *(uint4 *)&xs[2][xt * MM_LD + xk] = make_uint4(l[0], l[1], l[2], l[3]);
                if constexpr (MINS) {
                    float s8 = ((x0.x + x0.y) + (x0.z + x0.w)) + ((x1.x + x1.y) + (x1.z + x1.w));
                    s8 += __shfl_xor_sync(0xffffffffu, s8, 1);   /* the other 8 of the 16 */
                    if (!(tid & 1)) xsum[xt][xk / 16] = s8;
                }
            }
            __syncthreads();
            if (k0 + MM_BK < a.w.n_in) {   /* the next slice's loads, in flight while we multiply */
                raw_load<TYPE>(wrow0, a.w.n_in, k0 + MM_BK + wk, q0);
                if constexpr (BM == 128) raw_load<TYPE>(wrow1, a.w.n_in, k0 + MM_BK + wk, q1);
                x0 = *(const float4 *)(xrow + k0 + MM_BK + xk);
                x1 = *(const float4 *)(xrow + k0 + MM_BK + xk + 4);
            }
#pragma unroll
            for (int ks = 0; ks < MM_BK; ks += 16) {
                /* fragments by ldmatrix: A's four 8 x 8 matrices are rows
                 * 0-7 / 8-15 x k 0-7 / 8-15 of the 16-row tile (a0..a3);
                 * B's, for two 8-token tiles, tokens x k 0-7 / 8-15 (b0, b1
                 * of each) */
                uint32_t af[2][4], al[2][4];
                float s_[2][2], m_[2][2];   /* [i][row g / g + 8] */
#pragma unroll
                for (int i = 0; i < 2; i++) {
                    int r = wm * 32 + i * 16 + g;
                    const int ra = wm * 32 + i * 16 + lane % 16, ka = ks + 8 * (lane / 16);
                    ldsm_x4(af[i], &wc[ra * MM_LD + ka]);
                    if constexpr (WLO) ldsm_x4(al[i], &wl[ra * MM_LD + ka]);
                    s_[i][0] = scale_sh[r][ks / 16];
                    s_[i][1] = scale_sh[r + 8][ks / 16];
                    m_[i][0] = min_sh[r][ks / 16];
                    m_[i][1] = min_sh[r + 8][ks / 16];
                }
#pragma unroll
                for (int jp = 0; jp < J / 2; jp++) {
                    uint32_t bq[3][4];   /* [part]: b0, b1 of token tile 2 jp, then of 2 jp + 1 */
                    const int tb = wn * 8 * J + (2 * jp + lane / 16) * 8 + lane % 8, kb = ks + 8 * ((lane / 8) % 2);
#pragma unroll
                    for (int part = 0; part < 3; part++) ldsm_x4(bq[part], &xs[part][tb * MM_LD + kb]);
#pragma unroll
                    for (int jj = 0; jj < 2; jj++) {
                        const int j = 2 * jp + jj;
                        uint32_t b[3][2];
#pragma unroll
                        for (int part = 0; part < 3; part++) b[part][0] = bq[part][2 * jj], b[part][1] = bq[part][2 * jj + 1];
                        float xs0 = 0, xs1 = 0;   /* sums of x over this 16 for tokens 2tg, 2tg + 1 */
                        if constexpr (MINS) {
                            xs0 = xsum[wn * 8 * J + j * 8 + 2 * tg][ks / 16];
                            xs1 = xsum[wn * 8 * J + j * 8 + 2 * tg + 1][ks / 16];
                        }
#pragma unroll
                        for (int i = 0; i < 2; i++) {
                            /* a 16's products from zero, then into the sum in
                             * fp32: the tensor cores' own adds truncate, which
                             * over a whole row would bias the sum */
                            float t4[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                            if constexpr (WLO) {
                                mma_bf16(t4, al[i], b[1]);
                                mma_bf16(t4, al[i], b[0]);
                            }
                            mma_bf16(t4, af[i], b[2]);
                            mma_bf16(t4, af[i], b[1]);
                            mma_bf16(t4, af[i], b[0]);
                            if constexpr (FLOATW) {
#pragma unroll
                                for (int c = 0; c < 4; c++) acc[i][j][c] += t4[c];
                            } else {
                                acc[i][j][0] = fmaf(s_[i][0], t4[0], acc[i][j][0]);
                                acc[i][j][1] = fmaf(s_[i][0], t4[1], acc[i][j][1]);
                                acc[i][j][2] = fmaf(s_[i][1], t4[2], acc[i][j][2]);
                                acc[i][j][3] = fmaf(s_[i][1], t4[3], acc[i][j][3]);
                                if constexpr (MINS) {
                                    acc[i][j][0] = fmaf(-m_[i][0], xs0, acc[i][j][0]);
                                    acc[i][j][1] = fmaf(-m_[i][0], xs1, acc[i][j][1]);
                                    acc[i][j][2] = fmaf(-m_[i][1], xs0, acc[i][j][2]);
                                    acc[i][j][3] = fmaf(-m_[i][1], xs1, acc[i][j][3]);
                                }
                            }
                        }
                    }
                }
            }
            __syncthreads();
        }
        block_tile_store<J>(acc, blk, a, r0, t0, wm, wn, g, tg);
    }
}

/* Token tiles of a launch: every tile of a plain chunk; for experts, enough
 * that an expert with twice its even share of the pairs is spread too. */
static inline unsigned mma_token_tiles(int n_tok, int pairs, int slots, bool experts) {
    int tiles = (n_tok + MM_BN - 1) / MM_BN;
    if (!experts) return (unsigned)tiles;
    int even = (pairs + slots - 1) / slots;
    int t = (2 * even + MM_BN - 1) / MM_BN;
    return (unsigned)std::max(1, std::min(t, tiles));
}
