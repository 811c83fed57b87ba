/* cblas_sgemm in front of the optimized BLAS that openelm_mlx.blas preloads for MLX's CPU backend.
 *
 * MLX computes every float32 matmul with cblas_sgemm, decode's vector-matrix products (M == 1) included. OpenBLAS
 * (0.3.21, Debian 12) packs the whole weight matrix for such a call, so decode reads each weight twice and runs at
 * half its memory bandwidth; cblas_sgemv streams the matrix once (measured: 2x decode tokens/s on a 270M model).
 * This library is loaded globally before the BLAS, so libmlx binds this cblas_sgemm; row-major calls with M == 1
 * go to the BLAS's cblas_sgemv, everything else to its cblas_sgemm, unchanged. Built by openelm_mlx.blas with the
 * system C compiler on first use; no other symbol is exported.
 */
#define _GNU_SOURCE /* RTLD_NEXT */
#include <dlfcn.h>
#include <string.h>

#define EXPORT __attribute__((visibility("default")))

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *, int, float,
                         float *, int);
typedef void (*sgemv_fn)(int, int, int, int, float, const float *, int, const float *, int, float, float *, int);

static sgemm_fn blas_sgemm;
static sgemv_fn blas_sgemv;
static long forwarded_calls;

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
    return 0;
}

/* How many calls went to sgemv (tests read it to see that the shim is the cblas_sgemm MLX calls). */
EXPORT long openelm_gemv_shim_forwarded(void) { return __atomic_load_n(&forwarded_calls, __ATOMIC_RELAXED); }

EXPORT void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha, const float *a,
                        int lda, const float *b, int ldb, float beta, float *c, int ldc) {
    if (order == ROW_MAJOR && m == 1 && n > 0 && k > 0 && blas_sgemv) {
        /* c (1 x n) = alpha * x (1 x k) @ op(b) (k x n) + beta * c. x is a's single row (stride 1) or, when a is
         * transposed (stored k x 1), its column (stride lda). */
        int incx = trans_a == NO_TRANS ? 1 : lda;
        if (beta == 0.0f) memset(c, 0, sizeof(float) * (size_t)n);  /* BLAS semantics: c is not read */
        if (trans_b == TRANS)  /* b stored n x k: c = b @ x */
            blas_sgemv(ROW_MAJOR, NO_TRANS, n, k, alpha, b, ldb, a, incx, beta, c, 1);
        else  /* b stored k x n: c = b^T @ x */
            blas_sgemv(ROW_MAJOR, TRANS, k, n, alpha, b, ldb, a, incx, beta, c, 1);
        __atomic_add_fetch(&forwarded_calls, 1, __ATOMIC_RELAXED);
        return;
    }
    if (!blas_sgemm) blas_sgemm = (sgemm_fn)dlsym(RTLD_NEXT, "cblas_sgemm");
    blas_sgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
