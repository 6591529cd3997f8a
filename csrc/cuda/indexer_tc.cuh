/* The lightning indexer's scores on the tensor cores: k_idx_score
 * (kernels.cuh) as a matrix product. For one token, the dots of its HI heads
 * with every compressed row are S = Q K^T (heads x rows x dI); the score of a
 * row is sum_h relu(S[h][row]) / sqrt(dI) * w[h]. A block takes one token,
 * its queries (padded to 64 heads with zeros, whose terms are 0) resident in
 * shared memory in two tf32 parts, and walks its share of the rows (all of
 * them in a chunk; a decode token's are split over blocks) 64 at a time: warp w
 * multiplies head tile w % 4 with rows 32 (w / 4) .. + 31 (attention_tc.cuh's
 * three tf32 products, product chains from zero over 32 elements; in the qat
 * modes one: Q2 leaves queries and rows FP4 values times powers of two, exact
 * in tf32, so the other two would add exact zeros: the same bits). The heads'
 * terms are summed as a tree (the CPU sums them in head order: the scores
 * agree to float32 rounding, as the CPU's own SIMD and scalar dots do). */
#pragma once

#include "attention_tc.cuh"

#define ITC_HEADS 64     /* heads a block takes (4 m16 tiles) */
#define ITC_RT 64        /* rows a tile */
#define ITC_THREADS 256

static int g_itc_sizes = 0;   /* row sizes (their bits) whose kernel got its shared memory (indexer_tc_init) */
static inline bool itc_fits(int HI, int dI) {
    return HI <= ITC_HEADS && (dI == 32 || dI == 64 || dI == 128) && (g_itc_sizes & dI);
}

/* Shared floats: the queries' two parts and a row tile (the FP4 form over
 * float rows: one part and two tiles), rows padded by 4 (a fragment's 8
 * rows x 4 columns in 32 banks). */
static inline size_t itc_shared_bytes(int dI) { return (size_t)(2 * ITC_HEADS + ITC_RT) * (dI + 4) * sizeof(float); }

/* Grid: (the slice's tokens (idx_args.t0 + blockIdx.x), row splits).
 * FP4: a.fp4 set (queries and rows exact in tf32), one product a step. */
