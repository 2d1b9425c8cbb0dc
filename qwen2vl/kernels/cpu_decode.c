/* CPU decoding attention and the vision MLP's activation pass (AVX512F).
 *
 * Text attention for one new token per row: q (B, Hq, D), k/v (B, Hkv, K, D) bf16 views of the KV cache (any
 * batch/head/key strides, contiguous D), mask (B, K) bytes (1 = attend) or NULL, out (B, Hq, D) bf16. The Hq/Hkv
 * query heads sharing a KV head are done together, so K and V are read once per KV head. Scores, softmax and
 * the weighted sum are fp32 (bf16 products are exact in fp32). Torch's CPU SDPA costs ~5 us per (row, head)
 * pair for this shape, which at batch 8 is more than the decoder's matrix-vector products. */
#include "cpu_common.h"

int decode_attention(const uint16_t *q, const uint16_t *k, const uint16_t *v, const uint8_t *mask, uint16_t *out,
                     int64_t B, int64_t Hq, int64_t Hkv, int64_t K, int64_t D, int64_t q_sb, int64_t q_sh,
                     int64_t k_sb, int64_t k_sh, int64_t k_sk, int64_t v_sb, int64_t v_sh, int64_t v_sk,
                     float scale, int nthreads) {
    if (D % 16 != 0 || D > MAXD || Hq % Hkv != 0 || K <= 0) return -1;
    const int64_t rep = Hq / Hkv, DV = D / 16, Kp = (K + 15) / 16 * 16;
    int rc = 0;
#pragma omp parallel num_threads(nthreads)
    {
        float *sc = aligned_alloc(64, (size_t)(rep * Kp) * sizeof(float));
        if (!sc) {
#pragma omp atomic write
            rc = -3;
        } else {
#pragma omp for schedule(static)
            for (int64_t bg = 0; bg < B * Hkv; bg++) {
                int64_t b = bg / Hkv, g = bg % Hkv;
                const uint16_t *kb = k + b * k_sb + g * k_sh, *vb = v + b * v_sb + g * v_sh;
                const uint8_t *mb = mask ? mask + b * K : NULL;
                __m512 qv[8][MAXD / 16];  /* rep <= 8 heads per KV head handled in register-sized groups */
                for (int64_t r0 = 0; r0 < rep; r0 += 8) {
                    int64_t nr = rep - r0 < 8 ? rep - r0 : 8;
                    for (int64_t r = 0; r < nr; r++)
                        for (int64_t c = 0; c < DV; c++)
                            qv[r][c] = bf16x16(q + b * q_sb + (g * rep + r0 + r) * q_sh + c * 16);
                    for (int64_t j = 0; j < K; j++) {
                        if (mb && !mb[j]) {
                            for (int64_t r = 0; r < nr; r++) sc[(r0 + r) * Kp + j] = -INFINITY;
                            continue;
                        }
                        const uint16_t *kr = kb + j * k_sk;
                        __m512 acc[8];
                        for (int64_t r = 0; r < nr; r++) acc[r] = _mm512_setzero_ps();
                        for (int64_t c = 0; c < DV; c++) {
                            __m512 kv = bf16x16(kr + c * 16);
                            for (int64_t r = 0; r < nr; r++) acc[r] = _mm512_fmadd_ps(qv[r][c], kv, acc[r]);
                        }
                        for (int64_t r = 0; r < nr; r++) sc[(r0 + r) * Kp + j] = _mm512_reduce_add_ps(acc[r]) * scale;
                    }
                }
                for (int64_t r = 0; r < rep; r++) {
                    float *s = sc + r * Kp;
                    for (int64_t j = K; j < Kp; j++) s[j] = -INFINITY;
                    __m512 mx = _mm512_set1_ps(-INFINITY);
                    for (int64_t j = 0; j < Kp; j += 16) mx = _mm512_max_ps(mx, _mm512_load_ps(s + j));
                    float m = _mm512_reduce_max_ps(mx);
                    __m512 sum = _mm512_setzero_ps(), mv = _mm512_set1_ps(m);
                    for (int64_t j = 0; j < Kp; j += 16) {
                        __m512 e = exp_nonpos(_mm512_sub_ps(_mm512_load_ps(s + j), mv));
                        e = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(_mm512_load_ps(s + j), _mm512_set1_ps(-INFINITY),
                                                                    _CMP_EQ_OQ), e, _mm512_setzero_ps());
                        _mm512_store_ps(s + j, e);
                        sum = _mm512_add_ps(sum, e);
                    }
                    float inv = 1.0f / _mm512_reduce_add_ps(sum);
                    __m512 o[MAXD / 16];
                    for (int64_t c = 0; c < DV; c++) o[c] = _mm512_setzero_ps();
                    for (int64_t j = 0; j < K; j++) {
                        if (s[j] == 0.0f) continue;  /* masked keys (and underflow) add nothing */
                        __m512 p = _mm512_set1_ps(s[j]);
                        const uint16_t *vr = vb + j * v_sk;
                        for (int64_t c = 0; c < DV; c++) o[c] = _mm512_fmadd_ps(p, bf16x16(vr + c * 16), o[c]);
                    }
                    uint16_t *orow = out + (b * Hq + g * rep + r) * D;
                    float tmp[MAXD];
                    for (int64_t c = 0; c < DV; c++) _mm512_storeu_ps(tmp + c * 16, _mm512_mul_ps(o[c], _mm512_set1_ps(inv)));
                    for (int64_t d = 0; d < D; d++) orow[d] = f32_to_bf16(tmp[d]);
                }
            }
            free(sc);
        }
    }
    return rc;
}

