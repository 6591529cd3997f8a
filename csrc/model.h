/* A DeepSeek V4 model file opened, validated and bound (gguf-layout.md §6).
 *
 * Shapes come from the file's metadata; every tensor is checked against
 * them, so small test models of the same layout load as well as the
 * published files. The Flash constants are a profile that is reported. */
#ifndef DS4_MODEL_H
#define DS4_MODEL_H

#include <stddef.h>
#include <stdint.h>

#include "gguf.h"

typedef struct {
    int32_t n_layer;
    int32_t n_embd;
    int32_t n_vocab;
    int32_t n_head;
    int32_t n_head_kv;
    int32_t head_dim;
    int32_t rope_dim;
    int32_t q_lora_rank;
    int32_t o_lora_rank;
    int32_t o_groups;
    int32_t n_expert;
    int32_t n_expert_used;
    int32_t expert_ff;
    int32_t n_shared_experts;
    int32_t n_hash_layers;
    int32_t sliding_window;
    int32_t indexer_heads;
    int32_t indexer_dim;
    int32_t indexer_top_k;
    int32_t n_hc;
    int32_t sinkhorn_iters;
    int64_t rope_orig_ctx;
    float rope_freq_base;
    float compress_rope_freq_base;
    float rope_scaling_factor;
    float yarn_beta_fast;
    float yarn_beta_slow;
    float expert_weights_scale;
    float rms_eps;
    float hc_eps;
    int32_t expert_weights_norm;
} ds4_config;

typedef struct ds4_model ds4_model;

/* Returns 0 and sets *out, or -1 with a one-line reason in err. */
int ds4_model_open(const char *path, ds4_model **out, char *err, size_t errlen);
/* Drops the opener's reference: the model is freed once its sessions are freed too. */
void ds4_model_close(ds4_model *m);

const ds4_config *ds4_model_config(const ds4_model *m);
const ds4_gguf *ds4_model_gguf(const ds4_model *m);
int ds4_model_layer_compress_ratio(const ds4_model *m, int layer);
float ds4_model_layer_swiglu_clamp(const ds4_model *m, int layer);
/* GGML type of the routed experts of a layer: which 0 gate, 1 up, 2 down. */
int ds4_model_layer_expert_type(const ds4_model *m, int layer, int which);
/* "q2", "q4" or "mixed" (routed-expert quantization of the file). */
const char *ds4_model_variant(const ds4_model *m);
/* 1 when every shape and constant matches DeepSeek V4 Flash; otherwise 0
 * and ds4_model_profile_note() names the first difference. */
int ds4_model_is_flash(const ds4_model *m);
const char *ds4_model_profile_note(const ds4_model *m);
/* A hash of the tensor directory (names, types, shapes, offsets): snapshots
 * made with one file are refused by another. */
uint64_t ds4_model_fingerprint(const ds4_model *m);
int64_t ds4_model_n_warnings(const ds4_model *m);

/* Runs the model on a compute backend: "cpu", or "cuda" from the shared
 * library at `library` (synthetic: random valid weights on the device
 * instead of the file's). progress (may be NULL) hears of the bytes moved so
 * far. Call before any session exists. Returns 0; -2
 * when the library or its device is not there; -1 on other failures (for
 * instance a model larger than the device). */
typedef void (*ds4_progress_fn)(void *user, int64_t done, int64_t total);
int ds4_model_use_backend(ds4_model *m, const char *name, const char *library, int synthetic,
                          ds4_progress_fn progress, void *progress_user, char *err,
                          size_t errlen);
/* Reads the tensor data once (page cache warm-up); returns its bytes. */
int64_t ds4_model_warm(const ds4_model *m, ds4_progress_fn progress, void *user);
/* The backend's device-memory copy bandwidth (bytes/s, read + write). Returns
 * 0, or -1 with a reason (a backend that cannot measure it says so). */
int ds4_model_copy_bandwidth(const ds4_model *m, int64_t nbytes, int repeats, double *out,
                             char *err, size_t errlen);
const char *ds4_model_backend_name(const ds4_model *m);
/* One weight matrix's product on the model's backend, for tests: y[t] = W x[t]
 * for t < n (x rows of W's n_in floats, y rows of n_out), W the matrix
 * `name` (weights.h's field name, e.g. "attn_q_a" or "ffn_down_exps") of
 * `layer`, or of the model when layer < 0 ("output"); `expert` of an
 * expert stack. parts > 1 (a 2-D W): W's rows in `parts` equal stretches
 * run as one batch of products, as the forward runs its grouped ones:
 * stretch p on x part p (x rows of parts * n_in floats: the grouped output
 * projection), or with shared_x all on one x (a layer's pairs of matrices
 * on one x: the shared expert's gate and up). x enters as `numerics` takes
 * it (ds4_numerics: qat-q8 rounds it to int8 codes for a quantized W). The
 * backend's own kernels for n tokens: a chunk's for n > 1, a decode step's
 * for n = 1. Returns 0, or -1 with a reason (an unknown name, an expert or
 * parts out of range). */
int ds4_model_product(const ds4_model *m, int layer, const char *name, int expert, int parts, int shared_x,
                      int numerics, const float *x, int64_t n, float *y, char *err, size_t errlen);
/* Tokens per forward call of the model's backend (an eval is run in chunks
 * of this size). */
int ds4_model_prefill_chunk(const ds4_model *m);
const char *ds4_model_warning(const ds4_model *m, int64_t i);

#endif
