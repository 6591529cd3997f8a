/* The CUDA backend (backend.h): weights in device memory, the KV state in
 * device memory, and the forward pass of forward.c as CUDA kernels.
 * Built as its own shared library (ds4/_ds4_cuda.so) and loaded with
 * dlopen; it calls nothing in the core, it only reads the core's structs. */
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <vector>

#include "act8.cuh"
#include "act8_staged.cuh"
#include "attention_bf16.cuh"
#include "attention_tc.cuh"
#include "expert_dp4a.cuh"
#include "greedy.cuh"
#include "sample.cuh"
#include "indexer_tc.cuh"
#include "int8_decode.cuh"
#include "mma_f16.cuh"
#include "mma_few_rows.cuh"
#include "kernels.cuh"
#include "mma_linear.cuh"

extern "C" {
#include "iq2_tables.h"
}

/* ---- errors ---- */

static int cuda_fail(cudaError_t e, const char *what, char *err, size_t errlen) {
    snprintf(err, errlen, "CUDA error in %s: %s", what, cudaGetErrorString(e));
    return -1;
}

#define CK(call, what)                                              \
    do {                                                            \
        cudaError_t e_ = (call);                                    \
        if (e_ != cudaSuccess) return cuda_fail(e_, what, err, errlen); \
    } while (0)

/* The same where cleanup follows: sets the message and jumps to `out`. */
#define CKG(call, what)                                     \
    do {                                                    \
        cudaError_t e_ = (call);                            \
        if (e_ != cudaSuccess) {                            \
            cuda_fail(e_, what, err, errlen);               \
            goto out;                                       \
        }                                                   \
    } while (0)

static double gib(double b) { return b / (1024.0 * 1024.0 * 1024.0); }

/* ---- the device copy of the weights ---- */

struct dmodel {
    ds4_layer *layers;   /* the model's layers with data pointing to device memory */
    ds4_tensor token_embd, output_hc_fn, output_hc_base, output_hc_scale, output_norm, output;
    uint8_t *mem;
    size_t bytes;
    char device_name[256];
};

enum { ROLE_PLAIN = 0, ROLE_NORM = 1, ROLE_EXPERT_IDS = 2 };

#define LAYER_TENSORS(X)                                                                       \
    X(hc_attn_fn, 0) X(hc_attn_base, 0) X(hc_attn_scale, 0) X(attn_norm, 1) X(hc_ffn_fn, 0)   \
    X(hc_ffn_base, 0) X(hc_ffn_scale, 0) X(ffn_norm, 1) X(attn_q_a, 0) X(attn_q_a_norm, 1)     \
    X(attn_q_b, 0) X(attn_kv, 0) X(attn_kv_a_norm, 1) X(attn_sinks, 0) X(attn_output_a, 0)     \
    X(attn_output_b, 0) X(comp_ape, 0) X(comp_kv, 0) X(comp_gate, 0) X(comp_norm, 1)           \
    X(idx_q_b, 0) X(idx_proj, 0) X(idx_comp_ape, 0) X(idx_comp_kv, 0) X(idx_comp_gate, 0)      \
    X(idx_comp_norm, 1) X(ffn_gate_inp, 0) X(exp_probs_b, 0) X(tid2eid, 2) X(ffn_gate_exps, 0) \
    X(ffn_up_exps, 0) X(ffn_down_exps, 0) X(ffn_gate_shexp, 0) X(ffn_up_shexp, 0)              \
    X(ffn_down_shexp, 0)

struct tensor_ref {
    const ds4_tensor *host;
    ds4_tensor *dev;
    int role;
};

static int tensor_refs(const ds4_model *m, dmodel *d, tensor_ref **out) {
    int n_layer = m->cfg.n_layer, cap = 6 + 40 * n_layer, n = 0;
    tensor_ref *r = (tensor_ref *)calloc((size_t)cap, sizeof *r);
    if (!r) return -1;
#define ADD(h, dv, role_)                                       \
    do {                                                        \
        if ((h).data) r[n++] = tensor_ref{&(h), &(dv), role_};  \
    } while (0)
    ADD(m->token_embd, d->token_embd, 0);
    ADD(m->output_hc_fn, d->output_hc_fn, 0);
    ADD(m->output_hc_base, d->output_hc_base, 0);
    ADD(m->output_hc_scale, d->output_hc_scale, 0);
    ADD(m->output_norm, d->output_norm, 1);
    ADD(m->output, d->output, 0);
    for (int l = 0; l < n_layer; l++) {
#define LAYER_ADD(f, role_) ADD(m->layers[l].f, d->layers[l].f, role_);
        LAYER_TENSORS(LAYER_ADD)
#undef LAYER_ADD
    }
#undef ADD
    *out = r;
    return n;
}

static size_t align_up(size_t x) { return (x + 255) & ~(size_t)255; }

/* Deterministic noise for synthetic weights. */
__device__ __forceinline__ uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

__device__ __forceinline__ float unit(uint64_t seed, uint64_t i) {   /* uniform in [-1, 1) */
    return (float)(mix64(seed + i * 0x9e3779b97f4a7c15ull) >> 40) * 0x1p-23f - 1.0f;
}

/* Random bytes over a whole tensor (4-byte words, then the tail). */
__global__ void k_fill_bytes(uint8_t *p, int64_t nbytes, uint64_t seed) {
    pdl_begin();
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    int64_t words = nbytes / 4;
    for (; i < words; i += (int64_t)gridDim.x * blockDim.x)
        ((uint32_t *)p)[i] = (uint32_t)mix64(seed + (uint64_t)i * 0x9e3779b97f4a7c15ull);
    if (blockIdx.x == 0 && threadIdx.x < (nbytes & 3))
        p[words * 4 + threadIdx.x] = (uint8_t)mix64(seed ^ (uint64_t)threadIdx.x);
}

/* Float tensors: norms 1, expert ids in range, the rest uniform with std s. */
__global__ void k_fill_float(uint8_t *p, int type, int64_t n, int role, float s, int n_expert,
                             uint64_t seed) {
    pdl_begin();
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        float v = role == ROLE_NORM ? 1.0f : unit(seed, (uint64_t)i) * s * 1.7320508f;
        if (role == ROLE_EXPERT_IDS) ((int32_t *)p)[i] = (int32_t)(mix64(seed + (uint64_t)i) % (uint64_t)n_expert);
        else if (type == DS4_TYPE_F32) ((float *)p)[i] = v;
        else if (type == DS4_TYPE_F16) ((__half *)p)[i] = __float2half(v);
        else ((uint16_t *)p)[i] = (uint16_t)(__float_as_uint(v) >> 16);
    }
}

/* Quantized blocks: random codes (already there), then finite scales sized
 * for std s; Q8_0 codes kept in [-127, 127]. */
__global__ void k_fix_blocks(uint8_t *p, int type, int64_t n_blocks, float d, float dmin) {
    pdl_begin();
    for (int64_t b = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; b < n_blocks;
         b += (int64_t)gridDim.x * blockDim.x) {
        uint8_t *blk;
        switch (type) {
        case DS4_TYPE_Q8_0:
            blk = p + b * 34;
            *(__half *)blk = __float2half(d);
            for (int i = 0; i < 32; i++)
                if ((int8_t)blk[2 + i] == -128) blk[2 + i] = (uint8_t)(int8_t)-127;
            break;
        case DS4_TYPE_Q2_K:
            blk = p + b * 84;
            *(__half *)(blk + 80) = __float2half(d);
            *(__half *)(blk + 82) = __float2half(dmin);
            break;
        case DS4_TYPE_Q4_K:
            blk = p + b * 144;
            *(__half *)blk = __float2half(d);
            *(__half *)(blk + 2) = __float2half(dmin);
            break;
        case DS4_TYPE_IQ2_XXS:
            blk = p + b * 66;
            *(__half *)blk = __float2half(d);
            break;
        }
    }
}

/* Where half-word i of a repacked row (common.cuh) comes from in the file's
 * row of nb blocks: blocks of 17 (Q8_0: scale, 16 code pairs), 42 (Q2_K: 8
 * scale pairs, 32 code pairs, d, dmin) or 33 (IQ2_XXS: scale, 32 code
 * pairs) half-words. */
__device__ int repacked_source(int type, int nb, int i) {
    switch (type) {
    case DS4_TYPE_Q8_0:
        return i < nb ? 17 * i : 17 * ((i - nb) / 16) + 1 + (i - nb) % 16;
    case DS4_TYPE_Q2_K:
        if (i < 2 * nb) return 42 * (i / 2) + 40 + i % 2;
        if (i < 10 * nb) return 42 * ((i - 2 * nb) / 8) + (i - 2 * nb) % 8;
        return 42 * ((i - 10 * nb) / 32) + 8 + (i - 10 * nb) % 32;
    default:   /* IQ2_XXS */
        return i < nb ? 33 * i : 33 * ((i - nb) / 32) + 1 + (i - nb) % 32;
    }
}

/* Rows of a Q8_0 / Q2_K / IQ2_XXS tensor into the layout the kernels read,
 * each in its own bytes: a block a row, through shared memory (rows up to the
 * 48 KB a launch gets; a wider row fails the launch with an error). */
__global__ void k_repack(uint8_t *p, int type, int64_t n_rows, int row_bytes, int block_bytes) {
    pdl_begin();
    extern __shared__ uint16_t row_sh[];
    int nb = row_bytes / block_bytes;
    for (int64_t r = blockIdx.x; r < n_rows; r += gridDim.x) {
        uint16_t *row = (uint16_t *)(p + r * row_bytes);   /* rows are 2-byte aligned */
        for (int i = threadIdx.x; i < row_bytes / 2; i += blockDim.x) row_sh[i] = row[i];
        __syncthreads();
        for (int i = threadIdx.x; i < row_bytes / 2; i += blockDim.x)
            row[i] = row_sh[repacked_source(type, nb, i)];
        __syncthreads();
    }
}

static int dev_repack(const ds4_tensor &t, cudaStream_t st, char *err, size_t errlen) {
    if (!repack_wide_multiple(t.type)) return 0;
    int block_bytes = t.type == DS4_TYPE_Q8_0 ? 34 : t.type == DS4_TYPE_Q2_K ? 84 : 66;
    int64_t rows = t.nbytes / t.row_bytes;
    int grid = (int)std::min<int64_t>(rows, 65535);
    launch_k(k_repack, grid, 256, (size_t)t.row_bytes, st, (uint8_t *)t.data, t.type, rows,
                                                      (int)t.row_bytes, block_bytes);
    CK(cudaGetLastError(), "repacking weight rows");
    return 0;
}

static int fill_synthetic(const tensor_ref *r, uint8_t *dst, int n_expert, uint64_t seed,
                          cudaStream_t st, char *err, size_t errlen) {
    const ds4_tensor *t = r->host;
    int64_t n = t->ne[0] * (t->n_dims > 1 ? t->ne[1] : 1) * (t->n_dims > 2 ? t->ne[2] : 1);
    float s = 1.0f / sqrtf((float)t->ne[0]);    /* keeps each product's output near unit size */
    int grid = (int)std::min<int64_t>(4096, (n + 255) / 256 + 1);
    switch (t->type) {
    case DS4_TYPE_F32:
    case DS4_TYPE_F16:
    case DS4_TYPE_BF16:
    case DS4_TYPE_I32:
        launch_k(k_fill_float, grid, 256, 0, st, dst, t->type, n, r->role, t->n_dims == 1 ? 0.1f : s,
                                           n_expert, seed);
        break;
    default: {
        int64_t be = t->type == DS4_TYPE_Q8_0 ? 32 : 256;
        launch_k(k_fill_bytes, 4096, 256, 0, st, dst, t->nbytes, seed);
        /* unit-scale code spreads of each format, measured on random codes */
        float spread = t->type == DS4_TYPE_Q8_0 ? 73.3f : t->type == DS4_TYPE_Q2_K ? 23.0f
                     : t->type == DS4_TYPE_Q4_K ? 400.0f : 60.0f;
        launch_k(k_fix_blocks, 4096, 256, 0, st, dst, t->type, n / be, s / spread, s / spread);
    }
    }
    CK(cudaGetLastError(), "synthetic weights");
    return 0;
}

/* Device n_in of every tensor used as a matrix must be a multiple of 8 (the
 * kernels read 8 elements at a time); the block formats always are. */
static int check_shapes(const ds4_model *m, char *err, size_t errlen) {
    const ds4_config *c = &m->cfg;
    /* the widest input of a product (the HC mixers) must fit k_linear1's registers */
    if ((int64_t)c->n_hc * c->n_embd > 8 * 256 * 8) {
        snprintf(err, errlen, "the CUDA backend supports hc x embd up to 16384 (got %d x %d)", c->n_hc,
                 c->n_embd);
        return -1;
    }
    int dpl = c->head_dim / 32;   /* attention: a head's vector over a warp's lanes */
    if (c->n_hc > HC_MAX || c->n_embd % 8 || c->head_dim % 32 || dpl & (dpl - 1) || dpl > 16 ||
        c->n_expert > 1024) {
        snprintf(err, errlen, "the CUDA backend does not support this model shape (hc %d, embd %d, "
                 "head_dim %d: a power of two from 32 to 512)", c->n_hc, c->n_embd, c->head_dim);
        return -1;
    }
    return 0;
}

static void model_free(ds4_model *m) {
    dmodel *d = (dmodel *)m->backend_model;
    if (!d) return;
    cudaFree(d->mem);
    free(d->layers);
    free(d);
    m->backend_model = NULL;
}

#define STAGE_BYTES (64u << 20)

