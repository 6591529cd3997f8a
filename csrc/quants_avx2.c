/* AVX2 + FMA + F16C dot kernels. Compiled for every x86 build through
 * per-function target attributes (the build passes no -march flag) and
 * selected at run time by quants.c (ds4_simd_level). Each kernel has a
 * scalar reference in quants.c:
 *
 *   float32 activations -> ds4_vec_dot_f32_ref (exact dequantization, double
 *                          accumulation); these kernels accumulate in float.
 *   Q8_K activations    -> the *_q8_K_ref integer kernels; these kernels do
 *                          the same integer sums and differ only in how the
 *                          per-block float products are grouped.
 *
 * Kernels read only the whole blocks of the given n. Loads are unaligned. */
#include "quants_internal.h"

#ifdef DS4_HAVE_AVX2

#include <immintrin.h>

#include "iq2_tables.h"

#define TARGET __attribute__((target("avx2,fma,f16c")))

static inline TARGET float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline TARGET float hsum_ps128(__m128 s) {
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline TARGET float f16(uint16_t h) { return _cvtsh_ss(h); }

/* 8 bytes at p, zero-extended to 8 x int32. */
static inline TARGET __m256i load_u8x8(const uint8_t *p) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
}

/* ======================================================================
 * float32 activations
 * ====================================================================== */

static TARGET float dot_f32_f32(const void *w, const float *x, int64_t n) {
    const float *a = w;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    __m256 acc2 = _mm256_setzero_ps(), acc3 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(x + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(x + i + 8), acc1);
        acc2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(x + i + 16), acc2);
        acc3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(x + i + 24), acc3);
    }
    for (; i + 8 <= n; i += 8)
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(x + i), acc0);
    float sum = hsum_ps(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
    for (; i < n; i++) sum += a[i] * x[i];
    return sum;
}

static TARGET float dot_f16_f32(const void *w, const float *x, int64_t n) {
    const uint8_t *a = w;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    __m256 acc2 = _mm256_setzero_ps(), acc3 = _mm256_setzero_ps();
#define LD16(off) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(a + 2 * (off))))
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        acc0 = _mm256_fmadd_ps(LD16(i), _mm256_loadu_ps(x + i), acc0);
        acc1 = _mm256_fmadd_ps(LD16(i + 8), _mm256_loadu_ps(x + i + 8), acc1);
        acc2 = _mm256_fmadd_ps(LD16(i + 16), _mm256_loadu_ps(x + i + 16), acc2);
        acc3 = _mm256_fmadd_ps(LD16(i + 24), _mm256_loadu_ps(x + i + 24), acc3);
    }
    for (; i + 8 <= n; i += 8)
        acc0 = _mm256_fmadd_ps(LD16(i), _mm256_loadu_ps(x + i), acc0);
#undef LD16
    float sum = hsum_ps(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
    for (; i < n; i++) sum += fp16_to_fp32(rd_u16(a + 2 * i)) * x[i];
    return sum;
}

static TARGET float dot_bf16_f32(const void *w, const float *x, int64_t n) {
    const uint8_t *a = w;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
#define LDB16(off) _mm256_castsi256_ps(_mm256_slli_epi32( \
        _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(a + 2 * (off)))), 16))
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        acc0 = _mm256_fmadd_ps(LDB16(i), _mm256_loadu_ps(x + i), acc0);
        acc1 = _mm256_fmadd_ps(LDB16(i + 8), _mm256_loadu_ps(x + i + 8), acc1);
    }
    for (; i + 8 <= n; i += 8)
        acc0 = _mm256_fmadd_ps(LDB16(i), _mm256_loadu_ps(x + i), acc0);
#undef LDB16
    float sum = hsum_ps(_mm256_add_ps(acc0, acc1));
    for (; i < n; i++) sum += bf16_to_fp32(rd_u16(a + 2 * i)) * x[i];
    return sum;
}

/* Q8_0: per block, sum q*x over 32 lanes in float, then total += d * that. */
static TARGET float dot_q8_0_f32(const void *w, const float *x, int64_t n) {
    const block_q8_0 *b = w;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < n / QK8_0; i++, x += QK8_0) {
        const uint8_t *q = (const uint8_t *)b[i].qs;
        __m256 s0 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)q))),
                                  _mm256_loadu_ps(x));
        __m256 s1 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + 8)))),
                                  _mm256_loadu_ps(x + 8));
        s0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + 16)))),
                             _mm256_loadu_ps(x + 16), s0);
        s1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + 24)))),
                             _mm256_loadu_ps(x + 24), s1);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(f16(b[i].d)), _mm256_add_ps(s0, s1), acc);
    }
    return hsum_ps(acc);
}

/* Q2_K: a 2-bit quant picks one of 4 weights dl*q - ml of its sub-block.
 * Build that 4-entry table per sub-block (the exact dequantized values) in
 * each 128-bit lane and look the quants up with vpermilps, which reads only
 * the low 2 bits of each index: no masking needed after the shift. */

/* dl[j] = d*sc_j and ml[j] = dmin*m_j of block b, as in the dequantizer. */
static inline TARGET void q2k_levels(const block_q2_K *b, float dl[16], float ml[16]) {
    const __m128i m4 = _mm_set1_epi8(0x0f);
    const __m128i sc8 = _mm_loadu_si128((const __m128i *)b->scales);
    const __m128i lo = _mm_and_si128(sc8, m4);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(sc8, 4), m4);
    const __m256 vd = _mm256_set1_ps(f16(b->d));
    const __m256 vm = _mm256_set1_ps(f16(b->dmin));
    _mm256_store_ps(dl, _mm256_mul_ps(vd, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo))));
    _mm256_store_ps(dl + 8, _mm256_mul_ps(vd, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)))));
    _mm256_store_ps(ml, _mm256_mul_ps(vm, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi))));
    _mm256_store_ps(ml + 8, _mm256_mul_ps(vm, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)))));
}

