/* k_linear_q8s: the qat-q8 chunk products of dense Q8_0 rows (the attention
 * projections, the shared expert, the output groups) with a 256-element
 * stage instead of k_linear_q8x's 32-element slice: the rows' codes and
 * scales and x's codes and scales come in by cp.async into double buffers
 * while the previous stage multiplies, two barriers a stage instead of
 * sixteen. Q8_0 codes need no decoding, so they go from memory to the A
 * tile untouched. Same products and the same float steps in the same order
 * as k_linear_q8x: the same bits. (The 2-bit expert rows decoded into such a
 * shared tile measured slower, 198 vs 187 ms a chunk for IQ2_XXS; below,
 * k_linear_2bit stages their raw code words the same way and decodes them
 * into registers instead: 128 ms.)
 *
 * A block: 128 rows x 64 tokens, 8 warps of 32 x 32 (as k_linear_q8x).
 * Shared tiles are [rows][256] int8 (q8s_ldsm_at's swizzle), read by
 * ldmatrix straight into the MMA's register order: two 8-byte loads a row
 * left rows g and g + 8 to be interleaved by four moves an MMA (~4.5 of its
 * ~25 instructions, ncu). */
#pragma once

#include "act8.cuh"

#define Q8S_BM 128
#define Q8S_BN 64
#define Q8S_THREADS 256

/* k_linear_q8s got its shared memory (q8s_init; a GPU of 99 KB a block
 * does not give its 104 KB: k_linear_q8x then) */
static bool g_q8s_ok = false;

/* Rows it takes: Q8_0 of whole 256 blocks (16-byte aligned stages). */
static inline bool q8s_fits(const dmat &w) { return g_q8s_ok && w.type == DS4_TYPE_Q8_0 && w.n_in % 256 == 0; }

/* Byte offset of (row r, 16-byte chunk c) in k_linear_2bit's [64][256] x
 * tile: chunk c ^ (2 (r & 3)), so a half warp's 8-byte fragment loads (4
 * rows x 32 bytes of one slice, q8s_frag) fall in distinct banks. */
__device__ __forceinline__ int q8s_at(int r, int c) { return r * 256 + ((c ^ ((r & 3) << 1)) << 4); }

/* A lane's 8 bytes of slice s (elements 8 tg ..) of row r. */
__device__ __forceinline__ uint2 q8s_frag(const uint8_t *tile, int r, int s, int tg) {
    return *(const uint2 *)(tile + q8s_at(r, 2 * s + (tg >> 1)) + 8 * (tg & 1));
}

/* A double-buffered stage loop's turn at stage b of nb: once every warp is
 * done with stage b - 1 (whose buffer the next copies reuse), stage b + 1's
 * copies go out (issue(b + 1, its buffer)); on return stage b's bytes have
 * landed, from every thread's copies. */
template <typename Issue>
__device__ __forceinline__ void stage_turn(int b, int nb, Issue &issue) {
    __syncthreads();
    if (b + 1 < nb) {
        issue(b + 1, (b + 1) & 1);
        asm volatile("cp.async.wait_group 1;" ::: "memory");
    } else {
        asm volatile("cp.async.wait_group 0;" ::: "memory");
    }
    __syncthreads();
}

/* Byte offset of (row r, 16-byte chunk c) in k_linear_q8s's [rows][256]
 * tiles: chunk c ^ (r & 7), so each 8-row phase of an ldmatrix (one chunk
 * of 8 consecutive rows) falls in distinct banks. */
__device__ __forceinline__ int q8s_ldsm_at(int r, int c) { return r * 256 + ((c ^ (r & 7)) << 4); }

/* Dynamic shared memory: [2][128][256] row codes, [2][128][8] fp16 row
 * scales, [2][64][256] x codes, [2][64][8] x scales (byte offsets). */
static constexpr uint32_t Q8S_WD = 2 * Q8S_BM * 256, Q8S_XQ = Q8S_WD + 2 * Q8S_BM * 16,
                          Q8S_XD = Q8S_XQ + 2 * Q8S_BN * 256;
static constexpr size_t Q8S_SMEM = Q8S_XD + 2 * Q8S_BN * 32;

