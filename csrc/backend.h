/* Internal: the seam between the core and a compute backend.
 *
 * The core (model.c, session.c) owns the file mapping, the token ids, the
 * logits and the host copy of the KV state that snapshots read and write;
 * a backend owns the arithmetic. The CPU backend is built in; the CUDA one
 * is a separate shared library loaded with dlopen, so the engine builds and
 * runs without CUDA. Not read by cffi: no CUDA types here either. */
#ifndef DS4_BACKEND_H
#define DS4_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "model.h"
#include "sample.h"
#include "weights.h"

/* Bumped whenever this table or the structs in weights.h / session_state.h
 * change, so a stale library is refused instead of misreading them. */
#define DS4_BACKEND_ABI 10

struct ds4_model;
struct ds4_session;

typedef struct ds4_backend {
    int abi;
    const char *name;
    /* The most tokens one forward call takes: the core splits longer evals
     * into chunks this size (bigger chunks feed a GPU's matrix units). */
    int prefill_chunk;
    /* Weights onto the device (synthetic: random valid blocks instead of
     * the file's bytes). Sets m->backend_model. */
    int (*model_init)(struct ds4_model *m, int synthetic, ds4_progress_fn progress,
                      void *progress_user, char *err, size_t errlen);
    void (*model_free)(struct ds4_model *m);
    /* Device KV state for a new session (sets s->backend_state). */
    int (*session_init)(struct ds4_session *s, char *err, size_t errlen);
    void (*session_free)(struct ds4_session *s);
    /* Runs the n ids at s->ids[s->n_tokens..] (n <= the core's chunk size)
     * at positions s->n_tokens..; logits as ds4_forward writes them. */
    int (*forward)(struct ds4_session *s, int64_t n, float *logits, int all_logits, char *err,
                   size_t errlen);
    /* Snapshots: the device state into the host arrays of session_state.h
     * (before save), and back (after restore). NULL: nothing to do. */
    int (*state_to_host)(struct ds4_session *s, char *err, size_t errlen);
    int (*state_from_host)(struct ds4_session *s, char *err, size_t errlen);
    /* Bytes per second (read + write) of the best of `repeats` copies of
     * `nbytes` within the device's memory: the decode bound's denominator.
     * NULL: not measurable. */
    int (*copy_bandwidth)(int64_t nbytes, int repeats, double *out, char *err, size_t errlen);
    /* ds4_model_product on the device: matrix `w` (one of the model's
     * tensors), expert `expert` of a 3-D one, or `parts` stretches of a 2-D
     * one as a batch (shared_x: on one x). NULL: the CPU's. */
    int (*product)(const struct ds4_model *m, const ds4_tensor *w, int expert, int parts, int shared_x,
                   int numerics, const float *x, int64_t n, float *y, char *err, size_t errlen);
    /* Bytes the session's KV state takes as this backend stores it (the
     * CUDA one keeps qat sessions' compressed rows compact). NULL: float32,
     * as ds4_session_kv_bytes counts. */
    int64_t (*kv_bytes)(const struct ds4_session *s);
    /* ds4_session_decode_greedy's steps: feed s->ids[s->n_tokens] and then
     * each greedy choice (not `except`), n tokens, the choices into out (-1
     * where no logit was finite: the tokens after it are not counted) and
     * the last token's logits into logits. The core then appends the ids
     * and counts the tokens. NULL, or DS4_BACKEND_UNAVAILABLE returned
     * before any step: the core runs forward and an argmax a token. */
    int (*decode_greedy)(struct ds4_session *s, int64_t n, int32_t except, int32_t *out, float *logits,
                         char *err, size_t errlen);
    /* ds4_session_decode_sampled's steps, as decode_greedy's with each
     * token drawn from the sampler's state (ds4_sample's draw, the same
     * bits), the sampler's state after each draw into rngs. A backend takes
     * the samplers it can (DS4_BACKEND_UNAVAILABLE before any step for the
     * others: the core runs forward and ds4_sample a token). */
    int (*decode_sampled)(struct ds4_session *s, int64_t n, const ds4_sampler *sampler, int32_t *out,
                          uint64_t *rngs, float *logits, char *err, size_t errlen);
} ds4_backend;

/* The symbol a backend library exports. */
#define DS4_BACKEND_ENTRY "ds4_backend_entry"
typedef const ds4_backend *(*ds4_backend_entry_fn)(void);

extern const ds4_backend ds4_cpu_backend;

/* The backend of a model (the CPU one unless another was attached). */
const ds4_backend *ds4_model_backend(const struct ds4_model *m);

/* ds4_model_use_backend's "not here" status: no library, or no device. */
#define DS4_BACKEND_UNAVAILABLE (-2)

#endif
