/* The DeepSeek V4 forward pass on the CPU (forward-pass.md §2-§5).
 *
 * A chunk of tokens goes through the model layer by layer. Projections run
 * as matrix products over the whole chunk; the steps that depend on the
 * order of positions (KV window, compressors, indexer, attention) run token
 * by token inside each layer. One token and a chunk give identical results. */
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qat.h"
#include "quants.h"
#include "session_state.h"

/* Buffers for one chunk of n tokens. */
struct chunk {
    int64_t n, pos0;
    float *X;          /* [n][hc][D] residual streams */
    float *u;          /* [n][hc*D] normalised flat streams */
    float *mix;        /* [n][(2+hc)*hc] HC controller outputs */
    float *post;       /* [n][hc] */
    float *comb;       /* [n][hc][hc] */
    float *x;          /* [n][D] sublayer input (collapsed streams) */
    float *xn;         /* [n][D] normed */
    float *qr;         /* [n][q_lora] */
    float *q;          /* [n][H*d] */
    float *kv;         /* [n][d] */
    float *kg;         /* [n][2][coff*d] compressor kappa, gamma */
    float *ikg;        /* [n][2][2*dI] indexer compressor kappa, gamma */
    float *iq;         /* [n][HI*dI] indexer queries */
    float *iw;         /* [n][HI] indexer head weights */
    float *o;          /* [n][H*d] attention output */
    float *low;        /* [n][G*r_o] */
    float *y;          /* [n][D] sublayer output */
    float *router;     /* [n][E] */
    int32_t *sel;      /* [n][k] experts */
    float *sel_w;      /* [n][k] their weights */
    float *ex_x;       /* [n][D] tokens routed to one expert */
    float *ex_g;       /* [n][F] */
    float *ex_u;       /* [n][F] */
    float *ex_y;       /* [n][D] */
    float *xq;         /* qat-q8: scratch for a product's x in its rounded forms (else NULL) */
};

static void free_chunk(struct chunk *c) {
    float **bufs[] = {&c->X, &c->u, &c->mix, &c->post, &c->comb, &c->x, &c->xn, &c->qr, &c->q,
                      &c->kv, &c->kg, &c->ikg, &c->iq, &c->iw, &c->o, &c->low, &c->y, &c->router,
                      &c->sel_w, &c->ex_x, &c->ex_g, &c->ex_u, &c->ex_y, &c->xq};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) {
        free(*bufs[i]);
        *bufs[i] = NULL;
    }
    free(c->sel);
    c->sel = NULL;
}

static int alloc_chunk(struct chunk *c, const ds4_config *cf, int64_t n, int numerics) {
    memset(c, 0, sizeof *c);
    c->n = n;
    int64_t D = cf->n_embd, hc = cf->n_hc, d = cf->head_dim, F = cf->expert_ff * cf->n_shared_experts;
    if (cf->expert_ff > F) F = cf->expert_ff;
    /* a token may pick one expert more than once (hash tables allow it) */
    int64_t nk = n * cf->n_expert_used;
    struct { float **p; int64_t count; } a[] = {
        {&c->X, n * hc * D}, {&c->u, n * hc * D}, {&c->mix, n * (2 + hc) * hc}, {&c->post, n * hc},
        {&c->comb, n * hc * hc}, {&c->x, n * D}, {&c->xn, n * D}, {&c->qr, n * cf->q_lora_rank},
        {&c->q, n * cf->n_head * d}, {&c->kv, n * d}, {&c->kg, n * 2 * 2 * d},
        {&c->ikg, n * 2 * 2 * cf->indexer_dim}, {&c->iq, n * cf->indexer_heads * cf->indexer_dim},
        {&c->iw, n * cf->indexer_heads}, {&c->o, n * cf->n_head * d},
        {&c->low, n * cf->o_groups * cf->o_lora_rank}, {&c->y, n * D}, {&c->router, n * cf->n_expert},
        {&c->sel_w, n * cf->n_expert_used}, {&c->ex_x, nk * D}, {&c->ex_g, nk * F}, {&c->ex_u, nk * F},
        {&c->ex_y, nk * D},
    };
    for (size_t i = 0; i < sizeof a / sizeof a[0]; i++)
        if (!(*a[i].p = malloc((size_t)a[i].count * sizeof(float)))) goto oom;
    if (!(c->sel = malloc((size_t)(n * cf->n_expert_used) * sizeof(int32_t)))) goto oom;
    if (numerics == DS4_NUMERICS_QAT_Q8) {   /* the widest x a quantized product takes */
        int64_t G = cf->o_groups, widest = nk * (D > F ? D : F), dense[] = {
            n * cf->q_lora_rank, n * G * cf->o_lora_rank, n * cf->n_head * d / G};
        for (size_t i = 0; i < sizeof dense / sizeof dense[0]; i++)
            if (dense[i] > widest) widest = dense[i];
        if (!(c->xq = malloc((size_t)widest * sizeof(float)))) goto oom;
    }
    return 0;
oom:
    free_chunk(c);
    return -1;
}

