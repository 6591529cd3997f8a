/* One-token products of Q8_0, IQ2_XXS and Q2_K rows on the int8 tensor
 * cores (the routed experts' kinds below k_q8_mma1).
 *
 * A Q8_0 block (32 int8 codes, one fp16 scale d) is already the A operand
 * of mma.sync m16n8k32 s8: the codes go to the tensor cores as loaded, with
 * no conversion. x is the B operand, split per 32-element block into four
 * int8 parts over a power-of-two scale f (x_k = f * sum_p c_pk 2^-7p, 28
 * bits: exact to 2^-28 of the block's largest |x|), the parts in B's
 * columns 0..3. So each product code x part is an exact int32 sum, and
 *   y_r = sum_blocks d_rb * f_b * sum_p D_rbp * 2^-7p
 * is float32 arithmetic over exact integers: the one-token Q8_0 products
 * cost a load and a fraction of an instruction per weight instead of five
 * (int8 to float, scale, multiply-add), which capped the CUDA-core kernels
 * near a quarter of the memory bandwidth.
 *
 * Fragment order (PTX m16n8k32 .s8): lane (g = lane / 4, tg = lane % 4)
 * holds A rows g and g + 8 at logical k 4tg..4tg+3 and 4tg+16..4tg+19, and
 * B column g at the same k. Logical k is mapped to the block's elements so
 * that a lane's 8 k of a row are elements 8tg..8tg+7, one 8-byte load; B
 * uses the same map, so the sums are the same. */
#pragma once

#include "kernels.cuh"

__device__ __forceinline__ void mma_s8(int (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                       uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                 "{%8,%9}, {%0,%1,%2,%3};"
                 : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

/* d = A B + c (c in each of the four accumulators): a product from a
 * constant needs no moves into d before it (the same c registers serve
 * every call). */
__device__ __forceinline__ void mma_s8_from(int (&d)[4], int c, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                            uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                 "{%8,%9}, {%10,%10,%10,%10};"
                 : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1), "r"(c));
}

/* The accumulators start at the bits of 1.5 * 2^23: an int32 sum s below
 * 2^22 in magnitude then reads, as a float, 1.5 * 2^23 + s exactly, and one
 * float subtraction (not the quarter-rate conversion) gives s. */
#define I2F_BIAS_BITS 0x4B400000
#define I2F_BIAS 12582912.0f

/* x (nb blocks of 32) to its int8 parts in shared memory: block k's 128
 * bytes are parts 0..3, 32 bytes each in element order (lane (p, tg) of
 * the B fragment reads its 8 bytes at 8 * lane), and f[k] its scale. |x| /
 * f < 64, so each part is in [-64, 64]; each step below is exact (a power
 * of two times a float, a float less its rounding, times 128). sum16, if
 * given, gets x summed over each 16 elements. Ends with a barrier. */
__device__ void x_int8_parts(const float *x, int nb, uint8_t *xq, float *f, float *sum16 = NULL) {
    int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP, nw = blockDim.x / WARP;
#pragma unroll 4
    for (int k = warp; k < nb; k += nw) {
        float v = x[32 * k + lane];
        if (sum16) {   /* x summed over each 16 (Q2_K's sub-block minimums), in a fixed order */
            float h = v;
#pragma unroll
            for (int o = 8; o > 0; o >>= 1) h += __shfl_xor_sync(0xffffffffu, h, o);
            if (lane % 16 == 0) sum16[2 * k + lane / 16] = h;
        }
        int e;
        frexpf(warp_max(fabsf(v)), &e);   /* max |x| in [2^(e-1), 2^e) */
        float u = ldexpf(v, 6 - e);
        int8_t *q = (int8_t *)xq + 128 * k + lane;
#pragma unroll
        for (int p = 0; p < 4; p++) {
            float c = rintf(u);
            q[32 * p] = (int8_t)c;
            u = (u - c) * 128.0f;
        }
        if (lane == 0) f[k] = ldexpf(1.0f, e - 6);
    }
    __syncthreads();
}

