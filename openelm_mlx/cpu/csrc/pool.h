/* A small thread pool for the csrc/ kernels (qgemv.c, gemv_shim.c): run_parallel(fn, ctx, total, threads) calls
 * fn(ctx, unit) for every unit in [0, total) over the caller and up to threads - 1 helper threads. Each including
 * file gets its own pool (static storage). Needs -pthread. */
#ifndef OPENELM_POOL_H
#define OPENELM_POOL_H

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <time.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#elif defined(__aarch64__)
#define cpu_relax() __asm__ __volatile__("yield")
#else
#define cpu_relax() ((void)0)
#endif

/* ---- The thread pool ----
 * OpenMP's static split (and llama.cpp's spinning pool) waits for every thread's share: when another process holds
 * a core, a share's thread runs a scheduler time slice later, and the call with it (decode collapsed to a fraction
 * of its one-thread speed on a busy machine). Here the caller publishes a job of `total` units (blocks of rows),
 * works on it itself, and helpers that are awake take units one at a time (a compare-and-swap on one word holding
 * the job's generation and next unit): a helper that never got a core takes nothing, and the caller waits only
 * for units being computed. Helpers spin a bounded SPIN_NS for the next job (decode's calls come every ~0.1 ms),
 * then sleep on a condition variable; no thread spins without bound. A forked child has no helpers: its caller
 * does every unit (still correct). */

#define SPIN_NS 50000L  /* how long an idle helper polls for the next job before it sleeps */
#define MAX_HELPERS 15
#define CLOSED 0xFFFFFFFFu /* the unit index while a job's parameters are being written */

typedef void (*unit_fn)(const void *ctx, int unit);

static struct {
    _Atomic unsigned long long word;  /* generation << 32 | next unit */
    _Atomic unsigned gen;
    _Atomic(unit_fn) fn;
    _Atomic(const void *) ctx;
    _Atomic int total, done, sleepers;
    int helpers;  /* started; changed by the caller only */
    pthread_mutex_t caller, mu;
    pthread_cond_t cv;
} pool = {.caller = PTHREAD_MUTEX_INITIALIZER, .mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};

static long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

/* Take and run units of generation g until none is left. The parameters read before a successful claim belong to
 * generation g: a new job first closes the word (exchange), so a claim on g's word fails once they change. */
static void work(unsigned g) {
    for (;;) {
        unsigned long long w = atomic_load(&pool.word);
        const unsigned i = (unsigned)w;
        if ((unsigned)(w >> 32) != g || i == CLOSED) return;
        const unit_fn fn = atomic_load_explicit(&pool.fn, memory_order_relaxed);
        const void *ctx = atomic_load_explicit(&pool.ctx, memory_order_relaxed);
        if ((int)i >= atomic_load_explicit(&pool.total, memory_order_relaxed)) return;
        if (!atomic_compare_exchange_weak(&pool.word, &w, w + 1)) continue;
        fn(ctx, (int)i);
        atomic_fetch_add_explicit(&pool.done, 1, memory_order_release);
    }
}

static void *helper(void *arg) {
    unsigned seen = (unsigned)(unsigned long)arg;
    for (;;) {
        unsigned g;
        long start = 0;
        for (int spins = 0; (g = atomic_load(&pool.gen)) == seen; spins++) {
            if ((spins & 63) == 0) {
                const long t = now_ns();
                if (!start) start = t;
                if (t - start < SPIN_NS) continue;
                pthread_mutex_lock(&pool.mu);
                atomic_fetch_add(&pool.sleepers, 1);
                while (atomic_load(&pool.gen) == seen) pthread_cond_wait(&pool.cv, &pool.mu);
                atomic_fetch_sub(&pool.sleepers, 1);
                pthread_mutex_unlock(&pool.mu);
                start = 0;
            } else {
                cpu_relax();
            }
        }
        seen = g;
        work(g);
    }
    return NULL;
}

/* fork: the prepare handler takes the pool's locks, so no other thread holds them at the fork; the child has none
 * of the helpers and a copy of their waits on the condition variable, so it starts over with fresh ones. */
