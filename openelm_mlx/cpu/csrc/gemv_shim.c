/* cblas_sgemm in front of the optimized BLAS that openelm_mlx.cpu.blas preloads for MLX's CPU backend.
 *
 * MLX computes every float32 matmul with cblas_sgemm, decode's products with a few rows included (M == 1 for one
 * sequence, M == the batch size when the server decodes several). OpenBLAS (0.3.21, Debian 12) packs the whole
 * weight matrix for such a call, so it reads each weight twice and a few-row product costs several vector-matrix
 * products (one-off, 10240 x 1280 weight: M = 2 five times M = 1, M = 4 about as much as M = 16).
 * This library is loaded globally before the BLAS, so libmlx binds this cblas_sgemm:
 * - Linear-layout products (b transposed) with min_m <= M <= max_m (openelm_gemv_shim_configure) go to the kernel
 *   below, which reads each weight row once and computes all M outputs from it (float32 accumulation; AVX2 + FMA
 *   where the CPU has them, by run-time dispatch, else portable C), split over the thread pool of pool.h;
 * - other row-major products with M == 1 go to the BLAS's cblas_sgemv (it streams the matrix once);
 * - other row-major products, with openelm_gemv_shim_split(threads > 1), go to the BLAS's cblas_sgemm in blocks
 *   of output columns split over this library's pool, the BLAS itself set to one thread: one set of threads for
 *   every product (not OpenBLAS's, which wait for each other with sched_yield, and whose fixed shares wait for a
 *   thread another process keeps off its core);
 * - everything else goes to the BLAS's cblas_sgemm, unchanged.
 * An output element is computed by one thread in an order that depends on k only (not on M, its tile or the thread
 * count): a row of a batched product equals that row computed alone, bit for bit. Built by openelm_mlx.cpu.blas
 * with the system C compiler on first use; it exports cblas_sgemm and its own openelm_* functions. */
#define _GNU_SOURCE /* RTLD_NEXT */
#include <dlfcn.h>
#include <stdlib.h>
#include <string.h>

#include "pool.h"

#define EXPORT __attribute__((visibility("default")))

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };
enum { VAR_PORTABLE = 1, VAR_AVX2 = 2 };
#define MAX_M 64 /* the most rows openelm_gemv_shim_configure accepts */

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *, int, float,
                         float *, int);
typedef void (*sgemv_fn)(int, int, int, int, float, const float *, int, const float *, int, float, float *, int);

static sgemm_fn blas_sgemm;
static sgemv_fn blas_sgemv;
static void (*blas_set_threads)(int);
static int split_threads = 1; /* > 1: large products split by columns over the pool (openelm_gemv_shim_split) */
static long sgemv_calls, kernel_calls, split_calls;
static int kernel_min_m = 1, kernel_max_m, kernel_threads = 1, kernel_variant;

/* Bind the BLAS at `path`; 0 on success. Call it before this library enters the global scope: a cblas_sgemm
 * with nothing bound behind it must never be reachable. */
EXPORT int openelm_gemv_shim_init(const char *path) {
    void *lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!lib) return 1;
    sgemm_fn sgemm = (sgemm_fn)dlsym(lib, "cblas_sgemm");
    sgemv_fn sgemv = (sgemv_fn)dlsym(lib, "cblas_sgemv");
    if (!sgemm || !sgemv) return 2;
    blas_sgemm = sgemm;
    blas_sgemv = sgemv;
    blas_set_threads = (void (*)(int))dlsym(lib, "openblas_set_num_threads");
    return 0;
}

/* Split large row-major products by output columns over `threads` threads of the pool, the BLAS set to one thread
 * (needs OpenBLAS's openblas_set_num_threads); threads <= 1 leaves them to the BLAS. Returns the threads used. Call
 * it before the library is promoted to the global scope. */
EXPORT int openelm_gemv_shim_split(int threads) {
    if (threads <= 1 || !blas_set_threads) {
        split_threads = 1;
        return 1;
    }
    blas_set_threads(1);
    split_threads = threads > MAX_HELPERS + 1 ? MAX_HELPERS + 1 : threads;
    return split_threads;
}

