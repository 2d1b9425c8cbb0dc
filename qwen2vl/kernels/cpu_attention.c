/* Vision-tower attention on CPU: fused 2-D rotary + non-causal flash attention (online softmax), AVX512.
 *
 * Input is the raw qkv projection of one segment, (S, 3, H, D) row-major (bf16 or fp32), with the rotary
 * tables cos/sin (S, D) fp32; output (S, H, D) in the input dtype, ready for the output projection. One
 * OpenMP thread per head. Per head, q/k get the rotary in fp32 and are rounded to the input dtype (as the
 * reference does before its attention call); K is packed transposed so 16 keys' scores form one vector.
 * bf16 inputs use AVX512-BF16 dot products (pairs of bf16, fp32 accumulation) for Q·Kᵀ and P·V, with P
 * rounded to bf16 like PyTorch's bf16 attention kernels; fp32 inputs use fp32 FMAs throughout.
 * Queries go in tiles of QT and groups of QB (QB x 64 score accumulators), keys in blocks of KB = 64.
 * The same tiles serve causal text prefill (prefill_attention, end of file) from already-rotated q/k/v.
 */
#include "cpu_vec16.h"  /* v16 is __m512 here: its exp polynomials */

#define QB 4
#define QT 128
#define KB 64

/* Rotary-embedded, dtype-rounded row of q or k (which = 0 or 1) for token n, head h, into dst[D] (fp32). */
static void rotated_row(const void *qkv, int bf16, int64_t n, int which, int64_t h, int64_t H, int64_t D,
                        const float *cos, const float *sin, float *dst) {
    float src[MAXD];
    int64_t off = ((n * 3 + which) * H + h) * D;
    for (int64_t d = 0; d < D; d++)
        src[d] = bf16 ? bf16_to_f32(((const uint16_t *)qkv)[off + d]) : ((const float *)qkv)[off + d];
    int64_t half = D / 2;
    for (int64_t d = 0; d < D; d++) {
        float rot = d < half ? -src[d + half] : src[d - half];
        float val = src[d] * cos[n * D + d] + rot * sin[n * D + d];
        dst[d] = bf16 ? round_bf16(val) : val;
    }
}

static float v_at(const void *qkv, int bf16, int64_t n, int64_t h, int64_t H, int64_t D, int64_t d) {
    int64_t off = ((n * 3 + 2) * H + h) * D + d;
    return bf16 ? bf16_to_f32(((const uint16_t *)qkv)[off]) : ((const float *)qkv)[off];
}

/* Online-softmax update of QB query rows given their raw scores s (already scaled); returns probabilities in
 * s and the factor to rescale the running output with. */
static inline void softmax_update(__m512 s[QB][KB / 16], int nq, int64_t valid, float *m, float *l,
                                  float *corr) {
    for (int i = 0; i < nq; i++) {
        for (int c = 0; c < KB / 16; c++) {
            int64_t base = c * 16;
            if (base >= valid) {
                s[i][c] = _mm512_set1_ps(-INFINITY);
            } else if (base + 16 > valid) {
                __mmask16 keep = (__mmask16)((1u << (valid - base)) - 1u);
                s[i][c] = _mm512_mask_blend_ps(keep, _mm512_set1_ps(-INFINITY), s[i][c]);
            }
        }
        __m512 mx = _mm512_max_ps(_mm512_max_ps(s[i][0], s[i][1]), _mm512_max_ps(s[i][2], s[i][3]));
        float bm = _mm512_reduce_max_ps(mx);
        float nm = bm > m[i] ? bm : m[i];
        corr[i] = expf(m[i] - nm);
        m[i] = nm;
        __m512 nmv = _mm512_set1_ps(nm), sum = _mm512_setzero_ps();
        for (int c = 0; c < KB / 16; c++) {
            s[i][c] = v16_exp_nonpos(_mm512_sub_ps(s[i][c], nmv));
            sum = _mm512_add_ps(sum, s[i][c]);
        }
        l[i] = l[i] * corr[i] + _mm512_reduce_add_ps(sum);
    }
}

