/* The vector-width layer: 16 fp32 lanes as one __m512 (AVX512 build) or two __m256, lanes 0-7 and 8-15 (AVX2 build).
 *
 * Math that is the same on both builds is written once against `v16` and compiled into each library: the exp
 * polynomials below (every kernel's softmax / SiLU / GELU uses them, the AVX512-only attention kernels too, where
 * v16 is __m512), cpu_elementwise.c (RMSNorm, SiLU * up, bias + quick-GELU) and cpu_decode.c (decoding attention).
 * Every operation acts lane by lane, and `v16_sum` adds in one tree on both (lane i + lane i+8, then i+4, i+2, i+1,
 * as _mm512_reduce_add_ps does), so the two builds give the same bits. GEMV stays per ISA (cpu_gemv.c vs
 * cpu_avx2.c): its register blocking is what makes it fast. Also holds the AVX2 build's 8-lane helpers cpu_avx2.c
 * uses. */
#ifndef QWEN2VL_CPU_VEC16_H
#define QWEN2VL_CPU_VEC16_H
#include "cpu_common.h"

#ifdef __AVX512F__
typedef __m512 v16;
/* 16 bf16 -> fp32 (a 16-bit shift) */
static inline v16 v16_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
static inline v16 v16_load(const float *p) { return _mm512_loadu_ps(p); }
static inline void v16_store(float *p, v16 a) { _mm512_storeu_ps(p, a); }
static inline v16 v16_set1(float f) { return _mm512_set1_ps(f); }
static inline v16 v16_add(v16 a, v16 b) { return _mm512_add_ps(a, b); }
static inline v16 v16_sub(v16 a, v16 b) { return _mm512_sub_ps(a, b); }
static inline v16 v16_mul(v16 a, v16 b) { return _mm512_mul_ps(a, b); }
static inline v16 v16_max(v16 a, v16 b) { return _mm512_max_ps(a, b); }
static inline v16 v16_div(v16 a, v16 b) { return _mm512_div_ps(a, b); }
static inline v16 v16_fmadd(v16 a, v16 b, v16 c) { return _mm512_fmadd_ps(a, b, c); }
static inline v16 v16_fnmadd(v16 a, v16 b, v16 c) { return _mm512_fnmadd_ps(a, b, c); } /* c - a * b */
static inline v16 v16_round(v16 a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
/* p * 2^n for whole-number lanes n in [-126, 0] (exact: 2^n is a normal float) */
static inline v16 v16_mul_pow2(v16 p, v16 n) { return _mm512_scalef_ps(p, n); }
static inline v16 v16_minus_abs(v16 a) { return _mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(a)); } /* 0 - |a| */
/* lanes where s == -inf take 0, the others e */
static inline v16 v16_zero_where_neg_inf(v16 s, v16 e) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(s, _mm512_set1_ps(-INFINITY), _CMP_EQ_OQ), e, _mm512_setzero_ps());
}
/* lanes where z < 0 take a * b, the others a */
static inline v16 v16_mul_where_neg(v16 z, v16 a, v16 b) {
    return _mm512_mask_mul_ps(a, _mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_LT_OQ), a, b);
}
static inline int v16_any_below(v16 a, float t) { return _mm512_cmp_ps_mask(a, _mm512_set1_ps(t), _CMP_LT_OQ) != 0; }
static inline float v16_sum(v16 a) { return _mm512_reduce_add_ps(a); }
static inline float v16_hmax(v16 a) { return _mm512_reduce_max_ps(a); }
/* 16 bf16 from fp32, rounded to nearest even (as torch's .to(bfloat16)) */
static inline void v16_store_bf16(uint16_t *p, v16 y) {
    __m512i u = _mm512_castps_si512(y);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb));
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
}

#else /* AVX2 + FMA: the 8-lane helpers, then v16 as two of them */
static inline __m256 bf16x8(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* bf16 (8) from fp32 (8), round to nearest even (as torch's .to(bfloat16)) */
static inline void store_bf16x8(uint16_t *p, __m256 y) {
    __m256i u = _mm256_castps_si256(y);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    u = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb)), 16);
    _mm_storeu_si128((__m128i *)p, _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1)));
}

