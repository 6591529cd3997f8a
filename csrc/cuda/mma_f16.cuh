/* Chunk products of F16 rows on the fp16 tensor cores: y[t][r] = sum_k
 * W[r][k] x[t][k] (the compressors', the indexer's and the router's
 * matrices).
 *
 * F16 weights are exact fp16 operands, so they go from memory to the A tile
 * untouched (k_linear_mma split every weight into two bf16 parts in every
 * block: five bf16 products a 16-k step, and a decode a weight a block).
 * x is float32: k_f16_parts writes it once a product as three fp16 parts of
 * x times a power of two a token, h + m + l (33 significant bits), the
 * power chosen so that the token's largest |x| lands in [2^13, 2^14): no
 * part overflows, and what the parts leave out (fp16 subnormals' last bit)
 * is under 2^-38 of that largest |x|, far below the float32 rounding of
 * the sum. Every W x part product is then exact in the fp32 accumulators,
 * each 16-k step's three products start from zero and go into the sum in
 * fp32 (as k_linear_mma: the tensor cores' own adds truncate), and the
 * token's 2^-e at the store is exact. Float32-grade, three products a
 * 16-k step instead of five.
 *
 * k_linear_f16s: a block of BM rows (256, 128 or 64: below) x 64 tokens
 * walks k in stages of 64 brought by cp.async into double buffers
 * (act8_staged.cuh's stage_turn), read by ldmatrix. */
#pragma once

#include <cuda_fp16.h>

#include "act8_staged.cuh"   /* stage_turn; act8.cuh's mma_f16 */
#include "kernels.cuh"       /* lin_args, lin_block_of */

#define F16S_BN 64
#define F16S_BK 64   /* k a stage: a row's 128 bytes, eight 16-byte chunks */
#define F16S_THREADS 256
#define F16S_PARTS_THREADS 256

/* x as k_f16_parts writes it: part q of row t at p + q * cap + t * n_in,
 * and the row's 2^-e at inv[t]. */
struct f16x {
    __half *p;
    float *inv;
    int64_t cap, rows;   /* halves a part holds; rows inv holds */
};

/* The three parts of row blockIdx.x of x (n_in floats at x + t * xs; n_in
 * and xs multiples of 4, x 16-byte aligned). */
__global__ void __launch_bounds__(F16S_PARTS_THREADS) k_f16_parts(const float *x, int64_t xs, int n_in, f16x o) {
    pdl_begin();
    __shared__ float red[F16S_PARTS_THREADS / WARP];
    const int t = blockIdx.x;
    const float *row = x + (int64_t)t * xs;
    float mx = 0.0f;
    for (int k = 4 * threadIdx.x; k < n_in; k += 4 * F16S_PARTS_THREADS) {
        float4 v = *(const float4 *)(row + k);
        mx = fmaxf(mx, fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w))));
    }
    mx = warp_max(mx);
    if (threadIdx.x % WARP == 0) red[threadIdx.x / WARP] = mx;
    __syncthreads();
    mx = red[0];
#pragma unroll
    for (int w = 1; w < F16S_PARTS_THREADS / WARP; w++) mx = fmaxf(mx, red[w]);
    /* scale 2^e with mx 2^e in [2^13, 2^14); zero, inf and NaN rows unscaled */
    int e = 0;
    if (mx > 0.0f && mx <= 3.4e38f) {
        int E;
        frexpf(mx, &E);   /* mx in [2^(E-1), 2^E) */
        e = min(max(14 - E, -126), 126);
    }
    const float s = __int_as_float((127 + e) << 23);
    if (threadIdx.x == 0) o.inv[t] = __int_as_float((127 - e) << 23);
    __half *h = o.p + (int64_t)t * n_in, *m = h + o.cap, *l = m + o.cap;
    for (int k = 4 * threadIdx.x; k < n_in; k += 4 * F16S_PARTS_THREADS) {
        float4 v = *(const float4 *)(row + k);
        float f[4] = {v.x * s, v.y * s, v.z * s, v.w * s};
        __half hh[4], mm[4], ll[4];
#pragma unroll
        for (int i = 0; i < 4; i++) {
            hh[i] = __float2half_rn(f[i]);
            const float hf = __half2float(hh[i]);
            /* exact: a float's rounding error to fewer bits is a float; an
             * infinite x all in h (inf - inf would make the rest NaN) */
            float r = isinf(hf) ? 0.0f : f[i] - hf;
            mm[i] = __float2half_rn(r);
            ll[i] = __float2half_rn(r - __half2float(mm[i]));
        }
        *(uint2 *)(h + k) = *(const uint2 *)hh;
        *(uint2 *)(m + k) = *(const uint2 *)mm;
        *(uint2 *)(l + k) = *(const uint2 *)ll;
    }
}

