/* One decoding step through the whole Qwen2 decoder stack in a single call (CPU, bf16).
 *
 * B <= 8 sequences, one new token each: x (B, H) is updated in place layer by layer. Every step is one of the
 * library's kernels called exactly as the per-op Python path calls them (same kernels, same order, same bf16
 * roundings), so the result is bit-identical to that path; what goes away is the ~200 Python-level calls a step
 * makes otherwise (about 3.5 ms per token on the 2B shape, ~8 % of a token's time at full read bandwidth). With
 * every projection bf16 the step is one OpenMP parallel region (step_one_region), else one per kernel call.
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

/* Thread t of T's share of several products of the same input h (M, K), one after another without waiting for
 * the other threads between them: a thread that is done early reads on instead of idling (2-3 % more read bandwidth
 * than one call per product). */
static void gemv_group_share(const uint16_t *h, const proj *p, int cnt, int64_t M, int64_t K, int t, int T) {
    for (int j = 0; j < cnt; j++) {
        int64_t lo, hi;
        share(p[j].N, gemv_bf16_dp_align(M), t, T, &lo, &hi);
        gemv_bf16_dp_rows(h, p[j].w, NULL, (float *)p[j].y, M, p[j].N, K, p[j].bias, 1, lo, hi);
    }
}

/* Thread t of T's share of the gate and up rows, then silu(gate) * up on that share (shares are multiples of the
 * kernel's row block and of the 16 lanes silu_mul_span takes: their least common multiple): no barrier and no
 * separate pass. */
static void gate_up_silu_share(const uint16_t *h, const void *wg, const void *wu, uint16_t *g, uint16_t *u,
                               int64_t M, int64_t I, int64_t K, int t, int T) {
    int64_t nr = gemv_bf16_dp_align(M), align = 16 % nr == 0 ? 16 : 16 * nr;  /* nr is 1..4 */
    int64_t lo, hi;
    share(I, align, t, T, &lo, &hi);
    gemv_bf16_dp_rows(h, wg, NULL, (float *)g, M, I, K, NULL, 1, lo, hi);
    gemv_bf16_dp_rows(h, wu, NULL, (float *)u, M, I, K, NULL, 1, lo, hi);
    for (int64_t m = 0; m < M; m++) silu_mul_span(g + m * I + lo, u + m * I + lo, hi - lo);
}

/* The per-op path's SiLU * up over bf16 (n), n % 16 == 0: each thread runs its build's silu_mul_span on its share
 * (shares are multiples of the 16 lanes it takes), as gate_up_silu_share does inside the fused step. */
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

/* decode_layers' arguments (see there), and its work buffers (B rows each): h the normed input, q / k / v the
 * projections, qr / kr after the rotary, att the attention output, o the o / down projection, g / u gate and up. */
typedef struct {
    uint16_t *x;
    int64_t n_layers;
    const void *const *weights;
    uint16_t *const *kc, *const *vc;
    const int64_t *strides, *slots;
    int64_t kv_len;
    const uint8_t *mask;
    const uint16_t *cos, *sin;
    int64_t B, H, I, Hq, Hkv, D;
    float eps, scale;
    int nt;
    const int32_t *kinds;
    const void *const *qparams;
    int64_t G;
    int use512;
    uint16_t *h, *q, *qr, *k, *kr, *v, *att, *o, *g, *u;
} step;

/* Layer l's seven projections (q k v o gate up down) into P; returns whether any of them is quantized. */
static int layer_projs(const step *S, int64_t l, proj P[NPROJ]) {
    const void *const *W = S->weights + l * NPTR;
    const int widx[NPROJ] = {WQ, WK, WV, WO, WG, WU, WD}, bidx[NPROJ] = {BQ, BK, BV, -1, -1, -1, -1};
    uint16_t *outs[NPROJ] = {S->q, S->k, S->v, S->o, S->g, S->u, S->o};
    const int64_t QD = S->Hq * S->D, KD = S->Hkv * S->D, ns[NPROJ] = {QD, KD, KD, S->H, S->I, S->I, S->H};
    int quantized = 0;
    for (int j = 0; j < NPROJ; j++) {
        int kind = S->kinds ? S->kinds[l * NPROJ + j] : P_BF16;
        quantized |= kind != P_BF16;
        P[j] = (proj){W[widx[j]], bidx[j] < 0 ? NULL : W[bidx[j]], outs[j], ns[j], kind,
                      S->kinds ? (const float *)S->qparams[(l * NPROJ + j) * 2] : NULL,
                      S->kinds ? (const uint8_t *)S->qparams[(l * NPROJ + j) * 2 + 1] : NULL};
    }
    return quantized;
}

