/* Integer-dot-product GEMV for CPU decoding: y (M, N) bf16 = x (M, K) bf16 @ W.T for M <= 8 rows, with the
 * activations quantized to int8 once per call (as llama.cpp quantizes them to Q8 for its Q8_0 / Q4_0 dot products)
 * and the weight int8 per output channel or group-wise 4-bit. The exact kernels (cpu_gemv.c, cpu_int4.c) widen
 * every weight to bf16 and are compute-bound on one core; here 64 weights cost one integer dot-product
 * instruction (AVX512-VNNI vpdpbusd: u8 x s8 -> int32; AVX2: vpmaddubsw + vpmaddwd).
 *
 * Activations: row m, block b of B columns: d = max |x| / 127, xq = round(x / d) in -127..127 (ties to even),
 * sx = sum xq. int8 weights use B = 32 (Q8_0's block), 4-bit weights B = 128 (one block per packed 64 bytes).
 *
 * int8 W (N, K) row-major, scale s (N) fp32. vpdpbusd needs unsigned bytes on one side: the weight bytes are
 * flipped to w + 128 (one xor per 64), and sum (w + 128) xq = sum w xq + 128 sx, so
 *     y[m, n] = s[n] * (sum_b d[m, b] * dot_b - C[m]),   C[m] = 128 * sum_b d[m, b] sx[m, b]   (once per call).
 * The AVX2 variant uses llama.cpp's sign trick instead (|w| x sign(xq, w): products fit maddubs' int16 pairs).
 *
 * 4-bit W (layout in quantization/int4.py: 128 columns per 64 bytes, 16-bit lane l holding columns l, 32 + l,
 * 64 + l, 96 + l in nibbles 0..3), codes q in 0..15 are already unsigned; the zero point comes out as
 *     y[m, n] = sum_b s[n, g] d[m, b] (dot_b - z[n, g] sx[m, b]),   g = the weight group of block b.
 * The low nibbles of byte 2l + h are column l + 64h, the high ones 32 + l + 64h: the quantized activations are
 * stored in that order once per call (xq[0..63] for the low nibbles, xq[64..127] for the high ones), so no
 * shuffle runs in the inner loop; within a block the integer sum does not depend on the order.
 *
 * Integer sums are exact, scales are applied in fp32. Rows of W are split between threads in contiguous shares
 * (results do not depend on the split). Needs K % 128 == 0 (and G % 128 == 0); returns 0, -1 on a shape it does
 * not handle, -3 without memory. use512: the AVX512-VNNI variant, else AVX2 (both in both library builds).
 */
#include "cpu_common.h"

#define QB 128         /* columns per inner step (and the 4-bit kernel's activation block) */
#define I8_BLOCK 32    /* the int8 kernel's activation block */
/* Software prefetch distance along the weight stream, 4-bit / int8 (0: none). Measured 1 thread, Zen 4, one
 * activation row, 2B shapes: 4-bit 15.5 -> 16.8 GB/s with 4 KiB (8960 x 1536), int8 24.6 -> 22.3 (slower). */
#ifndef ID_PF_BYTES
#define ID_PF_BYTES 4096
#endif
#ifndef ID_PF_I8
#define ID_PF_I8 0
#endif
#ifndef ID_NR1
#define ID_NR1 1         /* weight rows per step for one activation row */
#endif

typedef struct {       /* one call's quantized activations (M rows) */
    int8_t *xq;        /* (M, K) */
    float *d;          /* (M, K / B) block scales */
    float *dexp;       /* int8 AVX512: (M, K / 4), each block's d repeated per int32 lane of its 64-byte vector */
    float *c;          /* int8: C[m]; 4-bit: (M, K / B) d * sx */
} qacts;

/* Quantize row blocks of B; perm: store each 128-block in the 4-bit kernel's nibble order. */
static void quantize_rows(const uint16_t *x, int64_t M, int64_t K, int B, int perm, int8_t *xq, float *d, int32_t *sx) {
    float v[QB];
    for (int64_t m = 0; m < M; m++)
        for (int64_t b = 0; b < K / B; b++) {
            const uint16_t *xb = x + m * K + b * B;
            float amax = 0.0f;
            for (int i = 0; i < B; i++) {
                v[i] = bf16_to_f32(xb[i]);
                amax = fmaxf(amax, fabsf(v[i]));
            }
            float db = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
            int32_t s = 0;
            int8_t *o = xq + m * K + b * B;
            for (int i = 0; i < B; i++) {
                int q = (int)nearbyintf(v[i] * inv);
                q = q > 127 ? 127 : q < -127 ? -127 : q;
                s += q;
                /* column i -> position: low nibbles (i % 64 < 32) at 2 (i % 32) + i / 64, high at 64 + that */
                int pos = perm ? ((i & 32) ? 64 : 0) + 2 * (i & 31) + (i >> 6) : i;
                o[pos] = (int8_t)q;
            }
            d[m * (K / B) + b] = db;
            sx[m * (K / B) + b] = s;
        }
}