/* Byte offset of (row r, 16-byte chunk c) in a [rows][64] fp16 tile: chunk
 * c ^ (r & 7), so each 8-row phase of an ldmatrix falls in distinct banks. */
__device__ __forceinline__ uint32_t f16s_at(int r, int c) { return r * 128 + ((c ^ (r & 7)) << 4); }

/* Dynamic shared memory of a block: two stages of [BM][64] weights and
 * three [64][64] x parts. */
template <int BM>
__host__ __device__ constexpr uint32_t f16s_stage_bytes() { return BM * 128 + 3 * F16S_BN * 128; }

/* Grid: (row tiles, token tiles, batch parts: a.bw, a.by on the one x).
 * Plain mode only (no experts, no x row map).
 * A warp's tile: BM 256, 64 rows x 32 tokens; 128, 32 x 32; 64, 32 x 16.
 * A 16-k step reads a warp's rows once and its tokens' three parts, 32
 * bytes a row or token each, for 3 (rows / 16) (tokens / 8) products: 64 x
 * 32 reads 107 bytes of shared memory a product where 32 x 32 reads 171.
 * Measured (H200, a 2K chunk): the indexer's queries 6.29 -> 5.80 ms on
 * 256-row tiles, the compressors' pair unchanged (7.03 -> 7.11), whose ncu
 * shows the tensor pipe as the limit (math-pipe throttle 2.32 an issue). */