/* The attention of layer l over its cache, queries qr (decode_attention's operands). */
static decode_attn layer_attention(const step *S, int64_t l) {
    const int64_t *st = S->strides;
    return (decode_attn){S->qr, S->kc[l], S->vc[l], S->mask, S->att, S->B, S->Hq, S->Hkv, S->kv_len, S->D,
                         S->Hq * S->D, S->D, st[0], st[1], st[2], st[3], st[4], st[5], S->scale};
}

/* Every layer bf16: the whole step in ONE parallel region (one fork/join per token instead of five per layer),
 * the phases separated by barriers: q/k/v | per (row, KV head): rotary, cache write, attention | o | gate/up +
 * SiLU | down. Each thread keeps its own copy of the residual stream x and of its norm h (B x H: every thread
 * computes them in full, the same bits, instead of waiting for one another); each kernel core computes what it
 * would in its own call (GEMV rows do not depend on the split, nor does any row's norm or (row, head)'s rotary and
 * attention), so the result is the per-kernel step's to the bit. */
static int step_one_region(const step *S) {
    const int64_t B = S->B, H = S->H, Hq = S->Hq, Hkv = S->Hkv, D = S->D, rep = Hq / Hkv, *st = S->strides;
    int fail = 0;
#pragma omp parallel num_threads(S->nt)
    {
        const int t = omp_get_thread_num(), T = omp_get_num_threads();
        uint16_t *xt = malloc((size_t)2 * B * H * sizeof(uint16_t)), *ht = xt ? xt + B * H : NULL;
        decode_attn a = layer_attention(S, 0);
        float *sc = aligned_alloc(64, (size_t)decode_attention_scratch(&a) * sizeof(float));
        if (!xt || !sc) {
#pragma omp atomic write
            fail = 1;
        }
#pragma omp barrier
        if (!fail) {
            memcpy(xt, S->x, (size_t)B * H * sizeof(uint16_t));
            for (int64_t l = 0; l < S->n_layers; l++) {
                const void *const *W = S->weights + l * NPTR;
                proj P[NPROJ];
                layer_projs(S, l, P);
                a = layer_attention(S, l);
                for (int64_t b = 0; b < B; b++) rms_norm_row(xt + b * H, W[LN1], ht + b * H, H, S->eps);
                gemv_group_share(ht, P, 3, B, H, t, T);
#pragma omp barrier
#pragma omp for schedule(static)
                for (int64_t bg = 0; bg < B * Hkv; bg++) {
                    int64_t b = bg / Hkv, g = bg % Hkv;
                    const uint16_t *c = S->cos + b * D, *sn = S->sin + b * D;
                    for (int64_t r = 0; r < rep; r++) {
                        int64_t at = (b * Hq + g * rep + r) * D;
                        rope_head(S->q + at, c, sn, S->qr + at, D);
                    }
                    rope_head(S->k + (b * Hkv + g) * D, c, sn, S->kc[l] + b * st[0] + g * st[1] + S->slots[b] * st[2], D);
                    memcpy(S->vc[l] + b * st[3] + g * st[4] + S->slots[b] * st[5], S->v + (b * Hkv + g) * D, 2 * D);
                    decode_attention_group(&a, bg, sc);
                } /* the loop's barrier: att complete */
                gemv_group_share(S->att, &P[3], 1, B, Hq * D, t, T);
#pragma omp barrier
                add_bf16(xt, S->o, B * H);
                for (int64_t b = 0; b < B; b++) rms_norm_row(xt + b * H, W[LN2], ht + b * H, H, S->eps);
                gate_up_silu_share(ht, W[WG], W[WU], S->g, S->u, B, S->I, H, t, T);
#pragma omp barrier
                gemv_group_share(S->g, &P[6], 1, B, S->I, t, T);
#pragma omp barrier
                add_bf16(xt, S->o, B * H);  /* o is next written after two more barriers, once all have read it */
            }
            if (t == 0) memcpy(S->x, xt, (size_t)B * H * sizeof(uint16_t));
        }
        free(xt);
        free(sc);
    }
    return fail ? -3 : 0;
}

