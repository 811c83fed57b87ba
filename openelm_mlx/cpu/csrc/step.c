/* The whole one-token decode step of an OpenELM model (batch 1, a KV cache) in one C call.
 *
 * MLX runs a one-token step as ~900 small ops between the 65 projections of a 270M model; each projection that
 * runs in csrc/qgemv.c evaluates its input first, so the ops never overlap the kernels and their ~5-15 us of
 * dispatch each came to as much time as the kernels themselves (docs/cpu-backend.md). Here the whole step is one
 * call, computing what openelm_mlx/model.py computes (Apple's modeling_openelm.py):
 *     x = E[token]; per layer: h = x + out_proj(attention(rope(qk_norm(qkv_proj(rms_norm(x)))), KV cache)),
 *     x = h + proj_2(silu(gate) * up) with [gate | up] = proj_1(rms_norm(h)); logits = rms_norm(x) @ E^T.
 * The projections run qgemv.c's kernels (affine 4/8-bit: its int8 or float kernel; float16 / bfloat16: its
 * hgemv) or the float32 kernel below, split over qgemv.c's thread pool; attention is float32 with a
 * max-subtracted softmax, split over query heads when the context is long. RoPE (non-traditional) takes its
 * cos / signed-sin row from the caller, who reads it from the table openelm_mlx/cpu/decode.py makes with
 * mx.fast.rope. The K/V of this position are written into the caller's per-layer cache buffers (n_kv, capacity,
 * head_dim) at `position`.
 * A weight is described by step_matrix_t; its `kind` says how it is stored (float32, affine 4/8-bit, float16,
 * bfloat16); a new storage is a new kind handled in project() and embed_row(). Built into one library with
 * qgemv.c (its kernels and pool). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define EXPORT __attribute__((visibility("default")))

/* step_matrix_t.kind; openelm_mlx/cpu/step.py mirrors these values */
enum { MAT_F32 = 0, MAT_AFFINE = 1, MAT_F16 = 2, MAT_BF16 = 3 };

typedef struct {
    int kind, bits, group_size; /* bits, group_size: MAT_AFFINE only (mlx.core.quantize's "affine" layout) */
    int n, k;                   /* output rows, input columns */
    const void *w; /* MAT_F32: n x k floats; MAT_AFFINE: n x (k * bits / 32) uint32; MAT_F16 / MAT_BF16: n x k
                      16-bit values (computed in float32 by qgemv.c's openelm_hgemv) */
    const void *scales, *biases; /* MAT_AFFINE: n x (k / group_size), of qgemv.c's SCALES_* kind scale_kind */
    int scale_kind;
} step_matrix_t;

typedef struct {
    const float *attn_norm, *q_norm, *k_norm, *ffn_norm;
    step_matrix_t qkv, out, proj_1, proj_2;
    int n_q, n_kv, ffn_dim;
} step_layer_t;

typedef struct {
    int n_layers, model_dim, head_dim;
    const step_layer_t *layers;
    const float *norm;
    step_matrix_t embed; /* vocab x model_dim: the token embeddings and the tied head */
    float eps, scale;    /* RMSNorm epsilon; attention scale 1/sqrt(head_dim) */
    int threads;         /* threads for a projection of at least thread_weights weights (and long attention) */
    int thread_weights;
    int variant; /* MAT_AFFINE products: 0 qgemv.c's float kernel, else the VAR_* of its int8 kernel */
    int half_variant; /* MAT_F16 / MAT_BF16 products: qgemv.c's HALF_* variant of openelm_hgemv */
} step_model_t;

typedef struct {
    float *k, *v; /* n_kv x capacity x head_dim each */
    int capacity;
} step_kv_t;

#if defined(__x86_64__)
#include <immintrin.h>

#include "simd.h"

/* From qgemv.c (the same library). */
typedef void (*unit_fn)(const void *ctx, int unit);
void run_parallel(unit_fn fn, const void *ctx, int total, int threads);
int openelm_qgemv_supported(void);
int openelm_qgemv(const uint32_t *w, const void *scales, const void *biases, const float *x, float *y, int m,
                  int n, int k, int group_size, int bits, int threads, int scale_kind);
int openelm_qgemv_int8(const uint32_t *w, const void *scales, const void *biases, const float *x, float *y,
                       int m, int n, int k, int group_size, int bits, int threads, int variant, int scale_kind);
int openelm_hgemv(const float *x, int rows, const void *w, int n, int k, int kind, float *y, int threads,
                  int variant);
void openelm_half_row_to_float(const uint16_t *h, int k, int kind, float *out);
int openelm_unit_rows(int n, int k, int threads);


__attribute__((target("avx2,fma"))) static inline float dot(const float *a, const float *b, int n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int j = 0;
    for (; j + 16 <= n; j += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j + 8), _mm256_loadu_ps(b + j + 8), s1);
    }
    for (; j + 8 <= n; j += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), s0);
    float s = hsum8(_mm256_add_ps(s0, s1));
    for (; j < n; j++) s += a[j] * b[j];
    return s;
}

/* ---- float32 y = W x, W n x k row-major: rows split over the pool as qgemv.c splits its products ---- */

typedef struct {
    const float *w, *x;
    float *y;
    int n, k, rows;
} f32_job_t;

/* One weight row at a time, four accumulators: a single sequential stream per core, which the hardware prefetchers
 * follow best (one-off, one core of the 2-core AVX-512 machine, a 420 MB matrix: 32-33 GB/s, against 25 GB/s for
 * four rows sharing each load of x). Two widths: 8 lanes (AVX2), and 16 for rows that start on a cache line
 * (cpu.memory.align_weights), a whole line a load: 270M float32 decode at 1 thread on aligned weights 32.7 tok/s
 * with 8 lanes, 34-35 with 16. On MLX's own buffers (8 bytes past a 16-byte boundary) every 64-byte load
 * straddles two lines (24.5); peeling each row to a line boundary instead (masked loads, x's loads straddling)
 * ran no faster than 8 lanes. */
