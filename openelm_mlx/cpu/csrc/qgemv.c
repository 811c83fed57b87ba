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
 * Output rows are split over `threads` threads of the pool in pool.h (blocks of rows taken one at a time, so a thread
 * that another process keeps off its core holds up at most the block it took).
 * Built by openelm_mlx.quantized with the system C compiler on first use (openelm_mlx.blas.build_c_library).
 * Below it, openelm_qgemv_int8: the same product with int8 activations and integer dot products (the default),
 * following the scheme of llama.cpp's ggml-cpu Q4_0/Q8_0 dot products (written anew for MLX's affine format), with
 * an integer GEMM for many rows of x (prefill: int8_gemm). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define EXPORT __attribute__((visibility("default")))

#define OPENELM_POOL_SHARED /* csrc/step.c, built into the same library, runs its work on this pool too */
#include "pool.h"
#include "simd.h"

/* The two half-precision kinds (openelm_hgemv's `kind`; the half scales below, as SCALES_F16 / SCALES_BF16) */
enum { HALF_FLOAT16 = 0, HALF_BFLOAT16 = 1 };

/* pool.h's split of a product over threads, for csrc/step.c's float32 kernel too */
int openelm_unit_rows(int n, int k, int threads) { return pool_unit_rows(n, k, threads); }

#if defined(__x86_64__)
#include <immintrin.h>

/* 1 if this CPU has what the kernel needs. */
EXPORT int openelm_qgemv_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

/* Scales and biases come as float32, or as float16 / bfloat16 the way a half-precision model's quantization keeps
 * them: no float32 copy in memory (their bytes are 1 of the 5 bits a weight a 4-bit product reads, 1 of 9 at 8
 * bits). The kernels read a block of rows' values as float32 through scale_floats; the conversion is exact, so
 * the results are the bits of the float32 copy's. */
enum { SCALES_F32 = 0, SCALES_F16 = 1, SCALES_BF16 = 2 };
#define MAX_HALF_SCALE_GROUPS 2048 /* k / group_size with half scales: the kernels' buffers on the stack */

/* 1 if the kernels take half scales on this CPU (F16C beside AVX2). */
EXPORT int openelm_half_scales_supported(void) {
    __builtin_cpu_init();
    return openelm_qgemv_supported() && __builtin_cpu_supports("f16c");
}

__attribute__((target("avx2,fma,f16c"))) static void half_row_avx2(const uint16_t *h, int count, int kind,
                                                                    float *out); /* with hgemv, below */

/* `count` values from element `at` of p (a SCALES_* kind) as float32: p itself when float32, else buf. */
static const float *scale_floats(const void *p, int kind, size_t at, int count, float *buf) {
    if (kind == SCALES_F32) return (const float *)p + at;
    half_row_avx2((const uint16_t *)p + at, count, kind == SCALES_BF16 ? HALF_BFLOAT16 : HALF_FLOAT16, buf);
    return buf;
}

/* 0 when scales of `kind` with ng groups a row can be used here, else openelm_qgemv's refusal status. */
static int check_scales(int kind, int ng) {
    if (kind == SCALES_F32) return 0;
    if ((kind != SCALES_F16 && kind != SCALES_BF16) || ng > MAX_HALF_SCALE_GROUPS) return 1;
    return openelm_half_scales_supported() ? 0 : 3;
}

typedef struct {
    const uint32_t *w;
    const void *scales, *biases; /* SCALES_* kind skind */
    const float *xt, *xsum;
    float *y;
    int n, k, group_size, bits, r0, r1, per_unit, skind;
} job_t;


/* Rows [r0, r1) of one row of x. xt holds x re-laid per chunk of 8 words: lane i of plane b is the element that
 * word i's b-th field multiplies (chunk * 8 * per_word + i * per_word + b), so each plane is one 8-lane FMA. */
__attribute__((target("avx2,fma"))) static void rows(const job_t *j) {
    const int per_word = 32 / j->bits, chunk = 8 * per_word, ng = j->k / j->group_size, nc = j->k / chunk;
    const int words = j->k / per_word;
    const __m256i mask = _mm256_set1_epi32((1 << j->bits) - 1);
    float sb[j->skind == SCALES_F32 ? 1 : 2 * ng];
    for (int r = j->r0; r < j->r1; r++) {
        const uint32_t *wr = j->w + (size_t)r * words;
        const float *sr = scale_floats(j->scales, j->skind, (size_t)r * ng, ng, sb);
        const float *br = scale_floats(j->biases, j->skind, (size_t)r * ng, ng, sb + ng);
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
        float acc = hsum8(total);
        for (int g = 0; g < ng; g++) acc += br[g] * j->xsum[g];
        j->y[r] = acc;
    }
}

static void float_unit(const void *ctx, int unit) {
    job_t j = *(const job_t *)ctx;
    j.r0 = unit * j.per_unit;
    j.r1 = j.r0 + j.per_unit < j.n ? j.r0 + j.per_unit : j.n;
    rows(&j);
}

/* y (m x n) = x (m x k) @ dequantize(w).T, split over `threads` threads by output rows. Returns 0, or 1 for a shape
 * or parameter the kernel does not handle (bits 4 or 8; group size 32, 64 or 128; k a multiple of the values in 8
 * words: 64 at 4 bits, 32 at 8), 2 for an allocation failure, 3 for an unsupported CPU. */
EXPORT int openelm_qgemv(const uint32_t *w, const void *scales, const void *biases, const float *x, float *y,
                         int m, int n, int k, int group_size, int bits, int threads, int scale_kind) {
    if (!openelm_qgemv_supported()) return 3;
    if ((bits != 4 && bits != 8) || (group_size != 32 && group_size != 64 && group_size != 128)) return 1;
    const int per_word = 32 / bits, chunk = 8 * per_word, ng = k / group_size;
    if (m < 1 || n < 1 || k % chunk || k % group_size) return 1;
    const int refused = check_scales(scale_kind, ng);
    if (refused) return refused;
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
        const int per = pool_unit_rows(n, k, threads);
        const job_t job = {w, scales, biases, xt, xsum, y + (size_t)row * n, n, k, group_size, bits, 0, 0, per,
                           scale_kind};
        run_parallel(float_unit, &job, (n + per - 1) / per, threads);
    }
    free(xt);
    return 0;
}

/* ---- Integer dot products: the activation row quantized once to int8 (what llama.cpp's ggml-cpu does) ----
 *
 * The float kernel above spends ~6 instructions per 8 weights converting and multiplying: it is compute-bound well
 * below the memory bound. Here each row of x is quantized once per call, per weight group g, to
 *     xq = rint(x * 127 / max|x_g|) in [-127, 127],  dx_g = max|x_g| / 127,
 * and a group's q . x becomes dx_g * (q . xq), an exact int32 dot product of the unsigned weights with int8
 * activations: AVX2 maddubs + madd (32 products in two instructions), or one VNNI dpbusd. Per group then
 *     y += s_g * (dx_g * (q . xq) + off_g) + b_g * xsum_g,   off_g = c * (xsum_g - dx_g * sum(xq_g)),  c = 2^(bits-1),
 * which is q . x = (q - c) . x + c * sum(x) with (q - c) . x ~ dx_g * (q - c) . xq: the rounding error of x meets
 * the centred weights |q - c| <= c, half of what q itself would give. The error of y is at most
 *     sum_g |s_g| * dx_g / 2 * sum_j |q_j - c|    (plus float32 rounding),
 * the bound the tests check against a float64 product. The int32 lanes are the same in every variant (each lane
 * sums 4 consecutive weight bytes), and the float steps after them are shared code, so the variants give
 * bit-identical results (tested), as do 1 and N threads (each output row is computed by one thread).
 * Activation layout: at 8 bits the natural order; at 4 bits each 32-byte chunk of a weight row (64 elements:
 * byte b holds element 2b in its low nibble, 2b+1 in its high one) meets 32 even then 32 odd elements of x. */

enum { VAR_AVX2 = 1, VAR_AVXVNNI = 2, VAR_AVX512VNNI = 4 };
#define PREFILL_MIN_ROWS 4 /* from this many rows of x on, the integer GEMM below (int8_gemm) */

/* Bit mask of the integer kernels this CPU can run (VAR_*). */
EXPORT int openelm_qgemv_int8_variants(void) {
    __builtin_cpu_init();
    if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))) return 0;
    int v = VAR_AVX2;
    if (__builtin_cpu_supports("avxvnni")) v |= VAR_AVXVNNI;
    if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl")) v |= VAR_AVX512VNNI;
    return v;
}

typedef struct ijob {
    const uint32_t *w;
    const void *scales, *biases; /* SCALES_* kind skind */
    const int8_t *xq;   /* m x k, laid out as above */
    const int32_t *xl;  /* m x k/4: 128 * (sum of each 4 consecutive xq), for the 8-bit AVX2 kernel */
    const float *dx, *off, *xsum;  /* m x ng each */
    float *y;
    int m, n, k, group_size, bits, r0, r1;
    void (*rows_fn)(const struct ijob *);
    int per_unit; /* rows a unit (int8_unit) */
    int skind;
} ijob_t;

