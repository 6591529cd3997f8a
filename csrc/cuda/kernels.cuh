/* The forward-pass kernels of the CUDA backend: one kernel per step of
 * forward.c, float32 state and activations, the same evaluation order
 * wherever the order is visible above rounding (norms in double, softmax
 * with the sink, top-k ties to the lower index). */
#pragma once

#include "act8_codes.cuh"
#include "common.cuh"
#include "kv_compact.cuh"
#include "qat_round.h"

/* Sum over the block (blockDim a multiple of 32, at most 1024); every
 * thread gets the total. */
__device__ double block_sum_d(double v) {
    __shared__ double part[32];
    int lane = threadIdx.x % WARP, w = threadIdx.x / WARP, nw = blockDim.x / WARP;
    v = warp_sum_d(v);
    __syncthreads();
    if (lane == 0) part[w] = v;
    __syncthreads();
    double t = 0;
    for (int i = 0; i < nw; i++) t += part[i];
    return t;
}

/* 1 / sqrt(mean(x^2) + eps) from each thread's share ss of the sum of
 * squares of n values: the block's total in double (so its order does not
 * show); every thread gets it. */
__device__ float d_rms_scale_of(double ss, int n, float eps) {
    ss = block_sum_d(ss);
    return (float)(1.0 / sqrt(ss / (double)n + (double)eps));
}

/* d_rms_scale_of x's n values (d_rms's scale). Rows of the HC streams
 * (16K floats) are read 16 bytes a load, 16 loads in flight a thread. */
__device__ float d_rms_scale(const float *x, int n, float eps) {
    double ss = 0;
    if ((uintptr_t)x % 16 == 0 && n % 4 == 0) {
#pragma unroll 16
        for (int i = threadIdx.x; i < n / 4; i += blockDim.x) {
            float4 v = ((const float4 *)x)[i];
            ss += (double)v.x * v.x + (double)v.y * v.y + (double)v.z * v.z + (double)v.w * v.w;
        }
    } else {
#pragma unroll 8
        for (int i = threadIdx.x; i < n; i += blockDim.x) ss += (double)x[i] * x[i];
    }
    return d_rms_scale_of(ss, n, eps);
}

__device__ __forceinline__ float d_sigmoid(float z) { return 1.0f / (1.0f + expf(-z)); }

/* ---- linear: one warp per output row, up to TT tokens per pass ----
 * Plain mode: tokens 0..n_tok-1 (x row t, y row t); the one-token kernels
 * also take a batch of products in one launch, block row b running weights
 * w.data + b * bw bytes on x + b * bx into y + b * by (the output groups; a
 * K split whose partial sums the consumer adds). Expert mode (active !=
 * NULL): block row y picks active[y]; that expert's pairs offs[e]..offs[e+1]
 * are its tokens (x row xrow[p] or p, y row p). */
struct lin_args {
    dmat w;
    int64_t expert_bytes;
    const float *x;
    int64_t xs;
    float *y;
    int64_t ys;
    int n_tok;
    const int *active, *offs, *xrow;
    int64_t bw, bx, by;   /* batch strides of plain mode, one-token kernels */
    int norm_n;           /* k_linear1: x is RMS-normed over its first norm_n (> 0) first */
    float norm_eps;
    const int8_t *q8;     /* qat-q8 int8 kernels: x as k_act8's int8 codes, [row][n_in] */
    const float *q8d, *q8s;   /* their code scales a 32, code sums a 16 */
    int early;            /* one-token plain products: weights loaded (or into L2) before the PDL wait */
};

#define LIN_WARPS 8

/* What one block of a linear kernel runs: its weights, x, y and pairs
 * [p0, p1). Expert mode: expert active[slot] (false where the slot is
 * unused: the whole block returns); plain mode: batch part `slot`. */
struct lin_block {
    const uint8_t *w;
    const float *x;
    float *y;
    int p0, p1;
};

__device__ __forceinline__ bool lin_block_of(const lin_args &a, int slot, lin_block &b) {
    b.w = a.w.data, b.x = a.x, b.y = a.y, b.p0 = 0, b.p1 = a.n_tok;
    if (a.active) {
        int e = a.active[slot];
        if (e < 0) return false;
        b.w += (int64_t)e * a.expert_bytes;
        b.p0 = a.offs[e], b.p1 = a.offs[e + 1];
    } else {
        b.w += slot * a.bw, b.x += slot * a.bx, b.y += slot * a.by;
    }
    return true;
}

/* acc + w . x over 8 elements, the multiply-adds in a fixed order so that
 * both linear kernels below give the same bits for one token. */
__device__ __forceinline__ float dot8(float acc, const float *w, float4 u0, float4 u1) {
    float s = w[0] * u0.x;
    s = fmaf(w[1], u0.y, s);
    s = fmaf(w[2], u0.z, s);
    s = fmaf(w[3], u0.w, s);
    s = fmaf(w[4], u1.x, s);
    s = fmaf(w[5], u1.y, s);
    s = fmaf(w[6], u1.z, s);
    s = fmaf(w[7], u1.w, s);
    return acc + s;
}

/* Warps that share one row (split over its 256-element chunks): enough rows
 * in flight for small matrices, whole warps busy for short rows. A function
 * of n_in alone, so one token and many sum in the same order. */
static inline int lin_split(int n_in) {
    return n_in >= 2048 ? 8 : n_in >= 1024 ? 4 : n_in >= 512 ? 2 : 1;
}

/* kw warps per row, LIN_WARPS / kw rows per block; TT tokens per pass; the
 * weight type a compile-time constant so the dequantizer inlines branch-free. */
template <int TT, int TYPE>
__global__ void __launch_bounds__(LIN_WARPS *WARP) k_linear(lin_args a, int kw) {
    pdl_begin();
    int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    int r = blockIdx.x * (LIN_WARPS / kw) + warp / kw, part = warp % kw;
    bool valid = r < a.w.n_out;
    __shared__ float red[LIN_WARPS][TT];
    lin_block b;
    if (!lin_block_of(a, blockIdx.y, b)) return;
    const int p0 = b.p0, p1 = b.p1;
    const uint8_t *row = b.w + (int64_t)(valid ? r : 0) * a.w.row_bytes;
    for (int t0 = p0; t0 < p1; t0 += TT) {
        float acc[TT];
        const float *xp[TT];
#pragma unroll
        for (int i = 0; i < TT; i++) {
            acc[i] = 0;
            int p = t0 + i < p1 ? t0 + i : p1 - 1;
            xp[i] = b.x + (int64_t)(a.xrow ? a.xrow[p] : p) * a.xs;
        }
        if (valid) {
#pragma unroll 2
            for (int e0 = part * 256 + lane * 8; e0 < a.w.n_in; e0 += 256 * kw) {
                float w[8];
                deq8(TYPE, row, a.w.n_in, e0, w);
#pragma unroll
                for (int i = 0; i < TT; i++) {
                    const float4 *v = (const float4 *)(xp[i] + e0);
                    acc[i] = dot8(acc[i], w, v[0], v[1]);
                }
            }
        }
#pragma unroll
        for (int i = 0; i < TT; i++) {
            float v = warp_sum(acc[i]);
            if (lane == 0) red[warp][i] = v;
        }
        __syncthreads();
        if (valid && part == 0 && lane < TT && t0 + lane < p1) {
            float v = 0;
            for (int j = 0; j < kw; j++) v += red[warp + j][lane];
            b.y[(int64_t)(t0 + lane) * a.ys + r] = v;
        }
        __syncthreads();
    }
}

/* One token (decode): each warp keeps its slice of x in registers and runs
 * it against LIN_R rows, so x is read once per LIN_R rows instead of once
 * per row (for 2-bit weights x is 16 times the bytes of a row). Same sums as
 * k_linear: chunk part + 256*kw*c of lane, c ascending. n_in <= MAXC*256*kw
 * (MAXC, the chunks a lane holds, sized per matrix to spare registers). */
#define LIN_R 4

/* A lane's chunks of x for the one-token kernels: chunk c holds elements
 * part * 256 + lane * 8 + c * 256 * kw .. +8 (those below n_in). */
template <int MAXC>
__device__ __forceinline__ void load_x_chunks(const float *x, int n_in, int part, int lane, int kw,
                                              float4 xr[MAXC][2]) {
#pragma unroll
    for (int c = 0; c < MAXC; c++) {
        int e0 = part * 256 + lane * 8 + c * 256 * kw;
        if (e0 < n_in) {
            xr[c][0] = *(const float4 *)(x + e0);
            xr[c][1] = *(const float4 *)(x + e0 + 4);
        }
    }
}

/* x * scale, as d_rms writes a norm without weights. */
__device__ __forceinline__ float4 scale4(float4 v, float s) {
    return make_float4(v.x * s, v.y * s, v.z * s, v.w * s);
}

