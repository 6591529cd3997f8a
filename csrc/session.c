/* Sessions: KV state allocation, evaluation in chunks, rewind, snapshots. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backend.h"
#include "sample.h"
#include "session_state.h"
#include "weights.h"

#define REWIND_BUDGET 512
#define SNAPSHOT_MAGIC 0x53345344u   /* "DS4S" */
#define SNAPSHOT_VERSION 2u   /* 2: + the rewind floor; 1 is still read */

static void free_layers(ds4_session *s) {
    if (!s->layers) return;
    for (int l = 0; l < s->model->cfg.n_layer; l++) {
        ds4_layer_state *ls = &s->layers[l];
        free(ls->kg);
        free(ls->idx_kg);
        free(ls->rows);
        free(ls->idx_rows);
        free(ls->raw);
    }
    free(s->layers);
    s->layers = NULL;
}

void ds4_session_free(ds4_session *s) {
    if (!s) return;
    const ds4_backend *b = ds4_model_backend(s->model);
    if (s->backend_state && b->session_free) b->session_free(s);
    free_layers(s);
    ds4_pool_free(s->pool);
    free(s->ids);
    free(s->logits);
    free(s->rope_main);
    free(s->rope_comp);
    ds4_model_release(s->model);
    free(s);
}

static float *alloc_floats(int64_t n) {
    return calloc((size_t)(n > 0 ? n : 1), sizeof(float));
}

int ds4_session_new(const ds4_model *m, int64_t ctx, int numerics, int n_threads,
                    ds4_session **out, char *err, size_t errlen) {
    *out = NULL;
    const ds4_config *cf = &m->cfg;
    if (ctx <= 0 || ctx > INT32_MAX) {
        snprintf(err, errlen, "context size %lld is out of range", (long long)ctx);
        return -1;
    }
    if (numerics != DS4_NUMERICS_EXACT && numerics != DS4_NUMERICS_QAT && numerics != DS4_NUMERICS_QAT_Q8) {
        snprintf(err, errlen, "unknown numeric mode %d", numerics);
        return -1;
    }
    if (numerics != DS4_NUMERICS_EXACT && (cf->indexer_dim & (cf->indexer_dim - 1))) {
        snprintf(err, errlen, "qat numerics need a power-of-two indexer head dim (got %d)",
                 cf->indexer_dim);
        return -1;
    }
    ds4_session *s = calloc(1, sizeof *s);
    if (!s) goto oom;
    s->model = m;
    ds4_model_retain(m);
    s->numerics = numerics;
    s->ctx = ctx;
    s->rewind_budget = REWIND_BUDGET;
    s->cap_raw = cf->sliding_window + REWIND_BUDGET;
    s->pool = ds4_pool_new(n_threads);
    s->ids = calloc((size_t)ctx, sizeof *s->ids);
    s->logits = alloc_floats(cf->n_vocab);
    s->rope_main = alloc_floats(cf->rope_dim / 2);
    s->rope_comp = alloc_floats(cf->rope_dim / 2);
    s->layers = calloc((size_t)cf->n_layer, sizeof *s->layers);
    if (!s->pool || !s->ids || !s->logits || !s->rope_main || !s->rope_comp || !s->layers) goto oom;
    ds4_rope_freqs(s->rope_main, cf->rope_dim, cf->rope_freq_base, 0, 1, 1, 0, 0);
    ds4_rope_freqs(s->rope_comp, cf->rope_dim, cf->compress_rope_freq_base, 1,
                   cf->rope_scaling_factor, cf->rope_orig_ctx, cf->yarn_beta_fast, cf->yarn_beta_slow);
    for (int l = 0; l < cf->n_layer; l++) {
        ds4_layer_state *ls = &s->layers[l];
        const ds4_layer *L = &m->layers[l];
        ls->ratio = L->compress_ratio;
        ls->coff = ls->ratio == 4 ? 2 : 1;
        ls->indexer = ls->ratio == 4;
        if (!(ls->raw = alloc_floats(s->cap_raw * cf->head_dim))) goto oom;
        if (!ls->ratio) continue;
        ls->cap_kg = 2 * ls->ratio + REWIND_BUDGET;
        ls->cap_rows = ctx / ls->ratio + 1;
        if (!(ls->kg = alloc_floats(ls->cap_kg * 2 * ls->coff * cf->head_dim)) ||
            !(ls->rows = alloc_floats(ls->cap_rows * cf->head_dim)))
            goto oom;
        if (ls->indexer && (!(ls->idx_kg = alloc_floats(ls->cap_kg * 2 * 2 * cf->indexer_dim)) ||
                            !(ls->idx_rows = alloc_floats(ls->cap_rows * cf->indexer_dim))))
            goto oom;
    }
    const ds4_backend *b = ds4_model_backend(m);
    if (b->session_init && b->session_init(s, err, errlen)) {
        ds4_session_free(s);
        return -1;
    }
    *out = s;
    return 0;
oom:
    snprintf(err, errlen, "out of memory allocating the KV state for a context of %lld tokens",
             (long long)ctx);
    ds4_session_free(s);
    return -1;
}

