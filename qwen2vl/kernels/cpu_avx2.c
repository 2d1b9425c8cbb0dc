/* The decoding kernels for x86 CPUs with AVX2 + FMA but no AVX512 (Zen 1-3, Intel client cores): the same entry
 * points and semantics as the AVX512 library's bf16-activation GEMV (cpu_gemv.c *_dp), decode attention, RMSNorm,
 * SiLU*up and quick-GELU (cpu_decode.c), so cpu_layer.c's fused decoding step builds on either library.
 *
 * PyTorch's own bf16 matmuls on such CPUs convert through a slow path (measured on a 2-core Zen VM: a bf16 GEMV
 * reads ~20 GB/s of a ~40 GB/s machine; a bf16 8-row product runs at ~20 GFLOP/s, fp32 at ~160): here weights are
 * widened to fp32 in registers (bf16 -> fp32 is a 16-bit shift, int8 an integer convert) and accumulated with FMA.
 * Vectors are 8 floats; where the AVX512 kernels use 16 lanes, these take the same steps on two halves, so the
 * elementwise kernels (exp, SiLU, quick-GELU) give the same bits as theirs. Sums run in another order (8 lanes),
 * so GEMV / norm / attention results differ from the AVX512 ones in the last bits, never between paths here.
 */
#include "cpu_common.h"

static inline __m256 bf16x8(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

static inline float hmax8(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

/* exp(x) for x <= 0: cpu_common.h's exp_nonpos step for step (2^n applied as an exact power-of-two multiply). */
static inline __m256 exp8_nonpos(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));  /* n >= -126: 2^n is a normal float */
}

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

/* ------------------------------------------------------------------------------------ decode attention
 * As cpu_decode.c's: one new token per row, q (B, Hq, D), strided k/v cache views, mask (B, K) bytes or NULL,
 * fp32 scores / softmax / weighted sum, the query heads of one KV head together (keys and values read once). */
int decode_attention(const uint16_t *q, const uint16_t *k, const uint16_t *v, const uint8_t *mask, uint16_t *out,
                     int64_t B, int64_t Hq, int64_t Hkv, int64_t K, int64_t D, int64_t q_sb, int64_t q_sh,
                     int64_t k_sb, int64_t k_sh, int64_t k_sk, int64_t v_sb, int64_t v_sh, int64_t v_sk,
                     float scale, int nthreads) {
    if (D % 16 != 0 || D > MAXD || Hq % Hkv != 0 || K <= 0) return -1;
    const int64_t rep = Hq / Hkv, DV = D / 8, Kp = (K + 7) / 8 * 8;
    int rc = 0;
#pragma omp parallel num_threads(nthreads)
    {
        float *sc = aligned_alloc(64, (size_t)(rep * Kp + 2 * rep * MAXD) * sizeof(float));
        if (!sc) {
#pragma omp atomic write
            rc = -3;
        } else {
            float *qf = sc + rep * Kp, *acc = qf + rep * MAXD;
#pragma omp for schedule(static)
            for (int64_t bg = 0; bg < B * Hkv; bg++) {
                int64_t b = bg / Hkv, g = bg % Hkv;
                const uint16_t *kb = k + b * k_sb + g * k_sh, *vb = v + b * v_sb + g * v_sh;
                const uint8_t *mb = mask ? mask + b * K : NULL;
                for (int64_t r = 0; r < rep; r++)
                    for (int64_t c = 0; c < DV; c++)
                        _mm256_store_ps(qf + r * MAXD + c * 8, bf16x8(q + b * q_sb + (g * rep + r) * q_sh + c * 8));
                for (int64_t j = 0; j < K; j++) {
                    if (mb && !mb[j]) {
                        for (int64_t r = 0; r < rep; r++) sc[r * Kp + j] = -INFINITY;
                        continue;
                    }
                    const uint16_t *kr = kb + j * k_sk;
                    for (int64_t r0 = 0; r0 < rep; r0 += 8) {  /* up to 8 heads' dot products per key load */
                        int64_t nr = rep - r0 < 8 ? rep - r0 : 8;
                        __m256 a[8];
                        for (int64_t r = 0; r < nr; r++) a[r] = _mm256_setzero_ps();
                        for (int64_t c = 0; c < DV; c++) {
                            __m256 kv = bf16x8(kr + c * 8);
                            for (int64_t r = 0; r < nr; r++)
                                a[r] = _mm256_fmadd_ps(_mm256_load_ps(qf + (r0 + r) * MAXD + c * 8), kv, a[r]);
                        }
                        for (int64_t r = 0; r < nr; r++) sc[(r0 + r) * Kp + j] = hsum8(a[r]) * scale;
                    }
                }
                for (int64_t r = 0; r < rep; r++) {
                    float *s = sc + r * Kp;
                    for (int64_t j = K; j < Kp; j++) s[j] = -INFINITY;
                    __m256 mx = _mm256_set1_ps(-INFINITY);
                    for (int64_t j = 0; j < Kp; j += 8) mx = _mm256_max_ps(mx, _mm256_load_ps(s + j));
                    __m256 sum = _mm256_setzero_ps(), mv = _mm256_set1_ps(hmax8(mx));
                    for (int64_t j = 0; j < Kp; j += 8) {
                        __m256 sj = _mm256_load_ps(s + j);
                        __m256 e = exp8_nonpos(_mm256_sub_ps(sj, mv));
                        e = _mm256_blendv_ps(e, _mm256_setzero_ps(),
                                             _mm256_cmp_ps(sj, _mm256_set1_ps(-INFINITY), _CMP_EQ_OQ));
                        _mm256_store_ps(s + j, e);
                        sum = _mm256_add_ps(sum, e);
                    }
                    float inv = 1.0f / hsum8(sum);
                    float *o = acc + r * MAXD;
                    for (int64_t c = 0; c < DV; c++) _mm256_store_ps(o + c * 8, _mm256_setzero_ps());
                    for (int64_t j = 0; j < K; j++) {
                        if (s[j] == 0.0f) continue;  /* masked keys (and underflow) add nothing */
                        __m256 p = _mm256_set1_ps(s[j]);
                        const uint16_t *vr = vb + j * v_sk;
                        for (int64_t c = 0; c < DV; c++)
                            _mm256_store_ps(o + c * 8, _mm256_fmadd_ps(p, bf16x8(vr + c * 8), _mm256_load_ps(o + c * 8)));
                    }
                    uint16_t *orow = out + (b * Hq + g * rep + r) * D;
                    for (int64_t d = 0; d < D; d++) orow[d] = f32_to_bf16(o[d] * inv);
                }
            }
            free(sc);
        }
    }
    return rc;
}

