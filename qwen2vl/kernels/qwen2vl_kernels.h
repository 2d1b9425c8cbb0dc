/* Every function the kernel library exports, in one place. Each .c file includes this header (through
 * cpu_common.h), so the compiler checks every definition against its prototype here; tests/test_kernel_ops.py
 * parses the QWEN2VL_API lines below and checks them against the Python side's table (kernels/ops.py,
 * C_FUNCTIONS: the ctypes argument types of every call), so the three cannot drift apart.
 *
 * Conventions: bf16 tensors are uint16_t, every function returns 0 when done and a negative code when a shape
 * precondition fails (nothing written), nthreads is the OpenMP thread count. Not every build has every function:
 * the AVX2 build (cpu_avx2.c) lacks gemv_bf16 / gemv_i8 (fp32 activations), vision_attention and
 * prefill_attention; gemv_q4_avx512bf16 runs only on AVX512-BF16 CPUs. */
#ifndef QWEN2VL_KERNELS_H
#define QWEN2VL_KERNELS_H
#include <stdint.h>

#define QWEN2VL_API

/* y (M, N) fp32 = x (M, K) fp32 @ w (N, K).T (* scale per output row, may be NULL); M 1..8, K % 16 == 0. */
QWEN2VL_API int gemv_bf16(const float *x, const uint16_t *w, const float *scale, float *y, int64_t M, int64_t N,
                          int64_t K, int nthreads);
QWEN2VL_API int gemv_i8(const float *x, const int8_t *w, const float *scale, float *y, int64_t M, int64_t N,
                        int64_t K, int nthreads);
/* bf16 activations, BF16 dot products: + bias (bf16, may be NULL); out_bf16: y is bf16, else fp32. K % 32 == 0. */
QWEN2VL_API int gemv_bf16_dp(const uint16_t *x, const uint16_t *w, const float *scale, float *y, int64_t M,
                             int64_t N, int64_t K, int nthreads, const uint16_t *bias, int out_bf16);
QWEN2VL_API int gemv_i8_dp(const uint16_t *x, const int8_t *w, const float *scale, float *y, int64_t M, int64_t N,
                           int64_t K, int nthreads, const uint16_t *bias, int out_bf16);
/* One query per row over a strided KV cache (GQA), mask (B, K) bytes 1 = attend or NULL. */
QWEN2VL_API int decode_attention(const uint16_t *q, const uint16_t *k, const uint16_t *v, const uint8_t *mask,
                                 uint16_t *out, int64_t B, int64_t Hq, int64_t Hkv, int64_t K, int64_t D,
                                 int64_t q_sb, int64_t q_sh, int64_t k_sb, int64_t k_sh, int64_t k_sk,
                                 int64_t v_sb, int64_t v_sh, int64_t v_sk, float scale, int nthreads);
/* Causal attention of S queries per row over Sk >= S keys, rows alike; out (B, S, Hq, D). */
QWEN2VL_API int prefill_attention(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *out,
                                  int64_t B, int64_t Hq, int64_t Hkv, int64_t S, int64_t Sk, int64_t D,
                                  int64_t q_sb, int64_t q_sh, int64_t q_ss, int64_t k_sb, int64_t k_sh,
                                  int64_t k_ss, int64_t v_sb, int64_t v_sh, int64_t v_ss, float scale,
                                  int nthreads);
/* Fused 2-D rotary + attention of one vision segment of S patches, query rows [q0, q1) of heads [h0, h1). */
QWEN2VL_API int vision_attention(const void *qkv, const float *cos, const float *sin, void *out, int64_t S,
                                 int64_t H, int64_t D, float scale, int bf16, int nthreads, int64_t q0, int64_t q1,
                                 int64_t h0, int64_t h1);
QWEN2VL_API int rms_norm(const uint16_t *x, const uint16_t *w, uint16_t *out, int64_t rows, int64_t N, float eps,
                         int nthreads);