/* The four sub-blocks' weight tables of quarter (n2, h): tab[s] for the quants
 * at shift 2 s. */
static inline TARGET void q2k_tables(const float *dl, const float *ml, int n2, int h, __m256 tab[4]) {
    const __m256 lvl = _mm256_setr_ps(0, 1, 2, 3, 0, 1, 2, 3);
    for (int s = 0; s < 4; s++) {
        const int j = 8 * n2 + 2 * s + h;
        tab[s] = _mm256_sub_ps(_mm256_mul_ps(_mm256_broadcast_ss(dl + j), lvl), _mm256_broadcast_ss(ml + j));
    }
}

static TARGET float dot_q2_K_f32(const void *w, const float *x, int64_t n) {
    const block_q2_K *b = w;
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t i = 0; i < n / QK_K; i++, x += QK_K) {
        float dl[16] __attribute__((aligned(32))), ml[16] __attribute__((aligned(32)));
        q2k_levels(&b[i], dl, ml);
        for (int n2 = 0; n2 < 2; n2++) {
            for (int h = 0; h < 2; h++) {
                __m256 tab[4];
                q2k_tables(dl, ml, n2, h, tab);
                const float *xs = x + 128 * n2 + 16 * h;
                const uint8_t *q = b[i].qs + 32 * n2 + 16 * h;
                const __m256i qa = load_u8x8(q), qb = load_u8x8(q + 8);
                for (int s = 0; s < 4; s++) {
                    const __m256 wa = _mm256_permutevar_ps(tab[s], _mm256_srli_epi32(qa, 2 * s));
                    const __m256 wb = _mm256_permutevar_ps(tab[s], _mm256_srli_epi32(qb, 2 * s));
                    acc[s] = _mm256_fmadd_ps(wa, _mm256_loadu_ps(xs + 32 * s), acc[s]);
                    acc[s] = _mm256_fmadd_ps(wb, _mm256_loadu_ps(xs + 32 * s + 8), acc[s]);
                }
            }
        }
    }
    return hsum_ps(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
}

/* Q4_K: unpack the 12 packed bytes into 8 scales (out[0..7]) and 8 mins
 * (out[8..15]), four at a time in 32-bit words (same result as
 * q4k_scale_min for j = 0..7). */
static inline void q4k_unpack_scales(const uint8_t *s, uint8_t out[16]) {
    const uint32_t lo6 = 0x3f3f3f3fu, lo4 = 0x0f0f0f0fu, lo2 = 0x03030303u;
    uint32_t w[3], u[4];
    memcpy(w, s, 12);
    u[0] = w[0] & lo6;                                           /* sc 0..3 */
    u[1] = (w[2] & lo4) | (((w[0] >> 6) & lo2) << 4);            /* sc 4..7 */
    u[2] = w[1] & lo6;                                           /* m 0..3 */
    u[3] = ((w[2] >> 4) & lo4) | (((w[1] >> 6) & lo2) << 4);     /* m 4..7 */
    memcpy(out, u, 16);
}

/* dl[j] = d*sc_j and ml[j] = dmin*m_j of Q4_K block b. */
static inline TARGET void q4k_levels(const block_q4_K *b, float dl[8], float ml[8]) {
    uint8_t scm[16];
    q4k_unpack_scales(b->scales, scm);
    _mm256_store_ps(dl, _mm256_mul_ps(_mm256_set1_ps(f16(b->d)), _mm256_cvtepi32_ps(load_u8x8(scm))));
    _mm256_store_ps(ml, _mm256_mul_ps(_mm256_set1_ps(f16(b->dmin)), _mm256_cvtepi32_ps(load_u8x8(scm + 8))));
}

/* Q4_K: weights (d*sc)*q - dmin*m (one FMA; differs from the exact
 * dequantized value by at most one rounding), times x. */