static int qacts_make(qacts *a, const uint16_t *x, int64_t M, int64_t K, int B, int perm) {
    int64_t nb = K / B;
    a->xq = (int8_t *)malloc(M * K + sizeof(float) * (M * nb * 2 + M * K / 4 + M) + sizeof(int32_t) * M * nb);
    if (a->xq == NULL) return -3;
    a->d = (float *)(a->xq + M * K);
    a->c = a->d + M * nb;          /* M * nb (4-bit) or M (int8) */
    a->dexp = a->c + M * nb;
    int32_t *sx = (int32_t *)(a->dexp + M * K / 4);
    quantize_rows(x, M, K, B, perm, a->xq, a->d, sx);
    if (B == I8_BLOCK) {
        for (int64_t m = 0; m < M; m++) {
            float c = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                c += a->d[m * nb + b] * (float)(128 * sx[m * nb + b]);
                for (int l = 0; l < 8; l++) a->dexp[m * K / 4 + b * 8 + l] = a->d[m * nb + b];
            }
            a->c[m] = c;
        }
    } else {
        for (int64_t i = 0; i < M * nb; i++) a->c[i] = a->d[i] * (float)sx[i];
    }
    return 0;
}

static inline void id_store(uint16_t *y, int64_t N, int64_t n, int m, float v) { y[m * N + n] = f32_to_bf16(v); }

/* ------------------------------------------------------------------------------------------ AVX512-VNNI */
#define TV __attribute__((target("avx512vnni,avx512bw,avx512vl,avx512f"), always_inline)) static inline
#define TVF __attribute__((target("avx512vnni,avx512bw,avx512vl,avx512f")))

/* int8: NR weight rows from n0 times M activation rows; NA float accumulators per pair (chains in flight). */
TV void i8_rows_512(const qacts *a, const int8_t *w, const float *s, uint16_t *y, int64_t N, int64_t K,
                    int64_t n0, int nr, const int M, const int NR) {
    const int NA = M <= 2 ? 2 : 1;
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    const int8_t *wr[4];
    __m512 acc[4][8][2];
#pragma GCC unroll 4
    for (int r = 0; r < NR; r++) {
        wr[r] = w + (n0 + (r < nr ? r : 0)) * K;
#pragma GCC unroll 8
        for (int m = 0; m < M; m++) acc[r][m][0] = acc[r][m][1] = _mm512_setzero_ps();
    }
    for (int64_t k = 0; k < K; k += QB) {
#pragma GCC unroll 4
        for (int r = 0; r < NR; r++) {
            if (ID_PF_I8) {
                _mm_prefetch((const char *)(wr[r] + k + ID_PF_I8), _MM_HINT_T0);
                _mm_prefetch((const char *)(wr[r] + k + 64 + ID_PF_I8), _MM_HINT_T0);
            }
#pragma GCC unroll 2
            for (int h = 0; h < 2; h++) {
                __m512i wv = _mm512_xor_si512(_mm512_loadu_si512(wr[r] + k + 64 * h), flip);
#pragma GCC unroll 8
                for (int m = 0; m < M; m++) {
                    __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv,
                                                      _mm512_loadu_si512(a->xq + m * K + k + 64 * h));
                    __m512 dv = _mm512_loadu_ps(a->dexp + m * K / 4 + (k + 64 * h) / 4);
                    acc[r][m][h % NA] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), dv, acc[r][m][h % NA]);
                }
            }
        }
    }
    for (int r = 0; r < NR && r < nr; r++)
        for (int m = 0; m < M; m++) {
            __m512 t = NA > 1 ? _mm512_add_ps(acc[r][m][0], acc[r][m][1]) : acc[r][m][0];
            id_store(y, N, n0 + r, m, (_mm512_reduce_add_ps(t) - a->c[m]) * s[n0 + r]);
        }
}

