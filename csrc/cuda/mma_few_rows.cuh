/* Chunk products of F16 matrices with at most 32 rows over long inputs: the
 * HC mixers (24 rows x 16384, and the head's 4). k_linear_mma gives them one
 * row tile, so a 2048-token chunk was 32 blocks on 132 SMs, each waiting out
 * a load latency per 32-wide slice of 16384 (650 us a mixer, 70 ms a
 * chunk), while the x they read (2048 x 16384 floats, 134 MB) wants the
 * whole GPU's bandwidth.
 *
 * A block takes 32 rows x 16 tokens (a 2048-token chunk: 128 blocks), four
 * warps of 16 rows x 8 tokens, and streams x and the rows through a ring of
 * FR_STAGES 64-wide stages by cp.async, so several stages' loads are in
 * flight while one multiplies. Every output is summed exactly as in
 * k_linear_mma (the same bf16 parts in the same fragment places, each 16's
 * five products from zero, added to the float32 sum in k order): the same
 * bits, split only over tokens, never over k.
 * (A ring of 12 stages measured the same as 4, 13.0 against 13.1 ms a
 * 2K chunk: the block's decode and products, not its loads in flight, set
 * its pace.)
 *
 * With norm_n (= n_in) set, x is a token's unnormed HC streams and the
 * product that of their RMS norm: the block sums each token's squares (in
 * double, as d_rms_scale) from the x it streams anyway, and its scale
 * multiplies the row sums, as the one-token mixer does (k_linear1,
 * k_hc_pre_collapse), so no normed copy of x is written and read again. */
#pragma once

#include "mma_linear.cuh"

#define FR_BM 32
#define FR_BN 16
#define FR_BK 64
#define FR_STAGES 4
#define FR_THREADS 128
#define FR_LD (FR_BK + 8)   /* bf16 per decoded row: ldmatrix rows in distinct banks */

/* Raw bytes of a stage: the rows' F16 and x's floats. */
#define FR_W_BYTES (FR_BM * FR_BK * 2)
#define FR_X_BYTES (FR_BN * FR_BK * 4)
static constexpr size_t FR_SMEM = (size_t)FR_STAGES * (FR_W_BYTES + FR_X_BYTES) +
                                  (size_t)(2 * FR_BM + 3 * FR_BN) * FR_LD * 2;

static bool g_few_rows_ok = false;   /* the GPU gives a block FR_SMEM (few_rows_init) */

static inline bool few_rows_fits(const lin_args &a) {
    return g_few_rows_ok && a.w.type == DS4_TYPE_F16 && !a.active && !a.xrow && a.w.n_out <= FR_BM && a.w.n_in % FR_BK == 0 &&
           a.w.row_bytes % 16 == 0 && a.xs % 4 == 0;
}

/* Whether a chunk product takes it (DS4_CUDA_NO_MMA=1 or DS4_CUDA_NO_FEWROWS=1,
 * read at each launch: not). */
static inline bool few_rows_runs(const lin_args &a) {
    return few_rows_fits(a) && !getenv("DS4_CUDA_NO_MMA") && !getenv("DS4_CUDA_NO_FEWROWS");
}

/* Grid: (1, tiles of 16 of the n_tok tokens). One block a SM (a 2048
 * chunk is 128 blocks on 132 SMs): the bound lets the compiler keep more
 * fragments in registers than its default for 128-thread blocks (64
 * registers; 106 with it, and the main loop's fixed stalls 796 -> 515
 * cycles, sass_mma.py). */