#define DEFINE_F32_UNIT(NAME, TARGET, VEC, W, ZERO, LOAD_W, LOADU, FMA, ADD, HSUM)                              \
    __attribute__((target(TARGET))) static void NAME(const void *ctx, int unit) {                              \
        const f32_job_t *j = ctx;                                                                              \
        const int r0 = unit * j->rows, r1 = r0 + j->rows < j->n ? r0 + j->rows : j->n, k = j->k;               \
        for (int r = r0; r < r1; r++) {                                                                        \
            const float *w = j->w + (size_t)r * k, *x = j->x;                                                  \
            VEC a0 = ZERO(), a1 = a0, a2 = a0, a3 = a0;                                                        \
            int c = 0;                                                                                         \
            for (; c + 4 * W <= k; c += 4 * W) {                                                               \
                a0 = FMA(LOAD_W(w + c), LOADU(x + c), a0);                                                     \
                a1 = FMA(LOAD_W(w + c + W), LOADU(x + c + W), a1);                                             \
                a2 = FMA(LOAD_W(w + c + 2 * W), LOADU(x + c + 2 * W), a2);                                     \
                a3 = FMA(LOAD_W(w + c + 3 * W), LOADU(x + c + 3 * W), a3);                                     \
            }                                                                                                  \
            for (; c + W <= k; c += W) a0 = FMA(LOAD_W(w + c), LOADU(x + c), a0);                              \
            float s = HSUM(ADD(ADD(a0, a1), ADD(a2, a3)));                                                     \
            for (; c < k; c++) s += w[c] * x[c];                                                               \
            j->y[r] = s;                                                                                       \
        }                                                                                                      \
    }
DEFINE_F32_UNIT(f32_unit, "avx2,fma", __m256, 8, _mm256_setzero_ps, _mm256_loadu_ps, _mm256_loadu_ps,
                _mm256_fmadd_ps, _mm256_add_ps, hsum8)
DEFINE_F32_UNIT(f32_unit512, "avx512f", __m512, 16, _mm512_setzero_ps, _mm512_load_ps, _mm512_loadu_ps,
                _mm512_fmadd_ps, _mm512_add_ps, _mm512_reduce_add_ps)

static void gemv_f32(const float *w, const float *x, float *y, int n, int k, int threads) {
    const int rows = openelm_unit_rows(n, k, threads); /* qgemv.c's split: long contiguous spans a thread */
    const f32_job_t job = {w, x, y, n, k, rows};
    static int avx512 = -1;
    if (avx512 < 0) avx512 = __builtin_cpu_supports("avx512f");
    const int lines = ((uintptr_t)w & 63) == 0 && k % 16 == 0; /* every row starts on a cache line */
    run_parallel(avx512 && lines ? f32_unit512 : f32_unit, &job, (n + rows - 1) / rows, threads);
}

/* y = W x for one weight of any kind; 0, or qgemv.c's refusal status (1 shape, 2 memory, 3 CPU), or 4 a kind
 * this library does not know. */
static int project(const step_model_t *m, const step_matrix_t *w, const float *x, float *y) {
    const int threads = (long)w->n * w->k >= m->thread_weights ? m->threads : 1;
    switch (w->kind) {
    case MAT_F32:
        gemv_f32(w->w, x, y, w->n, w->k, threads);
        return 0;
    case MAT_AFFINE:
        if (m->variant)
            return openelm_qgemv_int8(w->w, w->scales, w->biases, x, y, 1, w->n, w->k, w->group_size, w->bits,
                                      threads, m->variant, w->scale_kind);
        return openelm_qgemv(w->w, w->scales, w->biases, x, y, 1, w->n, w->k, w->group_size, w->bits, threads,
                             w->scale_kind);
    case MAT_F16:
    case MAT_BF16: /* qgemv.c's HALF_FLOAT16 (0) / HALF_BFLOAT16 (1) */
        return openelm_hgemv(x, 1, w->w, w->n, w->k, w->kind == MAT_BF16, y, threads, m->half_variant);
    }
    return 4;
}

/* Row `r` of a weight as floats (the embedding lookup). */
static int embed_row(const step_matrix_t *w, int r, float *out) {
    switch (w->kind) {
    case MAT_F32:
        memcpy(out, (const float *)w->w + (size_t)r * w->k, sizeof(float) * w->k);
        return 0;
    case MAT_AFFINE: { /* dequantize: element j = q * scale + bias of j's group */
        const int per_word = 32 / w->bits, ng = w->k / w->group_size;
        const uint32_t *wr = (const uint32_t *)w->w + (size_t)r * (w->k / per_word), mask = (1u << w->bits) - 1;
        float sb[w->scale_kind ? 2 * ng : 1]; /* half scales (qgemv.c's SCALES_F16 = 1, SCALES_BF16 = 2) */
        const float *s = (const float *)w->scales + (size_t)r * ng, *b = (const float *)w->biases + (size_t)r * ng;
        if (w->scale_kind) {
            openelm_half_row_to_float((const uint16_t *)w->scales + (size_t)r * ng, ng, w->scale_kind == 2, sb);
            openelm_half_row_to_float((const uint16_t *)w->biases + (size_t)r * ng, ng, w->scale_kind == 2, sb + ng);
            s = sb, b = sb + ng;
        }
        for (int j = 0; j < w->k; j++) {
            const float q = (float)((wr[j / per_word] >> ((j % per_word) * w->bits)) & mask);
            out[j] = q * s[j / w->group_size] + b[j / w->group_size];
        }
        return 0;
    }
    case MAT_F16:
    case MAT_BF16:
        openelm_half_row_to_float((const uint16_t *)w->w + (size_t)r * w->k, w->k, w->kind == MAT_BF16, out);
        return 0;
    }
    return 4;
}

/* out = x * rsqrt(mean(x^2) + eps) * weight (out may be x) */
static void rms_norm(const float *x, const float *weight, int n, float eps, float *out) {
    float ss = 0.0f;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    const float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = 0; i < n; i++) out[i] = weight[i] * (x[i] * r);
}

/* rms_norm with the sum of squares in 8 lanes, for a prompt's rows (1.8% of a float16 prompt as the loop above).
 * The one-token step keeps the sequential sum: closer to MLX's rounding, which its int8 kernels would amplify. */
__attribute__((target("avx2,fma"))) static void rms_norm8(const float *x, const float *weight, int n, float eps,
                                                           float *out) {
    __m256 s8 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        s8 = _mm256_fmadd_ps(v, v, s8);
    }
    float ss = hsum8(s8);
    for (; i < n; i++) ss += x[i] * x[i];
    const float r = 1.0f / sqrtf(ss / (float)n + eps);
    const __m256 r8 = _mm256_set1_ps(r);
    for (i = 0; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + i), r8);
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_loadu_ps(weight + i), v));
    }
    for (; i < n; i++) out[i] = weight[i] * (x[i] * r);
}