template <int BM>
__global__ void __launch_bounds__(F16S_THREADS, 2) k_linear_f16s(lin_args a, f16x xp) {
    static_assert(BM == 256 || BM == 128 || BM == 64, "k_linear_f16s: 256-, 128- or 64-row tiles");
    pdl_begin();
    extern __shared__ __align__(16) uint8_t f16s_sh[];
    constexpr int WR = BM == 256 ? 64 : 32, I = WR / 16;   /* a warp's rows; its 16-row tiles */
    constexpr int RW = BM / WR, J = 64 / (8 / RW) / 8;     /* warps along the rows; a warp's 8-token tiles */
    constexpr uint32_t W_BYTES = BM * 128, STAGE = f16s_stage_bytes<BM>();
    const uint32_t sh = (uint32_t)__cvta_generic_to_shared(f16s_sh);
    int tid = threadIdx.x, warp = tid / WARP, lane = tid % WARP;
    int g = lane / 4, tg = lane % 4;
    int wm = warp % RW, wn = warp / RW;
    int r0 = blockIdx.x * BM;
    lin_block blk;
    if (!lin_block_of(a, blockIdx.z, blk)) return;
    const int n_in = a.w.n_in, nb = n_in / F16S_BK;

    /* this thread's copies: chunk c16 of rows / tokens tid / 8 + 32 k (one
     * swizzle for all: 32 k keeps r & 7) */
    const int c16 = tid % 8, rr = tid / 8;
    const uint32_t copy_at = f16s_at(rr, c16);
    const uint8_t *wsrc = blk.w + 16 * c16;
    const __half *xsrc = xp.p + 8 * c16;

    /* ldmatrix offsets of lane l at k-step 0 (step s: ^ s << 5, chunk 2 s
     * in the swizzle's XOR): A, rows l % 8 + 8 (l / 8 % 2), chunk l / 16
     * (a0-a3: rows g, g + 8 of k 0-7, then of k 8-15); B, tokens l % 8 + 8
     * (l / 16), chunk l / 8 % 2 (two n8 fragments' b0, b1). */
    const uint32_t a_at = f16s_at(wm * WR + lane % 8 + 8 * (lane / 8 % 2), lane / 16);
    const uint32_t b_at = f16s_at(wn * 8 * J + lane % 8 + 8 * (lane / 16), lane / 8 % 2);

    for (int t0 = blk.p0 + blockIdx.y * F16S_BN; t0 < blk.p1; t0 += gridDim.y * F16S_BN) {
        /* stage b's copies into buffer u (rows and tokens past the end: a real one, unused) */
        auto issue = [&](int b, int u) {
            const uint32_t st = sh + u * STAGE;
#pragma unroll
            for (int k = 0; k < BM / 32; k++) {
                int r = min(r0 + rr + 32 * k, a.w.n_out - 1);
                cp_async16_to(st + copy_at + k * (32 * 128), wsrc + (int64_t)r * a.w.row_bytes + 128 * b);
            }
#pragma unroll
            for (int k = 0; k < 2; k++) {
                const __half *xr = xsrc + (int64_t)min(t0 + rr + 32 * k, blk.p1 - 1) * n_in + F16S_BK * b;
#pragma unroll
                for (int q = 0; q < 3; q++)
                    cp_async16_to(st + W_BYTES + q * (F16S_BN * 128) + copy_at + k * (32 * 128), xr + q * xp.cap);
            }
            asm volatile("cp.async.commit_group;" ::: "memory");
        };

        float acc[I][J][4];
#pragma unroll
        for (int i = 0; i < I; i++)
#pragma unroll
            for (int j = 0; j < J; j++)
#pragma unroll
                for (int c = 0; c < 4; c++) acc[i][j][c] = 0.0f;

        __syncthreads();   /* the previous token tile's last reads */
        issue(0, 0);
        for (int b = 0; b < nb; b++) {
            stage_turn(b, nb, issue);
            const uint32_t at = sh + (b & 1) * STAGE, xt = at + W_BYTES;
#pragma unroll
            for (int s = 0; s < F16S_BK / 16; s++) {
                uint32_t af[I][4];
#pragma unroll
                for (int i = 0; i < I; i++) ldsm_x4_at(af[i], at + i * (16 * 128) + (a_at ^ (s << 5)));
#pragma unroll
                for (int jg = 0; jg < J / 2; jg++) {   /* 16 tokens: two n8 fragments of each part */
                    uint32_t bf[3][4];
#pragma unroll
                    for (int q = 0; q < 3; q++)
                        ldsm_x4_at(bf[q], xt + q * (F16S_BN * 128) + jg * (16 * 128) + (b_at ^ (s << 5)));
#pragma unroll
                    for (int jj = 0; jj < 2; jj++)
#pragma unroll
                        for (int i = 0; i < I; i++) {
                            float t4[4] = {0.0f, 0.0f, 0.0f, 0.0f};   /* smallest part first */
#pragma unroll
                            for (int q = 2; q >= 0; q--)
                                mma_f16(t4, af[i][0], af[i][1], af[i][2], af[i][3], bf[q][2 * jj], bf[q][2 * jj + 1]);
#pragma unroll
                            for (int c = 0; c < 4; c++) acc[i][2 * jg + jj][c] += t4[c];
                        }
                }
            }
        }
        /* C fragment: c0, c1 at (row g, tokens 2 tg, 2 tg + 1), c2, c3 at row g + 8 */
#pragma unroll
        for (int j = 0; j < J; j++)
#pragma unroll
            for (int c = 0; c < 2; c++) {
                int p = t0 + wn * 8 * J + j * 8 + 2 * tg + c;
                if (p >= blk.p1) continue;
                float back = xp.inv[p];
#pragma unroll
                for (int i = 0; i < I; i++)
#pragma unroll
                    for (int h = 0; h < 2; h++) {
                        int r = r0 + wm * WR + i * 16 + g + 8 * h;
                        if (r < a.w.n_out) blk.y[(int64_t)p * a.ys + r] = acc[i][j][2 * h + c] * back;
                    }
            }
    }
}

