/* The decoding GEMV for x86 CPUs with AVX2 + FMA but no AVX512 (Zen 1-3, Intel client cores): the same entry
 * points and semantics as the AVX512 library's bf16-activation GEMV (cpu_gemv.c *_dp), so cpu_layer.c's fused
 * decoding step builds on either library. Decoding attention, RMSNorm, SiLU*up and quick-GELU are one source for
 * both builds (cpu_decode.c, cpu_elementwise.c on cpu_vec16.h).
 *
 * PyTorch's own bf16 matmuls on such CPUs convert through a slow path (measured on a 2-core Zen VM: a bf16 GEMV
 * reads ~20 GB/s of a ~40 GB/s machine; a bf16 8-row product runs at ~20 GFLOP/s, fp32 at ~160): here weights are
 * widened to fp32 in registers (bf16 -> fp32 is a 16-bit shift, int8 an integer convert) and accumulated with FMA.
 * Vectors are 8 floats, blocked for 16 AVX2 registers; sums run in another order than the AVX512 kernels' (8
 * lanes), so GEMV results differ from theirs in the last bits, never between paths here.
 */
#include "cpu_vec16.h"  /* the 8-lane helper hsum8 */

/* ------------------------------------------------------------------------------------ GEMV
 * y (M, N) = x (M, K) @ W.T for M <= 8 bf16 activation rows; W bf16 or int8 (times scale[n]); + bf16 bias; y fp32
 * or bf16 (rounded once). 16 weights per 32-byte load, widened by two in-lane unpacks: the fp32 halves hold
 * elements 0-3 + 8-11 and 4-7 + 12-15, and the activations are widened once per call into a per-thread fp32
 * buffer in that same order (half the load / widen instructions of 8-element loads; 3-5 % more read bandwidth
 * here). If the buffer cannot be allocated they are widened in registers the same way: same values, same order,
 * same result. One activation row: two streams per thread (below). More rows: NR weight rows at a time (NR x M
 * accumulators + 2 NR weight halves + 1 in 16 registers). Per-row results never depend on how a call is split. K % 32 == 0. */
#define DP_NR(M) ((M) <= 1 ? 1 : (M) == 2 ? 3 : (M) <= 5 ? 2 : 1)

/* 16 bf16 -> the two permuted fp32 halves */
static inline void bf16x16_halves(const uint16_t *p, __m256 *lo, __m256 *hi) {
    __m256i v = _mm256_loadu_si256((const __m256i *)p), z = _mm256_setzero_si256();
    *lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(z, v));
    *hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(z, v));
}

/* 16 int8 -> the two permuted fp32 halves (each int16 paired with itself, then shifted down with sign) */
static inline void i8x16_halves(const int8_t *p, __m256 *lo, __m256 *hi) {
    __m256i v = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p));
    *lo = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_unpacklo_epi16(v, v), 16));
    *hi = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_unpackhi_epi16(v, v), 16));
}

static __thread float *xf_buf;
static __thread int64_t xf_cap;

static const float *widen_rows(const uint16_t *x, int64_t n) { /* NULL: no buffer (callers then widen in place) */
    if (n > xf_cap) {
        free(xf_buf);
        xf_buf = aligned_alloc(64, (size_t)(n + 15) / 16 * 64);
        xf_cap = xf_buf ? n : 0;
        if (!xf_buf) return NULL;
    }
    for (int64_t i = 0; i < n; i += 16) {
        __m256 lo, hi;
        bf16x16_halves(x + i, &lo, &hi);
        _mm256_store_ps(xf_buf + i, lo);
        _mm256_store_ps(xf_buf + i + 8, hi);
    }
    return xf_buf;
}

/* activation halves at element k of row m: from the widened buffer, or widened here */
#define X_HALVES(m, k, lo, hi)                                                                        \
    do {                                                                                              \
        if (xf) { lo = _mm256_load_ps(xf + (m) * K + (k)); hi = _mm256_load_ps(xf + (m) * K + (k) + 8); } \
        else bf16x16_halves(x + (m) * K + (k), &lo, &hi);                                             \
    } while (0)

static inline void store_out(float *y, int64_t idx, float v, float s, const uint16_t *bias, int64_t n, int out_bf16) {
    v = v * s + (bias ? bf16_to_f32(bias[n]) : 0.0f);
    if (out_bf16) ((uint16_t *)y)[idx] = f32_to_bf16(v);
    else y[idx] = v;
}

