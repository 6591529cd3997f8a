/* Attention with sinks (§3.9) over the window rows, then the compressed rows
 * (all, or the indexer's choice), and the inverse RoPE of the output (§3.10).
 *
 * V4 has one KV head shared by every query head, and the key row is also the
 * value row. So a block takes a group of heads (a warp each) of one token and
 * brings each tile of key rows into shared memory once for all of them; the
 * keys may also be split over several blocks (decode: one token must fill the
 * GPU). Each block runs an online softmax over its keys into a partial (max,
 * denominator, weighted sum); k_attn_combine merges a token's splits with the
 * sink. */
#pragma once

#include "kernels.cuh"

struct attn_args {
    const float *q;      /* [n][H][d] */
    float *o;
    float *part;         /* [n][H][splits][ATTN_PART_HEAD + d]: max, denominator, 2 unused, values */
    const float *raw, *rows, *sinks;
    const uint8_t *rows8;   /* compact compressed rows (kv_compact.cuh) instead of rows; NULL: float */
    kv_compact kv;
    const int *sel, *n_sel;   /* NULL: every compressed row */
    int top_k;
    const int64_t *pos0;
    int64_t cap_raw;
    int H, d, window, m, rope_dim, splits;
    const float *freqs;
    /* key dims [0, key_tf32) hold values exact in tf32 (the qat modes'
     * FP8 round trip: 4 significant bits), so k_attention_tc needs no low
     * part of them; 0 in exact mode */
    int key_tf32;
    /* a qat chunk's bf16 key views (attention_bf16.cuh: the raw ring's
     * slots, the compressed rows); NULL where the chunk reads the rows */
    const uint16_t *view_raw, *view_rows;
};

/* The keys of token t at position pos (§3.9): its window's raw rows, then
 * the compressed rows (all, or the indexer's choice), n_keys in all. */
struct attn_keys {
    int64_t raw_first, n_raw, n_keys;
    const int *sel;   /* NULL: every compressed row */
};

__device__ __forceinline__ attn_keys attn_keys_of(const attn_args &a, int t, int64_t pos) {
    attn_keys k;
    k.raw_first = pos - a.window + 1 > 0 ? pos - a.window + 1 : 0;
    k.n_raw = pos - k.raw_first + 1;
    int64_t n_rows = a.m ? (pos + 1) / a.m : 0;
    k.sel = NULL;
    if (a.sel && a.n_sel[t] >= 0) {
        k.sel = a.sel + (int64_t)t * a.top_k;
        n_rows = a.n_sel[t];
    }
    k.n_keys = k.n_raw + n_rows;
    return k;
}

/* A key row: float (the raw ring; compressed rows in exact mode) or compact. */
struct key_ref {
    const void *p;
    bool compact;
};

/* Key r (< n_keys) of those: a raw ring row or a compressed row (d = a.d,
 * the kernel's compile-time head size). */
__device__ __forceinline__ key_ref attn_key_row(const attn_args &a, const attn_keys &k, int64_t r, int d) {
    if (r < k.n_raw) return key_ref{a.raw + ((k.raw_first + r) % a.cap_raw) * d, false};
    int64_t row = k.sel ? k.sel[r - k.n_raw] : r - k.n_raw;
    return a.rows8 ? key_ref{a.rows8 + row * a.kv.bytes, true} : key_ref{a.rows + row * d, false};
}

/* Dims 4c .. 4c + 3 of a key row. */
__device__ __forceinline__ float4 key_load4(const key_ref &k, int c, const kv_compact &L) {
    return k.compact ? kv8_load4((const uint8_t *)k.p, c, L) : ((const float4 *)k.p)[c];
}

#define ATTN_KT 16          /* key rows per shared tile */
#define ATTN_PART_HEAD 4    /* a partial's max and denominator, padded so its values are 16-byte aligned */
#define ATTN_MAX_SPLIT 32      /* splits of a decode token's keys, at most (attention_tc.cuh's) */
#define ATTN_DECODE_SPLITS 16  /* k_attention's */