static const float *f32(const ds4_tensor *t) { return (const float *)t->data; }

/* Y[t] = W X[t] for n tokens; in qat-q8 mode a quantized W takes X as
 * int8 codes times block scales (ds4_linear_act8), as ggml multiplies. */
static void project(ds4_session *s, struct chunk *c, ds4_matrix w, const float *x, int64_t xs,
                    int64_t n, float *y, int64_t ys) {
    if (s->numerics == DS4_NUMERICS_QAT_Q8)
        ds4_linear_act8(s->pool, w, x, xs, n, y, ys, c->xq);
    else
        ds4_linear(s->pool, w, x, xs, n, y, ys);
}

/* ---- hyper-connections (§2) ---- */

/* The HC controller of one site for every token: collapsed input x, and the
 * post weights and comb matrix for the expand after the sublayer (§2.2). */
static void hc_controller(ds4_session *s, struct chunk *c, const ds4_tensor *fn,
                          const ds4_tensor *base, const ds4_tensor *scale) {
    const ds4_config *cf = &s->model->cfg;
    int64_t hc = cf->n_hc, D = cf->n_embd, n_mix = (2 + hc) * hc;
    for (int64_t t = 0; t < c->n; t++)
        ds4_rms_norm(c->u + t * hc * D, c->X + t * hc * D, NULL, hc * D, cf->rms_eps);
    project(s, c, ds4_matrix_of(fn), c->u, hc * D, c->n, c->mix, n_mix);
    const float *b = f32(base), *sc = f32(scale);
    float eps = cf->hc_eps;
    for (int64_t t = 0; t < c->n; t++) {
        const float *mu = c->mix + t * n_mix;
        float pre[16], *post = c->post + t * hc, *C = c->comb + t * hc * hc;
        for (int64_t i = 0; i < hc; i++) {
            pre[i] = ds4_sigmoid(mu[i] * sc[0] + b[i]) + eps;
            post[i] = 2.0f * ds4_sigmoid(mu[hc + i] * sc[1] + b[hc + i]);
        }
        /* comb: row softmax + eps, then Sinkhorn: columns, (rows, columns) x (iters-1) */
        for (int64_t i = 0; i < hc; i++) {
            float *row = C + i * hc, m = -INFINITY, sum = 0;
            for (int64_t j = 0; j < hc; j++) {
                row[j] = mu[2 * hc + i * hc + j] * sc[2] + b[2 * hc + i * hc + j];
                m = fmaxf(m, row[j]);
            }
            for (int64_t j = 0; j < hc; j++) sum += row[j] = expf(row[j] - m);
            for (int64_t j = 0; j < hc; j++) row[j] = row[j] / sum + eps;
        }
        for (int it = 0; it < cf->sinkhorn_iters; it++) {
            if (it > 0)
                for (int64_t i = 0; i < hc; i++) {
                    float sum = 0;
                    for (int64_t j = 0; j < hc; j++) sum += C[i * hc + j];
                    for (int64_t j = 0; j < hc; j++) C[i * hc + j] /= sum + eps;
                }
            for (int64_t j = 0; j < hc; j++) {
                float sum = 0;
                for (int64_t i = 0; i < hc; i++) sum += C[i * hc + j];
                for (int64_t i = 0; i < hc; i++) C[i * hc + j] /= sum + eps;
            }
        }
        float *x = c->x + t * D;
        const float *X = c->X + t * hc * D;
        for (int64_t k = 0; k < D; k++) {
            float acc = 0;
            for (int64_t i = 0; i < hc; i++) acc += pre[i] * X[i * D + k];
            x[k] = acc;
        }
    }
}