static int model_init(ds4_model *m, int synthetic, ds4_progress_fn progress, void *progress_user,
                      char *err, size_t errlen) {
    int n_dev = 0;
    if (cudaGetDeviceCount(&n_dev) != cudaSuccess || n_dev == 0) {
        snprintf(err, errlen, "no CUDA GPU found");
        return DS4_BACKEND_UNAVAILABLE;
    }
    if (check_shapes(m, err, errlen)) return -1;
    dmodel *d = (dmodel *)calloc(1, sizeof *d);
    if (!d) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    m->backend_model = d;
    d->layers = (ds4_layer *)calloc((size_t)m->cfg.n_layer, sizeof *d->layers);
    tensor_ref *refs = NULL;
    int n_ref = d->layers ? tensor_refs(m, d, &refs) : -1;
    if (n_ref < 0) {
        model_free(m);
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    memcpy(d->layers, m->layers, (size_t)m->cfg.n_layer * sizeof *d->layers);
    size_t total = 0;
    for (int i = 0; i < n_ref; i++) total += align_up((size_t)refs[i].host->nbytes);
    d->bytes = total;

    cudaDeviceProp prop;
    size_t free_b = 0, all_b = 0;
    int rc = -1;
    uint8_t *stage[2] = {NULL, NULL};
    cudaEvent_t done[2] = {NULL, NULL};
    cudaStream_t st = NULL;

    CKG(cudaGetDeviceProperties(&prop, 0), "device query");
    g_pdl_device = prop.major >= 9 && !getenv("DS4_CUDA_NO_PDL");
    snprintf(d->device_name, sizeof d->device_name, "%s", prop.name);
    CKG(cudaMemGetInfo(&free_b, &all_b), "device query");
    /* headroom for the KV state and a chunk's buffers */
    if (total + ((size_t)1 << 30) > free_b) {
        snprintf(err, errlen,
                 "the model needs %.1f GiB of GPU memory for its weights (+1 GiB working space); "
                 "the %s has %.1f GiB free of %.1f GiB",
                 gib((double)total), prop.name, gib((double)free_b), gib((double)all_b));
        goto out;
    }
    CKG(cudaMalloc(&d->mem, total), "allocating the weights");
    CKG(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking), "stream");
    g_shared_limit = prop.sharedMemPerBlockOptin;
    if (const char *lim = getenv("DS4_CUDA_SHARED_LIMIT")) g_shared_limit = std::min(g_shared_limit, (size_t)atoll(lim));
    if (const char *c = getenv("DS4_CUDA_CARVEOUT")) g_carveout = std::max(0, std::min(100, atoi(c)));
    {
        /* the one kernel of large shared memory with no smaller one beside it,
         * at its largest: compact rows add a decoded row tile (the launch's
         * shm; an opt-in below what a launch asks fails that launch) */
        size_t idx_bytes = ((size_t)m->cfg.indexer_heads * (m->cfg.indexer_dim + 1) + 8 * m->cfg.indexer_heads +
                            8 * m->cfg.indexer_dim) *
                           sizeof(float);
        if (!allow_shared(k_idx_score, idx_bytes)) {
            snprintf(err, errlen,
                     "the indexer (%d heads of %d) needs %zu bytes of shared memory a block; the %s gives %zu",
                     m->cfg.indexer_heads, m->cfg.indexer_dim, idx_bytes, prop.name, g_shared_limit);
            goto out;
        }
    }
    /* the rest fall back to kernels of less shared memory where refused */
    attention_tc_init();
    indexer_tc_init();
    q8s_init();
    k2s_init();
    few_rows_init();
    f16s_init();
    expert_dp4a_init();
    CKG(cudaMemcpyToSymbol(d_iq2_grid, iq2xxs_grid, sizeof iq2xxs_grid), "tables");
    CKG(cudaMemcpyToSymbol(d_iq2_signs, ksigns_iq2xs, sizeof ksigns_iq2xs), "tables");
    if (!synthetic) {
        for (int b = 0; b < 2; b++) {
            CKG(cudaHostAlloc(&stage[b], STAGE_BYTES, cudaHostAllocDefault), "pinned staging");
            CKG(cudaEventCreateWithFlags(&done[b], cudaEventDisableTiming), "event");
        }
    }
    {
        /* the file's bytes through two pinned buffers: the copy out of the
         * mapping overlaps the transfer of the previous chunk */
        size_t off = 0;
        int k = 0;
        for (int i = 0; i < n_ref; i++) {
            const ds4_tensor *h = refs[i].host;
            uint8_t *dst = d->mem + off;
            *refs[i].dev = *h;
            refs[i].dev->data = dst;
            if (synthetic) {
                if (fill_synthetic(&refs[i], dst, m->cfg.n_expert, 0x5eed0000ull + (uint64_t)i * 7919,
                                   st, err, errlen))
                    goto out;
            } else {
                for (int64_t c = 0; c < h->nbytes; c += STAGE_BYTES, k ^= 1) {
                    size_t len = (size_t)std::min<int64_t>(STAGE_BYTES, h->nbytes - c);
                    CKG(cudaEventSynchronize(done[k]), "weight upload");
                    memcpy(stage[k], (const uint8_t *)h->data + c, len);
                    CKG(cudaMemcpyAsync(dst + c, stage[k], len, cudaMemcpyHostToDevice, st),
                        "weight upload");
                    CKG(cudaEventRecord(done[k], st), "weight upload");
                }
            }
            if (dev_repack(*refs[i].dev, st, err, errlen)) goto out;
            off += align_up((size_t)h->nbytes);
            if (progress) progress(progress_user, (int64_t)off, (int64_t)total);
        }
        CKG(cudaStreamSynchronize(st), "weight upload");
    }
    rc = 0;
out:
    for (int b = 0; b < 2; b++) {
        if (stage[b]) cudaFreeHost(stage[b]);
        if (done[b]) cudaEventDestroy(done[b]);
    }
    if (st) cudaStreamDestroy(st);
    free(refs);
    if (rc) model_free(m);
    return rc;
}

/* ---- sessions ---- */

/* Tokens per forward call: a chunk's (token, expert) pairs give each of
 * Flash's 256 experts ~48 tokens, enough to fill the tensor-core tiles. */
#define CUDA_PREFILL_CHUNK 2048

/* K-split parts of a one-token HC mixer (hc_mixer) */
#define MIX_PARTS 32

struct dlayer {
    float *raw, *kg, *idx_kg, *rows, *idx_rows;
    uint8_t *rows8, *idx_rows8;   /* compact instead of rows, idx_rows (dsess.compact) */
};

/* qat-q8: a product's x as k_act8 writes it (4-byte stubs in the other modes) */
struct act8_bufs {
    float *xr, *d, *s;
    int8_t *q;
};

/* qat-q8 one-token steps: an x whose producer kernel wrote its codes beside
 * it (act8_codes.cuh), which act8_x then hands to the product instead of
 * launching k_act8. An entry holds from its producer's launch until the
 * producer's next launch (each x below has the one producer). */
enum { PRE8_XN, PRE8_QR, PRE8_EX, PRE8_SH, PRE8_HEAD, PRE8_N };
struct pre8_entry {
    const float *x;   /* NULL: none */
    act8_pre c;
};

/* Chunk products of F16 rows: x's fp16 parts (k_f16_parts), a buffer for
 * each stream such products run on at once (main, kv, compressor,
 * indexer); f16x_for finds a stream's. */
#define F16X_STREAMS 4
struct f16x_bufs {
    cudaStream_t st[F16X_STREAMS];
    f16x x[F16X_STREAMS];
};

/* Those of the session whose forward is being enqueued (forward, product;
 * NULL once it is freed). */
static f16x_bufs *g_f16x = NULL;

struct dsess {
    cudaStream_t st;
    /* beside the main stream: the HC controllers' Sinkhorn, forked after the
     * mixer (hc_fork), joined before the expand (hc_join); the shared expert,
     * forked at the MoE's start (sh_fork), joined before the combine (sh_join).
     * On the kv stream: the attention's kv product and its rows, forked at
     * its start (kv_fork), joined before the state writes (kv_join). On the
     * hc stream: a decode token's HC mixer and Sinkhorn beside
     * k_hc_pre_collapse (hc_controller). On the compressor stream (where the
     * kv stream forks, and in qat-q8 chunks): the compressors' kv and gate,
     * joined before the state writes (cp_join); on the indexer stream (the
     * same): the indexer's weights, then its queries once the main stream has
     * normed qr (qr_ready), joined before the scores (ix_join). */
    cudaStream_t side, kvs, hcs, cps, ixs;
    cudaEvent_t hc_fork, hc_join, sh_fork, sh_join, kv_fork, kv_join, cp_join, qr_ready, ix_join;
    dlayer *L;
    /* compressed rows stored compact (kv_compact.cuh): the qat modes, unless
     * DS4_CUDA_NO_COMPACT_KV=1; kv8 an attention row, kv4 an indexer row */
    bool compact;
    kv_compact kv8, kv4;
    /* a chunk's view of one layer's compact rows as float (decoded once a
     * layer: the chunk kernels read each row many times, and a decode in
     * their tile loads cost them 5-10% of a chunk) */
    float *rows_f, *idx_rows_f;
    /* a chunk's bf16 key views (attention_bf16.cuh), rebuilt each layer:
     * the raw ring's slots, and the compressed rows (a compact session's in
     * rows_f's memory, which its chunks then leave undecoded) */
    uint16_t *view_raw, *view_rows;
    bool view_rows_own;
    int view_split;   /* a view row's dims in three parts (tcb_view_elems) */
    float *rope_main, *rope_comp;
    int64_t cap_n, cap_logits;   /* tokens the chunk buffers hold; logits rows */
    float *X, *Xn, *u, *mix, *post, *comb, *x, *xn, *qr, *q, *kv, *kg, *ikg, *iq, *iw, *o, *low, *y,
        *router, *sel_w, *ex_g, *ex_u, *ex_y, *sh_g, *sh_u, *sh_y, *iscores, *attn_part, *logits;
    act8_bufs a8, a8_side, a8_kv;   /* the main stream's products', the side and kv streams' */
    f16x_bufs f16;
    /* codes written by producers (pre8): xn's Q8_0 and Q8_K forms (also the
     * output head's x), qr's, the routed and the shared SwiGLU's */
    act8_bufs xn8[2], qr8, ex8, sh8;
    pre8_entry pre8[PRE8_N];
    int32_t *sel, *ids;
    int *offs, *active, *pair_tok, *slot_pair, *isel, *n_isel;
    /* what a step reads from the host and writes back, pinned so that a
     * captured graph can copy it */
    int64_t *dpos, *hpos;   /* the chunk's first position */
    int32_t *hids;
    float *hlogits;
    cudaGraphExec_t decode_graph;   /* one-token step with logits; NULL until captured */
    /* decode_greedy: a step that takes its id and position from the step
     * before it on the device and leaves its choice there (greedy.cuh);
     * choices [GREEDY_PIECE] then the step count, their pinned copy */
    cudaGraphExec_t greedy_graph;
    int32_t *choices, *hchoices;
    int32_t greedy_except;   /* the `except` greedy_graph was captured for */
    /* decode_sampled: the same chain with k_sample_next's draw as the
     * choice (sample.cuh); allocated at its first use: the sampler, the
     * states after each draw, their pinned copies */
    cudaGraphExec_t sampled_graph;
    dsampler *sampler, *hsampler;
    unsigned long long *rngs, *hrngs;
};

static void drop_graph(dsess *g) {
    if (g->decode_graph) cudaGraphExecDestroy(g->decode_graph);
    if (g->greedy_graph) cudaGraphExecDestroy(g->greedy_graph);
    if (g->sampled_graph) cudaGraphExecDestroy(g->sampled_graph);
    g->decode_graph = g->greedy_graph = g->sampled_graph = NULL;
}

/* The most compressed attention rows a layer holds (0: no compressing layer). */
static int64_t max_comp_rows(const ds4_session *s) {
    int64_t c = 0;
    for (int l = 0; l < s->model->cfg.n_layer; l++) c = std::max(c, s->layers[l].ratio ? s->layers[l].cap_rows : 0);
    return c;
}

static int64_t max_cap_rows(const ds4_session *s) {
    int64_t c = 1;
    for (int l = 0; l < s->model->cfg.n_layer; l++)
        if (s->layers[l].indexer) c = std::max(c, s->layers[l].cap_rows);
    return c;
}

/* Tokens of a chunk whose indexer scores (a float per compressed row) are
 * held at once: the whole chunk up to 256 MiB of scores (a 2048-token chunk
 * at 16K context takes 32 MiB; at 1M context slices of 256 tokens). */
static int idx_slice_tokens(int64_t cap_rows, int64_t n) {
    int64_t fit = ((int64_t)64 << 20) / std::max<int64_t>(1, cap_rows);
    return (int)std::max<int64_t>(1, std::min(n, fit));
}

static void free_chunk(dsess *g) {
    void *bufs[] = {g->X, g->Xn, g->u, g->mix, g->post, g->comb, g->x, g->xn, g->qr, g->q,
                    g->kv, g->kg, g->ikg, g->iq, g->iw, g->o, g->low, g->y, g->router, g->sel_w,
                    g->ex_g, g->ex_u, g->ex_y, g->sh_g, g->sh_u, g->sh_y, g->iscores, g->attn_part, g->sel,
                    g->ids, g->offs, g->active, g->pair_tok, g->slot_pair, g->isel, g->n_isel, g->a8.xr,
                    g->a8.q, g->a8.d, g->a8.s, g->a8_side.xr, g->a8_side.q, g->a8_side.d, g->a8_side.s,
                    g->a8_kv.xr, g->a8_kv.q, g->a8_kv.d, g->a8_kv.s};
    for (void *b : bufs) cudaFree(b);
    for (f16x &b : g->f16.x) cudaFree(b.p), cudaFree(b.inv);
    memset(&g->f16, 0, sizeof g->f16);
    for (act8_bufs *b : {&g->xn8[0], &g->xn8[1], &g->qr8, &g->ex8, &g->sh8}) {
        cudaFree(b->q), cudaFree(b->d), cudaFree(b->s);
        *b = act8_bufs{};
    }
    memset(g->pre8, 0, sizeof g->pre8);
    cudaFreeHost(g->hids);
    g->hids = NULL;
    drop_graph(g);
    float *keep_logits = g->logits;
    int64_t keep = g->cap_logits;
    g->X = g->Xn = g->u = g->mix = g->post = g->comb = g->x = g->xn = g->qr = g->q = g->kv = NULL;
    g->kg = g->ikg = g->iq = g->iw = g->o = g->low = g->y = g->router = g->sel_w = NULL;
    g->ex_g = g->ex_u = g->ex_y = g->sh_g = g->sh_u = g->sh_y = g->iscores = g->attn_part = NULL;
    g->a8 = g->a8_side = g->a8_kv = act8_bufs{};
    g->sel = g->ids = NULL;
    g->offs = g->active = g->pair_tok = g->slot_pair = g->isel = g->n_isel = NULL;
    g->logits = keep_logits;
    g->cap_logits = keep;
    g->cap_n = 0;
}