template <int TYPE, int LIN_MAXC>
__global__ void __launch_bounds__(LIN_WARPS *WARP) k_linear1(lin_args a, int kw) {
    int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP, part = warp % kw;
    int r0 = (blockIdx.x * (LIN_WARPS / kw) + warp / kw) * LIN_R;
    __shared__ float red[LIN_WARPS][LIN_R];
    lin_block b;
    if (a.early) {   /* plain mode: the block's rows are known before the wait */
        lin_block_of(a, blockIdx.y, b);
#pragma unroll
        for (int i = 0; i < LIN_R; i++) {
            const uint8_t *row = b.w + (int64_t)min(r0 + i, a.w.n_out - 1) * a.w.row_bytes;
            /* the lane's bytes of each chunk (at the chunk's share of the row) */
            for (int e0 = part * 256 + lane * 8; e0 < a.w.n_in; e0 += 256 * kw)
                prefetch_l2(row + (int64_t)e0 * a.w.row_bytes / a.w.n_in);
        }
    }
    pdl_begin();
    if (!lin_block_of(a, blockIdx.y, b)) return;
    for (int p = b.p0; p < b.p1; p++) {
        const float *x = b.x + (int64_t)(a.xrow ? a.xrow[p] : p) * a.xs;
        float4 xr[LIN_MAXC][2];
        load_x_chunks<LIN_MAXC>(x, a.w.n_in, part, lane, kw, xr);
        if (a.norm_n) {   /* the whole row's norm (a batch part sees a slice of it) */
            float s = d_rms_scale(a.x + (int64_t)(a.xrow ? a.xrow[p] : p) * a.xs, a.norm_n, a.norm_eps);
#pragma unroll
            for (int c = 0; c < LIN_MAXC; c++) xr[c][0] = scale4(xr[c][0], s), xr[c][1] = scale4(xr[c][1], s);
        }
        /* chunk by chunk over the LIN_R rows: their loads are independent, so
         * all are in flight together (rows past the end read the last row) */
        const uint8_t *rows[LIN_R];
        float acc[LIN_R];
#pragma unroll
        for (int i = 0; i < LIN_R; i++) {
            acc[i] = 0;
            int r = r0 + i < a.w.n_out ? r0 + i : a.w.n_out - 1;
            rows[i] = b.w + (int64_t)r * a.w.row_bytes;
        }
#pragma unroll
        for (int c = 0; c < LIN_MAXC; c++) {
            int e0 = part * 256 + lane * 8 + c * 256 * kw;
            if (e0 < a.w.n_in) {
                float w[LIN_R][8];
#pragma unroll
                for (int i = 0; i < LIN_R; i++) deq8(TYPE, rows[i], a.w.n_in, e0, w[i]);
#pragma unroll
                for (int i = 0; i < LIN_R; i++) acc[i] = dot8(acc[i], w[i], xr[c][0], xr[c][1]);
            }
        }
#pragma unroll
        for (int i = 0; i < LIN_R; i++) {
            float v = warp_sum(acc[i]);
            if (lane == 0) red[warp][i] = v;
        }
        __syncthreads();
        if (part == 0 && lane < LIN_R && r0 + lane < a.w.n_out) {
            float v = 0;
            for (int j = 0; j < kw; j++) v += red[warp + j][lane];
            b.y[(int64_t)p * a.ys + r0 + lane] = v;
        }
        __syncthreads();
    }
}

/* Decode rows of the routed experts (1 KB IQ2_XXS / Q2_K rows at 2-byte
 * aligned 66 / 84-byte blocks): the block's LIN_RS rows per warp group are
 * contiguous, so the block first copies them to shared memory with 16-byte
 * loads, all in flight at once, then runs k_linear1's sums on the copy (the
 * same bits). */
#define LIN_RS 16

/* Bytes [lo, hi) (both even) to sh, keeping lo's place within 16 bytes;
 * returns where lo landed. Partial 16-byte chunks at the ends are read in
 * 2-byte pieces, so nothing outside [lo, hi) is touched. */
__device__ const uint8_t *d_stage(uint8_t *sh, const uint8_t *lo, const uint8_t *hi) {
    uintptr_t l = (uintptr_t)lo, h = (uintptr_t)hi, a = l & ~(uintptr_t)15;
    int n16 = (int)((h - a + 15) / 16);
    for (int i = threadIdx.x; i < n16; i += blockDim.x) {
        uintptr_t c = a + 16 * (uintptr_t)i;
        if (c >= l && c + 16 <= h) {
            ((uint4 *)sh)[i] = __ldg((const uint4 *)c);
        } else {
            for (int j = 0; j < 16; j += 2)
                if (c + j >= l && c + j < h) *(uint16_t *)(sh + 16 * i + j) = *(const uint16_t *)(c + j);
        }
    }
    __syncthreads();
    return sh + (l - a);
}

/* Shared bytes of k_linear1s for one matrix (the alignment slack included). */
static inline int64_t lin_staged_bytes(const dmat &w, int kw) {
    return (int64_t)(LIN_WARPS / kw) * LIN_RS * w.row_bytes + 32;
}

template <int TYPE, int LIN_MAXC>
__global__ void __launch_bounds__(LIN_WARPS *WARP) k_linear1s(lin_args a, int kw) {
    pdl_begin();
    extern __shared__ __align__(16) uint8_t wsh[];
    __shared__ float red[LIN_WARPS][LIN_RS];
    int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP, part = warp % kw;
    int rb = LIN_WARPS / kw * LIN_RS, rbeg = blockIdx.x * rb;
    int rend = rbeg + rb < a.w.n_out ? rbeg + rb : a.w.n_out;
    int g0 = rbeg + warp / kw * LIN_RS;   /* the warp group's first row */
    lin_block b;
    if (!lin_block_of(a, blockIdx.y, b)) return;
    const uint8_t *srows = NULL;
    for (int p = b.p0; p < b.p1; p++) {
        const float *x = b.x + (int64_t)(a.xrow ? a.xrow[p] : p) * a.xs;
        float4 xr[LIN_MAXC][2];
        load_x_chunks<LIN_MAXC>(x, a.w.n_in, part, lane, kw, xr);
        /* the rows after the first x loads are issued, so both are in flight */
        if (p == b.p0)
            srows = d_stage(wsh, b.w + (int64_t)rbeg * a.w.row_bytes, b.w + (int64_t)rend * a.w.row_bytes);
        /* row by row from shared memory (short latency): registers stay low */
#pragma unroll 4
        for (int i = 0; i < LIN_RS; i++) {
            /* rows past the end compute on the last row, unused */
            int r = g0 + i < rend ? g0 + i : rend - 1;
            const uint8_t *row = srows + (int64_t)(r - rbeg) * a.w.row_bytes;
            float acc = 0;
#pragma unroll
            for (int c = 0; c < LIN_MAXC; c++) {
                int e0 = part * 256 + lane * 8 + c * 256 * kw;
                if (e0 < a.w.n_in) {
                    float w[8];
                    deq8(TYPE, row, a.w.n_in, e0, w);
                    acc = dot8(acc, w, xr[c][0], xr[c][1]);
                }
            }
            float v = warp_sum(acc);
            if (lane == 0) red[warp][i] = v;
        }
        __syncthreads();
        if (part == 0 && lane < LIN_RS && g0 + lane < rend) {
            float v = 0;
            for (int j = 0; j < kw; j++) v += red[warp + j][lane];
            b.y[(int64_t)p * a.ys + g0 + lane] = v;
        }
        __syncthreads();
    }
}

/* ---- row steps on global memory, one block per row ---- */

/* y = x / sqrt(mean(x^2) + eps) [* w]; y may be x. The loops unrolled so
 * that a thread's loads are in flight together (a one-block norm of a
 * decode step is otherwise a chain of memory latencies). */
__device__ void d_rms(float *y, const float *x, const float *w, int n, float eps) {
    /* d_rms_scale's last barrier follows every read of x, so y may be x */
    float scale = d_rms_scale(x, n, eps);
#pragma unroll 8
    for (int i = threadIdx.x; i < n; i += blockDim.x) y[i] = w ? x[i] * scale * w[i] : x[i] * scale;
    __syncthreads();
}

__device__ void d_rope(float *x, int dim, int rope_dim, const float *freqs, int64_t pos, int sign) {
    float *r = x + dim - rope_dim;
    for (int k = threadIdx.x; k < rope_dim / 2; k += blockDim.x) {
        float phi = (float)pos * freqs[k];
        float c = cosf(phi), s = sign * sinf(phi);
        float x0 = r[2 * k], x1 = r[2 * k + 1];
        r[2 * k] = x0 * c - x1 * s;
        r[2 * k + 1] = x0 * s + x1 * c;
    }
    __syncthreads();
}

/* qat: FP8 blocks of 64 over the first n values, a warp per block. */
__device__ void d_qat_fp8(float *v, int n) {
    int lane = threadIdx.x % WARP, nw = blockDim.x / WARP;
    for (int b = threadIdx.x / WARP * 64; b < n; b += nw * 64) {
        int len = n - b < 64 ? n - b : 64;
        float x0 = lane < len ? v[b + lane] : 0, x1 = lane + 32 < len ? v[b + lane + 32] : 0;
        float s = qat_fp8_scale(warp_max(fmaxf(fabsf(x0), fabsf(x1))));
        if (lane < len) v[b + lane] = qat_round_fp8(x0 / s) * s;
        if (lane + 32 < len) v[b + lane + 32] = qat_round_fp8(x1 / s) * s;
    }
    __syncthreads();
}

/* qat: Hadamard rotation (the butterflies of qat.c, a stage at a time), then
 * FP4 blocks of 32, a warp per block. */
__device__ void d_qat_fp4(float *v, int n) {
    for (int h = 1; h < n; h *= 2) {
        for (int i = threadIdx.x; i < n / 2; i += blockDim.x) {
            int j = (i / h) * 2 * h + i % h;
            float a = v[j], b = v[j + h];
            v[j] = a + b;
            v[j + h] = a - b;
        }
        __syncthreads();
    }
    float scale = 1.0f / sqrtf((float)n);
    for (int i = threadIdx.x; i < n; i += blockDim.x) v[i] *= scale;
    __syncthreads();
    int lane = threadIdx.x % WARP, nw = blockDim.x / WARP;
    for (int b = threadIdx.x / WARP * 32; b < n; b += nw * 32) {
        int len = n - b < 32 ? n - b : 32;
        float x = lane < len ? v[b + lane] : 0;
        float s = qat_fp4_scale(warp_max(fabsf(x)));
        if (lane < len) v[b + lane] = qat_round_fp4(x / s) * s;
    }
    __syncthreads();
}

enum { QAT_NONE = 0, QAT_FP8 = 1, QAT_FP4 = 2 };

/* Row r (token r / per_tok): optional norm, RoPE at pos0 + token, qat,
 * then a final scale. */
struct row_args {
    const float *x;
    float *y;
    int64_t xs, ys;
    int dim, per_tok;
    int norm;
    const float *norm_w;
    float eps;
    const float *freqs;
    int rope_dim;
    const int64_t *pos0;   /* device: the chunk's first position */
    int qat, qat_len;
    float scale;    /* applied to y last when != 1 */
    act8_pre a8;    /* qat-q8: y's codes for the one-token product that reads it (dim % 256 == 0) */
};

/* A normed row's later steps (RoPE, qat, scale, codes) read back what the
 * earlier ones wrote: in shared memory when the row fits there (each was a
 * round trip to L2 on a decode layer's q and kv paths), then copied to y
 * with the last step's own thread mapping. The same steps, the same bits. */
