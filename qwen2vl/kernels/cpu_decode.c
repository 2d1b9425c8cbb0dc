/* CPU decoding attention: one source for both builds, written against cpu_vec16.h's 16-lane vectors (one __m512 or
 * two __m256), so the AVX512 and the AVX2 library give the same bits.
 *
 * Text attention for one new token per row: q (B, Hq, D), k/v (B, Hkv, K, D) bf16 views of the KV cache (any
 * batch/head/key strides, contiguous D), mask (B, K) bytes (1 = attend) or NULL, out (B, Hq, D) bf16. The Hq/Hkv
 * query heads sharing a KV head are done together, so K and V are read once per KV head. Scores, softmax and
 * the weighted sum are fp32 (bf16 products are exact in fp32); each score is a 16-lane FMA chain over D then
 * v16_sum, the softmax sum 16 lanes over the keys then v16_sum. Torch's CPU SDPA costs ~5 us per (row, head) pair
 * for this shape, which at batch 8 is more than the decoder's matrix-vector products. decode_attention_group: one
 * (row, KV head) on the calling thread (decode_attention splits them among its threads, as does the fused step). */
#include "cpu_vec16.h"

#define HEADS 8  /* query heads scored per key load (one 16-lane accumulator each) */

int64_t decode_attention_scratch(const decode_attn *a) { return a->Hq / a->Hkv * ((a->K + 15) / 16 * 16); }

void decode_attention_group(const decode_attn *a, int64_t bg, float *sc) {
    const int64_t Hkv = a->Hkv, K = a->K, D = a->D, rep = a->Hq / Hkv, DV = D / 16, Kp = (K + 15) / 16 * 16;
    const int64_t b = bg / Hkv, g = bg % Hkv;
    const uint16_t *kb = a->k + b * a->k_sb + g * a->k_sh, *vb = a->v + b * a->v_sb + g * a->v_sh;
    const uint8_t *mb = a->mask ? a->mask + b * K : NULL;
    v16 qv[HEADS][MAXD / 16];
    for (int64_t r0 = 0; r0 < rep; r0 += HEADS) {
        int64_t nr = rep - r0 < HEADS ? rep - r0 : HEADS;
        for (int64_t r = 0; r < nr; r++)
            for (int64_t c = 0; c < DV; c++)
                qv[r][c] = v16_bf16(a->q + b * a->q_sb + (g * rep + r0 + r) * a->q_sh + c * 16);
        for (int64_t j = 0; j < K; j++) {
            if (mb && !mb[j]) {
                for (int64_t r = 0; r < nr; r++) sc[(r0 + r) * Kp + j] = -INFINITY;
                continue;
            }
            const uint16_t *kr = kb + j * a->k_sk;
            v16 acc[HEADS];
            for (int64_t r = 0; r < nr; r++) acc[r] = v16_set1(0.0f);
            for (int64_t c = 0; c < DV; c++) {
                v16 kv = v16_bf16(kr + c * 16);
                for (int64_t r = 0; r < nr; r++) acc[r] = v16_fmadd(qv[r][c], kv, acc[r]);
            }
            for (int64_t r = 0; r < nr; r++) sc[(r0 + r) * Kp + j] = v16_sum(acc[r]) * a->scale;
        }
    }
    for (int64_t r = 0; r < rep; r++) {
        float *s = sc + r * Kp;
        for (int64_t j = K; j < Kp; j++) s[j] = -INFINITY;
        v16 mx = v16_set1(-INFINITY);
        for (int64_t j = 0; j < Kp; j += 16) mx = v16_max(mx, v16_load(s + j));
        v16 sum = v16_set1(0.0f), mv = v16_set1(v16_hmax(mx));
        for (int64_t j = 0; j < Kp; j += 16) {
            v16 sj = v16_load(s + j);
            v16 e = v16_zero_where_neg_inf(sj, v16_exp_nonpos(v16_sub(sj, mv)));  /* masked: exactly 0 */
            v16_store(s + j, e);
            sum = v16_add(sum, e);
        }
        v16 inv = v16_set1(1.0f / v16_sum(sum));
        v16 o[MAXD / 16];
        for (int64_t c = 0; c < DV; c++) o[c] = v16_set1(0.0f);
        for (int64_t j = 0; j < K; j++) {
            if (s[j] == 0.0f) continue;  /* masked keys (and underflow) add nothing */
            v16 p = v16_set1(s[j]);
            const uint16_t *vr = vb + j * a->v_sk;
            for (int64_t c = 0; c < DV; c++) o[c] = v16_fmadd(p, v16_bf16(vr + c * 16), o[c]);
        }
        uint16_t *orow = a->out + (b * a->Hq + g * rep + r) * D;
        for (int64_t c = 0; c < DV; c++) v16_store_bf16(orow + c * 16, v16_mul(o[c], inv));
    }
}

int decode_attention(const uint16_t *q, const uint16_t *k, const uint16_t *v, const uint8_t *mask, uint16_t *out,
                     int64_t B, int64_t Hq, int64_t Hkv, int64_t K, int64_t D, int64_t q_sb, int64_t q_sh,
                     int64_t k_sb, int64_t k_sh, int64_t k_sk, int64_t v_sb, int64_t v_sh, int64_t v_sk,
                     float scale, int nthreads) {
    if (D % 16 != 0 || D > MAXD || Hq % Hkv != 0 || K <= 0) return -1;
    const decode_attn a = {q, k, v, mask, out, B, Hq, Hkv, K, D, q_sb, q_sh, k_sb, k_sh, k_sk, v_sb, v_sh, v_sk, scale};
    int rc = 0;
#pragma omp parallel num_threads(nthreads)
    {
        float *sc = aligned_alloc(64, (size_t)decode_attention_scratch(&a) * sizeof(float));  /* scores, probs */
        if (!sc) {
#pragma omp atomic write
            rc = -3;
        } else {
#pragma omp for schedule(static)
            for (int64_t bg = 0; bg < B * Hkv; bg++) decode_attention_group(&a, bg, sc);
            free(sc);
        }
    }
    return rc;
}
