/* A chunk's attention on bf16 tensor cores: attention_tc.cuh's
 * k_attention_tc8 with its operands as bf16 parts instead of tf32 ones.
 *
 * Why it pays: in the qat modes a key row's non-RoPE dims are E4M3 values
 * times a power of two (forward-pass.md §3.8, Q1), exact in bf16, so those
 * dims need one bf16 part where tf32 needed two Q parts against them, and a
 * bf16 m16n8k16 product covers twice the dims of a tf32 m16n8k8. The float
 * operands (Q, the softmax weights, the RoPE dims of the keys) go in three
 * bf16 parts (hi, mid, lo: float's 24 significant bits), so every score and
 * weighted sum keeps float32's precision, as k_attention_tc8's three tf32
 * products did; the sums come out in another order, so not its bits.
 *
 * The keys are read through a bf16 view (k_key_view, once a layer before the
 * attention: the chunk's window rows and every compressed row), a row of
 * D + 2 X bf16 for X split dims (the qat modes: the RoPE dims, the last R):
 * [0, D) each dim's hi part (a non-RoPE dim's value), then the split dims'
 * mid parts, then their lo parts. In exact mode no dim is exact in bf16
 * (X = D: six products a k16 step everywhere, and at D = 512 one block an
 * SM); it runs there too, since the tf32 kernels were found wrong on a
 * prompt (csrc/cuda/NOTES.md, the twenty-ninth session). A block takes 16
 * heads of one token, as k_attention_tc8, and 32-key tiles of the view,
 * double-buffered by cp.async: the next tile's copies run under this tile's
 * products.
 *  - Q lives in registers as each warp's A fragments of its D / 8 dims (three
 *    parts), split once a block instead of once a tile;
 *  - scores: warp w the four n8 key tiles over its D / 8 dims, chains of at
 *    most 32 dims from zero added by the CUDA cores (the tensor cores' own
 *    adds truncate); the 8 warps' partials summed in order by the softmax;
 *  - the softmax: 16 lanes a head row, one online step a 32-key tile;
 *  - O = O alpha + P V: warp w the n8 tiles at columns 8 w + 64 j (each warp
 *    one of the RoPE columns' tiles where R = 64), V's fragments by
 *    ldmatrix.trans of the key tile.
 * Then k_attention_tc8's store: the sink, the normalization, inverse RoPE.
 * DS4_CUDA_NO_BF16ATTN=1 keeps k_attention_tc8 (for A/B). */
#pragma once

#include "attention_tc.cuh"
#include "mma_linear.cuh"   /* mma_bf16, split3: k_linear_mma's bf16 products and three-part splits */

#define TCB_KT 32        /* keys a tile */
#define TCB_THREADS 256  /* 8 warps */
#define TCB_SLD 40       /* s_part's row stride, floats: a half warp's float2 stores in distinct banks */
#define TCB_PLD 40       /* the weights' row stride, bf16: ldmatrix's 8 rows in distinct banks */

/* Head sizes and split dims it takes: a key row's last `split` dims are
 * the ones not exact in bf16 (the qat modes: the RoPE dims; exact mode, or
 * DS4_CUDA_NO_KEYTF32=1 at a qat session's start: all of them), whole k16
 * steps, as are a warp's D / 8 dims. */
static inline bool tcb_fits(int d, int split) {
    return (d == 128 || d == 256 || d == 512) && split % 16 == 0 && split <= d;
}

/* bf16 elements of a view row: every dim's hi part, then the split dims'
 * mid parts, then their lo parts */
__host__ __device__ inline int tcb_view_elems(int d, int split) { return d + 2 * split; }

/* Dynamic shared memory: two key tiles of view rows, 16 bytes apart past
 * their length (ldmatrix's 8 rows then hit 8 distinct 16-byte bank groups). */
static inline size_t tcb_shared_bytes(int d, int split) {
    return (size_t)2 * TCB_KT * (2 * tcb_view_elems(d, split) + 16);
}

__device__ __forceinline__ void ldsm_x4_trans_at(uint32_t *r, uint32_t at) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(at));
}

/* d += A B for A and B in three bf16 parts each ([0] hi, [1] mid, [2] lo;
 * b[k]: part k's fragment pair), the products down to 2^-16 of hi hi,
 * small ones first. */
