/* Quantization formats: type table, scalar reference dequantizers, Q8_K
 * activation quantization, scalar dot kernels, SIMD dispatch and matvec.
 * The AVX2 kernels are in quants_avx2.c.
 *
 * Float evaluation order. The dequantizers reproduce gguf-py's numpy code
 * operation for operation, in float32, so that their output is identical
 * bit for bit (see the comment on each one). This relies on the compiler not
 * contracting a*b - c into an FMA: ISO C mode (-std=c11) makes GCC default
 * to -ffp-contract=off, this file is not compiled for an FMA target, and
 * clang is told so below. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "iq2_tables.h"
#include "qat_round.h"
#include "quants.h"
#include "quants_internal.h"

#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

/* ======================================================================
 * Type table
 * ====================================================================== */

struct type_info {
    int type;
    const char *name;
    int64_t block_elems;
    int64_t block_bytes;
};

static const struct type_info TYPES[] = {
    {DS4_TYPE_F32, "F32", 1, 4},
    {DS4_TYPE_F16, "F16", 1, 2},
    {DS4_TYPE_Q8_0, "Q8_0", 32, 34},
    {DS4_TYPE_Q2_K, "Q2_K", 256, 84},
    {DS4_TYPE_Q4_K, "Q4_K", 256, 144},
    {DS4_TYPE_Q8_K, "Q8_K", 256, 292},
    {DS4_TYPE_IQ2_XXS, "IQ2_XXS", 256, 66},
    {DS4_TYPE_I32, "I32", 1, 4},
    {DS4_TYPE_BF16, "BF16", 1, 2},
};

static const struct type_info *type_info(int type) {
    for (size_t i = 0; i < sizeof(TYPES) / sizeof(TYPES[0]); i++)
        if (TYPES[i].type == type) return &TYPES[i];
    return NULL;
}

int64_t ds4_type_block_elems(int type) {
    const struct type_info *t = type_info(type);
    return t ? t->block_elems : 0;
}

int64_t ds4_type_block_bytes(int type) {
    const struct type_info *t = type_info(type);
    return t ? t->block_bytes : 0;
}

const char *ds4_type_name(int type) {
    const struct type_info *t = type_info(type);
    return t ? t->name : "unknown";
}

int64_t ds4_type_nbytes(int type, int64_t n) {
    const struct type_info *t = type_info(type);
    if (!t || n < 0 || n % t->block_elems) return -1;
    return n / t->block_elems * t->block_bytes;
}

/* ======================================================================
 * Conversions and tables
 * ====================================================================== */

float ds4_fp16_to_fp32(uint16_t h) { return fp16_to_fp32(h); }
float ds4_bf16_to_fp32(uint16_t h) { return bf16_to_fp32(h); }
uint16_t ds4_fp32_to_fp16(float f) { return fp32_to_fp16(f); }

void ds4_fp16_to_fp32_row(const uint16_t *src, float *dst, int64_t n) {
    for (int64_t i = 0; i < n; i++) dst[i] = fp16_to_fp32(src[i]);
}

void ds4_fp32_to_fp16_row(const float *src, uint16_t *dst, int64_t n) {
    for (int64_t i = 0; i < n; i++) dst[i] = fp32_to_fp16(src[i]);
}

const uint64_t *ds4_iq2xxs_grid(void) { return iq2xxs_grid; }
const uint8_t *ds4_iq2xxs_ksigns(void) { return ksigns_iq2xs; }

/* ======================================================================
 * Dequantization (scalar reference, bit-exact with gguf-py)
 * ====================================================================== */

static void dequantize_f32(const void *src, float *y, int64_t n) {
    memcpy(y, src, (size_t)n * sizeof(float));
}

static void dequantize_f16(const void *src, float *y, int64_t n) {
    const uint8_t *p = src;
    for (int64_t i = 0; i < n; i++) y[i] = fp16_to_fp32(rd_u16(p + 2 * i));
}