/* Chunk buffers for n tokens (grown to the next power of two). */
static int ensure_chunk(ds4_session *s, dsess *g, int64_t n, char *err, size_t errlen) {
    if (n <= g->cap_n) return 0;
    free_chunk(g);
    int64_t c = 1;
    while (c < n) c *= 2;
    const ds4_config *cf = &s->model->cfg;
    int64_t D = cf->n_embd, hc = cf->n_hc, d = cf->head_dim, k = cf->n_expert_used;
    int64_t F = cf->expert_ff, Fs = F * cf->n_shared_experts, dI = cf->indexer_dim;
    int64_t E = cf->n_expert;
    /* qat-q8: the most x a quantized product takes (k_act8's forms), else
     * nothing: rows of D (plain, and the routed gate / up's token rows), the
     * routed down's pairs of F, q_b's QL, an output group's H d / G (a token's
     * G groups at once: H d), the output projection's G r_o, the shared down's Fs */
    int64_t a8 = 0, a8_side = 0, a8_kv = 0;
    if (s->numerics == DS4_NUMERICS_QAT_Q8) {
        a8 = std::max({c * D, c * k * F, c * cf->q_lora_rank, c * cf->n_head * d / cf->o_groups,
                       (int64_t)cf->n_head * d, c * cf->o_groups * cf->o_lora_rank, c * Fs});
        /* qat-q8 forks one-token steps only: the shared expert's x, the kv stream's xn */
        a8_side = std::max(D, Fs);
        a8_kv = D;
    }
    /* F16 chunk products' x parts: the widest x of one (rows of D: the
     * compressors', the indexer's weights, the router; q_b's QL) */
    int64_t f16w = c > 1 ? c * std::max<int64_t>(D, cf->q_lora_rank) : 0;
    /* the producers' codes (one-token steps, qat-q8) */
    int64_t p8_xn = a8 ? D : 0, p8_qr = a8 ? cf->q_lora_rank : 0, p8_ex = a8 ? k * F : 0, p8_sh = a8 ? Fs : 0;
    struct {
        void **p;
        int64_t bytes;
    } a[] = {
        {(void **)&g->X, c * hc * D * 4}, {(void **)&g->Xn, c * hc * D * 4},
        {(void **)&g->u, c * hc * D * 4},
        {(void **)&g->mix, std::max<int64_t>(c, MIX_PARTS) * (2 + hc) * hc * 4},
        {(void **)&g->post, c * hc * 4}, {(void **)&g->comb, c * hc * hc * 4},
        {(void **)&g->x, c * D * 4}, {(void **)&g->xn, c * D * 4},
        {(void **)&g->qr, c * cf->q_lora_rank * 4}, {(void **)&g->q, c * cf->n_head * d * 4},
        {(void **)&g->kv, c * d * 4}, {(void **)&g->kg, c * 4 * d * 4},
        {(void **)&g->ikg, c * 4 * dI * 4}, {(void **)&g->iq, c * cf->indexer_heads * dI * 4},
        {(void **)&g->iw, c * cf->indexer_heads * 4}, {(void **)&g->o, c * cf->n_head * d * 4},
        {(void **)&g->low, c * cf->o_groups * cf->o_lora_rank * 4}, {(void **)&g->y, c * D * 4},
        {(void **)&g->router, c * E * 4}, {(void **)&g->sel_w, c * k * 4},
        {(void **)&g->ex_g, std::max(c * k * F, c * Fs) * 4},
        {(void **)&g->ex_u, std::max(c * k * F, c * Fs) * 4}, {(void **)&g->ex_y, c * k * D * 4},
        {(void **)&g->sh_g, c * Fs * 4}, {(void **)&g->sh_u, c * Fs * 4}, {(void **)&g->sh_y, c * D * 4},
        {(void **)&g->iscores, idx_slice_tokens(max_cap_rows(s), c) * max_cap_rows(s) * 4},
        {(void **)&g->attn_part, attn_part_floats(c, cf->n_head, (int)d) * 4},
        {(void **)&g->sel, c * k * 4}, {(void **)&g->ids, c * 4}, {(void **)&g->offs, (E + 1) * 4},
        {(void **)&g->active, E * 4}, {(void **)&g->pair_tok, c * k * 4},
        {(void **)&g->slot_pair, c * k * 4},
        {(void **)&g->isel, c * std::max(1, cf->indexer_top_k) * 4}, {(void **)&g->n_isel, c * 4},
        {(void **)&g->a8.xr, a8 * 4}, {(void **)&g->a8.q, a8}, {(void **)&g->a8.d, a8 / 32 * 4},
        {(void **)&g->a8.s, a8 / 16 * 4}, {(void **)&g->a8_side.xr, a8_side * 4},
        {(void **)&g->a8_side.q, a8_side}, {(void **)&g->a8_side.d, a8_side / 32 * 4},
        {(void **)&g->a8_side.s, a8_side / 16 * 4}, {(void **)&g->a8_kv.xr, a8_kv * 4},
        {(void **)&g->a8_kv.q, a8_kv}, {(void **)&g->a8_kv.d, a8_kv / 32 * 4}, {(void **)&g->a8_kv.s, a8_kv / 16 * 4},
        {(void **)&g->xn8[0].q, p8_xn}, {(void **)&g->xn8[0].d, p8_xn / 32 * 4}, {(void **)&g->xn8[0].s, p8_xn / 16 * 4},
        {(void **)&g->xn8[1].q, p8_xn}, {(void **)&g->xn8[1].d, p8_xn / 32 * 4}, {(void **)&g->xn8[1].s, p8_xn / 16 * 4},
        {(void **)&g->qr8.q, p8_qr}, {(void **)&g->qr8.d, p8_qr / 32 * 4}, {(void **)&g->qr8.s, p8_qr / 16 * 4},
        {(void **)&g->ex8.q, p8_ex}, {(void **)&g->ex8.d, p8_ex / 32 * 4}, {(void **)&g->ex8.s, p8_ex / 16 * 4},
        {(void **)&g->sh8.q, p8_sh}, {(void **)&g->sh8.d, p8_sh / 32 * 4}, {(void **)&g->sh8.s, p8_sh / 16 * 4},
        {(void **)&g->f16.x[0].p, f16w * 6}, {(void **)&g->f16.x[0].inv, c * 4},
        {(void **)&g->f16.x[1].p, f16w * 6}, {(void **)&g->f16.x[1].inv, c * 4},
        {(void **)&g->f16.x[2].p, f16w * 6}, {(void **)&g->f16.x[2].inv, c * 4},
        {(void **)&g->f16.x[3].p, f16w * 6}, {(void **)&g->f16.x[3].inv, c * 4},
    };
    for (auto &b : a) {
        cudaError_t e = cudaMalloc(b.p, (size_t)std::max<int64_t>(b.bytes, 4));
        if (e != cudaSuccess) {
            free_chunk(g);
            snprintf(err, errlen, "out of GPU memory for a chunk of %lld tokens: %s", (long long)n,
                     cudaGetErrorString(e));
            return -1;
        }
    }
    cudaError_t e = cudaHostAlloc(&g->hids, (size_t)c * 4, cudaHostAllocDefault);
    if (e != cudaSuccess) {
        free_chunk(g);
        return cuda_fail(e, "pinned ids", err, errlen);
    }
    const cudaStream_t f16_streams[F16X_STREAMS] = {g->st, g->kvs, g->cps, g->ixs};
    for (int i = 0; i < F16X_STREAMS; i++) {
        g->f16.st[i] = f16_streams[i];
        g->f16.x[i].cap = f16w, g->f16.x[i].rows = c;
    }
    g->cap_n = c;
    return 0;
}

static int ensure_logits(const ds4_config *cf, dsess *g, int64_t rows, char *err, size_t errlen) {
    if (rows <= g->cap_logits) return 0;
    drop_graph(g);
    cudaFree(g->logits);
    cudaFreeHost(g->hlogits);
    g->logits = g->hlogits = NULL;
    g->cap_logits = 0;
    CK(cudaMalloc(&g->logits, (size_t)rows * cf->n_vocab * 4), "allocating logits");
    CK(cudaHostAlloc(&g->hlogits, (size_t)rows * cf->n_vocab * 4, cudaHostAllocDefault),
       "allocating logits");
    g->cap_logits = rows;
    return 0;
}

static void session_free(ds4_session *s) {
    dsess *g = (dsess *)s->backend_state;
    if (!g) return;
    if (g_f16x == &g->f16) g_f16x = NULL;
    free_chunk(g);
    cudaFree(g->logits);
    cudaFreeHost(g->hlogits);
    cudaFree(g->dpos);
    cudaFreeHost(g->hpos);
    cudaFree(g->choices);
    cudaFreeHost(g->hchoices);
    cudaFree(g->sampler);
    cudaFreeHost(g->hsampler);
    cudaFree(g->rngs);
    cudaFreeHost(g->hrngs);
    if (g->L)
        for (int l = 0; l < s->model->cfg.n_layer; l++) {
            cudaFree(g->L[l].raw);
            cudaFree(g->L[l].kg);
            cudaFree(g->L[l].idx_kg);
            cudaFree(g->L[l].rows);
            cudaFree(g->L[l].idx_rows);
            cudaFree(g->L[l].rows8);
            cudaFree(g->L[l].idx_rows8);
        }
    free(g->L);
    cudaFree(g->rows_f);
    cudaFree(g->idx_rows_f);
    cudaFree(g->view_raw);
    if (g->view_rows_own) cudaFree(g->view_rows);
    cudaFree(g->rope_main);
    cudaFree(g->rope_comp);
    for (cudaEvent_t e : {g->hc_fork, g->hc_join, g->sh_fork, g->sh_join, g->kv_fork, g->kv_join, g->cp_join,
                          g->qr_ready, g->ix_join})
        if (e) cudaEventDestroy(e);
    if (g->side) cudaStreamDestroy(g->side);
    if (g->kvs) cudaStreamDestroy(g->kvs);
    if (g->hcs) cudaStreamDestroy(g->hcs);
    if (g->cps) cudaStreamDestroy(g->cps);
    if (g->ixs) cudaStreamDestroy(g->ixs);
    if (g->st) cudaStreamDestroy(g->st);
    free(g);
    s->backend_state = NULL;
}

/* `bytes` of zeroed KV state. */
static int dalloc_bytes(void **p, int64_t bytes, char *err, size_t errlen) {
    *p = NULL;
    if (bytes <= 0) return 0;
    cudaError_t e = cudaMalloc(p, (size_t)bytes);
    if (e == cudaSuccess) e = cudaMemset(*p, 0, (size_t)bytes);
    if (e != cudaSuccess) {
        snprintf(err, errlen, "out of GPU memory for the KV state (%.2f GiB more): %s", gib((double)bytes),
                 cudaGetErrorString(e));
        return -1;
    }
    return 0;
}

static int dalloc(float **p, int64_t count, char *err, size_t errlen) {
    return dalloc_bytes((void **)p, count * (int64_t)sizeof(float), err, errlen);
}

/* The device rings are deeper than the host's: a chunk writes all its
 * positions before its attention reads the window, so a ring must hold a
 * whole chunk past the oldest entry any of its tokens reads. The host rings
 * (session.c, sized for the CPU's chunks and the rewind budget) are what
 * snapshots read and write; copy_state moves the entries they hold. */
static int64_t dev_cap_raw(const ds4_session *s) {
    return s->model->cfg.sliding_window + std::max<int64_t>(s->rewind_budget, CUDA_PREFILL_CHUNK);
}

static int64_t dev_cap_kg(const ds4_session *s, const ds4_layer_state *ls) {
    return 2 * ls->ratio + std::max<int64_t>(s->rewind_budget, CUDA_PREFILL_CHUNK);
}

/* KV state array sizes: floats (rings at the device depth; float rows),
 * bytes (compact rows). */
struct state_sizes {
    int64_t raw, kg, idx_kg, rows, idx_rows, rows8, idx_rows8;
};

static state_sizes sizes_of(const ds4_session *s, const dsess *g, int l) {
    const ds4_config *cf = &s->model->cfg;
    const ds4_layer_state *ls = &s->layers[l];
    state_sizes z = {dev_cap_raw(s) * cf->head_dim, 0, 0, 0, 0, 0, 0};
    if (!ls->ratio) return z;
    z.kg = dev_cap_kg(s, ls) * 2 * ls->coff * cf->head_dim;
    if (g->compact) z.rows8 = ls->cap_rows * g->kv8.bytes;
    else z.rows = ls->cap_rows * cf->head_dim;
    if (ls->indexer) {
        z.idx_kg = dev_cap_kg(s, ls) * 2 * 2 * cf->indexer_dim;
        if (g->compact) z.idx_rows8 = ls->cap_rows * g->kv4.bytes;
        else z.idx_rows = ls->cap_rows * cf->indexer_dim;
    }
    return z;
}

static int session_init(ds4_session *s, char *err, size_t errlen) {
    const ds4_config *cf = &s->model->cfg;
    dsess *g = (dsess *)calloc(1, sizeof *g);
    if (!g) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    s->backend_state = g;
    g->L = (dlayer *)calloc((size_t)cf->n_layer, sizeof *g->L);
    if (!g->L) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    CK(cudaStreamCreateWithFlags(&g->st, cudaStreamNonBlocking), "stream");
    CK(cudaStreamCreateWithFlags(&g->side, cudaStreamNonBlocking), "stream");
    CK(cudaStreamCreateWithFlags(&g->kvs, cudaStreamNonBlocking), "stream");
    CK(cudaStreamCreateWithFlags(&g->hcs, cudaStreamNonBlocking), "stream");
    CK(cudaStreamCreateWithFlags(&g->cps, cudaStreamNonBlocking), "stream");
    CK(cudaStreamCreateWithFlags(&g->ixs, cudaStreamNonBlocking), "stream");
    for (cudaEvent_t *e : {&g->hc_fork, &g->hc_join, &g->sh_fork, &g->sh_join, &g->kv_fork, &g->kv_join, &g->cp_join,
                           &g->qr_ready, &g->ix_join})
        CK(cudaEventCreateWithFlags(e, cudaEventDisableTiming), "event");
    CK(cudaMalloc(&g->dpos, 8), "position");
    CK(cudaHostAlloc(&g->hpos, 8, cudaHostAllocDefault), "position");
    CK(cudaMalloc(&g->choices, (GREEDY_PIECE + 1) * sizeof(int32_t)), "greedy choices");
    CK(cudaHostAlloc(&g->hchoices, (GREEDY_PIECE + 1) * sizeof(int32_t), cudaHostAllocDefault), "greedy choices");
    g->compact = s->numerics != DS4_NUMERICS_EXACT && kv8_fits(cf->head_dim, cf->rope_dim) &&
                 kv4_fits(cf->indexer_dim) && !getenv("DS4_CUDA_NO_COMPACT_KV");
    g->kv8 = kv8_layout(cf->head_dim, cf->rope_dim);
    g->kv4 = kv4_layout(cf->indexer_dim);
    const int64_t comp_rows = max_comp_rows(s);
    if (g->compact) {
        if (dalloc(&g->rows_f, comp_rows * cf->head_dim, err, errlen) ||
            dalloc(&g->idx_rows_f, max_cap_rows(s) * cf->indexer_dim, err, errlen))
            return -1;
    }
    /* the qat modes' RoPE dims in parts, exact mode's every dim (and the qat
     * modes' where DS4_CUDA_NO_KEYTF32=1 at the session's start: a test's
     * check that the other dims' one part holds them exactly) */
    g->view_split = s->numerics != DS4_NUMERICS_EXACT && !getenv("DS4_CUDA_NO_KEYTF32") ? cf->rope_dim
                                                                                        : cf->head_dim;
    if (tcb_can_run(cf->head_dim, g->view_split)) {
        const int64_t row = 2 * tcb_view_elems(cf->head_dim, g->view_split);   /* bytes */
        if (dalloc_bytes((void **)&g->view_raw, dev_cap_raw(s) * row, err, errlen)) return -1;
        if (g->compact && row <= 4 * cf->head_dim) {   /* in the float view's memory, unused beside it */
            g->view_rows = (uint16_t *)g->rows_f;
        } else if (comp_rows) {
            if (dalloc_bytes((void **)&g->view_rows, comp_rows * row, err, errlen)) return -1;
            g->view_rows_own = true;
        }
    }
    for (int l = 0; l < cf->n_layer; l++) {
        state_sizes z = sizes_of(s, g, l);
        dlayer &dl = g->L[l];
        if (dalloc(&dl.raw, z.raw, err, errlen) || dalloc(&dl.kg, z.kg, err, errlen) ||
            dalloc(&dl.idx_kg, z.idx_kg, err, errlen) || dalloc(&dl.rows, z.rows, err, errlen) ||
            dalloc(&dl.idx_rows, z.idx_rows, err, errlen) ||
            dalloc_bytes((void **)&dl.rows8, z.rows8, err, errlen) ||
            dalloc_bytes((void **)&dl.idx_rows8, z.idx_rows8, err, errlen))
            return -1;
    }
    if (dalloc(&g->rope_main, cf->rope_dim / 2, err, errlen) ||
        dalloc(&g->rope_comp, cf->rope_dim / 2, err, errlen))
        return -1;
    CK(cudaMemcpy(g->rope_main, s->rope_main, (size_t)(cf->rope_dim / 2) * 4, cudaMemcpyHostToDevice),
       "rope table");
    CK(cudaMemcpy(g->rope_comp, s->rope_comp, (size_t)(cf->rope_dim / 2) * 4, cudaMemcpyHostToDevice),
       "rope table");
    return 0;
}

