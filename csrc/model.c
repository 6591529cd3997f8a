/* Opening a model: read the shape from metadata, bind and check every
 * tensor against it (gguf-layout.md §2, §3, §6). */
#include "model.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <string.h>

#include "weights.h"

#define KEY "deepseek4."

struct loader {
    ds4_model *m;
    const ds4_gguf *g;
    char *err;
    size_t errlen;
    uint8_t *bound;          /* per GGUF tensor: bound by the binder */
};

static int fail(struct loader *ld, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(ld->err, ld->errlen, fmt, ap);
    va_end(ap);
    return -1;
}

static void warn(ds4_model *m, const char *fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    char **w = realloc(m->warnings, (size_t)(m->n_warnings + 1) * sizeof *w);
    if (!w) return;
    m->warnings = w;
    if ((w[m->n_warnings] = strdup(buf))) m->n_warnings++;
}

/* ---- metadata accessors with the spec's type rules (§2.1) ---- */

static int get_u32_strict(struct loader *ld, const char *key, int32_t *out) {
    int64_t i = ds4_gguf_find_kv(ld->g, key);
    int64_t v;
    if (i < 0 || ds4_gguf_kv_type(ld->g, i) != DS4_GGUF_U32)
        return fail(ld, "required metadata key is missing: %s (a u32)", key);
    ds4_gguf_kv_get_i64(ld->g, i, &v);
    if (v > INT32_MAX) return fail(ld, "metadata %s=%lld is out of range", key, (long long)v);
    *out = (int32_t)v;
    return 0;
}

static int get_u64_or_u32(struct loader *ld, const char *key, int64_t *out) {
    int64_t i = ds4_gguf_find_kv(ld->g, key);
    int t = ds4_gguf_kv_type(ld->g, i);
    if (i < 0 || (t != DS4_GGUF_U32 && t != DS4_GGUF_U64) || ds4_gguf_kv_get_i64(ld->g, i, out))
        return fail(ld, "required metadata key is missing: %s (a u32 or u64)", key);
    return 0;
}

static int get_float(struct loader *ld, const char *key, float *out) {
    int64_t i = ds4_gguf_find_kv(ld->g, key);
    int t = ds4_gguf_kv_type(ld->g, i);
    double v;
    if (i < 0 || (t != DS4_GGUF_F32 && t != DS4_GGUF_F64 && t != DS4_GGUF_U32 && t != DS4_GGUF_I32) ||
        ds4_gguf_kv_get_f64(ld->g, i, &v))
        return fail(ld, "required metadata key is missing: %s (a float)", key);
    if (!isfinite(v)) return fail(ld, "metadata %s is not a finite number", key);
    *out = (float)v;
    return 0;
}

static int get_bool_strict(struct loader *ld, const char *key, int32_t *out) {
    int64_t i = ds4_gguf_find_kv(ld->g, key);
    int64_t v;
    if (i < 0 || ds4_gguf_kv_type(ld->g, i) != DS4_GGUF_BOOL)
        return fail(ld, "required metadata key is missing: %s (a bool)", key);
    ds4_gguf_kv_get_i64(ld->g, i, &v);
    *out = (int32_t)v;
    return 0;
}