/* gguf-py: (int16 << 16).view(float32): the bits, no NaN quieting. */
static void dequantize_bf16(const void *src, float *y, int64_t n) {
    const uint8_t *p = src;
    for (int64_t i = 0; i < n; i++) y[i] = bf16_to_fp32(rd_u16(p + 2 * i));
}

/* gguf-py: x.astype(f32) * d. */
static void dequantize_q8_0(const void *src, float *y, int64_t nb) {
    const block_q8_0 *x = src;
    for (int64_t i = 0; i < nb; i++) {
        const float d = fp16_to_fp32(x[i].d);
        for (int l = 0; l < QK8_0; l++) y[l] = (float)x[i].qs[l] * d;
        y += QK8_0;
    }
}

/* gguf-py: dl = d*sc and ml = dmin*m first (float32), then dl*q - ml. */
static void dequantize_q2_K(const void *src, float *y, int64_t nb) {
    const block_q2_K *x = src;
    for (int64_t i = 0; i < nb; i++) {
        const float d = fp16_to_fp32(x[i].d);
        const float dmin = fp16_to_fp32(x[i].dmin);
        for (int n = 0; n < 2; n++) {
            const uint8_t *q = x[i].qs + 32 * n;
            for (int s = 0; s < 4; s++) {
                for (int h = 0; h < 2; h++) {
                    const uint8_t sc = x[i].scales[8 * n + 2 * s + h];
                    const float dl = d * (float)(sc & 0xf);
                    const float ml = dmin * (float)(sc >> 4);
                    float *out = y + 128 * n + 32 * s + 16 * h;
                    for (int l = 0; l < 16; l++)
                        out[l] = dl * (float)((q[16 * h + l] >> (2 * s)) & 3) - ml;
                }
            }
        }
        y += QK_K;
    }
}

/* gguf-py: d*sc and dmin*m first, then (d*sc)*q - dmin*m. */
static void dequantize_q4_K(const void *src, float *y, int64_t nb) {
    const block_q4_K *x = src;
    for (int64_t i = 0; i < nb; i++) {
        const float d = fp16_to_fp32(x[i].d);
        const float dmin = fp16_to_fp32(x[i].dmin);
        for (int c = 0; c < 4; c++) {
            uint8_t sc, m;
            q4k_scale_min(2 * c, x[i].scales, &sc, &m);
            const float d1 = d * (float)sc, m1 = dmin * (float)m;
            q4k_scale_min(2 * c + 1, x[i].scales, &sc, &m);
            const float d2 = d * (float)sc, m2 = dmin * (float)m;
            const uint8_t *q = x[i].qs + 32 * c;
            for (int l = 0; l < 32; l++) y[64 * c + l] = d1 * (float)(q[l] & 0xf) - m1;
            for (int l = 0; l < 32; l++) y[64 * c + 32 + l] = d2 * (float)(q[l] >> 4) - m2;
        }
        y += QK_K;
    }
}

/* Sign factor of bit j of a ksigns byte; a table lookup, not a branch
 * (the bits are random, a branch would mispredict half the time). */
static const float iq2_sign[2] = {1.0f, -1.0f};

/* gguf-py: db = d * (0.5 + ls) * 0.25 evaluated left to right (the final
 * *0.25 is not exact when the product is subnormal), then db*grid*sign. */
static void dequantize_iq2_xxs(const void *src, float *y, int64_t nb) {
    const block_iq2_xxs *x = src;
    for (int64_t i = 0; i < nb; i++) {
        const float d = fp16_to_fp32(x[i].d);
        const uint8_t *qs = (const uint8_t *)x[i].qs;
        for (int ib = 0; ib < QK_K / 32; ib++) {
            const uint32_t a0 = rd_u32(qs + 8 * ib);
            const uint32_t a1 = rd_u32(qs + 8 * ib + 4);
            const float db = d * (0.5f + (float)(a1 >> 28)) * 0.25f;
            for (int k = 0; k < 4; k++) {
                const uint64_t grid = iq2xxs_grid[(a0 >> (8 * k)) & 0xff];
                const uint8_t signs = ksigns_iq2xs[(a1 >> (7 * k)) & 127];
                for (int j = 0; j < 8; j++) {
                    const float g = (float)((grid >> (8 * j)) & 0xff);
                    y[8 * k + j] = db * g * iq2_sign[(signs >> j) & 1];
                }
            }
            y += 32;
        }
    }
}