static void lock_pool_for_fork(void) {
    pthread_mutex_lock(&pool.caller);
    pthread_mutex_lock(&pool.mu);
}
static void unlock_pool_in_parent(void) {
    pthread_mutex_unlock(&pool.mu);
    pthread_mutex_unlock(&pool.caller);
}
static void reset_pool_in_child(void) {
    pool.helpers = 0;
    atomic_store(&pool.sleepers, 0);
    pthread_mutex_init(&pool.caller, NULL);
    pthread_mutex_init(&pool.mu, NULL);
    pthread_cond_init(&pool.cv, NULL);
}

static void register_fork_handlers(void) {
    pthread_atfork(lock_pool_for_fork, unlock_pool_in_parent, reset_pool_in_child);
}

/* Weight rows per unit of an n x k product split over `threads`: about 64K weights, or more so that each thread
 * gets about POOL_UNITS_PER_THREAD contiguous spans of the weight. Long sequential spans are what the hardware
 * prefetchers stream from memory: with 64K-weight units taken alternately by two threads, a 4-bit 270M model's
 * projections ran at 8.5 ms a token on 2 threads against 9.6 on 1; with spans of n / 8 rows, ~6 ms (one-off, idle,
 * a 2-core AMD EPYC). A few units per thread still let a thread that is off its core leave most of its share to
 * the others. */
#define POOL_UNITS_PER_THREAD 4
static inline int pool_unit_rows(int n, int k, int threads) {
    const int base = k >= 65536 ? 1 : 65536 / k;
    const int span = (n + threads * POOL_UNITS_PER_THREAD - 1) / (threads * POOL_UNITS_PER_THREAD);
    return threads > 1 && span > base ? span : base;
}

/* fn(ctx, unit) for unit in [0, total) over the caller and up to threads - 1 helpers; returns when all are done. */
/* A file whose pool other files built into the same library share defines OPENELM_POOL_SHARED before including
 * this: run_parallel then has external (still hidden) linkage, and they declare it. */
#ifdef OPENELM_POOL_SHARED
#define OPENELM_POOL_LINKAGE
#else
#define OPENELM_POOL_LINKAGE static
#endif
OPENELM_POOL_LINKAGE void run_parallel(unit_fn fn, const void *ctx, int total, int threads) {
    if (threads <= 1 || total <= 1) {
        for (int i = 0; i < total; i++) fn(ctx, i);
        return;
    }
    static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;
    pthread_once(&atfork_once, register_fork_handlers);
    pthread_mutex_lock(&pool.caller);
    const unsigned g = atomic_load(&pool.gen) + 1;
    atomic_exchange(&pool.word, ((unsigned long long)g << 32) | CLOSED);
    atomic_store_explicit(&pool.fn, fn, memory_order_relaxed);
    atomic_store_explicit(&pool.ctx, ctx, memory_order_relaxed);
    atomic_store_explicit(&pool.total, total, memory_order_relaxed);
    atomic_store_explicit(&pool.done, 0, memory_order_relaxed);
    atomic_store(&pool.word, (unsigned long long)g << 32);
    while (pool.helpers < threads - 1 && pool.helpers < MAX_HELPERS) { /* started on first need */
        pthread_t t;
        if (pthread_create(&t, NULL, helper, (void *)(unsigned long)(g - 1))) break;
        pthread_detach(t);
        pool.helpers++;
    }
    atomic_store(&pool.gen, g);
    if (atomic_load(&pool.sleepers) > 0) {
        pthread_mutex_lock(&pool.mu);
        pthread_cond_broadcast(&pool.cv);
        pthread_mutex_unlock(&pool.mu);
    }
    work(g);
    for (int spins = 0; atomic_load_explicit(&pool.done, memory_order_acquire) < total; spins++) {
        if (spins < 4096) cpu_relax();
        else sched_yield(); /* a unit's thread is off its core: let it have ours */
    }
    pthread_mutex_unlock(&pool.caller);
}

#endif /* OPENELM_POOL_H */