static int read_config(struct loader *ld) {
    ds4_config *c = &ld->m->cfg;
    struct { const char *key; int32_t *dst; } u32s[] = {
        {KEY "block_count", &c->n_layer},
        {KEY "embedding_length", &c->n_embd},
        {KEY "vocab_size", &c->n_vocab},
        {KEY "attention.head_count", &c->n_head},
        {KEY "attention.head_count_kv", &c->n_head_kv},
        {KEY "attention.key_length", &c->head_dim},
        {KEY "rope.dimension_count", &c->rope_dim},
        {KEY "attention.q_lora_rank", &c->q_lora_rank},
        {KEY "attention.output_lora_rank", &c->o_lora_rank},
        {KEY "attention.output_group_count", &c->o_groups},
        {KEY "expert_count", &c->n_expert},
        {KEY "expert_used_count", &c->n_expert_used},
        {KEY "expert_feed_forward_length", &c->expert_ff},
        {KEY "expert_shared_count", &c->n_shared_experts},
        {KEY "hash_layer_count", &c->n_hash_layers},
        {KEY "attention.sliding_window", &c->sliding_window},
        {KEY "attention.indexer.head_count", &c->indexer_heads},
        {KEY "attention.indexer.key_length", &c->indexer_dim},
        {KEY "attention.indexer.top_k", &c->indexer_top_k},
        {KEY "hyper_connection.count", &c->n_hc},
        {KEY "hyper_connection.sinkhorn_iterations", &c->sinkhorn_iters},
    };
    for (size_t k = 0; k < sizeof u32s / sizeof u32s[0]; k++)
        if (get_u32_strict(ld, u32s[k].key, u32s[k].dst)) return -1;
    int32_t value_length = 0;
    if (get_u32_strict(ld, KEY "attention.value_length", &value_length)) return -1;
    struct { const char *key; float *dst; } floats[] = {
        {KEY "rope.freq_base", &c->rope_freq_base},
        {KEY "rope.scaling.factor", &c->rope_scaling_factor},
        {KEY "rope.scaling.yarn_beta_fast", &c->yarn_beta_fast},
        {KEY "rope.scaling.yarn_beta_slow", &c->yarn_beta_slow},
        {KEY "attention.compress_rope_freq_base", &c->compress_rope_freq_base},
        {KEY "expert_weights_scale", &c->expert_weights_scale},
        {KEY "attention.layer_norm_rms_epsilon", &c->rms_eps},
        {KEY "hyper_connection.epsilon", &c->hc_eps},
    };
    for (size_t k = 0; k < sizeof floats / sizeof floats[0]; k++)
        if (get_float(ld, floats[k].key, floats[k].dst)) return -1;
    if (get_u64_or_u32(ld, KEY "rope.scaling.original_context_length", &c->rope_orig_ctx)) return -1;
    if (get_bool_strict(ld, KEY "expert_weights_norm", &c->expert_weights_norm)) return -1;

    /* Optional group routing keys: V4 has none. A wrong type counts as absent. */
    const char *group_keys[] = {KEY "expert_group_count", KEY "expert_group_used_count"};
    for (int k = 0; k < 2; k++) {
        int64_t i = ds4_gguf_find_kv(ld->g, group_keys[k]), v;
        if (i >= 0 && ds4_gguf_kv_type(ld->g, i) == DS4_GGUF_U32 &&
            !ds4_gguf_kv_get_i64(ld->g, i, &v) && v != 0)
            return fail(ld, "%s=%lld: group-limited routing is not part of DeepSeek V4",
                        group_keys[k], (long long)v);
    }

    /* Values that are impossible or inconsistent. */
    struct { const char *name; int32_t v; } positive[] = {
        {"block_count", c->n_layer}, {"embedding_length", c->n_embd},
        {"vocab_size", c->n_vocab}, {"attention.head_count", c->n_head},
        {"attention.key_length", c->head_dim}, {"rope.dimension_count", c->rope_dim},
        {"attention.q_lora_rank", c->q_lora_rank}, {"attention.output_lora_rank", c->o_lora_rank},
        {"attention.output_group_count", c->o_groups}, {"expert_count", c->n_expert},
        {"expert_used_count", c->n_expert_used}, {"expert_feed_forward_length", c->expert_ff},
        {"expert_shared_count", c->n_shared_experts}, {"attention.sliding_window", c->sliding_window},
        {"attention.indexer.head_count", c->indexer_heads},
        {"attention.indexer.key_length", c->indexer_dim},
        {"attention.indexer.top_k", c->indexer_top_k}, {"hyper_connection.count", c->n_hc},
        {"hyper_connection.sinkhorn_iterations", c->sinkhorn_iters},
    };
    for (size_t k = 0; k < sizeof positive / sizeof positive[0]; k++)
        if (positive[k].v <= 0)
            return fail(ld, "metadata " KEY "%s=%d must be positive", positive[k].name, positive[k].v);
    if (c->n_head_kv != 1)
        return fail(ld, "metadata " KEY "attention.head_count_kv=%d: V4 has one shared KV head",
                    c->n_head_kv);
    if (value_length != c->head_dim)
        return fail(ld, "metadata attention.value_length=%d differs from key_length=%d "
                    "(V4 uses the same vector as K and V)", value_length, c->head_dim);
    if (c->rope_dim % 2 || c->rope_dim > c->head_dim || c->rope_dim > c->indexer_dim)
        return fail(ld, "metadata rope.dimension_count=%d must be even and at most the head "
                    "dims (%d, indexer %d)", c->rope_dim, c->head_dim, c->indexer_dim);
    if (c->n_head % c->o_groups)
        return fail(ld, "attention.head_count=%d is not divisible by output_group_count=%d",
                    c->n_head, c->o_groups);
    if (c->n_expert_used > c->n_expert)
        return fail(ld, "expert_used_count=%d exceeds expert_count=%d", c->n_expert_used,
                    c->n_expert);
    if (c->n_hash_layers < 0 || c->n_hash_layers > c->n_layer)
        return fail(ld, "hash_layer_count=%d is outside 0..block_count (%d)", c->n_hash_layers,
                    c->n_layer);
    if (!c->expert_weights_norm)
        return fail(ld, "expert_weights_norm=false is not supported (V4 normalises the "
                    "routed weights)");
    if (c->rms_eps < 0 || c->hc_eps < 0 || c->rope_freq_base <= 0 ||
        c->compress_rope_freq_base <= 0 || c->rope_scaling_factor <= 0 || c->rope_orig_ctx <= 0)
        return fail(ld, "RoPE/epsilon metadata out of range");
    return 0;
}

