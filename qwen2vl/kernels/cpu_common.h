/* Helpers shared by every CPU kernel source: thread shares and scalar bf16 <-> fp32. The vector helpers (bf16
 * loads, exp) are in cpu_vec16.h. */
#ifndef QWEN2VL_CPU_COMMON_H
#define QWEN2VL_CPU_COMMON_H
#include <immintrin.h>
#include <omp.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "qwen2vl_kernels.h"

#define MAXD 128

/* Thread t's contiguous share [lo, hi) of n items split among nt threads, boundaries multiples of `align`. */
static inline void share(int64_t n, int64_t align, int t, int nt, int64_t *lo, int64_t *hi) {
    int64_t blocks = (n + align - 1) / align;
    *lo = blocks * t / nt * align;
    *hi = blocks * (t + 1) / nt * align;
    if (*lo > n) *lo = n;
    if (*hi > n) *hi = n;
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch's .to(bfloat16) */
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

#endif