/* The entries of positions lo..T-1 between a host ring of cap_h slots and
 * a device ring of cap_d (width floats a slot), in runs contiguous in both. */
static cudaError_t copy_ring(float *h, int64_t cap_h, float *d, int64_t cap_d, int64_t width,
                             int64_t lo, int64_t T, int to_host) {
    for (int64_t p = lo; p < T;) {
        int64_t run = std::min({T - p, cap_h - p % cap_h, cap_d - p % cap_d});
        float *hp = h + p % cap_h * width, *dp = d + p % cap_d * width;
        size_t bytes = (size_t)(run * width) * sizeof(float);
        cudaError_t e = to_host ? cudaMemcpy(hp, dp, bytes, cudaMemcpyDeviceToHost)
                                : cudaMemcpy(dp, hp, bytes, cudaMemcpyHostToDevice);
        if (e != cudaSuccess) return e;
        p += run;
    }
    return cudaSuccess;
}

/* n compressed rows of dim floats between the host and a compact device
 * array, a piece of `cap` rows at a time through a float scratch. */
static cudaError_t copy_compact_rows(cudaStream_t st, float *h, uint8_t *d8, int64_t n, int dim,
                                     const kv_compact &kv, int fp4, float *scratch, int64_t cap, int to_host) {
    for (int64_t r = 0; r < n; r += cap) {
        int64_t k = std::min(cap, n - r);
        size_t bytes = (size_t)(k * dim) * sizeof(float);
        cudaError_t e;
        if (to_host) {
            k_kv_decode<<<(unsigned)k, 128, 0, st>>>(d8 + r * kv.bytes, scratch, dim, kv, fp4);
            e = cudaMemcpyAsync(h + r * dim, scratch, bytes, cudaMemcpyDeviceToHost, st);
        } else {
            e = cudaMemcpyAsync(scratch, h + r * dim, bytes, cudaMemcpyHostToDevice, st);
            if (e == cudaSuccess) k_kv_encode<<<(unsigned)k, 128, 0, st>>>(scratch, d8 + r * kv.bytes, dim, kv, fp4);
        }
        if (e == cudaSuccess) e = cudaStreamSynchronize(st);   /* before the next piece reuses the scratch */
        if (e == cudaSuccess) e = cudaGetLastError();
        if (e != cudaSuccess) return e;
    }
    return cudaSuccess;
}

#define COPY_PIECE_ROWS 8192   /* compact rows converted at a time */

static int copy_state(ds4_session *s, int to_host, char *err, size_t errlen) {
    const ds4_config *cf = &s->model->cfg;
    dsess *g = (dsess *)s->backend_state;
    int64_t T = s->n_tokens;
    float *scratch = NULL;
    if (g->compact)
        CK(cudaMalloc(&scratch, (size_t)COPY_PIECE_ROWS * std::max(cf->head_dim, cf->indexer_dim) * sizeof(float)),
           "state copy scratch");
    int rc = -1;
    for (int l = 0; l < cf->n_layer; l++) {
        ds4_layer_state *ls = &s->layers[l];
        const dlayer &dl = g->L[l];
        CKG(copy_ring(ls->raw, s->cap_raw, dl.raw, dev_cap_raw(s), cf->head_dim,
                      std::max<int64_t>(0, T - s->cap_raw), T, to_host),
            "state copy");
        if (!ls->ratio) continue;
        int64_t kg_lo = std::max<int64_t>(0, T - ls->cap_kg);
        CKG(copy_ring(ls->kg, ls->cap_kg, dl.kg, dev_cap_kg(s, ls), 2 * ls->coff * cf->head_dim, kg_lo,
                      T, to_host),
            "state copy");
        if (ls->indexer)
            CKG(copy_ring(ls->idx_kg, ls->cap_kg, dl.idx_kg, dev_cap_kg(s, ls), 4 * cf->indexer_dim,
                          kg_lo, T, to_host),
                "state copy");
        /* the compressed rows written so far (rows past T / m are written
         * again before anything reads them) */
        int64_t n_rows = T / ls->ratio;
        struct {
            float *h, *d;
            uint8_t *d8;
            int dim;
            const kv_compact &kv;
            int fp4;
        } a[] = {{ls->rows, dl.rows, dl.rows8, cf->head_dim, g->kv8, 0},
                 {ls->indexer ? ls->idx_rows : NULL, dl.idx_rows, dl.idx_rows8, cf->indexer_dim, g->kv4, 1}};
        for (auto &b : a) {
            if (!b.h || !n_rows) continue;
            size_t bytes = (size_t)(n_rows * b.dim) * sizeof(float);
            if (g->compact)
                CKG(copy_compact_rows(g->st, b.h, b.d8, n_rows, b.dim, b.kv, b.fp4, scratch, COPY_PIECE_ROWS,
                                      to_host),
                    "state copy");
            else if (to_host)
                CKG(cudaMemcpy(b.h, b.d, bytes, cudaMemcpyDeviceToHost), "state copy");
            else
                CKG(cudaMemcpy(b.d, b.h, bytes, cudaMemcpyHostToDevice), "state copy");
        }
    }
    /* a pageable cudaMemcpy to the device may return before its last DMA
     * lands, and the forward's streams do not wait on the legacy one */
    CKG(cudaDeviceSynchronize(), "state copy");
    rc = 0;
out:
    cudaFree(scratch);
    return rc;
}

static int state_to_host(ds4_session *s, char *err, size_t errlen) { return copy_state(s, 1, err, errlen); }
static int state_from_host(ds4_session *s, char *err, size_t errlen) { return copy_state(s, 0, err, errlen); }

/* ---- the forward pass ---- */

static unsigned blocks_for(int64_t n, int per) { return (unsigned)((n + per - 1) / per); }

/* k_linear1's early weights are a prefetch of its whole matrix (parts
 * matrices) into L2 before the wait. Not above EARLY_L2_MAX_BYTES: 16 MB
 * (an indexer layer's F16 indexer q_b, its compressor pair) keep HBM busy
 * for ~4 us while the kernels before them still run, and the small ones on
 * the chain (the q heads' rows, the kv path) wait behind it (same call,
 * H200, qat-q8 decode at 2K: 125.9 -> 129.5 tok/s; a cap of 4 MB: 128.4; no
 * early weights at all: 124.6). DS4_CUDA_EARLY_MAX=bytes sets the cap, for
 * A/B. */
#define EARLY_L2_MAX_BYTES (12LL << 20)
static lin_args linear1_early(lin_args a, unsigned parts) {
    static const char *env = getenv("DS4_CUDA_EARLY_MAX");
    static const long long cap = env ? atoll(env) : EARLY_L2_MAX_BYTES;
    if ((int64_t)a.w.n_out * a.w.row_bytes * parts > cap) a.early = 0;
    return a;
}

/* k_linear<TT>, or for one token k_linear1 (grid.y: its batch parts or slots) */
template <int TT>
static void launch_linear(cudaStream_t st, dim3 grid, const lin_args &a0, int kw) {
    const lin_args a = TT == 1 ? linear1_early(a0, grid.y) : a0;
    int chunks = (a.w.n_in + 256 * kw - 1) / (256 * kw);
    switch (a.w.type) {
#define CASE(T)                                                                 \
    case T:                                                                     \
        if (TT == 1 && chunks <= 2) launch_k(k_linear1<T, 2>, grid, LIN_WARPS * WARP, 0, st, a, kw);  \
        else if (TT == 1 && chunks <= 4) launch_k(k_linear1<T, 4>, grid, LIN_WARPS * WARP, 0, st, a, kw); \
        else if (TT == 1) launch_k(k_linear1<T, 8>, grid, LIN_WARPS * WARP, 0, st, a, kw);   \
        else launch_k(k_linear<TT, T>, grid, LIN_WARPS * WARP, 0, st, a, kw);       \
        break;
    CASE(DS4_TYPE_F32) CASE(DS4_TYPE_F16) CASE(DS4_TYPE_BF16) CASE(DS4_TYPE_Q8_0)
    CASE(DS4_TYPE_Q2_K) CASE(DS4_TYPE_Q4_K) CASE(DS4_TYPE_IQ2_XXS)
    CASE(DS4_TYPE_Q8_0 | DEV_NARROW) CASE(DS4_TYPE_Q2_K | DEV_NARROW) CASE(DS4_TYPE_IQ2_XXS | DEV_NARROW)
#undef CASE
    }
}

static void launch_staged(cudaStream_t st, dim3 grid, const lin_args &a, int kw) {
    size_t shm = (size_t)lin_staged_bytes(a.w, kw);
    switch (a.w.type) {
#define CASE(T)                                                                  \
    case T: launch_k(k_linear1s<T, 2>, grid, LIN_WARPS * WARP, shm, st, a, kw); break;
    CASE(DS4_TYPE_F32) CASE(DS4_TYPE_F16) CASE(DS4_TYPE_BF16) CASE(DS4_TYPE_Q8_0)
    CASE(DS4_TYPE_Q2_K) CASE(DS4_TYPE_Q4_K) CASE(DS4_TYPE_IQ2_XXS)
    CASE(DS4_TYPE_Q8_0 | DEV_NARROW) CASE(DS4_TYPE_Q2_K | DEV_NARROW) CASE(DS4_TYPE_IQ2_XXS | DEV_NARROW)
#undef CASE
    }
}

/* k_expert_mma1 over `mats` same-shape expert matrices on the same x (1, or
 * 2: the second at the batch strides a.bw, a.by, blockIdx.z): as many
 * blocks as fit on the GPU at once (measured once per type and width), at
 * most one per 16-row tile of each (slot, matrix). */
template <int TYPE, bool CODES, bool IINT = false>
static void launch_expert_mma1_t(cudaStream_t st, const lin_args &a, int slots, int mats) {
    static int fill[EXPERT_MMA1_MAX_WARPS + 1];
    int kwi = a.w.n_in / 256, threads = kwi * WARP;
    size_t shm = CODES ? 0 : expert_mma1_smem(a.w.n_in);
    if (!fill[kwi]) fill[kwi] = gpu_fill(k_expert_mma1<TYPE, CODES, IINT>, threads, shm);
    unsigned need = blocks_for(a.w.n_out, 16), cap = blocks_for(fill[kwi], slots * mats);
    launch_k(k_expert_mma1<TYPE, CODES, IINT>, dim3(need < cap ? need : cap, slots, mats), threads, shm, st, a);
}

/* (a.q8 set: x as qat-q8's codes, act8_x). IQ2_XXS with codes sums each 256
 * block as integers (the CPU's order; DS4_CUDA_NO_IQ2INT=1: a float step a
 * slice, for A/B). With codes, on dp4a where k_expert_dp4a takes the rows
 * (the same bits; DS4_CUDA_NO_DP4A=1: the tensor-core kernel, for A/B). */
static void launch_expert_mma1(cudaStream_t st, const lin_args &a, int slots, int mats) {
    bool iq2 = a.w.type == DS4_TYPE_IQ2_XXS;
    static const bool slice_floats = getenv("DS4_CUDA_NO_IQ2INT") != NULL;
    static const bool no_dp4a = getenv("DS4_CUDA_NO_DP4A") != NULL;
    if (a.q8) {
        if (!no_dp4a && expert_dp4a_fits(a.w) && !(iq2 && slice_floats)) launch_expert_dp4a(st, a, slots, mats);
        else if (iq2 && !slice_floats) launch_expert_mma1_t<DS4_TYPE_IQ2_XXS, true, true>(st, a, slots, mats);
        else if (iq2) launch_expert_mma1_t<DS4_TYPE_IQ2_XXS, true>(st, a, slots, mats);
        else launch_expert_mma1_t<DS4_TYPE_Q2_K, true>(st, a, slots, mats);
    } else {
        if (iq2) launch_expert_mma1_t<DS4_TYPE_IQ2_XXS, false>(st, a, slots, mats);
        else launch_expert_mma1_t<DS4_TYPE_Q2_K, false>(st, a, slots, mats);
    }
}

/* A chunk product of float rows on k_linear_mma, in 64-row tiles where the
 * 128-row grid would fill under half the GPU's two blocks an SM (the
 * router's 256 rows x 32 token tiles: 64 blocks on 132 SMs); the same bits
 * (DS4_CUDA_NO_MMA64=1, read at each launch, keeps 128: A/B, the tests). */
static bool launch_mma_float(cudaStream_t st, dim3 grid, const lin_args &a) {
    if (a.w.type != DS4_TYPE_F16 && a.w.type != DS4_TYPE_BF16) return false;
    static const int fill = gpu_fill(k_linear_mma<DS4_TYPE_F16>, MM_THREADS, 0);
    if (getenv("DS4_CUDA_NO_MMA64") || 2 * (int64_t)grid.x * grid.y * grid.z > fill) return false;
    dim3 g64((unsigned)blocks_for(a.w.n_out, 64), grid.y, grid.z);
    if (a.w.type == DS4_TYPE_F16) launch_k(k_linear_mma<DS4_TYPE_F16, 64>, g64, MM_THREADS, 0, st, a);
    else launch_k(k_linear_mma<DS4_TYPE_BF16, 64>, g64, MM_THREADS, 0, st, a);
    return true;
}

static void launch_mma(cudaStream_t st, dim3 grid, const lin_args &a) {
    if (launch_mma_float(st, grid, a)) return;
    switch (a.w.type) {
#define CASE(T)                                                                  \
    case T: launch_k(k_linear_mma<T>, grid, MM_THREADS, 0, st, a); break;
    CASE(DS4_TYPE_F16) CASE(DS4_TYPE_BF16) CASE(DS4_TYPE_Q8_0)
    CASE(DS4_TYPE_Q2_K) CASE(DS4_TYPE_Q4_K) CASE(DS4_TYPE_IQ2_XXS)
    CASE(DS4_TYPE_Q8_0 | DEV_NARROW) CASE(DS4_TYPE_Q2_K | DEV_NARROW) CASE(DS4_TYPE_IQ2_XXS | DEV_NARROW)
#undef CASE
    }
}

/* k_q8_mma1 on a one-token Q8_0 product of `parts` batch parts: a grid of
 * as many blocks as fit on the GPU at once (measured once per width), at
 * most one per 16-row tile. CODES: x as qat-q8's codes (a.q8), no x parts
 * in shared memory. */
template <int SL, bool CODES>
static void launch_q8_mma1_sl(cudaStream_t st, const lin_args &a, int parts) {
    static int fill[9];
    int kwi = a.w.n_in / 1024, threads = a.w.n_in / 32 / SL * WARP;
    size_t shm = CODES ? 0 : q8_mma1_smem(a.w.n_in);
    if (!fill[kwi]) fill[kwi] = gpu_fill(k_q8_mma1<SL, CODES>, threads, shm);
    unsigned need = blocks_for(a.w.n_out, 16), cap = blocks_for(fill[kwi], parts);
    launch_k(k_q8_mma1<SL, CODES>, dim3(need < cap ? need : cap, parts), threads, shm, st, a);
}

