/* The decoder's rotary embedding, plain C (no vector intrinsics): built into both the AVX512 and the AVX2 library.
 * The compiler vectorises it for either. */
#include "cpu_common.h"

/* ------------------------------------------------------------------------------------ decoder rotary embedding
 * bf16 x (rows, heads*D), cos/sin (rows, D): out = x*cos + rotate_half(x)*sin per head, rounded to bf16 after each
 * of the reference's three ops (the products, then their sum) so results are bit-identical to it; one call instead
 * of ten torch ops for q or k. rope_head: one (row, head) of D values on the calling thread (the fused step). */
void rope_head(const uint16_t *xi, const uint16_t *c, const uint16_t *s, uint16_t *o, int64_t D) {
    int64_t half = D / 2;
    for (int64_t i = 0; i < D; i++) {
        float rot = i < half ? -bf16_to_f32(xi[i + half]) : bf16_to_f32(xi[i - half]);
        float a = round_bf16(bf16_to_f32(xi[i]) * bf16_to_f32(c[i]));
        float b = round_bf16(rot * bf16_to_f32(s[i]));
        o[i] = f32_to_bf16(a + b);
    }
}

int rope_bf16(const uint16_t *x, const uint16_t *cs, const uint16_t *sn, uint16_t *out, int64_t rows, int64_t heads,
              int64_t D, int nthreads) {
    if (D % 2 != 0) return -1;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (rows * heads >= 256)
    for (int64_t rh = 0; rh < rows * heads; rh++) {
        int64_t r = rh / heads;
        rope_head(x + rh * D, cs + r * D, sn + r * D, out + rh * D, D);
    }
    return 0;
}