static TARGET float dot_q4_K_f32(const void *w, const float *x, int64_t n) {
    const block_q4_K *b = w;
    const __m256i m4 = _mm256_set1_epi32(0x0f);
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    __m256 acc2 = _mm256_setzero_ps(), acc3 = _mm256_setzero_ps();
    for (int64_t i = 0; i < n / QK_K; i++, x += QK_K) {
        float dl[8] __attribute__((aligned(32))), ml[8] __attribute__((aligned(32)));
        q4k_levels(&b[i], dl, ml);
        for (int c = 0; c < 4; c++) {
            const __m256 d1 = _mm256_broadcast_ss(dl + 2 * c), m1 = _mm256_broadcast_ss(ml + 2 * c);
            const __m256 d2 = _mm256_broadcast_ss(dl + 2 * c + 1), m2 = _mm256_broadcast_ss(ml + 2 * c + 1);
            const uint8_t *q = b[i].qs + 32 * c;
            const float *xs = x + 64 * c;
            for (int g = 0; g < 4; g += 2) {
                const __m256i qv0 = load_u8x8(q + 8 * g), qv1 = load_u8x8(q + 8 * g + 8);
                const __m256 ql0 = _mm256_cvtepi32_ps(_mm256_and_si256(qv0, m4));
                const __m256 qh0 = _mm256_cvtepi32_ps(_mm256_srli_epi32(qv0, 4));
                const __m256 ql1 = _mm256_cvtepi32_ps(_mm256_and_si256(qv1, m4));
                const __m256 qh1 = _mm256_cvtepi32_ps(_mm256_srli_epi32(qv1, 4));
                acc0 = _mm256_fmadd_ps(_mm256_fmsub_ps(d1, ql0, m1), _mm256_loadu_ps(xs + 8 * g), acc0);
                acc1 = _mm256_fmadd_ps(_mm256_fmsub_ps(d2, qh0, m2), _mm256_loadu_ps(xs + 32 + 8 * g), acc1);
                acc2 = _mm256_fmadd_ps(_mm256_fmsub_ps(d1, ql1, m1), _mm256_loadu_ps(xs + 8 * g + 8), acc2);
                acc3 = _mm256_fmadd_ps(_mm256_fmsub_ps(d2, qh1, m2), _mm256_loadu_ps(xs + 40 + 8 * g), acc3);
            }
        }
    }
    return hsum_ps(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
}

/* IQ2_XXS: grid rows as floats and sign masks, built once at load time. */
static float iq2_grid_f32[256][8] __attribute__((aligned(32)));
static uint32_t iq2_sign_mask[128][8] __attribute__((aligned(32)));

__attribute__((constructor)) static void init_iq2_float_tables(void) {
    for (int g = 0; g < 256; g++)
        for (int j = 0; j < 8; j++)
            iq2_grid_f32[g][j] = (float)((iq2xxs_grid[g] >> (8 * j)) & 0xff);
    for (int s = 0; s < 128; s++)
        for (int j = 0; j < 8; j++)
            iq2_sign_mask[s][j] = (ksigns_iq2xs[s] & kmask_iq2xs[j]) ? 0x80000000u : 0;
}

/* Weights db*g with the sign bit flipped: the exact dequantized values. */
static TARGET float dot_iq2_xxs_f32(const void *w, const float *x, int64_t n) {
    const block_iq2_xxs *b = w;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    __m256 acc2 = _mm256_setzero_ps(), acc3 = _mm256_setzero_ps();
    for (int64_t i = 0; i < n / QK_K; i++) {
        const float d = f16(b[i].d);
        const uint8_t *qs = (const uint8_t *)b[i].qs;
        for (int ib = 0; ib < QK_K / 32; ib++, x += 32) {
            const uint32_t a0 = rd_u32(qs + 8 * ib);
            const uint32_t a1 = rd_u32(qs + 8 * ib + 4);
            const __m256 db = _mm256_set1_ps(d * (0.5f + (float)(a1 >> 28)) * 0.25f);
#define IQ2_W(k) _mm256_xor_ps(                                                      \
        _mm256_mul_ps(db, _mm256_load_ps(iq2_grid_f32[(a0 >> (8 * (k))) & 0xff])), \
        _mm256_load_ps((const float *)iq2_sign_mask[(a1 >> (7 * (k))) & 127]))
            acc0 = _mm256_fmadd_ps(IQ2_W(0), _mm256_loadu_ps(x), acc0);
            acc1 = _mm256_fmadd_ps(IQ2_W(1), _mm256_loadu_ps(x + 8), acc1);
            acc2 = _mm256_fmadd_ps(IQ2_W(2), _mm256_loadu_ps(x + 16), acc2);
            acc3 = _mm256_fmadd_ps(IQ2_W(3), _mm256_loadu_ps(x + 24), acc3);
#undef IQ2_W
        }
    }
    return hsum_ps(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
}

ds4_dot_f32_fn ds4_avx2_dot_f32_kernel(int type) {
    switch (type) {
    case DS4_TYPE_F32: return dot_f32_f32;
    case DS4_TYPE_F16: return dot_f16_f32;
    case DS4_TYPE_BF16: return dot_bf16_f32;
    case DS4_TYPE_Q8_0: return dot_q8_0_f32;
    case DS4_TYPE_Q2_K: return dot_q2_K_f32;
    case DS4_TYPE_Q4_K: return dot_q4_K_f32;
    case DS4_TYPE_IQ2_XXS: return dot_iq2_xxs_f32;
    default: return NULL;
    }
}

/* ======================================================================
 * float32 activations, two tokens at once
 *
 * A prefill chunk multiplies each row by many tokens: these kernels decode
 * a row's weights once for two of them. Each token's accumulators take the
 * very operations (same weights, same order, same explicit FMAs; the build
 * fuses nothing else: -ffp-contract=off) its own kernel above gives it, so
 * out[t] is the bits of that kernel on x_t.
 * ====================================================================== */

static TARGET void dot2_q8_0_f32(const void *w, const float *x0, const float *x1, int64_t n, float out[2]) {
    const block_q8_0 *b = w;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (int64_t i = 0; i < n / QK8_0; i++, x0 += QK8_0, x1 += QK8_0) {
        const uint8_t *q = (const uint8_t *)b[i].qs;
        __m256 w8[4];
        for (int k = 0; k < 4; k++)
            w8[k] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + 8 * k))));
        const __m256 d = _mm256_set1_ps(f16(b[i].d));
        __m256 s0 = _mm256_mul_ps(w8[0], _mm256_loadu_ps(x0)), s1 = _mm256_mul_ps(w8[1], _mm256_loadu_ps(x0 + 8));
        __m256 t0 = _mm256_mul_ps(w8[0], _mm256_loadu_ps(x1)), t1 = _mm256_mul_ps(w8[1], _mm256_loadu_ps(x1 + 8));
        s0 = _mm256_fmadd_ps(w8[2], _mm256_loadu_ps(x0 + 16), s0);
        s1 = _mm256_fmadd_ps(w8[3], _mm256_loadu_ps(x0 + 24), s1);
        t0 = _mm256_fmadd_ps(w8[2], _mm256_loadu_ps(x1 + 16), t0);
        t1 = _mm256_fmadd_ps(w8[3], _mm256_loadu_ps(x1 + 24), t1);
        acc0 = _mm256_fmadd_ps(d, _mm256_add_ps(s0, s1), acc0);
        acc1 = _mm256_fmadd_ps(d, _mm256_add_ps(t0, t1), acc1);
    }
    out[0] = hsum_ps(acc0);
    out[1] = hsum_ps(acc1);
}