static void dequantize_q8_K(const void *src, float *y, int64_t nb) {
    const block_q8_K *x = src;
    for (int64_t i = 0; i < nb; i++) {
        for (int l = 0; l < QK_K; l++) y[l] = x[i].d * (float)x[i].qs[l];
        y += QK_K;
    }
}

/* Dequantize nb blocks (elements for F32/F16/BF16); -1 for other types. */
static int dequantize_blocks(int type, const void *src, float *y, int64_t nb) {
    switch (type) {
    case DS4_TYPE_F32: dequantize_f32(src, y, nb); return 0;
    case DS4_TYPE_F16: dequantize_f16(src, y, nb); return 0;
    case DS4_TYPE_BF16: dequantize_bf16(src, y, nb); return 0;
    case DS4_TYPE_Q8_0: dequantize_q8_0(src, y, nb); return 0;
    case DS4_TYPE_Q2_K: dequantize_q2_K(src, y, nb); return 0;
    case DS4_TYPE_Q4_K: dequantize_q4_K(src, y, nb); return 0;
    case DS4_TYPE_IQ2_XXS: dequantize_iq2_xxs(src, y, nb); return 0;
    case DS4_TYPE_Q8_K: dequantize_q8_K(src, y, nb); return 0;
    default: return -1;
    }
}

int ds4_dequantize(int type, const void *src, float *dst, int64_t n) {
    const int64_t be = ds4_type_block_elems(type);
    if (be == 0 || n < 0 || n % be) return -1;
    if (n == 0) return 0;
    return dequantize_blocks(type, src, dst, n / be);
}

/* ======================================================================
 * Q8_K activation quantization (ggml quantize_row_q8_K_ref)
 * ====================================================================== */

int64_t ds4_q8_k_nbytes(int64_t n) { return ds4_type_nbytes(DS4_TYPE_Q8_K, n); }

int ds4_quantize_q8_k(const float *x, void *dst, int64_t n) {
    if (n < 0 || n % QK_K) return -1;
    block_q8_K *y = dst;
    for (int64_t i = 0; i < n / QK_K; i++, x += QK_K) {
        float max = 0, amax = 0;
        for (int j = 0; j < QK_K; j++) {
            const float ax = fabsf(x[j]);
            if (ax > amax) {
                amax = ax;
                max = x[j];
            }
        }
        /* qat_round.h's rule (CUDA's k_act8 uses the same): a zero block, or
         * |max| < 127/FLT_MAX (iscale overflows), is all 0 */
        float iscale;
        const float d = act8_q8_k_scale(max, &iscale);
        for (int j = 0; j < QK_K; j++) {
            const float v = act8_q8_k_code(x[j], iscale);
            y[i].qs[j] = (int8_t)(v >= -128.0f ? (int)v : -128);   /* an infinite input: no UB */
        }
        for (int j = 0; j < QK_K / 16; j++) {
            int sum = 0;
            for (int l = 0; l < 16; l++) sum += y[i].qs[16 * j + l];
            y[i].bsums[j] = (int16_t)sum;
        }
        y[i].d = d;
    }
    return 0;
}

int ds4_quantize_q8_0(const float *x, void *dst, int64_t n) {
    if (n < 0 || n % QK8_0) return -1;
    block_q8_0 *y = dst;
    for (int64_t i = 0; i < n / QK8_0; i++, x += QK8_0) {
        float amax = 0, inv;
        for (int j = 0; j < QK8_0; j++) amax = fmaxf(amax, fabsf(x[j]));
        y[i].d = fp32_to_fp16(act8_q8_0_scale(amax, &inv));   /* already an fp16 value */
        for (int j = 0; j < QK8_0; j++) y[i].qs[j] = (int8_t)act8_q8_0_code(x[j], inv);
    }
    return 0;
}

/* ======================================================================
 * Dot products, float32 activations
 * ====================================================================== */