/* A slice's D fragment (accumulators started at I2F_BIAS_BITS) as the two
 * rows' sums of code x parts, each part at its weight 2^-7p: columns 2tg,
 * 2tg + 1 are parts 2tg, 2tg + 1 (tg < 2); B's columns 4..7 are zero, so
 * lanes tg >= 2 get zeros. */
__device__ __forceinline__ void slice_sums(const int (&d)[4], int tg, float &t0, float &t1) {
    const float w0 = tg == 0 ? 1.0f : 0x1p-14f, w1 = tg == 0 ? 0x1p-7f : 0x1p-21f;
    t0 = fmaf(__int_as_float(d[1]) - I2F_BIAS, w1, (__int_as_float(d[0]) - I2F_BIAS) * w0);
    t1 = fmaf(__int_as_float(d[3]) - I2F_BIAS, w1, (__int_as_float(d[2]) - I2F_BIAS) * w0);
}

/* This lane's B fragment of x block k (lanes 16..31: columns 4..7, zero). */
__device__ __forceinline__ uint2 x_frag(const uint8_t *xq, int k) {
    int lane = threadIdx.x % WARP;
    return lane < 16 ? *(const uint2 *)(xq + 128 * k + 8 * lane) : make_uint2(0, 0);
}

/* The tile's rows g, g + 8 from every warp's lanes (a quad's four, then the
 * warps in order) into y[16 tile + r]; ends at the barrier after red is read
 * (`last`: no barrier, red is not written again). */
__device__ __forceinline__ void tile_store(float acc0, float acc1, float (*red)[16], int tile, int n_out,
                                          float *y, bool last, float yscale = 1.0f) {
    int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP, nw = blockDim.x / WARP;
    acc0 += __shfl_xor_sync(0xffffffffu, acc0, 1);
    acc0 += __shfl_xor_sync(0xffffffffu, acc0, 2);
    acc1 += __shfl_xor_sync(0xffffffffu, acc1, 1);
    acc1 += __shfl_xor_sync(0xffffffffu, acc1, 2);
    if (lane % 4 == 0) red[warp][lane / 4] = acc0, red[warp][lane / 4 + 8] = acc1;
    __syncthreads();
    int r = 16 * tile + threadIdx.x;
    if (threadIdx.x < 16 && r < n_out) {
        float v = 0;
        for (int w = 0; w < nw; w++) v += red[w][threadIdx.x];
        y[r] = v * yscale;
    }
    if (!last) __syncthreads();
}

/* ---- qat-q8: x as k_act8's int8 codes (a.q8, a.q8d, a.q8s) ----
 * The codes are already the B operand: column 0, as stored, with no split
 * into parts and no shared memory (nor the barrier after it); a slice's sum
 * is the exact int32 sum of weight code x x code, times the two scales, as
 * ggml's vec_dot_q8_0_q8_0 / the CPU engine multiply. A warp holds its own
 * stretch of x's codes across lanes (lane l: bytes 8l..8l+7 of it) and its
 * scales (lane s: slice s's), loaded once a block, and hands slice s's to
 * lanes 0..3 (B's column 0) by shuffles. */
struct x_codes {
    uint2 q;     /* codes 8 lane .. 8 lane + 7 of the warp's stretch */
    float d;     /* lane s: slice s's scale */
    float s16;   /* lane j: the codes' sum over 16 elements j of the stretch (Q2_K) */
};

/* The warp's stretch of `slices` 32-code blocks from block k0 of x row q, d, s16. */
__device__ __forceinline__ void x_codes_load(const int8_t *q, const float *d, const float *s16, int k0,
                                             int slices, x_codes &c) {
    int lane = threadIdx.x % WARP;
    c.q = lane < 4 * slices ? *(const uint2 *)(q + 32 * k0 + 8 * lane) : make_uint2(0, 0);
    c.d = lane < slices ? d[k0 + lane] : 0.0f;
    c.s16 = s16 && lane < 2 * slices ? s16[2 * k0 + lane] : 0.0f;
}

/* Slice s's B fragment (lanes 0..3: column 0; the other columns zero). */
__device__ __forceinline__ uint2 x_codes_frag(const x_codes &c, int s) {
    int lane = threadIdx.x % WARP, from = 4 * s + lane % 4;
    uint32_t lo = __shfl_sync(0xffffffffu, c.q.x, from), hi = __shfl_sync(0xffffffffu, c.q.y, from);
    return lane < 4 ? make_uint2(lo, hi) : make_uint2(0, 0);
}

