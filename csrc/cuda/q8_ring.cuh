/* One token's large Q8_0 products in qat-q8 (x as k_act8's codes: q_b, the
 * output groups wo_a, wo_b) streamed through a ring of shared-memory stages
 * filled by the TMA's bulk copies (sm_90).
 *
 * Why: k_q8_mma1 holds a 16-row tile in registers, so a block loads a tile,
 * sums it, then loads the next: the 36-MB products, ~2 tiles a block, ran
 * at 2.5-3.0 TB/s (ncu: long scoreboard, and lg_throttle from its 8-byte
 * loads filling the LSU queue). Here one block an SM owns a run of tiles;
 * a stage is 16 rows x 1,024 codes and their 32 scales (two bulk copies a
 * row, one instruction each, no register holds them), QR_STAGES of them in
 * flight; a copying warp refills a slot once its readers have arrived on
 * the slot's empty barrier.
 *
 * Measured (H200, the twenty-seventh session): correct, and slower: 25.8 /
 * 25.7 / 26.2 us against k_q8_mma1's 12.3 / 14.4 / 14.3, decode 147 -> 115
 * tok/s; the copying warp issues a bulk copy every ~50 ns whatever its size
 * (cuda/NOTES.md). Kept in the history only.
 *
 * The sums are k_q8_mma1<SL, true>'s, bit for bit: its warp w summed Q8_0
 * blocks [SL w, SL (w + 1)) of a tile's rows; here unit u of a stage's
 * 32 / SL units is that same range of its chunk (logical warp c 32 / SL +
 * u), with the same per-slice steps, its quad sum by the same shuffles, and
 * the logical warps' sums added in order into y by one half-warp once a
 * tile's last unit is summed (DS4_CUDA_NO_Q8RING=1: k_q8_mma1 everywhere;
 * the same logits). */
#pragma once

#include "int8_decode.cuh"

#define QR_WARPS 16                                          /* consumers; one more warp copies */
#define QR_THREADS ((QR_WARPS + 1) * WARP)
#define QR_STAGES 8
#define QR_KC 1024                                           /* a stage's codes a row: 32 Q8_0 blocks */
#define QR_CODE_LD (QR_KC + 32)                              /* rows g = 0..7 read 8 bytes a lane: 2 wavefronts */
#define QR_SCALE_LD 80                                       /* 16-byte scale reads of 8 rows: distinct banks */
#define QR_STAGE_BYTES (16 * QR_CODE_LD + 16 * QR_SCALE_LD)  /* 18,176 */
#define QR_STAGE_TX (16 * (QR_KC + QR_KC / 16))              /* bytes the copies bring: 17,408 */
#define QR_RED 16                                            /* tiles' partial sums held at once: > stages + 1 */
/* Shared bytes besides x's codes: the ring, its full and empty barriers, the
 * tiles' counts of summed units and their partial sums */
#define QR_FIXED (QR_STAGES * QR_STAGE_BYTES + 2 * QR_STAGES * 8 + QR_RED * 4 + QR_RED * 32 * 16 * 4)

static bool g_q8_ring_ok = false;   /* sm_90 and QR_SMEM_MAX granted (q8_ring_init) */
#define QR_SMEM_MAX (QR_FIXED + 40 * 1024)

/* Shared bytes of a launch whose blocks each read xparts parts of x. */
static inline size_t q8_ring_smem(int n_in, int xparts) {
    return QR_FIXED + (size_t)xparts * ((size_t)n_in + (size_t)n_in / 32 * 4);
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900   /* (the sm_80 build never sees these) */
__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}

/* One arrival that also expects `bytes` of copies to land. */
__device__ __forceinline__ void mbar_arrive_expect(uint32_t bar, int bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}

__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}

/* Until the barrier's phase of this parity has completed. */
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
    asm volatile(
        "{\n"
        ".reg .pred done;\n"
        "WAIT:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra WAIT;\n"
        "}\n" ::"r"(bar),
        "r"(parity)
        : "memory");
}

/* `bytes` (a multiple of 16, both addresses 16-aligned) global -> shared by
 * the TMA, completing on bar. */