/* The float steps after the integer dot products, one compiled copy for every variant (so they round alike), for
 * up to 4 weight rows against one row of x: each row's 8 lanes of acc plus its offset and bias terms (8 groups a
 * step in two independent chains, the last step masked), then the 4 rows' horizontal sums at once. A row's result
 * does not depend on which rows share the call (the sums of a row never meet another row's), so any split of the
 * rows over threads gives the same bits. One call and one reduction per row here cost ~10% of a 4-bit decode
 * token (perf, one thread); a scalar loop over the groups before that was a chain of 2 dependent FMAs a group. */
__attribute__((target("avx2,fma"), noinline)) static void finish_rows(const float *acc, int rows, const float *sr,
                                                                      const float *br, const float *off,
                                                                      const float *xsum, int ng, float *y) {
    const int tail = ng & 7;
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(tail), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    __m256 v[4];
    for (int r = 0; r < 4; r++) {
        if (r >= rows) {
            v[r] = _mm256_setzero_ps();
            continue;
        }
        const float *s = sr + (size_t)r * ng, *b = br + (size_t)r * ng;
        __m256 p = _mm256_loadu_ps(acc + 8 * r), q = _mm256_setzero_ps();
        int g = 0;
        for (; g + 8 <= ng; g += 8) {
            p = _mm256_fmadd_ps(_mm256_loadu_ps(s + g), _mm256_loadu_ps(off + g), p);
            q = _mm256_fmadd_ps(_mm256_loadu_ps(b + g), _mm256_loadu_ps(xsum + g), q);
        }
        if (tail) {
            p = _mm256_fmadd_ps(_mm256_maskload_ps(s + g, mask), _mm256_maskload_ps(off + g, mask), p);
            q = _mm256_fmadd_ps(_mm256_maskload_ps(b + g, mask), _mm256_maskload_ps(xsum + g, mask), q);
        }
        v[r] = _mm256_add_ps(p, q);
    }
    float out[4];
    _mm_storeu_ps(out, hsum4x8(v[0], v[1], v[2], v[3]));
    for (int r = 0; r < rows; r++) y[r] = out[r];
}

/* One weight row against every row of x: DOT4(v, xc) / DOT8(v, xc, xl, acc) add a 32-byte chunk's int32 lane
 * sums into acc. Groups of 32 at 4 bits take half a chunk each (lanes 0-3, 4-7), so they get a two-valued scale.
 * Each row first asks for the one PREFETCH_ROWS rows ahead (its weights, scales and biases: three streams): with
 * the vectorized finish step, 4-bit decode products ran 1.2-1.45x faster, 8-bit 1.0-1.2x (one-off A/B of 24
 * 8192 x 1280 products, alternating builds, 1 and 2 threads, a 2-core AMD EPYC; 2 to 16 rows ahead were alike). */
#define PREFETCH_ROWS 4
#define DEFINE_INT8_ROWS(NAME, TARGET, DOT4, DOT8)                                                              \
    /* one weight row's 8 float lanes; inlined with constant bits and chunks per group (cpg; 0: 4-bit groups of \
     * 32, two groups a chunk) so each case is its own loop */                                                   \
    __attribute__((target(TARGET), always_inline)) static inline __m256 NAME##_row(                            \
        const uint32_t *wr, const float *sr, const float *dx, const int8_t *xq, const int32_t *xl, int ng,      \
        const int bits, const int cpg) {                                                                         \
        __m256 acc = _mm256_setzero_ps();                                                                        \
        if (cpg == 0) {                                                                                          \
            for (int c = 0; c < ng / 2; c++) {                                                                   \
                const __m256i iv = DOT4(_mm256_setzero_si256(),                                                  \
                                        _mm256_loadu_si256((const __m256i *)(wr + 8 * c)), xq + 64 * c);         \
                const __m256 sd = _mm256_set_m128(_mm_set1_ps(sr[2 * c + 1] * dx[2 * c + 1]),                    \
                                                  _mm_set1_ps(sr[2 * c] * dx[2 * c]));                           \
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iv), sd, acc);                                          \
            }                                                                                                    \
            return acc;                                                                                          \
        }                                                                                                        \
        for (int g = 0; g < ng; g++) {                                                                           \
            __m256i iv = _mm256_setzero_si256();                                                                 \
            for (int c = g * cpg; c < (g + 1) * cpg; c++) {                                                      \
                const __m256i v = _mm256_loadu_si256((const __m256i *)(wr + 8 * c));                             \
                iv = bits == 4 ? DOT4(iv, v, xq + 64 * c) : DOT8(iv, v, xq + 32 * c, xl + 8 * c);                \
            }                                                                                                    \
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iv), _mm256_set1_ps(sr[g] * dx[g]), acc);                  \
        }                                                                                                        \
        return acc;                                                                                              \
    }                                                                                                            \
    __attribute__((target(TARGET))) static void NAME(const ijob_t *j) {                                       \
        const int ng = j->k / j->group_size, words = j->k * j->bits / 32, gs = j->group_size;                  \
        const int sbytes = j->skind == SCALES_F32 ? 4 : 2; /* a scale's */                                       \
        float sb[j->skind == SCALES_F32 ? 1 : 8 * ng];                                                           \
        for (int r0 = j->r0; r0 < j->r1; r0 += 4) {                                                              \
            const int rows = j->r1 - r0 < 4 ? j->r1 - r0 : 4;                                                    \
            const float *S = scale_floats(j->scales, j->skind, (size_t)r0 * ng, rows * ng, sb);                  \
            const float *B = scale_floats(j->biases, j->skind, (size_t)r0 * ng, rows * ng, sb + 4 * ng);         \
            for (int i = 0; i < j->m; i++) {                                                                     \
                const int8_t *xq = j->xq + (size_t)i * j->k;                                                     \
                const int32_t *xl = j->xl + (size_t)i * (j->k / 4);                                              \
                const float *dx = j->dx + (size_t)i * ng;                                                        \
                float lanes[32];                                                                                 \
                for (int rr = 0; rr < rows; rr++) {                                                              \
                    const uint32_t *wr = j->w + (size_t)(r0 + rr) * words;                                       \
                    const float *sr = S + (size_t)rr * ng;                                                       \
                    if (i == 0) { /* the row PREFETCH_ROWS ahead */                                              \
                        const size_t ahead = (size_t)(r0 + rr + PREFETCH_ROWS) * ng * sbytes;                    \
                        for (int o = 0; o < 4 * words; o += 64)                                                  \
                            _mm_prefetch((const char *)(wr + PREFETCH_ROWS * (size_t)words) + o, _MM_HINT_T0);   \
                        for (int o = 0; o < sbytes * ng; o += 64) {                                              \
                            _mm_prefetch((const char *)j->scales + ahead + o, _MM_HINT_T0);                      \
                            _mm_prefetch((const char *)j->biases + ahead + o, _MM_HINT_T0);                      \
                        }                                                                                        \
                    }                                                                                            \
                    const __m256 acc = j->bits == 4 ? (gs == 32   ? NAME##_row(wr, sr, dx, xq, xl, ng, 4, 0)      \
                                                       : gs == 64 ? NAME##_row(wr, sr, dx, xq, xl, ng, 4, 1)      \
                                                                  : NAME##_row(wr, sr, dx, xq, xl, ng, 4, 2))     \
                                                    : (gs == 32   ? NAME##_row(wr, sr, dx, xq, xl, ng, 8, 1)      \
                                                       : gs == 64 ? NAME##_row(wr, sr, dx, xq, xl, ng, 8, 2)      \
                                                                  : NAME##_row(wr, sr, dx, xq, xl, ng, 8, 4));    \
                    _mm256_storeu_ps(lanes + 8 * rr, acc);                                                       \
                }                                                                                                \
                finish_rows(lanes, rows, S, B,                                                                   \
                            j->off + (size_t)i * ng, j->xsum + (size_t)i * ng, ng, j->y + (size_t)i * j->n + r0); \
            }                                                                                                    \
        }                                                                                                        \
    }

/* AVX2: maddubs multiplies unsigned by signed bytes into saturating int16 pairs. 4-bit weights (<= 15) cannot
 * saturate (2 * 15 * 127, and the two halves' sum, stay below 2^15); 8-bit ones (<= 255) could, so they go in
 * centred, q - 128 in [-128, 127], with its sign moved onto x (|q - 128| * sign(x, q - 128): pairs <= 2 * 128 *
 * 127), and xl adds back 128 * sum(xq) lane by lane, which gives q . xq exactly. */
__attribute__((target("avx2,fma"))) static inline __m256i dot4_avx2(__m256i acc, __m256i v, const int8_t *xc) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
    const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)xc)),
                                       _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(xc + 32))));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
}