__global__ void __launch_bounds__(FR_THREADS, 1) k_linear_few_rows(lin_args a) {
    pdl_begin();
    extern __shared__ __align__(16) uint8_t fr_sh[];
    __shared__ float norm_sh[FR_BN];   /* norm_n: the tokens' RMS scales */
    uint8_t *ring = fr_sh;   /* [stage]: rows [32][64] F16, then x [16][64] floats */
    __nv_bfloat16 *wc = (__nv_bfloat16 *)(fr_sh + (size_t)FR_STAGES * (FR_W_BYTES + FR_X_BYTES));
    __nv_bfloat16 *wl = wc + FR_BM * FR_LD;
    __nv_bfloat16 *xs = wl + FR_BM * FR_LD;   /* [part][16][FR_LD] */

    int tid = threadIdx.x, warp = tid / WARP, lane = tid % WARP;
    int g = lane / 4, tg = lane % 4;
    int wi = warp % 2, wj = warp / 2;   /* the warp's 16 rows, 8 tokens */
    const int n_in = a.w.n_in, t0 = blockIdx.y * FR_BN, nk = n_in / FR_BK;
    const int p1 = a.n_tok;

    /* a thread's copies of a stage: 2 of the rows' 256 16-byte pieces, 2 of x's */
    auto issue = [&](int k) {
        if (k < nk) {
            uint8_t *st = ring + (size_t)(k % FR_STAGES) * (FR_W_BYTES + FR_X_BYTES);
#pragma unroll
            for (int h = 0; h < 2; h++) {
                int i = tid + h * FR_THREADS, r = i / 8, c = i % 8;
                const uint8_t *row = a.w.data + (int64_t)min(r, a.w.n_out - 1) * a.w.row_bytes;
                cp_async16(st + r * FR_BK * 2 + 16 * c, row + (int64_t)k * FR_BK * 2 + 16 * c);
                int t = i / 16, cx = i % 16;
                int pt = t0 + t < p1 ? t0 + t : p1 - 1;   /* past the end: a real row, unused */
                const float *xr = a.x + (int64_t)pt * a.xs;
                cp_async16(st + FR_W_BYTES + t * FR_BK * 4 + 16 * cx, xr + (int64_t)k * FR_BK + 4 * cx);
            }
        }
        asm volatile("cp.async.commit_group;" ::: "memory");   /* empty past the end: the count stays even */
    };

    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    double ss = 0;   /* norm_n: this thread's squares of its token's x */
#pragma unroll
    for (int k = 0; k < FR_STAGES - 1; k++) issue(k);
    for (int k = 0; k < nk; k++) {
        asm volatile("cp.async.wait_group %0;" ::"n"(FR_STAGES - 2) : "memory");
        __syncthreads();   /* stage k landed (every thread's copies); stage k - 1's products done */
        issue(k + FR_STAGES - 1);   /* into the slot stage k - 1 left */
        const uint8_t *st = ring + (size_t)(k % FR_STAGES) * (FR_W_BYTES + FR_X_BYTES);
        {   /* decode: rows as bf16 hi + lo (two groups of 8 a thread), x as three bf16 parts (8) */
#pragma unroll
            for (int h = 0; h < 2; h++) {
                int i = tid + h * FR_THREADS, r = i / 8, e = 8 * (i % 8);
                raw8 q;
                uint4 u = *(const uint4 *)(st + r * FR_BK * 2 + 2 * e);
                q.v[0] = u.x, q.v[1] = u.y, q.v[2] = u.z, q.v[3] = u.w;
                uint32_t c[4], lo[4];
                float sc, mn;
                raw_decode<DS4_TYPE_F16>(q, e, c, lo, sc, mn, NULL, NULL);
                *(uint4 *)&wc[r * FR_LD + e] = make_uint4(c[0], c[1], c[2], c[3]);
                *(uint4 *)&wl[r * FR_LD + e] = make_uint4(lo[0], lo[1], lo[2], lo[3]);
            }
            int t = tid / 8, e = 8 * (tid % 8);
            const float *xv = (const float *)(st + FR_W_BYTES + t * FR_BK * 4) + e;
            float4 x0 = *(const float4 *)xv, x1 = *(const float4 *)(xv + 4);
            if (a.norm_n)
                ss += ((double)x0.x * x0.x + (double)x0.y * x0.y + (double)x0.z * x0.z + (double)x0.w * x0.w) +
                      ((double)x1.x * x1.x + (double)x1.y * x1.y + (double)x1.z * x1.z + (double)x1.w * x1.w);
            uint32_t hh[4], m[4], l[4];
            split3(x0.x, x0.y, hh[0], m[0], l[0]);
            split3(x0.z, x0.w, hh[1], m[1], l[1]);
            split3(x1.x, x1.y, hh[2], m[2], l[2]);
            split3(x1.z, x1.w, hh[3], m[3], l[3]);
            *(uint4 *)&xs[(0 * FR_BN + t) * FR_LD + e] = make_uint4(hh[0], hh[1], hh[2], hh[3]);
            *(uint4 *)&xs[(1 * FR_BN + t) * FR_LD + e] = make_uint4(m[0], m[1], m[2], m[3]);
            *(uint4 *)&xs[(2 * FR_BN + t) * FR_LD + e] = make_uint4(l[0], l[1], l[2], l[3]);
        }
        __syncthreads();
        /* k_linear_mma's products of each 16 of the stage, in k order */
#pragma unroll
        for (int kq = 0; kq < FR_BK; kq += 32) {
            uint32_t bq[3][4];   /* [part]: b0, b1 of k kq.., then of kq + 16.. */
            const int tb = wj * 8 + lane % 8, kb = kq + 8 * (lane / 8);
#pragma unroll
            for (int part = 0; part < 3; part++) ldsm_x4(bq[part], &xs[(part * FR_BN + tb) * FR_LD + kb]);
#pragma unroll
            for (int kh = 0; kh < 2; kh++) {
                const int ks = kq + 16 * kh;
                uint32_t af[4], al[4], b[3][2];
                const int ra = wi * 16 + lane % 16, ka = ks + 8 * (lane / 16);
                ldsm_x4(af, &wc[ra * FR_LD + ka]);
                ldsm_x4(al, &wl[ra * FR_LD + ka]);
#pragma unroll
                for (int part = 0; part < 3; part++) b[part][0] = bq[part][2 * kh], b[part][1] = bq[part][2 * kh + 1];
                float t4[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                mma_bf16(t4, al, b[1]);
                mma_bf16(t4, al, b[0]);
                mma_bf16(t4, af, b[2]);
                mma_bf16(t4, af, b[1]);
                mma_bf16(t4, af, b[0]);
#pragma unroll
                for (int c = 0; c < 4; c++) acc[c] += t4[c];
            }
        }
    }
    asm volatile("cp.async.wait_group 0;" ::: "memory");
    if (a.norm_n) {   /* token tid / 8's sum over its 8 threads (lanes of one warp), its scale */
#pragma unroll
        for (int o = 1; o < 8; o *= 2) ss += __shfl_xor_sync(0xffffffffu, ss, o);
        if (tid % 8 == 0) norm_sh[tid / 8] = (float)(1.0 / sqrt(ss / (double)a.norm_n + (double)a.norm_eps));
        __syncthreads();
    }
    /* C fragment: c0, c1 at (row g, tokens 2tg, 2tg + 1), c2, c3 at row g + 8 */
#pragma unroll
    for (int c = 0; c < 4; c++) {
        int r = wi * 16 + g + (c >= 2 ? 8 : 0);
        int t = wj * 8 + 2 * tg + (c & 1), p = t0 + t;
        if (r < a.w.n_out && p < p1) a.y[(int64_t)p * a.ys + r] = a.norm_n ? acc[c] * norm_sh[t] : acc[c];
    }
}

static void few_rows_init(void) { g_few_rows_ok = allow_shared(k_linear_few_rows, FR_SMEM); }

static void launch_few_rows(cudaStream_t st, const lin_args &a) {
    launch_k(k_linear_few_rows, dim3(1, (unsigned)((a.n_tok + FR_BN - 1) / FR_BN)), FR_THREADS, FR_SMEM, st, a);
}
