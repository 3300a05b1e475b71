/* The training loss's softmax step over a chunk of logits rows, in place: for row r with label y_r
 *
 *   loss_r = log sum_i e^(x_i) - x_y          (its cross-entropy)
 *   x_i   <- scale (softmax(x)_i - [i == y])  (d loss / d logits, the loss being scale * sum_r loss_r)
 *
 * PyTorch's path (model.linear_cross_entropy) takes a log-softmax into a second buffer, a gather, an exp, a
 * subtraction and a division: five passes over a (341, 49152) chunk, 64 MB each, through memory. Here a row (192 KB
 * at SmolLM2's vocabulary) is read for its maximum, written once with e^(x - max) while summing, and scaled once,
 * while it stays in the core's L2: no second buffer. The maximum and e^x (exp8, within 2 ulp of expf) as attention's
 * (kernels.h exp_shifted). */
#include <math.h>
#include <omp.h>

#include "kernels.h"

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
        const float picked = x[labels[r]];
        float s;
        const float m = exp_shifted(x, vocab, &s);
        losses[r] = m + logf(s) - picked;
        scale_row(x, vocab, scale / s);
        x[labels[r]] -= scale;
    }
}
