/* The training loss's softmax step over a chunk of logits rows, in place: for row r with label y_r
 *
 *   loss_r = log sum_i e^(x_i) - x_y          (its cross-entropy)
 *   x_i   <- scale (softmax(x)_i - [i == y])  (d loss / d logits, the loss being scale * sum_r loss_r)
 *
 * PyTorch's path (model.linear_cross_entropy) takes a log-softmax into a second buffer, a gather, an exp, a
 * subtraction and a division: five passes over a (341, 49152) chunk, 64 MB each, through memory. Here a row (192 KB
 * at SmolLM2's vocabulary) is read for its maximum, written once with e^(x - max) while summing, and scaled once,
 * while it stays in the core's L2: no second buffer. e^x by exp8 (within 2 ulp of expf). */
#include <math.h>
#include <omp.h>

#include "kernels.h"

__attribute__((target("avx2,fma"))) static float row_max(const float *x, long n) {
    __m256 m = _mm256_set1_ps(-INFINITY);
    long i = 0;
    for (; i + 8 <= n; i += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(x + i));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    float best = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
    for (; i < n; i++) best = x[i] > best ? x[i] : best;
    return best;
}

/* x <- e^(x - m), returning the sum */
__attribute__((target("avx2,fma"))) static float exp_sum(float *x, long n, float m) {
    const __m256 vm = _mm256_set1_ps(m);
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    long i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m256 e0 = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), vm));
        const __m256 e1 = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i + 8), vm));
        _mm256_storeu_ps(x + i, e0);
        _mm256_storeu_ps(x + i + 8, e1);
        s0 = _mm256_add_ps(s0, e0);
        s1 = _mm256_add_ps(s1, e1);
    }
    float s = hsum(_mm256_add_ps(s0, s1));
    for (; i < n; i++) s += x[i] = expf(x[i] - m);
    return s;
}

__attribute__((target("avx2,fma"))) static void scale_row(float *x, long n, float c) {
    const __m256 vc = _mm256_set1_ps(c);
    long i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), vc));
    for (; i < n; i++) x[i] *= c;
}

/* logits (rows, vocab), labels in [0, vocab) (the caller checks): each row to its gradient as above, its loss to
 * losses[r] */
void mighty_softmax_cross_entropy(float *logits, long rows, long vocab, const long *labels, float scale,
                                  float *losses, int nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long r = 0; r < rows; r++) {
        float *x = logits + r * vocab;
        const float m = row_max(x, vocab), picked = x[labels[r]];
        const float s = exp_sum(x, vocab, m);
        losses[r] = m + logf(s) - picked;
        scale_row(x, vocab, scale / s);
        x[labels[r]] -= scale;
    }
}