/* Decode splits its token's keys so that it fills the GPU; a chunk of any
 * other length takes one split a token, so that a token's output does not
 * depend on the chunk it came in (a rewind re-evaluates in shorter chunks). */
static inline int attn_splits(int n) { return n == 1 ? ATTN_DECODE_SPLITS : 1; }

/* The heads a block takes: 8 where the head count allows. */
static inline int attn_heads_per_block(int H) {
    int hg = 8;
    while (H % hg) hg /= 2;
    return hg;
}

/* DPL = d / 32: the elements of the query and output a lane holds, VW at a
 * time (one shared-memory load brings VW floats of a key row): element
 * 32 * VW * c + VW * lane + v for c < DPL / VW, v < VW. */
template <int VW>
struct vecf;
template <>
struct vecf<1> {
    typedef float T;
    static __device__ __forceinline__ float at(const float &x, int) { return x; }
    static __device__ __forceinline__ float of(const float *x) { return x[0]; }
};
template <>
struct vecf<2> {
    typedef float2 T;
    static __device__ __forceinline__ float at(const float2 &x, int v) { return v ? x.y : x.x; }
    static __device__ __forceinline__ float2 of(const float *x) { return make_float2(x[0], x[1]); }
};
template <>
struct vecf<4> {
    typedef float4 T;
    static __device__ __forceinline__ float at(const float4 &x, int v) {
        return v == 0 ? x.x : v == 1 ? x.y : v == 2 ? x.z : x.w;
    }
    static __device__ __forceinline__ float4 of(const float *x) { return make_float4(x[0], x[1], x[2], x[3]); }
};