int64_t ds4_session_ctx(const ds4_session *s) { return s->ctx; }
const float *ds4_session_logits(const ds4_session *s) { return s->logits_valid ? s->logits : NULL; }
int64_t ds4_session_n_tokens(const ds4_session *s) { return s->n_tokens; }
const int32_t *ds4_session_tokens(const ds4_session *s) { return s->ids; }

int ds4_session_eval(ds4_session *s, const int32_t *ids, int64_t n, float *logits,
                     int all_logits, char *err, size_t errlen) {
    const ds4_config *cf = &s->model->cfg;
    if (n <= 0) {
        snprintf(err, errlen, "no tokens to evaluate");
        return -1;
    }
    if (n > s->ctx - s->n_tokens) {
        snprintf(err, errlen, "context full: %lld tokens + %lld new exceed ctx %lld",
                 (long long)s->n_tokens, (long long)n, (long long)s->ctx);
        return -1;
    }
    for (int64_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= cf->n_vocab) {
            snprintf(err, errlen, "token id %d at index %lld is outside the vocabulary (0..%d)",
                     ids[i], (long long)i, cf->n_vocab - 1);
            return -1;
        }
    int64_t start = s->n_tokens;
    memcpy(s->ids + start, ids, (size_t)n * sizeof *ids);
    const int64_t chunk = ds4_model_prefill_chunk(s->model);
    for (int64_t done = 0; done < n;) {
        int64_t len = n - done < chunk ? n - done : chunk;
        int last = done + len == n;
        float *out = NULL;
        if (all_logits && logits) out = logits + done * cf->n_vocab;
        else if (last) out = s->logits;
        if (ds4_model_backend(s->model)->forward(s, len, out, all_logits && logits, err, errlen)) {
            /* the chunk's partial writes are past the old token count: invisible */
            s->n_tokens = start;
            s->logits_valid = 0;
            return -1;
        }
        s->n_tokens += len;
        done += len;
    }
    if (all_logits && logits)
        memcpy(s->logits, logits + (n - 1) * cf->n_vocab, (size_t)cf->n_vocab * sizeof(float));
    else if (logits)
        memcpy(logits, s->logits, (size_t)cf->n_vocab * sizeof(float));
    s->logits_valid = 1;
    return 0;
}

/* decode_greedy's and decode_sampled's steps: a choice after each token fed
 * (greedy with `except` where sampler is NULL, else a draw, its state into
 * rngs), by the backend's own steps where it takes them. */