/* compress_ratios (u32/i32 array) and swiglu_clamp_exp (f32/f64 array). */
static int read_layer_arrays(struct loader *ld) {
    const ds4_gguf *g = ld->g;
    ds4_model *m = ld->m;
    int n = m->cfg.n_layer;
    int64_t i = ds4_gguf_find_kv(g, KEY "attention.compress_ratios");
    int at = ds4_gguf_kv_array_type(g, i);
    if (i < 0 || (at != DS4_GGUF_U32 && at != DS4_GGUF_I32))
        return fail(ld, "required metadata key is missing: " KEY "attention.compress_ratios "
                    "(an array of u32 or i32)");
    if (ds4_gguf_kv_array_len(g, i) < (uint64_t)n)
        return fail(ld, KEY "attention.compress_ratios has %llu entries, block_count is %d",
                    (unsigned long long)ds4_gguf_kv_array_len(g, i), n);
    for (int l = 0; l < n; l++) {
        int64_t r;
        ds4_gguf_kv_array_get_i64(g, i, (uint64_t)l, &r);
        if (r < 0 || r > (1 << 20))
            return fail(ld, "compression ratio at layer %d: got %lld", l, (long long)r);
        m->layers[l].compress_ratio = (int)r;
    }
    i = ds4_gguf_find_kv(g, KEY "swiglu_clamp_exp");
    at = ds4_gguf_kv_array_type(g, i);
    if (i < 0 || (at != DS4_GGUF_F32 && at != DS4_GGUF_F64))
        return fail(ld, "required metadata key is missing: " KEY "swiglu_clamp_exp "
                    "(an array of f32 or f64)");
    if (ds4_gguf_kv_array_len(g, i) < (uint64_t)n)
        return fail(ld, KEY "swiglu_clamp_exp has %llu entries, block_count is %d",
                    (unsigned long long)ds4_gguf_kv_array_len(g, i), n);
    for (int l = 0; l < n; l++) {
        double v;
        ds4_gguf_kv_array_get_f64(g, i, (uint64_t)l, &v);
        if (!(v > 0) || !isfinite(v))
            return fail(ld, "swiglu clamp at layer %d: got %g", l, v);
        m->layers[l].swiglu_clamp = (float)v;
        m->layers[l].hash_routed = l < m->cfg.n_hash_layers;
    }
    return 0;
}

/* ---- tokenizer (§6.1.4) ---- */

static const char *const REQUIRED_TOKENS[] = {
    "<\xef\xbd\x9c" "begin\xe2\x96\x81of\xe2\x96\x81sentence\xef\xbd\x9c>",
    "<\xef\xbd\x9c" "end\xe2\x96\x81of\xe2\x96\x81sentence\xef\xbd\x9c>",
    "<\xef\xbd\x9cUser\xef\xbd\x9c>",
    "<\xef\xbd\x9c" "Assistant\xef\xbd\x9c>",
    "<think>",
    "</think>",
    "\xef\xbd\x9c" "DSML\xef\xbd\x9c",
};

static int check_tokenizer(struct loader *ld) {
    const ds4_gguf *g = ld->g;
    int64_t i = ds4_gguf_find_kv(g, "tokenizer.ggml.tokens");
    if (i < 0 || ds4_gguf_kv_array_type(g, i) != DS4_GGUF_STRING ||
        ds4_gguf_kv_array_len(g, i) > INT32_MAX)
        return fail(ld, "GGUF tokenizer token table is missing or invalid (tokenizer.ggml.tokens)");
    int64_t mi = ds4_gguf_find_kv(g, "tokenizer.ggml.merges");
    if (mi < 0 || ds4_gguf_kv_array_type(g, mi) != DS4_GGUF_STRING)
        return fail(ld, "GGUF tokenizer merges are missing or invalid (tokenizer.ggml.merges)");
    uint64_t n = ds4_gguf_kv_array_len(g, i);
    uint64_t *offs = malloc((n ? n : 1) * sizeof *offs), *lens = malloc((n ? n : 1) * sizeof *lens);
    if (!offs || !lens) {
        free(offs);
        free(lens);
        return fail(ld, "out of memory reading the token table");
    }
    ds4_gguf_kv_array_strings(g, i, offs, lens);
    const uint8_t *base = ds4_gguf_base(g);
    int found[7] = {0};
    for (uint64_t t = 0; t < n; t++)
        for (int k = 0; k < 7; k++)
            if (!found[k] && lens[t] == strlen(REQUIRED_TOKENS[k]) &&
                memcmp(base + offs[t], REQUIRED_TOKENS[k], lens[t]) == 0)
                found[k] = 1;
    free(offs);
    free(lens);
    for (int k = 0; k < 7; k++)
        if (!found[k]) return fail(ld, "required tokenizer token missing: %s", REQUIRED_TOKENS[k]);
    if (n != (uint64_t)ld->m->cfg.n_vocab)
        warn(ld->m, "the token table has %llu entries but vocab_size is %d",
             (unsigned long long)n, ld->m->cfg.n_vocab);
    return 0;
}

