/* Token sampling: temperature -> top-k -> min-p -> top-p, then a draw. */
#include "sample.h"

#include "sample_weight.h"

#include <math.h>
#include <stdlib.h>

#define MAX_TOP_K 1024

void ds4_sampler_init(ds4_sampler *s, float temperature, int32_t top_k, float top_p, float min_p,
                      uint64_t seed) {
    s->temperature = temperature;
    s->top_k = top_k < 0 ? 0 : top_k > MAX_TOP_K ? MAX_TOP_K : top_k;
    s->top_p = (top_p > 0 && top_p <= 1) ? top_p : 1.0f;
    s->min_p = min_p > 0 ? min_p : 0.0f;
    s->rng = seed ? seed : 0x9E3779B97F4A7C15ull;
}

static uint64_t xorshift64star(ds4_sampler *s) {
    s->rng = ds4_sample_rng_next(s->rng);
    return ds4_sample_rng_out(s->rng);
}

float ds4_sampler_uniform(ds4_sampler *s) {
    return (float)(xorshift64star(s) >> 40) / 16777216.0f;
}

/* The finiteness test only where a logit beats the maximum so far (+inf
 * does; NaN and -inf never do). */
int32_t ds4_argmax_except(const float *logits, int64_t n, int32_t except) {
    int32_t best = -1;
    float top = -INFINITY;
    for (int64_t i = 0; i < n; i++)
        if (logits[i] > top && isfinite(logits[i]) && i != except) top = logits[i], best = (int32_t)i;
    return best;
}

struct cand {
    float logit;
    int32_t id;
};

static int by_logit_desc(const void *pa, const void *pb) {
    const struct cand *a = pa, *b = pb;
    if (a->logit != b->logit) return a->logit > b->logit ? -1 : 1;
    return (a->id > b->id) - (a->id < b->id);
}

/* a ranks before b in the candidates' order: larger logit, then smaller id */
static int ranks_before(struct cand a, struct cand b) {
    return a.logit > b.logit || (a.logit == b.logit && a.id < b.id);
}

/* The k finite logits that rank first, sorted into c; returns how many
 * (fewer when fewer are finite). A heap holds the best k so far with the
 * last-ranked at its root, so most logits cost one comparison: sorting the
 * whole vocabulary took ~20 ms a token. */
static int64_t top_candidates(const float *logits, int64_t n, int64_t k, struct cand *c) {
    int64_t m = 0;
    for (int64_t i = 0; i < n; i++) {
        if (!isfinite(logits[i])) continue;
        struct cand v = {logits[i], (int32_t)i};
        int64_t at;
        if (m < k) {   /* sift up: a parent ranks after its children */
            for (at = m++; at > 0 && ranks_before(c[(at - 1) / 2], v); at = (at - 1) / 2) c[at] = c[(at - 1) / 2];
        } else if (ranks_before(v, c[0])) {   /* replaces the root; sift down */
            for (at = 0;;) {
                int64_t child = 2 * at + 1;
                if (child >= m) break;
                if (child + 1 < m && ranks_before(c[child], c[child + 1])) child++;
                if (!ranks_before(v, c[child])) break;
                c[at] = c[child];
                at = child;
            }
        } else {
            continue;
        }
        c[at] = v;
    }
    qsort(c, (size_t)m, sizeof *c, by_logit_desc);
    return m;
}

/* The top-k / top-p draws' weight, by libm's exp: only the host makes
 * them, and their top-p total takes every logit's weight (sample_weight.h's
 * exp, a 13-step dependent chain, doubled that draw's time). The min-p draw
 * takes ds4_sample_weight: a GPU makes it too. */
static double weight(const ds4_sampler *s, float logit, float lmax) {
    return exp((logit - lmax) / s->temperature);
}

/* The walk of §6 step 3 over c[0..m), descending, whose weights w the
 * caller filled and whose normalizing sum is total: the kept count and
 * their mass. Returns 0 when it reached the end of c without stopping
 * (the caller may have more candidates), 1 when it stopped. */
static int walk(const ds4_sampler *s, const double *w, int64_t m, double total, int64_t *kept, double *mass) {
    double p_top = w[0] / total;
    *kept = 0, *mass = 0;
    for (int64_t i = 0; i < m; i++) {
        double p = w[i] / total;
        if (i > 0 && p < p_top * s->min_p) return 1;
        *kept = i + 1;
        *mass += w[i];
        if (*mass / total >= s->top_p) return 1;
    }
    return 0;
}

