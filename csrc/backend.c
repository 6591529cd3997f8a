/* Backends: the built-in CPU one, and loading another from a shared library. */
#include <dlfcn.h>
#include <stdio.h>
#include <string.h>

#include "backend.h"
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
