/* Compact KV rows in the qat modes (forward-pass.md §6.4): lossless.
 *
 * After the qat step Q1 (§3.8) an attention row's dims [0, nope) are E4M3
 * values times a power of two a block of 64; after Q2 an indexer row is
 * E2M1 values times a power of two a block of 32 (in the Hadamard basis the
 * scores use). So a compressed row is stored as those codes and one
 * exponent byte (UE8M0) a block, the RoPE dims of an attention row as
 * float: a Flash attention row in 720 bytes instead of 2,048 (448 codes,
 * 7 exponents, padding to 16, 64 floats), an indexer row in 68 instead of
 * 512. The writers round as before, then encode; the readers decode to the
 * very floats the float rows held, so every product sees the same bits.
 * exact mode keeps float rows (nothing there is on a grid).
 *
 * Encoding a row that is already on the grid gives its values back: the
 * block's scale is recomputed from the rounded maximum, which lands in
 * (scale / 2, scale] (on scale / 2 the codes double, the same values), and
 * rounding a grid value again changes nothing. So the writers and the host
 * boundary (snapshots keep float rows) share one encoder. */
#pragma once

#include "common.cuh"
#include "qat_round.h"

/* A compact row: `coded` dims as codes (E4M3 a byte, or E2M1 two a byte),
 * then an exponent byte a block, then (attention rows) the rest of the
 * dims as float from byte `head`, 16-aligned; `bytes` a row. */
struct kv_compact {
    int coded, head, bytes;
};

/* Attention rows of d dims, the last rope of them RoPE dims; a decode
 * reads 4 dims at a time, so both parts come in fours. */
static inline bool kv8_fits(int d, int rope) { return (d - rope) % 4 == 0 && rope % 4 == 0; }
static inline kv_compact kv8_layout(int d, int rope) {
    int nope = d - rope, head = (nope + (nope + 63) / 64 + 15) / 16 * 16;   /* codes, exponents, to 16 */
    return kv_compact{nope, head, head + 4 * rope};
}

/* Indexer rows of d dims (a power of two in the qat modes). */
static inline bool kv4_fits(int d) { return d % 8 == 0; }
static inline kv_compact kv4_layout(int d) {
    int bytes = (d / 2 + (d + 31) / 32 + 3) / 4 * 4;   /* code pairs, exponents, to 4 */
    return kv_compact{d, bytes, bytes};
}

/* ---- codes ---- */

/* An E4M3FN code's value: (1 + m/8) 2^(e-7), or m 2^-9 for e = 0. */
__device__ __forceinline__ float e4m3_value(uint32_t b) {
    uint32_t e = (b >> 3) & 15, m = b & 7;
    float mag = e ? __uint_as_float(((e + 120) << 23) | (m << 20)) : (float)m * 0x1p-9f;
    return (b & 0x80) ? -mag : mag;
}

/* The code of y, an E4M3FN value (qat_round_fp8's output). */
__device__ __forceinline__ uint32_t e4m3_code(float y) {
    uint32_t sign = signbit(y) ? 0x80 : 0;
    float a = fabsf(y);
    if (a < 0x1p-6f) return sign | (uint32_t)(a * 512.0f);
    uint32_t u = __float_as_uint(a);
    return sign | (((u >> 23) - 120) << 3) | ((u >> 20) & 7);
}

/* An E2M1 code's value: (1 + m/2) 2^(e-1), or m / 2 for e = 0. */
__device__ __forceinline__ float e2m1_value(uint32_t n) {
    uint32_t e = (n >> 1) & 3, m = n & 1;
    float mag = e ? __uint_as_float(((e + 126) << 23) | (m << 22)) : (float)m * 0.5f;
    return (n & 8) ? -mag : mag;
}

/* The code of y, an E2M1 value (qat_round_fp4's output). */
__device__ __forceinline__ uint32_t e2m1_code(float y) {
    uint32_t sign = signbit(y) ? 8 : 0;
    float a = fabsf(y);
    if (a < 1.0f) return sign | (uint32_t)(a * 2.0f);
    uint32_t u = __float_as_uint(a);
    return sign | (((u >> 23) - 126) << 1) | ((u >> 22) & 1);
}

/* A block scale (a power of two, normal) as its exponent byte, and back. */
__device__ __forceinline__ uint32_t scale_byte(float s) { return __float_as_uint(s) >> 23; }
__device__ __forceinline__ float scale_of(uint32_t e) { return __uint_as_float(e << 23); }