static void store_row(void *out, int bf16, int64_t n, int64_t h, int64_t H, int64_t D, __m512 *acc, float inv) {
    float tmp[MAXD];
    for (int64_t c = 0; c < D / 16; c++) _mm512_storeu_ps(tmp + c * 16, _mm512_mul_ps(acc[c], _mm512_set1_ps(inv)));
    int64_t off = (n * H + h) * D;
    for (int64_t d = 0; d < D; d++) {
        if (bf16) ((uint16_t *)out)[off + d] = f32_to_bf16(tmp[d]);
        else ((float *)out)[off + d] = tmp[d];
    }
}

/* ---------------------------------------------------------------------------------------- fp32 path */
static void head_f32(const void *qkv, const float *cos, const float *sin, void *out, int64_t S, int64_t H,
                     int64_t h, int64_t D, float scale, float *kt, float *vv, float *qq, int64_t Np, int64_t q0,
                     int64_t q1) {
    /* queries [q0, q1) of the segment's S rows (each query row is computed alone: any range gives its bits) */
    float row[MAXD];
    for (int64_t n = 0; n < Np; n++) {
        if (n < S) rotated_row(qkv, 0, n, 1, h, H, D, cos, sin, row);
        for (int64_t d = 0; d < D; d++) {
            kt[d * Np + n] = n < S ? row[d] : 0.0f;
            vv[n * D + d] = n < S ? v_at(qkv, 0, n, h, H, D, d) : 0.0f;
        }
    }
    for (int64_t n = q0; n < q1; n++) rotated_row(qkv, 0, n, 0, h, H, D, cos, sin, qq + (n - q0) * D);
    const int64_t DV = D / 16, Q = q1 - q0;
    out = (float *)out + q0 * H * D;
    for (int64_t i0 = 0; i0 < Q; i0 += QB) {
        int nq = (int)(Q - i0 < QB ? Q - i0 : QB);
        float m[QB], l[QB], corr[QB];
        __m512 acc[QB][MAXD / 16];
        for (int i = 0; i < QB; i++) {
            m[i] = -INFINITY; l[i] = 0.0f;
            for (int64_t c = 0; c < DV; c++) acc[i][c] = _mm512_setzero_ps();
        }
        for (int64_t j0 = 0; j0 < Np; j0 += KB) {
            __m512 s[QB][KB / 16];
            for (int i = 0; i < QB; i++)
                for (int c = 0; c < KB / 16; c++) s[i][c] = _mm512_setzero_ps();
            for (int64_t d = 0; d < D; d++) {
                const float *kr = kt + d * Np + j0;
                __m512 k0 = _mm512_loadu_ps(kr), k1 = _mm512_loadu_ps(kr + 16);
                __m512 k2 = _mm512_loadu_ps(kr + 32), k3 = _mm512_loadu_ps(kr + 48);
                for (int i = 0; i < QB; i++) {
                    __m512 qv = _mm512_set1_ps(i < nq ? qq[(i0 + i) * D + d] : 0.0f);
                    s[i][0] = _mm512_fmadd_ps(qv, k0, s[i][0]);
                    s[i][1] = _mm512_fmadd_ps(qv, k1, s[i][1]);
                    s[i][2] = _mm512_fmadd_ps(qv, k2, s[i][2]);
                    s[i][3] = _mm512_fmadd_ps(qv, k3, s[i][3]);
                }
            }
            for (int i = 0; i < QB; i++)
                for (int c = 0; c < KB / 16; c++) s[i][c] = _mm512_mul_ps(s[i][c], _mm512_set1_ps(scale));
            int64_t valid = S - j0 < KB ? S - j0 : KB;
            softmax_update(s, nq, valid, m, l, corr);
            for (int i = 0; i < nq; i++)
                for (int64_t c = 0; c < DV; c++) acc[i][c] = _mm512_mul_ps(acc[i][c], _mm512_set1_ps(corr[i]));
            float p[QB][KB] __attribute__((aligned(64)));
            for (int i = 0; i < nq; i++)
                for (int c = 0; c < KB / 16; c++) _mm512_store_ps(&p[i][c * 16], s[i][c]);
            for (int64_t j = 0; j < valid; j++) {
                const float *vr = vv + (j0 + j) * D;
                for (int64_t c = 0; c < DV; c++) {
                    __m512 v = _mm512_loadu_ps(vr + c * 16);
                    for (int i = 0; i < nq; i++) acc[i][c] = _mm512_fmadd_ps(_mm512_set1_ps(p[i][j]), v, acc[i][c]);
                }
            }
        }
        for (int i = 0; i < nq; i++) store_row(out, 0, i0 + i, h, H, D, acc[i], 1.0f / l[i]);
    }
}