typedef struct { __m256 lo, hi; } v16;
#define V16_MAP(a, op) ((v16){op((a).lo), op((a).hi)})
#define V16_MAP2(a, b, op) ((v16){op((a).lo, (b).lo), op((a).hi, (b).hi)})
static inline v16 v16_bf16(const uint16_t *p) { return (v16){bf16x8(p), bf16x8(p + 8)}; }
static inline v16 v16_load(const float *p) { return (v16){_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
static inline void v16_store(float *p, v16 a) { _mm256_storeu_ps(p, a.lo); _mm256_storeu_ps(p + 8, a.hi); }
static inline v16 v16_set1(float f) { __m256 v = _mm256_set1_ps(f); return (v16){v, v}; }
static inline v16 v16_add(v16 a, v16 b) { return V16_MAP2(a, b, _mm256_add_ps); }
static inline v16 v16_sub(v16 a, v16 b) { return V16_MAP2(a, b, _mm256_sub_ps); }
static inline v16 v16_mul(v16 a, v16 b) { return V16_MAP2(a, b, _mm256_mul_ps); }
static inline v16 v16_max(v16 a, v16 b) { return V16_MAP2(a, b, _mm256_max_ps); }
static inline v16 v16_div(v16 a, v16 b) { return V16_MAP2(a, b, _mm256_div_ps); }
static inline v16 v16_fmadd(v16 a, v16 b, v16 c) {
    return (v16){_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
static inline v16 v16_fnmadd(v16 a, v16 b, v16 c) {
    return (v16){_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi)};
}
static inline __m256 round8(__m256 a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline v16 v16_round(v16 a) { return V16_MAP(a, round8); }
/* p * 2^n as a multiply by 2^n built from its exponent bits (n in [-126, 0]: a normal float, so the same bits as
 * AVX512's scalef) */
static inline __m256 mul_pow2_8(__m256 p, __m256 n) {
    return _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n),
                                                                                   _mm256_set1_epi32(127)), 23)));
}
static inline v16 v16_mul_pow2(v16 p, v16 n) { return V16_MAP2(p, n, mul_pow2_8); }
static inline __m256 minus_abs8(__m256 a) {
    return _mm256_sub_ps(_mm256_setzero_ps(), _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a));
}
static inline v16 v16_minus_abs(v16 a) { return V16_MAP(a, minus_abs8); }
static inline __m256 zero_where_neg_inf8(__m256 s, __m256 e) {
    return _mm256_blendv_ps(e, _mm256_setzero_ps(), _mm256_cmp_ps(s, _mm256_set1_ps(-INFINITY), _CMP_EQ_OQ));
}
static inline v16 v16_zero_where_neg_inf(v16 s, v16 e) { return V16_MAP2(s, e, zero_where_neg_inf8); }
static inline __m256 mul_where_neg8(__m256 z, __m256 a, __m256 b) {
    return _mm256_blendv_ps(a, _mm256_mul_ps(a, b), _mm256_cmp_ps(z, _mm256_setzero_ps(), _CMP_LT_OQ));
}
static inline v16 v16_mul_where_neg(v16 z, v16 a, v16 b) {
    return (v16){mul_where_neg8(z.lo, a.lo, b.lo), mul_where_neg8(z.hi, a.hi, b.hi)};
}
static inline int v16_any_below(v16 a, float t) {
    __m256 tv = _mm256_set1_ps(t);
    return _mm256_movemask_ps(_mm256_or_ps(_mm256_cmp_ps(a.lo, tv, _CMP_LT_OQ), _mm256_cmp_ps(a.hi, tv, _CMP_LT_OQ)));
}
static inline float v16_sum(v16 a) { return hsum8(_mm256_add_ps(a.lo, a.hi)); }
static inline float v16_hmax(v16 a) {  /* max is exact: any order gives the same value */
    __m256 m8 = _mm256_max_ps(a.lo, a.hi);
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps(m8, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}
static inline void v16_store_bf16(uint16_t *p, v16 y) { store_bf16x8(p, y.lo); store_bf16x8(p + 8, y.hi); }
#endif

/* ------------------------------------------------------------------------------------ exp, written once
 * exp(x) for x <= 0 (softmax scores minus their max, -|z| in SiLU / GELU): 2^n * p(r), n = round(x / ln 2),
 * r = x - n ln 2 in two parts (Cody-Waite), p a degree-7 polynomial; |rel err| < 2e-7. x < -87 gives exp(-87)
 * (~1.6e-38; callers needing exactly 0 there mask it). */
static inline v16 v16_exp_nonpos(v16 x) {
    x = v16_max(x, v16_set1(-87.0f));
    v16 n = v16_round(v16_mul(x, v16_set1(1.44269504088896341f)));
    v16 r = v16_fnmadd(n, v16_set1(0.693359375f), x);
    r = v16_fnmadd(n, v16_set1(-2.12194440e-4f), r);
    v16 p = v16_set1(1.9875691500e-4f);
    p = v16_fmadd(p, r, v16_set1(1.3981999507e-3f));
    p = v16_fmadd(p, r, v16_set1(8.3334519073e-3f));
    p = v16_fmadd(p, r, v16_set1(4.1665795894e-2f));
    p = v16_fmadd(p, r, v16_set1(1.6666665459e-1f));
    p = v16_fmadd(p, r, v16_set1(5.0000001201e-1f));
    p = v16_fmadd(v16_mul(p, r), r, v16_add(r, v16_set1(1.0f)));
    return v16_mul_pow2(p, n);
}

/* 2^x for x <= 0: 2^n * p(r), r = x - round(x) in [-0.5, 0.5], degree-5 Taylor of e^(r ln 2) (|rel err| < 3e-6,
 * far below the bf16 rounding the probabilities then get); x < -126 gives ~0. */
static inline v16 v16_exp2_nonpos(v16 x) {
    x = v16_max(x, v16_set1(-126.0f));
    v16 n = v16_round(x);
    v16 r = v16_sub(x, n);
    v16 p = v16_set1(1.3333558146428443e-3f);
    p = v16_fmadd(p, r, v16_set1(9.618129107628477e-3f));
    p = v16_fmadd(p, r, v16_set1(5.550410866482158e-2f));
    p = v16_fmadd(p, r, v16_set1(2.402265069591007e-1f));
    p = v16_fmadd(p, r, v16_set1(6.931471805599453e-1f));
    p = v16_fmadd(p, r, v16_set1(1.0f));
    return v16_mul_pow2(p, n);
}

#endif