/* ---- tensor binding (§3, §6.1.6-8) ---- */

#define TYPE_BIT(t) (1ull << (t))
#define ROUTED_TYPES (TYPE_BIT(DS4_TYPE_IQ2_XXS) | TYPE_BIT(DS4_TYPE_Q2_K) | TYPE_BIT(DS4_TYPE_Q4_K))

static void type_list(uint64_t mask, char *buf, size_t len) {
    buf[0] = 0;
    for (int t = 0; t < 64; t++)
        if (mask & TYPE_BIT(t)) {
            size_t used = strlen(buf);
            snprintf(buf + used, len - used, "%s%s", used ? " or " : "", ds4_type_name(t));
        }
}

/* Binds `name` into *t, checking type (one of `types`), rank and dims.
 * A missing tensor is an error unless optional. */
static int bind(struct loader *ld, ds4_tensor *t, const char *name, uint64_t types, int n_dims,
                int64_t d0, int64_t d1, int64_t d2, int optional) {
    const ds4_gguf *g = ld->g;
    memset(t, 0, sizeof *t);
    int64_t i = ds4_gguf_find_tensor(g, name);
    if (i < 0) return optional ? 0 : fail(ld, "required tensor is missing: %s", name);
    ld->bound[i] = 1;
    int type = ds4_gguf_tensor_type(g, i);
    if (type < 0 || type >= 64 || !(types & TYPE_BIT(type))) {
        char want[96];
        type_list(types, want, sizeof want);
        return fail(ld, "tensor %s has type %s (%d), expected %s", name, ds4_type_name(type), type,
                    want);
    }
    int nd = ds4_gguf_tensor_n_dims(g, i);
    if (nd != n_dims)
        return fail(ld, "tensor %s has %d dimensions, expected %d", name, nd, n_dims);
    int64_t want[3] = {d0, d1, d2};
    for (int d = 0; d < n_dims; d++) {
        int64_t got = ds4_gguf_tensor_dim(g, i, d);
        if (got != want[d])
            return fail(ld, "tensor %s dim[%d] is %lld, expected %lld from the metadata", name, d,
                        (long long)got, (long long)want[d]);
    }
    int64_t be = ds4_type_block_elems(type);
    if (d0 % be)
        return fail(ld, "tensor %s rows of %lld elements are not a whole number of %s blocks (%lld)",
                    name, (long long)d0, ds4_type_name(type), (long long)be);
    t->data = ds4_gguf_base(g) + ds4_gguf_tensor_offset(g, i);
    t->type = type;
    t->n_dims = nd;
    for (int d = 0; d < 4; d++) t->ne[d] = ds4_gguf_tensor_dim(g, i, d);
    t->nbytes = ds4_gguf_tensor_nbytes(g, i);
    t->row_bytes = ds4_type_nbytes(type, d0);
    return 0;
}

#define F32 TYPE_BIT(DS4_TYPE_F32)
#define F16 TYPE_BIT(DS4_TYPE_F16)
#define Q8 TYPE_BIT(DS4_TYPE_Q8_0)
#define I32 TYPE_BIT(DS4_TYPE_I32)