/* ---------------------------------------------------------------------------------------- bf16 path */
/* The attention proper for one head, from the packed bf16 K (transposed pairs), V (key pairs) and Q.
 * Queries in tiles of QT (their fp32 accumulators stay in L1), keys in blocks of KB streamed once per tile;
 * inside, QB queries x KB keys of scores live in registers. The running max only grows a few times per row, so
 * the horizontal max, the rescale of the accumulator and expf run only when a score exceeds it (a vector
 * compare); the denominator is kept as a vector and reduced once at the end. */
__attribute__((target("avx512bf16,avx512vl,avx512bw,avx512f"), always_inline))
static inline void bf16_tiles(const int DV, void *out, int64_t S, int64_t Sk, int64_t causal, int64_t H, int64_t h,
                              float scale, const uint32_t *kt2, const uint32_t *v2, const uint32_t *q2, int64_t Np) {
    /* S queries, Sk keys (Np = Sk rounded up to KB). causal >= 0: query i sees keys j <= causal + i. */
    const int64_t D = DV * 16, D2 = D / 2;
    const float c2 = scale * 1.44269504088896341f;
    const __m512 c2v = _mm512_set1_ps(c2);
    static __thread float acc_t[QT][MAXD] __attribute__((aligned(64)));
    static __thread __m512 l_t[QT];
    float m_t[QT];
    for (int64_t i0 = 0; i0 < S; i0 += QT) {
        int nt = (int)(S - i0 < QT ? S - i0 : QT);
        for (int t = 0; t < nt; t++) {
            m_t[t] = -INFINITY;
            l_t[t] = _mm512_setzero_ps();
            for (int64_t c = 0; c < DV; c++) _mm512_store_ps(&acc_t[t][c * 16], _mm512_setzero_ps());
        }
        int64_t kend = causal >= 0 && causal + i0 + nt < Np ? causal + i0 + nt : Np;
        for (int64_t j0 = 0; j0 < kend; j0 += KB) {
            int64_t valid = Sk - j0 < KB ? Sk - j0 : KB;
            const uint32_t *vblk = v2 + (j0 / 2) * D;
            int64_t pairs = (valid + 1) / 2;
            for (int ib = 0; ib < nt; ib += QB) {
                int nq = nt - ib < QB ? nt - ib : QB;  /* rows >= nq are zero padding, computed and dropped */
                const uint32_t *qrow = q2 + (i0 + ib) * D2;
                __m512 s[QB][KB / 16];
                for (int i = 0; i < QB; i++)
                    for (int c = 0; c < KB / 16; c++) s[i][c] = _mm512_setzero_ps();
                for (int64_t dp = 0; dp < D2; dp++) {
                    const uint32_t *kr = kt2 + dp * Np + j0;
                    __m512bh k0 = (__m512bh)_mm512_loadu_si512(kr), k1 = (__m512bh)_mm512_loadu_si512(kr + 16);
                    __m512bh k2 = (__m512bh)_mm512_loadu_si512(kr + 32), k3 = (__m512bh)_mm512_loadu_si512(kr + 48);
                    for (int i = 0; i < QB; i++) {
                        __m512bh qv = (__m512bh)_mm512_set1_epi32((int)qrow[i * D2 + dp]);
                        s[i][0] = _mm512_dpbf16_ps(s[i][0], qv, k0);
                        s[i][1] = _mm512_dpbf16_ps(s[i][1], qv, k1);
                        s[i][2] = _mm512_dpbf16_ps(s[i][2], qv, k2);
                        s[i][3] = _mm512_dpbf16_ps(s[i][3], qv, k3);
                    }
                }
                uint32_t pp[QB][KB / 2] __attribute__((aligned(64)));
                for (int i = 0; i < nq; i++) {
                    int t = ib + i;
                    int64_t vi = valid;
                    if (causal >= 0 && causal + i0 + t + 1 - j0 < vi) vi = causal + i0 + t + 1 - j0;
                    for (int c = 0; c < KB / 16; c++) {  /* raw scores; the scale is folded into exp2 */
                        int64_t base = c * 16;
                        if (base >= vi) s[i][c] = _mm512_set1_ps(-INFINITY);
                        else if (base + 16 > vi)
                            s[i][c] = _mm512_mask_blend_ps((__mmask16)((1u << (vi - base)) - 1u),
                                                           _mm512_set1_ps(-INFINITY), s[i][c]);
                    }
                    __m512 mx = _mm512_max_ps(_mm512_max_ps(s[i][0], s[i][1]), _mm512_max_ps(s[i][2], s[i][3]));
                    if (_mm512_cmp_ps_mask(mx, _mm512_set1_ps(m_t[t]), _CMP_GT_OQ)) {
                        float nm = _mm512_reduce_max_ps(mx);
                        __m512 corr = _mm512_set1_ps(exp2f((m_t[t] - nm) * c2));  /* 0 on the first block */
                        m_t[t] = nm;
                        l_t[t] = _mm512_mul_ps(l_t[t], corr);
                        for (int64_t c = 0; c < DV; c++)
                            _mm512_store_ps(&acc_t[t][c * 16], _mm512_mul_ps(_mm512_load_ps(&acc_t[t][c * 16]), corr));
                    }
                    __m512 mv = _mm512_set1_ps(m_t[t] * c2);
                    for (int c = 0; c < KB / 16; c++) {  /* p = exp(scale * (s - m)) = 2^(c2 s - c2 m) */
                        s[i][c] = v16_exp2_nonpos(_mm512_fmsub_ps(s[i][c], c2v, mv));
                        l_t[t] = _mm512_add_ps(l_t[t], s[i][c]);
                    }
                    /* probabilities as bf16 pairs over keys (RNE, as torch): pp[i][jp] = (p[2jp], p[2jp+1]) */
                    for (int c = 0; c < KB / 32; c++)
                        _mm512_store_si512(&pp[i][c * 16], (__m512i)_mm512_cvtne2ps_pbh(s[i][2 * c + 1], s[i][2 * c]));
                }
                for (int i = nq; i < QB; i++)
                    for (int c = 0; c < KB / 32; c++) _mm512_store_si512(&pp[i][c * 16], _mm512_setzero_si512());
                __m512 acc[QB][MAXD / 16];
                for (int i = 0; i < QB; i++)
                    for (int c = 0; c < DV; c++)
                        acc[i][c] = i < nq ? _mm512_load_ps(&acc_t[ib + i][c * 16]) : _mm512_setzero_ps();
                for (int64_t jp = 0; jp < pairs; jp++) {
                    const uint32_t *vr = vblk + jp * D;
                    for (int c = 0; c < DV; c++) {
                        __m512bh v = (__m512bh)_mm512_loadu_si512(vr + c * 16);
                        for (int i = 0; i < QB; i++)
                            acc[i][c] = _mm512_dpbf16_ps(acc[i][c], (__m512bh)_mm512_set1_epi32((int)pp[i][jp]), v);
                    }
                }
                for (int i = 0; i < nq; i++)
                    for (int64_t c = 0; c < DV; c++) _mm512_store_ps(&acc_t[ib + i][c * 16], acc[i][c]);
            }
        }
        for (int t = 0; t < nt; t++) {
            __m512 a[MAXD / 16];
            for (int64_t c = 0; c < DV; c++) a[c] = _mm512_load_ps(&acc_t[t][c * 16]);
            store_row(out, 1, i0 + t, h, H, D, a, 1.0f / _mm512_reduce_add_ps(l_t[t]));
        }
    }
}