/* one row's 32 elements at k into its four accumulators a[0..3] */
#define SEQ1_STEP(HALVES, wr, a)                                                                      \
    do {                                                                                              \
        for (int i = 0; i < 2; i++) {                                                                 \
            __m256 wl, wh, xl, xh;                                                                    \
            HALVES((wr) + k + 16 * i, &wl, &wh);                                                      \
            X_HALVES(0, k + 16 * i, xl, xh);                                                          \
            (a)[2 * i] = _mm256_fmadd_ps(wl, xl, (a)[2 * i]);                                         \
            (a)[2 * i + 1] = _mm256_fmadd_ps(wh, xh, (a)[2 * i + 1]);                                 \
        }                                                                                             \
    } while (0)

#define SEQ1_SUM(a) hsum8(_mm256_add_ps(_mm256_add_ps((a)[0], (a)[1]), _mm256_add_ps((a)[2], (a)[3])))

/* One activation row: the share's rows [n0, n1) as two streams read side by side, row n0 + i with row mid + i
 * (a lone last row by itself). A 2-core Zen 3 reads ~20 % more per second from two distant sequential streams
 * than from one (more lines in flight from the L2 prefetcher): 40 vs 33 GB/s, above torch's one-stream sum.
 * Each row's sum runs in the same order however the rows pair up. */
#define DEFINE_SEQ1(NAME, WTYPE, HALVES)                                                             \
    static void NAME##_m1(const uint16_t *x, const float *xf, const WTYPE *w, const float *scale, float *y, \
                          int64_t N, int64_t K, const uint16_t *bias, int out_bf16, int64_t n0, int64_t n1) { \
        int64_t half = (n1 - n0) / 2, mid = n0 + half;                                                \
        for (int64_t n = n0; n < mid; n++) {                                                          \
            const WTYPE *wr = w + n * K, *wq = w + (n + half) * K;                                    \
            __m256 a[4], b[4];                                                                        \
            for (int i = 0; i < 4; i++) a[i] = b[i] = _mm256_setzero_ps();                            \
            for (int64_t k = 0; k < K; k += 32) {                                                     \
                SEQ1_STEP(HALVES, wr, a);                                                             \
                SEQ1_STEP(HALVES, wq, b);                                                             \
            }                                                                                         \
            store_out(y, n, SEQ1_SUM(a), scale ? scale[n] : 1.0f, bias, n, out_bf16);                 \
            store_out(y, n + half, SEQ1_SUM(b), scale ? scale[n + half] : 1.0f, bias, n + half, out_bf16); \
        }                                                                                             \
        for (int64_t n = mid + half; n < n1; n++) {                                                   \
            const WTYPE *wr = w + n * K;                                                              \
            __m256 a[4];                                                                              \
            for (int i = 0; i < 4; i++) a[i] = _mm256_setzero_ps();                                   \
            for (int64_t k = 0; k < K; k += 32) SEQ1_STEP(HALVES, wr, a);                             \
            store_out(y, n, SEQ1_SUM(a), scale ? scale[n] : 1.0f, bias, n, out_bf16);                 \
        }                                                                                             \
    }