static void launch_q8_mma1(cudaStream_t st, const lin_args &a, int parts) {
    bool sl4 = q8_mma1_slices(a.w.n_in, parts) == 4;
    if (a.q8) {
        if (sl4) launch_q8_mma1_sl<4, true>(st, a, parts);
        else launch_q8_mma1_sl<8, true>(st, a, parts);
    } else {
        if (sl4) launch_q8_mma1_sl<4, false>(st, a, parts);
        else launch_q8_mma1_sl<8, false>(st, a, parts);
    }
}

/* qat-q8: the session whose forward is being enqueued (forward), NULL in
 * the other modes; its a8_* buffers take each quantized product's x. */
static dsess *g_act8 = NULL;

static const f16x *f16x_for(cudaStream_t st) {
    for (int i = 0; g_f16x && i < F16X_STREAMS; i++)
        if (g_f16x->st[i] == st) return &g_f16x->x[i];
    return NULL;
}

/* The x-part buffer of a chunk product k_linear_f16s takes on stream st,
 * else NULL (DS4_CUDA_NO_F16S=1, read at each launch: k_linear_mma, for
 * A/B and the tests). */
static const f16x *f16s_buffer(cudaStream_t st, const lin_args &a, int n) {
    if (n <= 1 || !f16s_fits(a)) return NULL;   /* one-token steps (graphs) never look */
    const f16x *xp = f16x_for(st);
    bool on = f16s_holds(xp, a, n) && !getenv("DS4_CUDA_NO_MMA") && !getenv("DS4_CUDA_NO_F16S");
    return on ? xp : NULL;
}

/* Whether a product on t takes x as it is (no k_act8 forms, which are one
 * buffer a stream): every product outside qat-q8, float weights in it. */
static bool plain_x(const ds4_tensor &t) {
    return !g_act8 || !act8_rounds(dmat_of(t).type);
}

/* qat-q8, a quantized product: its x (rows of a.n_in, `parts` batch parts
 * at a.bx when a.bx != 0) through k_act8, and `a` pointed at the result: the
 * int8 forms for k_linear_q8x / k_linear_q8s (codes), or the rounded floats
 * in place of x. Nothing in the other modes and for float weights. */
static void act8_x(cudaStream_t st, lin_args &a, int rows, int parts, bool codes) {
    dsess *g = g_act8;
    if (!g || !act8_rounds(a.w.type)) return;
    if (!a.bx) parts = 1;
    if (codes && !a.bx && (rows == 1 || a.xs == a.w.n_in)) {   /* codes a producer wrote (pre8) */
        bool q8k = base_type(a.w.type) != DS4_TYPE_Q8_0;
        for (const pre8_entry &e : g->pre8) {
            const act8_out &o = q8k ? e.c.qk : e.c.q0;
            if (e.x == a.x && o.q) {
                a.q8 = o.q, a.q8d = o.d, a.q8s = o.s16;
                return;
            }
        }
    }
    /* products on the side and kv streams run beside the main stream's: their own x forms */
    const act8_bufs &b = g->side && st == g->side ? g->a8_side : g->kvs && st == g->kvs ? g->a8_kv : g->a8;
    act8_out o = {codes ? NULL : b.xr, codes ? b.q : NULL, b.d, b.s};
    launch_k(k_act8, dim3(rows, parts, blocks_for(a.w.n_in, 2048)), 256, 0, st, a.x, a.xs, a.bx, a.w.n_in,
             base_type(a.w.type) != DS4_TYPE_Q8_0, o);
    if (codes) {
        a.q8 = b.q, a.q8d = b.d, a.q8s = b.s;
    } else {
        a.x = b.xr, a.xs = a.w.n_in;
        if (a.bx) a.bx = (int64_t)rows * a.w.n_in;
    }
}

/* A producer of x about to be enqueued: in a qat-q8 one-token step (and x's
 * length n a multiple of 256), the codes it is to write beside x (forms q0:
 * Q8_0, qk: Q8_K; either may be NULL), recorded as pre8 entry `slot`;
 * else none, and the entry cleared. DS4_CUDA_NO_PRE8=1: never (k_act8
 * launches as before). */
static act8_pre pre8_set(dsess *g, int slot, const float *x, int ntok, int64_t n, const act8_bufs *q0,
                         const act8_bufs *qk) {
    static const bool off = getenv("DS4_CUDA_NO_PRE8") != NULL;
    act8_pre c = {};
    g->pre8[slot] = pre8_entry{};
    if (off || g_act8 != g || ntok != 1 || n % 256) return c;
    for (pre8_entry &e : g->pre8)   /* an x has one entry */
        if (e.x == x) e = pre8_entry{};
    if (q0) c.q0 = act8_out{NULL, q0->q, q0->d, q0->s};
    if (qk) c.qk = act8_out{NULL, qk->q, qk->d, qk->s};
    g->pre8[slot] = pre8_entry{x, c};
    return c;
}

/* One-token plain products (no expert ids to wait for) load their weights
 * before the PDL wait (k_q8_mma1: the first tile into registers; k_linear1:
 * into L2). DS4_CUDA_NO_EARLYW=1: after it. */
static int early_weights(int n, bool plain) {
    static const bool off = getenv("DS4_CUDA_NO_EARLYW") != NULL;
    return n == 1 && plain && !off;
}

/* Whether a one-token product's int8 kernel (k_q8_mma1, k_expert_mma1:
 * `int8_kernel`) takes qat-q8's x as codes: multiplied as the CPU engine
 * multiplies them (int32 code sums times both scales), without splitting
 * the rounded floats into parts in every block (DS4_CUDA_NO_CODES1=1: the
 * rounded floats, split). */
static bool one_token_codes(bool int8_kernel) {
    static const bool off = getenv("DS4_CUDA_NO_CODES1") != NULL;
    return int8_kernel && !off;
}

static void launch_q8x(cudaStream_t st, dim3 grid, const lin_args &a) {
    if (a.w.type == DS4_TYPE_Q8_0) launch_k(k_linear_q8x<DS4_TYPE_Q8_0>, grid, Q8X_THREADS, 0, st, a);
    else if (a.w.type == DS4_TYPE_IQ2_XXS) launch_k(k_linear_q8x<DS4_TYPE_IQ2_XXS>, grid, Q8X_THREADS, 0, st, a);
    else launch_k(k_linear_q8x<DS4_TYPE_Q2_K>, grid, Q8X_THREADS, 0, st, a);
}

/* Decode: Q8_0 and the routed experts' IQ2_XXS / Q2_K rows of n_in a
 * multiple of 1024 on the int8 tensor cores (int8_decode.cuh); other routed
 * rows staged in shared memory (up to the 48 KB a launch gets without
 * opting in); the rest one token per row pass. Chunks: in qat-q8, int8
 * tiles (act8.cuh, act8_staged.cuh); F16 matrices of at most 32 rows (the
 * HC mixers) split over tokens only (mma_few_rows.cuh), other F16 ones on
 * fp16 tensor cores (mma_f16.cuh); other tensor-core
 * tiles (mma_linear.cuh), or 8 tokens a pass where a matrix's n_in does not
 * fit them. */
static void run_linear(cudaStream_t st, const lin_args &a0, int n, int slots) {
    lin_args a = a0;
    int x_rows = a.xrow ? n : a.n_tok;
    if (n > 1 && g_act8 && q8x_fits(a.w) && !getenv("DS4_CUDA_NO_Q8X")) {
        /* qat-q8 chunks: one int8 product a tile */
        act8_x(st, a, x_rows, 1, true);
        dim3 grid(blocks_for(a.w.n_out, Q8X_BM), mma_token_tiles(n, a.n_tok, slots, a.active != NULL), slots);
        if (q8s_fits(a.w) && !getenv("DS4_CUDA_NO_Q8S")) launch_q8s(st, grid, a);
        else if (k2s_fits(a.w) && !getenv(a.w.type == DS4_TYPE_Q2_K ? "DS4_CUDA_NO_Q2KS" : "DS4_CUDA_NO_IQ2S"))
            launch_k2s(st, grid, a);
        else launch_q8x(st, grid, a);
        return;
    }
    a.early = early_weights(n, !a.active);
    bool expert1 = n == 1 && a.active && expert_mma1_fits(a.w) && !getenv("DS4_CUDA_NO_EXPERT_MMA");
    bool q8one = n == 1 && q8_mma1_fits(a) && !getenv("DS4_CUDA_NO_Q8");
    act8_x(st, a, x_rows, slots, one_token_codes(expert1 || q8one));
    int kw = lin_split(a.w.n_in);
    if (expert1)
        launch_expert_mma1(st, a, slots, 1);
    else if (n == 1 && a.active && a.w.n_in <= 2 * 256 * kw && lin_staged_bytes(a.w, kw) <= 48 * 1024 &&
        !getenv("DS4_CUDA_NO_STAGE"))
        launch_staged(st, dim3(blocks_for(a.w.n_out, LIN_WARPS / kw * LIN_RS), slots), a, kw);
    else if (q8one)
        launch_q8_mma1(st, a, slots);
    else if (n == 1) launch_linear<1>(st, dim3(blocks_for(a.w.n_out, LIN_WARPS / kw * LIN_R), slots), a, kw);
    else if (slots == 1 && few_rows_runs(a))
        launch_few_rows(st, a);
    else if (const f16x *xp = f16s_buffer(st, a, n))
        launch_f16s(st, a, n, slots, *xp);
    else if (mma_fits(a.w) && !getenv("DS4_CUDA_NO_MMA"))
        launch_mma(st, dim3(blocks_for(a.w.n_out, MM_BM),
                            mma_token_tiles(n, a.n_tok, slots, a.active != NULL), slots), a);
    else launch_linear<8>(st, dim3(blocks_for(a.w.n_out, LIN_WARPS / kw), slots), a, kw);
}

static void linear(cudaStream_t st, dmat w, const float *x, int64_t xs, int n, float *y, int64_t ys) {
    lin_args a = {w, 0, x, xs, y, ys, n, NULL, NULL, NULL, 0, 0, 0, 0, 0};
    run_linear(st, a, n, 1);
}

/* One token's batch of nb same-shape products (a.bw, a.bx, a.by) as one launch. */
static void launch_batch(cudaStream_t st, const lin_args &a0, int nb) {
    lin_args a = a0;
    a.early = early_weights(1, !a.active);
    bool q8one = q8_mma1_fits(a) && !getenv("DS4_CUDA_NO_Q8");
    act8_x(st, a, 1, nb, one_token_codes(q8one));
    int kw = lin_split(a.w.n_in);
    if (q8one) {
        launch_q8_mma1(st, a, nb);
        return;
    }
    launch_linear<1>(st, dim3(blocks_for(a.w.n_out, LIN_WARPS / kw * LIN_R), nb), a, kw);
}

/* nb products of one shape: weights w.data + b * bw bytes on x + b * bx into
 * y + b * by; one launch for a token, or for a chunk on one x (bx 0: a
 * pair's), else a product at a time. */
static void linear_batched(cudaStream_t st, dmat w, int nb, int64_t bw, const float *x, int64_t bx,
                           int64_t xs, int n, float *y, int64_t by, int64_t ys) {
    if (n == 1) {
        lin_args a = {w, 0, x, xs, y, ys, 1, NULL, NULL, NULL, bw, bx, by, 0, 0};
        launch_batch(st, a, nb);
        return;
    }
    if (!bx) {   /* one x: one launch over the nb matrices, x rounded (qat-q8) or split (F16) once */
        lin_args a = {w, 0, x, xs, y, ys, n, NULL, NULL, NULL, bw, 0, by, 0, 0};
        run_linear(st, a, n, nb);
        return;
    }
    for (int b = 0; b < nb; b++) {
        dmat part = w;
        part.data += b * bw;
        linear(st, part, x + b * bx, xs, n, y + b * by, ys);
    }
}

/* Whether one launch can run both matrices (a pair at a batch stride). */
static bool same_shape(const dmat &a, const dmat &b) {
    return a.type == b.type && a.n_in == b.n_in && a.n_out == b.n_out && a.row_bytes == b.row_bytes;
}

/* Two products of one shape on the same x (a layer's pair of weights): one
 * launch for a token (the second weights and output as the batch stride). */
static void linear_pair(cudaStream_t st, const ds4_tensor &w0, const ds4_tensor &w1, const float *x,
                        int64_t xs, int n, float *y0, float *y1, int64_t ys) {
    dmat a = dmat_of(w0), b = dmat_of(w1);
    if (!same_shape(a, b)) {
        linear(st, a, x, xs, n, y0, ys);
        linear(st, b, x, xs, n, y1, ys);
        return;
    }
    linear_batched(st, a, 2, b.data - a.data, x, 0, xs, n, y0, y1 - y0, ys);
}

/* Rows of every expert in use, over the pairs grouped for it. */
static void expert_linear(cudaStream_t st, const ds4_tensor &t, const dsess *g, int n, int pairs,
                          int slots, const int *xrow, const float *x, int64_t xs, float *y,
                          int64_t ys) {
    /* n_tok: the (token, expert) pairs, for the launch shape alone */
    lin_args a = {dmat_of(t), t.ne[1] * t.row_bytes, x, xs, y, ys, pairs, g->active, g->offs, xrow,
                  0, 0, 0, 0, 0};
    run_linear(st, a, n, slots);
}

/* The routed gate and up rows (same shape, same x): for a token, one
 * k_expert_mma1 launch over both. */
static void expert_linear_pair(cudaStream_t st, const ds4_tensor &t0, const ds4_tensor &t1,
                               const dsess *g, int n, int pairs, int slots, const int *xrow,
                               const float *x, int64_t xs, float *y0, float *y1, int64_t ys) {
    dmat a = dmat_of(t0), b = dmat_of(t1);
    if (n != 1 || !same_shape(a, b) || !expert_mma1_fits(a) || getenv("DS4_CUDA_NO_EXPERT_MMA")) {
        expert_linear(st, t0, g, n, pairs, slots, xrow, x, xs, y0, ys);
        expert_linear(st, t1, g, n, pairs, slots, xrow, x, xs, y1, ys);
        return;
    }
    lin_args la = {a, t0.ne[1] * t0.row_bytes, x, xs, y0, ys, pairs, g->active, g->offs, xrow,
                   b.data - a.data, 0, y1 - y0, 0, 0};
    act8_x(st, la, xrow ? n : pairs, 1, one_token_codes(true));
    launch_expert_mma1(st, la, slots, 2);
}

static row_args rows_of(const float *x, float *y, int64_t stride, int dim) {
    row_args a;
    memset(&a, 0, sizeof a);
    a.x = x;
    a.y = y;
    a.xs = a.ys = stride;
    a.dim = dim;
    a.per_tok = 1;
    a.scale = 1.0f;
    return a;
}

/* Short rows a warp each where k_rows_warp takes them (same bits as
 * k_rows: same_bits 12 / 12, the wide model's indexer_dim 128 FP4 rows with
 * them; DS4_CUDA_NO_ROWSWARP=1 off, for A/B); else a
 * block a row, its threads by the row's length alone (it sets the order of
 * the norm's sum). */
