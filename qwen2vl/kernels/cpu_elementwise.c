/* The decoder's RMSNorm, its MLP's SiLU * up and the vision MLP's bias + quick-GELU: one source for both builds,
 * written against cpu_vec16.h's 16-lane vectors (same bits from the AVX512 and the AVX2 library). bf16 in and out,
 * fp32 inside, rounded where torch's bf16 ops round. */
#include "cpu_vec16.h"

/* ------------------------------------------------------------------------------------ vision MLP activation
 * In place on the bf16 (rows, N) output of fc1 without its bias: h = x + bias; x = h * sigmoid(1.702 h), in fp32,
 * rounded once. One pass instead of torch's bias copy + three elementwise passes. N % 16 == 0. */
int bias_quick_gelu(uint16_t *x, const float *bias, int64_t rows, int64_t N, int nthreads) {
    if (N % 16 != 0) return -1;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        uint16_t *row = x + r * N;
        for (int64_t c = 0; c < N; c += 16) {
            v16 h = v16_add(v16_bf16(row + c), v16_load(bias + c));
            v16 z = v16_mul(h, v16_set1(1.702f));
            v16 e = v16_exp_nonpos(v16_minus_abs(z));                        /* exp(-|z|) */
            v16 inv = v16_div(v16_set1(1.0f), v16_add(v16_set1(1.0f), e));
            v16_store_bf16(row + c, v16_mul(h, v16_mul_where_neg(z, inv, e)));  /* z < 0: e / (1 + e) */
        }
    }
    return 0;
}

/* ------------------------------------------------------------------------------------ decoder RMSNorm
 * bf16 rows: y = w * bf16(x * rsqrt(mean(x^2) + eps)), the reference's order and roundings (fp32 statistics, cast to
 * bf16 before the weight multiply); one call instead of eight torch ops per norm. N % 16 == 0.
 * rms_norm_row: one row on the calling thread (the fused step, cpu_layer.c). */
void rms_norm_row(const uint16_t *xr, const uint16_t *w, uint16_t *yr, int64_t N, float eps) {
    v16 ss = v16_set1(0.0f);
    for (int64_t c = 0; c < N; c += 16) {
        v16 v = v16_bf16(xr + c);
        ss = v16_fmadd(v, v, ss);
    }
    float inv = 1.0f / sqrtf(v16_sum(ss) / (float)N + eps);
    for (int64_t c = 0; c < N; c += 16) {
        float t[16];
        v16_store(t, v16_mul(v16_bf16(xr + c), v16_set1(inv)));
        for (int i = 0; i < 16; i++) yr[c + i] = f32_to_bf16(bf16_to_f32(w[c + i]) * round_bf16(t[i]));
    }
}

int rms_norm(const uint16_t *x, const uint16_t *w, uint16_t *out, int64_t rows, int64_t N, float eps, int nthreads) {
    if (N % 16 != 0) return -1;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (rows >= 64)
    for (int64_t r = 0; r < rows; r++) rms_norm_row(x + r * N, w, out + r * N, N, eps);
    return 0;
}

/* ------------------------------------------------------------------------------------ decoder MLP activation
 * In place on bf16 gate (n): gate = bf16(bf16(silu(gate)) * up), the two roundings of torch's bf16
 * F.silu(gate).mul_(up); silu in fp32 as x / (1 + exp(-x)), as torch computes it. n % 16 == 0.
 * silu_mul_span: on the calling thread (cpu_layer.c runs it per thread share: silu_mul, the fused step). */
void silu_mul_span(uint16_t *gate, const uint16_t *up, int64_t n) {
    for (int64_t c = 0; c < n; c += 16) {
        v16 g = v16_bf16(gate + c);
        v16 e = v16_exp_nonpos(v16_minus_abs(g));                            /* exp(-|g|) */
        /* g >= 0: g / (1 + e); g < 0: g * e / (1 + e) (exp(-g) would overflow) */
        float t[16];
        v16_store(t, v16_div(v16_mul_where_neg(g, g, e), v16_add(v16_set1(1.0f), e)));
        if (v16_any_below(g, -87.0f))  /* beyond exp_nonpos's range: as torch */
            for (int i = 0; i < 16; i++) {
                float x = bf16_to_f32(gate[c + i]);
                if (x < -87.0f) t[i] = x / (1.0f + expf(-x));
            }
        for (int i = 0; i < 16; i++) gate[c + i] = f32_to_bf16(round_bf16(t[i]) * bf16_to_f32(up[c + i]));
    }
}
