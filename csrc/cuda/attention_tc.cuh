/* Chunk attention on the tensor cores: attention.cuh's k_attention, with the
 * scores and the weighted sum as matrix products.
 *
 * All query heads of a token read the same key rows (one KV head, keys are
 * values), so for one token S = Q K^T is a product of 16 heads x 16 keys x d
 * and O += P V one of 16 heads x d x 16 keys: a block takes 16 heads of one
 * token, a key tile at a time, on mma.sync m16n8k8 tf32. Float32 operands in
 * two tf32 parts (hi = tf32(x), lo = tf32(x - hi): 22 bits), three products
 * (lo hi, hi lo, hi hi) give float32's precision (two where the key dims are
 * exact in tf32: attn_args.key_tf32); each product chain starts
 * from zero over at most 32 elements and is added to its float32 sum by the
 * CUDA cores (the tensor cores' own adds truncate). A chunk's token has its
 * keys in one block, so the block also adds the sink and applies the inverse
 * RoPE (k_attn_combine's steps for one split) and writes the output. Key
 * rows are float: a compact session's chunk passes its float view of the
 * compressed rows (launch_attention sends compact rows to k_attention). */
#pragma once

#include "attention.cuh"

#define TCA_ROWS 16      /* heads a block (one m16 tile; rows past H are zeros, unused) */
#define TCA_KT 16        /* keys a tile */
#define TCA_THREADS 128  /* 4 warps: scores as 2 key halves x 2 d halves, the sum as 4 d quarters */

/* Shared floats a block takes for head size d: Q's two parts and a key tile,
 * rows padded by 4 floats so a fragment's 8 rows x 4 columns hit 32 banks. */
static inline size_t tca_shared_bytes(int d) { return (size_t)3 * TCA_ROWS * (d + 4) * sizeof(float); }

/* Head sizes it takes (d / 4 per warp in the sum: d / 32 n8 tiles). */
static inline bool tca_fits(int d) { return d == 64 || d == 128 || d == 256 || d == 512; }

/* x rounded to tf32, to nearest with ties away from zero: cvt.rna.tf32.f32's
 * result for every finite x, in two integer instructions (sm_90 runs that cvt
 * as four, an infinity test and a select among them: a fifth of the chunk
 * attention's instructions). A carry out of the mantissa rounds up to the next
 * binade, as it should. */
__device__ __forceinline__ uint32_t tf32_bits(float x) {
    return (__float_as_uint(x) + 0x1000u) & 0xffffe000u;
}

__device__ __forceinline__ void tf32_split(float x, uint32_t &hi, uint32_t &lo) {
    hi = tf32_bits(x);
    lo = tf32_bits(x - __uint_as_float(hi));
}