__device__ __forceinline__ void bulk_copy(uint32_t dst, const void *src, int bytes, uint32_t bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(dst),
                 "l"(src), "r"(bytes), "r"(bar)
                 : "memory");
}
#endif

/* 8 bytes of a ring slot, not moved above the wait for its stage */
__device__ __forceinline__ uint2 lds64_after(uint32_t addr) {
    uint2 v;
    asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "r"(addr) : "memory");
    return v;
}

/* Where a block's run of tiles (numbered part, then tile in the part) is. */
struct q8_ring_run {
    int t0;       /* first tile */
    int tpp;      /* tiles a part */
    int chunks;   /* stages a tile: n_in / QR_KC */
};

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
/* Stage j of the run into its ring slot (the copying warp): lane 0 arms the
 * slot's full barrier, then lanes 0..15 copy row r's 1,024 codes, lanes
 * 16..31 its 32 scales. */
__device__ __forceinline__ void q8_ring_issue(const lin_args &a, const q8_ring_run &run, uint32_t ring,
                                              uint32_t full, int j) {
    int lane = threadIdx.x % WARP, slot = j % QR_STAGES, r = lane % 16;
    int tile = run.t0 + j / run.chunks, c = j % run.chunks, part = tile / run.tpp, lt = tile % run.tpp;
    uint32_t bar = full + 8 * slot, st = ring + slot * QR_STAGE_BYTES;
    if (lane == 0) mbar_arrive_expect(bar, QR_STAGE_TX);
    __syncwarp();
    /* rows past the end read the last row, unused */
    const uint8_t *row = a.w.data + (int64_t)part * a.bw + (int64_t)min(16 * lt + r, a.w.n_out - 1) * a.w.row_bytes;
    if (lane < 16) bulk_copy(st + r * QR_CODE_LD, row + a.w.n_in / 16 + QR_KC * c, QR_KC, bar);
    else bulk_copy(st + 16 * QR_CODE_LD + r * QR_SCALE_LD, row + 2 * (QR_KC / 32) * c, 2 * (QR_KC / 32), bar);
}
#endif

/* Grid: blocks of tpb consecutive tiles (parts x tpp in all). The last warp
 * copies: stage j into slot j % QR_STAGES once the slot's last readers have
 * arrived on its empty barrier. The other warps each take every QR_WARPS-th
 * unit (a stage's SL Q8_0 blocks of the 16 rows), waiting on its stage's
 * full barrier; no block barrier after the start. A tile's last unit to
 * finish (a count in shared memory) adds its partial sums into y before
 * that unit's warp frees its slot, so a partial-sum buffer is free again
 * before any tile QR_RED later can be reached. */
