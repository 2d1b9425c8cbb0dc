/* One decoding step through the whole Qwen2 decoder stack in a single call (CPU, bf16).
 *
 * B <= 8 sequences, one new token each: x (B, H) is updated in place layer by layer. Every step is one of the
 * library's kernels called exactly as the per-op Python path calls them (same kernels, same order, same bf16
 * roundings), so the result is bit-identical to that path; what goes away is the ~200 Python-level calls a step
 * makes otherwise (about 3.5 ms per token on the 2B shape, ~8 % of a token's time at full read bandwidth).
 *
 * Per layer l, weights[l * NPTR + i] holds the bf16 tensors in the order of the enum below (biases of q/k/v
 * only). The KV cache of layer l is kc[l]/vc[l] (B, Hkv, Smax, D) with the element strides in `strides`
 * (k: batch, head, slot; then v alike); row b's new key/value go to slot slots[b], and attention covers the first
 * kv_len slots, restricted by mask (B, kv_len) bytes (1 = attend) when given. cos/sin (B, D) bf16 rotary tables.
 */
#include "cpu_common.h"


enum { LN1, WQ, BQ, WK, BK, WV, BV, WO, LN2, WG, WU, WD, NPTR };
/* Quantized projections (quantization/int4.py, int8.py): per layer and projection (q k v o gate up down) a kind,
 * and in qparams its fp32 scales and uint8 zero points (4-bit) at 2 p, 2 p + 1. The kernel is the one the per-op
 * path's `choose` picked for that projection, its bf16 output plus the bf16 bias added after it, as there. */
enum { P_BF16, P_Q4, P_Q4_INTDOT, P_I8_INTDOT };
#define NPROJ 7

typedef struct { const void *w, *bias; uint16_t *y; int64_t N; int kind; const float *s; const uint8_t *z; } proj;

/* y[m, :] += bias in bf16 (fp32 sum rounded once, as torch's bf16 add) */
static void add_bias_bf16(uint16_t *y, const uint16_t *bias, int64_t M, int64_t N) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t n = 0; n < N; n++) y[m * N + n] = f32_to_bf16(bf16_to_f32(y[m * N + n]) + bf16_to_f32(bias[n]));
}

static int proj_run(const uint16_t *x, const proj *p, int64_t M, int64_t K, int64_t G, int use512, int nt) {
    int rc;
    switch (p->kind) {
        case P_BF16:
            return gemv_bf16_dp(x, (const uint16_t *)p->w, NULL, (float *)p->y, M, p->N, K, nt,
                                (const uint16_t *)p->bias, 1);
        case P_Q4: rc = gemv_q4_avx512bf16(x, p->w, p->s, p->z, p->y, M, p->N, K, G, nt); break;
        case P_Q4_INTDOT: rc = gemv_q4_intdot(x, p->w, p->s, p->z, p->y, M, p->N, K, G, nt, use512); break;
        case P_I8_INTDOT: rc = gemv_i8_intdot(x, p->w, p->s, p->y, M, p->N, K, nt, use512); break;
        default: return -1;
    }
    if (rc == 0 && p->bias) add_bias_bf16(p->y, (const uint16_t *)p->bias, M, p->N);
    return rc;
}

/* Several products of the same input h (M, K) in one parallel region: each thread does its share of each in
 * turn without waiting for the other between them, so a thread that is done early reads on instead of idling
 * (2-3 % more read bandwidth than one call per product). */
static void gemv_group(const uint16_t *h, const proj *p, int cnt, int64_t M, int64_t K, int nt) {
#pragma omp parallel num_threads(nt)
    for (int j = 0; j < cnt; j++) {
        int64_t lo, hi;
        share(p[j].N, gemv_bf16_dp_align(M), omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);
        gemv_bf16_dp_rows(h, p[j].w, NULL, (float *)p[j].y, M, p[j].N, K, p[j].bias, 1, lo, hi);
    }
}

/* gate and up rows of one share, then silu(gate) * up on that share (shares are multiples of the kernel's row
 * block and of the 16 lanes silu_mul_span takes: their least common multiple): no barrier and no separate pass. */
static void gate_up_silu(const uint16_t *h, const void *wg, const void *wu, uint16_t *g, uint16_t *u, int64_t M,
                         int64_t I, int64_t K, int nt) {
    int64_t nr = gemv_bf16_dp_align(M), align = 16 % nr == 0 ? 16 : 16 * nr;  /* nr is 1..4 */
#pragma omp parallel num_threads(nt)
    {
        int64_t lo, hi;
        share(I, align, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);
        gemv_bf16_dp_rows(h, wg, NULL, (float *)g, M, I, K, NULL, 1, lo, hi);
        gemv_bf16_dp_rows(h, wu, NULL, (float *)u, M, I, K, NULL, 1, lo, hi);
        for (int64_t m = 0; m < M; m++) silu_mul_span(g + m * I + lo, u + m * I + lo, hi - lo);
    }
}

/* The per-op path's SiLU * up over bf16 (n), n % 16 == 0: each thread runs its build's silu_mul_span on its share
 * (shares are multiples of the 16 lanes it takes), as gate_up_silu does inside the fused step. */