/* 4-bit: per 128-column block an int32 dot (two vpdpbusd), converted and scaled by s d once per block. Block b
 * of group g into accumulator set H (two sets, alternating, keep two fma chains in flight). */
#define Q4_STEP_512(b, g, H)                                                                                \
    do {                                                                                                    \
        _Pragma("GCC unroll 4") for (int r = 0; r < NR; r++) {                                              \
            int64_t i = (n0 + (r < nr ? r : 0)) * ng + (g);                                                 \
            float sc = s[i], zc = s[i] * (float)z[i];                                                       \
            const uint8_t *p = wr[r] + (b) * 64;                                                            \
            _mm_prefetch((const char *)(p + ID_PF_BYTES), _MM_HINT_T0);                                     \
            __m512i wb = _mm512_loadu_si512(p);                                                             \
            __m512i v0 = _mm512_and_si512(wb, low), v1 = _mm512_and_si512(_mm512_srli_epi16(wb, 4), low);   \
            _Pragma("GCC unroll 8") for (int m = 0; m < M; m++) {                                           \
                const int8_t *xm = a->xq + m * K + (b) * QB;                                                \
                __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), v0, _mm512_loadu_si512(xm));      \
                dot = _mm512_dpbusd_epi32(dot, v1, _mm512_loadu_si512(xm + 64));                            \
                __m512 sd = _mm512_set1_ps(sc * a->d[m * nb + (b)]);                                        \
                acc[r][m][H] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), sd, acc[r][m][H]);                  \
                corr[r][m][H] += zc * a->c[m * nb + (b)];                                                   \
            }                                                                                               \
        }                                                                                                   \
    } while (0)

TV void q4_rows_512(const qacts *a, const uint8_t *w, const float *s, const uint8_t *z, uint16_t *y, int64_t N,
                    int64_t K, int64_t G, int64_t n0, int nr, const int M, const int NR) {
    const __m512i low = _mm512_set1_epi8(0x0F);
    int64_t ng = K / G, nb = K / QB, rowb = K / 2, per = G / QB;
    const uint8_t *wr[4];
    __m512 acc[4][8][2];
    float corr[4][8][2];
#pragma GCC unroll 4
    for (int r = 0; r < NR; r++) {
        wr[r] = w + (n0 + (r < nr ? r : 0)) * rowb;
#pragma GCC unroll 8
        for (int m = 0; m < M; m++)
            acc[r][m][0] = acc[r][m][1] = _mm512_setzero_ps(), corr[r][m][0] = corr[r][m][1] = 0.0f;
    }
    if (per == 1) { /* group 128 (the default): a block is a group, two per step */
        int64_t b = 0;
        for (; b + 2 <= nb; b += 2) {
            Q4_STEP_512(b, b, 0);
            Q4_STEP_512(b + 1, b + 1, 1);
        }
        if (b < nb) Q4_STEP_512(b, b, 0);
    } else {
        for (int64_t g = 0; g < ng; g++)
            for (int64_t b = g * per; b < (g + 1) * per; b++) Q4_STEP_512(b, g, 0);
    }
    for (int r = 0; r < NR && r < nr; r++)
        for (int m = 0; m < M; m++)
            id_store(y, N, n0 + r, m, _mm512_reduce_add_ps(_mm512_add_ps(acc[r][m][0], acc[r][m][1])) -
                                          (corr[r][m][0] + corr[r][m][1]));
}

/* ------------------------------------------------------------------------------------------ AVX2 */
#define T2 __attribute__((target("avx2,fma"), always_inline)) static inline
#define T2F __attribute__((target("avx2,fma")))