__device__ __forceinline__ void mma_tf32(float d[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/* d += A B on float32 operands in two tf32 parts each, small products first. */
__device__ __forceinline__ void mma_3xtf32(float d[4], const uint32_t ahi[4], const uint32_t alo[4],
                                           float b0, float b1) {
    uint32_t bh0, bl0, bh1, bl1;
    tf32_split(b0, bh0, bl0);
    tf32_split(b1, bh1, bl1);
    mma_tf32(d, alo, bh0, bh1);
    mma_tf32(d, ahi, bl0, bl1);
    mma_tf32(d, ahi, bh0, bh1);
}

/* The same where B is exact in tf32 (its low part zero): two products. The
 * skipped one would add exact zeros, so the sums are the same bits. */
__device__ __forceinline__ void mma_2xtf32(float d[4], const uint32_t ahi[4], const uint32_t alo[4],
                                           float b0, float b1) {
    mma_tf32(d, alo, __float_as_uint(b0), __float_as_uint(b1));
    mma_tf32(d, ahi, __float_as_uint(b0), __float_as_uint(b1));
}

/* Four 8 x 4 blocks of 32-bit words from shared memory (ldmatrix on b16
 * pairs), lane l giving the address of row l % 8 of block l / 8: each lane
 * gets word tg of row g of each block, the m16n8k8 tf32 fragment places. */
__device__ __forceinline__ void ldsm_x4_f32(uint32_t r[4], const float *p) {
    ldsm_x4_at(r, (uint32_t)__cvta_generic_to_shared(p));
}

/* Thread i < KT's row of the key tile at k0 of the keys before `end`, a
 * short tile repeating its last key (its weight is 0); nullptr past them. */
template <int D, int KT>
__device__ __forceinline__ key_ref tca_key_of(const attn_args &a, const attn_keys &keys, int64_t k0, int64_t end) {
    if (threadIdx.x >= KT || k0 >= end) return key_ref{nullptr, false};
    const int64_t nt = end - k0 < KT ? end - k0 : KT;
    return attn_key_row(a, keys, k0 + (threadIdx.x < nt ? threadIdx.x : nt - 1), D);
}

/* A key tile of KT rows into kt (row stride LD) by cp.async; key_row is
 * this thread's row (threads < KT), from tca_key_of one tile ahead, so its
 * read of the indexer's choice is not waited out here; kp holds the rows'
 * addresses. Begins with the barrier that ends the previous tile's reads of
 * kt and the weights, ends with the one after the copies land. */
template <int D, int KT, int THREADS, int LD>
__device__ __forceinline__ void tca_load_keys(const float *key_row, const float **kp, float *kt) {
    if (threadIdx.x < KT) kp[threadIdx.x] = key_row;
    __syncthreads();   /* kp; the previous tile's reads of kt, p_sh, alpha_row */
    if constexpr (D % (4 * WARP) == 0) {
        /* a warp a row, 16 bytes a lane: the offsets are constants (the
         * general loop's index arithmetic was ~18% of k_attention_tc8's
         * instructions) */
        const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
        for (int r = warp; r < KT; r += THREADS / WARP) {
            const float *src = kp[r] + 4 * lane;
            float *dst = kt + r * LD + 4 * lane;
#pragma unroll
            for (int k = 0; k < D / (4 * WARP); k++) cp_async16(dst + 4 * WARP * k, src + 4 * WARP * k);
        }
    } else {
        for (int i = threadIdx.x; i < KT * D / 4; i += THREADS) {
            int r = i / (D / 4), c = i % (D / 4);
            cp_async16(kt + r * LD + 4 * c, kp[r] + 4 * c);
        }
    }
    asm volatile("cp.async.wait_all;" ::: "memory");
    __syncthreads();
}

/* tca_load_keys where some rows are compact (a decode token's compressed
 * rows, kv_compact.cuh): a warp a row, each lane's four-dim groups decoded
 * into kt (the very floats a float row holds). kp and kc hold the rows'
 * addresses and whether each is compact. The same barriers. */
template <int D, int KT, int THREADS, int LD>
__device__ __forceinline__ void tca_load_keys_compact(const key_ref &key_row, const float **kp, bool *kc, float *kt,
                                                      const kv_compact &L) {
    static_assert(D % (4 * WARP) == 0, "a lane's four-dim groups at constant offsets");
    if (threadIdx.x < KT) kp[threadIdx.x] = (const float *)key_row.p, kc[threadIdx.x] = key_row.compact;
    __syncthreads();   /* kp, kc; the previous tile's reads of kt, p_sh, alpha_row */
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    for (int r = warp; r < KT; r += THREADS / WARP) {
        const key_ref src{kp[r], kc[r]};
        float4 v[D / (4 * WARP)];   /* every load of the row out before the first store */
#pragma unroll
        for (int k = 0; k < D / (4 * WARP); k++) v[k] = key_load4(src, lane + WARP * k, L);
#pragma unroll
        for (int k = 0; k < D / (4 * WARP); k++) *(float4 *)(kt + r * LD + 4 * (lane + WARP * k)) = v[k];
    }
    __syncthreads();
}

/* A 16-key step's softmax weights as the sum's A operand takes them: each
 * weight's two tf32 parts (split once, by the softmax), in fragment order:
 * lane l's m16n8k8 A fragment of k8 step ks is hi[ks][l] (and lo[ks][l]),
 * one 16-byte load into the four registers the mma reads (weights loaded
 * in pairs had to be moved into them, a copy for each mma). */
struct tca_weights {
    uint4 hi[2][WARP], lo[2][WARP];
};

/* The weight of head row r (< 16) and key k (< 16) of the step: A element
 * (r, k % 8) of k8 step k / 8, which lane (r % 8) * 4 + k % 4 holds as its
 * element r / 8 + 2 ((k % 8) / 4). */
__device__ __forceinline__ void tca_put_weight(tca_weights &w, int r, int k, float p) {
    uint32_t hi, lo;
    tf32_split(p, hi, lo);
    const int ks = k / 8, l = (r % 8) * 4 + k % 4, e = r / 8 + 2 * ((k % 8) / 4);
    ((uint32_t *)&w.hi[ks][l])[e] = hi;
    ((uint32_t *)&w.lo[ks][l])[e] = lo;
}

/* Which of a warp's n8 tiles of V are exact in tf32 (two products, else
 * three): all, all but the last (the qat modes' RoPE columns where the tiles
 * interleave), none, or each as key_tf32 says. Decided once a warp, outside
 * the loops, so the products are not behind a branch the compiler must
 * reconverge around each mma (BSSY / WARPSYNC). Tile j is columns
 * [d0 + TS j, + 8). */
enum { TCA_EXACT_NONE, TCA_EXACT_ALL, TCA_EXACT_LEAD, TCA_EXACT_EACH };

template <int NTW, int TS>
__device__ __forceinline__ int tca_exactness(int d0, int key_tf32) {
    const int last = d0 + TS * (NTW - 1);
    if (last + 8 <= key_tf32) return TCA_EXACT_ALL;
    if (NTW > 1 && last - TS + 8 <= key_tf32) return TCA_EXACT_LEAD;
    return d0 + 8 > key_tf32 ? TCA_EXACT_NONE : TCA_EXACT_EACH;
}

template <int NTW, int TS, int LD, int EXACT>
__device__ __forceinline__ void tca_pv_tiles(float (&acc)[NTW][4], const uint32_t (&phi)[2][4],
                                             const uint32_t (&plo)[2][4], float al0, float al1, const float *kv,
                                             int d0, int key_tf32, int g, int tg) {
#pragma unroll
    for (int j = 0; j < NTW; j++) {
        int n = d0 + TS * j + g;   /* B column: d element */
        float d4[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        bool exact = EXACT == TCA_EXACT_ALL || (EXACT == TCA_EXACT_LEAD && j < NTW - 1) ||
                     (EXACT == TCA_EXACT_EACH && d0 + TS * j + 8 <= key_tf32);
#pragma unroll
        for (int ks = 0; ks < 2; ks++)
            if (exact)
                mma_2xtf32(d4, phi[ks], plo[ks], kv[(8 * ks + tg) * LD + n], kv[(8 * ks + tg + 4) * LD + n]);
            else
                mma_3xtf32(d4, phi[ks], plo[ks], kv[(8 * ks + tg) * LD + n], kv[(8 * ks + tg + 4) * LD + n]);
        acc[j][0] = fmaf(acc[j][0], al0, d4[0]);
        acc[j][1] = fmaf(acc[j][1], al0, d4[1]);
        acc[j][2] = fmaf(acc[j][2], al1, d4[2]);
        acc[j][3] = fmaf(acc[j][3], al1, d4[3]);
    }
}

/* O = O alpha + P V for one 16-key step: A = P (16 heads x 16 keys, the
 * weights' tf32 parts), B = the step's key rows kv (row stride LD); this
 * warp's NTW n8 tiles of d (tile j: columns d0 + TS j..), rows g and g + 8
 * rescaled by their alpha in the same fma. */
template <int NTW, int TS, int LD>
__device__ __forceinline__ void tca_pv_step(float (&acc)[NTW][4], const tca_weights &p, const float *alpha,
                                            const float *kv, int d0, int key_tf32, int g, int tg) {
    uint32_t phi[2][4], plo[2][4];
    const int lane = 4 * g + tg;
#pragma unroll
    for (int ks = 0; ks < 2; ks++) {
        const uint4 h = p.hi[ks][lane], l = p.lo[ks][lane];
        phi[ks][0] = h.x, phi[ks][1] = h.y, phi[ks][2] = h.z, phi[ks][3] = h.w;
        plo[ks][0] = l.x, plo[ks][1] = l.y, plo[ks][2] = l.z, plo[ks][3] = l.w;
    }
    float al0 = alpha[g], al1 = alpha[g + 8];
    switch (tca_exactness<NTW, TS>(d0, key_tf32)) {
    case TCA_EXACT_ALL:
        tca_pv_tiles<NTW, TS, LD, TCA_EXACT_ALL>(acc, phi, plo, al0, al1, kv, d0, key_tf32, g, tg);
        break;
    case TCA_EXACT_LEAD:
        tca_pv_tiles<NTW, TS, LD, TCA_EXACT_LEAD>(acc, phi, plo, al0, al1, kv, d0, key_tf32, g, tg);
        break;
    case TCA_EXACT_NONE:
        tca_pv_tiles<NTW, TS, LD, TCA_EXACT_NONE>(acc, phi, plo, al0, al1, kv, d0, key_tf32, g, tg);
        break;
    default:
        tca_pv_tiles<NTW, TS, LD, TCA_EXACT_EACH>(acc, phi, plo, al0, al1, kv, d0, key_tf32, g, tg);
    }
}

/* The sink, the normalization and the inverse RoPE, as k_attn_combine does
 * them for one split, into o: rows g, g + 8; d elements d0 + TS j + 2 tg,
 * + 1 (a RoPE pair). */
template <int D, int NTW, int TS>
__device__ __forceinline__ void tca_store(const attn_args &a, const float (&acc)[NTW][4], const float *m_row,
                                          const float *den_row, int t, int h0, int64_t pos, int d0, int g, int tg) {
#pragma unroll
    for (int hh = 0; hh < 2; hh++) {
        int r = g + 8 * hh, h = h0 + r;
        if (h >= a.H) continue;
        float M = fmaxf(a.sinks[h], m_row[r]), l = den_row[r];
        float den = expf(a.sinks[h] - M);
        float w = l > 0 ? expf(m_row[r] - M) : 0.0f;
        den += l * w;
        float *og = a.o + ((int64_t)t * a.H + h) * D;
#pragma unroll
        for (int j = 0; j < NTW; j++) {
            int c = d0 + TS * j + 2 * tg;
            float x0 = acc[j][2 * hh] * w / den, x1 = acc[j][2 * hh + 1] * w / den;
            int k = c - (D - a.rope_dim);
            if (k >= 0) {
                float phi = (float)pos * a.freqs[k / 2];
                float cs = cosf(phi), sn = -sinf(phi);
                float r0 = x0 * cs - x1 * sn, r1 = x0 * sn + x1 * cs;
                x0 = r0, x1 = r1;
            }
            og[c] = x0;
            og[c + 1] = x1;
        }
    }
}

/* A decode split's partial, as k_attention writes it for k_attn_combine:
 * the maximum, the denominator and the weighted sum (not normalized), rows
 * g, g + 8; d elements d0 + TS j + 2 tg, + 1. */
template <int D, int NTW, int TS>
__device__ __forceinline__ void tca_store_part(const attn_args &a, const float (&acc)[NTW][4], const float *m_row,
                                               const float *den_row, int t, int h0, int sp, int d0, int g, int tg) {
#pragma unroll
    for (int hh = 0; hh < 2; hh++) {
        int r = g + 8 * hh, h = h0 + r;
        if (h >= a.H) continue;
        float *pp = a.part + (((int64_t)t * a.H + h) * a.splits + sp) * (ATTN_PART_HEAD + D);
#pragma unroll
        for (int j = 0; j < NTW; j++)
            *(float2 *)(pp + ATTN_PART_HEAD + d0 + TS * j + 2 * tg) = make_float2(acc[j][2 * hh], acc[j][2 * hh + 1]);
        if (d0 == 0 && tg == 0) pp[0] = m_row[r], pp[1] = den_row[r];
    }
}

/* Whether the 32-element score chain from column c has key elements exact
 * in tf32 only (two products). */
__device__ __forceinline__ bool tca_chain_exact(int c, int key_tf32) { return c + 32 <= key_tf32; }

/* The end of a warp's leading chains (32 d elements each, from dk in a d
 * half of KH) that tca_chain_exact takes: [dk, dk + end). */
__device__ __forceinline__ int tca_exact_chains_end(int dk, int KH, int key_tf32) {
    int n = key_tf32 - dk;
    n = n < 0 ? 0 : n > KH ? KH : n;
    return n / 32 * 32;
}

/* s += one 32-element chain of the scores from column c: A = Q (16 heads;
 * in tf32 parts at qa_hi / qa_lo, or float at qa_hi split here when
 * SPLIT_Q), B = 8 keys at kb; the chain starts from zero (see the top). */
template <bool EXACT, bool SPLIT_Q>
__device__ __forceinline__ void tca_score_chain(float (&s)[4], const float *qa_hi, const float *qa_lo,
                                                const float *kb, int c) {
    float d4[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int k16 = 0; k16 < 32; k16 += 16) {
        uint32_t kf[4];   /* b0, b1 of columns +0.., then of +8.. */
        ldsm_x4_f32(kf, kb + c + k16);
#pragma unroll
        for (int h8 = 0; h8 < 2; h8++) {
            const int ch = c + k16 + 8 * h8;
            uint32_t ahi[4], alo[4];
            ldsm_x4_f32(ahi, qa_hi + ch);
            if (SPLIT_Q) {
#pragma unroll
                for (int i = 0; i < 4; i++) tf32_split(__uint_as_float(ahi[i]), ahi[i], alo[i]);
            } else {
                ldsm_x4_f32(alo, qa_lo + ch);
            }
            float b0 = __uint_as_float(kf[2 * h8]), b1 = __uint_as_float(kf[2 * h8 + 1]);
            if (EXACT)
                mma_2xtf32(d4, ahi, alo, b0, b1);
            else
                mma_3xtf32(d4, ahi, alo, b0, b1);
        }
    }
#pragma unroll
    for (int i = 0; i < 4; i++) s[i] += d4[i];
}

/* s = a warp's scores over its d half [dk, dk + KH), chain after chain. */
template <int KH, bool SPLIT_Q>
__device__ __forceinline__ void tca_scores(float (&s)[4], const float *qa_hi, const float *qa_lo, const float *kb,
                                           int dk, int key_tf32) {
    const int c_exact = tca_exact_chains_end(dk, KH, key_tf32);
    int c0 = 0;
#pragma unroll 2
    for (; c0 < c_exact; c0 += 32) tca_score_chain<true, SPLIT_Q>(s, qa_hi, qa_lo, kb, dk + c0);
#pragma unroll 2
    for (; c0 < KH; c0 += 32) tca_score_chain<false, SPLIT_Q>(s, qa_hi, qa_lo, kb, dk + c0);
}

/* c = one 32-element chain of the scores from column col for 32 keys (four n8
 * tiles; kb at key row lane % 8): each tile's products in tca_score_chain's
 * order, Q split once for the four. */
template <bool EXACT, int LD>
__device__ __forceinline__ void tca_score_chain32(float (&c)[4][4], const float *qa, const float *kb, int col) {
#pragma unroll
    for (int nt = 0; nt < 4; nt++) c[nt][0] = c[nt][1] = c[nt][2] = c[nt][3] = 0.0f;
#pragma unroll
    for (int k16 = 0; k16 < 32; k16 += 16) {
        uint32_t ahi[2][4], alo[2][4];
#pragma unroll
        for (int h8 = 0; h8 < 2; h8++) {
            ldsm_x4_f32(ahi[h8], qa + col + k16 + 8 * h8);
#pragma unroll
            for (int i = 0; i < 4; i++) tf32_split(__uint_as_float(ahi[h8][i]), ahi[h8][i], alo[h8][i]);
        }
#pragma unroll
        for (int nt = 0; nt < 4; nt++) {
            uint32_t kf[4];   /* b0, b1 of columns +0.., then of +8.. */
            ldsm_x4_f32(kf, kb + 8 * nt * LD + col + k16);
#pragma unroll
            for (int h8 = 0; h8 < 2; h8++) {
                float b0 = __uint_as_float(kf[2 * h8]), b1 = __uint_as_float(kf[2 * h8 + 1]);
                if (EXACT)
                    mma_2xtf32(c[nt], ahi[h8], alo[h8], b0, b1);
                else
                    mma_3xtf32(c[nt], ahi[h8], alo[h8], b0, b1);
            }
        }
    }
}

/* A named barrier of n threads, the producer's earlier shared stores then
 * visible to the consumer. Both sides wait, though the producer could only
 * arrive: its next step is the block's barrier, where it waits anyway.
 * barrier.sync, not bar.sync (= barrier.sync.aligned, which a warp must
 * reach converged): with the hand-ons as they are now written (one softmax
 * barrier after both steps' branches), compute-sanitizer's synccheck found
 * a warp's lanes not converged at both of k_attention_tc8's (1,600 reports;
 * none with barrier.sync, which does not leave it to where the compiler
 * puts a branch's reconvergence). */
__device__ __forceinline__ void named_bar_sync(int id, int n) {
    asm volatile("barrier.sync %0, %1;" ::"r"(id), "r"(n) : "memory");
}

/* compute-sanitizer's racecheck reports hazards that are not there once a
 * kernel has passed a named barrier: device_run.sh's race-probe, a kernel
 * of k_attention_tc8's hand-ons, gets a write-after-read between accesses a
 * block barrier orders. A build with DS4_CUDA_HANDON_BLOCK_BARRIERS=1
 * (device_run.sh's sanitize step makes one for racecheck) takes each
 * hand-on at a block barrier instead: the same order, so the same bits,
 * for a racecheck of everything else. */
#ifndef DS4_CUDA_HANDON_BLOCK_BARRIERS
#define DS4_CUDA_HANDON_BLOCK_BARRIERS 0
#endif

/* The maximum and the sum over a head row's 8 lanes (the softmax's lane
 * groups: lanes 8 i .. 8 i + 7), in one butterfly order. */
__device__ __forceinline__ float tca_row_max(float x) {
#pragma unroll
    for (int o = 1; o < 8; o *= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}

__device__ __forceinline__ float tca_row_sum(float x) {
#pragma unroll
    for (int o = 1; o < 8; o *= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

/* Grid: (head groups of 16, tokens). */
template <int D>
__global__ void __launch_bounds__(TCA_THREADS, 2) k_attention_tc(attn_args a) {
    pdl_begin();
    constexpr int LD = D + 4, NTW = D / 32 /* n8 tiles a warp in the sum */, KH = D / 2;
    extern __shared__ __align__(16) float sh[];
    float *q_hi = sh, *q_lo = sh + TCA_ROWS * LD, *kt = sh + 2 * TCA_ROWS * LD;   /* [16][LD] each */
    __shared__ float s_part[2][TCA_ROWS][TCA_KT + 1];   /* scores of each d half */
    __shared__ tca_weights p_sh;                        /* this tile's weights */
    __shared__ float m_row[TCA_ROWS], den_row[TCA_ROWS], alpha_row[TCA_ROWS];
    __shared__ const float *kp[TCA_KT];

    int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP, g = lane / 4, tg = lane % 4;
    int t = blockIdx.y, h0 = blockIdx.x * TCA_ROWS;
    int64_t pos = *a.pos0 + t;
    const attn_keys keys = attn_keys_of(a, t, pos);
    const int64_t n_keys = keys.n_keys;

    for (int i = threadIdx.x; i < TCA_ROWS * D; i += TCA_THREADS) {
        int r = i / D, c = i % D;
        float x = h0 + r < a.H ? a.q[((int64_t)t * a.H + h0 + r) * D + c] : 0.0f;
        uint32_t hi, lo;
        tf32_split(x, hi, lo);
        q_hi[r * LD + c] = __uint_as_float(hi);
        q_lo[r * LD + c] = __uint_as_float(lo);
    }
    if (threadIdx.x < TCA_ROWS) m_row[threadIdx.x] = -INFINITY, den_row[threadIdx.x] = 0.0f;
    const float scale = 1.0f / sqrtf((float)D);

    /* the sum: warp w has d quarter w, NTW n8 tiles; rows g and g + 8 */
    float acc[NTW][4];
#pragma unroll
    for (int j = 0; j < NTW; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;

    const float *key_row = (const float *)tca_key_of<D, TCA_KT>(a, keys, 0, n_keys).p;
    for (int64_t k0 = 0; k0 < n_keys; k0 += TCA_KT) {
        int nt = n_keys - k0 < TCA_KT ? (int)(n_keys - k0) : TCA_KT;
        tca_load_keys<D, TCA_KT, TCA_THREADS, LD>(key_row, kp, kt);
        key_row = (const float *)tca_key_of<D, TCA_KT>(a, keys, k0 + TCA_KT, n_keys).p;   /* the next tile's, read while this one runs */

        /* scores: warp w takes keys 8 (w % 2).. over d half w / 2 */
        {
            int kn = 8 * (warp % 2), dk = KH * (warp / 2);
            float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            /* ldmatrix addresses: A's four 8 x 4 blocks (heads 0-7 / 8-15 x
             * columns +0 / +4), B's four (keys x columns +0, +4, +8, +12) */
            const float *qa = q_hi + ((lane / 8) % 2 * 8 + lane % 8) * LD + 4 * (lane / 16);
            const float *kb = kt + (kn + lane % 8) * LD + 4 * (lane / 8);
            tca_scores<KH, false>(s, qa, qa + TCA_ROWS * LD, kb, dk, a.key_tf32);
            /* D: rows g, g + 8; keys kn + 2 tg, + 1 */
            s_part[warp / 2][g][kn + 2 * tg] = s[0];
            s_part[warp / 2][g][kn + 2 * tg + 1] = s[1];
            s_part[warp / 2][g + 8][kn + 2 * tg] = s[2];
            s_part[warp / 2][g + 8][kn + 2 * tg + 1] = s[3];
        }
        __syncthreads();

        /* online softmax: warp w has heads 4w.., 8 lanes a head, 2 keys a lane */
        {
            int r = 4 * warp + lane / 8, j = 2 * (lane % 8);
            float s0 = j < nt ? (s_part[0][r][j] + s_part[1][r][j]) * scale : -INFINITY;
            float s1 = j + 1 < nt ? (s_part[0][r][j + 1] + s_part[1][r][j + 1]) * scale : -INFINITY;
            float M = m_row[r], Mn = fmaxf(M, tca_row_max(fmaxf(s0, s1)));
            float p0 = j < nt ? expf(s0 - Mn) : 0.0f, p1 = j + 1 < nt ? expf(s1 - Mn) : 0.0f;
            float psum = tca_row_sum(p0 + p1);
            tca_put_weight(p_sh, r, j, p0);
            tca_put_weight(p_sh, r, j + 1, p1);
            __syncwarp();
            if (lane % 8 == 0) {
                float alpha = expf(M - Mn);
                alpha_row[r] = alpha;
                den_row[r] = den_row[r] * alpha + psum;
                m_row[r] = Mn;
            }
        }
        __syncthreads();

        /* O = O alpha + P V: warp w has d quarter w */
        tca_pv_step<NTW, 8, LD>(acc, p_sh, alpha_row, kt, (D / 4) * warp, a.key_tf32, g, tg);
    }
    __syncthreads();
    tca_store<D, NTW, 8>(a, acc, m_row, den_row, t, h0, pos, (D / 4) * warp, g, tg);
}

/* k_attention_tc8, the same attention on 8 warps a block (head sizes >= 128).
 * k_attention_tc runs 8 warps an SM (4 a block, 2 blocks: 99 KB of shared
 * memory and 220 registers a block) at 1.1 instructions a cycle, its stalls
 * fixed-latency dependencies that more warps would hide. This variant keeps
 * Q once as float (split into tf32 parts at the fragment: the same rounding
 * of the same value as k_attention_tc's prologue), which frees room for a
 * 32-key tile in the same 99 KB, and runs 8 warps a block: the scores as 8
 * d eighths of all 32 keys (a Q fragment split once for four key tiles),
 * the sum as 8 interleaved sets of n8 tiles (half the accumulators a
 * thread). The 32-key tile is two 16-key softmax steps, in order, and each
 * d half's score chains are added in k_attention_tc's order, so every
 * product, sum and rescaling is k_attention_tc's: the same logits bits
 * (csrc/cuda/same_bits.py).
 * DS4_CUDA_NO_ATTN8=1 keeps k_attention_tc (for A/B). */
#define TCA8_KT 32
#define TCA8_THREADS 256

static inline size_t tca8_shared_bytes(int d) { return (size_t)(TCA_ROWS + TCA8_KT) * (d + 4) * sizeof(float); }

template <int D>
__global__ void __launch_bounds__(TCA8_THREADS, 2) k_attention_tc8(attn_args a) {
    pdl_begin();
    constexpr int LD = D + 4, NTW = D / 64 /* n8 tiles a warp in the sum */, KH = D / 2;
    extern __shared__ __align__(16) float sh8[];
    float *qf = sh8, *kt = sh8 + TCA_ROWS * LD;   /* [16][LD], [32][LD] */
    __shared__ float s_part[2][TCA_ROWS][TCA8_KT + 1];   /* scores of each d half */
    __shared__ tca_weights p_sh[2];                      /* each 16-key step's weights */
    __shared__ float m_row[TCA_ROWS], den_row[TCA_ROWS], alpha_row[2][TCA_ROWS], psum_row[TCA_ROWS];
    __shared__ const float *kp[TCA8_KT];
    __shared__ bool kc[TCA8_KT];   /* compact rows (a decode token's) */

    int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP, g = lane / 4, tg = lane % 4;
    int t = blockIdx.y, h0 = blockIdx.x * TCA_ROWS;
    int64_t pos = *a.pos0 + t;
    const attn_keys keys = attn_keys_of(a, t, pos);
    /* this block's keys: all of them (a chunk), or split sp of S (a decode token) */
    const int S = gridDim.z, split = blockIdx.z;
    const int64_t per = (keys.n_keys + S - 1) / S, k_begin = split * per;
    const int64_t n_keys = k_begin + per < keys.n_keys ? k_begin + per : keys.n_keys;

    /* Q, 16 bytes a load (a decode split's one key tile waits on these) */
    for (int i = threadIdx.x; i < TCA_ROWS * D / 4; i += TCA8_THREADS) {
        int r = i / (D / 4), c = 4 * (i % (D / 4));
        *(float4 *)(qf + r * LD + c) = h0 + r < a.H ? *(const float4 *)(a.q + ((int64_t)t * a.H + h0 + r) * D + c)
                                                    : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
    if (threadIdx.x < TCA_ROWS) m_row[threadIdx.x] = -INFINITY, den_row[threadIdx.x] = 0.0f;
    const float scale = 1.0f / sqrtf((float)D);

    /* the sum: warp w has the n8 tiles at columns 8 w + 64 j (j < NTW), so
     * each warp has one of the last 64 columns' (the qat modes' RoPE
     * columns, three products) and the warps' work is even; rows g, g + 8 */
    float acc[NTW][4];
#pragma unroll
    for (int j = 0; j < NTW; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;

    key_ref key_row = tca_key_of<D, TCA8_KT>(a, keys, k_begin, n_keys);
    for (int64_t k0 = k_begin; k0 < n_keys; k0 += TCA8_KT) {
        int nt = n_keys - k0 < TCA8_KT ? (int)(n_keys - k0) : TCA8_KT;
        int steps = nt > TCA_KT ? 2 : 1;   /* 16-key softmax steps (k_attention_tc's tiles) */
        if (a.rows8)
            tca_load_keys_compact<D, TCA8_KT, TCA8_THREADS, LD>(key_row, kp, kc, kt, a.kv);
        else
            tca_load_keys<D, TCA8_KT, TCA8_THREADS, LD>((const float *)key_row.p, kp, kt);
        key_row = tca_key_of<D, TCA8_KT>(a, keys, k0 + TCA8_KT, n_keys);   /* the next tile's, read while this one runs */

        /* scores. Head sizes >= 256: warp w takes the 32 keys over d eighth
         * w (CH chains of 32); a d half's chains are added in order, as
         * k_attention_tc's one warp adds them (s = 0, then each chain), by
         * its four warps in turn: each adds its chains to the running sums
         * the one before left in s_part and hands them on (named barrier
         * 1 + 3 half + step). Q is split once for the four key tiles.
         * Head size 128: warp w takes keys 8 (w % 4).. over d half w / 4. */
        if constexpr (D >= 256) {
            constexpr int CH = D / 256;
            const int half = warp / 4, q4 = warp % 4, col = (D / 8) * warp;
            const float *qa = qf + ((lane / 8) % 2 * 8 + lane % 8) * LD + 4 * (lane / 16);
            const float *kb = kt + (lane % 8) * LD + 4 * (lane / 8);
            float c[CH][4][4];
#pragma unroll
            for (int ch = 0; ch < CH; ch++) {
                if (tca_chain_exact(col + 32 * ch, a.key_tf32))
                    tca_score_chain32<true, LD>(c[ch], qa, kb, col + 32 * ch);
                else
                    tca_score_chain32<false, LD>(c[ch], qa, kb, col + 32 * ch);
            }
            float(*sp)[TCA8_KT + 1] = s_part[half];
            float s[4][4];
#pragma unroll
            for (int nt = 0; nt < 4; nt++)
#pragma unroll
                for (int i = 0; i < 4; i++) s[nt][i] = 0.0f;
            /* this warp's turn: the running sums the warp before left, plus its chains */
            auto add_chains = [&]() {
                if (q4 > 0) {
#pragma unroll
                    for (int nt = 0; nt < 4; nt++) {
                        int k = 8 * nt + 2 * tg;
                        s[nt][0] = sp[g][k], s[nt][1] = sp[g][k + 1], s[nt][2] = sp[g + 8][k], s[nt][3] = sp[g + 8][k + 1];
                    }
                }
#pragma unroll
                for (int nt = 0; nt < 4; nt++) {
                    int k = 8 * nt + 2 * tg;
#pragma unroll
                    for (int ch = 0; ch < CH; ch++)
#pragma unroll
                        for (int i = 0; i < 4; i++) s[nt][i] += c[ch][nt][i];
                    sp[g][k] = s[nt][0], sp[g][k + 1] = s[nt][1], sp[g + 8][k] = s[nt][2], sp[g + 8][k + 1] = s[nt][3];
                }
            };
#if DS4_CUDA_HANDON_BLOCK_BARRIERS
            for (int turn = 0; turn < 4; turn++) {
                if (turn == q4) add_chains();
                if (turn < 3) __syncthreads();
            }
#else
            if (q4 > 0) named_bar_sync(1 + 3 * half + q4 - 1, 2 * WARP);
            add_chains();
            if (q4 < 3) named_bar_sync(1 + 3 * half + q4, 2 * WARP);
#endif
        } else {
            int kn = 8 * (warp % 4), dk = KH * (warp / 4);
            float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            const float *qa = qf + ((lane / 8) % 2 * 8 + lane % 8) * LD + 4 * (lane / 16);
            const float *kb = kt + (kn + lane % 8) * LD + 4 * (lane / 8);
            tca_scores<KH, true>(s, qa, nullptr, kb, dk, a.key_tf32);
            s_part[warp / 4][g][kn + 2 * tg] = s[0];
            s_part[warp / 4][g][kn + 2 * tg + 1] = s[1];
            s_part[warp / 4][g + 8][kn + 2 * tg] = s[2];
            s_part[warp / 4][g + 8][kn + 2 * tg + 1] = s[3];
        }
        __syncthreads();

        /* online softmax, k_attention_tc's steps of 16 keys (heads 4 (w % 4)..,
         * 8 lanes a head, 2 keys a lane): step 0 on warps 0-3, step 1 on
         * warps 4-7 at the same time. Step 1 needs step 0's new maximum,
         * which its warp finds itself from step 0's scores; step 0's warp
         * hands it its alpha and weight sum (named barrier 7 + w % 4), and
         * the step-1 warp updates the row's denominator and maximum, step 0
         * then step 1, as one warp did them in turn. */
        {
            const int st = warp / 4, r = 4 * (warp % 4) + lane / 8, j = 2 * (lane % 8);
            auto score = [&](int step, int k) {
                return k < nt - TCA_KT * step
                           ? (s_part[0][r][TCA_KT * step + k] + s_part[1][r][TCA_KT * step + k]) * scale
                           : -INFINITY;
            };
            const float M = m_row[r];
            const float s0 = score(0, j), s1 = score(0, j + 1);
            const float M0 = fmaxf(M, tca_row_max(fmaxf(s0, s1)));
            float M1 = M0, psum1 = 0.0f;
            if (st == 0) {
                float p0 = j < nt ? expf(s0 - M0) : 0.0f, p1 = j + 1 < nt ? expf(s1 - M0) : 0.0f;
                float psum = tca_row_sum(p0 + p1);
                tca_put_weight(p_sh[0], r, j, p0);
                tca_put_weight(p_sh[0], r, j + 1, p1);
                if (lane % 8 == 0) alpha_row[0][r] = expf(M - M0), psum_row[r] = psum;
            } else if (steps == 2) {
                const int n16 = nt - TCA_KT;
                const float t0 = score(1, j), t1 = score(1, j + 1);
                M1 = fmaxf(M0, tca_row_max(fmaxf(t0, t1)));
                float p0 = j < n16 ? expf(t0 - M1) : 0.0f, p1 = j + 1 < n16 ? expf(t1 - M1) : 0.0f;
                psum1 = tca_row_sum(p0 + p1);
                tca_put_weight(p_sh[1], r, j, p0);
                tca_put_weight(p_sh[1], r, j + 1, p1);
            }
#if DS4_CUDA_HANDON_BLOCK_BARRIERS
            __syncthreads();
#else
            named_bar_sync(7 + warp % 4, 2 * WARP);
#endif
            if (st == 1 && lane % 8 == 0) {
                float den = fmaf(den_row[r], alpha_row[0][r], psum_row[r]);
                if (steps == 2) {
                    float alpha1 = expf(M0 - M1);
                    alpha_row[1][r] = alpha1;
                    den = fmaf(den, alpha1, psum1);
                }
                den_row[r] = den;
                m_row[r] = M1;
            }
        }
        __syncthreads();

        /* O = O alpha + P V, a 16-key step at a time */
        for (int st = 0; st < steps; st++)
            tca_pv_step<NTW, 64, LD>(acc, p_sh[st], alpha_row[st], kt + TCA_KT * st * LD, 8 * warp, a.key_tf32,
                                 g, tg);
    }
    __syncthreads();
    if (S == 1)
        tca_store<D, NTW, 64>(a, acc, m_row, den_row, t, h0, pos, 8 * warp, g, tg);
    else
        tca_store_part<D, NTW, 64>(a, acc, m_row, den_row, t, h0, split, 8 * warp, g, tg);
}

/* Head sizes (their bits: each a power of two) whose k_attention_tc /
 * k_attention_tc8 got their shared memory: the others keep k_attention. */
static int g_tca_sizes = 0, g_tca8_sizes = 0;

/* The shared-memory opt-in above 48 KB, once per head size. */
static void attention_tc_init(void) {
    g_tca_sizes = (allow_shared(k_attention_tc<64>, tca_shared_bytes(64)) ? 64 : 0) |
                  (allow_shared(k_attention_tc<128>, tca_shared_bytes(128)) ? 128 : 0) |
                  (allow_shared(k_attention_tc<256>, tca_shared_bytes(256)) ? 256 : 0) |
                  (allow_shared(k_attention_tc<512>, tca_shared_bytes(512)) ? 512 : 0);
    g_tca8_sizes = (allow_shared(k_attention_tc8<128>, tca8_shared_bytes(128)) ? 128 : 0) |
                   (allow_shared(k_attention_tc8<256>, tca8_shared_bytes(256)) ? 256 : 0) |
                   (allow_shared(k_attention_tc8<512>, tca8_shared_bytes(512)) ? 512 : 0);
}

/* A chunk's attention on the tensor cores: k_attention_tc8 where it runs
 * (DS4_CUDA_NO_ATTN8=1 keeps k_attention_tc, for A/B), else k_attention_tc;
 * false where neither has its shared memory for a.d. */
static bool launch_attention_tc(cudaStream_t st, const attn_args &a, int n) {
    dim3 grid((unsigned)((a.H + TCA_ROWS - 1) / TCA_ROWS), (unsigned)n);
    /* the masks hold power-of-two sizes only: tca_fits first, so 192 is not 128 | 64 */
    const bool tc = tca_fits(a.d) && (g_tca_sizes & a.d), tc8 = tca_fits(a.d) && (g_tca8_sizes & a.d);
    if (!tc && !tc8) return false;
    if (tc8 && !(tc && getenv("DS4_CUDA_NO_ATTN8"))) {
        size_t shm8 = tca8_shared_bytes(a.d);
        switch (a.d) {
        case 128: launch_k(k_attention_tc8<128>, grid, TCA8_THREADS, shm8, st, a); return true;
        case 256: launch_k(k_attention_tc8<256>, grid, TCA8_THREADS, shm8, st, a); return true;
        case 512: launch_k(k_attention_tc8<512>, grid, TCA8_THREADS, shm8, st, a); return true;
        }
    }
    size_t shm = tca_shared_bytes(a.d);
    switch (a.d) {
    case 64: launch_k(k_attention_tc<64>, grid, TCA_THREADS, shm, st, a); break;
    case 128: launch_k(k_attention_tc<128>, grid, TCA_THREADS, shm, st, a); break;
    case 256: launch_k(k_attention_tc<256>, grid, TCA_THREADS, shm, st, a); break;
    case 512: launch_k(k_attention_tc<512>, grid, TCA_THREADS, shm, st, a); break;
    }
    return true;
}

/* A decode token of a layer whose compressed rows the indexer chose (ratio
 * 4: up to window + top_k keys, 640) on k_attention_tc8: its keys in
 * TCA8_DECODE_SPLITS blocks a group of 16 heads, their partials then
 * combined as k_attention's. There k_attention gave each of 64 heads a warp
 * and 40 keys: 24.7 us at 0.23 instructions issued a scheduler, its products
 * one lane's FFMA chains and 5-shuffle sums a key. The other layers (window
 * and every ratio-128 row: 144 keys at 2K) stay on k_attention: there the
 * tiles were mostly empty and their half-layers took 88.6 us against 78.0
 * (the decode chain's trace, H200). 32 splits: 16 (two tiles a block, half
 * the blocks) decoded 1-2% slower. DS4_CUDA_NO_TCDECODE=1 keeps k_attention
 * everywhere (for A/B). */
#define TCA8_DECODE_SPLITS 32
static_assert(TCA8_DECODE_SPLITS <= ATTN_MAX_SPLIT, "k_attn_combine's splits");

static bool launch_attention_tc_decode(cudaStream_t st, attn_args a) {
    if (!a.sel || a.d < 128 || !tca_fits(a.d) || !(g_tca8_sizes & a.d) || getenv("DS4_CUDA_NO_TCDECODE"))
        return false;
    a.splits = TCA8_DECODE_SPLITS;
    dim3 grid((unsigned)((a.H + TCA_ROWS - 1) / TCA_ROWS), 1, (unsigned)a.splits);
    size_t shm8 = tca8_shared_bytes(a.d);
    switch (a.d) {
    case 128: launch_k(k_attention_tc8<128>, grid, TCA8_THREADS, shm8, st, a); break;
    case 256: launch_k(k_attention_tc8<256>, grid, TCA8_THREADS, shm8, st, a); break;
    case 512: launch_k(k_attention_tc8<512>, grid, TCA8_THREADS, shm8, st, a); break;
    default: return false;
    }
    launch_attn_combine(st, a, 1);
    return true;
}

/* Attention for n tokens: a chunk on the tensor cores where the head size
 * allows and the rows are float (DS4_CUDA_NO_TCATTN=1 keeps k_attention, for
 * A/B), a decode token there too (above); otherwise the partials of
 * k_attention, then their combination with the sink. */
static void launch_attention(cudaStream_t st, attn_args a, int n) {
    a.splits = attn_splits(n);
    if (n > 1 && !a.rows8 && !getenv("DS4_CUDA_NO_TCATTN") && launch_attention_tc(st, a, n)) return;
    if (n == 1 && launch_attention_tc_decode(st, a)) return;
    launch_attention_simt(st, a, n);
    launch_attn_combine(st, a, n);
}