static int decode_steps(ds4_session *s, int32_t first, int64_t n, int32_t except, ds4_sampler *sampler,
                        int32_t *out, uint64_t *rngs, char *err, size_t errlen) {
    const ds4_config *cf = &s->model->cfg;
    if (n <= 0) {
        snprintf(err, errlen, "no tokens to decode");
        return -1;
    }
    if (n > s->ctx - s->n_tokens) {
        snprintf(err, errlen, "context full: %lld tokens + %lld new exceed ctx %lld", (long long)s->n_tokens,
                 (long long)n, (long long)s->ctx);
        return -1;
    }
    if (first < 0 || first >= cf->n_vocab) {
        snprintf(err, errlen, "token id %d is outside the vocabulary (0..%d)", first, cf->n_vocab - 1);
        return -1;
    }
    const ds4_backend *b = ds4_model_backend(s->model);
    const int64_t start = s->n_tokens;
    s->ids[start] = first;
    int rc = DS4_BACKEND_UNAVAILABLE;
    if (!sampler && b->decode_greedy)
        rc = b->decode_greedy(s, n, except, out, s->logits, err, errlen);
    else if (sampler && b->decode_sampled)
        rc = b->decode_sampled(s, n, sampler, out, rngs, s->logits, err, errlen);
    if (rc != DS4_BACKEND_UNAVAILABLE) {
        /* the backend fed the chain itself; the ids it chose go into s->ids */
        if (rc) {
            s->logits_valid = 0;
            return -1;
        }
        int64_t fed = n;
        for (int64_t i = 0; i < n; i++)
            if (out[i] < 0) {
                fed = i + 1;
                break;
            }
        memcpy(s->ids + start + 1, out, (size_t)(fed - 1) * sizeof *out);
        s->n_tokens = start + fed;
        s->logits_valid = fed == n;
        if (sampler) sampler->rng = rngs[fed - 1];
    } else {
        for (int64_t i = 0; i < n; i++) {
            int32_t id = i ? out[i - 1] : first;
            if (ds4_session_eval(s, &id, 1, NULL, 0, err, errlen)) return -1;
            out[i] = sampler ? ds4_sample(sampler, s->logits, cf->n_vocab)
                             : ds4_argmax_except(s->logits, cf->n_vocab, except);
            if (rngs) rngs[i] = sampler->rng;
            if (out[i] < 0) break;
        }
    }
    if (out[s->n_tokens - start - 1] < 0) {
        snprintf(err, errlen, "no finite logit after token %lld", (long long)(s->n_tokens - 1));
        return -1;
    }
    return 0;
}

int ds4_session_decode_greedy(ds4_session *s, int32_t first, int64_t n, int32_t except, int32_t *out,
                              char *err, size_t errlen) {
    return decode_steps(s, first, n, except, NULL, out, NULL, err, errlen);
}

int ds4_session_decode_sampled(ds4_session *s, int32_t first, int64_t n, ds4_sampler *sampler, int32_t *out,
                               uint64_t *rngs, char *err, size_t errlen) {
    if (!sampler) {
        snprintf(err, errlen, "no sampler");
        return -1;
    }
    uint64_t *own = NULL;   /* the states a backend reports, where the caller wants none */
    if (!rngs && n > 0 && !(rngs = own = malloc((size_t)n * sizeof *rngs))) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    int rc = decode_steps(s, first, n, -1, sampler, out, rngs, err, errlen);
    free(own);
    return rc;
}

int ds4_session_rewind(ds4_session *s, int64_t n, char *err, size_t errlen) {
    if (n < 0 || n > s->n_tokens) {
        snprintf(err, errlen, "cannot rewind to %lld tokens: the session holds %lld",
                 (long long)n, (long long)s->n_tokens);
        return -1;
    }
    if (n == s->n_tokens) return 0;
    s->logits_valid = 0;
    if (n >= s->rewind_floor && s->n_tokens - n <= s->rewind_budget) {
        /* the rings still hold every input of the state at n */
        s->n_tokens = n;
        return 0;
    }
    /* deeper: replay the kept tokens */
    s->n_tokens = 0;
    s->rewind_floor = 0;
    if (n == 0) return 0;
    int32_t *replay = malloc((size_t)n * sizeof *replay);
    if (!replay) {
        snprintf(err, errlen, "out of memory rewinding");
        return -1;
    }
    memcpy(replay, s->ids, (size_t)n * sizeof *replay);
    int rc = ds4_session_eval(s, replay, n, NULL, 0, err, errlen);
    free(replay);
    return rc;
}

