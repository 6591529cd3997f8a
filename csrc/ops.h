/* Internal: the numeric building blocks of the forward pass (float32). */
#ifndef DS4_OPS_H
#define DS4_OPS_H

#include <math.h>
#include <stdint.h>

#include "threads.h"
#include "weights.h"

/* A weight matrix W[n_out][n_in] in its storage type: a 2-D tensor, or one
 * expert of a 3-D expert stack. */
typedef struct {
    const uint8_t *data;
    int type;
    int64_t n_in, n_out, row_bytes;
} ds4_matrix;

ds4_matrix ds4_matrix_of(const ds4_tensor *t);
ds4_matrix ds4_expert_matrix(const ds4_tensor *t, int64_t expert);
/* Rows [row0, row0 + n_rows) of a matrix. */
ds4_matrix ds4_matrix_rows(ds4_matrix m, int64_t row0, int64_t n_rows);

/* Y[t] = W · X[t] for t < n_tok. X rows are n_in floats, Y rows n_out floats,
 * with the given strides. Blocks of W rows are reused for every token
 * (matrix-matrix), and one token gives bit-identical results to many, so
 * prefill and decode agree exactly. Activations stay float32: Q8_K
 * activations were measured 3-4% off on logits, far from the 1e-3 bar. */
void ds4_linear(ds4_pool *pool, ds4_matrix w, const float *x, int64_t x_stride, int64_t n_tok,
                float *y, int64_t y_stride);

/* ds4_linear with x as the qat-q8 mode hands it to w (ds4_act8_rounds): its
 * Q8_0 blocks (Q8_0 rows) or Q8_K blocks (Q2_K / Q4_K / IQ2_XXS rows) into
 * the integer dot kernels (the same values, summed as integers); float rows
 * take x itself. scratch: n_tok * n_in floats' bytes. */
void ds4_linear_act8(ds4_pool *pool, ds4_matrix w, const float *x, int64_t x_stride, int64_t n_tok,
                     float *y, int64_t y_stride, void *scratch);

float ds4_dot(const float *a, const float *b, int64_t n);

/* y = x / sqrt(mean(x^2) + eps) * w (w may be NULL: unweighted). In place is fine. */
void ds4_rms_norm(float *y, const float *x, const float *w, int64_t n, float eps);

/* RoPE frequencies (forward-pass.md §3.4), one per rotated pair. */
void ds4_rope_freqs(float *freqs, int rope_dim, float base, int yarn, float factor,
                    int64_t orig_ctx, float beta_fast, float beta_slow);
/* Rotates the trailing rope_dim dims of x (interleaved pairs) at `pos`;
 * sign -1 applies the inverse rotation. */
void ds4_rope(float *x, int64_t dim, int rope_dim, const float *freqs, int64_t pos, int sign);

static inline float ds4_sigmoid(float z) { return 1.0f / (1.0f + expf(-z)); }

#endif
