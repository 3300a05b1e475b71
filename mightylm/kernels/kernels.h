/* What the kernel sources share: the instruction set chosen at run time and two small helpers. */
#ifndef MIGHTY_KERNELS_H
#define MIGHTY_KERNELS_H

#include <immintrin.h>
#include <string.h>

/* 0: AVX2 + FMA (the baseline); 1: AVX-512 (F, BW, VNNI) where the CPU has it. Set once by mighty_set_isa. */
extern int mighty_isa_level;

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* float16 -> float32 through a table of all 65536 values (256 KB, filled when the library loads): a scalar
 * F16C conversion costs more than the 32 multiply-adds of a block it scales (measured: 3.4 against 2.0 ns per
 * Q4_1 block on one core), a table read only a load. ggml did the same for years. */
extern float mighty_half_table[65536];

static inline float half_to_float(const unsigned char *p) {
    unsigned short h;
    memcpy(&h, p, 2);
    return mighty_half_table[h];
}

void mighty_gemv_ggml(const float *x, const unsigned char *W, int type, const float *bias, float *y, long in,
                      long out, int nthreads);

void mighty_gemm_ggml(const float *x, long rows, const unsigned char *W, int type, const float *bias, float *y,
                      long in, long out, int nthreads);

int mighty_gemm_ggml_q8x(const float *x, long rows, const unsigned char *T, int type, const float *bias, float *y,
                         long in, long out, int nthreads);

void mighty_gemm_sparse24(const float *x, long rows, const float *values, const unsigned char *index,
                          const float *bias, float *y, long in, long out, int nthreads);

#endif