static void run_rows(cudaStream_t st, const row_args &a, int64_t n_rows) {
    static const bool block_rows = getenv("DS4_CUDA_NO_ROWSWARP") != NULL;
    if (n_rows >= ROWS_WARP_ROWS && rows_warp_fits(a) && !block_rows) {
        launch_k(k_rows_warp, (unsigned)blocks_for(n_rows, ROWS_WARP_ROWS), ROWS_WARP_ROWS * WARP, 0, st, a, n_rows);
        return;
    }
    launch_k(k_rows, (unsigned)n_rows, a.dim >= 4096 ? 1024 : 256, rows_staged(a) ? a.dim * sizeof(float) : 0, st, a);
}

static const float *f32(const ds4_tensor &t) { return (const float *)t.data; }

/* The HC mixers on the RMS norm of all hc * D streams, (2 + hc) * hc rows
 * (hc for the head). For a chunk: the norm's scale on the product's row
 * sums inside k_linear_few_rows where it takes the rows (as one token's:
 * no normed copy of the streams; DS4_CUDA_NO_MIXNORM=1, read at each
 * enqueue: the norm into u, then the product, for A/B). One token's
 * few rows would not fill the GPU, so its product splits the inputs
 * MIX_PARTS ways (float rows), each block norming x as it loads it, and
 * the HC kernels add the partial sums, part p at mix + p * n * n_out.
 * u: scratch for a chunk's normed streams. Returns the parts written. */
static int hc_mixer(cudaStream_t st, const ds4_tensor &fn, const float *X, int n, float *u,
                    float *mix, int n_out, int64_t hcD, float eps) {
    dmat w = dmat_of(fn);
    int es = fn.type == DS4_TYPE_F32 ? 4 : fn.type == DS4_TYPE_F16 || fn.type == DS4_TYPE_BF16 ? 2 : 0;
    if (n != 1) {   /* a chunk: the norm inside the product where k_linear_few_rows takes it */
        lin_args a = {w, 0, X, hcD, mix, n_out, n, NULL, NULL, NULL, 0, 0, 0, (int)hcD, eps};
        if (few_rows_runs(a) && !getenv("DS4_CUDA_NO_MIXNORM")) {
            launch_few_rows(st, a);
            return 1;
        }
    }
    if (n != 1 || !es || w.n_in % (MIX_PARTS * 8)) {
        row_args r = rows_of(X, u, hcD, (int)hcD);
        r.norm = 1;
        r.eps = eps;
        run_rows(st, r, n);
        linear(st, w, u, hcD, n, mix, n_out);
        return 1;
    }
    w.n_in /= MIX_PARTS;
    lin_args a = {w, 0, X, hcD, mix, n_out, 1, NULL, NULL, NULL, (int64_t)w.n_in * es, w.n_in, n_out,
                  (int)hcD, eps};
    launch_batch(st, a, MIX_PARTS);
    return MIX_PARTS;
}

/* Threads of the HC controller's block a token: a decode token has the GPU
 * to itself. */
static int hc_threads(int n) { return n < 16 ? 1024 : 256; }

/* xn's codes in both forms, for the sublayer's products (pre8_set). */
static act8_pre xn_codes(dsess *g, int n, int D) { return pre8_set(g, PRE8_XN, g->xn, n, D, &g->xn8[0], &g->xn8[1]); }

/* The HC controller of one site (§2.2) and the sublayer's input norm: xn
 * from X on the main stream, post and comb beside it (the mix they read is
 * not rewritten before hc_expand joins it). A decode token's runs the whole
 * mixer and Sinkhorn on the hc stream and the pre rows again in one main-
 * stream block (same call, H200: decode +2.5%); otherwise the mixer runs
 * on the main stream and Sinkhorn beside it on the side stream. */
static void hc_controller(ds4_session *s, dsess *g, int n, const ds4_tensor &fn,
                          const ds4_tensor &base, const ds4_tensor &scale, const ds4_tensor &norm) {
    const ds4_config *cf = &s->model->cfg;
    int hc = cf->n_hc, D = cf->n_embd, n_mix = (2 + hc) * hc;
    static const bool fuse = !getenv("DS4_CUDA_NO_HCFUSE");
    if (fuse && n == 1 && fn.type == DS4_TYPE_F16 && hc == 4 && D % 8 == 0) {
        /* the whole mixer and Sinkhorn on the hc stream (post, comb: read
         * at the expand); the pre rows again in the main stream's one block */
        cudaEventRecord(g->hc_fork, g->st);
        cudaStreamWaitEvent(g->hcs, g->hc_fork, 0);
        int parts = hc_mixer(g->hcs, fn, g->X, n, g->u, g->mix, n_mix, (int64_t)hc * D, cf->rms_eps);
        launch_k(k_hc_sinkhorn, n, WARP, 0, g->hcs, g->mix, parts, (int64_t)n * n_mix, f32(base), f32(scale), hc,
                 cf->sinkhorn_iters, cf->hc_eps, g->post, g->comb);
        cudaEventRecord(g->hc_join, g->hcs);
        /* every value in registers where D fits it (DS4_CUDA_NO_HCREG=1: the 1024-thread block, for A/B) */
        static const bool one_block = getenv("DS4_CUDA_NO_HCREG") != NULL;
        bool reg = !one_block && hc_reg_fits(D);
        launch_k(reg ? k_hc_pre_collapse_reg<4> : k_hc_pre_collapse<4>, 1, reg ? D / 8 : 1024, 0, g->st, dmat_of(fn),
                 (const float *)g->X, f32(base), f32(scale), D, cf->hc_eps, cf->rms_eps, f32(norm), g->x, g->xn,
                 xn_codes(g, n, D), early_weights(n, true));
        return;
    }
    int parts = hc_mixer(g->st, fn, g->X, n, g->u, g->mix, n_mix, (int64_t)hc * D, cf->rms_eps);
    int64_t ps = (int64_t)n * n_mix;
    cudaEventRecord(g->hc_fork, g->st);
    cudaStreamWaitEvent(g->side, g->hc_fork, 0);
    launch_k(k_hc_sinkhorn, n, WARP, 0, g->side, g->mix, parts, ps, f32(base), f32(scale), hc,
                                            cf->sinkhorn_iters, cf->hc_eps, g->post, g->comb);
    cudaEventRecord(g->hc_join, g->side);
    launch_k(k_hc_collapse, n, hc_threads(n), 0, g->st, g->mix, parts, ps, n_mix, g->X, f32(base), f32(scale), hc,
                                                  D, cf->hc_eps, cf->rms_eps, f32(norm), g->x, g->xn, xn_codes(g, n, D));
}

/* y, or the MoE's output m (m.ex_y set), into the streams. */
static void hc_expand(ds4_session *s, dsess *g, int n, const moe_out &m) {
    const ds4_config *cf = &s->model->cfg;
    cudaStreamWaitEvent(g->st, g->hc_join, 0);   /* post and comb */
    launch_k(cf->n_hc <= 4 ? k_hc_expand<4> : k_hc_expand<HC_MAX>, dim3(blocks_for(cf->n_embd / 4, HC_EXPAND_THREADS), n),
             HC_EXPAND_THREADS, 0, g->st, g->X, g->post, g->comb, g->y, m, cf->n_hc, cf->n_embd, g->Xn);
    std::swap(g->X, g->Xn);
}

/* k_compress's block: a thread a dim of the row, whole warps, at most COMP_MAX_THREADS */
static int comp_threads(int dim) {
    return std::min(COMP_MAX_THREADS, (dim + WARP - 1) / WARP * WARP);
}

static void attention(ds4_session *s, dsess *g, const ds4_layer &L, int l, int n) {
    const ds4_config *cf = &s->model->cfg;
    const ds4_layer_state *ls = &s->layers[l];
    const dlayer &dl = g->L[l];
    cudaStream_t st = g->st;
    int D = cf->n_embd, d = cf->head_dim, H = cf->n_head, m = ls->ratio;
    int dI = cf->indexer_dim, HI = cf->indexer_heads, QL = cf->q_lora_rank;
    int qat = s->numerics != DS4_NUMERICS_EXACT;   /* qat and qat-q8 */
    const float *rope = m ? g->rope_comp : g->rope_main;

    /* The kv product (it reads only xn, the normed input: hc_controller)
     * beside the query path on the kv stream (DS4_CUDA_NO_KVFORK=1: before it
     * on the main one). As the shared expert: one-token steps, and chunks
     * outside qat-q8. */
    bool fork = (n == 1 || !g_act8) && !getenv("DS4_CUDA_NO_KVFORK");
    cudaStream_t ks = fork ? g->kvs : st;
    /* Where the kv stream forks, the compressors' products and the indexer's
     * on streams of their own (products of float weights: no x forms to
     * share), so none waits on another: in series on the kv stream they
     * were the indexer layer's longest path to the state writes. A qat-q8
     * chunk, which keeps its int8 products on the one stream (their x
     * forms are one buffer), sends these beside them too: their grids of
     * 32-256 blocks (n_out 64-1024) leave SMs idle. DS4_CUDA_NO_ATTNFORK=1:
     * all on the kv stream (a qat-q8 chunk's one stream), as before;
     * DS4_CUDA_NO_Q8CHUNKFORK=1: the qat-q8 chunk's alone. Both read at each
     * enqueue (the tests'). */
    bool split = !getenv("DS4_CUDA_NO_ATTNFORK") &&
                 (fork || (g_act8 && n > 1 && !getenv("DS4_CUDA_NO_Q8CHUNKFORK")));
    cudaStream_t cs = split && m && plain_x(L.comp_kv) && plain_x(L.comp_gate) &&
                      (!ls->indexer || (plain_x(L.idx_comp_kv) && plain_x(L.idx_comp_gate))) ? g->cps : ks;
    cudaStream_t is = split && ls->indexer && plain_x(L.idx_proj) && plain_x(L.idx_q_b) ? g->ixs : ks;
    if (fork || cs != ks || is != ks) cudaEventRecord(g->kv_fork, st);
    if (fork) cudaStreamWaitEvent(g->kvs, g->kv_fork, 0);
    if (cs != ks) cudaStreamWaitEvent(cs, g->kv_fork, 0);
    if (is != ks) cudaStreamWaitEvent(is, g->kv_fork, 0);

    /* KV path (§3.2) */
    linear(ks, dmat_of(L.attn_kv), g->xn, D, n, g->kv, d);
    row_args r = rows_of(g->kv, g->kv, d, d);
    r.norm = 1;
    r.norm_w = f32(L.attn_kv_a_norm);
    r.eps = cf->rms_eps;
    r.freqs = rope;
    r.rope_dim = cf->rope_dim;
    r.pos0 = g->dpos;
    r.qat = qat ? QAT_FP8 : QAT_NONE;
    r.qat_len = d - cf->rope_dim;
    run_rows(ks, r, n);

    /* compressor and indexer projections of xn (§3.6, §3.7) */
    int cw = ls->coff * d, iw2 = 2 * dI;
    if (m) linear_pair(cs, L.comp_kv, L.comp_gate, g->xn, D, n, g->kg, g->kg + cw, 2 * cw);
    if (ls->indexer) {
        linear_pair(cs, L.idx_comp_kv, L.idx_comp_gate, g->xn, D, n, g->ikg, g->ikg + iw2, 2 * iw2);
        linear(is, dmat_of(L.idx_proj), g->xn, D, n, g->iw, HI);
        r = rows_of(g->iw, g->iw, HI, HI);
        r.scale = 1.0f / sqrtf((float)HI);
        run_rows(is, r, n);
    }
    if (fork) cudaEventRecord(g->kv_join, g->kvs);
    if (cs != ks) cudaEventRecord(g->cp_join, cs);

    /* query path (§3.1), and the indexer's queries from its low-rank q */
    linear(st, dmat_of(L.attn_q_a), g->xn, D, n, g->qr, QL);
    r = rows_of(g->qr, g->qr, QL, QL);
    r.norm = 1;
    r.norm_w = f32(L.attn_q_a_norm);
    r.eps = cf->rms_eps;
    r.a8 = pre8_set(g, PRE8_QR, g->qr, n, QL, &g->qr8, NULL);   /* q_b's and the indexer's q_b's x */
    run_rows(st, r, n);
    auto indexer_queries = [&](cudaStream_t qs) {
        linear(qs, dmat_of(L.idx_q_b), g->qr, QL, n, g->iq, (int64_t)HI * dI);
        row_args ir = rows_of(g->iq, g->iq, dI, dI);
        ir.per_tok = HI;
        ir.freqs = g->rope_comp;
        ir.rope_dim = cf->rope_dim;
        ir.pos0 = g->dpos;
        ir.qat = qat ? QAT_FP4 : QAT_NONE;
        ir.qat_len = dI;
        run_rows(qs, ir, (int64_t)n * HI);
    };
    if (is != ks) {   /* beside q_b, once qr is normed */
        cudaEventRecord(g->qr_ready, st);
        cudaStreamWaitEvent(is, g->qr_ready, 0);
        indexer_queries(is);
        cudaEventRecord(g->ix_join, is);
    }
    linear(st, dmat_of(L.attn_q_b), g->qr, QL, n, g->q, (int64_t)H * d);
    r = rows_of(g->q, g->q, d, d);
    r.per_tok = H;
    r.norm = 1;
    r.eps = cf->rms_eps;
    r.freqs = rope;
    r.rope_dim = cf->rope_dim;
    r.pos0 = g->dpos;
    run_rows(st, r, (int64_t)n * H);
    if (ls->indexer && is == ks) indexer_queries(st);
    if (fork) cudaStreamWaitEvent(st, g->kv_join, 0);
    if (cs != ks) cudaStreamWaitEvent(st, g->cp_join, 0);

    /* window and compressor rings, then the windows this chunk completes */
    state_args sa = {g->kv, g->kg, ls->indexer ? g->ikg : NULL,
                     (const uint16_t *)L.comp_ape.data, (const uint16_t *)L.idx_comp_ape.data,
                     dl.raw, dl.kg, dl.idx_kg, g->dpos, dev_cap_raw(s), dev_cap_kg(s, ls), d, cw, iw2, m};
    launch_k(k_state, n, STATE_THREADS, 0, st, sa);
    if (m) {
        unsigned windows = (unsigned)(n / m + 1);   /* most a chunk of n can complete */
        comp_args ca = {dl.kg, dev_cap_kg(s, ls), cw, d, m, ls->coff, g->dpos, n, dl.rows, f32(L.comp_norm),
                        cf->rms_eps, g->rope_comp, cf->rope_dim, qat ? QAT_FP8 : QAT_NONE, dl.rows8, g->kv8};
        launch_k(k_compress, windows, comp_threads(d), g->compact ? d * sizeof(float) : 0, st, ca);
        if (ls->indexer) {
            comp_args ia = {dl.idx_kg, dev_cap_kg(s, ls), iw2, dI, m, 2, g->dpos, n, dl.idx_rows,
                            f32(L.idx_comp_norm), cf->rms_eps, g->rope_comp, cf->rope_dim,
                            qat ? QAT_FP4 : QAT_NONE, dl.idx_rows8, g->kv4};
            launch_k(k_compress, windows, comp_threads(dI), g->compact ? dI * sizeof(float) : 0, st, ia);
        }
    }
    /* the rows the kernels below read: float, compact (one-token steps), or
     * a chunk's float view of the compact ones */
    const float *rows = dl.rows, *idx_rows = dl.idx_rows;
    const uint8_t *rows8 = dl.rows8, *idx_rows8 = dl.idx_rows8;
    const int key_tf32 = qat && !getenv("DS4_CUDA_NO_KEYTF32") ? d - cf->rope_dim : 0;
    /* k_attention_bf16 where it runs: its views are made from the rows as
     * they are (float or compact), so no float view of them */
    const bool bf16_attn = n > 1 && g->view_raw && d - key_tf32 <= g->view_split && tcb_runs(d, g->view_split);
    const int64_t n_rows = m ? (s->n_tokens + n) / m : 0;
    if (m && g->compact && n > 1) {
        unsigned written = (unsigned)n_rows;
        if (written) {
            if (!bf16_attn)
                launch_k(k_kv_decode, written, 128, 0, st, (const uint8_t *)dl.rows8, g->rows_f, d, g->kv8, 0);
            if (ls->indexer)
                launch_k(k_kv_decode, written, 128, 0, st, (const uint8_t *)dl.idx_rows8, g->idx_rows_f, dI, g->kv4, 1);
        }
        rows = g->rows_f, idx_rows = g->idx_rows_f, rows8 = idx_rows8 = NULL;
    }
    if (ls->indexer) {
        if (is != ks) cudaStreamWaitEvent(st, g->ix_join, 0);
        idx_args ia = {g->iq, g->iw, idx_rows, g->iscores, g->isel, g->n_isel, g->dpos,
                       max_cap_rows(s), m, HI, dI, cf->indexer_top_k, 0, idx_rows8, g->kv4, qat};
        size_t shm = ((size_t)HI * (dI + 1) + 8 * HI + (idx_rows8 ? 8 * dI : 0)) * sizeof(float);
        /* splits of >= 16 rows a warp, to ~256 blocks in all: a decode token
         * fills the GPU, a prefill chunk loads its queries once a token */
        int64_t split = std::min((ia.cap_rows + 127) / 128, std::max<int64_t>(1, 256 / n));
        /* token slices whose scores fit the score buffer (long contexts) */
        int slice = idx_slice_tokens(ia.cap_rows, n);
        for (ia.t0 = 0; ia.t0 < n; ia.t0 += slice) {
            unsigned nt = (unsigned)std::min(slice, n - ia.t0);
            if (itc_fits(HI, dI) && !getenv(n > 1 ? "DS4_CUDA_NO_TCIDX" : "DS4_CUDA_NO_TCIDX1"))
                launch_idx_score_tc(st, ia, nt);
            else launch_k(k_idx_score, dim3(nt, (unsigned)std::max<int64_t>(1, split)), 256, shm, st, ia);
            launch_k(k_idx_select, nt, IDX_SEL_THREADS, 0, st, ia);
        }
    }
    attn_args aa = {g->q, g->o, g->attn_part, dl.raw, rows, f32(L.attn_sinks), rows8, g->kv8,
                    ls->indexer ? g->isel : NULL, g->n_isel, cf->indexer_top_k, g->dpos, dev_cap_raw(s),
                    H, d, cf->sliding_window, m, cf->rope_dim, 0, rope, key_tf32};
    if (bf16_attn) {
        aa.view_raw = g->view_raw, aa.view_rows = g->view_rows;
        aa.key_tf32 = d - g->view_split;   /* the dims its views hold as one part */
        const int64_t lo = std::max<int64_t>(0, s->n_tokens - cf->sliding_window + 1);
        launch_attention_bf16(st, aa, n, lo, s->n_tokens + n - lo, dl.rows, dl.rows8, g->kv8, n_rows);   /* as stored */
    } else {
        launch_attention(st, aa, n);
    }

    /* grouped output projection (§3.10) */
    int G = cf->o_groups, per_group = H * d / G, r_o = cf->o_lora_rank;
    dmat wo_a = dmat_of(L.attn_output_a);
    wo_a.n_out = r_o;
    linear_batched(st, wo_a, G, (int64_t)r_o * wo_a.row_bytes, g->o, per_group, (int64_t)H * d, n,
                   g->low, r_o, (int64_t)G * r_o);
    linear(st, dmat_of(L.attn_output_b), g->low, (int64_t)G * r_o, n, g->y, D);
}