/* X'_j = post_j * y + sum_i C_ij X_i (§2.3). */
static void hc_expand(const ds4_config *cf, struct chunk *c) {
    int64_t hc = cf->n_hc, D = cf->n_embd;
    float *mixed = c->u;  /* free at this point: reused as the new state */
    for (int64_t t = 0; t < c->n; t++) {
        const float *X = c->X + t * hc * D, *C = c->comb + t * hc * hc, *post = c->post + t * hc;
        const float *y = c->y + t * D;
        float *Xn = mixed + t * hc * D;
        for (int64_t j = 0; j < hc; j++)
            for (int64_t k = 0; k < D; k++) {
                float acc = 0;
                for (int64_t i = 0; i < hc; i++) acc += C[i * hc + j] * X[i * D + k];
                Xn[j * D + k] = post[j] * y[k] + acc;
            }
    }
    memcpy(c->X, mixed, (size_t)(c->n * hc * D) * sizeof(float));
}

/* ---- attention (§3) ---- */

static const float *layer_rope(const ds4_session *s, const ds4_layer_state *ls) {
    return ls->ratio ? s->rope_comp : s->rope_main;
}

/* Pools window w of a compressor into one row (§3.6): a softmax over the
 * window's slots per channel; with overlap (coff 2) the previous window's
 * first halves join the current window's second halves. */
static void compress_window(const float *kg_ring, int64_t cap, int64_t width, int64_t dim, int m,
                            int coff, int64_t w, float *out) {
    int64_t first = coff == 2 ? (w - 1) * m : w * m;
    if (first < 0) first = w * m;   /* window 0: the previous slots do not exist */
    int64_t last = w * m + m;       /* exclusive */
    for (int64_t j = 0; j < dim; j++) {
        float mx = -INFINITY;
        for (int64_t p = first; p < last; p++) {
            const float *gamma = kg_ring + ((p % cap) * 2 + 1) * width;
            int64_t off = (coff == 2 && p >= w * m) ? dim : 0;
            mx = fmaxf(mx, gamma[off + j]);
        }
        float sum = 0;
        for (int64_t p = first; p < last; p++) {
            const float *gamma = kg_ring + ((p % cap) * 2 + 1) * width;
            int64_t off = (coff == 2 && p >= w * m) ? dim : 0;
            sum += expf(gamma[off + j] - mx);
        }
        float acc = 0;
        for (int64_t p = first; p < last; p++) {
            const float *kappa = kg_ring + ((p % cap) * 2) * width;
            const float *gamma = kappa + width;
            int64_t off = (coff == 2 && p >= w * m) ? dim : 0;
            acc += expf(gamma[off + j] - mx) / sum * kappa[off + j];
        }
        out[j] = acc;
    }
}

/* A row leaving a compressor: norm, RoPE at w*m, then the qat step. */
static void finish_row(const ds4_session *s, float *row, int64_t dim, const ds4_tensor *norm,
                       int64_t pos, int is_indexer) {
    const ds4_config *cf = &s->model->cfg;
    ds4_rms_norm(row, row, f32(norm), dim, cf->rms_eps);
    ds4_rope(row, dim, cf->rope_dim, s->rope_comp, pos, 1);
    if (s->numerics != DS4_NUMERICS_EXACT) {
        if (is_indexer)
            ds4_qat_hadamard_fp4(row, dim);
        else
            ds4_qat_fp8_blocks(row, dim - cf->rope_dim);
    }
}

struct sel_entry {
    float score;
    int64_t index;
};