__device__ __forceinline__ void mma_bf16_6(float (&d)[4], const uint32_t (&a)[3][4], const uint32_t (&b)[3][2]) {
    mma_bf16(d, a[1], b[1]);
    mma_bf16(d, a[2], b[0]);
    mma_bf16(d, a[0], b[2]);
    mma_bf16(d, a[1], b[0]);
    mma_bf16(d, a[0], b[1]);
    mma_bf16(d, a[0], b[0]);
}

/* d += A B for A in three parts and B exact in bf16 */
__device__ __forceinline__ void mma_bf16_3(float (&d)[4], const uint32_t (&a)[3][4], const uint32_t (&b)[2]) {
    mma_bf16(d, a[2], b);
    mma_bf16(d, a[1], b);
    mma_bf16(d, a[0], b);
}

/* Key rows into the bf16 view: row first + b (blocks b; modulo cap where
 * cap > 0: the raw ring's slots) of src (float rows of d, or compact rows
 * when src8), its view row at the same index of dst. A thread a group of
 * four dims (all split or none: split % 16 == 0). */
__global__ void k_key_view(const float *src, const uint8_t *src8, kv_compact L, int64_t first, int64_t cap,
                           uint16_t *dst, int d, int split) {
    pdl_begin();
    const int64_t p = first + blockIdx.x, slot = cap ? p % cap : p;
    const key_ref row{src8 ? (const void *)(src8 + slot * L.bytes) : (const void *)(src + slot * d), src8 != nullptr};
    uint16_t *out = dst + slot * tcb_view_elems(d, split);
    const int exact = d - split;
    for (int c = threadIdx.x; c < d / 4; c += blockDim.x) {
        float4 v = key_load4(row, c, L);
        uint32_t a[3], b[3];
        split3(v.x, v.y, a[0], a[1], a[2]);
        split3(v.z, v.w, b[0], b[1], b[2]);
        *(uint2 *)(out + 4 * c) = make_uint2(a[0], b[0]);
        if (4 * c >= exact) {
            *(uint2 *)(out + d + 4 * c - exact) = make_uint2(a[1], b[1]);
            *(uint2 *)(out + d + split + 4 * c - exact) = make_uint2(a[2], b[2]);
        }
    }
}

template <int D, bool SPREAD>
__global__ void __launch_bounds__(TCB_THREADS, 2) k_attention_bf16(attn_args a) {
    pdl_begin();
    constexpr int STEPS = D / 128;   /* k16 steps of a warp's D / 8 dims */
    constexpr int NTW = D / 64;      /* n8 tiles of the sum a warp */
    /* dims [0, E) exact in bf16 (a.key_tf32), the X after them in three parts */
    const int E = a.key_tf32, X = D - E, VE = D + 2 * X, LDK = 2 * VE + 16;
    extern __shared__ __align__(16) uint8_t tcb_sh[];
    __shared__ __align__(16) float s_part[8][TCA_ROWS][TCB_SLD];   /* each warp's partial scores */
    __shared__ __align__(16) uint16_t p_sh[3][TCA_ROWS][TCB_PLD];  /* the weights' parts */
    __shared__ float m_row[TCA_ROWS], den_row[TCA_ROWS], alpha_row[TCA_ROWS];
    __shared__ const uint8_t *kp[2][TCB_KT];   /* each tile's view rows */

    const int tid = threadIdx.x, warp = tid / WARP, lane = tid % WARP, g = lane / 4, tg = lane % 4;
    const int t = blockIdx.y, h0 = blockIdx.x * TCA_ROWS;
    const int64_t pos = *a.pos0 + t;
    const attn_keys keys = attn_keys_of(a, t, pos);
    const int n_keys = (int)keys.n_keys, n_raw = (int)keys.n_raw;   /* < 2^31: 32-bit index registers */
    const uint32_t tiles_at = (uint32_t)__cvta_generic_to_shared(tcb_sh);

    /* key k's view row (past the last: the last, its weight 0) */
    auto key_at = [&](int k) -> const uint8_t * {
        const int r = k < n_keys ? k : n_keys - 1;
        if (r < n_raw) return (const uint8_t *)(a.view_raw + (keys.raw_first + r) % a.cap_raw * VE);
        const int64_t row = keys.sel ? keys.sel[r - n_raw] : r - n_raw;
        return (const uint8_t *)(a.view_rows + row * VE);
    };
    /* tile i's rows into buffer i % 2: warp w rows w, w + 8, ..; 16 bytes a lane */
    auto issue = [&](int i) {
        const uint32_t buf = tiles_at + (uint32_t)((i & 1) * TCB_KT * LDK);
        for (int r = warp; r < TCB_KT; r += TCB_THREADS / WARP) {
            const uint8_t *src = kp[i & 1][r];
            for (int c = lane; c < VE / 8; c += WARP) cp_async16_to(buf + r * LDK + 16 * c, src + 16 * c);
        }
    };

    const int n_tiles = (n_keys + TCB_KT - 1) / TCB_KT;
    if (tid < TCB_KT) kp[0][tid] = key_at(tid);
    if (tid < TCA_ROWS) m_row[tid] = -INFINITY, den_row[tid] = 0.0f;
    __syncthreads();
    issue(0);
    const uint8_t *key_next = tid < TCB_KT ? key_at(TCB_KT + tid) : nullptr;

    /* Q's A fragments of this warp's D / 8 dims, rows g, g + 8: step s the
     * 16 at dq + ds s, where SPREAD 16 warp + 128 s (the split dims, the
     * last X, fall to several warps: the qat modes' 64 RoPE dims to step 3
     * of warps 4-7, the tensor pipes of the four schedulers evenly loaded),
     * else (D / 8) warp + 16 s (warp 7 has them all) */
    const int dq = SPREAD ? 16 * warp : (D / 8) * warp, ds = SPREAD ? 128 : 16;
    uint32_t qf[STEPS][3][4];
#pragma unroll
    for (int s = 0; s < STEPS; s++)
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int r = g + 8 * (i & 1), c = dq + ds * s + 2 * tg + 8 * (i >> 1);
            const float2 v = h0 + r < a.H ? *(const float2 *)(a.q + ((int64_t)t * a.H + h0 + r) * D + c)
                                          : make_float2(0.0f, 0.0f);
            split3(v.x, v.y, qf[s][0][i], qf[s][1][i], qf[s][2][i]);
        }
    const float scale = 1.0f / sqrtf((float)D);

    float acc[NTW][4];
