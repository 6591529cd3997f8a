/* Backends: the built-in CPU one, and loading another from a shared library. */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "ops.h"
#include "session_state.h"
#include "weights.h"

static int cpu_forward(ds4_session *s, int64_t n, float *logits, int all_logits, char *err,
                       size_t errlen) {
    return ds4_forward(s, n, logits, all_logits, err, errlen);
}

const ds4_backend ds4_cpu_backend = {
    .abi = DS4_BACKEND_ABI,
    .name = "cpu",
    .prefill_chunk = 256,
    .forward = cpu_forward,
};

const ds4_backend *ds4_model_backend(const ds4_model *m) {
    return m->backend ? m->backend : &ds4_cpu_backend;
}

const char *ds4_model_backend_name(const ds4_model *m) { return ds4_model_backend(m)->name; }

int ds4_model_prefill_chunk(const ds4_model *m) { return ds4_model_backend(m)->prefill_chunk; }

int ds4_model_use_backend(ds4_model *m, const char *name, const char *library, int synthetic,
                          ds4_progress_fn progress, void *progress_user, char *err,
                          size_t errlen) {
    if (m->backend) {
        snprintf(err, errlen, "the model already runs on %s", m->backend->name);
        return -1;
    }
    if (strcmp(name, "cpu") == 0) return 0;
    if (!library || !*library) {
        snprintf(err, errlen, "not built (no %s library: `make cuda` builds it where nvcc is)", name);
        return DS4_BACKEND_UNAVAILABLE;
    }
    void *h = dlopen(library, RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        snprintf(err, errlen, "cannot load the %s backend: %s", name, dlerror());
        return DS4_BACKEND_UNAVAILABLE;
    }
    ds4_backend_entry_fn entry = (ds4_backend_entry_fn)dlsym(h, DS4_BACKEND_ENTRY);
    const ds4_backend *b = entry ? entry() : NULL;
    if (!b || b->abi != DS4_BACKEND_ABI || strcmp(b->name, name) != 0 || !b->forward) {
        snprintf(err, errlen, "%s is not a ds4 %s backend of this version (rebuild it)", library,
                 name);
        dlclose(h);
        return -1;
    }
    if (b->model_init) {
        int rc = b->model_init(m, synthetic, progress, progress_user, err, errlen);
        if (rc) {
            dlclose(h);
            return rc;
        }
    }
    m->backend = b;
    m->backend_lib = h;
    return 0;
}

int ds4_model_copy_bandwidth(const ds4_model *m, int64_t nbytes, int repeats, double *out,
                             char *err, size_t errlen) {
    const ds4_backend *b = ds4_model_backend(m);
    if (!b->copy_bandwidth) {
        snprintf(err, errlen, "the %s backend does not measure its copy bandwidth", b->name);
        return -1;
    }
    return b->copy_bandwidth(nbytes, repeats, out, err, errlen);
}

void ds4_model_release_backend(ds4_model *m) {
    if (!m->backend) return;
    if (m->backend->model_free) m->backend->model_free(m);
    dlclose(m->backend_lib);
    m->backend = NULL;
    m->backend_lib = NULL;
}

/* ---- one product, for tests ---- */

static int cpu_product(const ds4_model *m, const ds4_tensor *w, int expert, int parts, int shared_x,
                       int numerics, const float *x, int64_t n, float *y, char *err, size_t errlen) {
    (void)m;
    ds4_matrix mat = w->n_dims == 3 ? ds4_expert_matrix(w, expert) : ds4_matrix_of(w);
    int64_t n_out = mat.n_out, xs = shared_x ? mat.n_in : parts * mat.n_in;
    mat.n_out /= parts;   /* a stretch */
    float *scratch = NULL;
    if (numerics == DS4_NUMERICS_QAT_Q8 && !(scratch = malloc((size_t)(n * mat.n_in) * sizeof(float)))) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    for (int p = 0; p < parts; p++) {
        ds4_matrix part = mat;
        part.data += p * mat.n_out * mat.row_bytes;
        const float *xp = x + (shared_x ? 0 : p * mat.n_in);
        if (scratch) ds4_linear_act8(NULL, part, xp, xs, n, y + p * mat.n_out, n_out, scratch);
        else ds4_linear(NULL, part, xp, xs, n, y + p * mat.n_out, n_out);
    }
    free(scratch);
    return 0;
}

static const ds4_tensor *matrix_named(const ds4_model *m, int layer, const char *name) {
    if (layer < 0) return strcmp(name, "output") == 0 ? &m->output : NULL;
    if (layer >= m->cfg.n_layer) return NULL;
    const ds4_layer *L = &m->layers[layer];
    struct { const char *name; const ds4_tensor *t; } table[] = {
        {"attn_q_a", &L->attn_q_a}, {"attn_q_b", &L->attn_q_b}, {"attn_kv", &L->attn_kv},
        {"attn_output_a", &L->attn_output_a}, {"attn_output_b", &L->attn_output_b},
        {"ffn_gate_exps", &L->ffn_gate_exps}, {"ffn_up_exps", &L->ffn_up_exps},
        {"ffn_down_exps", &L->ffn_down_exps}, {"ffn_gate_shexp", &L->ffn_gate_shexp},
        {"ffn_up_shexp", &L->ffn_up_shexp}, {"ffn_down_shexp", &L->ffn_down_shexp},
        {"ffn_gate_inp", &L->ffn_gate_inp}, {"comp_kv", &L->comp_kv}, {"comp_gate", &L->comp_gate},
        {"idx_q_b", &L->idx_q_b}, {"idx_proj", &L->idx_proj}, {"idx_comp_kv", &L->idx_comp_kv},
    };
    for (size_t i = 0; i < sizeof table / sizeof table[0]; i++)
        if (strcmp(name, table[i].name) == 0) return table[i].t->data ? table[i].t : NULL;
    return NULL;
}

int ds4_model_product(const ds4_model *m, int layer, const char *name, int expert, int parts, int shared_x,
                      int numerics, const float *x, int64_t n, float *y, char *err, size_t errlen) {
    const ds4_tensor *w = matrix_named(m, layer, name);
    if (!w) {
        snprintf(err, errlen, "no matrix %s in layer %d", name, layer);
        return -1;
    }
    int64_t experts = w->n_dims == 3 ? w->ne[2] : 1;
    if (expert < 0 || expert >= experts || n < 1 || numerics < DS4_NUMERICS_EXACT ||
        numerics > DS4_NUMERICS_QAT_Q8 || parts < 1 || (parts > 1 && (w->n_dims == 3 || w->ne[1] % parts))) {
        snprintf(err, errlen, "bad product arguments (expert %d of %lld, %d parts of %lld rows, %lld tokens, "
                 "numerics %d)", expert, (long long)experts, parts, (long long)w->ne[1], (long long)n, numerics);
        return -1;
    }
    const ds4_backend *b = ds4_model_backend(m);
    return (b->product ? b->product : cpu_product)(m, w, expert, parts, shared_x, numerics, x, n, y, err,
                                                   errlen);
}