static int bind_layer(struct loader *ld, int l) {
    const ds4_config *c = &ld->m->cfg;
    ds4_layer *L = &ld->m->layers[l];
    char n[128];
    int64_t hc_dim = (int64_t)c->n_hc * c->n_embd;
    int64_t hc_mix = (int64_t)(2 + c->n_hc) * c->n_hc;   /* pre, post, comb */
    int64_t q_dim = (int64_t)c->n_head * c->head_dim;
    int64_t shexp_ff = (int64_t)c->expert_ff * c->n_shared_experts;
#define B(field, suffix, types, nd, d0, d1, d2, opt)                                         \
    do {                                                                                   \
        snprintf(n, sizeof n, "blk.%d." suffix, l);                                        \
        if (bind(ld, &L->field, n, types, nd, d0, d1, d2, opt)) return -1;                 \
    } while (0)
    B(hc_attn_fn, "hc_attn_fn.weight", F16, 2, hc_dim, hc_mix, 0, 0);
    B(hc_attn_base, "hc_attn_base.weight", F32, 1, hc_mix, 0, 0, 0);
    B(hc_attn_scale, "hc_attn_scale.weight", F32, 1, 3, 0, 0, 0);
    B(attn_norm, "attn_norm.weight", F32, 1, c->n_embd, 0, 0, 0);
    B(attn_q_a, "attn_q_a.weight", Q8, 2, c->n_embd, c->q_lora_rank, 0, 0);
    B(attn_q_a_norm, "attn_q_a_norm.weight", F32, 1, c->q_lora_rank, 0, 0, 0);
    B(attn_q_b, "attn_q_b.weight", Q8, 2, c->q_lora_rank, q_dim, 0, 0);
    B(attn_kv, "attn_kv.weight", Q8, 2, c->n_embd, c->head_dim, 0, 0);
    B(attn_kv_a_norm, "attn_kv_a_norm.weight", F32, 1, c->head_dim, 0, 0, 0);
    B(attn_sinks, "attn_sinks.weight", F32, 1, c->n_head, 0, 0, 0);
    B(attn_output_a, "attn_output_a.weight", Q8, 2, q_dim / c->o_groups,
      (int64_t)c->o_groups * c->o_lora_rank, 0, 0);
    B(attn_output_b, "attn_output_b.weight", Q8, 2, (int64_t)c->o_groups * c->o_lora_rank,
      c->n_embd, 0, 0);
    B(hc_ffn_fn, "hc_ffn_fn.weight", F16, 2, hc_dim, hc_mix, 0, 0);
    B(hc_ffn_base, "hc_ffn_base.weight", F32, 1, hc_mix, 0, 0, 0);
    B(hc_ffn_scale, "hc_ffn_scale.weight", F32, 1, 3, 0, 0, 0);
    B(ffn_norm, "ffn_norm.weight", F32, 1, c->n_embd, 0, 0, 0);
    B(ffn_gate_inp, "ffn_gate_inp.weight", F16, 2, c->n_embd, c->n_expert, 0, 0);
    B(ffn_gate_exps, "ffn_gate_exps.weight", ROUTED_TYPES, 3, c->n_embd, c->expert_ff, c->n_expert, 0);
    B(ffn_up_exps, "ffn_up_exps.weight", ROUTED_TYPES, 3, c->n_embd, c->expert_ff, c->n_expert, 0);
    B(ffn_down_exps, "ffn_down_exps.weight", ROUTED_TYPES, 3, c->expert_ff, c->n_embd, c->n_expert, 0);
    B(ffn_gate_shexp, "ffn_gate_shexp.weight", Q8, 2, c->n_embd, shexp_ff, 0, 0);
    B(ffn_up_shexp, "ffn_up_shexp.weight", Q8, 2, c->n_embd, shexp_ff, 0, 0);
    B(ffn_down_shexp, "ffn_down_shexp.weight", Q8, 2, shexp_ff, c->n_embd, 0, 0);

    if (L->ffn_gate_exps.type != L->ffn_up_exps.type)
        return fail(ld, "routed gate/up experts use different quant types in layer %d (%s, %s)", l,
                    ds4_type_name(L->ffn_gate_exps.type), ds4_type_name(L->ffn_up_exps.type));
    int q2 = L->ffn_gate_exps.type == DS4_TYPE_IQ2_XXS && L->ffn_down_exps.type == DS4_TYPE_Q2_K;
    int q4 = L->ffn_gate_exps.type == DS4_TYPE_Q4_K && L->ffn_down_exps.type == DS4_TYPE_Q4_K;
    if (!q2 && !q4)
        return fail(ld, "layer %d routed experts are %s/%s/%s: supported are IQ2_XXS/IQ2_XXS/Q2_K "
                    "and Q4_K/Q4_K/Q4_K", l, ds4_type_name(L->ffn_gate_exps.type),
                    ds4_type_name(L->ffn_up_exps.type), ds4_type_name(L->ffn_down_exps.type));

    if (L->hash_routed) {
        B(tid2eid, "ffn_gate_tid2eid.weight", I32, 2, c->n_expert_used, c->n_vocab, 0, 0);
        B(exp_probs_b, "exp_probs_b.bias", F32, 1, c->n_expert, 0, 0, 1);
        if (L->exp_probs_b.data)
            warn(ld->m, "blk.%d.exp_probs_b.bias is present on a hash-routed layer (unused)", l);
    } else {
        B(exp_probs_b, "exp_probs_b.bias", F32, 1, c->n_expert, 0, 0, 1);
        if (!L->exp_probs_b.data)
            warn(ld->m, "blk.%d.exp_probs_b.bias is missing: experts are selected without the "
                 "correction bias", l);
    }

    int m = L->compress_ratio;
    if (m) {
        int64_t coff = m == 4 ? 2 : 1;   /* ratio-4 windows overlap: two series */
        B(comp_ape, "attn_compressor_ape.weight", F16, 2, coff * c->head_dim, m, 0, 0);
        B(comp_kv, "attn_compressor_kv.weight", F16, 2, c->n_embd, coff * c->head_dim, 0, 0);
        B(comp_gate, "attn_compressor_gate.weight", F16, 2, c->n_embd, coff * c->head_dim, 0, 0);
        B(comp_norm, "attn_compressor_norm.weight", F32, 1, c->head_dim, 0, 0, 0);
    }
    if (m == 4) {
        int64_t idx_q = (int64_t)c->indexer_heads * c->indexer_dim;
        B(idx_q_b, "indexer.attn_q_b.weight", F16, 2, c->q_lora_rank, idx_q, 0, 0);
        B(idx_proj, "indexer.proj.weight", F16, 2, c->n_embd, c->indexer_heads, 0, 0);
        B(idx_comp_ape, "indexer_compressor_ape.weight", F16, 2, 2 * (int64_t)c->indexer_dim, m, 0, 0);
        B(idx_comp_kv, "indexer_compressor_kv.weight", F16, 2, c->n_embd, 2 * (int64_t)c->indexer_dim, 0, 0);
        B(idx_comp_gate, "indexer_compressor_gate.weight", F16, 2, c->n_embd,
          2 * (int64_t)c->indexer_dim, 0, 0);
        B(idx_comp_norm, "indexer_compressor_norm.weight", F32, 1, c->indexer_dim, 0, 0, 0);
    } else {
        snprintf(n, sizeof n, "blk.%d.indexer.proj.weight", l);
        if (ds4_gguf_find_tensor(ld->g, n) >= 0)
            return fail(ld, "layer %d has indexer tensors but compression ratio %d (the indexer "
                        "belongs to ratio-4 layers)", l, m);
    }
#undef B
    return 0;
}

