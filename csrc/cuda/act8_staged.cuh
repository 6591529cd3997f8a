/* k_linear_q8s: the qat-q8 chunk products of dense Q8_0 rows (the attention
 * projections, the shared expert, the output groups) with a 256-element
 * stage instead of k_linear_q8x's 32-element slice: the rows' codes and
 * scales and x's codes and scales come in by cp.async into double buffers
 * while the previous stage multiplies, two barriers a stage instead of
 * sixteen. Q8_0 codes need no decoding, so they go from memory to the A
 * tile untouched. Same products and the same float steps in the same order
 * as k_linear_q8x: the same bits (k_linear_q8x keeps the 2-bit expert rows,
 * whose decode into shared memory measured slower here: 198 vs 187 ms a
 * chunk for IQ2_XXS).
 *
 * A block: 128 rows x 64 tokens, 8 warps of 32 x 32 (as k_linear_q8x).
 * Shared tiles are [rows][256] int8 with 16-byte chunk c of row r stored at
 * chunk c ^ (2 (r & 3)): a half warp's fragment loads (4 rows x 32 bytes of
 * one slice) then fall in distinct banks. */
#pragma once

#include "act8.cuh"

#define Q8S_BM 128
#define Q8S_BN 64
#define Q8S_THREADS 256

/* Rows it takes: Q8_0 of whole 256 blocks (16-byte aligned stages). */
static inline bool q8s_fits(const dmat &w) { return w.type == DS4_TYPE_Q8_0 && w.n_in % 256 == 0; }

/* Byte offset of (row r, 16-byte chunk c) in a swizzled [rows][256] tile. */
__device__ __forceinline__ int q8s_at(int r, int c) { return r * 256 + ((c ^ ((r & 3) << 1)) << 4); }

/* A lane's 8 bytes of slice s (elements 8 tg ..) of row r. */
__device__ __forceinline__ uint2 q8s_frag(const uint8_t *tile, int r, int s, int tg) {
    return *(const uint2 *)(tile + q8s_at(r, 2 * s + (tg >> 1)) + 8 * (tg & 1));
}

/* Dynamic shared memory: per buffer, the rows' codes and 8 fp16 scales, x's
 * codes and 8 float scales. */
static constexpr size_t Q8S_SMEM = 2 * ((size_t)Q8S_BM * (256 + 16) + (size_t)Q8S_BN * (256 + 32));

/* Grid: (row tiles, token tiles, 1), as k_linear_q8x. */
__global__ void __launch_bounds__(Q8S_THREADS, 2) k_linear_q8s(lin_args a) {
    pdl_begin();
    extern __shared__ __align__(16) uint8_t q8s_sh[];
    uint8_t *wq = q8s_sh;                                  /* [2][128][256] codes */
    uint8_t *wd = wq + 2 * Q8S_BM * 256;                   /* [2][128][8] fp16 scales */
    uint8_t *xq = wd + 2 * Q8S_BM * 16;                    /* [2][64][256] codes */
    float *xd = (float *)(xq + 2 * Q8S_BN * 256);          /* [2][64][8] scales */

    int tid = threadIdx.x, warp = tid / WARP, lane = tid % WARP;
    int g = lane / 4, tg = lane % 4;
    int wm = warp % 4, wn = warp / 4;
    int r0 = blockIdx.x * Q8S_BM;
    lin_block blk;
    if (!lin_block_of(a, blockIdx.z, blk)) return;
    const int n_in = a.w.n_in, nb = n_in / 256;

    for (int t0 = blk.p0 + blockIdx.y * Q8S_BN; t0 < blk.p1; t0 += gridDim.y * Q8S_BN) {
        /* stage b's loads into buffer u: 16 chunks of 16 bytes a row and a token */
        auto issue = [&](int b, int u) {
            for (int i = tid; i < Q8S_BM * 16; i += Q8S_THREADS) {
                int r = i / 16, c = i % 16;
                const uint8_t *row = blk.w + (int64_t)min(r0 + r, a.w.n_out - 1) * a.w.row_bytes;
                cp_async16(wq + (size_t)u * Q8S_BM * 256 + q8s_at(r, c), row + 2 * (n_in / 32) + 256 * b + 16 * c);
                if (c == 0) cp_async16(wd + ((size_t)u * Q8S_BM + r) * 16, row + 16 * b);
            }
            for (int i = tid; i < Q8S_BN * 16; i += Q8S_THREADS) {
                int t = i / 16, c = i % 16;
                int pt = t0 + t < blk.p1 ? t0 + t : blk.p1 - 1;   /* past the end: a real row, unused */
                int64_t xr = a.xrow ? a.xrow[pt] : pt;
                cp_async16(xq + (size_t)u * Q8S_BN * 256 + q8s_at(t, c), a.q8 + xr * n_in + 256 * b + 16 * c);
                if (c < 2) cp_async16(xd + ((size_t)u * Q8S_BN + t) * 8 + 4 * c, a.q8d + xr * (n_in / 32) + 8 * b + 4 * c);
            }
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
            __syncthreads();   /* every warp is done with stage b - 1: its buffers are free */
            if (b + 1 < nb) {
                issue(b + 1, u ^ 1);
                asm volatile("cp.async.wait_group 1;" ::: "memory");
            } else {
                asm volatile("cp.async.wait_group 0;" ::: "memory");
            }
            __syncthreads();   /* stage b's bytes, from every thread's copies */
            const uint8_t *at = wq + (size_t)u * Q8S_BM * 256, *bt = xq + (size_t)u * Q8S_BN * 256;
            const uint16_t *wdu = (const uint16_t *)(wd + (size_t)u * Q8S_BM * 16);
            const float *xdu = xd + (size_t)u * Q8S_BN * 8;
#pragma unroll 2
            for (int s = 0; s < 8; s++) {
                uint2 af[2][2];
                float sr[2][2];
#pragma unroll
                for (int i = 0; i < 2; i++)
#pragma unroll
                    for (int h = 0; h < 2; h++) {
                        int r = wm * 32 + i * 16 + g + 8 * h;
                        af[i][h] = q8s_frag(at, r, s, tg);
                        sr[i][h] = h2f_bits(wdu[r * 8 + s]);
                    }
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    int tb = wn * 32 + j * 8;
                    uint2 bf = q8s_frag(bt, tb + g, s, tg);
                    float f0 = xdu[(tb + 2 * tg) * 8 + s], f1 = xdu[(tb + 2 * tg + 1) * 8 + s];
#pragma unroll
                    for (int i = 0; i < 2; i++) q8_slice_product(acc[i][j], af[i], bf, sr[i], f0, f1);
                }
            }
        }
        block_tile_store(acc, blk, a, r0, t0, wm, wn, g, tg);
    }
}

static cudaError_t q8s_init(void) { return allow_shared(cudaSuccess, k_linear_q8s, Q8S_SMEM); }

static void launch_q8s(cudaStream_t st, dim3 grid, const lin_args &a) {
    launch_k(k_linear_q8s, grid, Q8S_THREADS, Q8S_SMEM, st, a);
}