/* Reference: exact dequantization, products accumulated in double. */
float ds4_vec_dot_f32_ref(int type, const void *w, const float *x, int64_t n) {
    const int64_t be = ds4_type_block_elems(type);
    const int64_t bb = ds4_type_block_bytes(type);
    if (be == 0 || type == DS4_TYPE_Q8_K || type == DS4_TYPE_I32 || n < 0 || n % be)
        return NAN;
    float tmp[QK_K];
    const int64_t chunk = QK_K / be * be; /* a whole number of blocks, <= 256 */
    double sum = 0;
    for (int64_t i = 0; i < n; i += chunk) {
        const int64_t m = n - i < chunk ? n - i : chunk;
        dequantize_blocks(type, (const uint8_t *)w + i / be * bb, tmp, m / be);
        for (int64_t l = 0; l < m; l++) sum += (double)tmp[l] * (double)x[i + l];
    }
    return (float)sum;
}

/* Scalar fast path: float accumulation in 8 interleaved partial sums. */
static float dot_f32_f32_scalar(const float *a, const float *x, int64_t n) {
    float s[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++) s[k] += a[i + k] * x[i + k];
    float sum = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
    for (; i < n; i++) sum += a[i] * x[i];
    return sum;
}

static float kern_f32_scalar(const void *w, const float *x, int64_t n) {
    return dot_f32_f32_scalar(w, x, n);
}

/* Any other type: dequantize 256 elements at a time, then float dot. */
#define DEFINE_SCALAR_DOT_F32(NAME, TYPE, BLOCK_ELEMS, BLOCK_BYTES)              \
    static float NAME(const void *w, const float *x, int64_t n) {               \
        float tmp[QK_K];                                                        \
        const int64_t chunk = QK_K / (BLOCK_ELEMS) * (BLOCK_ELEMS);             \
        float sum = 0;                                                          \
        for (int64_t i = 0; i < n; i += chunk) {                                \
            const int64_t m = n - i < chunk ? n - i : chunk;                    \
            dequantize_blocks(TYPE, (const uint8_t *)w + i / (BLOCK_ELEMS) * (BLOCK_BYTES), \
                              tmp, m / (BLOCK_ELEMS));                          \
            sum += dot_f32_f32_scalar(tmp, x + i, m);                           \
        }                                                                       \
        return sum;                                                             \
    }

DEFINE_SCALAR_DOT_F32(kern_bf16_scalar, DS4_TYPE_BF16, 1, 2)
DEFINE_SCALAR_DOT_F32(kern_q8_0_scalar, DS4_TYPE_Q8_0, 32, 34)
DEFINE_SCALAR_DOT_F32(kern_q2_K_scalar, DS4_TYPE_Q2_K, 256, 84)
DEFINE_SCALAR_DOT_F32(kern_q4_K_scalar, DS4_TYPE_Q4_K, 256, 144)

/* Branch-free binary16 -> binary32 (exact for every finite value and inf;
 * NaN stays NaN but may be quieted), written with masks instead of
 * branches so that the compiler can vectorize the loop below. */
static inline float fp16_to_fp32_fast(uint16_t h) {
    const uint32_t w = (uint32_t)h << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    /* normal / inf / NaN: move the exponent and mantissa into place, rebias by 2^-112 */
    const float normalized = fp32_from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    /* subnormal: mantissa as the low bits of 0.5's significand, minus 0.5 */
    const float denormalized = fp32_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
    const uint32_t is_denormal = 0u - (uint32_t)(two_w < (1u << 27)); /* all ones or 0 */
    return fp32_from_bits(sign | (fp32_bits(denormalized) & is_denormal) |
                          (fp32_bits(normalized) & ~is_denormal));
}

static float kern_f16_scalar(const void *w, const float *x, int64_t n) {
    const uint8_t *a = w;
    float s[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++) s[k] += fp16_to_fp32_fast(rd_u16(a + 2 * (i + k))) * x[i + k];
    float sum = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
    for (; i < n; i++) sum += fp16_to_fp32_fast(rd_u16(a + 2 * i)) * x[i];
    return sum;
}

