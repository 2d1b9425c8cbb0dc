/* 4-bit weight GEMV for CPU decoding: y (M, N) bf16 = x (M, K) bf16 @ W.T for M <= 8 rows, W group-wise 4-bit.
 *
 * W[n, k] = (q[n, k] - z[n, g]) * s[n, g], g = k / G. Layout (quantization/int4.py): row n is K / 2 bytes, 128
 * columns per 64-byte block read as 32 16-bit lanes, lane l holding columns l, 32 + l, 64 + l, 96 + l in its
 * nibbles 0..3 (low to high). s fp32 (N, K/G), z uint8 (N, K/G). Needs K % 128 == 0 and G % 128 == 0.
 *
 * The zero point comes out of the inner loop: sum_k x_k W[n, k] = sum_g s_g (sum_{k in g} x_k q_k) - sum_g s_g z_g
 * sx_g, with sx_g = sum_{k in g} x_k computed once per call. So the inner loop only widens codes and multiplies:
 *  - AVX512-BF16: codes turned into bf16 (128 + q) exactly by one bit operation each, dot products with the bf16
 *    activations (vdpbf16ps: exact products, fp32 sums) into a per-group accumulator, scaled into the total once
 *    per group;
 *  - AVX2 + FMA: codes widened to fp32, times the group's scale, FMA with fp32 activations (put in the
 *    lane order of the codes once per call).
 * Both read each weight byte once for all M rows; rows of W are split between threads in contiguous shares, so
 * how a call is split never changes a result. Exported in both library builds; the Python side calls the
 * variant this CPU runs. Returns 0, or -1 on a shape it does not handle.
 */
#include "cpu_common.h"

#define Q4_BLOCK 128
/* Software prefetch distance in weight rows: rows are short (K / 2 bytes: 768 on the 2B's q/k/v/o/gate/up) and
 * read NR at a time, too short a stream each for the hardware prefetcher to ramp up on, so the same block of the
 * rows this far ahead is requested while the current ones are multiplied. */
#ifndef Q4_PF_ROWS
#define Q4_PF_ROWS 3
#endif

/* sx (M, K / G): each group's activation sum, from bf16 x (M, K). */
static void group_sums(const uint16_t *x, int64_t M, int64_t K, int64_t G, float *sx) {
    int64_t ng = K / G;
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < ng; g++) {
            float s = 0.0f;
            for (int64_t k = g * G; k < (g + 1) * G; k++) s += bf16_to_f32(x[m * K + k]);
            sx[m * ng + g] = s;
        }
}

static inline void q4_store(uint16_t *y, int64_t N, int64_t n, int m, float v) { y[m * N + n] = f32_to_bf16(v); }

/* ------------------------------------------------------------------------------------------ AVX512-BF16 */
#define T512 __attribute__((target("avx512bf16,avx512vl,avx512bw,avx512f"), always_inline)) static inline

/* Codes (w >> shift) & 15 of each 16-bit lane as bf16 128 + q: OR-ing 0x4300 (bf16 128.0, whose mantissa step
 * is 1) into the nibble gives that value exactly in one ternary-logic op, no table or widening; the extra 128 is
 * taken out with the zero point (z + 128). */
T512 __m512bh nib_bf16(__m512i w, const int shift) {
    __m512i v = shift ? _mm512_srli_epi16(w, shift) : w;
    return (__m512bh)_mm512_ternarylogic_epi32(v, _mm512_set1_epi16(0x000F), _mm512_set1_epi16(0x4300), 0xEA);
}

/* NR rows of W [n0, n0 + nr) times M rows of x; constant M / NR after inlining (registers, unrolled loops).
 * NA accumulators per (row, x row) keep enough dot-product chains in flight for one or two activation rows. */