static int by_score_then_index(const void *pa, const void *pb) {
    const struct sel_entry *a = pa, *b = pb;
    if (a->score != b->score) return a->score > b->score ? -1 : 1;
    return (a->index > b->index) - (a->index < b->index);
}

static int by_index(const void *pa, const void *pb) {
    int64_t a = *(const int64_t *)pa, b = *(const int64_t *)pb;
    return (a > b) - (a < b);
}

/* Lightning indexer (§3.7): the compressed rows query t attends to. */
static int64_t indexer_select(const ds4_session *s, const ds4_layer_state *ls, const float *iq,
                              const float *iw, int64_t n_rows, int64_t *sel, struct sel_entry *tmp) {
    const ds4_config *cf = &s->model->cfg;
    if (n_rows <= cf->indexer_top_k) {
        for (int64_t r = 0; r < n_rows; r++) sel[r] = r;
        return n_rows;
    }
    int64_t dI = cf->indexer_dim, HI = cf->indexer_heads;
    float score_scale = 1.0f / sqrtf((float)dI);
    for (int64_t r = 0; r < n_rows; r++) {
        const float *K = ls->idx_rows + r * dI;
        float score = 0;
        for (int64_t h = 0; h < HI; h++) {
            float dot = ds4_dot(iq + h * dI, K, dI);
            score += (dot > 0 ? dot : 0) * score_scale * iw[h];
        }
        tmp[r].score = score;
        tmp[r].index = r;
    }
    qsort(tmp, (size_t)n_rows, sizeof *tmp, by_score_then_index);
    for (int64_t k = 0; k < cf->indexer_top_k; k++) sel[k] = tmp[k].index;
    qsort(sel, (size_t)cf->indexer_top_k, sizeof *sel, by_index);
    return cf->indexer_top_k;
}

struct attn_job {
    const ds4_session *s;
    const ds4_layer_state *ls;
    const float *sinks;
    const float *q;        /* [H][d] of this token */
    float *o;              /* [H][d] */
    int64_t raw_first, raw_last;   /* inclusive positions */
    const int64_t *rows;   /* compressed rows attended */
    int64_t n_rows;
};

/* Attention with sinks (§3.9) for heads [h0, h1), then the inverse RoPE (§3.10). */
static void attend_heads(void *ctx, int64_t h0, int64_t h1, int thread) {
    (void)thread;
    struct attn_job *j = ctx;
    const ds4_config *cf = &j->s->model->cfg;
    int64_t d = cf->head_dim, n_raw = j->raw_last - j->raw_first + 1;
    float scale = 1.0f / sqrtf((float)d);
    float *logit = malloc((size_t)(n_raw + j->n_rows) * sizeof(float));
    if (!logit) return;
    for (int64_t h = h0; h < h1; h++) {
        const float *qh = j->q + h * d;
        float *oh = j->o + h * d;
        float mx = j->sinks[h];
        for (int64_t r = 0; r < n_raw; r++) {
            const float *K = j->ls->raw + ((j->raw_first + r) % j->s->cap_raw) * d;
            logit[r] = ds4_dot(qh, K, d) * scale;
            mx = fmaxf(mx, logit[r]);
        }
        for (int64_t r = 0; r < j->n_rows; r++) {
            logit[n_raw + r] = ds4_dot(qh, j->ls->rows + j->rows[r] * d, d) * scale;
            mx = fmaxf(mx, logit[n_raw + r]);
        }
        float den = expf(j->sinks[h] - mx);
        for (int64_t r = 0; r < n_raw + j->n_rows; r++) den += logit[r] = expf(logit[r] - mx);
        memset(oh, 0, (size_t)d * sizeof(float));
        for (int64_t r = 0; r < n_raw + j->n_rows; r++) {
            const float *V = r < n_raw ? j->ls->raw + ((j->raw_first + r) % j->s->cap_raw) * d
                                       : j->ls->rows + j->rows[r - n_raw] * d;
            float p = logit[r] / den;
            for (int64_t k = 0; k < d; k++) oh[k] += p * V[k];
        }
        ds4_rope(oh, d, cf->rope_dim, layer_rope(j->s, j->ls), j->raw_last, -1);
    }
    free(logit);
}

