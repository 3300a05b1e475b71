/* RMSNorm for training, y = x r w with r = 1 / sqrt(mean(x^2) + eps) per row, and its backward, one pass over a
 * row each (the row stays in L1 between its two reads).
 *
 * PyTorch 2.13 runs F.rms_norm on the CPU as its parts (a square, a mean, an rsqrt, two products) and differentiates
 * each: ~2.8 ms forward and backward for SmolLM2-135M's (4 x 256, 576) on the Intel Xeon here, where one
 * elementwise pass over that tensor costs 0.12 ms, and a training step has 61 of them. Here the forward reads x and
 * writes y, keeping r (one float a row); the backward reads x, dy and r and writes dx, with u = dy w:
 *     dx = r u - x r^3 mean(u x)           dw = sum over rows of dy x r (when the weight trains)
 * the weight's gradient summed per thread, then across threads. */
#include <omp.h>

#include "kernels.h"

/* sum of a[j] b[j] over n values (8 lanes, then the tail) */
__attribute__((target("avx2,fma"), always_inline)) static inline float dot(const float *a, const float *b, long n) {
    __m256 s = _mm256_setzero_ps();
    long j = 0;
    for (; j + 8 <= n; j += 8) s = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), s);
    float t = hsum(s);
    for (; j < n; j++) t += a[j] * b[j];
    return t;
}

__attribute__((target("avx2,fma")))
void mighty_rms_norm(const float *x, const float *w, float *y, float *r, long rows, long dim, float eps,
                     int nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long i = 0; i < rows; i++) {
        const float *xi = x + i * dim;
        float *yi = y + i * dim;
        const float ri = 1.0f / sqrtf(dot(xi, xi, dim) / (float)dim + eps);
        r[i] = ri;
        const __m256 vr = _mm256_set1_ps(ri);
        long j = 0;
        for (; j + 8 <= dim; j += 8)
            _mm256_storeu_ps(yi + j,
                             _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xi + j), vr), _mm256_loadu_ps(w + j)));
        for (; j < dim; j++) yi[j] = xi[j] * ri * w[j];
    }
}

/* dw may be NULL (a frozen weight: LoRA) */
__attribute__((target("avx2,fma")))
void mighty_rms_norm_backward(const float *x, const float *w, const float *r, const float *dy, float *dx, float *dw,
                              long rows, long dim, int nthreads) {
    if (nthreads < 1) nthreads = 1;
    float *part = dw ? calloc((size_t)nthreads * dim, sizeof(float)) : NULL;
    #pragma omp parallel num_threads(nthreads)
    {
        float *mine = part ? part + (long)omp_get_thread_num() * dim : NULL;
        #pragma omp for schedule(static)
        for (long i = 0; i < rows; i++) {
            const float *xi = x + i * dim, *dyi = dy + i * dim;
            float *dxi = dx + i * dim;
            const float ri = r[i];
            __m256 s = _mm256_setzero_ps();  /* sum of u x, u = dy w */
            long j = 0;
            for (; j + 8 <= dim; j += 8)
                s = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(dyi + j), _mm256_loadu_ps(w + j)),
                                    _mm256_loadu_ps(xi + j), s);
            float ux = hsum(s);
            for (; j < dim; j++) ux += dyi[j] * w[j] * xi[j];
            const float c = ri * ri * ri * ux / (float)dim;
            const __m256 vr = _mm256_set1_ps(ri), vc = _mm256_set1_ps(c);
            for (j = 0; j + 8 <= dim; j += 8) {
                const __m256 d = _mm256_loadu_ps(dyi + j), v = _mm256_loadu_ps(xi + j);
                const __m256 u = _mm256_mul_ps(d, _mm256_loadu_ps(w + j));
                _mm256_storeu_ps(dxi + j, _mm256_fnmadd_ps(v, vc, _mm256_mul_ps(vr, u)));
                if (mine)
                    _mm256_storeu_ps(mine + j, _mm256_fmadd_ps(_mm256_mul_ps(d, v), vr, _mm256_loadu_ps(mine + j)));
            }
            for (; j < dim; j++) {
                dxi[j] = ri * dyi[j] * w[j] - xi[j] * c;
                if (mine) mine[j] += dyi[j] * xi[j] * ri;
            }
        }
    }
    if (dw) {
        for (long j = 0; j < dim; j++) {
            float t = 0.0f;
            for (int k = 0; k < nthreads; k++) t += part[(long)k * dim + j];
            dw[j] = t;
        }
        free(part);
    }
}
