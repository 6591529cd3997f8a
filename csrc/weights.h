/* Internal: the bound weights of an open model (not part of the cffi API). */
#ifndef DS4_WEIGHTS_H
#define DS4_WEIGHTS_H

#include <stdint.h>

#include "ds4.h"

/* One tensor of the mapped file. ne[] in GGUF order (ne[0] varies fastest). */
typedef struct {
    const void *data;       /* NULL when the tensor is absent (optional ones) */
    int type;
    int n_dims;
    int64_t ne[4];
    int64_t nbytes;
    int64_t row_bytes;      /* bytes of one ne[0] row */
} ds4_tensor;

typedef struct {
    int compress_ratio;     /* 0: window only; 4: CSA (with indexer); other: HCA */
    int hash_routed;        /* expert choice from tid2eid instead of top-k */
    float swiglu_clamp;

    /* hyper-connection sites and norms */
    ds4_tensor hc_attn_fn, hc_attn_base, hc_attn_scale, attn_norm;
    ds4_tensor hc_ffn_fn, hc_ffn_base, hc_ffn_scale, ffn_norm;

    /* attention */
    ds4_tensor attn_q_a, attn_q_a_norm, attn_q_b;
    ds4_tensor attn_kv, attn_kv_a_norm, attn_sinks;
    ds4_tensor attn_output_a, attn_output_b;

    /* KV compressor (compress_ratio != 0) */
    ds4_tensor comp_ape, comp_kv, comp_gate, comp_norm;

    /* lightning indexer (compress_ratio == 4) */
    ds4_tensor idx_q_b, idx_proj;
    ds4_tensor idx_comp_ape, idx_comp_kv, idx_comp_gate, idx_comp_norm;

    /* MoE */
    ds4_tensor ffn_gate_inp, exp_probs_b, tid2eid;
    ds4_tensor ffn_gate_exps, ffn_up_exps, ffn_down_exps;
    ds4_tensor ffn_gate_shexp, ffn_up_shexp, ffn_down_shexp;
} ds4_layer;

struct ds4_model {
    ds4_gguf *gguf;
    ds4_config cfg;
    ds4_layer *layers;

    ds4_tensor token_embd, output_hc_fn, output_hc_base, output_hc_scale;
    ds4_tensor output_norm, output;

    const char *variant;
    uint64_t fingerprint;   /* hash of the tensor directory: tells files apart */
    int is_flash;
    char profile_note[256];
    char **warnings;
    int64_t n_warnings;
    /* The opener and every session hold a reference: a session freed after
     * ds4_model_close (as a garbage collector may order it) still finds its
     * model. The last one out frees it. */
    int refs;               /* changed only with __atomic builtins (C and CUDA C++ read this header) */

    /* compute backend (backend.h); NULL: the CPU */
    const struct ds4_backend *backend;
    void *backend_model;    /* the backend's device copy of the weights */
    void *backend_lib;      /* dlopen handle */
};

void ds4_model_retain(const ds4_model *m);
void ds4_model_release(const ds4_model *m);

/* Frees the backend's model state and unloads it (model.c, with the last reference). */
void ds4_model_release_backend(struct ds4_model *m);

#endif