static int attention(ds4_session *s, int l, struct chunk *c) {
    const ds4_config *cf = &s->model->cfg;
    const ds4_layer *L = &s->model->layers[l];
    ds4_layer_state *ls = &s->layers[l];
    int64_t n = c->n, D = cf->n_embd, d = cf->head_dim, H = cf->n_head;
    int64_t m = ls->ratio, dI = cf->indexer_dim, HI = cf->indexer_heads;
    const float *rope = layer_rope(s, ls);

    for (int64_t t = 0; t < n; t++)
        ds4_rms_norm(c->xn + t * D, c->x + t * D, f32(&L->attn_norm), D, cf->rms_eps);

    /* query path (§3.1) */
    project(s, c, ds4_matrix_of(&L->attn_q_a), c->xn, D, n, c->qr, cf->q_lora_rank);
    for (int64_t t = 0; t < n; t++)
        ds4_rms_norm(c->qr + t * cf->q_lora_rank, c->qr + t * cf->q_lora_rank,
                     f32(&L->attn_q_a_norm), cf->q_lora_rank, cf->rms_eps);
    project(s, c, ds4_matrix_of(&L->attn_q_b), c->qr, cf->q_lora_rank, n, c->q, H * d);
    for (int64_t t = 0; t < n; t++)
        for (int64_t h = 0; h < H; h++) {
            float *qh = c->q + (t * H + h) * d;
            ds4_rms_norm(qh, qh, NULL, d, cf->rms_eps);
            ds4_rope(qh, d, cf->rope_dim, rope, c->pos0 + t, 1);
        }

    /* KV path (§3.2) */
    project(s, c, ds4_matrix_of(&L->attn_kv), c->xn, D, n, c->kv, d);
    for (int64_t t = 0; t < n; t++) {
        float *kv = c->kv + t * d;
        ds4_rms_norm(kv, kv, f32(&L->attn_kv_a_norm), d, cf->rms_eps);
        ds4_rope(kv, d, cf->rope_dim, rope, c->pos0 + t, 1);
        if (s->numerics != DS4_NUMERICS_EXACT) ds4_qat_fp8_blocks(kv, d - cf->rope_dim);
    }

    /* compressor and indexer projections (§3.6, §3.7) */
    int64_t cw = ls->coff * d, iw2 = 2 * dI;
    if (m) {
        project(s, c, ds4_matrix_of(&L->comp_kv), c->xn, D, n, c->kg, 2 * cw);
        project(s, c, ds4_matrix_of(&L->comp_gate), c->xn, D, n, c->kg + cw, 2 * cw);
    }
    if (ls->indexer) {
        project(s, c, ds4_matrix_of(&L->idx_comp_kv), c->xn, D, n, c->ikg, 2 * iw2);
        project(s, c, ds4_matrix_of(&L->idx_comp_gate), c->xn, D, n, c->ikg + iw2, 2 * iw2);
        project(s, c, ds4_matrix_of(&L->idx_q_b), c->qr, cf->q_lora_rank, n, c->iq, HI * dI);
        project(s, c, ds4_matrix_of(&L->idx_proj), c->xn, D, n, c->iw, HI);
        float w_scale = 1.0f / sqrtf((float)HI);
        for (int64_t t = 0; t < n; t++) {
            for (int64_t h = 0; h < HI; h++) {
                float *qh = c->iq + (t * HI + h) * dI;
                ds4_rope(qh, dI, cf->rope_dim, s->rope_comp, c->pos0 + t, 1);
                if (s->numerics != DS4_NUMERICS_EXACT) ds4_qat_hadamard_fp4(qh, dI);
                c->iw[t * HI + h] *= w_scale;
            }
        }
    }

    /* position by position: window, compressors, indexer, attention */
    int64_t max_rows = m ? (c->pos0 + n) / m : 0;
    int64_t *sel = malloc((size_t)(max_rows + 1) * sizeof *sel);
    struct sel_entry *tmp = ls->indexer ? malloc((size_t)(max_rows + 1) * sizeof *tmp) : NULL;
    if (!sel || (ls->indexer && !tmp)) {
        free(sel);
        free(tmp);
        return -1;
    }
    for (int64_t t = 0; t < n; t++) {
        int64_t pos = c->pos0 + t;
        memcpy(ls->raw + (pos % s->cap_raw) * d, c->kv + t * d, (size_t)d * sizeof(float));
        int64_t n_rows = 0;
        if (m) {
            /* kappa, gamma + APE row of the position inside its window */
            float *slot = ls->kg + (pos % ls->cap_kg) * 2 * cw;
            memcpy(slot, c->kg + t * 2 * cw, (size_t)(2 * cw) * sizeof(float));
            for (int64_t k = 0; k < cw; k++)
                slot[cw + k] += ds4_fp16_to_fp32(((const uint16_t *)L->comp_ape.data)[(pos % m) * cw + k]);
            if (ls->indexer) {
                float *islot = ls->idx_kg + (pos % ls->cap_kg) * 2 * iw2;
                memcpy(islot, c->ikg + t * 2 * iw2, (size_t)(2 * iw2) * sizeof(float));
                for (int64_t k = 0; k < iw2; k++)
                    islot[iw2 + k] +=
                        ds4_fp16_to_fp32(((const uint16_t *)L->idx_comp_ape.data)[(pos % m) * iw2 + k]);
            }
            if ((pos + 1) % m == 0) {
                int64_t w = pos / m;
                float *row = ls->rows + w * d;
                compress_window(ls->kg, ls->cap_kg, cw, d, (int)m, ls->coff, w, row);
                finish_row(s, row, d, &L->comp_norm, w * m, 0);
                if (ls->indexer) {
                    float *irow = ls->idx_rows + w * dI;
                    compress_window(ls->idx_kg, ls->cap_kg, iw2, dI, (int)m, 2, w, irow);
                    finish_row(s, irow, dI, &L->idx_comp_norm, w * m, 1);
                }
            }
            n_rows = (pos + 1) / m;
        }
        struct attn_job job = {s, ls, f32(&L->attn_sinks), c->q + t * H * d, c->o + t * H * d,
                               pos - cf->sliding_window + 1 > 0 ? pos - cf->sliding_window + 1 : 0,
                               pos, sel, 0};
        if (ls->indexer) {
            job.n_rows = indexer_select(s, ls, c->iq + t * HI * dI, c->iw + t * HI, n_rows, sel, tmp);
        } else {
            for (int64_t r = 0; r < n_rows; r++) sel[r] = r;
            job.n_rows = n_rows;
        }
        ds4_parallel_for(s->pool, H, 1, attend_heads, &job);
    }
    free(sel);
    free(tmp);

    /* grouped output projection (§3.10) */
    int64_t G = cf->o_groups, per_group = H * d / G, r_o = cf->o_lora_rank;
    ds4_matrix wo_a = ds4_matrix_of(&L->attn_output_a);
    for (int64_t g = 0; g < G; g++)
        project(s, c, ds4_matrix_rows(wo_a, g * r_o, r_o), c->o + g * per_group, H * d, n,
                c->low + g * r_o, G * r_o);
    project(s, c, ds4_matrix_of(&L->attn_output_b), c->low, G * r_o, n, c->y, D);
    return 0;
}