/* Grid: (row tiles, token tiles, 1), as k_linear_q8x. */
__global__ void __launch_bounds__(Q8S_THREADS, 2) k_linear_q8s(lin_args a) {
    pdl_begin();
    extern __shared__ __align__(16) uint8_t q8s_sh[];
    /* the parts' shared-window addresses (copies, ldmatrix) and the scales' pointers */
    const uint32_t wq = (uint32_t)__cvta_generic_to_shared(q8s_sh), wd = wq + Q8S_WD, xq = wq + Q8S_XQ,
                   xd = wq + Q8S_XD;
    const uint16_t *wd_p = (const uint16_t *)(q8s_sh + Q8S_WD);
    const float *xd_p = (const float *)(q8s_sh + Q8S_XD);

    int tid = threadIdx.x, warp = tid / WARP, lane = tid % WARP;
    int g = lane / 4, tg = lane % 4;
    int wm = warp % 4, wn = warp / 4;
    int r0 = blockIdx.x * Q8S_BM;
    lin_block blk;
    if (!lin_block_of(a, blockIdx.z, blk)) return;
    const int n_in = a.w.n_in, nb = n_in / 256;

    /* This thread's copies, the same at every stage but for the stage's
     * offset: the 16-byte chunk c16 of rows tid / 16 + 16 k (k < 8) and of
     * tokens tid / 16 + 16 k (k < 4), all of one swizzle (16 k keeps r & 7);
     * then one scale chunk: threads 0-127 row tid's 8 fp16, threads 128-255
     * half tid % 2 of token (tid - 128) / 2's 8 floats. */
    const int c16 = tid % 16, rbase = r0 + tid / 16;
    const uint32_t copy_at = q8s_ldsm_at(tid / 16, c16);
    const uint32_t row_bytes = (uint32_t)a.w.row_bytes;
    const uint8_t *wcodes = blk.w + 2 * (n_in / 32) + 16 * c16;
    const uint8_t *wscales = blk.w + (size_t)(uint32_t)min(r0 + tid, a.w.n_out - 1) * row_bytes;
    const int xt = (tid - Q8S_BM) / 2;   /* threads 128-255: the token of their x scale copy */

    /* ldmatrix addresses of lane l, at slice 0 (slice s: ^ s << 5, chunk 2 s
     * of the swizzle's XOR): A, the warp's rows l % 8 + 8 (l / 8 % 2) (the
     * MMA's a0-a3: rows g, g + 8 of the slice's first 16 bytes, then of its
     * second, chunk + l / 16); B, its tokens l % 8 + 8 (l / 16) (tokens 0-7's
     * two halves, then tokens 8-15's: two n8 fragments, chunk + l / 8 % 2). */
    const uint32_t a_at = q8s_ldsm_at(wm * 32 + lane % 8 + 8 * (lane / 8 % 2), lane / 16);
    const uint32_t b_at = q8s_ldsm_at(wn * 32 + lane % 8 + 8 * (lane / 16), lane / 8 % 2);

    for (int t0 = blk.p0 + blockIdx.y * Q8S_BN; t0 < blk.p1; t0 += gridDim.y * Q8S_BN) {
        /* x's rows: their code offsets at stage 0 (no x row read again at each stage) */
        int64_t xofs[4];
#pragma unroll
        for (int k = 0; k < 4; k++) {
            int t = tid / 16 + 16 * k, pt = t0 + t < blk.p1 ? t0 + t : blk.p1 - 1;   /* past the end: a real row, unused */
            xofs[k] = (a.xrow ? a.xrow[pt] : pt) * (int64_t)n_in + 16 * c16;
        }
        const float *xscales = nullptr;
        if (tid >= Q8S_BM) {
            int pt = t0 + xt < blk.p1 ? t0 + xt : blk.p1 - 1;
            xscales = a.q8d + (a.xrow ? a.xrow[pt] : pt) * (int64_t)(n_in / 32) + 4 * (tid % 2);
        }
        /* stage b's loads into buffer u: 16 chunks of 16 bytes a row and a token */
        auto issue = [&](int b, int u) {
            const uint8_t *codes = wcodes + 256 * b;
#pragma unroll
            for (int k = 0; k < 8; k++) {
                const uint32_t row = min(rbase + 16 * k, a.w.n_out - 1);   /* past the end: a real row, unused */
                cp_async16_to(wq + u * (Q8S_BM * 256) + copy_at + k * (16 * 256), codes + (size_t)row * row_bytes);
            }
#pragma unroll
            for (int k = 0; k < 4; k++)
                cp_async16_to(xq + u * (Q8S_BN * 256) + copy_at + k * (16 * 256), a.q8 + xofs[k] + 256 * b);
            if (tid < Q8S_BM)
                cp_async16_to(wd + (u * Q8S_BM + tid) * 16, wscales + 16 * b);
            else
                cp_async16_to(xd + ((u * Q8S_BN + xt) * 8 + 4 * (tid % 2)) * 4, xscales + 8 * b);
            asm volatile("cp.async.commit_group;" ::: "memory");
        };

        float acc[2][4][4];
#pragma unroll
        for (int i = 0; i < 2; i++)
#pragma unroll
            for (int j = 0; j < 4; j++)
#pragma unroll
                for (int c = 0; c < 4; c++) acc[i][j][c] = 0.0f;

        __syncthreads();   /* the previous token tile's last reads */
        issue(0, 0);
        for (int b = 0; b < nb; b++) {
            int u = b & 1;
            stage_turn(b, nb, issue);
            const uint32_t at = wq + u * (Q8S_BM * 256), bt = xq + u * (Q8S_BN * 256);
            const uint16_t *wdu = wd_p + u * Q8S_BM * 8;
            const float *xdu = xd_p + u * Q8S_BN * 8;
#pragma unroll 2
            for (int s = 0; s < 8; s++) {
                uint32_t af[2][4], bf[2][4];   /* A: 16 rows each; B: tokens 0-15, 16-31 of the warp */
                float sr[2][2], f[4][2];       /* rows' scales [i][g, g + 8]; tokens' [j][2 tg, + 1] */
#pragma unroll
                for (int i = 0; i < 2; i++) {
                    ldsm_x4_at(af[i], at + i * (16 * 256) + (a_at ^ (s << 5)));
                    ldsm_x4_at(bf[i], bt + i * (16 * 256) + (b_at ^ (s << 5)));
#pragma unroll
                    for (int h = 0; h < 2; h++) sr[i][h] = h2f_bits(wdu[(wm * 32 + i * 16 + g + 8 * h) * 8 + s]);
                }
#pragma unroll
                for (int j = 0; j < 4; j++)
#pragma unroll
                    for (int c = 0; c < 2; c++) f[j][c] = xdu[(wn * 32 + j * 8 + 2 * tg + c) * 8 + s];
                /* the slice's eight products first, then their float steps
                 * (q8_slice_product's, in the same order a value): each
                 * IMMA's latency under the next ones instead of before its
                 * own float step */
                int d[2][4][4];
#pragma unroll
                for (int j = 0; j < 4; j++)
#pragma unroll
                    for (int i = 0; i < 2; i++)
                        mma_s8_from(d[i][j], I2F_BIAS_BITS, af[i][0], af[i][1], af[i][2], af[i][3],
                                    bf[j / 2][2 * (j % 2)], bf[j / 2][2 * (j % 2) + 1]);
#pragma unroll
                for (int j = 0; j < 4; j++)
#pragma unroll
                    for (int i = 0; i < 2; i++)
#pragma unroll
                        for (int c = 0; c < 4; c++)
                            acc[i][j][c] = fmaf(__int_as_float(d[i][j][c]) - I2F_BIAS, sr[i][c / 2] * f[j][c % 2],
                                                acc[i][j][c]);
            }
        }
        block_tile_store(acc, blk, a, r0, t0, wm, wn, g, tg);
    }
}