/* SwiGLU in place on g (count elements of n tokens), and in a qat-q8
 * one-token step also the codes of the form `down` takes, into b (pre8
 * entry `slot`). */
static void swiglu(cudaStream_t st, dsess *g, int slot, int n, float *gt, const float *u, int64_t count,
                   float clamp, const ds4_tensor &down, const act8_bufs *b) {
    bool q8k = base_type(down.type) != DS4_TYPE_Q8_0;
    act8_pre c = pre8_set(g, slot, gt, act8_rounds(down.type) ? n : 0, count, q8k ? NULL : b, q8k ? b : NULL);
    if (c.q0.q || c.qk.q) {
        launch_k(k_swiglu_act8, blocks_for(count / 256, 8), 256, 0, st, gt, u, count, clamp, (int)q8k,
                 q8k ? c.qk : c.q0);
        return;
    }
    launch_k(k_swiglu, blocks_for(count, 256), 256, 0, st, gt, u, count, clamp);
}

/* The shared expert's SwiGLU FFN on xn into y (gate and up into sg, su). */
static void shared_expert(cudaStream_t st, dsess *g, const ds4_layer &L, const float *xn, int D, int n, int Fs,
                          float *sg, float *su, float *y) {
    linear_pair(st, L.ffn_gate_shexp, L.ffn_up_shexp, xn, D, n, sg, su, Fs);
    swiglu(st, g, PRE8_SH, n, sg, su, (int64_t)n * Fs, L.swiglu_clamp, L.ffn_down_shexp, &g->sh8);
    linear(st, dmat_of(L.ffn_down_shexp), sg, Fs, n, y, D);
}

/* The MoE of xn: a token's output summed by the expand that follows (the
 * moe_out returned), a chunk's into y by k_combine (also a token's where
 * DS4_CUDA_NO_EXPANDMOE=1, for A/B). */
static moe_out moe(ds4_session *s, dsess *g, const ds4_layer &L, int n) {
    const ds4_config *cf = &s->model->cfg;
    cudaStream_t st = g->st;
    int D = cf->n_embd, F = cf->expert_ff, k = cf->n_expert_used, E = cf->n_expert;
    int Fs = F * cf->n_shared_experts;
    /* the shared expert (weight 1) beside the routed ones on the side stream
     * (DS4_CUDA_NO_SHFORK=1: after them on the main one). Same call, H200:
     * qat-q8 decode +6-8%, qat chunks +2.5%, qat decode within noise; not
     * for qat-q8 chunks, whose int8 tiles then compete (-2.5%). xn is the
     * normed input (hc_controller). */
    bool fork = (n == 1 || !g_act8) && !getenv("DS4_CUDA_NO_SHFORK");
    cudaStream_t ss = fork ? g->side : st;
    float *sg = fork ? g->sh_g : g->ex_g, *su = fork ? g->sh_u : g->ex_u;
    if (fork) {
        cudaEventRecord(g->sh_fork, st);
        cudaStreamWaitEvent(g->side, g->sh_fork, 0);
        shared_expert(ss, g, L, g->xn, D, n, Fs, sg, su, g->sh_y);
        cudaEventRecord(g->sh_join, g->side);
    }
    linear(st, dmat_of(L.ffn_gate_inp), g->xn, D, n, g->router, E);
    /* one token: the route groups its slots too (DS4_CUDA_NO_ROUTEGROUP=1: k_route, then k_group, for A/B) */
    bool group1 = n == 1 && k <= WARP && !getenv("DS4_CUDA_NO_ROUTEGROUP");
    group_out grp = {g->offs, g->active, g->pair_tok, g->slot_pair};
    const float *bias = L.exp_probs_b.data ? f32(L.exp_probs_b) : NULL;
    const int32_t *tid2eid = L.hash_routed ? (const int32_t *)L.tid2eid.data : NULL;
    /* one token: in one warp's registers (DS4_CUDA_NO_ROUTE1=1: k_route, for A/B) */
    static const bool route_sh = getenv("DS4_CUDA_NO_ROUTE1") != NULL;
    if (group1 && E <= WARP * ROUTE1_PER_LANE && !route_sh)
        launch_k(k_route1, 1, WARP, 0, st, g->router, E, k, bias, tid2eid, g->ids, cf->expert_weights_scale, g->sel,
                 g->sel_w, grp);
    else
        launch_k(k_route, blocks_for(n, ROUTE_TOKENS), ROUTE_TOKENS * WARP, 0, st, g->router, E, k, bias, tid2eid,
                 g->ids, cf->expert_weights_scale, n, g->sel, g->sel_w, group1 ? grp : group_out{});
    if (!group1)
        launch_k(k_group, 1, 1024, 0, st, g->sel, n * k, k, E, g->offs, g->active, g->pair_tok, g->slot_pair);
    int slots = std::min(E, n * k);
    expert_linear_pair(st, L.ffn_gate_exps, L.ffn_up_exps, g, n, n * k, slots, g->pair_tok, g->xn, D,
                       g->ex_g, g->ex_u, F);
    swiglu(st, g, PRE8_EX, n, g->ex_g, g->ex_u, (int64_t)n * k * F, L.swiglu_clamp, L.ffn_down_exps, &g->ex8);
    expert_linear(st, L.ffn_down_exps, g, n, n * k, slots, NULL, g->ex_g, F, g->ex_y, D);

    if (fork) cudaStreamWaitEvent(st, g->sh_join, 0);
    else shared_expert(ss, g, L, g->xn, D, n, Fs, sg, su, g->sh_y);   /* into ex_g / ex_u: the routed are in ex_y */
    /* one token: in the expand (same call, H200: decode +1.7%); chunks keep
     * k_combine (in the expand, prefill measured 0.6% slower) */
    moe_out out = {g->ex_y, g->slot_pair, g->sel_w, g->sh_y, k};
    if (n == 1 && !getenv("DS4_CUDA_NO_EXPANDMOE")) return out;
    launch_k(k_combine, dim3(blocks_for(D / 4, HC_EXPAND_THREADS), n), HC_EXPAND_THREADS, 0, st, out, D, g->y);
    return moe_out{};
}

/* enqueue's `choice`: the logits to the host, or a sampled draw (else a
 * greedy choice, the id it must not be, -1 none) */
#define STEP_LOGITS (-2)
#define STEP_SAMPLED (-3)

/* Every step of one chunk onto the stream, from the pinned position and ids
 * to the pinned logits of tokens t0.. (none when t0 < 0); or, for a chained
 * step (one token; choice >= -1: greedy, k_greedy_next; STEP_SAMPLED:
 * k_sample_next), from the position and id already on the device to the
 * choice after it, the logits left there. */
static void enqueue(ds4_session *s, dsess *g, int n, int t0, int choice = STEP_LOGITS) {
    const ds4_config *cf = &s->model->cfg;
    const dmodel *dm = (const dmodel *)s->model->backend_model;
    cudaStream_t st = g->st;
    int D = cf->n_embd, hc = cf->n_hc;
    const bool greedy = choice >= -1, chained = greedy || choice == STEP_SAMPLED;
    if (!chained) {
        cudaMemcpyAsync(g->dpos, g->hpos, 8, cudaMemcpyHostToDevice, st);
        cudaMemcpyAsync(g->ids, g->hids, (size_t)n * 4, cudaMemcpyHostToDevice, st);
    }
    dmat E = dmat_of(dm->token_embd);
    memset(g->pre8, 0, sizeof g->pre8);
    launch_k(k_embed, dim3(blocks_for(D / 8, 128), n), 128, 0, st, E, g->ids, hc, D, g->X);
    for (int l = 0; l < cf->n_layer; l++) {
        const ds4_layer &L = dm->layers[l];
        hc_controller(s, g, n, L.hc_attn_fn, L.hc_attn_base, L.hc_attn_scale, L.attn_norm);
        attention(s, g, L, l, n);
        hc_expand(s, g, n, moe_out{});
        hc_controller(s, g, n, L.hc_ffn_fn, L.hc_ffn_base, L.hc_ffn_scale, L.ffn_norm);
        hc_expand(s, g, n, moe(s, g, L, n));
    }
    if (t0 < 0) return;
    int nn = n - t0;
    const float *Xt = g->X + (int64_t)t0 * hc * D;
    int parts = hc_mixer(st, dm->output_hc_fn, Xt, nn, g->u, g->mix, hc, (int64_t)hc * D, cf->rms_eps);
    /* the HC head (§2.5): h = sum_i (sigmoid(mix_i s + b_i) + eps) X_i, then the output norm */
    pre8_set(g, PRE8_XN, g->xn, 0, D, NULL, NULL);   /* xn8[0] takes the head's x */
    act8_pre c = pre8_set(g, PRE8_HEAD, g->x, n, D, &g->xn8[0], NULL);
    launch_k(k_hc_collapse, nn, hc_threads(nn), 0, st, g->mix, parts, (int64_t)nn * hc, hc, Xt,
                                                 f32(dm->output_hc_base), f32(dm->output_hc_scale), hc, D,
                                                 cf->hc_eps, cf->rms_eps, f32(dm->output_norm), g->x, g->x, c);
    linear(st, dmat_of(dm->output), g->x, D, nn, g->logits, cf->n_vocab);
    if (greedy)
        launch_k(k_greedy_next, 1, GREEDY_THREADS, 0, st, (const float *)g->logits, cf->n_vocab, choice, g->ids,
                 g->dpos, g->choices, (int *)(g->choices + GREEDY_PIECE));
    else if (choice == STEP_SAMPLED)
        launch_k(k_sample_next, 1, SAMPLE_THREADS, 0, st, (const float *)g->logits, cf->n_vocab, g->sampler, g->ids,
                 g->dpos, g->choices, g->rngs, (int *)(g->choices + GREEDY_PIECE));
    else
        cudaMemcpyAsync(g->hlogits, g->logits, (size_t)nn * cf->n_vocab * 4, cudaMemcpyDeviceToHost, st);
}

/* A one-token step captured as a graph into *exec (enqueue's step with
 * `choice`). */
static int capture_step(ds4_session *s, dsess *g, cudaGraphExec_t *exec, int choice, char *err, size_t errlen) {
    cudaGraph_t graph;
    CK(cudaStreamBeginCapture(g->st, cudaStreamCaptureModeThreadLocal), "graph capture");
    enqueue(s, g, 1, 0, choice);
    CK(cudaStreamEndCapture(g->st, &graph), "graph capture");
    cudaError_t e = cudaGraphInstantiate(exec, graph, 0);
    cudaGraphDestroy(graph);
    if (e != cudaSuccess) {
        *exec = NULL;
        return cuda_fail(e, "graph instantiation", err, errlen);
    }
    return 0;
}