/* ---- MoE (§4) ---- */

static float softplus(float z) { return z > 20.0f ? z : log1pf(expf(z)); }

static void route(const ds4_session *s, const ds4_layer *L, struct chunk *c, const int32_t *ids) {
    const ds4_config *cf = &s->model->cfg;
    int64_t E = cf->n_expert, k = cf->n_expert_used;
    float *score = malloc((size_t)E * sizeof(float));
    if (!score) return;
    for (int64_t t = 0; t < c->n; t++) {
        const float *logit = c->router + t * E;
        int32_t *sel = c->sel + t * k;
        float *w = c->sel_w + t * k;
        for (int64_t e = 0; e < E; e++) score[e] = sqrtf(softplus(logit[e]));
        if (L->hash_routed) {
            const int32_t *row = (const int32_t *)L->tid2eid.data + (int64_t)ids[t] * k;
            for (int64_t i = 0; i < k; i++) memcpy(&sel[i], &row[i], 4);
        } else {
            const float *bias = L->exp_probs_b.data ? f32(&L->exp_probs_b) : NULL;
            for (int64_t i = 0; i < k; i++) {   /* top-k, lowest index wins ties */
                int64_t best = -1;
                float best_v = -INFINITY;
                for (int64_t e = 0; e < E; e++) {
                    int taken = 0;
                    for (int64_t j = 0; j < i; j++) taken |= sel[j] == e;
                    float v = score[e] + (bias ? bias[e] : 0.0f);
                    if (!taken && (best < 0 || v > best_v)) {
                        best = e;
                        best_v = v;
                    }
                }
                sel[i] = (int32_t)best;
            }
        }
        float sum = 0;
        for (int64_t i = 0; i < k; i++) sum += score[sel[i]];
        for (int64_t i = 0; i < k; i++) w[i] = score[sel[i]] / (sum + 1e-20f) * cf->expert_weights_scale;
    }
    free(score);
}