int64_t ds4_session_kv_bytes(const ds4_session *s) {
    const ds4_backend *b = ds4_model_backend(s->model);
    if (b->kv_bytes) return b->kv_bytes(s);
    const ds4_config *cf = &s->model->cfg;
    int64_t T = s->n_tokens, values = 0;
    for (int l = 0; l < cf->n_layer; l++) {
        const ds4_layer_state *ls = &s->layers[l];
        values += (T < cf->sliding_window ? T : cf->sliding_window) * cf->head_dim;
        if (!ls->ratio) continue;
        values += T / ls->ratio * cf->head_dim;
        if (ls->indexer) values += T / ls->ratio * cf->indexer_dim;
    }
    return values * (int64_t)sizeof(float);
}

/* ---- snapshots ----
 * header (u32 magic, u32 version, u64 shape fields, token count T, logits
 * known, rewind floor F (version 2 on)), token ids, logits, then per layer
 * the ring entries of positions [raw_from/kg_from, T) in position order and
 * the compressed rows, then a 64-bit checksum of everything before it. */

/* Writes to a FILE, to a memory buffer of `cap` bytes, or (neither) only
 * counts the bytes, so the three share one serializer. */
struct writer {
    FILE *f;
    uint8_t *mem;
    size_t cap, pos;
    uint64_t hash;
    int failed;
};

static uint64_t hash_bytes(uint64_t h, const void *p, size_t n) {
    const uint8_t *b = p;
    for (size_t i = 0; i < n; i++) h = (h ^ b[i]) * 0x100000001b3ull;
    return h;
}

static void emit(struct writer *w, const void *p, size_t n) {
    if (w->failed || !n) return;
    if (w->f) {
        if (fwrite(p, 1, n, w->f) != n) w->failed = 1;
    } else if (w->mem) {
        if (w->cap - w->pos < n) {
            w->failed = 1;
            return;
        }
        memcpy(w->mem + w->pos, p, n);
    }
    w->pos += n;
}

static void put(struct writer *w, const void *p, size_t n) {
    if (w->failed || !n) return;
    if (w->f || w->mem) w->hash = hash_bytes(w->hash, p, n);
    emit(w, p, n);
}

static void put_u64(struct writer *w, uint64_t v) { put(w, &v, 8); }

/* Ring entries of positions [first, last) in position order. */
static void put_ring(struct writer *w, const float *ring, int64_t cap, int64_t width, int64_t first,
                     int64_t last) {
    for (int64_t p = first; p < last; p++) put(w, ring + (p % cap) * width, (size_t)width * sizeof(float));
}

static int64_t max3(int64_t a, int64_t b, int64_t c) {
    int64_t m = a > b ? a : b;
    return m > c ? m : c;
}

/* A snapshot of T tokens with rewind floor F holds the ring entries that the
 * states at F..T read: window rows from F - (sliding_window - 1) (the next
 * token attends to sliding_window positions, itself included), compressor
 * entries from the start of the window open at F (with overlap, the one
 * before it too: its first halves join), and no more than the ring keeps.
 * F = 0 gives the whole live ring (version 1). */
static int64_t raw_from(const ds4_session *s, int64_t T, int64_t F) {
    return max3(T - s->cap_raw, F - (s->model->cfg.sliding_window - 1), 0);
}

static int64_t kg_from(const ds4_layer_state *ls, int64_t T, int64_t F) {
    return max3(T - ls->cap_kg, (F / ls->ratio - (ls->coff == 2)) * ls->ratio, 0);
}