/* Linear-layout products (b transposed) with min_m <= M <= max_m rows go to the kernel `variant` (0: the best this
 * CPU has) on `threads` threads; max_m == 0 (the default) sends none. M == 1 products the kernel does not take go to
 * sgemv. Call it before the library is promoted to the global scope. */
EXPORT void openelm_gemv_shim_configure(int min_m, int max_m, int threads, int variant) {
    kernel_min_m = min_m < 1 ? 1 : min_m;
    kernel_max_m = max_m < 0 ? 0 : max_m > MAX_M ? MAX_M : max_m;
    kernel_threads = threads < 1 ? 1 : threads > MAX_HELPERS + 1 ? MAX_HELPERS + 1 : threads;
    kernel_variant = variant;
}

/* How many calls went to sgemv (which == 0), to the kernel (1) or were split over the pool (2); tests read them to
 * see that the shim is the cblas_sgemm MLX calls and which way a product went. */
EXPORT long openelm_gemv_shim_forwarded(int which) {
    return __atomic_load_n(which == 2 ? &split_calls : which ? &kernel_calls : &sgemv_calls, __ATOMIC_RELAXED);
}

/* ---- The small-M kernel ----
 * c (m x n) = alpha * x (m x k) @ b.T + beta * c for b stored n x k (a Linear's weight), row-major, x's rows
 * contiguous (stride ldx): output column j is the dot products of b's row j with x's rows. beta == 0 never reads c
 * (BLAS semantics: c may hold NaN). The other layout (b stored k x n) stays with the BLAS: OpenBLAS does not pack
 * for it, and a column-block kernel here was 1.5-3x slower than its sgemm (one-off, one thread). */
typedef struct job {
    const float *x, *b;
    float *c;
    int m, n, k, ldx, ldb, ldc, unit_cols;
    float alpha, beta;
    void (*cols)(const struct job *, int j0, int j1);
} job_t;

static inline void put(const job_t *J, int i, int j, float s) {
    float *out = J->c + (size_t)i * J->ldc + j;
    *out = J->beta == 0.0f ? J->alpha * s : J->alpha * s + J->beta * *out;
}

/* Portable kernel: 8 partial sums per dot product (a shape compilers vectorise), the same for every tile. */
static void nt_portable(const job_t *J, int j0, int j1) {
    const int k8 = J->k & ~7;
    for (int j = j0; j < j1; j++) {
        const float *w = J->b + (size_t)j * J->ldb;
        for (int i = 0; i < J->m; i++) {
            const float *x = J->x + (size_t)i * J->ldx;
            float acc[8] = {0};
            for (int kk = 0; kk < k8; kk += 8)
                for (int l = 0; l < 8; l++) acc[l] += w[kk + l] * x[kk + l];
            float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
            for (int kk = k8; kk < J->k; kk++) s += w[kk] * x[kk];
            put(J, i, j, s);
        }
    }
}

#if defined(__x86_64__)
#define AVX2 __attribute__((target("avx2,fma")))

AVX2 static inline float hsum8(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
    return _mm_cvtss_f32(h);
}

#ifndef NT_R
#define NT_R 3  /* weight rows per tile (3 x 4 accumulators + 3 weight vectors + 1 of x: the 16 registers) */
#endif
#ifndef NT_MT
#define NT_MT 4 /* rows of x per tile */
#endif

/* R weight rows (j..j+R-1) times MT rows of x (i..i+MT-1): R * MT accumulators of 8 lanes. The loops over r and t
 * have constant bounds at every call, so they unroll and the accumulators stay in registers. */
AVX2 __attribute__((always_inline)) static inline void nt_tile(const job_t *J, int j, int i, const int R,
                                                                const int MT) {
    const int k = J->k, k8 = k & ~7;
    const float *w[NT_R], *x[NT_MT];
    __m256 acc[NT_R][NT_MT];
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) w[r] = J->b + (size_t)(j + r) * J->ldb;
#pragma GCC unroll 8
    for (int t = 0; t < MT; t++) x[t] = J->x + (size_t)(i + t) * J->ldx;
#pragma GCC unroll 8
    for (int r = 0; r < R; r++)