#pragma unroll
    for (int j = 0; j < NTW; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;

    for (int i = 0; i < n_tiles; i++) {
        const int nt = min(n_keys - i * TCB_KT, TCB_KT);
        if (tid < TCB_KT && i + 1 < n_tiles) kp[(i + 1) & 1][tid] = key_next;
        asm volatile("cp.async.wait_all;" ::: "memory");
        __syncthreads();   /* tile i landed; kp of tile i + 1; every warp done with tile i - 1 */
        if (i + 1 < n_tiles) {
            issue(i + 1);
            if (tid < TCB_KT) key_next = key_at((i + 2) * TCB_KT + tid);
        }
        const uint32_t tile = tiles_at + (uint32_t)((i & 1) * TCB_KT * LDK);

        /* scores of the 32 keys over this warp's dims, a pair of n8 key
         * tiles at a time (keys 16 pr ..), both from one ldmatrix a part
         * (lane l: key 16 pr + l % 8 + 8 (l / 16), dims + 8 (l / 8 % 2)) */
        {
            const uint32_t kr = tile + (uint32_t)((lane % 8 + 8 * (lane / 16)) * LDK + 2 * (8 * (lane / 8 % 2)));
#pragma unroll
            for (int pr = 0; pr < 2; pr++) {
                float sc[2][4], ch[2][4];
#pragma unroll
                for (int n = 0; n < 2; n++) sc[n][0] = sc[n][1] = sc[n][2] = sc[n][3] = 0.0f;
#pragma unroll
                for (int s = 0; s < STEPS; s++) {
                    if (s % 2 == 0) {
#pragma unroll
                        for (int n = 0; n < 2; n++) ch[n][0] = ch[n][1] = ch[n][2] = ch[n][3] = 0.0f;
                    }
                    const int col = dq + ds * s;
                    const uint32_t at = kr + 16 * pr * LDK;
                    uint32_t kb[4];   /* b0, b1 of tile 2 pr, then of tile 2 pr + 1 */
                    ldsm_x4_at(kb, at + 2 * col);
                    if (col < E) {
#pragma unroll
                        for (int n = 0; n < 2; n++) {
                            const uint32_t b[2] = {kb[2 * n], kb[2 * n + 1]};
                            mma_bf16_3(ch[n], qf[s], b);
                        }
                    } else {
                        uint32_t km[4], kl[4];
                        ldsm_x4_at(km, at + 2 * (D + col - E));
                        ldsm_x4_at(kl, at + 2 * (D + X + col - E));
#pragma unroll
                        for (int n = 0; n < 2; n++) {
                            const uint32_t b[3][2] = {{kb[2 * n], kb[2 * n + 1]},
                                                      {km[2 * n], km[2 * n + 1]},
                                                      {kl[2 * n], kl[2 * n + 1]}};
                            mma_bf16_6(ch[n], qf[s], b);
                        }
                    }
                    if (s % 2 == 1 || s == STEPS - 1) {
#pragma unroll
                        for (int n = 0; n < 2; n++)
#pragma unroll
                            for (int c = 0; c < 4; c++) sc[n][c] += ch[n][c];
                    }
                }
#pragma unroll
                for (int n = 0; n < 2; n++) {
                    const int k = 16 * pr + 8 * n + 2 * tg;
                    *(float2 *)&s_part[warp][g][k] = make_float2(sc[n][0], sc[n][1]);
                    *(float2 *)&s_part[warp][g + 8][k] = make_float2(sc[n][2], sc[n][3]);
                }
            }
        }
        __syncthreads();

        /* the online softmax step of the tile: head row r on 16 lanes, keys j, j + 1 */
        {
            const int r = tid / 16, j = 2 * (tid % 16);
            float2 sum = *(const float2 *)&s_part[0][r][j];
#pragma unroll
            for (int w = 1; w < 8; w++) {
                const float2 v = *(const float2 *)&s_part[w][r][j];
                sum.x += v.x, sum.y += v.y;
            }
            const float s0 = j < nt ? sum.x * scale : -INFINITY, s1 = j + 1 < nt ? sum.y * scale : -INFINITY;
            float mx = fmaxf(s0, s1);
#pragma unroll
            for (int o = 1; o < 16; o *= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
            const float M = m_row[r], M1 = fmaxf(M, mx);
            const float p0 = j < nt ? expf(s0 - M1) : 0.0f, p1 = j + 1 < nt ? expf(s1 - M1) : 0.0f;
            float ps = p0 + p1;
#pragma unroll
            for (int o = 1; o < 16; o *= 2) ps += __shfl_xor_sync(0xffffffffu, ps, o);
            uint32_t pp[3];
            split3(p0, p1, pp[0], pp[1], pp[2]);
#pragma unroll
            for (int k = 0; k < 3; k++) *(uint32_t *)&p_sh[k][r][j] = pp[k];
            __syncwarp();   /* the row's reads of m_row before its update */
            if (tid % 16 == 0) {
                const float alpha = expf(M - M1);
                den_row[r] = fmaf(den_row[r], alpha, ps);
                m_row[r] = M1;
                alpha_row[r] = alpha;
            }
        }
        __syncthreads();

        /* O = O alpha + P V, a 16-key step at a time (the first rescales O
         * by alpha in its fma, the second adds): the weights' A fragments
         * (lane l: row l % 8 + 8 (l / 8 % 2), keys 16 ks + 8 (l / 16)); V's
         * B fragments by ldmatrix.trans (lane l: key 16 ks + l % 8 +
         * 8 (l / 8 % 2), of the pair's column c0 + 64 (l / 16)) */
        {
            const uint32_t p_at = (uint32_t)__cvta_generic_to_shared(&p_sh[0][0][0]) +
                                  2 * ((lane % 8 + 8 * (lane / 8 % 2)) * TCB_PLD + 8 * (lane / 16));
            const float al0 = alpha_row[g], al1 = alpha_row[g + 8];
            const uint32_t vr = tile + (uint32_t)((lane % 8 + 8 * (lane / 8 % 2)) * LDK);
#pragma unroll
            for (int ks = 0; ks < 2; ks++) {
                uint32_t pa[3][4];
#pragma unroll
                for (int k = 0; k < 3; k++) ldsm_x4_at(pa[k], p_at + 2 * (k * TCA_ROWS * TCB_PLD + 16 * ks));
#pragma unroll
                for (int jp = 0; jp < NTW / 2; jp++) {
                    const int c0 = 8 * warp + 128 * jp;   /* tiles 2 jp, 2 jp + 1: columns c0, c0 + 64 */
                    uint32_t vb[4];   /* b0, b1 of column c0, then of c0 + 64 */
                    ldsm_x4_trans_at(vb, vr + 16 * ks * LDK + 2 * (c0 + 64 * (lane / 16)));
#pragma unroll
                    for (int u = 0; u < 2; u++) {
                        const int cu = c0 + 64 * u;
                        float d4[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                        if (cu < E) {
                            const uint32_t b[2] = {vb[2 * u], vb[2 * u + 1]};
                            mma_bf16_3(d4, pa, b);
                        } else {   /* the split columns' mid and lo parts: lanes 0-15 mid, 16-31 lo */
                            uint32_t vml[4];
                            ldsm_x4_trans_at(vml, vr + 16 * ks * LDK + 2 * (D + cu - E + X * (lane / 16)));
                            const uint32_t b[3][2] = {{vb[2 * u], vb[2 * u + 1]}, {vml[0], vml[1]}, {vml[2], vml[3]}};
                            mma_bf16_6(d4, pa, b);
                        }
                        float(&o)[4] = acc[2 * jp + u];
                        if (ks == 0) {
                            o[0] = fmaf(o[0], al0, d4[0]);
                            o[1] = fmaf(o[1], al0, d4[1]);
                            o[2] = fmaf(o[2], al1, d4[2]);
                            o[3] = fmaf(o[3], al1, d4[3]);
                        } else {
                            o[0] += d4[0], o[1] += d4[1], o[2] += d4[2], o[3] += d4[3];
                        }
                    }
                }
            }
        }
    }
    __syncthreads();
    tca_store<D, NTW, 64>(a, acc, m_row, den_row, t, h0, pos, 8 * warp, g, tg);
}

/* Whether k_attention_bf16 can run at head size d with `split` dims in
 * parts: the sizes, and the kernel's shared memory at them (a session asks
 * at its start, so that it allocates no views the kernel cannot use: 218 KB
 * at exact mode's head size 512, more than an A100 gives). */
static bool tcb_can_run(int d, int split) {
    if (!tcb_fits(d, split)) return false;
    size_t shm = tcb_shared_bytes(d, split);
    return d == 128   ? allow_shared(k_attention_bf16<128, true>, shm) && allow_shared(k_attention_bf16<128, false>, shm)
           : d == 256 ? allow_shared(k_attention_bf16<256, true>, shm) && allow_shared(k_attention_bf16<256, false>, shm)
                      : allow_shared(k_attention_bf16<512, true>, shm) && allow_shared(k_attention_bf16<512, false>, shm);
}

/* Whether a chunk takes it (asked at each chunk's layer, a few
 * microseconds: models of other sizes and GPU limits may share the process,
 * and the opt-in is per kernel, not per model); DS4_CUDA_NO_BF16ATTN=1, read
 * at each enqueue, keeps k_attention_tc8 (for A/B). */
static bool tcb_runs(int d, int split) { return !getenv("DS4_CUDA_NO_BF16ATTN") && tcb_can_run(d, split); }

/* The chunk's key views, then its attention: the raw ring's slots of
 * positions lo .. lo + n_raw - 1 and compressed rows 0 .. n_rows - 1 (float,
 * or compact rows8) into a.view_raw / a.view_rows, the last d - key_tf32
 * dims in parts. DS4_CUDA_NO_ATTN_SPREAD=1 (read at each enqueue) gives
 * each warp contiguous score dims (for A/B). */
static void launch_attention_bf16(cudaStream_t st, const attn_args &a, int n, int64_t lo, int64_t n_raw,
                                  const float *rows, const uint8_t *rows8, const kv_compact &kv, int64_t n_rows) {
    const int threads = a.d / 4, split = a.d - a.key_tf32;
    launch_k(k_key_view, (unsigned)n_raw, threads, 0, st, a.raw, (const uint8_t *)nullptr, kv, lo, a.cap_raw,
             (uint16_t *)a.view_raw, a.d, split);
    if (n_rows)
        launch_k(k_key_view, (unsigned)n_rows, threads, 0, st, rows, rows8, kv, (int64_t)0, (int64_t)0,
                 (uint16_t *)a.view_rows, a.d, split);
    dim3 grid((unsigned)((a.H + TCA_ROWS - 1) / TCA_ROWS), (unsigned)n);
    size_t shm = tcb_shared_bytes(a.d, split);
    const bool spread = !getenv("DS4_CUDA_NO_ATTN_SPREAD");
    switch (a.d) {
    case 128: launch_k(spread ? k_attention_bf16<128, true> : k_attention_bf16<128, false>, grid, TCB_THREADS, shm, st, a); break;
    case 256: launch_k(spread ? k_attention_bf16<256, true> : k_attention_bf16<256, false>, grid, TCB_THREADS, shm, st, a); break;
    case 512: launch_k(spread ? k_attention_bf16<512, true> : k_attention_bf16<512, false>, grid, TCB_THREADS, shm, st, a); break;
    }
}