template <int DPL>
__global__ void k_attention(attn_args a) {
    pdl_begin();
    constexpr int d = DPL * WARP, VW = DPL < 4 ? DPL : 4, NC = DPL / VW;
    constexpr int NV4 = (d / 4 + WARP - 1) / WARP;   /* a row's float4 loads a lane makes */
    typedef vecf<VW> V;
    int hg = blockDim.x / WARP, warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    int t = blockIdx.y, sp = blockIdx.z, h = blockIdx.x * hg + warp;
    int64_t pos = *a.pos0 + t;
    const attn_keys keys = attn_keys_of(a, t, pos);
    int64_t n_keys = keys.n_keys, per = (n_keys + a.splits - 1) / a.splits;
    int64_t k_begin = sp * per, k_end = k_begin + per < n_keys ? k_begin + per : n_keys;
    extern __shared__ __align__(16) float ks[];   /* [ATTN_KT][d] */
    __shared__ key_ref kp[ATTN_KT];

    /* q and the partial a vector of VW at a time (a lane's scalar loads and
     * stores filled the LSU queue: most of a launch's fixed cost) */
    float q[DPL], acc[DPL];
    const typename V::T *qg = (const typename V::T *)(a.q + ((int64_t)t * a.H + h) * d);
#pragma unroll
    for (int c = 0; c < NC; c++) {
        typename V::T qv = qg[WARP * c + lane];
#pragma unroll
        for (int v = 0; v < VW; v++) {
            q[c * VW + v] = V::at(qv, v);
            acc[c * VW + v] = 0.0f;
        }
    }
    float scale = 1.0f / sqrtf((float)d);
    float M = -INFINITY, den = 0.0f;
    /* the lane's c-th vector of key row j in the tile (key and value alike) */
    auto key_vec = [&](int j, int c) { return ((const typename V::T *)(ks + j * d))[lane + WARP * c]; };
    for (int64_t k0 = k_begin; k0 < k_end; k0 += ATTN_KT) {
        int nt = k_end - k0 < ATTN_KT ? (int)(k_end - k0) : ATTN_KT;
        if (threadIdx.x < nt) {
            int64_t r = k0 + threadIdx.x;
            kp[threadIdx.x] = attn_key_row(a, keys, r, d);
        }
        __syncthreads();
        /* a warp a row, its lanes' 16-byte loads all issued before the first
         * store (a strided loop would wait out one load latency per pass) */
#pragma unroll 4
        for (int j = warp; j < nt; j += hg) {
            const key_ref src = kp[j];
            float4 *dst = (float4 *)(ks + j * d);
            float4 v[NV4];
#pragma unroll
            for (int c = 0; c < NV4; c++)
                if (lane + WARP * c < d / 4) v[c] = key_load4(src, lane + WARP * c, a.kv);
#pragma unroll
            for (int c = 0; c < NV4; c++)
                if (lane + WARP * c < d / 4) dst[lane + WARP * c] = v[c];
        }
        __syncthreads();
        float s[ATTN_KT], tmax = -INFINITY;
#pragma unroll
        for (int j = 0; j < ATTN_KT; j++) {
            float dot = 0.0f;
            if (j < nt) {
#pragma unroll
                for (int c = 0; c < NC; c++) {
                    typename V::T kv = key_vec(j, c);
#pragma unroll
                    for (int v = 0; v < VW; v++) dot = fmaf(q[c * VW + v], V::at(kv, v), dot);
                }
            }
            s[j] = warp_sum(dot) * scale;
            if (j < nt) tmax = fmaxf(tmax, s[j]);
        }
        float Mn = fmaxf(M, tmax), alpha = expf(M - Mn), psum = 0.0f;
#pragma unroll
        for (int j = 0; j < ATTN_KT; j++) {
            s[j] = j < nt ? expf(s[j] - Mn) : 0.0f;
            psum += s[j];
        }
        den = den * alpha + psum;
#pragma unroll
        for (int i = 0; i < DPL; i++) acc[i] *= alpha;
#pragma unroll
        for (int j = 0; j < ATTN_KT; j++) {
            if (j < nt) {
#pragma unroll
                for (int c = 0; c < NC; c++) {
                    typename V::T kv = key_vec(j, c);
#pragma unroll
                    for (int v = 0; v < VW; v++)
                        acc[c * VW + v] = fmaf(s[j], V::at(kv, v), acc[c * VW + v]);
                }
            }
        }
        M = Mn;
        __syncthreads();
    }
    float *pp = a.part + (((int64_t)t * a.H + h) * a.splits + sp) * (ATTN_PART_HEAD + d);
#pragma unroll
    for (int c = 0; c < NC; c++) ((typename V::T *)(pp + ATTN_PART_HEAD))[WARP * c + lane] = V::of(acc + c * VW);
    if (lane == 0) {
        pp[0] = M;
        pp[1] = den;
    }
}

/* A token's head (blockIdx.x, token blockIdx.y) from up to SMAX splits:
 * warp 0 turns the splits' maxima and sums into their weights (a lane a
 * split) and the denominator (one lane, in split order), while every thread's
 * values are in flight; then a thread weighs one pair of dims, blockIdx.z a
 * stretch of COMBINE_THREADS pairs. Each thread had computed all the
 * weights itself: at 32 splits 255 registers and 0.95 M warp instructions a
 * decode layer in 64 blocks, 7.8 us (ncu, H200). The same expressions in the
 * same order: the same bits. */
#define COMBINE_THREADS 128
static_assert(ATTN_MAX_SPLIT <= WARP, "a lane a split");

