/* A session: one independent KV state over an open model, fed token by
 * token or in prefill chunks, rewound, saved and restored. */
#ifndef DS4_SESSION_H
#define DS4_SESSION_H

#include <stddef.h>
#include <stdint.h>

#include "model.h"
#include "sample.h"

enum ds4_numerics {
    DS4_NUMERICS_EXACT = 0,   /* pure float32, as transformers computes */
    DS4_NUMERICS_QAT = 1,     /* plus the FP8 / FP4 round trips of training */
    DS4_NUMERICS_QAT_Q8 = 2   /* plus int8 activations into quantized products, as ggml */
};

typedef struct ds4_session ds4_session;

/* n_threads <= 0: one per CPU. The model must outlive the session. */
int ds4_session_new(const ds4_model *m, int64_t ctx, int numerics, int n_threads,
                    ds4_session **out, char *err, size_t errlen);
void ds4_session_free(ds4_session *s);

int64_t ds4_session_ctx(const ds4_session *s);
int64_t ds4_session_n_tokens(const ds4_session *s);
const int32_t *ds4_session_tokens(const ds4_session *s);
/* Logits after the last token, or NULL when not known (after a rewind). */
const float *ds4_session_logits(const ds4_session *s);

/* Appends n ids and runs them through the model. logits may be NULL; else
 * it receives the last position's logits [vocab], or every position's
 * [n][vocab] when all_logits is set. Returns 0, or -1 with a reason (the
 * state is then as before the call). */
int ds4_session_eval(ds4_session *s, const int32_t *ids, int64_t n, float *logits,
                     int all_logits, char *err, size_t errlen);

/* Greedy decoding, n tokens: feeds `first`, then each time the greedy choice
 * (ds4_argmax_except with `except`, e.g. the end-of-text id; -1 none) after
 * the last token fed, until n are fed. out[i] receives the choice after the
 * i-th token fed, so out[0..n-2] are the tokens fed after `first` and
 * out[n-1] the next one (not fed). The same tokens and logits as eval and an
 * argmax a token, but a backend may run the steps without the host between
 * them (CUDA: the choice made on the device, one sync for all n). Returns 0,
 * or -1 with a reason: a bad id or a full context leave the state as
 * before, a backend failure as before or after the tokens fed before it; no
 * finite logit after token i keeps the i + 1 tokens fed up to it (out[i] =
 * -1). */
int ds4_session_decode_greedy(ds4_session *s, int32_t first, int64_t n, int32_t except, int32_t *out,
                              char *err, size_t errlen);

/* Sampled decoding, n tokens: as ds4_session_decode_greedy with each choice
 * drawn by ds4_sample(sampler, the logits after the last token fed), so
 * the same tokens, logits and sampler state as eval and ds4_sample a token;
 * rngs[i] (NULL: not wanted) receives the sampler's state after draw i,
 * and the sampler is left after the last draw. A backend may draw on its
 * own device (CUDA: min-p samplers, ds4_sampler_min_p_only). */
int ds4_session_decode_sampled(ds4_session *s, int32_t first, int64_t n, ds4_sampler *sampler, int32_t *out,
                               uint64_t *rngs, char *err, size_t errlen);

/* Keeps the first n tokens: the state becomes exactly what feeding those n
 * tokens gives. */
int ds4_session_rewind(ds4_session *s, int64_t n, char *err, size_t errlen);

/* Snapshot to a file (written to a temporary name, fsynced, renamed) and
 * back; restore checks the version, the model shape and a checksum.
 * compact = 0 keeps the rewind rings: the restored session rewinds as
 * cheaply as this one. compact = 1 keeps only what going on from the current
 * tokens needs (the last sliding_window - 1 window rows, the open compressor
 * windows, every compressed row): far smaller, and the restored session
 * replays from its token ids to rewind below the length it was restored at
 * (below one token less when the logits are unknown, as after a rewind,
 * since getting them means evaluating the last token again). Reads the
 * version 1 snapshots of earlier ds4 too. */
int ds4_session_save(const ds4_session *s, const char *path, int compact, char *err,
                     size_t errlen);
int ds4_session_restore(ds4_session *s, const char *path, char *err, size_t errlen);

/* The same snapshot bytes in memory, for containers that embed a snapshot
 * (the disk KV cache): its exact size, writing it into buf[0, size), and
 * restoring from buf[0, size) with the checks of ds4_session_restore. */
int64_t ds4_session_snapshot_size(const ds4_session *s, int compact);
int ds4_session_snapshot_write(const ds4_session *s, int compact, void *buf, int64_t size,
                               char *err, size_t errlen);
int ds4_session_snapshot_read(ds4_session *s, const void *buf, int64_t size, char *err,
                              size_t errlen);

/* Bytes of KV state held for the current tokens (forward-pass.md §6.2):
 * float32, or as the backend stores it (backend.h's kv_bytes). */
int64_t ds4_session_kv_bytes(const ds4_session *s);

#endif