/* Non-traditional RoPE of one head in place: x * cos + swap_halves(x) * sin (sin carries the sign). */
static void rope(float *x, const float *cos, const float *sin, int d, float *tmp) {
    const int half = d / 2;
    memcpy(tmp, x, sizeof(float) * d);
    for (int i = 0; i < d; i++) x[i] = tmp[i] * cos[i] + tmp[i < half ? i + half : i - half] * sin[i];
}

/* exp(x) for x <= 0, 8 lanes: x = n ln2 + r (Cody-Waite, |r| <= ln2 / 2), exp(r) by Cephes' degree-6 polynomial,
 * times 2^n from the exponent bits; relative error a few ulp. Below -87.33 (2^-126) it returns 0. */
__attribute__((target("avx2,fma"))) static inline __m256 exp_nonpositive(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.33654f);
    const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_max_ps(x, lo);
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

/* s[t] = exp(s[t] - max) for t < n (8 lanes, then scalar); returns their sum. The softmax of both attentions. */
__attribute__((target("avx2,fma"))) static float exp_sum(float *s, int n, float max) {
    const __m256 m8 = _mm256_set1_ps(max);
    __m256 sum8 = _mm256_setzero_ps();
    int t = 0;
    for (; t + 8 <= n; t += 8) {
        const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(s + t), m8));
        _mm256_storeu_ps(s + t, e);
        sum8 = _mm256_add_ps(sum8, e);
    }
    float sum = hsum8(sum8);
    for (; t < n; t++) sum += (s[t] = expf(s[t] - max));
    return sum;
}

/* ---- SwiGLU: out = silu(gate) * up, silu(g) = g * sigmoid(g) ----
 * MLX's CPU sigmoid is a scalar loop (~15 ns an element, one thread: ~0.37 s of a 270M model's 512-token prompt);
 * here 8 lanes with exp_nonpositive of -|g|: sigmoid(g) = 1 / (1 + e) for g >= 0, e / (1 + e) below, e = exp(-|g|),
 * so the exp never overflows. */
__attribute__((target("avx2,fma"))) static void swiglu_row(const float *gate, const float *up, float *out, int n) {
    const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 g = _mm256_loadu_ps(gate + i);
        const __m256 e = exp_nonpositive(_mm256_sub_ps(zero, _mm256_andnot_ps(_mm256_set1_ps(-0.0f), g)));
        const __m256 num = _mm256_blendv_ps(e, one, _mm256_cmp_ps(g, zero, _CMP_GE_OQ));
        const __m256 sig = _mm256_div_ps(num, _mm256_add_ps(one, e));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(g, sig), _mm256_loadu_ps(up + i)));
    }
    for (; i < n; i++) out[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}

#define SWIGLU_ROWS 8 /* rows of a prompt per unit */

typedef struct {
    const float *gu; /* rows x 2F: [gate | up] */
    float *out;      /* rows x F */
    int rows, F;
} swiglu_job_t;

static void swiglu_unit(const void *ctx, int unit) {
    const swiglu_job_t *j = ctx;
    const int r1 = (unit + 1) * SWIGLU_ROWS < j->rows ? (unit + 1) * SWIGLU_ROWS : j->rows;
    for (int r = unit * SWIGLU_ROWS; r < r1; r++)
        swiglu_row(j->gu + (size_t)r * 2 * j->F, j->gu + (size_t)r * 2 * j->F + j->F, j->out + (size_t)r * j->F,
                   j->F);
}

/* out (rows x F) = silu(gate) * up for each row [gate | up] of gu (rows x 2F), float32, contiguous: proj_1's output
 * (gate the first half of its rows). Returns 0, 5 bad arguments, 7 unsupported CPU. */
EXPORT int openelm_swiglu(const float *gu, float *out, int rows, int F, int threads) {
    if (!openelm_qgemv_supported()) return 7;
    if (rows < 0 || F < 1) return 5;
    const swiglu_job_t job = {gu, out, rows, F};
    run_parallel(swiglu_unit, &job, (rows + SWIGLU_ROWS - 1) / SWIGLU_ROWS, threads);
    return 0;
}

/* ---- attention rows: a few query rows against one KV head, for both attentions ----
 * Two query rows at a time: their scores against four keys a step (each loaded key chunk meets both rows, each
 * query chunk four keys; 8 accumulators), the max-subtracted softmax of each, then both rows' weighted sums of the
 * value rows 32 dimensions a pass (each value chunk loaded once for both). Row i sees keys [0, seen0 + i * grow):
 * grow 1 for a prompt's causal rows, 0 for the query heads of one decode position. Replaced a row-at-a-time loop
 * (one dot product and horizontal sum per key, the value sum through memory) that ran a 270M model's 511-token
 * prompt attention at ~40 GFLOP/s on 2 threads. */


/* s0[t] = q0 . k_t, s1[t] = q1 . k_t for t < n (k: n rows of d floats). */
__attribute__((target("avx2,fma"))) static void scores2(const float *q0, const float *q1, const float *k, int d,
                                                         int n, float *s0, float *s1) {
    const int d8 = d & ~7;
    int t = 0;
    for (; t + 4 <= n; t += 4) {
        const float *k0 = k + (size_t)t * d, *k1 = k0 + d, *k2 = k1 + d, *k3 = k2 + d;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
        for (int c = 0; c < d8; c += 8) {
            const __m256 x0 = _mm256_loadu_ps(q0 + c), x1 = _mm256_loadu_ps(q1 + c);
            __m256 kv = _mm256_loadu_ps(k0 + c);
            a0 = _mm256_fmadd_ps(x0, kv, a0), b0 = _mm256_fmadd_ps(x1, kv, b0);
            kv = _mm256_loadu_ps(k1 + c);
            a1 = _mm256_fmadd_ps(x0, kv, a1), b1 = _mm256_fmadd_ps(x1, kv, b1);
            kv = _mm256_loadu_ps(k2 + c);
            a2 = _mm256_fmadd_ps(x0, kv, a2), b2 = _mm256_fmadd_ps(x1, kv, b2);
            kv = _mm256_loadu_ps(k3 + c);
            a3 = _mm256_fmadd_ps(x0, kv, a3), b3 = _mm256_fmadd_ps(x1, kv, b3);
        }
        _mm_storeu_ps(s0 + t, hsum4x8(a0, a1, a2, a3));
        _mm_storeu_ps(s1 + t, hsum4x8(b0, b1, b2, b3));
        for (int c = d8; c < d; c++)
            for (int u = 0; u < 4; u++) {
                s0[t + u] += q0[c] * k[(size_t)(t + u) * d + c];
                s1[t + u] += q1[c] * k[(size_t)(t + u) * d + c];
            }
    }
    for (; t < n; t++) {
        s0[t] = dot(q0, k + (size_t)t * d, d);
        s1[t] = dot(q1, k + (size_t)t * d, d);
    }
}