#pragma GCC unroll 8
        for (int t = 0; t < MT; t++) acc[r][t] = _mm256_setzero_ps();
    for (int kk = 0; kk < k8; kk += 8) {
        __m256 wv[NT_R];
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) wv[r] = _mm256_loadu_ps(w[r] + kk);
#pragma GCC unroll 8
        for (int t = 0; t < MT; t++) {
            const __m256 xv = _mm256_loadu_ps(x[t] + kk);
#pragma GCC unroll 8
            for (int r = 0; r < R; r++) acc[r][t] = _mm256_fmadd_ps(wv[r], xv, acc[r][t]);
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; r++)
#pragma GCC unroll 8
        for (int t = 0; t < MT; t++) {
            float s = hsum8(acc[r][t]);
            for (int kk = k8; kk < k; kk++) s = __builtin_fmaf(w[r][kk], x[t][kk], s);
            put(J, i + t, j + r, s);
        }
}

/* Weight rows j..j+R-1 times every row of x: whole tiles of NT_MT rows, then one tile of the rest. */
#define NT_ALL_ROWS(R)                                                                                             \
    do {                                                                                                           \
        int i = 0;                                                                                                 \
        for (; i + NT_MT <= J->m; i += NT_MT) nt_tile(J, j, i, R, NT_MT);                                          \
        switch (J->m - i) {                                                                                        \
        case 1: nt_tile(J, j, i, R, 1); break;                                                                     \
        case 2: if (NT_MT > 2) nt_tile(J, j, i, R, 2); break;                                                      \
        case 3: if (NT_MT > 3) nt_tile(J, j, i, R, 3); break;                                                      \
        case 4: if (NT_MT > 4) nt_tile(J, j, i, R, 4); break;                                                      \
        case 5: if (NT_MT > 5) nt_tile(J, j, i, R, 5); break;                                                      \
        }                                                                                                          \
    } while (0)

AVX2 static void nt_avx2(const job_t *J, int j0, int j1) {
    int j = j0;
    for (; j + NT_R <= j1; j += NT_R) NT_ALL_ROWS(NT_R);  /* the R weight rows stay in cache while x passes */
    switch (j1 - j) {
    case 1: NT_ALL_ROWS(1); break;
    case 2: if (NT_R > 2) NT_ALL_ROWS(2); break;
    case 3: if (NT_R > 3) NT_ALL_ROWS(3); break;
    }
}

#endif

/* Bit mask of the kernels this CPU can run (VAR_*). */
EXPORT int openelm_smallm_variants(void) {
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return VAR_PORTABLE | VAR_AVX2;
#endif
    return VAR_PORTABLE;
}

static void run_unit(const void *ctx, int unit) {
    const job_t *J = ctx;
    const int j0 = unit * J->unit_cols, j1 = j0 + J->unit_cols < J->n ? j0 + J->unit_cols : J->n;
    J->cols(J, j0, j1);
}

/* The small-M product with BLAS arguments, on `threads` threads, with kernel `variant` (0: the best this CPU has).
 * Returns 0, 1 for arguments it does not take (column-major, b not transposed, m outside 1..MAX_M, n or k < 1,
 * alpha == 0, a leading dimension too small), 2 for an allocation failure, 3 for a variant this CPU lacks. */
EXPORT int openelm_smallm_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha, const float *a,
                                int lda, const float *b, int ldb, float beta, float *c, int ldc, int threads,
                                int variant) {
    if (order != ROW_MAJOR || trans_b != TRANS || m < 1 || m > MAX_M || n < 1 || k < 1 || alpha == 0.0f) return 1;
    if ((trans_a == NO_TRANS ? lda < k : lda < m) || ldb < k || ldc < n) return 1;
    const int have = openelm_smallm_variants();
    if (variant == 0) variant = have & VAR_AVX2 ? VAR_AVX2 : VAR_PORTABLE;
    if (!(have & variant) || (variant != VAR_AVX2 && variant != VAR_PORTABLE)) return 3;
    job_t J = {.x = a, .b = b, .c = c, .m = m, .n = n, .k = k, .ldx = lda, .ldb = ldb, .ldc = ldc, .alpha = alpha,
               .beta = beta, .cols = nt_portable};
    float *packed = NULL;
    if (trans_a != NO_TRANS) {  /* a is stored k x m: copy x's rows out once (m * k floats) */
        packed = malloc(sizeof(float) * (size_t)m * k);
        if (!packed) return 2;
        for (int i = 0; i < m; i++)
            for (int kk = 0; kk < k; kk++) packed[(size_t)i * k + kk] = a[(size_t)kk * lda + i];
        J.x = packed;
        J.ldx = k;
    }
#if defined(__x86_64__)
    if (variant == VAR_AVX2) J.cols = nt_avx2;
#endif
    const int cols = pool_unit_rows(n, k, threads); /* pool.h's split: a few long spans of the weight a thread */
    J.unit_cols = cols < n ? cols : n;
    run_parallel(run_unit, &J, (n + J.unit_cols - 1) / J.unit_cols, threads);
    free(packed);
    return 0;
}