static int32_t draw(ds4_sampler *s, const struct cand *c, const double *w, int64_t kept, double mass) {
    double r = ds4_sampler_uniform(s) * mass, acc = 0;
    for (int64_t i = 0; i < kept; i++) {
        acc += w[i];
        if (r < acc) return c[i].id;
    }
    return c[kept - 1].id;
}

/* §6 step 4: one pass over the vocabulary in index order, keeping w >=
 * min_p. Only logits near enough the top can pass, so those below a bound
 * (with a margin: w itself decides) skip the exp. The weights are summed
 * as sample_weight.h's fixed-point integers, which any order sums to the
 * same total, and the draw's point is taken in them: a GPU makes the same
 * draw with its threads summing in their own order (cuda/sample.cuh). */
static int32_t sample_min_p(ds4_sampler *s, const float *logits, int64_t n, int32_t top) {
    const float lmax = logits[top];
    float bound = -INFINITY;   /* rounded down from the double bound: it only skips less */
    if (s->min_p > 0) {
        double y = (double)s->temperature * log((double)s->min_p);
        double b = (double)lmax + y - (fabs(y) * 1e-4 + 1e-6);
        bound = (float)b;
        if ((double)bound > b) bound = nextafterf(bound, -INFINITY);
    }
    uint64_t total = 0;
    for (int64_t i = 0; i < n; i++) {
        if (!(logits[i] >= bound) || !isfinite(logits[i])) continue;
        double w = ds4_sample_weight(logits[i], lmax, s->temperature);
        if (w >= s->min_p) total += ds4_sample_fixed(w);
    }
    const uint64_t r = ds4_sample_point((uint32_t)(xorshift64star(s) >> 40), total);
    uint64_t acc = 0;
    int32_t last = top;
    for (int64_t i = 0; i < n; i++) {
        if (!(logits[i] >= bound) || !isfinite(logits[i])) continue;
        double w = ds4_sample_weight(logits[i], lmax, s->temperature);
        if (w < s->min_p) continue;
        acc += ds4_sample_fixed(w);
        last = (int32_t)i;
        if (r < acc) return (int32_t)i;
    }
    return last;
}

/* §6 steps 3 and 5 on the best candidates only: top-k's k, or for top-p
 * alone a growing prefix of the sorted vocabulary (64, then 4x) until the
 * walk stops inside it; top-p normalizes by every finite logit's weight,
 * summed in index order. */
static int32_t sample_sorted(ds4_sampler *s, const float *logits, int64_t n, int32_t top) {
    double total = 0;
    int64_t k = s->top_k;
    if (k == 0) {
        k = 64;
        for (int64_t i = 0; i < n; i++)
            if (isfinite(logits[i])) total += weight(s, logits[i], logits[top]);
    }
    for (;;) {
        struct cand *c = malloc((size_t)k * sizeof *c);
        double *w = malloc((size_t)k * sizeof *w);
        if (!c || !w) {
            free(c), free(w);
            return top;
        }
        int64_t m = top_candidates(logits, n, k, c), kept;
        double mass;
        for (int64_t i = 0; i < m; i++) w[i] = weight(s, c[i].logit, c[0].logit);
        if (s->top_k > 0) {
            total = 0;
            for (int64_t i = 0; i < m; i++) total += w[i];
        }
        if (walk(s, w, m, total, &kept, &mass) || m < k || k >= n || s->top_k > 0) {
            int32_t id = draw(s, c, w, kept, mass);
            free(c), free(w);
            return id;
        }
        free(c), free(w);
        k = 4 * k < n ? 4 * k : n;
    }
}

int ds4_sampler_min_p_only(const ds4_sampler *s) {
    return ds4_sampler_takes_min_p_only(s->temperature, s->top_k, s->top_p, s->min_p);
}

int32_t ds4_sample(ds4_sampler *s, const float *logits, int64_t n) {
    int32_t top = ds4_argmax_except(logits, n, -1);
    if (top < 0 || s->temperature <= 0) return top;
    if (s->top_k == 0 && s->top_p >= 1.0f) return sample_min_p(s, logits, n, top);
    return sample_sorted(s, logits, n, top);
}