static void q8s_init(void) { g_q8s_ok = allow_shared(k_linear_q8s, Q8S_SMEM); }

static void launch_q8s(cudaStream_t st, dim3 grid, const lin_args &a) {
    launch_k(k_linear_q8s, grid, Q8S_THREADS, Q8S_SMEM, st, a);
}

/* ---- k_linear_2bit: the routed 2-bit rows of a qat-q8 chunk ----
 * k_linear_q8x's products of IQ2_XXS (gate / up) and Q2_K (down) rows with
 * a 256 block a stage: the rows' code words and x's codes, scale and sums
 * come in by cp.async into double buffers while the previous stage
 * multiplies, and each warp decodes its A fragments straight into
 * registers, so no decoded tile goes through shared memory: two barriers a
 * 256 block instead of k_linear_q8x's sixteen, whose next slice's loads had
 * only one slice's products to hide behind.
 *
 * A block: 128 rows x 64 tokens; a warp 16 rows x 64 tokens, eight
 * m16n8k32 products a 32-element slice from one decode of its two rows
 * (lane (g, tg): rows g, g + 8, elements 8 tg ..). The same integer sums and
 * the same float step a block as k_linear_q8x, so the same bits:
 *  - IQ2_XXS: a slice's sums times 2 s + 1 added up as integers;
 *  - Q2_K: the codes times their sub-block's scale, the tensor cores adding
 *    the block; the minimums one fp16 product a block. */
