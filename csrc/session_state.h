/* Internal: the KV state of a session (forward-pass.md §6.1).
 *
 * Every per-token input of the state is kept in rings that hold the last
 * `cap` positions (position p at slot p % cap), and compressed rows never
 * change once written. So rewinding by up to `rewind_budget` tokens is just
 * lowering the token count; a deeper rewind replays the kept token ids.
 * A compact snapshot restores only what continuing needs, so below the
 * restored length (rewind_floor) the rings are not valid and rewinds replay. */
#ifndef DS4_SESSION_STATE_H
#define DS4_SESSION_STATE_H

#include "ops.h"
#include "session.h"

typedef struct {
    int ratio;              /* compression ratio m; 0 for window-only layers */
    int coff;               /* series per token: 2 with overlapping windows (m = 4) */
    int indexer;            /* CSA: has the lightning indexer */
    int64_t cap_kg;         /* compressor ring entries */
    float *kg;              /* [cap_kg][2][coff*head_dim]: kappa, gamma (+ape) */
    float *idx_kg;          /* [cap_kg][2][2*indexer_dim] */
    int64_t cap_rows;
    float *rows;            /* [cap_rows][head_dim] compressed attention rows */
    float *idx_rows;        /* [cap_rows][indexer_dim] indexer keys */
    float *raw;             /* [cap_raw][head_dim] window rows (post-RoPE) */
} ds4_layer_state;

struct ds4_session {
    const ds4_model *model;
    ds4_pool *pool;
    int numerics;
    int64_t ctx;
    int64_t n_tokens;
    int64_t cap_raw;
    int64_t rewind_budget;
    int32_t *ids;           /* [ctx] the tokens of the state */
    ds4_layer_state *layers;
    float *logits;          /* [vocab] after the last token */
    int logits_valid;
    float *rope_main;       /* [rope_dim/2] */
    float *rope_comp;
    void *backend_state;    /* the backend's device KV state and buffers */
    /* Rings hold valid entries only for states at n >= rewind_floor. Last,
     * so a backend library built before it sees the same layout. */
    int64_t rewind_floor;
};

/* Runs n tokens (already appended to s->ids at n_tokens..) through the
 * model; writes logits of the positions asked for. Defined in forward.c. */
int ds4_forward(ds4_session *s, int64_t n, float *logits, int all_logits, char *err,
                size_t errlen);

#endif