#define DEFINE_BLOCK(NAME, WTYPE, HALVES, M)                                                         \
    static void NAME##_m##M(const uint16_t *x, const float *xf, const WTYPE *w, const float *scale, float *y, \
                            int64_t N, int64_t K, const uint16_t *bias, int out_bf16, int64_t b0, int64_t b1) { \
        enum { NR = DP_NR(M) };                                                                       \
        for (int64_t b = b0; b < b1; b++) {                                                           \
            int64_t n0 = b * NR;                                                                      \
            int nr = N - n0 < NR ? (int)(N - n0) : NR;                                                \
            const WTYPE *wr[NR];                                                                      \
            for (int r = 0; r < NR; r++) wr[r] = w + (n0 + (r < nr ? r : 0)) * K;                     \
            __m256 acc[NR][M];                                                                        \
            for (int r = 0; r < NR; r++)                                                              \
                for (int m = 0; m < M; m++) acc[r][m] = _mm256_setzero_ps();                          \
            for (int64_t k = 0; k < K; k += 16) {                                                     \
                __m256 wl[NR], wh[NR];                                                                \
                for (int r = 0; r < NR; r++) HALVES(wr[r] + k, &wl[r], &wh[r]);                       \
                for (int m = 0; m < M; m++) {                                                         \
                    __m256 xl, xh;                                                                    \
                    X_HALVES(m, k, xl, xh);                                                           \
                    for (int r = 0; r < NR; r++)                                                      \
                        acc[r][m] = _mm256_fmadd_ps(wh[r], xh, _mm256_fmadd_ps(wl[r], xl, acc[r][m])); \
                }                                                                                     \
            }                                                                                         \
            for (int r = 0; r < nr; r++)                                                              \
                for (int m = 0; m < M; m++)                                                           \
                    store_out(y, m * N + n0 + r, hsum8(acc[r][m]), scale ? scale[n0 + r] : 1.0f, bias, n0 + r, \
                              out_bf16);                                                              \
        }                                                                                             \
    }

#define DEFINE_GEMV(NAME, WTYPE, HALVES)                                                             \
    DEFINE_SEQ1(NAME, WTYPE, HALVES)                                                                 \
    DEFINE_BLOCK(NAME, WTYPE, HALVES, 2) DEFINE_BLOCK(NAME, WTYPE, HALVES, 3)                        \
    DEFINE_BLOCK(NAME, WTYPE, HALVES, 4) DEFINE_BLOCK(NAME, WTYPE, HALVES, 5)                        \
    DEFINE_BLOCK(NAME, WTYPE, HALVES, 6) DEFINE_BLOCK(NAME, WTYPE, HALVES, 7)                        \
    DEFINE_BLOCK(NAME, WTYPE, HALVES, 8)                                                             \
    int64_t NAME##_align(int64_t M) { return DP_NR(M); }                                           \
    void NAME##_rows(const uint16_t *x, const WTYPE *w, const float *scale, float *y, int64_t M, int64_t N, \
                     int64_t K, const uint16_t *bias, int out_bf16, int64_t n0, int64_t n1) {         \
        int64_t nr = DP_NR(M), b0 = n0 / nr, b1 = (n1 + nr - 1) / nr;                                 \
        const float *xf = n1 > n0 ? widen_rows(x, M * K) : NULL;                             \
        switch (M) {                                                                                  \
            case 1: NAME##_m1(x, xf, w, scale, y, N, K, bias, out_bf16, n0, n1); break;               \
            case 2: NAME##_m2(x, xf, w, scale, y, N, K, bias, out_bf16, b0, b1); break;               \
            case 3: NAME##_m3(x, xf, w, scale, y, N, K, bias, out_bf16, b0, b1); break;               \
            case 4: NAME##_m4(x, xf, w, scale, y, N, K, bias, out_bf16, b0, b1); break;               \
            case 5: NAME##_m5(x, xf, w, scale, y, N, K, bias, out_bf16, b0, b1); break;               \
            case 6: NAME##_m6(x, xf, w, scale, y, N, K, bias, out_bf16, b0, b1); break;               \
            case 7: NAME##_m7(x, xf, w, scale, y, N, K, bias, out_bf16, b0, b1); break;               \
            default: NAME##_m8(x, xf, w, scale, y, N, K, bias, out_bf16, b0, b1); break;              \
        }                                                                                             \
    }                                                                                                 \
    int NAME(const uint16_t *x, const WTYPE *w, const float *scale, float *y, int64_t M, int64_t N,   \
             int64_t K, int nthreads, const uint16_t *bias, int out_bf16) {                           \
        if (K % 32 != 0) return -1;                                                                   \
        if (M < 1 || M > 8) return -2;                                                                \
        _Pragma("omp parallel num_threads(nthreads)")                                                 \
        {                                                                                             \
            int64_t lo, hi;                                                                           \
            share(N, DP_NR(M), omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);                \
            NAME##_rows(x, w, scale, y, M, N, K, bias, out_bf16, lo, hi);                             \
        }                                                                                             \
        return 0;                                                                                     \
    }

DEFINE_GEMV(gemv_bf16_dp, uint16_t, bf16x16_halves)
DEFINE_GEMV(gemv_i8_dp, int8_t, i8x16_halves)
