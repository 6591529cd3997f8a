/* Numeric building blocks: matrix products over quantized weights, norms, RoPE. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ops.h"
#include "qat.h"
#include "quants.h"

ds4_matrix ds4_matrix_of(const ds4_tensor *t) {
    ds4_matrix m = {t->data, t->type, t->ne[0], t->n_dims > 1 ? t->ne[1] : 1, t->row_bytes};
    return m;
}

ds4_matrix ds4_expert_matrix(const ds4_tensor *t, int64_t expert) {
    ds4_matrix m = {(const uint8_t *)t->data + expert * t->ne[1] * t->row_bytes, t->type, t->ne[0],
                    t->ne[1], t->row_bytes};
    return m;
}

ds4_matrix ds4_matrix_rows(ds4_matrix m, int64_t row0, int64_t n_rows) {
    m.data += row0 * m.row_bytes;
    m.n_out = n_rows;
    return m;
}

/* ---- dot product: 8 independent accumulators, AVX2 where available ---- */

static float dot_scalar(const float *a, const float *b, int64_t n) {
    float acc[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++) acc[k] += a[i + k] * b[i + k];
    float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

#if defined(__x86_64__)
#include <immintrin.h>

__attribute__((target("avx2,fma"))) static float dot_avx2(const float *a, const float *b, int64_t n) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    __m256 acc2 = _mm256_setzero_ps(), acc3 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
        acc2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), acc2);
        acc3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), acc3);
    }
    for (; i + 8 <= n; i += 8)
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    __m256 acc = _mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3));
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    s4 = _mm_add_ss(s4, _mm_movehdup_ps(s4));
    float s = _mm_cvtss_f32(s4);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}
#endif

typedef float (*dot_fn)(const float *, const float *, int64_t);

static dot_fn select_dot(void) {
#if defined(__x86_64__)
    if (ds4_simd_level() >= 1) return dot_avx2;
#endif
    return dot_scalar;
}

float ds4_dot(const float *a, const float *b, int64_t n) { return select_dot()(a, b, n); }

/* ---- linear: blocks of W rows, each block applied to every token ----
 * A block of rows stays in cache while all tokens pass, so the weights
 * stream from memory once per call whatever the number of tokens. Each
 * (row, token) product uses the same fused kernel (or its two-token twin
 * for pairs of tokens, which gives each the same bits), so one token gives
 * the same bits as many. */

#define LINEAR_BLOCK_BYTES 32768

struct linear_job {
    ds4_matrix w;
    const float *x;
    int64_t x_stride, n_tok;
    float *y;
    int64_t y_stride, rows_per_block;
    const uint8_t *xq;   /* x as Q8_0 (for Q8_0 rows) or Q8_K blocks, rows x_stride bytes apart; or NULL */
};

static void linear_task(void *ctx, int64_t begin, int64_t end, int thread) {
    (void)thread;
    const struct linear_job *j = ctx;
    for (int64_t b = begin; b < end; b++) {
        int64_t r0 = b * j->rows_per_block;
        int64_t r1 = r0 + j->rows_per_block < j->w.n_out ? r0 + j->rows_per_block : j->w.n_out;
        int64_t t = 0;
        /* two tokens a row at a time (the row decoded once, the same bits) */
        for (; t + 1 < j->n_tok; t += 2) {
            float *y0 = j->y + t * j->y_stride, *y1 = y0 + j->y_stride;
            for (int64_t r = r0; r < r1; r++) {
                const uint8_t *row = j->w.data + r * j->w.row_bytes;
                float pair[2];
                if (!j->xq) {
                    const float *x0 = j->x + t * j->x_stride;
                    ds4_vec_dot2_f32(j->w.type, row, x0, x0 + j->x_stride, j->w.n_in, pair);
                } else {
                    const uint8_t *q0 = j->xq + t * j->x_stride;
                    if (j->w.type == DS4_TYPE_Q8_0)
                        ds4_vec_dot2_q8_0_q8_0(row, q0, q0 + j->x_stride, j->w.n_in, pair);
                    else
                        ds4_vec_dot2_q8_k(j->w.type, row, q0, q0 + j->x_stride, j->w.n_in, pair);
                }
                y0[r] = pair[0], y1[r] = pair[1];
            }
        }
        for (; t < j->n_tok; t++) {
            float *yt = j->y + t * j->y_stride;
            for (int64_t r = r0; r < r1; r++) {
                const uint8_t *row = j->w.data + r * j->w.row_bytes;
                if (!j->xq)
                    yt[r] = ds4_vec_dot_f32(j->w.type, row, j->x + t * j->x_stride, j->w.n_in);
                else if (j->w.type == DS4_TYPE_Q8_0)
                    yt[r] = ds4_vec_dot_q8_0_q8_0(row, j->xq + t * j->x_stride, j->w.n_in);
                else
                    yt[r] = ds4_vec_dot_q8_k(j->w.type, row, j->xq + t * j->x_stride, j->w.n_in);
            }
        }
    }
}