/* SwiGLU with the clamp (§4.4): g <- min(g, c), u <- clamp(u, -c, c). */
static void swiglu(float *g, const float *u, int64_t n, float clamp) {
    for (int64_t i = 0; i < n; i++) {
        float gi = fminf(g[i], clamp), ui = fminf(fmaxf(u[i], -clamp), clamp);
        g[i] = gi * (1.0f / (1.0f + expf(-gi))) * ui;
    }
}

static void moe(ds4_session *s, int l, struct chunk *c, const int32_t *ids) {
    const ds4_config *cf = &s->model->cfg;
    const ds4_layer *L = &s->model->layers[l];
    int64_t n = c->n, D = cf->n_embd, F = cf->expert_ff, k = cf->n_expert_used;
    for (int64_t t = 0; t < n; t++)
        ds4_rms_norm(c->xn + t * D, c->x + t * D, f32(&L->ffn_norm), D, cf->rms_eps);
    project(s, c, ds4_matrix_of(&L->ffn_gate_inp), c->xn, D, n, c->router, cf->n_expert);
    route(s, L, c, ids);

    /* routed experts, in expert order, each over the tokens that chose it */
    memset(c->y, 0, (size_t)(n * D) * sizeof(float));
    int64_t *tok = malloc((size_t)(n * k) * sizeof *tok);
    float *wt = malloc((size_t)(n * k) * sizeof *wt);
    for (int64_t e = 0; tok && wt && e < cf->n_expert; e++) {
        int64_t ne = 0;
        for (int64_t t = 0; t < n; t++)
            for (int64_t i = 0; i < k; i++)
                if (c->sel[t * k + i] == e) {
                    tok[ne] = t;
                    wt[ne] = c->sel_w[t * k + i];
                    memcpy(c->ex_x + ne * D, c->xn + t * D, (size_t)D * sizeof(float));
                    ne++;
                }
        if (!ne) continue;
        project(s, c, ds4_expert_matrix(&L->ffn_gate_exps, e), c->ex_x, D, ne, c->ex_g, F);
        project(s, c, ds4_expert_matrix(&L->ffn_up_exps, e), c->ex_x, D, ne, c->ex_u, F);
        for (int64_t r = 0; r < ne; r++) swiglu(c->ex_g + r * F, c->ex_u + r * F, F, L->swiglu_clamp);
        project(s, c, ds4_expert_matrix(&L->ffn_down_exps, e), c->ex_g, F, ne, c->ex_y, D);
        for (int64_t r = 0; r < ne; r++)
            for (int64_t j = 0; j < D; j++) c->y[tok[r] * D + j] += c->ex_y[r * D + j] * wt[r];
    }
    free(tok);
    free(wt);

    /* shared expert, weight 1 */
    int64_t Fs = F * cf->n_shared_experts;
    project(s, c, ds4_matrix_of(&L->ffn_gate_shexp), c->xn, D, n, c->ex_g, Fs);
    project(s, c, ds4_matrix_of(&L->ffn_up_shexp), c->xn, D, n, c->ex_u, Fs);
    for (int64_t t = 0; t < n; t++) swiglu(c->ex_g + t * Fs, c->ex_u + t * Fs, Fs, L->swiglu_clamp);
    project(s, c, ds4_matrix_of(&L->ffn_down_shexp), c->ex_g, Fs, n, c->ex_y, D);
    for (int64_t i = 0; i < n * D; i++) c->y[i] += c->ex_y[i];
}