static TARGET void dot2_q2_K_f32(const void *w, const float *x0, const float *x1, int64_t n, float out[2]) {
    const block_q2_K *b = w;
    __m256 acc[2][4];
    for (int t = 0; t < 2; t++)
        for (int s = 0; s < 4; s++) acc[t][s] = _mm256_setzero_ps();
    for (int64_t i = 0; i < n / QK_K; i++, x0 += QK_K, x1 += QK_K) {
        float dl[16] __attribute__((aligned(32))), ml[16] __attribute__((aligned(32)));
        q2k_levels(&b[i], dl, ml);
        for (int n2 = 0; n2 < 2; n2++) {
            for (int h = 0; h < 2; h++) {
                __m256 tab[4];
                q2k_tables(dl, ml, n2, h, tab);
                const int xo = 128 * n2 + 16 * h;
                const uint8_t *q = b[i].qs + 32 * n2 + 16 * h;
                const __m256i qa = load_u8x8(q), qb = load_u8x8(q + 8);
                for (int s = 0; s < 4; s++) {
                    const __m256 wa = _mm256_permutevar_ps(tab[s], _mm256_srli_epi32(qa, 2 * s));
                    const __m256 wb = _mm256_permutevar_ps(tab[s], _mm256_srli_epi32(qb, 2 * s));
                    acc[0][s] = _mm256_fmadd_ps(wa, _mm256_loadu_ps(x0 + xo + 32 * s), acc[0][s]);
                    acc[0][s] = _mm256_fmadd_ps(wb, _mm256_loadu_ps(x0 + xo + 32 * s + 8), acc[0][s]);
                    acc[1][s] = _mm256_fmadd_ps(wa, _mm256_loadu_ps(x1 + xo + 32 * s), acc[1][s]);
                    acc[1][s] = _mm256_fmadd_ps(wb, _mm256_loadu_ps(x1 + xo + 32 * s + 8), acc[1][s]);
                }
            }
        }
    }
    for (int t = 0; t < 2; t++)
        out[t] = hsum_ps(_mm256_add_ps(_mm256_add_ps(acc[t][0], acc[t][1]), _mm256_add_ps(acc[t][2], acc[t][3])));
}

static TARGET void dot2_q4_K_f32(const void *w, const float *x0, const float *x1, int64_t n, float out[2]) {
    const block_q4_K *b = w;
    const __m256i m4 = _mm256_set1_epi32(0x0f);
    __m256 acc[2][4];
    for (int t = 0; t < 2; t++)
        for (int k = 0; k < 4; k++) acc[t][k] = _mm256_setzero_ps();
    for (int64_t i = 0; i < n / QK_K; i++, x0 += QK_K, x1 += QK_K) {
        float dl[8] __attribute__((aligned(32))), ml[8] __attribute__((aligned(32)));
        q4k_levels(&b[i], dl, ml);
        for (int c = 0; c < 4; c++) {
            const __m256 d1 = _mm256_broadcast_ss(dl + 2 * c), m1 = _mm256_broadcast_ss(ml + 2 * c);
            const __m256 d2 = _mm256_broadcast_ss(dl + 2 * c + 1), m2 = _mm256_broadcast_ss(ml + 2 * c + 1);
            const uint8_t *q = b[i].qs + 32 * c;
            const int xo = 64 * c;
            for (int g = 0; g < 4; g += 2) {
                const __m256i qv0 = load_u8x8(q + 8 * g), qv1 = load_u8x8(q + 8 * g + 8);
                const __m256 wl0 = _mm256_fmsub_ps(d1, _mm256_cvtepi32_ps(_mm256_and_si256(qv0, m4)), m1);
                const __m256 wh0 = _mm256_fmsub_ps(d2, _mm256_cvtepi32_ps(_mm256_srli_epi32(qv0, 4)), m2);
                const __m256 wl1 = _mm256_fmsub_ps(d1, _mm256_cvtepi32_ps(_mm256_and_si256(qv1, m4)), m1);
                const __m256 wh1 = _mm256_fmsub_ps(d2, _mm256_cvtepi32_ps(_mm256_srli_epi32(qv1, 4)), m2);
                const float *xs[2] = {x0 + xo, x1 + xo};
                for (int t = 0; t < 2; t++) {
                    acc[t][0] = _mm256_fmadd_ps(wl0, _mm256_loadu_ps(xs[t] + 8 * g), acc[t][0]);
                    acc[t][1] = _mm256_fmadd_ps(wh0, _mm256_loadu_ps(xs[t] + 32 + 8 * g), acc[t][1]);
                    acc[t][2] = _mm256_fmadd_ps(wl1, _mm256_loadu_ps(xs[t] + 8 * g + 8), acc[t][2]);
                    acc[t][3] = _mm256_fmadd_ps(wh1, _mm256_loadu_ps(xs[t] + 40 + 8 * g), acc[t][3]);
                }
            }
        }
    }
    for (int t = 0; t < 2; t++)
        out[t] = hsum_ps(_mm256_add_ps(_mm256_add_ps(acc[t][0], acc[t][1]), _mm256_add_ps(acc[t][2], acc[t][3])));
}