#define ROWS_STAGED_MAX 4096
__host__ __device__ inline bool rows_staged(const row_args &a) { return a.norm && a.dim <= ROWS_STAGED_MAX; }

__global__ void k_rows(row_args a) {
    pdl_begin();
    extern __shared__ __align__(16) float rows_sh[];
    int r = blockIdx.x;
    const float *x = a.x + (int64_t)r * a.xs;
    float *yg = a.y + (int64_t)r * a.ys, *y = rows_staged(a) ? rows_sh : yg;
    if (a.norm) {
        d_rms(y, x, a.norm_w, a.dim, a.eps);
    } else if (x != y) {
        for (int i = threadIdx.x; i < a.dim; i += blockDim.x) y[i] = x[i];
        __syncthreads();
    }
    if (a.freqs) d_rope(y, a.dim, a.rope_dim, a.freqs, *a.pos0 + r / a.per_tok, 1);
    if (a.qat == QAT_FP8) d_qat_fp8(y, a.qat_len);
    if (a.qat == QAT_FP4) d_qat_fp4(y, a.qat_len);
    if (a.scale != 1.0f)
        for (int i = threadIdx.x; i < a.dim; i += blockDim.x) y[i] *= a.scale;
    if (y != yg)   /* each thread its own elements of the step before (or of a barrier's) */
        for (int i = threadIdx.x; i < a.dim; i += blockDim.x) yg[i] = y[i];
    if (a.a8.q0.q || a.a8.qk.q) d_act8_row(y, a.dim, a.a8, (int64_t)r * a.dim);
}

/* d_qat_fp4 of a 128-value row held by a warp, a float4 a lane (values
 * 4 lane ..): the same butterflies (a + b, a - b of the same pairs: h = 1, 2
 * inside the float4, 4 .. 64 between lanes), the same scaling and FP4
 * blocks of 32 (8 lanes; their max is order-free): the same bits. */
__device__ __forceinline__ void d_qat_fp4_row128(float4 &v) {
    int lane = threadIdx.x % WARP;
    float a, b;
    a = v.x, b = v.y, v.x = a + b, v.y = a - b;   /* h = 1 */
    a = v.z, b = v.w, v.z = a + b, v.w = a - b;
    a = v.x, b = v.z, v.x = a + b, v.z = a - b;   /* h = 2 */
    a = v.y, b = v.w, v.y = a + b, v.w = a - b;
#pragma unroll
    for (int l = 1; l < 32; l *= 2) {   /* h = 4 l: the partner lane l away */
        float4 o = make_float4(__shfl_xor_sync(0xffffffffu, v.x, l), __shfl_xor_sync(0xffffffffu, v.y, l),
                               __shfl_xor_sync(0xffffffffu, v.z, l), __shfl_xor_sync(0xffffffffu, v.w, l));
        if (lane & l) v = make_float4(o.x - v.x, o.y - v.y, o.z - v.z, o.w - v.w);
        else v = make_float4(v.x + o.x, v.y + o.y, v.z + o.z, v.w + o.w);
    }
    float scale = 1.0f / sqrtf(128.0f);
    v.x *= scale, v.y *= scale, v.z *= scale, v.w *= scale;
    float m = fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w)));
#pragma unroll
    for (int l = 1; l < 8; l *= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, l));
    float s = qat_fp4_scale(m);
    v.x = qat_round_fp4(v.x / s) * s, v.y = qat_round_fp4(v.y / s) * s;
    v.z = qat_round_fp4(v.z / s) * s, v.w = qat_round_fp4(v.w / s) * s;
}

/* k_rows for many short rows (the q heads: a token's H rows of d, norm and
 * RoPE; the indexer's q heads of 128 with their FP4 rounding): a warp a
 * row, ROWS_WARP_ROWS rows a block, each lane the float4s 4 lane + 128 c
 * of it in registers, so the row is read once and written once with no
 * block barriers (k_rows, a block a row, reads it three times with a
 * barrier between: ~1 TB/s a chunk). The same expressions as d_rms, d_rope
 * and d_qat_fp4; the norm's sum of squares in double in another order
 * (exact products: the float scale comes out the same). rows_warp_fits
 * says which row_args it takes. */
#define ROWS_WARP_ROWS 8
#define ROWS_WARP_MAXC 8   /* float4s a lane: rows of up to 1024 */
__global__ void __launch_bounds__(ROWS_WARP_ROWS *WARP) k_rows_warp(row_args a, int64_t n_rows) {
    pdl_begin();
    int lane = threadIdx.x % WARP;
    int64_t r = (int64_t)blockIdx.x * ROWS_WARP_ROWS + threadIdx.x / WARP;
    if (r >= n_rows) return;
    const float *x = a.x + r * a.xs;
    float *y = a.y + r * a.ys;
    const int nc = a.dim / 128;
    float4 v[ROWS_WARP_MAXC];
    double ss = 0;
#pragma unroll
    for (int c = 0; c < ROWS_WARP_MAXC; c++)
        if (c < nc) {
            v[c] = *(const float4 *)(x + 128 * c + 4 * lane);
            ss += (double)v[c].x * v[c].x + (double)v[c].y * v[c].y + (double)v[c].z * v[c].z +
                  (double)v[c].w * v[c].w;
        }
    if (a.norm) {
        ss = warp_sum_d(ss);
        float scale = (float)(1.0 / sqrt(ss / (double)a.dim + (double)a.eps));
#pragma unroll
        for (int c = 0; c < ROWS_WARP_MAXC; c++)
            if (c < nc) {
                float *e = &v[c].x;
                const float *w = a.norm_w ? a.norm_w + 128 * c + 4 * lane : NULL;
#pragma unroll
                for (int i = 0; i < 4; i++) e[i] = w ? e[i] * scale * w[i] : e[i] * scale;
            }
    }
    const int64_t pos = a.freqs ? *a.pos0 + r / a.per_tok : 0;
#pragma unroll
    for (int c = 0; c < ROWS_WARP_MAXC; c++)
        if (c < nc) {
            int j = 128 * c + 4 * lane - (a.dim - a.rope_dim);   /* the first of two RoPE pairs */
            if (a.freqs && j >= 0) {
                float *e = &v[c].x;
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    int k = j / 2 + h;
                    float phi = (float)pos * a.freqs[k];
                    float cs = cosf(phi), sn = sinf(phi);   /* d_rope, sign 1 */
                    float x0 = e[2 * h], x1 = e[2 * h + 1];
                    e[2 * h] = x0 * cs - x1 * sn;
                    e[2 * h + 1] = x0 * sn + x1 * cs;
                }
            }
        }
    if (a.qat == QAT_FP4) d_qat_fp4_row128(v[0]);
#pragma unroll
    for (int c = 0; c < ROWS_WARP_MAXC; c++)
        if (c < nc) *(float4 *)(y + 128 * c + 4 * lane) = v[c];
}

/* What k_rows_warp takes: whole float4 rows of 128..1024, a norm and/or
 * RoPE (pairs inside a float4), then nothing, or the FP4 rounding of a
 * whole 128-value row (the indexer's q heads in qat). */
static inline bool rows_warp_fits(const row_args &a) {
    bool qat_ok = a.qat == QAT_NONE || (a.qat == QAT_FP4 && a.dim == 128 && a.qat_len == 128);
    return a.dim % 128 == 0 && a.dim / 128 <= ROWS_WARP_MAXC && a.rope_dim % 4 == 0 && a.xs % 4 == 0 &&
           a.ys % 4 == 0 && qat_ok && a.scale == 1.0f && !a.a8.q0.q && !a.a8.qk.q;
}

/* ---- hyper-connections ---- */

/* The mix of token t: the sum of its `parts` partial products (a K-split
 * one-token mixer, hc_mixer), part p at mix + p * part_stride. */
__device__ __forceinline__ float d_mix_at(const float *mix, int parts, int64_t part_stride, int64_t i) {
    float v = 0;
#pragma unroll 8   /* loads in flight together; the sum in part order */
    for (int p = 0; p < parts; p++) v += mix[p * part_stride + i];
    return v;
}

/* x = sum_i wts_i X_i over the D columns, then xn = the sublayer's input
 * norm of x (d_rms's arithmetic); xn may be x. A thread rereads only the
 * columns it wrote. */
__device__ void d_collapse_norm(const float *Xt, const float *wts, int hc, int D,
                                const float *norm_w, float eps, float *x, float *xn) {
    double ss = 0;
#pragma unroll 4   /* the columns' loads in flight together */
    for (int k = threadIdx.x; k < D; k += blockDim.x) {
        float acc = 0;
        for (int i = 0; i < hc; i++) acc += wts[i] * Xt[(int64_t)i * D + k];
        x[k] = acc;
        ss += (double)acc * acc;
    }
    float scale = d_rms_scale_of(ss, D, eps);
    for (int k = threadIdx.x; k < D; k += blockDim.x)
        xn[k] = norm_w ? x[k] * scale * norm_w[k] : x[k] * scale;
}

/* The HC controller's Sinkhorn (§2.2), a warp per token: post and the comb
 * from the mix. Only the expand after the sublayer reads them, so it runs
 * beside the sublayer (hc_controller's side stream). Lane entries e = lane +
 * 32k of the comb live in registers; row and column sums read a shared copy
 * in forward.c's order. */