/* A slice's D fragment (accumulators started at I2F_BIAS_BITS) as the two
 * rows' code sums: column 0, in lanes tg == 0; zero elsewhere. */
__device__ __forceinline__ void slice_sums_codes(const int (&d)[4], int tg, float &t0, float &t1) {
    t0 = tg == 0 ? __int_as_float(d[0]) - I2F_BIAS : 0.0f;
    t1 = tg == 0 ? __int_as_float(d[2]) - I2F_BIAS : 0.0f;
}

static inline bool q8_mma1_fits(const lin_args &a) {
    return a.w.type == DS4_TYPE_Q8_0 && !a.active && !a.norm_n && a.w.n_in % 1024 == 0 &&
           a.w.n_in <= 8192;
}

/* Q8_0 blocks a warp sums per 16-row tile (SL; its loads all in flight
 * together): 4 where that leaves at most 32 warps a block and the product
 * is one or two matrices (measured on Flash's shapes: q_b, q_a, kv, the
 * shared expert's, 10-20% faster each), else 8 (the 8 output groups
 * measured 20% slower at 4: too few 32-warp blocks fit). A block has
 * n_in / 32 / SL warps, 4 to 32. */
static inline int q8_mma1_slices(int n_in, int parts) { return n_in <= 4096 && parts <= 2 ? 4 : 8; }

/* Shared bytes: the x parts and their scales. */
static inline size_t q8_mma1_smem(int n_in) { return (size_t)n_in * 4 + (size_t)n_in / 32 * 4; }

/* A warp's share of a 16-row tile: rows g and g + 8 of the lane's fragment,
 * SL Q8_0 blocks from kb0: the code words and the fp16 scales. */
template <int SL>
struct q8_tile_part {
    uint2 q0[SL], q1[SL];
    uint4 s0, s1;   /* SL = 4: .x, .y */
};

template <int SL>
__device__ __forceinline__ void q8_tile_load(const lin_args &a, const uint8_t *w, int tile, int kb0,
                                             q8_tile_part<SL> &t) {
    int g = threadIdx.x % WARP / 4, tg = threadIdx.x % 4, nb = a.w.n_in / 32, n_out = a.w.n_out;
    /* rows past the end read the last row, unused */
    const uint8_t *row0 = w + (int64_t)min(16 * tile + g, n_out - 1) * a.w.row_bytes;
    const uint8_t *row1 = w + (int64_t)min(16 * tile + g + 8, n_out - 1) * a.w.row_bytes;
#pragma unroll
    for (int s = 0; s < SL; s++) {
        t.q0[s] = *(const uint2 *)(row0 + 2 * nb + 32 * (kb0 + s) + 8 * tg);
        t.q1[s] = *(const uint2 *)(row1 + 2 * nb + 32 * (kb0 + s) + 8 * tg);
    }
    if constexpr (SL == 8) {
        t.s0 = *(const uint4 *)(row0 + 2 * kb0);
        t.s1 = *(const uint4 *)(row1 + 2 * kb0);
    } else {
        uint2 v0 = *(const uint2 *)(row0 + 2 * kb0), v1 = *(const uint2 *)(row1 + 2 * kb0);
        t.s0.x = v0.x, t.s0.y = v0.y, t.s1.x = v1.x, t.s1.y = v1.y;
    }
}

/* fp16 scale s of the (up to) 8 in v */
__device__ __forceinline__ float q8_scale_at(const uint4 &v, int s) {
    uint32_t w = s < 2 ? v.x : s < 4 ? v.y : s < 6 ? v.z : v.w;
    return h2f_bits(w >> (16 * (s % 2)));
}

/* A block per 16-row tile at a time (blocks stride over the tiles: the grid
 * is sized to the GPU); its warp w sums Q8_0 blocks [SL w, SL (w + 1)) of the
 * tile's rows, and the warps' sums are added in warp order. The next tile's
 * loads are issued before this one's sums are reduced, and the first
 * tile's before x is split. Plain or batched (lin_block_of) products; CODES:
 * x as qat-q8's codes, no split. */