/* ------------------------------------------------------------------------------------ elementwise */
/* bf16 (8) from fp32 (8), round to nearest even (as torch's .to(bfloat16)) */
static inline void store_bf16x8(uint16_t *p, __m256 y) {
    __m256i u = _mm256_castps_si256(y);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    u = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb)), 16);
    _mm_storeu_si128((__m128i *)p, _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1)));
}

/* As cpu_decode.c: in place h = x + bias; x = h * sigmoid(1.702 h) on bf16 (rows, N), fp32 inside. N % 16 == 0. */
int bias_quick_gelu(uint16_t *x, const float *bias, int64_t rows, int64_t N, int nthreads) {
    if (N % 16 != 0) return -1;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        uint16_t *row = x + r * N;
        for (int64_t c = 0; c < N; c += 8) {
            __m256 h = _mm256_add_ps(bf16x8(row + c), _mm256_loadu_ps(bias + c));
            __m256 z = _mm256_mul_ps(h, _mm256_set1_ps(1.702f));
            __m256 az = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), z);
            __m256 e = exp8_nonpos(_mm256_sub_ps(_mm256_setzero_ps(), az));   /* exp(-|z|) */
            __m256 inv = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_add_ps(_mm256_set1_ps(1.0f), e));
            __m256 neg = _mm256_cmp_ps(z, _mm256_setzero_ps(), _CMP_LT_OQ);
            __m256 sig = _mm256_blendv_ps(inv, _mm256_mul_ps(inv, e), neg);  /* z < 0: e / (1 + e) */
            store_bf16x8(row + c, _mm256_mul_ps(h, sig));
        }
    }
    return 0;
}

/* As cpu_decode.c: y = w * bf16(x * rsqrt(mean(x^2) + eps)), fp32 statistics. N % 16 == 0. */
int rms_norm(const uint16_t *x, const uint16_t *w, uint16_t *out, int64_t rows, int64_t N, float eps, int nthreads) {
    if (N % 16 != 0) return -1;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (rows >= 64)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *xr = x + r * N;
        uint16_t *yr = out + r * N;
        __m256 s0 = _mm256_setzero_ps(), s1 = s0;
        for (int64_t c = 0; c < N; c += 16) {
            __m256 a = bf16x8(xr + c), b = bf16x8(xr + c + 8);
            s0 = _mm256_fmadd_ps(a, a, s0);
            s1 = _mm256_fmadd_ps(b, b, s1);
        }
        float inv = 1.0f / sqrtf(hsum8(_mm256_add_ps(s0, s1)) / (float)N + eps);
        for (int64_t c = 0; c < N; c += 8) {
            float t[8];
            _mm256_storeu_ps(t, _mm256_mul_ps(bf16x8(xr + c), _mm256_set1_ps(inv)));
            for (int i = 0; i < 8; i++) yr[c + i] = f32_to_bf16(bf16_to_f32(w[c + i]) * round_bf16(t[i]));
        }
    }
    return 0;
}

/* As cpu_decode.c: gate = bf16(bf16(silu(gate)) * up) in place, silu = x / (1 + exp(-x)) in fp32. n % 16 == 0. */
void silu_mul_span(uint16_t *gate, const uint16_t *up, int64_t n) {
    for (int64_t c = 0; c < n; c += 8) {
        __m256 g = bf16x8(gate + c);
        __m256 e = exp8_nonpos(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_andnot_ps(_mm256_set1_ps(-0.0f), g)));
        __m256 neg = _mm256_cmp_ps(g, _mm256_setzero_ps(), _CMP_LT_OQ);
        __m256 num = _mm256_blendv_ps(g, _mm256_mul_ps(g, e), neg);  /* g < 0: g * e / (1 + e) */
        float t[8];
        _mm256_storeu_ps(t, _mm256_div_ps(num, _mm256_add_ps(_mm256_set1_ps(1.0f), e)));
        if (_mm256_movemask_ps(_mm256_cmp_ps(g, _mm256_set1_ps(-87.0f), _CMP_LT_OQ)))  /* beyond exp's range */
            for (int i = 0; i < 8; i++) {
                float x = bf16_to_f32(gate[c + i]);
                if (x < -87.0f) t[i] = x / (1.0f + expf(-x));
            }
        for (int i = 0; i < 8; i++) gate[c + i] = f32_to_bf16(round_bf16(t[i]) * bf16_to_f32(up[c + i]));
    }
}