static int forward(ds4_session *s, int64_t n64, float *logits, int all_logits, char *err,
                   size_t errlen) {
    const ds4_config *cf = &s->model->cfg;
    dsess *g = (dsess *)s->backend_state;
    int n = (int)n64;
    if (ensure_chunk(s, g, n, err, errlen)) return -1;
    int t0 = !logits ? -1 : all_logits ? 0 : n - 1;
    if (logits && ensure_logits(cf, g, n - t0, err, errlen)) return -1;
    *g->hpos = s->n_tokens;
    memcpy(g->hids, s->ids + s->n_tokens, (size_t)n * 4);
    g_pdl = g_pdl_device && n == 1;
    g_act8 = s->numerics == DS4_NUMERICS_QAT_Q8 ? g : NULL;
    g_f16x = &g->f16;
    /* the hc_expand swaps leave X where it started: 2 per layer */
    if (n == 1 && logits && !getenv("DS4_CUDA_NO_GRAPH")) {
        /* decode: the whole step as one graph, captured on first use; it
         * reads the position and ids from the pinned buffers at replay */
        if (!g->decode_graph && capture_step(s, g, &g->decode_graph, STEP_LOGITS, err, errlen)) return -1;
        CK(cudaGraphLaunch(g->decode_graph, g->st), "launching the decode graph");
    } else {
        enqueue(s, g, n, t0);
    }
    CK(cudaGetLastError(), "launching the forward pass");
    CK(cudaStreamSynchronize(g->st), "the forward pass");
    if (logits) memcpy(logits, g->hlogits, (size_t)(n - t0) * cf->n_vocab * 4);
    return 0;
}

/* The chained steps (greedy or sampled graphs) back to back on the stream
 * from the session's next token, the host reading the choices (and the
 * sampler's states: rngs non-NULL) once a GREEDY_PIECE steps. */
static int run_chain(ds4_session *s, dsess *g, cudaGraphExec_t graph, int64_t n, int32_t *out, uint64_t *rngs,
                     float *logits, char *err, size_t errlen) {
    const ds4_config *cf = &s->model->cfg;
    const int64_t start = s->n_tokens;
    *g->hpos = start;
    g->hids[0] = s->ids[start];
    CK(cudaMemcpyAsync(g->dpos, g->hpos, 8, cudaMemcpyHostToDevice, g->st), "the first position");
    CK(cudaMemcpyAsync(g->ids, g->hids, 4, cudaMemcpyHostToDevice, g->st), "the first id");
    for (int64_t done = 0; done < n;) {
        int piece = (int)std::min<int64_t>(n - done, GREEDY_PIECE);
        CK(cudaMemsetAsync(g->choices + GREEDY_PIECE, 0, sizeof(int32_t), g->st), "the step count");
        for (int i = 0; i < piece; i++) CK(cudaGraphLaunch(graph, g->st), "launching a decode step");
        CK(cudaMemcpyAsync(g->hchoices, g->choices, (size_t)piece * sizeof(int32_t), cudaMemcpyDeviceToHost, g->st),
           "reading the choices");
        if (rngs)
            CK(cudaMemcpyAsync(g->hrngs, g->rngs, (size_t)piece * 8, cudaMemcpyDeviceToHost, g->st),
               "reading the sampler's states");
        CK(cudaStreamSynchronize(g->st), "the decode steps");
        memcpy(out + done, g->hchoices, (size_t)piece * sizeof(int32_t));
        if (rngs) memcpy(rngs + done, g->hrngs, (size_t)piece * 8);
        for (int i = 0; i < piece; i++)
            if (out[done + i] < 0) return 0;   /* the core counts the tokens up to it */
        done += piece;
    }
    CK(cudaMemcpy(logits, g->logits, (size_t)cf->n_vocab * 4, cudaMemcpyDeviceToHost), "the last logits");
    return 0;
}

/* The backend's decode_greedy: greedy graphs chained (run_chain). The graph
 * is captured for one `except` (a later call with another recaptures it).
 * DS4_CUDA_NO_GRAPH=1: the core's steps (forward, the host's argmax). */
static int decode_greedy(ds4_session *s, int64_t n, int32_t except, int32_t *out, float *logits, char *err,
                         size_t errlen) {
    const ds4_config *cf = &s->model->cfg;
    dsess *g = (dsess *)s->backend_state;
    if (getenv("DS4_CUDA_NO_GRAPH")) return DS4_BACKEND_UNAVAILABLE;   /* the core's steps */
    if (ensure_chunk(s, g, 1, err, errlen) || ensure_logits(cf, g, 1, err, errlen)) return -1;
    g_pdl = g_pdl_device;
    g_act8 = s->numerics == DS4_NUMERICS_QAT_Q8 ? g : NULL;
    if (g->greedy_graph && g->greedy_except != except) {
        cudaGraphExecDestroy(g->greedy_graph);
        g->greedy_graph = NULL;
    }
    if (!g->greedy_graph) {
        if (capture_step(s, g, &g->greedy_graph, except, err, errlen)) return -1;
        g->greedy_except = except;
    }
    return run_chain(s, g, g->greedy_graph, n, out, NULL, logits, err, errlen);
}

/* The backend's decode_sampled: sampled graphs chained (run_chain), for
 * min-p samplers (sample.cuh); the sampler's parameters and state go
 * to the device before the steps, so one graph serves every sampler.
 * Others, and DS4_CUDA_NO_GRAPH=1 or DS4_CUDA_NO_DEVICE_SAMPLE=1: the core's
 * steps (forward, ds4_sample on the host). */
static int decode_sampled(ds4_session *s, int64_t n, const ds4_sampler *sampler, int32_t *out, uint64_t *rngs,
                          float *logits, char *err, size_t errlen) {
    const ds4_config *cf = &s->model->cfg;
    dsess *g = (dsess *)s->backend_state;
    if (!ds4_sampler_takes_min_p_only(sampler->temperature, sampler->top_k, sampler->top_p, sampler->min_p) ||
        getenv("DS4_CUDA_NO_GRAPH") || getenv("DS4_CUDA_NO_DEVICE_SAMPLE"))
        return DS4_BACKEND_UNAVAILABLE;
    if (ensure_chunk(s, g, 1, err, errlen) || ensure_logits(cf, g, 1, err, errlen)) return -1;
    if (!g->sampler) {
        CK(cudaMalloc(&g->sampler, sizeof(dsampler)), "the sampler");
        CK(cudaHostAlloc(&g->hsampler, sizeof(dsampler), cudaHostAllocDefault), "the sampler");
        CK(cudaMalloc(&g->rngs, GREEDY_PIECE * 8), "the sampler's states");
        CK(cudaHostAlloc(&g->hrngs, GREEDY_PIECE * 8, cudaHostAllocDefault), "the sampler's states");
    }
    g_pdl = g_pdl_device;
    g_act8 = s->numerics == DS4_NUMERICS_QAT_Q8 ? g : NULL;
    if (!g->sampled_graph && capture_step(s, g, &g->sampled_graph, STEP_SAMPLED, err, errlen)) return -1;
    *g->hsampler = dsampler{sampler->temperature, sampler->min_p, (unsigned long long)sampler->rng};
    CK(cudaMemcpyAsync(g->sampler, g->hsampler, sizeof(dsampler), cudaMemcpyHostToDevice, g->st), "the sampler");
    return run_chain(s, g, g->sampled_graph, n, out, rngs, logits, err, errlen);
}

/* ds4_model_product: one of the model's matrices on n rows of x, through
 * the kernels a forward pass picks for n tokens; an expert through the
 * expert path (it alone in use, the n rows its pairs); `parts` stretches
 * through linear_batched, as the grouped products and pairs run. */
static int product(const ds4_model *m, const ds4_tensor *w, int expert, int parts, int shared_x, int numerics,
                   const float *x, int64_t n64, float *y, char *err, size_t errlen) {
    tensor_ref *refs = NULL;
    int n_refs = tensor_refs(m, (dmodel *)m->backend_model, &refs);
    const ds4_tensor *dev = NULL;
    for (int i = 0; i < n_refs; i++)
        if (refs[i].host == w) dev = refs[i].dev;
    free(refs);
    if (!dev) {
        snprintf(err, errlen, "the tensor is not on the device");
        return -1;
    }
    int n = (int)n64, E = w->n_dims == 3 ? (int)w->ne[2] : 1;
    int64_t n_in = w->ne[0], n_out = w->ne[1], x_len = n * n_in * (shared_x ? 1 : parts);
    dsess g;
    memset(&g, 0, sizeof g);
    float *dx = NULL, *dy = NULL;
    int *active = NULL, *offs = NULL, *xrow = NULL;
    cudaStream_t st = NULL;
    int rc = -1;
    std::vector<int> h_active(E, -1), h_offs(E + 1), h_xrow(n);
    h_active[0] = expert;
    for (int e = 0; e <= E; e++) h_offs[e] = e <= expert ? 0 : n;
    for (int p = 0; p < n; p++) h_xrow[p] = p;
    CKG(cudaStreamCreate(&st), "a stream");
    CKG(cudaMalloc(&dx, (size_t)x_len * 4), "x");
    CKG(cudaMalloc(&dy, (size_t)(n * n_out) * 4), "y");
    CKG(cudaMalloc(&g.a8.xr, (size_t)x_len * 4), "x forms");
    CKG(cudaMalloc(&g.a8.q, (size_t)x_len), "x forms");
    CKG(cudaMalloc(&g.a8.d, (size_t)(x_len / 32 + 1) * 4), "x forms");
    CKG(cudaMalloc(&g.a8.s, (size_t)(x_len / 16 + 1) * 4), "x forms");
    CKG(cudaMalloc(&active, (size_t)E * 4), "experts");
    CKG(cudaMalloc(&offs, (size_t)(E + 1) * 4), "experts");
    CKG(cudaMalloc(&xrow, (size_t)n * 4), "experts");
    CKG(cudaMalloc(&g.f16.x[0].p, (size_t)x_len * 6), "x parts");
    CKG(cudaMalloc(&g.f16.x[0].inv, (size_t)n * 4), "x parts");
    g.f16.st[0] = st, g.f16.x[0].cap = x_len, g.f16.x[0].rows = n;
    CKG(cudaMemcpy(dx, x, (size_t)x_len * 4, cudaMemcpyHostToDevice), "x");
    CKG(cudaMemcpy(active, h_active.data(), (size_t)E * 4, cudaMemcpyHostToDevice), "experts");
    CKG(cudaMemcpy(offs, h_offs.data(), (size_t)(E + 1) * 4, cudaMemcpyHostToDevice), "experts");
    CKG(cudaMemcpy(xrow, h_xrow.data(), (size_t)n * 4, cudaMemcpyHostToDevice), "experts");
    g_pdl = false;
    g_act8 = numerics == DS4_NUMERICS_QAT_Q8 ? &g : NULL;
    g_f16x = &g.f16;
    if (w->n_dims == 3) {
        lin_args a = {dmat_of(*dev), dev->ne[1] * dev->row_bytes, dx, n_in, dy, n_out, n, active, offs, xrow,
                      0, 0, 0, 0, 0};
        run_linear(st, a, n, 1);
    } else if (parts > 1) {
        dmat part = dmat_of(*dev);
        part.n_out /= parts;
        linear_batched(st, part, parts, part.n_out * part.row_bytes, dx, shared_x ? 0 : n_in,
                       shared_x ? n_in : parts * n_in, n, dy, part.n_out, n_out);
    } else {
        linear(st, dmat_of(*dev), dx, n_in, n, dy, n_out);
    }
    g_act8 = NULL;
    g_f16x = NULL;
    CKG(cudaGetLastError(), "the product");
    CKG(cudaMemcpyAsync(y, dy, (size_t)(n * n_out) * 4, cudaMemcpyDeviceToHost, st), "y");
    CKG(cudaStreamSynchronize(st), "the product");
    rc = 0;
out:
    for (void *p : {(void *)dx, (void *)dy, (void *)g.a8.xr, (void *)g.a8.q, (void *)g.a8.d, (void *)g.a8.s,
                    (void *)active, (void *)offs, (void *)xrow, (void *)g.f16.x[0].p, (void *)g.f16.x[0].inv})
        cudaFree(p);
    if (st) cudaStreamDestroy(st);
    return rc;
}

static int copy_bandwidth(int64_t nbytes, int repeats, double *out, char *err, size_t errlen);

/* ds4_session_kv_bytes as stored here: window rows as float32, compressed
 * rows compact in qat sessions (kv_compact.cuh), float32 otherwise. */
static int64_t kv_bytes(const ds4_session *s) {
    const ds4_config *cf = &s->model->cfg;
    const dsess *g = (const dsess *)s->backend_state;
    int64_t T = s->n_tokens, bytes = 0;
    int64_t row = g->compact ? g->kv8.bytes : cf->head_dim * 4, idx_row = g->compact ? g->kv4.bytes : cf->indexer_dim * 4;
    for (int l = 0; l < cf->n_layer; l++) {
        const ds4_layer_state *ls = &s->layers[l];
        bytes += std::min<int64_t>(T, cf->sliding_window) * cf->head_dim * 4;
        if (!ls->ratio) continue;
        bytes += T / ls->ratio * row;
        if (ls->indexer) bytes += T / ls->ratio * idx_row;
    }
    return bytes;
}

static const ds4_backend CUDA_BACKEND = {
    DS4_BACKEND_ABI, "cuda",        CUDA_PREFILL_CHUNK,          model_init,     model_free,
    session_init,    session_free,  forward,       state_to_host,  state_from_host,
    copy_bandwidth,  product,       kv_bytes,      decode_greedy, decode_sampled,
};

extern "C" __attribute__((visibility("default"))) const ds4_backend *ds4_backend_entry(void) {
    return &CUDA_BACKEND;
}

/* Device-to-device copy bandwidth for ds4.bench's decode bound: bytes read +
 * written per second by the best of `repeats` copies of nbytes, after one
 * untimed copy. */
static int copy_bandwidth(int64_t nbytes, int repeats, double *out, char *err, size_t errlen) {
    void *src = NULL, *dst = NULL;
    cudaEvent_t ev[2] = {NULL, NULL};
    cudaStream_t st = NULL;
    float best = 0;
    int rc = -1;

    CKG(cudaMalloc(&src, (size_t)nbytes), "allocating the copy-bandwidth buffers");
    CKG(cudaMalloc(&dst, (size_t)nbytes), "allocating the copy-bandwidth buffers");
    CKG(cudaMemset(src, 1, (size_t)nbytes), "copy bandwidth");
    CKG(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking), "copy bandwidth");
    for (int i = 0; i < 2; i++) CKG(cudaEventCreate(&ev[i]), "copy bandwidth");
    for (int r = 0; r <= repeats; r++) {
        float ms;
        CKG(cudaEventRecord(ev[0], st), "copy bandwidth");
        CKG(cudaMemcpyAsync(dst, src, (size_t)nbytes, cudaMemcpyDeviceToDevice, st), "copy bandwidth");
        CKG(cudaEventRecord(ev[1], st), "copy bandwidth");
        CKG(cudaEventSynchronize(ev[1]), "copy bandwidth");
        CKG(cudaEventElapsedTime(&ms, ev[0], ev[1]), "copy bandwidth");
        if (r > 0 && (best == 0 || ms < best)) best = ms;
    }
    *out = 2.0 * (double)nbytes / (best * 1e-3);
    rc = 0;
out:
    for (int i = 0; i < 2; i++)
        if (ev[i]) cudaEventDestroy(ev[i]);
    if (st) cudaStreamDestroy(st);
    cudaFree(src);
    cudaFree(dst);
    return rc;
}