/* The floor a snapshot records: the session's own for a full one; for a
 * compact one its length, or one less when the logits are unknown (getting
 * them means evaluating the last token again). */
static int64_t snapshot_floor(const ds4_session *s, int compact) {
    if (!compact) return s->rewind_floor;
    int64_t F = s->logits_valid || !s->n_tokens ? s->n_tokens : s->n_tokens - 1;
    return F > s->rewind_floor ? F : s->rewind_floor;
}

static void snapshot_shape(const ds4_session *s, uint64_t shape[11]) {
    const ds4_config *cf = &s->model->cfg;
    uint64_t ratios = 0;
    for (int l = 0; l < cf->n_layer; l++) ratios = ratios * 31 + (uint64_t)s->layers[l].ratio;
    uint64_t v[11] = {(uint64_t)cf->n_layer, (uint64_t)cf->n_embd, (uint64_t)cf->head_dim,
                      (uint64_t)cf->indexer_dim, (uint64_t)cf->n_vocab, (uint64_t)cf->sliding_window,
                      ratios, (uint64_t)s->numerics, (uint64_t)s->cap_raw, (uint64_t)s->rewind_budget,
                      s->model->fingerprint};
    memcpy(shape, v, sizeof v);
}

static void write_snapshot(const ds4_session *s, int compact, struct writer *w) {
    const ds4_config *cf = &s->model->cfg;
    uint32_t head[2] = {SNAPSHOT_MAGIC, SNAPSHOT_VERSION};
    put(w, head, sizeof head);
    uint64_t shape[11];
    snapshot_shape(s, shape);
    put(w, shape, sizeof shape);
    int64_t T = s->n_tokens, F = snapshot_floor(s, compact);
    put_u64(w, (uint64_t)T);
    put_u64(w, (uint64_t)s->logits_valid);
    put_u64(w, (uint64_t)F);
    put(w, s->ids, (size_t)T * sizeof *s->ids);
    if (s->logits_valid) put(w, s->logits, (size_t)cf->n_vocab * sizeof(float));
    for (int l = 0; l < cf->n_layer; l++) {
        const ds4_layer_state *ls = &s->layers[l];
        put_ring(w, ls->raw, s->cap_raw, cf->head_dim, raw_from(s, T, F), T);
        if (!ls->ratio) continue;
        put_ring(w, ls->kg, ls->cap_kg, 2 * ls->coff * cf->head_dim, kg_from(ls, T, F), T);
        put(w, ls->rows, (size_t)(T / ls->ratio * cf->head_dim) * sizeof(float));
        if (!ls->indexer) continue;
        put_ring(w, ls->idx_kg, ls->cap_kg, 4 * cf->indexer_dim, kg_from(ls, T, F), T);
        put(w, ls->idx_rows, (size_t)(T / ls->ratio * cf->indexer_dim) * sizeof(float));
    }
    uint64_t sum = w->hash;
    emit(w, &sum, 8);
}

/* A GPU backend keeps the state in device memory: bring it to the host
 * arrays the serializer reads (and back after a restore). */
static int backend_state_to_host(const ds4_session *s, char *err, size_t errlen) {
    const ds4_backend *b = ds4_model_backend(s->model);
    return b->state_to_host ? b->state_to_host((ds4_session *)s, err, errlen) : 0;
}

int64_t ds4_session_snapshot_size(const ds4_session *s, int compact) {
    struct writer w = {NULL, NULL, 0, 0, 0, 0};
    write_snapshot(s, compact, &w);
    return (int64_t)w.pos;
}

int ds4_session_snapshot_write(const ds4_session *s, int compact, void *buf, int64_t size,
                               char *err, size_t errlen) {
    if (backend_state_to_host(s, err, errlen)) return -1;
    struct writer w = {NULL, buf, (size_t)(size > 0 ? size : 0), 0, 0xcbf29ce484222325ull, 0};
    write_snapshot(s, compact, &w);
    if (w.failed || w.pos != (size_t)size) {
        snprintf(err, errlen, "snapshot needs %lld bytes, the buffer has %lld",
                 (long long)ds4_session_snapshot_size(s, compact), (long long)size);
        return -1;
    }
    return 0;
}