T512 void q4_rows_512(const uint16_t *x, const uint8_t *w, const float *s, const uint8_t *z, const float *sx,
                      uint16_t *y, int64_t N, int64_t K, int64_t G, int64_t n0, int nr, const int M, const int NR) {
    const int NA = M <= 2 ? 2 : 1;
    int64_t ng = K / G, rowb = K / 2;
    const uint8_t *wr[4];
    __m512 tot[4][8];
    float corr[4][8];
#pragma GCC unroll 4
    for (int r = 0; r < NR; r++) {
        wr[r] = w + (n0 + (r < nr ? r : 0)) * rowb;
#pragma GCC unroll 8
        for (int m = 0; m < M; m++) tot[r][m] = _mm512_setzero_ps(), corr[r][m] = 0.0f;
    }
    for (int64_t g = 0; g < ng; g++) {
        __m512 acc[4][8][2];
#pragma GCC unroll 4
        for (int r = 0; r < NR; r++)
#pragma GCC unroll 8
            for (int m = 0; m < M; m++) acc[r][m][0] = acc[r][m][1] = _mm512_setzero_ps();
        for (int64_t k = g * G; k < (g + 1) * G; k += Q4_BLOCK) {
#pragma GCC unroll 4
            for (int r = 0; r < NR; r++) {
                const uint8_t *p = wr[r] + k / 2;
                _mm_prefetch((const char *)(p + Q4_PF_ROWS * rowb), _MM_HINT_T0);
                __m512i b = _mm512_loadu_si512(p);
                __m512bh v0 = nib_bf16(b, 0), v1 = nib_bf16(b, 4), v2 = nib_bf16(b, 8), v3 = nib_bf16(b, 12);
#pragma GCC unroll 8
                for (int m = 0; m < M; m++) {
                    const uint16_t *xm = x + m * K + k;
                    __m512 *a = acc[r][m];
                    a[0] = _mm512_dpbf16_ps(a[0], v0, (__m512bh)_mm512_loadu_si512(xm));
                    a[1 % NA] = _mm512_dpbf16_ps(a[1 % NA], v1, (__m512bh)_mm512_loadu_si512(xm + 32));
                    a[0] = _mm512_dpbf16_ps(a[0], v2, (__m512bh)_mm512_loadu_si512(xm + 64));
                    a[1 % NA] = _mm512_dpbf16_ps(a[1 % NA], v3, (__m512bh)_mm512_loadu_si512(xm + 96));
                }
            }
        }
#pragma GCC unroll 4
        for (int r = 0; r < NR; r++) {
            int64_t i = (n0 + (r < nr ? r : 0)) * ng + g;
            float sc = s[i], szc = sc * (float)(z[i] + 128);
            __m512 vs = _mm512_set1_ps(sc);
#pragma GCC unroll 8
            for (int m = 0; m < M; m++) {
                __m512 a = NA > 1 ? _mm512_add_ps(acc[r][m][0], acc[r][m][1]) : acc[r][m][0];
                tot[r][m] = _mm512_fmadd_ps(a, vs, tot[r][m]);
                corr[r][m] += szc * sx[m * ng + g];
            }
        }
    }
    for (int r = 0; r < nr; r++)
        for (int m = 0; m < M; m++) q4_store(y, N, n0 + r, m, _mm512_reduce_add_ps(tot[r][m]) - corr[r][m]);
}

#define Q4_NR(M) ((M) <= 1 ? 1 : (M) <= 4 ? 2 : 1)
#define DEFINE_Q4_512(M)                                                                            \
    __attribute__((target("avx512bf16,avx512vl,avx512bw,avx512f")))                                \
    static void q4_512_m##M(const uint16_t *x, const uint8_t *w, const float *s, const uint8_t *z,   \
                            const float *sx, uint16_t *y, int64_t N, int64_t K, int64_t G, int64_t lo, \
                            int64_t hi) {                                                           \
        for (int64_t n = lo; n < hi; n += Q4_NR(M)) {                                               \
            int nr = hi - n < Q4_NR(M) ? (int)(hi - n) : Q4_NR(M);                                  \
            q4_rows_512(x, w, s, z, sx, y, N, K, G, n, nr, M, Q4_NR(M));                            \
        }                                                                                           \
    }
DEFINE_Q4_512(1) DEFINE_Q4_512(2) DEFINE_Q4_512(3) DEFINE_Q4_512(4)
DEFINE_Q4_512(5) DEFINE_Q4_512(6) DEFINE_Q4_512(7) DEFINE_Q4_512(8)

typedef void (*q4_fn)(const uint16_t *, const uint8_t *, const float *, const uint8_t *, const float *, uint16_t *,
                      int64_t, int64_t, int64_t, int64_t, int64_t);