template <int DI, bool FP4>
__global__ void __launch_bounds__(ITC_THREADS, 2) k_idx_score_tc(idx_args a) {
    pdl_begin();
    constexpr int LD = DI + 4;
    extern __shared__ __align__(16) float sh[];
    float *q_hi = sh, *q_lo = sh + ITC_HEADS * LD, *kt = sh + 2 * ITC_HEADS * LD;
    __shared__ float w_sh[ITC_HEADS];
    __shared__ float part[4][ITC_RT];   /* each head tile's sum, a row */
    int t = a.t0 + blockIdx.x;
    int64_t n_rows = (*a.pos0 + t + 1) / a.m;
    int64_t tiles = (n_rows + ITC_RT - 1) / ITC_RT, per = (tiles + gridDim.y - 1) / gridDim.y;
    int64_t r_begin = blockIdx.y * per * ITC_RT, r_end = min(n_rows, r_begin + per * ITC_RT);
    if (n_rows <= a.top_k || r_begin >= r_end) return;
    int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP, g = lane / 4, tg = lane % 4;
    int mt = warp % 4, rg = warp / 4;   /* head tile, row group of 32 */
    float *sc = a.scores + (int64_t)blockIdx.x * a.cap_rows;
    const float score_scale = 1.0f / sqrtf((float)DI);
    const float *iq = a.iq + (int64_t)t * a.HI * DI;
    for (int i = threadIdx.x; i < ITC_HEADS * DI; i += ITC_THREADS) {
        int h = i / DI, c = i % DI;
        uint32_t hi, lo;
        tf32_split(h < a.HI ? iq[h * DI + c] : 0.0f, hi, lo);
        q_hi[h * LD + c] = __uint_as_float(hi);
        if constexpr (!FP4) q_lo[h * LD + c] = __uint_as_float(lo);
    }
    if (threadIdx.x < ITC_HEADS) w_sh[threadIdx.x] = threadIdx.x < a.HI ? a.iw[(int64_t)t * a.HI + threadIdx.x] : 0.0f;

    /* a tile's float rows by cp.async, a short tile repeating its last row (not stored) */
    auto copy_tile = [&](int64_t r0, float *dst) {
        int nr = r_end - r0 < ITC_RT ? (int)(r_end - r0) : ITC_RT;
        for (int i = threadIdx.x; i < ITC_RT * DI / 4; i += ITC_THREADS) {
            int r = i / (DI / 4), c = i % (DI / 4), rr = r < nr ? r : nr - 1;
            cp_async16(dst + r * LD + 4 * c, a.krows + (r0 + rr) * DI + 4 * c);
        }
        asm volatile("cp.async.commit_group;" ::: "memory");
    };
    /* FP4 over float rows (a chunk): no low parts, so their room holds a
     * second tile, the next one's copies in flight while this one multiplies */
    const bool ring = FP4 && !a.krows8;
    if (ring) copy_tile(r_begin, kt);
    int u = 0;   /* the ring's tile in use: kt, or q_lo's room */
    for (int64_t r0 = r_begin; r0 < r_end; r0 += ITC_RT, u ^= ring) {
        int nr = r_end - r0 < ITC_RT ? (int)(r_end - r0) : ITC_RT;
        const float *tile = u ? q_lo : kt;
        __syncthreads();   /* the queries; the previous tile's reads of its buffer and part */
        if (ring) {
            if (r0 + ITC_RT < r_end) {
                copy_tile(r0 + ITC_RT, u ? kt : q_lo);
                asm volatile("cp.async.wait_group 1;" ::: "memory");
            } else {
                asm volatile("cp.async.wait_group 0;" ::: "memory");
            }
        } else if (a.krows8) {   /* compact rows (one-token steps), decoded to the same floats */
            constexpr int PER = ITC_RT * DI / 4 / ITC_THREADS;
            float4 v[PER];   /* every load in flight before the first store */
#pragma unroll
            for (int k = 0; k < PER; k++) {
                int i = threadIdx.x + k * ITC_THREADS, r = i / (DI / 4), rr = r < nr ? r : nr - 1;
                v[k] = kv4_load4(a.krows8 + (r0 + rr) * a.kv.bytes, i % (DI / 4), a.kv);
            }
#pragma unroll
            for (int k = 0; k < PER; k++) {
                int i = threadIdx.x + k * ITC_THREADS;
                *(float4 *)(kt + i / (DI / 4) * LD + 4 * (i % (DI / 4))) = v[k];
            }
        } else {
            copy_tile(r0, kt);
            asm volatile("cp.async.wait_all;" ::: "memory");
        }
        __syncthreads();

        float s[4][4];   /* [n8 tile][c]: heads 16 mt + g (c 0, 1), + 8 (c 2, 3); rows 2 tg, + 1 */
#pragma unroll
        for (int j = 0; j < 4; j++) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
        for (int c0 = 0; c0 < DI; c0 += 32) {
            float d4[4][4] = {};
#pragma unroll
            for (int k8 = 0; k8 < 32; k8 += 8) {
                int c = c0 + k8 + tg, h = 16 * mt + g;
                uint32_t ahi[4] = {__float_as_uint(q_hi[h * LD + c]), __float_as_uint(q_hi[(h + 8) * LD + c]),
                                   __float_as_uint(q_hi[h * LD + c + 4]), __float_as_uint(q_hi[(h + 8) * LD + c + 4])};
                uint32_t alo[4] = {};
                if constexpr (!FP4)
                    alo[0] = __float_as_uint(q_lo[h * LD + c]), alo[1] = __float_as_uint(q_lo[(h + 8) * LD + c]),
                    alo[2] = __float_as_uint(q_lo[h * LD + c + 4]), alo[3] = __float_as_uint(q_lo[(h + 8) * LD + c + 4]);
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    int row = 32 * rg + 8 * j + g;
                    if constexpr (FP4)
                        mma_tf32(d4[j], ahi, __float_as_uint(tile[row * LD + c]), __float_as_uint(tile[row * LD + c + 4]));
                    else
                        mma_3xtf32(d4[j], ahi, alo, tile[row * LD + c], tile[row * LD + c + 4]);
                }
            }
#pragma unroll
            for (int j = 0; j < 4; j++)
#pragma unroll
                for (int i = 0; i < 4; i++) s[j][i] += d4[j][i];
        }
        /* the terms, summed over the tile's 16 heads: rows g, g + 8 here,
         * then the 8 lanes of a column (lane bits 2-4) */
        float w0 = w_sh[16 * mt + g], w1 = w_sh[16 * mt + g + 8];
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int cc = 0; cc < 2; cc++) {
                float v0 = s[j][cc], v1 = s[j][cc + 2];
                float v = (v0 > 0 ? v0 : 0) * score_scale * w0 + (v1 > 0 ? v1 : 0) * score_scale * w1;
                v += __shfl_xor_sync(0xffffffffu, v, 4);
                v += __shfl_xor_sync(0xffffffffu, v, 8);
                v += __shfl_xor_sync(0xffffffffu, v, 16);
                if (g == 0) part[mt][32 * rg + 8 * j + 2 * tg + cc] = v;
            }
        __syncthreads();
        if (threadIdx.x < nr) {
            int r = threadIdx.x;
            sc[r0 + r] = (part[0][r] + part[1][r]) + (part[2][r] + part[3][r]);
        }
    }
}