/* IQ2_XXS: signed grid magnitudes times x per sub-block, then times db. */
static float kern_iq2_xxs_scalar(const void *w, const float *x, int64_t n) {
    const block_iq2_xxs *b = w;
    float sum = 0;
    for (int64_t i = 0; i < n / QK_K; i++) {
        const float d = fp16_to_fp32(b[i].d);
        const uint8_t *qs = (const uint8_t *)b[i].qs;
        for (int ib = 0; ib < QK_K / 32; ib++, x += 32) {
            const uint32_t a0 = rd_u32(qs + 8 * ib);
            const uint32_t a1 = rd_u32(qs + 8 * ib + 4);
            const float db = d * (0.5f + (float)(a1 >> 28)) * 0.25f;
            float sb[4] = {0};
            for (int k = 0; k < 4; k++) {
                const uint64_t g = iq2xxs_grid[(a0 >> (8 * k)) & 0xff];
                const uint8_t signs = ksigns_iq2xs[(a1 >> (7 * k)) & 127];
                for (int j = 0; j < 8; j++)
                    sb[k] += (float)((g >> (8 * j)) & 0xff) * iq2_sign[(signs >> j) & 1] * x[8 * k + j];
            }
            sum += db * ((sb[0] + sb[1]) + (sb[2] + sb[3]));
        }
    }
    return sum;
}

static ds4_dot_f32_fn scalar_dot_f32_kernel(int type) {
    switch (type) {
    case DS4_TYPE_F32: return kern_f32_scalar;
    case DS4_TYPE_F16: return kern_f16_scalar;
    case DS4_TYPE_BF16: return kern_bf16_scalar;
    case DS4_TYPE_Q8_0: return kern_q8_0_scalar;
    case DS4_TYPE_Q2_K: return kern_q2_K_scalar;
    case DS4_TYPE_Q4_K: return kern_q4_K_scalar;
    case DS4_TYPE_IQ2_XXS: return kern_iq2_xxs_scalar;
    default: return NULL;
    }
}

/* ======================================================================
 * Dot products, Q8_K activations: scalar integer kernels (the reference)
 * ====================================================================== */

/* Q8_0 weights (32 per scale) against Q8_K (256 per scale):
 * sum over Q8_K blocks of y.d * sum_b (d_b * isum_b). */
static float dot_q8_0_q8_K_ref(const void *w, const void *xq, int64_t n) {
    const block_q8_0 *x = w;
    const block_q8_K *y = xq;
    float sumf = 0;
    for (int64_t i = 0; i < n / QK_K; i++) {
        float s = 0;
        for (int b = 0; b < QK_K / QK8_0; b++) {
            const block_q8_0 *xb = &x[i * (QK_K / QK8_0) + b];
            const int8_t *q8 = y[i].qs + QK8_0 * b;
            int isum = 0;
            for (int l = 0; l < QK8_0; l++) isum += xb->qs[l] * q8[l];
            s += fp16_to_fp32(xb->d) * (float)isum;
        }
        sumf += y[i].d * s;
    }
    return sumf;
}

/* Q8_0 x Q8_0: sum over blocks of d_w d_x sum(q_w q_x). */
static float dot_q8_0_q8_0_ref(const void *w, const void *xq, int64_t n) {
    const block_q8_0 *x = w, *y = xq;
    float sumf = 0;
    for (int64_t i = 0; i < n / QK8_0; i++) {
        int isum = 0;
        for (int l = 0; l < QK8_0; l++) isum += x[i].qs[l] * y[i].qs[l];
        sumf += fp16_to_fp32(x[i].d) * fp16_to_fp32(y[i].d) * (float)isum;
    }
    return sumf;
}