static TARGET void dot2_iq2_xxs_f32(const void *w, const float *x0, const float *x1, int64_t n, float out[2]) {
    const block_iq2_xxs *b = w;
    __m256 acc[2][4];
    for (int t = 0; t < 2; t++)
        for (int k = 0; k < 4; k++) acc[t][k] = _mm256_setzero_ps();
    for (int64_t i = 0; i < n / QK_K; i++) {
        const float d = f16(b[i].d);
        const uint8_t *qs = (const uint8_t *)b[i].qs;
        for (int ib = 0; ib < QK_K / 32; ib++, x0 += 32, x1 += 32) {
            const uint32_t a0 = rd_u32(qs + 8 * ib);
            const uint32_t a1 = rd_u32(qs + 8 * ib + 4);
            const __m256 db = _mm256_set1_ps(d * (0.5f + (float)(a1 >> 28)) * 0.25f);
            __m256 wk[4];
            for (int k = 0; k < 4; k++)
                wk[k] = _mm256_xor_ps(_mm256_mul_ps(db, _mm256_load_ps(iq2_grid_f32[(a0 >> (8 * k)) & 0xff])),
                                      _mm256_load_ps((const float *)iq2_sign_mask[(a1 >> (7 * k)) & 127]));
            for (int k = 0; k < 4; k++) {
                acc[0][k] = _mm256_fmadd_ps(wk[k], _mm256_loadu_ps(x0 + 8 * k), acc[0][k]);
                acc[1][k] = _mm256_fmadd_ps(wk[k], _mm256_loadu_ps(x1 + 8 * k), acc[1][k]);
            }
        }
    }
    for (int t = 0; t < 2; t++)
        out[t] = hsum_ps(_mm256_add_ps(_mm256_add_ps(acc[t][0], acc[t][1]), _mm256_add_ps(acc[t][2], acc[t][3])));
}

ds4_dot2_f32_fn ds4_avx2_dot2_f32_kernel(int type) {
    switch (type) {
    case DS4_TYPE_Q8_0: return dot2_q8_0_f32;
    case DS4_TYPE_Q2_K: return dot2_q2_K_f32;
    case DS4_TYPE_Q4_K: return dot2_q4_K_f32;
    case DS4_TYPE_IQ2_XXS: return dot2_iq2_xxs_f32;
    default: return NULL;
    }
}

/* ======================================================================
 * Q8_K activations (integer dot products)
 *
 * Signed x signed int8 products use the maddubs idiom: |a| (unsigned) times
 * b*sign(a). Q8_K quants are in [-127, 127] (never -128), so negating them
 * cannot overflow; weights may be -128 (Q8_0), which |a| handles.
 * ====================================================================== */

/* Q8_0 weights against Q8_K: 8 weight blocks per activation block. */
static TARGET float dot_q8_0_q8_K(const void *w, const void *xq, int64_t n) {
    const block_q8_0 *b = w;
    const block_q8_K *y = xq;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < n / QK_K; i++) {
        __m256 accb = _mm256_setzero_ps();
        for (int k = 0; k < QK_K / QK8_0; k++) {
            const block_q8_0 *xb = &b[i * (QK_K / QK8_0) + k];
            const __m256i qw = _mm256_loadu_si256((const __m256i *)xb->qs);
            const __m256i qa = _mm256_loadu_si256((const __m256i *)(y[i].qs + 32 * k));
            const __m256i p16 = _mm256_maddubs_epi16(_mm256_abs_epi8(qw), _mm256_sign_epi8(qa, qw));
            const __m256i p32 = _mm256_madd_epi16(p16, ones);
            accb = _mm256_fmadd_ps(_mm256_set1_ps(f16(xb->d)), _mm256_cvtepi32_ps(p32), accb);
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(y[i].d), accb, acc);
    }
    return hsum_ps(acc);
}

/* Q8_0 weights against Q8_0 activations (qat-q8): a block's integer dot
 * times both fp16 scales. Activation codes are in [-127, 127] (roundf of at
 * most 127 in magnitude), so b*sign(a) cannot overflow. */
TARGET float ds4_avx2_dot_q8_0_q8_0(const void *w, const void *xq, int64_t n) {
    const block_q8_0 *b = w, *y = xq;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < n / QK8_0; i++) {
        const __m256i qw = _mm256_loadu_si256((const __m256i *)b[i].qs);
        const __m256i qa = _mm256_loadu_si256((const __m256i *)y[i].qs);
        const __m256i p16 = _mm256_maddubs_epi16(_mm256_abs_epi8(qw), _mm256_sign_epi8(qa, qw));
        const __m256i p32 = _mm256_madd_epi16(p16, ones);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(f16(b[i].d) * f16(y[i].d)), _mm256_cvtepi32_ps(p32), acc);
    }
    return hsum_ps(acc);
}

/* Byte-shuffle masks that broadcast one int16 of a 128-bit lane of eight
 * int16 to the whole lane. Q2_K: low lane gets element 2s, high lane 2s+1
 * (the two 16-element sub-blocks of a 32-element chunk). */
static const uint8_t q2k_scale_shuffle[4][32] __attribute__((aligned(32))) = {
    {0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3},
    {4, 5, 4, 5, 4, 5, 4, 5, 4, 5, 4, 5, 4, 5, 4, 5, 6, 7, 6, 7, 6, 7, 6, 7, 6, 7, 6, 7, 6, 7, 6, 7},
    {8, 9, 8, 9, 8, 9, 8, 9, 8, 9, 8, 9, 8, 9, 8, 9, 10, 11, 10, 11, 10, 11, 10, 11, 10, 11, 10, 11, 10, 11, 10, 11},
    {12, 13, 12, 13, 12, 13, 12, 13, 12, 13, 12, 13, 12, 13, 12, 13, 14, 15, 14, 15, 14, 15, 14, 15, 14, 15, 14, 15, 14, 15, 14, 15},
};