__attribute__((target("avx2,fma"))) static float max_of(const float *s, int n) {
    __m256 m8 = _mm256_set1_ps(-INFINITY);
    int t = 0;
    for (; t + 8 <= n; t += 8) m8 = _mm256_max_ps(m8, _mm256_loadu_ps(s + t));
    float lanes[8], m = -INFINITY;
    _mm256_storeu_ps(lanes, m8);
    for (int i = 0; i < 8; i++) m = lanes[i] > m ? lanes[i] : m;
    for (; t < n; t++) m = s[t] > m ? s[t] : m;
    return m;
}

/* o0 = inv0 * sum_t p0[t] v_t, o1 = inv1 * sum_t p1[t] v_t for t < n (v: n rows of d floats). */
__attribute__((target("avx2,fma"))) static void values2(const float *p0, const float *p1, const float *v, int d,
                                                         int n, float inv0, float inv1, float *o0, float *o1) {
    int c = 0;
    for (; c + 32 <= d; c += 32) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
        for (int t = 0; t < n; t++) {
            const float *vt = v + (size_t)t * d + c;
            const __m256 w0 = _mm256_set1_ps(p0[t]), w1 = _mm256_set1_ps(p1[t]);
            __m256 x = _mm256_loadu_ps(vt);
            a0 = _mm256_fmadd_ps(w0, x, a0), b0 = _mm256_fmadd_ps(w1, x, b0);
            x = _mm256_loadu_ps(vt + 8);
            a1 = _mm256_fmadd_ps(w0, x, a1), b1 = _mm256_fmadd_ps(w1, x, b1);
            x = _mm256_loadu_ps(vt + 16);
            a2 = _mm256_fmadd_ps(w0, x, a2), b2 = _mm256_fmadd_ps(w1, x, b2);
            x = _mm256_loadu_ps(vt + 24);
            a3 = _mm256_fmadd_ps(w0, x, a3), b3 = _mm256_fmadd_ps(w1, x, b3);
        }
        const __m256 i0 = _mm256_set1_ps(inv0), i1 = _mm256_set1_ps(inv1);
        _mm256_storeu_ps(o0 + c, _mm256_mul_ps(a0, i0)), _mm256_storeu_ps(o1 + c, _mm256_mul_ps(b0, i1));
        _mm256_storeu_ps(o0 + c + 8, _mm256_mul_ps(a1, i0)), _mm256_storeu_ps(o1 + c + 8, _mm256_mul_ps(b1, i1));
        _mm256_storeu_ps(o0 + c + 16, _mm256_mul_ps(a2, i0)), _mm256_storeu_ps(o1 + c + 16, _mm256_mul_ps(b2, i1));
        _mm256_storeu_ps(o0 + c + 24, _mm256_mul_ps(a3, i0)), _mm256_storeu_ps(o1 + c + 24, _mm256_mul_ps(b3, i1));
    }
    for (; c + 8 <= d; c += 8) {
        __m256 a = _mm256_setzero_ps(), b = a;
        for (int t = 0; t < n; t++) {
            const __m256 x = _mm256_loadu_ps(v + (size_t)t * d + c);
            a = _mm256_fmadd_ps(_mm256_set1_ps(p0[t]), x, a), b = _mm256_fmadd_ps(_mm256_set1_ps(p1[t]), x, b);
        }
        _mm256_storeu_ps(o0 + c, _mm256_mul_ps(a, _mm256_set1_ps(inv0)));
        _mm256_storeu_ps(o1 + c, _mm256_mul_ps(b, _mm256_set1_ps(inv1)));
    }
    for (; c < d; c++) {
        float a = 0.0f, b = 0.0f;
        for (int t = 0; t < n; t++) a += p0[t] * v[(size_t)t * d + c], b += p1[t] * v[(size_t)t * d + c];
        o0[c] = a * inv0, o1[c] = b * inv1;
    }
}

/* out row i (stride ld) = softmax(q_i . k_t, t < seen0 + i * grow) v for the nq rows of q (d floats each, already
 * scaled) against one KV head's k, v (d floats a position). s: scratch of 2 * stride floats, stride >= the most
 * keys a row sees + 4. */
__attribute__((target("avx2,fma"))) static void attend_rows(const float *q, int nq, int seen0, int grow,
                                                             const float *k, const float *v, int d, float *out,
                                                             size_t ld, float *s, int stride) {
    float spare[512]; /* the second output of an odd last row (d <= 512) */
    for (int i = 0; i < nq; i += 2) {
        const int pair = i + 1 < nq, n0 = seen0 + i * grow, n1 = pair ? n0 + grow : n0;
        const float *qa = q + (size_t)i * d, *qb = pair ? qa + d : qa;
        float *sa = s, *sb = s + stride;
        scores2(qa, qb, k, d, n1, sa, sb);
        const float inva = 1.0f / exp_sum(sa, n0, max_of(sa, n0)), invb = 1.0f / exp_sum(sb, n1, max_of(sb, n1));
        for (int t = n0; t < n1; t++) sa[t] = 0.0f; /* the key row i does not see */
        values2(sa, sb, v, d, n1, inva, invb, out + i * ld, pair ? out + (i + 1) * ld : spare);
    }
}

/* ---- attention of one position against T cached ones: a unit per KV head and its query heads ----
 * All query heads of a KV head in one unit read its keys and values once (units of two heads read them twice:
 * 0.97 against 0.70 ms a token for a 4-bit 270M model at 513 positions, 2 threads, one-off, idle). */
#define ATTN_HEADS 8 /* at most this many query heads a unit */

/* Query heads a unit takes of a KV head's `group`, and so units = n_kv * ceil(group / that). */
static inline int attn_unit_heads(int group) { return group < ATTN_HEADS ? group : ATTN_HEADS; }

typedef struct {
    const float *q, *k, *v; /* q: n_q x d; k, v: this layer's n_kv x capacity x d */
    float *out, *scores;    /* out: n_q x d; scores: 2 rows of T + 8 floats a unit (units <= n_q) */
    int n_q, n_kv, d, T, capacity;
    float scale;
} attn_job_t;

