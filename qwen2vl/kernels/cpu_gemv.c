/* Memory-bound matrix-vector kernels for CPU decoding (few activation rows, large weights).
 *
 * y[m, n] = sum_k x[m, k] * W[n, k] for M <= 8 rows of fp32 activations and a row-major weight W stored as
 * bf16 or int8 (int8: times a per-row scale). Each weight row is read once for all M activation rows, widened
 * to fp32 in registers (bf16 -> fp32 is a 16-bit shift) and accumulated with FMA in fp32. PyTorch's own bf16
 * GEMV on CPUs without AMX reads weights at a small fraction of memory bandwidth; this one reaches it.
 * Needs AVX512F; the Python side checks the CPU before loading it. K must be a multiple of 16.
 */
#include "cpu_common.h"

static inline __m512 load_bf16(const uint16_t *p) {
    __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}

static inline __m512 load_i8(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}

#define DEFINE_KERNEL(NAME, WTYPE, LOAD, M)                                                        \
    static void NAME##_m##M(const float *x, const WTYPE *w, const float *scale, float *y,          \
                            int64_t N, int64_t K, int nthreads) {                                   \
        _Pragma("omp parallel for num_threads(nthreads) schedule(static)")                          \
        for (int64_t n = 0; n < N; n++) {                                                           \
            const WTYPE *wr = w + n * K;                                                            \
            __m512 acc[M];                                                                          \
            for (int m = 0; m < M; m++) acc[m] = _mm512_setzero_ps();                               \
            for (int64_t k = 0; k < K; k += 16) {                                                   \
                __m512 wv = LOAD(wr + k);                                                           \
                for (int m = 0; m < M; m++)                                                         \
                    acc[m] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + m * K + k), acc[m]);           \
            }                                                                                       \
            float s = scale ? scale[n] : 1.0f;                                                      \
            for (int m = 0; m < M; m++) y[m * N + n] = _mm512_reduce_add_ps(acc[m]) * s;            \
        }                                                                                           \
    }

/* One activation row: four independent accumulators so the FMA latency chain does not bound the loop. */
#define DEFINE_KERNEL1(NAME, WTYPE, LOAD)                                                          \
    static void NAME##_m1(const float *x, const WTYPE *w, const float *scale, float *y,            \
                          int64_t N, int64_t K, int nthreads) {                                     \
        _Pragma("omp parallel for num_threads(nthreads) schedule(static)")                          \
        for (int64_t n = 0; n < N; n++) {                                                           \
            const WTYPE *wr = w + n * K;                                                            \
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                             \
            int64_t k = 0;                                                                          \
            for (; k + 64 <= K; k += 64) {                                                          \
                a0 = _mm512_fmadd_ps(LOAD(wr + k), _mm512_loadu_ps(x + k), a0);                     \
                a1 = _mm512_fmadd_ps(LOAD(wr + k + 16), _mm512_loadu_ps(x + k + 16), a1);           \
                a2 = _mm512_fmadd_ps(LOAD(wr + k + 32), _mm512_loadu_ps(x + k + 32), a2);           \
                a3 = _mm512_fmadd_ps(LOAD(wr + k + 48), _mm512_loadu_ps(x + k + 48), a3);           \
            }                                                                                       \
            for (; k < K; k += 16) a0 = _mm512_fmadd_ps(LOAD(wr + k), _mm512_loadu_ps(x + k), a0);  \
            float s = scale ? scale[n] : 1.0f;                                                      \
            y[n] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3))) * s; \
        }                                                                                           \
    }