/* ---- the whole model ---- */

static void embed(const ds4_session *s, struct chunk *c, const int32_t *ids) {
    const ds4_config *cf = &s->model->cfg;
    int64_t D = cf->n_embd, hc = cf->n_hc;
    const ds4_tensor *E = &s->model->token_embd;
    for (int64_t t = 0; t < c->n; t++) {
        float *X = c->X + t * hc * D;
        ds4_dequantize(E->type, (const uint8_t *)E->data + (int64_t)ids[t] * E->row_bytes, X, D);
        for (int64_t i = 1; i < hc; i++) memcpy(X + i * D, X, (size_t)D * sizeof(float));
    }
}

/* HC head, final norm and LM head (§2.5, §5) for tokens [t0, n). */
static void logits_out(ds4_session *s, struct chunk *c, int64_t t0, float *logits) {
    const ds4_config *cf = &s->model->cfg;
    const ds4_model *M = s->model;
    int64_t D = cf->n_embd, hc = cf->n_hc, n = c->n - t0;
    for (int64_t t = t0; t < c->n; t++)
        ds4_rms_norm(c->u + t * hc * D, c->X + t * hc * D, NULL, hc * D, cf->rms_eps);
    project(s, c, ds4_matrix_of(&M->output_hc_fn), c->u + t0 * hc * D, hc * D, n,
            c->mix, hc);
    const float *base = f32(&M->output_hc_base), scale = f32(&M->output_hc_scale)[0];
    for (int64_t t = 0; t < n; t++) {
        const float *X = c->X + (t0 + t) * hc * D;
        float w[16], *h = c->x + t * D;
        for (int64_t i = 0; i < hc; i++) w[i] = ds4_sigmoid(c->mix[t * hc + i] * scale + base[i]) + cf->hc_eps;
        for (int64_t k = 0; k < D; k++) {
            float acc = 0;
            for (int64_t i = 0; i < hc; i++) acc += w[i] * X[i * D + k];
            h[k] = acc;
        }
        ds4_rms_norm(h, h, f32(&M->output_norm), D, cf->rms_eps);
    }
    project(s, c, ds4_matrix_of(&M->output), c->x, D, n, logits, cf->n_vocab);
}

int ds4_forward(ds4_session *s, int64_t n, float *logits, int all_logits, char *err, size_t errlen) {
    const ds4_config *cf = &s->model->cfg;
    struct chunk c;
    if (alloc_chunk(&c, cf, n, s->numerics)) {
        snprintf(err, errlen, "out of memory for a chunk of %lld tokens", (long long)n);
        return -1;
    }
    c.pos0 = s->n_tokens;
    const int32_t *ids = s->ids + s->n_tokens;
    embed(s, &c, ids);
    for (int l = 0; l < cf->n_layer; l++) {
        const ds4_layer *L = &s->model->layers[l];
        hc_controller(s, &c, &L->hc_attn_fn, &L->hc_attn_base, &L->hc_attn_scale);
        if (attention(s, l, &c)) {
            free_chunk(&c);
            snprintf(err, errlen, "out of memory in attention");
            return -1;
        }
        hc_expand(cf, &c);
        hc_controller(s, &c, &L->hc_ffn_fn, &L->hc_ffn_base, &L->hc_ffn_scale);
        moe(s, l, &c, ids);
        hc_expand(cf, &c);
    }
    if (logits) logits_out(s, &c, all_logits ? 0 : n - 1, logits);
    free_chunk(&c);
    return 0;
}