__attribute__((target("avx2,fma"))) static void attn_unit(const void *ctx, int unit) {
    const attn_job_t *j = ctx;
    const int d = j->d, group = j->n_q / j->n_kv, per = attn_unit_heads(group);
    const int units = (group + per - 1) / per, g = unit / units; /* GQA: heads [g * group, (g + 1) * group) */
    const int h = g * group + unit % units * per, nh = h + per <= (g + 1) * group ? per : (g + 1) * group - h;
    float qs[ATTN_HEADS * 512]; /* head_dim <= 512 (checked by the caller) */
    for (int i = 0; i < nh * d; i++) qs[i] = j->q[(size_t)h * d + i] * j->scale;
    attend_rows(qs, nh, j->T, 0, j->k + (size_t)g * j->capacity * d, j->v + (size_t)g * j->capacity * d, d,
                j->out + (size_t)h * d, d, j->scores + (size_t)unit * 2 * (j->T + 8), j->T + 8);
}

/* ---- causal attention of a prompt: L new positions against T = past + L keys, for MLX's prefill ----
 * MLX's CPU attention computes the full L x T score matrix with a scalar exp (~18 ns an element), one thread.
 * Here query row i sees keys [0, T - L + i] only, the exp is 8 lanes wide, and (head, block of rows) units are
 * split over the pool. */

#define CAUSAL_ROWS 16 /* query rows per unit */

typedef struct {
    const float *q, *k, *v; /* q: (B, n_q, L, d); k, v: (B, n_kv, capacity, d), positions [0, T) used */
    const float *kt;        /* the AVX-512 variant's transposed keys: (B, n_kv, d, Tp) */
    float *out;             /* (B, n_q, L, d), or with heads_last (B, L, n_q, d) */
    int n_q, n_kv, L, T, Tp, d, blocks, capacity, heads_last; /* blocks: units per (batch, head) */
    float scale;
    int *failed; /* set when a unit could not get its scratch memory */
} causal_job_t;

typedef struct {
    int r0, r1, past; /* query rows [r0, r1) of the unit's head; positions cached before the prompt */
    size_t bg, row;   /* its (sequence, KV head) index; the offset of its first row in q */
    float *out;       /* its first output row, rows `ld` floats apart */
    size_t ld;
    float *buf, *qs;  /* scratch (free buf), and the rows' queries times the scale, after `lead` floats of it */
} causal_span_t;

/* Unit `unit`'s rows (a (sequence, head, block of CAUSAL_ROWS rows) triple) and scaled queries; 0 when out of
 * memory (recorded in j->failed). */
static int causal_span(const causal_job_t *j, int unit, size_t lead, causal_span_t *u) {
    const int d = j->d, bh = unit / j->blocks, b = bh / j->n_q, h = bh % j->n_q;
    u->r0 = unit % j->blocks * CAUSAL_ROWS;
    u->r1 = u->r0 + CAUSAL_ROWS < j->L ? u->r0 + CAUSAL_ROWS : j->L;
    u->past = j->T - j->L;
    u->bg = (size_t)b * j->n_kv + h / (j->n_q / j->n_kv);
    u->row = (((size_t)b * j->n_q + h) * j->L + u->r0) * d;
    u->out = j->out + (j->heads_last ? (((size_t)b * j->L + u->r0) * j->n_q + h) * d : u->row);
    u->ld = j->heads_last ? (size_t)j->n_q * d : (size_t)d;
    u->buf = malloc(sizeof(float) * (lead + (size_t)CAUSAL_ROWS * d));
    if (!u->buf) {
        __atomic_store_n(j->failed, 1, __ATOMIC_RELAXED);
        return 0;
    }
    u->qs = u->buf + lead;
    for (size_t i = 0; i < (size_t)(u->r1 - u->r0) * d; i++) u->qs[i] = j->q[u->row + i] * j->scale;
    return 1;
}

__attribute__((target("avx2,fma"))) static void causal_unit(const void *ctx, int unit) {
    const causal_job_t *j = ctx;
    causal_span_t u;
    const int stride = j->T + 8;
    if (!causal_span(j, unit, 2 * (size_t)stride, &u)) return;
    const size_t kv = u.bg * j->capacity * j->d;
    attend_rows(u.qs, u.r1 - u.r0, u.past + u.r0 + 1, 1, j->k + kv, j->v + kv, j->d, u.out, u.ld, u.buf, stride);
    free(u.buf);
}

/* ---- the same with AVX-512, keys transposed: a prompt's attention as small matrix products ----
 * The keys of each KV head are first transposed to d rows of Tp positions (zero-padded to a multiple of 32), so
 * that 32 keys' scores of 4 query rows are 8 vector accumulators fed by broadcasts of the queries (no horizontal
 * sums), and the values' weighted sums hold 4 rows x 64 dimensions in 16 accumulators, each value row loaded once
 * for the 4 rows. The softmax between is the AVX2 path's (max_of, exp_sum). For head_dim a multiple of 64. */

#define CAUSAL_GROUP 4 /* query rows a pass */

typedef struct {
    const float *k;
    float *kt;
    int T, Tp, d, capacity;
} transpose_job_t;

static void transpose_unit(const void *ctx, int unit) { /* unit: one KV head (of one sequence) */
    const transpose_job_t *j = ctx;
    const float *k = j->k + (size_t)unit * j->capacity * j->d;
    float *kt = j->kt + (size_t)unit * j->d * j->Tp;
    for (int t0 = 0; t0 < j->T; t0 += 16) /* 16 keys x d: rows read contiguously, written 16 floats a row */
        for (int c = 0; c < j->d; c++)
            for (int t = t0; t < t0 + 16 && t < j->T; t++) kt[(size_t)c * j->Tp + t] = k[(size_t)t * j->d + c];
    for (int c = 0; c < j->d; c++)
        for (int t = j->T; t < j->Tp; t++) kt[(size_t)c * j->Tp + t] = 0.0f;
}