__global__ void __launch_bounds__(WARP) k_hc_sinkhorn(const float *mix, int parts, int64_t part_stride,
                                                      const float *base, const float *scale, int hc,
                                                      int iters, float hc_eps, float *post, float *comb) {
    pdl_begin();
    int t = blockIdx.x, n_mix = (2 + hc) * hc, ne = hc * hc, lane = threadIdx.x;
    __shared__ float C[256], mu[(2 + 16) * 16];
    const float *b = base, *sc = scale;
    for (int i = lane; i < n_mix; i += WARP) mu[i] = d_mix_at(mix, parts, part_stride, (int64_t)t * n_mix + i);
    __syncwarp();
    if (lane < hc) post[t * hc + lane] = 2.0f * d_sigmoid(mu[hc + lane] * sc[1] + b[hc + lane]);
    /* entry k of this lane: e = lane + 32k, the first entry of its row, its
     * column; hc <= 16 */
    float c[8];
    int row[8], col[8];
#pragma unroll
    for (int k = 0; k < 8; k++) {
        int e = lane + WARP * k;
        row[k] = e < ne ? e / hc * hc : 0;
        col[k] = e < ne ? e % hc : 0;
        if (e < ne) C[e] = mu[2 * hc + e] * sc[2] + b[2 * hc + e];
    }
    __syncwarp();
    /* row softmax + eps: each entry's lane redoes its row's max and sum */
#pragma unroll
    for (int k = 0; k < 8; k++) {
        if (lane + WARP * k >= ne) break;
        float m = -INFINITY, sum = 0;
        for (int j = 0; j < hc; j++) m = fmaxf(m, C[row[k] + j]);
        for (int j = 0; j < hc; j++) sum += expf(C[row[k] + j] - m);
        c[k] = expf(C[lane + WARP * k] - m) / sum + hc_eps;
    }
    /* Sinkhorn: columns, then (rows, columns) x (iters - 1) */
    for (int it = 0; it < iters; it++) {
        for (int by_col = it > 0 ? 0 : 1; by_col < 2; by_col++) {
            __syncwarp();
#pragma unroll
            for (int k = 0; k < 8; k++)
                if (lane + WARP * k < ne) C[lane + WARP * k] = c[k];
            __syncwarp();
#pragma unroll
            for (int k = 0; k < 8; k++) {
                if (lane + WARP * k >= ne) break;
                float sum = 0;
                if (by_col)
                    for (int i = 0; i < hc; i++) sum += C[i * hc + col[k]];
                else
                    for (int j = 0; j < hc; j++) sum += C[row[k] + j];
                c[k] /= sum + hc_eps;
            }
        }
    }
#pragma unroll
    for (int k = 0; k < 8; k++)
        if (lane + WARP * k < ne) comb[(int64_t)t * ne + lane + WARP * k] = c[k];
}

/* The rest of the HC controller, a block per token: pre from the mix
 * (n_mix entries a token, the first hc of them pre's), the collapsed input
 * x = sum_i pre_i X_i and the sublayer's input norm of it, xn (xn may be x).
 * Also the output head (n_mix = hc: its mix is pre alone). c (qat-q8, one
 * token): xn's codes too. */
__global__ void k_hc_collapse(const float *mix, int parts, int64_t part_stride, int n_mix, const float *X,
                              const float *base, const float *scale, int hc, int D, float hc_eps,
                              float rms_eps, const float *norm_w, float *x, float *xn, act8_pre c) {
    pdl_begin();
    int t = blockIdx.x;
    __shared__ float pre[16];
    if (threadIdx.x < hc)
        pre[threadIdx.x] = d_sigmoid(d_mix_at(mix, parts, part_stride, (int64_t)t * n_mix + threadIdx.x) *
                                     scale[0] + base[threadIdx.x]) + hc_eps;
    __syncthreads();
    d_collapse_norm(X + (int64_t)t * hc * D, pre, hc, D, norm_w, rms_eps, x + (int64_t)t * D,
                    xn + (int64_t)t * D);
    if (c.q0.q || c.qk.q) d_act8_row(xn + (int64_t)t * D, D, c, (int64_t)t * D);
}

#define HC_MAX 16   /* streams the CUDA backend takes (model_init) */

/* A decode token's HC controller on the main stream in one block: the HC
 * "pre" rows of the mixer (F16; the only ones the collapse reads) on the
 * RMS norm of all HC * D streams, their gates, then k_hc_collapse's
 * collapse and norm. The mixer's other rows (post, comb) run beside it for
 * Sinkhorn (hc_controller). The norm's scale multiplies the row sums, not x.
 * c: xn's codes too (qat-q8); early: the pre rows prefetched before the wait. */
template <int HC>
__global__ void __launch_bounds__(1024) k_hc_pre_collapse(dmat fn, const float *X, const float *base,
                                                          const float *scale, int D, float hc_eps,
                                                          float rms_eps, const float *norm_w, float *x,
                                                          float *xn, act8_pre c, int early) {
    __shared__ float red[32][HC], pre[HC];
    int n = HC * D, lane = threadIdx.x % WARP, warp = threadIdx.x / WARP, nw = blockDim.x / WARP;
    if (early)   /* the pre rows (weights: no kernel writes them) on their way to L2 before the wait */
        for (int e0 = 8 * threadIdx.x; e0 < n; e0 += 8 * blockDim.x)
#pragma unroll
            for (int r = 0; r < HC; r++) prefetch_l2(fn.data + (int64_t)r * fn.row_bytes + 2 * e0);
    pdl_begin();
    double ss = 0;
    float dot[HC];
#pragma unroll
    for (int r = 0; r < HC; r++) dot[r] = 0;
#pragma unroll 2   /* Flash: 2 passes, all loads in flight together */
    for (int e0 = 8 * threadIdx.x; e0 < n; e0 += 8 * blockDim.x) {
        float4 u0 = ((const float4 *)X)[e0 / 4], u1 = ((const float4 *)X)[e0 / 4 + 1];
        ss += (double)u0.x * u0.x + (double)u0.y * u0.y + (double)u0.z * u0.z + (double)u0.w * u0.w;
        ss += (double)u1.x * u1.x + (double)u1.y * u1.y + (double)u1.z * u1.z + (double)u1.w * u1.w;
#pragma unroll
        for (int r = 0; r < HC; r++) {
            float w[8];
            deq8(DS4_TYPE_F16, fn.data + (int64_t)r * fn.row_bytes, n, e0, w);
            dot[r] = dot8(dot[r], w, u0, u1);
        }
    }
    float s = d_rms_scale_of(ss, n, rms_eps);
#pragma unroll
    for (int r = 0; r < HC; r++) {
        float v = warp_sum(dot[r]);
        if (lane == 0) red[warp][r] = v;
    }
    __syncthreads();
    if (threadIdx.x < HC) {
        float m = 0;
        for (int w = 0; w < nw; w++) m += red[w][threadIdx.x];
        pre[threadIdx.x] = d_sigmoid(m * s * scale[0] + base[threadIdx.x]) + hc_eps;
    }
    __syncthreads();
    d_collapse_norm(X, pre, HC, D, norm_w, rms_eps, x, xn);
    if (c.q0.q || c.qk.q) d_act8_row(xn, D, c, 0);
}

/* k_hc_pre_collapse with every value in registers: a thread the 8 columns
 * 8t..8t+7 of all HC streams (D / 8 threads: for Flash 512), so the streams
 * are read once (the single block read them twice and xn a third time for
 * its codes), the pre rows' F16 weights for those columns are loaded before
 * the PDL wait (early), and the whole step has two barriers (the pre rows'
 * and the norm's sums) where the single block had five phases with a global
 * round trip between most. A warp's 256 columns are one Q8_K block and its
 * lanes' 8 act8_warp's layout, so the codes come from registers too. Not the
 * single block's order of sums (the pre rows' dot products and the norms'
 * squares by thread here): the GPU tests hold it. The collapse itself, a
 * column's sum over the streams, is the same expression. */
#define HC_REG_WARPS 16   /* D / 8 threads, D <= 4096 (hc_reg_fits) */
template <int HC>
__global__ void __launch_bounds__(HC_REG_WARPS * WARP) k_hc_pre_collapse_reg(dmat fn, const float *X, const float *base,
                                                               const float *scale, int D, float hc_eps,
                                                               float rms_eps, const float *norm_w, float *x,
                                                               float *xn, act8_pre c, int early) {
    __shared__ float red[32][HC];
    __shared__ double ssw[2][32];
    const int t = threadIdx.x, lane = t % WARP, warp = t / WARP, nw = blockDim.x / WARP, c0 = 8 * t;
    const int n = HC * D;
    uint4 wv[HC][HC];   /* pre row r's 8 halves of stream i's columns */
    float scale0, base_r[HC];   /* with them: no weight load after the sums */
    auto load_pre_rows = [&] {
#pragma unroll
        for (int r = 0; r < HC; r++)
#pragma unroll
            for (int i = 0; i < HC; i++)
                wv[r][i] = *(const uint4 *)((const uint16_t *)(fn.data + (int64_t)r * fn.row_bytes) + i * D + c0);
        scale0 = scale[0];
#pragma unroll
        for (int r = 0; r < HC; r++) base_r[r] = base[r];
    };
    if (early) load_pre_rows();
    pdl_begin();
    if (!early) load_pre_rows();
    float4 xa[HC], xb[HC];
#pragma unroll
    for (int i = 0; i < HC; i++) {
        xa[i] = *(const float4 *)(X + (int64_t)i * D + c0);
        xb[i] = *(const float4 *)(X + (int64_t)i * D + c0 + 4);
    }
    float4 na = make_float4(1, 1, 1, 1), nb = na;
    if (norm_w) na = *(const float4 *)(norm_w + c0), nb = *(const float4 *)(norm_w + c0 + 4);
    double ss = 0;
    float dot[HC];
#pragma unroll
    for (int r = 0; r < HC; r++) dot[r] = 0;
#pragma unroll
    for (int i = 0; i < HC; i++) {
        float4 u0 = xa[i], u1 = xb[i];
        ss += (double)u0.x * u0.x + (double)u0.y * u0.y + (double)u0.z * u0.z + (double)u0.w * u0.w;
        ss += (double)u1.x * u1.x + (double)u1.y * u1.y + (double)u1.z * u1.z + (double)u1.w * u1.w;
#pragma unroll
        for (int r = 0; r < HC; r++) {
            const uint32_t u[4] = {wv[r][i].x, wv[r][i].y, wv[r][i].z, wv[r][i].w};
            float w[8];
#pragma unroll
            for (int j = 0; j < 4; j++) {
                float2 f = __half22float2(*(const __half2 *)&u[j]);
                w[2 * j] = f.x, w[2 * j + 1] = f.y;
            }
            dot[r] = dot8(dot[r], w, u0, u1);
        }
    }
    ss = warp_sum_d(ss);
#pragma unroll
    for (int r = 0; r < HC; r++) dot[r] = warp_sum(dot[r]);
    if (lane == 0) {
        ssw[0][warp] = ss;
#pragma unroll
        for (int r = 0; r < HC; r++) red[warp][r] = dot[r];
    }
    __syncthreads();
    /* the warps' partial sums in warp order, their loads all issued first
     * (a loop over nw loaded and added one at a time) */
    double s2 = 0;
#pragma unroll
    for (int w = 0; w < HC_REG_WARPS; w++)
        if (w < nw) s2 += ssw[0][w];
    float sc = (float)(1.0 / sqrt(s2 / (double)n + (double)rms_eps));
    float pre[HC];
#pragma unroll
    for (int r = 0; r < HC; r++) {
        float m = 0;
#pragma unroll
        for (int w = 0; w < HC_REG_WARPS; w++)
            if (w < nw) m += red[w][r];
        pre[r] = d_sigmoid(m * sc * scale0 + base_r[r]) + hc_eps;
    }
    /* the collapse: column k's sum over the streams, as d_collapse_norm */
    float v[8];
    double ss2 = 0;
#pragma unroll
    for (int j = 0; j < 8; j++) {
        float acc = 0;
#pragma unroll
        for (int i = 0; i < HC; i++) {
            acc += pre[i] * (j < 4 ? (&xa[i].x)[j] : (&xb[i].x)[j - 4]);
        }
        v[j] = acc;
        ss2 += (double)acc * acc;
    }
    *(float4 *)(x + c0) = make_float4(v[0], v[1], v[2], v[3]);
    *(float4 *)(x + c0 + 4) = make_float4(v[4], v[5], v[6], v[7]);
    ss2 = warp_sum_d(ss2);
    if (lane == 0) ssw[1][warp] = ss2;
    __syncthreads();
    double t2 = 0;
#pragma unroll
    for (int w = 0; w < HC_REG_WARPS; w++)
        if (w < nw) t2 += ssw[1][w];
    float sn = (float)(1.0 / sqrt(t2 / (double)D + (double)rms_eps));
    const float nwv[8] = {na.x, na.y, na.z, na.w, nb.x, nb.y, nb.z, nb.w};
#pragma unroll
    for (int j = 0; j < 8; j++) v[j] = norm_w ? v[j] * sn * nwv[j] : v[j] * sn;
    *(float4 *)(xn + c0) = make_float4(v[0], v[1], v[2], v[3]);
    *(float4 *)(xn + c0 + 4) = make_float4(v[4], v[5], v[6], v[7]);
    if (c.q0.q) {
        float q[8] = {v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]};
        act8_warp(q, 0xffffffffu, 0, c0, c.q0);
    }
    if (c.qk.q) act8_warp(v, 0xffffffffu, 1, c0, c.qk);
}

