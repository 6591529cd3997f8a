/* The FP8 E4M3FN / FP4 E2M1 roundings of the qat mode and their block
 * scales, and the qat-q8 mode's int8 activation codes: one definition for
 * the CPU engine (qat.c) and the CUDA kernels (kernels.cuh), so that both
 * round every value alike. */
#ifndef DS4_QAT_ROUND_H
#define DS4_QAT_ROUND_H

#include <math.h>

#ifdef __CUDACC__
#define QAT_ROUND_FN static inline __host__ __device__
#else
#define QAT_ROUND_FN static inline
#endif

/* 2^ceil(log2(ratio)) for ratio > 0, exact: frexp avoids log2f rounding. */
QAT_ROUND_FN float qat_pow2_ceil(float ratio) {
    int e;
    float m = frexpf(ratio, &e);   /* ratio = m * 2^e, m in [0.5, 1) */
    return ldexpf(1.0f, m == 0.5f ? e - 1 : e);
}

/* Nearest FP8 E4M3FN value, ties to the even code, saturating at 448. */
QAT_ROUND_FN float qat_round_fp8(float y) {
    if (isnan(y)) return y;
    float a = fabsf(y);
    if (a >= 448.0f) return copysignf(448.0f, y);
    float step;
    if (a < 0x1p-6f) {
        step = 0x1p-9f;                       /* subnormals k * 2^-9 */
    } else {
        int e;
        frexpf(a, &e);                        /* a in [2^(e-1), 2^e) */
        step = ldexpf(1.0f, e - 1 - 3);       /* 3 mantissa bits */
    }
    float q = nearbyintf(a / step) * step;    /* ties to even code */
    return copysignf(q > 448.0f ? 448.0f : q, y);
}

/* Nearest FP4 E2M1 value, ties to the even code, saturating at 6. */
QAT_ROUND_FN float qat_round_fp4(float y) {
    const float values[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
    if (isnan(y)) return y;
    float a = fabsf(y);
    if (a >= 6.0f) return copysignf(6.0f, y);
    int best = 0;
    for (int k = 1; k < 8; k++) {
        float d = fabsf(a - values[k]), db = fabsf(a - values[best]);
        if (d < db || (d == db && k % 2 == 0)) best = k;
    }
    return copysignf(values[best], y);
}

/* The power-of-two scales of a block: FP8 blocks of 64 map amax (at least
 * 1e-4) to 448, FP4 blocks of 32 map amax (at least 6 * 2^-126) to 6. */
QAT_ROUND_FN float qat_fp8_scale(float amax) { return qat_pow2_ceil(fmaxf(amax, 1e-4f) * (1.0f / 448.0f)); }
QAT_ROUND_FN float qat_fp4_scale(float amax) {
    return qat_pow2_ceil(fmaxf(amax, 6.0f * 0x1p-126f) * (1.0f / 6.0f));
}

/* ---- the qat-q8 mode's activation rounding (forward-pass.md §8 row 4) ----
 * What antirez/ds4 (ggml) does to x before a quantized product, as a value
 * change: x is replaced by its int8 block codes times their scale. */

/* v >= 0 rounded to the nearest fp16 value (ties to even), as a float. */
QAT_ROUND_FN float act8_round_fp16(float v) {
    if (v >= 65520.0f) return INFINITY;   /* past 65504 + half a step: fp16 overflows */
    float step;
    if (v < 0x1p-14f) {
        step = 0x1p-24f;                  /* subnormals */
    } else {
        int e;
        frexpf(v, &e);
        step = ldexpf(1.0f, e - 11);      /* 10 mantissa bits */
    }
    return nearbyintf(v / step) * step;
}

/* Q8_0 (a block of 32, for Q8_0 weights; ggml quantize_row_q8_0_ref):
 * d = amax / 127, q = roundf(x * (1 / d)) (half away from zero), and the
 * block keeps d as fp16. Returns that scale; *inv gets 1 / d (0 for an
 * all-zero block). */
QAT_ROUND_FN float act8_q8_0_scale(float amax, float *inv) {
    float d = amax / 127.0f;
    *inv = d != 0.0f ? 1.0f / d : 0.0f;
    return act8_round_fp16(d);
}
QAT_ROUND_FN float act8_q8_0_code(float x, float inv) { return roundf(x * inv); }

/* Q8_K (a block of 256, for 2- and 4-bit weights; ggml quantize_row_q8_K_ref):
 * max = the value of largest magnitude (the first on ties), iscale = -127 /
 * max, q = min(127, nearest even of iscale x), d = 1 / iscale. Returns d;
 * *iscale gets iscale (0 and d = 0 for a block that is all zero or so small
 * that iscale overflows). */
QAT_ROUND_FN float act8_q8_k_scale(float max, float *iscale) {
    float is = max != 0.0f ? -127.0f / max : 0.0f;
    if (!isfinite(is)) is = 0.0f;
    *iscale = is;
    return is != 0.0f ? 1.0f / is : 0.0f;
}
QAT_ROUND_FN float act8_q8_k_code(float x, float iscale) { return fminf(rintf(iscale * x), 127.0f); }

#endif