__attribute__((target("avx2,fma"))) static inline __m256i dot8_avx2(__m256i acc, __m256i v, const int8_t *xc,
                                                                     const int32_t *xl) {
    const __m256i qc = _mm256_xor_si256(v, _mm256_set1_epi8((char)0x80));
    const __m256i p = _mm256_maddubs_epi16(_mm256_abs_epi8(qc),
                                           _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)xc), qc));
    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
    return _mm256_add_epi32(acc, _mm256_loadu_si256((const __m256i *)xl));
}

/* VNNI: dpbusd sums 4 unsigned-by-signed byte products into each int32 lane without saturation. */
#define DEFINE_VNNI_DOTS(SUFFIX, TARGET, DPBUSD)                                                                \
    __attribute__((target(TARGET))) static inline __m256i dot4_##SUFFIX(__m256i acc, __m256i v,               \
                                                                        const int8_t *xc) {                     \
        const __m256i m4 = _mm256_set1_epi8(0x0F);                                                               \
        acc = DPBUSD(acc, _mm256_and_si256(v, m4), _mm256_loadu_si256((const __m256i *)xc));                     \
        return DPBUSD(acc, _mm256_and_si256(_mm256_srli_epi16(v, 4), m4),                                        \
                      _mm256_loadu_si256((const __m256i *)(xc + 32)));                                           \
    }                                                                                                            \
    __attribute__((target(TARGET))) static inline __m256i dot8_##SUFFIX(__m256i acc, __m256i v,               \
                                                                        const int8_t *xc, const int32_t *xl) {  \
        (void)xl;                                                                                                \
        return DPBUSD(acc, v, _mm256_loadu_si256((const __m256i *)xc));                                          \
    }

DEFINE_VNNI_DOTS(avxvnni, "avx2,fma,avxvnni", _mm256_dpbusd_avx_epi32)
DEFINE_VNNI_DOTS(avx512vnni, "avx2,fma,avx512f,avx512vl,avx512vnni", _mm256_dpbusd_epi32)
DEFINE_INT8_ROWS(rows_int8_avx2, "avx2,fma", dot4_avx2, dot8_avx2)
DEFINE_INT8_ROWS(rows_int8_avxvnni, "avx2,fma,avxvnni", dot4_avxvnni, dot8_avxvnni)
DEFINE_INT8_ROWS(rows_int8_avx512vnni, "avx2,fma,avx512f,avx512vl,avx512vnni", dot4_avx512vnni, dot8_avx512vnni)

/* ---- Many rows of x (prefill): an integer GEMM with the rows of x in the vector lanes ----
 * x is quantized as above (same rounding, same layout within a row), then laid out in tiles of LANES rows: for
 * every 4 consecutive bytes of a row, the 4 bytes of each of the tile's rows side by side, one vector. A weight
 * row's 4 bytes are broadcast to every lane and multiplied into that vector with dpbusd (unsigned weight bytes
 * times signed x bytes, summed in fours into int32 lanes): R weight rows (8 with 512-bit vectors, 4 with 256-bit
 * ones) share each x vector, each lane sums
 * one (x row, weight row) pair, and a group's int32 sums become floats once per group for the whole tile:
 *     y[i, r] += s[r, g] * (dx[i, g] * dot + off[i, g]) + b[r, g] * xsum[i, g],
 * the one-row kernel's terms. 4-bit weights are unpacked per block of rows into bytes in the x layout's order (a
 * 32-byte chunk: its 32 low nibbles, then its 32 high ones), 8-bit ones are used as stored. AVX2 without VNNI
 * emulates dpbusd with maddubs + madd, exact for 4-bit weights (pairs <= 2 * 15 * 127); for 8-bit weights it is
 * not used (the one-row kernel runs). Every lane computes the same float steps in the same order, so the 256- and
 * 512-bit variants give the same bits. The old kernel here (weights in the lanes, small tiles, a float step per
 * (row, row, group) and a horizontal sum per output) was slower than de-quantize + BLAS. */

#define GEMM_BLOCK 32 /* weight rows unpacked at a time (32 x k bytes) */

static void quantize_row(const float *x, int k, int group_size, int bits, int8_t *xq, int32_t *xl, float *dx,
                         float *off, float *xsum);

typedef struct gjob {
    const uint32_t *w;
    const void *scales, *biases; /* SCALES_* kind skind */
    const float *x;
    int8_t *xt;               /* tiles x k x lanes bytes */
    float *dxt, *offt, *xst;  /* tiles x ng x lanes each */
    float *y;
    int m, n, k, group_size, bits, lanes, per_unit, failed, skind;
    /* rows [r0, r1): their bytes wu, their scales and biases s, b as float32 (row r0 first) */
    void (*tile_fn)(const struct gjob *, int r0, int r1, const uint8_t *wu, const float *s, const float *b);
} gjob_t;

/* Quantize rows [t * lanes, (t + 1) * lanes) of x into tile t (rows past m: zeros, whose sums are dropped). */
static void gemm_prepare_unit(const void *ctx, int t) {
    gjob_t *j = (gjob_t *)ctx;
    const int k = j->k, ng = k / j->group_size, L = j->lanes;
    int8_t *row = malloc((size_t)k + sizeof(int32_t) * (k / 4) + 3 * sizeof(float) * ng);
    if (!row) {
        __atomic_store_n(&j->failed, 1, __ATOMIC_RELAXED);
        return;
    }
    int32_t *xl = (int32_t *)(row + ((k + 3) & ~3));
    float *dx = (float *)(xl + k / 4), *off = dx + ng, *xsum = off + ng;
    int8_t *xt = j->xt + (size_t)t * k * L;
    for (int i = 0; i < L; i++) {
        const int r = t * L + i;
        if (r < j->m) {
            quantize_row(j->x + (size_t)r * k, k, j->group_size, j->bits, row, xl, dx, off, xsum);
        } else {
            memset(row, 0, (size_t)k);
            for (int g = 0; g < ng; g++) dx[g] = off[g] = xsum[g] = 0.0f;
        }
        for (int q = 0; q < k / 4; q++) memcpy(xt + ((size_t)q * L + i) * 4, row + 4 * q, 4);
        for (int g = 0; g < ng; g++) {
            const size_t at = ((size_t)t * ng + g) * L + i;
            j->dxt[at] = dx[g], j->offt[at] = off[g], j->xst[at] = xsum[g];
        }
    }
    free(row);
}

/* Weight rows [r0, r1) (r1 - r0 <= GEMM_BLOCK) as bytes in the x layout's order: wu[(r - r0) * k + e]. */
__attribute__((target("avx2,fma"))) static void gemm_unpack(const gjob_t *j, int r0, int r1, uint8_t *wu) {
    const int k = j->k, words = k * j->bits / 32;
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    for (int r = r0; r < r1; r++) {
        const uint8_t *src = (const uint8_t *)(j->w + (size_t)r * words);
        uint8_t *dst = wu + (size_t)(r - r0) * k;
        for (int c = 0; c < k / 64; c++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(src + 32 * c));
            _mm256_storeu_si256((__m256i *)(dst + 64 * c), _mm256_and_si256(v, m4));
            _mm256_storeu_si256((__m256i *)(dst + 64 * c + 32), _mm256_and_si256(_mm256_srli_epi16(v, 4), m4));
        }
    }
}

