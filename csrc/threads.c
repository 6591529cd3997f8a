/* A persistent thread pool: workers sleep on a condition variable between
 * jobs, so a parallel loop costs one wake-up, not thread creation. */
#include "threads.h"

#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>

struct ds4_pool {
    int n_threads;                 /* including the caller */
    pthread_t *workers;
    pthread_mutex_t mu;
    pthread_cond_t start, done;
    uint64_t generation;           /* bumped for each job */
    int pending;                   /* workers still running the job */
    int quit;
    /* the job */
    ds4_range_fn fn;
    void *ctx;
    int64_t n, slice;
};

struct worker_arg {
    ds4_pool *p;
    int index;
};

static void run_slice(ds4_pool *p, int index) {
    int64_t begin = (int64_t)index * p->slice;
    int64_t end = begin + p->slice < p->n ? begin + p->slice : p->n;
    if (begin < end) p->fn(p->ctx, begin, end, index);
}

static void *worker_main(void *arg_) {
    struct worker_arg *arg = arg_;
    ds4_pool *p = arg->p;
    int index = arg->index;
    free(arg);
    uint64_t seen = 0;
    pthread_mutex_lock(&p->mu);
    for (;;) {
        while (!p->quit && p->generation == seen) pthread_cond_wait(&p->start, &p->mu);
        if (p->quit) break;
        seen = p->generation;
        pthread_mutex_unlock(&p->mu);
        run_slice(p, index);
        pthread_mutex_lock(&p->mu);
        if (--p->pending == 0) pthread_cond_signal(&p->done);
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

ds4_pool *ds4_pool_new(int n_threads) {
    if (n_threads <= 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        n_threads = n > 0 ? (int)n : 1;
    }
    ds4_pool *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    p->n_threads = n_threads;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->start, NULL);
    pthread_cond_init(&p->done, NULL);
    p->workers = calloc((size_t)n_threads, sizeof *p->workers);
    if (!p->workers) {
        free(p);
        return NULL;
    }
    for (int i = 1; i < n_threads; i++) {
        struct worker_arg *arg = malloc(sizeof *arg);
        if (arg) {
            arg->p = p;
            arg->index = i;
        }
        if (!arg || pthread_create(&p->workers[i], NULL, worker_main, arg) != 0) {
            free(arg);
            p->n_threads = i;   /* run with the threads we got */
            break;
        }
    }
    return p;
}

void ds4_pool_free(ds4_pool *p) {
    if (!p) return;
    pthread_mutex_lock(&p->mu);
    p->quit = 1;
    pthread_cond_broadcast(&p->start);
    pthread_mutex_unlock(&p->mu);
    for (int i = 1; i < p->n_threads; i++) pthread_join(p->workers[i], NULL);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->start);
    pthread_cond_destroy(&p->done);
    free(p->workers);
    free(p);
}


void ds4_parallel_for(ds4_pool *p, int64_t n, int64_t grain, ds4_range_fn fn, void *ctx) {
    if (n <= 0) return;
    if (grain < 1) grain = 1;
    int threads = p ? p->n_threads : 1;
    int64_t max_useful = (n + grain - 1) / grain;
    if (threads > max_useful) threads = (int)max_useful;
    if (threads <= 1) {
        fn(ctx, 0, n, 0);
        return;
    }
    pthread_mutex_lock(&p->mu);
    p->fn = fn;
    p->ctx = ctx;
    p->n = n;
    p->slice = (n + threads - 1) / threads;
    /* Every worker wakes; those past the last slice find it empty. */
    p->pending = p->n_threads - 1;
    p->generation++;
    pthread_cond_broadcast(&p->start);
    pthread_mutex_unlock(&p->mu);
    run_slice(p, 0);
    pthread_mutex_lock(&p->mu);
    while (p->pending > 0) pthread_cond_wait(&p->done, &p->mu);
    pthread_mutex_unlock(&p->mu);
}