#define DEFINE_ALL(NAME, WTYPE, LOAD)                                                              \
    DEFINE_KERNEL1(NAME, WTYPE, LOAD) DEFINE_KERNEL(NAME, WTYPE, LOAD, 2)                          \
    DEFINE_KERNEL(NAME, WTYPE, LOAD, 3) DEFINE_KERNEL(NAME, WTYPE, LOAD, 4)                        \
    DEFINE_KERNEL(NAME, WTYPE, LOAD, 5) DEFINE_KERNEL(NAME, WTYPE, LOAD, 6)                        \
    DEFINE_KERNEL(NAME, WTYPE, LOAD, 7) DEFINE_KERNEL(NAME, WTYPE, LOAD, 8)                        \
    int NAME(const float *x, const WTYPE *w, const float *scale, float *y, int64_t M, int64_t N,   \
             int64_t K, int nthreads) {                                                             \
        if (K % 16 != 0) return -1;                                                                 \
        switch (M) {                                                                                \
            case 1: NAME##_m1(x, w, scale, y, N, K, nthreads); return 0;                            \
            case 2: NAME##_m2(x, w, scale, y, N, K, nthreads); return 0;                            \
            case 3: NAME##_m3(x, w, scale, y, N, K, nthreads); return 0;                            \
            case 4: NAME##_m4(x, w, scale, y, N, K, nthreads); return 0;                            \
            case 5: NAME##_m5(x, w, scale, y, N, K, nthreads); return 0;                            \
            case 6: NAME##_m6(x, w, scale, y, N, K, nthreads); return 0;                            \
            case 7: NAME##_m7(x, w, scale, y, N, K, nthreads); return 0;                            \
            case 8: NAME##_m8(x, w, scale, y, N, K, nthreads); return 0;                            \
            default: return -2;                                                                     \
        }                                                                                           \
    }

DEFINE_ALL(gemv_bf16, uint16_t, load_bf16)
DEFINE_ALL(gemv_i8, int8_t, load_i8)

/* ---- AVX512-BF16 variants for 2..8 activation rows: x stays bf16 (8 rows x K fit in L1), 32 weights per
 * dot-product instruction; int8 weights are widened to bf16 exactly (|q| <= 127 fits bf16's 8-bit mantissa). */
__attribute__((target("avx512bf16,avx512vl,avx512bw,avx512f")))
static inline __m512bh i8x32_to_bf16(const int8_t *p) {
    __m512i w16 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)p));
    __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_castsi512_si256(w16)));
    __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(w16, 1)));
    return _mm512_cvtne2ps_pbh(hi, lo);
}

/* NR weight rows at a time: every activation vector loaded from L1 feeds NR dot products and every weight
 * vector M, so loads stay below the dot-product rate (NR x M accumulators + NR + 1 registers <= 32).
 * Each kernel computes the row blocks [b0, b1) on the calling thread; rows are independent, so how a call is
 * split between threads never changes a result. */
#ifndef PF
#define PF 2048 /* elements ahead: software prefetch keeps enough weight lines in flight while computing */
#endif
#ifndef PF_MIN_M
#define PF_MIN_M 4
#endif
/* rows per block for M activation rows (1: the one-stream kernel below); used by the kernels and their splits */
#define DP_NR(M) ((M) <= 1 ? 1 : (M) <= 4 ? 4 : 3)
#define DEFINE_DP_KERNEL(NAME, WTYPE, LOADW, M, NR)                                                \
    __attribute__((target("avx512bf16,avx512vl,avx512bw,avx512f")))                                \
    static void NAME##_m##M(const uint16_t *x, const WTYPE *w, const float *scale, float *y,       \
                            int64_t N, int64_t K, const uint16_t *bias, int out_bf16, int64_t b0, int64_t b1) { \
        for (int64_t b = b0; b < b1; b++) {                                                         \
            int64_t n0 = b * NR;                                                                    \
            int nr = N - n0 < NR ? (int)(N - n0) : NR;                                              \
            const WTYPE *wr[NR];                                                                    \
            for (int r = 0; r < NR; r++) wr[r] = w + (n0 + (r < nr ? r : 0)) * K;                   \
            __m512 acc[NR][M];                                                                      \
            for (int r = 0; r < NR; r++)                                                            \
                for (int m = 0; m < M; m++) acc[r][m] = _mm512_setzero_ps();                        \
            for (int64_t k = 0; k < K; k += 32) {                                                   \
                __m512bh wv[NR];                                                                    \
                for (int r = 0; r < NR; r++) {                                                      \
                    if (M >= PF_MIN_M) _mm_prefetch((const char *)(wr[r] + k + PF), _MM_HINT_T0);        \
                    wv[r] = LOADW(wr[r] + k);                                                       \
                }                                                                                   \
                for (int m = 0; m < M; m++) {                                                       \
                    __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * K + k);                      \
                    for (int r = 0; r < NR; r++) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], wv[r], xv); \
                }                                                                                   \
            }                                                                                       \
            for (int r = 0; r < nr; r++) {                                                          \
                float s = scale ? scale[n0 + r] : 1.0f, b = bias ? bf16_to_f32(bias[n0 + r]) : 0.0f; \
                for (int m = 0; m < M; m++) {                                                       \
                    float v = _mm512_reduce_add_ps(acc[r][m]) * s + b;                              \
                    if (out_bf16) ((uint16_t *)y)[m * N + n0 + r] = f32_to_bf16(v);                 \
                    else y[m * N + n0 + r] = v;                                                     \
                }                                                                                   \
            }                                                                                       \
        }                                                                                           \
    }