/* One kernel per vector width and dot-product instruction: every x tile against weight rows [r0, r1) of wu. */
#define DEFINE_INT8_GEMM(NAME, TARGET, L, R, VI, VF, ZI, ZF, LOADI, BCAST, DPBUSD, CVT, FMA, LOADF, SETF, STOREF)  \
    __attribute__((target(TARGET))) static void NAME(const gjob_t *j, int r0, int r1, const uint8_t *wu,        \
                                                     const float *s, const float *b) {                          \
        const int k = j->k, ng = k / j->group_size, qpg = j->group_size / 4, tiles = (j->m + L - 1) / L;        \
        for (int t = 0; t < tiles; t++) {                                                                       \
            const int8_t *xt = j->xt + (size_t)t * k * L;                                                       \
            const float *dxt = j->dxt + (size_t)t * ng * L, *offt = j->offt + (size_t)t * ng * L;               \
            const float *xst = j->xst + (size_t)t * ng * L;                                                     \
            for (int rb = r0; rb < r1; rb += R) {                                                               \
                const uint8_t *wr[R];                                                                           \
                const float *sr[R], *br[R];                                                                     \
                _Pragma("GCC unroll 8")                                                                         \
                for (int r = 0; r < R; r++) { /* rows past r1 repeat the last one; their sums are dropped */    \
                    const int row = rb + r < r1 ? rb + r : r1 - 1;                                              \
                    wr[r] = wu + (size_t)(row - r0) * k;                                                        \
                    sr[r] = s + (size_t)(row - r0) * ng, br[r] = b + (size_t)(row - r0) * ng;                   \
                }                                                                                               \
                VF y[R];                                                                                        \
                _Pragma("GCC unroll 8")                                                                         \
                for (int r = 0; r < R; r++) y[r] = ZF;                                                          \
                for (int g = 0; g < ng; g++) {                                                                  \
                    VI acc[R];                                                                                  \
                    _Pragma("GCC unroll 8")                                                                     \
                    for (int r = 0; r < R; r++) acc[r] = ZI;                                                    \
                    const int8_t *xg = xt + (size_t)g * qpg * 4 * L;                                            \
                    _Pragma("GCC unroll 4")                                                                     \
                    for (int q = 0; q < qpg; q++) {                                                             \
                        const VI xv = LOADI(xg + (size_t)q * 4 * L);                                            \
                        const int e = g * j->group_size + 4 * q;                                                \
                        _Pragma("GCC unroll 8")                                                                 \
                        for (int r = 0; r < R; r++) acc[r] = DPBUSD(acc[r], BCAST(wr[r] + e), xv);              \
                    }                                                                                           \
                    const VF dxv = LOADF(dxt + (size_t)g * L), offv = LOADF(offt + (size_t)g * L);              \
                    const VF xsv = LOADF(xst + (size_t)g * L);                                                  \
                    _Pragma("GCC unroll 8")                                                                     \
                    for (int r = 0; r < R; r++) {                                                               \
                        y[r] = FMA(SETF(sr[r][g]), FMA(dxv, CVT(acc[r]), offv), y[r]);                          \
                        y[r] = FMA(SETF(br[r][g]), xsv, y[r]);                                                  \
                    }                                                                                           \
                }                                                                                               \
                for (int r = 0; r < R && rb + r < r1; r++) {                                                    \
                    float lanes[L];                                                                             \
                    STOREF(lanes, y[r]);                                                                        \
                    for (int i = 0; i < L && t * L + i < j->m; i++)                                             \
                        j->y[(size_t)(t * L + i) * j->n + rb + r] = lanes[i];                                   \
                }                                                                                               \
            }                                                                                                   \
        }                                                                                                       \
    }

#define LOADI_256(p) _mm256_loadu_si256((const __m256i *)(const void *)(p))
#define LOADI_512(p) _mm512_loadu_si512((const void *)(p))
#define BCAST32_256(p) _mm256_set1_epi32(*(const int32_t *)(const void *)(p))
#define BCAST32_512(p) _mm512_set1_epi32(*(const int32_t *)(const void *)(p))
/* dpbusd on AVX2: maddubs (unsigned x signed bytes -> int16 pairs; 4-bit weights cannot saturate) + madd by 1 */
#define DPBUSD_AVX2(acc, a, b) \
    _mm256_add_epi32((acc), _mm256_madd_epi16(_mm256_maddubs_epi16((a), (b)), _mm256_set1_epi16(1)))
DEFINE_INT8_GEMM(gemm_int8_avxvnni, "avx2,fma,avxvnni", 8, 4, __m256i, __m256, _mm256_setzero_si256(),
                 _mm256_setzero_ps(), LOADI_256, BCAST32_256,
                 _mm256_dpbusd_avx_epi32, _mm256_cvtepi32_ps, _mm256_fmadd_ps, _mm256_loadu_ps, _mm256_set1_ps,
                 _mm256_storeu_ps)
DEFINE_INT8_GEMM(gemm_int8_avx512vnni, "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni", 16, 8, __m512i, __m512,
                 _mm512_setzero_si512(), _mm512_setzero_ps(), LOADI_512, BCAST32_512,
                 _mm512_dpbusd_epi32, _mm512_cvtepi32_ps, _mm512_fmadd_ps, _mm512_loadu_ps, _mm512_set1_ps,
                 _mm512_storeu_ps)
DEFINE_INT8_GEMM(gemm_int8_avx2, "avx2,fma", 8, 4, __m256i, __m256, _mm256_setzero_si256(), _mm256_setzero_ps(),
                 LOADI_256, BCAST32_256, DPBUSD_AVX2, _mm256_cvtepi32_ps,
                 _mm256_fmadd_ps, _mm256_loadu_ps, _mm256_set1_ps, _mm256_storeu_ps)
/* Weight rows [unit * per_unit, ...) against every tile, GEMM_BLOCK rows unpacked at a time (4 bits). */
static void gemm_unit(const void *ctx, int unit) {
    gjob_t *j = (gjob_t *)ctx;
    const int r0 = unit * j->per_unit, r1 = r0 + j->per_unit < j->n ? r0 + j->per_unit : j->n;
    const int ng = j->k / j->group_size;
    uint8_t *wu = j->bits == 4 ? malloc((size_t)GEMM_BLOCK * j->k) : NULL;
    float *sb = j->skind != SCALES_F32 ? malloc(sizeof(float) * 2 * GEMM_BLOCK * ng) : NULL;
    if ((j->bits == 4 && !wu) || (j->skind != SCALES_F32 && !sb)) {
        __atomic_store_n(&j->failed, 1, __ATOMIC_RELAXED);
        free(wu);
        return;
    }
    for (int b = r0; b < r1; b += GEMM_BLOCK) {
        const int e = b + GEMM_BLOCK < r1 ? b + GEMM_BLOCK : r1;
        const float *s = scale_floats(j->scales, j->skind, (size_t)b * ng, (e - b) * ng, sb);
        const float *bias = scale_floats(j->biases, j->skind, (size_t)b * ng, (e - b) * ng,
                                         sb ? sb + (size_t)GEMM_BLOCK * ng : NULL);
        if (wu) {
            gemm_unpack(j, b, e, wu);
            j->tile_fn(j, b, e, wu, s, bias);
        } else { /* 8 bits: the stored bytes are the unpacked ones */
            j->tile_fn(j, b, e, (const uint8_t *)(j->w + (size_t)b * (j->k / 4)), s, bias);
        }
    }
    free(sb);
    free(wu);
}

/* y (m x n) = x (m x k) @ dequantize(w).T by the GEMM above: 0, or 2 when memory ran out. */
static int int8_gemm(const uint32_t *w, const void *scales, const void *biases, int skind, const float *x, float *y,
                     int m, int n, int k, int group_size, int bits, int threads, int variant) {
    const int L = variant == VAR_AVX512VNNI ? 16 : 8, tiles = (m + L - 1) / L, ng = k / group_size;
    gjob_t j = {w, scales, biases, x, NULL, NULL, NULL, NULL, y, m, n, k, group_size, bits, L, 0, 0, skind,
                variant == VAR_AVX512VNNI ? gemm_int8_avx512vnni
                : variant == VAR_AVXVNNI  ? gemm_int8_avxvnni
                                          : gemm_int8_avx2};
    char *buf = malloc((size_t)tiles * L * k + 3 * sizeof(float) * (size_t)tiles * ng * L);
    if (!buf) return 2;
    j.xt = (int8_t *)buf;
    j.dxt = (float *)(buf + (size_t)tiles * L * k), j.offt = j.dxt + (size_t)tiles * ng * L;
    j.xst = j.offt + (size_t)tiles * ng * L;
    run_parallel(gemm_prepare_unit, &j, tiles, threads);
    if (!j.failed) {
        /* units of whole GEMM_BLOCKs, ~POOL_UNITS_PER_THREAD a thread */
        const int blocks = (n + GEMM_BLOCK - 1) / GEMM_BLOCK, per = threads * POOL_UNITS_PER_THREAD;
        j.per_unit = GEMM_BLOCK * ((blocks + per - 1) / per);
        run_parallel(gemm_unit, &j, (n + j.per_unit - 1) / j.per_unit, threads);
    }
    free(buf);
    return j.failed ? 2 : 0;
}

static void int8_unit(const void *ctx, int unit) {
    ijob_t j = *(const ijob_t *)ctx;
    j.r0 = unit * j.per_unit;
    j.r1 = j.r0 + j.per_unit < j.n ? j.r0 + j.per_unit : j.n;
    j.rows_fn(&j);
}