template <int SL, bool CODES>
__global__ void __launch_bounds__(1024) k_q8_mma1(lin_args a) {
    if (!a.early) pdl_begin();
    extern __shared__ __align__(16) uint8_t x_parts_sh[];
    __shared__ float red[32][16];
    lin_block b;
    lin_block_of(a, blockIdx.y, b);
    const int nb = a.w.n_in / 32, n_out = a.w.n_out, tiles = (n_out + 15) / 16;
    int warp = threadIdx.x / WARP, tg = threadIdx.x % 4, kb0 = warp * SL;
    uint8_t *xq = x_parts_sh;
    float *xf = (float *)(x_parts_sh + (size_t)a.w.n_in * 4);
    int tile = blockIdx.x;
    if (tile >= tiles) return;   /* the whole block */
    q8_tile_part<SL> t;
    q8_tile_load(a, b.w, tile, kb0, t);
    if (a.early) pdl_begin();   /* the first tile's weights in flight across the wait */
    x_codes xc;
    if constexpr (CODES) {   /* part p's codes at p n_in; one row for products that share x (a.bx == 0) */
        int64_t part = a.bx ? blockIdx.y : 0;
        x_codes_load(a.q8 + part * a.w.n_in, a.q8d + part * nb, NULL, kb0, SL, xc);
    } else
        x_int8_parts(b.x, nb, xq, xf);

    for (;;) {
        float acc0 = 0, acc1 = 0;
#pragma unroll
        for (int s = 0; s < SL; s++) {
            uint2 bx = CODES ? x_codes_frag(xc, s) : x_frag(xq, kb0 + s);
            int d[4];
            mma_s8_from(d, I2F_BIAS_BITS, t.q0[s].x, t.q1[s].x, t.q0[s].y, t.q1[s].y, bx.x, bx.y);
            float t0, t1, f;
            if constexpr (CODES) {
                f = __shfl_sync(0xffffffffu, xc.d, s);
                slice_sums_codes(d, tg, t0, t1);
            } else {
                f = xf[kb0 + s];
                slice_sums(d, tg, t0, t1);
            }
            acc0 = fmaf(t0, q8_scale_at(t.s0, s) * f, acc0);
            acc1 = fmaf(t1, q8_scale_at(t.s1, s) * f, acc1);
        }
        int next = tile + gridDim.x;
        if (next < tiles) q8_tile_load(a, b.w, next, kb0, t);
        tile_store(acc0, acc1, red, tile, n_out, b.y, next >= tiles);
        if (next >= tiles) break;
        tile = next;
    }
}

/* ---- routed experts' rows, IQ2_XXS and Q2_K ----
 * Both go to the int8 MMA one 32-element x block (a slice) at a time, the
 * lane's 8 weights of a row being elements 8tg..8tg+7 of the slice:
 *  - IQ2_XXS slice ib of a 256-block: code word ib; the lane's 8 are grid
 *    row tg of it, signed: int8 in [-43, 43]; slice scale
 *    d * (0.5 + s4) * 0.25 (s4 the word's top 4 bits);
 *  - Q2_K slice (n, s), elements 128n + 32s + l: the lane's l = 8tg..8tg+7
 *    are code bytes 32n + 8tg.. at shift 2s, all in sub-block h = tg / 2;
 *    times that sub-block's 4-bit scale: int8 in [0, 45]; slice scale d;
 *    the minimums, dmin * sum over sub-blocks of (scale >> 4) * sum(x), once
 *    a row from the 16-element sums of x.
 * A warp owns one 256-block of each of a tile's rows (n_in / 256 warps; up to
 * 128 registers a thread: at 64, measured slower). Other rows take the staged
 * CUDA-core kernel. */

#define EXPERT_MMA1_MAX_WARPS 16   /* n_in up to 4096: 128 registers a thread */

static inline bool expert_mma1_fits(const dmat &w) {
    return (w.type == DS4_TYPE_IQ2_XXS || w.type == DS4_TYPE_Q2_K) && w.n_in % 1024 == 0 &&
           w.n_in <= 256 * EXPERT_MMA1_MAX_WARPS;
}