int ds4_session_save(const ds4_session *s, const char *path, int compact, char *err,
                     size_t errlen) {
    char tmp[4096];
    if (snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid()) >= (int)sizeof tmp) {
        snprintf(err, errlen, "path too long");
        return -1;
    }
    if (backend_state_to_host(s, err, errlen)) return -1;
    struct writer w = {fopen(tmp, "wb"), NULL, 0, 0, 0xcbf29ce484222325ull, 0};
    if (!w.f) {
        snprintf(err, errlen, "cannot write %s: %s", tmp, strerror(errno));
        return -1;
    }
    write_snapshot(s, compact, &w);
    if (!w.failed && (fflush(w.f) != 0 || fsync(fileno(w.f)) != 0)) w.failed = 1;
    int saved_errno = errno;
    if (fclose(w.f) != 0) w.failed = 1;
    if (w.failed) {
        snprintf(err, errlen, "cannot write %s: %s", tmp, strerror(saved_errno ? saved_errno : EIO));
        unlink(tmp);
        return -1;
    }
    if (rename(tmp, path) != 0) {
        snprintf(err, errlen, "cannot rename %s to %s: %s", tmp, path, strerror(errno));
        unlink(tmp);
        return -1;
    }
    /* make the rename itself durable */
    char dir[4096];
    snprintf(dir, sizeof dir, "%s", path);
    char *slash = strrchr(dir, '/');
    if (slash) *(slash == dir ? slash + 1 : slash) = 0;
    else snprintf(dir, sizeof dir, ".");
    int dfd = open(dir, O_RDONLY | O_DIRECTORY);
    if (dfd >= 0) {
        fsync(dfd);
        close(dfd);
    }
    return 0;
}

struct reader {
    const uint8_t *p, *end;
    int short_read;
};

static void get(struct reader *r, void *dst, size_t n) {
    if (r->short_read || (size_t)(r->end - r->p) < n) {
        r->short_read = 1;
        return;
    }
    memcpy(dst, r->p, n);
    r->p += n;
}

static void get_ring(struct reader *r, float *ring, int64_t cap, int64_t width, int64_t first,
                     int64_t last) {
    for (int64_t p = first; p < last; p++) get(r, ring + (p % cap) * width, (size_t)width * sizeof(float));
}

/* After a restore failed half-way: the empty state. */
static void forget_state(ds4_session *s) {
    s->n_tokens = 0;
    s->rewind_floor = 0;
    s->logits_valid = 0;
}