/* Widths k_hc_pre_collapse_reg takes: a thread 8 columns, whole warps, at
 * most 512 threads (128 registers each). */
static inline bool hc_reg_fits(int D) { return D % 256 == 0 && D / 8 <= HC_REG_WARPS * WARP; }

/* The MoE's output (§4.5) read where it is used: token t's k routed rows
 * of ex_y (grouped places slot_pair) by their weights, then the shared
 * expert's row. */
struct moe_out {
    const float *ex_y;   /* NULL: none (the expand reads y) */
    const int *slot_pair;
    const float *sel_w, *shared;
    int k;
};

/* token t's MoE output at its columns j..j + 3: sum_i w_i ex_y(slot i) + shared,
 * the k routed terms in slot order */
#define MOE_OUT_LOADS 8   /* k up to this: every slot's loads in flight at once */
__device__ __forceinline__ float4 d_moe_out4(const moe_out &m, int t, int j, int D) {
    float4 acc = make_float4(0, 0, 0, 0);
    if (m.k <= MOE_OUT_LOADS) {   /* two round trips (the places, then the rows), not 2 k */
        int sp[MOE_OUT_LOADS];
        float w[MOE_OUT_LOADS];
        float4 v[MOE_OUT_LOADS];
#pragma unroll
        for (int i = 0; i < MOE_OUT_LOADS; i++)
            if (i < m.k) sp[i] = m.slot_pair[t * m.k + i], w[i] = m.sel_w[t * m.k + i];
#pragma unroll
        for (int i = 0; i < MOE_OUT_LOADS; i++)
            if (i < m.k) v[i] = *(const float4 *)(m.ex_y + (int64_t)sp[i] * D + j);
#pragma unroll
        for (int i = 0; i < MOE_OUT_LOADS; i++)
            if (i < m.k) acc.x += v[i].x * w[i], acc.y += v[i].y * w[i], acc.z += v[i].z * w[i], acc.w += v[i].w * w[i];
    } else {
        for (int i = 0; i < m.k; i++) {
            float w = m.sel_w[t * m.k + i];
            float4 v = *(const float4 *)(m.ex_y + (int64_t)m.slot_pair[t * m.k + i] * D + j);
            acc.x += v.x * w, acc.y += v.y * w, acc.z += v.z * w, acc.w += v.w * w;
        }
    }
    float4 sh = *(const float4 *)(m.shared + (int64_t)t * D + j);
    return make_float4(acc.x + sh.x, acc.y + sh.y, acc.z + sh.z, acc.w + sh.w);
}

/* X'_j = post_j y + sum_i C_ij X_i, into Xn, y the sublayer's output (or,
 * after the MoE, its output summed here: m.ex_y set, one launch fewer a
 * layer). Grid (D / 4 / HC_EXPAND_THREADS, tokens): a thread 4 columns k of
 * token t (float4; D % 8 == 0, as k_embed takes), its hc stream values read
 * once for the hc outputs, no 64-bit division by D (a thread an element with
 * idx % D, idx / D: 1.15 TB/s a chunk). Each value is the same expression as
 * an element's. */
#define HC_EXPAND_THREADS 128
template <int HCN>   /* hc <= HCN: Flash's 4 keeps the float4s of a thread in 16 registers, not 64 */
__global__ void __launch_bounds__(HC_EXPAND_THREADS) k_hc_expand(const float *X, const float *post,
                                                                 const float *comb, const float *y, moe_out m,
                                                                 int hc, int D, float *Xn) {
    pdl_begin();
    int k = 4 * (blockIdx.x * HC_EXPAND_THREADS + threadIdx.x), t = blockIdx.y;
    if (k >= D) return;
    const float *Xt = X + (int64_t)t * hc * D + k, *C = comb + (int64_t)t * hc * hc;
    float4 x[HCN];
#pragma unroll
    for (int i = 0; i < HCN; i++) x[i] = i < hc ? *(const float4 *)(Xt + (int64_t)i * D) : make_float4(0, 0, 0, 0);
    float4 yk = m.ex_y ? d_moe_out4(m, t, k, D) : *(const float4 *)(y + (int64_t)t * D + k);
    for (int j = 0; j < hc; j++) {
        float4 acc = make_float4(0, 0, 0, 0);
#pragma unroll
        for (int i = 0; i < HCN; i++)
            if (i < hc) {
                float c = C[i * hc + j];
                acc.x += c * x[i].x, acc.y += c * x[i].y, acc.z += c * x[i].z, acc.w += c * x[i].w;
            }
        float pj = post[t * hc + j];
        *(float4 *)(Xn + ((int64_t)t * hc + j) * D + k) =
            make_float4(pj * yk.x + acc.x, pj * yk.y + acc.y, pj * yk.z + acc.z, pj * yk.w + acc.w);
    }
}

/* Token embeddings, copied to every stream. */
__global__ void k_embed(dmat E, const int32_t *ids, int hc, int D, float *X) {
    pdl_begin();
    int t = blockIdx.y, e0 = (blockIdx.x * blockDim.x + threadIdx.x) * 8;
    if (e0 >= D) return;
    float w[8];
    deq8(E.type, E.data + (int64_t)ids[t] * E.row_bytes, E.n_in, e0, w);
    for (int i = 0; i < hc; i++)
        for (int j = 0; j < 8; j++) X[((int64_t)t * hc + i) * D + e0 + j] = w[j];
}

/* ---- attention state ---- */

/* Per token: the window row into the raw ring; kappa, gamma (+APE) into the
 * compressor rings. */
struct state_args {
    const float *kv, *kg, *ikg;
    const uint16_t *ape, *iape;
    float *raw, *kg_ring, *ikg_ring;
    const int64_t *pos0;
    int64_t cap_raw, cap_kg;
    int d, cw, iw2, m;
};

/* A token's elements of the three rows are one index space, a thread's
 * STATE_PER of them loaded before any is stored: the three loops this was
 * (a store then the next load, which the compiler must take as possibly the
 * same address) were ~12 dependent rounds of memory a thread, 5.7 us of each
 * decode layer's chain (the H200 trace); Flash's 3,072 elements now go in one
 * round of STATE_THREADS. The same values (src, or src + APE). */
#define STATE_THREADS 1024
#define STATE_PER 4

__global__ void __launch_bounds__(STATE_THREADS) k_state(state_args a) {
    pdl_begin();
    int t = blockIdx.x;
    int64_t pos = *a.pos0 + t;
    const int n_kv = a.d, n_kg = a.m ? 2 * a.cw : 0, n_ikg = a.m && a.ikg ? 2 * a.iw2 : 0;
    const int total = n_kv + n_kg + n_ikg;
    float *raw = a.raw + (pos % a.cap_raw) * a.d;
    float *kg_slot = n_kg ? a.kg_ring + (pos % a.cap_kg) * 2 * a.cw : NULL;
    float *ikg_slot = n_ikg ? a.ikg_ring + (pos % a.cap_kg) * 2 * a.iw2 : NULL;
    const int64_t ape_row = a.m ? pos % a.m : 0;
    for (int i0 = threadIdx.x; i0 < total; i0 += STATE_PER * blockDim.x) {
        /* the loads (an APE half kept raw: converting it here would wait on it) */
        float v[STATE_PER];
        uint16_t ape[STATE_PER];
        bool add[STATE_PER];
        float *dst[STATE_PER];
#pragma unroll
        for (int u = 0; u < STATE_PER; u++) {
            int i = i0 + u * blockDim.x;
            dst[u] = NULL, add[u] = false, ape[u] = 0;
            if (i < n_kv) {
                v[u] = a.kv[(int64_t)t * a.d + i];
                dst[u] = raw + i;
            } else if (i < n_kv + n_kg) {   /* kappa, then gamma + APE */
                int k = i - n_kv;
                v[u] = a.kg[(int64_t)t * 2 * a.cw + k];
                if (k >= a.cw) ape[u] = a.ape[ape_row * a.cw + k - a.cw], add[u] = true;
                dst[u] = kg_slot + k;
            } else if (i < total) {
                int k = i - n_kv - n_kg;
                v[u] = a.ikg[(int64_t)t * 2 * a.iw2 + k];
                if (k >= a.iw2) ape[u] = a.iape[ape_row * a.iw2 + k - a.iw2], add[u] = true;
                dst[u] = ikg_slot + k;
            }
        }
#pragma unroll
        for (int u = 0; u < STATE_PER; u++) {
            if (!dst[u]) continue;
            float x = v[u];
            if (add[u]) x += __half2float(__ushort_as_half(ape[u]));
            *dst[u] = x;
        }
    }
}

