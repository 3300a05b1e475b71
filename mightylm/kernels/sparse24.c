/* 2:4 sparse weights for batch-1 decoding: y = x @ W^T (+ bias) where every 4 consecutive inputs of a row of W
 * hold at most 2 non-zeros, stored as what is kept and where (compress/sparse24.py):
 *
 *   values (out, in / 2) float32   the two kept weights of each group of 4, in input order
 *   index  (out, in / 8) bytes     their positions in the group, 2 bits each: kept value k of a row at bits
 *                                  2(k % 16) of the little-endian 32-bit word k / 16 (16 values, 8 groups, a word)
 *
 * A row is 2.25 bytes per weight instead of 4: decoding, bound by the bytes it streams, reads 56 % of the dense
 * float32 traffic. PyTorch has a 2:4 kernel on CUDA only, llama.cpp none. Each kept value's input is picked from
 * registers: AVX-512 takes 32 inputs in two registers and gathers 16 of them with one two-source permute; AVX2 takes
 * 16 inputs, permutes each half within its lane group and blends. Each thread takes a band of output rows. */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "kernels.h"

#ifndef SPARSE_PREFETCH
#define SPARSE_PREFETCH 4096
#endif

static float row_tail(const float *x, const float *v, const unsigned char *idx, long from, long in) {
    float acc = 0.0f;
    for (long k = from / 2; k < in / 2; k++) {
        const long group = k / 2, pos = (idx[k / 4] >> (2 * (k % 4))) & 3;
        acc += v[k] * x[4 * group + pos];
    }
    return acc;
}

static float row_avx2(const float *x, const float *v, const unsigned char *idx, long in) {
    const __m256i shifts = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
    const __m256i base = _mm256_setr_epi32(0, 0, 4, 4, 0, 0, 4, 4);  /* each value's group, within its half */
    const __m256i three = _mm256_set1_epi32(3);
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    long c = 0;
    for (; c + 32 <= in; c += 32) {  /* 32 inputs: two steps of 16 (8 kept values, 16 bits of positions) */
        uint32_t bits;
        _mm_prefetch((const char *)(v + c / 2) + SPARSE_PREFETCH, _MM_HINT_T0);
        _mm_prefetch((const char *)(v + c / 2 + 8) + SPARSE_PREFETCH, _MM_HINT_T0);
        memcpy(&bits, idx + c / 8, 4);
        __m256i i0 = _mm256_add_epi32(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)(bits & 0xFFFF)),
                                                                          shifts), three), base);
        __m256i i1 = _mm256_add_epi32(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)(bits >> 16)),
                                                                          shifts), three), base);
        __m256 g0 = _mm256_blend_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(x + c), i0),
                                    _mm256_permutevar8x32_ps(_mm256_loadu_ps(x + c + 8), i0), 0xF0);
        __m256 g1 = _mm256_blend_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(x + c + 16), i1),
                                    _mm256_permutevar8x32_ps(_mm256_loadu_ps(x + c + 24), i1), 0xF0);
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(v + c / 2), g0, acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(v + c / 2 + 8), g1, acc1);
    }
    return hsum(_mm256_add_ps(acc0, acc1)) + row_tail(x, v, idx, c, in);
}

__attribute__((target("avx512f")))
static float row_avx512(const float *x, const float *v, const unsigned char *idx, long in) {
    const __m512i shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i base = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
    const __m512i three = _mm512_set1_epi32(3);
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    long c = 0;
    for (; c + 64 <= in; c += 64) {  /* 64 inputs: two steps of 32 (16 kept values, one 32-bit word of positions) */
        uint32_t b0, b1;
        _mm_prefetch((const char *)(v + c / 2) + SPARSE_PREFETCH, _MM_HINT_T0);
        _mm_prefetch((const char *)(v + c / 2 + 16) + SPARSE_PREFETCH, _MM_HINT_T0);
        memcpy(&b0, idx + c / 8, 4);
        memcpy(&b1, idx + c / 8 + 4, 4);
        __m512i i0 = _mm512_add_epi32(_mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32((int)b0), shifts), three), base);
        __m512i i1 = _mm512_add_epi32(_mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32((int)b1), shifts), three), base);
        __m512 g0 = _mm512_permutex2var_ps(_mm512_loadu_ps(x + c), i0, _mm512_loadu_ps(x + c + 16));
        __m512 g1 = _mm512_permutex2var_ps(_mm512_loadu_ps(x + c + 32), i1, _mm512_loadu_ps(x + c + 48));
        acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(v + c / 2), g0, acc0);
        acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(v + c / 2 + 16), g1, acc1);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) + row_tail(x, v, idx, c, in);
}

/* y (rows, out) = x (rows, in) @ W^T (+ bias), in % 8 == 0, bias may be NULL. Each thread takes a band of output
 * rows; a weight row is read from memory once and stays in L1 while every input row uses it (a short prompt's
 * prefill costs about one decode step's traffic). */
void mighty_gemm_sparse24(const float *x, long rows, const float *values, const unsigned char *index,
                          const float *bias, float *y, long in, long out, int nthreads) {
    const int wide = mighty_isa_level;
    #pragma omp parallel for num_threads(nthreads < 1 ? 1 : nthreads) schedule(static)
    for (long o = 0; o < out; o++) {
        const float *v = values + o * (in / 2);
        const unsigned char *idx = index + o * (in / 8);
        for (long r = 0; r < rows; r++) {
            const float *xr = x + r * in;
            const float d = wide ? row_avx512(xr, v, idx, in) : row_avx2(xr, v, idx, in);
            y[r * out + o] = bias ? d + bias[o] : d;
        }
    }
}
