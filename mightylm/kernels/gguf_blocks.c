/* Products with GGUF's own blocks of 32 weights, read as stored (ggml-common.h); W (out, in / 32 blocks) row-major:
 *   Q8_0 (type 8):  fp16 d, 32 int8 q                 w = d * q
 *   Q4_0 (type 2):  fp16 d, 16 bytes                   w = d * q - 8 d
 *   Q4_1 (type 3):  fp16 d, fp16 m, 16 bytes           w = d * q + m
 * with byte j holding value j in its low nibble and value j + 16 in its high one. In short, w = d * q + c.
 * F16 (type 1) and BF16 (type 30) rows are taken as blocks of 32 plain values (64 bytes; d = 1, c = 0), converted
 * to float32 in registers (vcvtph2ps; a 16-bit shift for bfloat16).
 *
 *   y[r][0:out] = x[r][0:in] @ W^T (+ bias)      for each of `rows` rows of x
 *
 * One row (decoding one token): per block, sum_j w_j x_j = d * sum_j q_j x_j + c * sum_j x_j, so the 32 products
 * are taken with the codes (converted to float) and scaled once, and the block sums of x are computed once per
 * call. Two blocks per step with their own accumulators, so that no chain of dependent additions sets the pace.
 * Several rows (a prompt, a server's batch): each block is unpacked once into its 32 float weights and multiplied
 * into up to 8 rows held in registers, so the unpacking is shared by the rows.
 * Float32 arithmetic throughout: the result is dequantize-then-multiply up to float rounding. Each thread takes a
 * band of output rows (OpenMP), as the other quantized products do. */
#include <omp.h>
#include <stdlib.h>

#include "kernels.h"

enum { F16 = 1, Q4_0 = 2, Q4_1 = 3, Q8_0 = 8, BF16 = 30 };

/* Decoding reads each weight once, from L3 or memory; the hardware prefetchers of the machines here did not keep
 * ahead of two threads streaming blocks (perf: the stall sat on each block's first load), so the loop asks for the
 * bytes PREFETCH ahead itself. Measured on SmolLM2-135M Q4_1, AVX-512, 2 threads, interleaved runs in one process:
 * 69 tok/s without, 80 at 512 bytes, 92-96 at 2-16 KiB. */
#define PREFETCH 4096

float mighty_half_table[65536];

__attribute__((constructor, target("f16c")))
static void fill_half_table(void) {
    for (int h = 0; h < 65536; h++) mighty_half_table[h] = _cvtsh_ss((unsigned short)h);
}

static inline long block_bytes(int type) {
    return type == Q8_0 ? 34 : type == Q4_1 ? 20 : type == Q4_0 ? 18 : 64;  /* F16, BF16: 32 values of 2 bytes */
}

static inline int plain(int type) { return type == F16 || type == BF16; }

/* The block's scale d (1 for plain 16-bit values). */
static inline float block_scale(const unsigned char *blk, int type) { return plain(type) ? 1.0f : half_to_float(blk); }

/* The block's constant term c (see above). */
static inline float block_offset(const unsigned char *blk, int type, float d) {
    return type == Q4_1 ? half_to_float(blk + 2) : type == Q4_0 ? -8.0f * d : 0.0f;
}

static float *block_sums(const float *x, long in) {
    float *xsum = malloc(sizeof(float) * (in / 32 > 0 ? in / 32 : 1));
    for (long b = 0; b < in / 32; b++) {
        float t = 0.0f;
        for (long j = 0; j < 32; j++) t += x[32 * b + j];
        xsum[b] = t;
    }
    return xsum;
}

/* ---- AVX-512: a block is two registers of 16 ---- */
#define AVX512 __attribute__((target("avx512f,avx512bw,f16c,fma"), always_inline)) static inline