/* The shared-memory opt-in above 48 KB, once per row size (a size refused
 * keeps k_idx_score). */
static void indexer_tc_init(void) {
    auto both = [](auto one, auto three, int dI) {
        return allow_shared(one, itc_shared_bytes(dI)) && allow_shared(three, itc_shared_bytes(dI)) ? dI : 0;
    };
    g_itc_sizes = both(k_idx_score_tc<32, true>, k_idx_score_tc<32, false>, 32) |
                  both(k_idx_score_tc<64, true>, k_idx_score_tc<64, false>, 64) |
                  both(k_idx_score_tc<128, true>, k_idx_score_tc<128, false>, 128);
}

/* DS4_CUDA_IDX_3XTF32=1: the three products in the qat modes too (read at
 * each enqueue, the tests') */
template <int DI>
static void launch_idx_score_tc_t(cudaStream_t st, const idx_args &a, unsigned nt) {
    size_t shm = itc_shared_bytes(DI);
    unsigned splits = 1;
    if (nt == 1) {
        static int fill = 0;   /* the three-product form's (the other needs no more) */
        if (!fill) fill = gpu_fill(k_idx_score_tc<DI, false>, ITC_THREADS, shm);
        splits = (unsigned)std::min<int64_t>((a.cap_rows + ITC_RT - 1) / ITC_RT, fill);
    }
    if (a.fp4 && !getenv("DS4_CUDA_IDX_3XTF32"))
        launch_k(k_idx_score_tc<DI, true>, dim3(nt, splits), ITC_THREADS, shm, st, a);
    else
        launch_k(k_idx_score_tc<DI, false>, dim3(nt, splits), ITC_THREADS, shm, st, a);
}

/* The scores of a slice of nt tokens: a chunk's token in one block; one
 * token's rows split over as many blocks as the GPU holds at once, sized
 * from the row capacity (a captured decode step replays at every position). */
static void launch_idx_score_tc(cudaStream_t st, const idx_args &a, unsigned nt) {
    switch (a.dI) {
    case 32: launch_idx_score_tc_t<32>(st, a, nt); break;
    case 64: launch_idx_score_tc_t<64>(st, a, nt); break;
    case 128: launch_idx_score_tc_t<128>(st, a, nt); break;
    }
}