static void run_linear_job(ds4_pool *pool, struct linear_job j) {
    const ds4_matrix w = j.w;
    const int64_t n_tok = j.n_tok;
    j.rows_per_block = w.row_bytes >= LINEAR_BLOCK_BYTES ? 1 : LINEAR_BLOCK_BYTES / w.row_bytes;
    int64_t blocks = (w.n_out + j.rows_per_block - 1) / j.rows_per_block;
    /* enough work per slice to amortise a wake-up: about 64k multiply-adds */
    int64_t per_block = j.rows_per_block * w.n_in * (n_tok ? n_tok : 1);
    ds4_parallel_for(pool, blocks, per_block >= 65536 ? 1 : 65536 / per_block, linear_task, &j);
}

void ds4_linear(ds4_pool *pool, ds4_matrix w, const float *x, int64_t x_stride, int64_t n_tok,
                float *y, int64_t y_stride) {
    struct linear_job j = {w, x, x_stride, n_tok, y, y_stride, 1, NULL};
    run_linear_job(pool, j);
}

void ds4_linear_act8(ds4_pool *pool, ds4_matrix w, const float *x, int64_t x_stride, int64_t n_tok,
                     float *y, int64_t y_stride, void *scratch) {
    struct linear_job j = {w, x, x_stride, n_tok, y, y_stride, 1, NULL};
    if (ds4_act8_rounds(w.type)) {
        /* ggml's activation blocks, by qat_round.h's rules (CUDA's k_act8 shares them) */
        int q80 = w.type == DS4_TYPE_Q8_0;
        int64_t qb = ds4_type_nbytes(q80 ? DS4_TYPE_Q8_0 : DS4_TYPE_Q8_K, w.n_in);
        for (int64_t t = 0; t < n_tok; t++) {
            uint8_t *dst = (uint8_t *)scratch + t * qb;
            if (q80) ds4_quantize_q8_0(x + t * x_stride, dst, w.n_in);
            else ds4_quantize_q8_k(x + t * x_stride, dst, w.n_in);
        }
        j.xq = scratch;
        j.x_stride = qb;
    }
    run_linear_job(pool, j);
}

/* ---- norms ---- */

void ds4_rms_norm(float *y, const float *x, const float *w, int64_t n, float eps) {
    double ss = 0;
    for (int64_t i = 0; i < n; i++) ss += (double)x[i] * x[i];
    float scale = (float)(1.0 / sqrt(ss / (double)n + (double)eps));
    if (w)
        for (int64_t i = 0; i < n; i++) y[i] = x[i] * scale * w[i];
    else
        for (int64_t i = 0; i < n; i++) y[i] = x[i] * scale;
}

/* ---- RoPE ---- */

static double yarn_corr_dim(double rotations, int dim, double base, double orig_ctx) {
    return dim * log(orig_ctx / (rotations * 2 * M_PI)) / (2 * log(base));
}

void ds4_rope_freqs(float *freqs, int rope_dim, float base, int yarn, float factor,
                    int64_t orig_ctx, float beta_fast, float beta_slow) {
    int half = rope_dim / 2;
    double low = 0, high = 0;
    if (yarn) {
        low = floor(yarn_corr_dim(beta_fast, rope_dim, base, (double)orig_ctx));
        high = ceil(yarn_corr_dim(beta_slow, rope_dim, base, (double)orig_ctx));
        if (low < 0) low = 0;
        if (high > rope_dim - 1) high = rope_dim - 1;
        if (low == high) high += 0.001;
    }
    for (int k = 0; k < half; k++) {
        /* float32 throughout, as torch computes the table */
        float pos_freq = powf(base, (float)(2 * k) / (float)rope_dim);
        float extrapolation = 1.0f / pos_freq;
        if (!yarn) {
            freqs[k] = extrapolation;
            continue;
        }
        float interpolation = 1.0f / (factor * pos_freq);
        float ramp = ((float)k - (float)low) / (float)(high - low);
        ramp = ramp < 0 ? 0 : ramp > 1 ? 1 : ramp;
        float extrapolation_factor = 1.0f - ramp;
        freqs[k] = interpolation * (1.0f - extrapolation_factor) + extrapolation * extrapolation_factor;
    }
}

void ds4_rope(float *x, int64_t dim, int rope_dim, const float *freqs, int64_t pos, int sign) {
    float *r = x + dim - rope_dim;
    for (int k = 0; k < rope_dim / 2; k++) {
        float phi = (float)pos * freqs[k];
        float c = cosf(phi), s = sign * sinf(phi);
        float x0 = r[2 * k], x1 = r[2 * k + 1];
        r[2 * k] = x0 * c - x1 * s;
        r[2 * k + 1] = x0 * s + x1 * c;
    }
}