__attribute__((target("avx512bf16,avx512vl,avx512bw,avx512f")))
static void head_bf16(const void *qkv, const float *cos, const float *sin, void *out, int64_t S, int64_t H,
                      int64_t h, int64_t D, float scale, uint32_t *kt2, uint32_t *v2, uint32_t *q2, int64_t Np,
                      int64_t q0, int64_t q1) {
    /* kt2[dp*Np + j] = (k[j][2dp], k[j][2dp+1]); v2[jp*D + d] = (v[2jp][d], v[2jp+1][d]); q2[n*D/2 + dp]. */
    float row[MAXD];
    const int64_t D2 = D / 2;
    for (int64_t n = 0; n < Np; n++) {
        if (n < S) rotated_row(qkv, 1, n, 1, h, H, D, cos, sin, row);
        for (int64_t dp = 0; dp < D2; dp++)
            kt2[dp * Np + n] = n < S ? (uint32_t)f32_to_bf16(row[2 * dp]) | ((uint32_t)f32_to_bf16(row[2 * dp + 1]) << 16) : 0u;
    }
    for (int64_t jp = 0; jp < Np / 2; jp++)
        for (int64_t d = 0; d < D; d++) {
            int64_t j = 2 * jp;
            uint32_t lo = j < S ? f32_to_bf16(v_at(qkv, 1, j, h, H, D, d)) : 0u;
            uint32_t hi = j + 1 < S ? f32_to_bf16(v_at(qkv, 1, j + 1, h, H, D, d)) : 0u;
            v2[jp * D + d] = lo | (hi << 16);
        }
    const int64_t Q = q1 - q0;  /* queries [q0, q1): each query row is computed alone, any range gives its bits */
    for (int64_t n = q0; n < q1; n++) {
        rotated_row(qkv, 1, n, 0, h, H, D, cos, sin, row);
        for (int64_t dp = 0; dp < D2; dp++)
            q2[(n - q0) * D2 + dp] = (uint32_t)f32_to_bf16(row[2 * dp]) | ((uint32_t)f32_to_bf16(row[2 * dp + 1]) << 16);
    }
    memset(q2 + Q * D2, 0, (size_t)(Np - Q) * D2 * sizeof(uint32_t));  /* pad rows: whole QB groups */
    out = (uint16_t *)out + q0 * H * D;
    /* Specialised on D/16 so the accumulators stay in registers (Qwen2-VL: D = 80). */
    switch (D / 16) {
        case 4: bf16_tiles(4, out, Q, S, -1, H, h, scale, kt2, v2, q2, Np); break;
        case 5: bf16_tiles(5, out, Q, S, -1, H, h, scale, kt2, v2, q2, Np); break;
        case 8: bf16_tiles(8, out, Q, S, -1, H, h, scale, kt2, v2, q2, Np); break;
        default: bf16_tiles(D / 16, out, Q, S, -1, H, h, scale, kt2, v2, q2, Np);
    }
}

