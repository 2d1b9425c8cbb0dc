/* The vector-width layer: 16 fp32 lanes as one __m512 (AVX512 build) or two __m256, lanes 0-7 and 8-15 (AVX2 build).
 *
 * Kernels whose math is the same on both builds (cpu_elementwise.c: RMSNorm, SiLU * up, bias + quick-GELU) are
 * written once against `v16` and compiled into each library. Every operation acts lane by lane, and `v16_sum` adds
 * in one tree on both (lane i + lane i+8, then i+4, i+2, i+1, as _mm512_reduce_add_ps does), so the two builds give
 * the same bits. GEMV and attention stay per ISA (cpu_gemv.c / cpu_decode.c / cpu_attention.c vs cpu_avx2.c): their
 * register blocking is what makes them fast. Also holds the AVX2 build's 8-lane helpers cpu_avx2.c uses. */
#ifndef QWEN2VL_CPU_VEC16_H
#define QWEN2VL_CPU_VEC16_H
#include "cpu_common.h"

#ifdef __AVX512F__
typedef __m512 v16;
static inline v16 v16_bf16(const uint16_t *p) { return bf16x16(p); }
static inline v16 v16_load(const float *p) { return _mm512_loadu_ps(p); }
static inline void v16_store(float *p, v16 a) { _mm512_storeu_ps(p, a); }
static inline v16 v16_set1(float f) { return _mm512_set1_ps(f); }
static inline v16 v16_add(v16 a, v16 b) { return _mm512_add_ps(a, b); }
static inline v16 v16_mul(v16 a, v16 b) { return _mm512_mul_ps(a, b); }
static inline v16 v16_div(v16 a, v16 b) { return _mm512_div_ps(a, b); }
static inline v16 v16_fmadd(v16 a, v16 b, v16 c) { return _mm512_fmadd_ps(a, b, c); }
static inline v16 v16_minus_abs(v16 a) { return _mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(a)); } /* 0 - |a| */
static inline v16 v16_exp_nonpos(v16 x) { return exp_nonpos(x); }
/* lanes where z < 0 take a * b, the others a */
static inline v16 v16_mul_where_neg(v16 z, v16 a, v16 b) {
    return _mm512_mask_mul_ps(a, _mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_LT_OQ), a, b);
}
static inline int v16_any_below(v16 a, float t) { return _mm512_cmp_ps_mask(a, _mm512_set1_ps(t), _CMP_LT_OQ) != 0; }
static inline float v16_sum(v16 a) { return _mm512_reduce_add_ps(a); }
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
static inline v16 v16_mul(v16 a, v16 b) { return V16_MAP2(a, b, _mm256_mul_ps); }
static inline v16 v16_div(v16 a, v16 b) { return V16_MAP2(a, b, _mm256_div_ps); }
static inline v16 v16_fmadd(v16 a, v16 b, v16 c) {
    return (v16){_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
static inline __m256 minus_abs8(__m256 a) {
    return _mm256_sub_ps(_mm256_setzero_ps(), _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a));
}
static inline v16 v16_minus_abs(v16 a) { return V16_MAP(a, minus_abs8); }
static inline v16 v16_exp_nonpos(v16 x) { return V16_MAP(x, exp8_nonpos); }
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
static inline void v16_store_bf16(uint16_t *p, v16 y) { store_bf16x8(p, y.lo); store_bf16x8(p + 8, y.hi); }
#endif

#endif