int silu_mul(uint16_t *gate, const uint16_t *up, int64_t n, int nthreads) {
    if (n % 16 != 0) return -1;
#pragma omp parallel num_threads(nthreads) if (n >= 65536)
    {
        int64_t lo, hi;
        share(n, 16, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);
        silu_mul_span(gate + lo, up + lo, hi - lo);
    }
    return 0;
}

/* x += y in bf16 (fp32 sum rounded once, as torch's bf16 add) */
static void add_bf16(uint16_t *x, const uint16_t *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) x[i] = f32_to_bf16(bf16_to_f32(x[i]) + bf16_to_f32(y[i]));
}

/* kinds (n_layers, NPROJ) and qparams (n_layers, 2 NPROJ): NULL when every projection is bf16; G: the 4-bit
 * group size; use512: the integer kernels' AVX512-VNNI variant. */
int decode_layers(uint16_t *x, int64_t n_layers, const void *const *weights, uint16_t *const *kc,
                  uint16_t *const *vc, const int64_t *strides, const int64_t *slots, int64_t kv_len,
                  const uint8_t *mask, const uint16_t *cos, const uint16_t *sin, int64_t B, int64_t H, int64_t I,
                  int64_t Hq, int64_t Hkv, int64_t D, float eps, float scale, int nt,
                  const int32_t *kinds, const void *const *qparams, int64_t G, int use512) {
    /* every kernel's own precondition, checked before anything is written */
    if (B < 1 || B > 8 || H % 32 || I % 32 || (Hq * D) % 32 || D % 16 || D > MAXD || Hq % Hkv || kv_len < 1)
        return -1;
    if (kinds && (H % 128 || I % 128 || (Hq * D) % 128 || G <= 0 || G % 128 || H % G || I % G || (Hq * D) % G))
        return -1;  /* the quantized kernels' shapes */
    const int64_t QD = Hq * D, KD = Hkv * D;
    uint16_t *buf = malloc((size_t)B * (2 * H + 3 * QD + 3 * KD + 2 * I) * sizeof(uint16_t));
    if (!buf) return -3;
    uint16_t *h = buf, *o = h + B * H, *q = o + B * H, *qr = q + B * QD, *att = qr + B * QD, *k = att + B * QD,
             *kr = k + B * KD, *v = kr + B * KD, *g = v + B * KD, *u = g + B * I;
    int rc = 0;
    for (int64_t l = 0; l < n_layers && rc == 0; l++) {
        const void *const *W = weights + l * NPTR;
        proj P[NPROJ];
        const int widx[NPROJ] = {WQ, WK, WV, WO, WG, WU, WD}, bidx[NPROJ] = {BQ, BK, BV, -1, -1, -1, -1};
        uint16_t *outs[NPROJ] = {q, k, v, o, g, u, o};
        const int64_t ns[NPROJ] = {QD, KD, KD, H, I, I, H};
        int quantized = 0;
        for (int j = 0; j < NPROJ; j++) {
            int kind = kinds ? kinds[l * NPROJ + j] : P_BF16;
            quantized |= kind != P_BF16;
            P[j] = (proj){W[widx[j]], bidx[j] < 0 ? NULL : W[bidx[j]], outs[j], ns[j], kind,
                          kinds ? (const float *)qparams[(l * NPROJ + j) * 2] : NULL,
                          kinds ? (const uint8_t *)qparams[(l * NPROJ + j) * 2 + 1] : NULL};
        }
        rc |= rms_norm(x, W[LN1], h, B, H, eps, nt);
        if (quantized)
            for (int j = 0; j < 3; j++) rc |= proj_run(h, &P[j], B, H, G, use512, nt);
        else
            gemv_group(h, P, 3, B, H, nt);
        rc |= rope_bf16(q, cos, sin, qr, B, Hq, D, nt);
        rc |= rope_bf16(k, cos, sin, kr, B, Hkv, D, nt);
        for (int64_t b = 0; b < B; b++)
            for (int64_t j = 0; j < Hkv; j++) {
                memcpy(kc[l] + b * strides[0] + j * strides[1] + slots[b] * strides[2], kr + (b * Hkv + j) * D, 2 * D);
                memcpy(vc[l] + b * strides[3] + j * strides[4] + slots[b] * strides[5], v + (b * Hkv + j) * D, 2 * D);
            }
        rc |= decode_attention(qr, kc[l], vc[l], mask, att, B, Hq, Hkv, kv_len, D, QD, D, strides[0], strides[1],
                               strides[2], strides[3], strides[4], strides[5], scale, nt);
        rc |= proj_run(att, &P[3], B, QD, G, use512, nt);
        add_bf16(x, o, B * H);
        rc |= rms_norm(x, W[LN2], h, B, H, eps, nt);
        if (quantized) {
            rc |= proj_run(h, &P[4], B, H, G, use512, nt);
            rc |= proj_run(h, &P[5], B, H, G, use512, nt);
            rc |= silu_mul(g, u, B * I, nt);
        } else {
            gate_up_silu(h, W[WG], W[WU], g, u, B, I, H, nt);
        }
        rc |= proj_run(g, &P[6], B, I, G, use512, nt);
        add_bf16(x, o, B * H);
    }
    free(buf);
    return rc ? -2 : 0;
}
