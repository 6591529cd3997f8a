/* One-token products of Q8_0 rows on the int8 tensor cores.
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

/* The accumulators start at the bits of 1.5 * 2^23: an int32 sum s below
 * 2^22 in magnitude then reads, as a float, 1.5 * 2^23 + s exactly, and one
 * float subtraction (not the quarter-rate conversion) gives s. */
#define I2F_BIAS_BITS 0x4B400000
#define I2F_BIAS 12582912.0f

/* x (nb blocks of 32) to its int8 parts in shared memory: block k's 128
 * bytes are parts 0..3, 32 bytes each in element order (lane (p, tg) of
 * the B fragment reads its 8 bytes at 8 * lane), and f[k] its scale. |x| /
 * f < 64, so each part is in [-64, 64]; each step below is exact (a power
 * of two times a float, a float less its rounding, times 128). Ends with a
 * barrier. */
__device__ void x_int8_parts(const float *x, int nb, uint8_t *xq, float *f) {
    int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP, nw = blockDim.x / WARP;
#pragma unroll 4
    for (int k = warp; k < nb; k += nw) {
        float v = x[32 * k + lane];
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
    return __half2float(__ushort_as_half((uint16_t)(w >> (16 * (s % 2)))));
}

/* A block per 16-row tile at a time (blocks stride over the tiles: the grid
 * is sized to the GPU); its warp w sums Q8_0 blocks [SL w, SL (w + 1)) of the
 * tile's rows, and the warps' sums are added in warp order. The next tile's
 * loads are issued before this one's sums are reduced, and the first
 * tile's before x is split. Plain or batched (lin_block_of) products. */
template <int SL>
__global__ void __launch_bounds__(1024) k_q8_mma1(lin_args a) {
    extern __shared__ __align__(16) uint8_t x_parts_sh[];
    __shared__ float red[32][16];
    lin_block b;
    lin_block_of(a, blockIdx.y, b);
    const int nb = a.w.n_in / 32, n_out = a.w.n_out, tiles = (n_out + 15) / 16;
    int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP, g = lane / 4, tg = lane % 4;
    int nw = blockDim.x / WARP, kb0 = warp * SL;
    uint8_t *xq = x_parts_sh;
    float *xf = (float *)(x_parts_sh + (size_t)a.w.n_in * 4);
    int tile = blockIdx.x;
    if (tile >= tiles) return;   /* the whole block */
    q8_tile_part<SL> t;
    q8_tile_load(a, b.w, tile, kb0, t);
    x_int8_parts(b.x, nb, xq, xf);

    /* columns 2tg, 2tg + 1 of D are parts 2tg, 2tg + 1 (tg < 2); B's
     * columns 4..7 are zero, so lanes tg >= 2 add zeros */
    const float w0 = tg == 0 ? 1.0f : 0x1p-14f, w1 = tg == 0 ? 0x1p-7f : 0x1p-21f;
    for (;;) {
        float acc0 = 0, acc1 = 0;
#pragma unroll
        for (int s = 0; s < SL; s++) {
            uint2 bx = lane < 16 ? *(const uint2 *)(xq + 128 * (kb0 + s) + 8 * lane) : make_uint2(0, 0);
            int d[4] = {I2F_BIAS_BITS, I2F_BIAS_BITS, I2F_BIAS_BITS, I2F_BIAS_BITS};
            mma_s8(d, t.q0[s].x, t.q1[s].x, t.q0[s].y, t.q1[s].y, bx.x, bx.y);
            float t0 = fmaf(__int_as_float(d[1]) - I2F_BIAS, w1, (__int_as_float(d[0]) - I2F_BIAS) * w0);
            float t1 = fmaf(__int_as_float(d[3]) - I2F_BIAS, w1, (__int_as_float(d[2]) - I2F_BIAS) * w0);
            float f = xf[kb0 + s];
            acc0 = fmaf(t0, q8_scale_at(t.s0, s) * f, acc0);
            acc1 = fmaf(t1, q8_scale_at(t.s1, s) * f, acc1);
        }
        int next = tile + gridDim.x;
        if (next < tiles) q8_tile_load(a, b.w, next, kb0, t);
        acc0 += __shfl_xor_sync(0xffffffffu, acc0, 1);
        acc0 += __shfl_xor_sync(0xffffffffu, acc0, 2);
        acc1 += __shfl_xor_sync(0xffffffffu, acc1, 1);
        acc1 += __shfl_xor_sync(0xffffffffu, acc1, 2);
        if (tg == 0) red[warp][g] = acc0, red[warp][g + 8] = acc1;
        __syncthreads();
        int r = 16 * tile + threadIdx.x;
        if (threadIdx.x < 16 && r < n_out) {
            float v = 0;
            for (int w = 0; w < nw; w++) v += red[w][threadIdx.x];
            b.y[r] = v;
        }
        if (next >= tiles) break;
        tile = next;
        __syncthreads();
    }
}