static TARGET float dot_q2_K_q8_K(const void *w, const void *xq, int64_t n) {
    const block_q2_K *b = w;
    const block_q8_K *y = xq;
    const __m128i m4 = _mm_set1_epi8(0x0f);
    const __m256i m3 = _mm256_set1_epi8(3);
    __m256 acc = _mm256_setzero_ps(), acc_m = _mm256_setzero_ps();
    for (int64_t i = 0; i < n / QK_K; i++) {
        const float dall = y[i].d * f16(b[i].d);
        const float dmin = y[i].d * f16(b[i].dmin);
        const __m128i sc8 = _mm_loadu_si128((const __m128i *)b[i].scales);
        /* mins: sum_j m_j * bsums_j */
        const __m256i mins16 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(sc8, 4), m4));
        const __m256i pm = _mm256_madd_epi16(mins16, _mm256_loadu_si256((const __m256i *)y[i].bsums));
        acc_m = _mm256_fmadd_ps(_mm256_set1_ps(dmin), _mm256_cvtepi32_ps(pm), acc_m);
        /* scales as int16, sub-blocks 0..7 and 8..15 each in both lanes */
        const __m256i scales16 = _mm256_cvtepu8_epi16(_mm_and_si128(sc8, m4));
        const __m256i sc_half[2] = {
            _mm256_broadcastsi128_si256(_mm256_castsi256_si128(scales16)),
            _mm256_broadcastsi128_si256(_mm256_extracti128_si256(scales16, 1)),
        };
        __m256i sumi = _mm256_setzero_si256();
        for (int n2 = 0; n2 < 2; n2++) {
            const __m256i q2bits = _mm256_loadu_si256((const __m256i *)(b[i].qs + 32 * n2));
            for (int s = 0; s < 4; s++) {
                const __m256i q2 = _mm256_and_si256(_mm256_srli_epi16(q2bits, 2 * s), m3);
                const __m256i q8 = _mm256_loadu_si256((const __m256i *)(y[i].qs + 128 * n2 + 32 * s));
                const __m256i p16 = _mm256_maddubs_epi16(q2, q8);
                const __m256i sc = _mm256_shuffle_epi8(sc_half[n2],
                                                       _mm256_load_si256((const __m256i *)q2k_scale_shuffle[s]));
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(sc, p16));
            }
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(dall), _mm256_cvtepi32_ps(sumi), acc);
    }
    return hsum_ps(acc) - hsum_ps(acc_m);
}

/* Q4_K: broadcast int16 element k of a lane to the whole lane (both lanes). */
static const uint8_t q4k_scale_shuffle[8][32] __attribute__((aligned(32))) = {
#define B2(k) 2 * (k), 2 * (k) + 1
#define ROW(k) {B2(k), B2(k), B2(k), B2(k), B2(k), B2(k), B2(k), B2(k), \
                B2(k), B2(k), B2(k), B2(k), B2(k), B2(k), B2(k), B2(k)}
    ROW(0), ROW(1), ROW(2), ROW(3), ROW(4), ROW(5), ROW(6), ROW(7),
#undef ROW
#undef B2
};

static TARGET float dot_q4_K_q8_K(const void *w, const void *xq, int64_t n) {
    const block_q4_K *b = w;
    const block_q8_K *y = xq;
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    __m256 acc = _mm256_setzero_ps();
    __m128 acc_m = _mm_setzero_ps();
    for (int64_t i = 0; i < n / QK_K; i++) {
        const float d = y[i].d * f16(b[i].d);
        const float dmin = y[i].d * f16(b[i].dmin);
        uint8_t scm[16]; /* 8 scales then 8 mins */
        q4k_unpack_scales(b[i].scales, scm);
        const __m256i sm16 = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)scm));
        /* mins: sum_j m_j * (bsums[2j] + bsums[2j+1]) */
        const __m256i bs = _mm256_loadu_si256((const __m256i *)y[i].bsums);
        const __m128i bs_pairs = _mm_hadd_epi16(_mm256_castsi256_si128(bs), _mm256_extracti128_si256(bs, 1));
        const __m128i pm = _mm_madd_epi16(_mm256_extracti128_si256(sm16, 1), bs_pairs);
        acc_m = _mm_fmadd_ps(_mm_set1_ps(dmin), _mm_cvtepi32_ps(pm), acc_m);
        const __m256i scales = _mm256_broadcastsi128_si256(_mm256_castsi256_si128(sm16));
        __m256i sumi = _mm256_setzero_si256();
        for (int c = 0; c < 4; c++) {
            const __m256i sc_l = _mm256_shuffle_epi8(scales, _mm256_load_si256((const __m256i *)q4k_scale_shuffle[2 * c]));
            const __m256i sc_h = _mm256_shuffle_epi8(scales, _mm256_load_si256((const __m256i *)q4k_scale_shuffle[2 * c + 1]));
            const __m256i q4bits = _mm256_loadu_si256((const __m256i *)(b[i].qs + 32 * c));
            const __m256i q4l = _mm256_and_si256(q4bits, m4);
            const __m256i q4h = _mm256_and_si256(_mm256_srli_epi16(q4bits, 4), m4);
            const __m256i q8l = _mm256_loadu_si256((const __m256i *)(y[i].qs + 64 * c));
            const __m256i q8h = _mm256_loadu_si256((const __m256i *)(y[i].qs + 64 * c + 32));
            const __m256i pl = _mm256_madd_epi16(sc_l, _mm256_maddubs_epi16(q4l, q8l));
            const __m256i ph = _mm256_madd_epi16(sc_h, _mm256_maddubs_epi16(q4h, q8h));
            sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(pl, ph));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    return hsum_ps(acc) - hsum_ps128(acc_m);
}