QWEN2VL_API int rope_bf16(const uint16_t *x, const uint16_t *cs, const uint16_t *sn, uint16_t *out, int64_t rows,
                          int64_t heads, int64_t D, int nthreads);
QWEN2VL_API int bias_quick_gelu(uint16_t *x, const float *bias, int64_t rows, int64_t N, int nthreads);
QWEN2VL_API int silu_mul(uint16_t *gate, const uint16_t *up, int64_t n, int nthreads);
/* One decoding step through n_layers decoder layers (cpu_layer.c); kinds / qparams: quantized projections
 * (NULL: all bf16), G their group size, use512 the integer kernels' variant. */
QWEN2VL_API int decode_layers(uint16_t *x, int64_t n_layers, const void *const *weights, uint16_t *const *kc,
                              uint16_t *const *vc, const int64_t *strides, const int64_t *slots, int64_t kv_len,
                              const uint8_t *mask, const uint16_t *cos, const uint16_t *sin, int64_t B, int64_t H,
                              int64_t I, int64_t Hq, int64_t Hkv, int64_t D, float eps, float scale, int nt,
                              const int32_t *kinds, const void *const *qparams, int64_t G, int use512);
/* Group-wise 4-bit GEMV (quantization/int4.py's packed layout) and the dequantization of a whole weight. */
QWEN2VL_API int gemv_q4_avx512bf16(const uint16_t *x, const uint8_t *w, const float *s, const uint8_t *z,
                                   uint16_t *y, int64_t M, int64_t N, int64_t K, int64_t G, int nthreads);
QWEN2VL_API int gemv_q4_avx2(const uint16_t *x, const uint8_t *w, const float *s, const uint8_t *z, uint16_t *y,
                             int64_t M, int64_t N, int64_t K, int64_t G, int nthreads);
/* The same products on int8-quantized activations, integer dot products (cpu_intdot.c); use512: the
 * AVX512-VNNI variant, else AVX2. */
QWEN2VL_API int gemv_i8_intdot(const uint16_t *x, const int8_t *w, const float *s, uint16_t *y, int64_t M,
                               int64_t N, int64_t K, int nthreads, int use512);
QWEN2VL_API int gemv_q4_intdot(const uint16_t *x, const uint8_t *w, const float *s, const uint8_t *z, uint16_t *y,
                               int64_t M, int64_t N, int64_t K, int64_t G, int nthreads, int use512);
QWEN2VL_API int dequant_q4_bf16(const uint8_t *w, const float *s, const uint8_t *z, uint16_t *out, int64_t N,
                                int64_t K, int64_t G, int nthreads, int use512);

/* Internal: shared between the library's own files (the fused step calls the per-op kernels' cores). */
void gemv_bf16_dp_rows(const uint16_t *x, const uint16_t *w, const float *scale, float *y, int64_t M, int64_t N,
                       int64_t K, const uint16_t *bias, int out_bf16, int64_t n0, int64_t n1);
int64_t gemv_bf16_dp_align(int64_t M);
void silu_mul_span(uint16_t *gate, const uint16_t *up, int64_t n);
void rms_norm_row(const uint16_t *xr, const uint16_t *w, uint16_t *yr, int64_t N, float eps);
void rope_head(const uint16_t *xi, const uint16_t *c, const uint16_t *s, uint16_t *o, int64_t D);
/* decode_attention's operands, for its core on one (row b, KV head g) = (bg / Hkv, bg % Hkv): the g-th group of
 * Hq / Hkv query heads of row b into out, using sc (decode_attention_scratch floats, 64-byte aligned). */
typedef struct {
    const uint16_t *q, *k, *v;
    const uint8_t *mask;
    uint16_t *out;
    int64_t B, Hq, Hkv, K, D, q_sb, q_sh, k_sb, k_sh, k_sk, v_sb, v_sh, v_sk;
    float scale;
} decode_attn;
int64_t decode_attention_scratch(const decode_attn *a);
void decode_attention_group(const decode_attn *a, int64_t bg, float *sc);

#endif