#define K2S_ROWB 80           /* a row's 64 code bytes of a stage, then Q2_K's 16 scale bytes
                               * (IQ2_XXS: padding): a fragment's 8 rows in distinct banks */
#define K2S_MAX_IN 16384      /* IQ2_XXS: the rows' fp16 d stay in shared memory, n_in / 128 bytes a row */

static bool g_k2s_ok[2] = {false, false};   /* IQ2_XXS's, Q2_K's kernel got its shared memory (k2s_init) */

/* Rows of n_in % 1024 == 0: IQ2_XXS rows (66 bytes a block) are 8-byte
 * aligned and copied 8 bytes at a time, Q2_K rows (84) 16. */
static inline bool k2s_fits(const dmat &w) {
    return w.n_in % 1024 == 0 && g_k2s_ok[w.type == DS4_TYPE_Q2_K] &&
           ((w.type == DS4_TYPE_IQ2_XXS && w.n_in <= K2S_MAX_IN) || w.type == DS4_TYPE_Q2_K);
}

/* Dynamic shared memory: per buffer, the rows' code words (Q2_K: and scale
 * bytes, d and dmin) and x's codes and scale (Q2_K: and its sums over each
 * 16); IQ2_XXS once the rows' d of every block. */
static size_t k2s_smem(int type, int n_in) {
    bool iq2 = type == DS4_TYPE_IQ2_XXS;
    size_t buf = (size_t)Q8S_BM * K2S_ROWB + (size_t)Q8S_BN * (256 + 16) + (iq2 ? 0 : Q8S_BN * 64 + Q8S_BM * 4);
    return 2 * buf + (iq2 ? (size_t)Q8S_BM * 2 * (n_in / 256) : 0);
}

/* A lane's 8 signed grid values of a row's slice: entry tg of the slice's
 * code word c. iq2_slice's values (int8_decode.cuh) without its sign table:
 * the sign byte's eighth bit is the parity of its seven, as ksigns_iq2xs
 * holds it, so no table is kept in this kernel's shared memory. */
__device__ __forceinline__ uint2 iq2s_frag(uint2 c, int tg, const uint64_t *grid) {
    uint64_t gv = grid[(c.x >> (8 * tg)) & 0xff];
    uint32_t s7 = (c.y >> (7 * tg)) & 127, sg = s7 | ((__popc(s7) & 1u) << 7);
    return make_uint2(negate_bytes((uint32_t)gv, sg & 15), negate_bytes((uint32_t)(gv >> 32), sg >> 4));
}

/* Two sub-blocks' minimums (the high nibbles of two scale bytes) as an fp16 pair */
__device__ __forceinline__ uint32_t q2k_min_pair(uint32_t two) {
    __half2 h = __halves2half2(__int2half_rn((int)((two >> 4) & 0xf)), __int2half_rn((int)((two >> 12) & 0xf)));
    return *(uint32_t *)&h;
}

__device__ __forceinline__ uint32_t half_pair(float lo, float hi) {
    __half2 h = __halves2half2(__float2half_rn(lo), __float2half_rn(hi));
    return *(uint32_t *)&h;
}

/* The dynamic shared memory's parts, as k2s_smem sizes them */
struct k2s_parts {
    uint8_t *wq;     /* [2][128][K2S_ROWB] code words (and scales) */
    uint8_t *xq;     /* [2][64][256] codes (q8s_at) */
    float *xd;       /* [2][64][4] scale of the block ([0]) */
    float *xs;       /* Q2_K: [2][64][16] code sums a 16 */
    uint32_t *wdm;   /* Q2_K: [2][128] d | dmin << 16 */
    uint16_t *wd;    /* IQ2_XXS (there instead): [128][nb] d */
    __device__ __forceinline__ k2s_parts(uint8_t *sh, bool iq2)
        : wq(sh), xq(wq + 2 * Q8S_BM * K2S_ROWB), xd((float *)(xq + 2 * Q8S_BN * 256)), xs(xd + 2 * Q8S_BN * 4),
          wdm((uint32_t *)(xs + (iq2 ? 0 : 2 * Q8S_BN * 16))), wd((uint16_t *)wdm) {}
};