/* Restores from the snapshot bytes buf[0, size); `name` prefixes the messages. */
static int restore_bytes(ds4_session *s, const uint8_t *buf, size_t size, const char *name,
                         char *err, size_t errlen) {
    const ds4_config *cf = &s->model->cfg;
    if (size < 8 + 88 + 16 + 8) {
        snprintf(err, errlen, "%s: not a ds4 session snapshot (too short)", name);
        return -1;
    }
    uint64_t stored;
    memcpy(&stored, buf + size - 8, 8);
    struct reader r = {buf, buf + size - 8, 0};
    uint32_t head[2];
    get(&r, head, sizeof head);
    if (head[0] != SNAPSHOT_MAGIC) {
        snprintf(err, errlen, "%s: not a ds4 session snapshot", name);
        return -1;
    }
    if (head[1] != 1 && head[1] != SNAPSHOT_VERSION) {
        snprintf(err, errlen, "%s: snapshot version %u, this ds4 reads 1 to %u", name, head[1],
                 SNAPSHOT_VERSION);
        return -1;
    }
    if (hash_bytes(0xcbf29ce484222325ull, buf, size - 8) != stored) {
        snprintf(err, errlen, "%s: snapshot checksum mismatch (corrupt or truncated)", name);
        return -1;
    }
    uint64_t shape[11], want[11], T = 0, logits_valid = 0, F = 0;
    get(&r, shape, sizeof shape);
    snapshot_shape(s, want);
    if (memcmp(shape, want, sizeof shape) != 0) {
        snprintf(err, errlen, "%s: snapshot was made with a different model file or numeric mode",
                 name);
        return -1;
    }
    get(&r, &T, 8);
    get(&r, &logits_valid, 8);
    if (head[1] >= 2) get(&r, &F, 8);
    if (T > (uint64_t)s->ctx) {
        snprintf(err, errlen, "%s: snapshot holds %llu tokens, more than this session's ctx %lld",
                 name, (unsigned long long)T, (long long)s->ctx);
        return -1;
    }
    if (F > T) {
        snprintf(err, errlen, "%s: snapshot rewind floor %llu is past its %llu tokens", name,
                 (unsigned long long)F, (unsigned long long)T);
        return -1;
    }
    get(&r, s->ids, (size_t)T * sizeof *s->ids);
    if (logits_valid) get(&r, s->logits, (size_t)cf->n_vocab * sizeof(float));
    for (int l = 0; l < cf->n_layer; l++) {
        ds4_layer_state *ls = &s->layers[l];
        get_ring(&r, ls->raw, s->cap_raw, cf->head_dim, raw_from(s, (int64_t)T, (int64_t)F), (int64_t)T);
        if (!ls->ratio) continue;
        get_ring(&r, ls->kg, ls->cap_kg, 2 * ls->coff * cf->head_dim, kg_from(ls, (int64_t)T, (int64_t)F),
                 (int64_t)T);
        get(&r, ls->rows, (size_t)((int64_t)T / ls->ratio * cf->head_dim) * sizeof(float));
        if (!ls->indexer) continue;
        get_ring(&r, ls->idx_kg, ls->cap_kg, 4 * cf->indexer_dim, kg_from(ls, (int64_t)T, (int64_t)F),
                 (int64_t)T);
        get(&r, ls->idx_rows, (size_t)((int64_t)T / ls->ratio * cf->indexer_dim) * sizeof(float));
    }
    if (r.short_read || r.p != r.end) {
        snprintf(err, errlen, "%s: snapshot length does not match its contents", name);
        forget_state(s);
        return -1;
    }
    for (uint64_t i = 0; i < T; i++)
        if (s->ids[i] < 0 || s->ids[i] >= cf->n_vocab) {
            snprintf(err, errlen, "%s: snapshot holds an invalid token id", name);
            forget_state(s);
            return -1;
        }
    s->n_tokens = (int64_t)T;
    s->rewind_floor = (int64_t)F;
    s->logits_valid = (int)logits_valid;
    const ds4_backend *b = ds4_model_backend(s->model);
    if (b->state_from_host && b->state_from_host(s, err, errlen)) {
        forget_state(s);
        return -1;
    }
    return 0;
}

int ds4_session_restore(ds4_session *s, const char *path, char *err, size_t errlen) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        snprintf(err, errlen, "cannot open %s: %s", path, strerror(errno));
        return -1;
    }
    uint8_t *buf = NULL;
    long size = -1;
    if (fseek(f, 0, SEEK_END) == 0) size = ftell(f);
    if (size >= 0 && fseek(f, 0, SEEK_SET) == 0 && (buf = malloc((size_t)size + 1)) &&
        fread(buf, 1, (size_t)size, f) != (size_t)size) {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    if (!buf) {
        snprintf(err, errlen, "cannot read %s", path);
        return -1;
    }
    int rc = restore_bytes(s, buf, (size_t)size, path, err, errlen);
    free(buf);
    return rc;
}

int ds4_session_snapshot_read(ds4_session *s, const void *buf, int64_t size, char *err,
                              size_t errlen) {
    if (size < 0) size = 0;
    return restore_bytes(s, buf, (size_t)size, "snapshot", err, errlen);
}