AVX512 void codes512(const unsigned char *blk, int type, __m512 *c0, __m512 *c1) {
    if (type == Q8_0) {
        *c0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk + 2))));
        *c1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk + 18))));
    } else if (type == F16) {
        *c0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)blk));
        *c1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + 32)));
    } else if (type == BF16) {  /* bfloat16 is the top half of a float32 */
        *c0 = _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)blk)), 16));
        *c1 = _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(blk + 32))), 16));
    } else {
        const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(blk + block_bytes(type) - 16)));
        *c0 = _mm512_cvtepi32_ps(_mm512_and_si512(q, _mm512_set1_epi32(15)));
        *c1 = _mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4));
    }
}

/* d * (codes . x) of one block, and its constant term's share c * sum(x) added to *off */
AVX512 __m512 block_dot512(const unsigned char *blk, int type, const float *xb, float xsum, float *off, float *d) {
    __m512 c0, c1;
    codes512(blk, type, &c0, &c1);
    *d = block_scale(blk, type);
    if (type != Q8_0 && !plain(type)) *off += block_offset(blk, type, *d) * xsum;
    return _mm512_fmadd_ps(c1, _mm512_loadu_ps(xb + 16), _mm512_mul_ps(c0, _mm512_loadu_ps(xb)));
}

AVX512 float one_row512(const float *x, const float *xsum, const unsigned char *row, int type, long blocks) {
    const long bytes = block_bytes(type);
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    float off0 = 0.0f, off1 = 0.0f, d0, d1;
    long b = 0;
    for (; b + 2 <= blocks; b += 2) {
        _mm_prefetch((const char *)(row + b * bytes) + PREFETCH, _MM_HINT_T0);
        const __m512 p0 = block_dot512(row + b * bytes, type, x + 32 * b, xsum[b], &off0, &d0);
        const __m512 p1 = block_dot512(row + (b + 1) * bytes, type, x + 32 * b + 32, xsum[b + 1], &off1, &d1);
        a0 = _mm512_fmadd_ps(p0, _mm512_set1_ps(d0), a0);
        a1 = _mm512_fmadd_ps(p1, _mm512_set1_ps(d1), a1);
    }
    if (b < blocks) {
        const __m512 p0 = block_dot512(row + b * bytes, type, x + 32 * b, xsum[b], &off0, &d0);
        a0 = _mm512_fmadd_ps(p0, _mm512_set1_ps(d0), a0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) + off0 + off1;
}

/* R rows of x (row stride ldx) times one weight row; results to y[r * ldy] */
AVX512 void many_rows512(const float *x, long ldx, const unsigned char *row, int type, long blocks, float *y,
                         long ldy, const int R) {
    const long bytes = block_bytes(type);
    __m512 acc[8];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (long b = 0; b < blocks; b++) {
        const unsigned char *blk = row + b * bytes;
        _mm_prefetch((const char *)blk + PREFETCH, _MM_HINT_T0);
        __m512 w0, w1;
        codes512(blk, type, &w0, &w1);
        const float d = block_scale(blk, type);
        const __m512 vd = _mm512_set1_ps(d), vc = _mm512_set1_ps(block_offset(blk, type, d));
        w0 = _mm512_fmadd_ps(w0, vd, vc);
        w1 = _mm512_fmadd_ps(w1, vd, vc);
        for (int r = 0; r < R; r++) {
            const float *xb = x + r * ldx + 32 * b;
            acc[r] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xb + 16), _mm512_fmadd_ps(w0, _mm512_loadu_ps(xb), acc[r]));
        }
    }
    for (int r = 0; r < R; r++) y[r * ldy] = _mm512_reduce_add_ps(acc[r]);
}