/* What a tile's products need of the kernel, by value (k2s_tile) */
struct k2s_tile_in {
    const uint8_t *w;            /* the expert's rows */
    const int8_t *q8;            /* x's codes, scales, sums */
    const float *q8d, *q8s;
    float *y;
    int64_t ys;
    int n_out, nb, r0, t0, p1;   /* the tile: rows r0.., tokens t0..p1 - 1 */
    uint32_t wofs[4], xofs[4];   /* this thread's row and x offsets at stage 0 (k_linear_2bit) */
};

__shared__ uint64_t k2s_grid_sh[256];   /* IQ2_XXS's grid (at file scope: k2s_tile reads it) */

/* The products of a tile's first FR token fragments, its rows' blocks
 * staged through the double buffers. A function of its own a fragment
 * count, not inlined: inlined into one kernel, the eight copies came out
 * scheduled for fewer registers than each alone (the 8-fragment copy's
 * B fragments loaded one or three instructions before their IMMA, against
 * 3-14 in a kernel of that copy only: 1.42 ms a gate / up launch against
 * 1.17, ncu). */
template <int TYPE, int FR>
__device__ __noinline__ void k2s_tile(const k2s_tile_in ti) {
    constexpr bool IQ2 = TYPE == DS4_TYPE_IQ2_XXS;
    extern __shared__ __align__(16) uint8_t k2s_sh[];
    const int nb = ti.nb;
    const k2s_parts sp(k2s_sh, IQ2);
    uint8_t *wq = sp.wq, *xq = sp.xq;
    float *xd = sp.xd, *xs = sp.xs;
    uint32_t *wdm = sp.wdm;
    const uint16_t *wd = sp.wd;   /* k_linear_2bit's copy */
    const int tid = threadIdx.x, warp = tid / WARP, lane = tid % WARP;
    const int g = lane / 4, tg = lane % 4, wr = warp * 16 + g, xc = tid % 16;

    /* stage b's loads into buffer u (common.cuh's row layouts) */
    auto issue = [&](int b, int u) {
        uint8_t *wu = wq + (size_t)u * Q8S_BM * K2S_ROWB;
        if constexpr (IQ2) {
#pragma unroll
            for (int k = 0; k < 4; k++)
                cp_async8(wu + (tid / 8 + 32 * k) * K2S_ROWB + 8 * (tid % 8), ti.w + (ti.wofs[k] + 64 * b));
        } else {   /* d | dmin (4 nb bytes), scales (16 nb), codes (64 nb) */
            const int r = tid % Q8S_BM;
            const uint8_t *row = ti.w + ti.wofs[0];
            uint8_t *dst = wu + r * K2S_ROWB;
            if (tid < Q8S_BM) {
#pragma unroll
                for (int c = 0; c < 3; c++) cp_async16(dst + 16 * c, row + (20 * nb + 64 * b + 16 * c));
            } else {
                cp_async16(dst + 48, row + (20 * nb + 64 * b + 48));
                cp_async16(dst + 64, row + (4 * nb + 16 * b));
                cp_async4(wdm + u * Q8S_BM + r, row + 4 * b);
            }
        }
#pragma unroll
        for (int k = 0; k < 4; k++) {
            const int t = tid / 16 + 16 * k;
            cp_async16(xq + (size_t)u * Q8S_BN * 256 + q8s_at(t, xc), ti.q8 + (ti.xofs[k] + 256 * b));
            /* xofs = x row x n_in + 16 xc: the row's scales at xofs / 32 (xc 0), sums at xofs / 16 - xc */
            if (xc == 0) cp_async16(xd + ((size_t)u * Q8S_BN + t) * 4, ti.q8d + (ti.xofs[k] / 32 + 8 * b));
            if (!IQ2 && xc < 4)
                cp_async16(xs + ((size_t)u * Q8S_BN + t) * 16 + 4 * xc, ti.q8s + (ti.xofs[k] / 16 + 3 * xc + 16 * b));
        }
        asm volatile("cp.async.commit_group;" ::: "memory");
    };

    float acc[8][4];   /* [token frag j][c]: rows wr, wr + 8 (c / 2) x tokens 8 j + 2 tg + c % 2 */
#pragma unroll
    for (int j = 0; j < FR; j++)
#pragma unroll
        for (int c = 0; c < 4; c++) acc[j][c] = 0.0f;

    issue(0, 0);
    for (int b = 0; b < nb; b++) {
        int u = b & 1;
        stage_turn(b, nb, issue);
        const uint8_t *wt = wq + (size_t)u * Q8S_BM * K2S_ROWB, *xt = xq + (size_t)u * Q8S_BN * 256;
        const uint8_t *w0 = wt + wr * K2S_ROWB, *w1 = w0 + 8 * K2S_ROWB;
        int iacc[8][4];   /* the block's integer sums (Q2_K: read as floats off I2F_BIAS) */
        /* slice s's products into iacc. Q2_K's first slice starts them from
         * I2F_BIAS in the product's own accumulator operand, not from 32 moves
         * a block (IQ2_XXS starts from zeros: its first slice set apart
         * spills) */
        auto slice = [&](int s, bool first) {
            uint2 a0, a1;
            [[maybe_unused]] int m0 = 1, m1 = 1;   /* IQ2_XXS only */
            if constexpr (IQ2) {
                uint2 c0 = *(const uint2 *)(w0 + 8 * s), c1 = *(const uint2 *)(w1 + 8 * s);
                a0 = iq2s_frag(c0, tg, k2s_grid_sh), a1 = iq2s_frag(c1, tg, k2s_grid_sh);
                m0 = 2 * (int)(c0.y >> 28) + 1, m1 = 2 * (int)(c1.y >> 28) + 1;
            } else {   /* slice s = 4 n + sh: codes at shift 2 sh of bytes 32 n ..; sub-block 8 n + 2 sh + tg / 2 */
                int n = s / 4, sh = 2 * (s % 4), sb = 64 + 8 * n + s % 4 * 2 + tg / 2;
                uint2 q0 = *(const uint2 *)(w0 + 32 * n + 8 * tg), q1 = *(const uint2 *)(w1 + 32 * n + 8 * tg);
                uint32_t l0 = w0[sb] & 0xf, l1 = w1[sb] & 0xf;
                a0 = make_uint2(((q0.x >> sh) & 0x03030303u) * l0, ((q0.y >> sh) & 0x03030303u) * l0);
                a1 = make_uint2(((q1.x >> sh) & 0x03030303u) * l1, ((q1.y >> sh) & 0x03030303u) * l1);
            }
#pragma unroll
            for (int j = 0; j < FR; j++) {
                uint2 bf = q8s_frag(xt, 8 * j + g, s, tg);   /* B column g: token 8 j + g */
                if constexpr (IQ2) {
                    int d[4];
                    mma_s8_from(d, 0, a0.x, a1.x, a0.y, a1.y, bf.x, bf.y);
                    iacc[j][0] += d[0] * m0, iacc[j][1] += d[1] * m0;
                    iacc[j][2] += d[2] * m1, iacc[j][3] += d[3] * m1;
                } else if (first) {
                    mma_s8_from(iacc[j], I2F_BIAS_BITS, a0.x, a1.x, a0.y, a1.y, bf.x, bf.y);
                } else {
                    mma_s8(iacc[j], a0.x, a1.x, a0.y, a1.y, bf.x, bf.y);
                }
            }
        };
        if constexpr (IQ2) {
#pragma unroll
            for (int j = 0; j < FR; j++)
#pragma unroll
                for (int c = 0; c < 4; c++) iacc[j][c] = 0;
        } else {
            slice(0, true);
        }
#pragma unroll 1
        for (int s = IQ2 ? 0 : 1; s < 8; s++) slice(s, false);
        /* the block's end: acc += x scale (d I - dmin M), as k_linear_q8x (IQ2_XXS: d / 8, no M) */
        float d0, d1;
        [[maybe_unused]] float n0 = 0, n1 = 0, b0 = 0, b1 = 0;   /* Q2_K only, as ma and m4 */
        [[maybe_unused]] uint32_t ma[4] = {0, 0, 0, 0};   /* Q2_K: the minimums' A fragment, rows wr, wr + 8 */
        if constexpr (IQ2) {
            d0 = h2f_bits(wd[wr * nb + b]) * 0.125f, d1 = h2f_bits(wd[(wr + 8) * nb + b]) * 0.125f;
        } else {
            uint32_t dm0 = wdm[u * Q8S_BM + wr], dm1 = wdm[u * Q8S_BM + wr + 8];
            d0 = h2f_bits(dm0), n0 = h2f_bits(dm0 >> 16), d1 = h2f_bits(dm1), n1 = h2f_bits(dm1 >> 16);
            /* -d I2F_BIAS, exact (d an fp16 value: 11 significant bits, the bias 2), so
             * fmaf(d, B + I, -d B) rounds d I once, as d * (B + I - B) did, without
             * the subtraction (a zero d I may come out +0 where that gave -0) */
            b0 = -d0 * I2F_BIAS, b1 = -d1 * I2F_BIAS;
            ma[0] = q2k_min_pair(*(const uint16_t *)(w0 + 64 + 2 * tg));
            ma[1] = q2k_min_pair(*(const uint16_t *)(w1 + 64 + 2 * tg));
            ma[2] = q2k_min_pair(*(const uint16_t *)(w0 + 64 + 2 * tg + 8));
            ma[3] = q2k_min_pair(*(const uint16_t *)(w1 + 64 + 2 * tg + 8));
        }
        const float *xdu = xd + (size_t)u * Q8S_BN * 4;
#pragma unroll
        for (int j = 0; j < FR; j++) {
            float f0 = xdu[(8 * j + 2 * tg) * 4], f1 = xdu[(8 * j + 2 * tg + 1) * 4];
            [[maybe_unused]] float m4[4] = {0, 0, 0, 0};
            if constexpr (!IQ2) {   /* B: token 8 j + g's sums over sub-blocks 2 tg, 2 tg + 1, + 8 */
                const float *xsr = xs + ((size_t)u * Q8S_BN + 8 * j + g) * 16 + 2 * tg;
                mma_f16(m4, ma[0], ma[1], ma[2], ma[3], half_pair(xsr[0], xsr[1]), half_pair(xsr[8], xsr[9]));
            }
#pragma unroll
            for (int c = 0; c < 4; c++) {
                float v;
                if constexpr (IQ2) {
                    v = (c < 2 ? d0 : d1) * (float)iacc[j][c];
                } else {   /* d (B + I) - d B: d I in one rounding, d B exact (see b0 above) */
                    v = fmaf(c < 2 ? d0 : d1, __int_as_float(iacc[j][c]), c < 2 ? b0 : b1);
                    v = fmaf(-(c < 2 ? n0 : n1), m4[c], v);
                }
                acc[j][c] = fmaf(c % 2 ? f1 : f0, v, acc[j][c]);
            }
        }
    }
#pragma unroll
    for (int j = 0; j < FR; j++)
#pragma unroll
        for (int c = 0; c < 4; c++) {
            int r = ti.r0 + wr + 8 * (c / 2), p = ti.t0 + 8 * j + 2 * tg + c % 2;
            if (r < ti.n_out && p < ti.p1) ti.y[(int64_t)p * ti.ys + r] = acc[j][c];
        }
}