__attribute__((target("avx512bf16,avx512vl,avx512bw,avx512f")))
static inline __m512bh bf16x32(const uint16_t *p) { return (__m512bh)_mm512_loadu_si512(p); }

/* One activation row: the share's rows [n0, n1) as two streams read side by side, row n0 + i with row mid + i
 * (a lone last row by itself), four accumulators along K per row. Two distant sequential streams per thread keep
 * more lines in flight from the L2 prefetcher than one (measured on AVX2 Zen 3: ~20 % more bytes per second;
 * interleaving NR neighbouring rows instead read 10-45 % slower, most on the short rows of k/v_proj). Each row's
 * sum runs in the same order however the rows pair up, so the result is the one-stream kernel's. */
#define SEQ1_DP_STEP(LOADW, wr, a0, a1, a2, a3)                                                    \
    do {                                                                                            \
        a0 = _mm512_dpbf16_ps(a0, LOADW((wr) + k), bf16x32(x + k));                                 \
        a1 = _mm512_dpbf16_ps(a1, LOADW((wr) + k + 32), bf16x32(x + k + 32));                       \
        a2 = _mm512_dpbf16_ps(a2, LOADW((wr) + k + 64), bf16x32(x + k + 64));                       \
        a3 = _mm512_dpbf16_ps(a3, LOADW((wr) + k + 96), bf16x32(x + k + 96));                       \
    } while (0)
#define SEQ1_DP_SUM(a0, a1, a2, a3) _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)))

__attribute__((target("avx512bf16,avx512vl,avx512bw,avx512f")))
static inline void seq1_store(float *y, int64_t n, float v, const float *scale, const uint16_t *bias, int out_bf16) {
    v = v * (scale ? scale[n] : 1.0f) + (bias ? bf16_to_f32(bias[n]) : 0.0f);
    if (out_bf16) ((uint16_t *)y)[n] = f32_to_bf16(v);
    else y[n] = v;
}

#define DEFINE_DP_SEQ1(NAME, WTYPE, LOADW)                                                         \
    __attribute__((target("avx512bf16,avx512vl,avx512bw,avx512f")))                                \
    static void NAME##_m1(const uint16_t *x, const WTYPE *w, const float *scale, float *y,         \
                          int64_t N, int64_t K, const uint16_t *bias, int out_bf16, int64_t n0, int64_t n1) { \
        (void)N;                                                                                    \
        int64_t half = (n1 - n0) / 2, mid = n0 + half;                                              \
        for (int64_t n = n0; n < mid; n++) {                                                        \
            const WTYPE *wr = w + n * K, *wq = w + (n + half) * K;                                  \
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0; \
            int64_t k = 0;                                                                          \
            for (; k + 128 <= K; k += 128) {                                                        \
                SEQ1_DP_STEP(LOADW, wr, a0, a1, a2, a3);                                            \
                SEQ1_DP_STEP(LOADW, wq, b0, b1, b2, b3);                                            \
            }                                                                                       \
            for (; k < K; k += 32) {                                                                \
                a0 = _mm512_dpbf16_ps(a0, LOADW(wr + k), bf16x32(x + k));                           \
                b0 = _mm512_dpbf16_ps(b0, LOADW(wq + k), bf16x32(x + k));                           \
            }                                                                                       \
            seq1_store(y, n, SEQ1_DP_SUM(a0, a1, a2, a3), scale, bias, out_bf16);                   \
            seq1_store(y, n + half, SEQ1_DP_SUM(b0, b1, b2, b3), scale, bias, out_bf16);            \
        }                                                                                           \
        for (int64_t n = mid + half; n < n1; n++) {                                                 \
            const WTYPE *wr = w + n * K;                                                            \
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                             \
            int64_t k = 0;                                                                          \
            for (; k + 128 <= K; k += 128) SEQ1_DP_STEP(LOADW, wr, a0, a1, a2, a3);                 \
            for (; k < K; k += 32) a0 = _mm512_dpbf16_ps(a0, LOADW(wr + k), bf16x32(x + k));        \
            seq1_store(y, n, SEQ1_DP_SUM(a0, a1, a2, a3), scale, bias, out_bf16);                   \
        }                                                                                           \
    }