/* Q2_K: y.d*d * sum_j sc_j * sum(q*q8) - y.d*dmin * sum_j m_j * bsums_j. */
static float dot_q2_K_q8_K_ref(const void *w, const void *xq, int64_t n) {
    const block_q2_K *x = w;
    const block_q8_K *y = xq;
    float sumf = 0;
    for (int64_t i = 0; i < n / QK_K; i++) {
        int summs = 0;
        for (int j = 0; j < 16; j++) summs += (x[i].scales[j] >> 4) * y[i].bsums[j];
        const float dall = y[i].d * fp16_to_fp32(x[i].d);
        const float dmin = y[i].d * fp16_to_fp32(x[i].dmin);
        int isum = 0;
        for (int n2 = 0; n2 < 2; n2++) {
            const uint8_t *q2 = x[i].qs + 32 * n2;
            for (int s = 0; s < 4; s++) {
                const int8_t *q8 = y[i].qs + 128 * n2 + 32 * s;
                for (int h = 0; h < 2; h++) {
                    int isuml = 0;
                    for (int l = 0; l < 16; l++)
                        isuml += q8[16 * h + l] * ((q2[16 * h + l] >> (2 * s)) & 3);
                    isum += (x[i].scales[8 * n2 + 2 * s + h] & 0xf) * isuml;
                }
            }
        }
        sumf += dall * (float)isum - dmin * (float)summs;
    }
    return sumf;
}

/* Q4_K: y.d*d * sum_j sc_j * sum(q*q8) - y.d*dmin * sum_j m_j * (bsums pair j). */
static float dot_q4_K_q8_K_ref(const void *w, const void *xq, int64_t n) {
    const block_q4_K *x = w;
    const block_q8_K *y = xq;
    float sumf = 0;
    for (int64_t i = 0; i < n / QK_K; i++) {
        int sumi = 0, sumi_mins = 0;
        for (int j = 0; j < 8; j++) {
            uint8_t sc, m;
            q4k_scale_min(j, x[i].scales, &sc, &m);
            const uint8_t *q4 = x[i].qs + 32 * (j / 2);
            const int8_t *q8 = y[i].qs + 32 * j;
            const int shift = 4 * (j & 1);
            int isum = 0;
            for (int l = 0; l < 32; l++) isum += ((q4[l] >> shift) & 0xf) * q8[l];
            sumi += sc * isum;
            sumi_mins += m * (y[i].bsums[2 * j] + y[i].bsums[2 * j + 1]);
        }
        const float d = y[i].d * fp16_to_fp32(x[i].d);
        const float dmin = y[i].d * fp16_to_fp32(x[i].dmin);
        sumf += d * (float)sumi - dmin * (float)sumi_mins;
    }
    return sumf;
}

/* IQ2_XXS: db = d*(0.5+ls)/4 = d*(2*ls+1)/8, so sum integer
 * (2*ls+1)*sum(grid*sign*q8) and scale by d*y.d/8 at the end. */
static float dot_iq2_xxs_q8_K_ref(const void *w, const void *xq, int64_t n) {
    const block_iq2_xxs *x = w;
    const block_q8_K *y = xq;
    float sumf = 0;
    for (int64_t i = 0; i < n / QK_K; i++) {
        const float d = fp16_to_fp32(x[i].d) * y[i].d;
        const uint8_t *qs = (const uint8_t *)x[i].qs;
        const int8_t *q8 = y[i].qs;
        int bsum = 0;
        for (int ib = 0; ib < QK_K / 32; ib++) {
            const uint32_t a0 = rd_u32(qs + 8 * ib);
            const uint32_t a1 = rd_u32(qs + 8 * ib + 4);
            const int ls = 2 * (int)(a1 >> 28) + 1;
            int sumi = 0;
            for (int k = 0; k < 4; k++) {
                const uint64_t grid = iq2xxs_grid[(a0 >> (8 * k)) & 0xff];
                const uint8_t signs = ksigns_iq2xs[(a1 >> (7 * k)) & 127];
                for (int j = 0; j < 8; j++) {
                    const int g = (int)((grid >> (8 * j)) & 0xff);
                    sumi += g * q8[j] * (1 - 2 * ((signs >> j) & 1));
                }
                q8 += 8;
            }
            bsum += sumi * ls;
        }
        sumf += d * (float)bsum;
    }
    return 0.125f * sumf;
}