/* 32 int32 values in [-127, 127] as 32 int8 in the same order. */
__attribute__((target("avx2,fma"), always_inline)) static inline __m256i pack_int8(const int32_t *q) {
    const __m256i w01 = _mm256_packs_epi32(_mm256_loadu_si256((const __m256i *)q),
                                           _mm256_loadu_si256((const __m256i *)(q + 8))),
                  w23 = _mm256_packs_epi32(_mm256_loadu_si256((const __m256i *)(q + 16)),
                                           _mm256_loadu_si256((const __m256i *)(q + 24)));
    /* packs interleave 128-bit lanes: 4-byte runs in the order q0-3, 8-11, 16-19, 24-27, 4-7, 12-15, ... */
    return _mm256_permutevar8x32_epi32(_mm256_packs_epi16(w01, w23), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

/* Quantize row x (k floats) into xq (laid out for `bits`), dx, off, xsum per group, and xl. */
__attribute__((target("avx2,fma"))) static void quantize_row(const float *x, int k, int group_size, int bits,
                                                              int8_t *xq, int32_t *xl, float *dx, float *off,
                                                              float *xsum) {
    /* 8 lanes a step (the scalar loop was ~8% of a 4-bit prompt in perf): the same products and rounding per
     * element (x * id, round to nearest even), the group's sum in 8 lanes; then packed to bytes and placed in the
     * layout by shuffles (the scalar placement was 60% of this function in a later perf) */
    const float c = (float)(1 << (bits - 1));
    int32_t q[128]; /* group_size <= 128 */
    for (int g = 0; g < k / group_size; g++) {
        const float *xg = x + (size_t)g * group_size;
        __m256 m8 = _mm256_setzero_ps(), s8 = _mm256_setzero_ps();
        for (int t = 0; t < group_size; t += 8) {
            const __m256 v = _mm256_loadu_ps(xg + t);
            m8 = _mm256_max_ps(m8, _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v));
            s8 = _mm256_add_ps(s8, v);
        }
        float lanes[8], amax = 0.0f;
        _mm256_storeu_ps(lanes, m8);
        for (int i = 0; i < 8; i++) amax = lanes[i] > amax ? lanes[i] : amax;
        const float s = hsum8(s8);
        const float id = amax > 0.0f ? 127.0f / amax : 0.0f;
        const __m256 id8 = _mm256_set1_ps(id);
        __m256i sq8 = _mm256_setzero_si256();
        for (int t = 0; t < group_size; t += 8) {
            const __m256i qi = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xg + t), id8));
            _mm256_storeu_si256((__m256i *)(q + t), qi);
            sq8 = _mm256_add_epi32(sq8, qi);
        }
        int32_t qs[8], sq = 0;
        _mm256_storeu_si256((__m256i *)qs, sq8);
        for (int i = 0; i < 8; i++) sq += qs[i];
        for (int t = 0; t < group_size; t += 32) /* 32 int32 -> 32 int8 in order (values in [-127, 127]) */
            _mm256_storeu_si256((__m256i *)(xq + (size_t)g * group_size + t), pack_int8(q + t));
        dx[g] = amax / 127.0f;
        xsum[g] = s;
        off[g] = c * (s - dx[g] * (float)sq);
    }
    if (bits == 4) /* element e of each 64-element chunk to slot e/2 (even e) or 32 + e/2 (odd e), in place */
        for (int e = 0; e < k; e += 64) {
            const __m256i even_odd = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15, 0, 2, 4,
                                                      6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
            /* per 128-bit lane: 8 even bytes, then 8 odd ones; then the even quadwords first */
            const __m256i a = _mm256_permute4x64_epi64(
                              _mm256_shuffle_epi8(_mm256_loadu_si256((const __m256i *)(xq + e)), even_odd), 0xd8),
                          b = _mm256_permute4x64_epi64(
                              _mm256_shuffle_epi8(_mm256_loadu_si256((const __m256i *)(xq + e + 32)), even_odd),
                              0xd8);
            _mm256_storeu_si256((__m256i *)(xq + e), _mm256_permute2x128_si256(a, b, 0x20));
            _mm256_storeu_si256((__m256i *)(xq + e + 32), _mm256_permute2x128_si256(a, b, 0x31));
        }
    else /* xl: 128 * the sum of each 4 consecutive values */
        for (int t = 0; t < k; t += 32) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(xq + t));
            const __m256i pairs = _mm256_maddubs_epi16(_mm256_set1_epi8(1), v); /* 1 * each signed byte, paired */
            const __m256i quads = _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
            _mm256_storeu_si256((__m256i *)(xl + t / 4), _mm256_slli_epi32(quads, 7));
        }
}

/* y (m x n) = x (m x k) @ dequantize(w).T with int8 activations (see above), split over `threads` threads by
 * output rows. variant: 0 picks the best this CPU has (AVX512-VNNI, AVX-VNNI, AVX2), else one VAR_* value.
 * Returns 0; 1 for a shape or parameter it does not handle (as openelm_qgemv); 2 allocation failure; 3 a CPU
 * without AVX2/FMA or without the requested variant. */
EXPORT int openelm_qgemv_int8(const uint32_t *w, const void *scales, const void *biases, const float *x,
                              float *y, int m, int n, int k, int group_size, int bits, int threads, int variant,
                              int scale_kind) {
    const int have = openelm_qgemv_int8_variants();
    if (variant == 0)
        variant = have & VAR_AVX512VNNI ? VAR_AVX512VNNI : have & VAR_AVXVNNI ? VAR_AVXVNNI : VAR_AVX2;
    if (!(have & variant) || (variant & (variant - 1))) return 3;
    if ((bits != 4 && bits != 8) || (group_size != 32 && group_size != 64 && group_size != 128)) return 1;
    const int chunk = 256 / bits, ng = k / group_size;
    if (m < 1 || n < 1 || k % chunk || k % group_size) return 1;
    const int refused = check_scales(scale_kind, ng);
    if (refused) return refused;
    if (threads < 1) threads = 1;
    if (threads > 16) threads = 16;
    if (m >= PREFILL_MIN_ROWS && (bits == 4 ? group_size >= 64 : variant != VAR_AVX2))
        return int8_gemm(w, scales, biases, scale_kind, x, y, m, n, k, group_size, bits, threads, variant);
    const size_t xq_bytes = ((size_t)m * k + 63) & ~(size_t)63;
    char *buf = aligned_alloc(64, xq_bytes + sizeof(int32_t) * (size_t)m * (k / 4) + 3 * sizeof(float) * m * ng);
    if (!buf) return 2;
    int8_t *xq = (int8_t *)buf;
    int32_t *xl = (int32_t *)(buf + xq_bytes);
    float *dx = (float *)(xl + (size_t)m * (k / 4)), *off = dx + (size_t)m * ng, *xsum = off + (size_t)m * ng;
    for (int i = 0; i < m; i++)
        quantize_row(x + (size_t)i * k, k, group_size, bits, xq + (size_t)i * k, xl + (size_t)i * (k / 4),
                     dx + (size_t)i * ng, off + (size_t)i * ng, xsum + (size_t)i * ng);
    void (*rows_fn)(const ijob_t *) = variant == VAR_AVXVNNI      ? rows_int8_avxvnni
                                      : variant == VAR_AVX512VNNI ? rows_int8_avx512vnni
                                                                  : rows_int8_avx2;
    const int per = pool_unit_rows(n, k, threads);
    const ijob_t job = {w, scales, biases, xq, xl, dx, off, xsum, y, m, n, k, group_size, bits, 0, 0, rows_fn, per,
                        scale_kind};
    run_parallel(int8_unit, &job, (n + per - 1) / per, threads);
    free(buf);
    return 0;
}

#else /* not x86-64: the Python side keeps MLX's kernels */
EXPORT int openelm_qgemv_supported(void) { return 0; }
EXPORT int openelm_half_gemm_supported(void) { return 0; }
EXPORT int openelm_half_scales_supported(void) { return 0; }
EXPORT int openelm_qgemv(const void *w, const void *s, const void *b, const float *x, float *y, int m, int n,
                         int k, int group_size, int bits, int threads, int scale_kind) {
    return 3;
}
EXPORT int openelm_qgemv_int8_variants(void) { return 0; }
EXPORT int openelm_qgemv_int8(const void *w, const void *s, const void *b, const float *x, float *y, int m,
                              int n, int k, int group_size, int bits, int threads, int variant, int scale_kind) {
    return 3;
}
#endif

/* ---- Half-precision weights: y = x @ W.T with W float16 or bfloat16, converted in registers ----
 *
 * openelm_hgemv(x, rows, w, n, k, kind, y, threads, variant): x is rows x k float32 (row-major), w is n x k half
 * (row-major; kind HALF_FLOAT16 or HALF_BFLOAT16), y is rows x n float32. Each weight row is read once for up to
 * 8 rows of x (more rows: blocks of 8 against the row while it is in L1), converted to float32 in registers (F16C
 * vcvtph2ps for float16; bfloat16 is the high half of a float32, so widening and a 16-bit shift), and multiplied
 * with float32 FMAs. Reading 2 bytes a weight instead of a float32 copy's 4 halves decode's memory traffic (what
 * llama.cpp's ggml-cpu does for its F16 tensors). Output rows are split over the thread pool above (x86-64); each
 * output element is computed by one thread in a fixed order, so any thread count gives the same bits. Variants:
 * HALF_AVX2 (AVX2 + FMA + F16C) and HALF_PORTABLE (plain C, any CPU: the fallback and the reference the tests
 * compare). openelm_mlx.cpu.half calls it for few-row products (decode); it is a plain C function so that other C
 * code built with this file can call it too. */

enum { HALF_PORTABLE = 1, HALF_AVX2 = 2 };
#define HALF_BLOCK 8 /* rows of x per pass over a weight row */

