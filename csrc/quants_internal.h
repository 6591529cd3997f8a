/* Quantization formats: block structs, fp16/bf16 helpers and the kernel
 * signatures shared by quants.c (table, scalar reference, dispatch) and
 * quants_avx2.c (SIMD kernels). Internal: not included from ds4.h.
 *
 * Byte layouts: spec/gguf-layout.md §4. All fields little-endian. The f16
 * fields are kept as raw uint16_t bits. Weight rows from a GGUF file are at
 * least 2-byte aligned (tensor data is 32-byte aligned and every block size
 * is even); Q8_K buffers are 4-byte aligned (they hold a float). */
#ifndef DS4_QUANTS_INTERNAL_H
#define DS4_QUANTS_INTERNAL_H

#include <assert.h>
#include <stdint.h>
#include <string.h>

#include "quants.h"

#define QK8_0 32
#define QK_K 256
#define K_SCALE_SIZE 12

/* Q8_0: x[i] = d * qs[i]. */
typedef struct {
    uint16_t d;          /* f16 scale */
    int8_t qs[QK8_0];
} block_q8_0;
static_assert(sizeof(block_q8_0) == 34, "block_q8_0 size");

/* Q2_K: 16 sub-blocks of 16; x = d*(sc&15)*q - dmin*(sc>>4). */
typedef struct {
    uint8_t scales[QK_K / 16]; /* low nibble scale, high nibble min */
    uint8_t qs[QK_K / 4];      /* 2-bit quants, 4 per byte */
    uint16_t d;                /* f16 super-scale of the scales */
    uint16_t dmin;             /* f16 super-scale of the mins */
} block_q2_K;
static_assert(sizeof(block_q2_K) == 84, "block_q2_K size");

/* Q4_K: 8 sub-blocks of 32 with 6-bit scales and mins. */
typedef struct {
    uint16_t d;
    uint16_t dmin;
    uint8_t scales[K_SCALE_SIZE];
    uint8_t qs[QK_K / 2];      /* 4-bit quants: chunk c of 64 = low|high nibbles of qs[32c..32c+31] */
} block_q4_K;
static_assert(sizeof(block_q4_K) == 144, "block_q4_K size");

/* IQ2_XXS: 8 sub-blocks of 32; per sub-block 4 grid indices (bytes) and a u32
 * holding 4 x 7-bit sign indices and a 4-bit scale. */
typedef struct {
    uint16_t d;
    uint16_t qs[QK_K / 8];
} block_iq2_xxs;
static_assert(sizeof(block_iq2_xxs) == 66, "block_iq2_xxs size");

/* Q8_K (activations only): x[i] = d * qs[i]; bsums[j] = sum of qs[16j..16j+15]. */
typedef struct {
    float d;
    int8_t qs[QK_K];
    int16_t bsums[QK_K / 16];
} block_q8_K;
static_assert(sizeof(block_q8_K) == 292, "block_q8_K size");

/* ---- scalar conversions ---------------------------------------------- */

static inline uint32_t fp32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static inline float fp32_from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Exact binary16 -> binary32: subnormals become normal floats, inf stays
 * inf, NaN keeps its sign and payload (shifted up 13 bits, not quieted),
 * exactly as numpy's float16 -> float32 cast. */
static inline float fp16_to_fp32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1fu;
    const uint32_t mant = h & 0x3ffu;
    if (exp == 0x1f) return fp32_from_bits(sign | 0x7f800000u | (mant << 13));
    if (exp != 0) return fp32_from_bits(sign | ((exp + 112) << 23) | (mant << 13));
    if (mant == 0) return fp32_from_bits(sign);
    /* subnormal: mant * 2^-24, exact in float32 */
    const float v = (float)mant * 0x1p-24f;
    return sign ? -v : v;
}

/* binary32 -> binary16, round to nearest even; overflow gives inf; NaN keeps
 * sign and the top 10 payload bits (forced non-zero), as numpy does. */
