/* y = x @ dequantize(w).T for MLX's affine-quantized weights, a few rows of x at a time (decode), on x86-64 CPUs
 * with AVX2 and FMA.
 *
 * MLX's CPU quantized_matmul is scalar code: ~1 G weights/s on one core, so a 4-bit OpenELM-270M decoded ~6 tokens/s
 * where its 4-bit weights would allow ~150 by memory bandwidth. Here each group of 8 packed words is unpacked in
 * registers (shift, mask, convert) and multiplied into 8 float lanes: ~14 G weights/s on one core (measured on a
 * 5120x1280 4-bit weight). Layout (mlx.core.quantize, mode "affine"): w is (n, k * bits / 32) uint32, element j of
 * a row in word j / (32 / bits) at bit (j % (32 / bits)) * bits; scales and biases are (n, k / group_size) and
 * dequantize(w)[r, j] = q * scale + bias of j's group. Then
 *     y[r] = sum_g scale[r, g] * (q[r, g] . x[g]) + sum_g bias[r, g] * sum(x[g]).
 * Output rows are split over `threads` OpenMP threads (a persistent pool: starting threads per call cost more than
 * they saved on small weights); built without OpenMP, the same loop runs on one thread.
 * Built by openelm_mlx.quantized with the system C compiler on first use (openelm_mlx.blas.build_c_library). */
#include <stdint.h>
#include <stdlib.h>

#define EXPORT __attribute__((visibility("default")))

#if defined(__x86_64__)
#include <immintrin.h>

/* 1 if this CPU has what the kernel needs. */
EXPORT int openelm_qgemv_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

typedef struct {
    const uint32_t *w;
    const float *scales, *biases, *xt, *xsum;
    float *y;
    int n, k, group_size, bits, r0, r1;
} job_t;

__attribute__((target("avx2,fma"))) static inline float hsum(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
    return _mm_cvtss_f32(h);
}

/* Rows [r0, r1) of one row of x. xt holds x re-laid per chunk of 8 words: lane i of plane b is the element that
 * word i's b-th field multiplies (chunk * 8 * per_word + i * per_word + b), so each plane is one 8-lane FMA. */
__attribute__((target("avx2,fma"))) static void rows(const job_t *j) {
    const int per_word = 32 / j->bits, chunk = 8 * per_word, ng = j->k / j->group_size, nc = j->k / chunk;
    const int words = j->k / per_word;
    const __m256i mask = _mm256_set1_epi32((1 << j->bits) - 1);
    for (int r = j->r0; r < j->r1; r++) {
        const uint32_t *wr = j->w + (size_t)r * words;
        const float *sr = j->scales + (size_t)r * ng, *br = j->biases + (size_t)r * ng;
        __m256 total = _mm256_setzero_ps();
        for (int c = 0; c < nc; c++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(wr + 8 * c));
            const float *xc = j->xt + (size_t)c * chunk;
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
            for (int b = 0; b < per_word; b += 2) {
                __m256i q0 = _mm256_and_si256(_mm256_srli_epi32(v, b * j->bits), mask);
                __m256i q1 = _mm256_and_si256(_mm256_srli_epi32(v, (b + 1) * j->bits), mask);
                a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q0), _mm256_loadu_ps(xc + 8 * b), a0);
                a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q1), _mm256_loadu_ps(xc + 8 * (b + 1)), a1);
            }
            __m256 s;
            if (j->group_size >= chunk) {
                s = _mm256_set1_ps(sr[c * chunk / j->group_size]);
            } else { /* 4 bits, group 32: lanes 0-3 hold the chunk's first group, 4-7 its second */
                const float s0 = sr[2 * c], s1 = sr[2 * c + 1];
                s = _mm256_setr_ps(s0, s0, s0, s0, s1, s1, s1, s1);
            }
            total = _mm256_fmadd_ps(s, _mm256_add_ps(a0, a1), total);
        }
        float acc = hsum(total);
        for (int g = 0; g < ng; g++) acc += br[g] * j->xsum[g];
        j->y[r] = acc;
    }
}

/* y (m x n) = x (m x k) @ dequantize(w).T, split over `threads` threads by output rows. Returns 0, or 1 for a shape
 * or parameter the kernel does not handle (bits 4 or 8; group size 32, 64 or 128; k a multiple of the values in 8
 * words: 64 at 4 bits, 32 at 8), 2 for an allocation failure, 3 for an unsupported CPU. */
EXPORT int openelm_qgemv(const uint32_t *w, const float *scales, const float *biases, const float *x, float *y,
                         int m, int n, int k, int group_size, int bits, int threads) {
    if (!openelm_qgemv_supported()) return 3;
    if ((bits != 4 && bits != 8) || (group_size != 32 && group_size != 64 && group_size != 128)) return 1;
    const int per_word = 32 / bits, chunk = 8 * per_word, ng = k / group_size;
    if (m < 1 || n < 1 || k % chunk || k % group_size) return 1;
    if (threads < 1) threads = 1;
    if (threads > 16) threads = 16;
    float *xt = malloc(sizeof(float) * ((size_t)k + ng));
    if (!xt) return 2;
    float *xsum = xt + k;
    for (int row = 0; row < m; row++) {
        const float *xr = x + (size_t)row * k;
        for (int c = 0; c < k / chunk; c++)
            for (int i = 0; i < 8; i++)
                for (int b = 0; b < per_word; b++)
                    xt[c * chunk + b * 8 + i] = xr[c * chunk + i * per_word + b];
        for (int g = 0; g < ng; g++) {
            float s = 0.0f;
            for (int t = 0; t < group_size; t++) s += xr[g * group_size + t];
            xsum[g] = s;
        }
        float *yr = y + (size_t)row * n;
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int t = 0; t < threads; t++) {
            const job_t job = {w, scales, biases, xt, xsum, yr, n, k, group_size, bits,
                               (int)((long)n * t / threads), (int)((long)n * (t + 1) / threads)};
            rows(&job);
        }
    }
    free(xt);
    return 0;
}

#else /* not x86-64: the Python side keeps MLX's kernels */
EXPORT int openelm_qgemv_supported(void) { return 0; }
EXPORT int openelm_qgemv(const void *w, const float *s, const float *b, const float *x, float *y, int m, int n,
                         int k, int group_size, int bits, int threads) {
    return 3;
}
#endif
