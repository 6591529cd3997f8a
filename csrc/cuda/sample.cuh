/* The draw of a min-p sampler (ds4_sampler_min_p_only: temperature and
 * min_p > 0, top-k off, top-p 1: the default one) on the device, so that
 * ds4_session_decode_sampled's steps follow one another on the GPU as greedy
 * ones do (greedy.cuh): the same token ds4_sample draws on the host from
 * the same logits and state, bit for bit. Every weight and integer is
 * sample_weight.h's, the host's own functions; the candidates are the
 * host's (a logit passes when its weight is >= min_p; the float bound here
 * only skips logits far below that, with a wider margin than sample.c's);
 * their fixed-point weights sum to the host's total in any order, so the
 * warps sum their ranges at once, and the warp whose range holds the draw's
 * point finds its token by a scan. */
#pragma once

#include "common.cuh"
#include "greedy.cuh"
#include "../sample_weight.h"

#define SAMPLE_THREADS 1024

/* A sampler in device memory: its parameters, written before the steps,
 * and its xorshift64* state, which each draw moves on. */
struct dsampler {
    float temperature, min_p;
    unsigned long long rng;
};

/* sample.c's xorshift64* (sample_weight.h's): moves x on, returns its output */
__device__ __forceinline__ unsigned long long dsampler_next(unsigned long long &x) {
    x = ds4_sample_rng_next(x);
    return ds4_sample_rng_out(x);
}

/* One block. The greedy step's bookkeeping (greedy.cuh) with the draw as
 * the choice; rngs[*step] = the state after it. */
__global__ void __launch_bounds__(SAMPLE_THREADS) k_sample_next(const float *logits, int n, dsampler *sp,
                                                                int32_t *ids, int64_t *pos, int32_t *choices,
                                                                unsigned long long *rngs, int *step) {
    pdl_begin();
    constexpr int WARPS = SAMPLE_THREADS / WARP;
    __shared__ greedy_best warp_best[WARPS];
    __shared__ unsigned long long warp_sum[WARPS];
    __shared__ int warp_last[WARPS];
    __shared__ int s_warp, s_choice;
    __shared__ unsigned long long s_base, s_point;
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;

    const greedy_best b = block_best<SAMPLE_THREADS>(logits, n, -1, warp_best);   /* ds4_argmax_except's top */
    const float T = sp->temperature, min_p = sp->min_p, lmax = b.v;
    const float y = T * logf(min_p);
    const float bound = lmax + y - (fabsf(y) * 1e-3f + 1e-5f);
    /* lane's fixed-point weight of logit i, 0 where it is no candidate */
    auto weight_of = [&](int i, int end) -> unsigned long long {
        const float v = i < end ? logits[i] : -INFINITY;
        if (!(v >= bound) || !isfinite(v)) return 0;
        const double w = ds4_sample_weight(v, lmax, T);
        return w >= (double)min_p ? ds4_sample_fixed(w) + (1ull << 63) : 0;   /* bit 63: a candidate */
    };

    /* each warp's range [w R, (w + 1) R): its weights' sum and last candidate */
    const int R = (n + WARPS * WARP - 1) / (WARPS * WARP) * WARP, end = min(n, (warp + 1) * R);
    unsigned long long sum = 0;
    int last = -1;
    if (b.i >= 0)
        for (int base = warp * R; base < end; base += WARP) {
            const unsigned long long f = weight_of(base + lane, end);
            if (f) sum += f & ~(1ull << 63), last = base + lane;
        }
#pragma unroll
    for (int o = WARP / 2; o; o /= 2) {
        sum += __shfl_xor_sync(0xffffffffu, sum, o);
        last = max(last, __shfl_xor_sync(0xffffffffu, last, o));
    }
    if (lane == 0) warp_sum[warp] = sum, warp_last[warp] = last;
    __syncthreads();

    /* the draw's point, and the warp whose range holds it */
    unsigned long long x = sp->rng;
    if (threadIdx.x == 0) {
        s_warp = -1, s_choice = b.i;   /* no finite logit: -1; no candidate: the top */
        if (b.i >= 0) {
            unsigned long long total = 0;
            for (int w = 0; w < WARPS; w++) total += warp_sum[w];
            const unsigned long long r = ds4_sample_point((uint32_t)(dsampler_next(x) >> 40), total);   /* top 24 bits */
            unsigned long long before = 0;
            for (int w = 0; w < WARPS; w++) {
                if (r < before + warp_sum[w]) {
                    s_warp = w, s_base = before, s_point = r;
                    break;
                }
                before += warp_sum[w];
            }
            if (s_warp < 0)   /* r >= total: every weight 0 (or none): the last candidate */
                for (int w = 0; w < WARPS; w++)
                    if (warp_last[w] >= 0) s_choice = warp_last[w];
        }
    }
    __syncthreads();

    /* that warp: its running sum from s_base, lane by lane, to the first
     * candidate whose sum passes the point (the host's walk) */
    if (warp == s_warp) {
        unsigned long long acc = s_base;
        const unsigned long long r = s_point;
        const int e = min(n, (warp + 1) * R);
        for (int base = warp * R; base < e; base += WARP) {
            const unsigned long long f = weight_of(base + lane, e);
            unsigned long long scan = f & ~(1ull << 63);
#pragma unroll
            for (int o = 1; o < WARP; o *= 2) {
                const unsigned long long up = __shfl_up_sync(0xffffffffu, scan, o);
                if (lane >= o) scan += up;
            }
            const unsigned hit = __ballot_sync(0xffffffffu, f && r < acc + scan);
            if (hit) {
                if (lane == 0) s_choice = base + __ffs(hit) - 1;
                break;
            }
            acc += __shfl_sync(0xffffffffu, scan, WARP - 1);
        }
    }
    __syncthreads();
    if (threadIdx.x != 0) return;
    sp->rng = x;
    const int k = *step;
    choices[k] = s_choice;
    rngs[k] = x;
    *step = k + 1;
    ids[0] = s_choice < 0 ? 0 : s_choice;
    *pos += 1;
}