/* ---- large products: the BLAS's sgemm on blocks of output columns, one block a unit ---- */
#define SPLIT_MIN_COLS 128 /* columns a unit takes at least (narrower blocks lose the BLAS's blocking) */

typedef struct {
    int trans_a, trans_b, m, n, k, lda, ldb, ldc, cols;
    float alpha, beta;
    const float *a, *b;
    float *c;
} split_t;

static void split_unit(const void *ctx, int unit) {
    const split_t *s = ctx;
    const int j0 = unit * s->cols, j1 = j0 + s->cols < s->n ? j0 + s->cols : s->n;
    const float *b = s->trans_b == TRANS ? s->b + (size_t)j0 * s->ldb : s->b + j0; /* columns j0.. of op(b) */
    blas_sgemm(ROW_MAJOR, s->trans_a, s->trans_b, s->m, j1 - j0, s->k, s->alpha, s->a, s->lda, b, s->ldb, s->beta,
               s->c + j0, s->ldc);
}

static int split_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha, const float *a,
                       int lda, const float *b, int ldb, float beta, float *c, int ldc) {
    if (split_threads <= 1 || order != ROW_MAJOR || n < 2 * SPLIT_MIN_COLS || m < 1 || k < 1 || !blas_sgemm)
        return 1;
    int cols = (n + split_threads * POOL_UNITS_PER_THREAD - 1) / (split_threads * POOL_UNITS_PER_THREAD);
    cols = cols < SPLIT_MIN_COLS ? SPLIT_MIN_COLS : (cols + 15) / 16 * 16;
    const split_t s = {trans_a, trans_b, m, n, k, lda, ldb, ldc, cols, alpha, beta, a, b, c};
    run_parallel(split_unit, &s, (n + cols - 1) / cols, split_threads);
    __atomic_add_fetch(&split_calls, 1, __ATOMIC_RELAXED);
    return 0;
}

EXPORT void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha, const float *a,
                        int lda, const float *b, int ldb, float beta, float *c, int ldc) {
    if (m >= kernel_min_m && m <= kernel_max_m &&
        openelm_smallm_sgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, kernel_threads,
                             kernel_variant) == 0) {
        __atomic_add_fetch(&kernel_calls, 1, __ATOMIC_RELAXED);
        return;
    }
    if (order == ROW_MAJOR && m == 1 && n > 0 && k > 0 && blas_sgemv) {
        /* c (1 x n) = alpha * x (1 x k) @ op(b) (k x n) + beta * c. x is a's single row (stride 1) or, when a is
         * transposed (stored k x 1), its column (stride lda). */
        int incx = trans_a == NO_TRANS ? 1 : lda;
        if (beta == 0.0f) memset(c, 0, sizeof(float) * (size_t)n);  /* BLAS semantics: c is not read */
        if (trans_b == TRANS)  /* b stored n x k: c = b @ x */
            blas_sgemv(ROW_MAJOR, NO_TRANS, n, k, alpha, b, ldb, a, incx, beta, c, 1);
        else  /* b stored k x n: c = b^T @ x */
            blas_sgemv(ROW_MAJOR, TRANS, k, n, alpha, b, ldb, a, incx, beta, c, 1);
        __atomic_add_fetch(&sgemv_calls, 1, __ATOMIC_RELAXED);
        return;
    }
    if (!blas_sgemm) blas_sgemm = (sgemm_fn)dlsym(RTLD_NEXT, "cblas_sgemm");
    if (split_sgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc) == 0) return;
    blas_sgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
