/* Batch-1 matrix-vector product for input-major float32 weights, AVX2 + FMA, OpenMP.
 *
 *   y[0:out] = x[0:in] @ Wt[0:in][0:out] (+ bias)     Wt row-major, i.e. W^T of an (out, in) Linear
 *
 * Decoding one token is bound by how fast the weights stream from memory. Each thread takes a
 * contiguous band of rows of Wt and streams it front to back (the access pattern hardware
 * prefetchers like best), accumulating into its own copy of y, which stays in L1/L2; the copies
 * are summed at the end. Four rows per pass quarter the traffic on the accumulator.
 *
 * Linked against `libgomp.so.1` by soname: loaded into a process where torch has already loaded
 * its libgomp, the same runtime and thread pool are reused (no second set of spinning threads).
 */
#include <immintrin.h>
#include <omp.h>
#include <string.h>

static void band(const float *x, const float *W, float *y, long i0, long i1, long out) {
    memset(y, 0, (size_t)out * sizeof(float));
    long i = i0;
    for (; i + 4 <= i1; i += 4) {
        const __m256 a0 = _mm256_set1_ps(x[i]), a1 = _mm256_set1_ps(x[i + 1]);
        const __m256 a2 = _mm256_set1_ps(x[i + 2]), a3 = _mm256_set1_ps(x[i + 3]);
        const float *w0 = W + i * out, *w1 = w0 + out, *w2 = w1 + out, *w3 = w2 + out;
        long o = 0;
        for (; o + 8 <= out; o += 8) {
            __m256 acc = _mm256_loadu_ps(y + o);
            acc = _mm256_fmadd_ps(a0, _mm256_loadu_ps(w0 + o), acc);
            acc = _mm256_fmadd_ps(a1, _mm256_loadu_ps(w1 + o), acc);
            acc = _mm256_fmadd_ps(a2, _mm256_loadu_ps(w2 + o), acc);
            acc = _mm256_fmadd_ps(a3, _mm256_loadu_ps(w3 + o), acc);
            _mm256_storeu_ps(y + o, acc);
        }
        for (; o < out; o++) y[o] += x[i] * w0[o] + x[i + 1] * w1[o] + x[i + 2] * w2[o] + x[i + 3] * w3[o];
    }
    for (; i < i1; i++)
        for (long o = 0; o < out; o++) y[o] += x[i] * W[i * out + o];
}

/* scratch: (nthreads - 1) * out floats for the other threads' partial sums. bias may be NULL. */
void mighty_gemv(const float *x, const float *W, const float *bias, float *y, float *scratch,
                 long in, long out, int nthreads) {
    if (nthreads < 1) nthreads = 1;
    int used = 1;  /* OpenMP may grant fewer threads than asked (nested regions, limits) */
    #pragma omp parallel num_threads(nthreads)
    {
        const int t = omp_get_thread_num(), n = omp_get_num_threads();
        const long i0 = in * t / n, i1 = in * (t + 1) / n;
        band(x, W, t == 0 ? y : scratch + (long)(t - 1) * out, i0, i1, out);
        if (t == 0) used = n;
    }
    for (int t = 1; t < used; t++) {
        const float *part = scratch + (long)(t - 1) * out;
        for (long o = 0; o < out; o++) y[o] += part[o];
    }
    if (bias)
        for (long o = 0; o < out; o++) y[o] += bias[o];
}