/* Grid: (row tiles, token tiles, experts in use or 1), as k_linear_q8x.
 * skip: a tile's 8-token fragments past its last token are not multiplied
 * (a 2K chunk gives an expert ~48 of the tile's 64 tokens: a quarter of
 * each slice's products and their 2 s + 1 steps were of padding). The
 * fragment count is a compile-time constant of the tile's code (k2s_tile,
 * one function a count 1..8): a loop bound read at run time kept the
 * compiler from interleaving the fragments' loads and MMAs (8% slower at 8
 * of 8), and two inlined copies (6 and 8) gave 4,254 tok/s at 2K where
 * eight gave 4,435. */
template <int TYPE>
__global__ void __launch_bounds__(Q8S_THREADS, 2) k_linear_2bit(lin_args a, int skip) {
    constexpr bool IQ2 = TYPE == DS4_TYPE_IQ2_XXS;
    pdl_begin();
    extern __shared__ __align__(16) uint8_t k2s_sh[];
    __shared__ uint32_t xrow_sh[Q8S_BN];   /* the token tile's x rows (each thread's four then held as xofs) */
    const int n_in = a.w.n_in, nb = n_in / 256;

    const int tid = threadIdx.x, r0 = blockIdx.x * Q8S_BM;
    lin_block blk;
    if (!lin_block_of(a, blockIdx.z, blk)) return;
    if (blk.p0 + blockIdx.y * Q8S_BN >= blk.p1) return;   /* no tile: no copies left in flight */
    /* a row's offset in the expert's rows (< 2^31: 32-bit offsets keep the copies' registers few) */
    auto wrow = [&](int r) { return blk.w + (uint32_t)(min(r0 + r, a.w.n_out - 1) * (int)a.w.row_bytes); };
    if constexpr (IQ2) {
        /* the rows' d of every block, past the buffers (k2s_tile's wd) */
        uint16_t *wd = k2s_parts(k2s_sh, true).wd;
        for (int i = tid; i < 256; i += Q8S_THREADS) k2s_grid_sh[i] = d_iq2_grid[i];
        for (int i = tid; i < Q8S_BM * (nb / 4); i += Q8S_THREADS) {   /* with the first stage's group */
            int r = i / (nb / 4), c = i % (nb / 4);
            cp_async8(wd + r * nb + 4 * c, wrow(r) + 8 * c);
        }
    }

    /* This thread's copies of the rows, the same at every stage but for the
     * stage's offset (their index arithmetic, done again at each stage, was
     * ~28% of a stage's instructions): IQ2_XXS the 8-byte chunk tid % 8 of
     * rows tid / 8 + 32 k; Q2_K row tid % 128, code chunks 0-2 (warps 0-3)
     * or chunk 3, the scale bytes and d | dmin (warps 4-7). Byte offsets in
     * the expert's rows at stage 0. */
    constexpr int WCOPIES = IQ2 ? 4 : 1;
    uint32_t wofs[WCOPIES];
#pragma unroll
    for (int k = 0; k < WCOPIES; k++) {
        const int r = IQ2 ? tid / 8 + 32 * k : tid % Q8S_BM;
        wofs[k] = (uint32_t)(min(r0 + r, a.w.n_out - 1) * (int)a.w.row_bytes) +
                  (IQ2 ? 2 * nb + 8 * (tid % 8) : 0);
    }
    /* and of x: the 16-byte chunk xc of tokens tid / 16 + 16 k (their rows
     * set at each token tile) */
    const int xc = tid % 16;

    for (int t0 = blk.p0 + blockIdx.y * Q8S_BN; t0 < blk.p1; t0 += gridDim.y * Q8S_BN) {
        if (tid < Q8S_BN) {
            int pt = t0 + tid < blk.p1 ? t0 + tid : blk.p1 - 1;   /* past the end: a real row, unused */
            xrow_sh[tid] = a.xrow ? a.xrow[pt] : pt;
        }
        __syncthreads();   /* the previous token tile's last reads; k2s_grid_sh, xrow_sh */
        uint32_t xofs[4];   /* x's code offsets (stage 0) of this thread's tokens */
#pragma unroll
        for (int k = 0; k < 4; k++) xofs[k] = xrow_sh[tid / 16 + 16 * k] * (uint32_t)n_in + 16 * xc;

        k2s_tile_in in{blk.w, a.q8, a.q8d, a.q8s, blk.y, a.ys, a.w.n_out, nb, r0, t0, blk.p1, {}, {}};
#pragma unroll
        for (int k = 0; k < 4; k++) in.wofs[k] = wofs[k < WCOPIES ? k : 0], in.xofs[k] = xofs[k];
        /* token fragments with a token (block-uniform) */
        switch (skip ? min(8, (blk.p1 - t0 + 7) / 8) : 8) {
        case 1: k2s_tile<TYPE, 1>(in); break;
        case 2: k2s_tile<TYPE, 2>(in); break;
        case 3: k2s_tile<TYPE, 3>(in); break;
        case 4: k2s_tile<TYPE, 4>(in); break;
        case 5: k2s_tile<TYPE, 5>(in); break;
        case 6: k2s_tile<TYPE, 6>(in); break;
        case 7: k2s_tile<TYPE, 7>(in); break;
        default: k2s_tile<TYPE, 8>(in); break;
        }
    }
}

static void k2s_init(void) {
    g_k2s_ok[0] = allow_shared(k_linear_2bit<DS4_TYPE_IQ2_XXS>, k2s_smem(DS4_TYPE_IQ2_XXS, K2S_MAX_IN));
    g_k2s_ok[1] = allow_shared(k_linear_2bit<DS4_TYPE_Q2_K>, k2s_smem(DS4_TYPE_Q2_K, 0));
}

static void launch_k2s(cudaStream_t st, dim3 grid, const lin_args &a) {
    size_t sh = k2s_smem(a.w.type, a.w.n_in);
    /* DS4_CUDA_NO_TOKSKIP=1: every fragment multiplied (read at each enqueue, the tests') */
    int skip = !getenv("DS4_CUDA_NO_TOKSKIP");
    if (a.w.type == DS4_TYPE_IQ2_XXS) launch_k(k_linear_2bit<DS4_TYPE_IQ2_XXS>, grid, Q8S_THREADS, sh, st, a, skip);
    else launch_k(k_linear_2bit<DS4_TYPE_Q2_K>, grid, Q8S_THREADS, sh, st, a, skip);
}