/* ------------------------------------------------------------------------------------ vision MLP activation
 * In place on the bf16 (rows, N) output of fc1 without its bias: h = x + bias; x = h * sigmoid(1.702 h), in fp32,
 * rounded once. One pass instead of torch's bias copy + three elementwise passes. N % 16 == 0. */
int bias_quick_gelu(uint16_t *x, const float *bias, int64_t rows, int64_t N, int nthreads) {
    if (N % 16 != 0) return -1;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        uint16_t *row = x + r * N;
        for (int64_t c = 0; c < N; c += 16) {
            __m512 h = _mm512_add_ps(bf16x16(row + c), _mm512_loadu_ps(bias + c));
            __m512 z = _mm512_mul_ps(h, _mm512_set1_ps(1.702f));
            __m512 e = exp_nonpos(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(z)));   /* exp(-|z|) */
            __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_add_ps(_mm512_set1_ps(1.0f), e));
            __mmask16 neg = _mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_LT_OQ);
            __m512 sig = _mm512_mask_mul_ps(inv, neg, inv, e);          /* z < 0: e / (1 + e) */
            __m512 y = _mm512_mul_ps(h, sig);
            /* round to nearest even, as torch's .to(bfloat16) */
            __m512i u = _mm512_castps_si512(y);
            __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
            u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb));
            _mm256_storeu_si256((__m256i *)(row + c), _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
        }
    }
    return 0;
}

/* ------------------------------------------------------------------------------------ decoder RMSNorm
 * bf16 rows: y = w * bf16(x * rsqrt(mean(x^2) + eps)), the reference's order and roundings (fp32 statistics, cast to
 * bf16 before the weight multiply); one call instead of eight torch ops per norm. N % 16 == 0. */
int rms_norm(const uint16_t *x, const uint16_t *w, uint16_t *out, int64_t rows, int64_t N, float eps, int nthreads) {
    if (N % 16 != 0) return -1;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (rows >= 64)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *xr = x + r * N;
        uint16_t *yr = out + r * N;
        __m512 ss = _mm512_setzero_ps();
        for (int64_t c = 0; c < N; c += 16) {
            __m512 v = bf16x16(xr + c);
            ss = _mm512_fmadd_ps(v, v, ss);
        }
        float inv = 1.0f / sqrtf(_mm512_reduce_add_ps(ss) / (float)N + eps);
        for (int64_t c = 0; c < N; c += 16) {
            float t[16];
            _mm512_storeu_ps(t, _mm512_mul_ps(bf16x16(xr + c), _mm512_set1_ps(inv)));
            for (int i = 0; i < 16; i++) yr[c + i] = f32_to_bf16(bf16_to_f32(w[c + i]) * round_bf16(t[i]));
        }
    }
    return 0;
}

/* ------------------------------------------------------------------------------------ decoder MLP activation
 * In place on bf16 gate (n): gate = bf16(bf16(silu(gate)) * up), the two roundings of torch's bf16
 * F.silu(gate).mul_(up); silu in fp32 as x / (1 + exp(-x)), as torch computes it. n % 16 == 0.
 * silu_mul_span: on the calling thread (cpu_layer.c runs it per thread share: silu_mul, the fused step). */
void silu_mul_span(uint16_t *gate, const uint16_t *up, int64_t n) {
    for (int64_t c = 0; c < n; c += 16) {
        __m512 g = bf16x16(gate + c);
        __m512 e = exp_nonpos(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(g)));   /* exp(-|g|) */
        __mmask16 neg = _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_LT_OQ);
        /* g >= 0: g / (1 + e); g < 0: g * e / (1 + e) (exp(-g) would overflow) */
        __m512 num = _mm512_mask_mul_ps(g, neg, g, e);
        __m512 s = _mm512_div_ps(num, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
        float t[16];
        _mm512_storeu_ps(t, s);
        if (_mm512_cmp_ps_mask(g, _mm512_set1_ps(-87.0f), _CMP_LT_OQ))  /* beyond exp_nonpos's range: as torch */
            for (int i = 0; i < 16; i++) {
                float x = bf16_to_f32(gate[c + i]);
                if (x < -87.0f) t[i] = x / (1.0f + expf(-x));
            }
        for (int i = 0; i < 16; i++) gate[c + i] = f32_to_bf16(round_bf16(t[i]) * bf16_to_f32(up[c + i]));
    }
}
