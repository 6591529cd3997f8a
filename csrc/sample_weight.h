/* The sampler's weight exp((logit - top) / temperature) from correctly
 * rounded operations only (+, *, and float's - and /), and the min-p draw's
 * integers, one definition for the host (sample.c) and the CUDA sampler
 * (cuda/sample.cuh), so that both draw the same token from the same logits
 * and seed: libm's exp and CUDA's differ in the last place on some inputs,
 * and a draw compares running sums of the weights. Not in ds4.h: cffi does
 * not read it. */
#ifndef DS4_SAMPLE_WEIGHT_H
#define DS4_SAMPLE_WEIGHT_H

#include <stdint.h>
#include <string.h>

#ifdef __CUDACC__
#define DS4_HOST_DEVICE __host__ __device__
#else
#define DS4_HOST_DEVICE
#endif

/* Each operation rounded on its own: the host build has -ffp-contract=off
 * (ds4/_build.py); nvcc contracts a * b + c unless told, so the device takes
 * the _rn intrinsics, which it never fuses. */
#ifdef __CUDA_ARCH__
#define DS4_DMUL(a, b) __dmul_rn((a), (b))
#define DS4_DADD(a, b) __dadd_rn((a), (b))
#define DS4_FSUB(a, b) __fsub_rn((a), (b))
#define DS4_FDIV(a, b) __fdiv_rn((a), (b))
#else
#define DS4_DMUL(a, b) ((a) * (b))
#define DS4_DADD(a, b) ((a) + (b))
#define DS4_FSUB(a, b) ((a) - (b))
#define DS4_FDIV(a, b) ((a) / (b))
#endif

/* exp(x) within ~2 ulps for x <= 0 (0 below -708, where the result would
 * leave the normal range; a weight that small never decides a draw): x =
 * n ln2 + r, |r| <= ln2 / 2 (Cody and Waite: n ln2's high part is exact for
 * |n| < 2^11), exp(r) by its Taylor series to r^13 / 13! (truncation below
 * 2^-56), times 2^n built in the exponent bits. */
static inline DS4_HOST_DEVICE double ds4_sample_exp(double x) {
    if (!(x > -708.0)) return 0.0;
    if (x > 0.0) x = 0.0;   /* the callers' x is <= 0; a NaN never gets here */
    /* n = x / ln2 rounded to nearest even by the 1.5 * 2^52 shift */
    const double shift = 6755399441055744.0;
    const double n = DS4_DADD(DS4_DADD(DS4_DMUL(x, 1.4426950408889634), shift), -shift);
    const double r_hi = DS4_DADD(x, DS4_DMUL(-n, 6.93147180369123816490e-01));   /* exact */
    const double r = DS4_DADD(r_hi, DS4_DMUL(-n, 1.90821492927058770002e-10));
    double p = 1.0 / 6227020800.0;   /* 1 / 13! */
    p = DS4_DADD(DS4_DMUL(p, r), 1.0 / 479001600.0);
    p = DS4_DADD(DS4_DMUL(p, r), 1.0 / 39916800.0);
    p = DS4_DADD(DS4_DMUL(p, r), 1.0 / 3628800.0);
    p = DS4_DADD(DS4_DMUL(p, r), 1.0 / 362880.0);
    p = DS4_DADD(DS4_DMUL(p, r), 1.0 / 40320.0);
    p = DS4_DADD(DS4_DMUL(p, r), 1.0 / 5040.0);
    p = DS4_DADD(DS4_DMUL(p, r), 1.0 / 720.0);
    p = DS4_DADD(DS4_DMUL(p, r), 1.0 / 120.0);
    p = DS4_DADD(DS4_DMUL(p, r), 1.0 / 24.0);
    p = DS4_DADD(DS4_DMUL(p, r), 1.0 / 6.0);
    p = DS4_DADD(DS4_DMUL(p, r), 0.5);
    p = DS4_DADD(DS4_DMUL(p, r), 1.0);
    p = DS4_DADD(DS4_DMUL(p, r), 1.0);
    const uint64_t bits = (uint64_t)((int64_t)n + 1023) << 52;   /* 2^n, n >= -1022 */
#ifdef __CUDA_ARCH__
    const double scale = __longlong_as_double((long long)bits);
#else
    double scale;
    memcpy(&scale, &bits, sizeof scale);
#endif
    return DS4_DMUL(p, scale);
}

/* A weight (<= 1) as an integer in units of 2^-40, truncated: the sum of
 * a whole vocabulary's stays below 2^57, and integers sum to the same total
 * in any order. */
static inline DS4_HOST_DEVICE uint64_t ds4_sample_fixed(double w) {
    return (uint64_t)DS4_DMUL(w, 1099511627776.0);
}

/* The draw's point in [0, total): u24 / 2^24 of total (u24 < 2^24: the
 * generator's top 24 bits), floor((u24 total) / 2^24) without a 128-bit
 * product: total = hi 2^24 + lo. */
static inline DS4_HOST_DEVICE uint64_t ds4_sample_point(uint32_t u24, uint64_t total) {
    const uint64_t hi = total >> 24, lo = total & 0xffffffu;
    return (uint64_t)u24 * hi + (((uint64_t)u24 * lo) >> 24);
}

/* The sampler's xorshift64*: the state after x (a zero x, never a state,
 * taken as the default seed) and a state's output, whose top 24 bits make a
 * draw's uniform number. */
static inline DS4_HOST_DEVICE uint64_t ds4_sample_rng_next(uint64_t x) {
    if (!x) x = 0x9E3779B97F4A7C15ull;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    return x;
}

static inline DS4_HOST_DEVICE uint64_t ds4_sample_rng_out(uint64_t state) { return state * 0x2545F4914F6CDD1Dull; }

/* ds4_sampler_min_p_only (sample.h) where a backend library, which does
 * not link the core, needs it. */
static inline int ds4_sampler_takes_min_p_only(float temperature, int32_t top_k, float top_p, float min_p) {
    return temperature > 0 && top_k == 0 && top_p >= 1.0f && min_p > 0;
}

/* The weight of a logit against the top one (<= 1): the difference and the
 * quotient in float, as the sampler has always taken them. */
static inline DS4_HOST_DEVICE double ds4_sample_weight(float logit, float top, float temperature) {
    return ds4_sample_exp((double)DS4_FDIV(DS4_FSUB(logit, top), temperature));
}

#endif