T2 float hsum256(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

/* int8, one weight row: per 32-column block, |w| (u8) x sign(xq, w) (s8) pair sums (|.| <= 2 * 127 * 127, no
 * int16 saturation), widened to int32, converted and scaled by the block's d. */
T2 void i8_row_256(const qacts *a, const int8_t *w, const float *s, uint16_t *y, int64_t N, int64_t K, int64_t n,
                   const int M) {
    const __m256i ones = _mm256_set1_epi16(1);
    const int NA = M <= 2 ? 2 : 1;
    const int8_t *wr = w + n * K;
    __m256 acc[8][2];
#pragma GCC unroll 8
    for (int m = 0; m < M; m++) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += QB) {
        if (ID_PF_I8) {
            _mm_prefetch((const char *)(wr + k + ID_PF_I8), _MM_HINT_T0);
            _mm_prefetch((const char *)(wr + k + 64 + ID_PF_I8), _MM_HINT_T0);
        }
#pragma GCC unroll 4
        for (int j = 0; j < QB / I8_BLOCK; j++) {
            int64_t kb = k + j * I8_BLOCK;
            __m256i wv = _mm256_loadu_si256((const __m256i *)(wr + kb)), aw = _mm256_sign_epi8(wv, wv);
#pragma GCC unroll 8
            for (int m = 0; m < M; m++) {
                __m256i xv = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(a->xq + m * K + kb)), wv);
                __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, xv), ones);
                __m256 dv = _mm256_set1_ps(a->d[m * (K / I8_BLOCK) + kb / I8_BLOCK]);
                acc[m][j % NA] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), dv, acc[m][j % NA]);
            }
        }
    }
    for (int m = 0; m < M; m++) id_store(y, N, n, m, hsum256(_mm256_add_ps(acc[m][0], acc[m][1])) * s[n]);
}

/* 4-bit, one weight row: codes 0..15 (u8) x xq (s8); four maddubs per 128-block sum to <= 4 * 2 * 15 * 127
 * (fits int16) before one widening. */
T2 void q4_row_256(const qacts *a, const uint8_t *w, const float *s, const uint8_t *z, uint16_t *y, int64_t N,
                   int64_t K, int64_t G, int64_t n, const int M) {
    const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    int64_t ng = K / G, nb = K / QB, per = G / QB;
    const uint8_t *wr = w + n * (K / 2);
    __m256 acc[8];
    float corr[8];
#pragma GCC unroll 8
    for (int m = 0; m < M; m++) acc[m] = _mm256_setzero_ps(), corr[m] = 0.0f;
    for (int64_t g = 0; g < ng; g++) {
        float sc = s[n * ng + g], zc = sc * (float)z[n * ng + g];
        for (int64_t b = g * per; b < (g + 1) * per; b++) {
            const uint8_t *p = wr + b * 64;
            _mm_prefetch((const char *)(p + ID_PF_BYTES), _MM_HINT_T0);
            __m256i b0 = _mm256_loadu_si256((const __m256i *)p), b1 = _mm256_loadu_si256((const __m256i *)(p + 32));
            __m256i lo0 = _mm256_and_si256(b0, low), lo1 = _mm256_and_si256(b1, low);
            __m256i hi0 = _mm256_and_si256(_mm256_srli_epi16(b0, 4), low);
            __m256i hi1 = _mm256_and_si256(_mm256_srli_epi16(b1, 4), low);
#pragma GCC unroll 8
            for (int m = 0; m < M; m++) {
                const int8_t *xm = a->xq + m * K + b * QB;
                __m256i t = _mm256_add_epi16(
                    _mm256_add_epi16(_mm256_maddubs_epi16(lo0, _mm256_loadu_si256((const __m256i *)xm)),
                                     _mm256_maddubs_epi16(lo1, _mm256_loadu_si256((const __m256i *)(xm + 32)))),
                    _mm256_add_epi16(_mm256_maddubs_epi16(hi0, _mm256_loadu_si256((const __m256i *)(xm + 64))),
                                     _mm256_maddubs_epi16(hi1, _mm256_loadu_si256((const __m256i *)(xm + 96)))));
                __m256 sd = _mm256_set1_ps(sc * a->d[m * nb + b]);
                acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(t, ones)), sd, acc[m]);
                corr[m] += zc * a->c[m * nb + b];
            }
        }
    }
    for (int m = 0; m < M; m++) id_store(y, N, n, m, hsum256(acc[m]) - corr[m]);
}

/* ------------------------------------------------------------------------------------------ entry points */
typedef struct {       /* one call: activations, weight (int8 or packed 4-bit), scales, zero points, output */
    qacts a;
    const void *w;
    const float *s;
    const uint8_t *z;
    uint16_t *y;
    int64_t N, K, G;
} id_job;
typedef void (*id_fn)(const id_job *, int64_t, int64_t);

/* One weight row at a time for one activation row (one sequential stream, as cpu_int4.c measured best),
 * two for 2-8 rows (each activation load feeds two rows). */