static int q4_run(q4_fn fn, int64_t align, const uint16_t *x, const uint8_t *w, const float *s, const uint8_t *z,
                  uint16_t *y, int64_t M, int64_t N, int64_t K, int64_t G, int nthreads) {
    float *sx = (float *)malloc(sizeof(float) * M * (K / G));
    if (sx == NULL) return -3;
    group_sums(x, M, K, G, sx);
#pragma omp parallel num_threads(nthreads)
    {
        int64_t lo, hi;
        share(N, align, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);
        fn(x, w, s, z, sx, y, N, K, G, lo, hi);
    }
    free(sx);
    return 0;
}

static int q4_check(int64_t M, int64_t K, int64_t G) {
    return (M < 1 || M > 8 || K <= 0 || G <= 0 || K % Q4_BLOCK || G % Q4_BLOCK || K % G) ? -1 : 0;
}

int gemv_q4_avx512bf16(const uint16_t *x, const uint8_t *w, const float *s, const uint8_t *z, uint16_t *y,
                       int64_t M, int64_t N, int64_t K, int64_t G, int nthreads) {
    static const q4_fn fns[8] = {q4_512_m1, q4_512_m2, q4_512_m3, q4_512_m4,
                                 q4_512_m5, q4_512_m6, q4_512_m7, q4_512_m8};
    if (q4_check(M, K, G)) return -1;
    return q4_run(fns[M - 1], Q4_NR(M), x, w, s, z, y, M, N, K, G, nthreads);
}

/* ------------------------------------------------------------------------------------------ AVX2 + FMA */
#define T256 __attribute__((target("avx2,fma"), always_inline)) static inline

/* The AVX2 kernel reads a block's 64 bytes as 2 x 8 32-bit lanes and takes nibble j (shift 4j) of every lane at
 * once; lane i of half h holds 16-bit lanes 16h + 2i and 16h + 2i + 1, so nibble j is column
 * 32 (j % 4) + 16 h + 2 i + j / 4. x is put in that order once per call (xp), so each 8 codes meet 8 contiguous
 * activations. */
static void permute_x_avx2(const uint16_t *x, float *xp, int64_t M, int64_t K) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t b = 0; b < K; b += Q4_BLOCK)
            for (int h = 0; h < 2; h++)
                for (int j = 0; j < 8; j++)
                    for (int i = 0; i < 8; i++)
                        xp[m * K + b + h * 64 + j * 8 + i] =
                            bf16_to_f32(x[m * K + b + 32 * (j % 4) + 16 * h + 2 * i + j / 4]);
}

/* One row n of W times M rows of permuted fp32 x; codes widened to fp32 and scaled, NA chains per x row. */
T256 void q4_row_256(const float *x, const uint8_t *w, const float *s, const uint8_t *z, const float *sx,
                     uint16_t *y, int64_t N, int64_t K, int64_t G, int64_t n, const int M) {
    const __m256i low = _mm256_set1_epi32(0x0F);
    const int NA = M == 1 ? 4 : M == 2 ? 2 : 1;
    int64_t ng = K / G;
    const uint8_t *wr = w + n * (K / 2);
    __m256 acc[8][4];
    float corr[8];
#pragma GCC unroll 8
    for (int m = 0; m < M; m++) {
#pragma GCC unroll 4
        for (int a = 0; a < NA; a++) acc[m][a] = _mm256_setzero_ps();
        corr[m] = 0.0f;
    }
    for (int64_t g = 0; g < ng; g++) {
        float sc = s[n * ng + g], szc = sc * (float)z[n * ng + g];
        __m256 vs = _mm256_set1_ps(sc);
        for (int64_t k = g * G; k < (g + 1) * G; k += Q4_BLOCK) {
            _mm_prefetch((const char *)(wr + k / 2 + Q4_PF_ROWS * (K / 2)), _MM_HINT_T0);
#pragma GCC unroll 2
            for (int h = 0; h < 2; h++) {
                __m256i b = _mm256_loadu_si256((const __m256i *)(wr + k / 2 + 32 * h));
#pragma GCC unroll 8
                for (int j = 0; j < 8; j++) {
                    __m256i c = _mm256_and_si256(j ? _mm256_srli_epi32(b, 4 * j) : b, low);
                    __m256 wv = _mm256_mul_ps(_mm256_cvtepi32_ps(c), vs);
#pragma GCC unroll 8
                    for (int m = 0; m < M; m++)
                        acc[m][j % NA] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * K + k + h * 64 + j * 8),
                                                         acc[m][j % NA]);
                }
            }
        }