template <int SMAX>
__global__ void __launch_bounds__(COMBINE_THREADS) k_attn_combine(attn_args a) {
    pdl_begin();
    int t = blockIdx.y, h = blockIdx.x, S = a.splits;
    int64_t pos = *a.pos0 + t;
    const int stride = ATTN_PART_HEAD + a.d;
    const float *pp = a.part + ((int64_t)t * a.H + h) * S * stride;
    float *og = a.o + ((int64_t)t * a.H + h) * a.d;
    const int r0 = a.d - a.rope_dim, pairs = a.d / 2;
    const int c = blockIdx.z * COMBINE_THREADS + threadIdx.x;   /* dims 2 c, 2 c + 1 */
    __shared__ float w_sh[SMAX], l_sh[SMAX], den_sh;
    float2 pv[SMAX];
    float fr = c < pairs && 2 * c >= r0 ? a.freqs[(2 * c - r0) / 2] : 0.0f;
#pragma unroll
    for (int sp = 0; sp < SMAX; sp++)
        if (sp < S && c < pairs) pv[sp] = *(const float2 *)(pp + sp * stride + ATTN_PART_HEAD + 2 * c);
    if (threadIdx.x < WARP) {
        int sp = threadIdx.x;
        float mx = sp < S ? pp[sp * stride] : -INFINITY, l = sp < S ? pp[sp * stride + 1] : 0.0f;
        float M = fmaxf(a.sinks[h], warp_max(mx));
        if (sp < SMAX) {
            w_sh[sp] = sp < S && l > 0 ? expf(mx - M) : 0.0f;   /* an empty split has no keys */
            l_sh[sp] = l;
        }
        __syncwarp();
        if (sp == 0) {
            float den = expf(a.sinks[h] - M);
            for (int k = 0; k < S; k++) den += l_sh[k] * w_sh[k];
            den_sh = den;
        }
    }
    __syncthreads();
    if (c >= pairs) return;
    float v0 = 0, v1 = 0;
#pragma unroll
    for (int sp = 0; sp < SMAX; sp++)
        if (sp < S) v0 += pv[sp].x * w_sh[sp], v1 += pv[sp].y * w_sh[sp];
    float x0 = v0 / den_sh, x1 = v1 / den_sh;
    /* the inverse RoPE of the last rope_dim in registers (d_rope's
     * expressions, sign -1) */
    if (2 * c >= r0) {
        float phi = (float)pos * fr;
        float cs = cosf(phi), sn = -1 * sinf(phi);
        float y0 = x0 * cs - x1 * sn, y1 = x0 * sn + x1 * cs;
        x0 = y0, x1 = y1;
    }
    *(float2 *)(og + 2 * c) = make_float2(x0, x1);
}

static void launch_attn_combine(cudaStream_t st, const attn_args &a, int n) {
    dim3 grid((unsigned)a.H, (unsigned)n, (unsigned)((a.d / 2 + COMBINE_THREADS - 1) / COMBINE_THREADS));
    if (a.splits <= 16) launch_k(k_attn_combine<16>, grid, COMBINE_THREADS, 0, st, a);
    else launch_k(k_attn_combine<32>, grid, COMBINE_THREADS, 0, st, a);
}

/* k_attention for n tokens (a.splits set); d / 32 must be 1, 2, 4, 8 or 16
 * (check_shapes). */
static void launch_attention_simt(cudaStream_t st, const attn_args &a, int n) {
    int hg = attn_heads_per_block(a.H);
    dim3 grid((unsigned)(a.H / hg), (unsigned)n, (unsigned)a.splits);
    size_t shm = (size_t)ATTN_KT * a.d * sizeof(float);
    switch (a.d / WARP) {
    case 1: launch_k(k_attention<1>, grid, hg * WARP, shm, st, a); break;
    case 2: launch_k(k_attention<2>, grid, hg * WARP, shm, st, a); break;
    case 4: launch_k(k_attention<4>, grid, hg * WARP, shm, st, a); break;
    case 8: launch_k(k_attention<8>, grid, hg * WARP, shm, st, a); break;
    case 16: launch_k(k_attention<16>, grid, hg * WARP, shm, st, a); break;
    }
}

/* Partial buffer floats for a chunk of up to n tokens. */
static inline int64_t attn_part_floats(int64_t n, int H, int d) {
    return std::max<int64_t>(n, ATTN_MAX_SPLIT) * H * (ATTN_PART_HEAD + d);
}