/* One compressed row per block: window pos0 / m + blockIdx.x, when the
 * chunk's n tokens complete it, pooled (§3.6), then norm, RoPE at w*m and the
 * qat step; compact rows (rows8) are built in shared memory (dim floats),
 * then encoded. Launched with n / m + 1 blocks. */
struct comp_args {
    const float *ring;
    int64_t cap;
    int width, dim, m, coff;
    const int64_t *pos0;
    int n;
    float *rows;
    const float *norm_w;
    float eps;
    const float *freqs;
    int rope_dim;
    int qat;    /* QAT_* */
    uint8_t *rows8;   /* compact rows (kv_compact.cuh) instead of rows; NULL: float */
    kv_compact kv;
};

/* The pooling's loads go out together: a window's positions COMP_BATCH at a
 * time, each batch loaded before its first use; a window of at most
 * COMP_BATCH positions (ratio 4's two halves: 8) is loaded once and kept in
 * registers. Each thread had pooled its dims one after another, three passes
 * of dependent global loads each (~100 loads in a row): a decode token that
 * completes a ratio-4 window waited 44 us on its one block (58 us a layer
 * with the indexer's, 1.2 ms every fourth token; the H200 trace).
 * A thread a dim (up to COMP_MAX_THREADS, so a row's dims at once): with 4
 * dims a thread over 128 the one block ran ~3,300 instructions a warp of
 * straight code once, a warp alone on each scheduler, and ncu of a
 * completing launch found it waiting on instruction fetch and on its own
 * dependent steps (24 us, 0.08 issued a scheduler, stall "no instruction" 6.7
 * of 13.9 cycles an instruction; ncu flushes caches first, but the chain
 * trace had the same ~21 us). A quarter of the code a warp: the fourth
 * token 7.28 -> 6.82 ms. The same expressions in the same order for each
 * dim: the same bits. */
#define COMP_BATCH 8
#define COMP_MAX_THREADS 512

struct comp_window {
    const comp_args &a;
    int64_t w, first, last;
    /* gamma (or kappa) of positions p0.. (consecutive: one ring division) at
     * dim j: ratio 4's earlier half (p < w m) takes the first dim values of
     * the ring row, the later half the second */
    __device__ __forceinline__ void load(float (&v)[COMP_BATCH], int64_t p0, int j, bool gamma) const {
        int64_t slot = p0 % a.cap;
#pragma unroll
        for (int u = 0; u < COMP_BATCH; u++) {
            if (p0 + u < last)
                v[u] = a.ring[(slot * 2 + gamma) * a.width + ((a.coff == 2 && p0 + u >= w * a.m) ? a.dim : 0) + j];
            slot = slot + 1 == a.cap ? 0 : slot + 1;
        }
    }
};

__global__ void k_compress(comp_args a) {
    pdl_begin();
    int64_t w = *a.pos0 / a.m + blockIdx.x;
    if (w >= (*a.pos0 + a.n) / a.m) return;
    int64_t first = a.coff == 2 ? (w - 1) * a.m : w * a.m;
    if (first < 0) first = w * a.m;
    const comp_window cw = {a, w, first, w * a.m + a.m};
    const bool one_batch = cw.last - first <= COMP_BATCH;
    extern __shared__ float comp_row[];
    float *out = a.rows8 ? comp_row : a.rows + w * a.dim;
    for (int j = threadIdx.x; j < a.dim; j += blockDim.x) {
        float g[COMP_BATCH], k[COMP_BATCH], mx = -INFINITY, sum = 0, acc = 0;
        /* the three passes over the window: the maximum, the sum of exponents,
         * then the weighted kappa */
        for (int64_t p0 = first; p0 < cw.last; p0 += COMP_BATCH) {
            cw.load(g, p0, j, true);
            if (one_batch) cw.load(k, p0, j, false);
#pragma unroll
            for (int u = 0; u < COMP_BATCH; u++)
                if (p0 + u < cw.last) mx = fmaxf(mx, g[u]);
        }
        for (int64_t p0 = first; p0 < cw.last; p0 += COMP_BATCH) {
            if (!one_batch) cw.load(g, p0, j, true);
#pragma unroll
            for (int u = 0; u < COMP_BATCH; u++)
                if (p0 + u < cw.last) sum += expf(g[u] - mx);
        }
        for (int64_t p0 = first; p0 < cw.last; p0 += COMP_BATCH) {
            if (!one_batch) {
                cw.load(g, p0, j, true);
                cw.load(k, p0, j, false);
            }
#pragma unroll
            for (int u = 0; u < COMP_BATCH; u++)
                if (p0 + u < cw.last) acc += expf(g[u] - mx) / sum * k[u];
        }
        out[j] = acc;
    }
    __syncthreads();
    d_rms(out, out, a.norm_w, a.dim, a.eps);
    d_rope(out, a.dim, a.rope_dim, a.freqs, w * a.m, 1);
    if (a.qat == QAT_FP8) d_qat_fp8(out, a.dim - a.rope_dim);
    if (a.qat == QAT_FP4) d_qat_fp4(out, a.dim);
    if (a.rows8 && a.qat == QAT_FP8) kv8_encode(a.rows8 + w * a.kv.bytes, out, a.dim, a.kv);
    if (a.rows8 && a.qat == QAT_FP4) kv4_encode(a.rows8 + w * a.kv.bytes, out, a.kv);
}

/* Lightning indexer (§3.7): when more compressed rows exist than top_k, the
 * top_k by score (ties: lower index), in index order, as forward.c's sorts
 * give. k_idx_score writes every row's score, k_idx_select picks the rows. */
struct idx_args {
    const float *iq, *iw, *krows;
    float *scores;   /* [slice tokens][cap_rows] */
    int *sel;        /* [n][top_k] */
    int *n_sel;      /* [n]: -1 = every row */
    const int64_t *pos0;
    int64_t cap_rows;
    int m, HI, dI, top_k;
    int t0;          /* the slice's first token in the chunk (blockIdx.x counts from it) */
    const uint8_t *krows8;   /* compact rows (kv_compact.cuh) instead of krows; NULL: float */
    kv_compact kv;
    int fp4;         /* qat: queries and rows are FP4 values times powers of two (Q2), exact in tf32 */
};

/* Grid (token, split): a warp scores one row, a lane one head at a time, the
 * splits share a token's rows so that one decode token fills the GPU. */
__global__ void k_idx_score(idx_args a) {
    pdl_begin();
    int t = a.t0 + blockIdx.x;
    int64_t n_rows = (*a.pos0 + t + 1) / a.m;
    int lane = threadIdx.x % WARP, wid = threadIdx.x / WARP, nw = blockDim.x / WARP;
    if (n_rows <= a.top_k || (int64_t)blockIdx.y * nw >= n_rows) return;
    float *sc = a.scores + (int64_t)blockIdx.x * a.cap_rows;
    const float *iq = a.iq + (int64_t)t * a.HI * a.dI, *iw = a.iw + (int64_t)t * a.HI;
    float score_scale = 1.0f / sqrtf((float)a.dI);
    /* the token's queries in shared memory, rows padded by one against bank
     * conflicts; the heads' terms are summed in head order as forward.c does */
    extern __shared__ float qsh[];   /* [HI][dI + 1], [nw][HI] terms, then (compact rows) [nw][dI] */
    float *terms = qsh + a.HI * (a.dI + 1) + wid * a.HI;
    float *krow = qsh + a.HI * (a.dI + 1) + nw * a.HI + wid * a.dI;   /* this warp's decoded row */
    for (int i = threadIdx.x; i < a.HI * a.dI; i += blockDim.x)
        qsh[(i / a.dI) * (a.dI + 1) + i % a.dI] = iq[i];
    __syncthreads();
    for (int64_t r = (int64_t)blockIdx.y * nw + wid; r < n_rows; r += (int64_t)gridDim.y * nw) {
        if (a.krows8) {
            for (int c = lane; c < a.dI / 4; c += WARP) {
                float4 v = kv4_load4(a.krows8 + r * a.kv.bytes, c, a.kv);
                krow[4 * c] = v.x, krow[4 * c + 1] = v.y, krow[4 * c + 2] = v.z, krow[4 * c + 3] = v.w;
            }
            __syncwarp();
        }
        const float *K = a.krows8 ? krow : a.krows + r * a.dI;
        for (int h = lane; h < a.HI; h += WARP) {
            const float *q = qsh + h * (a.dI + 1);
            float dot = 0;
            for (int k = 0; k < a.dI; k++) dot = fmaf(q[k], K[k], dot);
            terms[h] = (dot > 0 ? dot : 0) * score_scale * iw[h];
        }
        __syncwarp();
        if (lane == 0) {
            float score = 0;
            for (int h = 0; h < a.HI; h++) score += terms[h];
            sc[r] = score;
        }
        __syncwarp();
    }
}

/* A score as a key where smaller = higher score; -0 and +0 are one key, as
 * they compare equal in forward.c's sort. */