static int check_tid2eid(struct loader *ld, int l) {
    const ds4_tensor *t = &ld->m->layers[l].tid2eid;
    int64_t n = t->ne[0] * t->ne[1];
    const int32_t *ids = t->data;
    for (int64_t k = 0; k < n; k++) {
        int32_t e;
        memcpy(&e, ids + k, 4);
        if (e < 0 || e >= ld->m->cfg.n_expert)
            return fail(ld, "blk.%d.ffn_gate_tid2eid.weight: token %lld routes to expert %d, "
                        "outside 0..%d", l, (long long)(k / t->ne[0]), e, ld->m->cfg.n_expert - 1);
    }
    return 0;
}

static int bind_globals(struct loader *ld) {
    const ds4_config *c = &ld->m->cfg;
    ds4_model *m = ld->m;
    int64_t hc_dim = (int64_t)c->n_hc * c->n_embd;
    if (bind(ld, &m->token_embd, "token_embd.weight", F16, 2, c->n_embd, c->n_vocab, 0, 0) ||
        bind(ld, &m->output_hc_fn, "output_hc_fn.weight", F16, 2, hc_dim, c->n_hc, 0, 0) ||
        bind(ld, &m->output_hc_base, "output_hc_base.weight", F32, 1, c->n_hc, 0, 0, 0) ||
        bind(ld, &m->output_hc_scale, "output_hc_scale.weight", F32, 1, 1, 0, 0, 0) ||
        bind(ld, &m->output_norm, "output_norm.weight", F32, 1, c->n_embd, 0, 0, 0) ||
        bind(ld, &m->output, "output.weight", Q8, 2, c->n_embd, c->n_vocab, 0, 0))
        return -1;
    return 0;
}

/* ---- the Flash profile (§2.1 constants) ---- */

static int expected_flash_ratio(int l) { return l < 2 ? 0 : (l % 2 ? 128 : 4); }

