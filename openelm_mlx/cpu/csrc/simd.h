/* Horizontal sums of 8-lane float vectors, for the x86-64 kernels of qgemv.c and step.c (one definition each). */
#ifndef OPENELM_SIMD_H
#define OPENELM_SIMD_H
#if defined(__x86_64__)
#include <immintrin.h>

/* The sum of v's 8 lanes. */
__attribute__((target("avx2,fma"))) static inline float hsum8(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
    return _mm_cvtss_f32(h);
}

/* The sums of a, b, c and d (8 lanes each), in one vector. */
__attribute__((target("avx2,fma"))) static inline __m128 hsum4x8(__m256 a, __m256 b, __m256 c, __m256 d) {
    const __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

#endif
#endif /* OPENELM_SIMD_H */