static ds4_dot_q8k_fn scalar_dot_q8k_kernel(int type) {
    switch (type) {
    case DS4_TYPE_Q8_0: return dot_q8_0_q8_K_ref;
    case DS4_TYPE_Q2_K: return dot_q2_K_q8_K_ref;
    case DS4_TYPE_Q4_K: return dot_q4_K_q8_K_ref;
    case DS4_TYPE_IQ2_XXS: return dot_iq2_xxs_q8_K_ref;
    default: return NULL;
    }
}

/* ======================================================================
 * SIMD dispatch
 * ====================================================================== */

static int detect_simd_level(void) {
#ifdef DS4_HAVE_AVX2
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c"))
        return 1;
#endif
    return 0;
}

static int g_level_max = -1; /* -1: not detected yet */
static int g_level = -1;     /* -1: use g_level_max */

int ds4_simd_level_max(void) {
    int m = __atomic_load_n(&g_level_max, __ATOMIC_RELAXED);
    if (m < 0) {
        m = detect_simd_level();
        __atomic_store_n(&g_level_max, m, __ATOMIC_RELAXED);
    }
    return m;
}

int ds4_simd_level(void) {
    const int l = __atomic_load_n(&g_level, __ATOMIC_RELAXED);
    return l < 0 ? ds4_simd_level_max() : l;
}

void ds4_set_simd_level(int level) {
    const int m = ds4_simd_level_max();
    if (level < 0) level = 0;
    if (level > m) level = m;
    __atomic_store_n(&g_level, level, __ATOMIC_RELAXED);
}

static ds4_dot_f32_fn pick_dot_f32(int type) {
#ifdef DS4_HAVE_AVX2
    if (ds4_simd_level() >= 1) {
        ds4_dot_f32_fn f = ds4_avx2_dot_f32_kernel(type);
        if (f) return f;
    }
#endif
    return scalar_dot_f32_kernel(type);
}

static ds4_dot_q8k_fn pick_dot_q8k(int type) {
#ifdef DS4_HAVE_AVX2
    if (ds4_simd_level() >= 1) {
        ds4_dot_q8k_fn f = ds4_avx2_dot_q8k_kernel(type);
        if (f) return f;
    }
#endif
    return scalar_dot_q8k_kernel(type);
}

/* ======================================================================
 * Public dot / matvec entry points
 * ====================================================================== */

static int valid_f32_args(int type, int64_t n) {
    return scalar_dot_f32_kernel(type) != NULL && ds4_type_nbytes(type, n) >= 0;
}

static int valid_q8k_args(int type, int64_t n) {
    return scalar_dot_q8k_kernel(type) != NULL && n >= 0 && n % QK_K == 0;
}

float ds4_vec_dot_f32(int type, const void *w, const float *x, int64_t n) {
    if (!valid_f32_args(type, n)) return NAN;
    return n ? pick_dot_f32(type)(w, x, n) : 0.0f;
}

int ds4_vec_dot2_f32(int type, const void *w, const float *x0, const float *x1, int64_t n, float *out) {
    if (!valid_f32_args(type, n)) {
        out[0] = out[1] = NAN;
        return -1;
    }
    if (n == 0) {
        out[0] = out[1] = 0.0f;
        return 0;
    }
#ifdef DS4_HAVE_AVX2
    if (ds4_simd_level() >= 1) {
        ds4_dot2_f32_fn f = ds4_avx2_dot2_f32_kernel(type);
        if (f) {
            f(w, x0, x1, n, out);
            return 0;
        }
    }
#endif
    const ds4_dot_f32_fn dot = pick_dot_f32(type);
    out[0] = dot(w, x0, n);
    out[1] = dot(w, x1, n);
    return 0;
}

float ds4_vec_dot_q8_k(int type, const void *w, const void *xq, int64_t n) {
    if (!valid_q8k_args(type, n)) return NAN;
    return n ? pick_dot_q8k(type)(w, xq, n) : 0.0f;
}