#pragma GCC unroll 8
        for (int m = 0; m < M; m++) corr[m] += szc * sx[m * ng + g];
    }
    for (int m = 0; m < M; m++) {
        __m256 a = acc[m][0];
        for (int i = 1; i < NA; i++) a = _mm256_add_ps(a, acc[m][i]);
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
        h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        h = _mm_add_ss(h, _mm_movehdup_ps(h));
        q4_store(y, N, n, m, _mm_cvtss_f32(h) - corr[m]);
    }
}

#define DEFINE_Q4_256(M)                                                                            \
    __attribute__((target("avx2,fma")))                                                             \
    static void q4_256_m##M(const float *x, const uint8_t *w, const float *s, const uint8_t *z,      \
                            const float *sx, uint16_t *y, int64_t N, int64_t K, int64_t G, int64_t lo, \
                            int64_t hi) {                                                           \
        for (int64_t n = lo; n < hi; n++) q4_row_256(x, w, s, z, sx, y, N, K, G, n, M);             \
    }
DEFINE_Q4_256(1) DEFINE_Q4_256(2) DEFINE_Q4_256(3) DEFINE_Q4_256(4)
DEFINE_Q4_256(5) DEFINE_Q4_256(6) DEFINE_Q4_256(7) DEFINE_Q4_256(8)

typedef void (*q4_fn32)(const float *, const uint8_t *, const float *, const uint8_t *, const float *, uint16_t *,
                        int64_t, int64_t, int64_t, int64_t, int64_t);

int gemv_q4_avx2(const uint16_t *x, const uint8_t *w, const float *s, const uint8_t *z, uint16_t *y,
                 int64_t M, int64_t N, int64_t K, int64_t G, int nthreads) {
    static const q4_fn32 fns[8] = {q4_256_m1, q4_256_m2, q4_256_m3, q4_256_m4,
                                   q4_256_m5, q4_256_m6, q4_256_m7, q4_256_m8};
    if (q4_check(M, K, G)) return -1;
    float *xf = (float *)malloc(sizeof(float) * M * K + sizeof(float) * M * (K / G));
    if (xf == NULL) return -3;
    float *sx = xf + M * K;
    permute_x_avx2(x, xf, M, K);
    group_sums(x, M, K, G, sx);
    q4_fn32 fn = fns[M - 1];
#pragma omp parallel num_threads(nthreads)
    {
        int64_t lo, hi;
        share(N, 1, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);
        fn(xf, w, s, z, sx, y, N, K, G, lo, hi);
    }
    free(xf);
    return 0;
}

/* ------------------------------------------------------------------------------------------ dequantize */
/* Rows [0, N) of W into bf16 out (N, K): the many-rows (prefill) path multiplies that with torch's matmul.
 * Plain C that the compiler vectorizes for either build; (q - z) * s in fp32, rounded once as torch rounds. */
int dequant_q4_bf16(const uint8_t *w, const float *s, const uint8_t *z, uint16_t *out, int64_t N, int64_t K,
                    int64_t G, int nthreads) {
    if (K <= 0 || G <= 0 || K % Q4_BLOCK || G % Q4_BLOCK || K % G) return -1;
    int64_t ng = K / G;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint16_t *lanes = (const uint16_t *)(w + n * (K / 2));
        uint16_t *o = out + n * K;
        for (int64_t b = 0; b < K; b += Q4_BLOCK) {
            float sc = s[n * ng + b / G];
            int zp = z[n * ng + b / G];
            const uint16_t *l = lanes + b / 4;
            for (int j = 0; j < 4; j++)
                for (int i = 0; i < 32; i++)
                    o[b + 32 * j + i] = f32_to_bf16((float)(((l[i] >> (4 * j)) & 15) - zp) * sc);
        }
    }
    return 0;
}