/* Shared bytes: the x parts, their scales and (Q2_K) the 16-element sums. */
static inline size_t expert_mma1_smem(int n_in) {
    return (size_t)n_in * 4 + (size_t)n_in / 32 * 4 + (size_t)n_in / 16 * 4;
}

/* Bytes of v whose bit in m4 is set, negated (v's bytes in 1..255: ~b + 1
 * stays in its byte). Bit i of m4 goes to byte i's low bit by one multiply
 * (the four shifted copies do not overlap). */
__device__ __forceinline__ uint32_t negate_bytes(uint32_t v, uint32_t m4) {
    uint32_t t = (m4 * 0x00204081u) & 0x01010101u;
    return (v ^ (t * 0xFFu)) + t;
}

/* A warp's share of a 16-row tile: the 256-block kb of rows g, g + 8. */
template <int TYPE>
struct expert_tile_part;

template <>
struct expert_tile_part<DS4_TYPE_IQ2_XXS> {
    uint2 c0[8], c1[8];   /* the 8 code words */
    float d0, d1;
};

template <>
struct expert_tile_part<DS4_TYPE_Q2_K> {
    uint2 q0[2], q1[2];   /* code bytes 32n + 8tg.. (n = 0, 1) */
    uint4 sc0, sc1;       /* the 16 scale bytes */
    uint32_t dd0, dd1;    /* d | dmin << 16 */
};

template <int TYPE>
__device__ __forceinline__ void expert_tile_load(const dmat &m, const uint8_t *w, int tile, int kb,
                                                 expert_tile_part<TYPE> &t) {
    int g = threadIdx.x % WARP / 4, tg = threadIdx.x % 4, nb = m.n_in / 256;
    const uint8_t *row0 = w + (int64_t)min(16 * tile + g, m.n_out - 1) * m.row_bytes;
    const uint8_t *row1 = w + (int64_t)min(16 * tile + g + 8, m.n_out - 1) * m.row_bytes;
    if constexpr (TYPE == DS4_TYPE_IQ2_XXS) {
#pragma unroll
        for (int s = 0; s < 8; s++) {
            t.c0[s] = *(const uint2 *)(row0 + 2 * nb + 64 * kb + 8 * s);
            t.c1[s] = *(const uint2 *)(row1 + 2 * nb + 64 * kb + 8 * s);
        }
        t.d0 = d_h2f(row0 + 2 * kb);
        t.d1 = d_h2f(row1 + 2 * kb);
    } else {
#pragma unroll
        for (int n = 0; n < 2; n++) {
            t.q0[n] = *(const uint2 *)(row0 + 20 * nb + 64 * kb + 32 * n + 8 * tg);
            t.q1[n] = *(const uint2 *)(row1 + 20 * nb + 64 * kb + 32 * n + 8 * tg);
        }
        t.sc0 = *(const uint4 *)(row0 + 4 * nb + 16 * kb);
        t.sc1 = *(const uint4 *)(row1 + 4 * nb + 16 * kb);
        t.dd0 = *(const uint32_t *)(row0 + 4 * kb);
        t.dd1 = *(const uint32_t *)(row1 + 4 * kb);
    }
}

/* IQ2_XXS: the lane's 8 signed grid values of code word c as A's two words,
 * and the slice scale. */
__device__ __forceinline__ float iq2_slice(uint2 c, float d, int tg, const uint64_t *grid,
                                           const uint8_t *signs, uint32_t &lo, uint32_t &hi) {
    uint64_t gv = grid[(c.x >> (8 * tg)) & 0xff];
    uint32_t sg = signs[(c.y >> (7 * tg)) & 127];
    lo = negate_bytes((uint32_t)gv, sg & 15);
    hi = negate_bytes((uint32_t)(gv >> 32), sg >> 4);
    return d * (0.5f + (float)(c.y >> 28)) * 0.25f;
}

/* Q2_K: scale byte k (0..15) of the 16 in v */
__device__ __forceinline__ uint32_t q2k_scale(const uint4 &v, int k) {
    uint32_t w = k < 4 ? v.x : k < 8 ? v.y : k < 12 ? v.z : v.w;
    return (w >> (8 * (k % 4))) & 0xff;
}