static inline uint16_t fp32_to_fp16(float f) {
    const uint32_t x = fp32_bits(f);
    const uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    const uint32_t ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) {                      /* inf or NaN */
        if (ax == 0x7f800000u) return sign | 0x7c00u;
        uint16_t m = (uint16_t)((ax & 0x7fffffu) >> 13);
        return sign | 0x7c00u | (m ? m : 1u);
    }
    if (ax >= 0x477ff000u) return sign | 0x7c00u; /* >= 65520 rounds to inf */
    if (ax < 0x38800000u) {                       /* below 2^-14: half subnormal or 0 */
        if (ax <= 0x33000000u) return sign;       /* <= 2^-25 (tie goes to even 0) */
        const uint32_t e = ax >> 23;              /* 102..112 */
        const uint32_t m = (ax & 0x7fffffu) | 0x800000u;
        const uint32_t shift = 126 - e;           /* units of 2^-24 */
        uint32_t r = m >> shift;
        const uint32_t rem = m & ((1u << shift) - 1);
        const uint32_t half = 1u << (shift - 1);
        if (rem > half || (rem == half && (r & 1))) r++;
        return sign | (uint16_t)r;
    }
    uint32_t h = (((ax >> 23) - 112) << 10) | ((ax & 0x7fffffu) >> 13);
    const uint32_t rem = ax & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1))) h++; /* carry may bump the exponent */
    return sign | (uint16_t)h;
}

static inline float bf16_to_fp32(uint16_t h) {
    return fp32_from_bits((uint32_t)h << 16);
}

/* Field readers that do not assume alignment. */
static inline uint16_t rd_u16(const void *p) {
    uint16_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline uint32_t rd_u32(const void *p) {
    uint32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* Q4_K: 6-bit (scale, min) of sub-block j (0..7). */
static inline void q4k_scale_min(int j, const uint8_t *s, uint8_t *sc, uint8_t *m) {
    if (j < 4) {
        *sc = s[j] & 63;
        *m = s[j + 4] & 63;
    } else {
        *sc = (uint8_t)((s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4));
        *m = (uint8_t)((s[j + 4] >> 4) | ((s[j] >> 6) << 4));
    }
}

/* ---- kernels ----------------------------------------------------------
 * A row kernel computes one dot product of n elements (n a whole number of
 * the weight type's blocks, and of 256 for the q8_k kernels). */
typedef float (*ds4_dot_f32_fn)(const void *w, const float *x, int64_t n);
typedef float (*ds4_dot_q8k_fn)(const void *w, const void *xq, int64_t n);
/* One row against two tokens' float activations: out[t] is ds4_dot_f32_fn's
 * result for x_t, bit for bit. */
typedef void (*ds4_dot2_f32_fn)(const void *w, const float *x0, const float *x1, int64_t n, float out[2]);
typedef void (*ds4_dot2_q8k_fn)(const void *w, const void *xq0, const void *xq1, int64_t n, float out[2]);

/* -DDS4_NO_SIMD builds the portable scalar path only (as on non-x86 hosts). */
#if !defined(DS4_NO_SIMD) && (defined(__x86_64__) || defined(__i386__)) && \
    (defined(__GNUC__) || defined(__clang__))
#define DS4_HAVE_AVX2 1

/* quants_avx2.c: NULL when the type has no AVX2 kernel. */
ds4_dot_f32_fn ds4_avx2_dot_f32_kernel(int type);
ds4_dot_q8k_fn ds4_avx2_dot_q8k_kernel(int type);
ds4_dot2_f32_fn ds4_avx2_dot2_f32_kernel(int type);
float ds4_avx2_dot_q8_0_q8_0(const void *w, const void *xq, int64_t n);
ds4_dot2_q8k_fn ds4_avx2_dot2_q8k_kernel(int type);
void ds4_avx2_dot2_q8_0_q8_0(const void *w, const void *xq0, const void *xq1, int64_t n, float out[2]);
#endif

#endif