static void check_flash_profile(ds4_model *m) {
    const ds4_config *c = &m->cfg;
    struct { const char *key; int64_t got, want; } ints[] = {
        {"block_count", c->n_layer, 43}, {"embedding_length", c->n_embd, 4096},
        {"vocab_size", c->n_vocab, 129280}, {"attention.head_count", c->n_head, 64},
        {"attention.key_length", c->head_dim, 512}, {"rope.dimension_count", c->rope_dim, 64},
        {"attention.q_lora_rank", c->q_lora_rank, 1024},
        {"attention.output_lora_rank", c->o_lora_rank, 1024},
        {"attention.output_group_count", c->o_groups, 8}, {"expert_count", c->n_expert, 256},
        {"expert_used_count", c->n_expert_used, 6}, {"expert_feed_forward_length", c->expert_ff, 2048},
        {"expert_shared_count", c->n_shared_experts, 1}, {"hash_layer_count", c->n_hash_layers, 3},
        {"attention.sliding_window", c->sliding_window, 128},
        {"attention.indexer.head_count", c->indexer_heads, 64},
        {"attention.indexer.key_length", c->indexer_dim, 128},
        {"attention.indexer.top_k", c->indexer_top_k, 512}, {"hyper_connection.count", c->n_hc, 4},
        {"hyper_connection.sinkhorn_iterations", c->sinkhorn_iters, 20},
        {"rope.scaling.original_context_length", c->rope_orig_ctx, 65536},
    };
    for (size_t k = 0; k < sizeof ints / sizeof ints[0]; k++)
        if (ints[k].got != ints[k].want) {
            snprintf(m->profile_note, sizeof m->profile_note, "custom shape: %s=%lld (Flash: %lld)",
                     ints[k].key, (long long)ints[k].got, (long long)ints[k].want);
            return;
        }
    struct { const char *key; double got, want; } floats[] = {
        {"rope.freq_base", c->rope_freq_base, 10000}, {"rope.scaling.factor", c->rope_scaling_factor, 16},
        {"rope.scaling.yarn_beta_fast", c->yarn_beta_fast, 32},
        {"rope.scaling.yarn_beta_slow", c->yarn_beta_slow, 1},
        {"attention.compress_rope_freq_base", c->compress_rope_freq_base, 160000},
        {"expert_weights_scale", c->expert_weights_scale, 1.5},
        {"attention.layer_norm_rms_epsilon", c->rms_eps, 1e-6}, {"hyper_connection.epsilon", c->hc_eps, 1e-6},
    };
    for (size_t k = 0; k < sizeof floats / sizeof floats[0]; k++) {
        double tol = fmax(fabs(floats[k].want), 1.0) * 1e-6;
        if (fabs(floats[k].got - floats[k].want) > tol) {
            snprintf(m->profile_note, sizeof m->profile_note, "custom shape: %s=%g (Flash: %g)",
                     floats[k].key, floats[k].got, floats[k].want);
            return;
        }
    }
    for (int l = 0; l < c->n_layer; l++) {
        if (m->layers[l].compress_ratio != expected_flash_ratio(l)) {
            snprintf(m->profile_note, sizeof m->profile_note,
                     "custom shape: compression ratio at layer %d: got %d, expected %d", l,
                     m->layers[l].compress_ratio, expected_flash_ratio(l));
            return;
        }
        if (fabs(m->layers[l].swiglu_clamp - 10.0) > 1e-5) {
            snprintf(m->profile_note, sizeof m->profile_note,
                     "custom shape: swiglu clamp at layer %d: got %g, expected 10", l,
                     m->layers[l].swiglu_clamp);
            return;
        }
    }
    m->is_flash = 1;
    snprintf(m->profile_note, sizeof m->profile_note, "DeepSeek V4 Flash");
}

static void note_file_level(struct loader *ld) {
    const ds4_gguf *g = ld->g;
    int64_t i = ds4_gguf_find_kv(g, "general.architecture");
    uint64_t len = 0;
    const char *arch = i >= 0 ? ds4_gguf_kv_get_str(g, i, &len) : NULL;
    if (!arch || len != 9 || memcmp(arch, "deepseek4", 9) != 0)
        warn(ld->m, "general.architecture is %s%.*s%s, expected \"deepseek4\"", arch ? "\"" : "",
             arch ? (int)(len > 64 ? 64 : len) : 7, arch ? arch : "missing", arch ? "\"" : "");
    int64_t extra = 0, first = -1;
    for (int64_t t = 0; t < ds4_gguf_n_tensors(g); t++)
        if (!ld->bound[t]) {
            if (first < 0) first = t;
            extra++;
        }
    if (extra) {
        uint64_t nl;
        const char *nm = ds4_gguf_tensor_name(g, first, &nl);
        warn(ld->m, "%lld tensor(s) not used by DeepSeek V4 Flash were ignored (first: %.*s)",
             (long long)extra, (int)(nl > 128 ? 128 : nl), nm);
    }
    for (int64_t k = 0; k < ds4_gguf_n_warnings(g); k++)
        warn(ld->m, "%s", ds4_gguf_warning(g, k));
}

static void set_fingerprint(ds4_model *m) {
    const ds4_gguf *g = m->gguf;
    uint64_t h = 0xcbf29ce484222325ull;
    for (int64_t i = 0; i < ds4_gguf_n_tensors(g); i++) {
        uint64_t len;
        const char *name = ds4_gguf_tensor_name(g, i, &len);
        uint64_t fields[4] = {(uint64_t)ds4_gguf_tensor_type(g, i),
                              (uint64_t)ds4_gguf_tensor_n_elements(g, i),
                              ds4_gguf_tensor_offset(g, i), len};
        const uint8_t *parts[2] = {(const uint8_t *)name, (const uint8_t *)fields};
        size_t sizes[2] = {len, sizeof fields};
        for (int k = 0; k < 2; k++)
            for (size_t b = 0; b < sizes[k]; b++) h = (h ^ parts[k][b]) * 0x100000001b3ull;
    }
    m->fingerprint = h;
}

static void set_variant(ds4_model *m) {
    int n_q4 = 0;
    for (int l = 0; l < m->cfg.n_layer; l++) n_q4 += m->layers[l].ffn_gate_exps.type == DS4_TYPE_Q4_K;
    m->variant = n_q4 == 0 ? "q2" : n_q4 == m->cfg.n_layer ? "q4" : "mixed";
}

