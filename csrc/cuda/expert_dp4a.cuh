/* One token's routed IQ2_XXS and Q2_K rows (the gate, up and down of qat-q8
 * decode) on dp4a, a warp streaming whole rows.
 *
 * Why not the int8 tensor cores as k_expert_mma1 does: a decode token is
 * one column of B, so each decoded A fragment served a 16 x 8 product with
 * 7 empty columns, and a tile's 16 rows were summed across 16 warps with two
 * block barriers a tile (ncu: 57 warp instructions a 512-weight slice,
 * 3.3-way bank conflicts on the grid and sign lookups, 4 warps a scheduler,
 * 0.8 TB/s). Here:
 *  - lane l owns half-block l of every row (elements 128 l .. 128 l + 127,
 *    slices 4 (l % 2) .. + 3 of 256-block l / 2): x's 128 codes for it stay
 *    in the lane's registers, so a row costs the lane its 32 code bytes
 *    (a warp reads the row's 1 KB in order) and the decode;
 *  - the launch's rows (matrix, slot, row) are one stream cut evenly over
 *    the warps of one block an SM; each warp copies its next rows into its
 *    own shared ring by cp.async (3 in flight while one is summed), each
 *    lane its own bytes, so no barrier and no register holds them;
 *  - the grid and the sign masks come from shared tables in 16 copies,
 *    copy = lane % 16 (a half-warp's 8-byte lookups never share a bank),
 *    aligned so a lookup's address is (shifted code & mask) | lane base;
 *  - a group of 8 weights is dp4a(g ^ m, x) - dp4a(m, x) over its two
 *    words: g the grid bytes (1..43), m the bytes 0xff where the sign is
 *    negative; (g ^ 0xff) read as int8 is -g - 1, and -m x adds the 1 back.
 * The sums are the same integers and the same float steps as k_expert_mma1's
 * IINT path (the CPU's dot_iq2_xxs_q8_K order): a 256 block's slice sums
 * times 2 s + 1 added as integers (the lane pair's halves by one shuffle),
 * then d x f x sum, the blocks added in order from 0, times 1/8 (same_bits:
 * identical, DS4_CUDA_NO_DP4A=1 for the tensor-core kernel).
 * Measured (H200, ncu, one launch of 26 MB, this design and its variants):
 * 21.5-22.4 us, against 31-32 on the chain before; issue 0.51 a scheduler, stalls spread over the ring's
 * waits, shared-memory results and the MIO queue. Neither x held with its
 * negation (a select instead of the second dp4a: 2 fewer instructions a
 * group, 16 warps) nor split dp4a chains changed decode speed.
 * Q2_K (the down, 16.5 MB a layer, 13 us on the chain before) streams the
 * same way with a lane a quarter block (xd_q2k_block); its codes need no
 * table: dp4a on (word >> 2 s) & 0x03030303 times the sub-block's scale. */
#pragma once

#include "int8_decode.cuh"

#define XD_WARPS 20   /* warps of the one block an SM: 96 registers a thread */
#define XD_ROWS 8     /* rows whose sums go to y together */
#define XD_RING 4     /* a warp's rows in shared memory: 3 in flight while one is summed */
#define XD_COPIES 16

/* Shared bytes: the rings, the row sums, the two tables and up to 48 KB to
 * align them (a table's lane base then has zeros where the index goes, so
 * base | index is one LOP3 with the index's mask). */
/* A ring row: IQ2_XXS, 32 lanes' 32 code bytes, then each lane's 4 bytes
 * holding its d; Q2_K, 32 lanes' 16 code bytes, their blocks' 16 scale
 * bytes, then d | dmin << 16. */
#define XD_SLOT 1152
#define XD_RING_BYTES (XD_WARPS * XD_RING * XD_SLOT)
#define XD_RED_BYTES (XD_WARPS * XD_ROWS * 17 * 4)
#define XD_SMEM (XD_RING_BYTES + XD_RED_BYTES + 128 * XD_COPIES * 8 + 256 * XD_COPIES * 8 + 0x4000 + 0x8000)

static bool g_expert_dp4a_ok = false;   /* the GPU gives a block XD_SMEM (expert_dp4a_init) */

/* IQ2_XXS: a lane a half-block, n_in <= 4096; Q2_K: a lane a quarter, n_in <= 2048 */
static inline bool expert_dp4a_fits(const dmat &w) {
    return g_expert_dp4a_ok && w.n_in % 1024 == 0 &&
           ((w.type == DS4_TYPE_IQ2_XXS && w.n_in <= 4096) || (w.type == DS4_TYPE_Q2_K && w.n_in <= 2048));
}