/* NAME##_rows: output rows [n0, n1) on the calling thread (n0 a multiple of NAME##_align(M) unless it is N);
 * NAME: the whole product on nthreads threads, each taking one contiguous aligned share (one read stream). */
#define DEFINE_DP_ALL(NAME, WTYPE, LOADW)                                                          \
    DEFINE_DP_SEQ1(NAME, WTYPE, LOADW)                                                             \
    DEFINE_DP_KERNEL(NAME, WTYPE, LOADW, 2, DP_NR(2))                                              \
    DEFINE_DP_KERNEL(NAME, WTYPE, LOADW, 3, DP_NR(3)) DEFINE_DP_KERNEL(NAME, WTYPE, LOADW, 4, DP_NR(4)) \
    DEFINE_DP_KERNEL(NAME, WTYPE, LOADW, 5, DP_NR(5)) DEFINE_DP_KERNEL(NAME, WTYPE, LOADW, 6, DP_NR(6)) \
    DEFINE_DP_KERNEL(NAME, WTYPE, LOADW, 7, DP_NR(7)) DEFINE_DP_KERNEL(NAME, WTYPE, LOADW, 8, DP_NR(8)) \
    int64_t NAME##_align(int64_t M) { return DP_NR(M); }                                         \
    void NAME##_rows(const uint16_t *x, const WTYPE *w, const float *scale, float *y, int64_t M, int64_t N, \
                     int64_t K, const uint16_t *bias, int out_bf16, int64_t n0, int64_t n1) {       \
        int64_t nr = NAME##_align(M), b0 = n0 / nr, b1 = (n1 + nr - 1) / nr;                        \
        switch (M) {                                                                                \
            case 1: NAME##_m1(x, w, scale, y, N, K, bias, out_bf16, n0, n1); break;                 \
            case 2: NAME##_m2(x, w, scale, y, N, K, bias, out_bf16, b0, b1); break;                 \
            case 3: NAME##_m3(x, w, scale, y, N, K, bias, out_bf16, b0, b1); break;                 \
            case 4: NAME##_m4(x, w, scale, y, N, K, bias, out_bf16, b0, b1); break;                 \
            case 5: NAME##_m5(x, w, scale, y, N, K, bias, out_bf16, b0, b1); break;                 \
            case 6: NAME##_m6(x, w, scale, y, N, K, bias, out_bf16, b0, b1); break;                 \
            case 7: NAME##_m7(x, w, scale, y, N, K, bias, out_bf16, b0, b1); break;                 \
            default: NAME##_m8(x, w, scale, y, N, K, bias, out_bf16, b0, b1); break;                \
        }                                                                                           \
    }                                                                                               \
    /* bias: bf16 (N) added in fp32, or NULL; out_bf16: y is bf16 (rounded once), else fp32. */      \
    int NAME(const uint16_t *x, const WTYPE *w, const float *scale, float *y, int64_t M, int64_t N, \
             int64_t K, int nthreads, const uint16_t *bias, int out_bf16) {                         \
        if (K % 32 != 0) return -1;                                                                 \
        if (M < 1 || M > 8) return -2;                                                              \
        _Pragma("omp parallel num_threads(nthreads)")                                               \
        {                                                                                           \
            int64_t lo, hi;                                                                         \
            share(N, NAME##_align(M), omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);       \
            NAME##_rows(x, w, scale, y, M, N, K, bias, out_bf16, lo, hi);                           \
        }                                                                                           \
        return 0;                                                                                   \
    }

DEFINE_DP_ALL(gemv_bf16_dp, uint16_t, bf16x32)
DEFINE_DP_ALL(gemv_i8_dp, int8_t, i8x32_to_bf16)
