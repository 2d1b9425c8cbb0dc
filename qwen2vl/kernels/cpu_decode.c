/* CPU decoding attention (AVX512F); the elementwise kernels of both builds are in cpu_elementwise.c.
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