/* Grid (tile blocks, expert slots, mats): block row y is expert active[y]
 * (lin_block_of), z the second matrix of a pair at the batch strides bw, by
 * (the routed gate and up share x). The block's pairs p (one for a decode
 * token) each split their x row, then the block strides over the tiles. */
template <int TYPE, bool CODES, bool IINT = false>
__global__ void __launch_bounds__(EXPERT_MMA1_MAX_WARPS *WARP, 1) k_expert_mma1(lin_args a) {
    pdl_begin();
    constexpr bool IQ2 = TYPE == DS4_TYPE_IQ2_XXS;
    extern __shared__ __align__(16) uint8_t x_parts_sh[];
    __shared__ float red[32][16];
    __shared__ uint64_t grid_sh[IQ2 ? 256 : 1];
    __shared__ uint8_t signs_sh[IQ2 ? 128 : 1];
    lin_block b;
    if (!lin_block_of(a, blockIdx.y, b)) return;   /* the whole block */
    b.w += blockIdx.z * a.bw, b.y += blockIdx.z * a.by;
    const int nb32 = a.w.n_in / 32, n_out = a.w.n_out, tiles = (n_out + 15) / 16;
    int warp = threadIdx.x / WARP, tg = threadIdx.x % 4, kb = warp;
    uint8_t *xq = x_parts_sh;
    float *xf = (float *)(x_parts_sh + (size_t)a.w.n_in * 4), *xs16 = xf + nb32;
    if (blockIdx.x >= tiles) return;
    if constexpr (IQ2) {   /* read after x_int8_parts' barrier, or the one for CODES below */
        for (int i = threadIdx.x; i < 256; i += blockDim.x) grid_sh[i] = d_iq2_grid[i];
        if (threadIdx.x < 128) signs_sh[threadIdx.x] = d_iq2_signs[threadIdx.x];
    }
    for (int p = b.p0; p < b.p1; p++) {
        int tile = blockIdx.x;
        expert_tile_part<TYPE> t;
        expert_tile_load<TYPE>(a.w, b.w, tile, kb, t);
        int64_t row = a.xrow ? a.xrow[p] : p;
        x_codes xc;
        if constexpr (CODES) {
            x_codes_load(a.q8 + row * a.w.n_in, a.q8d + row * nb32, IQ2 ? NULL : a.q8s + row * 2 * nb32, 8 * kb,
                         8, xc);
            if (IQ2 && p == b.p0) __syncthreads();   /* the grid tables (after the first loads) */
        } else {
            /* (a previous pair's x parts were all read before its last tile_store barrier) */
            x_int8_parts(b.x + row * a.xs, nb32, xq, xf, IQ2 ? NULL : xs16);
        }
        float *y = b.y + (int64_t)p * a.ys;
        for (;;) {
            float acc0 = 0, acc1 = 0;
            if constexpr (IQ2 && CODES && IINT) {
                /* x's Q8_K scale is one for the whole 256 block: the slices'
                 * code sums add up as integers times 2 ls + 1, and the block
                 * ends in one float step, d x f x sum (the CPU's
                 * dot_iq2_xxs_q8_K order; the 1/8 at the row's end) */
                int b0 = 0, b1 = 0;
#pragma unroll
                for (int s = 0; s < 8; s++) {
                    uint32_t a0, a1, a2, a3;
                    iq2_slice(t.c0[s], 0.0f, tg, grid_sh, signs_sh, a0, a2);
                    iq2_slice(t.c1[s], 0.0f, tg, grid_sh, signs_sh, a1, a3);
                    uint2 bx = x_codes_frag(xc, s);
                    int d[4];
                    mma_s8_from(d, 0, a0, a1, a2, a3, bx.x, bx.y);
                    b0 += d[0] * (int)(2 * (t.c0[s].y >> 28) + 1);
                    b1 += d[2] * (int)(2 * (t.c1[s].y >> 28) + 1);
                }
                float f = __shfl_sync(0xffffffffu, xc.d, 0);
                acc0 = tg == 0 ? t.d0 * f * (float)b0 : 0.0f;
                acc1 = tg == 0 ? t.d1 * f * (float)b1 : 0.0f;
            } else if constexpr (IQ2) {
#pragma unroll
                for (int s = 0; s < 8; s++) {
                    uint32_t a0, a1, a2, a3;
                    float s0 = iq2_slice(t.c0[s], t.d0, tg, grid_sh, signs_sh, a0, a2);
                    float s1 = iq2_slice(t.c1[s], t.d1, tg, grid_sh, signs_sh, a1, a3);
                    uint2 bx = CODES ? x_codes_frag(xc, s) : x_frag(xq, 8 * kb + s);
                    int d[4];
                    mma_s8_from(d, I2F_BIAS_BITS, a0, a1, a2, a3, bx.x, bx.y);
                    float t0, t1, f;
                    if constexpr (CODES) {
                        f = __shfl_sync(0xffffffffu, xc.d, s);
                        slice_sums_codes(d, tg, t0, t1);
                    } else {
                        f = xf[8 * kb + s];
                        slice_sums(d, tg, t0, t1);
                    }
                    acc0 = fmaf(t0, s0 * f, acc0);
                    acc1 = fmaf(t1, s1 * f, acc1);
                }
            } else {
                const int h = tg / 2;
                float d0 = h2f_bits(t.dd0);
                float d1 = h2f_bits(t.dd1);
                float m0 = 0, m1 = 0;   /* sum of (scale >> 4) * sum(x), lanes tg 0, 2 (h 0, 1) */
#pragma unroll
                for (int n = 0; n < 2; n++)
#pragma unroll
                    for (int s = 0; s < 4; s++) {
                        uint32_t sc0 = q2k_scale(t.sc0, 8 * n + 2 * s + h);
                        uint32_t sc1 = q2k_scale(t.sc1, 8 * n + 2 * s + h);
                        uint32_t a0 = ((t.q0[n].x >> (2 * s)) & 0x03030303u) * (sc0 & 0xf);
                        uint32_t a2 = ((t.q0[n].y >> (2 * s)) & 0x03030303u) * (sc0 & 0xf);
                        uint32_t a1 = ((t.q1[n].x >> (2 * s)) & 0x03030303u) * (sc1 & 0xf);
                        uint32_t a3 = ((t.q1[n].y >> (2 * s)) & 0x03030303u) * (sc1 & 0xf);
                        int k = 8 * kb + 4 * n + s;   /* the x block */
                        uint2 bx = CODES ? x_codes_frag(xc, 4 * n + s) : x_frag(xq, k);
                        int d[4];
                        mma_s8_from(d, I2F_BIAS_BITS, a0, a1, a2, a3, bx.x, bx.y);
                        float t0, t1, f, xsum;
                        if constexpr (CODES) {
                            f = __shfl_sync(0xffffffffu, xc.d, 4 * n + s);
                            slice_sums_codes(d, tg, t0, t1);
                            /* lanes tg 0, 2 read sub-block h's sum (the shuffle wants every lane) */
                            xsum = __shfl_sync(0xffffffffu, xc.s16, 2 * (4 * n + s) + h) * f;
                        } else {
                            f = xf[k];
                            slice_sums(d, tg, t0, t1);
                            xsum = xs16[2 * k + h];
                        }
                        acc0 = fmaf(t0, d0 * f, acc0);
                        acc1 = fmaf(t1, d1 * f, acc1);
                        if (tg % 2 == 0) {
                            m0 = fmaf((float)(sc0 >> 4), xsum, m0);
                            m1 = fmaf((float)(sc1 >> 4), xsum, m1);
                        }
                    }
                acc0 = fmaf(-h2f_bits(t.dd0 >> 16), m0, acc0);
                acc1 = fmaf(-h2f_bits(t.dd1 >> 16), m1, acc1);
            }
            int next = tile + gridDim.x;
            if (next < tiles) expert_tile_load<TYPE>(a.w, b.w, next, kb, t);
            tile_store(acc0, acc1, red, tile, n_out, y, next >= tiles && p + 1 == b.p1, IINT ? 0.125f : 1.0f);
            if (next >= tiles) break;
            tile = next;
        }
    }
}