int ds4_model_open(const char *path, ds4_model **out, char *err, size_t errlen) {
    *out = NULL;
    ds4_model *m = calloc(1, sizeof *m);
    if (m) m->refs = 1;
    if (!m) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    struct loader ld = {m, NULL, err, errlen, NULL};
    if (ds4_gguf_open(path, &m->gguf, err, errlen)) goto fail;
    ld.g = m->gguf;
    if (ds4_gguf_find_tensor(ld.g, "token_embd.weight") < 0 &&
        ds4_gguf_find_tensor(ld.g, "mtp.0.e_proj.weight") >= 0) {
        fail(&ld, "this is the MTP support file (mtp.0.* tensors), not the main model: load "
             "the main DeepSeek-V4-Flash GGUF");
        goto fail;
    }
    if (read_config(&ld)) goto fail;
    m->layers = calloc((size_t)m->cfg.n_layer, sizeof *m->layers);
    ld.bound = calloc((size_t)(ds4_gguf_n_tensors(ld.g) ? ds4_gguf_n_tensors(ld.g) : 1), 1);
    if (!m->layers || !ld.bound) {
        fail(&ld, "out of memory");
        goto fail;
    }
    if (read_layer_arrays(&ld) || check_tokenizer(&ld) || bind_globals(&ld)) goto fail;
    for (int l = 0; l < m->cfg.n_layer; l++)
        if (bind_layer(&ld, l) || (m->layers[l].hash_routed && check_tid2eid(&ld, l))) goto fail;
    note_file_level(&ld);
    set_variant(m);
    set_fingerprint(m);
    check_flash_profile(m);
    free(ld.bound);
    *out = m;
    return 0;
fail:
    free(ld.bound);
    ds4_model_close(m);
    return -1;
}

void ds4_model_close(ds4_model *m) { ds4_model_release(m); }

/* Reads every page of the tensor data once, so the first tokens do not stall
 * on page faults; the kernel is asked to read ahead a chunk at a time. */
int64_t ds4_model_warm(const ds4_model *m, ds4_progress_fn progress, void *user) {
    const uint8_t *base = ds4_gguf_base(m->gguf);
    uint64_t start = ds4_gguf_data_offset(m->gguf), end = ds4_gguf_file_size(m->gguf);
    const uint64_t chunk = (uint64_t)64 << 20, page = 4096;
    volatile uint8_t sink = 0;
    for (uint64_t at = start; at < end; at += chunk) {
        uint64_t len = end - at < chunk ? end - at : chunk;
        uint64_t aligned = at & ~(page - 1);
        madvise((void *)(base + aligned), (size_t)(at + len - aligned), MADV_WILLNEED);
        uint8_t acc = 0;
        for (uint64_t p = at; p < at + len; p += page) acc ^= base[p];
        sink ^= acc;
        if (progress) progress(user, (int64_t)(at + len - start), (int64_t)(end - start));
    }
    (void)sink;
    return (int64_t)(end - start);
}

void ds4_model_retain(const ds4_model *m) {
    /* the count is the one mutable part of a model that sessions share as const */
    __atomic_fetch_add(&((ds4_model *)m)->refs, 1, __ATOMIC_ACQ_REL);
}

void ds4_model_release(const ds4_model *cm) {
    ds4_model *m = (ds4_model *)cm;
    if (!m || __atomic_fetch_sub(&m->refs, 1, __ATOMIC_ACQ_REL) != 1) return;
    ds4_model_release_backend(m);
    ds4_gguf_close(m->gguf);
    for (int64_t i = 0; i < m->n_warnings; i++) free(m->warnings[i]);
    free(m->warnings);
    free(m->layers);
    free(m);
}

const ds4_config *ds4_model_config(const ds4_model *m) { return &m->cfg; }
const ds4_gguf *ds4_model_gguf(const ds4_model *m) { return m->gguf; }
const char *ds4_model_variant(const ds4_model *m) { return m->variant; }
int ds4_model_is_flash(const ds4_model *m) { return m->is_flash; }
uint64_t ds4_model_fingerprint(const ds4_model *m) { return m->fingerprint; }
const char *ds4_model_profile_note(const ds4_model *m) { return m->profile_note; }
int64_t ds4_model_n_warnings(const ds4_model *m) { return m->n_warnings; }

const char *ds4_model_warning(const ds4_model *m, int64_t i) {
    return i >= 0 && i < m->n_warnings ? m->warnings[i] : NULL;
}

int ds4_model_layer_compress_ratio(const ds4_model *m, int layer) {
    return layer >= 0 && layer < m->cfg.n_layer ? m->layers[layer].compress_ratio : -1;
}

float ds4_model_layer_swiglu_clamp(const ds4_model *m, int layer) {
    return layer >= 0 && layer < m->cfg.n_layer ? m->layers[layer].swiglu_clamp : 0.0f;
}

int ds4_model_layer_expert_type(const ds4_model *m, int layer, int which) {
    if (layer < 0 || layer >= m->cfg.n_layer) return -1;
    const ds4_layer *L = &m->layers[layer];
    return which == 0 ? L->ffn_gate_exps.type : which == 1 ? L->ffn_up_exps.type
                                                           : L->ffn_down_exps.type;
}