typedef struct {
    const float *x;
    const uint16_t *w;
    float *y;
    int rows, n, k, kind, per_unit;
} hjob_t;

typedef void (*half_unit_fn)(const void *ctx, int unit);

static void half_run(half_unit_fn fn, const void *ctx, int total, int threads) {
#if defined(__x86_64__)
    run_parallel(fn, ctx, total, threads);
#else
    (void)threads;
    for (int i = 0; i < total; i++) fn(ctx, i);
#endif
}

static inline float half_bits_to_float(uint32_t bits) {
    union {
        uint32_t u;
        float f;
    } v = {bits};
    return v.f;
}

/* One float16 or bfloat16 value as a float32 (exact: every half value is a float32 value). */
static inline float half_to_float(uint16_t h, int kind) {
    if (kind == HALF_BFLOAT16) return half_bits_to_float((uint32_t)h << 16);
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    if (exp == 0x1f) return half_bits_to_float(sign | 0x7f800000u | (man << 13)); /* inf, nan */
    if (exp) return half_bits_to_float(sign | ((exp + 112) << 23) | (man << 13));  /* rebias 15 -> 127 */
    const float sub = (float)man * 5.9604644775390625e-8f;                         /* man * 2^-24, exact */
    return sign ? -sub : sub;
}

/* k float16 / bfloat16 values as float32 (csrc/step.c's embedding lookup of a half model). */
void openelm_half_row_to_float(const uint16_t *h, int k, int kind, float *out) {
    for (int j = 0; j < k; j++) out[j] = half_to_float(h[j], kind);
}

/* Portable: weight row r against rows [b, b + m) of x, 8 float lanes per row (a fixed order compilers may
 * vectorise without reassociating), then the lanes summed as the AVX2 variant does. */
static void half_row_portable(const hjob_t *j, int r, int b, int m) {
    const uint16_t *wr = j->w + (size_t)r * j->k;
    float acc[HALF_BLOCK][8] = {{0}}, tail[HALF_BLOCK] = {0};
    const int k8 = j->k & ~7;
    for (int c = 0; c < k8; c += 8) {
        float wf[8];
        for (int l = 0; l < 8; l++) wf[l] = half_to_float(wr[c + l], j->kind);
        for (int i = 0; i < m; i++) {
            const float *xr = j->x + (size_t)(b + i) * j->k + c;
            for (int l = 0; l < 8; l++) acc[i][l] += wf[l] * xr[l];
        }
    }
    for (int c = k8; c < j->k; c++) {
        const float wf = half_to_float(wr[c], j->kind);
        for (int i = 0; i < m; i++) tail[i] += wf * j->x[(size_t)(b + i) * j->k + c];
    }
    for (int i = 0; i < m; i++) {
        const float *a = acc[i];
        j->y[(size_t)(b + i) * j->n + r] =
            (((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))) + tail[i];
    }
}

static void half_unit_portable(const void *ctx, int unit) {
    const hjob_t *j = (const hjob_t *)ctx;
    const int r1 = (unit + 1) * j->per_unit < j->n ? (unit + 1) * j->per_unit : j->n;
    for (int r = unit * j->per_unit; r < r1; r++)
        for (int b = 0; b < j->rows; b += HALF_BLOCK)
            half_row_portable(j, r, b, j->rows - b < HALF_BLOCK ? j->rows - b : HALF_BLOCK);
}

#if defined(__x86_64__)
#define HALF_TARGET "avx2,fma,f16c"


__attribute__((target(HALF_TARGET), always_inline)) static inline __m256 half_load8(const uint16_t *p, int kind) {
    const __m128i h = _mm_loadu_si128((const __m128i *)p);
    if (kind == HALF_BFLOAT16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    return _mm256_cvtph_ps(h);
}

/* `count` half values of `kind` as float32, 8 at a time by half_load8 (wide rows, the quantized kernels' half
 * scales). */
__attribute__((target(HALF_TARGET))) static void half_row_avx2(const uint16_t *h, int count, int kind, float *out) {
    int c = 0;
    for (; c + 8 <= count; c += 8) _mm256_storeu_ps(out + c, half_load8(h + c, kind));
    for (; c < count; c++) out[c] = half_to_float(h[c], kind);
}

/* Weight rows [r, r + P) against M rows of x (P, M, U and KIND constants after inlining): U chunks of 8 weights a
 * step, so that one row of x still has U independent accumulators (FMA latency), and P weight rows at once for
 * more rows of x (each x load serves P FMAs). One weight row at a time streamed from memory fastest for one row of
 * x (~12-14 GB/s against ~8-10 with 2-4 rows interleaved, one-off). An output's sum does not depend on P. */
__attribute__((target(HALF_TARGET), always_inline)) static inline void half_rows_avx2(const hjob_t *j, int r, int b,
                                                                                      const int P, const int M,
                                                                                      const int U, const int KIND) {
    const size_t k = (size_t)j->k;
    const uint16_t *w = j->w + (size_t)r * k;
    const float *x = j->x + (size_t)b * k;
    if (M == 1) /* decode: ask for the weight rows PREFETCH_ROWS ahead (1 thread +8-10%, 2 threads alike; one-off) */
        for (size_t o = 0; o < 2 * k * P; o += 64)
            _mm_prefetch((const char *)(w + PREFETCH_ROWS * k) + o, _MM_HINT_T0);
    __m256 acc[2][HALF_BLOCK][4];
#pragma GCC unroll 4
    for (int p = 0; p < P; p++)
#pragma GCC unroll 8
        for (int i = 0; i < M; i++)
#pragma GCC unroll 4
            for (int u = 0; u < U; u++) acc[p][i][u] = _mm256_setzero_ps();
    size_t c = 0;
    for (; c + 8 * U <= k; c += 8 * U) {
#pragma GCC unroll 4
        for (int u = 0; u < U; u++) {
#pragma GCC unroll 2
            for (int p = 0; p < P; p++) {
                const __m256 wv = half_load8(w + p * k + c + 8 * u, KIND);
#pragma GCC unroll 8
                for (int i = 0; i < M; i++)
                    acc[p][i][u] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + i * k + c + 8 * u), acc[p][i][u]);
            }
        }
    }
    for (; c + 8 <= k; c += 8) /* the last chunks of 8 when U does not divide them */
#pragma GCC unroll 2
        for (int p = 0; p < P; p++) {
            const __m256 wv = half_load8(w + p * k + c, KIND);
#pragma GCC unroll 8
            for (int i = 0; i < M; i++)
                acc[p][i][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + i * k + c), acc[p][i][0]);
        }
#pragma GCC unroll 2
    for (int p = 0; p < P; p++) {
        float tail[HALF_BLOCK] = {0};
        for (size_t t = c; t < k; t++) {
            const uint16_t h = w[p * k + t];
            const float wf = KIND == HALF_BFLOAT16 ? half_bits_to_float((uint32_t)h << 16) : _cvtsh_ss(h);
#pragma GCC unroll 8
            for (int i = 0; i < M; i++) tail[i] += wf * x[i * k + t];
        }
#pragma GCC unroll 8
        for (int i = 0; i < M; i++) {
            __m256 s = acc[p][i][0];
#pragma GCC unroll 4
            for (int u = 1; u < U; u++) s = _mm256_add_ps(s, acc[p][i][u]);
            j->y[(size_t)(b + i) * j->n + r + p] = hsum8(s) + tail[i];
        }
    }
}

/* Rows [r0, r1) of w against rows [b, b + m) of x, m <= HALF_BLOCK: P weight rows at a time, then one by one. */
#define HALF_PM(P, M, U, KIND)                                                                                  \
    do {                                                                                                        \
        int r = r0;                                                                                             \
        for (; r + P <= r1; r += P) half_rows_avx2(j, r, b, P, M, U, KIND);                                     \
        for (; r < r1; r++) half_rows_avx2(j, r, b, 1, M, U, KIND);                                             \
    } while (0)
#define HALF_CASES(KIND)                                                                                        \
    switch (m) {                                                                                                \
    case 1: HALF_PM(1, 1, 4, KIND); break;                                                                      \
    case 2: HALF_PM(1, 2, 2, KIND); break;                                                                      \
    case 3: HALF_PM(2, 3, 1, KIND); break;                                                                      \
    case 4: HALF_PM(2, 4, 1, KIND); break;                                                                      \
    case 5: HALF_PM(2, 5, 1, KIND); break;                                                                      \
    case 6: HALF_PM(2, 6, 1, KIND); break;                                                                      \
    case 7: HALF_PM(1, 7, 1, KIND); break;                                                                      \
    default: HALF_PM(1, 8, 1, KIND); break;                                                                     \
    }

__attribute__((target(HALF_TARGET))) static void half_block_avx2_f16(const hjob_t *j, int r0, int r1, int b, int m) {
    HALF_CASES(HALF_FLOAT16)
}
__attribute__((target(HALF_TARGET))) static void half_block_avx2_bf16(const hjob_t *j, int r0, int r1, int b, int m) {
    HALF_CASES(HALF_BFLOAT16)
}