/* Some projection quantized: each kernel in its own parallel region (the quantized GEMVs split their work inside
 * their calls), layer by layer in the per-op path's order. */
static int step_per_kernel(const step *S) {
    const int64_t B = S->B, H = S->H, I = S->I, Hq = S->Hq, Hkv = S->Hkv, D = S->D, G = S->G, *st = S->strides;
    const int nt = S->nt, use512 = S->use512;
    int rc = 0;
    for (int64_t l = 0; l < S->n_layers && rc == 0; l++) {
        const void *const *W = S->weights + l * NPTR;
        proj P[NPROJ];
        int quantized = layer_projs(S, l, P);
        rc |= rms_norm(S->x, W[LN1], S->h, B, H, S->eps, nt);
        if (quantized)
            for (int j = 0; j < 3; j++) rc |= proj_run(S->h, &P[j], B, H, G, use512, nt);
        else {
#pragma omp parallel num_threads(nt)
            gemv_group_share(S->h, P, 3, B, H, omp_get_thread_num(), omp_get_num_threads());
        }
        rc |= rope_bf16(S->q, S->cos, S->sin, S->qr, B, Hq, D, nt);
        rc |= rope_bf16(S->k, S->cos, S->sin, S->kr, B, Hkv, D, nt);
        for (int64_t b = 0; b < B; b++)
            for (int64_t j = 0; j < Hkv; j++) {
                memcpy(S->kc[l] + b * st[0] + j * st[1] + S->slots[b] * st[2], S->kr + (b * Hkv + j) * D, 2 * D);
                memcpy(S->vc[l] + b * st[3] + j * st[4] + S->slots[b] * st[5], S->v + (b * Hkv + j) * D, 2 * D);
            }
        decode_attn a = layer_attention(S, l);
        rc |= decode_attention(a.q, a.k, a.v, a.mask, a.out, B, Hq, Hkv, a.K, D, a.q_sb, a.q_sh, a.k_sb, a.k_sh,
                               a.k_sk, a.v_sb, a.v_sh, a.v_sk, a.scale, nt);
        rc |= proj_run(S->att, &P[3], B, Hq * D, G, use512, nt);
        add_bf16(S->x, S->o, B * H);
        rc |= rms_norm(S->x, W[LN2], S->h, B, H, S->eps, nt);
        if (quantized) {
            rc |= proj_run(S->h, &P[4], B, H, G, use512, nt);
            rc |= proj_run(S->h, &P[5], B, H, G, use512, nt);
            rc |= silu_mul(S->g, S->u, B * I, nt);
        } else {
#pragma omp parallel num_threads(nt)
            gate_up_silu_share(S->h, W[WG], W[WU], S->g, S->u, B, I, H, omp_get_thread_num(), omp_get_num_threads());
        }
        rc |= proj_run(S->g, &P[6], B, I, G, use512, nt);
        add_bf16(S->x, S->o, B * H);
    }
    return rc ? -2 : 0;
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
    const step S = {x, n_layers, weights, kc, vc, strides, slots, kv_len, mask, cos, sin, B, H, I, Hq, Hkv, D, eps,
                    scale, nt, kinds, qparams, G, use512, h, q, qr, k, kr, v, att, o, g, u};
    int any_quantized = 0;
    for (int64_t j = 0; kinds && j < n_layers * NPROJ; j++) any_quantized |= kinds[j] != P_BF16;
    int rc = any_quantized ? step_per_kernel(&S) : step_one_region(&S);
    free(buf);
    return rc;
}