/* qkv (S,3,H,D), cos/sin (S,D) fp32, out (S,H,D). bf16 != 0: 16-bit inputs/outputs and the BF16 path.
 * Only query rows [q0, q1) of heads [h0, h1) are computed and written (all S keys are used): the engine runs a
 * large picture's attention in slices between decode steps, with the same bits as one call over all rows and
 * heads. A call packs the keys / values of its heads (a pass over S rows), so slices of few heads x many queries
 * repeat less of that work than slices of all heads x few queries. */
int vision_attention(const void *qkv, const float *cos, const float *sin, void *out, int64_t S, int64_t H,
                     int64_t D, float scale, int bf16, int nthreads, int64_t q0, int64_t q1, int64_t h0,
                     int64_t h1) {
    if (D % 16 != 0 || D > MAXD || S <= 0 || q0 < 0 || q1 > S || q0 >= q1 || h0 < 0 || h1 > H || h0 >= h1)
        return -1;
    int64_t Np = (S + KB - 1) / KB * KB;
    int rc = 0;
#pragma omp parallel num_threads(nthreads)
    {
        size_t words = (size_t)(3 * D * Np);
        void *buf = aligned_alloc(64, (words * sizeof(float) + 63) / 64 * 64);
        if (!buf) {
#pragma omp atomic write
            rc = -3;
        } else {
#pragma omp for schedule(dynamic, 1)
            for (int64_t h = h0; h < h1; h++) {
                if (bf16) {
                    uint32_t *b = (uint32_t *)buf;
                    head_bf16(qkv, cos, sin, out, S, H, h, D, scale, b, b + D * Np / 2, b + D * Np, Np, q0, q1);
                } else {
                    float *b = (float *)buf;
                    head_f32(qkv, cos, sin, out, S, H, h, D, scale, b, b + D * Np, b + 2 * D * Np, Np, q0, q1);
                }
            }
            free(buf);
        }
    }
    return rc;
}

