/* Internal: a persistent pthread pool for data-parallel loops. */
#ifndef DS4_THREADS_H
#define DS4_THREADS_H

#include <stdint.h>

typedef struct ds4_pool ds4_pool;

/* fn(ctx, begin, end, thread index) runs over a slice of [0, n). */
typedef void (*ds4_range_fn)(void *ctx, int64_t begin, int64_t end, int thread);

/* n_threads <= 0: one per online CPU. Returns NULL when out of memory. */
ds4_pool *ds4_pool_new(int n_threads);
void ds4_pool_free(ds4_pool *p);

/* Splits [0, n) into contiguous slices of at least `grain` items, one per
 * thread, and returns when all are done. The caller's thread works too. */
void ds4_parallel_for(ds4_pool *p, int64_t n, int64_t grain, ds4_range_fn fn, void *ctx);

#endif