#define ID_NR(M) ((M) <= 1 ? ID_NR1 : 2)
#define ID_STEP(M) (hi - n < ID_NR(M) ? (int)(hi - n) : ID_NR(M))
#define DEFINE_M(M)                                                                                         \
    TVF static void i8_512_m##M(const id_job *j, int64_t lo, int64_t hi) {                                  \
        for (int64_t n = lo; n < hi; n += ID_NR(M))                                                         \
            i8_rows_512(&j->a, j->w, j->s, j->y, j->N, j->K, n, ID_STEP(M), M, ID_NR(M));                   \
    }                                                                                                       \
    TVF static void q4_512_m##M(const id_job *j, int64_t lo, int64_t hi) {                                  \
        for (int64_t n = lo; n < hi; n += ID_NR(M))                                                         \
            q4_rows_512(&j->a, j->w, j->s, j->z, j->y, j->N, j->K, j->G, n, ID_STEP(M), M, ID_NR(M));       \
    }                                                                                                       \
    T2F static void i8_256_m##M(const id_job *j, int64_t lo, int64_t hi) {                                  \
        for (int64_t n = lo; n < hi; n++) i8_row_256(&j->a, j->w, j->s, j->y, j->N, j->K, n, M);            \
    }                                                                                                       \
    T2F static void q4_256_m##M(const id_job *j, int64_t lo, int64_t hi) {                                  \
        for (int64_t n = lo; n < hi; n++) q4_row_256(&j->a, j->w, j->s, j->z, j->y, j->N, j->K, j->G, n, M); \
    }
DEFINE_M(1) DEFINE_M(2) DEFINE_M(3) DEFINE_M(4) DEFINE_M(5) DEFINE_M(6) DEFINE_M(7) DEFINE_M(8)

static const id_fn I8_FNS[2][8] = {
    {i8_256_m1, i8_256_m2, i8_256_m3, i8_256_m4, i8_256_m5, i8_256_m6, i8_256_m7, i8_256_m8},
    {i8_512_m1, i8_512_m2, i8_512_m3, i8_512_m4, i8_512_m5, i8_512_m6, i8_512_m7, i8_512_m8}};
static const id_fn Q4_FNS[2][8] = {
    {q4_256_m1, q4_256_m2, q4_256_m3, q4_256_m4, q4_256_m5, q4_256_m6, q4_256_m7, q4_256_m8},
    {q4_512_m1, q4_512_m2, q4_512_m3, q4_512_m4, q4_512_m5, q4_512_m6, q4_512_m7, q4_512_m8}};

/* Quantize x (M rows) and run fn over the N weight rows on nthreads threads in contiguous shares. */
static int id_run(id_job *j, const uint16_t *x, int64_t M, int block, int perm, id_fn fn, int64_t align,
                  int nthreads) {
    if (qacts_make(&j->a, x, M, j->K, block, perm)) return -3;
#pragma omp parallel num_threads(nthreads)
    {
        int64_t lo, hi;
        share(j->N, align, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);
        fn(j, lo, hi);
    }
    free(j->a.xq);
    return 0;
}

/* x bf16 (M, K), w int8 (N, K), s fp32 (N) -> y bf16 (M, N). */
int gemv_i8_intdot(const uint16_t *x, const int8_t *w, const float *s, uint16_t *y, int64_t M, int64_t N, int64_t K,
                   int nthreads, int use512) {
    if (M < 1 || M > 8 || K <= 0 || K % QB) return -1;
    id_job j = {.w = w, .s = s, .z = NULL, .y = y, .N = N, .K = K, .G = K};
    use512 = use512 != 0;
    return id_run(&j, x, M, I8_BLOCK, 0, I8_FNS[use512][M - 1], use512 ? ID_NR(M) : 1, nthreads);
}

/* x bf16 (M, K), w / s / z the 4-bit layout (group G) -> y bf16 (M, N). */
int gemv_q4_intdot(const uint16_t *x, const uint8_t *w, const float *s, const uint8_t *z, uint16_t *y, int64_t M,
                   int64_t N, int64_t K, int64_t G, int nthreads, int use512) {
    if (M < 1 || M > 8 || K <= 0 || G <= 0 || K % QB || G % QB || K % G) return -1;
    id_job j = {.w = w, .s = s, .z = z, .y = y, .N = N, .K = K, .G = G};
    use512 = use512 != 0;
    return id_run(&j, x, M, QB, 1, Q4_FNS[use512][M - 1], use512 ? ID_NR(M) : 1, nthreads);
}