/* Output row o for every row of x; `type` is a constant in each copy (see gemm below). */
AVX512 void out_row512(const float *x, long rows, const float *xsum, const unsigned char *W, const int type,
                       const float *bias, float *y, long in, long out, long o) {
    const long blocks = in / 32;
    const unsigned char *row = W + o * blocks * block_bytes(type);
    if (rows == 1) {
        y[o] = one_row512(x, xsum, row, type, blocks);
    } else {
        long r = 0;
        for (; r + 8 <= rows; r += 8) many_rows512(x + r * in, in, row, type, blocks, y + r * out + o, out, 8);
        if (rows - r >= 4) { many_rows512(x + r * in, in, row, type, blocks, y + r * out + o, out, 4); r += 4; }
        if (rows - r >= 2) { many_rows512(x + r * in, in, row, type, blocks, y + r * out + o, out, 2); r += 2; }
        if (rows - r >= 1) many_rows512(x + r * in, in, row, type, blocks, y + r * out + o, out, 1);
    }
    if (bias)
        for (long r = 0; r < rows; r++) y[r * out + o] += bias[o];
}

/* ---- AVX2: a block is four registers of 8 ---- */
#define AVX2 __attribute__((target("avx2,fma,f16c"), always_inline)) static inline

AVX2 void codes256(const unsigned char *blk, int type, __m256 c[4]) {
    if (type == Q8_0) {
        for (int k = 0; k < 4; k++)
            c[k] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(blk + 2 + 8 * k))));
    } else if (type == F16) {
        for (int k = 0; k < 4; k++) c[k] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + 16 * k)));
    } else if (type == BF16) {
        for (int k = 0; k < 4; k++)
            c[k] = _mm256_castsi256_ps(
                _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(blk + 16 * k))), 16));
    } else {
        const unsigned char *qs = blk + block_bytes(type) - 16;
        const __m256i lo = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)qs));
        const __m256i hi = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(qs + 8)));
        const __m256i nibble = _mm256_set1_epi32(15);
        c[0] = _mm256_cvtepi32_ps(_mm256_and_si256(lo, nibble));   /* values 0..7 */
        c[1] = _mm256_cvtepi32_ps(_mm256_and_si256(hi, nibble));   /* 8..15 */
        c[2] = _mm256_cvtepi32_ps(_mm256_srli_epi32(lo, 4));       /* 16..23 */
        c[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(hi, 4));       /* 24..31 */
    }
}

AVX2 float one_row256(const float *x, const float *xsum, const unsigned char *row, int type, long blocks) {
    const long bytes = block_bytes(type);
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    float off = 0.0f;
    for (long b = 0; b < blocks; b++) {
        const unsigned char *blk = row + b * bytes;
        const float *xb = x + 32 * b;
        _mm_prefetch((const char *)blk + PREFETCH, _MM_HINT_T0);
        __m256 c[4];
        codes256(blk, type, c);
        const float d = block_scale(blk, type);
        __m256 p = _mm256_mul_ps(c[0], _mm256_loadu_ps(xb));
        __m256 q = _mm256_mul_ps(c[1], _mm256_loadu_ps(xb + 8));
        p = _mm256_fmadd_ps(c[2], _mm256_loadu_ps(xb + 16), p);
        q = _mm256_fmadd_ps(c[3], _mm256_loadu_ps(xb + 24), q);
        if (type != Q8_0 && !plain(type)) off += block_offset(blk, type, d) * xsum[b];
        a0 = _mm256_fmadd_ps(p, _mm256_set1_ps(d), a0);
        a1 = _mm256_fmadd_ps(q, _mm256_set1_ps(d), a1);
    }
    return hsum(_mm256_add_ps(a0, a1)) + off;
}

AVX2 void many_rows256(const float *x, long ldx, const unsigned char *row, int type, long blocks, float *y,
                       long ldy, const int R) {
    const long bytes = block_bytes(type);
    __m256 acc[4];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (long b = 0; b < blocks; b++) {
        const unsigned char *blk = row + b * bytes;
        _mm_prefetch((const char *)blk + PREFETCH, _MM_HINT_T0);
        __m256 w[4];
        codes256(blk, type, w);
        const float d = block_scale(blk, type);
        const __m256 vd = _mm256_set1_ps(d), vc = _mm256_set1_ps(block_offset(blk, type, d));
        for (int k = 0; k < 4; k++) w[k] = _mm256_fmadd_ps(w[k], vd, vc);
        for (int r = 0; r < R; r++) {
            const float *xb = x + r * ldx + 32 * b;
            for (int k = 0; k < 4; k++) acc[r] = _mm256_fmadd_ps(w[k], _mm256_loadu_ps(xb + 8 * k), acc[r]);
        }
    }
    for (int r = 0; r < R; r++) y[r * ldy] = hsum(acc[r]);
}