/* ------------------------------------------------------------------------------------ text prefill
 * Causal attention of S new queries per row over Sk = past + S keys, all rows alike (no padding): q (B, Hq, S, D),
 * k/v (B, Hkv, Sk, D) bf16 with any batch/head/token strides (contiguous D), out (B, S, Hq, D) bf16. Same tiles as
 * the vision kernel (BF16 dot products, P rounded to bf16); one (row, query head) per task, K/V packed per task. */
__attribute__((target("avx512bf16,avx512vl,avx512bw,avx512f")))
static void text_head(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *out, int64_t S, int64_t Sk,
                      int64_t H, int64_t h, int64_t D, int64_t qs, int64_t ks, int64_t vs, float scale,
                      uint32_t *kt2, uint32_t *v2, uint32_t *q2, int64_t Np) {
    const int64_t D2 = D / 2;
    for (int64_t n = 0; n < Np; n++)
        for (int64_t dp = 0; dp < D2; dp++)
            kt2[dp * Np + n] = n < Sk ? (uint32_t)k[n * ks + 2 * dp] | ((uint32_t)k[n * ks + 2 * dp + 1] << 16) : 0u;
    for (int64_t jp = 0; jp < Np / 2; jp++)
        for (int64_t d = 0; d < D; d++) {
            int64_t j = 2 * jp;
            uint32_t lo = j < Sk ? v[j * vs + d] : 0u, hi = j + 1 < Sk ? v[(j + 1) * vs + d] : 0u;
            v2[jp * D + d] = lo | (hi << 16);
        }
    int64_t Sp = (S + QB - 1) / QB * QB;
    for (int64_t n = 0; n < Sp; n++)
        for (int64_t dp = 0; dp < D2; dp++)
            q2[n * D2 + dp] = n < S ? (uint32_t)q[n * qs + 2 * dp] | ((uint32_t)q[n * qs + 2 * dp + 1] << 16) : 0u;
    switch (D / 16) {
        case 4: bf16_tiles(4, out, S, Sk, Sk - S, H, h, scale, kt2, v2, q2, Np); break;
        case 5: bf16_tiles(5, out, S, Sk, Sk - S, H, h, scale, kt2, v2, q2, Np); break;
        case 8: bf16_tiles(8, out, S, Sk, Sk - S, H, h, scale, kt2, v2, q2, Np); break;
        default: bf16_tiles(D / 16, out, S, Sk, Sk - S, H, h, scale, kt2, v2, q2, Np);
    }
}

int prefill_attention(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *out, int64_t B, int64_t Hq,
                      int64_t Hkv, int64_t S, int64_t Sk, int64_t D, int64_t q_sb, int64_t q_sh, int64_t q_ss,
                      int64_t k_sb, int64_t k_sh, int64_t k_ss, int64_t v_sb, int64_t v_sh, int64_t v_ss,
                      float scale, int nthreads) {
    if (D % 16 != 0 || D > MAXD || Hq % Hkv != 0 || S <= 0 || Sk < S) return -1;
    const int64_t rep = Hq / Hkv, Np = (Sk + KB - 1) / KB * KB, Sp = (S + QB - 1) / QB * QB;
    int rc = 0;
#pragma omp parallel num_threads(nthreads)
    {
        uint32_t *buf = aligned_alloc(64, ((size_t)(D * Np + D / 2 * Sp) * 4 + 63) / 64 * 64);
        if (!buf) {
#pragma omp atomic write
            rc = -3;
        } else {
#pragma omp for schedule(dynamic, 1)
            for (int64_t bh = 0; bh < B * Hq; bh++) {
                int64_t b = bh / Hq, h = bh % Hq, g = h / rep;
                text_head(q + b * q_sb + h * q_sh, k + b * k_sb + g * k_sh, v + b * v_sb + g * v_sh,
                          out + b * S * Hq * D, S, Sk, Hq, h, D, q_ss, k_ss, v_ss, scale,
                          buf, buf + D / 2 * Np, buf + D * Np, Np);
            }
            free(buf);
        }
    }
    return rc;
}