/* IQ2_XXS: a 32-element group's four grid rows (bytes <= 43) and their
 * signs as +1 / -1 bytes (keven_signs), from its two code words. */
static inline TARGET __m256i iq2_grid_bytes(uint32_t a0) {
    return _mm256_set_epi64x((long long)iq2xxs_grid[a0 >> 24], (long long)iq2xxs_grid[(a0 >> 16) & 0xff],
                             (long long)iq2xxs_grid[(a0 >> 8) & 0xff], (long long)iq2xxs_grid[a0 & 0xff]);
}

static inline TARGET __m256i iq2_sign_bytes(uint32_t a1) {
    return _mm256_set_epi64x((long long)keven_signs_iq2xs[(a1 >> 21) & 127],
                             (long long)keven_signs_iq2xs[(a1 >> 14) & 127],
                             (long long)keven_signs_iq2xs[(a1 >> 7) & 127], (long long)keven_signs_iq2xs[a1 & 127]);
}

/* IQ2_XXS: grid bytes (unsigned, <= 43) times q8 with the signs applied to
 * q8 (keven_signs bytes are +1 / -1); per sub-block times (2*ls+1). */
static TARGET float dot_iq2_xxs_q8_K(const void *w, const void *xq, int64_t n) {
    const block_iq2_xxs *b = w;
    const block_q8_K *y = xq;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < n / QK_K; i++) {
        const float d = f16(b[i].d) * y[i].d;
        const uint8_t *qs = (const uint8_t *)b[i].qs;
        __m256i sumi = _mm256_setzero_si256();
        for (int ib = 0; ib < QK_K / 32; ib++) {
            const uint32_t a0 = rd_u32(qs + 8 * ib);
            const uint32_t a1 = rd_u32(qs + 8 * ib + 4);
            const __m256i grid = iq2_grid_bytes(a0), signs = iq2_sign_bytes(a1);
            const __m256i q8 = _mm256_loadu_si256((const __m256i *)(y[i].qs + 32 * ib));
            const __m256i p16 = _mm256_maddubs_epi16(grid, _mm256_sign_epi8(q8, signs));
            const __m256i ls = _mm256_set1_epi16((short)(2 * (a1 >> 28) + 1));
            sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p16, ls));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    return 0.125f * hsum_ps(acc);
}

/* ---- the same, two tokens at once (a chunk's rows decoded once for two;
 * each token's integer sums exact as above, its float steps the same
 * operations in the same order: out[t] is the one-token kernel's bits) ---- */

TARGET void ds4_avx2_dot2_q8_0_q8_0(const void *w, const void *xq0, const void *xq1, int64_t n, float out[2]) {
    const block_q8_0 *b = w, *y[2] = {xq0, xq1};
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t i = 0; i < n / QK8_0; i++) {
        const __m256i qw = _mm256_loadu_si256((const __m256i *)b[i].qs), aw = _mm256_abs_epi8(qw);
        const float dw = f16(b[i].d);
        for (int t = 0; t < 2; t++) {
            const __m256i qa = _mm256_loadu_si256((const __m256i *)y[t][i].qs);
            const __m256i p32 = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(qa, qw)), ones);
            acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(dw * f16(y[t][i].d)), _mm256_cvtepi32_ps(p32), acc[t]);
        }
    }
    out[0] = hsum_ps(acc[0]);
    out[1] = hsum_ps(acc[1]);
}

static TARGET void dot2_q2_K_q8_K(const void *w, const void *xq0, const void *xq1, int64_t n, float out[2]) {
    const block_q2_K *b = w;
    const block_q8_K *y[2] = {xq0, xq1};
    const __m128i m4 = _mm_set1_epi8(0x0f);
    const __m256i m3 = _mm256_set1_epi8(3);
    __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()}, acc_m[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t i = 0; i < n / QK_K; i++) {
        const __m128i sc8 = _mm_loadu_si128((const __m128i *)b[i].scales);
        const __m256i mins16 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(sc8, 4), m4));
        const __m256i scales16 = _mm256_cvtepu8_epi16(_mm_and_si128(sc8, m4));
        const __m256i sc_half[2] = {
            _mm256_broadcastsi128_si256(_mm256_castsi256_si128(scales16)),
            _mm256_broadcastsi128_si256(_mm256_extracti128_si256(scales16, 1)),
        };
        __m256i sumi[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
        for (int t = 0; t < 2; t++) {
            const float dmin = y[t][i].d * f16(b[i].dmin);
            const __m256i pm = _mm256_madd_epi16(mins16, _mm256_loadu_si256((const __m256i *)y[t][i].bsums));
            acc_m[t] = _mm256_fmadd_ps(_mm256_set1_ps(dmin), _mm256_cvtepi32_ps(pm), acc_m[t]);
        }
        for (int n2 = 0; n2 < 2; n2++) {
            const __m256i q2bits = _mm256_loadu_si256((const __m256i *)(b[i].qs + 32 * n2));
            for (int s = 0; s < 4; s++) {
                const __m256i q2 = _mm256_and_si256(_mm256_srli_epi16(q2bits, 2 * s), m3);
                const __m256i sc = _mm256_shuffle_epi8(sc_half[n2],
                                                       _mm256_load_si256((const __m256i *)q2k_scale_shuffle[s]));
                for (int t = 0; t < 2; t++) {
                    const __m256i q8 = _mm256_loadu_si256((const __m256i *)(y[t][i].qs + 128 * n2 + 32 * s));
                    sumi[t] = _mm256_add_epi32(sumi[t], _mm256_madd_epi16(sc, _mm256_maddubs_epi16(q2, q8)));
                }
            }
        }
        for (int t = 0; t < 2; t++) {
            const float dall = y[t][i].d * f16(b[i].d);
            acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(dall), _mm256_cvtepi32_ps(sumi[t]), acc[t]);
        }
    }
    for (int t = 0; t < 2; t++) out[t] = hsum_ps(acc[t]) - hsum_ps(acc_m[t]);
}