/* s row i (stride floats) = q_i . k_t for t < n rounded up to 32, R rows of q (scaled, d floats each). */
__attribute__((target("avx512f"), always_inline)) static inline void scores_t512(const float *q, int d,
                                                                                  const float *kt, int Tp, int n,
                                                                                  float *s, int stride,
                                                                                  const int R) {
    for (int t = 0; t < n; t += 32) {
        __m512 acc[CAUSAL_GROUP][2];
#pragma GCC unroll 4
        for (int i = 0; i < R; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
        const float *kc = kt + t;
        for (int c = 0; c < d; c++) {
            const __m512 k0 = _mm512_loadu_ps(kc + (size_t)c * Tp), k1 = _mm512_loadu_ps(kc + (size_t)c * Tp + 16);
#pragma GCC unroll 4
            for (int i = 0; i < R; i++) {
                const __m512 qv = _mm512_set1_ps(q[(size_t)i * d + c]);
                acc[i][0] = _mm512_fmadd_ps(qv, k0, acc[i][0]);
                acc[i][1] = _mm512_fmadd_ps(qv, k1, acc[i][1]);
            }
        }
#pragma GCC unroll 4
        for (int i = 0; i < R; i++) {
            _mm512_storeu_ps(s + (size_t)i * stride + t, acc[i][0]);
            _mm512_storeu_ps(s + (size_t)i * stride + t + 16, acc[i][1]);
        }
    }
}

/* out row i (stride ld) = inv[i] * sum_t p_i[t] v_t for t < n, R rows of p (stride floats), d a multiple of 64. */
__attribute__((target("avx512f"), always_inline)) static inline void values_t512(const float *p, int stride,
                                                                                  const float *v, int d, int n,
                                                                                  const float *inv, float *out,
                                                                                  size_t ld, const int R) {
    for (int dc = 0; dc < d; dc += 64) {
        __m512 acc[CAUSAL_GROUP][4];
#pragma GCC unroll 4
        for (int i = 0; i < R; i++) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = _mm512_setzero_ps();
        for (int t = 0; t < n; t++) {
            const float *vt = v + (size_t)t * d + dc;
            const __m512 v0 = _mm512_loadu_ps(vt), v1 = _mm512_loadu_ps(vt + 16), v2 = _mm512_loadu_ps(vt + 32),
                         v3 = _mm512_loadu_ps(vt + 48);
#pragma GCC unroll 4
            for (int i = 0; i < R; i++) {
                const __m512 w = _mm512_set1_ps(p[(size_t)i * stride + t]);
                acc[i][0] = _mm512_fmadd_ps(w, v0, acc[i][0]);
                acc[i][1] = _mm512_fmadd_ps(w, v1, acc[i][1]);
                acc[i][2] = _mm512_fmadd_ps(w, v2, acc[i][2]);
                acc[i][3] = _mm512_fmadd_ps(w, v3, acc[i][3]);
            }
        }
#pragma GCC unroll 4
        for (int i = 0; i < R; i++) {
            const __m512 f = _mm512_set1_ps(inv[i]);
            float *o = out + (size_t)i * ld + dc;
            _mm512_storeu_ps(o, _mm512_mul_ps(acc[i][0], f));
            _mm512_storeu_ps(o + 16, _mm512_mul_ps(acc[i][1], f));
            _mm512_storeu_ps(o + 32, _mm512_mul_ps(acc[i][2], f));
            _mm512_storeu_ps(o + 48, _mm512_mul_ps(acc[i][3], f));
        }
    }
}

/* R query rows (scaled), row i seeing keys [0, seen0 + i): scores, softmax, values. */
__attribute__((target("avx512f,avx2,fma"), always_inline)) static inline void group_t512(
    const float *q, int seen0, const float *kt, int Tp, const float *v, int d, float *out, size_t ld, float *s,
    int stride, const int R) {
    const int n = seen0 + R - 1; /* the most keys a row of the group sees */
    scores_t512(q, d, kt, Tp, n, s, stride, R);
    float inv[CAUSAL_GROUP];
#pragma GCC unroll 4
    for (int i = 0; i < R; i++) {
        float *si = s + (size_t)i * stride;
        const int ni = seen0 + i;
        inv[i] = 1.0f / exp_sum(si, ni, max_of(si, ni));
        for (int t = ni; t < n; t++) si[t] = 0.0f; /* keys row i does not see */
    }
    values_t512(s, stride, v, d, n, inv, out, ld, R);
}

__attribute__((target("avx512f,avx2,fma"))) static void causal512_unit(const void *ctx, int unit) {
    const causal_job_t *j = ctx;
    causal_span_t u;
    const int d = j->d, stride = (j->T + 31) / 32 * 32 + 32;
    if (!causal_span(j, unit, (size_t)CAUSAL_GROUP * stride, &u)) return;
    const float *kt = j->kt + u.bg * d * j->Tp, *v = j->v + u.bg * j->capacity * d;
    const int m = u.r1 - u.r0;
    int i = 0;
    for (; i + CAUSAL_GROUP <= m; i += CAUSAL_GROUP)
        group_t512(u.qs + (size_t)i * d, u.past + u.r0 + i + 1, kt, j->Tp, v, d, u.out + i * u.ld, u.ld, u.buf,
                   stride, CAUSAL_GROUP);
    for (; i < m; i++)
        group_t512(u.qs + (size_t)i * d, u.past + u.r0 + i + 1, kt, j->Tp, v, d, u.out + i * u.ld, u.ld, u.buf,
                   stride, 1);
    free(u.buf);
}

enum { CAUSAL_AVX2 = 1, CAUSAL_AVX512 = 2 };

/* Bit mask of the causal attention variants this CPU can run (0: none, the library's AVX2 + FMA missing). */
EXPORT int openelm_causal_variants(void) {
    if (!openelm_qgemv_supported()) return 0;
    return CAUSAL_AVX2 | (__builtin_cpu_supports("avx512f") ? CAUSAL_AVX512 : 0);
}

/* out = softmax(q k^T * scale, causal) v for B sequences: q (B, n_q, L, d), k and v (B, n_kv, capacity, d) of
 * which positions [0, T) are used, T >= L (the last L key positions are the queries'), GQA (query head h reads KV
 * head h / (n_q / n_kv)); float32, contiguous. out: (B, n_q, L, d), or (B, L, n_q, d) with heads_last (what the
 * output projection reads). variant: 0 the best this CPU has for d (AVX-512 where d is a multiple of 64), else
 * CAUSAL_AVX2 or CAUSAL_AVX512. Returns 0, 5 bad arguments, 6 no memory, 7 unsupported CPU or variant. */
EXPORT int openelm_causal_attention(const float *q, const float *k, const float *v, float *out, int B, int n_q,
                                    int n_kv, int L, int T, int capacity, int d, int heads_last, float scale,
                                    int threads, int variant) {
    const int have = openelm_causal_variants();
    if (variant == 0) variant = (have & CAUSAL_AVX512) && d % 64 == 0 ? CAUSAL_AVX512 : CAUSAL_AVX2;
    if (!(have & variant) || (variant == CAUSAL_AVX512 && d % 64)) return 7;
    if (B < 1 || L < 1 || T < L || capacity < T || d < 1 || d > 512 || n_kv < 1 || n_q % n_kv) return 5;
    const int blocks = (L + CAUSAL_ROWS - 1) / CAUSAL_ROWS;
    int failed = 0;
    const int Tp = (T + 31) / 32 * 32;
    float *kt = NULL;
    if (variant == CAUSAL_AVX512) { /* the keys transposed first, a unit per (sequence, KV head) */
        if (!(kt = malloc(sizeof(float) * (size_t)B * n_kv * d * Tp))) return 6;
        const transpose_job_t tj = {k, kt, T, Tp, d, capacity};
        run_parallel(transpose_unit, &tj, B * n_kv, threads);
    }
    const causal_job_t job = {q, k, v, kt, out, n_q, n_kv, L, T, Tp, d, blocks, capacity, heads_last != 0, scale,
                              &failed};
    run_parallel(kt ? causal512_unit : causal_unit, &job, B * n_q * blocks, threads);
    free(kt);
    return failed ? 6 : 0;
}

/* ---- a prompt's element-wise pieces between its projections, rows split over the pool ----
 * MLX's CPU backend runs RMSNorm, RoPE, the residual adds and the head transpositions as one-threaded loops, so
 * on 2 threads the other core waited through them (~10% of a 4-bit prompt's time). The same arithmetic as the C
 * step's rms_norm and rope, a block of rows a unit. */

#define PROMPT_ROWS 16 /* rows (positions) a unit */

typedef struct {
    const float *x, *u, *w;
    float *h, *out;
    int rows, dim;
    float eps;
} norm_job_t;

static void norm_unit(const void *ctx, int unit) {
    const norm_job_t *j = ctx;
    const int r1 = (unit + 1) * PROMPT_ROWS < j->rows ? (unit + 1) * PROMPT_ROWS : j->rows;
    for (int r = unit * PROMPT_ROWS; r < r1; r++) {
        const size_t at = (size_t)r * j->dim;
        const float *x = j->x + at;
        if (j->u) { /* the residual add first: h = x + u, then its norm (if w) */
            for (int i = 0; i < j->dim; i++) j->h[at + i] = x[i] + j->u[at + i];
            x = j->h + at;
        }
        if (j->w) rms_norm8(x, j->w, j->dim, j->eps, j->out + at);
    }
}

/* out = rms_norm(x) * w per row (rows x dim); with u (not NULL): h = x + u, out = rms_norm(h) * w; with u and
 * no w, only h = x + u. Returns 0, 5 bad arguments, 7 unsupported CPU. */
EXPORT int openelm_rms_norm_rows(const float *x, const float *u, const float *w, float *h, float *out, int rows,
                                 int dim, float eps, int threads) {
    if (!openelm_qgemv_supported()) return 7;
    if (rows < 0 || dim < 1 || (u && !h) || (!u && !w) || (w && !out)) return 5;
    const norm_job_t job = {x, u, w, h, out, rows, dim, eps};
    run_parallel(norm_unit, &job, (rows + PROMPT_ROWS - 1) / PROMPT_ROWS, threads);
    return 0;
}

typedef struct {
    const float *qkv, *qw, *kw, *cos, *sin;
    float *q, *k, *v;
    int L, n_q, n_kv, d, capacity, offset, blocks;
    float eps;
} qkv_job_t;

static void qkv_unit(const void *ctx, int unit) {
    const qkv_job_t *j = ctx;
    const int d = j->d, b = unit / j->blocks, l0 = unit % j->blocks * PROMPT_ROWS, heads = j->n_q + 2 * j->n_kv;
    const int l1 = l0 + PROMPT_ROWS < j->L ? l0 + PROMPT_ROWS : j->L;
    float tmp[512]; /* d <= 512 */
    for (int l = l0; l < l1; l++) {
        const float *row = j->qkv + ((size_t)b * j->L + l) * heads * d; /* [Q heads | K heads | V heads] */
        const float *cos = j->cos + (size_t)l * d, *sin = j->sin + (size_t)l * d;
        for (int h = 0; h < j->n_q; h++) {
            float *q = j->q + (((size_t)b * j->n_q + h) * j->L + l) * d;
            rms_norm(row + (size_t)h * d, j->qw, d, j->eps, q);
            rope(q, cos, sin, d, tmp);
        }
        for (int h = 0; h < j->n_kv; h++) {
            const size_t at = (((size_t)b * j->n_kv + h) * j->capacity + j->offset + l) * d;
            rms_norm(row + (size_t)(j->n_q + h) * d, j->kw, d, j->eps, j->k + at);
            rope(j->k + at, cos, sin, d, tmp);
            memcpy(j->v + at, row + (size_t)(j->n_q + j->n_kv + h) * d, sizeof(float) * d);
        }
    }
}

/* A prompt's qkv_proj output (B, L, (n_q + 2 n_kv) * d) split into heads: q (B, n_q, L, d) QK-normed (qw) and
 * rotated; keys QK-normed (kw) and rotated, and values, written into k, v (B, n_kv, capacity, d) at positions
 * [offset, offset + L) (a KV cache's buffers). cos, sin: the RoPE rows of positions offset .. offset + L - 1
 * (L x d each, sin signed). Returns 0, 5 bad arguments, 7 unsupported CPU. */
EXPORT int openelm_prompt_qkv(const float *qkv, const float *qw, const float *kw, const float *cos, const float *sin,
                              float *q, float *k, float *v, int B, int L, int n_q, int n_kv, int d, int capacity,
                              int offset, float eps, int threads) {
    if (!openelm_qgemv_supported()) return 7;
    if (B < 1 || L < 1 || n_q < 1 || n_kv < 1 || d < 2 || d > 512 || d % 2 || offset < 0 || offset + L > capacity)
        return 5;
    const int blocks = (L + PROMPT_ROWS - 1) / PROMPT_ROWS;
    const qkv_job_t job = {qkv, qw, kw, cos, sin, q, k, v, L, n_q, n_kv, d, capacity, offset, blocks, eps};
    run_parallel(qkv_unit, &job, B * blocks, threads);
    return 0;
}

/* 1 if this CPU can run the step (AVX2 and FMA, as qgemv.c). */
EXPORT int openelm_step_supported(void) { return openelm_qgemv_supported(); }

/* logits (vocab floats) of `token` at `position`, given the K/V of positions [0, position) in kv[layer]; writes
 * this position's K/V there (capacity > position is the caller's duty). cos, sin: the RoPE row of `position`
 * (head_dim floats each). Returns 0; 1-4 as project(); 5 bad arguments; 6 no memory; 7 unsupported CPU. */
EXPORT int openelm_step(const step_model_t *m, const step_kv_t *kv, int token, int position, const float *cos,
                        const float *sin, float *logits) {
    if (!openelm_step_supported()) return 7;
    const int D = m->model_dim, hd = m->head_dim, T = position + 1;
    if (token < 0 || token >= m->embed.n || position < 0 || hd > 512 || hd % 2) return 5;
    int max_qkv = 0, max_q = 0, max_ffn = 0;
    for (int l = 0; l < m->n_layers; l++) {
        const step_layer_t *L = &m->layers[l];
        if (kv[l].capacity <= position || L->n_kv < 1 || L->n_q % L->n_kv) return 5;
        max_qkv = L->qkv.n > max_qkv ? L->qkv.n : max_qkv;
        max_q = L->n_q > max_q ? L->n_q : max_q;
        max_ffn = L->ffn_dim > max_ffn ? L->ffn_dim : max_ffn;
    }
    const size_t floats = 3 * (size_t)D + max_qkv + (size_t)max_q * hd + 3 * (size_t)max_ffn +
                          2 * (size_t)max_q * (T + 8) + hd;
    float *buf = malloc(sizeof(float) * floats);
    if (!buf) return 6;
    float *x = buf, *xn = x + D, *o = xn + D, *qkv = o + D, *att = qkv + max_qkv, *gu = att + (size_t)max_q * hd;
    float *act = gu + 2 * (size_t)max_ffn, *scores = act + max_ffn, *tmp = scores + 2 * (size_t)max_q * (T + 8);
    int status = embed_row(&m->embed, token, x);
    for (int l = 0; l < m->n_layers && !status; l++) {
        const step_layer_t *L = &m->layers[l];
        rms_norm(x, L->attn_norm, D, m->eps, xn);
        if ((status = project(m, &L->qkv, xn, qkv))) break;
        float *q = qkv, *k = qkv + (size_t)L->n_q * hd, *v = k + (size_t)L->n_kv * hd; /* rows [Q | K | V] */
        for (int h = 0; h < L->n_q; h++) {
            rms_norm(q + h * hd, L->q_norm, hd, m->eps, q + h * hd);
            rope(q + h * hd, cos, sin, hd, tmp);
        }
        for (int h = 0; h < L->n_kv; h++) {
            rms_norm(k + h * hd, L->k_norm, hd, m->eps, k + h * hd);
            rope(k + h * hd, cos, sin, hd, tmp);
            const size_t at = ((size_t)h * kv[l].capacity + position) * hd;
            memcpy(kv[l].k + at, k + h * hd, sizeof(float) * hd);
            memcpy(kv[l].v + at, v + h * hd, sizeof(float) * hd);
        }
        const attn_job_t job = {q, kv[l].k, kv[l].v, att, scores, L->n_q, L->n_kv, hd, T, kv[l].capacity,
                                m->scale};
        const long work = (long)L->n_q * T * hd;
        const int group = L->n_q / L->n_kv, per = attn_unit_heads(group);
        const int units = L->n_kv * ((group + per - 1) / per); /* <= n_q: the scratch holds 2 rows a unit */
        run_parallel(attn_unit, &job, units, work >= m->thread_weights ? m->threads : 1);
        if ((status = project(m, &L->out, att, o))) break;
        for (int i = 0; i < D; i++) x[i] += o[i];
        rms_norm(x, L->ffn_norm, D, m->eps, xn);
        if ((status = project(m, &L->proj_1, xn, gu))) break;
        const int F = L->ffn_dim;
        swiglu_row(gu, gu + F, act, F); /* gate: the first half of proj_1's rows */
        if ((status = project(m, &L->proj_2, act, o))) break;
        for (int i = 0; i < D; i++) x[i] += o[i];
    }
    if (!status) {
        rms_norm(x, m->norm, D, m->eps, xn);
        status = project(m, &m->embed, xn, logits);
    }
    free(buf);
    return status;
}

#else /* not x86-64: the Python side keeps MLX's path */
EXPORT int openelm_causal_variants(void) { return 0; }
EXPORT int openelm_causal_attention(const float *q, const float *k, const float *v, float *out, int B, int n_q,
                                    int n_kv, int L, int T, int capacity, int d, int heads_last, float scale,
                                    int threads, int variant) {
    (void)q, (void)k, (void)v, (void)out, (void)B, (void)n_q, (void)n_kv, (void)L, (void)T, (void)capacity, (void)d;
    (void)heads_last, (void)scale, (void)threads, (void)variant;
    return 7;
}
EXPORT int openelm_rms_norm_rows(const float *x, const float *u, const float *w, float *h, float *out, int rows,
                                 int dim, float eps, int threads) {
    (void)x, (void)u, (void)w, (void)h, (void)out, (void)rows, (void)dim, (void)eps, (void)threads;
    return 7;
}
EXPORT int openelm_prompt_qkv(const float *qkv, const float *qw, const float *kw, const float *cos, const float *sin,
                              float *q, float *k, float *v, int B, int L, int n_q, int n_kv, int d, int capacity,
                              int offset, float eps, int threads) {
    (void)qkv, (void)qw, (void)kw, (void)cos, (void)sin, (void)q, (void)k, (void)v, (void)B, (void)L, (void)n_q;
    (void)n_kv, (void)d, (void)capacity, (void)offset, (void)eps, (void)threads;
    return 7;
}
EXPORT int openelm_swiglu(const float *gu, float *out, int rows, int F, int threads) {
    (void)gu, (void)out, (void)rows, (void)F, (void)threads;
    return 7;
}
EXPORT int openelm_step_supported(void) { return 0; }
EXPORT int openelm_step(const step_model_t *m, const step_kv_t *kv, int token, int position, const float *cos,
                        const float *sin, float *logits) {
    return 7;
}
#endif