AVX2 void out_row256(const float *x, long rows, const float *xsum, const unsigned char *W, const int type,
                     const float *bias, float *y, long in, long out, long o) {
    const long blocks = in / 32;
    const unsigned char *row = W + o * blocks * block_bytes(type);
    if (rows == 1) {
        y[o] = one_row256(x, xsum, row, type, blocks);
    } else {
        long r = 0;
        for (; r + 4 <= rows; r += 4) many_rows256(x + r * in, in, row, type, blocks, y + r * out + o, out, 4);
        if (rows - r >= 2) { many_rows256(x + r * in, in, row, type, blocks, y + r * out + o, out, 2); r += 2; }
        if (rows - r >= 1) many_rows256(x + r * in, in, row, type, blocks, y + r * out + o, out, 1);
    }
    if (bias)
        for (long r = 0; r < rows; r++) y[r * out + o] += bias[o];
}

/* Each output row is one call with the type a constant, so each type gets its own copy of the inner loops and no
 * branch on the type runs per block. (A constant passed into an OpenMP region does not reach its outlined body.) */
__attribute__((target("avx512f,avx512bw,f16c,fma")))
static void gemm512(const float *x, long rows, const float *xsum, const unsigned char *W, int type,
                    const float *bias, float *y, long in, long out, int nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long o = 0; o < out; o++) {
        if (type == Q8_0) out_row512(x, rows, xsum, W, Q8_0, bias, y, in, out, o);
        else if (type == Q4_0) out_row512(x, rows, xsum, W, Q4_0, bias, y, in, out, o);
        else if (type == Q4_1) out_row512(x, rows, xsum, W, Q4_1, bias, y, in, out, o);
        else if (type == F16) out_row512(x, rows, xsum, W, F16, bias, y, in, out, o);
        else out_row512(x, rows, xsum, W, BF16, bias, y, in, out, o);
    }
}

__attribute__((target("avx2,fma,f16c")))
static void gemm256(const float *x, long rows, const float *xsum, const unsigned char *W, int type,
                    const float *bias, float *y, long in, long out, int nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long o = 0; o < out; o++) {
        if (type == Q8_0) out_row256(x, rows, xsum, W, Q8_0, bias, y, in, out, o);
        else if (type == Q4_0) out_row256(x, rows, xsum, W, Q4_0, bias, y, in, out, o);
        else if (type == Q4_1) out_row256(x, rows, xsum, W, Q4_1, bias, y, in, out, o);
        else if (type == F16) out_row256(x, rows, xsum, W, F16, bias, y, in, out, o);
        else out_row256(x, rows, xsum, W, BF16, bias, y, in, out, o);
    }
}

/* x (rows, in) float32 row-major, y (rows, out); in % 32 == 0; type 8, 2, 3, 1 or 30; bias may be NULL. */
void mighty_gemm_ggml(const float *x, long rows, const unsigned char *W, int type, const float *bias, float *y,
                      long in, long out, int nthreads) {
    if (nthreads < 1) nthreads = 1;
    float *xsum = rows == 1 ? block_sums(x, in) : NULL;
    if (mighty_isa_level) gemm512(x, rows, xsum, W, type, bias, y, in, out, nthreads);
    else gemm256(x, rows, xsum, W, type, bias, y, in, out, nthreads);
    free(xsum);
}

void mighty_gemv_ggml(const float *x, const unsigned char *W, int type, const float *bias, float *y, long in,
                      long out, int nthreads) {
    mighty_gemm_ggml(x, 1, W, type, bias, y, in, out, nthreads);
}