__device__ __forceinline__ uint32_t d_desc_key(float f) {
    uint32_t u = __float_as_uint(f);
    if (u == 0x80000000u) u = 0;
    return (u & 0x80000000u) ? u : ~(u | 0x80000000u);
}

/* Exclusive prefix sum of v over the block; *total = the block's sum. */
__device__ __forceinline__ uint32_t d_block_scan(uint32_t v, uint32_t *ws, uint32_t *total) {
    int lane = threadIdx.x % WARP, wid = threadIdx.x / WARP, nw = blockDim.x / WARP;
    uint32_t x = v;
    for (int o = 1; o < WARP; o <<= 1) {
        uint32_t y = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= o) x += y;
    }
    if (lane == WARP - 1) ws[wid] = x;
    __syncthreads();
    if (wid == 0) {
        uint32_t s = lane < nw ? ws[lane] : 0;
        for (int o = 1; o < WARP; o <<= 1) {
            uint32_t y = __shfl_up_sync(0xffffffffu, s, o);
            if (lane >= o) s += y;
        }
        if (lane < nw) ws[lane] = s;
    }
    __syncthreads();
    uint32_t before = (wid ? ws[wid - 1] : 0) + x - v;
    *total = ws[nw - 1];
    __syncthreads();
    return before;
}

#define IDX_SEL_THREADS 512   /* >= 256: a thread per histogram bin */
#define IDX_SEL_CACHE 8       /* a thread's keys held: 4,096 rows (16K tokens at ratio 4) */

/* One block per token. A radix select over the score keys, a byte a pass
 * from the top, finds the key T of the top_k-th best row and how many rows
 * of key T it takes (`need`, the lowest-indexed ones); one scan pass then
 * writes the chosen rows in index order: row r goes to (better rows before
 * r) + min(rows of key T before r, need). O(rows) and no sort. */
__global__ void __launch_bounds__(IDX_SEL_THREADS) k_idx_select(idx_args a) {
    pdl_begin();
    int t = a.t0 + blockIdx.x;
    int64_t n_rows = (*a.pos0 + t + 1) / a.m;
    if (n_rows <= a.top_k) {
        if (threadIdx.x == 0) a.n_sel[t] = -1;
        return;
    }
    if (a.top_k <= 0) {   /* no radix pass finds a 0th row */
        if (threadIdx.x == 0) a.n_sel[t] = 0;
        return;
    }
    const float *sc = a.scores + (int64_t)blockIdx.x * a.cap_rows;
    int *out = a.sel + (int64_t)t * a.top_k;
    __shared__ uint32_t hist[256], ws[WARP], s_prefix, s_rem;
    int lane = threadIdx.x % WARP;
    /* the keys of rows threadIdx.x + j blockDim, j < IDX_SEL_CACHE, read once
     * (every pass read them again from L2: five rounds a token); rows past
     * them read at each pass. body(r0, key) for every row tile r0, in order. */
    uint32_t kc[IDX_SEL_CACHE];
#pragma unroll
    for (int j = 0; j < IDX_SEL_CACHE; j++) {
        int64_t r = (int64_t)j * blockDim.x + threadIdx.x;
        kc[j] = r < n_rows ? d_desc_key(sc[r]) : 0;
    }
    auto for_rows = [&](auto &&body) {
#pragma unroll
        for (int j = 0; j < IDX_SEL_CACHE; j++) {
            const int64_t r0 = (int64_t)j * blockDim.x;
            if (r0 >= n_rows) return;
            body(r0, kc[j]);
        }
        for (int64_t r0 = (int64_t)IDX_SEL_CACHE * blockDim.x; r0 < n_rows; r0 += blockDim.x) {
            int64_t r = r0 + threadIdx.x;
            body(r0, r < n_rows ? d_desc_key(sc[r]) : 0u);
        }
    };
    uint32_t prefix = 0, rem = (uint32_t)a.top_k;   /* rem: rank wanted among rows matching prefix */
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
        __syncthreads();
        uint32_t mask = shift == 24 ? 0 : 0xFFFFFFFFu << (shift + 8);
        for_rows([&](int64_t r0, uint32_t k) {
            int64_t r = r0 + threadIdx.x;
            bool live = r < n_rows && (k & mask) == prefix;
            unsigned act = __ballot_sync(0xffffffffu, live);
            if (live) {
                /* lanes with the same bin add once: high bytes are mostly equal */
                uint32_t bin = (k >> shift) & 255;
                unsigned peers = __match_any_sync(act, bin);
                if (lane == __ffs(peers) - 1) atomicAdd(&hist[bin], (uint32_t)__popc(peers));
            }
        });
        __syncthreads();
        uint32_t c = threadIdx.x < 256 ? hist[threadIdx.x] : 0, tot;
        uint32_t before = d_block_scan(c, ws, &tot);
        if (threadIdx.x < 256 && before < rem && before + c >= rem) {
            s_prefix = prefix | ((uint32_t)threadIdx.x << shift);
            s_rem = rem - before;
        }
        __syncthreads();
        prefix = s_prefix;
        rem = s_rem;
    }
    uint32_t T = prefix, need = rem, base_gt = 0, base_eq = 0;
    for_rows([&](int64_t r0, uint32_t k) {
        int64_t r = r0 + threadIdx.x;
        uint32_t v = 0;   /* counts packed: key T rows << 16 | better rows */
        if (r < n_rows) v = k < T ? 1u : k == T ? 0x10000u : 0u;
        uint32_t tot, before = d_block_scan(v, ws, &tot);
        uint32_t gt = base_gt + (before & 0xFFFFu), eq = base_eq + (before >> 16);
        if (v == 1u || (v && eq < need)) out[gt + (eq < need ? eq : need)] = (int)r;
        base_gt += tot & 0xFFFFu;
        base_eq += tot >> 16;
    });
    if (threadIdx.x == 0) a.n_sel[t] = a.top_k;
}

/* ---- MoE ---- */

__device__ __forceinline__ float d_softplus(float z) { return z > 20.0f ? z : log1pf(expf(z)); }

/* What k_group writes for one token's k (<= 32) slots, by one warp: a
 * one-token step's grouping without k_group's launch. A slot's place is
 * the count of slots on lower experts plus the earlier slots on its own. */
struct group_out {
    int *offs, *active, *pair_tok, *slot_pair;   /* offs NULL: k_group groups */
};

/* sel: the token's k slots' experts (k_route's copy in shared memory). */
__device__ void d_group_one(const int32_t *sel, int k, int E, const group_out &o) {
    int lane = threadIdx.x % WARP;
    for (int e = lane; e < E; e += WARP) {
        int c = 0;
        for (int i = 0; i < k; i++) c += sel[i] <= e;
        o.offs[e + 1] = c;
    }
    if (lane == 0) o.offs[0] = 0;
    int na = 0;   /* experts in use */
    for (int i = 0; i < k; i++) {
        bool first = true;
        for (int j = 0; j < i; j++) first = first && sel[j] != sel[i];
        na += first;
    }
    if (lane < k) {
        int e = sel[lane], lower = 0, same_before = 0, rank = 0;
        for (int i = 0; i < k; i++) {
            lower += sel[i] < e;
            same_before += i < lane && sel[i] == e;
            bool first = true;   /* slot i is its expert's first: counts once in the rank */
            for (int j = 0; j < i; j++) first = first && sel[j] != sel[i];
            rank += first && sel[i] < e;
        }
        o.slot_pair[lane] = lower + same_before;
        o.pair_tok[lower + same_before] = 0;
        if (!same_before) o.active[rank] = e;
    }
    for (int i = na + lane; i < (k < E ? k : E); i += WARP) o.active[i] = -1;
}

/* Router (§4.2), one warp per token, ROUTE_TOKENS a block: sqrt(softplus)
 * scores, top-k with the bias (lowest index on ties) or the hash table,
 * normalised weights; for one token (grp.offs set), its grouping too. The
 * chosen experts are read back from shared memory (up to ROUTE_K_SH of
 * them), not from sel in L2 right after the write (~40 dependent reads;
 * same bits, decode 0.3% faster on an H200). */
#define ROUTE_TOKENS 4
#define ROUTE_K_SH 32
__global__ void k_route(const float *router, int E, int k, const float *bias, const int32_t *tid2eid,
                        const int32_t *ids, float wscale, int n, int32_t *sel, float *sel_w, group_out grp) {
    pdl_begin();
    int t = blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP, lane = threadIdx.x % WARP;
    __shared__ float score_sh[ROUTE_TOKENS][1024], biased_sh[ROUTE_TOKENS][1024];
    __shared__ unsigned char taken_sh[ROUTE_TOKENS][1024];
    __shared__ int32_t sel_sh[ROUTE_TOKENS][ROUTE_K_SH];
    if (t >= n) return;
    const float *logit = router + (int64_t)t * E;
    float *score = score_sh[threadIdx.x / WARP], *biased = biased_sh[threadIdx.x / WARP];
    unsigned char *taken = taken_sh[threadIdx.x / WARP];
#pragma unroll 8   /* the loads in flight together */
    for (int e = lane; e < E; e += WARP) {
        score[e] = sqrtf(d_softplus(logit[e]));
        biased[e] = score[e] + (bias ? bias[e] : 0.0f);
        taken[e] = 0;
    }
    __syncwarp();
    int32_t *s = sel + t * k;
    /* where the choice is read back: shared memory, or sel itself for a k over ROUTE_K_SH */
    int32_t *sr = k <= ROUTE_K_SH ? sel_sh[threadIdx.x / WARP] : s;
    if (tid2eid) {
        for (int i = lane; i < k; i += WARP) sr[i] = s[i] = tid2eid[(int64_t)ids[t] * k + i];
    } else {
        for (int i = 0; i < k; i++) {
            float best_v = -INFINITY;
            int best = -1;
            for (int e = lane; e < E; e += WARP) {
                float v = biased[e];
                if (!taken[e] && (best < 0 || v > best_v)) {
                    best = e;
                    best_v = v;
                }
            }
            for (int o = 16; o > 0; o >>= 1) {
                float ov = __shfl_xor_sync(0xffffffffu, best_v, o);
                int ob = __shfl_xor_sync(0xffffffffu, best, o);
                if (ob >= 0 && (best < 0 || ov > best_v || (ov == best_v && ob < best))) {
                    best = ob;
                    best_v = ov;
                }
            }
            if (lane == 0) {
                sr[i] = s[i] = best;
                taken[best] = 1;
            }
            __syncwarp();
        }
    }
    __syncwarp();
    if (lane == 0) {
        float sum = 0;
        for (int i = 0; i < k; i++) sum += score[sr[i]];
        for (int i = 0; i < k; i++) sel_w[t * k + i] = score[sr[i]] / (sum + 1e-20f) * wscale;
    }
    if (grp.offs) {
        __syncwarp();   /* sr as lane 0 wrote it */
        d_group_one(sr, k, E, grp);
    }
}

