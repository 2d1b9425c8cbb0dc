/* Non-causal flash attention for the vision tower on CPU (AVX512F, fp32 math, online softmax).
 *
 * q, k, v: (H, N, D) float32 contiguous, q already multiplied by the softmax scale; out: (H, N, D) float32.
 * One thread per head (OpenMP). Per head, K is transposed into (D, N) so that 16 keys' scores are one vector;
 * queries go in blocks of 4 (16 score accumulators), keys in blocks of 64 (a block of K^T and V stays in L1).
 * PyTorch's CPU flash kernel without AMX runs this at a fraction of its matmul throughput; the vision tower's
 * time on large images is mostly this attention.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define QB 4
#define KB 64

/* exp(x) for x <= 0 (scores minus the running max): 2^n * p(r), |rel err| < 2e-7. */
static inline __m512 exp_nonpos(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

/* One head. kt: (D, Np) scratch with Np = N rounded up to KB, padded keys masked out. */
static void head_attention(const float *q, const float *k, const float *v, float *out, int64_t N, int64_t D,
                           float *kt, int64_t Np) {
    for (int64_t d = 0; d < D; d++)
        for (int64_t j = 0; j < Np; j++) kt[d * Np + j] = j < N ? k[j * D + d] : 0.0f;
    const int64_t DV = D / 16;  /* D is a multiple of 16 */
    for (int64_t i0 = 0; i0 < N; i0 += QB) {
        int64_t nq = N - i0 < QB ? N - i0 : QB;
        float m[QB], l[QB];
        __m512 acc[QB][8];  /* D <= 128 */
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
                    __m512 qv = _mm512_set1_ps(i < nq ? q[(i0 + i) * D + d] : 0.0f);
                    s[i][0] = _mm512_fmadd_ps(qv, k0, s[i][0]);
                    s[i][1] = _mm512_fmadd_ps(qv, k1, s[i][1]);
                    s[i][2] = _mm512_fmadd_ps(qv, k2, s[i][2]);
                    s[i][3] = _mm512_fmadd_ps(qv, k3, s[i][3]);
                }
            }
            int64_t valid = Np - j0 < KB ? Np - j0 : KB;
            if (j0 + valid > N) valid = N - j0;
            for (int i = 0; i < nq; i++) {
                for (int c = 0; c < KB / 16; c++) {  /* mask padded keys */
                    int64_t base = c * 16;
                    if (base >= valid) { s[i][c] = _mm512_set1_ps(-INFINITY); continue; }
                    if (base + 16 > valid) {
                        __mmask16 keep = (__mmask16)((1u << (valid - base)) - 1u);
                        s[i][c] = _mm512_mask_blend_ps(keep, _mm512_set1_ps(-INFINITY), s[i][c]);
                    }
                }
                __m512 mx = _mm512_max_ps(_mm512_max_ps(s[i][0], s[i][1]), _mm512_max_ps(s[i][2], s[i][3]));
                float bm = _mm512_reduce_max_ps(mx);
                float nm = bm > m[i] ? bm : m[i];
                float corr = expf(m[i] - nm);
                m[i] = nm;
                __m512 nmv = _mm512_set1_ps(nm), sum = _mm512_setzero_ps();
                for (int c = 0; c < KB / 16; c++) {
                    s[i][c] = exp_nonpos(_mm512_sub_ps(s[i][c], nmv));
                    sum = _mm512_add_ps(sum, s[i][c]);
                }
                l[i] = l[i] * corr + _mm512_reduce_add_ps(sum);
                __m512 cv = _mm512_set1_ps(corr);
                for (int64_t c = 0; c < DV; c++) acc[i][c] = _mm512_mul_ps(acc[i][c], cv);
            }
            float p[QB][KB] __attribute__((aligned(64)));
            for (int i = 0; i < nq; i++)
                for (int c = 0; c < KB / 16; c++) _mm512_store_ps(&p[i][c * 16], s[i][c]);
            for (int64_t j = 0; j < valid; j++) {
                const float *vr = v + (j0 + j) * D;
                for (int64_t c = 0; c < DV; c++) {
                    __m512 vv = _mm512_loadu_ps(vr + c * 16);
                    for (int i = 0; i < nq; i++)
                        acc[i][c] = _mm512_fmadd_ps(_mm512_set1_ps(p[i][j]), vv, acc[i][c]);
                }
            }
        }
        for (int i = 0; i < nq; i++) {
            __m512 inv = _mm512_set1_ps(1.0f / l[i]);
            for (int64_t c = 0; c < DV; c++)
                _mm512_storeu_ps(out + (i0 + i) * D + c * 16, _mm512_mul_ps(acc[i][c], inv));
        }
    }
}

int attention_f32(const float *q, const float *k, const float *v, float *out, int64_t H, int64_t N, int64_t D,
                  int nthreads) {
    if (D % 16 != 0 || D > 128) return -1;
    int64_t Np = (N + KB - 1) / KB * KB;
    int rc = 0;
#pragma omp parallel num_threads(nthreads)
    {
        float *kt = (float *)aligned_alloc(64, (size_t)(D * Np * sizeof(float)));
        if (!kt) {
            rc = -3;
        } else {
#pragma omp for schedule(dynamic, 1)
            for (int64_t h = 0; h < H; h++)
                head_attention(q + h * N * D, k + h * N * D, v + h * N * D, out + h * N * D, N, D, kt, Np);
            free(kt);
        }
    }
    return rc;
}