static TARGET void dot2_q4_K_q8_K(const void *w, const void *xq0, const void *xq1, int64_t n, float out[2]) {
    const block_q4_K *b = w;
    const block_q8_K *y[2] = {xq0, xq1};
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    __m128 acc_m[2] = {_mm_setzero_ps(), _mm_setzero_ps()};
    for (int64_t i = 0; i < n / QK_K; i++) {
        uint8_t scm[16]; /* 8 scales then 8 mins */
        q4k_unpack_scales(b[i].scales, scm);
        const __m256i sm16 = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)scm));
        for (int t = 0; t < 2; t++) {
            const float dmin = y[t][i].d * f16(b[i].dmin);
            const __m256i bs = _mm256_loadu_si256((const __m256i *)y[t][i].bsums);
            const __m128i bs_pairs = _mm_hadd_epi16(_mm256_castsi256_si128(bs), _mm256_extracti128_si256(bs, 1));
            const __m128i pm = _mm_madd_epi16(_mm256_extracti128_si256(sm16, 1), bs_pairs);
            acc_m[t] = _mm_fmadd_ps(_mm_set1_ps(dmin), _mm_cvtepi32_ps(pm), acc_m[t]);
        }
        const __m256i scales = _mm256_broadcastsi128_si256(_mm256_castsi256_si128(sm16));
        __m256i sumi[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
        for (int c = 0; c < 4; c++) {
            const __m256i sc_l = _mm256_shuffle_epi8(scales, _mm256_load_si256((const __m256i *)q4k_scale_shuffle[2 * c]));
            const __m256i sc_h = _mm256_shuffle_epi8(scales, _mm256_load_si256((const __m256i *)q4k_scale_shuffle[2 * c + 1]));
            const __m256i q4bits = _mm256_loadu_si256((const __m256i *)(b[i].qs + 32 * c));
            const __m256i q4l = _mm256_and_si256(q4bits, m4);
            const __m256i q4h = _mm256_and_si256(_mm256_srli_epi16(q4bits, 4), m4);
            for (int t = 0; t < 2; t++) {
                const __m256i q8l = _mm256_loadu_si256((const __m256i *)(y[t][i].qs + 64 * c));
                const __m256i q8h = _mm256_loadu_si256((const __m256i *)(y[t][i].qs + 64 * c + 32));
                const __m256i pl = _mm256_madd_epi16(sc_l, _mm256_maddubs_epi16(q4l, q8l));
                const __m256i ph = _mm256_madd_epi16(sc_h, _mm256_maddubs_epi16(q4h, q8h));
                sumi[t] = _mm256_add_epi32(sumi[t], _mm256_add_epi32(pl, ph));
            }
        }
        for (int t = 0; t < 2; t++) {
            const float d = y[t][i].d * f16(b[i].d);
            acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi[t]), acc[t]);
        }
    }
    for (int t = 0; t < 2; t++) out[t] = hsum_ps(acc[t]) - hsum_ps128(acc_m[t]);
}

static TARGET void dot2_iq2_xxs_q8_K(const void *w, const void *xq0, const void *xq1, int64_t n, float out[2]) {
    const block_iq2_xxs *b = w;
    const block_q8_K *y[2] = {xq0, xq1};
    __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t i = 0; i < n / QK_K; i++) {
        const uint8_t *qs = (const uint8_t *)b[i].qs;
        __m256i sumi[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
        for (int ib = 0; ib < QK_K / 32; ib++) {
            const uint32_t a0 = rd_u32(qs + 8 * ib);
            const uint32_t a1 = rd_u32(qs + 8 * ib + 4);
            const __m256i grid = iq2_grid_bytes(a0), signs = iq2_sign_bytes(a1);
            const __m256i ls = _mm256_set1_epi16((short)(2 * (a1 >> 28) + 1));
            for (int t = 0; t < 2; t++) {
                const __m256i q8 = _mm256_loadu_si256((const __m256i *)(y[t][i].qs + 32 * ib));
                const __m256i p16 = _mm256_maddubs_epi16(grid, _mm256_sign_epi8(q8, signs));
                sumi[t] = _mm256_add_epi32(sumi[t], _mm256_madd_epi16(p16, ls));
            }
        }
        for (int t = 0; t < 2; t++) {
            const float d = f16(b[i].d) * y[t][i].d;
            acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi[t]), acc[t]);
        }
    }
    for (int t = 0; t < 2; t++) out[t] = 0.125f * hsum_ps(acc[t]);
}

ds4_dot2_q8k_fn ds4_avx2_dot2_q8k_kernel(int type) {
    switch (type) {
    case DS4_TYPE_Q2_K: return dot2_q2_K_q8_K;
    case DS4_TYPE_Q4_K: return dot2_q4_K_q8_K;
    case DS4_TYPE_IQ2_XXS: return dot2_iq2_xxs_q8_K;
    default: return NULL;
    }
}

ds4_dot_q8k_fn ds4_avx2_dot_q8k_kernel(int type) {
    switch (type) {
    case DS4_TYPE_Q8_0: return dot_q8_0_q8_K;
    case DS4_TYPE_Q2_K: return dot_q2_K_q8_K;
    case DS4_TYPE_Q4_K: return dot_q4_K_q8_K;
    case DS4_TYPE_IQ2_XXS: return dot_iq2_xxs_q8_K;
    default: return NULL;
    }
}

#endif /* DS4_HAVE_AVX2 */