static void half_unit_avx2(const void *ctx, int unit) {
    const hjob_t *j = (const hjob_t *)ctx;
    const int r0 = unit * j->per_unit, r1 = r0 + j->per_unit < j->n ? r0 + j->per_unit : j->n;
    void (*block)(const hjob_t *, int, int, int, int) = j->kind == HALF_BFLOAT16 ? half_block_avx2_bf16
                                                                                    : half_block_avx2_f16;
    for (int b = 0; b < j->rows; b += HALF_BLOCK) /* the unit's weight rows (~128 KB) stay in L2 between blocks */
        block(j, r0, r1, b, j->rows - b < HALF_BLOCK ? j->rows - b : HALF_BLOCK);
}
#endif

/* Bit mask of the variants this CPU can run (HALF_PORTABLE always). */
EXPORT int openelm_hgemv_variants(void) {
    int v = HALF_PORTABLE;
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        v |= HALF_AVX2;
#endif
    return v;
}

/* y (rows x n) = x (rows x k) @ w.T, w (n x k) float16 (kind 0) or bfloat16 (kind 1), float32 accumulation, split
 * over `threads` threads by output rows. variant: 0 the best this CPU has, else HALF_PORTABLE or HALF_AVX2.
 * Returns 0; 1 for a bad shape or kind; 3 for a variant this CPU lacks. */
EXPORT int openelm_hgemv(const float *x, int rows, const void *w, int n, int k, int kind, float *y, int threads,
                         int variant) {
    const int have = openelm_hgemv_variants();
    if (variant == 0) variant = have & HALF_AVX2 ? HALF_AVX2 : HALF_PORTABLE;
    if (!(have & variant) || (variant & (variant - 1))) return 3;
    if (rows < 1 || n < 1 || k < 1 || (kind != HALF_FLOAT16 && kind != HALF_BFLOAT16)) return 1;
    if (threads < 1) threads = 1;
    if (threads > 16) threads = 16;
    const int per_unit = pool_unit_rows(n, k, threads); /* as the kernels above */
    const hjob_t job = {x, (const uint16_t *)w, y, rows, n, k, kind, per_unit};
    half_unit_fn fn = half_unit_portable;
#if defined(__x86_64__)
    if (variant == HALF_AVX2) fn = half_unit_avx2;
#endif
    half_run(fn, &job, (n + per_unit - 1) / per_unit, threads);
    return 0;
}

/* ---- many-row products (prefill): weight tiles de-quantized / upcast to float32, then the BLAS's sgemm ----
 * MLX de-quantizes a whole weight on one thread (~2 ns a weight for 4 bits, ~1 ns to upcast float16) into a new
 * float32 array before its BLAS product. Here a tile of rows at a time (about TILE_BYTES of float32) is expanded on
 * the pool into one reused buffer that stays in cache, and multiplied by the caller's cblas_sgemm (the optimized
 * BLAS openelm_mlx loaded, behind csrc/gemv_shim.c, which splits large products over its own pool). kind:
 * WIDE_AFFINE (4/8-bit, mlx.core.quantize's affine layout, float32 scales and biases), WIDE_F16 or WIDE_BF16. */

enum { WIDE_AFFINE = 0, WIDE_F16 = 1, WIDE_BF16 = 2 };

/* The HALF_* kind of a WIDE_F16 / WIDE_BF16 weight. */
static inline int wide_half_kind(int kind) { return kind == WIDE_BF16 ? HALF_BFLOAT16 : HALF_FLOAT16; }
#define TILE_BYTES (1 << 21)
#define TILE_MIN_ROWS 512
#define WIDE_UNIT_ROWS 8

typedef void (*sgemm_fn)(int order, int trans_a, int trans_b, int m, int n, int k, float alpha, const float *a,
                         int lda, const float *b, int ldb, float beta, float *c, int ldc);

typedef struct {
    const void *w;
    const float *scales, *biases;
    float *out; /* rows [r0, r1) of the weight, row-major k floats each */
    int k, kind, group_size, bits, r0, r1;
    int fast; /* the AVX2 + FMA + F16C row kernel (this CPU has them) */
} wide_job_t;

static void wide_row_portable(const wide_job_t *j, int r, float *o) {
    const int k = j->k;
    if (j->kind != WIDE_AFFINE) {
        const uint16_t *h = (const uint16_t *)j->w + (size_t)r * k;
        for (int c = 0; c < k; c++) o[c] = half_to_float(h[c], wide_half_kind(j->kind));
        return;
    }
    const int per_word = 32 / j->bits, ng = k / j->group_size;
    const uint32_t *wr = (const uint32_t *)j->w + (size_t)r * (k / per_word), mask = (1u << j->bits) - 1;
    const float *s = j->scales + (size_t)r * ng, *b = j->biases + (size_t)r * ng;
    for (int c = 0; c < k; c++) {
        const float q = (float)((wr[c / per_word] >> ((c % per_word) * j->bits)) & mask);
        o[c] = q * s[c / j->group_size] + b[c / j->group_size];
    }
}

#if defined(__x86_64__)
__attribute__((target("avx2,fma,f16c"))) static void wide_row_avx2(const wide_job_t *j, int r, float *o) {
    const int k = j->k;
    if (j->kind != WIDE_AFFINE) {
        half_row_avx2((const uint16_t *)j->w + (size_t)r * k, k, wide_half_kind(j->kind), o);
        return;
    }
    const int ng = k / j->group_size, gs = j->group_size;
    const float *s = j->scales + (size_t)r * ng, *b = j->biases + (size_t)r * ng;
    if (j->bits == 4) { /* one word: 8 nibbles, low first */
        const uint32_t *wr = (const uint32_t *)j->w + (size_t)r * (k / 8);
        const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28), m4 = _mm256_set1_epi32(15);
        for (int c = 0; c < k; c += 8) {
            const __m256i q = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)wr[c / 8]), shifts), m4);
            _mm256_storeu_ps(o + c, _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), _mm256_set1_ps(s[c / gs]),
                                                    _mm256_set1_ps(b[c / gs])));
        }
    } else { /* 8 bits: bytes in order */
        const uint8_t *wr = (const uint8_t *)((const uint32_t *)j->w + (size_t)r * (k / 4));
        for (int c = 0; c < k; c += 8) {
            const __m256i q = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(wr + c)));
            _mm256_storeu_ps(o + c, _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), _mm256_set1_ps(s[c / gs]),
                                                    _mm256_set1_ps(b[c / gs])));
        }
    }
}
#endif

static void wide_unit(const void *ctx, int unit) {
    const wide_job_t *j = ctx;
    const int r0 = j->r0 + unit * WIDE_UNIT_ROWS, r1 = r0 + WIDE_UNIT_ROWS < j->r1 ? r0 + WIDE_UNIT_ROWS : j->r1;
    for (int r = r0; r < r1; r++) {
        float *o = j->out + (size_t)(r - j->r0) * j->k;
#if defined(__x86_64__)
        if (j->fast) {
            wide_row_avx2(j, r, o);
            continue;
        }
#endif
        wide_row_portable(j, r, o);
    }
}

#if defined(__x86_64__)
/* ---- float16 / bfloat16 weights' many-row products with AVX-512: no float32 copy of the weight ----
 * Upcasting tiles for the BLAS cost two passes over each tile beside its sgemm (the upcast, then the BLAS's own
 * packing; 13% of a 2-thread float16 prompt in perf). Here, as in a GotoBLAS-style sgemm, x is packed once into
 * panels of HG_MR rows ([k][8]: each k's 8 values adjacent, broadcast by the kernel), and each panel of HG_NR weight
 * rows is converted to float32 and transposed ([k][48]) HG_KC columns at a time straight from the half weights;
 * the kernel holds an 8 x 48 tile of y in 24 registers (3 weight loads and 8 broadcasts feed 24 FMAs a k). Each
 * HG_KC block's sum is added to y, so an output is a sum of short chains (float32 rounding as a blocked BLAS).
 * Panels are split over the pool, x's packing too. Per product (511 rows, float16, one-off A/B against the tiles
 * + OpenBLAS below): 2 threads 1.03-1.13x on the 270M shapes (k 1024-5120), 1 thread 0.96-1.05x (0.96: k 5120,
 * whose x panels stream from L3; HG_KC 256 and 512 were slower there). */

#define HG_MR 8
#define HG_NR 48
#define HG_KC 1024

typedef struct {
    const float *x;
    float *xp; /* ceil(m / 8) panels of k x 8 floats */
    const uint16_t *w;
    float *y;
    int m, n, k, kind, failed;
} hg_job_t;

