/* Token sampling (prompt-and-server.md §6): temperature, top-k, min-p, top-p
 * in that order, with a seeded xorshift64* generator, so a seed gives the
 * same tokens on every backend. */
#ifndef DS4_SAMPLE_H
#define DS4_SAMPLE_H

#include <stdint.h>

typedef struct {
    float temperature;   /* <= 0: greedy (first maximal index) */
    int32_t top_k;       /* 0: off; capped at 1024 */
    float top_p;         /* outside (0, 1]: 1 */
    float min_p;         /* relative to the top token; < 0: 0 */
    uint64_t rng;        /* xorshift64* state */
} ds4_sampler;

void ds4_sampler_init(ds4_sampler *s, float temperature, int32_t top_k, float top_p, float min_p,
                      uint64_t seed);
/* Next draw in [0, 1): the top 24 bits of the generator's output. */
float ds4_sampler_uniform(ds4_sampler *s);
/* The greedy choice: the first index of the largest finite logit other than
 * `except` (-1: none excepted); -1 when there is none. */
int32_t ds4_argmax_except(const float *logits, int64_t n, int32_t except);
/* Whether draws keep only the tokens whose weight reaches min_p > 0 (§6
 * step 4: top-k off, top-p 1, temperature > 0; the default sampler): few
 * where the logits are peaked, the draws a GPU makes on its own. */
int ds4_sampler_min_p_only(const ds4_sampler *s);
/* A token id from n logits; -1 when no logit is finite. */
int32_t ds4_sample(ds4_sampler *s, const float *logits, int64_t n);

#endif