/* ---- reading: dims 4c .. 4c + 3 ---- */

__device__ __forceinline__ float4 kv8_load4(const uint8_t *row, int c, const kv_compact &L) {
    if (4 * c >= L.coded) return ((const float4 *)(row + L.head))[c - L.coded / 4];
    uint32_t w = ((const uint32_t *)row)[c];
    float s = scale_of(row[L.coded + 4 * c / 64]);
    return make_float4(e4m3_value(w & 255) * s, e4m3_value((w >> 8) & 255) * s, e4m3_value((w >> 16) & 255) * s,
                       e4m3_value(w >> 24) * s);
}

__device__ __forceinline__ float4 kv4_load4(const uint8_t *row, int c, const kv_compact &L) {
    uint32_t w = ((const uint16_t *)row)[c];
    float s = scale_of(row[L.coded / 2 + 4 * c / 32]);
    return make_float4(e2m1_value(w & 15) * s, e2m1_value((w >> 4) & 15) * s, e2m1_value((w >> 8) & 15) * s,
                       e2m1_value(w >> 12) * s);
}

/* ---- writing: a block's threads encode one row v (already rounded) ---- */

/* Q1's blocks of 64 (a warp each) as codes, the RoPE dims copied. */
__device__ void kv8_encode(uint8_t *row, const float *v, int d, const kv_compact &L) {
    int lane = threadIdx.x % WARP, nw = blockDim.x / WARP;
    for (int b = threadIdx.x / WARP * 64; b < L.coded; b += nw * 64) {
        int len = L.coded - b < 64 ? L.coded - b : 64;
        float x0 = lane < len ? v[b + lane] : 0.0f, x1 = lane + 32 < len ? v[b + lane + 32] : 0.0f;
        float s = qat_fp8_scale(warp_max(fmaxf(fabsf(x0), fabsf(x1))));
        if (lane < len) row[b + lane] = (uint8_t)e4m3_code(qat_round_fp8(x0 / s));
        if (lane + 32 < len) row[b + lane + 32] = (uint8_t)e4m3_code(qat_round_fp8(x1 / s));
        if (lane == 0) row[L.coded + b / 64] = (uint8_t)scale_byte(s);
    }
    float *tail = (float *)(row + L.head);
    for (int i = threadIdx.x; i < d - L.coded; i += blockDim.x) tail[i] = v[L.coded + i];
}

/* Q2's blocks of 32 (a warp each) as code pairs. */
__device__ void kv4_encode(uint8_t *row, const float *v, const kv_compact &L) {
    int lane = threadIdx.x % WARP, nw = blockDim.x / WARP;
    for (int b = threadIdx.x / WARP * 32; b < L.coded; b += nw * 32) {
        int len = L.coded - b < 32 ? L.coded - b : 32;
        float x = lane < len ? v[b + lane] : 0.0f;
        float s = qat_fp4_scale(warp_max(fabsf(x)));
        uint32_t code = e2m1_code(qat_round_fp4(x / s));
        uint32_t next = __shfl_down_sync(0xffffffffu, code, 1);
        if (lane < len && lane % 2 == 0) row[(b + lane) / 2] = (uint8_t)(code | next << 4);
        if (lane == 0) row[L.coded / 2 + b / 32] = (uint8_t)scale_byte(s);
    }
}

/* ---- whole rows: n rows of d floats <-> compact, a block a row (the host
 * boundary; a chunk's float view) ---- */

__global__ void k_kv_encode(const float *src, uint8_t *dst, int d, kv_compact L, int fp4) {
    pdl_begin();
    const float *v = src + (int64_t)blockIdx.x * d;
    uint8_t *row = dst + (int64_t)blockIdx.x * L.bytes;
    if (fp4) kv4_encode(row, v, L);
    else kv8_encode(row, v, d, L);
}

__global__ void k_kv_decode(const uint8_t *src, float *dst, int d, kv_compact L, int fp4) {
    pdl_begin();
    const uint8_t *row = src + (int64_t)blockIdx.x * L.bytes;
    float4 *out = (float4 *)(dst + (int64_t)blockIdx.x * d);
    for (int c = threadIdx.x; c < d / 4; c += blockDim.x) out[c] = fp4 ? kv4_load4(row, c, L) : kv8_load4(row, c, L);
}