template <int SL>
__global__ void __launch_bounds__(QR_THREADS, 1) k_q8_ring1(lin_args a, int parts, int tpp, int tpb) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    constexpr int U = 32 / SL;   /* units (logical warps of k_q8_mma1) a stage */
    extern __shared__ __align__(128) uint8_t qr_sh[];
    if (!a.early) pdl_begin();
    const int n_in = a.w.n_in, nb = n_in / 32, n_out = a.w.n_out;
    const q8_ring_run run = {(int)blockIdx.x * tpb, tpp, n_in / QR_KC};
    const int t1 = min(parts * tpp, run.t0 + tpb), n_stages = (t1 - run.t0) * run.chunks;
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP, g = lane / 4, tg = lane % 4;
    const uint32_t ring = (uint32_t)__cvta_generic_to_shared(qr_sh), full = ring + QR_STAGES * QR_STAGE_BYTES,
                   empty = full + 8 * QR_STAGES;
    int *done = (int *)(qr_sh + QR_STAGES * QR_STAGE_BYTES + 16 * QR_STAGES);
    float(*red)[32][16] = (float(*)[32][16])(done + QR_RED);
    uint8_t *xq = (uint8_t *)(red + QR_RED);
    if (threadIdx.x < QR_STAGES) {
        mbar_init(full + 8 * threadIdx.x, 1);
        mbar_init(empty + 8 * threadIdx.x, U);
    } else if (threadIdx.x < QR_STAGES + QR_RED) {
        done[threadIdx.x - QR_STAGES] = 0;
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    __syncthreads();
    /* two stages in flight across the wait; the rest after x's loads, which would queue behind them */
    if (warp == QR_WARPS)
        for (int j = 0; j < min(2, n_stages); j++) q8_ring_issue(a, run, ring, full, j);
    if (a.early) pdl_begin();

    /* x's codes and scales of the parts the run touches (one where parts share x) */
    const int p_lo = a.bx ? run.t0 / tpp : 0, xparts = a.bx ? (t1 - 1) / tpp - p_lo + 1 : 1;
    float *xd = (float *)(xq + (size_t)xparts * n_in);
    {
        const uint4 *src = (const uint4 *)(a.q8 + (int64_t)p_lo * n_in);
        for (int i = threadIdx.x; i < xparts * n_in / 16; i += QR_THREADS) ((uint4 *)xq)[i] = src[i];
        for (int i = threadIdx.x; i < xparts * nb; i += QR_THREADS) xd[i] = a.q8d[(int64_t)p_lo * nb + i];
    }
    __syncthreads();

    if (warp == QR_WARPS) {   /* the copies: each slot again once its U units have read it */
        for (int j = 2; j < min(QR_STAGES, n_stages); j++) q8_ring_issue(a, run, ring, full, j);
        for (int j = QR_STAGES; j < n_stages; j++) {
            mbar_wait(empty + 8 * (j % QR_STAGES), (j / QR_STAGES - 1) & 1);
            q8_ring_issue(a, run, ring, full, j);
        }
        return;
    }
    for (int q = warp; q < n_stages * U; q += QR_WARPS) {
        const int j = q / U, u = q % U;
        const int slot = j % QR_STAGES, tile = run.t0 + j / run.chunks, c = j % run.chunks;
        const int xp = a.bx ? tile / tpp - p_lo : 0, kb0 = QR_KC / 32 * c + SL * u;
        const uint32_t xc = (uint32_t)__cvta_generic_to_shared(xq) + xp * n_in;
        const uint32_t xf = (uint32_t)__cvta_generic_to_shared(xd) + 4 * xp * nb;
        const uint32_t st = ring + slot * QR_STAGE_BYTES;
        const uint32_t code0 = st + g * QR_CODE_LD + 32 * SL * u + 8 * tg, code1 = code0 + 8 * QR_CODE_LD;
        const uint32_t sc0 = st + 16 * QR_CODE_LD + g * QR_SCALE_LD + 2 * SL * u, sc1 = sc0 + 8 * QR_SCALE_LD;
        mbar_wait(full + 8 * slot, (j / QR_STAGES) & 1);
        uint4 s0, s1;
        if constexpr (SL == 8) {
            asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];"
                         : "=r"(s0.x), "=r"(s0.y), "=r"(s0.z), "=r"(s0.w) : "r"(sc0) : "memory");
            asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];"
                         : "=r"(s1.x), "=r"(s1.y), "=r"(s1.z), "=r"(s1.w) : "r"(sc1) : "memory");
        } else {
            uint2 v0 = lds64_after(sc0), v1 = lds64_after(sc1);
            s0 = make_uint4(v0.x, v0.y, 0, 0), s1 = make_uint4(v1.x, v1.y, 0, 0);
        }
        uint2 q0[SL], q1[SL];
#pragma unroll
        for (int s = 0; s < SL; s++) q0[s] = lds64_after(code0 + 32 * s), q1[s] = lds64_after(code1 + 32 * s);
        float acc0 = 0, acc1 = 0;