static void hg_pack_x(const void *ctx, int panel) { /* rows [8 panel, 8 panel + 8) of x, zeros past m */
    const hg_job_t *j = ctx;
    const int k = j->k, m0 = panel * HG_MR;
    float *o = j->xp + (size_t)m0 * k;
    for (int i = 0; i < HG_MR; i++) {
        const float *r = m0 + i < j->m ? j->x + (size_t)(m0 + i) * k : NULL;
        for (int c = 0; c < k; c++) o[(size_t)c * HG_MR + i] = r ? r[c] : 0.0f;
    }
}

__attribute__((target("avx512f,f16c"), always_inline)) static inline __m512 hg_load16(const uint16_t *p, int kind) {
    const __m256i h = _mm256_loadu_si256((const __m256i *)p);
    if (kind == HALF_BFLOAT16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return _mm512_cvtph_ps(h);
}

/* wp[c][j] = float(W[n0 + j][k0 + c]) for c < kc, j < 48 (rows past `rows`: zeros): 16 x 16 blocks transposed in
 * registers. */
__attribute__((target("avx512f,f16c"))) static void hg_pack_w(const hg_job_t *j, int n0, int rows, int k0, int kc,
                                                              float *wp) {
    const int hk = wide_half_kind(j->kind);
    const size_t k = (size_t)j->k;
    int c = 0;
    for (; c + 16 <= kc; c += 16)
        for (int b = 0; b < HG_NR; b += 16) {
            __m512 r[16], t[16];
            for (int i = 0; i < 16; i++)
                r[i] = b + i < rows ? hg_load16(j->w + (n0 + b + i) * k + k0 + c, hk) : _mm512_setzero_ps();
            for (int i = 0; i < 16; i += 2) {
                t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
                t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
            }
            for (int i = 0; i < 16; i += 4) {
                r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
                r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xee);
                r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
                r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xee);
            }
            for (int i = 0; i < 4; i++) {
                t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
                t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xdd);
                t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
                t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xdd);
            }
            for (int i = 0; i < 4; i++) {
                r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
                r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
                r[i + 4] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0x88);
                r[i + 12] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0xdd);
            }
            for (int i = 0; i < 16; i++) _mm512_storeu_ps(wp + (size_t)(c + i) * HG_NR + b, r[i]); /* column c + i */
        }
    for (; c < kc; c++)
        for (int i = 0; i < HG_NR; i++)
            wp[(size_t)c * HG_NR + i] = i < rows ? half_to_float(j->w[(n0 + i) * k + k0 + c], hk) : 0.0f;
}

/* y tile (mrows x ncols, stride n) += (or =, first) the 8 x 48 product of an x panel and a weight panel over kc. */
__attribute__((target("avx512f"))) static void hg_kernel(const float *xp, const float *wp, int kc, float *y, int n,
                                                         int mrows, int ncols, int first) {
    __m512 a[HG_MR][3];
#pragma GCC unroll 8
    for (int i = 0; i < HG_MR; i++) a[i][0] = a[i][1] = a[i][2] = _mm512_setzero_ps();
    for (int c = 0; c < kc; c++) {
        const float *wc = wp + (size_t)c * HG_NR, *xc = xp + (size_t)c * HG_MR;
        const __m512 w0 = _mm512_loadu_ps(wc), w1 = _mm512_loadu_ps(wc + 16), w2 = _mm512_loadu_ps(wc + 32);
#pragma GCC unroll 8
        for (int i = 0; i < HG_MR; i++) {
            const __m512 xv = _mm512_set1_ps(xc[i]);
            a[i][0] = _mm512_fmadd_ps(xv, w0, a[i][0]);
            a[i][1] = _mm512_fmadd_ps(xv, w1, a[i][1]);
            a[i][2] = _mm512_fmadd_ps(xv, w2, a[i][2]);
        }
    }
    for (int i = 0; i < mrows; i++)
#pragma GCC unroll 3
        for (int v = 0; v < 3; v++) {
            const int left = ncols - 16 * v;
            if (left <= 0) break;
            const __mmask16 mk = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
            float *o = y + (size_t)i * n + 16 * v;
            const __m512 sum = first ? a[i][v] : _mm512_add_ps(_mm512_maskz_loadu_ps(mk, o), a[i][v]);
            _mm512_mask_storeu_ps(o, mk, sum);
        }
}

__attribute__((target("avx512f,f16c"))) static void hg_unit(const void *ctx, int panel) {
    hg_job_t *j = (hg_job_t *)ctx;
    float *wp = aligned_alloc(64, sizeof(float) * HG_KC * HG_NR);
    if (!wp) {
        __atomic_store_n(&j->failed, 1, __ATOMIC_RELAXED);
        return;
    }
    const int n0 = panel * HG_NR, rows = j->n - n0 < HG_NR ? j->n - n0 : HG_NR;
    for (int k0 = 0; k0 < j->k; k0 += HG_KC) {
        const int kc = j->k - k0 < HG_KC ? j->k - k0 : HG_KC;
        hg_pack_w(j, n0, rows, k0, kc, wp);
        for (int m0 = 0; m0 < j->m; m0 += HG_MR)
            hg_kernel(j->xp + (size_t)m0 * j->k + (size_t)k0 * HG_MR, wp, kc, j->y + (size_t)m0 * j->n + n0, j->n,
                      j->m - m0 < HG_MR ? j->m - m0 : HG_MR, rows, k0 == 0);
    }
    free(wp);
}

/* 1 if this CPU runs the AVX-512 half GEMM (and OPENELM_MLX's wide products use it for half weights). */
EXPORT int openelm_half_gemm_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("f16c");
}

/* y (m x n) = x (m x k) @ W.T for W (n x k) WIDE_F16 / WIDE_BF16, on `threads` threads; 0, or 2 no memory. */
static int half_gemm(const float *x, int m, const uint16_t *w, int n, int k, int kind, float *y, int threads) {
    const int panels_x = (m + HG_MR - 1) / HG_MR;
    hg_job_t job = {x, aligned_alloc(64, sizeof(float) * (size_t)panels_x * HG_MR * k), w, y, m, n, k, kind, 0};
    if (!job.xp) return 2;
    run_parallel(hg_pack_x, &job, panels_x, threads);
    run_parallel(hg_unit, &job, (n + HG_NR - 1) / HG_NR, threads);
    free(job.xp);
    return job.failed ? 2 : 0;
}
#endif

/* y (m x n, row-major) = x (m x k) @ W.T for a weight W (n x k) stored as `kind` (see above), by tiles of W's rows
 * expanded to float32 on `threads` threads and multiplied with `sgemm` (cblas_sgemm's signature); with half_gemm
 * and a CPU with AVX-512, half weights by half_gemm above instead. Returns 0; 1 a bad shape or kind; 2 no memory. */
EXPORT int openelm_wide_gemm(const float *x, int m, const void *w, const float *scales, const float *biases, int n,
                             int k, int kind, int group_size, int bits, float *y, int threads, sgemm_fn sgemm,
                             int half_gemm_on) {
    if (m < 1 || n < 1 || k < 1 || !sgemm) return 1;
    if (kind == WIDE_AFFINE) {
        if ((bits != 4 && bits != 8) || group_size < 8 || group_size % 8 || k % group_size) return 1;
    } else if (kind != WIDE_F16 && kind != WIDE_BF16) {
        return 1;
    }
    if (threads < 1) threads = 1;
#if defined(__x86_64__)
    if (kind != WIDE_AFFINE && half_gemm_on && openelm_half_gemm_supported())
        return half_gemm(x, m, (const uint16_t *)w, n, k, kind, y, threads);
#else
    (void)half_gemm_on;
#endif
    int tile = TILE_BYTES / (4 * k); /* at least TILE_MIN_ROWS: a narrower sgemm loses more than the cache gains */
    tile = tile < TILE_MIN_ROWS ? TILE_MIN_ROWS : tile / WIDE_UNIT_ROWS * WIDE_UNIT_ROWS;
    if (tile > n) tile = n;
    float *buf = malloc(sizeof(float) * (size_t)tile * k);
    if (!buf) return 2;
    const int fast = (openelm_hgemv_variants() & HALF_AVX2) != 0;
    for (int r0 = 0; r0 < n; r0 += tile) {
        const int r1 = r0 + tile < n ? r0 + tile : n;
        const wide_job_t job = {w, scales, biases, buf, k, kind, group_size, bits, r0, r1, fast};
        const int units = (r1 - r0 + WIDE_UNIT_ROWS - 1) / WIDE_UNIT_ROWS;
#if defined(__x86_64__)
        run_parallel(wide_unit, &job, units, threads);
#else
        for (int u = 0; u < units; u++) wide_unit(&job, u);
#endif
        /* CblasRowMajor 101, CblasNoTrans 111, CblasTrans 112: y[:, r0:r1] = x @ tile.T */
        sgemm(101, 111, 112, m, r1 - r0, k, 1.0f, x, k, buf, k, 0.0f, y + r0, n);
    }
    free(buf);
    return 0;
}