/* The 8 bytes at shared address `addr`. */
__device__ __forceinline__ uint2 lds64(uint32_t addr) {
    uint2 v;
    asm("ld.shared.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "r"(addr));
    return v;
}

/* v's bits from `from` up, moved to start at bit `to` (compile-time shifts). */
template <int FROM, int TO>
__device__ __forceinline__ uint32_t field_at(uint32_t v) {
    return FROM >= TO ? v >> (FROM - TO) : v << (TO - FROM);
}

/* Lane's sum over its 4 slices of a row: code words c, x codes xw; gsel,
 * ssel: the lane's copy of the grid (entries 128 bytes apart, 32 KB
 * aligned) and of the sign masks (16 KB aligned). */
__device__ __forceinline__ int xd_half_block(const uint4 (&c)[2], const uint32_t (&xw)[32], uint32_t gsel,
                                             uint32_t ssel) {
    const uint32_t cx[4] = {c[0].x, c[0].z, c[1].x, c[1].z}, cy[4] = {c[0].y, c[0].w, c[1].y, c[1].w};
    int p = 0;
#pragma unroll
    for (int s = 0; s < 4; s++) {
        int pos = 0, neg = 0;
#define XD_GROUP(j)                                                                          \
        {                                                                                    \
            uint2 g = lds64((field_at<8 * j, 7>(cx[s]) & 0x7f80u) | gsel);                   \
            uint2 m = lds64((field_at<7 * j, 7>(cy[s]) & 0x3f80u) | ssel);                   \
            pos = __dp4a((int)(g.x ^ m.x), (int)xw[8 * s + 2 * j], pos);                     \
            pos = __dp4a((int)(g.y ^ m.y), (int)xw[8 * s + 2 * j + 1], pos);                 \
            neg = __dp4a((int)m.x, (int)xw[8 * s + 2 * j], neg);                             \
            neg = __dp4a((int)m.y, (int)xw[8 * s + 2 * j + 1], neg);                         \
        }
        XD_GROUP(0) XD_GROUP(1) XD_GROUP(2) XD_GROUP(3)
#undef XD_GROUP
        p += (pos - neg) * (int)(2 * (cy[s] >> 28) + 1);
    }
    return p;
}

/* A position in a launch's rows, numbered matrix, then slot, then row:
 * its row's bytes, where its sum goes (NULL: nowhere, the slot's expert is
 * unused and expert 0's rows are read) and its x row. One pair a slot (a
 * decode token). Moved on a row at a time: the slot's expert is looked up
 * only where the slot changes. */
struct xd_cursor {
    int r, slot, mat;
    const uint8_t *w;
    float *y;
    int64_t xr;
};

__device__ __forceinline__ void xd_seek(const lin_args &a, xd_cursor &c) {
    int e = a.active[c.slot], p = e >= 0 ? a.offs[e] : 0;
    c.w = a.w.data + (int64_t)max(e, 0) * a.expert_bytes + c.mat * a.bw + (int64_t)c.r * a.w.row_bytes;
    c.y = e >= 0 && a.offs[e + 1] > p ? a.y + c.mat * a.by + (int64_t)p * a.ys + c.r : NULL;
    c.xr = a.xrow ? a.xrow[p] : p;
}

__device__ __forceinline__ void xd_at(const lin_args &a, int slots, int64_t flat, xd_cursor &c) {
    const int64_t per_mat = (int64_t)slots * a.w.n_out;
    c.mat = (int)(flat / per_mat);
    int rem = (int)(flat - c.mat * per_mat);
    c.slot = rem / a.w.n_out, c.r = rem % a.w.n_out;
    xd_seek(a, c);
}

__device__ __forceinline__ void xd_next(const lin_args &a, int slots, xd_cursor &c) {
    if (++c.r < a.w.n_out) {
        c.w += a.w.row_bytes;
        if (c.y) c.y++;
        return;
    }
    c.r = 0;
    if (++c.slot == slots) c.slot = 0, c.mat++;
    xd_seek(a, c);
}

/* Scale byte 8 n + 2 s + j of a Q2_K block's 16 (s compile-time: no
 * indexing into the words at run time) */
__device__ __forceinline__ uint32_t xd_scale_byte(const uint32_t (&scw)[4], int n, int s, int j) {
    return ((n ? scw[2 + s / 2] : scw[s / 2]) >> (8 * (2 * (s % 2) + j))) & 0xff;
}

/* Q2_K, lane (kb, n, j) = 4 kb + 2 n + j of a row of nb <= 8 blocks: code
 * bytes 32 n + 16 j .. + 15 of block kb, elements 128 n + 32 s + 16 j + i
 * (s = 0..3 the 2-bit place, i < 16), which are sub-block 8 n + 2 s + j of
 * each of the block's four slices (n, s). From the ring: its 16 code bytes,
 * the block's 16 scale bytes and d | dmin << 16. The same integers and float
 * steps as k_expert_mma1<Q2_K, CODES> (one lane there holds a slice's 32
 * and sub-block h's minimums): a slice's sum is sc (j 0) x S (j 0) + sc
 * (j 1) x S (j 1) by one shuffle, the 8 slices' fmaf(sum, d f, acc) in order
 * (n, s), then the minimums; mf: x's 16-sums of the lane's sub-blocks j of
 * slices (n', s) times f. Returns the block's value in lanes (kb, 0, 0). */
__device__ __forceinline__ float xd_q2k_block(uint4 q, uint4 sc, uint32_t dd, const uint32_t (&xw)[16],
                                              const float (&mf)[8], float f, int j) {
    const uint32_t qw[4] = {q.x, q.y, q.z, q.w}, scw[4] = {sc.x, sc.y, sc.z, sc.w};
    const int n = threadIdx.x % WARP / 2 % 2;
    int t[4];
#pragma unroll
    for (int s = 0; s < 4; s++) {
        int S = 0;
#pragma unroll
        for (int k = 0; k < 4; k++) S = __dp4a((int)((qw[k] >> (2 * s)) & 0x03030303u), (int)xw[4 * s + k], S);
        t[s] = S * (int)(xd_scale_byte(scw, n, s, j) & 0xf);
        t[s] += __shfl_xor_sync(0xffffffffu, t[s], 1);   /* the slice: sub-blocks j 0 and 1 */
    }
    const float d = h2f_bits(dd), dmin = h2f_bits(dd >> 16);
    float acc = 0.0f, m = 0.0f;
#pragma unroll
    for (int s = 0; s < 4; s++) acc = fmaf((float)t[s], d * f, acc);   /* slices (0, s) in lanes n 0 */
#pragma unroll
    for (int s = 0; s < 4; s++) acc = fmaf((float)__shfl_xor_sync(0xffffffffu, t[s], 2), d * f, acc);   /* (1, s) */
#pragma unroll
    for (int i = 0; i < 8; i++)   /* (n', s) = (i / 4, i % 4): sub-block 8 n' + 2 s + j's minimum */
        m = fmaf((float)(xd_scale_byte(scw, i / 4, i % 4, j) >> 4), mf[i], m);
    /* lanes j 0: the slices and sub-blocks h 0's minimums; j 1: h 1's alone (as tg 2 there) */
    float v = fmaf(-dmin, m, j == 0 ? acc : 0.0f);
    return v + __shfl_xor_sync(0xffffffffu, v, 1);
}

/* One block an SM (XD_WARPS warps). The launch's rows (matrix, slot, row)
 * are cut into one even stretch a warp, streamed through the warp's ring:
 * XD_RING - 1 rows in flight while one is summed, across slot and matrix
 * boundaries; XD_ROWS rows' sums at a time go to y. */
template <int TYPE>
__global__ void __launch_bounds__(XD_WARPS *WARP, 1) k_expert_dp4a(lin_args a, int slots, int mats) {
    constexpr bool IQ2 = TYPE == DS4_TYPE_IQ2_XXS;
    extern __shared__ __align__(16) uint8_t xd_sh[];
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP, copy = lane % XD_COPIES;
    const uint32_t s0 = (uint32_t)__cvta_generic_to_shared(xd_sh);
    const uint32_t signs_s = (s0 + XD_RING_BYTES + XD_RED_BYTES + 0x3fff) & ~0x3fffu;
    const uint32_t grid_s = (signs_s + 128 * XD_COPIES * 8 + 0x7fff) & ~0x7fffu;
    uint8_t *ring = xd_sh + warp * XD_RING * XD_SLOT;
    float (*red)[17] = (float (*)[17])(xd_sh + XD_RING_BYTES) + warp * XD_ROWS;
    if constexpr (IQ2) {   /* the tables before the wait (nothing writes them); a half-warp's 16 copies of an entry from one load */
        uint64_t *grid = (uint64_t *)(xd_sh + (grid_s - s0)), *signs = (uint64_t *)(xd_sh + (signs_s - s0));
        constexpr int T = XD_WARPS * WARP;
#pragma unroll
        for (int k = 0; k < (256 * XD_COPIES + T - 1) / T; k++) {
            int i = threadIdx.x + k * T;
            if (i < 256 * XD_COPIES) grid[i] = d_iq2_grid[i / XD_COPIES];
        }
#pragma unroll
        for (int k = 0; k < (128 * XD_COPIES + T - 1) / T; k++) {
            int i = threadIdx.x + k * T;
            if (i >= 128 * XD_COPIES) continue;
            uint32_t s8 = d_iq2_signs[i / XD_COPIES];
            uint64_t m = 0;
#pragma unroll
            for (int b = 0; b < 8; b++) m |= (uint64_t)((s8 >> b) & 1 ? 0xffu : 0u) << (8 * b);
            signs[i] = m;
        }
    }
    pdl_begin();
    __syncthreads();
    /* (through a shuffle: one opaque register each, so base | index stays one LOP3) */
    const uint32_t gsel = __shfl_sync(0xffffffffu, grid_s + 8 * copy, lane);
    const uint32_t ssel = __shfl_sync(0xffffffffu, signs_s + 8 * copy, lane);
    const int nb = a.w.n_in / 256, nb32 = a.w.n_in / 32;
    const int64_t total = (int64_t)mats * slots * a.w.n_out, warps = (int64_t)gridDim.x * XD_WARPS;
    const int64_t gw = (int64_t)blockIdx.x * XD_WARPS + warp;
    const int64_t lo = gw * total / warps;
    const int rows = (int)((gw + 1) * total / warps - lo);
    if (rows <= 0) return;   /* the warp (no block barrier below) */
    /* IQ2_XXS: half-block h = lane; Q2_K: (kb, n, j) = lane (int8_decode.cuh's
     * layouts: Q2_K rows are d | dmin words, then scales, then codes) */
    const bool in_row = lane < (IQ2 ? 2 : 4) * nb, row16 = a.w.row_bytes % 16 == 0;
    const int h = in_row ? lane : 0;   /* lanes past the row read the first part, unused */
    const int kb = IQ2 ? h / 2 : h / 4;
    /* IQ2_XXS: lane's 32 code bytes of a ring row as two 16-byte chunks 2 h,
     * 2 h + 1, chunk i at i ^ (i / 8 % 2): a quarter warp's reads in distinct
     * banks. Q2_K: its 16 code bytes at 16 lane, the scales at 512 + 16 lane. */
    const int ch0 = (2 * lane) ^ ((2 * lane) / 8 % 2), ch1 = (2 * lane + 1) ^ ((2 * lane + 1) / 8 % 2);
    xd_cursor ahead, cur;
    xd_at(a, slots, lo, ahead);
    cur = ahead;
    auto issue = [&](int k) {   /* row `ahead` (stream row k) into ring slot k % XD_RING */
        uint8_t *slot_p = ring + k % XD_RING * XD_SLOT;
        if constexpr (IQ2) {
            const uint8_t *src = ahead.w + 2 * nb + 32 * h;
            if (row16) {
                cp_async16(slot_p + 16 * ch0, src);
                cp_async16(slot_p + 16 * ch1, src + 16);
            } else {
                cp_async8(slot_p + 16 * ch0, src), cp_async8(slot_p + 16 * ch0 + 8, src + 8);
                cp_async8(slot_p + 16 * ch1, src + 16), cp_async8(slot_p + 16 * ch1 + 8, src + 24);
            }
            cp_async4(slot_p + 1024 + 4 * lane, ahead.w + 4 * (h / 4));   /* d of block h / 2 and its neighbour */
        } else {   /* (Q2_K rows of n_in % 1024 == 0 are 16-byte aligned) */
            cp_async16(slot_p + 16 * lane, ahead.w + 20 * nb + 64 * kb + 16 * (h % 4));
            cp_async16(slot_p + 512 + 16 * lane, ahead.w + 4 * nb + 16 * kb);
            cp_async4(slot_p + 1024 + 4 * lane, ahead.w + 4 * kb);
        }
        if (k + 1 < rows) xd_next(a, slots, ahead);
    };
#pragma unroll
    for (int k = 0; k < XD_RING - 1; k++) {
        if (k < rows) issue(k);
        asm volatile("cp.async.commit_group;");   /* (empty past the end: the count stays) */
    }
    int64_t x_at = -1;
    uint32_t xw[IQ2 ? 32 : 16];
    float mf[IQ2 ? 1 : 8];
    float f = 0, *my_y = NULL;
#pragma unroll 1
    for (int k = 0; k < rows; k++) {
        if (cur.xr != x_at) {   /* x's codes of this lane's part, kept over the rows */
            const int8_t *xq = a.q8 + cur.xr * a.w.n_in;
            f = a.q8d[cur.xr * nb32 + 8 * kb];
            if constexpr (IQ2) {
#pragma unroll
                for (int i = 0; i < 8; i++) {
                    uint4 v = *(const uint4 *)(xq + 128 * h + 16 * i);
                    xw[4 * i] = v.x, xw[4 * i + 1] = v.y, xw[4 * i + 2] = v.z, xw[4 * i + 3] = v.w;
                }
            } else {
                const int n = h / 2 % 2, j = h % 2;
                const float *s16 = a.q8s + cur.xr * 2 * nb32 + 16 * kb;
#pragma unroll
                for (int s = 0; s < 4; s++) {
                    uint4 v = *(const uint4 *)(xq + 256 * kb + 128 * n + 32 * s + 16 * j);
                    xw[4 * s] = v.x, xw[4 * s + 1] = v.y, xw[4 * s + 2] = v.z, xw[4 * s + 3] = v.w;
                }
#pragma unroll
                for (int i = 0; i < 8; i++) mf[i] = s16[2 * i + j] * f;   /* sub-block 8 n' + 2 s + j: sum 2 (4 n' + s) + j */
            }
            x_at = cur.xr;
        }
        if (k + XD_RING - 1 < rows) issue(k + XD_RING - 1);
        asm volatile("cp.async.commit_group;");   /* (empty past the end: row k's group is XD_RING - 1 back) */
        asm volatile("cp.async.wait_group %0;" ::"n"(XD_RING - 1));
        const uint8_t *slot_p = ring + k % XD_RING * XD_SLOT;
        uint32_t dw = *(const uint32_t *)(slot_p + 1024 + 4 * lane);
        if constexpr (IQ2) {
            uint4 c[2] = {*(const uint4 *)(slot_p + 16 * ch0), *(const uint4 *)(slot_p + 16 * ch1)};
            int q = in_row ? xd_half_block(c, xw, gsel, ssel) : 0;
            q += __shfl_xor_sync(0xffffffffu, q, 1);
            if (in_row && lane % 2 == 0) red[k % XD_ROWS][kb] = h2f_bits(dw >> (16 * (h / 2 % 2))) * f * (float)q;
        } else {
            uint4 q = *(const uint4 *)(slot_p + 16 * lane), sc = *(const uint4 *)(slot_p + 512 + 16 * lane);
            float v = xd_q2k_block(q, sc, dw, xw, mf, f, h % 2);
            if (in_row && lane % 4 == 0) red[k % XD_ROWS][kb] = v;
        }
        if (lane == k % XD_ROWS) my_y = cur.y;
        if (k % XD_ROWS == XD_ROWS - 1 || k == rows - 1) {   /* the sums of rows k0..k to y */
            __syncwarp();
            if (lane <= k % XD_ROWS && my_y) {
                float v = 0.0f;
                for (int i = 0; i < nb; i++) v += red[lane][i];
                *my_y = IQ2 ? v * 0.125f : v;
            }
            __syncwarp();   /* red is written again by the next rows */
        }
        if (k + 1 < rows) xd_next(a, slots, cur);
    }
}

/* A GPU without the shared memory keeps the tensor-core kernel. */
static void expert_dp4a_init(void) {
    g_expert_dp4a_ok = allow_shared(k_expert_dp4a<DS4_TYPE_IQ2_XXS>, XD_SMEM) &&
                       allow_shared(k_expert_dp4a<DS4_TYPE_Q2_K>, XD_SMEM);
}

/* (a one-token product: one pair a slot) */
template <int TYPE>
static void launch_expert_dp4a_t(cudaStream_t st, const lin_args &a, int slots, int mats) {
    static int fill;
    if (!fill) fill = gpu_fill(k_expert_dp4a<TYPE>, XD_WARPS * WARP, XD_SMEM);
    int need = (int)(((int64_t)slots * mats * a.w.n_out + 4 * XD_WARPS - 1) / (4 * XD_WARPS));   /* >= 4 rows a warp */
    launch_k(k_expert_dp4a<TYPE>, dim3(need < fill ? need : fill), XD_WARPS * WARP, (size_t)XD_SMEM, st, a, slots,
             mats);
}

static void launch_expert_dp4a(cudaStream_t st, const lin_args &a, int slots, int mats) {
    if (a.w.type == DS4_TYPE_IQ2_XXS) launch_expert_dp4a_t<DS4_TYPE_IQ2_XXS>(st, a, slots, mats);
    else launch_expert_dp4a_t<DS4_TYPE_Q2_K>(st, a, slots, mats);
}