#pragma unroll
        for (int s = 0; s < SL; s++) {
            uint2 bx = lane < 4 ? lds64(xc + 32 * (kb0 + s) + 8 * lane) : make_uint2(0, 0);
            int d[4];
            mma_s8_from(d, I2F_BIAS_BITS, q0[s].x, q1[s].x, q0[s].y, q1[s].y, bx.x, bx.y);
            float t0, t1s, f;
            asm("ld.shared.f32 %0, [%1];" : "=f"(f) : "r"(xf + 4 * (kb0 + s)));
            slice_sums_codes(d, tg, t0, t1s);
            acc0 = fmaf(t0, q8_scale_at(s0, s) * f, acc0);
            acc1 = fmaf(t1s, q8_scale_at(s1, s) * f, acc1);
        }
        acc0 += __shfl_xor_sync(0xffffffffu, acc0, 1);
        acc0 += __shfl_xor_sync(0xffffffffu, acc0, 2);
        acc1 += __shfl_xor_sync(0xffffffffu, acc1, 1);
        acc1 += __shfl_xor_sync(0xffffffffu, acc1, 2);
        float(*pr)[16] = red[tile % QR_RED];
        if (tg == 0) pr[c * U + u][g] = acc0, pr[c * U + u][g + 8] = acc1;
        /* the tile's last unit adds the partial sums in k_q8_mma1's warp order */
        __syncwarp();
        int n = 0;
        if (lane == 0) {
            __threadfence_block();   /* the warp's partial sums before its count */
            n = atomicAdd(&done[tile % QR_RED], 1);
            __threadfence_block();   /* the others' partial sums after their counts */
        }
        n = __shfl_sync(0xffffffffu, n, 0);
        if (n == run.chunks * U - 1) {
            __syncwarp();
            if (lane < 16) {
                float v = 0;
                for (int w = 0; w < run.chunks * U; w++) v += pr[w][lane];
                int part = tile / tpp, r = 16 * (tile % tpp) + lane;
                if (r < n_out) a.y[(int64_t)part * a.by + r] = v;
            }
            if (lane == 0) done[tile % QR_RED] = 0;
        }
        __syncwarp();
        if (lane == 0) mbar_arrive(empty + 8 * slot);   /* this unit's reads of the slot are done */
    }
#endif
}

/* Whether k_q8_ring1 takes a one-token product (else k_q8_mma1): qat-q8
 * codes, Q8_0 rows that k_q8_mma1 takes, 16-byte aligned for the copies,
 * and at least DS4_CUDA_Q8RING_MIN stages (default four an SM: the 36-MB
 * products of Flash; below that the ring's fill and barriers are not paid
 * back). Read at each launch (a new session's graph takes it). */
static bool q8_ring_fits(const lin_args &a, int parts, int sms) {
    if (!g_q8_ring_ok || !a.q8 || getenv("DS4_CUDA_NO_Q8RING") || !q8_mma1_fits(a)) return false;
    if (((uintptr_t)a.w.data | (uintptr_t)a.bw | (uintptr_t)a.q8) % 16) return false;
    const char *min = getenv("DS4_CUDA_Q8RING_MIN");
    int64_t stages = (int64_t)parts * ((a.w.n_out + 15) / 16) * (a.w.n_in / QR_KC);
    return stages >= (min ? atoll(min) : 4 * (int64_t)sms);
}

/* A block an SM, each a run of consecutive tiles (the same count but the
 * last). False where the launch's shared memory is over the opt-in. */
static bool launch_q8_ring1(cudaStream_t st, const lin_args &a, int parts) {
    static int sms = 0;
    if (!sms) {
        int dev = 0;
        cudaGetDevice(&dev);
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    }
    if (!q8_ring_fits(a, parts, sms)) return false;
    int tpp = (a.w.n_out + 15) / 16, tiles = parts * tpp, tpb = (tiles + sms - 1) / sms;
    int xparts = a.bx ? std::min(parts, (tpb - 1) / tpp + 2) : 1;
    size_t shm = q8_ring_smem(a.w.n_in, xparts);
    if (shm > QR_SMEM_MAX) return false;
    dim3 grid((unsigned)((tiles + tpb - 1) / tpb));
    if (q8_mma1_slices(a.w.n_in, parts) == 4) launch_k(k_q8_ring1<4>, grid, QR_THREADS, shm, st, a, parts, tpp, tpb);
    else launch_k(k_q8_ring1<8>, grid, QR_THREADS, shm, st, a, parts, tpp, tpb);
    return true;
}

static void q8_ring_init(int major) {
    g_q8_ring_ok = major >= 9 && allow_shared(k_q8_ring1<4>, QR_SMEM_MAX) && allow_shared(k_q8_ring1<8>, QR_SMEM_MAX);
}