/* k_route for one token (a decode step) in one warp's registers: lane l
 * holds experts l, l + 32, .. (ROUTE1_PER_LANE of them), and lane i < k
 * slot i's expert and score. The same scores, choice (lowest index on
 * ties), weights and grouping (d_group_one's) as k_route, the same bits.
 * k_route's one warp ran ~2,500 instructions one after another, ~17 us
 * (ncu): each logit's load waited on the stores before it, and the grouping
 * read the choice back from shared memory, a load at a time. Here every
 * load is issued up front and the choice moves by shuffles. */
#define ROUTE1_PER_LANE 8
__global__ void __launch_bounds__(WARP) k_route1(const float *router, int E, int k, const float *bias,
                                                 const int32_t *tid2eid, const int32_t *ids, float wscale,
                                                 int32_t *sel, float *sel_w, group_out o) {
    pdl_begin();
    const int lane = threadIdx.x;
    const unsigned all = 0xffffffffu;
    float logit[ROUTE1_PER_LANE], bv[ROUTE1_PER_LANE];
#pragma unroll
    for (int j = 0; j < ROUTE1_PER_LANE; j++) {   /* all loads in flight together (past E: a real entry, unused) */
        int e = min(lane + WARP * j, E - 1);
        logit[j] = router[e];
        bv[j] = bias ? bias[e] : 0.0f;
    }
    int mine = tid2eid && lane < k ? tid2eid[(int64_t)ids[0] * k + lane] : -1;   /* slot lane's expert */
    float score[ROUTE1_PER_LANE], biased[ROUTE1_PER_LANE];
    unsigned taken = 0;   /* bit j: expert lane + 32 j chosen, or past E */
#pragma unroll
    for (int j = 0; j < ROUTE1_PER_LANE; j++) {
        score[j] = sqrtf(d_softplus(logit[j]));
        biased[j] = score[j] + bv[j];
        if (lane + WARP * j >= E) taken |= 1u << j;
    }
    float chosen = 0.0f;   /* lane i < k: slot i's score */
    for (int i = 0; i < k; i++) {
        int best = -1;
        float best_s = 0.0f;
        if (tid2eid) {
            best = __shfl_sync(all, mine, i);
#pragma unroll
            for (int j = 0; j < ROUTE1_PER_LANE; j++)
                if (best / WARP == j) best_s = score[j];
            best_s = __shfl_sync(all, best_s, best % WARP);
        } else {
            float best_v = -INFINITY;
#pragma unroll
            for (int j = 0; j < ROUTE1_PER_LANE; j++)
                if (!((taken >> j) & 1) && (best < 0 || biased[j] > best_v)) {
                    best = lane + WARP * j;
                    best_v = biased[j];
                    best_s = score[j];
                }
            for (int off = 16; off > 0; off >>= 1) {
                float ov = __shfl_xor_sync(all, best_v, off), os = __shfl_xor_sync(all, best_s, off);
                int ob = __shfl_xor_sync(all, best, off);
                if (ob >= 0 && (best < 0 || ov > best_v || (ov == best_v && ob < best))) {
                    best = ob;
                    best_v = ov;
                    best_s = os;
                }
            }
            if (best % WARP == lane) taken |= 1u << (best / WARP);
            if (lane == i) mine = best;
        }
        if (lane == i) chosen = best_s;
    }
    /* the weights: k_route's sum, slot 0 first */
    float sum = 0;
    for (int i = 0; i < k; i++) sum += __shfl_sync(all, chosen, i);
    if (lane < k) {
        sel[lane] = mine;
        sel_w[lane] = chosen / (sum + 1e-20f) * wscale;
    }
    /* the grouping (d_group_one's values): offs[e + 1] = slots on experts <= e;
     * slot i is its expert's first if no earlier slot has it */
    bool first = lane < k;
    for (int i = 0; i < k; i++) {
        int v = __shfl_sync(all, mine, i);
        if (i < lane && v == mine) first = false;
    }
    int cnt[ROUTE1_PER_LANE] = {};
    int lower = 0, same_before = 0, rank = 0;
    for (int i = 0; i < k; i++) {
        int v = __shfl_sync(all, mine, i);
        bool f = __shfl_sync(all, first, i);
#pragma unroll
        for (int j = 0; j < ROUTE1_PER_LANE; j++) cnt[j] += v <= lane + WARP * j;
        lower += v < mine;
        same_before += i < lane && v == mine;
        rank += f && v < mine;
    }
#pragma unroll
    for (int j = 0; j < ROUTE1_PER_LANE; j++)
        if (lane + WARP * j < E) o.offs[lane + WARP * j + 1] = cnt[j];
    if (lane == 0) o.offs[0] = 0;
    int na = __popc(__ballot_sync(all, first));   /* experts in use */
    if (lane < k) {
        o.slot_pair[lane] = lower + same_before;
        o.pair_tok[lower + same_before] = 0;
        if (!same_before) o.active[rank] = mine;
    }
    if (lane >= na && lane < min(k, E)) o.active[lane] = -1;
}

/* Groups the n*k (token, slot) pairs by expert: offs[e] (E + 1 entries),
 * the experts in use in order (the rest of active = -1), the token of each
 * grouped pair and the grouped place of each (token, slot). The order of
 * pairs inside an expert's group does not change any result. One block of
 * 1024 threads, E <= 1024. */
__global__ void k_group(const int32_t *sel, int nk, int k, int E, int *offs, int *active,
                        int *pair_tok, int *slot_pair) {
    pdl_begin();
    __shared__ int cnt[1024], sc[1024], act[1024];
    int e = threadIdx.x;
    if (e < E) cnt[e] = 0;
    __syncthreads();
    for (int p = threadIdx.x; p < nk; p += blockDim.x) atomicAdd(&cnt[sel[p]], 1);
    __syncthreads();
    /* inclusive scans of the counts and of the in-use flags */
    int c = e < E ? cnt[e] : 0, u = c > 0;
    sc[e] = c;
    act[e] = u;
    __syncthreads();
    for (int o = 1; o < 1024; o *= 2) {
        int c2 = e >= o ? sc[e - o] : 0, u2 = e >= o ? act[e - o] : 0;
        __syncthreads();
        sc[e] += c2;
        act[e] += u2;
        __syncthreads();
    }
    int start = sc[e] - c;
    int na = act[1023];
    if (e < E) {
        offs[e + 1] = sc[e];
        if (u) active[act[e] - 1] = e;
        cnt[e] = start;   /* now the next free place of e */
    }
    if (e == 0) offs[0] = 0;
    if (e >= na && e < (nk < E ? nk : E)) active[e] = -1;
    __syncthreads();
    for (int p = threadIdx.x; p < nk; p += blockDim.x) {
        int q = atomicAdd(&cnt[sel[p]], 1);
        pair_tok[q] = p / k;
        slot_pair[p] = q;
    }
}

/* SwiGLU with the clamp (§4.4) of one element. */
__device__ __forceinline__ float d_swiglu(float g, float u, float clamp) {
    float gi = fminf(g, clamp), ui = fminf(fmaxf(u, -clamp), clamp);
    return gi * (1.0f / (1.0f + expf(-gi))) * ui;
}

/* SwiGLU in place on g. */
__global__ void k_swiglu(float *g, const float *u, int64_t count, float clamp) {
    pdl_begin();
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= count) return;
    g[i] = d_swiglu(g[i], u[i], clamp);
}

/* SwiGLU in place on g (count a multiple of 256), and its codes (form q8k)
 * for the one-token down product that reads it (qat-q8): a warp 256 elements. */
__global__ void k_swiglu_act8(float *g, const float *u, int64_t count, float clamp, int q8k, act8_out o) {
    pdl_begin();
    int lane = threadIdx.x % WARP;
    int64_t e = ((int64_t)blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP) * 256 + 8 * lane;
    if (e >= count) return;   /* whole warps */
    float4 g0 = *(const float4 *)(g + e), g1 = *(const float4 *)(g + e + 4);
    float4 u0 = *(const float4 *)(u + e), u1 = *(const float4 *)(u + e + 4);
    float v[8] = {d_swiglu(g0.x, u0.x, clamp), d_swiglu(g0.y, u0.y, clamp), d_swiglu(g0.z, u0.z, clamp),
                  d_swiglu(g0.w, u0.w, clamp), d_swiglu(g1.x, u1.x, clamp), d_swiglu(g1.y, u1.y, clamp),
                  d_swiglu(g1.z, u1.z, clamp), d_swiglu(g1.w, u1.w, clamp)};
    *(float4 *)(g + e) = make_float4(v[0], v[1], v[2], v[3]);
    *(float4 *)(g + e + 4) = make_float4(v[4], v[5], v[6], v[7]);
    act8_warp(v, 0xffffffffu, q8k, e, o);
}

/* y = a chunk's MoE output (a decode token's is summed by k_hc_expand;
 * DS4_CUDA_NO_EXPANDMOE=1 brings it here too, for A/B). Grid (D / 4 / 128,
 * tokens): a float4 of token t's columns a thread, as k_hc_expand (no 64-bit
 * division an element). */
__global__ void __launch_bounds__(HC_EXPAND_THREADS) k_combine(moe_out m, int D, float *y) {
    pdl_begin();
    int j = 4 * (blockIdx.x * HC_EXPAND_THREADS + threadIdx.x), t = blockIdx.y;
    if (j >= D) return;
    *(float4 *)(y + (int64_t)t * D + j) = d_moe_out4(m, t, j, D);
}