/* The tiles that got their shared memory (f16s_init): 128 and 64 (else
 * no k_linear_f16s), 256 (112 KB a block: not on a GPU of 99 KB). */
static bool g_f16s_ok = false, g_f16s256_ok = false;

static void f16s_init(void) {
    g_f16s_ok = allow_shared(k_linear_f16s<128>, 2 * f16s_stage_bytes<128>()) &&
                allow_shared(k_linear_f16s<64>, 2 * f16s_stage_bytes<64>());
    g_f16s256_ok = g_f16s_ok && allow_shared(k_linear_f16s<256>, 2 * f16s_stage_bytes<256>());
}

/* Whether k_linear_f16s takes a chunk product: F16 rows of whole stages,
 * 16-byte aligned for the copies, plain mode on one x (x rows 16-byte
 * aligned for k_f16_parts). */
static inline bool f16s_fits(const lin_args &a) {
    return g_f16s_ok && a.w.type == DS4_TYPE_F16 && !a.active && !a.xrow && a.bx == 0 &&
           a.w.n_in % F16S_BK == 0 && a.w.row_bytes % 16 == 0 && ((uintptr_t)a.w.data & 15) == 0 &&
           a.bw % 16 == 0 && a.xs % 4 == 0 && ((uintptr_t)a.x & 15) == 0;
}

/* Whether xp holds n rows of x for a (xp NULL: the stream has no buffer). */
static inline bool f16s_holds(const f16x *xp, const lin_args &a, int n) {
    return xp && n <= xp->rows && (int64_t)n * a.w.n_in <= xp->cap;
}

template <int BM>
static void launch_f16s_tile(cudaStream_t st, const lin_args &a, dim3 grid, const f16x &xp) {
    launch_k(k_linear_f16s<BM>, grid, F16S_THREADS, 2 * f16s_stage_bytes<BM>(), st, a, xp);
}

/* x's parts into xp, then the product over `parts` batch parts, on the
 * largest tile whose grid gives every SM a block (the fewer shared-memory
 * reads a product), else 64-row tiles where they make more blocks than
 * 128-row ones (not for 64 rows: the indexer's weights, 3.15 ms a 2K chunk
 * on 128-row tiles, 3.91 on 64). DS4_CUDA_F16S_TILE=256, 128 or 64
 * (read at each launch) takes that tile whatever the grid, for A/B and the
 * tests: each output's products and sums are the same on every tile, so
 * the same bits. */
static void launch_f16s(cudaStream_t st, const lin_args &a, int n, int parts, const f16x &xp) {
    launch_k(k_f16_parts, dim3(n), F16S_PARTS_THREADS, 0, st, a.x, a.xs, a.w.n_in, xp);
    static const int sms = gpu_sms();
    const char *force = getenv("DS4_CUDA_F16S_TILE");
    int bm = force ? atoi(force) : 0;
    unsigned tiles = (unsigned)((n + F16S_BN - 1) / F16S_BN);
    auto grid = [&](int rows) { return dim3((unsigned)((a.w.n_out + rows - 1) / rows), tiles, parts); };
    auto blocks = [&](int rows) { dim3 g = grid(rows); return (int64_t)g.x * g.y * g.z; };
    if (bm != 256 && bm != 128 && bm != 64)
        bm = g_f16s256_ok && blocks(256) >= sms ? 256 : blocks(128) >= sms || blocks(64) == blocks(128) ? 128 : 64;
    if (bm == 256 && !g_f16s256_ok) bm = 128;
    if (bm == 256) launch_f16s_tile<256>(st, a, grid(256), xp);
    else if (bm == 128) launch_f16s_tile<128>(st, a, grid(128), xp);
    else launch_f16s_tile<64>(st, a, grid(64), xp);
}
