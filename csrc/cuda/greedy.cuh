/* The greedy choice of a decode step on the device (ds4_argmax_except's: the
 * first index of the largest finite logit other than `except`), so that
 * ds4_session_decode_greedy's steps follow one another on the GPU: the
 * choice becomes the next step's token id and the position moves on, with
 * no copy to the host and no host decision between the steps. */
#pragma once

#include "common.cuh"

#define GREEDY_THREADS 1024
#define GREEDY_PIECE 1024   /* steps between the host's reads of the choices */

struct greedy_best {
    float v;
    int i;   /* -1: no finite logit seen */
};

/* a ranks before b: larger logit, then smaller index; an empty one last */
__device__ __forceinline__ greedy_best greedy_pick(greedy_best a, greedy_best b) {
    if (b.i < 0) return a;
    if (a.i < 0) return b;
    return (b.v > a.v || (b.v == a.v && b.i < a.i)) ? b : a;
}

/* The first largest finite logit of logits[0..n) other than `except`, in
 * every thread of a block of THREADS (warp_best: THREADS / WARP entries of
 * shared memory). */
template <int THREADS>
__device__ __forceinline__ greedy_best block_best(const float *logits, int n, int except, greedy_best *warp_best) {
    greedy_best b = {0.0f, -1};
    for (int i = threadIdx.x; i < n; i += THREADS) {
        float v = logits[i];
        if (isfinite(v) && i != except && (b.i < 0 || v > b.v)) b = {v, i};   /* i rises: ties keep the first */
    }
#pragma unroll
    for (int o = WARP / 2; o; o /= 2) {
        greedy_best other = {__shfl_xor_sync(0xffffffffu, b.v, o), __shfl_xor_sync(0xffffffffu, b.i, o)};
        b = greedy_pick(b, other);
    }
    if (threadIdx.x % WARP == 0) warp_best[threadIdx.x / WARP] = b;
    __syncthreads();
    b = warp_best[0];
    for (int w = 1; w < THREADS / WARP; w++) b = greedy_pick(b, warp_best[w]);
    return b;
}

/* One block. choices[*step] = the choice, then ++*step; the next step's id
 * (0 where there is no choice: its tokens are not counted) and position. */
__global__ void __launch_bounds__(GREEDY_THREADS) k_greedy_next(const float *logits, int n, int except,
                                                                int32_t *ids, int64_t *pos, int32_t *choices,
                                                                int *step) {
    pdl_begin();
    __shared__ greedy_best warp_best[GREEDY_THREADS / WARP];
    const greedy_best b = block_best<GREEDY_THREADS>(logits, n, except, warp_best);
    if (threadIdx.x == 0) {
        int k = *step;
        choices[k] = b.i;
        *step = k + 1;
        ids[0] = b.i < 0 ? 0 : b.i;
        *pos += 1;
    }
}