float ds4_vec_dot_q8_0_q8_0(const void *w, const void *xq, int64_t n) {
    if (n < 0 || n % QK8_0) return NAN;
#ifdef DS4_HAVE_AVX2
    if (ds4_simd_level() >= 1) return ds4_avx2_dot_q8_0_q8_0(w, xq, n);
#endif
    return dot_q8_0_q8_0_ref(w, xq, n);
}

int ds4_vec_dot2_q8_k(int type, const void *w, const void *xq0, const void *xq1, int64_t n, float *out) {
    if (!valid_q8k_args(type, n)) {
        out[0] = out[1] = NAN;
        return -1;
    }
    if (n == 0) {
        out[0] = out[1] = 0.0f;
        return 0;
    }
#ifdef DS4_HAVE_AVX2
    if (ds4_simd_level() >= 1) {
        ds4_dot2_q8k_fn f = ds4_avx2_dot2_q8k_kernel(type);
        if (f) {
            f(w, xq0, xq1, n, out);
            return 0;
        }
    }
#endif
    const ds4_dot_q8k_fn dot = pick_dot_q8k(type);
    out[0] = dot(w, xq0, n);
    out[1] = dot(w, xq1, n);
    return 0;
}

int ds4_vec_dot2_q8_0_q8_0(const void *w, const void *xq0, const void *xq1, int64_t n, float *out) {
    if (n < 0 || n % QK8_0) {
        out[0] = out[1] = NAN;
        return -1;
    }
#ifdef DS4_HAVE_AVX2
    if (ds4_simd_level() >= 1) {
        ds4_avx2_dot2_q8_0_q8_0(w, xq0, xq1, n, out);
        return 0;
    }
#endif
    out[0] = dot_q8_0_q8_0_ref(w, xq0, n);
    out[1] = dot_q8_0_q8_0_ref(w, xq1, n);
    return 0;
}

float ds4_vec_dot_q8_0_q8_0_ref(const void *w, const void *xq, int64_t n) {
    if (n < 0 || n % QK8_0) return NAN;
    return dot_q8_0_q8_0_ref(w, xq, n);
}

float ds4_vec_dot_q8_k_ref(int type, const void *w, const void *xq, int64_t n) {
    if (!valid_q8k_args(type, n)) return NAN;
    return n ? scalar_dot_q8k_kernel(type)(w, xq, n) : 0.0f;
}

int ds4_matvec_f32_rows(int type, const void *w, int64_t n, const float *x,
                        float *y, int64_t row_begin, int64_t row_end) {
    if (!valid_f32_args(type, n) || row_begin < 0 || row_end < row_begin) return -1;
    const int64_t row_bytes = ds4_type_nbytes(type, n);
    if (n == 0) {
        for (int64_t r = row_begin; r < row_end; r++) y[r] = 0.0f;
        return 0;
    }
    const ds4_dot_f32_fn dot = pick_dot_f32(type);
    for (int64_t r = row_begin; r < row_end; r++)
        y[r] = dot((const uint8_t *)w + r * row_bytes, x, n);
    return 0;
}

int ds4_matvec_q8_k_rows(int type, const void *w, int64_t n, const void *xq,
                         float *y, int64_t row_begin, int64_t row_end) {
    if (!valid_q8k_args(type, n) || row_begin < 0 || row_end < row_begin) return -1;
    const int64_t row_bytes = ds4_type_nbytes(type, n);
    if (n == 0) {
        for (int64_t r = row_begin; r < row_end; r++) y[r] = 0.0f;
        return 0;
    }
    const ds4_dot_q8k_fn dot = pick_dot_q8k(type);
    for (int64_t r = row_begin; r < row_end; r++)
        y[r] = dot((const uint8_t *)w + r * row_bytes, xq, n);
    return 0;
}

int ds4_matvec_f32(int type, const void *w, int64_t n_rows, int64_t n,
                   const float *x, float *y) {
    return ds4_matvec_f32_rows(type, w, n, x, y, 0, n_rows);
}

int ds4_matvec_q8_k(int type, const void *w, int64_t n_rows, int64_t n,
                    const void *xq, float *y) {
    return ds4_matvec_q8_k_rows(type, w, n, xq, y, 0, n_rows);
}
